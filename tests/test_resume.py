"""Crash and resume: kill a running simulation after round 2 of 4 (the whole process tree,
Ray included), resume it, and compare with an uninterrupted run on the same seed."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
from helpers import start_run
from privatune.common.privacy.audit import audit
from privatune.simulations.simulate import resume, run_flat
from safetensors.numpy import load_file


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


@pytest.mark.simulation
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_flat, tmp_path):
    flat = {
        **tiny_flat,
        "federation.rounds": 4,
        "dp.noise-multiplier": 1.0,
        "privacy.max-epsilon": 1000.0,
        "privacy.insecure-seed": 5,  # testing switch: the two runs draw the same noise
        "data.eval-fraction": 0.25,
    }
    reference = run_flat({**flat, "run.name": "uninterrupted"}, 3)

    crashed = {**flat, "run.name": "crashed"}
    proc = start_run(crashed, tmp_path / "crashed.json")
    run_dir = tmp_path / "outputs" / "crashed"
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "round-002").exists():
            assert proc.poll() is None, "the simulation ended before round 2"
            assert time.monotonic() < deadline, "no round-2 checkpoint in time"
            time.sleep(0.1)
    finally:
        _kill_tree(proc)
    assert not (run_dir / "adapter").exists()  # it really died before finishing

    resumed = resume(run_dir)
    final = load_file(resumed / "adapter" / "adapter_model.safetensors")
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert set(final) == set(expected)
    for name in expected:
        np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, atol=1e-6)
    rounds = [json.loads(x)["round"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3, 4]
    # the only findings: the fixed seed this test needs, which the audit rightly flags
    problems = [p for r in audit(resumed) for p in r.problems]
    assert problems and all("predictable (testing only)" in p for p in problems), problems
