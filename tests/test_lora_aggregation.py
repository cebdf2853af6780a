"""LoRA-aware options: FFA-LoRA (A frozen at its shared seed, only B and the head travel),
exact averaging of B·A with SVD re-factoring, mixed ranks, server optimisers (FedAvgM,
FedAdam) and FedProx's proximal pull on the client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ADAPTER, good, reply, simulate, strategy_for
from privatune.client.train import train_round
from privatune.common.config import resolve
from privatune.common.data import load_labeled, tokenize
from privatune.common.model.adapter import from_record, get_trainable, to_record
from privatune.common.model.build import build_model
from privatune.common.model.hub import load_tokenizer
from privatune.server.lora_aggregation import exact_mean
from safetensors.numpy import load_file


@pytest.mark.simulation
def test_ffa_freezes_a_and_sends_only_b_and_head(tiny_flat):
    full = get_trainable(build_model(resolve(tiny_flat), torch.device("cpu")))
    flat = {
        **tiny_flat,
        "aggregation.mode": "ffa",
        "aggregation.strategy": "fedavgm",
        "aggregation.server-momentum": 0.5,
    }
    ffa = get_trainable(build_model(resolve(flat), torch.device("cpu")))
    assert set(ffa) == {k for k in full if "lora_A" not in k}
    simulate(flat)
    run_dir = resolve(flat).run.output_dir
    final = load_file(f"{run_dir}/test-run/adapter/adapter_model.safetensors")
    initial = build_model(resolve(flat), torch.device("cpu")).state_dict()
    a_keys = [k for k in final if "lora_A" in k]
    b_keys = [k for k in final if "lora_B" in k]
    for k in a_keys:  # A never moved: it is the seeded initialisation everywhere
        live = k.replace(".weight", ".default.weight")
        np.testing.assert_array_equal(final[k], initial[live].numpy())
    assert all(np.any(final[k] != 0) for k in b_keys)
    metrics = Path(run_dir) / "test-run" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    full_bytes = sum(v.nbytes for v in full.values())
    ffa_bytes = sum(v.nbytes for v in ffa.values())
    assert ffa_bytes < 0.6 * full_bytes
    # 3 training replies of B + head (plus small metric records) instead of full adapters
    assert 3 * ffa_bytes < lines[1]["bytes_received"] < 0.75 * 3 * full_bytes


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_server_optimisers_move_from_the_current_global(name):
    strategy = strategy_for(name, server_learning_rate=0.5)
    # What configure_train would have stored: the global adapter of this round.
    strategy.current_arrays = to_record(ADAPTER) if name == "fedavgm" else dict(ADAPTER)
    arrays, _ = strategy.aggregate_train(1, [reply(1, good(0.2)), reply(2, good(0.4))])
    result = from_record(arrays)
    plain = 0.3  # FedAvg's answer; a server optimiser takes its own step towards it
    assert all(np.all(np.isfinite(v)) for v in result.values())
    assert all(np.all(v > 0) and not np.allclose(v, plain) for v in result.values())


def test_proximal_term_keeps_the_update_closer_to_the_global_adapter(tiny_cfg, federation_dir):
    data = load_labeled(
        federation_dir / "hospital-a.csv", "text", "label", tiny_cfg.data.label_names
    )
    dataset = tokenize(data, load_tokenizer(tiny_cfg), tiny_cfg.model.max_length)
    drift = {}
    for mu in (0.0, 5.0):
        model = build_model(tiny_cfg, torch.device("cpu"))
        start = get_trainable(model)
        train_round(model, dataset, tiny_cfg, 0.5, torch.device("cpu"), seed=3, proximal_mu=mu)
        end = get_trainable(model)
        drift[mu] = sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start) ** 0.5
    assert 0 < drift[5.0] < drift[0.0]


A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
B = A.replace("lora_A", "lora_B")
HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def lora_adapter(rank: int, rng: np.random.Generator, out: int = 6, inp: int = 5) -> dict:
    return {
        A: rng.normal(size=(rank, inp)).astype(np.float32),
        B: rng.normal(size=(out, rank)).astype(np.float32),
        HEAD: rng.normal(size=(3, inp)).astype(np.float32),
    }


def test_exact_mean_is_the_mean_product_when_it_fits_the_rank():
    rng = np.random.default_rng(0)
    current = lora_adapter(4, rng)
    replies = [lora_adapter(2, rng), lora_adapter(2, rng)]  # mean of B·A has rank <= 4
    weights = [30.0, 10.0]
    arrays, lost = exact_mean(replies, weights, current)
    mean = (30 * replies[0][B] @ replies[0][A] + 10 * replies[1][B] @ replies[1][A]) / 40
    np.testing.assert_allclose(arrays[B] @ arrays[A], mean, atol=1e-5)
    assert lost == pytest.approx(0.0, abs=1e-10)
    head = (30 * replies[0][HEAD] + 10 * replies[1][HEAD]) / 40
    np.testing.assert_allclose(arrays[HEAD], head, rtol=1e-6)
    naive = np.average([r[B] for r in replies], axis=0, weights=weights) @ np.average(
        [r[A] for r in replies], axis=0, weights=weights
    )
    assert not np.allclose(naive, mean, atol=1e-3)  # what averaging A and B apart gives


def test_exact_mean_truncates_optimally_and_reports_the_energy_lost():
    rng = np.random.default_rng(1)
    current = lora_adapter(2, rng)
    replies = [lora_adapter(2, rng) for _ in range(3)]  # mean has rank up to 6 > 2
    arrays, lost = exact_mean(replies, [1.0, 1.0, 1.0], current)
    mean = torch.tensor(np.mean([r[B] @ r[A] for r in replies], axis=0), dtype=torch.float64)
    s = torch.linalg.svdvals(mean)  # an independent SVD: Eckart-Young's best rank-2 error
    expected = float((s[2:] ** 2).sum() / (s**2).sum())
    assert 0 < lost == pytest.approx(expected, rel=1e-6)
    residual = float(((mean.numpy() - arrays[B] @ arrays[A]) ** 2).sum() / (s**2).sum())
    assert residual == pytest.approx(expected, rel=1e-4)


def test_exact_mean_keeps_empty_directions_trainable():
    rng = np.random.default_rng(2)
    current = lora_adapter(4, rng)
    reply = {**lora_adapter(4, rng), B: np.zeros((6, 4), np.float32)}
    reply[B][:, 0] = 1.0  # B·A has rank 1: three of four directions carry nothing
    arrays, lost = exact_mean([reply], [1.0], current)
    assert lost == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(arrays[B] @ arrays[A], reply[B] @ reply[A], atol=1e-5)
    np.testing.assert_array_equal(arrays[B][:, 1:], 0.0)
    np.testing.assert_array_equal(arrays[A][1:], current[A][1:])  # not zero: B gets gradients


def test_mixed_ranks_average_each_component_over_the_institutions_that_hold_it():
    rng = np.random.default_rng(3)
    current = lora_adapter(4, rng)
    big, small = lora_adapter(4, rng), lora_adapter(2, rng)
    strategy = strategy_for("fedavg", adapter=current)
    arrays, _ = strategy.aggregate_train(1, [reply(1, big, n=30), reply(2, small, n=10)])
    result = from_record(arrays)
    both = (30 * big[A][:2] + 10 * small[A]) / 40
    np.testing.assert_allclose(result[A][:2], both, rtol=1e-5)
    np.testing.assert_allclose(result[A][2:], big[A][2:], rtol=1e-5)  # only rank 4 holds these
    np.testing.assert_allclose(result[B][:, :2], (30 * big[B][:, :2] + 10 * small[B]) / 40, 1e-5)
    np.testing.assert_allclose(result[B][:, 2:], big[B][:, 2:], rtol=1e-5)
    assert strategy.log.rounds[1].ranks == {"inst-1": 4, "inst-2": 2}


def test_median_and_krum_reject_smaller_ranks_and_mixed_ranks_are_rejected():
    rng = np.random.default_rng(4)
    current = lora_adapter(4, rng)
    strategy = strategy_for("fedmedian", adapter=current)
    replies = [reply(i, lora_adapter(4, rng)) for i in (1, 2)] + [reply(3, lora_adapter(2, rng))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and "a median or Krum" in strategy.log.rounds[1].rejected["inst-3"]
    mixed = {**lora_adapter(4, rng), A: rng.normal(size=(2, 5)).astype(np.float32)}
    fedavg = strategy_for("fedavg", adapter=current)
    fedavg.aggregate_train(1, [reply(1, lora_adapter(4, rng)), reply(2, mixed)])
    assert "LoRA ranks [2, 4]" in fedavg.log.rounds[1].rejected["inst-2"]


def test_exact_mode_only_with_a_weighted_mean():
    with pytest.raises(ValueError, match="exact"):
        strategy_for("krum", mode="exact")


def test_a_smaller_rank_shares_the_first_rows_of_a_and_the_scale(tiny_flat):
    flat = {**tiny_flat, "lora.rank": 4}
    cfg = resolve(flat)
    full = build_model(cfg, torch.device("cpu"))
    small = build_model(cfg, torch.device("cpu"), rank=2)
    full_a, small_a = get_trainable(full), get_trainable(small)
    for name in (k for k in full_a if "lora_A" in k):
        np.testing.assert_array_equal(small_a[name], full_a[name][:2])
    layer = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert small.get_submodule(layer).scaling == full.get_submodule(layer).scaling


@pytest.mark.simulation
def test_exact_mode_with_mixed_ranks_runs_a_federation(tiny_flat):
    flat = {
        **tiny_flat,
        "lora.rank": 4,
        "lora.client-ranks": "4,2,1",
        "aggregation.mode": "exact",
        "dp.enabled": False,
        "privacy.allow-non-private": True,
    }
    run_dir = simulate(flat)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = lines[1:]
    assert [sorted(x["ranks"].values()) for x in trained] == [[1, 2, 4]] * len(trained)
    # three updates of ranks 4 + 2 + 1 have a mean of rank up to 7: truncation to 4 loses some
    assert all(0 < x["truncation_energy_lost"] < 1 for x in trained)
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(np.any(final[k] != 0) for k in final if "lora_B" in k)
    assert "<h2>Aggregation</h2>" in (run_dir / "report.html").read_text()
