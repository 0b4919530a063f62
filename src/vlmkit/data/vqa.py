"""Captioning and visual question answering tasks from the shapes dataset's metadata.

Every question is answerable from the image alone and has one unambiguous short answer: a colour word,
a shape word, a digit, a position name ("top left", "centre", ...) or "yes"/"no". Objects are named by
what makes them unique in their scene ("the star" only when there is one star), and a spatial question
is asked only when the answer is clear from the pixels: relations need box centres apart by a margin,
position questions need the centre away from the borders between the thirds of the image.

`write_tasks(data_dir)` turns a `vlmkit data synth` output into LLaVA-format JSONL: one question or
caption per row (`{split}_vqa.jsonl`, `{split}_captions.jsonl`; the evaluation files)

    {"id", "image", "type", "answer", "conversations": [{"from": "human", "value": "<image>\\n<question>"},
                                                         {"from": "gpt", "value": "<answer>"}]}

and one multi-turn conversation per image (`{split}_chat.jsonl`, type "chat": the caption and a question of
every type the scene allows, in random order), the way LLaVA's instruction data asks several questions
about one image: a training step then encodes each image once for all its answers.

`read_conversations(path)` reads such files (and LLaVA's own JSON), skipping and counting bad rows.

(Just over 500 lines: the question generators and the reader of their files, video rows included, share one set
of row rules.)
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vlmkit.data.chat import IMAGE_TOKEN, normalize_conversation
from vlmkit.data.compositional import foils_for, relation_facts, unique_objects
from vlmkit.data.manifest import BadRow, read_utf8
from vlmkit.data.synthetic import COLOURS, SHAPES, _article, plural
from vlmkit.data.transforms import ImageDecodeError, check_image_file
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASKS_FILE = "tasks.json"  # the write_tasks arguments that made a folder's task files
QUESTION_TYPES = ("colour", "shape", "count", "position", "exists", "relation")
TASK_TYPES = (*QUESTION_TYPES, "caption")
FEWSHOT_FILES = ("train_interleaved", "train_classify", "val_classify", "val_episodes")  # vlmkit.data.fewshot
# A relation needs the two box centres apart by this fraction of the boxes' mean extent along the axis.
RELATION_MARGIN = 0.5
# A position question needs the box centre at least this fraction of the image side away from the lines
# between the thirds, so "top left" never is a coin toss with "left".
POSITION_MARGIN = 0.05

CAPTION_PROMPTS = (
    "Describe the image.",
    "Write a short caption for this image.",
    "What is in this picture?",
    "Describe this image briefly.",
)
_TEMPLATES = {
    "colour": ("what colour is the {shape}?", "what is the colour of the {shape}?", "which colour is the {shape}?"),
    "shape": (
        "what shape is the {colour} object?",
        "what is the shape of the {colour} object?",
        "which shape is {colour}?",
    ),
    "count_all": ("how many shapes are there?", "how many objects are in the image?", "what is the number of shapes?"),
    "count_colour": ("how many {colour} shapes are there?", "how many {colour} objects are in the image?"),
    "count_shape": ("how many {shapes} are there?", "how many {shapes} are in the image?"),
    "position": (
        "where is the {thing}?",
        "where in the image is the {thing}?",
        "in which part of the image is the {thing}?",
    ),
    "exists": ("is there {a_thing}?", "is there {a_thing} in the image?", "does the image contain {a_thing}?"),
    "relation_count": ("how many {things} are {relation} the {thing}?", "what is the number of {things} {relation} the {thing}?"),
    "relation_yes_no": ("is the {thing} {relation} the {other}?", "is the {thing} placed {relation} the {other}?"),
}  # fmt: skip
# relation -> (axis of the box centre, sign): "left of" means a smaller x than the other object's
_RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
_RELATION_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def relation_holds(a: dict, b: dict, relation: str) -> bool | None:
    """Whether object `a` is `relation` ("left of", "right of", "above", "below") object `b`, judged by
    box centres; None when the centres are too close along that axis to tell (see RELATION_MARGIN)."""
    axis, sign = _RELATIONS[relation]
    centre = lambda obj: (obj["box"][axis] + obj["box"][axis + 2]) / 2
    extent = lambda obj: obj["box"][axis + 2] - obj["box"][axis]
    margin = RELATION_MARGIN * (extent(a) + extent(b)) / 2
    offset = sign * (centre(a) - centre(b))  # > 0: a lies on the `relation` side of b
    if abs(offset) <= margin:
        return None
    return offset > 0


def position_is_clear(obj: dict, image_size: int) -> bool:
    """Whether the box centre is at least POSITION_MARGIN * image_size from every line between thirds."""
    x0, y0, x1, y1 = obj["box"]
    lines = (image_size / 3, 2 * image_size / 3)
    return all(
        abs(c - line) >= POSITION_MARGIN * image_size
        for c in ((x0 + x1) / 2, (y0 + y1) / 2)
        for line in lines
    )


def _qa(question: str, answer: str | int, kind: str) -> dict:
    return {"question": question, "answer": str(answer), "type": kind}


def _colour_question(objects: list[dict], rng: np.random.Generator) -> dict | None:
    shapes = Counter(o["shape"] for o in objects)
    unique = [o for o in objects if shapes[o["shape"]] == 1]
    if not unique:
        return None
    obj = _choice(rng, unique)
    return _qa(_choice(rng, _TEMPLATES["colour"]).format(shape=obj["shape"]), obj["colour"], "colour")


def _shape_question(objects: list[dict], rng: np.random.Generator) -> dict | None:
    colours = Counter(o["colour"] for o in objects)
    unique = [o for o in objects if colours[o["colour"]] == 1]
    if not unique:
        return None
    obj = _choice(rng, unique)
    return _qa(_choice(rng, _TEMPLATES["shape"]).format(colour=obj["colour"]), obj["shape"], "shape")


def _count_question(objects: list[dict], rng: np.random.Generator) -> dict:
    form = _choice(rng, ("all", "colour", "shape"))
    if form == "all":
        return _qa(_choice(rng, _TEMPLATES["count_all"]), len(objects), "count")
    key, vocabulary = ("colour", list(COLOURS)) if form == "colour" else ("shape", list(SHAPES))
    present = sorted({o[key] for o in objects}, key=vocabulary.index)
    absent = [v for v in vocabulary if v not in present]
    # mostly something in the scene; sometimes something absent, so "0" is an answer too
    value = _choice(rng, absent) if absent and rng.random() < 0.25 else _choice(rng, present)
    count = sum(o[key] == value for o in objects)
    if form == "colour":
        return _qa(_choice(rng, _TEMPLATES["count_colour"]).format(colour=value), count, "count")
    return _qa(_choice(rng, _TEMPLATES["count_shape"]).format(shapes=plural(value, 2)), count, "count")


def _position_question(objects: list[dict], rng: np.random.Generator, image_size: int | None) -> dict | None:
    unique = [o for o in unique_objects(objects) if image_size is None or position_is_clear(o, image_size)]
    if not unique:
        return None
    obj = _choice(rng, unique)
    return _qa(_choice(rng, _TEMPLATES["position"]).format(thing=_name(obj)), obj["position"], "position")


def _exists_question(objects: list[dict], rng: np.random.Generator) -> dict:
    present = list(dict.fromkeys(_name(o) for o in objects))
    if rng.random() < 0.5:
        thing, answer = _choice(rng, present), "yes"
    else:
        absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
        # half the time a near miss: the colour or the shape of something that is there
        near = [
            n
            for n in absent
            if any(n.split()[0] == o["colour"] or n.split()[1] == o["shape"] for o in objects)
        ]
        thing, answer = _choice(rng, near if near and rng.random() < 0.5 else absent), "no"
    question = _choice(rng, _TEMPLATES["exists"]).format(a_thing=f"{_article(thing)} {thing}")
    return _qa(question, answer, "exists")


def _relation_question(objects: list[dict], rng: np.random.Generator) -> dict | None:
    unique = unique_objects(objects)
    forms = ["count", "yes_no"] if rng.random() < 0.5 else ["yes_no", "count"]
    for form in forms:
        if form == "yes_no":
            # (a, b, relation that holds): asked as is ("yes") or with the opposite relation ("no")
            facts = relation_facts(objects, relation_holds)
            if not facts:
                continue
            a, b, relation = _choice(rng, facts)
            answer = "yes" if rng.random() < 0.5 else "no"
            if answer == "no":
                relation = _OPPOSITE[relation]
            question = _choice(rng, _TEMPLATES["relation_yes_no"]).format(
                thing=_name(a), other=_name(b), relation=_choice(rng, _RELATION_WORDS[relation])
            )
            return _qa(question, answer, "relation")
        # count: "how many blue shapes are left of the red square?" when every blue shape is clearly
        # on one side or the other; the group is named by a colour or a shape of another object
        options = []
        for ref in unique:
            others = [o for o in objects if o is not ref]
            groups = {("colour", o["colour"]) for o in others} | {("shape", o["shape"]) for o in others}
            for key, value in sorted(groups):
                members = [o for o in others if o[key] == value]
                for relation in _RELATIONS:
                    verdicts = [relation_holds(o, ref, relation) for o in members]
                    if None not in verdicts:
                        options.append((ref, key, value, relation, sum(verdicts)))
        if not options:
            continue
        ref, key, value, relation, count = _choice(rng, options)
        things = f"{value} shapes" if key == "colour" else plural(value, 2)
        question = _choice(rng, _TEMPLATES["relation_count"]).format(
            things=things, thing=_name(ref), relation=_choice(rng, _RELATION_WORDS[relation])
        )
        return _qa(question, count, "relation")
    return None


def questions_for(objects: list[dict], rng: np.random.Generator, image_size: int | None = None) -> list[dict]:
    """At most one question of each type in QUESTION_TYPES that the scene allows, in that order.

    `objects` is a scene's metadata (colour, shape, box, position of each object); each question is
    {"question", "answer", "type"}. `image_size` (pixels) enables the check that position questions are
    not borderline; without it every unique object's position may be asked.
    """
    candidates = [
        _colour_question(objects, rng),
        _shape_question(objects, rng),
        _count_question(objects, rng),
        _position_question(objects, rng, image_size),
        _exists_question(objects, rng),
        _relation_question(objects, rng),
    ]
    return [q for q in candidates if q is not None]


# ---------------------------------------------------------------------------------------------- files


def _read_scene_rows(path: Path) -> list[tuple[int, dict]]:
    """(line, row) of a synthetic split's manifest, skipping (and logging) rows unusable for tasks."""
    rows = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            log.warning("skipped %s:%d: malformed JSON (%s)", path, lineno, e.msg)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row.get("objects"):
            log.warning(
                "skipped %s:%d: needs 'image' and 'objects' (a `vlmkit data synth` manifest row)",
                path,
                lineno,
            )
            continue
        if row.get("corruption"):  # injected web noise: the image or caption no longer matches the objects
            continue
        rows.append((lineno, row))
    return rows


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": answer}]


