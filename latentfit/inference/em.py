"""EM: the exact batch EM algorithm (Dempster, Laird & Rubin 1977) on the shared statistics core.

Iteration (= epoch) k:  ``ŝ^{k} = Σ_i s̄_i(θ^{k−1})`` (exact E-step over all units),
``θ^{k} = θ̄(ŝ^{k})`` (closed-form M-step).  The exact E-step pass also yields the marginal
log-likelihood ``Σ_i log p(y_i; θ^{k−1})`` (history ``objective``), which EM never decreases.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .stats_table import ProxyRule, StatEngine, Stats, StatState


class ExactMemory(NamedTuple):
    """Exact EM's memory: the log-likelihood its last E-step computed on the way."""

    #: ``Σ_i log p(y_i; θ^{k−1})``
    log_lik: Any


class FullBatchRule(ProxyRule):
    """``𝒮^{(k+1)} = Σ_i s̄_i(θ^k)``: the full-data statistic itself (exact, or MC for MCEM)."""

    def init(self, eng: StatEngine, theta: dict[str, Any], full: Stats | None, rows: Stats | None) -> Any:
        if eng.model.has_exact_marginal and not eng.monte_carlo:
            return ExactMemory(log_lik=eng.ops.zeros(()))
        return None

    def proxy(self, eng: StatEngine, state: StatState, theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, StatState]:
        total, _, ll, state = eng.full_pass(state, theta, key)
        if ll is not None and state.memory is not None:
            state = state._replace(memory=ExactMemory(log_lik=ll))
        return total, state

    def objective(self, state: StatState) -> Any:
        return None if state.memory is None else state.memory.log_lik


class EM(StatEngine):
    """Exact batch EM. One epoch is one EM iteration.

    Example
    -------
    Three well-separated Gaussian clusters in 2-D:

    >>> import numpy as np, torch
    >>> from latentfit.inference.em import EM
    >>> from latentfit.models import GaussianMixture
    >>> g = torch.Generator().manual_seed(0)
    >>> centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    >>> x = centres[torch.arange(300) % 3] + 0.6 * torch.randn(300, 2, generator=g, dtype=torch.float64)
    >>> fit = EM(GaussianMixture(x, 3), num_epochs=100, progress=False).run()
    >>> fit.params["weights"].round(2)
    array([0.34, 0.34, 0.33])
    >>> bool(np.all(np.diff(fit.history["objective"]) > -1e-9))   # the log-likelihood never decreases
    True
    >>> round(fit.log_likelihood(), 2)                            # exact: Σ_i log Σ_k ω_k N(x_i; μ_k, Σ_k)
    -864.03
    """

    name = "EM"
    rule = FullBatchRule()
    needs_init_pass = False
    needs_table = False

    def __init__(self, model: Any, num_epochs: int = 100, batch_size: int | None = None, **kwargs: Any) -> None:
        if batch_size is not None and int(batch_size) != model.num_units:
            raise ValueError(f"{self.name} is full-batch: batch_size must be None or n={model.num_units} "
                             f"(got {batch_size}); use MiniBatchEM for mini-batches")
        super().__init__(model, num_epochs, None, **kwargs)
