"""The Optuna objective: one trial is one configuration sampled, trained and scored on the
validation tasks; the spec that rebuilds a search's split and space in any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from autometa.config import configuration_seed, sample_config
from autometa.data.loading import Dataset, load_dataset
from autometa.data.protocols import Split, make_split
from autometa.errors import AutometaError, SearchError, first_line
from autometa.plugins import Registry, get_registry
from autometa.study.devices import Slot
from autometa.data.scoring import predict_probabilities
from autometa.store import schema
from autometa.study.kept import KEPT, KeptModels
from autometa.study.leaderboard import _keep_best
from autometa.study.training import count_parameters, train

logger = logging.getLogger("autometa.study.objective")


@dataclass
class SearchSpec:
    """How to rebuild a search's split and space anywhere: in a worker process or on another
    machine (stored with the study for `autometa worker`)."""

    data: str | None
    label: str
    group: str | None
    columns: dict[str, str]
    image_size: tuple[int, int]
    protocol: str
    ways: int
    shots: int
    queries: int
    validation_tasks: int
    test_tasks: int
    seed: int
    choices: dict[str, list[str]]
    steps: int
    eval_every: int
    budget: int
    fingerprint: str = ""  # the data's (specs stored before study keys lack it)

    def settings(self) -> dict[str, Any]:
        """What makes a study one experiment: everything that changes its split or its
        objective. Not the budget, the timeouts or the devices, nor where the data file lies;
        nor settings its protocol ignores (ways on the standard protocol, task counts outside
        few-shot, the image size without images)."""
        found = {
            "label": self.label, "group": self.group, "columns": self.columns, "protocol": self.protocol,
            "seed": self.seed, "shots": self.shots, "queries": self.queries, "steps": self.steps,
            "eval_every": self.eval_every, "choices": self.choices,
        }
        if self.protocol != "standard":
            found["ways"] = self.ways
        if self.protocol == "fewshot":
            found.update(validation_tasks=self.validation_tasks, test_tasks=self.test_tasks)
        if "image" in self.columns.values():
            found["image_size"] = "×".join(map(str, self.image_size))
        return found

    def key(self) -> str:
        """A short hash of the data's fingerprint and :meth:`settings`: the study's identity."""
        text = json.dumps([self.fingerprint, self.settings()], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SearchSpec":
        data = dict(data)
        data["image_size"] = tuple(data["image_size"])
        return cls(**data)


class TrialRunner:
    """Optuna's objective: sample a configuration, meta-train it, return validation accuracy."""

    def __init__(self, split: Split, registry: Registry, spec: SearchSpec, device: str, *, label: str = "",
                 events=None, parent_pid: int | None = None, bar=None, cache: dict | None = None, top_k: int = KEPT,
                 db: str | None = None):
        self.split, self.registry, self.spec, self.device = split, registry, spec, device
        self.label, self.events, self.parent_pid, self.bar = label or device, events, parent_pid, bar
        self.cache, self.top_k, self.db = cache, top_k, db
        self.stop_requested = False

    def _emit(self, *event) -> None:
        if self.events is not None:
            self.events.put(event)

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.spec
        try:
            config = sample_config(trial, self.registry, spec.choices)
        except Exception as exc:  # a plugin's suggest() or a queued value outside the choices
            trial.set_user_attr("wall_time_s", 0.0)
            trial.set_user_attr("fail_reason", f"sampling the configuration failed: {failure_reason(exc, self.device)}")
            raise
        trial_seed = configuration_seed(spec.seed, trial.params)
        for key, value in (("seed", trial_seed), ("device", self.device), ("steps", spec.steps),
                           ("worker", self.label), ("pid", os.getpid()), ("host", platform.node())):
            trial.set_user_attr(key, value)
        self._emit("start", self.label, trial.number, config.label())
        if self.bar is not None:
            self.bar.set_description(f"trial {trial.number}: {config.label()}")
        started = time.perf_counter()

        def report(step: int, value: float) -> None:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.stop_requested = True  # the search process is gone: leave the trial for recovery
                raise SystemExit(0)
            trial.report(value, step)
            self._emit("step", self.label, trial.number, step, spec.steps, value)
            if self.bar is not None:
                self.bar.set_postfix_str(f"step {step}/{spec.steps} val {100 * value:.1f}%")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (validation {100 * value:.1f}%)")

        try:
            algorithm, score = train(
                config, self.split, seed=trial_seed, steps=spec.steps, eval_every=spec.eval_every,
                registry=self.registry, report=report,
            )
        except optuna.TrialPruned as exc:
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            trial.set_user_attr("prune_reason", str(exc))
            raise
        except Exception as exc:
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            trial.set_user_attr("fail_reason", failure_reason(exc, self.device))
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            raise
        finally:
            self._emit("end", self.label, trial.number)
        trial.set_user_attr("wall_time_s", time.perf_counter() - started)
        trial.set_user_attr("parameters", count_parameters(algorithm))
        self._keep(trial, score.mean, algorithm)
        return score.mean

    def _keep(self, trial: optuna.Trial, value: float, algorithm) -> None:
        """What the ensemble and the leaderboard use after the search: the trial's validation
        predictions (in the database) and, if it is among the best, its trained model (in this
        process's cache, else in the study's weights folder)."""
        if self.cache is not None:
            _keep_best(self.cache, trial.number, value, algorithm, self.top_k)
        if self.db is None:
            return
        study = trial.study.study_name
        try:
            probabilities = predict_probabilities(algorithm, self.split.validation)
        except AutometaError as exc:  # scored a moment ago, so unlikely: the trial stands, without ensemble
            logger.warning("trial %s: validation predictions not kept: %s", trial.number, exc)
            return
        schema.record_predictions(self.db, study, trial.number, probabilities)
        if self.cache is None:
            try:
                KeptModels(self.db, study, self.top_k).keep(trial.number, value, algorithm)
            except OSError as exc:  # a full disk costs a retraining later, not the trial
                logger.warning("trial %s: trained model not kept (%s); the leaderboard retrains it", trial.number, exc)


