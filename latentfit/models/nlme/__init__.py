"""Nonlinear mixed-effects models (saemix / Monolix style): data, structural library, model.

>>> from latentfit.models import nlme
>>> model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5})   # doctest: +SKIP
>>> fit = model.fit(df, engine="fsaem")                                            # doctest: +SKIP
"""

from __future__ import annotations

from .data import NLMEData, design_table, read_nonmem
from .model import NLME, Parameter
from .ode import ode
from .structural import (
    LIBRARY,
    Design,
    Structural,
    emax,
    one_compartment_bolus,
    one_compartment_infusion,
    one_compartment_oral,
    sigmoid_emax,
    two_compartment_bolus,
    two_compartment_oral,
)

__all__ = ["LIBRARY", "NLME", "Design", "NLMEData", "Parameter", "Structural", "design_table", "emax", "ode",
           "one_compartment_bolus", "one_compartment_infusion", "one_compartment_oral", "read_nonmem", "sigmoid_emax",
           "two_compartment_bolus", "two_compartment_oral"]
