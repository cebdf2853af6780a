"""Who this client is, where its data and ledger live, and its own privacy policy.

In deployment every value comes from the SuperNode's ``--node-config``, set by the
institution and never by the server: ``institution``, ``data-path``, ``ledger-path``,
``signing-key``, the policy (``max-epsilon``, ``max-delta``, ``accountants`` are required;
``local-eval-noise``, ``allow-non-private`` and the testing-only ``insecure-seed`` optional),
``device``, ``text-column``, ``label-column``, ``encoding`` and ``lora-rank`` (a smaller
adapter for a small GPU). A node without its policy or ledger path refuses to train. In
simulation the node only knows its ``partition-id``: the prepared data folder names its
institutions, ``lora.client-ranks`` their ranks, and the ``privacy`` section of the run
config stands in for their policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from common.config import ConfigError, PrivacyPolicy, RunConfig, check_policy
from common.subspace import CORPORA

REQUIRED_IN_DEPLOYMENT = ("ledger-path", "max-epsilon", "max-delta", "accountants")
NODE_KEYS = {
    "institution",
    "data-path",
    "ledger-path",
    "signing-key",
    "max-epsilon",
    "max-delta",
    "accountants",
    "local-eval-noise",
    "allow-non-private",
    "insecure-seed",
    "device",
    "text-column",
    "label-column",
    "encoding",
    "lora-rank",
    "partition-id",
    "num-partitions",
}


@dataclass(frozen=True)
class Policy:
    """The institution's own privacy parameters; the run config can ask, never set them."""

    max_epsilon: float
    max_delta: float
    accountants: tuple[str, ...]
    local_eval_noise: float  # 0: no local evaluation is released
    allow_non_private: bool
    insecure_seed: int | None  # testing only: noise and sampling predictable from it

    @classmethod
    def simulated(cls, p: PrivacyPolicy) -> Policy:
        """Every simulated institution's policy: the run config's ``privacy`` section."""
        seed = p.insecure_seed if p.insecure_seed >= 0 else None
        return cls(
            p.max_epsilon,
            p.max_delta,
            tuple(p.accountant_list),
            p.local_eval_noise,
            p.allow_non_private,
            seed,
        )


@dataclass(frozen=True)
class Institution:
    name: str
    data_path: Path
    ledger_path: Path
    signing_key: Path | None  # None: the key created beside the ledger
    simulated: bool  # a simulation creates its ledgers on first use; a deployment never
    policy: Policy
    device: str
    text_column: str
    label_column: str
    rank: int  # this institution's LoRA rank, at most lora.rank
    encoding: str = "utf-8"  # of its CSV/TSV/JSONL file (node config, else data.encoding)

    @classmethod
    def from_context(cls, context: Context, cfg: RunConfig, run_name: str) -> Institution:
        node = dict(context.node_config)
        unknown = sorted(set(node) - NODE_KEYS)
        if unknown:
            raise ConfigError(f"unknown node-config key(s): {', '.join(unknown)}")
        rank = cfg.lora.rank
        simulated = "data-path" not in node
        if not simulated:
            name = str(node.get("institution", f"node-{context.node_id}"))
            missing = [k for k in REQUIRED_IN_DEPLOYMENT if k not in node]
            if missing:
                raise ConfigError(
                    f"{name}: node config lacks {', '.join(missing)}; an institution sets its "
                    "own ledger and privacy policy, the server cannot"
                )
            data_path = Path(str(node["data-path"]))
            ledger_path = Path(str(node["ledger-path"]))
            policy = _policy(node, name)
            if cfg.model.subspace and cfg.model.subspace not in CORPORA:
                raise ConfigError(
                    f"{name}: model.subspace {cfg.model.subspace!r}: in deployment only a "
                    f"built-in public corpus ({', '.join(CORPORA)}); a file the run config "
                    "names could be this institution's own data, which the projection "
                    "would then carry outside DP"
                )
        else:
            pid = int(node.get("partition-id", 0))
            name = simulated_name(Path(cfg.data.dir), pid)
            data_path = simulated_file(Path(cfg.data.dir), name)
            ledger_path = Path(cfg.run.output_dir) / run_name / "privacy" / f"{name}.jsonl"
            policy = Policy.simulated(cfg.privacy)
            if cfg.lora.ranks:
                rank = cfg.lora.ranks[pid % len(cfg.lora.ranks)]
        rank = int(node.get("lora-rank", rank))
        if not 0 < rank <= cfg.lora.rank:
            raise ConfigError(f"{name}: lora-rank {rank} must be between 1 and {cfg.lora.rank}")
        key = node.get("signing-key")
        return cls(
            name=name,
            data_path=data_path,
            ledger_path=ledger_path,
            signing_key=Path(str(key)) if key else None,
            simulated=simulated,
            policy=policy,
            device=str(node.get("device", "auto")),
            text_column=str(node.get("text-column", cfg.data.text_column)),
            label_column=str(node.get("label-column", cfg.data.label_column)),
            rank=rank,
            encoding=str(node.get("encoding", cfg.data.encoding)),
        )


def _policy(node: dict, name: str) -> Policy:
    """The policy keys of a node config, checked as the run config's are."""
    try:
        max_epsilon = float(node["max-epsilon"])
        max_delta = float(node["max-delta"])
        eval_noise = float(node.get("local-eval-noise", 0.0))
        seed = node.get("insecure-seed")
        insecure_seed = int(seed) if seed is not None else None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: node config: {e}") from e
    accountants = tuple(a.strip() for a in str(node["accountants"]).split(",") if a.strip())
    check_policy(f"{name}: node config ", max_epsilon, max_delta, list(accountants), eval_noise)
    allow = node.get("allow-non-private", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"{name}: node config allow-non-private must be true or false")
    return Policy(max_epsilon, max_delta, accountants, eval_noise, allow, insecure_seed)


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


def simulated_file(data_dir: Path, name: str) -> Path:
    """A simulated institution's file: the manifest's ``files`` entry when it has one (a path
    relative to the folder or absolute: user data of any format, ``privatune simulate
    --data-dir``), else ``<name>.csv`` in the folder."""
    manifest = data_dir / "manifest.json"
    files = json.loads(manifest.read_text()).get("files", {}) if manifest.is_file() else {}
    return data_dir / files.get(name, f"{name}.csv")
