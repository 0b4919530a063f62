"""Video files: frame sampling, lossless round trips, frame counts, keyframes, bad files, manifests and shards,
and the moving-shapes clips (their labels checked by a pixel tracker, reversal flipping them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

av = pytest.importorskip("av")

from vlmkit.data.synthetic_video import OPPOSITE, render_clip  # noqa: E402
from vlmkit.data.transforms import ImageTransform, PreprocessConfig  # noqa: E402
from vlmkit.data.video import (  # noqa: E402
    VideoClips,
    VideoDecodeError,
    fps_indices,
    iter_video_shards,
    probe,
    read_clip,
    read_video_manifest,
    uniform_indices,
    write_video,
    write_video_shards,
)


def _frames(n=10, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_uniform_sampling_takes_each_segments_middle_frame_and_repeats_short_videos():
    assert uniform_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert uniform_indices(16, 1) == [8]
    assert uniform_indices(3, 5) == [0, 0, 1, 2, 2]  # (i + 0.5) * 3 / 5 = 0.3, 0.9, 1.5, 2.1, 2.7
    assert uniform_indices(100, 4) == [12, 37, 62, 87]


def test_fps_sampling_follows_the_timestamps_and_thins_to_the_cap():
    times = [i / 8 for i in range(16)]  # 8 fps, 2 s
    assert fps_indices(times, 2.0, 16) == [0, 4, 8, 12]  # 0, 0.5, 1.0, 1.5 s
    assert fps_indices(times, 2.0, 2) == [4, 12]  # thinned uniformly
    uneven = [0.0, 0.1, 0.9, 1.0, 2.2]  # variable frame rate: the frame on screen at 0, 1 and 2 s
    assert fps_indices(uneven, 1.0, 10) == [0, 3]


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_lossless_round_trip_is_pixel_exact_with_stream_timestamps(tmp_path, suffix):
    frames = _frames()
    path = write_video(tmp_path / f"v{suffix}", frames, fps=8)
    clip = read_clip(path, num_frames=10)
    assert clip.indices == list(range(10)) and clip.num_frames == 10 and clip.fps == 8
    assert np.array_equal(clip.frames, frames)  # every pixel, every channel
    assert clip.timestamps == pytest.approx([i / 8 for i in range(10)])
    half = read_clip(path, num_frames=5)
    assert np.array_equal(half.frames, frames[[1, 3, 5, 7, 9]])
    by_time = read_clip(path, num_frames=10, sampling="fps", fps=4.0)
    assert by_time.indices == [0, 2, 4, 6, 8] and np.array_equal(by_time.frames, frames[::2])
    # the lossy default (libx264, yuv420p) would not be: the check above can fail
    lossy = tmp_path / "lossy.mp4"
    with av.open(str(lossy), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    assert np.abs(read_clip(lossy, 10).frames.astype(int) - frames).max() > 50


def test_frames_are_counted_by_decoding_where_the_container_does_not_say(tmp_path):
    mkv, mp4 = (
        write_video(tmp_path / "a.mkv", _frames(13), 8),
        write_video(tmp_path / "a.mp4", _frames(13), 8),
    )
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0  # Matroska does not store the count
    info = probe(mkv)
    assert (
        info.num_frames == 13
        and info.counted
        and info.codec == "ffv1"
        and info.duration == pytest.approx(13 / 8)
    )
    assert probe(mp4).num_frames == 13 and not probe(mp4).counted
    assert read_clip(mkv, 13).indices == list(range(13))


def test_keyframes_are_the_encoders_and_carry_their_timestamps(tmp_path):
    frames = _frames(20)
    path = tmp_path / "gop.mp4"
    with av.open(str(path), "w") as c:  # a keyframe every 5 frames, no scene-cut keyframes
        s = c.add_stream("libx264rgb", rate=10)
        s.width = s.height = 32
        s.pix_fmt = "rgb24"
        s.options = {"qp": "0", "g": "5", "keyint_min": "5", "sc_threshold": "0"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    assert probe(path).keyframes == [0, 5, 10, 15]
    clip = read_clip(path, num_frames=8, sampling="keyframes")
    assert clip.indices == [0, 5, 10, 15] and clip.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert np.array_equal(clip.frames, frames[[0, 5, 10, 15]])
    assert read_clip(path, num_frames=2, sampling="keyframes").indices == [5, 15]


def _bad_files(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 20)
    with av.open(str(tmp_path / "audio.mkv"), "w") as c:  # a real container with no video stream
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with av.open(str(tmp_path / "whole.mp4"), "w", options={"movflags": "faststart"}) as c:  # the index first
        s = c.add_stream("libx264rgb", rate=8)
        s.width = s.height = 32
        s.pix_fmt, s.options = "rgb24", {"qp": "0"}
        for f in _frames(12):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    whole = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(
        whole[: len(whole) // 2]
    )  # the index says 12 frames; fewer remain
    (tmp_path / "whole.mp4").unlink()
    return {"empty.mp4": "empty file", "text.mp4": "not a readable video", "audio.mkv": "no video stream",
            "truncated.mp4": "truncated: the container says 12 frames"}  # fmt: skip


def test_bad_video_files_raise_one_line_errors(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(VideoDecodeError) as e:
            read_clip(tmp_path / name, 4)
        assert e.value.reason.startswith(reason), (name, e.value.reason)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(VideoDecodeError, match="missing file"):
        read_clip(tmp_path / "nowhere.mkv")


def test_a_video_manifest_skips_and_counts_bad_rows_and_bad_files(tmp_path, caplog):
    _bad_files(tmp_path)
    write_video(tmp_path / "ok.mkv", _frames(6, seed=1), 8)
    rows = [{"video": "ok.mkv", "caption": "fine"}] + [{"video": n, "caption": "bad"} for n in
            ("empty.mp4", "text.mp4", "audio.mkv", "truncated.mp4", "missing.mkv")] + [
            {"video": "ok.mkv"}, {"video": "notes.txt", "caption": "x"}]  # fmt: skip
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, bad = read_video_manifest(tmp_path / "m.jsonl")
    assert len(good) == 4  # ok, text, audio, truncated: found on disk; decoding comes later
    assert [b.line for b in bad] == [2, 6, 7, 8]
    assert "empty file" in bad[0].reason and "missing file" in bad[1].reason
    assert "missing key 'caption'" in bad[2].reason and "not a video file extension" in bad[3].reason
    transform = ImageTransform(PreprocessConfig(image_size=16), train=False, uint8=True)
    ds = VideoClips(tmp_path / "m.jsonl", transform, num_frames=4, max_bad_fraction=1.0)
    assert len(ds) == 1 and len(ds.bad_rows) == 7 and ds.captions == ["fine"]
    x, caption, reversed_caption = ds[0]
    assert x.shape == (4, 3, 16, 16) and caption == "fine" and reversed_caption == ""
    assert sum("skipped" in r.message for r in caption_records(caplog)) == 7
    with pytest.raises(Exception, match="7 of 8 rows .* are bad"):
        VideoClips(tmp_path / "m.jsonl", transform, num_frames=4, max_bad_fraction=0.5)
    (tmp_path / "v.csv").write_text("video,caption\nok.mkv,fine\nempty.mp4,bad\n")
    good, bad = read_video_manifest(tmp_path / "v.csv")
    assert [g.caption for g in good] == ["fine"] and bad[0].line == 3


def caption_records(caplog):
    return [r for r in caplog.records if r.levelname == "WARNING"]


def test_training_crops_are_the_same_for_every_frame_of_a_clip(tmp_path):
    frames = np.repeat(_frames(1, 48), 6, axis=0)  # six identical frames
    write_video(tmp_path / "same.mkv", frames, 8)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "same.mkv", "caption": "c"}) + "\n")
    cfg = PreprocessConfig(image_size=24, crop_scale=(0.3, 0.5))
    ds = VideoClips(tmp_path / "m.jsonl", ImageTransform(cfg, train=True, uint8=True), num_frames=6)
    x = ds[0][0]
    assert all(np.array_equal(x[0], x[t]) for t in range(6))  # one crop for the clip
    ds.set_epoch(1)
    assert not np.array_equal(ds[0][0][0], x[0])  # a new crop next epoch


def test_video_shards_round_trip_the_bytes_and_count_bad_samples(tmp_path):
    for i in range(3):
        write_video(tmp_path / f"{i}.mkv", _frames(5, seed=i), 8)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"video": f"{i}.mkv", "caption": f"clip {i}", "kind": "k"})
                                              + "\n" for i in range(3)))  # fmt: skip
    samples, _ = read_video_manifest(tmp_path / "m.jsonl")
    write_video_shards(samples, tmp_path / "shards", shard_size=2)
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    back = list(iter_video_shards(spec))
    assert [s.caption for s in back] == ["clip 0", "clip 1", "clip 2"] and back[0].fields["kind"] == "k"
    assert back[2].video == (tmp_path / "2.mkv").read_bytes()
    ds = VideoClips(spec, ImageTransform(PreprocessConfig(image_size=16), uint8=True), num_frames=5)
    assert len(ds) == 3 and np.array_equal(read_clip(back[1].video, 5).frames, _frames(5, seed=1))


# ------------------------------------------------------------------------------------------ moving shapes


def _track(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (T, 2) and area (T,) of the pixels that differ from the background (a still tint)."""
    background = frames[0, 0, 0].astype(int)
    mask = np.abs(frames.astype(int) - background).sum(-1) > 60  # (T, S, S)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    area = mask.sum((1, 2))
    cx = (mask * xs).sum((1, 2)) / np.maximum(area, 1)
    cy = (mask * ys).sum((1, 2)) / np.maximum(area, 1)
    return np.stack([cx, cy], 1), area


