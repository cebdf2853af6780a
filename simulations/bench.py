"""One entry point for the benchmarks (``make bench``), and the helpers they share.

``python -m simulations.bench [--quick] [--only overhead,...,aggregation] [--out DIR]`` runs
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

import numpy as np
import pandas as pd
import torch

from common.config import Scalar, app_defaults
from simulations.scenario import SCENARIO_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCHMARKS = ("overhead", "traffic", "scale", "utility", "aggregation", "gpu")
DEFAULT_OUT = Path("outputs") / "bench"
QUICK_OUT = Path("outputs") / "bench-quick"
LABELS = "negative,neutral,positive"


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


def write_federation(
    out_dir: Path, parts: Sequence[pd.DataFrame], test: pd.DataFrame, prefix: str = "site"
) -> Path:
    """Institution files, test file and manifest in the layout ``simulations.prepare``
    writes, for benchmark federations cut from the real reviews at a chosen size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}-{i:04d}" for i in range(len(parts))]
    for name, part in zip(names, parts, strict=True):
        part[["text", "label"]].to_csv(out_dir / f"{name}.csv", index=False)
    test[["text", "label"]].to_csv(out_dir / "test.csv", index=False)
    (out_dir / "manifest.json").write_text(json.dumps({"institutions": names}))
    return out_dir


def even_split(frame: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    """``n`` contiguous parts of (nearly) equal size: an IID split of shuffled rows."""
    return [frame.iloc[idx] for idx in np.array_split(np.arange(len(frame)), n)]


def review_sample(rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``rows`` training rows (drawn with replacement when more are asked for than the
    package holds) and the real test split of the drug reviews."""
    from simulations.prepare import load_drugreview

    train, test = load_drugreview()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train), size=rows, replace=rows > len(train))
    return train.iloc[idx].reset_index(drop=True), test


def save_figure(fig, path: Path) -> None:
    """Write a benchmark plot as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def random_bert(path: Path, **config: int) -> Path:
    """A randomly initialised BERT of the given shape with the real tokenizer, saved once:
    real transformers, peft and Opacus code paths on a model that costs no download."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from common.model import DEFAULT_MODEL, resolve_model_path

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(**config)).bert.save_pretrained(path)
        AutoTokenizer.from_pretrained(str(resolve_model_path(DEFAULT_MODEL))).save_pretrained(path)
    return path


def tiny_model(out_dir: Path) -> Path:
    """A tiny random BERT for ``--quick`` runs, at a fraction of MiniLM's cost."""
    return random_bert(
        out_dir / "tiny-bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def model_overrides(quick: bool, out_dir: Path) -> dict[str, Scalar]:
    """The real default MiniLM, or in quick mode the tiny BERT with short sequences."""
    if not quick:
        return {}
    return {"model.name": str(tiny_model(out_dir)), "model.max-length": 32}


def bench_flat(
    data_dir: Path, run_dir: Path, overrides: Mapping[str, Scalar] | None = None
) -> dict[str, Scalar]:
    """A complete flat config for a benchmark federation; ``run_dir`` is the run folder."""
    return {
        **app_defaults(),
        "run.name": run_dir.name,
        "run.output-dir": str(run_dir.parent),
        "data.dir": str(data_dir),
        "data.test-path": str(data_dir / "test.csv"),
        "data.labels": LABELS,
        **(overrides or {}),
    }


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table_head(*columns: str) -> list[str]:
    """The header and separator lines of a Markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def mode_rows(
    cells: Sequence[Mapping[str, Any]],
    modes: Sequence[str],
    lead: Callable[[Mapping[str, Any]], list[str]],
    values: Callable[[Mapping[str, Any]], list[str]],
) -> list[str]:
    """Markdown rows of a per-mode timing table: the cell's ``lead`` columns, the mode, then
    its ``values``, or the error of a mode that failed on that cell."""
    rows = []
    for cell in cells:
        for mode in modes:
            m = cell["modes"].get(mode, {})
            cols = [f"fails: {m['error'][:60]}"] if "error" in m else values(m)
            rows.append("| " + " | ".join([*lead(cell), mode, *cols]) + " |")
    return rows


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
        module = importlib.import_module(f"simulations.bench_{name}")
        started = time.monotonic()
        result = module.run(quick=quick, out_dir=out_dir, **(options or {}).get(name, {}))
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        write_json(out_dir, name, result)
        results[name] = result
    return results


def markdown(out_dir: Path) -> str:
    """One table per benchmark whose JSON is in ``out_dir``: the latest result of each, so
    that benchmarks run one at a time still add up to one summary."""
    tables = []
    for name in BENCHMARKS:
        path = out_dir / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            tables.append(importlib.import_module(f"simulations.bench_{name}").table(result))
    return "\n\n".join(tables)


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__)
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
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    out_dir = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    options = {"utility": {"rounds": args.utility_rounds, "scenario": args.utility_scenario}}
    run(names, args.quick, out_dir, options)
    table = markdown(out_dir)
    (out_dir / "summary.md").write_text(table + "\n")
    echo(table)
    echo(f"\nJSON and plots in {out_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
