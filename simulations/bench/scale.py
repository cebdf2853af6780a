"""Simulation scale: rounds per minute and peak memory of a Flower simulation with 10, 100 and
1000 simulated institutions (tiny model, DP on), a fraction of them sampled per round.

Each size runs in its own process, so that its memory is its own and a size that hangs or
runs out of memory is stopped and recorded instead of taking the benchmark down. The parent
samples the resident memory of that process and all its descendants (Ray's GCS, raylet and
workers) every 0.2 s with psutil and keeps the peak. A client mod times every ClientApp call
in its worker; the busiest worker's time inside ``train`` calls, over the round's wall time,
is the round's share in client training (the rest is Flower, Ray, aggregation, evaluation).

The same measurement runs once more on the default scenario as ``make run`` runs it (the
real MiniLM, six hospitals, every one of them every round), where the round's time is split
into client training, client evaluation, the server's central evaluation (timed by the
server, ``central_eval_seconds`` in ``metrics.jsonl``) and the rest: Flower, Ray,
serialisation, validation, aggregation and checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
from privatune.common.protocol import SERVER_ROUND, read_lines
from privatune.simulations.bench.shared import (
    bench_flat,
    even_split,
    fmt,
    model_overrides,
    review_sample,
    table_head,
    tiny_model,
    write_federation,
)
from privatune.simulations.prepare import prepare
from privatune.simulations.scenario import load_scenario
from privatune.simulations.simulate import resolve_flat, run_flat, simulate

FULL = {
    "sizes": (10, 100, 1000),
    "fraction": 0.1,
    "rounds": 2,
    "timeout_s": 480,
    "scenario": "hospitals-small",
    "scenario_rounds": 3,
}
QUICK = {
    "sizes": (4,),
    "fraction": 0.5,
    "rounds": 1,
    "timeout_s": 240,
    "scenario": "hospitals-small",
    "scenario_rounds": 1,
}
ROWS_PER_SITE = 24
TARGET_OUTSIDE_SHARE = 0.10
REST = "Flower, Ray, serialisation, validation, aggregation, checkpointing"


def timing_mod(path: str):
    """A Flower client mod that appends (round, message type, worker pid, seconds) per call."""

    def timed(msg, context, call_next):
        start = time.perf_counter()
        reply = call_next(msg, context)
        config = msg.content.config_records.get("config", {})
        entry = {
            "round": int(config.get(SERVER_ROUND, 0)),
            "type": msg.metadata.message_type,
            "pid": os.getpid(),
            "seconds": time.perf_counter() - start,
        }
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return reply

    return timed


def child(size: int, fraction: float, rounds: int, work: Path) -> None:
    """One simulation of ``size`` institutions (runs in the child process)."""
    train, test = review_sample(size * ROWS_PER_SITE, seed=size)
    data = write_federation(work / "data", even_split(train, size), test.head(40))
    overrides = {
        "model.name": str(tiny_model(work.parent)),
        "model.max-length": 32,
        "train.batch-size": 8,
        "federation.rounds": rounds,
        "federation.fraction-train": fraction,
        "federation.fraction-evaluate": fraction,
        "federation.min-train-nodes": 2,
        "federation.min-available-nodes": size,
    }
    run_flat(
        bench_flat(data, work / "run", overrides), size, [timing_mod(str(work / "calls.jsonl"))]
    )


def scenario_child(name: str, rounds: int, quick: bool, work: Path) -> None:
    """The scenario as ``make run`` runs it, for ``rounds`` rounds (in the child process);
    quick: the tiny BERT. Its data is prepared into ``work``, the same split as
    ``privatune prepare`` writes."""
    overrides = {
        **model_overrides(quick, work.parent),
        "federation.rounds": rounds,
        "run.name": "run",
        "run.output-dir": str(work),
        "data.dir": str(work / "data"),
        "data.test-path": str(work / "data" / "test.csv"),
    }
    scenario = load_scenario(name)  # simulate() prepares only into data/<scenario>
    prepare(scenario, int(resolve_flat(scenario, overrides)["run.seed"]), work / "data")
    simulate(scenario, overrides, mods=[timing_mod(str(work / "calls.jsonl"))])


CHILDREN = {"sizes": child, "scenario": scenario_child}


def summarise(work: Path) -> list[dict[str, Any]]:
    """Per-round wall time and the busiest worker's time in ClientApp calls, from the run."""
    busy: dict[tuple[int, str], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    clients: dict[int, int] = defaultdict(int)
    for line in (work / "calls.jsonl").read_text().splitlines():
        c = json.loads(line)
        busy[(c["round"], c["type"])][c["pid"]] += c["seconds"]
        clients[c["round"]] += c["type"] == "train"
    rounds = []
    for m in read_lines(work / "run"):
        if m["round"] == 0:
            continue
        train = max(busy[(m["round"], "train")].values(), default=0.0)
        evaluate = max(busy[(m["round"], "evaluate")].values(), default=0.0)
        rounds.append(
            {
                "round": m["round"],
                "clients": clients[m["round"]],
                "seconds": m["seconds"],
                "busiest_worker_train_seconds": round(train, 2),
                "busiest_worker_evaluate_seconds": round(evaluate, 2),
                "central_eval_seconds": m.get("central_eval_seconds", 0.0),
                "outside_training_share": round(1 - train / m["seconds"], 3),
                "outside_client_share": round(1 - (train + evaluate) / m["seconds"], 3),
            }
        )
    return rounds


def measure(call: list[Any], timeout_s: float, work: Path) -> dict[str, Any]:
    """Run ``CHILDREN[call[0]](*call[1:], work)`` in a child process, sampling its process
    tree's memory until it ends."""
    work.mkdir(parents=True, exist_ok=True)
    args = json.dumps([*call, str(work)])
    started = time.monotonic()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "privatune.simulations.bench.scale", args],
            stdout=log,
            stderr=log,
        )
        peak, status = 0, "ok"
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
            except psutil.Error:
                continue  # the child just ended; poll() says so next
            rss = 0
            for p in tree:
                with contextlib.suppress(psutil.Error):  # ended between listing and reading
                    rss += p.memory_info().rss
            peak = max(peak, rss)
            if time.monotonic() - started > timeout_s:
                status = f"stopped after {timeout_s:.0f} s (time limit)"
                for p in reversed(tree):  # our child and the Ray processes it started
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                break
            time.sleep(0.2)
        proc.wait()
    wall = time.monotonic() - started
    result: dict[str, Any] = {
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(peak / 2**20),
        "status": status,
    }
    if status == "ok" and proc.returncode != 0:
        tail = (work / "log.txt").read_text().strip().splitlines()[-3:]
        result["status"] = f"failed (exit {proc.returncode}): {' / '.join(tail)[:300]}"
    return describe(result, work)


