"""Shard writer: layout, keys, captions, resize modes, bad inputs, worker-count independence, CLI.

Shards are read back with the `tarfile` module and Pillow only (independent of vlmkit's reader).
"""

import argparse
import io
import json
import logging
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmkit.cli.shards import register_cli
from vlmkit.data.shards import write as shard_writer
from vlmkit.data.shards.write import ShardWriter, parse_colour, resize_image, write_shards
from vlmkit.errors import ConfigError

CAPTIONS = [
    "café ☕ 日本",
    "a red square",
    "Ünïcödé — “quotes”",
    "emoji 🐱‍👤 zwj",
    "tab\tinside",
    "plain",
    "x",
]


def write_image(path, seed=0, size=(40, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return path


def write_jsonl(path, rows):
    """rows: dicts, or raw strings written as they are."""
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return path


def read_tar(path):
    """[(member name, bytes)] in archive order, with the tarfile module."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples_of(path):
    """{key: {ext: bytes}} from a shard, checking members come as image, txt, json per key."""
    members = read_tar(path)
    out = {}
    for i in range(0, len(members), 3):
        names = [n for n, _ in members[i : i + 3]]
        key = names[0].rsplit(".", 1)[0]
        assert [n.rsplit(".", 1)[1] for n in names][1:] == ["txt", "json"]
        assert all(n.rsplit(".", 1)[0] == key for n in names)
        out[key] = {n.rsplit(".", 1)[1]: data for n, data in members[i : i + 3]}
    return out


def good_manifest(tmp_path, n=7):
    rows = []
    for i in range(n):
        fmt = "PNG" if i % 2 else "JPEG"
        ext = "png" if i % 2 else "jpg"
        write_image(tmp_path / f"imgs/{i}.{ext}", seed=i, size=(30 + 7 * i, 50 - 3 * i), fmt=fmt)
        rows.append(
            {"image": f"imgs/{i}.{ext}", "caption": CAPTIONS[i % len(CAPTIONS)], "corruption": None, "n": i}
        )
    return write_jsonl(tmp_path / "m.jsonl", rows), rows


def test_round_trip_manifest(tmp_path):
    manifest, rows = good_manifest(tmp_path)
    out = tmp_path / "out"
    totals = write_shards(manifest, out, shard_size=3, image_size=16, workers=1, progress=False)
    assert totals["samples"] == totals["successes"] == 7 and totals["failed"] == 0
    assert totals["shards"] == 3 and totals["failures"] == {}
    assert sorted(p.name for p in out.iterdir()) == [
        f"{s:05d}{suffix}" for s in range(3) for suffix in (".parquet", ".tar", "_stats.json")
    ]

    seen = 0
    for shard in range(3):
        samples = samples_of(out / f"{shard:05d}.tar")
        count = min(3, 7 - 3 * shard)
        # key = 5-digit shard + index padded to len(str(shard_size - 1)) = 1 digit
        assert list(samples) == [f"{shard:05d}{i}" for i in range(count)]
        for i, (key, files) in enumerate(samples.items()):
            row = rows[3 * shard + i]
            assert files["txt"] == row["caption"].encode("utf-8")  # byte-identical, non-ASCII included
            meta = json.loads(files["json"].decode("utf-8"))
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB"
            original = Image.open(tmp_path / row["image"]).size
            short = min(original)  # keep_ratio: shorter side to 16
            expected = tuple(16 if d == short else round(d * 16 / short) for d in original)
            assert img.size == expected
            assert meta == {
                "key": key,
                "caption": row["caption"],
                "source": str(tmp_path / row["image"]),
                "width": expected[0],
                "height": expected[1],
                "original_width": original[0],
                "original_height": original[1],
                "extra": {"corruption": None, "n": row["n"]},
                "status": "success",
                "error_message": None,
            }
        stats = json.loads((out / f"{shard:05d}_stats.json").read_text())
        assert stats["shard"] == f"{shard:05d}.tar"
        assert (stats["count"], stats["successes"], stats["failed"], stats["failures"]) == (
            count,
            count,
            0,
            {},
        )
        assert stats["end_time"] >= stats["start_time"]
        table = pq.read_table(out / f"{shard:05d}.parquet").to_pylist()
        assert [r["key"] for r in table] == list(samples)
        assert [r["caption"] for r in table] == [rows[3 * shard + i]["caption"] for i in range(count)]
        assert all(r["status"] == "success" and r["error_message"] is None for r in table)
        assert [(r["width"], r["height"]) for r in table] == [
            Image.open(io.BytesIO(f["jpg"])).size for f in samples.values()
        ]
        seen += count
    assert seen == 7


def test_webdataset_reads_the_shards_raw(tmp_path):
    """The layout is what webdataset expects: one sample per key with jpg/txt/json fields."""
    wds = pytest.importorskip("webdataset")
    manifest, rows = good_manifest(tmp_path, n=4)
    write_shards(manifest, tmp_path / "out", shard_size=10, image_size=16, workers=1, progress=False)
    got = list(wds.WebDataset(str(tmp_path / "out/00000.tar"), shardshuffle=False))  # no .decode(): raw bytes
    assert [s["__key__"] for s in got] == [f"00000{i}" for i in range(4)]  # width len("9") = 1
    assert [s["txt"].decode() for s in got] == [r["caption"] for r in rows]


# ----------------------------------------------------------------------------------------------
# resizing


def three_bands(w=300, h=150):
    """Red outer 50 px columns, blue in between: a centre crop keeps only blue."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, :, 2] = 255
    a[:, :50] = a[:, w - 50 :] = (255, 0, 0)
    return Image.fromarray(a)


def test_resize_modes_hand_computed():
    img = three_bands()
    assert resize_image(img, 64, "keep_ratio").size == (128, 64)
    assert resize_image(img.transpose(Image.Transpose.ROTATE_90), 64, "keep_ratio").size == (64, 128)
    assert resize_image(img, 64, "no").size == (300, 150)

    crop = np.asarray(resize_image(img, 64, "center_crop"))
    assert crop.shape == (64, 64, 3)
    # source box [75, 225) lies inside the blue band, 25 px from the red
    assert np.abs(crop.astype(int) - [0, 0, 255]).max() <= 1
    kept = np.asarray(resize_image(img, 64, "keep_ratio"))
    assert (kept[:, 0] == [255, 0, 0]).all()  # keep_ratio keeps the red edges the crop dropped

    border = np.asarray(resize_image(img, 64, "border", pad_colour=(10, 20, 30)))
    assert border.shape == (64, 64, 3)  # 300x150 -> 64x32, pasted at row (64 - 32) // 2 = 16
    assert (border[:16] == [10, 20, 30]).all() and (border[48:] == [10, 20, 30]).all()
    assert not (border[16:48] == [10, 20, 30]).all(axis=-1).any()
    assert np.abs(border[16:48, 32].astype(int) - [0, 0, 255]).max() <= 1


def test_resize_only_if_bigger():
    small = three_bands(50, 40)
    for mode in ("keep_ratio", "center_crop", "border"):
        assert resize_image(small, 64, mode, only_if_bigger=True) is small
    assert resize_image(small, 64, "keep_ratio").size == (80, 64)  # upscaled without the flag
    big = three_bands()
    assert resize_image(big, 64, "keep_ratio", only_if_bigger=True).size == (128, 64)
    # border looks at the longer side: 60x100 is bigger than 64
    assert resize_image(three_bands(60, 100), 64, "border", only_if_bigger=True).size == (64, 64)
    assert resize_image(three_bands(60, 64), 64, "keep_ratio", only_if_bigger=True).size == (60, 64)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("keep_ratio", (128, 64)), ("center_crop", (64, 64)), ("border", (64, 64)), ("no", (300, 150))],
)
def test_resize_modes_through_shards(tmp_path, mode, expected):
    three_bands().save(tmp_path / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "bands"}])
    write_shards(
        manifest,
        tmp_path / "out",
        image_size=64,
        resize_mode=mode,
        encode_format="png",
        pad_colour="10,20,30",
        workers=1,
        progress=False,
    )
    files = samples_of(tmp_path / "out/00000.tar")["00000" + "0000"]
    img = Image.open(io.BytesIO(files["png"]))
    meta = json.loads(files["json"])
    assert img.format == "PNG" and img.size == expected
    assert (meta["width"], meta["height"]) == expected
    assert (meta["original_width"], meta["original_height"]) == (300, 150)
    if mode == "border":  # png is lossless: the padding is exactly the pad colour
        assert (np.asarray(img)[:16] == [10, 20, 30]).all()


