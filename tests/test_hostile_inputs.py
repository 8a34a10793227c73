"""Malformed and hostile inputs: each gives one clear autometa error naming the file, column or
plugin and the fix (a one-line ``Error:`` with exit code 1 on the command line), or a FAILED
trial with its reason stored, and never corrupts or loses what a study database already holds.

Searches are tiny (a few steps, one or two trials, in-process) and processes are started only
where the case needs them (a memory read, processes opening one database together), so the
whole file runs in about a minute on two cores.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import autometa_builtins
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from autometa_builtins.fusions import FUSIONS
from click.testing import CliRunner
from helpers import make_distribution, open_storages_together
from optuna.trial import TrialState
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import autometa
from autometa.cli.main import cli
from autometa.components import Encoder, MetaAlgorithm
from autometa.data.loading import load_dataset, load_for_prediction
from autometa.data.preprocessing import MAX_TOKENS, tokenize
from autometa.data.protocols import make_split
from autometa.errors import DataError, ProtocolError, SearchError
from autometa.hookspecs import hookimpl
from autometa.plugins import PluginHost
from autometa.results.artifacts import ModelError

# The search engine module (``autometa.search`` is the function it defines).
study_module = importlib.import_module("autometa.study.engine")
search = study_module.search

ONLY_BUILTINS = {"meta_algorithm": ["protonet"], "fusion": ["concat"], "encoder.tabular": ["mlp"]}


def fast(**overrides):
    """Keyword arguments for a tiny search run in this process.

    In-process because a monkeypatched plugin registry does not reach worker processes, and
    starting them costs seconds per search.
    """
    kwargs = dict(steps=5, eval_every=5, progress=False, echo=lambda m: None, output=None, isolate=False)
    kwargs.update(overrides)
    return kwargs


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def table(n_per_class: int = 10, seed: int = 0) -> pd.DataFrame:
    """Three classes separated by two numeric columns (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(["a", "b", "c"], n_per_class)
    shift = np.repeat([0.0, 2.0, 4.0], n_per_class)
    return pd.DataFrame({"x": rng.normal(size=len(y)) + shift, "z": rng.normal(size=len(y)), "y": y})


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 1 from autometa's own handler, one ``Error:`` line (the last), no traceback."""
    assert result.exit_code == 1, result.output
    # A raw exception also exits 1 under CliRunner; autometa's handler exits through SystemExit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def cli_search(data: Path, db: str, *extra: str):
    return invoke("search", data, "--label", "y", "--db", db, "--trials", "1", "--steps", "5",
                  "--eval-every", "5", "--no-progress", "--output", data.parent / "out", *extra)


# ------------------------------------------------------------------------------ data files
def _parquet_bytes(names: tuple[str, ...] | None = None) -> bytes:
    buffer = io.BytesIO()
    if names is None:
        table().to_parquet(buffer)
    else:  # pandas cannot write repeated names; pyarrow can
        import pyarrow
        import pyarrow.parquet

        frame = table()
        pyarrow.parquet.write_table(pyarrow.table([pyarrow.array(frame[c]) for c in frame.columns], names=list(names)), buffer)
    return buffer.getvalue()


# (file name, content or a function making it, fragment the error must contain): one hostile file each.
BROKEN_FILES = [
    pytest.param("quote.csv", 'x,note,y\n1,"never closed,a\n2,fine,b\n3,ok,a\n',
                 "double quote opened in data row 1 is never closed", id="csv-unbalanced-quote"),
    pytest.param("ragged.csv", "x,z,y\n1,2,a\n2,3,b,4,5\n3,4,a\n",
                 "line 3 has 5 fields but the header names 3 columns", id="csv-ragged-row"),
    # Without care pandas turns the first column into the index and shifts every column.
    pytest.param("shifted.csv", "x,z,y\n1,2,a,9\n2,3,b,4\n3,4,a,3\n",
                 "line 2 has 4 fields but the header names 3 columns", id="csv-rows-longer-than-header"),
    pytest.param("garbage.csv", np.random.default_rng(7).bytes(4096), "holds binary data", id="binary-garbage-csv"),
    pytest.param("latin.csv", "name,y\ncaf\u00e9 noir,a\nna\u00efve,b\n".encode("latin-1"),
                 "not valid UTF-8 text (line 2, byte 0xe9", id="latin-1-csv"),
    pytest.param("archive.csv", gzip.compress(b"x,y\n1,a\n2,b\n"), "gzip-compressed", id="gzip-named-csv"),
    pytest.param("workbook.csv", b"PK\x03\x04" + bytes(200), "ZIP archive (an Excel .xlsx", id="xlsx-named-csv"),
    pytest.param("columns.csv", _parquet_bytes, "a Parquet file: rename it to .parquet", id="parquet-named-csv"),
    pytest.param("semicolons.csv", "x;z;y\n1;2;a\n3;4;b\n", "separated by semicolons", id="semicolon-csv"),
    pytest.param("cut.parquet", lambda: _parquet_bytes()[:-400], "not a complete Parquet file", id="truncated-parquet"),
    pytest.param("broken.jsonl", '{"x": 1, "y": "a"}\n{"x": 2, "y": "b"}\n{"x": 3, "y": \n{"x": 4, "y": "b"}\n',
                 "line 3 is not valid JSON", id="jsonl-broken-line"),
    pytest.param("arrays.jsonl", '{"x": 1, "y": "a"}\n[2, "b"]\n', "line 2 is a JSON list, not an object",
                 id="jsonl-line-not-an-object"),
    pytest.param("inf.csv", "x,y\n1,a\n2,b\ninf,a\n4,b\n-inf,a\n6,b\n",
                 "numeric column 'x' has 2 infinite value(s) (row 2, 4)", id="infinite-numbers"),
    pytest.param("vectors.csv", 'v,y\n"[1, 2]",a\n"[3, ""four""]",b\n"[5, 6]",a\n"[7, 8]",b\n',
                 "vector column 'v' has 1 cell(s) that are not a flat list of finite numbers", id="vector-cell-not-numbers"),
    pytest.param("punctuation.csv", "x,note,y\n1,!!!,a\n2,...,b\n3,?!,a\n4,--,b\n",
                 "text column 'note' has no words in any row", id="text-column-without-words"),
    # pandas renamed the second one 'x.1' (and a JSON object's repeated key kept the last value).
    pytest.param("twice.csv", "x,z,x,y\n1,2,3,a\n4,5,6,b\n", "2 columns are named 'x' (columns 1, 3)",
                 id="csv-duplicate-column"),
    pytest.param("dotted.csv", "x,x.1,x,y\n1,2,3,a\n4,5,6,b\n", "2 columns are named 'x' (columns 1, 3)",
                 id="csv-duplicate-column-beside-its-pandas-name"),
    pytest.param("twice.jsonl", '{"x": 1, "y": "a"}\n{"x": 2, "x": 5, "y": "b"}\n',
                 "line 2 names column 'x' twice", id="jsonl-duplicate-key"),
    pytest.param("twice.parquet", lambda: _parquet_bytes(("x", "x", "y")), "2 columns are named 'x' (columns 1, 2)",
                 id="parquet-duplicate-column"),
]


# Columns whose type inference would not pick the type under test.
OVERRIDES = {"vectors.csv": ("v", "vector"), "punctuation.csv": ("note", "text")}


@pytest.mark.parametrize("name, content, fragment", BROKEN_FILES)
def test_broken_data_file_is_one_clear_error(tmp_path, name, content, fragment):
    path = write(tmp_path / name, content() if callable(content) else content)
    before = path.read_bytes()
    columns = dict([OVERRIDES[name]]) if name in OVERRIDES else None
    with pytest.raises(DataError) as info:
        load_dataset(path, "y", columns=columns)
    message = str(info.value)
    assert str(path) in message and fragment in message
    assert "\n" not in message

    extra = ["--column", ":".join(OVERRIDES[name])] if name in OVERRIDES else []
    db = tmp_path / "studies.db"
    assert_one_line_error(cli_search(path, url(db), *extra), str(path), fragment)
    assert not db.exists()  # the data is checked before a database is touched
    assert path.read_bytes() == before


def test_utf16_with_byte_order_mark_reads_like_utf8(tmp_path):
    # A byte-order mark makes UTF-16 unambiguous (Excel's "Unicode text"): read it, do not refuse it.
    text = "name,x,y\ncaf\u00e9 noir,1,a\nna\u00efve,2,b\n\u00fcber,3,a\nstra\u00dfe,4,b\n"
    as_utf16 = load_dataset(write(tmp_path / "u16.csv", text.encode("utf-16")), "y", name="same")
    as_utf8 = load_dataset(write(tmp_path / "u8.csv", text.encode("utf-8")), "y", name="same")
    assert as_utf16.frame["name"].tolist()[0] == "caf\u00e9 noir"
    assert as_utf16.fingerprint == as_utf8.fingerprint


def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # would create the marker if anything unpickled it
            return (Path.touch, (marker,))

    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([Payload(), Payload()], dtype=object), y=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"evil\.npz: cannot be read as npz: .*allow_pickle=False"):
        load_dataset(path, "y")
    assert not marker.exists()


