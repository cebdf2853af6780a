"""The empirical audit (``privatune canary``): the one-run bound against a direct binomial
computation, its false-alarm rate, and real federations with planted canaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats
from typer.testing import CliRunner

from common.adapter import adapter_fingerprint
from common.cli import app
from common.empirical import (
    RESULT,
    above_claim,
    audit_scores,
    lower_bound,
    measured_lower,
    p_value,
    verdict,
)
from common.ledger import read_records
from simulations.canary import run_canary_audit
from simulations.scenario import load_scenario


def _direct(r: int, v: int, confidence: float) -> float:
    """delta = 0: the epsilon at which P[Binomial(r, e^eps / (1 + e^eps)) >= v] = 1 - conf."""
    alpha = 1 - confidence

    def gap(eps: float) -> float:
        return stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-eps))) - alpha

    return 0.0 if gap(0.0) >= 0 else optimize.brentq(gap, 0.0, 50.0)


@pytest.mark.parametrize(("m", "r", "v"), [(1000, 100, 100), (1000, 100, 90), (200, 50, 40)])
def test_the_bound_is_the_binomial_one_when_delta_is_zero(m, r, v):
    assert lower_bound(m, r, v, 0.0) == pytest.approx(_direct(r, v, 0.95), abs=1e-6)


def test_the_bound_matches_the_papers_arithmetic_and_pays_for_delta():
    # all of 100 guesses right at 95%: q^100 = 0.05, so eps = log(q / (1 - q)) = 3.49
    q = 0.05 ** (1 / 100)
    assert lower_bound(100, 100, 100, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert lower_bound(1000, 100, 100, 1e-5) < lower_bound(1000, 100, 100, 0.0)
    assert lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance level proves nothing
    assert p_value(1000, 100, 70, 1.0, 1e-5) > p_value(1000, 100, 70, 0.5, 1e-5)  # rises


def test_random_scores_raise_a_false_alarm_at_most_at_the_stated_rate():
    """A mechanism that ignores the data (epsilon 0): the bound exceeds 0 in no more than
    1 - confidence of the trials (plus three binomial standard deviations)."""
    rng = np.random.default_rng(1)
    trials, alarms = 400, 0
    for _ in range(trials):
        result = audit_scores(rng.random(200), rng.random(200) < 0.5, 1e-5, 0.95)
        alarms += result.epsilon_lower > 0
    assert alarms <= 0.05 * trials + 3 * math.sqrt(0.05 * 0.95 * trials)


def test_perfect_scores_give_the_largest_bound_the_guesses_allow():
    included = np.arange(200) % 2 == 0
    result = audit_scores(included.astype(float), included, 0.0, 0.95)
    assert result.guesses == 200 and result.correct == 200
    # the confidence is split over the 5 guess counts tried: 99% each (Bonferroni)
    assert result.epsilon_lower == pytest.approx(_direct(200, 200, 0.99), abs=1e-6)
    with_delta = audit_scores(included.astype(float), included, 1e-5, 0.95).epsilon_lower
    assert 3.5 < with_delta < result.epsilon_lower


RUN = CliRunner()
CANARY = ["canary", "--scenario", "hospitals-small-probe", "--canaries", "400", "--into", "3"]
FAST = ["--set", "federation.rounds=2", "--set", "train.local-epochs=15"]


@pytest.fixture(scope="module")
def memorising_run(tmp_path_factory):
    """No DP, many epochs: the probe memorises the included canaries' random labels."""
    out = tmp_path_factory.mktemp("canary")
    args = [*CANARY, *FAST, "--set", "dp.enabled=false", "--set", "privacy.allow-non-private=true"]
    result = RUN.invoke(app, [*args, "--set", "run.name=plain", "--set", f'run.output-dir="{out}"'])
    assert result.exit_code == 0, result.output
    return out / "plain"


