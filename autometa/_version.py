"""The package version, apart from the facade so that any module can read it without importing it."""

__version__ = "0.1.0"
