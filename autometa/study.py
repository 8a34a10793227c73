"""The search: an Optuna study over meta-algorithm × fusion × encoders and their hyperparameters.

One study per (dataset fingerprint, protocol) in the database, resumable: ``trials`` is the
study's total budget. Every trial trains on the training pool and is scored on the split's
fixed validation tasks; only the leaderboard's finalists are scored on the test tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import logging
import math
import platform
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import optuna
import torch
from optuna.trial import FixedTrial, TrialState
from tqdm.auto import tqdm

from autometa import __version__, crossmodal, schema, warmstart
from autometa.artifacts import folder_name, one_line, save_model
from autometa.components import MASK_PREFIX, Backbone, MetaAlgorithm
from autometa.data import Dataset, load_dataset
from autometa.errors import AutometaError, PluginError, SearchError
from autometa.evaluation import INTERVALS, Baseline, Score, baselines, caveats, evaluate, score_unit
from autometa.metafeatures import describe
from autometa.plugins import Registry, get_registry
from autometa.tasks import Split, choose_protocol, make_split
from autometa.workers import (
    Slot, budget_used, checkpoint, recover_orphans, resolve_devices, run_pool, storage_for, worker_label,
)

DEFAULT_DB = "sqlite:///studies.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
logger = logging.getLogger("autometa.study")


@dataclass
class Config:
    """One point of the search space, in plugin terms."""

    meta_algorithm: str
    fusion: str
    encoders: dict[str, str]
    meta_params: dict[str, Any] = field(default_factory=dict)
    fusion_params: dict[str, Any] = field(default_factory=dict)
    encoder_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Weight of the backbone's cross-modal mapping loss; 0: no mapper (see autometa.crossmodal).
    crossmodal_weight: float = 0.0

    def label(self) -> str:
        encoders = ", ".join(f"{m}={e}" for m, e in self.encoders.items())
        return f"{self.meta_algorithm} + {self.fusion} [{encoders}]{crossmodal.label_suffix(self.crossmodal_weight)}"


def sample_config(trial: optuna.Trial | FixedTrial, registry: Registry, choices: dict[str, list[str]]) -> Config:
    """Define-by-run space: components first, then each chosen one's namespaced parameters."""
    meta = trial.suggest_categorical("meta_algorithm", choices["meta_algorithm"])
    fusion = trial.suggest_categorical("fusion", choices["fusion"])
    modalities = [key.split(".", 1)[1] for key in choices if key.startswith("encoder.")]
    encoders = {m: trial.suggest_categorical(f"encoder.{m}", choices[f"encoder.{m}"]) for m in modalities}
    meta_cls = registry.get("meta_algorithm", meta).cls
    return Config(
        meta,
        fusion,
        encoders,
        meta_cls.suggest(trial, f"meta.{meta}."),
        registry.get("fusion", fusion).cls.suggest(trial, f"fusion.{fusion}."),
        {m: registry.get("encoder", e).cls.suggest(trial, f"encoder.{m}.{e}.") for m, e in encoders.items()},
        crossmodal.suggest_weight(trial, modalities) if meta_cls.uses_auxiliary_loss else 0.0,
    )


def stored_config(params: Mapping[str, Any], registry: Registry, choices: dict[str, list[str]]) -> Config:
    """The configuration of a stored trial (trials stored before cross-modal mapping existed had none)."""
    return sample_config(FixedTrial({**crossmodal.DEFAULT_PARAMS, **params}), registry, choices)


