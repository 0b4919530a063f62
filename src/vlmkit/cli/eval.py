"""`vlmkit eval zeroshot|retrieval|compositional|templates|visual-prompts|linear-probe`: evaluations of a loaded model. (The generative
ones, `eval vqa|captioning`, are in cli/generate.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.cli.common import (
    add_classes_args,
    add_model_arg,
    device_of,
    emit,
    precision_of,
    require_tokenizer,
)


def register_eval(ev) -> None:
    """Add the subcommands to the `vlmkit eval` subparsers."""
    p = ev.add_parser("zeroshot", help="zero-shot classification on an ImageFolder")
    add_model_arg(p)
    p.add_argument("--data", required=True, help="ImageFolder: one subfolder of images (or videos) per class")
    add_classes_args(p)
    p.add_argument("--templates", action="append", help="template with {} or a file of them (repeatable)")
    p.add_argument("--num-frames", type=int, default=8, help="video: frames sampled uniformly per clip")
    p.add_argument("--output", help="results JSON (default: print)")
    p.set_defaults(func=cmd_eval_zeroshot)
    p = ev.add_parser("retrieval", help="image-text retrieval recall@1/5/10 on a manifest")
    add_model_arg(p)
    p.add_argument("--data", required=True, help="JSONL/CSV manifest of image (or video), caption, or shards")
    p.add_argument("--num-frames", type=int, default=8, help="video: frames sampled uniformly per clip")
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="K",
        help="fusion models: also rerank each query's K best ITC candidates by ITM + ITC, as BLIP does "
        "(itm_* recalls beside the ITC ones)",
    )
    p.add_argument("--output", help="results JSON (default: print)")
    p.set_defaults(func=cmd_eval_retrieval)
    p = ev.add_parser(
        "compositional",
        help="true captions against foils (attribute swaps, relations, counts, colours, shapes)",
    )
    add_model_arg(p)
    p.add_argument(
        "--data",
        required=True,
        help="rows of image, caption and foils (vlmkit data tasks writes val_compositional.jsonl)",
    )
    p.add_argument(
        "--scorer",
        choices=["itm", "itc", "cosine", "likelihood"],
        help="how pairs are scored (default: the model's own: cosine for dual encoders, ITM for fusion "
        "models, caption likelihood for CoCa/LLaVA)",
    )
    p.add_argument(
        "--out", help="folder for compositional.json, the predictions and report.html (default: print)"
    )
    p.set_defaults(func=cmd_eval_compositional)
    p = ev.add_parser(
        "templates",
        help="zero-shot prompts measured: each template alone, the ensemble, forward selection, class descriptions",
    )
    add_model_arg(p)
    p.add_argument("--data", required=True, help="ImageFolder the accuracies are measured on")
    p.add_argument(
        "--select-data",
        help="another ImageFolder of the same classes to select templates on (forward selection)",
    )
    add_classes_args(p)
    p.add_argument(
        "--templates",
        action="append",
        help="template with {}, a built-in set (default, imagenet80, clip7) or a file of them (repeatable; "
        "default: imagenet80)",
    )
    p.add_argument(
        "--descriptions", help="JSON {class name: [sentences]} (CuPL-style), averaged like templates"
    )
    p.add_argument("--out", required=True, help="folder for templates.json, templates.png and report.html")
    p.set_defaults(func=cmd_eval_templates)
    p = ev.add_parser(
        "visual-prompts",
        help="referring to one object of a scene by a circle, a box, a crop or blurring the rest, on known boxes",
    )
    add_model_arg(p)
    p.add_argument(
        "--data", required=True, help="a scene manifest with object boxes (vlmkit data synth's val.jsonl)"
    )
    p.add_argument("--templates", action="append", help="zero-shot templates (default: 'a {}.')")
    p.add_argument("--limit", type=int, default=300, help="referred objects per group of 2 and 3+ objects")
    p.add_argument(
        "--out", required=True, help="folder for visual_prompts.json, examples.png and report.html"
    )
    p.set_defaults(func=cmd_eval_visual_prompts)
    p = ev.add_parser("linear-probe", help="logistic regression on frozen image features")
    add_model_arg(p)
    p.add_argument("--train", required=True, help="ImageFolder to fit the probe on")
    p.add_argument("--data", required=True, help="ImageFolder to test the probe on")
    add_classes_args(p)
    p.add_argument("--output", help="results JSON (default: print)")
    p.set_defaults(func=cmd_eval_linear_probe)


def cmd_eval_zeroshot(args) -> None:
    from vlmkit.cli.video import cmd_eval_video, is_video_data
    from vlmkit.convert import load_pretrained

    if is_video_data(args.data):
        return cmd_eval_video(args, "zeroshot")
    from vlmkit.eval.templates import load_templates
    from vlmkit.eval.zeroshot import evaluate_zeroshot

    pt = load_pretrained(args.model, device_of(args.device))
    out_dir = Path(args.output).parent if args.output else None
    results = evaluate_zeroshot(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        templates=load_templates(args.templates),
        classes_file=args.classes,
        positional_classes=args.positional_classes,
        batch_size=args.batch_size,
        device=device_of(args.device),
        bf16=precision_of(args, device_of(args.device)).bf16,
        model_name=args.model,
        out_dir=out_dir,
    )
    emit(results, args.output)


def cmd_eval_templates(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.prompts import evaluate_templates
    from vlmkit.eval.templates import load_templates

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    res = evaluate_templates(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        load_templates(args.templates or ["imagenet80"]),
        select_data=args.select_data,
        descriptions=args.descriptions,
        classes_file=args.classes,
        batch_size=args.batch_size,
        device=device,
        bf16=precision_of(args, device).bf16,
        model_name=args.model,
        out_dir=args.out,
    )
    for r in res["metrics"]["rows"]:
        print(f"{r['accuracy']:.3f}  {r['prompts']}")
    print(f"report: {Path(args.out) / 'report.html'}")


def cmd_eval_visual_prompts(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.templates import load_templates
    from vlmkit.eval.visual_prompts import evaluate_visual_prompts

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    res = evaluate_visual_prompts(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        templates=load_templates(args.templates or ["a {}."]),
        limit=args.limit,
        batch_size=args.batch_size,
        device=device,
        model_name=args.model,
        out_dir=args.out,
    )
    m = res["metrics"]
    print(
        f"{m['num_queries']} referred objects; chance among the scene's objects {m['chance_among_scene_objects']:.3f}"
    )
    for kind, r in m["prompts"].items():
        print(
            f"{kind:>8}: names the referred object {r['right']:.3f}, another object of the scene {r['other_object']:.3f}"
        )
    print(f"report: {Path(args.out) / 'report.html'}")


def cmd_eval_compositional(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.compositional import evaluate_compositional
    from vlmkit.inference.score import pair_scorer

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    tokenizer = require_tokenizer(pt, args.model)
    name, score_fn = pair_scorer(
        pt.model, tokenizer, pt.preprocess, device, precision_of(args, device).bf16, args.scorer
    )
    results = evaluate_compositional(
        score_fn, args.data, out_dir=args.out, scorer=name, model_name=args.model, batch_size=args.batch_size
    )
    print(json.dumps(results, indent=2))


def cmd_eval_retrieval(args) -> None:
    from vlmkit.cli.video import cmd_eval_video, is_video_data
    from vlmkit.convert import load_pretrained

    if is_video_data(args.data):
        if args.rerank:
            from vlmkit.errors import ConfigError

            raise ConfigError("--rerank is for image retrieval with fusion models, not video")
        return cmd_eval_video(args, "retrieval")
    from vlmkit.eval.retrieval import evaluate_retrieval

    pt = load_pretrained(args.model, device_of(args.device))
    out_dir = Path(args.output).parent if args.output else None
    results = evaluate_retrieval(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        batch_size=args.batch_size,
        device=device_of(args.device),
        bf16=precision_of(args, device_of(args.device)).bf16,
        model_name=args.model,
        out_dir=out_dir,
        rerank=args.rerank,
    )
    emit(results, args.output)


def cmd_eval_linear_probe(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.linear_probe import evaluate_linear_probe

    pt = load_pretrained(args.model, device_of(args.device))
    results = evaluate_linear_probe(
        pt.model,
        pt.preprocess,
        args.train,
        args.data,
        classes_file=args.classes,
        positional_classes=args.positional_classes,
        batch_size=args.batch_size,
        device=device_of(args.device),
        bf16=precision_of(args, device_of(args.device)).bf16,
        model_name=args.model,
    )
    emit(results, args.output)
