"""Preprocessed inputs made once per search and shared by its worker processes.

The search process preprocesses the data (and each encoder's derived input, the first time a
worker needs it) into a folder of ``.npy`` files; every worker maps them read-only, so the
operating system keeps one copy of their pages for all workers instead of one per process, and
no worker repeats the hashing, fitting or embedding. Files are written under a temporary name
and renamed into place, so a worker never maps half a file.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from autometa.inputs import InputSpec
from autometa.types import Features

MANIFEST = "features.json"


def _file(key: str) -> str:
    """A file name for an input key (keys hold ``@`` and ``:``): its hex spelling."""
    return key.encode().hex() + ".npy"


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    write(partial)
    os.replace(partial, path)


def save_array(folder: Path, key: str, tensor: torch.Tensor) -> None:
    """Write one input for the workers (unless a worker already did: the content is the same)."""
    path = Path(folder) / _file(key)
    if not path.exists():
        _write_atomically(path, lambda p: _save(p, tensor))


def _save(path: Path, tensor: torch.Tensor) -> None:
    with open(path, "wb") as out:
        np.save(out, tensor.detach().cpu().numpy(), allow_pickle=False)


def save_state(folder: Path, key: str, state: dict[str, torch.Tensor]) -> None:
    """The state an encoder fitted for its derived input ``key`` (a saved model keeps it)."""
    path = Path(folder) / (_file(key) + ".state.npz")
    if not path.exists():
        def write(p: Path) -> None:
            with open(p, "wb") as out:
                np.savez(out, **{name: t.detach().cpu().numpy() for name, t in state.items()})
        _write_atomically(path, write)


def load_state(folder: Path, key: str) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / (_file(key) + ".state.npz")
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as arrays:
        return {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}


def load_array(folder: Path, key: str) -> torch.Tensor | None:
    """One shared input, mapped read-only (None when no worker has written it yet)."""
    path = Path(folder) / _file(key)
    if not path.exists():
        return None
    array = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():  # torch warns that it cannot write to it: nothing may
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def save_features(features: Features, folder: Path, extra: dict | None = None) -> None:
    """Write every input of ``features`` and a manifest of their specs (plus ``extra`` JSON)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key, tensor in features.inputs.items():
        save_array(folder, key, tensor)
    for key, state in features.fitted.items():
        save_state(folder, key, state)
    manifest = {
        "inputs": list(features.inputs),
        "specs": {k: [s.modality, list(s.shape), s.vocab_size] for k, s in features.specs.items()},
        "extra": extra or {},
    }
    _write_atomically(folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest)))


def load_features(folder: Path) -> tuple[Features, dict] | None:
    """The shared features in ``folder``, mapped read-only, and the manifest's ``extra`` (None
    when the folder holds none)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return None
    manifest = json.loads((folder / MANIFEST).read_text())
    inputs = {key: load_array(folder, key) for key in manifest["inputs"]}
    specs = {k: InputSpec(m, tuple(shape), vocab) for k, (m, shape, vocab) in manifest["specs"].items()}
    fitted = {key: state for key in manifest["inputs"] if (state := load_state(folder, key)) is not None}
    return Features(inputs, specs, fitted), manifest["extra"]
