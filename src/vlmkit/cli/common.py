"""Options several commands share."""

from __future__ import annotations

import argparse

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
