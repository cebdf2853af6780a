"""The classifier's federation options on the causal-LM track (issue #18): FFA-LoRA, exact
B·A averaging, a robust strategy, a server optimiser, SecAgg+, resume, mixed ranks and
central DP, each run with the tiny random Llama through Flower's simulation engine on real
MedMCQA instructions. A recording mod keeps every institution's plain reply, so each
aggregate is checked against what the replies say it must be."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    checkpoint,
    handler_recorder,
    llm_flat,
    make_tiny_flat,
    max_diff,
    plain_replies,
    quantisation_bound,
    simulate,
    weighted_mean,
)
from privatune.client.secure_aggregation import secure_aggregation_mod
from privatune.common.config import resolve
from privatune.common.model.adapter import get_trainable
from privatune.common.model.build import build_model
from privatune.common.privacy.audit import audit
from privatune.common.privacy.ledger import read_records
from privatune.common.protocol import read_lines
from privatune.simulations.bench.shared import write_federation
from privatune.simulations.simulate import resume
from safetensors.numpy import load_file

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def medmcqa_dir(tmp_path_factory) -> Path:
    """Three hospitals of real MedMCQA instructions, the third with twice the rows of the
    others (unequal weights), and 30 test questions; shared by every federation here."""
    from privatune.simulations.prepare import load_medmcqa_qa

    train, test = load_medmcqa_qa(42)
    parts = [train.iloc[:24], train.iloc[24:48], train.iloc[48:96]]
    root = tmp_path_factory.mktemp("medmcqa")
    return write_federation(root / "data", parts, test.head(30), prefix="hospital")


@pytest.fixture()
def flat(tiny_llama_dir, medmcqa_dir, tmp_path) -> dict:
    """One DP round of the tiny Llama over the three hospitals, as ``llm_run`` trains."""
    return {
        **make_tiny_flat(tiny_llama_dir, medmcqa_dir, tmp_path),
        **llm_flat(tiny_llama_dir),
        "train.batch-size": 8,
        "train.learning-rate": 0.05,
        "federation.rounds": 1,
    }


def run_recorded(flat: dict, tmp_path: Path, secure: bool = False) -> tuple[Path, Path]:
    """The federation, with every institution's plain reply recorded (inside the SecAgg+
    mod when ``secure``); returns the run folder and the recordings' folder."""
    inner = tmp_path / "replies"
    inner.mkdir()
    mods = [secure_aggregation_mod] if secure else []
    return simulate(flat, mods=[*mods, handler_recorder(str(inner))]), inner


def initial_adapter(flat: dict) -> dict[str, np.ndarray]:
    return get_trainable(build_model(resolve(flat), CPU))


@pytest.mark.simulation
def test_ffa_keeps_each_lora_a_at_its_seed_and_averages_b_exactly(flat, tmp_path):
    flat = {**flat, "aggregation.mode": "ffa", "federation.rounds": 2}
    run_dir, inner = run_recorded(flat, tmp_path)
    seeded = build_model(resolve(flat), CPU).state_dict()
    rounds = [
        load_file(run_dir / "checkpoints" / f"round-{r:03d}" / "adapter_model.safetensors")
        for r in (1, 2)
    ]
    a_keys = [k for k in rounds[0] if "lora_A" in k]
    b_keys = [k for k in rounds[0] if "lora_B" in k]
    assert a_keys and len(a_keys) == len(b_keys)
    for saved in rounds:  # A never moved from the seeded initialisation
        for k in a_keys:
            np.testing.assert_array_equal(saved[k], seeded[k.replace(".weight", ".default.weight")])
    assert all(not np.array_equal(rounds[0][k], rounds[1][k]) for k in b_keys)  # B moves
    cfg = resolve(flat)
    for server_round in (1, 2):
        replies, weights = plain_replies(inner, server_round)
        assert len(replies) == 3 and all("lora_B" in k for r in replies for k in r)  # B only
        aggregate = checkpoint(cfg, run_dir, server_round)  # the trainable tensors: B
        assert max_diff(aggregate, weighted_mean(replies, weights)) < 1e-6


