"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

m canaries are each included in the training data with probability 1/2, independently and
secretly. After training, an auditor scores every canary (how well the final model fits it),
guesses "in" for the r_in best-fitting and "out" for the r_out worst-fitting, abstains on the
rest, and counts the v correct guesses among r = r_in + r_out. Under (epsilon, delta)-DP the
number of correct guesses is dominated by Binomial(r, e^eps / (1 + e^eps)) up to a term in
delta (the paper's Theorem 3.1 and its p-value procedure); the largest epsilon whose p-value
stays below 1 - confidence is the measured lower bound. A bound above the claimed epsilon
proves the mechanism that ran is not the one claimed; a low bound proves nothing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from common.htmltable import html_table

RESULT = "empirical-audit.json"  # in the run folder (privatune canary)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability, under (eps, delta)-DP, of v or more correct guesses among r (of m
    canaries): the binomial tail plus the paper's bound on what delta can add."""
    if not (0 <= v <= r <= m and eps >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need 0 <= v <= r <= m, eps >= 0, delta in [0, 1]: {m, r, v, eps}")
    q = 1 / (1 + math.exp(-eps))  # the accuracy of eps-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))
    slack, mass = 0.0, 0.0
    for i in range(1, v + 1):
        mass += float(stats.binom.pmf(v - i, r, q))
        slack = max(slack, mass / i)
    return min(1.0, tail + slack * delta * 2 * m)


def lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct of r guesses refute at ``confidence`` (0 when
    even epsilon 0 is not refuted): bisection on :func:`p_value`, which rises with epsilon."""
    alpha = 1 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 100:
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


@dataclass(frozen=True)
class EmpiricalAudit:
    canaries: int  # m
    guesses: int  # r, of which half "in" and half "out"
    correct: int  # v
    confidence: float
    delta: float
    epsilon_lower: float  # measured, at this confidence
    guesses_tried: tuple[int, ...]  # the r the auditor chose among (a union bound pays)


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guesses: tuple[int, ...] = (10, 20, 50, 100, 200),
) -> EmpiricalAudit:
    """The bound from canary scores (higher: fits the model better, so more likely in) and
    the secret inclusion bits. Guessing r/2 "in" at the top and r/2 "out" at the bottom
    for each r tried; the confidence is split over the r tried (Bonferroni), so choosing
    the best r after looking costs nothing that is not paid for."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    tried = tuple(r for r in guesses if r <= m)
    per_try = 1 - (1 - confidence) / max(1, len(tried))
    best = EmpiricalAudit(m, 0, 0, confidence, delta, 0.0, tried)
    for r in tried:
        top, bottom = order[: r // 2], order[m - (r - r // 2) :]
        v = int(included[top].sum() + (~included[bottom]).sum())
        eps = lower_bound(m, r, v, delta, per_try)
        if eps > best.epsilon_lower:
            best = EmpiricalAudit(m, r, v, confidence, delta, eps, tried)
    return best


AUDITORS = {  # result key: (name, what the attacker sees)
    "black_box": ("black-box", "the final adapter"),
    "white_box": ("white-box", "every round's global adapter"),
    "updates": ("updates", "each planted institution's own update every round: the server's view"),
}


def auditor_confidence(confidence: float) -> float:
    """Each auditor's confidence, so that the largest of their bounds keeps ``confidence``
    overall (Bonferroni: reading the best of several attackers must be paid for)."""
    return 1 - (1 - confidence) / len(AUDITORS)


def measured_lower(result: Mapping) -> float:
    """The largest bound any auditor measured (results written before an auditor existed
    lack its key)."""
    return max(result[key]["epsilon_lower"] for key in AUDITORS if key in result)


def above_claim(result: Mapping) -> bool:
    """A measured lower bound above the claimed epsilon: proof of a bug."""
    claimed = result["claimed_epsilon"]
    return claimed is not None and measured_lower(result) > claimed


def verdict(result: Mapping) -> str:
    """One line: the measured lower bounds beside the claimed upper bound."""
    claimed = result["claimed_epsilon"]
    each = ", ".join(
        f"{name} {result[key]['epsilon_lower']:.2f}"
        for key, (name, _) in AUDITORS.items()
        if key in result
    )
    confidence = result.get("confidence", result["black_box"]["confidence"])
    head = (
        f"empirical audit: {result['canaries']} canaries, measured epsilon >= "
        f"{measured_lower(result):.2f} ({each}; {confidence:.0%} confidence)"
    )
    if claimed is None:
        return f"{head}; no DP claimed"
    if above_claim(result):
        return (
            f"{head} ABOVE the claimed {claimed:.2f}: the mechanism that ran is not the one claimed"
        )
    return f"{head}, claimed {claimed:.2f}: consistent (a low measurement does not prove privacy)"


def to_html(result: Mapping) -> str:
    """The empirical audit as a report section."""
    rows = [
        [
            f"{name} ({sees})",
            result[key]["canaries"],
            result[key]["guesses"],
            result[key]["correct"],
            result[key]["epsilon_lower"],
            result["claimed_epsilon"],
        ]
        for key, (name, sees) in AUDITORS.items()
        if key in result
    ]
    head = ["auditor", "canaries m", "guesses r", "correct v", "measured epsilon >=", "claimed"]
    return (
        f"<h2>Empirical privacy audit</h2><p>{html.escape(verdict(result))}</p>"
        f"{html_table(head, rows)}"
    )
