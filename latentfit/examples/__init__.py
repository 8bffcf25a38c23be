"""Worked examples shipped with the package (importable by the CLI demo and the tests)."""
