"""Fairness metrics: accuracy by group, parity differences, retrieval skew, attribute leakage, and bootstrap
intervals for all of them. Pure functions of labels, predictions, attributes and rankings; `vlmkit.eval.audit`
computes them for a model.

- groups are (label, attribute value) cells; the average accuracy is the plain mean over the groups present
  (not weighted by their sizes), the worst group the lowest, the gap their difference;
- demographic-parity and equalized-odds differences are fairlearn's, one-vs-rest for each class (a binary
  "is it class c?" decision), reported per class and as their maximum and mean;
- retrieval skew (Geyik et al. 2019): for a neutral query, p_k(a) is the share of the top k results with
  attribute value a and p*(a) the target share (uniform, or a's share of the gallery); Skew_a@k =
  ln(p_k(a) / p*(a)) with a zero share floored at 1/k; MaxSkew@k and MinSkew@k are the maximum and minimum over
  a. NDKL@k = (1/Z) sum_{i=1..k} KL(D_i || D*) / log2(i + 1), Z = sum_{i=1..k} 1 / log2(i + 1), D_i the
  attribute distribution of the top i (natural-log KL). k is always given: at k = the gallery size the
  proportional MaxSkew is 0 whatever the model does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vlmkit.errors import ConfigError


def require_fairlearn():
    try:
        import fairlearn.metrics as fm
    except ImportError:
        raise ConfigError(
            "the parity metrics need fairlearn: pip install 'vlmkit[fairness]' (or pip install fairlearn)"
        ) from None
    return fm


# ---------------------------------------------------------------- accuracy by group and parity


def group_key(label: str, value: str) -> str:
    return f"{label} | {value}"


def group_accuracy(labels: Sequence[str], predictions: Sequence[str], values: Sequence[str]) -> dict:
    """Accuracy per (label, value) group, their plain mean, the worst group and the gap (mean - worst)."""
    labels, predictions, values = np.asarray(labels), np.asarray(predictions), np.asarray(values)
    correct = labels == predictions
    per_group = {}
    for label in sorted(set(labels.tolist())):
        for value in sorted(set(values.tolist())):
            rows = (labels == label) & (values == value)
            if rows.any():
                per_group[group_key(label, value)] = float(correct[rows].mean())
    average = float(np.mean(list(per_group.values())))
    worst = min(per_group, key=per_group.get)
    return {
        "accuracy": float(correct.mean()),
        "average_group_accuracy": average,
        "worst_group_accuracy": per_group[worst],
        "worst_group": worst,
        "gap": average - per_group[worst],
        "per_group": per_group,
    }


def parity_differences(
    labels: Sequence[str], predictions: Sequence[str], values: Sequence[str], classes: Sequence[str]
) -> dict:
    """Demographic-parity and equalized-odds differences (fairlearn), one-vs-rest per class."""
    fm = require_fairlearn()
    labels, predictions, values = np.asarray(labels), np.asarray(predictions), np.asarray(values)
    dpd, eod = {}, {}
    for c in classes:
        y_true, y_pred = (labels == c).astype(int), (predictions == c).astype(int)
        dpd[c] = float(fm.demographic_parity_difference(y_true, y_pred, sensitive_features=values))
        eod[c] = float(fm.equalized_odds_difference(y_true, y_pred, sensitive_features=values))
    return {
        "demographic_parity_difference": max(dpd.values()),
        "demographic_parity_difference_mean": float(np.mean(list(dpd.values()))),
        "equalized_odds_difference": max(eod.values()),
        "equalized_odds_difference_mean": float(np.mean(list(eod.values()))),
        "per_class": {
            c: {"demographic_parity_difference": dpd[c], "equalized_odds_difference": eod[c]} for c in classes
        },
    }


def parity_fast(
    labels: np.ndarray, predictions: np.ndarray, values: np.ndarray, classes: Sequence[str]
) -> dict:
    """The maxima over classes of `parity_differences`, in NumPy: fairlearn's per-call overhead (about 40 ms
    a class) is too slow for a thousand bootstrap resamples; tests check the two agree."""
    names = sorted(set(values.tolist()))
    dpd, eod = [], []
    for c in classes:
        y, h = labels == c, predictions == c
        rate, tpr, fpr = [], [], []
        for v in names:
            m = values == v
            rate.append(h[m].mean())
            pos, neg = m & y, m & ~y
            if pos.any():
                tpr.append(h[pos].mean())
            if neg.any():
                fpr.append(h[neg].mean())
        dpd.append(max(rate) - min(rate))
        spread = lambda r: max(r) - min(r) if r else 0.0  # noqa: E731
        eod.append(max(spread(tpr), spread(fpr)))
    return {"demographic_parity_difference": float(max(dpd)), "equalized_odds_difference": float(max(eod))}


# ---------------------------------------------------------------- retrieval skew


def check_k(k: int, n: int) -> None:
    """k in [1, n]; never defaulted: at k = n the proportional MaxSkew is 0 whatever the ranking."""
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(
            f"--k must be an integer in [1, {n}] (the gallery size), not {k!r}; it is never defaulted: at "
            f"k = {n} the proportional MaxSkew is 0 whatever the model does"
        )


def target_distribution(values: Sequence[str], kind: str) -> dict[str, float]:
    """p*: "uniform" over the values present, or "proportional" to their shares of `values` (the gallery)."""
    names = sorted(set(values))
    if kind == "uniform":
        return {v: 1.0 / len(names) for v in names}
    if kind == "proportional":
        counts = {v: 0 for v in names}
        for v in values:
            counts[v] += 1
        return {v: counts[v] / len(values) for v in names}
    raise ConfigError(f"target must be 'uniform' or 'proportional', not {kind!r}")


def skew_at_k(ranked_values: Sequence[str], k: int, target: dict[str, float]) -> dict[str, float]:
    """Skew_a@k = ln(p_k(a) / p*(a)) for every value a of `target`; a zero share counts as 1/k."""
    check_k(k, len(ranked_values))
    top = list(ranked_values[:k])
    return {a: math.log(max(top.count(a) / k, 1.0 / k) / p) for a, p in target.items()}


def ndkl(ranked_values: Sequence[str], k: int, target: dict[str, float]) -> float:
    """Normalised discounted KL divergence of the top-i attribute distributions from `target`, i = 1..k."""
    check_k(k, len(ranked_values))
    counts = {a: 0 for a in target}
    total, z = 0.0, 0.0
    for i, value in enumerate(ranked_values[:k], start=1):
        if value in counts:
            counts[value] += 1
        kl = sum((c / i) * math.log((c / i) / target[a]) for a, c in counts.items() if c)
        weight = 1.0 / math.log2(i + 1)
        total += weight * kl
        z += weight
    return total / z


def retrieval_skew(
    similarity: np.ndarray, values: Sequence[str], k: int, target: dict[str, float]
) -> dict[str, float]:
    """Mean over queries of MaxSkew@k, MinSkew@k and NDKL@k; `similarity` (Q, N): query x gallery image."""
    values = np.asarray(values)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # (Q, k)
    max_s, min_s, nd = [], [], []
    for row in order:
        ranked = values[row].tolist()
        s = skew_at_k(ranked, k, target)
        max_s.append(max(s.values()))
        min_s.append(min(s.values()))
        nd.append(ndkl(ranked, k, target))
    return {"max_skew": float(np.mean(max_s)), "min_skew": float(np.mean(min_s)), "ndkl": float(np.mean(nd))}


# ---------------------------------------------------------------- leakage


def leakage_probe(features: np.ndarray, values: Sequence[str], seed: int = 0, folds: int = 5) -> dict:
    """How well a linear probe predicts the attribute from `features` (N, D): the cross-validated
    predictions (logistic regression, stratified folds) and chance, the majority value's share."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    values = np.asarray(values)
    names, counts = np.unique(values, return_counts=True)
    folds = int(min(folds, counts.min()))
    if len(names) < 2 or folds < 2:
        raise ConfigError("the leakage probe needs at least two attribute values with two images each")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(LogisticRegression(max_iter=2000), features, values, cv=cv)
    return {
        "predicted": predicted,
        "accuracy": float((predicted == values).mean()),
        "chance": float(counts.max() / len(values)),
    }


