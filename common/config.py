"""One typed view of the run configuration.

Defaults live in ``common/defaults.toml`` (package data; pyproject.toml's
``[tool.flwr.app.config]`` holds the same for ``flwr run``); scenario TOMLs under
``simulations/`` override them. Flower hands both to the apps as a flat mapping with dotted
keys (``lora.rank``); :meth:`RunConfig.from_flat` turns that into frozen dataclasses and
rejects unknown or missing keys, so a typo in a scenario fails loudly instead of silently
falling back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from privatune.common.errors import PrivatuneError
from privatune.common.registry import DP_BACKENDS, STRATEGIES

Scalar = bool | int | float | str
# The enumerated keys: every allowed value is here, checked in one place (_coerce).
Task = Literal["classify", "causal-lm"]  # a classification head, or answers in words
Pooling = Literal["cls", "mean"]  # BERT's [CLS] pooler, or the masked mean at unit length
Trainable = Literal["adapter", "head"]  # LoRA factors and head, or the head alone
Optimizer = Literal["adamw", "sgd"]
TransportDtype = Literal["float32", "float16"]
AggregationMode = Literal["fedavg", "ffa", "exact"]
Strategy = Annotated[str, STRATEGIES]  # registered Flower strategies (common.registry)
Accountant = Literal["rdp", "prv"]  # Opacus accountants with an independent check in the audit
GradSampleMode = Annotated[str, DP_BACKENDS]  # registered DP backends (common.registry)
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)
# Bounds on the run config's values that size tensors at a node: a value the server picks
# must never make a node's memory, or an error, depend on its rows (docs/threat-model.md).
MAX_LENGTH = 4096  # model.max-length, tokens
MAX_BATCH = 65536  # train.batch-size
MAX_RANK = 256  # lora.rank
MAX_EVAL_FRACTION = 0.5  # data.eval-fraction (node config eval-fraction in deployment)


class ConfigError(PrivatuneError):
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
    task: Task
    max_length: int
    bf16: bool
    pooling: Pooling
    chat_template: bool  # causal-lm: wrap each instruction in the tokenizer's chat template
    instruction: str  # causal-lm: each row's instruction, "{text}" standing for its text
    subspace: str  # mean pooling: public texts whose principal directions the embedding keeps
    subspace_dim: int
    feature_norm: float  # mean pooling: the length of the embedding the head sees
    label_init: float  # > 0: the head starts from its labels' names' embeddings, rows this long
    label_texts: str  # each label in words, ";"-separated ("" = the names): label-init, answers

    @property
    def label_texts_list(self) -> list[str]:
        return [t.strip() for t in self.label_texts.split(";")] if self.label_texts.strip() else []

    def __post_init__(self) -> None:
        _within("model.max-length", self.max_length, 1, MAX_LENGTH)
        if self.instruction.count("{text}") != 1:
            raise ConfigError(
                f"model.instruction must hold {{text}} exactly once, got {self.instruction!r}"
            )
        _positive("model.feature-norm", self.feature_norm)
        _zero_or_positive("model.label-init", self.label_init, "a random start")
        if self.label_init and self.task == "causal-lm":
            raise ConfigError(
                "model.label-init starts a classification head; a causal LM has none "
                '(model.task "causal-lm")'
            )
        if self.label_texts.strip() and not self.label_init and self.task != "causal-lm":
            raise ConfigError(
                "model.label-texts describes the labels for model.label-init, which is 0 "
                '(or a causal LM\'s answers, with model.task "causal-lm")'
            )
        if self.subspace_dim < 1:
            raise ConfigError(f"model.subspace-dim must be at least 1, got {self.subspace_dim}")
        if self.pooling != "mean" and (self.subspace or self.feature_norm != 1.0):
            raise ConfigError(
                "model.subspace and model.feature-norm shape the mean-pooled embedding: "
                'they need model.pooling = "mean"'
            )


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: int
    dropout: float
    target_modules: str
    client_ranks: str  # simulation: ranks by partition id, cycled ("8,4,2"); "" = all lora.rank
    layers: (
        int  # adapt the top this many transformer layers only (0 = all); common.model.top_layers
    )

    def __post_init__(self) -> None:
        _within("lora.rank", self.rank, 1, MAX_RANK)
        _within("lora.layers", self.layers, 0, 1000)

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
    optimizer: Optimizer
    trainable: Trainable
    # Two stages (linear probe, then fine-tune; Kumar et al. 2022): the first this many rounds
    # train the head alone on the frozen encoder's cached embeddings, the rest the adapter
    # and the head. 0 = one stage. RunConfig.in_round gives a round's settings.
    probe_rounds: int

    def __post_init__(self) -> None:
        _within("train.batch-size", self.batch_size, 1, MAX_BATCH)
        _within("train.local-epochs", self.local_epochs, 1, 1000)
        _within("train.probe-rounds", self.probe_rounds, 0, 100_000)


@dataclass(frozen=True)
class FederationSettings:
    rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_available_nodes: int
    max_update_norm: float  # L2 bound on one update (reply minus global); 0 = no bound
    round_timeout: float  # seconds to wait for replies; late or silent clients are left out
    transport_dtype: TransportDtype  # the adapter's tensors on the wire


@dataclass(frozen=True)
class AggregationSettings:
    """How replies become the next global adapter (see server.strategy and
    server.lora_aggregation) and whether the server may see them one by one (SecAgg+)."""

    mode: AggregationMode  # fedavg: A, B, head averaged; ffa: A frozen; exact: mean of B·A
    strategy: Strategy
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
    """What the run asks of DP-SGD. Each institution checks these against its own policy
    (:class:`PrivacyPolicy`, node config in deployment) before it trains."""

    enabled: bool
    target_epsilon: float
    delta: float
    noise_multiplier: float  # 0 means: derive it from target_epsilon over the planned run
    max_grad_norm: float
    accountant: Accountant
    grad_sample_mode: GradSampleMode  # Opacus' GradSampleModule, or client.fused_clipping

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ConfigError(f"config key 'dp.delta' must lie in (0, 1), got {self.delta!r}")
        _positive("dp.target-epsilon", self.target_epsilon)
        _positive("dp.max-grad-norm", self.max_grad_norm)
        _zero_or_positive("dp.noise-multiplier", self.noise_multiplier, "planned")


@dataclass(frozen=True)
class PrivacyPolicy:
    """An institution's own privacy policy. In deployment it comes from the node config
    (keys without the ``privacy.`` prefix) and these run-config keys are ignored; in a
    simulation they stand in for every simulated institution's node config."""

    max_epsilon: float  # lifetime budget over the institution's whole ledger
    max_delta: float  # the largest dp.delta the institution accepts (also below 1/n)
    accountants: str  # accountants the institution accepts for dp.accountant
    local_eval_noise: float  # noise multiplier of local evaluation's confusion matrix; 0 = off
    count_noise: float  # std (rows) of the DP count of the training rows
    allow_non_private: bool  # whether dp.enabled = false may train on this data at all
    insecure_seed: int  # testing only, -1 = off: noise and sampling from this fixed seed

    def __post_init__(self) -> None:
        check_policy(
            "privacy.",
            self.max_epsilon,
            self.max_delta,
            self.accountant_list,
            self.local_eval_noise,
            self.count_noise,
        )

    @property
    def accountant_list(self) -> list[str]:
        return [a.strip() for a in self.accountants.split(",") if a.strip()]


