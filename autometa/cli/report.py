"""`autometa report`: the HTML report of a stored study."""

from __future__ import annotations

import click

from autometa.store import DEFAULT_DB


@click.command()
@click.argument("study")
@click.option("--db", default=DEFAULT_DB, show_default=True, help="SQLAlchemy URL of the study database.")
@click.option("--output", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder for report.html and the figures' PNGs (default: report-STUDY).")
def report(study, db, output):
    """Write a self-contained HTML report (and PNG figures) about STUDY; print the page's path."""
    from autometa.results.report import build_report

    click.echo(str(build_report(study, db, output)))
