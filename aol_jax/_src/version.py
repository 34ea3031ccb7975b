"""The library's version, the one copy (pyproject.toml reads it)."""

__version__ = "0.1.0"
