"""A real simulation where one institution's data breaks after the run started (the start
refuses a file that is broken already): it fails every round with a fixed one-line reason
the server records under its name, and the federation finishes with the other two."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
from helpers import simulate
from privatune.client.app import DATA_FAILED
from privatune.common.privacy.audit import audit, notes


@pytest.mark.simulation
def test_a_failing_institution_does_not_stop_the_run(tiny_flat, federation_dir):
    bad = federation_dir / "hospital-c.csv"

    def break_the_file(msg, context, call_next):
        """hospital-c's file is edited once the run is under way (node 2, first message)."""
        if context.node_config["partition-id"] == 2 and "odd" not in bad.read_text():
            bad.write_text("text,label\nfine,positive\nodd,maybe\n" + "ok,negative\n" * 30)
        return call_next(msg, context)

    flat = {**tiny_flat, "federation.min-train-nodes": 2}
    simulate(flat, mods=[break_the_file])
    run_dir = Path(flat["run.output-dir"]) / "test-run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines[1:]:
        ((who, reason),) = line["failed"].items()
        assert who == "hospital-c"  # by name (the reason names the institution)
        assert reason == DATA_FAILED  # fixed text: nothing of the data in it
        assert sorted(line["epsilon"]) == ["hospital-a", "hospital-b"]
    assert not (run_dir / "privacy" / "hospital-c.jsonl").exists()  # never trained
    results = audit(run_dir)
    assert all(r.ok for r in results)
    assert any(n.startswith(f"{who} failed in round(s) 1, 2: ") for n in notes(run_dir, results))
    report = html.unescape((run_dir / "report.html").read_text())
    assert f"{who}: {reason}" in report
    per_class = report.split("<h2>Per class (test set, final adapter)</h2>")[1]
    assert all(f"<td>{label}</td>" in per_class for label in ("negative", "neutral", "positive"))
    # The signing keys and anchors stay beside the run folder an auditor receives, never in it.
    assert not [p for p in run_dir.rglob("*") if p.suffix in (".key", ".anchor")]
    keys = sorted((run_dir.parent / ".node-state" / "test-run").glob("*.key"))
    assert [k.stem for k in keys] == ["hospital-a", "hospital-b"]
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
