"""Empirical lower bounds on epsilon from one training run, and one estimate.

m canaries are each included in the training with probability 1/2, independently and
secretly. After training an auditor scores every canary (higher: more likely in), guesses
"in" for the r/2 best-scoring and "out" for the r/2 worst-scoring, abstains on the rest, and
counts the v correct guesses among r. Three readings of the same guesses:

- the one-run bound (Steinke, Nasr and Jagielski, NeurIPS 2023): under (eps, delta)-DP the
  correct guesses are dominated by Binomial(r, e^eps / (1 + e^eps)) up to a term in delta;
- the f-DP one-run bound (Mahloujifar, Melis and Chaudhuri, ICML 2025): the same game
  analysed through a trade-off curve, which is tighter because it does not reduce the
  mechanism to one (eps, delta) pair. Against the curve of the claimed (eps, delta) pair it
  is a bound any (eps, delta)-DP mechanism obeys; against the Gaussian curves (mu-GDP, the
  shape of DP-SGD's curve) it is the paper's "empirical epsilon", valid as a bound on the
  ledger's claim only if the mechanism's curve is Gaussian, so it is reported, never used
  for the verdict;
- the Gaussian-fit estimate of Andrew et al. ("One-shot empirical privacy estimation for
  federated learning", ICLR 2024): Gaussians fitted to the included and to the excluded
  canaries' scores, and the epsilon of that pair. An estimate, not a bound: it has no
  confidence attached and can be above the truth, so it warns and never fails a run.

The guess counts tried are fixed by m alone (a halving grid down to 10) before any score is
seen, and the confidence is split over every count and both bounds (Bonferroni), so picking
the best afterwards is paid for. A bound above the claimed epsilon proves the mechanism that
ran is not the one claimed; a low bound proves nothing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from privatune.common.htmltable import html_table
from scipy import optimize, stats

RESULT = "empirical-audit.json"  # in the run folder (privatune canary)
FEWEST_GUESSES = 10  # the halving grid of guess counts stops here
_PHI = NormalDist()


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability, under (eps, delta)-DP, of v or more correct guesses among r (of m
    canaries): the binomial tail plus the paper's bound on what delta can add."""
    if not (0 <= v <= r <= m and eps >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need 0 <= v <= r <= m, eps >= 0, delta in [0, 1]: {m, r, v, eps}")
    q = 1 / (1 + math.exp(-eps))  # the accuracy of eps-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return tail
    i = np.arange(1, v + 1)
    mass = stats.binom.sf(v - i - 1, r, q) - tail  # P[v - i <= Binomial(r, q) < v]
    return min(1.0, tail + float(np.max(mass / i)) * delta * 2 * m)


def _largest_refuted(refuted: Callable[[float], bool], cap: float = 100.0) -> float:
    """The largest x in [0, cap] with ``refuted(x)``, for a predicate true below some point
    and false above it (0 when even 0 is not refuted): doubling, then bisection."""
    if not refuted(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while refuted(hi):
        lo, hi = hi, 2 * hi
        if hi > cap:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refuted(mid) else (lo, mid)
    return lo


def lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The one-run bound: the largest epsilon that v correct of r guesses refute at
    ``confidence`` (0 when even epsilon 0 is not refuted)."""
    alpha = 1 - confidence
    if r == 0:
        return 0.0
    return _largest_refuted(lambda eps: p_value(m, r, v, eps, delta) < alpha)


def fdp_refutes(
    m: int, r: int, v: int, blow_up_inverse: Callable[[float], float], alpha: float
) -> bool:
    """Whether v correct of r guesses (of m canaries) refute, at level ``alpha``, a mechanism
    whose trade-off curve f has ``blow_up_inverse``: y -> the least x with 1 - f(x) >= y
    (Mahloujifar et al., the recursion of their Algorithm "audit with cap")."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m: {m, r, v}")
    if r == 0:
        return False
    right, wrong = alpha * v / m, alpha * (r - v) / m
    for i in range(v - 1, -1, -1):
        grown = max(wrong, blow_up_inverse(right))
        if grown == wrong:  # nothing changes from here on
            break
        right, wrong = min(1.0, right + i / (r - i) * (grown - wrong)), grown
    return right + wrong > r / m


def gaussian_blow_up_inverse(mu: float) -> Callable[[float], float]:
    """For mu-GDP, f(x) = Phi(Phi^-1(1 - x) - mu), so 1 - f(x) >= y from x = Phi(Phi^-1(y) - mu)."""

    def inverse(y: float) -> float:
        if y <= 0.0 or y >= 1.0:
            return min(max(y, 0.0), 1.0)
        return _PHI.cdf(_PHI.inv_cdf(y) - mu)

    return inverse


def dp_blow_up_inverse(eps: float, delta: float) -> Callable[[float], float]:
    """For (eps, delta)-DP, f(x) = max(0, 1 - delta - e^eps x, e^-eps (1 - delta - x)):
    1 - f is the least of delta + e^eps x and 1 - e^-eps (1 - delta - x), inverted here."""
    grow = math.exp(eps)

    def inverse(y: float) -> float:
        return min(1.0, max(0.0, (y - delta) / grow, 1 - delta - grow * (1 - y)))

    return inverse


def fdp_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon whose (eps, delta)-DP curve v correct of r guesses refute."""
    alpha = 1 - confidence
    return _largest_refuted(lambda eps: fdp_refutes(m, r, v, dp_blow_up_inverse(eps, delta), alpha))


def gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth and Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(
        stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    )


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon of mu-GDP at ``delta`` (0 when even epsilon 0 meets it)."""
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
    return float(optimize.brentq(lambda eps: gdp_delta(eps, mu) - delta, 0.0, hi, xtol=1e-9))


def fdp_gaussian_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95
) -> float:
    """The paper's empirical epsilon: the epsilon at ``delta`` of the largest mu whose
    mu-GDP curve v correct of r guesses refute."""
    alpha = 1 - confidence
    mu = _largest_refuted(
        lambda mu: fdp_refutes(m, r, v, gaussian_blow_up_inverse(mu), alpha), 40.0
    )
    return gdp_epsilon(mu, delta)


