"""f-SAEM: SAEM whose first iterations simulate with the nlme-IMH (Laplace) independent proposal.

Karimi, Lavielle & Moulines, "f-SAEM: a fast stochastic approximation of the EM algorithm for
nonlinear mixed effects models", CSDA 2020.  For individual i, at the current θ,

1. MAP:  ``ẑ_i = argmax_z log p(y_i | z; θ) + log N(z; μ_i, Ω)`` (batched Newton over all units,
   :func:`~latentfit.inference.laplace.conditional_modes`);
2. covariance: ``Γ_i = (J_iᵀ Σ_i^{-1} J_i + Ω^{-1})^{-1}`` (Gauss–Newton, ``J_i = ∂f_i/∂z(ẑ_i)``) for
   Gaussian residuals, ``Γ_i = (−∇² log p(y_i, ẑ_i))^{-1}`` otherwise;
3. the chains are reset at ``ẑ_i`` and ``imh_steps`` independence-sampler steps with proposal
   ``q_i = N(ẑ_i, Γ_i)`` and the full ratio
   ``min{1, π_i(z') q_i(z) / (π_i(z) q_i(z'))}`` replace saemix's kernels.

This runs during the first ``imh_iters`` SAEM iterations (reference code: ``map.range = 1:10``,
``nbiter.mcmc = c(2, 2, 2, 6)``); afterwards the plain saemix kernels (2, 2, 2) take over.  The
stochastic approximation and M-step are SAEM's.  On a linear Gaussian model the proposal is the
exact conditional distribution, so every proposal is accepted.
"""

from __future__ import annotations

from typing import Any

from . import mcmc
from .laplace import conditional_modes, resolve_method
from .model import LatentModel
from .saem import SAEM, SAEMState


