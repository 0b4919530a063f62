"""Residual decomposition of a ViT image tower (Gandelsman et al. 2024, "Interpreting CLIP's image representation
via text-based decomposition").

A pre-norm ViT's output token is a sum: the embeddings x0, then each layer's attention output (a sum over heads,
plus the output projection's bias) and MLP output. The final LayerNorm is linear once its per-token scale is
fixed: LN(x) = g * (x - mean(x)) / s + b with s = sqrt(var(x) + eps) taken from the whole x, so each term c maps
to g * (c - mean(c)) / s, pooled (the class token, or the mean of the patch tokens) and projected. The image
embedding is then exactly

    embed + sum over layers and heads of heads[l, h] + sum of attn_bias[l] + sum of mlp[l] + norm_bias,

which `Decomposition.total()` returns (checked against the model's own embedding in the tests).

- `mean_ablation_accuracy`: each layer's attention and MLP, and each head, replaced by its mean output over the
  images (at every token; the rest of the network runs on it), and the zero-shot accuracy that remains.
- `text_span`: TextSpan: for a head, the greedy set of texts whose embedding directions explain most of the
  variance of the head's direct contributions over the images; the head's contributions projected on their span
  are its text reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlmkit.errors import ConfigError

Ablation = tuple[str, int, int | None]  # ("attn" | "mlp" | "head", layer, head or None)


@dataclass
class Decomposition:
    """Direct contributions to image embeddings (B images, L layers, nh heads, D embedding dims)."""

    embed: Tensor  # (B, D) the patch/class embeddings and positions
    heads: Tensor  # (B, L, nh, D) each attention head
    attn_bias: Tensor  # (B, L, D) each attention output projection's bias
    mlp: Tensor  # (B, L, D) each MLP
    norm_bias: Tensor  # (B, D) the final norm's shift, projected

    def total(self) -> Tensor:
        """(B, D): the image embedding."""
        return self.embed + self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlp.sum(1) + self.norm_bias

    def layers(self) -> Tensor:
        """(B, L, D): each layer's attention (heads and bias) plus MLP."""
        return self.heads.sum(2) + self.attn_bias + self.mlp


def _check(visual) -> None:
    if visual.cfg.pool not in ("cls", "mean"):
        raise ConfigError(
            f"the decomposition reads a class token or the mean of the patch tokens; this tower pools by "
            f"{visual.cfg.pool!r} (an attention pool is not linear)"
        )


def _heads(block, x: Tensor) -> tuple[Tensor, Tensor]:
    """The block's attention output per head, (B, nh, T, C), and its output bias (C,)."""
    attn = block.attn
    B, T, C = x.shape
    nh = attn.num_heads
    hs = C // nh
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in attn.qkv(block.ln_1(x)).split(C, dim=-1))
    weights = (q.float() @ k.float().transpose(-2, -1) * hs**-0.5).softmax(-1)  # (B, nh, T, T)
    y = weights.to(v.dtype) @ v  # (B, nh, T, hs)
    w = attn.proj.weight.view(C, nh, hs)  # (C_out, nh, hs): the output projection's columns of each head
    return torch.einsum("bnth,cnh->bntc", y, w), attn.proj.bias  # (B, nh, T, C)


