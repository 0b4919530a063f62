"""Chat templates: a LLaVA-style conversation -> (input_ids, labels) with loss only on the assistant's tokens.

A conversation is a list of turns, LLaVA's `{"from": "human"|"gpt"|"system", "value": str}` or the
OpenAI / Hugging Face `{"role": "user"|"assistant"|"system", "content": str}`. `<image>` in a user turn
marks where the image goes: `render` expands it to `num_image_tokens` copies of the image placeholder id,
which the model later overwrites with projected image features (as Hugging Face's LLaVA processor does).

A template is the text around each turn. "vicuna" is LLaVA-1.5's (conv_vicuna_v1):

    <bos>{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

Text is tokenised piece by piece with `tokenizer.encode` (no special tokens): every run of text between
two image placeholders or two changes of supervision is one piece, so the labelled tokens are exactly the
tokens of each answer plus its end-of-turn token, whatever the tokenizer does at word boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmkit.errors import ConfigError, DataError
from vlmkit.losses.captioning import IGNORE_INDEX

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # a clip: replaced by one <image> per sampled frame (`expand_video`)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ChatTemplate:
    """The text around each turn. `{system}` / `{content}` mark where the turn's text goes."""

    system: str | None  # default system prompt; None = no system text unless the conversation has one
    system_format: str  # e.g. "{system} "
    user_format: str  # e.g. "USER: {content} "
    assistant_prefix: str  # before an answer, and the generation prompt's end: e.g. "ASSISTANT:"
    end_of_turn: str | None = None  # after an answer, supervised; None = the tokenizer's end token (eos)
    after_turn: str = ""  # after the end-of-turn token, not supervised (chatml's newline)

    def end_ids(self, tokenizer) -> list[int]:
        """The ids that end an answer: what generation should stop at."""
        if self.end_of_turn is None:
            return [tokenizer.eot_token_id]
        token = tokenizer.token_to_id(self.end_of_turn)
        return [token] if token is not None else tokenizer.encode(self.end_of_turn)


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA-1.5 (conv_vicuna_v1): roles USER / ASSISTANT, turns separated by a space, answers end with </s>
    "vicuna": ChatTemplate(_VICUNA_SYSTEM, "{system} ", "USER: {content} ", "ASSISTANT:"),
    "chatml": ChatTemplate(
        "You are a helpful assistant.",
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        after_turn="\n",
    ),
    # vicuna's roles without its system prompt: for small models trained from scratch, where the prompt
    # would only cost compute
    "user_assistant": ChatTemplate(None, "{system} ", "USER: {content} ", "ASSISTANT:"),
    # LLaVA's stage-1 pretraining and CoCa captioning: no roles, the user text (often only <image>) then the answer
    "plain": ChatTemplate(None, "{system}", "{content}", ""),
    # Flamingo's VQA format (vlmkit.data.fewshot), a turn per chunk: images, then
    # "Question: ... Short answer: ...<|endofchunk|>" (`flamingo_turns` puts the images first)
    "flamingo": ChatTemplate(None, "{system}", "{content}", " Short answer:", end_of_turn="<|endofchunk|>"),
}


IMAGE_LABEL = "Image {}: "


def expand_video(conversation: list[dict], num_frames: int) -> list[dict]:
    """The conversation with each `<video>` replaced by `num_frames` `<image>` markers (its frames, in order)."""
    out = []
    for turn in conversation:
        key = "value" if "value" in turn else "content"
        value = turn.get(key)
        if isinstance(value, str) and VIDEO_TOKEN in value:
            turn = {**turn, key: value.replace(VIDEO_TOKEN, IMAGE_TOKEN * num_frames)}
        out.append(turn)
    return out


def image_markers(count: int, label: str | None = IMAGE_LABEL) -> str:
    """The start of a user turn about `count` images: one `<image>` per line, each after its label when there
    are several ("Image 1: <image>\nImage 2: <image>\n", as multi-image prompting guides and Qwen-VL's
    "Picture 1:" do), so the text can refer to "Image 2". One image, or `label=None`, goes unlabelled."""
    if count == 1 or not label:
        return f"{IMAGE_TOKEN}\n" * count
    return "".join(f"{label.format(i + 1)}{IMAGE_TOKEN}\n" for i in range(count))


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _content(value, where: str) -> str:
    """A turn's text; Hugging Face's list form ([{"type": "image"}, {"type": "text", "text": ...}]) too."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for item in value:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                parts.append(IMAGE_TOKEN + "\n")
            elif kind == "text" and isinstance(item.get("text"), str):
                parts.append(item["text"])
            else:
                raise DataError(
                    f"{where}: content items must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}"
                )
        return "".join(parts)
    raise DataError(f"{where}: a turn's text must be a string, got {type(value).__name__}")


def normalize_conversation(conversation, where: str = "conversation") -> list[tuple[str, str]]:
    """[(role, text)] with role "system", "user" or "assistant"; DataError for anything else."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise DataError(f"{where}: expected a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise DataError(f"{where} turn {i}: expected an object with 'from'/'value' or 'role'/'content'")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in _ROLES:
            raise DataError(
                f"{where} turn {i}: unknown role {role!r}; use human/gpt/system (or user/assistant/system)"
            )
        role = _ROLES[role]
        if role == "system" and i:
            raise DataError(f"{where} turn {i}: a system turn must come first")
        text = _content(text, f"{where} turn {i}")
        if role != "user" and IMAGE_TOKEN in text:
            raise DataError(
                f"{where} turn {i}: {IMAGE_TOKEN} may only appear in a user turn, not a {role} turn"
            )
        turns.append((role, text))
    return turns


