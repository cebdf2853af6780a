"""The privacy ledger: an institution's own append-only, hash-chained, signed record of every
release its data took part in (training rounds, local evaluations, the DP count of its
training rows) and every refusal.

One JSON object per line. The first record is the genesis: it names the institution, the
neighbouring relation every epsilon in the ledger is about
(:data:`common.privacy.accounting.NEIGHBOURING`) and holds the public half of the node-local
signing key. Every record holds the SHA-256 of the
previous one, its own hash over its canonical JSON, and a signature of that hash, so editing,
deleting or reordering a record breaks the chain at a record :func:`verify_chain` names, and
rebuilding the chain needs the institution's private key. Every record also holds a fresh
256-bit secret ``nonce`` from the OS CSPRNG: the head that travels to the server is then a
hiding commitment, which the server cannot recompute from candidate data files, times and
budgets (the data fingerprint in a record stays on the node).

Three anchors keep a ledger from failing open:
- a node-local anchor file (record count and head hash after the last append), kept outside
  the ledger's folder (the node config's ``anchor-path``, by default under
  :func:`state_root`), so that restoring a backup of the ledger's folder does not bring an old
  anchor back; a ledger whose anchor is missing once it holds a release is refused, as is
  one found shorter, or different at that record;
- every reply carries the ledger's count and head to the server, which records them per
  round (``privatune audit RUN``) and sends the last count back with every request: a
  ledger shorter than what the node already reported is refused;
- an exclusive lock (``<ledger>.lock``) is held from the budget check to the append, so two
  processes never both spend the same remaining budget.
The signing key lives outside the ledger's folder too (``signing-key``, by default under
:func:`state_root`), so that whoever holds a copy of the folder cannot re-sign a rewritten
chain. Appends write a uniquely named temporary sibling, fsync it and rename it over the
original: a crash leaves either the old or the new ledger, never a torn line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from privatune.common.errors import PrivatuneError
from privatune.common.local import state_root
from privatune.common.privacy.accounting import NEIGHBOURING, Mechanism, epsilon

GENESIS = "0" * 64
FORMAT = "privatune-ledger/3"
OLD_FORMAT = "privatune-ledger/2"  # before nonces and counts: still read and audited
MECHANISM = "poisson-subsampled-gaussian (DP-SGD)"
COUNT_MECHANISM = "gaussian (training-row count, L2 sensitivity 1)"
STATUSES = ("genesis", "trained", "evaluated", "counted", "refused")
SPENDING = ("trained", "evaluated", "counted")  # records whose mechanism counts against the budget
NOISE_FROM_OS = "os-csprng"
NOTHING = Mechanism(0.0, 0.0, 0)  # what a request refused before any mechanism was planned


class LedgerError(PrivatuneError):
    """The ledger is missing, unreadable, unsigned or its chain is broken; names the record."""


@dataclass(frozen=True)
class LedgerRecord:
    """One release (or refusal) of one institution; ``epsilon`` is cumulative over the whole
    ledger, the institution's lifetime budget."""

    format: str
    institution: str
    run_id: str
    round: int
    time: str
    status: str  # one of STATUSES
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    max_epsilon: float
    epsilon: float
    noise_source: str  # NOISE_FROM_OS, or "fixed seed (testing)"; flagged by the audit
    data_fingerprint: str
    adapter_fingerprint: str
    public_key: str  # genesis only: the OpenSSH public key that signs every record
    prev_hash: str
    count: int = 0  # status "counted": the released DP count of the training rows
    nonce: str = ""  # 256 secret bits (OS CSPRNG): the head is a hiding commitment
    hash: str = ""
    signature: str = ""

    @property
    def mechanism_step(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)


def _fields(fmt: object) -> set[str]:
    """The fields a record of this format holds (format 2 had no count and no nonce)."""
    names = set(LedgerRecord.__dataclass_fields__)
    return names - {"count", "nonce"} if fmt == OLD_FORMAT else names


