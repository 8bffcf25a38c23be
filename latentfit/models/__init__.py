"""Ready-made model families: each knows its statistics and closed-form M-step and hands out
ordinary Pyro (and NumPyro) model functions."""

from latentfit.models.mixed import LinearMixedModel
from latentfit.models.mixture import GaussianMixture

__all__ = ["GaussianMixture", "LinearMixedModel"]
