"""Strategies over LoRA adapter tensors, with the bookkeeping a private federation needs.

:class:`AdapterRounds` adds small steps around any of Flower's FedAvg-family strategies:
every training reply is validated before aggregation (:mod:`server.validation`),
privacy-budget refusals are counted and kept out of the aggregate, and each round's
per-institution epsilon, failures and message bytes go to the run's
:class:`~server.round_log.RoundLog`, which the recorder writes out. Aggregation itself stays
Flower's: weighted mean (FedAvg), coordinate median (FedMedian), trimmed mean
(FedTrimmedAvg), Krum or a server optimiser, chosen by ``aggregation.strategy``; the
LoRA-aware steps of ``aggregation.mode`` (exact B·A averaging, mixed ranks) come from
:mod:`server.lora_aggregation`. :class:`CentralDP` adds institution-level DP on the server
(equal weights, clipping, noise scaled to the updates actually aggregated) and keeps the
aggregator's own ledger. Local evaluation arrives as noised confusion matrices, whose sum
becomes the round's accuracy and macro-F1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAvg,
)
from privatune.common.config import AggregationSettings, FederationSettings
from privatune.common.model.adapter import adapter_rank, from_record, to_record
from privatune.common.model.evaluation import scores
from privatune.common.protocol import (
    CONFUSION,
    EPSILON,
    EVALUATED,
    INSTITUTION,
    LEDGER_SEEN,
    NUM_EXAMPLES,
    TRAIN_LOSS,
)
from privatune.common.registry import STRATEGIES, load
from privatune.server.lora_aggregation import exact_mean, rank_aware_padding
from privatune.server.round_log import RoundLog
from privatune.server.validation import InvalidUpdate, check_update

log = logging.getLogger("flwr")


def _institution(msg: Message) -> str:
    info = msg.content.config_records.get("info")
    if info and INSTITUTION in info:
        return str(info[INSTITUTION])
    return f"node-{msg.metadata.src_node_id}"


def reply_arrays(msg: Message) -> ArrayRecord:
    """The one array record of a reply (its adapter tensors)."""
    return next(iter(msg.content.array_records.values()))


def _replace_arrays(msg: Message, record: ArrayRecord) -> None:
    msg.content[next(iter(msg.content.array_records))] = record


def _metrics(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()), MetricRecord())


def _message_bytes(content: RecordDict) -> int:
    return sum(r.count_bytes() for r in content.values())


def train_summary(metrics: list[Mapping], weight_key: str = NUM_EXAMPLES) -> dict[str, float]:
    """The largest epsilon among the aggregated clients and, when every client released one
    (only without DP), the weighted mean train loss (the plain and the secure loop report
    the same numbers)."""
    out = {"epsilon-max": max(float(m[EPSILON]) for m in metrics)}
    if all(TRAIN_LOSS in m for m in metrics):
        total = sum(float(m[weight_key]) for m in metrics)
        out[TRAIN_LOSS] = sum(float(m[TRAIN_LOSS]) * float(m[weight_key]) for m in metrics) / total
    return out


def _train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    return MetricRecord(
        train_summary([next(iter(r.metric_records.values())) for r in records], weight_key)
    )


class AdapterRounds(FedAvg):
    """Validation and per-round bookkeeping around a FedAvg-family strategy (use through
    :func:`make_strategy`, which puts it in front of the chosen aggregator).

    Parameters
    ----------
    expected : mapping of tensor name to array
        The initial adapter; every reply must match its names and shapes exactly.
    max_update_norm : float
        L2 bound on one reply's difference from the current global adapter; 0 = none.
    mode : str
        ``aggregation.mode``: ``exact`` replaces the weighted mean of the LoRA tensors by
        :func:`~server.lora_aggregation.exact_mean`; ``fedavg`` and ``ffa`` keep Flower's.
    pads_ranks : bool
        Whether replies of a smaller LoRA rank are padded into the aggregate (mean-based
        strategies); a median or Krum cannot weigh them, so they are rejected instead.
    transport_dtype : str
        Precision of the adapter in the messages this strategy sends; the global adapter
        and every aggregation stay float32 (replies are widened on receipt).
    log : RoundLog
        The run's round log, shared with the recorder (and the SecAgg+ loop); it maps
        Flower's round numbers to the run's (a resumed run) for clients, ledgers and stats.
    **kwargs
        Passed to the Flower strategy (fractions, minimum nodes, ...).
    """

    def __init__(
        self,
        expected: Mapping[str, np.ndarray],
        max_update_norm: float = 0.0,
        log: RoundLog | None = None,
        mode: str = "fedavg",
        pads_ranks: bool = True,
        transport_dtype: str = "float32",
        **kwargs,
    ) -> None:
        super().__init__(train_metrics_aggr_fn=_train_metrics, **kwargs)
        self.log = log if log is not None else RoundLog()
        self.mode = mode
        self.pads_ranks = pads_ranks
        self.transport_dtype = transport_dtype
        self.global_arrays = {k: np.asarray(v) for k, v in expected.items()}
        self.max_update_norm = max_update_norm
        self._accepted: set[str] = set()  # message ids already validated and counted

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        run_round = self.log.run_round(server_round)  # what clients and ledgers see
        messages = self._on_the_wire(
            super().configure_train(run_round, arrays, config, grid), arrays
        )
        self.log.at(server_round).bytes_sent += sum(_message_bytes(m.content) for m in messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        run_round = self.log.run_round(server_round)
        messages = self._on_the_wire(
            super().configure_evaluate(run_round, arrays, config, grid), arrays
        )
        self.log.at(server_round).bytes_sent += sum(_message_bytes(m.content) for m in messages)
        return messages

    def _on_the_wire(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """The instructions with the adapter in the transport precision, cast once for all
        (the strategy's own state, a server optimiser's current arrays, keeps float32), and
        with the ledger length each node last reported, below which its ledger is refused."""
        messages = list(messages)
        if self.transport_dtype != "float32" and messages:
            wire = to_record(from_record(arrays), self.transport_dtype)
            for msg in messages:
                _replace_arrays(msg, wire)
        for msg in messages:
            config = ConfigRecord(dict(msg.content["config"]))
            config[LEDGER_SEEN] = self.log.seen.get(msg.metadata.dst_node_id, 0)
            msg.content["config"] = config
        return messages

    def _file(self, server_round: int, msg: Message, training: bool = True) -> bool:
        """Count a reply's bytes and file its scalars in the round log (see
        :meth:`RoundLog.reply`); False for a refused training round."""
        self.log.at(server_round).bytes_received += _message_bytes(msg.content)
        values = {**_metrics(msg), **msg.content.config_records.get("info", {})}
        who = _institution(msg)
        return self.log.reply(server_round, msg.metadata.src_node_id, who, values, training)

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that may be aggregated; everything else is logged and counted.
        A reply accepted before (a DP wrapper validates first, then clips and passes the
        replies back through :meth:`aggregate_train`) is not counted twice."""
        stats = self.log.at(server_round)
        accepted = []
        for msg in replies:
            if msg.metadata.message_id in self._accepted:
                accepted.append(msg)
                continue
            node = msg.metadata.src_node_id
            if msg.has_error():
                who = self.log.fail(server_round, node, str(msg.error.reason))
                log.warning("%s (node %d) failed: %s", who, node, stats.failed[who])
                continue
            if not self._file(server_round, msg):
                continue
            who = self.log.names[node]
            try:
                rank = check_update(msg, self.global_arrays, self.max_update_norm)
                if rank < self.full_rank and not self.pads_ranks:
                    raise InvalidUpdate(
                        f"LoRA rank {rank} < {self.full_rank}: a median or Krum needs "
                        "full-rank replies"
                    )
            except InvalidUpdate as e:
                stats.rejected[who] = str(e)
                log.warning("rejected update from %s (node %d): %s", who, node, e)
                continue
            stats.ranks[who] = rank
            if any(a.dtype != "float32" for a in reply_arrays(msg).values()):
                _replace_arrays(
                    msg, to_record(from_record(reply_arrays(msg)))
                )  # float32 from here on
            accepted.append(msg)
            self._accepted.add(msg.metadata.message_id)
        return accepted

    @property
    def full_rank(self) -> int:
        return adapter_rank(self.global_arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept(server_round, replies)
        if not self.log.enough(server_round, len(accepted), self.min_train_nodes):
            return None, None
        if self.mode == "exact":
            arrays, metrics = self.aggregate_exact(accepted)
        else:
            self.pad_ranks(accepted)
            arrays, metrics = super().aggregate_train(self.log.run_round(server_round), accepted)
        self.log.at(server_round).train = dict(metrics or {})
        return arrays, metrics

    def _weights(self, replies: list[Message]) -> list[float]:
        return [float(_metrics(m)[self.weighted_by_key]) for m in replies]

    def pad_ranks(self, replies: list[Message]) -> None:
        """Replace smaller-rank replies' arrays by their rank-aware padding, in place."""
        if all(adapter_rank(reply_arrays(m)) in (0, self.full_rank) for m in replies):
            return
        arrays = [from_record(reply_arrays(m)) for m in replies]
        padded = rank_aware_padding(arrays, self._weights(replies), self.global_arrays)
        for msg, values in zip(replies, padded, strict=True):
            _replace_arrays(msg, to_record(values))

    def aggregate_exact(self, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """Exact LoRA aggregation; the truncation's energy loss joins the train metrics."""
        arrays, lost = exact_mean(
            [from_record(reply_arrays(m)) for m in replies],
            self._weights(replies),
            self.global_arrays,
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        metrics["truncation-energy-lost"] = lost
        return to_record(arrays), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Accuracy and macro-F1 of the sum of the institutions' noised confusion matrices
        (post-processing of what DP released); institutions that release no evaluation
        (the default) send none."""
        stats = self.log.at(server_round)
        total = None
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.log.fail(server_round, node, str(msg.error.reason))
                continue
            self._file(server_round, msg, training=False)
            metrics = _metrics(msg)
            if metrics.get(EVALUATED):
                matrix = np.asarray(metrics[CONFUSION], dtype=float)
                total = matrix if total is None else total + matrix
        if total is None:
            return None
        k = math.isqrt(total.size)
        stats.evaluate = {**scores(total.reshape(k, k)), "num-examples": float(total.sum())}
        return MetricRecord(stats.evaluate)


def make_strategy(
    fed: FederationSettings,
    agg: AggregationSettings,
    expected: Mapping[str, np.ndarray],
    log: RoundLog | None = None,
) -> AdapterRounds:
    """``AdapterRounds`` in front of Flower's aggregator named by ``agg.strategy``, with
    that aggregator's own options and the LoRA-aware mode of ``agg.mode``."""
    spec = STRATEGIES[agg.strategy]
    base = load(spec.implementation)
    cls = (
        AdapterRounds
        if base is FedAvg
        else type(f"Adapter{base.__name__}", (AdapterRounds, base), {})
    )
    options = {keyword: getattr(agg, key) for keyword, key in spec.options.items()}
    return cls(
        expected,
        max_update_norm=fed.max_update_norm,
        log=log,
        mode=agg.mode,
        pads_ranks=spec.weighted_mean,
        transport_dtype=fed.transport_dtype,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=fed.min_train_nodes,
        min_available_nodes=fed.min_available_nodes,
        **options,
    )
