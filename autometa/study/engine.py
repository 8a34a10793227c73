"""The search: an Optuna study over meta-algorithm × fusion × encoders and their hyperparameters.

One study per (dataset fingerprint, protocol) in the database, resumable: ``trials`` is the
study's total budget. Every trial trains on the training pool and is scored on the split's
fixed validation tasks; only the leaderboard's finalists are scored on the test tasks.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from autometa._version import __version__
from autometa.components import MetaAlgorithm
from autometa.config import check_component_names, default_trials, search_choices, stored_config
from autometa.data.loading import Dataset, load_dataset
from autometa.data.metafeatures import describe
from autometa.data.protocols import Split, choose_protocol, make_split, task_size
from autometa.data.scoring import baselines, caveats
from autometa.errors import AutometaError, SearchError
from autometa.plugins import Registry, get_registry
from autometa.results.artifacts import folder_name, save_ensemble, save_model
from autometa.store import schema
from autometa.store.storage import FINISHED, checkpoint, storage_for
from autometa.study import warmstart
from autometa.study.budget import STOPPED, Patience, budget_used
from autometa.study.devices import resolve_devices, worker_label
from autometa.study.ensemble import build_ensemble
from autometa.study.kept import KEPT, KeptModels
from autometa.study.leaderboard import SearchResult, TrainedModels, _leaderboard, scoring_reserve
from autometa.study.objective import (
    SearchSpec, TrialLimits, TrialRunner, build_runner, default_pruner, default_sampler,
)
from autometa.study.pool import recover_orphans, run_pool
from autometa.study.settings import SearchSettings

logger = logging.getLogger("autometa.study.engine")


# How far past --timeout's end (a share of it) refits of learners that fit in one step may start
# and the ensemble's extra members (beyond the finalists) may be scored on the test tasks.
OVERTIME_SHARE = 0.1

def open_study(name: str, storage, db: str, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    try:
        return optuna.create_study(
            study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
        )
    except AutometaError:
        raise
    except Exception as exc:
        raise SearchError(f"cannot open the study database {db}: {type(exc).__name__}: {exc}") from exc


def study_name_for(dataset: Dataset, spec: SearchSpec) -> str:
    """``DATASET-PROTOCOL-KEY``: one study per data and settings (see :meth:`SearchSpec.key`)."""
    return f"{dataset.name}-{spec.protocol}-{spec.key()}"


def study_name(data: str | Path | Dataset, label: str | None = None, settings: SearchSettings | None = None,
               **overrides: Any) -> str:
    """The study ``search(data, label, settings, **overrides)`` opens: its ``study`` setting, else
    the name of its data and settings."""
    settings = (settings or SearchSettings()).replace(**overrides)
    if settings.study:
        return settings.study
    dataset, data_path = _load(data, label, settings.group, settings.columns, settings.image_size)
    return study_name_for(dataset, _spec(dataset, data_path, get_registry(), settings))


def _load(data, label, group, columns, image_size) -> tuple[Dataset, str | None]:
    if isinstance(data, Dataset):
        return data, None
    if label is None:
        raise SearchError("a label column is required (--label NAME)")
    dataset = load_dataset(data, label, group=group, columns=columns, image_size=image_size)
    return dataset, str(Path(data).resolve())


def _spec(dataset: Dataset, data_path: str | None, registry: Registry, settings: SearchSettings, say=None) -> SearchSpec:
    """The search's spec; ``say`` gets a note for each component left out (too large a task...)."""
    protocol = choose_protocol(dataset, settings.protocol)
    size = task_size(dataset, protocol, ways=settings.ways, shots=settings.shots)
    choices = search_choices(registry, protocol, dataset.modalities, settings.include, size, say)
    return SearchSpec(
        data_path, dataset.label_column, dataset.group_column, {c.name: c.modality for c in dataset.columns},
        tuple(settings.image_size), protocol, settings.ways, settings.shots, settings.queries, settings.validation_tasks,
        settings.test_tasks, settings.seed, choices, settings.steps, settings.eval_every, settings.trial_budget, dataset.fingerprint,
    )


