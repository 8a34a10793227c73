"""`autometa search`, `predict` and `worker`: run a search, use its saved model, join it from another machine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from autometa.errors import DataError, SearchError
from autometa.study.settings import COMMAND_TIMEOUT, DEFAULT_TRIALS, SearchSettings

DEFAULTS = SearchSettings()  # every default, written once in SearchSettings


@click.command()
@click.argument("data", type=click.Path(path_type=str))
@click.option("--label", required=True, help="Label column (classification).")
@click.option("--group", default=None, help="Group column: one task per group (grouped protocol).")
@click.option("--column", "columns", multiple=True, metavar="NAME:TYPE",
              help="Override a column's type: tabular, text, image, vector or ignore. Repeatable.")
@click.option("--protocol", type=click.Choice(["auto", "fewshot", "grouped", "standard"]), default=DEFAULTS.protocol, show_default=True)
@click.option("--trials", type=int, default=None,
              help="The study's total budget of trials [default: 30; with a --timeout given, as many as it allows, at most 1000].")
@click.option("--timeout", type=float, default=None, metavar="S",
              help=f"The search's seconds from the command's start, the finalists' test scoring and refits included: trials "
                   "stop early enough to leave that time (running ones are scored as trained so far); each trial gets a "
                   f"quarter of it unless --trial-timeout is given [default: none with --trials; else the 30 trials or "
                   f"{COMMAND_TIMEOUT:g} s, whichever ends first; 0: no time limit].")
@click.option("--patience", type=int, default=DEFAULTS.patience, show_default=True, metavar="N",
              help="Stop once the last N completed trials have not beaten the best validation accuracy (running "
                   "trials finish); 0 runs the whole budget.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--db", default=DEFAULTS.db, show_default=True, help="SQLAlchemy URL of the study database.")
@click.option("--study", default=DEFAULTS.study,
              help="Study name (default: DATASET-PROTOCOL-KEY, KEY a hash of the data and the settings).")
@click.option("--devices", default=DEFAULTS.devices, show_default=True,
              help="auto (every GPU, else the CPU), cpu or cuda:0,cuda:1,...")
@click.option("--trials-per-device", type=int, default=DEFAULTS.trials_per_device, show_default=True,
              help="Worker processes per device.")
@click.option("--trial-timeout", type=float, default=DEFAULTS.trial_timeout, metavar="S",
              help="Fail a trial that runs longer than S seconds.")
@click.option("--in-process", is_flag=True,
              help="Run trials in this process, one at a time (no isolation; for debugging).")
@click.option("--steps", type=int, default=DEFAULTS.steps, show_default=True, help="Meta-training steps per trial.")
@click.option("--eval-every", type=int, default=DEFAULTS.eval_every, show_default=True,
              help="Validate (and maybe prune) every N steps.")
@click.option("--ways", type=int, default=DEFAULTS.ways, show_default=True, help="Classes per few-shot episode.")
@click.option("--shots", type=int, default=DEFAULTS.shots, show_default=True,
              help="Labelled support examples per class.")
@click.option("--queries", type=int, default=DEFAULTS.queries, show_default=True,
              help="Query examples per class in episodes.")
@click.option("--validation-tasks", type=int, default=DEFAULTS.validation_tasks, show_default=True)
@click.option("--test-tasks", type=int, default=DEFAULTS.test_tasks, show_default=True)
@click.option("--top-k", type=int, default=DEFAULTS.top_k, show_default=True,
              help="Configurations scored on the test tasks.")
@click.option("--no-ensemble", is_flag=True,
              help="Do not build an ensemble of the best trials (chosen on validation; saved when it beats the best).")
@click.option("--no-refit", is_flag=True,
              help="Score and save learners that fit in one step (gbm, linear) as their trials fitted them, on the training "
                   "rows only, instead of refitted on the training + validation rows.")
@click.option("--image-size", type=int, default=DEFAULTS.image_size[0], show_default=True,
              help="Images are resized to SIZE×SIZE.")
@click.option("--meta-algorithm", "meta_algorithms", multiple=True, metavar="NAME",
              help="Search only these meta-algorithms (repeatable; default: all available).")
@click.option("--fusion", "fusions", multiple=True, metavar="NAME", help="Search only these fusions (repeatable).")
@click.option("--encoder", "encoders", multiple=True, metavar="MODALITY=NAME",
              help="Search only these encoders for a modality (repeatable), e.g. text=hashbag.")
@click.option("--output", default=DEFAULTS.output, show_default=True, metavar="DIR",
              help="Save the best model to DIR/STUDY (for `autometa predict`).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--no-progress", is_flag=True, help="Do not show the live progress bar.")
@click.option("--no-defaults", is_flag=True,
              help="Do not start a new study with one default-parameter trial per meta-algorithm.")
@click.option("--no-warm-start", is_flag=True,
              help="Do not seed a new study with the best configurations of similar datasets.")
@click.option("--warm-start-k", type=int, default=DEFAULTS.warm_start_k, show_default=True, metavar="N",
              help="Warm start draws on the N most similar stored datasets.")
@click.option("--warm-start-configs", type=int, default=DEFAULTS.warm_start_configs, show_default=True, metavar="N",
              help="Configurations warm start seeds in all (round-robin over the similar datasets).")
@click.option("--warm-start-prior", default=None, metavar="FILE",
              help="A knowledge file from `autometa kb export` instead of the one shipped with autometa.")
def search(data, label, group, columns, protocol, trials, timeout, patience, seed, db, study, devices, trials_per_device,
           trial_timeout, in_process, steps, eval_every,
           ways, shots, queries, validation_tasks, test_tasks, top_k, no_ensemble, no_refit, image_size, meta_algorithms, fusions,
           encoders, output, fmt, no_progress, no_defaults, no_warm_start, warm_start_k, warm_start_configs,
           warm_start_prior):
    """Search encoders, fusion and meta-algorithm for DATA (CSV, Parquet, JSON Lines or .npz)."""
    started = time.time()  # --timeout counts importing torch and the rest too: the user waits for them
    from autometa.data.loading import parse_column_overrides
    from autometa.study.engine import search as run_search

    if timeout is None and trials is None:  # the command's default: 30 trials, within a time a user waits for
        timeout, trials = COMMAND_TIMEOUT, DEFAULT_TRIALS
    elif timeout == 0:
        timeout = None
    elif timeout is not None and timeout < 0:
        raise SearchError(f"--timeout must be a number of seconds, or 0 for no time limit; got {timeout:g}")
    settings = DEFAULTS.replace(
        group=group, columns=parse_column_overrides(columns), protocol=protocol, trials=trials, timeout=timeout,
        started=started, patience=patience, seed=seed,
        db=db, study=study, devices=devices, trials_per_device=trials_per_device, trial_timeout=trial_timeout,
        isolate=not in_process, steps=steps, eval_every=eval_every, ways=ways, shots=shots, queries=queries,
        validation_tasks=validation_tasks, test_tasks=test_tasks, top_k=top_k, ensemble=not no_ensemble, refit=not no_refit,
        image_size=(image_size, image_size),
        progress=not no_progress, include=_restrictions(meta_algorithms, fusions, encoders), output=output,
        defaults=not no_defaults, warm_start=not no_warm_start, warm_start_k=warm_start_k,
        warm_start_configs=warm_start_configs, **({"warm_start_prior": warm_start_prior} if warm_start_prior else {}),
    )
    result = run_search(data, label, settings)
    if not result.leaderboard:  # nothing to show or save: a failure, not an empty success
        name = result.study.study_name
        raise SearchError(f"no trial of study {name!r} completed: {result.outcomes()}; "
                          f"`autometa db trials {name} --db {db}` lists every trial with its reason")
    if fmt == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(result.format_leaderboard())


@click.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("data", type=click.Path(path_type=str))
@click.option("--support", default=None, type=click.Path(path_type=str),
              help="Labelled rows to adapt to first (required for few-shot and grouped models).")
@click.option("--output", default=None, type=click.Path(path_type=str),
              help="Write predictions here (.csv or .json); default: CSV on standard output.")
def predict(model, data, support, output):
    """Predict DATA's rows with a MODEL saved by `autometa search`."""
    from autometa.results.artifacts import CONFIG_FILE, WEIGHTS_FILE, load

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


@click.command()
@click.option("--db", required=True, help="SQLAlchemy URL of the search's database (e.g. postgresql://host/db).")
@click.option("--study", required=True, help="Name of the study to join (see `autometa db studies`).")
@click.option("--devices", default=DEFAULTS.devices, show_default=True, help="auto, cpu or cuda:0,cuda:1,...")
@click.option("--trials-per-device", type=int, default=DEFAULTS.trials_per_device, show_default=True)
@click.option("--trial-timeout", type=float, default=None, metavar="S")
@click.option("--data", default=None,
              help="Where the data file is on this machine (default: the path the search used).")
def worker(db, study, devices, trials_per_device, trial_timeout, data):
    """Join an existing search from this machine until its trial budget is used (or the search
    stops starting trials: its --timeout or --patience)."""
    from autometa.study.distributed import join

    finished, stopped = join(db, study, devices=devices, trials_per_device=trials_per_device, trial_timeout=trial_timeout,
                             data=data)
    if stopped:
        click.echo(f"study {study!r}: the search stopped starting trials at {stopped} ({finished} trials finished)")
    else:
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
