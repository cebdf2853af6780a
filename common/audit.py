"""Verify privacy ledgers without trusting whoever wrote them.

For every ledger: the hash chain and every signature must verify against the genesis key;
every record must be well formed (a known status, a refusal spends no steps, delta in
(0, 1)); every cumulative epsilon must equal a recomputation from the recorded mechanisms
(Opacus' accountant, as used in training), a second, independent library (dp-accounting: RDP
over Opacus' orders, and PLD as the tight reference) must agree, and no release may exceed
the institution's budget. Rounds trained without DP or with noise from a fixed (testing) seed
are flagged. With the run's anchors (the ledger heads the server recorded from every reply,
``metrics.jsonl``), a ledger that was truncated or rewritten after a round fails too. The
result is one row per institution.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.htmltable import html_table
from common.ledger import (
    NOISE_FROM_OS,
    SPENDING,
    STATUSES,
    LedgerError,
    LedgerRecord,
    read_records,
    spent,
    verify_chain,
)
from common.privacy import epsilon, independent_epsilon
from common.protocol import read_lines

REL_TOL_SAME = 1e-6  # Opacus recomputation: same code path, must match exactly
REL_TOL_INDEPENDENT = 1e-2  # dp-accounting RDP vs Opacus RDP: same bound, other code
# delta must lie well below 1/n; no data set worth a federation has n <= 100, so a delta of
# 0.01 or more promises nothing whatever the data (epsilon even turns negative near 1).
MAX_DELTA = 1e-2
Anchors = Mapping[str, list[tuple[int, int, str]]]  # institution -> (round, count, head)


@dataclass
class LedgerAudit:
    path: str
    institution: str = "?"
    runs: int = 0
    rounds: int = 0
    evaluations: int = 0
    refused: int = 0
    steps: int = 0
    anchors: int = 0  # server-recorded heads this ledger was checked against
    epsilon_claimed: float = 0.0
    epsilon_recomputed: float = 0.0
    epsilon_dp_accounting: float = 0.0
    epsilon_pld: float = 0.0
    budget: float = math.inf
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "OK" if self.ok else "FAIL"


def _close(a: float, b: float, rel: float) -> bool:
    return (math.isinf(a) and math.isinf(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def audit_ledger(path: Path, anchors: Anchors | None = None) -> LedgerAudit:
    result = LedgerAudit(str(path))
    try:
        records = read_records(path)
        verify_chain(path, records)
    except LedgerError as e:
        result.problems.append(str(e))
        return result
    if len(records) < 2:
        result.problems.append(f"{path}: no release recorded")
        return result
    result.institution = records[0].institution
    for i, rec in enumerate(records[1:], start=2):
        _check_record(path, i, rec, records[:i], result)
    for rnd, count, head in (anchors or {}).get(result.institution, []):
        result.anchors += 1
        if count > len(records) or records[count - 1].hash != head:
            result.problems.append(
                f"{path}: the server recorded head {head[:12]}... at record {count} in round "
                f"{rnd}; the ledger differs there (truncated or rewritten)"
            )
    last = records[-1]
    history = tuple(spent(records))
    result.runs = len({r.run_id for r in records[1:]})
    result.rounds = sum(r.status == "trained" for r in records)
    result.evaluations = sum(r.status == "evaluated" for r in records)
    result.refused = sum(r.status == "refused" for r in records)
    result.steps = sum(r.steps for r in records if r.status in SPENDING)
    result.epsilon_claimed = last.epsilon
    result.epsilon_recomputed = _epsilon(history, last.delta, last.accountant)
    result.epsilon_dp_accounting = _independent(history, last.delta, "rdp")
    result.epsilon_pld = _independent(history, last.delta, "pld")
    result.budget = last.max_epsilon
    return result


def _check_record(
    path: Path, i: int, rec: LedgerRecord, upto: list[LedgerRecord], result: LedgerAudit
) -> None:
    where = f"{path}: record {i} (run {rec.run_id}, round {rec.round})"
    problems = result.problems
    if rec.institution != result.institution:
        problems.append(f"{where}: institution {rec.institution!r} in another's ledger")
    if rec.status not in STATUSES[1:]:
        problems.append(f"{where}: unknown status {rec.status!r}")
        return
    if rec.status == "refused" and rec.steps != 0:
        problems.append(f"{where}: a refused round records {rec.steps} steps")
    if not 0 < rec.delta < MAX_DELTA:
        problems.append(f"{where}: delta {rec.delta!r} outside (0, {MAX_DELTA})")
        return
    if rec.status in SPENDING and rec.noise_source != NOISE_FROM_OS:
        problems.append(f"{where}: noise from {rec.noise_source!r}, predictable (testing only)")
    if rec.status in SPENDING and rec.noise_multiplier <= 0:
        problems.append(f"{where}: data released without DP (noise multiplier 0)")
    history = tuple(spent(upto))
    recomputed = _epsilon(history, rec.delta, rec.accountant)
    if not _close(rec.epsilon, recomputed, REL_TOL_SAME):
        problems.append(
            f"{where}: field epsilon claims {rec.epsilon:.6g}, recomputed {recomputed:.6g}"
        )
    method = "rdp" if rec.accountant == "rdp" else "pld"
    tol = REL_TOL_INDEPENDENT if method == "rdp" else 5e-2
    independent = _independent(history, rec.delta, method)
    if not _close(recomputed, independent, tol):
        problems.append(
            f"{where}: dp-accounting ({method}) gives {independent:.6g}, Opacus {recomputed:.6g}"
        )
    if (
        rec.status in SPENDING
        and rec.noise_multiplier > 0
        and recomputed > rec.max_epsilon * (1 + 1e-9)
    ):
        problems.append(
            f"{where}: epsilon {recomputed:.6g} exceeds the budget {rec.max_epsilon:.6g}"
        )


# Refused rounds repeat the history before them: recompute each distinct history once.
_epsilon = functools.lru_cache(maxsize=4096)(epsilon)
_independent = functools.lru_cache(maxsize=4096)(independent_epsilon)


def find_ledgers(path: Path) -> list[Path]:
    """A ledger file, or every ``*.jsonl`` under a run folder's ``privacy/``."""
    path = Path(path)
    if path.is_file():
        return [path]
    folder = path / "privacy" if (path / "privacy").is_dir() else path
    return sorted(folder.glob("*.jsonl"))


