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

from latentfit.inference import em as _em
from latentfit.inference import fiem as _fiem
from latentfit.inference import fsaem as _fsaem
from latentfit.inference import iem as _iem
from latentfit.inference import mcem as _mcem
from latentfit.inference import saem as _saem
from latentfit.inference import sem as _sem
from latentfit.inference import semvr as _semvr
from latentfit.inference import ttsem as _ttsem
from latentfit.inference.model import LatentModel
from latentfit.inference.results import FitResult
from latentfit.integrations.pyro import PyroLatentModel, write_params_to_store
from latentfit.integrations.pyro_enum import PyroEnumModel, has_enumerated_latents


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


class _EMFamilyEngine(_PyroEngine):
    """Front door of the EM family: a Pyro model function (discrete latents: exact E-step by
    enumeration) or a ready-made :class:`LatentModel` such as ``GaussianMixture``."""

    def __init__(self, model: Any, *engine_args: Any, unit_plate: str | None = None, **engine_kwargs: Any) -> None:
        if isinstance(model, LatentModel):
            validate = getattr(self.engine_cls, "validate_options", None)
            if validate is not None:
                validate(*engine_args, **engine_kwargs)
            self.model, self.unit_plate = model, unit_plate
            self.engine_args, self.engine_kwargs = engine_args, engine_kwargs
            return
        super().__init__(model, *engine_args, unit_plate=unit_plate, **engine_kwargs)

    def latent_model(self, *args: Any, **kwargs: Any) -> LatentModel:
        if isinstance(self.model, LatentModel):
            return self.model
        if has_enumerated_latents(self.model, args, kwargs):
            return PyroEnumModel(self.model, args, kwargs)
        return PyroLatentModel(self.model, args, kwargs, unit_plate=self.unit_plate)

    def run(self, *args: Any, **kwargs: Any) -> FitResult:
        if isinstance(self.model, LatentModel):
            return self.engine_cls(self.model, *self.engine_args, **self.engine_kwargs).run()
        return super().run(*args, **kwargs)


def _em_engine(cls: type) -> type:
    return type(cls.__name__, (_EMFamilyEngine,), {"__doc__": cls.__doc__, "engine_cls": cls,
                                                   "__module__": __name__})


EM = _em_engine(_em.EM)
MiniBatchEM = _em_engine(_iem.MiniBatchEM)
IEM = _em_engine(_iem.IEM)
SEM = _em_engine(_sem.SEM)
SEMVR = _em_engine(_semvr.SEMVR)
FIEM = _em_engine(_fiem.FIEM)
MCEM = _em_engine(_mcem.MCEM)
MiniBatchMCEM = _em_engine(_mcem.MiniBatchMCEM)
TTSEM = _em_engine(_ttsem.TTSEM)

__all__ = ["EM", "FIEM", "FSAEM", "IEM", "MCEM", "SAEM", "SEM", "SEMVR", "TTSEM", "MiniBatchEM", "MiniBatchMCEM"]