# ---------------------------------------------------------------- post-hoc mitigation


def calibrated_projection(spurious: np.ndarray, pairs: np.ndarray, lam: float = 1000.0) -> np.ndarray:
    """Chuang et al. 2023's debiasing projection (D, D), applied to text embeddings as z -> P z.

    `spurious` (m, D): embeddings of prompts that name only the attribute ("a picture of a warm
    background."); P0 = I - V (V^T V)^+ V^T removes their span. `pairs` (p, 2, D): embeddings of prompts that
    differ only in the attribute ("a circle on a warm background." / "... cool ..."); M = mean of
    (z_i - z_j)(z_i - z_j)^T; P = P0 (lam M + I)^-1 also pulls each pair together (the calibration).
    """
    V = np.asarray(spurious, np.float64).T  # (D, m)
    D = V.shape[0]
    P0 = np.eye(D) - V @ np.linalg.pinv(V.T @ V) @ V.T  # (D, D)
    diffs = np.asarray(pairs, np.float64)[:, 0] - np.asarray(pairs, np.float64)[:, 1]  # (p, D)
    M = diffs.T @ diffs / max(len(diffs), 1)  # (D, D)
    return P0 @ np.linalg.inv(lam * M + np.eye(D))


def attribute_directions(
    features: np.ndarray, labels: Sequence[str], values: Sequence[str], min_count: int = 2
) -> np.ndarray:
    """The attribute's directions as the embeddings show them, (m - 1, D) for m attribute values: the difference
    between the mean embeddings of consecutive values (sorted) within each label, averaged over the labels, so
    the labels' own directions stay out even where the values are unevenly spread over them. (label, value)
    groups with fewer than `min_count` samples are left out; none left -> (0, D)."""
    features = np.asarray(features, np.float64)
    labels, values = np.asarray(labels), np.asarray(values)
    names = sorted(set(values.tolist()))
    out = []
    for a, b in zip(names, names[1:], strict=False):
        diffs = [
            features[(labels == c) & (values == b)].mean(axis=0)
            - features[(labels == c) & (values == a)].mean(axis=0)
            for c in sorted(set(labels.tolist()))
            if min(((labels == c) & (values == v)).sum() for v in (a, b)) >= min_count
        ]
        if diffs:
            out.append(np.mean(diffs, axis=0))
    return np.array(out).reshape(-1, features.shape[1])


