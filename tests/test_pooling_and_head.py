"""``model.pooling = "mean"`` (the sentence embedding MiniLM was trained to give) and
``train.trainable = "head"`` (a federated linear probe: the smallest update DP-SGD can
noise), on the real model code, Opacus and the Flower simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import classifier_input, probe_cfg, simulate
from privatune.client.train import train_round
from privatune.common.config import ConfigError, resolve
from privatune.common.data import load_labeled, tokenize
from privatune.common.model import features
from privatune.common.model.adapter import get_trainable
from privatune.common.model.build import build_model, load_trained
from privatune.common.model.features import cached_embed, embed
from privatune.common.model.heads import MeanPooler
from privatune.common.model.hub import load_tokenizer
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

CPU = torch.device("cpu")


def test_mean_pooling_is_the_unit_length_masked_mean_and_ignores_padding(tiny_flat):
    cfg = resolve({**tiny_flat, "model.pooling": "mean"})
    model = build_model(cfg, CPU).eval()
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    texts = ["no side effects at all", "it made my headaches much worse, stopped it"]
    short = tok(texts, padding=True, return_tensors="pt")
    long = tok(texts, padding="max_length", max_length=40, return_tensors="pt")
    pooled = classifier_input(model, short["input_ids"], short["attention_mask"])
    padded = classifier_input(model, long["input_ids"], long["attention_mask"])
    torch.testing.assert_close(pooled, padded, rtol=1e-4, atol=1e-5)

    # the same embedding computed from the plain encoder (LoRA's B starts at zero)
    encoder = AutoModel.from_pretrained(cfg.model.name).eval()
    with torch.no_grad():
        hidden = encoder(**long).last_hidden_state
    mask = long["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_head_only_training_moves_the_head_and_nothing_else(tiny_flat, federation_dir, mode):
    cfg = resolve(
        {
            **tiny_flat,
            "model.pooling": "mean",
            "train.trainable": "head",
            "train.optimizer": "sgd",
            "train.head-learning-rate": 4.0,
            "dp.grad-sample-mode": mode,
        }
    )
    model = build_model(cfg, CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert set(get_trainable(model)) == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    path = federation_dir / "hospital-a.csv"
    data = load_labeled(path, "text", "label", cfg.data.label_names)
    result = train_round(model, tokenize(data, load_tokenizer(cfg), 48), cfg, 1.0, CPU, seed=2)
    assert result.mechanism.steps == result.steps > 0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(get_trainable(model))


@pytest.mark.simulation
def test_a_federated_linear_probe_runs_end_to_end(tiny_flat):
    flat = {
        **tiny_flat,
        "model.pooling": "mean",
        "train.trainable": "head",
        "train.optimizer": "sgd",
        "train.head-learning-rate": 4.0,
    }
    run_dir = simulate(flat)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert all(len(line["epsilon"]) == 3 and not line["failed"] for line in lines[1:])
    # only the head travels: a round moves a fraction of the default adapter's bytes
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"]
    assert lines[1]["bytes_received"] < 3 * 4096

    # the trained model comes back with its pooling and the final head, ready to predict
    model = load_trained(run_dir, CPU)
    assert isinstance(model.base_model.model.bert.pooler, MeanPooler)
    final = load_file(str(run_dir / "checkpoints" / "round-002" / "adapter_model.safetensors"))
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    untrained = build_model(resolve(flat), CPU).base_model.model.classifier.weight
    torch.testing.assert_close(head, final["base_model.model.classifier.weight"])
    assert not torch.equal(head, untrained)


def test_unknown_pooling_and_trainable_values_are_named(tiny_flat):
    with pytest.raises(ConfigError, match=r"'model\.pooling' must be one of cls, mean"):
        resolve({**tiny_flat, "model.pooling": "max"})
    with pytest.raises(ConfigError, match=r"'train\.trainable' must be one of adapter, head"):
        resolve({**tiny_flat, "train.trainable": "lora"})


def test_untrained_directions_stay_zero(tiny_flat):
    """Head-only training leaves LoRA's B at zero: the encoder is exactly the pretrained one."""
    cfg = resolve({**tiny_flat, "train.trainable": "head"})
    model = build_model(cfg, CPU)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert not p.requires_grad and np.all(p.detach().numpy() == 0)


def test_training_on_cached_embeddings_is_training_on_the_texts(tiny_flat, federation_dir):
    """The probe's shortcut changes nothing but speed: the head trained on embeddings from
    the disk cache ends exactly where training on the tokenised texts ends (same seed)."""
    cfg = probe_cfg(tiny_flat)
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    heads = []
    for inputs in (
        tokenize(data, load_tokenizer(cfg), cfg.model.max_length),
        cached_embed(build_model(cfg, CPU), data, cfg),
    ):
        model = build_model(cfg, CPU)
        train_round(model, inputs, cfg, 1.0, CPU, seed=4)
        heads.append(get_trainable(model))
    for name in heads[0]:
        np.testing.assert_allclose(heads[0][name], heads[1][name], rtol=1e-4, atol=1e-6)
    assert not np.allclose(heads[0][name], get_trainable(build_model(cfg, CPU))[name])


def test_the_embedding_cache_is_reused_across_processes_and_splits(
    tiny_flat, federation_dir, monkeypatch
):
    cfg = probe_cfg(tiny_flat, **{"model.max-length": 24})
    model = build_model(cfg, CPU)
    data = load_labeled(federation_dir / "hospital-b.csv", "text", "label", cfg.data.label_names)
    first = cached_embed(model, data, cfg)
    direct = embed(model, tokenize(data, load_tokenizer(cfg), 24))
    torch.testing.assert_close(first.tensors[0], direct.tensors[0], rtol=1e-4, atol=1e-5)

    # a new process (nothing in memory) and another split of the same texts: read, not run
    monkeypatch.setattr(features, "_FOLDERS", {})
    monkeypatch.setattr(features, "embed", lambda *_: pytest.fail("embedded again"))
    part = data.subset(np.arange(len(data))[::-1][:7])
    again = cached_embed(model, part, cfg)
    torch.testing.assert_close(again.tensors[0], first.tensors[0].flip(0)[:7])
    assert again.tensors[1].tolist() == part.labels.tolist()

    # another length or pooling is another cache: computed, not mixed up
    other = probe_cfg(tiny_flat, **{"model.max-length": 8})
    with pytest.raises(pytest.fail.Exception, match="embedded again"):
        cached_embed(model, data, other)
