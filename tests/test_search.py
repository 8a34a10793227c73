"""End-to-end ``autometa.search``: leaderboard, study database, resume, few-shot images,
failing plugins and the command line. Tiny data and few steps keep every search fast."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
from pathlib import Path

import autometa_builtins
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import FixedTrial, TrialState

from autometa.cli.main import cli
from autometa.components import MetaAlgorithm
from autometa.config import configuration_seed, sample_config
from autometa.data.loading import fingerprint, load_dataset
from autometa.data.scoring import evaluate
from autometa.errors import AutometaError, PluginError
from autometa.hookspecs import hookimpl
from autometa.plugins import PluginHost
from autometa.store import queries
from autometa.study.objective import SearchSpec, TrialRunner
from autometa.study.training import refit, refits, train

# The search engine module (``autometa.search`` is the function it defines).
search_module = importlib.import_module("autometa.study.engine")
search = search_module.search

FAST = dict(steps=20, eval_every=10, progress=False, echo=lambda s: None)
CLASSES = ("alpha", "beta", "gamma")
CLASS_WORDS = {"alpha": "apple", "beta": "banana", "gamma": "cherry"}
FILLER = "the a of and with from into over under near very quite some many few red blue green".split()


def write_standard_csv(path: Path, per_class: int = 30, seed: int = 0, text: bool = True) -> Path:
    """3 classes; a noisy numeric shift and a noisy class word in free text both carry signal.

    ``text=False`` leaves the text column out (a faster, tabular-only dataset)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, label in enumerate(CLASSES):
        for _ in range(per_class):
            word = CLASS_WORDS[label] if rng.random() < 0.6 else CLASS_WORDS[CLASSES[rng.integers(3)]]
            words = list(rng.choice(FILLER, size=6)) + [word]
            rng.shuffle(words)
            rows.append(
                {
                    "size": index * 0.8 + rng.normal(),
                    "noise": rng.normal(),
                    "note": " ".join(words),
                    "y": label,
                }
            )
    order = rng.permutation(len(rows))
    frame = pd.DataFrame([rows[i] for i in order])
    (frame if text else frame.drop(columns="note")).to_csv(path, index=False)
    return path


def wilson_by_hand(hits: int, n: int) -> tuple[float, float]:
    """The Wilson score interval, from its textbook formula (z = the 97.5% normal quantile)."""
    z, p = 1.959963984540054, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def load(db: str, dataset_path: Path, **options) -> optuna.Study:
    """The study ``search(dataset_path, "y", **options)`` opens (FAST's settings unless given)."""
    name = search_module.study_name(dataset_path, "y", **{"steps": 20, "eval_every": 10, **options})
    return optuna.load_study(study_name=name, storage=db)


@pytest.fixture(scope="module")
def standard_csv(tmp_path_factory) -> Path:
    return write_standard_csv(tmp_path_factory.mktemp("data") / "synthetic.csv")


@pytest.fixture(scope="module")
def tabular_csv(tmp_path_factory) -> Path:
    return write_standard_csv(tmp_path_factory.mktemp("tabular") / "tabular.csv", text=False)


@pytest.fixture(scope="module")
def first_search(standard_csv, tmp_path_factory):
    """One 4-trial search; its database file is copied by tests that extend the study.

    Without warm start its trials are the first default trials, not whatever the shipped prior
    seeds (which changes whenever the prior is rebuilt)."""
    folder = tmp_path_factory.mktemp("first")
    db = f"sqlite:///{folder}/s.db"
    messages: list[str] = []
    result = search(standard_csv, "y", trials=4, db=db, seed=0, warm_start=False,
                    **{**FAST, "echo": messages.append})
    trials = result.study.get_trials(deepcopy=True)
    attrs = dict(result.study.user_attrs)
    return {"result": result, "db_file": folder / "s.db", "trials": trials, "attrs": attrs, "messages": messages}


