"""The `vlmkit` command. Each subcommand is a thin wrapper over a library function.

    vlmkit quickstart
    vlmkit env
    vlmkit data synth --out data/shapes
    vlmkit data shard --input data/shapes/train.jsonl --out data/shards --shard-size 1000 --image-size 64
    vlmkit data filter --input data/shards --out data/curated --min-side 16 --dedup-images
    vlmkit data curation-demo --out runs/curation
    vlmkit train --recipe clip-tiny --train-data data/shapes/train.jsonl --out runs/demo --time-budget 5
    vlmkit eval zeroshot --model runs/demo --data data/shapes/classification/val --output zs.json
    vlmkit eval retrieval --model runs/demo --data data/shapes/val.jsonl --output ret.json
    vlmkit eval linear-probe --model runs/demo --train IMAGEFOLDER --data IMAGEFOLDER
    vlmkit embed --model runs/demo --image a.png --text "a red circle" --output emb.safetensors
    vlmkit classify --model runs/demo --image a.png --labels "red circle" "blue square"
    vlmkit export --model runs/demo --out hf/demo
    vlmkit train --init-from runs/demo --train-data ft.jsonl --out runs/ft --lora-rank 8
    vlmkit wise-ft --zeroshot runs/demo --finetuned runs/ft --alpha 0.5 --out runs/wise
    vlmkit transfer-demo --out runs/transfer

User mistakes (a missing file, an unknown key, unusable data) print one line and exit with 2.
Command groups live beside it: eval.py (`vlmkit eval`), generate.py (captioning, chat, VQA), curation.py
and shards.py (`vlmkit data ...`), transfer.py, export.py; common.py holds the shared flags and helpers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vlmkit.cli.common import add_model_arg, device_of, precision_of, require_tokenizer
from vlmkit.errors import ConfigError, VlmkitError


def build_parser() -> argparse.ArgumentParser:
    from vlmkit.cli.common import add_precision_arg

    parser = argparse.ArgumentParser(
        prog="vlmkit", description="Vision-language models: train, evaluate, embed."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="synthetic data -> train a small CLIP -> evaluate -> report.html")
    p.add_argument("--out", default="runs/quickstart", help="folder for data, run and report")
    p.add_argument("--time-budget", type=float, default=4.2, help="minutes of training (default 4.2)")
    p.add_argument("--recipe", default="clip-tiny", help="clip-tiny, siglip-tiny or flip-tiny")
    p.add_argument("--seed", type=int, default=0)
    add_precision_arg(p)
    p.set_defaults(func=cmd_quickstart)

    data = sub.add_parser("data", help="datasets").add_subparsers(
        dest="data_command", required=True, metavar="CMD"
    )
    p = data.add_parser("synth", help="write the built-in synthetic 'shapes' dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.3, help="background noise strength, 0 to 1")
    p.add_argument("--per-class-train", type=int, default=20, help="classification images per class (train)")
    p.add_argument("--per-class-val", type=int, default=10, help="classification images per class (val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--object-weights",
        help="relative odds of scenes with 1,2,3,4 objects, e.g. 4,2,1,1 (default uniform)",
    )
    noise = p.add_argument_group("web-scrape noise in the train split (each row records its 'corruption')")
    noise.add_argument("--mismatch-fraction", type=float, default=0.0, help="captions of other scenes")
    noise.add_argument("--duplicate-fraction", type=float, default=0.0, help="copies of a few popular images")
    noise.add_argument("--tiny-fraction", type=float, default=0.0, help="images shrunk to 8x8 px")
    noise.add_argument("--blank-fraction", type=float, default=0.0, help="flat grey images")
    p.add_argument(
        "--marked-fraction",
        type=float,
        default=0.0,
        help="train scenes with a circle or box around one object and a caption naming it alone (visual prompts)",
    )
    bias = p.add_argument_group(
        "a known bias (vlmkit.data.bias): one shape per image, an attribute correlated with it in train, "
        "balanced in val and test"
    )
    bias.add_argument(
        "--bias", metavar="ATTRIBUTE", help="the sensitive attribute: background (warm/cool tint)"
    )
    bias.add_argument(
        "--bias-strength",
        type=float,
        default=0.9,
        metavar="RHO",
        help="P(the shape's majority attribute | shape) in train; 0.5 = no correlation (default 0.9)",
    )
    bias.add_argument("--bias-in-captions", action="store_true", help="captions name the attribute too")
    bias.add_argument("--num-test", type=int, default=500, help="balanced test images")
    p.set_defaults(func=cmd_data_synth)
    from vlmkit.cli.shards import register_cli as register_shard
    from vlmkit.cli.shards import register_documents_cli

    register_shard(data)
    register_documents_cli(data)
    from vlmkit.cli.transfer import register_manifest_cli

    register_manifest_cli(data)
    from vlmkit.cli.curation import register_cli as register_filter

    register_filter(data)
    p = data.add_parser(
        "curation-demo",
        help="train on a noisy synthetic pool and on its curated subset at equal compute; compare",
    )
    p.add_argument("--out", default="runs/curation", help="folder for the pool, shards, runs and plot")
    p.add_argument("--time-budget", type=float, default=3.0, help="minutes for the noisy run (default 3)")
    p.add_argument("--recipe", default="clip-tiny", help="clip-tiny, siglip-tiny or flip-tiny")
    p.add_argument("--top-fraction", type=float, default=0.6, help="model-score filter: fraction kept")
    p.add_argument("--seed", type=int, default=0)
    add_precision_arg(p)
    p.set_defaults(func=cmd_curation_demo)

    p = sub.add_parser(
        "train",
        help="train a model: CLIP/SigLIP, or CoCa/LLaVA recipes (torchrun -m vlmkit train ... for several processes)",
    )
    p.add_argument("--recipe", default="clip-tiny", help="a named recipe (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    p.add_argument(
        "--task",
        choices=["prompt-learning"],
        help="prompt-learning: CoOp/CoCoOp prompts on the frozen dual encoder of --init-from, K shots per base "
        "class of the ImageFolder --train-data, measured base-to-new on --zeroshot-data (--set shots=16 "
        "n_ctx=4 init='a photo of a' position=end|middle|front per_class=true meta_net=true base_classes=a,b)",
    )
    p.add_argument("--train-data", help="JSONL/CSV manifest of image (relative to the manifest) and caption")
    p.add_argument("--val-data", help="manifest for periodic validation (retrieval recall)")
    p.add_argument("--zeroshot-data", help="ImageFolder for periodic and final zero-shot accuracy")
    p.add_argument(
        "--templates", action="append", help="zero-shot template with {} or a file of them (repeatable)"
    )
    p.add_argument("--out", help="run folder (default runs/<recipe>)")
    p.add_argument("--time-budget", type=float, help="minutes: stop gracefully then, save and evaluate")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one on the captions)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--max-bad-fraction", type=float, help="stop if more than this fraction of rows is bad (0.01)"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--smoke", action="store_true", help="shrink the recipe to a seconds-long test run")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field by its path in the config tree or its short name, e.g. "
        "--set optim.lr=1e-3 (or lr=1e-3) --set model_overrides.vision.layers=6 (repeatable; "
        "--print-config shows the tree)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the run's whole config (JSON) and exit without training",
    )
    from vlmkit.cli.transfer import add_transfer_args

    add_transfer_args(p)
    p.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(
        dest="eval_command", required=True, metavar="TASK"
    )
    from vlmkit.cli.eval import register_eval

    register_eval(ev)

    p = sub.add_parser("embed", help="embed images and/or texts")
    add_model_arg(p)
    p.add_argument("--image", nargs="*", default=[], help="image files")
    p.add_argument("--text", nargs="*", default=[], help="texts")
    p.add_argument("--output", help="a .safetensors or .npy file (default: print a summary)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("classify", help="score one image against labels")
    add_model_arg(p)
    p.add_argument("--image", required=True)
    p.add_argument("--labels", nargs="+", required=True, help="candidate labels")
    p.add_argument("--templates", action="append", help="template with {} or a file of them (repeatable)")
    p.set_defaults(func=cmd_classify)

    from vlmkit.cli.generate import register as register_generative

    register_generative(sub, ev, data)
    from vlmkit.cli.video import register as register_video

    register_video(sub, ev, data)
    from vlmkit.cli.serve import register as register_serve

    register_serve(sub)
    from vlmkit.cli.images import register as register_images

    register_images(sub, ev)
    from vlmkit.cli.explain import register as register_explain

    register_explain(sub, ev)
    from vlmkit.cli.audit import register_audit_cli, register_card_cli

    register_audit_cli(sub)
    register_card_cli(sub, data)
    from vlmkit.cli.export import register_export_cli

    register_export_cli(sub)
    from vlmkit.cli.transfer import register_transfer_demo_cli, register_wise_ft_cli

    register_wise_ft_cli(sub)
    register_transfer_demo_cli(sub)

    p = sub.add_parser("env", help="this machine: CPU, vector flags, threads and the precision 'auto' picks")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("report", help="(re)write report.html for a run folder")
    p.add_argument("run", help="run folder")
    p.set_defaults(func=cmd_report)
    return parser


def _version() -> str:
    import vlmkit

    return f"vlmkit {vlmkit.__version__}"


def cmd_quickstart(args) -> None:
    from vlmkit.demos.quickstart import quickstart

    quickstart(
        out=args.out,
        time_budget=args.time_budget,
        recipe=args.recipe,
        seed=args.seed,
        precision=args.precision,
    )


def cmd_curation_demo(args) -> None:
    from vlmkit.demos.curation import curation_demo

    curation_demo(
        args.out,
        args.time_budget,
        args.recipe,
        args.seed,
        top_fraction=args.top_fraction,
        precision=args.precision,
    )


def cmd_data_synth(args) -> None:
    from vlmkit.data.synthetic import generate

    if args.bias:
        from vlmkit.data.bias import generate_biased

        unused = [f for f in ("mismatch_fraction", "duplicate_fraction", "tiny_fraction", "blank_fraction")
                  if getattr(args, f)] + (["object_weights"] if args.object_weights else [])  # fmt: skip
        if unused:
            raise ConfigError(
                f"--{unused[0].replace('_', '-')} does not apply to --bias data (one object per image, no web noise)"
            )
        paths = generate_biased(
            args.out,
            attribute=args.bias,
            strength=args.bias_strength,
            mention=args.bias_in_captions,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            image_size=args.image_size,
            background_noise=args.noise,
            seed=args.seed,
        )
        for k, v in paths.items():
            print(f"{k}: {v}")
        return
    paths = generate(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
        background_noise=args.noise,
        num_per_class_train=args.per_class_train,
        num_per_class_val=args.per_class_val,
        object_weights=_floats(args.object_weights, "--object-weights"),
        mismatch_fraction=args.mismatch_fraction,
        duplicate_fraction=args.duplicate_fraction,
        tiny_fraction=args.tiny_fraction,
        blank_fraction=args.blank_fraction,
        marked_fraction=args.marked_fraction,
    )
    for k, v in paths.items():
        print(f"{k}: {v}")


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VlmkitError(f"{flag} takes comma-separated numbers, e.g. 4,2,1,1 (got {text!r})") from None


def cmd_train(args) -> None:
    from vlmkit.config import parse_overrides, to_dict
    from vlmkit.recipes import get_recipe, list_recipes, smoke
    from vlmkit.train import train
    from vlmkit.train.config import configure

    if args.list_recipes:
        print("\n".join(list_recipes()))
        return
    if args.task == "prompt-learning":
        from vlmkit.cli.transfer import cmd_train_prompts

        return cmd_train_prompts(args)
    overrides = {
        "train_data": args.train_data,
        "val_data": args.val_data,
        "zeroshot_data": args.zeroshot_data,
        "zeroshot_templates": args.templates,
        "time_budget": args.time_budget,
        "tokenizer": args.tokenizer,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "max_bad_fraction": args.max_bad_fraction,
        "out": args.out or f"runs/{args.recipe}",
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.resume:
        overrides["resume"] = True
    from vlmkit.cli.transfer import transfer_overrides

    overrides.update(transfer_overrides(args))
    overrides.update(parse_overrides(args.set))
    cfg = get_recipe(args.recipe)
    if cfg.data.synthetic and (args.train_data or args.val_data):
        family = cfg.model.name.split("-")[0]
        raise VlmkitError(
            f"recipe {args.recipe} trains in stages on the built-in data; for your own data use the one-stage "
            f"recipe {family}-tiny (--set vision_init_from=DIR starts its image tower from a CLIP/SigLIP folder)"
        )
    if args.smoke:  # shrink first, so that explicit flags still win
        cfg = smoke(cfg)
    cfg = configure(cfg, overrides, where="train")
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return
    summary = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))


def cmd_embed(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.inference import embed_images, embed_texts

    if not args.image and not args.text:
        raise VlmkitError("nothing to embed: pass --image FILE ... and/or --text TEXT ...")
    device = device_of(args.device)
    precision = precision_of(args, device)
    pt = load_pretrained(args.model, device)
    out = {}
    if args.image:
        out["image_embeds"] = embed_images(
            pt.model, pt.preprocess, args.image, device, precision, args.batch_size
        )
    if args.text:
        out["text_embeds"] = embed_texts(
            pt.model, require_tokenizer(pt, args.model), args.text, device, precision
        )
    if args.output:
        if args.output.endswith(".npy"):
            import numpy as np
            import torch

            np.save(args.output, torch.cat(list(out.values())).numpy())
        else:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in out.items()},
                args.output,
                metadata={"images": json.dumps(args.image), "texts": json.dumps(args.text)},
            )
        print(f"wrote {args.output}")
    for k, v in out.items():
        print(f"{k}: {tuple(v.shape)}")


def cmd_classify(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.templates import load_templates
    from vlmkit.inference import classify

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    tokenizer = require_tokenizer(pt, args.model)
    ranked = classify(
        pt.model, tokenizer, pt.preprocess, args.image, args.labels, load_templates(args.templates), device,
        precision_of(args, device),
    )  # fmt: skip
    for label, prob in ranked:
        print(f"{prob:.4f}  {label}")


def cmd_env(args) -> None:
    import torch

    from vlmkit.runtime import cpu_matmul_speeds, describe_machine, resolve_precision

    device = device_of(args.device)
    print(describe_machine())
    if device.type == "cpu":
        bf16, fp32 = cpu_matmul_speeds()
        print(f"matmul: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    else:
        print(f"device: {torch.cuda.get_device_name(device)}")
    logging.getLogger("vlmkit.runtime").setLevel(logging.WARNING)  # printed below, not logged as well
    p = resolve_precision("auto", device)
    print(f"precision auto -> {p.name}: {p.reason}")


def cmd_report(args) -> None:
    from vlmkit.eval.report import write_report

    if not Path(args.run).is_dir():
        raise VlmkitError(f"run folder not found: {args.run}")
    print(f"wrote {write_report(Path(args.run))}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from vlmkit.runtime import configure_threads

    configure_threads()  # intra-op threads = physical cores, unless OMP_NUM_THREADS says otherwise
    try:
        args.func(args)
    except VlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
