"""Central DP: the aggregator's own Gaussian mechanism on the clipped sum of institutions'
updates (client-level DP), put in front of ``AdapterRounds`` and accounted in the
aggregator's ledger (``privacy/aggregator.jsonl``), which ``privatune audit`` verifies like
an institution's."""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
)
from privatune.common.model.adapter import adapter_fingerprint, from_record, to_record
from privatune.common.privacy.accounting import Mechanism, epsilon
from privatune.common.privacy.ledger import NOISE_FROM_OS, Ledger, spent
from privatune.server.strategy import AdapterRounds, reply_arrays

log = logging.getLogger("flwr")


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Institution-level DP added by the server, with the aggregator's own ledger (the same
    signed, hash-chained format as the institutions', so ``privatune audit`` verifies it).

    Each accepted update (reply minus the global adapter) is clipped to L2 norm C, the
    clipped updates are summed with equal weights (reported example counts do not weigh
    them), Gaussian noise of std z·C is added to the sum, and the result is divided by m, the
    number of updates actually aggregated after refusals and rejections. One institution
    therefore moves the released mean by at most C/m against noise of std z·C/m: a Gaussian
    mechanism of noise multiplier z whatever m turns out to be, accounted without sampling
    amplification (sample rate 1), one step per round, in the run's round numbering. Noise
    comes from a generator seeded by the operating system's CSPRNG. FedAvg's mean only:
    :meth:`common.config.RunConfig` refuses other strategies, ``exact`` and mixed ranks.
    """

    def __init__(
        self,
        strategy: AdapterRounds,
        noise_multiplier: float,
        clipping_norm: float,
        ledger_path: Path,
        run_id: str,
        delta: float,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients=1)
        self.adapter = strategy
        path = Path(ledger_path)
        self.ledger = Ledger(path) if path.exists() else Ledger.create(path, "aggregator")
        self.run_id = run_id
        self.delta = delta

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        adapter = self.adapter
        run_round = adapter.log.run_round(server_round)
        accepted = adapter.accept(server_round, replies)
        if not adapter.log.enough(server_round, len(accepted), adapter.min_train_nodes):
            return None, None
        current = adapter.global_arrays
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in current.items()}
        for msg in accepted:
            reply = from_record(reply_arrays(msg))
            update = {k: reply[k].astype(np.float64) - current[k] for k in current}
            norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
            factor = min(1.0, self.clipping_norm / max(norm, 1e-12))
            for k, u in update.items():
                total[k] += factor * u
        rng = np.random.default_rng(secrets.randbits(128))
        std, m = self.noise_multiplier * self.clipping_norm, len(accepted)
        released = {
            k: (current[k] + (t + rng.normal(0.0, std, t.shape)) / m).astype(np.float32)
            for k, t in total.items()
        }
        metrics = adapter.train_metrics_aggr_fn(
            [msg.content for msg in accepted], adapter.weighted_by_key
        )
        adapter.log.at(server_round).train = dict(metrics)
        step = Mechanism(self.noise_multiplier, 1.0, 1)
        self.ledger.release(
            "trained",
            step,
            epsilon([*spent(self.ledger.records), step], self.delta),
            institution="aggregator",
            run_id=self.run_id,
            round=run_round,
            time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            mechanism=f"gaussian, clipped sum of {m} equally weighted updates (client-level DP)",
            max_grad_norm=self.clipping_norm,
            delta=self.delta,
            accountant="rdp",
            max_epsilon=math.inf,
            noise_source=NOISE_FROM_OS,
            data_fingerprint="",
            adapter_fingerprint=adapter_fingerprint(released),
        )
        return to_record(released), metrics