def test_pipe_named_csv_does_not_hang(tmp_path):
    fifo = tmp_path / "stream.csv"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load():
        try:
            load_dataset(fifo, "y")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    # Opening a FIFO with no writer blocks forever: run it where a hang cannot stop the suite.
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a FIFO named .csv hung"
    assert isinstance(outcome[0], DataError) and "not a regular file" in str(outcome[0])


def test_mixed_type_column_is_categorical(tmp_path):
    frame = table()
    frame["kind"] = (["1", "2", "apple", "7.5", "pear"] * 6)[: len(frame)]
    dataset = load_dataset(write(tmp_path / "mixed.csv", frame.to_csv(index=False)), "y")
    assert {c.name: (c.modality, c.kind) for c in dataset.columns}["kind"] == ("tabular", "categorical")


def test_all_empty_text_column(tmp_path):
    frame = table()
    frame["note"] = np.nan
    path = write(tmp_path / "empty.csv", frame.to_csv(index=False))
    with pytest.raises(DataError, match=r"column 'note' is entirely empty \(NaN\); drop it or pass --column note:ig"):
        load_dataset(path, "y", columns={"note": "text"})


def test_huge_text_cell_is_capped_in_time_and_memory(tmp_path):
    frame = table()
    frame["note"] = [f"plain short sentence number {i} here" for i in range(len(frame))]
    huge = " ".join(f"word{i % 5000}" for i in range(180_000))  # about 1.5 MB in one cell
    assert len(huge) > 1_000_000
    frame.loc[0, "note"] = huge
    path = write(tmp_path / "huge.csv", frame.to_csv(index=False))

    started = time.perf_counter()
    dataset = load_dataset(path, "y")
    split = make_split(dataset, "standard", seed=0)
    assert time.perf_counter() - started < 15
    assert split.pool.features.specs["text"].shape == (MAX_TOKENS,)

    tracemalloc.start()
    try:
        ids = tokenize(huge, "note")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids) == MAX_TOKENS
    # Only the first MAX_TOKENS words are read: no list of every word and bigram of the cell.
    assert peak < 4 * len(huge)


# -------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("protocol, fragment", [
    ("standard", "the standard protocol needs at least 3 rows per class"),
    ("fewshot", "the fewshot protocol with 5-way 5-shot episodes needs at least 15 classes"),
])
def test_every_class_has_one_example(tmp_path, protocol, fragment):
    frame = pd.DataFrame({"x": np.arange(30.0), "y": [f"class{i}" for i in range(30)]})
    path = write(tmp_path / "singletons.csv", frame.to_csv(index=False))
    with pytest.raises(ProtocolError, match=fragment):
        search(path, "y", protocol=protocol, db=url(tmp_path / "s.db"), **fast(trials=1))
    assert_one_line_error(cli_search(path, url(tmp_path / "s.db"), "--protocol", protocol), fragment)


def test_one_class_with_a_single_example(tmp_path):
    frame = table()
    frame.loc[len(frame)] = {"x": 0.0, "z": 0.0, "y": "lonely"}
    path = write(tmp_path / "lonely.csv", frame.to_csv(index=False))
    with pytest.raises(ProtocolError, match=r"class\(es\) 'lonely' of 'y' have fewer\. Drop or merge them"):
        make_split(load_dataset(path, "y"), "standard")

    # Few-shot: the singleton cannot fill an episode, so it is left out and the rest is used.
    rows = [{"x": float(i), "y": f"c{c}"} for c in range(9) for i in range(4)] + [{"x": 0.0, "y": "lonely"}]
    fewshot = write(tmp_path / "fewshot.csv", pd.DataFrame(rows).to_csv(index=False))
    split = make_split(load_dataset(fewshot, "y"), "fewshot", ways=2, shots=1, queries=2,
                       validation_tasks=2, test_tasks=2)
    assert all("lonely" not in classes for classes in split.class_splits.values())


