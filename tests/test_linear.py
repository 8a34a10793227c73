"""linear, logistic regression on fixed features, and tfidf, the text's TF-IDF as it is: the
weights are scikit-learn's exactly, absent and binary classes are handled, the TF-IDF columns
come from training rows only, default trials read tfidf, and a saved model predicts through
``autometa predict`` without scikit-learn or pickle."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
import scipy.sparse
import torch
from optuna.trial import FixedTrial
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

import autometa
from autometa.config import default_trials, sample_config, search_choices
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split
from autometa.plugins import get_registry
from autometa.study.training import train
from autometa_builtins.encoders import TfIdf
from autometa_builtins.lsa import BITS, KEPT_PER_KIND, _counts
from autometa_builtins.meta_algorithms._common import embed
from autometa_builtins.meta_algorithms import linear
from helpers import default_config, predicted_by_the_cli

FAST = dict(steps=4, eval_every=2, progress=False, warm_start=False, isolate=False)
WORDS = {"a": ["crisp", "salad", "leaf"], "b": ["grilled", "burger", "bacon"], "c": ["sweet", "shake", "cream"]}


def _planted(path, rows_per_class=30, seed=0, classes="abc"):
    """Classes told apart by their words (the text) and by a noisy number."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, label in enumerate(classes):
        for _ in range(rows_per_class):
            words = list(rng.choice(WORDS[label], 2)) + list(rng.choice(["with", "and", "large", "small"], 2))
            rows.append({"item": " ".join(rng.permutation(words)), "x": c + rng.normal(scale=2.0), "label": label})
    pd.DataFrame(rows).sample(frac=1, random_state=seed).to_csv(path, index=False)
    return path


def test_default_trials_give_linear_tfidf_and_gbm_its_first_fixed_map():
    registry = get_registry()
    choices = search_choices(registry, "standard", ["tabular", "text"])
    trials = {t["meta_algorithm"]: t for t in default_trials(registry, choices)}
    assert trials["linear"]["fixed.encoder.text"] == "tfidf" and trials["linear"]["fixed.encoder.tabular"] == "table"
    assert trials["gbm"]["fixed.encoder.text"] == "lsa"
    # Not allowed: the first-registered fixed map instead.
    narrowed = search_choices(registry, "standard", ["tabular", "text"], {"encoder.text": ["lsa", "hashbag"]})
    assert next(t for t in default_trials(registry, narrowed) if t["meta_algorithm"] == "linear")["fixed.encoder.text"] == "lsa"


def test_tfidf_keeps_the_most_frequent_training_columns_and_nothing_held_out():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 3)) for _ in range(20)]
    texts += ["zeta omega unseen words"] * 3  # rows outside the fitted ones
    train = np.arange(20)
    state = TfIdf.fit_input(texts, train)
    counts = _counts([texts[i] for i in train])
    df = np.asarray((counts > 0).sum(axis=0)).ravel()
    expected = np.flatnonzero(df >= 2)  # fewer than KEPT_PER_KIND per kind here: all of them
    np.testing.assert_array_equal(state["columns"].numpy(), expected)
    held_out = np.flatnonzero(np.asarray(_counts(texts[20:]).sum(axis=0)).ravel())
    assert not np.isin(np.setdiff1d(held_out, np.flatnonzero(df)), state["columns"].numpy()).any()
    x = TfIdf.prepare(texts, state)
    assert x.shape == (len(texts), len(expected)) and x.dtype == torch.float32
    # Word and character parts each of unit norm, so a row's norm is 1 where it has both.
    assert torch.allclose(x[:20].norm(dim=1), torch.ones(20), atol=1e-5)
    words = int(np.searchsorted(state["columns"].numpy(), 2**BITS))
    assert torch.allclose(x[:20, :words].norm(dim=1), torch.full((20,), 2**-0.5), atol=1e-5)
    # Many distinct n-grams: at most KEPT_PER_KIND of each kind, the most frequent ones.
    many = [f"w{i} w{i + 1} w{i % 7}" for i in range(6000)]
    big = TfIdf.fit_input(many, np.arange(6000))["columns"].numpy()
    assert (big < 2**BITS).sum() == KEPT_PER_KIND
    kept_df = np.asarray((_counts(many) > 0).sum(axis=0)).ravel()
    word_df = kept_df[: 2**BITS]
    threshold = np.sort(word_df)[::-1][KEPT_PER_KIND - 1]
    assert word_df[big[big < 2**BITS]].min() == threshold and (word_df > threshold).sum() <= KEPT_PER_KIND


