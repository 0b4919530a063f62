"""Answers in JSON, validated against a JSON Schema; retried, then constrained when the model does not comply.

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["colour", "count"]}
    structured_answers(vlm, ["scene.png"], ["what colour is the star, and how many shapes are there?"], schema)
    # -> [StructuredAnswer(value={"colour": "red", "count": 3}, valid=True, how="constrained", attempts=3, ...)]

Three steps per question, each only for the answers still invalid:
1. **direct**: the question with the schema appended ("Answer in JSON matching this schema: ..."), greedy; the reply
   is parsed (the first {...} in it) and validated with `jsonschema`;
2. **retry**: sampled again (`retries` times, temperature 0.7, a seed per try);
3. **constrained**: the object built from the schema, so it is valid by construction. Each property is asked as
   its own question (its `description`, else the user's question): an `enum`, a `boolean` (yes / no) or a bounded
   `integer` (at most 100 values) is the option the model gives the highest log-likelihood as its answer (decoding
   constrained to the allowed values); an unbounded `integer` / `number` is generated with every token that is not
   digits suppressed; a `string` is generated freely (json.dumps escapes it). Nested objects recurse. Arrays and
   `anyOf`-style combinations are refused in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from vlmkit.data.chat import image_markers
from vlmkit.errors import ConfigError

MAX_ENUM = 100  # a bounded integer range up to this many values is scored like an enum


@dataclass
class StructuredAnswer:
    value: object  # the parsed JSON (None when nothing valid came back and constraining was off)
    valid: bool
    how: str  # "direct", "retry", "constrained" or "invalid"
    attempts: int  # generations tried before the answer (constrained decoding counts as one)
    raw: list[str] = field(default_factory=list)  # the model's replies, in order
    error: str = ""  # why the last free-form reply failed validation


def load_schema(path_or_schema) -> dict:
    """A schema from a dict or a JSON file, checked against its metaschema (one-line ConfigError if not)."""
    import jsonschema

    if isinstance(path_or_schema, dict):
        schema, where = path_or_schema, "schema"
    else:
        from pathlib import Path

        path = Path(path_or_schema)
        if not path.is_file():
            raise ConfigError(f"{path}: JSON Schema file not found")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        where = str(path)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"{where}: not a valid JSON Schema ({e.message})") from None
    return schema


def parse_and_validate(text: str, schema: dict) -> tuple[object, str]:
    """(value, "") when `text` holds JSON valid under `schema` (the first {...} or [...] in it, so a reply may wrap
    it in words), else (None, one-line reason)."""
    import jsonschema

    match = re.search(r"[\[{].*[\]}]", text, flags=re.S)
    if match is None:
        return None, "no JSON object in the reply"
    try:
        value = json.loads(match.group(0))
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg}"
    errors = sorted(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(value), key=lambda e: e.path
    )
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
        return None, f"{where}: {errors[0].message}"
    return value, ""


def schema_instruction(schema: dict) -> str:
    return "Answer in JSON matching this schema: " + json.dumps(schema, separators=(",", ":"))


def _conversation(question: str, images: int, system: str | None = None) -> list[dict]:
    turns = [{"from": "system", "value": system}] if system else []
    return turns + [{"from": "human", "value": image_markers(images) + question}]


def option_scores(vlm, image_group: list, question: str, options: list[str]) -> torch.Tensor:
    """log p(option as the whole answer | images, question) for each option: (K,) float32."""
    from vlmkit.data.chat import render
    from vlmkit.losses.captioning import IGNORE_INDEX

    rows = []
    for option in options:
        turns = _conversation(question, len(image_group)) + [{"from": "gpt", "value": option}]
        rows.append(render(turns, vlm.tokenizer, vlm.template, num_image_tokens=vlm.num_image_tokens,
                           image_token_id=vlm.image_token_id))  # fmt: skip
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), vlm.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)], labels[i, : len(lab)], mask[i, : len(ids)] = (
            torch.tensor(ids),
            torch.tensor(lab),
            1,
        )
    pixels = vlm.pixel_values([im for _ in options for im in image_group])
    with torch.inference_mode():
        return vlm.answer_log_prob(
            pixels, input_ids.to(vlm.device), labels.to(vlm.device), mask.to(vlm.device)
        ).cpu()


def _digit_free_tokens(tokenizer) -> list[int]:
    """Every token id whose text is not made of digits (what integer generation suppresses)."""
    out = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.decode([i]).strip()
        if not (piece and piece.isdigit()):
            out.append(i)
    return out


def constrained_value(vlm, image_group: list, question: str, schema: dict, where: str = "(root)"):
    """A value for `schema` built by the model, valid by construction (module docstring, step 3)."""
    if vlm.family != "llava":
        raise ConfigError(f"constrained JSON answers score options with LLaVA-style models, not {vlm.family}; "
                          "use constrain=False (retries only)")  # fmt: skip
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        options = schema["enum"] if "enum" in schema else [schema["const"]]
        texts = [o if isinstance(o, str) else json.dumps(o) for o in options]
        return options[int(option_scores(vlm, image_group, question, texts).argmax())]
    if kind == "boolean":
        return bool(option_scores(vlm, image_group, question, ["yes", "no"]).argmax() == 0)
    if kind == "object":
        props = schema.get("properties", {})
        required = schema.get("required", list(props))
        return {name: constrained_value(vlm, image_group, props[name].get("description", question), props[name],
                                        f"{where}/{name}") for name in required if name in props}  # fmt: skip
    if kind == "integer" and "minimum" in schema and "maximum" in schema:
        lo, hi = int(schema["minimum"]), int(schema["maximum"])
        if hi - lo + 1 <= MAX_ENUM:
            values = list(range(lo, hi + 1))
            return values[int(option_scores(vlm, image_group, question, [str(v) for v in values]).argmax())]
    if kind in ("integer", "number"):
        config = vlm.generation_config(max_new_tokens=6, suppress_tokens=_digit_free_tokens(vlm.tokenizer)
                                       if vlm.tokenizer.vocab_size <= 65536 else [])  # fmt: skip
        text = vlm.generate([image_group], [_conversation(question, len(image_group))], config)[0]
        digits = re.search(r"-?\d+(\.\d+)?", text)
        value = float(digits.group(0)) if digits else 0
        value = min(max(value, schema.get("minimum", value)), schema.get("maximum", value))
        return int(value) if kind == "integer" else value
    if kind == "string":
        text = vlm.generate([image_group], [_conversation(question, len(image_group))],
                            vlm.generation_config(max_new_tokens=int(schema.get("maxLength", 32))))[0]  # fmt: skip
        return text.strip()[: int(schema.get("maxLength", 10**6))]
    raise ConfigError(
        f"schema at {where}: constrained decoding builds objects of enum, const, boolean, integer, number and string "
        f"properties; {json.dumps(schema)[:80]} is none of them (use retries only: constrain=False)"
    )


def structured_answers(vlm, images, questions: list[str], schema: dict, retries: int = 2,
                       constrain: bool = True, max_new_tokens: int = 64,
                       system: str | None = None) -> list[StructuredAnswer]:  # fmt: skip
    """One StructuredAnswer per (images, question): direct, retried, then constrained (module docstring).
    `images[i]` is question i's image or list of images (one `<image>` each, before the question); `system`, a
    system turn for the free-form attempts."""
    schema = load_schema(schema)
    groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in images]
    prompts = [q + "\n" + schema_instruction(schema) for q in questions]
    answers = [StructuredAnswer(None, False, "invalid", 0) for _ in questions]
    todo = list(range(len(questions)))
    for attempt in range(1 + retries):
        if not todo:
            break
        sample = dict(do_sample=True, temperature=0.7, seed=attempt) if attempt else {}
        config = vlm.generation_config(max_new_tokens=max_new_tokens, **sample)
        convs = [_conversation(prompts[i], len(groups[i]), system) for i in todo]
        replies = vlm.generate([groups[i] for i in todo], convs, config)
        still = []
        for i, reply in zip(todo, replies):
            a = answers[i]
            a.raw.append(reply)
            a.attempts += 1
            value, a.error = parse_and_validate(reply, schema)
            if a.error:
                still.append(i)
            else:
                a.value, a.valid, a.how = value, True, "direct" if attempt == 0 else "retry"
        todo = still
    if constrain:
        for i in todo:
            a = answers[i]
            a.value = constrained_value(vlm, groups[i], questions[i], schema)
            value, error = parse_and_validate(json.dumps(a.value), schema)
            a.valid, a.how, a.attempts = not error, "constrained", a.attempts + 1
    return answers
