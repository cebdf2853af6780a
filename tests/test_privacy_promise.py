"""The privacy promise against an honest-but-curious aggregator (docs/threat-model.md): each
test plays the attack a reviewer demonstrated on an earlier version and shows it now fails."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from helpers import metadata, reply
from opacus.data_loader import DPDataLoader
from privatune.client.app import CONFIG_FAILED, LEDGER_FAILED, create_app, local_data
from privatune.client.institution import Institution
from privatune.client.train import train_round
from privatune.common.config import ConfigError, resolve
from privatune.common.data import DataError, tokenize
from privatune.common.model.adapter import from_record, get_trainable, set_trainable, to_record
from privatune.common.model.build import build_model
from privatune.common.model.hub import load_tokenizer
from privatune.common.privacy.accounting import Mechanism, epsilon, sample_rate, steps_per_epoch
from privatune.common.privacy.audit import audit, audit_ledger
from privatune.common.privacy.ledger import Ledger, LedgerError, read_records, record_hash, spent
from privatune.common.protocol import error_reason
from privatune.server.central_dp import CentralDP
from privatune.server.round_log import RoundLog
from privatune.server.strategy import make_strategy
from privatune.simulations.simulate import preflight, run_flat
from torch.utils.data import DataLoader, TensorDataset

CPU = torch.device("cpu")


def _train_msg(cfg, server_round=1, arrays=None) -> Message:
    arrays = arrays or get_trainable(build_model(cfg, CPU))
    content = RecordDict(
        {
            "arrays": to_record(arrays),
            "config": ConfigRecord({"run-name": cfg.run.name, "server-round": server_round}),
        }
    )
    return Message(content=content, metadata=metadata(1, "train", src=0))


def _ctx(flat, **node) -> Context:
    node = {"partition-id": 0, **node}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=flat)


def _flat(tiny_flat, **extra):
    return {**tiny_flat, "dp.noise-multiplier": 1.0, "privacy.max-epsilon": 1000.0, **extra}


# --- 1. the server cannot predict the noise -----------------------------------------------


def test_server_replaying_every_seed_it_knows_cannot_remove_the_noise(tiny_flat):
    """The server knows run.seed, the round, the institution's name, the data (worst case)
    and the model: it replays the round with the seed an earlier version derived from them.
    The residual stays as large as the noise; two identical requests release different
    adapters."""
    flat = _flat(tiny_flat)
    cfg = resolve(flat)
    start = get_trainable(build_model(cfg, CPU))
    app = create_app()
    released = [
        from_record(app(_train_msg(cfg, arrays=start), _ctx(flat)).content["arrays"])
        for _ in range(2)
    ]
    names = list(released[0])
    diff = math.sqrt(sum(float(np.sum((released[0][k] - released[1][k]) ** 2)) for k in names))
    assert diff > 0  # identical request, different release

    site = Institution.from_context(_ctx(flat), cfg, cfg.run.name)
    _, train_set, _ = local_data(site)
    data = tokenize(train_set, load_tokenizer(cfg), cfg.model.max_length)
    old_seed = cfg.run.seed * 1_000_003 + 1 * 1009 + zlib.crc32(b"hospital-a") % 997
    for seed in (old_seed, cfg.run.seed, 0):
        replay = build_model(cfg, CPU)
        set_trainable(replay, start)
        train_round(replay, data, cfg, 1.0, CPU, seed=seed)
        guess = get_trainable(replay)
        residual = math.sqrt(sum(float(np.sum((released[0][k] - guess[k]) ** 2)) for k in names))
        assert residual > 0.3 * diff, seed  # subtracting the replay leaves noise-sized error


def test_fixed_seed_is_a_node_local_testing_switch_that_the_audit_flags(tiny_flat):
    flat = _flat(tiny_flat, **{"privacy.insecure-seed": 3})
    cfg = resolve(flat)
    start = get_trainable(build_model(cfg, CPU))
    outs = []
    for run in ("a", "b"):
        f = {**flat, "run.name": f"seeded-{run}"}
        out = create_app()(_train_msg(cfg, arrays=start), _ctx(f))
        outs.append(from_record(out.content["arrays"]))
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])  # reproducible
    (result,) = audit(Path(cfg.run.output_dir) / cfg.run.name / "privacy" / "hospital-a.jsonl")
    assert not result.ok and any("predictable" in p for p in result.problems)


# --- 2. nothing exact leaves ------------------------------------------------------------


def test_crafted_head_learns_nothing_from_a_dp_reply(tiny_flat):
    """The reviewer's attack: a head with bias [30, 0, 0] and learning rate 0 turned the
    exact train loss into the share of labels other than 0. Under DP no loss is released,
    and the default node releases no evaluation of any adapter the server sends."""
    flat = _flat(tiny_flat, **{"train.learning-rate": 0.0, "train.head-learning-rate": 0.0})
    cfg = resolve(flat)
    arrays = get_trainable(build_model(cfg, CPU))
    bias = next(k for k in arrays if "classifier" in k and k.endswith("bias"))
    arrays[bias] = np.array([30.0, 0.0, 0.0], dtype=np.float32)
    train = create_app()(_train_msg(cfg, arrays=arrays), _ctx(flat))
    assert not {"train-loss", "loss", "accuracy"} & set(train.content["metrics"])
    msg = _train_msg(cfg, arrays=arrays)
    msg = Message(content=msg.content, metadata=metadata(1, "evaluate", src=0))
    evaluation = create_app()(msg, _ctx(flat))
    assert dict(evaluation.content["metrics"]) == {"evaluated": 0}


def test_local_evaluation_is_noised_accounted_and_refused_once_the_budget_is_spent(tiny_flat):
    flat = _flat(tiny_flat, **{"privacy.local-eval-noise": 2.0, "privacy.max-epsilon": 6.0})
    cfg = resolve(flat)
    app = create_app()
    replies = []
    for rnd in range(1, 12):
        msg = _train_msg(cfg, rnd)
        msg = Message(content=msg.content, metadata=metadata(1, "evaluate", src=0))
        replies.append(dict(app(msg, _ctx(flat)).content["metrics"]))
    evaluated = [r for r in replies if r["evaluated"]]
    assert evaluated and evaluated[0]["confusion"] != evaluated[1]["confusion"]  # fresh noise
    assert replies[-1] == {"evaluated": 0, "refused": 1}
    _, *records = read_records(f"{cfg.run.output_dir}/{cfg.run.name}/privacy/hospital-a.jsonl")
    assert [r.status for r in records[: len(evaluated)]] == ["evaluated"] * len(evaluated)
    assert all(r.epsilon <= 6.0 for r in records)
    assert epsilon([Mechanism(2.0, 1.0, 1)] * len(evaluated), cfg.dp.delta) == pytest.approx(
        records[len(evaluated) - 1].epsilon
    )


# --- 3. the institution owns its privacy parameters --------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("privacy.max-epsilon", math.nan, "max-epsilon must be a finite number"),
        ("privacy.max-epsilon", math.inf, "max-epsilon must be a finite number"),
        ("privacy.max-epsilon", -1.0, "max-epsilon must be a finite number"),
        ("dp.delta", 0.9, "dp.delta 0.9 exceeds max-delta"),
        ("dp.delta", 0.0, "'dp.delta' must lie in"),
        ("dp.accountant", "gdp", "'dp.accountant' must be one of rdp, prv"),
        ("train.optimizer", "adam", "'train.optimizer' must be one of adamw, sgd"),
        ("dp.enabled", False, "requires DP"),
    ],
)
def test_bad_privacy_values_are_one_line_errors_before_ray_starts(tiny_flat, key, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        preflight({**tiny_flat, key: value})
    assert "\n" not in str(e.value)


@pytest.mark.simulation
def test_a_missing_central_test_file_is_one_line_before_ray_starts(tiny_flat, tmp_path):
    missing = tmp_path / "nowhere" / "test.csv"
    with pytest.raises(DataError, match=r"test\.csv: data\.test-path: file not found") as e:
        run_flat({**tiny_flat, "data.test-path": str(missing)}, 2)
    assert "\n" not in str(e.value)


def test_cli_refuses_a_nan_budget_in_one_line_without_starting_ray(tmp_path):
    privatune = Path(sys.executable).parent / "privatune"
    out = subprocess.run(
        [str(privatune), "simulate", "--set", "privacy.max-epsilon=nan"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "max-epsilon" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before preparing anything


def test_deployed_node_without_its_own_policy_refuses(tiny_flat, federation_dir, tmp_path):
    cfg = resolve(tiny_flat)
    node = {"institution": "hospital-a", "data-path": str(federation_dir / "hospital-a.csv")}
    out = create_app()(_train_msg(cfg), _ctx(tiny_flat, **node))
    assert out.has_error() and out.error.reason == error_reason("hospital-a", CONFIG_FAILED)
    with pytest.raises(ConfigError, match="lacks ledger-path, max-epsilon, max-delta"):
        Institution.from_context(_ctx(tiny_flat, **node), cfg, "r")  # in the node's log
    ledger = tmp_path / "l.jsonl"
    node.update({"ledger-path": str(ledger), "max-epsilon": 8.0, "max-delta": 1e-5})
    node.update(accountants="rdp", labels=tiny_flat["data.labels"])
    out = create_app()(_train_msg(cfg), _ctx(tiny_flat, **node))
    assert out.has_error() and out.error.reason == error_reason("hospital-a", LEDGER_FAILED)
    with pytest.raises(LedgerError, match="privatune ledger init"):  # never silently new
        Ledger(ledger)
    Ledger.create(ledger, "hospital-a")
    # the server asks for delta 1e-3 and the PRV accountant: the node's policy says no
    for key, value in (("dp.delta", 1e-3), ("dp.accountant", "prv")):
        out = create_app()(_train_msg(cfg), _ctx({**tiny_flat, key: value}, **node))
        assert out.has_error() and key in out.error.reason
    ok = create_app()(_train_msg(cfg), _ctx({**tiny_flat, "privacy.max-epsilon": 1e6}, **node))
    assert not ok.has_error() and read_records(ledger)[-1].max_epsilon == 8.0  # node's, not run's


# --- 5. one mechanism for check and record -----------------------------------------------


@pytest.mark.parametrize("k", [93, 99, 105, 117, 16, 5])
def test_planned_schedule_is_the_loader_opacus_runs(k):
    for n in (k * 16, k * 16 - 7):
        rows = TensorDataset(torch.arange(n))
        loader = DPDataLoader.from_data_loader(DataLoader(rows, batch_size=16))
        assert steps_per_epoch(n, 16) == len(loader)
        assert sample_rate(n, 16) == 1 / len(loader)


def test_budget_check_and_ledger_record_the_same_mechanism(tiny_flat, reviews, tmp_path):
    """n = 93 x 4 rows at batch 4: Opacus runs 92 steps at recorded rate 1/92; the check,
    the ledger and the audit all use exactly that, so a round that passes the check never
    fails the audit."""
    data = tmp_path / "big-federation"
    data.mkdir()
    n = 93 * 4
    reviews.iloc[: round(n / 0.8)][["text", "label"]].to_csv(data / "big.csv", index=False)
    (data / "manifest.json").write_text(json.dumps({"institutions": ["big"]}))
    flat = {**tiny_flat, "data.dir": str(data), "train.batch-size": 4, "federation.rounds": 1}
    cfg = resolve(flat)
    out = create_app()(_train_msg(cfg), _ctx(flat))
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    m = out.content["metrics"]
    n_train = int(m["num-examples"])
    assert m["steps"] == steps_per_epoch(n_train, 4)
    ledger = f"{cfg.run.output_dir}/{cfg.run.name}/privacy/big.jsonl"
    rec = read_records(ledger)[-1]
    assert rec.sample_rate == sample_rate(n_train, 4) and rec.steps == m["steps"]
    assert rec.epsilon <= cfg.privacy.max_epsilon
    (result,) = audit(ledger)
    assert result.ok, result.problems


# --- 6. ledgers fail closed ---------------------------------------------------------------


def _trained_ledger(tiny_flat, rounds=2):
    """A ledger after ``rounds`` rounds, and the anchors the server recorded from the replies."""
    flat = _flat(tiny_flat)
    cfg = resolve(flat)
    app = create_app()
    anchors = []
    for rnd in range(1, rounds + 1):
        out = app(_train_msg(cfg, rnd), _ctx(flat))
        info = out.content["info"]
        anchors.append((rnd, int(info["ledger-records"]), str(info["ledger-head"])))
    path = Path(cfg.run.output_dir) / cfg.run.name / "privacy" / "hospital-a.jsonl"
    return flat, cfg, path, {"hospital-a": anchors}


def test_truncated_or_deleted_ledger_makes_the_node_refuse(tiny_flat):
    flat, cfg, path, _ = _trained_ledger(tiny_flat)
    site = Institution.from_context(_ctx(flat), cfg, cfg.run.name)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # the last round deleted: chain still valid
    out = create_app()(_train_msg(cfg, 3), _ctx(flat))
    assert out.has_error() and out.error.reason == error_reason("hospital-a", LEDGER_FAILED)
    with pytest.raises(LedgerError, match="shorter than the last known head"):
        Ledger(path, site.signing_key, site.anchor_path)
    path.unlink()  # the whole ledger gone: no silent fresh budget
    out = create_app()(_train_msg(cfg, 3), _ctx(flat))
    assert out.has_error() and out.error.reason == error_reason("hospital-a", LEDGER_FAILED)
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(path, site.signing_key, site.anchor_path)


def test_rewritten_and_rehashed_ledger_is_caught(tiny_flat):
    """epsilon and steps rewritten and the chain re-hashed: the signature fails; re-signed
    with the institution's own key and a fresh anchor, the server's anchors catch it."""
    _, _, path, anchors = _trained_ledger(tiny_flat)
    assert audit_ledger(path, anchors).ok
    records = [json.loads(x) for x in path.read_text().splitlines()]
    prev, history = records[0]["hash"], []
    for rec in records[1:]:  # half the sample rate, epsilon consistent with it
        rate = rec["sample_rate"] / 2
        history.append(Mechanism(rec["noise_multiplier"], rate, rec["steps"]))
        rec.update(sample_rate=rate, epsilon=epsilon(history, rec["delta"]), prev_hash=prev)
        rec["hash"] = prev = record_hash(rec)
    assert all(r["sample_rate"] > 0 for r in records[1:])  # every record really changed
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    with pytest.raises(LedgerError, match=r"record \d+ .*signature does not verify"):
        Ledger(path)
    assert not audit_ledger(path, anchors).ok

    # The institution itself re-signs a rewritten ledger from scratch and rewrites its anchor.
    site = Institution.from_context(_ctx(_flat(tiny_flat)), resolve(tiny_flat), "test-run")
    path.unlink()
    site.anchor_path.unlink()
    forged = Ledger.create(path, "hospital-a", site.signing_key, site.anchor_path)
    for rec in records[1:]:
        fields = {k: v for k, v in rec.items() if k not in ("format", "prev_hash", "hash")}
        fields.pop("signature")
        fields.pop("public_key")
        forged.append(**fields)
    assert Ledger(path, site.signing_key, site.anchor_path).head[0] == len(records)  # no tell
    assert audit_ledger(path).ok  # nor can an audit of the ledger alone
    result = audit_ledger(path, anchors)
    assert not result.ok and any("the server recorded head" in p for p in result.problems)


def test_two_processes_cannot_spend_the_same_budget(tmp_path):
    """The lock is held from the budget check to the append: the second holder sees the
    first's record before it decides, and both records chain (unique temporary names)."""
    path = tmp_path / "l.jsonl"
    Ledger.create(path, "a")
    step = Mechanism(1.0, 0.5, 10)
    budget = epsilon([step], 1e-5) * 1.01  # room for one round, not two
    outcomes = []

    def spend():
        with Ledger.locked(path) as ledger:
            history = spent(ledger.records)
            ok = epsilon([*history, step], 1e-5) <= budget
            time.sleep(0.3)  # the round trains while the lock is held
            ledger.append(
                institution="a",
                run_id="r",
                round=1,
                time="",
                status="trained" if ok else "refused",
                noise_multiplier=1.0,
                sample_rate=0.5,
                steps=10 if ok else 0,
                max_grad_norm=1.0,
                delta=1e-5,
                accountant="rdp",
                max_epsilon=budget,
                epsilon=epsilon([*history, step] if ok else history, 1e-5),
                noise_source="os-csprng",
                data_fingerprint="",
                adapter_fingerprint="",
            )
            outcomes.append(ok)

    threads = [threading.Thread(target=spend) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False, True]
    assert [r.status for r in Ledger(path).records[1:]].count("trained") == 1
    assert not list(tmp_path.glob("*.tmp"))


