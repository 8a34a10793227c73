"""Saved models: a folder with ``model.json`` (configuration, preprocessing, classes) and
``weights.safetensors`` (tensors only). Loading never unpickles anything.

    model = autometa.load("autometa-output/fastfood-standard-5ad2907b12")
    predictions = model.predict(frame)                       # standard protocol
    predictions = model.predict(queries, support=labelled)   # few-shot / grouped: adapt first
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autometa._version import __version__
from autometa.components import Backbone, MetaAlgorithm, assemble_backbone
from autometa.config import Config
from autometa.data.loading import load_for_prediction
from autometa.data.preprocessing import Preprocessor
from autometa.data.protocols import Split
from autometa.errors import AutometaError, DataError, PluginError, one_line
from autometa.inputs import MASK_PREFIX, InputSpec
from autometa.plugins import Registry, get_registry
from autometa.types import Features, PoolInfo, Task

FORMAT = "autometa-model"
FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
ENSEMBLE_FILE = "ensemble.json"  # instead of model.json: an ensemble of models saved in subfolders
ENSEMBLE_FORMAT = "autometa-ensemble"
WEIGHTS_FILE = "weights.safetensors"
SUPPORT = "support."
FITTED = "fitted."  # + derived input key + "." + state name: an encoder's fitted input (Encoder.fit_input)


class ModelError(AutometaError):
    """A saved model cannot be read or used."""


def folder_name(text: str) -> str:
    """``text`` (e.g. a study name) as one safe folder or file name: no path separators, no
    leading dots, so ``output / folder_name(study)`` stays inside ``output``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "study"


def module_tensors(algorithm: MetaAlgorithm) -> dict[str, torch.Tensor]:
    """Every trained tensor of ``algorithm``, keyed ``module.parameter`` (on the CPU)."""
    return {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, module in algorithm.modules().items()
        for key, value in module.state_dict().items()
    }


def load_module_tensors(algorithm: MetaAlgorithm, tensors: dict[str, torch.Tensor]) -> None:
    """Put :func:`module_tensors`' output back into a freshly built ``algorithm``; a RuntimeError
    naming the module when they do not fit."""
    for name, module in algorithm.modules().items():
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RuntimeError(f"{name!r} ({one_line(exc)})") from exc


def save_model(
    directory: str | Path,
    algorithm: MetaAlgorithm,
    config: Any,
    split: Split,
    *,
    registry: Registry,
    study: str,
    scores: dict[str, float],
    image_size: tuple[int, int],
    label: str,
) -> Path:
    """Write ``algorithm``'s trained state and everything needed to predict with it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = module_tensors(algorithm)
    backbone: Backbone = algorithm.backbone
    # Only the inputs this model reads (other encoders' derived inputs are not needed).
    used = set(backbone.input_keys.values()) | {MASK_PREFIX + m for m in backbone.input_keys}
    features = split.pool.features
    specs = {k: s for k, s in features.specs.items() if k in used}
    if split.protocol == "standard":
        # The training rows are the support set of the single standard task.
        rows = split.validation[0].support
        for key, value in features.take(rows).items():
            if key in used:
                tensors[SUPPORT + key] = value.detach().cpu().contiguous()
        tensors[SUPPORT + "labels"] = split.validation[0].support_y.detach().cpu().contiguous()
    for key, state in features.fitted.items():
        if key in used:
            tensors.update({f"{FITTED}{key}.{name}": value.detach().cpu().contiguous() for name, value in state.items()})
    components = {"meta_algorithm": config.meta_algorithm, "fusion": config.fusion, **{f"encoder.{m}": e for m, e in config.encoders.items()}}
    plugins = {}
    for key, name in components.items():
        info = registry.get(key.split(".")[0], name)
        plugins[key] = {"name": name, "plugin": info.plugin, "distribution": info.distribution, "version": info.version}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "autometa_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "study": study,
        "protocol": split.protocol,
        "label": label,
        "classes": list(split.classes),
        "training_classes": [split.classes[int(c)] for c in split.pool.classes],
        "episode_shape": [split.ways, split.shots, split.queries],
        "config": dataclasses.asdict(config),
        "plugins": plugins,
        "input_keys": dict(backbone.input_keys),
        "specs": {k: {"modality": s.modality, "shape": list(s.shape), "vocab_size": s.vocab_size} for k, s in specs.items()},
        "preprocessor": split.preprocessor.to_json(),
        "image_size": list(image_size),
        "scores": scores,
    }
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2))
    (directory / ENSEMBLE_FILE).unlink(missing_ok=True)  # a folder holds one model: this one now
    return directory


def save_ensemble(directory: str | Path, members: list[tuple[float, int, MetaAlgorithm, Any]], split: Split, *,
                  scores: dict[str, Any], **saved: Any) -> Path:
    """Write an ensemble: each ``(weight, trial, algorithm, config)`` member saved as a model of
    its own in a subfolder (``saved``: :func:`save_model`'s registry, study, image_size and
    label), and ``ensemble.json`` with their weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("member-*"):  # an earlier ensemble's members
        if stale.is_dir() and (stale / CONFIG_FILE).is_file():
            shutil.rmtree(stale)
    listed = []
    for weight, trial, algorithm, config in members:
        folder = f"member-trial-{trial}"
        save_model(directory / folder, algorithm, config, split, scores={"trial": trial}, **saved)
        listed.append({"folder": folder, "trial": trial, "weight": weight})
    document = {
        "format": ENSEMBLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "autometa_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "study": saved.get("study"),
        "protocol": split.protocol,
        "members": listed,
        "scores": scores,
    }
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # an earlier single model's files
        (directory / name).unlink(missing_ok=True)
    (directory / ENSEMBLE_FILE).write_text(json.dumps(document, indent=2))
    return directory


