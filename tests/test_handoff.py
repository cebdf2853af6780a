"""What a finished run hands over: a log a scheduler can keep (no colour codes when not a
terminal, no deprecation or FutureWarning lines), a model card beside the adapter, and
`privatune predict` on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT, run_flat_argv
from privatune.cli.main import app
from privatune.common.privacy.accounting import NEIGHBOURING
from typer.testing import CliRunner

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, reviews):
    """One real 1-round simulation in a subprocess, its output captured (not a terminal)."""
    from helpers import make_federation_dir, make_tiny_flat

    root = tmp_path_factory.mktemp("handoff")
    flat = {
        **make_tiny_flat(tiny_model_dir, make_federation_dir(root, reviews), root),
        "federation.rounds": 1,
        "run.name": "handoff",
    }
    out = subprocess.run(
        run_flat_argv(flat, root / "flat.json"),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "outputs" / "handoff", out.stdout + out.stderr, tiny_model_dir


def test_the_log_has_no_colour_codes_deprecations_or_future_warnings(finished):
    _, log, _ = finished
    assert "\x1b[" not in log
    for noise in ("DEPRECATED", "FutureWarning", "deprecated"):
        assert noise not in log, [line for line in log.splitlines() if noise in line][:3]
    assert ": 1 round," in log and "1 rounds" not in log


def test_the_adapter_has_a_model_card(finished):
    run_dir, _, model_dir = finished
    card = (run_dir / "adapter" / "README.md").read_text()
    assert f"base model: {model_dir.name}" in card and str(model_dir) not in card
    assert ".venv" not in card and "/" not in card.split("base model: ")[1].split("\n")[0]
    assert "labels: negative, neutral, positive" in card
    report = (run_dir / "report.html").read_text()  # written last: the run's final status
    assert re.search(r"status <strong[^>]*>finished</strong>", report), report[:2000]
    assert "delta: 1e-05" in card and NEIGHBOURING in card
    heads = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["ledger_heads"]
    for who, (count, head) in heads.items():
        assert f"{who}: {count}, {head}" in card
    assert "cumulative epsilon per institution: hospital-a" in card


def test_predict_prints_label_names_and_probabilities(finished, tmp_path):
    run_dir, _, _ = finished
    out = CliRunner().invoke(
        app, ["predict", str(run_dir), "--text", "It cured me.", "--text", "Awful."]
    )
    assert out.exit_code == 0, out.output
    rows = [line.split("\t") for line in out.output.strip().splitlines()]
    assert [r[2] for r in rows] == ["It cured me.", "Awful."]
    for best, ranked, _ in rows:
        pairs = [x.rsplit(" ", 1) for x in ranked.split(", ")]
        assert {n for n, _ in pairs} == {"negative", "neutral", "positive"}
        probs = [float(p) for _, p in pairs]
        assert pairs[0][0] == best and probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1) < 0.01
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nIt cured me.\nAwful.\n")
    from_file = CliRunner().invoke(app, ["predict", str(run_dir), "--file", str(texts)])
    assert from_file.exit_code == 0 and from_file.output == out.output
    neither = CliRunner().invoke(app, ["predict", str(run_dir)])
    assert neither.exit_code == 2 and "--text" in neither.output


def test_the_readme_peft_snippet_works_as_written_from_another_folder(finished, tmp_path):
    run_dir, _, _ = finished
    readme = (PROJECT_ROOT / "README.md").read_text()
    snippet = readme.split("```python\nfrom peft import PeftModel")[1].split("```")[0]
    snippet = "from peft import PeftModel" + snippet
    snippet = snippet.replace("/absolute/path/to/outputs/<run-name>", str(run_dir))
    snippet += "print(model.base_model.model.config.num_labels)\n"
    out = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,  # not the project folder
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3"
