"""Backend helpers for the tests: run engine tests on both backends (Pyro/torch and NumPyro/JAX).

A test that takes the ``backend`` fixture runs twice, once per PPL.  Models are written once per PPL
in ``models_pyro.py`` / ``models_numpyro.py`` under the same names and reached as
``backend.models.<name>``; data go through ``backend.tensor``; fits through ``backend.fit``, which
hides the one difference of the front doors (Pyro takes ``seed=`` in the constructor, NumPyro an
explicit PRNG key in ``run``)::

    def test_something(backend):
        fit = backend.fit("SAEM", backend.models.random_intercept, backend.tensor(y), seed=0, num_iters=(50, 50))

JAX runs in float64 here (``jax_enable_x64``), as the torch tests do, so both backends see the same
data; float32 behaviour is tested explicitly in ``test_numpyro.py``.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
# identical programs (the same model fitted again: other seeds, other options of the driver) are
# compiled once per test session
_JAX_CACHE_DIR = tempfile.mkdtemp(prefix="latentfit-jax-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE_DIR, ignore_errors=True)  # one per test process, gone with it
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

BACKENDS = ("pyro", "numpyro")


@dataclass(frozen=True)
class Backend:
    """One PPL + array library: what a backend-parametrised test needs."""

    name: str

    @property
    def models(self) -> Any:
        """The module of this PPL's test models (``models_pyro`` / ``models_numpyro``)."""
        return importlib.import_module(f"models_{self.name}")

    @property
    def front_door(self) -> Any:
        """``latentfit.pyro`` or ``latentfit.numpyro``."""
        return importlib.import_module(f"latentfit.{self.name}")

    @property
    def xp(self) -> Any:
        if self.name == "pyro":
            import torch

            return torch
        import jax.numpy as jnp

        return jnp

    def tensor(self, x: Any, dtype: Any = None) -> Any:
        """A float64 (or ``dtype``) tensor / jax array holding ``x``; bool arrays stay bool."""
        arr = np.asarray(x)
        if self.name == "pyro":
            import torch

            if arr.dtype == bool:
                return torch.as_tensor(arr)
            return torch.as_tensor(arr, dtype=dtype or torch.float64)
        import jax.numpy as jnp

        if arr.dtype == bool:
            return jnp.asarray(arr)
        return jnp.asarray(arr, dtype=dtype or jnp.float64)

    def engine(self, name: str) -> type:
        """The front-door engine class ``name`` of this PPL (``backend.engine("SAEM")``)."""
        return getattr(self.front_door, name)

    def fit(self, engine: str | type, model: Any, *args: Any, seed: int = 0, model_kwargs: dict | None = None,
            **options: Any) -> Any:
        """Fit ``model(*args, **model_kwargs)`` with the front-door engine and ``options``."""
        cls = self.engine(engine) if isinstance(engine, str) else engine
        model_kwargs = model_kwargs or {}
        if self.name == "pyro":
            return cls(model, seed=seed, **options).run(*args, **model_kwargs)
        return cls(model, **options).run(jax.random.PRNGKey(seed), *args, **model_kwargs)

    def latent_model(self, model: Any, *args: Any, **adapter_kwargs: Any) -> Any:
        """The adapter's :class:`LatentModel` of ``model(*args)`` (for the core engines)."""
        if self.name == "pyro":
            from latentfit.integrations.pyro import PyroLatentModel

            return PyroLatentModel(model, args, **adapter_kwargs)
        from latentfit.integrations.numpyro import NumPyroLatentModel

        return NumPyroLatentModel(model, args, **adapter_kwargs)

    def key(self, seed: int) -> Any:
        """What a core ``Engine.run(key)`` takes: None on torch (the driver seeds), a PRNG key on JAX."""
        return None if self.name == "pyro" else jax.random.PRNGKey(seed)

    def ops(self) -> Any:
        """A float64 backend shim (``TorchOps`` / ``JaxOps``)."""
        if self.name == "pyro":
            import torch

            from latentfit.inference.ops import TorchOps

            return TorchOps(dtype=torch.float64)
        from latentfit.inference.ops_jax import JaxOps

        return JaxOps(dtype="float64")

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name == "pyro":
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def reset(self) -> None:
        """Forget global state between fits (Pyro's param store; NumPyro has none)."""
        if self.name == "pyro":
            import pyro

            pyro.clear_param_store()

    def __str__(self) -> str:
        return self.name


@functools.cache
def theophylline_fit(backend_name: str, seed: int = 0) -> Any:
    """SAEM (300, 100) on the theophylline example of ``backend_name``, fitted once per session."""
    if backend_name == "pyro":
        import pyro

        from latentfit.examples.theophylline import fit

        pyro.clear_param_store()
        result = fit(seed=seed, progress=False)
        pyro.clear_param_store()
        return result
    from latentfit.examples.theophylline_numpyro import fit

    return fit(seed=seed, progress=False)


def backend_params(*names: str) -> list[Any]:
    """``pytest.mark.parametrize`` values for a module-scoped fixture: ``[Backend("pyro"), Backend("numpyro")]``."""
    return [pytest.param(Backend(n), id=n) for n in (names or BACKENDS)]
