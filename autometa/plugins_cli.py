"""``autometa plugins``: list installed plugins and their components, or scaffold a new plugin.

The listing is the default action of the group (``autometa plugins [--format table|json]``),
so scripts written against the original command keep working; ``list`` is the explicit form.
``new`` writes a ready-to-install plugin package whose component already works and whose
tests (autometa.testing's conformance checks) pass before the author changes a line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from autometa import __version__
from autometa.components import MODALITIES
from autometa.errors import PluginError
from autometa.hookspecs import hook_names  # noqa: F401 - part of this module's API

SCAFFOLD_KINDS = ("encoder", "fusion", "meta-algorithm")
# Stricter than a component name (no leading, trailing or doubled underscores), because it
# also becomes the distribution name autometa-<words-joined-by-dashes>, which PEP 508 limits.
_SCAFFOLD_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


# --------------------------------------------------------------------------- listing


def component_rows(hook: str | None = None) -> list[dict[str, Any]]:
    """``ComponentInfo.describe()`` of every registered component (of plugins implementing ``hook``)."""
    from autometa.plugins import get_registry

    keep = _plugins_implementing(hook)
    return [info.describe() for info in get_registry().all() if keep is None or info.plugin in keep]


def plugin_rows(hook: str | None = None) -> list[dict[str, Any]]:
    """One row per plugin: distribution, version, hooks implemented, components by kind, and
    status: "loaded", or "failed" for a plugin that was skipped (``problems`` say why; a loaded
    plugin may have problems too, e.g. a component refused because its name was taken)."""
    from autometa.plugins import KINDS, default_host, get_registry

    host, registry = default_host(), get_registry()
    keep = _plugins_implementing(hook)
    rows = []
    for name, plugin in host.pm.list_name_plugin():
        if keep is not None and name not in keep:
            continue
        rows.append(_plugin_row(host, name, "loaded", sorted(c.name for c in host.pm.get_hookcallers(plugin) or []), {
            kind: [info.name for info in registry.components[kind].values() if info.plugin == name] for kind in KINDS
        }))
    if keep is None:  # a failed plugin's hooks are unknown: it is listed unfiltered only
        for name in sorted(host.failed - {n for n, _ in host.pm.list_name_plugin()}):
            rows.append(_plugin_row(host, name, "failed", [], {kind: [] for kind in KINDS}))
    return rows


def _plugin_row(host, name: str, status: str, hooks: list[str], components: dict[str, list[str]]) -> dict[str, Any]:
    distribution, version = host.origins.get(name, (None, None))
    return {"plugin": name, "distribution": distribution, "version": version, "status": status, "hooks": hooks,
            "components": components, "problems": host.plugin_problems.get(name, [])}


def _plugins_implementing(hook: str | None) -> set[str] | None:
    if hook is None:
        return None
    from autometa.plugins import default_host

    return {impl.plugin_name for impl in getattr(default_host().pm.hook, hook).get_hookimpls()}


def _echo_table(header: tuple[str, ...], table: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in (header, *table):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def _list(fmt: str, by: str, hook: str | None) -> None:
    if by == "plugin":
        rows = plugin_rows(hook)
        if fmt == "json":
            click.echo(json.dumps(rows, indent=2))
            return
        _echo_table(
            ("plugin", "distribution", "version", "hooks", "components", "status"),
            [
                (r["plugin"], r["distribution"] or "-", r["version"] or "-", ", ".join(r["hooks"]) or "-",
                 "; ".join(f"{kind.replace('_', '-')}: {', '.join(names)}"
                           for kind, names in r["components"].items() if names) or "-",
                 "; ".join([r["status"], *r["problems"]]))
                for r in rows
            ],
        )
        return
    rows = component_rows(hook)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    _echo_table(
        ("kind", "name", "modality", "plugin", "version", "hyperparameters"),
        [
            (r["kind"], r["name"],
             r["modality"] or ("protocols: " + ",".join(r["protocols"]) if r["protocols"] else "-"),
             r["plugin"], r["version"] or "-",
             (", ".join(r["hyperparameters"]) or "-")
             + (f"  [unavailable: {r['unavailable']}]" if r["unavailable"] else ""))
            for r in rows
        ],
    )


def _list_options(function):
    for option in reversed([
        click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True),
        click.option("--by", type=click.Choice(["component", "plugin"]), default="component", show_default=True,
                     help="One row per component, or one per plugin (distribution, version, hooks, components)."),
        click.option("--hook", type=click.Choice(hook_names()), default=None, metavar="HOOK",
                     help=f"Only plugins that implement HOOK ({', '.join(hook_names())})."),
    ]):
        function = option(function)
    return function


@click.group(invoke_without_command=True)
@_list_options
@click.pass_context
def plugins(ctx: click.Context, fmt: str, by: str, hook: str | None) -> None:
    """List registered components and plugins; `new` creates a plugin.

    Without a subcommand, lists every registered encoder, fusion and meta-algorithm (as
    `list` does); `--by plugin` shows each plugin's distribution, version, hooks and components.
    """
    if ctx.invoked_subcommand is None:
        _list(fmt, by, hook)


@plugins.command("list")
@_list_options
def list_plugins(fmt: str, by: str, hook: str | None) -> None:
    """List every registered encoder, fusion and meta-algorithm (the default action)."""
    _list(fmt, by, hook)


# --------------------------------------------------------------------------- scaffold


@plugins.command("new")
@click.argument("name")
@click.option("--kind", type=click.Choice(SCAFFOLD_KINDS), required=True, help="The kind of component to create.")
@click.option("--modality", type=click.Choice(MODALITIES), default=None,
              help="The encoder's modality (encoders only; default tabular).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Folder in which the package folder autometa-NAME is created.")
def new(name: str, kind: str, modality: str | None, output: Path) -> None:
    """Create a plugin package for a new component called NAME, ready to install and test."""
    if modality is not None and kind != "encoder":
        raise click.BadParameter(f"only encoders have a modality, not a {kind}", param_hint="--modality")
    target = scaffold(name, kind, modality=modality, output=output)
    component = component_name(name)
    click.echo(
        f"created {target} (distribution autometa-{component.replace('_', '-')}, package autometa_{component}, "
        f"{kind} {component!r})\n"
        "next:\n"
        f"  pip install -e {target}\n"
        f"  python -m pytest {target / 'tests'}\n"
        f"  autometa plugins --by plugin\n"
        f"  autometa search DATA --label COLUMN {_search_flag(component, kind, modality or 'tabular')}"
    )


def _search_flag(component: str, kind: str, modality: str) -> str:
    """The `autometa search` option that restricts a search to this component."""
    return {"encoder": f"--encoder {modality}={component}", "fusion": f"--fusion {component}",
            "meta-algorithm": f"--meta-algorithm {component}"}[kind]


def component_name(name: str) -> str:
    """The component name NAME becomes: lowercase, dashes and spaces as underscores, no autometa prefix."""
    cleaned = re.sub(r"[-\s]+", "_", name.strip().lower())
    return re.sub(r"^autometa_", "", cleaned)


def scaffold(name: str, kind: str, *, modality: str | None = None, output: str | Path = ".") -> Path:
    """Write the package of a new plugin with one working ``kind`` component; returns its folder.

    ``kind`` is encoder, fusion or meta-algorithm; ``modality`` applies to encoders (default
    tabular). The folder is ``output/autometa-<name>``. Raises PluginError for a name that
    cannot become a component name, one already taken, or a folder that already has files.
    """
    kind = kind.replace("_", "-")
    if kind not in SCAFFOLD_KINDS:
        raise PluginError(f"unknown kind {kind!r}; use one of {', '.join(SCAFFOLD_KINDS)}")
    if kind != "encoder" and modality is not None:
        raise PluginError(f"only encoders have a modality, not a {kind}")
    modality = modality or "tabular"
    if modality not in MODALITIES:
        raise PluginError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    component = component_name(name)
    if not _SCAFFOLD_NAME.match(component):
        raise PluginError(
            f"{name!r} cannot become a component name: it must turn into lowercase words of letters and digits "
            "joined by single underscores (or dashes), starting with a letter, e.g. 'wide_mlp' or 'wide-mlp'"
        )
    _check_name_is_free(component, kind.replace("-", "_"))
    target = Path(output) / f"autometa-{component.replace('_', '-')}"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PluginError(f"{target} already exists and is not an empty folder; remove it or choose another --output")

    files = _render(component, kind, modality)
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


def _check_name_is_free(component: str, kind: str) -> None:
    from autometa.plugins import default_host, get_registry

    registry = get_registry()
    taken = registry.components[kind].get(component)
    if taken is not None:
        where = f" ({taken.distribution} {taken.version})" if taken.distribution else ""
        raise PluginError(
            f"{kind.replace('_', '-')} name {component!r} is already registered by plugin "
            f"{taken.plugin!r}{where}; choose another name"
        )
    # The entry point is named after the component, and pluggy needs plugin names to be unique.
    if default_host().pm.has_plugin(component):
        raise PluginError(f"a plugin named {component!r} is already installed; choose another name")


def _class_name(component: str, kind: str) -> str:
    suffix = {"encoder": "Encoder", "fusion": "Fusion", "meta-algorithm": "MetaAlgorithm"}[kind]
    stem = "".join(part.capitalize() for part in component.split("_"))
    return stem if stem.endswith(suffix) else stem + suffix


def _test_imports(kind: str) -> str:
    """The import block of the generated test file: only what its kind's tests use."""
    third_party = ["import pytest", "import torch"] + (["import numpy as np"] if kind == "meta-algorithm" else [])
    first_party = ["from autometa.plugins import PluginHost",
                   "from autometa.testing import check_component, conformance_params"]
    if kind != "fusion":
        first_party.append("import autometa")
    if kind == "meta-algorithm":
        first_party += ["from autometa.features import Features", "from autometa.tasks import Task, TrainingPool"]

    def isort(lines: list[str]) -> str:
        # isort's order: plain imports first, then from-imports, each alphabetical.
        return "\n".join(sorted(lines, key=lambda line: (line.startswith("from"), line)))

    return isort(third_party) + "\n\n" + isort(first_party) + "\n"


