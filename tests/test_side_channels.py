"""Side channels around DP (issue #27): each test plays what an honest-but-curious aggregator
did to an earlier version, against the real ClientApp (and a real simulation where the
attack ran in one), and shows it now learns nothing about one record outside the accounted
mechanisms. Names say what they play: membership, oracle, neighbour, anchor, side_channel."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import pandas as pd
import privatune.client.app as client_app
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from helpers import metadata, simulate
from privatune.client.app import (
    CONFIG_FAILED,
    DATA_FAILED,
    FAILED,
    LEDGER_FAILED,
    STOPPED,
    create_app,
)
from privatune.client.institution import Institution
from privatune.common.config import resolve
from privatune.common.data import load_labeled, split_local
from privatune.common.local import cache_root, state_root
from privatune.common.model.adapter import get_trainable, to_record
from privatune.common.model.build import build_model
from privatune.common.model.features import cached_embed
from privatune.common.privacy.accounting import public_size
from privatune.common.privacy.audit import audit_ledger
from privatune.common.privacy.ledger import (
    Ledger,
    LedgerError,
    default_anchor,
    read_records,
    record_hash,
)
from privatune.common.protocol import LEDGER_SEEN, error_reason, read_lines
from privatune.simulations.simulate import SimulationError

CPU = torch.device("cpu")
LABELS = ["negative", "neutral", "positive"]
TARGET = "the one patient whose presence the server wants to test: zoë's rare reaction"


def _msg(cfg, rnd: int = 1, kind: str = "train", seen: int = 0) -> Message:
    config = {"run-name": cfg.run.name, "server-round": rnd, LEDGER_SEEN: seen}
    content = RecordDict(
        {
            "arrays": to_record(get_trainable(build_model(cfg, CPU))),
            "config": ConfigRecord(config),
        }
    )
    return Message(content=content, metadata=metadata(1, kind, src=0))


def _node(tmp_path: Path, data: Path, name: str = "st-marys", **extra) -> dict:
    """A deployed institution: its own file, ledger (created once), policy and schema."""
    ledger = tmp_path / name / "ledger" / "ledger.jsonl"
    if not ledger.exists():
        Ledger.create(ledger, name)
    return {
        "institution": name,
        "data-path": str(data),
        "ledger-path": str(ledger),
        "labels": "negative,neutral,positive",
        "max-epsilon": 100.0,
        "max-delta": 1e-5,
        "accountants": "rdp",
        **extra,
    }


def _ask(
    flat: dict, node: dict, rnd: int = 1, kind: str = "train", seen: int = 0, msg_flat=None
) -> Message:
    """The node's answer to a request of run config ``flat`` (its adapter built from
    ``msg_flat`` when ``flat`` itself is one no valid adapter fits)."""
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
    return create_app()(_msg(resolve(msg_flat or flat), rnd, kind, seen), ctx)


def _neighbours(tmp_path: Path, federation_dir: Path) -> tuple[Path, Path]:
    """A hospital's file without and with one target record (add/remove neighbours)."""
    base = pd.read_csv(federation_dir / "hospital-a.csv")
    without, with_target = tmp_path / "without.csv", tmp_path / "with.csv"
    base.to_csv(without, index=False)
    pd.concat([base, pd.DataFrame({"text": [TARGET], "label": ["neutral"]})]).to_csv(
        with_target, index=False
    )
    return without, with_target


def _fingerprint(path: Path) -> str:
    return load_labeled(path, "text", "label", LABELS).fingerprint


# --- 1. the ledger head is a hiding commitment ---------------------------------------------


