"""The server's side of a round, with crafted replies: hostile or broken updates are dropped,
budget refusals are counted, the federation goes on with the rest, robust aggregators and
central DP plug in, and the aggregator's own ledger audits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Error, Message
from helpers import ADAPTER, good, metadata, reply, strategy_for
from privatune.common.model.adapter import from_record
from privatune.common.privacy.audit import audit
from privatune.common.protocol import error_reason
from privatune.server.central_dp import CentralDP
from privatune.server.recorder import summary


def hostile() -> dict[str, dict]:
    name = next(iter(ADAPTER))
    nan = good(0.1)
    nan[name][0, 0] = np.nan
    shape = good(0.1)
    shape[name] = np.zeros((4, 2), np.float32)
    extra = {
        **good(0.1),
        "base_model.model.bert.embeddings.word_embeddings.weight": np.zeros((5, 4), np.float32),
    }
    return {"nan": nan, "shape": shape, "extra": extra, "norm": good(1e6)}


@pytest.mark.parametrize("kind", ["nan", "shape", "extra", "norm", "negative-count", "ints"])
def test_hostile_update_is_rejected_and_the_adapter_stays_finite(kind):
    strategy = strategy_for("fedavg", max_update_norm=100.0)
    bad = {
        **{k: reply(9, v) for k, v in hostile().items()},
        "negative-count": reply(9, good(0.1), n=-5),
        "ints": reply(9, {k: v.astype(np.int64) for k, v in ADAPTER.items()}),
    }[kind]
    arrays, _ = strategy.aggregate_train(1, [reply(1, good(0.2)), reply(2, good(0.4)), bad])
    result = from_record(arrays)
    assert all(np.all(np.isfinite(v)) for v in result.values())
    assert all(np.allclose(v, 0.3) for v in result.values())  # mean of the two good ones
    assert list(strategy.log.rounds[1].rejected) == ["inst-9"]


def test_too_few_valid_updates_leave_the_adapter_unchanged():
    strategy = strategy_for("fedavg")
    arrays, metrics = strategy.aggregate_train(1, [reply(1, good(0.2)), reply(2, hostile()["nan"])])
    assert arrays is None and metrics is None


def test_refusals_and_failures_are_counted_and_the_round_goes_on():
    strategy = strategy_for("fedavg")
    failed = Message(
        Error(code=2, reason=error_reason("clinic-7", "data.csv: no rows")), metadata=metadata(7)
    )
    replies = [
        reply(1, good(0.2), n=10),
        reply(2, good(0.5), n=30),
        reply(3, None, n=0, refused=1, eps=3.9),
        failed,
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert all(np.allclose(v, 0.425) for v in from_record(arrays).values())  # weighted 1:3
    stats = strategy.log.rounds[1]
    assert stats.refused == ["inst-3"] and stats.epsilon["inst-3"] == 3.9
    assert stats.failed == {"clinic-7": "data.csv: no rows"}
    assert metrics["epsilon-max"] == 1.0


def test_a_failing_node_is_named_by_institution_in_the_progress_line():
    """A reason that names no institution falls back to the name the node replied with
    before, then to its node id; the progress line names each with its reason."""
    strategy = strategy_for("fedavg")
    strategy.aggregate_train(1, [reply(1, good(0.2)), reply(2, good(0.4))])
    broken = [
        Message(Error(code=2, reason="dropped out"), metadata=metadata(node)) for node in (2, 9)
    ]
    strategy.aggregate_train(2, [reply(1, good(0.2)), *broken])
    failed = strategy.log.rounds[2].failed
    assert failed == {"inst-2": "dropped out", "node-9": "dropped out"}
    line = {
        "round": 2,
        "refused": [],
        "rejected": {},
        "failed": failed,
        "bytes_sent": 0,
        "bytes_received": 0,
        "seconds": 1.0,
    }
    assert "dropped: inst-2 (dropped out); node-9 (dropped out)" in summary(line, 2)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_aggregators_resist_one_outlier(name):
    strategy = strategy_for(name)
    replies = [reply(i, good(v)) for i, v in enumerate([0.1, 0.2, 0.3, 0.25, 50.0], start=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert all(np.all(np.abs(v) < 1.0) for v in from_record(arrays).values())


def test_unknown_aggregation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"aggregation\.strategy"):
        strategy_for("fedsomething")


def test_central_dp_clips_adds_noise_and_keeps_an_auditable_ledger(tmp_path):
    inner = strategy_for("fedavg")
    ledger = tmp_path / "privacy" / "aggregator.jsonl"
    dp = CentralDP(inner, 1.0, 0.5, ledger_path=ledger, run_id="r", delta=1e-5)
    for rnd in (1, 2):
        arrays, _ = dp.aggregate_train(
            rnd, [reply(1, good(0.2)), reply(2, good(0.4)), reply(3, hostile()["shape"])]
        )
        values = np.concatenate([v.ravel() for v in from_record(arrays).values()])
        assert np.all(np.isfinite(values)) and not np.allclose(values, 0.3)  # noised
    (result,) = audit(ledger)
    assert result.ok and result.rounds == 2 and 0 < result.epsilon_claimed < math.inf
    assert inner.log.rounds[1].rejected == {"inst-3": inner.log.rounds[1].rejected["inst-3"]}
