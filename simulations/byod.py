"""Bring your own data: a simulated federation over the user's own files
(``privatune simulate --data-dir DIR``).

The user's folder is only ever read. Three ways to make institutions:

- one per data file in DIR (CSV, TSV, Parquet, JSON Lines), named after its file stem; the
  test file, if it lies in DIR, is not an institution. Nothing is copied: the manifest in
  ``data/byod-<name>/`` maps each institution to its file;
- ``split_by``: one file split by a column (a lender, a hospital id), one institution per value;
- ``dirichlet`` + ``institutions``: one file split by label skew, as the scenarios are.

Split outputs are written (in the source file's encoding, with its column names) under
``data/byod-<name>/``, never into DIR. Without ``labels`` the label set is the sorted unique
labels of the institution files and the test file. Every institution file is validated as a
client would before the federation starts.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from privatune.common.config import RunConfig, Scalar, app_defaults
from privatune.common.data import READERS, DataError, load_labeled, read_table

OUT_ROOT = Path("data")
# keys a scenario's recipe does not lend to a run on user data: the data and the node counts
NOT_LENT = ("data.", "federation.min-available-nodes", "federation.min-train-nodes")


@dataclass(frozen=True)
class UserData:
    """What the user named: a folder (or one file) and how to read and split it."""

    source: Path
    test_file: Path | None = None
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()  # empty: inferred from the data
    split_by: str = ""  # a column: one institution per value
    dirichlet: float = 0.0  # > 0 with institutions: split one file by label skew
    institutions: int = 0
    encoding: str = "utf-8"
    seed: int = 42


@dataclass(frozen=True)
class Prepared:
    data_dir: Path  # data/byod-<name>: the manifest (and split outputs)
    names: list[str]
    labels: list[str]
    inferred: bool  # the labels were inferred from the data
    test_file: Path | None


def institution_name(text: str) -> str:
    """A file stem or column value as an institution name (also a ledger file name)."""
    return re.sub(r"[^\w.-]+", "-", str(text).strip()).strip("-.") or "institution"


def _test_file(user: UserData, folder: Path) -> Path | None:
    if user.test_file is None or not str(user.test_file):
        return None
    path = Path(user.test_file)
    if not path.is_file() and (folder / path).is_file():
        path = folder / path  # a name inside DIR
    if not path.is_file():
        raise DataError(f"{user.test_file}: test file not found")
    return path.resolve()


def _data_files(user: UserData, test: Path | None) -> list[Path]:
    source = user.source
    if source.is_file():
        return [source.resolve()]
    if not source.is_dir():
        raise DataError(f"{source}: no such folder or file")
    files = sorted(
        p.resolve()
        for p in source.iterdir()
        if p.is_file()
        and p.suffix.lower() in READERS
        and not p.name.startswith(".")
        and p.name != "manifest.json"
        and p.resolve() != test
    )
    if not files:
        raise DataError(f"{source}: no data files ({', '.join(READERS)})")
    return files


def _out_dir(user: UserData, out_root: Path) -> Path:
    source = user.source.resolve()
    out = (out_root / f"byod-{institution_name(source.stem)}").resolve()
    if (source.is_dir() and out.is_relative_to(source)) or source.is_relative_to(out):
        raise DataError(
            f"{out}: would lie inside {source} (or hold it); privatune never writes into a "
            "folder you name: run it from another folder"
        )
    return out


def _labels_of(frame: pd.DataFrame, path: Path, column: str) -> list[str]:
    if column not in frame.columns:
        raise DataError(
            f"{path}: column '{column}' not found "
            f"(columns: {', '.join(map(str, frame.columns))}); set --label-column"
        )
    missing = frame[column].isna()
    if missing.any():
        raise DataError(f"{path}: row {missing.idxmax()}: no label in column '{column}'")
    return [str(v).strip() for v in frame[column]]


def _split(user: UserData, path: Path, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One file's rows as institutions: by a column's values or by label skew."""
    from privatune.simulations.prepare import dirichlet_split

    if user.split_by:
        if user.split_by not in frame.columns:
            raise DataError(
                f"{path}: column '{user.split_by}' not found for --split-by "
                f"(columns: {', '.join(map(str, frame.columns))})"
            )
        if frame[user.split_by].isna().any():
            row = frame[user.split_by].isna().idxmax()
            raise DataError(f"{path}: row {row}: no value in column '{user.split_by}'")
        parts: dict[str, pd.DataFrame] = {}
        for value, part in frame.groupby(frame[user.split_by].astype(str).str.strip()):
            name = institution_name(value)
            if name in parts:
                raise DataError(f"{path}: two values of '{user.split_by}' both read as '{name}'")
            if len(part) < 2:
                raise DataError(
                    f"{path}: '{user.split_by}' = {value!r} has {len(part)} row; an "
                    "institution needs at least 2 (a training and an evaluation row)"
                )
            parts[name] = part
        return parts
    labels = _labels_of(frame, path, user.label_column)
    stem = institution_name(path.stem)
    split = dirichlet_split(
        pd.Series(labels).to_numpy(), user.institutions, user.dirichlet, user.seed
    )
    return {f"{stem}-{i:02d}": frame.iloc[idx] for i, idx in enumerate(split)}


