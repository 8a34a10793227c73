"""The plugin host: one pluggy manager, entry-point discovery, component validation.

Built-in plugins are an ordinary entry point (``autometa_builtins``) in the ``autometa`` group,
loaded exactly like third-party packages, but first: they keep their names whatever else is
installed. Third-party plugins follow in a fixed order (entry-point name, then distribution).
A plugin that fails to load or registers an invalid component is skipped with a one-line
warning, a component whose name is taken is refused alone (blaming the plugin that brings
it); ``AUTOMETA_STRICT_PLUGINS=1`` makes either fatal.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from autometa import hookspecs
from autometa.errors import PluginError
from autometa.inputs import MODALITIES, InputSpec

ENTRY_POINT_GROUP = "autometa"
BUILTINS_MODULE = "autometa_builtins"
STRICT_ENV = "AUTOMETA_STRICT_PLUGINS"
TRACE_ENV = "AUTOMETA_TRACE_PLUGINS"
logger = logging.getLogger("autometa.plugins")

# kind -> hook that registers it
KINDS = {"encoder": "register_encoders", "fusion": "register_fusions", "meta_algorithm": "register_meta_algorithms"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component class and where it came from."""

    kind: str
    cls: type
    plugin: str
    distribution: str | None = None
    version: str | None = None

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def modality(self) -> str | None:
        return getattr(self.cls, "modality", None) if self.kind == "encoder" else None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "modality": self.modality,
            "protocols": list(self.cls.protocols) if self.kind == "meta_algorithm" else None,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "hyperparameters": {k: repr(d) for k, d in self.cls.search_space.items()},
            "unavailable": self.cls.unavailable(),
        }


@dataclass
class Registry:
    """All valid components, by kind and name, plus the problems met while loading."""

    components: dict[str, dict[str, ComponentInfo]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    problems: list[str] = field(default_factory=list)

    def all(self) -> list[ComponentInfo]:
        return [info for kind in KINDS for info in self.components[kind].values()]

    def get(self, kind: str, name: str) -> ComponentInfo:
        try:
            return self.components[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.components[kind])) or "none"
            raise PluginError(
                f"no {kind.replace('_', '-')} named {name!r} is registered (available: {known}); "
                "run `autometa plugins` to see what is installed"
            ) from None

    def encoders_for(self, modality: str) -> list[ComponentInfo]:
        return [i for i in self.components["encoder"].values() if i.modality == modality]

    def meta_algorithms_for(self, protocol: str) -> list[ComponentInfo]:
        return [i for i in self.components["meta_algorithm"].values() if protocol in i.cls.protocols]


