"""Reading an institution's file: every format, and a clear one-line error for bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from privatune.common.data import DataError, load_labeled, split_local

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
    message = _error(path, text="text")
    assert "column 'text'" in message and "set --text-column (data.text-column" in message


def test_unknown_label_names_row_and_value(tmp_path):
    path = tmp_path / "b.csv"
    ROWS.assign(stars=["positive", "great", "neutral"]).to_csv(path, index=False)
    message = _error(path)
    assert "row 1" in message and "'great'" in message and "'stars'" in message
    assert "--labels negative,neutral,positive,great (data.labels)" in message  # the fix


def test_the_first_bad_byte_offset_is_the_real_one(tmp_path):
    """pandas decodes in chunks and reported byte 0 for a bad byte further in."""
    path = tmp_path / "late.csv"
    head = b"review,stars\nok,positive\n" + b"fine words,neutral\n" * 3000
    path.write_bytes(head + b"caf\xe9,positive\n")
    assert f"at byte {len(head) + 3};" in _error(path)


def test_a_binary_file_is_named_as_such(tmp_path):
    path = tmp_path / "photo.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    assert "looks binary, not CSV" in _error(path)


def test_a_utf8_file_is_read_as_utf8_under_a_latin1_setting(tmp_path, caplog):
    """data.encoding applies to every file: a UTF-8 one beside a Latin-1 one keeps its text."""
    utf8, latin = tmp_path / "utf8.csv", tmp_path / "latin.csv"
    utf8.write_text("review,stars\nTrès bon café,positive\n", encoding="utf-8")
    latin.write_bytes("review,stars\nTrès bon café,positive\n".encode("latin-1"))
    for path in (utf8, latin):
        data = load_labeled(path, "review", "stars", LABELS, encoding="latin-1")
        assert data.texts == ["Très bon café"]
    assert "utf8.csv: valid UTF-8, read as UTF-8 instead of latin-1" in caplog.text
    assert "latin.csv" not in caplog.text


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


def test_local_split_moves_no_record_when_one_is_added(tmp_path):
    """DP-SGD's neighbouring training sets differ in one record: adding a record to the file
    must change the training split by that record at most."""
    rng = np.random.default_rng(0)
    texts = [f"review {i} " + " ".join(rng.choice(["good", "bad", "ok"], 5)) for i in range(400)]
    frame = pd.DataFrame({"review": texts, "stars": rng.choice(LABELS, 400)})
    frame.to_csv(tmp_path / "a.csv", index=False)
    pd.concat([frame, pd.DataFrame({"review": ["one more"], "stars": [LABELS[0]]})]).to_csv(
        tmp_path / "b.csv", index=False
    )
    a_train, a_eval = split_local(load_labeled(tmp_path / "a.csv", "review", "stars", LABELS), 0.2)
    b_train, b_eval = split_local(load_labeled(tmp_path / "b.csv", "review", "stars", LABELS), 0.2)
    assert set(a_train.texts) | set(a_eval.texts) == set(texts)
    assert not set(a_train.texts) & set(a_eval.texts)
    assert set(b_train.texts) - {"one more"} == set(a_train.texts)
    assert set(b_eval.texts) - {"one more"} == set(a_eval.texts)
    assert 0.15 < len(a_eval) / 400 < 0.25  # about eval-fraction
    tiny = load_labeled(tmp_path / "a.csv", "review", "stars", LABELS).subset(np.arange(2))
    # No record moves to fill an empty side (that would make the split depend on the others).
    assert [len(part) for part in split_local(tiny, 0.0)] == [2, 0]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_data_encoding_reads_latin1(tmp_path, suffix):
    rows = pd.DataFrame({"review": ["Très bon café", "Frais cachés"], "stars": LABELS[::2]})
    path = tmp_path / f"latin{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(
            rows.to_json(orient="records", lines=True, force_ascii=False).encode("latin-1")
        )
    else:
        rows.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False, encoding="latin-1")
    assert "data.encoding" in _error(path)
    data = load_labeled(path, "review", "stars", LABELS, encoding="latin-1")
    assert data.texts == list(rows["review"]) and data.labels.tolist() == [0, 2]
    with pytest.raises(DataError, match="unknown encoding"):
        load_labeled(path, "review", "stars", LABELS, encoding="no-such-codec")


def test_data_check_has_an_encoding_flag(tmp_path):
    from privatune.cli.main import app
    from typer.testing import CliRunner

    path = tmp_path / "latin.csv"
    path.write_bytes("review,stars\ncafé ok,positive\nbad,negative\n".encode("latin-1"))
    args = ["data", "check", str(path), "--text-column", "review", "--label-column", "stars"]
    args += ["--labels", "negative,neutral,positive"]
    assert CliRunner().invoke(app, args).exit_code == 2
    result = CliRunner().invoke(app, [*args, "--encoding", "latin-1"])
    assert result.exit_code == 0 and "2 rows, valid" in result.output


def _prepared(tmp_path, name: str, seed: int = 42):
    """Prepare a scenario into tmp_path; (manifest, institution frames, test frame, config)."""
    import json

    from privatune.common.config import resolve
    from privatune.simulations.prepare import prepare
    from privatune.simulations.scenario import load_scenario
    from privatune.simulations.simulate import resolve_flat

    scenario = load_scenario(name)
    out = prepare(scenario, seed=seed, out_dir=tmp_path / name)
    manifest = json.loads((out / "manifest.json").read_text())
    parts = {n: pd.read_csv(out / f"{n}.csv") for n in manifest["institutions"]}
    cfg = resolve(resolve_flat(scenario, {"run.name": "x"}))
    for n in manifest["institutions"]:  # every file reads as a client reads it
        load_labeled(out / f"{n}.csv", "text", "label", cfg.data.label_names)
    return manifest, parts, pd.read_csv(out / "test.csv"), cfg


def _check_split(manifest, parts, test, cfg, institutions, classes, rows):
    from privatune.simulations.prepare import MIN_ROWS

    train = pd.concat(parts.values())
    assert len(parts) == institutions and all(len(p) >= MIN_ROWS for p in parts.values())
    assert set(train["label"]) == set(test["label"]) == set(cfg.data.label_names)
    assert len(cfg.data.label_names) == classes
    assert len(train) + len(test) == rows and abs(len(test) / rows - 0.15) < 0.005
    assert not set(train["text"]) & set(test["text"])  # no test row in a training file
    assert not train["text"].duplicated().any()


def test_prepare_medical_specialties(tmp_path):
    manifest, parts, test, cfg = _prepared(tmp_path, "medical")
    assert list(parts) == [f"hospital-{i:02d}" for i in range(8)]
    _check_split(manifest, parts, test, cfg, institutions=8, classes=16, rows=9436)
    assert (cfg.model.max_length, cfg.train.batch_size, cfg.federation.rounds) == (48, 512, 30)
    assert cfg.dp.accountant == "prv"  # the recipe of docs/results.md
    assert (cfg.model.pooling, cfg.train.trainable, cfg.train.optimizer) == ("mean", "head", "sgd")
    again, *_ = _prepared(tmp_path / "again", "medical")
    other, *_ = _prepared(tmp_path / "other", "medical", seed=7)
    assert again["rows"] == manifest["rows"] != other["rows"]  # deterministic from run.seed


def test_prepare_complaints_by_company(tmp_path):
    from privatune.simulations.prepare import COMPANIES, named_company

    manifest, parts, test, cfg = _prepared(tmp_path, "complaints")
    _check_split(manifest, parts, test, cfg, institutions=8, classes=8, rows=25795)
    assert cfg.model.max_length == 128 and cfg.train.trainable == "head"
    owners = {c: n for n, r in manifest["rows"].items() for c in r.get("companies", {})}
    assert set(owners) == set(COMPANIES)  # each company has one institution
    assert len(set(owners.values())) == 8  # and every institution has one or two
    for name, part in parts.items():
        named = {c for c in named_company(part["text"]) if c}
        assert named == {c for c, n in owners.items() if n == name}
    bureau = parts[owners["Equifax"]]
    assert (bureau["label"] == "credit-reporting").mean() > 0.5
