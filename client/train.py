"""One round of local training at an institution: DP-SGD, or plain training without DP.

The DP backend (client.dp_backends: Opacus' hooks, or our closed-form clipping of the
linear layers) wraps the model and optimizer for this round only. Either way the privacy
spent is read back from Opacus' accountant as (noise multiplier, sample rate, steps) and
composed with the institution's earlier rounds by the ledger, never reported per round.

The noise and the Poisson sampling draw from generators seeded with 63 bits from the
operating system's CSPRNG, fresh every round: nothing the server knows or sets (run seed,
round, institution name) predicts them. A fixed seed is a node-local testing switch only
(``insecure-seed``), and the ledger says so.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from opacus.data_loader import DPDataLoader
from peft import PeftModel
from privatune.client.dp_backends import backend_for
from privatune.common.config import RunConfig
from privatune.common.model.causal_lm import answers_of, class_scores, label_scores
from privatune.common.model.features import embed
from privatune.common.model.heads import head_of
from privatune.common.model.top_layers import TopLayers, lower_dataset, split_point, uses_top_layers
from privatune.common.privacy.accounting import Mechanism, sample_rate, steps_per_epoch
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class RoundResult:
    train_loss: float  # exact: released only when DP is off
    steps: int
    mechanism: Mechanism | None  # None when DP is off


def make_optimizer(
    module: torch.nn.Module, cfg: RunConfig, head: torch.nn.Module | None = None
) -> torch.optim.Optimizer:
    """Two learning rates: the randomly initialised head sits on pooled features of small
    scale and needs a much larger step than the LoRA factors to learn in few rounds. ``head``
    is the classification head (default: the peft model's, :func:`common.model.heads.head_of`)."""
    in_head = {id(p) for p in (head if head is not None else head_of(module)).parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in in_head], "lr": cfg.train.learning_rate},
        {"params": [p for p in trainable if id(p) in in_head], "lr": cfg.train.head_learning_rate},
    ]
    groups = [g for g in groups if g["params"]]  # train.trainable = "head": no LoRA group
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=0.0)
    return torch.optim.SGD(groups)  # config.Optimizer: adamw or sgd


def os_seed() -> int:
    """63 bits from the operating system's CSPRNG."""
    return secrets.randbits(63)


def round_loader(
    data: TensorDataset,
    batch_size: int,
    dp: bool,
    poisson: bool,
    generator: torch.Generator,
    size: int | None = None,
) -> DataLoader:
    """The round's batches: Opacus' Poisson loader under DP, else a shuffled one. The Poisson
    loader's sample rate comes from ``size``, the DP count of the rows (default: their exact
    number, for tests and tools that release nothing), never from the rows themselves: its
    length is the schedule that :func:`common.privacy.accounting.steps_per_epoch` plans and the
    accountant records, and it must not differ between neighbouring data sets."""
    plain = DataLoader(
        data, batch_size=batch_size, shuffle=not (dp and poisson), generator=generator
    )
    if not (dp and poisson):
        return plain
    planned = len(data) if size is None else size
    loader = DPDataLoader(data, sample_rate=sample_rate(planned, batch_size), generator=generator)
    if len(loader) != steps_per_epoch(planned, batch_size):
        raise RuntimeError("Poisson loader and privacy plan disagree on the steps per epoch")
    return loader


