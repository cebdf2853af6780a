"""Privacy-utility: accuracy and macro-F1 on the held-out test set of a scenario (the default
``medical``, MedMCQA specialties; ``complaints``, CFPB products; or a small one) for
centralised training with and without DP and for the federation without DP and with DP-SGD at
several epsilons, on an IID split and on the scenario's own non-IID split, with the scenario's
own recipe (for the large scenarios, a linear probe).

Every federation of the last split is run a second time with canaries planted in all its
institutions (``simulations.tools.canary``): the measured lower bound on epsilon (one-run auditing,
black-box and white-box, 95%) stands beside the epsilon the ledgers claim.

The centralised runs train on the union of exactly the rows the institutions train on (each
institution's file minus its local evaluation split), for as many epochs as the federation
has rounds times local epochs, with DP noise planned for that whole training: the federated
runs see the same data, the same number of passes and the same (epsilon, delta).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from privatune.client.app import model_input, noise_for
from privatune.client.institution import Policy
from privatune.client.train import train_round
from privatune.common.config import RunConfig, Scalar
from privatune.common.data import LabeledText, fingerprint, load_labeled, split_local
from privatune.common.model.build import build_model
from privatune.common.model.evaluation import evaluate
from privatune.common.privacy.accounting import epsilon
from privatune.common.privacy.empirical import RESULT, measured_lower
from privatune.simulations.bench.grid import (
    CENTRAL_EPSILON,
    baselines,
    federated,
    make_data,
    setting_flat,
)
from privatune.simulations.bench.shared import fmt, model_overrides, save_figure, table_head
from privatune.simulations.scenario import DATASETS, Scenario
from privatune.simulations.tools.canary import run_canary_audit

FULL = {
    "epsilons": (None, 1.0, 2.0, 4.0, 8.0),
    "partitions": ("iid", "scenario"),
    "canaries": 500,
}
# One federation and its audit only: the quick run proves the code path, the suite pays for it.
QUICK = {"epsilons": (8.0,), "partitions": ("iid",), "rounds": 1, "canaries": 60}
TARGET_SHARE = 0.90  # of the same federation (split, rounds, recipe) without DP, at eps 8
TARGET_OVER_BLIND = 3.0  # times the blind guess's macro-F1 (1 / classes)


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
            if part == grid["partitions"][-1]:
                canary_flat = {**flat, "run.name": f"{flat['run.name']}-canary"}
                settings[-1]["measured"] = measured(canary_flat, setup, grid["canaries"])
    result = {
        "benchmark": "utility",
        "quick": quick,
        "scenario": f"{scenario} ({DATASETS[setup.dataset].source.split(', via ')[0]})",
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


def measured(flat: Mapping[str, Scalar], setup: Scenario, canaries: int) -> dict[str, Any]:
    """The empirical audit of one setting: the same federation with ``canaries`` planted
    round-robin in all institutions; the largest of the auditors' bounds."""
    run_dir = Path(str(flat["run.output-dir"])) / str(flat["run.name"])
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir = run_canary_audit(setup, flat, canaries, into=setup.institutions)
    result = json.loads((run_dir / RESULT).read_text())
    return {"canaries": canaries, "epsilon_lower": measured_lower(result), **result}


def _split_and_epsilon(setting: str) -> tuple[str, float | None]:
    """("federated iid", 8.0) from "federated iid DP eps 8"; epsilon None without DP."""
    split, _, eps = setting.partition(" DP eps ")
    return split, float(eps) if eps else None


def _shown(setting: str) -> str:
    """The grid's name for the scenario's own split, as a reader knows it."""
    return setting.replace("federated scenario", "federated non-IID (the scenario's split)")


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
        if dp:
            ax.plot(*zip(*dp, strict=True), "o-", color=colour, label=f"{_shown(split)}, DP")
        for name, eps, f1 in runs:
            if name == split and eps is None:
                ax.axhline(f1, color=colour, ls="--", label=f"{_shown(split)}, no DP")
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
        "setting",
        "accuracy",
        "macro-F1",
        "F1 / same without DP",
        "F1 / blind",
        "epsilon spent",
        "epsilon measured (95% lower bound)",
    )
    ratio = shares(result)
    for s in result["settings"]:
        own, blind = ratio[s["setting"]]
        lower = s.get("measured", {}).get("epsilon_lower")
        rows.append(
            f"| {_shown(s['setting'])} | {fmt(s['accuracy'], 3)} | {fmt(s['macro_f1'], 3)} "
            f"| {fmt(own)} | {fmt(blind, 1)} | {fmt(s['epsilon'])} | {fmt(lower)} |"
        )
    for key, name in (
        ("majority_class", "always the majority class"),
        ("frequency_guess", "blind guess at the class frequencies (expected)"),
    ):
        base = result[key]
        scores = f"{fmt(base['accuracy'], 3)} | {fmt(base['macro_f1'], 3)}"
        rows.append(f"| *{name}* | {scores} | | | | |")
    return (
        f"### Privacy-utility ({result['scenario']}, {result['rounds']} rounds, "
        f"delta {result['delta']:g}; targets at eps 8: >= {result['target_share']:.0%} of the "
        f"same federation without DP, >= {result.get('target_over_blind', 3.0):g}x the blind "
        "guess)\n\n" + "\n".join(rows)
    )
