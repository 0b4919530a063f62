"""The run config as one tree: flat names and tree paths set the same fields; JSON round trips; errors name
the key."""

import json

import pytest

from vlmkit.cli import main
from vlmkit.config import to_dict
from vlmkit.errors import ConfigError
from vlmkit.recipes import RECIPES, get_recipe
from vlmkit.train.config import ALIASES, SECTIONS, TrainConfig, configure, make_config


def test_flat_names_and_tree_paths_set_the_same_fields():
    flat = make_config(
        model="siglip-tiny",
        model_overrides={"vision.layers": 2},
        train_data="a.jsonl",
        lr=3e-4,
        freeze="^text",
        parallel="fsdp",
        compile=True,
        lora_rank=4,
        max_len=64,
        batch_size=32,
    )
    tree = make_config(
        {
            "model.name": "siglip-tiny",
            "model.overrides.vision.layers": 2,
            "data.train": "a.jsonl",
            "optim.lr": "3e-4",  # command-line strings are coerced to the field's type
            "optim.freeze": ["^text"],
            "parallel": {"strategy": "fsdp", "compile": "true"},
            "transfer.lora_rank": 4,
            "task.max_len": 64,
            "batch_size": 32,
        }
    )
    assert flat == tree
    assert (
        flat.optim.lr == 3e-4
        and flat.parallel.strategy == "fsdp"
        and flat.model.overrides == {"vision.layers": 2}
    )
    assert flat != TrainConfig()  # and the defaults differ, so the comparison can fail


def test_every_section_field_has_one_flat_name():
    paths = list(ALIASES.values())
    assert len(paths) == len(set(paths))
    for section, cls in SECTIONS.items():
        for name in cls.__dataclass_fields__:
            path = f"{section}.{name}"
            assert path in paths or name in ("name", "strategy"), (
                path
            )  # the primary fields: model=..., task=...


def test_saved_config_round_trips_and_older_flat_files_still_load(tmp_path):
    cfg = get_recipe("llava-tiny-shapes", lr=2e-4, out=str(tmp_path))
    saved = json.loads(json.dumps(to_dict(cfg)))  # as train_config.json holds it
    loaded = make_config(saved)
    assert to_dict(loaded) == saved and loaded.optim == cfg.optim and loaded.stages == cfg.stages
    # a train_config.json written before the config became a tree: flat names only
    old = {"model": "clip-tiny", "train_data": "x.jsonl", "lr": 5e-4, "parallel": "ddp", "lock_image": True}
    cfg = make_config(old)
    assert (cfg.model.name, cfg.data.train, cfg.optim.lr, cfg.parallel.strategy) == (
        "clip-tiny",
        "x.jsonl",
        5e-4,
        "ddp",
    )
    assert cfg.transfer.lock_image


def test_unknown_keys_and_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown key 'lrr'; did you mean 'lr'"):
        make_config(lrr=1)
    with pytest.raises(ConfigError, match=r"optim: unknown key 'learning_rate'"):
        make_config({"optim.learning_rate": 1})
    with pytest.raises(ConfigError, match="parallel must be one of auto, ddp, fsdp"):
        make_config(parallel="zero3")
    with pytest.raises(ConfigError, match="data is a section"):
        make_config(data="x.jsonl")
    with pytest.raises(ConfigError, match="lr_scale"):
        configure(get_recipe("clip-tiny"), {"lr_scale.visual": "fast"})


def test_every_recipe_is_a_valid_config():
    for name in RECIPES:
        cfg = get_recipe(name)
        assert cfg.model.name.split("-")[0] in name


def test_task_name_comes_from_the_family_or_the_task_section():
    assert make_config(model="coca-tiny").task_name() == "coca"
    assert make_config(model="flip-tiny").task_name() == "contrastive"
    assert make_config(model="clip-tiny", task="llava").task_name() == "llava"


def test_cli_prints_the_resolved_tree(capsys):
    main(
        [
            "train",
            "--recipe",
            "clip-tiny",
            "--lr",
            "2e-3",
            "--set",
            "data.num_workers=3",
            "--set",
            "parallel=fsdp",
            "--print-config",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 2e-3 and printed["data"]["num_workers"] == 3
    assert printed["parallel"]["strategy"] == "fsdp" and printed["model"]["name"] == "clip-tiny"
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "clip-tiny", "--set", "optim.lrr=1", "--print-config"])
    assert e.value.code == 2
    assert "optim: unknown key 'lrr'" in capsys.readouterr().err
