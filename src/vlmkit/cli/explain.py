"""`vlmkit explain`: where in the image a model's answer comes from (saliency maps); `vlmkit eval saliency`:
the methods scored on known object boxes."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.cli.common import add_model_arg, device_of, load_dual_encoder, require_tokenizer


def register(sub, ev) -> None:
    from vlmkit.eval.saliency import METHODS
    from vlmkit.inference.explain import GENERATIVE_METHODS

    p = sub.add_parser(
        "explain",
        help="a saliency map: where in the image a dual encoder's image-text similarity, or a generative "
        "model's answer, comes from",
    )
    p.add_argument("--model", required=True, help="a CLIP/SigLIP, LLaVA or CoCa model folder")
    p.add_argument("--image", required=True, help="the image file")
    p.add_argument("--text", help="dual encoders: the text whose similarity to the image is explained")
    p.add_argument("--question", help="generative models: the question (default: 'Describe the image.')")
    p.add_argument(
        "--answer", help="generative models: the answer to explain (default: the model's own, greedy)"
    )
    p.add_argument(
        "--method",
        choices=list(dict.fromkeys(METHODS + GENERATIVE_METHODS)),
        help="dual encoders: "
        + ", ".join(METHODS)
        + " (default relevance, Chefer et al.); generative models: "
        + ", ".join(GENERATIVE_METHODS)
        + " (default grad-attention)",
    )
    p.add_argument(
        "--box", action="append", help="generative models, occlusion: also occlude this box x0,y0,x1,y1"
    )
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
        choices=list(dict.fromkeys(METHODS + GENERATIVE_METHODS)),
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
    from vlmkit.eval.saliency import METHODS, explain_dual_encoder, to_image_size
    from vlmkit.inference.embed import load_images
    from vlmkit.models.registry import task_name

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    if pt.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer.json")
    if not Path(args.image).is_file():
        raise DataError(f"image not found: {args.image}")
    image = load_image(args.image)
    out = Path(args.out)
    meta = {"model": args.model, "image": args.image, "size": list(image.size)}
    if task_name(pt.model.cfg) == "contrastive":
        method = args.method or "relevance"
        if method not in METHODS:
            raise ConfigError(
                f"--method {method} is for generative models; dual encoders have {', '.join(METHODS)}"
            )
        if not args.text or not args.text.strip():
            raise ConfigError("--text is needed for a dual encoder (the text whose similarity is explained)")
        model = pt.model.eval()
        pixels = load_images([image], pt.preprocess).to(device)
        with torch.no_grad():
            text = model.encode_text(pt.tokenizer([args.text]).to(device))
        patch_map = explain_dual_encoder(model, pixels, text, method)
        title, per_layer = f"{method}: {args.text}", None
        meta.update(text=args.text, method=method)
    else:
        patch_map, per_layer, title = _explain_generative(args, pt, image, device, meta)
    full = to_image_size(patch_map.cpu(), image.size)[0]
    full = full.numpy().astype(np.float32)  # (H, W)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "saliency.npy", full)
    _overlay(image, full, out / "overlay.png", title)
    if per_layer is not None:
        _layers(image, to_image_size(per_layer.cpu(), image.size).numpy(), out / "per_layer.png")
    y, x = np.unravel_index(int(full.argmax()), full.shape)
    meta["max_at"] = [int(x), int(y)]
    (out / "explain.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(
        f"{meta['method']} map -> {out / 'saliency.npy'} and {out / 'overlay.png'} (maximum at x={x}, y={y})"
    )


def _explain_generative(args, pt, image, device, meta):
    from vlmkit.errors import ConfigError
    from vlmkit.inference import VLMPipeline
    from vlmkit.inference.explain import GENERATIVE_METHODS, explain_answer
    from vlmkit.inference.generate import CAPTION_PROMPT

    method = args.method or "grad-attention"
    if method not in GENERATIVE_METHODS:
        raise ConfigError(
            f"--method {method} is for dual encoders; generative models have {', '.join(GENERATIVE_METHODS)}"
        )
    if args.text:
        raise ConfigError("--text is for dual encoders; a generative model takes --question and --answer")
    pipe = VLMPipeline(pt.model, pt.tokenizer, pt.preprocess, device=device, precision="fp32")
    question = args.question or CAPTION_PROMPT
    answer = args.answer
    if answer is None:
        answer = (pipe.caption([image]) if pipe.family == "coca" else pipe.answer([image], [question]))[0]
        print(f"the model answers: {answer!r}")
    boxes = []
    for b in args.box or []:
        try:
            x0, y0, x1, y1 = (int(v) for v in b.split(","))
        except ValueError:
            raise ConfigError(f"--box {b!r}: give four integers x0,y0,x1,y1") from None
        boxes.append([x0, y0, x1, y1])
    res = explain_answer(pipe, image, question, answer, method, boxes=boxes)
    meta.update(question=question, answer=answer, method=method, log_prob=res.log_prob)
    if res.objects is not None and boxes:
        meta["box_drops"] = [{"box": b, "log_prob_drop": d} for b, d in zip(boxes, res.objects)]
        for b, d in zip(boxes, res.objects):
            print(f"occluding box {b}: the answer's log-probability drops by {d:.3f}")
    return res.grid[None], res.per_layer, f"{method}: {question} -> {answer}"


def cmd_eval_saliency(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.saliency_eval import DualEncoderMaps, evaluate_saliency
    from vlmkit.inference import VLMPipeline
    from vlmkit.inference.explain import GenerativeMaps
    from vlmkit.models.registry import task_name

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    if task_name(pt.model.cfg) == "contrastive":
        provider = DualEncoderMaps(pt.model, require_tokenizer(pt, args.model), pt.preprocess, device)
    else:  # LLaVA / CoCa (VLMPipeline refuses the others in one line)
        pipe = VLMPipeline(
            pt.model, require_tokenizer(pt, args.model), pt.preprocess, device, precision="fp32"
        )
        provider = GenerativeMaps(pipe, pt.preprocess)
    results = evaluate_saliency(
        provider,
        args.data,
        args.method,
        limit=args.limit,
        deletion_limit=args.deletion_limit,
        random_init=not args.no_random_init,
        batch_size=args.batch_size,
        model_name=args.model,
        out_dir=args.out,
    )
    if args.out:
        m = results["metrics"]

        def f(v):
            return "  -  " if v is None else f"{v:.3f}"

        print(f"{'method':>20} {'model':>11}  class-sensitive (2 objects, 3+)  pointing  box IoU")
        for r in m["rows"]:
            print(f"{r['method']:>20} {r['model']:>11}  {f(r['class_sensitive_2']):>19} {f(r['class_sensitive_3+'])}"
                  f"     {f(r['pointing'])}    {f(r['iou'])}")  # fmt: skip
        print(f"report: {Path(args.out) / 'report.html'}")
    else:
        print(json.dumps(results, indent=2))


def cmd_decompose(args) -> None:
    from vlmkit.errors import DataError
    from vlmkit.eval.decompose import caption_phrases, evaluate_decomposition

    device = device_of(args.device)
    pt = load_dual_encoder(args.model, device, "vlmkit decompose")
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
        pt.tokenizer,
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
          f", from random texts {ts['accuracy_heads_random_texts']:.3f}, as their means {ts['accuracy_heads_mean']:.3f}")  # fmt: skip
    worst = min(m["ablation"], key=lambda a: a["accuracy"])
    print(f"largest mean-ablation drop: layer {worst['layer']} {worst['component']}"
          f"{'' if worst['head'] is None else ' ' + str(worst['head'])} -> {worst['accuracy']:.3f}")  # fmt: skip
    for h in ts["heads"]:
        print(f"  layer {h['layer']} head {h['head']}: {'; '.join(h['texts'])}")
    print(f"report: {Path(args.out) / 'report.html'}")


def cmd_atlas(args) -> None:
    from vlmkit.eval.atlas import ATTRIBUTES, build_atlas

    device = device_of(args.device)
    pt = load_dual_encoder(args.model, device, "vlmkit atlas")
    res = build_atlas(
        pt.model,
        pt.tokenizer,
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


def _layers(image, maps, path: Path) -> None:
    """One overlay per layer, in a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.0), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(image)
        ax.imshow(maps[i], cmap="jet", alpha=0.5)
        ax.set_title(f"layer {i}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
