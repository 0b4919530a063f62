"""Text-to-image generation with a vlmkit `dalle` or `flow` model folder, and CLIP reranking: what
`vlmkit generate-image` and `vlmkit eval text-to-image` run.

    pipe = TextToImagePipeline.from_pretrained("runs/flow-tiny-shapes")
    images = pipe.generate(["a red circle"], num_images=8, seed=0)   # uint8 (1, 8, 3, S, S)
    order, scores = rerank_by_clip(clip_folder, images[0], "a red circle")

Image k of a prompt is drawn with its own generator seeded `seed + k`, so one image can be made again alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlmkit.errors import ConfigError, DataError
from vlmkit.models.dalle import caption_ids

ATTRIBUTES = ("colour", "shape", "size", "position")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 images (N, 3, S, S) -> PIL RGB images."""
    return [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy())) for im in images]


class TextToImagePipeline:
    def __init__(self, model, tokenizer, preprocess, device: str | torch.device = "cpu", name: str = ""):
        from vlmkit.models.registry import model_family

        self.family = model_family(model.cfg)
        if self.family not in ("dalle", "flow"):
            raise ConfigError(
                f"{name or 'the model'} is a {self.family} model, not a text-to-image one (dalle, flow)"
            )
        if tokenizer is None:
            raise ConfigError(
                f"{name or 'the model'} has no tokenizer.json; a text-to-image model needs its tokenizer"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> TextToImagePipeline:
        from vlmkit.convert import load_pretrained

        pt = load_pretrained(path, device)
        return cls(pt.model, pt.tokenizer, pt.preprocess, device, name=str(path))

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @property
    def max_prompt_tokens(self) -> int:
        if self.family == "dalle":
            return self.model.cfg.max_text_len
        return self.tokenizer.context_length - 2  # the text tower's start and end tokens

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """A ConfigError naming the first empty or over-long prompt."""
        if not prompts:
            raise ConfigError("no prompt given")
        for i, text in enumerate(prompts, 1):
            if not text or not text.strip():
                raise ConfigError(f"prompt {i} is empty; describe the image to generate")
            n = len(self.tokenizer.encode(text))
            if n > self.max_prompt_tokens:
                raise ConfigError(
                    f"prompt {i} is {n} tokens long; {self.name or 'the model'} reads at most "
                    f"{self.max_prompt_tokens}: shorten it"
                )

    def _ids(self, prompts: list[str]):
        tok = self.tokenizer
        if self.family == "dalle":
            return caption_ids(tok, prompts, self.model.cfg.max_text_len)
        return tok(prompts)

    def defaults(self) -> dict:
        """The sampling settings generate uses unless told otherwise."""
        if self.family == "dalle":
            return dict(guidance=3.0, temperature=1.0, top_k=min(64, self.model.cfg.vqvae.codebook_size))
        return dict(guidance=self.model.cfg.guidance, steps=self.model.cfg.sample_steps)

    def settings(self, **sampling) -> dict:
        """The defaults with the given settings (None: the default) in place; a ConfigError for a setting this
        family does not have."""
        allowed = self.defaults()
        unknown = set(sampling) - set(allowed)
        if unknown:
            raise ConfigError(
                f"{self.family} models sample with {', '.join(sorted(allowed))}, not {', '.join(sorted(unknown))}"
            )
        return {**allowed, **{k: v for k, v in sampling.items() if v is not None}}

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        num_images: int = 1,
        *,
        seed: int = 0,
        batch_size: int = 32,
        progress: bool = False,
        **sampling,
    ) -> torch.Tensor:
        """uint8 images (P, N, 3, S, S): `num_images` per prompt. `sampling`: guidance, temperature and top_k
        (dalle) or guidance and steps (flow); see `defaults`."""
        from vlmkit.data.transforms import unnormalize

        prompts = list(prompts)
        self.check_prompts(prompts)
        if num_images < 1:
            raise ConfigError(f"num_images must be at least 1, got {num_images}")
        settings = self.settings(**sampling)
        jobs = [(p, k) for p in range(len(prompts)) for k in range(num_images)]
        out = torch.empty(len(prompts), num_images, 3, self.image_size, self.image_size, dtype=torch.uint8)
        bar = tqdm(total=len(jobs), desc="images", unit="img", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            ids = self._ids([prompts[p] for p, _ in chunk])
            generators = [torch.Generator().manual_seed(seed + k) for _, k in chunk]
            if self.family == "dalle":
                codes = self.model.sample(ids, generator=generators, **settings)
                pixels = self.model.decode(codes)
            else:
                pixels = self.model.sample(ids, generator=generators, **settings)
            images = unnormalize(pixels.float().cpu(), self.preprocess)
            for (p, k), im in zip(chunk, images, strict=True):
                out[p, k] = im
            bar.update(len(chunk))
        bar.close()
        return out


class ClipScorer:
    """Cosine similarity of images and texts in a vlmkit CLIP/SigLIP's embedding space (reranking, CLIPScore)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from vlmkit.convert import load_pretrained
        from vlmkit.models.registry import task_name

        pt = load_pretrained(path, device)
        if task_name(pt.model.cfg) != "contrastive":
            raise ConfigError(f"{path} is not a CLIP/SigLIP model folder; reranking and CLIPScore need one")
        if pt.tokenizer is None:
            raise ConfigError(f"{path} has no tokenizer.json")
        self.model, self.tokenizer, self.preprocess = pt.model.eval(), pt.tokenizer, pt.preprocess
        self.device = torch.device(device)
        self.path = str(path)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """uint8 images (N, 3, S, S) of any size -> unit-norm embeddings (N, D), in fp32."""
        from vlmkit.eval.features import encode_images
        from vlmkit.inference.embed import load_images

        pixels = load_images(to_pil(images), self.preprocess)
        return encode_images(self.model, pixels, batch_size, self.device, False)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, D), in fp32."""
        from vlmkit.eval.features import extract_text_features

        return extract_text_features(self.model, self.tokenizer, list(texts), device=self.device, bf16=False)

    def scores(self, images: torch.Tensor, text: str) -> torch.Tensor:
        """Cosine similarity of each image (N, 3, S, S) to one text: (N,)."""
        return self.image_features(images) @ self.text_features([text])[0]


def rerank_by_clip(
    scorer: ClipScorer, images: torch.Tensor, prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The order of `images` (N, 3, S, S) by the scorer's similarity to `prompt`, best first, and the
    similarities in that order."""
    from vlmkit.eval.text_to_image import rerank

    scores = scorer.scores(images, prompt)
    order = rerank(scores, len(scores))
    return order, scores[order]


# ---------------------------------------------------------------------------------------------- evaluation


def default_prompts(attributes: Sequence[str] = ATTRIBUTES) -> list[dict]:
    """Every size x colour x shape of the shapes vocabulary (those of them in `attributes`), one object each,
    and with "position" in `attributes` the nine positions dealt out in turn (each appears about equally
    often): the prompts `vlmkit eval text-to-image` uses by default."""
    from vlmkit.eval.text_to_image import POSITIONS, caption, single_object_prompts

    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown or not attributes:
        raise ConfigError(
            f"attributes are some of {', '.join(ATTRIBUTES)}, not {', '.join(sorted(unknown)) or 'none'}"
        )
    fixed = tuple(a for a in ("size", "colour", "shape") if a in attributes)
    rows = single_object_prompts(fixed) if fixed else [{}]
    out = []
    for i, row in enumerate(rows):
        attrs = {k: row[k] for k in fixed}
        if "position" in attributes:
            attrs["position"] = POSITIONS[i % len(POSITIONS)]
        out.append({**attrs, "text": caption(attrs)})
    return out


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts from a file: `.txt`, one prompt per line (no attributes to check), or `.jsonl`, one
    {"text": ..., and any of "colour", "shape", "size", "position"} per line. One-line errors name the line."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            out.append({"text": line.strip()})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg}); write one object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f'{path}:{n}: each line needs a "text" string')
        unknown = set(row) - {"text", *ATTRIBUTES}
        if unknown:
            raise DataError(f"{path}:{n}: unknown keys {sorted(unknown)}; use text, {', '.join(ATTRIBUTES)}")
        out.append(row)
    if not out:
        raise DataError(f"{path} has no prompts")
    return out


def judge(image: torch.Tensor, prompt: dict) -> dict[str, bool]:
    """Whether one generated image (3, S, S) uint8 shows what a one-object prompt says, read by the scene
    reader: the object count is one, and the largest object's attributes (those the prompt names) match."""
    from vlmkit.eval.scene_analysis import analyse

    found = analyse(image.permute(1, 2, 0).numpy())
    main = max(found, key=lambda o: o.area) if found else None
    result = {"count": len(found) == 1}
    for key in ATTRIBUTES:
        if prompt.get(key):
            result[key] = main is not None and getattr(main, key) == prompt[key]
    result["all_correct"] = all(result.values())
    return result


def _mean_rows(rows: list[dict[str, bool]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def real_images(manifest: str | Path, image_size: int, objects: int | None, limit: int) -> torch.Tensor:
    """uint8 images (N, 3, S, S) of a manifest, resized as the model sees them; with `objects`, only rows
    whose "objects" metadata (a `vlmkit data synth` manifest) lists that many."""
    import json

    from vlmkit.data.manifest import read_manifest
    from vlmkit.data.transforms import ImageTransform, PreprocessConfig, load_image

    samples, _ = read_manifest(manifest)
    if objects is not None and Path(manifest).suffix.lower() == ".jsonl":
        lines = Path(manifest).read_text(encoding="utf-8").splitlines()
        counts = {}
        for n, line in enumerate(lines, 1):
            row = json.loads(line) if line.strip() else {}
            if isinstance(row.get("objects"), list):
                counts[n] = len(row["objects"])
        if counts:
            samples = [s for s in samples if counts.get(s.line) == objects]
    if not samples:
        raise DataError(f"{manifest}: no usable images")
    transform = ImageTransform(PreprocessConfig(image_size=image_size), train=False, uint8=True)
    return torch.stack([transform(load_image(s.image)) for s in samples[:limit]])


def evaluate_text_to_image(
    pipe: TextToImagePipeline,
    prompts: list[dict],
    *,
    num_images: int = 8,
    seed: int = 0,
    reranker: ClipScorer | None = None,
    judge_clip: ClipScorer | None = None,
    real: str | Path | None = None,
    train: str | Path | None = None,
    real_limit: int = 1000,
    progress: bool = True,
    **sampling,
) -> tuple[dict, torch.Tensor]:
    """Generate `num_images` per prompt and measure them (see the README's text-to-image section): returns the
    results and the images (P, N, 3, S, S), reranked best first when a reranker is given.

    - per-attribute accuracy and all-correct rate by the scene reader, over every sample ("any sample") and, with
      a reranker, over each prompt's best-ranked sample ("reranked"); the reader's ceiling on `real`'s one-object
      scenes at the model's size;
    - with `judge_clip` (a CLIP other than the reranker): CLIPScore and R-precision against one-attribute foils;
    - with `real` (a manifest) and a judge: KID and FID between the samples and the real images in the judge's
      image-embedding space, beside the same between two halves of the real images (the floor); diversity;
    - with `train` too: each sample's distance to its nearest training image, beside held-out real images'.
    """
    from vlmkit.eval import text_to_image as m
    from vlmkit.eval.scene_analysis import check_against_metadata

    if (
        reranker is not None
        and judge_clip is not None
        and Path(reranker.path).resolve() == Path(judge_clip.path).resolve()
    ):
        raise ConfigError(
            "the judge CLIP must differ from the reranking CLIP (a reranker would grade its own pick)"
        )
    texts = [p["text"] for p in prompts]
    images = pipe.generate(texts, num_images, seed=seed, progress=progress, **sampling)
    P, N = images.shape[:2]
    results: dict = {"model": pipe.name, "family": pipe.family, "prompts": P, "images_per_prompt": N,
                     "seed": seed, "sampling": pipe.settings(**sampling)}  # fmt: skip
    rerank_scores = None
    if reranker is not None:
        order_rows, score_rows = [], []
        for p in range(P):
            order, scores = rerank_by_clip(reranker, images[p], texts[p])
            order_rows.append(order)
            score_rows.append(scores)
        images = torch.stack([images[p][order_rows[p]] for p in range(P)])
        rerank_scores = torch.stack(score_rows)
        results["reranker"] = reranker.path
    checked = [i for i, p in enumerate(prompts) if any(p.get(k) for k in ATTRIBUTES)]
    if checked:
        rows = [[judge(images[i, k], prompts[i]) for k in range(N)] for i in checked]
        results["accuracy"] = {"any_sample": _mean_rows([r for row in rows for r in row])}
        if reranker is not None:
            results["accuracy"]["reranked"] = _mean_rows([row[0] for row in rows])
            gain = (
                results["accuracy"]["reranked"]["all_correct"]
                - results["accuracy"]["any_sample"]["all_correct"]
            )
            results["accuracy"]["rerank_gain_all_correct"] = gain
    if real is not None and Path(real).suffix.lower() == ".jsonl" and checked:
        ceiling = check_against_metadata(real, limit=real_limit, image_size=pipe.image_size, objects=1)
        results["reader_ceiling"] = {**ceiling["accuracy"], "all_correct": ceiling["all_correct"],
                                     "images": ceiling["images"]}  # fmt: skip
    if judge_clip is not None:
        results["judge"] = judge_clip.path
        flat = images.flatten(0, 1)
        feats = judge_clip.image_features(flat).view(P, N, -1)
        text_feats = judge_clip.text_features(texts)
        picked = feats[:, 0]
        results["clip_score"] = {
            "any_sample": float(m.clip_score(feats.flatten(0, 1), text_feats.repeat_interleave(N, 0)).mean()),
            "first": float(m.clip_score(picked, text_feats).mean()),
        }
        foil_sets = [m.foils(prompts[i]) for i in checked]
        if checked and all(foil_sets):
            # every prompt's foils in one pass; prompts may name different attributes, so different counts
            foil_feats = judge_clip.text_features([f for fs in foil_sets for f in fs]).split(
                [len(fs) for fs in foil_sets]
            )
            any_sample, first = [], []
            for i, foil in zip(checked, foil_feats, strict=True):
                text, foil = text_feats[i].expand(N, -1), foil.expand(N, -1, -1)
                any_sample.append(m.r_precision(feats[i], text, foil))
                first.append(m.r_precision(feats[i, :1], text[:1], foil[:1]))
            results["r_precision"] = {
                "any_sample": float(np.mean(any_sample)),
                "first": float(np.mean(first)),
            }
        if N >= 2:
            results["diversity"] = float(np.mean([m.diversity(feats[p]) for p in range(P)]))
        if real is not None:
            real_imgs = real_images(real, pipe.image_size, 1 if checked else None, real_limit)
            real_feats = judge_clip.image_features(real_imgs)
            half = len(real_feats) // 2
            a, b = real_feats[:half].numpy(), real_feats[half : 2 * half].numpy()
            g = feats.flatten(0, 1).numpy()
            size = min(100, half, len(g))
            results["kid"] = {"generated_vs_real": m.kid(g, real_feats.numpy(), subset_size=size),
                              "real_vs_real": m.kid(a, b, subset_size=size)}  # fmt: skip
            results["fid"] = {"generated_vs_real": m.fid(g, real_feats.numpy()), "real_vs_real": m.fid(a, b)}
            results["real_images"] = len(real_feats)
            if N >= 2:
                results["real_diversity"] = m.diversity(real_feats[: min(len(real_feats), 200)])
            if train is not None:
                train_feats = judge_clip.image_features(
                    real_images(train, pipe.image_size, None, 5 * real_limit)
                )
                gen_d = m.nearest_distance(feats.flatten(0, 1), train_feats)
                real_d = m.nearest_distance(real_feats, train_feats)
                results["memorisation"] = {
                    "generated_median": float(gen_d.median()),
                    "held_out_real_median": float(real_d.median()),
                    "generated_closer_than_any_held_out": float((gen_d < real_d.min()).float().mean()),
                    "train_images": len(train_feats),
                }
    if rerank_scores is not None:
        results["rerank_similarity"] = {"best": float(rerank_scores[:, 0].mean()),
                                        "mean": float(rerank_scores.mean())}  # fmt: skip
    return results, images
