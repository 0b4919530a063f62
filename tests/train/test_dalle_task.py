"""DALL-E style training end to end: the recipe shrunk to a few steps (the VQ-VAE stage, then the transformer
over its codes with the VQ-VAE frozen), each stage's samples, and the folder loading back and sampling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.convert import load_pretrained
from vlmkit.models.dalle import Dalle
from vlmkit.recipes import get_recipe, smoke
from vlmkit.train import train
from vlmkit.train.config import configure


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dalle")
    data = tmp_path_factory.mktemp("shapes") / "shapes"
    cfg = configure(smoke(get_recipe("dalle-tiny-shapes")), {"synthetic_data": str(data), "out": str(out)})
    return out, train(cfg)


def test_the_recipe_trains_the_tokenizer_then_the_transformer(run):
    out, summary = run
    assert set(summary["stages"]) == {"vqvae", "transformer"} and summary["step"] == 3
    first = load_file(str(out / "stage1-vqvae" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    vq = [k for k in final if k.startswith("vqvae.")]
    assert any(k.endswith("codebook") for k in vq)
    for k in vq:  # the second stage leaves the tokenizer (weights and codebook) as the first stage left it
        assert torch.equal(first[k], final[k]), k
    lm = [k for k in final if k.startswith("language_model.")]
    assert any(not torch.equal(first[k], final[k]) for k in lm)  # the transformer trained
    assert (out / "stage1-vqvae" / "eval" / "samples.png").is_file() and (
        out / "eval" / "samples.png"
    ).is_file()


def test_the_folder_loads_and_samples(run):
    out, _ = run
    pt = load_pretrained(out)
    assert isinstance(pt.model, Dalle) and pt.tokenizer is not None
    ids = [[pt.tokenizer.sot_token_id, *pt.tokenizer.encode("a red circle")]]
    codes = pt.model.sample(ids, temperature=1.0, top_k=8, generator=torch.Generator().manual_seed(0))
    g = pt.model.cfg.vqvae.grid
    assert codes.shape == (1, g, g) and pt.model.decode(codes).shape[-1] == pt.model.cfg.image_size