class FSAEM(SAEM):
    """f-SAEM on a :class:`LatentModel` (see the module docstring).

    Parameters (in addition to :class:`~latentfit.inference.saem.SAEM`'s)
    ----------
    imh_iters : int
        Number of first SAEM iterations that use the nlme-IMH proposal (default 10).
    imh_steps : int
        IMH steps per such iteration (default 6).
    laplace_steps : int
        Newton steps of the per-individual MAP (warm-started at the previous MAP; default 10).
    laplace_method : ``"auto"`` | ``"gauss_newton"`` | ``"hessian"``
        Precision of the proposal (auto: Gauss–Newton for models with Gaussian faces).
    """

    name = "f-SAEM"
    #: the Laplace-IMH phase re-evaluates its chains: no model cache carried between iterations
    carries_cache = False

    def __init__(self, model: LatentModel, num_iters: Any = (300, 100), num_chains: int | None = None, *,
                 imh_iters: int = 10, imh_steps: int = 6, laplace_steps: int = 10, laplace_method: str = "auto",
                 **saem_options: Any) -> None:
        super().__init__(model, num_iters, num_chains, **saem_options)
        self.validate_options(num_iters, num_chains, imh_iters=imh_iters, imh_steps=imh_steps,
                              laplace_steps=laplace_steps)
        self.laplace_method = resolve_method(model, laplace_method)
        self.imh_iters = min(int(imh_iters), self.schedule.num_iters)
        self.imh_steps = int(imh_steps)
        self.laplace_steps = int(laplace_steps)

    @staticmethod
    def validate_options(num_iters: Any = (300, 100), num_chains: int | None = None, imh_iters: int = 10,
                         imh_steps: int = 6, laplace_steps: int = 10, **_: Any) -> None:
        SAEM.validate_options(num_iters, num_chains)
        if int(imh_iters) < 0:
            raise ValueError(f"imh_iters must be >= 0, got {imh_iters}")
        if int(imh_steps) < 1:
            raise ValueError(f"imh_steps must be >= 1, got {imh_steps}")
        if int(laplace_steps) < 1:
            raise ValueError(f"laplace_steps must be >= 1, got {laplace_steps}")

    # ----- engine protocol -------------------------------------------------------------------------
    def phases(self) -> list[tuple[int, int, Any]]:
        total = self.schedule.num_iters
        out = []
        if self.imh_iters > 0:
            out.append((1, self.imh_iters, "imh"))
        if self.imh_iters < total:
            out.append((self.imh_iters + 1, total, "saem"))
        return out

    def init(self, key: Any) -> SAEMState:
        state = super().init(key)
        return state._replace(mode=self._warm_mode(state.z))

    def _warm_mode(self, z: Any) -> Any:
        """The warm start of the per-unit MAP ``[N, d]``: the chain mean of the initial draws; a unit whose
        log-density is NaN/inf there (a prior draw outside the model's domain, e.g. the log of a latent drawn below
        0) starts at the prior mean (0 without a Gaussian prior face), as :func:`conditional_mode` by default: from
        there the Newton steps went NaN, and so did the chains reset at the mode and the statistics."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        mode = xp.mean(z, 0)
        theta = model.init_params()
        ll, lp = model.log_densities(theta, mode[None])
        bad = ~xp.isfinite(ll + lp)[0]
        if not bool(xp.any(bad)):
            return mode
        alt = model.prior_moments(theta)[0] if model.has_gaussian_prior else ops.zeros(tuple(mode.shape))
        return xp.where(bad[:, None], alt, mode)

    def unit_axes(self) -> dict[str, int]:
        """The chains ``z [L, N, d]`` (axis 1) and the warm start of the MAPs ``mode [N, d]`` (axis 0)."""
        return {"z": 1, "mode": 0}

    def simulate(self, state: SAEMState, theta: dict[str, Any], k: Any, key: Any,
                 phase: Any) -> tuple[mcmc.ChainState, dict[str, Any], SAEMState]:
        model, ops, xp, sim = self.model, self.ops, self.ops.xp, self.sim_ops
        nan = ops.zeros(()) * float("nan")
        if phase != "imh":
            chain, acc, state = super().simulate(state, theta, k, key, phase)
            return chain, dict(acc, nlme_imh=nan), state
        lap = conditional_modes(model, theta, z0=state.mode, num_steps=self.laplace_steps,
                                method=self.laplace_method)
        mode = lap.mode
        chol = ops.small_cholesky(lap.cov)  # [n, d, d]
        log_q = ops.mvn_log_prob_fn(mode, chol)  # log N(z; ẑ_i, Γ_i)  [..., n]
        d = mode.shape[-1]

        def evaluate(z: Any) -> tuple[Any, Any]:
            return model.log_densities(theta, z)

        z0 = xp.broadcast_to(mode, tuple(state.z.shape)) + 0.0 * state.z  # reset every chain at the MAP
        chain = mcmc.init_chain_state(z0, evaluate)
        m = self.imh_steps
        keys = sim.split(key, 2 * m)
        steps = ops.arange(m)

        def imh_step(s: Any, carry: tuple[mcmc.ChainState, Any]) -> tuple[mcmc.ChainState, Any]:
            chain, rates = carry
            eps = sim.normal(keys[2 * s], tuple(state.z.shape))
            z_new = mode + xp.sum(chol * eps[..., None, :], -1)  # ẑ + L ε
            chain, ok = mcmc.independent_mh(sim, keys[2 * s + 1], chain, z_new, log_q(z_new), log_q(chain.z),
                                            evaluate)
            return chain, rates + (steps == s) * sim.unit_mean(ok * 1.0)  # step s's rate in slot s (exact)

        # one traced body on JAX (an unrolled loop made the step's program imh_steps times larger); torch: a loop
        chain, rates = ops.fori_loop(0, m, imh_step, (chain, ops.zeros((m,))))
        # same history records in both phases (saemix kernels idle here)
        n1, n2, n3 = self.kernels
        acc = {"prior_imh": nan} if n1 else {}
        if n2:
            acc["rw"] = ops.zeros((d,)) * float("nan")
        if n3:
            acc["block_rw"] = nan
        if self._latent_lines() is not None:
            acc["line"] = ops.zeros((int(self._latent_lines().shape[0]),)) * float("nan")
        acc["nlme_imh"] = xp.mean(rates)
        return chain, acc, state._replace(mode=mode)


__all__ = ["FSAEM"]