def _render(component: str, kind: str, modality: str) -> dict[str, str]:
    package = f"autometa_{component}"
    distribution = f"autometa-{component.replace('_', '-')}"
    class_name = _class_name(component, kind)
    registry_kind = kind.replace("-", "_")
    source = {"encoder": _ENCODERS[modality], "fusion": _FUSION, "meta-algorithm": _META_ALGORITHM}[kind]
    flag = _search_flag(component, kind, modality)
    described = f"{modality} encoder" if kind == "encoder" else kind
    values = {
        # First: the behaviour tests are templates too, filled by the replacements after them.
        "__BEHAVIOUR_TEST__": {"encoder": _ENCODER_TEST, "fusion": _FUSION_TEST,
                               "meta-algorithm": _META_ALGORITHM_TEST}[kind],
        "__IMPORTS__": _test_imports(kind),
        "__COMPONENT__": component,
        "__PACKAGE__": package,
        "__DISTRIBUTION__": distribution,
        "__CLASS__": class_name,
        "__KIND__": registry_kind,
        "__KIND_WORDS__": kind,
        "__DESCRIBED__": described,
        "__MODALITY__": modality,
        "__FLAG__": flag,
        "__AUTOMETA_VERSION__": __version__,
    }

    def fill(template: str) -> str:
        # Plain replacement: the templates are Python full of braces, which str.format would trip on.
        for key, value in values.items():
            template = template.replace(key, value)
        return template

    return {
        "pyproject.toml": fill(_PYPROJECT),
        "README.md": fill(_README),
        f"src/{package}/__init__.py": fill(source),
        f"tests/test_{package}.py": fill(_TESTS),
    }


