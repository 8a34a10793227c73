"""Property-based tests of the table loaders (hypothesis): random tables with mixed types,
missing cells, odd encodings and odd column names, written as CSV, JSON Lines or Parquet, are
either loaded consistently or refused with one autometa error line naming the file, never
another exception. Random bytes under a table's name are refused the same way.

Example counts are modest (the default run stays fast); ``HYPOTHESIS_PROFILE=thorough`` runs
many more.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from autometa.data.loading import load_dataset, load_for_prediction
from autometa.errors import DataError

settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Column names people and programs write: spaces, quotes, commas, line breaks, other scripts,
# numbers, words pandas reads as missing, pandas' own generated names.
ODD_NAMES = st.one_of(
    st.sampled_from(["x", "a b", " padded ", 'say "hi"', "a,b", "line\nbreak", "ünïcödé", "数据", "1", "1.0", "01",
                     "nan", "NA", "None", "null", "True", "Unnamed: 0", "x.1", "#hash", "-", "[1, 2]", "label"]),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
)
WORDS = st.sampled_from(["red", "green", "blue", "café", "naïve", "数据", "", " ", "NA", "None", "1", "2.5", "-3",
                         "true", "[1, 2]", "x,y", 'q"uote', "line\nbreak", "emoji 🙂"])


def column(rows: int) -> st.SearchStrategy[list]:
    """One column of ``rows`` cells of one of several kinds, with missing cells (None)."""
    def cells(values: st.SearchStrategy) -> st.SearchStrategy[list]:
        return st.lists(st.one_of(values, st.none()) if rows > 1 else values, min_size=rows, max_size=rows)

    return st.one_of(
        cells(st.integers(-10**6, 10**6)),
        cells(st.floats(allow_nan=True, allow_infinity=False, width=32)),
        cells(st.booleans()),
        cells(WORDS),
        cells(st.lists(WORDS, min_size=3, max_size=8).map(" ".join)),  # text
        cells(st.one_of(st.integers(0, 9), WORDS)),  # numbers and words mixed
        cells(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)),
    )


@st.composite
def tables(draw) -> tuple[pd.DataFrame, str]:
    """A table of 1-4 feature columns and a label column (classes a-d or small integers)."""
    rows = draw(st.integers(2, 25))
    names = draw(st.lists(ODD_NAMES, min_size=2, max_size=5, unique=True))
    label = draw(st.sampled_from(names))
    data = {name: draw(column(rows)) for name in names if name != label}
    classes = st.sampled_from(["a", "b", "c", "d"]) if draw(st.booleans()) else st.integers(0, 3)
    data[label] = draw(st.lists(st.one_of(classes, st.none()), min_size=rows, max_size=rows))
    return pd.DataFrame({n: pd.Series(v, dtype=object) for n, v in data.items()})[names], label


def write(frame: pd.DataFrame, folder: Path, fmt: str) -> Path | None:
    """``frame`` as a file of format ``fmt``; None when that writer cannot hold it."""
    if fmt.startswith("csv"):
        path = folder / "table.csv"
        encoding = {"csv": "utf-8", "csv-bom": "utf-8-sig", "csv-utf16": "utf-16", "csv-latin1": "latin-1"}[fmt]
        # pandas writes a carriage return inside a cell unquoted: no reader can tell it from a line end.
        frame = frame.map(lambda v: v.replace("\r", "") if isinstance(v, str) else v)
        try:
            path.write_bytes(frame.to_csv(index=False).encode(encoding))
        except UnicodeEncodeError:
            return None
        return path
    if fmt == "jsonl":
        path = folder / "table.jsonl"
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
        return path
    path = folder / "table.parquet"
    try:
        frame.to_parquet(path)
    except Exception:  # noqa: BLE001 - pyarrow cannot store a column of mixed types: not a file a user has
        return None
    return path


def load_or_refuse(path: Path, label: str, loader=load_dataset):
    """The loaded dataset, or None after checking the refusal is one autometa line naming the file."""
    try:
        return loader(path, label)
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        return None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@given(tables(), st.sampled_from(["csv", "csv-bom", "csv-utf16", "csv-latin1", "jsonl", "parquet"]))
def test_random_tables_are_loaded_consistently_or_refused_in_one_line(table, fmt):
    frame, label = table
    with tempfile.TemporaryDirectory() as folder:
        path = write(frame, Path(folder), fmt)
        assume(path is not None)
        dataset = load_or_refuse(path, label)
        if dataset is None:
            return
        again = load_dataset(path, label)
    # Every labelled row, in order, with its label as written; every other column, by its name.
    labelled = [v for v in frame[label] if not _missing(v)]
    assert dataset.label_column == label
    assert dataset.labels.tolist() == [str(v) for v in labelled]
    assert len(dataset.frame) == len(dataset) == len(labelled)
    expected = [n for n in frame.columns if n != label]
    if fmt.startswith("csv"):  # a CSV header cannot hold an empty name: pandas numbers it
        expected = [n or f"Unnamed: {i}" for i, n in enumerate(frame.columns) if n != label]
    assert [c.name for c in dataset.columns] == expected
    assert {c.modality for c in dataset.columns} <= {"tabular", "text", "image", "vector"}
    assert again.fingerprint == dataset.fingerprint  # loading is deterministic


@given(tables())
def test_the_encoding_of_a_csv_does_not_change_what_is_loaded(table):
    frame, label = table
    with tempfile.TemporaryDirectory() as folder:
        outcomes = []
        for fmt in ("csv", "csv-bom", "csv-utf16"):
            path = write(frame, Path(folder) / fmt, fmt) if (Path(folder) / fmt).mkdir() is None else None
            outcomes.append(load_or_refuse(path, label))
    if any(o is None for o in outcomes):
        assert all(o is None for o in outcomes)
        return
    assert len({o.fingerprint for o in outcomes}) == 1
    assert len({tuple(c.name for c in o.columns) for o in outcomes}) == 1


@given(tables())
def test_rows_predicted_are_read_like_the_training_rows(table):
    """load_for_prediction reads every row of a file with the training columns' types, or
    refuses it in one line (the unlabelled rows, unseen in training, may not fit those types)."""
    frame, label = table
    with tempfile.TemporaryDirectory() as folder:
        path = write(frame, Path(folder), "csv")
        dataset = load_or_refuse(path, label)
        assume(dataset is not None and not any(c.modality == "image" for c in dataset.columns))
        rows = load_or_refuse(path, label, loader=lambda p, _: load_for_prediction(p, dataset.columns))
    if rows is not None:
        assert len(rows) == len(frame)
        assert [c.name for c in rows.columns] == [c.name for c in dataset.columns]


@given(st.binary(max_size=400), st.sampled_from([".csv", ".jsonl", ".parquet", ".npz"]))
@settings(max_examples=60)
def test_random_bytes_are_refused_in_one_line(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content)
        load_or_refuse(path, "y")


@given(st.text(st.sampled_from('ab,"\n\r;\t 1.\\[]{}:é'), max_size=200), st.sampled_from([".csv", ".jsonl"]))
@settings(max_examples=60)
def test_random_text_is_loaded_or_refused_in_one_line(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_text(content, encoding="utf-8")
        load_or_refuse(path, "a")
