"""The leaderboard of a search: its finalists (the top configurations retrained and scored on
the test tasks), the result ``search()`` returns, and how both are printed."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autometa.components import MetaAlgorithm
from autometa.config import Config, stored_config
from autometa.data.loading import Dataset
from autometa.data.protocols import Split
from autometa.data.scoring import (
    INTERVALS, Baseline, Score, caveats, predict_probabilities, score_probabilities, score_unit,
)
from autometa.errors import one_line
from autometa.store.queries import ensemble_note
from autometa.study.ensemble import EnsembleEntry, distinct_best
from autometa.study.kept import KeptModels
from autometa.study.training import count_parameters, refit, refits, train


@dataclass
class LeaderboardEntry:
    rank: int
    trial: int
    config: Config
    validation: float
    test: Score
    parameters: int
    algorithm: MetaAlgorithm | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "trial": self.trial,
            "meta_algorithm": self.config.meta_algorithm,
            "fusion": self.config.fusion,
            "encoders": self.config.encoders,
            "crossmodal_weight": self.config.crossmodal_weight,
            "validation_accuracy": self.validation,
            **self.test.as_dict(),
            "parameters": self.parameters,
        }


@dataclass
class SearchResult:
    study: optuna.Study
    dataset: Dataset
    split: Split
    leaderboard: list[LeaderboardEntry]
    baselines: list[Baseline]
    new_trials: int
    model_path: Path | None = None
    ensemble: EnsembleEntry | None = None  # None: turned off, or fewer than two trials to choose from

    @property
    def best(self) -> LeaderboardEntry | None:
        return self.leaderboard[0] if self.leaderboard else None

    def outcomes(self, shown: int = 3) -> str:
        """The study's trials counted by what became of them, most common first, e.g. "3 failed:
        RuntimeError: ...; 1 pruned" (for a search in which none completed)."""
        words = {TrialState.FAIL: "failed", TrialState.PRUNED: "pruned", TrialState.RUNNING: "still running",
                 TrialState.WAITING: "waiting"}
        # A queued trial no worker claimed before the search ended (e.g. its --timeout passed
        # while the data was prepared) has no reason of its own.
        unclaimed = "queued, not started: the search ended first (a --timeout shorter than preparing the data?)"
        counts = Counter(
            "completed" if t.state == TrialState.COMPLETE else f"{words[t.state]}: " + one_line(
                t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason")
                or (unclaimed if t.state == TrialState.WAITING else "no reason recorded"), 160)
            for t in self.study.get_trials(deepcopy=False)
        )
        listed = [f"{n} {what}" for what, n in counts.most_common(shown)]
        rest = sum(counts.values()) - sum(n for _, n in counts.most_common(shown))
        return "; ".join(listed + ([f"{rest} more with other reasons"] if rest else [])) or "no trials"

    @property
    def majority(self) -> Score:
        """The majority-class (few-shot: chance) baseline's test score."""
        return self.baselines[0].score

    @property
    def warnings(self) -> list[str]:
        return caveats(self.split)

    def format_leaderboard(self) -> str:
        unit = score_unit(self.split)
        n = self.baselines[0].score.n
        lines = [
            f"Leaderboard ({self.split.protocol} protocol): test accuracy [95% confidence interval] over {n} test "
            f"{unit} ({INTERVALS[unit]})",
            f"{'rank':>4}  {'trial':>5}  {'validation':>10}  {'test':>20}  configuration",
        ]
        for e in self.leaderboard:
            lines.append(f"{e.rank:>4}  {e.trial:>5}  {100 * e.validation:>9.1f}%  {str(e.test):>20}  {e.config.label()}")
        if self.ensemble is not None:
            e = self.ensemble
            note = ensemble_note(e.chosen, e.best_member_validation)
            lines.append(f"{'ens':>4}  {'':>5}  {100 * e.validation:>9.1f}%  {str(e.test):>20}  {e.label()} ({note})")
        for b in self.baselines:
            lines.append(f"{'':>4}  {'':>5}  {'':>10}  {str(b.score):>20}  baseline: {b.label}")
        lines += [f"note: {w}" for w in self.warnings]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The result as `autometa search --format json` prints it."""
        return {
            "study": self.study.study_name,
            "protocol": self.split.protocol,
            "test_unit": score_unit(self.split),
            "interval": INTERVALS[score_unit(self.split)],
            "leaderboard": [e.as_dict() for e in self.leaderboard],
            "ensemble": self.ensemble.as_dict() if self.ensemble else None,
            "baselines": [b.as_dict() for b in self.baselines],
            "warnings": self.warnings,
            "model": str(self.model_path) if self.model_path else None,
        }


def _keep_best(cache: dict[int, tuple[float, MetaAlgorithm]], number: int, value: float, algorithm: MetaAlgorithm,
               top_k: int) -> None:
    """Keep the ``top_k`` best trained models of this run (by validation), so the leaderboard
    need not retrain them."""
    cache[number] = (value, algorithm)
    for stale in sorted(cache, key=lambda n: cache[n][0], reverse=True)[top_k:]:
        del cache[stale]


class TrainedModels:
    """A complete trial's trained model: kept by this process (``cache``), kept by the worker
    that trained it (``kept``), or, when neither has it, retrained from its parameters and seed;
    and its predictions of the test tasks, made once for the leaderboard and the ensemble alike
    (adapting to 600 support sets can take minutes for a learner that fine-tunes per task).
    With ``refit``, a learner that fits in one step is fitted again on the training and
    validation rows instead (standard protocol; see ``training.refit``), unless it would start
    after ``refit_until`` (a time.time(); None: no limit): it then keeps its trial's fit."""

    def __init__(self, split: Split, registry, choices, steps: int, eval_every: int,
                 cache: dict[int, tuple[float, MetaAlgorithm]], kept: KeptModels, refit: bool = True,
                 refit_until: float | None = None):
        self.split, self.registry, self.choices, self.steps, self.eval_every = split, registry, choices, steps, eval_every
        self.cache, self.kept, self.refit, self.refit_until = cache, kept, refit, refit_until
        self.restored, self.retrained, self.refitted, self.late = 0, 0, [], []
        self.ready: set[int] = set()  # trials whose model in the cache is the final one
        self._tested: dict[int, list] = {}

    def test_probabilities(self, t: FrozenTrial) -> list:
        """Trial ``t``'s model's query probabilities on each test task (predicted once)."""
        if t.number not in self._tested:
            self._tested[t.number] = predict_probabilities(self(t), self.split.test)
        return self._tested[t.number]

    def __call__(self, t: FrozenTrial) -> MetaAlgorithm:
        if t.number not in self.ready:
            self.cache[t.number] = (t.value, self._final(t))
            self.ready.add(t.number)
        return self.cache[t.number][1]

    def _final(self, t: FrozenTrial) -> MetaAlgorithm:
        config = stored_config(t.params, self.registry, self.choices)
        seed = t.user_attrs.get("seed", t.number)
        if self.refit and refits(config, self.split, self.registry):
            if self.refit_until is None or time.time() < self.refit_until:
                algorithm = refit(config, self.split, seed=seed, registry=self.registry)
                self.refitted.append(t.number)
                return algorithm
            self.late.append(t.number)
        if t.number in self.cache:
            return self.cache[t.number][1]
        algorithm, _ = train(config, self.split, seed=seed, steps=0, eval_every=self.eval_every, registry=self.registry)
        if self.kept.restore(t.number, algorithm):
            self.restored += 1
            return algorithm
        self.retrained += 1
        return train(config, self.split, seed=seed, steps=t.user_attrs.get("steps", self.steps),
                     eval_every=self.eval_every, registry=self.registry)[0]


