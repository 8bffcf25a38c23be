"""EM: the exact batch EM algorithm (Dempster, Laird & Rubin 1977) on the shared statistics core.

Iteration (= epoch) k:  ``ŝ^{k} = Σ_i s̄_i(θ^{k−1})`` (exact E-step over all units),
``θ^{k} = θ̄(ŝ^{k})`` (closed-form M-step).  The exact E-step pass also yields the marginal
log-likelihood ``Σ_i log p(y_i; θ^{k−1})`` (history ``objective``), which EM never decreases.

Stopping as scikit-learn's ``GaussianMixture``: ``tol`` ends the fit at the first epoch whose E-step finds the mean
log-likelihood per unit risen by less than ``tol`` since the previous one (``num_epochs`` is then the most epochs,
scikit-learn's ``max_iter``); a fit that ends with it still rising by more than ``tol`` (1e-3, scikit-learn's default,
when none is given) warns with :class:`~latentfit.ConvergenceWarning`.

Generalized EM (Dempster, Laird & Rubin 1977, §3; McLachlan & Krishnan 2008, §1.5.5) for a model with exact
responsibilities but no closed-form M-step (``model.has_exact_responsibilities`` without ``has_expected_stats``: a
Poisson, Bernoulli or regression mixture written in Pyro / NumPyro): the E-step gives
``r_ik = p(z_i = k | y_i; θ^{k−1})`` and the marginal log-likelihood, the M-step maximises
``Q(θ | θ^{k−1}) = Σ_i Σ_k r_ik log p(y_i, z_i = k; θ)`` (``model.expected_log_joint``) over the unconstrained free
parameters by damped Newton (:func:`~latentfit.inference.mstep.newton_maximize`, ``newton_steps`` steps from
``θ^{k−1}``) and keeps the result only if ``Q`` did not decrease, so the log-likelihood still never decreases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .driver import callback_stops
from .model import ModelSpecificationError
from .mstep import flatten, newton_maximize, unflatten
from .stats_table import ProxyRule, StatEngine, Stats, StatState

#: the gain of mean log-likelihood per unit and epoch under which scikit-learn's EM stops (its ``tol``): a fit ending
#: with a larger gain warns
DEFAULT_TOL = 1e-3
#: an eager (torch) numerical M-step stops its Newton steps once one moves θ (unconstrained) by less than this,
#: relative: the next would move it by about its square
NEWTON_XTOL = 1e-10


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


class ResponsibilityRule(FullBatchRule):
    """Generalized EM's E-step: ``𝒮^{(k+1)} = {r: [r_ik(θ^k)]}``, every unit's exact responsibilities (not a sum: the
    numerical M-step reads them), with ``Σ_i log p(y_i; θ^k)`` on the way."""

    def init(self, eng: StatEngine, theta: dict[str, Any], full: Stats | None, rows: Stats | None) -> Any:
        return ExactMemory(log_lik=eng.ops.zeros(()))

    def proxy(self, eng: StatEngine, state: StatState, theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, StatState]:
        r, ll = eng.model.responsibilities(theta)
        return {"r": r}, state._replace(memory=ExactMemory(log_lik=eng.ops.xp.sum(ll)))


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

    A model with enumerated labels and no closed-form M-step (a Poisson mixture written in Pyro) is fitted by
    generalized EM: exact responsibilities, Newton M-step (``newton_steps`` per epoch), the same stopping rule.
    """

    name = "EM"
    rule = FullBatchRule()
    needs_init_pass = False
    needs_table = False

    #: generalized EM (exact responsibilities, numerical M-step): set by :meth:`_check_model`
    numeric_m_step = False

    def __init__(self, model: Any, num_epochs: int = 100, batch_size: int | None = None, tol: float | None = None,
                 newton_steps: int = 10, **kwargs: Any) -> None:
        """``tol``: stop at the first epoch whose mean log-likelihood per unit rose by less than ``tol`` (scikit-learn's
        ``tol``; ``num_epochs`` is then its ``max_iter``); None: run ``num_epochs`` epochs.  Either way the fit warns
        when it ends with the mean log-likelihood still rising by more than ``tol`` (default 1e-3) per epoch.
        ``newton_steps``: damped Newton steps of a numerical M-step (generalized EM; unused with a closed form)."""
        if int(newton_steps) < 1:
            raise ValueError(f"newton_steps must be >= 1, got {newton_steps}")
        self.newton_steps = int(newton_steps)
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

    def _check_model(self) -> None:
        """A closed-form M-step (``model.m_step``), or exact responsibilities without one: generalized EM."""
        model = self.model
        if model.has_expected_stats or not getattr(model, "has_exact_responsibilities", False):
            super()._check_model()
            return
        self.numeric_m_step = True
        self.rule = ResponsibilityRule()
        self._free = [n for n, p in model.params.items() if not p.fixed]
        # shapes in unconstrained space (a simplex of K weights: K − 1 coordinates)
        self._shapes = {n: model.ops.shape_of(model.params[n].to_unconstrained, model.params[n].value)
                        for n in self._free}

    def m_step(self, s: Stats, theta: dict[str, Any]) -> dict[str, Any]:
        """Closed form, or generalized EM's: ``θ̃ = argmax_θ Q(θ | θ^{k−1})`` by damped Newton in unconstrained space
        from ``θ^{k−1}``, kept only if ``Q(θ̃) ≥ Q(θ^{k−1})`` (then ``log p(y; θ̃) ≥ log p(y; θ^{k−1})``)."""
        if not self.numeric_m_step:
            return super().m_step(s, theta)
        model, ops, xp = self.model, self.ops, self.ops.xp
        names, shapes, r = self._free, self._shapes, s["r"]
        if not names:  # every parameter fixed
            return dict(theta)
        fixed = {n: v for n, v in theta.items() if n not in names}

        def q(x: Any) -> Any:
            th = dict(fixed)
            th.update(model.constrain(unflatten(x, names, shapes)))
            return model.expected_log_joint(th, r)

        x0 = flatten(ops, model.unconstrain({n: theta[n] for n in names}), names)
        if ops.jittable:  # one compiled loop of newton_steps steps
            x1 = newton_maximize(ops, q, x0, num_steps=self.newton_steps)
        else:  # eager: stop once a step no longer moves x (quadratic convergence: x is then exact to rounding)
            x1 = x0
            for _ in range(self.newton_steps):
                x_prev, x1 = x1, newton_maximize(ops, q, x1, num_steps=1)
                if float(xp.max(xp.abs(x1 - x_prev))) <= NEWTON_XTOL * (1.0 + float(xp.max(xp.abs(x_prev)))):
                    break
        accept = q(x1) >= q(x0)  # a NaN or lower Q: keep θ^{k−1} (as it was, not through the transforms)
        new = model.constrain(unflatten(x1, names, shapes))
        out = dict(theta)
        out.update({n: xp.where(accept, new[n], theta[n]) for n in names})
        return out

    def distribute(self) -> None:
        if self.numeric_m_step:
            raise ValueError(f"{self.name}: a data-parallel fit with a numerical M-step (generalized EM) is not "
                             "supported; fit the model in one process")
        super().distribute()

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
