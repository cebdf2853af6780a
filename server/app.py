"""The ServerApp: builds the initial adapter, runs AdapterRounds for the configured rounds
and leaves a complete run folder::

    outputs/<run-name>/
        adapter/              final global adapter (PEFT format)
        checkpoints/round-NNN/
        metrics.jsonl         one line per round (round 0 = before training)
        config.toml           the resolved configuration
        status.json           running, finished, failed or stopped (for the dashboard)
        confusion.json        the final central confusion matrix (per-class scores)
        privacy/              institutions' ledgers (simulation only)
        report.html           plots and tables

The server never sends or stores the frozen base model's weights; it keeps its own copy of
the base model only to evaluate the adapter centrally and to write checkpoints.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from privatune.common.config import RunConfig, Scalar, write_toml
from privatune.common.data import load_labeled
from privatune.common.logs import quiet
from privatune.common.model.adapter import (
    from_record,
    get_trainable,
    save_adapter,
    set_trainable,
    to_record,
)
from privatune.common.model.build import build_model, encode
from privatune.common.model.features import cached_embed
from privatune.common.model.hub import pick_device
from privatune.common.model.top_layers import cached_lower_states, split_point, uses_top_layers
from privatune.common.privacy.audit import audit, notes, to_html
from privatune.common.protocol import RUN_NAME
from privatune.server.central_dp import CentralDP
from privatune.server.recorder import WRITES, RoundRecorder
from privatune.server.report import write_model_card, write_report
from privatune.server.resume import ResumeError, last_checkpoint, load_checkpoint, truncate_metrics
from privatune.server.round_log import RoundLog
from privatune.server.secure_aggregation import run_secure
from privatune.server.strategy import make_strategy
from privatune.server.tracking import MlflowSink, mlflow_sink
from privatune.server.views import mark_status, write_confusion

log = logging.getLogger("flwr")


def check_run_dir(cfg: RunConfig) -> tuple[str, Path]:
    """The run's name and folder: new, or (``run.resume``) the existing one of
    ``run.name``; one line when the folder does not fit, so that a finished run is never
    overwritten. Also called before a simulation starts (simulations.simulate.preflight)."""
    name = cfg.run.name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / name
    if cfg.run.resume and not (run_dir / "config.toml").exists():
        raise ResumeError(f"{run_dir}: no run to resume")
    if not cfg.run.resume and (run_dir / "metrics.jsonl").exists():
        raise ResumeError(
            f"{run_dir} already holds a run; choose another run.name (or set run.resume=true)"
        )
    return name, run_dir


def run_dir_for(cfg: RunConfig) -> tuple[str, Path]:
    """:func:`check_run_dir`, then the folder made."""
    name, run_dir = check_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return name, run_dir


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run the whole federation and return the run folder, whose ``status.json`` says
    running, then finished or failed (a stopped simulation marks itself stopped)."""
    run_name, run_dir = run_dir_for(cfg)
    mark_status(run_dir, "running")
    sink = mlflow_sink(cfg, run_name)
    try:
        _federate(grid, cfg, run_name, run_dir, sink)
    except Exception:
        with WRITES:  # held for good by a stopping simulation, which marks "stopped"
            mark_status(run_dir, "failed")
            if sink:
                sink.finish(run_dir, ok=False)
        raise
    if sink:
        with WRITES:
            sink.finish(run_dir, ok=True)
    return run_dir


def _federate(
    grid: Grid, cfg: RunConfig, run_name: str, run_dir: Path, sink: MlflowSink | None
) -> None:
    write_toml(cfg, run_dir / "config.toml")
    device = pick_device()
    model = build_model(cfg, device)
    initial = get_trainable(model)
    test_set = probe_test_set = top_test_set = None  # before a checkpoint changes the model
    if cfg.data.test_path:
        test = load_labeled(
            cfg.data.test_path,
            cfg.data.text_column,
            cfg.data.label_column,
            cfg.data.label_names,
            cfg.data.encoding,
        )
        if cfg.train.trainable == "head":  # the frozen encoder's output: computed once
            test_set = cached_embed(model, test, cfg)
        else:
            test_set = encode(test, cfg)
            if cfg.train.probe_rounds:  # the probe stage's rounds: the encoder is unchanged
                probe_test_set = cached_embed(model, test, cfg)
            if uses_top_layers(cfg):  # the layers below the adapter never change
                top_test_set = cached_lower_states(model, test, cfg)
    done = 0
    if cfg.run.resume and (checkpoint := last_checkpoint(run_dir)):
        done, path = checkpoint
        initial = load_checkpoint(model, path)
        truncate_metrics(run_dir, done)
        log.info("[privatune] resuming %s after round %d from %s", run_name, done, path)
    fed = cfg.federation
    round_log = RoundLog(offset=done)
    adapter = make_strategy(fed, cfg.aggregation, initial, round_log)
    strategy: Strategy = adapter
    if cfg.central_dp.enabled:
        strategy = CentralDP(
            adapter,
            cfg.central_dp.noise_multiplier,
            cfg.central_dp.clipping_norm,
            ledger_path=run_dir / "privacy" / "aggregator.jsonl",
            run_id=run_name,
            delta=cfg.dp.delta,
        )
    recorder = RoundRecorder(
        run_dir, model, round_log, len(cfg.data.label_names), device, test_set, fed.rounds
    )
    recorder.embedded_test_set = probe_test_set
    if top_test_set is not None:
        recorder.top_test_set, recorder.top_start = top_test_set, split_point(model, cfg)
    if sink:
        recorder.sinks.append(sink)
    rounds = f"{fed.rounds} round{'s' if fed.rounds != 1 else ''}"
    log.info("[privatune] run %s: %s, output in %s", run_name, rounds, run_dir)
    if cfg.aggregation.secure:
        final = run_secure(grid, cfg, run_name, adapter, recorder, initial)
    else:
        result = strategy.start(
            grid=grid,
            initial_arrays=to_record(initial),
            num_rounds=fed.rounds - done,
            timeout=fed.round_timeout,
            train_config=ConfigRecord({RUN_NAME: run_name}),
            evaluate_config=ConfigRecord({RUN_NAME: run_name}),
            evaluate_fn=recorder,
        )
        final = from_record(result.arrays) if len(result.arrays) else initial
    set_trainable(model, final)
    with WRITES:  # a stopping simulation waits for these (simulations.simulate)
        save_adapter(model, run_dir / "adapter")
        write_model_card(run_dir, cfg)
        results = audit(run_dir)
        sections = [to_html(results, notes(run_dir, results))]
        if recorder.confusion is not None:
            write_confusion(run_dir, recorder.confusion, cfg.data.label_names)
        mark_status(run_dir, "finished")  # before the report, which shows the status
        report = write_report(run_dir, sections)
    log.info("[privatune] done: adapter in %s, report in %s", run_dir / "adapter", report)


def create_app(overrides: Mapping[str, Scalar] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` carry the resolved config into in-process simulations."""
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet()
        run_federation(grid, RunConfig.from_flat({**context.run_config, **overrides}))

    return app


app = create_app()