def train_round(
    model: PeftModel,
    data: TensorDataset,
    cfg: RunConfig,
    noise_multiplier: float,
    device: torch.device,
    seed: int | None = None,
    poisson_sampling: bool = True,
    proximal_mu: float = 0.0,
    size: int | None = None,
) -> RoundResult:
    """Train ``cfg.train.local_epochs`` epochs in place. ``seed`` fixes noise, sampling and
    dropout for tests (never in production: None draws from the OS CSPRNG).
    ``poisson_sampling=False`` exists so that tests can compare DP-SGD and plain SGD on
    identical batches. ``size`` is the DP count of the rows the sample rate is planned from
    (:func:`round_loader`).

    ``proximal_mu`` > 0 adds FedProx's pull towards the starting (global) adapter. It is
    applied after each optimizer step rather than through the loss: Opacus computes
    per-sample gradients from activations and would silently drop a loss term that depends
    on the weights alone; as a data-independent step it is also free under DP.

    With ``train.trainable = "head"`` only the head trains, on the frozen encoder's pooled
    embeddings: ``data`` may hold them already (:func:`common.model.features.embed`, cached by the
    client), else they are computed here. With ``lora.layers`` > 0 (an encoder) only the
    top layers run, on the frozen layers' output (:mod:`common.model.top_layers`), likewise
    cached or computed here. The mechanism is the same; only the frozen forward pass is
    done once instead of every step."""
    head_only = cfg.train.trainable == "head"
    top = uses_top_layers(cfg)
    target: torch.nn.Module = model
    if head_only:
        target = head_of(model)
        if len(data.tensors) != 2:
            data = embed(model, data)
    elif top:  # common.model.top_layers: the frozen layers' output, computed once
        target = TopLayers(model, split_point(model, cfg))
        if not data.tensors[0].is_floating_point():
            data = lower_dataset(model, data, cfg)
    if seed is not None:  # after embed, whose loader draws from the global generator
        torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(os_seed() if seed is None else seed)
    loader = round_loader(
        data, cfg.train.batch_size, cfg.dp.enabled, poisson_sampling, generator, size
    )
    optimizer = make_optimizer(target, cfg, target if head_only else getattr(target, "head", None))
    noise_generator = torch.Generator(device=device).manual_seed(
        os_seed() if seed is None else seed + 1
    )
    backend = backend_for(cfg, noise_multiplier, noise_generator)
    module, optimizer, loader = backend.prepare(target, optimizer, loader)
    module.train()
    trainable = [p for p in target.parameters() if p.requires_grad]
    anchor = {p: p.detach().clone() for p in trainable} if proximal_mu > 0 else {}
    use_bf16 = cfg.model.bf16 and device.type == "cuda"
    total_loss, batches, steps = 0.0, 0, 0
    try:
        for _ in range(cfg.train.local_epochs):
            for *inputs, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(labels) == 0:
                    # Poisson sampling drew no example. The step still releases noise (and is
                    # accounted), as the analysis of the subsampled Gaussian assumes.
                    backend.after_backward(0)
                    optimizer.step()
                    _proximal_step(optimizer, anchor, proximal_mu)
                    steps += 1
                    continue
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = _loss(module, [x.to(device) for x in inputs], labels.to(device))
                loss.backward()
                backend.after_backward(len(labels))
                optimizer.step()
                _proximal_step(optimizer, anchor, proximal_mu)
                total_loss += loss.item()
                batches += 1
                steps += 1
    finally:
        backend.close()
    mechanism = backend.mechanism()
    loss = total_loss / batches if batches else math.nan
    return RoundResult(loss, steps, mechanism)


def _loss(
    module: torch.nn.Module, inputs: list[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the head on embeddings, of the top layers on the frozen layers'
    output (hidden states, mask) or of the model on (ids, mask); for a causal LM the
    negative log-likelihood of each row's answer tokens (the prompt carries none)."""
    if inputs[0].is_floating_point():
        logits = module(*inputs)
    elif answers_of(module) is not None:
        return -label_scores(module, *inputs, labels).mean()
    else:
        logits = class_scores(module, *inputs)
    return torch.nn.functional.cross_entropy(logits.float(), labels)


@torch.no_grad()
def _proximal_step(
    optimizer: torch.optim.Optimizer, anchor: dict[torch.Tensor, torch.Tensor], mu: float
) -> None:
    """One gradient step on mu/2 * ||w - w_global||^2 at each group's learning rate."""
    if not anchor:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.sub_(group["lr"] * mu * (p - anchor[p]))
