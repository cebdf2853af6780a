"""White-box gradient canaries (simulations.gradient_canary): the audit hook puts each
canary's gradient into the clipped sum before the noise in every backend, and a real
federation's bounds behave: at the ceiling without DP, below the claim with DP, above it
for each broken mechanism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from client.dp_backends import audit_canaries
from client.train import train_round
from common.adapter import get_trainable, set_trainable
from common.config import resolve
from common.data import load_labeled, tokenize
from common.model import build_model, load_tokenizer
from simulations.gradient_canary import GradientCanaries, flatten

CPU = torch.device("cpu")


def _data(cfg, federation_dir, rows: int):
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    return tokenize(data.subset(np.arange(rows)), load_tokenizer(cfg), cfg.model.max_length)


@pytest.mark.parametrize(
    "mode",
    [{"dp.grad-sample-mode": "hooks"}, {"dp.grad-sample-mode": "fused"}, {"dp.enabled": False}],
)
def test_white_box_canaries_join_the_clipped_sum_in_every_backend(tiny_flat, federation_dir, mode):
    """One full-batch SGD step, once with and once without three included canaries
    (rate 1: sampled for sure), same seed: the adapters differ by exactly
    lr * C / batch on each canary's coordinate and nowhere else."""
    cfg = resolve({**tiny_flat, **mode, "train.optimizer": "sgd", "train.local-epochs": 1})
    data = _data(cfg, federation_dir, cfg.train.batch_size)
    model = build_model(cfg, CPU)
    start = get_trainable(model)
    dim = sum(a.size for a in start.values())
    drawn = GradientCanaries.draw(6, 1, dim, 1.0, "dirac")
    canaries = replace(drawn, included=np.arange(6) < 3)  # three in, three out
    after = []
    for hook in (None, canaries.hook(0)):
        model = build_model(cfg, CPU)
        set_trainable(model, start)
        if hook is None:
            train_round(model, data, cfg, 0.7, CPU, seed=3, poisson_sampling=False)
        else:
            with audit_canaries(lambda params, rate, h=hook: h(params, 1.0)):
                train_round(model, data, cfg, 0.7, CPU, seed=3, poisson_sampling=False)
        after.append(flatten(get_trainable(model)))
    moved = after[1] - after[0]
    head, lora = cfg.train.head_learning_rate, cfg.train.learning_rate
    lr = {n: head if "classifier" in n else lora for n in start}
    rates = np.concatenate([np.full(a.size, lr[n]) for n, a in start.items()])
    want = np.zeros(dim)
    hit = canaries.coordinates[:3]
    want[hit] = rates[hit] * 1.0 / cfg.train.batch_size
    assert (want[hit] > 0).all() and np.count_nonzero(moved) == 3
    np.testing.assert_allclose(moved, want, atol=1e-6)