def failure_reason(exc: BaseException, device: str) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory on {device}: {first_line(exc)}"
    return str(exc) if isinstance(exc, AutometaError) else f"{type(exc).__name__}: {exc}"


def default_sampler(spec: SearchSpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """Multivariate, grouped TPE (the space is conditional), liar-aware for parallel workers."""
    with warnings.catch_warnings():  # multivariate/group are stable in practice, still flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            multivariate=True, group=True, seed=spec.seed + offset,
            n_startup_trials=min(10, max(3, spec.budget // 3)), constant_liar=True,
        )


def default_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=spec.eval_every)


def build_runner(
    slot: Slot, spec: SearchSpec, dataset: Dataset | None, sampler=None, pruner=None, existing: int = 0, *,
    events=None, parent_pid=None, db: str | None = None,
) -> TrialRunner:
    """A worker's objective: rebuild the (deterministic) split on the worker's device.

    Each worker samples with its own seed, so parallel workers do not propose the same trials.
    """
    if dataset is None:
        if spec.data is None:
            raise SearchError("this search's data was passed as an object, so it cannot be reloaded; give a file path")
        dataset = load_dataset(spec.data, spec.label, group=spec.group, columns=spec.columns, image_size=spec.image_size)
    split = make_split(
        dataset, spec.protocol, ways=spec.ways, shots=spec.shots, queries=spec.queries,
        validation_tasks=spec.validation_tasks, test_tasks=spec.test_tasks, seed=spec.seed, device=slot.device,
    )
    runner = TrialRunner(split, get_registry(), spec, slot.device, label=slot.label, events=events, parent_pid=parent_pid,
                         db=db)
    offset = 7919 * existing + 104729 * (slot.index + 1) + 31 * sum(map(ord, slot.device)) + os.getpid() % 997
    runner.sampler = sampler or default_sampler(spec, offset)
    runner.pruner = pruner or default_pruner(spec)
    return runner
