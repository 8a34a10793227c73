"""``autometa plugins`` views (by component, by plugin, filtered by hook), the
``register_commands`` hook, and pluggy tracing through AUTOMETA_TRACE_PLUGINS."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from optuna.distributions import IntDistribution
from torch import nn

import autometa
import autometa.cli.main
import autometa.plugins
from autometa.hookspecs import hook_names, hookimpl
from autometa.plugins import TRACE_ENV, PluginHost


class Plugin:
    """A hashable plugin object whose attributes are hook implementations."""

    def __init__(self, **hooks):
        for name, function in hooks.items():
            setattr(self, name, function)


class ListedEncoder(autometa.Encoder):
    name = "listed_encoder"
    modality = "vector"
    search_space = {"width": IntDistribution(2, 8)}

    def __init__(self, spec, *, width=4):
        super().__init__()
        self.linear = nn.Linear(spec.shape[0], width)
        self.out_dim = width

    def forward(self, x):
        return self.linear(x)


@hookimpl
def register_encoders(register):
    register(ListedEncoder)


@hookimpl
def register_commands(cli):
    @cli.command()
    @click.argument("who")
    def greet(who):
        """A command added by a plugin."""
        click.echo(f"hello {who} from a plugin")


@pytest.fixture
def installed(monkeypatch):
    """The global registry as if two more plugins were installed beside the built-ins:
    'encoders' (register_encoders) and 'commands' (register_commands only)."""
    monkeypatch.delenv("AUTOMETA_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv(TRACE_ENV, raising=False)
    host = PluginHost(strict=True)
    host.load_entry_points()
    assert host.add(Plugin(register_encoders=register_encoders), "encoders", ("autometa-listed", "2.0.1"))
    assert host.add(Plugin(register_commands=register_commands), "commands")
    monkeypatch.setattr(autometa.plugins, "_default", (host, host.build_registry()))
    yield host
    autometa.plugins.reset()


def invoke(*args):
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_hook_names_are_the_hookspecs():
    assert hook_names() == sorted(["register_commands", "register_encoders", "register_fusions",
                                   "register_meta_algorithms"])


def test_list_subcommand_is_the_default_listing(installed):
    assert invoke("list") == invoke()
    assert invoke("list", "--format", "json") == invoke("--format", "json")
    assert invoke().splitlines()[0].split() == ["kind", "name", "modality", "plugin", "version", "hyperparameters"]


def test_by_plugin_json(installed):
    rows = {row["plugin"]: row for row in json.loads(invoke("--by", "plugin", "--format", "json"))}
    assert list(rows) == ["builtins", "encoders", "commands"]  # load order
    builtins = rows["builtins"]
    assert (builtins["distribution"], builtins["version"]) == ("autometa", autometa.__version__)
    assert builtins["hooks"] == ["register_encoders", "register_fusions", "register_meta_algorithms"]
    assert "mlp" in builtins["components"]["encoder"] and "concat" in builtins["components"]["fusion"]
    assert "protonet" in builtins["components"]["meta_algorithm"]
    assert rows["encoders"] == {
        "plugin": "encoders", "distribution": "autometa-listed", "version": "2.0.1", "status": "loaded",
        "hooks": ["register_encoders"], "components": {"encoder": ["listed_encoder"], "fusion": [], "meta_algorithm": []},
        "problems": [],
    }
    assert rows["commands"]["hooks"] == ["register_commands"]
    assert rows["commands"]["distribution"] is None
    assert rows["commands"]["components"] == {"encoder": [], "fusion": [], "meta_algorithm": []}


def test_by_plugin_table(installed):
    lines = invoke("--by", "plugin").splitlines()
    assert lines[0].split() == ["plugin", "distribution", "version", "hooks", "components", "status"]
    row = next(line for line in lines if line.startswith("encoders "))
    assert row.split() == ["encoders", "autometa-listed", "2.0.1", "register_encoders", "encoder:", "listed_encoder",
                           "loaded"]
    row = next(line for line in lines if line.startswith("commands "))
    assert row.split() == ["commands", "-", "-", "register_commands", "-", "loaded"]


def test_hook_filters_plugins(installed):
    rows = json.loads(invoke("--by", "plugin", "--hook", "register_commands", "--format", "json"))
    assert [row["plugin"] for row in rows] == ["commands"]
    rows = json.loads(invoke("--by", "plugin", "--hook", "register_encoders", "--format", "json"))
    assert [row["plugin"] for row in rows] == ["builtins", "encoders"]
    # In the component view, the components of the plugins implementing the hook.
    rows = json.loads(invoke("--hook", "register_encoders", "--format", "json"))
    assert {row["plugin"] for row in rows} == {"builtins", "encoders"}
    assert json.loads(invoke("--hook", "register_commands", "--format", "json")) == []
    assert {r["plugin"] for r in json.loads(invoke("list", "--hook", "register_fusions", "--format", "json"))} == {
        "builtins"
    }


def test_misspelled_hook_lists_the_valid_ones(installed):
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--hook", "register_encoder"])
    assert result.exit_code == 2
    assert "'register_encoder' is not one of" in result.output
    for name in hook_names():
        assert name in result.output


def test_register_commands_adds_a_working_command(installed):
    group = click.Group("autometa")  # not the real one: a test must not leave commands on it
    installed.pm.hook.register_commands(cli=group)
    assert "greet" in group.commands
    result = CliRunner().invoke(group, ["greet", "you"])
    assert result.exit_code == 0 and result.output == "hello you from a plugin\n"


def test_trace_env_writes_pluggy_trace_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv(TRACE_ENV, "1")
    host = PluginHost(strict=True)
    host.add(Plugin(register_encoders=register_encoders), "traced")
    registry = host.build_registry()
    assert "listed_encoder" in registry.components["encoder"]
    err = capsys.readouterr().err
    assert "register_encoders [hook]" in err
    assert "implemented by traced [hook]" in err
    assert "finish register_encoders --> [] [hook]" in err
    # register_fusions is called for this plugin too; it implements nothing there.
    assert "implemented by no plugin [hook]" in err


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_no_trace_by_default(monkeypatch, capsys, value):
    monkeypatch.setenv(TRACE_ENV, value)
    host = PluginHost(strict=True)
    host.add(Plugin(register_encoders=register_encoders), "quiet")
    host.build_registry()
    assert capsys.readouterr().err == ""