# --- 4. central DP means what it says -----------------------------------------------------


def _central(tmp_path, noise=1e-9, offset=0, strategy="fedavg"):
    flat = {
        "aggregation.strategy": strategy,
        "federation.min-train-nodes": 1,
        "central-dp.enabled": True,
        "central-dp.clipping-norm": 1.0,
        "central-dp.noise-multiplier": noise,
    }
    cfg = resolve(flat)
    adapter = {"a": np.zeros(4, np.float32)}
    inner = make_strategy(cfg.federation, cfg.aggregation, adapter, RoundLog(offset))
    return CentralDP(inner, noise, 1.0, tmp_path / "aggregator.jsonl", "run", 1e-5)


def test_central_dp_weights_equally_and_scales_noise_to_the_updates_aggregated(tmp_path):
    dp = _central(tmp_path)
    big = reply(1, {"a": np.full(4, 10.0, np.float32)}, n=1000)  # clipped to norm 1
    small = reply(2, {"a": np.zeros(4, np.float32)}, n=1)
    refusal = reply(3, None, refused=1)
    arrays, _ = dp.aggregate_train(1, [big, small, refusal])
    moved = np.linalg.norm(from_record(arrays)["a"])
    assert moved == pytest.approx(0.5, rel=1e-6)  # C/m with m = 2 updates, not weighted 1000:1
    rec = Ledger(tmp_path / "aggregator.jsonl").records[-1]
    assert "2 equally weighted" in rec.mechanism and rec.round == 1


