"""LoRA-aware aggregation: what the server does with the A and B matrices beyond averaging.

Averaging A and B separately is not averaging the updates: mean(B)·mean(A) != mean(B·A),
and under DP-SGD the noise on A and on B multiplies. ``aggregation.mode`` chooses:

- ``fedavg``: A, B and the head averaged one by one (the common baseline);
- ``ffa`` (FFA-LoRA, Sun et al., ICLR 2024): A frozen at its shared seed on every node, so
  mean(B)·A = mean(B·A) is exact and only B and the head travel; nothing to do here;
- ``exact``: the weighted mean of the products B_i·A_i, factored back to the global rank
  by a truncated SVD (:func:`exact_mean`); the share of the mean's energy (squared
  Frobenius norm) that the truncation drops is reported every round.

Heterogeneous ranks (an institution with a small GPU sets a smaller ``lora-rank``) are
handled by zero-padding with rank-aware weights (:func:`rank_aware_padding`): component k
of the global A and B is the weighted mean over the institutions that have a component k,
not diluted by zeros from those that do not. In ``exact`` mode nothing extra is needed:
every B_i·A_i has the full shape whatever its rank, and since the SVD orders components by
strength, an institution of rank k receives the k strongest. We chose padding over FLoRA's
stacking (Wang et al., NeurIPS 2024) because stacking grows the global rank by the sum of
all ranks every round and folds the result into the base weights, which would make every
round ship (and every checkpoint store) base-model-sized tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from privatune.common.model.adapter import lora_rank_axis

Arrays = Mapping[str, np.ndarray]
DEAD = 1e-9  # relative singular value below which a component carries nothing


def weighted_mean(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    total = float(sum(weights))
    return sum(w * np.asarray(v, np.float64) for v, w in zip(values, weights, strict=True)) / total


def rank_aware_padding(
    replies: Sequence[Arrays], weights: Sequence[float], current: Arrays
) -> list[dict[str, np.ndarray]]:
    """Pad every reply's LoRA tensors to the global rank so that the plain weighted mean of
    the padded replies (Flower's FedAvg and the server optimisers built on it) is the
    rank-aware mean: a component held by some replies is scaled by total / held weight in
    those and zero in the others; a component nobody holds keeps its current value."""
    total = float(sum(weights))
    padded = [dict(r) for r in replies]
    for name, ref in current.items():
        axis = lora_rank_axis(name)
        if axis is None:
            continue
        ranks = [r[name].shape[axis] for r in replies]
        held = np.zeros(ref.shape[axis])
        for rank, w in zip(ranks, weights, strict=True):
            held[:rank] += w
        for out, reply, rank in zip(padded, replies, ranks, strict=True):
            full = np.moveaxis(np.array(ref, np.float32), axis, 0)
            full[held > 0] = 0.0
            full[:rank] = np.moveaxis(reply[name], axis, 0) * (total / held[:rank, None])
            out[name] = np.moveaxis(full, 0, axis)
    return padded


def exact_mean(
    replies: Sequence[Arrays], weights: Sequence[float], current: Arrays
) -> tuple[dict[str, np.ndarray], float]:
    """The weighted mean of B_i·A_i for every LoRA module, re-factored to the global rank
    r as B = U_r·sqrt(S_r), A = sqrt(S_r)·V_r^T; other tensors (the head) are averaged.

    Returns the new adapter and the energy lost, sum of the dropped s_k^2 over the sum of
    all s_k^2 (0 when every mean has rank <= r). A component with no energy gets its
    current A row back and a zero B column: B·A is unchanged, and since LoRA's gradients
    vanish when both A and B are zero, this keeps the direction trainable.
    """
    out: dict[str, np.ndarray] = {}
    kept = dropped = 0.0
    for name, ref in current.items():
        if lora_rank_axis(name) is None:
            out[name] = weighted_mean([r[name] for r in replies], weights).astype(ref.dtype)
        elif "lora_A" in name:
            b_name = name.replace("lora_A", "lora_B")
            delta = weighted_mean(
                [np.asarray(r[b_name], np.float64) @ r[name] for r in replies], weights
            )
            u, s, vt = np.linalg.svd(delta, full_matrices=False)
            rank = ref.shape[0]
            kept += float(np.sum(s[:rank] ** 2))
            dropped += float(np.sum(s[rank:] ** 2))
            root = np.sqrt(s[:rank])
            a, b = root[:, None] * vt[:rank], u[:, :rank] * root
            dead = s[:rank] <= DEAD * max(float(s[0]), np.finfo(np.float64).tiny)
            a[dead], b[:, dead] = ref[dead], 0.0
            out[name], out[b_name] = a.astype(ref.dtype), b.astype(current[b_name].dtype)
    total = kept + dropped
    return out, dropped / total if total > 0 else 0.0
