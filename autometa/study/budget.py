"""The study's trial budget, shared by every worker: claimed before a trial starts; and the
patience that ends a search whose best trial has stopped changing."""

from __future__ import annotations

import os

import optuna
from optuna.trial import TrialState

from autometa.store.storage import FINISHED, REQUEUED, storage_for

# Study attribute: why the search stopped starting trials before its budget was used (its
# --timeout or --patience), so workers that joined it from elsewhere stop too; None while it runs.
STOPPED = "stopped"


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def budget_used(study: optuna.Study, *, running: bool = True) -> int:
    """Trials that count against the study's budget: finished ones (and running ones, unless
    ``running`` is False), except a trial whose worker was lost and that was failed and
    re-queued: its retry takes its place (or, when it had not sampled its parameters yet, the
    sampler's next trial does), so a kill never costs the user a trial."""
    trials = study.get_trials(deepcopy=False)
    # retry_of alone marks the re-queued trials of databases written before REQUEUED existed.
    replaced = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    counted = FINISHED + ((TrialState.RUNNING,) if running else ())
    return sum(t.state in counted and t.number not in replaced and not t.user_attrs.get(REQUEUED) for t in trials)


class Budget:
    """Trials this host's workers may still start: the study's total budget minus the trials in
    the database that use it (see ``budget_used``).

    A worker holds the claim lock from that count until its trial exists in the database, so
    this host's workers never overshoot the budget together. Other hosts are seen only through
    the database: two hosts claiming the last trial at once may run one extra.
    """

    def __init__(self, context, total: int):
        self.total = total
        self._lock = context.Lock()
        self._holder = context.Value("i", 0, lock=False)
        self._cancelled = context.Value("b", 0, lock=False)

    def remaining(self, study: optuna.Study) -> int:
        if self._cancelled.value:
            return 0
        return self.total - budget_used(study)

    def claim(self, study: optuna.Study, parent_pid: int | None = None) -> bool:
        """Take the claim lock if a trial is left (then ``release`` once the trial exists)."""
        while not self._lock.acquire(timeout=1.0):
            if parent_pid is not None and not parent_alive(parent_pid):
                return False
        self._holder.value = os.getpid()
        try:
            if self.remaining(study) > 0:
                return True
        except BaseException:
            self.release()
            raise
        self.release()
        return False

    def release(self) -> None:
        if self._holder.value == os.getpid():
            self._holder.value = 0
            self._lock.release()

    def release_for(self, pid: int | None) -> None:
        """Free the claim lock a dead worker took with it."""
        if pid and self._holder.value == pid:
            self._holder.value = 0
            self._lock.release()

    def cancel(self) -> None:
        self._cancelled.value = 1


class DatabaseBudget:
    """The study's total budget, for workers joining from another process or machine (they run
    trials until the study holds ``budget`` finished or running ones)."""

    def __init__(self, db: str, study: str, budget: int):
        self.db, self.study, self.budget = db, study, budget

    def remaining(self) -> int:
        stored = optuna.load_study(study_name=self.study, storage=storage_for(self.db))
        return self.budget - budget_used(stored)


class Patience:
    """A search's early stop: once none of the last ``trials`` completed trials has beaten the best
    validation accuracy before them, no further trial starts (running ones finish). 0: never.

    Searches of fast one-step trials find their best early and would spend the rest of --timeout
    on trials that change nothing: on issue 15's benchmark at 600 s, 30 ended fastfood's search
    after 245 s instead of 609 s and finefood's after 351 s instead of 612 s, test accuracy within
    0.1 point (docs/automl-benchmark.md). Searches of a few slow trials rarely complete 30.
    Pruned and failed trials do not count. (Optuna's own rule, ``BestValueStagnationEvaluator``,
    is deprecated since Optuna 4.9 and goes in 6.0.)
    """

    def __init__(self, trials: int):
        self.trials = trials

    def reached(self, study: optuna.Study) -> bool:
        if not self.trials:
            return False
        values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if len(values) <= self.trials:
            return False
        since_best = len(values) - 1 - max(range(len(values)), key=lambda i: (values[i], -i))
        return since_best >= self.trials

    @property
    def reason(self) -> str:
        """Why the search stopped, for workers that joined it (``STOPPED``)."""
        return f"its --patience ({self.trials} completed trials without a better one)"

    def note(self, study: optuna.Study) -> str:
        """The line a search prints when it stops early."""
        best = study.best_trial
        return (f"stopped early: no trial has beaten the best validation accuracy ({100 * best.value:.1f}%, trial "
                f"{best.number}) in the last {self.trials} completed trials (--patience {self.trials}; 0 runs the whole budget)")
