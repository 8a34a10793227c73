"""autometa: AutoML for multimodal data fusion with meta-learning.

The names below are imported on first use (PEP 562), so ``import autometa.components`` or
``autometa --help`` does not pay for the search, torch or pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

from autometa._version import __version__

_EXPORTS = {
    "AutometaError": "autometa.errors", "DataError": "autometa.errors", "PluginError": "autometa.errors",
    "ProtocolError": "autometa.errors", "SearchError": "autometa.errors",
    "Backbone": "autometa.components", "Encoder": "autometa.components", "Fusion": "autometa.components",
    "MetaAlgorithm": "autometa.components",
    "Features": "autometa.types", "InputSpec": "autometa.inputs", "PoolInfo": "autometa.types",
    "Task": "autometa.types", "TaskSize": "autometa.types", "TrainingPool": "autometa.types",
    "hookimpl": "autometa.hookspecs",
    "Dataset": "autometa.data.loading", "load_dataset": "autometa.data.loading",
    "search": "autometa.study.engine", "SearchSettings": "autometa.study.settings",
    "Model": "autometa.results.artifacts", "load": "autometa.results.artifacts",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autometa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
