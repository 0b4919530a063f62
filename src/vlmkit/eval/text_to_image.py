"""Measures of generated images against their prompts and against real images (issue 18's evaluation).

- prompts: every single-object prompt of the shapes vocabulary (`single_object_prompts`: size, colour, shape
  and position, in the captions' own words), and for each, captions with exactly one attribute swapped
  (`foils`), for R-precision;
- CLIPScore (Hessel et al. 2021): 2.5 * max(cos(image, caption), 0) in a CLIP's embedding space; R-precision:
  how often the prompt's caption scores above every one-attribute foil (with a CLIP other than the reranker's);
- reranking (DALL-E): of N samples per prompt, keep the ones a CLIP scores highest (`rerank`);
- KID (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over subsets; FID: the Frechet distance of Gaussians fitted to two
  feature sets; both in the feature space of a vlmkit model (no Inception weights offline), reported beside
  the same measure between two halves of the real images (the floor);
- diversity: the mean pairwise cosine distance between samples of one prompt; memorisation: each sample's
  cosine distance to its nearest training image.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from vlmkit.data.synthetic import COLOURS, SHAPES, SIZES, _position_phrase

POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


def caption(attrs: dict) -> str:
    """{"size", "colour", "shape", "position"} -> "a large red circle at the top left" (keys may be missing)."""
    words = [attrs[k] for k in ("size", "colour", "shape") if attrs.get(k)]
    article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([article, *words])
    return f"{text} {_position_phrase(attrs['position'])}" if attrs.get("position") else text


def single_object_prompts(
    attributes: tuple[str, ...] = ("size", "colour", "shape", "position"),
) -> list[dict]:
    """Every combination of the named attributes' values, each with its caption as "text"."""
    values = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}
    out = []
    for combo in itertools.product(*(values[a] for a in attributes)):
        attrs = dict(zip(attributes, combo, strict=True))
        out.append({**attrs, "text": caption(attrs)})
    return out


def foils(attrs: dict) -> list[str]:
    """Captions that differ from `attrs`'s in exactly one attribute, every other value of each."""
    values = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}
    out = []
    for key in ("size", "colour", "shape", "position"):
        if attrs.get(key):
            out += [caption({**attrs, key: v}) for v in values[key] if v != attrs[key]]
    return out


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """2.5 * max(cos, 0) of paired rows (N, D), (N, D) -> (N,)."""
    return 2.5 * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).clamp(min=0)


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, foil_emb: torch.Tensor) -> float:
    """Share of images (N, D) whose caption (N, D) scores strictly above all of its foils (N, F, D), cosine."""
    img = F.normalize(image_emb.float(), dim=-1)
    right = (img * F.normalize(text_emb.float(), dim=-1)).sum(-1)  # (N,)
    wrong = torch.einsum("nd,nfd->nf", img, F.normalize(foil_emb.float(), dim=-1))  # (N, F)
    return float((right > wrong.max(dim=1).values).float().mean())


def rerank(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores (N,), highest first."""
    return torch.topk(scores, min(keep, len(scores))).indices


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 10, subset_size: int = 100, seed: int = 0) -> float:
    """Kernel Inception Distance of feature sets a (N, D), b (M, D): the unbiased MMD^2, cubic kernel, mean
    over `subsets` random subsets of min(subset_size, N, M) rows each."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = ~np.eye(m, dtype=bool)
        values.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return float(np.mean(values))


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to a (N, D) and b (M, D)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(ca @ cb, disp=False)
    root = root.real  # numerical noise gives a tiny imaginary part
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance among the samples of one prompt (N, D), N >= 2."""
    x = F.normalize(features.float(), dim=-1)
    sims = x @ x.T
    n = len(x)
    return float((1 - sims)[~torch.eye(n, dtype=torch.bool)].mean())


def nearest_distance(generated: torch.Tensor, training: torch.Tensor) -> torch.Tensor:
    """Each generated feature's cosine distance to its nearest training feature: (N, D), (M, D) -> (N,)."""
    sims = F.normalize(generated.float(), dim=-1) @ F.normalize(training.float(), dim=-1).T
    return 1 - sims.max(dim=1).values
