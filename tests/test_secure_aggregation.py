"""Secure aggregation (Flower's SecAgg+) end to end in the simulation engine, tiny BERT, DP on.

Two recording mods bracket the SecAgg+ mod on every client: the inner one sees what the
institution's handler produced (the plain adapter), the outer one what crossed the wire.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from helpers import (
    checkpoint,
    handler_recorder,
    max_diff,
    plain_replies,
    quantisation_bound,
    simulate,
    weighted_mean,
)
from privatune.client.secure_aggregation import secure_aggregation_mod
from privatune.common.config import ConfigError, resolve
from privatune.common.model.adapter import get_trainable
from privatune.common.model.build import build_model
from privatune.common.privacy.audit import audit
from privatune.common.privacy.ledger import read_records
from privatune.server.secure_aggregation import check_secure, make_workflow
from privatune.simulations.simulate import resume


def wire_recorder(directory: str):
    """Outside the SecAgg+ mod: every train reply as sent (array count, all bytes values)."""

    def record(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            content = reply.content
            node = context.node_config["partition-id"]
            entry = {
                "arrays": sum(len(r) for r in content.array_records.values()),
                "configs": sorted(k for r in content.config_records.values() for k in r),
            }
            with open(Path(directory) / "wire.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            with open(Path(directory) / f"wire-{node}.bin", "ab") as f:
                for r in content.config_records.values():
                    for v in r.values():
                        for item in v if isinstance(v, list) else [v]:
                            f.write(item if isinstance(item, bytes) else b"")
        return reply

    return record


def drop_at_masked_vectors(partition: int):
    """One institution goes silent after sharing its keys, before sending its masked vector."""

    def drop(msg, context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if (
            context.node_config["partition-id"] == partition
            and configs is not None
            and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
        ):
            return Message(Error(code=2, reason="simulated dropout"), reply_to=msg)
        return call_next(msg, context)

    return drop


def secure_flat(tiny_flat: dict, rounds: int, min_train_nodes: int = 3) -> dict:
    return {
        **tiny_flat,
        "aggregation.secure": True,
        "aggregation.secure-max-weight": 100.0,  # > any institution's rows; finer weights
        "federation.rounds": rounds,
        "federation.min-train-nodes": min_train_nodes,
    }


def dp_count(run_dir: Path, name: str) -> int:
    """An institution's weight: the DP count of its training rows, as its ledger records it."""
    (count,) = [r.count for r in read_records(run_dir / "privacy" / f"{name}.jsonl")[1:2]]
    return count


# A fixed seed draws the same count noise at every institution (+0.77 rows, rounded to +1),
# so that the one with twice the rows keeps about twice the weight (testing only).
SAME_COUNT_NOISE = {"privacy.insecure-seed": 9}


@pytest.mark.simulation
def test_secure_rounds_aggregate_the_weighted_mean_and_hide_each_adapter(
    tiny_flat, federation_dir, reviews, tmp_path
):
    # Unequal weights: hospital-c has twice the rows of the others.
    reviews.iloc[200:280][["text", "label"]].to_csv(federation_dir / "hospital-c.csv", index=False)
    flat = {**secure_flat(tiny_flat, rounds=2), **SAME_COUNT_NOISE}
    cfg = resolve(flat)
    inner, outer = tmp_path / "inner", tmp_path / "outer"
    inner.mkdir(), outer.mkdir()
    mods = [wire_recorder(str(outer)), secure_aggregation_mod, handler_recorder(str(inner))]
    run_dir = simulate(flat, mods=mods)

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    initial = get_trainable(build_model(cfg, torch.device("cpu")))
    for server_round in (1, 2):
        arrays, weights = plain_replies(inner, server_round)
        expected = [dp_count(run_dir, f"hospital-{x}") for x in "abc"]
        assert sorted(weights) == sorted(expected) and max(weights) > 1.5 * min(weights)
        aggregate = checkpoint(cfg, run_dir, server_round)
        bound = quantisation_bound(cfg, weights)
        assert max_diff(aggregate, weighted_mean(arrays, weights)) <= bound
        assert max_diff(aggregate, weighted_mean(arrays, [1, 1, 1])) > 10 * bound
        line = lines[server_round]
        assert sorted(line["epsilon"]) == ["hospital-a", "hospital-b", "hospital-c"]
        assert line["train_loss"] is None  # DP on: no exact loss leaves an institution
        assert set(line["ledger_heads"]) == {"hospital-a", "hospital-b", "hospital-c"}
        assert not line["failed"] and line["bytes_received"] > 0
    assert max_diff(checkpoint(cfg, run_dir, 2), initial) > 0.01  # training moved the adapter

    # What left the institutions: no arrays, only protocol configs; no plain tensor bytes.
    entries = [json.loads(x) for x in (outer / "wire.jsonl").read_text().splitlines()]
    assert len(entries) == 3 * 2 * 4  # institutions x rounds x SecAgg+ stages
    assert all(e["arrays"] == 0 for e in entries)
    assert sum(Key.MASKED_PARAMETERS in e["configs"] for e in entries) == 3 * 2
    for node in range(3):
        wire = (outer / f"wire-{node}.bin").read_bytes()
        for path in inner.glob(f"{node}-round-*.npz"):
            for value in np.load(path).values():
                assert value.astype(np.float32).tobytes()[:64] not in wire