def validate_component(kind: str, cls: Any) -> None:
    """Raise PluginError (without the plugin's name) if ``cls`` breaks a registration rule."""
    # Here, not at the top: torch loads only when components are registered, so a command that
    # needs none (`autometa --help`, `db ...`) starts without it.
    import torch
    from optuna.distributions import BaseDistribution

    from autometa.components import Encoder, Fusion, MetaAlgorithm

    base = {"encoder": Encoder, "fusion": Fusion, "meta_algorithm": MetaAlgorithm}[kind]
    hook = KINDS[kind]
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise PluginError(f"{hook} got {cls!r}, which is not a subclass of autometa.{base.__name__}")
    label = cls.__qualname__
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(
            f"{label}.name must be a lowercase identifier like 'my_encoder', got {name!r}"
        )
    if kind == "encoder" and getattr(cls, "modality", None) not in MODALITIES:
        raise PluginError(
            f"encoder {name!r} declares modality {getattr(cls, 'modality', None)!r}; "
            f"use one of {', '.join(MODALITIES)}"
        )
    if kind == "encoder" and cls.fits_input() and not cls.derives_input():
        raise PluginError(f"encoder {name!r} overrides fit_input but not prepare(raw, state), which applies the state")
    protocols = {"fewshot", "grouped", "standard"}
    if kind == "meta_algorithm":
        unknown = set(cls.protocols) - protocols
        if not cls.protocols or unknown:
            raise PluginError(
                f"meta-algorithm {name!r} declares protocols {tuple(cls.protocols)!r}; "
                "use a non-empty subset of ('fewshot', 'grouped', 'standard')"
            )
    if kind == "encoder" and (isinstance(cls.default_for, str) or set(cls.default_for) - protocols):
        raise PluginError(
            f"encoder {name!r} declares default_for {cls.default_for!r}; "
            "use a tuple of protocols from ('fewshot', 'grouped', 'standard'), or () for none"
        )
    space = cls.search_space
    if not isinstance(space, dict):
        raise PluginError(f"{kind} {name!r}: search_space must be a dict of Optuna distributions")
    params = inspect.signature(cls.__init__).parameters
    keywords = {
        p.name
        for p in params.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    }
    for key, dist in space.items():
        if not isinstance(dist, BaseDistribution):
            raise PluginError(
                f"{kind} {name!r}: search_space[{key!r}] is {dist!r}, not an Optuna distribution "
                "(use optuna.distributions.FloatDistribution, IntDistribution or CategoricalDistribution)"
            )
        if key not in keywords:
            raise PluginError(
                f"{kind} {name!r}: search_space key {key!r} is not a keyword parameter with a "
                f"default in {label}.__init__; add `{key}=...` to its signature"
            )
    try:
        # Constructing draws random weights: keep the caller's seeded random state untouched.
        with torch.random.fork_rng(devices=[]):
            _construct_with_defaults(kind, cls)
    except Exception as exc:  # any failure means the defaults are unusable
        raise PluginError(
            f"{kind} {name!r} cannot be constructed with its default parameters: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    fixed = cls.fixed_params
    if fixed is not None:
        if kind == "meta_algorithm" or not isinstance(fixed, dict) or set(fixed) - keywords:
            raise PluginError(
                f"{kind} {name!r}: fixed_params must be a dict of {label}.__init__ keyword parameters "
                f"(encoders and fusions only), got {fixed!r}"
            )
        with torch.random.fork_rng(devices=[]):
            learned = sum(p.numel() for p in _construct_with_defaults(kind, cls, fixed).parameters())
        if learned:
            raise PluginError(f"{kind} {name!r}: with fixed_params {fixed!r} it has {learned} parameters; "
                              "fixed_params must make it learn nothing (or set fixed_params = None)")


def _construct_with_defaults(kind: str, cls: Any, params: dict | None = None) -> Any:
    params = params or {}
    if kind == "encoder":
        return cls(InputSpec.example(cls.modality), **params)
    if kind == "fusion":
        return cls({"tabular": 8, "text": 4}, **params)
    return cls(**params)


def _distribution_of(module: Any) -> tuple[str | None, str | None]:
    top = getattr(module, "__name__", "").split(".")[0]
    names = importlib.metadata.packages_distributions().get(top, [])
    for dist_name in names:
        try:
            return dist_name, importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def strict_mode() -> bool:
    return os.environ.get(STRICT_ENV, "").lower() not in ("", "0", "false", "no")


class PluginHost:
    """Owns the pluggy manager and builds the registry plugin by plugin."""

    def __init__(self, strict: bool | None = None):
        self.strict = strict_mode() if strict is None else strict
        self.pm = pluggy.PluginManager("autometa")
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get(TRACE_ENV, "").lower() not in ("", "0", "false", "no"):
            trace = self.pm.trace.root
            # Looked up per message, so redirected or captured stderr still gets the trace.
            trace.setwriter(lambda message: sys.stderr.write(message))

            def implemented_by(hook_name, impls, kwargs):
                # pluggy's trace names the hook, not the plugins whose implementations run.
                trace.get("hook")("implemented by", ", ".join(i.plugin_name for i in impls) or "no plugin")

            self.pm.add_hookcall_monitoring(implemented_by, lambda *args: None)
            self.pm.enable_tracing()
        self.origins: dict[str, tuple[str | None, str | None]] = {}
        self.problems: list[str] = []
        # Per plugin name: its problems, and whether it was skipped whole (for `plugins --by plugin`).
        self.plugin_problems: dict[str, list[str]] = {}
        self.failed: set[str] = set()

    def _problem(self, message: str, exc: BaseException | None = None, *, plugin: str | None = None,
                 failed: bool = True) -> None:
        # One line per problem, even when an exception's text spans several.
        message = " | ".join(line.strip() for line in message.splitlines() if line.strip())
        if self.strict:
            raise PluginError(f"{message} (strict mode: unset {STRICT_ENV} to skip it)") from exc
        logger.warning("%s; skipped", message)
        self.problems.append(message)
        if plugin is not None:
            self.plugin_problems.setdefault(plugin, []).append(message)
            if failed:
                self.failed.add(plugin)

    def _where(self, name: str) -> str:
        dist, version = self.origins.get(name, (None, None))
        return f" (from {dist} {version})" if dist else ""

    def add(self, plugin: Any, name: str, origin: tuple[str | None, str | None] = (None, None)) -> bool:
        """Register one plugin object (module or instance); False if it was rejected."""
        self.origins.setdefault(name, origin)  # kept for the listing of a plugin that fails below
        try:
            hash(plugin)
        except TypeError:
            self._problem(f"plugin {name!r}{self._where(name)} is a {type(plugin).__name__}, which pluggy cannot "
                          "register (it must be hashable: use a module or a class instance)", plugin=name)
            return False
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            # When the name is taken, the plugin registered under it stays loaded.
            self._problem(f"plugin {name!r}{self._where(name)} could not be registered: {exc}", exc, plugin=name,
                          failed=self.pm.get_plugin(name) is None)
            return False
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            unknown = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [] if not c.has_spec())
            self.pm.unregister(name=name)
            self._problem(f"plugin {name!r}{self._where(name)} implements an unknown hook: {_misspelled(unknown, exc)}",
                          exc, plugin=name)
            return False
        self.origins[name] = origin
        return True

    def load_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(entry_points, key=_load_order):
            dist = getattr(ep, "dist", None)
            origin = (dist.name, dist.version) if dist is not None else (None, None)
            try:
                plugin = ep.load()
            except Exception as exc:
                self.origins.setdefault(ep.name, origin)
                self._problem(
                    f"plugin {ep.name!r}{self._where(ep.name)} failed to import {ep.value}: {type(exc).__name__}: {exc}",
                    exc, plugin=ep.name,
                )
                continue
            if origin == (None, None):
                origin = _distribution_of(plugin)
            self.add(plugin, ep.name, origin)

    def build_registry(self) -> Registry:
        """Every valid component, the built-ins' first: a name already taken is refused for the
        plugin that brings it again, which keeps its other components."""
        registry = Registry(problems=self.problems)
        plugins = sorted(self.pm.list_name_plugin(), key=lambda item: not _is_builtin(item[1]))  # stable
        for plugin_name, plugin in plugins:
            dist, version = self.origins.get(plugin_name, (None, None))
            where = f" ({dist} {version})" if dist else ""
            staged: list[ComponentInfo] = []
            refused: list[str] = []
            try:
                for kind, hook in KINDS.items():
                    others = [p for p in self.pm.get_plugins() if p is not plugin]
                    caller = self.pm.subset_hook_caller(hook, remove_plugins=others)

                    def register(cls: Any, _kind: str = kind) -> None:
                        validate_component(_kind, cls)
                        clash = registry.components[_kind].get(cls.name) or next(
                            (s for s in staged if s.kind == _kind and s.name == cls.name), None
                        )
                        if clash is None:
                            staged.append(ComponentInfo(_kind, cls, plugin_name, dist, version))
                            return
                        message = (f"{_kind.replace('_', '-')} name {cls.name!r} is already registered "
                                   f"by plugin {clash.plugin!r}; choose another name")
                        if self.strict:
                            raise PluginError(message)
                        refused.append(message)

                    caller(register=register)
            except Exception as exc:
                self.pm.unregister(name=plugin_name)
                detail = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
                self._problem(f"plugin {plugin_name!r}{where}: {detail}", exc, plugin=plugin_name)
                continue
            for message in refused:
                self._problem(f"plugin {plugin_name!r}{where}: {message}", plugin=plugin_name, failed=False)
            for info in staged:
                registry.components[info.kind][info.name] = info
        return registry

    def add_commands(self, cli: Any) -> None:
        """Let each plugin add its commands (``register_commands``): one that raises, or that
        would replace a command already there, is skipped alone."""
        for plugin_name, plugin in list(self.pm.list_name_plugin()):
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            caller = self.pm.subset_hook_caller("register_commands", remove_plugins=others)
            before = dict(cli.commands)
            try:
                caller(cli=cli)
                replaced = sorted(n for n, command in before.items() if cli.commands.get(n) is not command)
                if replaced:
                    raise PluginError(f"command(s) {', '.join(replaced)} exist already; choose another name")
            except Exception as exc:
                cli.commands.clear()
                cli.commands.update(before)
                detail = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
                self._problem(f"plugin {plugin_name!r}{self._where(plugin_name)}: register_commands: {detail}", exc,
                              plugin=plugin_name, failed=False)