def _image_size(data_dir: Path, row: dict, recorded: int | None) -> int:
    if recorded is not None:
        return recorded
    with Image.open(data_dir / row["image"]) as img:  # reads the header only
        return max(img.size)


def _chat(scene_id: str, row: dict, candidates: list[dict], rng: np.random.Generator) -> dict:
    """One conversation about a scene: its caption and every candidate question, in random order."""
    turns = [(_choice(rng, CAPTION_PROMPTS), row["caption"])]
    turns += [(qa["question"], qa["answer"]) for qa in candidates]
    conversation = []
    for k in rng.permutation(len(turns)):
        prompt, answer = turns[k]
        prompt = prompt if conversation else f"{IMAGE_TOKEN}\n{prompt}"
        conversation += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return {"id": f"{scene_id}-chat", "image": row["image"], "type": "chat", "conversations": conversation}


def write_tasks(
    data_dir: str | Path,
    *,
    seed: int = 0,
    questions_per_image: int = 3,
    splits: tuple[str, ...] = ("train", "val"),
    multi_object_chats: int = 1,
) -> dict[str, Path]:
    """Write `{split}_vqa.jsonl`, `{split}_captions.jsonl` and `{split}_chat.jsonl` beside `{split}.jsonl` in
    a shapes dataset.

    Each image gets up to `questions_per_image` questions of different types, chosen so that over the
    split the types are as balanced as the scenes allow (the least-asked available type first), and one
    caption conversation with a varied prompt. Rows keep "answer" (and "caption") at the top level for
    evaluation; image paths stay relative to `data_dir`. The chat file holds one conversation per image:
    the caption and one question of every type its scene allows (not limited by `questions_per_image`),
    shuffled, the image in the first turn. `multi_object_chats` > 1 gives each training scene of several
    objects that many conversations (fresh questions, fresh order; the "train" split only): finding an
    object by its shape and reading its colour is learnt from those scenes alone, and with the shapes
    data's default object counts half the scenes hold one object. The same seed gives the same files
    (the extra conversations draw from their own random stream, so the other files do not change). Scenes
    the noise options corrupted are left out. `{split}_compositional.jsonl` holds each scene's true caption
    and foils (vlmkit.data.compositional), from a stream of its own too. Returns {"{split}_vqa": path,
    "{split}_captions": path, "{split}_chat": path, "{split}_compositional": path}, and with both splits the
    few-shot files of `vlmkit.data.fewshot.write_fewshot` (interleaved documents, classes, episodes).
    """
    if multi_object_chats < 1:
        raise ConfigError(f"multi_object_chats must be at least 1, not {multi_object_chats}")
    data_dir = Path(data_dir)
    meta_path = data_dir / "dataset.json"
    recorded = json.loads(meta_path.read_text()).get("image_size") if meta_path.is_file() else None
    paths = {}
    for split in splits:
        source = data_dir / f"{split}.jsonl"
        if not source.is_file():
            raise DataError(
                f"{source} not found; write the dataset first with `vlmkit data synth {data_dir}`"
            )
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])  # one stream per split
        chat_rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 1])
        extra_rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 2])
        foil_rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 3])
        repeats = multi_object_chats if split == "train" else 1
        asked: Counter = Counter()
        vqa_rows, caption_rows, chat_rows, foil_rows = [], [], [], []
        for index, (_, row) in enumerate(_read_scene_rows(source)):
            caption_rows.append(
                {
                    "id": f"{split}-{index:06d}-caption",
                    "image": row["image"],
                    "type": "caption",
                    "answer": row["caption"],
                    "caption": row["caption"],  # so the file is also an image-caption manifest
                    "conversations": _conversation(_choice(rng, CAPTION_PROMPTS), row["caption"]),
                }
            )
            size = _image_size(data_dir, row, recorded)
            for k, foil in enumerate(foils_for(row["objects"], foil_rng, relation_holds)):
                foil_rows.append({"id": f"{split}-{index:06d}-f{k}", "image": row["image"], **foil})
            candidates = questions_for(row["objects"], rng, size)
            chat_rows.append(_chat(f"{split}-{index:06d}", row, candidates, chat_rng))
            for extra in range(1, repeats if len(row["objects"]) > 1 else 1):
                more = questions_for(row["objects"], extra_rng, size)
                chat_rows.append(_chat(f"{split}-{index:06d}-{extra}", row, more, extra_rng))
            order = sorted(range(len(candidates)), key=lambda i: (asked[candidates[i]["type"]], rng.random()))
            for k, i in enumerate(sorted(order[:questions_per_image])):
                qa = candidates[i]
                asked[qa["type"]] += 1
                vqa_rows.append(
                    {
                        "id": f"{split}-{index:06d}-q{k}",
                        "image": row["image"],
                        "type": qa["type"],
                        "answer": qa["answer"],
                        "conversations": _conversation(qa["question"], qa["answer"]),
                    }
                )
        if not caption_rows:
            raise DataError(f"{source} has no usable scene rows; regenerate it with `vlmkit data synth`")
        files = (
            ("vqa", vqa_rows),
            ("captions", caption_rows),
            ("chat", chat_rows),
            ("compositional", foil_rows),
        )
        for name, rows in files:
            path = data_dir / f"{split}_{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            paths[f"{split}_{name}"] = path
        log.info("%s: %d questions (%s), %d captions", split, len(vqa_rows), dict(asked), len(caption_rows))
    if {"train", "val"} <= set(splits):  # Flamingo's interleaved documents and few-shot episodes
        from vlmkit.data.fewshot import write_fewshot

        paths |= write_fewshot(data_dir, seed=seed)
    settings = {
        "seed": seed,
        "questions_per_image": questions_per_image,
        "multi_object_chats": multi_object_chats,
    }
    (data_dir / TASKS_FILE).write_text(json.dumps({**settings, "splits": list(splits)}, indent=2) + "\n")
    return paths