# -------------------------------------------------------------------------------- images
def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header that claims 100000 × 100000 pixels (a decompression bomb)."""
    data = bytearray(_png(np.zeros((4, 4), np.uint8)))
    header = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def test_broken_images_are_named_row_by_row(tmp_path):
    rng = np.random.default_rng(0)
    good = _png(rng.integers(0, 256, (12, 12), dtype=np.uint8))
    files = {
        "ok0.png": good,
        "truncated.png": _png(rng.integers(0, 256, (40, 40), dtype=np.uint8))[:300],
        "notes.png": b"this is a text file, not an image\n",
        "bomb.png": _bomb_png(),
        "ok1.png": good,
        "ok2.png": good,
    }
    for name, content in files.items():
        write(tmp_path / "imgs" / name, content)
    paths = [f"imgs/{n}" for n in files] + ["imgs/missing.png"]
    frame = pd.DataFrame({"img": paths, "y": list("abababa")})
    path = write(tmp_path / "pics.csv", frame.to_csv(index=False))
    with pytest.raises(DataError) as info:
        load_dataset(path, "y")
    message = str(info.value)
    assert message.startswith(f"{path}: 4 of 7 images in column 'img' cannot be read, e.g. ")
    assert "row 1: imgs/truncated.png (OSError)" in message
    assert "row 2: imgs/notes.png (UnidentifiedImageError)" in message
    assert "row 3: imgs/bomb.png (DecompressionBombError)" in message
    assert_one_line_error(cli_search(path, url(tmp_path / "s.db")), "4 of 7 images in column 'img'")


def test_images_of_mixed_sizes_and_modes_are_resized(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 9, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (9, 8), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (5, 30), dtype=np.uint8)).convert("1").save(folder / "bits.png")
    Image.fromarray(rng.integers(0, 256, (20, 7, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 7, 2), dtype=np.uint8), "LA").save(folder / "la.png")
    # 16-bit and float greyscale: Pillow's own conversion would clip them to white / black.
    Image.fromarray(np.full((40, 12), 30_000, np.uint16)).save(folder / "deep.png")
    Image.fromarray(np.full((6, 6), 0.5, np.float32)).save(folder / "float.tiff")
    names = ["rgba.png", "palette.png", "bits.png", "cmyk.jpg", "la.png", "deep.png", "float.tiff"]
    frame = pd.DataFrame({"img": [f"imgs/{n}" for n in names], "y": list("abababa")})
    dataset = load_dataset(write(tmp_path / "pics.csv", frame.to_csv(index=False)), "y", image_size=(10, 10))
    images = dataset.images["img"]
    assert images.shape == (7, 10, 10, 3) and images.dtype == np.uint8
    assert abs(int(images[5].mean()) - round(30_000 / 65535 * 255)) <= 1
    assert abs(int(images[6].mean()) - 128) <= 1


# ------------------------------------------------------------------------------ databases
TRIAL_TABLES = ("trials", "trial_values", "trial_params", "trial_user_attributes", "trial_intermediate_values")


def snapshot(path: Path, tables=TRIAL_TABLES + ("studies", "study_user_attributes", "alembic_version")) -> dict:
    with closing(sqlite3.connect(path)) as connection:
        return {t: sorted(connection.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_study(tmp_path_factory):
    """A real study with two finished trials, its WAL folded into the database file."""
    folder = tmp_path_factory.mktemp("base")
    data = write(folder / "t.csv", table().to_csv(index=False))
    path = folder / "studies.db"
    result = search(data, "y", trials=2, db=url(path), include=ONLY_BUILTINS, **fast())
    assert [t.state for t in result.study.trials] == [TrialState.COMPLETE] * 2
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return SimpleNamespace(data=data, path=path, study=result.study.study_name, rows=snapshot(path))


@pytest.fixture
def study_copy(base_study, tmp_path) -> Path:
    path = tmp_path / "studies.db"
    shutil.copyfile(base_study.path, path)
    return path


def assert_study_intact(path: Path, base_study) -> None:
    """Every earlier row is still there, unchanged, and Optuna still opens the study."""
    assert snapshot(path) == base_study.rows
    trials = optuna.load_study(study_name=base_study.study, storage=url(path)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


def test_database_path_under_a_file(base_study, study_copy, tmp_path):
    # Tests run as root, which ignores folder permissions: a parent that is a regular file is the
    # unwritable location that holds for every user. Here it is the existing database itself.
    target = url(study_copy / "studies.db")
    before = digest(study_copy)
    with pytest.raises(SearchError, match=rf"{study_copy} is a file, not a folder"):
        search(base_study.data, "y", trials=1, db=target, include=ONLY_BUILTINS, **fast())
    assert_one_line_error(cli_search(base_study.data, target), "is a file, not a folder")
    assert digest(study_copy) == before
    assert_study_intact(study_copy, base_study)


def test_database_of_random_bytes_is_left_untouched(base_study, tmp_path):
    path = write(tmp_path / "studies.db", np.random.default_rng(3).bytes(20_000))
    before = digest(path)
    with pytest.raises(SearchError, match=rf"{re.escape(str(path))}.* SQLite database.*untouched"):
        search(base_study.data, "y", trials=1, db=url(path), include=ONLY_BUILTINS, **fast())
    assert_one_line_error(cli_search(base_study.data, url(path)), str(path), "SQLite database")
    assert_one_line_error(invoke("db", "studies", "--db", url(path)), str(path))
    assert digest(path) == before


def _damage_tables(path: Path) -> None:
    """Overwrite the root pages of the study and trial tables; the header and schema survive."""
    with closing(sqlite3.connect(path)) as connection:
        size = connection.execute("PRAGMA page_size").fetchone()[0]
        roots = [r for (r,) in connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name IN ('studies', 'trials', 'study_directions')")]
    data = bytearray(path.read_bytes())
    noise = np.random.default_rng(5).bytes(size)
    for root in roots:
        data[(root - 1) * size: root * size] = noise
    path.write_bytes(bytes(data))


def test_damaged_database_is_left_untouched(base_study, study_copy):
    _damage_tables(study_copy)
    before = digest(study_copy)
    with pytest.raises(Exception):  # noqa: B017 - what it raises is the next test's subject
        search(base_study.data, "y", trials=3, db=url(study_copy), include=ONLY_BUILTINS, **fast())
    assert digest(study_copy) == before


def test_damaged_database_is_one_clear_error(base_study, study_copy):
    _damage_tables(study_copy)
    with pytest.raises(SearchError, match=rf"{re.escape(str(study_copy))}.*(damaged|malformed)"):
        search(base_study.data, "y", trials=3, db=url(study_copy), include=ONLY_BUILTINS, **fast())
    assert_one_line_error(cli_search(base_study.data, url(study_copy)), str(study_copy))


def test_damaged_database_query_is_one_clear_error(base_study, study_copy):
    _damage_tables(study_copy)
    before = digest(study_copy)
    assert_one_line_error(invoke("db", "studies", "--db", url(study_copy)), str(study_copy))
    assert digest(study_copy) == before


def test_database_from_a_newer_schema(base_study, study_copy):
    with closing(sqlite3.connect(study_copy)) as connection:
        (current,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        connection.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
        connection.commit()
    expected = dict(base_study.rows, alembic_version=[("v99.0.0.a",)])
    with pytest.raises(SearchError, match=r"cannot open the study database .*(pip install -U optuna|newer)"):
        search(base_study.data, "y", trials=3, db=url(study_copy), include=ONLY_BUILTINS, **fast())
    assert_one_line_error(cli_search(base_study.data, url(study_copy)), "cannot open the study database")
    assert_one_line_error(invoke("db", "studies", "--db", url(study_copy)), "pip install -U optuna")
    assert snapshot(study_copy) == expected  # nothing upgraded, downgraded or rewritten
    with closing(sqlite3.connect(study_copy)) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (current,))
        connection.commit()
    assert_study_intact(study_copy, base_study)


@pytest.mark.parametrize("db", [
    "http://example.com/studies.db",
    "foo://bar",
    "studies.db",
])
def test_not_a_database_url(base_study, tmp_path, monkeypatch, db):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SearchError, match=re.escape(db)):
        search(base_study.data, "y", trials=1, db=db, include=ONLY_BUILTINS, **fast())
    assert_one_line_error(cli_search(base_study.data, db), db)
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_in_memory_database_is_refused(base_study):
    with pytest.raises(SearchError, match="in-memory"):
        search(base_study.data, "y", trials=1, db="sqlite://", include=ONLY_BUILTINS, **fast())


def test_other_data_under_an_existing_study_name(base_study, study_copy, tmp_path):
    other = write(tmp_path / "other.csv", table(seed=1).to_csv(index=False))
    with pytest.raises(SearchError, match="was created for other data"):
        search(other, "y", trials=3, db=url(study_copy), study=base_study.study, include=ONLY_BUILTINS, **fast())
    assert_study_intact(study_copy, base_study)


@pytest.mark.filterwarnings("ignore:.*out of (the )?range:UserWarning")
def test_diverging_trial_added_to_an_existing_study(base_study, study_copy):
    """A NaN-producing learning rate fails only its own trial; earlier trials are untouched."""
    study = optuna.load_study(study_name=base_study.study, storage=url(study_copy))
    # Far outside protonet's declared range: as if someone enqueued a bad configuration by hand.
    study.enqueue_trial({"meta_algorithm": "protonet", "fusion": "concat", "encoder.tabular": "mlp",
                         "meta.protonet.lr": 1e9})
    result = search(base_study.data, "y", trials=3, db=url(study_copy), include=ONLY_BUILTINS, **fast())
    trials = result.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert "training loss became nan" in trials[2].user_attrs["fail_reason"]
    earlier = {row[0] for row in base_study.rows["trials"]}
    now = snapshot(study_copy, TRIAL_TABLES)
    for name in TRIAL_TABLES:
        # trials' own id is its first column; the other trial tables hold it second.
        kept = [row for row in now[name] if row[0 if name == "trials" else 1] in earlier]
        assert kept == base_study.rows[name], name


# ---------------------------------------------------------------------------------- plugins
class InitFails(Encoder):
    """Constructs with the registration check's example input, not with real data."""

    name = "init_fails"
    modality = "tabular"

    def __init__(self, spec, *, width: int = 8):
        super().__init__()
        if spec.shape != (6,):
            raise ValueError("only six input features are supported")
        self.out_dim = width
        self.linear = nn.Linear(spec.shape[0], width)

    def forward(self, x):
        return self.linear(x)


