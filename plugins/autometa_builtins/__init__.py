"""autometa's built-in components, registered through the public hooks like any plugin."""

from autometa.hookspecs import hookimpl

from autometa_builtins import encoders, fusions, meta_algorithms


@hookimpl
def register_encoders(register):
    for cls in (encoders.TabularMLP, encoders.HashBag, encoders.Conv4, encoders.Identity, encoders.VectorMLP):
        register(cls)


@hookimpl
def register_fusions(register):
    for cls in (fusions.Concat, fusions.Attention):
        register(cls)


@hookimpl
def register_meta_algorithms(register):
    for cls in (meta_algorithms.ProtoNet, meta_algorithms.MAML, meta_algorithms.FineTune):
        register(cls)
