"""The views of a run folder, as HTML built here once: ``report.html`` (the static, emailable
export, written at the end of a run) and the dashboard (``server.dashboard``, the same views
live over a folder of runs) both render them, so the two cannot drift apart.

Everything here only reads a run folder (``metrics.jsonl``, ``config.toml``, ``privacy/``,
``status.json``, ``confusion.json``) and a simulation's data manifest; what is costly (the
audit, the test file) is cached by the files' size and modification time, so a page polled
every two seconds recomputes only what changed.
"""

from __future__ import annotations

import html
import json
import math
import os
import socket
import threading
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from privatune.common.htmltable import html_table
from privatune.common.model.evaluation import per_class
from privatune.common.privacy.accounting import NEIGHBOURING
from privatune.common.privacy.audit import audit, audit_ledger, notes, to_html
from privatune.common.privacy.empirical import RESULT as EMPIRICAL_RESULT
from privatune.common.privacy.empirical import verdict as empirical_verdict
from privatune.common.privacy.ledger import LedgerError, read_records
from privatune.common.protocol import METRICS_FILE, read_lines
from privatune.server.round_log import dropped
from privatune.server.svg import Line, Series, gauge, line_chart

STATUS_FILE = "status.json"
CONFUSION_FILE = "confusion.json"
STATUSES = ("running", "finished", "failed", "stopped")
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:75em}"
    "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #bbb;"
    "padding:3px 6px;text-align:right}th{vertical-align:bottom}"
    "tr>:first-child{text-align:left}"
    "nav a{margin-right:1.2em}.gauge{margin:.3em 0}.gauge figcaption{font-size:.9em}"
    ".status-failed,.status-stopped{font-weight:bold}.note{color:#333;font-size:.9em}"
)
T = TypeVar("T")


# --- run status --------------------------------------------------------------------------


def mark_status(run_dir: Path, status: str) -> None:
    """Record where a run stands (``running`` with this process's id, then ``finished``,
    ``failed`` or ``stopped``), for the dashboard; written atomically, never read by a run."""
    assert status in STATUSES, status
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"status": status, "pid": os.getpid(), "host": socket.gethostname()}))
    tmp.replace(path)


def run_status(run_dir: Path) -> str:
    """The recorded status; a run marked ``running`` whose process on this host is gone
    crashed (``failed``). A folder from before status files: finished when its final adapter
    is there, else stopped."""
    run_dir = Path(run_dir)
    try:
        recorded = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        done = (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        return "finished" if done else "stopped"
    status = recorded.get("status", "stopped")
    if status == "running" and recorded.get("host") == socket.gethostname():
        try:
            os.kill(int(recorded["pid"]), 0)
        except ProcessLookupError:
            return "failed"
        except PermissionError:
            pass  # alive, another user's
    return status


# --- cached reads ------------------------------------------------------------------------

_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def _stamp(paths: Iterable[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), None))
    return tuple(out)


