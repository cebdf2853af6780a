"""``model.label-init``: the classifier head starts from its labels' names' embeddings, a
zero-shot classifier that DP-SGD then corrects. Real transformers code on the tiny random
BERT, real Opacus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import classifier_input, probe_cfg
from privatune.client.train import train_round
from privatune.common.config import ConfigError, resolve
from privatune.common.data import load_labeled, tokenize
from privatune.common.model.adapter import get_trainable
from privatune.common.model.build import build_model, label_texts
from privatune.common.model.features import embed
from privatune.common.model.hub import load_tokenizer

CPU = torch.device("cpu")
LABELS = "Gynaecology_Obstetrics,social-preventive-medicine,ENT"


def _head(model) -> torch.nn.Linear:
    return model.base_model.model.classifier.modules_to_save["default"]


def test_label_names_read_as_words_unless_texts_are_given(tiny_flat):
    names = {"model.label-init": 1.0, "data.labels": "Gynaecology_Obstetrics,credit-reporting,ENT"}
    assert label_texts(resolve({**tiny_flat, **names})) == [
        "Gynaecology Obstetrics",
        "credit reporting",
        "ENT",
    ]
    given = {**names, "model.label-texts": "Obstetrics; credit reports ;Ear, nose and throat"}
    assert label_texts(resolve({**tiny_flat, **given})) == [
        "Obstetrics",
        "credit reports",
        "Ear, nose and throat",
    ]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_each_row_is_its_label_names_embedding_and_names_classify_as_themselves(tiny_flat, pooling):
    cfg = probe_cfg(
        tiny_flat,
        **{"model.pooling": pooling, "model.label-init": 5.0, "data.labels": LABELS},
    )
    model = build_model(cfg, CPU)
    head = _head(model)

    # computed independently: the pooled input the head sees for each name, as words
    tok = load_tokenizer(cfg)(label_texts(cfg), padding=True, return_tensors="pt")
    names = classifier_input(model.eval(), tok["input_ids"], tok["attention_mask"])
    expected = torch.nn.functional.normalize(names, dim=-1) * 5.0
    assert torch.allclose(head.weight, expected, atol=1e-5)
    assert torch.equal(head.bias, torch.zeros(3))

    # the zero-shot classifier it makes: each name, as a text, is predicted as its label
    with torch.no_grad():
        logits = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).logits
    assert logits.argmax(-1).tolist() == [0, 1, 2]


def test_every_node_and_the_server_start_from_the_same_head(tiny_flat):
    cfg = probe_cfg(tiny_flat, **{"model.label-init": 10.0})
    first, second = get_trainable(build_model(cfg, CPU)), get_trainable(build_model(cfg, CPU))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    random_start = get_trainable(build_model(probe_cfg(tiny_flat), CPU))
    heads = [k for k in first if "classifier" in k and k.endswith("weight")]
    assert heads and not np.array_equal(first[heads[0]], random_start[heads[0]])


def test_a_dp_round_trains_the_head_from_the_label_start(tiny_flat, federation_dir):
    cfg = probe_cfg(tiny_flat, **{"model.label-init": 5.0})
    model = build_model(cfg, CPU)
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    cached = embed(model, tokenize(data, load_tokenizer(cfg), cfg.model.max_length))
    start = _head(model).weight.detach().clone()
    result = train_round(model, cached, cfg, 1.0, CPU, seed=3)
    assert result.mechanism.steps == result.steps > 0
    assert not torch.equal(_head(model).weight, start)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model.label-init": -1.0}, r"model\.label-init' must be 0 \(a random start\) or pos"),
        ({"model.label-init": math.nan}, r"model\.label-init' must be 0 \(a random start\) or pos"),
        (
            {"model.label-init": 5.0, "model.task": "causal-lm"},
            r"model\.label-init starts a classification head",
        ),
        (
            {"model.label-init": 5.0, "model.label-texts": "bad; good"},
            r"model\.label-texts holds 2 texts for the 3 labels of data\.labels",
        ),
        (
            {"model.label-init": 5.0, "model.label-texts": "bad;; good"},
            r"model\.label-texts holds 2 texts for the 3 labels",
        ),
        ({"model.label-texts": "a;b;c"}, r"model\.label-texts describes the labels"),
    ],
)
def test_bad_label_init_is_refused_in_one_line(tiny_flat, extra, message):
    with pytest.raises(ConfigError, match=message):
        resolve({**tiny_flat, **extra})
