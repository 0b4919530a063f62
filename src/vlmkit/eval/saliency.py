"""Saliency from attention: attention rollout (Abnar & Zuidema 2020) and gradient-weighted relevance (Chefer et al.
2021), from the maps `vlmkit.nn.attention.record_attention` collects.

- rollout: each layer's head-averaged attention A mixed with the residual path, A' = (A + I) / 2, its **rows**
  renormalised to sum to 1 (A' stays a row-stochastic "where does this token read from" matrix; normalising
  the columns instead is a known bug of a popular implementation), multiplied from the first layer to the last:
  R = A'_L ... A'_1; the pooled token's row of R says how much each input token flows into it.
- relevance: R = I, then for each layer in order R <- R + mean_heads(max(dA * A, 0)) @ R, where dA is the
  gradient of the explained score (e.g. an image-text similarity) with respect to that layer's attention.

A last block computed for the pooled token alone records a (B, nh, 1, T) map: it is taken as that token's row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _square(maps: list[Tensor], index: int) -> list[Tensor]:
    """Head-averaged (B, T, T) maps, a pooled-only last map (B, nh, 1, T) expanded into its row `index` of an
    identity (the other rows do not reach the pooled token)."""
    out = []
    for a in maps:
        m = a.float().mean(dim=1)  # (B, T, S)
        if m.shape[1] == 1:
            full = torch.eye(m.shape[2], device=m.device).expand(m.shape[0], -1, -1).clone()
            full[:, index] = m[:, 0]
            m = full
        out.append(m)
    return out


def rollout_matrix(maps: list[Tensor], index: int = 0) -> Tensor:
    """Rollout over one tower's self-attention maps in layer order -> (B, T, T): row i says how much of each
    input token reaches output token i; rows sum to 1. (A pooled-only last map fills row `index` alone.)"""
    rollout = None
    for m in _square(maps, index):
        eye = torch.eye(m.shape[-1], device=m.device)
        a = 0.5 * m + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)  # rows
        rollout = a if rollout is None else a @ rollout
    return rollout


def attention_rollout(maps: list[Tensor], index: int = 0) -> Tensor:
    """Rollout into token `index` (the class token by default): (B, T), summing to 1."""
    return rollout_matrix(maps, index)[:, index]


def relevance_matrix(maps: list[Tensor], index: int = 0) -> Tensor:
    """Chefer et al.'s relevance of every input token to every output token (B, T, T), from maps recorded with
    `retain_grad=True` after the explained score's backward pass."""
    R = None
    for a in maps:
        if a.grad is None:
            raise ValueError(
                "an attention map has no gradient: record with retain_grad=True and call backward"
            )
        cam = (a.grad * a).clamp(min=0).float().mean(dim=1)  # (B, T, S) or (B, 1, T)
        if cam.shape[1] == 1:
            full = torch.zeros(cam.shape[0], cam.shape[2], cam.shape[2], device=cam.device)
            full[:, index] = cam[:, 0]
            cam = full
        if R is None:
            R = torch.eye(cam.shape[-1], device=cam.device).expand_as(cam).clone()
        R = R + cam @ R
    return R


def relevance(maps: list[Tensor], index: int = 0) -> Tensor:
    """Chefer et al.'s relevance of each input token to token `index` (B, T)."""
    return relevance_matrix(maps, index)[:, index]


# ------------------------------------------------------------------------------------------- dual encoders
BUILTIN_METHODS = ("similarity", "rollout", "relevance", "gradcam")
CAPTUM_METHODS = ("integrated-gradients", "occlusion")  # need captum: pip install 'vlmkit[explain]'
METHODS = BUILTIN_METHODS + CAPTUM_METHODS


def captum_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("captum") is not None


def _captum_attr():
    from vlmkit.errors import ConfigError

    try:
        import captum.attr
    except ImportError:
        raise ConfigError(
            "integrated-gradients and occlusion run through captum, which is not installed: "
            "pip install 'vlmkit[explain]' (or pip install captum)"
        ) from None
    return captum.attr


def _grid(clip) -> int:
    v = clip.cfg.vision
    return v.image_size // v.patch_size


def _patches(values: Tensor, clip) -> Tensor:
    """Per-token values (B, T) -> the patch grid (B, g, g), prefix tokens dropped."""
    g = _grid(clip)
    return values[:, clip.visual.num_prefix_tokens :].reshape(-1, g, g)


def _needs_class_token(clip, method: str) -> None:
    from vlmkit.errors import ConfigError

    if clip.cfg.vision.pool != "cls":
        raise ConfigError(
            f"{method} follows attention into the class token; this model pools by {clip.cfg.vision.pool!r}: "
            "use --method similarity or gradcam"
        )


def similarity_map(clip, pixels: Tensor, text: Tensor) -> Tensor:
    """Each patch token through the final norm and projection, cosine with the text embedding (B, D): (B, g, g)."""
    with torch.no_grad():
        tokens = clip.visual.forward_tokens(pixels)  # (B, T, C), after the final norm
        proj = clip.visual.proj
        emb = proj(tokens) if proj is not None else tokens
        sims = (
            torch.nn.functional.normalize(emb.float(), dim=-1)
            @ torch.nn.functional.normalize(text.float(), dim=-1)[..., None]
        )
    return _patches(sims[..., 0], clip)