def _direction(frames) -> str:
    centre, area = _track(frames)
    seen = area > 0
    dx, dy = centre[seen][-1] - centre[seen][0]
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def test_moving_shapes_labels_are_what_the_pixels_show_and_reversal_flips_them():
    for seed in range(12):
        rng = np.random.default_rng(seed)
        frames, meta = render_clip(rng, "direction", image_size=64, num_frames=16)
        assert _direction(frames) == meta["answer"] and _direction(frames[::-1]) == meta["reversed_answer"]
        assert meta["reversed_answer"] == OPPOSITE[meta["answer"]]
        frames, meta = render_clip(
            np.random.default_rng(100 + seed), "enter_leave", image_size=64, num_frames=16
        )
        _, area = _track(frames)
        assert (area[-1] > area[0]) == (meta["answer"] == "entering")  # more of the shape shows as it enters
        frames, meta = render_clip(np.random.default_rng(200 + seed), "order", image_size=64, num_frames=16)
        _, area = _track(frames)
        assert area[8] == 0 and area[:8].max() > 0 and area[8:].max() > 0  # the middle frame is empty
        frames, meta = render_clip(np.random.default_rng(300 + seed), "count", image_size=64, num_frames=16)
        _, area = _track(frames)
        runs = np.diff(np.concatenate([[0], (area > 0).astype(int)])) == 1  # separate appearances
        assert runs.sum() == meta["count"]


