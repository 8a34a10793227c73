"""The ``autometa`` command line: a thin layer over the Python API."""

from __future__ import annotations

import gc
import logging
import signal
import sys

import click

from autometa._version import __version__
from autometa.cli.datasets import datasets
from autometa.cli.db import db
from autometa.cli.kb import kb
from autometa.cli.plugins import plugins
from autometa.cli.report import report
from autometa.cli.search import predict, search, worker
from autometa.errors import AutometaError, Terminated
from autometa.plugins import default_host


def _terminate(signum, frame) -> None:
    raise Terminated


class _Errors(click.Group):
    """Turn autometa's exceptions, and a file that cannot be written or read, into one-line
    messages and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AutometaError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)
        except OSError as exc:
            if exc.filename is None:  # not about a path the user gave: a bug to see in full
                raise
            click.echo(f"Error: {exc.filename}: {exc.strerror or exc}; check the path (and its folder) and try again",
                       err=True)
            ctx.exit(1)
        except Terminated:
            click.echo("terminated", err=True)
            ctx.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Errors)
@click.version_option(__version__, prog_name="autometa")
def cli() -> None:
    """AutoML for multimodal data fusion with meta-learning."""


for command in (search, predict, worker, plugins, datasets, report, db, kb):
    cli.add_command(command)


def main() -> None:
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        default_host().add_commands(cli)
    except AutometaError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    try:
        cli()
    finally:
        # Everything the command makes is written by now. At exit Python's last garbage collections
        # would walk every object left (a search: hundreds of thousands, ~1.5 s on 2 cores); frozen,
        # they are skipped and the operating system frees the memory.
        gc.freeze()
