"""One typed view of the run configuration.

Defaults live in ``[tool.flwr.app.config]`` of pyproject.toml; scenario TOMLs under
``simulations/`` override them. Flower hands both to the apps as a flat mapping with dotted
keys (``lora.rank``); :meth:`RunConfig.from_flat` turns that into frozen dataclasses and
rejects unknown or missing keys, so a typo in a scenario fails loudly instead of silently
falling back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

PROJECT_ROOT = Path(__file__).resolve().parent.parent
Scalar = bool | int | float | str
TRANSPORT_DTYPES = ("float32", "float16")


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type."""


@dataclass(frozen=True)
class RunSettings:
    name: str
    output_dir: str
    seed: int
    resume: bool  # continue run.name from its last complete checkpoint


@dataclass(frozen=True)
class ModelSettings:
    name: str
    max_length: int
    bf16: bool
    pooling: str  # "cls" (BERT's [CLS] pooler) or "mean" (masked mean, unit length)


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: int
    dropout: float
    target_modules: str
    client_ranks: str  # simulation: ranks by partition id, cycled ("8,4,2"); "" = all lora.rank

    @property
    def ranks(self) -> list[int]:
        return [int(r) for r in self.client_ranks.split(",") if r.strip()]

    @property
    def modules(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int
    batch_size: int
    learning_rate: float
    head_learning_rate: float
    optimizer: str
    trainable: str  # "adapter" (LoRA factors and head) or "head" (the head alone)


@dataclass(frozen=True)
class FederationSettings:
    rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_available_nodes: int
    max_update_norm: float  # L2 bound on one update (reply minus global); 0 = no bound
    round_timeout: float  # seconds to wait for replies; late or silent clients are left out
    transport_dtype: str  # "float32" or "float16": the adapter's tensors on the wire

    def __post_init__(self) -> None:
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise ConfigError(
                f"federation.transport-dtype must be one of {', '.join(TRANSPORT_DTYPES)}, "
                f"got {self.transport_dtype!r}"
            )


@dataclass(frozen=True)
class AggregationSettings:
    """How replies become the next global adapter (see server.strategy and
    server.lora_aggregation) and whether the server may see them one by one (SecAgg+)."""

    mode: str  # "fedavg" (A, B, head averaged), "ffa" (A frozen), "exact" (mean of B·A + SVD)
    strategy: str  # one of server.strategy.AGGREGATORS (Flower's strategies)
    server_learning_rate: float  # fedadam (eta) and fedavgm
    server_momentum: float  # fedavgm
    proximal_mu: float  # fedprox: pull towards the global adapter on the client
    secure: bool  # Flower's SecAgg+: the server only ever sees the sum of the updates
    secure_shares: int  # SecAgg+ num_shares (each client's key is split this many ways)
    secure_threshold: int  # SecAgg+ reconstruction_threshold (shares to rebuild a key)
    secure_clipping_range: float  # values are clipped to +-this before quantisation
    secure_quantization_range: int  # quantisation levels over the clipping range
    secure_max_weight: float  # largest num-examples a reply may weigh

    @property
    def freeze_a(self) -> bool:
        return self.mode == "ffa"


@dataclass(frozen=True)
class CentralDPSettings:
    """Institution-level DP added by the server (Flower's server-side fixed clipping)."""

    enabled: bool
    noise_multiplier: float
    clipping_norm: float


@dataclass(frozen=True)
class DPSettings:
    enabled: bool
    target_epsilon: float
    delta: float
    noise_multiplier: float  # 0 means: derive it from target_epsilon over the planned run
    max_grad_norm: float
    accountant: str
    grad_sample_mode: str  # "hooks" (Opacus' GradSampleModule) or "fused" (client.fused_clipping)


@dataclass(frozen=True)
class PrivacyBudget:
    """An institution's own budget; in deployment its node config overrides these keys."""

    max_epsilon: float
    budget_scope: str  # "lifetime" (all runs in the ledger) or "run"


@dataclass(frozen=True)
class DataSettings:
    dir: str
    text_column: str
    label_column: str
    labels: str
    eval_fraction: float
    test_path: str

    @property
    def label_names(self) -> list[str]:
        return [x.strip() for x in self.labels.split(",") if x.strip()]


@dataclass(frozen=True)
class RunConfig:
    run: RunSettings
    model: ModelSettings
    lora: LoraSettings
    train: TrainSettings
    federation: FederationSettings
    aggregation: AggregationSettings
    dp: DPSettings
    central_dp: CentralDPSettings
    privacy: PrivacyBudget
    data: DataSettings

    @classmethod
    def from_flat(cls, flat: Mapping[str, Scalar]) -> RunConfig:
        """Build the config from Flower's flat ``section.key`` mapping."""
        known: set[str] = set()
        sections: dict[str, Any] = {}
        for section in fields(cls):
            section_type = get_type_hints(cls)[section.name]
            values = {}
            for name, typ in get_type_hints(section_type).items():
                key = _key(section.name, name)
                known.add(key)
                if key not in flat:
                    raise ConfigError(f"config key '{key}' is missing")
                values[name] = _coerce(key, flat[key], typ)
            sections[section.name] = section_type(**values)
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**sections)

    def to_flat(self) -> dict[str, Scalar]:
        """The inverse of :meth:`from_flat`; used to write the resolved config."""
        out: dict[str, Scalar] = {}
        for section in fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                out[_key(section.name, key)] = value
        return out


def _key(section: str, name: str) -> str:
    return f"{section}.{name}".replace("_", "-")


def _coerce(key: str, value: Scalar, typ: type) -> Scalar:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {typ.__name__}, got {value!r}")
    return value


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Flatten nested TOML tables into Flower's dotted keys."""
    out: dict[str, Scalar] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def app_defaults() -> dict[str, Scalar]:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml, flattened."""
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    return flatten(table)


def resolve(overrides: Mapping[str, Scalar] | None = None) -> RunConfig:
    """Defaults from pyproject.toml with ``overrides`` on top."""
    return RunConfig.from_flat({**app_defaults(), **(overrides or {})})


def stored_flat(run_dir: Path) -> dict[str, Scalar]:
    """The flat configuration a run folder was started with (its ``config.toml``); keys
    added to privatune since then take their defaults."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.toml, not a run folder")
    with open(path, "rb") as f:
        return {**app_defaults(), **tomllib.load(f)["config"]}


def write_toml(config: RunConfig, path: Path) -> None:
    """Write the resolved configuration as a flat, re-loadable TOML table."""
    lines = ["# Resolved privatune configuration of this run", "[config]"]
    for key, value in config.to_flat().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f'"{key}" = {text}')
    path.write_text("\n".join(lines) + "\n")
