"""An optional MLflow sink (config ``tracking.mlflow-uri``), so that ``mlflow ui`` compares
runs: the resolved config as params, every round's central metrics and each institution's
cumulative epsilon (step = the run's round), and at the end ``report.html``, the audit
(JSON) and the metrics file as artifacts. MLflow is imported only when the key is set (the
``tracking`` extra); a run never needs it otherwise.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from privatune.common.config import ConfigError, RunConfig
from privatune.common.protocol import METRICS_FILE, MetricsLine

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("flwr")
EXPERIMENT = "privatune"
# metrics.jsonl keys logged every round (those that are numbers in that round).
ROUND_KEYS = (
    "central_accuracy",
    "central_macro_f1",
    "central_loss",
    "accuracy",
    "macro_f1",
    "eval_loss",
    "train_loss",
    "epsilon_max",
    "bytes_sent",
    "bytes_received",
    "seconds",
)


class MlflowSink:
    """One MLflow run per privatune run start; called by the round recorder per line."""

    def __init__(self, uri: str, cfg: RunConfig, run_name: str) -> None:
        require_mlflow()
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client: MlflowClient = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(EXPERIMENT)
        experiment = (
            found.experiment_id
            if found
            else self.client.create_experiment(EXPERIMENT, artifact_location=artifacts_beside(uri))
        )
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(cfg.to_flat().items())]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def __call__(self, line: MetricsLine) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(line["round"])
        values = {k: line.get(k) for k in ROUND_KEYS}
        values |= {f"epsilon.{who}": eps for who, eps in (line.get("epsilon") or {}).items()}
        metrics = [
            Metric(key, float(v), now, step)
            for key, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # tracking is a copy: metrics.jsonl keeps the record, go on
            log.warning("[privatune] MLflow: round %d not logged (%s)", step, e)

    def finish(self, run_dir: Path, ok: bool) -> None:
        """The report, the audit and the metrics file as artifacts; the run closed."""
        from privatune.common.privacy.audit import audit, to_json

        run_dir = Path(run_dir)
        for name in ("report.html", METRICS_FILE):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "audit.json"
            path.write_text(json.dumps(to_json(audit(run_dir)), indent=1))
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def require_mlflow() -> None:
    """MLflow importable, else one line with the install command: checked by the sink and,
    before Ray starts, by a simulation's preflight (the ServerApp would learn it in Ray)."""
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "tracking.mlflow-uri is set but MLflow is not installed: "
            'pip install -e ".[tracking]" (or set tracking.mlflow-uri = "")'
        ) from e


def artifacts_beside(uri: str) -> str | None:
    """For a SQLite store, artifacts in ``mlartifacts/`` beside its file (MLflow's default is
    ``./mlruns`` under whatever folder the server started in); other stores keep theirs."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri.removeprefix(prefix)).resolve().parent / "mlartifacts").as_uri()


def mlflow_sink(cfg: RunConfig, run_name: str) -> MlflowSink | None:
    """The sink when ``tracking.mlflow-uri`` is set, else None (MLflow is not imported)."""
    return MlflowSink(cfg.tracking.mlflow_uri, cfg, run_name) if cfg.tracking.mlflow_uri else None