def check_policy(
    prefix: str,
    max_epsilon: float,
    max_delta: float,
    accountants: list[str],
    eval_noise: float,
    count_noise: float,
) -> None:
    """An institution's policy values, from a node config or the ``privacy`` section."""
    if not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ConfigError(
            f"{prefix}max-epsilon must be a finite number above 0, got {max_epsilon!r}"
        )
    if not 0 < max_delta < 1:
        raise ConfigError(f"{prefix}max-delta must lie in (0, 1), got {max_delta!r}")
    if not accountants:
        raise ConfigError(f"{prefix}accountants must name at least one of {ACCOUNTANTS}")
    for name in accountants:
        _one_of(f"{prefix}accountants", name, ACCOUNTANTS)
    if not (math.isfinite(eval_noise) and eval_noise >= 0):
        raise ConfigError(f"{prefix}local-eval-noise must be 0 (off) or positive")
    if not (math.isfinite(count_noise) and count_noise > 0):
        raise ConfigError(
            f"{prefix}count-noise must be above 0 (the training-row count is released "
            "under DP only)"
        )


@dataclass(frozen=True)
class DataSettings:
    dir: str
    text_column: str
    label_column: str
    labels: str
    eval_fraction: float
    test_path: str
    encoding: str  # of CSV, TSV and JSON Lines files, e.g. "latin-1" (Parquet stores its own)

    def __post_init__(self) -> None:
        check_eval_fraction("data.eval-fraction", self.eval_fraction)

    @property
    def label_names(self) -> list[str]:
        return [x.strip() for x in self.labels.split(",") if x.strip()]