def cached(name: str, paths: Iterable[Path], build: Callable[[], T]) -> T:
    """``build()``, recomputed only when one of ``paths`` changed (size or mtime)."""
    key = (name, _stamp(paths))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    value = build()
    with _cache_lock:
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = value
    return value


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved flat configuration (``config.toml``), empty before it is written."""
    path = Path(run_dir) / "config.toml"

    def load() -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)["config"]
        except (OSError, tomllib.TOMLDecodeError, KeyError):
            return {}

    return cached("config", [path], load)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return cached("metrics", [path], lambda: read_lines(Path(run_dir)))


def _ledgers(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "privacy").glob("*.jsonl"))


def run_audit(run_dir: Path) -> tuple[list, list[str]]:
    """The audit of a run folder and its notes (``common.privacy.audit``), cached by its files."""
    run_dir = Path(run_dir)

    def build() -> tuple[list, list[str]]:
        results = audit(run_dir)
        return results, notes(run_dir, results)

    return cached("audit", [run_dir / METRICS_FILE, *_ledgers(run_dir)], build)


def audit_verdict(results: list) -> str:
    """One word for the runs table."""
    if not results:
        return "no ledger here"
    return "OK" if all(r.ok for r in results) else "FAIL"


def test_baselines(cfg: dict[str, Any]) -> dict[str, float] | None:
    """The test file's size and what answering without a model scores on it (blind guess,
    best constant answer), for the utility chart; None when the file is not readable."""
    from privatune.common.data import load_labeled
    from privatune.common.errors import PrivatuneError
    from privatune.common.model.evaluation import best_constant

    path = Path(str(cfg.get("data.test-path", "")))
    if not cfg.get("data.test-path") or not path.is_file():
        return None
    labels = [x.strip() for x in str(cfg.get("data.labels", "")).split(",") if x.strip()]

    def build() -> dict[str, float] | None:
        try:
            test = load_labeled(
                str(path),
                str(cfg["data.text-column"]),
                str(cfg["data.label-column"]),
                labels,
                str(cfg.get("data.encoding", "utf-8")),
            )
        except (PrivatuneError, OSError, KeyError, ValueError):
            return None
        _, accuracy = best_constant(test.labels, len(labels))
        return {
            "n": len(test.labels),
            "blind": 1 / len(labels),
            "constant": accuracy,
            "constant_f1": 2 * accuracy / (1 + accuracy) / len(labels),
        }

    return cached("test", [path], build)


# --- one run -----------------------------------------------------------------------------


def summary(run_dir: Path) -> dict[str, Any]:
    """One row of the runs table (also the JSON the dashboard polls)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    lines = metrics(run_dir)
    last = lines[-1] if lines else {}
    eps = [x for r in lines for x in (r.get("epsilon") or {}).values() if x is not None]
    results, _ = run_audit(run_dir)
    return {
        "name": run_dir.name,
        "scenario": Path(str(cfg.get("data.dir", "?"))).name,
        "status": run_status(run_dir),
        "rounds_done": last.get("round", 0),
        "rounds_planned": cfg.get("federation.rounds"),
        "macro_f1": last.get("central_macro_f1", last.get("macro_f1")),
        "epsilon_max": max(eps) if eps else None,
        "dp": cfg.get("dp.enabled"),
        "audit": audit_verdict(results),
    }


def _series(lines: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["round"], r[key]) for r in lines if r.get(key) is not None]


def _matching_no_dp(run_dir: Path, cfg: dict[str, Any]) -> Path | None:
    """A sibling run of the same scenario and model trained without DP: the utility DP costs."""
    if not cfg.get("dp.enabled", True):
        return None
    for other in sorted(Path(run_dir).parent.iterdir()):
        if other == run_dir or not (other / METRICS_FILE).is_file():
            continue
        o = run_config(other)
        if (
            o
            and not o.get("dp.enabled", True)
            and all(o.get(k) == cfg.get(k) for k in ("data.dir", "model.name", "federation.rounds"))
        ):
            return other
    return None


def utility_chart(run_dir: Path, lines: list[dict], cfg: dict[str, Any]) -> str:
    base = test_baselines(cfg)
    series = []
    central = (("central_accuracy", "test accuracy"), ("central_macro_f1", "test macro-F1"))
    for key, label in central:
        if pts := _series(lines, key):
            band = []
            if key == "central_accuracy" and base:
                from privatune.common.model.evaluation import wilson

                n = int(base["n"])
                band = [(x, *wilson(round(y * n), n)) for x, y in pts]
            series.append(Series(label + (", 95% band" if band else ""), pts, band))
    for key, label in (("accuracy", "local eval accuracy"), ("macro_f1", "local eval macro-F1")):
        if pts := _series(lines, key):
            series.append(Series(label, pts))
    if (other := _matching_no_dp(run_dir, cfg)) and (
        pts := _series(metrics(other), "central_macro_f1")
    ):
        series.append(Series(f"macro-F1 without DP ({other.name})", pts))
    refs = []
    if base:
        refs = [
            Line("blind guess accuracy", base["blind"]),
            Line("best constant accuracy", base["constant"]),
            Line("best constant macro-F1", base["constant_f1"]),
        ]
    return line_chart(
        "Utility per round",
        series,
        "round (0 = before training)",
        "score",
        refs,
        (0.0, 1.0),
        x_max=_planned(cfg),
    )


