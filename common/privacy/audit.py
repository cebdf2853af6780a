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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privatune.common.htmltable import html_table
from privatune.common.privacy.accounting import NEIGHBOURING, epsilon, independent_epsilon
from privatune.common.privacy.ledger import (
    NOISE_FROM_OS,
    SPENDING,
    STATUSES,
    LedgerError,
    LedgerRecord,
    read_records,
    spent,
    verify_chain,
)
from privatune.common.protocol import METRICS_FILE, read_lines

REL_TOL_SAME = 1e-6  # Opacus recomputation: same code path, must match exactly
REL_TOL_INDEPENDENT = 1e-2  # dp-accounting RDP vs Opacus RDP: same bound, other code
REL_TOL_PLD = 5e-2  # dp-accounting PLD vs Opacus PRV: both numerical, other discretisations
# ... or this far apart in absolute terms: Opacus' PRV is exact to its eps_error (0.01) only,
# which dominates at small epsilons (a row count's release alone: 0.17 against PLD's 0.16).
ABS_TOL_PLD = 2e-2
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
    accountant: str = "?"  # the one the budget is enforced with (training's, Opacus)
    delta: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "OK" if self.ok else "FAIL"


def _close(a: float, b: float, rel: float, abs_tol: float = 1e-9) -> bool:
    return (math.isinf(a) and math.isinf(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


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
    result.accountant = last.accountant
    result.delta = last.delta
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
    tol, abs_tol = (REL_TOL_INDEPENDENT, 1e-9) if method == "rdp" else (REL_TOL_PLD, ABS_TOL_PLD)
    independent = _independent(history, rec.delta, method)
    if not _close(recomputed, independent, tol, abs_tol):
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
    """A ledger file; every ``*.jsonl`` under a run folder's ``privacy/``; or every
    ``*.jsonl`` of a folder of ledgers. A run folder's other files (``metrics.jsonl``) are
    never taken for ledgers: a deployment run's folder holds none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "privacy").is_dir():
        return sorted((path / "privacy").glob("*.jsonl"))
    if is_run_folder(path):
        return []
    return sorted(path.glob("*.jsonl"))


def is_run_folder(path: Path) -> bool:
    return (Path(path) / METRICS_FILE).is_file()


def run_anchors(run_dirs: Path | Iterable[Path]) -> dict[str, list[tuple[int, int, str]]]:
    """The ledger heads the server recorded from every reply (``metrics.jsonl``) of one run
    or several (an institution's ledger spans every run it took part in)."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for run_dir in [run_dirs] if isinstance(run_dirs, Path | str) else run_dirs:
        for row in read_lines(Path(run_dir)):
            for who, (count, head) in (row.get("ledger_heads") or {}).items():
                out.setdefault(who, []).append((row["round"], int(count), str(head)))
    return out


def audit(path: Path, anchors_from: Path | Iterable[Path] | None = None) -> list[LedgerAudit]:
    """Every ledger of a run folder (checked against that run's anchors) or one ledger file
    (against the anchors of ``anchors_from``, one run folder or several). In a simulation's
    run folder, an institution the server recorded ledger heads of but whose ledger file is
    missing fails too. A deployment run's folder holds no ledger: the result is empty, and
    :func:`notes` says where the ledgers are and how to audit them."""
    path = Path(path)
    if isinstance(anchors_from, Path | str):
        anchors_from = [anchors_from]
    sources = [Path(p) for p in anchors_from or ()]
    if not sources and path.is_dir() and is_run_folder(path):
        sources = [path]
    anchors = run_anchors(sources)
    ledgers = find_ledgers(path)
    if not ledgers:
        if is_run_folder(path) and not (path / "privacy").is_dir():
            return []  # a deployment run: the ledgers live with the institutions
        return [LedgerAudit(str(path), problems=[f"{path}: no ledger found"])]
    results = [audit_ledger(p, anchors) for p in ledgers]
    if path.is_dir() and (path / "privacy").is_dir():
        found = {r.institution for r in results} | {p.stem for p in ledgers}
        for who, heads in sorted(anchors.items()):
            if who not in found:
                missing = path / "privacy" / f"{who}.jsonl"
                results.append(
                    LedgerAudit(
                        str(missing),
                        institution=who,
                        problems=[
                            f"{missing}: missing, but {METRICS_FILE} records {len(heads)} "
                            f"ledger head(s) of {who}"
                        ],
                    )
                )
    return results


def failures(run_dir: Path) -> dict[str, tuple[list[int], str]]:
    """Institutions (or nodes) that failed in a run: the rounds and the last public reason,
    from ``metrics.jsonl``; one that failed every round has no ledger to audit."""
    out: dict[str, tuple[list[int], str]] = {}
    for row in read_lines(Path(run_dir)):
        for who, why in (row.get("failed") or {}).items():
            out[who] = ([*out.get(who, ([], ""))[0], row["round"]], why)
    return out


def accounting_notes(results: list[LedgerAudit]) -> list[str]:
    """How to read the epsilons: the accountant the budget is enforced with, the tolerance
    of each cross-check and why a looser bound may read above the budget, delta and the
    neighbouring relation."""
    audited = [r for r in results if r.accountant != "?"]
    if not audited:
        return []
    accountants = ", ".join(sorted({r.accountant for r in audited}))
    deltas = ", ".join(f"{d:g}" for d in sorted({r.delta for r in audited}))
    return [
        f"budget enforced with Opacus' {accountants.upper()} accountant (the one training "
        f"used): 'epsilon recomputed' must equal the claim (relative tolerance "
        f"{REL_TOL_SAME:g}) and stay within the budget.",
        f"cross-check by dp-accounting: its RDP must agree with an RDP ledger within "
        f"{REL_TOL_INDEPENDENT:.0%} (the same bound, other code and conversion to epsilon), "
        f"so it may read up to {REL_TOL_INDEPENDENT:.0%} above a budget that was met; on a "
        f"PRV ledger RDP is a looser upper bound and may exceed the budget by more: its PLD "
        f"(the tight reference) must agree within {REL_TOL_PLD:.0%} or {ABS_TOL_PLD:g} "
        "(Opacus' PRV is exact to 0.01 only).",
        f"delta {deltas}; neighbouring relation: {NEIGHBOURING}.",
    ]


def notes(path: Path, results: list[LedgerAudit]) -> list[str]:
    """What the table alone does not say: where a deployment run's ledgers are, which
    institutions failed (by name, with the public reason), and how to read the epsilons."""
    path = Path(path)
    out = []
    if path.is_dir() and is_run_folder(path) and not (path / "privacy").is_dir():
        heads = sorted(run_anchors(path))
        out.append(
            f"{path}: no ledger in this run folder (no privacy/): in a deployment each "
            f"institution keeps its own ledger (node config ledger-path); audit each one "
            f"against this run's recorded heads with `privatune audit LEDGER --anchors {path}`"
            + (f" (heads recorded for: {', '.join(heads)})" if heads else "")
            + "."
        )
    if path.is_dir() and is_run_folder(path):
        for who, (rounds, why) in sorted(failures(path).items()):
            listed = ", ".join(map(str, rounds))
            out.append(f"{who} failed in round(s) {listed}: {why}")
    return out + accounting_notes(results)


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
    "accountant",
    "delta",
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
            r.accountant,
            f"{r.delta:g}",
            r.status,
        ]
        for r in results
    ]


def to_json(results: list[LedgerAudit]) -> list[dict]:
    return [{**asdict(r), "status": r.status} for r in results]


def verdict(results: list[LedgerAudit]) -> str:
    if not results:
        return "No ledger in this folder to audit (see below)."
    if all(r.ok for r in results):
        return "All ledgers verify and are within budget."
    return "Audit FAILED:"


def to_html(results: list[LedgerAudit], remarks: list[str] = ()) -> str:
    """The audit table as an HTML fragment (used by report.html and ``--html``), with
    :func:`notes` below it."""
    problems = "".join(f"<li>{html.escape(p)}</li>" for r in results for p in r.problems)
    table = html_table(HEADERS, rows(results)) if results else ""
    extra = "".join(f"<p>{html.escape(n)}</p>" for n in remarks)
    return (
        f"<h2>Privacy audit</h2><p>{verdict(results)}</p>"
        f"{'<ul>' + problems + '</ul>' if problems else ''}{table}{extra}"
    )
