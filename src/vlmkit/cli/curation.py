"""`vlmkit data filter`: curate a pool of image-text pairs."""

from __future__ import annotations

import argparse

from vlmkit.curation.curate import (
    SEMDEDUP_CLUSTER_SIZE,
    TARGET_CLUSTER_SIZE,
    CaptionLength,
    DedupCaptions,
    DedupImages,
    Filter,
    ImageSize,
    ImageTargets,
    ModelScore,
    SemDeDup,
    TextConcepts,
    curate,
    format_summary,
)
from vlmkit.errors import ConfigError

# flag -> the filter it configures (the order of first mention is the order the filters run in)
_FILTER_OF_FLAG = {
    "min_words": "caption_length",
    "max_words": "caption_length",
    "min_side": "image_size",
    "max_aspect": "image_size",
    "dedup_images": "dedup_images",
    "dedup_captions": "dedup_captions",
    "min_score": "model_score",
    "top_fraction": "model_score",
    "semdedup_clusters": "semdedup",
    "semdedup_eps": "semdedup",
    "text_concepts": "text_concepts",
    "image_targets": "image_targets",
    "image_clusters": "image_targets",
}


class _FilterFlag(argparse.Action):
    """Stores the value and records, in `namespace.filter_order`, the filter the flag belongs to the
    first time one of its flags appears, so filters run in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self.nargs == 0 else values)
        order = list(getattr(namespace, "filter_order", None) or [])
        if _FILTER_OF_FLAG[self.dest] not in order:
            order.append(_FILTER_OF_FLAG[self.dest])
        namespace.filter_order = order


def filters_from_args(args: argparse.Namespace) -> list[Filter]:
    """The filters the parsed flags ask for, in command-line order."""
    a = args
    build = {
        "caption_length": lambda: CaptionLength(a.min_words, a.max_words),
        "image_size": lambda: ImageSize(a.min_side, a.max_aspect),
        "dedup_images": DedupImages,
        "dedup_captions": DedupCaptions,
        "model_score": lambda: ModelScore(
            _require(a.score_model, "--min-score/--top-fraction need --score-model"),
            a.min_score,
            a.top_fraction,
        ),
        "semdedup": lambda: SemDeDup(a.semdedup_clusters, 0.05 if a.semdedup_eps is None else a.semdedup_eps),
        "text_concepts": lambda: TextConcepts(a.text_concepts),
        "image_targets": lambda: ImageTargets(
            _require(a.image_targets, "--image-clusters needs --image-targets"), a.image_clusters
        ),
    }
    order = a.filter_order or []
    if a.score_model and "model_score" not in order:
        raise ConfigError("--score-model needs --min-score S or --top-fraction F")
    if a.min_score is not None and a.top_fraction is not None:
        raise ConfigError("--min-score and --top-fraction are mutually exclusive; give one")
    if not order:
        raise ConfigError(
            "no filters given; see `vlmkit data filter --help` (e.g. --min-words 3 --dedup-images)"
        )
    return [build[name]() for name in order]


def _require(value, message: str):
    if value is None:
        raise ConfigError(message)
    return value


def cmd_filter(args: argparse.Namespace) -> None:
    filters = filters_from_args(args)
    result = curate(
        args.input,
        filters,
        args.out,
        output_format=args.output_format,
        embed_model=args.embed_model,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
        shard_size=args.shard_size,
        report=not args.no_report,
    )
    print(format_summary(result))
    for name, path in result.files.items():
        print(f"{name}: {path}")


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add `vlmkit data filter` to the `vlmkit data` subparsers."""
    p = subparsers.add_parser(
        "filter",
        help="curate an image-text pool: basic filters, dedup, model score, SemDeDup, concept/target selection",
        description="Filters run in the order their flags are given; each removes from what the previous "
        "ones kept. Writes the kept subset, uids.txt, removed.jsonl, curation.json and report.html to --out.",
    )
    p.add_argument(
        "--input",
        metavar="SPEC",
        required=True,
        help="shards (a .tar, dir/{00000..00009}.tar, a folder of .tar) or a .jsonl/.csv manifest",
    )
    p.add_argument("--out", metavar="DIR", required=True, help="output folder (new or empty)")
    p.add_argument("--output-format", choices=("shards", "manifest"), help="default: the kind of --input")
    p.add_argument("--shard-size", metavar="N", type=int, default=10_000, help="samples per output shard")
    p.add_argument("--no-report", action="store_true", help="skip report.html and its plots")

    g = p.add_argument_group("basic filters")
    g.add_argument(
        "--min-words", metavar="N", type=int, action=_FilterFlag, help="drop captions with fewer words"
    )
    g.add_argument(
        "--max-words", metavar="N", type=int, action=_FilterFlag, help="drop captions with more words"
    )
    g.add_argument(
        "--min-side",
        metavar="PX",
        type=int,
        action=_FilterFlag,
        help="drop images whose shorter side is smaller (pixels)",
    )
    g.add_argument(
        "--max-aspect",
        metavar="R",
        type=float,
        action=_FilterFlag,
        help="drop images with long/short side above this",
    )
    g.add_argument(
        "--dedup-images",
        nargs=0,
        action=_FilterFlag,
        help="drop exact duplicate images (same pixels), keeping the first",
    )
    g.add_argument(
        "--dedup-captions",
        nargs=0,
        action=_FilterFlag,
        help="drop repeated captions (ignoring case/spaces), keeping the first",
    )

    g = p.add_argument_group("model-based filters (embeddings computed once per model)")
    g.add_argument("--score-model", metavar="DIR", help="vlmkit model folder for the image-caption score")
    g.add_argument(
        "--min-score", metavar="S", type=float, action=_FilterFlag, help="keep pairs with score >= S"
    )
    g.add_argument(
        "--top-fraction", metavar="F", type=float, action=_FilterFlag, help="keep the top F of pairs by score"
    )
    g.add_argument(
        "--embed-model",
        metavar="DIR",
        help="model for --semdedup-* and --image-targets (default: --score-model)",
    )
    g.add_argument(
        "--semdedup-clusters",
        metavar="K",
        type=int,
        action=_FilterFlag,
        help=f"k-means clusters (default: n/{SEMDEDUP_CLUSTER_SIZE})",
    )
    g.add_argument(
        "--semdedup-eps",
        metavar="EPS",
        type=float,
        action=_FilterFlag,
        help="drop when cosine similarity > 1 - eps (default 0.05)",
    )
    g.add_argument("--device", metavar="DEV", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--batch-size", metavar="N", type=int, default=64)

    g = p.add_argument_group("selection toward a target (DataComp baselines)")
    g.add_argument(
        "--text-concepts",
        metavar="LIST|FILE",
        action=_FilterFlag,
        help="keep captions naming any concept: a comma list or a file, one per line",
    )
    g.add_argument(
        "--image-targets",
        metavar="PATH",
        action=_FilterFlag,
        help="image folder or manifest of target images",
    )
    g.add_argument(
        "--image-clusters",
        metavar="K",
        type=int,
        action=_FilterFlag,
        help=f"k-means clusters of the pool (default: n/{TARGET_CLUSTER_SIZE})",
    )

    p.add_argument("--workers", metavar="N", type=int, help="image decoding threads (default: up to 4)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="k-means seed")
    p.set_defaults(func=cmd_filter, filter_order=None)
    return p
