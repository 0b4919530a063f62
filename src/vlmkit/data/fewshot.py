"""Few-shot data from the shapes dataset: interleaved training documents and held-out novel-label episodes.

`write_fewshot(data_dir)` writes beside a `vlmkit data synth` output:

- `train_interleaved.jsonl`: documents of 2-9 scenes each (`vlmkit.data.interleaved` format), every scene's
  text in a Flamingo prompt format: a caption (`Output: a red circle on the left`), a question and its answer
  (`Question: what colour is the star? Short answer: red`), or, in novel-label documents, a made-up word that
  the document assigns to a class (`Output: dax`): two classes (colour + shape of one-object scenes) get two
  words drawn from the *training* pool, and only the document's earlier scenes tell which is which, so
  the model learns to read labels from its context;
- `{split}_classify.jsonl`: the one-object scenes with their class (`{"image", "label": "red circle"}`): the
  support set (train) and the queries (val) of `vlmkit eval fewshot --task classify`;
- `val_episodes.jsonl`: held-out 2-way novel-label episodes, each two classes, a word from the *test* pool
  for each (words that appear nowhere in training) and a query image; the demonstrations are drawn from the
  support set at evaluation time (at random or by image similarity), so one file serves every shot count.

The word pools are fixed (a property of vlmkit, not of a seed): syllables built from consonants and vowels,
never a word of the shapes vocabulary.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np

from vlmkit.data.synthetic import COLOURS, SHAPES
from vlmkit.data.vqa import _read_scene_rows
from vlmkit.errors import DataError

log = logging.getLogger(__name__)

CAPTION_FORMAT = "Output: {}"
VQA_FORMAT = "Question: {} Short answer: {}"
_ONSETS = "b d f g k l m n p r s t v w z bl br dr fl gl gr kr pl pr sk sl sp st tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "x", "p", "t", "k", "n", "m", "sh", "ck", "b", "g"]


def _word_pool() -> list[str]:
    """Every one- and two-syllable made-up word, in a fixed shuffled order, shapes words left out."""
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    rng = np.random.default_rng(20260)  # fixed: the pools are part of vlmkit
    singles = [syllables[i] for i in rng.permutation(len(syllables))]
    open_syllables = [o + v for o in _ONSETS for v in _VOWELS]
    doubles = [
        open_syllables[a] + singles[b]
        for a, b in zip(
            rng.integers(0, len(open_syllables), 2000), rng.integers(0, len(singles), 2000), strict=True
        )
    ]
    vocabulary = set(COLOURS) | set(SHAPES) | {"a", "an", "the", "on", "in", "at", "is", "to", "no", "yes"}
    seen, pool = set(), []
    for w in singles[:300] + doubles:
        if w not in vocabulary and w not in seen and len(w) >= 3:
            seen.add(w)
            pool.append(w)
    return pool


_POOL = _word_pool()
TEST_WORDS: tuple[str, ...] = tuple(_POOL[:200])  # held out: never written into a training file
TRAIN_WORDS: tuple[str, ...] = tuple(_POOL[200:1200])


def scene_class(row: dict) -> str | None:
    """ "red circle" for a scene of one object; None for scenes of several."""
    objects = row.get("objects") or []
    if len(objects) != 1:
        return None
    return f"{objects[0]['colour']} {objects[0]['shape']}"


def _episode_doc(
    by_class: dict[str, list[str]], rng: np.random.Generator, words: tuple[str, ...], n: int
) -> dict:
    a, b = rng.choice(sorted(by_class), size=2, replace=False)
    wa, wb = rng.choice(len(words), size=2, replace=False)
    names = {a: words[wa], b: words[wb]}
    segments = []
    for _ in range(n):
        cls = a if rng.random() < 0.5 else b
        segments += [{"image": str(rng.choice(by_class[cls]))}, {"text": CAPTION_FORMAT.format(names[cls])}]
    return {"segments": segments, "kind": "novel"}


def write_fewshot(
    data_dir: str | Path,
    *,
    seed: int = 0,
    documents: int = 6000,
    novel_fraction: float = 0.5,
    episodes: int = 400,
    max_images: int = 9,
) -> dict[str, Path]:
    """Write the files in the module docstring; the same arguments give the same files. Returns their paths."""
    data_dir = Path(data_dir)
    paths = {}
    by_split = {}
    for split in ("train", "val"):
        source = data_dir / f"{split}.jsonl"
        if not source.is_file():
            raise DataError(
                f"{source} not found; write the dataset first with `vlmkit data synth {data_dir}`"
            )
        rows = [row for _, row in _read_scene_rows(source)]  # corrupted scenes left out
        classify = [{"image": r["image"], "label": scene_class(r)} for r in rows if scene_class(r)]
        by_split[split] = (rows, classify)
        path = data_dir / f"{split}_classify.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in classify), encoding="utf-8")
        paths[f"{split}_classify"] = path
    rows, classify = by_split["train"]
    by_class: dict[str, list[str]] = {}
    for r in classify:
        by_class.setdefault(r["label"], []).append(r["image"])
    by_class = {c: imgs for c, imgs in by_class.items() if len(imgs) >= 2}
    if len(by_class) < 2:  # too little data for novel labels: caption documents only, and no episodes
        log.warning("%s/train.jsonl has fewer than two classes of one-object scenes with two images each: "
                    "no novel-label documents or episodes", data_dir)  # fmt: skip
        novel_fraction = 0.0
    vqa = {}
    vqa_file = data_dir / "train_vqa.jsonl"
    if vqa_file.is_file():
        for r in map(json.loads, filter(str.strip, vqa_file.read_text(encoding="utf-8").splitlines())):
            question = r["conversations"][0]["value"].replace("<image>", "").strip()
            vqa.setdefault(r["image"], []).append(VQA_FORMAT.format(question, r["answer"]))
    rng = np.random.default_rng([seed, zlib.crc32(b"interleaved")])
    docs = []
    for _ in range(documents):
        n = int(rng.integers(2, max_images + 1))
        if rng.random() < novel_fraction:
            docs.append(_episode_doc(by_class, rng, TRAIN_WORDS, n))
            continue
        segments = []
        for i in rng.choice(len(rows), size=n, replace=False):
            row = rows[int(i)]
            texts = [CAPTION_FORMAT.format(row["caption"])] + vqa.get(row["image"], [])
            segments += [{"image": row["image"]}, {"text": str(rng.choice(texts))}]
        docs.append({"segments": segments, "kind": "captions"})
    path = data_dir / "train_interleaved.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    paths["train_interleaved"] = path
    # held-out episodes: val queries, two classes each (the query's and another), test-pool words
    _, queries = by_split["val"]
    queries = [q for q in queries if q["label"] in by_class] if len(by_class) >= 2 else []
    if not queries:
        log.warning(
            "%s/val.jsonl has no one-object scene of a class with novel-label support: no episodes", data_dir
        )
        episodes = 0
    erng = np.random.default_rng([seed, zlib.crc32(b"episodes")])
    lines = []
    for k in range(episodes):
        q = queries[int(erng.integers(len(queries)))]
        other = str(erng.choice(sorted(c for c in by_class if c != q["label"])))
        pair = [q["label"], other] if erng.random() < 0.5 else [other, q["label"]]
        wa, wb = erng.choice(len(TEST_WORDS), size=2, replace=False)
        lines.append({"id": f"val-episode-{k:04d}", "classes": pair, "words": [TEST_WORDS[wa], TEST_WORDS[wb]],
                      "query": q["image"], "label": q["label"]})  # fmt: skip
    path = data_dir / "val_episodes.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    paths["val_episodes"] = path
    return paths
