"""DP-SGD's per-sample clipping and noise for a model whose trainable layers are all linear
(LoRA's A and B, the classifier head), without Opacus' module and optimizer wrappers.

Why: a small model on a GPU is launch-bound, and Opacus' per-module hook bookkeeping and
per-parameter optimizer passes cost it 2-3x a plain step. A linear layer's per-sample
gradient is its output gradient times its input, summed over tokens; with LoRA's rank r it
is an r x d matrix, cheap to form for the whole batch in one batched product per layer.
On a causal LM the tokens are a left-padded prompt and the answer appended to it; padding
gets exactly zero output gradient (no real token reads it), so the sum needs no mask
(tests/test_causal_lm_fused.py checks this against Opacus).

The mechanism is Opacus' own, so that its analysis and its accountant apply unchanged: the
same clip factor (max_grad_norm / (norm + 1e-6), at most 1) on each sample's whole gradient,
the same Gaussian noise (std noise_multiplier * max_grad_norm) drawn parameter by parameter,
in the optimizer's order, from the same generator, and the same division by the expected
batch size. Batches come from Opacus' Poisson loader, and every released step is recorded
by Opacus' accountant, which stays the accountant of record.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.accountants import IAccountant
from torch import nn
from torch.utils.data import DataLoader


class FusedClipping:
    """Hooks on the trainable linear layers that record each layer's input and output
    gradient; :meth:`privatise` turns them into the clipped, noised mean gradient."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: int,
        generator: torch.Generator | None,
        accountant: IAccountant,
    ) -> None:
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.layers = _trainable_linears(model)
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.accountant = accountant
        # the audit harness's gradient canaries (client.dp_backends.audit_canaries), else None
        self.canary_sums: Callable[[], dict[torch.Tensor, torch.Tensor]] | None = None
        self._inputs: dict[nn.Linear, torch.Tensor] = {}
        self._grads: dict[nn.Linear, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        generator: torch.Generator | None,
        accountant: IAccountant,
    ) -> FusedClipping:
        """The clipping for ``loader`` (Opacus' Poisson loader, or a plain one in tests), set
        up as ``make_private`` would: sample rate 1 / len(loader), the rate the budget
        check planned and the accountant records."""
        sample_rate = 1 / len(loader)
        expected_batch_size = int(len(loader.dataset) * sample_rate)  # type: ignore[arg-type]
        return cls(
            model,
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            sample_rate=sample_rate,
            expected_batch_size=expected_batch_size,
            generator=generator,
            accountant=accountant,
        )

    def _record(self, layer: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        if not torch.is_grad_enabled():
            return
        if layer in self._inputs:
            raise ValueError(
                "dp.grad-sample-mode 'fused': a linear layer ran twice in one step "
                "(shared weights); use 'hooks'"
            )
        self._inputs[layer] = inputs[0].detach()
        output.register_hook(lambda grad: self._grads.__setitem__(layer, grad.detach()))

    @torch.no_grad()
    def privatise(self, batch_size: int) -> None:
        """Replace every trainable parameter's ``.grad`` by the DP-SGD gradient of the batch
        just back-propagated (``batch_size`` samples, 0 for an empty Poisson draw) and
        record the step with the accountant. Assumes the loss was the batch mean."""
        per_sample = self._per_sample_gradients(batch_size)
        if batch_size:
            squared = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()])
            norms = squared.sum(0).sqrt()
            clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        std = self.noise_multiplier * self.max_grad_norm
        canaries = self.canary_sums() if self.canary_sums else {}
        for p in self.params:
            summed = (
                torch.einsum("i,i...", clip, per_sample[p])
                if batch_size
                else torch.zeros(p.shape, device=p.device)
            )
            if p in canaries:
                summed = summed + canaries[p]
            noise = torch.normal(0, std, p.shape, device=p.device, generator=self.generator)
            p.grad = ((summed + noise) / self.expected_batch_size).to(p.dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def _per_sample_gradients(self, batch_size: int) -> dict[torch.Tensor, torch.Tensor]:
        """Each trainable parameter's gradient per sample, in float32, as (batch, *shape)."""
        out: dict[torch.Tensor, torch.Tensor] = {}
        inputs, grads = self._inputs, self._grads
        self._inputs, self._grads = {}, {}
        if not batch_size:
            return out
        for layer in self.layers:
            if layer not in grads:
                raise ValueError(
                    "dp.grad-sample-mode 'fused': a trainable linear layer did not take part "
                    "in the loss; use 'hooks'"
                )
            x = inputs[layer].float().reshape(batch_size, -1, layer.in_features)
            # per-sample losses: the batch-mean loss scaled back by the batch size
            g = grads[layer].float().reshape(batch_size, -1, layer.out_features) * batch_size
            if layer.weight.requires_grad:
                out[layer.weight] = torch.bmm(g.transpose(1, 2), x)
            if layer.bias is not None and layer.bias.requires_grad:
                out[layer.bias] = g.sum(1)
        return out

    def close(self) -> None:
        """Remove the hooks: the model is a plain model again."""
        for handle in self._handles:
            handle.remove()
        self._inputs.clear()
        self._grads.clear()


def _trainable_linears(model: nn.Module) -> list[nn.Linear]:
    """The linear layers holding trainable parameters; refuses a model with any trainable
    parameter elsewhere, whose per-sample gradient this closed form does not cover."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    covered = {id(p) for m in layers for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            raise ValueError(
                f"dp.grad-sample-mode 'fused': trainable parameter {name} is not in a linear "
                "layer; use 'hooks'"
            )
    return layers
