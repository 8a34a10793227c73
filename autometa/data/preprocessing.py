"""Turning a Dataset into one tensor per modality, with statistics fitted on training rows only.

tabular: numeric columns imputed by the median (with missing indicators) and standardised,
categorical ones one-hot encoded (rare categories pooled); text: word uni/bigrams hashed
(stable murmurhash) into token ids, so no vocabulary is learned and nothing leaks; image:
scaled to [0, 1] then standardised per channel; vector: standardised.

scikit-learn fits the statistics; the Preprocessor keeps only the numbers (JSON), so a saved
model applies exactly the same transform to new rows without unpickling anything.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils import murmurhash3_32

from autometa.components import Encoder
from autometa.data.loading import Column, Dataset
from autometa.data.shared import load_array, load_state, save_array, save_state
from autometa.inputs import MASK_PREFIX, InputSpec, derived_key
from autometa.types import Features

TEXT_BUCKETS = 2**14
MAX_TOKENS = 128
MISSING = "(missing)"
_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str, prefix: str, buckets: int = TEXT_BUCKETS, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Hash lowercase words and word bigrams of one cell into ids 1..buckets-1 (0 pads)."""
    # Words come before bigrams and only max_tokens ids are kept, so reading more words than that
    # cannot change the result: a megabyte-long cell costs no more than a sentence.
    words = [m.group() for m in itertools.islice(_WORD.finditer(text.lower()), max_tokens)]
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [1 + murmurhash3_32(f"{prefix}\x1f{g}", positive=True) % (buckets - 1) for g in grams[:max_tokens]]


def add_derived(
    features: Features,
    dataset: Dataset,
    modality: str,
    encoder: type[Encoder],
    fit_rows: np.ndarray | None = None,
    state: dict[str, torch.Tensor] | None = None,
    shared: Path | None = None,
) -> str | None:
    """Compute ``encoder``'s own input (Encoder.prepare) once; returns its input key.

    With ``shared`` (a search's folder of shared inputs, see autometa.data.shared) it is
    computed once for all worker processes: taken from there when another already made it,
    else made and left there for the others.

    An encoder that fits its input (Encoder.fit_input) is fitted on ``fit_rows`` only (the
    split's training rows) or given the ``state`` a saved model kept; the state used is stored
    in ``features.fitted[key]``. The tensor is added in place, so every task sharing these
    features sees it.
    """
    key = derived_key(modality, encoder.name)
    if key in features.inputs:
        return key
    if modality not in features.specs:
        return None
    device = next(iter(features.inputs.values())).device
    if shared is not None and state is None and (tensor := load_array(shared, key)) is not None:
        features.inputs[key] = tensor.to(device)
        features.specs[key] = InputSpec(modality, tuple(tensor.shape[1:]))
        if (fitted := load_state(shared, key)) is not None:
            features.fitted[key] = fitted
        return key
    raw = _raw(dataset, modality)
    if encoder.fits_input():
        if state is None:
            if fit_rows is None:
                raise ValueError(f"encoder {encoder.name!r} fits its input on training rows: give fit_rows or its saved state")
            state = encoder.fit_input(raw, np.asarray(fit_rows))
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise TypeError(f"encoder {encoder.name!r}: fit_input must return a dict of named tensors, got {type(state).__name__}")
        tensor = encoder.prepare(raw, state)
    else:
        tensor = encoder.prepare(raw)
    if tensor is None:
        return None
    if tensor.shape[0] != len(dataset):
        raise ValueError(f"encoder {encoder.name!r}: prepare returned {tensor.shape[0]} rows for {len(dataset)}")
    if shared is not None and fit_rows is not None:  # fitted on this split's rows: the same in every worker
        if state is not None:
            save_state(shared, key, state)
        save_array(shared, key, tensor)  # last: a worker that finds the array finds its state too
    features.inputs[key] = tensor.to(device)
    features.specs[key] = InputSpec(modality, tuple(tensor.shape[1:]))
    if state is not None:
        features.fitted[key] = state
    return key