class ForwardFails(Encoder):
    name = "forward_fails"
    modality = "tabular"

    def __init__(self, spec, *, width: int = 8):
        super().__init__()
        self.out_dim = width
        self.linear = nn.Linear(spec.shape[0], width)

    def forward(self, x):
        raise RuntimeError("cannot handle this batch")


class FlatOutput(Encoder):
    """Returns [batch] instead of [batch, out_dim]."""

    name = "flat_output"
    modality = "tabular"

    def __init__(self, spec, *, width: int = 8):
        super().__init__()
        self.out_dim = width
        self.linear = nn.Linear(spec.shape[0], width)

    def forward(self, x):
        return self.linear(x).sum(-1)


class _Simple(MetaAlgorithm):
    protocols = ("standard",)
    search_space = {}

    def setup(self, backbone, pool, shape):
        self.backbone = backbone

    def train_step(self, pool, rng):
        return 0.5

    def predict(self, task):
        return torch.zeros(task.query.shape[0], task.n_way)


class WrongShape(_Simple):
    name = "wrong_shape"

    def predict(self, task):
        return torch.zeros(task.query.shape[0])


class NanLogits(_Simple):
    name = "nan_logits"

    def predict(self, task):
        return torch.full((task.query.shape[0], task.n_way), float("nan"))


class NoLoss(_Simple):
    name = "no_loss"

    def train_step(self, pool, rng):
        return None


class HostilePlugin:
    @hookimpl
    def register_encoders(self, register):
        for cls in (InitFails, ForwardFails, FlatOutput):
            register(cls)

    @hookimpl
    def register_meta_algorithms(self, register):
        for cls in (WrongShape, NanLogits, NoLoss):
            register(cls)


@pytest.fixture(scope="module")
def hostile_registry():
    host = PluginHost(strict=False)
    assert host.add(autometa_builtins, "builtins") and host.add(HostilePlugin(), "hostile_plugin")
    registry = host.build_registry()
    assert not registry.problems, registry.problems
    return registry


@pytest.fixture
def plugin_search(hostile_registry, tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "get_registry", lambda: hostile_registry)
    data = write(tmp_path / "t.csv", table().to_csv(index=False))

    def run(include: dict, enqueue: list[dict] = (), trials: int = 1):
        db = url(tmp_path / "plugins.db")
        if enqueue:
            study = optuna.create_study(study_name="hostile", storage=db, direction="maximize")
            for params in enqueue:
                study.enqueue_trial(params)
        include = {"fusion": ["concat"], "encoder.tabular": ["mlp"], **include}
        result = search(data, "y", trials=trials, db=db, study="hostile", include=include, **fast())
        return result, result.study.get_trials()

    return run


