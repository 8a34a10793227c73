"""forest, the randomised-forest meta-algorithm on fixed features: its trees exported to tensors
give scikit-learn's predict_proba (missing values, classes it never saw), it learns, repeats under
a seed, adapts to held-out groups, fits a wide input's informative columns, and has a default
trial after gbm's and linear's (its round trip through `autometa predict` is tests/test_gbm.py's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

from autometa.config import default_trials, search_choices
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split
from autometa.plugins import get_registry
from autometa.study.training import train
from autometa_builtins.meta_algorithms import trees as module
from helpers import default_config
from test_gbm import _planted, rows_pool


@pytest.mark.parametrize("kind", [ExtraTreesClassifier, RandomForestClassifier])
@pytest.mark.parametrize("labels", [[0, 1], [0, 2, 3]])
def test_exported_forest_gives_scikit_learns_probabilities(kind, labels):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = np.asarray(labels)[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5 if len(labels) == 3 else 0)]
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take the side each split learned
    model = kind(n_estimators=20, min_samples_leaf=2, random_state=0).fit(x, y)
    trees = module.TreeEnsemble()
    trees.set_forest(model, n_classes=5)
    fresh = rng.normal(size=(200, 5))
    fresh[rng.random(fresh.shape) < 0.1] = np.nan
    for rows in (x, fresh):
        probabilities = trees(torch.from_numpy(rows.astype(np.float32))).numpy()
        expected = np.zeros((len(rows), 5))
        expected[:, labels] = model.predict_proba(rows)
        np.testing.assert_allclose(probabilities, expected, rtol=1e-12, atol=1e-15)
    loaded = module.TreeEnsemble()
    loaded.load_state_dict(trees.state_dict())  # shapes come from the saved trees
    assert torch.equal(loaded(torch.from_numpy(fresh)), trees(torch.from_numpy(fresh)))


def test_forest_learns_a_planted_table_and_repeats_under_a_seed(tmp_path):
    dataset = load_dataset(_planted(tmp_path / "p.csv"), "label")
    split = make_split(dataset, "standard", seed=0)
    registry = get_registry()
    choices = search_choices(registry, "standard", dataset.modalities)
    config = default_config(choices, "forest")
    assert config.encoders == {"tabular": "table", "text": "lsa"}
    assert config.meta_params == {"extra": True, "n_estimators": 100, "max_features": 0.5, "min_samples_leaf": 2}
    algorithm, score = train(config, split, seed=3, steps=3, eval_every=3, registry=registry)
    assert score.mean >= 0.9  # majority is 1/3; the planted thresholds are exact
    logits = algorithm.predict(split.test[0])
    again, again_score = train(config, split, seed=3, steps=3, eval_every=3, registry=registry)
    assert again_score.mean == score.mean and torch.equal(again.predict(split.test[0]), logits)
    bootstrapped = train(default_config(choices, "forest", extra=False), split, seed=3, steps=1, eval_every=1, registry=registry)[0]
    assert not torch.equal(bootstrapped.predict(split.test[0]), logits)


def test_forest_adapts_to_held_out_groups(tmp_path):
    dataset = load_dataset(_planted(tmp_path / "g.csv", rows_per_class=60, groups=True), "label", group="site")
    split = make_split(dataset, "grouped", shots=3, seed=0)
    registry = get_registry()
    _, score = train(default_config(search_choices(registry, "grouped", dataset.modalities), "forest"), split, seed=0, steps=1,
                     eval_every=1, registry=registry)
    assert score.mean >= 0.9  # chance: 1/3 per held-out group


def test_a_wide_input_is_fitted_on_the_columns_that_separate_its_classes(monkeypatch):
    """As gbm: the forest is scikit-learn's, with the seed train_step draws, fitted on the
    informative columns, and reads them at their place in the whole input."""
    monkeypatch.setattr(module, "MAX_COLUMNS", 4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10))
    y = (x[:, 4] > 0).astype(int) + 2 * (x[:, 6] > 0)

    algorithm = module.Forest(n_estimators=10)
    pool = rows_pool(x, y)
    algorithm.setup(lambda inputs: inputs["v"], pool, (1, 1, 1))
    algorithm.train_step(pool, np.random.default_rng(0))
    kept = module.informative_columns(x, y, 4)
    assert {4, 6} <= set(kept.tolist())
    used = set(algorithm.trees.feature[~torch.isinf(algorithm.trees.threshold)].tolist())
    assert used <= set(kept.tolist())
    seed = int(np.random.default_rng(0).integers(2**31))  # the fit's random_state, drawn as train_step draws it
    reference = ExtraTreesClassifier(n_estimators=10, max_features=0.5, min_samples_leaf=2, random_state=seed)
    reference.fit(x[:, kept], y)
    logits = algorithm._logits(torch.from_numpy(x))  # noqa: SLF001 - the scores predict() answers with
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), reference.predict_proba(x[:, kept]), atol=1e-12)


def test_default_trials_run_the_fixed_features_learners_first():
    registry = get_registry()
    trials = default_trials(registry, search_choices(registry, "standard", ["tabular", "text"]))
    assert [t["meta_algorithm"] for t in trials[:3]] == ["gbm", "linear", "forest"]  # forest ranks after the others
    assert trials[2]["fixed.encoder.text"] == "lsa" and trials[2]["fixed.encoder.tabular"] == "table"

