"""The ``privatune`` command: the project's own tools for researchers, engineers and
privacy officers. Each command imports what it needs only when it runs."""

from __future__ import annotations

import shlex
import sys
import tomllib
from typing import TYPE_CHECKING

import typer
from privatune.simulations.scenario import DEFAULT_SCENARIO

if TYPE_CHECKING:  # imported by the commands that run, not at start-up
    from privatune.simulations.byod import Prepared, UserData

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"privatune {version('privatune')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Options before the command."""


def _parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs, with values parsed as TOML (``true``, ``3``, ``"x"``, bare text)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _user_data(
    data_dir: str,
    test_file: str,
    text_column: str,
    label_column: str,
    labels: str,
    overrides: dict,
    **split: str | float | int,
) -> UserData:
    """What ``--data-dir`` and its flags name (``simulate``, ``canary``); ``--set`` keys fill
    in what no flag gave."""
    from pathlib import Path

    from privatune.simulations import byod

    for key in ("data.dir", "data.test-path"):
        if key in overrides:
            _fail(f"--set {key} does not go with --data-dir (use --data-dir/--test-file)")
    defaults = {**byod.app_defaults(), **overrides}
    return byod.UserData(
        source=Path(data_dir),
        test_file=Path(test_file) if test_file else None,
        text_column=text_column or str(defaults["data.text-column"]),
        label_column=label_column or str(defaults["data.label-column"]),
        labels=tuple(
            x.strip()
            for x in (labels or str(overrides.get("data.labels", ""))).split(",")
            if x.strip()
        ),
        encoding=str(defaults["data.encoding"]),
        seed=int(defaults["run.seed"]),
        **split,
    )


def _prepare_user_data(user: UserData, self_contained: bool = False) -> Prepared:
    """Check and prepare the user's files; print the institutions and labels found."""
    from privatune.simulations import byod

    prepared = byod.prepare_user_data(user, self_contained=self_contained)
    typer.echo(f"institutions ({len(prepared.names)}): {', '.join(prepared.names)}")
    how = "inferred from the data; fix with --labels" if prepared.inferred else "given"
    typer.echo(f"labels ({how}): {','.join(prepared.labels)}")
    return prepared


@app.command()
def simulate(
    scenario: str = typer.Option(
        "",
        help=f"scenario name under simulations/ or a path (default {DEFAULT_SCENARIO}); "
        "with --data-dir it lends its training recipe only",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="override a config key, e.g. dp.enabled=false"
    ),
    resume: str = typer.Option("", help="continue this run folder from its last checkpoint"),
    data_dir: str = typer.Option(
        "",
        help="your own data: one institution per file in this folder (CSV, TSV, Parquet, "
        "JSONL), or one file to split; it is only read",
    ),
    test_file: str = typer.Option("", help="central test file (not an institution)"),
    text_column: str = typer.Option("", help="text column (default data.text-column)"),
    label_column: str = typer.Option("", help="label column (default data.label-column)"),
    labels: str = typer.Option("", help="label set a,b,...; default: inferred, printed"),
    split_by: str = typer.Option("", help="split one file into institutions by this column"),
    dirichlet: float = typer.Option(0.0, help="split one file by label skew, Dirichlet(ALPHA)"),
    institutions: int = typer.Option(0, help="institutions of the --dirichlet split"),
) -> None:
    """Run a scenario as a local federated simulation (or resume a stopped one, or run on
    your own files with --data-dir)."""
    from pathlib import Path

    from privatune.common.errors import PrivatuneError
    from privatune.simulations import simulate as sim
    from privatune.simulations.scenario import load_scenario

    overrides = _parse_overrides(set_)
    try:
        if resume:
            run_dir = sim.resume(Path(resume), overrides)
        elif data_dir:
            from privatune.simulations import byod

            for key in ("data.dir", "data.test-path"):
                if key in overrides:
                    _fail(f"--set {key} does not go with --data-dir (use --data-dir/--test-file)")
            user = _user_data(
                data_dir,
                test_file,
                text_column,
                label_column,
                labels,
                overrides,
                split_by=split_by,
                dirichlet=dirichlet,
                institutions=institutions,
            )
            prepared = _prepare_user_data(user)
            recipe = load_scenario(scenario).config if scenario else {}
            flat = byod.user_flat(prepared, user, recipe, overrides)
            run_dir = sim.run_flat(flat, len(prepared.names))
        else:
            run_dir = sim.simulate(load_scenario(scenario or DEFAULT_SCENARIO), overrides)
    except (PrivatuneError, sim.SimulationError) as e:
        _fail(str(e))
    typer.echo(f"run folder: {run_dir}\nreport: {run_dir / 'report.html'}")


