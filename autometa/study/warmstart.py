"""Warm start: begin a new search with what worked on the most similar datasets seen before.

Experiences come from two places: the user's study database (every search records its dataset
and meta-features) and the prior that ships with autometa (``prior/knowledge.json``, built by
``autometa kb build`` + ``autometa kb export`` from a public collection of tables). The same
dataset in both counts once, the user's own searches winning.

A new dataset is compared with them by a distance over meta-features that is defined across
modalities (:func:`autometa.data.metafeatures.meta_feature_distance`, with the prior's fixed
scales). From the ``k`` nearest datasets within distance ``near`` that have a usable
configuration, their best distinct configurations are translated to this search (plugins
installed now, this data's modalities, this search's choices and ranges) round-robin: the
nearest dataset's best, the second nearest's best, ..., then each one's second best. Seeds the
neighbours do not fill (all of them when nothing is that near) come from the prior's portfolio,
configurations chosen to do well across its tasks (auto-sklearn 2.0's portfolio). Each seed
says which of the two it came from. The seeds alternate with the default trials as the new
study's first trials (:func:`opening`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from autometa.config import configuration_label, default_encoder, default_trials, sample_config
from autometa.data.loading import load_dataset
from autometa.data.metafeatures import describe, rank_by_meta_features
from autometa.errors import SearchError
from autometa.store import PRIOR_PATH
from autometa.store.knowledge import Experience, PortfolioEntry, distinct_best, gather
from autometa.study.objective import enqueue_new
from autometa.study.settings import WARM_START_CONFIGS, WARM_START_K

# The distance between datasets is autometa.data.metafeatures.rank_by_meta_features; the
# experiences (database, prior), the scales and the portfolio are autometa.store.knowledge's.

# Beyond this distance a stored dataset is not a neighbour (its configurations are no better a
# guess than the portfolio's). Set with the 25 tables' prior, where the other half of the same
# dataset lay at 0.16-0.25 and the nearest of the tables to each other at 0.05-1.28 (median 0.68).
# With the multimodal prior's scales: fastfood's halves at 0.17, the other text + table sets
# at 1.04-1.84 from fastfood, tables at 1.8 and more; digits' halves at 0.05. Not tuned.
NEAR = 1.0


# --- translation ----------------------------------------------------------------------------


class _Recorder:
    """Stands in for an Optuna trial while a plugin's ``suggest`` walks its space: answers with
    the stored value when this search's distribution contains it, and notes what it drops."""

    def __init__(self, values: Mapping[str, Any]):
        self.values, self.kept, self.dropped = dict(values), {}, []

    def _answer(self, name: str, distribution: BaseDistribution, fallback: Any) -> Any:
        if name in self.values:
            value = self.values[name]
            try:
                if distribution._contains(distribution.to_internal_repr(value)):  # noqa: SLF001 - no public check
                    self.kept[name] = value
                    return value
            except (ValueError, TypeError):
                pass
            self.dropped.append(name)
        return fallback  # left for the sampler to choose; only steers a conditional space here

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self._answer(name, FloatDistribution(low, high, step=step, log=log), low)

    def suggest_int(self, name, low, high, *, step=1, log=False):
        return self._answer(name, IntDistribution(low, high, step=step, log=log), low)

    def suggest_categorical(self, name, choices):
        return self._answer(name, CategoricalDistribution(choices), choices[0])


@dataclass
class Translation:
    params: dict[str, Any] | None  # None: not usable here (see note)
    note: str | None = None
    dropped: list[str] = field(default_factory=list)


def translate(params: Mapping[str, Any], registry, choices: Mapping[str, list[str]], protocol: str | None = None) -> Translation:
    """``params`` (stored Optuna parameters) as parameters of this search, or why it cannot be.

    Components must be installed, available and among this search's choices. Encoders map by
    modality: this data's modalities keep the stored encoder, take the default one where the
    stored data lacked the modality, and the stored data's other modalities are dropped.
    Hyperparameters are kept where this search's space has them and the value is in range;
    values out of range are left to the sampler, and parameters the stored configuration never
    had (a new modality's encoder, a newer plugin's option) take their defaults: this search's
    ``protocol``'s (``default_trials``), so a few-shot search fills a text column with a pretrained
    encoder where one declares ``default_for`` it.
    """
    fixed: dict[str, Any] = {}
    for key in ("meta_algorithm", "fusion"):
        name = params.get(key)
        if name is None:
            return Translation(None, f"records no {key.replace('_', '-')}")
        problem = _unusable(registry, key, name, choices[key])
        if problem:
            return Translation(None, problem)
        fixed[key] = name
        if key == "meta_algorithm" and registry.get("meta_algorithm", name).cls.fixed_features:
            break  # its fixed feature maps (fixed.* keys) are translated like hyperparameters below
    for key, names in choices.items():
        if not key.startswith("encoder.") or "fusion" not in fixed:
            continue
        modality = key.split(".", 1)[1]
        name = params.get(key)
        if name is None:  # the stored data lacked this modality: the default encoder, as default_trials has it
            name = default_encoder(registry, modality, names, protocol)
        else:
            problem = _unusable(registry, "encoder", name, names, modality)
            if problem:
                return Translation(None, problem)
        fixed[key] = name
    defaults: dict[str, Any] = {}
    for trial in default_trials(registry, dict(choices), protocol):
        defaults.update(trial)
    recorder = _Recorder({**defaults, **params, **fixed})
    sample_config(recorder, registry, dict(choices))
    return Translation(recorder.kept, dropped=recorder.dropped)


