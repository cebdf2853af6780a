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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from transformers import AutoModelForSequenceClassification

from common.adapter import get_trainable, to_record
from common.config import resolve
from common.model import build_model, resolve_model_path
from simulations.bench import (
    bench_flat,
    even_split,
    fmt,
    model_overrides,
    read_metrics,
    review_sample,
    table_head,
    write_federation,
)
from simulations.simulate import run_flat

SITES, ROWS_PER_SITE, ROUNDS = 2, 40, 1
TARGET_RATIO = 250.0


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    work = out_dir / "work" / "traffic"
    shutil.rmtree(work, ignore_errors=True)
    train, test = review_sample(SITES * ROWS_PER_SITE, seed=0)
    data = write_federation(
        work / "data", even_split(train, SITES), test.head(40), prefix="hospital"
    )
    overrides = {
        **model_overrides(quick, out_dir),
        "federation.rounds": ROUNDS,
        "federation.min-train-nodes": SITES,
        "federation.min-available-nodes": SITES,
    }
    flat = bench_flat(data, work / "runs" / "traffic", overrides)
    rounds = [m for m in read_metrics(run_flat(flat, SITES)) if m["round"] > 0]
    sent = float(np.mean([m["bytes_sent"] for m in rounds])) / SITES
    received = float(np.mean([m["bytes_received"] for m in rounds])) / SITES

    cfg = resolve(flat)
    model = build_model(cfg, torch.device("cpu"))
    adapter = get_trainable(model)
    adapter_record = to_record(adapter).count_bytes()
    fp16_record = to_record({k: v.astype(np.float16) for k, v in adapter.items()}).count_bytes()
    full = AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model_path(cfg.model.name)), num_labels=len(cfg.data.label_names)
    )
    full_record = ArrayRecord(
        {k: p.detach().float().contiguous() for k, p in full.named_parameters()}
    ).count_bytes()
    non_array = sent + received - 3 * adapter_record  # config and metric records, measured
    lora_round = sent + received
    full_round = 3 * full_record + non_array
    fp16_round = 3 * fp16_record + non_array
    return {
        "benchmark": "traffic",
        "quick": quick,
        "model": cfg.model.name,
        "lora": {"rank": cfg.lora.rank, "target_modules": cfg.lora.target_modules},
        "clients": SITES,
        "rounds": len(rounds),
        "adapter_parameters": int(sum(v.size for v in adapter.values())),
        "model_parameters": int(sum(p.numel() for p in full.parameters())),
        "per_client_per_round": {
            "bytes_sent": sent,
            "bytes_received": received,
            "lora_total": lora_round,
            "full_fedavg_total": full_round,
            "lora_float16_total": fp16_round,
        },
        "record_bytes": {
            "adapter_float32": adapter_record,
            "adapter_float16": fp16_record,
            "full_model_float32": full_record,
        },
        "ratio_full_to_lora": round(full_round / lora_round, 1),
        "ratio_full_to_lora_float16": round(full_round / fp16_round, 1),
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
        f"| LoRA total, float16 tensors | {fmt(per['lora_float16_total'] / mib, 3)} "
        f"| {fmt(result['ratio_full_to_lora_float16'], 1)}x less |",
        f"| full-model FedAvg | {fmt(per['full_fedavg_total'] / mib, 1)} | 1x |",
    ]
    return (
        f"### Traffic ({result['adapter_parameters']:,} adapter parameters of "
        f"{result['model_parameters']:,}; target >= {result['target_ratio']:.0f}x less)\n\n"
        + "\n".join(rows)
    )
