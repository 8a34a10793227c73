"""Task protocols: how a dataset becomes training, validation and test tasks.

- ``fewshot``: classes are split into disjoint train/validation/test classes; N-way K-shot
  episodes with Q queries per class.
- ``grouped``: the group column defines tasks; groups are split into train/validation/test
  groups; a held-out group is adapted on K labelled rows per class and scored on the rest.
- ``standard``: one task; rows are split (stratified) into train/validation/test.

Validation and test tasks are drawn once from the split seed, so every trial is scored on the
same validation tasks and test tasks are only used for the final report.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autometa.data.loading import Dataset
from autometa.data.preprocessing import Preprocessor
from autometa.data.shared import load_features, save_features
from autometa.errors import ProtocolError
from autometa.types import Features, Task, TaskSize, TrainingPool

PROTOCOLS = ("fewshot", "grouped", "standard")
FEWSHOT_MIN_CLASSES = 20
# What a trial is scored on at its checkpoints during training (all validation tasks at the end).
CHECKPOINT_TASKS = 20
CHECKPOINT_QUERIES = 256  # query rows per task


def _by_class(rows: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): rows[labels[rows] == c] for c in np.unique(labels[rows])}


@dataclass
class Split:
    """A protocol applied to a dataset: the training pool and the fixed evaluation tasks."""

    protocol: str
    pool: TrainingPool
    validation: list[Task]
    test: list[Task]
    row_splits: dict[str, np.ndarray]  # rows in each split (disjoint)
    class_splits: dict[str, list[str]] | None = None
    group_splits: dict[str, list[str]] | None = None
    ways: int = 0
    shots: int = 0
    queries: int = 0
    classes: list[str] = field(default_factory=list)
    preprocessor: Preprocessor | None = None
    dataset: Dataset | None = None  # kept for inputs encoders derive on first use
    notes: list[str] = field(default_factory=list)  # what the split left out or cut down, and why
    shared: Path | None = None  # the search's folder of inputs shared by its workers (autometa.data.shared)

    @cached_property
    def checkpoint_tasks(self) -> list[Task]:
        """A fixed subsample of the validation tasks that trials are scored on at their
        checkpoints during training: the first ``CHECKPOINT_TASKS`` tasks (they are drawn at
        random already), each with at most ``CHECKPOINT_QUERIES`` evenly spaced query rows.
        The same for every trial, so the pruner compares like with like."""
        tasks = []
        for task in self.validation[:CHECKPOINT_TASKS]:
            n = task.query.shape[-1]
            if n <= CHECKPOINT_QUERIES:
                tasks.append(task)
                continue
            keep = torch.linspace(0, n - 1, CHECKPOINT_QUERIES, device=task.query.device).round().long()
            tasks.append(dataclasses.replace(task, query=task.query[..., keep], query_y=task.query_y[..., keep]))
        return tasks

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)} rows" for k, v in self.row_splits.items())
        extra = ""
        if self.class_splits:
            extra = " | classes " + ", ".join(f"{k} {len(v)}" for k, v in self.class_splits.items())
            extra += f" | {self.ways}-way {self.shots}-shot, {self.queries} queries per class"
        if self.group_splits:
            extra = " | groups " + ", ".join(f"{k} {len(v)}" for k, v in self.group_splits.items())
            extra += f" | {self.shots} support rows per class in held-out groups"
        return (
            f"protocol {self.protocol}: {sizes}{extra}; {len(self.validation)} validation and "
            f"{len(self.test)} test tasks" + "".join(f"\n  note: {note}" for note in self.notes)
        )


def _features(dataset: Dataset, rows: np.ndarray, derived, device, shared: Path | None) -> tuple[Preprocessor, Features]:
    """The preprocessor fitted on ``rows`` and every row's inputs: from the ``shared`` folder when
    the search process left them there, else made (and left there for the workers)."""
    if shared is not None and not derived and (found := load_features(shared)) is not None:
        features, extra = found
        return Preprocessor.from_json(extra["preprocessor"]), features.to(device)
    preprocessor = Preprocessor.fit(dataset, rows)
    features = preprocessor.transform(dataset, derived, fit_rows=rows)
    if shared is not None:
        save_features(features, shared, {"preprocessor": preprocessor.to_json()})
    return preprocessor, features.to(device)


def choose_protocol(dataset: Dataset, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in PROTOCOLS:
            raise ProtocolError(f"unknown protocol {requested!r}; use auto, {', '.join(PROTOCOLS)}")
        if requested == "grouped" and dataset.groups is None:
            raise ProtocolError("the grouped protocol needs a group column: pass --group COLUMN")
        return requested
    if dataset.groups is not None:
        return "grouped"
    return "fewshot" if len(dataset.classes) >= FEWSHOT_MIN_CLASSES else "standard"


def task_size(dataset: Dataset, protocol: str, *, ways: int, shots: int) -> TaskSize:
    """How large ``protocol``'s tasks on ``dataset`` are, before any split is made (the search's
    choices depend on it, and a study's choices on nothing but its data and settings)."""
    classes = len(dataset.classes)
    task_ways = {"standard": classes, "fewshot": ways}.get(protocol)
    if task_ways is None:  # grouped: a held-out group's task has the classes of that group
        labels = pd.Series(dataset.labels)
        task_ways = int(labels.groupby(np.asarray(dataset.groups)).nunique().max())
    return TaskSize(protocol, classes if protocol == "standard" else ways, task_ways, shots, classes, len(dataset))


