"""Flamingo training end to end: the recipe shrunk to a few steps (CLIP stage, then interleaved documents
with the image tower frozen), its few-shot evaluation files, and the trained folder loading back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.convert import load_pretrained
from vlmkit.data.synthetic import generate
from vlmkit.data.vqa import write_tasks
from vlmkit.models.flamingo import Flamingo
from vlmkit.recipes import get_recipe, smoke
from vlmkit.train import train
from vlmkit.train.config import configure


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=240, num_val=40, image_size=32, progress=False, num_workers=0)
    write_tasks(root, questions_per_image=1)
    out = tmp_path_factory.mktemp("flamingo")
    cfg = configure(smoke(get_recipe("flamingo-tiny-shapes")), {"synthetic_data": str(root), "out": str(out)})
    return out, train(cfg), root


def test_the_recipe_trains_with_the_image_tower_frozen(run):
    out, summary, _ = run
    assert set(summary["stages"]) == {"clip", "interleaved"} and summary["step"] == 3
    clip = load_file(str(out / "stage1-clip" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    vision = [
        k for k in final if k.startswith("vision_model.") and k.replace("vision_model.", "visual.", 1) in clip
    ]
    assert len(vision) > 10
    for k in vision:
        assert torch.equal(clip[k.replace("vision_model.", "visual.", 1)], final[k]), k
    pt = load_pretrained(out)
    assert isinstance(pt.model, Flamingo)
    assert pt.tokenizer.token_to_id("<image>") == pt.model.cfg.image_token_id
    result = json.loads((out / "eval" / "fewshot_classify.json").read_text())
    assert "0" in result["results"] and (out / "eval" / "fewshot_classify.png").is_file()


def test_the_cli_generates_and_evaluates_few_shot(run, tmp_path, capsys):
    from vlmkit.cli import main

    out, _, data = run
    images = sorted((data / "images" / "val").glob("*.png"))[:2]
    main(["generate", "--model", str(out), "--prompt", "<image>Output: a red circle<|endofchunk|><image>Output:",
          "--image", str(images[0]), "--image", str(images[1]), "--max-new-tokens", "4"])  # fmt: skip
    assert capsys.readouterr().out.endswith("\n")
    with pytest.raises(SystemExit):
        main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt",
                "<image>a<|endofchunk|><image>",
                "--image",
                str(images[0]),
            ]
        )
    assert "error: the prompt has 2 <image> placeholders but 1 --image files" in capsys.readouterr().err
    main(["eval", "fewshot", "--model", str(out), "--task", "classify", "--shots", "0", "2", "--data", str(data),
          "--limit", "4", "--out", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "classify 0 shots (random): accuracy" in printed and "classify 2 shots" in printed
    result = json.loads((tmp_path / "fewshot_classify.json").read_text())
    assert result["results"]["2"]["num_queries"] == 4 and (tmp_path / "fewshot_classify.png").is_file()


def test_the_one_stage_recipe_trains_on_document_shards(run, tmp_path, capsys):
    from vlmkit.cli import main

    _, _, data = run
    shards = tmp_path / "shards"
    main(["data", "shard-documents", "--input", str(data / "train_interleaved.jsonl"), "--out", str(shards),
          "--shard-size", "20", "--no-progress"])  # fmt: skip
    assert "documents, 0 bad lines skipped" in capsys.readouterr().out
    main(["train", "--recipe", "flamingo-tiny", "--smoke", "--train-data", f"{shards}/{{00000..00001}}.tar",
          "--out", str(tmp_path / "run")])  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["step"] == 3 and "documents: {'documents': 40" in (tmp_path / "run" / "train.log").read_text()
    )
