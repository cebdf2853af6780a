"""Privacy accounting for DP-SGD with Poisson sampling, composed across every round (and,
with a lifetime budget, every run) an institution took part in.

A history is a list of :class:`Mechanism` entries, one per round, exactly what Opacus'
accountants keep (noise multiplier, sample rate, steps). The cumulative epsilon is always
recomputed from the whole history with a fresh accountant, never summed per round, which is
the mistake of a fresh PrivacyEngine per round. :func:`independent_epsilon` recomputes the
same with Google's dp-accounting library, so audits need not trust Opacus either.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dp_accounting
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)
# What "differ in one record" means for every epsilon privatune reports (ledger, audit, report).
NEIGHBOURING = (
    "add/remove one record (one row of the institution's file); "
    "the training-set size each node uses is itself a DP count"
)


class Mechanism(NamedTuple):
    """One round of a Poisson-subsampled Gaussian mechanism (DP-SGD)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """What Opacus' Poisson loader runs per epoch. ``DPDataLoader`` draws each example with
    probability 1/k (k = ceil(n / batch)) and runs ``int(1 / (1/k))`` steps, which float
    rounding makes k - 1 for some k (93, 99, 105, ...); Opacus' accountant then records a
    sample rate of 1 / steps. Budget checks, plans and ledgers all use this one schedule."""
    k = max(1, math.ceil(num_examples / batch_size))
    return int(1 / (1 / k))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The sample rate Opacus' accountant records: 1 / len(DPDataLoader), never below the
    rate the sampler really uses (1/k), so the record is never optimistic."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def merged(history: Sequence[Mechanism]) -> list[Mechanism]:
    """Rounds with the same noise and sample rate, as one entry with their steps summed.
    Composition is exact under this merge (RDP adds per step; PLD/PRV self-compose), and the
    cost of an accountant grows with the number of distinct entries, not of rounds."""
    steps: dict[tuple[float, float], int] = {}
    for m in history:
        if m.steps > 0:
            key = (m.noise_multiplier, m.sample_rate)
            steps[key] = steps.get(key, 0) + m.steps
    return [Mechanism(sigma, rate, n) for (sigma, rate), n in steps.items()]


def _trivial(rounds: list[Mechanism]) -> float | None:
    """Epsilon without an accountant: 0 for no rounds, infinite for any noise-free round."""
    if not rounds:
        return 0.0
    if any(m.noise_multiplier <= 0 for m in rounds):
        return math.inf
    return None


def epsilon(history: Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of the whole history under Opacus' accountant."""
    rounds = merged(history)
    if (known := _trivial(rounds)) is not None:
        return known
    acc = create_accountant(mechanism=accountant)
    acc.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in rounds]
    return float(acc.get_epsilon(delta=delta))


def independent_epsilon(history: Sequence[Mechanism], delta: float, method: str = "rdp") -> float:
    """The same cumulative epsilon from dp-accounting (its RDP or PLD accountant)."""
    rounds = merged(history)
    if (known := _trivial(rounds)) is not None:
        return known
    if method == "rdp":
        # Opacus' own orders, from 1.1 up, so that both RDP computations are comparable.
        acc: dp_accounting.PrivacyAccountant = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
    elif method == "pld":
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    else:
        raise ValueError(f"unknown method {method!r} (rdp or pld)")
    for m in rounds:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(
                m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
            ),
            m.steps,
        )
    return float(acc.get_epsilon(delta))


def count_release(noise_multiplier: float) -> Mechanism:
    """A Gaussian mechanism on counts of L2 sensitivity 1, no sampling: adding or removing
    one record moves one count by one. A local evaluation's noised confusion matrix is one
    (one cell moves), and so is the DP count of an institution's training rows, from which
    its sample rate, steps and aggregation weight follow (:func:`public_size`)."""
    return Mechanism(noise_multiplier, 1.0, 1)


