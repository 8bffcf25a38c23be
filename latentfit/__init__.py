"""latentfit: stochastic-EM, SAEM and friends for latent-variable models written in Pyro and NumPyro."""

from __future__ import annotations

from latentfit import _hooks

# The top of the package binds the hooks through which the lower layers reach the upper ones (see
# latentfit/_hooks.py): FitResult's plots and arviz conversion, the model families' PPL functions and front doors.
# Targets are imported on first use.
for _name in ("plot_convergence", "plot_observations_vs_predictions", "plot_residuals", "plot_individual_fits",
              "plot_vpc", "plot_gof"):
    _hooks.provide(_name, f"latentfit.plots:{_name}")
_hooks.provide("to_arviz", "latentfit.integrations.arviz:to_arviz")
_hooks.provide("fit_nlme", "latentfit.integrations.families:fit_nlme")
_hooks.provide("families", "latentfit.integrations.families")
_hooks.provide("glmm_families", "latentfit.integrations.glmm_families")
_hooks.provide("ode_solvers", "latentfit.integrations.ode_solvers")
_hooks.provide("vfg", "latentfit.integrations.vfg")
del _name

from latentfit import datasets  # noqa: E402
from latentfit._compilation_cache import enable_compilation_cache  # noqa: E402
from latentfit.inference.model import (  # noqa: E402
    ConvergenceWarning,
    DataError,
    DegenerateFitError,
    LatentModel,
    ModelSpecificationError,
    NonFiniteError,
)
from latentfit.inference.results import FitResult  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ConvergenceWarning", "DataError", "DegenerateFitError", "FitResult", "LatentModel",
           "ModelSpecificationError", "NonFiniteError", "datasets", "enable_compilation_cache", "__version__"]
