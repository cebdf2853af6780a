"""One entry point for the benchmarks (``make bench``), and the helpers they share.

``privatune bench.run [--quick] [--only overhead,...,lora] [--out DIR]`` runs
the chosen benchmarks, writes one JSON per benchmark (and a plot or two) to ``--out``
and prints, and writes to ``summary.md``, a Markdown table of each benchmark found there.
``--quick`` runs every benchmark on the tiny random BERT and tiny data: it exists so that
the test suite can prove the scripts work, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from privatune.common.logs import quiet
from privatune.simulations.scenario import SCENARIO_DIR

BENCHMARKS = (
    "overhead",
    "traffic",
    "scale",
    "utility",
    "aggregation",
    "gpu",
    "causal-lm",
    "lora",
    "dashboard",
    "lora-compare",
)
DEFAULT_OUT = Path("outputs") / "bench"
QUICK_OUT = Path("outputs") / "bench-quick"


def machine() -> dict[str, Any]:
    """What the numbers were measured on; a shared machine's load changes timings."""
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_json(out_dir: Path, name: str, data: Mapping[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def run(
    names: Sequence[str],
    quick: bool,
    out_dir: Path,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the named benchmarks in order and return their results (also written as JSON);
    ``options[name]`` are extra keyword arguments of that benchmark's ``run``. The modules
    are imported here so that one benchmark's imports never slow another."""
    results = {}
    for name in names:
        module = _module(name)
        started = time.monotonic()
        result = module.run(quick=quick, out_dir=out_dir, **(options or {}).get(name, {}))
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        write_json(out_dir, name, result)
        results[name] = result
    return results


def _module(name: str):
    """The benchmark's script: ``simulations.bench.run.<name>``, a hyphen read as underscore."""
    return importlib.import_module(f"privatune.simulations.bench.{name.replace('-', '_')}")


def markdown(out_dir: Path) -> str:
    """One table per benchmark whose JSON is in ``out_dir``: the latest result of each, so
    that benchmarks run one at a time still add up to one summary."""
    tables = []
    for name in BENCHMARKS:
        path = out_dir / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            tables.append(_module(name).table(result))
    return "\n\n".join(tables)


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    quiet()
    parser = argparse.ArgumentParser(prog="privatune bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and data; proves the scripts work"
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON and plots")
    parser.add_argument(
        "--utility-rounds",
        type=int,
        default=None,
        help="privacy-utility: fewer federation rounds than the scenario's (a faster grid)",
    )
    parser.add_argument(
        "--utility-scenario",
        default="medical",
        choices=sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")),
        help="privacy-utility: the scenario whose data and settings the grid uses "
        "(medical, the default; complaints; the small ones)",
    )
    sizes = {"batch": "rows per batch", "length": "tokens per row", "steps": "timed steps"}
    for size, what in sizes.items():
        parser.add_argument(
            f"--causal-lm-{size}", type=int, default=None, help=f"causal-lm: {what}"
        )
    parser.add_argument(
        "--compare-scenario",
        default="medical",
        choices=["medical", "complaints"],
        help="lora-compare: the federation whose probe and -lora recipe are compared",
    )
    parser.add_argument(
        "--compare-epsilons",
        default="none,1,2,4,8",
        help="lora-compare: the epsilons of the grid ('none': without DP), a subset for a CPU",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    out_dir = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    options = {
        "utility": {"rounds": args.utility_rounds, "scenario": args.utility_scenario},
        "lora-compare": {
            "scenario": args.compare_scenario,
            "epsilons": _module("lora-compare").parse_epsilons(args.compare_epsilons),
        },
        "causal-lm": {
            "batch_size": args.causal_lm_batch,
            "seq_len": args.causal_lm_length,
            "steps": args.causal_lm_steps,
        },
    }
    run(names, args.quick, out_dir, options)
    table = markdown(out_dir)
    (out_dir / "summary.md").write_text(table + "\n")
    echo(table)
    echo(f"\nJSON and plots in {out_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
