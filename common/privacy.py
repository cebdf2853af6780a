"""Privacy accounting for DP-SGD with Poisson sampling, composed across every round (and,
with a lifetime budget, every run) an institution took part in.

A history is a list of :class:`Mechanism` entries, one per round, exactly what Opacus'
accountants keep (noise multiplier, sample rate, steps). The cumulative epsilon is always
recomputed from the whole history with a fresh accountant, never summed per round, which is
the mistake of a fresh PrivacyEngine per round. :func:`independent_epsilon` recomputes the
same with Google's dp-accounting library, so audits need not trust Opacus either.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dp_accounting
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's per-order chatter
# Opacus' RDP: the bound is valid either way (only a larger alpha could tighten it).
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


class Mechanism(NamedTuple):
    """One round of a Poisson-subsampled Gaussian mechanism (DP-SGD)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """What Opacus' Poisson DataLoader runs per epoch: one step per expected batch."""
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus sets the Poisson rate to 1 / len(loader)."""
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
        # Opacus' default orders from 2 up (dp-accounting drops the fractional ones below 2
        # as numerically unstable), so that both RDP computations are comparable.
        orders = [1 + x / 10.0 for x in range(10, 100)] + list(range(12, 64))
        acc: dp_accounting.PrivacyAccountant = dp_accounting.rdp.RdpAccountant(orders)
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


@dataclass(frozen=True)
class Plan:
    """A noise multiplier that spends ``target_epsilon`` over a whole planned training."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon_per_round: list[float]  # cumulative epsilon after each round


def plan(
    target_epsilon: float,
    delta: float,
    rounds: int,
    local_epochs: int,
    sample_rate_: float,
    accountant: str = "rdp",
) -> Plan:
    """Noise for a client that takes part in every one of ``rounds`` rounds; a client that is
    sampled less often spends less. Used by the client and by ``privatune plan``."""
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
    curve = [
        epsilon([Mechanism(sigma, sample_rate_, per_round)] * r, delta, accountant)
        for r in range(1, rounds + 1)
    ]
    return Plan(float(sigma), sample_rate_, per_round, rounds, curve)
