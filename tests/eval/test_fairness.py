"""Fairness metrics against hand computations: skew with its 1/k floor, NDKL with its log2 discount, accuracy by
group, parity differences (fairlearn against a count by hand), leakage and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmkit.errors import ConfigError
from vlmkit.eval.fairness import (
    bootstrap,
    group_accuracy,
    leakage_probe,
    ndkl,
    parity_differences,
    parity_fast,
    retrieval_skew,
    skew_at_k,
    target_distribution,
)

UNIFORM = {"cool": 0.5, "warm": 0.5}


def test_skew_by_hand_and_the_zero_share_floor():
    s = skew_at_k(["warm", "warm", "warm", "cool", "cool"], 4, UNIFORM)
    assert s["warm"] == pytest.approx(math.log(0.75 / 0.5)) and s["cool"] == pytest.approx(
        math.log(0.25 / 0.5)
    )
    s = skew_at_k(["warm"] * 4 + ["cool"], 4, UNIFORM)  # no cool image in the top 4: its share counts as 1/4
    assert s["cool"] == pytest.approx(math.log(0.25 / 0.5)) and s["warm"] == pytest.approx(math.log(2.0))


def test_proportional_max_skew_at_k_equal_to_the_gallery_is_always_zero():
    """Why k is required: over the whole ranking every share equals the gallery's, whatever the order."""
    values = ["warm"] * 7 + ["cool"] * 3
    target = target_distribution(values, "proportional")
    assert target == {"cool": 0.3, "warm": 0.7}
    assert max(skew_at_k(values, 10, target).values()) == pytest.approx(0.0)
    assert max(skew_at_k(values, 5, target).values()) > 0.3  # the top 5 is all warm
    with pytest.raises(ConfigError, match=r"k must be an integer in \[1, 10\]"):
        skew_at_k(values, 11, target)
    with pytest.raises(ConfigError, match="k must be"):
        skew_at_k(values, 0, target)


def test_ndkl_by_hand():
    # top 1 = (warm): KL = ln 2, weight 1 / log2(2) = 1; top 2 = (warm, cool): KL = 0, weight 1 / log2(3)
    z = 1 + 1 / math.log2(3)
    assert ndkl(["warm", "cool", "warm"], 2, UNIFORM) == pytest.approx(math.log(2) / z)
    # three warm: KL = ln 2 at every i
    assert ndkl(["warm"] * 3, 3, UNIFORM) == pytest.approx(math.log(2))
    assert ndkl(["warm", "cool", "cool", "warm"], 4, UNIFORM) > 0


def test_retrieval_skew_ranks_by_similarity_and_averages_over_queries():
    values = ["warm", "cool", "warm", "cool"]
    sim = np.array([[0.9, 0.1, 0.8, 0.2], [0.1, 0.9, 0.3, 0.8]])  # query 0 finds warm first, query 1 cool
    r = retrieval_skew(sim, values, 2, UNIFORM)
    # each top 2 holds one value only: MaxSkew ln 2; the missing value's share is floored at 1/k = 0.5, its skew 0
    assert r["max_skew"] == pytest.approx(math.log(2)) and r["min_skew"] == pytest.approx(0.0)
    assert r["ndkl"] == pytest.approx(math.log(2))


def test_group_accuracy_by_hand():
    labels = ["a", "a", "a", "a", "b", "b"]
    preds = ["a", "a", "b", "b", "b", "a"]
    values = ["w", "w", "c", "c", "w", "c"]
    r = group_accuracy(labels, preds, values)
    assert r["per_group"] == {"a | c": 0.0, "a | w": 1.0, "b | c": 0.0, "b | w": 1.0}
    assert r["average_group_accuracy"] == 0.5 and r["worst_group_accuracy"] == 0.0 and r["gap"] == 0.5
    assert r["accuracy"] == pytest.approx(3 / 6)


def hand_parity(labels, preds, values, c):
    labels, preds, values = map(np.asarray, (labels, preds, values))
    rate, tpr, fpr = {}, {}, {}
    for v in set(values):
        m = values == v
        rate[v] = (preds[m] == c).mean()
        pos, neg = m & (labels == c), m & (labels != c)
        tpr[v] = (preds[pos] == c).mean()
        fpr[v] = (preds[neg] == c).mean()
    spread = lambda d: max(d.values()) - min(d.values())  # noqa: E731
    return spread(rate), max(spread(tpr), spread(fpr))


def test_parity_differences_match_a_count_by_hand():
    rng = np.random.default_rng(0)
    classes = ["circle", "square", "star"]
    labels = rng.choice(classes, 200)
    values = rng.choice(["warm", "cool"], 200)
    preds = np.where(rng.random(200) < 0.7, labels, rng.choice(classes, 200))
    preds = np.where((values == "warm") & (rng.random(200) < 0.3), "circle", preds)  # warm leans to circle
    r = parity_differences(labels, preds, values, classes)
    for c in classes:
        dpd, eod = hand_parity(labels, preds, values, c)
        assert r["per_class"][c]["demographic_parity_difference"] == pytest.approx(dpd)
        assert r["per_class"][c]["equalized_odds_difference"] == pytest.approx(eod)
    assert r["demographic_parity_difference"] == max(
        v["demographic_parity_difference"] for v in r["per_class"].values()
    )
    assert r["per_class"]["circle"]["demographic_parity_difference"] > 0.15
    fast = parity_fast(labels, preds, values, classes)  # the bootstrap's NumPy path agrees with fairlearn
    assert fast["demographic_parity_difference"] == pytest.approx(r["demographic_parity_difference"])
    assert fast["equalized_odds_difference"] == pytest.approx(r["equalized_odds_difference"])


