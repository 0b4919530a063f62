"""Measures for generated images: prompts and one-attribute foils, CLIPScore and R-precision by their
definitions, reranking, KID against a brute-force float64 loop, FID against the Gaussians' closed form,
diversity and memorisation distances."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlmkit.eval.text_to_image import (
    caption,
    clip_score,
    diversity,
    fid,
    foils,
    kid,
    nearest_distance,
    r_precision,
    rerank,
    single_object_prompts,
)


def test_prompts_and_foils():
    prompts = single_object_prompts()
    assert len(prompts) == 2 * 6 * 5 * 9 and len({p["text"] for p in prompts}) == len(prompts)
    p = {"size": "large", "colour": "orange", "shape": "star", "position": "top left"}
    assert caption(p) == "a large orange star at the top left"
    assert caption({"colour": "orange", "shape": "circle"}) == "an orange circle"
    f = foils(p)
    assert len(f) == 1 + 5 + 4 + 8 and caption(p) not in f
    one_swap = {caption({**p, "colour": c}) for c in ("red", "green", "blue", "yellow", "purple")}
    one_swap |= {caption({**p, "shape": s}) for s in ("circle", "square", "triangle", "diamond")}
    assert one_swap <= set(f) and "a small orange star at the top left" in f  # nothing with two swaps
    assert not any("small" in t and "left" not in t for t in f)
    assert "a large orange star on the left" in f and "a small orange star at the top left" in f
    assert len(single_object_prompts(("colour", "shape"))) == 30


def test_clip_score_and_r_precision_by_definition():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, -1.0]])
    torch.testing.assert_close(clip_score(img, txt), torch.tensor([2.5, 0.0]))
    foil = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # image 0 wins, image 1 loses
    assert r_precision(img, txt, foil) == 0.5
    assert rerank(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [1, 3]
    assert rerank(torch.tensor([0.3]), 5).tolist() == [0]


def test_kid_is_the_unbiased_mmd_computed_by_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)), rng.normal(1.0, 1.0, size=(30, 4))
    # one subset holding every row: a plain double loop in float64
    k = lambda x, y: (x @ y / 4 + 1) ** 3  # noqa: E731
    m = 30
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    assert abs(kid(a, b, subsets=1, subset_size=30) - (xx + yy - 2 * xy)) < 1e-9
    same = kid(rng.normal(size=(400, 4)), rng.normal(size=(400, 4)))
    assert abs(same) < 0.05 < kid(a, b)


def test_fid_matches_the_gaussians_closed_form():
    rng = np.random.default_rng(0)
    n = 200_000
    a = rng.normal(0.0, 1.0, size=(n, 2))
    b = rng.normal([1.0, 2.0], [2.0, 0.5], size=(n, 2))
    # diagonal covariances: |mu|^2 + sum (s_a - s_b)^2
    expected = 1.0 + 4.0 + (1 - 2.0) ** 2 + (1 - 0.5) ** 2
    assert abs(fid(a, b) - expected) < 0.05
    assert fid(a[: n // 2], a[n // 2 :]) < 1e-3


def test_diversity_and_nearest_distance():
    same = torch.ones(4, 3)
    assert abs(diversity(same)) < 1e-6
    orthogonal = torch.eye(3)
    assert abs(diversity(orthogonal) - 1.0) < 1e-6
    train = F.normalize(torch.randn(50, 8), dim=-1)
    gen = torch.cat([train[:2] * 3, -train[2:3]])  # two copies (scaled) and one opposite
    d = nearest_distance(gen, train)
    assert d[:2].abs().max() < 1e-6
    nearest = max(float(F.cosine_similarity(gen[2], t, dim=0)) for t in train)  # by hand, row by row
    assert abs(d[2].item() - (1 - nearest)) < 1e-6 and d[2] > 0