def test_encode_formats_and_quality(tmp_path):
    write_image(tmp_path / "a.png", size=(64, 48))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "noise"}])
    sizes = {}
    for fmt, quality in (("webp", 90), ("jpg", 95), ("jpg", 30)):
        out = tmp_path / f"out-{fmt}-{quality}"
        write_shards(
            manifest, out, image_size=48, encode_format=fmt, quality=quality, workers=1, progress=False
        )
        [(name, data)] = [(n, d) for n, d in read_tar(out / "00000.tar") if not n.endswith((".txt", ".json"))]
        assert name == f"000000000.{fmt}"
        img = Image.open(io.BytesIO(data))
        assert img.format == {"webp": "WEBP", "jpg": "JPEG"}[fmt] and img.size == (64, 48)
        sizes[fmt, quality] = len(data)
    assert sizes["jpg", 30] < sizes["jpg", 95]


def test_parse_colour():
    assert parse_colour("10,20,30") == (10, 20, 30)
    assert parse_colour("#0a141e") == (10, 20, 30)
    assert parse_colour("white") == (255, 255, 255)
    for bad in ("1,2", "300,0,0", "nope"):
        with pytest.raises(ConfigError):
            parse_colour(bad)


# ----------------------------------------------------------------------------------------------
# bad inputs


