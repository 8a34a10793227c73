"""The search: an Optuna study over meta-algorithm × fusion × encoders and their hyperparameters.

One study per (dataset fingerprint, protocol) in the database, resumable: ``trials`` is the
study's total budget. Every trial trains on the training pool and is scored on the split's
fixed validation tasks; only the leaderboard's finalists are scored on the test tasks.
"""

from __future__ import annotations

import inspect
import logging
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import optuna
import torch
from optuna.trial import FixedTrial, TrialState
from tqdm.auto import tqdm

from autometa import __version__
from autometa.artifacts import save_model
from autometa.components import Backbone, MetaAlgorithm
from autometa.data import Dataset, load_dataset
from autometa.errors import AutometaError, PluginError, SearchError
from autometa.evaluation import Score, evaluate, majority_baseline
from autometa.metafeatures import describe
from autometa.plugins import Registry, get_registry
from autometa.tasks import Split, choose_protocol, make_split

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

    def label(self) -> str:
        encoders = ", ".join(f"{m}={e}" for m, e in self.encoders.items())
        return f"{self.meta_algorithm} + {self.fusion} [{encoders}]"


def sample_config(trial: optuna.Trial | FixedTrial, registry: Registry, choices: dict[str, list[str]]) -> Config:
    """Define-by-run space: components first, then each chosen one's namespaced parameters."""
    meta = trial.suggest_categorical("meta_algorithm", choices["meta_algorithm"])
    fusion = trial.suggest_categorical("fusion", choices["fusion"])
    modalities = [key.split(".", 1)[1] for key in choices if key.startswith("encoder.")]
    encoders = {m: trial.suggest_categorical(f"encoder.{m}", choices[f"encoder.{m}"]) for m in modalities}
    return Config(
        meta,
        fusion,
        encoders,
        registry.get("meta_algorithm", meta).cls.suggest(trial, f"meta.{meta}."),
        registry.get("fusion", fusion).cls.suggest(trial, f"fusion.{fusion}."),
        {m: registry.get("encoder", e).cls.suggest(trial, f"encoder.{m}.{e}.") for m, e in encoders.items()},
    )


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
    return [
        {"meta_algorithm": name, **shared, **_defaults(registry.get("meta_algorithm", name).cls, f"meta.{name}.")}
        for name in choices["meta_algorithm"]
    ]


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
            key = _plugin_call(registry, "encoder", e, lambda: pool.features.add_derived(split.dataset, m, cls))
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
    backbone = Backbone(encoders, fusion, input_keys).to(pool.device)
    algorithm = _plugin_call(
        registry, "meta_algorithm", config.meta_algorithm,
        lambda: registry.get("meta_algorithm", config.meta_algorithm).cls(**config.meta_params),
    )
    _plugin_call(registry, "meta_algorithm", config.meta_algorithm,
                 lambda: algorithm.setup(backbone, pool, (split.ways, split.shots, split.queries)))
    score = None
    for step in range(1, steps + 1):
        loss = _plugin_call(registry, "meta_algorithm", config.meta_algorithm, lambda: algorithm.train_step(pool, rng))
        if not math.isfinite(loss):
            raise TrialDiverged(f"training loss became {loss} at step {step}; the learning rates are likely too high")
        if step % eval_every == 0 or step == steps:
            score = _plugin_call(registry, "meta_algorithm", config.meta_algorithm, lambda: evaluate(algorithm, split.validation))
            if report is not None:
                report(step, score.mean)
    return algorithm, score


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
            "validation_accuracy": self.validation,
            "test_accuracy": self.test.mean,
            "test_ci95": self.test.ci95,
            "test_units": self.test.n,
            "parameters": self.parameters,
        }


@dataclass
class SearchResult:
    study: optuna.Study
    dataset: Dataset
    split: Split
    leaderboard: list[LeaderboardEntry]
    majority: Score
    new_trials: int
    model_path: Path | None = None

    @property
    def best(self) -> LeaderboardEntry | None:
        return self.leaderboard[0] if self.leaderboard else None

    def format_leaderboard(self) -> str:
        unit = "query rows" if len(self.split.test) == 1 else "test tasks"
        lines = [
            f"Leaderboard ({self.split.protocol} protocol; test accuracy ± 95% CI over {self.majority.n} {unit})",
            f"{'rank':>4}  {'trial':>5}  {'validation':>10}  {'test':>15}  configuration",
        ]
        for e in self.leaderboard:
            lines.append(f"{e.rank:>4}  {e.trial:>5}  {100 * e.validation:>9.1f}%  {str(e.test):>15}  {e.config.label()}")
        lines.append(f"{'':>4}  {'':>5}  {'':>10}  {str(self.majority):>15}  majority class of the support set (baseline)")
        return "\n".join(lines)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if "," in spec:
        raise SearchError(
            f"--devices {spec}: running trials on several devices at once is not available yet; give one device"
        )
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise SearchError(f"--devices {spec!r} is not a device name; use auto, cpu or cuda:N") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise SearchError(f"--devices {spec}: torch sees {count} CUDA device(s) on this machine; use cpu or auto")
    elif device.type != "cpu":
        raise SearchError(f"--devices {spec}: only cpu and cuda devices are supported")
    return device


