"""`vlmkit serve` (the OpenAI-compatible server and its page) and `vlmkit index build` (image search)."""

from __future__ import annotations

import argparse

from vlmkit.errors import ConfigError


def register(sub) -> None:
    from vlmkit.cli.common import add_precision_arg

    p = sub.add_parser("serve", help="serve models over the OpenAI API, with a web page at /")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a model folder (LLaVA-style: chat; CLIP/SigLIP: embeddings, labels, search); repeat "
                        "for several; the name defaults to the folder's")  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--index", help="an image index (`vlmkit index build`) for /v1/search and the page")
    p.add_argument("--index-model", help="the served dual encoder that embeds search queries (default: the "
                   "one the index was built with)")  # fmt: skip
    p.add_argument("--image-root", action="append", default=[], metavar="DIR",
                   help="a folder whose images requests may name by path (file://...); repeatable; by default "
                        "requests send images inline (data: URLs) only")  # fmt: skip
    p.add_argument("--slots", type=int, default=8, help="requests generated together (continuous batching)")
    p.add_argument("--max-waiting", type=int, default=32,
                   help="requests that may wait for a slot; more get HTTP 429 (default 32)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-batch", type=int, default=32, help="embedding inputs per batch (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long an embedding request waits for others to batch with (default 5 ms)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads for the models (default: the physical cores less "
                   "one, left to the HTTP side; OMP_NUM_THREADS also sets it)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_precision_arg(p)
    p.set_defaults(func=cmd_serve)

    index = sub.add_parser("index", help="image search indexes").add_subparsers(
        dest="index_cmd", required=True
    )
    p = index.add_parser("build", help="embed a folder of images into a vector index (resumable)")
    p.add_argument("--model", required=True, help="a dual encoder folder (CLIP/SigLIP)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    add_precision_arg(p)
    p.set_defaults(func=cmd_index_build)


def _spec(text: str) -> tuple[str | None, str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep and name and "/" not in name else (None, text)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("`vlmkit serve` needs FastAPI and uvicorn: pip install 'vlmkit[serve]'") from None
    import os

    import torch

    from vlmkit.cli.common import device_of
    from vlmkit.runtime import cpu_info
    from vlmkit.serve.app import create_app, load_served

    cores = cpu_info().physical_cores
    if args.threads or not os.environ.get("OMP_NUM_THREADS"):
        # decoding steps leave the event loop (HTTP, JSON, image decoding) a core; prefills use them all
        torch.set_num_threads(args.threads or max(1, cores - 1))
    device = str(device_of(args.device))
    models = []
    for spec in args.model:
        name, path = _spec(spec)
        print(f"loading {path}")
        models.append(load_served(path, name, device, args.precision, num_slots=args.slots,
                                  max_len=args.max_model_len, max_waiting=args.max_waiting,
                                  max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                  prefill_threads=max(torch.get_num_threads(), cores)))  # fmt: skip
    app = create_app(models, index=args.index, image_roots=args.image_root, index_model=args.index_model)
    for m in models:
        print(f"  {m.name}: {m.kind}")
    print(f"vlmkit serving on http://{args.host}:{args.port}/ (OpenAI API at /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_index_build(args: argparse.Namespace) -> None:
    from vlmkit.cli.common import device_of, precision_of
    from vlmkit.convert import load_pretrained
    from vlmkit.inference.index import build_index
    from vlmkit.models.registry import model_family

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    if model_family(pt.model.cfg) != "clip":
        raise ConfigError(f"{args.model}: image search needs a dual encoder (CLIP/SigLIP), not this model")
    meta = build_index(pt.model, pt.preprocess, args.images, args.out, model_path=str(args.model), device=device,
                       bf16=precision_of(args, device).bf16, batch_size=args.batch_size)  # fmt: skip
    print(
        f"wrote {args.out}: {meta['count']} images, {meta['dim']}-dim embeddings, {len(meta['skipped'])} skipped"
    )
    for s in meta["skipped"][:10]:
        print(f"  skipped {s['path']}: {s['reason']}")