@pytest.mark.simulation
def test_exact_aggregation_is_the_best_rank_r_cut_of_the_mean_product(flat, tmp_path):
    flat = {**flat, "aggregation.mode": "exact"}
    run_dir, inner = run_recorded(flat, tmp_path)
    replies, weights = plain_replies(inner, 1)
    aggregate = checkpoint(resolve(flat), run_dir, 1)
    rank = resolve(flat).lora.rank
    kept = dropped = 0.0
    for a_key in (k for k in aggregate if "lora_A" in k):
        b_key = a_key.replace("lora_A", "lora_B")
        mean = weighted_mean(
            [{b_key: r[b_key].astype(np.float64) @ r[a_key]} for r in replies], weights
        )[b_key]
        u, s, vt = torch.linalg.svd(torch.from_numpy(mean), full_matrices=False)  # Eckart-Young
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        ours = aggregate[b_key].astype(np.float64) @ aggregate[a_key]
        np.testing.assert_allclose(ours, best.numpy(), atol=1e-5 * float(s[0]))
        kept, dropped = kept + float((s[:rank] ** 2).sum()), dropped + float((s[rank:] ** 2).sum())
    # three rank-8 updates of 16- and 32-wide projections: the mean has rank > 8
    lost = read_lines(run_dir)[1]["truncation_energy_lost"]
    assert 0 < lost == pytest.approx(dropped / (kept + dropped), rel=1e-4)


@pytest.mark.simulation
def test_fedmedian_takes_the_coordinate_median_of_the_replies(flat, tmp_path):
    """FedTrimmedAvg and Krum take the same path (robust: full-rank replies, no padding)."""
    flat = {**flat, "aggregation.strategy": "fedmedian"}
    run_dir, inner = run_recorded(flat, tmp_path)
    replies, weights = plain_replies(inner, 1)
    median = {k: np.median(np.stack([r[k] for r in replies]), axis=0) for k in replies[0]}
    aggregate = checkpoint(resolve(flat), run_dir, 1)
    assert max_diff(aggregate, median) < 1e-7
    assert max_diff(aggregate, weighted_mean(replies, weights)) > 1e-3  # not a mean


@pytest.mark.simulation
def test_fedadam_steps_from_the_global_adapter_towards_the_weighted_mean(flat, tmp_path):
    """Round 1 of Flower's FedAdam (beta 0.9, 0.99, tau 1e-3, bias-corrected eta) on the
    LoRA factors; FedAvgM shares the path (a server optimiser on the current arrays)."""
    eta = 0.01
    flat = {**flat, "aggregation.strategy": "fedadam", "aggregation.server-learning-rate": eta}
    run_dir, inner = run_recorded(flat, tmp_path)
    replies, weights = plain_replies(inner, 1)
    start = initial_adapter(flat)
    mean = weighted_mean(replies, weights)
    eta_norm = eta * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = {}
    for k, x in start.items():
        delta = mean[k] - x
        expected[k] = x + eta_norm * 0.1 * delta / (np.sqrt(0.01 * delta**2) + 1e-3)
    aggregate = checkpoint(resolve(flat), run_dir, 1)
    assert max_diff(aggregate, expected) < 1e-5 * eta
    assert max_diff(aggregate, mean) > 10 * eta * 1e-3  # a server step, not the mean


@pytest.mark.simulation
def test_secure_aggregation_yields_the_weighted_mean_within_quantisation(flat, tmp_path):
    # one draw of the count noise at every hospital (a testing seed): the weights keep their
    # order and ratio, which are what this test needs of them
    flat = {
        **flat,
        "aggregation.secure": True,
        "aggregation.secure-max-weight": 100.0,
        "privacy.insecure-seed": 9,
    }
    cfg = resolve(flat)
    run_dir, inner = run_recorded(flat, tmp_path, secure=True)
    replies, weights = plain_replies(inner, 1)
    assert len(replies) == 3 and max(weights) > 1.5 * min(weights)
    aggregate = checkpoint(cfg, run_dir, 1)
    bound = quantisation_bound(cfg, weights)
    assert max_diff(aggregate, weighted_mean(replies, weights)) <= bound
    assert max_diff(aggregate, weighted_mean(replies, [1, 1, 1])) > 10 * bound
    assert max_diff(aggregate, initial_adapter(flat)) > 1e-3  # it trained


