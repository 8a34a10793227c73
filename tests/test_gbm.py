"""gbm, the gradient-boosted-trees meta-algorithm on fixed features: its trees exported to
tensors predict as scikit-learn does, it learns, repeats under a seed, saves and loads without
pickle; the search space collapses the choices it ignores; and components that cannot work at
a task's size are left out up front with a note."""

from __future__ import annotations

import warnings

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

import autometa
from autometa.config import configuration_label, sample_config, search_choices, structure
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split, task_size
from autometa.components import InputSpec
from autometa.errors import PluginError, SearchError
from autometa.plugins import get_registry
from autometa.study.training import train
from autometa_builtins.meta_algorithms.trees import TreeEnsemble
from helpers import default_config, predicted_by_the_cli

FAST = dict(steps=4, eval_every=2, progress=False, warm_start=False, isolate=False)


@pytest.mark.parametrize("classes", [2, 4])
def test_exported_trees_score_rows_exactly_as_scikit_learn(classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = (x[:, 0] > 0).astype(int) + (2 * (x[:, 1] > 0.3) if classes == 4 else 0)
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take the side each split learned
    model = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(x, y)
    trees = TreeEnsemble()
    trees.set_trees(model)
    raw = trees(torch.from_numpy(x))
    np.testing.assert_array_equal(raw.numpy(), model._raw_predict(x))  # noqa: SLF001 - the reference
    loaded = TreeEnsemble()
    loaded.load_state_dict(trees.state_dict())  # shapes come from the saved trees
    assert torch.equal(loaded(torch.from_numpy(x)), raw)


def test_fixed_feature_maps_pass_their_input_through():
    registry = get_registry()
    x = torch.randn(3, 2, 4, 5)
    pixels = registry.get("encoder", "pixels").cls(InputSpec("image", (2, 4, 5)))
    assert pixels.out_dim == 40 and torch.equal(pixels(x), x.reshape(3, 40))
    assert torch.equal(pixels(x[None]), x.reshape(1, 3, 40))  # a leading task dimension stays
    table = registry.get("encoder", "table").cls(InputSpec("tabular", (7,)))
    rows = torch.randn(3, 7)
    assert table.out_dim == 7 and torch.equal(table(rows), rows)
    fixed = {i.name for i in registry.all() if i.kind != "meta_algorithm" and i.cls.fixed_params is not None}
    assert {"table", "pixels", "identity", "lsa", "minilm", "tfidf", "concat"} <= fixed and "mlp" not in fixed


def test_fixed_params_that_learn_are_refused():
    from autometa.plugins import validate_component
    from autometa_builtins.encoders import TabularMLP

    class Learning(TabularMLP):
        name = "learning"
        fixed_params = {"layers": 1}

    with pytest.raises(PluginError, match="'learning': with fixed_params .* it has .* parameters; fixed_params must make it learn nothing"):
        validate_component("encoder", Learning)


def _planted(path, rows_per_class=40, seed=0, groups=False):
    """Three classes separable by x1 thresholds (and only by them), noise columns, a text column
    that says nothing."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, label in enumerate("abc"):
        for i in range(rows_per_class):
            rows.append({"x1": c + rng.uniform(0.05, 0.95), "x2": rng.normal(), "x3": rng.normal(),
                         "note": " ".join(rng.choice(["red", "blue", "green", "tall", "short"], 4)),
                         "label": label, **({"site": f"s{i % 6}"} if groups else {})})
    pd.DataFrame(rows).sample(frac=1, random_state=seed).to_csv(path, index=False)
    return path


def test_a_learner_that_fits_in_one_step_is_trained_once_and_scored_on_every_validation_row(tmp_path, monkeypatch):
    dataset = load_dataset(_planted(tmp_path / "p.csv"), "label")
    split = make_split(dataset, "standard", seed=0)
    registry = get_registry()
    config = default_config(search_choices(registry, "standard", dataset.modalities), "gbm", min_samples_leaf=5)
    cls = registry.get("meta_algorithm", "gbm").cls
    calls, reports = [], []
    step = cls.train_step
    monkeypatch.setattr(cls, "train_step", lambda self, pool, rng: calls.append(1) or step(self, pool, rng))
    _, score = train(config, split, seed=0, steps=300, eval_every=50, registry=registry,
                     report=lambda s, v: reports.append((s, v)))
    assert len(calls) == 1 and reports == [(1, score.mean)]
    assert score.n == len(split.row_splits["validation"])  # every validation row, not the checkpoint subsample


def test_gbm_learns_a_planted_table_and_repeats_under_a_seed(tmp_path):
    dataset = load_dataset(_planted(tmp_path / "p.csv"), "label")
    split = make_split(dataset, "standard", seed=0)
    registry = get_registry()
    choices = search_choices(registry, "standard", dataset.modalities)
    config = default_config(choices, "gbm", min_samples_leaf=5)
    assert config.encoders == {"tabular": "table", "text": "lsa"} and config.encoder_params["text"] == {"projection": "none"}
    algorithm, score = train(config, split, seed=3, steps=3, eval_every=3, registry=registry)
    # Majority is 1/3 (balanced classes); the planted thresholds are exact.
    assert score.mean >= 0.9
    logits = algorithm.predict(split.test[0])
    again, again_score = train(config, split, seed=3, steps=3, eval_every=3, registry=registry)
    assert again_score.mean == score.mean
    assert torch.equal(again.predict(split.test[0]), logits)
    # A different seed draws another early-stopping holdout: another model.
    stopped = default_config(choices, "gbm", early_stopping=True, min_samples_leaf=5)
    one = train(stopped, split, seed=1, steps=1, eval_every=1, registry=registry)[0].trees.value
    two = train(stopped, split, seed=2, steps=1, eval_every=1, registry=registry)[0].trees.value
    assert not (one.shape == two.shape and torch.equal(one, two))


def test_gbm_adapts_to_held_out_groups(tmp_path):
    dataset = load_dataset(_planted(tmp_path / "g.csv", rows_per_class=60, groups=True), "label", group="site")
    split = make_split(dataset, "grouped", shots=3, seed=0)
    registry = get_registry()
    config = default_config(search_choices(registry, "grouped", dataset.modalities), "gbm", min_samples_leaf=5)
    _, score = train(config, split, seed=0, steps=1, eval_every=1, registry=registry)
    assert score.mean >= 0.9  # chance: 1/3 per held-out group


def test_the_space_of_a_fixed_features_learner_collapses():
    registry = get_registry()
    choices = search_choices(registry, "standard", ["tabular", "text", "image"])
    assert {"table"} <= set(choices["encoder.tabular"]) and "pixels" in choices["encoder.image"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(60):
        trial = study.ask()
        config = sample_config(trial, registry, choices)
        study.tell(trial, 0.5)
        if config.meta_algorithm == "gbm":
            seen.append(trial.params)
            # No learned encoder, fusion or their hyperparameters is asked for.
            assert not [k for k in trial.params if k.startswith(("fusion", "encoder.", "backbone."))]
            assert config.fusion == "concat" and config.encoders["tabular"] == "table"
            assert config.encoders["image"] in ("pixelpca", "pixels")
            assert config.encoders["text"] in ("lsa", "minilm", "tfidf")
            assert configuration_label(trial.params) == config.label()
            assert config.label().startswith("gbm on fixed features [tabular=table, text=")
    assert seen
    params = seen[0]
    assert structure(params)[1] == "concat" and dict(structure(params)[2])["fixed.encoder.tabular"] == "table"


def test_gbm_is_left_out_without_a_fixed_feature_map(capsys):
    registry = get_registry()
    notes = []
    choices = search_choices(registry, "standard", ["tabular", "text"], {"encoder.text": ["hashbag"]}, say=notes.append)
    assert not {"forest", "gbm", "linear"} & set(choices["meta_algorithm"])
    assert notes == [f"note: meta-algorithm {name!r} left out: it reads fixed features, and this search allows none for text"
                     for name in ("forest", "gbm", "linear")]
    with pytest.raises(SearchError, match="'gbm' reads fixed features.*none for text"):
        search_choices(registry, "standard", ["tabular", "text"], {"encoder.text": ["hashbag"], "meta_algorithm": ["gbm"]})


@pytest.mark.parametrize("learner", ["gbm", "forest"])
def test_saved_tree_ensembles_round_trip_through_autometa_predict(tmp_path, learner):
    path = _planted(tmp_path / "p.csv")
    result = autometa.search(path, "label", trials=1, db=f"sqlite:///{tmp_path}/s.db", output=tmp_path / "models",
                             include={"meta_algorithm": [learner]}, echo=lambda m: None, **FAST)
    assert result.best.config.meta_algorithm == learner and result.model_path is not None
    expected, written = predicted_by_the_cli(result, path, "label", tmp_path)
    np.testing.assert_allclose(written[[f"proba_{c}" for c in "abc"]].to_numpy(), expected, rtol=1e-6, atol=1e-9)
    assert list(written["prediction"]) == [list("abc")[i] for i in expected.argmax(1)]
    weights = (result.model_path / "weights.safetensors").read_bytes()
    assert b"trees.value" in weights and b"pickle" not in weights


def test_a_learner_that_cannot_work_at_the_task_size_is_left_out_with_a_note(tmp_path):
    # 24 classes on the standard protocol: 24-way tasks, above relationnet's 20.
    rng = np.random.default_rng(0)
    frame = pd.DataFrame([{"x": c + rng.normal(scale=0.1), "label": f"k{c:02d}"} for c in range(24) for _ in range(5)])
    frame.to_csv(tmp_path / "many.csv", index=False)
    dataset = load_dataset(tmp_path / "many.csv", "label")
    size = task_size(dataset, "standard", ways=5, shots=5)
    assert (size.ways, size.task_ways, size.classes) == (24, 24, 24)
    notes = []
    result = autometa.search(dataset, trials=1, db=f"sqlite:///{tmp_path}/s.db", output=None, protocol="standard",
                             echo=notes.append, defaults=True, **FAST)
    choices = result.study.user_attrs["choices"]["meta_algorithm"]
    assert "relationnet" not in choices and "protonet" in choices
    left_out = [n for n in notes if "relationnet" in n]
    assert left_out == ["note: meta-algorithm 'relationnet' left out: its relation scores, trained by squared error "
                        "against one-hot targets, collapse towards 0 at 24 ways (it works up to 20)"]
    with pytest.raises(SearchError, match="'relationnet' cannot work on this data's tasks: .* at 24 ways"):
        search_choices(get_registry(), "standard", ["tabular"], {"meta_algorithm": ["relationnet"]}, size)
    # At 5 ways it stays.
    assert "relationnet" in search_choices(get_registry(), "fewshot", ["tabular"], size=task_size(dataset, "fewshot", ways=5, shots=1))["meta_algorithm"]


def test_a_wide_input_is_fitted_on_the_columns_that_separate_its_classes(monkeypatch):
    """Beyond MAX_COLUMNS, the trees are fitted on the columns whose values differ most between the
    classes and read them at their place in the whole input: the same scores as scikit-learn's fit
    on those columns. A rare one-hot column that tells the class is kept over dense noise (the rule
    before, most often non-zero first, dropped every one-hot column of a table beside lsa)."""
    from autometa_builtins.meta_algorithms import trees as module

    monkeypatch.setattr(module, "MAX_COLUMNS", 4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10))  # dense noise, non-zero in every row
    y = (x[:, 4] > 0).astype(int)
    x[:, 7] = (y == 1) & (rng.random(200) < 0.3)  # a one-hot column: 1 in a third of class 1's rows
    x[:, 8] = 0.0
    assert (x[:, 7] != 0).sum() < 50
    kept = module.informative_columns(x, y, 4)
    assert kept.tolist() == sorted(kept.tolist()) and {4, 7} <= set(kept.tolist()) and 8 not in kept

    algorithm = module.GradientBoosting(max_iter=20)
    pool = rows_pool(x, y)
    algorithm.setup(lambda inputs: inputs["v"], pool, (1, 1, 1))
    algorithm.train_step(pool, np.random.default_rng(0))
    used = sorted(set(algorithm.trees.feature[~torch.isinf(algorithm.trees.threshold)].tolist()))
    assert set(used) <= set(kept.tolist()) and 4 in used
    seed = np.random.default_rng(0).integers(2**31)  # the fit's random_state, drawn as train_step draws it
    reference = HistGradientBoostingClassifier(max_iter=20, validation_fraction=0.1, n_iter_no_change=10,
                                               random_state=int(seed), l2_regularization=1e-4).fit(x[:, kept], y)
    np.testing.assert_allclose(algorithm.trees(torch.from_numpy(x)).numpy().ravel(),
                               reference._raw_predict(x[:, kept]).ravel())  # noqa: SLF001 - the reference


def rows_pool(x: np.ndarray, y: np.ndarray):
    """A training pool of the rows ``x`` (input ``v``) and labels ``y``, all of them in every batch."""

    class Pool:
        rows = np.arange(len(x))
        n_classes = int(y.max()) + 1
        device = torch.device("cpu")

        def rows_batch(self, n, rng):
            return {"v": torch.from_numpy(x)}, torch.from_numpy(y)

    return Pool()


def test_informative_columns_rank_by_the_f_statistic_with_constant_columns_last():
    """Hand-computed: two classes of two rows. Column 1 separates them perfectly (F infinite),
    column 2 has F = 2 (class means 0 and 2 about a mean of 1: squares between 4 on 1 degree of
    freedom, within 4 on 2, so 4 / 2), column 3 has F = 0 (same means), column 0 is constant."""
    from autometa_builtins.meta_algorithms.trees import informative_columns

    x = np.array([[5.0, 0.0, -1.0, 1.0], [5.0, 0.0, 1.0, -1.0], [5.0, 1.0, 1.0, 1.0], [5.0, 1.0, 3.0, -1.0]])
    y = np.array([0, 0, 1, 1])
    assert informative_columns(x, y, 1).tolist() == [1]
    assert informative_columns(x, y, 2).tolist() == [1, 2]
    assert informative_columns(x, y, 3).tolist() == [1, 2, 3]
    assert informative_columns(x, y, 4).tolist() == [0, 1, 2, 3]


def test_informative_columns_warn_of_no_constant_column_however_many():
    """scikit-learn warns of constant columns in a message that wraps lines once they are many
    (an n-gram absent from the training rows): a search's output must not show it."""
    from autometa_builtins.meta_algorithms.trees import informative_columns

    x = np.zeros((6, 400))
    x[:, 399] = [0, 0, 0, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert informative_columns(x, np.array([0, 0, 0, 1, 1, 1]), 1).tolist() == [399]
