"""The model families' way up to the integrations layer: hooks (:mod:`latentfit._hooks`).

``latentfit.models`` never imports a PPL, an array library, the integrations layer or an engine (the layers point
downwards).  A family's ``pyro_model`` / ``numpyro_model`` is built by the integrations layer's
:mod:`latentfit.integrations.families`, and :meth:`NLME.fit <latentfit.models.nlme.NLME.fit>` runs its engine through
the ``"fit_nlme"`` front door; ``latentfit/__init__.py`` binds both hooks, loaded only when a user asks for them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from latentfit import _hooks


def families() -> ModuleType:
    """The families' PPL model functions (hook ``"families"``: :mod:`latentfit.integrations.families`)."""
    return _hooks.module("families")


def fit_nlme(model: Any, engine: str, options: dict[str, Any]) -> Any:
    """Fit a bound, checked NLME with ``engine`` and the engine's ``options`` (hook ``"fit_nlme"``: the front door
    :func:`latentfit.integrations.families.fit_nlme`); returns its FitResult."""
    return _hooks.call("fit_nlme", model, engine, options)
