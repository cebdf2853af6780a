"""``model.subspace``: the probe's embedding projected onto public texts' principal directions
(common.model.subspace), so that DP noise on the head reaches no prediction outside them; and
``model.feature-norm``. Real transformers code on the tiny random BERT, real Opacus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import classifier_input, probe_cfg
from privatune.client.train import train_round
from privatune.common.config import ConfigError
from privatune.common.data import LabeledText, fingerprint, load_labeled, tokenize
from privatune.common.local import cache_root
from privatune.common.model.build import build_model
from privatune.common.model.features import cached_embed, embed
from privatune.common.model.hub import load_tokenizer

CPU = torch.device("cpu")
PUBLIC = [
    "What is the first-line treatment of community-acquired pneumonia?",
    "Which nerve is damaged in a fracture of the surgical neck of the humerus?",
    "Is aspirin safe to take with warfarin?",
    "What causes a dental abscess and how is it drained?",
    "How is gestational diabetes screened in pregnancy?",
    "Which vitamin deficiency causes night blindness?",
    "What is the mechanism of action of metformin?",
    "Which bacteria cause rheumatic fever?",
    "How long does a tetanus booster protect?",
    "What is the normal intraocular pressure?",
    "Which drug reverses heparin?",
    "What does a raised troponin mean after chest pain?",
]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "public.txt"
    path.write_text("\n".join(PUBLIC) + "\n\n", encoding="utf-8")
    return path


def _pooled(model, cfg, texts) -> torch.Tensor:
    tok = load_tokenizer(cfg)(texts, padding=True, return_tensors="pt")
    return classifier_input(model.eval(), tok["input_ids"], tok["attention_mask"])


def test_the_embedding_is_the_public_projection_at_the_chosen_length(tiny_flat, corpus):
    cfg = probe_cfg(
        tiny_flat,
        **{"model.subspace": str(corpus), "model.subspace-dim": 4, "model.feature-norm": 2.0},
    )
    model = build_model(cfg, CPU)
    texts = ["the pain got worse after the second dose", "no side effects at all"]
    pooled = _pooled(model, cfg, texts)
    assert torch.allclose(pooled.norm(dim=-1), torch.full((2,), 2.0), atol=1e-5)

    # computed independently: the plain unit-length mean embeddings of the public texts,
    # centred, and their top 4 right singular vectors; the texts' embedding, centred on the
    # same mean and projected onto them, then scaled to length 2
    plain_cfg = probe_cfg(tiny_flat)
    plain = build_model(plain_cfg, CPU)
    ys = np.zeros(len(PUBLIC), dtype=np.int64)
    data = LabeledText(corpus, PUBLIC, ys, fingerprint(PUBLIC, ys))
    points = embed(plain, tokenize(data, load_tokenizer(cfg), cfg.model.max_length)).tensors[0]
    centre = points.mean(0)
    basis = torch.linalg.svd(points - centre, full_matrices=False).Vh[:4]
    inside = (_pooled(plain, plain_cfg, texts) - centre) @ basis.T @ basis
    expected = 2.0 * torch.nn.functional.normalize(inside, dim=-1)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)

    # the subspace is on the node's disk, not recomputed, and the same for every build
    assert len(list((cache_root() / "subspace").glob("*.pt"))) >= 1
    torch.testing.assert_close(_pooled(build_model(cfg, CPU), cfg, texts), pooled)


def test_noise_on_the_head_outside_the_public_subspace_changes_no_prediction(tiny_flat, corpus):
    """Why it helps DP-SGD: of the Gaussian noise added to the head's weights only the part
    along the k public directions reaches a logit."""
    cfg = probe_cfg(tiny_flat, **{"model.subspace": str(corpus), "model.subspace-dim": 3})
    model = build_model(cfg, CPU)
    texts = ["it made my headaches much worse", "works well, I sleep again", "no change"]
    pooler = model.base_model.model.bert.pooler
    basis = pooler.basis
    head = model.base_model.model.classifier.modules_to_save["default"]
    before = _pooled(model, cfg, texts) @ head.weight.T
    noise = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0))
    outside = noise - noise @ basis.T @ basis
    with torch.no_grad():
        head.weight += 10 * outside
    torch.testing.assert_close(_pooled(model, cfg, texts) @ head.weight.T, before)
    with torch.no_grad():
        head.weight += 10 * (noise - outside)
    assert not torch.allclose(_pooled(model, cfg, texts) @ head.weight.T, before, atol=1e-2)


def test_a_probe_trains_under_dp_on_projected_cached_embeddings(tiny_flat, corpus, federation_dir):
    cfg = probe_cfg(
        tiny_flat,
        **{"model.subspace": str(corpus), "model.subspace-dim": 4, "model.feature-norm": 2.0},
    )
    data = load_labeled(federation_dir / "hospital-a.csv", "text", "label", cfg.data.label_names)
    model = build_model(cfg, CPU)
    cached = cached_embed(model, data, cfg)
    basis = model.base_model.model.bert.pooler.basis
    features = cached.tensors[0]
    # the cache holds the projected embeddings (its folder is keyed by the subspace)
    torch.testing.assert_close(features @ basis.T @ basis, features, rtol=1e-4, atol=1e-5)
    head = model.base_model.model.classifier.modules_to_save["default"]
    start = head.weight.detach().clone()
    result = train_round(model, cached, cfg, 1.0, CPU, seed=3)
    assert result.mechanism.steps == result.steps > 0
    assert not torch.equal(head.weight, start)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model.subspace": "nowhere.txt"}, r"model\.subspace 'nowhere\.txt': neither"),
        ({"model.subspace-dim": 99}, r"model\.subspace-dim 99: more than the 12 public texts"),
        ({"model.feature-norm": math.nan}, r"model\.feature-norm"),
        ({"model.feature-norm": 0.0}, r"model\.feature-norm"),
        ({"model.subspace-dim": 0}, r"model\.subspace-dim must be at least 1"),
        ({"model.pooling": "cls"}, r'need model\.pooling = "mean"'),
    ],
)
def test_bad_subspace_settings_are_refused_in_one_line(tiny_flat, corpus, extra, message):
    with pytest.raises(ConfigError, match=message):
        cfg = probe_cfg(tiny_flat, **{"model.subspace": str(corpus), **extra})
        build_model(cfg, CPU)


def test_the_built_in_medical_corpus_holds_no_medmcqa_question():
    """The medical scenario's private data (MedMCQA) must not shape its public subspace."""
    from privatune.common.data import one_line
    from privatune.common.model.corpus import public_texts
    from privatune.simulations.prepare import medmcqa_items

    public = set(public_texts("medical-public"))
    assert len(public) > 5000
    private = {
        one_line(item["question"]).lower()
        for split in ("MedMCQA-Test", "MedMCQA-Validation")
        for item, _ in medmcqa_items(split)
    }
    assert len(private) > 9000
    assert not {t.lower() for t in public} & private


def test_in_deployment_the_run_config_cannot_name_a_file_as_the_public_corpus(
    tiny_flat, corpus, tmp_path
):
    """The server writes the run config: a path it names could be the institution's own
    data file, and a subspace computed from it would carry that data outside DP."""
    from flwr.app import Context, RecordDict
    from privatune.client.institution import Institution

    flat = {**tiny_flat, "model.pooling": "mean", "model.subspace": str(corpus)}
    cfg = probe_cfg(tiny_flat, **{"model.subspace": str(corpus)})
    node = {
        "data-path": str(tmp_path / "mine.csv"),
        "ledger-path": str(tmp_path / "ledger.jsonl"),
        "max-epsilon": 8.0,
        "max-delta": 1e-5,
        "accountants": "rdp,prv",
        "labels": tiny_flat["data.labels"],
        "institution": "hospital-x",
    }
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
    with pytest.raises(ConfigError, match=r"hospital-x: model\.subspace .*only a built-in"):
        Institution.from_context(ctx, cfg, "run")
    built_in = probe_cfg(tiny_flat, **{"model.subspace": "medical-public"})
    assert Institution.from_context(ctx, built_in, "run").name == "hospital-x"
