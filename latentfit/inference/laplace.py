"""Batched per-unit conditional modes and Laplace covariances.

For every unit i (all at once, no loop over units) find

    ẑ_i = argmax_z  ℓ_i(z) = log p(y_i | z; θ) + log p(z; θ)

by a damped Newton method, and return the Laplace covariance ``Γ_i = P_i^{-1}`` at the mode, where
the precision ``P_i`` is

* Gauss–Newton (models with a Gaussian observation face and a Gaussian prior, ``method="gauss_newton"``):
  ``P_i = J_iᵀ diag(1/σ_ij²) J_i + Ω^{-1}``, ``J_i = ∂f_i/∂z (ẑ_i)`` (Delyon-style linearisation; the
  nlme-IMH proposal of f-SAEM, Karimi, Lavielle & Moulines, CSDA 2020, eq. for Γ_i);
* the negative Hessian ``−∇²ℓ_i(ẑ_i)`` otherwise (``method="hessian"``; floored to be positive
  definite through its eigen-decomposition).

The gradient is always exact, so the mode is the true conditional mode whichever precision
preconditions the steps.  Each Newton step ``z ← z + α P^{-1} ∇ℓ`` picks, unit by unit, the best
of a few fixed fractions α (vectorised backtracking, :func:`latentfit.inference.mstep.damped_newton_update`),
so the code has no data-dependent control flow and can run eagerly (torch) or compiled (JAX).  Used by
f-SAEM's proposal, conditional modes (EBEs) and the linearisation log-likelihood / Fisher information.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .model import LatentModel, ModelSpecificationError
from .mstep import damped_newton_update
from .ops import Ops


class LaplaceResult(NamedTuple):
    mode: Any  # [n, d] conditional modes ẑ_i
    cov: Any  # [n, d, d] Γ_i = P_i^{-1}
    precision: Any  # [n, d, d] P_i
    log_joint: Any  # [n] log p(y_i, ẑ_i; θ)
    grad_norm: Any  # [n] |∇ℓ_i(ẑ_i)| (convergence check)


# ----- batched derivatives ----------------------------------------------------------------------
def value_grad_hessian(ops: Ops, f: Callable[[Any], Any], z: Any, hessian: bool = True) -> tuple[Any, Any, Any]:
    """Per-row value ``[n]``, gradient ``[n, d]`` and Hessian ``[n, d, d]`` of ``f: [n, d] -> [n]``.

    Row i of ``f`` must depend on row i of ``z`` only (independent units); the Hessian is computed
    with ``d`` second-order passes (d is small): :meth:`Ops.value_grad_hessian`.
    """
    return ops.value_grad_hessian(f, z, hessian)


def _spd_floor(ops: Ops, p: Any, rel: float = 1e-8) -> Any:
    """Symmetrise ``p`` and floor its eigenvalues at ``rel·max|λ|`` (batched)."""
    xp = ops.xp
    p = 0.5 * (p + xp.swapaxes(p, -1, -2))
    w, v = ops.eigh(p)
    w = xp.abs(w)
    floor = rel * xp.amax(w, -1)[..., None] + 1e-12
    w = xp.where(w < floor, floor, w)
    return (v * w[..., None, :]) @ xp.swapaxes(v, -1, -2)


def _prior_precision(ops: Ops, model: LatentModel, theta: dict[str, Any], units: Any, n: int) -> Any:
    xp = ops.xp
    _, cov = model.prior_moments(theta, units)
    prec = ops.spd_inverse(cov)
    if prec.ndim == 2:
        prec = xp.broadcast_to(prec, (n,) + tuple(prec.shape))
    return prec


def batched_jacobian_fwd(ops: Ops, f: Callable[[Any], Any], z: Any) -> Any:
    """``∂f_i/∂z_i`` ``[n, m, d]`` of ``f: [n, d] -> [n, m]`` (rows independent) by ``d`` forward-mode passes.

    Cheaper than ``m`` reverse passes when there are more observations than latent coordinates.
    """
    xp = ops.xp
    d = z.shape[-1]
    cols = []
    for j in range(d):
        e = xp.zeros_like(z) + (ops.arange(d) == j) * 1.0
        cols.append(ops.jvp(f, z, e)[1])
    return xp.stack(cols, -1)


def gauss_newton_precision(model: LatentModel, theta: dict[str, Any], z: Any, units: Any = None) -> Any:
    """``J_iᵀ diag(m_ij/σ_ij²) J_i + Ω^{-1}`` at ``z [n, d]`` (``m`` the observation mask)."""
    ops = model.ops
    xp = ops.xp
    # the backend's cheaper mode: forward (d passes) on JAX, reverse (T passes) on torch
    jac = ops.batched_jacobian(lambda x: model.predict(theta, x, units)[0])(z)  # [n, T, d]
    _, sd = model.predict(theta, z, units)
    _, mask = model.observations(units)
    w = xp.where(mask, 1.0 / (sd * sd), 0.0)
    jac = xp.where(mask[..., None], jac, 0.0)
    info = xp.einsum("ntd,nt,nte->nde", jac, w, jac)
    return info + _prior_precision(ops, model, theta, units, z.shape[0])


def resolve_method(model: LatentModel, method: str) -> str:
    if method == "auto":
        return "gauss_newton" if (model.has_gaussian_obs and model.has_gaussian_prior) else "hessian"
    if method not in ("gauss_newton", "hessian"):
        raise ValueError(f"method must be 'auto', 'gauss_newton' or 'hessian', got {method!r}")
    if method == "gauss_newton" and not (model.has_gaussian_obs and model.has_gaussian_prior):
        raise ModelSpecificationError("method='gauss_newton' needs a model with Gaussian observation and prior faces "
                                      "(has_gaussian_obs, has_gaussian_prior); use method='hessian'")
    return method


def conditional_modes(model: LatentModel, theta: dict[str, Any], units: Any = None, z0: Any = None, *,
                      num_steps: int = 20, method: str = "auto", max_step: float = 10.0,
                      spd: bool = False) -> LaplaceResult:
    """Conditional modes ``ẑ_i`` and Laplace covariances ``Γ_i`` of every unit in ``units``.

    Parameters
    ----------
    model, theta : the model and the (constrained) parameters.
    units : index array or None (all units).
    z0 : starting points ``[n, d]``; default the prior means (Gaussian prior face) or zeros.
    num_steps : Newton iterations (fixed count; quadratic convergence near the mode); 0 with ``z0`` the modes already
        found (the EBEs): ``Γ_i`` at ``z0`` with no search.
    method : ``"auto"`` (Gauss–Newton when the model has Gaussian faces, else Hessian),
        ``"gauss_newton"`` or ``"hessian"``: the precision ``P_i`` used for the steps and for ``Γ_i``.
    max_step : per-unit cap on the Newton step norm.
    spd : the precisions are positive definite (a caller that factors ``Γ_i``): inverted with the shim's SPD helper
        (:meth:`~latentfit.inference.ops.Ops.spd_inverse`: no LAPACK kernel in a compiled program on JAX).

    Returns
    -------
    LaplaceResult(mode [n, d], cov [n, d, d], precision [n, d, d], log_joint [n], grad_norm [n]).
    """
    ops = model.ops
    xp = ops.xp
    method = resolve_method(model, method)
    z = conditional_mode(model, theta, units, z0, num_steps=num_steps, method=method, max_step=max_step)
    val, g, prec = ops.jit(_newton_functions(model, units, method, max_step)[1])(theta, z)
    cov = ops.spd_inverse(prec) if spd else xp.linalg.inv(prec)
    cov = 0.5 * (cov + xp.swapaxes(cov, -1, -2))
    return LaplaceResult(z, cov, prec, val, xp.sqrt(xp.sum(g * g, -1)))


def conditional_mode(model: LatentModel, theta: dict[str, Any], units: Any = None, z0: Any = None, *,
                     num_steps: int = 20, method: str = "auto", max_step: float = 10.0,
                     also: Callable[..., Any] | None = None, also_args: tuple[Any, ...] = (),
                     with_precision: bool = False) -> Any:
    """The conditional modes ``ẑ_i`` ``[n, d]`` of :func:`conditional_modes` alone (``num_steps`` damped Newton steps
    from ``z0``).  On JAX the whole search is one compiled program (``ops.jit`` over a ``fori_loop`` of the steps: in
    a fresh process one program read from the on-disk store and the persistent cache); torch runs the steps in
    turn; ``num_steps=0`` returns ``z0`` itself (the modes already found), with no program.  ``also``: a function
    ``also(θ, modes, *also_args)`` computed in the same program, returned as ``(modes,
    also(...))`` (one program to key, load and call instead of two).  ``with_precision``: ``(modes, P)`` in place of
    the modes, ``P_i`` ``[n, d, d]`` the precision at the modes (Laplace's ``Γ_i = P_i⁻¹``); on JAX the loop's
    ``num_steps + 1``-th evaluation, its step not taken, so the program holds one copy of the precision's code (a
    later program reading ``Γ_i`` needs none: :func:`~latentfit.inference.likelihood.laplace_proposal`)."""
    ops = model.ops
    method = resolve_method(model, method)
    n = model.num_units if units is None else len(units)
    if z0 is None:
        if model.has_gaussian_prior:
            z0, _ = model.prior_moments(theta, units)
        else:
            z0 = ops.zeros((n, model.latent_dim))
    if int(num_steps) == 0 and also is None and not with_precision:  # z0 already the modes (e.g. the EBEs): no
        # search, no program
        return ops.stop_gradient(z0)
    newton_step, evaluate, advance = _newton_functions(model, units, method, max_step)
    xp = ops.xp

    def search(theta: dict[str, Any], z: Any, *args: Any) -> Any:
        if with_precision and ops.jittable:  # evaluate num_steps + 1 times, the last step not taken
            def body(i: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                val, g, prec = evaluate(theta, carry[0])
                return xp.where(i < int(num_steps), advance(theta, carry[0], val, g, prec), carry[0]), prec

            d = int(z.shape[-1])
            modes = ops.fori_loop(0, int(num_steps) + 1, body, (z, xp.zeros_like(z)[..., None] + xp.zeros_like(z)[
                ..., None, :d]))
        else:
            modes = ops.fori_loop(0, int(num_steps), lambda _, y: newton_step(theta, y), z)
            if with_precision:
                modes = modes, evaluate(theta, modes)[2]
        return modes if also is None else (modes, also(theta, modes[0] if with_precision else modes, *args))

    return ops.jit(search)(theta, ops.stop_gradient(z0), *also_args)


def _newton_functions(model: LatentModel, units: Any, method: str,
                      max_step: float) -> tuple[Callable, Callable, Callable]:
    """``(newton_step(θ, z) -> z', evaluate(θ, z) -> (value, gradient, precision), advance(θ, z, value, gradient,
    precision) -> z')`` of the conditional modes' damped Newton search (``method`` resolved): a step is ``evaluate``
    then ``advance``."""
    ops = model.ops
    xp = ops.xp

    def objective(theta: dict[str, Any], x: Any) -> Any:
        ll, lp = model.log_densities(theta, x, units)
        return ll + lp

    def evaluate(theta: dict[str, Any], x: Any) -> tuple[Any, Any, Any]:
        v, g, h = value_grad_hessian(ops, lambda y: objective(theta, y), x, hessian=method == "hessian")
        if method == "hessian":
            prec = _spd_floor(ops, -h)
        else:
            prec = gauss_newton_precision(model, theta, x, units)
        return v, g, prec

    def advance(theta: dict[str, Any], z: Any, val: Any, g: Any, prec: Any) -> Any:
        step = ops.spd_solve(prec, g[..., None])[..., 0]
        return ops.stop_gradient(damped_newton_update(ops, lambda y: objective(theta, y), z,
                                                      xp.where(val == val, val, -xp.inf), step, max_step))

    def newton_step(theta: dict[str, Any], z: Any) -> Any:
        return advance(theta, z, *evaluate(theta, z))

    return newton_step, evaluate, advance


def small_cholesky(ops: Ops, a: Any, max_unrolled: int = 8) -> Any:
    """Lower Cholesky factor of small SPD matrices ``[..., d, d]`` (:meth:`Ops.small_cholesky`)."""
    return ops.small_cholesky(a, max_unrolled)


def mvn_sample(ops: Ops, key: Any, mean: Any, cov: Any, num_samples: int) -> tuple[Any, Any]:
    """Draws ``[S, n, d]`` from ``N(mean_i, cov_i)`` and their log-densities ``[S, n]``."""
    xp = ops.xp
    chol = ops.small_cholesky(cov)
    eps = ops.normal(key, (num_samples,) + tuple(mean.shape))
    z = mean + xp.einsum("nde,sne->snd", chol, eps)
    return z, ops.mvn_log_prob(z, mean, chol)


def mvn_log_prob(ops: Ops, z: Any, mean: Any, chol: Any) -> Any:
    """``log N(z; mean_i, L_i L_iᵀ)`` for ``z [..., n, d]``, ``chol [n, d, d]`` (:meth:`Ops.mvn_log_prob`)."""
    return ops.mvn_log_prob(z, mean, chol)


__all__ = ["LaplaceResult", "batched_jacobian_fwd", "conditional_modes", "gauss_newton_precision", "mvn_log_prob",
           "mvn_sample", "small_cholesky", "value_grad_hessian"]
