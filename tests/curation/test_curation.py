"""`vlmkit data filter`: each filter on a handmade pool, chaining, outputs and user mistakes.

Model-based filters use a tiny random vlmkit model; their scores are checked against a float64
re-computation with the model's own encode_image / encode_text.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.cli import curation as curation_cli
from vlmkit.cli.curation import register_cli
from vlmkit.curation.curate import (
    CaptionLength,
    DedupCaptions,
    DedupImages,
    ImageSize,
    ImageTargets,
    ModelScore,
    SemDeDup,
    TextConcepts,
    concept_pattern,
    curate,
    load_pool,
    top_count,
)
from vlmkit.data.manifest import read_manifest
from vlmkit.data.shards import iter_samples
from vlmkit.data.shards.write import ShardWriter
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform, PreprocessConfig, load_image
from vlmkit.errors import ConfigError

WORDS = "a the red blue green small big circle square dog cat photo of on left right sea lion".split()


# ---------------------------------------------------------------------------- helpers


def noise_image(seed: int, size: tuple[int, int] = (40, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def tinted(channel: int, seed: int) -> np.ndarray:
    """A flat colour (red, green or blue) with mild noise; stripes on blue ones."""
    rng = np.random.default_rng(seed)
    a = np.zeros((48, 48, 3))
    a[..., channel] = 200 + rng.integers(0, 50)
    if channel == 2:
        a[::4] = 255
    return np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)


def write_pool(root: Path, rows: list[tuple], name: str = "pool.jsonl") -> Path:
    """rows: (image, caption[, extra dict]); image is an array (saved as PNG), a file name already
    written under root/images, or ("bmp", array) for another format."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (image, caption, *extra) in enumerate(rows):
        if isinstance(image, str):
            rel = f"images/{image}"
        else:
            fmt, arr = image if isinstance(image, tuple) else ("png", image)
            rel = f"images/{n:03d}.{fmt}"
            Image.fromarray(arr).save(root / rel)
        lines.append(json.dumps({"image": rel, "caption": caption, **(extra[0] if extra else {})}))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def run(pool, filters, out=None, **kw):
    # fp32: scores are compared with float64 references (precision "auto" picks bf16 on some CPUs)
    return curate(pool, filters, out, progress=False, **{"bf16": False, **kw})


def removed_keys(result, step: int) -> list[str]:
    return [result.pool.samples[i].key for i in result.steps[step].removed]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlmkit data")
    register_cli(parser.add_subparsers(dest="data_command"))
    return parser.parse_args(["filter", *argv])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP saved as a vlmkit model folder."""
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 5)) for _ in range(200)]
    tokenizer = Tokenizer.train(corpus, vocab_size=300, context_length=16)
    overrides = {"vision.layers": 1, "text.layers": 1, "text.vocab_size": 300, "text.context_length": 16}
    model = create_model("clip-tiny", **overrides)
    out = tmp_path_factory.mktemp("model")
    return save_pretrained(model, out, tokenizer, PreprocessConfig(image_size=64), name="tiny")


def reference_features(model_dir: Path, images: list[Path], captions: list[str]):
    """Float64 image and caption embeddings with the model's own encoders, normalised in float64."""
    from vlmkit.convert import load_pretrained

    pt = load_pretrained(model_dir)
    model = pt.model.double()
    tf = ImageTransform(pt.preprocess)
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(load_image(p)) for p in images]).double())
        txt = model.encode_text(pt.tokenizer(captions)) if captions else None
    img = (img / img.norm(dim=-1, keepdim=True)).numpy()
    if txt is not None:
        txt = (txt / txt.norm(dim=-1, keepdim=True)).numpy()
    return img, txt


# ---------------------------------------------------------------------------- basic filters


def test_caption_length_by_hand(tmp_path):
    captions = ["one", "two words", "now three words", "a b c d", "  spaced   out   words  here  now "]
    pool = write_pool(tmp_path, [(noise_image(0), c) for c in captions])
    result = run(pool, [CaptionLength(min_words=2, max_words=4)])
    # keys are the manifest line numbers: lines 1 and 5 (1 word; 5 words) go
    assert removed_keys(result, 0) == ["1", "5"]
    assert result.kept_keys == ["2", "3", "4"]
    assert result.steps[0].reasons[0] == "1 words < 2"
    assert result.steps[0].reasons[4] == "5 words > 4"


