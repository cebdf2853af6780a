"""The black-box empirical privacy audit of a simulated federation (``privatune canary
--auditor black-box``; the white-box one is simulations.tools.gradient_canary): plant input-space
canaries, run the federation as configured, and measure lower bounds on epsilon from how
well the trained adapter fits them (common.privacy.empirical), beside the epsilon the ledgers claim.

Each canary is a string of random vocabulary words with a random label, assigned to one of
the first ``into`` institutions (canary i to institution i mod ``into``); each is included,
with probability 1/2 drawn from the OS CSPRNG, in its institution's training file. Only
canaries whose own hash puts them on the training side of the local split
(common.data.split_local) are drawn, so an included canary is trained on. The scenario's
files are copied first; nothing is written into the scenario's folder.

Three auditors score the canaries (common.privacy.empirical.AUDITORS), each by the log-likelihood of
the canary's label: black-box, under the final global adapter; white-box, its mean under the
global adapter after every round; and updates, its mean under the adapter that the canary's
own institution sent the server every round (the server's view before averaging dilutes a
canary: a client mod keeps each planted institution's train replies, as the server
receives them). The confidence is split over the three, so the largest bound keeps it.
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
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from privatune.common.config import RunConfig, Scalar, stored_flat
from privatune.common.data import LabeledText, record_position
from privatune.common.model.adapter import from_record, set_trainable
from privatune.common.model.build import build_model, encode, load_trained
from privatune.common.model.causal_lm import class_scores
from privatune.common.model.hub import load_tokenizer
from privatune.common.privacy.audit import audit
from privatune.common.privacy.audit import to_html as audit_html
from privatune.common.privacy.empirical import RESULT, audit_scores, auditor_confidence
from privatune.common.privacy.empirical import to_html as empirical_html
from privatune.common.protocol import INSTITUTION, SERVER_ROUND
from privatune.server.report import write_report
from privatune.server.resume import load_checkpoint
from privatune.simulations.scenario import Scenario
from privatune.simulations.simulate import prepared_dir, resolve_flat, run_flat

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


def canaries_of(j: int, m: int, names: list[str]) -> list[int]:
    """The canaries (of m) that belong to ``names[j]``: canary i to ``names[i % len(names)]``,
    whether included or not."""
    return list(range(j, m, len(names)))


def plant(
    data_dir: Path,
    work: Path,
    cfg: RunConfig,
    texts: list[str],
    labels: np.ndarray,
    included: np.ndarray,
    names: list[str],
) -> Path:
    """A copy of the federation's files with each included canary appended to its
    institution's file (:func:`canaries_of`)."""
    shutil.copytree(data_dir, work, dirs_exist_ok=True)
    for j, name in enumerate(names):
        path = work / f"{name}.csv"
        mine = [i for i in canaries_of(j, len(texts), names) if included[i]]
        extra = pd.DataFrame(
            {
                cfg.data.text_column: [texts[i] for i in mine],
                cfg.data.label_column: [cfg.data.label_names[labels[i]] for i in mine],
            }
        )
        pd.concat([pd.read_csv(path), extra], ignore_index=True).to_csv(path, index=False)
    return work


def keep_updates(folder: Path, names: list[str]) -> Mod:
    """A client mod that keeps each train reply of the named institutions as the server
    receives it (outermost, so after SecAgg+'s masking: a masked reply has no plain arrays
    and is not kept), one ``<institution>/round-NNN.npz`` each."""

    def keep(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if (
            msg.metadata.message_type == MessageType.TRAIN
            and reply.has_content()
            and "arrays" in reply.content
            and str(reply.content["info"][INSTITUTION]) in names
        ):
            where = folder / str(reply.content["info"][INSTITUTION])
            where.mkdir(parents=True, exist_ok=True)
            rnd = int(msg.content["config"][SERVER_ROUND])
            np.savez(where / f"round-{rnd:03d}.npz", **from_record(reply.content["arrays"]))
        return reply

    return keep


@torch.no_grad()
def label_log_likelihood(model, cfg: RunConfig, texts: list[str], labels: np.ndarray) -> np.ndarray:
    """log p(label | text) under ``model``: the attacker's score of each canary."""
    data = LabeledText(Path("canaries"), texts, labels, "")
    ids, mask, y = encode(data, cfg).tensors
    logits = class_scores(model, ids, mask).float()
    return torch.log_softmax(logits, -1)[torch.arange(len(y)), y].numpy()


def mean_over_adapters(
    cfg: RunConfig, adapters: list, texts: list[str], labels: np.ndarray
) -> np.ndarray:
    """Each canary's label log-likelihood averaged over ``adapters`` (checkpoint folders,
    or .npz files of trainable tensors)."""
    model = build_model(cfg, torch.device("cpu")).eval()
    total = np.zeros(len(texts))
    for adapter in adapters:
        if adapter.suffix == ".npz":
            with np.load(adapter) as arrays:
                set_trainable(model, dict(arrays))
        else:
            load_checkpoint(model, adapter)
        total += label_log_likelihood(model, cfg, texts, labels)
    return total / max(1, len(adapters))


def update_scores(
    folder: Path, cfg: RunConfig, texts: list[str], labels: np.ndarray, names: list[str]
) -> np.ndarray | None:
    """Each canary's score under its own institution's kept replies (None: none kept)."""
    scores = np.zeros(len(texts))
    for j, name in enumerate(names):
        mine = canaries_of(j, len(texts), names)
        replies = sorted((folder / name).glob("round-*.npz"))
        if not replies:
            return None
        picked = [texts[i] for i in mine]
        scores[mine] = mean_over_adapters(cfg, replies, picked, labels[mine])
    return scores


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
    names = json.loads((data_dir / "manifest.json").read_text())["institutions"][:into]
    base = Path(cfg.run.output_dir) / cfg.run.name
    work = plant(
        data_dir, base.parent / f"{cfg.run.name}-canary-data", cfg, texts, labels, included, names
    )
    kept = base.parent / f"{cfg.run.name}-canary-updates"
    shutil.rmtree(kept, ignore_errors=True)
    flat = {**flat, "data.dir": str(work)}
    run_dir = run_flat(flat, scenario.institutions, [keep_updates(kept, names), *(mods or [])])
    cfg = RunConfig.from_flat(stored_flat(run_dir))
    model = load_trained(run_dir, torch.device("cpu"))
    scores = {
        "black_box": label_log_likelihood(model, cfg, texts, labels),
        "white_box": mean_over_adapters(
            cfg, sorted((run_dir / "checkpoints").glob("round-*")), texts, labels
        ),
        "updates": update_scores(kept, cfg, texts, labels, names),
    }
    claimed = claimed_epsilon(run_dir, names)
    each = auditor_confidence(confidence, sum(s is not None for s in scores.values()))
    result = {
        "canaries": canaries,
        "into": names,
        "confidence": confidence,
        "claimed_epsilon": claimed if math.isfinite(claimed) else None,  # None: no DP
        **{
            key: asdict(audit_scores(by_label(s, labels), included, cfg.dp.delta, each))
            for key, s in scores.items()
            if s is not None  # no updates kept under SecAgg+: the server saw masked ones
        },
    }
    (run_dir / RESULT).write_text(json.dumps(result, indent=2))
    write_report(run_dir, [audit_html(audit(run_dir)), empirical_html(result)])
    return run_dir
