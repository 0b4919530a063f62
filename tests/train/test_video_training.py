"""Video recipes end to end in seconds (their smoke versions): the CLIP4Clip dual encoder and the LLaVA video
model train on moving-shapes clips, and their final evaluations write the temporal table with its controls."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("av")

from vlmkit.cli.main import main  # noqa: E402


@pytest.mark.parametrize("recipe", ["clip-video-tiny", "llava-video-tiny"])
def test_video_recipes_train_and_write_the_temporal_table(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the smoke data goes to data/moving-shapes-smoke here
    main(["train", "--recipe", recipe, "--smoke", "--out", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run" / "eval" / "temporal.json").read_text())
    table = result["metrics"]["table"]
    assert list(table) == ["model", "mean pool", "single frame", "shuffled", "reversed"]
    assert set(result["metrics"]["chance"]) == {"count", "direction", "enter_leave", "order"}
    assert all(0.0 <= v <= 1.0 for row in table.values() for v in row.values())
    assert (tmp_path / "run" / "eval" / "temporal.png").is_file()
    if recipe == "clip-video-tiny":
        retrieval = json.loads((tmp_path / "run" / "eval" / "retrieval.json").read_text())["metrics"]
        assert retrieval["num_videos"] == 8 and "video_retrieval_recall@1" in retrieval
        assert (
            json.loads((tmp_path / "run" / "eval" / "zeroshot.json").read_text())["metrics"]["num_skipped"]
            == 0
        )


def test_reversed_negatives_add_each_clip_played_backwards_with_its_reversed_caption():
    import torch

    from vlmkit.tasks.video import collate_clips

    tokenizer = lambda texts: torch.tensor([[len(t)] for t in texts])  # noqa: E731  (lengths stand in for ids)
    clips = [torch.arange(4.0).view(4, 1, 1, 1) + 10 * i for i in range(3)]
    items = [(clips[0], "a red circle moving left", "a red circle moving right"),
             (clips[1], "three shapes, one after another", ""),  # no reversed caption: nothing added
             (clips[2], "a blue star entering", "a blue star leaving")]  # fmt: skip
    x, tokens = collate_clips(tokenizer, items, reversed_negatives=True)
    assert x.shape[0] == 5 and torch.equal(x[3], clips[0].flip(0)) and torch.equal(x[4], clips[2].flip(0))
    assert tokens[:, 0].tolist() == [len(items[0][1]), len(items[1][1]), len(items[2][1]), len(items[0][2]),
                                     len(items[2][2])]  # fmt: skip
    x, _ = collate_clips(tokenizer, items, reversed_negatives=False)
    assert x.shape[0] == 3


def test_frame_features_train_only_the_pool_on_what_the_frozen_tower_gives(tmp_path, monkeypatch):
    """The recipe's video stage (towers frozen, `frame_features`): the cached embeddings are the tower's own for
    each clip, the pooled video embedding equals `encode_video` on the same frames, and only `temporal.*` moves."""
    import torch
    from safetensors.torch import load_file

    from vlmkit.convert import load_pretrained
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.data.video import VideoClips
    from vlmkit.tasks.video import FrameFeatures

    monkeypatch.chdir(tmp_path)
    main(["train", "--recipe", "clip-video-tiny", "--smoke", "--out", str(tmp_path / "run")])
    stills = load_file(str(tmp_path / "run" / "stage1-stills" / "model.safetensors"))
    video = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(stills[k], video[k]) for k in stills)  # the towers and the scale did not move
    temporal = [k for k in video if k.startswith("temporal.")]
    assert temporal and set(video) - set(stills) == set(temporal)

    pt = load_pretrained(tmp_path / "run")
    clips = VideoClips(tmp_path / "data" / "moving-shapes-smoke" / "train.jsonl",
                       ImageTransform(pt.preprocess, train=False), num_frames=8)  # fmt: skip
    cached = FrameFeatures(clips)
    cached.embed(pt.model, "cpu", bf16=False)
    frames = torch.stack([clips[i][0] for i in range(3)])  # (3, T, 3, S, S)
    with torch.no_grad():
        want = pt.model.encode_video(frames, normalize=True)
        got = pt.model.pool_frames(torch.stack([cached[i][0] for i in range(3)]), normalize=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cached[1][1:] == (clips.captions[1], clips.reversed_captions[1])
