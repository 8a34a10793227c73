"""The plugin host: registration rules, non-strict skipping, entry-point discovery and the
``autometa plugins`` command."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import logging
import re
import sys
import types

import autometa_builtins
import optuna
import pytest
import torch
from autometa_builtins.encoders import ENCODERS
from autometa_builtins.fusions import FUSIONS
from autometa_builtins.meta_algorithms import META_ALGORITHMS
from click.testing import CliRunner
from helpers import make_distribution
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from torch import nn

import autometa.cli.main
import autometa.plugins
from autometa.components import Component, Encoder, Fusion, InputSpec, MetaAlgorithm, suggest_value
from autometa.errors import PluginError
from autometa.hookspecs import hookimpl
from autometa.plugins import PluginHost

# Every component the built-in plugin registers, from its own registration lists.
BUILTINS = {
    **{cls.name: "encoder" for cls in ENCODERS},
    **{cls.name: "fusion" for cls in FUSIONS},
    **{cls.name: "meta_algorithm" for cls in META_ALGORITHMS},
}
# The original ones, which must stay available under these names.
assert {"mlp", "hashbag", "conv4", "identity", "vector_mlp", "concat", "attention", "protonet", "maml", "finetune"} <= set(BUILTINS)
LOGGER = "autometa.plugins"


# --------------------------------------------------------------------------- helpers


class Plugin:
    """A hashable plugin object holding hook implementations as attributes (pluggy hashes
    plugins, so ``types.SimpleNamespace`` is rejected: see the test below)."""

    def __init__(self, **hooks):
        for name, function in hooks.items():
            setattr(self, name, function)


def make_plugin(encoders=(), fusions=(), meta_algorithms=()):
    """A plugin object whose hooks register the given classes (a hook only when non-empty)."""
    hooks = {}
    if encoders:

        @hookimpl
        def register_encoders(register):
            for cls in encoders:
                register(cls)

        hooks["register_encoders"] = register_encoders
    if fusions:

        @hookimpl
        def register_fusions(register):
            for cls in fusions:
                register(cls)

        hooks["register_fusions"] = register_fusions
    if meta_algorithms:

        @hookimpl
        def register_meta_algorithms(register):
            for cls in meta_algorithms:
                register(cls)

        hooks["register_meta_algorithms"] = register_meta_algorithms
    return Plugin(**hooks)


def build(*plugins, strict=True):
    """Add ``(name, plugin)`` pairs to a fresh host and build its registry."""
    host = PluginHost(strict=strict)
    for name, plugin in plugins:
        assert host.add(plugin, name)
    return host, host.build_registry()


def names(registry, kind):
    return set(registry.components[kind])


def expect_rejected(plugin, *patterns, name="myplugin"):
    """Strict mode raises a PluginError naming ``name`` and matching every pattern."""
    host = PluginHost(strict=True)
    assert host.add(plugin, name)
    with pytest.raises(PluginError, match=re.escape(f"plugin {name!r}")) as info:
        host.build_registry()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert "strict mode" in message
    return message


# --------------------------------------------------------------------------- valid components


class GoodEncoder(Encoder):
    name = "good_encoder"
    modality = "tabular"
    search_space = {"width": IntDistribution(4, 32)}

    def __init__(self, spec: InputSpec, *, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(spec.shape[0], width)
        self.out_dim = width

    def forward(self, x):
        return self.linear(x)


class GoodTextEncoder(Encoder):
    name = "good_text"
    modality = "text"

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.embedding = nn.Embedding(spec.vocab_size, 4)
        self.out_dim = 4


class GoodFusion(Fusion):
    name = "good_fusion"
    search_space = {"scale": FloatDistribution(0.1, 10.0, log=True)}

    def __init__(self, in_dims, *, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.out_dim = sum(in_dims.values())


class GoodMeta(MetaAlgorithm):
    name = "good_meta"
    protocols = ("fewshot",)
    search_space = {
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "steps": IntDistribution(1, 5),
        "mode": CategoricalDistribution(["a", "b"]),
    }

    def __init__(self, *, lr: float = 1e-3, steps: int = 2, mode: str = "a"):
        self.lr, self.steps, self.mode = lr, steps, mode


def test_valid_plugin_registers_all_three_kinds():
    host, registry = build(
        ("myplugin", make_plugin([GoodEncoder, GoodTextEncoder], [GoodFusion], [GoodMeta]))
    )
    assert registry.problems == []
    assert names(registry, "encoder") == {"good_encoder", "good_text"}
    assert names(registry, "fusion") == {"good_fusion"}
    assert names(registry, "meta_algorithm") == {"good_meta"}
    info = registry.get("encoder", "good_encoder")
    assert info.cls is GoodEncoder and info.plugin == "myplugin" and info.modality == "tabular"
    assert info.distribution is None and info.version is None
    assert registry.get("fusion", "good_fusion").modality is None
    assert [i.name for i in registry.encoders_for("text")] == ["good_text"]
    assert [i.name for i in registry.meta_algorithms_for("fewshot")] == ["good_meta"]
    assert registry.meta_algorithms_for("standard") == []
    described = registry.get("meta_algorithm", "good_meta").describe()
    assert described["protocols"] == ["fewshot"]
    assert set(described["hyperparameters"]) == {"lr", "steps", "mode"}


def test_registry_get_unknown_name_lists_available():
    _, registry = build(("myplugin", make_plugin([GoodEncoder])))
    with pytest.raises(PluginError, match=r"no encoder named 'nope' is registered \(available: good_encoder\)"):
        registry.get("encoder", "nope")
    with pytest.raises(PluginError, match=r"no meta-algorithm named 'x'.*available: none"):
        registry.get("meta_algorithm", "x")


# --------------------------------------------------------------------------- 1. one test per rule


def test_rejects_class_that_is_not_a_subclass_of_the_kind_base():
    class NotAnEncoder(nn.Module):
        name = "not_an_encoder"
        modality = "tabular"
        search_space = {}

    expect_rejected(
        make_plugin(encoders=[NotAnEncoder]),
        r"register_encoders got .*NotAnEncoder.*, which is not a subclass of autometa\.Encoder",
    )


def test_rejects_component_of_the_wrong_kind():
    # A Fusion registered through register_encoders is not an Encoder.
    expect_rejected(make_plugin(encoders=[GoodFusion]), r"not a subclass of autometa\.Encoder")


def test_rejects_instance_instead_of_class():
    expect_rejected(
        make_plugin(meta_algorithms=[GoodMeta()]),
        r"register_meta_algorithms got .*, which is not a subclass of autometa\.MetaAlgorithm",
    )


@pytest.mark.parametrize("bad_name", ["BadName", "1abc", "with-dash", "_private", "", None, 3])
def test_rejects_name_that_is_not_a_lowercase_identifier(bad_name):
    class Named(GoodFusion):
        name = bad_name

    expect_rejected(
        make_plugin(fusions=[Named]),
        re.escape(f"Named.name must be a lowercase identifier like 'my_encoder', got {bad_name!r}"),
    )


def test_rejects_component_without_a_name():
    class Unnamed(MetaAlgorithm):  # inherits Component.name == ""
        pass

    expect_rejected(make_plugin(meta_algorithms=[Unnamed]), r"Unnamed\.name must be a lowercase identifier")


@pytest.mark.parametrize("modality", ["audio", "", None, "Tabular"])
def test_rejects_encoder_with_unknown_modality(modality):
    class Odd(GoodEncoder):
        name = "odd"

    Odd.modality = modality
    expect_rejected(
        make_plugin(encoders=[Odd]),
        re.escape(f"encoder 'odd' declares modality {modality!r}; use one of tabular, text, image, vector"),
    )


def test_rejects_encoder_that_fits_an_input_it_never_prepares():
    class FitsOnly(GoodEncoder):
        name = "fits_only"

        @classmethod
        def fit_input(cls, raw, rows):
            return {}

    expect_rejected(
        make_plugin(encoders=[FitsOnly]),
        re.escape("encoder 'fits_only' overrides fit_input but not prepare(raw, state), which applies the state"),
    )


@pytest.mark.parametrize(
    "protocols", [(), ("fewshot", "transductive"), ("FEWSHOT",), "fewshot"], ids=["empty", "unknown", "case", "str"]
)
def test_rejects_meta_algorithm_with_bad_protocols(protocols):
    class Proto(GoodMeta):
        name = "proto"

    Proto.protocols = protocols
    expect_rejected(
        make_plugin(meta_algorithms=[Proto]),
        r"meta-algorithm 'proto' declares protocols .*; "
        + re.escape("use a non-empty subset of ('fewshot', 'grouped', 'standard')"),
    )


def test_accepts_every_valid_protocol_subset():
    classes = []
    for i, protocols in enumerate([("standard",), ("grouped", "standard"), ("fewshot", "grouped", "standard")]):
        classes.append(type(f"Meta{i}", (GoodMeta,), {"name": f"meta{i}", "protocols": protocols}))
    _, registry = build(("myplugin", make_plugin(meta_algorithms=classes)))
    assert names(registry, "meta_algorithm") == {"meta0", "meta1", "meta2"}
    assert {i.name for i in registry.meta_algorithms_for("standard")} == {"meta0", "meta1", "meta2"}
    assert {i.name for i in registry.meta_algorithms_for("grouped")} == {"meta1", "meta2"}


@pytest.mark.parametrize(
    "value", [(4, 32), [1, 2, 3], "IntDistribution(4, 32)", optuna.distributions], ids=["tuple", "list", "str", "module"]
)
def test_rejects_search_space_value_that_is_not_an_optuna_distribution(value):
    class BadSpace(GoodEncoder):
        name = "bad_space"
        search_space = {"width": value}

    expect_rejected(
        make_plugin(encoders=[BadSpace]),
        re.escape(f"encoder 'bad_space': search_space['width'] is {value!r}, not an Optuna distribution"),
    )


def test_rejects_search_space_that_is_not_a_dict():
    class ListSpace(GoodMeta):
        name = "list_space"
        search_space = [("lr", FloatDistribution(1e-4, 1e-1))]

    expect_rejected(
        make_plugin(meta_algorithms=[ListSpace]),
        re.escape("meta_algorithm 'list_space': search_space must be a dict of Optuna distributions"),
    )


class _Positional(GoodMeta):
    name = "keyed"
    search_space = {"lr": FloatDistribution(1e-4, 1e-1)}

    def __init__(self, lr):  # positional, no default
        self.lr = lr


class _KeywordNoDefault(GoodMeta):
    name = "keyed"
    search_space = {"lr": FloatDistribution(1e-4, 1e-1)}

    def __init__(self, *, lr):
        self.lr = lr


class _Missing(GoodMeta):
    name = "keyed"
    search_space = {"learning_rate": FloatDistribution(1e-4, 1e-1)}

    def __init__(self, *, lr: float = 1e-3):
        self.lr = lr


class _VarKeyword(GoodMeta):
    name = "keyed"
    search_space = {"lr": FloatDistribution(1e-4, 1e-1)}

    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.mark.parametrize(
    "cls, key",
    [(_Positional, "lr"), (_KeywordNoDefault, "lr"), (_Missing, "learning_rate"), (_VarKeyword, "lr")],
    ids=["positional-no-default", "keyword-no-default", "absent", "var-keyword"],
)
def test_rejects_search_space_key_that_is_not_a_keyword_parameter_with_default(cls, key):
    expect_rejected(
        make_plugin(meta_algorithms=[cls]),
        re.escape(
            f"meta_algorithm 'keyed': search_space key {key!r} is not a keyword parameter with a default "
            f"in {cls.__qualname__}.__init__; add `{key}=...` to its signature"
        ),
    )


def test_accepts_positional_or_keyword_parameter_with_default():
    class PosDefault(GoodMeta):
        name = "pos_default"
        search_space = {"lr": FloatDistribution(1e-4, 1e-1)}

        def __init__(self, lr=1e-3):
            self.lr = lr

    _, registry = build(("myplugin", make_plugin(meta_algorithms=[PosDefault])))
    assert names(registry, "meta_algorithm") == {"pos_default"}


def test_rejects_component_not_constructible_with_defaults():
    class Raising(GoodEncoder):
        name = "raising"

        def __init__(self, spec, *, width: int = 8):
            raise RuntimeError("needs a GPU")

    expect_rejected(
        make_plugin(encoders=[Raising]),
        re.escape("encoder 'raising' cannot be constructed with its default parameters: RuntimeError: needs a GPU"),
    )


def test_rejects_encoder_whose_defaults_do_not_fit_the_example_spec():
    class NeedsVocab(Encoder):  # a "tabular" encoder that wrongly reads vocab_size (None for tabular)
        name = "needs_vocab"
        modality = "tabular"

        def __init__(self, spec):
            super().__init__()
            self.embedding = nn.Embedding(spec.vocab_size, 4)

    expect_rejected(
        make_plugin(encoders=[NeedsVocab]),
        r"encoder 'needs_vocab' cannot be constructed with its default parameters: TypeError",
    )


def test_rejects_fusion_not_constructible_with_defaults():
    class NeedsImage(Fusion):
        name = "needs_image"

        def __init__(self, in_dims):
            super().__init__()
            self.out_dim = in_dims["image"]

    expect_rejected(
        make_plugin(fusions=[NeedsImage]),
        r"fusion 'needs_image' cannot be constructed with its default parameters: KeyError: 'image'",
    )


def test_rejects_duplicate_name_across_two_plugins_naming_the_first():
    class Dup(GoodEncoder):
        name = "good_encoder"  # same name as GoodEncoder, different class

    host = PluginHost(strict=True)
    assert host.add(make_plugin(encoders=[GoodEncoder]), "first")
    assert host.add(make_plugin(encoders=[Dup]), "second")
    with pytest.raises(
        PluginError,
        match=re.escape(
            "plugin 'second': encoder name 'good_encoder' is already registered by plugin 'first'; "
            "choose another name"
        ),
    ):
        host.build_registry()


def test_duplicate_name_within_one_plugin_is_rejected():
    expect_rejected(
        make_plugin(meta_algorithms=[GoodMeta, GoodMeta]),
        re.escape("meta-algorithm name 'good_meta' is already registered by plugin 'myplugin'"),
    )


def test_duplicate_of_a_builtin_name_is_rejected_naming_builtins():
    class MyMLP(GoodEncoder):
        name = "mlp"

    host = PluginHost(strict=True)
    host.load_entry_points()
    assert host.add(make_plugin(encoders=[MyMLP]), "myplugin")
    with pytest.raises(PluginError, match=r"plugin 'myplugin'.*encoder name 'mlp' is already registered by plugin 'builtins'"):
        host.build_registry()


def test_same_name_in_different_kinds_is_allowed():
    class EncoderNamedShared(GoodEncoder):
        name = "shared"

    class FusionNamedShared(GoodFusion):
        name = "shared"

    _, registry = build(
        ("first", make_plugin(encoders=[EncoderNamedShared])), ("second", make_plugin(fusions=[FusionNamedShared]))
    )
    assert registry.get("encoder", "shared").plugin == "first"
    assert registry.get("fusion", "shared").plugin == "second"


def test_exception_inside_a_hook_is_reported_with_the_plugin_name():
    @hookimpl
    def register_fusions(register):
        raise ValueError("oops in hook")

    expect_rejected(Plugin(register_fusions=register_fusions), r"ValueError: oops in hook")


# --------------------------------------------------------------------------- 2. non-strict mode


def test_non_strict_skips_broken_plugin_and_keeps_good_one(caplog):
    class Broken(GoodEncoder):
        name = "broken"
        modality = "audio"

    caplog.set_level(logging.WARNING, logger=LOGGER)
    host = PluginHost(strict=False)
    assert host.add(make_plugin(encoders=[GoodEncoder], fusions=[GoodFusion]), "goodplugin")
    assert host.add(make_plugin(encoders=[Broken]), "badplugin")
    registry = host.build_registry()

    assert names(registry, "encoder") == {"good_encoder"}
    assert names(registry, "fusion") == {"good_fusion"}
    assert registry.get("encoder", "good_encoder").plugin == "goodplugin"

    assert len(registry.problems) == 1
    assert registry.problems[0].startswith("plugin 'badplugin': encoder 'broken' declares modality 'audio'")
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "'badplugin'" in message and message.endswith("; skipped")
    assert "\n" not in message
    # the broken plugin is unregistered from the pluggy manager
    assert host.pm.get_plugin("badplugin") is None
    assert host.pm.get_plugin("goodplugin") is not None


def test_non_strict_drops_every_component_of_a_plugin_with_one_invalid_component(caplog):
    class Invalid(GoodMeta):
        name = "invalid"
        protocols = ()

    caplog.set_level(logging.WARNING, logger=LOGGER)
    # the invalid one is registered last: the valid ones before it are staged, then discarded
    _, registry = build(
        ("mixed", make_plugin([GoodEncoder, GoodTextEncoder], [GoodFusion], [GoodMeta, Invalid])), strict=False
    )
    assert registry.all() == []
    assert len(registry.problems) == 1 and "plugin 'mixed'" in registry.problems[0]
    assert "meta-algorithm 'invalid' declares protocols ()" in registry.problems[0]
    assert any("'mixed'" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_non_strict_dropped_plugin_frees_its_names_for_later_plugins():
    class Invalid(GoodFusion):
        name = "Invalid"

    _, registry = build(
        ("dropped", make_plugin(encoders=[GoodEncoder], fusions=[Invalid])),
        ("later", make_plugin(encoders=[GoodEncoder])),
        strict=False,
    )
    assert registry.get("encoder", "good_encoder").plugin == "later"
    assert len(registry.problems) == 1 and registry.problems[0].startswith("plugin 'dropped'")


def test_non_strict_duplicate_keeps_first_plugin_and_refuses_only_the_clashing_component(caplog):
    class Dup(GoodEncoder):
        name = "good_encoder"

    caplog.set_level(logging.WARNING, logger=LOGGER)
    host, registry = build(
        ("first", make_plugin(encoders=[GoodEncoder])),
        ("second", make_plugin(encoders=[Dup], fusions=[GoodFusion])),
        strict=False,
    )
    assert registry.get("encoder", "good_encoder").cls is GoodEncoder
    assert registry.get("fusion", "good_fusion").plugin == "second"  # second's other component stays
    assert registry.problems == [
        "plugin 'second': encoder name 'good_encoder' is already registered by plugin 'first'; choose another name"
    ]
    assert host.pm.get_plugin("second") is not None and host.failed == set()


def test_strict_comes_from_environment(monkeypatch):
    monkeypatch.delenv("AUTOMETA_STRICT_PLUGINS", raising=False)
    assert PluginHost().strict is False
    for value, expected in [("1", True), ("yes", True), ("0", False), ("false", False), ("", False), ("No", False)]:
        monkeypatch.setenv("AUTOMETA_STRICT_PLUGINS", value)
        assert PluginHost().strict is expected, value
    monkeypatch.setenv("AUTOMETA_STRICT_PLUGINS", "1")
    assert PluginHost(strict=False).strict is False  # the argument wins


# --------------------------------------------------------------------------- 3. misspelled hooks


@hookimpl
def register_encoder(register):  # missing "s"
    register(GoodEncoder)


def test_check_pending_rejects_misspelled_hook_non_strict(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    host = PluginHost(strict=False)
    assert host.add(Plugin(register_encoder=register_encoder), "typo") is False
    assert len(host.problems) == 1
    assert host.problems[0].startswith("plugin 'typo' implements an unknown hook")
    assert "register_encoder" in host.problems[0]
    assert any("'typo'" in r.getMessage() and "unknown hook" in r.getMessage() for r in caplog.records)
    assert host.pm.get_plugin("typo") is None
    # the rejected plugin does not block a good one added afterwards
    assert host.add(make_plugin(encoders=[GoodEncoder]), "good") is True
    registry = host.build_registry()
    assert names(registry, "encoder") == {"good_encoder"}
    assert registry.problems == host.problems and len(registry.problems) == 1


def test_check_pending_rejects_misspelled_hook_strict():
    host = PluginHost(strict=True)
    with pytest.raises(PluginError, match=r"plugin 'typo' implements an unknown hook.*register_encoder.*strict mode"):
        host.add(Plugin(register_encoder=register_encoder), "typo")
    assert host.pm.get_plugin("typo") is None


def test_hook_with_wrong_argument_name_is_rejected():
    @hookimpl
    def register_encoders(reg):
        reg(GoodEncoder)

    host = PluginHost(strict=False)
    assert host.add(Plugin(register_encoders=register_encoders), "wrongargs") is False
    assert host.problems[0].startswith("plugin 'wrongargs' could not be registered")
    with pytest.raises(PluginError, match=r"plugin 'wrongargs' could not be registered"):
        PluginHost(strict=True).add(Plugin(register_encoders=register_encoders), "wrongargs")


def test_same_plugin_name_twice_is_rejected():
    host = PluginHost(strict=False)
    assert host.add(make_plugin(encoders=[GoodEncoder]), "twice") is True
    assert host.add(make_plugin(fusions=[GoodFusion]), "twice") is False
    assert host.problems[0].startswith("plugin 'twice' could not be registered")
    registry = host.build_registry()
    assert names(registry, "encoder") == {"good_encoder"} and names(registry, "fusion") == set()


# --------------------------------------------------------------------------- 4./5. entry points

THIRDPARTY = '''
from optuna.distributions import IntDistribution
from torch import nn

from autometa import Encoder, hookimpl


class TPEncoder(Encoder):
    name = "tp_encoder"
    modality = "tabular"
    search_space = {"width": IntDistribution(2, 16)}

    def __init__(self, spec, *, width=4):
        super().__init__()
        self.linear = nn.Linear(spec.shape[0], width)
        self.out_dim = width

    def forward(self, x):
        return self.linear(x)


@hookimpl
def register_encoders(register):
    register(TPEncoder)
'''


@pytest.fixture
def clean_global_registry():
    autometa.plugins.reset()
    yield
    autometa.plugins.reset()


@pytest.fixture
def thirdparty(tmp_path, monkeypatch, clean_global_registry):
    monkeypatch.delenv("AUTOMETA_STRICT_PLUGINS", raising=False)
    make_distribution(tmp_path, "thirdparty_plugin", "thirdparty-plugin", "1.2.3", "tp", THIRDPARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("thirdparty_plugin", None)


@pytest.fixture
def broken(tmp_path, monkeypatch, clean_global_registry):
    monkeypatch.delenv("AUTOMETA_STRICT_PLUGINS", raising=False)
    make_distribution(
        tmp_path, "broken_plugin", "broken-plugin", "0.4.0", "broken",
        'raise ImportError("frobnicate is not installed")\n',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("broken_plugin", None)


def test_thirdparty_entry_point_is_discovered(thirdparty):
    host = PluginHost(strict=False)
    host.load_entry_points()
    registry = host.build_registry()
    assert registry.problems == []
    info = registry.get("encoder", "tp_encoder")
    assert info.plugin == "tp"
    assert info.distribution == "thirdparty-plugin"
    assert info.version == "1.2.3"
    assert info.modality == "tabular"
    assert info.cls.__module__ == "thirdparty_plugin"
    assert set(info.cls.search_space) == {"width"}
    assert isinstance(info.cls.search_space["width"], IntDistribution)
    # built-ins come through the same group
    for name, kind in BUILTINS.items():
        assert registry.get(kind, name).plugin == "builtins"
    assert registry.get("meta_algorithm", "maml").distribution == "autometa"
    # the discovered encoder really works
    encoder = info.cls(InputSpec("tabular", (3,)), width=5)
    assert encoder(torch.zeros(2, 3)).shape == (2, 5)


def test_thirdparty_entry_point_through_global_registry_and_cli(thirdparty):
    registry = autometa.plugins.get_registry()
    assert autometa.plugins.get_registry() is registry  # loaded once
    assert registry.get("encoder", "tp_encoder").version == "1.2.3"
    assert "mlp" in registry.components["encoder"]
    assert autometa.plugins.default_host().pm.get_plugin("tp") is sys.modules["thirdparty_plugin"]

    autometa.plugins.reset()
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["tp_encoder"]["kind"] == "encoder"
    assert rows["tp_encoder"]["plugin"] == "tp"
    assert rows["tp_encoder"]["version"] == "1.2.3"
    assert rows["tp_encoder"]["distribution"] == "thirdparty-plugin"
    assert rows["tp_encoder"]["modality"] == "tabular"
    assert list(rows["tp_encoder"]["hyperparameters"]) == ["width"]
    assert set(BUILTINS) <= set(rows)

    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.split()[1:2] == ["tp_encoder"])
    assert line.split()[:5] == ["encoder", "tp_encoder", "tabular", "tp", "1.2.3"]


def test_reset_forgets_loaded_plugins(thirdparty, monkeypatch):
    first = autometa.plugins.get_registry()
    assert "tp_encoder" in first.components["encoder"]
    # hide the distribution again
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(thirdparty)])
    assert autometa.plugins.get_registry() is first  # cached until reset
    autometa.plugins.reset()
    second = autometa.plugins.get_registry()
    assert second is not first
    assert "tp_encoder" not in second.components["encoder"]
    assert "mlp" in second.components["encoder"]


def test_broken_entry_point_is_skipped_with_warning(broken, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    host = PluginHost(strict=False)
    host.load_entry_points()
    registry = host.build_registry()
    assert set(BUILTINS) == {i.name for i in registry.all()}
    assert registry.problems == [
        "plugin 'broken' (from broken-plugin 0.4.0) failed to import broken_plugin: "
        "ImportError: frobnicate is not installed"
    ]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert messages == [registry.problems[0] + "; skipped"]
    assert host.pm.get_plugin("broken") is None


def test_broken_entry_point_is_fatal_in_strict_mode(broken, monkeypatch):
    monkeypatch.setenv("AUTOMETA_STRICT_PLUGINS", "1")
    host = PluginHost()
    assert host.strict is True
    with pytest.raises(PluginError, match=r"plugin 'broken'.*ImportError: frobnicate.*strict mode") as info:
        host.load_entry_points()
    assert "AUTOMETA_STRICT_PLUGINS" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
    # and through the global registry / CLI
    with pytest.raises(PluginError, match="strict mode"):
        autometa.plugins.get_registry()
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins"])
    assert result.exit_code == 1
    assert "Error: plugin 'broken'" in result.output and "strict mode" in result.output


def test_broken_entry_point_in_global_registry_and_cli(broken):
    registry = autometa.plugins.get_registry()
    assert len(registry.problems) == 1 and "plugin 'broken'" in registry.problems[0]
    autometa.plugins.reset()
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--format", "json"])
    assert result.exit_code == 0
    assert {row["name"] for row in json.loads(result.stdout)} == set(BUILTINS)


def test_load_explicit_entry_points():
    eps = [
        importlib.metadata.EntryPoint("missing", "autometa_no_such_module_xyz", "autometa"),
    ]
    host = PluginHost(strict=False)
    host.load_entry_points(eps)
    assert len(host.problems) == 1
    assert host.problems[0].startswith(
        "plugin 'missing' failed to import autometa_no_such_module_xyz: ModuleNotFoundError"
    )
    assert host.build_registry().all() == []


def test_explicit_entry_point_without_dist_finds_distribution_from_module():
    host = PluginHost(strict=True)
    host.load_entry_points([importlib.metadata.EntryPoint("builtins", "autometa_builtins", "autometa")])
    info = host.build_registry().get("encoder", "mlp")
    assert (info.plugin, info.distribution, info.version) == ("builtins", "autometa", autometa.__version__)


# --------------------------------------------------------------------------- known library bugs


def test_unhashable_plugin_object_does_not_break_other_plugins():
    @hookimpl
    def register_fusions(register):
        register(GoodFusion)

    host = PluginHost(strict=False)
    host.load_entry_points()
    host.add(types.SimpleNamespace(register_fusions=register_fusions), "ns")
    registry = host.build_registry()
    assert set(BUILTINS) <= {info.name for info in registry.all()}


def test_skip_warning_is_one_line_for_wrong_hook_arguments(caplog):
    @hookimpl
    def register_encoders(reg):
        reg(GoodEncoder)

    caplog.set_level(logging.WARNING, logger=LOGGER)
    PluginHost(strict=False).add(Plugin(register_encoders=register_encoders), "wrongargs")
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert "\n" not in record.getMessage()


# --------------------------------------------------------------------------- 6. `autometa plugins`


def _parse_table(output):
    lines = output.splitlines()
    header = lines[0]
    columns = header.split()
    starts = [header.index(c) for c in columns]
    rows = []
    for line in lines[1:]:
        cells = [line[s:e].strip() for s, e in zip(starts, starts[1:] + [None])]
        rows.append(dict(zip(columns, cells)))
    return columns, rows


def test_plugins_table_lists_every_builtin(clean_global_registry, monkeypatch):
    monkeypatch.delenv("AUTOMETA_STRICT_PLUGINS", raising=False)
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins"])
    assert result.exit_code == 0, result.output
    columns, rows = _parse_table(result.output)
    assert columns == ["kind", "name", "modality", "plugin", "version", "hyperparameters"]
    by_name = {row["name"]: row for row in rows}
    for name, kind in BUILTINS.items():
        assert by_name[name]["kind"] == kind
        assert by_name[name]["plugin"] == "builtins"
        assert by_name[name]["version"] == autometa.__version__
    assert by_name["mlp"]["modality"] == "tabular"
    assert by_name["hashbag"]["modality"] == "text"
    assert by_name["conv4"]["modality"] == "image"
    assert by_name["identity"]["modality"] == "vector"
    assert by_name["maml"]["modality"] == "protocols: fewshot,grouped"
    assert by_name["concat"]["modality"] == "-"
    assert by_name["identity"]["hyperparameters"] == "-"
    assert by_name["mlp"]["hyperparameters"] == "hidden, out_dim, layers, dropout"


def test_plugins_json_output(clean_global_registry, monkeypatch):
    monkeypatch.delenv("AUTOMETA_STRICT_PLUGINS", raising=False)
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert isinstance(rows, list)
    for row in rows:
        assert {"kind", "name", "modality", "plugin", "version", "hyperparameters"} <= set(row)
    by_name = {row["name"]: row for row in rows}
    assert set(BUILTINS) <= set(by_name)
    for name, kind in BUILTINS.items():
        assert by_name[name]["kind"] == kind
        assert by_name[name]["plugin"] == "builtins"
    assert by_name["conv4"]["modality"] == "image"
    assert by_name["attention"]["modality"] is None
    assert by_name["maml"]["modality"] is None
    assert by_name["maml"]["protocols"] == ["fewshot", "grouped"]
    maml_space = registry_maml_space()
    assert set(by_name["maml"]["hyperparameters"]) == set(maml_space)
    assert {"inner_lr", "inner_steps", "lr", "meta_batch", "first_order"} <= set(maml_space)
    assert "IntDistribution" in by_name["maml"]["hyperparameters"]["inner_steps"]
    assert by_name["concat"]["hyperparameters"] == {}


def test_plugins_rejects_unknown_format():
    result = CliRunner().invoke(autometa.cli.main.cli, ["plugins", "--format", "yaml"])
    assert result.exit_code == 2


# --------------------------------------------------------------------------- 7. suggest


def test_suggest_with_fixed_trial_uses_prefixed_names():
    params = {"meta.good_meta.lr": 0.01, "meta.good_meta.steps": 3, "meta.good_meta.mode": "b"}
    values = GoodMeta.suggest(optuna.trial.FixedTrial(params), "meta.good_meta.")
    assert values == {"lr": 0.01, "steps": 3, "mode": "b"}
    assert GoodMeta(**values).mode == "b"
    # without the prefix the names are unknown to the trial
    with pytest.raises(ValueError):
        GoodMeta.suggest(optuna.trial.FixedTrial({"lr": 0.01, "steps": 3, "mode": "b"}), "meta.good_meta.")


def registry_maml_space():
    return autometa_builtins.meta_algorithms.MAML.search_space


def test_suggest_builtin_with_fixed_trial():
    _, registry = build(("builtins", autometa_builtins))
    maml = registry.get("meta_algorithm", "maml").cls
    prefix = "meta.maml."
    chosen = {"inner_lr": 0.05, "inner_steps": 2, "lr": 0.001, "meta_batch": 4, "first_order": True}
    # Any further hyperparameters take their declared defaults.
    defaults = {k: p.default for k, p in inspect.signature(maml.__init__).parameters.items() if k in maml.search_space}
    expected = {**defaults, **chosen}
    trial = optuna.trial.FixedTrial({prefix + k: v for k, v in expected.items()})
    values = maml.suggest(trial, prefix)
    assert values == expected
    assert maml(**values).first_order is True


def test_suggest_empty_space_and_real_trial():
    assert Component.suggest(optuna.trial.FixedTrial({}), "x.") == {}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = GoodMeta.suggest(trial, "m.")
    assert set(trial.params) == {"m.lr", "m.steps", "m.mode"}
    assert values == {key[len("m."):]: value for key, value in trial.params.items()}
    for key, dist in GoodMeta.search_space.items():
        assert trial.distributions["m." + key] == dist
        assert dist._contains(dist.to_internal_repr(values[key]))


@pytest.mark.parametrize(
    "dist, value",
    [
        (FloatDistribution(0.0, 1.0), 0.25),
        (FloatDistribution(1e-5, 1e-1, log=True), 1e-3),
        (FloatDistribution(0.0, 1.0, step=0.25), 0.75),
        (IntDistribution(1, 10), 7),
        (IntDistribution(16, 256, log=True), 64),
        (IntDistribution(0, 10, step=2), 4),
        (CategoricalDistribution(["relu", "gelu"]), "gelu"),
        (CategoricalDistribution([False, True]), False),
    ],
)
def test_suggest_value(dist, value):
    assert suggest_value(optuna.trial.FixedTrial({"p": value}), "p", dist) == value
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    sampled = suggest_value(trial, "p", dist)
    assert trial.distributions["p"] == dist
    assert dist._contains(dist.to_internal_repr(sampled))


def test_suggest_value_rejects_unknown_distribution():
    class Weird(BaseDistribution):
        def to_external_repr(self, v):
            return v

        def to_internal_repr(self, v):
            return v

        def single(self):
            return True

        def _contains(self, v):
            return True

    with pytest.raises(TypeError, match="unsupported distribution Weird for 'p'"):
        suggest_value(optuna.trial.FixedTrial({"p": 1}), "p", Weird())
