"""DP overhead: per-step time and peak memory of one client's local training step, plain LoRA
against Opacus DP-SGD in each grad-sample mode and our closed-form clipping (``fused``,
client.fused_clipping), at two batch sizes and two sequence lengths.

All modes of one (batch, length) cell live side by side and are timed in interleaved blocks
(plain, hooks, functorch, ..., plain, hooks, ...), so that the load of a shared machine
drifts over all modes alike; ratios to plain come from the same run. A mode that Opacus
cannot apply to the model is recorded with its error instead of a time.

Memory is the step's peak resident set above the resident set just before the block (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``): what one step
adds on top of the model (activations, gradients, per-sample gradients), measured by the OS
on the real allocations. One torch thread, as a simulated client gets one CPU.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from privatune.client.fused_clipping import FusedClipping
from privatune.client.train import make_optimizer
from privatune.common.config import RunConfig, resolve
from privatune.common.model.build import build_model
from privatune.simulations.bench.shared import (
    fmt,
    mode_rows,
    model_overrides,
    save_figure,
    table_head,
)
from torch.utils.data import DataLoader, TensorDataset

MODES = ("plain", "hooks", "functorch", "ew", "ghost", "fused")
FULL = {"batch_sizes": (8, 16), "seq_lens": (64, 128), "reps": 3, "steps": 2}
QUICK = {"batch_sizes": (4,), "seq_lens": (16,), "reps": 2, "steps": 1}
CPU = torch.device("cpu")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Return freed heap to the OS, reset the peak, and return the resident set (KiB)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


def make_step(
    mode: str,
    cfg: RunConfig,
    batch: tuple[torch.Tensor, ...],
    device: torch.device = CPU,
    bf16: bool = False,
) -> Callable[[], None]:
    """One optimizer step of local training in ``mode`` on a fixed batch (no Poisson
    sampling, so that every mode sees exactly the same batch size); ``bf16`` runs the
    forward pass under bfloat16 autocast, as ``model.bf16`` does on a GPU."""
    model = build_model(cfg, device)
    optimizer = make_optimizer(model, cfg)
    criterion: Callable[..., torch.Tensor] = torch.nn.CrossEntropyLoss()
    module: torch.nn.Module = model
    batch = tuple(t.to(device) for t in batch)
    loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    clipping = None
    if mode == "fused":
        clipping = FusedClipping.attach(
            model,
            optimizer,
            loader,
            noise_multiplier=1.0,
            max_grad_norm=cfg.dp.max_grad_norm,
            generator=None,
            accountant=RDPAccountant(),
        )
    elif mode != "plain":
        wrapped = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=cfg.dp.max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode=mode,
            criterion=criterion,
        )
        if mode == "ghost":
            module, optimizer, criterion, _ = wrapped
        else:
            module, optimizer, _ = wrapped
    ids, mask, labels = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # token ids positionally: Opacus' "ew" mode wraps forward(x, *args, **kwargs)
            logits = module(ids, attention_mask=mask).logits
        loss = criterion(logits.float(), labels)
        loss.backward()
        if clipping is not None:
            clipping.privatise(len(labels))
        optimizer.step()

    step()  # warm-up: optimizer state and one-time allocations stay out of the measurement
    return step


def measure_cell(
    cfg: RunConfig, batch_size: int, seq_len: int, reps: int, steps: int
) -> dict[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(cfg.run.seed)
    batch = (
        torch.randint(1000, 20000, (batch_size, seq_len), generator=gen),
        torch.ones(batch_size, seq_len, dtype=torch.long),
        torch.randint(0, len(cfg.data.label_names), (batch_size,), generator=gen),
    )
    stepper: dict[str, Callable[[], None]] = {}
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        try:
            stepper[mode] = make_step(mode, cfg, batch)
        except Exception as e:  # Opacus raises many types for unsupported layers
            results[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    times: dict[str, list[float]] = {m: [] for m in stepper}
    peaks: dict[str, int] = dict.fromkeys(stepper, 0)
    for _ in range(reps):
        for mode, step in stepper.items():
            before = _reset_peak()
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[mode].append(time.perf_counter() - start)
            peaks[mode] = max(peaks[mode], _rss_kib("VmHWM") - before)
    plain = stepper and "plain" in times and statistics.median(times["plain"])
    for mode in stepper:
        median = statistics.median(times[mode])
        results[mode] = {
            "step_seconds_median": round(median, 4),
            "step_seconds": [round(t, 4) for t in times[mode]],
            "step_peak_mib": round(peaks[mode] / 1024, 1),
            "time_ratio": round(median / plain, 3) if plain else None,
            "memory_ratio": round(peaks[mode] / peaks["plain"], 3) if peaks.get("plain") else None,
        }
    return results


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    grid = QUICK if quick else FULL
    cfg = resolve({**model_overrides(quick, out_dir), "lora.dropout": 0.0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cells = [
            {
                "batch_size": b,
                "seq_len": s,
                "modes": measure_cell(cfg, b, s, grid["reps"], grid["steps"]),
            }
            for b in grid["batch_sizes"]
            for s in grid["seq_lens"]
        ]
    finally:
        torch.set_num_threads(threads)
    ratios = {
        m: [c["modes"][m]["time_ratio"] for c in cells if "time_ratio" in c["modes"].get(m, {})]
        for m in MODES
        if m != "plain"
    }
    working = {m: max(r) for m, r in ratios.items() if r and None not in r}
    best = min(working, key=working.get) if working else None
    result = {
        "benchmark": "overhead",
        "quick": quick,
        "model": cfg.model.name,
        "lora": {"rank": cfg.lora.rank, "target_modules": cfg.lora.target_modules},
        "torch_threads": 1,
        "grid": grid,
        "memory_method": "Linux VmHWM above VmRSS before the block (clear_refs 5, malloc_trim)",
        "cells": cells,
        "worst_time_ratio": working,
        "best_mode": best,
        "target_time_ratio": 1.3,
        "meets_target": bool(best and working[best] <= 1.3),
    }
    plot(result, out_dir / "overhead.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m != "plain"]
    cells = result["cells"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(cells)
    for i, cell in enumerate(cells):
        ys = [cell["modes"].get(m, {}).get("time_ratio") or 0 for m in modes]
        xs = [j + i * width for j in range(len(modes))]
        ax.bar(xs, ys, width, label=f"batch {cell['batch_size']}, length {cell['seq_len']}")
    ax.axhline(result["target_time_ratio"], color="k", linestyle="--", linewidth=1, label="target")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes)
    ax.set_ylabel("DP step time / plain step time")
    ax.set_title("Opacus DP-SGD overhead per step (0 = mode fails)")
    top = max([c["modes"].get(m, {}).get("time_ratio") or 0 for c in cells for m in modes])
    ax.set_ylim(0, max(top, result["target_time_ratio"]) * 1.45)  # room for the legend
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    save_figure(fig, path)


def table(result: dict[str, Any]) -> str:
    rows = table_head(
        "batch",
        "length",
        "mode",
        "step time (s)",
        "time / plain",
        "step peak (MiB)",
        "memory / plain",
    )
    rows += mode_rows(
        result["cells"],
        MODES,
        lambda cell: [str(cell["batch_size"]), str(cell["seq_len"])],
        lambda m: [
            fmt(m.get("step_seconds_median"), 3),
            fmt(m.get("time_ratio")),
            fmt(m.get("step_peak_mib"), 1),
            fmt(m.get("memory_ratio")),
        ],
    )
    rows.append(
        f"\nBest DP mode (lowest worst-case time ratio): **{result['best_mode']}** "
        f"({fmt(result['worst_time_ratio'].get(result['best_mode']))}x; "
        f"target <= {result['target_time_ratio']}x)"
    )
    return "### DP overhead (per local step)\n\n" + "\n".join(rows)