# --------------------------------------------------------------------------- templates

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "__DISTRIBUTION__"
version = "0.1.0"
description = "autometa plugin: the __COMPONENT__ __DESCRIBED__."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["autometa>=__AUTOMETA_VERSION__"]

[project.optional-dependencies]
test = ["pytest>=7.4"]

# autometa finds plugins through this entry-point group; the name on the left is the plugin's
# name in `autometa plugins` and in error messages, the module on the right holds the hooks.
[project.entry-points.autometa]
__COMPONENT__ = "__PACKAGE__"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

_README = '''\
# __DISTRIBUTION__

An autometa plugin that adds the `__COMPONENT__` __DESCRIBED__
(`__PACKAGE__.__CLASS__`), created by `autometa plugins new`.

## Install and test

```
pip install -e ".[test]"
python -m pytest
autometa plugins --by plugin      # the plugin, its version, hooks and components
```

The tests run autometa's conformance checks (`autometa.testing.check_component`) on the
component and check that the installed entry point registers it. Keep them passing as you
change the implementation in `src/__PACKAGE__/__init__.py`.

## Use

A search includes every installed component; to search with this one only:

```
autometa search DATA --label COLUMN __FLAG__
```

## Publish

`pyproject.toml` declares the entry point in the `autometa` group, which is all autometa
needs to find the plugin once the distribution is installed:

```
python -m build && twine upload dist/*
```

See autometa's `docs/plugins.md` for the component contracts and how to debug loading.
'''

