"""The one set-up of logging and warnings, run by every entry point (the ClientApp's
handlers, the ServerApp, the CLI, the simulation runner, the benchmarks), never on import:
a library user's own filters and log levels are theirs."""

from __future__ import annotations

import functools
import logging
import os
import warnings

# Warnings every round of every client would repeat, each expected:
EXPECTED = (
    # Our generators are CSPRNG-seeded; Opacus' own secure mode needs torchcsprng, which is
    # not built for this torch.
    "Secure RNG turned off",
    # Opacus' hooks on frozen embeddings.
    "Full backward hook is firing",
    # transformers 5 on peft's use of a renamed attribute, once per model build.
    ".*is_gradient_checkpointing.*",
    # Opacus' RDP: the bound is valid either way (only a larger alpha could tighten it).
    "Optimal order is the largest alpha",
)


class _NoRunSimulationDeprecation(logging.Filter):
    """Flower deprecates ``run_simulation``, which ``privatune simulate`` calls on purpose
    (it hands the apps their resolved config in process), so a user need not read it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@functools.cache
def quiet() -> None:
    """Offline model loading, and no chatter a user cannot act on (once per process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for message in EXPECTED:
        warnings.filterwarnings("ignore", message=message)
    # Opacus' PRV of an unsampled release (q = 1, a local evaluation) takes log(0) on the way.
    warnings.filterwarnings(
        "ignore", category=RuntimeWarning, module="opacus.accountants.analysis.prv"
    )
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's per-order chatter
    logging.getLogger("flwr").addFilter(_NoRunSimulationDeprecation())
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
