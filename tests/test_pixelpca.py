"""The built-in ``pixelpca`` image encoder: principal components fitted on training rows only, its
state saved with the model, new rows (and ``autometa predict --support``) prepared exactly as in
training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from autometa_builtins.fitted import PixelPCA
from click.testing import CliRunner
from helpers import assert_fitted_state_kept

import autometa
from autometa.cli.main import cli
from autometa.components import InputSpec

SIDE = 8
CLASSES = 12


def _private_pixel(c: int) -> tuple[int, int]:
    """A pixel only class ``c`` lights: the border, clockwise (12 of its 28 pixels)."""
    return (0, c) if c < SIDE else (c - SIDE + 1, SIDE - 1)


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory):
    """A few-shot search over 12 image classes, each a blob of its own inside the border plus a
    planted border pixel no other class lights."""
    folder = tmp_path_factory.mktemp("pixelpca")
    rng = np.random.default_rng(0)
    images, labels = [], []
    for c in range(CLASSES):
        centre = rng.integers(3, SIDE - 3, size=2)  # with its jitter the blob stays off the border
        for _ in range(8):
            image = np.zeros((SIDE, SIDE), np.float64)
            y, x = centre + rng.integers(-1, 2, size=2)
            image[y - 1: y + 2, x - 1: x + 2] = 160
            image[1:-1, 1:-1] += rng.uniform(0, 60, size=(SIDE - 2, SIDE - 2))
            image[_private_pixel(c)] = 255
            images.append(image.clip(0, 255).astype(np.uint8))
            labels.append(f"class{c}")
    images, labels = np.stack(images), np.array(labels)
    path = folder / "planted.npz"
    np.savez(path, image=images, label=labels)
    result = autometa.search(
        path, "label", protocol="fewshot", ways=2, shots=2, queries=3, trials=1, validation_tasks=3, test_tasks=3,
        image_size=(SIDE, SIDE), db=f"sqlite:///{folder}/s.db", output=folder / "models", steps=20, eval_every=10,
        progress=False, echo=lambda m: None,
        include={"meta_algorithm": ["protonet"], "encoder.image": ["pixelpca"]},
    )
    return {"images": images, "labels": labels, "result": result}


def test_state_is_fitted_on_training_rows_only(fewshot):
    """Held-out classes' private pixels get no weight in the mean image or the components, and the
    state is exactly the one fitted on the training rows alone."""
    result, images, labels = fewshot["result"], fewshot["images"], fewshot["labels"]
    split = result.split
    state = split.pool.features.fitted["image@pixelpca"]
    train = split.row_splits["train"]
    train_classes = set(labels[train])
    held_out = [c for c in range(CLASSES) if f"class{c}" not in train_classes]
    assert held_out  # the planted test: some classes are validation / test only
    planted = [r * SIDE + k for r, k in map(_private_pixel, held_out)]
    seen = [r * SIDE + k for r, k in (_private_pixel(int(c[5:])) for c in train_classes)]
    mean, components = state["mean"].numpy(), state["components"].numpy()
    assert mean.shape == (SIDE * SIDE,) and components.shape[1] == SIDE * SIDE
    assert np.all(mean[planted] == 0) and np.all(mean[seen] > 0)
    assert np.abs(components[:, planted]).max() < 1e-6
    assert np.abs(components[:, seen]).max() > 0.05  # the training classes' own pixels do count
    # Fitted on every row, the held-out pixels would weigh in: the check above can fail.
    everything = PixelPCA.fit_input(images[..., None], np.arange(len(images)))
    assert np.abs(everything["components"].numpy()[:, planted]).max() > 0.05
    alone = PixelPCA.fit_input(images[train][..., None], np.arange(len(train)))
    assert_fitted_state_kept(result, "image@pixelpca", alone)


def test_saved_model_predicts_like_the_trained_one(fewshot, tmp_path):
    result, images, labels = fewshot["result"], fewshot["images"], fewshot["labels"]
    model = autometa.load(result.model_path)
    task = result.split.test[0]
    support_rows, query_rows = task.support.numpy(), task.query.numpy()
    queries = pd.DataFrame({"image": list(images[query_rows])})
    features, _ = model._features(queries, label=None, name="data")
    assert torch.equal(features.inputs["image@pixelpca"], result.split.pool.features.inputs["image@pixelpca"][query_rows])

    for module in result.best.algorithm.modules().values():
        module.eval()
    expected = torch.softmax(result.best.algorithm.predict(task).double(), dim=-1).numpy()
    support = pd.DataFrame({"image": list(images[support_rows]), "label": labels[support_rows]})
    predicted = model.predict(queries, support=support)
    name_of = {int(y): labels[r] for y, r in zip(task.support_y.numpy(), support_rows)}
    order = [sorted(name_of.values()).index(name_of[i]) for i in range(task.n_way)]
    probabilities = predicted[[f"proba_{c}" for c in sorted(name_of.values())]].to_numpy()
    np.testing.assert_allclose(probabilities[:, order], expected, rtol=1e-5, atol=1e-7)
    assert list(predicted["prediction"]) == [name_of[int(i)] for i in expected.argmax(1)]

    np.savez(tmp_path / "support.npz", image=images[support_rows], label=labels[support_rows])
    np.savez(tmp_path / "queries.npz", image=images[query_rows])
    out = tmp_path / "predictions.csv"
    run = CliRunner().invoke(cli, ["predict", str(result.model_path), str(tmp_path / "queries.npz"),
                                   "--support", str(tmp_path / "support.npz"), "--output", str(out)])
    assert run.exit_code == 0, run.output
    pd.testing.assert_frame_equal(pd.read_csv(out), predicted, check_dtype=False, rtol=1e-6)


def test_features_are_unit_rows_of_the_training_components():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(30, 4, 4, 1), dtype=np.uint8)
    state = PixelPCA.fit_input(raw, np.arange(0, 30, 2))
    assert state["components"].shape == (14, 16)  # at most rows − 1 directions
    z = PixelPCA.prepare(raw, state)
    x = raw.reshape(30, -1) / 255.0 - state["mean"].numpy()
    expected = x @ state["components"].numpy().T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(30))
    with pytest.raises(ValueError, match="fitted on images of 16 values each; these have 64"):
        PixelPCA.prepare(np.zeros((2, 8, 8, 1), np.uint8), state)
    with pytest.raises(ValueError, match="call fit_input first"):
        PixelPCA.prepare(raw)


def test_starts_from_the_fixed_features():
    x = torch.nn.functional.normalize(torch.randn(5, 12), dim=1)
    adapted = PixelPCA(InputSpec("image", (12,)))
    assert torch.equal(adapted(x), x) and sum(p.numel() for p in adapted.parameters()) == 12 * 12 + 12
    assert torch.equal(PixelPCA(InputSpec("image", (12,)), projection="none")(x), x)