def _is_builtin(plugin: Any) -> bool:
    return getattr(plugin, "__name__", None) == BUILTINS_MODULE


def _load_order(ep: importlib.metadata.EntryPoint) -> tuple:
    """Built-ins first, then by entry-point name and distribution: the same on every machine,
    whatever order ``importlib.metadata`` finds them in."""
    dist = getattr(ep, "dist", None)
    return (ep.module != BUILTINS_MODULE, ep.name, dist.name if dist is not None else "", ep.value)


def _misspelled(unknown: list[str], exc: BaseException) -> str:
    """Name the unknown hooks and the hook each one was probably meant to be."""
    if not unknown:
        return str(exc)
    known = hookspecs.hook_names()
    parts = []
    for hook in unknown:
        meant = difflib.get_close_matches(hook, known, n=1)
        parts.append(f"{hook!r}" + (f" (did you mean {meant[0]!r}?)" if meant else ""))
    return f"{', '.join(parts)}; the hooks are {', '.join(known)}"


# The process's host, with its entry points loaded, and its registry once a command needs it:
# loading entry points is cheap (plugins' entry modules are light), building the registry
# imports every component (and torch).
_default: tuple[PluginHost, Registry | None] | None = None


def default_host() -> PluginHost:
    """The host with every installed plugin loaded (once per process); no registry built."""
    global _default
    if _default is None:
        host = PluginHost()
        host.load_entry_points()
        _default = (host, None)
    return _default[0]


def get_registry() -> Registry:
    """The registry of every installed plugin (built once per process)."""
    global _default
    host = default_host()
    registry = _default[1]
    if registry is None:
        registry = host.build_registry()
        _default = (host, registry)
    return registry


def reset() -> None:
    """Forget loaded plugins (after installing a plugin at run time, or in tests)."""
    global _default
    _default = None
