"""DP-SGD on a GPU: samples per second and peak memory of one client's training step, plain
LoRA against DP-SGD in Opacus' grad-sample modes and our closed-form clipping (``fused``,
client.fused_clipping), for MiniLM and a BERT-base-sized model (random weights: speed does
not depend on them), in fp32 with TF32 matmuls and in bf16 autocast.

The modes of one (model, precision) cell live side by side and are timed in interleaved
blocks, as in the CPU overhead benchmark, with the device synchronised around each block.
Memory is the peak CUDA allocation of a block above the allocation before it: what a step
adds on top of the model. Without CUDA the full run records that it measured nothing (CI
has no GPU); ``--quick`` times the tiny BERT on the CPU instead, to prove the script works.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from privatune.common.config import resolve
from privatune.common.model.hub import DEFAULT_MODEL
from privatune.simulations.bench.overhead import make_step
from privatune.simulations.bench.shared import (
    bert_of_shape,
    fmt,
    mode_rows,
    model_overrides,
    save_figure,
    table_head,
)

MODES = ("plain", "hooks", "functorch", "ghost", "fused")
PRECISIONS = ("fp32", "bf16")
FULL = {"batch_size": 128, "seq_len": 128, "warmup": 3, "steps": 10, "reps": 3}
QUICK = {"batch_size": 4, "seq_len": 16, "warmup": 1, "steps": 2, "reps": 1}
TARGET_RATIO = 1.3  # plain step time / best DP step time, at batch 128
TARGET_MINILM_DP = 7000.0  # samples per second


def _models(quick: bool, out_dir: Path) -> dict[str, dict[str, Any]]:
    if quick:
        return {"tiny BERT (random)": model_overrides(True, out_dir)}
    base = bert_of_shape(out_dir / "bert-base-random", "base")
    return {
        "MiniLM-L6": {"model.name": DEFAULT_MODEL},
        "BERT-base (random)": {"model.name": str(base)},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cell(
    overrides: dict[str, Any], device: torch.device, bf16: bool, grid: dict[str, int]
) -> dict[str, dict[str, Any]]:
    cfg = resolve({**overrides, "lora.dropout": 0.0, "model.max-length": grid["seq_len"]})
    gen = torch.Generator().manual_seed(cfg.run.seed)
    size = (grid["batch_size"], grid["seq_len"])
    batch = (
        torch.randint(1000, 20000, size, generator=gen),
        torch.ones(size, dtype=torch.long),
        torch.randint(0, len(cfg.data.label_names), size[:1], generator=gen),
    )
    stepper: dict[str, Callable[[], None]] = {}
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        try:
            stepper[mode] = make_step(mode, cfg, batch, device, bf16)
            for _ in range(grid["warmup"]):
                stepper[mode]()
        except Exception as e:  # Opacus raises many types for unsupported layers
            stepper.pop(mode, None)
            results[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    seconds: dict[str, float] = dict.fromkeys(stepper, 0.0)
    peaks: dict[str, int] = dict.fromkeys(stepper, 0)
    for _ in range(grid["reps"]):
        for mode, step in stepper.items():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            for _ in range(grid["steps"]):
                step()
            _sync(device)
            seconds[mode] += time.perf_counter() - start
            if device.type == "cuda":
                peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated(device) - before)
    samples = grid["batch_size"] * grid["steps"] * grid["reps"]
    for mode in stepper:
        results[mode] = {
            "samples_per_second": round(samples / seconds[mode], 1),
            "step_ms": round(1000 * seconds[mode] / (grid["steps"] * grid["reps"]), 2),
            "step_peak_mib": round(peaks[mode] / 2**20, 1) if device.type == "cuda" else None,
            "time_ratio": round(seconds[mode] / seconds["plain"], 3)
            if "plain" in seconds
            else None,
        }
    return results


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    grid = QUICK if quick else FULL
    result: dict[str, Any] = {"benchmark": "gpu", "quick": quick, "grid": grid, "cells": []}
    if quick:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        return {**result, "skipped": "no CUDA device on this machine"}
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for model, overrides in _models(quick, out_dir).items():
        for precision in PRECISIONS:
            bf16 = precision == "bf16"
            if bf16 and device.type == "cpu":
                continue  # bfloat16 autocast on a CPU says nothing about a GPU
            modes = measure_cell(overrides, device, bf16, grid)
            result["cells"].append({"model": model, "precision": precision, "modes": modes})
    for cell in result["cells"]:
        dp = {m: v for m, v in cell["modes"].items() if m != "plain" and "time_ratio" in v}
        cell["best_dp_mode"] = min(dp, key=lambda m: dp[m]["time_ratio"]) if dp else None
    result["target_time_ratio"] = TARGET_RATIO
    result["target_minilm_dp_samples_per_second"] = TARGET_MINILM_DP
    plot(result, out_dir / "gpu.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(cells), 1)
    for i, cell in enumerate(cells):
        ys = [cell["modes"].get(m, {}).get("samples_per_second") or 0 for m in MODES]
        xs = [j + i * width for j in range(len(MODES))]
        ax.bar(xs, ys, width, label=f"{cell['model']}, {cell['precision']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(MODES))], MODES)
    ax.set_ylabel("training samples / second")
    ax.set_title(f"One client's step on {result['device']} (0 = mode fails)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def table(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"### DP-SGD on a GPU\n\nNot measured: {result['skipped']}."
    rows = table_head(
        "model", "precision", "mode", "samples/s", "step (ms)", "time / plain", "step peak (MiB)"
    )
    rows += mode_rows(
        result["cells"],
        MODES,
        lambda cell: [cell["model"], cell["precision"]],
        lambda m: [
            fmt(m.get("samples_per_second"), 0),
            fmt(m.get("step_ms")),
            fmt(m.get("time_ratio")),
            fmt(m.get("step_peak_mib"), 1),
        ],
    )
    date = result.get("machine", {}).get("date", "?")
    return (
        f"### DP-SGD on a GPU ({result['device']}, {date}, batch {result['grid']['batch_size']}, "
        f"length {result['grid']['seq_len']})\n\n" + "\n".join(rows)
    )