@dataclass
class Preprocessor:
    """Statistics learned from training rows, as plain JSON-able numbers, and their transform."""

    columns: list[Column]
    state: dict[str, Any]

    @classmethod
    def fit(cls, dataset: Dataset, rows: np.ndarray) -> "Preprocessor":
        frame = dataset.frame.iloc[rows]
        state: dict[str, Any] = {}
        numeric = [c.name for c in dataset.columns_of("tabular") if c.kind == "numeric"]
        categorical = [c.name for c in dataset.columns_of("tabular") if c.kind == "categorical"]
        if numeric:
            values = frame[numeric].astype(float).to_numpy()
            imputer = SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True).fit(values)
            indicators = [int(i) for i in imputer.indicator_.features_] if imputer.indicator_ is not None else []
            scaler = StandardScaler().fit(imputer.transform(values))
            state["numeric"] = {
                "columns": numeric,
                "median": imputer.statistics_.tolist(),
                "indicators": indicators,
                "mean": scaler.mean_.tolist(),
                "scale": scaler.scale_.tolist(),
            }
        if categorical:
            encoder = OneHotEncoder(handle_unknown="ignore", min_frequency=2).fit(_categories(frame, categorical))
            infrequent = encoder.infrequent_categories_
            state["categorical"] = {
                "columns": categorical,
                # Per column: categories with their own one-hot column, then whether rare ones share one.
                "frequent": [
                    [str(c) for c in cats if infrequent[i] is None or c not in set(infrequent[i])]
                    for i, cats in enumerate(encoder.categories_)
                ],
                "rare": [[str(c) for c in (inf if inf is not None else [])] for inf in infrequent],
            }
        text = dataset.columns_of("text")
        if text:
            lengths = [len(r) for r in _token_rows(dataset.frame, [c.name for c in text])]
            state["text"] = {"columns": [c.name for c in text], "length": max(1, max(lengths)), "buckets": TEXT_BUCKETS}
        images = dataset.columns_of("image")
        if images:
            pixels = dataset.images[images[0].name][rows].astype(np.float64) / 255.0
            state["image"] = {
                "column": images[0].name,
                "size": list(pixels.shape[1:3]),
                "channels": int(pixels.shape[3]),
                "mean": pixels.mean(axis=(0, 1, 2)).tolist(),
                "std": np.maximum(pixels.std(axis=(0, 1, 2)), 1e-3).tolist(),
            }
        vectors = dataset.columns_of("vector")
        if vectors:
            matrix = _vector_matrix(frame, [c.name for c in vectors])
            mean, std = np.nanmean(matrix, axis=0), np.nanstd(matrix, axis=0)
            state["vector"] = {
                "columns": [c.name for c in vectors],
                "mean": np.nan_to_num(mean).tolist(),
                "std": np.where(std > 1e-6, std, 1.0).tolist(),
            }
        return cls(list(dataset.columns), state)

    def transform(
        self,
        dataset: Dataset,
        derived: dict[str, list[type[Encoder]]] | None = None,
        *,
        fit_rows: np.ndarray | None = None,
        fitted: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Features:
        """Model inputs for every row of ``dataset`` (a training or a new dataset).

        ``derived`` encoders that fit their input use the ``fitted`` state (a saved model's) or
        are fitted on ``fit_rows`` (see add_derived)."""
        inputs: dict[str, torch.Tensor] = {}
        specs: dict[str, InputSpec] = {}
        frame = dataset.frame
        parts, present = [], []
        if "numeric" in self.state:
            s = self.state["numeric"]
            values = frame[s["columns"]].astype(float).to_numpy()
            missing = np.isnan(values)
            filled = np.where(missing, np.asarray(s["median"]), values)
            block = np.concatenate([filled, missing[:, s["indicators"]].astype(float)], axis=1)
            parts.append((block - np.asarray(s["mean"])) / np.asarray(s["scale"]))
            present.append(~missing.all(axis=1))
        if "categorical" in self.state:
            s = self.state["categorical"]
            cats = _categories(frame, s["columns"])
            for j, (frequent, rare) in enumerate(zip(s["frequent"], s["rare"])):
                column = cats[:, j]
                if frequent:  # none in an id-like column, whose every value is rare
                    parts.append(np.stack([column == c for c in frequent], axis=1).astype(float).reshape(len(frame), -1))
                if rare:
                    parts.append(np.isin(column, rare).astype(float)[:, None])
            present.append(np.ones(len(frame), dtype=bool))
        if parts:
            matrix = np.concatenate(parts, axis=1).astype(np.float32)
            inputs["tabular"] = torch.from_numpy(np.nan_to_num(matrix))
            specs["tabular"] = InputSpec("tabular", (matrix.shape[1],))
            _mask(inputs, "tabular", np.any(present, axis=0))
        if "text" in self.state:
            s = self.state["text"]
            rows = _token_rows(frame, s["columns"])
            ids = np.zeros((len(rows), s["length"]), dtype=np.int64)
            for i, r in enumerate(rows):
                r = r[: s["length"]]
                ids[i, : len(r)] = r
            inputs["text"] = torch.from_numpy(ids)
            specs["text"] = InputSpec("text", (s["length"],), vocab_size=s["buckets"])
            _mask(inputs, "text", ids.any(axis=1))
        if "image" in self.state:
            s = self.state["image"]
            pixels = torch.from_numpy(dataset.images[s["column"]]).permute(0, 3, 1, 2).float() / 255.0
            if pixels.shape[1] != s["channels"]:  # new images in another colour mode than training
                pixels = pixels.mean(1, keepdim=True) if s["channels"] == 1 else pixels.expand(-1, s["channels"], -1, -1)
            mean = torch.tensor(s["mean"], dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(s["std"], dtype=torch.float32).view(1, -1, 1, 1)
            inputs["image"] = (pixels - mean) / std
            specs["image"] = InputSpec("image", tuple(pixels.shape[1:]))
        if "vector" in self.state:
            s = self.state["vector"]
            matrix = _vector_matrix(frame, s["columns"])
            standardised = np.nan_to_num((matrix - np.asarray(s["mean"])) / np.asarray(s["std"]))
            inputs["vector"] = torch.from_numpy(standardised.astype(np.float32))
            specs["vector"] = InputSpec("vector", (matrix.shape[1],))
            _mask(inputs, "vector", ~np.isnan(matrix).all(axis=1))
        features = Features(inputs, specs)
        for modality, encoders in (derived or {}).items():
            for cls in encoders:
                add_derived(features, dataset, modality, cls, fit_rows, (fitted or {}).get(derived_key(modality, cls.name)))
        return features

    def to_json(self) -> dict[str, Any]:
        return {"columns": [[c.name, c.modality, c.kind] for c in self.columns], "state": self.state}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Preprocessor":
        return cls([Column(*c) for c in data["columns"]], data["state"])


def build_features(
    dataset: Dataset, fit_rows: np.ndarray, derived: dict[str, list[type[Encoder]]] | None = None
) -> Features:
    """Preprocess all rows with statistics learned from ``fit_rows`` only.

    ``derived`` names, per modality, encoders whose ``prepare`` computes their own input.
    """
    return Preprocessor.fit(dataset, fit_rows).transform(dataset, derived, fit_rows=fit_rows)


def _categories(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Categorical cells as strings, a missing cell as its own category."""
    return np.stack(
        [np.asarray([MISSING if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in frame[c]], dtype=object)
         for c in columns],
        axis=1,
    )


def _token_rows(frame: pd.DataFrame, columns: list[str]) -> list[list[int]]:
    rows = []
    for values in zip(*(frame[c].tolist() for c in columns)):
        ids: list[int] = []
        for name, v in zip(columns, values):
            if isinstance(v, str):
                ids.extend(tokenize(v, name))
        rows.append(ids[:MAX_TOKENS])
    return rows


def _raw(dataset: Dataset, modality: str):
    """A modality's raw data in the form Encoder.prepare documents."""
    columns = [c.name for c in dataset.columns_of(modality)]
    frame = dataset.frame
    if modality == "text":
        return [
            " . ".join(v for v in values if isinstance(v, str) and v)
            for values in zip(*(frame[c].tolist() for c in columns))
        ]
    if modality == "image":
        return dataset.images[columns[0]]
    if modality == "vector":
        return _vector_matrix(frame, columns)
    return frame[columns]


def _vector_matrix(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Vector cells side by side as float32 [N, D]; a missing cell is a row of NaN."""
    parts = []
    for name in columns:
        cells = frame[name].tolist()
        size = len(next(v for v in cells if _present(v)))
        parts.append(np.stack([np.asarray(v, np.float32) if _present(v) else np.full(size, np.nan, np.float32) for v in cells]))
    return np.concatenate(parts, axis=1)


def _mask(inputs: dict[str, torch.Tensor], modality: str, present: np.ndarray) -> None:
    """Store a presence mask only when some row lacks the modality (the common case has none)."""
    if not present.all():
        inputs[MASK_PREFIX + modality] = torch.from_numpy(np.array(present, dtype=bool))


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))
