"""Privacy-utility: accuracy and macro-F1 on the held-out test set of a scenario (the default
``medical``, MedMCQA specialties; ``complaints``, CFPB products; or a small one) for
centralised training with and without DP and for the federation without DP and with DP-SGD at
several epsilons, on an IID split and on the scenario's own non-IID split, with the scenario's
own recipe (for the large scenarios, a linear probe).

The centralised runs train on the union of exactly the rows the institutions train on (each
institution's file minus its local evaluation split), for as many epochs as the federation
has rounds times local epochs, with DP noise planned for that whole training: the federated
runs see the same data, the same number of passes and the same (epsilon, delta).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.app import model_input, noise_for
from client.institution import Policy
from client.train import train_round
from common.config import RunConfig, Scalar
from common.data import LabeledText, fingerprint, load_labeled, split_local
from common.evaluation import evaluate, macro_f1
from common.model import build_model
from common.privacy import epsilon
from common.protocol import read_lines
from simulations.bench_common import (
    LABELS,
    bench_flat,
    fmt,
    model_overrides,
    review_sample,
    save_figure,
    table_head,
    write_federation,
)
from simulations.prepare import SOURCES, load_dataset, partition
from simulations.scenario import Scenario, load_scenario
from simulations.simulate import run_flat

FULL = {"epsilons": (None, 1.0, 2.0, 4.0, 8.0), "partitions": ("iid", "scenario")}
# One federation only: the quick run proves the code path, the test suite pays for it.
QUICK = {"epsilons": (8.0,), "partitions": ("iid",), "rounds": 1, "rows": 120}
CENTRAL_EPSILON = 8.0
SEED = 42  # run.seed's default: the same split as `make run` prepares
TARGET_SHARE = 0.90  # of the same federation (split, rounds, recipe) without DP, at eps 8
TARGET_OVER_BLIND = 3.0  # times the blind guess's macro-F1 (1 / classes)


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
        train, test = review_sample(QUICK["rows"], seed=SEED)
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


def pooled_train(cfg: RunConfig, data_dir: Path) -> LabeledText:
    """The union of the institutions' training splits, split exactly as each client does."""
    labels = cfg.data.label_names
    texts: list[str] = []
    ys: list[np.ndarray] = []
    for name in json.loads((data_dir / "manifest.json").read_text())["institutions"]:
        full = load_labeled(data_dir / f"{name}.csv", "text", "label", labels)
        train, _ = split_local(full, cfg.data.eval_fraction)
        texts += train.texts
        ys.append(train.labels)
    y = np.concatenate(ys)
    return LabeledText(data_dir, texts, y, fingerprint(texts, y))


def centralised(flat: Mapping[str, Scalar], data_dir: Path) -> dict:
    """One model on the pooled rows: the ceiling (DP off) or DP-SGD planned over all epochs."""
    fed = RunConfig.from_flat(flat)
    epochs = fed.federation.rounds * fed.train.local_epochs
    cfg = RunConfig.from_flat({**flat, "train.local-epochs": epochs, "federation.rounds": 1})
    device = torch.device("cpu")
    pooled = pooled_train(cfg, data_dir)
    policy = Policy.simulated(cfg.privacy)
    sigma = noise_for(cfg, policy, len(pooled)) if cfg.dp.enabled else 0.0
    model = build_model(cfg, device)
    result = train_round(model, model_input(cfg, pooled, "pooled"), cfg, sigma, device)
    test = load_labeled(cfg.data.test_path, "text", "label", cfg.data.label_names)
    scores = evaluate(model, model_input(cfg, test, "test"), len(cfg.data.label_names), device)
    spent = None
    if result.mechanism is not None:
        spent = epsilon([result.mechanism], cfg.dp.delta, cfg.dp.accountant)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro-f1"], "epsilon": spent}


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


