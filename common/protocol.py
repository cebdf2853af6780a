"""What server and clients say to each other, and the one line per round the server writes.

Wire keys are kebab-case, as Flower's own (``num-examples``); ``metrics.jsonl`` keys are
snake_case. Each name is defined here once; docs/threat-model.md lists which reply values
are covered by DP and which are public.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

# --- instructions (server -> client), in the message's "config" record ---------------------
RUN_NAME = "run-name"
SERVER_ROUND = "server-round"  # the run's round number (a resumed run continues it)
PROXIMAL_MU = "proximal-mu"  # fedprox only
NAMES_KEY = "adapter-names"  # SecAgg+ rounds: legacy parameters carry no tensor names
LEDGER_SEEN = "ledger-seen"  # the record count this node last reported: a shorter ledger is refused

# --- replies (client -> server): "metrics" record -------------------------------------------
NUM_EXAMPLES = "num-examples"  # the DP count of the training rows: the aggregation weight
REFUSED = "refused"  # 1: the institution's budget or policy refused the round
EPSILON = "epsilon"  # cumulative, from the institution's ledger
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
STEPS = "steps"
TRAIN_LOSS = "train-loss"  # exact: only sent without DP
EVALUATED = "evaluated"  # 1: a noised confusion matrix follows
CONFUSION = "confusion"  # the noised matrix, flattened row-major
# --- replies: "info" record -----------------------------------------------------------------
INSTITUTION = "institution"
LEDGER_RECORDS = "ledger-records"  # with LEDGER_HEAD: the ledger anchor the audit checks
LEDGER_HEAD = "ledger-head"

METRICS_FILE = "metrics.jsonl"

# --- error replies: fixed text, never derived from the data (docs/threat-model.md) ---------
REASON_SEPARATOR = ": "


def error_reason(institution: str, text: str) -> str:
    """An error reply's reason: the institution's (public) name and a fixed sentence."""
    return f"{institution}{REASON_SEPARATOR}{text}"


def reason_parts(reason: str) -> tuple[str | None, str]:
    """(institution, text) of an error reason; None when it names no institution."""
    name, sep, text = reason.partition(REASON_SEPARATOR)
    if not sep or not name or " " in name:
        return None, reason
    return name, text


class MetricsLine(TypedDict):
    """One line of ``metrics.jsonl``: round 0 is the starting point, then one per round."""

    round: int
    train_loss: float | None  # only without DP
    eval_loss: float | None
    accuracy: float | None  # from the institutions' noised confusion matrices
    macro_f1: float | None
    central_loss: float | None  # on the server's own test set
    central_accuracy: float | None
    central_macro_f1: float | None
    epsilon_max: float | None
    epsilon: dict[str, float | None]  # institution -> cumulative epsilon (None: no DP)
    refused: list[str]
    rejected: dict[str, str]
    failed: dict[str, str]
    bytes_sent: int
    bytes_received: int
    ranks: dict[str, int]
    ledger_heads: dict[str, Any]  # institution -> [records, head hash]
    truncation_energy_lost: float | None
    central_eval_seconds: float
    seconds: float


def append_line(run_dir: Path, line: MetricsLine) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_lines(run_dir: Path) -> list[MetricsLine]:
    """Every line of a run's ``metrics.jsonl`` (none when the run has not started)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_lines(run_dir: Path, lines: list[MetricsLine]) -> None:
    """Replace the file (a resumed run drops the rounds it will run again)."""
    (Path(run_dir) / METRICS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
