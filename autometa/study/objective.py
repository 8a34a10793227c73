"""The Optuna objective: one trial is one configuration sampled, trained and scored on the
validation tasks; the spec that rebuilds a search's split and space in any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, NoReturn

import optuna
import torch
from optuna.trial import TrialState

from autometa.config import Config, configuration_seed, sample_config, stored_config
from autometa.data.loading import Dataset, load_dataset
from autometa.data.protocols import Split, make_split
from autometa.data.scoring import chance_accuracy
from autometa.errors import AutometaError, SearchError, first_line
from autometa.plugins import Registry, get_registry
from autometa.store import schema
from autometa.study.devices import Slot
from autometa.study.kept import KEPT, KeptModels
from autometa.study.leaderboard import _keep_best
from autometa.study.training import (CROSS_VALIDATION_FOLDS, count_parameters, cross_validate, cross_validates,
                                     refit_rows, refits, train)

logger = logging.getLogger("autometa.study.objective")

CHANCE_WARMUP_CHECKPOINTS = 2  # validation checkpoints a trial gets before it must beat chance
TRIAL_TIMEOUT_FRACTION = 0.25  # a trial's default time limit, as a share of --timeout
# At most this share of --timeout is kept back from the trials for scoring the finalists on the
# test tasks (the rest always goes to trials, however slow the finalists are to score).
RESERVE_FRACTION = 0.5
# Hyperband's step: a third of the trials at a rung go on to a three times longer budget.
REDUCTION_FACTOR = 3


@dataclass(frozen=True)
class TrialLimits:
    """When a running trial stops early, scored as trained so far: at ``deadline`` (a
    ``time.time()`` value, the search's --timeout) less ``reserve``, and after ``seconds`` of its own.

    ``reserve`` is a shared double (``multiprocessing`` raw value, so worker processes read what
    the search process writes): the seconds kept back from the deadline for the work after the
    trials (the finalists' test scoring and refits), which the search estimates as trials finish
    (see ``scoring_reserve``).
    """

    deadline: float | None = None
    seconds: float | None = None
    reserve: Any = field(default=None, compare=False, repr=False)
    timeout: float | None = field(default=None, compare=False)

    @classmethod
    def for_search(cls, timeout: float | None, trial_timeout: float | None, started: float) -> "TrialLimits":
        """A search's limits: its --timeout from ``started`` on; without --trial-timeout, each trial
        at most ``TRIAL_TIMEOUT_FRACTION`` of it (an explicit --trial-timeout kills the worker instead)."""
        if timeout is None:
            return cls()
        reserve = multiprocessing.get_context("spawn").RawValue("d", 0.0)
        return cls(started + timeout, TRIAL_TIMEOUT_FRACTION * timeout if trial_timeout is None else None, reserve, timeout)

    def kept_back(self) -> float:
        return 0.0 if self.reserve is None else self.reserve.value

    def stop_at(self) -> float | None:
        """When trials stop: the deadline less the time kept for the work after the trials."""
        return None if self.deadline is None else self.deadline - self.kept_back()

    def keep_back(self, seconds: float) -> None:
        """Keep ``seconds`` of the search's time for the work after the trials, at most
        ``RESERVE_FRACTION`` of the --timeout (trials always get the rest)."""
        if self.reserve is not None:
            self.reserve.value = min(seconds, RESERVE_FRACTION * self.timeout)


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
                 db: str | None = None, limits: TrialLimits | None = None):
        self.split, self.registry, self.spec, self.device = split, registry, spec, device
        self.label, self.events, self.parent_pid, self.bar = label or device, events, parent_pid, bar
        self.cache, self.top_k, self.db = cache, top_k, db
        self.limits = limits or TrialLimits()
        self.stop_requested = False
        self.chance = chance_accuracy(split.checkpoint_tasks)  # what the checkpoints score
        self._configs: dict[int, Config] = {}  # finished trials' configurations, by trial number

    def _finished(self, trial: optuna.Trial):
        """The study's other finished trials that ran (not duplicates), with their configurations."""
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if other.number == trial.number or not other.params or "duplicate_of" in other.user_attrs:
                continue
            if other.number not in self._configs:
                try:
                    self._configs[other.number] = stored_config(other.params, self.registry, self.spec.choices)
                except Exception:  # parameters of components no longer installed
                    continue
            yield other, self._configs[other.number]

    def _same_as(self, trial: optuna.Trial, config: Config) -> optuna.trial.FrozenTrial | None:
        """A finished trial of the study with this configuration: training it again would
        reproduce its score (the training seed is the configuration's), so it is not repeated."""
        return next((other for other, found in self._finished(trial) if found == config), None)

    def _expected_fit(self, trial: optuna.Trial, config: Config) -> float | None:
        """Seconds a one-step learner's fit is expected to take (the median training step of the
        study's earlier trials of that learner), or None: a learner that trains in steps stops at
        the --timeout between them, and a learner's first fit has nothing to go by."""
        if not self.registry.get("meta_algorithm", config.meta_algorithm).cls.fits_in_one_step:
            return None
        fits = sorted(other.user_attrs["fit_s"] for other, found in self._finished(trial)
                      if found.meta_algorithm == config.meta_algorithm and "fit_s" in other.user_attrs)
        return fits[len(fits) // 2] if fits else None

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
        if self.limits.deadline is not None and time.time() >= self.limits.stop_at():
            # Claimed just before the deadline (a slow worker start, a busy database): not started.
            _prune_untrained(trial, "not started: the search's --timeout had passed")
        same = self._same_as(trial, config)
        if same is not None:
            trial.set_user_attr("duplicate_of", same.number)
            if same.state == TrialState.PRUNED:
                _prune_untrained(trial, f"same configuration as trial {same.number} "
                                        f"({same.user_attrs.get('prune_reason', 'pruned')})")
            trial.set_user_attr("wall_time_s", 0.0)
            return same.value
        expected = None if self.limits.deadline is None else self._expected_fit(trial, config)
        if expected is not None and time.time() + expected >= self.limits.stop_at():
            # Its fit cannot stop at the --timeout: started now, it would hold the search past its
            # end (or be killed there). This worker starts no more trials: the time left is short.
            self.stop_requested = True
            _prune_untrained(trial, f"not started: a {config.meta_algorithm} fit takes about {expected:.1f}s "
                                    "(its earlier trials), more than is left before the search's --timeout")
        self._emit("start", self.label, trial.number, config.label())
        if self.bar is not None:
            self.bar.set_description(f"trial {trial.number}: {config.label()}")
        started = time.perf_counter()
        last = ""  # the latest validation accuracy, for the reason a trial stops

        def report(step: int, value: float) -> None:
            nonlocal last
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.stop_requested = True  # the search process is gone: leave the trial for recovery
                raise SystemExit(0)
            trial.report(value, step)
            last = f" (validation {100 * value:.1f}%)"
            self._emit("step", self.label, trial.number, step, spec.steps, value)
            if self.bar is not None:
                self.bar.set_postfix_str(f"step {step}/{spec.steps} val {100 * value:.1f}%")
            if step < spec.steps and step >= CHANCE_WARMUP_CHECKPOINTS * spec.eval_every and value <= self.chance:
                raise optuna.TrialPruned(
                    f"below chance at step {step}: validation {100 * value:.1f}% is not above the "
                    f"{100 * self.chance:.1f}% of always guessing the most common class"
                )
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}{last}")

        def check(step: int, scoring_s: float) -> bool:
            """Out of time, once the ``scoring_s`` its final validation scoring will take are
            counted: the search's --timeout or the trial's own limit. The trial then ends and is
            scored as trained so far (its ``steps`` say how far), so a search always has a model
            when one trained at all; the leaderboard retrains it for as many steps."""
            limits, why = self.limits, None
            if limits.deadline is not None and time.time() + scoring_s >= limits.stop_at():
                if not last and trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                    # Never evaluated, it has no estimate of its scoring, which ran up to the 10 s
                    # grace past the --timeout (then the worker was killed), and a model trained
                    # this little does not beat the study's complete trials.
                    raise optuna.TrialPruned(f"stopped at step {step} of {spec.steps} by the search's --timeout "
                                             "before its first evaluation; not scored, the study has complete trials")
                why = "the search's --timeout"
                if limits.kept_back() > 0:
                    why += f" (less {limits.kept_back():.0f}s kept for the finalists' test scoring and refits)"
            elif limits.seconds is not None and time.perf_counter() - started + scoring_s >= limits.seconds:
                why = (f"the trial time limit of {limits.seconds:g}s ({TRIAL_TIMEOUT_FRACTION:g} of --timeout; "
                       "--trial-timeout sets another)")
            if why is None:
                return False
            trial.set_user_attr("steps", step)
            trial.set_user_attr("stopped", f"stopped at step {step} of {spec.steps} by {why}; scored as trained so far")
            return True

        validated: list[tuple[list[torch.Tensor], float, float]] = []
        try:
            algorithm, score = train(
                config, self.split, seed=trial_seed, steps=spec.steps, eval_every=spec.eval_every,
                registry=self.registry, report=report, check=check, validated=lambda *found: validated.append(found),
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
        probabilities, scoring_s, fit_s = validated[-1]
        value = score.mean
        if algorithm.fits_in_one_step:
            trial.set_user_attr("fit_s", fit_s)  # what its learner's next fit may take (_expected_fit)
        if refits(config, self.split, self.registry):
            # What refitting it on the training + validation rows after the search will take
            # (scoring_reserve), from this fit on the training rows alone.
            growth = len(refit_rows(self.split)) / max(1, len(self.split.row_splits["train"]))
            trial.set_user_attr("refit_s", growth * fit_s)
        if cross_validates(config, self.split, self.registry):
            value = self._cross_validated(trial, config, trial_seed, probabilities, score.mean, started, fit_s)
        trial.set_user_attr("wall_time_s", time.perf_counter() - started)
        trial.set_user_attr("parameters", count_parameters(algorithm))
        # Seconds per validation task to adapt and predict: what the test tasks will cost (scoring_reserve).
        trial.set_user_attr("scoring_s_per_task", scoring_s / max(1, len(probabilities)))
        self._keep(trial, value, algorithm, probabilities)
        return value

    def _cross_validated(self, trial: optuna.Trial, config: Config, seed: int, probabilities: list[torch.Tensor],
                         holdout: float, started: float, fit_s: float) -> float:
        """The trial's cross-validated accuracy (``cross_validate``), or its validation accuracy
        when the folds' fits (each as long as the trial's own training step, ``fit_s``) would run
        past its time limits."""
        trial.set_user_attr("holdout_validation", holdout)
        folds = CROSS_VALIDATION_FOLDS - 1
        needed = folds * fit_s
        limits = self.limits
        if ((limits.deadline is not None and time.time() + needed >= limits.stop_at())
                or (limits.seconds is not None and time.perf_counter() - started + needed >= limits.seconds)):
            trial.set_user_attr("cross_validation", "not run: its folds' fits would pass the time limit")
            return holdout
        task = self.split.validation[0]
        hits = int((probabilities[0].argmax(-1).cpu() == task.query_y.cpu()).sum())
        value = cross_validate(config, self.split, hits, seed=seed, registry=self.registry)
        rows = len(self.split.row_splits["train"]) + len(task.query)
        trial.set_user_attr("cross_validation", f"{CROSS_VALIDATION_FOLDS} folds over {rows} training + validation rows")
        return value

    def _keep(self, trial: optuna.Trial, value: float, algorithm, probabilities: list[torch.Tensor]) -> None:
        """What the ensemble and the leaderboard use after the search: the trial's validation
        predictions (in the database) and, if it is among the best, its trained model (in this
        process's cache, else in the study's weights folder)."""
        if self.cache is not None:
            _keep_best(self.cache, trial.number, value, algorithm, self.top_k)
        if self.db is None:
            return
        study = trial.study.study_name
        schema.record_predictions(self.db, study, trial.number, probabilities)
        if self.cache is None:
            try:
                KeptModels(self.db, study, self.top_k).keep(trial.number, value, algorithm)
            except OSError as exc:  # a full disk costs a retraining later, not the trial
                logger.warning("trial %s: trained model not kept (%s); the leaderboard retrains it", trial.number, exc)


def _prune_untrained(trial: optuna.Trial, reason: str) -> NoReturn:
    """End ``trial`` as pruned for ``reason`` before any training (no time spent)."""
    trial.set_user_attr("wall_time_s", 0.0)
    trial.set_user_attr("prune_reason", reason)
    raise optuna.TrialPruned(reason)


def enqueue_new(study: optuna.Study, params: dict[str, Any], registry: Registry, choices: dict[str, list[str]],
                user_attrs: dict[str, Any] | None = None) -> bool:
    """Queue ``params`` (with ``user_attrs``) unless a trial of ``study`` (queued, running or
    finished) already has the same configuration: parameters are compared as configurations, so
    a seed that carries parameters its configuration does not use is still recognised. Returns
    whether it was queued."""
    config = stored_config(params, registry, choices)
    for t in study.get_trials(deepcopy=False):
        try:
            if stored_config({**t.params, **t.system_attrs.get("fixed_params", {})}, registry, choices) == config:
                return False
        except Exception:  # a trial of components no longer installed is no duplicate
            continue
    study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)
    return True


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


class StepsHyperband(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband with the resource in training steps, which prunes nothing until
    ``startup_trials`` trials have finished: successive halving compares a trial with those that
    reached its rung before, and the first few have too few competitors for "the best third" to
    mean anything (the same reason MedianPruner has ``n_startup_trials``). Their rung values are
    still recorded, so later trials compete with them."""

    def __init__(self, *, startup_trials: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.startup_trials = startup_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if not super().prune(study, trial):
            return False
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) >= self.startup_trials


def default_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """Hyperband over training steps: brackets of successive halving whose first rung is the
    first validation checkpoint (``eval_every`` steps) and whose longest budget is the full
    ``steps``, so most steps go to the trials that lead at each rung instead of to every trial's
    full length."""
    return StepsHyperband(
        min_resource=spec.eval_every, max_resource=max(spec.steps, spec.eval_every), reduction_factor=REDUCTION_FACTOR,
        startup_trials=REDUCTION_FACTOR,
    )


def build_runner(
    slot: Slot, spec: SearchSpec, dataset: Dataset | None, sampler=None, pruner=None, existing: int = 0,
    limits: TrialLimits | None = None, shared: str | None = None, *, events=None, parent_pid=None, db: str | None = None,
) -> TrialRunner:
    """A worker's objective: rebuild the (deterministic) split on the worker's device, from the
    inputs the search process preprocessed into ``shared`` when it gives that folder.

    Each worker samples with its own seed, so parallel workers do not propose the same trials.
    """
    if dataset is None:
        if spec.data is None:
            raise SearchError("this search's data was passed as an object, so it cannot be reloaded; give a file path")
        dataset = load_dataset(spec.data, spec.label, group=spec.group, columns=spec.columns, image_size=spec.image_size)
    split = make_split(
        dataset, spec.protocol, ways=spec.ways, shots=spec.shots, queries=spec.queries,
        validation_tasks=spec.validation_tasks, test_tasks=spec.test_tasks, seed=spec.seed, device=slot.device,
        shared=shared,
    )
    runner = TrialRunner(split, get_registry(), spec, slot.device, label=slot.label, events=events, parent_pid=parent_pid,
                         db=db, limits=limits)
    offset = 7919 * existing + 104729 * (slot.index + 1) + 31 * sum(map(ord, slot.device)) + os.getpid() % 997
    runner.sampler = sampler or default_sampler(spec, offset)
    runner.pruner = pruner or default_pruner(spec)
    return runner
