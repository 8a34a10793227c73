"""No wasted trials, fast trials, multi-fidelity: duplicates answered without training, learners
at chance pruned, time limits that stop running trials, inputs preprocessed once and shared
read-only with the workers, Hyperband over training steps by default."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import re
import tempfile
import time
from pathlib import Path

import autometa_builtins
import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from autometa.components import MetaAlgorithm
from autometa.config import default_config, default_trials, search_choices, stored_config
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split
from autometa.data.scoring import chance_accuracy, evaluate
from autometa.errors import SearchError
from autometa.data.shared import load_array
from autometa.hookspecs import hookimpl
from autometa.plugins import PluginHost, get_registry
from autometa.study import objective
from autometa.study.budget import Patience
from autometa.study.training import train
from autometa.study.objective import SearchSpec, StepsHyperband, TrialLimits, default_pruner, enqueue_new
from helpers import split_inputs, write_blobs_csv

engine = importlib.import_module("autometa.study.engine")
FAST = dict(steps=20, eval_every=10, progress=False, echo=lambda s: None, output=None, top_k=1, warm_start=False)
PROTONET = {"meta_algorithm": ["protonet"], "fusion": ["concat"], "encoder.tabular": ["linear"]}


@pytest.fixture
def blobs(tmp_path) -> Path:
    return write_blobs_csv(tmp_path / "blobs.csv", per_class=20)


def counting_train(monkeypatch, fit_s: float | None = None) -> list:
    """Patch the objective's training function to record its calls (and still train); with
    ``fit_s``, every fit reports taking that many seconds."""
    calls = []
    real = objective.train

    def train(config, *args, validated=None, **kwargs):
        calls.append(config)
        report = validated
        if fit_s is not None and report is not None:
            validated = lambda probabilities, scoring_s, _: report(probabilities, scoring_s, fit_s)  # noqa: E731
        return real(config, *args, validated=validated, **kwargs)

    monkeypatch.setattr(objective, "train", train)
    return calls


# ------------------------------------------------------------------------------ no duplicates
def test_a_configuration_already_in_the_study_is_not_trained_again(blobs, tmp_path, monkeypatch):
    calls = counting_train(monkeypatch)
    db = f"sqlite:///{tmp_path}/d.db"
    study = optuna.create_study(study_name="dup", storage=db, direction="maximize")
    registry = get_registry()
    choices = search_choices(registry, "standard", ["tabular"], PROTONET)
    (params,) = default_trials(registry, choices)  # every parameter fixed
    study.enqueue_trial(params)
    study.enqueue_trial(params, skip_if_exists=False)  # as a warm-start seed and a default could
    engine.search(blobs, "y", trials=2, db=db, study="dup", isolate=False, include=PROTONET, defaults=False, **FAST)
    first, second = optuna.load_study(study_name="dup", storage=db).get_trials()
    assert len(calls) == 1  # trained once
    assert first.state == second.state == TrialState.COMPLETE
    assert second.value == first.value
    assert second.user_attrs["duplicate_of"] == 0 and second.user_attrs["wall_time_s"] == 0.0


def test_default_config_is_one_learners_default_trial_with_its_changes():
    registry = get_registry()
    choices = search_choices(registry, "standard", ["tabular", "text"])
    (default,) = [t for t in default_trials(registry, choices) if t["meta_algorithm"] == "forest"]
    config = default_config(registry, choices, "forest", extra=False, n_estimators=60)
    assert config == stored_config({**default, "meta.forest.extra": False, "meta.forest.n_estimators": 60}, registry, choices)
    assert config.meta_params["max_features"] == 0.5 and config.encoders == {"tabular": "table", "text": "lsa"}
    only_forest = search_choices(registry, "standard", ["tabular"], {"meta_algorithm": ["forest"]})
    with pytest.raises(SearchError, match="'protonet' is not among this search's: forest"):
        default_config(registry, only_forest, "protonet")


def test_a_default_already_queued_as_a_seed_is_not_queued_again(blobs):
    registry = get_registry()
    dataset = load_dataset(blobs, "y")
    choices = search_choices(registry, "standard", dataset.modalities)
    defaults = default_trials(registry, choices)
    study = optuna.create_study(direction="maximize")
    # A seed that carries parameters its configuration does not use (another learner's, as a
    # translated seed may) is the same configuration; Optuna's skip_if_exists compares keys too.
    unused = {k: v for k, v in defaults[1].items() if k.startswith(f"meta.{defaults[1]['meta_algorithm']}.")}
    assert unused
    study.enqueue_trial({**defaults[0], **unused})
    assert [enqueue_new(study, p, registry, choices) for p in defaults[:2]] == [False, True]
    assert len(study.get_trials()) == 2


# ---------------------------------------------------------------------------- below chance
class Contrarian(MetaAlgorithm):
    """A planted learner that always predicts a class that is not the query's: below chance."""

    name = "contrarian"
    protocols = ("standard",)
    search_space = {}

    def setup(self, backbone, pool, shape):
        self.backbone = backbone

    def train_step(self, pool, rng):
        return 1.0

    def predict(self, task):
        wrong = (task.query_y + 1) % task.n_way
        return torch.nn.functional.one_hot(wrong, task.n_way).float()


