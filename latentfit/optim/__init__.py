"""Optimisers for Pyro SVI / NumPyro SVI users, each as a ``torch.optim.Optimizer`` and an optax transformation.

* AMSGrad: :class:`AMSGrad` (``torch.optim.Adam(amsgrad=True)``) and :func:`amsgrad` (``optax.amsgrad``).
* OPT-AMSGrad (Wang, Li, Karimi & Li 2019, arXiv:1903.01435): :class:`OptAMSGrad` and :func:`opt_amsgrad`.
* HWA, weight averaging of the variational parameters every ``c`` steps: :class:`HWA` (wraps a torch optimiser),
  :func:`pyro_hwa` / :func:`pyro_hwa_averages` (Pyro SVI) and :func:`hwa` / :func:`hwa_averaged` /
  :func:`hwa_variance` (wraps an optax transformation).

The torch names live in :mod:`latentfit.optim.torch_optim`, the optax ones in :mod:`latentfit.optim.optax_optim`;
both are imported lazily here, so ``from latentfit.optim import OptAMSGrad`` does not import jax and
``from latentfit.optim import opt_amsgrad`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_TORCH = ("AMSGrad", "OptAMSGrad", "HWA", "pyro_hwa", "pyro_hwa_averages")
_OPTAX = ("amsgrad", "opt_amsgrad", "hwa", "hwa_averaged", "hwa_variance", "HWAState", "OptAMSGradState")

__all__ = [*_TORCH, *_OPTAX]


def __getattr__(name: str) -> Any:
    if name in _TORCH:
        return getattr(importlib.import_module("latentfit.optim.torch_optim"), name)
    if name in _OPTAX:
        return getattr(importlib.import_module("latentfit.optim.optax_optim"), name)
    raise AttributeError(f"module 'latentfit.optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
