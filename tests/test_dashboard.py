"""The dashboard (server.dashboard over server.views): its security (read-only, nothing
outside the folder, a token off loopback), the views report.html shares with it, and, in
Debian's chromium driven by Playwright, a real federation watched live: the round counter
advances without a reload, a gauge per institution, the audit verdict, the node view."""

from __future__ import annotations

import html
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from helpers import PROJECT_ROOT, start_run
from privatune.cli import main as cli
from privatune.common.privacy.empirical import RESULT as EMPIRICAL_RESULT
from privatune.common.privacy.empirical import audit_scores, verdict
from privatune.server.dashboard import DashboardServer, make_server, url_of
from privatune.server.report import write_report
from privatune.server.svg import gauge
from privatune.server.views import mark_status, run_body, run_status
from privatune.simulations.bench.dashboard import fabricate
from typer.testing import CliRunner

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture()
def runs(tmp_path) -> Path:
    root = tmp_path / "outputs"
    fabricate(root, "alpha", rounds=3, planned=5, seed=1)
    mark_status(fabricate(root, "beta", rounds=5, seed=2), "finished")
    (tmp_path / "secret.txt").write_text("not for the dashboard")
    return root


def _serve(root: Path, **kwargs) -> Iterator[DashboardServer]:
    server = make_server(root, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def served(runs) -> Iterator[DashboardServer]:
    yield from _serve(runs)


def request(
    server: DashboardServer, path: str, method: str = "GET", headers: dict | None = None
) -> tuple[int, bytes, http.client.HTTPResponse]:
    """The raw request, path unnormalised (a browser or urllib would collapse ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, response


def test_pages_list_runs_and_show_one(served):
    status, body, response = request(served, "/")
    page = body.decode()
    assert status == 200 and "default-src 'none'" in response.getheader("Content-Security-Policy")
    assert "<th scope='col'>status</th>" in page and "/run/alpha" in page
    assert "3 of 5" in page and "5 of 5" in page
    status, body, _ = request(served, "/api/run/alpha")
    data = json.loads(body)
    assert status == 200 and "id='rounds-done'>3<" in data["html"]
    assert data["html"].count("class='gauge'") == 3  # one per institution
    assert "<title>Utility per round</title>" in data["html"] and "<desc>" in data["html"]
    status, body, _ = request(served, "/compare")
    assert status == 200 and "Privacy against utility" in body.decode()


@pytest.mark.parametrize(
    "path",
    [
        "/files/../secret.txt",
        "/files/%2e%2e/secret.txt",
        "/files/alpha/../../secret.txt",
        "/files/%2E%2E%2Fsecret.txt",
        "/files//etc/passwd",
        "/run/..",
        "/run/%2e%2e%2foutputs%2falpha",
        "/api/run/../../secret.txt",
    ],
)
def test_a_path_outside_the_folder_is_refused(served, path):
    status, body, _ = request(served, path)
    assert status in (403, 404), (path, status)
    assert b"not for the dashboard" not in body and b"root:" not in body


def test_a_file_inside_the_folder_is_served(served):
    status, body, _ = request(served, "/files/alpha/config.toml")
    assert status == 200 and b"[config]" in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head_are_answered(served, runs, method):
    before = sorted(p.name for p in runs.rglob("*"))
    status, _, response = request(served, "/files/alpha/config.toml", method)
    assert status == 405 and response.getheader("Allow") == "GET, HEAD"
    assert sorted(p.name for p in runs.rglob("*")) == before
    status, body, _ = request(served, "/", "HEAD")
    assert status == 200 and body == b""


def test_off_loopback_nothing_is_served_without_the_token(runs):
    for server in _serve(runs, host="0.0.0.0"):
        token = server.dashboard.token
        assert token and f"?token={token}" in url_of(server)
        for path in ("/", "/api/", "/run/alpha", "/files/alpha/config.toml", "/nothing"):
            status, body, _ = request(server, path)
            assert (status, body) == (403, b""), path
            status, body, _ = request(server, path + "?token=wrong")
            assert (status, body) == (403, b""), path
        assert request(server, "/", "POST")[:2] == (403, b"")
        status, _, response = request(server, f"/?token={token}")
        cookie = response.getheader("Set-Cookie")
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        status, body, _ = request(server, "/api/", headers={"Cookie": cookie.split(";")[0]})
        assert status == 200 and "alpha" in json.loads(body)["html"]
    for server in _serve(runs):  # loopback: no token, but a loopback name in Host
        assert server.dashboard.token is None and request(server, "/")[0] == 200
        port = server.server_address[1]
        assert request(server, "/", headers={"Host": f"localhost:{port}"})[0] == 200
        rebound = request(server, "/", headers={"Host": f"evil.example:{port}"})
        assert rebound[:2] == (403, b"")


def test_the_command_prints_its_url_and_serves_it(runs, tmp_path):
    command = str(Path(sys.executable).parent / "privatune")  # the installed entry point
    argv = [command, "dashboard", str(runs), "--port", "0"]
    proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(f"privatune dashboard: runs in {runs}")
        url = proc.stdout.readline().split("open ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert "/run/alpha" in response.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    missing = CliRunner().invoke(cli.app, ["dashboard", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "no such folder of runs" in missing.output


def test_status_running_finished_and_a_crashed_run(runs):
    assert run_status(runs / "alpha") == "running"  # this process
    assert run_status(runs / "beta") == "finished"
    proc = subprocess.Popen(["true"])
    proc.wait()
    status = json.loads((runs / "alpha" / "status.json").read_text())
    (runs / "alpha" / "status.json").write_text(json.dumps({**status, "pid": proc.pid}))
    assert run_status(runs / "alpha") == "failed"  # marked running, its process gone


def test_the_report_is_the_dashboards_run_view(runs):
    report = write_report(runs / "beta", ["<h2>Extra</h2>"]).read_text()
    assert run_body(runs / "beta") in report and report.endswith(
        "<h2>Extra</h2></main></body></html>"
    )
    assert "<script" not in report and "<img" not in report  # static, self-contained SVG
    assert report.count("<svg") >= 3 and report.count("<title>") > report.count("<svg")


def test_the_run_view_summarises_the_data_per_institution(runs, tmp_path, monkeypatch):
    """Rows and labels per institution from the manifest of the simulation's data folder
    (a relative data.dir found beside the folder of runs when the dashboard runs elsewhere);
    label columns in data.labels' order, a label an institution lacks counted 0."""
    data = tmp_path / "data" / "hospitals-small"  # the fabricated runs' data.dir
    data.mkdir(parents=True)
    rows = {
        "hospital-a": {"total": 40, "negative": 30, "positive": 10, "conditions": {"acne": 3}},
        "hospital-b": {"total": 25, "neutral": 5, "positive": 20},
        "test": {"total": 12, "negative": 4, "neutral": 4, "positive": 4},
    }
    manifest = {"institutions": ["hospital-a", "hospital-b"], "test": "test.csv", "rows": rows}
    (data / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path / "outputs")  # data/hospitals-small is not under here
    body = run_body(runs / "beta")
    head = "<tr><th>institution</th><th>rows</th><th>negative</th><th>neutral</th><th>positive"
    assert "<h2>Data</h2>" + "<table>" + head + "</th></tr>" in body
    for row in (
        ["hospital-a", 40, 30, 0, 10],
        ["hospital-b", 25, 0, 5, 20],
        ["test set (the server's)", 12, 4, 4, 4],
    ):
        assert "<tr>" + "".join(f"<td>{v}</td>" for v in row).replace("'", "&#x27;") in body
    assert "acne" not in body and "conditions" not in body  # a group count is no label
    assert "In a deployment these counts stay at the institutions" in body
    assert body in write_report(runs / "beta").read_text()  # report.html: the same section
    (data / "manifest.json").unlink()
    body = run_body(runs / "beta")
    assert "No data summary: data/hospitals-small/manifest.json was not found." in body
    assert "In a deployment these counts stay at the institutions" in body


def test_a_canary_audit_shows_its_bound_beside_the_claim(runs):
    """``privatune canary``'s result in the run folder: the measured lower bound on epsilon
    and the claimed one, in the privacy section right after delta and the accountant, and
    ABOVE when the measurement refutes the claim."""
    run_dir = runs / "beta"
    assert "id='canary'" not in run_body(run_dir)  # no canary audit, no line
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    black_box = audit_scores(rng.normal(size=200) + 4 * included, included, delta=1e-5)
    assert black_box.epsilon_lower > 0.5
    result = {"canaries": 200, "confidence": 0.95, "black_box": asdict(black_box)}
    for claimed, said in (
        (black_box.epsilon_lower + 5, f"claimed {black_box.epsilon_lower + 5:.2f}: consistent"),
        (black_box.epsilon_lower / 2, f"ABOVE the claimed {black_box.epsilon_lower / 2:.2f}"),
        (None, "no DP claimed"),
    ):
        result["claimed_epsilon"] = claimed
        (run_dir / EMPIRICAL_RESULT).write_text(json.dumps(result))
        privacy = run_body(run_dir).split("<h2>Privacy</h2>", 1)[1]
        line = f"<p id='canary'>{html.escape(verdict(result))}</p>"
        assert privacy.startswith("<p>DP-SGD at each institution") and said in line
        assert privacy.split("</p>", 1)[1].startswith(line)  # beside the DP claim
        assert f"measured epsilon &gt;= {black_box.epsilon_lower:.2f}" in line


def test_a_gauge_without_a_known_budget_draws_no_bar():
    """A deployment run's folder holds no ledger: an empty bar would read as nothing spent."""
    budgeted = gauge("hospital-a", 1.2, 8.0)
    assert "<svg" in budgeted and "hospital-a: epsilon 1.20 of 8.00 (15.0%)" in budgeted
    unknown = gauge("hospital-a", 1.2, None)
    assert "<svg" not in unknown and "hospital-a: epsilon 1.20 (no budget known)" in unknown


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _round_shown(page, above: int, within: float) -> int:
    """The page's round counter once it shows more than ``above`` (read by Playwright; the
    page's CSP forbids the string evaluation ``wait_for_function`` uses)."""
    deadline = time.monotonic() + within
    while (shown := int(page.locator("#rounds-done").inner_text())) <= above:
        assert time.monotonic() < deadline, f"round counter stayed at {shown}"
        page.wait_for_timeout(200)
    return shown


def _tracked_every_round(store: str, rounds: int) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("privatune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["federation.rounds"] == str(rounds)
    f1 = client.get_metric_history(run.info.run_id, "central_macro_f1")
    assert sorted(m.step for m in f1) == list(range(rounds + 1))
    for who in ("hospital-a", "hospital-b", "hospital-c"):
        eps = client.get_metric_history(run.info.run_id, f"epsilon.{who}")
        assert sorted(m.step for m in eps) == list(range(1, rounds + 1))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.html", "audit.json"}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.simulation
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's)")
def test_a_live_federation_in_a_real_browser(tiny_flat, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the MLflow sink under a real run, too
    flat = {**tiny_flat, "federation.rounds": 4, "tracking.mlflow-uri": store}
    outputs = Path(flat["run.output-dir"])
    outputs.mkdir(parents=True)
    run_dir = outputs / flat["run.name"]
    proc = start_run(
        flat,
        tmp_path / "run.json",
        start_new_session=True,  # its own process group: stopped with Ray's workers
    )
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            for server in _serve(outputs):
                base = url_of(server)
                page.goto(base)
                # the run appears on the runs page by polling, no reload
                expect(page.locator("#runs a", has_text="test-run")).to_be_visible(timeout=120_000)
                page.goto(base.rstrip("/") + "/run/test-run")
                page.evaluate("window.notReloaded = true")
                seen = _round_shown(page, above=0, within=120)
                _screenshot(page, tmp_path, "run-live")
                assert seen < 4, "the run finished before the page saw it under way"
                _round_shown(page, above=seen, within=60)
                assert page.evaluate("window.notReloaded") is True  # updated in place
                expect(page.locator(".gauge")).to_have_count(3)
                expect(page.locator("#status")).to_have_text("finished", timeout=120_000)
                expect(
                    page.get_by_text("All ledgers verify and are within budget.")
                ).to_be_visible()
                assert page.evaluate("window.notReloaded") is True
                _screenshot(page, tmp_path, "run-finished")
                page.screenshot(path=str(shot := tmp_path / "dashboard.png"))  # the first screen
                page.goto(base)
                expect(page.locator("#runs td", has_text="OK")).to_be_visible()
                _screenshot(page, tmp_path, "runs")
            ledger = run_dir / "privacy" / "hospital-a.jsonl"
            for server in _serve(outputs, ledger=ledger):
                page.goto(url_of(server))
                expect(page.locator("#verdict")).to_have_text("OK")
                expect(page.locator(".gauge")).to_have_count(1)
                expect(page.locator("nav")).to_have_count(0)  # nothing from the server
                assert request(server, "/run/test-run")[0] == 404
                _screenshot(page, tmp_path, "node-view")
            browser.close()
        assert run_status(run_dir) == "finished"
        _tracked_every_round(store, rounds=4)
        if os.environ.get("PRIVATUNE_UPDATE_DOCS_IMG"):
            shutil.copy(shot, PROJECT_ROOT / "docs" / "img" / "dashboard.png")
    finally:
        _stop(proc)


def test_an_infinite_epsilon_or_budget_draws_a_finite_chart(tmp_path):
    """No DP (epsilon inf) and the aggregator's ledger (budget inf) must not break the
    report: the chart keeps the finite points and the table says inf."""
    from privatune.server.svg import Series, line_chart

    svg = line_chart("eps", [Series("a", [(1, 1.0), (2, 2.0)])], "round", "eps", [], (0.0, 2.2))
    assert "<svg" in svg
    assert line_chart("eps", [], "round", "eps", [], (0.0, float("inf"))).startswith("<")
