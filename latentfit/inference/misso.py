"""MISSO, maximum-likelihood instance: incremental minimisation of stored per-unit Monte-Carlo surrogates.

Karimi, Wai, Moulines & Li, "MISSO: Minimization by Incremental Stochastic Surrogate Optimization for Large
Scale Nonconvex Problems" (IJCAI 2021; arXiv 1809.xxxx as "Minimization by incremental stochastic surrogate
optimization").  The objective ``L(θ) = −(1/n) Σ_i log g_i(θ)`` is majorised unit by unit by Monte-Carlo
surrogates ``L̃_i(θ; θ̄, {z_m}) = (1/M) Σ_m [log p_i(z_m; θ̄) − log f_i(z_m; θ)]``, ``z_m ~ p(z_i | y_i; θ̄)``.
Every unit keeps the surrogate built at its last visit; iteration k refreshes the surrogates of a mini-batch
``B_k`` with ``M_k`` draws at ``θ^k`` and sets ``θ^{k+1}`` to the minimiser of their sum.

* **Exponential-family parameters** (the model's closed-form M-step): the surrogate is the Monte-Carlo
  statistic ``S̃_i = (1/M_k) Σ_m S(z_{i,m}, y_i)``; the table of the last ``S̃_i`` and its running sum are those
  of incremental (mini-batch) MCEM, and the minimiser is the closed-form M-step on the sum.  With ``M_k`` equal
  to the number of chains at every visit, MISSO *is* :class:`~latentfit.inference.mcem.MiniBatchMCEM`.
* **Other parameters** ``x`` (unconstrained; e.g. the fixed effects of a logistic mixed model): the quadratic
  surrogate ``L̂_i(x) = L̃_i(x_i) + ⟨ĝ_i, x − x_i⟩ + ½ (x − x_i)ᵀ H̄ (x − x_i)`` with the anchor ``x_i`` (x at unit
  i's last visit) and ``ĝ_i = −(1/M) Σ_m ∇_x log f_i(z_m; x_i)`` stored per unit.  Its minimiser is the
  quasi-Newton step of the paper's logistic instance, ``x^{k+1} = (1/n) Σ_i x_i − H̄⁻¹ (1/n) Σ_i ĝ_i``, where
  ``H̄`` is the per-unit curvature ``−(1/|B|) Σ_{i∈B} (1/M) Σ_m ∇²_x log f_i``, averaged over visits (the
  paper's bound ``S'' ≤ 1/4`` specialised to logistic models; here estimated, its eigenvalues floored).

Draws: exact posterior draws when the model has a sampler, otherwise ``L`` persistent MH chains per unit
(prior-IMH + component-wise random walk, ``mcmc_steps`` sweeps between draws); a visit takes ``⌈M_k / L⌉``
draws of the ``L`` chains.  Default ``M_k = 10 + k²`` (k the epoch, counted from 0), the paper's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .fisher import forward_jacobian
from .mcem import MiniBatchMCEM
from .model import LatentModel, ModelSpecificationError
from .mstep import flatten, unflatten
from .stats_table import Stats, s_put, s_sub, s_take
from .units import put_units, take_units

#: eigenvalue floor of the curvature H̄, relative to its largest eigenvalue
CURVATURE_FLOOR = 1e-6


def paper_mc_size(epoch: Any) -> Any:
    """``M_k = 10 + k²`` (k the epoch, from 0): the paper's schedule for the missing-covariate instance."""
    return 10 + epoch * epoch