def test_plugin_raising_in_init_fails_its_trial_only(plugin_search):
    result, trials = plugin_search(
        {"meta_algorithm": ["protonet"], "encoder.tabular": ["init_fails", "mlp"]},
        enqueue=[{"encoder.tabular": "init_fails"}, {"encoder.tabular": "mlp"}], trials=2,
    )
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    reason = trials[0].user_attrs["fail_reason"]
    assert "encoder 'init_fails' from plugin 'hostile_plugin' failed" in reason
    assert "only six input features are supported" in reason
    assert [e.trial for e in result.leaderboard] == [1]


def test_plugin_raising_in_forward_fails_the_trial(plugin_search):
    result, trials = plugin_search({"meta_algorithm": ["protonet"], "encoder.tabular": ["forward_fails"]})
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert "RuntimeError: cannot handle this batch" in trials[0].user_attrs["fail_reason"]
    assert result.leaderboard == []


def test_plugin_raising_in_forward_is_named(plugin_search):
    _, trials = plugin_search({"meta_algorithm": ["protonet"], "encoder.tabular": ["forward_fails"]})
    assert "encoder 'forward_fails' from plugin 'hostile_plugin'" in trials[0].user_attrs["fail_reason"]


@pytest.mark.parametrize("meta", ["protonet", "finetune"])
def test_encoder_returning_the_wrong_shape_fails_the_trial(plugin_search, meta):
    _, trials = plugin_search({"meta_algorithm": [meta], "encoder.tabular": ["flat_output"]})
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"]


def test_encoder_returning_the_wrong_shape_is_named(plugin_search):
    _, trials = plugin_search({"meta_algorithm": ["protonet"], "encoder.tabular": ["flat_output"]})
    reason = trials[0].user_attrs["fail_reason"]
    assert "encoder 'flat_output'" in reason and "shape" in reason


@pytest.mark.parametrize("meta, fragment", [
    ("wrong_shape", "meta-algorithm 'wrong_shape' predicted logits of shape (6,) for a task with 6 queries and 3 ways"),
    ("nan_logits", "meta-algorithm 'nan_logits' predicted non-finite logits (NaN or inf)"),
])
def test_meta_algorithm_predicting_garbage_fails_the_trial(plugin_search, meta, fragment):
    result, trials = plugin_search({"meta_algorithm": [meta]})
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert fragment in trials[0].user_attrs["fail_reason"]
    assert result.leaderboard == []


def test_meta_algorithm_returning_no_loss_is_named(plugin_search):
    _, trials = plugin_search({"meta_algorithm": ["no_loss"]})
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert "meta-algorithm 'no_loss'" in trials[0].user_attrs["fail_reason"]


