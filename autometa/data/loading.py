"""Loading a table into a typed Dataset: columns inferred as tabular, text, image or vector.

Supported files: CSV, Parquet, JSON Lines (``.jsonl``/``.ndjson``) and ``.npz`` arrays.
Column types can be overridden with ``{"col": "text"}`` (CLI ``--column col:text``) or a
``<data file>.toml`` beside the data holding a ``[columns]`` table; ``ignore`` drops a column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shlex
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import tomllib
from PIL import Image, UnidentifiedImageError

from autometa.errors import DataError, one_line
from autometa.inputs import MODALITIES

COLUMN_TYPES = MODALITIES + ("ignore",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TABLE_SUFFIXES = {".csv", ".parquet", ".pq", ".jsonl", ".ndjson", ".npz"}


@dataclass
class Column:
    name: str
    modality: str  # one of MODALITIES
    kind: str = ""  # tabular: "numeric" | "categorical"


@dataclass
class Dataset:
    """A loaded table: feature columns by modality, labels, optional groups, decoded images."""

    name: str
    path: Path
    frame: pd.DataFrame  # feature columns only, original row order
    labels: np.ndarray  # label per row, as strings
    columns: list[Column]
    label_column: str
    groups: np.ndarray | None = None
    group_column: str | None = None
    images: dict[str, np.ndarray] = field(default_factory=dict)  # column -> uint8 [N, H, W, C]
    fingerprint: str = ""
    unlabelled: int = 0  # rows of the file left out for an empty label cell

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()))

    @property
    def modalities(self) -> list[str]:
        present = {c.modality for c in self.columns}
        return [m for m in MODALITIES if m in present]

    def columns_of(self, modality: str) -> list[Column]:
        return [c for c in self.columns if c.modality == modality]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> "Dataset":
        """The dataset of ``rows`` only (same name, columns and fingerprint)."""
        return replace(
            self, frame=self.frame.iloc[rows].reset_index(drop=True), labels=self.labels[rows],
            groups=None if self.groups is None else self.groups[rows],
            images={name: pixels[rows] for name, pixels in self.images.items()},
        )

    def summary(self) -> str:
        parts = [f"{m}: {_listed(c.name for c in self.columns_of(m))}" for m in self.modalities]
        return (
            f"{self.name}: {len(self)} rows"
            + (f" ({self.unlabelled} more without a label left out)" if self.unlabelled else "")
            + f", {len(self.classes)} classes of {self.label_column!r}"
            + (f", {len(set(self.groups.tolist()))} groups of {self.group_column!r}" if self.groups is not None else "")
            + "; " + "; ".join(parts)
        )


def parse_column_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse CLI ``NAME:TYPE`` items into a mapping, with a clear error for bad ones."""
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, kind = item.rpartition(":")
        if not sep or not name or kind not in COLUMN_TYPES:
            raise DataError(
                f"--column {item!r}: expected NAME:TYPE with TYPE one of {', '.join(COLUMN_TYPES)}"
            )
        overrides[name] = kind
    return overrides


