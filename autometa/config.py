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
from typing import Any, Mapping

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FixedTrial

from autometa.errors import SearchError
from autometa.plugins import Registry

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

    def label(self) -> str:
        encoders = ", ".join(f"{m}={e}" for m, e in self.encoders.items())
        return f"{self.meta_algorithm} + {self.fusion} [{encoders}]{label_suffix(self.crossmodal_weight)}"


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
        suggest_weight(trial, modalities) if meta_cls.uses_auxiliary_loss else 0.0,
    )


def stored_config(params: Mapping[str, Any], registry: Registry, choices: dict[str, list[str]]) -> Config:
    """The configuration of a stored trial (trials stored before cross-modal mapping existed had none)."""
    return sample_config(FixedTrial({**DEFAULT_PARAMS, **params}), registry, choices)


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
         **(DEFAULT_PARAMS if multimodal and registry.get("meta_algorithm", name).cls.uses_auxiliary_loss else {})}
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


def is_component_key(key: str) -> bool:
    """``meta_algorithm``, ``fusion`` and ``encoder.<modality>`` choose plugins; other keys tune them."""
    return key in ("meta_algorithm", "fusion") or (key.startswith("encoder.") and key.count(".") == 1)


def configuration_label(params: Mapping[str, Any]) -> str:
    """The same ``meta + fusion [modality=encoder, ...]`` label the search prints."""
    if "meta_algorithm" not in params:
        return "-"
    encoders = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in params.items() if k.startswith("encoder.") and is_component_key(k))
    weight = params.get(WEIGHT_PARAM, 0.0) if params.get(USE_PARAM) else 0.0
    return f"{params['meta_algorithm']} + {params.get('fusion', '?')} [{encoders}]{label_suffix(weight)}"


def structure(params: Mapping[str, Any]) -> tuple:
    """The components of a configuration (meta-algorithm, fusion, encoder per modality)."""
    encoders = sorted((k, v) for k, v in params.items() if k.startswith("encoder.") and is_component_key(k))
    return params.get("meta_algorithm"), params.get("fusion"), tuple(encoders)