def tasks_are_current(data_dir: str | Path, **write_args) -> bool:
    """Whether the task files in `data_dir` were written by `write_tasks(data_dir, **write_args)` (as its
    tasks.json records) and are all there; arguments left out are not compared."""
    data_dir = Path(data_dir)
    meta = data_dir / TASKS_FILE
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    splits = write_args.pop("splits", saved.get("splits", ()))
    kinds = ("vqa", "captions", "chat", "compositional")
    files = [data_dir / f"{split}_{kind}.jsonl" for split in splits for kind in kinds]
    if {"train", "val"} <= set(splits):
        files += [data_dir / f"{name}.jsonl" for name in FEWSHOT_FILES]
    return (
        set(splits) <= set(saved.get("splits", ()))
        and all(f.is_file() for f in files)
        and all(saved.get(k) == v for k, v in write_args.items())
    )


class Conversations(list):
    """The usable rows of a conversation file (a list of dicts) plus `bad_rows`, the skipped ones."""

    def __init__(self, rows: list[dict], bad_rows: list[BadRow]):
        super().__init__(rows)
        self.bad_rows = bad_rows


def _check_conversation_row(row, root: Path, where: str) -> dict | str:
    """The row with "image" resolved to a Path, or the reason it is unusable."""
    if not isinstance(row, dict):
        return 'expected a JSON object like {"image": ..., "conversations": [...]}'
    if "video" in row and "image" not in row:
        return _check_video_row(row, root, where)
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        return "missing 'image' (a path relative to the file's folder)"
    try:
        turns = normalize_conversation(row.get("conversations"), where)
    except DataError as e:
        return str(e).removeprefix(f"{where}: ").removeprefix(where).strip()
    roles = {role for role, _ in turns}
    if "user" not in roles or "assistant" not in roles:
        return "the conversation needs a human and a gpt turn"
    path = root / Path(image.strip()).expanduser()
    try:
        check_image_file(path)
    except ImageDecodeError as e:
        return f"image {path}: {e.reason}"
    return {**row, "image": path}


