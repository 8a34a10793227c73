"""Scoring a trained meta-algorithm on tasks: accuracy per unit, mean ± 95% CI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autometa.components import MetaAlgorithm
from autometa.errors import PluginError
from autometa.tasks import Task


@dataclass(frozen=True)
class Score:
    """Mean accuracy and the half-width of its normal-approximation 95% CI over ``n`` units.

    Units are tasks when there are several, query rows when there is one (standard protocol).
    """

    mean: float
    ci95: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f} ± {100 * self.ci95:.1f}%"


def summarise(values: torch.Tensor) -> Score:
    values = values.double().flatten()
    n = values.numel()
    mean = values.mean().item()
    half = 1.96 * values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return Score(mean, half, n)


def task_units(correct: list[torch.Tensor]) -> torch.Tensor:
    """Per-task accuracies, or the per-row hits of a single task."""
    if len(correct) == 1:
        return correct[0].double()
    return torch.stack([c.double().mean() for c in correct])


def evaluate(algorithm: MetaAlgorithm, tasks: list[Task]) -> Score:
    """Adapt to each task's support set and score its queries (backbone in eval mode)."""
    modules = algorithm.modules().values()
    for m in modules:
        m.eval()
    try:
        correct = []
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
            correct.append((logits.argmax(-1) == task.query_y).cpu())
    finally:
        for m in modules:
            m.train()
    return summarise(task_units(correct))


def _unusable(logits: torch.Tensor) -> bool:
    """NaN, +inf, or a row without any finite choice (-inf alone is a legitimate "impossible")."""
    return bool(torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all(-1).any())


def majority_baseline(tasks: list[Task]) -> Score:
    """Accuracy of always predicting each task's most frequent support class."""
    correct = []
    for task in tasks:
        majority = torch.bincount(task.support_y, minlength=task.n_way).argmax()
        correct.append((task.query_y == majority).cpu())
    return summarise(task_units(correct))
