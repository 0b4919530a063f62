"""`vlmkit generate-image` and `vlmkit eval text-to-image`: text-to-image models (dalle, flow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlmkit.cli.common import device_of


def _add_sampling(p) -> None:
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, 3)")
    p.add_argument("--steps", type=int, help="flow models: Euler steps (default: the model's, 32)")
    p.add_argument("--temperature", type=float, help="dalle models: sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, help="dalle models: sample among the k likeliest codes (default 64)")
    p.add_argument("--seed", type=int, default=0, help="image k of a prompt is drawn with seed + k")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=32, help="images generated at once")


def register(sub, ev) -> None:
    p = sub.add_parser("generate-image", help="images from a caption with a dalle or flow model")
    p.add_argument("--model", required=True, help="a dalle or flow model folder (a vlmkit training run)")
    p.add_argument("--prompt", action="append", required=True, help="the caption (repeatable)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument(
        "--rerank", metavar="CLIP_MODEL", help="a CLIP/SigLIP folder: order each prompt's images by it"
    )
    p.add_argument("--keep", type=int, help="with --rerank: write only the best K of each prompt")
    p.add_argument("--out", required=True, help="folder for the PNGs, grid.png and images.json")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate_image)

    p = ev.add_parser(
        "text-to-image", help="do generated images show what their prompts say? (issue 18's measures)"
    )
    p.add_argument("--model", required=True, help="a dalle or flow model folder")
    p.add_argument(
        "--prompts",
        help="a .jsonl of {text, colour, shape, size, position} or a .txt of prompts (default: every size x "
        "colour x shape of the shapes data, one object each)",
    )
    p.add_argument(
        "--attributes",
        default="size,colour,shape,position",
        help="what the default prompts name, comma-separated (default size,colour,shape,position)",
    )
    p.add_argument("--num-images", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument(
        "--rerank", metavar="CLIP_MODEL", help="a CLIP folder that keeps each prompt's best sample"
    )
    p.add_argument(
        "--judge",
        metavar="CLIP_MODEL",
        help="another CLIP folder: CLIPScore, R-precision, KID/FID, diversity",
    )
    p.add_argument(
        "--data", help="real images, a manifest (e.g. data/shapes/val.jsonl): KID/FID, reader ceiling"
    )
    p.add_argument("--train-data", help="the training manifest: each sample's nearest training image")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--out", required=True, help="folder for text_to_image.json, samples.png and report.html")
    _add_sampling(p)
    p.set_defaults(func=cmd_eval_text_to_image)


def _sampling(args) -> dict:
    keys = ("guidance", "steps", "temperature", "top_k")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def cmd_generate_image(args) -> None:
    import torch

    from vlmkit.errors import ConfigError
    from vlmkit.eval.text_to_image import save_image_grid
    from vlmkit.inference.text_to_image import ClipScorer, TextToImagePipeline, rerank_by_clip, to_pil

    if args.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {args.num_images}")
    if args.keep is not None and (args.rerank is None or args.keep < 1):
        raise ConfigError("--keep K (K >= 1) goes with --rerank CLIP_MODEL")
    device = device_of(args.device)
    pipe = TextToImagePipeline.from_pretrained(args.model, device)
    pipe.check_prompts(args.prompt)
    scorer = ClipScorer(args.rerank, device) if args.rerank else None
    images = pipe.generate(args.prompt, args.num_images, seed=args.seed, batch_size=args.batch_size,
                           progress=True, **_sampling(args))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, kept = [], []
    for p, prompt in enumerate(args.prompt):
        order = torch.arange(args.num_images)
        scores = None
        if scorer is not None:
            order, scores = rerank_by_clip(scorer, images[p], prompt)
            order = order[: args.keep or len(order)]
        kept.append(images[p][order])
        for rank, (k, im) in enumerate(zip(order.tolist(), to_pil(images[p][order]), strict=True)):
            name = f"{p:02d}-{_slug(prompt)}-{rank if scorer else k:02d}.png"
            im.save(out / name)
            row = {"prompt": prompt, "file": name, "seed": args.seed + k}
            if scores is not None:
                row |= {"rank": rank, "clip_similarity": round(float(scores[rank]), 4)}
            rows.append(row)
    save_image_grid(kept, out / "grid.png")
    meta = {"model": args.model, "family": pipe.family, "sampling": pipe.settings(**_sampling(args)),
            "reranker": args.rerank, "images": rows}  # fmt: skip
    (out / "images.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{len(rows)} images -> {out} (grid.png, images.json)")


def cmd_eval_text_to_image(args) -> None:
    from vlmkit.errors import ConfigError
    from vlmkit.eval.text_to_image import save_image_grid, write_text_to_image_report
    from vlmkit.inference.text_to_image import (
        ClipScorer,
        TextToImagePipeline,
        default_prompts,
        evaluate_text_to_image,
        read_prompts,
    )

    if args.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {args.num_images}")
    if args.train_data and not (args.data and args.judge):
        raise ConfigError("--train-data (memorisation) needs --data and --judge too")
    device = device_of(args.device)
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(attributes)
    prompts = prompts[: args.limit] if args.limit else prompts
    pipe = TextToImagePipeline.from_pretrained(args.model, device)
    reranker = ClipScorer(args.rerank, device) if args.rerank else None
    judge = ClipScorer(args.judge, device) if args.judge else None
    results, images = evaluate_text_to_image(
        pipe, prompts, num_images=args.num_images, seed=args.seed, reranker=reranker, judge_clip=judge,
        real=args.data, train=args.train_data, **_sampling(args),
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_to_image.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    save_image_grid(list(images[:16]), out / "samples.png")
    report = write_text_to_image_report(results, [p["text"] for p in prompts[:16]], out)
    acc = results.get("accuracy", {})
    for name, row in acc.items():
        if isinstance(row, dict):
            print(name + ": " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    print(f"results -> {out / 'text_to_image.json'}; report -> {report}")
