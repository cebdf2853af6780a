"""Crash and resume: continue a run from its last complete checkpoint.

Checkpoints are written to a temporary folder and renamed into place, so every
``checkpoints/round-NNN`` that exists is complete. Resuming loads the newest one, keeps
``metrics.jsonl`` only up to that round, and continues the round counter from there; the
institutions' ledgers simply continue their chains (a round that was trained but never
checkpointed before the crash is trained again, and both uses are on the ledger).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from peft import PeftModel, set_peft_model_state_dict
from privatune.common.errors import PrivatuneError
from privatune.common.model.adapter import get_trainable
from privatune.common.protocol import read_lines, write_lines
from safetensors.torch import load_file

CHECKPOINT = re.compile(r"round-(\d{3,})$")


class ResumeError(PrivatuneError):
    """A run folder that does not fit the request: nothing to resume from, a run already
    there when none is resumed, or a checkpoint that does not fit the adapter."""


def last_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    rounds = [
        (int(m.group(1)), p)
        for p in (Path(run_dir) / "checkpoints").glob("round-*")
        if (m := CHECKPOINT.search(p.name)) and p.is_dir()
    ]
    return max(rounds) if rounds else None


def load_checkpoint(model: PeftModel, path: Path) -> dict[str, np.ndarray]:
    """Load a saved adapter into ``model`` with peft's own key mapping; return its
    trainable tensors."""
    result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ResumeError(f"{path}: unexpected tensors {result.unexpected_keys[:3]}")
    return get_trainable(model)


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Drop metric lines of rounds after the checkpoint (they will be run again)."""
    write_lines(run_dir, [x for x in read_lines(run_dir) if x["round"] <= last_round])
