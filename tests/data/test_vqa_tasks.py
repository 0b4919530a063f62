"""VQA and caption tasks from the shapes metadata.

Every generated question is parsed back from its text and answered again by an independent reading of
the scene's metadata in plain Python (counting, box-centre arithmetic), which also checks that the
object it names is unique and that no spatial question is borderline.
"""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlmkit.data.manifest import read_manifest
from vlmkit.data.synthetic import COLOURS, SHAPES, generate
from vlmkit.data.vqa import (
    QUESTION_TYPES,
    Conversations,
    questions_for,
    read_conversations,
    tasks_are_current,
    write_tasks,
)
from vlmkit.errors import ConfigError, DataError

IMAGE_SIZE = 48
COLOUR_RE = "|".join(COLOURS)
SHAPE_RE = "|".join(SHAPES)
RELATION_RE = r"(?:to the )?(left of|right of)|(above|below)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes_vqa")
    generate(
        out,
        num_train=240,
        num_val=40,
        image_size=IMAGE_SIZE,
        seed=3,
        num_per_class_train=0,
        num_per_class_val=0,
        progress=False,
        num_workers=0,
    )
    write_tasks(out, seed=0)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scenes(data_dir: Path, split: str) -> dict[str, list[dict]]:
    return {row["image"]: row["objects"] for row in read_jsonl(data_dir / f"{split}.jsonl")}


# ---------------------------------------------------------------------------- independent answers


def centre(obj: dict, axis: int) -> float:
    return (obj["box"][axis] + obj["box"][axis + 2]) / 2


def side(a: dict, b: dict, relation: str) -> bool:
    """a is `relation` b, asserting it is clear: centres apart by more than half the mean box extent."""
    axis = 0 if relation in ("left of", "right of") else 1
    extent = (a["box"][axis + 2] - a["box"][axis] + b["box"][axis + 2] - b["box"][axis]) / 2
    gap = centre(a, axis) - centre(b, axis)
    assert abs(gap) > 0.5 * extent, f"borderline {relation}: gap {gap}, extent {extent}"
    return gap < 0 if relation in ("left of", "above") else gap > 0


