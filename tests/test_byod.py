"""Bring your own data (``privatune simulate --data-dir``): the user's folder is only read,
one institution per file or one file split by a column or by label skew, labels inferred,
files that are not UTF-8."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from privatune.cli.main import app
from privatune.client.institution import Institution
from privatune.common.config import RunConfig
from privatune.common.data import DataError, load_labeled
from privatune.simulations.byod import UserData, prepare_user_data, user_flat
from privatune.simulations.scenario import load_scenario
from typer.testing import CliRunner


def ctx(partition_id: int) -> Context:
    node = {"partition-id": partition_id}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture()
def user_folder(tmp_path, reviews) -> Path:
    """Three institutions in three formats, with the user's own column names, and a test file."""
    folder = tmp_path / "mine"
    folder.mkdir()
    rows = reviews.rename(columns={"text": "review", "label": "rating"})[["review", "rating"]]
    rows.iloc[0:40].to_csv(folder / "clinic-a.csv", index=False)
    rows.iloc[40:80].to_csv(folder / "clinic-b.tsv", sep="\t", index=False)
    rows.iloc[80:120].to_json(folder / "clinic-c.jsonl", orient="records", lines=True)
    rows.iloc[120:160].to_csv(folder / "test.csv", index=False)
    return folder


def tiny_user_args(folder: Path, model_dir: Path, tmp_path: Path, name: str) -> list[str]:
    """--data-dir and its flags for the user folder, and --set keys for a tiny, fast run."""
    sets = {
        "model.name": f'"{model_dir}"',
        "model.max-length": "48",
        "lora.dropout": "0.0",
        "train.batch-size": "8",
        "federation.rounds": "2",
        "run.name": name,
        "run.output-dir": f'"{tmp_path / "outputs"}"',
    }
    args = ["--data-dir", str(folder), "--test-file", "test.csv"]
    args += ["--text-column", "review", "--label-column", "rating"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.mark.simulation
def test_a_run_on_user_files_leaves_their_folder_byte_identical(
    user_folder, tiny_model_dir, tmp_path, monkeypatch
):
    before = snapshot(user_folder)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["simulate", *tiny_user_args(user_folder, tiny_model_dir, tmp_path, "byod-run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "labels (inferred from the data" in result.output
    assert "negative,neutral,positive" in result.output
    assert snapshot(user_folder) == before  # nothing written, nothing added
    run_dir = tmp_path / "outputs" / "byod-run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert {p.stem for p in (run_dir / "privacy").glob("*.jsonl")} >= {
        "clinic-a",
        "clinic-b",
        "clinic-c",
    }
    manifest = json.loads((work / "data" / "byod-mine" / "manifest.json").read_text())
    assert manifest["institutions"] == ["clinic-a", "clinic-b", "clinic-c"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["round"] == 2 and lines[-1].get("central_macro_f1") is not None


@pytest.mark.simulation
def test_canary_runs_on_user_files(user_folder, tiny_model_dir, tmp_path, monkeypatch):
    """``privatune canary --data-dir``: plants into a copy of the user's rows (their folder
    stays byte-identical) and audits the run."""
    before = snapshot(user_folder)
    monkeypatch.chdir(tmp_path)
    args = tiny_user_args(user_folder, tiny_model_dir, tmp_path, "canary-run")
    result = CliRunner().invoke(
        app, ["canary", "--scenario", "hospitals-small", "--canaries", "20", *args]
    )
    assert result.exit_code in (0, 1), result.output  # 1: a bound above the claim
    assert "institutions (3): clinic-a, clinic-b, clinic-c" in result.output
    assert (tmp_path / "outputs" / "canary-run" / "empirical-audit.json").is_file()
    assert snapshot(user_folder) == before


def test_a_scenario_pointed_at_a_user_folder_does_not_write_into_it(user_folder, tmp_path):
    """The reported case: --scenario banks --set data.dir=<folder> overwrote test.csv."""
    before = snapshot(user_folder)
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", "banks-small", "--set", f'data.dir="{user_folder}"']
    )
    assert result.exit_code == 2
    assert "no manifest.json" in result.output and "--data-dir" in result.output
    assert snapshot(user_folder) == before


def test_one_institution_per_file_with_inferred_labels(user_folder, tmp_path):
    before = snapshot(user_folder)
    user = UserData(
        user_folder, Path("test.csv"), text_column="review", label_column="rating", seed=1
    )
    prepared = prepare_user_data(user, tmp_path / "data")
    assert prepared.names == ["clinic-a", "clinic-b", "clinic-c"]  # test.csv is not one
    assert prepared.inferred and prepared.labels == ["negative", "neutral", "positive"]
    assert prepared.data_dir == (tmp_path / "data" / "byod-mine").resolve()
    assert prepared.test_file == (user_folder / "test.csv").resolve()
    assert sorted(p.name for p in prepared.data_dir.iterdir()) == ["manifest.json"]  # no copies
    assert snapshot(user_folder) == before

    with pytest.raises(DataError, match="never writes into a folder you name"):
        prepare_user_data(user, user_folder / "data")
    assert snapshot(user_folder) == before

    recipe = load_scenario("hospitals-small-probe").config  # lends its training recipe only
    cfg = RunConfig.from_flat(user_flat(prepared, user, recipe, {"run.name": "x"}))
    assert (cfg.model.pooling, cfg.train.trainable) == ("mean", "head")
    assert cfg.data.dir == str(prepared.data_dir)
    assert cfg.data.test_path == str(user_folder / "test.csv")
    assert (cfg.data.text_column, cfg.data.labels) == ("review", "negative,neutral,positive")
    assert cfg.federation.min_available_nodes == 3
    for pid, suffix in enumerate((".csv", ".tsv", ".jsonl")):  # the client finds every format
        site = Institution.from_context(ctx(pid), cfg, "x")
        assert site.data_path == (user_folder / f"{site.name}{suffix}").resolve()


def test_given_labels_are_checked_before_the_run(user_folder, tmp_path):
    user = UserData(
        user_folder,
        text_column="review",
        label_column="rating",
        labels=("negative", "positive"),
    )
    with pytest.raises(DataError, match=r"clinic-a\.csv.*'neutral'"):
        prepare_user_data(user, tmp_path / "data")


def test_split_by_a_column(tmp_path, reviews):
    folder = tmp_path / "lenders"
    folder.mkdir()
    rows = reviews.iloc[:90][["text", "label"]].assign(
        lender=["North Bank", "south", "East Co"] * 30
    )
    rows.to_csv(folder / "all.csv", index=False)
    before = snapshot(folder)
    user = UserData(folder, split_by="lender", labels=("negative", "neutral", "positive"))
    prepared = prepare_user_data(user, tmp_path / "data")
    assert prepared.names == ["East-Co", "North-Bank", "south"] and not prepared.inferred
    assert prepared.data_dir == (tmp_path / "data" / "byod-lenders").resolve()
    for name, lender in zip(prepared.names, ["East Co", "North Bank", "south"], strict=True):
        part = pd.read_csv(prepared.data_dir / f"{name}.csv")
        assert list(part.columns) == ["text", "label"]
        assert part["text"].tolist() == rows.loc[rows["lender"] == lender, "text"].tolist()
    assert snapshot(folder) == before
    with pytest.raises(DataError, match="'nope' not found"):
        prepare_user_data(UserData(folder, split_by="nope"), tmp_path / "data")


def test_dirichlet_split_of_one_file_is_seeded_and_covers_every_row(tmp_path, reviews):
    source = tmp_path / "pool.parquet"
    reviews.iloc[:300][["text", "label"]].to_parquet(source)
    user = UserData(source, dirichlet=0.5, institutions=4, seed=3)
    a = prepare_user_data(user, tmp_path / "a")
    b = prepare_user_data(user, tmp_path / "b")
    assert a.names == [f"pool-{i:02d}" for i in range(4)]
    parts = [pd.read_csv(a.data_dir / f"{n}.csv") for n in a.names]
    assert all(
        p.equals(pd.read_csv(b.data_dir / f"{n}.csv")) for p, n in zip(parts, b.names, strict=True)
    )
    assert sorted(pd.concat(parts)["text"]) == sorted(reviews.iloc[:300]["text"])
    assert min(len(p) for p in parts) >= 24
    with pytest.raises(DataError, match="go together"):
        prepare_user_data(UserData(source, institutions=4), tmp_path / "c")
    with pytest.raises(DataError, match="one institution"):
        prepare_user_data(UserData(source), tmp_path / "c")


def test_latin1_files(tmp_path):
    folder = tmp_path / "banks"
    folder.mkdir()
    rows = pd.DataFrame(
        {
            "Reviews": ["Très bon service, café offert", "Frais cachés, à éviter"] * 15,
            "Stars": [5, 1] * 15,
            "BankName": ["Crédit Sud"] * 14 + ["Banque Nord"] * 16,
        }
    )
    rows.to_csv(folder / "reviews.csv", index=False, encoding="latin-1")
    user = UserData(folder, text_column="Reviews", label_column="Stars", split_by="BankName")
    with pytest.raises(DataError, match=r"not UTF-8 text.*data\.encoding"):
        prepare_user_data(user, tmp_path / "data")
    latin = UserData(
        folder, text_column="Reviews", label_column="Stars", split_by="BankName", encoding="latin-1"
    )
    prepared = prepare_user_data(latin, tmp_path / "data")
    assert prepared.labels == ["1", "5"] and prepared.names == ["Banque-Nord", "Crédit-Sud"]
    out = prepared.data_dir / "Crédit-Sud.csv"  # written in the source's encoding
    data = load_labeled(out, "Reviews", "Stars", prepared.labels, encoding="latin-1")
    assert data.texts[0] == "Très bon service, café offert" and len(data) == 14
    cfg = RunConfig.from_flat(user_flat(prepared, latin, overrides={"run.name": "x"}))
    site = Institution.from_context(ctx(1), cfg, "x")
    assert (site.data_path, site.encoding) == (out, "latin-1")
