"""LoRA on the top layers from cached lower layers (``lora.layers``, common.model.top_layers)
against LoRA on all layers: the time of one local DP-SGD epoch of one hospital of the
medical scenario (its largest), as a simulated client runs it (one torch thread, Opacus
hooks, Poisson batches of the scenario's expected size), and the one-off time to fill the
cache. The paths are timed in interleaved blocks (all, top 2, top 1, all, ...) so that the
load of a shared machine drifts over all alike; the ratios to the all-layer epoch come
from one run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from privatune.client.train import train_round
from privatune.common.config import resolve
from privatune.common.data import load_labeled
from privatune.common.model.build import build_model, encode
from privatune.common.model.top_layers import cached_lower_states
from privatune.simulations.bench.grid import make_data
from privatune.simulations.bench.shared import fmt, model_overrides, save_figure, table_head

PATHS = {"all layers": 0, "top 2 (cached)": 2, "top 1 (cached)": 1}
FULL = {"reps": 2, "rows": None}
QUICK = {"reps": 1, "rows": 48}
CPU = torch.device("cpu")


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    grid = QUICK if quick else FULL
    data_dir, scenario = make_data(quick, "scenario", out_dir / "work" / "lora", "medical")
    cfg_flat = {
        **scenario.config,
        **model_overrides(quick, out_dir),
        "train.trainable": "adapter",
        "model.subspace": "",
        "dp.noise-multiplier": 1.0,
        "train.local-epochs": 1,
    }
    if quick:  # the drug reviews' labels (make_data's quick rows)
        cfg_flat.update({"data.labels": "negative,neutral,positive", "model.label-texts": ""})
    base = resolve(cfg_flat)
    files = sorted(data_dir.glob(f"{scenario.prefix}-*.csv"))
    data = max((load_labeled(f, "text", "label", base.data.label_names) for f in files), key=len)
    if grid["rows"]:
        data = data.subset(np.arange(min(grid["rows"], len(data))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a simulated client gets one CPU
    try:
        cells = _time_paths(cfg_flat, data, grid["reps"])
    finally:
        torch.set_num_threads(threads)
    reference = statistics.median(cells["all layers"]["epoch_seconds"])
    for cell in cells.values():
        cell["epoch_ratio_to_all_layers"] = statistics.median(cell["epoch_seconds"]) / reference
    result = {
        "benchmark": "lora",
        "quick": quick,
        "scenario": "medical (its largest hospital's rows, one local epoch, DP hooks)",
        "rows": len(data),
        "batch_size": base.train.batch_size,
        "max_length": base.model.max_length,
        "paths": cells,
    }
    plot(result, out_dir / "lora.png")
    return result


def _time_paths(cfg_flat: dict, data, reps: int) -> dict[str, dict[str, Any]]:
    """Each path's epochs, interleaved; the cache is filled (and timed) before the first."""
    cells: dict[str, dict[str, Any]] = {}
    inputs = {}
    for name, layers in PATHS.items():
        cfg = resolve({**cfg_flat, "lora.layers": layers})
        started = time.perf_counter()
        if layers:
            inputs[name] = cached_lower_states(build_model(cfg, CPU), data, cfg)
        else:
            inputs[name] = encode(data, cfg)
        cells[name] = {
            "lora_layers": layers,
            "input_seconds": time.perf_counter() - started,
            "epoch_seconds": [],
        }
    for _ in range(reps):
        for name, layers in PATHS.items():
            cfg = resolve({**cfg_flat, "lora.layers": layers})
            model = build_model(cfg, CPU)
            started = time.perf_counter()
            train_round(model, inputs[name], cfg, cfg.dp.noise_multiplier, CPU)
            cells[name]["epoch_seconds"].append(time.perf_counter() - started)
    return cells


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["paths"])
    epochs = [statistics.median(result["paths"][n]["epoch_seconds"]) for n in names]
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.barh(names, epochs, color="0.35")
    ax.set_xlabel("seconds per local DP-SGD epoch (one hospital, one CPU)")
    ax.invert_yaxis()
    save_figure(fig, path)


def table(result: dict[str, Any]) -> str:
    rows = table_head("path", "epoch (s)", "ratio to all layers", "cache fill / tokenise (s)")
    for name, cell in result["paths"].items():
        rows.append(
            f"| {name} | {fmt(statistics.median(cell['epoch_seconds']), 1)} "
            f"| {fmt(cell['epoch_ratio_to_all_layers'], 3)} | {fmt(cell['input_seconds'], 1)} |"
        )
    return (
        f"### LoRA on the top layers ({result['scenario']}: {result['rows']} rows, "
        f"expected batch {result['batch_size']}, {result['max_length']} tokens)\n\n"
        + "\n".join(rows)
    )