def run(
    quick: bool, out_dir: Path, rounds: int | None = None, scenario: str = "medical"
) -> dict[str, Any]:
    """``rounds`` caps the federation's rounds (and so the centralised epochs) below the
    scenario's, for a machine on which the full grid takes too long; ``scenario`` picks the
    scenario whose data and recipe the grid uses."""
    grid = QUICK if quick else FULL
    rounds = QUICK["rounds"] if quick else rounds
    scenario = "hospitals-small" if quick else scenario  # the quick run cuts drug reviews
    model = model_overrides(quick, out_dir)
    runs = out_dir / "work" / "utility" / "runs"
    settings: list[dict[str, Any]] = []
    for i, part in enumerate(grid["partitions"]):
        data, setup = make_data(quick, part, out_dir / "work" / "utility", scenario)
        sites = setup.institutions
        if i == 0:  # the pooled rows are the same training set whatever the split
            for eps in (None, CENTRAL_EPSILON):
                name = "centralised" + (f" DP eps {eps:g}" if eps else "")
                flat = setting_flat(data, runs / "central", setup, eps, rounds, quick, model)
                settings.append({"setting": name, **centralised(flat, data)})
        for eps in grid["epsilons"]:
            name = f"federated {part}" + (f" DP eps {eps:g}" if eps else "")
            flat = setting_flat(
                data, runs / name.replace(" ", "-"), setup, eps, rounds, quick, model
            )
            settings.append({"setting": name, **federated(flat, sites)})
    result = {
        "benchmark": "utility",
        "quick": quick,
        "scenario": f"{scenario} ({SOURCES[setup.dataset].split(', via ')[0]})",
        "grid": grid,
        "rounds": settings[-1]["rounds"],
        "delta": 1e-5,
        "settings": settings,
        **baselines(data, str(flat["data.labels"])),
        "target_share": TARGET_SHARE,
        "target_over_blind": TARGET_OVER_BLIND,
    }
    plot(result, out_dir / "utility.png")
    return result


def _split_and_epsilon(setting: str) -> tuple[str, float | None]:
    """("federated iid", 8.0) from "federated iid DP eps 8"; epsilon None without DP."""
    split, _, eps = setting.partition(" DP eps ")
    return split, float(eps) if eps else None


def plot(result: dict[str, Any], path: Path) -> None:
    """The privacy-utility curve: test macro-F1 against epsilon for each split, with the
    same federation without DP, centralised training and the blind guess as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {
        "centralised": "k",
        **{f"federated {p}": f"C{i}" for i, p in enumerate(result["grid"]["partitions"])},
    }
    for split, colour in colours.items():
        runs = [(*_split_and_epsilon(s["setting"]), s["macro_f1"]) for s in result["settings"]]
        dp = sorted((eps, f1) for name, eps, f1 in runs if name == split and eps)
        if len(dp) > 1:
            ax.plot(*zip(*dp, strict=True), "o-", color=colour, label=f"{split}, DP")
        for name, eps, f1 in runs:
            if name == split and eps is None:
                ax.axhline(f1, color=colour, ls="--", label=f"{split}, no DP")
    if "frequency_guess" in result:
        ax.axhline(result["frequency_guess"]["macro_f1"], color="grey", ls=":", label="blind guess")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon per institution (delta 1e-5)")
    ax.set_ylabel("test macro-F1")
    ax.set_title(result["scenario"].split(" (")[0])
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def shares(result: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """Each setting's macro-F1 over the same split without DP, and over the blind guess."""
    plain = {
        split: s["macro_f1"]
        for s in result["settings"]
        for split, eps in [_split_and_epsilon(s["setting"])]
        if eps is None
    }
    blind = result.get("frequency_guess", {}).get("macro_f1")
    out = {}
    for s in result["settings"]:
        split, _ = _split_and_epsilon(s["setting"])
        base = plain.get(split)
        out[s["setting"]] = (
            s["macro_f1"] / base if base else None,
            s["macro_f1"] / blind if blind else None,
        )
    return out


def table(result: dict[str, Any]) -> str:
    rows = table_head(
        "setting", "accuracy", "macro-F1", "F1 / same without DP", "F1 / blind", "epsilon spent"
    )
    ratio = shares(result)
    for s in result["settings"]:
        own, blind = ratio[s["setting"]]
        rows.append(
            f"| {s['setting']} | {fmt(s['accuracy'], 3)} | {fmt(s['macro_f1'], 3)} "
            f"| {fmt(own)} | {fmt(blind, 1)} | {fmt(s['epsilon'])} |"
        )
    for key, name in (
        ("majority_class", "always the majority class"),
        ("frequency_guess", "blind guess at the class frequencies (expected)"),
    ):
        base = result[key]
        scores = f"{fmt(base['accuracy'], 3)} | {fmt(base['macro_f1'], 3)}"
        rows.append(f"| *{name}* | {scores} | | | |")
    return (
        f"### Privacy-utility ({result['scenario']}, {result['rounds']} rounds, "
        f"delta {result['delta']:g}; targets at eps 8: >= {result['target_share']:.0%} of the "
        f"same federation without DP, >= {result.get('target_over_blind', 3.0):g}x the blind "
        "guess)\n\n" + "\n".join(rows)
    )
