"""The empirical privacy audit of a simulated federation (``privatune canary``): plant
canaries, run the federation as configured, and measure a lower bound on epsilon from how
well the trained adapter fits them (common.empirical), beside the epsilon the ledgers claim.

Each canary is a string of random vocabulary words with a random label; each is included,
with probability 1/2 drawn from the OS CSPRNG, in the training file of one of the first
``into`` institutions. Only canaries whose own hash puts them on the training side of the
local split (common.data.split_local) are drawn, so an included canary is trained on. The
scenario's files are copied first; nothing is written into the scenario's folder.

Two auditors score the canaries: black-box, from the final global adapter (the log-likelihood
of each canary's label), and white-box, from the global adapter after every round (the mean
of that log-likelihood over the rounds: the server's view of the training).
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.clientapp.typing import Mod

from common.audit import audit
from common.audit import to_html as audit_html
from common.causal_lm import class_scores
from common.config import RunConfig, Scalar, stored_flat
from common.data import LabeledText, record_position
from common.empirical import RESULT, audit_scores
from common.empirical import to_html as empirical_html
from common.model import build_model, encode, load_tokenizer, load_trained
from server.report import write_report
from server.resume import load_checkpoint
from simulations.scenario import Scenario
from simulations.simulate import prepared_dir, resolve_flat, run_flat

WORDS = 8  # per canary


def draw_canaries(cfg: RunConfig, m: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """m canaries (text, label index) on the training side of the local split."""
    vocab = [w for w in load_tokenizer(cfg).get_vocab() if w.isalpha() and len(w) > 2]
    texts: list[str] = []
    labels: list[int] = []
    k = len(cfg.data.label_names)
    while len(texts) < m:
        text, label = " ".join(rng.choice(vocab, WORDS)), int(rng.integers(k))
        if record_position(text, label) >= cfg.data.eval_fraction and text not in texts:
            texts.append(text)
            labels.append(label)
    return texts, np.asarray(labels)


def plant(
    data_dir: Path,
    work: Path,
    cfg: RunConfig,
    texts: list[str],
    labels: np.ndarray,
    included: np.ndarray,
    into: int,
) -> Path:
    """A copy of the federation's files with the included canaries appended, round-robin,
    to the first ``into`` institutions' files."""
    shutil.copytree(data_dir, work, dirs_exist_ok=True)
    names = json.loads((work / "manifest.json").read_text())["institutions"][:into]
    rows = [
        (t, cfg.data.label_names[y]) for t, y, i in zip(texts, labels, included, strict=True) if i
    ]
    for j, name in enumerate(names):
        path = work / f"{name}.csv"
        frame = pd.read_csv(path)
        mine = rows[j :: len(names)]
        extra = pd.DataFrame(
            {
                cfg.data.text_column: [t for t, _ in mine],
                cfg.data.label_column: [y for _, y in mine],
            }
        )
        pd.concat([frame, extra], ignore_index=True).to_csv(path, index=False)
    return work


@torch.no_grad()
def label_log_likelihood(model, cfg: RunConfig, texts: list[str], labels: np.ndarray) -> np.ndarray:
    """log p(label | text) under ``model``: the attacker's score of each canary."""
    data = LabeledText(Path("canaries"), texts, labels, "")
    ids, mask, y = encode(data, cfg).tensors
    logits = class_scores(model, ids, mask).float()
    return torch.log_softmax(logits, -1)[torch.arange(len(y)), y].numpy()


def white_box_scores(
    run_dir: Path, cfg: RunConfig, texts: list[str], labels: np.ndarray
) -> np.ndarray:
    """The mean over every round's global adapter (the server's view) of each canary's
    label log-likelihood."""
    model = build_model(cfg, torch.device("cpu")).eval()
    total = np.zeros(len(texts))
    rounds = sorted((run_dir / "checkpoints").glob("round-*"))
    for folder in rounds:
        load_checkpoint(model, folder)
        total += label_log_likelihood(model, cfg, texts, labels)
    return total / max(1, len(rounds))


def by_label(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each score minus the mean score of the canaries with the same label: a model that
    favours one class favours all its canaries, in or out; what is left is the canary's own
    fit. Uses no inclusion bit, so the guesses stay the attacker's."""
    out = np.asarray(scores, dtype=float).copy()
    for y in np.unique(labels):
        out[labels == y] -= out[labels == y].mean()
    return out


def claimed_epsilon(run_dir: Path, institutions: list[str]) -> float:
    """The largest epsilon the planted institutions' ledgers claim (inf without DP)."""
    results = {Path(r.path).stem: r for r in audit(run_dir)}
    return max(results[n].epsilon_claimed if n in results else float("inf") for n in institutions)


def run_canary_audit(
    scenario: Scenario,
    overrides: Mapping[str, Scalar] | None = None,
    canaries: int = 500,
    into: int = 1,
    confidence: float = 0.95,
    mods: list[Mod] | None = None,
) -> Path:
    """Plant, train, score; the result JSON and the report land in the run folder. ``mods``
    are Flower client mods, as in :func:`simulations.simulate.run_flat` (the tests break the
    mechanism with one, to show that the audit catches it)."""
    flat = resolve_flat(scenario, overrides)
    data_dir = prepared_dir(scenario, flat)
    cfg = RunConfig.from_flat(flat)
    rng = np.random.default_rng(secrets.randbits(128))  # the auditor's secret
    texts, labels = draw_canaries(cfg, canaries, rng)
    included = rng.random(canaries) < 0.5
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    work = plant(
        data_dir, run_dir.parent / f"{cfg.run.name}-canary-data", cfg, texts, labels, included, into
    )
    flat = {**flat, "data.dir": str(work)}
    run_dir = run_flat(flat, scenario.institutions, mods)
    cfg = RunConfig.from_flat(stored_flat(run_dir))
    final = by_label(
        label_log_likelihood(load_trained(run_dir, torch.device("cpu")), cfg, texts, labels),
        labels,
    )
    names = json.loads((work / "manifest.json").read_text())["institutions"][:into]
    claimed = claimed_epsilon(run_dir, names)
    white = by_label(white_box_scores(run_dir, cfg, texts, labels), labels)
    result = {
        "canaries": canaries,
        "into": names,
        "claimed_epsilon": claimed if math.isfinite(claimed) else None,  # None: no DP
        "black_box": asdict(audit_scores(final, included, cfg.dp.delta, confidence)),
        "white_box": asdict(audit_scores(white, included, cfg.dp.delta, confidence)),
    }
    (run_dir / RESULT).write_text(json.dumps(result, indent=2))
    write_report(run_dir, [audit_html(audit(run_dir)), empirical_html(result)])
    return run_dir