def read_table(path: Path, strings: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a data file into a DataFrame; every failure names the file and the fix.

    ``strings``: CSV columns to keep as the text written in the file (no number parsing).
    """
    if not path.exists():
        raise DataError(f"data file not found: {path} (check the path; it is read relative to {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the table file inside it (CSV, Parquet, JSON Lines or .npz)")
    if not path.is_file():
        # A FIFO or device (e.g. a link to /dev/urandom) would block or never end.
        raise DataError(f"{path} is not a regular file (a pipe or device?); save the table to a file first")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unknown format {suffix or '(no extension)'!r}; use .csv, .parquet, .jsonl/.ndjson or .npz"
        )
    encoding = _text_encoding(path) if suffix in (".csv", ".jsonl", ".ndjson") else None
    try:
        if suffix == ".csv":
            frame = _read_csv(path, encoding, strings)
        elif suffix in (".parquet", ".pq"):
            import pyarrow.parquet  # pandas' Parquet engine

            _refuse_duplicate_names(path, pyarrow.parquet.read_schema(path).names)  # else pyarrow fails on them
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".ndjson"):
            frame = _read_jsonl(path, encoding)
        else:
            frame = _read_npz(path)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {_where_not_utf8(path)}; re-save it as UTF-8") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty: add a header row and at least one data row") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: {_csv_problem(str(exc))}") from exc
    except Exception as exc:
        if suffix in (".parquet", ".pq") and "magic bytes" in str(exc):
            raise DataError(
                f"{path} is not a complete Parquet file (truncated or damaged: its footer is missing); "
                "write or download it again"
            ) from exc
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {type(exc).__name__}: {one_line(exc, limit=None)}") from exc
    if frame.empty or len(frame.columns) == 0:
        raise DataError(f"{path} has no data rows (only a header?); add at least one row per example")
    frame.columns = [str(c) for c in frame.columns]
    _refuse_duplicate_names(path, list(frame.columns))
    return frame


def _refuse_duplicate_names(path: Path, names: list[str]) -> None:
    """Two columns of one name would be renamed (pandas: ``a``, ``a.1``) or merged silently."""
    seen: dict[str, list[int]] = {}
    for position, name in enumerate(names, start=1):
        if name != "":  # empty header cells are named by position ("Unnamed: 3"), not merged
            seen.setdefault(name, []).append(position)
    for name, positions in seen.items():
        if len(positions) > 1:
            raise DataError(
                f"{path}: {len(positions)} columns are named {name!r} (columns {', '.join(map(str, positions))}); "
                "give each column its own name"
            )


# Leading bytes of formats people save under a table's name by mistake.
_MAGIC = (
    (b"PAR1", "a Parquet file: rename it to .parquet"),
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx workbook?): export the sheet as CSV"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first (gunzip)"),
    (b"SQLite format 3\x00", "an SQLite database, not a table: export the table as CSV"),
    (b"\x89PNG", "a PNG image, not a table"),
    (b"%PDF", "a PDF document, not a table"),
    (b"\x93NUMPY", "a NumPy .npy array: save it with numpy.savez as .npz"),
)
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _text_encoding(path: Path) -> str | None:
    """The encoding to read a text table with, or a DataError for binary content."""
    with open(path, "rb") as handle:
        head = handle.read(8192)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path} is {what}")
    if head.startswith(_UTF16_BOMS):
        # A byte-order mark makes UTF-16 unambiguous (Excel's "Unicode text" export); its text
        # may not hold NUL characters either, as UTF-8 text may not (below).
        if "\x00" in head[: len(head) // 2 * 2].decode("utf-16", errors="replace"):
            raise DataError(f"{path} holds NUL characters, not {path.suffix[1:].upper()} text; export it as UTF-8 text")
        return "utf-16"
    if b"\x00" in head:
        raise DataError(
            f"{path} holds binary data (NUL bytes), not {path.suffix[1:].upper()} text "
            "(UTF-16 without a byte-order mark?); export it as UTF-8 text"
        )
    return None


def _where_not_utf8(path: Path) -> str:
    """Which line first breaks UTF-8, and what the file probably is."""
    with open(path, "rb") as handle:
        data = handle.read(64 * 2**20)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start]
        guess = ": Latin-1 or Windows-1252?" if byte >= 0x80 else ""
        return f"not valid UTF-8 text (line {line}, byte 0x{byte:02x}{guess})"
    return "not valid UTF-8 text"


def _read_csv(path: Path, encoding: str | None, strings: tuple[str, ...] = ()) -> pd.DataFrame:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        # index_col=False: rows longer than the header must not silently become the index.
        frame = pd.read_csv(path, encoding=encoding, index_col=False, dtype={c: str for c in strings} or None)
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        width = len(frame.columns)
        where = _first_long_row(path, encoding, width) or f"some rows have more fields than the {width} the header names"
        raise DataError(f"{path}: {where}; quote cells that contain commas, or name every column in the header")
    # The header as written: pandas has renamed a repeated name (a, a.1) by now.
    header = pd.read_csv(path, encoding=encoding, header=None, nrows=1, dtype=str, na_filter=False, index_col=False)
    _refuse_duplicate_names(path, header.iloc[0].tolist() if len(header) else [])
    return frame


def _first_long_row(path: Path, encoding: str | None, width: int) -> str | None:
    with open(path, newline="", encoding=encoding or "utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if len(row) > width:
                return f"line {reader.line_num} has {len(row)} fields but the header names {width} columns"
    return None


def _csv_problem(message: str) -> str:
    message = one_line(message, limit=None)
    if m := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message):
        expected, line, saw = m.groups()
        return (
            f"line {line} has {saw} fields but the header names {expected} columns; "
            "quote cells that contain commas, or name every column in the header"
        )
    if m := re.search(r"EOF inside string starting at row (\d+)", message):
        return (
            f"a double quote opened in data row {m.group(1)} is never closed; "
            "balance the quotes (write a literal quote inside a quoted cell as \"\")"
        )
    return f"cannot be parsed as CSV: {message}"


def _read_jsonl(path: Path, encoding: str | None) -> pd.DataFrame:
    try:
        frame = pd.read_json(path, lines=True, encoding=encoding or "utf-8")
    except UnicodeDecodeError:
        raise
    except Exception as exc:
        # pandas reports a byte position at best: name the line that breaks the format.
        problem = _bad_jsonl_line(path, encoding)
        if problem:
            raise DataError(f"{path}: {problem}") from exc
        raise
    # Lines of arrays (pandas numbers the columns), or a key twice in a line (pandas keeps the last).
    problem = _bad_jsonl_line(path, encoding)
    if problem:
        raise DataError(f"{path}: {problem}")
    return frame


def _bad_jsonl_line(path: Path, encoding: str | None) -> str | None:
    """The first line that is not one JSON object with distinct keys, said plainly."""
    with open(path, encoding=encoding or "utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_Pairs)
            except ValueError as error:
                return f"line {number} is not valid JSON ({error.msg}); every line must be one JSON object"
            except RecursionError:
                return f"line {number} is nested too deeply to be a row; every line must be one JSON object"
            if not isinstance(record, _Pairs):
                return (
                    f"line {number} is a JSON {type(record).__name__}, not an object; "
                    'every line must be one {"column": value, ...} object'
                )
            seen: set[str] = set()
            for key, _ in record:
                if key in seen:
                    return f"line {number} names column {key!r} twice; give each column its own name"
                seen.add(key)
    return None


class _Pairs(list):
    """A JSON object as its (key, value) pairs, repeated keys kept (``json.loads`` would keep the last)."""


def _listed(names) -> str:
    """Column names for a one-line message: as written, or quoted (escapes shown) when a name
    would blur the list (a comma, padding, a line break)."""
    plain = lambda n: n and n.isprintable() and "," not in n and n.strip() == n  # noqa: E731
    return ", ".join(n if plain(n) else repr(n) for n in map(str, names))


def _column_option(name: str, kind: str) -> str:
    """``--column NAME:KIND`` as a shell would need it typed."""
    text = f"{name}:{kind}"
    if text.isprintable():
        return f"--column {shlex.quote(text)}"
    escaped = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return f"--column $'{escaped}'"  # bash/zsh ANSI-C quoting: a line break in a name stays one line here


def _read_npz(path: Path) -> pd.DataFrame:
    """Each array is a column: 1-D → a scalar column, 2-D → vectors, 3-D/4-D → images."""
    with np.load(path, allow_pickle=False) as arrays:
        data = {key: arrays[key] for key in arrays.files}
    if not data:
        raise DataError(f"{path} holds no arrays")
    lengths = {key: len(a) for key, a in data.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{path}: arrays have different lengths {lengths}; every array needs one entry per row")
    columns: dict[str, Any] = {}
    for key, array in data.items():
        if array.ndim == 1:
            columns[key] = array
        elif array.ndim == 2:
            columns[key] = list(array.astype(np.float32))
        elif array.ndim in (3, 4):
            columns[key] = list(array)  # image arrays, recognised by shape
        else:
            raise DataError(f"{path}: array {key!r} has {array.ndim} dimensions; use 1 (scalar), 2 (vector) or 3-4 (image)")
    return pd.DataFrame(columns)


def _is_array_cell(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _parse_vector_string(value: Any) -> list[float] | None:
    if not isinstance(value, str) or not value.startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    if isinstance(parsed, list) and all(isinstance(v, (int, float)) for v in parsed):
        return parsed
    return None


def infer_column_type(series: pd.Series, base_dir: Path) -> str:
    """Guess a column's type: vector, image, tabular (numeric/categorical) or text."""
    values = series.dropna()
    if len(values) == 0:
        return "empty"
    sample = values.iloc[: min(len(values), 200)]
    if all(_is_array_cell(v) for v in sample) or all(_parse_vector_string(v) is not None for v in sample):
        if all(isinstance(v, np.ndarray) and v.ndim >= 2 for v in sample):
            return "image"
        return "vector"
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        return "tabular"
    strings = sample.astype(str)
    if all(Path(s).suffix.lower() in IMAGE_SUFFIXES for s in strings):
        if sum((base_dir / s).is_file() for s in strings) >= 0.5 * len(strings):
            return "image"
    # Long, varied strings are text; short repeated ones are categories.
    text = values.astype(str)
    words = text.str.split().str.len().mean()
    unique_ratio = text.nunique() / len(text)
    if words >= 5 or (unique_ratio >= 0.5 and words >= 1.5):
        return "text"
    return "tabular"


def load_dataset(
    path: str | Path,
    label: str,
    *,
    group: str | None = None,
    columns: Mapping[str, str] | None = None,
    image_size: tuple[int, int] = (28, 28),
    name: str | None = None,
) -> Dataset:
    """Load ``path`` and type its columns; raise DataError naming the file/column and the fix."""
    path = Path(path)
    frame = read_table(path)
    overrides = dict(_toml_overrides(path))
    overrides.update(columns or {})
    for col, kind in overrides.items():
        if kind not in COLUMN_TYPES:
            where = f"{path.name}.toml" if col not in (columns or {}) else "--column"
            raise DataError(f"{where}: type override {_listed([f'{col}:{kind}'])}: type must be one of {', '.join(COLUMN_TYPES)}")
    if label not in frame.columns:
        raise DataError(
            f"{path}: no label column {label!r}; columns are {_listed(frame.columns)} (pass --label NAME)"
            + _separator_hint(frame)
        )
    if group is not None and group not in frame.columns:
        raise DataError(
            f"{path}: no group column {group!r}; columns are {_listed(frame.columns)} (pass --group NAME)"
        )
    unknown = set(overrides) - set(frame.columns)
    if unknown:
        raise DataError(
            f"{path}: --column names unknown column(s) {_listed(sorted(unknown))}; "
            f"columns are {_listed(frame.columns)}"
        )

    missing_label = frame[label].isna()
    if missing_label.all():
        raise DataError(f"{path}: label column {label!r} is empty")
    if missing_label.any():
        # Unlabelled rows cannot be trained or scored on; dropping them is the only sensible use.
        frame = frame.loc[~missing_label].reset_index(drop=True)
    label_values = frame[label]
    if pd.api.types.is_float_dtype(label_values) and (label_values % 1 == 0).all():
        label_values = label_values.astype("int64")  # integer labels read as float because of a gap
    labels = label_values.astype(str).to_numpy()
    if len(set(labels.tolist())) < 2:
        raise DataError(f"{path}: label column {label!r} has a single class {labels[0]!r}; classification needs two or more")
    groups = None
    if group is not None:
        if frame[group].isna().any():
            raise DataError(f"{path}: group column {group!r} has {int(frame[group].isna().sum())} empty cells; fill or drop them")
        groups = frame[group].astype(str).to_numpy()

    base_dir = path.parent
    typed: list[Column] = []
    for col in frame.columns:
        if col in (label, group):
            continue
        kind = overrides.get(col) or infer_column_type(frame[col], base_dir)
        if kind == "ignore":
            continue
        if kind == "empty" or frame[col].isna().all():
            raise DataError(
                f"{path}: column {col!r} is entirely empty (NaN); drop it or pass {_column_option(col, 'ignore')}"
            )
        sub = ""
        if kind == "tabular":
            sub = "numeric" if pd.api.types.is_numeric_dtype(frame[col]) or pd.api.types.is_bool_dtype(frame[col]) else "categorical"
        typed.append(Column(col, kind, sub))
    if not typed:
        raise DataError(f"{path}: no feature columns left besides the label; check --column overrides")
    images = [c for c in typed if c.modality == "image"]
    if len(images) > 1:
        raise DataError(
            f"{path}: several image columns ({_listed(c.name for c in images)}); autometa uses one image "
            f"input: keep one and pass --column NAME:ignore for the others"
        )

    features = frame[[c.name for c in typed]].copy()
    for c in typed:
        if c.modality == "vector":
            features[c.name] = _vector_column(path, features[c.name], c.name)
        elif c.modality == "text":
            features[c.name] = _text_column(features[c.name])
            if not features[c.name].dropna().str.contains(r"\w", regex=True).any():
                raise DataError(
                    f"{path}: text column {c.name!r} has no words in any row (only empty cells, spaces or "
                    f"punctuation); drop it or pass {_column_option(c.name, 'ignore')}"
                )
        elif c.kind == "numeric":
            _check_finite(path, features[c.name], c.name)
    dataset = Dataset(
        name=name or path.stem,
        path=path,
        frame=features,
        labels=labels,
        columns=typed,
        label_column=label,
        groups=groups,
        group_column=group,
        unlabelled=int(missing_label.sum()),
    )
    for c in images:
        dataset.images[c.name] = _load_images(path, features[c.name], c.name, image_size)
    dataset.fingerprint = fingerprint(dataset)
    return dataset


def _separator_hint(frame: pd.DataFrame) -> str:
    if len(frame.columns) == 1:
        for separator, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "pipes")):
            if separator in frame.columns[0]:
                return f"; the header looks separated by {name}: autometa reads comma-separated CSV, so re-save it with commas"
    return ""


