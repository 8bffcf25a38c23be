"""Engines for plain NumPyro models: ``from latentfit.numpyro import SAEM``.

The twin of :mod:`latentfit.pyro`: the same engines and options, with NumPyro's convention of an
explicit PRNG key: ``Engine(model, **options).run(rng_key, *args, **kwargs)`` traces
``model(*args, **kwargs)``, fits it and returns a :class:`~latentfit.inference.results.FitResult`.
Each iteration (MCMC kernels, stochastic approximation, M-step) is one traced JAX function; chunks
of iterations run as one compiled ``lax.scan`` (``chunk_size`` iterations per progress-bar tick).
NumPyro has no global param store: the estimates are ``fit.params`` (constrained values), ready for
``numpyro.handlers.substitute(model, fit.params)``.

Example
-------
>>> fit = SAEM(model, num_iters=(300, 100)).run(jax.random.PRNGKey(0), data)   # doctest: +SKIP
>>> fit.summary()                                                                # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from latentfit.inference import saem as _saem
from latentfit.inference.results import FitResult
from latentfit.integrations.numpyro import NumPyroLatentModel, as_rng_key


class _NumPyroEngine:
    """Front door shared by every engine: validate options now, trace and fit on ``run``."""

    engine_cls: type = object

    def __init__(self, model: Any, *engine_args: Any, unit_plate: str | None = None, **engine_kwargs: Any) -> None:
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model function, got {type(model).__name__}")
        validate = getattr(self.engine_cls, "validate_options", None)
        if validate is not None:
            validate(*engine_args, **engine_kwargs)
        self.model = model
        self.unit_plate = unit_plate
        self.engine_args = engine_args
        self.engine_kwargs = engine_kwargs

    def latent_model(self, *args: Any, **kwargs: Any) -> NumPyroLatentModel:
        return NumPyroLatentModel(self.model, args, kwargs, unit_plate=self.unit_plate)

    def run(self, rng_key: Any, *args: Any, **kwargs: Any) -> FitResult:
        """Fit ``model(*args, **kwargs)``; ``rng_key`` is a ``jax.random.PRNGKey`` (or an int seed)."""
        key = as_rng_key(rng_key)
        engine = self.engine_cls(self.latent_model(*args, **kwargs), *self.engine_args, **self.engine_kwargs)
        return engine.run(key)


def _front_door(engine_cls: type) -> type:
    """The NumPyro front door of a backend-neutral engine class."""
    return type(engine_cls.__name__, (_NumPyroEngine,), {"__doc__": engine_cls.__doc__, "engine_cls": engine_cls,
                                                         "__module__": __name__})


SAEM = _front_door(_saem.SAEM)

__all__ = ["SAEM"]