class _TrainingMetaFeatures:
    """The meta-features of the split's training rows, computed once when first asked for.

    Training rows only: warm start seeds this search from them, so nothing about its
    validation or test rows (their labels included) may reach them.
    """

    def __init__(self, dataset: Dataset, split: Split):
        self.dataset, self.split, self.value = dataset, split, None

    def __call__(self) -> dict[str, float]:
        if self.value is None:
            self.value = describe(self.dataset.subset(self.split.row_splits["train"]))
        return self.value


def search(
    data: str | Path | Dataset, label: str | None = None, settings: SearchSettings | None = None, **overrides: Any
) -> SearchResult:
    """Search encoders × fusion × meta-algorithm on ``data`` and report the best on test tasks.

    ``settings`` (default ``SearchSettings()``) with ``overrides`` applied, e.g.
    ``search("data.csv", "label", trials=10, db="sqlite:///mine.db")``.

    Trials run in worker processes, ``trials_per_device`` on each of ``devices`` (``isolate``:
    a crash, out-of-memory abort or ``trial_timeout`` fails only that trial); ``isolate=False``
    runs them in this process, one at a time.

    ``defaults``: a new study runs one trial per meta-algorithm at default parameters before
    the sampler explores (False: the sampler chooses every trial). ``warm_start``: a new
    study's first trials include the best configurations of the
    ``warm_start_k`` most similar datasets in ``db`` and ``warm_start_prior`` (None: the
    database only), ``warm_start_configs`` in all, alternating with the default trials (see
    :mod:`autometa.study.warmstart`).
    """
    settings = (settings or SearchSettings()).replace(**overrides)
    # --timeout counts from here (or from the command's start): loading and preparing the data are part of it.
    started = settings.started or time.time()
    say = settings.echo or (lambda msg: print(msg, file=sys.stderr))
    if settings.warm_start and (settings.warm_start_k < 1 or settings.warm_start_configs < 1):
        raise SearchError("--warm-start-k and --warm-start-configs must be at least 1")
    if settings.trials is not None and settings.trials < 1:
        raise SearchError("--trials must be at least 1")
    if settings.steps < 1 or settings.eval_every < 1:
        raise SearchError("--steps and --eval-every must be at least 1")
    if settings.trial_timeout is not None and settings.trial_timeout <= 0:
        raise SearchError("--trial-timeout must be positive")
    if settings.patience < 0:
        raise SearchError(f"--patience must be 0 (off) or a number of completed trials, got {settings.patience}")
    if settings.output is not None:
        _check_output_folder(Path(settings.output))
    slots = resolve_devices(settings.devices, settings.trials_per_device)
    if not settings.isolate and len(slots) > 1:
        raise SearchError("several workers need isolated worker processes; drop isolate=False")
    if not settings.isolate and settings.trial_timeout is not None:
        raise SearchError("--trial-timeout needs isolated worker processes")
    device = torch.device(slots[0].device)
    registry = get_registry()
    check_component_names(registry, settings.include)  # a misspelt name fails before the data is read
    dataset, data_path = _load(data, label, settings.group, settings.columns, settings.image_size)
    say(dataset.summary())
    spec = _spec(dataset, data_path, registry, settings, say)
    # Preprocessed once, here: worker processes map these inputs read-only instead of making
    # their own (encoders that derive their own inputs, e.g. embeddings, do so when first chosen
    # and leave them there too).
    shared = tempfile.mkdtemp(prefix="autometa-inputs-") if settings.isolate else None
    split = None
    try:
        split = make_split(
            dataset, spec.protocol, ways=settings.ways, shots=settings.shots, queries=settings.queries,
            validation_tasks=settings.validation_tasks, test_tasks=settings.test_tasks, seed=settings.seed, device=device,
            shared=shared,
        )
        limits = TrialLimits.for_search(settings.timeout, settings.trial_timeout, started)
        return _search(settings, say, slots, device, registry, dataset, data_path, spec, split, limits)
    finally:
        if shared is not None:
            if split is not None:
                split.shared = None  # the returned split's inputs stay mapped; new ones are made in memory
            shutil.rmtree(shared, ignore_errors=True)