@pytest.mark.parametrize("forced_refusal", [False, True])
def test_membership_replay_of_candidate_files_matches_neither(
    tiny_flat, tmp_path, federation_dir, forced_refusal
):
    """The server rebuilds the record behind the head it received for the file with and
    without the target. We hand it every field of the real record (time, budget, previous
    head, adapter fingerprint: more than it could guess) but the secret nonce; neither
    candidate matches. With the nonce (what every record lacked before) the true candidate
    matches, so the replay has the power the old format gave it. A refusal the server forces
    (a tiny budget: no adapter at all in the reply) gives it no more."""
    without, with_target = _neighbours(tmp_path, federation_dir)
    flat = {**tiny_flat, "dp.noise-multiplier": 1.0}
    node = _node(tmp_path, with_target, **({"max-epsilon": 0.5} if forced_refusal else {}))
    reply = _ask(flat, node)
    assert bool(reply.content["metrics"]["refused"]) == forced_refusal
    count, head = reply.content["info"]["ledger-records"], reply.content["info"]["ledger-head"]
    record = dataclasses.asdict(read_records(Path(node["ledger-path"]))[count - 1])
    assert record["status"] == ("refused" if forced_refusal else "trained")
    candidates = {"with": _fingerprint(with_target), "without": _fingerprint(without)}
    assert record["data_fingerprint"] == candidates["with"]
    for nonce in ("", "0" * 64):
        for fp in candidates.values():
            assert record_hash({**record, "data_fingerprint": fp, "nonce": nonce}) != head
    assert record_hash({**record, "data_fingerprint": candidates["with"]}) == head
    assert record_hash({**record, "data_fingerprint": candidates["without"]}) != head


# --- 2. errors are no oracle -----------------------------------------------------------------


def test_oracle_labels_and_encoding_of_the_run_do_not_reach_the_rows(
    tiny_flat, tmp_path, federation_dir
):
    """The server sets data.labels without the target's label, and data.encoding = ascii
    against its non-ASCII character: before, the file with the target errored and the one
    without trained. The node reads its file with its own schema only: both files get the
    same answer to each request (a refusal stating the rule, or training)."""
    without, with_target = _neighbours(tmp_path, federation_dir)
    flat = {**tiny_flat, "dp.noise-multiplier": 1.0}
    requests = {
        "labels": {**flat, "data.labels": "negative,positive"},
        "encoding": {**flat, "data.encoding": "ascii"},
    }
    for what, run in requests.items():
        answers = []
        for i, data in enumerate((without, with_target)):
            out = _ask(run, _node(tmp_path, data, name=f"{what}-{i}"))
            answers.append(out.error.reason.partition(": ")[2] if out.has_error() else "trained")
        assert answers[0] == answers[1], what
    assert answers == ["trained", "trained"]  # the run's encoding is never used


def test_oracle_every_exception_reaches_the_server_as_fixed_text(
    tiny_flat, tmp_path, federation_dir
):
    """A model.max-length beyond the model's positions raised a tensor-size error whose
    numbers were the longest record's token length; an absurd one is refused by its bound.
    Either way the reply is fixed text, the same for every file."""
    without, with_target = _neighbours(tmp_path, federation_dir)
    flat = {**tiny_flat, "dp.noise-multiplier": 1.0, "model.max-length": 128}  # tiny model: 64
    reasons = {
        _ask(flat, _node(tmp_path, data, name=f"n{i}")).error.reason.partition(": ")[2]
        for i, data in enumerate((without, with_target))
    }
    assert reasons == {FAILED}
    huge = _ask(
        {**flat, "model.max-length": 10**7}, _node(tmp_path, without, name="huge"), msg_flat=flat
    )
    assert huge.error.reason == error_reason("huge", CONFIG_FAILED)
    broken = tmp_path / "broken.csv"
    broken.write_text("text,label\nfine,positive\nodd,maybe\n")
    bad = _ask(flat, _node(tmp_path, broken, name="broken"))
    assert bad.error.reason == error_reason("broken", DATA_FAILED)  # no file, column or value


@pytest.mark.simulation
def test_oracle_in_a_real_simulation_metrics_hold_no_data_dependent_numbers(tiny_flat):
    """The reviewer's simulation: metrics.jsonl stored each institution's tensor-size error
    (its longest record's token length, its first batch size). Now every failure it records
    is the institution's name and one fixed sentence."""
    short = Path(tiny_flat["data.dir"]) / "short-test.csv"  # the server's own, under 64 tokens
    pd.DataFrame({"text": ["good", "bad", "fine"] * 4, "label": LABELS * 4}).to_csv(short)
    flat = {
        **tiny_flat,
        "model.max-length": 128,  # the tiny model has 64 positions: each node's long rows fail
        "federation.rounds": 1,
        "data.test-path": str(short),
    }
    with contextlib.suppress(SimulationError):  # no institution trains
        simulate(flat)
    (line,) = [x for x in read_lines(Path(flat["run.output-dir"]) / "test-run") if x["round"]]
    assert line["failed"] == {name: FAILED for name in ("hospital-a", "hospital-b", "hospital-c")}


