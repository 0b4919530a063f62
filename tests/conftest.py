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


# A reference test skipped because a dev dependency is missing (pytest.importorskip) would let the suite pass
# without checking anything against its reference: such a skip is a failure. `make test` installs them all.
def _missing_dependency(report) -> bool:
    return report.skipped and "could not import" in str(report.longrepr)


def _fail(report) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{report.longrepr}\na dev dependency is missing: pip install -e '.[dev]' (make test does)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _missing_dependency(report):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _missing_dependency(report):
        _fail(report)
