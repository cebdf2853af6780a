"""A real simulation where one institution's data is broken: it fails every round with a
fixed one-line reason the server records, and the federation finishes with the other two."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import simulate

from client.app import DATA_FAILED
from common.audit import audit
from common.protocol import error_reason


def test_a_failing_institution_does_not_stop_the_run(tiny_flat, federation_dir):
    bad = federation_dir / "hospital-c.csv"
    bad.write_text("text,label\nfine,positive\nodd,maybe\n" + "ok,negative\n" * 30)
    flat = {**tiny_flat, "federation.min-train-nodes": 2}
    simulate(flat)
    run_dir = Path(flat["run.output-dir"]) / "test-run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines[1:]:
        (reason,) = line["failed"].values()
        assert reason == error_reason("hospital-c", DATA_FAILED)  # nothing of the data in it
        assert sorted(line["epsilon"]) == ["hospital-a", "hospital-b"]
    assert not (run_dir / "privacy" / "hospital-c.jsonl").exists()  # never trained
    assert all(r.ok for r in audit(run_dir))
    # The signing keys and anchors stay beside the run folder an auditor receives, never in it.
    assert not [p for p in run_dir.rglob("*") if p.suffix in (".key", ".anchor")]
    keys = sorted((run_dir.parent / ".node-state" / "test-run").glob("*.key"))
    assert [k.stem for k in keys] == ["hospital-a", "hospital-b"]
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
