"""Scoring on tasks: accuracy with a 95% confidence interval, and the baselines beside it.

One task (the standard protocol, or a single held-out task) is scored over its query rows with
the Wilson score interval, which stays inside [0, 1] and does not collapse to a width of zero
at 0% or 100%. Several tasks are scored by the mean of their accuracies with Student's t
interval over tasks (few-shot episodes) or groups (grouped protocol): a handful of units gets
the wider interval it deserves, not the normal approximation's.

The baselines are what a user could compute without autometa: the majority class of the
labelled rows available at prediction time (chance, 1/N, for balanced few-shot episodes) and
a plain linear model on the same preprocessed inputs (few-shot: a nearest class mean, text
weighted as TF-IDF over the training rows, as a plain text pipeline weighs it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from autometa.components import MetaAlgorithm
from autometa.data.protocols import Split
from autometa.errors import PluginError
from autometa.types import Task

CONFIDENCE = 0.95
ROWS, TASKS, GROUPS = "rows", "tasks", "groups"
# How the interval over each unit is computed, as outputs name it.
INTERVALS = {ROWS: "Wilson score interval", TASKS: "Student's t over the tasks' accuracies",
             GROUPS: "Student's t over the groups' accuracies"}


@dataclass(frozen=True)
class Score:
    """Mean accuracy over ``n`` units (``unit``: rows, tasks or groups) and its 95% confidence
    interval [``low``, ``high``] (NaN when undefined: one task's mean alone; equal to the mean
    when the accuracy is exact, as chance is)."""

    mean: float
    low: float
    high: float
    n: int
    unit: str

    def __str__(self) -> str:
        return format_score(self.mean, self.low, self.high)

    def as_dict(self, prefix: str = "test_") -> dict[str, Any]:
        """``{prefix}accuracy``, ``{prefix}ci95_low``/``_high`` (None when undefined), ``{prefix}units`` (how
        many) and ``{prefix}unit`` (rows, tasks or groups): the names every output uses."""
        bound = lambda v: None if math.isnan(v) else v  # noqa: E731 - JSON has no NaN
        return {f"{prefix}accuracy": self.mean, f"{prefix}ci95_low": bound(self.low),
                f"{prefix}ci95_high": bound(self.high), f"{prefix}units": self.n, f"{prefix}unit": self.unit}


def format_score(mean: float | None, low: float | None, high: float | None) -> str:
    """``83.3% [74.9, 89.3]``: an accuracy and its 95% interval, in percent. Without brackets
    when the interval is undefined or has no width (chance is exact); "-" without a mean."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if low is None or high is None or math.isnan(low) or math.isnan(high) or low == high:
        return f"{100 * mean:.1f}%"
    return f"{100 * mean:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def wilson(hits: int, n: int) -> Score:
    """The accuracy of ``hits`` right out of ``n`` rows with its Wilson score interval."""
    interval = stats.binomtest(hits, n).proportion_ci(CONFIDENCE, method="wilson")
    return Score(hits / n, float(interval.low), float(interval.high), n, ROWS)


def t_half_width(values) -> float:
    """Half the width of Student's t interval (``CONFIDENCE``) around the mean of ``values``,
    unclipped (differences may be negative); NaN for fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))


def student_t(accuracies: np.ndarray, unit: str) -> Score:
    """The mean of per-task (or per-group) accuracies with Student's t interval, clipped to [0, 1]."""
    values = np.asarray(accuracies, dtype=np.float64)
    n, mean = len(values), float(values.mean())
    if n < 2:
        return Score(mean, math.nan, math.nan, n, unit)
    half = t_half_width(values)
    return Score(mean, max(0.0, mean - half), min(1.0, mean + half), n, unit)


def summarise(correct: list[torch.Tensor], unit: str = TASKS) -> Score:
    """A score from each task's per-query hits: Wilson over the rows of a single task, else
    Student's t over the tasks' accuracies (``unit`` names them: tasks or groups)."""
    if len(correct) == 1:
        return wilson(int(correct[0].sum()), correct[0].numel())
    return student_t(np.array([c.double().mean().item() for c in correct]), unit)


