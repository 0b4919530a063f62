"""Transfer learning: init_from, freezing, LiT, per-group learning rates, LoRA (train, merge, resume),
WiSE-FT, ImageFolder -> manifest, the CLI pieces and a tiny transfer demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlmkit.cli.transfer import (
    add_transfer_args,
    register_manifest_cli,
    register_wise_ft_cli,
    transfer_overrides,
)
from vlmkit.convert import load_pretrained
from vlmkit.data.manifest import read_manifest
from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.models import CLIP, create_model
from vlmkit.models.pretrained import save_pretrained
from vlmkit.recipes import get_recipe, smoke
from vlmkit.train import TrainConfig, Trainer, train
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.config import configure
from vlmkit.train.transfer import LORA_FILE, imagefolder_to_manifest, prepare_model, wise_ft

TEMPLATES = ["a {}.", "there is a {}."]


def tiny_cfg(train_data: Path, out: Path, **kw) -> TrainConfig:
    cfg = smoke(get_recipe("clip-tiny", train_data=str(train_data), out=str(out)))
    return configure(cfg, {"precision": "fp32", "eval_every": 0, "save_every": 0, **kw})


def inputs(run: Path):
    """A fixed batch: images and tokenised captions for the run's model."""
    g = torch.Generator().manual_seed(0)
    tok = load_pretrained(run).tokenizer
    return torch.randn(4, 3, 32, 32, generator=g), tok(["a red circle", "two blue stars", "a star", "x"])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def source(shapes_dir, tmp_path_factory) -> Path:
    """A "pretrained" run: the model every fine-tune here starts from."""
    out = tmp_path_factory.mktemp("source") / "run"
    train(tiny_cfg(shapes_dir / "train.jsonl", out, max_steps=2))
    return out


@pytest.fixture(scope="module")
def fewshot(shapes_dir, tmp_path_factory) -> Path:
    """The classification split as captions ("finetune like you pretrain")."""
    out = tmp_path_factory.mktemp("fewshot") / "fewshot.jsonl"
    return imagefolder_to_manifest(shapes_dir / "classification" / "train", TEMPLATES, out)


class Spy:
    """A trainer callback that records, after every step, what the test asks for."""

    def __init__(self, fn):
        self.fn, self.seen = fn, {}

    def __call__(self, trainer):
        self.seen[trainer.step] = self.fn(trainer)