# ----------------------------------------------------------------------------------- standard
def test_search_end_to_end_standard(first_search, standard_csv):
    result = first_search["result"]
    dataset = load_dataset(standard_csv, "y")
    assert result.split.protocol == "standard"
    assert set(result.split.pool.features.modalities) == {"tabular", "text"}
    n_test = len(result.split.row_splits["test"])
    assert n_test == 18  # 20% of 30 rows in each of 3 classes

    assert result.new_trials == 4
    assert result.leaderboard, first_search["messages"]
    for rank, entry in enumerate(result.leaderboard, start=1):
        assert entry.rank == rank
        score = entry.test
        assert 0.0 <= score.mean <= 1.0
        assert score.n == n_test and score.unit == "rows"
        # One test task: the interval is Wilson's over its query rows.
        hits = round(score.mean * n_test)
        assert score.mean * n_test == pytest.approx(hits)
        assert (score.low, score.high) == pytest.approx(wilson_by_hand(hits, n_test), rel=1e-9)
        assert score.low < score.mean < score.high
        # A fixed-features learner (the default trials start with gbm, linear and forest) trains no encoder.
        fixed = search_module.get_registry().get("meta_algorithm", entry.config.meta_algorithm).cls.fixed_features
        assert entry.parameters > 0 or fixed
    validations = [e.validation for e in result.leaderboard]
    assert validations == sorted(validations, reverse=True)
    # Balanced training rows: the majority is a 3-way tie, broken towards the first class.
    majority, linear = result.baselines
    assert (majority.kind, majority.label) == ("majority", "majority class of the training rows")
    assert majority.score.mean == pytest.approx(1 / 3) and result.majority == majority.score
    assert (majority.score.low, majority.score.high) == pytest.approx(wilson_by_hand(6, n_test))
    assert (linear.kind, linear.label) == ("linear", "logistic regression on the preprocessed inputs")
    assert linear.score.n == n_test and linear.score.unit == "rows"

    trials = first_search["trials"]
    assert len(trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs for t in trials]
    for t in trials:
        assert t.user_attrs["seed"] == configuration_seed(0, t.params)
        assert t.user_attrs["device"] == "cpu"
        assert t.user_attrs["wall_time_s"] > 0
        assert t.user_attrs["steps"] == 20
        assert 0.0 <= t.value <= 1.0
        # Validation accuracy on 18 rows: a multiple of 1/18; a one-step learner's value is
        # cross-validated over the 72 training + validation rows, its holdout value over the 18.
        rows = 72 if "holdout_validation" in t.user_attrs else 18
        assert t.value * rows == pytest.approx(round(t.value * rows))
        holdout = t.user_attrs.get("holdout_validation", t.value)
        assert holdout * 18 == pytest.approx(round(holdout * 18))
    best = max(trials, key=lambda t: t.value)
    assert result.best.validation == best.value
    # Every finalist's model came from the worker process that trained it, none was retrained.
    kept = sorted(p.name for p in first_search["db_file"].with_name("s.db-weights").glob("*/*.safetensors"))
    assert kept == sorted(f"trial-{t.number}-{t.value:.8f}.safetensors" for t in trials)
    # The one-step finalists (trials 0 and 1: gbm, linear) are refitted on training + validation rows instead.
    assert "trained models: 1 loaded from the weights their workers kept, 0 retrained" in first_search["messages"]
    assert ("refitted on the training + validation rows for the test tasks and the saved model: trial(s) 0, 1 "
            "(learners that fit in one step; --no-refit keeps their trials' fits)") in first_search["messages"]

    attrs = first_search["attrs"]
    assert attrs["fingerprint"] == fingerprint(dataset) == dataset.fingerprint
    assert attrs["protocol"] == "standard"
    assert attrs["label"] == "y"
    assert attrs["columns"] == {"size": "tabular", "noise": "tabular", "note": "text"}
    # The finalists' one home is autometa_trial_facts (the study attribute only in 0.1 databases).
    assert "leaderboard" not in attrs
    board = queries.finalists(f"sqlite:///{first_search['db_file']}", result.study.study_name, {})
    assert [row["trial"] for row in board] == [e.trial for e in result.leaderboard]
    assert [row["test_accuracy"] for row in board] == [e.test.mean for e in result.leaderboard]
    assert [(row["test_ci95_low"], row["test_ci95_high"], row["test_unit"]) for row in board] == [
        (e.test.low, e.test.high, "rows") for e in result.leaderboard]
    assert attrs["baselines"] == [b.as_dict() for b in result.baselines]
    assert attrs["test_warnings"] == []
    text = result.format_leaderboard()
    assert text.startswith("Leaderboard (standard protocol): test accuracy [95% confidence interval] over 18 test rows "
                           "(Wilson score interval)")
    lo, hi = wilson_by_hand(6, n_test)
    assert f"33.3% [{100 * lo:.1f}, {100 * hi:.1f}]  baseline: majority class of the training rows" in text
    assert f"{linear.score}  baseline: logistic regression on the preprocessed inputs" in text


