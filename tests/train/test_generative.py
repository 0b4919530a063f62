"""Generative training end to end: both recipes shrunk to a few steps, stages, freezing, the pipeline and
the CLI on the trained folders, and the no-supervised-token error."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.convert import load_pretrained
from vlmkit.data.synthetic import generate
from vlmkit.data.vqa import write_tasks
from vlmkit.errors import ConfigError, NoSupervisedTokensError
from vlmkit.inference import VLMPipeline
from vlmkit.recipes import CLIP_STAGE, get_recipe, smoke
from vlmkit.train import train as train_generative
from vlmkit.train.config import configure, make_config
from vlmkit.train.stages import prepare_synthetic, stage_configs

SYNTH = dict(num_train=48, num_val=8, image_size=32, num_per_class_train=1, num_per_class_val=1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-vqa")
    generate(root, progress=False, num_workers=0, **SYNTH)
    write_tasks(root, questions_per_image=2)
    return root


@pytest.fixture(scope="module")
def llava_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava")
    cfg = smoke(get_recipe("llava-tiny-shapes"))
    # clip -> align (vision frozen) -> instruct (vision frozen here too, so that the final vision tower must
    # equal the CLIP stage's image tower exactly)
    clip, align, instruct = cfg.stages
    stages = [clip, align, {**instruct, "freeze": [r"^vision_tower\."], "lr_scale": {}}]
    cfg = configure(cfg, {"synthetic_data": str(shapes), "out": str(out), "stages": stages})
    summary = train_generative(cfg)
    return out, summary


def test_llava_stages_train_save_and_freeze(llava_run):
    out, summary = llava_run
    assert set(summary["stages"]) == {"clip", "align", "instruct"}
    assert summary["step"] == 3
    clip = load_file(str(out / "stage1-clip" / "model.safetensors"))
    align = load_file(str(out / "stage2-align" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    # the vision tower is the CLIP stage's image tower, untouched by the stages that froze it
    vision = [k for k in final if k.startswith("vision_tower.")]
    assert len(vision) > 10
    for k in vision:
        assert torch.equal(clip[k.replace("vision_tower.", "visual.", 1)], final[k]), k
    changed = [k for k in final if k.startswith("language_model.") and not torch.equal(align[k], final[k])]
    assert changed, "the last stage trained nothing"
    # the final evaluations ran through generation and wrote their results
    vqa = json.loads((out / "eval" / "vqa.json").read_text())
    m = vqa["metrics"]
    assert vqa["task"] == "vqa" and m["num_questions"] == 8  # the smoke recipe's final_eval_limit
    # the overall accuracy is the question-weighted mean over the question types
    by_type = sum(m["accuracy_by_type"][t] * m["num_by_type"][t] for t in m["num_by_type"])
    assert sum(m["num_by_type"].values()) == m["num_questions"]
    assert m["accuracy"] == pytest.approx(by_type / m["num_questions"])
    assert (out / "eval" / "captioning.json").is_file() and (out / "report.html").is_file()


def test_pipeline_matches_model_generate_on_trained_llava(llava_run, shapes):
    out, _ = llava_run
    vlm = VLMPipeline.from_pretrained(out)
    row = json.loads((shapes / "val_vqa.jsonl").read_text().splitlines()[0])
    image = shapes / row["image"]
    question = row["conversations"][0]["value"].split("\n", 1)[1]
    answer = vlm.answer([image], [question], max_new_tokens=6)[0]
    # the same prompt by hand: template-rendered ids, greedy through the model
    ids = vlm.prompt_ids([{"from": "human", "value": f"<image>\n{question}"}])
    new = vlm.model.generate(
        torch.tensor([ids]), vlm.pixel_values([image]), config=vlm.generation_config(max_new_tokens=6)
    )
    assert answer == vlm.decode(new[0].tolist())
    # a batch answers each row as if alone (left padding)
    rows = [json.loads(line) for line in (shapes / "val_vqa.jsonl").read_text().splitlines()[:3]]
    images = [shapes / r["image"] for r in rows]
    questions = [r["conversations"][0]["value"].split("\n", 1)[1] for r in rows]
    batch = vlm.answer(images, questions, max_new_tokens=6)
    alone = [vlm.answer([i], [q], max_new_tokens=6)[0] for i, q in zip(images, questions)]
    assert batch == alone


def test_coca_recipe_trains_and_answers(shapes, tmp_path):
    cfg = smoke(get_recipe("coca-tiny-shapes"))
    # 16 rows a batch: enough that some hold two captions or more, which the contrastive loss needs
    cfg = configure(cfg, {"synthetic_data": str(shapes), "out": str(tmp_path), "batch_size": 16})
    summary = train_generative(cfg)
    assert summary["step"] == 3
    # both of CoCa's losses are logged by name, and the trained one is their weighted sum
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    c = load_pretrained(tmp_path).model.cfg
    for r in steps:
        weighted = (
            c.caption_loss_weight * r["train/loss/caption"]
            + c.contrastive_loss_weight * r["train/loss/contrastive"]
        )
        assert r["train/loss"] == pytest.approx(weighted, rel=1e-5)
        assert r["train/loss/caption"] > 1.0  # untrained: far from 0
    # a batch with fewer than two caption rows has no contrastive loss; with more, an untrained model's is
    # far from 0
    assert any(r["train/loss/contrastive"] > 0.1 for r in steps)
    pt = load_pretrained(tmp_path)
    assert type(pt.model).__name__ == "CoCa"
    vlm = VLMPipeline(pt.model, pt.tokenizer, pt.preprocess)
    image = next((shapes / "images" / "val").glob("*.png"))
    assert isinstance(vlm.caption([image], max_new_tokens=5)[0], str)
    # the contrastive side works with vlmkit's zero-shot classifier (CLIP-framed prompts)
    feats = pt.model.encode_text(pt.tokenizer(["a red circle", "a blue star"]))
    assert feats.shape == (2, pt.model.cfg.embed_dim) and torch.isfinite(feats).all()


def test_prepare_synthetic_reuses_the_data_and_writes_missing_task_files(tmp_path):
    root = tmp_path / "shapes"
    cfg = make_config(synthetic_data=str(root), synthetic_args=SYNTH, questions_per_image=2)
    prepare_synthetic(cfg)  # writes the images and every task file
    images = sorted(p.stat().st_mtime_ns for p in (root / "images").rglob("*.png"))
    before = {p.name: p.read_bytes() for p in root.glob("*_*.jsonl")}
    (root / "train_chat.jsonl").unlink()  # a folder written before the chat files existed
    prepare_synthetic(cfg)
    assert {p.name: p.read_bytes() for p in root.glob("*_*.jsonl")} == before  # same seed, same files
    assert sorted(p.stat().st_mtime_ns for p in (root / "images").rglob("*.png")) == images  # not redrawn
    # another task setting rewrites the task files (here: more conversations per multi-object scene)
    more = configure(cfg, {"multi_object_chats": 2})
    prepare_synthetic(more)
    after = {p.name: p.read_bytes() for p in root.glob("*_*.jsonl")}
    assert {name for name in before if after[name] != before[name]} == {"train_chat.jsonl"}
    assert len(after["train_chat.jsonl"].splitlines()) > len(before["train_chat.jsonl"].splitlines())
    assert sorted(p.stat().st_mtime_ns for p in (root / "images").rglob("*.png")) == images


def test_truncated_answers_stop_training_with_a_clear_error(shapes, tmp_path):
    # max_len so short that every answer is cut off: no token is supervised
    cfg = smoke(get_recipe("llava-tiny-shapes"))
    overrides = {"synthetic_data": str(shapes), "out": str(tmp_path), "stages": [], "max_len": 12}
    cfg = configure(cfg, {**overrides, "train_data": "{data}/train_vqa.jsonl"})
    with pytest.raises(NoSupervisedTokensError, match="template"):
        train_generative(cfg)


def test_stage_configs_chain_and_reject_unknown_keys(shapes):
    cfg = get_recipe("llava-tiny-shapes", synthetic_data=str(shapes), out="runs/x")
    (n1, s1), (n2, s2), (n3, s3) = stage_configs(cfg)
    assert (n1, n2, n3) == ("clip", "align", "instruct")
    assert s1.model.name == "clip-tiny" and s1.stages == []
    assert (s1.out, s2.out, s3.out) == ("runs/x/stage1-clip", "runs/x/stage2-align", "runs/x")
    assert s2.transfer.vision_init_from == s1.out and s2.transfer.init_from is None
    assert s3.transfer.init_from == s2.out and s3.transfer.vision_init_from is None
    assert (
        s3.parallel.compile and not s2.parallel.compile and not s1.parallel.compile
    )  # only the long instruct stage compiles
    assert not any(c.parallel.compile for _, c in stage_configs(smoke(cfg)))  # compiling outlasts a smoke run
    # the clip stage keeps the 192-wide towers the recipe was measured with; a smoke run still shrinks them
    assert s1.model.overrides == {"vision.stem": "conv", **CLIP_STAGE["model_overrides"]}
    assert s1.model.overrides["vision.width"] == 192
    assert stage_configs(smoke(cfg))[0][1].model.overrides["vision.width"] == 64
    assert s2.data.train == f"{shapes}/train_captions.jsonl" and s1.data.train == f"{shapes}/train.jsonl"
    assert str(shapes) in s2.data.tokenizer_data and "train_chat" in s2.data.tokenizer_data
    with pytest.raises(ConfigError, match="unknown keys"):
        get_recipe("llava-tiny-shapes", stages=[{"name": "a", "learning_rate": 1}])
    with pytest.raises(ConfigError, match="model_overrides applies to a stage with a recipe"):
        get_recipe("llava-tiny-shapes", stages=[{"name": "a", "model_overrides": {"decoder.layers": 2}}])


def test_cli_caption_chat_and_eval(llava_run, shapes, capsys, tmp_path):
    out, _ = llava_run
    image = str(next((shapes / "images" / "val").glob("*.png")))
    main(["caption", "--model", str(out), "--image", image, "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip() != ""
    main(["chat", "--model", str(out), "--image", image, "--message", "what is it?", "--message", "and?"])
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("assistant: ") for line in lines) == 2
    main(
        ["eval", "vqa", "--model", str(out), "--data", str(shapes / "val_vqa.jsonl"), "--out", str(tmp_path)]
    )
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "vqa.json").read_text())["metrics"]
    assert printed["accuracy"] == saved["accuracy"] and (tmp_path / "report.html").is_file()


def test_cli_rejects_a_clip_model_for_captioning(tmp_path, capsys):
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model

    save_pretrained(create_model("clip-tiny", **{"vision.layers": 1, "text.layers": 1}), tmp_path)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(SystemExit) as e:
        main(["caption", "--model", str(tmp_path), "--image", str(image)])
    assert e.value.code == 2
    assert "does not generate text" in capsys.readouterr().err


def test_cli_exports_a_vlmkit_llava_that_transformers_loads(tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model

    small = {
        "vision.image_size": 32,
        "vision.layers": 2,
        "vision.width": 32,
        "vision.heads": 2,
        "decoder.width": 64,
        "decoder.layers": 2,
        "decoder.heads": 2,
        "decoder.vocab_size": 300,
        "projector": "mlp2x_gelu",
    }
    torch.manual_seed(0)
    model = create_model("llava-tiny", **small).eval()
    save_pretrained(model, tmp_path / "vlmkit")
    main(["export", "--model", str(tmp_path / "vlmkit"), "--out", str(tmp_path / "hf")])
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    n = model.num_image_tokens
    ids = torch.tensor([[1] + [model.cfg.image_token_id] * n + [7, 8, 9]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(ids, pixels).logits
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_own_data_trains_the_one_stage_recipe(shapes, tmp_path, capsys):
    data = ["--train-data", str(shapes / "train_vqa.jsonl"), "--val-data", str(shapes / "val_vqa.jsonl")]
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "llava-tiny-shapes", *data])
    assert e.value.code == 2 and "llava-tiny" in capsys.readouterr().err
    main(["train", "--recipe", "llava-tiny", "--smoke", "--out", str(tmp_path), *data])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 3
    # trained on the given file and evaluated on the given questions, not the recipe's built-in data
    run = json.loads((tmp_path / "train_config.json").read_text())["train"]
    assert run["data"]["train"] == str(shapes / "train_vqa.jsonl") and run["data"]["synthetic"] is None
    vqa = json.loads((tmp_path / "eval" / "vqa.json").read_text())
    assert vqa["dataset"] == "val_vqa" and vqa["metrics"]["num_questions"] == 8
