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

from autometa._version import __version__
from autometa.errors import PluginError
from autometa.hookspecs import hook_names  # noqa: F401 - part of this module's API
from autometa.inputs import MODALITIES

TEMPLATES = Path(__file__).parent / "templates"
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
        header = ("plugin", "distribution", "version", "hooks", "components", "status")
        table = [
            (r["plugin"], r["distribution"] or "-", r["version"] or "-", ", ".join(r["hooks"]) or "-",
             "; ".join(f"{kind.replace('_', '-')}: {', '.join(names)}"
                       for kind, names in r["components"].items() if names) or "-",
             "; ".join([r["status"], *r["problems"]]))
            for r in rows
        ]
    else:
        rows = component_rows(hook)
        header = ("kind", "name", "modality", "plugin", "version", "hyperparameters")
        table = [
            (r["kind"], r["name"],
             r["modality"] or ("protocols: " + ",".join(r["protocols"]) if r["protocols"] else "-"),
             r["plugin"], r["version"] or "-",
             (", ".join(r["hyperparameters"]) or "-")
             + (f"  [unavailable: {r['unavailable']}]" if r["unavailable"] else ""))
            for r in rows
        ]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        _echo_table(header, table)


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
    third_party = ["import pytest", "import torch"]
    first_party = ["from autometa.plugins import PluginHost",
                   "from autometa.testing import check_component, conformance_params"]
    if kind != "fusion":
        first_party.append("import autometa")
    if kind == "meta-algorithm":
        first_party.append("from autometa.testing import toy_pool, toy_task")

    def isort(lines: list[str]) -> str:
        # isort's order: plain imports first, then from-imports, each alphabetical.
        return "\n".join(sorted(lines, key=lambda line: (line.startswith("from"), line)))

    return isort(third_party) + "\n\n" + isort(first_party) + "\n"


def _render(component: str, kind: str, modality: str) -> dict[str, str]:
    package = f"autometa_{component}"
    distribution = f"autometa-{component.replace('_', '-')}"
    class_name = _class_name(component, kind)
    registry_kind = kind.replace("-", "_")
    if kind == "encoder":
        body = _template(f"encoder_{'vector' if modality == 'tabular' else modality}.py.tmpl")
        source = _template("encoder.py.tmpl").replace("__ENCODER_BODY__\n", body)
    else:
        source = _template(f"{registry_kind}.py.tmpl")
    flag = _search_flag(component, kind, modality)
    described = f"{modality} encoder" if kind == "encoder" else kind
    values = {
        # First: the behaviour tests are templates too, filled by the replacements after them.
        "__BEHAVIOUR_TEST__": _template(f"behaviour_{registry_kind}.py.tmpl"),
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
        "pyproject.toml": fill(_template("pyproject.toml.tmpl")),
        "README.md": fill(_template("README.md.tmpl")),
        f"src/{package}/__init__.py": fill(source),
        f"tests/test_{package}.py": fill(_template("plugin_tests.py.tmpl")),
    }


def _template(name: str) -> str:
    """One of the scaffold's files (package data beside this module, placeholders in capitals)."""
    return (TEMPLATES / name).read_text(encoding="utf-8")