class ContrarianPlugin:
    @hookimpl
    def register_meta_algorithms(self, register):
        register(Contrarian)


def test_a_learner_below_chance_is_pruned_after_warm_up_with_the_reason(blobs, tmp_path, monkeypatch):
    host = PluginHost(strict=True)
    assert host.add(autometa_builtins, "builtins") and host.add(ContrarianPlugin(), "contrarian_plugin")
    monkeypatch.setattr(engine, "get_registry", host.build_registry)
    db = f"sqlite:///{tmp_path}/c.db"
    include = {**PROTONET, "meta_algorithm": ["contrarian"]}
    result = engine.search(blobs, "y", trials=1, db=db, study="chance", isolate=False, include=include,
                           **{**FAST, "steps": 100})
    (trial,) = result.study.get_trials()
    assert trial.state == TrialState.PRUNED
    # Pruned at the first checkpoint after the warm-up of 2 checkpoints, not at the first.
    assert sorted(trial.intermediate_values) == [10, 20]
    assert trial.user_attrs["prune_reason"] == (
        "below chance at step 20: validation 0.0% is not above the 33.3% of always guessing the most common class")


def test_chance_is_the_most_common_query_class_per_task(blobs):
    split = make_split(load_dataset(blobs, "y"), "standard")
    (task,) = split.validation
    counts = np.bincount(task.query_y.numpy())
    assert chance_accuracy(split.validation) == pytest.approx(counts.max() / counts.sum())
    assert chance_accuracy(split.checkpoint_tasks) == chance_accuracy(split.validation)  # 12 rows: all kept


# ------------------------------------------------------------------------------- time limits
def test_a_running_trial_stops_at_its_default_time_limit(blobs, tmp_path):
    db = f"sqlite:///{tmp_path}/t.db"
    started = time.monotonic()
    result = engine.search(blobs, "y", trials=1, db=db, study="limit", isolate=False, include=PROTONET,
                           timeout=20, **{**FAST, "steps": 10_000_000, "eval_every": 100})
    assert time.monotonic() - started < 120  # the trial alone would take hours
    (trial,) = result.study.get_trials()
    # Stopped after a quarter of the 20 s budget (the default time limit of a trial), and scored
    # as trained so far: the search has a model.
    assert trial.state == TrialState.COMPLETE and result.best.trial == 0
    steps = trial.user_attrs["steps"]
    assert 0 < steps < 10_000_000
    assert trial.user_attrs["stopped"] == (
        f"stopped at step {steps} of 10000000 by the trial time limit of 5s (0.25 of --timeout; --trial-timeout sets "
        "another); scored as trained so far")
    assert 5 <= trial.user_attrs["wall_time_s"] < 10


def test_limits_for_a_search():
    assert TrialLimits.for_search(None, None, 100.0) == TrialLimits(None, None)
    assert TrialLimits.for_search(600, None, 100.0) == TrialLimits(700.0, 150.0)
    assert TrialLimits.for_search(600, 30, 100.0) == TrialLimits(700.0, None)  # --trial-timeout kills instead


def test_time_kept_for_the_finalists_moves_the_trials_deadline_at_most_halfway():
    limits = TrialLimits.for_search(600, None, 100.0)
    assert (limits.stop_at(), limits.kept_back()) == (700.0, 0.0)
    limits.keep_back(120.0)
    assert (limits.stop_at(), limits.kept_back()) == (580.0, 120.0)
    limits.keep_back(1e6)  # finalists that would take longer than the search: trials still get half of it
    assert limits.stop_at() == 400.0


