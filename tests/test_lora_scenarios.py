"""The LoRA scenarios (``medical-lora``, ``complaints-lora`` and their ``-gpu`` variants) are
their base federations with an adapter: same records, split and test set, so that their
scores compare with the probe's; the CPU ones train from the cache of the frozen layers, the
GPU ones adapt every layer. Config only: nothing trains here."""

from __future__ import annotations

import pytest
from privatune.common.config import resolve
from privatune.common.model.top_layers import uses_top_layers
from privatune.simulations.scenario import load_scenario
from privatune.simulations.simulate import resolve_flat

SPLIT = ("dataset", "institutions", "prefix", "partition", "dirichlet_alpha", "train_rows")
# what the GPU variant may change of the CPU recipe
GPU_KEYS = {"lora.layers", "model.bf16"}


def _inputs(cfg) -> tuple:
    """What decides a model input: the records, their labels, the text's length and pooling."""
    m = cfg.model
    return (
        cfg.data.dir,
        cfg.data.test_path,
        cfg.data.label_names,
        m.max_length,
        m.pooling,
        m.subspace,
        m.subspace_dim,
        m.feature_norm,
        m.name,
    )


@pytest.mark.parametrize("base", ["medical", "complaints"])
def test_a_lora_scenario_is_its_federation_with_an_adapter_on_the_top_layers(base):
    probe, lora = load_scenario(base), load_scenario(f"{base}-lora")
    assert all(getattr(lora, k) == getattr(probe, k) for k in SPLIT)  # same data, same split
    probe_cfg, cfg = resolve(resolve_flat(probe)), resolve(resolve_flat(lora))
    assert _inputs(cfg) == _inputs(probe_cfg)  # the same prepared files, test set included
    assert (probe_cfg.train.trainable, cfg.train.trainable) == ("head", "adapter")
    assert 1 <= cfg.lora.layers <= 2 and uses_top_layers(cfg)  # the CPU path: from the cache
    assert cfg.model.label_init > 0 and len(cfg.model.label_texts_list) == len(
        cfg.data.label_names
    )  # the head starts from the labels' names
    assert cfg.dp.enabled and cfg.dp.target_epsilon == 8.0 and cfg.dp.accountant == "prv"


@pytest.mark.parametrize("base", ["medical", "complaints"])
def test_a_lora_gpu_scenario_adapts_every_layer_with_the_cpu_recipe(base):
    cpu, gpu = load_scenario(f"{base}-lora"), load_scenario(f"{base}-lora-gpu")
    assert all(getattr(gpu, k) == getattr(cpu, k) for k in SPLIT)
    keys = cpu.config.keys() | gpu.config.keys()
    assert {k for k in keys if cpu.config.get(k) != gpu.config.get(k)} <= GPU_KEYS
    cfg = resolve(resolve_flat(gpu))
    assert cfg.train.trainable == "adapter" and cfg.lora.layers == 0 and not uses_top_layers(cfg)
    assert cfg.model.bf16 and cfg.dp.enabled