def optimizer_names(trainer) -> dict[str, dict]:
    """name -> its optimizer group (lr_scale, initial_lr), for every parameter the optimizer holds."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: {k: g[k] for k in ("lr_scale", "initial_lr")} for g in trainer.optimizer.param_groups for p in g["params"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------- init_from


def test_init_from_starts_from_the_exact_weights_tokenizer_and_preprocessing(shapes_dir, source, tmp_path):
    src = load_pretrained(source)
    cfg = tiny_cfg(
        shapes_dir / "train.jsonl",
        tmp_path / "ft",
        init_from=str(source),
        model_overrides={"vision.layers": 3},  # ignored: the architecture is the source's
        mean=(0.5, 0.5, 0.5),  # ignored too: preprocessing is the source's
        crop_scale=(0.8, 1.0),  # a training augmentation: this run's
    )
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.model_cfg == src.model.cfg and len(trainer.model.visual.transformer.blocks) == 1
    mine, theirs = trainer.model.state_dict(), src.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    images, tokens = inputs(source)
    trainer.model.eval()
    a, b = trainer.model(images, tokens), src.model(images, tokens)
    assert torch.equal(a.image_features, b.image_features) and torch.equal(a.text_features, b.text_features)
    # the tokenizer is the source's, not retrained on this run's captions
    assert not (tmp_path / "ft" / "tokenizer.json").exists()
    assert torch.equal(trainer.tokenizer(["a purple diamond"]), src.tokenizer(["a purple diamond"]))
    assert trainer.preprocess.mean == src.preprocess.mean != (0.5, 0.5, 0.5)
    assert trainer.preprocess.crop_scale == (0.8, 1.0)


def test_init_from_a_hugging_face_folder(shapes_dir, source, tmp_path):
    from vlmkit.convert.clip import save_hf
    from vlmkit.data.transforms import PreprocessConfig

    tok = load_pretrained(source).tokenizer
    small = {
        "vision.image_size": 32,
        "vision.layers": 1,
        "text.layers": 1,
        "vision.width": 64,
        "text.width": 64,
    }
    small |= {"vision.heads": 2, "text.heads": 2, "embed_dim": 32, "text.context_length": 16}
    model = create_model("clip-tiny", **small, **{"text.vocab_size": tok.vocab_size})
    save_hf(model, tmp_path / "hf", tok, PreprocessConfig(image_size=32))
    hf = load_pretrained(tmp_path / "hf")
    trainer = Trainer(tiny_cfg(shapes_dir / "train.jsonl", tmp_path / "ft", init_from=str(tmp_path / "hf")))
    trainer.setup()
    mine, theirs = trainer.model.state_dict(), hf.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert trainer.preprocess.resize_then_crop  # the Hugging Face image processor's way, kept


# ---------------------------------------------------------------------------------------------- what trains


def test_freeze_regexes_and_lr_scales_with_init_from(shapes_dir, source, tmp_path):
    frozen = (r"^text\.transformer\.blocks\.0\.", r"^logit_scale$")
    cfg = tiny_cfg(
        shapes_dir / "train.jsonl",
        tmp_path / "ft",
        init_from=str(source),
        freeze=list(frozen),
        lr_scale={r"^visual\.": 0.1},
        lr=1e-2,
        max_steps=3,
    )
    spy = Spy(optimizer_names)
    train(cfg, callbacks=[spy])
    before, after = weights(source), weights(tmp_path / "ft")
    is_frozen = lambda name: name.startswith("text.transformer.blocks.0.") or name == "logit_scale"
    for name in before:
        if is_frozen(name):
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["text.proj.weight"], after["text.proj.weight"])
    assert not torch.equal(before["visual.proj.weight"], after["visual.proj.weight"])
    groups = spy.seen[1]
    assert not any(is_frozen(n) for n in groups)
    assert set(groups) == {n for n in before if not is_frozen(n)}  # everything else, once
    for name, g in groups.items():
        scale = 0.1 if name.startswith("visual.") else 1.0
        assert g["lr_scale"] == scale and g["initial_lr"] == pytest.approx(1e-2 * scale), name


def test_lit_keeps_the_image_tower_identical_and_in_eval_mode(shapes_dir, source, fewshot, tmp_path):
    cfg = tiny_cfg(
        fewshot,  # classification images with template captions
        tmp_path / "lit",
        init_from=str(source),
        lock_image=True,
        lr=1e-2,
        max_steps=3,
        eval_every=1,  # evaluation mid-run must hand back a locked tower still in eval mode
        zeroshot_data=str(shapes_dir / "classification" / "val"),
    )
    spy = Spy(lambda t: (t.model.visual.training, t.model.text.training, set(optimizer_names(t))))
    train(cfg, callbacks=[spy])
    before, after = weights(source), weights(tmp_path / "lit")
    for name in before:
        if name.startswith("visual."):
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["text.proj.weight"], after["text.proj.weight"])
    for step, (visual_training, text_training, names) in spy.seen.items():
        assert not visual_training and text_training, step
        assert names and not any(n.startswith("visual.") for n in names)


# ---------------------------------------------------------------------------------------------- LoRA


def lora_cfg(shapes_dir: Path, out: Path, init_from: Path, **kw) -> TrainConfig:
    return tiny_cfg(
        shapes_dir / "train.jsonl",
        out,
        init_from=str(init_from),
        lora_rank=4,
        lora_alpha=8.0,
        lr=1e-2,
        max_steps=4,
        save_every=2,
        keep_last=3,
        **kw,
    )


def _snapshot(trainer, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    model = trainer.model
    with torch.no_grad():
        out = model(images, tokens)
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "features": (out.image_features.clone(), out.text_features.clone()),
        "optimizer": set(optimizer_names(trainer)),
    }


@pytest.fixture(scope="module")
def lora_run(shapes_dir, source, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    images, tokens = inputs(source)
    spy = Spy(lambda t: _snapshot(t, images, tokens) if t.step == 4 else None)
    train(lora_cfg(shapes_dir, root / "run", source), callbacks=[spy])
    return root / "run", spy.seen[4]


def test_lora_trains_only_the_adapters(source, lora_run):
    run, last = lora_run
    before, state = weights(source), last["state"]
    lora_keys = [k for k in state if ".lora_" in k]
    assert last["optimizer"] == {k for k in lora_keys}  # nothing else is optimised
    assert len(lora_keys) == 2 * 4 * 2  # (A, B) x (qkv, proj, fc1, fc2) x one block in each tower
    for key, value in state.items():
        if ".lora_" in key:
            continue
        base = key.replace(".parametrizations.weight.original", ".weight")
        assert torch.equal(value, before[base]), key  # base weights bit-identical before merging
    assert all(state[k].abs().sum() > 0 for k in lora_keys if k.endswith("lora_B"))  # B left zero: it moved


def test_lora_is_merged_into_plain_weights_on_save(source, lora_run):
    run, last = lora_run
    merged = load_pretrained(run)  # an ordinary model folder
    assert set(weights(run)) == set(weights(source))
    images, tokens = inputs(source)
    with torch.no_grad():
        out = merged.model(images, tokens)
    torch.testing.assert_close(out.image_features, last["features"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_features, last["features"][1], rtol=1e-5, atol=1e-5)
    src = load_pretrained(source).model
    with torch.no_grad():
        assert not torch.allclose(src(images, tokens).text_features, out.text_features, atol=1e-3)
    # every checkpoint is a loadable merged model too, with the adapters beside it for --resume
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]
    for ckpt in ckpts:
        assert set(weights(ckpt)) == set(weights(source)) and (ckpt / LORA_FILE).is_file()
        load_pretrained(ckpt)
    final, last_ckpt = weights(run), weights(ckpts[-1])
    assert all(torch.equal(final[k], last_ckpt[k]) for k in final)


def test_lora_resume_is_exact(shapes_dir, source, lora_run, tmp_path):
    full, _ = lora_run
    base = tmp_path / "base"
    shutil.copytree(source, base)  # its own copy of the base model: altered below

    def interrupt(trainer):
        if trainer.step == 2:
            trainer.request_stop("test interruption")

    cfg = lora_cfg(shapes_dir, tmp_path / "part", base)
    assert train(cfg, callbacks=[interrupt])["step"] == 2
    train(configure(cfg, {"resume": True}))
    a, b = losses(full), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    wa, wb = weights(full), weights(tmp_path / "part")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)

    # A base model that changed since the checkpoint cannot give the same model: refused.
    state = weights(base)
    state["text.transformer.blocks.0.attn.qkv.weight"] += 0.01
    save_file(state, str(base / "model.safetensors"))
    with pytest.raises(VlmkitError, match=r"init_from\) changed"):
        Trainer(configure(cfg, {"resume": True})).setup()
    (list_checkpoints(tmp_path / "part")[-1] / LORA_FILE).unlink()
    with pytest.raises(VlmkitError, match=r"no lora\.safetensors"):
        Trainer(configure(cfg, {"resume": True})).setup()


# ---------------------------------------------------------------------------------------------- WiSE-FT


def test_wise_ft_is_the_float64_interpolation(source, lora_run, tmp_path):
    finetuned, _ = lora_run
    zs, ft = weights(source), weights(finetuned)
    out = wise_ft(source, finetuned, 0.3, tmp_path / "wise")
    got = weights(out)
    assert set(got) == set(ft)
    for k in ft:
        expected = (0.7 * zs[k].double() + 0.3 * ft[k].double()).float()
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-7)
    assert (out / "tokenizer.json").read_bytes() == (finetuned / "tokenizer.json").read_bytes()
    assert load_pretrained(out).preprocess == load_pretrained(finetuned).preprocess
    for alpha, endpoint in ((0.0, zs), (1.0, ft)):
        got = weights(wise_ft(source, finetuned, alpha, tmp_path / f"wise{alpha}"))
        assert all(torch.equal(got[k], endpoint[k]) for k in endpoint), alpha


def test_wise_ft_refuses_bad_alphas_mismatched_models_and_overwriting(source, lora_run, tmp_path):
    finetuned, _ = lora_run
    for alpha in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
            wise_ft(source, finetuned, alpha, tmp_path / "w")
    pt = load_pretrained(source)
    cfg = pt.model.cfg
    other = CLIP(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, width=32)))
    save_pretrained(other, tmp_path / "other", pt.tokenizer, pt.preprocess)
    with pytest.raises(ConfigError, match=r"different model configs \(vision\.width: 64 vs 32\)") as e:
        wise_ft(source, tmp_path / "other", 0.5, tmp_path / "w")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is an input model folder"):
        wise_ft(source, finetuned, 0.5, finetuned)


def test_wise_ft_cli_writes_a_folder_per_alpha_and_prints_accuracies(
    shapes_dir, source, lora_run, tmp_path, capsys
):
    finetuned, _ = lora_run
    parser = argparse.ArgumentParser()
    register_wise_ft_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["wise-ft", "--zeroshot", str(source), "--finetuned", str(finetuned), "--alpha", "0", "--alpha", "1",
         "--out", str(tmp_path / "sweep"), "--eval-data", str(shapes_dir / "classification" / "val"),
         "--device", "cpu"]
    )  # fmt: skip
    args.func(args)
    rows = json.loads((tmp_path / "sweep" / "wise_ft.json").read_text())
    assert [r["alpha"] for r in rows] == [0.0, 1.0]
    assert [Path(r["path"]).name for r in rows] == ["alpha_0.00", "alpha_1.00"]
    printed = capsys.readouterr().out
    # alpha 0 is the zero-shot model's weights, alpha 1 the fine-tuned model's: their own accuracies
    from vlmkit.train.transfer import zeroshot_accuracy

    data = shapes_dir / "classification" / "val"
    assert rows[0]["acc1"] == pytest.approx(zeroshot_accuracy(source, data)["acc1"])
    assert rows[1]["acc1"] == pytest.approx(zeroshot_accuracy(finetuned, data)["acc1"])
    for r in rows:
        assert f"{r['alpha']:>6.2f}  {r['acc1']:>6.3f}" in printed


# ---------------------------------------------------------------------------------------------- ImageFolder -> manifest


def test_imagefolder_to_manifest_captions_every_image_with_its_class(shapes_dir, tmp_path):
    folder = shapes_dir / "classification" / "train"
    a = imagefolder_to_manifest(folder, TEMPLATES, tmp_path / "sub" / "a.jsonl")
    b = imagefolder_to_manifest(folder, TEMPLATES, tmp_path / "b.jsonl")
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    images = sorted(folder.rglob("*.png"))
    assert len(rows) == len(images) == 60
    samples, bad = read_manifest(a)  # paths relative to the manifest's own folder resolve
    assert not bad and sorted(Path(s.image).resolve() for s in samples) == [p.resolve() for p in images]
    used = set()
    for row, s in zip(rows, samples):
        classname = Path(s.image).parent.name.replace("_", " ")
        assert row["class"] == classname
        assert row["caption"] in [t.replace("{}", classname) for t in TEMPLATES]
        used.add(row["caption"].replace(classname, "{}"))
    assert used == set(TEMPLATES)  # templates vary over images...
    again = imagefolder_to_manifest(folder, TEMPLATES, tmp_path / "sub" / "again.jsonl")
    assert again.read_text() == a.read_text()  # ...but deterministically
    assert [json.loads(x)["caption"] for x in b.read_text().splitlines()] == [r["caption"] for r in rows]


def test_manifest_cli_and_empty_folder(shapes_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_manifest_cli(parser.add_subparsers())
    folder = str(shapes_dir / "classification" / "val")
    args = parser.parse_args(["manifest-from-folder", "--data", folder, "--out", str(tmp_path / "m.jsonl")])
    args.func(args)
    assert "wrote 30 rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["caption"].endswith(".")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        imagefolder_to_manifest(tmp_path / "empty", None, tmp_path / "e.jsonl")


# ---------------------------------------------------------------------------------------------- flags and errors


def test_train_flags_become_config_overrides():
    parser = argparse.ArgumentParser()
    add_transfer_args(parser)
    args = parser.parse_args(
        ["--init-from", "runs/x", "--lock-image", "--freeze", "^a", "--freeze", "b$", "--lr-scale", r"^visual\.=0.1",
         "--lr-scale", "x=y=2", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "qkv$",
         "--lora-also-train", "logit_scale"]
    )  # fmt: skip
    d = transfer_overrides(args)
    assert d == {
        "init_from": "runs/x",
        "lock_image": True,
        "freeze": ["^a", "b$"],
        "lr_scale": {r"^visual\.": 0.1, "x=y": 2.0},
        "lora_rank": 4,
        "lora_alpha": 8.0,
        "lora_targets": "qkv$",
        "lora_also_train": ["logit_scale"],
    }
    cfg = configure(get_recipe("clip-tiny"), d)
    assert (
        cfg.optim.lr_scale == {r"^visual\.": 0.1, "x=y": 2.0}
        and cfg.optim.freeze == ["^a", "b$"]
        and cfg.transfer.lora_rank == 4
    )
    assert transfer_overrides(parser.parse_args([])) == {}
    with pytest.raises(ConfigError, match="REGEX=FACTOR"):
        transfer_overrides(parser.parse_args(["--lr-scale", "visual"]))
    # --set gives strings: one regex, a string factor
    cfg = configure(get_recipe("clip-tiny"), {"freeze": "^text", "lr_scale.visual": "0.5"})
    assert cfg.optim.freeze == ["^text"] and cfg.optim.lr_scale == {"visual": 0.5}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(freeze=[r"^nothing\."]), r"freeze '^nothing\\.' matches no parameter name"),
        (dict(freeze=["."]), "nothing left to train"),
        (dict(lora_rank=2, lora_targets="ln_1$"), "matches visual.transformer.blocks.0.ln_1 (LayerNorm)"),
        (dict(lora_rank=2, lora_targets=r"^visual\..*qkv$", lock_image=True), "matches only frozen layers"),
        (dict(lora_rank=2, lora_also_train=["logit_scal$"]), "lora_also_train 'logit_scal$' matches no"),
    ],
)
def test_bad_transfer_settings_give_one_clear_error(source, kwargs, message):
    model = load_pretrained(source).model
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        prepare_model(model, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(init_from="no/such/folder"), "model folder not found: no/such/folder"),
        (dict(lr_scale={r"^vision\.": 0.1}), r"lr_scale '^vision\\.' matches no parameter name"),
        (dict(init_from="SOURCE", tokenizer="tok.json"), "tokenizer and init_from are both set"),
        (dict(lora_also_train=["x"]), "lora_also_train needs lora_rank > 0"),
        (dict(lora_rank=-1), "lora_rank must be an integer >= 0"),
        (dict(lr_scale={"x": "fast"}), "lr_scale 'x': the factor must be a number >= 0"),
        (dict(lr_scale={".": 0}), "nothing left to train: every parameter is frozen"),
    ],
)
def test_bad_train_configs_fail_before_training(shapes_dir, source, tmp_path, kw, message):
    kw = {k: str(source) if v == "SOURCE" else v for k, v in kw.items()}
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        Trainer(tiny_cfg(shapes_dir / "train.jsonl", tmp_path / "run", **kw)).setup()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- the demo


def test_tiny_transfer_demo_prints_the_table(tmp_path, capsys):
    from vlmkit.demos.transfer import METHODS, format_table, transfer_demo

    data = dict(num_train=96, num_val=16, image_size=32, background_noise=0.2, num_per_class_val=2)
    data |= dict(object_weights=(5, 3, 1, 1), exclude_shapes=("star", "diamond"))
    recipe = {
        "model_overrides": {
            "vision.image_size": 32, "vision.layers": 1, "text.layers": 1, "vision.width": 64, "text.width": 64,
            "vision.heads": 2, "text.heads": 2, "embed_dim": 32,
        },
        "batch_size": 32, "max_steps": 3, "warmup_steps": 1, "eval_every": 0, "vocab_size": 300,
    }  # fmt: skip
    out = tmp_path / "demo"
    results = transfer_demo(
        out, time_budget=None, shots=2, data_args=data, recipe_overrides=recipe,
        finetune=dict(max_steps=2, warmup_steps=1), progress=False,
    )  # fmt: skip
    # the pretraining captions never name a held-out shape; the few-shot data holds only held-out classes
    captions = [json.loads(x)["caption"] for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(captions) == 96 and not any("star" in c or "diamond" in c for c in captions)
    fewshot = [json.loads(x) for x in (out / "data" / "transfer" / "fewshot.jsonl").read_text().splitlines()]
    assert len(fewshot) == 2 * 12 and all(r["class"].split()[1] in ("star", "diamond") for r in fewshot)
    rows = {r["method"]: r for r in results["rows"]}
    labels = [label for _, label in METHODS.values()]
    assert list(rows) == ["zero-shot (pretrained)", "linear probe", *labels, "WiSE-FT (alpha 0.5)"]
    assert results["num_heldout_classes"] == 12 and results["num_seen_classes"] == 18
    for r in rows.values():
        assert (r["seen"] is None) == (r["method"] == "linear probe")
    # the pretrained model's accuracy on the seen classes is what its own training run measured on them
    pretrain = json.loads((out / "pretrain" / "eval" / "zeroshot.json").read_text())["metrics"]
    assert rows["zero-shot (pretrained)"]["seen"] == pytest.approx(pretrain["acc1"])
    full, lit, lora = (rows[label]["trainable"] for label in labels)
    assert 0 < lora < lit < full
    assert json.loads((out / "transfer_demo.json").read_text())["rows"] == results["rows"]
    # each run logs to its own train.log, though all ran in this one process
    assert "init_from" not in (out / "pretrain" / "train.log").read_text()
    assert "LoRA rank" not in (out / "lit" / "train.log").read_text()
    assert "LoRA rank 8 on 8 Linears" in (out / "lora" / "train.log").read_text()
    assert (out / "transfer_demo.png").stat().st_size > 0
    assert format_table(results) in capsys.readouterr().out


def test_synthetic_exclusions_are_checked(tmp_path):
    from vlmkit.data.synthetic import generate

    with pytest.raises(ConfigError, match="exclude_shapes: unknown name 'hexagon'"):
        generate(tmp_path / "a", exclude_shapes=["hexagon"], progress=False)
    with pytest.raises(ConfigError, match="exclude_colours excludes every one"):
        generate(tmp_path / "b", exclude_colours=["red", "green", "blue", "yellow", "purple", "orange"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_imagefolder_to_manifest_leaves_out_images_that_do_not_decode(shapes_dir, tmp_path, caplog):
    folder = tmp_path / "folder"
    shutil.copytree(shapes_dir / "classification" / "val", folder)
    (folder / "red_circle" / "empty.png").write_bytes(b"")
    good = next((folder / "blue_star").glob("*.png"))
    (folder / "blue_star" / "truncated.png").write_bytes(good.read_bytes()[:60])
    with caplog.at_level("WARNING", logger="vlmkit.data"):
        path = imagefolder_to_manifest(folder, TEMPLATES, tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 30 and not any("empty" in r["image"] or "truncated" in r["image"] for r in rows)
    samples, bad = read_manifest(path)
    assert not bad
    sizes = {Image.open(s.image).convert("RGB").size for s in samples}  # every row decodes
    assert sizes == {Image.open(good).size}
    assert (
        "2 images left out" in caplog.text and "empty.png" in caplog.text and "truncated.png" in caplog.text
    )