def test_central_dp_noise_has_the_claimed_std_for_any_number_of_updates(tmp_path):
    dp = _central(tmp_path, noise=2.0)
    dp.adapter.global_arrays = {"a": np.zeros(20000, np.float32)}
    replies = [reply(i, {"a": np.zeros(20000, np.float32)}) for i in range(1, 5)]
    arrays, _ = dp.aggregate_train(1, replies)
    assert np.std(from_record(arrays)["a"]) == pytest.approx(2.0 * 1.0 / 4, rel=0.03)


def test_central_dp_refuses_strategies_it_cannot_account_and_resumes_in_run_rounds(tmp_path):
    for bad in ({"aggregation.strategy": "fedadam"}, {"aggregation.mode": "exact"}):
        with pytest.raises(ConfigError, match="central-dp"):
            resolve({"central-dp.enabled": True, **bad})
    dp = _central(tmp_path, noise=1.0, offset=3)
    dp.aggregate_train(1, [reply(1, {"a": np.ones(4, np.float32)}), reply(2, None, refused=1)])
    assert Ledger(tmp_path / "aggregator.jsonl").records[-1].round == 4
    # the round log too: refusals, epsilons and train stats all under the run's round 4
    assert list(dp.adapter.log.rounds) == [4]
    stats = dp.adapter.log.rounds[4]
    assert stats.refused == ["inst-2"] and set(stats.epsilon) == {"inst-1", "inst-2"}
    assert stats.train["epsilon-max"] > 0
    assert audit_ledger(tmp_path / "aggregator.jsonl").ok


