"""Extension points (docs/architecture.md, "Adding a strategy, a DP backend or a data set"):
a toy of each axis, written in this module and registered, is accepted by the config check,
built where it runs, and held to its declared capabilities; unknown names stay one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.serverapp.strategy import FedAvg
from privatune.client.dp_backends import Fused, backend_for
from privatune.common.config import ConfigError, resolve
from privatune.common.registry import (
    DP_BACKENDS,
    STRATEGIES,
    DPBackendSpec,
    StrategySpec,
)
from privatune.server.secure_aggregation import check_secure
from privatune.server.strategy import make_strategy
from privatune.simulations.prepare import prepare
from privatune.simulations.scenario import (
    DATASETS,
    PARTITIONS,
    DatasetSpec,
    PartitionSpec,
    load_scenario,
)


class HalfStep(FedAvg):
    """A toy strategy: FedAvg with a keyword of its own, fed from the config."""

    def __init__(self, *args, step: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step = step


class LoudFused(Fused):
    """A toy DP backend: the fused one under another name."""


def toy_rows(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "text": [f"row {i}" for i in range(60)],
            "label": rng.choice(["yes", "no"], 60),
            "group": [f"g{i % 3}" for i in range(60)],
        }
    )
    return frame.iloc[:48], frame.iloc[48:]


def by_group(train: pd.DataFrame, scenario, seed: int) -> list[pd.DataFrame]:
    return [part for _, part in sorted(train.groupby("group"))]


@pytest.fixture()
def toys():
    STRATEGIES.register("half-step", StrategySpec(f"{__name__}:HalfStep", {"step": "proximal_mu"}))
    DP_BACKENDS.register("loud", DPBackendSpec(f"{__name__}:LoudFused"))
    DATASETS.register("toy", DatasetSpec(f"{__name__}:toy_rows", "made up in a test"))
    PARTITIONS.register("by-group", PartitionSpec(f"{__name__}:by_group", "toy", "groups"))
    yield
    for registry, name in (
        (STRATEGIES, "half-step"),
        (DP_BACKENDS, "loud"),
        (DATASETS, "toy"),
        (PARTITIONS, "by-group"),
    ):
        registry.unregister(name)


def test_a_registered_strategy_is_configured_built_and_checked(toys):
    cfg = resolve({"aggregation.strategy": "half-step", "aggregation.proximal-mu": 0.25})
    strategy = make_strategy(cfg.federation, cfg.aggregation, {"w": np.zeros(2)})
    assert isinstance(strategy, HalfStep) and strategy.step == 0.25
    assert not strategy.pads_ranks  # not declared a weighted mean
    with pytest.raises(ConfigError, match="not 'half-step'"):  # not declared exact
        resolve({"aggregation.strategy": "half-step", "aggregation.mode": "exact"})
    with pytest.raises(ConfigError, match="central-dp: needs"):  # not declared a sum
        resolve({"aggregation.strategy": "half-step", "central-dp.enabled": True})
    with pytest.raises(ConfigError, match="not a weighted sum"):
        check_secure(resolve({"aggregation.strategy": "half-step", "aggregation.secure": True}))


def test_a_registered_dp_backend_is_the_one_a_client_trains_with(toys):
    cfg = resolve({"dp.grad-sample-mode": "loud"})
    backend = backend_for(cfg, 1.0, torch.Generator().manual_seed(0))
    assert type(backend) is LoudFused


def test_a_registered_data_set_and_partition_prepare_a_federation(toys, tmp_path):
    (tmp_path / "toy.toml").write_text(
        '[scenario]\ndataset = "toy"\ninstitutions = 3\npartition = "by-group"\n'
        '[config]\ndata.labels = "yes,no"\n'
    )
    scenario = load_scenario(str(tmp_path / "toy.toml"))
    out = prepare(scenario, seed=1, out_dir=tmp_path / "data")
    files = sorted(p.name for p in out.glob("institution-*.csv"))
    assert files == ["institution-00.csv", "institution-01.csv", "institution-02.csv"]
    manifest = (out / "manifest.json").read_text()
    assert '"source": "made up in a test"' in manifest and '"groups"' in manifest
    (tmp_path / "wrong.toml").write_text(
        '[scenario]\ndataset = "drugreview"\ninstitutions = 3\npartition = "by-group"\n'
    )
    with pytest.raises(ConfigError, match="partition 'by-group' needs dataset 'toy'"):
        load_scenario(str(tmp_path / "wrong.toml"))


def test_unknown_names_are_one_line_naming_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"'aggregation.strategy' must be one of fedavg, .*'x'"):
        resolve({"aggregation.strategy": "x"})
    with pytest.raises(ValueError, match="registered already"):
        STRATEGIES.register("fedavg", STRATEGIES["fedavg"])
