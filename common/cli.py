"""The ``privatune`` command: the project's own tools for researchers, engineers and
privacy officers. Each command imports what it needs only when it runs."""

from __future__ import annotations

import sys
import tomllib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


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


@app.command()
def simulate(
    scenario: str = typer.Option("hospitals", help="scenario name under simulations/ or a path"),
    set_: list[str] = typer.Option(
        [], "--set", help="override a config key, e.g. dp.enabled=false"
    ),
) -> None:
    """Run a scenario as a local federated simulation."""
    from common.config import ConfigError
    from common.data import DataError
    from simulations.scenario import load_scenario
    from simulations.simulate import SimulationError
    from simulations.simulate import simulate as run

    try:
        run_dir = run(load_scenario(scenario), _parse_overrides(set_))
    except (ConfigError, DataError, SimulationError) as e:
        _fail(str(e))
    typer.echo(f"run folder: {run_dir}\nreport: {run_dir / 'report.html'}")


@app.command()
def prepare(scenario: str = typer.Argument("hospitals")) -> None:
    """Prepare a scenario's data folder (one file per institution)."""
    from simulations.prepare import prepare as run
    from simulations.scenario import load_scenario

    typer.echo(f"prepared {run(load_scenario(scenario))}")


def main() -> None:
    sys.exit(app())
