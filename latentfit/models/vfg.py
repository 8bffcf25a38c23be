"""Variational Flow Graphical models (VFG): the model family's public names.

The graph logic and the torch flavour live in :mod:`latentfit.integrations.vfg`, the JAX flavour in
:mod:`latentfit.integrations.vfg_jax` (flows come from Pyro and flowjax, so they sit with the other PPL code).
This module hands out their names through the ``"vfg"`` hook (:mod:`latentfit._hooks`), so ``models/`` imports
nothing from the layer above it.
"""

from __future__ import annotations

from typing import Any

from latentfit import _hooks

#: the family's names, served by the integrations layer (module ``__getattr__``)
_NAMES = ("GAUSSIAN_NETWORK_COLUMNS", "GAUSSIAN_NETWORK_DAG", "SYNTHETIC_MISSING", "SYNTHETIC_STRUCTURE", "VFG",
           "Graph", "VFGFit", "VFGImputer", "gaussian_network_conditional_f", "gaussian_network_data",
           "parse_structure", "synthetic_imputation_data")
__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(_hooks.module("vfg"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
