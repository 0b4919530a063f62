"""Parameter groups (no decay on gains, biases, embeddings, logit scale) and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest

from vlmkit.models import create_model
from vlmkit.train.optim import WarmupCosine, create_optimizer


def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale():
    model = create_model("siglip-tiny", **{"text.vocab_size": 50, "vision.layers": 1, "text.layers": 1})
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.2)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    for name, p in names.items():
        expect_no_decay = (
            p.ndim < 2
            or "embedding" in name
            or name in ("logit_scale", "logit_bias")
            or name.endswith("attn_pool.query")  # the MAP head's learned query
        )
        assert decay_of[id(p)] == (0.0 if expect_no_decay else 0.2), name
    assert decay_of[id(names["text.token_embedding.weight"])] == 0.0
    assert decay_of[id(names["visual.transformer.blocks.0.attn.qkv.weight"])] == 0.2
    assert len(decay_of) == len(names)  # every parameter is optimised exactly once


def test_lr_scale_regex_freezes_and_scales():
    model = create_model("clip-tiny", **{"text.vocab_size": 50, "vision.layers": 1, "text.layers": 1})
    opt = create_optimizer(
        model, lr=1e-3, weight_decay=0.1, lr_scale={r"^visual\.": 0.0, r"^text\.proj": 0.1}
    )
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("visual."))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.text.proj.weight)] == pytest.approx(1e-4)
    assert lrs[id(model.logit_scale)] == pytest.approx(1e-3)


def test_warmup_cosine_against_the_formula():
    s = WarmupCosine(warmup=10, total=110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 110):
        expected = 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert s(step) == pytest.approx(expected)
    # A time budget that shrinks the run keeps warmup at most a fifth of it.
    s.total = 20
    assert s(3) == pytest.approx(1.0) and s(20) == pytest.approx(0.0)
