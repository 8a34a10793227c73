"""``autometa plugins new`` and the worked example plugin.

The fast tests check names, errors and that every template passes autometa.testing when
imported straight from its folder. The slow ones install scaffolds of all three kinds and
plugins/examples/autometa-bilinear with ``pip install -e``, show them discovered, run their own
tests unchanged, and run short searches that are forced to use them.

Installs go into a virtual environment layered over the running one (it sees the running
environment's packages, autometa included, but pip writes only into it): other test runs on
the same machine never see these plugins, and a killed run leaves nothing installed behind.
This process sees them through sys.path entries added for the module's tests and removed after.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

import autometa
import autometa.cli.main
import autometa.plugins
from autometa.cli.plugins import scaffold
from autometa.errors import PluginError
from autometa.testing import check_component

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "plugins" / "examples" / "autometa-bilinear"
# name, --kind, and the search flags that force the component (with a fast meta-algorithm).
SCAFFOLDS = {
    "encoder": ("scaff_enc", ["--encoder", "tabular=scaff_enc", "--meta-algorithm", "protonet"]),
    "fusion": ("scaff_fus", ["--fusion", "scaff_fus", "--meta-algorithm", "protonet"]),
    "meta-algorithm": ("scaff_meta", ["--meta-algorithm", "scaff_meta"]),
}


def new(*args):
    return CliRunner().invoke(autometa.cli.main.cli, ["plugins", "new", *args])


# --------------------------------------------------------------------------- names and errors


@pytest.mark.parametrize(
    "given, component",
    [("wide", "wide"), ("Wide-MLP", "wide_mlp"), ("wide mlp", "wide_mlp"), ("autometa-wide", "wide"),
     ("v2_fusion", "v2_fusion")],
)
def test_name_becomes_component_package_and_distribution(tmp_path, fresh_registry, given, component):
    result = new(given, "--kind", "fusion", "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    dist = "autometa-" + component.replace("_", "-")
    target = tmp_path / dist
    assert f"created {target}" in result.output
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "README.md", "pyproject.toml", f"src/autometa_{component}/__init__.py", f"tests/test_autometa_{component}.py",
    ]
    source = (target / f"src/autometa_{component}/__init__.py").read_text()
    assert f'name = "{component}"' in source
    if tomllib is not None:
        project = tomllib.loads((target / "pyproject.toml").read_text())
        assert project["project"]["name"] == dist
        assert project["project"]["entry-points"]["autometa"] == {component: f"autometa_{component}"}
        assert project["build-system"]["build-backend"] == "setuptools.build_meta"
        assert any(dep.startswith("autometa") for dep in project["project"]["dependencies"])


@pytest.mark.parametrize("bad", ["1abc", "_x", "x_", "a__b", "héllo", "a.b", "", "autometa-"])
def test_invalid_names_are_refused(tmp_path, fresh_registry, bad):
    result = new(bad, "--kind", "encoder", "--output", str(tmp_path))
    assert result.exit_code == 1
    assert f"Error: {bad!r} cannot become a component name" in result.output
    assert "e.g. 'wide_mlp'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_refused_but_an_empty_one_is_used(tmp_path, fresh_registry):
    (tmp_path / "autometa-taken").mkdir()
    (tmp_path / "autometa-taken" / "notes.txt").write_text("mine")
    result = new("taken", "--kind", "encoder", "--output", str(tmp_path))
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'autometa-taken'} already exists and is not an empty folder" in result.output
    assert [p.name for p in (tmp_path / "autometa-taken").iterdir()] == ["notes.txt"]
    (tmp_path / "autometa-empty").mkdir()
    assert new("empty", "--kind", "encoder", "--output", str(tmp_path)).exit_code == 0
    assert (tmp_path / "autometa-empty" / "pyproject.toml").is_file()


def test_name_taken_by_an_installed_component_is_refused(tmp_path, fresh_registry):
    result = new("mlp", "--kind", "encoder", "--output", str(tmp_path))
    assert result.exit_code == 1
    assert "encoder name 'mlp' is already registered by plugin 'builtins'" in result.output
    # Names are per kind: a fusion may be called mlp.
    assert new("mlp", "--kind", "fusion", "--output", str(tmp_path)).exit_code == 0


def test_modality_is_for_encoders_only(tmp_path, fresh_registry):
    result = new("x", "--kind", "fusion", "--modality", "text", "--output", str(tmp_path))
    assert result.exit_code == 2 and "only encoders have a modality" in result.output
    with pytest.raises(PluginError, match="only encoders have a modality"):
        scaffold("x", "meta-algorithm", modality="text", output=tmp_path)
    result = new("x", "--kind", "encoder", "--modality", "audio", "--output", str(tmp_path))
    assert result.exit_code == 2
    assert new("x", "--kind", "encoder", "--output", str(tmp_path)).exit_code == 0
    assert 'modality = "tabular"' in (tmp_path / "autometa-x/src/autometa_x/__init__.py").read_text()


# --------------------------------------------------------------------------- templates


def _load_scaffold(target: Path, package: str):
    spec = importlib.util.spec_from_file_location(f"_scaffold_{package}", target / "src" / package / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "kind, modality",
    [("encoder", "tabular"), ("encoder", "vector"), ("encoder", "text"), ("encoder", "image"),
     ("fusion", None), ("meta-algorithm", None)],
)
def test_every_template_passes_the_conformance_checks(tmp_path, fresh_registry, kind, modality):
    name = f"tpl_{(modality or kind).replace('-', '_')}"
    target = scaffold(name, kind, modality=modality, output=tmp_path)
    module = _load_scaffold(target, f"autometa_{name}")
    classes = [v for v in vars(module).values() if isinstance(v, type) and getattr(v, "name", None) == name]
    assert len(classes) == 1
    check_component(classes[0], device="cpu")
    registered = []
    hook = {"encoder": "register_encoders", "fusion": "register_fusions",
            "meta-algorithm": "register_meta_algorithms"}[kind]
    getattr(module, hook)(registered.append)
    assert registered == classes


# --------------------------------------------------------------------------- packaging


def test_the_example_plugin_is_not_packaged_with_autometa():
    """plugins/examples/ holds separate distributions: autometa's own find must skip them."""
    setuptools = pytest.importorskip("setuptools")
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set()
    for where in config["where"]:
        found |= set(setuptools.find_namespace_packages(where=str(ROOT / where), include=config["include"]))
    assert {"autometa", "autometa_builtins"} <= found
    stray = sorted(p for p in found if p.split(".")[0] not in ("autometa", "autometa_builtins"))
    assert not stray, f"autometa's wheel would also contain {stray}"
    assert (EXAMPLE / "src" / "autometa_bilinear" / "__init__.py").is_file()


