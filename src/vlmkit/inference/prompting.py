"""Prompt variants for generative models, measured side by side: `vlmkit eval prompts`.

A prompts file (JSON list, or JSONL with one object per line) holds the variants:

    {"name": "plain", "template": "{question}"}
    {"name": "one word", "template": "{question} Answer with one word."}
    {"name": "expert", "system": "You are a careful observer of simple shapes.", "template": "{question}"}

`template` must contain `{question}` (default "{question}"); `system` (optional) is the conversation's system
turn, rendered by the model's chat template. `json_schema` (optional: a schema object, or a file next to the prompts
file) asks for the answer in JSON (`vlmkit.inference.structured`: validated, retried, then constrained); the
prediction is the object's `answer_key` property (default "answer"), and the report counts how each answer came
(direct, retry, constrained). Every variant answers every question of a VQA file with the image
before the text (the media-first order prompting guides recommend), and is scored by `vlmkit.eval.vqa`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vlmkit.data.chat import IMAGE_TOKEN
from vlmkit.errors import DataError


def read_prompt_variants(path: str | Path) -> list[dict]:
    """The variants of a prompts file; a malformed one is an error naming its line (JSONL) or index (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found (JSON list or JSONL of {{name, template, system}})")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = [(f"item {i}", v) for i, v in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    else:
        from vlmkit.data.manifest import read_jsonl

        items = [(f"line {n}", v) for n, v in read_jsonl(path)]
    variants, names = [], set()
    for where, v in items:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"].strip():
            raise DataError(f"{path}: {where}: a variant is an object with a 'name'")
        template = v.get("template", "{question}")
        if not isinstance(template, str) or "{question}" not in template:
            raise DataError(f"{path}: {where}: 'template' must contain {{question}}")
        system = v.get("system")
        if system is not None and (not isinstance(system, str) or not system.strip()):
            raise DataError(f"{path}: {where}: 'system' must be a non-empty string when given")
        if v["name"] in names:
            raise DataError(f"{path}: {where}: the name {v['name']!r} is used twice")
        names.add(v["name"])
        variant = {"name": v["name"], "template": template, "system": system}
        if v.get("json_schema") is not None:
            from vlmkit.errors import ConfigError
            from vlmkit.inference.structured import load_schema

            schema = v["json_schema"]
            try:
                variant["json_schema"] = load_schema(
                    schema if isinstance(schema, dict) else path.parent / schema
                )
            except ConfigError as e:
                raise DataError(f"{path}: {where}: {e}") from None
            key = v.get("answer_key", "answer")
            if key not in variant["json_schema"].get("properties", {}):
                raise DataError(
                    f"{path}: {where}: the schema has no {key!r} property to read the answer from"
                )
            variant["answer_key"] = key
        variants.append(variant)
    if not variants:
        raise DataError(f"{path}: no prompt variants")
    return variants


def conversation(variant: dict, question: str) -> list[dict]:
    """The variant's conversation for one question: [system,] the image, then the templated question."""
    turns = [{"from": "system", "value": variant["system"]}] if variant.get("system") else []
    # str.replace, not format: a question may hold braces
    return turns + [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n" + variant["template"].replace("{question}", question)}
    ]


def answer_fn(pipe, variant: dict, max_new_tokens: int = 16, how: dict | None = None) -> Callable:
    """(image paths, questions) -> answers, asked the variant's way. A JSON variant's answers are its
    `answer_key` property; `how` counts how each came (direct, retry, constrained, invalid)."""

    def answer(images, questions):
        if "json_schema" in variant:
            from vlmkit.inference.structured import structured_answers

            texts = [variant["template"].replace("{question}", q) for q in questions]
            out = structured_answers(pipe, list(images), texts, variant["json_schema"], max_new_tokens=64,
                                     system=variant.get("system"))  # fmt: skip
            for a in out:
                if how is not None:
                    how[a.how] = how.get(a.how, 0) + 1
            return [
                str(a.value.get(variant["answer_key"], "")) if isinstance(a.value, dict) else "" for a in out
            ]
        convs = [conversation(variant, q) for q in questions]
        return pipe.generate(list(images), convs, pipe.generation_config(max_new_tokens=max_new_tokens))

    return answer


def evaluate_prompt_variants(pipe, variants: list[dict], data, *, limit: int | None = None, batch_size: int = 32,
                             model_name: str = "", out_dir: str | Path | None = None,
                             max_new_tokens: int = 16) -> dict:  # fmt: skip
    """VQA accuracy of each variant on `data` (overall and per question type), side by side. With `out_dir`: each
    variant's predictions in its own folder, prompts.json, prompts.png and report.html."""
    from vlmkit.eval.vqa import evaluate_vqa

    rows = []
    for v in variants:
        sub = Path(out_dir) / _slug(v["name"]) if out_dir is not None else None
        how: dict = {}
        res = evaluate_vqa(answer_fn(pipe, v, max_new_tokens, how), data, batch_size=batch_size, limit=limit,
                           out_dir=sub, model_name=model_name, progress=False)  # fmt: skip
        m = res["metrics"]
        rows.append({**v, "accuracy": m["accuracy"], "by_type": m.get("accuracy_by_type", {}),
                     "num_questions": m.get("num_questions"), **({"json_answers": how} if how else {})})  # fmt: skip
    result = {"task": "prompts", "model": model_name, "dataset": str(data), "metrics": {"variants": rows}}
    if out_dir is not None:
        write_prompts_report(Path(out_dir), result)
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "variant"


def write_prompts_report(out: Path, result: dict) -> Path:
    import html

    from vlmkit.eval.report import _table, new_figure, save_figure, write_page

    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    rows = result["metrics"]["variants"]
    types = sorted({t for r in rows for t in r["by_type"]})
    fig = new_figure(max(5.0, 1.2 * (len(types) + 1)), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [r["accuracy"]] + [r["by_type"].get(t, 0.0) for t in types]
        ax.bar([x + i * width for x in range(len(values))], values, width, label=r["name"])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(types) + 1)], ["all", *types], fontsize=7)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    png = save_figure(fig, out / "prompts.png")
    table = _table(
        ["variant", "system", "template", "JSON answers", "all", *types],
        [[r["name"], r["system"] or "", r["template"],
          ", ".join(f"{k} {n}" for k, n in sorted(r.get("json_answers", {}).items())),
          f"{r['accuracy']:.3f}", *[f"{r['by_type'][t]:.3f}" if t in r["by_type"] else "" for t in types]]
         for r in rows],
    )  # fmt: skip
    sections = [table, f'<img src="{html.escape(png.name)}" alt="accuracy per prompt variant">']
    return write_page(out / "report.html", f"Prompt variants: {result['model']}", sections)


__all__ = ["answer_fn", "conversation", "evaluate_prompt_variants", "read_prompt_variants"]
