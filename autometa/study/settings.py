"""Every setting of a search, with its default written once: ``search()`` takes a
``SearchSettings`` and the command line reads its defaults from here.

Light on purpose (no torch, no Optuna): ``autometa --help`` imports it to show the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from autometa.store import DEFAULT_DB, PRIOR_PATH

DEFAULT_TRIALS = 30  # a search's budget of trials when it has no --timeout
TIMED_TRIALS = 1000  # with --timeout and no --trials the time is the budget; this only bounds it
# `autometa search` given neither --trials nor --timeout: 30 trials or this many seconds, whichever ends first.
# On the automl benchmark's five sets 60 s and 600 s searches end level, while 30 trials took up
# to 7 minutes (digits; docs/automl-benchmark.md, fourteenth pass), and more on larger data.
# The Python API keeps no limit unless given one (knowledge-base builds count trials, not time).
COMMAND_TIMEOUT = 300.0

PATIENCE = 30  # a search stops once this many completed trials in a row have not beaten its best (0: never)

WARM_START_K = 3  # nearest datasets drawn from
WARM_START_CONFIGS = 3  # configurations seeded in all (one from each of the 3 nearest by default)


@dataclass(frozen=True)
class SearchSettings:
    """How to run one search (the data and its label column are given beside it)."""

    group: str | None = None  # group column: one task per group (grouped protocol)
    columns: Mapping[str, str] | None = None  # column -> type overrides
    protocol: str = "auto"
    trials: int | None = None  # the study's total budget of trials (None: see trial_budget)
    timeout: float | None = None  # seconds for the trials: running ones stop then (and each gets 1/4 by default)
    started: float | None = None  # when --timeout began (a time.time(); None: when search() is called)
    seed: int = 0
    db: str = DEFAULT_DB
    study: str | None = None  # default: named from the data and the settings
    devices: str = "auto"  # auto (every GPU, else the CPU), cpu or cuda:0,cuda:1,...
    trials_per_device: int = 1
    trial_timeout: float | None = None
    patience: int = PATIENCE  # stop once the last N completed trials have not beaten the best (0: never)
    isolate: bool = True  # trials in worker processes (False: in this process, one at a time)
    steps: int = 300  # meta-training steps per trial
    eval_every: int = 50
    ways: int = 5
    shots: int = 5
    queries: int = 15
    validation_tasks: int = 100
    test_tasks: int = 600
    top_k: int = 3  # configurations scored on the test tasks
    ensemble: bool = True  # choose an ensemble of the best trials on validation; saved when it beats its best member
    refit: bool = True  # learners that fit in one step are refitted on training + validation rows once chosen
    sampler: Any = None  # an optuna sampler; None: autometa's default
    pruner: Any = None  # an optuna pruner; None: autometa's default
    image_size: tuple[int, int] = (28, 28)
    include: Mapping[str, list[str]] | None = None  # restrict the components searched
    output: str | Path | None = "autometa-output"  # where the best model is saved (None: not saved)
    progress: bool = True
    echo: Callable[[str], None] | None = None  # where messages go (default: standard error)
    defaults: bool = True  # one trial per meta-algorithm at default parameters first
    warm_start: bool = True
    warm_start_k: int = WARM_START_K
    warm_start_configs: int = WARM_START_CONFIGS
    warm_start_prior: str | Path | None = PRIOR_PATH

    @property
    def trial_budget(self) -> int:
        """``trials``, or by default 30 trials, or as many as ``timeout`` allows (at most 1000)."""
        if self.trials is not None:
            return self.trials
        return DEFAULT_TRIALS if self.timeout is None else TIMED_TRIALS

    def replace(self, **overrides: Any) -> "SearchSettings":
        """These settings with some changed (an unknown name raises TypeError)."""
        return dataclasses.replace(self, **overrides)