def gaussian_fit_epsilon(included: np.ndarray, excluded: np.ndarray, delta: float) -> float:
    """Andrew et al.'s estimate, in its equal-variance form: the included and excluded
    canaries' scores as two Gaussians of one pooled spread, mu = their mean gap over it,
    and the epsilon of mu-GDP at ``delta``. (Fitting each side its own spread lets the
    far tails, which a few hundred scores barely constrain, set epsilon at delta 1e-5.)"""
    inc, exc = np.asarray(included, float), np.asarray(excluded, float)
    if len(inc) < 2 or len(exc) < 2:
        return 0.0
    pooled = math.sqrt(
        ((len(inc) - 1) * inc.var(ddof=1) + (len(exc) - 1) * exc.var(ddof=1))
        / (len(inc) + len(exc) - 2)
    )
    if pooled == 0:
        return math.inf if inc.mean() != exc.mean() else 0.0
    return gdp_epsilon(abs(float(inc.mean() - exc.mean())) / pooled, delta)


def guess_counts(m: int) -> tuple[int, ...]:
    """The guess counts tried, fixed by m alone: m, m/2, m/4, ... down to FEWEST_GUESSES."""
    counts, r = [], m
    while r >= min(FEWEST_GUESSES, m) and r > 0:
        counts.append(r)
        r //= 2
    return tuple(counts)


