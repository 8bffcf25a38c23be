"""Ready-made model families: each knows its statistics and closed-form M-step and hands out
ordinary Pyro (and NumPyro) model functions."""

from typing import Any

from latentfit.models.glmm import (
    logistic_mixed_model,
    missing_logistic_model,
    simulate_logistic_mixed,
    simulate_missing_logistic,
)
from latentfit.models.mixed import LinearMixedModel
from latentfit.models.mixture import GaussianMixture

_VFG_NAMES = ("VFG", "VFGImputer")

__all__ = ["VFG", "GaussianMixture", "LinearMixedModel", "VFGImputer", "logistic_mixed_model",
           "missing_logistic_model", "simulate_logistic_mixed", "simulate_missing_logistic"]


def __getattr__(name: str) -> Any:
    """``VFG`` and ``VFGImputer`` on first use: they load the flows and scikit-learn (1-3 s), which a fit of any other
    family does not need."""
    if name in _VFG_NAMES:
        from latentfit.models import vfg

        return getattr(vfg, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