def test_leaderboard_scores_reproduce_by_retraining(first_search):
    """Retraining a leaderboard configuration from its seed gives the same validation and test score."""
    result = first_search["result"]
    registry = search_module.get_registry()
    choices = result.study.user_attrs["choices"]
    by_number = {t.number: t for t in first_search["trials"]}
    for entry in result.leaderboard:
        trial = by_number[entry.trial]
        config = sample_config(FixedTrial(trial.params), registry, choices)
        assert config.label() == entry.config.label()
        algorithm, validation = train(
            config, result.split, seed=trial.user_attrs["seed"], steps=20, eval_every=10, registry=registry
        )
        if refits(config, result.split, registry):
            # A one-step learner: its value is cross-validated (its own fit scored the validation
            # rows), and the leaderboard scores its refit on the training + validation rows.
            assert validation.mean == trial.user_attrs["holdout_validation"]
            algorithm = refit(config, result.split, seed=trial.user_attrs["seed"], registry=registry)
        else:
            assert validation.mean == trial.value
        assert evaluate(algorithm, result.split.test) == entry.test


def test_a_repeated_configuration_reproduces_its_score(first_search):
    """The training seed follows the configuration, not the trial number: run again at other
    trial numbers, in another study, a configuration scores what it scored before."""
    result = first_search["result"]
    spec = SearchSpec.from_json(first_search["attrs"]["spec"])
    runner = TrialRunner(result.split, search_module.get_registry(), spec, "cpu")
    first, last = first_search["trials"][0], first_search["trials"][-1]
    assert first.user_attrs["seed"] != last.user_attrs["seed"]
    again = optuna.create_study(direction="maximize")
    for trial in (last, first, last):
        again.enqueue_trial(trial.params)
    again.optimize(runner, n_trials=3)
    rerun = again.get_trials()
    assert [t.number for t in rerun] == [0, 1, 2]
    assert [t.value for t in rerun] == [last.value, first.value, last.value]
    assert [t.user_attrs["seed"] for t in rerun] == [t.user_attrs["seed"] for t in (last, first, last)]
    # A different study seed trains the same configuration differently.
    assert configuration_seed(1, first.params) != first.user_attrs["seed"]


def test_resume_adds_only_the_missing_trials(first_search, standard_csv, tmp_path):
    shutil.copy(first_search["db_file"], tmp_path / "s.db")
    db = f"sqlite:///{tmp_path}/s.db"
    first_numbers = [t.number for t in first_search["trials"]]

    messages: list[str] = []
    second = search(standard_csv, "y", trials=5, db=db, seed=0, **{**FAST, "echo": messages.append})
    assert second.new_trials == 1
    assert any("resumed: 4 trial(s) already finished, 1 of the budget of 5 left" in m for m in messages), messages
    trials = load(db, standard_csv).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state.is_finished() for t in trials)
    # The first four trials are untouched.
    for old, new in zip(first_search["trials"], trials[:4]):
        assert (old.number, old.params, old.value, old.state) == (new.number, new.params, new.value, new.state)
    assert sorted(first_numbers) == [0, 1, 2, 3]

    messages.clear()
    third = search(standard_csv, "y", trials=5, db=db, seed=0, **{**FAST, "echo": messages.append})
    assert third.new_trials == 0
    assert any("resumed: 5 trial(s) already finished, 0 of the budget of 5 left" in m for m in messages), messages
    assert len(load(db, standard_csv).get_trials()) == 5
    assert third.leaderboard
    assert "Leaderboard" in third.format_leaderboard()
    # Nothing was cached in the third run's process: every finalist was loaded from the weights
    # kept by the worker that trained it, or retrained from its seed (trials 0-3: their weights
    # were not copied with the database), and must score exactly as in the second run.
    assert [(e.trial, e.validation, e.test) for e in third.leaderboard] == [
        (e.trial, e.validation, e.test) for e in second.leaderboard
    ]
    stored = queries.finalists(db, third.study.study_name, {})
    assert [row["trial"] for row in stored] == [e.trial for e in third.leaderboard]
    # Weights exist for the second run's trained trials only (a pruned trial or a duplicate keeps none).
    trained = [t.number for t in load(db, standard_csv).get_trials()
               if t.number >= 4 and t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "s.db-weights").glob("*/*.safetensors")) == trained


