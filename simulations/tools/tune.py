"""Choose a recipe (linear probe or LoRA) on validation data, never on the test set.

``privatune tune --scenario medical --try "train.head-learning-rate=32" --try
"train.head-learning-rate=64" --no-dp-too`` runs the scenario's federation once per try and
repeat, in this process (no Ray, no ledgers: a tuning aid, not a run), and scores the global
head on the union of the institutions' held-out local splits (``--holdout`` of each file,
split record by record as the clients split). Each institution trains with the real
``client.train.train_round`` and the noise ``client.app.noise_for`` plans; the server step is
FedAvg's weighted mean of every trainable tensor: the head, and the LoRA factors with
``train.trainable = "adapter"`` (with ``lora.layers`` the top layers train from the node's
cache of the frozen layers' output, as in a run). With embeddings cached, one 30-round probe
federation of the medical scenario takes seconds; a LoRA one, minutes.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from privatune.client.app import model_input, noise_for
from privatune.client.institution import Policy
from privatune.client.train import train_round
from privatune.common.config import ConfigError, RunConfig, Scalar
from privatune.common.data import LabeledText, fingerprint, load_labeled, split_local
from privatune.common.model.build import build_model
from privatune.common.model.evaluation import evaluate
from privatune.simulations.scenario import Scenario
from privatune.simulations.simulate import prepared_dir, resolve_flat

NO_DP = {"dp.enabled": False, "privacy.allow-non-private": True}


def federation_score(cfg: RunConfig, data_dir: Path, holdout: float) -> float:
    """Macro-F1 of the final global model (head, and adapter if it trains) on the
    institutions' held-out local splits."""
    if cfg.aggregation.strategy != "fedavg" or cfg.model.task != "classify":
        raise ConfigError("tune: only classifiers with strategy fedavg")
    labels = cfg.data.label_names
    names = json.loads((data_dir / "manifest.json").read_text())["institutions"]
    train_sets, held = [], []
    for name in names:
        full = load_labeled(data_dir / f"{name}.csv", "text", "label", labels)
        train, val = split_local(full, holdout)
        train_sets.append(train)
        held.append(val)
    texts = [t for v in held for t in v.texts]
    ys = np.concatenate([v.labels for v in held])
    val = model_input(cfg, LabeledText(data_dir, texts, ys, fingerprint(texts, ys)), "tune")
    device = torch.device("cpu")
    model = build_model(cfg, device)
    # what a client trains and sends: the head, and the LoRA factors with an adapter
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    policy = Policy.simulated(cfg.privacy)
    sizes = [len(t.labels) for t in train_sets]
    sigmas = [noise_for(cfg, policy, n) if cfg.dp.enabled else 0.0 for n in sizes]
    global_state = {k: v.detach().clone() for k, v in trained.items()}
    stages: dict[str, list] = {}  # the training inputs of each stage, read once
    for rnd in range(1, cfg.federation.rounds + 1):
        stage = cfg.in_round(rnd)  # train.probe-rounds: the head alone at first
        if stage.train.trainable not in stages:
            stages[stage.train.trainable] = [model_input(stage, t, "train") for t in train_sets]
        inputs = stages[stage.train.trainable]
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for data, n, sigma in zip(inputs, sizes, sigmas, strict=True):
            _load(trained, global_state)
            train_round(model, data, stage, sigma, device)
            for k, v in trained.items():
                total[k] += n * v.detach()
        global_state = {k: v / sum(sizes) for k, v in total.items()}
    _load(trained, global_state)
    return evaluate(model, val, len(labels), device)["macro-f1"]


@torch.no_grad()
def _load(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    for k, p in params.items():
        p.copy_(state[k])


def tune(
    scenario: Scenario,
    tries: Sequence[Mapping[str, Scalar]],
    repeats: int = 3,
    holdout: float = 0.2,
    no_dp_too: bool = False,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Each try's validation macro-F1 over ``repeats`` federations (with DP, and without
    when ``no_dp_too``); one line per try through ``echo``."""
    rows = []
    for overrides in tries:
        shown = " ".join(f"{k}={v}" for k, v in overrides.items()) or "(scenario recipe)"
        for dp in (True, False) if no_dp_too else (True,):
            flat = resolve_flat(scenario, {**overrides, **({} if dp else NO_DP), "run.name": "t"})
            data_dir = prepared_dir(scenario, flat)
            cfg = RunConfig.from_flat(flat)
            start = time.time()
            scores = [federation_score(cfg, data_dir, holdout) for _ in range(repeats)]
            rows.append({"try": dict(overrides), "dp": dp, "macro_f1": scores})
            echo(
                f"{shown}, {'DP' if dp else 'no DP'}: validation macro-F1 "
                f"{statistics.mean(scores):.3f} +- {statistics.pstdev(scores):.3f} "
                f"({repeats} federations, {time.time() - start:.0f} s)"
            )
    return rows
