"""Monte-Carlo EM (Wei & Tanner, JASA 1990) and mini-batch MCEM (Karimi, Lavielle & Moulines, "On the
convergence properties of the mini-batch EM and MCEM algorithms", HAL hal-02334485, 2019).

The exact per-unit statistic is replaced by a Monte-Carlo average over ``M = num_samples`` draws
``z_{i,m} ~ p(z_i | y_i; θ)`` — exact posterior draws when the model has a sampler (discrete
latents), otherwise warm-started batched MH chains (prior-IMH + component-wise RW, ``mcmc_steps``
sweeps per visit):

    S̃_i(θ) = (1/M) Σ_m S(z_{i,m}, y_i).

``MCEM``: full batch, ``θ^{k} = θ̄(Σ_i S̃_i(θ^{k−1}))``.  ``MiniBatchMCEM``: the incremental rule of
:mod:`~latentfit.inference.iem` on the MC statistics (a table of the last MC statistic per unit).
"""

from __future__ import annotations

from typing import Any

from .em import EM
from .iem import MiniBatchEM


class MCEM(EM):
    """Monte-Carlo EM: one full-batch MC E-step (``num_samples`` draws per unit) per epoch."""

    name = "MCEM"
    monte_carlo = True


class MiniBatchMCEM(MiniBatchEM):
    """Mini-batch MCEM: refresh b units' MC statistics per iteration (default ⌈n/10⌉)."""

    name = "MiniBatchMCEM"
    monte_carlo = True

    def __init__(self, model: Any, num_epochs: int = 20, batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, num_epochs, batch_size, **kwargs)
