"""The ``autometa`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import sys

import click

from autometa import __version__
from autometa.errors import AutometaError


class _Errors(click.Group):
    """Turn autometa's exceptions into one-line messages and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AutometaError as exc:
            click.echo(f"Error: {exc}", err=True)
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
@click.option("--study", default=None, help="Study name (default: dataset-protocol-fingerprint).")
@click.option("--devices", default="auto", show_default=True, help="auto, cpu or cuda:N.")
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
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--no-progress", is_flag=True, help="Do not show the live progress bar.")
def search(data, label, group, columns, protocol, trials, timeout, seed, db, study, devices, steps, eval_every,
           ways, shots, queries, validation_tasks, test_tasks, top_k, image_size, meta_algorithms, fusions,
           encoders, fmt, no_progress):
    """Search encoders, fusion and meta-algorithm for DATA (CSV, Parquet, JSON Lines or .npz)."""
    from autometa.data import parse_column_overrides
    from autometa.study import search as run_search

    result = run_search(
        data, label, group=group, columns=parse_column_overrides(columns), protocol=protocol, trials=trials,
        timeout=timeout, seed=seed, db=db, study=study, devices=devices, steps=steps, eval_every=eval_every,
        ways=ways, shots=shots, queries=queries, validation_tasks=validation_tasks, test_tasks=test_tasks,
        top_k=top_k, image_size=(image_size, image_size), progress=not no_progress,
        include=_restrictions(meta_algorithms, fusions, encoders),
    )
    if fmt == "json":
        click.echo(json.dumps({
            "study": result.study.study_name,
            "protocol": result.split.protocol,
            "leaderboard": [e.as_dict() for e in result.leaderboard],
            "majority_baseline": {"test_accuracy": result.majority.mean, "test_ci95": result.majority.ci95},
        }, indent=2))
    else:
        click.echo(result.format_leaderboard())


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


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def plugins(fmt):
    """List every registered encoder, fusion and meta-algorithm."""
    from autometa.plugins import get_registry

    rows = [info.describe() for info in get_registry().all()]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("kind", "name", "modality", "plugin", "version", "hyperparameters")
    table = [
        (r["kind"], r["name"], r["modality"] or ("protocols: " + ",".join(r["protocols"]) if r["protocols"] else "-"),
         r["plugin"], r["version"] or "-",
         (", ".join(r["hyperparameters"]) or "-") + (f"  [unavailable: {r['unavailable']}]" if r["unavailable"] else ""))
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in (header, *table):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def main() -> None:
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        from autometa.plugins import default_host

        default_host().pm.hook.register_commands(cli=cli)
    except AutometaError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli()
