"""`autometa db`: read-only queries over a study database (and `db upgrade`)."""

from __future__ import annotations

import click

from autometa.store import DEFAULT_DB


@click.group()
def db():
    """Query a study database (read only; `db upgrade` adds autometa's tables to an old one)."""


def _emit(rows: list[dict], fmt: str, raw: bool = False) -> None:
    from autometa.store.queries import format_rows

    click.echo(format_rows(rows, fmt, raw=raw), nl=False)


_db_options = [
    click.option("--db", "url", default=DEFAULT_DB, show_default=True, help="SQLAlchemy URL."),
    click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True),
]


def _with_db_options(function):
    for option in reversed(_db_options):
        function = option(function)
    return function


@db.command("studies")
@_with_db_options
def db_studies(url, fmt):
    """Every study: dataset, protocol, trial counts, best scores, saved model."""
    from autometa.store.queries import studies

    _emit(studies(url), fmt)


@db.command("models")
@_with_db_options
def db_models(url, fmt):
    """Saved best models and where they are."""
    from autometa.store.queries import models

    _emit(models(url), fmt)


@db.command("datasets")
@_with_db_options
def db_datasets(url, fmt):
    """Every stored dataset: source, size, modalities, key meta-features, searches, best score."""
    from autometa.store.queries import datasets

    _emit(datasets(url), fmt)


@db.command("trials")
@click.argument("study")
@_with_db_options
def db_trials(study, url, fmt):
    """STUDY's trials: state, validation accuracy, configuration, device, wall time, reason."""
    from autometa.store.queries import trials

    _emit(trials(url, study), fmt)


@db.command("leaderboard")
@click.argument("study")
@_with_db_options
def db_leaderboard(study, url, fmt):
    """STUDY's finalists with test accuracy ± 95% CI."""
    from autometa.store.queries import leaderboard

    _emit(leaderboard(url, study), fmt)


@db.command("best")
@click.argument("dataset")
@click.option("--protocol", type=click.Choice(["fewshot", "grouped", "standard"]), default=None,
              help="Only searches with this protocol (default: the best of each).")
@_with_db_options
def db_best(dataset, protocol, url, fmt):
    """The best configuration found on DATASET (its name or a fingerprint prefix) and its scores."""
    from autometa.store.queries import best

    _emit(best(url, dataset, protocol), fmt)


@db.command("sql")
@click.argument("statement")
@click.option("--limit", type=int, default=1000, show_default=True, help="Print at most this many rows.")
@click.option("--timeout", type=float, default=30.0, show_default=True, metavar="S", help="Stop the query after S seconds.")
@click.option("--max-bytes", type=int, default=10_000_000, show_default=True, metavar="N",
              help="Print at most N bytes; a larger single value is refused.")
@_with_db_options
def db_sql(statement, limit, timeout, max_bytes, url, fmt):
    """Run one read-only SQL STATEMENT (SELECT ...) over Optuna's and autometa's tables."""
    from autometa.store.queries import sql

    rows, cut = sql(url, statement, limit=limit, timeout=timeout, max_bytes=max_bytes)
    _emit(rows, fmt, raw=True)
    if cut:
        click.echo(f"({cut})", err=True)


@db.command("upgrade")
@click.option("--db", "url", default=DEFAULT_DB, show_default=True, help="SQLAlchemy URL.")
def db_upgrade(url):
    """Add or upgrade autometa's tables (a database from autometa 0.1 is filled from its studies)."""
    from autometa.store.schema import upgrade

    before, after = upgrade(url)
    click.echo(f"{url}: autometa schema version {before} → {after}" if before != after
               else f"{url}: autometa schema version {after}, already current")


@db.command("similar")
@click.argument("data", type=click.Path(path_type=str))
@click.option("--label", required=True, help="Label column of DATA.")
@click.option("--group", default=None, help="Group column of DATA, if any.")
@click.option("--column", "columns", multiple=True, metavar="NAME:TYPE", help="Override a column's type. Repeatable.")
@click.option("--k", "k", type=int, default=10, show_default=True, help="How many datasets to list.")
@click.option("--no-prior", is_flag=True, help="Leave out the knowledge base shipped with autometa.")
@_with_db_options
def db_similar(data, label, group, columns, k, no_prior, url, fmt):
    """Stored datasets most similar to DATA (scaled meta-feature distance), nearest first.

    Lists the database's datasets and those of the shipped knowledge base (origin "prior").
    """
    from autometa.data.loading import parse_column_overrides
    from autometa.store.knowledge import PRIOR_PATH
    from autometa.study.warmstart import similar

    rows = similar(data, label, db=url, prior=None if no_prior else PRIOR_PATH, k=k, group=group,
                   columns=parse_column_overrides(columns))
    if fmt == "table":  # a distance is not a fraction: keep the table from printing it as a percentage
        rows = [{**r, "distance": f"{r['distance']:.3f}"} for r in rows]
    _emit(rows, fmt)
