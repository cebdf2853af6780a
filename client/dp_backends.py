"""How DP-SGD is applied to one round, behind one small interface: Opacus' per-sample
gradient hooks (``dp.grad-sample-mode = "hooks"``), our closed-form clipping of linear layers
(``"fused"``, :mod:`client.fused_clipping`), or none (``dp.enabled = false``). The training
loop calls the same four steps whichever runs; the mechanism that ran (noise multiplier,
sample rate, steps) is read back from Opacus' accountant in both DP cases, never computed
by us.

One hook point exists for the audit harness alone (``simulations.tools.gradient_canary``):
:func:`audit_canaries` installs, for the duration of one training call, a function that adds
gradient canaries to each step's clipped sum before the noise, through whichever backend
runs. Nothing in a production run installs it; without it every backend is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from opacus import PrivacyEngine
from privatune.client.fused_clipping import FusedClipping
from privatune.common.config import RunConfig
from privatune.common.privacy.accounting import Mechanism
from privatune.common.registry import DP_BACKENDS, load
from torch.utils.data import DataLoader

Prepared = tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]

CanaryHook = Callable[[Sequence[torch.Tensor], float], Sequence[torch.Tensor]]
"""(the trainable parameters in module order, the step's true sample rate) -> what to add
to each parameter's clipped gradient sum in this step, before the noise."""

_canary_hook: CanaryHook | None = None


@contextmanager
def audit_canaries(hook: CanaryHook) -> Iterator[None]:
    """Run the enclosed training with ``hook``'s canaries in every step: for the empirical
    audit harness only (simulations.tools.gradient_canary), never in a production run."""
    global _canary_hook
    _canary_hook = hook
    try:
        yield
    finally:
        _canary_hook = None


def _true_rate(loader: DataLoader) -> float:
    """The rate the loader samples each record with (Opacus' Poisson loader states it)."""
    return float(getattr(loader, "sample_rate", 1 / max(1, len(loader))))


def _canary_sums(
    params: list[torch.Tensor], sample_rate: float
) -> dict[torch.Tensor, torch.Tensor]:
    """The installed hook's additions by parameter (none when no audit is running)."""
    if _canary_hook is None:
        return {}
    return dict(zip(params, _canary_hook(params, sample_rate), strict=True))


class DPBackend(Protocol):
    def prepare(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
    ) -> Prepared:
        """The module, optimizer and loader the loop uses (wrapped as the backend needs)."""

    def after_backward(self, batch_size: int) -> None:
        """Between ``backward()`` and ``optimizer.step()``; ``batch_size`` 0 is a Poisson
        batch that drew no row (no forward pass ran): its step still releases noise."""

    def close(self) -> None:
        """Remove every hook from the model (it outlives the round)."""

    def mechanism(self) -> Mechanism | None:
        """What ran, from the accountant; None without DP."""


class NoDP:
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.sample_rate = 1.0

    def prepare(self, module, optimizer, loader) -> Prepared:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.sample_rate = _true_rate(loader)
        return module, optimizer, loader

    def after_backward(self, batch_size: int) -> None:
        # audit canaries only: records of the batch, whose loss is the batch mean
        for p, extra in _canary_sums(self.params, self.sample_rate).items():
            step = extra / max(1, batch_size)
            p.grad = step if p.grad is None else p.grad + step

    def close(self) -> None:
        pass

    def mechanism(self) -> Mechanism | None:
        return None


class _Accounted:
    """The accountant both DP backends record in (Opacus', as ``make_private`` sets it)."""

    def __init__(self, cfg: RunConfig, noise_multiplier: float, generator: torch.Generator):
        self.engine = PrivacyEngine(accountant=cfg.dp.accountant)
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = cfg.dp.max_grad_norm
        self.generator = generator

    def mechanism(self) -> Mechanism | None:
        history = self.engine.accountant.history or [(self.noise_multiplier, 0.0, 0)]
        (sigma, rate, steps), *rest = history
        assert not rest, "one round uses one noise multiplier and sample rate"
        return Mechanism(float(sigma), float(rate), int(steps))


class OpacusHooks(_Accounted):
    def __init__(self, cfg: RunConfig, noise_multiplier: float, generator: torch.Generator):
        super().__init__(cfg, noise_multiplier, generator)
        self.mode = cfg.dp.grad_sample_mode
        self.module = None
        self.params: list[torch.nn.Parameter] = []

    def prepare(self, module, optimizer, loader) -> Prepared:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.module, optimizer, loader = self.engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=False,  # the loader is Poisson already (train.round_loader)
            noise_generator=self.generator,
            grad_sample_mode=self.mode,
        )
        if _canary_hook is not None:  # the audit harness: canaries join the clipped sum
            add_noise, rate = optimizer.add_noise, _true_rate(loader)

            def canaries_then_noise() -> None:
                for p, extra in _canary_sums(self.params, rate).items():
                    p.summed_grad += extra
                add_noise()

            optimizer.add_noise = canaries_then_noise
        return self.module, optimizer, loader

    def after_backward(self, batch_size: int) -> None:
        if batch_size == 0:  # no forward ran: Opacus' optimizer needs empty per-sample grads
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def close(self) -> None:
        if self.module is not None:
            self.module._close()  # Opacus' own way to remove its hooks


class Fused(_Accounted):
    def __init__(self, cfg: RunConfig, noise_multiplier: float, generator: torch.Generator):
        super().__init__(cfg, noise_multiplier, generator)
        self.clipping: FusedClipping | None = None

    def prepare(self, module, optimizer, loader) -> Prepared:
        self.clipping = FusedClipping.attach(
            module,
            optimizer,
            loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            generator=self.generator,
            accountant=self.engine.accountant,
        )
        if _canary_hook is not None:  # the audit harness: canaries join the clipped sum
            params = [p for p in module.parameters() if p.requires_grad]
            rate = _true_rate(loader)
            self.clipping.canary_sums = lambda: _canary_sums(params, rate)
        return module, optimizer, loader

    def after_backward(self, batch_size: int) -> None:
        assert self.clipping is not None
        self.clipping.privatise(batch_size)

    def close(self) -> None:
        if self.clipping is not None:
            self.clipping.close()


def backend_for(cfg: RunConfig, noise_multiplier: float, generator: torch.Generator) -> DPBackend:
    """The backend ``dp.grad-sample-mode`` names (common.registry.DP_BACKENDS)."""
    if not cfg.dp.enabled:
        return NoDP()
    backend = load(DP_BACKENDS[cfg.dp.grad_sample_mode].implementation)
    return backend(cfg, noise_multiplier, generator)
