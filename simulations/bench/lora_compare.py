"""LoRA against the linear probe, one grid: the scenario's probe (``medical``) and its LoRA
recipe (``medical-lora``) as federations on the scenario's own non-IID split, without DP
and with DP-SGD at epsilon 1, 2, 4 and 8 per institution, same split, seed and held-out
test set (the federations of ``simulations.bench.grid``, each a real Flower simulation).
Test macro-F1 after the last round, and the wall time of each federation.

``privatune bench --only lora-compare [--compare-scenario complaints]
[--compare-epsilons none,8]``: the grid takes hours on two cores (a LoRA federation of the
medical recipe about a quarter of an hour), so ``--compare-epsilons`` runs a subset.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privatune.simulations.bench.grid import federated, make_data, setting_flat
from privatune.simulations.bench.shared import fmt, model_overrides, table_head
from privatune.simulations.scenario import load_scenario

EPSILONS: tuple[float | None, ...] = (None, 1.0, 2.0, 4.0, 8.0)
QUICK = {"epsilons": (8.0,), "rounds": 1}


def parse_epsilons(text: str) -> tuple[float | None, ...]:
    """``"none,8"`` -> (None, 8.0): ``none`` is the federation without DP."""
    return tuple(None if e.strip() == "none" else float(e) for e in text.split(",") if e.strip())


def run(
    quick: bool,
    out_dir: Path,
    scenario: str = "medical",
    epsilons: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """Both recipes of ``scenario`` (the probe, then ``<scenario>-lora``) at each epsilon."""
    if quick:
        scenario, epsilons = "hospitals-small-probe", QUICK["epsilons"]
    grid = tuple(epsilons) if epsilons else EPSILONS
    model = model_overrides(quick, out_dir)
    work = out_dir / "work" / "lora-compare"
    data, split = make_data(quick, "scenario", work, scenario)
    methods = {"probe": scenario, "lora": scenario if quick else f"{scenario}-lora"}
    settings = []
    for method, name in methods.items():
        # the grid's split (3 institutions in quick mode), the recipe's config
        recipe = dataclasses.replace(load_scenario(name), institutions=split.institutions)
        # quick: the tiny BERT's top layer on the drug reviews, the code path only
        overrides = (
            {"train.trainable": "adapter", "lora.layers": 1} if quick and method == "lora" else {}
        )
        for eps in grid:
            label = f"{method} " + (f"DP eps {eps:g}" if eps else "no DP")
            flat = setting_flat(
                data,
                work / "runs" / label.replace(" ", "-"),
                recipe,
                eps,
                QUICK["rounds"] if quick else None,
                quick,
                {**model, **overrides},
            )
            started = time.monotonic()
            cell = federated(flat, split.institutions)
            cell["seconds"] = round(time.monotonic() - started, 1)
            settings.append({"method": method, "scenario": name, "epsilon_target": eps, **cell})
    return {"benchmark": "lora-compare", "quick": quick, "scenario": scenario, "settings": settings}


def table(result: dict[str, Any]) -> str:
    rows = table_head("method", "DP", "accuracy", "macro-F1", "epsilon spent", "rounds", "seconds")
    for s in result["settings"]:
        dp = f"eps {s['epsilon_target']:g}" if s["epsilon_target"] else "none"
        rows.append(
            f"| {s['method']} ({s['scenario']}) | {dp} | {fmt(s['accuracy'], 3)} "
            f"| {fmt(s['macro_f1'], 3)} | {fmt(s['epsilon'])} | {s['rounds']} "
            f"| {fmt(s['seconds'], 0)} |"
        )
    return (
        f"### LoRA against the probe ({result['scenario']}, the scenario's non-IID split, "
        "central test macro-F1 after the last round)\n\n" + "\n".join(rows)
    )