def run_anchors(run_dir: Path) -> dict[str, list[tuple[int, int, str]]]:
    """The ledger heads the server recorded from every reply of a run (``metrics.jsonl``)."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for row in read_lines(run_dir):
        for who, (count, head) in (row.get("ledger_heads") or {}).items():
            out.setdefault(who, []).append((row["round"], int(count), str(head)))
    return out


def audit(path: Path, anchors_from: Path | None = None) -> list[LedgerAudit]:
    """Every ledger of a run folder (checked against that run's anchors) or one ledger file
    (against the anchors of ``anchors_from``, a run folder, when given)."""
    path = Path(path)
    ledgers = find_ledgers(path)
    if not ledgers:
        return [LedgerAudit(str(path), problems=[f"{path}: no ledger found"])]
    source = anchors_from or (path if path.is_dir() else None)
    anchors = run_anchors(source) if source else {}
    return [audit_ledger(p, anchors) for p in ledgers]


HEADERS = [
    "institution",
    "runs",
    "rounds",
    "evaluations",
    "refused",
    "steps",
    "anchors",
    "epsilon claimed",
    "epsilon recomputed (Opacus)",
    "dp-accounting RDP",
    "dp-accounting PLD",
    "budget",
    "status",
]


def rows(results: list[LedgerAudit]) -> list[list]:
    return [
        [
            r.institution,
            r.runs,
            r.rounds,
            r.evaluations,
            r.refused,
            r.steps,
            r.anchors,
            r.epsilon_claimed,
            r.epsilon_recomputed,
            r.epsilon_dp_accounting,
            r.epsilon_pld,
            r.budget,
            r.status,
        ]
        for r in results
    ]


def to_json(results: list[LedgerAudit]) -> list[dict]:
    return [{**asdict(r), "status": r.status} for r in results]


def to_html(results: list[LedgerAudit]) -> str:
    """The audit table as an HTML fragment (used by report.html and ``--html``)."""
    problems = "".join(f"<li>{html.escape(p)}</li>" for r in results for p in r.problems)
    verdict = (
        "All ledgers verify and are within budget."
        if all(r.ok for r in results)
        else "Audit FAILED:"
    )
    return (
        f"<h2>Privacy audit</h2><p>{verdict}</p>"
        f"{'<ul>' + problems + '</ul>' if problems else ''}{html_table(HEADERS, rows(results))}"
    )
