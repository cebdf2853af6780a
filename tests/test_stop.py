"""Stopping a run the way schedulers do: SIGTERM to a real simulation mid-round ends it
within seconds, with Ray and every worker gone, files consistent, how to resume printed
and a non-zero exit; the run then resumes to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from helpers import start_run
from privatune.common.privacy.audit import audit
from privatune.server.views import run_status
from privatune.simulations.simulate import resume

pytestmark = pytest.mark.simulation


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_mid_round_stops_cleanly_and_the_run_resumes(tiny_flat, tmp_path):
    flat = {**tiny_flat, "federation.rounds": 3, "run.name": "stopped"}
    proc = start_run(
        flat,
        tmp_path / "stopped.json",
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so that cleanup can reach all of it
    )
    run_dir = tmp_path / "outputs" / "stopped"
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "round-001").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no round-1 checkpoint in time"
            time.sleep(0.1)
        time.sleep(1.0)  # round 2 is under way
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert family, "Ray started no processes"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert took < 30
    assert f"resume with: privatune simulate --resume {run_dir}" in err
    deadline = time.monotonic() + 10  # Ray's workers notice their raylet is gone
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(family), [psutil.Process(p).cmdline()[:3] for p in _alive(family)]
    assert not (run_dir / "adapter").exists()
    assert run_status(run_dir) == "stopped"  # what the dashboard shows
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"round-{r:03d}" for r in rounds[1:]]  # both or neither per round

    resumed = resume(run_dir)
    assert (resumed / "adapter" / "adapter_model.safetensors").is_file()
    assert run_status(resumed) == "finished"
    rounds = [json.loads(x)["round"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]
    assert all(r.ok for r in audit(resumed)), [r.problems for r in audit(resumed)]
