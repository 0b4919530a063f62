"""Input readers: manifests, image folders, parquet files and Hugging Face `save_to_disk` folders.

Parquet inputs are written with pyarrow and dataset folders with the real `datasets` library; the
resulting shards are read back with `tarfile` and Pillow.
"""

import io
import json
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmkit.data.shards.ingest import (
    ImageFolderInput,
    RecordList,
    TableInput,
    open_input,
    read_manifest_input,
)
from vlmkit.data.shards.write import write_shards
from vlmkit.errors import ConfigError, DataError


def image_bytes(size, seed=0, fmt="PNG"):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path, size=(20, 16), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(size, seed))
    return path


def shard_rows(out):
    """[(caption bytes, decoded image size, meta)] over every shard in order, read with tarfile."""
    rows = []
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tar:
            files = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        for i in range(0, len(files), 3):
            (_, img), (_, txt), (_, meta) = files[i : i + 3]
            rows.append((txt, Image.open(io.BytesIO(img)).size, json.loads(meta)))
    return rows


def failures(out):
    return {
        r["source"]: r["error_message"].split(":")[0]
        for p in sorted(out.glob("*.parquet"))
        for r in pq.read_table(p).to_pylist()
        if r["status"] == "failed"
    }


SIZES = [(20, 16), (9, 30), (33, 12), (16, 16), (25, 7)]
CAPTIONS = ["café ☕ 日本", "two", "Ünïcödé", "four", "five"]


# ----------------------------------------------------------------------------------------------
# manifests and image folders


