"""The hooks a plugin implements (pluggy project name ``autometa``)."""

import pluggy

hookspec = pluggy.HookspecMarker("autometa")
hookimpl = pluggy.HookimplMarker("autometa")


@hookspec
def register_encoders(register):
    """Call ``register(cls)`` for each autometa.Encoder subclass this plugin provides."""


@hookspec
def register_fusions(register):
    """Call ``register(cls)`` for each autometa.Fusion subclass this plugin provides."""


@hookspec
def register_meta_algorithms(register):
    """Call ``register(cls)`` for each autometa.MetaAlgorithm subclass this plugin provides."""


@hookspec
def register_commands(cli):
    """Add commands to the ``autometa`` command line (a click group)."""


def hook_names() -> list[str]:
    """Every hook a plugin may implement (the functions above that pluggy marks as specs)."""
    marker = f"{hookspec.project_name}_spec"
    return sorted(name for name, obj in globals().items() if callable(obj) and hasattr(obj, marker))