def bad_suite(tmp_path):
    """A manifest mixing good rows with one of every bad kind; returns (path, expected reasons by row)."""
    # images stay under the 1000-pixel limit the tests pass as max_image_pixels
    write_image(tmp_path / "imgs/good0.jpg", seed=0, size=(24, 20), fmt="JPEG")
    write_image(tmp_path / "imgs/good1.png", seed=1, size=(24, 20))
    write_image(tmp_path / "imgs/good2.png", seed=2, size=(20, 24))
    data = (write_image(tmp_path / "imgs/full.jpg", seed=3, size=(30, 30), fmt="JPEG")).read_bytes()
    (tmp_path / "imgs/corrupt.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (tmp_path / "imgs/noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    write_image(tmp_path / "imgs/bomb_warn.png", size=(40, 40))  # 1600 px: between 1x and 2x of 1000
    write_image(tmp_path / "imgs/bomb_error.png", size=(50, 50))  # 2500 px: over 2x
    rows = [
        ({"image": "imgs/good0.jpg", "caption": "café ☕ 日本"}, None),
        ({"image": "imgs/corrupt.jpg", "caption": "cut"}, "decode_error"),
        ({"image": "imgs/noise.jpg", "caption": "random bytes"}, "decode_error"),
        ({"image": "imgs/missing.jpg", "caption": "gone"}, "missing_image"),
        ({"image": "imgs/good1.png"}, "missing_caption"),
        ({"image": "imgs/good1.png", "caption": "   "}, "empty_caption"),
        ('{"image": "imgs/good1.png", "caption": "\\ud800 lone surrogate"}', "caption_not_utf8"),
        ({"image": "imgs/bomb_warn.png", "caption": "big"}, "decompression_bomb"),
        ({"image": "imgs/bomb_error.png", "caption": "bigger"}, "decompression_bomb"),
        ('{"image": "imgs/good1.png", "caption": ', "bad_row"),
        ({"image": "imgs/good1.png", "caption": "a blue square"}, None),
        ({"image": "imgs/good2.png", "caption": "last"}, None),
    ]
    return write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in rows]), [reason for _, reason in rows]


def check_bad_suite(out, reasons, shard_size):
    table = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(table) == len(reasons)
    for i, (row, reason) in enumerate(zip(table, reasons)):
        shard, index = divmod(i, shard_size)
        assert row["key"] == f"{shard:05d}{index}"  # failed inputs take their key too
        if reason is None:
            assert row["status"] == "success" and row["error_message"] is None
        else:
            assert row["status"] == "failed" and row["error_message"].startswith(reason + ": "), row
    keys = [k for p in sorted(out.glob("*.tar")) for k in samples_of(p)]
    assert keys == [r["key"] for r, reason in zip(table, reasons) if reason is None]
    expected = {}
    for reason in filter(None, reasons):
        expected[reason] = expected.get(reason, 0) + 1
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    merged = {}
    for s in stats:
        assert s["count"] == s["successes"] + s["failed"] == s["successes"] + sum(s["failures"].values())
        for k, v in s["failures"].items():
            merged[k] = merged.get(k, 0) + v
    assert merged == expected
    return table


