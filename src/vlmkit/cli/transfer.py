"""`vlmkit train` transfer-learning flags, `vlmkit wise-ft`, `vlmkit data manifest-from-folder` and
`vlmkit transfer-demo`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from vlmkit.cli.common import add_classes_args, add_precision_arg
from vlmkit.demos.transfer import SHOTS, transfer_demo
from vlmkit.errors import ConfigError
from vlmkit.nn.lora import DEFAULT_TARGETS
from vlmkit.train.transfer import imagefolder_to_manifest, wise_ft_sweep


def add_transfer_args(parser: argparse.ArgumentParser) -> None:
    """The transfer-learning flags of `vlmkit train` (see `transfer_overrides`)."""
    g = parser.add_argument_group("transfer learning (fine-tune a pretrained model)")
    g.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from this model folder (a vlmkit run or a Hugging Face CLIP/SigLIP folder); its "
        "config, tokenizer and preprocessing are used, the recipe's model is ignored",
    )
    g.add_argument(
        "--lock-image",
        action="store_true",
        help="locked-image tuning (LiT): freeze the whole image tower, train the text tower",
    )
    g.add_argument(
        "--freeze",
        action="append",
        metavar="REGEX",
        help=r"freeze parameters whose names match (re.search), e.g. '^visual\.' (repeatable)",
    )
    g.add_argument(
        "--lr-scale",
        action="append",
        metavar="REGEX=FACTOR",
        help=r"learning-rate multiplier for matching parameters, e.g. '^visual\.=0.1' (repeatable; the first "
        "match wins; 0 freezes)",
    )
    g.add_argument(
        "--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R instead of the weights"
    )
    g.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scaling is A / R (default A = R)")
    g.add_argument(
        "--lora-targets",
        metavar="REGEX",
        help=f"Linear modules to adapt (re.search over module names; default {DEFAULT_TARGETS!r})",
    )
    g.add_argument(
        "--lora-also-train",
        action="append",
        metavar="REGEX",
        help="with LoRA, parameters that train too, e.g. 'logit_scale' (repeatable)",
    )


def parse_lr_scale(items: list[str]) -> dict[str, float]:
    """`["^visual\\.=0.1"]` -> `{"^visual\\.": 0.1}` (the factor follows the last '=')."""
    out = {}
    for item in items:
        pattern, sep, factor = item.rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            value = None
        if not sep or not pattern or value is None or value < 0:
            raise ConfigError(
                f"--lr-scale {item!r} is not REGEX=FACTOR with FACTOR >= 0, e.g. --lr-scale '^visual\\.=0.1'"
            )
        out[pattern] = value
    return out


def transfer_overrides(args: argparse.Namespace) -> dict:
    """TrainConfig overrides from the flags `add_transfer_args` added (only those given)."""
    out: dict = {}
    if args.init_from:
        out["init_from"] = args.init_from
    if args.lock_image:
        out["lock_image"] = True
    if args.freeze:
        out["freeze"] = list(args.freeze)
    if args.lr_scale:
        out["lr_scale"] = parse_lr_scale(args.lr_scale)
    if args.lora_rank is not None:
        out["lora_rank"] = args.lora_rank
    if args.lora_alpha is not None:
        out["lora_alpha"] = args.lora_alpha
    if args.lora_targets:
        out["lora_targets"] = args.lora_targets
    if args.lora_also_train:
        out["lora_also_train"] = list(args.lora_also_train)
    return out


def register_wise_ft_cli(subparsers) -> None:
    """Add `vlmkit wise-ft`."""
    p = subparsers.add_parser(
        "wise-ft",
        help="interpolate zero-shot and fine-tuned weights (WiSE-FT); optionally evaluate each alpha",
        description="theta = (1 - alpha) * zero-shot + alpha * fine-tuned, written as a model folder. "
        "Several --alpha values give one folder each (OUT/alpha_0.50, ...).",
    )
    p.add_argument("--zeroshot", required=True, metavar="DIR", help="the pretrained (zero-shot) model folder")
    p.add_argument("--finetuned", required=True, metavar="DIR", help="the fine-tuned model folder")
    p.add_argument(
        "--alpha",
        type=float,
        action="append",
        required=True,
        help="mixing weight in [0, 1]: 0 = zero-shot, 1 = fine-tuned (repeatable)",
    )
    p.add_argument("--out", required=True, help="output model folder (a parent folder for several alphas)")
    p.add_argument("--eval-data", metavar="IMAGEFOLDER", help="print the zero-shot accuracy of each alpha")
    p.add_argument("--templates", action="append", help="template with {} or a file of them (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_cmd_wise_ft)


def _cmd_wise_ft(args) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = wise_ft_sweep(
        args.zeroshot, args.finetuned, args.alpha, args.out, args.eval_data, args.templates, device
    )
    if args.eval_data:
        print(f"{'alpha':>6}  {'acc1':>6}  {'mean recall':>11}  folder")
        for r in rows:
            print(f"{r['alpha']:>6.2f}  {r['acc1']:>6.3f}  {r['mean_per_class_recall']:>11.3f}  {r['path']}")
    else:
        for r in rows:
            print(f"alpha {r['alpha']:.2f}: wrote {r['path']}")


def register_manifest_cli(subparsers) -> None:
    """Add `vlmkit data manifest-from-folder` (to the `data` subcommands)."""
    p = subparsers.add_parser(
        "manifest-from-folder",
        help="an ImageFolder as an image-caption manifest (class names in templates), to fine-tune on",
    )
    p.add_argument("--data", required=True, metavar="IMAGEFOLDER", help="one subfolder of images per class")
    p.add_argument("--out", required=True, metavar="FILE", help="the JSONL manifest to write")
    p.add_argument(
        "--template",
        action="append",
        help="caption template with {} for the class name, or a file of them (repeatable; default: the "
        "zero-shot defaults)",
    )
    add_classes_args(p)
    p.set_defaults(func=_cmd_manifest_from_folder)


def _cmd_manifest_from_folder(args) -> None:
    path = imagefolder_to_manifest(
        args.data,
        args.template,
        args.out,
        classes_file=args.classes,
        positional_classes=args.positional_classes,
    )
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    print(f"wrote {n} rows to {path}")


def register_transfer_demo_cli(subparsers) -> None:
    """Add `vlmkit transfer-demo`."""
    p = subparsers.add_parser(
        "transfer-demo",
        help="pretrain without some classes, then zero-shot vs linear probe vs fine-tune/LiT/LoRA/WiSE-FT on them",
    )
    p.add_argument("--out", default="runs/transfer", help="folder for the data, runs, table and plot")
    p.add_argument("--time-budget", type=float, default=3.0, help="minutes of pretraining (default 3)")
    p.add_argument("--shots", type=int, default=SHOTS, help=f"training images per held-out class ({SHOTS})")
    p.add_argument("--recipe", default="clip-tiny", help="clip-tiny or siglip-tiny")
    p.add_argument("--seed", type=int, default=0)
    add_precision_arg(p)
    p.set_defaults(func=_cmd_transfer_demo)


def _cmd_transfer_demo(args) -> None:
    transfer_demo(
        args.out, args.time_budget, args.recipe, args.seed, shots=args.shots, precision=args.precision
    )


@dataclass
class _PromptRun:
    """The `--set` keys of prompt learning beside PromptConfig's own (n_ctx, init, position, per_class, meta_net)."""

    shots: int = 16
    base_classes: str = ""  # comma-separated class names; "" = the first half of the sorted names