# ----------------------------------------------------------------------------- saved models
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A model trained on a numeric and a mixed numbers-and-words column."""
    folder = tmp_path_factory.mktemp("model")
    frame = table(n_per_class=12)
    frame["kind"] = (["1", "2", "apple", "1", "pear", "2"] * 6)[: len(frame)]
    data = write(folder / "mixed.csv", frame.to_csv(index=False))
    result = search(data, "y", trials=1, db=url(folder / "s.db"),
                    include={"meta_algorithm": ["finetune"], "fusion": ["concat"], "encoder.tabular": ["mlp"]},
                    **fast(output=folder / "out"))
    assert result.model_path is not None
    return SimpleNamespace(path=result.model_path, frame=frame.drop(columns="y"))


@pytest.fixture
def model_copy(saved_model, tmp_path) -> Path:
    return Path(shutil.copytree(saved_model.path, tmp_path / "model"))


def edit_model(folder: Path, change) -> None:
    document = json.loads((folder / "model.json").read_text())
    change(document)
    (folder / "model.json").write_text(json.dumps(document))


def test_truncated_weights_file(model_copy, saved_model, tmp_path):
    weights = model_copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"weights\.safetensors: not a readable safetensors file"):
        autometa.load(model_copy)
    rows = write(tmp_path / "rows.csv", saved_model.frame.head(3).to_csv(index=False))
    assert_one_line_error(invoke("predict", model_copy, rows), "weights.safetensors")


def test_weights_of_another_model(model_copy, saved_model, tmp_path):
    save_file({"backbone.unrelated": torch.zeros(3)}, str(model_copy / "weights.safetensors"))
    with pytest.raises(ModelError, match=r"weights\.safetensors does not fit the rebuilt"):
        autometa.load(model_copy)
    rows = write(tmp_path / "rows.csv", saved_model.frame.head(3).to_csv(index=False))
    assert_one_line_error(invoke("predict", model_copy, rows), "it belongs to another model")


@pytest.mark.parametrize("change, fragment", [
    pytest.param(lambda d: d["config"]["encoders"].update(tabular="vanished"),
                 "the model needs encoder 'vanished', which is not installed", id="missing-encoder-in-config"),
    pytest.param(lambda d: d["plugins"]["encoder.tabular"].update(name="vanished", distribution="autometa-gone"),
                 "the model needs encoder 'vanished' from 'autometa-gone'", id="missing-encoder-in-plugins"),
    pytest.param(lambda d: d["config"]["encoder_params"]["tabular"].update(bogus=1),
                 "encoder.tabular 'mlp' cannot be rebuilt from model.json (TypeError", id="unknown-hyperparameter"),
    pytest.param(lambda d: d["config"]["encoder_params"]["tabular"].update(hidden=-5),
                 "encoder.tabular 'mlp' cannot be rebuilt from model.json (RuntimeError", id="impossible-hyperparameter"),
    pytest.param(lambda d: d.pop("specs"), "model.json is incomplete or was edited (missing 'specs')", id="missing-key"),
    pytest.param(lambda d: d["config"].update(encoders={"tabular": "mlp", "text": "hashbag"}),
                 "model.json is incomplete or was edited", id="extra-modality"),
])
def test_edited_model_json(model_copy, saved_model, tmp_path, change, fragment):
    edit_model(model_copy, change)
    with pytest.raises(ModelError) as info:
        autometa.load(model_copy)
    assert fragment in str(info.value) and str(model_copy) in str(info.value)
    rows = write(tmp_path / "rows.csv", saved_model.frame.head(3).to_csv(index=False))
    assert_one_line_error(invoke("predict", model_copy, rows), fragment)


def test_model_json_that_is_not_an_object(model_copy):
    (model_copy / "model.json").write_text("[1, 2, 3]")
    with pytest.raises(ModelError, match=r"model\.json: not an autometa model file"):
        autometa.load(model_copy)


def test_predict_names_mistyped_and_infinite_cells(saved_model, tmp_path):
    words = saved_model.frame.head(4).astype({"x": object})
    words.loc[2, "x"] = "large"
    path = write(tmp_path / "words.csv", words.to_csv(index=False))
    assert_one_line_error(invoke("predict", saved_model.path, path),
                          "column 'x' must be numeric as in training", "'large'")
    infinite = saved_model.frame.head(4).copy()
    infinite.loc[1, "x"] = np.inf
    path = write(tmp_path / "inf.csv", infinite.to_csv(index=False))
    assert_one_line_error(invoke("predict", saved_model.path, path), "column 'x' has 1 infinite value(s) (row 1)")
    with pytest.raises(DataError, match="infinite"):
        autometa.load(saved_model.path).predict(infinite)


def test_predict_reads_a_mixed_column_as_written(saved_model, tmp_path):
    # The mixed column holds only numbers (and a blank) in this file: "1" must stay the category
    # "1" seen in training, not become 1.0, an unknown category.
    rows = saved_model.frame.head(6).copy()
    rows["kind"] = ["1", "2", None, "1", "2", "1"]
    path = write(tmp_path / "numbers_only.csv", rows.to_csv(index=False))
    assert pd.read_csv(path)["kind"].dtype.kind == "f"
    model = autometa.load(saved_model.path)
    from_file = model.predict(path)
    from_frame = model.predict(rows)
    pd.testing.assert_frame_equal(from_file, from_frame)
    dataset = load_for_prediction(path, model.preprocessor.columns)
    assert dataset.frame["kind"].tolist()[:2] == ["1", "2"]


# ------------------------------------------------------------------------------- db sql
@pytest.fixture
def small_db(tmp_path) -> str:
    path = tmp_path / "small.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE trials (number INTEGER)")
        connection.executemany("INSERT INTO trials VALUES (?)", [(i,) for i in range(10)])
        connection.commit()
    return url(path)


def test_db_sql_refuses_a_value_larger_than_the_output_cap(small_db):
    started = time.perf_counter()
    result = invoke("db", "sql", "SELECT randomblob(1000000000)", "--db", small_db, "--timeout", "5")
    assert time.perf_counter() - started < 5  # refused as the value is made, not after 42 s
    assert_one_line_error(result, "larger than 10,000,000 bytes (the --max-bytes cap)", "--max-bytes")
    assert result.stdout == ""
    # Under a raised cap it is read (and printed in hex).
    result = invoke("db", "sql", "SELECT randomblob(3000000) AS blob", "--db", small_db, "--max-bytes", "7000000")
    assert result.exit_code == 0 and len(result.stdout) > 6_000_000


def test_db_sql_output_stops_at_the_byte_cap_and_says_how_to_raise_it(small_db):
    many = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 300) "
            "SELECT x, hex(zeroblob(50000)) AS filler FROM c")
    result = invoke("db", "sql", many, "--db", small_db, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert 9_000_000 < len(result.stdout.encode()) <= 10_000_000 + 1000
    assert "--max-bytes N for more" in result.stderr and "output stopped after 99 row(s)" in result.stderr
    result = invoke("db", "sql", many, "--db", small_db, "--format", "csv", "--max-bytes", "1000000")
    assert len(result.stdout.splitlines()) == 1 + 9
    result = invoke("db", "sql", many, "--db", small_db, "--format", "csv", "--max-bytes", "40000000")
    assert len(result.stdout.splitlines()) == 1 + 300 and result.stderr == ""


@pytest.mark.parametrize("timeout", ["nan", "0", "-1", "inf", "-inf"])
def test_db_sql_refuses_a_timeout_that_is_not_a_positive_number(small_db, timeout):
    # nan compared false with the deadline, so it disabled the timeout.
    result = invoke("db", "sql", "SELECT 1", "--db", small_db, "--timeout", timeout)
    assert_one_line_error(result, f"--timeout {float(timeout)}: give a positive number of seconds")


def test_db_sql_prints_no_memory_address(small_db):
    for statement in ("SELECT fts3_tokenizer('simple')", "SELECT hex(FTS3_TOKENIZER('porter'))"):
        result = invoke("db", "sql", statement, "--db", small_db)
        assert_one_line_error(result, "the function", "is not allowed")
        assert result.stdout == ""


def test_db_sql_peak_memory_on_randomblob_stays_small():
    """The figures of benchmarks/db_sql_memory.py's randomblob case (printed with -s)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "db_sql_memory.py"
    run = subprocess.run([sys.executable, str(script), "--case", "randomblob", "--json"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    print(f"db sql randomblob(1e9): {figures}")
    assert figures["outcome"].startswith("refused: a value in the result is larger than")
    assert figures["cost_mb"] < 200 and figures["seconds"] < 5


# ------------------------------------------------------------- searches started together
def test_processes_opening_a_new_sqlite_file_together_all_succeed(tmp_path):
    # Optuna creates its tables without a lock: all but one failed with "table studies already exists".
    for attempt in range(3):
        assert open_storages_together(url(tmp_path / f"new{attempt}.db")) == ["ok"] * 4
    assert {p.name for p in tmp_path.glob("*.db")} == {"new0.db", "new1.db", "new2.db"}
    assert not list(tmp_path.glob("*.lock"))  # the lock leaves nothing beside the database


# --------------------------------------------------------------- files land where the user said
@pytest.mark.parametrize("study", ["../../escaped", "/tmp/absolute", "a/../../b", ".."])
def test_a_study_name_cannot_put_the_model_outside_the_output_folder(tmp_path, study):
    work = tmp_path / "one" / "two"
    data = write(work / "t.csv", table().to_csv(index=False))
    output = work / "out"
    result = search(data, "y", trials=1, db=url(work / "s.db"), study=study, include=ONLY_BUILTINS,
                    **fast(output=output))
    assert result.model_path is not None and result.model_path.resolve().parent == output.resolve()
    assert (result.model_path / "model.json").is_file()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir()) == sorted(
        ["one", "two", "out", result.model_path.name])
    assert result.study.study_name == study  # the study keeps its name; only the folder is made safe


def test_predict_refuses_to_overwrite_its_input_files(saved_model, tmp_path):
    rows = write(tmp_path / "rows.csv", saved_model.frame.head(3).to_csv(index=False))
    before = rows.read_bytes()
    assert_one_line_error(invoke("predict", saved_model.path, rows, "--output", rows),
                          f"--output {rows} is the data file {rows}", "give another --output file")
    link = tmp_path / "link.csv"
    link.symlink_to(rows)
    assert_one_line_error(invoke("predict", saved_model.path, rows, "--output", link), "is the data file")
    support = write(tmp_path / "support.csv", table().head(6).to_csv(index=False))
    assert_one_line_error(invoke("predict", saved_model.path, rows, "--support", support, "--output", support),
                          "is the --support file")
    assert_one_line_error(invoke("predict", saved_model.path, rows, "--output", saved_model.path / "model.json"),
                          "is the model file")
    assert rows.read_bytes() == before


def test_predict_output_in_a_missing_folder_is_one_clear_error(saved_model, tmp_path):
    rows = write(tmp_path / "rows.csv", saved_model.frame.head(3).to_csv(index=False))
    target = tmp_path / "missing_dir" / "x.csv"
    assert_one_line_error(invoke("predict", saved_model.path, rows, "--output", target),
                          f"folder {target.parent} does not exist", "mkdir -p")
    assert_one_line_error(invoke("predict", saved_model.path, rows, "--output", tmp_path), "is a folder; give a file in it")
    assert_one_line_error(invoke("predict", saved_model.path, rows, "--output", rows / "x.csv"), "is a file, not a folder")
    assert not target.parent.exists()
    written = invoke("predict", saved_model.path, rows, "--output", tmp_path / "p.json")
    assert written.exit_code == 0 and len(json.loads((tmp_path / "p.json").read_text())) == 3


def test_worker_refuses_a_database_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("worker", "--db", "sqlite:///typo.db", "--study", "s"),
                          "no study database at sqlite:///typo.db", "pass the --db URL the search used")
    assert not list(tmp_path.iterdir())  # no empty database was created
    with closing(sqlite3.connect(tmp_path / "other.db")) as connection:
        connection.execute("CREATE TABLE notes (x INTEGER)")
    before = digest(tmp_path / "other.db")
    assert_one_line_error(invoke("worker", "--db", "sqlite:///other.db", "--study", "s"),
                          "sqlite:///other.db holds no Optuna studies")
    assert digest(tmp_path / "other.db") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def _deeply_nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_model_json_is_a_clear_error(model_copy, saved_model, tmp_path):
    (model_copy / "model.json").write_text(_deeply_nested())
    with pytest.raises(ModelError, match=r"model\.json: nested too deeply to be an autometa model file"):
        autometa.load(model_copy)
    rows = write(tmp_path / "rows.csv", saved_model.frame.head(3).to_csv(index=False))
    assert_one_line_error(invoke("predict", model_copy, rows), "nested too deeply")


