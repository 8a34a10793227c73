"""Read-only queries over a study database, for `autometa db ...` (more arrive with the
database issue: datasets, similar datasets, read-only SQL)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from autometa.errors import SearchError
from autometa.report import open_storage


def studies(db: str) -> list[dict[str, Any]]:
    """One row per study: dataset, protocol, trial counts, best validation and test scores."""
    try:
        return _studies(db)
    except optuna.exceptions.StorageInternalError as exc:
        cause = exc.__cause__ or exc
        raise SearchError(f"cannot read the studies in {db}: {str(cause).splitlines()[0]} (the file was not changed)") from exc


def _studies(db: str) -> list[dict[str, Any]]:
    storage = open_storage(db)
    rows = []
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        attrs = study.user_attrs
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
        best = (attrs.get("leaderboard") or [{}])[0]
        rows.append({
            "study": summary.study_name,
            "dataset": attrs.get("dataset"),
            "protocol": attrs.get("protocol"),
            "trials": len(trials),
            "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL),
            "best_validation": max(complete) if complete else None,
            "best_test": best.get("test_accuracy"),
            "best_test_ci95": best.get("test_ci95"),
            "model_path": attrs.get("model_path"),
        })
    return rows


def models(db: str) -> list[dict[str, Any]]:
    """Saved best models recorded in the database."""
    return [
        {k: row[k] for k in ("study", "dataset", "protocol", "best_test", "best_test_ci95", "model_path")}
        for row in studies(db)
        if row["model_path"]
    ]