def rollout_map(clip, pixels: Tensor) -> Tensor:
    """Attention rollout into the class token over the image tower's blocks: (B, g, g)."""
    from vlmkit.nn.attention import record_attention

    _needs_class_token(clip, "rollout")
    with torch.no_grad(), record_attention() as maps:
        clip.visual(pixels)
    return _patches(attention_rollout(list(maps)), clip)


def _score(clip, image_emb: Tensor, text: Tensor) -> Tensor:
    return (
        torch.nn.functional.normalize(image_emb.float(), dim=-1)
        * torch.nn.functional.normalize(text.float(), dim=-1)
    ).sum()


def relevance_map(clip, pixels: Tensor, text: Tensor) -> Tensor:
    """Chefer et al.'s relevance of each patch to the image-text similarity: (B, g, g)."""
    from vlmkit.nn.attention import record_attention

    _needs_class_token(clip, "relevance")
    with torch.enable_grad(), record_attention(retain_grad=True) as maps:
        pixels = pixels.detach().requires_grad_()
        score = _score(clip, clip.visual(pixels), text)
        score.backward()
    return _patches(relevance(list(maps)), clip).detach()


def gradcam_map(clip, pixels: Tensor, text: Tensor) -> Tensor:
    """Grad-CAM on the image-text similarity at the input of the last block: ReLU(sum_c w_c A_c) with w_c the
    token-averaged gradient of channel c: (B, g, g)."""
    visual = clip.visual
    with torch.enable_grad():
        x = visual.forward_hidden(pixels, len(visual.transformer.blocks) - 1).detach().requires_grad_()
        out = visual.pool(visual.ln_post(visual.transformer.blocks[-1](x)))
        _score(clip, out, text).backward()
    patches = slice(visual.num_prefix_tokens, None)
    weights = x.grad[:, patches].mean(dim=1, keepdim=True)  # (B, 1, C)
    cam = (weights * x[:, patches]).sum(-1).clamp(min=0).detach()  # (B, N)
    g = _grid(clip)
    return cam.reshape(-1, g, g)


def _similarity_fn(clip):
    """(pixels (N, 3, S, S), unit text embeddings (N, D)) -> (N,) cosine: the score captum attributes (captum
    repeats the text along with the images it batches)."""

    def forward(pixels: Tensor, text: Tensor) -> Tensor:
        return (torch.nn.functional.normalize(clip.encode_image(pixels).float(), dim=-1) * text).sum(-1)

    return forward


def _to_grid(attributions: Tensor, clip) -> Tensor:
    """Pixel attributions (B, 3, S, S) -> (B, g, g): summed over channels, positive part, averaged per patch."""
    p = clip.cfg.vision.patch_size
    return torch.nn.functional.avg_pool2d(attributions.sum(1, keepdim=True).clamp(min=0), p)[:, 0].detach()


def integrated_gradients_pixels(clip, pixels: Tensor, text: Tensor, steps: int = 32) -> tuple[Tensor, Tensor]:
    """Integrated Gradients (Sundararajan et al. 2017, through captum) of the image-text cosine from a baseline
    of zeros (the dataset's mean colour after normalisation): pixel attributions (B, 3, S, S) and captum's
    convergence delta (B,) (completeness: the attributions sum to f(x) - f(baseline) up to it)."""
    attr = _captum_attr()
    ig = attr.IntegratedGradients(_similarity_fn(clip))
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    with torch.enable_grad():
        a, delta = ig.attribute(
            pixels, baselines=torch.zeros_like(pixels), additional_forward_args=(t,), n_steps=steps,
            internal_batch_size=64, return_convergence_delta=True,
        )  # fmt: skip
    return a.detach(), delta.detach()


def occlusion_pixels(clip, pixels: Tensor, text: Tensor) -> Tensor:
    """Occlusion (Zeiler & Fergus 2014, through captum): each patch in turn set to zero (the mean colour); the drop
    in the image-text cosine, spread over the patch's pixels (B, 3, S, S)."""
    attr = _captum_attr()
    p = clip.cfg.vision.patch_size
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    with torch.no_grad():
        return attr.Occlusion(_similarity_fn(clip)).attribute(
            pixels, sliding_window_shapes=(3, p, p), strides=(3, p, p), baselines=0.0,
            additional_forward_args=(t,), perturbations_per_eval=16,
        )  # fmt: skip


