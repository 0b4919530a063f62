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
