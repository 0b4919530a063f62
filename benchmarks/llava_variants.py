"""Train llava-tiny-shapes variants at fixed step counts, several at once, and print their VQA accuracy.

The recipe's stages run on time budgets, so the same recipe takes more steps on a faster machine. To compare
variants at this CPU's step counts on a GPU (or anywhere), each stage named in "steps" runs that many steps
instead (by default what its 2 and 8 minutes give on the 2-core CPU of benchmarks/RESULTS.md), every
variant starts from one contrastive stage (`--clip`, a finished `stage1-clip` folder, copied), and the
variants run side by side, one process each:

    python benchmarks/llava_variants.py --clip runs/llava-tiny-shapes/stage1-clip --out runs/variants \\
        --variant base '{}' \\
        --variant layer1 '{"set": ["model_overrides.vision_feature_layer=1"]}' \\
        --variant x2 '{"steps": {"instruct": 1194}}' \\
        --variant seed1 '{"set": ["seed=1"]}'

A variant is a JSON object: "steps" {stage: steps}, "stage" {stage: {stage key: value}} (e.g. another
train_data or batch_size), "set" ["key=value", ...] as `vlmkit train --set`. "multi colour" is the accuracy on
colour questions about scenes of several objects (the ones that need the object found by its shape).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_STEPS = {"align": 396, "instruct": 597}  # the recipe (run T) on the 2-core CPU


def variant_config(name: str, spec: dict, out: Path):
    """The recipe's config with the variant's changes, writing to out/name."""
    from vlmkit.config import parse_overrides
    from vlmkit.recipes import get_recipe
    from vlmkit.train.config import configure

    cfg = get_recipe("llava-tiny-shapes")
    steps = {**DEFAULT_STEPS, **spec.get("steps", {})}
    stages = []
    for stage in cfg.stages:
        stage = dict(stage)
        if stage["name"] in steps:
            stage.pop("time_budget", None)
            stage["max_steps"] = steps[stage["name"]]
        stage.update(spec.get("stage", {}).get(stage["name"], {}))
        stages.append(stage)
    changes = {"out": str(out / name), "resume": True, **parse_overrides(spec.get("set", []))}
    return replace(configure(cfg, changes, where=name), stages=stages)


def task_settings(cfg) -> tuple:
    return (
        cfg.data.synthetic,
        cfg.data.synthetic_args,
        cfg.data.questions_per_image,
        cfg.data.multi_object_chats,
    )


def run_one(name: str, spec: dict, out: Path, clip: Path | None) -> dict:
    from vlmkit.train import train as train_generative

    cfg = variant_config(name, spec, out)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    if clip is not None and not (run / "stage1-clip").exists():
        shutil.copytree(clip, run / "stage1-clip")
    start = time.time()
    train_generative(cfg)
    metrics = json.loads((run / "eval" / "vqa.json").read_text())["metrics"]
    objects = {}
    for line in open(Path(cfg.data.synthetic) / "val.jsonl"):
        row = json.loads(line)
        objects[Path(row["image"]).name] = row["objects"]
    preds = [json.loads(line) for line in open(run / "eval" / "vqa_predictions.jsonl")]
    multi = [p for p in preds if p["type"] == "colour" and len(objects[Path(p["image"]).name]) > 1]
    return {
        "name": name,
        "seconds": round(time.time() - start),
        **metrics["accuracy_by_type"],
        "counting": metrics["counting_accuracy"],
        "multi colour": sum(p["correct"] for p in multi) / max(1, len(multi)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    p.add_argument("--out", default="runs/variants")
    p.add_argument("--clip", help="a finished stage1-clip folder every variant starts from")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one variant in this process
    args = p.parse_args()
    out = Path(args.out)
    clip = Path(args.clip) if args.clip else None
    if args.one:
        ((name, spec),) = args.variant
        print("RESULT " + json.dumps(run_one(name, json.loads(spec), out, clip)), flush=True)
        return
    from vlmkit.recipes import get_recipe
    from vlmkit.train.stages import prepare_synthetic

    stage_names = {stage["name"] for stage in get_recipe("llava-tiny-shapes").stages}
    configs = []
    for name, spec in args.variant:
        try:
            parsed = json.loads(spec)
        except json.JSONDecodeError as e:
            sys.exit(f'--variant {name}: not JSON ({e}); e.g. \'{{"set": ["seed=1"]}}\'')
        unknown = (set(parsed.get("steps", {})) | set(parsed.get("stage", {}))) - stage_names
        if unknown:
            sys.exit(f"--variant {name}: no stage {sorted(unknown)}; the stages are {sorted(stage_names)}")
        configs.append(variant_config(name, parsed, out))
    if len({json.dumps(task_settings(c)) for c in configs}) > 1:
        sys.exit(
            "the variants share one data folder, so their task settings (synthetic_data, synthetic_args, "
            "questions_per_image, multi_object_chats) must agree; for other conversations write them elsewhere "
            "(vlmkit data tasks on a copy of the folder) and pass the file as the stage's train_data"
        )
    prepare_synthetic(configs[0])  # once, before the variants read it
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, spec in args.variant:
        cmd = [sys.executable, __file__, "--one", "--variant", name, spec, "--out", str(out)]
        cmd += ["--clip", str(clip)] if clip else []
        log = open(out / f"{name}.log", "w")
        env = {**os.environ, "TQDM_DISABLE": "1"}
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log
    print(f"{len(procs)} variants running; logs in {out}/<name>.log")
    rows = []
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        log_lines = (out / f"{name}.log").read_text().splitlines()
        lines = [line for line in log_lines if line.startswith("RESULT ")]
        rows.append(json.loads(lines[-1][7:]) if lines else {"name": name, "failed": proc.returncode})
    keys = ["colour", "multi colour", "shape", "count", "counting", "position", "exists", "relation"]
    print(f"| variant | seconds | {' | '.join(keys)} |\n|---|---|{'---|' * len(keys)}")
    for r in rows:
        if "failed" in r:
            print(f"| {r['name']} | failed (exit {r['failed']}; see its log) |")
        else:
            print(f"| {r['name']} | {r['seconds']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
