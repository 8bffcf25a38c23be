"""The NLME's exponential-family face: saemix's statistics and closed-form M-step.

With ``φ_i = X_i β + η_i``, ``η_i ~ N(0, Ω)`` the complete-data statistics are ``φ_i φ_iᵀ``, ``X_iᵀ ⊗ φ_i`` and the
residual sum of squares; :func:`m_step` solves β by GLS with the current Ω, then Ω and the residual parameter in
closed form (:func:`m_step_simple` when Ω is diagonal and no parameter with a random effect has a covariate: the GLS
decouples into means).  Parameters without a closed form (fixed effects without random effect, the combined error)
take SAEM's numerical step, with the cheap objective of :func:`numeric_objective`.  Functions of the model
(:class:`~latentfit.models.nlme.NLME` offers them as methods, the engines' contract).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import occasions as _occ
from . import responses as _resp

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import NLME

#: floor of a random-effect variance in the M-step; below COLLAPSED_OMEGA2 a fit warns
OMEGA2_FLOOR = 1e-12
COLLAPSED_OMEGA2 = 1e-6


def stats(model: NLME, theta: dict[str, Any], z: Any, units: Any = None, cache: Any = None) -> dict[str, Any]:
    """Per-unit sufficient statistics of the complete data: ``φ_i`` and ``φ_i²`` (diagonal Ω, no covariate) or
    ``φ_i φ_iᵀ`` and ``X_iᵀ ⊗ φ_i``; the residual sum of squares when the residual parameter has a closed form
    (``cache``: the sums of squares of ``z`` kept by the MCMC sweep, :meth:`NLME.cached_density`, the same numbers);
    the occasions' and responses' statistics."""
    z_all, iov_stats = z, {}
    if model._iov is not None:
        z, kappa = _occ.split(z, model._iov)
        iov_stats = _occ.stats(kappa, model._iov, units, model.ops)
    if model._simple:
        out = {"phi": z, "phi2": z * z}
    else:
        out = {
            "phiphi": z[..., :, None] * z[..., None, :],
            "Xphi": model._take(model._xr, units)[:, :, None, :] * z[..., :, None, :, None],  # X_i[j, p] φ_ik
        }
    if model.params.get("a") is not None and model.params["a"].closed_form or \
            model.params.get("b") is not None and model.params["b"].closed_form:
        out["rss"] = cache if cache is not None else _rss(model, theta, z_all, units)
    if model._resp is not None and any(p.closed_form for p in model.params.values() if p.meta.get("response")):
        out.update(_resp.stats(model, theta, model.structural_prediction(theta, z_all, units), units))
    out.update(iov_stats)
    return out


def _rss(model: NLME, theta: dict[str, Any], z: Any, units: Any) -> Any:
    """Per-unit residual sum of squares ``[..., n]`` on the scale of the closed-form residual parameter."""
    xp = model.ops.xp

    def rss(block: Any) -> Any:  # z -> RSS of a block of the units (model._unitwise)
        mu, mask = model._mu(theta, block), model._take(model._uncens_mask, block)
        y = model._take(model._ylog if model.error == "exponential" else model._y, block)

        def of(zb: Any) -> Any:
            f = model.structural_prediction(theta, zb, block, mu=mu)
            if model.error == "exponential":
                res = y - xp.log(f)
            elif model.error == "proportional":
                res = (y - f) / f
            else:
                res = y - f
            return xp.sum(xp.where(mask, res * res, 0.0), -1)

        return of

    return model._unitwise(rss, units)(z)


def m_step(model: NLME, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
    """β by GLS with the current Ω, then Ω and the residual parameter in closed form (saemix); with IOV
    also the occasion variances γ² (:func:`~latentfit.models.nlme.occasions.m_step`)."""
    out = m_step_eta(model, s, theta, num_units)
    if model._iov is not None:
        out.update(_occ.m_step(s, model._iov, num_units, model.num_units, model.ops.xp))
    if model._resp is not None:
        out.update(_resp.m_step(s, model, num_units))
    return out


def m_step_eta(model: NLME, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
    """β by generalised least squares with the current Ω (fixed population values held),
    ``Ω = (1/N) Σ (φ_i − X_iβ)(φ_i − X_iβ)ᵀ`` masked to its blocks (diagonal floored at :data:`OMEGA2_FLOOR`), and
    the constant / proportional / exponential residual parameter ``sqrt(RSS / n_obs)``."""
    xp = model.ops.xp
    if model._simple:
        return m_step_simple(model, s, theta, num_units)
    omega = model.omega_matrix(theta)
    prec = xp.linalg.inv(omega)
    d, pr = model.latent_dim, len(model.cols_r)
    a_mat = xp.reshape(xp.reshape(prec, (1, d * d)) @ xp.reshape(model._xtx, (d * d, pr * pr)), (pr, pr))
    b_vec = xp.reshape(xp.reshape(prec, (1, d * d)) @ xp.reshape(s["Xphi"], (d * d, pr)), (pr,))
    beta_all = model._beta(theta)[model._cols_r_sel]
    beta_c = model._sel_fixed.T @ beta_all
    a_ff = model._sel_free.T @ a_mat @ model._sel_free
    rhs = model._sel_free.T @ (b_vec - a_mat @ model._sel_fixed @ beta_c)
    beta_f = xp.linalg.solve(a_ff, rhs[:, None])[:, 0]
    beta = model._sel_free @ beta_f + model._sel_fixed @ beta_c
    cross = (s["Xphi"] @ beta).T  # [j, k] = Σ_i φ_ij (X_i β)_k
    quad = (model._xtx @ beta) @ beta  # Σ_i (X_i β)(X_i β)ᵀ
    om = (s["phiphi"] - cross - cross.T + quad) / num_units
    om = 0.5 * (om + om.T) * model._block_mask
    # rounding can push a collapsing variance to ≤ 0: floor the diagonal (saemix's cutoff)
    diag = xp.diagonal(om, 0, -2, -1)
    om = om + model.ops.asarray(np.eye(d)) * (xp.clip(diag, OMEGA2_FLOOR) - diag)
    out: dict[str, Any] = {}
    for i, k in enumerate(model.cols_r):
        e = model.effects[k]
        if e.is_pop and model.spec[e.name].fixed:
            continue
        out[e.name] = model.params[e.name].to_constrained(beta[i])
    if model.diagonal_omega:
        for i, nm in enumerate(model.random_names):
            out[f"omega2_{nm}"] = om[i, i]
    else:
        out["Omega"] = om
    if "rss" in s:
        name = "b" if model.error == "proportional" else "a"
        out[name] = xp.sqrt(s["rss"] / model.num_obs)
    return out


def m_step_simple(model: NLME, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
    """Diagonal Ω, no covariate: ``β_j = S1_j / N``, ``ω²_j = S2_j / N − β_j²`` (the GLS decouples)."""
    xp = model.ops.xp
    beta_old = model._beta(theta)[model._r_sel]
    beta = xp.where(model._fixed_r_mask, beta_old, s["phi"] / num_units)
    om = xp.clip((s["phi2"] - 2.0 * beta * s["phi"]) / num_units + beta * beta, OMEGA2_FLOOR)
    out: dict[str, Any] = {}
    for i, nm in enumerate(model.random_names):
        if not model.spec[nm].fixed:
            out[nm] = model.params[nm].to_constrained(beta[i])
        out[f"omega2_{nm}"] = om[i]
    if "rss" in s:
        out["b" if model.error == "proportional" else "a"] = xp.sqrt(s["rss"] / model.num_obs)
    return out


def fit_warnings(model: NLME, theta: dict[str, Any]) -> list[str]:
    """A random-effect variance that fell to ~0 (SAEM with few chains can absorb a weakly identified variance
    at zero, where EM's map is stationary)."""
    to_numpy = model.ops.to_numpy  # the diagonal read on the host: no small device programs after the fit
    var = ([float(to_numpy(theta[f"omega2_{nm}"])) for nm in model.random_names] if model.diagonal_omega
           else np.diag(to_numpy(theta["Omega"])))
    collapsed = [f"{nm} (ω²={var[i]:.2g})" for i, nm in enumerate(model.random_names) if var[i] < COLLAPSED_OMEGA2]
    if not collapsed:
        return []
    return [f"the variance of the random effect on {', '.join(collapsed)} collapsed to ~0: the data barely "
            f"identify it, and SAEM's Monte-Carlo noise with few chains can drive such a variance to zero; rerun "
            f"with more chains (num_chains=...), a larger initial variance, or without that random effect"]


def numeric_objective(model: NLME, theta: dict[str, Any], z: Any, names: list[str]) -> Callable[[dict], Any] | None:
    """Cheap objective for SAEM's numerical step (hook read by the engine).

    Over residual-error parameters only, the structural predictions are computed once and only the
    observation terms are re-evaluated; otherwise the prior (constant in parameters without random
    effect) is left out.
    """
    xp = model.ops.xp
    if model.outcome is None and set(names) <= {n for n, p in model.params.items() if p.meta.get("role") == "error"}:
        f = model.ops.stop_gradient(model.structural_prediction(theta, z))
        return lambda th: xp.mean(xp.sum(model._obs_terms(th, f, None), (-2, -1)))
    if not any(n in model.closed_form_params or n.startswith("omega2") or n == "Omega" for n in names):
        return lambda th: xp.mean(xp.sum(model.log_lik(th, z), -1))
    return None


__all__ = ["COLLAPSED_OMEGA2", "OMEGA2_FLOOR", "fit_warnings", "m_step", "m_step_eta", "m_step_simple",
           "numeric_objective", "stats"]