# --------------------------------------------------------------------------- installed (slow)


class Overlay:
    """A virtual environment that sees the running environment's packages (autometa included)
    while pip installs into it alone."""

    def __init__(self, root: Path):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
        self.python = root / ("Scripts" if os.name == "nt" else "bin") / "python"
        self.site = Path(self.run_python("import sysconfig; print(sysconfig.get_path('purelib'))").strip())
        # Not --system-site-packages: when the tests run in a virtual environment, that would
        # give the base interpreter's packages rather than the running environment's. addsitedir
        # (unlike a plain path line) also runs their .pth files, e.g. autometa's editable finder.
        running = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
        (self.site / "_running_environment.pth").write_text(
            "".join(f"import site; site.addsitedir({folder!r})\n" for folder in running if os.path.isdir(folder))
        )

    def run_python(self, code: str) -> str:
        return subprocess.run([self.python, "-c", code], check=True, capture_output=True, text=True).stdout

    def pip(self, *args: str) -> None:
        # The running environment's pip, run by the overlay's interpreter, installs into the overlay.
        done = subprocess.run([self.python, "-m", "pip", *args], capture_output=True, text=True)
        assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    def paths_under(self, folder: Path) -> list[str]:
        """The overlay's sys.path entries inside ``folder``: its site-packages and the source
        folders of its editable installs, to lend this process what was installed."""
        paths = json.loads(self.run_python("import json, sys; print(json.dumps(sys.path))"))
        return [p for p in paths if Path(p).resolve().is_relative_to(folder.resolve())]


def write_csv(path: Path) -> Path:
    """60 rows, 3 separable classes, 4 numeric columns and a text column."""
    rng = np.random.default_rng(0)
    words = {"a": "apple orchard crisp", "b": "banana peel yellow", "c": "cherry stone red"}
    rows = []
    for i in range(60):
        label = "abc"[i % 3]
        center = "abc".index(label) * 3.0
        rows.append({**{f"x{j}": center + rng.normal() for j in range(4)},
                     "note": f"{words[label]} item number {i} with some filler words", "label": label})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The three scaffolds and a copy of the worked example, installed editable into an
    overlay environment that this process sees too; their own tests run once, here."""
    pytest.importorskip("setuptools", reason="building the plugins without network access needs setuptools")
    root = tmp_path_factory.mktemp("plugins")
    overlay = Overlay(root / "venv")
    strict = os.environ.pop("AUTOMETA_STRICT_PLUGINS", None)
    autometa.plugins.reset()
    targets = {kind: scaffold(name, kind, output=root) for kind, (name, _) in SCAFFOLDS.items()}
    # A copy, so that building and testing write nothing into the repository.
    targets["example"] = root / EXAMPLE.name
    shutil.copytree(EXAMPLE, targets["example"], ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", ".*"))
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    try:
        overlay.pip("install", "--no-build-isolation", "--no-deps", "--quiet",
                    *[arg for target in targets.values() for arg in ("-e", str(target))])
        sys.path.extend(overlay.paths_under(root))
        importlib.invalidate_caches()
        autometa.plugins.reset()
        report = root / "report.xml"
        # The packages' tests as their authors run them: unchanged, by the installed interpreter.
        tests = subprocess.run(
            [overlay.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
             *[str(target / "tests") for target in targets.values()]],
            capture_output=True, text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        yield {"root": root, "tests": tests, "report": report, "data": write_csv(root / "data.csv")}
    finally:
        try:
            overlay.pip("uninstall", "--yes", "--quiet", *[f"autometa-{name.replace('_', '-')}"
                                                           for name, _ in SCAFFOLDS.values()], "autometa-bilinear")
        finally:
            sys.path[:] = saved_path
            for name in set(sys.modules) - saved_modules:
                if name.startswith(("autometa_scaff", "autometa_bilinear")):
                    del sys.modules[name]
            importlib.invalidate_caches()
            if strict is not None:
                os.environ["AUTOMETA_STRICT_PLUGINS"] = strict
            autometa.plugins.reset()


def own_test_results(installed, package: str) -> dict[str, str]:
    """Outcome of each of ``package``'s own tests in the run made by the fixture."""
    results = {}
    for case in ET.parse(installed["report"]).getroot().iter("testcase"):
        if package in case.get("classname", ""):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            results[case.get("name")] = outcome
    return results