def test_oracle_a_node_stops_answering_after_max_refusals(tiny_flat, tmp_path, federation_dir):
    node = _node(tmp_path, federation_dir / "hospital-a.csv", **{"max-refusals": 3})
    probe = {**tiny_flat, "dp.accountant": "prv"}  # a request this node's policy refuses
    reasons = [_ask(probe, node).error.reason for _ in range(5)]
    assert reasons[:3] == [error_reason("st-marys", reasons[0].partition(": ")[2])] * 3
    assert "dp.accountant" in reasons[0]  # the rule, from the run config and policy only
    assert reasons[3:] == [error_reason("st-marys", STOPPED)] * 2
    records = read_records(Path(node["ledger-path"]))
    assert [r.status for r in records[1:]] == ["refused"] * 3  # each refusal is on record
    assert _ask({**tiny_flat, "dp.noise-multiplier": 1.0}, node).has_error()  # stays stopped


# --- 3. the count is DP; 4. the split is the node's ----------------------------------------


def test_neighbour_files_release_the_same_values_given_the_dp_count(
    tiny_flat, tmp_path, federation_dir, monkeypatch
):
    """Before, num-examples, the sample rate and the steps were exact functions of the row
    count, which neighbouring files differ in. Now they follow from the DP count (a Gaussian
    mechanism in the ledger): given the same count, every released scalar and the ledger
    length are the same for both files, and the count's cost is accounted and audited."""
    without, with_target = _neighbours(tmp_path, federation_dir)
    drawn = []

    def same_draw(n: int, sigma: float, rng) -> int:
        drawn.append((n, sigma))
        return 37  # condition both files on one outcome of the count mechanism

    monkeypatch.setattr(client_app, "public_size", same_draw)
    flat = {**tiny_flat, "dp.noise-multiplier": 1.0, "data.eval-fraction": 0.5}
    released = []
    for i, data in enumerate((without, with_target)):
        node = _node(tmp_path, data, name=f"site-{i}", **{"eval-fraction": 0.0})
        out = _ask(flat, node)
        released.append((dict(out.content["metrics"]), out.content["info"]["ledger-records"]))
        assert audit_ledger(Path(node["ledger-path"])).ok
        counted = [r for r in read_records(Path(node["ledger-path"])) if r.status == "counted"]
        assert [(r.count, r.noise_multiplier, r.steps) for r in counted] == [(37, 20.0, 1)]
    assert released[0] == released[1]
    assert released[0][0]["num-examples"] == 37
    (n0, _), (n1, _) = drawn
    assert n1 == n0 + 1  # the exact counts differed by the target; nothing released shows it


def test_neighbour_count_is_the_gaussian_mechanism_the_ledger_accounts():
    draws = [public_size(400, 20.0, random.SystemRandom()) for _ in range(4000)]
    mean = sum(draws) / len(draws)
    std = (sum((d - mean) ** 2 for d in draws) / len(draws)) ** 0.5
    assert abs(mean - 400) < 2 and 18.5 < std < 21.5
    assert min(public_size(0, 20.0, random.Random(i)) for i in range(200)) == 1  # at least 1