def test_leakage_probe_finds_an_encoded_attribute_and_not_a_missing_one():
    rng = np.random.default_rng(1)
    values = rng.choice(["warm", "cool"], 300)
    noise = rng.standard_normal((300, 8))
    coded = noise + 3.0 * (values == "warm")[:, None]
    assert leakage_probe(coded, values)["accuracy"] > 0.95
    r = leakage_probe(noise, values)
    assert abs(r["accuracy"] - 0.5) < 0.1 and r["chance"] == pytest.approx(
        max(np.mean(values == "warm"), np.mean(values == "cool"))
    )


def test_bootstrap_interval_of_a_mean_is_near_the_normal_one():
    x = np.array([0.0, 1.0] * 200)
    r = bootstrap(lambda idx: {"mean": x[idx].mean(), "name": "not a number"}, len(x), samples=2000, seed=3)
    half = 1.96 * math.sqrt(0.25 / len(x))
    assert set(r) == {"mean"} and r["mean"]["value"] == 0.5
    assert r["mean"]["low"] == pytest.approx(0.5 - half, abs=0.01) and r["mean"]["high"] == pytest.approx(
        0.5 + half, abs=0.01
    )
    assert bootstrap(lambda idx: {"mean": x[idx].mean()}, len(x), samples=50, seed=3) == bootstrap(
        lambda idx: {"mean": x[idx].mean()}, len(x), samples=50, seed=3
    )


def test_attribute_directions_by_hand():
    """Within each label the mean of one value minus the other's, averaged over labels; label-specific offsets
    (here the labels' own axes) cancel, unevenly sized groups are weighted per label, not per sample."""
    from vlmkit.eval.fairness import attribute_directions

    f = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 2], [1, 0, 4], [0, 5, 0], [0, 5, 1]], float)
    labels = ["a", "a", "a", "a", "b", "b"]
    values = ["cool", "cool", "warm", "warm", "cool", "warm"]
    d = attribute_directions(f, labels, values, min_count=1)  # a: (0,0,3) - (0,0,0); b: (0,0,1) - (0,0,0)
    np.testing.assert_allclose(d, [[0.0, 0.0, 2.0]])
    d3 = attribute_directions(np.eye(3)[[0, 1, 2, 0, 1, 2]], list("xxxxxx"), list("pqrpqr"), min_count=1)
    np.testing.assert_allclose(d3, [[-1, 1, 0], [0, -1, 1]])  # m values -> m - 1 directions (consecutive)
    # b's groups have one sample each: by default (2 at least) a alone
    np.testing.assert_allclose(attribute_directions(f, labels, values), [[0.0, 0.0, 3.0]])
    assert attribute_directions(f, labels, values, min_count=3).shape == (0, 3)


def test_calibrated_projection_against_its_closed_form():
    from vlmkit.eval.fairness import calibrated_projection, project

    rng = np.random.default_rng(4)
    spurious = rng.standard_normal((2, 6))
    pairs = rng.standard_normal((3, 2, 6))
    P0 = calibrated_projection(spurious, pairs, lam=0.0)  # no calibration: the orthogonal projection
    closed = np.eye(6) - spurious.T @ np.linalg.inv(spurious @ spurious.T) @ spurious
    np.testing.assert_allclose(P0, closed, atol=1e-12)
    np.testing.assert_allclose(P0 @ spurious.T, 0, atol=1e-12)  # the attribute-only directions are gone
    np.testing.assert_allclose(P0 @ P0, P0, atol=1e-12)
    P = calibrated_projection(spurious, pairs, lam=1000.0)
    d = pairs[:, 0] - pairs[:, 1]
    M = d.T @ d / 3
    np.testing.assert_allclose(P, closed @ np.linalg.solve(1000.0 * M + np.eye(6), np.eye(6)), atol=1e-10)
    for diff in d:  # the calibration pulls each pair together
        assert np.linalg.norm(P @ diff) < 0.05 * np.linalg.norm(diff)
    z = project(rng.standard_normal((4, 6)), P)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0)


def test_sfid_finds_and_neutralises_the_attribute_dimension():
    from vlmkit.eval.fairness import SFID

    rng = np.random.default_rng(5)
    values = rng.choice(["warm", "cool"], 400)
    x = rng.standard_normal((400, 8))
    x[:, 3] += 4.0 * (values == "warm") - 2.0  # dimension 3 says the tint
    sfid = SFID.fit(x, values, num_dims=1)
    assert sfid.dims.tolist() == [3] and abs(sfid.values[0]) < 1.0  # the ambiguous samples sit in the middle
    assert leakage_probe(x, values)["accuracy"] > 0.95
    assert leakage_probe(sfid.apply(x), values)["accuracy"] < 0.65
