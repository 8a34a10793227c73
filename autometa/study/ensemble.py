"""Ensembles of finished trials: greedy forward selection with replacement on their stored
validation predictions (Caruana et al., "Ensemble selection from libraries of models", 2004).

Each round adds the candidate (again, if it is already in) whose addition gives the averaged
class probabilities the best validation accuracy, ties broken by the lower log-loss; the
ensemble kept is the best one seen over the rounds, and a candidate's weight is how often it
was added. Only validation tasks are used to choose; the test tasks score the result once,
like the leaderboard's finalists. Few-shot and grouped tasks average the members' adapted
predictions of each task's queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from autometa.components import MetaAlgorithm
from autometa.data.protocols import Split
from autometa.data.scoring import Score, chance_accuracy, evaluate, score_probabilities, score_unit
from autometa.store import schema

ROUNDS = 25  # additions (with replacement): weights in steps of 1/25 at the finest
DECISION_FOLDS = 5  # folds of every validation task's rows that decide whether the ensemble is kept
_TINY = 1e-12  # probabilities are clipped here for the log-loss and for the ensemble's logits


def distinct_best(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """The ``n`` best complete trials by validation accuracy, one per configuration."""
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    chosen, seen = [], set()
    for t in complete:
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            chosen.append(t)
        if len(chosen) == n:
            break
    return chosen


def accuracy(probabilities: list[np.ndarray], targets: list[np.ndarray]) -> float:
    """Mean over tasks of each task's query accuracy (one task: its rows'): the score's mean."""
    return float(np.mean([np.mean(p.argmax(1) == y) for p, y in zip(probabilities, targets)]))


def _log_loss(probabilities: list[np.ndarray], targets: list[np.ndarray]) -> float:
    return float(np.mean([-np.log(np.clip(p[np.arange(len(y)), y], _TINY, None)).mean() for p, y in zip(probabilities, targets)]))


def select(candidates: list[list[np.ndarray]], targets: list[np.ndarray], rounds: int = ROUNDS) -> np.ndarray:
    """How often each candidate (its probabilities per task) is chosen: Caruana's greedy forward
    selection with replacement, the best ensemble over ``rounds`` additions."""
    counts = np.zeros(len(candidates), dtype=np.int64)
    total = [np.zeros_like(p, dtype=np.float64) for p in candidates[0]]
    best_key, best_counts = None, counts
    for size in range(1, rounds + 1):
        scored = []
        for i, candidate in enumerate(candidates):
            mixed = [(t + p) / size for t, p in zip(total, candidate)]
            scored.append((accuracy(mixed, targets), -_log_loss(mixed, targets), -i))  # ties: lower loss, then earlier
        key = max(scored)
        chosen = -key[2]
        counts = counts.copy()
        counts[chosen] += 1
        total = [t + p for t, p in zip(total, candidates[chosen])]
        if best_key is None or key[:2] > best_key:
            best_key, best_counts = key[:2], counts
    return best_counts


def held_out_choices(candidates: list[list[np.ndarray]], targets: list[np.ndarray], rounds: int = ROUNDS,
                     folds: int = DECISION_FOLDS, seed: int = 0) -> tuple[float, float] | None:
    """Validation accuracy of two ways to choose, each made on the other folds of every task's
    rows and scored on the held-out fold: Caruana's selection (``select``) and the single best
    candidate. None when a task has fewer rows than ``folds``.

    Scored on the rows it was chosen on, an ensemble flatters itself: it is fitted to them, more
    than picking one of a few trials is (docs/evaluation.md, "Ensembles", has a case).
    """
    if min(len(y) for y in targets) < folds:
        return None
    rng = np.random.default_rng(seed)
    fold_of = [rng.permutation(len(y)) % folds for y in targets]  # each task's rows, dealt into the folds
    ensemble = [np.zeros_like(p, dtype=np.float64) for p in candidates[0]]
    single = [np.zeros_like(p, dtype=np.float64) for p in candidates[0]]
    for fold in range(folds):
        kept = [f != fold for f in fold_of]
        rows = lambda parts, which: [p[w] for p, w in zip(parts, which)]  # noqa: E731
        chosen_on = [rows(c, kept) for c in candidates]
        counts = select(chosen_on, rows(targets, kept), rounds)
        best = int(np.argmax([accuracy(c, rows(targets, kept)) for c in chosen_on]))
        for task, held in enumerate(f == fold for f in fold_of):
            ensemble[task][held] = sum(n * c[task][held] for n, c in zip(counts, candidates)) / counts.sum()
            single[task][held] = candidates[best][task][held]
    return accuracy(ensemble, targets), accuracy(single, targets)


class EnsembleAlgorithm:
    """Trained models predicting together: the weighted mean of their class probabilities
    (returned as log-probabilities, so anything that scores logits scores it)."""

    name = "ensemble"

    def __init__(self, members: list[tuple[float, MetaAlgorithm]]):
        total = sum(w for w, _ in members)
        self.members = [(w / total, a) for w, a in members]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {f"member{i}.{name}": m for i, (_, a) in enumerate(self.members) for name, m in a.modules().items()}

    def predict(self, task) -> torch.Tensor:
        mixed = sum(w * torch.softmax(a.predict(task).detach().float(), dim=-1).cpu() for w, a in self.members)
        return torch.log(mixed.clamp_min(_TINY))