def test_image_size_by_hand_and_unreadable_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        (noise_image(0, (10, 10)), "small"),  # shorter side 10 < 16
        (noise_image(1, (40, 20)), "aspect two"),  # kept: 2 <= 3
        (noise_image(2, (30, 30)), "square"),  # kept
        (noise_image(3, (100, 20)), "wide"),  # aspect 5 > 3
        (noise_image(4, (20, 70)), "tall"),  # aspect 3.5 > 3
        ("broken.png", "corrupt file"),
    ]
    result = run(write_pool(tmp_path, rows), [ImageSize(min_side=16, max_aspect=3.0)])
    step = result.steps[0]
    assert removed_keys(result, 0) == ["1", "4", "5", "6"]
    assert step.reasons[0] == "10x10: shorter side < 16"
    assert step.reasons[3] == "100x20: aspect ratio 5.00 > 3"
    assert step.reasons[5].startswith("unreadable image: ")
    assert step.unreadable == 1


def test_exact_duplicate_images_and_captions_keep_the_first(tmp_path):
    a, b = noise_image(0), noise_image(1)
    rows = [
        (a, "a photo"),  # 1
        (b, "A  Photo"),  # 2: same caption as 1 ignoring case and spaces
        (("bmp", a), "other words"),  # 3: same pixels as 1, another file and format
        (a, "more words"),  # 4: same pixels as 1
        (noise_image(2), "fresh"),  # 5
    ]
    pool = write_pool(tmp_path, rows)
    result = run(pool, [DedupImages()])
    assert removed_keys(result, 0) == ["3", "4"]
    assert result.steps[0].reasons[2] == "same pixels as 1"
    result = run(pool, [DedupCaptions()])
    assert removed_keys(result, 0) == ["2"]
    assert result.steps[0].reasons[1] == "same caption as 1"


def test_chaining_order_changes_counts(tmp_path):
    img = noise_image(0)
    rows = [(img, "cat"), (img, "a black cat"), (noise_image(1), "a white dog")]
    pool = write_pool(tmp_path, rows)
    # dedup first: row 2 is a copy of row 1 and goes; then row 1 is too short -> only row 3 is left
    result = run(pool, [DedupImages(), CaptionLength(min_words=2)])
    assert [len(s.removed) for s in result.steps] == [1, 1]
    assert result.kept_keys == ["3"]
    # length first: row 1 goes; row 2's image then has no earlier copy among the survivors and stays
    result = run(pool, [CaptionLength(min_words=2), DedupImages()])
    assert [len(s.removed) for s in result.steps] == [1, 0]
    assert result.kept_keys == ["2", "3"]


def test_images_are_decoded_once_per_need(tmp_path, model_dir, monkeypatch):
    pool = load_pool(write_pool(tmp_path, [(noise_image(i), f"red circle {i}") for i in range(6)]))
    calls = []
    original = pool.load_image
    monkeypatch.setattr(pool, "load_image", lambda i: calls.append(i) or original(i))
    filters = [ModelScore(model_dir, top_fraction=1.0), SemDeDup(clusters=2, eps=0.0), ImageSize(min_side=8)]
    run(pool, [*filters, DedupImages()])
    # the embedding pass recorded sizes and hashes; SemDeDup reused the embeddings
    assert sorted(calls) == list(range(6))


def test_basic_filters_find_the_synthetic_generators_planted_noise(tmp_path):
    from vlmkit.data.synthetic import generate

    noise = dict(duplicate_fraction=0.1, tiny_fraction=0.05, blank_fraction=0.05)
    paths = generate(
        tmp_path,
        num_train=80,
        num_val=2,
        image_size=32,
        num_per_class_train=1,
        num_per_class_val=1,
        progress=False,
        num_workers=0,
        **noise,
    )
    manifest = paths["train"]
    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    result = run(manifest, [ImageSize(min_side=16), DedupImages()])
    corruption = [rows[i]["corruption"] for i in range(len(rows))]
    assert sorted(result.steps[0].removed) == [i for i, c in enumerate(corruption) if c == "tiny"]
    # reference: a survivor whose file bytes equal an earlier survivor's (copies and blanks are byte-equal)
    seen, expected = set(), []
    for i in [i for i in range(len(rows)) if corruption[i] != "tiny"]:
        data = (Path(manifest).parent / rows[i]["image"]).read_bytes()
        if data in seen:
            expected.append(i)
        seen.add(data)
    assert result.steps[1].removed == expected
    assert len(expected) == corruption.count("duplicate") + corruption.count("blank") - 1


# ---------------------------------------------------------------------------- text and model filters


