"""The plugin guide cannot drift from the hooks: every hookspec is documented with its exact
signature in docs/plugins.md, and every hookspec has a test of its own."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from autometa import hookspecs

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent


def hookspec_functions() -> dict[str, object]:
    # Found through pluggy's marker rather than a list here, so a new hookspec is picked up.
    marker = f"{hookspecs.hookspec.project_name}_spec"
    found = {name: obj for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, marker)}
    assert found, "no hookspecs found in autometa.hookspecs"
    return found


HOOKSPECS = hookspec_functions()


def declaration(function) -> str:
    return f"def {function.__name__}{inspect.signature(function)}"


def test_the_hook_list_is_the_real_one():
    assert {"register_encoders", "register_fusions", "register_meta_algorithms", "register_commands"} <= set(HOOKSPECS)
    assert declaration(HOOKSPECS["register_encoders"]) == "def register_encoders(register)"


@pytest.mark.parametrize("name", sorted(HOOKSPECS))
def test_every_hookspec_is_documented_with_its_exact_signature(name):
    text = GUIDE.read_text(encoding="utf-8")
    signature = declaration(HOOKSPECS[name])
    # A declaration of its own in a code block, not merely a mention in prose.
    pattern = rf"^```python\n{re.escape(signature)}\n```$"
    assert re.search(pattern, text, re.MULTILINE), (
        f"docs/plugins.md does not document the hook {name!r} as a code block holding exactly "
        f"`{signature}`; add it to the hook reference"
    )
    assert re.search(rf"^### {re.escape(name)}$", text, re.MULTILINE), f"docs/plugins.md has no '### {name}' heading"


@pytest.mark.parametrize("name", sorted(HOOKSPECS))
def test_every_hookspec_has_a_test_of_its_own(name):
    users = [
        path.name
        for path in sorted(TESTS.glob("test_*.py"))
        if path.name != Path(__file__).name and re.search(rf"\b{name}\b", path.read_text(encoding="utf-8"))
    ]
    assert users, f"no test file under tests/ (besides {Path(__file__).name}) exercises the hook {name!r}"


def test_documented_hooks_all_exist():
    # The reverse direction: a hook documented under the reference but since removed or renamed.
    text = GUIDE.read_text(encoding="utf-8")
    reference = text.split("## Hook reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^### (\w+)$", reference, re.MULTILINE))
    assert documented == set(HOOKSPECS)


def test_readme_links_the_guide():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    plugins_section = readme.split("## Plugins", 1)[1].split("\n## ", 1)[0]
    assert "(docs/plugins.md)" in plugins_section
