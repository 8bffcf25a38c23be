"""latentfit: stochastic-EM, SAEM and friends for latent-variable models written in Pyro and NumPyro."""

from __future__ import annotations

from latentfit import datasets
from latentfit._compilation_cache import enable_compilation_cache
from latentfit.inference.model import (
    ConvergenceWarning,
    DataError,
    LatentModel,
    ModelSpecificationError,
    NonFiniteError,
)
from latentfit.inference.results import FitResult

__version__ = "0.1.0"

__all__ = ["ConvergenceWarning", "DataError", "FitResult", "LatentModel", "ModelSpecificationError", "NonFiniteError",
           "datasets", "enable_compilation_cache", "__version__"]
