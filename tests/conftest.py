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
from privatune.common.model.gguf import GGUF_MODELS, gguf_file
from privatune.simulations.bench.causal_lm import tiny_llama
from privatune.simulations.bench.shared import tiny_model
from transformers import AutoTokenizer

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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (random weights) with SmolLM2's tokenizer, read from the GGUF file."""
    source = gguf_file(GGUF_MODELS["SmolLM2-135M-Instruct"])
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture()
def federation_dir(tmp_path, reviews) -> Path:
    return make_federation_dir(tmp_path, reviews)


@pytest.fixture()
def tiny_flat(tiny_model_dir, federation_dir, tmp_path) -> dict:
    return make_tiny_flat(tiny_model_dir, federation_dir, tmp_path)


@pytest.fixture()
def tiny_cfg(tiny_flat):
    return resolve(tiny_flat)


# What runs a federation (Flower's simulation engine, or `privatune tune`'s own rounds).
FEDERATION = re.compile(r"\bsimulate\(|run_flat|run_simulation|\[\"tune\"|\btune\(")
TIERS = ("simulation", "deployment", "benchmark", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers are explicit markers: ``deployment`` (real SuperLink/SuperNodes), ``benchmark``
    (the benchmark scripts), ``simulation`` (a federation runs) and ``slow`` (the real
    pretrained model) are left out of ``make test-fast``. A test whose code, or a fixture's,
    runs a federation without its marker fails collection: the fast tier stays fast."""
    unmarked = [
        item.nodeid
        for item in items
        if not any(item.get_closest_marker(t) for t in TIERS)
        and any(
            FEDERATION.search(inspect.getsource(f))
            for f in [item.function, *_fixture_functions(item)]
        )
    ]
    if unmarked:
        raise pytest.UsageError(
            "mark these @pytest.mark.simulation (they run a federation): " + ", ".join(unmarked)
        )


def _fixture_functions(item: pytest.Item) -> list:
    """The functions of the fixtures a test uses (a federation may run in one of them)."""
    defs = getattr(item, "_fixtureinfo", None)
    if defs is None:
        return []
    return [d.func for name in defs.names_closure for d in defs.name2fixturedefs.get(name, ())]
