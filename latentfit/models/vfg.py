"""Variational Flow Graphical models (VFG): the model family's public names.

The graph logic and the torch flavour live in :mod:`latentfit.integrations.vfg`, the JAX flavour in
:mod:`latentfit.integrations.vfg_jax` (flows come from Pyro and flowjax, so they sit with the other PPL code).
"""

from latentfit.integrations.vfg import (  # noqa: F401
    GAUSSIAN_NETWORK_COLUMNS,
    GAUSSIAN_NETWORK_DAG,
    SYNTHETIC_MISSING,
    SYNTHETIC_STRUCTURE,
    VFG,
    Graph,
    VFGFit,
    VFGImputer,
    gaussian_network_conditional_f,
    gaussian_network_data,
    parse_structure,
    synthetic_imputation_data,
)

__all__ = ["GAUSSIAN_NETWORK_COLUMNS", "GAUSSIAN_NETWORK_DAG", "SYNTHETIC_MISSING", "SYNTHETIC_STRUCTURE", "VFG",
           "Graph", "VFGFit", "VFGImputer", "gaussian_network_conditional_f", "gaussian_network_data",
           "parse_structure", "synthetic_imputation_data"]
