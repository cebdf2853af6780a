"""AdapterFedAvg: Flower's FedAvg over LoRA adapter tensors, with the bookkeeping a private
federation needs.

It only adds small steps around FedAvg's own: every training reply is validated before
aggregation (see :mod:`server.validation`), privacy-budget refusals are counted and kept out
of the average, and each round's per-institution epsilon, failures and message bytes are kept
in :attr:`rounds` for the run recorder. Aggregation itself is FedAvg's weighted mean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.validation import InvalidUpdate, check_update

log = logging.getLogger("flwr")


@dataclass
class RoundStats:
    """What happened in one round, as seen by the server."""

    bytes_sent: int = 0
    bytes_received: int = 0
    epsilon: dict[str, float] = field(default_factory=dict)  # institution -> cumulative eps
    refused: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # node or institution -> reason
    failed: dict[str, str] = field(default_factory=dict)  # node -> client error
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)


def _institution(msg: Message) -> str:
    info = msg.content.config_records.get("info")
    return (
        str(info["institution"])
        if info and "institution" in info
        else f"node-{msg.metadata.src_node_id}"
    )


def _message_bytes(content: RecordDict) -> int:
    return sum(r.count_bytes() for r in content.values())


def _train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean train loss and the largest epsilon among the aggregated clients."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    loss = sum(float(m["train-loss"]) * float(m[weight_key]) for m in metrics) / total
    return MetricRecord(
        {"train-loss": loss, "epsilon-max": max(float(m["epsilon"]) for m in metrics)}
    )


class AdapterFedAvg(FedAvg):
    """FedAvg on the trainable adapter tensors only.

    Parameters
    ----------
    expected : mapping of tensor name to shape
        The adapter layout every reply must match exactly.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (fractions, minimum nodes).
    """

    def __init__(self, expected: Mapping[str, tuple[int, ...]], **kwargs) -> None:
        super().__init__(train_metrics_aggr_fn=_train_metrics, **kwargs)
        self.expected = dict(expected)
        self.rounds: dict[int, RoundStats] = {}

    def _stats(self, server_round: int) -> RoundStats:
        return self.rounds.setdefault(server_round, RoundStats())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._stats(server_round).bytes_sent += sum(_message_bytes(m.content) for m in messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._stats(server_round).bytes_sent += sum(_message_bytes(m.content) for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self._stats(server_round)
        accepted = []
        for msg in replies:
            if msg.has_error():
                stats.failed[f"node-{msg.metadata.src_node_id}"] = str(msg.error.reason)
                log.warning("node %d failed: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            stats.bytes_received += _message_bytes(msg.content)
            who = _institution(msg)
            metrics = next(iter(msg.content.metric_records.values()), {})
            if "epsilon" in metrics:
                stats.epsilon[who] = float(metrics["epsilon"])
            if metrics.get("refused"):
                stats.refused.append(who)
                log.warning("%s refused round %d (privacy budget)", who, server_round)
                continue
            try:
                check_update(msg, self.expected)
            except InvalidUpdate as e:
                stats.rejected[who] = str(e)
                log.warning(
                    "rejected update from %s (node %d): %s", who, msg.metadata.src_node_id, e
                )
                continue
            accepted.append(msg)
        if len(accepted) < max(1, self.min_train_nodes if self.fraction_train else 0):
            log.warning(
                "round %d: %d valid update(s), fewer than min-train-nodes %d; adapter unchanged",
                server_round,
                len(accepted),
                self.min_train_nodes,
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        stats.train = dict(metrics or {})
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        stats = self._stats(server_round)
        stats.bytes_received += sum(_message_bytes(m.content) for m in replies if not m.has_error())
        metrics = super().aggregate_evaluate(server_round, replies)
        stats.evaluate = dict(metrics or {})
        return metrics
