"""The fused DP step (client.fused_clipping) on the causal-LM track: on a left-padded batch of
prompts of different lengths, with single-token (letters) and multi-token (product names)
answers appended inside ``label_scores``, the clipped and noised gradient equals Opacus'
hooks' on the same batch; wrong per-sample gradients are caught; a real round trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradient_checks import (
    SHIPPED_PER_SAMPLE,
    fused_grads,
    lora_only,
    norm_product_per_sample_gradients,
    opacus_grads,
    relative_error,
    token_mean_per_sample_gradients,
)
from helpers import QUESTIONS, batch, llm_flat
from privatune.client.fused_clipping import FusedClipping
from privatune.client.train import train_round
from privatune.common.config import resolve
from privatune.common.model.adapter import get_trainable
from privatune.common.model.build import build_model
from torch.utils.data import TensorDataset

CPU = torch.device("cpu")
LETTERS = "A,B,C,D"
PRODUCTS = "credit card,student loan,mortgage,debt collection"
# five prompts of five lengths, so that every row is left-padded by a different amount
TEXTS = [*QUESTIONS, QUESTIONS[2][:24], QUESTIONS[0] + " Think of the shoulder."]
LABELS = [0, 3, 1, 2, 1]  # product names of 1 to 3 tokens: answers right-padded too
CLIP = 1e-3  # below every row's LoRA gradient norm (checked): the clip binds for every row


def _setup(model_dir, labels: str):
    """The config and the encoded batch (ids and mask left-padded, labels)."""
    cfg = resolve(llm_flat(model_dir, labels))
    return cfg, batch(cfg, TEXTS, LABELS)


def _opacus_grads(cfg, data: TensorDataset, sigma: float, seed: int) -> list[torch.Tensor]:
    """Opacus' hooks on the model with random LoRA B (A has a gradient, B's is not small)."""
    return opacus_grads(cfg, data, sigma, CLIP, seed, prepare=lora_only)


def _fused_grads(cfg, data: TensorDataset, sigma: float, seed: int) -> list[torch.Tensor]:
    return fused_grads(cfg, data, sigma, CLIP, seed, prepare=lora_only)[0]


def _kept_positions_only(keep: int):
    """Mutant (c): per-sample gradients summed over the positions whose logits are kept
    (``logits_to_keep``) only, as if the prompt's tokens, which reach the answer through
    attention, carried no gradient."""

    def per_sample(self, batch_size):
        self._inputs = {k: v[:, -keep:] for k, v in self._inputs.items()}
        self._grads = {k: v[:, -keep:] for k, v in self._grads.items()}
        return SHIPPED_PER_SAMPLE(self, batch_size)

    return per_sample


@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("labels", [LETTERS, PRODUCTS])
def test_fused_step_equals_opacus_hooks_on_left_padded_prompts_with_answers(
    tiny_llama_dir, monkeypatch, labels, sigma
):
    cfg, data = _setup(tiny_llama_dir, labels)
    ids, mask, _ = data.tensors
    assert len(set(mask.sum(1).tolist())) == len(TEXTS) and (mask[:, 0] == 0).any()
    width = int(build_model(cfg, CPU).answers.lengths.max())
    assert width == (1 if labels == LETTERS else 3)
    seen = []

    def recording(self, batch_size):
        # every layer sees B x T x d, T the prompt and the appended answer (multi-token), and
        # the left padding gets exactly no output gradient: no mask is needed in the sum
        for layer in self.layers:
            x, g = self._inputs[layer], self._grads[layer]
            assert x.shape == (len(TEXTS), ids.shape[1] + (width if width > 1 else 0), x.shape[2])
            assert g.abs().sum() > 0 and not g[:, : ids.shape[1]][mask == 0].any()
        per_sample = SHIPPED_PER_SAMPLE(self, batch_size)
        seen.append(torch.cat([g.flatten(1) for g in per_sample.values()], 1).norm(dim=1))
        return per_sample

    monkeypatch.setattr(FusedClipping, "_per_sample_gradients", recording)
    expected = _opacus_grads(cfg, data, sigma, seed=3)
    fused = _fused_grads(cfg, data, sigma, seed=3)
    assert len(fused) == len(expected) == 2 * 4 * 2  # A and B of q, k, v, o; 2 layers
    for got, want in zip(fused, expected, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert relative_error(fused, expected) < 1e-5
    (norms,) = seen
    assert (norms > 1.2 * CLIP).all(), norms  # the clip binds for every row
    if sigma == 0:
        assert torch.cat([g.flatten() for g in fused]).norm() <= CLIP + 1e-6


@pytest.mark.parametrize("mutant", ["token mean", "norm product", "kept positions"])
@pytest.mark.parametrize("labels", [LETTERS, PRODUCTS])
def test_the_causal_lm_comparison_catches_wrong_per_sample_gradients(
    tiny_llama_dir, monkeypatch, labels, mutant
):
    """The comparison above has power on sequences: token means, the ||g||*||x|| norm
    shortcut, or the answer's positions alone change the released gradient far beyond its
    tolerance."""
    cfg, data = _setup(tiny_llama_dir, labels)
    expected = _opacus_grads(cfg, data, 0.0, seed=3)
    keep = int(build_model(cfg, CPU).answers.lengths.max()) + (labels != LETTERS)
    wrong = {
        "token mean": token_mean_per_sample_gradients,
        "norm product": norm_product_per_sample_gradients,
        "kept positions": _kept_positions_only(keep),
    }[mutant]
    monkeypatch.setattr(FusedClipping, "_per_sample_gradients", wrong)
    fused = _fused_grads(cfg, data, 0.0, seed=3)
    assert relative_error(fused, expected) > 0.1
    with pytest.raises(AssertionError):  # the equality test above fails on it
        for got, want in zip(fused, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_a_fused_round_trains_the_causal_lm_as_a_hooks_round_does(tiny_llama_dir):
    """``train_round`` with ``dp.grad-sample-mode = "fused"`` on multi-token answers: the
    LoRA factors move, the mechanism is recorded, and the adapter is the one the same round
    under Opacus' hooks trains (same batches, same noise)."""
    keys = {"train.batch-size": 4, "train.learning-rate": 0.05, "dp.max-grad-norm": 0.1}
    results, adapters = [], []
    for mode in ("hooks", "fused"):
        cfg = resolve(llm_flat(tiny_llama_dir, PRODUCTS, **keys, **{"dp.grad-sample-mode": mode}))
        data = batch(cfg, TEXTS * 2, LABELS * 2)
        model = build_model(cfg, CPU)
        before = get_trainable(model)
        results.append(train_round(model, data, cfg, 1.0, CPU, seed=5, poisson_sampling=False))
        adapters.append(get_trainable(model))
        assert {k for k in before if "lora_A" in k} and {k for k in before if "lora_B" in k}
        assert all(not np.array_equal(before[k], adapters[-1][k]) for k in before)
    hooks, fused = results
    assert fused.mechanism == hooks.mechanism
    assert fused.mechanism.noise_multiplier == 1.0 and fused.steps == 3
    assert fused.mechanism.steps == 3 and fused.mechanism.sample_rate == pytest.approx(1 / 3)
    for name, want in adapters[0].items():
        np.testing.assert_allclose(adapters[1][name], want, rtol=1e-3, atol=1e-5)
