"""The layout of docs/architecture.md, kept true: every module imports only from its own floor
or the floors below it (deferred imports inside functions included), and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import PROJECT_ROOT

# Floor of each part, lowest first; parts on one floor do not import each other.
FLOORS = {
    "common": 0,
    "common.privacy": 1,
    "common.model": 1,
    "client": 2,
    "server": 2,
    "simulations": 3,
    "cli": 4,
}
TOPS = ("cli", "common", "client", "server", "simulations")


def modules(root: Path = PROJECT_ROOT) -> dict[str, Path]:
    """``privatune.<dotted>`` of every source file of the five packages."""
    found = {}
    for top in TOPS:
        for path in (root / top).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found["privatune." + ".".join(parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (a name imported from a
    package counts as its module when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("privatune"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("privatune")}
    return found


def imported_names(path: Path) -> list[str]:
    """Every module name ``path`` imports absolutely (``import a.b``, ``from a.b import c``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def part(module: str) -> str:
    """The part of FLOORS a module belongs to."""
    dotted = module.removeprefix("privatune.")
    sub = ".".join(dotted.split(".")[:2])
    return sub if sub in FLOORS else dotted.split(".")[0]


def graph(root: Path = PROJECT_ROOT) -> dict[str, set[str]]:
    found = modules(root)
    return {m: imports(p, set(found)) for m, p in found.items()}


def upward(deps: dict[str, set[str]]) -> list[str]:
    """Imports of a higher floor, or of another part on the same floor."""
    bad = []
    for module, targets in deps.items():
        for target in targets:
            a, b = part(module), part(target)
            if a != b and FLOORS[b] >= FLOORS[a]:
                bad.append(f"{module} -> {target}")
    return bad


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle a depth-first search meets."""
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt in deps and not state.get(nxt):
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(deps):
        if not state.get(node):
            visit(node, [])
    return found


def test_no_module_imports_from_a_floor_above_it():
    deps = graph()
    assert len(deps) > 60 and all(part(m) in FLOORS for m in deps)
    assert upward(deps) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_catch_a_floor_breach_and_a_cycle(tmp_path):
    """A copy of the tree with common importing the CLI and a circle inside common.model."""
    for top in TOPS:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "common" / "model").mkdir()
    (tmp_path / "common" / "model" / "__init__.py").write_text("")
    (tmp_path / "cli" / "main.py").write_text("")
    (tmp_path / "common" / "config.py").write_text(
        "def f():\n    from privatune.cli.main import x\n"
    )
    (tmp_path / "common" / "model" / "a.py").write_text("from privatune.common.model import b\n")
    (tmp_path / "common" / "model" / "b.py").write_text("import privatune.common.model.a\n")
    deps = graph(tmp_path)
    assert upward(deps) == ["privatune.common.config -> privatune.cli.main"]
    assert cycles(deps) == [
        ["privatune.common.model.a", "privatune.common.model.b", "privatune.common.model.a"]
    ]


def test_the_wheel_installs_one_name():
    """pyproject maps every package folder under ``privatune``: nothing else is installed."""
    import tomllib

    setup = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p.startswith("privatune.") for p in setup["packages"])
    assert setup["package-dir"] == {f"privatune.{t}": t for t in TOPS}
    packages = {
        "privatune." + ".".join(p.parent.relative_to(PROJECT_ROOT).parts)
        for t in TOPS
        for p in (PROJECT_ROOT / t).rglob("__init__.py")
    }
    assert packages == set(setup["packages"])  # a new sub-package must be listed


def test_a_built_wheel_holds_privatune_only(tmp_path):
    """``pip install .`` (the Docker image's way) installs ``privatune`` and its dist-info,
    with the package data (defaults and scenarios) inside."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            str(PROJECT_ROOT),
            "-w",
            tmp_path,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("privatune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "privatune",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert "privatune/common/defaults.toml" in names
    assert "privatune/simulations/medical.toml" in names
    assert "privatune/cli/main.py" in names


def test_nothing_imports_a_folder_by_its_bare_name():
    """From the repository root ``import common`` would load a second copy of a module
    beside ``privatune.common``'s: every import names the installed package."""
    bare = [
        f"{path.name}: {name}"
        for path in [*modules().values(), *(PROJECT_ROOT / "tests").glob("*.py")]
        for name in imported_names(path)
        if name.split(".")[0] in TOPS
    ]
    assert bare == []


def test_test_modules_share_code_through_helpers_only():
    """A test module that imports another runs (and collects) that one's module-level code
    and ties the two together; shared code lives in conftest.py and the helper modules."""
    tests = {p.stem for p in (PROJECT_ROOT / "tests").glob("test_*.py")}
    crossing = [
        f"{path.name}: {name}"
        for path in (PROJECT_ROOT / "tests").glob("*.py")
        for name in imported_names(path)
        if name.split(".")[0] in tests
    ]
    assert crossing == []
