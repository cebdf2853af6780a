"""Helpers the benchmark scripts share: benchmark federations cut from the real data, the
tiny random BERT of ``--quick`` runs, one flat config per run, and table and plot output."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from privatune.common.config import Scalar, app_defaults

LABELS = "negative,neutral,positive"


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
    from privatune.simulations.prepare import load_drugreview

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
    from privatune.common.model.hub import DEFAULT_MODEL, resolve_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(**config)).bert.save_pretrained(path)
        AutoTokenizer.from_pretrained(str(resolve_model_path(DEFAULT_MODEL))).save_pretrained(path)
    return path


# (hidden, layers, heads, intermediate, positions) of the random BERTs the benchmarks build
BERT_SHAPES = {"tiny": (32, 2, 2, 64, 64), "base": (768, 12, 12, 3072, 512)}


def bert_of_shape(path: Path, shape: str) -> Path:
    hidden, layers, heads, intermediate, positions = BERT_SHAPES[shape]
    return random_bert(
        path,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=positions,
    )


def tiny_model(out_dir: Path) -> Path:
    """A tiny random BERT for ``--quick`` runs, at a fraction of MiniLM's cost."""
    return bert_of_shape(out_dir / "tiny-bert", "tiny")


def model_overrides(quick: bool, out_dir: Path) -> dict[str, Scalar]:
    """The real default MiniLM, or in quick mode the tiny BERT with short sequences (and,
    where a scenario projects onto a public subspace, one that fits its 32 dimensions)."""
    if not quick:
        return {}
    return {
        "model.name": str(tiny_model(out_dir)),
        "model.max-length": 32,
        "model.subspace-dim": 16,
    }


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
