"""The front door both PPL modules share (:mod:`latentfit.pyro`, :mod:`latentfit.numpyro`).

``Engine(model, **options)`` validates the options at once and keeps the model; ``run`` (defined by each
PPL module: Pyro's global RNG and param store vs. NumPyro's explicit key) traces the model into a
:class:`LatentModel` through ``latent_model(*args, **kwargs)`` and fits it.
"""

from __future__ import annotations

import inspect
from typing import Any

from latentfit.inference.driver import engine_option_names, unknown_option_error
from latentfit.inference.model import LatentModel

#: keyword arguments of ``run`` that go to the engine's driver (checkpointing), not to the model
RUN_OPTIONS = ("checkpoint", "checkpoint_every", "keep", "resume", "devices", "distributed")


def split_run_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the driver's options (:data:`RUN_OPTIONS`) from a ``run(**kwargs)`` call."""
    return {k: kwargs.pop(k) for k in RUN_OPTIONS if k in kwargs}


def _accepted_keywords(fn: Any) -> frozenset[str] | None:
    """The keyword arguments ``fn`` accepts, or None when it takes any (``**kwargs``) or cannot be inspected."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _closed_option_names(engine_cls: type) -> frozenset[str] | None:
    """:func:`~latentfit.inference.driver.engine_option_names` when the chain of ``**kwargs`` it follows ends at a
    constructor that takes no ``**kwargs`` (every option known), else None."""
    for cls in engine_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        if cls is object:
            return None
        try:
            parameters = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return engine_option_names(engine_cls)
    return None


class EngineFrontDoor:
    """Front door shared by every engine: validate options now, trace and fit on ``run``."""

    engine_cls: type = object
    ppl_name: str = ""  # "Pyro" / "NumPyro", for messages
    latent_model_cls: type = LatentModel  # the tracing adapter of the PPL
    #: the front door's own options (how the model is read), beside the engine's
    own_options: tuple[str, ...] = ("unit_plate", "unit_index")

    def __init__(self, model: Any, *engine_args: Any, unit_plate: str | None = None, unit_index: Any = None,
                 **engine_kwargs: Any) -> None:
        if not callable(model):
            raise TypeError(f"model must be a {self.ppl_name} model function, got {type(model).__name__}")
        self.unit_index = unit_index
        self._accept(model, unit_plate, engine_args, engine_kwargs)

    def _accept(self, model: Any, unit_plate: str | None, engine_args: tuple, engine_kwargs: dict) -> None:
        known = _closed_option_names(self.engine_cls)
        unknown = sorted(k for k in engine_kwargs if known is not None and k not in known)
        if unknown:  # refused here, not by an internal class's __init__ once run() has traced the model
            name = self.engine_cls.__name__
            raise unknown_option_error(f"{name}(...)", name, unknown, known, self.own_options)
        validate = getattr(self.engine_cls, "validate_options", None)
        if validate is not None:
            validate(*engine_args, **engine_kwargs)
        self.model = model
        self.unit_plate = unit_plate
        self.engine_args = engine_args
        self.engine_kwargs = engine_kwargs

    def check_model_keywords(self, kwargs: dict[str, Any]) -> None:
        """Refuse a keyword of ``run`` (the driver's options already removed) that is an option of the engine's
        constructor and not an argument of the model: ``run`` passes its arguments to the model, so
        ``SAEM(model).run(..., callback=cb)`` would otherwise fail inside the model, blaming the model."""
        if not kwargs:
            return
        name = type(self).__name__
        options = engine_option_names(self.engine_cls) | set(self.own_options)  # + the front door's
        if isinstance(self.model, LatentModel):  # a ready-made model takes no arguments: nothing would use them
            misplaced = sorted(kwargs)
        else:
            accepted = _accepted_keywords(self.model)
            misplaced = [] if accepted is None else sorted(k for k in kwargs if k not in accepted and k in options)
        if not misplaced:
            return
        engine_options = [k for k in misplaced if k in options]
        listed = ", ".join(f"{k}=" for k in misplaced)
        own = f"run's own options: {', '.join(RUN_OPTIONS)}"
        if not engine_options:
            raise TypeError(f"{listed} given to {name}(...).run(...) with a ready-made {type(self.model).__name__}, "
                            f"which takes no arguments ({own})")
        example = ", ".join(f"{k}=..." for k in engine_options)
        raise TypeError(
            f"{', '.join(engine_options)} is an option of {name}(...), not of run(...): run passes its arguments "
            f"to the model (model(*args, **kwargs)), which takes no such argument; write "
            f"{name}(model, {example}).run(...) ({own})")

    def latent_model(self, *args: Any, **kwargs: Any) -> LatentModel:
        """The traced model.  ``unit_plate``: the plate of the units when the shared plate of the latents is
        ambiguous; ``unit_index``: the unit of each row of an observed site outside that plate (an int
        array, or a dict site -> array), when it cannot be read from the model."""
        return self.latent_model_cls(self.model, args, kwargs, unit_plate=self.unit_plate,
                                     unit_index=self.unit_index)


class EMFamilyFrontDoor(EngineFrontDoor):
    """Front door of the EM family: a model function (discrete latents: exact E-step by enumeration,
    ``enum_model_cls``) or a ready-made :class:`LatentModel` such as ``GaussianMixture``."""

    enum_model_cls: Any = None  # the PPL's EnumeratedLatentModel
    own_options = ("unit_plate", "unit_index", "reg_covar")

    def __init__(self, model: Any, *engine_args: Any, unit_plate: str | None = None, unit_index: Any = None,
                 reg_covar: float | None = None, **engine_kwargs: Any) -> None:
        """``reg_covar``: added to the variances by the closed-form M-step of a recognised plain Gaussian mixture
        (default 1e-6, scikit-learn's; 0: the exact EM fixed point)."""
        if reg_covar is not None and not float(reg_covar) >= 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
        self.reg_covar = 1e-6 if reg_covar is None else float(reg_covar)
        if isinstance(model, LatentModel):
            if reg_covar is not None:
                raise TypeError(f"reg_covar= is an option of a model function's mixture; give it to the ready-made "
                                f"{type(model).__name__} instead (e.g. GaussianMixture(x, K, reg_covar=...))")
            self._check_latent_model(model)
            self.unit_index = None
            self._accept(model, unit_plate, engine_args, engine_kwargs)
            return
        super().__init__(model, *engine_args, unit_plate=unit_plate, unit_index=unit_index, **engine_kwargs)

    def _check_latent_model(self, model: LatentModel) -> None:
        """Refuse a ready-made model this PPL's engines cannot run (no-op by default)."""

    def latent_model(self, *args: Any, **kwargs: Any) -> LatentModel:
        if isinstance(self.model, LatentModel):
            return self.model
        if self.enum_model_cls.has_enumerated_latents(self.model, args, kwargs):
            return self.enum_model_cls(self.model, args, kwargs, reg_covar=self.reg_covar)
        return super().latent_model(*args, **kwargs)


def front_door(engine_cls: type, base: type, module: str) -> type:
    """The front door of a backend-neutral engine class: a subclass of ``base`` named after the engine."""
    return type(engine_cls.__name__, (base,), {"__doc__": engine_cls.__doc__, "engine_cls": engine_cls,
                                               "__module__": module})
