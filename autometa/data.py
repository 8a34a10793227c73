"""Loading a table into a typed Dataset: columns inferred as tabular, text, image or vector.

Supported files: CSV, Parquet, JSON Lines (``.jsonl``/``.ndjson``) and ``.npz`` arrays.
Column types can be overridden with ``{"col": "text"}`` (CLI ``--column col:text``) or a
``<data file>.toml`` beside the data holding a ``[columns]`` table; ``ignore`` drops a column.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from autometa.components import MODALITIES
from autometa.errors import DataError

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

    def summary(self) -> str:
        parts = [f"{m}: {', '.join(c.name for c in self.columns_of(m))}" for m in self.modalities]
        return (
            f"{self.name}: {len(self)} rows, {len(self.classes)} classes of {self.label_column!r}"
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


def read_table(path: Path) -> pd.DataFrame:
    """Read a data file into a DataFrame; every failure names the file and the fix."""
    if not path.exists():
        raise DataError(f"data file not found: {path} (check the path; it is read relative to {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the table file inside it (CSV, Parquet, JSON Lines or .npz)")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unknown format {suffix or '(no extension)'!r}; use .csv, .parquet, .jsonl/.ndjson or .npz"
        )
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".ndjson"):
            frame = pd.read_json(path, lines=True)
        else:
            frame = _read_npz(path)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty: add a header row and at least one data row") from exc
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {type(exc).__name__}: {exc}") from exc
    if frame.empty or len(frame.columns) == 0:
        raise DataError(f"{path} has no data rows (only a header?); add at least one row per example")
    frame.columns = [str(c) for c in frame.columns]
    return frame


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
            raise DataError(f"{where}: type override {col}:{kind}: type must be one of {', '.join(COLUMN_TYPES)}")
    if label not in frame.columns:
        raise DataError(
            f"{path}: no label column {label!r}; columns are {', '.join(frame.columns)} (pass --label NAME)"
        )
    if group is not None and group not in frame.columns:
        raise DataError(
            f"{path}: no group column {group!r}; columns are {', '.join(frame.columns)} (pass --group NAME)"
        )
    unknown = set(overrides) - set(frame.columns)
    if unknown:
        raise DataError(
            f"{path}: --column names unknown column(s) {', '.join(sorted(unknown))}; "
            f"columns are {', '.join(frame.columns)}"
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
                f"{path}: column {col!r} is entirely empty (NaN); drop it or pass --column {col}:ignore"
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
            f"{path}: several image columns ({', '.join(c.name for c in images)}); autometa uses one image "
            f"input: keep one and pass --column NAME:ignore for the others"
        )

    features = frame[[c.name for c in typed]].copy()
    for c in typed:
        if c.modality == "vector":
            features[c.name] = _vector_column(path, features[c.name], c.name)
    dataset = Dataset(
        name=name or path.stem,
        path=path,
        frame=features,
        labels=labels,
        columns=typed,
        label_column=label,
        groups=groups,
        group_column=group,
    )
    for c in images:
        dataset.images[c.name] = _load_images(path, features[c.name], c.name, image_size)
    dataset.fingerprint = fingerprint(dataset)
    return dataset


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
    parsed = series.map(lambda v: _parse_vector_string(v) if isinstance(v, str) else v)
    lengths = parsed.dropna().map(len)
    if lengths.nunique() > 1:
        raise DataError(
            f"{path}: vector column {name!r} has cells of different lengths ({sorted(int(n) for n in lengths.unique())[:5]}); "
            "every vector needs the same size"
        )
    return parsed


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
                    image = raw.copy()
            decoded.append(image)
        except (OSError, UnidentifiedImageError, ValueError, TypeError) as exc:
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


def fingerprint(dataset: Dataset) -> str:
    """A content hash of the features, labels, groups, column types and decoded images."""
    h = hashlib.sha256()
    h.update(json.dumps([[c.name, c.modality, c.kind] for c in dataset.columns]).encode())
    h.update(json.dumps([dataset.label_column, dataset.group_column]).encode())
    scalar = [c.name for c in dataset.columns if c.modality in ("tabular", "text")]
    if scalar:
        h.update(pd.util.hash_pandas_object(dataset.frame[scalar].astype(str), index=False).to_numpy().tobytes())
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
        frame = read_table(path)
    missing = [c.name for c in columns if c.name not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} that the model was trained on; "
            f"it needs {', '.join(c.name for c in columns)}"
        )
    labels = np.asarray([""] * len(frame), dtype=object)
    if label is not None:
        if label not in frame.columns:
            raise DataError(f"{path}: the support set needs its label column {label!r}; columns are {', '.join(frame.columns)}")
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
            features[c.name] = converted
        elif c.modality == "vector":
            features[c.name] = _vector_column(path, features[c.name], c.name)
        elif c.modality == "text":
            features[c.name] = features[c.name].where(features[c.name].isna(), features[c.name].astype(str))
    dataset = Dataset(name=name, path=path, frame=features, labels=labels, columns=list(columns), label_column=label or "")
    for c in columns:
        if c.modality == "image":
            dataset.images[c.name] = _load_images(path, features[c.name], c.name, image_size)
    return dataset
