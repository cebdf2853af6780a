"""The privacy ledger and its audit, checked against Opacus and dp-accounting directly."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import dp_accounting
import pytest
from helpers import PROJECT_ROOT
from opacus.accountants import RDPAccountant
from privatune.cli.main import app as cli
from privatune.common.privacy.accounting import NEIGHBOURING, Mechanism, epsilon, plan
from privatune.common.privacy.audit import audit, notes, to_html
from privatune.common.privacy.ledger import Ledger, LedgerError, read_records, spent, verify_chain
from typer.testing import CliRunner

DELTA = 1e-5


def _append(ledger: Ledger, run: str, rnd: int, mech: Mechanism, budget=8.0):
    history = [*spent(ledger.records), mech]
    return ledger.append(
        institution="hospital-a",
        run_id=run,
        round=rnd,
        time="2026-11-23T00:00:00+00:00",
        status="trained",
        noise_multiplier=mech.noise_multiplier,
        sample_rate=mech.sample_rate,
        steps=mech.steps,
        max_grad_norm=1.0,
        delta=DELTA,
        accountant="rdp",
        max_epsilon=budget,
        epsilon=epsilon(history, DELTA),
        noise_source="os-csprng",
        data_fingerprint="d" * 64,
        adapter_fingerprint="a" * 64,
    )


@pytest.fixture()
def ledger_path(tmp_path):
    path = tmp_path / "privacy" / "hospital-a.jsonl"
    ledger = Ledger.create(path, "hospital-a")
    for rnd in (1, 2, 3):
        _append(ledger, "run-1", rnd, Mechanism(1.1, 0.2, 5))
    return path


def test_ledger_epsilon_equals_opacus_and_dp_accounting(ledger_path):
    _, *records = read_records(ledger_path)
    acc = RDPAccountant()
    pld = dp_accounting.pld.PLDAccountant()
    for rec in records:
        acc.history.append((rec.noise_multiplier, rec.sample_rate, rec.steps))
        assert rec.epsilon == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
        pld.compose(
            dp_accounting.PoissonSampledDpEvent(
                rec.sample_rate, dp_accounting.GaussianDpEvent(rec.noise_multiplier)
            ),
            rec.steps,
        )
        # PLD is tighter than RDP; both bound the same mechanism (stated tolerance: 25%).
        assert 0.75 * rec.epsilon < pld.get_epsilon(DELTA) <= rec.epsilon
    (result,) = audit(ledger_path.parent.parent)
    assert result.ok and result.rounds == 3 and result.steps == 15
    assert result.epsilon_dp_accounting == pytest.approx(result.epsilon_claimed, rel=1e-2)


@pytest.mark.parametrize(
    "field,value", [("epsilon", 0.5), ("noise_multiplier", 5.0), ("steps", 1), ("round", 9)]
)
def test_editing_any_field_fails_and_names_the_record(ledger_path, field, value):
    lines = ledger_path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec[field] = value
    lines[1] = json.dumps(rec, sort_keys=True)
    ledger_path.write_text("\n".join(lines) + "\n")
    (result,) = audit(ledger_path)
    assert not result.ok and "record 2" in result.problems[0]


def test_deleting_or_reordering_records_fails(ledger_path):
    lines = ledger_path.read_text().splitlines()
    ledger_path.write_text("\n".join([lines[0], lines[2], lines[3]]) + "\n")
    (deleted,) = audit(ledger_path)
    assert "record 2" in deleted.problems[0] and "prev_hash" in deleted.problems[0]
    ledger_path.write_text("\n".join([lines[0], lines[2], lines[1], lines[3]]) + "\n")
    (reordered,) = audit(ledger_path)
    assert "record 2" in reordered.problems[0]
    with pytest.raises(LedgerError):
        Ledger(ledger_path)  # a client refuses to train on a tampered ledger


def test_recomputed_epsilon_catches_a_consistent_rewrite(ledger_path):
    """Someone holding the institution's key who rewrites a record and re-signs the chain
    still fails: the claimed epsilon no longer follows from the mechanism."""
    records = Ledger(ledger_path).records
    forged_path = ledger_path.with_name("forged.jsonl")
    forged = Ledger.create(forged_path, "hospital-a", ledger_path.with_name("hospital-a.jsonl.key"))
    for i, rec in enumerate(records[1:]):
        fields = {k: getattr(rec, k) for k in ("run_id", "round", "time", "status")}
        fields.update(
            {k: getattr(rec, k) for k in ("noise_multiplier", "sample_rate", "steps", "delta")}
        )
        forged.append(
            **fields,
            institution="hospital-a",
            max_grad_norm=1.0,
            accountant="rdp",
            max_epsilon=8.0,
            epsilon=1.0 if i == 1 else rec.epsilon,
            noise_source="os-csprng",
            data_fingerprint="",
            adapter_fingerprint="",
        )
    verify_chain(forged_path, read_records(forged_path))  # chain and signatures are fine...
    (result,) = audit(forged_path)
    assert not result.ok and "record 3" in result.problems[0] and "epsilon" in result.problems[0]


def test_two_runs_compose_under_a_lifetime_budget(ledger_path):
    ledger = Ledger(ledger_path)
    first = ledger.records[-1].epsilon
    rec = _append(ledger, "run-2", 1, Mechanism(1.1, 0.2, 5))
    assert rec.epsilon > first  # run 2 starts from run 1's spend
    (result,) = audit(ledger_path)
    assert result.ok and result.runs == 2


def test_crash_mid_write_leaves_a_verifiable_ledger(ledger_path):
    """Kill a writer process while it appends in a loop; the ledger must still verify."""
    script = f"""