def test_the_reserve_is_the_finalists_seconds_per_task_times_the_test_tasks():
    study = optuna.create_study(direction="maximize")
    planted = [  # (value, seconds per validation task, configuration)
        (0.9, 0.5, {"a": 1}), (0.8, 0.1, {"a": 2}), (0.85, 9.0, {"a": 1}), (0.7, 0.2, {"a": 3}), (0.6, 100.0, {"a": 4}),
    ]
    for value, seconds, params in planted:
        trial = optuna.trial.create_trial(
            params=params, distributions={"a": optuna.distributions.IntDistribution(1, 4)}, value=value,
            user_attrs={"scoring_s_per_task": seconds})
        study.add_trial(trial)
    # The 3 best distinct configurations: a=1 (0.9; its repeat at 0.85 is the same finalist), a=2, a=3.
    assert engine.scoring_reserve(study, 3, 600) == pytest.approx(600 * (0.5 + 0.1 + 0.2))


def test_the_reserve_adds_the_refits_of_the_best_trials_that_refit():
    study = optuna.create_study(direction="maximize")
    planted = [  # (value, seconds per validation task, refit seconds or None: a learner that does not refit)
        (0.9, 0.5, 2.0), (0.8, 0.1, None), (0.7, 0.2, 3.0), (0.6, 0.0, 50.0),
    ]
    for a, (value, seconds, refit_s) in enumerate(planted, start=1):
        attrs = {"scoring_s_per_task": seconds, **({} if refit_s is None else {"refit_s": refit_s})}
        study.add_trial(optuna.trial.create_trial(
            params={"a": a}, distributions={"a": optuna.distributions.IntDistribution(1, 4)}, value=value,
            user_attrs=attrs))
    # Two finalists scored on 10 test tasks; refits among the 3 best (the ensemble's candidates):
    # a=1 and a=3 (a=2 does not refit; a=4 is not among them).
    assert engine.scoring_reserve(study, 2, 10, 3) == pytest.approx(10 * (0.5 + 0.1) + 2.0 + 3.0)
    assert engine.scoring_reserve(study, 2, 10) == pytest.approx(10 * (0.5 + 0.1))  # --no-refit


def test_a_one_step_learner_records_what_its_refit_will_take_and_a_trained_one_does_not(blobs):
    registry = get_registry()
    split = make_split(load_dataset(blobs, "y"), "standard")
    rows = split.row_splits
    growth = (len(rows["train"]) + len(rows["validation"])) / len(rows["train"])
    for learner, refits in (("linear", True), ("protonet", False)):
        include = {"meta_algorithm": [learner], "fusion": ["concat"], "encoder.tabular": ["table"]}
        choices = search_choices(registry, "standard", ("tabular",), include)
        spec = SearchSpec(None, "y", None, {}, (28, 28), "standard", 5, 5, 15, 2, 2, 0, choices, 20, 10, 1)
        study = optuna.create_study(direction="maximize")
        study.optimize(objective.TrialRunner(split, registry, spec, "cpu"), n_trials=1)
        (trial,) = study.get_trials()
        assert trial.state == TrialState.COMPLETE, trial.user_attrs
        if refits:  # its own fit on the training rows, scaled to the training + validation rows
            assert 0 < trial.user_attrs["refit_s"] <= growth * trial.user_attrs["wall_time_s"]
        else:
            assert "refit_s" not in trial.user_attrs


class LateReserve:
    """The time kept back for the work after the trials: none when a trial starts, then (as
    finished trials report their scoring) 300 s, so a deadline 299 s away passes at its first step."""

    reads = 0

    @property
    def value(self):
        self.reads += 1
        return 0.0 if self.reads == 1 else 300.0