def _budgets(run_dir: Path) -> dict[str, float]:
    """Each institution's lifetime budget, from its ledger (a deployment run's folder holds
    none: the budgets are the institutions' own)."""
    out = {}
    for path in _ledgers(run_dir):
        try:
            records = cached("records", [path], lambda p=path: read_records(p))
        except LedgerError:
            continue
        if records:
            out[records[-1].institution] = records[-1].max_epsilon
    return out


def _institutions(lines: list[dict]) -> list[str]:
    return sorted({n for r in lines for n in (r.get("epsilon") or {})})


def privacy_section(run_dir: Path, lines: list[dict], cfg: dict[str, Any]) -> str:
    """Epsilon per institution against its budget: a gauge each, the remaining budget and
    the round at which it runs out at the last round's pace, a chart with the budget line,
    refusals and failures by name, delta and the accountant."""
    names = _institutions(lines)
    # An infinite budget or spend (no DP; the aggregator's ledger) has no place on a scale.
    budgets = {k: v for k, v in _budgets(run_dir).items() if math.isfinite(v)}
    rows, gauges = [], []
    planned = cfg.get("federation.rounds")
    spent = {
        name: [
            (r["round"], r["epsilon"][name])
            for r in lines
            if (r.get("epsilon") or {}).get(name) is not None
        ]
        for name in names
    }
    for name, pts in spent.items():
        now = pts[-1][1] if pts else None
        limit = budgets.get(name)
        pace = pts[-1][1] - pts[-2][1] if len(pts) > 1 else None
        left = limit - now if limit is not None and now is not None else None
        runs_out = (
            pts[-1][0] + math.floor(left / pace) + 1
            if left is not None and pace and pace > 0
            else None
        )
        refused = [r["round"] for r in lines if name in (r.get("refused") or [])]
        failed = [
            f"{r['round']} ({why})" for r in lines for w, why in dropped(r).items() if w == name
        ]
        note = (
            f"at this pace the budget runs out in round {runs_out}"
            if runs_out and (planned is None or runs_out <= int(planned))
            else ""
        )
        gauges.append(gauge(name, now, limit, note))
        rows.append(
            [
                name,
                now,
                limit,
                left,
                pace,
                runs_out if runs_out is not None else "-",
                ", ".join(map(str, refused)) or "-",
                "; ".join(failed) or "-",
            ]
        )
    series = []
    for name, pts in spent.items():
        finite = [(x, y) for x, y in pts if math.isfinite(y)]
        if finite:
            series.append(Series(name, finite))
    limits = sorted(set(budgets.values()))
    refs = [Line(f"budget {b:g}", b) for b in limits]
    top = max([*(y for s in series for _, y in s.points), *limits, 1e-9]) * 1.08
    chart = line_chart(
        "Privacy spent per institution",
        series,
        "round",
        "cumulative epsilon",
        refs,
        (0.0, top),
        x_max=_planned(cfg),
    )
    table = html_table(
        [
            "institution",
            "epsilon spent",
            "budget",
            "remaining",
            "last round's cost",
            "budget runs out in round",
            "refused in rounds",
            "failed or rejected (round, reason)",
        ],
        rows,
    )
    dp = (
        f"DP-SGD at each institution; delta {cfg.get('dp.delta', '?')}, accountant "
        f"{str(cfg.get('dp.accountant', '?')).upper()} (Opacus), neighbouring relation: "
        f"{NEIGHBOURING}."
        if cfg.get("dp.enabled", True)
        else "This run trained WITHOUT differential privacy (dp.enabled = false)."
    )
    canary = ""
    if (path := Path(run_dir) / EMPIRICAL_RESULT).is_file():  # privatune canary's lower bound
        canary = (
            f"<p id='canary'>{html.escape(empirical_verdict(json.loads(path.read_text())))}</p>"
        )
    return (
        f"<h2>Privacy</h2><p>{html.escape(dp)}</p>{canary}"
        f"<div class='gauges'>{''.join(gauges)}</div>{chart}{table}"
    )


