"""Ensembles of finished trials: Caruana selection on stored validation predictions, scored on
the test tasks, saved as a folder of models and used by `autometa predict`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial
from sqlalchemy import select

import autometa
from autometa.cli.main import cli
from autometa.data.scoring import evaluate, predict_probabilities
from autometa.plugins import get_registry
from autometa.results.artifacts import ENSEMBLE_FILE, save_ensemble
from autometa.store import queries, schema
from autometa.store.storage import engine_for
from autometa.study.ensemble import EnsembleAlgorithm, accuracy, build_ensemble, select as caruana

FAST = dict(steps=20, eval_every=10, progress=False, warm_start=False)
ALGORITHMS = {"meta_algorithm": ["finetune", "protonet", "matchingnet"], "fusion": ["concat"]}


def write_fruit(path, per_class=30, seed=0):
    rng = np.random.default_rng(seed)
    words = {"a": "red apple crunchy", "b": "green pear soft", "c": "yellow banana ripe"}
    rows = [{"size": rng.normal({"a": 0, "b": 1.5, "c": -1.5}[label]), "kind": rng.choice(["x", "y"]),
             "note": (text if rng.random() < 0.5 else rng.choice(list(words.values()))) + f" item {i}", "label": label}
            for label, text in words.items() for i in range(per_class)]
    pd.DataFrame(rows).sample(frac=1, random_state=seed).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 3-trial search (isolated workers, the default) with its ensemble."""
    folder = tmp_path_factory.mktemp("ensemble")
    data = write_fruit(folder / "fruit.csv")
    messages: list[str] = []
    db = f"sqlite:///{folder}/s.db"
    result = autometa.search(data, "label", trials=3, db=db, output=folder / "models", include=ALGORITHMS,
                             echo=messages.append, **FAST)
    return {"result": result, "db": db, "data": data, "messages": messages, "folder": folder}


# --- the selection ----------------------------------------------------------------------------
def planted_predictions():
    """Three candidates on three validation rows of classes 0, 1, 2 (chance: 1/3), each right on
    two rows and wrong on a different one: together, by majority, right on all three. On the
    test rows (class 0) only the first is right, and the other two are confidently wrong."""
    targets = np.array([0, 1, 2])

    def rows(right):
        return np.array([np.roll([0.8, 0.1, 0.1], y + (not r)) for y, r in zip(targets, right)], dtype=np.float32)

    validation = [rows([1, 1, 0]), rows([0, 1, 1]), rows([1, 0, 1])]
    test = [np.array([[0.9, 0.05, 0.05]] * 4, dtype=np.float32)] + [np.array([[0.05, 0.9, 0.05]] * 4, dtype=np.float32)] * 2
    return validation, test, targets


def test_selection_averages_the_validation_optimal_members():
    validation, _, targets = planted_predictions()
    counts = caruana([[p] for p in validation], [targets])
    assert counts.tolist() == [1, 1, 1]  # each alone: 2/3; the three averaged: 3/3 (by hand)
    assert accuracy([sum(validation) / 3], [targets]) == 1.0
    # Identical candidates: the first is chosen, and the ensemble is that candidate.
    same = caruana([[validation[0]], [validation[0].copy()]], [targets])
    assert same.tolist() == [1, 0]


def test_held_out_folds_keep_an_ensemble_only_when_choosing_one_beats_choosing_a_trial():
    from autometa.study.ensemble import held_out_choices

    targets = [np.zeros(15, dtype=np.int64)]
    right, wrong = [0.9, 0.1], [0.2, 0.8]
    # Each candidate wrong on its own third of the rows: any two of them outvote the third, so an
    # ensemble chosen on any four folds is right on every held-out row. One trial is wrong on 5 rows,
    # and the one chosen on four folds is the one with the fewest there, i.e. the most held out:
    # below its 2/3 on all rows.
    thirds = [[np.array([wrong if r % 3 == i else right for r in range(15)])] for i in range(3)]
    ensemble, single = held_out_choices(thirds, targets)
    assert ensemble == 1.0 and single < 2 / 3
    # One candidate always right, one always wrong: the ensemble chosen is the right one alone,
    # no better than choosing it: not kept (the search keeps it only when strictly better).
    ensemble, single = held_out_choices([[np.array([right] * 15)], [np.array([wrong] * 15)]], targets)
    assert ensemble == single == 1.0
    assert held_out_choices(thirds, [np.zeros(4, dtype=np.int64)] * 1, folds=5) is None  # 4 rows: too few to fold