# ----------------------------------------------------------------------------- study identity
def test_a_second_seed_opens_a_second_study(first_search, standard_csv, tmp_path):
    """Another split (seed) is another experiment: its own study, ranked on its own validation
    rows only, and not seeded from the first study (whose validation rows it may test on)."""
    shutil.copy(first_search["db_file"], tmp_path / "s.db")
    db = f"sqlite:///{tmp_path}/s.db"
    first = first_search["result"]
    messages: list[str] = []
    second = search(standard_csv, "y", trials=2, db=db, seed=1, **{**FAST, "echo": messages.append})
    name = second.study.study_name
    assert name != first.study.study_name and name == load(db, standard_csv, seed=1).study_name
    assert name.startswith("synthetic-standard-") and len(name.rsplit("-", 1)[1]) == 10
    assert any(f"study {name!r} in" in m for m in messages), messages
    # The seed-0 study is as it was; the seed-1 study holds only trials trained on the seed-1 split.
    assert len(load(db, standard_csv).get_trials()) == 4
    trials = second.study.get_trials()
    assert [t.number for t in trials] == [0, 1]
    assert all(t.user_attrs["seed"] == configuration_seed(1, t.params) for t in trials)
    assert {e.trial for e in second.leaderboard} <= {0, 1}
    # Warm start left the seed-0 study out: 4 of its validation rows are seed-1 test rows here.
    assert any("left out 1 earlier search(es) of this same data" in m and first.study.study_name in m
               for m in messages), messages
    assert not any("warm_start" in t.user_attrs and first.study.study_name in t.user_attrs["warm_start"] for t in trials)
    shared = set(first.split.row_splits["validation"]) & set(second.split.row_splits["test"])
    assert shared  # the reason: selecting on seed-0 validation rows would select on seed-1 test rows
    # Within the seed-1 study, no row that selected a configuration is one of its test rows.
    assert not set(second.split.row_splits["validation"]) & set(second.split.row_splits["test"])


def test_naming_a_study_with_other_settings_is_refused(first_search, standard_csv, tmp_path):
    shutil.copy(first_search["db_file"], tmp_path / "s.db")
    db = f"sqlite:///{tmp_path}/s.db"
    name = first_search["result"].study.study_name
    with pytest.raises(AutometaError) as raised:
        search(standard_csv, "y", trials=5, db=db, seed=1, study=name, **{**FAST, "steps": 30})
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"study {name!r} was created with other settings (--seed 0, now 1; --steps 20, now 30)")
    assert len(load(db, standard_csv).get_trials()) == 4  # nothing was run or changed


def test_restricting_a_component_opens_its_own_study(first_search, standard_csv, tmp_path):
    """--fusion concat is another search space: a study of its own, not an error about plugins."""
    shutil.copy(first_search["db_file"], tmp_path / "s.db")
    db = f"sqlite:///{tmp_path}/s.db"
    restricted = search(standard_csv, "y", trials=1, db=db, include={"fusion": ["concat"]}, warm_start=False, **FAST)
    assert restricted.study.study_name != first_search["result"].study.study_name
    assert restricted.study.user_attrs["choices"]["fusion"] == ["concat"]
    with pytest.raises(AutometaError, match=r"--fusion choices attention/concat/.*, now concat\)"):
        search(standard_csv, "y", trials=1, db=db, include={"fusion": ["concat"]},
               study=first_search["result"].study.study_name, **FAST)