def test_neighbour_split_is_the_nodes_and_no_record_moves(tiny_flat, tmp_path, federation_dir):
    """The server chose data.eval-fraction 0.999999 to leave one training record, so that
    neighbours differed by two training records. The run's fraction is now bounded (at most
    0.5) and in deployment never used: the node config's is, and each record's side depends
    on that record alone."""
    flat = {**tiny_flat, "dp.noise-multiplier": 1.0}
    with pytest.raises(Exception, match=r"eval-fraction must lie in \[0, 0.5\]"):
        resolve({**flat, "data.eval-fraction": 0.999999})
    node = _node(tmp_path, federation_dir / "hospital-a.csv", **{"eval-fraction": 0.0})
    out = _ask({**flat, "data.eval-fraction": 0.5}, node)
    assert not out.has_error()
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
    assert Institution.from_context(ctx, resolve(flat), "r").eval_fraction == 0.0
    full = load_labeled(
        federation_dir / "hospital-a.csv", "text", "label", ["negative", "neutral", "positive"]
    )
    for frac in (0.0, 0.2, 0.5):
        train, held = split_local(full, frac)
        smaller_train, smaller_held = split_local(full.subset(list(range(1, len(full)))), frac)
        gone = full.texts[0]
        assert set(train.texts) - {gone} == set(smaller_train.texts)
        assert set(held.texts) - {gone} == set(smaller_held.texts)


# --- 5. ledgers fail closed --------------------------------------------------------------------


def test_anchor_restoring_the_ledger_folder_does_not_reset_the_budget(
    tiny_flat, tmp_path, federation_dir
):
    """Restoring an old backup of the ledger's folder brought back its anchor too, and the
    node trained again on a reset budget (true spend 9.38 against 8). The anchor and the key
    now live outside that folder: the restored ledger is shorter than the anchor."""
    flat = {**tiny_flat, "dp.noise-multiplier": 1.0}
    node = _node(tmp_path, federation_dir / "hospital-a.csv")
    ledger = Path(node["ledger-path"])
    folder = ledger.parent
    assert not any(p.suffix in (".key", ".anchor") for p in folder.iterdir())  # none inside
    assert not _ask(flat, node, 1).has_error()
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    seen = _ask(flat, node, 2).content["info"]["ledger-records"]
    shutil.rmtree(folder)
    shutil.copytree(backup, folder)  # the restore
    out = _ask(flat, node, 3)
    assert out.has_error() and out.error.reason == error_reason("st-marys", LEDGER_FAILED)
    with pytest.raises(LedgerError, match="shorter than the last known head"):
        Ledger(ledger)

    # The state folder restored as well (or the anchor deleted): the server's count of the
    # records it already received from this node still refuses the shorter ledger.
    anchor = default_anchor(ledger)
    anchor.unlink()
    with pytest.raises(LedgerError, match=r"anchor .* is missing although the ledger holds"):
        Ledger(ledger)
    Path(anchor).write_text(json.dumps({"records": 2, "head": read_records(ledger)[1].hash}))
    assert _ask(flat, node, 3, seen=seen).has_error()
    with pytest.raises(LedgerError, match=f"fewer than the {seen} this node already reported"):
        Ledger(ledger, seen=seen)


# --- 6. the node's caches --------------------------------------------------------------------


def test_side_channel_the_embedding_cache_is_private_and_keyed_by_a_secret(tiny_flat, tmp_path):
    """Shards were 0644 in 0755 folders, keyed by the SHA-256 of each text: hashing
    candidate texts recovered 32 of 40. Now 0600 in 0700 folders, keys HMACs under a
    node-local secret, so hashing candidates finds none."""
    cfg = resolve({**tiny_flat, "train.trainable": "head"})
    data = load_labeled(
        Path(tiny_flat["data.dir"]) / "hospital-b.csv", "text", "label", cfg.data.label_names
    )
    cached_embed(build_model(cfg, CPU), data, cfg)
    shards = list((cache_root() / "embeddings").rglob("*.pt"))
    assert shards
    keys = set()
    for shard in shards:
        assert shard.stat().st_mode & 0o777 == 0o600
        folder = shard.parent
        while folder != cache_root().parent:
            assert folder.stat().st_mode & 0o777 == 0o700, folder
            folder = folder.parent
        keys |= set(torch.load(shard, weights_only=True)["keys"])
    guesses = {hashlib.sha256(t.encode()).hexdigest() for t in data.texts}
    assert len(keys) >= len(set(data.texts)) and not guesses & keys
    assert (state_root() / "cache.secret").stat().st_mode & 0o777 == 0o600