def _search(settings, say, slots, device, registry, dataset, data_path, spec, split, limits: TrialLimits) -> SearchResult:
    choices = spec.choices
    say(split.describe())
    name = settings.study or study_name_for(dataset, spec)
    meta_features = _TrainingMetaFeatures(dataset, split)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(settings.db)
    schema.recording_engine(settings.db)  # autometa's tables: made, upgraded from 0.1, or a newer schema refused
    existing = finished_trials(name, storage)
    custom = (settings.sampler, settings.pruner)
    # A resumed study gets a new seed so it does not replay the first random trials.
    sampler = settings.sampler or default_sampler(spec, offset=7919 * existing)
    pruner = settings.pruner or default_pruner(spec)
    optuna_study = open_study(name, storage, settings.db, sampler, pruner)
    _check_resume(optuna_study, dataset, name, spec, meta_features)
    recover_orphans(optuna_study, say)
    existing = finished_trials(name, storage)

    budget = settings.trial_budget
    remaining = budget - existing
    where = ", ".join(s.label for s in slots) if settings.isolate else str(device)
    if existing:
        say(f"study {name!r} resumed: {existing} trial(s) already finished, {max(0, remaining)} of the budget of "
            f"{budget} left")
    else:
        if settings.timeout is None:
            count = f"{budget} trial(s)"
        elif settings.trials is None:
            count = f"as many trials as {settings.timeout:g} s allow (at most {budget})"
        else:
            count = f"{budget} trial(s) or {settings.timeout:g} s, whichever ends first,"
        say(f"study {name!r} in {settings.db}: {count} on {where}")

    if not optuna_study.get_trials(deepcopy=False):
        KeptModels(settings.db, name).clear()
        seeds = []
        if settings.warm_start and remaining > 0:
            seeds = warmstart.plan_seeds(
                optuna_study, optuna_study.user_attrs.get("meta_features") or meta_features(), registry, choices,
                db=settings.db, prior=settings.warm_start_prior, k=settings.warm_start_k,
                configs=settings.warm_start_configs, say=say, fingerprint=dataset.fingerprint, protocol=spec.protocol,
            )
        defaults = default_trials(registry, choices, spec.protocol) if settings.defaults else []
        warmstart.enqueue_opening(optuna_study, defaults, seeds, max(0, remaining), registry, choices, say)
    # Every run of the search is a row of autometa_searches (a resumed one adds another).
    search_id = schema.begin_search(
        settings.db, study=name, dataset=dataset, source=data_path or (str(dataset.path) if dataset.path else None),
        protocol=split.protocol, budget=budget, seed=settings.seed, plugins=schema.plugin_versions(registry, choices),
        host=host_info(), autometa_version=__version__,
        describe=lambda d: optuna_study.user_attrs.get("meta_features") or meta_features(),  # computed once
    )
    try:
        cache: dict[int, tuple[float, MetaAlgorithm]] = {}
        if remaining > 0:
            # Time for the finalists' test scoring and the refits is kept back from the trials as they finish.
            refitted = 0 if not settings.refit else max(settings.top_k, KEPT) if settings.ensemble else settings.top_k
            reserve = lambda: limits.keep_back(  # noqa: E731
                scoring_reserve(optuna_study, settings.top_k, len(split.test), refitted))
            reserve()
            stop = _Stop(optuna_study, limits, Patience(settings.patience), say)
            if settings.isolate:
                _optimize_pool(optuna_study, settings.db, slots, spec, dataset, custom, existing, remaining,
                               settings.trial_timeout, registry, settings.progress, say, limits, split.shared, reserve, stop)
            else:
                runner = TrialRunner(split, registry, spec, str(device), cache=cache, top_k=max(settings.top_k, KEPT),
                                     db=settings.db, limits=limits)
                _optimize_here(optuna_study, runner, remaining, registry, choices, settings.progress, say, settings.db,
                               reserve, stop)
            if stop.reason == stop.TIMEOUT and settings.trials is not None:
                finished = budget_used(optuna_study, running=False)
                if finished < budget:
                    say(f"trials stopped at the --timeout ({settings.timeout:g} s) with {finished} of the study's "
                        f"{budget} finished: run the same command again to go on (--timeout 0: no time limit)")

        models = TrainedModels(split, registry, choices, settings.steps, settings.eval_every, cache,
                               KeptModels(settings.db, name, max(settings.top_k, KEPT)), refit=settings.refit,
                               refit_until=None if limits.deadline is None else limits.deadline + OVERTIME_SHARE * settings.timeout)
        leaderboard = _leaderboard(optuna_study, split, registry, choices, settings.top_k, models, say, limits.deadline)
        ensemble = None
        if settings.ensemble and leaderboard:
            candidates = KEPT
            # Past the budget, and the other members' test scoring would take long (few-shot
            # learners adapting to 600 support sets): members the leaderboard already scored.
            extra = (scoring_reserve(optuna_study, KEPT, len(split.test))
                     - scoring_reserve(optuna_study, settings.top_k, len(split.test)))
            if limits.deadline is not None and time.time() > limits.deadline and extra > OVERTIME_SHARE * settings.timeout:
                candidates = len(leaderboard)
                say(f"ensemble: the --timeout has passed, so it is chosen among the {len(leaderboard)} scored finalist(s) only")
            try:
                ensemble = build_ensemble(optuna_study, split, settings.db, models, say, candidates,
                                          test_probabilities=models.test_probabilities)
            except AutometaError as exc:  # e.g. a member's plugin failing on a test task: the finalists stand
                say(f"ensemble: not built: {exc}")
        if models.restored or models.retrained:
            say(f"trained models: {models.restored} loaded from the weights their workers kept, {models.retrained} retrained")
        if models.refitted:
            say(f"refitted on the training + validation rows for the test tasks and the saved model: trial(s) "
                f"{', '.join(map(str, sorted(models.refitted)))} (learners that fit in one step; --no-refit keeps their trials' fits)")
        if models.late:
            say(f"not refitted, more than {OVERTIME_SHARE:.0%} of --timeout past its end: trial(s) "
                f"{', '.join(map(str, sorted(models.late)))} (scored and saved as their trials fitted them)")
        plain = baselines(split)
        optuna_study.set_user_attr("baselines", [b.as_dict() for b in plain])
        optuna_study.set_user_attr("test_warnings", caveats(split))
        schema.record_finalists(settings.db, name, [e.as_dict() for e in leaderboard], [b.as_dict() for b in plain])
        schema.record_ensemble(settings.db, name, ensemble.as_dict() if ensemble else None)
        model_path = None
        if settings.output is not None and leaderboard:
            best = leaderboard[0]
            saved = dict(registry=registry, study=name, label=dataset.label_column, image_size=settings.image_size)
            folder = Path(settings.output) / folder_name(name)
            if ensemble is not None and ensemble.chosen:
                params = {t.number: t.params for t in optuna_study.get_trials(deepcopy=False)}
                members = [(w, t, algorithm, stored_config(params[t], registry, choices))
                           for (t, _), (w, algorithm) in zip(ensemble.members, ensemble.algorithm.members)]
                model_path = save_ensemble(folder, members, split, scores=ensemble.as_dict(), **saved)
                what = f"the {ensemble.label()}"
            else:
                model_path = save_model(folder, best.algorithm, best.config, split, **saved,
                                        scores={"validation": best.validation, **best.test.as_dict(), "trial": best.trial})
                what = f"best model (trial {best.trial})"
            optuna_study.set_user_attr("model_path", str(model_path.resolve()))
            say(f"{what} saved to {model_path}; use it with `autometa predict {model_path} DATA`")
    except KeyboardInterrupt:
        schema.end_search(settings.db, search_id, "interrupted")
        raise
    except BaseException:
        schema.end_search(settings.db, search_id, "failed")
        raise
    schema.end_search(settings.db, search_id, "finished")
    checkpoint(settings.db)
    return SearchResult(optuna_study, dataset, split, leaderboard, plain, max(0, remaining), model_path, ensemble)