def test_study_settings_leave_out_what_does_not_change_the_experiment():
    spec = SearchSpec(
        "/data.csv", "y", None, {"x": "tabular"}, (28, 28), "standard", 5, 5, 15, 100, 600, 0, {"fusion": ["concat"]},
        300, 50, 30, "f" * 64,
    )
    same = [
        dataclasses.replace(spec, budget=99), dataclasses.replace(spec, data="/elsewhere.csv"),
        dataclasses.replace(spec, ways=3), dataclasses.replace(spec, test_tasks=1),
        dataclasses.replace(spec, image_size=(8, 8)),  # no image column
    ]
    assert all(other.key() == spec.key() for other in same)
    other = [dataclasses.replace(spec, **change) for change in (
        {"seed": 1}, {"shots": 1}, {"queries": 5}, {"steps": 10}, {"eval_every": 10}, {"label": "z"}, {"group": "g"},
        {"columns": {"x": "text"}}, {"protocol": "grouped"}, {"choices": {"fusion": ["sum"]}}, {"fingerprint": "e" * 64},
    )]
    assert len({spec.key(), *(o.key() for o in other)}) == len(other) + 1
    fewshot = dataclasses.replace(spec, protocol="fewshot", columns={"x": "image"})
    assert all(dataclasses.replace(fewshot, **change).key() != fewshot.key()
               for change in ({"ways": 3}, {"test_tasks": 1}, {"validation_tasks": 1}, {"image_size": (8, 8)}))


# ------------------------------------------------------------------------------------ fewshot
@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:20] for c in range(10)])
    images = (digits.images[keep] * 15).astype(np.uint8)  # 0..16 -> 0..240
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, image=images, y=digits.target[keep])
    return path


def test_fewshot_search_on_digits(digits_npz, tmp_path):
    db = f"sqlite:///{tmp_path}/s.db"
    result = search(
        digits_npz, "y", protocol="fewshot", ways=2, shots=1, queries=3, validation_tasks=4, test_tasks=6,
        image_size=(8, 8), trials=2, db=db, steps=10, eval_every=5, progress=False, echo=lambda s: None,
    )
    assert result.split.protocol == "fewshot"
    assert result.split.pool.features.specs["image"].shape == (1, 8, 8)
    classes = result.split.class_splits
    assert sum(len(v) for v in classes.values()) == 10
    assert not (set(classes["train"]) & set(classes["validation"]) or set(classes["train"]) & set(classes["test"]))
    assert len(result.split.test) == 6 and len(result.split.validation) == 4
    for task in result.split.test:
        assert task.n_way == 2 and task.support.shape == (2,) and task.query.shape == (6,)

    trials = result.study.get_trials()
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)
    assert result.leaderboard, [t.user_attrs for t in trials]
    for entry in result.leaderboard:
        # Several test tasks: the units are tasks, each scored on 6 queries; Student's t over them.
        assert entry.test.n == 6 and entry.test.unit == "tasks"
        assert 0.0 <= entry.test.mean <= 1.0
        assert entry.test.mean * 36 == pytest.approx(round(entry.test.mean * 36))
        accuracies = np.array([evaluate(entry.algorithm, [t]).mean for t in result.split.test])
        half = 2.5705818366147395 * accuracies.std(ddof=1) / math.sqrt(6)  # t quantile 0.975, 5 degrees of freedom
        assert (entry.test.low, entry.test.high) == pytest.approx(
            (max(0, accuracies.mean() - half), min(1, accuracies.mean() + half)), rel=1e-9)
    # Balanced episodes of unseen classes: chance, exactly 1/2, then the support's nearest class mean.
    chance, linear = result.baselines
    assert (chance.kind, chance.label, chance.score.n) == ("chance", "chance (1/2)", 6)
    assert chance.score.mean == chance.score.low == chance.score.high == 0.5
    assert str(chance.score) == "50.0%"
    assert linear.label == "nearest class mean of the preprocessed inputs" and linear.score.unit == "tasks"
    # 10 classes: 2 test classes, fewer than 2 × 2 ways, so the tasks share classes.
    assert result.warnings == [
        "the 6 test tasks are drawn from only 2 test classes (fewer than 2 × 2 ways), so they share classes: the "
        "interval understates the uncertainty"]
    assert "note: the 6 test tasks are drawn from only 2 test classes" in result.format_leaderboard()


