"""`vlmkit quickstart`: the whole loop on the built-in data, in a few minutes on a laptop CPU.

1. write the synthetic "shapes" dataset (captioned scenes + a 30-class colour x shape ImageFolder);
2. train a small CLIP from scratch within a time budget;
3. evaluate zero-shot classification (held-out images), retrieval and a linear probe;
4. write report.html with the plots.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("vlmkit.quickstart")


def quickstart(
    out: str | Path = "runs/quickstart",
    time_budget: float = 4.2,
    recipe: str = "clip-tiny",
    seed: int = 0,
    precision: str = "auto",
) -> dict:
    """Run the quickstart; returns the headline metrics. Prints a summary and the report's path."""
    from vlmkit.data.synthetic import SHAPES_ARGS as DATA_ARGS
    from vlmkit.data.synthetic import SHAPES_TEMPLATES, generate, is_current
    from vlmkit.eval.features import save_results
    from vlmkit.eval.linear_probe import evaluate_linear_probe
    from vlmkit.eval.report import write_report
    from vlmkit.recipes import get_recipe
    from vlmkit.train import train

    t0 = time.perf_counter()
    out = Path(out)
    data = out / "data"
    if is_current(data, seed=seed, **DATA_ARGS):
        print(f"[1/4] using the synthetic data in {data}")
    else:
        print(f"[1/4] writing the synthetic 'shapes' dataset to {data}")
        generate(data, seed=seed, **DATA_ARGS)
    run = out / "run"
    print(f"[2/4] training {recipe} for {time_budget:g} min -> {run}")
    cfg = get_recipe(
        recipe,
        train_data=str(data / "train.jsonl"),
        val_data=str(data / "val.jsonl"),
        zeroshot_data=str(data / "classification" / "val"),
        zeroshot_templates=SHAPES_TEMPLATES,
        out=str(run),
        time_budget=time_budget,
        seed=seed,
        precision=precision,
        crop_scale=(0.9, 1.0),  # every object is named in the caption: crops must not cut one out
    )
    train(cfg)
    print("[3/4] linear probe on frozen image features")
    from vlmkit.convert import load_pretrained
    from vlmkit.runtime import resolve_precision

    pt = load_pretrained(run)
    probe = evaluate_linear_probe(
        pt.model,
        pt.preprocess,
        data / "classification" / "train",
        data / "classification" / "val",
        model_name=str(run),
        bf16=resolve_precision(precision, "cpu").bf16,
    )
    save_results(probe, run / "eval" / "linear_probe.json")
    print("[4/4] writing the report")
    report = write_report(run)
    zs = json.loads((run / "eval" / "zeroshot.json").read_text())["metrics"]
    ret = json.loads((run / "eval" / "retrieval.json").read_text())["metrics"]
    summary = {
        "zeroshot_acc1": zs["acc1"],
        "zeroshot_acc5": zs["acc5"],
        "text_retrieval_recall@1": ret["text_retrieval_recall@1"],
        "image_retrieval_recall@1": ret["image_retrieval_recall@1"],
        "linear_probe_acc1": probe["metrics"]["acc1"],
        "minutes": round((time.perf_counter() - t0) / 60, 2),
        "report": str(report),
    }
    width = max(map(len, summary))
    print("\nvlmkit quickstart results (held-out synthetic images)")
    for k, v in summary.items():
        print(f"  {k:<{width}}  {v:.3f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    (run / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