def test_ensemble_is_chosen_on_validation_rows_only(tmp_path):
    """The planted test rows favour the first candidate alone (100% vs 0% for the three together);
    the validation rows favour the three together: those are chosen, and scored on test as they are."""
    validation, test, targets = planted_predictions()
    db = f"sqlite:///{tmp_path}/p.db"
    schema.recording_engine(db)
    study = optuna.create_study(study_name="planted", storage=db, direction="maximize")
    for i in range(3):
        study.add_trial(create_trial(params={"meta_algorithm": f"m{i}"}, value=2 / 3,
                                     distributions={"meta_algorithm": CategoricalDistribution(["m0", "m1", "m2"])}))
        schema.record_predictions(db, "planted", i, [validation[i]])

    def task(kind, labels):
        return SimpleNamespace(kind=kind, support=torch.arange(3), query=torch.arange(len(labels)), n_way=3,
                               query_y=torch.as_tensor(labels, dtype=torch.long))

    split = SimpleNamespace(protocol="standard", validation=[task("validation", targets)], test=[task("test", [0] * 4)])

    class Planted:
        name = "planted"

        def __init__(self, i):
            self.i = i

        def modules(self):
            return {}

        def predict(self, t):
            assert t.kind == "test"  # the ensemble never predicts validation rows: it reads the stored ones
            return torch.log(torch.as_tensor(test[self.i]))

    messages = []
    entry = build_ensemble(study, split, db, lambda t: Planted(t.number), messages.append, candidates=8)
    assert [t for t, _ in entry.members] == [0, 1, 2] and [w for _, w in entry.members] == pytest.approx([1 / 3] * 3)
    assert (entry.validation, entry.best_member_validation, entry.chosen) == (1.0, pytest.approx(2 / 3), True)
    assert entry.test.mean == 0.0  # the test-optimal ensemble (the first alone) would score 100%
    # 3 validation rows are too few to fold: kept on being better on them.
    assert messages[-1].endswith("validation 100.0% vs 66.7% for the best single trial: saved as the model")

    # With the members' test predictions kept (the leaderboard made them), none is predicted again.
    class Unused(Planted):
        def predict(self, t):
            raise AssertionError("a member kept its test predictions; it must not predict again")

    kept = build_ensemble(study, split, db, lambda t: Unused(t.number), messages.append, candidates=8,
                          test_probabilities=lambda t: [torch.as_tensor(test[t.number])])
    assert kept.members == entry.members and kept.test == entry.test


def test_a_trial_not_above_chance_is_left_out_of_the_ensemble(tmp_path):
    """A planted trial right on one validation row of three (chance: 1/3) where the best trial is
    wrong: greedy selection would add it (together 3/3); it is left out, and the search says so."""
    targets = np.array([0, 1, 2])
    best = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]], dtype=np.float32)  # wrong on row 2
    weak = np.array([[0.3, 0.4, 0.3], [0.3, 0.3, 0.4], [0.005, 0.005, 0.99]], dtype=np.float32)  # right on row 2 only
    assert (caruana([[best], [weak]], [targets]) > 0).all()  # both chosen: 3/3 together
    db = f"sqlite:///{tmp_path}/w.db"
    schema.recording_engine(db)
    study = optuna.create_study(study_name="weak", storage=db, direction="maximize")
    names = CategoricalDistribution(["m0", "m1", "m2", "m3"])
    for i, (value, predictions) in enumerate([(2 / 3, best), (2 / 3, best.copy()), (1 / 3, weak)]):
        study.add_trial(create_trial(params={"meta_algorithm": f"m{i}"}, value=value, distributions={"meta_algorithm": names}))
        schema.record_predictions(db, "weak", i, [predictions])
    task = SimpleNamespace(support=torch.arange(3), query=torch.arange(3), n_way=3, query_y=torch.as_tensor(targets))
    split = SimpleNamespace(protocol="standard", validation=[task], test=[task])
    messages = []
    entry = build_ensemble(study, split, db, lambda t: None, messages.append, candidates=8,
                           test_probabilities=lambda t: [torch.full((3, 3), 1 / 3)])
    assert 2 not in [t for t, _ in entry.members]
    assert "ensemble: trial(s) 2 left out, their validation accuracy not above the 33.3% of always guessing the " \
           "most common class" in messages
    # The weak trial and one other as the only candidates: fewer than two above chance, no ensemble.
    study.add_trial(create_trial(params={"meta_algorithm": "m3"}, value=0.9, distributions={"meta_algorithm": names}))
    schema.record_predictions(db, "weak", 3, [weak.copy()])
    assert build_ensemble(study, split, db, lambda t: None, messages.append, candidates=2) is None
    assert messages[-1] == "ensemble: fewer than two trials above chance have validation predictions stored; no ensemble"