def _check_output_folder(folder: Path) -> None:
    """Before any trial runs: the folder the model goes to can be made (or is there)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise SearchError(f"--output {folder}: {existing} is a file, not a folder; pass another --output")
    if not os.access(existing, os.W_OK):
        raise SearchError(f"--output {folder}: folder {existing} is not writable; pass another --output")


def finished_trials(name: str, storage: optuna.storages.BaseStorage) -> int:
    """Trials of study ``name`` that count against its budget (0 when there is no such study)."""
    if not any(s.study_name == name for s in storage.get_all_studies()):
        return 0
    return budget_used(optuna.load_study(study_name=name, storage=storage), running=False)


def _check_resume(study: optuna.Study, dataset: Dataset, name: str, spec: SearchSpec, meta_features) -> None:
    """Record a new study's settings; refuse to go on with an existing one searched on other
    data or settings (its trials would be ranked against another split's validation rows)."""
    attrs = study.user_attrs
    if "fingerprint" not in attrs:
        study.set_user_attr("spec", spec.to_json())  # for `autometa worker` on other machines
        study.set_user_attr("fingerprint", dataset.fingerprint)
        study.set_user_attr("dataset", dataset.name)
        study.set_user_attr("label", dataset.label_column)
        study.set_user_attr("protocol", spec.protocol)
        study.set_user_attr("columns", spec.columns)
        study.set_user_attr("choices", spec.choices)
        study.set_user_attr("autometa_version", __version__)
        study.set_user_attr("host", host_info())
        study.set_user_attr("meta_features", meta_features())
        return
    if attrs["fingerprint"] != dataset.fingerprint:
        raise SearchError(
            f"study {name!r} was created for other data (fingerprint {attrs['fingerprint'][:10]}); "
            "drop --study to open this data's own study, or pass a new --study name"
        )
    try:
        stored = SearchSpec.from_json(attrs["spec"]).settings()
    except (KeyError, TypeError):
        stored = {"choices": attrs.get("choices")}  # a study from before its settings were stored
    stored, current = _flat_settings(stored), _flat_settings(spec.settings())
    differing = [key for key in sorted(set(stored) | set(current)) if stored.get(key) != current.get(key)]
    if differing:
        raise SearchError(
            f"study {name!r} was created with other settings ("
            + "; ".join(f"{_setting(key)} {_shown_setting(stored.get(key))}, now {_shown_setting(current.get(key))}"
                        for key in differing)
            + "); drop --study to search these settings in a study of their own, or pass a new --study name"
        )
    study.set_user_attr("spec", spec.to_json())  # the latest budget and data path, for `autometa worker`


def _flat_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with each component's choices as a setting of its own, so a refusal names it."""
    choices = settings.get("choices") or {}
    return {**{k: v for k, v in settings.items() if k != "choices"}, **{f"choices.{k}": v for k, v in choices.items()}}


def _setting(key: str) -> str:
    if key.startswith("choices."):
        what = key.split(".", 1)[1]
        option = f"--encoder {what.split('.', 1)[1]}=" if what.startswith("encoder.") else "--" + what.replace("_", "-")
        return f"{option} choices"
    return {"columns": "column types"}.get(key, "--" + key.replace("_", "-"))


def _shown_setting(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def _trial_line(frozen: optuna.trial.FrozenTrial, registry: Registry, choices: dict) -> str:
    took = frozen.user_attrs.get("wall_time_s", 0.0)
    if frozen.state == TrialState.COMPLETE:
        outcome = f"validation {100 * frozen.value:.1f}%"
        folds = frozen.user_attrs.get("cross_validation")
        if folds is not None and folds.startswith("not run"):
            outcome += f" (cross-validation {folds})"
        elif folds is not None and "holdout_validation" in frozen.user_attrs:  # said even when the two agree
            outcome += (f" cross-validated ({folds}; "
                        f"{100 * frozen.user_attrs['holdout_validation']:.1f}% on the validation rows alone)")
        if "stopped" in frozen.user_attrs:
            outcome += f" ({frozen.user_attrs['stopped']})"
        elif "duplicate_of" in frozen.user_attrs:
            outcome += f" (same configuration as trial {frozen.user_attrs['duplicate_of']}, not trained again)"
    elif frozen.state == TrialState.PRUNED:
        outcome = frozen.user_attrs.get("prune_reason", "pruned")
    else:
        outcome = f"failed: {frozen.user_attrs.get('fail_reason', 'see log')}"
    config = stored_config(frozen.params, registry, choices) if frozen.params else None
    where = f" on {worker_label(frozen.user_attrs)}" if "worker" in frozen.user_attrs else ""
    return f"trial {frozen.number:>3} {outcome} ({took:.1f}s{where}) {config.label() if config else ''}"


class _Stop:
    """When a search stops starting trials before its budget is used: at the ``limits``' deadline
    (less the time kept for the finalists) or when its ``patience`` runs out. Decided once, said
    once, and recorded in the study (``STOPPED``) for workers that joined it from elsewhere."""

    TIMEOUT = "its --timeout"

    def __init__(self, study: optuna.Study, limits: TrialLimits, patience: Patience, say):
        self.study, self.limits, self.patience, self.say = study, limits, patience, say
        self.reason: str | None = None
        study.set_user_attr(STOPPED, None)  # cleared: a resumed search runs trials, and workers may join it

    def check(self, completed: bool) -> bool:
        """After trials finished (``completed``: one of them completed): whether trials stop now."""
        if self.reason is None:
            if self.limits.deadline is not None and time.time() >= self.limits.stop_at():
                self.reason = self.TIMEOUT
            elif completed and self.patience.reached(self.study):
                self.say(self.patience.note(self.study))
                self.reason = self.patience.reason
            if self.reason is not None:
                self.study.set_user_attr(STOPPED, self.reason)
        return self.reason is not None

    @property
    def patience_ran_out(self) -> bool:
        return self.reason == self.patience.reason


def _optimize_here(study, runner: TrialRunner, n_trials, registry, choices, progress, say, db, reserve, stop: _Stop):
    """Trials one after another in this process (no isolation), until ``stop``; ``reserve()``
    updates the time kept back for the finalists after each trial."""
    bar = tqdm(total=n_trials, desc="search", unit="trial", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    runner.bar = bar

    def on_trial_end(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        bar.write(_trial_line(frozen, registry, choices), file=sys.stderr)
        try:
            bar.set_postfix_str(f"best {100 * study.best_value:.1f}%")
        except ValueError:
            pass
        reserve()
        # runner.stop_requested: a one-step fit would not end before the --timeout (not started)
        if stop.check(completed=frozen.state == TrialState.COMPLETE) or runner.stop_requested:
            study.stop()

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report every trial
    try:
        study.optimize(runner, n_trials=n_trials, catch=(Exception,),
                       callbacks=[schema.TrialRecorder(db), on_trial_end])
    except KeyboardInterrupt:
        say("interrupted: finished trials are saved; run the same command again to resume")
        raise
    finally:
        optuna.logging.set_verbosity(level)
        bar.close()


def _optimize_pool(study, db, slots, spec, dataset, custom, existing, n_trials, trial_timeout, registry, progress, say,
                   limits: TrialLimits, shared, reserve, stop: _Stop):
    """Trials on isolated worker processes, one per device slot, with a live status per device,
    until ``limits.stop_at()`` or ``stop`` (patience: running trials finish); ``reserve()``
    updates the time kept back for the finalists as trials finish."""
    bar = tqdm(total=n_trials, desc="search", unit="trial", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    status: dict[str, str] = {s.label: "starting" for s in slots}
    printed = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}

    def on_event(event: tuple) -> None:
        kind, label = event[0], event[1]
        if kind == "start":
            status[label] = f"trial {event[2]}"
        elif kind == "step":
            status[label] = f"trial {event[2]} step {event[3]}/{event[4]} val {100 * event[5]:.1f}%"
        elif kind == "end":
            status[label] = "idle"
        elif kind == "error":
            say(f"worker {label} could not start: {event[2]}")
        bar.set_description(" | ".join(f"{k}: {v}" for k, v in status.items()))

    def on_poll() -> None:
        finished = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.number not in printed]
        for frozen in finished:
            printed.add(frozen.number)
            bar.update(1)
            bar.write(_trial_line(frozen, registry, spec.choices), file=sys.stderr)
            try:
                bar.set_postfix_str(f"best {100 * study.best_value:.1f}%")
            except ValueError:
                pass
        if finished:
            reserve()
        stop.check(completed=any(t.state == TrialState.COMPLETE for t in finished))

    # Seconds from the pool's start until trials stop (at least a moment: one trial starts).
    began = time.time()
    timeout = None if limits.deadline is None else lambda: max(1.0, limits.stop_at() - began)

    # A worker rebuilds the split from the data; a file path is enough, else the data travels.
    payload = None if spec.data is not None else dataset
    try:
        run_pool(
            study, db, slots, n_trials, build_runner, (spec, payload, *custom, existing, limits, shared),
            timeout=timeout, trial_timeout=trial_timeout, on_event=on_event, on_poll=on_poll, say=say,
            go_on=lambda: not stop.patience_ran_out,  # the --timeout stops them by run_pool's own clock
        )
        on_poll()
    except KeyboardInterrupt:
        say("interrupted: finished trials are saved; running ones were marked failed; run the same command again to resume")
        raise
    finally:
        bar.close()


def host_info() -> dict[str, str]:
    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__}
