"""LoRA-aware aggregation: ``aggregation.mode`` fedavg vs ffa vs exact on the default
non-IID scenario (hospitals-small: six hospitals, Dirichlet 1.0 label skew),
without DP and with DP-SGD at epsilon 8: central accuracy and macro-F1 after the last round,
bytes per round as measured on the messages, and for ``exact`` the energy its truncated
SVD drops per round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from privatune.simulations.bench.grid import baselines, federated, make_data, setting_flat
from privatune.simulations.bench.shared import fmt, model_overrides, save_figure, table_head

MODES = ("fedavg", "ffa", "exact")
EPSILONS = (None, 8.0)
PARTITION = "dirichlet-1.0"  # the hospitals scenario's own split
QUICK_ROUNDS = 1


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    work = out_dir / "work" / "aggregation"
    data, scenario = make_data(quick, PARTITION, work, "hospitals-small")
    model = model_overrides(quick, out_dir)
    settings = []
    for eps in (8.0,) if quick else EPSILONS:
        for mode in MODES:
            name = f"{mode} " + (f"DP eps {eps:g}" if eps else "no DP")
            flat = setting_flat(
                data,
                work / "runs" / name.replace(" ", "-"),
                scenario,
                eps,
                QUICK_ROUNDS if quick else None,
                quick,
                {**model, "aggregation.mode": mode},
            )
            result = federated(flat, scenario.institutions)
            lost = [x for x in result.pop("truncation_energy_lost") if x is not None]
            result["mean_truncation_energy_lost"] = float(np.mean(lost)) if lost else None
            settings.append({"setting": name, "mode": mode, "dp_epsilon": eps, **result})
    result = {
        "benchmark": "aggregation",
        "quick": quick,
        "scenario": "hospitals-small (UCI drug reviews, Dirichlet 1.0)",
        "rounds": settings[-1]["rounds"],
        "settings": settings,
        "majority_class": baselines(data, str(flat["data.labels"]))["majority_class"],
    }
    plot(result, out_dir / "aggregation.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    fig, (f1, traffic) = plt.subplots(1, 2, figsize=(10, 0.35 * len(settings) + 1.5))
    names = [s["setting"] for s in settings]
    f1.barh(names, [s["macro_f1"] for s in settings])
    f1.axvline(result["majority_class"]["macro_f1"], color="k", linestyle="--")
    f1.set_xlabel("macro-F1 (dashed: always the majority class)")
    f1.invert_yaxis()
    traffic.barh(names, [s["bytes_received_per_round"] / 2**20 for s in settings])
    traffic.set_xlabel("MiB received by the server per round")
    traffic.invert_yaxis()
    traffic.set_yticklabels([])
    save_figure(fig, path)


def table(result: dict[str, Any]) -> str:
    rows = table_head(
        "mode",
        "accuracy",
        "macro-F1",
        "MiB sent / round",
        "MiB received / round",
        "SVD energy lost / round",
        "epsilon spent",
    )
    for s in result["settings"]:
        rows.append(
            f"| {s['setting']} | {fmt(s['accuracy'], 3)} | {fmt(s['macro_f1'], 3)} "
            f"| {fmt(s['bytes_sent_per_round'] / 2**20, 3)} "
            f"| {fmt(s['bytes_received_per_round'] / 2**20, 3)} "
            f"| {fmt(s['mean_truncation_energy_lost'], 3)} | {fmt(s['epsilon'])} |"
        )
    return (
        f"### LoRA-aware aggregation ({result['rounds']} rounds, {result['scenario']})\n\n"
        + "\n".join(rows)
    )