# ------------------------------------------------------------------------------ failing plugin
class NanLoss(MetaAlgorithm):
    """A meta-algorithm whose training loss is not a number."""

    name = "nan_loss"
    protocols = ("standard",)
    search_space = {}

    def setup(self, backbone, pool, shape):
        self.backbone = backbone

    def train_step(self, pool, rng):
        return float("nan")

    def predict(self, task):
        return torch.zeros(task.query.shape[0], task.n_way)


class NanPlugin:
    @hookimpl
    def register_meta_algorithms(self, register):
        register(NanLoss)


def test_plugin_with_nan_loss_fails_its_trial_only(tabular_csv, tmp_path, monkeypatch, capsys):
    host = PluginHost(strict=True)
    assert host.add(autometa_builtins, "builtins") and host.add(NanPlugin(), "nan_plugin")
    registry = host.build_registry()
    assert registry.get("meta_algorithm", "nan_loss").plugin == "nan_plugin"
    monkeypatch.setattr(search_module, "get_registry", lambda: registry)

    db = f"sqlite:///{tmp_path}/s.db"
    # Fix the meta-algorithm of both trials: the failing one first, then a working one.
    study = optuna.create_study(study_name="nan-study", storage=db, direction="maximize")
    study.enqueue_trial({"meta_algorithm": "nan_loss"})
    study.enqueue_trial({"meta_algorithm": "protonet"})

    result = search(tabular_csv, "y", trials=2, db=db, study="nan-study", isolate=False, **FAST)  # patched registry: in-process
    trials = optuna.load_study(study_name="nan-study", storage=db).get_trials()
    assert [t.params["meta_algorithm"] for t in trials] == ["nan_loss", "protonet"]
    failed, ok = trials
    assert failed.state == TrialState.FAIL
    reason = failed.user_attrs["fail_reason"]
    assert "loss" in reason and "nan" in reason and "step 1" in reason
    assert failed.user_attrs["wall_time_s"] >= 0
    assert ok.state == TrialState.COMPLETE
    assert [e.trial for e in result.leaderboard] == [1]
    chosen = result.study.user_attrs["choices"]["meta_algorithm"]
    assert {"finetune", "nan_loss", "protonet"} <= set(chosen) and chosen == sorted(chosen)
    assert "failed: training loss became nan" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ CLI
