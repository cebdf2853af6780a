"""LoRA on the top layers of an encoder, trained from the frozen layers' output.

With ``lora.layers = k`` LoRA adapts only the top k transformer layers (peft's
``layers_to_transform``, :func:`common.model.build.adapted_layers`). The layers below carry no
adapter and never change: their output for a text is a fixed function of the text and the
public weights, as the probe's embedding is. Each node computes it once per text (in eval
mode, so without dropout), keeps it in its private cache (:mod:`common.model.features`) and never
sends it; a training step then runs only the top k layers, the pooler and the head, on the
columns that the longest text of its batch uses. Logits and per-sample gradients are the
full model's (``tests/test_top_layers.py``), so DP-SGD clips and accounts exactly as on the
full model, at a fraction of the cost.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from privatune.common.config import RunConfig
from privatune.common.data import LabeledText, tokenize
from privatune.common.model.features import cache_folder, cached_per_text
from privatune.common.model.heads import MeanPooler, head_of
from privatune.common.model.hub import load_tokenizer
from torch.utils.data import DataLoader, TensorDataset
from transformers.masking_utils import create_bidirectional_mask


def uses_top_layers(cfg: RunConfig) -> bool:
    """Whether training runs from cached lower layers: an encoder's LoRA on its top layers."""
    return cfg.train.trainable == "adapter" and cfg.lora.layers > 0 and cfg.model.task == "classify"


def _encoder(model: PeftModel) -> torch.nn.Module:
    base = model.get_base_model()
    return getattr(base, base.base_model_prefix)


def split_point(model: PeftModel, cfg: RunConfig) -> int:
    """The index of the first adapted layer: the layers below it are cached."""
    return len(_encoder(model).encoder.layer) - cfg.lora.layers


def _run(layers, config, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bias = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
    for layer in layers:
        hidden = layer(hidden, bias)
    return hidden


class TopLayers(torch.nn.Module):
    """The adapted top of a peft encoder model (its own modules, shared, not copied): from
    the hidden states after the frozen layers to the logits."""

    def __init__(self, model: PeftModel, start: int) -> None:
        super().__init__()
        encoder = _encoder(model)
        self.config = encoder.config
        self.layers = torch.nn.ModuleList(encoder.encoder.layer[start:])
        self.pooler = encoder.pooler
        self.head = head_of(model)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        longest = max(1, int(mask.sum(1).max()))  # right padding: no row uses the rest
        hidden, mask = hidden[:, :longest], mask[:, :longest]
        hidden = _run(self.layers, self.config, hidden, mask)
        if isinstance(self.pooler, MeanPooler):
            self.pooler.mask = mask  # the full model's encoder hook sets it there
        return self.head(self.pooler(hidden))


@torch.no_grad()
def lower_states(model: PeftModel, tokens: TensorDataset, start: int) -> list[torch.Tensor]:
    """Each row's hidden states after the first ``start`` layers, its padding cut off."""
    encoder = _encoder(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    states = []
    for ids, mask, _ in DataLoader(tokens, batch_size=64):
        ids, mask = ids.to(device), mask.to(device)
        hidden = _run(encoder.encoder.layer[:start], encoder.config, encoder.embeddings(ids), mask)
        states += [h[: int(m.sum())].float().cpu() for h, m in zip(hidden, mask, strict=True)]
    model.train(was_training)
    return states


def padded(states: list[torch.Tensor], labels: torch.Tensor) -> TensorDataset:
    """(hidden states, mask, label) of every row, right-padded to the longest row."""
    longest = max(len(s) for s in states)
    hidden = torch.zeros(len(states), longest, states[0].shape[-1])
    mask = torch.zeros(len(states), longest, dtype=torch.long)
    for i, s in enumerate(states):
        hidden[i, : len(s)], mask[i, : len(s)] = s, 1
    return TensorDataset(hidden, mask, labels)


def lower_dataset(model: PeftModel, tokens: TensorDataset, cfg: RunConfig) -> TensorDataset:
    """:func:`lower_states` of tokenised rows, uncached (tests and tools)."""
    return padded(lower_states(model, tokens, split_point(model, cfg)), tokens.tensors[-1])


def cached_lower_states(model: PeftModel, data: LabeledText, cfg: RunConfig) -> TensorDataset:
    """:func:`lower_states` of ``data``'s texts through the node's private disk cache, in a
    folder per model, length and split point."""
    start = split_point(model, cfg)

    def compute(new: LabeledText) -> list[torch.Tensor]:
        return lower_states(model, tokenize(new, load_tokenizer(cfg), cfg.model.max_length), start)

    folder = cache_folder("lower-layers", cfg, f"below-layer-{start}")
    return padded(cached_per_text(folder, data, compute), torch.from_numpy(data.labels))