def data_manifest(run_dir: Path, cfg: dict[str, Any]) -> tuple[Path, dict | None]:
    """The manifest of the run's data folder (``data.dir``) and where it was looked for; a
    relative ``data.dir`` is the folder the run started in: the working folder, else the
    one above the folder of runs (``outputs/``' parent, when the dashboard runs elsewhere)."""
    data_dir = Path(str(cfg.get("data.dir", "")))
    candidates = (
        [data_dir] if data_dir.is_absolute() else [data_dir, run_dir.parent.parent / data_dir]
    )
    paths = [d / "manifest.json" for d in candidates]
    found = next((p for p in paths if p.is_file()), None)
    if found is None:
        return paths[0], None

    def load() -> dict | None:
        try:
            return json.loads(found.read_text())
        except (OSError, ValueError):
            return None

    return found, cached("manifest", [found], load)


def data_section(run_dir: Path, cfg: dict[str, Any]) -> str:
    """Rows and label counts per institution, from the simulation's manifest (written when
    its data were prepared), so a reader sees how skewed the federation's data are; the
    server of a deployment knows none of this, and the section says so."""
    path, manifest = data_manifest(Path(run_dir), cfg)
    private = "In a deployment these counts stay at the institutions: the server never sees them."
    counts = (manifest or {}).get("rows")
    if not isinstance(counts, dict) or not counts:
        found = "holds no row counts" if path.is_file() else "was not found"
        return (
            f"<h2>Data</h2><p class='note'>No data summary: {html.escape(str(path))} {found}. "
            f"{private}</p>"
        )
    labels = [x.strip() for x in str(cfg.get("data.labels", "")).split(",") if x.strip()]
    names = [n for n in manifest.get("institutions", []) if n in counts]
    extra = sorted(
        {k for n in names for k, v in counts[n].items() if k != "total" and isinstance(v, int)}
        - set(labels)
    )
    columns = [*labels, *extra]
    rows = [[n, counts[n].get("total"), *(counts[n].get(c, 0) for c in columns)] for n in names]
    if isinstance(test := counts.get("test"), dict) and "test" not in names:
        rows.append(
            ["test set (the server's)", test.get("total"), *(test.get(c, 0) for c in columns)]
        )
    table = html_table(["institution", "rows", *columns], rows)
    return (
        f"<h2>Data</h2>{table}<p class='note'>Rows per institution and label, from the "
        f"simulation's data manifest ({html.escape(str(path))}). {private}</p>"
    )


def _planned(cfg: dict[str, Any]) -> int | None:
    rounds = cfg.get("federation.rounds")
    return rounds if isinstance(rounds, int) else None


def traffic_chart(lines: list[dict], cfg: dict[str, Any]) -> str:
    rows = [r for r in lines if r["round"] > 0]
    series = [
        Series("sent", [(r["round"], r["bytes_sent"] / 1e6) for r in rows]),
        Series("received", [(r["round"], r["bytes_received"] / 1e6) for r in rows]),
    ]
    return line_chart(
        "Server traffic per round", series, "round", "MB (adapter messages)", x_max=_planned(cfg)
    )


def truncation_chart(lines: list[dict]) -> str:
    pts = [(x, 100 * y) for x, y in _series(lines, "truncation_energy_lost")]
    return line_chart(
        "Exact aggregation: energy lost by the rank-r truncation",
        [Series("energy lost", pts)],
        "round",
        "% of the mean's energy",
    )


def per_class_section(matrix: np.ndarray, labels: list[str]) -> str:
    """Precision, recall and F1 of every label on the test set after the last round: a
    label the federation never learned shows a recall of 0 here, not hidden in macro-F1."""
    c = per_class(matrix)
    rows = [
        [name, int(c["support"][i]), c["precision"][i], c["recall"][i], c["f1"][i]]
        for i, name in enumerate(labels)
    ]
    table = html_table(["label", "test rows", "precision", "recall", "F1"], rows)
    return f"<h2>Per class (test set, final adapter)</h2>{table}"


def write_confusion(run_dir: Path, matrix: np.ndarray, labels: list[str]) -> None:
    """The final central confusion matrix, for the per-class view."""
    data = {"labels": labels, "matrix": np.asarray(matrix).tolist()}
    (Path(run_dir) / CONFUSION_FILE).write_text(json.dumps(data))


