"""autometa's exceptions: library code raises these, only the CLI turns them into exit codes."""


class AutometaError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class DataError(AutometaError):
    """The input data cannot be used as given (file, column, labels, images)."""


class PluginError(AutometaError):
    """A plugin or one of its components is invalid; the message names the plugin."""


class ProtocolError(AutometaError):
    """The data does not fit the chosen task protocol (too few classes, groups or examples)."""


class SearchError(AutometaError):
    """The search cannot run as configured (no usable plugins, bad devices, bad database)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, ``kill``), raised by the CLI's handler: handled as Ctrl-C
    is, so a search marks its running trials failed, records itself interrupted and removes its
    temporary files, where Python's default would end the process on the spot."""


def one_line(message: object, limit: int | None = 300) -> str:
    """``message`` on one line, cut to ``limit`` characters when given (for quoting it in another)."""
    text = " ".join(str(message).split())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none: the part of a
    library's error worth quoting in one of ours."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