def evaluate(algorithm: MetaAlgorithm, tasks: list[Task], unit: str = TASKS) -> Score:
    """Adapt to each task's support set and score its queries (backbone in eval mode)."""
    return score_probabilities(predict_probabilities(algorithm, tasks), tasks, unit)


# Tasks of at most this many rows (support + queries) are adapted to and predicted on one CPU
# thread: their tensors are too small to share among threads, which then only contend. On a
# busy 2-core machine finetune's per-task head (100 Adam steps on 5 rows) took 1.9 s with two
# threads and 0.13 s with one: 600 test tasks, 19 minutes against 80 s.
SMALL_TASK_ROWS = 2_000


def predict_probabilities(algorithm: MetaAlgorithm, tasks: list[Task]) -> list[torch.Tensor]:
    """Each task's query class probabilities ``[queries, n_way]`` (on the CPU), after adapting to
    its support set with the backbone in eval mode (one CPU thread for small tasks)."""
    modules = algorithm.modules().values()
    for m in modules:
        m.eval()
    threads = torch.get_num_threads()
    if tasks and max(t.support.numel() + t.query.numel() for t in tasks) <= SMALL_TASK_ROWS:
        torch.set_num_threads(1)
    try:
        found = []
        for task in tasks:
            logits = algorithm.predict(task)
            expected = (task.query.shape[0], task.n_way)
            if not isinstance(logits, torch.Tensor):
                raise PluginError(
                    f"meta-algorithm {algorithm.name!r} predicted a {type(logits).__name__}; "
                    f"predict must return a tensor of logits of shape {expected}"
                )
            if tuple(logits.shape) != expected:
                raise PluginError(
                    f"meta-algorithm {algorithm.name!r} predicted logits of shape {tuple(logits.shape)} "
                    f"for a task with {expected[0]} queries and {expected[1]} ways; expected {expected}"
                )
            if logits.is_floating_point() and _unusable(logits):
                # argmax of NaN logits would score as if a class had been chosen.
                raise PluginError(
                    f"meta-algorithm {algorithm.name!r} predicted non-finite logits (NaN or inf): training "
                    "diverged (learning rates too high?) or the plugin has a numerical bug"
                )
            found.append(torch.softmax(logits.detach().float(), dim=-1).cpu())
    finally:
        torch.set_num_threads(threads)
        for m in modules:
            m.train()
    return found


def score_probabilities(probabilities: list, tasks: list[Task], unit: str = TASKS) -> Score:
    """The score of per-task query probabilities (or logits: only their argmax counts)."""
    return summarise([torch.as_tensor(p).argmax(-1) == task.query_y.cpu() for p, task in zip(probabilities, tasks)], unit)


def chance_accuracy(tasks: list[Task]) -> float:
    """The mean accuracy over ``tasks`` of always guessing each task's most common query class
    (1/N for balanced N-way episodes): what a learner must beat to have learned anything."""
    return float(np.mean([
        torch.bincount(t.query_y.reshape(-1).cpu()).max().item() / t.query_y.numel() for t in tasks
    ])) if tasks else 0.0


def _unusable(logits: torch.Tensor) -> bool:
    """NaN, +inf, or a row without any finite choice (-inf alone is a legitimate "impossible")."""
    return bool(torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all(-1).any())


def score_unit(split: Split) -> str:
    """What the test score of ``split`` is over: its query rows (one task), tasks or groups."""
    if len(split.test) == 1:
        return ROWS
    return GROUPS if split.protocol == "grouped" else TASKS


def caveats(split: Split) -> list[str]:
    """Why the test interval of ``split`` understates the uncertainty, if it does."""
    notes = []
    if split.protocol == "fewshot":
        classes = len(split.class_splits["test"])
        if classes < 2 * split.ways:
            notes.append(
                f"the {len(split.test)} test tasks are drawn from only {classes} test classes (fewer than 2 × "
                f"{split.ways} ways), so they share classes: the interval understates the uncertainty"
            )
    elif split.protocol == "grouped" and len(split.test) < 3:
        notes.append(
            f"only {len(split.test)} test group(s): the interval covers {'that group' if len(split.test) == 1 else 'these groups'}, "
            "not how the model does on new groups; it understates the uncertainty"
        )
    return notes


