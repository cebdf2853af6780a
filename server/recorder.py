"""What the server writes after every round: the global adapter checkpoint, one line of
``metrics.jsonl`` and a one-line summary in the log.

It is passed to ``Strategy.start`` as the ``evaluate_fn`` hook, which Flower calls once before
the first round and once after each round with the current global adapter; that is the one
point where the round's outcome is complete. Centralised evaluation on the held-out test set
happens here too, when one is configured.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from peft import PeftModel
from privatune.common.model.adapter import from_record, save_adapter, set_trainable
from privatune.common.model.evaluation import evaluate_matrix
from privatune.common.model.top_layers import TopLayers
from privatune.common.protocol import MetricsLine, append_line
from privatune.server.round_log import RoundLog, dropped
from torch.utils.data import TensorDataset

log = logging.getLogger("flwr")
# Held while a round's checkpoint and metrics line are written: a process that stops on a
# signal (simulations.simulate) takes it first, so both or neither are on disk.
WRITES = threading.Lock()


def _finite(value: float) -> float | None:
    """JSON has no infinity; a non-private epsilon is written as null."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None


class RoundRecorder:
    def __init__(
        self,
        run_dir: Path,
        model: PeftModel,
        log: RoundLog,
        num_labels: int,
        device: torch.device,
        test_set: TensorDataset | None,
        total_rounds: int,
    ) -> None:
        self.run_dir = run_dir
        self.model = model
        self.log = log
        self.num_labels = num_labels
        self.device = device
        self.test_set = test_set
        self.total_rounds = total_rounds
        self.round_started = time.monotonic()
        self.confusion: np.ndarray | None = None  # of the last central evaluation
        # The test set's pooled embeddings (train.probe-rounds), evaluated instead of a pass
        # through the encoder while every LoRA B is zero: the adapter then changes nothing,
        # so the head sees exactly these features.
        self.embedded_test_set: TensorDataset | None = None
        # The test set's output of the frozen lower layers (lora.layers), scored by the top
        # layers alone: the full model's logits (common.model.top_layers) at a fraction of
        # the cost.
        self.top_test_set: TensorDataset | None = None
        self.top_start = 0
        self.sinks: list[Callable[[MetricsLine], None]] = []  # e.g. server.tracking's MLflow

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and self.log.offset:
            return None  # a resumed run: its starting point is already on record
        server_round = self.log.run_round(server_round)
        set_trainable(self.model, from_record(arrays))
        evaluated = time.monotonic()
        central: dict[str, float] = {}
        if self.test_set is not None:
            scorer, test_set = self.model, self.test_set
            if self.embedded_test_set is not None and adapter_is_zero(self.model):
                test_set = self.embedded_test_set
            elif self.top_test_set is not None:
                scorer, test_set = TopLayers(self.model, self.top_start), self.top_test_set
            central, self.confusion = evaluate_matrix(
                scorer, test_set, self.num_labels, self.device
            )
        central_seconds = time.monotonic() - evaluated
        stats = self.log.rounds.get(server_round)
        line: MetricsLine = {
            "round": server_round,
            "train_loss": stats.train.get("train-loss") if stats else None,
            "eval_loss": stats.evaluate.get("loss") if stats else None,
            "accuracy": stats.evaluate.get("accuracy") if stats else None,
            "macro_f1": stats.evaluate.get("macro-f1") if stats else None,
            "central_loss": central.get("loss"),
            "central_accuracy": central.get("accuracy"),
            "central_macro_f1": central.get("macro-f1"),
            "epsilon_max": _finite(max(stats.epsilon.values()))
            if stats and stats.epsilon
            else None,
            "epsilon": {k: _finite(v) for k, v in sorted(stats.epsilon.items())} if stats else {},
            "refused": stats.refused if stats else [],
            "rejected": stats.rejected if stats else {},
            "failed": stats.failed if stats else {},
            "bytes_sent": stats.bytes_sent if stats else 0,
            "bytes_received": stats.bytes_received if stats else 0,
            "ranks": stats.ranks if stats else {},
            "ledger_heads": stats.ledger_heads if stats else {},
            "truncation_energy_lost": stats.train.get("truncation-energy-lost") if stats else None,
            "central_eval_seconds": round(central_seconds, 3),
            "seconds": round(time.monotonic() - self.round_started, 2),
        }
        with WRITES:
            if server_round > 0:
                save_adapter(self.model, self.run_dir / "checkpoints" / f"round-{server_round:03d}")
            append_line(self.run_dir, line)
        for sink in self.sinks:
            sink(line)
        log.info("%s", summary(line, self.total_rounds))
        self.round_started = time.monotonic()
        return MetricRecord({k: v for k, v in central.items() if k != "num-examples"}) or None


def adapter_is_zero(model: PeftModel) -> bool:
    """Whether every LoRA B of ``model`` is zero: its adapter then adds nothing to any layer."""
    found = False
    for name, p in model.named_parameters():
        if "lora_B" in name:
            found = True
            if bool(p.detach().any()):
                return False
    return found


def summary(line: dict, total_rounds: int) -> str:
    """One human line per round, e.g. for ``make run``'s progress."""

    def fmt(key: str, label: str, digits: int = 3) -> str:
        value = line.get(key)
        return f"{label} {value:.{digits}f}" if isinstance(value, float) else f"{label} -"

    parts = [
        f"[privatune] round {line['round']}/{total_rounds}",
        fmt("central_accuracy", "test acc"),
        fmt("central_macro_f1", "test F1"),
        fmt("accuracy", "local acc"),
        fmt("train_loss", "train loss"),
        fmt("epsilon_max", "eps max", 2),
        f"{line['bytes_sent'] + line['bytes_received']:,} B",
        f"{line['seconds']:.1f} s",
    ]
    if line["refused"]:
        parts.append(f"refused: {', '.join(line['refused'])}")
    if left_out := dropped(line):
        parts.append("dropped: " + "; ".join(f"{who} ({why})" for who, why in left_out.items()))
    return " | ".join(parts)