def record_hash(fields: dict) -> str:
    keep = _fields(fields.get("format")) - {"hash", "signature"}
    body = {k: v for k, v in fields.items() if k in keep}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_records(path: Path) -> list[LedgerRecord]:
    """Parse every line; a malformed line is an error naming its line number."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise LedgerError(f"{path}: record {lineno}: not valid JSON ({e.msg})") from e
        names = _fields(raw.get("format") if isinstance(raw, dict) else None)
        if not isinstance(raw, dict) or set(raw) != names:
            got = set(raw) if isinstance(raw, dict) else set()
            raise LedgerError(
                f"{path}: record {lineno}: fields differ (missing {sorted(names - got)}, "
                f"unexpected {sorted(got - names)})"
            )
        records.append(LedgerRecord(**raw))
    return records


def verify_chain(path: Path, records: Iterable[LedgerRecord]) -> None:
    """Raise :class:`LedgerError` at the first record whose hash, link or signature is wrong,
    or when the ledger does not start with its one genesis record."""
    prev, public_key = GENESIS, None
    for i, rec in enumerate(records, start=1):
        where = f"{path}: record {i} (run {rec.run_id}, round {rec.round})"
        if (i == 1) != (rec.status == "genesis"):
            raise LedgerError(f"{where}: the genesis record must come first, and only once")
        if rec.prev_hash != prev:
            raise LedgerError(
                f"{where}: prev_hash does not match the record before it "
                "(a record was deleted, inserted or reordered)"
            )
        if record_hash(asdict(rec)) != rec.hash:
            raise LedgerError(f"{where}: hash mismatch (a field of this record was edited)")
        if i == 1:
            public_key = _load_public(where, rec.public_key)
        if not _verify(public_key, rec.hash, rec.signature):
            raise LedgerError(f"{where}: signature does not verify with the genesis key")
        prev = rec.hash


def spent(records: Iterable[LedgerRecord]) -> list[Mechanism]:
    """The mechanisms that count against the institution's lifetime budget."""
    return [r.mechanism_step for r in records if r.status in SPENDING]


