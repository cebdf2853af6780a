from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from typing import Annotated, Literal, get_args, get_origin, get_type_hints

import pytest
from helpers import PROJECT_ROOT
from privatune.common.config import (
    ConfigError,
    RunConfig,
    app_defaults,
    flatten,
    resolve,
    write_toml,
)
from privatune.simulations.scenario import SCENARIO_DIR, load_scenario
from privatune.simulations.simulate import resolve_flat


def test_defaults_resolve_and_round_trip(tmp_path):
    cfg = resolve()
    assert cfg.lora.modules == ["query", "value"] and cfg.dp.enabled
    write_toml(cfg, tmp_path / "c.toml")
    with open(tmp_path / "c.toml", "rb") as f:
        assert resolve(tomllib.load(f)["config"]) == cfg


def test_strings_with_newlines_quotes_and_control_characters_round_trip(tmp_path):
    """A run's config.toml must load again (summary, evaluate, resume read it): an
    instruction spans lines and may hold quotes, backslashes, tabs, DEL and any script."""
    odd = 'Which product?\nSay "one" \\ of:\tA\x7f\x01 é 字 🙂\n\nComplaint: {text}'
    cfg = resolve({"model.instruction": odd, "run.name": 'a "quoted" run'})
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
    for share in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"data\.eval-fraction must lie in \[0, 0.5\]"):
            resolve({"data.eval-fraction": share})
    assert resolve({"data.eval-fraction": 0.0}).data.eval_fraction == 0.0


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("hospitals-small", "hospitals-small"),
        ("banks-small", "banks-small"),
        ("hospitals-small-probe", "hospitals-small"),
        ("banks-small-probe", "banks-small"),
    ],
)
def test_scenarios_resolve(name, data):
    scenario = load_scenario(name)
    flat = resolve_flat(scenario)
    cfg = resolve(flat)
    assert cfg.data.dir.endswith(data) and cfg.data.test_path.startswith(cfg.data.dir)
    assert scenario.institutions >= 5


# the Scenario fields that decide which institution holds which records
SPLIT = ("dataset", "institutions", "prefix", "partition", "dirichlet_alpha")


@pytest.mark.parametrize("name", sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
def test_every_shipped_scenario_resolves(name):
    resolve(resolve_flat(load_scenario(name)))


# what a GPU scenario may change of its CPU scenario's recipe, beside the CPU subset's rows
GPU_KEYS = {
    "model.max-length",
    "model.bf16",
    "lora.target-modules",
    "train.batch-size",
    "federation.rounds",
}


@pytest.mark.parametrize("name", ["medical-llm", "complaints-llm"])
def test_a_gpu_scenario_is_its_cpu_scenario_on_all_of_the_data(name):
    cpu, gpu = load_scenario(name), load_scenario(f"{name}-gpu")
    assert all(getattr(gpu, k) == getattr(cpu, k) for k in SPLIT)
    assert cpu.train_rows and cpu.test_rows and not gpu.train_rows and not gpu.test_rows
    keys = cpu.config.keys() | gpu.config.keys()
    assert {k for k in keys if cpu.config.get(k) != gpu.config.get(k)} <= GPU_KEYS
    cfg = resolve(resolve_flat(gpu))
    assert cfg.model.bf16 and {"gate_proj", "up_proj", "down_proj"} <= set(cfg.lora.modules)
    assert cfg.dp.enabled and cfg.dp.target_epsilon == 8.0


@pytest.mark.parametrize("name", ["hospitals-small", "banks-small"])
def test_a_probe_scenario_is_its_federation_with_a_linear_probe(name):
    base, probe = (load_scenario(n) for n in (name, f"{name}-probe"))
    assert all(getattr(probe, k) == getattr(base, k) for k in SPLIT)  # same data, same split
    assert resolve_flat(probe)["data.dir"] == str(base.data_dir)  # the same prepared files
    cfg = resolve(resolve_flat(probe))
    assert (cfg.model.pooling, cfg.train.trainable, cfg.dp.enabled) == ("mean", "head", True)


def test_the_packaged_defaults_are_the_ones_flwr_run_reads():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert flatten(pyproject["tool"]["flwr"]["app"]["config"]) == app_defaults()


@pytest.mark.slow
def test_a_non_editable_install_runs_from_another_folder(tmp_path):
    """What the Docker image does (``pip install .``): defaults and scenarios are package
    data, so commands work away from the source tree."""
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, str(PROJECT_ROOT)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = (
        "import privatune.common as common, privatune.simulations.scenario as s\n"
        "from privatune.common.config import resolve\n"
        f"assert common.__file__.startswith({str(site)!r}), common.__file__\n"
        "print(resolve().dp.delta, s.load_scenario('medical').institutions)\n"
        "from privatune.cli.main import main\n"
        "main()\n"
    )
    plan = ["plan", "--target-epsilon", "8", "--delta", "1e-5", "--rounds", "2"]
    plan += ["--local-epochs", "1", "--data-size", "100", "--batch-size", "10"]
    out = subprocess.run(
        [sys.executable, "-c", script, *plan],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("1e-05 8") and "round   2: cumulative epsilon 7.99" in out.stdout


def _enumerated() -> dict[str, tuple[str, ...]]:
    """Every config key whose values are an enumeration, read from the dataclasses."""
    out = {}
    for section in dataclasses.fields(RunConfig):
        hints = get_type_hints(get_type_hints(RunConfig)[section.name], include_extras=True)
        for name, typ in hints.items():
            key = f"{section.name}.{name}".replace("_", "-")
            if get_origin(typ) is Literal:
                out[key] = get_args(typ)
            elif get_origin(typ) is Annotated:  # a registry (common.registry)
                out[key] = typ.__metadata__[0].names()
    return out


def test_the_enumerations_are_the_ones_the_code_implements():
    from flwr.serverapp.strategy import FedAvg
    from privatune.client.dp_backends import DPBackend
    from privatune.common.registry import DP_BACKENDS, STRATEGIES, load

    keys = _enumerated()
    assert set(keys) >= {"train.optimizer", "dp.accountant", "aggregation.strategy"}
    assert keys["aggregation.strategy"] == STRATEGIES.names()
    assert keys["dp.grad-sample-mode"] == DP_BACKENDS.names() == ("hooks", "fused")
    assert all(issubclass(load(STRATEGIES[n].implementation), FedAvg) for n in STRATEGIES)
    protocol = {m for m in vars(DPBackend) if not m.startswith("_")}
    assert protocol == {"prepare", "after_backward", "close", "mechanism"}
    assert all(protocol <= set(dir(load(DP_BACKENDS[n].implementation))) for n in DP_BACKENDS)


@pytest.mark.parametrize("key", sorted(_enumerated()))
def test_a_bad_enumerated_value_is_one_line_before_anything_starts(key, tmp_path, monkeypatch):
    import ray
    from privatune.cli.main import app
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)  # nothing may be prepared or written, here or anywhere
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", "hospitals-small", "--set", f'{key}="bogus"']
    )
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"'{key}' must be one of" in lines[0], result.output
    assert not ray.is_initialized() and not any(tmp_path.iterdir())


