"""The ``privatune`` commands a user runs by hand, each against an independent expectation."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from privatune.cli.main import app
from privatune.common.privacy.accounting import Mechanism, epsilon, sample_rate
from privatune.common.protocol import append_line
from typer.testing import CliRunner

RUN = CliRunner()


def test_plan_meets_the_target_by_an_independent_accountant():
    args = ["plan", "--target-epsilon", "4", "--rounds", "3", "--data-size", "200"]
    out = RUN.invoke(app, [*args, "--batch-size", "20", "--local-epochs", "2"])
    assert out.exit_code == 0, out.output
    sigma = float(out.output.split("noise multiplier: ")[1].split()[0])
    q = sample_rate(200, 20)
    rounds = [float(x.split()[-1]) for x in out.output.splitlines() if x.startswith("round")]
    assert len(rounds) == 3 and rounds == sorted(rounds)
    spent = epsilon([Mechanism(sigma, q, 2 * 10)] * 3, 1e-5, "rdp")
    assert spent <= 4.0 and math.isclose(spent, rounds[-1], rel_tol=1e-3)


def test_plan_without_a_sample_rate_is_one_line():
    out = RUN.invoke(app, ["plan", "--target-epsilon", "4", "--rounds", "3"])
    assert out.exit_code != 0 and "--data-size" in out.output
    assert len(out.output.strip().splitlines()) == 1


def _line(rnd: int, acc: float | None, seconds: float, sent: int) -> dict:
    keys = ("train_loss", "eval_loss", "accuracy", "macro_f1", "central_loss")
    return {
        "round": rnd,
        **dict.fromkeys(keys),
        "central_accuracy": acc,
        "central_macro_f1": acc,
        "epsilon_max": 2.5 * rnd or None,
        "epsilon": {},
        "refused": [],
        "rejected": {},
        "failed": {},
        "bytes_sent": sent,
        "bytes_received": sent,
        "ranks": {},
        "ledger_heads": {},
        "truncation_energy_lost": None,
        "central_eval_seconds": 0.1,
        "seconds": seconds,
    }


def test_summary_reads_the_metrics_lines(tmp_path):
    for rnd, acc in ((0, 0.25), (1, 0.5), (2, 0.625)):
        line = _line(rnd, acc, 60.0, 500_000)
        line["failed"] = {"clinic-z": "too few rows to split"} if rnd else {}
        append_line(tmp_path, line)
    out = RUN.invoke(app, ["summary", str(tmp_path)])
    assert "| clinic-z failed (round 1, 2) | | too few rows to split |" in out.output
    assert out.exit_code == 0, out.output
    assert "| test accuracy | 0.250 | 0.625 |" in out.output
    assert "| max epsilon (delta from config) | 0 | 5.00 |" in out.output
    assert "3.0 min" in out.output and "3.0 MB" in out.output
    missing = RUN.invoke(app, ["summary", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "not found" in missing.output
    assert "interval" not in out.output  # no config.toml: no test file to count


def test_summary_gives_the_test_accuracy_an_interval_and_a_constant_baseline(tmp_path):
    from privatune.common.config import resolve, write_toml
    from scipy.stats import binomtest

    labels = ["B"] * 60 + ["A"] * 30 + ["C"] * 10
    pd.DataFrame({"text": [f"q{i}" for i in range(100)], "label": labels}).to_csv(
        tmp_path / "test.csv", index=False
    )
    flat = {"data.labels": "A,B,C", "data.test-path": str(tmp_path / "test.csv")}
    write_toml(resolve(flat), tmp_path / "config.toml")
    for rnd, acc in ((0, 0.25), (1, 0.62)):
        append_line(tmp_path, _line(rnd, acc, 60.0, 500_000))
    out = RUN.invoke(app, ["summary", str(tmp_path)])
    ci = binomtest(62, 100).proportion_ci(method="wilson")
    assert f"| {ci.low:.3f}-{ci.high:.3f} |" in out.output
    assert "| always answering 'B' (best constant) | | 0.600 accuracy |" in out.output


def test_data_check_summarises_a_file_and_names_a_bad_label(tmp_path):
    path = tmp_path / "site.csv"
    pd.DataFrame(
        {"text": ["good drug", "bad side effects", "fine, I guess"], "y": ["pos", "neg", "pos"]}
    ).to_csv(path, index=False)
    out = RUN.invoke(
        app, ["data", "check", str(path), "--label-column", "y", "--labels", "neg,pos"]
    )
    assert out.exit_code == 0, out.output
    assert "3 rows, valid" in out.output and "labels: neg 1, pos 2" in out.output
    bad = RUN.invoke(app, ["data", "check", str(path), "--label-column", "y", "--labels", "neg"])
    assert bad.exit_code != 0 and "'pos'" in bad.output and "y" in bad.output


@pytest.mark.simulation
def test_tune_scores_recipes_on_held_out_local_rows_never_the_test_set(tmp_path, monkeypatch):
    import json

    from privatune.simulations.scenario import load_scenario
    from privatune.simulations.tools import tune

    seen: dict[str, list[str]] = {}
    real = tune.model_input

    def recording(cfg, data, part):
        seen.setdefault(part, []).extend(data.texts)
        return real(cfg, data, part)

    monkeypatch.setattr(tune, "model_input", recording)
    out = tmp_path / "tune.json"
    texts = "a bad drug;it was so-so;a good drug"  # a quoted value keeps its spaces
    recipe = f"federation.rounds=2 model.label-init=4.0 'model.label-texts={texts}'"
    args = ["tune", "--scenario", "hospitals-small-probe", "--repeats", "1", "--no-dp-too"]
    res = RUN.invoke(app, [*args, "--try", recipe, "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["dp"] for r in rows] == [True, False]
    assert rows[0]["try"] == {
        "federation.rounds": 2,
        "model.label-init": 4.0,
        "model.label-texts": texts,
    }
    assert all(0 <= r["macro_f1"][0] <= 1 for r in rows) and "no DP" in res.output
    # validation = the institutions' own rows that their training splits leave out (the test
    # file is never read: the drug-review package repeats one test review in its training set)
    data_dir = load_scenario("hospitals-small-probe").data_dir
    files = pd.concat(pd.read_csv(p) for p in data_dir.glob("hospital-*.csv"))["text"]
    held, trained = seen["tune"], seen["train"]
    assert held and not set(held) & set(trained)
    assert sorted(held + trained) == sorted(list(files) * 2)  # each row once a federation


@pytest.mark.simulation  # (refused before any round, but `tune` runs federations)
def test_tune_refuses_a_recipe_it_cannot_run_in_one_line():
    # tune averages like FedAvg: a recipe that names another server strategy is refused
    argv = ["tune", "--scenario", "hospitals-small", "--repeats", "1"]
    res = RUN.invoke(app, [*argv, "--try", "aggregation.strategy=fedprox"])
    assert res.exit_code == 2 and "only classifiers with strategy fedavg" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_version_and_the_deployment_guides_secret_folders_are_ignored():
    import shutil
    import subprocess
    from importlib.metadata import version

    from helpers import PROJECT_ROOT

    out = RUN.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"privatune {version('privatune')}"
    if shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists():
        return  # an unpacked source tree: nothing to commit by mistake
    secrets = ["certs/ca.key", "keys/hospital-a", "state/state.db", "docker/certs/ca.key"]
    ignored = subprocess.run(
        ["git", "check-ignore", *secrets], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert ignored.stdout.split() == secrets
