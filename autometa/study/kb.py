"""``autometa kb build``: search every dataset of a list or collection into one database, the
knowledge base that ``autometa kb export`` compacts into a warm-start prior."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import optuna

from autometa.data.loading import load_dataset
from autometa.store.knowledge import LICENCE_ATTR, SOURCE_ATTR, KnowledgeEntry
from autometa.store.storage import storage_for
from autometa.study.engine import finished_trials, search, study_name


@dataclass
class BuildOutcome:
    name: str
    study: str
    finished: int
    ran: int  # trials run by this call (0: skipped, its budget was already used)


def build(
    entries: Iterable[KnowledgeEntry],
    *,
    db: str,
    trials: int,
    seed: int = 0,
    protocol: str = "standard",
    echo: Callable[[str], None] | None = None,
    **search_options: Any,
) -> list[BuildOutcome]:
    """Search every entry into ``db`` with the same budget and seed, cold (no warm start, so
    each dataset's result is its own and the base can be rebuilt reproducibly).

    Without the ensemble: the prior holds each dataset's meta-features and its trials'
    configurations and validation scores, which no ensemble changes, and scoring its candidates
    on the test tasks was most of a few-shot search (KanjiVG: 1 h 40 min with it, 45 min without).

    Resumable: a study that already has ``trials`` finished trials is skipped without loading
    its model; any other resumes (``trials`` is each study's total budget). An entry that names
    its protocol (a few-shot set in a collection) is searched with it, the others with ``protocol``;
    its group column and ways, when it names them, likewise.
    """
    say = echo or (lambda message: print(message, file=sys.stderr))
    entries = list(entries)
    storage = storage_for(db)
    outcomes = []
    for index, entry in enumerate(entries, start=1):
        dataset = load_dataset(entry.path, entry.label, group=entry.group)
        # An entry's own group column and episode ways (a grouped or 3-way few-shot set) win.
        own = {k: v for k, v in (("group", entry.group), ("ways", entry.ways)) if v is not None}
        options = {"output": None, "top_k": 1, "ensemble": False, **search_options, **own}
        its_protocol = entry.protocol or protocol
        name = study_name(dataset, entry.label, protocol=its_protocol, trials=trials, seed=seed, **options)
        done = finished_trials(name, storage)
        where = f"[{index}/{len(entries)}] {dataset.name}"
        if done >= trials:
            say(f"{where}: study {name!r} already has {done} finished trial(s) of {trials}; skipped")
            _label(optuna.load_study(study_name=name, storage=storage), entry)
            outcomes.append(BuildOutcome(dataset.name, name, done, 0))
            continue
        say(f"{where}: {'resuming' if done else 'searching'} ({done} of {trials} trials done)")
        result = search(
            str(entry.path), entry.label, protocol=its_protocol, trials=trials, seed=seed, db=db, study=name, warm_start=False,
            echo=lambda message: say(f"  {message}"), **options,
        )
        _label(result.study, entry)
        finished = finished_trials(name, storage)
        best = f"best validation {100 * result.study.best_value:.1f}%" if result.leaderboard else "no trial completed"
        say(f"{where}: {finished} trial(s) finished, {best}")
        outcomes.append(BuildOutcome(dataset.name, name, finished, finished - done))
    return outcomes


def _label(study: optuna.Study, entry: KnowledgeEntry) -> None:
    """Name the entry's source and licence on its study, for ``kb export`` (a skipped study too,
    so a base built before an entry named them gets them)."""
    for attr, value in ((SOURCE_ATTR, entry.source), (LICENCE_ATTR, entry.licence)):
        if value and study.user_attrs.get(attr) != value:
            study.set_user_attr(attr, value)
