"""Ready-made model families: each knows its statistics and closed-form M-step and hands out
ordinary Pyro (and NumPyro) model functions."""

from latentfit.models.glmm import (
    logistic_mixed_model,
    missing_logistic_model,
    simulate_logistic_mixed,
    simulate_missing_logistic,
)
from latentfit.models.mixed import LinearMixedModel
from latentfit.models.mixture import GaussianMixture

__all__ = ["GaussianMixture", "LinearMixedModel", "logistic_mixed_model", "missing_logistic_model",
           "simulate_logistic_mixed", "simulate_missing_logistic"]
from latentfit.models.vfg import VFG as VFG, VFGImputer as VFGImputer  # noqa: E402, I001  (VFG models)
