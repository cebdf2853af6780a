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

from common.config import resolve
from simulations.bench_common import tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The embedding cache (common.features) of this test session only; Ray workers inherit it.
os.environ["PRIVATUNE_CACHE"] = tempfile.mkdtemp(prefix="privatune-test-cache-")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def reviews() -> pd.DataFrame:
    """Real patient reviews (UCI Drug Review) from the installed package."""
    from simulations.prepare import load_drugreview

    train, _ = load_drugreview()
    return train


@pytest.fixture()
def federation_dir(tmp_path, reviews) -> Path:
    """Three institutions of 40 rows each, a test file and a manifest."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    names = ["hospital-a", "hospital-b", "hospital-c"]
    for i, name in enumerate(names):
        reviews.iloc[i * 40 : (i + 1) * 40][["text", "label"]].to_csv(
            data / f"{name}.csv", index=False
        )
    reviews.iloc[120:180][["text", "label"]].to_csv(data / "test.csv", index=False)
    (data / "manifest.json").write_text(json.dumps({"institutions": names}))
    return data


@pytest.fixture()
def tiny_flat(tiny_model_dir, federation_dir, tmp_path) -> dict:
    """A complete flat config for a fast 3-institution federation."""
    from common.config import app_defaults

    return {
        **app_defaults(),
        "run.name": "test-run",
        "run.output-dir": str(tmp_path / "outputs"),
        "model.name": str(tiny_model_dir),
        "model.max-length": 48,
        "lora.dropout": 0.0,
        "train.batch-size": 8,
        "train.learning-rate": 0.01,
        "train.head-learning-rate": 0.05,
        "federation.rounds": 2,
        "federation.min-train-nodes": 3,
        "federation.min-available-nodes": 3,
        "data.dir": str(federation_dir),
        "data.test-path": str(federation_dir / "test.csv"),
        "data.text-column": "text",
        "data.label-column": "label",
    }


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
