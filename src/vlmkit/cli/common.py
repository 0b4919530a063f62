"""Options several commands share."""

from __future__ import annotations

import argparse
import json

from vlmkit.errors import VlmkitError
from vlmkit.runtime import PRECISIONS


def add_classes_args(p: argparse.ArgumentParser) -> None:
    """The `--classes` and `--positional-classes` options of every command that reads an ImageFolder."""
    p.add_argument(
        "--classes",
        help="class names file: folder<TAB>name lines, a JSON {folder: name}, or one name per line (folder "
        "names in any order; default: classes.txt inside the image folder, else the folder names)",
    )
    p.add_argument(
        "--positional-classes",
        action="store_true",
        help="the classes file lists names that are not the folder names, in sorted-folder order",
    )


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """The `--precision` option of every command that runs a model."""
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="bf16 autocast or fp32; auto (default): bf16 only where this machine runs it fast",
    )


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a model folder: a vlmkit training run or checkpoint, or a Hugging Face CLIP/SigLIP folder",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64)
    add_precision_arg(p)


def device_of(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def precision_of(args, device):
    from vlmkit.runtime import resolve_precision

    return resolve_precision(args.precision, device)


def emit(results: dict, output: str | None) -> None:
    from vlmkit.eval.features import save_results

    if output:
        save_results(results, output)
        print(f"wrote {output}")
    metrics = {k: v for k, v in results.get("metrics", results).items() if not isinstance(v, (dict, list))}
    print(json.dumps(metrics, indent=2))


def load_dual_encoder(path: str, device, command: str):
    """A CLIP/SigLIP folder for `command`, its tokenizer required; any other model is one line naming the command."""
    from vlmkit.convert import load_pretrained
    from vlmkit.models.registry import task_name

    pt = load_pretrained(path, device)
    if task_name(pt.model.cfg) != "contrastive":
        raise VlmkitError(f"{path} is not a dual encoder; {command} takes CLIP/SigLIP folders")
    require_tokenizer(pt, path)
    return pt


def require_tokenizer(pt, where: str):
    if pt.tokenizer is None:
        raise VlmkitError(
            f"{where} has no tokenizer.json; text needs the tokenizer the model was trained with"
        )
    return pt.tokenizer
