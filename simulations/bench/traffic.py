"""Traffic: bytes sent and received per client per round, measured on the messages of a real
federation (the server counts every message's records with Flower's ``count_bytes``), against
what full-model FedAvg of the same base model would move.

The full-model side is measured the same way: the whole model (base and head) is packed into
an ``ArrayRecord`` and counted. A FedAvg round moves the weights three times per client
(train instruction, train reply, evaluate instruction), so its per-client round is three such
records plus the same small config and metric records the adapter run measured. The float16
row counts the adapter record with its tensors cast to float16 (a possible transport option,
not one privatune uses yet).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from privatune.common.config import Scalar, resolve
from privatune.common.model.adapter import get_trainable, to_record
from privatune.common.model.build import build_model
from privatune.common.model.hub import resolve_model_path
from privatune.common.protocol import read_lines
from privatune.simulations.bench.shared import (
    bench_flat,
    even_split,
    fmt,
    model_overrides,
    review_sample,
    table_head,
    write_federation,
)
from privatune.simulations.simulate import run_flat
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification

SITES, ROWS_PER_SITE, ROUNDS, QUICK_ROUNDS = 2, 40, 3, 1
TARGET_RATIO = 250.0
DTYPES = ("float32", "float16")


def federation(flat: Mapping[str, Scalar]) -> dict[str, Any]:
    """Bytes per client per round as the server counted them, final scores and adapter."""
    run_dir = run_flat(flat, SITES)
    metrics = read_lines(run_dir)
    rounds = [m for m in metrics if m["round"] > 0]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    return {
        "bytes_sent": float(np.mean([m["bytes_sent"] for m in rounds])) / SITES,
        "bytes_received": float(np.mean([m["bytes_received"] for m in rounds])) / SITES,
        "accuracy": metrics[-1]["central_accuracy"],
        "macro_f1": metrics[-1]["central_macro_f1"],
        "adapter": adapter,
    }


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    work = out_dir / "work" / "traffic"
    shutil.rmtree(work, ignore_errors=True)
    train, test = review_sample(SITES * ROWS_PER_SITE, seed=0)
    data = write_federation(
        work / "data", even_split(train, SITES), test.head(40), prefix="hospital"
    )
    overrides = {
        **model_overrides(quick, out_dir),
        "federation.rounds": QUICK_ROUNDS if quick else ROUNDS,
        "federation.min-train-nodes": SITES,
        "federation.min-available-nodes": SITES,
    }
    runs = {
        dtype: federation(
            bench_flat(
                data,
                work / "runs" / dtype,
                {**overrides, "federation.transport-dtype": dtype, "privacy.insecure-seed": 0},
            )
        )
        for dtype in DTYPES
    }
    flat = bench_flat(data, work / "runs" / "float32", overrides)
    cfg = resolve(flat)
    model = build_model(cfg, torch.device("cpu"))
    adapter = get_trainable(model)
    adapter_record = to_record(adapter).count_bytes()
    fp16_record = to_record(adapter, "float16").count_bytes()
    full = AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model_path(cfg.model.name)), num_labels=len(cfg.data.label_names)
    )
    full_record = ArrayRecord(
        {k: p.detach().float().contiguous() for k, p in full.named_parameters()}
    ).count_bytes()
    lora, fp16 = runs["float32"], runs["float16"]
    lora_round = lora["bytes_sent"] + lora["bytes_received"]
    fp16_round = fp16["bytes_sent"] + fp16["bytes_received"]
    non_array = lora_round - 3 * adapter_record  # config and metric records, measured
    full_round = 3 * full_record + non_array
    a, b = lora.pop("adapter"), fp16.pop("adapter")
    drift = float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))
    size = float(np.sqrt(sum(np.sum(a[k] ** 2) for k in a)))
    return {
        "benchmark": "traffic",
        "quick": quick,
        "model": cfg.model.name,
        "lora": {"rank": cfg.lora.rank, "target_modules": cfg.lora.target_modules},
        "clients": SITES,
        "rounds": cfg.federation.rounds,
        "adapter_parameters": int(sum(v.size for v in adapter.values())),
        "model_parameters": int(sum(p.numel() for p in full.parameters())),
        "per_client_per_round": {
            "bytes_sent": lora["bytes_sent"],
            "bytes_received": lora["bytes_received"],
            "lora_total": lora_round,
            "full_fedavg_total": full_round,
            "float16_bytes_sent": fp16["bytes_sent"],
            "float16_bytes_received": fp16["bytes_received"],
            "lora_float16_total": fp16_round,
        },
        "record_bytes": {
            "adapter_float32": adapter_record,
            "adapter_float16": fp16_record,
            "full_model_float32": full_record,
        },
        "ratio_full_to_lora": round(full_round / lora_round, 1),
        "ratio_full_to_lora_float16": round(full_round / fp16_round, 1),
        "float16_effect": {
            "accuracy": {"float32": lora["accuracy"], "float16": fp16["accuracy"]},
            "macro_f1": {"float32": lora["macro_f1"], "float16": fp16["macro_f1"]},
            "final_adapter_relative_difference": drift / size if size else 0.0,
        },
        "target_ratio": TARGET_RATIO,
        "meets_target": full_round / lora_round >= TARGET_RATIO,
    }


def table(result: dict[str, Any]) -> str:
    per = result["per_client_per_round"]
    mib = 2**20
    rows = [
        *table_head("per client per round", "MiB", "vs full-model FedAvg"),
        f"| LoRA, sent by server (measured) | {fmt(per['bytes_sent'] / mib, 3)} | |",
        f"| LoRA, received by server (measured) | {fmt(per['bytes_received'] / mib, 3)} | |",
        f"| LoRA total | {fmt(per['lora_total'] / mib, 3)} "
        f"| {fmt(result['ratio_full_to_lora'], 1)}x less |",
        f"| LoRA total, transport-dtype float16 (measured) "
        f"| {fmt(per['lora_float16_total'] / mib, 3)} "
        f"| {fmt(result['ratio_full_to_lora_float16'], 1)}x less |",
        f"| full-model FedAvg | {fmt(per['full_fedavg_total'] / mib, 1)} | 1x |",
    ]
    effect = result["float16_effect"]
    rows.append(
        f"\nfloat16 vs float32 transport after {result['rounds']} rounds: test accuracy "
        f"{fmt(effect['accuracy']['float16'], 3)} vs {fmt(effect['accuracy']['float32'], 3)}, "
        f"macro-F1 {fmt(effect['macro_f1']['float16'], 3)} vs "
        f"{fmt(effect['macro_f1']['float32'], 3)}, final adapters differ by "
        f"{effect['final_adapter_relative_difference']:.2e} (relative L2)"
    )
    return (
        f"### Traffic ({result['adapter_parameters']:,} adapter parameters of "
        f"{result['model_parameters']:,}; target >= {result['target_ratio']:.0f}x less)\n\n"
        + "\n".join(rows)
    )
