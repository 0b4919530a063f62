import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.manifest import (
    BadRow,
    ImageTextDataset,
    Sample,
    check_images,
    read_image_folder,
    read_manifest,
)
from vlmkit.data.transforms import ImageTransform, PreprocessConfig, load_image
from vlmkit.errors import ConfigError, DataError


def write_image(path, seed=0, size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_jsonl(path, rows):
    """rows: dicts, or raw strings written as they are."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def bad_suite(tmp_path):
    """A JSONL manifest with every kind of bad row; returns (path, expected bad {line: reason part})."""
    for i in range(4):
        write_image(tmp_path / f"imgs/good{i}.png", seed=i)
    (tmp_path / "imgs/zero.png").write_bytes(b"")
    truncate(write_image(tmp_path / "imgs/trunc.png", size=(64, 64)))
    truncate(write_image(tmp_path / "imgs/trunc.jpg", size=(64, 64)))
    (tmp_path / "imgs/noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    rows = [
        {"image": "imgs/good0.png", "caption": "a red square"},  # 1
        {"image": "imgs/missing.png", "caption": "gone"},  # 2
        "",  # 3: blank, ignored
        {"image": "imgs/zero.png", "caption": "zero bytes"},  # 4
        {"image": "imgs/trunc.png", "caption": "cut png"},  # 5
        {"image": "imgs/trunc.jpg", "caption": "cut jpeg"},  # 6
        {"image": "imgs/noise.jpg", "caption": "random bytes"},  # 7
        {"image": "imgs/good1.png", "caption": "   "},  # 8
        '{"image": "imgs/good1.png", "caption": ',  # 9
        {"image": "imgs/good2.png", "text": "wrong key"},  # 10
        {"image": "imgs/good2.png", "caption": "a blue square", "source": "extra keys are fine"},  # 11
        "   ",  # 12: blank, ignored
        {"image": "imgs/good3.png", "caption": "a green square"},  # 13
        {"image": "imgs/good0.png", "caption": "the red square again"},  # 14
        '["imgs/good0.png", "not an object"]',  # 15
    ]
    expected_bad = {
        2: "missing file",
        4: "empty file",
        5: "truncated or corrupt image",
        6: "truncated or corrupt image",
        7: "not an image file",
        8: "empty caption",
        9: "malformed JSON",
        10: "missing key 'caption'",
        15: "expected a JSON object",
    }
    return write_jsonl(tmp_path / "train.jsonl", rows), expected_bad


def test_read_manifest_skips_cheap_bad_rows(bad_suite):
    path, expected = bad_suite
    samples, bad = read_manifest(path)
    # without decoding: only the rows that need no image decode are bad yet
    cheap = {k: v for k, v in expected.items() if k not in (5, 6, 7)}
    assert {b.line: b.reason for b in bad}.keys() == cheap.keys()
    for b in bad:
        assert cheap[b.line] in b.reason and b.file == str(path)
    assert [s.line for s in samples] == [1, 5, 6, 7, 11, 13, 14]
    assert samples[0] == Sample(path.parent / "imgs/good0.png", "a red square", 1)


def test_dataset_skips_counts_and_logs_every_bad_row(bad_suite, caplog):
    path, expected = bad_suite
    log = logging.getLogger("test_manifest")
    with caplog.at_level(logging.WARNING, logger="test_manifest"):
        ds = ImageTextDataset(
            path, ImageTransform(PreprocessConfig(image_size=8)), max_bad_fraction=1.0, log=log
        )
    assert ds.num_total == 13 and ds.num_bad == 9 and len(ds) == 4
    assert [b.line for b in ds.bad_rows] == sorted(expected)
    for b in ds.bad_rows:
        assert expected[b.line] in b.reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 9
    for line, reason in expected.items():
        assert any(w.startswith(f"skipped {path}:{line}: ") and reason in w for w in warnings), line
    assert ds.captions == ["a red square", "a blue square", "a green square", "the red square again"]
    assert ds.image_paths[0] == ds.image_paths[3] == path.parent / "imgs/good0.png"
    x, caption = ds[1]
    assert x.shape == (3, 8, 8) and caption == "a blue square"


def test_bad_fraction_limit(bad_suite):
    path, _ = bad_suite
    with pytest.raises(DataError) as e:
        ImageTextDataset(path, ImageTransform(PreprocessConfig(image_size=8)), max_bad_fraction=0.5)
    msg = str(e.value)
    assert f"9 of 13 rows in {path} are bad (69.2%), above the limit of 50.0%" in msg
    assert "--max-bad-fraction" in msg
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        ImageTextDataset(path, ImageTransform(), max_bad_fraction=1.5)


def test_missing_unknown_empty_and_all_bad_manifests(tmp_path):
    with pytest.raises(DataError, match="manifest not found: .*nope.jsonl"):
        ImageTextDataset(tmp_path / "nope.jsonl", ImageTransform())
    (tmp_path / "m.parquet").write_text("x")
    with pytest.raises(DataError, match="m.parquet: unknown manifest extension '.parquet'"):
        read_manifest(tmp_path / "m.parquet")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no usable rows in .*empty.jsonl"):
        ImageTextDataset(tmp_path / "empty.jsonl", ImageTransform())
    write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "caption": "x"}, "{oops"])
    with pytest.raises(DataError, match=r"no usable rows in .*bad.jsonl \(2 bad rows"):
        ImageTextDataset(tmp_path / "bad.jsonl", ImageTransform(), max_bad_fraction=1.0)
    (tmp_path / "array.json").write_text('[{"image": "a.png", "caption": "x"}]')
    with pytest.raises(DataError, match="JSONL"):
        read_manifest(tmp_path / "array.json")
    (tmp_path / "noheader.csv").write_text("a.png,a caption\n")
    with pytest.raises(DataError, match=r"noheader.csv:1: the header needs columns \['image', 'caption'\]"):
        read_manifest(tmp_path / "noheader.csv")
    (tmp_path / "latin1.csv").write_bytes("image,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.csv is not UTF-8"):
        read_manifest(tmp_path / "latin1.csv")


def test_csv_tsv_and_jsonl_agree(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"imgs/{i}.png", seed=i)
    rows = [
        ("imgs/0.png", "a dog, running on grass"),  # comma: quoted in CSV
        ("imgs/1.png", 'a sign saying "stop"'),  # quotes
        ("imgs/2.png", "two lines\nof caption"),  # a quoted field spanning two lines
        ("imgs/0.png", "café ☕ and 日本"),
    ]
    write_jsonl(tmp_path / "m.jsonl", [{"image": i, "caption": c} for i, c in rows])
    for ext, dialect in [("csv", "excel"), ("tsv", "excel-tab")]:
        with open(tmp_path / f"m.{ext}", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, dialect=dialect)
            w.writerow(["id", "caption", "image"])  # extra column, any order
            w.writerows([(n, c, i) for n, (i, c) in enumerate(rows)])
    j, jbad = read_manifest(tmp_path / "m.jsonl")
    c, cbad = read_manifest(tmp_path / "m.csv")
    t, tbad = read_manifest(tmp_path / "m.tsv")
    assert jbad == cbad == tbad == []
    assert (
        [(s.image, s.caption) for s in j]
        == [(s.image, s.caption) for s in c]
        == [(s.image, s.caption) for s in t]
    )
    assert [(s.image, s.caption) for s in j] == [(tmp_path / i, c) for i, c in rows]
    assert [s.line for s in j] == [1, 2, 3, 4]
    assert [s.line for s in c] == [2, 3, 4, 6]  # header is line 1; row 3 spans lines 4-5


def test_csv_bad_rows_report_their_lines(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,caption\na.png,ok\n\na.png\na.png,  \nmissing.png,x\n")
    samples, bad = read_manifest(tmp_path / "m.csv")
    assert [s.line for s in samples] == [2]
    assert [(b.line, b.reason.split(":")[0]) for b in bad] == [
        (4, "missing key 'caption'"),
        (5, "empty caption"),
        (6, f"image {tmp_path / 'missing.png'}"),
    ]
    assert str(bad[1]) == f"{tmp_path / 'm.csv'}:5: empty caption"


def test_paths_relative_to_manifest_folder(tmp_path, monkeypatch):
    write_image(tmp_path / "data/imgs/a.png", seed=1)
    write_image(tmp_path / "elsewhere/b.png", seed=2)
    absolute = tmp_path / "elsewhere/b.png"
    rows = [
        {"image": "imgs/a.png", "caption": "relative"},
        {"image": "../elsewhere/b.png", "caption": "up a level"},
        {"image": str(absolute), "caption": "absolute"},
    ]
    write_jsonl(tmp_path / "data/m.jsonl", rows)
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working directory must not matter
    samples, bad = read_manifest("../data/m.jsonl")
    assert bad == []
    assert samples[2].image == absolute
    for s, want in zip(samples, [tmp_path / "data/imgs/a.png", absolute, absolute]):
        assert s.image.resolve() == want.resolve()


def test_check_images_decodes_each_path_once(bad_suite):
    path, _ = bad_suite
    samples, _ = read_manifest(path)
    good, bad, images = check_images(samples, path, keep_images=True, num_threads=2)
    assert [s.line for s in good] == [1, 11, 13, 14]
    assert [b.line for b in bad] == [5, 6, 7]
    assert all(isinstance(b, BadRow) and str(path) == b.file for b in bad)
    assert images[0] is images[3]  # good0.png, named by rows 1 and 14
    assert np.array_equal(np.asarray(images[1]), np.asarray(load_image(good[1].image)))
    assert check_images(samples, path)[2] is None


def test_dataset_augmentation_is_reproducible(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i, size=(40, 30))
    m = write_jsonl(tmp_path / "m.jsonl", [{"image": f"{i}.png", "caption": f"c{i}"} for i in range(3)])
    t = ImageTransform(PreprocessConfig(image_size=16), train=True)
    ds = ImageTextDataset(m, t, seed=5)
    x0, c0 = ds[2]
    assert c0 == "c2"
    # the documented seeding: rng([seed, epoch, index])
    want = t(load_image(tmp_path / "2.png"), np.random.default_rng([5, 0, 2]))
    assert torch.equal(x0, want)
    assert torch.equal(ds[-1][0], x0)
    ds.set_epoch(1)
    x1 = ds[2][0]
    assert not torch.equal(x0, x1)
    # a fresh dataset (a resumed run), without the cache, reproduces epoch 1
    resumed = ImageTextDataset(m, t, seed=5, cache_images=False)
    resumed.set_epoch(1)
    assert torch.equal(resumed[2][0], x1)
    assert not torch.equal(ImageTextDataset(m, t, seed=6)[2][0], x0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch[0].shape == (3, 3, 16, 16) and list(batch[1]) == ["c0", "c1", "c2"]


def test_uncached_dataset_reports_images_changed_later(tmp_path):
    write_image(tmp_path / "a.png")
    m = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "x"}])
    ds = ImageTextDataset(m, ImageTransform(PreprocessConfig(image_size=8)), cache_images=False)
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match=r"m.jsonl:1: .*a.png: missing file"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# ImageFolder


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "train"
    write_image(root / "golden_retriever/a.png")
    write_image(root / "golden_retriever/nested/b.jpg", fmt="JPEG")
    (root / "golden_retriever/notes.txt").write_text("not an image")
    (root / "golden_retriever/.hidden.png").write_bytes(b"")
    write_image(root / "cat/c.PNG")
    (root / ".cache").mkdir()
    return root


def test_image_folder_names_from_folders(folder):
    paths, labels, names = read_image_folder(folder)
    assert names == ["cat", "golden retriever"]
    assert [p.relative_to(folder).as_posix() for p in paths] == [
        "cat/c.PNG",
        "golden_retriever/a.png",
        "golden_retriever/nested/b.jpg",
    ]
    assert labels == [0, 1, 1]


@pytest.mark.parametrize(
    "where, text, positional",
    [
        ("root", "tabby cat\ngolden retriever dog\n", True),
        ("given", "tabby cat\n\ngolden retriever dog\n", True),
        ("given", "golden_retriever\tgolden retriever dog\ncat\ttabby cat\n", False),
        ("given", json.dumps({"cat": "tabby cat", "golden_retriever": "golden retriever dog"}), False),
    ],
)
def test_image_folder_classes_file(folder, where, text, positional):
    target = {"root": folder, "given": folder.parent / "other"}[where]
    target.mkdir(exist_ok=True)
    (target / "classes.txt").write_text(text)
    given = target / "classes.txt" if where == "given" else None
    paths, labels, names = read_image_folder(folder, classes_file=given, positional_classes=positional)
    assert names == ["tabby cat", "golden retriever dog"]
    assert labels == [0, 1, 1]


def make_class_folders(root, names):
    for name in names:
        write_image(root / name / "x.png")
    return root


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.mark.parametrize("order", ["label order", "reversed", "shuffled", "sorted"])
def test_class_file_of_folder_names_maps_by_name_whatever_its_order(tmp_path, order, caplog):
    # An ImageNet/CLIP_benchmark-style list gives the folder names in label order, not sorted order; reading
    # it by position permuted the labels (a 0.98 model reported at 0.09).
    root = make_class_folders(tmp_path / "digits", DIGITS)
    lines = {
        "label order": DIGITS,
        "reversed": DIGITS[::-1],
        "shuffled": ["seven", "two", "nine", "zero", "five", "one", "eight", "three", "six", "four"],
        "sorted": sorted(DIGITS),
    }[order]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    with caplog.at_level("INFO", logger="vlmkit.data.manifest"):
        paths, labels, names = read_image_folder(root)
    for path, label in zip(paths, labels):
        assert names[label] == path.parent.name  # each image's class name is its own folder's
    assert "(by name)" in caplog.text and "eight -> 'eight'" in caplog.text
    # even when positional order is asked for, a file of folder names maps by name
    assert read_image_folder(root, positional_classes=True)[2] == names


def test_class_file_names_match_folders_ignoring_case_and_underscores(folder):
    (folder / "classes.txt").write_text("Golden Retriever\ncat\n")
    assert read_image_folder(folder)[2] == ["cat", "golden retriever"]


def test_class_file_with_names_that_are_not_folders_is_refused_unless_positional(tmp_path):
    root = make_class_folders(tmp_path / "wnids", ["n01440764", "n01443537"])
    (root / "classes.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(DataError, match=r"not the class folder names .*--positional-classes"):
        read_image_folder(root)
    assert read_image_folder(root, positional_classes=True)[2] == ["tench", "goldfish"]


def test_partial_and_mismatched_class_files_are_refused(tmp_path):
    root = make_class_folders(tmp_path / "digits", DIGITS)
    (root / "classes.txt").write_text("\n".join(DIGITS[:8]) + "\n")  # partial
    with pytest.raises(DataError, match=r"lists 8 of the 10 class folders .*'eight' is missing"):
        read_image_folder(root)
    (root / "classes.txt").write_text("\n".join(DIGITS[:9] + ["ten"]) + "\n")  # mismatched
    with pytest.raises(DataError, match=r"classes.txt:10: 'ten' is not a class folder"):
        read_image_folder(root)
    (root / "classes.txt").write_text("\n".join(DIGITS + ["two"]) + "\n")  # a name twice
    with pytest.raises(DataError, match=r"classes.txt:11: 'two' is listed twice \(first on line 3\)"):
        read_image_folder(root)


def test_class_file_outside_the_data_folder_is_never_picked_up(folder):
    # a classes.txt beside the split folders (data/classes.txt for data/train) belongs to no one split
    (folder.parent / "classes.txt").write_text("golden retriever\ncat\nbird\n")
    assert read_image_folder(folder)[2] == ["cat", "golden retriever"]


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(DataError, match="image folder not found: .*nope"):
        read_image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat/a.png")
    with pytest.raises(DataError, match="flat has no class folders"):
        read_image_folder(tmp_path / "flat")
    (folder / "classes.txt").write_text("just one name\n")
    with pytest.raises(DataError, match=r"classes.txt has 1 class names but .*train has 2 class folders"):
        read_image_folder(folder, positional_classes=True)
    (folder / "classes.txt").write_text("cat\ttabby\ndog\tdog\n")
    with pytest.raises(DataError, match="names folder 'dog'"):
        read_image_folder(folder)
    (folder / "classes.txt").write_text(json.dumps({"cat": "tabby"}))
    with pytest.raises(DataError, match="no name for class folder 'golden_retriever'"):
        read_image_folder(folder)
    with pytest.raises(DataError, match="classes file not found"):
        read_image_folder(folder, classes_file=tmp_path / "missing.txt")


def test_cached_images_are_downscaled_to_the_short_side(tmp_path):
    from vlmkit.data.manifest import ImageTextDataset
    from vlmkit.data.transforms import ImageTransform, PreprocessConfig

    Image.new("RGB", (200, 100), (10, 200, 30)).save(tmp_path / "big.png")
    (tmp_path / "m.jsonl").write_text('{"image": "big.png", "caption": "a green field"}\n')
    ds = ImageTextDataset(
        tmp_path / "m.jsonl", ImageTransform(PreprocessConfig(image_size=16)), cache_short_side=32
    )
    assert ds._images[0].size == (64, 32)
    x, caption = ds[0]
    assert x.shape == (3, 16, 16) and caption == "a green field"