def explain_dual_encoder(clip, pixels: Tensor, text: Tensor, method: str) -> Tensor:
    """The `method` map (one of METHODS) for images (B, 3, S, S) and text embeddings (B, D): (B, g, g)."""
    from vlmkit.errors import ConfigError

    if method not in METHODS:
        raise ConfigError(f"unknown saliency method {method!r}; dual encoders have {', '.join(METHODS)}")
    if method == "integrated-gradients":
        return _to_grid(integrated_gradients_pixels(clip, pixels, text)[0], clip)
    if method == "occlusion":
        return _to_grid(occlusion_pixels(clip, pixels, text), clip)
    if method == "rollout":
        return rollout_map(clip, pixels)
    return {"similarity": similarity_map, "relevance": relevance_map, "gradcam": gradcam_map}[method](
        clip, pixels, text
    )


def to_image_size(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Patch maps (B, g, g) -> (B, H, W) for an image of `size` (width, height), bilinear, scaled to [0, 1]."""
    up = torch.nn.functional.interpolate(
        maps[:, None].float(), size=(size[1], size[0]), mode="bilinear", align_corners=False
    )[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return (up - lo) / (hi - lo).clamp(min=1e-12)


# ------------------------------------------------------------------------------------- scoring against boxes
def tolerance_for(size: int) -> float:
    """The pointing game's tolerance in pixels: 15 px at 224 px, scaled to the image's side."""
    return 15.0 * size / 224.0


def _distance_to_box(x: float, y: float, box) -> float:
    x0, y0, x1, y1 = box  # pixels, exclusive right/bottom
    dx = max(x0 - x, 0.0, x - (x1 - 1))
    dy = max(y0 - y, 0.0, y - (y1 - 1))
    return float((dx * dx + dy * dy) ** 0.5)


def distance_grid(box, size: tuple[int, int]):
    """Every pixel's distance to `box` in an image of `size` (width, height): a NumPy array (H, W), 0 inside."""
    import numpy as np

    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    x0, y0, x1, y1 = box
    dx = np.maximum.reduce([x0 - xs, np.zeros_like(xs), xs - (x1 - 1)])
    dy = np.maximum.reduce([y0 - ys, np.zeros_like(ys), ys - (y1 - 1)])
    return np.sqrt(dx**2 + dy**2)


def pointing_hit(saliency, box, tolerance: float | None = None) -> bool:
    """Whether the map's (H, W) maximum lies in `box` (x0, y0, x1, y1) or within `tolerance` pixels of it
    (default: `tolerance_for` the larger side). Ties: the first maximum in row-major order."""
    import numpy as np

    s = np.asarray(saliency)
    y, x = np.unravel_index(int(s.argmax()), s.shape)
    tol = tolerance_for(max(s.shape)) if tolerance is None else tolerance
    return _distance_to_box(x, y, box) <= tol


def box_iou(saliency, box, threshold: float = 0.5) -> float:
    """IoU of the map thresholded at `threshold` x its maximum with the box's pixels."""
    import numpy as np

    s = np.asarray(saliency, dtype=np.float64)
    mask = s >= threshold * s.max() if s.max() > 0 else np.ones_like(s, dtype=bool)
    inside = np.zeros_like(mask)
    x0, y0, x1, y1 = box
    inside[y0:y1, x0:x1] = True
    union = (mask | inside).sum()
    return float((mask & inside).sum() / union) if union else 0.0


def baseline_hits(box, size: tuple[int, int], tolerance: float | None = None) -> dict[str, float]:
    """The controls' pointing scores for one box in an image of `size` (width, height): the centre point (a hit
    or not), and a uniformly random point or a uniform map (whose maximum is anywhere): the share of pixels
    that would count as a hit."""
    w, h = size
    tol = tolerance_for(max(w, h)) if tolerance is None else tolerance
    random = float((distance_grid(box, size) <= tol).mean())
    centre = float(_distance_to_box((w - 1) / 2, (h - 1) / 2, box) <= tol)
    return {"centre": centre, "random": random}


def deletion_insertion(
    score, pixels: Tensor, saliency: Tensor, baseline: Tensor, steps: int = 16
) -> dict[str, float]:
    """Deletion and insertion AUC (Petsiuk et al. 2018) of a map (H, W) for one image (3, H, W): pixels are
    replaced by `baseline` (3, H, W), most salient first, in `steps` equal chunks (deletion), or put back into the
    baseline in the same order (insertion); `score` maps a batch (N, 3, H, W) to (N,). The AUC is the trapezoid
    mean of the scores over the fractions 0..1: low deletion and high insertion mean the map found what matters."""
    H, W = saliency.shape
    order = torch.argsort(saliency.flatten(), descending=True, stable=True)
    counts = [round(i * H * W / steps) for i in range(steps + 1)]
    deleted, inserted = [], []
    for n in counts:
        keep = torch.zeros(H * W, dtype=torch.bool)
        keep[order[:n]] = True
        keep = keep.view(1, H, W)
        deleted.append(torch.where(keep, baseline, pixels))
        inserted.append(torch.where(keep, pixels, baseline))
    with torch.no_grad():
        d = score(torch.stack(deleted)).float()
        i = score(torch.stack(inserted)).float()

    def auc(y: Tensor) -> float:
        return float(((y[1:] + y[:-1]) / 2).mean())

    return {"deletion_auc": auc(d), "insertion_auc": auc(i)}
