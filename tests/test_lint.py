"""pyflakes over the project's own code and over every plugin the scaffold writes (its
templates are code a user starts from: an unused import or undefined name there is a bug).

A line marked ``# noqa`` is exempt (e.g. names re-exported on purpose).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pyflakes_checker = pytest.importorskip("pyflakes.checker", reason="pyflakes comes with the test extra")

from autometa.cli.plugins import scaffold  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OWN_CODE = ("autometa", "plugins", "benchmarks", "tests")


def problems(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    checker = pyflakes_checker.Checker(ast.parse(source, filename=str(path)), filename=str(path))
    return [
        f"{path}:{m.lineno}: {m.message % m.message_args}"
        for m in checker.messages
        if "noqa" not in lines[m.lineno - 1]
    ]


def test_own_code_has_no_pyflakes_problems():
    found = [p for folder in OWN_CODE for path in sorted((ROOT / folder).rglob("*.py"))
             if ".venv" not in path.parts for p in problems(path)]
    assert found == []


@pytest.mark.parametrize(
    "kind, modality",
    [("encoder", "tabular"), ("encoder", "vector"), ("encoder", "text"), ("encoder", "image"),
     ("fusion", None), ("meta-algorithm", None)],
)
def test_scaffolded_plugins_have_no_pyflakes_problems(tmp_path, kind, modality):
    target = scaffold(f"lint_{(modality or kind).replace('-', '_')}", kind, modality=modality, output=tmp_path)
    sources = sorted(target.rglob("*.py"))
    assert len(sources) >= 2  # the plugin module and its tests
    assert [p for path in sources for p in problems(path)] == []
