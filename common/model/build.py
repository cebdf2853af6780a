"""The base model with its LoRA adapter, built the same way on the server and every client.

Order matters (Opacus issue #820): the base model is moved to its device *before* peft wraps
it; moving a peft model afterwards can leave the LoRA weights silently frozen. Seeding before
construction makes the randomly initialised parts (LoRA A, the classifier head) identical on
every node, so the server's initial adapter and a client's model agree key for key.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from privatune.common.config import RunConfig, Scalar, stored_flat
from privatune.common.data import LabeledText, tokenize
from privatune.common.errors import ModelError
from privatune.common.model.causal_lm import answer_table, encode_prompts
from privatune.common.model.heads import head_of, pool_by_mean
from privatune.common.model.hub import load_tokenizer, pick_device, resolve_model_path
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


def encode(data: LabeledText, cfg: RunConfig) -> TensorDataset:
    """The rows as the model reads them: (ids, mask, label) of token ids, or for a causal
    LM of left-padded prompts (common.model.causal_lm)."""
    tokenizer = load_tokenizer(cfg)
    if cfg.model.task == "causal-lm":
        return encode_prompts(
            data, tokenizer, cfg.model.max_length, cfg.model.chat_template, cfg.model.instruction
        )
    return tokenize(data, tokenizer, cfg.model.max_length)


def load_trained(
    run_dir: Path, device: torch.device | None = None, overrides: Mapping[str, Scalar] | None = None
) -> PeftModel:
    """A run's final model, for inference: built from the run's own ``config.toml`` (its
    base model, pooling and LoRA shape), with the global adapter of ``adapter/`` loaded.
    ``overrides`` change what the adapter does not depend on, e.g. a causal LM's
    ``data.labels`` (its answer table) for a benchmark with other answers."""
    cfg = RunConfig.from_flat({**stored_flat(run_dir), **(overrides or {})})
    model = build_model(cfg, device or pick_device())
    path = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        raise ModelError(f"{path}: no final adapter (the run did not finish)")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    if result.unexpected_keys:
        raise ModelError(f"{path}: tensors that do not fit: {result.unexpected_keys[:3]}")
    return model.eval()


def build_model(cfg: RunConfig, device: torch.device, rank: int | None = None) -> PeftModel:
    """Base model + LoRA on the query/value projections (configurable) + trainable head;
    with ``model.task = "causal-lm"`` a causal LM + LoRA, which answers through its own
    (frozen) LM head and carries the labels' answer tokens (common.model.causal_lm).

    ``rank`` below ``lora.rank`` builds a smaller adapter for an institution with less
    memory: its A is the first ``rank`` rows of the shared A, and its alpha shrinks with the
    rank so that alpha / rank, the scale of B·A, is the same on every node.
    """
    rank = rank or cfg.lora.rank
    if not 0 < rank <= cfg.lora.rank:
        raise ModelError(f"LoRA rank {rank}: must be between 1 and lora.rank = {cfg.lora.rank}")
    torch.manual_seed(cfg.run.seed)
    causal = cfg.model.task == "causal-lm"
    path = str(resolve_model_path(cfg.model.name))
    if causal:
        base = AutoModelForCausalLM.from_pretrained(path)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(cfg.data.label_names)
        )
    if cfg.model.pooling == "mean":
        pool_by_mean(base)
    base.to(device)  # move first, wrap second (Opacus #820)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=cfg.lora.alpha * rank / cfg.lora.rank,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.modules,
        layers_to_transform=adapted_layers(cfg, base.config.num_hidden_layers),
    )
    model = get_peft_model(base, lora)
    if causal:
        table = answer_table(load_tokenizer(cfg), label_texts(cfg), cfg.model.chat_template)
        model.answers = table.to(device)
    _seed_lora_a(model, cfg.run.seed, cfg.lora.rank)
    frozen = ("lora_",) if cfg.train.trainable == "head" else ("lora_A",) * cfg.aggregation.freeze_a
    for name, param in model.named_parameters():
        if any(part in name for part in frozen):
            param.requires_grad_(False)
    if cfg.model.pooling == "mean":
        from privatune.common.model.subspace import install  # common.subspace imports this module

        install(model, cfg)
    if cfg.model.label_init:
        _head_from_labels(model, cfg)
    model.train()  # from_pretrained returns eval mode; Opacus needs train mode to see activations
    return model


def adapted_layers(cfg: RunConfig, num_layers: int) -> list[int] | None:
    """The transformer layers LoRA adapts: the top ``lora.layers`` (None: all)."""
    if not cfg.lora.layers:
        return None
    if cfg.lora.layers > num_layers:
        raise ModelError(f"lora.layers {cfg.lora.layers}: the model has {num_layers} layers")
    return list(range(num_layers - cfg.lora.layers, num_layers))


def label_texts(cfg: RunConfig) -> list[str]:
    """Each label in words: its ``model.label-texts`` entry (an acronym spelled out, say),
    else its name with underscores and hyphens as spaces. ``model.label-init`` embeds these;
    a causal LM answers with them."""
    given = cfg.model.label_texts_list
    if given:
        return given
    return [" ".join(n.replace("_", " ").replace("-", " ").split()) for n in cfg.data.label_names]


def _head_from_labels(model: PeftModel, cfg: RunConfig) -> None:
    """``model.label-init``: each class's row of the head starts as the pooled embedding
    of its label's text (:func:`label_texts`), scaled to that length, and the bias at zero:
    a zero-shot classifier (a text scores by its embedding's cosine with each label's)
    before any round. DP-SGD then corrects a prior instead of building one from noisy
    steps. The texts are the run config's, public to every party, so the start costs no
    privacy; every node computes the same one."""
    from privatune.common.model.features import embed_texts  # common.features imports this module

    names = embed_texts(model, cfg, label_texts(cfg))
    layer = head_of(model)[-1]
    with torch.no_grad():
        layer.weight.copy_(torch.nn.functional.normalize(names, dim=-1) * cfg.model.label_init)
        layer.bias.zero_()


def _seed_lora_a(model: PeftModel, seed: int, full_rank: int) -> None:
    """Initialise every LoRA A from (seed, parameter name) alone, as peft does (Kaiming
    uniform), cut to this model's rank: nodes of any rank then share the same A rows, which
    FFA-LoRA (A frozen, never sent) relies on."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                gen = torch.Generator().manual_seed(seed * 65_537 + zlib.crc32(name.encode()))
                full = torch.empty(full_rank, param.shape[1])
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
                param.copy_(full[: param.shape[0]].to(param.device, param.dtype))
