"""End-to-end ``autometa.search``: leaderboard, study database, resume, few-shot images,
failing plugins and the command line. Tiny data and few steps keep every search fast."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import FixedTrial, TrialState

import autometa_builtins
from autometa.cli import cli
from autometa.errors import AutometaError
from autometa.components import MetaAlgorithm
from autometa.data import fingerprint, load_dataset
from autometa.evaluation import evaluate
from autometa.hookspecs import hookimpl
from autometa.plugins import PluginHost

# The search engine module (``autometa.search`` is the function it defines).
search_module = importlib.import_module("autometa.study")
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


def ci95_of_hits(mean: float, n: int) -> float:
    """1.96 · sample std / sqrt(n) for n Bernoulli units with the given mean."""
    return 1.96 * math.sqrt(mean * (1 - mean) * n / (n - 1)) / math.sqrt(n)


def load(db: str, dataset_path: Path, protocol: str = "standard") -> optuna.Study:
    dataset = load_dataset(dataset_path, "y")
    return optuna.load_study(study_name=search_module.study_name_for(dataset, protocol), storage=db)


@pytest.fixture(scope="module")
def standard_csv(tmp_path_factory) -> Path:
    return write_standard_csv(tmp_path_factory.mktemp("data") / "synthetic.csv")


@pytest.fixture(scope="module")
def tabular_csv(tmp_path_factory) -> Path:
    return write_standard_csv(tmp_path_factory.mktemp("tabular") / "tabular.csv", text=False)


@pytest.fixture(scope="module")
def first_search(standard_csv, tmp_path_factory):
    """One 3-trial search; its database file is copied by tests that extend the study."""
    folder = tmp_path_factory.mktemp("first")
    db = f"sqlite:///{folder}/s.db"
    messages: list[str] = []
    result = search(standard_csv, "y", trials=3, db=db, seed=0, **{**FAST, "echo": messages.append})
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

    assert result.new_trials == 3
    assert result.leaderboard, first_search["messages"]
    for rank, entry in enumerate(result.leaderboard, start=1):
        assert entry.rank == rank
        score = entry.test
        assert 0.0 <= score.mean <= 1.0
        assert score.n == n_test
        assert score.ci95 > 0
        # One test task: the units are query rows, so the CI is the Bernoulli one.
        assert score.mean * n_test == pytest.approx(round(score.mean * n_test))
        assert score.ci95 == pytest.approx(ci95_of_hits(score.mean, n_test), rel=1e-9)
        assert entry.parameters > 0
    validations = [e.validation for e in result.leaderboard]
    assert validations == sorted(validations, reverse=True)
    # Balanced classes: the support majority is a 3-way tie, broken towards the first class.
    assert result.majority.mean == pytest.approx(1 / 3)
    assert result.majority.ci95 == pytest.approx(ci95_of_hits(1 / 3, n_test))

    trials = first_search["trials"]
    assert len(trials) == 3
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs for t in trials]
    for t in trials:
        assert t.user_attrs["seed"] == search_module.configuration_seed(0, t.params)
        assert t.user_attrs["device"] == "cpu"
        assert t.user_attrs["wall_time_s"] > 0
        assert t.user_attrs["steps"] == 20
        assert 0.0 <= t.value <= 1.0
        # Validation accuracy on 18 rows: a multiple of 1/18.
        assert t.value * 18 == pytest.approx(round(t.value * 18))
    best = max(trials, key=lambda t: t.value)
    assert result.best.validation == best.value

    attrs = first_search["attrs"]
    assert attrs["fingerprint"] == fingerprint(dataset) == dataset.fingerprint
    assert attrs["protocol"] == "standard"
    assert attrs["label"] == "y"
    assert attrs["columns"] == {"size": "tabular", "noise": "tabular", "note": "text"}
    board = attrs["leaderboard"]
    assert [row["trial"] for row in board] == [e.trial for e in result.leaderboard]
    assert [row["test_accuracy"] for row in board] == [e.test.mean for e in result.leaderboard]
    assert attrs["majority_baseline"]["test_accuracy"] == pytest.approx(1 / 3)
    text = result.format_leaderboard()
    assert text.startswith("Leaderboard (standard protocol")
    assert f"over {n_test} query rows" in text


def test_leaderboard_scores_reproduce_by_retraining(first_search):
    """Retraining a leaderboard configuration from its seed gives the same validation and test score."""
    result = first_search["result"]
    registry = search_module.get_registry()
    choices = result.study.user_attrs["choices"]
    by_number = {t.number: t for t in first_search["trials"]}
    for entry in result.leaderboard:
        trial = by_number[entry.trial]
        config = search_module.sample_config(FixedTrial(trial.params), registry, choices)
        assert config.label() == entry.config.label()
        algorithm, validation = search_module.train(
            config, result.split, seed=trial.user_attrs["seed"], steps=20, eval_every=10, registry=registry
        )
        assert validation.mean == trial.value
        assert evaluate(algorithm, result.split.test) == entry.test


def test_a_repeated_configuration_reproduces_its_score(first_search):
    """The training seed follows the configuration, not the trial number: run again at other
    trial numbers, in another study, a configuration scores what it scored before."""
    result = first_search["result"]
    spec = search_module.SearchSpec.from_json(first_search["attrs"]["spec"])
    runner = search_module.TrialRunner(result.split, search_module.get_registry(), spec, "cpu")
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
    assert search_module.configuration_seed(1, first.params) != first.user_attrs["seed"]


def test_resume_adds_only_the_missing_trials(first_search, standard_csv, tmp_path):
    shutil.copy(first_search["db_file"], tmp_path / "s.db")
    db = f"sqlite:///{tmp_path}/s.db"
    first_numbers = [t.number for t in first_search["trials"]]

    messages: list[str] = []
    second = search(standard_csv, "y", trials=5, db=db, seed=0, **{**FAST, "echo": messages.append})
    assert second.new_trials == 2
    assert any("resumed: 3 trial(s) already finished, 2 of the budget of 5 left" in m for m in messages), messages
    trials = load(db, standard_csv).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state.is_finished() for t in trials)
    # The first three trials are untouched.
    for old, new in zip(first_search["trials"], trials[:3]):
        assert (old.number, old.params, old.value, old.state) == (new.number, new.params, new.value, new.state)
    assert sorted(first_numbers) == [0, 1, 2]

    messages.clear()
    third = search(standard_csv, "y", trials=5, db=db, seed=0, **{**FAST, "echo": messages.append})
    assert third.new_trials == 0
    assert any("resumed: 5 trial(s) already finished, 0 of the budget of 5 left" in m for m in messages), messages
    assert len(load(db, standard_csv).get_trials()) == 5
    assert third.leaderboard
    assert "Leaderboard" in third.format_leaderboard()
    # Nothing was cached in the third run: every finalist was retrained from its seed and
    # must score exactly as in the run that trained it.
    assert [(e.trial, e.validation, e.test) for e in third.leaderboard] == [
        (e.trial, e.validation, e.test) for e in second.leaderboard
    ]
    stored = load(db, standard_csv).user_attrs["leaderboard"]
    assert [row["trial"] for row in stored] == [e.trial for e in third.leaderboard]


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
        # Several test tasks: the units are tasks, each scored on 6 queries.
        assert entry.test.n == 6
        assert 0.0 <= entry.test.mean <= 1.0
        assert entry.test.mean * 36 == pytest.approx(round(entry.test.mean * 36))
    # Support sets are balanced (1 shot per class): the majority rule always picks way 0.
    assert result.majority.n == 6
    assert result.majority.mean == pytest.approx(0.5)
    assert result.majority.ci95 == 0.0


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
    assert "majority class of the support set" in result.stdout
    trials = load(db, tabular_csv).get_trials()
    assert len(trials) == 2 and all(t.user_attrs["steps"] == 10 for t in trials)


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
    assert {t.params["encoder.vector"] for t in trials} == {"identity"}
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


def test_cli_encoder_restriction_and_bad_format(standard_csv, tmp_path):
    runner = CliRunner()
    url = f"sqlite:///{tmp_path}/c.db"
    ok = runner.invoke(cli, ["search", str(standard_csv), "--label", "y", "--trials", "1", "--steps", "5", "--eval-every", "5",
                             "--db", url, "--no-progress", "--encoder", "text=hashbag", "--meta-algorithm", "finetune"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["search", str(standard_csv), "--label", "y", "--db", url, "--encoder", "text"])
    assert bad.exit_code == 2 and "expected MODALITY=NAME" in bad.output