def scoring_reserve(study: optuna.Study, top_k: int, test_tasks: int, refitted: int = 0) -> float:
    """Seconds the work after the trials will take, as far as the trials tell: scoring the current
    finalists (the ``top_k`` best distinct complete trials) on ``test_tasks`` tasks, from each
    one's seconds per validation task, and refitting those of the ``refitted`` best (finalists
    and the ensemble's candidates) that refit on training + validation rows, from each one's own
    fit (``refit_s``). A search with a --timeout keeps this back from its trials, so that the
    whole search ends near its budget (few-shot learners that fine-tune on each of 600 support
    sets take minutes to score; gbm's refits seconds each)."""
    best = distinct_best(study, max(top_k, refitted))
    scoring = test_tasks * sum(t.user_attrs.get("scoring_s_per_task", 0.0) for t in best[:top_k])
    return scoring + sum(t.user_attrs.get("refit_s", 0.0) for t in best[:refitted])


def _leaderboard(study, split, registry, choices, top_k, models: TrainedModels, say,
                 deadline: float | None = None) -> list[LeaderboardEntry]:
    """The ``top_k`` best distinct trials scored on the test tasks, best first. Past ``deadline``
    (the search's --timeout, a ``time.time()`` value) only the best is scored: the others' test
    scores are a comparison, the best's is the result."""
    chosen = distinct_best(study, top_k)
    if not chosen:
        say("no trial completed: nothing to evaluate on the test tasks (see the failure reasons above)")
        return []
    say(f"scoring the top {len(chosen)} configuration(s) on {len(split.test)} held-out test task(s)")
    entries = []
    for rank, t in enumerate(chosen, start=1):
        if rank > 1 and deadline is not None and time.time() > deadline:
            say(f"the --timeout has passed: {len(chosen) - rank + 1} more finalist(s) not scored on the test tasks")
            break
        config = stored_config(t.params, registry, choices)
        algorithm = models(t)
        test = score_probabilities(models.test_probabilities(t), split.test, score_unit(split))
        parameters = count_parameters(algorithm)
        entries.append(LeaderboardEntry(rank, t.number, config, t.value, test, parameters, algorithm))
    return entries
