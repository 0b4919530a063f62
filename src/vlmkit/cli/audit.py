"""`vlmkit audit`: a bias audit of a dual encoder (vlmkit.eval.audit), as JSON and an HTML report."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.cli.common import add_model_arg, device_of, precision_of, require_tokenizer


def register_audit_cli(sub) -> None:
    p = sub.add_parser(
        "audit", help="bias audit of a dual encoder: accuracy by group, retrieval skew, leakage"
    )
    add_model_arg(p)
    p.add_argument(
        "--data", required=True, help="manifest whose rows carry the label and the attribute as columns"
    )
    p.add_argument("--attribute", required=True, help="the sensitive attribute's column, e.g. background")
    p.add_argument(
        "--k",
        type=int,
        help="dual encoders (required): top k of each neutral query's ranking for the skew metrics",
    )
    p.add_argument(
        "--prompt",
        default="Describe the image briefly.",
        help="CoCa/LLaVA: the captioning prompt (LLaVA; CoCa captions from its start token)",
    )
    p.add_argument("--label-key", default="label", help="the label's column (default: label)")
    p.add_argument("--templates", action="append", help="template with {} or a file of them (repeatable)")
    p.add_argument(
        "--queries", help="file of neutral queries, one per line (default: every template x class)"
    )
    p.add_argument(
        "--majority",
        help="JSON of label -> the attribute value it co-occurs with in training (or a dataset.json of `vlmkit data "
        "synth --bias`): adds conflict_gap, accuracy on aligned minus conflicting images",
    )
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for audit.json and report.html")
    m = p.add_argument_group("post-hoc mitigation: the same audit after each method, on the same draws")
    m.add_argument(
        "--mitigate",
        nargs="+",
        choices=["projection", "projection-images", "sfid"],
        default=[],
        help="methods to measure: projection (Chuang et al., from prompts naming the attribute), "
        "projection-images (the attribute's direction measured on --fit-data images), sfid",
    )
    m.add_argument(
        "--attribute-template",
        default="a picture of a {value} background.",
        help="a prompt naming only the attribute value (projection, sfid)",
    )
    m.add_argument(
        "--pair-template",
        default="a picture of a {label} on a {value} background.",
        help="prompts that differ only in the attribute value (projection's calibration, sfid's text side)",
    )
    m.add_argument(
        "--lam", type=float, default=1000.0, help="projection: calibration strength (default 1000)"
    )
    m.add_argument(
        "--fit-data",
        help="sfid, projection-images: a manifest with the label and attribute columns, not the audited one",
    )
    m.add_argument(
        "--sfid-dims", type=int, default=0, help="sfid: dimensions to replace (default: an eighth)"
    )
    p.set_defaults(func=cmd_audit)


def _queries(path: str | None) -> list[str] | None:
    from vlmkit.errors import ConfigError

    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--queries file not found: {path}")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    queries = [q for q in lines if q and not q.startswith("#")]
    if not queries:
        raise ConfigError(f"{path} holds no queries (one per line)")
    return queries


def _majority(path: str | None) -> dict[str, str] | None:
    from vlmkit.config import load_json
    from vlmkit.errors import ConfigError

    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--majority file not found: {path}")
    data = load_json(path)
    data = data.get("majority", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(
            f"{path}: expected a JSON object of label -> attribute value (or a key 'majority' holding one)"
        )
    return data


def cmd_audit(args) -> None:
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.audit import Mitigation, audit_dual_encoder, weights_sha256
    from vlmkit.eval.audit_report import write_audit_report
    from vlmkit.eval.features import save_results
    from vlmkit.eval.templates import load_templates

    device = device_of(args.device)
    pt = load_pretrained(args.model, device)
    from vlmkit.models.registry import model_family

    if model_family(pt.model.cfg) in ("coca", "llava"):
        return _audit_generative(args, pt, device)
    if args.k is None:
        from vlmkit.errors import ConfigError

        raise ConfigError(
            "--k is required for a dual encoder: the skew metrics read each query's top k, and k is never defaulted "
            "(at k = the number of images the proportional MaxSkew is 0 whatever the model does)"
        )
    result = audit_dual_encoder(
        pt.model,
        require_tokenizer(pt, args.model),
        pt.preprocess,
        args.data,
        args.attribute,
        args.k,
        label_key=args.label_key,
        templates=load_templates(args.templates) if args.templates else None,
        queries=_queries(args.queries),
        samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        bf16=precision_of(args, device).bf16,
        model_name=args.model,
        model_sha256=weights_sha256(args.model),
        majority=_majority(args.majority),
        mitigation=Mitigation(
            names=tuple(args.mitigate),
            attribute_template=args.attribute_template,
            pair_template=args.pair_template,
            lam=args.lam,
            fit_data=args.fit_data,
            sfid_dims=args.sfid_dims,
        ),
    )
    out = Path(args.out)
    save_results(result, out / "audit.json")
    report = write_audit_report(result, out)
    m = result["metrics"]
    summary = {name: m[name]["value"] for name in m}
    print(json.dumps(summary, indent=2))
    for name, after in result.get("mitigations", {}).items():
        worse = ", ".join(after["worse"]) or "none"
        print(
            f"{name}: gap {after['change']['gap']:+.3f}, average accuracy {-after['accuracy_cost']:+.3f}; worse: {worse}"
        )
    print(f"wrote {out / 'audit.json'} and {report}")


def _audit_generative(args, pt, device) -> None:
    """CoCa/LLaVA: caption every image (in batches, with a progress bar), then `audit_captions`."""
    from tqdm.auto import tqdm

    from vlmkit.eval.audit import audit_captions, read_audit_rows, weights_sha256
    from vlmkit.eval.features import save_results
    from vlmkit.inference.generate import VLMPipeline

    rows, bad = read_audit_rows(args.data, args.attribute, args.label_key)
    precision = "bf16" if precision_of(args, device).bf16 else "fp32"
    pipe = VLMPipeline(
        pt.model, require_tokenizer(pt, args.model), pt.preprocess, device=device, precision=precision
    )
    captions = []
    for i in tqdm(range(0, len(rows), args.batch_size), desc="captions", unit="batch"):
        captions += pipe.caption([r.image for r in rows[i : i + args.batch_size]], prompt=args.prompt)
    majority = _majority(args.majority)
    result = audit_captions(
        captions,
        [r.fields[args.label_key] for r in rows],
        [r.fields[args.attribute] for r in rows],
        majority,
        args.samples,
        args.seed,
    )
    result.update(
        task="audit_captions",
        model=args.model,
        model_sha256=weights_sha256(args.model),
        dataset=str(args.data),
        attribute=args.attribute,
        settings={"prompt": args.prompt, "decoding": "greedy, at most 40 new tokens", "bootstrap_samples": args.samples,
                  "seed": args.seed, "majority": majority, "right": "the caption names the label (singular or plural)"},
        counts={"images": len(rows), "bad_rows": len(bad)},
    )  # fmt: skip
    out = Path(args.out)
    save_results(result, out / "audit.json")
    print(json.dumps({k: v["value"] for k, v in result["metrics"].items()}, indent=2))
    print(f"wrote {out / 'audit.json'}")


def register_card_cli(sub, data) -> None:
    """`vlmkit card` (a model card) and `vlmkit data card` (a datasheet)."""
    p = sub.add_parser("card", help="write a model card (Mitchell et al.) with Hugging Face metadata")
    p.add_argument(
        "--model", required=True, help="a model folder (a vlmkit run, checkpoint or Hugging Face folder)"
    )
    p.add_argument(
        "--audit", action="append", default=[], help="an audit.json of `vlmkit audit` (repeatable)"
    )
    p.add_argument("--name", help="model name in the card (default: the model folder's name)")
    p.add_argument("--out", help="the card file (default: MODEL/README.md)")
    p.set_defaults(func=cmd_card)
    p = data.add_parser("card", help="write a datasheet of a manifest: counts, duplicates, label x attribute")
    p.add_argument("--data", required=True, help="a JSONL/CSV manifest")
    p.add_argument(
        "--attribute", help="a sensitive attribute's column: its table, Cramer's V, caption mentions"
    )
    p.add_argument("--label-key", default="label", help="the label's column (default: label)")
    p.add_argument("--name", help="dataset name in the card (default: the manifest's folder name)")
    p.add_argument("--out", help="the datasheet file (default: DATASHEET.md beside the manifest)")
    p.set_defaults(func=cmd_data_card)


def cmd_card(args) -> None:
    from vlmkit.config import atomic_write_text
    from vlmkit.convert import load_pretrained
    from vlmkit.convert.card import build_model_card, read_audit
    from vlmkit.models.registry import model_family

    audits = [read_audit(a) for a in args.audit]
    pt = load_pretrained(args.model)
    name = args.name or Path(args.model).resolve().name
    card = build_model_card(name, pt.model.cfg, model_family(pt.model.cfg), args.model, audits)
    out = Path(args.out) if args.out else Path(args.model) / "README.md"
    atomic_write_text(out, card)
    print(f"wrote {out}")


def cmd_data_card(args) -> None:
    from vlmkit.config import atomic_write_text
    from vlmkit.data.datasheet import datasheet

    text = datasheet(args.data, args.attribute, args.label_key, args.name)
    out = Path(args.out) if args.out else Path(args.data).parent / "DATASHEET.md"
    atomic_write_text(out, text)
    print(f"wrote {out}")