def rounds_table(lines: list[dict], cfg: dict[str, Any]) -> str:
    keys = ["central_accuracy", "central_macro_f1", "accuracy", "macro_f1", "train_loss"]
    rows = [
        [
            r["round"],
            *(r.get(k) for k in keys),
            r.get("epsilon_max"),
            ", ".join(r.get("refused", [])) or "-",
            "; ".join(f"{who}: {why}" for who, why in dropped(r).items()) or "-",
            r["bytes_sent"] + r["bytes_received"],
            r["seconds"],
        ]
        for r in lines
    ]
    table = html_table(
        [
            "round",
            "test acc",
            "test F1",
            "local acc",
            "local F1",
            "train loss",
            "max epsilon",
            "refused",
            "failed or rejected (institution: reason)",
            "bytes",
            "seconds",
        ],
        rows,
    )
    why = []
    if cfg.get("dp.enabled", True):
        why.append("train loss is sent only without DP (it is not privatised)")
        if not cfg.get("privacy.local-eval-noise"):
            why.append(
                "local acc and F1 need institutions' noised confusion matrices, off here "
                "(privacy.local-eval-noise = 0)"
            )
    note = f"<p class='note'>'-': {'; '.join(why)}.</p>" if why else ""
    return f"<h2>Rounds</h2>{table}{note}"


def _or_unknown(value: object) -> str:
    return "?" if value is None else str(value)


def run_body(run_dir: Path, extra_sections: Iterable[str] = ()) -> str:
    """Everything known about one run, as HTML: headline, utility, privacy, data, traffic,
    aggregation, rounds, per-class scores, then ``extra_sections`` (the audit...)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    lines = metrics(run_dir)
    s = summary(run_dir)
    planned = _or_unknown(s["rounds_planned"])
    sections = [
        f"<p>Scenario <strong>{html.escape(s['scenario'])}</strong>, status "
        f"<strong class='status-{s['status']}' id='status'>{s['status']}</strong>, round "
        f"<strong id='rounds-done'>{s['rounds_done']}</strong> of {planned}.</p>",
        f"<h2>Utility</h2>{utility_chart(run_dir, lines, cfg)}",
        privacy_section(run_dir, lines, cfg),
        data_section(run_dir, cfg),
        f"<h2>Traffic</h2>{traffic_chart(lines, cfg)}",
    ]
    if _series(lines, "truncation_energy_lost"):
        sections.append(f"<h2>Aggregation</h2>{truncation_chart(lines)}")
    sections.append(rounds_table(lines, cfg))
    confusion = run_dir / CONFUSION_FILE
    if confusion.is_file():
        data = json.loads(confusion.read_text())
        sections.append(per_class_section(np.array(data["matrix"]), data["labels"]))
    return "".join([*sections, *extra_sections])


def audit_section(run_dir: Path) -> str:
    results, remarks = run_audit(run_dir)
    return to_html(results, remarks)


# --- many runs, one ledger ---------------------------------------------------------------


def run_folders(root: Path) -> list[Path]:
    """The run folders directly under ``root`` (those with a ``config.toml`` or metrics)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and ((p / METRICS_FILE).is_file() or (p / "config.toml").is_file())
    )