@dataclass
class EnsembleEntry:
    """The ensemble a search chose: its members (trial, weight), validation accuracy beside its
    best member's, and its test score; ``chosen``: better on validation, so saved as the model."""

    members: list[tuple[int, float]]
    validation: float
    best_member_validation: float
    test: Score
    chosen: bool
    algorithm: EnsembleAlgorithm | None = field(default=None, repr=False, compare=False)
    # ``held_out_choices``: (ensemble, best single) chosen on other folds of the validation rows
    held_out: tuple[float, float] | None = None

    def label(self) -> str:
        return "ensemble of trials " + ", ".join(f"{t}×{w:.2f}" for t, w in self.members)

    def as_dict(self) -> dict[str, Any]:
        return {
            "members": [{"trial": t, "weight": w} for t, w in self.members],
            "validation_accuracy": self.validation,
            "best_member_validation": self.best_member_validation,
            "chosen": self.chosen,
            "held_out_validation": None if self.held_out is None else list(self.held_out),
            **self.test.as_dict(),
        }


def build_ensemble(study: optuna.Study, split: Split, db: str, model: Callable[[FrozenTrial], MetaAlgorithm],
                   say: Callable[[str], None], candidates: int, rounds: int = ROUNDS,
                   test_probabilities: Callable[[FrozenTrial], list] | None = None) -> EnsembleEntry | None:
    """Choose an ensemble among the ``candidates`` best distinct trials on the validation tasks
    and score it on the test tasks (``model(trial)``: a trial's trained model;
    ``test_probabilities(trial)``: its test predictions, when they are kept, so that finalists
    are not predicted twice); None when fewer than two trials above chance have validation
    predictions stored. The selection may keep one trial alone: then the ensemble is that
    trial, no better than it, and says so."""
    best = distinct_best(study, candidates)
    try:
        with schema.recording_engine(db).connect() as connection:
            stored = schema.stored_predictions(connection, study.study_name, [t.number for t in best])
    except SQLAlchemyError as exc:
        say(f"ensemble: the validation predictions cannot be read ({type(exc).__name__}); no ensemble")
        return None
    shapes = [(len(task.query), task.n_way) for task in split.validation]
    usable = [t for t in best if t.number in stored and [p.shape for p in stored[t.number]] == shapes]
    targets = [task.query_y.cpu().numpy() for task in split.validation]
    # A trial no better than always guessing the most common class (the rule that stops trials
    # below chance) has learned nothing to add, yet greedy selection takes it wherever it flips a
    # few validation rows, and then scores and saves it (auto-sklearn leaves out models worse
    # than its dummy likewise). Trials stopped by a time limit before that rule ran end up here.
    alone = {t.number: accuracy(stored[t.number], targets) for t in usable}  # each trial's validation accuracy
    chance = chance_accuracy(split.validation)
    weak = [t.number for t in usable if alone[t.number] <= chance]
    if weak:
        say(f"ensemble: trial(s) {', '.join(map(str, weak))} left out, their validation accuracy not above the "
            f"{100 * chance:.1f}% of always guessing the most common class")
        usable = [t for t in usable if t.number not in weak]
    if len(usable) < 2:
        say("ensemble: fewer than two trials above chance have validation predictions stored; no ensemble")
        return None
    library = [stored[t.number] for t in usable]
    counts = select(library, targets, rounds)
    members = [(t, int(c)) for t, c in zip(usable, counts) if c]
    weights = [(t.number, c / counts.sum()) for t, c in members]
    mixed = [sum(w * p for (_, w), p in zip(weights, parts)) for parts in zip(*(stored[t.number] for t, _ in members))]
    validation = accuracy(mixed, targets)
    single = max(alone[t.number] for t in usable)
    algorithm = EnsembleAlgorithm([(w, model(t)) for (t, _), (_, w) in zip(members, weights)])
    if test_probabilities is None:
        test = evaluate(algorithm, split.test, score_unit(split))
    else:  # what EnsembleAlgorithm.predict computes, from the members' kept test predictions
        tested = [test_probabilities(t) for t, _ in members]
        mixed_test = [sum(w * p for (_, w), p in zip(weights, parts)) for parts in zip(*tested)]
        test = score_probabilities(mixed_test, split.test, score_unit(split))
    # Kept when it is better than its best member on the validation rows and, where each task
    # has rows enough to fold, when choosing an ensemble beats choosing one trial on held-out folds.
    held_out = held_out_choices(library, targets, rounds)
    chosen = validation > single and (held_out is None or held_out[0] > held_out[1])
    entry = EnsembleEntry(weights, validation, single, test, chosen, algorithm, held_out)
    verdict = "saved as the model" if entry.chosen else "the single best model is kept"
    folded = "" if held_out is None else (
        f"; chosen on {DECISION_FOLDS - 1} of {DECISION_FOLDS} folds of the validation rows and scored on the other, "
        f"{100 * held_out[0]:.1f}% vs {100 * held_out[1]:.1f}% for the best single trial")
    say(f"{entry.label()}: validation {100 * validation:.1f}% vs {100 * single:.1f}% for the best single trial{folded}: "
        f"{verdict}")
    return entry