def test_every_bad_input_is_counted_with_its_reason(tmp_path, caplog):
    manifest, reasons = bad_suite(tmp_path)
    with caplog.at_level(logging.WARNING):
        totals = write_shards(
            manifest,
            tmp_path / "out",
            shard_size=5,
            image_size=16,
            max_image_pixels=1000,
            workers=1,
            progress=False,
        )
    assert totals["samples"] == len(reasons) and totals["successes"] == reasons.count(None) == 3
    assert totals["failures"] == {
        "bad_row": 1,
        "caption_not_utf8": 1,
        "decode_error": 2,
        "decompression_bomb": 2,
        "empty_caption": 1,
        "missing_caption": 1,
        "missing_image": 1,
    }
    table = check_bad_suite(tmp_path / "out", reasons, shard_size=5)
    assert [r["caption"] for r in table if r["status"] == "success"] == [
        "café ☕ 日本",
        "a blue square",
        "last",
    ]
    bad_row = table[reasons.index("bad_row")]
    assert f"{manifest}:10" in bad_row["error_message"] and bad_row["source"] == f"{manifest}:10"
    assert "exceeds limit" in table[reasons.index("decompression_bomb")]["error_message"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 9
    assert any("decompression_bomb" in m and "bomb_warn.png" in m for m in skipped)


def test_decompression_bomb_uses_pillow_limit(tmp_path, monkeypatch):
    """Without an explicit limit, Pillow's Image.MAX_IMAGE_PIXELS applies (and is restored afterwards)."""
    write_image(tmp_path / "small.png", size=(20, 20))
    write_image(tmp_path / "big.png", size=(40, 40))
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [{"image": "small.png", "caption": "ok"}, {"image": "big.png", "caption": "bomb"}],
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    totals = write_shards(manifest, tmp_path / "out", image_size=8, workers=1, progress=False)
    assert totals["successes"] == 1 and totals["failures"] == {"decompression_bomb": 1}
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_sidecar_caption_problems(tmp_path):
    """Image folder with sidecar captions: a missing .txt and a non-UTF-8 .txt are counted, not fatal."""
    for name in ("a", "b", "c", "d"):
        write_image(tmp_path / f"in/{name}.png", seed=ord(name))
    (tmp_path / "in/a.txt").write_bytes("ein Bär\n".encode())
    (tmp_path / "in/b.txt").write_bytes(b"caf\xe9 latin-1")  # not UTF-8
    (tmp_path / "in/d.txt").write_bytes(b"")  # empty
    totals = write_shards(tmp_path / "in", tmp_path / "out", image_size=8, workers=1, progress=False)
    assert totals["successes"] == 1
    assert totals["failures"] == {"caption_not_utf8": 1, "empty_caption": 1, "missing_caption": 1}
    rows = pq.read_table(tmp_path / "out/00000.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["success", "failed", "failed", "failed"]
    assert rows[0]["caption"] == "ein Bär"  # the sidecar's trailing newline is dropped
    assert rows[1]["error_message"].startswith("caption_not_utf8: invalid continuation byte at byte 3")
    assert rows[2]["error_message"] == "missing_caption: no caption file c.txt beside the image"
    [(_, txt)] = [(n, d) for n, d in read_tar(tmp_path / "out/00000.tar") if n.endswith(".txt")]
    assert txt == "ein Bär".encode()


# ----------------------------------------------------------------------------------------------
# parallel writing


def test_workers_1_and_2_write_identical_shards(tmp_path):
    manifest, reasons = bad_suite(tmp_path)
    kwargs = dict(shard_size=3, image_size=16, max_image_pixels=1000, progress=False)  # 4 shards
    write_shards(manifest, tmp_path / "w1", workers=1, **kwargs)
    write_shards(manifest, tmp_path / "w2", workers=2, **kwargs)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert len([n for n in names if n.endswith(".tar")]) == 4
    for name in names:
        a, b = tmp_path / "w1" / name, tmp_path / "w2" / name
        if name.endswith(".tar"):
            assert a.read_bytes() == b.read_bytes(), name
        elif name.endswith(".parquet"):
            assert pq.read_table(a).equals(pq.read_table(b)), name
        else:
            timing = ("start_time", "end_time", "duration_s")
            sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
            assert {k: v for k, v in sa.items() if k not in timing} == {
                k: v for k, v in sb.items() if k not in timing
            }
    check_bad_suite(tmp_path / "w2", reasons, shard_size=3)  # the limit reached the worker processes


# ----------------------------------------------------------------------------------------------
# ShardWriter API, atomicity, output folder


def test_shard_writer_api(tmp_path):
    with ShardWriter(tmp_path, shard_size=3, start_shard=7, key_width=4) as w:
        assert (
            w.add_success(b"img0", ".JPG", "zero", {"source": "s0", "width": 1, "extra": {"a": 1}})
            == "000070000"
        )
        w.add_failure("s1", "decode_error", "bad bytes", caption="one")
        assert w.add_success(b"img2", "png", "two", {"key": "ignored", "status": "ignored"}) == "000070002"
        assert w.add_success(b"img3", "jpg", "three", {}) == "000080000"  # the 4th input opens shard 8
    stats = w.close()  # a second close changes nothing
    assert [(s["shard"], s["count"], s["successes"], s["failures"]) for s in stats] == [
        ("00007.tar", 3, 2, {"decode_error": 1}),
        ("00008.tar", 1, 1, {}),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00007.parquet", "00007.tar", "00007_stats.json", "00008.parquet", "00008.tar", "00008_stats.json"
    ]  # fmt: skip
    members = read_tar(tmp_path / "00007.tar")
    assert [n for n, _ in members] == [f"000070000.{e}" for e in ("jpg", "txt", "json")] + [
        f"000070002.{e}" for e in ("png", "txt", "json")
    ]
    assert members[0][1] == b"img0"
    assert json.loads(members[2][1]) == {
        "key": "000070000",
        "caption": "zero",
        "source": "s0",
        "width": 1,
        "extra": {"a": 1},
        "status": "success",
        "error_message": None,
    }
    assert json.loads(members[5][1])["key"] == "000070002"
    rows = pq.read_table(tmp_path / "00007.parquet").to_pylist()
    assert rows[1] == {
        "key": "000070001",
        "caption": "one",
        "source": "s1",
        "status": "failed",
        "error_message": "decode_error: bad bytes",
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
    }
    with tarfile.open(tmp_path / "00007.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o444)}
    with pytest.raises(ConfigError):
        ShardWriter(tmp_path, shard_size=100, key_width=1)


def test_crash_leaves_no_half_shard(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "a", shard_size=10) as w:
        w.add_success(b"x", "jpg", "cap", {})
        raise RuntimeError("crash")
    assert list((tmp_path / "a").iterdir()) == []

    # a crash in the middle of write_shards: finished shards stay, the current one is not left behind
    manifest, _ = good_manifest(tmp_path, n=7)
    real, calls = shard_writer.encode_image, []

    def failing_encode(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(shard_writer, "encode_image", failing_encode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(manifest, tmp_path / "b", shard_size=3, image_size=8, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]


def test_out_folder_with_shards_needs_overwrite(tmp_path):
    manifest, _ = good_manifest(tmp_path, n=3)
    out = tmp_path / "out"
    write_shards(manifest, out, shard_size=2, image_size=8, workers=1, progress=False)
    (out / ".00005.tar.abc.tmp").write_bytes(b"left by a killed run")
    (out / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match="--overwrite"):
        write_shards(manifest, out, shard_size=2, image_size=8, workers=1, progress=False)
    totals = write_shards(
        manifest, out, shard_size=3, image_size=8, workers=1, progress=False, overwrite=True
    )
    assert totals["shards"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "notes.txt",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{"shard_size": 0}, {"workers": 0}, {"resize_mode": "squash"}, {"encode_format": "gif"}, {"quality": 0}],
)
def test_bad_options_are_config_errors(tmp_path, kwargs):
    manifest, _ = good_manifest(tmp_path, n=1)
    with pytest.raises(ConfigError):
        write_shards(manifest, tmp_path / "out", progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_through_register_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vlmkit")
    data = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="data_command")
    register_cli(data)
    manifest, _ = bad_suite(tmp_path)
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "data",
            "shard",
            "--input",
            str(manifest),
            "--out",
            str(out),
            "--shard-size",
            "4",
            "--image-size",
            "16",
        ]
        + ["--resize-mode", "center_crop", "--workers", "1", "--max-image-pixels", "1000", "--no-progress"]
    )
    totals = args.func(args)
    assert totals["shards"] == 3 and totals["successes"] == 3 and totals["samples"] == 12
    printed = capsys.readouterr().out
    assert f"wrote 3 shards to {out}" in printed and "12 samples, 3 successes, 9 failed" in printed
    assert "  decode_error: 2" in printed and "  decompression_bomb: 2" in printed
    for files in samples_of(out / "00000.tar").values():
        assert Image.open(io.BytesIO(files["jpg"])).size == (16, 16)

    help_text = data.choices["shard"].format_help()
    for option in (
        "--input", "--out", "--shard-size", "--image-size", "--resize-mode", "--resize-only-if-bigger",
        "--pad-colour", "--encode-format", "--quality", "--workers", "--image-column", "--text-column",
        "--split", "--max-image-pixels", "--overwrite",
    ):  # fmt: skip
        assert option in help_text
