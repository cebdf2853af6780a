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
import uuid
from pathlib import Path

import torch
from peft import PeftModel
from privatune.common.config import ConfigError, RunConfig
from privatune.common.local import cache_root
from privatune.common.model.corpus import public_texts, stamp
from privatune.common.model.features import embed_texts, model_stamp
from privatune.common.model.heads import MeanPooler


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
