"""`vlmkit transfer-demo`: transfer to classes the pretraining never named, from a few examples each.

1. write the synthetic "shapes" data with two shapes (star, diamond) left out of every pretraining
   scene, so no caption names them; the classification split still has all 30 colour x shape classes;
2. pretrain a small CLIP on the scenes within a time budget;
3. take `shots` images of each held-out class (colour x star/diamond, 12 classes) and evaluate, on
   held-out test images of those classes:
   - zero-shot: the pretrained model with class-name prompts (it has never read "star" or "diamond");
   - linear probe: logistic regression on the pretrained image features;
   - fine-tune, LiT (image tower locked) and LoRA: contrastive fine-tuning on the few-shot images with
     template captions ("finetune like you pretrain"), started from the pretrained model;
   - WiSE-FT: the pretrained and fine-tuned weights averaged (alpha 0.5);
   and the zero-shot accuracy of every model on the classes it was pretrained on (forgetting);
4. print the table, and save it as JSON and a bar chart.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vlmkit.data.synthetic import SHAPES_TEMPLATES

HELD_OUT_SHAPES = ("star", "diamond")
SHOTS = 8  # training images per held-out class
DATA_ARGS = dict(
    num_train=6000,
    num_val=500,
    image_size=64,
    background_noise=0.2,
    num_per_class_train=SHOTS,
    num_per_class_val=20,  # test images per class
    object_weights=(5, 3, 1, 1),  # as the quickstart: many one-object scenes make shape matter
    exclude_shapes=HELD_OUT_SHAPES,
)
# Shared by every fine-tuning run: few-shot data is small, so a short run at a small batch.
FINETUNE = dict(batch_size=32, max_steps=120, warmup_steps=12, weight_decay=0.1)  # 40 epochs of 96 pairs
# name -> (TrainConfig overrides, label in the table)
METHODS = {
    "finetune": (dict(lr=1e-4), "fine-tune (all weights)"),
    "lit": (dict(lr=1e-3, lock_image=True), "LiT (image tower locked)"),
    "lora": (dict(lr=3e-3, lora_rank=8), "LoRA r=8"),  # a low-rank update wants a larger step
}
WISE_ALPHA = 0.5


def _split_classes(data: Path, held_out_shapes: tuple[str, ...]) -> dict[str, Path]:
    """ImageFolders of the held-out classes (train, val) and of the pretrained classes (val), as copies."""
    folders = {"heldout_train": ("train", True), "heldout_val": ("val", True), "seen_val": ("val", False)}
    out = {}
    for name, (split, held_out) in folders.items():
        root = data / "transfer" / name
        shutil.rmtree(root, ignore_errors=True)
        for src in sorted((data / "classification" / split).iterdir()):
            if src.is_dir() and (src.name.split("_")[1] in held_out_shapes) == held_out:
                shutil.copytree(src, root / src.name)
        out[name] = root
    return out


def _plot(rows: list[dict], path: Path) -> Path:
    from vlmkit.eval.report import new_figure, save_figure

    fig = new_figure(8, 3.6)
    ax = fig.add_subplot()
    width = 0.38
    for offset, (key, label, colour) in zip(
        (-width / 2, width / 2),
        (("heldout", "held-out classes", "#2b7bba"), ("seen", "pretraining classes", "#bbbbbb")),
    ):
        xs = [i + offset for i, r in enumerate(rows) if r[key] is not None]
        values = [r[key] for r in rows if r[key] is not None]
        bars = ax.bar(xs, values, width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["method"].split(" (")[0] for r in rows], fontsize=8)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Transfer to classes the pretraining captions never named")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return save_figure(fig, path)


def transfer_demo(
    out: str | Path = "runs/transfer",
    time_budget: float | None = 3.0,
    recipe: str = "clip-tiny",
    seed: int = 0,
    shots: int = SHOTS,
    data_args: dict | None = None,
    recipe_overrides: dict | None = None,
    finetune: dict | None = None,
    progress: bool = True,
    precision: str = "auto",
) -> dict:
    """Run the comparison; returns {"rows": [{"method", "heldout", "seen", "trainable"}], ...}.

    `time_budget` is minutes of pretraining (None: the recipe's step budget). `data_args`,
    `recipe_overrides` (pretraining) and `finetune` (every fine-tuning run) exist to make tests tiny.
    """
    from vlmkit.convert import load_pretrained
    from vlmkit.data.synthetic import generate, is_current
    from vlmkit.eval.linear_probe import evaluate_linear_probe
    from vlmkit.recipes import get_recipe
    from vlmkit.train import train
    from vlmkit.train.transfer import imagefolder_to_manifest, prepare_model, wise_ft, zeroshot_accuracy

    t0 = time.perf_counter()
    out = Path(out)
    data_args = dict(DATA_ARGS if data_args is None else data_args)
    data_args["num_per_class_train"] = shots
    held_out = tuple(data_args.get("exclude_shapes", HELD_OUT_SHAPES))
    data_args["exclude_shapes"] = held_out
    data = out / "data"
    if is_current(data, seed=seed, **data_args):
        print(f"[1/5] using the synthetic data in {data}")
    else:
        print(f"[1/5] writing 'shapes' data without {' or '.join(held_out)} in any caption to {data}")
        generate(data, seed=seed, progress=progress, **data_args)
    folders = _split_classes(data, held_out)
    fewshot = imagefolder_to_manifest(
        folders["heldout_train"], SHAPES_TEMPLATES, data / "transfer" / "fewshot.jsonl"
    )

    pretrained = out / "pretrain"
    for name in ("pretrain", *METHODS, "wise_ft"):  # runs of an earlier demo: start them afresh
        shutil.rmtree(out / name, ignore_errors=True)
    budget = f"for {time_budget:g} min" if time_budget else "(step budget from the recipe)"
    print(f"[2/5] pretraining {recipe} {budget} -> {pretrained}")
    train(
        get_recipe(
            recipe,
            train_data=str(data / "train.jsonl"),
            val_data=str(data / "val.jsonl"),
            zeroshot_data=str(folders["seen_val"]),
            zeroshot_templates=SHAPES_TEMPLATES,
            out=str(pretrained),
            time_budget=time_budget,
            seed=seed,
            crop_scale=(0.9, 1.0),  # every object is named in the caption: crops must not cut one out
            precision=precision,
            **(recipe_overrides or {}),
        )
    )

    def accuracy(model_dir: Path) -> dict:
        return {
            "heldout": zeroshot_accuracy(model_dir, folders["heldout_val"], SHAPES_TEMPLATES)["acc1"],
            "seen": zeroshot_accuracy(model_dir, folders["seen_val"], SHAPES_TEMPLATES)["acc1"],
        }

    def trainable(**kwargs) -> int:
        model = load_pretrained(pretrained).model
        return prepare_model(model, **kwargs).trainable

    print(f"[3/5] zero-shot and linear probe ({shots} images per held-out class) of the pretrained model")
    rows = [{"method": "zero-shot (pretrained)", **accuracy(pretrained), "trainable": 0}]
    pt = load_pretrained(pretrained)
    probe = evaluate_linear_probe(pt.model, pt.preprocess, folders["heldout_train"], folders["heldout_val"])
    probe_params = (pt.model.cfg.embed_dim + 1) * len(list(folders["heldout_train"].iterdir()))  # W and b
    rows.append(
        {
            "method": "linear probe",
            "heldout": probe["metrics"]["acc1"],
            "seen": None,
            "trainable": probe_params,
        }
    )

    print(f"[4/5] fine-tuning on the {shots}-shot data: {', '.join(label for _, label in METHODS.values())}")
    runs = {}
    num_pairs = len(fewshot.read_text(encoding="utf-8").splitlines())
    finetune = {**FINETUNE, **(finetune or {})}
    finetune["batch_size"] = min(finetune["batch_size"], num_pairs)  # at least one batch per epoch
    for name, (overrides, label) in METHODS.items():
        cfg = get_recipe(
            recipe,
            train_data=str(fewshot),  # no evaluation data: every model is evaluated alike below
            out=str(out / name),
            init_from=str(pretrained),
            seed=seed,
            crop_scale=(0.9, 1.0),
            eval_every=0,
            save_every=0,
            precision=precision,
            **{**finetune, **overrides},
        )
        t = time.perf_counter()
        train(cfg)
        runs[name] = {"seconds": round(time.perf_counter() - t, 1)}
        n = trainable(
            lock_image=cfg.transfer.lock_image,
            lora_rank=cfg.transfer.lora_rank,
            lora_alpha=cfg.transfer.lora_alpha,
            lora_targets=cfg.transfer.lora_targets,
        )
        rows.append({"method": label, **accuracy(out / name), "trainable": n})

    print(f"[5/5] WiSE-FT: alpha {WISE_ALPHA} between the pretrained and the fine-tuned weights")
    wise_dir = wise_ft(pretrained, out / "finetune", WISE_ALPHA, out / "wise_ft")
    wise_row = {"method": f"WiSE-FT (alpha {WISE_ALPHA:g})", **accuracy(wise_dir)}
    rows.append(
        {**wise_row, "trainable": next(r["trainable"] for r in rows if r["method"] == METHODS["finetune"][1])}
    )

    results = {
        "rows": rows,
        "held_out_shapes": list(held_out),
        "shots": shots,
        "num_heldout_classes": len(list(folders["heldout_val"].iterdir())),
        "num_seen_classes": len(list(folders["seen_val"].iterdir())),
        "finetune_runs": runs,
    }
    results["plot"] = str(_plot(rows, out / "transfer_demo.png"))
    results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    (out / "transfer_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    return results


def format_table(results: dict) -> str:
    """The results as a text table: one row per method, accuracy on held-out and on pretraining classes."""
    held, seen = results["num_heldout_classes"], results["num_seen_classes"]
    lines = [
        "",
        f"held out of pretraining: {', '.join(results['held_out_shapes'])} ({held} classes); "
        f"{results['shots']} training images per held-out class",
        f"{'method':<28}{f'held-out ({held}-way)':>20}{f'pretrained ({seen}-way)':>22}{'trained params':>16}",
    ]
    for r in results["rows"]:
        seen_acc = f"{r['seen']:.3f}" if r["seen"] is not None else "-"
        lines.append(f"{r['method']:<28}{r['heldout']:>20.3f}{seen_acc:>22}{r['trainable']:>16,}")
    lines.append(f"plot: {results['plot']}  ({results['minutes']:.1f} min in all)")
    return "\n".join(lines)
