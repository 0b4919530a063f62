"""Shared fixtures: a small synthetic dataset written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep tests from oversubscribing them (and from fighting a parallel process).
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A tiny 'shapes' dataset: 64 training pairs, 16 validation pairs, 2 images per class."""
    from vlmkit.data.synthetic import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(
        out,
        num_train=64,
        num_val=16,
        image_size=32,
        seed=0,
        num_per_class_train=2,
        num_per_class_val=1,
        progress=False,
    )
    return out