@app.command()
def prepare(scenario: str = typer.Argument(DEFAULT_SCENARIO)) -> None:
    """Prepare a scenario's data folder (one file per institution)."""
    from privatune.simulations.prepare import prepare as run
    from privatune.simulations.scenario import load_scenario

    typer.echo(f"prepared {run(load_scenario(scenario))}")


@app.command()
def plan(
    target_epsilon: float = typer.Option(..., help="epsilon to spend over the whole training"),
    delta: float = typer.Option(1e-5),
    rounds: int = typer.Option(..., help="federated rounds the institution takes part in"),
    local_epochs: int = typer.Option(1),
    sample_rate: float = typer.Option(0.0, help="Poisson rate q; or give --data-size/--batch-size"),
    data_size: int = typer.Option(0, help="local training rows"),
    batch_size: int = typer.Option(0, help="expected batch size"),
    accountant: str = typer.Option("rdp", help="rdp or prv"),
    eval_noise: float = typer.Option(
        0.0, help="noise of a local evaluation released every round (node local-eval-noise)"
    ),
) -> None:
    """Print the noise multiplier that meets a target epsilon, and epsilon after each round."""
    from privatune.common.privacy import accounting as privacy

    if not sample_rate:
        if not (data_size and batch_size):
            _fail("give --sample-rate, or both --data-size and --batch-size")
        sample_rate = privacy.sample_rate(data_size, batch_size)
    try:
        p = privacy.plan(
            target_epsilon, delta, rounds, local_epochs, sample_rate, accountant, eval_noise
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"noise multiplier: {p.noise_multiplier:.4f}")
    typer.echo(f"sample rate: {p.sample_rate:.5f}, steps per round: {p.steps_per_round}")
    for r, eps in enumerate(p.epsilon_per_round, start=1):
        typer.echo(f"round {r:>3}: cumulative epsilon {eps:.4f}")


