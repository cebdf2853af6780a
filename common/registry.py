"""Registries: one per axis a user extends (aggregation strategy, DP backend; the data sets
and partitions of simulations.scenario), each entry carrying what its implementation can do.

Adding an implementation is one module plus one ``register`` call: the config checks names
against the registry (one line naming the key and the known values), and the capabilities
decide the cross-checks (SecAgg+, central DP, the exact LoRA mean, mixed ranks) that were
once spelled as lists of names in several files. An entry names its implementation as
``"module:attribute"``, imported where it runs (:func:`load`), so that this floor imports
nothing above it (docs/architecture.md), as Opacus registers accountants and grad-sample
hooks by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from privatune.common.errors import PrivatuneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one axis, in registration order."""

    def __init__(self, key: str) -> None:
        self.key = key  # the config key whose values these are
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (a test's toy one)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise PrivatuneError(f"{self.key} must be one of {self.names()}, got {name!r}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)


def load(implementation: str) -> Any:
    """The object a ``"module:attribute"`` reference names."""
    module, _, attribute = implementation.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise PrivatuneError(f"{implementation}: cannot be imported ({e})") from e


@dataclass(frozen=True)
class StrategySpec:
    """A Flower strategy the server puts behind ``AdapterRounds`` (server.strategy)."""

    implementation: str  # "module:Class", a subclass of Flower's FedAvg
    options: Mapping[str, str] = field(default_factory=dict)  # its keyword: aggregation.<key>
    weighted_mean: bool = False  # reduces by a weighted mean: mixed LoRA ranks pad into it
    exact: bool = False  # aggregation.mode "exact" (the mean of B·A) may replace its mean
    is_sum: bool = False  # a plain weighted sum: SecAgg+ and central DP compute it


@dataclass(frozen=True)
class DPBackendSpec:
    """A way of computing DP-SGD's clipped, noised step (client.dp_backends.DPBackend)."""

    implementation: str  # "module:Class" of a DPBackend


_FLOWER = "flwr.serverapp.strategy"
STRATEGIES: Registry[StrategySpec] = Registry("aggregation.strategy")
STRATEGIES.register(
    "fedavg", StrategySpec(f"{_FLOWER}:FedAvg", weighted_mean=True, exact=True, is_sum=True)
)
STRATEGIES.register("fedmedian", StrategySpec(f"{_FLOWER}:FedMedian"))
STRATEGIES.register("fedtrimmedavg", StrategySpec(f"{_FLOWER}:FedTrimmedAvg"))
STRATEGIES.register("krum", StrategySpec(f"{_FLOWER}:Krum"))
STRATEGIES.register(
    "fedadam",
    StrategySpec(f"{_FLOWER}:FedAdam", {"eta": "server_learning_rate"}, weighted_mean=True),
)
STRATEGIES.register(
    "fedavgm",
    StrategySpec(
        f"{_FLOWER}:FedAvgM",
        {"server_learning_rate": "server_learning_rate", "server_momentum": "server_momentum"},
        weighted_mean=True,
    ),
)
STRATEGIES.register(
    "fedprox",
    StrategySpec(
        f"{_FLOWER}:FedProx", {"proximal_mu": "proximal_mu"}, weighted_mean=True, exact=True
    ),
)

DP_BACKENDS: Registry[DPBackendSpec] = Registry("dp.grad-sample-mode")
DP_BACKENDS.register("hooks", DPBackendSpec("privatune.client.dp_backends:OpacusHooks"))
DP_BACKENDS.register("fused", DPBackendSpec("privatune.client.dp_backends:Fused"))
