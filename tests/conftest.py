"""Shared fixtures: ``backend`` runs a test on both PPLs (see ``backends.py``)."""

from __future__ import annotations

from typing import Any

import pytest
from backends import BACKENDS, Backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Any:
    """Parametrise a test over both backends (ids ``pyro`` / ``numpyro``); Pyro's store is cleared around it."""
    b = Backend(request.param)
    b.reset()
    yield b
    b.reset()
