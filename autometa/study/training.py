"""Assembling a configuration's model from the registry and meta-training it: the one place a
model is built from a ``Config``, for a trial and for a saved model alike."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from autometa.components import Backbone, MetaAlgorithm, assemble_backbone
from autometa.config import Config
from autometa.data.preprocessing import add_derived
from autometa.data.protocols import Split
from autometa.data.scoring import Score, predict_probabilities, score_probabilities
from autometa.errors import AutometaError, PluginError
from autometa.inputs import MASK_PREFIX
from autometa.plugins import Registry
from autometa.types import Task

# Trials of one-step learners on standard splits up to this many training + validation rows are
# scored by cross-validation (``cross_validate``): above it the validation rows alone are
# many enough (their accuracy's standard error is under about 1.5 points) and the folds' fits cost more.
CROSS_VALIDATION_ROWS = 5000
CROSS_VALIDATION_FOLDS = 4  # the validation rows and three folds of the training rows


def _plugin_call(registry: Registry, kind: str, name: str, build: Callable[[], Any]) -> Any:
    """Run plugin code, turning its failure into an error that names the plugin."""
    try:
        return build()
    except AutometaError:
        raise
    except Exception as exc:
        info = registry.get(kind, name)
        raise PluginError(
            f"{kind.replace('_', '-')} {name!r} from plugin {info.plugin!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def train(
    config: Config,
    split: Split,
    *,
    seed: int,
    steps: int,
    eval_every: int,
    registry: Registry,
    report: Callable[[int, float], None] | None = None,
    check: Callable[[int, float], bool] | None = None,
    validated: Callable[[list[torch.Tensor], float, float], None] | None = None,
) -> tuple[MetaAlgorithm, Score]:
    """Build the model for ``config``, meta-train it and return it with its validation score.

    ``report(step, accuracy)`` is called at each validation checkpoint (it may raise to stop, as
    a pruned trial does); ``check(step, scoring_s)`` after every step, with the seconds that
    scoring every validation task is expected to take (from the latest checkpoint's time per task;
    0 before the first): when it returns True (out of time), training ends there and the model is
    scored on all validation tasks as trained so far.
    ``validated(probabilities, seconds, fit_seconds)`` receives that final scoring's per-task query
    probabilities (kept for ensembles without predicting the validation tasks again), how long
    it took (what scoring the test tasks will cost, per task) and how long the training steps took
    (for a one-step learner, what another fit will cost; building the model and deriving its
    inputs are not counted)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = split.pool
    specs = pool.features.specs
    input_keys = {}
    for m, e in config.encoders.items():
        cls = registry.get("encoder", e).cls
        key = None
        if cls.derives_input():
            key = _plugin_call(registry, "encoder", e, lambda: add_derived(
                pool.features, split.dataset, m, cls, split.row_splits["train"], shared=split.shared))
        input_keys[m] = key or m
    def build(key: str, *args, **kwargs):
        kind = key.split(".")[0]
        name = config.encoders[key.split(".", 1)[1]] if kind == "encoder" else getattr(config, kind)
        return _plugin_call(registry, kind, name, lambda: registry.get(kind, name).cls(*args, **kwargs))

    backbone = assemble_backbone(config, specs, input_keys, build).to(pool.device)
    _probe(backbone, pool, config, registry)
    algorithm = _plugin_call(
        registry, "meta_algorithm", config.meta_algorithm,
        lambda: registry.get("meta_algorithm", config.meta_algorithm).cls(**config.meta_params),
    )
    _plugin_call(registry, "meta_algorithm", config.meta_algorithm,
                 lambda: algorithm.setup(backbone, pool, (split.ways, split.shots, split.queries)))
    score, per_task, fit_s = None, 0.0, 0.0
    for step in range(1, steps + 1):
        stepping = time.perf_counter()
        loss = _plugin_call(registry, "meta_algorithm", config.meta_algorithm, lambda: algorithm.train_step(pool, rng))
        fit_s += time.perf_counter() - stepping
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            info = registry.get("meta_algorithm", config.meta_algorithm)
            raise PluginError(
                f"meta-algorithm {config.meta_algorithm!r} from plugin {info.plugin!r}: train_step returned "
                f"{type(loss).__name__}, not the training loss as a number"
            ) from None
        if not math.isfinite(loss):
            raise TrialDiverged(f"training loss became {loss} at step {step}; the learning rates are likely too high")
        stopped = step < steps and check is not None and check(step, per_task * len(split.validation))
        last = step == steps or stopped or algorithm.fits_in_one_step
        if step % eval_every == 0 or last:
            # Checkpoints score a fixed subsample (for the pruner); the last step every validation task.
            tasks = split.validation if last else split.checkpoint_tasks
            scoring = time.perf_counter()
            probabilities = _plugin_call(registry, "meta_algorithm", config.meta_algorithm,
                                         lambda: predict_probabilities(algorithm, tasks))
            score = score_probabilities(probabilities, tasks)
            scoring = time.perf_counter() - scoring
            per_task = scoring / max(1, len(tasks))
            if last and validated is not None:
                validated(probabilities, scoring, fit_s)
            if report is not None and not stopped:
                report(step, score.mean)
        if last:
            break
    return algorithm, score


def refit(config: Config, split: Split, *, seed: int, registry: Registry) -> MetaAlgorithm:
    """``config``'s learner fitted on the training and validation rows of a standard split.

    For learners that fit in one step (``MetaAlgorithm.fits_in_one_step``: gbm, linear), as
    scikit-learn's grid search refits its best: the validation rows chose the configuration
    and, once it is chosen, train it too (a quarter more rows at 60/20/20). The features stay
    as the search made them (fitted encoders on the training rows only); test rows are not read.
    """
    return _fit_once(config, split, refit_rows(split), seed=seed, registry=registry)