def _run(visual, images: Tensor, ablate: dict | None = None, collect=None) -> Tensor:
    """The tower's blocks computed term by term: the final tokens before the norm (B, T, C). `ablate` maps
    ("attn"|"mlp", l, None) or ("head", l, h) to a replacement (T, C) for that output; `collect(name, l, c)`
    sees each term c: ("embed", -1, (B, T, C)), ("heads", l, (B, nh, T, C)), ("attn_bias", l, (B, T, C)),
    ("mlp", l, (B, T, C))."""
    ablate = ablate or {}
    x = visual.embed(images)  # (B, T, C)
    if collect:
        collect("embed", -1, x)
    for layer_i, block in enumerate(visual.transformer.blocks):
        heads, bias = _heads(block, x)  # (B, nh, T, C), (C,)
        for h in range(heads.shape[1]):
            if ("head", layer_i, h) in ablate:
                heads[:, h] = ablate[("head", layer_i, h)]
        attn_out = heads.sum(1) + bias
        if ("attn", layer_i, None) in ablate:
            attn_out = ablate[("attn", layer_i, None)].expand_as(attn_out)
        elif collect:
            collect("heads", layer_i, heads)
            collect("attn_bias", layer_i, bias.expand_as(attn_out))
        x = x + attn_out
        mlp = block.mlp(block.ln_2(x))  # (B, T, C)
        if ("mlp", layer_i, None) in ablate:
            mlp = ablate[("mlp", layer_i, None)].expand_as(mlp)
        if collect:
            collect("mlp", layer_i, mlp)
        x = x + mlp
    return x


