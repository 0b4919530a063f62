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
    p.add_argument(
        "--audit", action="append", default=[], help="an audit.json for the model card (repeatable)"
    )
    p.set_defaults(func=cmd_export)


def write_datasheet(run: Path, out: Path) -> None:
    """DATASHEET.md of the run's training manifest (train_config.json's data.train), when it is one."""
    from vlmkit.config import atomic_write_text, load_json
    from vlmkit.data.datasheet import datasheet

    config = run / "train_config.json"
    if not config.is_file():
        return
    train = load_json(config).get("train", {})
    data = (
        (train.get("data") or {}).get("train")
        if isinstance(train.get("data"), dict)
        else train.get("train_data")
    )
    if data and Path(data).is_file() and Path(data).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        atomic_write_text(out / "DATASHEET.md", datasheet(data))
        print(f"wrote {out / 'DATASHEET.md'}: the datasheet of {data}, the run's training manifest")


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
    from vlmkit.convert.card import read_audit

    audits = [read_audit(a) for a in args.audit]
    save_hf(
        pt.model, out, pt.tokenizer, pt.preprocess, name=args.name or "", source_dir=args.model, audits=audits
    )
    write_datasheet(Path(args.model), out)
    cls = "SiglipModel" if layout_of(pt.model.cfg) == "siglip" else "CLIPModel"
    print(f"wrote {out} ({cls}): load it with transformers.{cls}.from_pretrained({str(out)!r})")