def _documented() -> dict[str, str]:
    """docs/configuration.md's table: key -> documented default (rows may join keys with
    " / ", later ones without their section)."""
    out = {}
    text = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    for keys, defaults in re.findall(r"^\| (`[a-z].*?) \| (.*?) \|", text, re.M):
        names = [k.strip(" `") for k in keys.split(" / ")]
        values = [v.strip() for v in defaults.split(" / ")]
        section = names[0].split(".")[0]
        for name, value in zip(names, values, strict=True):
            out[name if "." in name else f"{section}.{name}"] = value
    return out


def _same(documented: str, value) -> bool:
    shown = re.sub(r"\s*\(.*\)$", "", documented).strip("`")
    if isinstance(value, bool):
        return shown == str(value).lower()
    if isinstance(value, int | float):
        return float(shown) == float(value)
    return shown == (value or '""')


def test_the_configuration_page_lists_every_key_with_its_default():
    documented, defaults = _documented(), app_defaults()
    assert set(documented) == set(defaults), set(documented) ^ set(defaults)
    wrong = {k: (documented[k], v) for k, v in defaults.items() if not _same(documented[k], v)}
    assert not wrong


def test_a_variant_lists_only_what_it_changes(tmp_path):
    """``extends``: the variant's keys replace its base's one by one; one that keeps the split
    shares the base's prepared files, one that changes it gets its own; a circle or an
    unknown top-level key is one line naming the file."""
    base = load_scenario("hospitals-small")
    (tmp_path / "fast.toml").write_text(
        f'extends = "{SCENARIO_DIR / "hospitals-small.toml"}"\n[config]\nfederation.rounds = 2\n'
    )
    fast = load_scenario(str(tmp_path / "fast.toml"))
    assert fast.config == {**base.config, "federation.rounds": 2}
    assert fast.data_dir == base.data_dir and fast.institutions == base.institutions
    (tmp_path / "fewer.toml").write_text(
        f'extends = "{tmp_path / "fast.toml"}"\n[scenario]\ninstitutions = 3\n'
    )
    fewer = load_scenario(str(tmp_path / "fewer.toml"))
    assert fewer.institutions == 3 and fewer.config["federation.rounds"] == 2
    assert fewer.data_dir.name == "fewer" and fewer.dataset == base.dataset
    (tmp_path / "a.toml").write_text(f'extends = "{tmp_path / "b.toml"}"\n')
    (tmp_path / "b.toml").write_text(f'extends = "{tmp_path / "a.toml"}"\n')
    with pytest.raises(ConfigError, match=r"b\.toml: extends '.*a\.toml' round a circle"):
        load_scenario(str(tmp_path / "a.toml"))
    (tmp_path / "typo.toml").write_text('extend = "medical"\n')
    with pytest.raises(ConfigError, match=r"typo\.toml: unknown table or key\(s\) \['extend'\]"):
        load_scenario(str(tmp_path / "typo.toml"))


@pytest.mark.parametrize("name", sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
def test_a_variant_repeats_no_key_of_its_base(name):
    raw = tomllib.loads((SCENARIO_DIR / f"{name}.toml").read_text())
    if "extends" not in raw:
        return
    base = tomllib.loads((SCENARIO_DIR / f"{raw['extends']}.toml").read_text())
    mine, theirs = flatten(raw.get("config", {})), flatten(base.get("config", {}))
    assert not {k for k, v in mine.items() if theirs.get(k) == v}
    assert not {k for k, v in raw.get("scenario", {}).items() if base["scenario"].get(k) == v}
    assert "data.dir" not in flatten(raw.get("config", {}))
