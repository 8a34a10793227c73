"""`autometa datasets`: build benchmark datasets from data shipped in pip packages."""

from __future__ import annotations

import sys

import click


@click.group()
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

    from autometa.data.builders.kanjivg import ATTRIBUTION, LICENCE, write_kanjivg

    # The delay keeps a bar from flashing up before an immediate error about the arguments.
    with tqdm(total=max(classes, 0), desc="kanjivg", unit="class", disable=no_progress, delay=0.5,
              file=sys.stderr, dynamic_ncols=True) as bar:
        rendered, path, readme = write_kanjivg(output, classes, instances, size=size, seed=seed, progress=bar.update)
    click.echo(
        f"wrote {path}: {len(rendered.labels)} images ({rendered.classes} classes × {rendered.instances} "
        f"instances, {size}×{size}) and {readme.name}; rendered glyphs from {ATTRIBUTION}, {LICENCE}: "
        f"share derived data under the same licence"
    )