def _unusable(registry, kind: str, name: str, allowed: list[str], modality: str | None = None) -> str | None:
    what = f"{kind.replace('_', '-')} {name!r}" + (f" for {modality}" if modality else "")
    info = registry.components[kind].get(name)
    if info is None:
        return f"needs {what}, which no installed plugin provides (install the plugin that registers it)"
    reason = info.cls.unavailable()
    if reason:
        return f"needs {what} from plugin {info.plugin!r}, unavailable here: {reason}"
    if name not in allowed:
        return f"needs {what}, which this search does not use (protocol, modality or restriction)"
    return None


# --- the plan -------------------------------------------------------------------------------


@dataclass
class Seed:
    """One configuration to enqueue, and where it came from: a neighbour (``experience``) or the portfolio."""

    params: dict[str, Any]
    experience: Experience | None = None
    distance: float | None = None
    value: float | None = None  # its validation accuracy on that dataset
    portfolio: PortfolioEntry | None = None

    @property
    def source(self) -> str:
        return "neighbour" if self.experience is not None else "portfolio"

    def describe(self) -> str:
        if self.portfolio is not None:
            entry = self.portfolio
            return (f"{configuration_label(self.params)} from the portfolio (with the portfolio's entries before it, "
                    f"{100 * entry.coverage:.0f}% of the best over {entry.tasks} knowledge-base tasks; first found on "
                    f"{entry.origin})")
        origin = "prior" if self.experience.origin == "prior" else f"study {self.experience.study!r}"
        return (f"{configuration_label(self.params)} from neighbour {self.experience.name} ({origin}; distance "
                f"{self.distance:.2f}; validation {100 * self.value:.1f}% there)")

    def origin(self) -> str:
        """The ``warm_start`` user attribute of the seeded trial."""
        if self.portfolio is not None:
            return f"portfolio (first found on {self.portfolio.origin})"
        return f"{self.experience.name} ({self.experience.origin}, distance {self.distance:.3f})"


@dataclass
class WarmStart:
    seeds: list[Seed]
    notes: list[str]
    neighbours: list[tuple[Experience, float]]


def plan(
    meta_features: Mapping[str, Any],
    experiences: list[Experience],
    registry,
    choices: Mapping[str, list[str]],
    *,
    k: int = WARM_START_K,
    configs: int = WARM_START_CONFIGS,
    scales: Mapping[str, float] | None = None,
    portfolio: list[PortfolioEntry] = (),
    near: float = NEAR,
    protocol: str | None = None,
) -> WarmStart:
    """The configurations to seed: from the ``k`` nearest experiences within distance ``near``
    with a usable configuration, round-robin over them, then the ``portfolio`` in its order,
    until ``configs`` distinct ones are chosen, translated to this search's ``protocol``."""
    if k < 1 or configs < 1:
        raise SearchError("--warm-start-k and --warm-start-configs must be at least 1")
    ranked = rank_by_meta_features(meta_features, {str(i): e.meta_features for i, e in enumerate(experiences)}, scales)
    neighbours, notes = [], []
    for near_one in ranked:
        if near_one.distance > near or len(neighbours) == k:
            break
        experience = experiences[int(near_one.study)]
        usable = []
        for params, value in distinct_best(experience.configurations)[:configs]:
            translated = translate(params, registry, choices, protocol)
            if translated.params is None:
                notes.append(f"skipped {configuration_label(params)} from {experience.name}: {translated.note}")
            else:
                usable.append((translated.params, value))
        if usable:
            neighbours.append((experience, near_one.distance, usable))
    if not neighbours and ranked:
        nearest = experiences[int(ranked[0].study)]
        notes.append(f"no stored dataset within distance {near:.2f} (nearest: {nearest.name} at "
                     f"{ranked[0].distance:.2f})" + ("; seeding from the portfolio" if portfolio else ""))
    seeds, seen = [], set()

    def add(seed: Seed) -> None:
        key = json.dumps(seed.params, sort_keys=True, default=str)
        if key not in seen and len(seeds) < configs:  # two sources may agree after translation: seed it once
            seen.add(key)
            seeds.append(seed)

    for rank in range(configs):
        for experience, distance, usable in neighbours:
            if rank < len(usable):
                add(Seed(usable[rank][0], experience, distance, usable[rank][1]))
    for entry in portfolio:
        if len(seeds) == configs:
            break
        translated = translate(entry.params, registry, choices, protocol)
        if translated.params is None:
            notes.append(f"skipped {configuration_label(entry.params)} from the portfolio: {translated.note}")
        else:
            add(Seed(translated.params, portfolio=entry))
    return WarmStart(seeds, notes, [(e, d) for e, d, _ in neighbours])