_ENCODER_HEADER = '''\
"""autometa plugin: the ``__COMPONENT__`` encoder for __MODALITY__ columns."""

from __future__ import annotations

import torch
from optuna.distributions import FloatDistribution, IntDistribution
from torch import nn

import autometa

'''

_ENCODER_FOOTER = '''

@autometa.hookimpl
def register_encoders(register):
    register(__CLASS__)
'''

_VECTOR_BODY = '''
class __CLASS__(autometa.Encoder):
    """Linear ▶ ReLU ▶ Dropout over the row's __MODALITY__ features, a ``[batch, width]`` embedding."""

    name = "__COMPONENT__"
    modality = "__MODALITY__"
    # Optuna distributions over keyword parameters of __init__; a search starts from the defaults.
    search_space = {
        "width": IntDistribution(16, 256, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
    }

    def __init__(self, spec: autometa.InputSpec, *, width: int = 64, dropout: float = 0.1):
        super().__init__()
        # __MODALITY__ input: float [batch, features] with spec.shape == (features,)
        self.net = nn.Sequential(nn.Linear(spec.shape[0], width), nn.ReLU(), nn.Dropout(dropout))
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
'''

_TEXT_BODY = '''
class __CLASS__(autometa.Encoder):
    """Mean of learned token embeddings ▶ Linear ▶ ReLU ▶ Dropout, a ``[batch, width]`` embedding."""

    name = "__COMPONENT__"
    modality = "text"
    # Optuna distributions over keyword parameters of __init__; a search starts from the defaults.
    search_space = {
        "dim": IntDistribution(16, 128, log=True),
        "width": IntDistribution(16, 256, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
    }

    def __init__(self, spec: autometa.InputSpec, *, dim: int = 64, width: int = 64, dropout: float = 0.1):
        super().__init__()
        # text input: int64 token ids [batch, length], 0 is padding, ids < spec.vocab_size
        self.embedding = nn.Embedding(spec.vocab_size, dim, padding_idx=0)
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Dropout(dropout))
        self.out_dim = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Average over real tokens only, so padding length does not dilute the mean; a row
        # without text averages nothing and gets the embedding of zeros.
        keep = (ids > 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        mean = (self.embedding(ids) * keep).sum(dim=-2) / keep.sum(dim=-2).clamp_min(1.0)
        return self.net(mean)
'''

