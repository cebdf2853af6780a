"""Who this client is, where its data and ledger live, and its own privacy policy.

In deployment every value comes from the SuperNode's ``--node-config``, set by the
institution and never by the server: ``institution``, ``data-path``, ``ledger-path``, its
``signing-key`` and ``anchor-path`` (by default under the node's state folder, outside the
ledger's), the policy (``max-epsilon``, ``max-delta``, ``accountants`` are required;
``local-eval-noise``, ``count-noise``, ``allow-non-private``, ``max-refusals`` and the
testing-only ``insecure-seed`` optional), the data schema (``labels`` required;
``text-column``, ``label-column``, ``encoding``, ``eval-fraction``), ``device`` and
``lora-rank`` (a smaller adapter for a small GPU). The run config's ``data.labels`` must
equal the node's; its columns, encoding and evaluation split are never used, so no request
can make the node's answer depend on its rows. A node without its policy, schema or ledger
path refuses to train. In simulation the node only knows its ``partition-id``: the prepared
data folder names its institutions, ``lora.client-ranks`` their ranks, and the run config's
``privacy`` and ``data`` sections stand in for their policy and schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from privatune.common.config import (
    ConfigError,
    PrivacyPolicy,
    RunConfig,
    check_eval_fraction,
    check_policy,
    resolve,
)
from privatune.common.model.corpus import CORPORA

REQUIRED_IN_DEPLOYMENT = ("ledger-path", "max-epsilon", "max-delta", "accountants", "labels")
NODE_KEYS = {
    "institution",
    "data-path",
    "ledger-path",
    "signing-key",
    "anchor-path",
    "max-epsilon",
    "max-delta",
    "accountants",
    "local-eval-noise",
    "count-noise",
    "allow-non-private",
    "max-refusals",
    "insecure-seed",
    "device",
    "labels",
    "text-column",
    "label-column",
    "encoding",
    "eval-fraction",
    "lora-rank",
    "partition-id",
    "num-partitions",
}
DEFAULT_MAX_REFUSALS = 20  # requests refused in a row before the node stops answering
_DEFAULTS = resolve()  # what a node config leaves out: the shipped defaults, never the run's


@dataclass(frozen=True)
class Policy:
    """The institution's own privacy parameters; the run config can ask, never set them."""

    max_epsilon: float
    max_delta: float
    accountants: tuple[str, ...]
    local_eval_noise: float  # 0: no local evaluation is released
    count_noise: float  # std (rows) of the DP count of the training rows
    allow_non_private: bool
    insecure_seed: int | None  # testing only: noise and sampling predictable from it
    max_refusals: int = DEFAULT_MAX_REFUSALS

    @classmethod
    def simulated(cls, p: PrivacyPolicy) -> Policy:
        """Every simulated institution's policy: the run config's ``privacy`` section."""
        seed = p.insecure_seed if p.insecure_seed >= 0 else None
        return cls(
            p.max_epsilon,
            p.max_delta,
            tuple(p.accountant_list),
            p.local_eval_noise,
            p.count_noise,
            p.allow_non_private,
            seed,
        )


