"""Reading shards: shard specs, sample counts, rank x worker splits, resampling, resume, bad input."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlmkit.data.shards import (
    SKIP_REASONS,
    ShardStream,
    SkipStats,
    StreamPosition,
    count_samples,
    decode_image_bytes,
    draft_size_for,
    expand_shards,
    is_shard_spec,
    iter_captions,
    iter_samples,
)
from vlmkit.data.transforms import ImageDecodeError, ImageTransform, PreprocessConfig, to_rgb
from vlmkit.errors import DataError

TINY = PreprocessConfig(image_size=8)


def image_bytes(rgb=(200, 30, 30), size=(12, 9), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, fmt)
    return buf.getvalue()


DEFAULT = object()


def sample(key: str, caption: str | bytes | None, image=DEFAULT, ext: str = "png", **extra) -> dict:
    """A shard sample; `caption` or `image` None leaves that member out."""
    s = {"__key__": key}
    if image is not None:
        s[ext] = image_bytes() if image is DEFAULT else image
    if caption is not None:
        s["txt"] = caption if isinstance(caption, bytes) else caption.encode("utf-8")
    s["json"] = json.dumps({"key": key, "caption": caption if isinstance(caption, str) else None}).encode()
    s.update(extra)
    return s


def write_shard(path: Path, samples: list[dict], stats: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    if stats:
        doc = {
            "shard": path.name,
            "count": len(samples),
            "successes": len(samples),
            "failed": 0,
            "failures": {},
        }
        (path.parent / f"{path.stem}_stats.json").write_text(json.dumps(doc))
    return path


def good_samples(shard: int, n: int) -> list[dict]:
    return [
        sample(f"{shard:05d}{i:02d}", f"shard {shard} sample {i}", image_bytes((shard * 20, i * 30, 99)))
        for i in range(n)
    ]


def write_shards(folder: Path, sizes: list[int]) -> list[str]:
    return [str(write_shard(folder / f"{k:05d}.tar", good_samples(k, n))) for k, n in enumerate(sizes)]


# ----------------------------------------------------------------------------------------------
# shard lists and counts


def test_expand_brace_patterns_lists_and_directories(tmp_path):
    a = write_shards(tmp_path / "a", [1, 1, 1])
    b = write_shards(tmp_path / "b", [1])
    (tmp_path / "a" / "notes.txt").write_text("not a shard")
    assert expand_shards(f"{tmp_path}/a/{{00000..00002}}.tar") == a
    assert expand_shards(f"{tmp_path}/a/{{00001..00002}}.tar::{tmp_path}/b/00000.tar") == a[1:] + b
    assert expand_shards(tmp_path / "a") == a  # a directory: its *.tar, sorted
    assert expand_shards([a[2], a[0]]) == [a[2], a[0]]
    for spec in (f"{tmp_path}/a/{{00000..00002}}.tar", f"{a[0]}::{b[0]}", str(tmp_path / "a"), a[0], a):
        assert is_shard_spec(spec), spec
    (tmp_path / "empty").mkdir()
    for spec in ("train.jsonl", "data.csv", str(tmp_path / "empty"), None, "", [], ["x.jsonl"]):
        assert not is_shard_spec(spec), spec


def test_missing_shards_and_bad_specs_are_one_line_data_errors(tmp_path):
    write_shards(tmp_path, [1, 1, 1])
    with pytest.raises(DataError, match=r"shard not found: .*00003\.tar \(2 of the 5 shards") as e:
        expand_shards(f"{tmp_path}/{{00000..00004}}.tar")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="only local shard files"):
        expand_shards("pipe:curl -s http://example.com/{0..3}.tar")
    with pytest.raises(DataError, match="unbalanced braces"):
        expand_shards(f"{tmp_path}/{{00000..00002.tar")
    with pytest.raises(DataError, match="holds no .tar shards"):
        (tmp_path / "none").mkdir()
        expand_shards(tmp_path / "none")
    with pytest.raises(DataError, match="is not a .tar shard"):
        expand_shards(f"{tmp_path}/00000.tar::{tmp_path}/00000_stats.json")


def test_count_samples_sums_stats_and_names_a_missing_stats_file(tmp_path):
    urls = write_shards(tmp_path, [3, 5, 2])
    doc = json.loads((tmp_path / "00001_stats.json").read_text())
    doc.update(count=7, successes=5, failed=2, failures={"decode_error": 2})  # failures are not in the tar
    (tmp_path / "00001_stats.json").write_text(json.dumps(doc))
    assert count_samples(urls) == 10
    assert count_samples(f"{tmp_path}/{{00000..00001}}.tar") == 8
    (tmp_path / "00002_stats.json").unlink()
    with pytest.raises(DataError, match=r"stats file not found: .*00002_stats\.json .*vlmkit data shard"):
        count_samples(urls)


def test_iter_samples_in_order_with_captions_meta_and_images(tmp_path):
    write_shard(tmp_path / "00000.tar", [sample("a0", "  first caption \n", image_bytes((10, 20, 30)))])
    rgba = Image.new("RGBA", (6, 4), (0, 0, 255, 0))  # fully transparent: composited over white
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    write_shard(tmp_path / "00001.tar", [sample("b0", "second", buf.getvalue()), sample("b1", "third")])
    got = list(iter_samples(str(tmp_path)))
    assert [(s.key, s.caption, s.image_ext) for s in got] == [
        ("a0", "first caption", "png"),
        ("b0", "second", "png"),
        ("b1", "third", "png"),
    ]
    assert got[0].meta == {"key": "a0", "caption": "  first caption \n"}
    assert got[0].shard == str(tmp_path / "00000.tar")
    assert got[0].image().getpixel((0, 0)) == (10, 20, 30)
    assert got[1].image().getpixel((0, 0)) == (255, 255, 255)
    reference = to_rgb(Image.open(io.BytesIO(buf.getvalue())))
    assert np.array_equal(np.asarray(got[1].image()), np.asarray(reference))


def test_jpeg_draft_decodes_big_images_smaller_but_never_below_twice_the_need():
    big = image_bytes(size=(1000, 1000), fmt="JPEG")
    assert decode_image_bytes(big, "big.jpg").size == (1000, 1000)
    assert decode_image_bytes(big, "big.jpg", draft_size=(224, 224)).size == (500, 500)  # >= 2 x 224
    assert decode_image_bytes(big, "big.jpg", draft_size=(300, 300)).size == (1000, 1000)  # 500 < 600
    png = image_bytes(size=(1000, 1000))
    assert decode_image_bytes(png, "big.png", draft_size=(100, 100)).size == (1000, 1000)  # JPEG only
    tf = ImageTransform(PreprocessConfig(image_size=224, crop_scale=(0.25, 1.0)), train=True)
    assert draft_size_for(tf) == (448, 448)  # a quarter-area crop still gets full detail
    assert draft_size_for(ImageTransform(PreprocessConfig(image_size=224))) == (224, 224)


def test_iter_captions_prefers_the_parquet_and_falls_back_to_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_shard(tmp_path / "00000.tar", [sample("a", "from the tar")])
    pq.write_table(
        pa.table(
            {"key": ["a", "b"], "caption": ["from parquet", "failed row"], "status": ["success", "failed"]}
        ),
        tmp_path / "00000.parquet",
    )
    write_shard(
        tmp_path / "00001.tar",
        [sample("c", " txt caption "), sample("d", b"\xff\xfe bad"), sample("e", None)],
    )
    assert list(iter_captions(str(tmp_path))) == ["from parquet", "txt caption"]


# ----------------------------------------------------------------------------------------------
# streaming: splits, resampling, resume


def _shard_of(caption: str) -> int:
    return int(caption.split()[1])


def test_rank_by_worker_split_is_disjoint_and_covers_every_shard(tmp_path):
    urls = write_shards(tmp_path, [2] * 10)
    tf = ImageTransform(TINY)
    seen: dict[tuple[int, int], set[int]] = {}
    for rank in range(2):
        stream = ShardStream(urls, tf, seed=3, rank=rank, world_size=2, track_position=True, shuffle_buffer=4)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        for _, caption, (worker, _, _) in loader:
            seen.setdefault((rank, worker), set()).add(_shard_of(caption))
        for worker in range(2):  # what each reader read is what the split says it reads
            expected = {int(Path(u).stem) for u in stream.worker_shards(worker, 2)}
            assert seen[(rank, worker)] == expected
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    shards = [s for readers in seen.values() for s in readers]
    assert sorted(shards) == list(range(10))  # disjoint and complete
    # another epoch deals the shards out differently
    again = ShardStream(urls, tf, seed=3, epoch=1, rank=0, world_size=2)
    assert again.rank_shards() != ShardStream(urls, tf, seed=3, epoch=0, rank=0, world_size=2).rank_shards()
    with pytest.raises(DataError, match="3 shards for 4 processes"):
        ShardStream(urls[:3], tf, rank=0, world_size=4)


def test_repeat_cycles_over_the_readers_own_shards(tmp_path):
    urls = write_shards(tmp_path, [3] * 4)
    stream = ShardStream(urls, ImageTransform(TINY), rank=1, world_size=2, repeat=True, shuffle_buffer=2)
    captions = [c for _, c in itertools.islice(iter(stream), 30)]
    own = {int(Path(u).stem) for u in stream.rank_shards()}
    assert {_shard_of(c) for c in captions} == own and len(own) == 2
    assert all(captions.count(c) == 5 for c in set(captions))  # 6 samples, each read 5 times in 30


def test_resampled_mode_is_infinite_and_seeded(tmp_path):
    urls = write_shards(tmp_path, [2, 2, 2])
    tf = ImageTransform(TINY)

    def take(n, **kw):
        return [c for _, c in itertools.islice(iter(ShardStream(urls, tf, resampled=True, **kw)), n)]

    a = take(60, seed=1)
    assert len(a) == 60  # 6 samples in all: the stream goes on
    assert a == take(60, seed=1)
    assert (
        a != take(60, seed=2)
        and a != take(60, seed=1, epoch=1)
        and a != take(60, seed=1, rank=1, world_size=2)
    )
    assert {_shard_of(c) for c in a} == {0, 1, 2}


def test_training_crops_are_seeded_and_a_resumed_stream_continues_exactly(tmp_path):
    sizes = [5, 4, 6, 3]
    urls = write_shards(tmp_path, sizes)
    # a bad sample inside shard 2: the stream's position counts it, so a resume lands on the same item
    bad = good_samples(2, 6)
    bad.insert(3, sample("0000299", b"\xff not utf-8"))
    write_shard(tmp_path / "00002.tar", bad)
    tf = ImageTransform(PreprocessConfig(image_size=8, crop_scale=(0.3, 1.0)), train=True)

    def stream(**kw):
        return ShardStream(
            urls, tf, seed=5, epoch=2, repeat=True, shuffle_buffer=5, track_position=True, **kw
        )

    def batches(s, n):
        loader = DataLoader(s, batch_size=3, num_workers=2, collate_fn=list)
        return list(itertools.islice(iter(loader), n))

    full = batches(stream(), 12)
    assert batches(stream(), 12)[5][0][0].equal(full[5][0][0])  # same crops on a second run
    k = 5  # resume after 5 batches: worker 1 produces the next one
    consumed = [0, 0]
    for batch in full[:k]:
        worker, used, _ = batch[-1][2]
        consumed[worker] = used
    rest = batches(stream(position=StreamPosition(consumed, next_worker=k % 2)), 12 - k)
    for a, b in zip(full[k:], rest):
        assert [c for _, c, _ in a] == [c for _, c, _ in b]
        for (x, _, _), (y, _, _) in zip(a, b):
            assert torch.equal(x, y)
    # the bad sample was met (and counted once) by its reader within these 12 batches
    finals = {}
    for batch in full:
        worker, _, skips = batch[-1][2]
        finals[worker] = skips
    assert sum(sum(v) for v in finals.values()) >= 1


# ----------------------------------------------------------------------------------------------
# bad input: each kind is skipped with its reason, the other samples are intact


def corrupt_jpeg() -> bytes:
    data = image_bytes((0, 200, 0), size=(64, 48), fmt="JPEG")
    return data[: len(data) // 2]  # cut inside the entropy-coded data


def _pickle_bomb(marker: Path) -> bytes:
    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling would create the marker file

    return pickle.dumps(Bomb())


BAD_SAMPLES = {
    "decode_error": lambda tmp: sample("bad", "a corrupt jpeg", corrupt_jpeg(), ext="jpg"),
    "missing_caption": lambda tmp: sample("bad", None),
    "caption_not_utf8": lambda tmp: sample("bad", b"caf\xe9 latin-1 caption"),
    "empty_caption": lambda tmp: sample("bad", " \n\t "),
    "missing_image": lambda tmp: sample("bad", "no image at all", image=None),
    "bad_row": lambda tmp: sample("bad", "broken metadata", json=b"{not json"),
}


@pytest.mark.parametrize("reason", sorted(BAD_SAMPLES))
def test_a_bad_sample_is_skipped_and_counted(tmp_path, caplog, reason):
    good = good_samples(0, 4)
    write_shard(tmp_path / "00000.tar", good[:2] + [BAD_SAMPLES[reason](tmp_path)] + good[2:])
    stats = SkipStats()
    with caplog.at_level(logging.WARNING, logger="vlmkit"):
        got = list(iter_samples(str(tmp_path), stats=stats, check_images=True))
    assert [(s.key, s.caption, s.image_bytes) for s in got] == [
        (g["__key__"], g["txt"].decode(), g["png"]) for g in good
    ]
    assert stats.as_dict() == {reason: 1}
    assert f"skipped {tmp_path / '00000.tar'}:bad: {reason}" in caplog.text


def test_decompression_bombs_are_skipped_with_a_clear_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 12 x 9 image has 108 pixels
    over = image_bytes(size=(40, 40))  # 1600 pixels: over the limit (Pillow itself only warns)
    far_over = image_bytes(size=(64, 64))  # 4096 pixels: over twice the limit (Pillow raises)
    for data in (over, far_over):
        with pytest.raises(ImageDecodeError, match=r"decompression_bomb: .*MAX_IMAGE_PIXELS"):
            decode_image_bytes(data, "x.png")
    good = good_samples(0, 3)
    write_shard(
        tmp_path / "00000.tar",
        [good[0], sample("b1", "big", over), good[1], sample("b2", "huge", far_over), good[2]],
    )
    stats = SkipStats()
    keys = [s.key for s in iter_samples(str(tmp_path), stats=stats, check_images=True)]
    assert keys == [g["__key__"] for g in good]
    assert stats.as_dict() == {"decompression_bomb": 2}
    # the training stream skips them too
    stream = ShardStream(str(tmp_path), ImageTransform(TINY), shuffle=False, track_position=True)
    items = list(stream)
    assert [c for _, c, _ in items] == [g["txt"].decode() for g in good]
    assert skip_counts(items[-1]) == {"decompression_bomb": 2}  # both come before the last good sample


def skip_counts(item) -> dict[str, int]:
    """The skip counts a tracked stream item carries."""
    return {r: n for r, n in zip(SKIP_REASONS, item[2][2]) if n}


def _truncate(path: Path, member: str, into: int) -> None:
    """Cut the tar `into` bytes into the data of `member` (0: right before its header)."""
    with tarfile.open(path) as tf:
        m = tf.getmember(member)
    cut = m.offset_data + into if into else m.offset
    with open(path, "r+b") as f:
        f.truncate(cut)


@pytest.mark.parametrize("into", [100, 0], ids=["inside-a-member", "at-a-member-boundary"])
def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path, into):
    good = good_samples(0, 5)
    path = write_shard(tmp_path / "00000.tar", good)
    write_shard(tmp_path / "00001.tar", good_samples(1, 2))
    _truncate(path, "0000003.png", into)  # TarWriter writes json, png, txt: cut inside sample 3
    stats = SkipStats()
    got = [s.key for s in iter_samples(str(tmp_path), stats=stats)]
    assert got == ["0000000", "0000001", "0000002", "0000100", "0000101"]
    assert stats.as_dict() == {"truncated_tar": 1}


def test_a_shard_that_vanishes_after_listing_is_skipped(tmp_path, caplog):
    urls = write_shards(tmp_path, [2, 2, 2])
    listed = expand_shards(str(tmp_path))
    os.remove(urls[1])
    stats = SkipStats()
    with caplog.at_level(logging.WARNING, logger="vlmkit"):
        got = [s.caption for s in iter_samples(listed, stats=stats)]
    assert got == ["shard 0 sample 0", "shard 0 sample 1", "shard 2 sample 0", "shard 2 sample 1"]
    assert stats.as_dict() == {"shard_unreadable": 1}
    assert f"skipped {urls[1]}: shard_unreadable" in caplog.text


def test_a_shard_that_is_not_a_tar_is_skipped(tmp_path):
    urls = write_shards(tmp_path, [2, 1])
    Path(urls[0]).write_bytes(b"\x00garbage" * 300)
    stats = SkipStats()
    assert [s.caption for s in iter_samples(urls, stats=stats)] == ["shard 1 sample 0"]
    assert set(stats.as_dict()) <= {"shard_unreadable", "truncated_tar"} and stats.total == 1


def test_pickled_members_are_never_loaded(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    bomb = _pickle_bomb(marker)
    good = good_samples(0, 3)
    good[1]["pyd"] = bomb  # beside a good image and caption
    good[1]["pickle"] = bomb
    only_pickle = {"__key__": "p", "pyd": bomb, "pickle": bomb}
    write_shard(tmp_path / "00000.tar", good[:2] + [only_pickle] + good[2:])
    stats = SkipStats()
    got = list(iter_samples(str(tmp_path), stats=stats, check_images=True))
    assert [s.key for s in got] == [g["__key__"] for g in good]
    assert stats.total == 0
    items = list(ShardStream(str(tmp_path), ImageTransform(TINY), shuffle=False))
    assert len(items) == 3
    assert list(iter_captions(str(tmp_path))) == [g["txt"].decode() for g in good]
    assert not marker.exists()


def test_the_stream_counts_every_kind_of_skip(tmp_path, caplog):
    bad = [BAD_SAMPLES[r](tmp_path) for r in ("decode_error", "missing_caption", "caption_not_utf8")]
    for i, b in enumerate(bad):
        b["__key__"] = f"bad{i}"
    good = good_samples(1, 2)
    urls = [
        str(write_shard(tmp_path / "00000.tar", [])),
        str(write_shard(tmp_path / "00001.tar", [good[0], *bad, good[1]])),
    ]
    os.remove(urls[0])
    stream = ShardStream(urls, ImageTransform(TINY), shuffle=False, track_position=True)
    with caplog.at_level(logging.WARNING, logger="vlmkit"):
        items = list(stream)
    assert [c for _, c, _ in items] == ["shard 1 sample 0", "shard 1 sample 1"]
    expected = {"shard_unreadable": 1, "decode_error": 1, "missing_caption": 1, "caption_not_utf8": 1}
    assert skip_counts(items[-1]) == expected
    assert [p for _, _, p in items][-1][:2] == (0, 6)  # worker 0 used 6 items: 1 shard skip + 5 samples
    assert caplog.text.count("skipped ") == 4