def test_a_trial_stops_early_by_the_time_kept_for_the_finalists(blobs):
    limits = TrialLimits(time.time() + 299.0, None, LateReserve(), 600)
    study = optuna.create_study(direction="maximize")
    study.optimize(small_runner(blobs, limits), n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["stopped"] == ("stopped at step 1 of 1000 by the search's --timeout (less 300s kept for "
                                           "the finalists' test scoring and refits); scored as trained so far")
    assert trial.user_attrs["scoring_s_per_task"] > 0


def test_a_trial_out_of_time_before_its_first_evaluation_is_not_scored_beside_complete_trials(blobs):
    """Its scoring time is unknown (birds: mann on ft_transformer scored past the 10 s grace and its
    worker was killed) and a model trained a few steps does not beat trials already complete."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5))
    study.optimize(small_runner(blobs, TrialLimits(time.time() + 299.0, None, LateReserve(), 600)), n_trials=1)
    trial = study.get_trials()[-1]
    assert trial.state == TrialState.PRUNED and "scoring_s_per_task" not in trial.user_attrs
    assert trial.user_attrs["prune_reason"] == ("stopped at step 1 of 1000 by the search's --timeout before its first "
                                                "evaluation; not scored, the study has complete trials")


def small_runner(blobs, limits: TrialLimits):
    registry = get_registry()
    dataset = load_dataset(blobs, "y")
    split = make_split(dataset, "standard")
    choices = search_choices(registry, "standard", dataset.modalities, PROTONET)
    spec = SearchSpec(None, "y", None, {}, (28, 28), "standard", 5, 5, 15, 2, 2, 0, choices, 1000, 10, 1)
    return objective.TrialRunner(split, registry, spec, "cpu", limits=limits)


def test_a_trial_out_of_time_stops_at_its_next_step_scored_as_trained(blobs):
    runner = small_runner(blobs, TrialLimits(seconds=1e-9))
    study = optuna.create_study(direction="maximize")
    study.optimize(runner, n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["stopped"] == (
        "stopped at step 1 of 1000 by the trial time limit of 1e-09s (0.25 of --timeout; --trial-timeout sets another); "
        "scored as trained so far")
    assert trial.user_attrs["steps"] == 1 and trial.intermediate_values == {}  # nothing reported to the pruner
    # The value is that of the model trained for 1 step, on all validation tasks (the
    # leaderboard retrains it so from its stored steps).
    config = stored_config(trial.params, runner.registry, runner.spec.choices)
    again, _ = train(config, runner.split, seed=trial.user_attrs["seed"], steps=1, eval_every=10, registry=runner.registry)
    assert trial.value == evaluate(again, runner.split.validation).mean


def test_a_trial_claimed_after_the_deadline_does_not_start(blobs, monkeypatch):
    calls = counting_train(monkeypatch)
    study = optuna.create_study(direction="maximize")
    study.optimize(small_runner(blobs, TrialLimits(deadline=time.time() - 1)), n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.PRUNED and calls == []
    assert trial.user_attrs["prune_reason"] == "not started: the search's --timeout had passed"


def test_a_one_step_fit_expected_to_pass_the_timeout_is_not_started(blobs, monkeypatch):
    """gbm and linear fit in one step, which cannot stop at the --timeout: once their earlier
    trials say a fit takes longer than is left, the next is not started and the worker stops."""
    calls = counting_train(monkeypatch, fit_s=30.0)
    registry = get_registry()
    split = make_split(load_dataset(blobs, "y"), "standard")
    include = {"meta_algorithm": ["linear"], "fusion": ["concat"], "encoder.tabular": ["table"]}
    choices = search_choices(registry, "standard", ("tabular",), include)
    spec = SearchSpec(None, "y", None, {}, (28, 28), "standard", 5, 5, 15, 2, 2, 0, choices, 20, 10, 1)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    runner = objective.TrialRunner(split, registry, spec, "cpu", limits=TrialLimits(deadline=time.time() + 100))
    study.optimize(runner, n_trials=2)  # a fit "takes" 30 s and 100 s are left: both run
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2 and not runner.stop_requested
    assert [t.user_attrs["fit_s"] for t in study.get_trials()] == [30.0, 30.0]
    late = objective.TrialRunner(split, registry, spec, "cpu", limits=TrialLimits(deadline=time.time() + 20))
    study.optimize(late, n_trials=1)
    trial = study.get_trials()[-1]
    assert trial.state == TrialState.PRUNED and len(calls) == 2 and late.stop_requested
    assert trial.user_attrs["prune_reason"] == ("not started: a linear fit takes about 30.0s (its earlier trials), "
                                                "more than is left before the search's --timeout")


def test_learners_that_train_in_steps_are_started_however_late(blobs, monkeypatch):
    calls = counting_train(monkeypatch, fit_s=1000.0)
    study = optuna.create_study(direction="maximize")
    runner = small_runner(blobs, TrialLimits(deadline=time.time() + 600))
    runner.spec.steps = 1
    study.optimize(runner, n_trials=2)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2 and len(calls) == 2
    assert all("fit_s" not in t.user_attrs for t in study.get_trials())


def test_a_search_stops_once_a_one_step_fit_would_pass_its_timeout(blobs, tmp_path, monkeypatch):
    counting_train(monkeypatch, fit_s=10_000.0)
    include = {"meta_algorithm": ["linear"], "fusion": ["concat"], "encoder.tabular": ["table"]}
    result = engine.search(blobs, "y", db=f"sqlite:///{tmp_path}/s.db", study="slow", isolate=False, timeout=600,
                           include=include, defaults=False, patience=0, **FAST)
    assert [t.state for t in result.study.get_trials()] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert result.study.get_trials()[1].user_attrs["prune_reason"].startswith("not started: a linear fit takes about 10000.0s")


# ------------------------------------------------------------------------- shared, read-only
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory mappings from /proc")
def test_shared_inputs_are_read_only_and_identical_in_every_worker(tmp_path):
    data = str(Path(__file__).parent.parent / "examples" / "fastfood.csv")
    folder = tmp_path / "shared"
    main = make_split(load_dataset(data, "restaurant"), "standard", shared=folder)
    expected = {key: t.numpy().tobytes() for key, t in main.pool.features.inputs.items()}
    assert {"tabular", "text"} <= set(expected)
    context = mp.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=split_inputs, args=(str(folder), data, "restaurant", out)) for _ in range(2)]
    for w in workers:
        w.start()
    seen = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    for inputs in seen:
        assert set(inputs) == set(expected)
        for key, (path, permissions, content) in inputs.items():
            # Mapped from the file the search process wrote, read-only and shared: one copy of
            # its pages for every worker, and no worker can change it.
            assert Path(path).parent == folder and path.endswith(".npy"), (key, path)
            assert permissions == "r--s", (key, permissions)
            assert content == expected[key], key


def test_a_derived_input_is_made_once_for_all_workers(tmp_path, monkeypatch):
    from autometa.data import preprocessing

    data = Path(__file__).parent.parent / "examples" / "fastfood.csv"
    dataset = load_dataset(data, "restaurant")
    lsa = get_registry().get("encoder", "lsa").cls
    first = make_split(dataset, "standard", shared=tmp_path)
    key = preprocessing.add_derived(first.pool.features, dataset, "text", lsa, first.row_splits["train"], shared=tmp_path)
    calls = []
    monkeypatch.setattr(lsa, "fit_input", classmethod(lambda cls, *a: calls.append(a)))  # must not be called again
    second = make_split(dataset, "standard", shared=tmp_path)
    assert preprocessing.add_derived(second.pool.features, dataset, "text", lsa, second.row_splits["train"],
                                     shared=tmp_path) == key
    assert calls == []
    assert torch.equal(second.pool.features.inputs[key], first.pool.features.inputs[key])
    assert torch.equal(load_array(tmp_path, key), first.pool.features.inputs[key])  # it is the shared file's
    assert set(second.pool.features.fitted[key]) == set(first.pool.features.fitted[key])


# ------------------------------------------------------------------------------- Hyperband
def test_the_default_pruner_is_hyperband_over_training_steps(blobs, tmp_path):
    spec = SearchSpec(None, "y", None, {}, (28, 28), "standard", 5, 5, 15, 2, 2, 0, {}, 300, 50, 30)
    pruner = default_pruner(spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and isinstance(pruner, StepsHyperband)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (50, 300, 3)  # noqa: SLF001
    result = engine.search(blobs, "y", trials=1, db=f"sqlite:///{tmp_path}/h.db", isolate=False, include=PROTONET,
                           **FAST)
    assert isinstance(result.study.pruner, StepsHyperband)
    median = optuna.pruners.MedianPruner()
    result = engine.search(blobs, "y", trials=1, db=f"sqlite:///{tmp_path}/m.db", isolate=False, include=PROTONET,
                           pruner=median, **FAST)
    assert result.study.pruner is median  # the pruner setting still chooses another


def test_hyperband_prunes_a_trial_behind_at_its_rung_once_the_startup_trials_finished():
    # One bracket (max/min resource below the reduction factor): Hyperband spreads trials over its
    # brackets by a hash of the study's name, which would make a several-bracket case depend on it.
    study = optuna.create_study(direction="maximize", pruner=StepsHyperband(
        min_resource=10, max_resource=20, reduction_factor=3, startup_trials=3))
    outcomes = []
    # Every trial's curve is its final value at each checkpoint.
    for value in (0.5, 0.6, 0.7, 0.1, 0.9):
        trial = study.ask()
        for step in range(10, 100, 10):
            trial.report(value, step)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                outcomes.append("pruned")
                break
        else:
            study.tell(trial, value)
            outcomes.append("complete")
    assert outcomes[:3] == ["complete"] * 3  # nothing is pruned before 3 trials finished
    assert outcomes[3] == "pruned"  # 0.1 is far behind at the first rung


@pytest.mark.slow
def test_worker_processes_stop_at_the_search_timeout(blobs, tmp_path, monkeypatch):
    """The pool's workers (the default) honour the limits too; the shared inputs are removed after."""
    made, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(engine.tempfile, "mkdtemp", lambda **kwargs: made.append(mkdtemp(**kwargs)) or made[-1])
    db = f"sqlite:///{tmp_path}/w.db"
    started = time.monotonic()
    said = []
    result = engine.search(blobs, "y", trials=50, db=db, study="pool", devices="cpu", include=PROTONET, timeout=30,
                           **{**FAST, "steps": 10_000_000, "eval_every": 100, "echo": said.append})
    assert time.monotonic() - started < 180  # a trial alone would take hours; start-up and leaderboard on top
    finished = sum(t.state.is_finished() for t in result.study.get_trials())
    assert f"trials stopped at the --timeout (30 s) with {finished} of the study's 50 finished: run the same command " \
           "again to go on (--timeout 0: no time limit)" in said
    # Trials a worker claimed after the deadline are not started, and one the deadline stopped before
    # its first evaluation (step 100) is not scored beside complete trials: both pruned, with that reason.
    late = [t for t in result.study.get_trials() if t.state == TrialState.PRUNED]
    unscored = re.compile(r"stopped at step \d+ of 10000000 by the search's --timeout before its first evaluation; "
                          r"not scored, the study has complete trials")
    assert all(t.user_attrs["prune_reason"] == "not started: the search's --timeout had passed"
               or unscored.fullmatch(t.user_attrs["prune_reason"]) for t in late)
    trials = [t for t in result.study.get_trials() if t not in late]
    assert trials and all(t.state == TrialState.COMPLETE for t in trials)
    assert all("stopped" in t.user_attrs and t.user_attrs["steps"] < 10_000_000 for t in trials)
    assert all(t.user_attrs["wall_time_s"] < 30 / 4 + 5 for t in trials)  # each at most a quarter of the budget
    assert result.split.shared is None and len(made) == 1 and not Path(made[0]).exists()


def test_a_timeout_without_trials_is_the_budget(blobs, tmp_path, monkeypatch):
    """--timeout alone does not stop at the default 30 trials: the time is the budget (bounded)."""
    from autometa.study import settings

    assert settings.SearchSettings().trial_budget == settings.DEFAULT_TRIALS == 30
    assert settings.SearchSettings(timeout=60).trial_budget == settings.TIMED_TRIALS
    assert settings.SearchSettings(timeout=60, trials=5).trial_budget == 5
    monkeypatch.setattr(settings, "TIMED_TRIALS", 32)  # the bound, small enough for a test
    said = []
    result = engine.search(blobs, "y", db=f"sqlite:///{tmp_path}/t.db", study="timed", isolate=False, timeout=600,
                           include=PROTONET, patience=0, **{**FAST, "steps": 2, "eval_every": 2, "echo": said.append})
    assert len(result.study.get_trials()) == 32
    assert "study 'timed' in sqlite:///" in said[2] and said[2].endswith("as many trials as 600 s allow (at most 32) on cpu")


def test_past_the_deadline_only_the_best_finalist_is_scored_on_the_test_tasks(monkeypatch):
    from types import SimpleNamespace

    leaderboard = importlib.import_module("autometa.study.leaderboard")
    study = optuna.create_study(direction="maximize")
    for i, value in enumerate([0.5, 0.9, 0.7]):
        study.add_trial(optuna.trial.create_trial(
            params={"a": i}, distributions={"a": optuna.distributions.IntDistribution(0, 2)}, value=value))
    monkeypatch.setattr(leaderboard, "stored_config", lambda params, registry, choices: params)
    monkeypatch.setattr(leaderboard, "count_parameters", lambda algorithm: 0)
    task = SimpleNamespace(query_y=torch.zeros(2, dtype=torch.long))
    split = SimpleNamespace(test=[task, task], protocol="fewshot")
    scored = []

    class Models:
        def __call__(self, t):
            return None

        def test_probabilities(self, t):
            scored.append(t.number)
            return [torch.tensor([[1.0, 0.0], [0.0, 1.0]])] * 2

    messages = []
    late = leaderboard._leaderboard(study, split, None, None, 3, Models(), messages.append, deadline=time.time() - 1)
    assert [e.trial for e in late] == [1] and scored == [1] and late[0].test.mean == 0.5
    assert messages[-1] == "the --timeout has passed: 2 more finalist(s) not scored on the test tasks"
    in_time = leaderboard._leaderboard(study, split, None, None, 3, Models(), messages.append, deadline=time.time() + 60)
    assert [e.trial for e in in_time] == [1, 2, 0]


def test_a_queued_trial_no_worker_claimed_is_reported_as_not_started():
    from autometa.study.leaderboard import SearchResult

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"meta_algorithm": "gbm"})
    result = SearchResult(study, None, None, [], [], 0)
    assert result.outcomes() == ("1 waiting: queued, not started: the search ended first "
                                 "(a --timeout shorter than preparing the data?)")


