"""Reading an institution's file: every format, and a clear one-line error for bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from common.data import DataError, load_labeled, split_local

LABELS = ["negative", "neutral", "positive"]
ROWS = pd.DataFrame(
    {
        "review": ["Worked well.", "Awful side effects.", "It was fine."],
        "stars": ["positive", "negative", "neutral"],
    }
)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_each_format_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"site{suffix}"
    if suffix == ".csv":
        ROWS.to_csv(path, index=False)
    elif suffix == ".tsv":
        ROWS.to_csv(path, sep="\t", index=False)
    elif suffix == ".parquet":
        ROWS.to_parquet(path)
    else:
        ROWS.to_json(path, orient="records", lines=True)
    data = load_labeled(path, "review", "stars", LABELS)
    assert data.texts == list(ROWS["review"])
    assert data.labels.tolist() == [2, 0, 1]
    assert len(data.fingerprint) == 64


def _error(path, text="review", label="stars") -> str:
    with pytest.raises(DataError) as e:
        load_labeled(path, text, label, LABELS)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "a.csv"
    ROWS.to_csv(path, index=False)
    assert "column 'text'" in _error(path, text="text") and "data.text-column" in _error(
        path, "text"
    )


def test_unknown_label_names_row_and_value(tmp_path):
    path = tmp_path / "b.csv"
    ROWS.assign(stars=["positive", "great", "neutral"]).to_csv(path, index=False)
    message = _error(path)
    assert "row 1" in message and "'great'" in message and "'stars'" in message


@pytest.mark.parametrize("content", ["", "review,stars\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "c.csv"
    path.write_text(content)
    assert "empty" in _error(path) or "no rows" in _error(path)


def test_empty_text_non_utf8_and_unknown_format(tmp_path):
    path = tmp_path / "d.csv"
    ROWS.assign(review=["ok", "  ", "fine"]).to_csv(path, index=False)
    assert "empty text" in _error(path)
    latin = tmp_path / "e.csv"
    latin.write_bytes("review,stars\ncaf\xe9 ok,positive\n".encode("latin-1"))
    assert "UTF-8" in _error(latin)
    assert "unsupported format" in _error(tmp_path / "f.xlsx")
    assert "not found" in _error(tmp_path / "missing.csv")


def test_local_split_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "g.csv"
    pd.concat([ROWS] * 10).to_csv(path, index=False)
    data = load_labeled(path, "review", "stars", LABELS)
    a_train, a_eval = split_local(data, 0.2, seed=3)
    _, b_eval = split_local(data, 0.2, seed=3)
    assert a_eval.texts == b_eval.texts and len(a_eval) == 6 and len(a_train) == 24
