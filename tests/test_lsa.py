"""The fitted-input protocol (Encoder.fit_input) through the built-in ``lsa`` text encoder: fitted on
training rows only, its state saved with the model, and new rows prepared exactly as in training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import autometa
from autometa.results.artifacts import WEIGHTS_FILE, ModelError
from autometa.cli.main import cli
from autometa.components import InputSpec
from autometa_builtins.lsa import LatentSemantic, _counts, _tfidf, centred_unit_rows
from sklearn.preprocessing import normalize
from helpers import assert_fitted_state_kept

WORDS = ["stone", "river", "bridge", "walks", "slowly", "under", "old", "light", "green", "field"]


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory):
    """A few-shot search over 12 text classes, each with a planted vocabulary of its own."""
    folder = tmp_path_factory.mktemp("lsa")
    rng = np.random.default_rng(0)
    rows = []
    for c in range(12):
        own = [f"planted{c}x{j}" for j in range(4)]
        for _ in range(8):
            words = list(rng.choice(WORDS, size=4)) + list(rng.choice(own, size=3))
            rows.append({"text": " ".join(rng.permutation(words)), "label": f"class{c}"})
    path = folder / "planted.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    result = autometa.search(
        path, "label", protocol="fewshot", ways=2, shots=2, queries=3, trials=1, validation_tasks=3, test_tasks=3,
        db=f"sqlite:///{folder}/s.db", output=folder / "models", steps=20, eval_every=10, progress=False,
        echo=lambda m: None, include={"meta_algorithm": ["protonet"], "encoder.text": ["lsa"]},
    )
    return {"path": path, "frame": pd.read_csv(path), "result": result}


def test_state_is_fitted_on_training_rows_only(fewshot):
    """The saved state holds exactly the hash columns of training-class rows: n-grams that only
    held-out classes use (their planted words) never reach it."""
    result, frame = fewshot["result"], fewshot["frame"]
    split = result.split
    state = split.pool.features.fitted["text@lsa"]
    train = split.row_splits["train"]
    held_out = np.concatenate([split.row_splits["validation"], split.row_splits["test"]])
    seen = np.flatnonzero(np.asarray(_counts(frame.text.iloc[train].tolist()).sum(axis=0)).ravel())
    others = np.flatnonzero(np.asarray(_counts(frame.text.iloc[held_out].tolist()).sum(axis=0)).ravel())
    planted_only = np.setdiff1d(others, seen)
    assert len(planted_only) > 50  # the held-out classes' own words give many columns
    np.testing.assert_array_equal(state["columns"].numpy(), seen)
    assert not np.isin(planted_only, state["columns"].numpy()).any()
    # The same state as fitting on the training rows alone (nothing else was read), saved with the model.
    alone = LatentSemantic.fit_input(frame.text.iloc[train].tolist(), np.arange(len(train)))
    assert_fitted_state_kept(result, "text@lsa", alone)


def test_saved_model_prepares_and_predicts_like_the_trained_one(fewshot, tmp_path):
    result, frame = fewshot["result"], fewshot["frame"]
    model = autometa.load(result.model_path)
    task = result.split.test[0]
    support_rows, query_rows = task.support.numpy(), task.query.numpy()
    # New rows get the training-time features, bit for bit.
    features, _ = model._features(frame.iloc[query_rows].drop(columns=["label"]), label=None, name="data")
    assert torch.equal(features.inputs["text@lsa"], result.split.pool.features.inputs["text@lsa"][query_rows])

    for module in result.best.algorithm.modules().values():
        module.eval()
    expected = torch.softmax(result.best.algorithm.predict(task).double(), dim=-1).numpy()
    support = frame.iloc[support_rows]
    queries = frame.iloc[query_rows].drop(columns=["label"])
    predicted = model.predict(queries, support=support)
    # Local label i of the episode is the class of its support rows labelled i; the model orders
    # classes by name.
    name_of = {int(y): frame.label.iloc[r] for y, r in zip(task.support_y.numpy(), support_rows)}
    order = [sorted(name_of.values()).index(name_of[i]) for i in range(task.n_way)]
    probabilities = predicted[[f"proba_{c}" for c in sorted(name_of.values())]].to_numpy()
    np.testing.assert_allclose(probabilities[:, order], expected, rtol=1e-5, atol=1e-7)
    assert list(predicted["prediction"]) == [name_of[int(i)] for i in expected.argmax(1)]

    support.to_csv(tmp_path / "support.csv", index=False)
    queries.to_csv(tmp_path / "queries.csv", index=False)
    out = tmp_path / "predictions.csv"
    run = CliRunner().invoke(cli, ["predict", str(result.model_path), str(tmp_path / "queries.csv"),
                                   "--support", str(tmp_path / "support.csv"), "--output", str(out)])
    assert run.exit_code == 0, run.output
    pd.testing.assert_frame_equal(pd.read_csv(out), predicted, check_dtype=False, rtol=1e-6)


def test_model_without_its_fitted_state_is_refused(fewshot, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(fewshot["result"].model_path, folder)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    save_file({k: v for k, v in tensors.items() if not k.startswith("fitted.")}, str(folder / WEIGHTS_FILE))
    queries = fewshot["frame"].drop(columns=["label"]).head(3)
    with pytest.raises(ModelError, match="lacks the fitted state of input 'text@lsa'"):
        autometa.load(folder).predict(queries, support=fewshot["frame"].head(6))


def test_starts_from_the_fixed_features():
    """Identity-initialised: at first the encoder passes the SVD features through unchanged."""
    spec = InputSpec("text", (16,))
    x = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    adapted = LatentSemantic(spec)
    assert torch.equal(adapted(x), x) and sum(p.numel() for p in adapted.parameters()) == 16 * 16 + 16
    fixed = LatentSemantic(spec, projection="none")
    assert torch.equal(fixed(x), x) and not list(fixed.parameters())


def test_features_are_unit_rows_of_the_svd_basis():
    texts = [f"{a} {b} walks" for a in WORDS for b in WORDS[:5]]
    state = LatentSemantic.fit_input(texts, np.arange(0, len(texts), 2))
    z = LatentSemantic.prepare(texts + [""], state)
    assert z.shape == (len(texts) + 1, state["components"].shape[0]) and z.dtype == torch.float32
    torch.testing.assert_close(z[:-1].norm(dim=1), torch.ones(len(texts)))
    assert torch.equal(z[-1], torch.zeros(z.shape[1]))  # no text: no n-gram, a zero row
    with pytest.raises(ValueError, match="give text to fit on"):
        LatentSemantic.fit_input(["", ""], np.arange(2))


def test_centred_unit_rows_by_hand():
    """SimpleShot's CL2N on numbers worked by hand: (3, 4) → (0.6, 0.8); minus the mean (0.6, 0)
    → (0, 0.8) → (0, 1). (0, 2) → (0, 1) → (-0.6, 1) → (-0.6, 1) / √1.36. A zero row stays zero."""
    z = np.array([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]])
    got = centred_unit_rows(z, np.array([0.6, 0.0]))
    norm = np.sqrt(0.36 + 1.0)
    np.testing.assert_allclose(got, [[0.0, 1.0], [-0.6 / norm, 1.0 / norm], [0.0, 0.0]], atol=1e-12)


def test_features_are_centred_on_the_training_rows_mean():
    texts = [f"{a} {b} walks" for a in WORDS for b in WORDS[:5]]
    rows = np.arange(0, len(texts), 2)
    state = LatentSemantic.fit_input(texts, rows)
    # The saved mean is the training rows' mean unit row in the SVD space, nothing of the others.
    x = _tfidf(_counts(texts), state["columns"].numpy(), state["idf"].numpy())
    unit = normalize(np.asarray(x @ state["components"].numpy().astype(np.float64).T))
    np.testing.assert_allclose(state["mean"].numpy(), unit[rows].mean(axis=0), rtol=1e-5, atol=1e-7)
    z = LatentSemantic.prepare(texts, state).numpy()
    np.testing.assert_allclose(z, normalize(unit - unit[rows].mean(axis=0)), rtol=1e-5, atol=1e-6)
    # Centring removed the shared direction: the training rows' features now average near zero
    # (before, every row shared "walks" and the mean's norm was large).
    assert np.linalg.norm(z[rows].mean(axis=0)) < 0.2 * np.linalg.norm(unit[rows].mean(axis=0))
    # A model saved before centring (no mean in its state) keeps its uncentred features.
    old = {k: v for k, v in state.items() if k != "mean"}
    np.testing.assert_allclose(LatentSemantic.prepare(texts, old).numpy(), unit, rtol=1e-5, atol=1e-6)
