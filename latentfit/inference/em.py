"""EM: the exact batch EM algorithm (Dempster, Laird & Rubin 1977) on the shared statistics core.

Iteration (= epoch) k:  ``ŝ^{k} = Σ_i s̄_i(θ^{k−1})`` (exact E-step over all units),
``θ^{k} = θ̄(ŝ^{k})`` (closed-form M-step).  The exact E-step pass also yields the marginal
log-likelihood ``Σ_i log p(y_i; θ^{k−1})`` (history ``objective``), which EM never decreases.

Stopping as scikit-learn's ``GaussianMixture``: ``tol`` ends the fit at the first epoch whose E-step finds the mean
log-likelihood per unit risen by less than ``tol`` since the previous one (``num_epochs`` is then the most epochs,
scikit-learn's ``max_iter``); a fit that ends with it still rising by more than ``tol`` (1e-3, scikit-learn's default,
when none is given) warns with :class:`~latentfit.ConvergenceWarning`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .driver import callback_stops
from .model import ModelSpecificationError
from .stats_table import ProxyRule, StatEngine, Stats, StatState

#: the gain of mean log-likelihood per unit and epoch under which scikit-learn's EM stops (its ``tol``): a fit ending
#: with a larger gain warns
DEFAULT_TOL = 1e-3


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

    def __init__(self, model: Any, num_epochs: int = 100, batch_size: int | None = None, tol: float | None = None,
                 **kwargs: Any) -> None:
        """``tol``: stop at the first epoch whose mean log-likelihood per unit rose by less than ``tol`` (scikit-learn's
        ``tol``; ``num_epochs`` is then its ``max_iter``); None: run ``num_epochs`` epochs.  Either way the fit warns
        when it ends with the mean log-likelihood still rising by more than ``tol`` (default 1e-3) per epoch."""
        if batch_size is not None and int(batch_size) != model.num_units:
            raise ValueError(f"{self.name} is full-batch: batch_size must be None or n={model.num_units} "
                             f"(got {batch_size}); use MiniBatchEM for mini-batches")
        if tol is not None and not float(tol) > 0:
            raise ValueError(f"tol must be a positive number (a gain of mean log-likelihood per unit), got {tol!r}")
        if tol is not None and not getattr(model, "has_exact_marginal", False):
            raise ModelSpecificationError(f"tol= stops EM on the exact log-likelihood of its E-step; this model "
                                          f"({type(model).__name__}) has none: give num_epochs= alone")
        super().__init__(model, num_epochs, None, **kwargs)
        self.tol = None if tol is None else float(tol)
        if self.tol is not None:
            self.callback = _ToleranceStop(self.tol, lambda: self._total_units, self.callback)

    def convergence_warnings(self, history: dict[str, list]) -> list[str]:
        """The mean log-likelihood per unit still rising by more than ``tol`` (1e-3 without one) over the last
        epoch of a fit that ran all its epochs: it ended before EM converged (a fit stopped by ``tol`` or by the
        user's callback does not warn)."""
        objective = history.get("objective") or []
        if len(objective) < max(2, self.num_iterations):  # too short, or stopped early (tol, the user's callback)
            return []
        last = np.asarray([float(np.sum(v)) for v in objective[-2:]])
        tol = DEFAULT_TOL if self.tol is None else self.tol
        gain = float(last[1] - last[0]) / max(int(self._total_units), 1)
        if not np.isfinite(gain) or gain <= tol:
            return []
        return [f"the mean log-likelihood per unit still rose by {gain:.3g} in the last epoch (more than tol={tol:g}, "
                f"scikit-learn's criterion): EM has not converged after {len(objective)} epochs; give more "
                "(num_epochs=) or tol= to run until it has"]


class _ToleranceStop:
    """EM's ``tol`` as a callback (the driver stops the fit exactly at the iteration it names): stop when the exact
    log-likelihood of epoch k's E-step (``Σ_i log p(y_i; θ^{k−1})``) rose by less than ``tol × n`` since epoch k − 1's;
    the user's own callback is called first and may stop the fit too."""

    def __init__(self, tol: float, total_units: Callable[[], int], user: Callable[..., Any] | None) -> None:
        self.tol, self.total_units, self.user = tol, total_units, user
        self.previous: float | None = None
        self.last: int | None = None  # the iteration of ``previous`` (a new run, or a resumed one, starts afresh)

    def __call__(self, k: int, record: dict[str, Any]) -> bool:
        if self.user is not None:
            try:
                if callback_stops(self.user(k, record)):
                    return True
            except StopIteration:
                return True
        value = record.get("objective")
        if value is None:
            return False
        current = float(np.sum(np.asarray(value)))
        previous = self.previous if self.last == k - 1 else None
        self.previous, self.last = current, k
        if previous is None:
            return False
        return (current - previous) / max(int(self.total_units()), 1) < self.tol
