"""autometa's built-in components, registered through the public hooks like any plugin."""

from autometa.hookspecs import hookimpl
from autometa_builtins.encoders import ENCODERS
from autometa_builtins.fusions import FUSIONS
from autometa_builtins.meta_algorithms import META_ALGORITHMS


@hookimpl
def register_encoders(register):
    for cls in ENCODERS:
        register(cls)


@hookimpl
def register_fusions(register):
    for cls in FUSIONS:
        register(cls)


@hookimpl
def register_meta_algorithms(register):
    for cls in META_ALGORITHMS:
        register(cls)