@pytest.mark.simulation
def test_a_dropout_below_the_threshold_still_yields_the_mean_of_the_others(tiny_flat, tmp_path):
    flat = secure_flat(tiny_flat, rounds=1, min_train_nodes=2)
    cfg = resolve(flat)
    inner = tmp_path / "inner"
    inner.mkdir()
    mods = [drop_at_masked_vectors(0), secure_aggregation_mod, handler_recorder(str(inner))]
    run_dir = simulate(flat, mods=mods)

    arrays, weights = plain_replies(inner, 1)
    assert len(arrays) == 2  # partition 0 never trained
    aggregate = checkpoint(cfg, run_dir, 1)
    assert max_diff(aggregate, weighted_mean(arrays, weights)) <= quantisation_bound(cfg, weights)
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert list(line["failed"].values()) == ["dropped out of secure aggregation"]
    assert len(line["epsilon"]) == 2


@pytest.mark.simulation
def test_refusing_institutions_take_part_with_zero_weight(
    tiny_flat, federation_dir, reviews, tmp_path
):
    """Fixed noise: the 32-row institutions would pass epsilon 4.5 and refuse; the one with
    twice the rows samples at half the rate, stays below it and trains. The refusals still
    finish the protocol (zeros of weight 0), so the aggregate is the one trained adapter."""
    reviews.iloc[200:280][["text", "label"]].to_csv(federation_dir / "hospital-c.csv", index=False)
    flat = {
        **secure_flat(tiny_flat, rounds=1, min_train_nodes=1),
        **SAME_COUNT_NOISE,
        "dp.noise-multiplier": 1.0,
        "privacy.max-epsilon": 4.5,
    }
    cfg = resolve(flat)
    inner = tmp_path / "inner"
    inner.mkdir()
    run_dir = simulate(flat, mods=[secure_aggregation_mod, handler_recorder(str(inner))])

    (arrays,), weights = plain_replies(inner, 1)
    assert weights == [dp_count(run_dir, "hospital-c")]
    assert max_diff(checkpoint(cfg, run_dir, 1), arrays) <= quantisation_bound(cfg, weights)
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert sorted(line["refused"]) == ["hospital-a", "hospital-b"] and not line["failed"]


@pytest.mark.simulation
def test_a_round_every_institution_refuses_keeps_the_adapter(tiny_flat, tmp_path):
    """Every reply has weight 0, so there is no mean to unmask: the round must end with the
    adapter unchanged and the refusals on record, not with a division by zero."""
    flat = {
        **secure_flat(tiny_flat, rounds=1, min_train_nodes=1),
        "dp.noise-multiplier": 1.0,
        "privacy.max-epsilon": 1.0,
    }
    cfg = resolve(flat)
    run_dir = simulate(flat, mods=[secure_aggregation_mod])

    initial = get_trainable(build_model(cfg, torch.device("cpu")))
    assert max_diff(checkpoint(cfg, run_dir, 1), initial) == 0
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert sorted(line["refused"]) == ["hospital-a", "hospital-b", "hospital-c"]
    assert not line["failed"] and line["train_loss"] is None


@pytest.mark.simulation
def test_a_resumed_secure_run_continues_the_round_numbers(tiny_flat):
    """One secure round, then the run resumed to two: only round 2 runs, the clients are
    told it is round 2 (their ledgers say so) and the audit holds. Fixed noise and a large
    budget: the noise planned for one round would spend the whole budget in it."""
    flat = {
        **secure_flat(tiny_flat, rounds=1),
        "dp.noise-multiplier": 1.0,
        "privacy.max-epsilon": 1000.0,
    }
    cfg = resolve(flat)
    run_dir = simulate(flat)
    # a run started before dp.grad-sample-mode existed resumes with its default
    stored = (run_dir / "config.toml").read_text()
    (run_dir / "config.toml").write_text(
        "\n".join(x for x in stored.splitlines() if "grad-sample-mode" not in x)
    )
    resume(run_dir, {"federation.rounds": 2})

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert sorted(lines[2]["epsilon"]) == ["hospital-a", "hospital-b", "hospital-c"]
    assert max_diff(checkpoint(cfg, run_dir, 2), checkpoint(cfg, run_dir, 1)) > 0
    for ledger in sorted((run_dir / "privacy").glob("*.jsonl")):
        trained = [r.round for r in read_records(ledger) if r.status == "trained"]
        assert trained == [1, 2]
    assert all(r.ok for r in audit(run_dir)), [r.problems for r in audit(run_dir)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"aggregation.mode": "exact"}, "aggregation.mode"),
        ({"aggregation.strategy": "krum"}, "'krum'"),
        ({"central-dp.enabled": True}, "central-dp"),
        ({"lora.client-ranks": "8,4"}, "lora.client-ranks"),
        ({"federation.max-update-norm": 1.0}, "federation.max-update-norm"),
    ],
)
def test_combinations_that_need_individual_updates_are_refused(override, message):
    cfg = resolve({"aggregation.secure": True, **override})
    with pytest.raises(ConfigError, match=message):
        check_secure(cfg)


def test_shares_and_threshold_are_checked_by_flower():
    agg = resolve({"aggregation.secure-shares": 3, "aggregation.secure-threshold": 3}).aggregation
    with pytest.raises(ConfigError, match="less than `num_shares`"):
        make_workflow(agg, 60.0)
