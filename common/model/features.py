"""What a linear probe trains on: the frozen encoder's pooled sentence embedding of each text.

With ``train.trainable = "head"`` the encoder and its (zero) adapter never change, so a text's
embedding is the same in every round and every run that uses the same model, length and
pooling. It is computed once and kept on the node's own disk, one file per batch of new texts,
keyed by an HMAC of the text under a node-local secret (so that nobody can test a candidate
text against the keys): re-splitting the data, another run or another process reuses it.
The cache holds data derived from the institution's texts; it lives beside the node's other
private files (``PRIVATUNE_CACHE``, default ``~/.cache/privatune``), readable by its owner
only (folders 0700, files 0600, as the ledger), and never leaves the node.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from privatune.common.config import RunConfig
from privatune.common.data import LabeledText, tokenize
from privatune.common.errors import ModelError
from privatune.common.local import cache_root, cache_secret, private_dir, private_save, state_root
from privatune.common.model.hub import load_tokenizer, resolve_model_path
from torch.utils.data import DataLoader, TensorDataset

CACHE_FORMAT = "hmac-keys/1"


@torch.no_grad()
def embed(model: PeftModel, data: TensorDataset, batch_size: int = 128) -> TensorDataset:
    """(pooled embedding, label) of every tokenised row, in eval mode: what the head sees
    when the encoder and its adapter are frozen."""
    base = model.get_base_model()
    encoder = getattr(base, base.base_model_prefix, None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ModelError(f"train.trainable 'head': {type(base).__name__} has no pooled output")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = [
        encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output.float()
        for ids, mask, _ in DataLoader(data, batch_size=batch_size)
    ]
    model.train(was_training)
    return TensorDataset(torch.cat(features).cpu(), data.tensors[-1])


def embed_texts(model: PeftModel, cfg: RunConfig, texts: list[str]) -> torch.Tensor:
    """The pooled embedding of plain texts, uncached: public ones (a corpus, label names)
    that shape the model rather than train it."""
    ys = np.zeros(len(texts), dtype=np.int64)
    data = LabeledText(Path("public texts"), texts, ys, "")
    return embed(model, tokenize(data, load_tokenizer(cfg), cfg.model.max_length)).tensors[0]


def model_stamp(cfg: RunConfig) -> list[str]:
    """The model's folder and its files' sizes and times, which stand for its weights."""
    model_dir = resolve_model_path(cfg.model.name).resolve()
    stamp = [str(model_dir)]
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            stat = f.stat()
            stamp.append(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return stamp


def cache_folder(kind: str, cfg: RunConfig, *shape: str) -> Path:
    """One folder per kind of value, encoder (its files), length and whatever else
    (``shape``) makes other values: a change of any gives a new folder. ``CACHE_FORMAT``
    keeps shards of an older layout (keys in the clear) from being read."""
    key = "\n".join([CACHE_FORMAT, *model_stamp(cfg), str(cfg.model.max_length), *shape])
    return cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:24]


def _folder(cfg: RunConfig) -> Path:
    """Embeddings: per pooling and, for mean pooling, public subspace and length
    (common.model.subspace)."""
    from privatune.common.model.corpus import stamp  # common.subspace imports this module

    shape = [cfg.model.pooling]
    if cfg.model.pooling == "mean":
        shape.append(stamp(cfg))
    return cache_folder("embeddings", cfg, *shape)


# Per folder: the files this process has read and their values (text key -> value), for the
# few folders used last (a process trains one model at a time).
_FOLDERS: dict[Path, tuple[set[str], dict[str, torch.Tensor]]] = {}
KEPT_FOLDERS = 4


def _known(folder: Path) -> dict[str, torch.Tensor]:
    """Every value in ``folder``, reading only the files this process has not read."""
    read, known = _FOLDERS.pop(folder, None) or (set(), {})
    _FOLDERS[folder] = read, known  # the most recent last
    while len(_FOLDERS) > KEPT_FOLDERS:
        del _FOLDERS[next(iter(_FOLDERS))]
    files = {f.name for f in folder.glob("*.pt")} if folder.is_dir() else set()
    for name in sorted(files - read):
        shard = torch.load(folder / name, weights_only=True)
        known.update(zip(shard["keys"], shard["values"], strict=True))
        read.add(name)
    return known


def _key(text: str) -> str:
    secret = cache_secret(state_root() / "cache.secret")
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def cached_per_text(
    folder: Path, data: LabeledText, compute: Callable[[LabeledText], list[torch.Tensor]]
) -> list[torch.Tensor]:
    """One value per text of ``data`` through the node's disk cache in ``folder``:
    ``compute`` runs on the texts the cache does not hold yet (each once), and its values
    are written as one private shard."""
    known = _known(folder)
    keys = [_key(t) for t in data.texts]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
    if missing:
        values = compute(data.subset(np.asarray(missing)))
        shard = {"keys": [keys[i] for i in missing], "values": values}
        private_save(shard, private_dir(folder))
        known.update(zip(shard["keys"], values, strict=True))
    return [known[k] for k in keys]


def cached_embed(model: PeftModel, data: LabeledText, cfg: RunConfig) -> TensorDataset:
    """:func:`embed` of ``data``'s texts through the node's disk cache."""

    def compute(new: LabeledText) -> list[torch.Tensor]:
        tokens = tokenize(new, load_tokenizer(cfg), cfg.model.max_length)
        return list(embed(model, tokens).tensors[0])

    values = cached_per_text(_folder(cfg), data, compute)
    return TensorDataset(torch.stack(values), torch.from_numpy(data.labels))
