"""Checks on every training reply before it may touch the global adapter.

The server trusts no institution: a reply must carry exactly the adapter's tensor names with
their shapes, finite float values, and a positive ``num-examples``. Anything else (a NaN, a
base-model weight smuggled in, a wrong shape) is dropped with the node id and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Message

MAX_EXAMPLES = 10_000_000


class InvalidUpdate(ValueError):
    """A reply that must not be aggregated; the message says why."""


def check_update(msg: Message, expected: Mapping[str, tuple[int, ...]]) -> None:
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise InvalidUpdate("expected one ArrayRecord and one MetricRecord")
    arrays = next(iter(content.array_records.values()))
    names = set(arrays.keys())
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        raise InvalidUpdate(f"tensor names differ: unexpected {extra[:3]}, missing {missing[:3]}")
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(expected[name]):
            raise InvalidUpdate(f"{name}: shape {tuple(array.shape)}, expected {expected[name]}")
        if array.dtype not in ("float32", "float16", "bfloat16"):
            raise InvalidUpdate(f"{name}: dtype {array.dtype}, expected a float type")
        if not np.all(np.isfinite(array.numpy())):
            raise InvalidUpdate(f"{name}: contains NaN or infinite values")
    metrics = next(iter(content.metric_records.values()))
    n = metrics.get("num-examples")
    if not isinstance(n, int | float) or not (0 < n <= MAX_EXAMPLES) or int(n) != n:
        raise InvalidUpdate(f"num-examples {n!r} is not a positive count")