def test_the_timeout_counts_from_the_given_start(blobs, tmp_path):
    # A search whose --timeout began 120 s ago (the command's start) has none of its 60 s left.
    result = engine.search(blobs, "y", trials=3, timeout=60, started=time.time() - 120, isolate=False,
                           db=f"sqlite:///{tmp_path}/s.db", include=PROTONET, **FAST)
    assert not result.leaderboard
    assert {t.user_attrs.get("prune_reason") for t in result.study.get_trials()} == {
        "not started: the search's --timeout had passed"}


def test_the_command_starts_the_clock_before_it_imports_the_search(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from autometa.cli.main import cli

    seen = {}

    def fake_search(data, label, settings):
        seen["started"] = settings.started
        raise SearchError("stop here")

    monkeypatch.setattr(engine, "search", fake_search)
    before = time.time()
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "x.csv"), "--label", "y", "--timeout", "60"])
    assert "stop here" in result.output
    assert before <= seen["started"] <= time.time()


def test_the_command_runs_its_30_trials_or_300_s_unless_told_otherwise(monkeypatch, tmp_path):
    """Given neither --trials nor --timeout, the command runs 30 trials or 300 s, whichever ends
    first; a budget given is kept as it is (--timeout 0: none); a negative one is refused."""
    from click.testing import CliRunner

    from autometa.cli.main import cli

    seen = []

    def fake_search(data, label, settings):
        seen.append((settings.trials, settings.timeout))
        raise SearchError("stop here")

    monkeypatch.setattr(engine, "search", fake_search)
    command = ["search", str(tmp_path / "x.csv"), "--label", "y"]
    for options in ([], ["--trials", "50"], ["--timeout", "0"], ["--timeout", "60"], ["--timeout", "0", "--trials", "5"]):
        assert "stop here" in CliRunner().invoke(cli, command + options).output
    assert seen == [(30, 300.0), (50, None), (None, None), (None, 60.0), (5, None)]
    refused = CliRunner().invoke(cli, command + ["--timeout", "-1"])
    assert refused.exit_code != 0 and len(seen) == 5
    assert "--timeout must be a number of seconds, or 0 for no time limit; got -1" in refused.output


