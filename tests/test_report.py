"""``autometa report``: the HTML page and figures made from a real (tiny) search's database."""

from __future__ import annotations

import base64
import hashlib
import io
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from autometa.cli.main import cli
from autometa.config import configuration_label
from autometa.errors import AutometaError
from autometa.results.report import SECTIONS, build_report
from autometa.store import queries
from autometa.study.engine import search

MAIN_FEATURES = {"rows": 60.0, "classes": 3.0, "class_entropy": 1.0, "missing_rate": 0.0, "text_columns": 1.0}
NEAR_FEATURES = {"rows": 80.0, "classes": 3.0, "class_entropy": 0.95, "missing_rate": 0.0, "vector_dim": 12.0}
FAR_FEATURES = {"rows": 50000.0, "classes": 40.0, "class_entropy": 0.3, "missing_rate": 0.4, "text_columns": 3.0}


class Page(HTMLParser):
    """What a reader sees: per section its text, tables (rows of cell texts), images and tags."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, dict] = {}
        self.tags: set[str] = set()
        self._section: str | None = None
        self._tables: list[dict] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = {"text": [], "tables": [], "images": []}
        elif self._section is None:
            return
        elif tag == "table":
            table = {"class": attrs.get("class", ""), "rows": [], "in_head": False}
            self.sections[self._section]["tables"].append(table)
            self._tables.append(table)
        elif tag == "thead":
            self._tables[-1]["in_head"] = True
        elif tag == "tbody":
            self._tables[-1]["in_head"] = False
        elif tag == "tr" and not self._tables[-1]["in_head"]:
            self._tables[-1]["rows"].append([])
        elif tag in ("td", "th") and not self._tables[-1]["in_head"]:
            self._cell = []
            self._tables[-1]["rows"][-1].append(self._cell)
        elif tag == "img":
            self.sections[self._section]["images"].append(attrs)

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif tag == "table" and self._tables:
            table = self._tables.pop()
            table["rows"] = [[" ".join("".join(c).split()) for c in row] for row in table["rows"]]
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._section is not None:
            self.sections[self._section]["text"].append(data)
        if self._cell is not None:
            self._cell.append(data)

    def text(self, section: str) -> str:
        return " ".join("".join(self.sections[section]["text"]).split())

    def table(self, section: str, cls: str) -> list[list[str]]:
        return next(t["rows"] for t in self.sections[section]["tables"] if t["class"] == cls)


def write_csv(path: Path, per_class: int = 20, seed: int = 0) -> Path:
    """3 classes carried by a numeric shift and a class word inside free text."""
    rng = np.random.default_rng(seed)
    words = {"alpha": "apple", "beta": "banana", "gamma": "cherry"}
    filler = "the a of and with from into over under near very some many".split()
    rows = []
    for index, label in enumerate(words):
        for _ in range(per_class):
            note = list(rng.choice(filler, size=5)) + [words[label]]
            rng.shuffle(note)
            rows.append({"size": index + rng.normal(), "noise": rng.normal(), "note": " ".join(note), "y": label})
    pd.DataFrame([rows[i] for i in rng.permutation(len(rows))]).to_csv(path, index=False)
    return path


def add_study(db: str, name: str, *, meta_features=None, value=None, state=TrialState.COMPLETE, reason="",
              **attrs) -> None:
    """A hand-made study with one trial, standing for a search on other data."""
    study = optuna.create_study(study_name=name, storage=db, direction="maximize")
    for key, item in {**attrs, **({"meta_features": meta_features} if meta_features else {})}.items():
        study.set_user_attr(key, item)
    params = {"meta_algorithm": "protonet", "fusion": "concat", "encoder.text": "hashbag", "meta.protonet.lr": 0.01}
    distributions = {k: CategoricalDistribution([v]) for k, v in params.items() if isinstance(v, str)}
    distributions["meta.protonet.lr"] = FloatDistribution(1e-4, 1e-1, log=True)
    study.add_trial(create_trial(
        params=params, distributions=distributions, value=value, state=state,
        user_attrs={"wall_time_s": 1.5, "fail_reason": reason} if state == TrialState.FAIL else {},
    ))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    db = f"sqlite:///{folder / 'studies.db'}"
    # hashbag only: an installed pretrained text encoder would spend the test's time embedding.
    result = search(write_csv(folder / "tiny.csv"), "y", trials=4, steps=20, eval_every=10, db=db,
                    validation_tasks=5, test_tasks=20, include={"encoder.text": ["hashbag"]}, output=None,
                    progress=False, echo=lambda m: None, pruner=optuna.pruners.NopPruner(),  # all four complete
                    warm_start=False)  # the default trials only: one fusion, so one plugin figure below
    name = result.study.study_name
    # Meta-features set by hand so the neighbours below are near and far by construction.
    optuna.load_study(study_name=name, storage=db).set_user_attr("meta_features", MAIN_FEATURES)
    add_study(db, "near-standard", meta_features=NEAR_FEATURES, value=0.8, dataset="near", protocol="standard")
    add_study(db, "far-fewshot", meta_features=FAR_FEATURES, value=0.4, dataset="far", protocol="fewshot")
    add_study(db, "no-features", value=0.5, dataset="plain")
    before = hashlib.sha256((folder / "studies.db").read_bytes()).hexdigest()
    path = build_report(name, db, folder / "out")
    after = hashlib.sha256((folder / "studies.db").read_bytes()).hexdigest()
    return {"db": db, "name": name, "path": path, "page": Page(path.read_text(encoding="utf-8")),
            "study": optuna.load_study(study_name=name, storage=db), "db_unchanged": before == after}


def test_every_section_has_content(searched):
    page, study = searched["page"], searched["study"]
    assert searched["path"].name == "report.html" and searched["db_unchanged"]
    assert set(SECTIONS) <= set(page.sections)
    for section in SECTIONS:
        assert len(page.text(section)) > 40, section
    summary = page.text("summary")
    for fact in (study.user_attrs["fingerprint"], "standard", "4 complete, 0 pruned, 0 failed", "Best configuration"):
        assert fact in summary
    assert "test data was used only for these rows" in page.text("leaderboard").lower()
    assert "over 12 test rows (wilson score interval)" in page.text("leaderboard").lower()
    assert page.table("dataset", "columns") == [["tabular", "2", "size, noise"], ["text", "1", "note"], ["label", "1", "y"]]
    assert "class_entropy" in page.text("dataset")


def test_leaderboard_matches_the_study(searched):
    page, study = searched["page"], searched["study"]
    stored = queries.finalists(searched["db"], searched["name"], {})  # autometa_trial_facts: the finalists' one home
    assert "leaderboard" not in study.user_attrs
    ensemble = queries.stored_ensemble(searched["db"], searched["name"])
    rows = searched["page"].table("leaderboard", "leaderboard")
    assert len(stored) == 3 and len(rows) == len(stored) + (ensemble is not None) + 2  # + the majority and linear baselines
    for row, entry in zip(rows, stored):
        trial = study.trials[entry["trial"]]
        assert row[0] == str(entry["rank"]) and row[1] == str(entry["trial"])
        assert row[2].startswith(configuration_label(trial.params))
        assert row[3] == f"{100 * trial.value:.1f}%"
        low, high = entry["test_ci95_low"], entry["test_ci95_high"]
        assert row[4] == f"{100 * entry['test_accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
        assert row[5] == f"{entry['parameters']:,}"
    if ensemble is not None:
        members = ", ".join(f"{m['trial']}×{m['weight']:.2f}" for m in ensemble["members"])
        assert rows[len(stored)][2].startswith(f"ensemble of trials {members}")
        assert rows[len(stored)][4].startswith(f"{100 * ensemble['test_mean']:.1f}%")
    baselines = study.user_attrs["baselines"]
    assert [r[2] for r in rows[-2:]] == [f"baseline: {b['label']}" for b in baselines]
    assert rows[-2][2] == "baseline: majority class of the training rows"
    assert [r[4] for r in rows[-2:]] == [
        f"{100 * b['test_accuracy']:.1f}% [{100 * b['test_ci95_low']:.1f}, {100 * b['test_ci95_high']:.1f}]"
        for b in baselines]
    trials = page.table("trials", "trials")
    assert [r[0] for r in trials] == [str(t.number) for t in study.trials] and len(trials) == 4
    assert all(r[1] == "complete" and r[2].endswith("%") for r in trials)


def test_figures_are_real_images_and_embedded(searched):
    page, folder = searched["page"], searched["path"].parent
    images = [img for s in page.sections.values() for img in s["images"]]
    files = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert {"history.png", "intermediate.png", "importance.png"} <= set(files)
    assert [i["data-file"] for i in page.sections["plugins"]["images"]] == ["plugins_meta_algorithm.png"]
    assert sorted(i["data-file"] for i in images) == sorted(files)
    for img in images:
        header, data = img["src"].split(",", 1)
        assert header == "data:image/png;base64"
        assert base64.b64decode(data) == files[img["data-file"]]
        assert img["alt"]
    for name, data in files.items():
        picture = Image.open(io.BytesIO(data))
        picture.verify()
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        assert picture.width > 100 and picture.height > 100, name
        low, high = zip(*picture.getextrema())
        assert min(low) < max(high), f"{name} is one colour"


def test_nearest_datasets_ranked_by_meta_features(searched):
    rows = searched["page"].table("dataset", "nearest")
    assert [r[0] for r in rows] == ["near-standard", "far-fewshot"]  # no-features has nothing to compare
    distances = [float(r[3]) for r in rows]
    assert all(math.isfinite(d) for d in distances) and distances[0] < distances[1]
    assert rows[0][4] == "4" and rows[0][5] == "80.0%" and rows[0][6].startswith("protonet + concat")


def test_errors_name_the_database_and_the_studies(searched, tmp_path):
    with pytest.raises(AutometaError, match=r"no study 'nope'.*far-fewshot.*near-standard"):
        build_report("nope", searched["db"], tmp_path / "x")
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    with pytest.raises(AutometaError, match="missing.db"):
        build_report("anything", missing, tmp_path / "x")
    assert not (tmp_path / "missing.db").exists()


def test_cli_prints_the_html_path(searched, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["report", searched["name"], "--db", searched["db"], "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "report.html") and (out / "report.html").is_file()
    result = CliRunner().invoke(cli, ["report", "nope", "--db", searched["db"]])
    assert result.exit_code == 1 and "available studies" in result.output


def test_study_with_only_failed_trials_renders_escaped(tmp_path):
    db = f"sqlite:///{tmp_path / 'failed.db'}"
    reason = "<script>alert(1)</script> CUDA out of memory"
    add_study(db, "broken", state=TrialState.FAIL, dataset="<b>odd</b>", protocol="standard", reason=reason,
              meta_features={"rows": 10.0})
    page_text = build_report("broken", db, tmp_path / "out").read_text(encoding="utf-8")
    page = Page(page_text)
    assert set(SECTIONS) <= set(page.sections)
    assert "script" not in page.tags and "b" not in page.tags
    assert "0 complete, 0 pruned, 1 failed" in page.text("summary")
    assert reason in page.text("summary") and reason in page.table("trials", "trials")[0][5]
    assert "<b>odd</b>" in page.text("summary")
    assert "at least two complete trials" in page.text("importance")
    assert "No leaderboard" in page.text("leaderboard")
    assert "No other study" in page.text("dataset")
    assert not list((tmp_path / "out").glob("*.png"))


def test_fixed_feature_choices_count_with_the_other_plugins(tmp_path):
    """A gbm trial's encoders (stored under fixed.*) appear in the plugin tables beside the others'."""
    db = f"sqlite:///{tmp_path / 'fixed.db'}"
    study = optuna.create_study(study_name="mixed", storage=db, direction="maximize")
    space = {"meta_algorithm": ["gbm", "protonet"], "fusion": ["concat"], "encoder.text": ["hashbag", "lsa"],
             "fixed.fusion": ["concat"], "fixed.encoder.text": ["lsa"]}
    for value, params in ((0.6, {"meta_algorithm": "protonet", "fusion": "concat", "encoder.text": "hashbag"}),
                          (0.8, {"meta_algorithm": "gbm", "fixed.fusion": "concat", "fixed.encoder.text": "lsa"})):
        study.add_trial(create_trial(params=params, value=value,
                                     distributions={k: CategoricalDistribution(space[k]) for k in params}))
    page = Page(build_report("mixed", db, tmp_path / "out").read_text(encoding="utf-8"))
    text = page.text("plugins")
    assert "Encoder for text" in text and "fixed." not in text
    rows = {tuple(r[:2]) for t in page.sections["plugins"]["tables"] for r in t["rows"]}
    assert {("lsa", "1"), ("hashbag", "1"), ("gbm", "1"), ("protonet", "1"), ("concat", "2")} <= rows
