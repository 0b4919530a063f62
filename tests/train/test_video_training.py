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