def _text_column(series: pd.Series) -> pd.Series:
    # A number in a text column is text too (prediction reads it the same way).
    return series.where(series.isna(), series.astype(str))


def _check_finite(path: Path, series: pd.Series, name: str) -> None:
    values = pd.to_numeric(series, errors="coerce").astype(float)
    infinite = np.flatnonzero(np.isinf(values.to_numpy()))
    if len(infinite):
        rows = ", ".join(str(i) for i in infinite[:5]) + (", …" if len(infinite) > 5 else "")
        raise DataError(
            f"{path}: numeric column {name!r} has {len(infinite)} infinite value(s) (row {rows}); "
            "replace them with finite numbers or empty cells"
        )


def _toml_overrides(path: Path) -> dict[str, str]:
    sidecar = path.with_name(path.name + ".toml")
    if not sidecar.exists():
        return {}
    try:
        config = tomllib.loads(sidecar.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{sidecar}: not valid TOML: {exc}") from exc
    columns = config.get("columns", {})
    if not isinstance(columns, dict):
        raise DataError(f"{sidecar}: [columns] must map column names to types")
    return {str(k): str(v) for k, v in columns.items()}


def _vector_column(path: Path, series: pd.Series, name: str) -> pd.Series:
    parsed, bad = [], []
    for i, value in enumerate(series):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            parsed.append(None)  # one marker for a missing vector, whatever the file wrote
            continue
        cell = _parse_vector_string(value) if isinstance(value, str) else value
        try:
            array = np.asarray(cell, dtype=np.float64) if _is_array_cell(cell) else None
        except (TypeError, ValueError):
            array = None
        if array is None or array.ndim != 1 or np.isinf(array).any():
            bad.append(f"row {i}: {_shorten(value)}")
        parsed.append(cell)
    if bad:
        raise DataError(
            f"{path}: vector column {name!r} has {len(bad)} cell(s) that are not a flat list of finite numbers, e.g. "
            + "; ".join(bad[:3]) + "; write each as [1.0, 2.5, ...] (NaN for a missing entry) or leave the cell empty"
        )
    parsed = pd.Series(parsed, index=series.index, dtype=object)
    lengths = parsed.dropna().map(len)
    if lengths.nunique() > 1:
        raise DataError(
            f"{path}: vector column {name!r} has cells of different lengths ({sorted(int(n) for n in lengths.unique())[:5]}); "
            "every vector needs the same size"
        )
    return parsed


def _shorten(value: Any, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, np.ndarray) else f"array of shape {value.shape}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_images(path: Path, series: pd.Series, name: str, size: tuple[int, int]) -> np.ndarray:
    """Decode every image (paths relative to the table, or arrays) to uint8 [N, H, W, C]."""
    decoded: list[Image.Image | None] = []
    failures: list[str] = []
    for i, value in enumerate(series):
        try:
            if isinstance(value, np.ndarray):
                array = value
                if array.dtype != np.uint8:
                    scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
                    array = np.clip(array * scale, 0, 255).astype(np.uint8)
                if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
                    array = np.moveaxis(array, 0, -1)  # CHW -> HWC
                image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
            else:
                with Image.open(path.parent / str(value)) as raw:
                    raw.load()
                    image = _to_8bit(raw)
            decoded.append(image)
        except (OSError, UnidentifiedImageError, ValueError, TypeError, Image.DecompressionBombError) as exc:
            decoded.append(None)
            failures.append(f"row {i}: {value if not isinstance(value, np.ndarray) else 'array'} ({type(exc).__name__})")
    if failures:
        raise DataError(
            f"{path}: {len(failures)} of {len(series)} images in column {name!r} cannot be read, e.g. "
            + "; ".join(failures[:3])
            + f". Fix or remove those rows (paths are relative to {path.parent})"
        )
    grey = all(im.mode in ("L", "1", "I", "I;16", "F") for im in decoded)
    mode = "L" if grey else "RGB"
    width, height = size[1], size[0]
    out = np.stack([np.asarray(im.convert(mode).resize((width, height), Image.BILINEAR)) for im in decoded])
    return out[..., None] if grey else out


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale scaled into 0..255 (Pillow's own conversion clips them)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.copy()
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        top = 1.0
    else:
        top = 255.0 if values.size == 0 or values.max() <= 255 else (65535.0 if values.max() <= 65535 else values.max())
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def fingerprint(dataset: Dataset) -> str:
    """A content hash of the features, labels, groups, column types and decoded images."""
    h = hashlib.sha256()
    h.update(json.dumps([[c.name, c.modality, c.kind] for c in dataset.columns]).encode())
    h.update(json.dumps([dataset.label_column, dataset.group_column]).encode())
    scalar = [c.name for c in dataset.columns if c.modality in ("tabular", "text")]
    if scalar:
        # Missing cells as None, whatever pandas' astype(str) makes of them ('nan'/'None' before
        # 3.0, NaN since): the same data keeps its fingerprint across pandas versions.
        frame = dataset.frame[scalar]
        text = pd.DataFrame(
            {c: np.where(frame[c].notna(), frame[c].astype(str).to_numpy(dtype=object), None) for c in scalar}, dtype=object
        )
        h.update(pd.util.hash_pandas_object(text, index=False).to_numpy().tobytes())
    for c in dataset.columns:
        if c.modality == "vector":
            for cell in dataset.frame[c.name]:
                h.update(np.asarray(cell, dtype=np.float32).tobytes() if _is_array_cell(cell) else b"\x00missing")
    for name in sorted(dataset.images):
        h.update(dataset.images[name].tobytes())
    h.update("\x1f".join(dataset.labels.tolist()).encode())
    if dataset.groups is not None:
        h.update("\x1f".join(dataset.groups.tolist()).encode())
    return h.hexdigest()


def load_for_prediction(
    source: str | Path | pd.DataFrame,
    columns: list[Column],
    *,
    label: str | None = None,
    image_size: tuple[int, int] = (28, 28),
    name: str = "rows",
) -> Dataset:
    """New rows typed like a saved model's training columns (no inference).

    ``label`` is required for a labelled support set and ignored otherwise. Missing columns and
    cells of the wrong type are errors naming the column.
    """
    if isinstance(source, pd.DataFrame):
        path, frame = Path(f"<{name}>"), source.reset_index(drop=True).copy()
        frame.columns = [str(c) for c in frame.columns]
    else:
        path = Path(source)
        # Categories were learned from a column of strings: a file holding only numbers there must
        # not turn "7" into 7.0 (an unseen category "7.0").
        frame = read_table(path, tuple(c.name for c in columns if c.modality == "tabular" and c.kind == "categorical"))
    missing = [c.name for c in columns if c.name not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {_listed(missing)} that the model was trained on; "
            f"it needs {_listed(c.name for c in columns)}"
        )
    labels = np.asarray([""] * len(frame), dtype=object)
    if label is not None:
        if label not in frame.columns:
            raise DataError(f"{path}: the support set needs its label column {label!r}; columns are {_listed(frame.columns)}")
        if frame[label].isna().any():
            raise DataError(f"{path}: {int(frame[label].isna().sum())} support row(s) have no label in {label!r}")
        values = frame[label]
        if pd.api.types.is_float_dtype(values) and (values % 1 == 0).all():
            values = values.astype("int64")
        labels = values.astype(str).to_numpy()
    features = frame[[c.name for c in columns]].copy()
    for c in columns:
        if c.modality == "tabular" and c.kind == "numeric":
            converted = pd.to_numeric(features[c.name], errors="coerce")
            bad = features[c.name].notna() & converted.isna()
            if bad.any():
                examples = ", ".join(repr(v) for v in features[c.name][bad].head(3))
                raise DataError(
                    f"{path}: column {c.name!r} must be numeric as in training, but {int(bad.sum())} cell(s) are not "
                    f"(e.g. {examples}); fix or empty them"
                )
            _check_finite(path, converted, c.name)
            features[c.name] = converted
        elif c.modality == "vector":
            features[c.name] = _vector_column(path, features[c.name], c.name)
        elif c.modality == "text":
            features[c.name] = _text_column(features[c.name])
    dataset = Dataset(name=name, path=path, frame=features, labels=labels, columns=list(columns), label_column=label or "")
    for c in columns:
        if c.modality == "image":
            dataset.images[c.name] = _load_images(path, features[c.name], c.name, image_size)
    return dataset