@dataclass(frozen=True)
class ScoreSummary:
    """The distribution of one side's scores, reported beside every bound."""

    count: int
    mean: float
    sd: float
    quantiles: tuple[float, ...]  # at QUANTILES

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreSummary:
        s = np.asarray(scores, dtype=float)
        if not len(s):
            return cls(0, math.nan, math.nan, tuple(math.nan for _ in QUANTILES))
        qs = tuple(float(x) for x in np.quantile(s, QUANTILES))
        return cls(len(s), float(s.mean()), float(s.std()), qs)


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class EmpiricalAudit:
    canaries: int  # m
    guesses: int  # r of the best bound, half "in" and half "out"
    correct: int  # v
    confidence: float  # of all the bounds below together
    delta: float
    epsilon_lower: float  # the larger of the two bounds on the (eps, delta) claim
    one_run_epsilon: float  # Steinke et al.
    fdp_epsilon: float  # Mahloujifar et al., against the (eps, delta) curve
    fdp_gaussian_epsilon: float  # Mahloujifar et al., against mu-GDP: only if Gaussian
    gaussian_fit_epsilon: float  # Andrew et al.: an estimate, not a bound
    attempts: tuple[tuple[int, int], ...]  # (r, v) for every guess count tried
    included: ScoreSummary
    excluded: ScoreSummary


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guesses: tuple[int, ...] | None = None,
) -> EmpiricalAudit:
    """Every bound from canary scores (higher: more likely in) and the secret inclusion
    bits. For each guess count r (default :func:`guess_counts`, fixed by m alone) the auditor
    guesses r/2 "in" at the top and r/2 "out" at the bottom; the confidence is split over
    the counts and the three bounds (Bonferroni), so the best of them keeps it."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    tried = tuple(r for r in (guesses or guess_counts(m)) if 0 < r <= m)
    each = 1 - (1 - confidence) / max(1, 3 * len(tried))
    attempts, best = [], (0.0, 0, 0)
    one_run = fdp = fdp_gauss = 0.0
    for r in tried:
        top, bottom = order[: r // 2], order[m - (r - r // 2) :]
        v = int(included[top].sum() + (~included[bottom]).sum())
        attempts.append((r, v))
        a, b = lower_bound(m, r, v, delta, each), fdp_lower_bound(m, r, v, delta, each)
        one_run, fdp = max(one_run, a), max(fdp, b)
        fdp_gauss = max(fdp_gauss, fdp_gaussian_lower_bound(m, r, v, delta, each))
        if max(a, b) > best[0]:
            best = (max(a, b), r, v)
    return EmpiricalAudit(
        canaries=m,
        guesses=best[1],
        correct=best[2],
        confidence=confidence,
        delta=delta,
        epsilon_lower=best[0],
        one_run_epsilon=one_run,
        fdp_epsilon=fdp,
        fdp_gaussian_epsilon=fdp_gauss,
        gaussian_fit_epsilon=gaussian_fit_epsilon(scores[included], scores[~included], delta),
        attempts=tuple(attempts),
        included=ScoreSummary.of(scores[included]),
        excluded=ScoreSummary.of(scores[~included]),
    )


def ceiling(m: int, delta: float, confidence: float = 0.95) -> float:
    """The largest bound m canaries can give: every one of m guesses right, with the
    confidence split as :func:`audit_scores` splits it."""
    each = 1 - (1 - confidence) / (3 * len(guess_counts(m)))
    return max(lower_bound(m, m, m, delta, each), fdp_lower_bound(m, m, m, delta, each))


AUDITORS = {  # result key: (name, what the attacker sees)
    "black_box": ("black-box", "the final adapter, on input-space canaries"),
    "white_box": ("white-box", "every round's global adapter, on input-space canaries"),
    "updates": ("updates", "each planted institution's own update every round: the server's view"),
    "gradient_updates": (
        "gradient canaries, updates",
        "each canary's institution's update every round, on the canary's direction",
    ),
    "gradient_final": ("gradient canaries, final", "the final adapter, on the canary's direction"),
}


def auditor_confidence(confidence: float, auditors: int) -> float:
    """Each auditor's confidence, so that the largest of their bounds keeps ``confidence``
    overall (Bonferroni: reading the best of several attackers must be paid for)."""
    return 1 - (1 - confidence) / auditors


def measured_lower(result: Mapping) -> float:
    """The largest bound any auditor measured on the (eps, delta) claim (results written
    before an auditor existed lack its key)."""
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
    confidence = result["confidence"]
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
    estimate = max(
        result[key].get("gaussian_fit_epsilon", 0.0) for key in AUDITORS if key in result
    )
    warning = (
        f"; WARNING: the Gaussian-fit estimate {estimate:.2f} is above the claim (an estimate, "
        "not proof: audit again, with more canaries)"
        if estimate > claimed
        else ""
    )
    return (
        f"{head}, claimed {claimed:.2f}: consistent (a low measurement does not prove "
        f"privacy){warning}"
    )


def _summary(s: Mapping) -> str:
    if not s["count"]:
        return "none"
    q = ", ".join(f"{x:.3g}" for x in s["quantiles"])
    return f"{s['count']}: mean {s['mean']:.3g}, sd {s['sd']:.3g}, 5/25/50/75/95% {q}"


def to_html(result: Mapping) -> str:
    """The empirical audit as a report section: the claim, each auditor's bounds and
    estimate, and the raw attack numbers side by side."""
    rows = [
        [
            f"{name} ({sees})",
            r["canaries"],
            r["guesses"],
            r["correct"],
            round(r["epsilon_lower"], 3),
            round(r["one_run_epsilon"], 3),
            round(r["fdp_epsilon"], 3),
            round(r["fdp_gaussian_epsilon"], 3),
            round(r["gaussian_fit_epsilon"], 3),
            result["claimed_epsilon"],
            "; ".join(f"{g}: {c}" for g, c in r["attempts"]),
            _summary(r["included"]),
            _summary(r["excluded"]),
        ]
        for key, (name, sees) in AUDITORS.items()
        if key in result
        for r in [result[key]]
    ]
    head = [
        "auditor",
        "canaries m",
        "guesses r",
        "correct v",
        "epsilon >= (verdict)",
        "one-run",
        "f-DP (eps, delta)",
        "f-DP Gaussian (if Gaussian)",
        "Gaussian-fit estimate (not a bound)",
        "claimed",
        "guesses: correct, each r tried",
        "scores, included",
        "scores, excluded",
    ]
    return (
        f"<h2>Empirical privacy audit</h2><p>{html.escape(verdict(result))}</p>"
        f"{html_table(head, rows)}"
    )