def test_text_concepts_whole_words_plurals_and_case(tmp_path):
    captions = [
        "two Dogs on grass",  # plural, capital
        "a hotdog stand",  # inside a word: no
        "puppies playing",  # y -> ies
        "a sea   lions colony",  # multi-word, extra spaces, plural of the last word
        "a sea of lions",  # words apart: no
        "DOG.",  # punctuation
        "dogma",  # no
    ]
    pool = write_pool(tmp_path, [(noise_image(0), c) for c in captions])
    result = run(pool, [TextConcepts("dog, puppy,sea lion")])
    assert result.kept_keys == ["1", "3", "4", "6"]
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# classes\ndog\n\npuppy  # young dog\nsea lion\n")
    assert run(pool, [TextConcepts(str(concepts))]).kept_keys == ["1", "3", "4", "6"]
    assert concept_pattern(["box"]).search("three boxes") and concept_pattern(["day"]).search("days")


def test_top_count():
    assert top_count(0.3, 10) == 3  # not 4, despite 0.3 * 10 = 3.0000000000000004
    assert top_count(0.25, 10) == 3
    assert top_count(1.0, 7) == 7


def test_model_score_matches_float64_reference(tmp_path, model_dir):
    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(WORDS, 4)) for _ in range(10)]
    pool_file = write_pool(tmp_path, [(noise_image(i), c) for i, c in enumerate(captions)])
    samples, _ = read_manifest(pool_file)
    img, txt = reference_features(model_dir, [s.image for s in samples], captions)
    expected = (img * txt).sum(1)  # (10,)

    result = run(pool_file, [ModelScore(model_dir, top_fraction=0.3)], batch_size=4)
    step = result.steps[0]
    got = np.array([step.scores[i] for i in range(10)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    best = sorted(np.argsort(-expected)[:3].tolist())
    assert result.kept == best
    assert step.threshold == pytest.approx(expected[best].min(), abs=1e-5)

    ordered = np.sort(expected)
    gaps = np.diff(ordered)
    j = int(np.argmax(gaps[2:-2])) + 2  # a threshold between two scores, away from both
    threshold = float(ordered[j] + gaps[j] / 2)
    result = run(pool_file, [ModelScore(model_dir, min_score=threshold)])
    assert result.kept == np.flatnonzero(expected >= threshold).tolist()
    assert len(result.kept) == 10 - (j + 1)


def test_model_score_with_a_hugging_face_folder_matches_transformers(tmp_path):
    """A transformers CLIP folder scores pairs as transformers itself does (its processor and tokenizer)."""
    transformers = pytest.importorskip("transformers")
    from vlmkit.convert.clip import save_hf
    from vlmkit.models.registry import create_model

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    tokenizer = Tokenizer.train(
        [" ".join(rng.choice(WORDS, 5)) for _ in range(200)], vocab_size=300, context_length=16
    )
    overrides = {"vision.layers": 1, "text.layers": 1, "text.vocab_size": 300, "text.context_length": 16}
    model = create_model("clip-tiny", **overrides, **{"vision.stem": "patch"})
    hf_dir = save_hf(model, tmp_path / "hf", tokenizer, PreprocessConfig(image_size=64))

    captions = [" ".join(rng.choice(WORDS, 4)) for _ in range(6)]
    pool_file = write_pool(tmp_path, [(noise_image(i), c) for i, c in enumerate(captions)])
    samples, _ = read_manifest(pool_file)
    result = run(pool_file, [ModelScore(hf_dir, top_fraction=0.5)], batch_size=4)
    got = np.array([result.steps[0].scores[i] for i in range(len(captions))])

    hf = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    pixels = processor([Image.open(s.image).convert("RGB") for s in samples], return_tensors="pt")
    ids = hf_tok(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    pooled = lambda out: getattr(out, "pooler_output", out)  # transformers 5 wraps the features
    with torch.no_grad():
        img = F.normalize(pooled(hf.get_image_features(pixel_values=pixels["pixel_values"])), dim=-1)
        txt = F.normalize(pooled(hf.get_text_features(input_ids=ids["input_ids"])), dim=-1)
    np.testing.assert_allclose(got, (img * txt).sum(-1).numpy(), atol=1e-4)


def test_semdedup_removes_planted_near_duplicates(tmp_path, model_dir):
    distinct = [noise_image(10 + i) for i in range(8)]
    rng = np.random.default_rng(0)
    near = lambda a: np.clip(a + rng.normal(0, 2, a.shape), 0, 255).astype(np.uint8)  # same image + noise
    images = [*distinct, near(distinct[1]), near(distinct[5]), near(distinct[1])]  # lines 9, 10, 11
    pool_file = write_pool(tmp_path, [(a, f"caption {i}") for i, a in enumerate(images)])
    samples, _ = read_manifest(pool_file)
    ref, _ = reference_features(model_dir, [s.image for s in samples], [])
    sim = ref @ ref.T
    eps = 0.002
    dup_pairs = [(1, 8), (5, 9), (1, 10), (8, 10)]
    assert max(sim[i, j] for i in range(8) for j in range(i)) < 1 - eps  # distinct ones are distinct
    assert min(sim[i, j] for i, j in dup_pairs) > 1 - eps  # planted ones are near-duplicates

    for clusters in (3, 1):
        result = run(pool_file, [SemDeDup(clusters=clusters, eps=eps, model=str(model_dir))])
        step = result.steps[0]
        assert removed_keys(result, 0) == ["09", "10", "11"]
        assert step.reasons[8].startswith("near-duplicate of 02 ")
        assert step.threshold == pytest.approx(1 - eps)
    # with one cluster, each sample after the first has a max similarity to the earlier ones
    got = [step.scores[j] for j in range(1, 11)]
    np.testing.assert_allclose(got, [sim[j, :j].max() for j in range(1, 11)], atol=1e-5)


def test_image_targets_keep_the_cluster_nearest_the_targets(tmp_path, model_dir):
    rows = [(tinted(0, i), f"red {i}") for i in range(5)] + [
        (tinted(2, 10 + i), f"blue {i}") for i in range(5)
    ]
    order = np.random.default_rng(0).permutation(len(rows))  # interleave the two groups
    pool_file = write_pool(tmp_path, [rows[k] for k in order])
    targets = tmp_path / "targets"
    (targets / "red").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(tinted(0, 100 + i)).save(targets / "red" / f"{i}.png")
    result = run(pool_file, [ImageTargets(targets, clusters=2, model=str(model_dir))])
    kept_captions = sorted(result.pool.samples[i].caption for i in result.kept)
    assert kept_captions == [f"red {i}" for i in range(5)]
    assert result.steps[0].stats["clusters_hit"] == 1


# ---------------------------------------------------------------------------- shards


def png_bytes(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(out: Path) -> list[bytes]:
    """Two shards of 3: a copy of sample 0's image at 4, a small original size at 2, a corrupt image at 5."""
    a = noise_image(0)
    images = [png_bytes(a), png_bytes(noise_image(1)), png_bytes(noise_image(2)), png_bytes(noise_image(3))]
    images += [png_bytes(a), b"\x89PNG broken"]
    originals = [(640, 480), (300, 300), (100, 80), (500, 500), (640, 480), (640, 480)]
    with ShardWriter(out, shard_size=3) as w:
        for n, (data, (ow, oh)) in enumerate(zip(images, originals)):
            meta = {"source": f"http://x/{n}.png", "width": 40, "height": 40, "original_width": ow}
            meta.update(original_height=oh, extra={"corruption": "duplicate" if n == 4 else None})
            w.add_success(data, "png", f"caption {n}", meta)
    return images


def test_shard_input_to_shards_copies_raw_bytes(tmp_path):
    images = write_shards(tmp_path / "shards")
    out = tmp_path / "curated"
    result = run(str(tmp_path / "shards"), [ImageSize(min_side=200), DedupImages()], out, shard_size=2)
    assert result.pool.kind == "shards" and len(result.pool) == 6
    # sample 2 is small by its recorded original size (the stored image is 40x40); 4 copies 0; 5 is corrupt
    assert removed_keys(result, 0) == ["000002"] and removed_keys(result, 1) == ["000011", "000012"]
    assert result.steps[1].reasons[5].startswith("unreadable image: decode_error")
    assert (out / "uids.txt").read_text().split() == ["000000", "000001", "000010"]
    kept = list(iter_samples(str(out)))
    assert len(list(out.glob("*.tar"))) == 2  # shard_size 2
    assert [s.meta["input_key"] for s in kept] == ["000000", "000001", "000010"]
    assert [s.image_bytes for s in kept] == [images[0], images[1], images[3]]  # not re-encoded
    assert [s.caption for s in kept] == ["caption 0", "caption 1", "caption 3"]
    assert kept[2].meta["source"] == "http://x/3.png" and kept[2].meta["original_width"] == 500
    assert kept[0].meta["extra"] == {"corruption": None}


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("output_format", ["shards", "manifest"])
def test_no_undecodable_image_is_written_without_image_filters(tmp_path, monkeypatch, output_format):
    # Only a caption filter runs: nothing else decodes the images, yet the writer must emit none that fail
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 40x40 images pass, the 80x80 "bomb" does not
    good = [png_bytes(noise_image(0)), jpeg_bytes(noise_image(1))]
    bad = {
        "zero-byte": b"",
        "truncated JPEG": jpeg_bytes(noise_image(2))[:300],
        "decompression bomb": png_bytes(noise_image(3, size=(80, 80))),
    }
    with ShardWriter(tmp_path / "shards", shard_size=10) as w:
        for n, data in enumerate([good[0], *bad.values(), good[1]]):
            ext = "jpg" if n in (2, 4) else "png"
            w.add_success(data, ext, f"caption number {n}", {"source": f"http://x/{n}"})
    out = tmp_path / "out"
    result = run(str(tmp_path / "shards"), [CaptionLength(min_words=1)], out, output_format=output_format)
    step = result.steps[-1]
    assert step.name == "unreadable_image" and step.unreadable == 3
    reasons = sorted(r.split(": ")[1].split()[0] for r in step.reasons.values())
    assert reasons == ["decode_error", "decode_error", "decompression_bomb"]
    assert result.kept_keys == ["000000", "000004"]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert [r["filter"] for r in removed] == ["unreadable_image"] * 3
    if output_format == "shards":
        kept = list(iter_samples(str(out)))
        assert [s.image_bytes for s in kept] == good
        assert all(s.image().size == (40, 40) for s in kept)  # every sample written decodes
    else:
        samples, bad_rows = read_manifest(out / "kept.jsonl")
        assert not bad_rows and [s.image.read_bytes() for s in samples] == good


def test_shard_input_to_manifest_and_manifest_input_to_shards(tmp_path):
    images = write_shards(tmp_path / "shards")
    out = tmp_path / "as_manifest"
    result = run(str(tmp_path / "shards"), [DedupCaptions()], out, output_format="manifest")
    samples, bad = read_manifest(out / "kept.jsonl")
    # the corrupt image (sample 5), which no filter looked at, is removed by the last step, not written
    assert not bad and len(samples) == 5
    assert [s.name for s in result.steps] == ["dedup_captions", "unreadable_image"]
    assert samples[3].image == out / "images" / "000010.png" and samples[3].image.read_bytes() == images[3]
    row = json.loads((out / "kept.jsonl").read_text().splitlines()[4])
    assert row == {"image": "images/000011.png", "caption": "caption 4", "key": "000011"} | {
        "source": "http://x/4.png",
        "corruption": "duplicate",
    }

    # manifest -> shards: the BMP is re-encoded as PNG (the reader takes jpg/png/webp), the PNG copied;
    # the corrupt file, which no filter looked at, is removed by a last step before writing
    (tmp_path / "m" / "images").mkdir(parents=True)
    (tmp_path / "m" / "images" / "broken.png").write_bytes(b"\x89PNG broken")
    rows = [(("bmp", noise_image(5)), "a bmp", {"corruption": None}), (noise_image(6), "a png")]
    pool = write_pool(tmp_path / "m", [*rows, ("broken.png", "a broken file")])
    out = tmp_path / "as_shards"
    result = run(pool, [DedupCaptions()], out, output_format="shards")
    assert [s.name for s in result.steps] == ["dedup_captions", "unreadable_image"]
    assert removed_keys(result, 1) == ["3"]
    kept = list(iter_samples(str(out)))
    assert [s.image_ext for s in kept] == ["png", "png"]
    assert np.array_equal(np.asarray(kept[0].image()), noise_image(5))
    assert kept[1].image_bytes == (tmp_path / "m" / "images" / "001.png").read_bytes()
    assert kept[0].meta["extra"] == {"corruption": None} and kept[0].meta["width"] == 40
    assert [s.meta["input_key"] for s in kept] == result.kept_keys == ["1", "2"]


# ---------------------------------------------------------------------------- CLI and outputs


def test_cli_runs_filters_in_flag_order(tmp_path):
    args = parse(
        ["--input", "x.jsonl", "--out", "o", "--dedup-images", "--max-words", "9", "--min-side", "4"]
    )
    names = [f.name for f in curation_cli.filters_from_args(args)]
    assert names == ["dedup_images", "caption_length", "image_size"]
    args = parse(
        ["--input", "x", "--out", "o", "--text-concepts", "dog", "--min-words", "1", "--max-words", "3"]
    )
    filters = curation_cli.filters_from_args(args)
    assert [f.name for f in filters] == ["text_concepts", "caption_length"]
    assert (filters[1].min_words, filters[1].max_words) == (1, 3)


def test_outputs_and_manifest_round_trip(tmp_path, model_dir, capsys):
    a = noise_image(0)
    rows = [
        (a, "a red circle on the left", {"corruption": None}),
        (a, "a copy of it", {"corruption": "duplicate"}),
        (noise_image(1, (8, 8)), "a tiny image here", {"corruption": "tiny"}),
        (noise_image(2), "short", {"corruption": None}),
        (noise_image(3), "a blue square on the right", {"corruption": None}),
        (noise_image(4), "a green dog photo", {"corruption": None}),
    ]
    pool_file = write_pool(tmp_path / "data", rows)
    out = tmp_path / "curated"
    args = parse(
        [
            "--input",
            str(pool_file),
            "--out",
            str(out),
            "--dedup-images",
            "--min-words",
            "2",
            "--min-side",
            "16",
        ]
        + ["--score-model", str(model_dir), "--top-fraction", "0.5", "--semdedup-eps", "0.001"]
    )
    args.func(args)
    printed = capsys.readouterr().out
    assert re.search(r"1\. dedup_images\s+1\s+5", printed)

    summary = json.loads((out / "curation.json").read_text())
    removed = [f["removed"] for f in summary["filters"]]
    assert [f["filter"] for f in summary["filters"]] == [
        "dedup_images",
        "caption_length",
        "image_size",
        "model_score",
        "semdedup",
    ]
    assert summary["input"]["count"] == 6 and removed[:3] == [1, 1, 1]
    assert summary["kept"] == 6 - sum(removed) == 2  # top half of the 3 left, rounded up
    assert summary["filters"][3]["scores"]["count"] == 3

    kept_keys = (out / "uids.txt").read_text().split()
    samples, bad = read_manifest(out / "kept.jsonl")  # image paths resolve from the new folder
    assert not bad and [s.caption for s in samples] == [rows[int(k) - 1][1] for k in kept_keys]
    kept_rows = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    assert all(r["corruption"] is None for r in kept_rows) and [r["key"] for r in kept_rows] == kept_keys
    removed_rows = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert [r["key"] for r in removed_rows[:3]] == ["2", "4", "3"]
    assert removed_rows[3]["filter"] == "model_score" and isinstance(removed_rows[3]["score"], float)

    page = (out / "report.html").read_text()
    pngs = re.findall(r'<img src="([^"]+)"', page)
    assert "plots/removed_per_filter.png" in pngs and any("scores_04_model_score" in p for p in pngs)
    assert sum("removed_0" in p for p in pngs) == 4  # a grid per filter that removed something
    assert all((out / p).is_file() for p in pngs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-score", "0.2", "--top-fraction", "0.3"], "mutually exclusive"),
        (["--score-model", "MODEL", "--top-fraction", "1.5"], "--top-fraction must be within"),
        (["--min-words", "5", "--max-words", "2"], "--min-words (5) is larger than --max-words (2)"),
        (["--semdedup-eps", "0.1"], "needs embeddings"),
        (["--score-model", "MODEL"], "--score-model needs --min-score"),
        (["--score-model", "HF", "--min-score", "0.2"], "is not a model folder"),
        (["--score-model", "MISSING", "--min-score", "0.2"], "model folder not found"),
        (["--max-aspect", "0.5"], "--max-aspect"),
        (["--image-targets", "MISSING"], "--image-targets: not found"),
        ([], "no filters given"),
        (["--dedup-images", "--output-format", "shards"], "--out"),
    ],
)
def test_bad_flags_give_one_line_config_errors(argv, message, tmp_path, model_dir):
    pool_file = write_pool(tmp_path, [(noise_image(0), "a caption")])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "clip"}')  # and no weights
    out = tmp_path / "out"
    if message == "--out":  # an output folder that is not empty
        out.mkdir()
        (out / "something").write_text("x")
        message = "exists and is not empty"
    argv = [
        {"MODEL": str(model_dir), "HF": str(tmp_path / "hf"), "MISSING": str(tmp_path / "nope")}.get(a, a)
        for a in argv
    ]
    args = parse(["--input", str(pool_file), "--out", str(out), *argv])
    with pytest.raises(ConfigError) as e:
        args.func(args)
    assert message in str(e.value) and "\n" not in str(e.value)