@app.command()
def audit(
    path: str = typer.Argument(..., help="a run folder or one ledger file"),
    anchors: list[str] = typer.Option(
        [],
        help="a run folder whose recorded ledger heads a ledger file must match (repeat for "
        "every run the institution took part in)",
    ),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    html_out: str = typer.Option("", "--html", help="also write an HTML report to this file"),
) -> None:
    """Verify ledgers: hash chain and signatures, epsilon recomputed by two accountants,
    budgets, and (for a run folder, or with --anchors) the ledger heads the server recorded.
    Exit status 0 only when every ledger verifies and is within budget. A deployment run's
    folder holds no ledger: it says how to audit each institution's."""
    import json
    from pathlib import Path

    from privatune.common.privacy.audit import HEADERS, notes, rows, to_html, to_json
    from privatune.common.privacy.audit import audit as run_audit
    from privatune.common.privacy.empirical import RESULT, above_claim, verdict

    results = run_audit(Path(path), [Path(a) for a in anchors])
    remarks = notes(Path(path), results)
    if as_json:
        typer.echo(json.dumps(to_json(results), indent=2))
        for remark in remarks:
            typer.echo(remark, err=True)
    else:
        if results:
            widths = [max(len(h), 10) for h in HEADERS]
            typer.echo("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)))
            for row in rows(results):
                cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
                typer.echo("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
        for remark in remarks:
            typer.echo(remark)
        for r in results:
            for problem in r.problems:
                typer.secho(f"FAIL: {problem}", fg="red", err=True)
    empirical = Path(path) / RESULT
    measured = json.loads(empirical.read_text()) if empirical.is_file() else None
    if measured:
        typer.echo(verdict(measured))
    if html_out:
        page = to_html(results, remarks)
        Path(html_out).write_text(f"<!doctype html><meta charset='utf-8'>{page}")
    if not all(r.ok for r in results) or (measured and above_claim(measured)):
        raise typer.Exit(1)


@app.command()
def canary(
    scenario: str = typer.Option(
        DEFAULT_SCENARIO, help="scenario name under simulations/ or a path"
    ),
    set_: list[str] = typer.Option([], "--set", help="override a config key"),
    auditor: str = typer.Option(
        "white-box", help="white-box (gradient canaries) or black-box (input-space canaries)"
    ),
    canaries: int = typer.Option(1000, help="m: canaries, each included with probability 1/2"),
    into: int = typer.Option(0, help="how many institutions hold the canaries (0: all)"),
    kind: str = typer.Option("dirac", help="white-box canary directions: dirac or random"),
    break_: str = typer.Option(
        "",
        "--break",
        help="run a broken mechanism to see what the audit shows: noise-off, half-noise or "
        "half-rate (the ledgers still claim the planned epsilon); never for real use",
    ),
    confidence: float = typer.Option(0.95, help="of the measured lower bounds, all together"),
    data_dir: str = typer.Option(
        "", help="your own data, as for simulate: one institution per file in this folder"
    ),
    test_file: str = typer.Option("", help="central test file (not an institution)"),
    text_column: str = typer.Option("", help="text column (default data.text-column)"),
    label_column: str = typer.Option("", help="label column (default data.label-column)"),
    labels: str = typer.Option("", help="label set a,b,...; default: inferred, printed"),
) -> None:
    """Empirical privacy audit: plant canaries, run the federation as configured, and measure
    lower bounds on epsilon beside the epsilon the ledgers claim.

    \b
    Auditors:
      white-box (default): m gradient canaries, each one more record of its institution:
        included with probability 1/2, Poisson-sampled in every DP step, its gradient (norm
        = the clipping bound, sign flipped in a secret third of the rounds) added to the
        clipped sum before the noise. Scored by the inner product of its institution's
        per-round updates with its direction, weighted by its signs (the server's view),
        and by the final adapter's move. Without DP it comes near the largest bound m
        allows; under DP it shows what a worst-case record spends as the server sees it
        (one update a round, not every step). It cannot see leaks through the data path
        (tokenizer, features), which gradient canaries bypass, and one run cannot prove a
        leak of about twice the claim (its estimate warns of one).
      black-box: m strings of random words with random labels in the training files, scored
        by the final (and each round's) adapter's fit. Real records through the real data
        path, but a weak attacker: on the shipped probes it measures 0 with DP and without,
        so its silence proves nothing.

    \b
    Bounds (docs/privacy-officers.md), at --confidence over all guess counts and bounds:
      one-run (Steinke et al. 2023) and f-DP one-run (Mahloujifar et al. 2025) on the
      (epsilon, delta) claim: above the claim = proof the mechanism that ran is not the one
      claimed (exit status 1). f-DP against Gaussian curves: reported, not a verdict.
      Gaussian fit (Andrew et al. 2024): an estimate, not a bound.
    A low bound never proves privacy."""
    import dataclasses
    import json

    from privatune.common.errors import PrivatuneError
    from privatune.common.privacy.empirical import RESULT, above_claim, verdict
    from privatune.simulations import simulate as sim
    from privatune.simulations.scenario import load_scenario
    from privatune.simulations.tools.canary import run_canary_audit
    from privatune.simulations.tools.gradient_canary import BROKEN, KINDS, run_gradient_audit

    if not (canaries >= 2 and into >= 0 and 0 < confidence < 1):
        _fail("need --canaries >= 2, --into >= 0 and 0 < --confidence < 1")
    if auditor not in ("white-box", "black-box") or kind not in KINDS:
        _fail(f"--auditor white-box or black-box; --kind {' or '.join(KINDS)}")
    if break_ and (break_ not in BROKEN or auditor != "white-box"):
        _fail(f"--break {', '.join(BROKEN)}, with the white-box auditor")
    try:
        chosen = load_scenario(scenario)
        overrides = _parse_overrides(set_)
        if data_dir:  # the scenario lends its recipe; the data and their count are the user's
            from privatune.simulations import byod

            user = _user_data(data_dir, test_file, text_column, label_column, labels, overrides)
            prepared = _prepare_user_data(user, self_contained=True)
            overrides = byod.user_flat(prepared, user, chosen.config, overrides)
            chosen = dataclasses.replace(chosen, institutions=len(prepared.names))
        spread = into or chosen.institutions
        if auditor == "white-box":
            run_dir = run_gradient_audit(
                chosen, overrides, canaries, spread, confidence, kind, break_ or None
            )
        else:
            run_dir = run_canary_audit(chosen, overrides, canaries, spread, confidence)
    except (PrivatuneError, sim.SimulationError, ValueError) as e:
        _fail(str(e))
    result = json.loads((run_dir / RESULT).read_text())
    typer.echo(verdict(result))
    typer.echo(f"run folder: {run_dir} ({RESULT}, report.html)")
    if above_claim(result):
        raise typer.Exit(1)


@app.command()
def generate(
    run: str = typer.Argument(..., help="a run folder of a causal-LM federation"),
    prompt: str = typer.Option(..., help="the instruction"),
    max_tokens: int = typer.Option(32, help="the most tokens to answer with"),
) -> None:
    """Answer an instruction with the run's final adapter (greedy decoding)."""
    from pathlib import Path

    from privatune.common.config import RunConfig, stored_flat
    from privatune.common.errors import PrivatuneError
    from privatune.common.model.build import load_trained
    from privatune.common.model.causal_lm import generate as answer
    from privatune.common.model.hub import load_tokenizer

    try:
        cfg = RunConfig.from_flat(stored_flat(Path(run)))
        if cfg.model.task != "causal-lm":
            _fail(f"{run}: model.task is {cfg.model.task!r}; generate needs a causal-lm run")
        model = load_trained(Path(run))
        tokenizer = load_tokenizer(cfg)
        typer.echo(answer(model, tokenizer, prompt, cfg.model.chat_template, max_tokens))
    except PrivatuneError as e:
        _fail(str(e))


@app.command()
def predict(
    run: str = typer.Argument(..., help="a run folder"),
    text: list[str] = typer.Option([], help="a text to label (repeat for several)"),
    file: str = typer.Option(
        "", help="texts to label: a data file (its --text-column) or one text per line"
    ),
    text_column: str = typer.Option("", help="of --file (default: the run's data.text-column)"),
    top: int = typer.Option(3, help="labels shown per text, most probable first"),
) -> None:
    """Label texts with a run's final adapter: each text's labels with their probabilities."""
    from pathlib import Path

    import numpy as np
    from privatune.common.config import RunConfig, stored_flat
    from privatune.common.data import READERS, LabeledText, read_table
    from privatune.common.errors import PrivatuneError
    from privatune.common.model.build import encode, load_trained
    from privatune.common.model.evaluation import probabilities
    from privatune.common.model.hub import pick_device

    if bool(text) == bool(file):
        _fail("give --text (repeatable) or --file, not both")
    try:
        cfg = RunConfig.from_flat(stored_flat(Path(run)))
        texts = list(text)
        if file and Path(file).suffix.lower() in READERS:
            column = text_column or cfg.data.text_column
            frame = read_table(file, cfg.data.encoding)
            if column not in frame.columns:
                _fail(f"{file}: column '{column}' not found; set --text-column")
            texts = [str(t) for t in frame[column]]
        elif file:
            lines = Path(file).read_text(encoding=cfg.data.encoding).splitlines()
            texts = [line for line in lines if line.strip()]
        device = pick_device()
        model = load_trained(Path(run), device)
        rows = LabeledText(Path(file or "--text"), texts, np.zeros(len(texts), np.int64), "")
        probs = probabilities(model, encode(rows, cfg), device)
    except (PrivatuneError, OSError) as e:
        _fail(str(e))
    names = cfg.data.label_names
    for t, p in zip(texts, probs, strict=True):
        best = np.argsort(-p)[:top]
        labelled = ", ".join(f"{names[i]} {p[i]:.3f}" for i in best)
        typer.echo(f"{names[best[0]]}\t{labelled}\t{' '.join(t.split())[:60]}")


@app.command()
def evaluate(
    run: str = typer.Argument("", help="a run folder of a causal-LM federation"),
    zero_shot: bool = typer.Option(
        False, "--zero-shot", help="score the base model without an adapter instead of a run"
    ),
    model: str = typer.Option(
        "", help="with --zero-shot: the base model (default SmolLM2-135M-Instruct)"
    ),
    benchmark: list[str] = typer.Option(
        [], help="medmcqa (the run's own test file), medqa or pubmedqa; repeat; default: all"
    ),
    rows: int = typer.Option(0, help="N questions per benchmark, a fixed-seed subset (0: all)"),
    batch_size: int = typer.Option(4, help="questions scored together"),
    out: str = typer.Option(
        "", help="JSON file (default RUN/benchmarks.json, or outputs/benchmarks-zero-shot.json)"
    ),
) -> None:
    """FlowerTune's medical evaluation (MedMCQA, MedQA, PubMedQA) of a causal-LM run's final
    adapter, or of the base model (--zero-shot): accuracy with its 95% interval, macro-F1,
    chance and the best constant answer, as a Markdown table and JSON."""
    import json
    from pathlib import Path

    from privatune.common.errors import PrivatuneError
    from privatune.common.model.hub import pick_device
    from privatune.simulations.tools.llm_benchmarks import BENCHMARKS, table
    from privatune.simulations.tools.llm_benchmarks import evaluate as score

    if bool(run) == zero_shot:
        _fail("give a run folder, or --zero-shot (not both)")
    if model and not zero_shot:
        _fail("--model goes with --zero-shot (a run uses its own model.name)")
    try:
        result = score(
            Path(run) if run else None,
            model or "SmolLM2-135M-Instruct",
            benchmark or list(BENCHMARKS),
            rows,
            batch_size,
            pick_device(),
            typer.echo,
        )
    except PrivatuneError as e:
        _fail(str(e))
    for line in table(result):
        typer.echo(line)
    path = Path(
        out or (Path(run) / "benchmarks.json" if run else "outputs/benchmarks-zero-shot.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    typer.echo(f"scores: {path}")


@app.command()
def tune(
    scenario: str = typer.Option(
        DEFAULT_SCENARIO, help="scenario name under simulations/ or a path"
    ),
    try_: list[str] = typer.Option(
        [], "--try", help="one recipe: \"key=value key='a value'\" (repeat the option to compare)"
    ),
    repeats: int = typer.Option(3, help="federations per recipe (DP noise varies)"),
    holdout: float = typer.Option(0.2, help="share of each institution's file held out"),
    no_dp_too: bool = typer.Option(False, help="also run each recipe without DP"),
    out: str = typer.Option("outputs/tune.json", help="all scores, as JSON"),
) -> None:
    """Compare recipes (linear probe or LoRA) on the institutions' held-out local splits (never the
    test set): in-process federations, real DP training, no ledgers."""
    import json
    from pathlib import Path

    from privatune.common.errors import PrivatuneError
    from privatune.simulations import simulate as sim
    from privatune.simulations.scenario import load_scenario
    from privatune.simulations.tools.tune import tune as run

    if not (repeats >= 1 and 0 < holdout < 1):
        _fail("need --repeats >= 1 and 0 < --holdout < 1")
    try:
        tries = [_parse_overrides(shlex.split(t)) for t in try_] or [{}]
        rows = run(load_scenario(scenario), tries, repeats, holdout, no_dp_too, typer.echo)
    except (PrivatuneError, sim.SimulationError, typer.BadParameter) as e:
        _fail(str(e))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"scenario": scenario, "holdout": holdout, "rows": rows}))
    typer.echo(f"scores: {out}")


ledger_app = typer.Typer(help="An institution's privacy ledger.")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("init")
def ledger_init(
    path: str = typer.Argument(..., help="the ledger file (node config ledger-path)"),
    institution: str = typer.Option(..., help="the institution's name (node config)"),
    signing_key: str = typer.Option(
        "",
        help="private key that signs every record (e.g. the SuperNode key; node config "
        "signing-key); default: a new Ed25519 key under the node's state folder "
        "(PRIVATUNE_STATE), outside the ledger's folder",
    ),
    anchor_path: str = typer.Option(
        "",
        help="where the node keeps the ledger's anchor (node config anchor-path), outside "
        "the ledger's folder; default: under the node's state folder",
    ),
) -> None:
    """Create a ledger with its genesis record. A node never starts one silently: a missing
    ledger stops training, so that a lost ledger cannot reset a budget."""
    from pathlib import Path

    from privatune.common.privacy.ledger import Ledger, LedgerError

    try:
        ledger = Ledger.create(
            Path(path),
            institution,
            Path(signing_key) if signing_key else None,
            Path(anchor_path) if anchor_path else None,
        )
    except (LedgerError, OSError) as e:
        _fail(str(e))
    typer.echo(f"{path}: ledger of {institution}, records signed with {ledger.key_path}")
    typer.echo(f"anchor: {ledger.anchor_path} (keep it apart from the ledger's backups)")
    typer.echo(f"public key: {ledger.records[0].public_key}")


data_app = typer.Typer(help="Check an institution's data before a run.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    file: str = typer.Argument(...),
    text_column: str = typer.Option("text"),
    label_column: str = typer.Option("label"),
    labels: str = typer.Option(..., help="the label set a,b,... (the node config's labels)"),
    encoding: str = typer.Option("utf-8", help="of CSV/TSV/JSONL files, e.g. latin-1"),
) -> None:
    """Validate a data file exactly as a client would, and summarise it."""
    from collections import Counter

    from privatune.common.data import DataError, load_labeled

    names = [x.strip() for x in labels.split(",") if x.strip()]
    try:
        data = load_labeled(file, text_column, label_column, names, encoding)
    except DataError as e:
        _fail(str(e))
    lengths = sorted(len(t.split()) for t in data.texts)
    counts = Counter(names[i] for i in data.labels)
    typer.echo(f"{file}: {len(data)} rows, valid")
    typer.echo("labels: " + ", ".join(f"{n} {counts.get(n, 0)}" for n in names))
    typer.echo(
        f"words per text: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}"
    )
    typer.echo(f"fingerprint: {data.fingerprint}")


@app.command()
def certs(
    out: str = typer.Option("certs", help="folder to write ca.crt, ca.key, server.pem, server.key"),
    san: list[str] = typer.Option(
        [],
        help="host name or IP the SuperLink is reached at (repeat; the first is also the CN; "
        "localhost, 127.0.0.1 and ::1 are always added)",
    ),
    days: int = typer.Option(365, help="validity of both certificates"),
    force: bool = typer.Option(False, "--force", help="replace existing files"),
) -> None:
    """Create a private CA and a SuperLink TLS certificate signed by it."""
    from pathlib import Path

    from privatune.common.certs import CertError, write_tls

    try:
        files = write_tls(Path(out), san, days, force)
    except (CertError, OSError) as e:
        _fail(str(e))
    typer.echo(f"{files.ca_cert}      CA certificate: give to every SuperNode and flwr CLI user")
    typer.echo(f"{files.ca_key}      CA private key: keep offline, never on a server")
    typer.echo(f"{files.server_cert}  SuperLink certificate (--ssl-certfile)")
    typer.echo(f"{files.server_key}  SuperLink private key (--ssl-keyfile), stays on the SuperLink")


@app.command()
def keys(
    institution: str = typer.Argument(..., help="institution name, used for the file names"),
    out: str = typer.Option("keys", help="folder to write <institution> and <institution>.pub"),
    force: bool = typer.Option(False, "--force", help="replace existing files"),
) -> None:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH format)."""
    from pathlib import Path

    from privatune.common.certs import CertError, write_node_keys

    try:
        private, public = write_node_keys(Path(out), institution, force)
    except (CertError, OSError) as e:
        _fail(str(e))
    typer.echo(f"{private}  private key: stays at the institution (--auth-supernode-private-key)")
    typer.echo(f"{public}  public key: send to the aggregator for `flwr supernode register`")


@app.command()
def summary(run: str = typer.Argument(..., help="a run folder")) -> None:
    """The headline numbers of a run as a Markdown table (used for docs/results.md); an
    institution that failed is named with its reason."""
    from pathlib import Path

    from privatune.common.privacy.audit import failures
    from privatune.common.protocol import METRICS_FILE, read_lines

    lines = read_lines(run)
    if not lines:
        _fail(f"{run}/{METRICS_FILE}: not found; is {run} a run folder?")
    first, last = lines[0], lines[-1]

    def num(value, digits=3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    typer.echo(f"| metric | before training (round 0) | after round {last['round']} |")
    typer.echo("|---|---|---|")
    for key, label in (
        ("central_accuracy", "test accuracy"),
        ("central_macro_f1", "test macro-F1"),
        ("accuracy", "local eval accuracy"),
        ("macro_f1", "local eval macro-F1"),
    ):
        typer.echo(f"| {label} | {num(first.get(key))} | {num(last.get(key))} |")
    typer.echo(f"| max epsilon (delta from config) | 0 | {num(last.get('epsilon_max'), 2)} |")
    _test_lines(run, first, last)
    for who, (rounds, why) in sorted(failures(Path(run)).items()):
        listed = ", ".join(map(str, rounds))
        typer.echo(f"| {who} failed (round {listed}) | | {why} |")
    seconds = sum(x["seconds"] for x in lines)
    traffic = sum(x["bytes_sent"] + x["bytes_received"] for x in lines)
    typer.echo(f"| federation wall time, all rounds | | {seconds / 60:.1f} min |")
    typer.echo(f"| adapter traffic, all rounds | | {traffic / 1e6:.1f} MB |")


def _test_lines(run: str, first: dict, last: dict) -> None:
    """The test accuracy's 95% interval and the best constant answer's accuracy, when the
    run's test file is readable (a baseline a model must beat before it has learned)."""
    from pathlib import Path

    from privatune.common.config import RunConfig, stored_flat
    from privatune.common.data import load_labeled
    from privatune.common.errors import PrivatuneError
    from privatune.common.model.evaluation import best_constant, wilson

    try:
        cfg = RunConfig.from_flat(stored_flat(Path(run)))
        d = cfg.data
        test = load_labeled(d.test_path, d.text_column, d.label_column, d.label_names, d.encoding)
    except (PrivatuneError, OSError):
        return
    n = len(test.labels)
    cells = []
    for line in (first, last):
        acc = line.get("central_accuracy")
        low, high = wilson(round(acc * n), n) if acc is not None else (None, None)
        cells.append("-" if acc is None else f"{low:.3f}-{high:.3f}")
    typer.echo(f"| test accuracy, 95% interval (Wilson, n={n}) | {cells[0]} | {cells[1]} |")
    best, accuracy = best_constant(test.labels, len(d.label_names))
    typer.echo(
        f"| always answering {d.label_names[best]!r} (best constant) | | {accuracy:.3f} accuracy |"
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Run the benchmarks (docs/benchmarks.md): `privatune bench --help` lists their options."""
    from privatune.simulations.bench.run import main as run

    raise typer.Exit(run(ctx.args))


@app.command()
def dashboard(
    outputs: str = typer.Argument("outputs", help="a folder of run folders"),
    port: int = typer.Option(8050, help="port to listen on (0: any free one)"),
    host: str = typer.Option(
        "127.0.0.1", help="address to bind; other than loopback, a token printed here is required"
    ),
    ledger: str = typer.Option(
        "", help="node view: show this one ledger file only (nothing from the server)"
    ),
) -> None:
    """A live, read-only web view of the runs in OUTPUTS (docs/dashboard.md): progress,
    utility against baselines, epsilon against each budget, the audit; or --ledger."""
    from pathlib import Path

    from privatune.server.dashboard import serve

    if ledger and not Path(ledger).is_file():
        _fail(f"{ledger}: no such ledger file")
    if not ledger and not Path(outputs).is_dir():
        _fail(f"{outputs}: no such folder of runs")
    try:
        serve(Path(outputs), host, port, Path(ledger) if ledger else None)
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")


def main() -> None:
    from privatune.common.logs import quiet

    quiet()
    sys.exit(app())
