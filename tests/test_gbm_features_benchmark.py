"""benchmarks/gbm_features.py: its text statistics by hand, and its feature blocks fitted on the
training rows only, with the native-categories table holding the same numbers as autometa's."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers import benchmark_script

from autometa.data.loading import load_dataset


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script("gbm_features.py", "gbm_features_benchmark")


def test_text_statistics_by_hand(bench):
    stats = bench.text_statistics(["Hi 2 U!", ""])
    # "Hi 2 U!": 7 characters, 3 words; capitals H, U; one digit; one punctuation mark; words of 2, 1, 2.
    assert stats[0] == pytest.approx([math.log(8), math.log(4), 2 / 7, 1 / 7, 1 / 7, math.log1p(5 / 3)])
    assert stats[1] == pytest.approx([0, 0, 0, 0, 0, 0])


def test_blocks_fit_on_training_rows_and_code_categories(bench, tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    frame = pd.DataFrame({
        "size": rng.normal(size=n),
        "colour": rng.choice(["red", "green", "blue"], size=n),
        "note": [f"item {w} with {'many' if i % 2 else 'few'} words" for i, w in enumerate(rng.choice(["aa", "bb", "cc"], n))],
        "label": np.where(np.arange(n) % 2, "yes", "no"),
    })
    frame.loc[:29, "colour"] = frame.loc[:29, "colour"].where(frame.loc[:29, "colour"] != "blue", "red")
    frame.loc[30:, "colour"] = "blue"  # only outside the training rows
    path = tmp_path / "toy.csv"
    frame.to_csv(path, index=False)
    dataset = load_dataset(path, "label", columns={"note": "text", "colour": "tabular"})
    train = np.arange(30)
    blocks = bench.blocks(dataset, train)
    # Native: the standardised number (no missing values, so no indicator), then one code per category.
    assert blocks["native"].shape == (n, 2)
    np.testing.assert_allclose(blocks["native"][:, 0], blocks["onehot"][:, 0])
    assert list(blocks["native_categorical"]) == [False, True]
    assert np.isnan(blocks["native"][30:, 1]).all()  # blue: unseen in the training rows
    assert not np.isnan(blocks["native"][:30, 1]).any()
    # Text statistics are standardised over the training rows.
    np.testing.assert_allclose(blocks["stats"][train].mean(axis=0), 0, atol=1e-9)
    # The trees fit with the codes as categorical splits ("blue", unknown, goes where missing values
    # go); scikit-learn refuses a categorical mask of another width than the fitted columns.
    accuracy = bench.test_accuracy("gbm, native categories", blocks, dataset.labels, train, np.arange(30, 40))
    assert accuracy in {k / 10 for k in range(11)}


def test_frequent_columns_by_hand(bench):
    """gbm's rule before informative_columns: most often non-zero first, ties by position."""
    x = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [1.0, 0.0, 4.0]])  # non-zero 1, 1 and 3 times
    assert bench.frequent_columns(x, 2).tolist() == [0, 2]
    assert bench.frequent_columns(x, 1).tolist() == [2]
