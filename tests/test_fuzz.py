"""Bounded fuzzing: whatever bytes an institution's file holds, and whatever a reply carries,
the loader and the update validator answer with their own clear error or a valid result,
never with another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from helpers import metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from privatune.common.data import DataError, load_labeled
from privatune.server.validation import InvalidUpdate, check_update

LABELS = ["negative", "positive"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.lists(
            st.tuples(st.text(max_size=20), st.sampled_from([*LABELS, "neutral", "", "1"])),
            max_size=6,
        ).map(
            lambda rows: ("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows)).encode(
                "utf-8", "surrogatepass"
            )
        ),
    ),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".parquet"]),
)
def test_loader_never_fails_unexpectedly(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"site{suffix}"
        path.write_bytes(content)
        try:
            data = load_labeled(path, "text", "label", LABELS)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert len(data) > 0 and all(t.strip() for t in data.texts)
            assert set(data.labels.tolist()) <= {0, 1}


REFERENCE = {
    "a.lora_A.weight": np.zeros((2, 3), np.float32),
    "classifier.weight": np.zeros((2, 2), np.float32),
}
arrays = st.builds(
    lambda shape, dtype, fill: np.full(shape, fill).astype(dtype),
    st.sampled_from([(2, 3), (2, 2), (3, 2), (6,), ()]),
    st.sampled_from([np.float32, np.float16, np.float64, np.int32]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5)),
)


@FUZZ
@given(
    tensors=st.dictionaries(
        st.sampled_from([*REFERENCE, "bert.embeddings.weight"]), arrays, max_size=3
    ),
    n=st.one_of(st.integers(-10, 10**8), st.floats(allow_nan=True)),  # Flower refuses bools
    bound=st.sampled_from([0.0, 1.0, 1e6]),
)
def test_validator_never_fails_unexpectedly(tensors, n, bound):
    content = RecordDict({"metrics": MetricRecord({"num-examples": n})})
    if tensors:
        content["arrays"] = ArrayRecord(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        )
    msg = Message(content=content, metadata=metadata(1))
    try:
        check_update(msg, REFERENCE, bound)
    except InvalidUpdate:
        return
    assert set(tensors) == set(REFERENCE)
    assert all(np.all(np.isfinite(v)) and v.shape == REFERENCE[k].shape for k, v in tensors.items())
    assert n > 0
