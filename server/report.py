"""report.html: what a person looks at after a run, and the adapter's model card. The page
is the dashboard's run view (``server.views``: inline SVG charts, tables, the audit) without
its polling, so the report is one self-contained file that can be emailed."""

from __future__ import annotations

from pathlib import Path

from privatune.common.config import RunConfig
from privatune.common.privacy.accounting import NEIGHBOURING
from privatune.common.privacy.audit import run_anchors
from privatune.common.protocol import read_lines
from privatune.server.views import page, run_body


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


def write_report(run_dir: Path, extra_sections: list[str] | None = None) -> Path:
    """Write ``report.html`` from the run's folder (and any extra HTML sections)."""
    run_dir = Path(run_dir)
    body = run_body(run_dir, extra_sections or [])
    out = run_dir / "report.html"
    out.write_text(page(f"privatune run {run_dir.name}", body))
    return out