def make_split(
    dataset: Dataset,
    protocol: str = "auto",
    *,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    validation_tasks: int = 100,
    test_tasks: int = 600,
    seed: int = 0,
    device: torch.device | str = "cpu",
    derived: dict[str, list] | None = None,
    shared: str | Path | None = None,
) -> Split:
    """Split ``dataset`` under ``protocol`` and draw its fixed validation and test tasks.

    ``derived``: per modality, encoder classes that prepare their own inputs (see Encoder.prepare).
    ``shared``: a folder for inputs shared between the processes of one search: the first split
    made with it writes its preprocessed inputs there, later ones (the workers') map them
    read-only instead of preprocessing again; encoders' derived inputs are shared the same way.
    """
    protocol = choose_protocol(dataset, protocol)
    device = torch.device(device)
    shared = None if shared is None else Path(shared)
    split = _make_split(dataset, protocol, ways, shots, queries, validation_tasks, test_tasks, seed, device, derived, shared)
    split.dataset, split.shared = dataset, shared
    return split


def _make_split(dataset, protocol, ways, shots, queries, validation_tasks, test_tasks, seed, device, derived, shared) -> Split:
    classes = dataset.classes
    labels = np.searchsorted(np.asarray(classes), dataset.labels)
    rng = np.random.default_rng(seed)
    if protocol == "standard":
        return _standard(dataset, labels, classes, seed, device, shots, queries, derived, shared)
    if protocol == "fewshot":
        return _fewshot(dataset, labels, classes, rng, device, ways, shots, queries, validation_tasks, test_tasks, derived,
                        shared)
    return _grouped(dataset, labels, classes, rng, device, ways, shots, queries, derived, shared)


def _standard(dataset, labels, classes, seed, device, shots, queries, derived, shared) -> Split:
    counts = Counter(dataset.labels.tolist())
    rare = sorted(c for c, n in counts.items() if n < 3)
    if rare:
        raise ProtocolError(
            f"{dataset.path}: the standard protocol needs at least 3 rows per class (train, validation, "
            f"test); class(es) {', '.join(map(repr, rare[:5]))} of {dataset.label_column!r} have fewer. "
            "Drop or merge them"
        )
    train, val, test = _stratified_rows(labels, np.random.default_rng(seed))
    preprocessor, features = _features(dataset, train, derived, device, shared)
    y = torch.as_tensor(labels, device=device)
    pool = TrainingPool(features, y, train, [_by_class(train, labels)], device, "standard")
    n = len(classes)

    def task(query_rows: np.ndarray) -> Task:
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        return Task(features, t(train), y[t(train)], t(query_rows), y[t(query_rows)], n, same_classes_as_training=True)

    return Split(
        "standard", pool, [task(val)], [task(test)],
        {"train": train, "validation": val, "test": test},
        # Episodic learners train on episodes over all classes of the single task.
        ways=n, shots=shots, queries=queries, classes=classes, preprocessor=preprocessor,
    )