def test_deeply_nested_or_edited_warm_start_prior_is_a_clear_error(tmp_path):
    from autometa.store.knowledge import prior_experiences

    deep = write(tmp_path / "deep.json", _deeply_nested())
    with pytest.raises(SearchError, match=r"deep\.json: not a readable warm-start prior \(nested too deeply\)"):
        prior_experiences(deep)
    shipped = json.loads(Path(autometa.store.PRIOR_PATH).read_text())
    del shipped["datasets"][0]["fingerprint"]
    edited = write(tmp_path / "edited.json", json.dumps(shipped))
    with pytest.raises(SearchError, match=r"edited\.json: an incomplete or edited warm-start prior \(missing 'fingerprint'\)"):
        prior_experiences(edited)


# -------------------------------------------------------------- one plugin cannot take others down
CLASHING_PLUGIN = '''
from torch import nn

from autometa import Fusion, hookimpl
from autometa_builtins.fusions import FUSIONS

CONCAT = next(cls for cls in FUSIONS if cls.name == "concat")


class Impostor(CONCAT):
    """Claims the built-in's name."""


class Extra(CONCAT):
    name = "{extra}"


@hookimpl
def register_fusions(register):
    register(Impostor)
    register(Extra)
'''


def test_a_plugin_claiming_a_builtin_name_loses_that_component_only(tmp_path, monkeypatch, fresh_registry):
    make_distribution(tmp_path, "clash_plugin", "autometa-clash", "3.1.4", "aaa_clash",
            CLASHING_PLUGIN.replace("{extra}", "clash_extra"))
    monkeypatch.syspath_prepend(str(tmp_path))  # found before autometa itself: it used to load first and win
    registry = autometa.plugins.get_registry()
    builtin_names = {cls.name for cls in FUSIONS}
    assert {name for name, info in registry.components["fusion"].items() if info.plugin == "builtins"} == builtin_names
    assert registry.get("fusion", "concat").cls.__module__.startswith("autometa_builtins")
    assert registry.get("fusion", "clash_extra").plugin == "aaa_clash"  # the rest of the plugin works
    assert registry.problems == [
        "plugin 'aaa_clash' (autometa-clash 3.1.4): fusion name 'concat' is already registered by plugin 'builtins'; "
        "choose another name"
    ]
    data = write(tmp_path / "t.csv", table().to_csv(index=False))
    result = search(data, "y", trials=1, db=url(tmp_path / "s.db"), include=ONLY_BUILTINS, **fast())
    assert [t.state for t in result.study.trials] == [TrialState.COMPLETE]


def test_plugins_clashing_with_each_other_resolve_in_a_fixed_order(tmp_path, monkeypatch, fresh_registry):
    # Entry-point name decides, not where importlib.metadata happens to find each distribution.
    for first, second in (("a", "b"), ("b", "a")):
        autometa.plugins.reset()
        root = tmp_path / f"{first}{second}"
        for folder, (module, ep) in ((first, ("mod_one", "one")), (second, ("mod_two", "two"))):
            (root / folder).mkdir(parents=True)
            make_distribution(root / folder, f"{module}_{first}{second}", f"dist-{ep}", "1.0", ep,
                    CLASHING_PLUGIN.replace("{extra}", "shared_name"))
        with monkeypatch.context() as patch:
            patch.syspath_prepend(str(root / second))
            patch.syspath_prepend(str(root / first))
            registry = autometa.plugins.get_registry()
        assert registry.get("fusion", "shared_name").plugin == "one", (first, second)
        assert any(p.startswith("plugin 'two' (dist-two 1.0): fusion name 'shared_name' is already registered by "
                                "plugin 'one'") for p in registry.problems), registry.problems


BROKEN_PLUGIN = 'raise ImportError("needs frobnicate")\n'

TYPO_PLUGIN = '''
from autometa import hookimpl


@hookimpl
def register_fusion(register):
    pass
'''