def render(
    conversation,
    tokenizer,
    template: str,
    *,
    num_image_tokens: int,
    image_token_id: int | None,
    add_generation_prompt: bool = False,
    max_len: int | None = None,
    row: str | int | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are IGNORE_INDEX except on the assistant's tokens
    and each answer's end-of-turn token.

    `<image>` becomes `num_image_tokens` copies of `image_token_id` (0 copies: the marker is dropped, e.g.
    for CoCa). The sequence starts with the tokenizer's start token (bos) when it has one.
    `add_generation_prompt` appends the assistant prefix ("ASSISTANT:") for the model to continue.
    `max_len` cuts the end off a longer sequence, but never an image: a conversation whose image tokens
    would not fit raises DataError, as does a generation prompt longer than `max_len`. `row` names the
    conversation in error messages.
    """
    where = "conversation" if row is None else f"conversation {row}"
    tpl = get_template(template)
    turns = normalize_conversation(conversation, where)
    if num_image_tokens < 0 or (num_image_tokens and image_token_id is None):
        raise ConfigError(f"num_image_tokens={num_image_tokens} needs an image_token_id >= 0")
    # (kind, text) pieces: "text" (not supervised), "answer", "end" (end of an answer), "image"
    pieces: list[tuple[str, str]] = []
    system = turns[0][1] if turns[0][0] == "system" else tpl.system
    if system is not None:
        pieces.append(("text", tpl.system_format.format(system=system)))
    for role, text in turns:
        if role == "user":
            before, after = tpl.user_format.split("{content}")
            pieces.append(("text", before))
            for j, part in enumerate(text.split(IMAGE_TOKEN)):
                pieces += [("image", ""), ("text", part)] if j else [("text", part)]
            pieces.append(("text", after))
        elif role == "assistant":
            pieces += [
                ("text", tpl.assistant_prefix),
                ("answer", text),
                ("end", ""),
                ("text", tpl.after_turn),
            ]
    if add_generation_prompt:
        pieces.append(("text", tpl.assistant_prefix))

    bos = getattr(tokenizer, "sot_token_id", None)
    ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    end_ids = tpl.end_ids(tokenizer)
    pending = ""  # unsupervised text is joined up to the next image or answer, then tokenised at once
    for kind, text in pieces + [("flush", "")]:
        if kind == "text":
            pending += text
            continue
        if pending:
            new = tokenizer.encode(pending)
            ids += new
            labels += [IGNORE_INDEX] * len(new)
            pending = ""
        if kind == "image":
            ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
        elif kind in ("answer", "end"):
            new = tokenizer.encode(text) if kind == "answer" else end_ids
            ids += new
            labels += new

    if max_len is not None and len(ids) > max_len:
        if add_generation_prompt:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens, longer than max_len {max_len}")
        if num_image_tokens and image_token_id in ids[max_len:]:
            raise DataError(
                f"{where}: its image tokens end past max_len {max_len}; shorten the text before the image "
                "or raise max_len"
            )
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def generation_prompt(
    conversation,
    tokenizer,
    template: str,
    *,
    num_image_tokens: int,
    image_token_id: int | None,
    max_len: int | None = None,
) -> list[int]:
    """The ids of `conversation` followed by the assistant prefix (vicuna: ends with "ASSISTANT:")."""
    ids, _ = render(
        conversation,
        tokenizer,
        template,
        num_image_tokens=num_image_tokens,
        image_token_id=image_token_id,
        add_generation_prompt=True,
        max_len=max_len,
    )
    return ids


def collate(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded training batch from `render` outputs: input_ids, attention_mask (1 = token), labels (B, T)."""
    if not rows:
        raise DataError("collate needs at least one rendered conversation")
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, :n] = torch.as_tensor(lab, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded generation batch from `generation_prompt` outputs: input_ids, attention_mask (B, T)."""
    if not prompts:
        raise DataError("collate_prompts needs at least one prompt")
    T = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, ids in enumerate(prompts):
        if len(ids):
            input_ids[i, T - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[i, T - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def flamingo_turns(conversation: list[dict]) -> list[dict]:
    """A conversation in Flamingo's format: each user turn's images first (the text after an image is what
    attends to it), then `Question: <text>`."""
    out = []
    for turn in conversation:
        role = turn.get("from", turn.get("role"))
        text = _content(turn.get("value", turn.get("content", "")), "conversation")
        if role in ("human", "user"):
            text = (
                IMAGE_TOKEN * text.count(IMAGE_TOKEN) + "Question: " + text.replace(IMAGE_TOKEN, "").strip()
            )
        out.append({"from": role, "value": text})
    return out


def coca_turns(conversation: list[dict], is_caption: bool) -> list[dict]:
    """A conversation as CoCa sees it: no image marker (images come in by cross-attention); a caption is
    the text alone, `[bos] caption [eos]`, exactly what `encode_text` embeds; a question ends with a line
    break before its answer."""
    out = []
    for turn in conversation:
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content", ""))
        if role in ("human", "user"):
            text = "" if is_caption else text.replace(IMAGE_TOKEN, "").strip() + "\n"
        out.append({"from": role, "value": text})
    return out
