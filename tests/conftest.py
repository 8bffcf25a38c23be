"""Shared fixtures: ``backend`` runs a test on both PPLs (see ``backends.py``)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from backends import BACKENDS, Backend


def pytest_configure(config: pytest.Config) -> None:
    """``LATENTFIT_TEST_DETERMINISTIC=1``: run the suite under ``torch.use_deterministic_algorithms(True)``
    (another numerics setting under which it must stay green)."""
    if os.environ.get("LATENTFIT_TEST_DETERMINISTIC", "") not in ("", "0"):
        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Any:
    """Parametrise a test over both backends (ids ``pyro`` / ``numpyro``); Pyro's store is cleared around it."""
    b = Backend(request.param)
    b.reset()
    yield b
    b.reset()


@pytest.fixture
def jax_x64() -> Any:
    """float64 on JAX for the test (agreements to 1e-10 need it); the previous setting restored afterwards. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("jax_x64")``."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)