def test_manifest_records_keep_order_extras_and_bad_rows(tmp_path):
    write_image(tmp_path / "a.png")
    rows = [
        json.dumps({"image": "a.png", "caption": "first", "corruption": "tiny", "objects": [1]}),
        "{not json",
        json.dumps({"image": "gone.png", "caption": "x"}),
        json.dumps({"image": "a.png", "caption": "last"}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    source = read_manifest_input(tmp_path / "m.jsonl")
    assert isinstance(source, RecordList) and len(source) == 4
    recs = list(source)
    assert [r.caption for r in recs] == ["first", None, None, "last"]
    assert recs[0].extra == {"corruption": "tiny", "objects": [1]} and recs[3].extra == {}
    assert recs[0].image == str(tmp_path / "a.png") and recs[0].failure is None
    assert recs[1].source == f"{tmp_path / 'm.jsonl'}:2" and recs[1].failure[0] == "bad_row"
    assert recs[1].failure[1].startswith(f"{tmp_path / 'm.jsonl'}:2: malformed JSON")
    assert recs[2].failure[0] == "missing_image"
    assert [r.caption for r in source.chunk(3, 4)] == ["last"]


def test_csv_manifest(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text('image,caption\na.png,"a, b"\n,no image\n', encoding="utf-8")
    recs = list(open_input(tmp_path / "m.csv"))
    assert recs[0].caption == "a, b" and recs[1].failure[0] == "bad_row"


def test_image_folder_with_sidecars(tmp_path, caplog):
    write_image(tmp_path / "in/cat.jpg")
    write_image(tmp_path / "in/sub/dog.png")
    (tmp_path / "in/cat.txt").write_bytes("a cat ☕\r\n".encode())
    (tmp_path / "in/sub/dog.txt").write_bytes(b"\xff\xfe")
    write_image(tmp_path / "in/owl.png")
    with caplog.at_level(logging.INFO):
        source = open_input(tmp_path / "in")
    assert isinstance(source, ImageFolderInput) and source.rule == "sidecar"
    assert "sidecar .txt" in caplog.text
    recs = list(source)
    assert [r.source for r in recs] == [
        str(tmp_path / p) for p in ("in/cat.jpg", "in/owl.png", "in/sub/dog.png")
    ]
    assert recs[0].caption == "a cat ☕".encode()  # bytes: decoded strictly by the writer
    assert recs[1].failure[0] == "missing_caption"
    assert recs[2].caption == b"\xff\xfe"


def test_image_folder_classes(tmp_path, caplog):
    for cls in ("red_circle", "blue_square"):
        for i in range(2):
            write_image(tmp_path / f"in/{cls}/{i}.png", seed=i)
    with caplog.at_level(logging.INFO):
        source = open_input(tmp_path / "in")
    assert source.rule == "class_name" and "class names" in caplog.text
    recs = list(source)
    assert [r.caption for r in recs] == ["blue square"] * 2 + ["red circle"] * 2
    assert recs[0].extra == {"label": 0, "class_name": "blue square"}

    totals = write_shards(tmp_path / "in", tmp_path / "out", image_size=8, workers=1, progress=False)
    assert totals["successes"] == 4
    assert [r[0] for r in shard_rows(tmp_path / "out")] == [b"blue square"] * 2 + [b"red circle"] * 2


def test_image_folder_without_captions_is_an_error(tmp_path):
    write_image(tmp_path / "in/a.png")
    with pytest.raises(DataError, match="no caption files"):
        open_input(tmp_path / "in")
    with pytest.raises(DataError, match="not found"):
        open_input(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="unknown input file type"):
        open_input(tmp_path / "x.bin")
    with pytest.raises(ConfigError, match="parquet and Hugging Face"):
        open_input(tmp_path / "in", text_column="caption")


# ----------------------------------------------------------------------------------------------
# parquet


def test_parquet_binary_images(tmp_path):
    table = pa.table(
        {
            "jpg": pa.array([image_bytes(s, i) for i, s in enumerate(SIZES)] + [None], pa.binary()),
            "caption": CAPTIONS + ["no image"],
            "similarity": [0.5, 0.25, float("nan"), 1.0, 0.0, 0.1],
            "url": [f"http://x/{i}" for i in range(6)],
        }
    )
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    source = open_input(tmp_path / "part.parquet")
    assert isinstance(source, TableInput) and (source.spec.image_column, source.spec.image_kind) == (
        "jpg",
        "binary",
    )
    assert source.spec.text_column == "caption" and source.spec.extra_columns == ("similarity", "url")
    out = tmp_path / "out"
    totals = write_shards(
        source,
        out,
        shard_size=4,
        image_size=8,
        resize_mode="no",
        encode_format="png",
        workers=1,
        progress=False,
    )
    assert totals["successes"] == 5 and totals["failures"] == {"missing_image": 1}
    rows = shard_rows(out)
    assert [r[0] for r in rows] == [c.encode() for c in CAPTIONS]
    assert [r[1] for r in rows] == SIZES
    assert rows[1][2]["source"] == f"{tmp_path / 'part.parquet'}:1"
    assert rows[1][2]["extra"] == {"similarity": 0.25, "url": "http://x/1"}
    assert rows[2][2]["extra"]["similarity"] is None  # NaN is not JSON
    assert failures(out) == {f"{tmp_path / 'part.parquet'}:5": "missing_image"}


def test_parquet_chunks_across_files_and_row_groups(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for f, start in (("a.parquet", 0), ("b.parquet", 5)):
        n = 5 if f == "a.parquet" else 3
        captions = [f"c{start + i}" for i in range(n)]
        images = [image_bytes((4, 4), start + i) for i in range(n)]
        pq.write_table(pa.table({"image": images, "text": captions}), folder / f, row_group_size=2)
    source = open_input(folder)
    assert len(source) == 8
    got = [(r.source, r.caption) for r in source.chunk(3, 7)]
    assert got == [
        (f"{folder / 'a.parquet'}:3", "c3"),
        (f"{folder / 'a.parquet'}:4", "c4"),
        (f"{folder / 'b.parquet'}:0", "c5"),
        (f"{folder / 'b.parquet'}:1", "c6"),
    ]
    assert [r.caption for r in source] == [f"c{i}" for i in range(8)]


def test_parquet_struct_and_path_columns(tmp_path):
    write_image(tmp_path / "imgs/on_disk.png", size=(11, 13))
    struct = pa.array(
        [
            {"bytes": image_bytes((7, 5)), "path": "ignored.png"},
            {"bytes": None, "path": "imgs/on_disk.png"},  # relative to the parquet file's folder
            None,
        ],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": struct, "caption": ["s0", "s1", "s2"]}), tmp_path / "struct.parquet")
    totals = write_shards(
        tmp_path / "struct.parquet",
        tmp_path / "o1",
        resize_mode="no",
        encode_format="png",
        workers=1,
        progress=False,
    )
    assert totals["failures"] == {"missing_image": 1}
    assert [(r[0], r[1]) for r in shard_rows(tmp_path / "o1")] == [(b"s0", (7, 5)), (b"s1", (11, 13))]

    (tmp_path / "p").mkdir()
    write_image(tmp_path / "p/a.png", size=(6, 9))
    paths = pa.table({"file_name": ["a.png", "missing.png"], "sentence": ["p0", "p1"], "label": [3, 4]})
    pq.write_table(paths, tmp_path / "p/paths.parquet")
    source = open_input(tmp_path / "p/paths.parquet")
    assert (source.spec.image_column, source.spec.image_kind, source.spec.text_column) == (
        "file_name",
        "path",
        "sentence",
    )
    totals = write_shards(
        source, tmp_path / "o2", resize_mode="no", encode_format="png", workers=1, progress=False
    )
    assert totals["failures"] == {"missing_image": 1}
    [(txt, size, meta)] = shard_rows(tmp_path / "o2")
    assert (txt, size, meta["source"], meta["extra"]) == (
        b"p0",
        (6, 9),
        f"{tmp_path / 'p/paths.parquet'}:0",
        {"label": 3},
    )


def test_parquet_caption_problems(tmp_path):
    images = [image_bytes((5, 5), i) for i in range(4)]
    texts = pa.array([b"ok", b"caf\xe9", None, b""], pa.binary())  # a binary text column
    pq.write_table(pa.table({"image": images, "caption": texts}), tmp_path / "t.parquet")
    totals = write_shards(tmp_path / "t.parquet", tmp_path / "out", image_size=8, workers=1, progress=False)
    assert totals["successes"] == 1
    f = tmp_path / "t.parquet"
    assert failures(tmp_path / "out") == {
        f"{f}:1": "caption_not_utf8",
        f"{f}:2": "missing_caption",
        f"{f}:3": "empty_caption",
    }
    assert [r[0] for r in shard_rows(tmp_path / "out")] == [b"ok"]


def test_column_detection_errors(tmp_path):
    two_images = pa.table({"a": [b"x"], "b": [b"y"], "caption": ["c"]})
    pq.write_table(two_images, tmp_path / "two.parquet")
    with pytest.raises(ConfigError, match=r"several columns could hold the image \(a, b\).*--image-column"):
        open_input(tmp_path / "two.parquet")
    assert open_input(tmp_path / "two.parquet", image_column="b").spec.image_column == "b"

    two_texts = pa.table({"image": [b"x"], "en": ["c"], "de": ["d"]})
    pq.write_table(two_texts, tmp_path / "texts.parquet")
    with pytest.raises(ConfigError, match=r"--text-column \(columns: image \(binary\), en \(string\), de"):
        open_input(tmp_path / "texts.parquet")
    assert open_input(tmp_path / "texts.parquet", text_column="de").spec.text_column == "de"
    with pytest.raises(ConfigError, match="no column 'fr'"):
        open_input(tmp_path / "texts.parquet", text_column="fr")

    pq.write_table(pa.table({"x": [1], "caption": ["c"]}), tmp_path / "none.parquet")
    with pytest.raises(ConfigError, match="no image column found"):
        open_input(tmp_path / "none.parquet")
    with pytest.raises(ConfigError, match="has type int64"):
        open_input(tmp_path / "none.parquet", image_column="x")


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets folders (written with the real library, read back with pyarrow only)


def hf_dataset(n=5, extra=False):
    datasets = pytest.importorskip("datasets")
    features = {"image": datasets.Image(), "text": datasets.Value("string")}
    data = {
        "image": [{"bytes": image_bytes(s, i), "path": None} for i, s in enumerate(SIZES[:n])],
        "text": CAPTIONS[:n],
    }
    if extra:
        features["label"] = datasets.Value("int64")
        data["label"] = list(range(n))
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def test_hf_dataset_folder(tmp_path):
    ds = hf_dataset(extra=True)
    ds.save_to_disk(str(tmp_path / "ds"))
    source = open_input(tmp_path / "ds")
    assert source.kind == "hf_dataset" and (source.spec.image_column, source.spec.image_kind) == (
        "image",
        "struct",
    )
    totals = write_shards(
        source,
        tmp_path / "out",
        shard_size=2,
        resize_mode="no",
        encode_format="png",
        workers=1,
        progress=False,
    )
    assert totals == {**totals, "samples": 5, "successes": 5, "failed": 0, "shards": 3}
    rows = shard_rows(tmp_path / "out")
    assert [r[0] for r in rows] == [c.encode() for c in ds["text"]]
    assert [r[1] for r in rows] == SIZES
    assert [r[2]["source"] for r in rows] == [f"hf:{i}" for i in range(5)]
    assert [r[2]["extra"] for r in rows] == [{"label": i} for i in range(5)]


def test_hf_dataset_dict_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = hf_dataset()
    datasets.DatasetDict({"train": ds.select([0, 1, 2]), "test": ds.select([3, 4])}).save_to_disk(
        str(tmp_path / "dd")
    )
    write_shards(tmp_path / "dd", tmp_path / "train", resize_mode="no", workers=1, progress=False)
    write_shards(
        tmp_path / "dd", tmp_path / "test", split="test", resize_mode="no", workers=1, progress=False
    )
    assert [(r[0].decode(), r[1]) for r in shard_rows(tmp_path / "train")] == list(
        zip(CAPTIONS[:3], SIZES[:3])
    )
    assert [(r[0].decode(), r[1]) for r in shard_rows(tmp_path / "test")] == list(
        zip(CAPTIONS[3:], SIZES[3:])
    )
    with pytest.raises(ConfigError, match=r"no split 'validation'; its splits: \['train', 'test'\]"):
        open_input(tmp_path / "dd", split="validation")


def test_hf_dataset_binary_and_path_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_image(tmp_path / "files/x.png", size=(9, 4))
    features = datasets.Features({"png": datasets.Value("binary"), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"png": [image_bytes((3, 8))], "caption": ["bin"]}, features=features
    ).save_to_disk(str(tmp_path / "bin"))
    assert open_input(tmp_path / "bin").spec.image_kind == "binary"
    paths = datasets.Dataset.from_dict({"image_path": [str(tmp_path / "files/x.png")], "caption": ["path"]})
    paths.save_to_disk(str(tmp_path / "paths"))
    source = open_input(tmp_path / "paths")
    assert (source.spec.image_column, source.spec.image_kind) == ("image_path", "path")
    write_shards(source, tmp_path / "out", resize_mode="no", workers=1, progress=False)
    assert [(r[0], r[1]) for r in shard_rows(tmp_path / "out")] == [(b"path", (9, 4))]
