"""autometa: AutoML for multimodal data fusion with meta-learning."""

__version__ = "0.1.0"

from autometa.artifacts import Model, load  # noqa: E402
from autometa.components import Backbone, Encoder, Fusion, InputSpec, MetaAlgorithm  # noqa: E402
from autometa.data import Dataset, load_dataset  # noqa: E402
from autometa.errors import AutometaError, DataError, PluginError, ProtocolError, SearchError  # noqa: E402
from autometa.hookspecs import hookimpl  # noqa: E402
from autometa.study import search  # noqa: E402

__all__ = [
    "AutometaError", "Backbone", "DataError", "Dataset", "Encoder", "Fusion", "InputSpec", "MetaAlgorithm",
    "Model", "PluginError", "ProtocolError", "SearchError", "hookimpl", "load", "load_dataset", "search",
    "__version__",
]