@pytest.mark.simulation
def test_a_resumed_run_continues_from_its_checkpoint_and_ledgers(flat):
    """One round, then the run resumed to two, equals an uninterrupted two-round run (noise
    from a fixed testing seed, so both draw the same); the ledgers hold rounds 1 and 2."""
    flat = {
        **flat,
        "dp.noise-multiplier": 1.0,
        "privacy.max-epsilon": 1000.0,
        "privacy.insecure-seed": 5,  # testing switch: the two runs draw the same noise
    }
    reference = simulate({**flat, "run.name": "uninterrupted", "federation.rounds": 2})
    run_dir = simulate({**flat, "run.name": "resumed"})
    resume(run_dir, {"federation.rounds": 2})
    assert [m["round"] for m in read_lines(run_dir)] == [0, 1, 2]
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, atol=1e-6)
    cfg = resolve(flat)
    assert max_diff(checkpoint(cfg, run_dir, 2), checkpoint(cfg, run_dir, 1)) > 1e-3
    for ledger in sorted((run_dir / "privacy").glob("*.jsonl")):
        records = [r for r in read_records(ledger) if r.status == "trained"]  # after the count
        assert [r.round for r in records] == [1, 2]
        assert records[1].epsilon > records[0].epsilon  # round 2 composed on round 1
    problems = [p for r in audit(run_dir) for p in r.problems]
    assert problems and all("predictable (testing only)" in p for p in problems), problems


@pytest.mark.simulation
def test_mixed_ranks_average_each_component_over_the_hospitals_that_hold_it(flat, tmp_path):
    flat = {**flat, "lora.client-ranks": "8,4,2"}
    run_dir, inner = run_recorded(flat, tmp_path)
    replies, weights = plain_replies(inner, 1)  # partitions 0, 1, 2: ranks 8, 4, 2
    assert sorted(read_lines(run_dir)[1]["ranks"].values()) == [2, 4, 8]
    aggregate = checkpoint(resolve(flat), run_dir, 1)
    for name, value in aggregate.items():
        axis = 0 if "lora_A" in name else 1
        for lo, hi in ((0, 2), (2, 4), (4, 8)):  # held by all three, by two, by one
            held = [i for i, r in enumerate(replies) if r[name].shape[axis] >= hi]
            mean = weighted_mean(
                [{name: np.take(replies[i][name], range(lo, hi), axis)} for i in held],
                [weights[i] for i in held],
            )[name]
            np.testing.assert_allclose(np.take(value, range(lo, hi), axis), mean, atol=1e-6)


@pytest.mark.simulation
def test_central_dp_clips_each_update_and_adds_the_promised_noise(flat, tmp_path):
    clip, z = 0.1, 1.0
    flat = {
        **flat,
        "central-dp.enabled": True,
        "central-dp.clipping-norm": clip,
        "central-dp.noise-multiplier": z,
    }
    run_dir, inner = run_recorded(flat, tmp_path)
    replies, _ = plain_replies(inner, 1)
    start = initial_adapter(flat)
    clipped = []
    for r in replies:
        update = {k: r[k].astype(np.float64) - start[k] for k in start}
        norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
        assert norm > clip  # the clip binds
        clipped.append({k: u * clip / norm for k, u in update.items()})
    mean = weighted_mean(clipped, [1, 1, 1])  # equal weights, whatever the rows
    aggregate = checkpoint(resolve(flat), run_dir, 1)
    noise = np.concatenate([(aggregate[k] - start[k] - mean[k]).ravel() for k in start])
    assert noise.size > 1000 and abs(noise.mean()) < 0.1 * z * clip / 3
    assert noise.std() == pytest.approx(z * clip / 3, rel=0.1)  # std z·C / m, m = 3
    (result,) = audit(run_dir / "privacy" / "aggregator.jsonl")
    assert result.ok and result.rounds == 1 and 0 < result.epsilon_claimed < math.inf