class Model:
    """A trained autometa model loaded from disk, ready to predict."""

    def __init__(self, path: str | Path, registry: Registry | None = None):
        path = Path(path)
        folder = path.parent if path.name == CONFIG_FILE else path
        if not (folder / CONFIG_FILE).is_file():
            hint = " (autometa models are folders; it never unpickles .pt/.pkl files)" if path.suffix in (".pt", ".pth", ".pkl", ".pickle") else ""
            raise ModelError(f"{path}: no {CONFIG_FILE} here; give the folder `autometa search --output` wrote{hint}")
        try:
            document = json.loads((folder / CONFIG_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{folder / CONFIG_FILE}: not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise ModelError(
                f"{folder / CONFIG_FILE}: nested too deeply to be an autometa model file (edited or damaged); "
                "use the folder `autometa search` wrote"
            ) from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ModelError(f"{folder / CONFIG_FILE}: not an autometa model file")
        version = document.get("format_version", 0)
        if not isinstance(version, int):
            raise ModelError(f"{folder / CONFIG_FILE}: format_version {version!r} is not a number; the file was edited")
        if version > FORMAT_VERSION:
            raise ModelError(
                f"{folder}: saved by a newer autometa (format {document['format_version']}); upgrade autometa to load it"
            )
        try:
            tensors = load_file(str(folder / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(
                f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({exc}); autometa loads tensors only "
                "and never unpickles model files"
            ) from exc
        self.path = folder
        self.document = document
        self.registry = registry or get_registry()
        try:
            self.protocol: str = document["protocol"]
            self.classes: list[str] = [str(c) for c in document["classes"]]
            self.preprocessor = Preprocessor.from_json(document["preprocessor"])
            self.algorithm = self._rebuild(tensors)
            self.fitted: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(FITTED):
                    key, name = k[len(FITTED):].split(".", 1)
                    self.fitted.setdefault(key, {})[name] = v
            support = {k[len(SUPPORT):]: v for k, v in tensors.items() if k.startswith(SUPPORT)}
            self.support_labels = support.pop("labels", None)
            self.support = Features(support, self.specs) if support else None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # Only a hand-edited or foreign model.json gets here: save_model writes every key.
            what = f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise ModelError(
                f"{folder / CONFIG_FILE} is incomplete or was edited ({what}); use the folder `autometa search` wrote"
            ) from exc

    @property
    def specs(self) -> dict[str, InputSpec]:
        return {
            k: InputSpec(s["modality"], tuple(s["shape"]), s["vocab_size"]) for k, s in self.document["specs"].items()
        }

    def _configured(self, key: str) -> str | None:
        config = self.document["config"]
        if key.startswith("encoder."):
            return config["encoders"].get(key.split(".", 1)[1])
        return config.get(key)

    def _component(self, key: str):
        """The class model.json asks for under ``key``; it must be installed and named consistently."""
        kind = key.split(".")[0]
        entry = self.document["plugins"].get(key) or {}
        configured = self._configured(key)
        names = list(dict.fromkeys(n for n in (entry.get("name"), configured) if n is not None))
        if not names:
            raise KeyError(f"plugins.{key}")
        for name in names:
            try:
                cls = self.registry.get(kind, name).cls
            except PluginError as exc:
                known = entry.get("name") == name
                origin = (entry.get("distribution") or entry.get("plugin")) if known else None
                source = f" from {origin!r} {entry.get('version') or ''}".rstrip() if origin else ""
                raise ModelError(
                    f"{self.path}: the model needs {kind.replace('_', '-')} {name!r}{source}, which is not installed ({exc})"
                ) from exc
        if len(names) > 1:
            raise ModelError(
                f"{self.path / CONFIG_FILE}: its config names {kind.replace('_', '-')} {configured!r} but its plugins "
                f"entry {key!r} names {entry.get('name')!r}; the file was edited: use the folder `autometa search` wrote"
            )
        return cls

    def _build(self, key: str, *args, **kwargs):
        """Construct a component; a failure names it (edited hyperparameters, a changed plugin)."""
        cls = self._component(key)
        try:
            return cls(*args, **kwargs)
        except Exception as exc:
            raise ModelError(
                f"{self.path}: {key.replace('_', '-')} {cls.name!r} cannot be rebuilt from {CONFIG_FILE} "
                f"({type(exc).__name__}: {one_line(exc)}); the file was edited or the plugin changed since it was saved"
            ) from exc

    def _rebuild(self, tensors: dict[str, torch.Tensor]) -> MetaAlgorithm:
        config = self.document["config"]
        specs = self.specs
        input_keys = self.document["input_keys"]
        # A model saved before cross-modal mapping existed has no weight: no mapper.
        stored = Config(config["meta_algorithm"], config["fusion"], config["encoders"], config["meta_params"],
                        config["fusion_params"], config["encoder_params"], config.get("crossmodal_weight", 0.0))
        backbone = assemble_backbone(stored, specs, input_keys, self._build)
        algorithm = self._build("meta_algorithm", **config["meta_params"])
        pool = PoolInfo(len(self.document["training_classes"]))
        shape = tuple(self.document["episode_shape"])
        try:
            algorithm.setup(backbone, pool, shape)
        except Exception as exc:
            raise ModelError(
                f"{self.path}: meta-algorithm {algorithm.name!r} failed to set up the saved model "
                f"({type(exc).__name__}: {one_line(exc)})"
            ) from exc
        try:
            load_module_tensors(algorithm, tensors)
        except RuntimeError as exc:
            raise ModelError(
                f"{self.path}: {WEIGHTS_FILE} does not fit the rebuilt {exc}; "
                f"it belongs to another model or {CONFIG_FILE} was edited"
            ) from exc
        for module in algorithm.modules().values():
            module.eval()
        return algorithm

    def _features(self, source, *, label: str | None, name: str) -> tuple[Features, np.ndarray]:
        size = tuple(self.document["image_size"])
        dataset = load_for_prediction(source, self.preprocessor.columns, label=label, image_size=size, name=name)
        derived: dict[str, list] = {}
        for m, key in self.document["input_keys"].items():
            if key != m:
                cls = self._component(f"encoder.{m}")
                if cls.fits_input() and key not in self.fitted:
                    raise ModelError(f"{self.path / WEIGHTS_FILE} lacks the fitted state of input {key!r}; use the folder `autometa search` wrote")
                derived.setdefault(m, []).append(cls)
        features = self.preprocessor.transform(dataset, derived, fitted=self.fitted)
        expected = {k: tuple(s.shape) for k, s in self.specs.items()}
        for key, shape in expected.items():
            if tuple(features.specs[key].shape) != shape:
                raise DataError(
                    f"{dataset.path}: input {key!r} has shape {features.specs[key].shape}, the model expects {shape}"
                )
        used = {k: v for k, v in features.inputs.items() if k in expected or k.startswith(MASK_PREFIX)}
        return Features(used, self.specs), dataset.labels

    def predict(self, data: str | Path | pd.DataFrame, support: str | Path | pd.DataFrame | None = None) -> pd.DataFrame:
        """Predicted class and class probabilities for every row of ``data``, in input order.

        ``support``: labelled rows (with the training label column) to adapt to first. Required
        for few-shot and grouped models, whose classes are only known from their support set.
        """
        query, _ = self._features(data, label=None, name="data")
        if support is not None:
            shots, labels = self._features(support, label=self.document["label"], name="support")
            classes = sorted(set(labels.tolist()))
            if len(classes) < 2:
                raise DataError(f"the support set has a single class {classes[0]!r}; give examples of two or more")
            support_y = torch.as_tensor(np.searchsorted(np.asarray(classes), labels))
            same = False
        elif self.support is not None:
            shots, support_y, classes, same = self.support, self.support_labels, self.classes, True
        else:
            raise DataError(
                f"this model was trained with the {self.protocol} protocol: its classes come from a labelled "
                f"support set; pass one (--support FILE) with a {self.document['label']!r} column"
            )
        combined = Features.concat(shots, query)
        n_support = len(shots)
        task = Task(
            combined,
            torch.arange(n_support),
            support_y.long(),
            torch.arange(n_support, len(combined)),
            torch.zeros(len(query), dtype=torch.long),
            len(classes),
            same_classes_as_training=same,
        )
        name = self.algorithm.name
        try:
            logits = self.algorithm.predict(task)
        except AutometaError:
            raise
        except Exception as exc:
            raise ModelError(
                f"{self.path}: meta-algorithm {name!r} failed to predict: {type(exc).__name__}: {one_line(exc)}"
            ) from exc
        expected = (len(query), len(classes))
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ModelError(
                f"{self.path}: meta-algorithm {name!r} predicted {got} for {expected[0]} rows and "
                f"{expected[1]} classes; expected logits of shape {expected}"
            )
        probabilities = torch.softmax(logits.detach().cpu().double(), dim=-1).numpy()
        result = pd.DataFrame({"prediction": np.asarray(classes, dtype=object)[probabilities.argmax(1)]})
        for i, c in enumerate(classes):
            result[f"proba_{c}"] = probabilities[:, i]
        return result


class EnsembleModel:
    """Models saved with their weights, predicting the weighted mean of their class probabilities."""

    def __init__(self, path: str | Path, registry: Registry | None = None):
        path = Path(path)
        folder = path.parent if path.name == ENSEMBLE_FILE else path
        try:
            document = json.loads((folder / ENSEMBLE_FILE).read_text())
            if not isinstance(document, dict) or document.get("format") != ENSEMBLE_FORMAT:
                raise ValueError("not an autometa ensemble file")
            if document.get("format_version", 0) > FORMAT_VERSION:
                raise ModelError(f"{folder}: saved by a newer autometa; upgrade autometa to load it")
            listed = [(float(m["weight"]), folder / folder_name(str(m["folder"]))) for m in document["members"]]
        except ModelError:
            raise
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as exc:
            raise ModelError(
                f"{folder / ENSEMBLE_FILE} is incomplete or was edited ({type(exc).__name__}: {one_line(exc)}); "
                "use the folder `autometa search` wrote"
            ) from exc
        if not listed or any(not (w > 0) for w, _ in listed):
            raise ModelError(f"{folder / ENSEMBLE_FILE}: an ensemble needs members with positive weights; the file was edited")
        self.path, self.document = folder, document
        self.members = [(weight, Model(member, registry)) for weight, member in listed]
        self.protocol = self.members[0][1].protocol
        self.classes = self.members[0][1].classes

    def predict(self, data: str | Path | pd.DataFrame, support: str | Path | pd.DataFrame | None = None) -> pd.DataFrame:
        """As :meth:`Model.predict`, with the members' probabilities averaged by their weights."""
        frames = [(weight, model.predict(data, support=support)) for weight, model in self.members]
        columns = [c for c in frames[0][1].columns if c.startswith("proba_")]
        if any(list(f.columns[1:]) != columns for _, f in frames):
            raise ModelError(f"{self.path}: its members predict different classes; use the folder `autometa search` wrote")
        total = sum(weight for weight, _ in frames)
        probabilities = sum(weight * f[columns].to_numpy() for weight, f in frames) / total
        classes = np.asarray([c[len("proba_"):] for c in columns], dtype=object)
        # The members' own predictions name the classes with their original types (proba_ columns are text).
        names = {str(v): v for _, f in frames for v in f["prediction"]}
        result = pd.DataFrame({"prediction": [names.get(c, c) for c in classes[probabilities.argmax(1)]]})
        for i, c in enumerate(columns):
            result[c] = probabilities[:, i]
        return result


def load(path: str | Path) -> Model | EnsembleModel:
    """Load a model saved by ``autometa search`` (``--output``): one model, or an ensemble."""
    folder = Path(path)
    if folder.name == ENSEMBLE_FILE or (folder / ENSEMBLE_FILE).is_file():
        return EnsembleModel(folder)
    return Model(path)