@dataclass(frozen=True)
class Institution:
    name: str
    data_path: Path
    ledger_path: Path
    signing_key: Path | None  # None: common.privacy.ledger.default_key
    anchor_path: Path | None  # None: common.privacy.ledger.default_anchor
    simulated: bool  # a simulation creates its ledgers on first use; a deployment never
    policy: Policy
    device: str
    labels: tuple[str, ...]  # the data schema: the node's own (deployment)
    text_column: str
    label_column: str
    encoding: str  # of its CSV/TSV/JSONL file
    eval_fraction: float  # the local evaluation split's share
    rank: int  # this institution's LoRA rank, at most lora.rank

    @classmethod
    def from_context(cls, context: Context, cfg: RunConfig, run_name: str) -> Institution:
        node = dict(context.node_config)
        unknown = sorted(set(node) - NODE_KEYS)
        if unknown:
            raise ConfigError(f"unknown node-config key(s): {', '.join(unknown)}")
        rank = cfg.lora.rank
        simulated = "data-path" not in node
        labels = tuple(cfg.data.label_names)
        if not simulated:
            name = str(node.get("institution", f"node-{context.node_id}"))
            missing = [k for k in REQUIRED_IN_DEPLOYMENT if k not in node]
            if missing:
                raise ConfigError(
                    f"{name}: node config lacks {', '.join(missing)}; an institution sets its "
                    "own ledger, privacy policy and data schema, the server cannot"
                )
            data_path = Path(str(node["data-path"]))
            ledger_path = Path(str(node["ledger-path"]))
            policy = _policy(node, name)
            labels = tuple(x.strip() for x in str(node["labels"]).split(",") if x.strip())
            if cfg.model.subspace and cfg.model.subspace not in CORPORA:
                raise ConfigError(
                    f"{name}: model.subspace {cfg.model.subspace!r}: in deployment only a "
                    f"built-in public corpus ({', '.join(CORPORA)}); a file the run config "
                    "names could be this institution's own data, which the projection "
                    "would then carry outside DP"
                )
            schema = _DEFAULTS.data  # never the run's: the node owns its schema
            anchor = node.get("anchor-path")
            anchor_path = Path(str(anchor)) if anchor else None
            key = node.get("signing-key")
            signing_key = Path(str(key)) if key else None
            try:
                eval_fraction = float(node.get("eval-fraction", 0.0))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{name}: node config eval-fraction: {e}") from e
            check_eval_fraction(f"{name}: node config eval-fraction", eval_fraction)
        else:
            pid = int(node.get("partition-id", 0))
            name = simulated_name(Path(cfg.data.dir), pid)
            data_path = simulated_file(Path(cfg.data.dir), name)
            ledger_path = Path(cfg.run.output_dir) / run_name / "privacy" / f"{name}.jsonl"
            state = simulated_state(Path(cfg.run.output_dir), run_name)
            signing_key, anchor_path = state / f"{name}.key", state / f"{name}.anchor"
            policy = Policy.simulated(cfg.privacy)
            schema, eval_fraction = cfg.data, cfg.data.eval_fraction
            if cfg.lora.ranks:
                rank = cfg.lora.ranks[pid % len(cfg.lora.ranks)]
        rank = int(node.get("lora-rank", rank))
        if not 0 < rank <= cfg.lora.rank:
            raise ConfigError(f"{name}: lora-rank {rank} must be between 1 and {cfg.lora.rank}")
        return cls(
            name=name,
            data_path=data_path,
            ledger_path=ledger_path,
            signing_key=signing_key,
            anchor_path=anchor_path,
            simulated=simulated,
            policy=policy,
            device=str(node.get("device", "auto")),
            labels=labels,
            text_column=str(node.get("text-column", schema.text_column)),
            label_column=str(node.get("label-column", schema.label_column)),
            encoding=str(node.get("encoding", schema.encoding)),
            eval_fraction=eval_fraction,
            rank=rank,
        )


def _policy(node: dict, name: str) -> Policy:
    """The policy keys of a node config, checked as the run config's are."""
    try:
        max_epsilon = float(node["max-epsilon"])
        max_delta = float(node["max-delta"])
        eval_noise = float(node.get("local-eval-noise", 0.0))
        count_noise = float(node.get("count-noise", _DEFAULTS.privacy.count_noise))
        max_refusals = int(node.get("max-refusals", DEFAULT_MAX_REFUSALS))
        seed = node.get("insecure-seed")
        insecure_seed = int(seed) if seed is not None else None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: node config: {e}") from e
    accountants = tuple(a.strip() for a in str(node["accountants"]).split(",") if a.strip())
    check_policy(
        f"{name}: node config ", max_epsilon, max_delta, list(accountants), eval_noise, count_noise
    )
    if max_refusals < 1:
        raise ConfigError(f"{name}: node config max-refusals must be at least 1")
    allow = node.get("allow-non-private", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"{name}: node config allow-non-private must be true or false")
    return Policy(
        max_epsilon,
        max_delta,
        accountants,
        eval_noise,
        count_noise,
        allow,
        insecure_seed,
        max_refusals,
    )


def simulated_state(output_dir: Path, run_name: str) -> Path:
    """A simulated run's node state (signing keys, anchors): beside the run folder, never in
    it, so that a copy of the run handed to an auditor holds no private key."""
    return Path(output_dir) / ".node-state" / run_name


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
