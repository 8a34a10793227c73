"""Scores and baselines: confidence intervals against hand values, baselines on planted data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from autometa.components import InputSpec
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split
from autometa.data.scoring import (Score, baselines, caveats, format_score, score_unit, student_t, summarise, tfidf_over,
                                   wilson)
from autometa.types import Features

Z = 1.959963984540054  # the normal distribution's 97.5% quantile


# -- intervals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hits,n,expected", [
    # (k + z²/2) / (n + z²) ± z·sqrt(n)/(n + z²) · sqrt(p(1 - p) + z²/4n), worked out by hand
    (15, 18, (0.6077796189608428, 0.9416342319413856)),
    (18, 18, (0.8241207763533425, 1.0)),
    (0, 10, (0.0, 0.27753279986356)),
])
def test_wilson_interval_hand_values(hits, n, expected):
    p = hits / n
    centre = (hits + Z * Z / 2) / (n + Z * Z)
    half = Z * math.sqrt(n) / (n + Z * Z) * math.sqrt(p * (1 - p) + Z * Z / (4 * n))
    assert (centre - half, centre + half) == pytest.approx(expected, abs=1e-12)
    score = wilson(hits, n)
    assert (score.mean, score.n, score.unit) == (p, n, "rows")
    assert (score.low, score.high) == pytest.approx(expected, abs=1e-12)
    # No more "100.0 ± 0.0%": a perfect score on 18 rows is not certain.
    assert str(wilson(18, 18)) == "100.0% [82.4, 100.0]"


def test_student_t_interval_hand_values():
    accuracies = np.array([0.6, 0.8, 0.7, 0.9, 0.5])
    score = student_t(accuracies, "groups")
    # mean 0.7, sample sd 0.158113883, t(0.975, 4 df) = 2.7764451051977987
    half = 2.7764451051977987 * 0.15811388300841897 / math.sqrt(5)
    assert (score.mean, score.n, score.unit) == (pytest.approx(0.7), 5, "groups")
    assert (score.low, score.high) == pytest.approx((0.7 - half, 0.7 + half), rel=1e-12)
    assert score.high - score.low == pytest.approx(0.3926, abs=1e-4)  # the normal approximation said 0.2772
    # Clipped to [0, 1]; undefined for one unit.
    high = student_t(np.array([1.0, 0.9, 1.0]), "tasks")
    assert high.high == 1.0 and high.low < 0.9667
    single = student_t(np.array([0.75]), "tasks")
    assert math.isnan(single.low) and str(single) == "75.0%"


def test_summarise_picks_the_unit():
    one = summarise([torch.tensor([True, True, False, True])])
    assert (one.unit, one.n, one.mean) == ("rows", 4, 0.75)
    several = summarise([torch.tensor([True, False]), torch.tensor([True, True, True, False])], "groups")
    assert (several.unit, several.n, several.mean) == ("groups", 2, pytest.approx(0.625))


def test_score_as_dict_and_format():
    score = Score(0.5, 0.25, 0.75, 8, "tasks")
    assert score.as_dict() == {"test_accuracy": 0.5, "test_ci95_low": 0.25, "test_ci95_high": 0.75, "test_units": 8,
                               "test_unit": "tasks"}
    assert Score(0.5, math.nan, math.nan, 1, "tasks").as_dict()["test_ci95_low"] is None
    assert format_score(0.5, 0.25, 0.75) == "50.0% [25.0, 75.0]"
    assert format_score(0.2, 0.2, 0.2) == "20.0%" and format_score(None, None, None) == "-"


# -- the design matrix of the linear baseline ----------------------------------------------------------
def test_design_matrix_is_the_preprocessed_inputs_side_by_side():
    features = Features(
        {
            "tabular": torch.tensor([[0.5, -1.0], [2.0, 0.0]]),
            "text": torch.tensor([[3, 1, 3, 0], [0, 0, 0, 0]]),  # ids; 0 pads
            "image": torch.arange(8.0).reshape(2, 1, 2, 2),
            "present:text": torch.tensor([True, False]),
            "text@minilm": torch.ones(2, 5),  # an encoder's derived input: not the same inputs
        },
        {"tabular": InputSpec("tabular", (2,)), "text": InputSpec("text", (4,), vocab_size=5),
         "image": InputSpec("image", (1, 2, 2)), "text@minilm": InputSpec("text", (5,))},
    )
    matrix = features.design_matrix().toarray()
    assert matrix.tolist() == [
        [0.5, -1.0, 0, 1, 0, 2, 0, 0, 1, 2, 3],  # tabular, a bag of token counts over 5 ids, pixels
        [2.0, 0.0, 0, 0, 0, 0, 0, 4, 5, 6, 7],
    ]


def test_design_matrix_weighs_text_as_tfidf_over_the_given_rows():
    features = Features(
        {"tabular": torch.tensor([[0.5], [2.0], [1.0]]), "text": torch.tensor([[3, 1, 3], [1, 0, 0], [0, 0, 0]])},
        {"tabular": InputSpec("tabular", (1,)), "text": InputSpec("text", (3,), vocab_size=4)},
    )
    matrix = features.design_matrix(text=tfidf_over(np.array([0, 1]))).toarray()
    # Over rows 0 and 1 (n = 2): id 1 is in both, idf = ln(3/3) + 1 = 1; id 3 in one, ln(3/2) + 1.
    # Row 0: sublinear tf 1 (id 1) and 1 + ln 2 (id 3), then unit length; row 2 has no text.
    idf3 = math.log(1.5) + 1
    row0 = np.array([0, 1.0, 0, (1 + math.log(2)) * idf3])
    row0 /= np.linalg.norm(row0)
    assert matrix[:, 0].tolist() == [0.5, 2.0, 1.0]  # the table as it is
    np.testing.assert_allclose(matrix[0, 1:], row0)
    np.testing.assert_allclose(matrix[1, 1:], [0, 1, 0, 0])
    np.testing.assert_allclose(matrix[2, 1:], 0)


def test_subset_and_concat_keep_the_fitted_encoder_states():
    specs = {"text": InputSpec("text", (2,), vocab_size=4), "text@lsa": InputSpec("text", (1,))}
    first = Features({"text": torch.tensor([[1, 2], [3, 0]]), "text@lsa": torch.tensor([[0.5], [1.0]])}, specs,
                     {"text@lsa": {"mean": torch.tensor([1.0])}})
    second = Features({"text": torch.tensor([[2, 2]]), "text@lsa": torch.tensor([[2.0]])}, specs,
                      {"text@lsa": {"mean": torch.tensor([9.0])}, "text@other": {"w": torch.tensor([2.0])}})
    part = first.subset(torch.tensor([1]))
    assert part.inputs["text"].tolist() == [[3, 0]] and part.fitted is first.fitted
    both = Features.concat(first, second)
    assert both.inputs["text@lsa"].tolist() == [[0.5], [1.0], [2.0]]
    assert both.fitted["text@lsa"]["mean"].item() == 1.0 and both.fitted["text@other"]["w"].item() == 2.0


# -- baselines ------------------------------------------------------------------------------------
def _skewed_groups(path, groups: int = 15, common: int = 36, rare: int = 4):
    """Every group is 90% 'usual': the rare class sorts first, so it is each task's local class 0."""
    rng = np.random.default_rng(0)
    rows = [
        {"site": f"g{g:02d}", "x": (3.0 if label == "minority" else 0.0) + 0.1 * rng.normal(), "y": label}
        for g in range(groups) for label in ["usual"] * common + ["minority"] * rare
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return load_dataset(path, "y", group="site")


def test_grouped_majority_baseline_on_a_skewed_planted_set(tmp_path):
    """The old baseline, the argmax of a class-balanced support, always named local class 0 and
    scored 2/36 = 5.6% here; the majority of the labelled rows at hand scores 34/36 = 94.4%."""
    split = make_split(_skewed_groups(tmp_path / "sites.csv"), "grouped", shots=2)
    assert len(split.test) == 3 and score_unit(split) == "groups"
    for task in split.test:  # 2 + 2 support rows, 34 usual and 2 minority queries
        assert task.query_y.tolist() == [0, 0] + [1] * 34
        assert torch.bincount(task.support_y).tolist() == [2, 2]
    majority, linear = baselines(split)
    assert majority.label == "majority class of the training groups' rows and the support"
    assert majority.score.mean == pytest.approx(34 / 36) and majority.score.unit == "groups"
    assert majority.score.n == 3
    # x separates the classes: a plain logistic regression gets every query right.
    assert linear.score.mean == 1.0 and linear.label == "logistic regression on the preprocessed inputs"
    assert caveats(split) == []


def test_standard_baselines_on_planted_rows(tmp_path):
    rng = np.random.default_rng(1)
    counts = {"a": 50, "b": 20, "c": 10}
    rows = [{"x": 4.0 * i + rng.normal(0, 0.2), "noise": rng.normal(), "y": c}
            for i, (c, n) in enumerate(counts.items()) for _ in range(n)]
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(tmp_path / "rows.csv", index=False)
    split = make_split(load_dataset(tmp_path / "rows.csv", "y"), "standard")
    majority, linear = baselines(split)
    test_y = split.test[0].query_y
    assert majority.score == wilson(int((test_y == 0).sum()), len(test_y))  # 'a', the training rows' majority
    assert majority.score.mean == pytest.approx(10 / 16)
    assert linear.score == wilson(len(test_y), len(test_y))


def test_standard_linear_baseline_predicts_as_the_fit_on_every_column(tmp_path):
    """The baseline fits only the columns with a non-zero in its training rows (a few hundred of
    thousands of hashed-text buckets); its test predictions are those of scikit-learn's logistic
    regression on every column of the design matrix."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(60)]
    rows = []
    for i in range(150):
        c = int(rng.integers(3))
        vocabulary = words[20 * c: 20 * c + 20] if rng.random() < 0.6 else words  # noisy: not every row is easy
        rows.append({"text": " ".join(rng.choice(vocabulary, 4)), "x": c + rng.normal(0, 1.5), "y": f"k{c}"})
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    split = make_split(load_dataset(tmp_path / "rows.csv", "y", columns={"text": "text"}), "standard")
    _, linear = baselines(split)
    x, y, train = split.pool.features.design_matrix(), split.pool.labels.numpy(), split.row_splits["train"]
    used = np.diff(x[train].tocsc().indptr) > 0
    assert x.shape[1] > 20 * used.sum()  # mostly empty buckets: what the baseline leaves out
    query, query_y = split.test[0].query.numpy(), split.test[0].query_y.numpy()
    hits = LogisticRegression(max_iter=1000).fit(x[train], y[train]).predict(x[query]) == query_y
    assert 0 < hits.sum() < len(hits)
    assert linear.score == wilson(int(hits.sum()), len(hits))


def test_fewshot_baselines_are_chance_and_nearest_class_mean(tmp_path):
    # 12 classes on a line: the nearest class mean of the support gets every query right.
    rows = [{"x": float(c) + 0.01 * i, "y": f"k{c:02d}"} for c in range(12) for i in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "line.csv", index=False)
    split = make_split(load_dataset(tmp_path / "line.csv", "y"), "fewshot", ways=2, shots=2, queries=3,
                       validation_tasks=4, test_tasks=10)
    chance, linear = baselines(split)
    assert chance.kind == "chance" and chance.label == "chance (1/2)"
    assert (chance.score.mean, chance.score.n, chance.score.unit) == (0.5, 10, "tasks")
    assert linear.score.mean == 1.0 and linear.label == "nearest class mean of the preprocessed inputs"
    # round(0.2 × 12) = 2 test classes < 2 × 2 ways: the test tasks all share them.
    assert caveats(split) == [
        "the 10 test tasks are drawn from only 2 test classes (fewer than 2 × 2 ways), so they share classes: the "
        "interval understates the uncertainty"]


def test_fewshot_text_baseline_weighs_words_by_tfidf(tmp_path):
    """Each text is its class's own word among 1-30 repetitions of "the": as raw counts the
    nearest class mean follows how often "the" occurs (near chance); as TF-IDF the class word
    dominates, as it does for the few lines of scikit-learn a user would write first."""
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(["the"] * int(rng.integers(1, 31)) + [f"word{c}"]), "y": f"k{c:02d}"}
            for c in range(20) for _ in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "words.csv", index=False)
    split = make_split(load_dataset(tmp_path / "words.csv", "y", columns={"text": "text"}), "fewshot", ways=2,
                       shots=1, queries=3, validation_tasks=4, test_tasks=20)
    _, linear = baselines(split)
    assert linear.score.mean == 1.0
    raw = split.pool.features.design_matrix()  # what the baseline read before: counts, no idf
    hits = []
    for task in split.test:
        s, q = task.support.numpy(), task.query.numpy()
        means = np.stack([raw[s][task.support_y.numpy() == c].toarray().mean(0) for c in range(2)])
        hits.append((((raw[q].toarray()[:, None] - means) ** 2).sum(-1).argmin(1) == task.query_y.numpy()).mean())
    assert np.mean(hits) < 0.8


def test_few_test_groups_are_a_caveat(tmp_path):
    split = make_split(_skewed_groups(tmp_path / "sites.csv", groups=5), "grouped", shots=2)
    assert len(split.test) == 1 and score_unit(split) == "rows"
    assert caveats(split) == [
        "only 1 test group(s): the interval covers that group, not how the model does on new groups; it "
        "understates the uncertainty"]


def test_small_tasks_are_predicted_on_one_thread_and_the_setting_is_restored():
    """Adapting to a 5-way task's few rows gains nothing from threads, which only contend."""
    from types import SimpleNamespace

    from autometa.data.scoring import SMALL_TASK_ROWS, predict_probabilities

    class Recording:
        name = "recording"
        seen: list[int] = []

        def modules(self):
            return {}

        def predict(self, task):
            self.seen.append(torch.get_num_threads())
            return torch.zeros(task.query.shape[0], task.n_way)

    def task(rows):
        return SimpleNamespace(support=torch.arange(5), query=torch.arange(rows - 5), n_way=5)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        algorithm = Recording()
        predict_probabilities(algorithm, [task(80), task(80)])
        assert algorithm.seen == [1, 1] and torch.get_num_threads() == 2
        predict_probabilities(algorithm, [task(80), task(SMALL_TASK_ROWS + 1)])  # one large task: the usual threads
        assert algorithm.seen[2:] == [2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