# --- a real search ----------------------------------------------------------------------------
def test_identical_members_equal_their_member(searched):
    result = searched["result"]
    member = result.best.algorithm
    twice = EnsembleAlgorithm([(1.0, member), (3.0, member)])
    for task in result.split.test + result.split.validation:
        single, together = predict_probabilities(member, [task])[0], predict_probabilities(twice, [task])[0]
        torch.testing.assert_close(together, single, rtol=1e-5, atol=1e-6)
    assert evaluate(twice, result.split.test) == evaluate(member, result.split.test) == result.best.test


def test_validation_predictions_are_stored_for_every_complete_trial(searched):
    result, db = searched["result"], searched["db"]
    targets = [t.query_y.numpy() for t in result.split.validation]
    engine = engine_for(db)
    with engine.connect() as connection:
        stored = schema.stored_predictions(connection, result.study.study_name)
        raw = connection.execute(select(schema.validation_predictions)).all()
    engine.dispose()
    trials = result.study.get_trials()
    assert sorted(stored) == [t.number for t in trials] and len(raw) == 3
    rows = len(result.split.validation[0].query)
    for t in trials:
        (probabilities,) = stored[t.number]
        assert probabilities.shape == (rows, 3)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=3e-3)  # float16
        assert abs(accuracy(stored[t.number], targets) - t.value) <= 1 / rows  # a float16 tie may flip one row
    assert all(len(r.probabilities) < rows * 3 * 2 + 64 for r in raw)  # float16, compressed


def test_search_shows_saves_and_records_its_ensemble(searched):
    result, db = searched["result"], searched["db"]
    ensemble = result.ensemble
    assert ensemble is not None and len(ensemble.members) >= 1  # one alone: selection found no better mix
    assert sum(w for _, w in ensemble.members) == pytest.approx(1.0)
    members = {e.trial: e.algorithm for e in result.leaderboard}
    rebuilt = EnsembleAlgorithm([(w, members[t]) for t, w in ensemble.members])
    assert evaluate(rebuilt, result.split.test, "rows") == ensemble.test
    assert ensemble.chosen == (ensemble.validation > ensemble.best_member_validation)
    saved = (result.model_path / ENSEMBLE_FILE).is_file()
    assert saved == ensemble.chosen and (result.model_path / "model.json").is_file() != saved
    line = next(l for l in result.format_leaderboard().splitlines() if l.startswith(" ens"))
    assert f"{100 * ensemble.validation:.1f}%" in line and str(ensemble.test) in line and ensemble.label() in line
    # Its validation is on the validation rows alone: beside it, the best single trial's on those rows.
    same_rows = f"validation on the validation rows alone, the best single trial's {100 * ensemble.best_member_validation:.1f}% there"
    assert same_rows in line
    assert result.as_dict()["ensemble"]["members"] == [{"trial": t, "weight": w} for t, w in ensemble.members]
    row = [r for r in queries.leaderboard(db, result.study.study_name) if (r["configuration"] or "").startswith("ensemble")]
    assert len(row) == 1 and row[0]["test_mean"] == ensemble.test.mean and row[0]["validation"] == ensemble.validation
    assert same_rows in row[0]["configuration"]


