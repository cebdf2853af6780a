"""The adapter as it travels: exactly the trainable tensors (LoRA A/B and the head), never
the frozen base. Names are peft's parameter names, so a checkpoint saved from them loads with
``PeftModel.from_pretrained``."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from peft import PeftModel
from privatune.common.errors import PrivatuneError


class AdapterError(PrivatuneError):
    """An update does not match the adapter (names, shapes or dtypes)."""


def trainable_names(model: PeftModel) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: PeftModel) -> dict[str, np.ndarray]:
    """The trainable tensors as float32 numpy arrays, in parameter order."""
    return {
        name: p.detach().to("cpu", torch.float32).numpy().copy()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def set_trainable(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Load exactly the trainable tensors; any missing, extra or mis-shaped name is an error."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise AdapterError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(p.shape):
                raise AdapterError(f"{name}: shape {value.shape}, expected {tuple(p.shape)}")
            p.copy_(torch.from_numpy(value).to(p.device, p.dtype))


def lora_rank_axis(name: str) -> int | None:
    """The axis that runs over LoRA's rank: rows of A (r x in), columns of B (out x r)."""
    if "lora_A" in name:
        return 0
    if "lora_B" in name:
        return 1
    return None


def adapter_rank(arrays: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of an adapter (0 for one without LoRA tensors)."""
    for name, value in arrays.items():
        if (axis := lora_rank_axis(name)) is not None:
            return int(value.shape[axis])
    return 0


def fit_rank(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The global adapter cut to a smaller ``rank``: the first ``rank`` rows of each A and
    columns of each B (after ``exact`` aggregation these are the strongest SVD components);
    the head and tensors already that small pass unchanged."""
    out = {}
    for name, value in arrays.items():
        axis = lora_rank_axis(name)
        out[name] = value if axis is None else np.take(value, range(rank), axis=axis)
    return out


def to_record(arrays: Mapping[str, np.ndarray], dtype: str | None = None) -> ArrayRecord:
    """``dtype`` (``federation.transport-dtype``) casts the tensors for the wire: float16
    halves the bytes; every node computes in float32 again on receipt."""
    return ArrayRecord(
        {
            k: torch.from_numpy(np.ascontiguousarray(v if dtype is None else v.astype(dtype)))
            for k, v in arrays.items()
        }
    )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The tensors as float32 numpy arrays, whatever precision they travelled in."""
    return {
        k: v.numpy().astype(np.float32, copy=False) for k, v in record.to_torch_state_dict().items()
    }


def adapter_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names and float32 bytes, for the ledger and audits."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def save_adapter(model: PeftModel, path: Path) -> None:
    """Write a PEFT checkpoint atomically: a temporary folder, then one rename, so a crash
    never leaves a half-written adapter at ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
