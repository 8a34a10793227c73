"""One point of the search space in plugin terms (``Config``), its Optuna parameter keys, and
how stored parameters are read back and labelled.

Parameter keys are ``meta_algorithm``, ``fusion``, ``encoder.<modality>`` (the choices) and
``<kind>.<name>.<parameter>`` for a component's hyperparameters. Search, warm start, the
report, the database queries and saved models all read configurations through this module.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FixedTrial

from autometa.errors import SearchError
from autometa.plugins import Registry

if TYPE_CHECKING:  # autometa.types imports torch, which `autometa db ...` never loads
    from autometa.types import TaskSize

# The cross-modal mapping's search space (see autometa.crossmodal): whether to map at all (only asked when the data has two or more
# modalities), then the loss weight, log-uniform. Off by default, as it only pays off when a
# modality can be missing.
USE_PARAM = "backbone.crossmodal"
WEIGHT_PARAM = "backbone.crossmodal_weight"
WEIGHT = FloatDistribution(1e-2, 10.0, log=True)
# Trials stored before the mapper existed lack USE_PARAM; rebuilt, they had none.
DEFAULT_PARAMS = {USE_PARAM: False}


def label_suffix(weight: float) -> str:
    """What a configuration's label says about the mapping (nothing when it is off)."""
    return f" + cross-modal mapping ×{weight:.3g}" if weight > 0 else ""


def suggest_weight(trial: optuna.Trial | FixedTrial, modalities: list[str]) -> float:
    """The cross-modal loss weight of one trial: 0 (no mapper) or log-uniform in ``WEIGHT``."""
    if len(modalities) < 2 or not trial.suggest_categorical(USE_PARAM, [False, True]):
        return 0.0
    return trial.suggest_float(WEIGHT_PARAM, WEIGHT.low, WEIGHT.high, log=True)



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
    # True for a meta-algorithm that reads fixed features (MetaAlgorithm.fixed_features): its
    # encoders and fusion are fixed feature maps at their fixed_params.
    fixed: bool = False

    def label(self) -> str:
        encoders = ", ".join(f"{m}={e}" for m, e in self.encoders.items())
        if self.fixed:
            return fixed_label(self.meta_algorithm, self.fusion, encoders)
        return f"{self.meta_algorithm} + {self.fusion} [{encoders}]{label_suffix(self.crossmodal_weight)}"


# A fixed-features meta-algorithm chooses its fixed encoders and fusion under these keys, apart
# from the others' "fusion" and "encoder.<modality>": Optuna keeps one distribution per name.
FIXED = "fixed."


def fixed_label(meta: str, fusion: str | None, encoders: str) -> str:
    """``gbm on fixed features [tabular=table, text=lsa]`` (the fusion named unless it is concat)."""
    fused = "" if fusion in (None, "concat") else f" fused by {fusion}"
    return f"{meta} on fixed features [{encoders}]{fused}"


