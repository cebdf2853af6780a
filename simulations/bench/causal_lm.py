"""The causal LM's DP step: tokens and samples per second of one LoRA training step of
SmolLM2-135M-Instruct (the ``medical-llm`` scenario's model and adapter: LoRA on the four
attention projections, letters as answers), plain against DP-SGD under Opacus' hooks and our
closed-form clipping (``fused``), on the CPU in fp32 and, where CUDA is present, in fp32 and
bf16 autocast.

Each mode's step is the training loop's own (client.train: the DP backend of
client.dp_backends around the answer log-likelihood loss of common.model.causal_lm), on one fixed
batch of full-length rows (no Poisson sampling, so that every mode sees the same batch). The
modes are timed step by step in turn (plain, hooks, fused, plain, ...), so that a shared
machine's load drifts over all of them alike; the ratios come from the same run. On the CPU
the step runs on one torch thread (a simulated client's one CPU) and its CPU time is recorded
beside the wall-clock time: on a machine shared with other work, the CPU time is the cost the
load does not stretch. ``--quick`` times a tiny random Llama instead, to prove the script
works; its numbers mean nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from privatune.client.dp_backends import DPBackend, backend_for
from privatune.client.train import make_optimizer
from privatune.common.config import RunConfig, Scalar, resolve
from privatune.common.model.build import build_model
from privatune.common.model.causal_lm import label_scores
from privatune.simulations.bench.gpu import _sync
from privatune.simulations.bench.shared import fmt, mode_rows, table_head
from privatune.simulations.scenario import load_scenario
from torch.utils.data import DataLoader, TensorDataset

MODES = ("plain", "hooks", "fused")
FULL = {"batch_size": 4, "seq_len": 128, "warmup": 1, "steps": 3}
QUICK = {"batch_size": 4, "seq_len": 16, "warmup": 1, "steps": 2}
NOISE_MULTIPLIER = 1.0  # the step's cost does not depend on it


def tiny_llama(path: Path, tokenizer) -> Path:
    """A 2-layer random Llama saved with ``tokenizer``: the causal-LM code paths of
    transformers, peft and Opacus in seconds (the benchmark's quick mode and the tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def base_flat(quick: bool, out_dir: Path) -> dict[str, Scalar]:
    """The ``medical-llm`` scenario's model, adapter and answers; quick: the tiny Llama (its
    BERT tokenizer has no chat template)."""
    flat = load_scenario("medical-llm").config
    if not quick:
        return flat
    tiny = out_dir / "tiny-llama"
    if not (tiny / "config.json").is_file():  # MiniLM's tokenizer: installed, loads in a second
        from privatune.common.model.hub import DEFAULT_MODEL, resolve_model_path
        from transformers import AutoTokenizer

        tiny_llama(tiny, AutoTokenizer.from_pretrained(str(resolve_model_path(DEFAULT_MODEL))))
    return {**flat, "model.name": str(tiny), "model.chat-template": False}


def mode_config(flat: dict[str, Scalar], mode: str, bf16: bool) -> RunConfig:
    """``mode`` as the configuration selects it: DP off (plain), or a grad-sample mode."""
    dp = mode != "plain"
    return resolve(
        {
            **flat,
            "dp.enabled": dp,
            "dp.grad-sample-mode": mode if dp else "hooks",
            "privacy.allow-non-private": not dp,
            "model.bf16": bf16,
        }
    )


def make_step(
    cfg: RunConfig, batch: tuple[torch.Tensor, ...], device: torch.device
) -> tuple[Callable[[], None], DPBackend]:
    """One optimizer step of ``client.train.train_round``'s loop on a fixed batch, and the
    backend (to read its mechanism and close it afterwards)."""
    model = build_model(cfg, device)
    ids, mask, labels = (t.to(device) for t in batch)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=len(labels))
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed)
    backend = backend_for(cfg, NOISE_MULTIPLIER, generator)
    module, optimizer, _ = backend.prepare(model, make_optimizer(model, cfg), loader)
    use_bf16 = cfg.model.bf16 and device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = -label_scores(module, ids, mask, labels).mean()  # client.train's loss
        loss.backward()
        backend.after_backward(len(labels))
        optimizer.step()

    return step, backend


