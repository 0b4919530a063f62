"""`vlmkit export`: a model folder in Hugging Face format."""

from __future__ import annotations

from pathlib import Path

from vlmkit.convert.clip import layout_of, save_hf
from vlmkit.errors import ConfigError


def register_export_cli(subparsers) -> None:
    """Add `vlmkit export --model DIR --out DIR [--format hf]` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export",
        help="write a model folder in the Hugging Face transformers format",
        description="Export a vlmkit model (a training run or checkpoint, or a Hugging Face folder) so that "
        "transformers' CLIPModel/SiglipModel (with a model card), LlavaForConditionalGeneration or "
        "BlipForImageTextRetrieval (fusion models in BLIP's layout), AutoTokenizer "
        "and image processor load it.",
    )
    p.add_argument(
        "--model", required=True, help="a model folder: a vlmkit run or checkpoint, or a Hugging Face folder"
    )
    p.add_argument("--out", required=True, help="output folder; must not exist yet or be empty")
    p.add_argument(
        "--format", default="hf", choices=["hf"], help="hf: Hugging Face transformers (the default)"
    )
    p.add_argument("--name", help="model name in the model card (default: the --out folder's name)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from vlmkit.convert import load_pretrained

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    pt = load_pretrained(args.model)
    from vlmkit.models.registry import model_family

    family = model_family(pt.model.cfg)
    if family == "llava":
        from vlmkit.convert.llava import save_hf_llava

        save_hf_llava(pt.model, out, pt.tokenizer, pt.preprocess)
        print(
            f"wrote {out}: load it with transformers.LlavaForConditionalGeneration.from_pretrained({str(out)!r})"
        )
        return
    if family == "fusion":
        from vlmkit.convert.blip import save_hf_blip

        save_hf_blip(pt.model, out, pt.tokenizer)
        print(
            f"wrote {out}: load it with transformers.BlipForImageTextRetrieval.from_pretrained({str(out)!r})"
        )
        return
    if family != "clip":
        raise ConfigError(
            f"{args.model} is a {family} model; transformers has no {family} class to export to"
        )
    save_hf(pt.model, out, pt.tokenizer, pt.preprocess, name=args.name or "", source_dir=args.model)
    cls = "SiglipModel" if layout_of(pt.model.cfg) == "siglip" else "CLIPModel"
    print(f"wrote {out} ({cls}): load it with transformers.{cls}.from_pretrained({str(out)!r})")
