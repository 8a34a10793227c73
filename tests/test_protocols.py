"""Task protocols (autometa.data.protocols): protocol choice, disjoint splits, fixed evaluation tasks, errors."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autometa.data.loading import load_dataset
from autometa.data.protocols import FEWSHOT_MIN_CLASSES, PROTOCOLS, choose_protocol, make_split
from autometa.errors import AutometaError, ProtocolError
from autometa.types import Task

# ---------------------------------------------------------------------------- synthetic datasets


def _write(tmp_path: Path, name: str, frame: pd.DataFrame) -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def class_dataset(tmp_path: Path, n_classes: int, per_class: int, name: str = "classes.csv", seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "w": rng.normal(size=n),
            "y": [f"c{c:02d}" for c in range(n_classes) for _ in range(per_class)],
        }
    )
    return load_dataset(_write(tmp_path, name, frame), "y")


def group_dataset(tmp_path: Path, n_groups: int = 6, n_classes: int = 3, per_cell: int = 8, name: str = "groups.csv"):
    rng = np.random.default_rng(1)
    rows = [
        (rng.normal(), f"g{g}", f"k{c}")
        for g in range(n_groups)
        for c in range(n_classes)
        for _ in range(per_cell)
    ]
    frame = pd.DataFrame(rows, columns=["x", "site", "y"])
    return load_dataset(_write(tmp_path, name, frame), "y", group="site")


@pytest.fixture
def fewshot_data(tmp_path):
    return class_dataset(tmp_path, 30, 12, "fewshot.csv")


@pytest.fixture
def grouped_data(tmp_path):
    return group_dataset(tmp_path)


@pytest.fixture
def standard_data(tmp_path):
    return class_dataset(tmp_path, 4, 30, "standard.csv")


def split_of(dataset, protocol, seed=0, **kw):
    kw.setdefault("validation_tasks", 20)
    kw.setdefault("test_tasks", 20)
    return make_split(dataset, protocol, seed=seed, **kw)


def rows_of(task: Task) -> np.ndarray:
    return np.concatenate([task.support.reshape(-1).numpy(), task.query.reshape(-1).numpy()])


def global_labels(dataset) -> np.ndarray:
    return np.searchsorted(np.asarray(dataset.classes), dataset.labels)


# ---------------------------------------------------------------------------- 1. choose_protocol


def test_choose_protocol_auto(tmp_path, grouped_data):
    assert PROTOCOLS == ("fewshot", "grouped", "standard")
    assert FEWSHOT_MIN_CLASSES == 20
    assert choose_protocol(grouped_data) == "grouped"
    assert choose_protocol(class_dataset(tmp_path, 20, 2, "twenty.csv")) == "fewshot"
    assert choose_protocol(class_dataset(tmp_path, 19, 2, "nineteen.csv")) == "standard"
    assert choose_protocol(class_dataset(tmp_path, 2, 3, "two.csv"), "auto") == "standard"


def test_choose_protocol_group_wins_over_many_classes(tmp_path):
    ds = group_dataset(tmp_path, n_groups=3, n_classes=25, per_cell=1)
    assert len(ds.classes) == 25
    assert choose_protocol(ds) == "grouped"


def test_choose_protocol_explicit(tmp_path, grouped_data):
    many = class_dataset(tmp_path, 25, 2, "many.csv")
    few = class_dataset(tmp_path, 3, 3, "few.csv")
    assert choose_protocol(many, "standard") == "standard"
    assert choose_protocol(few, "fewshot") == "fewshot"
    assert choose_protocol(grouped_data, "standard") == "standard"
    assert choose_protocol(grouped_data, "fewshot") == "fewshot"
    assert choose_protocol(grouped_data, "grouped") == "grouped"


def test_choose_protocol_errors(tmp_path):
    ds = class_dataset(tmp_path, 3, 3)
    with pytest.raises(ProtocolError, match=r"^the grouped protocol needs a group column: pass --group COLUMN$"):
        choose_protocol(ds, "grouped")
    with pytest.raises(ProtocolError, match=r"unknown protocol 'episodic'; use auto, fewshot, grouped, standard"):
        choose_protocol(ds, "episodic")
    with pytest.raises(AutometaError, match=r"needs a group column"):
        make_split(ds, "grouped")


# ---------------------------------------------------------------------------- 2. disjoint splits


def assert_row_splits_disjoint(split, n_rows):
    assert set(split.row_splits) == {"train", "validation", "test"}
    for a, b in itertools.combinations(split.row_splits, 2):
        common = np.intersect1d(split.row_splits[a], split.row_splits[b])
        assert common.size == 0, f"{a} and {b} share rows {common[:5]}"
    for rows in split.row_splits.values():
        assert len(rows) > 0
        assert len(np.unique(rows)) == len(rows)
        assert rows.min() >= 0 and rows.max() < n_rows


def assert_pool_uses_train_rows_only(split):
    train = set(split.row_splits["train"].tolist())
    held_out = set(split.row_splits["validation"].tolist()) | set(split.row_splits["test"].tolist())
    pool = split.pool
    assert set(pool.rows.tolist()) == train
    source_rows = set(np.concatenate([r for s in pool.sources for r in s.values()]).tolist())
    assert source_rows == train
    rng = np.random.default_rng(7)
    for _ in range(5):
        episode = pool.episodes(4, 2, 2, 2, rng)
        assert not set(rows_of(episode).tolist()) & held_out
        assert set(rows_of(episode).tolist()) <= train
    drawn: set[int] = set()
    for _ in range(20):
        inputs, y = pool.rows_batch(16, rng)
        assert y.min() >= 0 and y.max() < pool.n_classes
        # The batch's inputs are training rows: match them back by the (unique) tabular features.
        table = split.pool.features.inputs["tabular"]
        idx = [int(torch.nonzero((table == r).all(dim=1))[0, 0]) for r in inputs["tabular"]]
        drawn.update(idx)
    assert drawn <= train
    assert not drawn & held_out


def test_fewshot_split_is_disjoint(fewshot_data):
    split = split_of(fewshot_data, "fewshot", ways=5, shots=5, queries=15)
    assert split.protocol == "fewshot"
    assert_row_splits_disjoint(split, len(fewshot_data))
    # All 30 classes qualify: 6 validation, 6 test and 18 training classes, all rows used.
    assert {k: len(v) for k, v in split.class_splits.items()} == {"train": 18, "validation": 6, "test": 6}
    assert {k: len(v) for k, v in split.row_splits.items()} == {"train": 216, "validation": 72, "test": 72}
    class_sets = {k: set(v) for k, v in split.class_splits.items()}
    for a, b in itertools.combinations(class_sets, 2):
        assert not class_sets[a] & class_sets[b]
    assert set().union(*class_sets.values()) == set(fewshot_data.classes)
    for name, rows in split.row_splits.items():
        assert set(fewshot_data.labels[rows].tolist()) == class_sets[name]
    # Every evaluation task draws only from its own split's classes (and rows).
    for name, tasks in (("validation", split.validation), ("test", split.test)):
        assert len(tasks) == 20
        for task in tasks:
            rows = rows_of(task)
            assert set(fewshot_data.labels[rows].tolist()) <= class_sets[name]
            assert set(rows.tolist()) <= set(split.row_splits[name].tolist())
    assert_pool_uses_train_rows_only(split)
    assert set(fewshot_data.labels[split.pool.rows].tolist()) == class_sets["train"]
    assert split.pool.n_classes == 18
    assert re.match(
        r"protocol fewshot: train 216 rows, validation 72 rows, test 72 rows \| classes train 18, validation 6, "
        r"test 6 \| 5-way 5-shot, 7 queries per class; 20 validation and 20 test tasks",
        split.describe(),
    )


def test_fewshot_evaluation_task_layout(fewshot_data):
    split = split_of(fewshot_data, "fewshot", ways=5, shots=3, queries=4)
    labels = global_labels(fewshot_data)
    assert (split.ways, split.shots, split.queries) == (5, 3, 4)
    for task in split.validation + split.test:
        assert task.n_way == 5
        assert not task.same_classes_as_training
        assert task.support.shape == (15,) and task.query.shape == (20,)
        assert task.support_y.tolist() == [c for c in range(5) for _ in range(3)]
        assert task.query_y.tolist() == [c for c in range(5) for _ in range(4)]
        assert not set(task.support.tolist()) & set(task.query.tolist())
        # Local label k is one global class, the same in support and query.
        for k in range(5):
            support_cls = set(labels[task.support[task.support_y == k].numpy()].tolist())
            query_cls = set(labels[task.query[task.query_y == k].numpy()].tolist())
            assert len(support_cls) == 1 and support_cls == query_cls


def test_fewshot_queries_capped_by_smallest_class(fewshot_data):
    # 12 rows per class, 5 shots: at most 7 queries per class.
    split = split_of(fewshot_data, "fewshot", ways=5, shots=5, queries=15)
    assert split.queries == 7
    assert all(t.query.shape == (35,) for t in split.validation)
    assert "validation tasks have 7 queries per class instead of 15" in split.describe()


def test_one_small_class_caps_its_split_and_says_so(tmp_path):
    frame = pd.DataFrame({"x": np.arange(30 * 20 - 12, dtype=float),
                          "y": [f"c{c:02d}" for c in range(29) for _ in range(20)] + ["small"] * 8})
    dataset = load_dataset(_write(tmp_path, "small.csv", frame), "y")
    assert split_of(dataset, "fewshot", ways=5, shots=5, queries=15).notes == []  # seed 0: 'small' trains
    split = split_of(dataset, "fewshot", seed=1, ways=5, shots=5, queries=15)
    assert "small" in split.class_splits["test"]
    note = "test tasks have 3 queries per class instead of 15: test class 'small' has only 8 rows (5 of them support)"
    assert split.notes == [note] and split.describe().endswith("\n  note: " + note)
    assert all(t.query.shape == (15,) for t in split.test) and all(t.query.shape == (75,) for t in split.validation)


def test_grouped_split_is_disjoint(grouped_data):
    split = split_of(grouped_data, "grouped", shots=5)
    assert split.protocol == "grouped"
    assert_row_splits_disjoint(split, len(grouped_data))
    groups = grouped_data.groups
    assert {k: len(v) for k, v in split.group_splits.items()} == {"validation": 1, "test": 1, "train": 4}
    group_sets = {k: set(v) for k, v in split.group_splits.items()}
    for a, b in itertools.combinations(group_sets, 2):
        assert not group_sets[a] & group_sets[b]
    assert set().union(*group_sets.values()) == set(groups.tolist())
    for name, rows in split.row_splits.items():
        assert set(groups[rows].tolist()) == group_sets[name]
    for name, tasks in (("validation", split.validation), ("test", split.test)):
        assert len(tasks) == len(group_sets[name]) == 1
        for task in tasks:
            rows = rows_of(task)
            task_groups = set(groups[rows].tolist())
            assert len(task_groups) == 1 and task_groups <= group_sets[name]
            # The whole group is used: 5 support rows per class, the rest are queries.
            assert len(rows) == len(np.unique(rows)) == 24
            assert task.n_way == 3
            assert task.support.shape == (15,) and task.query.shape == (9,)
            assert task.support_y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
            assert task.query_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert len(split.pool.sources) == 4  # one training source per training group
    for source in split.pool.sources:
        source_rows = np.concatenate(list(source.values()))
        assert len(set(groups[source_rows].tolist())) == 1
    assert_pool_uses_train_rows_only(split)


def test_grouped_episodes_come_from_one_group(grouped_data):
    split = split_of(grouped_data, "grouped")
    episodes = split.pool.episodes(10, 3, 2, 2, np.random.default_rng(0))
    for i in range(10):
        rows = np.concatenate([episodes.support[i].numpy(), episodes.query[i].numpy()])
        assert len(set(grouped_data.groups[rows].tolist())) == 1


def test_standard_split_is_disjoint(standard_data):
    split = split_of(standard_data, "standard")
    assert split.protocol == "standard"
    assert_row_splits_disjoint(split, len(standard_data))
    assert {k: len(v) for k, v in split.row_splits.items()} == {"train": 72, "validation": 24, "test": 24}
    assert sorted(np.concatenate(list(split.row_splits.values())).tolist()) == list(range(120))
    labels = global_labels(standard_data)
    for rows in split.row_splits.values():  # stratified
        assert np.bincount(labels[rows]).tolist() == [len(rows) // 4] * 4
    assert len(split.validation) == 1 and len(split.test) == 1
    for name, task in (("validation", split.validation[0]), ("test", split.test[0])):
        assert task.support.tolist() == split.row_splits["train"].tolist()
        assert task.query.tolist() == split.row_splits[name].tolist()
        assert task.support_y.tolist() == labels[split.row_splits["train"]].tolist()
        assert task.query_y.tolist() == labels[split.row_splits[name]].tolist()
        assert task.n_way == 4 and task.same_classes_as_training
    assert split.ways == 4 and split.classes == ["c00", "c01", "c02", "c03"]
    assert_pool_uses_train_rows_only(split)


def test_features_fitted_on_training_rows(standard_data):
    split = split_of(standard_data, "standard")
    table = split.pool.features.inputs["tabular"].numpy()
    train = split.row_splits["train"]
    np.testing.assert_allclose(table[train].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(table[train].std(axis=0), 1.0, rtol=1e-4)
    x = standard_data.frame["x"].to_numpy()
    np.testing.assert_allclose(table[:, 0], (x - x[train].mean()) / x[train].std(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- 3. determinism and episodes


def _same_tasks(a: list[Task], b: list[Task]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.support, y.support)
        and torch.equal(x.query, y.query)
        and torch.equal(x.support_y, y.support_y)
        and torch.equal(x.query_y, y.query_y)
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_evaluation_tasks_fixed_by_seed(protocol, fewshot_data, grouped_data, standard_data):
    dataset = {"fewshot": fewshot_data, "grouped": grouped_data, "standard": standard_data}[protocol]
    first = split_of(dataset, protocol, seed=3)
    second = split_of(dataset, protocol, seed=3)
    other = split_of(dataset, protocol, seed=4)
    assert _same_tasks(first.validation, second.validation)
    assert _same_tasks(first.test, second.test)
    for k in first.row_splits:
        np.testing.assert_array_equal(first.row_splits[k], second.row_splits[k])
    assert not _same_tasks(first.validation, other.validation)
    assert torch.equal(first.pool.features.inputs["tabular"], second.pool.features.inputs["tabular"])


def test_validation_and_test_tasks_differ(fewshot_data):
    split = split_of(fewshot_data, "fewshot")
    val = {tuple(t.support.tolist()) for t in split.validation}
    assert len(val) > 1  # tasks are not all the same episode
    test = {tuple(t.support.tolist()) for t in split.test}
    assert not val & test


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_training_episode_shape(protocol, fewshot_data, grouped_data, standard_data):
    dataset = {"fewshot": fewshot_data, "grouped": grouped_data, "standard": standard_data}[protocol]
    split = split_of(dataset, protocol)
    tasks, ways, shots, queries = 6, 3, 2, 4
    episode = split.pool.episodes(tasks, ways, shots, queries, np.random.default_rng(0))
    assert episode.n_way == ways
    assert len(episode) == tasks
    assert episode.support.shape == (tasks, ways * shots)
    assert episode.support_y.shape == (tasks, ways * shots)
    assert episode.query.shape == (tasks, ways * queries)
    assert episode.query_y.shape == (tasks, ways * queries)
    assert episode.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert episode.query_y[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert set(episode.support_y.unique().tolist()) == set(range(ways))
    assert set(episode.query_y.unique().tolist()) == set(range(ways))
    labels = global_labels(dataset)
    for i in range(tasks):
        support, query = episode.support[i].numpy(), episode.query[i].numpy()
        assert not set(support.tolist()) & set(query.tolist())
        assert len(np.unique(support)) == len(support)
        assert len(np.unique(query)) == len(query)
        for k in range(ways):
            s_cls = set(labels[support[episode.support_y[i].numpy() == k]].tolist())
            q_cls = set(labels[query[episode.query_y[i].numpy() == k]].tolist())
            assert len(s_cls) == 1 and s_cls == q_cls
    inputs = episode.support_inputs()
    assert inputs["tabular"].shape[:2] == (tasks, ways * shots)
    # Same generator state, same episodes.
    again = split.pool.episodes(tasks, ways, shots, queries, np.random.default_rng(0))
    assert torch.equal(again.support, episode.support) and torch.equal(again.query, episode.query)


def test_episode_shape_shrinks_to_what_sources_supply(standard_data, tmp_path):
    pool = split_of(standard_data, "standard").pool  # 4 training classes of 18 rows
    assert pool.episode_shape(10, 5, 15) == (4, 5, 13)
    episode = pool.episodes(2, 10, 5, 15, np.random.default_rng(0))
    assert episode.n_way == 4
    assert episode.support.shape == (2, 20) and episode.query.shape == (2, 52)
    # Already on the standard protocol: the fix is fewer shots or a learner that trains on rows.
    with pytest.raises(ProtocolError) as raised:
        pool.episode_shape(4, 18, 1)
    assert str(raised.value) == (
        "episodic learners need 2 training classes with 19+ rows for 18-shot episodes, and the second largest has 18; "
        "lower --shots to 17 or less, or search only learners that train on rows (--meta-algorithm finetune)")
    grouped = split_of(group_dataset(tmp_path), "grouped", shots=5).pool
    with pytest.raises(ProtocolError, match=r"no training source has 2 classes with 9\+ examples for 8-shot episodes; "
                                            r"lower --shots or use --protocol standard$"):
        grouped.episode_shape(2, 8, 1)


def test_rows_batch_labels_are_local(fewshot_data):
    split = split_of(fewshot_data, "fewshot")
    inputs, y = split.pool.rows_batch(500, np.random.default_rng(0))
    assert inputs["tabular"].shape[0] == len(y) == 216  # capped at the training rows
    assert sorted(y.unique().tolist()) == list(range(18))


# ---------------------------------------------------------------------------- 4. errors


def test_fewshot_too_few_classes(tmp_path):
    ds = class_dataset(tmp_path, 10, 6)
    path = re.escape(str(ds.path))
    with pytest.raises(
        ProtocolError,
        match=rf"^{path}: the fewshot protocol with 5-way 5-shot episodes needs at least 15 classes with 6\+ examples "
        r"\(train, validation and test classes are disjoint\); 10 qualify\. Lower --ways/--shots or use --protocol standard$",
    ):
        make_split(ds, "fewshot", ways=5, shots=5)
    # Lower ways make it fit: 3 * 3 <= 10.
    split = make_split(ds, "fewshot", ways=3, shots=5, validation_tasks=2, test_tasks=2)
    assert {k: len(v) for k, v in split.class_splits.items()} == {"train": 4, "validation": 3, "test": 3}


def test_fewshot_counts_only_classes_with_enough_examples(tmp_path):
    # 25 classes (auto picks fewshot), but only 12 have 6+ rows.
    frame = pd.DataFrame(
        {
            "x": np.arange(12 * 6 + 13 * 3, dtype=float),
            "y": [f"big{c}" for c in range(12) for _ in range(6)] + [f"small{c}" for c in range(13) for _ in range(3)],
        }
    )
    ds = load_dataset(_write(tmp_path, "skew.csv", frame), "y")
    with pytest.raises(ProtocolError, match=r"needs at least 15 classes with 6\+ examples .*; 12 qualify\. Lower --ways/--shots"):
        make_split(ds)
    split = make_split(ds, ways=4, shots=5, validation_tasks=2, test_tasks=2)
    used = np.concatenate(list(split.row_splits.values()))
    assert len(used) == 72  # the small classes are left out of every split
    assert split.notes[0] == "13 of 25 classes (39 rows) have fewer than 6 rows and are left out of 5-shot episodes"
    assert all(label.startswith("big") for label in ds.labels[used])


def test_standard_class_with_two_rows(tmp_path):
    frame = pd.DataFrame({"x": np.arange(22, dtype=float), "y": ["a"] * 10 + ["b"] * 10 + ["rare"] * 2})
    ds = load_dataset(_write(tmp_path, "rare.csv", frame), "y")
    with pytest.raises(
        ProtocolError,
        match=rf"^{re.escape(str(ds.path))}: the standard protocol needs at least 3 rows per class \(train, validation, "
        r"test\); class\(es\) 'rare' of 'y' have fewer\. Drop or merge them$",
    ):
        make_split(ds, "standard")


def test_grouped_with_two_groups(tmp_path):
    ds = group_dataset(tmp_path, n_groups=2)
    with pytest.raises(
        ProtocolError,
        match=rf"^{re.escape(str(ds.path))}: the grouped protocol needs at least 3 groups in 'site' "
        r"\(train, validation, test\); found 2\. Use --protocol standard instead$",
    ):
        make_split(ds)


def test_grouped_held_out_group_too_small(tmp_path):
    ds = group_dataset(tmp_path, n_groups=3, per_cell=4)
    with pytest.raises(ProtocolError, match=r"no validation group has 2 classes with 6\+ rows; lower --shots"):
        make_split(ds, "grouped", shots=5)
    split = make_split(ds, "grouped", shots=2)
    assert len(split.validation) == len(split.test) == 1
    assert split.notes == []


def test_grouped_says_which_classes_and_groups_go_unscored(tmp_path):
    """In held-out groups a class needs shots + 1 rows to be scored; a group needs two such classes."""
    rows = [(0.0, f"g{g}", f"k{c}") for g in range(10) for c in range(3) for _ in range(8)]
    rows = [r for r in rows if not (r[1] in ("g0", "g1", "g2", "g3", "g4", "g5") and r[2] == "k2")]
    rows += [(0.0, f"g{g}", "k2") for g in range(6) for _ in range(2)]  # k2: 2 rows in six groups
    rows = [r for r in rows if not (r[1] == "g0" and r[2] == "k1")] + [(0.0, "g0", "k1")] * 2
    ds = load_dataset(_write(tmp_path, "sites.csv", pd.DataFrame(rows, columns=["x", "site", "y"])), "y", group="site")
    split = make_split(ds, "grouped", shots=5)
    small = {name: [g for g in groups if int(g[1]) < 6] for name, groups in split.group_splits.items()}
    expected = []
    for name in ("validation", "test"):
        lost = [g for g in small[name] if g != "g0"]  # g0 keeps one class of 6+ rows: not scored at all
        if lost:
            expected.append(f"{name} groups: {len(lost)} class(es) with fewer than 6 rows in their group "
                            f"({2 * len(lost)} rows) are not scored")
        if "g0" in small[name]:
            expected.append(f"1 {name} group(s) without 2 classes of 6+ rows are not scored: 'g0'")
    assert expected and split.notes == expected
    for task in split.validation + split.test:
        assert task.n_way in (2, 3)


def test_standard_accepts_four_rows_per_class(tmp_path):
    frame = pd.DataFrame({"x": np.arange(104, dtype=float), "y": ["a"] * 100 + ["b"] * 4})
    split = make_split(load_dataset(_write(tmp_path, "four.csv", frame), "y"), "standard")
    labels = split.classes
    assert labels == ["a", "b"]
    for rows in split.row_splits.values():
        assert "b" in set(frame["y"].to_numpy()[rows].tolist())  # every split sees the small class


def test_standard_class_with_three_rows(tmp_path):
    frame = pd.DataFrame({"x": np.arange(53, dtype=float), "y": ["a"] * 50 + ["b"] * 3})
    ds = load_dataset(_write(tmp_path, "three.csv", frame), "y")
    split = make_split(ds, "standard")
    for rows in split.row_splits.values():
        assert set(frame["y"].to_numpy()[rows].tolist()) == {"a", "b"}