def _prompt_settings(items: list[str] | None) -> tuple[_PromptRun, object]:
    """`--set KEY=VALUE` items -> (the run's settings, a PromptConfig), typed by the dataclasses' fields."""
    from vlmkit.config import override, parse_overrides
    from vlmkit.models.prompt_learner import PromptConfig

    values = parse_overrides(items)
    run_keys = {f.name for f in fields(_PromptRun)}
    known = run_keys | {f.name for f in fields(PromptConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"--set {key}: prompt learning takes {', '.join(sorted(known))}")
    run = override(_PromptRun(), {k: v for k, v in values.items() if k in run_keys}, "--set")
    cfg = override(PromptConfig(), {k: v for k, v in values.items() if k not in run_keys}, "--set")
    return run, cfg


def cmd_train_prompts(args) -> None:
    """`vlmkit train --task prompt-learning`: learn CoOp/CoCoOp prompts, save them, print base-to-new accuracy."""
    import json

    from vlmkit.cli.common import device_of, load_dual_encoder
    from vlmkit.train.prompts import base_to_new, save_prompts

    if not args.init_from or not args.train_data or not args.zeroshot_data:
        raise ConfigError(
            "prompt learning needs --init-from CLIP_DIR (the frozen dual encoder), --train-data IMAGEFOLDER (the shots "
            "come from it) and --zeroshot-data IMAGEFOLDER (held-out images of the same classes)"
        )
    run, cfg = _prompt_settings(args.set)
    device = device_of(None)
    pt = load_dual_encoder(args.init_from, device, "prompt learning")
    base = [c.strip() for c in run.base_classes.split(",")] if run.base_classes else None
    res = base_to_new(
        pt.model, pt.tokenizer, pt.preprocess, args.train_data, args.zeroshot_data, cfg,
        base_classes=base, shots=run.shots, epochs=int(args.epochs or 50), lr=args.lr or 0.1,
        templates=args.templates, seed=args.seed or 0, device=device,
    )  # fmt: skip
    out = args.out or "runs/prompts"
    m = res["metrics"]
    save_prompts(res["learner"], out, args.init_from, m)
    (Path(out) / "base_to_new.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    for name in ("hand", "learned"):
        r = m[name]
        new = "-" if r.get("new") is None else f"{r['new']:.3f}"
        hm = "-" if r.get("harmonic") is None else f"{r['harmonic']:.3f}"
        label = "hand templates (forward-selected)" if name == "hand" else "learned prompts"
        print(f"{label:>34}: base {r['base']:.3f}  new {new}  harmonic {hm}")
    print(f"prompts -> {out}/prompts.safetensors, prompts.json; metrics -> {out}/base_to_new.json")