def test_direction_positions_are_symmetric_so_the_middle_frame_is_no_clue():
    """Start and end points are an unordered pair ordered by direction: the middle positions of left- and
    right-moving clips have the same distribution."""
    mids = {"left": [], "right": []}
    for seed in range(400):
        frames, meta = render_clip(np.random.default_rng(seed), "direction", 64, 16)
        if meta["answer"] in mids:
            centre, _ = _track(frames[7:9])
            mids[meta["answer"]].append(centre.mean(0)[0])
    assert abs(np.mean(mids["left"]) - np.mean(mids["right"])) < 2.5  # pixels, of a 64-px frame


def test_the_generator_writes_lossless_clips_manifests_and_a_zero_shot_folder(tmp_path):
    from vlmkit.data.synthetic_video import generate, is_current

    generate(tmp_path, num_train=8, num_val=4, num_classification=1, progress=False)
    assert is_current(tmp_path, num_train=8, num_val=4, num_classification=1)
    assert not is_current(tmp_path, num_train=9, num_val=4, num_classification=1)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows[:4]] == ["direction", "order", "enter_leave", "count"]
    frames, meta = render_clip(np.random.default_rng([0, 10, 1]), "order")
    assert meta["caption"] == rows[1]["caption"]
    assert np.array_equal(read_clip(tmp_path / rows[1]["video"], 16).frames, frames)  # pixel-exact on disk
    assert rows[1]["choice_captions"][rows[1]["choices"].index(rows[1]["answer"])] == rows[1]["caption"]
    vqa = [json.loads(line) for line in (tmp_path / "vqa" / "val.jsonl").read_text().splitlines()]
    assert vqa[0]["conversations"][0]["value"].startswith("<video>\n") and vqa[0]["type"] == "direction"
    assert [r["type"] for r in vqa] == ["direction", "order", "enter_leave", "count"]  # one question per clip
    classes = sorted(p.name for p in (tmp_path / "classification" / "val").iterdir())
    assert classes == ["entering", "leaving", "moving_down", "moving_left", "moving_right", "moving_up"]
    stills = [json.loads(line) for line in (tmp_path / "stills" / "train.jsonl").read_text().splitlines()]
    assert stills and all((tmp_path / "stills" / r["image"]).is_file() and r["caption"] for r in stills)
    assert "_frames" not in rows[0] and rows[0]["reversed_caption"].endswith(OPPOSITE[rows[0]["answer"]])


