"""Two stages, linear probe then LoRA (``train.probe-rounds``, Kumar et al. 2022): the first
rounds train the head alone on the cached embeddings, the rest LoRA and the head from the
cached lower layers. The probe's head transfers (LoRA B is zero: the same logits), both
stages run the same planned DP-SGD steps, and every round is one record of one ledger."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import simulate
from privatune.client.train import train_round
from privatune.common.config import ConfigError, resolve
from privatune.common.data import load_labeled, tokenize
from privatune.common.model.adapter import get_trainable, set_trainable, to_record
from privatune.common.model.build import build_model, load_trained
from privatune.common.model.causal_lm import class_scores
from privatune.common.model.features import embed
from privatune.common.model.heads import head_of
from privatune.common.model.hub import load_tokenizer
from privatune.common.model.top_layers import TopLayers, lower_dataset, split_point
from privatune.common.privacy.audit import audit
from privatune.common.privacy.ledger import read_records
from privatune.common.protocol import read_lines
from privatune.server.recorder import RoundRecorder, adapter_is_zero
from privatune.server.round_log import RoundLog
from privatune.simulations.scenario import load_scenario
from privatune.simulations.simulate import resolve_flat
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

CPU = torch.device("cpu")
SAFETENSORS = "adapter_model.safetensors"


def _flat(tiny_flat, **extra) -> dict:
    return {
        **tiny_flat,
        "lora.layers": 1,
        "model.pooling": "mean",
        "federation.rounds": 3,
        "train.probe-rounds": 2,
        **extra,
    }


def test_probe_rounds_are_checked_and_give_each_round_its_stage(tiny_flat):
    cfg = resolve(_flat(tiny_flat))
    assert [cfg.in_round(r).train.trainable for r in (1, 2, 3)] == ["head", "head", "adapter"]
    assert cfg.in_round(3) is cfg
    probe = cfg.in_round(1)
    assert probe.train.probe_rounds == 0  # a plain probe config, valid on its own
    # what the plan and the loader depend on is the same in both stages
    assert (probe.train.batch_size, probe.train.local_epochs) == (
        cfg.train.batch_size,
        cfg.train.local_epochs,
    )
    assert probe.dp == cfg.dp and probe.federation == cfg.federation
    assert resolve(tiny_flat).train.probe_rounds == 0  # the default: one stage
    for bad, says in (
        ({"train.probe-rounds": 3}, "below federation.rounds"),
        ({"train.probe-rounds": -1}, "train.probe-rounds"),
        ({"train.trainable": "head"}, 'train.trainable = "adapter"'),
    ):
        with pytest.raises(ConfigError, match=says):
            resolve(_flat(tiny_flat, **bad))


def test_the_lora_stage_starts_with_the_probes_logits(tiny_flat, federation_dir):
    """After a DP probe round (the head alone, on embeddings) the top-layer path of the
    same model, LoRA B still zero, gives the probe's logits to 1e-5; so does a model built
    as a plain probe (``train.trainable = "head"``) holding that head, and the full model."""
    cfg = resolve(_flat(tiny_flat, **{"model.feature-norm": 2.0}))
    model = build_model(cfg, CPU)
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    tokens = tokenize(data, load_tokenizer(cfg), cfg.model.max_length)
    before = get_trainable(model)
    result = train_round(model, embed(model, tokens), cfg.in_round(1), 1.0, CPU, seed=3)
    after = get_trainable(model)
    assert result.steps == cfg.train.local_epochs * -(-len(data.labels) // cfg.train.batch_size)
    head = {k for k in after if "lora_" not in k}
    assert all(np.array_equal(after[k], before[k]) for k in after if k not in head)  # LoRA
    assert any(not np.allclose(after[k], before[k]) for k in head)  # the probe trained
    assert adapter_is_zero(model)

    model.eval()
    probe = build_model(cfg.in_round(1), CPU).eval()  # how `medical` builds its model
    set_trainable(probe, {k: after[k] for k in head})
    with torch.no_grad():
        probe_logits = head_of(probe)(embed(probe, tokens).tensors[0])
        top = TopLayers(model, split_point(model, cfg))
        hidden, mask, _ = lower_dataset(model, tokens, cfg).tensors
        stage_two = top(hidden, mask)
        full = class_scores(model, *tokens.tensors[:2])
    assert probe_logits.abs().max() > 1e-2  # not trivially equal
    torch.testing.assert_close(stage_two, probe_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, probe_logits, atol=1e-5, rtol=1e-5)


def test_the_medical_probe_then_lora_scenario_is_the_probe_then_medical_lora():
    probe = resolve(resolve_flat(load_scenario("medical")))
    cfg = resolve(resolve_flat(load_scenario("medical-probe-lora")))
    lora = resolve(resolve_flat(load_scenario("medical-lora")))
    n = cfg.train.probe_rounds
    assert 0 < n < cfg.federation.rounds
    first = cfg.in_round(1)
    # the probe's recipe, round for round (train.learning-rate is LoRA's: no LoRA trains)
    assert first.train == dataclasses.replace(probe.train, learning_rate=cfg.train.learning_rate)
    assert first.model == probe.model and first.data == probe.data
    assert cfg.in_round(n + 1).lora == lora.lora and cfg.train.trainable == "adapter"
    assert cfg.dp == probe.dp  # the same target, accountant and clipping


@pytest.mark.simulation
def test_a_probe_then_lora_federation_composes_every_round_in_one_ledger(tiny_flat):
    """Two probe rounds then one LoRA round under DP: LoRA does not move until round 3, each
    hospital's ledger holds one record per round with the same planned noise and steps, its
    epsilon stays within the target, and the audit passes."""
    flat = _flat(
        tiny_flat,
        **{"run.name": "stages", "dp.target-epsilon": 4.0, "train.batch-size": 16},
    )
    run_dir = simulate(flat)
    cfg = resolve(flat)
    start = get_trainable(build_model(cfg, CPU))
    lora = [k for k in start if "lora_B" in k]
    assert lora

    def checkpoint(rnd: int) -> dict:
        saved = load_file(run_dir / "checkpoints" / f"round-{rnd:03d}" / SAFETENSORS)
        return {k: v.numpy() for k, v in saved.items()}

    for rnd in (1, 2):
        assert all(not v.any() for k, v in checkpoint(rnd).items() if "lora_B" in k)
    assert any(v.any() for k, v in checkpoint(3).items() if "lora_B" in k)
    final = get_trainable(load_trained(run_dir))
    assert all(final[k].any() for k in lora)
    lines = read_lines(run_dir)
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    assert all(line["central_macro_f1"] is not None for line in lines)
    ledgers = sorted((run_dir / "privacy").glob("*.jsonl"))
    assert len(ledgers) == 3
    for ledger in ledgers:
        trained = [r for r in read_records(ledger) if r.status == "trained"]
        assert [r.round for r in trained] == [1, 2, 3]
        mechanisms = {(r.noise_multiplier, r.sample_rate, r.steps) for r in trained}
        assert len(mechanisms) == 1  # planned once, the same in both stages
        assert trained[-1].epsilon <= cfg.dp.target_epsilon + 1e-9
        assert trained[0].epsilon < trained[1].epsilon < trained[2].epsilon
    results = audit(run_dir)
    assert results and all(r.ok for r in results), [r.problems for r in results]
    assert max(r.epsilon_recomputed for r in results) <= cfg.dp.target_epsilon + 1e-6


def test_the_server_scores_each_stage_on_cached_inputs_as_on_the_full_model(
    tiny_flat, federation_dir, tmp_path
):
    """The recorder's central scores from the test set's cached embeddings (while LoRA B is
    zero) and from its cached lower layers (after) equal the full model's."""
    cfg = resolve(_flat(tiny_flat))
    model = build_model(cfg, CPU)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    test = load_labeled(federation_dir / "test.csv", "text", "label", cfg.data.label_names)
    tokens = tokenize(test, load_tokenizer(cfg), cfg.model.max_length)
    start = split_point(model, cfg)

    def scores(arrays, **cached) -> dict:
        run_dir = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        run_dir.mkdir()
        recorder = RoundRecorder(run_dir, model, RoundLog(), 3, CPU, tokens, 1)
        for key, value in cached.items():
            setattr(recorder, key, value)
        return dict(recorder(0, to_record(arrays)))

    stage_one = get_trainable(model)
    embedded = embed(model, tokens)
    lower = lower_dataset(model, tokens, cfg)
    gen = torch.Generator().manual_seed(0)
    stage_two = {
        k: v + (torch.randn(v.shape, generator=gen).numpy() * 0.5 if "lora_B" in k else 0)
        for k, v in stage_one.items()
    }
    for arrays in (stage_one, stage_two):
        full = scores(arrays)
        both = scores(arrays, embedded_test_set=embedded, top_test_set=lower, top_start=start)
        assert full.keys() == both.keys() and full
        for key in full:
            assert full[key] == pytest.approx(both[key], abs=1e-5), key
        # and the cached inputs are what was scored: with their labels moved, the scores move
        wrong = {
            "embedded_test_set": TensorDataset(embedded.tensors[0], (embedded.tensors[1] + 1) % 3),
            "top_test_set": TensorDataset(*lower.tensors[:2], (lower.tensors[2] + 1) % 3),
            "top_start": start,
        }
        assert scores(arrays, **wrong)["accuracy"] != pytest.approx(full["accuracy"])
    assert adapter_is_zero(model) is False  # the last arrays loaded: stage two's