from privatune.common.privacy.ledger import Ledger
ledger = Ledger({str(ledger_path)!r})
print("ready", flush=True)
for r in range(4, 400):
    ledger.append(
        institution="hospital-a", run_id="run-1", round=r, time="t", status="refused",
        noise_multiplier=1.1, sample_rate=0.2, steps=0, max_grad_norm=1.0, delta={DELTA},
        accountant="rdp", max_epsilon=8.0, epsilon=ledger.records[-1].epsilon,
        noise_source="os-csprng", data_fingerprint="d", adapter_fingerprint="",
    )
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    records = read_records(ledger_path)
    verify_chain(ledger_path, records)
    assert len(records) > 3  # the writer got some appends in before it was killed
    (result,) = audit(ledger_path)
    assert result.ok, result.problems


def test_planner_meets_the_target():
    p = plan(8.0, DELTA, rounds=6, local_epochs=2, sample_rate_=0.2)
    assert p.epsilon_per_round[-1] <= 8.0 and p.epsilon_per_round[-1] > 7.9
    acc = RDPAccountant()
    acc.history = [(p.noise_multiplier, 0.2, p.steps_per_round * 6)]
    assert acc.get_epsilon(DELTA) == pytest.approx(p.epsilon_per_round[-1], rel=1e-9)
    assert all(
        a < b for a, b in zip(p.epsilon_per_round[:-1], p.epsilon_per_round[1:], strict=True)
    )
    assert math.isinf(epsilon([Mechanism(0.0, 0.2, 5)], DELTA))


def _run_folder(root, heads: dict, failed: dict | None = None):
    """A run folder's metrics.jsonl recording these ledger heads (institution -> ledger)."""
    root.mkdir(parents=True, exist_ok=True)
    line = {
        "round": 1,
        "failed": failed or {},
        "ledger_heads": {who: [len(records), records[-1].hash] for who, records in heads.items()},
    }
    (root / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    return root


def test_a_missing_ledger_with_recorded_heads_fails_the_run_audit(ledger_path):
    run = ledger_path.parent.parent
    records = read_records(ledger_path)
    _run_folder(run, {"hospital-a": records, "hospital-b": records})
    results = audit(run)
    assert [r.institution for r in results] == ["hospital-a", "hospital-b"]
    assert results[0].ok and results[0].anchors == 1
    assert not results[1].ok and "hospital-b.jsonl: missing" in results[1].problems[0]
    out = CliRunner().invoke(cli, ["audit", str(run)])
    assert out.exit_code == 1 and "hospital-b" in out.output


def test_anchors_from_several_runs(ledger_path, tmp_path):
    first = _run_folder(tmp_path / "run-1", {"hospital-a": read_records(ledger_path)})
    _append(Ledger(ledger_path), "run-2", 1, Mechanism(1.1, 0.2, 5))
    second = _run_folder(tmp_path / "run-2", {"hospital-a": read_records(ledger_path)})
    (result,) = audit(ledger_path, [first, second])
    assert result.ok and result.anchors == 2
    out = CliRunner().invoke(
        cli, ["audit", str(ledger_path), "--anchors", str(first), "--anchors", str(second)]
    )
    assert out.exit_code == 0, out.output
    assert "  2  " in out.output.splitlines()[1]  # the anchors column
    # a rewritten ledger fails against the later run's recorded head
    lines = ledger_path.read_text().splitlines()
    ledger_path.write_text("\n".join(lines[:-1]) + "\n")
    (result,) = audit(ledger_path, [first, second])
    assert not result.ok and "truncated or rewritten" in result.problems[0]


def test_audit_states_accountant_tolerance_delta_and_neighbouring(ledger_path):
    out = CliRunner().invoke(cli, ["audit", str(ledger_path.parent.parent)])
    assert out.exit_code == 0, out.output
    assert "Opacus' RDP accountant" in out.output and "within 1%" in out.output
    assert "may exceed the budget" in out.output and f"delta {DELTA:g}" in out.output
    assert NEIGHBOURING in out.output.replace("\n", " ")
    row = out.output.splitlines()[1].split()
    assert row[-3:] == ["rdp", f"{DELTA:g}", "OK"]


def test_a_deployment_run_folder_says_where_the_ledgers_are(ledger_path, tmp_path):
    """No privacy/ folder: metrics.jsonl is never read as a ledger, and the report of such
    a run does not say the audit failed."""
    run = _run_folder(
        tmp_path / "deployed", {"hospital-a": read_records(ledger_path)}, {"clinic-z": "no rows"}
    )
    assert audit(run) == []
    out = CliRunner().invoke(cli, ["audit", str(run)])
    assert out.exit_code == 0, out.output
    assert f"privatune audit LEDGER --anchors {run}" in out.output
    assert "heads recorded for: hospital-a" in out.output
    assert "clinic-z failed in round(s) 1: no rows" in out.output
    assert "ledger_heads" not in out.output and "FAIL" not in out.output
    assert "Audit FAILED" not in to_html(audit(run), notes(run, audit(run)))
