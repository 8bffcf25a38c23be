"""Nonlinear mixed-effects models (saemix / Monolix style): data, structural library, model.

>>> from latentfit.models import nlme
>>> model = nlme.NLME("emax", {"E0": 5.0, "Emax": 20.0, "EC50": 30.0}, x="dose",
...                   columns={"id": "subject", "dv": "response"})   # dose-response data without time

A fit: see :meth:`NLME.fit`; the README section "Nonlinear mixed-effects models" has the saemix vocabulary.
"""

from __future__ import annotations

from .covariate_search import CovariateSearch, covariate_search
from .data import NLMEData, design_table, read_nonmem
from .model import NLME, Parameter
from .ode import ode
from .structural import (
    LIBRARY,
    Design,
    SolverWarning,
    Structural,
    emax,
    one_compartment_bolus,
    one_compartment_infusion,
    one_compartment_oral,
    sigmoid_emax,
    two_compartment_bolus,
    two_compartment_infusion,
    two_compartment_oral,
)

__all__ = ["LIBRARY", "NLME", "CovariateSearch", "Design", "NLMEData", "Parameter", "SolverWarning", "Structural",
           "covariate_search", "design_table", "emax", "ode", "one_compartment_bolus", "one_compartment_infusion",
           "one_compartment_oral", "read_nonmem", "sigmoid_emax", "two_compartment_bolus", "two_compartment_infusion",
           "two_compartment_oral"]
