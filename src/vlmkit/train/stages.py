"""Runs of one or several stages: `train(cfg)` is the entry point for every recipe.

A recipe with `stages` runs them one after the other (LLaVA's recipe: pretrain the image tower, align the
projector on captions, then tune on instructions; FLIP's: train masked, then a short unmasked stage). Each
stage is an ordinary `Trainer` run whose fields are the config's with the stage's overrides; it starts
from the previous stage's model and freezes what its `freeze` regexes say. A stage with a "recipe" trains
that recipe instead (the contrastive stage whose image tower the next generative stage starts from). The
last stage writes to `out` itself, earlier ones to `out/stage<i>-<name>`. `--resume` skips finished stages
and resumes the unfinished one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vlmkit import distributed as dist
from vlmkit.config import override
from vlmkit.models.registry import task_of
from vlmkit.train.config import TrainConfig
from vlmkit.train.trainer import Trainer


def prepare_synthetic(cfg: TrainConfig) -> None:
    """Write the built-in shapes data and its caption / question files to `cfg.synthetic_data` unless there."""
    from vlmkit.data.synthetic import generate, is_current
    from vlmkit.data.vqa import tasks_are_current, write_tasks

    root = Path(cfg.synthetic_data)
    tasks = dict(
        seed=cfg.synthetic_args.get("seed", 0),
        questions_per_image=cfg.questions_per_image,
        multi_object_chats=cfg.multi_object_chats,
    )
    if not is_current(root, **cfg.synthetic_args):
        print(f"writing the synthetic 'shapes' dataset and its questions to {root}")
        generate(root, **cfg.synthetic_args)
    elif tasks_are_current(root, splits=("train", "val"), **tasks):
        return
    write_tasks(root, **tasks)


def _fill(spec, data: str | None):
    return spec.replace("{data}", data) if isinstance(spec, str) and data else spec


def stage_configs(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) per stage. A stage with a "recipe" trains that recipe; a generative stage after it
    starts its image tower from it (vision_init_from); every other stage starts from the previous stage's
    model (init_from). The last stage writes to cfg.out, the others to cfg.out/stage<i>-<name>."""
    from vlmkit.recipes import get_recipe, smoke

    data = cfg.synthetic_data
    fields = ("train_data", "val_data", "zeroshot_data")
    base = replace(cfg, **{f: _fill(getattr(cfg, f), data) for f in fields})
    if not cfg.stages:
        return [("train", base)]
    generative = task_of(cfg.model) != "contrastive"  # a later stage's image tower can come from a recipe's
    own = [s for s in cfg.stages if "recipe" not in s]
    tokenizer_data = "::".join(_fill(s.get("train_data", cfg.train_data), data) for s in own)
    out, prev, vision, runs = Path(cfg.out), cfg.init_from, cfg.vision_init_from, []
    for i, stage in enumerate(cfg.stages):
        stage = {k: _fill(v, data) for k, v in stage.items()}
        name = stage.pop("name", f"stage{i + 1}")
        share = stage.pop("time_share", None)
        if share is not None and cfg.time_budget:
            stage["time_budget"] = cfg.time_budget * float(share)
        last = i == len(cfg.stages) - 1
        run_out = str(out if last else out / f"stage{i + 1}-{name}")
        recipe = stage.pop("recipe", None)
        if recipe is not None:  # another recipe: the image tower's contrastive pretraining
            shrink = stage.pop("smoke", False)
            sub = get_recipe(recipe)
            # the stage's model overrides refine the recipe's (and a smoke run still shrinks the result)
            sub = replace(sub, model_overrides={**sub.model_overrides, **stage.pop("model_overrides", {})})
            sub = smoke(sub) if shrink else sub
            common = {k: getattr(cfg, k) for k in ("seed", "num_workers", "precision", "parallel")} | stage
            runs.append((name, override(sub, {**common, "out": run_out, "resume": cfg.resume})))
            vision = run_out
            continue
        init_overrides = stage.pop("init_overrides", {})
        stage_cfg = override(base, {**stage, "stages": [], "out": run_out}, where=f"stages[{i}]")
        if not last:  # intermediate models get a quick look, the final one the full evaluation
            quick = min(cfg.eval_limit, cfg.final_eval_limit or cfg.eval_limit)
            stage_cfg = replace(stage_cfg, final_eval_limit=quick)
        first = prev is None
        stage_cfg = replace(
            stage_cfg,
            init_from=prev,
            vision_init_from=vision if first and generative else None,
            tokenizer=cfg.tokenizer if first else None,
            tokenizer_data=tokenizer_data if first and generative else None,
            init_overrides=init_overrides if not first else {},
        )
        runs.append((name, stage_cfg))
        prev = run_out
    return runs


def train(cfg: TrainConfig, callbacks=None) -> dict:
    """Train as `cfg` says, every stage in order; returns the last run's summary (final step, validation
    metrics, report path), with every stage's under "stages" when there are several."""
    if cfg.synthetic_data and dist.is_main():
        prepare_synthetic(cfg)
    if cfg.synthetic_data:
        dist.barrier()
    summaries = {}
    stages = stage_configs(cfg)
    for name, stage_cfg in stages:
        done = Path(stage_cfg.out) / "summary.json"
        if cfg.resume and done.is_file() and Path(stage_cfg.out) != Path(cfg.out):
            if dist.is_main():
                print(f"stage {name}: finished earlier in {stage_cfg.out}, skipping")
            continue
        if dist.is_main() and len(stages) > 1:
            print(f"stage {name} -> {stage_cfg.out}")
        summaries[name] = Trainer(stage_cfg, callbacks).fit()
    last = summaries[list(summaries)[-1]] if summaries else {}
    return {**last, "stages": summaries} if len(summaries) > 1 else last
