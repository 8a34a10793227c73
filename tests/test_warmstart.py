"""Warm start: the distance ranking, translating stored configurations to this search, seeding
a new study from a similar dataset's search, and the knowledge base shipped with autometa."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from autometa.cli.main import cli
from autometa.config import configuration_label, default_trials, search_choices
from autometa.data.loading import load_dataset
from autometa.data.metafeatures import (
    MAX_DIFFERENCE,
    MISSING_PENALTY,
    describe,
    feature_scales,
    meta_feature_distance,
    rank_by_meta_features,
)
from autometa.errors import SearchError
from autometa.plugins import get_registry
from autometa.store import PRIOR_PATH
from autometa.store.knowledge import (
    Experience,
    PortfolioEntry,
    build_portfolio,
    distinct_best,
    greedy_portfolio,
    prior_experiences,
    read_prior,
    score_matrix,
)
from autometa.study.engine import search, study_name
from autometa.study.warmstart import NEAR, Seed, enqueue_opening, opening, plan, translate

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


def test_distance_by_hand_with_fixed_scales_and_a_missing_modality():
    a = {"rows": 100.0, "classes": 2.0, "class_entropy": 0.9, "tabular_numeric": 3.0, "landmark_tabular_1nn": 0.8}
    b = {"rows": 1000.0, "classes": 2.0, "class_entropy": 0.7, "tabular_numeric": 3.0, "text_columns": 1.0,
         "landmark_tabular_1nn": 0.6}
    scales = {"rows": 1.0, "classes": 1.0, "class_entropy": 0.1, "tabular_numeric": 0.5, "landmark_tabular_1nn": 0.2}
    size = math.log(1001 / 101)  # rows on a log scale, scale 1
    classes = math.sqrt((0 ** 2 + 2.0 ** 2) / 2)  # the same class count; entropies 0.2 apart at scale 0.1
    statistics = math.sqrt((0 ** 2 + MISSING_PENALTY ** 2) / 2)  # tabular alike; text only on b's side
    landmarks = 1.0  # 0.2 apart at scale 0.2; b has no text landmarker to compare
    expected = math.sqrt((size ** 2 + classes ** 2 + statistics ** 2 + landmarks ** 2) / 4)
    assert meta_feature_distance(a, b, scales) == pytest.approx(expected)
    assert meta_feature_distance(b, a, scales) == pytest.approx(expected)
    # A difference counts at most MAX_DIFFERENCE scales; without a scale a feature takes its default.
    far = dict(a, class_entropy=0.0)
    assert meta_feature_distance(a, far, scales) == pytest.approx(math.sqrt((MAX_DIFFERENCE ** 2 / 2) / 4))
    assert meta_feature_distance(a, dict(a, rows=math.e * 101 - 1), {}) == pytest.approx(math.sqrt(1 / 4))


def test_distance_does_not_depend_on_what_else_is_stored():
    mine = {"rows": 100.0, "class_entropy": 0.5}
    others = {"a": {"rows": 110.0, "class_entropy": 0.52}, "b": {"rows": 105.0, "class_entropy": 0.95}}
    scales = {"rows": 0.8, "class_entropy": 0.2}
    alone = {n.study: n.distance for n in rank_by_meta_features(mine, others, scales)}
    more = {"c": {"rows": 1e6, "class_entropy": 0.0}, "d": {"rows": 110.0, "class_entropy": 0.5, "text_columns": 2.0}}
    crowded = {n.study: n.distance for n in rank_by_meta_features(mine, {**others, **more}, scales)}
    assert crowded["a"] == alone["a"] and crowded["b"] == alone["b"]
    ranked = rank_by_meta_features({**mine, "name": "text is ignored"}, {**others, "x": {"other": 1.0}}, scales)
    assert [n.study for n in ranked] == ["a", "b"]  # x shares nothing with it
    assert ranked[0].shared == 2


def test_feature_scales_by_hand():
    described = [{"rows": 9.0, "majority_rate": 0.5}, {"rows": 99.0, "majority_rate": 0.9}, {"rows": 999.0}]
    scales = feature_scales(described)
    assert scales["rows"] == pytest.approx(np.std(np.log([10, 100, 1000])), abs=1e-6)  # signed log1p
    assert scales["majority_rate"] == pytest.approx(0.2)  # rates as they are
    # a feature constant over the base gets a floor (a quarter of its default), one seen once none
    assert feature_scales([{"classes": 2.0, "x": 1.0}, {"classes": 2.0}]) == {"classes": 0.25}


def write_text_table(path: Path, rows: int, seed: int) -> Path:
    """Short product descriptions from class-specific vocabularies plus two numeric columns."""
    rng = np.random.default_rng(seed)
    words = {"a": "crisp fresh salad green leaf light".split(), "b": "fried crispy chicken bacon cheese".split(),
             "c": "sweet cream chocolate vanilla shake".split()}
    labels = rng.choice(list(words), rows)
    pd.DataFrame({
        "item": [" ".join(rng.choice(words[y] + ["with", "and", "large", "small"], rng.integers(3, 8))) for y in labels],
        "calories": [rng.normal(300 + 200 * "abc".index(y), 80) for y in labels],
        "fat": rng.gamma(2.0, 5.0, rows),
        "kind": labels,
    }).to_csv(path, index=False)
    return path


def _modalities(prior) -> dict[str, tuple[str, ...]]:
    return {e.name: tuple(e.modalities) for e in prior.experiences}


def test_halves_of_one_dataset_are_nearest_and_text_tables_before_the_rest(tmp_path):
    """The measurement of issue 16 on real data: with the shipped prior's datasets in the pool
    (the multimodal collection, the bundled fastfood table among them), a half of fastfood is
    nearest to its other half and to the whole table, and then to text + table datasets (a planted
    one and the prior's) before any dataset of other modalities."""
    frame = pd.read_csv(EXAMPLE)
    order = np.random.default_rng(0).permutation(len(frame))
    halves = {}
    for name, rows in (("half_a", order[: len(frame) // 2]), ("half_b", order[len(frame) // 2:])):
        frame.iloc[np.sort(rows)].to_csv(tmp_path / f"{name}.csv", index=False)
        halves[name] = describe(load_dataset(tmp_path / f"{name}.csv", "restaurant"))
    other = describe(load_dataset(write_text_table(tmp_path / "menu.csv", 300, 0), "kind"))
    prior = read_prior()
    pool = {"half_b": halves["half_b"], "menu": other, **{e.name: e.meta_features for e in prior.experiences}}
    ranked = [n.study for n in rank_by_meta_features(halves["half_a"], pool, prior.scales)]
    assert ranked[:2] == ["half_b", "fastfood"]
    both = {"tabular", "text"}
    kinds = {"half_b": both, "menu": both, **{n: set(m) for n, m in _modalities(prior).items()}}
    # The eight nearest are all text + table data. Finefood, the one left, is reviews → a binary
    # score with one categorical column: as far from fastfood (1.84) as the nearest tables (1.80).
    assert all(kinds[n] == both for n in ranked[:8]), ranked
    assert sum(kinds[n] == both for n in ranked) == 9


def write_stroke_images(path: Path, per_class: int, seed: int) -> Path:
    """16x16 grey images of one bright line each, its angle the class (4 classes), jittered."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, angle in enumerate((0.0, 45.0, 90.0, 135.0)):
        for _ in range(per_class):
            t = np.linspace(-6, 6, 40)
            a = np.deg2rad(angle + rng.normal(0, 8))
            x, y = 7.5 + t * np.cos(a) + rng.normal(0, 1), 7.5 + t * np.sin(a) + rng.normal(0, 1)
            image = np.zeros((16, 16), dtype=np.uint8)
            inside = (x >= 0) & (x < 16) & (y >= 0) & (y < 16)
            image[y[inside].astype(int), x[inside].astype(int)] = 255
            images.append(image)
            labels.append(label)
    np.savez_compressed(path, image=np.stack(images), label=np.array(labels))
    return path


def test_halves_of_an_image_dataset_are_nearest_and_image_sets_before_the_rest(tmp_path):
    """Two random halves of scikit-learn's handwritten digits (as images) are each other's nearest,
    then the whole set in the shipped prior; every image set (planted line drawings and the
    prior's glyph sets) comes before any dataset of other modalities."""
    from autometa.data.builders.suite import digits

    dataset = load_dataset(digits(tmp_path).path, "label")
    order = np.random.default_rng(0).permutation(len(dataset))
    half_a, half_b = (describe(dataset.subset(np.sort(rows))) for rows in np.array_split(order, 2))
    assert {"landmark_image_pca_ncm", "landmark_image_pca_1nn", "landmark_image_pca_variance"} <= set(half_a)
    lines = describe(load_dataset(write_stroke_images(tmp_path / "lines.npz", 60, 0), "label"))
    prior = read_prior()
    pool = {"half_b": half_b, "lines": lines, **{e.name: e.meta_features for e in prior.experiences}}
    ranked = rank_by_meta_features(half_a, pool, prior.scales)
    assert [n.study for n in ranked[:2]] == ["half_b", "digits"]
    assert ranked[1].distance < NEAR
    kinds = {"half_b": ("image",), "lines": ("image",), **_modalities(prior)}
    images = [i for i, n in enumerate(ranked) if kinds[n.study] == ("image",)]
    assert len(images) >= 4 and images == list(range(len(images))), [n.study for n in ranked]
    # The halves' image landmarkers agree (the same data), the line drawings' do not.
    for name in ("landmark_image_pca_ncm", "landmark_image_pca_variance"):
        assert abs(half_a[name] - half_b[name]) < 0.05 < abs(half_a[name] - lines[name]), name


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


def test_greedy_portfolio_on_a_hand_made_score_matrix():
    scores = np.array([
        [1.0, 0.0, 0.0, 0.5],
        [0.6, 0.6, 0.6, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 1.0],
        [np.nan, 0.9, np.nan, np.nan],  # never run on three tasks: counts 0 there
    ])
    # 1st: row 3 has the best mean (0.5). 2nd: row 1 lifts tasks 0 and 1 to 0.6 (mean 0.8), more
    # than row 0 or 2 alone would (0.75). 3rd: rows 0 and 2 tie at 0.9, the first wins. 4th: row
    # 2 completes every task; row 4 then adds nothing, so the portfolio stops at four.
    assert greedy_portfolio(scores, 10) == [(3, 0.5), (1, 0.8), (0, 0.9), (2, 1.0)]
    assert greedy_portfolio(scores, 2) == [(3, 0.5), (1, 0.8)]
    assert greedy_portfolio(np.zeros((0, 3)), 3) == []


def test_score_matrix_normalises_per_task_and_keeps_shared_configurations():
    config = lambda meta: {"meta_algorithm": meta, "fusion": "concat", "encoder.tabular": "mlp"}  # noqa: E731
    one = experience("one", {}, [(config("a"), 0.9), (config("b"), 0.7), (config("d"), 0.5)])
    two = experience("two", {}, [(config("c"), 0.8), (config("d"), 0.8), (config("e"), 0.6)])
    candidates, scores = score_matrix([one, two], candidates_per_dataset=1)
    # Each task's best, then "d", run on both tasks (as the default trials are on every task).
    assert [(p["meta_algorithm"], origin) for p, origin in candidates] == [("a", "one"), ("c", "two"), ("d", "one")]
    np.testing.assert_allclose(scores, [[1.0, np.nan], [np.nan, 1.0], [0.0, 1.0]])
    # All five candidates (a, b, d from one; c, e from two): a and d tie first (mean 0.5), a comes
    # first; then d and c both complete task two, d comes first.
    [first, second] = build_portfolio([one, two], 5)
    assert (first.params["meta_algorithm"], first.coverage, first.tasks, first.origin) == ("a", 0.5, 2, "one")
    assert (second.params["meta_algorithm"], second.coverage) == ("d", 1.0)


def test_portfolio_seeds_when_nothing_is_near_and_fills_after_the_neighbours(registry):
    choices = search_choices(registry, "standard", ["tabular"])
    config = lambda meta: {"meta_algorithm": meta, "fusion": "concat", "encoder.tabular": "mlp"}  # noqa: E731
    portfolio = [PortfolioEntry(config("finetune"), 0.6, 4, "p1"), PortfolioEntry(config("protonet"), 0.9, 4, "p2")]
    near = experience("near", {"rows": 100.0}, [(config("protonet"), 0.9)])
    far = experience("far", {"rows": 5000.0}, [(config("mann"), 0.99)])
    alone = plan({"rows": 100.0}, [far], registry, choices, k=3, configs=2, portfolio=portfolio)
    assert [(s.source, s.params["meta_algorithm"]) for s in alone.seeds] == [("portfolio", "finetune"),
                                                                             ("portfolio", "protonet")]
    assert alone.neighbours == [] and any("no stored dataset within distance" in n for n in alone.notes)
    assert "from the portfolio" in alone.seeds[0].describe() and "first found on p1" in alone.seeds[0].describe()
    mixed = plan({"rows": 100.0}, [far, near], registry, choices, k=3, configs=3, portfolio=portfolio)
    # near's one configuration, then the portfolio's; protonet is seeded once
    assert [(s.source, s.params["meta_algorithm"]) for s in mixed.seeds] == [("neighbour", "protonet"),
                                                                             ("portfolio", "finetune")]
    assert mixed.seeds[0].describe().startswith("protonet + concat [tabular=mlp] from neighbour near (prior; distance 0.00")


def test_search_is_seeded_with_the_nearest_datasets_best_configuration(tmp_path):
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    first = write_table(tmp_path / "first.csv", 120, seed=0, shift=2.0)
    # Sampled trials, so that its best is none of the default trials.
    search(first, "y", trials=3, db=db, warm_start=False, defaults=False, echo=lambda s: None, **FAST)
    stored = optuna.load_study(study_name=study_name(first, "y", **FAST), storage=db)
    best = stored.best_trial

    lines: list[str] = []
    second = write_table(tmp_path / "second.csv", 100, seed=1, shift=1.8)
    result = search(second, "y", trials=3, db=db, warm_start_prior=None, warm_start_configs=1, echo=lines.append, **FAST)
    trials = result.study.get_trials()
    defaults = default_trials(get_registry(), result.study.user_attrs["choices"])
    # The first default, the seed, the second default.
    assert trials[0].system_attrs["fixed_params"] == defaults[0] and "warm_start" not in trials[0].user_attrs
    assert trials[1].params == best.params
    assert trials[1].user_attrs["warm_start"].startswith("first (database, distance ")
    assert trials[1].user_attrs["warm_start_source"] == "neighbour"
    assert trials[2].system_attrs["fixed_params"] == defaults[1] and "warm_start" not in trials[2].user_attrs
    seeded = [line for line in lines if line.startswith("warm start: trial")]
    assert len(seeded) == 1 and seeded[0].startswith("warm start: trial 1 is ") and "from neighbour first (study" in seeded[0]
    assert "warm start: 1 seed(s) from neighbours, 0 from the portfolio" in lines
    assert f"validation {100 * best.value:.1f}% there" in seeded[0]


def test_opening_alternates_defaults_and_seeds_and_queues_none_twice(registry):
    choices = search_choices(registry, "standard", ["tabular"])
    defaults = default_trials(registry, choices)
    seeds = [Seed(dict(defaults[0]), portfolio=PortfolioEntry(dict(defaults[0]), 0.5, 3, "t1")),  # a default again
             Seed(dict(defaults[-1]), portfolio=PortfolioEntry(dict(defaults[-1]), 0.7, 3, "t2"))]
    assert opening(defaults[:3], seeds) == [defaults[0], seeds[0], defaults[1], seeds[1], defaults[2]]
    assert opening(defaults[:1], seeds) == [defaults[0], seeds[0], seeds[1]]
    assert opening([], seeds) == seeds and opening(defaults[:2], []) == defaults[:2]

    study = optuna.create_study()
    lines: list[str] = []
    assert enqueue_opening(study, defaults[:3], seeds, 4, registry, choices, lines.append) == 4
    queued = study.get_trials()
    assert [t.system_attrs["fixed_params"] for t in queued] == [defaults[0], defaults[1], defaults[-1], defaults[2]]
    assert [t.user_attrs.get("warm_start_source") for t in queued] == [None, None, "portfolio", None]
    assert lines == [
        f"warm start: {seeds[0].describe()} is already queued as a default trial",
        f"warm start: trial 2 is {seeds[1].describe()}",
        "warm start: 0 seed(s) from neighbours, 1 from the portfolio",
    ]
    # The budget caps what is queued: one trial is the first default.
    small = optuna.create_study()
    assert enqueue_opening(small, defaults, seeds, 1, registry, choices, lambda s: None) == 1
    assert [t.system_attrs["fixed_params"] for t in small.get_trials()] == [defaults[0]]


def test_search_labels_portfolio_seeds_in_its_output_and_the_trials(tmp_path, registry):
    """A prior whose only dataset is far away: the seeds come from its portfolio, and both the
    output and each seeded trial's user attributes say so."""
    data = write_table(tmp_path / "data.csv", 100, seed=1, shift=1.8)
    defaults = default_trials(registry, search_choices(registry, "standard", ["tabular"]))
    chosen = [defaults[-1], defaults[-2]]
    far = {"rows": 1e6, "log_rows": 6.0, "classes": 500.0, "image_height": 28.0, "landmark_image_1nn": 0.1}
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({
        "format": "autometa-knowledge-2", "scales": {},
        "portfolio": [{"coverage": 0.7, "tasks": 3, "from": "t1", "params": chosen[0]},
                      {"coverage": 0.9, "tasks": 3, "from": "t2", "params": chosen[1]}],
        "datasets": [{"name": "far", "fingerprint": "f", "protocol": "standard", "modalities": ["image"],
                      "meta_features": far, "configurations": [{"value": 0.5, "params": defaults[1]}]}],
    }))
    lines: list[str] = []
    result = search(data, "y", trials=4, db=f"sqlite:///{tmp_path / 's.db'}", warm_start_prior=str(prior),
                    warm_start_configs=2, echo=lines.append, **FAST)
    trials = result.study.get_trials()[1::2]  # after each default trial, a seed
    assert [t.user_attrs["warm_start_source"] for t in trials] == ["portfolio", "portfolio"]
    assert [t.user_attrs["warm_start"] for t in trials] == ["portfolio (first found on t1)", "portfolio (first found on t2)"]
    assert [t.params["meta_algorithm"] for t in trials] == [c["meta_algorithm"] for c in chosen]
    assert any(line.startswith("warm start: no stored dataset within distance 1.00 (nearest: far at ") for line in lines)
    assert [line.split(" is ")[1].split(" (")[0] for line in lines if line.startswith("warm start: trial")] == [
        f"{configuration_label(c)} from the portfolio" for c in chosen]
    assert "warm start: 0 seed(s) from neighbours, 2 from the portfolio" in lines


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


def test_shipped_prior_spans_the_collection_and_seeds_the_bundled_example(registry):
    assert PRIOR_PATH.is_file(), "autometa/prior/knowledge.json is package data; build it with `autometa kb export`"
    prior = prior_experiences()
    assert len(prior) >= 40 and all(e.configurations and e.meta_features and e.licence for e in prior)
    kinds = {(tuple(e.modalities), e.protocol) for e in prior}
    assert {(("tabular",), "standard"), (("tabular", "text"), "standard"), (("text",), "standard"),
            (("image",), "standard"), (("image",), "fewshot"), (("text",), "fewshot"), (("tabular",), "grouped")} <= kinds
    dataset = load_dataset(EXAMPLE, "restaurant")
    # The bundled example is one of the collection's tasks: a search of it never seeds from it
    # (seed_study leaves out the same fingerprint), so plan without it, as the search does.
    [own] = [e for e in prior if e.fingerprint == dataset.fingerprint]
    assert own.name == "fastfood" and own.modalities == ["tabular", "text"]
    others = [e for e in prior if e.fingerprint != dataset.fingerprint]
    choices = search_choices(registry, "standard", dataset.modalities)
    known = read_prior()
    assert known.scales and len(known.portfolio) >= 3
    warm = plan(describe(dataset), others, registry, choices, k=3, configs=3, scales=known.scales,
                portfolio=known.portfolio, protocol="standard")
    assert len(warm.seeds) == 3
    for seed in warm.seeds:  # translated to this search: every component is one it searches
        assert seed.params["meta_algorithm"] in choices["meta_algorithm"]
        for key, value in seed.params.items():
            if key in choices and key != "meta_algorithm":
                assert value in choices[key], (key, value)
    for experience, _ in warm.neighbours:  # what lies near a text + table dataset is text + table data
        assert experience.modalities == ["tabular", "text"]


