from __future__ import annotations

import pytest

from common.config import ConfigError, RunConfig, app_defaults, resolve, write_toml
from simulations.scenario import load_scenario
from simulations.simulate import resolve_flat


def test_defaults_resolve_and_round_trip(tmp_path):
    import tomllib

    cfg = resolve()
    assert cfg.lora.modules == ["query", "value"] and cfg.dp.enabled
    write_toml(cfg, tmp_path / "c.toml")
    with open(tmp_path / "c.toml", "rb") as f:
        assert resolve(tomllib.load(f)["config"]) == cfg


def test_unknown_and_mistyped_keys_fail_loudly():
    with pytest.raises(ConfigError, match=r"unknown config key.*lora\.rnak"):
        resolve({"lora.rnak": 4})
    with pytest.raises(ConfigError, match=r"lora\.rank.*int"):
        resolve({"lora.rank": "eight"})
    flat = app_defaults()
    del flat["dp.delta"]
    with pytest.raises(ConfigError, match=r"dp\.delta.*missing"):
        RunConfig.from_flat(flat)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("hospitals", "hospitals"),
        ("banks", "banks"),
        ("hospitals-probe", "hospitals"),
        ("banks-probe", "banks"),
    ],
)
def test_scenarios_resolve(name, data):
    scenario = load_scenario(name)
    flat = resolve_flat(scenario)
    cfg = resolve(flat)
    assert cfg.data.dir.endswith(data) and cfg.data.test_path.startswith(cfg.data.dir)
    assert scenario.institutions >= 5


@pytest.mark.parametrize("name", ["hospitals", "banks"])
def test_a_probe_scenario_is_its_federation_with_a_linear_probe(name):
    base, probe = (load_scenario(n) for n in (name, f"{name}-probe"))
    split = ("dataset", "institutions", "prefix", "partition", "dirichlet_alpha")
    assert all(getattr(probe, k) == getattr(base, k) for k in split)  # same data, same split
    assert resolve_flat(probe)["data.dir"] == str(base.data_dir)  # the same prepared files
    cfg = resolve(resolve_flat(probe))
    assert (cfg.model.pooling, cfg.train.trainable, cfg.dp.enabled) == ("mean", "head", True)
