"""The round log: what the server saw of each round, written by the strategy (and the
SecAgg+ loop), read by the recorder that writes ``metrics.jsonl``. One object per run, owned
by the server app and handed to each of them. Every loop files a reply through
:meth:`RoundLog.reply` and asks :meth:`RoundLog.enough` before it aggregates, so the plain,
central-DP and SecAgg+ rounds keep the same books and the same min-nodes gate.

Flower's loop counts rounds from 1 at every start; a resumed run has ``offset`` rounds behind
it. :meth:`RoundLog.run_round` is the one place that turns one numbering into the other:
writers index the log with Flower's round, clients, ledgers and ``metrics.jsonl`` see the
run's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from privatune.common.protocol import EPSILON, LEDGER_HEAD, LEDGER_RECORDS, REFUSED, reason_parts

log = logging.getLogger("flwr")


@dataclass
class RoundStats:
    """What happened in one round, as seen by the server."""

    bytes_sent: int = 0
    bytes_received: int = 0
    epsilon: dict[str, float] = field(default_factory=dict)  # institution -> cumulative eps
    refused: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # institution -> reason
    failed: dict[str, str] = field(default_factory=dict)  # institution (or node-N) -> reason
    ranks: dict[str, int] = field(default_factory=dict)  # institution -> LoRA rank sent
    ledger_heads: dict[str, tuple[int, str]] = field(default_factory=dict)  # anchors for audit
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)

    def note(self, who: str, values: Mapping) -> None:
        """What every reply carries for the round log: cumulative epsilon, ledger head."""
        if EPSILON in values:
            self.epsilon[who] = float(values[EPSILON])
        if LEDGER_HEAD in values:
            self.ledger_heads[who] = (int(values[LEDGER_RECORDS]), str(values[LEDGER_HEAD]))


def dropped(line: Mapping) -> dict[str, str]:
    """Who a ``metrics.jsonl`` line left out of the aggregate and why (failed or rejected),
    by institution name: for the progress line, the report and ``privatune summary``."""
    return {**line.get("rejected", {}), **line.get("failed", {})}


@dataclass
class RoundLog:
    offset: int = 0  # rounds done before this start (a resumed run)
    rounds: dict[int, RoundStats] = field(default_factory=dict)  # by the run's round
    names: dict[int, str] = field(default_factory=dict)  # node id -> institution, once seen
    seen: dict[int, int] = field(default_factory=dict)  # node id -> ledger records it reported

    def run_round(self, flower_round: int) -> int:
        return flower_round + self.offset

    def at(self, flower_round: int) -> RoundStats:
        """The stats of Flower's round ``flower_round``, created on first use."""
        return self.rounds.setdefault(self.run_round(flower_round), RoundStats())

    def fail(self, flower_round: int, node: int, reason: str) -> str:
        """Record a node's failure under its institution's name (from the reason, which
        clients write as ``"<institution>: <fixed text>"``, or from an earlier reply), so
        that the progress line, the report and the audit name who failed; returns the name."""
        name, text = reason_parts(reason)
        who = name or self.names.get(node, f"node-{node}")
        self.at(flower_round).failed[who] = text
        return who

    def reply(
        self, flower_round: int, node: int, who: str, values: Mapping, training: bool = True
    ) -> bool:
        """File one reply's scalars (epsilon, ledger head and length) under its institution;
        False when the institution refused to train this round (its privacy budget): such a
        reply carries no update to aggregate. A refused evaluation is no training refusal."""
        if LEDGER_RECORDS in values:
            self.seen[node] = int(values[LEDGER_RECORDS])
        self.names[node] = who
        stats = self.at(flower_round)
        stats.note(who, values)
        if training and values.get(REFUSED):
            stats.refused.append(who)
            log.warning("%s refused round %d (privacy budget)", who, self.run_round(flower_round))
            return False
        return True

    def enough(self, flower_round: int, updates: int, minimum: int) -> bool:
        """Whether a round has the ``federation.min-train-nodes`` updates it needs; if not,
        the adapter stays as it was, and the log says so."""
        if updates >= max(1, minimum):
            return True
        log.warning(
            "round %d: %d valid update(s), fewer than min-train-nodes %d; adapter unchanged",
            self.run_round(flower_round),
            updates,
            minimum,
        )
        return False