def _stratified_rows(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60/20/20 rows per class, at least one of each class in every split (needs 3+ rows)."""
    parts: tuple[list, list, list] = ([], [], [])
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_held = max(1, round(0.2 * len(rows)))
        parts[1].append(rows[:n_held])
        parts[2].append(rows[n_held: 2 * n_held])
        parts[0].append(rows[2 * n_held:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _fewshot(dataset, labels, classes, rng, device, ways, shots, queries, n_val, n_test, derived, shared) -> Split:
    counts = np.bincount(labels, minlength=len(classes))
    usable = np.flatnonzero(counts >= shots + 1)
    notes = []
    if len(usable) < len(classes):
        notes.append(
            f"{len(classes) - len(usable)} of {len(classes)} classes ({int(counts.sum() - counts[usable].sum())} rows) "
            f"have fewer than {shots + 1} rows and are left out of {shots}-shot episodes"
        )
    if len(usable) < 3 * ways:
        raise ProtocolError(
            f"{dataset.path}: the fewshot protocol with {ways}-way {shots}-shot episodes needs at least "
            f"{3 * ways} classes with {shots + 1}+ examples (train, validation and test classes are "
            f"disjoint); {len(usable)} qualify. Lower --ways/--shots or use --protocol standard"
        )
    order = rng.permutation(usable)
    n_val_classes = max(ways, round(0.2 * len(order)))
    val_classes, test_classes = order[:n_val_classes], order[n_val_classes: 2 * n_val_classes]
    train_classes = order[2 * n_val_classes:]
    rows = np.arange(len(dataset))
    split_rows = {
        name: rows[np.isin(labels, cls)]
        for name, cls in (("train", train_classes), ("validation", val_classes), ("test", test_classes))
    }
    preprocessor, features = _features(dataset, split_rows["train"], derived, device, shared)
    y = torch.as_tensor(labels, device=device)
    pool = TrainingPool(features, y, split_rows["train"], [_by_class(split_rows["train"], labels)], device, "fewshot")

    def draw(name: str, count: int, offset: int) -> list[Task]:
        by_class = _by_class(split_rows[name], labels)
        smallest = min(by_class, key=lambda c: (len(by_class[c]), c))
        q = min(queries, len(by_class[smallest]) - shots)
        if q < queries:
            # Every task of a split has one shape, so its smallest class caps them all.
            notes.append(
                f"{name} tasks have {q} queries per class instead of {queries}: {name} class "
                f"{classes[smallest]!r} has only {len(by_class[smallest])} rows ({shots} of them support)"
            )
        sampler = TrainingPool(features, y, split_rows[name], [by_class], device, "fewshot")
        batch = sampler.episodes(count, ways, shots, q, np.random.default_rng([rng.integers(2**31), offset]))
        return [
            Task(features, batch.support[i], batch.support_y[i], batch.query[i], batch.query_y[i], batch.n_way)
            for i in range(count)
        ]

    validation, test = draw("validation", n_val, 1), draw("test", n_test, 2)
    return Split(
        "fewshot", pool, validation, test, split_rows,
        class_splits={
            name: [classes[i] for i in sorted(cls)]
            for name, cls in (("train", train_classes), ("validation", val_classes), ("test", test_classes))
        },
        ways=ways, shots=shots, queries=int(validation[0].query.numel() // ways), classes=classes,
        preprocessor=preprocessor, notes=notes,
    )


def _grouped(dataset, labels, classes, rng, device, ways, shots, queries, derived, shared) -> Split:
    groups = dataset.groups
    names = sorted(set(groups.tolist()))
    if len(names) < 3:
        raise ProtocolError(
            f"{dataset.path}: the grouped protocol needs at least 3 groups in {dataset.group_column!r} "
            f"(train, validation, test); found {len(names)}. Use --protocol standard instead"
        )
    order = [names[i] for i in rng.permutation(len(names))]
    n_held = max(1, round(0.2 * len(order)))
    split_groups = {"validation": order[:n_held], "test": order[n_held: 2 * n_held], "train": order[2 * n_held:]}
    rows = np.arange(len(dataset))
    split_rows = {k: rows[np.isin(groups, v)] for k, v in split_groups.items()}
    preprocessor, features = _features(dataset, split_rows["train"], derived, device, shared)
    y = torch.as_tensor(labels, device=device)
    sources = [_by_class(rows[groups == g], labels) for g in split_groups["train"]]
    pool = TrainingPool(features, y, split_rows["train"], sources, device, "grouped")
    notes = []

    def held_out(name: str) -> list[Task]:
        tasks, unscored_groups, small = [], [], Counter()
        for g in split_groups[name]:
            every = _by_class(rows[groups == g], labels)
            by_class = {c: r for c, r in every.items() if len(r) >= shots + 1}
            if len(by_class) < 2:
                unscored_groups.append(g)
                continue
            small.update(classes=len(every) - len(by_class), rows=sum(len(r) for c, r in every.items() if c not in by_class))
            support, query, sy, qy = [], [], [], []
            for local, (c, r) in enumerate(sorted(by_class.items())):
                r = rng.permutation(r)
                support.append(r[:shots]), query.append(r[shots:])
                sy += [local] * shots
                qy += [local] * (len(r) - shots)
            t = lambda a: torch.as_tensor(np.asarray(a), device=device)  # noqa: E731
            tasks.append(Task(features, t(np.concatenate(support)), t(sy), t(np.concatenate(query)), t(qy), len(by_class)))
        if not tasks:
            raise ProtocolError(
                f"{dataset.path}: no {name} group has 2 classes with {shots + 1}+ rows; lower --shots"
            )
        if small["classes"]:
            notes.append(
                f"{name} groups: {small['classes']} class(es) with fewer than {shots + 1} rows in their group "
                f"({small['rows']} rows) are not scored"
            )
        if unscored_groups:
            notes.append(
                f"{len(unscored_groups)} {name} group(s) without 2 classes of {shots + 1}+ rows are not scored: "
                + ", ".join(map(repr, unscored_groups[:5])) + (", …" if len(unscored_groups) > 5 else "")
            )
        return tasks

    validation, test = held_out("validation"), held_out("test")
    return Split(
        "grouped", pool, validation, test, split_rows, group_splits=split_groups,
        ways=ways, shots=shots, queries=queries, classes=classes, preprocessor=preprocessor, notes=notes,
    )
