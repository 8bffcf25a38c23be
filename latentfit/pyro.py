"""Engines for plain Pyro models: ``from latentfit.pyro import SAEM``.

Each engine wraps a Pyro model function: ``Engine(model, **options).run(*args, **kwargs)`` traces
``model(*args, **kwargs)``, fits it, writes the estimates back into Pyro's param store and returns
a :class:`~latentfit.inference.results.FitResult`.

Example
-------
>>> fit = SAEM(model, num_iters=(300, 100), seed=0).run(data)   # doctest: +SKIP
>>> fit.summary()                                                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from latentfit.inference import fsaem as _fsaem
from latentfit.inference import saem as _saem
from latentfit.inference.results import FitResult
from latentfit.integrations.pyro import PyroLatentModel, write_params_to_store


class _PyroEngine:
    """Front door shared by every engine: validate options now, trace and fit on ``run``."""

    engine_cls: type = object

    def __init__(self, model: Any, *engine_args: Any, unit_plate: str | None = None, **engine_kwargs: Any) -> None:
        if not callable(model):
            raise TypeError(f"model must be a Pyro model function, got {type(model).__name__}")
        validate = getattr(self.engine_cls, "validate_options", None)
        if validate is not None:
            validate(*engine_args, **engine_kwargs)
        self.model = model
        self.unit_plate = unit_plate
        self.engine_args = engine_args
        self.engine_kwargs = engine_kwargs

    def latent_model(self, *args: Any, **kwargs: Any) -> PyroLatentModel:
        return PyroLatentModel(self.model, args, kwargs, unit_plate=self.unit_plate)

    def run(self, *args: Any, **kwargs: Any) -> FitResult:
        # tracing the model draws random numbers: do it on a forked, seeded RNG stream
        seed = int(self.engine_kwargs.get("seed", 0))
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            latent_model = self.latent_model(*args, **kwargs)
        engine = self.engine_cls(latent_model, *self.engine_args, **self.engine_kwargs)
        fit = engine.run()
        write_params_to_store(engine.theta_of(fit.state))
        return fit


class SAEM(_PyroEngine):
    __doc__ = _saem.SAEM.__doc__
    engine_cls = _saem.SAEM


class FSAEM(_PyroEngine):
    __doc__ = _fsaem.FSAEM.__doc__
    engine_cls = _fsaem.FSAEM


__all__ = ["FSAEM", "SAEM"]
