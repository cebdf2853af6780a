"""report.html: what a person looks at after a run. Plots (accuracy and macro-F1, epsilon
per institution, traffic per round, and for ``aggregation.mode = "exact"`` the energy its
truncated SVD drops) are rendered with matplotlib and embedded as PNG, so the
report is one self-contained file."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import numpy as np
from privatune.common.config import RunConfig
from privatune.common.htmltable import html_table
from privatune.common.model.evaluation import per_class
from privatune.common.privacy.accounting import NEIGHBOURING
from privatune.common.privacy.audit import run_anchors
from privatune.common.protocol import read_lines
from privatune.server.round_log import dropped

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _series(lines: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in lines if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def utility_plot(lines: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, label in (
        ("central_accuracy", "test accuracy"),
        ("central_macro_f1", "test macro-F1"),
        ("accuracy", "local eval accuracy"),
        ("macro_f1", "local eval macro-F1"),
    ):
        x, y = _series(lines, key)
        if x:
            ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Utility per round")
    return _png(fig)


def epsilon_plot(lines: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = sorted({n for r in lines for n in r.get("epsilon", {})})
    for name in names:
        pts = [
            (r["round"], r["epsilon"][name])
            for r in lines
            if r.get("epsilon", {}).get(name) is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=8)
    ax.set_title("Privacy spent per institution")
    return _png(fig)


def traffic_plot(lines: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    rows = [r for r in lines if r["round"] > 0]
    ax.bar(
        [r["round"] - 0.2 for r in rows], [r["bytes_sent"] / 1e6 for r in rows], 0.4, label="sent"
    )
    ax.bar(
        [r["round"] + 0.2 for r in rows],
        [r["bytes_received"] / 1e6 for r in rows],
        0.4,
        label="received",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("MB (adapter messages)")
    ax.legend(fontsize=8)
    ax.set_title("Server traffic per round")
    return _png(fig)


def truncation_plot(lines: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    x, y = _series(lines, "truncation_energy_lost")
    ax.plot(x, [100 * v for v in y], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("% of the mean's energy")
    ax.grid(alpha=0.3)
    ax.set_title("Exact aggregation: energy lost by the rank-r truncation")
    return _png(fig)


def write_model_card(run_dir: Path, cfg: RunConfig) -> Path:
    """``adapter/README.md``: what a person receiving the adapter must know (base model,
    data, labels, the privacy guarantee and the ledger heads that back it), in place of
    PEFT's blank card, which names the base model by its absolute path on this machine."""
    run_dir = Path(run_dir)
    lines = read_lines(run_dir)
    last = lines[-1] if lines else {}
    epsilons = {k: v for k, v in (last.get("epsilon") or {}).items() if v is not None}
    heads = {who: rows[-1] for who, rows in run_anchors(run_dir).items()}
    if cfg.dp.enabled:
        spent = ", ".join(f"{k} {v:.2f}" for k, v in sorted(epsilons.items())) or "none recorded"
        dp = f"DP-SGD at each institution; cumulative epsilon per institution: {spent}"
    else:
        dp = "none (trained without DP)"
    card = [
        f"# privatune adapter: {run_dir.name}",
        "",
        f"- base model: {Path(cfg.model.name).name} (task {cfg.model.task})",
        f"- scenario (data folder): {Path(cfg.data.dir).name}",
        f"- labels: {', '.join(cfg.data.label_names)}",
        f"- rounds: {last.get('round', 0)}",
        f"- differential privacy: {dp}",
        f"- delta: {cfg.dp.delta:g}; neighbouring relation: {NEIGHBOURING}",
        "- ledger heads (institution: records, last hash), for `privatune audit`:",
        *(f"  - {who}: {count}, {head}" for who, (_, count, head) in sorted(heads.items())),
        "",
        "Load it with `privatune predict RUN --text ...`, or in Python with "
        "`privatune.common.model.build.load_trained(RUN)`.",
    ]
    path = run_dir / "adapter" / "README.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(card) + "\n")
    tmp.replace(path)
    return path


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


def write_report(run_dir: Path, extra_sections: list[str] | None = None) -> Path:
    """Write ``report.html`` from the run's metrics (and any extra HTML sections)."""
    run_dir = Path(run_dir)
    lines = read_lines(run_dir)
    keys = [
        "central_accuracy",
        "central_macro_f1",
        "accuracy",
        "macro_f1",
        "train_loss",
        "epsilon_max",
    ]
    rows = [
        [
            r["round"],
            *(r.get(k) for k in keys),
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
    sections = [
        f"<h2>Utility</h2><img src='data:image/png;base64,{utility_plot(lines)}'>",
        f"<h2>Privacy</h2><img src='data:image/png;base64,{epsilon_plot(lines)}'>",
        f"<h2>Traffic</h2><img src='data:image/png;base64,{traffic_plot(lines)}'>",
        f"<h2>Rounds</h2>{table}",
        *(extra_sections or []),
    ]
    if _series(lines, "truncation_energy_lost")[0]:
        plot = truncation_plot(lines)
        sections.insert(3, f"<h2>Aggregation</h2><img src='data:image/png;base64,{plot}'>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>privatune run "
        f"{html.escape(run_dir.name)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #bbb;"
        "padding:3px 6px;text-align:right}th{vertical-align:bottom}</style></head><body>"
        f"<h1>privatune run {html.escape(run_dir.name)}</h1>" + "".join(sections) + "</body></html>"
    )
    out = run_dir / "report.html"
    out.write_text(page)
    return out