def test_plugins_by_plugin_lists_failed_plugins_with_their_reason(tmp_path, monkeypatch, fresh_registry):
    make_distribution(tmp_path, "broken_mod", "autometa-broken", "0.2.0", "broken", BROKEN_PLUGIN)
    make_distribution(tmp_path, "typo_mod", "autometa-typo", "0.3.0", "typo", TYPO_PLUGIN)
    make_distribution(tmp_path, "clash_mod", "autometa-clash", "1.0.0", "clash", CLASHING_PLUGIN.replace("{extra}", "clash_extra"))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("plugins", "--by", "plugin", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {row["plugin"]: row for row in json.loads(result.stdout)}
    assert rows["builtins"]["status"] == "loaded" and rows["builtins"]["problems"] == []
    assert (rows["broken"]["status"], rows["broken"]["distribution"], rows["broken"]["version"]) == (
        "failed", "autometa-broken", "0.2.0")
    assert rows["broken"]["problems"] == [
        "plugin 'broken' (from autometa-broken 0.2.0) failed to import broken_mod: ImportError: needs frobnicate"]
    assert rows["typo"]["status"] == "failed"
    [typo] = rows["typo"]["problems"]
    # The misspelled-hook warning names the distribution, its version and the hook meant.
    assert typo.startswith("plugin 'typo' (from autometa-typo 0.3.0) implements an unknown hook: "
                           "'register_fusion' (did you mean 'register_fusions'?)")
    assert rows["clash"]["status"] == "loaded" and rows["clash"]["components"]["fusion"] == ["clash_extra"]
    assert "fusion name 'concat' is already registered by plugin 'builtins'" in rows["clash"]["problems"][0]
    table_lines = invoke("plugins", "--by", "plugin").stdout.splitlines()
    broken = next(line for line in table_lines if line.startswith("broken "))
    assert "failed; plugin 'broken' (from autometa-broken 0.2.0) failed to import" in broken


COMMANDS_PLUGIN = '''
import click

from autometa import hookimpl


@hookimpl
def register_commands(cli):
    @cli.command("search")
    def search():
        click.echo("hijacked")

    @cli.command("{name}")
    def extra():
        click.echo("extra")
'''


def test_a_plugin_cannot_replace_or_break_the_commands(tmp_path, monkeypatch, fresh_registry):
    make_distribution(tmp_path, "hijack_mod", "autometa-hijack", "1.0", "hijack", COMMANDS_PLUGIN.replace("{name}", "hijack-extra"))
    make_distribution(tmp_path, "raising_mod", "autometa-raising", "1.0", "raising",
            "from autometa import hookimpl\n\n@hookimpl\ndef register_commands(cli):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import click

    from autometa.cli.main import cli as real

    group = click.Group("autometa", commands=dict(real.commands))  # not the real one: a test must not add to it
    autometa.plugins.default_host().add_commands(group)
    assert group.commands["search"] is real.commands["search"]
    assert "hijack-extra" not in group.commands  # the plugin's commands are skipped together
    problems = autometa.plugins.default_host().problems
    assert "plugin 'hijack' (from autometa-hijack 1.0): register_commands: command(s) search exist already" in problems[0]
    assert "plugin 'raising' (from autometa-raising 1.0): register_commands: RuntimeError: boom" in problems[1]


# ------------------------------------------------------------------- silent outcomes said aloud
def test_a_search_whose_every_trial_failed_exits_non_zero_with_the_reasons_counted(hostile_registry, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(study_module, "get_registry", lambda: hostile_registry)
    data = write(tmp_path / "t.csv", table().to_csv(index=False))
    db = url(tmp_path / "s.db")
    result = cli_search(data, db, "--in-process", "--trials", "2", "--meta-algorithm", "nan_logits", "--fusion", "concat",
                        "--encoder", "tabular=mlp", "--no-warm-start")
    line = assert_one_line_error(
        result, "no trial of study 't-standard-",
        "completed: 2 failed: meta-algorithm 'nan_logits' predicted non-finite logits (NaN or inf)",
        "`autometa db trials t-standard-", f"--db {db}` lists every trial with its reason")
    assert "Leaderboard" not in result.stdout and not (tmp_path / "out").exists()
    assert line.count("failed:") == 1  # one reason, counted, not listed twice


def test_read_commands_warn_about_a_database_from_a_newer_autometa(base_study, study_copy, caplog):
    from autometa.store import schema

    with closing(sqlite3.connect(study_copy)) as connection:
        connection.execute("UPDATE autometa_schema SET version = ?", (schema.SCHEMA_VERSION + 1,))
        connection.commit()
    before = digest(study_copy)
    schema._warned_newer.discard(url(study_copy))  # noqa: SLF001 - warned once per process
    caplog.set_level("WARNING", logger="autometa.store.schema")
    for command in (["studies"], ["trials", base_study.study], ["leaderboard", base_study.study], ["datasets"],
                    ["sql", "SELECT count(*) AS n FROM trials"]):
        schema._warned_newer.clear()  # noqa: SLF001
        caplog.clear()
        result = invoke("db", *command, "--db", url(study_copy))
        assert result.exit_code == 0, (command, result.output)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, (command, warnings)
        assert f"{url(study_copy)} was written by a newer autometa (autometa schema version {schema.SCHEMA_VERSION + 1}, " \
               f"this one knows {schema.SCHEMA_VERSION})" in warnings[0] and "pip install -U autometa" in warnings[0]
    assert digest(study_copy) == before
    # Writing commands refuse it, as before.
    assert_one_line_error(cli_search(base_study.data, url(study_copy)), "newer autometa", "the database was not changed")


def test_search_output_under_a_file_is_refused_before_any_trial(tmp_path):
    data = write(tmp_path / "t.csv", table().to_csv(index=False))
    blocker = write(tmp_path / "notes.txt", "not a folder\n")
    with pytest.raises(SearchError, match=rf"--output {re.escape(str(blocker))}/models: {re.escape(str(blocker))} is a "
                                          r"file, not a folder; pass another --output"):
        search(data, "y", trials=1, db=url(tmp_path / "s.db"), include=ONLY_BUILTINS, **fast(output=blocker / "models"))
    assert not (tmp_path / "s.db").exists()  # refused before the study was made


def test_a_file_a_command_cannot_write_is_one_line_naming_it(tmp_path, base_study):
    blocker = write(tmp_path / "notes.txt", "not a folder\n")
    result = invoke("kb", "export", blocker / "prior.json", "--db", url(base_study.path))
    assert_one_line_error(result, str(blocker), "check the path")
