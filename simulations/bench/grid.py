"""The federations the grid benchmarks (privacy-utility, aggregation) run: a scenario's data
split one way or another into institution files, one flat config per setting, one
federation's final scores, and the two no-model baselines."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from privatune.common.config import Scalar
from privatune.common.data import load_labeled
from privatune.common.model.evaluation import macro_f1
from privatune.common.protocol import read_lines
from privatune.simulations.bench.shared import LABELS, bench_flat, review_sample, write_federation
from privatune.simulations.prepare import load_dataset, partition
from privatune.simulations.scenario import Scenario, load_scenario
from privatune.simulations.simulate import run_flat

SEED = 42  # run.seed's default: the same split as `make run` prepares
CENTRAL_EPSILON = 8.0
QUICK_ROWS = 120  # training reviews of a --quick grid


def make_data(quick: bool, part: str, work: Path, name: str = "medical") -> tuple[Path, Scenario]:
    """Scenario ``name``'s institutions, split ``part``-wise by
    ``simulations.prepare.partition``: ``iid``, ``dirichlet-<alpha>`` or ``scenario`` (the
    scenario's own non-IID split: label skew, or by company for the complaints)."""
    base = load_scenario(name)
    kind, _, alpha = part.partition("-")
    if kind != "scenario":
        base = dataclasses.replace(
            base, partition=kind, dirichlet_alpha=float(alpha or base.dirichlet_alpha)
        )
    scenario = dataclasses.replace(base, institutions=3 if quick else base.institutions)
    if quick:
        train, test = review_sample(QUICK_ROWS, seed=SEED)
        test = test.head(60)
    else:
        train, test = load_dataset(base.dataset, SEED)
    parts = partition(train, scenario, seed=SEED)
    return write_federation(work / f"data-{part}", parts, test, prefix=base.prefix), scenario


def setting_flat(
    data: Path,
    run_dir: Path,
    scenario: Scenario,
    eps: float | None,
    rounds: int | None,
    quick: bool,
    model: Mapping[str, Scalar],
) -> dict[str, Scalar]:
    """The scenario's config keys with DP off (``eps`` None) or planned for ``eps``;
    ``rounds`` (when given) replaces the scenario's number of rounds. The grid's own split
    in ``data`` replaces the scenario's prepared files (``data.dir``, ``data.test-path``)."""
    keys: dict[str, Scalar] = {
        **{k: v for k, v in scenario.config.items() if k not in ("data.dir", "data.test-path")},
        **model,
        "dp.enabled": eps is not None,
        "dp.target-epsilon": eps or CENTRAL_EPSILON,
        # without DP a client's epsilon is infinite: only an infinite budget lets it train
        "privacy.max-epsilon": max(CENTRAL_EPSILON, eps or 0.0),
        "privacy.allow-non-private": eps is None,
    }
    if rounds:
        keys["federation.rounds"] = rounds
    if quick:
        keys["federation.min-train-nodes"] = scenario.institutions
        keys["federation.min-available-nodes"] = scenario.institutions
    return bench_flat(data, run_dir, keys)


def baselines(data_dir: Path, labels: str = LABELS) -> dict[str, dict[str, float]]:
    """Two scores on the test set that need no model.

    ``majority_class``: always predicting the most frequent class; a run at this line has
    learned the class prior only. ``frequency_guess``: the expected scores of guessing each
    label at its frequency p_k, blind to the text: accuracy sum(p_k^2) and, since each
    class's expected F1 is then p_k, macro-F1 1 / (number of classes present). A run can
    leave the majority class and still sit there; above it, it has learned from the text."""
    test = load_labeled(data_dir / "test.csv", "text", "label", labels.split(","))
    counts = np.bincount(test.labels)
    guess = np.full_like(test.labels, counts.argmax())
    freq = counts[counts > 0] / len(test.labels)
    return {
        "majority_class": {
            "accuracy": float(np.mean(guess == test.labels)),
            "macro_f1": macro_f1(test.labels, guess, len(labels.split(","))),
        },
        "frequency_guess": {"accuracy": float(np.sum(freq**2)), "macro_f1": 1 / len(freq)},
    }


def federated(flat: Mapping[str, Scalar], sites: int) -> dict:
    """One federation from scratch: the last round's central scores, epsilon and the mean
    bytes per training round (all clients, as measured on the messages)."""
    shutil.rmtree(Path(str(flat["run.output-dir"])) / str(flat["run.name"]), ignore_errors=True)
    metrics = read_lines(run_flat(flat, sites))
    last, trained = metrics[-1], metrics[1:]
    return {
        "accuracy": last["central_accuracy"],
        "macro_f1": last["central_macro_f1"],
        "epsilon": last["epsilon_max"] if flat["dp.enabled"] else None,
        "rounds": last["round"],
        "bytes_sent_per_round": float(np.mean([m["bytes_sent"] for m in trained])),
        "bytes_received_per_round": float(np.mean([m["bytes_received"] for m in trained])),
        "truncation_energy_lost": [m.get("truncation_energy_lost") for m in trained],
    }
