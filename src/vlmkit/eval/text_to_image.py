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
import json
import textwrap
from pathlib import Path

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
    """{"size", "colour", "shape", "position"} -> "a large red circle at the top left" (keys may be missing;
    without a shape, "a large red shape")."""
    words = [attrs[k] for k in ("size", "colour", "shape") if attrs.get(k)]
    if not attrs.get("shape"):
        words.append("shape")  # "a red shape"
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


def save_grid(rows: list[torch.Tensor], captions: list[str], path: Path) -> None:
    """One column per caption, one row per tensor of uint8 images (B, 3, S, S), captions as titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.8 * len(rows)), squeeze=False)
    for r, images in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(textwrap.fill(captions[c], 18), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_image_grid(rows: list[torch.Tensor], path: Path, tile: int = 96, pad: int = 4) -> Path:
    """One row per tensor of uint8 images (N, 3, S, S), each tile scaled to `tile` pixels (nearest, so a
    32-pixel sample stays sharp), on white."""
    from PIL import Image

    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (tile + pad) + pad, len(rows) * (tile + pad) + pad), "white")
    for i, images in enumerate(rows):
        for j, im in enumerate(images):
            pil = Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy()))
            grid.paste(
                pil.resize((tile, tile), Image.NEAREST), (pad + j * (tile + pad), pad + i * (tile + pad))
            )
    grid.save(path)
    return Path(path)


def write_text_to_image_report(results: dict, prompts: list[str], out: Path) -> Path:
    """report.html beside text_to_image.json and samples.png: the measures as tables, then the samples (one
    row per prompt, best-ranked first when reranked)."""
    import html

    from vlmkit.eval.report import _figure, _table, write_page

    sections = [f"<p>model <code>{html.escape(str(results.get('model')))}</code>, {results.get('prompts')} prompts "
                f"x {results.get('images_per_prompt')} samples, sampling {html.escape(json.dumps(results.get('sampling')))}</p>"]  # fmt: skip
    acc = {k: v for k, v in results.get("accuracy", {}).items() if isinstance(v, dict)}
    if "reader_ceiling" in results:
        acc["scene reader on real scenes (ceiling)"] = results["reader_ceiling"]
    if acc:
        keys = ["count", "colour", "shape", "size", "position", "all_correct"]
        rows = [[name, *[row.get(k) for k in keys]] for name, row in acc.items()]
        sections.append("<h2>Attributes read from the images</h2>" + _table(["samples", *keys], rows))
    pairs = [
        (k, v)
        for k, v in results.items()
        if isinstance(v, dict) and k not in ("accuracy", "sampling", "reader_ceiling")
    ]
    measures = [[f"{k} / {kk}", vv] for k, v in pairs for kk, vv in v.items()]
    measures += [[k, v] for k, v in results.items() if k in ("diversity", "real_diversity")]
    if measures:
        sections.append("<h2>Measures</h2>" + _table(["measure", "value"], measures))
    samples = out / "samples.png"
    if samples.is_file():
        names = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
        sections.append("<h2>Samples</h2>" + _figure(samples, out) + f"<ol>{names}</ol>")
    return write_page(out / "report.html", "Text-to-image evaluation", sections)