def project(features: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Rows z (N, D) -> P z, renormalised to unit length."""
    out = np.asarray(features, np.float64) @ P.T
    return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


@dataclass
class SFID:
    """Selective feature imputation (SFID): the embedding dimensions a random forest finds most predictive of
    the attribute, and what replaces them: their mean over the samples the forest is least sure about."""

    dims: np.ndarray  # (m,) indices
    values: np.ndarray  # (m,) replacements

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        attribute: Sequence[str],
        num_dims: int,
        low_fraction: float = 0.1,
        seed: int = 0,
    ) -> SFID:
        from sklearn.ensemble import RandomForestClassifier

        features = np.asarray(features, np.float64)
        forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1).fit(
            features, attribute
        )
        dims = np.argsort(forest.feature_importances_)[::-1][:num_dims].copy()
        confidence = forest.predict_proba(features).max(axis=1)  # (N,) in-sample; lowest = most ambiguous
        low = np.argsort(confidence, kind="stable")[: max(1, round(low_fraction * len(features)))]
        return cls(dims, features[low][:, dims].mean(axis=0))

    def apply(self, features: np.ndarray) -> np.ndarray:
        out = np.array(features, np.float64)
        out[:, self.dims] = self.values
        return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- bootstrap


def bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]], n: int, samples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """`statistic(indices)` on all n rows and on `samples` resamples with replacement: each scalar it returns
    as {"value", "low", "high"}, the 2.5th and 97.5th percentiles of the resamples (a percentile interval)."""
    point = statistic(np.arange(n))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k, v in point.items() if isinstance(v, (int, float))}
    for _ in range(samples):
        out = statistic(rng.integers(0, n, n))
        for key in draws:
            if out.get(key) is not None:
                draws[key].append(float(out[key]))
    result = {}
    for key, values in draws.items():
        low, high = np.percentile(values, [2.5, 97.5]) if values else (math.nan, math.nan)
        result[key] = {"value": float(point[key]), "low": float(low), "high": float(high)}
    return result


__all__ = [
    "SFID",
    "bootstrap",
    "calibrated_projection",
    "check_k",
    "project",
    "group_accuracy",
    "leakage_probe",
    "ndkl",
    "parity_differences",
    "parity_fast",
    "retrieval_skew",
    "skew_at_k",
    "target_distribution",
]
