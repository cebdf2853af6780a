"""Verify privacy ledgers without trusting whoever wrote them.

For every ledger: the hash chain must be intact, every record's cumulative epsilon must equal
a recomputation from the recorded mechanisms (Opacus' accountant, as used in training), a
second, independent library (dp-accounting: RDP, and PLD as the tight reference) must agree,
and no record may exceed the institution's budget. The result is one row per institution.
"""

from __future__ import annotations

import functools
import html
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.htmltable import html_table
from common.ledger import LedgerError, LedgerRecord, read_records, scope_history, verify_chain
from common.privacy import epsilon, independent_epsilon

REL_TOL_SAME = 1e-6  # Opacus recomputation: same code path, must match exactly
REL_TOL_INDEPENDENT = 1e-2  # dp-accounting RDP vs Opacus RDP: same bound, other code


@dataclass
class LedgerAudit:
    path: str
    institution: str = "?"
    runs: int = 0
    rounds: int = 0
    refused: int = 0
    steps: int = 0
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


def audit_ledger(path: Path) -> LedgerAudit:
    result = LedgerAudit(str(path))
    try:
        records = read_records(path)
        verify_chain(path, records)
    except LedgerError as e:
        result.problems.append(str(e))
        return result
    if not records:
        result.problems.append(f"{path}: empty ledger")
        return result
    result.institution = records[0].institution
    for i, rec in enumerate(records, start=1):
        _check_record(path, i, rec, records[:i], result)
    last = records[-1]
    history = scope_history(records, last.budget_scope, last.run_id)
    result.runs = len({r.run_id for r in records})
    result.rounds = sum(r.status == "trained" for r in records)
    result.refused = sum(r.status == "refused" for r in records)
    result.steps = sum(r.steps for r in records if r.status == "trained")
    result.epsilon_claimed = last.epsilon
    result.epsilon_recomputed = _epsilon(tuple(history), last.delta, last.accountant)
    result.epsilon_dp_accounting = _independent(tuple(history), last.delta, "rdp")
    result.epsilon_pld = _independent(tuple(history), last.delta, "pld")
    result.budget = last.max_epsilon
    return result


def _check_record(
    path: Path, i: int, rec: LedgerRecord, upto: list[LedgerRecord], result: LedgerAudit
) -> None:
    where = f"{path}: record {i} (run {rec.run_id}, round {rec.round})"
    if rec.institution != result.institution:
        result.problems.append(f"{where}: institution {rec.institution!r} in another's ledger")
    history = scope_history(upto, rec.budget_scope, rec.run_id)
    recomputed = _epsilon(tuple(history), rec.delta, rec.accountant)
    if not _close(rec.epsilon, recomputed, REL_TOL_SAME):
        result.problems.append(
            f"{where}: field epsilon claims {rec.epsilon:.6g}, recomputed {recomputed:.6g}"
        )
    method = "rdp" if rec.accountant == "rdp" else "pld"
    tol = REL_TOL_INDEPENDENT if method == "rdp" else 5e-2
    independent = _independent(tuple(history), rec.delta, method)
    if not _close(recomputed, independent, tol):
        result.problems.append(
            f"{where}: dp-accounting ({method}) gives {independent:.6g}, Opacus {recomputed:.6g}"
        )
    if rec.status == "trained" and recomputed > rec.max_epsilon * (1 + 1e-9):
        result.problems.append(
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


def audit(path: Path) -> list[LedgerAudit]:
    ledgers = find_ledgers(path)
    if not ledgers:
        return [LedgerAudit(str(path), problems=[f"{path}: no ledger found"])]
    return [audit_ledger(p) for p in ledgers]


HEADERS = [
    "institution",
    "runs",
    "rounds",
    "refused",
    "steps",
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
            r.refused,
            r.steps,
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
