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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow_on("numpyro")``: the named backend's case of a test run on both backends (the ``backend``
    fixture, or a parameter whose value is the backend's name) is a slow test; the other backend's case stays in the
    default suite.  Runs before ``-m`` selects."""
    for item in items:
        marker = item.get_closest_marker("slow_on")
        spec = getattr(item, "callspec", None)
        if marker is None or spec is None:
            continue
        if any(isinstance(v, str) and v in marker.args for v in spec.params.values()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Any:
    """Parametrise a test over both backends (ids ``pyro`` / ``numpyro``); Pyro's store is cleared around it."""
    b = Backend(request.param)
    b.reset()
    yield b
    b.reset()


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """One torch intra-op thread for a module of small problems (a second thread only adds spin-waits on a shared
    2-core machine: a 4-epoch VFG fit ran 25x slower, 106 s against 4.5 s); the previous count restored afterwards.  A
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; ``make test`` also sets
    ``OMP_NUM_THREADS=1``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def jax_x64() -> Any:
    """float64 on JAX for the test (agreements to 1e-10 need it); the previous setting restored afterwards. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("jax_x64")``."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)
