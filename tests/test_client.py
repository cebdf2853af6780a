"""One institution's train and evaluate handlers, called directly with real Flower messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from helpers import metadata
from privatune.client.app import DATA_FAILED, create_app
from privatune.client.train import train_round
from privatune.common.config import resolve
from privatune.common.data import load_labeled, tokenize
from privatune.common.model.adapter import get_trainable, to_record
from privatune.common.model.build import build_model
from privatune.common.model.hub import load_tokenizer
from privatune.common.privacy.ledger import Ledger, read_records
from privatune.common.protocol import error_reason

# a deployed node's own policy and schema
POLICY = {"max-delta": 1e-5, "accountants": "rdp", "labels": "negative,neutral,positive"}


def _message(cfg, kind: str, server_round: int = 1, arrays=None) -> Message:
    arrays = arrays or get_trainable(build_model(cfg, torch.device("cpu")))
    content = RecordDict(
        {
            "arrays": to_record(arrays),
            "config": ConfigRecord({"run-name": cfg.run.name, "server-round": server_round}),
        }
    )
    return Message(content=content, metadata=metadata(1, kind, src=0))


def ledger_of(cfg, name: str):
    return cfg.run.output_dir + f"/{cfg.run.name}/privacy/{name}.jsonl"


def _context(flat, partition_id=0, **node) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition_id, **node},
        state=RecordDict(),
        run_config=flat,
    )


def test_reply_holds_exactly_the_trainable_tensors_and_scalars(tiny_flat, tiny_cfg):
    app = create_app()
    reply = app(_message(tiny_cfg, "train"), _context(tiny_flat))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    model = build_model(tiny_cfg, torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sent = set(reply.content["arrays"].keys())
    assert sent == trainable
    assert all("lora_" in k or "classifier" in k for k in sent)
    assert not any("embeddings" in k for k in sent)
    metrics = reply.content["metrics"]
    # no train loss under DP: it is an exact statistic of the data that no epsilon covers
    assert set(metrics) == {
        "refused",
        "num-examples",
        "epsilon",
        "delta",
        "noise-multiplier",
        "steps",
    }
    assert 0 < metrics["epsilon"] < math.inf
    # the weight is the DP count of the 32 training rows, which the ledger records
    counted = [r for r in read_records(ledger_of(tiny_cfg, "hospital-a")) if r.status == "counted"]
    assert [r.count for r in counted] == [metrics["num-examples"]] and counted[0].count >= 1
    assert set(reply.content["info"]) == {"institution", "ledger-records", "ledger-head"}
    plain = app(
        _message(tiny_cfg, "train"),
        _context({**tiny_flat, "dp.enabled": False, "privacy.allow-non-private": True}),
    )
    assert "train-loss" in plain.content["metrics"]  # without DP nothing is claimed


def test_evaluate_releases_nothing_unless_the_institution_allows_a_noised_matrix(
    tiny_flat, tiny_cfg
):
    reply = create_app()(_message(tiny_cfg, "evaluate"), _context(tiny_flat, 1))
    assert dict(reply.content["metrics"]) == {"evaluated": 0}
    flat = {**tiny_flat, "privacy.local-eval-noise": 2.0, "dp.noise-multiplier": 1.0}
    m = create_app()(_message(tiny_cfg, "evaluate"), _context(flat, 1)).content["metrics"]
    assert m["evaluated"] == 1 and len(m["confusion"]) == 9 and 0 < m["epsilon"] < math.inf
    assert sum(m["confusion"]) != pytest.approx(8)  # noised: not the exact count of 8 rows


def test_bad_data_is_a_one_line_error_reply_without_data(tiny_flat, tiny_cfg, federation_dir):
    (federation_dir / "hospital-a.csv").write_text(
        "text,label\nfine review,positive\nbad,excellent\n"
    )
    reply = create_app()(_message(tiny_cfg, "train"), _context(tiny_flat))
    assert reply.has_error()
    # fixed text: no file name, value, row or column the data could change
    assert reply.error.reason == error_reason("hospital-a", DATA_FAILED)


def _dataset(cfg, path, rows):
    data = load_labeled(path, "text", "label", cfg.data.label_names)
    return tokenize(data.subset(np.arange(rows)), load_tokenizer(cfg), cfg.model.max_length)


def test_noise_zero_and_no_clipping_equals_plain_sgd(tiny_flat, federation_dir):
    flat = {
        **tiny_flat,
        "train.optimizer": "sgd",
        "train.learning-rate": 0.5,
        "dp.max-grad-norm": 1e9,
    }
    dp_cfg, plain_cfg = resolve(flat), resolve({**flat, "dp.enabled": False})
    data = _dataset(dp_cfg, federation_dir / "hospital-a.csv", 32)  # 4 full batches of 8
    cpu = torch.device("cpu")
    dp_model, plain_model, noisy_model = (build_model(dp_cfg, cpu) for _ in range(3))
    train_round(dp_model, data, dp_cfg, 0.0, cpu, seed=7, poisson_sampling=False)
    train_round(plain_model, data, plain_cfg, 0.0, cpu, seed=7, poisson_sampling=False)
    train_round(noisy_model, data, dp_cfg, 1.0, cpu, seed=7, poisson_sampling=False)
    dp_w, plain_w, noisy_w = map(get_trainable, (dp_model, plain_model, noisy_model))
    for name in plain_w:
        np.testing.assert_allclose(dp_w[name], plain_w[name], rtol=1e-4, atol=1e-6)
    changed = [name for name in plain_w if not np.allclose(noisy_w[name], plain_w[name], atol=1e-4)]
    assert len(changed) == len(plain_w)  # noise reaches every trainable tensor


def test_dp_round_reports_the_opacus_mechanism(tiny_cfg, federation_dir):
    data = _dataset(tiny_cfg, federation_dir / "hospital-b.csv", 40)
    model = build_model(tiny_cfg, torch.device("cpu"))
    before = get_trainable(model)
    result = train_round(model, data, tiny_cfg, 1.3, torch.device("cpu"), seed=1)
    assert result.mechanism.noise_multiplier == 1.3
    assert result.mechanism.sample_rate == pytest.approx(1 / 5)
    assert result.mechanism.steps == result.steps == 5
    after = get_trainable(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_small_budget_refuses_the_round_that_would_cross_it(
    tiny_flat, tiny_cfg, federation_dir, tmp_path
):
    """Node config sets the institution's own budget; the ledger never exceeds it."""
    from privatune.common.privacy.audit import audit

    ledger = tmp_path / "ledger" / "a.jsonl"
    Ledger.create(ledger, "hospital-a")
    node = {
        "institution": "hospital-a",
        "data-path": str(federation_dir / "hospital-a.csv"),
        "ledger-path": str(ledger),
        **POLICY,
        "max-epsilon": 7.0,
    }
    app = create_app()
    replies = []
    for rnd in (1, 2, 3):
        msg = _message(tiny_cfg, "train", server_round=rnd)
        replies.append(
            app(
                msg,
                Context(
                    run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=tiny_flat
                ),
            )
        )
    refused = [r.content["metrics"]["refused"] for r in replies]
    assert refused == [0, 1, 1]  # planned for 8 over 2 rounds: round 2 would cross 7
    assert all("arrays" not in r.content for r, x in zip(replies, refused, strict=True) if x)
    _, counted, *records = read_records(ledger)
    assert counted.status == "counted"  # the DP count of its rows, once
    assert [r.status for r in records] == ["trained" if not x else "refused" for x in refused]
    assert max(r.epsilon for r in records) <= 7.0
    (result,) = audit(ledger)
    assert result.ok and result.refused == refused.count(1)


def test_lifetime_budget_composes_across_runs(tiny_flat, federation_dir, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    Ledger.create(ledger, "hospital-b")
    node = {
        "institution": "hospital-b",
        "data-path": str(federation_dir / "hospital-b.csv"),
        "ledger-path": str(ledger),
        **POLICY,
        "max-epsilon": 100.0,
    }
    eps = []
    for run in ("study-1", "study-2"):
        flat = {**tiny_flat, "run.name": run, "dp.noise-multiplier": 1.5}
        msg = _message(resolve(flat), "train", server_round=1)
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
        eps.append(create_app()(msg, ctx).content["metrics"]["epsilon"])
    from opacus.accountants import RDPAccountant

    _, counted, first, second = read_records(ledger)  # one count for both runs: same data
    assert counted.status == "counted" and first.sample_rate == second.sample_rate
    acc = RDPAccountant()
    acc.history = [(1.5, first.sample_rate, first.steps * 2), (20.0, 1.0, 1)]
    assert eps[1] > eps[0]
    assert eps[1] == pytest.approx(acc.get_epsilon(tiny_flat["dp.delta"]), rel=1e-9)