def search_choices(
    registry: Registry, protocol: str, modalities: list[str], include: Mapping[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """The components a study chooses among: every available one, or those in ``include``.

    ``include`` maps "meta_algorithm", "fusion" or "encoder.<modality>" to allowed names.
    Optuna cannot change a study's choices, so they are stored and compared on resume.
    """
    include = dict(include or {})
    pools = {
        "meta_algorithm": ("meta_algorithm", registry.meta_algorithms_for(protocol)),
        "fusion": ("fusion", list(registry.components["fusion"].values())),
        **{f"encoder.{m}": ("encoder", registry.encoders_for(m)) for m in modalities},
    }
    unknown = set(include) - set(pools)
    if unknown:
        raise SearchError(
            f"cannot restrict {', '.join(sorted(unknown))}: this data has modalities {', '.join(modalities)}"
        )
    choices = {}
    for key, (kind, infos) in pools.items():
        usable = {i.name: i for i in infos}
        if key in include:
            for name in include[key]:
                info = registry.get(kind, name)  # unknown names: error listing what exists
                if name not in usable:
                    raise SearchError(f"{kind.replace('_', '-')} {name!r} does not support this data's {protocol} protocol / modality")
                reason = info.cls.unavailable()
                if reason:
                    raise SearchError(f"{kind.replace('_', '-')} {name!r} is unavailable: {reason}")
            choices[key] = sorted(set(include[key]))
        else:
            # Sorted: entry-point load order may differ between machines, a study's choices may not.
            choices[key] = sorted(n for n, i in usable.items() if not i.cls.unavailable())
        if not choices[key]:
            raise SearchError(
                f"no installed plugin provides {key.replace('_', '-')} for the {protocol} protocol; "
                "run `autometa plugins` to see what is installed"
            )
    return choices


def default_trials(registry: Registry, choices: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One trial per meta-algorithm with every component at its default parameters.

    A new study starts with these (as auto-sklearn starts from defaults), so even a tiny
    budget scores each learner once at sensible settings before the sampler explores. The
    default fusion is concat when allowed; an encoder's default is the first one registered.
    """
    fusion = "concat" if "concat" in choices["fusion"] else choices["fusion"][0]
    shared: dict[str, Any] = {"fusion": fusion, **_defaults(registry.get("fusion", fusion).cls, f"fusion.{fusion}.")}
    for key, names in choices.items():
        if key.startswith("encoder."):
            m = key.split(".", 1)[1]
            e = next(i.name for i in registry.encoders_for(m) if i.name in names)
            shared[key] = e
            shared.update(_defaults(registry.get("encoder", e).cls, f"encoder.{m}.{e}."))
    multimodal = sum(key.startswith("encoder.") for key in choices) >= 2
    return [
        {"meta_algorithm": name, **shared, **_defaults(registry.get("meta_algorithm", name).cls, f"meta.{name}."),
         **(crossmodal.DEFAULT_PARAMS if multimodal and registry.get("meta_algorithm", name).cls.uses_auxiliary_loss else {})}
        for name in choices["meta_algorithm"]
    ]


def configuration_seed(study_seed: int, params: Mapping[str, Any]) -> int:
    """The training seed of a configuration (its sampled parameters) in a study seeded ``study_seed``.

    Keyed on the configuration, not the trial number, so a configuration scores the same in
    whichever trial, worker or study (same data, same seed) runs it: a warm-started or resumed
    search that repeats a configuration reproduces its score instead of drawing a new one.
    """
    key = json.dumps([study_seed, dict(params)], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")  # < 2**32: numpy's limit


def _defaults(cls: type, prefix: str) -> dict[str, Any]:
    signature = inspect.signature(cls.__init__).parameters
    return {prefix + key: signature[key].default for key in cls.search_space}


def _plugin_call(registry: Registry, kind: str, name: str, build: Callable[[], Any]) -> Any:
    """Run plugin code, turning its failure into an error that names the plugin."""
    try:
        return build()
    except AutometaError:
        raise
    except Exception as exc:
        info = registry.get(kind, name)
        raise PluginError(
            f"{kind.replace('_', '-')} {name!r} from plugin {info.plugin!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def train(
    config: Config,
    split: Split,
    *,
    seed: int,
    steps: int,
    eval_every: int,
    registry: Registry,
    report: Callable[[int, float], None] | None = None,
) -> tuple[MetaAlgorithm, Score]:
    """Build the model for ``config``, meta-train it and return it with its validation score."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = split.pool
    specs = pool.features.specs
    input_keys = {}
    for m, e in config.encoders.items():
        cls = registry.get("encoder", e).cls
        key = None
        if cls.derives_input():
            key = _plugin_call(registry, "encoder", e, lambda: pool.features.add_derived(split.dataset, m, cls, split.row_splits["train"]))
        input_keys[m] = key or m
    encoders = {
        m: _plugin_call(
            registry, "encoder", e,
            lambda m=m, e=e: registry.get("encoder", e).cls(specs[input_keys[m]], **config.encoder_params.get(m, {})),
        )
        for m, e in config.encoders.items()
    }
    fusion = _plugin_call(
        registry, "fusion", config.fusion,
        lambda: registry.get("fusion", config.fusion).cls({m: enc.out_dim for m, enc in encoders.items()}, **config.fusion_params),
    )
    backbone = Backbone(encoders, fusion, input_keys, crossmodal_weight=config.crossmodal_weight).to(pool.device)
    _probe(backbone, pool, config, registry)
    algorithm = _plugin_call(
        registry, "meta_algorithm", config.meta_algorithm,
        lambda: registry.get("meta_algorithm", config.meta_algorithm).cls(**config.meta_params),
    )
    _plugin_call(registry, "meta_algorithm", config.meta_algorithm,
                 lambda: algorithm.setup(backbone, pool, (split.ways, split.shots, split.queries)))
    score = None
    for step in range(1, steps + 1):
        loss = _plugin_call(registry, "meta_algorithm", config.meta_algorithm, lambda: algorithm.train_step(pool, rng))
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            info = registry.get("meta_algorithm", config.meta_algorithm)
            raise PluginError(
                f"meta-algorithm {config.meta_algorithm!r} from plugin {info.plugin!r}: train_step returned "
                f"{type(loss).__name__}, not the training loss as a number"
            ) from None
        if not math.isfinite(loss):
            raise TrialDiverged(f"training loss became {loss} at step {step}; the learning rates are likely too high")
        if step % eval_every == 0 or step == steps:
            score = _plugin_call(registry, "meta_algorithm", config.meta_algorithm, lambda: evaluate(algorithm, split.validation))
            if report is not None:
                report(step, score.mean)
    return algorithm, score


def _probe(backbone: Backbone, pool, config: Config, registry: Registry) -> None:
    """Run each encoder and the fusion on two training rows, so a plugin that fails or returns
    the wrong shape is named before a meta-algorithm's traceback would hide it."""
    rows = torch.as_tensor(pool.rows[:2], device=pool.device)
    inputs = pool.features.take(rows)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the trial's random state is not touched
        embeddings = {}
        for m, encoder in backbone.encoders.items():
            name = config.encoders[m]
            out = _plugin_call(registry, "encoder", name, lambda: encoder(inputs[backbone.input_keys[m]]))
            _expect_shape(registry, "encoder", name, out, (len(rows), encoder.out_dim))
            embeddings[m] = out
        masks = {m: inputs[MASK_PREFIX + m] for m in backbone.encoders if MASK_PREFIX + m in inputs}
        fused = _plugin_call(registry, "fusion", config.fusion, lambda: backbone.fusion(embeddings, masks or None))
        _expect_shape(registry, "fusion", config.fusion, fused, (len(rows), backbone.fusion.out_dim))


def _expect_shape(registry: Registry, kind: str, name: str, tensor, expected: tuple[int, int]) -> None:
    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
    if shape != expected:
        info = registry.get(kind, name)
        raise PluginError(
            f"{kind} {name!r} from plugin {info.plugin!r} returned shape {shape} for {expected[0]} rows; expected {expected} "
            "([batch, out_dim])"
        )


class TrialDiverged(AutometaError):
    """Training produced a non-finite loss."""


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
            "baselines": [b.as_dict() for b in self.baselines],
            "warnings": self.warnings,
            "model": str(self.model_path) if self.model_path else None,
        }


def open_study(name: str, storage, db: str, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    try:
        return optuna.create_study(
            study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
        )
    except AutometaError:
        raise
    except Exception as exc:
        raise SearchError(f"cannot open the study database {db}: {type(exc).__name__}: {exc}") from exc


@dataclass
class SearchSpec:
    """How to rebuild a search's split and space anywhere: in a worker process or on another
    machine (stored with the study for `autometa worker`)."""

    data: str | None
    label: str
    group: str | None
    columns: dict[str, str]
    image_size: tuple[int, int]
    protocol: str
    ways: int
    shots: int
    queries: int
    validation_tasks: int
    test_tasks: int
    seed: int
    choices: dict[str, list[str]]
    steps: int
    eval_every: int
    budget: int
    fingerprint: str = ""  # the data's (specs stored before study keys lack it)

    def settings(self) -> dict[str, Any]:
        """What makes a study one experiment: everything that changes its split or its
        objective. Not the budget, the timeouts or the devices, nor where the data file lies;
        nor settings its protocol ignores (ways on the standard protocol, task counts outside
        few-shot, the image size without images)."""
        found = {
            "label": self.label, "group": self.group, "columns": self.columns, "protocol": self.protocol,
            "seed": self.seed, "shots": self.shots, "queries": self.queries, "steps": self.steps,
            "eval_every": self.eval_every, "choices": self.choices,
        }
        if self.protocol != "standard":
            found["ways"] = self.ways
        if self.protocol == "fewshot":
            found.update(validation_tasks=self.validation_tasks, test_tasks=self.test_tasks)
        if "image" in self.columns.values():
            found["image_size"] = "×".join(map(str, self.image_size))
        return found

    def key(self) -> str:
        """A short hash of the data's fingerprint and :meth:`settings`: the study's identity."""
        text = json.dumps([self.fingerprint, self.settings()], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SearchSpec":
        data = dict(data)
        data["image_size"] = tuple(data["image_size"])
        return cls(**data)


class TrialRunner:
    """Optuna's objective: sample a configuration, meta-train it, return validation accuracy."""

    def __init__(self, split: Split, registry: Registry, spec: SearchSpec, device: str, *, label: str = "",
                 events=None, parent_pid: int | None = None, bar=None, cache: dict | None = None, top_k: int = 3):
        self.split, self.registry, self.spec, self.device = split, registry, spec, device
        self.label, self.events, self.parent_pid, self.bar = label or device, events, parent_pid, bar
        self.cache, self.top_k = cache, top_k
        self.stop_requested = False

    def _emit(self, *event) -> None:
        if self.events is not None:
            self.events.put(event)

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.spec
        try:
            config = sample_config(trial, self.registry, spec.choices)
        except Exception as exc:  # a plugin's suggest() or a queued value outside the choices
            trial.set_user_attr("wall_time_s", 0.0)
            trial.set_user_attr("fail_reason", f"sampling the configuration failed: {failure_reason(exc, self.device)}")
            raise
        trial_seed = configuration_seed(spec.seed, trial.params)
        for key, value in (("seed", trial_seed), ("device", self.device), ("steps", spec.steps),
                           ("worker", self.label), ("pid", os.getpid()), ("host", platform.node())):
            trial.set_user_attr(key, value)
        self._emit("start", self.label, trial.number, config.label())
        if self.bar is not None:
            self.bar.set_description(f"trial {trial.number}: {config.label()}")
        started = time.perf_counter()

        def report(step: int, value: float) -> None:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.stop_requested = True  # the search process is gone: leave the trial for recovery
                raise SystemExit(0)
            trial.report(value, step)
            self._emit("step", self.label, trial.number, step, spec.steps, value)
            if self.bar is not None:
                self.bar.set_postfix_str(f"step {step}/{spec.steps} val {100 * value:.1f}%")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (validation {100 * value:.1f}%)")

        try:
            algorithm, score = train(
                config, self.split, seed=trial_seed, steps=spec.steps, eval_every=spec.eval_every,
                registry=self.registry, report=report,
            )
        except optuna.TrialPruned as exc:
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            trial.set_user_attr("prune_reason", str(exc))
            raise
        except Exception as exc:
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            trial.set_user_attr("fail_reason", failure_reason(exc, self.device))
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            raise
        finally:
            self._emit("end", self.label, trial.number)
        trial.set_user_attr("wall_time_s", time.perf_counter() - started)
        trial.set_user_attr("parameters", count_parameters(algorithm))
        if self.cache is not None:
            _keep_best(self.cache, trial.number, score.mean, algorithm, self.top_k)
        return score.mean


def failure_reason(exc: BaseException, device: str) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory on {device}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return str(exc) if isinstance(exc, AutometaError) else f"{type(exc).__name__}: {exc}"


def default_sampler(spec: SearchSpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """Multivariate, grouped TPE (the space is conditional), liar-aware for parallel workers."""
    with warnings.catch_warnings():  # multivariate/group are stable in practice, still flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            multivariate=True, group=True, seed=spec.seed + offset,
            n_startup_trials=min(10, max(3, spec.budget // 3)), constant_liar=True,
        )


def default_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=spec.eval_every)


def build_runner(
    slot: Slot, spec: SearchSpec, dataset: Dataset | None, sampler=None, pruner=None, existing: int = 0, *,
    events=None, parent_pid=None,
) -> TrialRunner:
    """A worker's objective: rebuild the (deterministic) split on the worker's device.

    Each worker samples with its own seed, so parallel workers do not propose the same trials.
    """
    if dataset is None:
        if spec.data is None:
            raise SearchError("this search's data was passed as an object, so it cannot be reloaded; give a file path")
        dataset = load_dataset(spec.data, spec.label, group=spec.group, columns=spec.columns, image_size=spec.image_size)
    split = make_split(
        dataset, spec.protocol, ways=spec.ways, shots=spec.shots, queries=spec.queries,
        validation_tasks=spec.validation_tasks, test_tasks=spec.test_tasks, seed=spec.seed, device=slot.device,
    )
    runner = TrialRunner(split, get_registry(), spec, slot.device, label=slot.label, events=events, parent_pid=parent_pid)
    offset = 7919 * existing + 104729 * (slot.index + 1) + 31 * sum(map(ord, slot.device)) + os.getpid() % 997
    runner.sampler = sampler or default_sampler(spec, offset)
    runner.pruner = pruner or default_pruner(spec)
    return runner


def study_name_for(dataset: Dataset, spec: SearchSpec) -> str:
    """``DATASET-PROTOCOL-KEY``: one study per data and settings (see :meth:`SearchSpec.key`)."""
    return f"{dataset.name}-{spec.protocol}-{spec.key()}"


def study_name(data: str | Path | Dataset, label: str | None = None, **options: Any) -> str:
    """The study ``search(data, label, **options)`` opens: its ``study`` option, else the name of
    its data and settings (the search's defaults fill the options not given)."""
    args = inspect.signature(search).bind(data, label, **options)
    args.apply_defaults()
    a = args.arguments
    if a["study"]:
        return a["study"]
    dataset, data_path = _load(data, label, a["group"], a["columns"], a["image_size"])
    spec = _spec(dataset, data_path, get_registry(), **{k: a[k] for k in _SPEC_OPTIONS})
    return study_name_for(dataset, spec)


_SPEC_OPTIONS = ("protocol", "include", "image_size", "ways", "shots", "queries", "validation_tasks", "test_tasks",
                 "seed", "steps", "eval_every", "trials")


def _load(data, label, group, columns, image_size) -> tuple[Dataset, str | None]:
    if isinstance(data, Dataset):
        return data, None
    if label is None:
        raise SearchError("a label column is required (--label NAME)")
    dataset = load_dataset(data, label, group=group, columns=columns, image_size=image_size)
    return dataset, str(Path(data).resolve())


def _spec(dataset: Dataset, data_path: str | None, registry: Registry, *, protocol, include, image_size, ways, shots,
          queries, validation_tasks, test_tasks, seed, steps, eval_every, trials) -> SearchSpec:
    protocol = choose_protocol(dataset, protocol)
    return SearchSpec(
        data_path, dataset.label_column, dataset.group_column, {c.name: c.modality for c in dataset.columns},
        tuple(image_size), protocol, ways, shots, queries, validation_tasks, test_tasks, seed,
        search_choices(registry, protocol, dataset.modalities, include), steps, eval_every, trials, dataset.fingerprint,
    )


class _TrainingMetaFeatures:
    """The meta-features of the split's training rows, computed once when first asked for.

    Training rows only: warm start seeds this search from them, so nothing about its
    validation or test rows (their labels included) may reach them.
    """

    def __init__(self, dataset: Dataset, split: Split):
        self.dataset, self.split, self.value = dataset, split, None

    def __call__(self) -> dict[str, float]:
        if self.value is None:
            self.value = describe(self.dataset.subset(self.split.row_splits["train"]))
        return self.value


def search(
    data: str | Path | Dataset,
    label: str | None = None,
    *,
    group: str | None = None,
    columns: Mapping[str, str] | None = None,
    protocol: str = "auto",
    trials: int = 30,
    timeout: float | None = None,
    seed: int = 0,
    db: str = DEFAULT_DB,
    study: str | None = None,
    devices: str = "auto",
    trials_per_device: int = 1,
    trial_timeout: float | None = None,
    isolate: bool = True,
    steps: int = 300,
    eval_every: int = 50,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    validation_tasks: int = 100,
    test_tasks: int = 600,
    top_k: int = 3,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    image_size: tuple[int, int] = (28, 28),
    include: Mapping[str, list[str]] | None = None,
    output: str | Path | None = "autometa-output",
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    defaults: bool = True,
    warm_start: bool = True,
    warm_start_k: int = warmstart.DEFAULT_K,
    warm_start_configs: int = warmstart.DEFAULT_CONFIGS,
    warm_start_prior: str | Path | None = warmstart.PRIOR_PATH,
) -> SearchResult:
    """Search encoders × fusion × meta-algorithm on ``data`` and report the best on test tasks.

    Trials run in worker processes, ``trials_per_device`` on each of ``devices`` (``isolate``:
    a crash, out-of-memory abort or ``trial_timeout`` fails only that trial); ``isolate=False``
    runs them in this process, one at a time.

    ``defaults``: a new study runs one trial per meta-algorithm at default parameters before
    the sampler explores (False: the sampler chooses every trial). ``warm_start``: a new
    study's first trials are the best configurations of the
    ``warm_start_k`` most similar datasets in ``db`` and ``warm_start_prior`` (None: the
    database only), ``warm_start_configs`` in all (see :mod:`autometa.warmstart`).
    """
    say = echo or (lambda msg: print(msg, file=sys.stderr))
    if warm_start and (warm_start_k < 1 or warm_start_configs < 1):
        raise SearchError("--warm-start-k and --warm-start-configs must be at least 1")
    if trials < 1:
        raise SearchError("--trials must be at least 1")
    if steps < 1 or eval_every < 1:
        raise SearchError("--steps and --eval-every must be at least 1")
    if trial_timeout is not None and trial_timeout <= 0:
        raise SearchError("--trial-timeout must be positive")
    if output is not None:
        _check_output_folder(Path(output))
    slots = resolve_devices(devices, trials_per_device)
    if not isolate and len(slots) > 1:
        raise SearchError("several workers need isolated worker processes; drop isolate=False")
    if not isolate and trial_timeout is not None:
        raise SearchError("--trial-timeout needs isolated worker processes")
    device = torch.device(slots[0].device)
    registry = get_registry()
    dataset, data_path = _load(data, label, group, columns, image_size)
    say(dataset.summary())
    spec = _spec(dataset, data_path, registry, protocol=protocol, include=include, image_size=image_size, ways=ways,
                 shots=shots, queries=queries, validation_tasks=validation_tasks, test_tasks=test_tasks, seed=seed,
                 steps=steps, eval_every=eval_every, trials=trials)
    choices = spec.choices
    # Encoders that derive their own inputs (e.g. pretrained embeddings) do so when first chosen.
    split = make_split(
        dataset, spec.protocol, ways=ways, shots=shots, queries=queries,
        validation_tasks=validation_tasks, test_tasks=test_tasks, seed=seed, device=device,
    )
    say(split.describe())
    name = study or study_name_for(dataset, spec)
    meta_features = _TrainingMetaFeatures(dataset, split)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(db)
    schema.recording_engine(db)  # autometa's tables: made, upgraded from 0.1, or a newer schema refused
    existing = finished_trials(name, storage)
    custom = (sampler, pruner)
    # A resumed study gets a new seed so it does not replay the first random trials.
    sampler = sampler or default_sampler(spec, offset=7919 * existing)
    pruner = pruner or default_pruner(spec)
    optuna_study = open_study(name, storage, db, sampler, pruner)
    _check_resume(optuna_study, dataset, name, spec, meta_features)
    recover_orphans(optuna_study, say)
    existing = finished_trials(name, storage)

    remaining = trials - existing
    where = ", ".join(s.label for s in slots) if isolate else str(device)
    if existing:
        say(f"study {name!r} resumed: {existing} trial(s) already finished, {max(0, remaining)} of the budget of {trials} left")
    else:
        say(f"study {name!r} in {db}: {trials} trial(s) on {where}")

    if not optuna_study.get_trials(deepcopy=False):
        seeded = 0
        if warm_start and remaining > 0:
            # Before the defaults: with a tiny budget, the neighbours' best take the first slots.
            seeded = warmstart.seed_study(
                optuna_study, optuna_study.user_attrs.get("meta_features") or meta_features(), registry, choices,
                db=db, prior=warm_start_prior, k=warm_start_k, configs=min(warm_start_configs, remaining), say=say,
                fingerprint=dataset.fingerprint,
            )
        if defaults:
            for params in default_trials(registry, choices)[: max(0, remaining - seeded)]:
                optuna_study.enqueue_trial(params, skip_if_exists=True)
    # Every run of the search is a row of autometa_searches (a resumed one adds another).
    search_id = schema.begin_search(
        db, study=name, dataset=dataset, source=data_path or (str(dataset.path) if dataset.path else None),
        protocol=split.protocol, budget=trials, seed=seed, plugins=schema.plugin_versions(registry, choices),
        host=host_info(), autometa_version=__version__,
        describe=lambda d: optuna_study.user_attrs.get("meta_features") or meta_features(),  # computed once
    )
    try:
        cache: dict[int, tuple[float, MetaAlgorithm]] = {}
        if remaining > 0:
            if isolate:
                _optimize_pool(optuna_study, db, slots, spec, dataset, custom, existing, remaining, timeout, trial_timeout,
                               registry, progress, say)
            else:
                runner = TrialRunner(split, registry, spec, str(device), cache=cache, top_k=top_k)
                _optimize_here(optuna_study, runner, remaining, timeout, registry, choices, progress, say, db)

        leaderboard = _leaderboard(optuna_study, split, registry, choices, top_k, steps, eval_every, cache, say)
        plain = baselines(split)
        optuna_study.set_user_attr("leaderboard", [e.as_dict() for e in leaderboard])
        optuna_study.set_user_attr("baselines", [b.as_dict() for b in plain])
        optuna_study.set_user_attr("test_warnings", caveats(split))
        schema.record_finalists(db, name, [e.as_dict() for e in leaderboard], [b.as_dict() for b in plain])
        model_path = None
        if output is not None and leaderboard:
            best = leaderboard[0]
            model_path = save_model(
                Path(output) / folder_name(name), best.algorithm, best.config, split, registry=registry, study=name,
                label=dataset.label_column, image_size=image_size,
                scores={"validation": best.validation, **best.test.as_dict(), "trial": best.trial},
            )
            optuna_study.set_user_attr("model_path", str(model_path.resolve()))
            say(f"best model (trial {best.trial}) saved to {model_path}; use it with `autometa predict {model_path} DATA`")
    except KeyboardInterrupt:
        schema.end_search(db, search_id, "interrupted")
        raise
    except BaseException:
        schema.end_search(db, search_id, "failed")
        raise
    schema.end_search(db, search_id, "finished")
    checkpoint(db)
    return SearchResult(optuna_study, dataset, split, leaderboard, plain, max(0, remaining), model_path)


def _check_output_folder(folder: Path) -> None:
    """Before any trial runs: the folder the model goes to can be made (or is there)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise SearchError(f"--output {folder}: {existing} is a file, not a folder; pass another --output")
    if not os.access(existing, os.W_OK):
        raise SearchError(f"--output {folder}: folder {existing} is not writable; pass another --output")


def finished_trials(name: str, storage: optuna.storages.BaseStorage) -> int:
    """Trials of study ``name`` that count against its budget (0 when there is no such study)."""
    if not any(s.study_name == name for s in storage.get_all_studies()):
        return 0
    return budget_used(optuna.load_study(study_name=name, storage=storage), running=False)


def _check_resume(study: optuna.Study, dataset: Dataset, name: str, spec: SearchSpec, meta_features) -> None:
    """Record a new study's settings; refuse to go on with an existing one searched on other
    data or settings (its trials would be ranked against another split's validation rows)."""
    attrs = study.user_attrs
    if "fingerprint" not in attrs:
        study.set_user_attr("spec", spec.to_json())  # for `autometa worker` on other machines
        study.set_user_attr("fingerprint", dataset.fingerprint)
        study.set_user_attr("dataset", dataset.name)
        study.set_user_attr("label", dataset.label_column)
        study.set_user_attr("protocol", spec.protocol)
        study.set_user_attr("columns", spec.columns)
        study.set_user_attr("choices", spec.choices)
        study.set_user_attr("autometa_version", __version__)
        study.set_user_attr("host", host_info())
        study.set_user_attr("meta_features", meta_features())
        return
    if attrs["fingerprint"] != dataset.fingerprint:
        raise SearchError(
            f"study {name!r} was created for other data (fingerprint {attrs['fingerprint'][:10]}); "
            "drop --study to open this data's own study, or pass a new --study name"
        )
    try:
        stored = SearchSpec.from_json(attrs["spec"]).settings()
    except (KeyError, TypeError):
        stored = {"choices": attrs.get("choices")}  # a study from before its settings were stored
    stored, current = _flat_settings(stored), _flat_settings(spec.settings())
    differing = [key for key in sorted(set(stored) | set(current)) if stored.get(key) != current.get(key)]
    if differing:
        raise SearchError(
            f"study {name!r} was created with other settings ("
            + "; ".join(f"{_setting(key)} {_shown_setting(stored.get(key))}, now {_shown_setting(current.get(key))}"
                        for key in differing)
            + "); drop --study to search these settings in a study of their own, or pass a new --study name"
        )
    study.set_user_attr("spec", spec.to_json())  # the latest budget and data path, for `autometa worker`


def _flat_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with each component's choices as a setting of its own, so a refusal names it."""
    choices = settings.get("choices") or {}
    return {**{k: v for k, v in settings.items() if k != "choices"}, **{f"choices.{k}": v for k, v in choices.items()}}


def _setting(key: str) -> str:
    if key.startswith("choices."):
        what = key.split(".", 1)[1]
        option = f"--encoder {what.split('.', 1)[1]}=" if what.startswith("encoder.") else "--" + what.replace("_", "-")
        return f"{option} choices"
    return {"columns": "column types"}.get(key, "--" + key.replace("_", "-"))


def _shown_setting(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def _trial_line(frozen: optuna.trial.FrozenTrial, registry: Registry, choices: dict) -> str:
    took = frozen.user_attrs.get("wall_time_s", 0.0)
    if frozen.state == TrialState.COMPLETE:
        outcome = f"validation {100 * frozen.value:.1f}%"
    elif frozen.state == TrialState.PRUNED:
        outcome = frozen.user_attrs.get("prune_reason", "pruned")
    else:
        outcome = f"failed: {frozen.user_attrs.get('fail_reason', 'see log')}"
    config = stored_config(frozen.params, registry, choices) if frozen.params else None
    where = f" on {worker_label(frozen.user_attrs)}" if "worker" in frozen.user_attrs else ""
    return f"trial {frozen.number:>3} {outcome} ({took:.1f}s{where}) {config.label() if config else ''}"


def _optimize_here(study, runner: TrialRunner, n_trials, timeout, registry, choices, progress, say, db):
    """Trials one after another in this process (no isolation)."""
    bar = tqdm(total=n_trials, desc="search", unit="trial", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    runner.bar = bar

    def on_trial_end(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        bar.write(_trial_line(frozen, registry, choices), file=sys.stderr)
        try:
            bar.set_postfix_str(f"best {100 * study.best_value:.1f}%")
        except ValueError:
            pass

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report every trial
    try:
        study.optimize(runner, n_trials=n_trials, timeout=timeout, catch=(Exception,),
                       callbacks=[schema.TrialRecorder(db), on_trial_end])
    except KeyboardInterrupt:
        say("interrupted: finished trials are saved; run the same command again to resume")
        raise
    finally:
        optuna.logging.set_verbosity(level)
        bar.close()


def _optimize_pool(study, db, slots, spec, dataset, custom, existing, n_trials, timeout, trial_timeout, registry, progress, say):
    """Trials on isolated worker processes, one per device slot, with a live status per device."""
    bar = tqdm(total=n_trials, desc="search", unit="trial", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    status: dict[str, str] = {s.label: "starting" for s in slots}
    printed = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}

    def on_event(event: tuple) -> None:
        kind, label = event[0], event[1]
        if kind == "start":
            status[label] = f"trial {event[2]}"
        elif kind == "step":
            status[label] = f"trial {event[2]} step {event[3]}/{event[4]} val {100 * event[5]:.1f}%"
        elif kind == "end":
            status[label] = "idle"
        elif kind == "error":
            say(f"worker {label} could not start: {event[2]}")
        bar.set_description(" | ".join(f"{k}: {v}" for k, v in status.items()))

    def on_poll() -> None:
        for frozen in study.get_trials(deepcopy=False, states=FINISHED):
            if frozen.number not in printed:
                printed.add(frozen.number)
                bar.update(1)
                bar.write(_trial_line(frozen, registry, spec.choices), file=sys.stderr)
                try:
                    bar.set_postfix_str(f"best {100 * study.best_value:.1f}%")
                except ValueError:
                    pass

    # A worker rebuilds the split from the data; a file path is enough, else the data travels.
    payload = None if spec.data is not None else dataset
    try:
        run_pool(
            study, db, slots, n_trials, build_runner, (spec, payload, *custom, existing),
            timeout=timeout, trial_timeout=trial_timeout, on_event=on_event, on_poll=on_poll, say=say,
        )
        on_poll()
    except KeyboardInterrupt:
        say("interrupted: finished trials are saved; running ones were marked failed; run the same command again to resume")
        raise
    finally:
        bar.close()


def _keep_best(cache: dict[int, tuple[float, MetaAlgorithm]], number: int, value: float, algorithm: MetaAlgorithm,
               top_k: int) -> None:
    """Keep the ``top_k`` best trained models of this run (by validation), so the leaderboard
    need not retrain them."""
    cache[number] = (value, algorithm)
    for stale in sorted(cache, key=lambda n: cache[n][0], reverse=True)[top_k:]:
        del cache[stale]


def count_parameters(algorithm: MetaAlgorithm) -> int:
    return sum(p.numel() for m in algorithm.modules().values() for p in m.parameters())


def _leaderboard(study, split, registry, choices, top_k, steps, eval_every, cache, say) -> list[LeaderboardEntry]:
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    chosen, seen = [], set()
    for t in complete:
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            chosen.append(t)
        if len(chosen) == top_k:
            break
    if not chosen:
        say("no trial completed: nothing to evaluate on the test tasks (see the failure reasons above)")
        return []
    say(f"scoring the top {len(chosen)} configuration(s) on {len(split.test)} held-out test task(s)")
    entries = []
    for rank, t in enumerate(chosen, start=1):
        config = stored_config(t.params, registry, choices)
        algorithm = cache[t.number][1] if t.number in cache else None
        if algorithm is None:  # trained in an earlier run: retrain it from its parameters and seed
            algorithm, _ = train(
                config, split, seed=t.user_attrs.get("seed", t.number), steps=t.user_attrs.get("steps", steps),
                eval_every=eval_every, registry=registry,
            )
        test = evaluate(algorithm, split.test, score_unit(split))
        parameters = count_parameters(algorithm)
        entries.append(LeaderboardEntry(rank, t.number, config, t.value, test, parameters, algorithm))
    return entries


def host_info() -> dict[str, str]:
    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__}
