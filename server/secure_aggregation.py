"""The server loop for ``aggregation.secure = true``: Flower's SecAgg+ instead of plain FedAvg.

Each round runs Flower's :class:`SecAggPlusWorkflow`: clients mask their quantised, weighted
adapters with pairwise and private masks; the server sums the masked vectors and removes the
masks with secret shares, so it only ever holds the weighted mean, never one institution's
adapter. Clients that drop out after sharing their keys are tolerated as long as every
client keeps ``aggregation.secure-threshold`` live neighbours.

Everything around the aggregation stays as in the plain loop: the same round statistics
(:class:`server.round_log.RoundStats`), federated evaluation through the plain strategy, and
central evaluation, checkpoints and ``metrics.jsonl`` through :class:`RoundRecorder`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from privatune.common.config import AggregationSettings, ConfigError, FederationSettings, RunConfig
from privatune.common.model.adapter import to_record
from privatune.common.protocol import (
    INSTITUTION,
    LEDGER_SEEN,
    NAMES_KEY,
    RUN_NAME,
    SERVER_ROUND,
)
from privatune.common.registry import STRATEGIES
from privatune.server.recorder import RoundRecorder
from privatune.server.round_log import RoundLog, RoundStats
from privatune.server.strategy import AdapterRounds, train_summary

log = logging.getLogger("flwr")


def check_secure(cfg: RunConfig) -> None:
    """Refuse what needs the individual updates that SecAgg+ hides from the server."""
    reasons = {
        'aggregation.mode = "exact" needs each client\'s B·A product': (
            cfg.aggregation.mode == "exact"
        ),
        f"aggregation.strategy = {cfg.aggregation.strategy!r} (not a weighted sum) "
        "needs individual updates": not STRATEGIES[cfg.aggregation.strategy].is_sum,
        "central-dp clips individual updates": cfg.central_dp.enabled,
        "federation.max-update-norm bounds individual updates": cfg.federation.max_update_norm > 0,
        "lora.client-ranks (mixed ranks) needs individual adapters": bool(
            cfg.lora.client_ranks.strip()
        ),
    }
    for reason, bad in reasons.items():
        if bad:
            raise ConfigError(f"aggregation.secure: {reason}, which SecAgg+ hides from the server")


def make_workflow(agg: AggregationSettings, timeout: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the configured shares, threshold and quantisation;
    Flower's own parameter checks become a one-line config error."""
    try:
        return SecAggPlusWorkflow(
            num_shares=agg.secure_shares,
            reconstruction_threshold=agg.secure_threshold,
            max_weight=agg.secure_max_weight,
            clipping_range=agg.secure_clipping_range,
            quantization_range=agg.secure_quantization_range,
            timeout=timeout or None,
        )
    except ValueError as e:
        raise ConfigError(f"aggregation.secure-*: {e}") from e


class SecureRounds(LegacyFedAvg):
    """The legacy strategy SecAgg+ drives: it samples nodes, sends the fit instructions (with
    the adapter's tensor names, which legacy parameters lack) and records what the server
    may see of a round: weights, scalar metrics, refusals and dropouts. The workflow has
    already replaced every reply's parameters by the unmasked weighted mean, so that mean
    is the round's result."""

    def __init__(
        self,
        fed: FederationSettings,
        run_name: str,
        names: list[str],
        log: RoundLog,
    ) -> None:
        super().__init__(
            fraction_fit=fed.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=fed.min_train_nodes,
            min_available_clients=fed.min_available_nodes,
            on_fit_config_fn=self._fit_config,
        )
        self.run_name = run_name
        self.names = names
        self.log = log
        self._sampled: set[int] = set()

    def _fit_config(self, server_round: int) -> dict[str, str | int]:
        return {
            RUN_NAME: self.run_name,
            SERVER_ROUND: self.log.run_round(server_round),
            NAMES_KEY: ",".join(self.names),
        }

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = [  # each with the ledger length its node last reported (ledger-seen)
            (
                proxy,
                FitIns(
                    ins.parameters, {**ins.config, LEDGER_SEEN: self.log.seen.get(proxy.node_id, 0)}
                ),
            )
            for proxy, ins in super().configure_fit(server_round, parameters, client_manager)
        ]
        self._sampled = {proxy.node_id for proxy, _ in instructions}
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        real_round = self.log.run_round(server_round)
        stats = self.log.at(server_round)
        for node in sorted(self._sampled - {proxy.node_id for proxy, _ in results}):
            self.log.fail(server_round, node, "dropped out of secure aggregation")
        trained = [
            res
            for proxy, res in results
            if self.log.reply(
                server_round, proxy.node_id, str(res.metrics.get(INSTITUTION, "?")), res.metrics
            )
            and res.num_examples > 0
        ]
        if not self.log.enough(server_round, len(trained), self.min_fit_clients):
            return None, {}
        mean = trained[0].parameters  # the workflow put the unmasked mean in every reply
        if not all(np.isfinite(a).all() for a in parameters_to_ndarrays(mean)):
            log.warning("round %d: secure aggregate not finite; adapter unchanged", real_round)
            return None, {}
        stats.train = train_summary([r.metrics for r in trained])
        return mean, dict(stats.train)


