"""The MLflow sink (server.tracking): params, every round's metrics, each institution's
epsilon and the artifacts land in a real local store, read back with MLflow's own client;
off by default, and then MLflow is never imported. The sink under a real federation is
checked by tests/test_dashboard.py's live run, which tracks to a store too."""

from __future__ import annotations

import subprocess
import sys
from importlib.util import find_spec

import pytest
import ray
from helpers import PROJECT_ROOT
from privatune.cli import main as cli
from privatune.common.config import resolve, write_toml
from privatune.common.protocol import read_lines
from privatune.server.report import write_report
from privatune.server.tracking import ROUND_KEYS, MlflowSink, mlflow_sink
from privatune.simulations import simulate as sim
from privatune.simulations.bench.dashboard import INSTITUTIONS, fabricate
from typer.testing import CliRunner

needs_mlflow = pytest.mark.skipif(
    find_spec("mlflow") is None, reason="the tracking extra (mlflow-skinny) is not installed"
)


def read_back(uri: str, run_name: str) -> tuple[object, object]:
    """The MLflow client and the one run of that name in the privatune experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("privatune")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
    )
    return client, run


@needs_mlflow
def test_every_round_metric_epsilon_param_and_artifact_reads_back(tmp_path):
    run_dir = fabricate(tmp_path / "outputs", "tracked", rounds=4, seed=3)
    cfg = resolve({"run.name": "tracked", "tracking.mlflow-uri": "x"})
    write_toml(cfg, run_dir / "config.toml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = MlflowSink(uri, cfg, "tracked")
    lines = read_lines(run_dir)
    for line in lines:
        sink(line)
    write_report(run_dir)
    sink.finish(run_dir, ok=True)

    client, run = read_back(uri, "tracked")
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in cfg.to_flat().items()}
    for key in ROUND_KEYS:
        expected = {x["round"]: x[key] for x in lines if x.get(key) is not None}
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(expected), key
    for who in INSTITUTIONS:
        history = client.get_metric_history(run.info.run_id, f"epsilon.{who}")
        expected = {x["round"]: x["epsilon"][who] for x in lines if who in x["epsilon"]}
        assert {m.step: m.value for m in history} == pytest.approx(expected)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"report.html", "metrics.jsonl", "audit.json"}
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not in the working folder


def test_off_by_default_and_then_mlflow_is_never_imported():
    assert resolve().tracking.mlflow_uri == ""
    assert mlflow_sink(resolve(), "run") is None
    script = (
        "import sys; from privatune.common.config import resolve; "
        "from privatune.server.tracking import mlflow_sink; "
        "assert mlflow_sink(resolve(), 'r') is None; print('mlflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_missing_mlflow_fails_the_simulation_in_one_line_before_ray(tmp_path, monkeypatch):
    """``tracking.mlflow-uri`` set, MLflow not importable: ``privatune simulate`` stops in its
    preflight with the install command, before any data is prepared or Ray starts (the
    ServerApp used to find out inside Ray)."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow: ImportError
    started: list[object] = []
    monkeypatch.setattr(sim, "start_ray", started.append)
    monkeypatch.chdir(tmp_path)  # the scenario's data folder would be prepared here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = CliRunner().invoke(
        cli.app,
        ["simulate", "--set", f"tracking.mlflow-uri={uri}", "--set", "run.output-dir=outputs"],
    )
    assert out.exit_code == 2 and out.output.strip().count("\n") == 0, out.output
    assert "tracking.mlflow-uri is set but MLflow is not installed" in out.output
    assert 'pip install -e ".[tracking]"' in out.output
    assert started == [] and not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []  # nothing prepared, no run folder