_IMAGE_BODY = '''
class __CLASS__(autometa.Encoder):
    """Conv3x3 ▶ ReLU ▶ global average pool ▶ Linear ▶ ReLU ▶ Dropout, a ``[batch, width]`` embedding."""

    name = "__COMPONENT__"
    modality = "image"
    # Optuna distributions over keyword parameters of __init__; a search starts from the defaults.
    search_space = {
        "channels": IntDistribution(8, 64, log=True),
        "width": IntDistribution(16, 256, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
    }

    def __init__(self, spec: autometa.InputSpec, *, channels: int = 16, width: int = 64, dropout: float = 0.1):
        super().__init__()
        # image input: float [batch, C, H, W] with spec.shape == (C, H, W)
        self.net = nn.Sequential(
            nn.Conv2d(spec.shape[0], channels, 3, padding=1),
            nn.ReLU(),
            # Pooling to 1x1 makes the embedding size independent of the image size.
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, width),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
'''

_ENCODERS = {
    modality: _ENCODER_HEADER + body + _ENCODER_FOOTER
    for modality, body in {"tabular": _VECTOR_BODY, "vector": _VECTOR_BODY, "text": _TEXT_BODY,
                           "image": _IMAGE_BODY}.items()
}

_FUSION = '''\
"""autometa plugin: the ``__COMPONENT__`` fusion, a learned weighted sum of the modalities."""

from __future__ import annotations

import torch
from optuna.distributions import IntDistribution
from torch import nn

import autometa


class __CLASS__(autometa.Fusion):
    """z = Σ_m a_m · (W_m h_m + b_m): each modality's embedding projected to ``dim``, weighted by
    a learned softmax over the modalities a row has (a row with none fuses to zeros)."""

    name = "__COMPONENT__"
    # Optuna distributions over keyword parameters of __init__; a search starts from the defaults.
    search_space = {"dim": IntDistribution(16, 128, log=True)}

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64):
        super().__init__()
        # The order of in_dims is fixed for the model's life; embeddings may arrive in any order.
        self.order = list(in_dims)
        self.project = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_dims.items()})
        # Equal weights to begin with: no modality is preferred before training says so.
        self.weight_logits = nn.Parameter(torch.zeros(len(in_dims)))
        self.out_dim = dim

    def forward(
        self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        # Shapes are [..., batch, dim]: meta-algorithms may vmap over a leading task dimension.
        first = embeddings[self.order[0]]
        present = torch.stack(
            [
                masks[m] if masks is not None and m in masks
                else torch.ones(first.shape[:-1], dtype=torch.bool, device=first.device)
                for m in self.order
            ],
            dim=-1,
        )  # [..., batch, M], True where the row has the modality (a modality without a mask: every row)
        projected = []
        for i, m in enumerate(self.order):
            keep = present[..., i, None]
            # torch.where rather than multiplying by the mask: a NaN in a missing row's embedding
            # would survive 0 * NaN. Zeroing the input as well as the projection keeps it out of
            # the Linear layer's weight gradient too.
            x = torch.where(keep, embeddings[m], embeddings[m].new_zeros(()))
            projected.append(torch.where(keep, self.project[m](x), x.new_zeros(())))
        h = torch.stack(projected, dim=-2)  # [..., batch, M, dim]
        weights = torch.where(present, torch.softmax(self.weight_logits, dim=0), h.new_zeros(()))
        # Renormalise over the modalities each row has; the floor only keeps 0 / 0 away.
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        return (weights.unsqueeze(-1) * h).sum(dim=-2)


@autometa.hookimpl
def register_fusions(register):
    register(__CLASS__)
'''