def test_cli_search(tabular_csv, tmp_path):
    db = f"sqlite:///{tmp_path}/cli.db"
    runner = CliRunner()
    args = ["search", str(tabular_csv), "--label", "y", "--trials", "2", "--steps", "10", "--eval-every", "5",
            "--db", db, "--no-progress"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Leaderboard" in result.stdout
    assert "baseline: majority class of the training rows" in result.stdout
    assert "baseline: logistic regression on the preprocessed inputs" in result.stdout
    trials = load(db, tabular_csv, steps=10, eval_every=5).get_trials()
    assert len(trials) == 2 and all(t.user_attrs["steps"] == 10 for t in trials)
    printed = json.loads(runner.invoke(cli, [*args, "--format", "json"]).stdout)
    assert printed["test_unit"] == "rows" and printed["interval"] == "Wilson score interval"
    assert [b["baseline"] for b in printed["baselines"]] == ["majority", "linear"]
    assert {"test_accuracy", "test_ci95_low", "test_ci95_high", "test_units", "test_unit"} <= set(printed["baselines"][0])
    assert printed["warnings"] == []


def test_cli_missing_label_is_a_one_line_error(tabular_csv, tmp_path):
    db = f"sqlite:///{tmp_path}/cli.db"
    result = CliRunner().invoke(cli, ["search", str(tabular_csv), "--label", "no_such_column", "--db", db, "--no-progress"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Error:" in result.stderr and "no_such_column" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "cli.db").exists()


# ----------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_fastfood_example_beats_majority(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "fastfood.csv"
    result = search(path, "restaurant", trials=8, db=f"sqlite:///{tmp_path}/s.db", progress=False, echo=lambda s: None)
    assert result.split.protocol == "standard"
    assert result.best is not None
    best_test = max(e.test.mean for e in result.leaderboard)
    assert best_test > result.majority.mean + 0.3, result.format_leaderboard()


def test_vector_only_data_with_parameterless_default_backbone(tmp_path):
    """identity ▶ concat has no parameters: every default trial must still complete."""
    rng = np.random.default_rng(0)
    rows = [{"emb": json.dumps((rng.normal(size=4) + 3 * c).round(4).tolist()), "y": f"c{c}"} for c in range(3) for _ in range(20)]
    path = tmp_path / "vec.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    result = search_module.search(
        path, "y", trials=2, steps=10, eval_every=5, db=f"sqlite:///{tmp_path}/v.db", progress=False, echo=lambda m: None
    )
    trials = result.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # The vector encoder is identity, whether chosen for a network or as a fixed feature map.
    assert {t.params.get("encoder.vector", t.params.get("fixed.encoder.vector")) for t in trials} == {"identity"}
    # Well separated clusters: nearest prototype / a linear head on raw vectors is near perfect.
    assert result.best.test.mean > 0.9


def test_restricted_search_uses_only_the_chosen_components(standard_csv, tmp_path):
    result = search(
        standard_csv, "y", trials=2, db=f"sqlite:///{tmp_path}/r.db", seed=0,
        include={"meta_algorithm": ["protonet"], "fusion": ["attention"]}, **FAST,
    )
    trials = result.study.get_trials(deepcopy=False)
    assert {t.params["meta_algorithm"] for t in trials} == {"protonet"}
    assert {t.params["fusion"] for t in trials} == {"attention"}
    assert result.study.user_attrs["choices"]["meta_algorithm"] == ["protonet"]


@pytest.mark.parametrize(
    "include, message",
    [
        ({"meta_algorithm": ["nosuch"]}, r"no meta-algorithm named 'nosuch' is registered \(available: .*finetune"),
        ({"encoder.image": ["conv4"]}, r"cannot restrict encoder.image: this data has modalities tabular, text"),
        ({"encoder.text": ["mlp"]}, r"encoder 'mlp' does not support"),
        ({"meta_algorithm": ["maml"]}, r"meta-algorithm 'maml' does not support this data's standard protocol"),
    ],
)
def test_restriction_errors_name_the_component(standard_csv, tmp_path, include, message):
    with pytest.raises(AutometaError, match=message):
        search(standard_csv, "y", trials=1, db=f"sqlite:///{tmp_path}/e.db", include=include, **FAST)
    assert not (tmp_path / "e.db").exists()


def test_unknown_component_name_fails_before_the_data_is_read(tmp_path):
    # The data file does not exist: a name checked only after loading would raise DataError instead.
    for include, kind in (({"meta_algorithm": ["nosuch"]}, "meta-algorithm"), ({"encoder.text": ["nosuch"]}, "encoder"),
                          ({"fusion": ["nosuch"]}, "fusion")):
        with pytest.raises(PluginError, match=rf"no {kind} named 'nosuch' is registered"):
            search(tmp_path / "missing.csv", "y", trials=1, db=f"sqlite:///{tmp_path}/e.db", include=include, **FAST)
    assert not (tmp_path / "e.db").exists()


def test_cli_encoder_restriction_and_bad_format(standard_csv, tmp_path):
    runner = CliRunner()
    url = f"sqlite:///{tmp_path}/c.db"
    ok = runner.invoke(cli, ["search", str(standard_csv), "--label", "y", "--trials", "1", "--steps", "5", "--eval-every", "5",
                             "--db", url, "--no-progress", "--encoder", "text=hashbag", "--meta-algorithm", "finetune"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["search", str(standard_csv), "--label", "y", "--db", url, "--encoder", "text"])
    assert bad.exit_code == 2 and "expected MODALITY=NAME" in bad.output