def refit_rows(split: Split) -> np.ndarray:
    """The rows ``refit`` fits on: the training and validation rows."""
    return np.concatenate([split.row_splits["train"], split.row_splits["validation"]])


def refits(config: Config, split: Split, registry: Registry) -> bool:
    """True when ``refit`` applies: a standard split and a learner that fits in one step."""
    return split.protocol == "standard" and registry.get("meta_algorithm", config.meta_algorithm).cls.fits_in_one_step


def cross_validates(config: Config, split: Split, registry: Registry) -> bool:
    """True when a trial of ``config`` is scored by ``cross_validate``: a learner that fits in one
    step, on a standard split of at most ``CROSS_VALIDATION_ROWS`` training + validation rows."""
    if not refits(config, split, registry):
        return False
    train_rows, validation_rows = len(split.row_splits["train"]), len(split.row_splits["validation"])
    return CROSS_VALIDATION_FOLDS - 1 <= train_rows and train_rows + validation_rows <= CROSS_VALIDATION_ROWS


def cross_validate(config: Config, split: Split, validation_hits: int, *, seed: int, registry: Registry) -> float:
    """Accuracy over every training and validation row, each predicted by a fit that did not see it.

    The validation rows are one fold, scored by the trial's own fit (``validation_hits``); the
    training rows are cut into ``CROSS_VALIDATION_FOLDS`` - 1 more (stratified), each predicted
    by a fit on the other training rows and the validation rows. At 60/20/20 every fold's fit
    learns from as many rows as the trial's own, and the estimate rests on four times as many
    rows as the validation rows alone: on small data a choice between cheap learners otherwise
    follows the noise of a few hundred rows. Features are the search's (fitted on the training
    rows, labels unseen); test rows are not read.
    """
    train_rows, validation_rows = split.row_splits["train"], split.row_splits["validation"]
    labels = split.pool.labels.cpu().numpy()
    folds = StratifiedKFold(CROSS_VALIDATION_FOLDS - 1, shuffle=True, random_state=seed)
    hits = validation_hits
    with warnings.catch_warnings():  # a class with fewer training rows than folds is expected on small data
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        parts = list(folds.split(train_rows, labels[train_rows]))
    for kept, held in parts:
        fitted_on = np.concatenate([train_rows[kept], validation_rows])
        algorithm = _fit_once(config, split, fitted_on, seed=seed, registry=registry)
        # As the standard protocol's tasks: the fit's rows are the support, the held-out ones the queries.
        support, query = (torch.as_tensor(r, device=split.pool.device) for r in (fitted_on, train_rows[held]))
        fold = Task(split.pool.features, support, split.pool.labels[support], query, split.pool.labels[query],
                    split.pool.n_classes, same_classes_as_training=True)
        probabilities = _plugin_call(registry, "meta_algorithm", config.meta_algorithm,
                                     lambda: predict_probabilities(algorithm, [fold]))
        hits += int((probabilities[0].argmax(-1).cpu() == fold.query_y.cpu()).sum())
    return hits / (len(train_rows) + len(validation_rows))


def _fit_once(config: Config, split: Split, rows: np.ndarray, *, seed: int, registry: Registry) -> MetaAlgorithm:
    """``config``'s one-step learner, built as a trial builds it, fitted on ``rows`` of a standard split."""
    algorithm, _ = train(config, split, seed=seed, steps=0, eval_every=1, registry=registry)
    pool = split.pool.over(rows)
    _plugin_call(registry, "meta_algorithm", config.meta_algorithm,
                 lambda: algorithm.train_step(pool, np.random.default_rng(seed)))
    return algorithm


def _probe(backbone: Backbone, pool, config: Config, registry: Registry) -> None:
    """Run each encoder and the fusion on two training rows, so a plugin that fails or returns
    the wrong shape is named before a meta-algorithm's traceback would hide it."""
    rows = torch.as_tensor(pool.rows[:2], device=pool.device)
    inputs = pool.features.take(rows)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the trial's random state is not touched
        embeddings = {}
        for m, encoder in backbone.encoders.items():
            name = config.encoders[m]
            out = _plugin_call(registry, "encoder", name, lambda: encoder(inputs[backbone.input_keys[m]]))
            _expect_shape(registry, "encoder", name, out, (len(rows), encoder.out_dim))
            embeddings[m] = out
        masks = {m: inputs[MASK_PREFIX + m] for m in backbone.encoders if MASK_PREFIX + m in inputs}
        fused = _plugin_call(registry, "fusion", config.fusion, lambda: backbone.fusion(embeddings, masks or None))
        _expect_shape(registry, "fusion", config.fusion, fused, (len(rows), backbone.fusion.out_dim))


def _expect_shape(registry: Registry, kind: str, name: str, tensor, expected: tuple[int, int]) -> None:
    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
    if shape != expected:
        info = registry.get(kind, name)
        raise PluginError(
            f"{kind} {name!r} from plugin {info.plugin!r} returned shape {shape} for {expected[0]} rows; expected {expected} "
            "([batch, out_dim])"
        )


class TrialDiverged(AutometaError):
    """Training produced a non-finite loss."""


def count_parameters(algorithm: MetaAlgorithm) -> int:
    return sum(p.numel() for m in algorithm.modules().values() for p in m.parameters())