def _check_video_row(row: dict, root: Path, where: str) -> dict | str:
    """A video question row ({"video": ..., "conversations": [... "<video>\\n..." ...]}) with "video" resolved."""
    from vlmkit.data.chat import VIDEO_TOKEN
    from vlmkit.data.video import video_file_problem

    video = row.get("video")
    if not isinstance(video, str) or not video.strip():
        return "'video' must be a path relative to the file's folder"
    try:
        turns = normalize_conversation(row.get("conversations"), where)
    except DataError as e:
        return str(e).removeprefix(f"{where}: ").removeprefix(where).strip()
    if {"user", "assistant"} - {role for role, _ in turns}:
        return "the conversation needs a human and a gpt turn"
    if sum(text.count(VIDEO_TOKEN) for _, text in turns) != 1:
        return f"a video row needs exactly one {VIDEO_TOKEN} in its turns"
    path = root / Path(video.strip()).expanduser()
    return video_file_problem(path) or {**row, "video": path}


def read_conversations(path: str | Path) -> Conversations:
    """Read LLaVA-format conversations: JSONL (one row per line) or a JSON array (LLaVA's own files).

    Each row needs "image" (relative to the file's folder unless absolute; the file must exist) and
    "conversations" with at least one human (user) and one gpt (assistant) turn. A video row has "video"
    instead, and one `<video>` in its turns. Returned rows are the
    file's dicts with "image" resolved to a Path and "line" (1-based line, or item number in an array)
    added. Bad rows are skipped, logged as `skipped FILE:LINE: reason` and kept in `.bad_rows`;
    DataError when no row is usable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"conversation file not found: {path} (expected JSONL, e.g. val_vqa.jsonl)")
    text = read_utf8(path)
    items: list[tuple[int, object]] = []
    bad: list[BadRow] = []
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON array ({e.msg})") from None
    else:
        for lineno, raw in enumerate(text.split("\n"), start=1):  # "\n" only: JSON strings may hold U+2028
            if not raw.strip():
                continue
            try:
                items.append((lineno, json.loads(raw)))
            except json.JSONDecodeError as e:
                bad.append(BadRow(str(path), lineno, f"malformed JSON ({e.msg} at column {e.colno})"))
    rows = []
    for lineno, item in items:
        result = _check_conversation_row(item, path.parent, f"{path}:{lineno}")
        if isinstance(result, str):
            bad.append(BadRow(str(path), lineno, result))
        else:
            rows.append({**result, "line": lineno})
    bad.sort(key=lambda b: b.line)
    for b in bad:
        log.warning("skipped %s", b)
    if not rows:
        detail = f"{len(bad)} bad rows, first {bad[0]}" if bad else "the file has no rows"
        raise DataError(f"no usable conversation in {path} ({detail})")
    return Conversations(rows, bad)
