"""The closed-form DP step (client.fused_clipping) against Opacus' own per-sample clipping:
same batch, same seed, same clipped and noised gradients, same accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from client.fused_clipping import FusedClipping
from client.train import make_optimizer, train_round
from common.adapter import get_trainable
from common.config import resolve
from common.data import load_labeled, tokenize
from common.model import build_model, load_tokenizer

CPU = torch.device("cpu")


def _batch(cfg, federation_dir, rows: int = 8) -> TensorDataset:
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    return tokenize(data.subset(np.arange(rows)), load_tokenizer(cfg), cfg.model.max_length)


def _loss(module, batch) -> torch.Tensor:
    ids, mask, labels = batch
    logits = module(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits, labels)


def _opacus_grads(cfg, data, sigma: float, clip: float, seed: int) -> list[torch.Tensor]:
    model = build_model(cfg, CPU)
    loader = DataLoader(data, batch_size=len(data))
    module, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=make_optimizer(model, cfg),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    optimizer.zero_grad()
    _loss(module, next(iter(loader))).backward()
    optimizer.pre_step()  # clip, sum, noise and scale: everything but the parameter update
    grads = [p.grad.clone() for p in optimizer.params]
    module._close()
    return grads


def _fused_grads(cfg, data, sigma: float, clip: float, seed: int):
    model = build_model(cfg, CPU)
    optimizer = make_optimizer(model, cfg)
    accountant = RDPAccountant()
    clipping, loader = FusedClipping.attach(
        model,
        optimizer,
        DataLoader(data, batch_size=len(data)),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        poisson_sampling=False,
        generator=torch.Generator().manual_seed(seed),
        accountant=accountant,
    )
    batch = next(iter(loader))
    _loss(model, batch).backward()
    plain = [p.grad.clone() for p in clipping.params]
    clipping.privatise(len(batch[0]))
    clipping.close()
    return [p.grad.clone() for p in clipping.params], plain, accountant


# 0.05 is below every sample's gradient norm here (every sample is clipped), 1e3 above all
@pytest.mark.parametrize(("sigma", "clip"), [(0.0, 0.05), (0.0, 1e3), (1.0, 0.05)])
def test_fused_step_equals_opacus_per_sample_clipping(tiny_cfg, federation_dir, sigma, clip):
    data = _batch(tiny_cfg, federation_dir)
    expected = _opacus_grads(tiny_cfg, data, sigma, clip, seed=3)
    fused, plain, accountant = _fused_grads(tiny_cfg, data, sigma, clip, seed=3)
    assert len(fused) == len(expected) > 0
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # the clip really binds: the mean of clipped gradients is shorter than the plain mean
    norm = torch.cat([g.flatten() for g in fused]).norm()
    if sigma == 0 and clip < 1:
        assert norm <= clip + 1e-6 < torch.cat([g.flatten() for g in plain]).norm()
    assert accountant.history == [(sigma, 1.0, 1)]


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


def test_unknown_grad_sample_mode_is_a_config_error(tiny_flat, federation_dir):
    cfg = resolve({**tiny_flat, "dp.grad-sample-mode": "ghost"})
    model = build_model(cfg, CPU)
    with pytest.raises(ValueError, match=r"dp.grad-sample-mode: unknown mode 'ghost'"):
        train_round(model, _batch(cfg, federation_dir), cfg, 1.0, CPU, seed=0)