class MISSO(MiniBatchMCEM):
    """MISSO (maximum-likelihood instance) on a :class:`LatentModel`.

    Parameters
    ----------
    num_epochs, batch_size
        As the EM family (default mini-batches of 10% of the units).
    mc_size : int or callable
        ``M_k``, Monte-Carlo draws per unit visit, or a schedule of the epoch (from 0); default ``10 + k²``.
    num_chains : int
        Persistent chains (or exact posterior draws) per unit and draw; default 10.
    mcmc_steps : int
        MH sweeps between two draws of a chain.
    """

    name = "MISSO"
    batches_per_epoch = 10

    def __init__(self, model: LatentModel, num_epochs: int = 20, batch_size: int | None = None, *,
                 mc_size: int | Callable[[Any], Any] = paper_mc_size, num_chains: int = 10, **kwargs: Any) -> None:
        if "num_samples" in kwargs:
            raise TypeError("MISSO takes num_chains (chains per unit) and mc_size (draws per visit), not num_samples")
        if not callable(mc_size) and int(mc_size) < 1:
            raise ValueError(f"mc_size must be >= 1 or a schedule of the epoch, got {mc_size!r}")
        if int(num_chains) < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")
        self.mc_size = mc_size if callable(mc_size) else (lambda k, m=int(mc_size): m + 0 * k)
        super().__init__(model, num_epochs, batch_size, num_samples=int(num_chains), **kwargs)
        self.numeric = list(model.numeric_params)
        self._shapes = {n: tuple(np.shape(model.ops.to_numpy(model.params[n].to_unconstrained(
            model.params[n].value)))) for n in self.numeric}

    def _check_model(self) -> None:
        model = self.model
        if model.latent_dim == 0:
            raise ModelSpecificationError("MISSO needs latent variables per unit; this model has none")
        if not model.has_stats and not model.numeric_params:
            raise ModelSpecificationError("MISSO: the model has no free parameter to estimate")

    # ----- the surrogates of a mini-batch --------------------------------------------------------------
    def _draws(self, t: Any) -> Any:
        """Draws of the L chains per visit at inner iteration t: ``⌈M_k / L⌉`` (at least 1)."""
        epoch = (t - 1) // self.num_batches
        m = self.mc_size(epoch)
        sweeps = (m + self.num_samples - 1) // self.num_samples
        return sweeps * (sweeps > 0) + 1 * (sweeps <= 0)

    def surrogates(self, state: dict[str, Any], theta: dict[str, Any], units: Any, key: Any,
                   num_draws: Any) -> tuple[Stats, Any, Any, dict[str, Any]]:
        """Monte-Carlo surrogates of ``units`` at θ: statistic rows ``[b, ...]``, gradients ``ĝ_i`` ``[b, p]`` of the
        negative complete log-likelihood in the numeric parameters, and their curvature summed over the batch."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        fixed = {n: v for n, v in theta.items() if n not in self.numeric}
        x0 = flatten(ops, model.unconstrain({n: theta[n] for n in self.numeric}), self.numeric)
        p = len(x0) if self.numeric else 0

        def per_unit_fn(z: Any) -> Callable[[Any], Any]:
            def per_unit(x: Any) -> Any:
                th = dict(fixed)
                th.update(model.constrain(unflatten(x, self.numeric, self._shapes)))
                return xp.mean(model.log_joint(th, z, units), 0)  # [b]

            return per_unit

        def one_draw(st: dict[str, Any], kk: Any) -> tuple[Stats, Any, Any, dict[str, Any]]:
            if model.has_posterior_sampler:
                z = model.sample_posterior(theta, kk, self.num_samples, units)
            else:
                z, st = self._advance_chains(st, theta, units, kk)
            rows = {k: xp.mean(v, 0) for k, v in model.stats_rows(theta, z, units).items()} if model.has_stats \
                else {}
            g = -forward_jacobian(ops, per_unit_fn(z), x0) if p else ops.zeros((len(units), 0))  # [b, p]
            return rows, g, z, st

        # the first draw uses ``key`` as MiniBatchMCEM's oracle does (same streams); later draws a key of index
        # 2·mcmc_steps + 1, which the chains' own split of ``key`` (2·mcmc_steps + 1 keys) never hands out
        rows, g, z, state = one_draw(state, key)
        key = ops.split(key, 2 * self.mcmc_steps + 2)[-1]
        # the curvature of the batch's surrogate: at the first draw (an estimate; it need not be averaged)
        h = -ops.hessian(lambda x: xp.sum(per_unit_fn(z)(x)))(x0) if p else ops.zeros((0, 0))
        keys = ops.split(key, 2)

        def body(i: Any, carry: Any) -> Any:
            r_acc, g_acc, st, kk = carry
            kk, sub = ops.split(kk)
            r, gi, _, st = one_draw(st, sub)
            return ({k: r_acc[k] + r[k] for k in r_acc}, g_acc + gi, st, kk)

        # further draws (a dynamic count on JAX: a traced loop bound)
        rows, g, state, _ = ops.fori_loop(1, num_draws, body, (rows, g, state, keys[0]))
        inv = 1.0 / num_draws
        return {k: v * inv for k, v in rows.items()}, g * inv, h, state

    # ----- engine protocol ------------------------------------------------------------------------------
    def oracle(self, state: dict[str, Any], theta: dict[str, Any], units: Any,
               key: Any) -> tuple[Stats, dict[str, Any]]:
        """The statistic rows of one visit with ``num_chains`` draws (MiniBatchMCEM's oracle)."""
        rows, _, _, state = self.surrogates(state, theta, units, key, 1)
        return rows, state

    def init(self, key: Any) -> dict[str, Any]:
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta = model.init_params()
        state: dict[str, Any] = {"theta": theta}
        if not model.has_posterior_sampler:
            key, k0 = ops.split(key)
            z = model.sample_prior(theta, k0, self.num_samples)  # [L, n, d]
            sd = xp.std(xp.reshape(z, (-1, z.shape[-1])), 0)
            state["z"] = xp.swapaxes(z, 0, 1) + 0.0
            state["rw_scale"] = 0.5 * xp.where(sd > 0, sd, 1.0)
            state["num_nonfinite"] = ops.zeros(())  # proposals rejected for a non-finite log-density
        key, k1 = ops.split(key)
        n = model.num_units
        rows, g, h, state = self.surrogates(state, theta, ops.arange(n), k1, self._draws(1))
        state["table"] = rows
        state["s_run"] = self.reduce(rows, None)
        if self.numeric:
            x0 = flatten(ops, model.unconstrain({k: theta[k] for k in self.numeric}), self.numeric)
            state["anchor"] = xp.reshape(x0, (1, -1)) + ops.zeros((n, len(x0)))
            state["grad"] = g
            state["sum_anchor"] = xp.sum(state["anchor"], 0)
            state["sum_grad"] = xp.sum(g, 0)
            state["curvature"] = h / n
        state["key"] = key
        return state

    def inner(self, state: dict[str, Any], bi: Any, bj: Any, t: Any, key: Any) -> dict[str, Any]:
        """Refresh the surrogates of the batch ``bi`` at θ, then θ = argmin of the summed surrogates."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta = state["theta"]
        rows, g, h, state = self.surrogates(dict(state), theta, bi, key, self._draws(t))
        new_theta = dict(theta)
        if model.has_stats:
            delta = self.reduce(s_sub(rows, s_take(ops, state["table"], bi)), bi)
            s_run = {k: v + delta[k] for k, v in state["s_run"].items()}
            state = dict(state, s_run=s_run, table=s_put(ops, state["table"], bi, rows))
            new_theta.update(model.m_step(s_run, theta, model.num_units))
        if self.numeric:
            n, b = model.num_units, self.batch_size
            x = flatten(ops, model.unconstrain({k: theta[k] for k in self.numeric}), self.numeric)
            old_anchor, old_grad = take_units(ops, state["anchor"], bi), take_units(ops, state["grad"], bi)
            new_anchor = xp.reshape(x, (1, -1)) + 0.0 * old_anchor
            sum_anchor = state["sum_anchor"] + xp.sum(new_anchor - old_anchor, 0)
            sum_grad = state["sum_grad"] + xp.sum(g - old_grad, 0)
            curvature = state["curvature"] + (b / n) * (h / b - state["curvature"])
            x_new = sum_anchor / n - _solve_psd(ops, curvature, sum_grad / n)
            state = dict(state, anchor=put_units(ops, state["anchor"], bi, new_anchor),
                         grad=put_units(ops, state["grad"], bi, g), sum_anchor=sum_anchor, sum_grad=sum_grad,
                         curvature=curvature)
            new_theta.update(model.constrain(unflatten(x_new, self.numeric, self._shapes)))
        state["theta"] = new_theta
        return state


def _solve_psd(ops: Any, h: Any, g: Any) -> Any:
    """``H⁺ g`` with H symmetrised and its eigenvalues made positive (|λ| floored at 1e-6 of the largest)."""
    xp = ops.xp
    w, v = ops.eigh(0.5 * (h + h.T))
    w_abs = xp.abs(w)
    w_abs = xp.where(w_abs < CURVATURE_FLOOR * xp.max(w_abs) + 1e-12, CURVATURE_FLOOR * xp.max(w_abs) + 1e-12, w_abs)
    return v @ ((v.T @ g) / w_abs)


__all__ = ["MISSO", "paper_mc_size"]
