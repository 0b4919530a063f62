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
from vlmkit.errors import ConfigError
from vlmkit.train.config import TrainConfig, configure
from vlmkit.train.trainer import Trainer


def prepare_synthetic(cfg: TrainConfig) -> None:
    """Write the built-in shapes data and its caption / question files to `cfg.data.synthetic` unless there."""
    from vlmkit.data.synthetic import generate, is_current
    from vlmkit.data.vqa import tasks_are_current, write_tasks

    root = Path(cfg.data.synthetic)
    if cfg.data.synthetic_kind not in ("shapes", "moving-shapes"):
        raise ConfigError(
            f"synthetic_kind must be 'shapes' or 'moving-shapes', not {cfg.data.synthetic_kind!r}"
        )
    if cfg.data.synthetic_kind == "moving-shapes":
        from vlmkit.data import synthetic_video

        if not synthetic_video.is_current(root, **cfg.data.synthetic_args):
            print(f"writing the synthetic 'moving shapes' videos to {root}")
            synthetic_video.generate(root, **cfg.data.synthetic_args)
        return
    tasks = dict(
        seed=cfg.data.synthetic_args.get("seed", 0),
        questions_per_image=cfg.data.questions_per_image,
        multi_object_chats=cfg.data.multi_object_chats,
    )
    if not is_current(root, **cfg.data.synthetic_args):
        print(f"writing the synthetic 'shapes' dataset and its questions to {root}")
        generate(root, **cfg.data.synthetic_args)
    elif tasks_are_current(root, splits=("train", "val"), **tasks):
        return
    write_tasks(root, **tasks)


def _fill(spec, data: str | None):
    return spec.replace("{data}", data) if isinstance(spec, str) and data else spec


def stage_configs(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) per stage. A stage with a "recipe" trains that recipe; a generative stage after it
    starts its image tower from it (vision_init_from; a flow model its text tower, text_init_from); every other stage starts from the previous stage's
    model (init_from). The last stage writes to cfg.out, the others to cfg.out/stage<i>-<name>."""
    from vlmkit.recipes import get_recipe, smoke

    data = cfg.data.synthetic
    base = configure(
        cfg,
        {
            f"data.{f}": _fill(getattr(cfg.data, f), data)
            for f in ("train", "val", "zeroshot", "compositional", "hard_negatives")
        },
    )
    if not cfg.stages:
        return [("train", base)]
    generative = cfg.task_name() not in (
        "contrastive",
        "video-contrastive",
    )  # a later stage's image tower can come from a recipe's
    tower = "text_init_from" if cfg.task_name() == "flow" else "vision_init_from"
    own = [s for s in cfg.stages if "recipe" not in s]
    tokenizer_data = "::".join(dict.fromkeys(_fill(s.get("train_data", cfg.data.train), data) for s in own))
    out, prev, vision, runs = Path(cfg.out), cfg.transfer.init_from, cfg.transfer.vision_init_from, []
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
            sub = configure(sub, {"model_overrides": stage.pop("model_overrides", {})})
            sub = smoke(sub) if shrink else sub
            common = dict(seed=cfg.seed, num_workers=cfg.data.num_workers, precision=cfg.precision)
            common |= dict(parallel=cfg.parallel.strategy, out=run_out, resume=cfg.resume)
            runs.append((name, configure(sub, {**common, **stage}, where=f"stages[{i}]")))
            vision = run_out
            continue
        init_overrides = stage.pop("init_overrides", {})
        stage_cfg = configure(base, {**stage, "stages": [], "out": run_out}, where=f"stages[{i}]")
        if not last:  # intermediate models get a quick look, the final one the full evaluation
            quick = min(cfg.task.eval_limit, cfg.task.final_eval_limit or cfg.task.eval_limit)
            stage_cfg = configure(stage_cfg, {"final_eval_limit": quick})
        first = prev is None
        stage_cfg = replace(
            stage_cfg,
            model=replace(stage_cfg.model, tokenizer=cfg.model.tokenizer if first else None),
            # the first stage's new tokenizer learns every stage's texts (later stages keep it)
            data=replace(stage_cfg.data, tokenizer_data=tokenizer_data if first else None),
            transfer=replace(
                stage_cfg.transfer,
                init_from=prev,
                **{tower: vision if first and generative else None},
                init_overrides=init_overrides if not first else {},
            ),
        )
        runs.append((name, stage_cfg))
        prev = run_out
    return runs


def train(cfg: TrainConfig, callbacks=None) -> dict:
    """Train as `cfg` says, every stage in order; returns the last run's summary (final step, validation
    metrics, report path), with every stage's under "stages" when there are several."""
    if cfg.data.synthetic and dist.is_main():
        prepare_synthetic(cfg)
    if cfg.data.synthetic:
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
