"""LoRA on the top layers from cached lower layers (common.model.top_layers): the same logits
and the same clipped per-sample gradients as the full model, a cache that never leaves the node and
is rebuilt when what it depends on changes, and an adapter of the chosen layers only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import outgoing_recorder, simulate
from peft import PeftModel
from privatune.client.train import train_round
from privatune.common.config import resolve
from privatune.common.data import load_labeled, tokenize
from privatune.common.local import cache_root
from privatune.common.model.adapter import get_trainable
from privatune.common.model.build import build_model, load_trained
from privatune.common.model.causal_lm import class_scores
from privatune.common.model.hub import load_tokenizer
from privatune.common.model.top_layers import (
    TopLayers,
    _encoder,
    _run,
    cached_lower_states,
    lower_dataset,
    padded,
    split_point,
)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

CPU = torch.device("cpu")


def _flat(tiny_flat, **extra) -> dict:
    return {**tiny_flat, "lora.layers": 1, **extra}


def _model(cfg) -> PeftModel:
    """A model whose LoRA B is not zero (peft starts it at zero) and whose head is large
    enough that logits show a change of the features (the tiny random head's are 0.01),
    dropout off."""
    model = build_model(cfg, CPU)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if "classifier" in name and name.endswith("weight"):
                p.mul_(100)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _tokens(cfg, federation_dir, rows=12):
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    data = data.subset(np.arange(rows))
    return data, tokenize(data, load_tokenizer(cfg), cfg.model.max_length)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_top_layers_from_cached_states_give_the_full_models_logits(
    tiny_flat, federation_dir, pooling
):
    """Rows of different lengths, padded: logits to 1e-5 in every batch split; a cache made
    with the wrong mask or the wrong positions does not match."""
    cfg = resolve(_flat(tiny_flat, **{"model.pooling": pooling}))
    model = _model(cfg).eval()
    _, tokens = _tokens(cfg, federation_dir)
    ids, mask, _ = tokens.tensors
    assert len(set(mask.sum(1).tolist())) > 3  # really variable lengths
    with torch.no_grad():
        full = class_scores(model, ids, mask)
        lower = lower_dataset(model, tokens, cfg)
        top = TopLayers(model, split_point(model, cfg))
        for part in (slice(0, 12), slice(0, 5), slice(5, 12), slice(3, 4)):
            hidden, hmask, _ = lower[part]
            torch.testing.assert_close(top(hidden, hmask), full[part], atol=1e-5, rtol=1e-5)

        encoder, start = _encoder(model), split_point(model, cfg)
        layers = encoder.encoder.layer[:start]
        mutants = {
            "mask": _run(layers, encoder.config, encoder.embeddings(ids), torch.ones_like(mask)),
            "positions": _run(
                layers,
                encoder.config,
                encoder.embeddings(ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0) + 1),
                mask,
            ),
        }
        for name, hidden in mutants.items():
            states = [h[: int(m.sum())] for h, m in zip(hidden, mask, strict=True)]
            wrong = padded(states, tokens.tensors[-1])
            assert (top(*wrong.tensors[:2]) - full).abs().max() > 1e-4, name  # 10x the tolerance


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_top_layers_clip_the_same_per_sample_gradients_as_the_full_model(
    tiny_flat, federation_dir, mode
):
    """One DP-SGD round without noise, on identical batches, with clipping that binds every
    row: training the full model and training the top layers from the cache end at the
    same adapter, for Opacus' hooks and the fused backend alike. Equal sums of clipped
    per-sample gradients need equal per-sample gradients."""
    flat = _flat(
        tiny_flat,
        **{
            "dp.grad-sample-mode": mode,
            "dp.max-grad-norm": 0.01,
            "train.optimizer": "sgd",
            "train.learning-rate": 5.0,
            "train.head-learning-rate": 5.0,
        },
    )
    cfg = resolve(flat)
    whole = resolve({**flat, "lora.layers": 0})  # the full path over the same model
    _, tokens = _tokens(cfg, federation_dir, rows=16)
    ends = []
    for path_cfg, data in ((whole, tokens), (cfg, None)):
        model = _model(cfg)
        start = get_trainable(model)
        if data is None:
            data = lower_dataset(model, tokens, cfg)
        train_round(model, data, path_cfg, 0.0, CPU, seed=3, poisson_sampling=False)
        ends.append(get_trainable(model))
    assert set(ends[0]) == set(ends[1])
    for name in ends[0]:
        assert not np.allclose(ends[0][name], start[name]), name  # it trained
        np.testing.assert_allclose(ends[1][name], ends[0][name], atol=1e-5, rtol=1e-4)


def test_top_layers_cache_is_rebuilt_when_what_it_depends_on_changes(tiny_flat, federation_dir):
    cfg = resolve(_flat(tiny_flat))
    data, _ = _tokens(cfg, federation_dir, rows=6)

    def shards() -> set[Path]:
        return set((cache_root() / "lower-layers").rglob("*.pt"))

    before = shards()
    first = cached_lower_states(build_model(cfg, CPU), data, cfg)
    made = shards() - before
    assert len(made) == 1 and all(p.stat().st_mode & 0o777 == 0o600 for p in made)
    again = cached_lower_states(build_model(cfg, CPU), data, cfg)
    assert shards() - before == made  # nothing recomputed
    torch.testing.assert_close(first.tensors[0], again.tensors[0])
    for change in ({"model.max-length": 40}, {"lora.layers": 2}):
        other = resolve({**_flat(tiny_flat), **change})
        seen = shards()
        cached_lower_states(build_model(other, CPU), data, other)
        (new,) = shards() - seen
        assert new.parent not in {p.parent for p in made}, change  # its own folder
    more = data.subset(np.arange(6))
    more.texts[0] = more.texts[0] + " and one more sentence"  # the data changed
    seen = shards()
    cached_lower_states(build_model(cfg, CPU), more, cfg)
    (new,) = shards() - seen
    assert len(torch.load(new, weights_only=True)["keys"]) == 1  # only the changed text


@pytest.mark.simulation
def test_top_layers_federation_sends_and_saves_the_chosen_layers_adapter_only(
    tiny_flat, tiny_model_dir, tmp_path
):
    """A real simulation with LoRA on the top layer only: every reply holds that layer's LoRA
    tensors and the head, nothing of the cache; a DP round from the cache changes every
    LoRA tensor; the saved adapter loads with plain peft and with load_trained."""
    flat = _flat(tiny_flat, **{"federation.rounds": 1, "run.name": "top"})
    sent = tmp_path / "sent.jsonl"
    simulate(flat, mods=[outgoing_recorder(str(sent))])
    cfg = resolve(flat)
    model = build_model(cfg, CPU)
    start = get_trainable(model)
    top = f"layer.{split_point(model, cfg)}."
    lora = {k for k in start if "lora_" in k}
    assert lora and all(top in k for k in lora)  # the chosen layer only
    for entry in map(json.loads, sent.read_text().splitlines()):
        assert set(entry["records"]) <= {"arrays", "metrics", "info"}
        assert not entry["arrays"] or set(entry["arrays"]) == set(start)
    run_dir = Path(cfg.run.output_dir) / "top"
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    saved = {k for k in final if "lora_" in k}
    assert saved and all(top in k for k in saved)
    moved = [k for k in lora if not np.allclose(get_trainable(load_trained(run_dir))[k], start[k])]
    assert sorted(moved) == sorted(lora)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=len(cfg.data.label_names)
    )
    plain = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert sum("lora_A" in n for n, _ in plain.named_parameters()) == len(lora) // 2