@pytest.mark.simulation
def test_without_dp_the_audit_has_power(memorising_run):
    result = json.loads((memorising_run / RESULT).read_text())
    assert result["claimed_epsilon"] is None
    measured = measured_lower(result)
    assert measured > 0.1  # 0.56-0.66 in the runs watched
    assert "Empirical privacy audit" in (memorising_run / "report.html").read_text()
    # the scenario's own files were copied, never written to
    assert not any("canary" in p.name for p in (memorising_run.parent).glob("*.csv"))


@pytest.mark.simulation
def test_the_updates_auditor_scores_what_each_institution_sent(memorising_run):
    """The third auditor reads each planted institution's reply of every round as the server
    received it: the kept tensors are the very adapters the institutions' ledgers signed."""
    result = json.loads((memorising_run / RESULT).read_text())
    assert set(result) >= {"black_box", "white_box", "updates"} and len(result["into"]) == 3
    assert result["updates"]["confidence"] == pytest.approx(1 - 0.05 / 3)  # split three ways
    kept = memorising_run.parent / "plain-canary-updates"
    for name in result["into"]:
        signed = {
            r.round: r.adapter_fingerprint
            for r in read_records(memorising_run / "privacy" / f"{name}.jsonl")
            if r.status == "trained"
        }
        files = sorted((kept / name).glob("round-*.npz"))
        assert [int(f.stem.split("-")[1]) for f in files] == sorted(signed) == [1, 2]
        for f in files:
            with np.load(f) as arrays:
                assert adapter_fingerprint(dict(arrays)) == signed[int(f.stem.split("-")[1])]


@pytest.mark.simulation
def test_noise_off_while_the_ledgers_claim_dp_is_caught(tmp_path):
    """A broken mechanism in a real federation: a client mod runs every training with
    Opacus' noise switched off, while the clients plan, record and sign the noise for
    epsilon 0.25. The ledgers and `privatune audit`'s arithmetic cannot see it; the canaries
    measure a bound above the claim, and the verdict and exit status say so."""

    def noise_off(msg, context, call_next):  # a closure: Ray ships it by value
        from unittest import mock

        import opacus.optimizers.optimizer as dp_optimizer

        def zeros(std, reference, *args, **kwargs):
            return reference.new_zeros(reference.shape)

        with mock.patch.object(dp_optimizer, "_generate_noise", zeros):
            return call_next(msg, context)

    overrides = {
        "federation.rounds": 2,  # as FAST
        "train.local-epochs": 15,
        "dp.target-epsilon": 0.25,
        "run.name": "broken",
        "run.output-dir": str(tmp_path),
    }
    scenario = load_scenario("hospitals-small-probe")
    run_dir = run_canary_audit(scenario, overrides, canaries=400, into=3, mods=[noise_off])
    measured = json.loads((run_dir / RESULT).read_text())
    assert 0.2 < measured["claimed_epsilon"] <= 0.25 + 1e-6  # what the ledgers sign
    assert above_claim(measured) and "ABOVE the claimed" in verdict(measured)  # 1.0 when watched
    audit = RUN.invoke(app, ["audit", str(run_dir)])
    assert audit.exit_code == 1 and "ABOVE" in audit.output


@pytest.mark.simulation
def test_with_dp_the_measured_bound_stays_below_the_claim(tmp_path):
    args = [*CANARY, *FAST, "--set", "dp.target-epsilon=2.0", "--set", "run.name=private"]
    result = RUN.invoke(app, [*args, "--set", f'run.output-dir="{tmp_path}"'])
    assert result.exit_code == 0, result.output
    measured = json.loads((tmp_path / "private" / RESULT).read_text())
    assert 0 < measured["claimed_epsilon"] <= 2.0 + 1e-6
    assert not above_claim(measured) and "consistent" in result.output
    audit = RUN.invoke(app, ["audit", str(tmp_path / "private")])
    assert audit.exit_code == 0 and "empirical audit" in audit.output
