"""The closed-form DP step (client.fused_clipping) against Opacus' own per-sample clipping:
same batch, same seed, same clipped and noised gradients, same accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradient_checks import (
    CPU,
    SHIPPED_PER_SAMPLE,
    fused_grads,
    lora_only,
    norm_product_per_sample_gradients,
    opacus_grads,
    relative_error,
    token_count_scaled_per_sample_gradients,
    token_mean_per_sample_gradients,
)
from opacus.accountants import RDPAccountant
from privatune.client.fused_clipping import FusedClipping
from privatune.client.train import make_optimizer, train_round
from privatune.common.config import ConfigError, resolve
from privatune.common.data import load_labeled, tokenize
from privatune.common.model.adapter import get_trainable
from privatune.common.model.build import build_model
from privatune.common.model.hub import load_tokenizer
from torch.utils.data import TensorDataset


def _batch(cfg, federation_dir, rows: int = 8) -> TensorDataset:
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    return tokenize(data.subset(np.arange(rows)), load_tokenizer(cfg), cfg.model.max_length)


# 0.05 is below every sample's gradient norm here (every sample is clipped), 1e3 above all
@pytest.mark.parametrize(("sigma", "clip"), [(0.0, 0.05), (0.0, 1e3), (1.0, 0.05)])
def test_fused_step_equals_opacus_per_sample_clipping(tiny_cfg, federation_dir, sigma, clip):
    data = _batch(tiny_cfg, federation_dir)
    expected = opacus_grads(tiny_cfg, data, sigma, clip, seed=3)
    fused, plain, accountant = fused_grads(tiny_cfg, data, sigma, clip, seed=3)
    assert len(fused) == len(expected) > 0
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # the clip really binds: the mean of clipped gradients is shorter than the plain mean
    norm = torch.cat([g.flatten() for g in fused]).norm()
    if sigma == 0 and clip < 1:
        assert norm <= clip + 1e-6 < torch.cat([g.flatten() for g in plain]).norm()
    assert accountant.history == [(sigma, 1.0, 1)]


def _padded_batch(cfg, federation_dir, rows: int = 8) -> TensorDataset:
    """``_batch`` with every row cut to its own length (from 3 tokens to the full width),
    the rest padding: per-token sums and token means then differ by a different factor in
    each row."""
    ids, mask, labels = _batch(cfg, federation_dir, rows).tensors
    ids, mask = ids.clone(), torch.zeros_like(mask)
    pad = load_tokenizer(cfg).pad_token_id
    for row, length in enumerate(torch.linspace(3, ids.shape[1], rows).long().tolist()):
        mask[row, :length] = 1
        ids[row, length:] = pad
    return TensorDataset(ids, mask, labels)


LORA_CLIP = 0.002  # below every sample's LoRA gradient norm: every sample is clipped


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_fused_lora_gradients_equal_opacus_with_random_b_frozen_head_and_padding(
    tiny_cfg, federation_dir, monkeypatch, sigma
):
    data = _padded_batch(tiny_cfg, federation_dir)
    assert len(set(data.tensors[1].sum(1).tolist())) == len(data)  # every length differs
    norms = []

    def recording(self, batch_size):
        per_sample = SHIPPED_PER_SAMPLE(self, batch_size)
        norms.append(torch.cat([g.flatten(1) for g in per_sample.values()], 1).norm(dim=1))
        return per_sample

    monkeypatch.setattr(FusedClipping, "_per_sample_gradients", recording)
    expected = opacus_grads(tiny_cfg, data, sigma, LORA_CLIP, seed=3, prepare=lora_only)
    fused, _, _ = fused_grads(tiny_cfg, data, sigma, LORA_CLIP, seed=3, prepare=lora_only)
    assert len(fused) == len(expected) == 2 * 2 * 2  # A and B of query and value, 2 layers
    for got, want in zip(fused, expected, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert relative_error(fused, expected) < 1e-5
    # every sample is clipped, so the clip factor (and any error in the norm) is in play
    assert (norms[0] > 1.2 * LORA_CLIP).all(), norms
    if sigma == 0:
        assert torch.cat([g.flatten() for g in fused]).norm() <= LORA_CLIP + 1e-6


@pytest.mark.parametrize(
    "mutant",
    [
        token_mean_per_sample_gradients,
        token_count_scaled_per_sample_gradients,
        norm_product_per_sample_gradients,
    ],
)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_lora_comparison_with_opacus_catches_wrong_per_sample_gradients(
    tiny_cfg, federation_dir, monkeypatch, sigma, mutant
):
    """The comparison above has power: a per-sample gradient from token means, or the
    ||g||*||x|| norm shortcut, changes the released gradient far beyond its tolerance."""
    data = _padded_batch(tiny_cfg, federation_dir)
    expected = opacus_grads(tiny_cfg, data, sigma, LORA_CLIP, seed=3, prepare=lora_only)
    monkeypatch.setattr(FusedClipping, "_per_sample_gradients", mutant)
    fused, _, _ = fused_grads(tiny_cfg, data, sigma, LORA_CLIP, seed=3, prepare=lora_only)
    # the noise is the same draw in both, so the error is the signal's
    signal = opacus_grads(tiny_cfg, data, 0.0, LORA_CLIP, seed=3, prepare=lora_only)
    diff = torch.cat([(g - w).flatten() for g, w in zip(fused, expected, strict=True)])
    error = (diff.norm() / torch.cat([w.flatten() for w in signal]).norm()).item()
    assert error > 0.1, error
    with pytest.raises(AssertionError):  # the equality test above fails on it
        for got, want in zip(fused, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_fused_and_opacus_rounds_train_the_same_adapter(tiny_flat, federation_dir):
    """A whole local round (4 batches, noise, AdamW) in either mode: the same adapter and
    the same mechanism on the ledger."""
    hooks_cfg = resolve(tiny_flat)
    fused_cfg = resolve({**tiny_flat, "dp.grad-sample-mode": "fused"})
    data = _batch(hooks_cfg, federation_dir, rows=32)
    results, adapters = [], []
    for cfg in (hooks_cfg, fused_cfg):
        model = build_model(cfg, CPU)
        before = get_trainable(model)
        results.append(train_round(model, data, cfg, 1.1, CPU, seed=5, poisson_sampling=False))
        adapters.append(get_trainable(model))
        assert all(not np.array_equal(before[k], adapters[-1][k]) for k in before)
    assert results[0].mechanism == results[1].mechanism
    assert results[0].train_loss == pytest.approx(results[1].train_loss, rel=1e-4)
    for name, want in adapters[0].items():
        np.testing.assert_allclose(adapters[1][name], want, rtol=1e-3, atol=1e-5)


def test_fused_round_with_poisson_batches_records_every_step(tiny_flat, federation_dir):
    cfg = resolve({**tiny_flat, "dp.grad-sample-mode": "fused"})
    data = _batch(cfg, federation_dir, rows=40)
    model = build_model(cfg, CPU)
    result = train_round(model, data, cfg, 1.3, CPU, seed=1)
    assert result.mechanism.noise_multiplier == 1.3
    assert result.mechanism.sample_rate == pytest.approx(1 / 5)
    assert result.mechanism.steps == result.steps == 5
    # hooks are gone: a later forward records nothing
    model(input_ids=data.tensors[0][:2], attention_mask=data.tensors[1][:2]).logits.sum().backward()


def test_empty_poisson_draw_releases_pure_noise(tiny_cfg):
    model = build_model(tiny_cfg, CPU)
    optimizer = make_optimizer(model, tiny_cfg)
    accountant = RDPAccountant()
    clipping = FusedClipping(
        model,
        optimizer,
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        sample_rate=0.25,
        expected_batch_size=4,
        generator=torch.Generator().manual_seed(0),
        accountant=accountant,
    )
    clipping.privatise(0)
    noise = torch.cat([p.grad.flatten() for p in clipping.params])
    assert noise.std().item() == pytest.approx(2.0 / 4, rel=0.1)
    assert accountant.history == [(2.0, 0.25, 1)]


def test_trainable_parameter_outside_a_linear_layer_is_refused(tiny_cfg):
    model = build_model(tiny_cfg, CPU)
    next(p for n, p in model.named_parameters() if "LayerNorm" in n).requires_grad_(True)
    with pytest.raises(ValueError, match=r"LayerNorm.*not in a linear layer"):
        FusedClipping(
            model,
            make_optimizer(model, tiny_cfg),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.5,
            expected_batch_size=2,
            generator=None,
            accountant=RDPAccountant(),
        )


def test_unknown_grad_sample_mode_is_a_config_error(tiny_flat):
    with pytest.raises(ConfigError, match=r"'dp.grad-sample-mode' must be one of hooks, fused"):
        resolve({**tiny_flat, "dp.grad-sample-mode": "ghost"})
