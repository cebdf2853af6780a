"""The pooling and the classifier head on top of the encoder: mean pooling (with an optional
public subspace, common.model.subspace) and the head the linear probe trains."""

from __future__ import annotations

import torch
from peft import PeftModel
from privatune.common.errors import ModelError
from privatune.common.model.causal_lm import answers_of


def head_of(model: PeftModel) -> torch.nn.Sequential:
    """The classification head alone: the base model's dropout, then the trainable copy of
    the linear layer that peft keeps in ``modules_to_save`` (found by name, never guessed),
    sharing its parameters with ``model``. ``train.trainable = "head"`` trains it on cached
    sentence embeddings (common.model.features) instead of running the frozen encoder every step."""
    base = model.get_base_model()
    if answers_of(model) is not None:
        return torch.nn.Sequential()  # a causal LM: no head of its own
    for name in sorted(model.modules_to_save or ()):
        wrapper = getattr(base, name, None)
        if wrapper is not None and hasattr(wrapper, "modules_to_save"):
            (layer,) = wrapper.modules_to_save.values()
            return torch.nn.Sequential(getattr(base, "dropout", torch.nn.Identity()), layer)
    raise ModelError(f"{type(base).__name__}: no classification head among modules_to_save")


class MeanPooler(torch.nn.Module):
    """Stands in for BERT's pooler ([CLS] -> dense -> tanh, never trained in a sentence
    encoder such as MiniLM): the attention-masked mean of the last hidden states, scaled to
    unit length, the embedding sentence-transformers trained MiniLM to produce. Unit length
    also bounds what the head's per-sample gradient can get from a text, which DP-SGD's
    clipping rewards. With a public subspace (common.model.subspace) the embedding is centred and
    projected onto it, then scaled to unit length again; ``norm`` then scales it
    (``model.feature-norm``): the head's weights take norm^2 / (1 + norm^2) of the clipped
    gradient's square, its bias the rest. The mask arrives through a hook on the encoder
    (BERT's pooler is only given the hidden states)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None
        self.norm = 1.0
        self.centre: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None  # k x d, orthonormal rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            mean = hidden.mean(1)
        else:
            weights = self.mask.to(hidden.dtype).unsqueeze(-1)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        mean = torch.nn.functional.normalize(mean, dim=-1)
        if self.basis is not None:
            inside = (mean - self.centre) @ self.basis.T @ self.basis
            mean = torch.nn.functional.normalize(inside, dim=-1)
        return mean * self.norm


def pool_by_mean(base: torch.nn.Module) -> None:
    encoder = getattr(base, base.base_model_prefix, None)
    if getattr(encoder, "pooler", None) is None:
        raise ModelError(
            f"model.pooling 'mean': {type(base).__name__} has no BERT-style pooler to replace"
        )
    pooler = MeanPooler()
    encoder.pooler = pooler

    def keep_mask(_module, _args, kwargs):
        pooler.mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
