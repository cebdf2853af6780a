"""Test helpers shared by test modules (which never import each other): crafted Flower
messages (real Message objects, no mocks), a tiny federation and its in-process
simulation, recorders of what clients send, and the reference computations the secure
aggregation and probe tests compare against."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import Mod
from privatune.common.config import resolve
from privatune.common.data import LabeledText
from privatune.common.model.adapter import from_record
from privatune.common.model.build import build_model
from privatune.common.model.causal_lm import encode_prompts
from privatune.common.model.hub import load_tokenizer
from privatune.server.resume import load_checkpoint
from privatune.server.strategy import make_strategy
from privatune.simulations.simulate import run_flat

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the source tree (tests run from it)

ADAPTER = {
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight": np.zeros(
        (2, 4), np.float32
    ),
    "base_model.model.classifier.modules_to_save.default.weight": np.zeros((3, 4), np.float32),
}
_ids = itertools.count()


def strategy_for(strategy: str, adapter: dict | None = None, **aggregation):
    flat = {"aggregation.strategy": strategy, "federation.min-train-nodes": 2}
    for key, value in aggregation.items():  # max_update_norm is a federation key
        section = "federation" if key == "max_update_norm" else "aggregation"
        flat[f"{section}.{key.replace('_', '-')}"] = value
    cfg = resolve(flat)
    return make_strategy(cfg.federation, cfg.aggregation, ADAPTER if adapter is None else adapter)


def metadata(node: int, message_type: str = "train", src: int | None = None) -> Metadata:
    """Metadata of a message from ``node`` (a reply) or to it (``src=0``)."""
    return Metadata(
        run_id=1,
        message_id=f"m{next(_ids)}",
        src_node_id=node if src is None else src,
        dst_node_id=0 if src is None else node,
        reply_to_message_id="i",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )


def run_flat_argv(flat: dict, path: Path, num_supernodes: int = 3) -> list[str]:
    """A command that runs ``flat`` in a process of its own (``run_flat``), its config
    written to ``path``: for tests that crash, stop or watch a whole run."""
    path.write_text(json.dumps(flat))
    script = (
        "import json; from privatune.simulations.simulate import run_flat; "
        f"run_flat(json.load(open({str(path)!r})), {num_supernodes})"
    )
    return [sys.executable, "-c", script]


def start_run(flat: dict, path: Path, **popen) -> subprocess.Popen:
    """:func:`run_flat_argv` started in the background from the project root, offline and
    silent unless ``popen`` says otherwise (e.g. ``stderr=subprocess.PIPE``)."""
    options = {
        "cwd": PROJECT_ROOT,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "env": {**os.environ, "HF_HUB_OFFLINE": "1"},
    }
    return subprocess.Popen(run_flat_argv(flat, path), **{**options, **popen})


def simulate(flat: dict, num_supernodes: int = 3, mods: list[Mod] | None = None) -> Path:
    """Run the real apps in Flower's in-process simulation engine (Ray backend)."""
    return run_flat(flat, num_supernodes, mods)


def reply(
    node: int, arrays: dict | None = None, n: float = 10, refused: int = 0, eps: float = 1.0
) -> Message:
    metrics = {"num-examples": n, "train-loss": 0.5, "epsilon": eps, "refused": refused}
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "info": ConfigRecord({"institution": f"inst-{node}"})}
    )
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
        )
    return Message(content=content, metadata=metadata(node))


def good(value: float) -> dict:
    return {k: np.full_like(v, value) for k, v in ADAPTER.items()}


def make_federation_dir(root: Path, reviews: pd.DataFrame) -> Path:
    """Three institutions of 40 rows each, a test file and a manifest."""
    data = root / "data"
    data.mkdir()
    names = ["hospital-a", "hospital-b", "hospital-c"]
    for i, name in enumerate(names):
        reviews.iloc[i * 40 : (i + 1) * 40][["text", "label"]].to_csv(
            data / f"{name}.csv", index=False
        )
    reviews.iloc[120:180][["text", "label"]].to_csv(data / "test.csv", index=False)
    (data / "manifest.json").write_text(json.dumps({"institutions": names}))
    return data


