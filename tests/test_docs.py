"""The README and the pages under docs/ cannot drift from the project: every relative link
reaches a file (and a heading, when it names one), every page is reachable from the README,
and docs/cli.md documents every command and option the CLI has."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from autometa.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
CLI_REFERENCE = DOCS / "cli.md"

# Written on another branch (the side-by-side AutoML benchmark); the README links it already.
# Remove this entry once the page exists: from then on its links and anchors are checked too.
NOT_YET_WRITTEN = {DOCS / "automl-benchmark.md"}

FENCE = re.compile(r"^\s*```.*?^\s*```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text outside code: a `](` in a code sample is not a link, a `#` line not a heading."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The fragment ids GitHub gives the page's headings: lowercased, punctuation dropped,
    spaces as dashes, a repeated id numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: ...


def test_anchors_follow_githubs_rule():
    assert {"does-fusion-pay-bundled-example", "the-backbones-auxiliary-loss-cross-modal-mapping",
            "the-scaffold-autometa-plugins-new", "autometa-db-sql"} <= set().union(*map(anchors, PAGES))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if destination in NOT_YET_WRITTEN and not destination.exists():
            continue
        if not destination.exists():
            broken.append(f"{target}: no file {destination.relative_to(ROOT)}")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no heading '#{fragment}' in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: " + "; ".join(dict.fromkeys(broken))


def test_the_link_check_finds_links():
    # A parser that found nothing would pass the test above on any README.
    targets = relative_links(README)
    assert "docs/plugins.md" in targets and "docs/report-screenshot.png" in targets
    assert "docs/benchmarks.md#meta-gradient-throughput" in targets


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(README)}
    orphans = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not orphans, f"docs pages no README link reaches: {orphans}; add them to its Documentation list"


def test_the_readme_stays_short():
    # Long material belongs in docs/ (the README is read in five minutes).
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move long sections to a page under docs/"


def commands(group: click.Group, path: tuple[str, ...] = ()):
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


COMMANDS = dict(commands(cli))


def reference_sections() -> dict[str, str]:
    """docs/cli.md's sections by the command their heading names (`## autometa db`)."""
    text = CLI_REFERENCE.read_text(encoding="utf-8")
    parts = re.split(r"^#{2,3} autometa (.+)$", text, flags=re.MULTILINE)
    return {name.strip(): body for name, body in zip(parts[1::2], parts[2::2])}


def test_the_cli_walk_sees_every_command():
    assert {("search",), ("db", "sql"), ("kb", "build"), ("plugins", "new"), ("datasets", "kanjivg")} <= set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_the_cli_reference_documents_every_command_and_option(path):
    sections = reference_sections()
    name = " ".join(path)
    assert name in sections, f"docs/cli.md has no '## autometa {name}' (or ###) section"
    # An option by its long name (`--label`), an argument by the name --help shows (`DATA`).
    names = [param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
             for param in COMMANDS[path].params]
    missing = [word for word in names if not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", sections[name])]
    assert not missing, f"docs/cli.md's section on 'autometa {name}' does not mention {missing}"


def test_the_cli_reference_documents_only_real_commands():
    unknown = set(reference_sections()) - {" ".join(path) for path in COMMANDS}
    assert not unknown, f"docs/cli.md documents commands the CLI lacks: {sorted(unknown)}"