def the(objects: list[dict], colour: str | None, shape: str | None) -> dict:
    """The one object with this colour and/or shape (asserting there is exactly one)."""
    found = [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"])]
    assert len(found) == 1, f"'the {colour or ''} {shape or ''}' names {len(found)} objects"
    return found[0]


def thirds_name(obj: dict) -> str:
    """Position name from the box centre, asserting it is clearly inside its thirds."""
    names = []
    for axis, words in ((1, ("top", "middle", "bottom")), (0, ("left", "centre", "right"))):
        c = centre(obj, axis)
        assert min(abs(c - IMAGE_SIZE / 3), abs(c - 2 * IMAGE_SIZE / 3)) >= 0.05 * IMAGE_SIZE - 1e-9
        names.append(words[min(int(3 * c / IMAGE_SIZE), 2)])
    v, h = names
    if v == "middle":
        return h
    return v if h == "centre" else f"{v} {h}"


def answer(question: str, objects: list[dict]) -> str:
    """The answer to `question` about `objects`, worked out from the text of the question alone."""
    q = question.rstrip("?")
    if m := re.fullmatch(rf"(?:what colour is|what is the colour of|which colour is) the ({SHAPE_RE})", q):
        return the(objects, None, m[1])["colour"]
    if m := re.fullmatch(
        rf"(?:what shape is the|what is the shape of the|which shape is) ({COLOUR_RE})(?: object)?", q
    ):
        return the(objects, m[1], None)["shape"]
    if re.fullmatch(
        r"how many shapes are there|how many objects are in the image|what is the number of shapes", q
    ):
        return str(len(objects))
    if m := re.fullmatch(rf"how many ({COLOUR_RE}) (?:shapes|objects) are (?:there|in the image)", q):
        return str(sum(o["colour"] == m[1] for o in objects))
    if m := re.fullmatch(rf"how many ({SHAPE_RE})s are (?:there|in the image)", q):
        return str(sum(o["shape"] == m[1] for o in objects))
    if m := re.fullmatch(
        rf"(?:where is|where in the image is|in which part of the image is) the ({COLOUR_RE}) ({SHAPE_RE})", q
    ):
        return thirds_name(the(objects, m[1], m[2]))
    if m := re.fullmatch(
        rf"(?:is there|does the image contain) an? ({COLOUR_RE}) ({SHAPE_RE})(?: in the image)?", q
    ):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    pattern = rf"(?:how many|what is the number of) (?:({COLOUR_RE}) shapes|({SHAPE_RE})s) (?:are )?(?:{RELATION_RE}) the ({COLOUR_RE}) ({SHAPE_RE})"
    if m := re.fullmatch(pattern, q):
        ref = the(objects, m[5], m[6])
        members = [o for o in objects if o is not ref and (o["colour"] == m[1] or o["shape"] == m[2])]
        return str(sum(side(o, ref, m[3] or m[4]) for o in members))
    pattern = (
        rf"is the ({COLOUR_RE}) ({SHAPE_RE}) (?:placed )?(?:{RELATION_RE}) the ({COLOUR_RE}) ({SHAPE_RE})"
    )
    if m := re.fullmatch(pattern, q):
        a, b = the(objects, m[1], m[2]), the(objects, m[5], m[6])
        assert a is not b
        return "yes" if side(a, b, m[3] or m[4]) else "no"
    raise AssertionError(f"unexpected question: {question!r}")


# ---------------------------------------------------------------------------- the generated files


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_answer_is_right_and_unambiguous(data_dir, split):
    objects_of = scenes(data_dir, split)
    rows = read_jsonl(data_dir / f"{split}_vqa.jsonl")
    assert len(rows) >= 2.5 * len(objects_of)
    for row in rows:
        human, gpt = row["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        assert gpt["value"] == row["answer"]
        assert row["answer"] == answer(human["value"].removeprefix("<image>\n"), objects_of[row["image"]])


def test_answers_are_short_words_of_the_vocabulary(data_dir):
    positions = {"left", "right", "top", "bottom", "centre"} | {
        f"{v} {h}" for v in ("top", "bottom") for h in ("left", "right")
    }
    allowed = {
        "colour": set(COLOURS),
        "shape": set(SHAPES),
        "count": {"0", "1", "2", "3", "4"},
        "position": positions,
        "exists": {"yes", "no"},
        "relation": {"yes", "no", "0", "1", "2", "3"},
    }
    for row in read_jsonl(data_dir / "train_vqa.jsonl"):
        assert row["answer"] in allowed[row["type"]], row


def test_types_and_answers_are_balanced(data_dir):
    rows = read_jsonl(data_dir / "train_vqa.jsonl")
    by_type = Counter(r["type"] for r in rows)
    assert set(by_type) == set(QUESTION_TYPES)
    assert max(by_type.values()) - min(by_type.values()) <= 0.1 * max(by_type.values()), by_type
    exists = Counter(r["answer"] for r in rows if r["type"] == "exists")
    assert 0.35 < exists["yes"] / exists.total() < 0.65, exists
    relation = Counter(r["answer"] for r in rows if r["type"] == "relation")
    assert relation["yes"] > 10 and relation["no"] > 10 and relation["0"] > 5 and relation["1"] > 5, relation
    counts = Counter(r["answer"] for r in rows if r["type"] == "count")
    assert {"0", "1", "2"} <= set(counts), counts
    # each image gets questions of different types
    per_image = Counter((r["image"], r["type"]) for r in rows)
    assert max(per_image.values()) == 1


def test_wording_varies(data_dir):
    rows = read_jsonl(data_dir / "train_vqa.jsonl")
    words = re.compile(rf"\b({COLOUR_RE}|{SHAPE_RE})s?\b")
    forms = {t: set() for t in QUESTION_TYPES}
    for r in rows:
        forms[r["type"]].add(words.sub("X", r["conversations"][0]["value"]))
    for kind, templates in forms.items():
        assert len(templates) >= 2, (kind, templates)


def test_captions_file(data_dir):
    source = read_jsonl(data_dir / "val.jsonl")
    rows = read_jsonl(data_dir / "val_captions.jsonl")
    assert [r["caption"] for r in rows] == [r["caption"] for r in source]
    assert [r["image"] for r in rows] == [r["image"] for r in source]
    prompts = set()
    for r in rows:
        human, gpt = r["conversations"]
        assert r["type"] == "caption" and gpt == {"from": "gpt", "value": r["caption"]} == {
            **gpt,
            "value": r["answer"],
        }
        assert human["value"].startswith("<image>\n")
        prompts.add(human["value"])
    assert len(prompts) >= 2
    samples, bad = read_manifest(data_dir / "val_captions.jsonl")  # also an image-caption manifest
    assert len(samples) == len(rows) and not bad


@pytest.mark.parametrize("split", ["train", "val"])
def test_chat_file_asks_everything_about_each_image_once(data_dir, split):
    source = read_jsonl(data_dir / f"{split}.jsonl")
    objects_of = scenes(data_dir, split)
    rows = read_jsonl(data_dir / f"{split}_chat.jsonl")
    assert [r["image"] for r in rows] == [r["image"] for r in source]
    firsts, asked = Counter(), 0
    for row, scene in zip(rows, source, strict=True):
        turns = row["conversations"]
        assert row["type"] == "chat" and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        questions = [t["value"].removeprefix("<image>\n") for t in turns[0::2]]
        answers = [t["value"] for t in turns[1::2]]
        assert answers.count(scene["caption"]) == 1  # one caption turn
        k = answers.index(scene["caption"])
        firsts["caption" if k == 0 else "question"] += 1
        qa = [(q, a) for i, (q, a) in enumerate(zip(questions, answers)) if i != k]
        for q, a in qa:
            assert a == answer(q, objects_of[row["image"]])
        assert 1 <= len(qa) <= len(QUESTION_TYPES) and len({q for q, _ in qa}) == len(qa)
        asked += len(qa)
    assert asked > 3 * len(rows)  # more than the single-question files' 3 per image
    assert firsts["caption"] > 0 and firsts["question"] > firsts["caption"]  # the turn order varies


def test_multi_object_chats_repeat_scenes_of_several_objects(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    before = {p.name: p.read_bytes() for p in copy.glob("*_*.jsonl")}
    paths = write_tasks(copy, seed=0, multi_object_chats=3)
    after = {p.name: p.read_bytes() for p in copy.glob("*_*.jsonl")}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"train_chat.jsonl"}  # questions, captions and the val chats stay as they were
    source = read_jsonl(copy / "train.jsonl")
    objects_of = scenes(copy, "train")
    rows = read_jsonl(paths["train_chat"])
    expected = [r["image"] for r in source for _ in range(3 if len(r["objects"]) > 1 else 1)]
    assert [r["image"] for r in rows] == expected
    assert len(rows) > 1.5 * len(source)  # the test data has scenes of several objects
    firsts = [r for r in rows if re.fullmatch(r"train-\d{6}-chat", r["id"])]
    assert firsts == read_jsonl(
        data_dir / "train_chat.jsonl"
    )  # the first conversation of each scene as before
    captions = {r["image"]: r["caption"] for r in source}
    for row in rows:
        turns = row["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        qa = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(turns[0::2], turns[1::2])]
        assert [a for _, a in qa].count(captions[row["image"]]) == 1
        for q, a in qa:
            if a != captions[row["image"]]:
                assert a == answer(q, objects_of[row["image"]])
    repeats = Counter(json.dumps(r["conversations"]) for r in rows)
    assert max(repeats.values()) < 3  # fresh questions and order, not copies
    with pytest.raises(ConfigError, match="multi_object_chats"):
        write_tasks(copy, multi_object_chats=0)


def test_tasks_are_current(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    assert tasks_are_current(copy, seed=0, questions_per_image=3, multi_object_chats=1)
    assert not tasks_are_current(copy, seed=0, multi_object_chats=3)
    assert not tasks_are_current(copy, seed=1)
    write_tasks(copy, seed=0, multi_object_chats=3, splits=("train",))
    assert tasks_are_current(copy, multi_object_chats=3, splits=("train",))
    assert not tasks_are_current(copy, multi_object_chats=3, splits=("train", "val"))
    (copy / "train_chat.jsonl").unlink()
    assert not tasks_are_current(copy, multi_object_chats=3, splits=("train",))
    assert not tasks_are_current(tmp_path, seed=0)  # no tasks.json


def test_deterministic_for_a_seed(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    first = {k: p.read_bytes() for k, p in write_tasks(copy, seed=0).items()}
    assert first == {k: (data_dir / p.name).read_bytes() for k, p in write_tasks(copy, seed=0).items()}
    other = write_tasks(copy, seed=1, splits=("val",))
    assert other["val_vqa"].read_bytes() != first["val_vqa"]


def test_questions_per_image_and_corrupted_rows(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    rows = read_jsonl(copy / "val.jsonl")
    rows[0]["corruption"] = "blank"  # the picture no longer shows the objects: no task for it
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"image": "x.png"})]
    (copy / "val.jsonl").write_text("\n".join(lines) + "\n")
    paths = write_tasks(copy, questions_per_image=1, splits=("val",))
    vqa = read_jsonl(paths["val_vqa"])
    assert len(vqa) == len(rows) - 1 and rows[0]["image"] not in {r["image"] for r in vqa}
    assert len(read_jsonl(paths["val_captions"])) == len(rows) - 1
    with pytest.raises(DataError, match="test.jsonl not found"):
        write_tasks(copy, splits=("test",))


# ---------------------------------------------------------------------------- hand-made scenes


def obj(colour: str, shape: str, box: list[int], size: int = 48) -> dict:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    h = ("left", "centre", "right")[min(int(3 * cx / size), 2)]
    v = ("top", "middle", "bottom")[min(int(3 * cy / size), 2)]
    position = h if v == "middle" else (v if h == "centre" else f"{v} {h}")
    return {
        "colour": colour,
        "shape": shape,
        "size": "small",
        "box": box,
        "hpos": h,
        "vpos": v,
        "position": position,
    }


def test_borderline_relations_and_positions_are_not_asked():
    # two objects stacked almost exactly: neither left/right (centres 1 px apart) ... but clearly above/below
    a, b = obj("red", "circle", [4, 4, 14, 14]), obj("blue", "star", [5, 30, 15, 40])
    for seed in range(40):
        for q in questions_for([a, b], np.random.default_rng(seed), image_size=48):
            text = q["question"].replace("placed ", "")
            assert "left of" not in text and "right of" not in text, text
            if q["type"] == "relation" and text.startswith("is the"):
                assert q["answer"] == (
                    "yes" if ("red circle above" in text) or ("blue star below" in text) else "no"
                )
    # a centre 1 px from the line between the left and centre thirds (x = 16): no position question
    c = obj("green", "square", [12, 30, 22, 40])
    kinds = {
        q["type"] for s in range(40) for q in questions_for([c], np.random.default_rng(s), image_size=48)
    }
    assert "position" not in kinds and {"colour", "shape", "count", "exists"} <= kinds


def test_repeated_objects_are_never_named_as_one():
    objects = [obj("red", "circle", [2, 2, 10, 10]), obj("red", "circle", [30, 30, 40, 40])]
    for seed in range(40):
        for q in questions_for(objects, np.random.default_rng(seed), image_size=48):
            assert q["type"] in ("count", "exists"), (
                q
            )  # "the red circle" / "the circle" / "the red object" are ambiguous


# ---------------------------------------------------------------------------- reading conversations


def test_read_conversations_skips_and_counts_bad_rows(data_dir, tmp_path, caplog):
    image = str((data_dir / "images" / "val" / "000000.png").resolve())
    good = {
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
    chat = {
        "image": image,
        "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    lines = [
        json.dumps(good),
        "{broken",
        json.dumps({**good, "image": "missing.png"}),
        "",
        json.dumps({**good, "conversations": [{"from": "human", "value": "q"}]}),
        json.dumps({"conversations": good["conversations"]}),
        json.dumps([1, 2]),
        json.dumps({**good, "conversations": [{"from": "robot", "value": "x"}]}),
        json.dumps(chat),
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        rows = read_conversations(path)
    assert isinstance(rows, Conversations)
    assert [r["line"] for r in rows] == [1, 9]
    assert rows[0]["image"] == Path(image)
    assert [(b.line, b.file) for b in rows.bad_rows] == [(n, str(path)) for n in (2, 3, 5, 6, 7, 8)]
    reasons = " | ".join(b.reason for b in rows.bad_rows)
    for word in (
        "malformed JSON",
        "missing file",
        "human and a gpt",
        "missing 'image'",
        "JSON object",
        "unknown role",
    ):
        assert word in reasons
    assert f"skipped {path}:3" in caplog.text

    path.write_text("\n".join(lines[1:3]) + "\n")
    with pytest.raises(DataError, match="no usable conversation"):
        read_conversations(path)
    with pytest.raises(DataError, match="not found"):
        read_conversations(tmp_path / "nope.jsonl")


def test_read_conversations_reads_llava_json_arrays_and_written_tasks(data_dir, tmp_path):
    rows = read_conversations(data_dir / "val_vqa.jsonl")
    assert len(rows) == len(read_jsonl(data_dir / "val_vqa.jsonl")) and not rows.bad_rows
    assert all(r["image"].is_file() for r in rows)
    array = tmp_path / "llava.json"
    items = [{**r, "image": str(r["image"])} for r in read_jsonl(data_dir / "val_vqa.jsonl")[:3]]
    for item in items:
        item["image"] = str(data_dir / item["image"])
    array.write_text(json.dumps(items + [{"image": "gone.png", "conversations": []}], indent=1))
    rows = read_conversations(array)
    assert [r["line"] for r in rows] == [1, 2, 3] and [b.line for b in rows.bad_rows] == [4]