@pytest.mark.parametrize("sparse", [True, False])
def test_linear_weights_are_scikit_learns(tmp_path, monkeypatch, sparse):
    """Fitted as a sparse matrix (features mostly zeros, as tfidf's are) or as a dense one."""
    monkeypatch.setattr(linear, "SPARSE_SHARE", 1.0 if sparse else 0.0)
    fits = []
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, x, y, fit=LogisticRegression.fit: fits.append(x) or fit(self, x, y))
    dataset = load_dataset(_planted(tmp_path / "p.csv"), "label")
    split = make_split(dataset, "standard", seed=0)
    registry = get_registry()
    config = default_config(search_choices(registry, "standard", dataset.modalities), "linear", C=3.0)
    assert config.encoders == {"tabular": "table", "text": "tfidf"}
    algorithm, score = train(config, split, seed=0, steps=5, eval_every=5, registry=registry)
    # The reference: the same features of the same training rows, scikit-learn's fit.
    pool = split.pool
    rows = torch.as_tensor(pool.rows)
    x = embed(algorithm.backbone, pool.features.take(rows)).double().numpy()
    y = pool._local[pool.labels[rows]].numpy()  # noqa: SLF001 - the pool's own label mapping
    assert [scipy.sparse.issparse(f) for f in fits] == [sparse]
    reference = LogisticRegression(C=3.0, max_iter=300).fit(x, y)  # dense
    np.testing.assert_allclose(algorithm.head.weight.double().numpy(), reference.coef_, atol=1e-4)
    np.testing.assert_allclose(algorithm.head.bias.double().numpy(), reference.intercept_, atol=1e-4)
    task = split.test[0]
    query = embed(algorithm.backbone, task.query_inputs()).double().numpy()
    np.testing.assert_allclose(torch.softmax(algorithm.predict(task).double(), -1).numpy(), reference.predict_proba(query), atol=1e-4)
    assert score.mean >= 0.9  # the planted words separate the classes


def test_a_class_absent_from_training_is_never_predicted_and_binary_keeps_two_columns(tmp_path):
    from autometa_builtins.meta_algorithms.linear import ABSENT, Linear

    class Pool:  # the two members of TrainingPool that train_step reads, three classes, two present
        rows = np.arange(40)
        n_classes = 3

        def rows_batch(self, n, rng):
            x = torch.cat([torch.randn(20, 2) - 2, torch.randn(20, 2) + 2])
            return {"v": x}, torch.tensor([0] * 20 + [2] * 20)

    class Backbone(torch.nn.Module):
        out_dim = 2

        def forward(self, inputs):
            return inputs["v"]

    algorithm = Linear(C=1.0)
    algorithm.backbone = Backbone()
    algorithm.head = torch.nn.Linear(2, 3).requires_grad_(False)
    algorithm.head.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
    torch.manual_seed(0)
    algorithm.train_step(Pool(), np.random.default_rng(0))
    assert algorithm.head.bias[1] == ABSENT and not algorithm.head.weight[1].any()
    assert not algorithm.head.weight[0].any() and algorithm.head.bias[0] == 0  # class 0: the zero reference
    logits = algorithm.head(torch.tensor([[-2.0, -2.0], [2.0, 2.0]]))
    assert logits.argmax(1).tolist() == [0, 2]


def test_saved_linear_round_trips_through_autometa_predict(tmp_path):
    path = _planted(tmp_path / "p.csv")
    result = autometa.search(path, "label", trials=1, db=f"sqlite:///{tmp_path}/s.db", output=tmp_path / "models",
                             include={"meta_algorithm": ["linear"]}, echo=lambda m: None, **FAST)
    assert result.best.config.meta_algorithm == "linear" and result.best.config.encoders["text"] == "tfidf"
    expected, written = predicted_by_the_cli(result, path, "label", tmp_path)
    np.testing.assert_allclose(written[[f"proba_{c}" for c in "abc"]].to_numpy(), expected, rtol=1e-5, atol=1e-7)
    weights = (result.model_path / "weights.safetensors").read_bytes()
    assert b"head.fitted" in weights and b"fitted.text@tfidf.idf" in weights and b"pickle" not in weights