def describe(result: dict[str, Any], work: Path) -> dict[str, Any]:
    """Add the per-round numbers of a finished (or stopped) size. The first round pays for
    the Ray workers' imports and first model load, so it is reported apart; rounds per
    minute and the share outside training are those of the later (steady) rounds."""
    if not ((work / "calls.jsonl").is_file() and (work / "run" / "metrics.jsonl").is_file()):
        return result
    rounds = summarise(work)
    if not rounds:
        return {**result, "rounds": rounds}
    later = rounds[1:] or rounds
    mean = sum(r["seconds"] for r in later) / len(later)
    return {
        **result,
        "rounds": rounds,
        "first_round_seconds": rounds[0]["seconds"],
        "later_round_seconds": round(mean, 2),
        "rounds_per_minute": round(60 / mean, 2),
        "startup_seconds": round(result["wall_seconds"] - sum(r["seconds"] for r in rounds), 1),
        "outside_training_share_first_round": rounds[0]["outside_training_share"],
        "outside_training_share": round(
            sum(r["outside_training_share"] for r in later) / len(later), 3
        ),
        "shares": shares(later),
    }


def shares(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """What share of the rounds' summed wall time each part took; the rest is ``REST``."""
    total = sum(r["seconds"] for r in rounds)
    parts = {
        part: sum(r[key] for r in rounds) / total
        for part, key in (
            ("client training", "busiest_worker_train_seconds"),
            ("client evaluation", "busiest_worker_evaluate_seconds"),
            ("central evaluation", "central_eval_seconds"),
        )
    }
    return {k: round(v, 3) for k, v in {**parts, "the rest": 1 - sum(parts.values())}.items()}


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    grid = QUICK if quick else FULL
    work = out_dir / "work" / "scale"
    sizes = []
    for size in grid["sizes"]:
        call = ["sizes", size, grid["fraction"], grid["rounds"]]
        sizes.append(
            {
                "institutions": size,
                "sampled_per_round": max(2, int(size * grid["fraction"])),
                **measure(call, grid["timeout_s"], work / str(size)),
            }
        )
        if sizes[-1]["status"] != "ok":
            break  # larger sizes will not do better
    call = ["scenario", grid["scenario"], grid["scenario_rounds"], quick]
    scenario = {
        "scenario": grid["scenario"],
        "model": "tiny random BERT" if quick else "all-MiniLM-L6-v2 (the default run's)",
        **measure(call, 2 * grid["timeout_s"], work / "scenario"),
    }
    return {
        "benchmark": "scale",
        "quick": quick,
        "model": "tiny random BERT (2 layers, hidden 32), DP-SGD on",
        "grid": grid,
        "rows_per_institution": ROWS_PER_SITE,
        "memory_method": "psutil RSS of the simulation process and its descendants, 0.2 s samples",
        "sizes": sizes,
        "default_scenario": scenario,
        "target_outside_share": TARGET_OUTSIDE_SHARE,
    }


def table(result: dict[str, Any]) -> str:
    rows = table_head(
        "institutions",
        "sampled / round",
        "s / round (first, later)",
        "rounds / min (later)",
        "peak memory (MiB)",
        "startup (s)",
        "outside client training (first, later)",
        "status",
    )
    for s in result["sizes"]:
        first, later = s.get("outside_training_share_first_round"), s.get("outside_training_share")
        share = "-" if first is None else f"{first:.0%}, {later:.0%}"
        rows.append(
            f"| {s['institutions']} | {s['sampled_per_round']} "
            f"| {fmt(s.get('first_round_seconds'), 1)}, {fmt(s.get('later_round_seconds'), 1)} "
            f"| {fmt(s.get('rounds_per_minute'))} | {s['peak_rss_mib']:,} "
            f"| {fmt(s.get('startup_seconds'), 1)} | {share} | {s['status']} |"
        )
    return (
        f"### Simulation scale (tiny model, {result['grid']['rounds']} rounds, "
        f"target <= {result['target_outside_share']:.0%} outside client training)\n\n"
        + "\n".join(rows)
        + "\n\n"
        + scenario_table(result)
    )


def scenario_table(result: dict[str, Any]) -> str:
    """Where the default scenario's round time goes, later rounds together."""
    s = result["default_scenario"]
    parts = s.get("shares", {})
    rows = table_head("first round (s)", "later rounds (s, mean)", *parts, "status")
    rows.append(
        f"| {fmt(s.get('first_round_seconds'), 1)} | {fmt(s.get('later_round_seconds'), 1)} "
        + "".join(f"| {v:.0%} " for v in parts.values())
        + f"| {s['status']} |"
    )
    return (
        f"### Default scenario's round time ({s['scenario']}, {s['model']}, "
        f"{result['grid']['scenario_rounds']} rounds; the rest: {REST})\n\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    kind, *args, folder = json.loads(sys.argv[1])
    CHILDREN[kind](*args, Path(folder))