_META_ALGORITHM = '''\
"""autometa plugin: the ``__COMPONENT__`` meta-algorithm, nearest class centroid on a trained backbone."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution

import autometa

DISTANCES = ("euclidean", "cosine")
EMBED_BATCH = 1024


def embed(backbone: autometa.Backbone, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embed rows in slices: the standard protocol's support set is every training row."""
    n = next(iter(inputs.values())).shape[0]
    return torch.cat(
        [backbone({key: t[i: i + EMBED_BATCH] for key, t in inputs.items()}) for i in range(0, n, EMBED_BATCH)]
    )


class __CLASS__(autometa.MetaAlgorithm):
    """Classify each query by its nearest class centroid (the mean support embedding of the
    class), training the backbone on episodes so that centroids separate the classes, as
    Prototypical Networks do (Snell et al. 2017).

    ``distance="euclidean"``: logits are negative squared distances. ``distance="cosine"``:
    logits are cosine similarities times ``temperature``, a parameter only that choice has
    (see ``suggest``).
    """

    name = "__COMPONENT__"
    protocols = ("fewshot", "grouped", "standard")
    # Optuna distributions over keyword parameters of __init__; a search starts from the defaults.
    search_space = {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "distance": CategoricalDistribution(list(DISTANCES)),
    }

    def __init__(self, *, lr: float = 1e-3, distance: str = "euclidean", temperature: float = 10.0):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(DISTANCES)}; got {distance!r}")
        self.lr = lr
        self.distance = distance
        self.temperature = temperature

    @classmethod
    def suggest(cls, trial, prefix: str) -> dict:
        # A conditional space: temperature is asked only when it matters, so the sampler does
        # not model a parameter that has no effect on half of the trials.
        params = super().suggest(trial, prefix)
        if params["distance"] == "cosine":
            params["temperature"] = trial.suggest_float(prefix + "temperature", 1.0, 30.0, log=True)
        return params

    def setup(self, backbone: autometa.Backbone, pool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        # The protocol's (ways, shots, queries), shrunk to what the training classes can supply.
        self.shape = pool.episode_shape(*shape)
        params = [p for p in backbone.parameters() if p.requires_grad]
        # A backbone may have nothing to train (identity ▶ concat); Adam refuses an empty list.
        self.optimizer = torch.optim.Adam(params, lr=self.lr) if params else None

    def logits(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
        """``[n_query, n_way]`` logits of the query embeddings against the support's class centroids."""
        onehot = F.one_hot(support_y, n_way).to(support.dtype)  # [n_support, n_way]
        centroids = onehot.T @ support / onehot.sum(dim=0).clamp_min(1.0).unsqueeze(-1)
        if self.distance == "cosine":
            return self.temperature * F.normalize(query, dim=-1) @ F.normalize(centroids, dim=-1).T
        # |q - c|² expanded, which never builds the [n_query, n_way, dim] difference tensor.
        return -((query**2).sum(-1, keepdim=True) - 2 * query @ centroids.T + (centroids**2).sum(-1))

    def train_step(self, pool, rng: np.random.Generator) -> float:
        episode = pool.episodes(1, *self.shape, rng)  # a batch of one task: drop the task dimension
        support = self.backbone({key: t[0] for key, t in episode.support_inputs().items()})
        query = self.backbone({key: t[0] for key, t in episode.query_inputs().items()})
        logits = self.logits(support, episode.support_y[0], query, episode.n_way)
        loss = F.cross_entropy(logits, episode.query_y[0])
        if self.optimizer is not None:
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def predict(self, task) -> torch.Tensor:
        support = embed(self.backbone, task.support_inputs())
        query = embed(self.backbone, task.query_inputs())
        return self.logits(support, task.support_y, query, task.n_way)

    # modules() is inherited: {"backbone": self.backbone} holds everything this learner trains.


@autometa.hookimpl
def register_meta_algorithms(register):
    register(__CLASS__)
'''