# --- audit -----------------------------------------------------------------------------------


def test_audit_checks_status_refusals_and_delta(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = Ledger.create(path, "a")
    base = dict(
        institution="a",
        run_id="r",
        time="",
        noise_multiplier=1.0,
        sample_rate=0.5,
        max_grad_norm=1.0,
        accountant="rdp",
        max_epsilon=100.0,
        noise_source="os-csprng",
        data_fingerprint="",
        adapter_fingerprint="",
    )
    ledger.append(**base, round=1, status="refused", steps=5, delta=1e-5, epsilon=0.0)
    ledger.append(**base, round=2, status="refused", steps=0, delta=0.9, epsilon=0.0)
    problems = audit_ledger(path).problems
    assert any("record 2" in p and "refused round records 5 steps" in p for p in problems)
    assert any("record 3" in p and "delta 0.9" in p for p in problems)
    with pytest.raises(LedgerError, match="not a release"):
        ledger.append(**base, round=3, status="bogus", steps=0, delta=1e-5, epsilon=0.0)


def test_a_finished_run_is_never_overwritten_one_line_before_ray_starts(tiny_flat):
    from privatune.server.resume import ResumeError

    cfg = resolve(tiny_flat)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(ResumeError, match=r"already holds a run; choose another run\.name") as e:
        preflight(tiny_flat)
    assert "\n" not in str(e.value)
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 0}\n'
    with pytest.raises(ResumeError, match="no run to resume"):
        preflight({**tiny_flat, "run.resume": True, "run.name": "never-ran"})
