"""Dashboard: how long the runs page takes for a folder of many finished runs (the issue's
target: under a second for 100 runs of 30 rounds).

The run folders are fabricated (``config.toml``, ``metrics.jsonl`` with three institutions'
epsilons, ``status.json``), without ledgers: the audit of real ledgers is cached by their
files' state and is timed by ``privatune audit``, not here. Both pages are fetched from a real
dashboard server over HTTP: the first request of each (cold: every file read and parsed) and
the median of the next ones (warm: what a browser polling every two seconds costs).
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from privatune.common.config import resolve, write_toml
from privatune.common.protocol import MetricsLine, append_line
from privatune.server.dashboard import make_server
from privatune.server.views import mark_status
from privatune.simulations.bench.shared import table_head

INSTITUTIONS = ("hospital-a", "hospital-b", "hospital-c")


def fabricate(root: Path, name: str, rounds: int, planned: int | None = None, seed: int = 0):
    """A run folder that looks like a real one to the dashboard: config, ``rounds`` metrics
    lines after round 0, a ``running`` status of this process. Also used by the tests."""
    rng = random.Random(seed)
    run_dir = Path(root) / name
    run_dir.mkdir(parents=True)
    overrides = {
        "run.name": name,
        "federation.rounds": planned or rounds,
        "data.dir": "data/hospitals-small",
    }
    write_toml(resolve(overrides), run_dir / "config.toml")
    mark_status(run_dir, "running")
    eps = dict.fromkeys(INSTITUTIONS, 0.0)
    for r in range(rounds + 1):
        if r:
            eps = {k: v + rng.uniform(0.1, 0.3) for k, v in eps.items()}
        f1 = min(0.9, 0.3 + 0.02 * r + rng.uniform(-0.02, 0.02))
        line: MetricsLine = {
            "round": r,
            "train_loss": None,
            "eval_loss": None,
            "accuracy": None,
            "macro_f1": None,
            "central_loss": 1.0 - f1 / 2,
            "central_accuracy": f1 + 0.05,
            "central_macro_f1": f1,
            "epsilon_max": max(eps.values()) if r else None,
            "epsilon": dict(eps) if r else {},
            "refused": [],
            "rejected": {},
            "failed": {},
            "bytes_sent": 600_000 if r else 0,
            "bytes_received": 600_000 if r else 0,
            "ranks": {},
            "ledger_heads": {},
            "truncation_energy_lost": None,
            "central_eval_seconds": 0.5,
            "seconds": 12.0,
        }
        append_line(run_dir, line)
    return run_dir


def _get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url) as response:
        response.read()
    return time.perf_counter() - started


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    runs, rounds, repeats = (10, 5, 3) if quick else (100, 30, 10)
    root = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    try:
        for i in range(runs):
            run_dir = fabricate(root, f"run-{i:03d}", rounds, seed=i)
            mark_status(run_dir, "finished")
        server = make_server(root, port=0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        pages = {}
        try:
            for page in ("/", "/api/"):
                cold = _get(base + page)
                warm = [_get(base + page) for _ in range(repeats)]
                pages[page] = {
                    "cold_seconds": round(cold, 4),
                    "warm_median_seconds": round(statistics.median(warm), 4),
                }
            size = len(urllib.request.urlopen(base + "/").read())
        finally:
            server.shutdown()
            server.server_close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "benchmark": "dashboard",
        "quick": quick,
        "runs": runs,
        "rounds": rounds,
        "institutions": len(INSTITUTIONS),
        "repeats": repeats,
        "pages": pages,
        "runs_page_bytes": size,
        "target_seconds": 1.0,
        "within_target": all(p["cold_seconds"] < 1.0 for p in pages.values()),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"### Dashboard runs page ({result['runs']} runs of {result['rounds']} rounds)",
        "",
        *table_head("request", "first (cold), s", f"median of {result['repeats']} (warm), s"),
    ]
    for page, t in result["pages"].items():
        lines.append(f"| GET {page} | {t['cold_seconds']:.3f} | {t['warm_median_seconds']:.3f} |")
    return "\n".join(lines)