def test_more_questions_add_the_colour_and_the_last_colour(tmp_path):
    from vlmkit.data.synthetic_video import generate

    generate(tmp_path, num_train=1, num_val=4, num_classification=1, more_questions=True, progress=False)
    vqa = [json.loads(line) for line in (tmp_path / "vqa" / "val.jsonl").read_text().splitlines()]
    assert [r["type"] for r in vqa] == [
        "direction",
        "colour",
        "order",
        "order",
        "enter_leave",
        "colour",
        "count",
    ]
    first, last = vqa[2], vqa[3]
    assert "first" in first["conversations"][0]["value"] and "last" in last["conversations"][0]["value"]
    assert (last["answer"], last["reversed_answer"]) == (first["reversed_answer"], first["answer"])
    assert vqa[1]["answer"] in vqa[1]["choices"] and "reversed_answer" not in vqa[1]


def test_a_still_is_captioned_with_what_its_frame_shows():
    from vlmkit.data.synthetic_video import still_caption

    frames, meta = render_clip(np.random.default_rng(5), "direction", 64, 16)
    obj = meta["objects"][0]
    seen = []
    for t in range(16):
        caption = still_caption(meta, t, 64)
        centre, area = _track(frames[t : t + 1])
        near_a_border = np.abs(centre[0][:, None] - np.array([64 / 3, 128 / 3])).min() < 2.5
        if caption is None or near_a_border:  # cut by the edge (or empty); a third's border: a coin toss
            continue
        column = ("left", "centre", "right")[min(int(3 * centre[0, 0] / 64), 2)]
        row = ("top", "middle", "bottom")[min(int(3 * centre[0, 1] / 64), 2)]
        assert caption.startswith(f"a {obj['size']} {obj['colour']} {obj['shape']} ")
        where = {"centre": "", "left": "left", "right": "right"}[column]
        assert where in caption and (row == "middle" or row in caption)
        seen.append(caption)
    assert len(set(seen)) >= 2  # the shape moves across thirds of the frame
    frames, meta = render_clip(np.random.default_rng(7), "order", 64, 16)
    assert still_caption(meta, 8, 64) is None  # the empty middle frame