def test_tfidf_matches_scikit_learns_word_weights_on_a_word_only_text():
    """Against an independent reference: scikit-learn's TfidfVectorizer (sublinear tf, smoothed
    idf) over the same word uni/bigrams agrees on each word column's idf."""
    texts = ["red apple pie", "green apple", "red wine", "apple wine red", "pie"]
    state = TfIdf.fit_input(texts, np.arange(5))
    reference = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit(texts)
    words = state["columns"].numpy() < 2**BITS
    idf = np.sort(state["idf"].numpy()[words])
    np.testing.assert_allclose(idf, np.sort(reference.idf_), rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_non_positive_c_is_refused(bad):
    from autometa_builtins.meta_algorithms.linear import Linear

    with pytest.raises(ValueError, match="C must be positive"):
        Linear(C=bad)


def _reference(algorithm, split, rows, C):
    """scikit-learn's fit on ``rows`` of the split's features, as the learner sees them."""
    pool = split.pool
    index = torch.as_tensor(rows)
    x = embed(algorithm.backbone, pool.features.take(index)).double().numpy()
    return LogisticRegression(C=C, max_iter=300).fit(x, pool._local[pool.labels[index]].numpy())  # noqa: SLF001


@pytest.mark.parametrize("refit", [True, False])
def test_chosen_one_step_learners_are_refitted_on_training_and_validation_rows(tmp_path, refit):
    said = []
    result = autometa.search(_planted(tmp_path / "p.csv"), "label", trials=1, db=f"sqlite:///{tmp_path}/s.db",
                             output=None, include={"meta_algorithm": ["linear"]}, refit=refit,
                             **{**FAST, "echo": said.append})
    split, algorithm = result.split, result.best.algorithm
    rows = split.row_splits["train"]
    if refit:
        rows = np.concatenate([rows, split.row_splits["validation"]])
    reference = _reference(algorithm, split, rows, C=10.0)
    np.testing.assert_allclose(algorithm.head.weight.double().numpy(), reference.coef_, atol=1e-4)
    # The leaderboard's validation figure is the trial's (fitted on training rows only).
    assert result.best.validation == result.study.trials[0].value
    assert any(m.startswith("refitted on the training + validation rows") and "trial(s) 0 " in m for m in said) == refit


def test_refit_applies_to_one_step_learners_on_the_standard_protocol_only(tmp_path):
    from autometa.study.training import refits

    registry = get_registry()
    dataset = load_dataset(_planted(tmp_path / "p.csv"), "label")
    split = make_split(dataset, "standard", seed=0)
    choices = search_choices(registry, "standard", dataset.modalities)
    assert refits(default_config(choices, "linear"), split, registry) and refits(default_config(choices, "gbm"), split, registry)
    protonet = sample_config(FixedTrial(next(t for t in default_trials(registry, choices)
                                             if t["meta_algorithm"] == "protonet")), registry, choices)
    assert not refits(protonet, split, registry)
    grouped = pd.read_csv(tmp_path / "p.csv").assign(site=lambda f: [f"s{i % 5}" for i in range(len(f))])
    grouped.to_csv(tmp_path / "g.csv", index=False)
    gsplit = make_split(load_dataset(tmp_path / "g.csv", "label", group="site"), "grouped", shots=2, seed=0)
    assert not refits(default_config(search_choices(registry, "grouped", dataset.modalities), "linear"), gsplit, registry)


def test_a_pool_over_other_rows_keeps_its_classes(tmp_path):
    dataset = load_dataset(_planted(tmp_path / "p.csv"), "label")
    pool = make_split(dataset, "standard", seed=0).pool
    labels = pool.labels.numpy()
    kept_class = pool.classes[0]
    extra = np.setdiff1d(np.arange(len(labels)), pool.rows)
    # Pretend the pool lacks one class: rows of it among the extra ones are left out.
    without = pool.over(pool.rows)
    assert np.array_equal(without.rows, pool.rows) and np.array_equal(without.classes, pool.classes)
    narrowed = type(pool)(pool.features, pool.labels, pool.rows[labels[pool.rows] == kept_class],
                          [{kept_class: pool.rows[labels[pool.rows] == kept_class]}], pool.device, pool.protocol)
    grown = narrowed.over(np.concatenate([narrowed.rows, extra]))
    assert np.array_equal(grown.classes, [kept_class]) and set(labels[grown.rows]) == {kept_class}
    assert len(grown.rows) == len(narrowed.rows) + int((labels[extra] == kept_class).sum())
    assert np.array_equal(np.sort(grown.sources[0][kept_class]), np.sort(grown.rows))


def test_no_refit_starts_long_after_the_timeout(tmp_path, monkeypatch):
    import importlib

    engine = importlib.import_module("autometa.study.engine")
    monkeypatch.setattr(engine, "OVERTIME_SHARE", -100.0)  # refits allowed until long before the deadline: none
    said = []
    result = autometa.search(_planted(tmp_path / "p.csv"), "label", trials=1, timeout=60, db=f"sqlite:///{tmp_path}/s.db",
                             output=None, include={"meta_algorithm": ["linear"]}, **{**FAST, "echo": said.append})
    reference = _reference(result.best.algorithm, result.split, result.split.row_splits["train"], C=10.0)
    np.testing.assert_allclose(result.best.algorithm.head.weight.double().numpy(), reference.coef_, atol=1e-4)
    assert "not refitted, more than -10000% of --timeout past its end: trial(s) 0 (scored and saved as their trials fitted them)" in said
    assert not any(m.startswith("refitted") for m in said)


def _blurred(path, rows_per_class=40, seed=1):
    """Like ``_planted``, but a third of the rows carry another class's words: about 55 % accuracy,
    so a cross-validated score differs from a holdout one and from 100 %."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, label in enumerate("abc"):
        for i in range(rows_per_class):
            source = label if i % 3 else "abc"[(c + 1) % 3]
            words = list(rng.choice(WORDS[source], 2)) + list(rng.choice(["with", "and", "large", "small"], 2))
            rows.append({"item": " ".join(rng.permutation(words)), "x": c + rng.normal(scale=2.0), "label": label})
    pd.DataFrame(rows).sample(frac=1, random_state=seed).to_csv(path, index=False)
    return path


def test_cross_validation_equals_scikit_learns_folds_with_the_validation_rows_as_one(tmp_path):
    from sklearn.model_selection import StratifiedKFold

    from autometa.study.training import CROSS_VALIDATION_FOLDS, cross_validate, cross_validates

    dataset = load_dataset(_blurred(tmp_path / "b.csv"), "label")
    split = make_split(dataset, "standard", seed=0)
    registry = get_registry()
    config = default_config(search_choices(registry, "standard", dataset.modalities), "linear", C=3.0)
    assert cross_validates(config, split, registry)
    algorithm, score = train(config, split, seed=7, steps=1, eval_every=1, registry=registry)
    train_rows, validation_rows = split.row_splits["train"], split.row_splits["validation"]
    labels = split.pool.labels.numpy()

    def hits(fit_rows, predicted):
        reference = _reference(algorithm, split, fit_rows, C=3.0)
        x = embed(algorithm.backbone, split.pool.features.take(torch.as_tensor(predicted))).double().numpy()
        return int((reference.predict(x) == labels[predicted]).sum())

    validation_hits = hits(train_rows, validation_rows)
    assert validation_hits == round(score.mean * len(validation_rows))
    expected = validation_hits
    folds = StratifiedKFold(CROSS_VALIDATION_FOLDS - 1, shuffle=True, random_state=7)
    for kept, held in folds.split(train_rows, labels[train_rows]):
        expected += hits(np.concatenate([train_rows[kept], validation_rows]), train_rows[held])
    value = cross_validate(config, split, validation_hits, seed=7, registry=registry)
    assert value == pytest.approx(expected / (len(train_rows) + len(validation_rows)))
    assert 0.4 < value < 0.9 and value != score.mean  # above chance (1/3), below perfect


def test_each_fold_is_fitted_without_its_rows_and_with_every_validation_row(tmp_path, monkeypatch):
    from autometa.study.training import cross_validate
    from autometa_builtins.meta_algorithms.linear import Linear

    dataset = load_dataset(_blurred(tmp_path / "b.csv"), "label")
    split = make_split(dataset, "standard", seed=0)
    registry = get_registry()
    config = default_config(search_choices(registry, "standard", dataset.modalities), "linear")
    fitted_on = []
    fit = Linear.train_step
    monkeypatch.setattr(Linear, "train_step", lambda self, pool, rng: (fitted_on.append(np.sort(pool.rows)), fit(self, pool, rng))[1])
    cross_validate(config, split, 0, seed=0, registry=registry)
    train_rows, validation_rows = split.row_splits["train"], split.row_splits["validation"]
    held = [np.setdiff1d(train_rows, rows) for rows in fitted_on]
    assert len(fitted_on) == 3 and all(np.isin(validation_rows, rows).all() for rows in fitted_on)
    assert np.array_equal(np.sort(np.concatenate(held)), np.sort(train_rows))  # every training row held out once
    assert all(not np.isin(rows, split.row_splits["test"]).any() for rows in fitted_on)


def test_a_one_step_trial_is_scored_by_cross_validation_and_says_so(tmp_path, capsys):
    result = autometa.search(_blurred(tmp_path / "b.csv"), "label", trials=1, db=f"sqlite:///{tmp_path}/s.db",
                             output=None, include={"meta_algorithm": ["linear"]}, **FAST)
    trial = result.study.trials[0]
    rows = len(result.split.row_splits["train"]) + len(result.split.row_splits["validation"])
    assert trial.user_attrs["cross_validation"] == f"4 folds over {rows} training + validation rows"
    holdout = trial.user_attrs["holdout_validation"]
    assert trial.value != holdout
    line = next(m for m in capsys.readouterr().err.splitlines() if m.startswith("trial   0"))
    assert (f"validation {100 * trial.value:.1f}% cross-validated (4 folds over {rows} training + validation rows; "
            f"{100 * holdout:.1f}% on the validation rows alone)") in line


def test_a_trial_line_says_how_a_one_step_trial_was_scored_even_when_both_scores_agree():
    from autometa.study.engine import _trial_line

    def line(**attrs):
        trial = optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.725, user_attrs=attrs)
        return _trial_line(trial, get_registry(), {})

    agreed = line(holdout_validation=0.725, cross_validation="4 folds over 160 training + validation rows")
    assert "validation 72.5% cross-validated (4 folds over 160 training + validation rows; 72.5% on the validation rows alone)" in agreed
    skipped = line(holdout_validation=0.725, cross_validation="not run: its folds' fits would pass the time limit")
    assert "validation 72.5% (cross-validation not run: its folds' fits would pass the time limit)" in skipped
    assert "cross" not in line()  # a trial of a learner that is not cross-validated


def test_cross_validation_is_skipped_when_its_folds_would_pass_the_trial_time_limit(tmp_path):
    import time

    from autometa.study.objective import TrialLimits, TrialRunner

    class Trial:
        user_attrs: dict = {}

        def set_user_attr(self, key, value):
            self.user_attrs[key] = value

    dataset = load_dataset(_blurred(tmp_path / "b.csv"), "label")
    runner = TrialRunner.__new__(TrialRunner)  # only what _cross_validated reads
    runner.split, runner.registry = make_split(dataset, "standard", seed=0), get_registry()
    config = default_config(search_choices(runner.registry, "standard", dataset.modalities), "linear")
    trial, probabilities = Trial(), [torch.zeros(len(runner.split.validation[0].query), 3)]
    # The fit took 0.5 s of a 1.2 s limit: three more would pass it.
    runner.limits = TrialLimits(seconds=1.2)
    assert runner._cross_validated(trial, config, 0, probabilities, 0.5, time.perf_counter() - 0.5, 0.5) == 0.5
    assert trial.user_attrs == {"holdout_validation": 0.5,
                                "cross_validation": "not run: its folds' fits would pass the time limit"}
    runner.limits = TrialLimits(seconds=100.0)
    assert runner._cross_validated(trial, config, 0, probabilities, 0.5, time.perf_counter() - 0.5, 0.5) != 0.5
    assert trial.user_attrs["cross_validation"].startswith("4 folds over")
