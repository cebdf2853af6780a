"""Checks on every training reply before it may touch the global adapter.

The server trusts no institution: a reply must carry exactly the adapter's tensor names with
their shapes (LoRA tensors may have a smaller rank, the same for all of them), finite float
values, a positive ``num-examples`` and, when a bound is set, an update (reply minus the
current global adapter) of bounded L2 norm. Anything else (a NaN, a base-model weight
smuggled in, a wrong shape, a scaled-up update) is dropped with the node id and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Message
from privatune.common.errors import PrivatuneError
from privatune.common.model.adapter import adapter_rank, fit_rank, lora_rank_axis
from privatune.common.protocol import NUM_EXAMPLES

MAX_EXAMPLES = 10_000_000
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class InvalidUpdate(PrivatuneError):
    """A reply that must not be aggregated; the message says why."""


def check_update(
    msg: Message, reference: Mapping[str, np.ndarray], max_update_norm: float = 0.0
) -> int:
    """Raise :class:`InvalidUpdate` unless ``msg`` is a well-formed adapter update for
    ``reference`` (the global adapter it was trained from); return its LoRA rank."""
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise InvalidUpdate("expected one ArrayRecord and one MetricRecord")
    arrays = next(iter(content.array_records.values()))
    names = set(arrays.keys())
    if names != set(reference):
        extra, missing = sorted(names - set(reference)), sorted(set(reference) - names)
        raise InvalidUpdate(f"tensor names differ: unexpected {extra[:3]}, missing {missing[:3]}")
    rank = reply_rank(arrays, reference)
    reference = fit_rank(reference, rank)
    squared = 0.0
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(reference[name].shape):
            raise InvalidUpdate(
                f"{name}: shape {tuple(array.shape)}, expected {reference[name].shape}"
            )
        if array.dtype not in FLOAT_DTYPES:
            raise InvalidUpdate(f"{name}: dtype {array.dtype}, expected a float type")
        value = array.numpy().astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise InvalidUpdate(f"{name}: contains NaN or infinite values")
        squared += float(np.sum((value - reference[name]) ** 2))
    if max_update_norm > 0 and squared**0.5 > max_update_norm:
        raise InvalidUpdate(f"update norm {squared**0.5:.4g} exceeds the bound {max_update_norm}")
    metrics = next(iter(content.metric_records.values()))
    n = metrics.get(NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, int | float) or not 0 < n <= MAX_EXAMPLES:
        raise InvalidUpdate(f"num-examples {n!r} is not a positive count")
    if int(n) != n:
        raise InvalidUpdate(f"num-examples {n!r} is not a whole number")
    return rank


def reply_rank(arrays: Mapping[str, object], reference: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of a reply: one value shared by all its LoRA tensors, at most the
    global rank (a reply without LoRA tensors counts as full rank)."""
    full, ranks = adapter_rank(reference), set()
    for name, ref in reference.items():
        if (axis := lora_rank_axis(name)) is not None:
            shape = tuple(arrays[name].shape)
            if len(shape) != ref.ndim:
                raise InvalidUpdate(f"{name}: shape {shape}, expected {ref.shape}")
            ranks.add(shape[axis])
    if len(ranks) > 1 or not all(0 < r <= full for r in ranks):
        raise InvalidUpdate(f"LoRA ranks {sorted(ranks)}: expected one rank between 1 and {full}")
    return ranks.pop() if ranks else full
