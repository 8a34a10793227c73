"""Saved models: save → load → predict reproduces the trained model, and bad input is refused."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits

import autometa
from autometa.cli.main import cli
from autometa.errors import DataError
from autometa.results.artifacts import ModelError

FAST = dict(steps=30, eval_every=15, progress=False, echo=lambda m: None)


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """A search on a small text + table dataset with its saved model."""
    folder = tmp_path_factory.mktemp("standard")
    rng = np.random.default_rng(0)
    words = {"a": "red apple crunchy", "b": "green pear soft", "c": "yellow banana ripe"}
    rows = []
    for label, text in words.items():
        for i in range(30):
            rows.append({
                "size": rng.normal({"a": 0, "b": 3, "c": -3}[label]),
                "kind": rng.choice(["x", "y"]),
                "note": f"{text} item {i} " + rng.choice(["fresh", "old", "sweet"]),
                "label": label,
            })
    path = folder / "fruit.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    result = autometa.search(
        path, "label", trials=2, db=f"sqlite:///{folder}/s.db", output=folder / "models",
        include={"meta_algorithm": ["finetune", "protonet"], "fusion": ["concat"]}, ensemble=False, **FAST,
    )
    return {"path": path, "result": result, "frame": pd.read_csv(path)}


def test_save_load_predict_round_trip_standard(standard):
    result = standard["result"]
    assert result.model_path is not None and (result.model_path / "model.json").is_file()
    assert result.study.user_attrs["model_path"] == str(result.model_path.resolve())
    test_task = result.split.test[0]
    for module in result.best.algorithm.modules().values():
        module.eval()  # as evaluate() and a loaded model do: no dropout
    expected = torch.softmax(result.best.algorithm.predict(test_task).double(), dim=-1).numpy()

    model = autometa.load(result.model_path)
    test_rows = standard["frame"].iloc[result.split.row_splits["test"]]
    predicted = model.predict(test_rows.drop(columns=["label"]))
    probabilities = predicted[[f"proba_{c}" for c in model.classes]].to_numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    assert list(predicted["prediction"]) == [model.classes[i] for i in expected.argmax(1)]
    # Accuracy of the loaded model equals the leaderboard's test score.
    accuracy = (predicted["prediction"].to_numpy() == test_rows["label"].to_numpy()).mean()
    assert accuracy == pytest.approx(result.best.test.mean)


def test_predict_keeps_input_order_and_cli_writes_csv(standard, tmp_path):
    model_path = standard["result"].model_path
    frame = standard["frame"].drop(columns=["label"])
    shuffled = frame.iloc[::-1].reset_index(drop=True)
    forward = autometa.load(model_path).predict(frame)
    backward = autometa.load(model_path).predict(shuffled)
    assert list(backward["prediction"]) == list(forward["prediction"][::-1])

    data = tmp_path / "rows.csv"
    frame.head(7).to_csv(data, index=False)
    out = tmp_path / "pred.csv"
    run = CliRunner().invoke(cli, ["predict", str(model_path), str(data), "--output", str(out)])
    assert run.exit_code == 0, run.output
    written = pd.read_csv(out)
    assert len(written) == 7 and written.columns[0] == "prediction"
    assert np.allclose(written.filter(like="proba_").sum(axis=1), 1.0)
    as_json = tmp_path / "pred.json"
    assert CliRunner().invoke(cli, ["predict", str(model_path), str(data), "--output", str(as_json)]).exit_code == 0
    assert len(json.loads(as_json.read_text())) == 7


def test_predict_names_missing_and_mistyped_columns(standard, tmp_path):
    model = autometa.load(standard["result"].model_path)
    frame = standard["frame"].drop(columns=["label"])
    with pytest.raises(DataError, match=r"missing column\(s\) size that the model was trained on"):
        model.predict(frame.drop(columns=["size"]))
    bad = frame.head(5).copy()
    bad["size"] = bad["size"].astype(object)
    bad.loc[1, "size"] = "large"
    with pytest.raises(DataError, match=r"column 'size' must be numeric as in training.*'large'"):
        model.predict(bad)
    missing = tmp_path / "missing.csv"
    frame.drop(columns=["note"]).to_csv(missing, index=False)
    run = CliRunner().invoke(cli, ["predict", str(standard["result"].model_path), str(missing)])
    assert run.exit_code == 1 and "missing column(s) note" in run.output and "Traceback" not in run.output


def test_pickled_or_foreign_model_files_are_refused(standard, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "model.json").write_text((standard["result"].model_path / "model.json").read_text())

    class Payload:
        def __reduce__(self):  # would run code if anything unpickled it
            return (exec, ("raise SystemExit('unpickled!')",))

    (folder / "weights.safetensors").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ModelError, match="never unpickles"):
        autometa.load(folder)
    torch_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, torch_file)
    with pytest.raises(ModelError, match=r"never unpickles \.pt/\.pkl files"):
        autometa.load(torch_file)
    (folder / "model.json").write_text(json.dumps({"format": "autometa-model", "format_version": 99}))
    with pytest.raises(ModelError, match="newer autometa"):
        autometa.load(folder)


def test_missing_plugin_is_named(standard, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    source = standard["result"].model_path
    document = json.loads((source / "model.json").read_text())
    meta = document["config"]["meta_algorithm"]
    document["plugins"]["meta_algorithm"]["name"] = "gone_learner"
    document["plugins"]["meta_algorithm"]["distribution"] = "autometa-gone"
    (folder / "model.json").write_text(json.dumps(document))
    (folder / "weights.safetensors").write_bytes((source / "weights.safetensors").read_bytes())
    with pytest.raises(ModelError, match=r"needs meta-algorithm 'gone_learner' from 'autometa-gone'"):
        autometa.load(folder)
    assert meta


def test_fewshot_model_adapts_to_a_support_file(tmp_path):
    digits = load_digits()
    images = (digits.images * 16).clip(0, 255).astype(np.uint8)
    labels = np.array([f"d{t}" for t in digits.target])
    np.savez(tmp_path / "digits.npz", image=images, label=labels)
    result = autometa.search(
        tmp_path / "digits.npz", "label", protocol="fewshot", ways=2, shots=3, queries=5, trials=1,
        validation_tasks=4, test_tasks=4, db=f"sqlite:///{tmp_path}/d.db", output=tmp_path / "models",
        include={"meta_algorithm": ["protonet"], "encoder.image": ["conv4"]}, **FAST,
    )
    model = autometa.load(result.model_path)
    task = result.split.test[0]
    for module in result.best.algorithm.modules().values():
        module.eval()
    expected = result.best.algorithm.predict(task).argmax(-1).numpy()

    support_rows = task.support.numpy()
    query_rows = task.query.numpy()
    class_names = sorted(set(labels[support_rows].tolist()))
    support = pd.DataFrame({"image": list(images[support_rows]), "label": labels[support_rows]})
    queries = pd.DataFrame({"image": list(images[query_rows])})
    predicted = model.predict(queries, support=support)
    assert list(predicted.columns) == ["prediction"] + [f"proba_{c}" for c in class_names]
    # An episode's local label i is whichever class its support rows labelled i belong to.
    name_of = {int(y): labels[r] for y, r in zip(task.support_y.numpy(), support_rows)}
    assert list(predicted["prediction"]) == [name_of[int(e)] for e in expected]

    with pytest.raises(DataError, match="pass one \\(--support FILE\\) with a 'label' column"):
        model.predict(queries)
    with pytest.raises(DataError, match="support set needs its label column 'label'"):
        model.predict(queries, support=support.drop(columns=["label"]))


def test_saved_model_is_listed_by_the_query_command(standard):
    result = standard["result"]
    db = result.study._storage.url if hasattr(result.study._storage, "url") else None
    url = db or f"sqlite:///{result.model_path.parents[1]}/s.db"
    run = CliRunner().invoke(cli, ["db", "models", "--db", url, "--format", "json"])
    assert run.exit_code == 0, run.output
    rows = json.loads(run.output)
    assert [r["model_path"] for r in rows] == [str(result.model_path.resolve())]
    assert rows[0]["best_test"] == pytest.approx(result.best.test.mean)
    assert (rows[0]["best_test_low"], rows[0]["best_test_high"], rows[0]["best_test_unit"]) == (
        pytest.approx(result.best.test.low), pytest.approx(result.best.test.high), "rows")
    table = CliRunner().invoke(cli, ["db", "studies", "--db", url])
    assert table.exit_code == 0 and result.study.study_name in table.output and "complete" in table.output
    csv_out = CliRunner().invoke(cli, ["db", "studies", "--db", url, "--format", "csv"])
    assert csv_out.output.splitlines()[0].startswith("study,dataset,protocol,trials")
