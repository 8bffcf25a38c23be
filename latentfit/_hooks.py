"""Hooks: how a lower layer offers a convenience that a layer above implements.

The layers point downwards (``DESIGN.md``)::

    latentfit/__init__.py, latentfit.plots, cli          the top: wiring, plots, front doors
    latentfit/integrations/                              PPL adapters, the families' PPL functions, arviz
    latentfit/models/                                    model families (no PPL, no engine)
    latentfit/inference/                                 engines, FitResult, post-fit computations

Yet users reach some upper-layer code through lower-layer objects: ``fit.plot_gof()`` and ``fit.to_arviz()`` on a
:class:`~latentfit.inference.results.FitResult` (matplotlib and arviz live above ``inference/``), ``model.fit(df)`` on
an :class:`~latentfit.models.nlme.NLME` (the engines are run by a front door of the integrations layer), and the
families' ``pyro_model`` / ``numpyro_model`` (PPL code).  The lower layer names the *hook* it needs and calls it
through :func:`call` / :func:`module`; which code answers is decided at the top: ``latentfit/__init__.py`` (run
before any submodule of the package can be imported) binds every hook to a ``"module:attribute"`` (or ``"module"``)
target with :func:`provide`.  Targets are imported on first use, so ``import latentfit`` imports neither matplotlib,
arviz nor a PPL.

Why hooks rather than a user-facing subclass in the upper layer: engines are run directly too
(``SAEM(model).run()``), so the record they return must already offer every method; and rather than the upper layer
attaching methods to a lower class, the lower class keeps each method, its signature and its docstring in its own
body, where a reader (and ``help()``) finds them.  This module imports nothing of the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

_TARGETS: dict[str, str] = {}


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function name the first frame outside
    latentfit: the user's line, whichever way the call came (``lf.plot_individual_fits(fit)`` or, through a hook,
    ``fit.plot_individual_fits()``).  Python 3.12's ``skip_file_prefixes`` does this; 3.11 has no such option."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the function that warns: level 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def provide(name: str, target: str) -> None:
    """Bind hook ``name`` to ``target``: ``"package.module:attribute"`` (a callable) or ``"package.module"``."""
    _TARGETS[name] = target


def _resolve(name: str) -> Any:
    try:
        target = _TARGETS[name]
    except KeyError:
        raise LookupError(f"hook {name!r} has no implementation: the layers above bind it when the latentfit "
                          f"package is imported (bound: {sorted(_TARGETS)})") from None
    module_name, _, attribute = target.partition(":")
    mod = importlib.import_module(module_name)
    return getattr(mod, attribute) if attribute else mod


def call(name: str, *args: Any, **kwargs: Any) -> Any:
    """Call the function bound to hook ``name``."""
    fn: Callable[..., Any] = _resolve(name)
    return fn(*args, **kwargs)


def module(name: str) -> ModuleType:
    """The module bound to hook ``name``."""
    return _resolve(name)


def bound() -> dict[str, str]:
    """Every hook and its target (a copy)."""
    return dict(_TARGETS)


__all__ = ["bound", "call", "module", "provide"]
