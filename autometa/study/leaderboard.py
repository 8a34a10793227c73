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
from autometa.data.scoring import INTERVALS, Baseline, Score, caveats, evaluate, score_unit
from autometa.errors import one_line
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
        counts = Counter(
            "completed" if t.state == TrialState.COMPLETE else f"{words[t.state]}: " + one_line(
                t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or "no reason recorded", 160)
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
            note = "saved as the model" if e.chosen else "not kept: no better on validation than its best member"
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
    that trained it (``kept``), or, when neither has it, retrained from its parameters and seed.
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

    def __call__(self, t: FrozenTrial) -> MetaAlgorithm:
        if t.number in self.ready:
            return self.cache[t.number][1]
        self.ready.add(t.number)
        config = stored_config(t.params, self.registry, self.choices)
        seed = t.user_attrs.get("seed", t.number)
        if self.refit and refits(config, self.split, self.registry):
            if self.refit_until is None or time.time() < self.refit_until:
                algorithm = refit(config, self.split, seed=seed, registry=self.registry)
                self.refitted.append(t.number)
                self.cache[t.number] = (t.value, algorithm)
                return algorithm
            self.late.append(t.number)
        if t.number in self.cache:
            return self.cache[t.number][1]
        algorithm, _ = train(config, self.split, seed=seed, steps=0, eval_every=self.eval_every, registry=self.registry)
        if self.kept.restore(t.number, algorithm):
            self.restored += 1
        else:
            algorithm, _ = train(config, self.split, seed=seed, steps=t.user_attrs.get("steps", self.steps),
                                 eval_every=self.eval_every, registry=self.registry)
            self.retrained += 1
        self.cache[t.number] = (t.value, algorithm)
        return algorithm


def _leaderboard(study, split, registry, choices, top_k, models: TrainedModels, say) -> list[LeaderboardEntry]:
    chosen = distinct_best(study, top_k)
    if not chosen:
        say("no trial completed: nothing to evaluate on the test tasks (see the failure reasons above)")
        return []
    say(f"scoring the top {len(chosen)} configuration(s) on {len(split.test)} held-out test task(s)")
    entries = []
    for rank, t in enumerate(chosen, start=1):
        config = stored_config(t.params, registry, choices)
        algorithm = models(t)
        test = evaluate(algorithm, split.test, score_unit(split))
        parameters = count_parameters(algorithm)
        entries.append(LeaderboardEntry(rank, t.number, config, t.value, test, parameters, algorithm))
    return entries
