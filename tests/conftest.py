"""Shared fixtures: a tiny randomly initialised BERT (real transformers code, fast on CPU),
small institution files cut from the real drug-review data, and a resolved config."""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import make_federation_dir, make_tiny_flat
from privatune.common.config import resolve
from privatune.simulations.bench.shared import tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The embedding cache (common.model.features) of this test session only; Ray workers inherit it.
os.environ["PRIVATUNE_CACHE"] = tempfile.mkdtemp(prefix="privatune-test-cache-")
# The nodes' state (signing keys, anchors, the cache secret) of this test session only.
os.environ["PRIVATUNE_STATE"] = tempfile.mkdtemp(prefix="privatune-test-state-")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def reviews() -> pd.DataFrame:
    """Real patient reviews (UCI Drug Review) from the installed package."""
    from privatune.simulations.prepare import load_drugreview

    train, _ = load_drugreview()
    return train


@pytest.fixture()
def federation_dir(tmp_path, reviews) -> Path:
    return make_federation_dir(tmp_path, reviews)


@pytest.fixture()
def tiny_flat(tiny_model_dir, federation_dir, tmp_path) -> dict:
    return make_tiny_flat(tiny_model_dir, federation_dir, tmp_path)


@pytest.fixture()
def tiny_cfg(tiny_flat):
    return resolve(tiny_flat)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers: ``deployment`` (real SuperLink/SuperNodes), ``benchmark`` (the benchmark
    scripts) and ``simulation`` (any test that runs a federation) are left out of
    ``make test-fast``, together with ``slow`` (the real pretrained model)."""
    for item in items:
        module = item.module.__name__ if item.module else ""
        if module == "test_deployment":
            item.add_marker("deployment")
        elif module == "test_bench":
            item.add_marker("benchmark")
        elif any(
            re.search(r"\bsimulate\(|run_flat|run_simulation", inspect.getsource(f))
            for f in [item.function, *_fixture_functions(item)]
        ):
            item.add_marker("simulation")


def _fixture_functions(item: pytest.Item) -> list:
    """The functions of the fixtures a test uses (a federation may run in one of them)."""
    defs = getattr(item, "_fixtureinfo", None)
    if defs is None:
        return []
    return [d.func for name in defs.names_closure for d in defs.name2fixturedefs.get(name, ())]
