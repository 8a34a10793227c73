"""Joining a search from another process or machine: `autometa worker --db URL --study NAME`.

Every worker points at the same database URL (PostgreSQL for several machines; SQLite serves
one machine). The study stores how to rebuild its data split and search space, so a worker
needs only the URL, the study name and the data file at the same path (or ``--data``).
"""

from __future__ import annotations

import sys

import optuna
from optuna.trial import TrialState

from autometa.data.loading import load_dataset
from autometa.errors import SearchError
from autometa.store.storage import FINISHED, storage_for
from autometa.study.budget import STOPPED, DatabaseBudget, budget_used
from autometa.study.devices import resolve_devices, worker_label
from autometa.study.objective import SearchSpec, build_runner
from autometa.study.pool import recover_orphans, run_pool


def join(
    db: str,
    study: str,
    *,
    devices: str = "auto",
    trials_per_device: int = 1,
    trial_timeout: float | None = None,
    data: str | None = None,
    say=lambda message: print(message, file=sys.stderr),
) -> tuple[int, str | None]:
    """Run trials of an existing study until its budget is used or its search stops starting
    trials; returns the finished count and, in the latter case, why the search stopped."""
    storage = storage_for(db, create=False)
    names = [s.study_name for s in storage.get_all_studies()]
    if study not in names:
        raise SearchError(f"no study {study!r} in {db}; studies there: {', '.join(names) or 'none'}")
    optuna_study = optuna.load_study(study_name=study, storage=storage)
    stored = optuna_study.user_attrs.get("spec")
    if stored is None:
        raise SearchError(f"study {study!r} was not created by `autometa search` (it has no stored search settings)")
    spec = SearchSpec.from_json(stored)
    if data is not None:
        spec.data = data
    if spec.data is None:
        raise SearchError(f"study {study!r} was searched on in-memory data; pass --data PATH to the same data file")
    slots = resolve_devices(devices, trials_per_device)
    # Every worker reloads the data; check it here once, so that a missing file or another
    # version of the data is one clear error instead of workers failing, or searching the wrong data.
    dataset = load_dataset(spec.data, spec.label, group=spec.group, columns=spec.columns, image_size=spec.image_size)
    expected = optuna_study.user_attrs.get("fingerprint")
    if expected is not None and dataset.fingerprint != expected:
        raise SearchError(
            f"{spec.data} is not the data study {study!r} was searched on (content fingerprint {dataset.fingerprint[:10]}, "
            f"the study's is {expected[:10]}); pass --data PATH to a copy of that file"
        )
    recover_orphans(optuna_study, say)
    stopped = lambda: optuna_study.user_attrs.get(STOPPED)  # noqa: E731 - the search stopped starting trials
    if stopped():
        return budget_used(optuna_study, running=False), stopped()
    budget = DatabaseBudget(db, study, spec.budget)
    left = budget.remaining()
    say(f"joining study {study!r} on {', '.join(s.label for s in slots)}: {max(0, left)} trial(s) of the budget of {spec.budget} left")
    if left <= 0:
        return budget_used(optuna_study, running=False), None

    def finished() -> int:
        return budget_used(optuna_study, running=False)

    seen = {t.number for t in optuna_study.get_trials(deepcopy=False, states=FINISHED)}

    def on_poll() -> None:
        for t in optuna_study.get_trials(deepcopy=False, states=FINISHED):
            if t.number not in seen:
                seen.add(t.number)
                value = f"validation {100 * t.value:.1f}%" if t.state == TrialState.COMPLETE else t.state.name.lower()
                say(f"trial {t.number:>3} {value} on {worker_label(t.user_attrs)}")

    existing = finished()
    run_pool(
        optuna_study, db, slots, budget, build_runner, (spec, None, None, None, existing),
        timeout=None, trial_timeout=trial_timeout, on_event=lambda event: None, on_poll=on_poll, say=say,
        go_on=lambda: not stopped(),
    )
    return finished(), stopped()
