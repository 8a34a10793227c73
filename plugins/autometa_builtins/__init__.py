"""autometa's built-in components, registered through the public hooks like any plugin.

This entry module stays light: every command loads the plugins' entry points (for
``register_commands``), and only the hooks below, run when the registry is built, import the
component modules (and torch).
"""

from autometa.hookspecs import hookimpl


@hookimpl
def register_encoders(register):
    from autometa_builtins.encoders import ENCODERS

    for cls in ENCODERS:
        register(cls)


@hookimpl
def register_fusions(register):
    from autometa_builtins.fusions import FUSIONS

    for cls in FUSIONS:
        register(cls)


@hookimpl
def register_meta_algorithms(register):
    from autometa_builtins.meta_algorithms import META_ALGORITHMS

    for cls in META_ALGORITHMS:
        register(cls)
