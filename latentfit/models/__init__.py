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
from latentfit.models.vfg import VFG, VFGImputer

__all__ = ["VFG", "GaussianMixture", "LinearMixedModel", "VFGImputer", "logistic_mixed_model",
           "missing_logistic_model", "simulate_logistic_mixed", "simulate_missing_logistic"]