_TESTS = '''\
"""Tests of the __COMPONENT__ __KIND_WORDS__: autometa's conformance checks, its registration
through the installed entry point, and what it computes."""

from __future__ import annotations

import importlib.metadata

__IMPORTS__
from __PACKAGE__ import __CLASS__


# One case per device: CPU, and CUDA (skipped where there is none).
@pytest.mark.parametrize("cls, device", conformance_params([__CLASS__]))
def test_conformance(cls, device):
    check_component(cls, device=device)


def test_registered_through_its_entry_point():
    # Strict and only this plugin's entry point: any problem with it fails here, and no other
    # installed plugin can make this test fail.
    host = PluginHost(strict=True)
    host.load_entry_points(importlib.metadata.entry_points(group="autometa", name="__COMPONENT__"))
    info = host.build_registry().get("__KIND__", "__COMPONENT__")
    assert info.cls is __CLASS__
    assert info.distribution == "__DISTRIBUTION__"
__BEHAVIOUR_TEST__'''

_ENCODER_TEST = '''

def test_embeds_a_batch():
    spec = autometa.InputSpec.example(__CLASS__.modality)
    encoder = __CLASS__(spec, width=8).eval()
    if spec.modality == "text":
        x = torch.randint(1, spec.vocab_size, (3, *spec.shape))
    else:
        x = torch.randn(3, *spec.shape)
    out = encoder(x)
    assert out.shape == (3, encoder.out_dim)
    assert (out >= 0).all()  # it ends in a ReLU
'''

_FUSION_TEST = '''

def test_a_missing_modality_leaves_the_present_one_alone():
    fusion = __CLASS__({"tabular": 3, "text": 2}, dim=4).eval()
    tabular, text = torch.randn(2, 3), torch.randn(2, 2)
    masks = {"text": torch.tensor([True, False])}
    out = fusion({"tabular": tabular, "text": text}, masks)
    # Row 1 lacks text: the weights renormalise to the tabular projection alone.
    torch.testing.assert_close(out[1], fusion.project["tabular"](tabular[1]))
    # Row 0 has both: equal initial weights average the two projections.
    expected = (fusion.project["tabular"](tabular[0]) + fusion.project["text"](text[0])) / 2
    torch.testing.assert_close(out[0], expected)
'''

_META_ALGORITHM_TEST = '''

class _Unchanged(autometa.Encoder):
    """A parameterless encoder, so the expected prediction is computable by hand."""

    name = "unchanged"
    modality = "vector"

    def __init__(self, spec):
        super().__init__()
        self.out_dim = spec.shape[0]

    def forward(self, x):
        return x


class _First(autometa.Fusion):
    name = "first"

    def __init__(self, in_dims):
        super().__init__()
        self.out_dim = next(iter(in_dims.values()))

    def forward(self, embeddings, masks=None):
        return next(iter(embeddings.values()))


def test_predicts_the_nearest_centroid():
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0], [1.0, 1.0], [9.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    features = Features({"vector": x}, {"vector": autometa.InputSpec("vector", (2,))})
    # Rows 0-3 train (class centroids (0, 1) and (10, 1)); rows 4 and 5 are the queries.
    pool = TrainingPool(features, labels, np.arange(4), [{0: np.array([0, 1]), 1: np.array([2, 3])}])
    task = Task(features, torch.arange(4), labels[:4], torch.tensor([4, 5]), labels[4:], 2)
    backbone = autometa.Backbone({"vector": _Unchanged(features.specs["vector"])}, _First({"vector": 2}))
    learner = __CLASS__()
    learner.setup(backbone, pool, (2, 1, 1))
    logits = learner.predict(task)
    # -|q - c|²: query (1, 1) is 1 from (0, 1) and 81 from (10, 1).
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -81.0], [-81.0, -1.0]]))
'''