def make_tiny_flat(model_dir: Path, data: Path, root: Path) -> dict:
    """A complete flat config for a fast 3-institution federation."""
    from privatune.common.config import app_defaults

    return {
        **app_defaults(),
        "run.name": "test-run",
        "run.output-dir": str(root / "outputs"),
        "model.name": str(model_dir),
        "model.max-length": 48,
        "lora.dropout": 0.0,
        "train.batch-size": 8,
        "train.learning-rate": 0.01,
        "train.head-learning-rate": 0.05,
        "federation.rounds": 2,
        "federation.min-train-nodes": 3,
        "federation.min-available-nodes": 3,
        "data.dir": str(data),
        "data.test-path": str(data / "test.csv"),
        "data.text-column": "text",
        "data.label-column": "label",
    }


def outgoing_recorder(path: str):
    """A Flower client mod that logs what every reply a client sends contains."""

    def record(msg, context, call_next):
        reply = call_next(msg, context)
        if not reply.has_error():
            content = reply.content
            entry = {
                "records": sorted(content.keys()),
                "arrays": {
                    k: list(a.shape) for r in content.array_records.values() for k, a in r.items()
                },
                "metrics": {k: v for r in content.metric_records.values() for k, v in r.items()},
                "configs": {k: v for r in content.config_records.values() for k, v in r.items()},
            }
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return reply

    return record


# The causal-LM track's questions and config (tests/test_causal_lm*.py).
QUESTIONS = [
    "Which nerve supplies the deltoid?\nA. Axillary\nB. Radial\nC. Ulnar\nD. Median",
    "Drug of choice in absence seizures?\nA. Phenytoin\nB. Ethosuximide\nC. Carbamazepine\n"
    "D. Phenobarbitone, given in a long sentence that makes this the longest prompt here",
    "Vitamin deficient in scurvy?\nA. A\nB. B12\nC. C\nD. D",
]


def llm_flat(model_dir: Path, labels: str = "A,B,C,D", **keys) -> dict:
    return {
        "model.name": str(model_dir),
        "model.task": "causal-lm",
        "model.max-length": 96,
        "lora.target-modules": "q_proj,k_proj,v_proj,o_proj",
        "lora.dropout": 0.0,
        "data.labels": labels,
        **keys,
    }


def batch(cfg, texts: list[str], labels: list[int]):
    data = LabeledText(Path("q"), texts, np.asarray(labels), "")
    return encode_prompts(data, load_tokenizer(cfg), cfg.model.max_length, cfg.model.chat_template)


def handler_recorder(directory: str):
    """Inside the SecAgg+ mod: each institution's plain reply (arrays and weight) per round."""

    def record(msg, context, call_next):
        reply = call_next(msg, context)
        trained = not reply.has_error() and "arrays" in reply.content
        if msg.metadata.message_type == MessageType.TRAIN and trained:
            stem = Path(directory) / f"{context.node_config['partition-id']}-round-"
            stem = Path(f"{stem}{msg.content['config']['server-round']}")
            np.savez(stem.with_suffix(".npz"), **from_record(reply.content["arrays"]))
            weight = reply.content["metrics"]["num-examples"]
            stem.with_suffix(".json").write_text(json.dumps({"weight": weight}))
        return reply

    return record


def quantisation_bound(cfg, weights: list[float]) -> float:
    """Stochastic rounding moves each weighted value by < one quantum (2c / levels); the mean
    divides the sum of ``n`` such errors by the total weight as a fraction of max-weight."""
    agg = cfg.aggregation
    quantum = 2 * agg.secure_clipping_range / agg.secure_quantization_range
    return len(weights) * quantum * agg.secure_max_weight / sum(weights) + 1e-6


def plain_replies(directory: Path, server_round: int) -> tuple[list[dict], list[float]]:
    arrays, weights = [], []
    for path in sorted(directory.glob(f"*-round-{server_round}.npz")):
        arrays.append(dict(np.load(path)))
        weights.append(json.loads(path.with_suffix(".json").read_text())["weight"])
    return arrays, weights


def weighted_mean(arrays: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {
        k: sum(w * a[k] for a, w in zip(arrays, weights, strict=True)) / total for k in arrays[0]
    }


def checkpoint(cfg, run_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    model = build_model(cfg, torch.device("cpu"))
    return load_checkpoint(model, run_dir / "checkpoints" / f"round-{server_round:03d}")


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def classifier_input(model, ids, mask) -> torch.Tensor:
    seen = []
    head = model.base_model.model.classifier.modules_to_save["default"]
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    return seen[0]


def probe_cfg(tiny_flat, **extra):
    return resolve(
        {
            **tiny_flat,
            "model.pooling": "mean",
            "train.trainable": "head",
            "train.optimizer": "sgd",
            "train.head-learning-rate": 4.0,
            **extra,
        }
    )