def test_a_search_whose_time_ends_before_its_trials_says_how_to_go_on(blobs, tmp_path):
    said = []
    result = engine.search(blobs, "y", trials=50, timeout=6, isolate=False, db=f"sqlite:///{tmp_path}/s.db",
                           study="short", include=PROTONET, patience=0,
                           **{**FAST, "steps": 10_000_000, "eval_every": 100, "echo": said.append})
    finished = sum(t.state.is_finished() for t in result.study.get_trials())
    assert 0 < finished < 50
    assert said[2].endswith("50 trial(s) or 6 s, whichever ends first, on cpu")
    assert (f"trials stopped at the --timeout (6 s) with {finished} of the study's 50 finished: run the same command "
            "again to go on (--timeout 0: no time limit)") in said


def test_a_new_study_does_not_inherit_the_weights_of_a_deleted_databases_study(blobs, tmp_path):
    from autometa.study.kept import KeptModels, weights_folder

    db = f"sqlite:///{tmp_path}/w.db"
    # What a study of the same name left beside a database that was deleted since: trial 0's
    # weights, which would be loaded as the new study's trial 0 (another configuration).
    planted = weights_folder(db, "named") / "trial-0-0.99000000.safetensors"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"not this study's")
    engine.search(blobs, "y", trials=1, db=db, study="named", isolate=False, include=PROTONET, **FAST)
    assert not planted.exists()
    # A resumed study keeps what its workers kept.
    kept = weights_folder(db, "named") / "trial-0-0.50000000.safetensors"
    kept.write_bytes(b"kept by this study's worker")
    engine.search(blobs, "y", trials=2, db=db, study="named", isolate=False, include=PROTONET, **FAST)
    assert kept.exists() and KeptModels(db, "named")._listed()[0][1] == kept


