"""Who this client is and where its data and ledger live.

In deployment every value comes from the SuperNode's ``--node-config`` (set by the
institution, never by the server): ``institution``, ``data-path``, ``ledger-path``,
``max-epsilon``, ``budget-scope``, ``device``, ``text-column``, ``label-column``, ``lora-rank``
(a smaller adapter for a small GPU). In simulation the node only knows its ``partition-id``;
the prepared data folder names its institutions and ``lora.client-ranks`` their ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from common.config import ConfigError, RunConfig

NODE_KEYS = {
    "institution",
    "data-path",
    "ledger-path",
    "max-epsilon",
    "budget-scope",
    "device",
    "text-column",
    "label-column",
    "lora-rank",
    "partition-id",
    "num-partitions",
}


@dataclass(frozen=True)
class Institution:
    name: str
    data_path: Path
    ledger_path: Path
    max_epsilon: float
    budget_scope: str
    device: str
    text_column: str
    label_column: str
    rank: int  # this institution's LoRA rank, at most lora.rank

    @classmethod
    def from_context(cls, context: Context, cfg: RunConfig, run_name: str) -> Institution:
        node = dict(context.node_config)
        unknown = sorted(set(node) - NODE_KEYS)
        if unknown:
            raise ConfigError(f"unknown node-config key(s): {', '.join(unknown)}")
        rank = cfg.lora.rank
        if "data-path" in node:
            name = str(node.get("institution", f"node-{context.node_id}"))
            data_path = Path(str(node["data-path"]))
            ledger_default = data_path.parent / "privacy-ledger.jsonl"
        else:
            pid = int(node.get("partition-id", 0))
            name = simulated_name(Path(cfg.data.dir), pid)
            data_path = Path(cfg.data.dir) / f"{name}.csv"
            ledger_default = Path(cfg.run.output_dir) / run_name / "privacy" / f"{name}.jsonl"
            if cfg.lora.ranks:
                rank = cfg.lora.ranks[pid % len(cfg.lora.ranks)]
        rank = int(node.get("lora-rank", rank))
        if not 0 < rank <= cfg.lora.rank:
            raise ConfigError(f"{name}: lora-rank {rank} must be between 1 and {cfg.lora.rank}")
        scope = str(node.get("budget-scope", cfg.privacy.budget_scope))
        if scope not in ("lifetime", "run"):
            raise ConfigError(f"budget-scope must be 'lifetime' or 'run', got {scope!r}")
        return cls(
            name=name,
            data_path=data_path,
            ledger_path=Path(str(node.get("ledger-path", ledger_default))),
            max_epsilon=float(node.get("max-epsilon", cfg.privacy.max_epsilon)),
            budget_scope=scope,
            device=str(node.get("device", "auto")),
            text_column=str(node.get("text-column", cfg.data.text_column)),
            label_column=str(node.get("label-column", cfg.data.label_column)),
            rank=rank,
        )


def simulated_name(data_dir: Path, partition_id: int) -> str:
    """Institution names come from the prepared folder's manifest (written by
    ``simulations.prepare``); without one, a neutral ``institution-NN``."""
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        names = json.loads(manifest.read_text())["institutions"]
        if partition_id >= len(names):
            raise ConfigError(
                f"{manifest}: partition {partition_id} has no institution "
                f"({len(names)} prepared); run fewer supernodes or prepare more"
            )
        return names[partition_id]
    return f"institution-{partition_id:02d}"