def _readout(visual, final: Tensor):
    """c (B, ..., T, C) -> (B, ..., D): through the final norm with the scale of `final` (B, T, C) fixed,
    pooled and projected."""
    norm = visual.ln_post
    scale = (final.float().var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # (B, T, 1)
    T = final.shape[1]
    pool = torch.zeros(T, device=final.device)
    if visual.cfg.pool == "cls":
        pool[0] = 1.0
    else:
        pool[visual.num_prefix_tokens :] = 1.0 / (T - visual.num_prefix_tokens)

    def read(c: Tensor) -> Tensor:
        extra = c.dim() - 3  # head axes between B and T
        s = scale.view(scale.shape[0], *([1] * extra), T, 1)
        normed = norm.weight * (c.float() - c.float().mean(-1, keepdim=True)) / s  # (B, ..., T, C)
        pooled = torch.einsum("...tc,t->...c", normed, pool)
        return visual.proj(pooled) if visual.proj is not None else pooled

    return read


@torch.no_grad()
def decompose_image_embedding(visual, images: Tensor) -> Decomposition:
    """The direct contributions of a ViT tower (pooled at its class token or by the mean) for images (B, 3, S, S)."""
    _check(visual)
    final = _run(visual, images)  # pass 1: the scale of the final norm
    read = _readout(visual, final)
    parts: dict[str, list[Tensor]] = {"heads": [], "attn_bias": [], "mlp": []}
    embed = []

    def collect(name: str, layer: int, c: Tensor) -> None:
        (embed if name == "embed" else parts[name]).append(read(c))

    _run(visual, images, collect=collect)  # pass 2: every term through the fixed norm
    bias = visual.ln_post.bias.float().expand(images.shape[0], -1)
    norm_bias = visual.proj(bias) if visual.proj is not None else bias
    return Decomposition(
        embed=embed[0],
        heads=torch.stack(parts["heads"], 1),  # (B, L, nh, D)
        attn_bias=torch.stack(parts["attn_bias"], 1),
        mlp=torch.stack(parts["mlp"], 1),
        norm_bias=norm_bias,
    )


@torch.no_grad()
def embed_ablated(visual, images: Tensor, ablate: dict) -> Tensor:
    """Image embeddings (B, D) with the outputs in `ablate` replaced (see `_run`)."""
    _check(visual)
    x = visual.ln_post(_run(visual, images, ablate))  # (B, T, C)
    pooled = x[:, 0] if visual.cfg.pool == "cls" else x[:, visual.num_prefix_tokens :].mean(1)
    return visual.proj(pooled) if visual.proj is not None else pooled


@torch.no_grad()
def component_means(visual, batches) -> dict:
    """Each layer's attention and MLP output and each head's, averaged over the images of `batches` (an iterable
    of (B, 3, S, S)) at every token: {("attn", l, None) | ("mlp", l, None) | ("head", l, h): (T, C)}."""
    sums: dict = {}
    count = 0

    def collect(name: str, layer: int, c: Tensor) -> None:
        if name == "heads":
            for h in range(c.shape[1]):
                sums[("head", layer, h)] = sums.get(("head", layer, h), 0) + c[:, h].sum(0)
            sums[("attn", layer, None)] = sums.get(("attn", layer, None), 0) + c.sum((0, 1))
        elif name == "attn_bias":
            sums[("attn", layer, None)] = sums[("attn", layer, None)] + c.sum(0)
        elif name == "mlp":
            sums[("mlp", layer, None)] = sums.get(("mlp", layer, None), 0) + c.sum(0)

    for images in batches:
        _run(visual, images, collect=collect)
        count += images.shape[0]
    return {k: v / count for k, v in sums.items()}


@dataclass
class TextSpan:
    """A head's greedy text basis: the chosen texts, the variance each explains, and the orthonormal directions."""

    texts: list[str]
    explained: list[float]  # share of the head's variance explained by each chosen text, in order
    directions: Tensor  # (m, D) orthonormal
    mean: Tensor  # (D,) the head's mean contribution

    def reconstruct(self, contributions: Tensor) -> Tensor:
        """(N, D) -> (N, D): the mean plus the projection of the rest on the chosen texts' span."""
        centred = contributions.float() - self.mean
        return self.mean + (centred @ self.directions.T) @ self.directions


def text_span(
    contributions: Tensor,
    text_embeddings: Tensor,
    texts: list[str],
    m: int = 5,
    order: list[int] | None = None,
) -> TextSpan:
    """Greedy TextSpan for one head: contributions (N, D) over images, candidate text embeddings (M, D).

    At each step the candidate whose (normalised, already-projected) direction carries the most of the remaining
    variance of the centred contributions is chosen; then that direction is projected out of the contributions
    and of every candidate. `order`: take these candidates in this order instead of choosing (the random-texts
    control)."""
    C = contributions.double() - contributions.double().mean(0)
    total = float((C**2).sum()) or 1.0
    cand = text_embeddings.double().clone()
    chosen, explained, dirs = [], [], []
    for _ in range(min(m, len(texts) if order is None else len(order))):
        norms = cand.norm(dim=-1).clamp(min=1e-12)
        unit = cand / norms[:, None]  # (M, D)
        var = ((C @ unit.T) ** 2).sum(0)  # (M,) variance along each candidate
        var[chosen] = -1.0
        j = int(var.argmax()) if order is None else order[len(chosen)]
        u = unit[j]
        chosen.append(j)
        explained.append(float(var[j]) / total)
        dirs.append(u)
        C = C - (C @ u)[:, None] * u
        cand = cand - (cand @ u)[:, None] * u
    return TextSpan(
        texts=[texts[j] for j in chosen],
        explained=explained,
        directions=torch.stack(dirs).float() if dirs else torch.zeros(0, contributions.shape[1]),
        mean=contributions.float().mean(0),
    )


def caption_phrases(manifest, max_words: int = 3, min_count: int = 2, limit: int = 400) -> list[str]:
    """The candidate texts for TextSpan from a manifest's captions: word n-grams (1 to `max_words` words, not
    starting or ending with a stop word) seen at least `min_count` times, the `limit` most frequent."""
    import re
    from collections import Counter

    from vlmkit.data.manifest import read_manifest
    from vlmkit.eval.atlas import STOPWORDS

    samples, _ = read_manifest(manifest)
    counts: Counter = Counter()
    for s in samples:
        words = re.findall(r"[a-z0-9']+", s.caption.lower())
        for n in range(1, max_words + 1):
            grams = (words[i : i + n] for i in range(len(words) - n + 1))
            # a phrase neither starts nor ends with a stop word ("red circle", "circle on the left", not "on the")
            counts.update(" ".join(g) for g in grams if g[0] not in STOPWORDS and g[-1] not in STOPWORDS)
    phrases = [p for p, c in counts.most_common() if c >= min_count][:limit]
    if not phrases:
        from vlmkit.errors import DataError

        raise DataError(f"{manifest}: no phrase occurs {min_count} times; pass --texts FILE")
    return phrases


def _image_batches(paths, transform, batch_size: int, device):
    from vlmkit.data.transforms import load_image

    for start in range(0, len(paths), batch_size):
        yield torch.stack([transform(load_image(p)) for p in paths[start : start + batch_size]]).to(device)


@torch.no_grad()
def evaluate_decomposition(
    clip,
    tokenizer,
    preprocess,
    data_root,
    texts: list[str],
    templates: list[str] | None = None,
    *,
    texts_per_head: int = 5,
    span_layers: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    out_dir=None,
) -> dict:
    """Decompose a CLIP's image embeddings over a labelled image folder, and measure the zero-shot accuracy
    (1) as is, (2) with each layer's attention / MLP and each head mean-ablated, (3) with the heads of the last
    `span_layers` layers (default: all) replaced by their TextSpan reconstructions from `texts_per_head` of
    `texts`, beside the same heads replaced by their mean. With `out_dir`: decomposition.json, ablation.png,
    report.html."""
    from tqdm import tqdm

    from vlmkit.data.manifest import read_image_folder
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.eval.features import extract_text_features
    from vlmkit.eval.prompts import accuracy
    from vlmkit.eval.templates import load_templates
    from vlmkit.eval.zeroshot import build_zeroshot_classifier

    visual = clip.eval().to(device).visual
    _check(visual)
    paths, labels, classnames = read_image_folder(data_root)
    labels = torch.tensor(labels)
    transform = ImageTransform(preprocess, train=False)
    classifier = (
        build_zeroshot_classifier(clip, tokenizer, classnames, load_templates(templates), device=device)
        .to(device)
        .T
    )  # (K, D)
    parts, reference = [], []
    for images in tqdm(_image_batches(paths, transform, batch_size, device), desc="decompose", leave=False):
        parts.append(decompose_image_embedding(visual, images))
        reference.append(clip.encode_image(images).float())
    d = Decomposition(
        *(torch.cat([getattr(p, f) for p in parts]) for f in Decomposition.__dataclass_fields__)
    )
    reference = torch.cat(reference)
    sum_error = float((d.total() - reference).abs().max())
    full = accuracy(d.total(), labels, classifier)

    means = component_means(visual, _image_batches(paths, transform, batch_size, device))
    L, nh = d.heads.shape[1], d.heads.shape[2]
    ablation = []
    keys = [(kind, layer_i, None) for layer_i in range(L) for kind in ("attn", "mlp")]
    keys += [("head", layer_i, h) for layer_i in range(L) for h in range(nh)]
    for key in tqdm(keys, desc="mean-ablation", leave=False):
        emb = torch.cat(
            [
                embed_ablated(visual, im, {key: means[key]})
                for im in _image_batches(paths, transform, batch_size, device)
            ]
        )
        kind, layer_i, h = key
        ablation.append(
            {"component": kind, "layer": layer_i, "head": h, "accuracy": accuracy(emb, labels, classifier)}
        )

    text_emb = extract_text_features(clip, tokenizer, texts, device=device).to(device)  # (M, D)
    first = L - (span_layers or L)
    spans, replaced, mean_replaced, random_replaced = (
        [],
        d.total().clone(),
        d.total().clone(),
        d.total().clone(),
    )
    gen = torch.Generator().manual_seed(0)
    for layer_i in range(first, L):
        for h in range(nh):
            c = d.heads[:, layer_i, h]  # (N, D)
            span = text_span(c, text_emb, texts, texts_per_head)
            replaced += span.reconstruct(c) - c
            mean_replaced += span.mean - c
            pick = torch.randperm(len(texts), generator=gen)[:texts_per_head].tolist()
            random_replaced += text_span(c, text_emb, texts, texts_per_head, order=pick).reconstruct(c) - c
            spans.append({"layer": layer_i, "head": h, "texts": span.texts, "explained": span.explained,
                          "variance_share": float(c.var(0).sum() / d.heads[:, first:].var(0).sum(-1).sum())})  # fmt: skip
    metrics = {
        "num_images": len(paths),
        "sum_max_abs_error": sum_error,
        "accuracy": full,
        "ablation": ablation,
        "text_span": {
            "layers": list(range(first, L)),
            "texts_per_head": texts_per_head,
            "num_candidate_texts": len(texts),
            "accuracy_heads_reconstructed": accuracy(replaced, labels, classifier),
            "accuracy_heads_mean": accuracy(mean_replaced, labels, classifier),
            "accuracy_heads_random_texts": accuracy(random_replaced, labels, classifier),
            "heads": spans,
        },
        "direct_norm": {
            "embed": float(d.embed.norm(dim=-1).mean()),
            "layers": [float(x) for x in d.layers().norm(dim=-1).mean(0)],
            "heads": [[float(x) for x in row] for row in d.heads.norm(dim=-1).mean(0)],
        },
    }
    results = {"task": "decomposition", "model": model_name, "dataset": str(data_root), "metrics": metrics}
    if out_dir is not None:
        write_decomposition_report(out_dir, results)
    return results


def write_decomposition_report(out_dir, results: dict):
    """decomposition.json, ablation.png (accuracy with each component mean-ablated) and report.html."""
    import html
    import json
    from pathlib import Path

    from vlmkit.eval.report import _table, new_figure, save_figure, write_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decomposition.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    m = results["metrics"]
    names = [
        f"L{a['layer']} {a['component']}" + ("" if a["head"] is None else f" {a['head']}")
        for a in m["ablation"]
    ]
    fig = new_figure(max(5.0, 0.32 * len(names)), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), [a["accuracy"] for a in m["ablation"]], color="#4a7ab5")
    ax.axhline(m["accuracy"], color="k", linestyle="--", linewidth=1, label=f"intact {m['accuracy']:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("zero-shot accuracy")
    ax.set_title("each component mean-ablated")
    ax.legend(fontsize=7)
    png = save_figure(fig, out / "ablation.png")
    ts = m["text_span"]
    heads = _table(
        ["layer", "head", "share of the span layers' variance", "texts (variance explained, in order)"],
        [[s["layer"], s["head"], f"{s['variance_share']:.3f}",
          "; ".join(f"{t} ({e:.2f})" for t, e in zip(s["texts"], s["explained"]))] for s in ts["heads"]],
    )  # fmt: skip
    sections = [
        f"<p>{m['num_images']} images. The contributions sum to the embedding within "
        f"{m['sum_max_abs_error']:.1e}. Zero-shot accuracy intact: <b>{m['accuracy']:.3f}</b>; heads of layers "
        f"{ts['layers'][0]}-{ts['layers'][-1]} replaced by their {ts['texts_per_head']}-text reconstructions: "
        f"<b>{ts['accuracy_heads_reconstructed']:.3f}</b>; by reconstructions from as many random texts: "
        f"{ts['accuracy_heads_random_texts']:.3f}; by their means: {ts['accuracy_heads_mean']:.3f}.</p>",
        f'<h2>Mean-ablation</h2><img src="{png.name}" alt="accuracy after mean-ablation">',
        "<h2>Heads described in words (TextSpan)</h2>" + heads,
    ]
    title = f"Residual decomposition: {results['model'] or ''}"
    return write_page(out / "report.html", html.unescape(title), sections)


__all__ = [
    "Decomposition",
    "evaluate_decomposition",
    "caption_phrases",
    "TextSpan",
    "component_means",
    "decompose_image_embedding",
    "embed_ablated",
    "text_span",
]
