"""Which image regions a generative model's answer comes from (LLaVA-style and CoCa models).

The answer is scored as the summed log-probability of its tokens (and the end of turn) given the image and the
question, as `VLMPipeline.log_likelihood` scores captions. Three methods map it onto the image's token grid:

- "attention": per layer, the attention from the positions that predict the answer's tokens to the image tokens,
  averaged over heads and those positions (LLaVA: the decoder's self-attention into the image-token span; CoCa: the
  cross-attention into the image memory, through the attentional pooler's attention when the memory is pooled
  queries); `per_layer` keeps each layer's map, `grid` is their mean.
- "grad-attention": the same maps weighted by the gradient of the answer's log-probability, positive part
  (Chefer et al.'s gradient x attention), summed over layers (CoCa: back to the patches through the tower's
  relevance matrix, Chefer et al.'s rule for encoder-decoder models).
- "occlusion": each cell of the model's patch grid (and, given boxes, each object) replaced by the image's mean
  colour; the map is the drop in the answer's log-probability.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor

from vlmkit.errors import ConfigError
from vlmkit.losses.captioning import IGNORE_INDEX

GENERATIVE_METHODS = ("attention", "grad-attention", "occlusion")


@dataclass
class AnswerAttribution:
    method: str
    grid: Tensor  # (g, g) over the image's token grid (occlusion: the model's patch grid)
    log_prob: float  # the answer's summed log-probability given the intact image
    per_layer: Tensor | None = None  # (L, g, g) for the attention methods
    objects: list[float] | None = None  # occlusion: the drop when each given box is occluded


def _square(n: int) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ConfigError(f"{n} image tokens do not form a square grid: no map can be drawn for this model")
    return g


def _attention_modules(pipe) -> tuple[list, object | None, list]:
    """The modules whose attention reads the image: (per layer, the pooler or None, the image tower's blocks'
    self-attention that the image tokens come through: CoCa's, whose memory is the tower's last tokens)."""
    model = pipe.model
    if pipe.family == "llava":
        return [b.self_attn for b in model.language_model.layers], None, []
    if pipe.family == "coca":
        layers = [b.cross_attn for b in model.decoder.layers if b.cross_attn is not None]
        return layers, model.image_pool, [b.attn for b in model.visual.transformer.blocks]
    raise ConfigError(f"answer attribution is for LLaVA and CoCa models, not {pipe.family}")


def _image_columns(pipe, input_ids: Tensor) -> tuple[Tensor | None, int]:
    """LLaVA: the image tokens' positions in the sequence (the class token dropped if kept) and the grid side;
    CoCa: None (the whole memory) and the side of the ViT's patch grid."""
    if pipe.family == "llava":
        positions = (input_ids[0] == pipe.image_token_id).nonzero()[:, 0]
        n = len(positions)
        if math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1:
            positions = positions[1:]  # vision_feature_select="full": the class token first
        return positions, _square(len(positions))
    v = pipe.model.cfg.vision
    return None, _square((v.image_size // v.patch_size) ** 2)


def _attention_maps(pipe, pixels, ids, labels, mask, with_grad: bool) -> tuple[Tensor, float]:
    """(L, g, g) per-layer maps (weighted by the gradient when `with_grad`) and the answer's log-probability."""
    from vlmkit.eval.saliency import relevance_matrix, rollout_matrix
    from vlmkit.nn.attention import record_attention

    layers, pool, tower = _attention_modules(pipe)
    starts, pool_start, tower_starts = [], [], []
    queries = (labels[0, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # positions t predicting token t + 1
    columns, g = _image_columns(pipe, ids)
    with ExitStack() as stack:
        maps = stack.enter_context(record_attention(retain_grad=with_grad))
        for found, modules in (
            (starts, layers),
            (pool_start, [pool] if pool is not None else []),
            (tower_starts, tower),
        ):
            for m in modules:
                hook = m.register_forward_pre_hook(lambda mod, args, found=found: found.append(len(maps)))
                stack.callback(hook.remove)
        with torch.enable_grad() if with_grad else torch.no_grad():
            score = pipe.answer_log_prob(pixels, ids, labels, mask)[0]
            if with_grad:
                score.backward()
    out = []
    for i in starts:
        a = maps[i]  # (1, nh, T, S)
        w = (a.grad * a).clamp(min=0) if with_grad else a
        w = w[0].float().mean(0)[queries]  # (answer positions, S)
        out.append(w[:, columns].mean(0) if columns is not None else w.mean(0))  # (N,) or (M,)
    per_layer = torch.stack(out)  # (L, N or M)
    if pool is not None:  # CoCa's pooled memory: through the pooler's attention to the ViT tokens
        through = maps[pool_start[0]][0].float().mean(0)  # (Q, prefix + P)
        per_layer = per_layer @ through.detach()
    if tower_starts:  # CoCa's memory is the tower's last tokens: back to its input patches through its blocks
        tower_maps = [maps[i] for i in tower_starts]
        mix = relevance_matrix(tower_maps) if with_grad else rollout_matrix(tower_maps)  # (1, T, T)
        per_layer = per_layer @ mix[0].detach()
    if per_layer.shape[1] != g * g:  # the ViT's tokens with their class token
        per_layer = per_layer[:, per_layer.shape[1] - g * g :]
    return per_layer.detach().view(-1, g, g), float(score.detach())


def _answer_scorer(pipe, ids: Tensor, labels: Tensor, mask: Tensor):
    """images (N, 3, S, S) -> (N,) the one answer's log-probability given each image."""

    def score(pixels: Tensor) -> Tensor:
        n = pixels.shape[0]
        return pipe.answer_log_prob(pixels, ids.expand(n, -1), labels.expand(n, -1), mask.expand(n, -1))

    return score


@torch.no_grad()
def _occlusion(pipe, pixels, ids, labels, mask, boxes, image_size, batch_size: int = 16):
    S = pixels.shape[-1]
    p = pipe.model.cfg.vision.patch_size
    g = S // p
    fill = pixels.mean(dim=(2, 3), keepdim=True)  # (1, 3, 1, 1) the image's mean colour
    regions = [(c * p, r * p, (c + 1) * p, (r + 1) * p) for r in range(g) for c in range(g)]
    sx, sy = S / image_size[0], S / image_size[1]
    regions += [
        (int(b[0] * sx), int(b[1] * sy), math.ceil(b[2] * sx), math.ceil(b[3] * sy)) for b in boxes or []
    ]
    variants = []
    for x0, y0, x1, y1 in regions:
        x = pixels.clone()
        x[..., y0:y1, x0:x1] = fill
        variants.append(x)
    score = _answer_scorer(pipe, ids, labels, mask)
    base = float(score(pixels)[0])
    scores = [score(torch.cat(variants[i : i + batch_size])) for i in range(0, len(variants), batch_size)]
    drop = base - torch.cat(scores).float().cpu()
    return drop[: g * g].view(g, g), drop[g * g :].tolist(), base


def _attribute(
    pipe, pixels, ids, labels, mask, method: str, boxes=None, image_size=None
) -> AnswerAttribution:
    """`method`'s attribution of one scored answer (ids, labels, mask) to one image (1, 3, S, S)."""
    if method == "occlusion":
        size = image_size or (pixels.shape[-1], pixels.shape[-2])
        grid, objects, base = _occlusion(pipe, pixels, ids, labels, mask, boxes, size)
        return AnswerAttribution(method, grid, base, objects=objects)
    try:
        per_layer, base = _attention_maps(pipe, pixels, ids, labels, mask, method == "grad-attention")
    finally:
        pipe.model.zero_grad(set_to_none=True)
    grid = per_layer.mean(0) if method == "attention" else per_layer.sum(0)
    return AnswerAttribution(method, grid, base, per_layer=per_layer)


def explain_answer(
    pipe, image, question: str, answer: str, method: str = "grad-attention", boxes=None
) -> AnswerAttribution:
    """Attribute `answer` to `question` about `image` (a path or PIL image) to image regions with `method` (one of
    GENERATIVE_METHODS). `boxes` (x0, y0, x1, y1 in the image's pixels) are also occluded one by one."""
    from vlmkit.data.transforms import load_image

    if method not in GENERATIVE_METHODS:
        raise ConfigError(
            f"unknown method {method!r}; generative models have {', '.join(GENERATIVE_METHODS)}"
        )
    if not answer.strip():
        raise ConfigError("the answer to explain is empty")
    _attention_modules(pipe)  # the family check, before any work
    image = load_image(image) if not hasattr(image, "size") else image
    ids, labels, mask = pipe.scoring_batch([answer], prompt=question)
    pixels = pipe.pixel_values([image])
    was_training = pipe.model.training
    pipe.model.eval()
    try:
        return _attribute(pipe, pixels, ids, labels, mask, method, boxes, image.size)
    finally:
        pipe.model.train(was_training)


class GenerativeMaps:
    """What `vlmkit.eval.saliency_eval.evaluate_saliency` asks of a model, for LLaVA / CoCa: each query is the
    question about one object ("what colour is the star?") with its true answer, teacher-forced; the score that
    deletion and insertion follow is the answer's log-probability."""

    def __init__(self, pipe, preprocess):
        _attention_modules(pipe)  # LLaVA or CoCa, in one line otherwise
        self.pipe, self.preprocess = pipe, preprocess
        pipe.model.eval()

    def methods(self, requested) -> tuple[list[str], dict[str, str]]:
        for m in requested or ():
            if m not in GENERATIVE_METHODS:
                raise ConfigError(
                    f"unknown method {m!r}; generative models have {', '.join(GENERATIVE_METHODS)}"
                )
        return list(requested or GENERATIVE_METHODS), {}

    def usable(self, query: dict) -> bool:
        return query.get("question") is not None

    def label(self, query: dict) -> str:
        """How the report names a query: the question and its answer."""
        return f"{query['question']}\n{query['answer']}"

    def pixels(self, images: list) -> Tensor:
        return self.pipe.pixel_values(images)

    def _batch(self, query: dict):
        return self.pipe.scoring_batch([query["answer"]], prompt=query["question"])

    def maps(self, chunk: list[dict], pixels: Tensor, method: str) -> Tensor:
        grids = [
            _attribute(self.pipe, pixels[k : k + 1], *self._batch(q), method).grid
            for k, q in enumerate(chunk)
        ]
        return torch.stack(grids).cpu()

    def scorer(self, query: dict):
        return _answer_scorer(self.pipe, *self._batch(query))

    def random_init(self, seed: int) -> GenerativeMaps:
        from vlmkit.inference.generate import VLMPipeline
        from vlmkit.models.registry import build_model

        torch.manual_seed(seed)
        model = build_model(self.pipe.model.cfg).to(self.pipe.device)
        pipe = VLMPipeline(
            model, self.pipe.tokenizer, self.preprocess, self.pipe.device, precision=self.pipe.precision
        )
        return GenerativeMaps(pipe, self.preprocess)


__all__ = ["GENERATIVE_METHODS", "AnswerAttribution", "GenerativeMaps", "explain_answer"]