def test_saved_ensemble_round_trips_through_predict(searched, tmp_path):
    """Two of the search's models saved as an ensemble; `autometa predict` reads the folder and
    predicts the weighted mean of their probabilities, scoring what the ensemble scored."""
    result, frame = searched["result"], pd.read_csv(searched["data"])
    first, second = result.leaderboard[:2]
    members = [(0.75, first.trial, first.algorithm, first.config), (0.25, second.trial, second.algorithm, second.config)]
    folder = save_ensemble(tmp_path / "ens", members, result.split, registry=get_registry(), study="s",
                           scores={}, image_size=(28, 28), label="label")
    assert json.loads((folder / ENSEMBLE_FILE).read_text())["members"] == [
        {"folder": f"member-trial-{first.trial}", "trial": first.trial, "weight": 0.75},
        {"folder": f"member-trial-{second.trial}", "trial": second.trial, "weight": 0.25}]
    test_rows = frame.iloc[result.split.row_splits["test"]]
    data, out = tmp_path / "rows.csv", tmp_path / "pred.csv"
    test_rows.drop(columns=["label"]).to_csv(data, index=False)
    run = CliRunner().invoke(cli, ["predict", str(folder), str(data), "--output", str(out)])
    assert run.exit_code == 0, run.output
    written = pd.read_csv(out)
    ensemble = EnsembleAlgorithm([(0.75, first.algorithm), (0.25, second.algorithm)])
    expected = predict_probabilities(ensemble, result.split.test)[0].numpy()
    classes = ["a", "b", "c"]
    np.testing.assert_allclose(written[[f"proba_{c}" for c in classes]].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    accuracy_ = (written["prediction"].to_numpy() == test_rows["label"].to_numpy()).mean()
    assert accuracy_ == pytest.approx(evaluate(ensemble, result.split.test).mean)


def test_no_ensemble_flag(tmp_path):
    data = write_fruit(tmp_path / "fruit.csv", per_class=15)
    db = f"sqlite:///{tmp_path}/s.db"
    run = CliRunner().invoke(cli, [
        "search", str(data), "--label", "label", "--trials", "2", "--steps", "10", "--eval-every", "5", "--db", db,
        "--no-ensemble", "--no-warm-start", "--no-progress", "--in-process", "--format", "json",
        "--meta-algorithm", "protonet", "--meta-algorithm", "finetune", "--output", str(tmp_path / "models")])
    assert run.exit_code == 0, run.output
    shown = json.loads(run.stdout)
    assert shown["ensemble"] is None and not any(r["configuration"].startswith("ensemble")
                                                  for r in queries.leaderboard(db, shown["study"]) if r["configuration"])
    assert (tmp_path / "models" / shown["study"] / "model.json").is_file()
    engine = engine_for(db)
    with engine.connect() as connection:  # the predictions are kept all the same (a later run may ensemble)
        assert len(schema.stored_predictions(connection, shown["study"])) == 2
    engine.dispose()


# --- other protocols --------------------------------------------------------------------------
@pytest.mark.slow
def test_fewshot_and_grouped_searches_build_ensembles(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:20] for c in range(10)])
    np.savez(tmp_path / "digits.npz", image=(digits.images[keep] * 15).astype(np.uint8), y=digits.target[keep])
    fewshot = autometa.search(
        tmp_path / "digits.npz", "y", protocol="fewshot", ways=2, shots=1, queries=3, validation_tasks=4, test_tasks=6,
        image_size=(8, 8), trials=3, db=f"sqlite:///{tmp_path}/f.db", output=None, echo=lambda m: None, isolate=False,
        include={"meta_algorithm": ["protonet", "matchingnet", "finetune"]}, **FAST)
    rng = np.random.default_rng(0)
    rows = [{"x1": "abc".index(c) + g * 0.3 + rng.normal(), "x2": rng.normal(), "site": f"s{g}", "y": c}
            for g in range(8) for c in "abc" for _ in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "sites.csv", index=False)
    grouped = autometa.search(
        tmp_path / "sites.csv", "y", group="site", protocol="grouped", shots=2, trials=3,
        db=f"sqlite:///{tmp_path}/g.db", output=None, echo=lambda m: None, isolate=False,
        include={"meta_algorithm": ["protonet", "matchingnet", "finetune"]}, **FAST)
    for result, unit in ((fewshot, "tasks"), (grouped, "groups")):
        ensemble = result.ensemble
        assert ensemble is not None and ensemble.members, result.format_leaderboard()
        assert ensemble.test.unit == unit and ensemble.test.n == len(result.split.test)
        members = {e.trial: e.algorithm for e in result.leaderboard}
        rebuilt = EnsembleAlgorithm([(w, members[t]) for t, w in ensemble.members])
        # Each task's members adapt to its support set; their query probabilities are averaged.
        for task in result.split.test[:3]:
            expected = sum(w * predict_probabilities(members[t], [task])[0] for t, w in ensemble.members)
            torch.testing.assert_close(predict_probabilities(rebuilt, [task])[0], expected, rtol=1e-5, atol=1e-6)
        assert evaluate(rebuilt, result.split.test, unit) == ensemble.test
