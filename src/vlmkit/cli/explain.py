"""`vlmkit explain`: where in the image a model's answer comes from (saliency maps); `vlmkit eval saliency`:
the methods scored on known object boxes."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.cli.common import add_model_arg, device_of, require_tokenizer


def register(sub, ev) -> None:
    from vlmkit.eval.saliency import METHODS

    p = sub.add_parser("explain", help="a saliency map of an image for a text (dual encoders)")
    p.add_argument("--model", required=True, help="a CLIP/SigLIP model folder")
    p.add_argument("--image", required=True, help="the image file")
    p.add_argument("--text", required=True, help="the text whose similarity to the image is explained")
    p.add_argument("--method", default="relevance", choices=METHODS, help="default relevance (Chefer et al.)")
    p.add_argument(
        "--out", required=True, help="folder for saliency.npy (the image's size), overlay.png, explain.json"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_explain)

    p = ev.add_parser(
        "saliency",
        help="saliency methods scored on known object boxes: (class-sensitive) pointing game, box IoU, "
        "deletion/insertion, against centre/random/uniform controls and a randomly initialised model",
    )
    add_model_arg(p)
    p.add_argument(
        "--data", required=True, help="a scene manifest with object boxes (vlmkit data synth's val.jsonl)"
    )
    p.add_argument(
        "--method",
        action="append",
        choices=METHODS,
        help="repeatable (default: every method the model allows)",
    )
    p.add_argument("--limit", type=int, default=300, help="queries per group (2-object, 3+-object scenes)")
    p.add_argument(
        "--deletion-limit",
        type=int,
        default=60,
        help="queries with deletion/insertion curves (34 passes each)",
    )
    p.add_argument("--no-random-init", action="store_true", help="skip the randomly initialised model's rows")
    p.add_argument("--out", help="folder for saliency.json, examples.png and report.html (default: print)")
    p.set_defaults(func=cmd_eval_saliency, batch_size=32)

    p = sub.add_parser(
        "decompose",
        help="a ViT image tower's embedding as the sum of its layers' and heads' contributions: mean-ablation "
        "and heads described in words (TextSpan), measured by zero-shot accuracy",
    )
    add_model_arg(p)
    p.add_argument("--data", required=True, help="an ImageFolder (one folder of images per class)")
    texts = p.add_mutually_exclusive_group(required=True)
    texts.add_argument(
        "--captions", help="a manifest whose captions' 1-3 word phrases are the candidate texts"
    )
    texts.add_argument("--texts", help="a file of candidate texts, one per line")
    p.add_argument(
        "--templates", action="append", help="zero-shot template with {} or a file of them (repeatable)"
    )
    p.add_argument("--texts-per-head", type=int, default=5)
    p.add_argument(
        "--span-layers", type=int, help="TextSpan on the heads of the last K layers (default: all)"
    )
    p.add_argument("--out", required=True, help="folder for decomposition.json, ablation.png and report.html")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser(
        "atlas",
        help="a neuron atlas of an image tower's layer: top images, best-aligned words, selectivity for "
        "colour/shape/size/position",
    )
    add_model_arg(p)
    p.add_argument("--layer", type=int, required=True, help="the block, 0 = the first")
    p.add_argument(
        "--data", required=True, help="a JSONL manifest (vlmkit data synth's; objects give selectivity)"
    )
    p.add_argument(
        "--units", choices=["mlp", "residual"], default="mlp", help="MLP neurons or residual directions"
    )
    p.add_argument(
        "--reduce", choices=["mean", "cls", "max"], default="mean", help="over the tokens (default mean)"
    )
    p.add_argument("--limit", type=int, default=2000, help="images read from the manifest")
    p.add_argument("--threshold", type=float, default=0.5, help="eta^2 a selective unit reaches")
    p.add_argument("--out", required=True, help="folder for atlas.html, atlas.json and the thumbnails")
    p.set_defaults(func=cmd_atlas)


def cmd_explain(args) -> None:
    import numpy as np
    import torch

    from vlmkit.convert import load_pretrained
    from vlmkit.data.transforms import load_image
    from vlmkit.errors import ConfigError, DataError
    from vlmkit.eval.saliency import explain_dual_encoder, to_image_size
    from vlmkit.inference.embed import load_images
    from vlmkit.models.registry import task_name

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    if task_name(pt.model.cfg) != "contrastive":
        raise ConfigError(
            f"{args.model} is not a dual encoder; vlmkit explain takes CLIP/SigLIP folders so far"
        )
    if pt.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer.json")
    if not args.text.strip():
        raise ConfigError("--text is empty")
    if not Path(args.image).is_file():
        raise DataError(f"image not found: {args.image}")
    image = load_image(args.image)
    model = pt.model.eval()
    pixels = load_images([image], pt.preprocess).to(device)
    with torch.no_grad():
        text = model.encode_text(pt.tokenizer([args.text]).to(device))
    patch_map = explain_dual_encoder(model, pixels, text, args.method)
    full = to_image_size(patch_map.cpu(), image.size)[0].numpy().astype(np.float32)  # (H, W)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "saliency.npy", full)
    _overlay(image, full, out / "overlay.png", f"{args.method}: {args.text}")
    y, x = np.unravel_index(int(full.argmax()), full.shape)
    meta = {"model": args.model, "image": args.image, "text": args.text, "method": args.method,
            "size": list(image.size), "max_at": [int(x), int(y)]}  # fmt: skip
    (out / "explain.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{args.method} map -> {out / 'saliency.npy'} and {out / 'overlay.png'} (maximum at x={x}, y={y})")


def cmd_eval_saliency(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.errors import ConfigError
    from vlmkit.eval.saliency_eval import evaluate_saliency
    from vlmkit.models.registry import task_name

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    if task_name(pt.model.cfg) != "contrastive":
        raise ConfigError(f"{args.model} is not a dual encoder; eval saliency scores CLIP/SigLIP folders")
    results = evaluate_saliency(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        args.method,
        limit=args.limit,
        deletion_limit=args.deletion_limit,
        random_init=not args.no_random_init,
        batch_size=args.batch_size,
        device=device,
        model_name=args.model,
        out_dir=args.out,
    )
    if args.out:
        m = results["metrics"]

        def f(v):
            return "  -  " if v is None else f"{v:.3f}"

        print(f"{'method':>13} {'model':>11}  class-sensitive (2 objects, 3+)  pointing  box IoU")
        for r in m["rows"]:
            print(f"{r['method']:>13} {r['model']:>11}  {f(r['class_sensitive_2']):>19} {f(r['class_sensitive_3+'])}"
                  f"     {f(r['pointing'])}    {f(r['iou'])}")  # fmt: skip
        print(f"report: {Path(args.out) / 'report.html'}")
    else:
        print(json.dumps(results, indent=2))


def cmd_decompose(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.errors import ConfigError, DataError
    from vlmkit.eval.decompose import caption_phrases, evaluate_decomposition
    from vlmkit.models.registry import task_name

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    if task_name(pt.model.cfg) != "contrastive":
        raise ConfigError(f"{args.model} is not a dual encoder; vlmkit decompose takes CLIP/SigLIP folders")
    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            raise DataError(f"--texts {path}: file not found")
        texts = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
        if not texts:
            raise DataError(f"--texts {path}: no texts")
    else:
        texts = caption_phrases(args.captions)
    res = evaluate_decomposition(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        texts,
        args.templates,
        texts_per_head=args.texts_per_head,
        span_layers=args.span_layers,
        batch_size=args.batch_size,
        device=device,
        model_name=args.model,
        out_dir=args.out,
    )
    m = res["metrics"]
    ts = m["text_span"]
    print(f"sum of the contributions - embedding: max |error| {m['sum_max_abs_error']:.1e}")
    print(f"zero-shot accuracy {m['accuracy']:.3f}; heads as text reconstructions {ts['accuracy_heads_reconstructed']:.3f}"
          f", as their means {ts['accuracy_heads_mean']:.3f}")  # fmt: skip
    worst = min(m["ablation"], key=lambda a: a["accuracy"])
    print(f"largest mean-ablation drop: layer {worst['layer']} {worst['component']}"
          f"{'' if worst['head'] is None else ' ' + str(worst['head'])} -> {worst['accuracy']:.3f}")  # fmt: skip
    for h in ts["heads"]:
        print(f"  layer {h['layer']} head {h['head']}: {'; '.join(h['texts'])}")
    print(f"report: {Path(args.out) / 'report.html'}")


def cmd_atlas(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.errors import ConfigError
    from vlmkit.eval.atlas import ATTRIBUTES, build_atlas
    from vlmkit.models.registry import task_name

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    if task_name(pt.model.cfg) != "contrastive":
        raise ConfigError(f"{args.model} is not a dual encoder; vlmkit atlas takes CLIP/SigLIP folders")
    res = build_atlas(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        args.layer,
        units=args.units,
        reduce=args.reduce,
        limit=args.limit,
        threshold=args.threshold,
        batch_size=args.batch_size,
        device=device,
        model_name=args.model,
        out_dir=args.out,
    )
    m = res["metrics"]
    print(f"layer {args.layer}: {m['num_units']} {args.units} units over {m['num_images']} images")
    if m["selective"] is not None:
        for a in ATTRIBUTES:
            print(
                f"  selective for {a:<8} {m['selective'][a]:>4}  (shuffled labels: {m['selective_shuffled_labels'][a]})"
            )
        print(f"  multimodal (best word names the preferred value): {m['multimodal']}")
    print(f"atlas: {Path(args.out) / 'atlas.html'}")


def _overlay(image, saliency, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(image)
    axes[1].imshow(image)
    axes[1].imshow(saliency, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