# --- similar datasets -----------------------------------------------------------------------


def similar(data, label_column: str, *, db: str | None, prior: str | Path | None = PRIOR_PATH, k: int = 10,
            group: str | None = None, columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The stored datasets nearest to ``data`` (a file), nearest first, with their distances."""
    if k < 1:
        raise SearchError("--k must be at least 1")
    dataset = load_dataset(data, label_column, group=group, columns=columns)
    known = gather(db, prior)
    experiences = known.experiences
    ranked = rank_by_meta_features(describe(dataset), {str(i): e.meta_features for i, e in enumerate(experiences)},
                                   known.scales)
    rows = []
    for near in ranked[:k]:
        e = experiences[int(near.study)]
        best = e.configurations[0] if e.configurations else None
        rows.append({
            "rank": len(rows) + 1,
            "dataset": e.name,
            "distance": round(near.distance, 4),
            "shared_features": near.shared,
            "origin": e.origin,
            "study": e.study,
            "protocol": e.protocol,
            "source": e.source,
            "same_data": e.fingerprint == dataset.fingerprint,
            "best_validation": best[1] if best else None,
            "best_configuration": configuration_label(best[0]) if best else None,
        })
    return rows


def plan_seeds(study: optuna.Study, meta_features: Mapping[str, Any], registry, choices: Mapping[str, list[str]], *,
               db: str | None, prior: str | Path | None = PRIOR_PATH, k: int = WARM_START_K,
               configs: int = WARM_START_CONFIGS, say=print, fingerprint: str | None = None, near: float = NEAR,
               protocol: str | None = None) -> list[Seed]:
    """The warm-start configurations for ``study``, saying where they come from (queue them with
    :func:`enqueue_opening`).

    Searches of the same data (``fingerprint``) are left out: their configurations were chosen
    on validation rows that may be this split's test rows (another seed or protocol).
    """
    if prior is not None and Path(prior) == PRIOR_PATH and not PRIOR_PATH.is_file():
        say(f"warm start: the shipped prior is missing ({PRIOR_PATH}); using this database only")
        prior = None
    known = gather(db, prior, exclude_study=study.study_name)
    experiences = known.experiences
    same = [e for e in experiences if fingerprint is not None and e.fingerprint == fingerprint]
    if same:
        where = ", ".join(repr(e.study) if e.study else f"{e.name} (prior)" for e in same)
        say(f"warm start: left out {len(same)} earlier search(es) of this same data ({where}): their "
            "configurations were chosen on rows that may be this search's test rows")
        experiences = [e for e in experiences if e.fingerprint != fingerprint]
    if not experiences and not known.portfolio:
        say("warm start: no searched dataset to learn from yet")
        return []
    warm = plan(meta_features, experiences, registry, choices, k=k, configs=configs, scales=known.scales,
                portfolio=known.portfolio, near=near, protocol=protocol)
    for note in warm.notes:
        say(f"warm start: {note}")
    if not warm.seeds:
        say(f"warm start: none of the {len(experiences)} known datasets has a configuration usable here")
    return warm.seeds


def opening(defaults: list, seeds: list) -> list:
    """A new search's first trials: a default trial, a seed, the next default, the next seed, ...,
    then the rest of the longer list. Alternating, because neither source leads on its own:
    replayed on the 39 leave-one-out searches of docs/warm-start.md (validation scores only,
    `benchmarks/warm_start.py --openings`), seeds first reached 0.81 of the best after 3 trials and
    the defaults alone 0.86; alternating, 0.87 after 3 and 0.90 after 5 (0.89 and 0.88)."""
    return [item for i in range(max(len(defaults), len(seeds))) for item in defaults[i:i + 1] + seeds[i:i + 1]]


def enqueue_opening(study: optuna.Study, defaults: list[dict[str, Any]], seeds: list[Seed], budget: int, registry,
                    choices: Mapping[str, list[str]], say=print) -> int:
    """Queue :func:`opening` of the default trials' parameters and the seeds, at most ``budget``,
    none twice (a configuration already queued is skipped), saying which trials are seeds;
    returns how many were queued."""
    queued = 0
    sources = {"neighbour": 0, "portfolio": 0}
    for item in opening(defaults, seeds):
        if queued >= budget:
            break
        seed = item if isinstance(item, Seed) else None
        params = item.params if seed else item
        number = len(study.get_trials(deepcopy=False))
        attrs = {"warm_start": seed.origin(), "warm_start_source": seed.source} if seed else {}
        if not enqueue_new(study, params, registry, dict(choices), user_attrs=attrs):
            if seed is not None:
                say(f"warm start: {seed.describe()} is already queued as a default trial")
            continue
        queued += 1
        if seed is not None:
            sources[seed.source] += 1
            say(f"warm start: trial {number} is {seed.describe()}")
    if seeds:
        say(f"warm start: {sources['neighbour']} seed(s) from neighbours, {sources['portfolio']} from the portfolio")
    return queued
