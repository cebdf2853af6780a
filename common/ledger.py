"""The privacy ledger: an institution's own append-only, hash-chained record of every round
its data was used in (or refused for), across runs.

One JSON object per line. Each record holds the SHA-256 of the previous record, and its own
hash over its canonical JSON, so editing, deleting or reordering any record breaks the chain
at a record :func:`verify_chain` can name. Appends rewrite the file to a temporary sibling,
fsync it and rename it over the original: a crash at any point leaves either the old or the
new ledger, never a torn line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from common.privacy import Mechanism

GENESIS = "0" * 64
FORMAT = "privatune-ledger/1"
MECHANISM = "poisson-subsampled-gaussian (DP-SGD)"


class LedgerError(ValueError):
    """The ledger is unreadable or its chain is broken; names the record and field."""


@dataclass(frozen=True)
class LedgerRecord:
    """One round of one institution. ``epsilon`` is cumulative within ``budget_scope``."""

    format: str
    institution: str
    run_id: str
    round: int
    time: str
    status: str  # "trained" or "refused"
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    budget_scope: str
    max_epsilon: float
    epsilon: float
    data_fingerprint: str
    adapter_fingerprint: str
    prev_hash: str
    hash: str = ""

    @property
    def mechanism_step(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)


def record_hash(fields: dict) -> str:
    body = {k: v for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_records(path: Path) -> list[LedgerRecord]:
    """Parse every line; a malformed line is an error naming its line number."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    names = set(LedgerRecord.__dataclass_fields__)
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise LedgerError(f"{path}: record {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(raw, dict) or set(raw) != names:
            got = set(raw) if isinstance(raw, dict) else set()
            raise LedgerError(
                f"{path}: record {lineno}: fields differ (missing {sorted(names - got)}, "
                f"unexpected {sorted(got - names)})"
            )
        records.append(LedgerRecord(**raw))
    return records


def verify_chain(path: Path, records: Iterable[LedgerRecord]) -> None:
    """Raise :class:`LedgerError` at the first record whose hash or link is wrong."""
    prev = GENESIS
    for i, rec in enumerate(records, start=1):
        fields = asdict(rec)
        if rec.prev_hash != prev:
            raise LedgerError(
                f"{path}: record {i} (run {rec.run_id}, round {rec.round}): prev_hash does not "
                "match the record before it (a record was deleted, inserted or reordered)"
            )
        if record_hash(fields) != rec.hash:
            raise LedgerError(
                f"{path}: record {i} (run {rec.run_id}, round {rec.round}): hash mismatch "
                "(a field of this record was edited)"
            )
        prev = rec.hash


def scope_history(records: Iterable[LedgerRecord], scope: str, run_id: str) -> list[Mechanism]:
    """The mechanisms that count against a budget: all trained rounds of the ledger for a
    lifetime budget, only this run's for a per-run budget."""
    return [
        r.mechanism_step
        for r in records
        if r.status == "trained" and (scope == "lifetime" or r.run_id == run_id)
    ]


class Ledger:
    """An institution's ledger file; verified on open, so a tampered ledger stops training."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records = read_records(self.path)
        verify_chain(self.path, self.records)

    def append(self, **fields) -> LedgerRecord:
        prev = self.records[-1].hash if self.records else GENESIS
        body = {"format": FORMAT, "mechanism": MECHANISM, **fields, "prev_hash": prev, "hash": ""}
        body["hash"] = record_hash(body)
        record = LedgerRecord(**body)
        if math.isnan(record.epsilon):
            raise LedgerError(f"{self.path}: epsilon is NaN; refusing to write")
        line = json.dumps(asdict(record), sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = self.path.read_bytes() if self.path.exists() else b""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(old + line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.records.append(record)
        return record