def open_study(name: str, db: str, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    if db.startswith("sqlite:///"):
        target = Path(db[len("sqlite:///"):])
        if target.parent and not target.parent.exists():
            raise SearchError(f"--db {db}: folder {target.parent} does not exist")
    try:
        return optuna.create_study(
            study_name=name, storage=db, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
        )
    except AutometaError:
        raise
    except Exception as exc:
        raise SearchError(f"cannot open the study database {db}: {type(exc).__name__}: {exc}") from exc


def study_name_for(dataset: Dataset, protocol: str) -> str:
    return f"{dataset.name}-{protocol}-{dataset.fingerprint[:10]}"


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
) -> SearchResult:
    """Search encoders × fusion × meta-algorithm on ``data`` and report the best on test tasks."""
    say = echo or (lambda msg: print(msg, file=sys.stderr))
    if trials < 1:
        raise SearchError("--trials must be at least 1")
    if steps < 1 or eval_every < 1:
        raise SearchError("--steps and --eval-every must be at least 1")
    device = resolve_device(devices)
    registry = get_registry()
    if isinstance(data, Dataset):
        dataset = data
    else:
        if label is None:
            raise SearchError("a label column is required (--label NAME)")
        dataset = load_dataset(data, label, group=group, columns=columns, image_size=image_size)
    say(dataset.summary())
    protocol = choose_protocol(dataset, protocol)
    choices = search_choices(registry, protocol, dataset.modalities, include)
    # Encoders that derive their own inputs (e.g. pretrained embeddings) do so when first chosen.
    split = make_split(
        dataset, protocol, ways=ways, shots=shots, queries=queries,
        validation_tasks=validation_tasks, test_tasks=test_tasks, seed=seed, device=device,
    )
    say(split.describe())

    name = study or study_name_for(dataset, split.protocol)
    existing = _finished_trials(name, db)
    if sampler is None:
        with warnings.catch_warnings():  # multivariate/group are stable in practice, still flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # A resumed study gets a new seed so it does not replay the first random trials.
            sampler = optuna.samplers.TPESampler(
                multivariate=True, group=True, seed=seed + 7919 * existing,
                n_startup_trials=min(10, max(3, trials // 3)),
            )
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=eval_every)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna_study = open_study(name, db, sampler, pruner)
    _check_resume(optuna_study, dataset, split, choices, name)

    remaining = trials - existing
    if existing:
        say(f"study {name!r} resumed: {existing} trial(s) already finished, {max(0, remaining)} of the budget of {trials} left")
    else:
        say(f"study {name!r} in {db}: {trials} trial(s) on {device}")

    if not optuna_study.get_trials(deepcopy=False):
        for params in default_trials(registry, choices)[: max(0, remaining)]:
            optuna_study.enqueue_trial(params, skip_if_exists=True)
    cache: dict[int, MetaAlgorithm] = {}
    if remaining > 0:
        _optimize(optuna_study, split, registry, choices, remaining, timeout, seed, steps, eval_every, device, top_k, cache, progress, say)

    leaderboard = _leaderboard(optuna_study, split, registry, choices, top_k, steps, eval_every, cache, say)
    majority = majority_baseline(split.test)
    optuna_study.set_user_attr("leaderboard", [e.as_dict() for e in leaderboard])
    optuna_study.set_user_attr("majority_baseline", {"test_accuracy": majority.mean, "test_ci95": majority.ci95})
    model_path = None
    if output is not None and leaderboard:
        best = leaderboard[0]
        model_path = save_model(
            Path(output) / name, best.algorithm, best.config, split, registry=registry, study=name, label=dataset.label_column,
            image_size=image_size,
            scores={"validation": best.validation, "test": best.test.mean, "test_ci95": best.test.ci95, "trial": best.trial},
        )
        optuna_study.set_user_attr("model_path", str(model_path.resolve()))
        say(f"best model (trial {best.trial}) saved to {model_path}; use it with `autometa predict {model_path} DATA`")
    return SearchResult(optuna_study, dataset, split, leaderboard, majority, max(0, remaining), model_path)


def _finished_trials(name: str, db: str) -> int:
    try:
        summaries = optuna.study.get_all_study_summaries(db, include_best_trial=False)
    except Exception:
        return 0  # the database does not exist yet; open_study reports real problems
    if not any(s.study_name == name for s in summaries):
        return 0
    stored = optuna.load_study(study_name=name, storage=db)
    return len(stored.get_trials(deepcopy=False, states=FINISHED))


def _check_resume(study: optuna.Study, dataset: Dataset, split: Split, choices: dict, name: str) -> None:
    attrs = study.user_attrs
    if "fingerprint" not in attrs:
        study.set_user_attr("fingerprint", dataset.fingerprint)
        study.set_user_attr("dataset", dataset.name)
        study.set_user_attr("label", dataset.label_column)
        study.set_user_attr("protocol", split.protocol)
        study.set_user_attr("columns", {c.name: c.modality for c in dataset.columns})
        study.set_user_attr("choices", choices)
        study.set_user_attr("autometa_version", __version__)
        study.set_user_attr("host", host_info())
        study.set_user_attr("meta_features", describe(dataset))
        return
    if attrs["fingerprint"] != dataset.fingerprint:
        raise SearchError(
            f"study {name!r} was created for other data (fingerprint {attrs['fingerprint'][:10]}); "
            "pass a different --study name"
        )
    if attrs.get("choices") != choices:
        raise SearchError(
            f"study {name!r} was started with other plugins installed ({attrs.get('choices')}); "
            "Optuna cannot change a study's choices, so pass a new --study name to search with the current ones"
        )


def _optimize(study, split, registry, choices, n_trials, timeout, seed, steps, eval_every, device, top_k, cache, progress, say):
    bar = tqdm(total=n_trials, desc="search", unit="trial", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def objective(trial: optuna.Trial) -> float:
        config = sample_config(trial, registry, choices)
        trial_seed = seed * 1_000_003 + trial.number
        trial.set_user_attr("seed", trial_seed)
        trial.set_user_attr("device", str(device))
        trial.set_user_attr("steps", steps)
        bar.set_description(f"trial {trial.number}: {config.label()}")
        started = time.perf_counter()

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            bar.set_postfix_str(f"step {step}/{steps} val {100 * value:.1f}%")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (validation {100 * value:.1f}%)")

        try:
            algorithm, score = train(config, split, seed=trial_seed, steps=steps, eval_every=eval_every, registry=registry, report=report)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            trial.set_user_attr("prune_reason", str(exc))
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, AutometaError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            trial.set_user_attr("fail_reason", reason)
            raise
        trial.set_user_attr("wall_time_s", time.perf_counter() - started)
        trial.set_user_attr("parameters", sum(sum(p.numel() for p in m.parameters()) for m in algorithm.modules().values()))
        _keep_best(cache, trial.number, score.mean, algorithm, top_k)
        return score.mean

    def on_trial_end(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        took = frozen.user_attrs.get("wall_time_s", 0.0)
        if frozen.state == TrialState.COMPLETE:
            outcome = f"validation {100 * frozen.value:.1f}%"
        elif frozen.state == TrialState.PRUNED:
            outcome = frozen.user_attrs.get("prune_reason", "pruned")
        else:
            outcome = f"failed: {frozen.user_attrs.get('fail_reason', 'see log')}"
        config = sample_config(FixedTrial(frozen.params), registry, choices) if frozen.params else None
        bar.write(f"trial {frozen.number:>3} {outcome} ({took:.1f}s) {config.label() if config else ''}", file=sys.stderr)
        try:
            bar.set_postfix_str(f"best {100 * study.best_value:.1f}%")
        except ValueError:
            pass

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report every trial
    try:
        study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,), callbacks=[on_trial_end])
    except KeyboardInterrupt:
        say("interrupted: finished trials are saved; run the same command again to resume")
        raise
    finally:
        optuna.logging.set_verbosity(level)
        bar.close()


def _keep_best(cache: dict[int, MetaAlgorithm], number: int, value: float, algorithm: MetaAlgorithm, top_k: int) -> None:
    algorithm._validation = value  # noqa: SLF001 - only used to rank the cache
    cache[number] = algorithm
    for stale in sorted(cache, key=lambda n: cache[n]._validation, reverse=True)[top_k:]:
        del cache[stale]


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
        config = sample_config(FixedTrial(t.params), registry, choices)
        algorithm = cache.get(t.number)
        if algorithm is None:  # trained in an earlier run: retrain it from its parameters and seed
            algorithm, _ = train(
                config, split, seed=t.user_attrs.get("seed", t.number), steps=t.user_attrs.get("steps", steps),
                eval_every=eval_every, registry=registry,
            )
        test = evaluate(algorithm, split.test)
        parameters = sum(sum(p.numel() for p in m.parameters()) for m in algorithm.modules().values())
        entries.append(LeaderboardEntry(rank, t.number, config, t.value, test, parameters, algorithm))
    return entries


def host_info() -> dict[str, str]:
    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__}