# --- signing --------------------------------------------------------------------------------

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def load_key(path: Path) -> SigningKey:
    """A node's private key: PEM or OpenSSH, EC (a SuperNode key) or Ed25519."""
    data = Path(path).read_bytes()
    try:
        key = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError) as e:
        raise LedgerError(f"{path}: not an unencrypted PEM or OpenSSH private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise LedgerError(f"{path}: signing key must be EC or Ed25519")
    return key


def new_key(path: Path) -> SigningKey:
    """A fresh Ed25519 key, written readable by its owner only."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def public_text(key: SigningKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _sign(key: SigningKey, digest: str) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest.encode()).hex()
    return key.sign(digest.encode(), ec.ECDSA(hashes.SHA256())).hex()


def _load_public(where: str, text: str):
    try:
        return serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, IndexError) as e:
        raise LedgerError(f"{where}: genesis public_key is not an OpenSSH public key") from e


def _verify(public_key, digest: str, signature: str) -> bool:
    try:
        sig = bytes.fromhex(signature)
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, digest.encode())
        else:
            public_key.verify(sig, digest.encode(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


# --- the ledger file --------------------------------------------------------------------------


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _state_file(path: Path, kind: str, suffix: str) -> Path:
    """A per-ledger file under :func:`state_root`, named after the ledger's absolute path."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return state_root() / kind / f"{Path(path).stem}-{digest}{suffix}"


def default_key(path: Path) -> Path:
    return _state_file(path, "keys", ".key")


def default_anchor(path: Path) -> Path:
    return _state_file(path, "anchors", ".anchor")


class Ledger:
    """An institution's ledger file, verified on open (chain, signatures, anchor), so a
    tampered, truncated, restored or missing ledger stops training. ``seen`` is the record
    count the server last received from this node: a ledger shorter than that is refused."""

    def __init__(
        self,
        path: Path,
        key_path: Path | None = None,
        anchor_path: Path | None = None,
        seen: int = 0,
    ) -> None:
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path else default_key(self.path)
        self.anchor_path = Path(anchor_path) if anchor_path else default_anchor(self.path)
        if not self.path.exists():
            raise LedgerError(
                f"{self.path}: no ledger; create it once with `privatune ledger init "
                f"{self.path} --institution NAME` (training never starts a new ledger silently)"
            )
        self.records = read_records(self.path)
        verify_chain(self.path, self.records)
        if not self.records:
            raise LedgerError(f"{self.path}: empty ledger (no genesis record)")
        if len(self.records) < seen:
            raise LedgerError(
                f"{self.path}: {len(self.records)} records, fewer than the {seen} this node "
                "already reported to the server: an old copy of the ledger was restored"
            )
        self._check_anchor()

    @classmethod
    def create(
        cls,
        path: Path,
        institution: str,
        key_path: Path | None = None,
        anchor_path: Path | None = None,
    ) -> Ledger:
        """A new ledger holding its genesis record, signed with the node's key (created
        under :func:`state_root` when the institution names none). Refuses to replace
        anything."""
        path = Path(path)
        key_path = Path(key_path) if key_path else default_key(path)
        anchor_path = Path(anchor_path) if anchor_path else default_anchor(path)
        if path.exists() or anchor_path.exists():
            raise LedgerError(f"{path}: a ledger (or its anchor) already exists; not replaced")
        key = load_key(key_path) if key_path.exists() else new_key(key_path)
        ledger = cls.__new__(cls)
        ledger.path, ledger.key_path, ledger.anchor_path = path, key_path, anchor_path
        ledger.records = []
        ledger._write(
            key,
            institution=institution,
            run_id="",
            round=0,
            time="",
            status="genesis",
            mechanism=f"neighbouring relation: {NEIGHBOURING}",
            noise_multiplier=0.0,
            sample_rate=0.0,
            steps=0,
            max_grad_norm=0.0,
            delta=0.0,
            accountant="",
            max_epsilon=0.0,
            epsilon=0.0,
            noise_source="",
            data_fingerprint="",
            adapter_fingerprint="",
            public_key=public_text(key),
        )
        return ledger

    @classmethod
    @contextlib.contextmanager
    def locked(
        cls,
        path: Path,
        key_path: Path | None = None,
        anchor_path: Path | None = None,
        create_for: str = "",
        seen: int = 0,
    ) -> Iterator[Ledger]:
        """The ledger under an exclusive lock, held until the block ends (from the budget
        check to the append). ``create_for`` names the institution of a ledger to create
        when there is none and never was (no anchor): simulations only."""
        path = Path(path)
        anchor = Path(anchor_path) if anchor_path else default_anchor(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(sibling(path, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if create_for and not path.exists() and not anchor.exists() and not seen:
                    yield cls.create(path, create_for, key_path, anchor)
                else:
                    yield cls(path, key_path, anchor, seen)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @property
    def institution(self) -> str:
        return self.records[0].institution

    @property
    def head(self) -> tuple[int, str]:
        """(record count, hash of the last record): what a reply anchors at the server."""
        return len(self.records), self.records[-1].hash

    def _check_anchor(self) -> None:
        anchor = self.anchor_path
        if not anchor.exists():
            if len(self.records) > 1:  # a new ledger (genesis only) has nothing to reset
                raise LedgerError(
                    f"{self.path}: its anchor ({anchor}) is missing although the ledger holds "
                    "releases: a restored or copied ledger could reset the budget; refusing "
                    "(name the anchor's path in the node config's anchor-path)"
                )
            return
        try:
            known = json.loads(anchor.read_text())
            count, head = int(known["records"]), str(known["head"])
        except (ValueError, KeyError, TypeError) as e:
            raise LedgerError(f"{anchor}: unreadable anchor") from e
        if len(self.records) < count:
            raise LedgerError(
                f"{self.path}: {len(self.records)} records, shorter than the last known head "
                f"({count} records, {anchor}): records were deleted"
            )
        if self.records[count - 1].hash != head:
            raise LedgerError(
                f"{self.path}: record {count} differs from the last known head ({anchor}): "
                "the ledger was rewritten"
            )

    def append(self, **fields) -> LedgerRecord:
        """Sign and append one record; NaN epsilon or an unknown status is refused."""
        if fields.get("status") not in STATUSES[1:]:
            raise LedgerError(f"{self.path}: status {fields.get('status')!r} is not a release")
        if math.isnan(float(fields["epsilon"])):
            raise LedgerError(f"{self.path}: epsilon is NaN; refusing to write")
        return self._write(load_key(self.key_path), **{"public_key": "", **fields})

    def release(self, status: str, used: Mechanism, eps: float, **fields) -> LedgerRecord:
        """Append a record of the mechanism ``used`` (the fields :attr:`LedgerRecord.
        mechanism_step` reads back) with the cumulative epsilon ``eps``."""
        return self.append(
            **fields,
            status=status,
            noise_multiplier=used.noise_multiplier,
            sample_rate=used.sample_rate,
            steps=used.steps,
            epsilon=eps,
        )

    def refuse(self, asked: Mechanism = NOTHING, **fields) -> float:
        """Append a refusal of a request for ``asked`` (its noise and rate; no step ran) and
        return the epsilon spent so far, which it records."""
        so_far = epsilon(spent(self.records), fields["delta"], fields["accountant"])
        self.release("refused", asked._replace(steps=0), so_far, **fields)
        return so_far

    def count_for(self, fingerprint: str) -> int | None:
        """The DP count this ledger already released for a training set, if any (reusing it
        is post-processing: no new cost)."""
        for rec in reversed(self.records):
            if rec.status == "counted" and rec.data_fingerprint == fingerprint:
                return rec.count
        return None

    def _write(self, key: SigningKey, **fields) -> LedgerRecord:
        prev = self.records[-1].hash if self.records else GENESIS
        body = {
            "format": FORMAT,
            "mechanism": MECHANISM,
            "count": 0,
            **fields,
            "prev_hash": prev,
            "nonce": secrets.token_hex(32),
        }
        body["hash"] = record_hash(body)
        body["signature"] = _sign(key, body["hash"])
        record = LedgerRecord(**body)
        line = json.dumps(asdict(record), sort_keys=True).encode() + b"\n"
        old = self.path.read_bytes() if self.path.exists() else b""
        _atomic_write(self.path, old + line)
        self.records.append(record)
        count, head = self.head
        _atomic_write(self.anchor_path, json.dumps({"records": count, "head": head}).encode())
        return record


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a uniquely named temporary sibling, fsync, rename over ``path``, fsync the folder."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