def forced_search(installed, flags: list[str], study_db: str):
    result = CliRunner().invoke(autometa.cli.main.cli, [
        "search", str(installed["data"]), "--label", "label", "--column", "note:text", "--trials", "1",
        "--steps", "5", "--eval-every", "5", "--no-progress", "--format", "json", "--db", study_db,
        "--output", str(installed["root"] / "models"), *flags,
    ])
    assert result.exit_code == 0, result.output
    name = json.loads(result.stdout)["study"]
    [trial] = optuna.load_study(study_name=name, storage=study_db).get_trials(deepcopy=False)
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    # The saved model is rebuilt from the plugin's classes (meta-algorithms: setup on PoolInfo).
    rows = pd.read_csv(installed["data"]).drop(columns="label").head(5)
    predictions = autometa.load(installed["root"] / "models" / name).predict(rows)
    assert len(predictions) == 5 and set(predictions["prediction"]) <= {"a", "b", "c"}
    return trial


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SCAFFOLDS))
def test_installed_scaffold_is_discovered(installed, kind):
    name, _ = SCAFFOLDS[kind]
    dist = f"autometa-{name.replace('_', '-')}"
    assert importlib.metadata.version(dist) == "0.1.0"
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    row = rows[name]
    assert (row["kind"], row["plugin"], row["distribution"], row["version"]) == (
        kind.replace("-", "_"), name, dist, "0.1.0")
    plugins = {row["plugin"]: row for row in json.loads(
        CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--by", "plugin", "--format", "json"]).stdout)}
    hook = {"encoder": "register_encoders", "fusion": "register_fusions",
            "meta-algorithm": "register_meta_algorithms"}[kind]
    assert plugins[name]["hooks"] == [hook]
    assert plugins[name]["components"][kind.replace("-", "_")] == [name]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SCAFFOLDS))
def test_installed_scaffold_passes_its_own_tests(installed, kind):
    name, _ = SCAFFOLDS[kind]
    results = own_test_results(installed, f"test_autometa_{name}")
    assert results, installed["tests"].stdout[-3000:]
    failed = {test: outcome for test, outcome in results.items() if outcome in ("failure", "error")}
    assert not failed, f"{failed}\n{installed['tests'].stdout[-5000:]}"
    assert results.get("test_conformance[" + f"{kind.replace('-', '_')}:{name}]") == "passed"
    assert results.get("test_registered_through_its_entry_point") == "passed"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SCAFFOLDS))
def test_forced_search_uses_the_scaffold(installed, kind):
    name, flags = SCAFFOLDS[kind]
    trial = forced_search(installed, flags, f"sqlite:///{installed['root'] / f'{name}.db'}")
    key = {"encoder": "encoder.tabular", "fusion": "fusion", "meta-algorithm": "meta_algorithm"}[kind]
    assert trial.params[key] == name


@pytest.mark.slow
def test_example_passes_the_conformance_checks(installed):
    from autometa_bilinear import Bilinear

    check_component(Bilinear, device="cpu")
    results = own_test_results(installed, "test_bilinear")
    assert results and not {t: o for t, o in results.items() if o in ("failure", "error")}, (
        installed["tests"].stdout[-5000:])
    assert results["test_hand_computed_values_with_missing_modalities"] == "passed"


@pytest.mark.slow
def test_example_is_listed(installed):
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.split()[1:2] == ["bilinear"])
    assert line.split()[:5] == ["fusion", "bilinear", "-", "bilinear", "0.1.0"]
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--by", "plugin", "--hook", "register_fusions"])
    line = next(line for line in result.stdout.splitlines() if line.startswith("bilinear "))
    assert line.split() == ["bilinear", "autometa-bilinear", "0.1.0", "register_fusions", "fusion:", "bilinear", "loaded"]


@pytest.mark.slow
def test_forced_search_uses_the_example(installed):
    trial = forced_search(installed, ["--fusion", "bilinear", "--meta-algorithm", "protonet"],
                          f"sqlite:///{installed['root'] / 'bilinear.db'}")
    assert trial.params["fusion"] == "bilinear"
    assert {"fusion.bilinear.rank", "fusion.bilinear.out_dim", "fusion.bilinear.dropout"} <= set(trial.params)