class CountingGrid:
    """The grid as the workflow sees it, counting each protocol message's bytes into the
    round's stats (SecAgg+ adds keys, shares and masked vectors to the adapter's traffic)."""

    def __init__(self, grid: Grid, stats: RoundStats) -> None:
        self.grid = grid
        self.stats = stats

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        self.stats.bytes_sent += sum(_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.stats.bytes_received += sum(_bytes(m.content) for m in replies if not m.has_error())
        return replies


def _bytes(content: RecordDict) -> int:
    """Bytes of a message's records; config records by their serialised size, since Flower's
    ``count_bytes`` rejects the empty strings that SecAgg+ replies carry (fit status)."""
    return sum(
        len(r.deflate()) if isinstance(r, ConfigRecord) else r.count_bytes()
        for r in content.values()
    )


def secure_round(
    workflow: SecAggPlusWorkflow,
    grid: Grid | CountingGrid,
    context: LegacyContext,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """One SecAgg+ round from ``arrays``; the same arrays back if the protocol halted (too
    few clients or live neighbours) or the strategy kept the adapter."""
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(list(arrays.values())), keep_input=True
    )
    workflow(grid, context)  # type: ignore[arg-type]  # only send_and_receive is used
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    result = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    return {name: np.asarray(v, np.float32) for name, v in zip(arrays, result, strict=True)}


def run_secure(
    grid: Grid,
    cfg: RunConfig,
    run_name: str,
    strategy: AdapterRounds,
    recorder: RoundRecorder,
    initial: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """All rounds through SecAgg+; returns the final adapter. ``strategy`` (the plain one)
    runs the federated evaluation and holds the round stats the recorder writes."""
    check_secure(cfg)
    fed = cfg.federation
    workflow = make_workflow(cfg.aggregation, fed.round_timeout)
    offset = strategy.log.offset
    legacy = SecureRounds(fed, run_name, list(initial), strategy.log)
    root = Context(grid.run.run_id, 0, {}, RecordDict(), {})
    rounds = ServerConfig(num_rounds=fed.rounds - offset)
    context = LegacyContext(root, rounds, legacy, SimpleClientManager())
    thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
    registered.wait()
    arrays = {k: np.asarray(v) for k, v in initial.items()}
    recorder(0, to_record(arrays))
    try:
        for server_round in range(1, fed.rounds - offset + 1):
            counting = CountingGrid(grid, strategy.log.at(server_round))
            arrays = secure_round(workflow, counting, context, server_round, arrays)
            evaluate_round(grid, strategy, server_round, arrays, run_name, fed.round_timeout)
            recorder(server_round, to_record(arrays))
    finally:
        stop.set()
        thread.join()
    return arrays


def evaluate_round(
    grid: Grid,
    strategy: AdapterRounds,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    run_name: str,
    timeout: float,
) -> None:
    """Federated evaluation of the new global adapter, exactly as in the plain loop (the
    strategy keeps the metrics and bytes in its round stats)."""
    config = ConfigRecord({RUN_NAME: run_name})
    messages = list(strategy.configure_evaluate(server_round, to_record(arrays), config, grid))
    if messages:
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
