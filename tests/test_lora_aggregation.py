"""LoRA-aware options: FFA-LoRA (A frozen at its shared seed, only B and the head travel),
server optimisers (FedAvgM, FedAdam) and FedProx's proximal pull on the client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ADAPTER, good, reply, simulate, strategy_for
from safetensors.numpy import load_file

from client.train import train_round
from common.adapter import from_record, get_trainable, to_record
from common.config import resolve
from common.data import load_labeled, tokenize
from common.model import build_model, load_tokenizer


def test_ffa_freezes_a_and_sends_only_b_and_head(tiny_flat):
    full = get_trainable(build_model(resolve(tiny_flat), torch.device("cpu")))
    flat = {
        **tiny_flat,
        "lora.freeze-a": True,
        "federation.aggregation": "fedavgm",
        "federation.server-momentum": 0.5,
    }
    ffa = get_trainable(build_model(resolve(flat), torch.device("cpu")))
    assert set(ffa) == {k for k in full if "lora_A" not in k}
    simulate(flat)
    run_dir = resolve(flat).run.output_dir
    final = load_file(f"{run_dir}/test-run/adapter/adapter_model.safetensors")
    initial = build_model(resolve(flat), torch.device("cpu")).state_dict()
    a_keys = [k for k in final if "lora_A" in k]
    b_keys = [k for k in final if "lora_B" in k]
    for k in a_keys:  # A never moved: it is the seeded initialisation everywhere
        live = k.replace(".weight", ".default.weight")
        np.testing.assert_array_equal(final[k], initial[live].numpy())
    assert all(np.any(final[k] != 0) for k in b_keys)
    metrics = Path(run_dir) / "test-run" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    full_bytes = sum(v.nbytes for v in full.values())
    ffa_bytes = sum(v.nbytes for v in ffa.values())
    assert ffa_bytes < 0.6 * full_bytes
    # 3 training replies of B + head (plus small metric records) instead of full adapters
    assert 3 * ffa_bytes < lines[1]["bytes_received"] < 0.75 * 3 * full_bytes


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_server_optimisers_move_from_the_current_global(name):
    strategy = strategy_for(name, server_learning_rate=0.5)
    # What configure_train would have stored: the global adapter of this round.
    strategy.current_arrays = to_record(ADAPTER) if name == "fedavgm" else dict(ADAPTER)
    arrays, _ = strategy.aggregate_train(1, [reply(1, good(0.2)), reply(2, good(0.4))])
    result = from_record(arrays)
    plain = 0.3  # FedAvg's answer; a server optimiser takes its own step towards it
    assert all(np.all(np.isfinite(v)) for v in result.values())
    assert all(np.all(v > 0) and not np.allclose(v, plain) for v in result.values())


def test_proximal_term_keeps_the_update_closer_to_the_global_adapter(tiny_cfg, federation_dir):
    data = load_labeled(
        federation_dir / "hospital-a.csv", "text", "label", tiny_cfg.data.label_names
    )
    dataset = tokenize(data, load_tokenizer(tiny_cfg), tiny_cfg.model.max_length)
    drift = {}
    for mu in (0.0, 5.0):
        model = build_model(tiny_cfg, torch.device("cpu"))
        start = get_trainable(model)
        train_round(model, dataset, tiny_cfg, 0.5, torch.device("cpu"), seed=3, proximal_mu=mu)
        end = get_trainable(model)
        drift[mu] = sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start) ** 0.5
    assert 0 < drift[5.0] < drift[0.0]
