"""Reference per-sample gradients for the DP backends' tests: one clipped, noised step
through Opacus and through the fused backend, and mutants of the fused backend's
per-sample gradients that those tests must catch."""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from privatune.client.fused_clipping import FusedClipping
from privatune.client.train import _loss as training_loss
from privatune.client.train import make_optimizer
from privatune.common.model.build import build_model
from torch.utils.data import DataLoader

CPU = torch.device("cpu")


def batch_loss(module, batch) -> torch.Tensor:
    """The training loop's own loss: a classifier's cross-entropy, a causal LM's answer NLL."""
    ids, mask, labels = batch
    return training_loss(module, [ids, mask], labels)


def opacus_grads(
    cfg, data, sigma: float, clip: float, seed: int, prepare=None
) -> list[torch.Tensor]:
    model = build_model(cfg, CPU)
    if prepare is not None:
        prepare(model)
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
    batch_loss(module, next(iter(loader))).backward()
    optimizer.pre_step()  # clip, sum, noise and scale: everything but the parameter update
    grads = [p.grad.clone() for p in optimizer.params]
    module._close()
    return grads


def fused_grads(cfg, data, sigma: float, clip: float, seed: int, prepare=None):
    model = build_model(cfg, CPU)
    if prepare is not None:
        prepare(model)
    optimizer = make_optimizer(model, cfg)
    accountant = RDPAccountant()
    loader = DataLoader(data, batch_size=len(data))
    clipping = FusedClipping.attach(
        model,
        optimizer,
        loader,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        generator=torch.Generator().manual_seed(seed),
        accountant=accountant,
    )
    batch = next(iter(loader))
    batch_loss(model, batch).backward()
    plain = [p.grad.clone() for p in clipping.params]
    clipping.privatise(len(batch[0]))
    clipping.close()
    return [p.grad.clone() for p in clipping.params], plain, accountant


def lora_only(model) -> None:
    """Random LoRA B (peft starts it at 0, which leaves A without gradient and B's small)
    and a frozen head: the per-sample norm is then all LoRA, nothing hides an error in it."""
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        elif "classifier" in name:
            param.requires_grad_(False)
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = torch.cat([(g - w).flatten() for g, w in zip(got, want, strict=True)])
    return (diff.norm() / torch.cat([w.flatten() for w in want]).norm()).item()


def token_mean_per_sample_gradients(self, batch_size):
    """Mutant (a): the LoRA layers' per-sample gradients from the token means of input and
    output gradient instead of the sum over tokens of their products."""
    self._inputs = {
        k: v.mean(1, keepdim=True) if v.dim() == 3 else v for k, v in self._inputs.items()
    }
    self._grads = {
        k: v.mean(1, keepdim=True) if v.dim() == 3 else v for k, v in self._grads.items()
    }
    return SHIPPED_PER_SAMPLE(self, batch_size)


def token_count_scaled_per_sample_gradients(self, batch_size):
    """Mutant (a'): the per-token sum divided by the token count, the LoRA layers'
    per-sample gradients T times too small."""
    self._grads = {k: v / v.shape[1] if v.dim() == 3 else v for k, v in self._grads.items()}
    return SHIPPED_PER_SAMPLE(self, batch_size)


class ShortcutNorms(dict):
    """Per-sample gradients whose ``values()`` -- all that ``privatise`` takes the norm
    from -- are the outer products (sum_t g_t)(sum_t x_t)^T, of Frobenius norm
    ||sum_t g_t|| * ||sum_t x_t||; indexing still gives the true per-sample gradients."""

    def __init__(self, exact, shortcut):
        super().__init__(exact)
        self.shortcut = shortcut

    def values(self):
        return self.shortcut.values()


def norm_product_per_sample_gradients(self, batch_size):
    """Mutant (b): each linear layer's per-sample norm as ||sum_t g_t|| * ||sum_t x_t||
    (exact for one token only), used for the clip factor alone."""
    shortcut = {}
    if batch_size:
        for layer in self.layers:
            x = self._inputs[layer].float().reshape(batch_size, -1, layer.in_features).sum(1)
            g = self._grads[layer].float().reshape(batch_size, -1, layer.out_features).sum(1)
            g = g * batch_size
            if layer.weight.requires_grad:
                shortcut[layer.weight] = torch.einsum("bo,bi->boi", g, x)
            if layer.bias is not None and layer.bias.requires_grad:
                shortcut[layer.bias] = g
    return ShortcutNorms(SHIPPED_PER_SAMPLE(self, batch_size), shortcut)


SHIPPED_PER_SAMPLE = FusedClipping._per_sample_gradients
