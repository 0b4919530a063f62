"""Group-balanced sampling (a training-time bias mitigation): each epoch's draws cover every (label, attribute)
group about equally, however skewed the manifest; it needs the group columns and a manifest."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from vlmkit.data.bias import generate_biased
from vlmkit.errors import ConfigError, DataError
from vlmkit.recipes import get_recipe, smoke
from vlmkit.train.config import configure
from vlmkit.train.trainer import Trainer, group_weights


def test_group_weights_make_every_group_equally_likely():
    groups = [("circle", "warm")] * 90 + [("circle", "cool")] * 10
    w = group_weights(groups, ["label", "background"])
    assert w[:90].sum().item() == pytest.approx(w[90:].sum().item()) and w.sum().item() == pytest.approx(100)


def cfg_for(data, out, **kw):
    cfg = smoke(get_recipe("clip-tiny", train_data=str(data), out=str(out)))
    return configure(cfg, {"precision": "fp32", "eval_every": 0, "save_every": 0, **kw})


def test_an_epoch_of_a_skewed_manifest_draws_every_group_about_equally(tmp_path):
    paths = generate_biased(tmp_path / "d", strength=0.9, num_train=400, num_val=0, num_test=0, image_size=32,
                            progress=False)  # fmt: skip
    trainer = Trainer(cfg_for(paths["train"], tmp_path / "run", group_balance=True))
    trainer.setup()
    groups = trainer.task.sample_groups()
    plain = Counter(groups)
    assert max(plain.values()) / min(plain.values()) == pytest.approx(9.0)  # 72 majority, 8 minority a shape
    drawn = Counter(groups[i] for batch in trainer._batches(0, 0).batch_sampler for i in batch)
    assert len(drawn) == 10 and max(drawn.values()) / min(drawn.values()) < 2.0
    t2 = Trainer(cfg_for(paths["train"], tmp_path / "r3", group_balance=True))
    t2.setup()
    assert list(t2._batches(0, 0).batch_sampler) == list(trainer._batches(0, 0).batch_sampler)  # seeded


def test_group_balance_needs_the_columns(tmp_path, shapes_dir):
    with pytest.raises(DataError, match="no usable rows"):  # the shapes manifest has no label/background
        Trainer(cfg_for(shapes_dir / "train.jsonl", tmp_path / "run", group_balance=True)).setup()
    with pytest.raises(ConfigError, match="unknown key"):
        cfg_for(shapes_dir / "train.jsonl", tmp_path / "run", group_balanse=True)
    assert torch.is_tensor(group_weights([("a",), ("b",)], ["label"]))