# ------------------------------------------------------------------------------ patience
def _study_of(outcomes: list[float | None]) -> optuna.Study:
    """A study whose trials are ``outcomes`` in order: a value is a completed trial, None a pruned one."""
    study = optuna.create_study(direction="maximize")
    for value in outcomes:
        state = TrialState.PRUNED if value is None else TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(state=state, value=value))
    return study


def test_patience_runs_out_after_that_many_completed_trials_without_a_better_one():
    patience = Patience(3)
    assert not patience.reached(_study_of([0.5, 0.6, 0.55, 0.6]))  # a tie does not beat the best; 2 since it
    assert not patience.reached(_study_of([0.5, 0.6, 0.55, 0.6, None]))  # a pruned trial does not count
    assert patience.reached(_study_of([0.5, 0.6, 0.55, 0.6, None, 0.58]))
    assert not patience.reached(_study_of([0.5, 0.6, 0.55, 0.6, None, 0.61]))  # a new best starts the count again
    assert not Patience(0).reached(_study_of([0.9] + [0.1] * 50))  # 0: never
    assert Patience(3).note(_study_of([0.5, 0.6, 0.55, 0.6, 0.58])).startswith(
        "stopped early: no trial has beaten the best validation accuracy (60.0%, trial 1) in the last 3 completed trials")


