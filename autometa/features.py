"""Turning a Dataset into one tensor per modality, with statistics fitted on training rows only.

tabular: numeric columns imputed (with missing indicators) and standardised, categorical ones
one-hot encoded (sklearn); text: word uni/bigrams hashed (stable murmurhash) into token ids, so
no vocabulary is learned and nothing leaks; image: scaled to [0, 1] then standardised per
channel; vector: standardised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils import murmurhash3_32

from autometa.components import MASK_PREFIX, Encoder, InputSpec, derived_key
from autometa.data import Dataset

TEXT_BUCKETS = 2**14
MAX_TOKENS = 128
_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str, prefix: str, buckets: int = TEXT_BUCKETS, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Hash lowercase words and word bigrams of one cell into ids 1..buckets-1 (0 pads)."""
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [1 + murmurhash3_32(f"{prefix}\x1f{g}", positive=True) % (buckets - 1) for g in grams[:max_tokens]]


@dataclass
class Features:
    """Model inputs for every row (``inputs[modality]`` has the row count as first dimension)."""

    inputs: dict[str, torch.Tensor]  # modality tensors, plus MASK_PREFIX + modality presence masks
    specs: dict[str, InputSpec]

    def to(self, device: torch.device | str) -> "Features":
        return Features({m: t.to(device) for m, t in self.inputs.items()}, self.specs)

    @property
    def modalities(self) -> list[str]:
        """The dataset's modalities (specs also hold encoders' derived inputs)."""
        return [m for m in self.specs if "@" not in m]

    def present(self, modality: str) -> torch.Tensor:
        """Bool [rows]: which rows have ``modality`` (all True when no mask is stored)."""
        key = MASK_PREFIX + modality
        if key in self.inputs:
            return self.inputs[key]
        return torch.ones(len(next(iter(self.inputs.values()))), dtype=torch.bool)

    def take(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather rows; ``rows`` may carry leading task dims, e.g. ``[tasks, shots]``."""
        return {m: t[rows] for m, t in self.inputs.items()}


def build_features(
    dataset: Dataset, fit_rows: np.ndarray, derived: dict[str, list[type[Encoder]]] | None = None
) -> Features:
    """Preprocess all rows with statistics learned from ``fit_rows`` only.

    ``derived`` names, per modality, encoders whose ``prepare`` computes their own input.
    """
    inputs: dict[str, torch.Tensor] = {}
    specs: dict[str, InputSpec] = {}
    frame = dataset.frame
    tabular = dataset.columns_of("tabular")
    if tabular:
        numeric = [c.name for c in tabular if c.kind == "numeric"]
        categorical = [c.name for c in tabular if c.kind == "categorical"]
        transformer = ColumnTransformer(
            [
                ("numeric", make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()), numeric),
                (
                    "categorical",
                    make_pipeline(
                        SimpleImputer(strategy="constant", fill_value="(missing)"),
                        OneHotEncoder(handle_unknown="ignore", min_frequency=2, sparse_output=False),
                    ),
                    categorical,
                ),
            ],
            sparse_threshold=0.0,
        )
        table = frame[numeric + categorical].copy()
        for c in categorical:
            table[c] = table[c].astype(object).where(table[c].notna(), None).map(lambda v: v if v is None else str(v))
        transformer.fit(table.iloc[fit_rows])
        matrix = np.asarray(transformer.transform(table), dtype=np.float32)
        inputs["tabular"] = torch.from_numpy(np.nan_to_num(matrix))
        specs["tabular"] = InputSpec("tabular", (matrix.shape[1],))
        _mask(inputs, "tabular", frame[numeric + categorical].notna().any(axis=1).to_numpy())
    text = dataset.columns_of("text")
    if text:
        rows = []
        for values in zip(*(frame[c.name].tolist() for c in text)):
            ids: list[int] = []
            for c, v in zip(text, values):
                if isinstance(v, str):
                    ids.extend(tokenize(v, c.name))
            rows.append(ids[:MAX_TOKENS])
        length = max(1, max(len(r) for r in rows))
        ids = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        inputs["text"] = torch.from_numpy(ids)
        specs["text"] = InputSpec("text", (length,), vocab_size=TEXT_BUCKETS)
        _mask(inputs, "text", ids.any(axis=1))
    images = dataset.columns_of("image")
    if images:
        pixels = torch.from_numpy(dataset.images[images[0].name]).permute(0, 3, 1, 2).float() / 255.0
        fit = pixels[torch.as_tensor(fit_rows)]
        mean = fit.mean(dim=(0, 2, 3), keepdim=True)
        std = fit.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
        inputs["image"] = (pixels - mean) / std
        specs["image"] = InputSpec("image", tuple(pixels.shape[1:]))
    vectors = dataset.columns_of("vector")
    if vectors:
        matrix = _vector_matrix(frame, [c.name for c in vectors])
        fit = matrix[fit_rows]
        mean = np.nanmean(fit, axis=0)
        std = np.nanstd(fit, axis=0)
        matrix = np.nan_to_num((matrix - np.nan_to_num(mean)) / np.where(std > 1e-6, std, 1.0))
        inputs["vector"] = torch.from_numpy(matrix.astype(np.float32))
        specs["vector"] = InputSpec("vector", (matrix.shape[1],))
        _mask(inputs, "vector", np.stack([[_present(v) for v in frame[c.name]] for c in vectors]).any(axis=0))
    for modality, encoders in (derived or {}).items():
        if modality not in specs:
            continue
        raw = _raw(dataset, modality)
        for cls in encoders:
            tensor = cls.prepare(raw)
            if tensor is None:
                continue
            if tensor.shape[0] != len(dataset):
                raise ValueError(f"encoder {cls.name!r}: prepare returned {tensor.shape[0]} rows for {len(dataset)}")
            key = derived_key(modality, cls.name)
            inputs[key] = tensor
            specs[key] = InputSpec(modality, tuple(tensor.shape[1:]))
    return Features(inputs, specs)


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


def _vector_matrix(frame, columns: list[str]) -> np.ndarray:
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
