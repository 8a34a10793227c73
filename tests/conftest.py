"""Fixtures several test modules use."""

from __future__ import annotations

import pytest

import autometa.plugins


@pytest.fixture
def fresh_registry(monkeypatch):
    """The global plugin registry rebuilt from what is installed now (and forgotten afterwards)."""
    monkeypatch.delenv("AUTOMETA_STRICT_PLUGINS", raising=False)
    autometa.plugins.reset()
    yield
    autometa.plugins.reset()