# --- baselines ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    kind: str  # "majority", "chance" or "linear"
    label: str  # what it is, as the leaderboard prints it
    score: Score

    def as_dict(self) -> dict[str, Any]:
        return {"baseline": self.kind, "label": self.label, **self.score.as_dict()}


def baselines(split: Split) -> list[Baseline]:
    """The majority (or chance) and linear baselines on ``split``'s test tasks."""
    unit = score_unit(split)
    labels = split.pool.labels.cpu().numpy()
    train = split.row_splits["train"]
    majority, linear = [], []
    if split.protocol == "fewshot":
        x = split.pool.features.design_matrix(text=tfidf_over(train))
        # Balanced episodes of classes never seen in training: a majority rule can only guess
        # (chance, 1/N), and the plain model is the support's class means.
        for task in split.test:
            support, query = task.support.cpu().numpy(), task.query.cpu().numpy()
            means = _class_means(x[support].toarray(), task.support_y.cpu().numpy(), task.n_way)
            guess = _nearest(x[query].toarray(), means)
            linear.append(guess == task.query_y.cpu().numpy())
        n_way = {t.n_way for t in split.test}
        chance = np.array([1 / t.n_way for t in split.test])
        return [
            Baseline("chance", f"chance (1/{n_way.pop()})" if len(n_way) == 1 else "chance (1/ways)",
                     Score(float(chance.mean()), float(chance.mean()), float(chance.mean()), len(chance), unit)),
            Baseline("linear", "nearest class mean of the preprocessed inputs", _score(linear, unit)),
        ]
    x = split.pool.features.design_matrix()
    for task in split.test:
        support, query = task.support.cpu().numpy(), task.query.cpu().numpy()
        query_y = task.query_y.cpu().numpy()
        if task.same_classes_as_training:  # standard: the task's labels are the training labels
            classes, rows = np.arange(task.n_way), train
        else:  # a held-out group: its local labels name these classes; its support is labelled too
            classes = np.empty(task.n_way, dtype=np.int64)
            classes[task.support_y.cpu().numpy()] = labels[support]
            rows = np.concatenate([train, support])
        counts = np.bincount(labels[rows], minlength=labels.max() + 1)[classes]
        majority.append(query_y == int(np.argmax(counts)))
        # Columns without a non-zero in the fitting rows (most hashed-text buckets) get no gradient,
        # so their weights stay 0 under the L2 penalty: left out, the fit is the same, much smaller.
        used = np.flatnonzero(np.diff(x[rows].tocsc().indptr))
        model = _logistic(x[rows][:, used], labels[rows])  # every class of the task is among these rows
        proba = model.predict_proba(x[query][:, used])[:, np.searchsorted(model.classes_, classes)]
        linear.append(proba.argmax(1) == query_y)
    where = "training rows" if split.protocol == "standard" else "training groups' rows and the support"
    return [
        Baseline("majority", f"majority class of the {where}", _score(majority, unit)),
        Baseline("linear", "logistic regression on the preprocessed inputs", _score(linear, unit)),
    ]


def tfidf_over(rows: np.ndarray):
    """Text token counts → TF-IDF as a plain text pipeline weighs them (scikit-learn's sublinear
    tf, smoothed idf and unit rows), the idf from ``rows`` only (a baseline's fitting rows)."""
    from sklearn.feature_extraction.text import TfidfTransformer

    return lambda counts: TfidfTransformer(sublinear_tf=True).fit(counts[rows]).transform(counts)


def _score(hits: list[np.ndarray], unit: str) -> Score:
    return summarise([torch.as_tensor(h) for h in hits], unit)


def _class_means(x: np.ndarray, y: np.ndarray, n_way: int) -> np.ndarray:
    return np.stack([x[y == c].mean(0) for c in range(n_way)])


def _nearest(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    distances = (x**2).sum(1)[:, None] - 2 * x @ means.T + (means**2).sum(1)[None, :]
    return distances.argmin(1)


def _logistic(x, y):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a baseline: its best effort in max_iter is fine
        return LogisticRegression(max_iter=1000).fit(x, y)