LINEAR = {"meta_algorithm": ["linear"]}


def _first_stop(study: optuna.Study, patience: int) -> int:
    """How many trials of ``study`` had finished when ``patience`` first ran out."""
    trials = study.get_trials()
    return next(n for n in range(1, len(trials) + 1) if Patience(patience).reached(_study_of(
        [t.value if t.state == TrialState.COMPLETE else None for t in trials[:n]])))


def test_a_search_stops_when_its_patience_runs_out(blobs, tmp_path):
    said = []
    result = engine.search(blobs, "y", trials=25, db=f"sqlite:///{tmp_path}/p.db", study="patient", isolate=False,
                           include=LINEAR, patience=3, **{**FAST, "echo": said.append})
    trials = result.study.get_trials()
    assert len(trials) < 25 and len(trials) == _first_stop(result.study, 3)  # it stopped at the first chance
    assert Patience(3).note(result.study) in said
    full = engine.search(blobs, "y", trials=len(trials) + 3, db=f"sqlite:///{tmp_path}/q.db", study="whole",
                         isolate=False, include=LINEAR, patience=0, **FAST)
    assert len(full.study.get_trials()) == len(trials) + 3


def test_a_negative_patience_is_refused(blobs, tmp_path):
    with pytest.raises(SearchError, match=r"--patience must be 0 \(off\) or a number of completed trials, got -1"):
        engine.search(blobs, "y", trials=2, db=f"sqlite:///{tmp_path}/n.db", isolate=False, include=LINEAR,
                      patience=-1, **FAST)


@pytest.mark.slow
def test_worker_processes_stop_starting_trials_when_patience_runs_out(blobs, tmp_path):
    said = []
    result = engine.search(blobs, "y", trials=40, db=f"sqlite:///{tmp_path}/w.db", study="pool", devices="cpu",
                           include=LINEAR, patience=3, **{**FAST, "echo": said.append})
    trials = result.study.get_trials()
    # The pool sees finished trials once a second: a worker may have started a few more by then,
    # and those finish (none is failed or cut short), but no trial starts after that.
    assert _first_stop(result.study, 3) <= len(trials) < 40
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert any(line.startswith("stopped early: no trial has beaten the best validation accuracy") for line in said)