def measure_cell(
    flat: dict[str, Scalar], device: torch.device, bf16: bool, grid: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """Every mode's step on the same random batch, warmed up, then timed in turn."""
    b, t = grid["batch_size"], grid["seq_len"]
    gen = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(1000, 20000, (b, t), generator=gen),
        torch.ones(b, t, dtype=torch.long),
        torch.randint(0, len(resolve(flat).data.label_names), (b,), generator=gen),
    )
    steppers: dict[str, tuple[Callable[[], None], DPBackend]] = {}
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        try:
            steppers[mode] = make_step(mode_config(flat, mode, bf16), batch, device)
            for _ in range(grid["warmup"]):
                steppers[mode][0]()
        except Exception as e:  # a mode that fails on this model is recorded, not fatal
            steppers.pop(mode, None)
            results[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    times: dict[str, list[float]] = {m: [] for m in steppers}
    cpu_times: dict[str, list[float]] = {m: [] for m in steppers}
    for _ in range(grid["steps"]):
        for mode, (step, _) in steppers.items():
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times[mode].append(time.perf_counter() - start)
            cpu_times[mode].append(time.process_time() - cpu_start)
    wall = {m: statistics.median(ts) for m, ts in times.items()}
    cpu = {m: statistics.median(ts) for m, ts in cpu_times.items()}
    on_cpu = device.type == "cpu"  # on a GPU the process's CPU time is not the step's cost
    for mode, (_, backend) in steppers.items():
        backend.close()
        mechanism = backend.mechanism()
        results[mode] = {
            "step_seconds_median": round(wall[mode], 4),
            "step_seconds": [round(s, 4) for s in times[mode]],
            "samples_per_second": round(b / wall[mode], 2),
            "tokens_per_second": round(b * t / wall[mode], 1),
            "time_ratio": _ratio(wall, mode, "plain"),
            "step_cpu_seconds_median": round(cpu[mode], 4) if on_cpu else None,
            "cpu_ratio": _ratio(cpu, mode, "plain") if on_cpu else None,
            "mechanism": mechanism._asdict() if mechanism else None,
        }
    return results


def _ratio(medians: dict[str, float], mode: str, to: str) -> float | None:
    return round(medians[mode] / medians[to], 3) if mode in medians and to in medians else None


def run(
    quick: bool,
    out_dir: Path,
    batch_size: int | None = None,
    seq_len: int | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """The grid (quick or full, any of its sizes overridden) on the CPU and, in a full run
    where CUDA is present, on the GPU in fp32 and bf16."""
    given = {"batch_size": batch_size, "seq_len": seq_len, "steps": steps}
    grid = {**(QUICK if quick else FULL), **{k: v for k, v in given.items() if v}}
    flat = base_flat(quick, out_dir)
    cfg = resolve(flat)
    cells: list[tuple[torch.device, str]] = [(torch.device("cpu"), "fp32")]
    if not quick and torch.cuda.is_available():
        cells += [(torch.device("cuda"), "fp32"), (torch.device("cuda"), "bf16")]
    result: dict[str, Any] = {
        "benchmark": "causal-lm",
        "quick": quick,
        "model": "tiny random Llama" if quick else cfg.model.name,
        "lora": {"rank": cfg.lora.rank, "target_modules": cfg.lora.target_modules},
        "answers": cfg.data.label_names,
        "grid": grid,
        "cpu_torch_threads": 1,  # as a simulated client gets one CPU (simulations.simulate)
        "cells": [],
    }
    threads = torch.get_num_threads()
    for device, precision in cells:
        torch.set_num_threads(1 if device.type == "cpu" else threads)
        try:
            modes = measure_cell(flat, device, precision == "bf16", grid)
        finally:
            torch.set_num_threads(threads)
        result["cells"].append(
            {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "precision": precision,
                "modes": modes,
                "fused_over_hooks": _over_hooks(modes, "step_seconds_median"),
                "fused_over_hooks_cpu": _over_hooks(modes, "step_cpu_seconds_median"),
            }
        )
    return result


def _over_hooks(modes: dict[str, dict[str, Any]], key: str) -> float | None:
    fused, hooks = (modes[m].get(key) for m in ("fused", "hooks"))
    return round(fused / hooks, 3) if fused and hooks else None


def table(result: dict[str, Any]) -> str:
    rows = table_head(
        "device",
        "precision",
        "mode",
        "tokens/s",
        "samples/s",
        "step (s)",
        "time / plain",
        "step CPU (s)",
        "CPU / plain",
    )
    rows += mode_rows(
        result["cells"],
        MODES,
        lambda cell: [cell["device"], cell["precision"]],
        lambda m: [
            fmt(m.get("tokens_per_second"), 1),
            fmt(m.get("samples_per_second")),
            fmt(m.get("step_seconds_median"), 3),
            fmt(m.get("time_ratio")),
            fmt(m.get("step_cpu_seconds_median"), 3),
            fmt(m.get("cpu_ratio")),
        ],
    )
    rows += [
        f"\nfused / hooks, {c['device']} {c['precision']}: step time {fmt(c['fused_over_hooks'])}x"
        f", CPU time {fmt(c['fused_over_hooks_cpu'])}x"
        for c in result["cells"]
    ]
    grid, date = result["grid"], result.get("machine", {}).get("date", "?")
    return (
        f"### Causal-LM DP step ({result['model']}, {date}, batch {grid['batch_size']} x "
        f"{grid['seq_len']} tokens, median of {grid['steps']} steps; CPU: one torch thread)\n\n"
        + "\n".join(rows)
    )
