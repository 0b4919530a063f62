"""Flow-matching text-to-image training end to end: the recipe shrunk to a few steps (a CLIP stage, then the
flow model conditioned on its frozen text tower), the moving average of the weights, samples, and the folder
loading back and sampling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.convert import load_pretrained
from vlmkit.errors import ConfigError
from vlmkit.models.flow import FlowModel
from vlmkit.recipes import get_recipe, smoke
from vlmkit.train import train
from vlmkit.train.config import configure
from vlmkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    data = tmp_path_factory.mktemp("shapes") / "shapes"
    cfg = configure(smoke(get_recipe("flow-tiny-shapes")), {"synthetic_data": str(data), "out": str(out)})
    return out, train(cfg), data


def test_the_flow_stage_trains_on_the_clip_stages_frozen_text_tower(run):
    out, summary, _ = run
    assert set(summary["stages"]) == {"clip", "flow"} and summary["step"] == 3
    clip = load_file(str(out / "stage1-clip" / "model.safetensors"))
    flow = load_file(str(out / "model.safetensors"))
    text = [k for k in flow if k.startswith("text.")]
    assert text
    for k in text:  # the CLIP's text tower, unchanged by training
        assert torch.equal(flow[k], clip[k]), k
    assert (out / "tokenizer.json").read_text() == (out / "stage1-clip" / "tokenizer.json").read_text()
    assert (out / "eval" / "samples.png").is_file()
    assert "val/flow_loss" in summary and "val/flow_loss_ema" in summary


def test_the_moving_average_follows_the_weights(run):
    out, _, data = run
    w = load_file(str(out / "model.safetensors"))
    assert int(w["ema.n_averaged"]) == 3  # one update per optimizer step
    decay = load_pretrained(out).model.cfg.ema_decay
    trained = [k for k in w if k.startswith("net.") and k.endswith("weight")]
    differs = [k for k in trained if not torch.equal(w[k], w["ema.module." + k[4:]])]
    assert differs  # averaged weights lag the trained ones
    assert 0 < decay < 1


def test_the_folder_loads_and_samples_the_same_images_from_a_seed(run):
    out, _, data = run
    pt = load_pretrained(out)
    assert isinstance(pt.model, FlowModel)
    ids = pt.tokenizer(["a red circle", "a blue square"])
    a = pt.model.sample(ids, steps=4, generator=torch.Generator().manual_seed(3))
    b = pt.model.sample(ids, steps=4, generator=torch.Generator().manual_seed(3))
    S = pt.model.cfg.image_size
    assert a.shape == (2, 3, S, S) and torch.equal(a, b)


def test_the_flow_task_needs_a_clip_folder(tmp_path, run):
    out, _, data = run
    cfg = configure(
        smoke(get_recipe("flow-tiny-shapes")),
        {"stages": [], "out": str(tmp_path / "x"), "train_data": str(out / "none.jsonl")},
    )
    with pytest.raises(ConfigError, match="text_init_from"):
        Trainer(cfg).setup()
    with pytest.raises(ConfigError, match="not a CLIP"):
        Trainer(configure(cfg, {"text_init_from": str(out)})).setup()


def test_the_one_stage_recipe_trains_on_a_given_clip(run, tmp_path):
    out, _, data = run
    cfg = configure(
        smoke(get_recipe("flow-tiny")),
        {
            "train_data": str(data / "train.jsonl"),
            "text_init_from": str(out / "stage1-clip"),
            "out": str(tmp_path / "f"),
        },
    )
    summary = train(cfg)
    assert summary["step"] == 3 and (tmp_path / "f" / "model.safetensors").is_file()


def test_text_init_from_is_for_flow_models_only(run, tmp_path):
    out, _, data = run
    cfg = configure(
        smoke(get_recipe("clip-tiny")),
        {
            "train_data": str(data / "train.jsonl"),
            "text_init_from": str(out / "stage1-clip"),
            "out": str(tmp_path / "c"),
        },
    )
    with pytest.raises(ConfigError, match="text_init_from is for flow models"):
        Trainer(cfg).setup()
