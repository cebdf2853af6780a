"""The core path end to end: a 3-institution, 2-round DP federation in Flower's simulation
engine (in-process, Ray backend), with a tiny random BERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_federation_dir, make_tiny_flat, outgoing_recorder, simulate
from opacus.accountants import RDPAccountant
from peft import PeftModel
from privatune.common.config import resolve
from privatune.common.model.adapter import get_trainable, to_record
from privatune.common.model.build import build_model
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, reviews, tmp_path_factory):
    """One federation, read by several tests."""
    root = tmp_path_factory.mktemp("federation")
    flat = make_tiny_flat(tiny_model_dir, make_federation_dir(root, reviews), root)
    sent = root / "sent.jsonl"
    simulate(flat, mods=[outgoing_recorder(str(sent))])
    return Path(resolve(flat).run.output_dir) / "test-run", sent


@pytest.mark.simulation
def test_federation_end_to_end(finished_run, tiny_cfg):
    run_dir, _ = finished_run
    for name in (
        "adapter",
        "checkpoints/round-001",
        "checkpoints/round-002",
        "metrics.jsonl",
        "config.toml",
        "report.html",
    ):
        assert (run_dir / name).exists(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]

    # The adapter changes every round, LoRA B included (Opacus #820 froze it silently).
    initial = get_trainable(build_model(tiny_cfg, torch.device("cpu")))
    r1 = load_file(run_dir / "checkpoints/round-001/adapter_model.safetensors")
    r2 = load_file(run_dir / "checkpoints/round-002/adapter_model.safetensors")
    lora_b = [k for k in r1 if "lora_B" in k]
    assert lora_b and all(np.any(r1[k] != 0) for k in lora_b)  # B starts at zero
    assert all(not np.array_equal(r1[k], r2[k]) for k in lora_b)
    assert not all(np.array_equal(v, r1[k]) for k, v in zip(r1, initial.values(), strict=False))

    # Only the adapter travels: per round, bytes match the trainable tensors, not the base.
    adapter_bytes = sum(v.nbytes for v in initial.values())
    base_bytes = sum(p.numel() * 4 for p in build_model(tiny_cfg, torch.device("cpu")).parameters())
    for line in lines[1:]:  # 3 train + 3 evaluate messages each way
        assert 6 * adapter_bytes < line["bytes_sent"] < 6 * 1.5 * adapter_bytes < base_bytes
        assert 3 * adapter_bytes < line["bytes_received"] < 3 * 1.5 * adapter_bytes + 6_000

    # Epsilon grows and equals Opacus' accountant recomputed from the recorded mechanism.
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        genesis, counted, *records = [
            json.loads(x) for x in (run_dir / "privacy" / f"{name}.jsonl").read_text().splitlines()
        ]
        assert genesis["status"] == "genesis" and genesis["institution"] == name
        assert counted["status"] == "counted" and counted["round"] == 1  # the DP row count
        assert [r["round"] for r in records] == [1, 2]
        assert {r["noise_source"] for r in [counted, *records]} == {"os-csprng"}
        acc = RDPAccountant()
        acc.history.append((counted["noise_multiplier"], 1.0, 1))
        for rec, line in zip(records, lines[1:], strict=True):
            acc.history.append((rec["noise_multiplier"], rec["sample_rate"], rec["steps"]))
            expected = acc.get_epsilon(delta=tiny_cfg.dp.delta)
            assert rec["epsilon"] == pytest.approx(expected, rel=1e-9)
            assert line["epsilon"][name] == pytest.approx(expected, rel=1e-9)
            # the server's anchor of this ledger is the record it wrote that round
            assert line["ledger_heads"][name] == [
                len(records[: records.index(rec)]) + 3,
                rec["hash"],
            ]
        assert records[1]["epsilon"] > records[0]["epsilon"] > 0
        assert records[1]["epsilon"] <= tiny_cfg.dp.target_epsilon + 1e-6

    # The final adapter loads with peft and equals the last round's global adapter.
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_cfg.model.name, num_labels=len(tiny_cfg.data.label_names)
    )
    loaded = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert set(final) == set(r2)
    assert all(np.array_equal(final[k], r2[k]) for k in final)
    state = loaded.state_dict()
    key = next(k for k in state if "lora_B" in k)
    assert torch.count_nonzero(state[key]) > 0


# What may leave a node (docs/threat-model.md): each key covered by DP or declared public.
TRAIN_METRICS = {"refused", "num-examples", "epsilon", "delta", "noise-multiplier", "steps"}
INFO = {"institution", "ledger-records", "ledger-head"}


@pytest.mark.simulation
def test_only_adapter_tensors_and_scalars_leave_an_institution(finished_run, tiny_cfg, reviews):
    """Every message every client sent in the run: adapter tensors and exactly the values of
    the threat model's table (no train loss, no evaluation: DP is on and the institutions
    release no local evaluation); no text, no token ids, no labels."""
    _, sent = finished_run
    entries = [json.loads(x) for x in sent.read_text().splitlines()]
    assert len(entries) == 3 * 2 * 2  # 3 institutions x 2 rounds x (train + evaluate)
    model = build_model(tiny_cfg, torch.device("cpu"))
    trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    texts = set(reviews["text"])
    for entry in entries:
        assert set(entry["records"]) <= {"arrays", "metrics", "info"}
        assert all(trainable[name] == shape for name, shape in entry["arrays"].items())
        assert all(isinstance(v, int | float) for v in entry["metrics"].values())
        if entry["arrays"]:
            assert set(entry["metrics"]) == TRAIN_METRICS and set(entry["configs"]) == INFO
        else:
            assert entry["metrics"] == {"evaluated": 0} and set(entry["configs"]) == {"institution"}
        assert not texts & {str(v) for v in entry["configs"].values()}
    train = [e for e in entries if e["arrays"]]
    assert len(train) == 6 and all(set(e["arrays"]) == set(trainable) for e in train)


@pytest.mark.simulation
@pytest.mark.slow
def test_one_round_with_the_real_pretrained_minilm(tiny_flat, federation_dir):
    """The packaged all-MiniLM-L6-v2 weights, loaded offline, through one DP round."""
    flat = {
        **tiny_flat,
        "model.name": "all-MiniLM-L6-v2",
        "model.max-length": 64,
        "federation.rounds": 1,
        "federation.min-train-nodes": 2,
        "federation.min-available-nodes": 2,
        "run.name": "minilm",
    }
    simulate(flat, num_supernodes=2)
    run_dir = Path(flat["run.output-dir"]) / "minilm"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["central_accuracy"] is not None and 0 < lines[1]["epsilon_max"] < 9
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [k for k in final if "lora_B" in k]
    assert len(lora_b) == 12 and all(np.any(final[k] != 0) for k in lora_b)  # 6 layers x q, v
    assert final["base_model.model.classifier.weight"].shape == (3, 384)


@pytest.mark.simulation
def test_float16_transport_halves_the_adapter_bytes_both_ways(tiny_flat, tiny_cfg, tmp_path):
    seen = tmp_path / "dtypes.jsonl"

    def dtypes(msg, context, call_next):
        reply = call_next(msg, context)
        with open(seen, "a") as f:
            for direction, m in (("to client", msg), ("from client", reply)):
                for record in m.content.array_records.values():
                    types = sorted({a.dtype for a in record.values()})
                    f.write(json.dumps([direction, types, record.count_bytes()]) + "\n")
        return reply

    flat = {**tiny_flat, "federation.transport-dtype": "float16", "federation.rounds": 1}
    run_dir = simulate(flat, mods=[dtypes])
    lines = [json.loads(x) for x in seen.read_text().splitlines()]
    assert {(way, tuple(types)) for way, types, _ in lines} == {
        ("to client", ("float16",)),
        ("from client", ("float16",)),
    }
    adapter = get_trainable(build_model(tiny_cfg, "cpu"))
    float32_record = to_record(adapter).count_bytes()  # the same record as float32 would be
    tensor_bytes = sum(v.nbytes for v in adapter.values())
    # every adapter record on the wire is smaller by half the tensor bytes (names stay)
    assert all(size == float32_record - tensor_bytes // 2 for _, _, size in lines)
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in final.values())
