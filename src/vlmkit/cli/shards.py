"""`vlmkit data shard`: image-text data into WebDataset shards."""

from __future__ import annotations

import argparse

from vlmkit.cli.common import add_classes_args
from vlmkit.data.shards.write import ENCODE_FORMATS, PILLOW_MAX_IMAGE_PIXELS, RESIZE_MODES, write_shards


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add `shard` to the `vlmkit data` subcommands; its handler returns the totals dict."""
    p = subparsers.add_parser(
        "shard",
        help="write WebDataset tar shards from a manifest, image folder, parquet or HF dataset",
        description="Write img2dataset-style WebDataset shards (OUT/00000.tar with {key}.jpg, {key}.txt, "
        "{key}.json; OUT/00000_stats.json; OUT/00000.parquet). Bad inputs are skipped and counted.",
    )
    p.add_argument(
        "--input",
        required=True,
        help="a manifest (.jsonl/.csv/.tsv), an image folder (sidecar .txt captions or class subfolders), "
        "a Hugging Face save_to_disk folder, or a .parquet file / folder of them",
    )
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shard-size", type=int, default=10_000, help="inputs per shard (default 10000)")
    p.add_argument("--image-size", type=int, default=256, help="target size in pixels (default 256)")
    p.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="keep_ratio",
        help="keep_ratio: shorter side to SIZE (default); center_crop: then crop SIZExSIZE; "
        "border: longer side to SIZE, pad to SIZExSIZE; no: keep the size",
    )
    p.add_argument(
        "--resize-only-if-bigger", action="store_true", help="leave images no bigger than SIZE as they are"
    )
    p.add_argument(
        "--pad-colour", default="255,255,255", help="border mode padding: R,G,B, #rrggbb or a name"
    )
    p.add_argument(
        "--encode-format", choices=list(ENCODE_FORMATS), default="jpg", help="image format (default jpg)"
    )
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality 1-100 (default 95)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default min(4, CPUs))")
    p.add_argument("--image-column", help="parquet / dataset column holding the image (default: detected)")
    p.add_argument("--text-column", help="parquet / dataset column holding the caption (default: detected)")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict (default train)")
    add_classes_args(p)
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help=f"decompression-bomb guard: skip larger images (default Pillow's, {PILLOW_MAX_IMAGE_PIXELS})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shard)
    return p


def register_documents_cli(subparsers) -> argparse.ArgumentParser:
    """Add `shard-documents` to the `vlmkit data` subcommands."""
    p = subparsers.add_parser(
        "shard-documents",
        help="write interleaved documents (Flamingo's JSONL) into WebDataset shards, one sample per document",
        description="OUT/00000.tar with {key}.json (the document, images named by member) and {key}.0.png, "
        "{key}.1.png, ... (the image files' bytes). Bad lines are skipped and counted.",
    )
    p.add_argument(
        "--input", required=True, help="a document file (JSONL: segments, or OBELICS texts/images)"
    )
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per shard (default 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shard_documents)
    return p


def cmd_shard_documents(args: argparse.Namespace) -> dict:
    from vlmkit.data.shards.documents import write_document_shards

    totals = write_document_shards(
        args.input,
        args.out,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"wrote {totals['shards']} shards to {totals['out']}: {totals['documents']} documents, "
        f"{totals['skipped']} bad lines skipped"
    )
    return totals


def cmd_shard(args: argparse.Namespace) -> dict:
    """Handler of `vlmkit data shard`: write the shards and print a totals summary."""
    totals = write_shards(
        args.input,
        args.out,
        shard_size=args.shard_size,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=args.resize_only_if_bigger,
        pad_colour=args.pad_colour,
        encode_format=args.encode_format,
        quality=args.quality,
        workers=args.workers,
        image_column=args.image_column,
        text_column=args.text_column,
        split=args.split,
        classes_file=args.classes,
        positional_classes=args.positional_classes,
        max_image_pixels=args.max_image_pixels,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"wrote {totals['shards']} shards to {totals['out']} in {totals['seconds']:.1f} s: "
        f"{totals['samples']} samples, {totals['successes']} successes, {totals['failed']} failed"
    )
    for reason, count in totals["failures"].items():
        print(f"  {reason}: {count}")
    return totals