def public_size(true_count: int, noise_multiplier: float, rng: random.Random) -> int:
    """The training-set size a node plans with and reports: the true count plus Gaussian
    noise of std ``noise_multiplier`` (``rng``: ``random.SystemRandom()`` but in tests),
    rounded and at least 1 (post-processing). Under add/remove neighbours the exact count
    differs by one; this one is DP."""
    return max(1, round(true_count + rng.gauss(0.0, noise_multiplier)))


@dataclass(frozen=True)
class Plan:
    """A noise multiplier that spends ``target_epsilon`` over a whole planned training."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon_per_round: list[float]  # cumulative epsilon after each round


def _planned(
    sigma: float | None,
    rate: float,
    per_round: int,
    rounds: int,
    eval_noise: float,
    count_noise: float,
) -> list[Mechanism]:
    """A client's history after ``rounds`` planned rounds: the DP count of its rows once, then
    each round's DP-SGD steps (none for ``sigma`` None) and (``eval_noise`` > 0) its local
    evaluation."""
    once = [count_release(count_noise)] if count_noise > 0 else []
    extra = [count_release(eval_noise)] if eval_noise > 0 else []
    steps = [] if sigma is None else [Mechanism(sigma, rate, per_round)]
    return [*once, *[*steps, *extra] * rounds]


@functools.lru_cache(maxsize=256)  # pure; PRV's search takes seconds, every round asks
def planned_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    local_epochs: int,
    sample_rate_: float,
    accountant: str = "rdp",
    eval_noise: float = 0.0,
    count_noise: float = 0.0,
) -> float:
    """The noise multiplier for a client that takes part in every one of ``rounds`` rounds
    (and, with ``eval_noise`` > 0, releases a noised local evaluation after each; with
    ``count_noise`` > 0, releases the DP count of its training rows once) so that it spends
    ``target_epsilon``; a client that is sampled less often spends less."""
    if not (target_epsilon > 0 and 0 < delta < 1 and rounds > 0 and 0 < sample_rate_ <= 1):
        raise ValueError("need target epsilon > 0, 0 < delta < 1, rounds > 0, 0 < rate <= 1")
    per_round = local_epochs * round(1 / sample_rate_)
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate_,
        steps=per_round * rounds,
        accountant=accountant,
    )
    if not (eval_noise > 0 or count_noise > 0):
        return float(sigma)

    def spends(noise: float | None) -> float:
        history = _planned(noise, sample_rate_, per_round, rounds, eval_noise, count_noise)
        return epsilon(history, delta, accountant)

    if spends(None) >= target_epsilon:  # what is left for the training
        raise ValueError(
            f"the local evaluations (noise {eval_noise}) and the row count (noise "
            f"{count_noise}) alone spend epsilon {target_epsilon} or more over {rounds} "
            "rounds; raise their noise"
        )
    # The training alone at the target: a little more noise makes room for the rest. The
    # count costs little (0.06% more noise on the medical recipe), so the first step, 0.1%,
    # usually fits at once; else the step doubles, then bisection to within 0.1%.
    low, high, step = sigma, sigma * 1.001, 0.001
    while spends(high) > target_epsilon:
        low, step = high, 2 * step
        high = sigma * (1 + step)
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if spends(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return float(high)


def plan(
    target_epsilon: float,
    delta: float,
    rounds: int,
    local_epochs: int,
    sample_rate_: float,
    accountant: str = "rdp",
    eval_noise: float = 0.0,
    count_noise: float = 0.0,
) -> Plan:
    """:func:`planned_noise` with the epsilon it reaches after each round (``privatune
    plan``; a client needs the noise alone)."""
    sigma = planned_noise(
        target_epsilon,
        delta,
        rounds,
        local_epochs,
        sample_rate_,
        accountant,
        eval_noise,
        count_noise,
    )
    per_round = local_epochs * round(1 / sample_rate_)
    curve = [
        epsilon(
            _planned(sigma, sample_rate_, per_round, r, eval_noise, count_noise), delta, accountant
        )
        for r in range(1, rounds + 1)
    ]
    return Plan(sigma, sample_rate_, per_round, rounds, curve)
