"""`vlmkit data curation-demo`: curating a noisy pool beats training on all of it, at equal compute.

1. write the synthetic "shapes" data with web-scrape noise in the train split: captions of other
   scenes, byte-identical copies of a few popular images, 8-pixel thumbnails and blank placeholders;
2. shard the pool (`vlmkit data shard`);
3. train a CLIP on all of it for a time budget ("noisy");
4. curate the pool (`vlmkit data filter`): drop images under 16 px, exact duplicate images, and keep
   the best-scoring fraction of pairs under the noisy model's own image-caption similarity. No clean
   model is needed: a model trained on a mostly-right pool already scores wrong captions low;
5. train the same recipe on the curated shards for exactly as many steps of the same batch ("curated");
6. evaluate both on the same clean held-out data and print the results side by side.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vlmkit.config import load_json
from vlmkit.data.synthetic import SHAPES_ARGS as DATA_ARGS
from vlmkit.data.synthetic import SHAPES_TEMPLATES

# About 60% of the pool is noise, in the range DataComp's filters remove from web data.
NOISE = dict(mismatch_fraction=0.3, duplicate_fraction=0.2, tiny_fraction=0.05, blank_fraction=0.05)
MIN_SIDE = 16
TOP_FRACTION = 0.6  # of what is left after the size and duplicate filters

METRICS = {
    "zeroshot_acc1": ("zeroshot", "acc1"),
    "zeroshot_acc5": ("zeroshot", "acc5"),
    "text_retrieval_recall@1": ("retrieval", "text_retrieval_recall@1"),
    "image_retrieval_recall@1": ("retrieval", "image_retrieval_recall@1"),
    "text_retrieval_recall@5": ("retrieval", "text_retrieval_recall@5"),
    "image_retrieval_recall@5": ("retrieval", "image_retrieval_recall@5"),
}


def _metrics(run: Path) -> dict[str, float]:
    results = {
        name: load_json(run / "eval" / f"{name}.json")["metrics"] for name in ("zeroshot", "retrieval")
    }
    return {key: results[task][metric] for key, (task, metric) in METRICS.items()}


def _plot(results: dict[str, dict], path: Path) -> Path:
    from vlmkit.eval.report import new_figure, save_figure

    fig = new_figure(7, 3.4)
    ax = fig.add_subplot()
    keys = list(METRICS)
    width = 0.38
    for offset, (name, colour) in zip(
        (-width / 2, width / 2), (("noisy", "#bbbbbb"), ("curated", "#2b7bba"))
    ):
        values = [results[name]["metrics"][k] for k in keys]
        bars = ax.bar([i + offset for i in range(len(keys))], values, width, label=name, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(keys)), [k.replace("_", " ").replace("retrieval ", "ret. ") for k in keys])
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_title("Same recipe, same steps: the noisy pool vs its curated subset")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def curation_demo(
    out: str | Path = "runs/curation",
    time_budget: float = 3.0,
    recipe: str = "clip-tiny",
    seed: int = 0,
    top_fraction: float = TOP_FRACTION,
    data_args: dict | None = None,
    recipe_overrides: dict | None = None,
    progress: bool = True,
    precision: str = "auto",
) -> dict:
    """Run the comparison; returns {"noisy": {...}, "curated": {...}, "curation": {...}, "minutes": m}.

    `data_args` and `recipe_overrides` exist for tests (a smaller pool, a tinier model).
    """
    from vlmkit.curation.curate import DedupImages, ImageSize, ModelScore, curate, load_pool
    from vlmkit.data.shards.write import write_shards
    from vlmkit.data.synthetic import generate, is_current
    from vlmkit.recipes import get_recipe
    from vlmkit.train import train

    t0 = time.perf_counter()
    out = Path(out)
    data_args = dict(DATA_ARGS if data_args is None else data_args)
    data, noisy_shards = out / "data", out / "shards" / "noisy"
    if is_current(data, seed=seed, **data_args, **NOISE) and (noisy_shards / "00000_stats.json").is_file():
        print(f"[1/5] using the noisy pool in {data} and its shards in {noisy_shards}")
    else:
        print(f"[1/5] writing a noisy 'shapes' pool to {data}, sharding it into {noisy_shards}")
        generate(data, seed=seed, progress=progress, **data_args, **NOISE)
        write_shards(
            data / "train.jsonl",
            noisy_shards,
            shard_size=1000,
            image_size=data_args["image_size"],
            resize_only_if_bigger=True,  # a thumbnail stays a thumbnail, as it would in a real pool
            encode_format="png",  # lossless: the pool is what the generator wrote
            overwrite=True,
            progress=progress,
        )

    def run(name: str, train_data: Path, **kwargs) -> dict:
        cfg = get_recipe(
            recipe,
            train_data=str(train_data),
            val_data=str(data / "val.jsonl"),
            zeroshot_data=str(data / "classification" / "val"),
            zeroshot_templates=SHAPES_TEMPLATES,
            out=str(out / name),
            seed=seed,
            crop_scale=(0.9, 1.0),
            precision=precision,
            **{**(recipe_overrides or {}), **kwargs},
        )
        summary = train(cfg)
        return {"steps": summary["step"], "batch_size": cfg.batch_size, "metrics": _metrics(out / name)}

    budget = f"for {time_budget:g} min" if time_budget else "(step budget from the recipe)"
    print(f"[2/5] training {recipe} on the whole noisy pool {budget}")
    noisy = run("noisy", noisy_shards, time_budget=time_budget)

    print(
        f"[3/5] curating: images >= {MIN_SIDE} px, no exact duplicates, top {top_fraction:.0%} by model score"
    )
    filters = [
        ImageSize(min_side=MIN_SIDE),
        DedupImages(),
        ModelScore(model=str(out / "noisy"), top_fraction=top_fraction),
    ]
    curated_dir = out / "shards" / "curated"
    if curated_dir.exists():
        shutil.rmtree(curated_dir)
    with load_pool(noisy_shards) as pool:
        truth = [s.meta.get("extra", {}).get("corruption") for s in pool.samples]
        bf16 = None if precision == "auto" else precision == "bf16"  # None: curate decides for its device
        result = curate(pool, filters, curated_dir, progress=progress, bf16=bf16)
    kept = set(result.kept_keys)
    kept_truth = [t for s, t in zip(pool.samples, truth) if s.key in kept]
    curation = {
        "pool": len(truth),
        "kept": len(kept_truth),
        "removed_by_filter": {step.name: len(step.removed) for step in result.steps},
        "noise_in_pool": sum(t is not None for t in truth),
        "noise_kept": sum(t is not None for t in kept_truth),
        "report": str(curated_dir / "report.html"),
    }

    print(f"[4/5] training {recipe} on the curated {len(kept)} pairs for the same {noisy['steps']} steps")
    curated = run("curated", curated_dir, max_steps=noisy["steps"])

    print("[5/5] comparing")
    results = {"noisy": noisy, "curated": curated, "curation": curation}
    results["plot"] = str(_plot(results, out / "curation_demo.png"))
    results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    (out / "curation_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    return results


def format_table(results: dict) -> str:
    noisy, curated, cur = results["noisy"], results["curated"], results["curation"]
    lines = [
        "",
        f"noisy pool: {cur['pool']} pairs, {cur['noise_in_pool']} of them noise; "
        f"curated: {cur['kept']} pairs, {cur['noise_kept']} of them noise",
        f"both runs: {noisy['steps']} steps of {noisy['batch_size']} pairs; evaluated on clean held-out data",
        f"{'metric':<28}{'noisy':>8}{'curated':>9}",
    ]
    for key in METRICS:
        lines.append(f"{key:<28}{noisy['metrics'][key]:>8.3f}{curated['metrics'][key]:>9.3f}")
    lines.append(f"curation report: {cur['report']}")
    lines.append(f"plot: {results['plot']}")
    return "\n".join(lines)