def runs_body(rows: list[dict[str, Any]], link: Callable[[str], str]) -> str:
    """The runs table, each run's name linking to ``link(name)``."""

    def num(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    body = "".join(
        "<tr>"
        f"<th scope='row'><a href='{html.escape(link(r['name']))}'>"
        f"{html.escape(r['name'])}</a></th>"
        f"<td>{html.escape(r['scenario'])}</td>"
        f"<td class='status-{r['status']}'>{r['status']}</td>"
        f"<td>{r['rounds_done']} of {_or_unknown(r['rounds_planned'])}</td>"
        f"<td>{num(r['macro_f1'], 3)}</td><td>{num(r['epsilon_max'], 2)}</td>"
        f"<td>{'yes' if r['dp'] else 'NO' if r['dp'] is False else '?'}</td>"
        f"<td>{html.escape(r['audit'])}</td></tr>"
        for r in rows
    )
    head = "".join(
        f"<th scope='col'>{h}</th>"
        for h in (
            "run",
            "scenario",
            "status",
            "rounds",
            "macro-F1 (last)",
            "max epsilon",
            "DP",
            "audit",
        )
    )
    if not rows:
        return "<p>No run in this folder yet.</p>"
    return f"<table id='runs'><tr>{head}</tr>{body}</table>"


def compare_body(rows: list[dict[str, Any]]) -> str:
    """The privacy-utility points of several runs: max epsilon against last macro-F1."""
    points = [r for r in rows if r["epsilon_max"] is not None and r["macro_f1"] is not None]
    series = [Series(r["name"], [(r["epsilon_max"], r["macro_f1"])]) for r in points]
    chart = line_chart(
        "Privacy against utility",
        series,
        "max epsilon spent",
        "test macro-F1",
        y_range=(0.0, 1.0),
        scatter=True,
    )
    table = html_table(
        ["run", "scenario", "max epsilon", "macro-F1", "status"],
        [[r["name"], r["scenario"], r["epsilon_max"], r["macro_f1"], r["status"]] for r in rows],
    )
    left_out = len(rows) - len(points)
    note = (
        f"<p class='note'>{left_out} run(s) without an epsilon or a macro-F1 (no DP, or not "
        "started) are in the table only.</p>"
        if left_out
        else ""
    )
    return f"<h2>Privacy against utility</h2>{chart}{note}{table}"


def ledger_body(path: Path) -> str:
    """The node view: one institution's own ledger, audited on its own (no server anchors),
    its spend per run and per round, the remaining budget and every refusal."""
    path = Path(path)
    result = cached("ledger-audit", [path], lambda: audit_ledger(path))
    try:
        records = cached("records", [path], lambda: read_records(path))
    except LedgerError as e:
        return f"<p>{html.escape(str(e))}</p>"
    spending = records[1:]
    if not spending:
        return f"<p>{html.escape(str(path))}: no release recorded yet.</p>"
    last = spending[-1]
    budget = last.max_epsilon
    per_run: dict[str, list] = {}
    for r in spending:
        per_run.setdefault(r.run_id, []).append(r)
    run_rows = [
        [
            run,
            sum(r.status == "trained" for r in recs),
            sum(r.status == "refused" for r in recs),
            recs[0].epsilon,
            recs[-1].epsilon,
        ]
        for run, recs in per_run.items()
    ]
    series = [  # a round's last record: its count's release and training are one point
        Series(run, sorted({r.round: r.epsilon for r in recs}.items()))
        for run, recs in per_run.items()
    ]
    top = max([budget, *(r.epsilon for r in spending), 1e-9]) * 1.08
    chart = line_chart(
        "Cumulative epsilon by round, per run",
        series,
        "round",
        "cumulative epsilon (lifetime)",
        [Line(f"budget {budget:g}", budget)],
        (0.0, top),
    )
    refusals = [[r.run_id, r.round, r.time, r.epsilon] for r in spending if r.status == "refused"]
    records_table = html_table(
        ["run", "round", "time", "status", "steps", "noise multiplier", "epsilon after"],
        [
            [r.run_id, r.round, r.time, r.status, r.steps, r.noise_multiplier, r.epsilon]
            for r in spending
        ],
    )
    return (
        f"<p>Institution <strong>{html.escape(result.institution)}</strong>; audit of this "
        f"ledger alone: <strong id='verdict'>{result.status}</strong>. Delta {last.delta:g}, "
        f"accountant {last.accountant.upper()}, neighbouring relation: "
        f"{html.escape(NEIGHBOURING)}.</p>"
        + gauge(result.institution, last.epsilon, budget, f"remaining {budget - last.epsilon:.2f}")
        + "".join(f"<p>{html.escape(p)}</p>" for p in result.problems)
        + "<h2>Spend per run</h2>"
        + html_table(
            ["run", "rounds trained", "refused", "epsilon at first record", "epsilon after"],
            run_rows,
        )
        + f"<h2>Spend per round</h2>{chart}"
        + "<h2>Refusals</h2>"
        + (
            html_table(["run", "round", "time", "epsilon spent so far"], refusals)
            if refusals
            else "<p>None.</p>"
        )
        + f"<h2>Every record</h2>{records_table}"
    )


def page(title: str, body: str, nav: str = "", script: str = "") -> str:
    """A complete HTML document; ``script`` (the dashboard's polling) is inline, no file."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"{nav}<h1>{html.escape(title)}</h1><main id='content'>{body}</main>"
        f"{f'<script>{script}</script>' if script else ''}</body></html>"
    )


def run_link(name: str) -> str:
    return f"/run/{quote(name)}"