def prepare_user_data(
    user: UserData, out_root: Path = OUT_ROOT, self_contained: bool = False
) -> Prepared:
    """Check the user's files, split one if asked, and write the manifest the clients read
    under ``out_root/byod-<name>/``; returns what the run needs. ``self_contained`` writes
    every institution's rows there as ``<name>.csv`` (as a split is), for tools that
    copy and extend the folder (``privatune canary``)."""
    splitting = bool(user.split_by) or user.dirichlet > 0 or user.institutions > 0
    if user.split_by and (user.dirichlet > 0 or user.institutions > 0):
        raise DataError("give either --split-by or --dirichlet with --institutions, not both")
    if not user.split_by and splitting and not (user.dirichlet > 0 and user.institutions >= 2):
        raise DataError("--dirichlet ALPHA (> 0) and --institutions N (>= 2) go together")
    if user.text_column == user.label_column:
        raise DataError(f"text and label column are both '{user.text_column}'")
    folder = user.source if user.source.is_dir() else user.source.parent
    test = _test_file(user, folder)
    files = _data_files(user, test)
    out = _out_dir(user, out_root)
    read = {path: read_table(path, user.encoding) for path in files}

    written: dict[str, pd.DataFrame] = {}
    if splitting:
        if len(files) != 1:
            raise DataError(
                f"{user.source}: splitting needs one data file, found "
                f"{', '.join(p.name for p in files)}; name the file, or the test file"
            )
        written = _split(user, files[0], read[files[0]])
        frames = {name: (out / f"{name}.csv", part) for name, part in written.items()}
    else:
        frames = {}
        for path, frame in read.items():
            name = institution_name(path.stem)
            if name in frames:
                raise DataError(f"{frames[name][0].name} and {path.name}: both institution {name}")
            frames[name] = (path, frame)
        if self_contained:
            written = {name: frame for name, (_, frame) in frames.items()}
            frames = {name: (out / f"{name}.csv", frame) for name, frame in written.items()}
    if len(frames) < 2:
        raise DataError(
            f"{user.source}: one institution; a federation needs two or more data files, "
            "or split one with --split-by COLUMN or --dirichlet ALPHA --institutions N"
        )

    observed = {n: _labels_of(f, p, user.label_column) for n, (p, f) in frames.items()}
    labels = list(user.labels)
    if not labels:
        found = {x for values in observed.values() for x in values}
        if test is not None:
            found |= set(_labels_of(read_table(test, user.encoding), test, user.label_column))
        labels = sorted(found)
        bad = [x for x in labels if "," in x or not x]
        if bad:
            raise DataError(f"label(s) {bad} cannot be named in data.labels (empty or a comma)")
        if len(labels) < 2:
            raise DataError(f"{user.source}: one label only ({labels}); nothing to classify")

    out.mkdir(parents=True, exist_ok=True)
    for name, part in written.items():
        part[[user.text_column, user.label_column]].to_csv(
            out / f"{name}.csv", index=False, encoding=user.encoding
        )
    for path in [p for p, _ in frames.values()] + ([test] if test else []):
        load_labeled(path, user.text_column, user.label_column, labels, user.encoding)
    manifest = {
        "source": f"user data, {user.source.resolve()}",
        "institutions": list(frames),
        "files": {n: str(p) for n, (p, _) in frames.items() if n not in written},
        "test": str(test) if test else None,
        "labels": labels,
        "seed": user.seed,
        "rows": {
            n: {"total": len(v), **pd.Series(v).value_counts().to_dict()}
            for n, v in observed.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Prepared(out, list(frames), labels, not user.labels, test)


def user_flat(
    prepared: Prepared,
    user: UserData,
    recipe: Mapping[str, Scalar] | None = None,
    overrides: Mapping[str, Scalar] | None = None,
) -> dict[str, Scalar]:
    """The run's flat config: defaults, a scenario's training recipe (``recipe``, its
    ``[config]`` without the data keys and node counts), the user's data, then ``--set``."""
    flat = {
        **app_defaults(),
        **{k: v for k, v in (recipe or {}).items() if not k.startswith(NOT_LENT)},
        "federation.min-available-nodes": len(prepared.names),
        "data.dir": str(prepared.data_dir),
        "data.test-path": str(prepared.test_file or ""),
        "data.text-column": user.text_column,
        "data.label-column": user.label_column,
        "data.labels": ",".join(prepared.labels),
        "data.encoding": user.encoding,
        **(overrides or {}),
    }
    if not flat["run.name"]:
        flat["run.name"] = f"{prepared.data_dir.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    RunConfig.from_flat(flat)
    return flat