@dataclass(frozen=True)
class TrackingSettings:
    """Optional experiment tracking (server.tracking); empty = off."""

    mlflow_uri: str  # an MLflow tracking URI, e.g. sqlite:///mlruns.db


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
    privacy: PrivacyPolicy
    data: DataSettings
    tracking: TrackingSettings

    def __post_init__(self) -> None:
        """Checks across sections (each section checks its own values)."""
        if self.model.task == "causal-lm":
            for key, value, refused in (
                ("train.trainable", self.train.trainable, "head"),
                ("model.pooling", self.model.pooling, "mean"),
            ):
                if value == refused:
                    raise ConfigError(
                        f"{key} {value!r} is not available with model.task 'causal-lm' "
                        "(a causal LM trains its LoRA factors only, through its own LM head)"
                    )
        texts, names = self.model.label_texts_list, self.data.label_names
        if texts and (len(texts) != len(names) or not all(texts)):
            raise ConfigError(
                f"model.label-texts holds {sum(map(bool, texts))} texts for the {len(names)} "
                "labels of data.labels (one text per label, in its order, separated by ';')"
            )
        if self.train.probe_rounds:
            _check_stages(self)
        strategy = STRATEGIES[self.aggregation.strategy]
        if self.aggregation.mode == "exact" and not strategy.exact:
            raise ConfigError(
                "aggregation.mode 'exact' replaces the weighted mean; use it with strategy "
                f"{' or '.join(n for n in STRATEGIES if STRATEGIES[n].exact)}, "
                f"not {self.aggregation.strategy!r}"
            )
        if self.central_dp.enabled:
            if not strategy.is_sum or self.aggregation.mode == "exact":
                sums = " or ".join(f'"{n}"' for n in STRATEGIES if STRATEGIES[n].is_sum)
                raise ConfigError(
                    f"central-dp: needs aggregation.strategy = {sums} and a mode other than "
                    '"exact" (its noise is calibrated to an equally weighted mean)'
                )
            if self.lora.client_ranks.strip():
                raise ConfigError("central-dp: lora.client-ranks (mixed ranks) is not supported")
            _positive("central-dp.noise-multiplier", self.central_dp.noise_multiplier)
            _positive("central-dp.clipping-norm", self.central_dp.clipping_norm)

    def in_round(self, server_round: int) -> RunConfig:
        """The settings round ``server_round`` trains with: within ``train.probe-rounds``
        the linear probe's (``train.trainable = "head"``: the head alone, on the cached
        embeddings), else this config. Both stages run the same batches per round (batch
        size, local epochs), so one noise multiplier planned for the whole run serves both."""
        if server_round > self.train.probe_rounds:
            return self
        probe = dataclasses.replace(self.train, trainable="head", probe_rounds=0)
        return dataclasses.replace(self, train=probe)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Scalar]) -> RunConfig:
        """Build the config from Flower's flat ``section.key`` mapping."""
        known: set[str] = set()
        sections: dict[str, Any] = {}
        for section in fields(cls):
            section_type = get_type_hints(cls)[section.name]
            values = {}
            for name, typ in get_type_hints(section_type, include_extras=True).items():
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


def check_eval_fraction(key: str, value: float) -> None:
    """The local evaluation split's share, from the run config (simulation) or the node
    config (deployment): at most half, so that training keeps most rows."""
    if not 0 <= value <= MAX_EVAL_FRACTION:
        raise ConfigError(f"{key} must lie in [0, {MAX_EVAL_FRACTION}], got {value!r}")


def _check_stages(cfg: RunConfig) -> None:
    """``train.probe-rounds``: a probe stage before a fine-tuning stage of an encoder's
    adapter, with at least one round of each."""
    n = cfg.train.probe_rounds
    if cfg.train.trainable != "adapter" or cfg.model.task != "classify":
        raise ConfigError(
            'train.probe-rounds needs train.trainable = "adapter" and model.task = "classify" '
            "(the probe stage trains the head that the adapter stage fine-tunes with it)"
        )
    if n >= cfg.federation.rounds:
        raise ConfigError(
            f"train.probe-rounds {n} must be below federation.rounds {cfg.federation.rounds} "
            "(at least one round fine-tunes the adapter)"
        )


def _within(key: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"config key '{key}' must lie in [{low}, {high}], got {value!r}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"config key '{key}' must be a finite number above 0, got {value!r}")


def _zero_or_positive(key: str, value: float, zero: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"config key '{key}' must be 0 ({zero}) or positive, got {value!r}")


def _key(section: str, name: str) -> str:
    return f"{section}.{name}".replace("_", "-")


def _coerce(key: str, value: Scalar, typ: Any) -> Scalar:
    if get_origin(typ) is Literal:
        _one_of(key, value, get_args(typ))
        return value
    if get_origin(typ) is Annotated:  # a registry's names, read when the config is checked
        _one_of(key, value, typ.__metadata__[0].names())
        return value
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
    """The defaults shipped with the package (``common/defaults.toml``, equal to
    pyproject.toml's ``[tool.flwr.app.config]``), flattened."""
    text = resources.files("privatune.common").joinpath("defaults.toml").read_text(encoding="utf-8")
    return flatten(tomllib.loads(text))


def resolve(overrides: Mapping[str, Scalar] | None = None) -> RunConfig:
    """The package's defaults with ``overrides`` on top."""
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
        elif isinstance(value, str):  # JSON's escapes are TOML's (DEL aside)
            text = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
        else:
            text = repr(value)
        lines.append(f'"{key}" = {text}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