def fixed_choices(registry: Registry, choices: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The fixed feature maps (components with ``fixed_params``) among a search's fusion and
    encoder choices: what a fixed-features meta-algorithm chooses among."""
    return {
        key: [n for n in names if registry.get("fusion" if key == "fusion" else "encoder", n).cls.fixed_params is not None]
        for key, names in choices.items() if key == "fusion" or key.startswith("encoder.")
    }


def sample_config(trial: optuna.Trial | FixedTrial, registry: Registry, choices: dict[str, list[str]]) -> Config:
    """Define-by-run space: components first, then each chosen one's namespaced parameters."""
    meta = trial.suggest_categorical("meta_algorithm", choices["meta_algorithm"])
    meta_cls = registry.get("meta_algorithm", meta).cls
    if meta_cls.fixed_features:
        return _fixed_config(trial, registry, choices, meta, meta_cls)
    fusion = trial.suggest_categorical("fusion", choices["fusion"])
    modalities = [key.split(".", 1)[1] for key in choices if key.startswith("encoder.")]
    encoders = {m: trial.suggest_categorical(f"encoder.{m}", choices[f"encoder.{m}"]) for m in modalities}
    return Config(
        meta,
        fusion,
        encoders,
        meta_cls.suggest(trial, f"meta.{meta}."),
        registry.get("fusion", fusion).cls.suggest(trial, f"fusion.{fusion}."),
        {m: registry.get("encoder", e).cls.suggest(trial, f"encoder.{m}.{e}.") for m, e in encoders.items()},
        suggest_weight(trial, modalities) if meta_cls.uses_auxiliary_loss else 0.0,
    )


def _fixed_config(trial, registry: Registry, choices: dict[str, list[str]], meta: str, meta_cls) -> Config:
    """A fixed-features meta-algorithm's configuration: its fixed encoders and fusion chosen
    under ``fixed.`` keys at their fixed parameters (none sampled), then its own parameters."""
    fixed = fixed_choices(registry, choices)
    fusion = trial.suggest_categorical(FIXED + "fusion", fixed["fusion"])
    encoders = {key.split(".", 1)[1]: trial.suggest_categorical(FIXED + key, names)
                for key, names in fixed.items() if key.startswith("encoder.")}
    return Config(
        meta, fusion, encoders, meta_cls.suggest(trial, f"meta.{meta}."),
        dict(registry.get("fusion", fusion).cls.fixed_params),
        {m: dict(registry.get("encoder", e).cls.fixed_params) for m, e in encoders.items()},
        fixed=True,
    )


def stored_config(params: Mapping[str, Any], registry: Registry, choices: dict[str, list[str]]) -> Config:
    """The configuration of a stored trial (trials stored before cross-modal mapping existed had none)."""
    return sample_config(FixedTrial({**DEFAULT_PARAMS, **params}), registry, choices)


def check_component_names(registry: Registry, include: Mapping[str, list[str]] | None) -> None:
    """Raise ``PluginError`` for a name in ``include`` that no plugin registers, before any data is read."""
    for key, names in (include or {}).items():
        kind = "encoder" if key.startswith("encoder.") else key
        if kind in registry.components:
            for name in names:
                registry.get(kind, name)


def search_choices(
    registry: Registry, protocol: str, modalities: list[str], include: Mapping[str, list[str]] | None = None,
    size: "TaskSize | None" = None, say: Callable[[str], None] | None = None,
) -> dict[str, list[str]]:
    """The components a study chooses among: every available one, or those in ``include``.

    ``include`` maps "meta_algorithm", "fusion" or "encoder.<modality>" to allowed names.
    With ``size``, components that cannot work on tasks of that size (``Component.fits_task``)
    are left out, and so is a fixed-features meta-algorithm without a fixed feature map for
    every modality; ``say`` gets a one-line note for each. Optuna cannot change a study's
    choices, so they are stored and compared on resume.
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
        misfits = {n: i.cls.fits_task(size) for n, i in usable.items()} if size is not None else {}
        if key in include:
            for name in include[key]:
                info = registry.get(kind, name)  # unknown names: error listing what exists
                if name not in usable:
                    raise SearchError(f"{kind.replace('_', '-')} {name!r} does not support this data's {protocol} protocol / modality")
                reason = info.cls.unavailable()
                if reason:
                    raise SearchError(f"{kind.replace('_', '-')} {name!r} is unavailable: {reason}")
                if misfits.get(name):
                    raise SearchError(f"{kind.replace('_', '-')} {name!r} cannot work on this data's tasks: {misfits[name]}")
            choices[key] = sorted(set(include[key]))
        else:
            # Sorted: entry-point load order may differ between machines, a study's choices may not.
            available = sorted(n for n, i in usable.items() if not i.cls.unavailable())
            for name in available:
                if misfits.get(name):
                    _note(say, f"{kind.replace('_', '-')} {name!r} left out: {misfits[name]}")
            choices[key] = [n for n in available if not misfits.get(n)]
        if not choices[key]:
            raise SearchError(
                f"no installed plugin provides {key.replace('_', '-')} for the {protocol} protocol; "
                "run `autometa plugins` to see what is installed"
            )
    fixed = fixed_choices(registry, choices)
    lacking = [key.replace("encoder.", "") for key, names in fixed.items() if not names]
    if lacking:
        for name in [n for n in choices["meta_algorithm"] if registry.get("meta_algorithm", n).cls.fixed_features]:
            if "meta_algorithm" in include:
                raise SearchError(f"meta-algorithm {name!r} reads fixed features, and this search allows none for "
                                  f"{', '.join(lacking)}; allow one (e.g. --encoder text=lsa, --fusion concat)")
            _note(say, f"meta-algorithm {name!r} left out: it reads fixed features, and this search allows none "
                       f"for {', '.join(lacking)}")
            choices["meta_algorithm"].remove(name)
        if not choices["meta_algorithm"]:
            raise SearchError("no meta-algorithm is left for this search; allow a fixed feature map or other meta-algorithms")
    return choices


def _note(say: Callable[[str], None] | None, message: str) -> None:
    if say is not None:
        say(f"note: {message}")


def default_encoder(registry: Registry, modality: str, allowed: list[str], protocol: str | None = None) -> str:
    """A modality's default encoder among ``allowed``: the first registered one that declares
    ``protocol`` in its ``default_for`` (a pretrained encoder on few-shot tasks), else the first registered."""
    infos = [i for i in registry.encoders_for(modality) if i.name in allowed]
    return next((i.name for i in infos if protocol in i.cls.default_for), infos[0].name)


def default_trials(registry: Registry, choices: dict[str, list[str]], protocol: str | None = None) -> list[dict[str, Any]]:
    """One trial per meta-algorithm with every component at its default parameters, the
    fixed-features learners (e.g. gbm) first, each on its ``preferred_features`` where allowed;
    within each kind by ``default_rank``, then by name.

    A new study starts with these (as auto-sklearn starts from defaults), so even a tiny
    budget scores each learner once at sensible settings before the sampler explores. The
    default fusion is concat when allowed; an encoder's default is ``default_encoder``'s for the
    search's ``protocol``.
    """
    fusion = "concat" if "concat" in choices["fusion"] else choices["fusion"][0]
    shared: dict[str, Any] = {"fusion": fusion, **_defaults(registry.get("fusion", fusion).cls, f"fusion.{fusion}.")}
    for key, names in choices.items():
        if key.startswith("encoder."):
            m = key.split(".", 1)[1]
            e = default_encoder(registry, m, names, protocol)
            shared[key] = e
            shared.update(_defaults(registry.get("encoder", e).cls, f"encoder.{m}.{e}."))
    multimodal = sum(key.startswith("encoder.") for key in choices) >= 2
    # A fixed-features learner's: concat when allowed, each modality's default fixed map.
    fixed = fixed_choices(registry, choices)
    fixed_shared = {FIXED + "fusion": "concat" if "concat" in fixed["fusion"] else (fixed["fusion"] or [None])[0]}
    for key, names in fixed.items():
        if key.startswith("encoder.") and names:
            fixed_shared[FIXED + key] = default_encoder(registry, key.split(".", 1)[1], names, protocol)
    trials = []
    # Fixed-features learners first: they fit once in seconds, so a short budget has a model early.
    learner = lambda n: registry.get("meta_algorithm", n).cls  # noqa: E731
    names = sorted(choices["meta_algorithm"], key=lambda n: (not learner(n).fixed_features, learner(n).default_rank, n))
    for name in names:
        cls = registry.get("meta_algorithm", name).cls
        components = shared
        if cls.fixed_features:
            preferred = {FIXED + key: e for key, allowed in fixed.items() if key.startswith("encoder.")
                         for e in cls.preferred_features if e in allowed}
            components = {**fixed_shared, **preferred}
        trials.append({"meta_algorithm": name, **components, **_defaults(cls, f"meta.{name}."),
                       **(DEFAULT_PARAMS if multimodal and cls.uses_auxiliary_loss else {})})
    return trials


def default_config(registry: Registry, choices: dict[str, list[str]], meta: str, protocol: str | None = None,
                   **params: Any) -> Config:
    """Meta-algorithm ``meta``'s default trial in a search of ``choices`` (see
    :func:`default_trials`), with ``params`` of its own changed: one learner's model as the search
    would build it, for a benchmark or a test that fits it alone."""
    trial = next((t for t in default_trials(registry, choices, protocol) if t["meta_algorithm"] == meta), None)
    if trial is None:
        raise SearchError(f"meta-algorithm {meta!r} is not among this search's: {', '.join(choices['meta_algorithm'])}")
    trial.update({f"meta.{meta}.{key}": value for key, value in params.items()})
    return sample_config(FixedTrial(trial), registry, choices)


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


def is_component_key(key: str) -> bool:
    """``meta_algorithm``, ``fusion`` and ``encoder.<modality>`` choose plugins (and their
    ``fixed.`` forms, for a fixed-features meta-algorithm); other keys tune them."""
    key = key.removeprefix(FIXED)
    return key in ("meta_algorithm", "fusion") or (key.startswith("encoder.") and key.count(".") == 1)


def configuration_label(params: Mapping[str, Any]) -> str:
    """The same ``meta + fusion [modality=encoder, ...]`` label the search prints."""
    if "meta_algorithm" not in params:
        return "-"
    prefix = FIXED if FIXED + "fusion" in params else ""
    shown = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in params.items() if k.startswith(prefix + "encoder.") and is_component_key(k))
    if prefix:
        return fixed_label(params["meta_algorithm"], params[FIXED + "fusion"], shown)
    weight = params.get(WEIGHT_PARAM, 0.0) if params.get(USE_PARAM) else 0.0
    return f"{params['meta_algorithm']} + {params.get('fusion', '?')} [{shown}]{label_suffix(weight)}"


def structure(params: Mapping[str, Any]) -> tuple:
    """The components of a configuration (meta-algorithm, fusion, encoder per modality); a
    fixed-features one's under its ``fixed.`` keys."""
    prefix = FIXED if FIXED + "fusion" in params else ""
    encoders = sorted((k, v) for k, v in params.items() if k.startswith(prefix + "encoder.") and is_component_key(k))
    return params.get("meta_algorithm"), params.get(prefix + "fusion"), tuple(encoders)

