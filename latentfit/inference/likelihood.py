"""Observed-data log-likelihood after a fit: importance sampling, linearisation, exact.

**Importance sampling** (saemix ``llis.saemix``; Kuhn & Lavielle 2005).  For every unit,

    p(y_i; θ) = ∫ p(y_i | z) p(z; θ) dz = E_q[ p(y_i | z) p(z; θ) / q_i(z) ],

with z the *unconstrained* latent (the log-Jacobian of the map to the support is part of
``log p(z; θ)``) and ``q_i`` a product of Student-t laws (``df`` = 4 as saemix's ``nu.is``)
centred at the conditional mean of ``z_i`` with the conditional sd as scale, both estimated from the
SAEM chains.  With S draws ``z^(s) = m_i + s_i ⊙ t^(s)``,

    log p̂(y_i; θ) = logsumexp_s [log p(y_i | z^(s)) + log p(z^(s)) − log q_i(z^(s))] − log S,

vectorised over units and draws (batches of ``batch_size`` draws; saemix uses 5000 draws per unit).

**Linearisation** (saemix ``fim.saemix``, FOCE-like).  At the conditional modes ẑ_i, for models
with Gaussian faces (``y_ij ~ N(f_ij(z_i), g_ij²)``, ``z_i ~ N(m_i, Ω)``), the structural model is
linearised, ``f_i(z) ≈ f_i(ẑ_i) + J_i (z − ẑ_i)`` with ``J_i = ∂f_i/∂z(ẑ_i)``, so that

    y_i ≈ N( f_i(ẑ_i) + J_i (m_i − ẑ_i),  J_i Ω J_iᵀ + diag(g_i(ẑ_i)²) ),

whose Gaussian log-density is the linearised log-likelihood (exact for linear Gaussian models).
The same moments, with ``J_i`` and ``ẑ_i`` held fixed, give the linearised Fisher information
(:mod:`latentfit.inference.fisher`).

**Adaptive Gauss–Hermite quadrature** (saemix ``llgq.saemix``; Pinheiro & Bates, JCGS 1995).  Around
the conditional mode ẑ_i with the Laplace covariance Γ_i = L_i L_iᵀ, the substitution z = ẑ_i + L_i u
and a tensor-product probabilists' Gauss–Hermite rule (nodes u_k, weights W_k, weight function
exp(−|u|²/2)) give

    log p(y_i; θ) ≈ log|L_i| + logsumexp_k [log W_k + |u_k|²/2 + log p(y_i, ẑ_i + L_i u_k; θ)],

exact when the integrand is Gaussian (linear Gaussian models) and converging fast in the number of
nodes otherwise.  It is deterministic, so it also serves as an exact reference for the maximum of the
likelihood (:func:`maximise_log_likelihood_gq`, the analogue of lme4's ``nAGQ`` fits).  The grid has
``num_nodes ** d`` points per unit: for small latent dimensions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model import LatentModel, ModelSpecificationError
from .ops import LOG_2PI, ProgramsByModel
from .units import unit_streams


@dataclass
class LogLikelihood:
    """Total log-likelihood, per-unit terms (numpy) and, for importance sampling, a Monte-Carlo SE."""

    method: str
    value: float
    per_unit: Any
    mc_se: float | None = None
    num_samples: int | None = None
    #: importance sampling: each unit's effective sample size ``(Σ_s w_s)² / Σ_s w_s²`` (numpy ``[n]``)
    ess: Any = None

    def __float__(self) -> float:
        return self.value


# ----- importance sampling --------------------------------------------------------------------------
def student_t_log_pdf(t: Any, df: float, xp: Any) -> Any:
    """Elementwise log-density of the standard Student-t law with ``df`` degrees of freedom."""
    c = math.lgamma(0.5 * (df + 1.0)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)
    return c - 0.5 * (df + 1.0) * xp.log1p(t * t / df)


def student_t_draws(ops: Any, key: Any, shape: tuple[int, ...], df: int, sim: Any = None) -> Any:
    """Standard Student-t draws with ``df`` degrees of freedom (:meth:`Ops.student_t`).

    ``sim``: per-unit streams (:class:`~latentfit.inference.ops.UnitStreamOps`, units on axis 1 of ``shape``): then
    ``t = x₀ / sqrt(Σ_{k=1}^{df} x_k² / df)`` from ``df + 1`` standard normals of each unit's stream (integer df).
    """
    if sim is None:
        return ops.student_t(key, df, shape)
    x = sim.normal(key, tuple(shape) + (int(df) + 1,))
    return x[..., 0] / ops.xp.sqrt(ops.xp.sum(x[..., 1:] * x[..., 1:], -1) / int(df))


def _unit_streams(model: LatentModel, seed: int, unit_ids: Any, ops: Any) -> tuple[Any, Any]:
    """``(per-unit streams view, root key)`` for draws keyed by ``(seed, unit id)``; ``(None, None)`` without ids."""
    if unit_ids is None:
        return None, None
    return unit_streams(model.ops if ops is None else ops, seed, unit_ids)


def log_likelihood_is(model: LatentModel, theta: dict[str, Any], cond_mean: Any, cond_sd: Any, *,
                      num_samples: int = 5000, batch_size: int = 500, df: int = 4, seed: int = 0,
                      units: Any = None, unit_ids: Any = None, ops: Any = None,
                      defensive: float = 0.5) -> LogLikelihood:
    """Importance-sampling estimate of ``Σ_i log p(y_i; θ)`` (see the module docstring).

    ``cond_mean``/``cond_sd`` are ``[n, d]`` (unconstrained latents of ``units``); ``cond_sd`` may also be ``[n, d,
    d]``, each unit's lower-triangular scale ``L_i`` (:func:`conditional_scale`): then half of each batch is drawn as
    ``z = m_i + L_i t`` (``t``'s ``d`` coordinates independent Student-t, ``q_L(z) = Π_j t(u_j) / |L_i|`` with ``u =
    L_i⁻¹(z − m_i)``) and half from the diagonal proposal of the same marginal sds, every draw weighted by the
    mixture ``½ q_L + ½ q_sd`` (a defensive mixture: never more than twice the diagonal proposal's weights; a diagonal
    ``L_i`` gives the ``[n, d]`` proposal's terms to rounding).  ``defensive``: the diagonal component's share α of
    the draws and of the mixture ``(1 − α) q_L + α q_sd`` (½ above; :func:`laplace_proposal`'s fitted ``L_i`` takes
    less, :data:`FULL_DEFENSIVE`: the weights stay below ``p / (α q_sd)`` at a Monte-Carlo variance close to
    ``q_L``'s alone, where half the draws from ``q_sd`` on a ridge of correlation −0.96 tripled the MC SE).
    The result carries each unit's effective sample size ``(Σ w)² / Σ w²`` (``ess``).  ``unit_ids`` (``[n]`` ints):
    each unit's draws from its own stream ``(seed, batch, unit id)`` (:func:`student_t_draws`), so its term does not
    depend on the other units or on the process holding it (``ops``: a distributed fit's shim).  On one stream the
    proposal's normals and uniforms are drawn in float32 (JAX: :meth:`JaxOps.with_draw_dtype`, as SAEM's MCMC draws;
    torch: :meth:`TorchOps.student_t`) and its log-density is evaluated at the draws themselves, so the estimator stays
    unbiased for their law (float32 quantises the uniforms at 2^-23, far below the Monte-Carlo error); on JAX the
    program is ~12% smaller and its draws ~3x cheaper, on torch the draws ~1.7x (N = 5000: the IS 9 -> 6.5 s).
    """
    sim, root = _unit_streams(model, seed, unit_ids, ops)
    ops = model.ops
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer (Student-t proposal), got {df!r}")
    if num_samples < 2 or batch_size < 1:
        raise ValueError(f"num_samples must be >= 2 and batch_size >= 1, got {num_samples}, {batch_size}")
    if not 0.0 < float(defensive) < 1.0:
        raise ValueError(f"defensive must be in (0, 1), got {defensive!r}")
    m = ops.asarray(cond_mean)
    s = ops.asarray(cond_sd)
    sizes = (int(num_samples), int(batch_size), int(df), float(defensive))
    if ops.jittable and sim is None and units is None:
        per_unit, mc_se, ess = _is_program(model, sizes)(theta, m, s, ops.key(seed))
    else:
        with ops.seed_context(seed):
            per_unit, mc_se, ess = _is_terms(model, sizes, theta, m, s, ops.key(seed), units, sim, root)
    per_unit_np = ops.to_numpy(per_unit)
    return LogLikelihood("is", float(per_unit_np.sum()), per_unit_np, float(ops.to_numpy(mc_se)), num_samples,
                         ops.to_numpy(ess))


def conditional_scale(draws: Any, sd: Any = None) -> np.ndarray:
    """Each unit's lower-triangular proposal scale ``L_i`` ``[n, d, d]`` from its latent draws ``[..., n, d]`` (the
    chains' kept draws): the Cholesky factor of their covariance ``S_i``, shrunk towards its diagonal as
    ``(1 − λ) S_i + λ diag(S_i)`` with ``λ = min(1, (d + 1) / K)`` for ``K`` draws (a noisy estimate, from correlated
    MCMC draws, taken no more than it supports: ``K ≤ d + 1`` gives the diagonal proposal).  ``sd`` ``[n, d]``: the
    proposal's sds (e.g. a pilot pass's), the draws then giving only the correlations."""
    z = np.asarray(draws, dtype=float)
    z = z.reshape((-1,) + z.shape[-2:])
    k, d = z.shape[0], z.shape[-1]
    dev = z - z.mean(0)
    cov = np.einsum("kni,knj->nij", dev, dev) / max(k - 1, 1)
    var = np.diagonal(cov, 0, -2, -1)
    lam = min(1.0, (d + 1) / max(k, 1))
    root = np.sqrt(np.where(var > 0, var, 1.0))
    corr = (1.0 - lam) * cov / (root[:, :, None] * root[:, None, :]) + lam * np.eye(d)
    scale = root if sd is None else np.asarray(sd, dtype=float)
    scale = np.where(scale > 1e-8, scale, 1e-8)
    try:
        chol = np.linalg.cholesky(corr)
    except np.linalg.LinAlgError:  # a correlation that rounding left not positive definite: the diagonal proposal
        chol = np.broadcast_to(np.eye(d), corr.shape).copy()
    return scale[:, :, None] * chol


def _is_terms(model: LatentModel, sizes: tuple[int, int, int, float], theta: dict[str, Any], m: Any, s: Any,
              key: Any, units: Any = None, sim: Any = None, root: Any = None) -> tuple[Any, Any, Any]:
    """Per-unit ``log p̂(y_i; θ)`` ``[n]``, the Monte-Carlo SE of their sum (an array) and each unit's effective sample
    size ``[n]`` of :func:`log_likelihood_is`; ``sizes``: ``(num_samples, batch_size, df, defensive)``."""
    num_samples, batch_size, df, defensive = sizes
    ops = model.ops
    xp = ops.xp
    scale_matrix = len(s.shape) == len(m.shape) + 1  # each unit's lower-triangular scale [n, d, d]
    # the coordinates no density reads (an obs_mask= imputation at an observed entry; latent_mask) carry the reference
    # density φ: integrated out exactly, each at z = 0 with "proposal" φ(0), the rest of q over the unit's latents
    active = model.latent_mask(units)
    if active is not None:
        m = xp.where(active, m, xp.zeros_like(m))
        log_phi0 = -0.5 * math.log(2.0 * math.pi) * xp.sum(xp.where(active, xp.zeros_like(m), xp.ones_like(m)), -1)
    if scale_matrix:
        eye = ops.asarray(np.eye(int(s.shape[-1])))
        s = s * (1.0 - eye) + xp.where(s > 1e-8, s, 1e-8) * eye  # its diagonal floored as the sds are
        if active is not None:  # their rows and columns of L_i: the identity's (the active block L_i's own)
            s = xp.where(active[..., :, None] & active[..., None, :], s, eye)
        log_s = xp.sum(xp.log(xp.diagonal(s, 0, -2, -1)), -1)
        sd = xp.sqrt(xp.sum(s * s, -1))  # the marginal sds of L Lᵀ: the defensive component's scales
        log_sd = xp.sum(xp.log(sd), -1)
    else:
        s = xp.where(s > 1e-8, s, 1e-8)
        if active is not None:
            s = xp.where(active, s, xp.ones_like(s))
        log_s = xp.sum(xp.log(s), -1)
    nb = -(-num_samples // batch_size)
    # a compiled model's face over z laid out [S, d, n] (SAEM's sweeps'): XLA:CPU vectorises along the units, where
    # over [S, n, d] its loops run along d (the theophylline IS's densities 4.0 -> 2.3 ms; equal up to rounding)
    minor = model.units_minor_density(theta) if units is None and ops.jittable else None

    def _t_sum(x: Any) -> Any:
        """``Σ_j log t_df(x_j)`` over the unit's latent coordinates."""
        lp = student_t_log_pdf(x, float(df), xp)
        return xp.sum(lp if active is None else xp.where(active, lp, xp.zeros_like(lp)), -1)

    def _proposal(t: Any) -> tuple[Any, Any]:
        """The draws ``z`` made of standard Student-t numbers ``t`` and the proposal's log-density there."""
        if active is not None:
            t = xp.where(active, t, xp.zeros_like(t))
        if not scale_matrix:
            z, log_q = m + s * t, _t_sum(t) - log_s
            return z, (log_q if active is None else log_q + log_phi0)
        # a defensive mixture (Hesterberg 1995; Veach & Guibas' balance heuristic): the first (1 − α) of the batch
        # from m + L t, the rest from m + sd ⊙ t (the diagonal proposal of the same marginal sds), each draw weighted
        # by the mixture's density (1 − α) q_L + α q_sd, so p/q ≤ p/(α q_sd): a covariance misjudged from the draws
        # (a ridge where the conditional law is wide) cannot produce the rare huge weights of a too-narrow proposal
        # L⁻¹ (z − m) is t itself on the first part and (z − m) / sd on the rest: one triangular solve, on the
        # defensive draws alone
        main = _main_draws(int(t.shape[0]), defensive)
        t_l, t_sd = t[:main], t[main:]
        dev_l, dev_sd = xp.sum(s * t_l[..., None, :], -1), sd * t_sd
        u_sd = xp.moveaxis(ops.forward_substitution(s, xp.moveaxis(dev_sd, 0, -1)), -1, 0)
        dev = xp.concatenate([dev_l, dev_sd], 0)
        log_q_l = xp.concatenate([_t_sum(t_l), _t_sum(u_sd)], 0) - log_s
        log_q_sd = xp.concatenate([_t_sum(dev_l / sd), _t_sum(t_sd)], 0) - log_sd
        log_q = xp.logaddexp(log_q_l + math.log1p(-defensive), log_q_sd + math.log(defensive))
        return m + dev, (log_q if active is None else log_q + log_phi0)

    def _log_weights(t: Any) -> Any:
        z, log_q = _proposal(t)
        if minor is not None:
            ll, lp, _ = minor[0](xp.swapaxes(z, -1, -2))
        else:
            ll, lp = model.log_densities(theta, z, units)
        lw = ll + lp - log_q
        return ops.stop_gradient(xp.where(lw == lw, lw, -xp.inf))

    log_weights = ops.jit(_log_weights)  # compiled once per batch shape on JAX (inlined inside _is_program's)
    keys = ops.split(key, nb)

    def batch(kb: Any, size: int) -> Any:
        return log_weights(_proposal_draws(ops, kb, (size,) + tuple(m.shape), int(df), sim))

    full = num_samples // batch_size
    if ops.jittable and sim is None and full > 1:  # the full batches as one loop (one copy of the model's density)
        chunks = [xp.reshape(ops.map(lambda kb: batch(kb, batch_size), keys[:full]), (full * batch_size, -1))]
        if num_samples > full * batch_size:
            chunks.append(batch(keys[full], num_samples - full * batch_size))
    else:
        chunks = [batch(keys[b] if sim is None else ops.fold_in(root, b + 1),
                        min(batch_size, num_samples - b * batch_size)) for b in range(nb)]
    lw = xp.concatenate(chunks, 0)  # [S, n]
    mx = xp.amax(lw, 0)
    w = xp.exp(lw - mx)
    mean_w = xp.mean(w, 0)
    per_unit = mx + xp.log(mean_w)
    # delta-method Monte-Carlo SE of log p̂ per unit, combined over units (independent)
    rel_var = xp.var(w, 0) / (num_samples * mean_w * mean_w)
    ess = num_samples * mean_w * mean_w / xp.mean(w * w, 0)  # (Σ w)² / Σ w²
    return per_unit, xp.sqrt(xp.sum(rel_var)), ess


def _proposal_draws(ops: Any, key: Any, shape: tuple[int, ...], df: int, sim: Any = None) -> Any:
    """Standard Student-t draws ``[*shape]`` of an IS proposal (:func:`student_t_draws`).  JAX's one global stream:
    the normals and uniforms in float32 (per-unit streams keep their own), drawn flat (the same numbers) and reshaped
    once in memory, computed once (``ops.computed_once``) so that the density and the proposal's log-density read
    them from memory: a loop producing ``[S, n, d]`` directly is vectorised along d (XLA:CPU's minor axis), scalar
    code for the hash and transforms (~3x slower), and XLA:CPU would copy the hash into each reader."""
    if sim is not None or not ops.jittable:
        return student_t_draws(ops, key, shape, df, sim)
    draw_ops = ops.with_draw_dtype(ops.fast_draw_dtype)
    flat = (int(np.prod(shape)),)
    return ops.xp.reshape(ops.computed_once(lambda k: student_t_draws(draw_ops, k, flat, df), key), shape)


def _main_draws(size: int, defensive: float) -> int:
    """How many of a batch of ``size`` draws come from the ``L_i`` component of the defensive mixture (the first
    ``round((1 − α) size)``; half of them for α = ½ as before)."""
    return size // 2 if defensive == 0.5 else int(round((1.0 - defensive) * size))


#: the compiled importance-sampling log-likelihood of each model, by sizes (:func:`_is_program`)
_IS = ProgramsByModel()


def _is_program(model: LatentModel, sizes: tuple[int, int, int, float]) -> Any:
    """:func:`_is_terms` of ``model`` (one global stream, all units) as one compiled program on JAX, ``(θ, mean, sd,
    key) -> (per-unit terms, MC SE)``, made once per model and sizes (``ops.jit``: a later process finds it in the
    on-disk store and JAX's persistent cache).  Op by op it ran some twenty small programs (key split, draws, the
    concatenation and the reductions), each lowered and read back from the cache in a fresh process.  The draws are
    the same numbers; XLA fuses the reductions' arithmetic, so the terms may move at rounding level."""
    def body(ref: Callable[[], LatentModel]) -> Callable[..., tuple[Any, Any, Any]]:
        def terms(theta: dict[str, Any], m: Any, s: Any, key: Any) -> tuple[Any, Any, Any]:
            return _is_terms(ref(), sizes, theta, m, s, key)

        return terms

    return _IS.get_program(model, sizes, body)


def importance_moments(model: LatentModel, theta: dict[str, Any], cond_mean: Any, cond_sd: Any, *,
                       num_samples: int = 2000, df: int = 4, inflate: float = 1.5, seed: int = 1,
                       batch_size: int = 500, units: Any = None, unit_ids: Any = None,
                       ops: Any = None) -> tuple[Any, Any]:
    """Self-normalised importance-sampling estimates of every unit's conditional mean and sd ``[n, d]``.

    A pilot pass of adaptive importance sampling (population Monte Carlo, Cappé, Guillin, Marin & Robert, JCGS
    2004): Student-t draws around ``cond_mean`` with scale ``inflate · cond_sd`` (rough moments, e.g. from a few
    MCMC chains), weighted by ``p(y_i, z) / q_i(z)``; the weighted moments then centre and scale the proposal of
    :func:`log_likelihood_is`, so that it fits each unit's conditional distribution whatever the chains gave.
    ``unit_ids`` (``[n]`` ints; ``ops``: a distributed fit's shim): each unit's draws from its own stream
    ``(seed, unit id)``, as :func:`log_likelihood_is`'s, so its moments do not depend on the other units.
    """
    sim, root = _unit_streams(model, seed, unit_ids, ops)
    ops = model.ops
    xp = ops.xp
    m = ops.asarray(cond_mean)
    s = inflate * ops.asarray(cond_sd)
    s = xp.where(s > 1e-8, s, 1e-8)
    with ops.seed_context(seed):
        key = ops.key(seed) if sim is None else ops.fold_in(root, 0)
        t = student_t_draws(ops, key, (int(num_samples),) + tuple(m.shape), int(df), sim)
    active = model.latent_mask(units)  # the coordinates no density reads: at 0, their φ(0) a constant of the unit's
    log_t = student_t_log_pdf(t, float(df), xp)
    z = m + s * t
    if active is not None:
        z = xp.where(active, z, xp.zeros_like(z))
        log_t = xp.where(active, log_t, xp.zeros_like(log_t))
    chunks = []
    for start in range(0, int(num_samples), int(batch_size)):  # the model evaluated batch by batch (memory)
        ll, lp = model.log_densities(theta, z[start:start + int(batch_size)], units)
        chunks.append(ops.stop_gradient(ll + lp))
    lw = xp.concatenate(chunks, 0) - xp.sum(log_t, -1)
    lw = xp.where(lw == lw, lw, -xp.inf)
    w = xp.exp(lw - xp.amax(lw, 0))
    w = (w / xp.sum(w, 0))[..., None]  # [S, n, 1]
    mean = xp.sum(w * z, 0)
    sd = xp.sqrt(xp.sum(w * (z - mean) ** 2, 0))
    return ops.to_numpy(mean), ops.to_numpy(sd)


#: :func:`laplace_proposal`: pilot draws per unit, Newton steps from the chains' means; the share of the final
#: proposal's draws from its defensive (diagonal) component (:func:`log_likelihood_is`'s ``defensive``) and its least
#: degrees of freedom on a Gaussian prior (:func:`full_proposal_df`).  Measured on the audit's IOV model (d = 4, η/κ
#: correlation −0.96, N = 100, 5000 draws, against quadrature): MC SE 0.093 with df 4 and α = 0.1, 0.066 with df 10,
#: 0.056 with df 10 and α = 0.05
FULL_PILOT_SAMPLES, FULL_NEWTON_STEPS, FULL_DEFENSIVE, FULL_MIN_DF = 1000, 15, 0.05, 10


def full_proposal_df(model: LatentModel, df: int) -> int:
    """The Student-t degrees of freedom of the fitted full proposal: at least :data:`FULL_MIN_DF` where the prior is
    Gaussian (a likelihood bounded in z leaves the conditional law the prior's Gaussian tails, which t₁₀ still
    dominates; the defensive component keeps a misjudged shape's weights bounded), else ``df``."""
    return max(int(df), FULL_MIN_DF) if model.has_gaussian_prior else int(df)


class ImportanceSamplingWarning(UserWarning):
    """Some units' importance weights are dominated by a few draws: the IS log-likelihood and its MC SE are
    unreliable there (the estimate is then typically too low)."""


def laplace_proposal(model: LatentModel, theta: dict[str, Any], z0: Any = None, *,
                     num_samples: int = FULL_PILOT_SAMPLES, df: int = 4, seed: int = 1,
                     num_steps: int = FULL_NEWTON_STEPS, units: Any = None, unit_ids: Any = None,
                     ops: Any = None, precision: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's full-covariance IS proposal ``(m_i [n, d], L_i [n, d, d])`` (``proposal="full"``).

    1. The Laplace approximation of the conditional law: ``ẑ_i`` (damped Newton from ``z0``, e.g. the chains' means)
       and ``Γ_i = P_i⁻¹`` (:func:`~latentfit.inference.laplace.conditional_modes`), whatever the chains explored:
       an IOV model's η/κ ridge (correlation ≈ −0.96) that the chains cross slowly has chain sds ~3x too small.
       ``num_steps=0``: ``z0`` are the modes already (the EBEs), and only ``Γ_i`` is computed there; with
       ``precision`` (``P_i`` at those modes, :attr:`~latentfit.inference.individual.IndividualEstimates.precision`)
       ``Γ_i = P_i⁻¹`` is not computed again (the program holds none of the model's derivatives).
    2. A pilot pass (adaptive IS, Cappé et al. 2004): ``num_samples`` draws ``ẑ_i + chol(Γ_i) t`` (``t`` independent
       Student-t ``df``), self-normalised weights ``w ∝ p(y_i, z) / q(z)``, and the weighted moments
       ``μ_i = Σ w z``, ``S_i = Σ w (z − μ_i)(z − μ_i)ᵀ``, trusted in proportion to the pilot's effective sample size
       ``E_i``: ``m_i = (1 − λ) μ_i + λ ẑ_i``, ``L_i L_iᵀ = (1 − λ) S_i + λ Γ_i`` with ``λ = min(1, (d + 1) / E_i)``
       (the Laplace law where the pilot says little, the weighted moments where the posterior is not Gaussian).
    ``unit_ids`` (``ops``: a distributed fit's shim): each unit's pilot draws from its own stream ``(seed, unit id)``.
    """
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer (Student-t proposal), got {df!r}")
    if int(num_steps) != num_steps or num_steps < 0 or (num_steps == 0 and z0 is None):
        raise ValueError(f"num_steps must be a non-negative integer (0 only with z0, the modes), got {num_steps!r}")
    if precision is not None and num_steps != 0:
        raise ValueError("precision= is the precision at z0, the modes: it needs num_steps=0")
    sim, root = _unit_streams(model, seed, unit_ids, ops)
    ops = model.ops
    if z0 is None:  # conditional_mode's start: the prior means (Gaussian prior face) or zeros
        n = model.num_units if units is None else len(units)
        z0 = model.prior_moments(theta, units)[0] if model.has_gaussian_prior else ops.zeros((n, model.latent_dim))
    sizes = (int(num_samples), int(df), int(num_steps), precision is not None)
    prec = () if precision is None else (ops.asarray(precision),)
    with ops.seed_context(seed):
        key = ops.key(seed) if sim is None else ops.fold_in(root, 0)
        if ops.jittable and sim is None and units is None:
            mean, chol = _laplace_proposal_program(model, sizes)(theta, ops.asarray(z0), key, *prec)
        else:
            mean, chol = _laplace_proposal_terms(model, sizes, theta, ops.asarray(z0), key, units, sim, *prec)
    return ops.to_numpy(mean), ops.to_numpy(chol)


def _laplace_proposal_terms(model: LatentModel, sizes: tuple[int, int, int, bool], theta: dict[str, Any], z0: Any,
                            key: Any, units: Any = None, sim: Any = None, precision: Any = None) -> tuple[Any, Any]:
    """:func:`laplace_proposal`'s ``(m_i, L_i)`` in the backend's array operations (one compiled program on JAX:
    :func:`_laplace_proposal_program`).  Factors and the positive-definiteness checks are the shim's own
    (:meth:`~latentfit.inference.ops.Ops.column_cholesky`, :meth:`~latentfit.inference.ops.Ops.positive_definite`:
    no LAPACK call), and a matrix that is not positive definite falls back, unit by unit and without a loop over
    units, to the Laplace covariance, then to the identity."""
    from .laplace import conditional_modes

    num_samples, df, num_steps = sizes[:3]
    ops = model.ops
    xp = ops.xp
    d = int(model.latent_dim)
    eye = xp.zeros_like(z0)[..., None] + ops.asarray(np.eye(d))  # [n, d, d]

    def spd_or(c: Any, fallback: Any) -> Any:
        ok = ops.positive_definite(xp.where(c == c, c, eye)) & xp.all(c == c, (-2, -1)) \
            & xp.all(xp.abs(c) < xp.inf, (-2, -1))
        return xp.where(ok[:, None, None], c, fallback)

    if precision is None:
        mode, cov = conditional_modes(model, theta, units, z0, num_steps=int(num_steps), spd=True)[:2]
    else:  # P_i at the modes z0, from the search that found them
        mode, cov = z0, ops.spd_inverse(precision)
    gamma = spd_or(0.5 * (cov + xp.swapaxes(cov, -1, -2)), eye)
    active = model.latent_mask(units)
    if active is not None:  # the coordinates no density reads: at 0 with the identity's rows (see _is_terms)
        act = xp.zeros_like(mode) > 0
        act = act | active
        mode = xp.where(act, mode, xp.zeros_like(mode))
        gamma = xp.where(act[..., :, None] & act[..., None, :], gamma, eye)
    chol = ops.column_cholesky(gamma)
    t = _proposal_draws(ops, key, (int(num_samples),) + tuple(mode.shape), int(df), sim)  # as the IS's
    if active is not None:
        t = xp.where(act, t, xp.zeros_like(t))
    z = mode + xp.sum(chol * t[..., None, :], -1)  # [S, n, d]: ẑ_i + L_i t
    log_t = xp.sum(student_t_log_pdf(t, float(df), xp), -1)
    batch = 500
    if ops.jittable and num_samples % batch == 0 and num_samples > batch:  # one copy of the model's density
        zb = xp.reshape(z, (num_samples // batch, batch) + tuple(mode.shape))
        lp = xp.reshape(ops.map(lambda zi: ops.stop_gradient(xp.add(*model.log_densities(theta, zi, units))), zb),
                        (num_samples, -1))
    else:  # the model evaluated batch by batch (memory)
        lp = xp.concatenate([ops.stop_gradient(xp.add(*model.log_densities(theta, z[i:i + batch], units)))
                             for i in range(0, num_samples, batch)], 0)
    lw = lp - log_t  # log|L| is a per-unit constant: it cancels in the normalised weights
    lw = xp.where(xp.abs(lw) < xp.inf, lw, -xp.inf)
    top = xp.amax(lw, 0)
    w = xp.exp(lw - xp.where(xp.abs(top) < xp.inf, top, xp.zeros_like(top)))
    total = xp.sum(w, 0)
    ok = total > 0
    w = xp.where(ok, w / xp.where(ok, total, xp.ones_like(total)), xp.ones_like(w) / num_samples)
    ess = xp.where(ok, 1.0 / xp.sum(w * w, 0), xp.zeros_like(total))
    mu = xp.sum(w[..., None] * z, 0)
    dev = z - mu
    cov = xp.sum(w[..., None, None] * dev[..., :, None] * dev[..., None, :], 0)
    lam = xp.minimum(xp.ones_like(ess), (d + 1) / xp.maximum(ess, xp.full_like(ess, 1e-300)))[:, None]
    mean = (1.0 - lam) * mu + lam * mode
    cov = (1.0 - lam[..., None]) * cov + lam[..., None] * gamma
    if active is not None:
        mean = xp.where(act, mean, xp.zeros_like(mean))
        cov = xp.where(act[..., :, None] & act[..., None, :], cov, eye)
    good = xp.all(xp.abs(cov) < xp.inf, (-2, -1)) & xp.all(xp.abs(mean) < xp.inf, -1)
    mean = xp.where(good[:, None], mean, mode)
    cov = spd_or(xp.where(good[:, None, None], cov, gamma), gamma)
    return mean, ops.column_cholesky(cov)


#: the compiled full-covariance IS proposal of each model, by sizes (:func:`_laplace_proposal_program`)
_LAPLACE_PROPOSAL = ProgramsByModel()


def _laplace_proposal_program(model: LatentModel, sizes: tuple[int, int, int, bool]) -> Any:
    """:func:`_laplace_proposal_terms` of ``model`` (one global stream, all units) as one compiled program on JAX,
    ``(θ, z0, key[, P]) -> (m, L)`` (``P``: the precisions at the modes ``z0`` where ``sizes[3]``), made once per
    model and sizes (``ops.jit``: a later process finds it in the on-disk store).  Op by op, its Newton search, pilot
    draws and moments lowered some forty programs in a fresh process."""
    def body(ref: Callable[[], LatentModel]) -> Callable[..., tuple[Any, Any]]:
        def terms(theta: dict[str, Any], z0: Any, key: Any, *precision: Any) -> tuple[Any, Any]:
            return _laplace_proposal_terms(ref(), sizes, theta, z0, key, None, None, *precision)

        return terms

    return _LAPLACE_PROPOSAL.get_program(model, sizes, body)


def check_effective_sample_size(res: LogLikelihood, proposal: str | None = None) -> None:
    """Warn (:class:`ImportanceSamplingWarning`) when some units' effective sample size is below
    :data:`MIN_ESS`: their weights hang on a few draws, so the log-likelihood is biased low by an unknown amount and
    the MC SE (from the same weights) understates the error."""
    if res.ess is None:
        return
    ess = np.asarray(res.ess, dtype=float)
    low = ~(ess >= MIN_ESS)
    if not low.any():
        return
    hint = ("the full-covariance proposal (proposal='full'), " if proposal == "diagonal" else "") + \
        "more num_samples, or method='gq' (a small latent dimension)"
    import warnings

    warnings.warn(f"importance sampling: {int(low.sum())} of {ess.size} units have an effective sample size below "
                  f"{MIN_ESS} (smallest {float(np.nanmin(ess)) if np.isfinite(ess).any() else float('nan'):.1f} of "
                  f"{res.num_samples} draws): their weights hang on a few draws, so the log-likelihood "
                  f"({res.value:.3f}) may be too low by more than its Monte-Carlo SE ({res.mc_se:.3g}) says; use "
                  f"{hint}", ImportanceSamplingWarning, stacklevel=3)


#: :func:`check_effective_sample_size`: the least effective sample size of a unit's importance weights
MIN_ESS = 100


# ----- linearisation --------------------------------------------------------------------------------
def require_gaussian_faces(model: LatentModel, what: str) -> None:
    if not (model.has_gaussian_obs and model.has_gaussian_prior):
        raise ModelSpecificationError(
            f"{what} needs a model with Gaussian faces: Normal observations (predict/observations, "
            f"has_gaussian_obs={model.has_gaussian_obs}) and a Gaussian prior of the latents (prior_moments, "
            f"has_gaussian_prior={model.has_gaussian_prior}); use method='is' / method='sa' instead")


def structural_jacobian(model: LatentModel, theta: dict[str, Any], z_hat: Any, units: Any = None,
                        differentiable: bool = False) -> Any:
    """``J_i = ∂f_i/∂z (ẑ_i)``: ``[n, T, d]`` (zero rows at masked observations); ``differentiable``: in θ too."""
    ops = model.ops
    xp = ops.xp
    jac = ops.batched_jacobian(lambda x: model.predict(theta, x, units)[0], differentiable)(z_hat)
    _, mask = model.observations(units)
    return xp.where(mask[..., None], jac, 0.0)


def linearised_moments(model: LatentModel, theta: dict[str, Any], z_hat: Any, jac: Any,
                       units: Any = None) -> tuple[Any, Any, Any, Any]:
    """Mean ``[n, T]`` and covariance ``[n, T, T]`` of ``y_i`` under the model linearised at ``ẑ_i``.

    Masked observations get mean 0, variance 1 and no covariance (and ``y`` is returned as 0 there),
    so that they contribute a constant; returns ``(y, mask, mean, cov)``.
    """
    xp = model.ops.xp
    f, sd = model.predict(theta, z_hat, units)
    m, omega = model.prior_moments(theta, units)
    y, mask = model.observations(units)
    mean = f + xp.einsum("ntd,nd->nt", jac, m - z_hat)
    if omega.ndim == 2:
        jo = xp.einsum("ntd,de->nte", jac, omega)
    else:
        jo = xp.einsum("ntd,nde->nte", jac, omega)
    sd = xp.where(mask, sd, 1.0)
    cov = xp.einsum("nte,nse->nts", jo, jac) + _diag_embed(model.ops, sd * sd)
    mean = xp.where(mask, mean, 0.0)
    y = xp.where(mask, y, 0.0)
    return y, mask, mean, cov


def _diag_embed(ops: Any, v: Any) -> Any:
    return v[..., :, None] * ops.asarray(np.eye(v.shape[-1]))


def gaussian_log_density(ops: Any, y: Any, mean: Any, cov: Any, mask: Any) -> Any:
    """``log N(y_i; mean_i, cov_i)`` over the observed entries only: ``[n]``.  On a backend that prefers it
    (:attr:`~latentfit.inference.ops.Ops.spd_without_lapack`, small ``T``) the Cholesky factor and the substitution
    in ``xp`` ops (no LAPACK kernel in a compiled program; the same values to rounding)."""
    xp = ops.xp
    r = (y - mean)[..., None]
    if ops.spd_without_lapack and cov.shape[-1] <= ops.MAX_SPD_WITHOUT_LAPACK:
        chol = ops.column_cholesky(cov)
        u = ops.forward_substitution(chol, r)[..., 0]  # L⁻¹ r
    else:
        chol = ops.cholesky(cov)
        u = ops.solve_triangular(chol, r, lower=True)[..., 0]
    logdet = 2.0 * xp.sum(xp.log(xp.diagonal(chol, 0, -2, -1)), -1)
    # counted in the data's dtype (torch makes ``bool * 1.0`` float32: the terms of a unit with masked entries were
    # off by ~1e-7 each)
    n_masked = xp.sum(xp.where(mask, xp.zeros_like(u), xp.ones_like(u)), -1)
    n_all = mask.shape[-1]
    # masked entries are N(0; 0, 1) terms: remove their −½ log 2π
    return -0.5 * xp.sum(u * u, -1) - 0.5 * logdet - 0.5 * n_all * LOG_2PI + 0.5 * n_masked * LOG_2PI


def log_likelihood_lin(model: LatentModel, theta: dict[str, Any], z_hat: Any, units: Any = None) -> LogLikelihood:
    """Linearised log-likelihood at the conditional modes ``z_hat [n, d]`` (saemix's ``ll.lin``)."""
    require_gaussian_faces(model, "the linearisation log-likelihood")
    ops = model.ops
    z_hat = ops.asarray(z_hat)
    if units is None and ops.jittable:
        per_unit = ops.to_numpy(_lin_program(model)(theta, z_hat))
    else:
        per_unit = ops.to_numpy(_lin_terms(model, theta, z_hat, units))
    return LogLikelihood("lin", float(per_unit.sum()), per_unit)


def _lin_terms(model: LatentModel, theta: dict[str, Any], z_hat: Any, units: Any = None) -> Any:
    """The per-unit terms of :func:`log_likelihood_lin`: ``log N(y_i; f_i + J_i (m_i − ẑ_i), J_i Ω J_iᵀ + Σ_i)``."""
    jac = structural_jacobian(model, theta, z_hat, units)
    y, mask, mean, cov = linearised_moments(model, theta, z_hat, jac, units)
    return gaussian_log_density(model.ops, y, mean, cov, mask)


#: the compiled linearised log-likelihood of each model (:func:`_lin_program`)
_LIN_LL = ProgramsByModel()


def _lin_program(model: LatentModel) -> Any:
    """:func:`_lin_terms` of ``model`` (all units) as one compiled program on JAX, ``(θ, ẑ) -> per-unit terms``,
    made once per model (``ops.jit``: a later process finds it in the on-disk store).  Op by op (the Jacobian, the
    moments, the Cholesky factors) it ran dozens of small programs, each lowered and read back from the cache in a
    fresh process: theophylline's ``log_likelihood("lin")``, saemix's default ``ll.lin``, ~0.9 s with the cache warm,
    now ~0.01 s; the values move at rounding level."""
    def body(ref: Callable[[], LatentModel]) -> Callable[[dict[str, Any], Any], Any]:
        def terms(theta: dict[str, Any], z_hat: Any) -> Any:
            return _lin_terms(ref(), theta, z_hat)

        return terms

    return _LIN_LL.get_program(model, (), body)


def log_likelihood_exact(model: LatentModel, theta: dict[str, Any], units: Any = None) -> LogLikelihood:
    """``Σ_i log p(y_i; θ)`` from the model's exact marginal (mixtures, conjugate models)."""
    if not model.has_exact_marginal:
        raise ModelSpecificationError("this model has no exact marginal likelihood (has_exact_marginal is False); "
                                      "use method='is' (importance sampling) or 'lin' (linearisation)")
    per_unit = model.ops.to_numpy(model.marginal_log_lik(theta, units))
    diagnose = getattr(model, "degenerate_error", None)
    if diagnose is not None and not np.all(np.isfinite(per_unit)):  # a compiled backend's NaN: the model says why,
        # as its eager E-step raises it (a mixture's singular covariance)
        err = diagnose(theta)
        if err is not None:
            raise err
    return LogLikelihood("exact", float(per_unit.sum()), per_unit)


# ----- adaptive Gauss–Hermite quadrature ------------------------------------------------------------
MAX_GQ_POINTS = 250_000
#: the quadrature's memory budget: values of the largest temporary of one block's density evaluation (grid points ×
#: units × :attr:`~latentfit.inference.model.LatentModel.density_values_per_unit`; the residuals' simulation budget,
#: 16 MiB of float64).  Before it the blocks held 2 M grid points × units whatever the model's width: an IOV model
#: (21 observations × 3 doses, 4 latents, N = 100, 12⁴ nodes) was OOM-killed at 10.7 GB
GQ_BLOCK_VALUES = 2 ** 21


def gauss_hermite_grid(dim: int, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Tensor-product probabilists' Gauss–Hermite rule in ``dim`` dimensions.

    Returns the points ``u [K, dim]`` (K = num_nodes**dim) and ``log W_k + |u_k|²/2 [K]``, so that
    ``∫ g(u) du ≈ Σ_k exp(log W_k + |u_k|²/2) g(u_k)`` for ``g`` close to a standard Gaussian shape.
    """
    if int(num_nodes) != num_nodes or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    num_points = int(num_nodes) ** int(dim)
    if num_points > MAX_GQ_POINTS:
        raise ModelSpecificationError(
            f"Gauss–Hermite quadrature with num_nodes={num_nodes} in d={dim} latent dimensions needs "
            f"{num_nodes}^{dim} = {num_points} points per unit (at most {MAX_GQ_POINTS}); pass fewer nodes or use "
            f"method='is' (importance sampling)")
    x, w = np.polynomial.hermite_e.hermegauss(int(num_nodes))
    idx = np.stack([g.ravel() for g in np.meshgrid(*([np.arange(int(num_nodes))] * dim), indexing="ij")], -1)
    u = x[idx].reshape(num_points, dim)
    log_w = np.log(w)[idx].reshape(num_points, dim).sum(-1) + 0.5 * (u * u).sum(-1)
    return u, log_w


def gq_log_lik_per_unit(model: LatentModel, theta: dict[str, Any], mode: Any, chol: Any, grid: tuple[Any, Any],
                        units: Any = None, max_values: int | None = None) -> Any:
    """Per-unit AGQ log-likelihood ``[n]`` on a fixed grid (``mode [n, d]``, ``chol [n, d, d]`` = chol(Γ_i)).

    Differentiable in θ (the grid is held fixed), so it can be maximised directly.  A coordinate that no density
    reads (:meth:`~latentfit.inference.model.LatentModel.latent_mask`: an ``obs_mask=`` imputation at an observed
    entry) carries the reference density ``φ`` alone: its grid is centred at 0 with the identity's row and column of
    ``L_i``, where the rule integrates it exactly (a flat direction added the log of the grid's width per such
    coordinate).

    Memory: the grid's ``K`` points go in blocks of ``k`` with ``k · n · w ≤ max_values`` (default
    :data:`GQ_BLOCK_VALUES`, ``w`` the model's ``density_values_per_unit``; at least one point), each block's
    ``logsumexp_k`` kept (``[n]``) and combined at the end, so the peak does not grow with ``K = nodes^d``; one loop
    body over the blocks (``ops.map``: a compiled program holds one copy of the density).  The last block is padded
    with points of weight 0.  The value is the unblocked sum's to rounding.
    """
    ops = model.ops
    xp = ops.xp
    u, log_w = grid
    n = int(mode.shape[0])
    active = model.latent_mask(units)
    if active is not None:
        mode = xp.where(active, mode, xp.zeros_like(mode))
        chol = xp.where(active[..., :, None] & active[..., None, :], chol, ops.asarray(np.eye(int(chol.shape[-1]))))
    budget = GQ_BLOCK_VALUES if max_values is None else int(max_values)
    width = max(1, int(getattr(model, "density_values_per_unit", 1) or 1))
    num_points = int(u.shape[0])
    chunk = max(1, min(num_points, budget // max(n * width, 1)))
    num_blocks = -(-num_points // chunk)
    pad = num_blocks * chunk - num_points
    if pad:  # points at the mode with weight 0 (log W = −inf): they add nothing to the sum
        u = xp.concatenate([u, ops.asarray(np.zeros((pad, int(u.shape[1]))))], 0)
        log_w = xp.concatenate([log_w, ops.asarray(np.full(pad, -np.inf))], 0)

    def block_lse(b: Any) -> Any:
        uk, lwk = b
        z = mode + xp.einsum("nde,ke->knd", chol, uk)
        ll, lp = model.log_densities(theta, z, units)
        t = ll + lp + lwk[:, None]
        return ops.logsumexp(xp.where(t == t, t, -xp.inf), 0)

    d = int(u.shape[1])
    if num_blocks == 1:
        lse = block_lse((u, log_w))[None]
    else:
        blocks = (xp.reshape(u, (num_blocks, chunk, d)), xp.reshape(log_w, (num_blocks, chunk)))
        lse = ops.map(block_lse, blocks) if ops.jittable else xp.stack([block_lse((blocks[0][b], blocks[1][b]))
                                                                        for b in range(num_blocks)])
    log_det = xp.sum(xp.log(xp.diagonal(chol, 0, -2, -1)), -1)
    return ops.logsumexp(lse, 0) + log_det


def _gq_grid(model: LatentModel, num_nodes: int) -> tuple[Any, Any]:
    u, log_w = gauss_hermite_grid(model.latent_dim, num_nodes)
    return model.ops.asarray(u), model.ops.asarray(log_w)


def log_likelihood_gq(model: LatentModel, theta: dict[str, Any], z0: Any = None, *, num_nodes: int = 12,
                      num_steps: int = 30, method: str = "auto", units: Any = None) -> LogLikelihood:
    """Adaptive Gauss–Hermite log-likelihood (see the module docstring; saemix's ``nnodes.gq`` = 12).

    The grid is centred at the conditional modes (batched Newton from ``z0``, e.g. the conditional means)
    and scaled by the Laplace covariances (:func:`latentfit.inference.laplace.conditional_modes`).
    """
    from .laplace import conditional_modes

    ops = model.ops
    grid = _gq_grid(model, num_nodes)  # validates num_nodes / grid size before any work
    z0 = None if z0 is None else ops.asarray(z0)
    if units is None and ops.jittable:
        per_unit = _gq_program(model, int(num_steps), method, z0 is None)(theta, grid, *(() if z0 is None else (z0,)))
    else:
        lap = conditional_modes(model, theta, units, z0, num_steps=num_steps, method=method)
        chol = ops.small_cholesky(lap.cov)
        per_unit = None
        n = int(lap.mode.shape[0])
        width = max(1, int(getattr(model, "density_values_per_unit", 1) or 1))
        if units is None and n * width > GQ_BLOCK_VALUES and getattr(model, "evaluates_unit_subsets", False):
            # blocks of units too: one grid point of all the units would pass the budget (very large N)
            step = max(1, GQ_BLOCK_VALUES // width)
            per_unit = ops.xp.concatenate([
                gq_log_lik_per_unit(model, theta, lap.mode[a:a + step], chol[a:a + step], grid,
                                    ops.asarray(np.arange(a, min(n, a + step)), dtype=None))
                for a in range(0, n, step)], 0)
        if per_unit is None:
            per_unit = gq_log_lik_per_unit(model, theta, lap.mode, chol, grid, units)
    per_unit_np = ops.to_numpy(per_unit)
    return LogLikelihood("gq", float(per_unit_np.sum()), per_unit_np, num_samples=int(num_nodes) ** model.latent_dim)


#: the compiled adaptive Gauss–Hermite log-likelihood of each model, by options (:func:`_gq_program`)
_GQ = ProgramsByModel()


def _gq_program(model: LatentModel, num_steps: int, method: str, from_prior: bool) -> Any:
    """:func:`log_likelihood_gq`'s per-unit terms (all units) as one compiled program on JAX, ``(θ, grid[, z0]) ->
    [n]``: the conditional modes and Laplace covariances, their Cholesky factors and the grid's sum, made once per
    model and options (``ops.jit``: a later process finds it in the on-disk store).  Op by op it ran dozens of small
    programs in each fresh process (theophylline's ``log_likelihood("gq")`` ~0.96 s with the cache warm); the values
    move at rounding level."""
    from .laplace import conditional_modes

    def body(ref: Callable[[], LatentModel]) -> Callable[..., Any]:
        def terms(theta: dict[str, Any], grid: tuple[Any, Any], z0: Any = None) -> Any:
            model = ref()
            # Γ_i is factored below (positive definite): inverted without LAPACK, whose first use in a process
            # imports scipy's bindings (~0.15 s)
            lap = conditional_modes(model, theta, None, z0, num_steps=num_steps, method=method, spd=True)
            return gq_log_lik_per_unit(model, theta, lap.mode, model.ops.small_cholesky(lap.cov), grid)

        return terms

    return _GQ.get_program(model, (num_steps, method, from_prior), body)


@dataclass
class LikelihoodMaximum:
    """Result of :func:`maximise_log_likelihood_gq`: θ̂ (constrained, backend arrays) and its log-likelihood."""

    theta: dict[str, Any]
    log_lik: LogLikelihood
    num_outer: int
    converged: bool

    def as_dict(self, ops: Any) -> dict[str, Any]:
        """θ̂ as numpy arrays (floats for scalars)."""
        out = {k: ops.to_numpy(v) for k, v in self.theta.items()}
        return {k: v if np.ndim(v) else float(v) for k, v in out.items()}


def maximise_log_likelihood_gq(model: LatentModel, theta0: dict[str, Any], *, num_nodes: int = 9,
                               max_outer: int = 25, newton_steps: int = 4, tol: float = 1e-6) -> LikelihoodMaximum:
    """Deterministic maximum-likelihood estimate by adaptive Gauss–Hermite quadrature.

    Alternates (i) centring the grid at the conditional modes / Laplace covariances at the current θ and
    (ii) damped Newton steps on the unconstrained free parameters with that grid held fixed
    (:func:`latentfit.inference.mstep.newton_maximize`), until the log-likelihood changes by less than
    ``tol``.  Fixed parameters stay at ``theta0``.  For small latent dimensions (``num_nodes ** d`` points
    per unit); a reference for SAEM's estimates, whose Monte-Carlo error it does not have.
    """
    from .laplace import conditional_modes
    from .mstep import flatten, newton_maximize, unflatten

    ops = model.ops
    grid = _gq_grid(model, num_nodes)
    free = [n for n, p in model.params.items() if not p.fixed]
    theta = {k: ops.asarray(v) for k, v in theta0.items()}
    fixed = {k: v for k, v in theta.items() if k not in free}
    theta_u = model.unconstrain({n: theta[n] for n in free})
    shapes = {n: tuple(theta_u[n].shape) for n in free}  # unconstrained shapes may differ (e.g. a covariance)
    x = flatten(ops, theta_u, free)

    def theta_of(v: Any) -> dict[str, Any]:
        return {**fixed, **model.constrain(unflatten(v, free, shapes))}

    def objective_on(z: Any, chol: Any):
        return lambda v: ops.xp.sum(gq_log_lik_per_unit(model, theta_of(v), z, chol, grid))

    z, previous, converged, num_outer = None, -np.inf, False, 0
    while num_outer < max_outer and not converged:
        num_outer += 1
        lap = conditional_modes(model, theta_of(x), z0=z, num_steps=30 if z is None else 10)
        z = lap.mode
        objective = objective_on(z, ops.small_cholesky(lap.cov))
        x = newton_maximize(ops, objective, x, num_steps=newton_steps)
        value = float(ops.to_numpy(objective(x)))
        converged = abs(value - previous) < tol
        previous = value
    theta = {k: ops.stop_gradient(v) for k, v in theta_of(x).items()}
    # value at the final θ on a grid re-centred there (a few Newton steps from the last modes)
    final = log_likelihood_gq(model, theta, z, num_nodes=num_nodes, num_steps=10)
    return LikelihoodMaximum(theta, final, num_outer, converged)


__all__ = ["ImportanceSamplingWarning", "LikelihoodMaximum", "LogLikelihood", "check_effective_sample_size",
           "gauss_hermite_grid", "laplace_proposal", "gaussian_log_density", "gq_log_lik_per_unit",
           "importance_moments",
           "log_likelihood_gq", "maximise_log_likelihood_gq", "linearised_moments", "log_likelihood_exact",
           "log_likelihood_is", "log_likelihood_lin", "structural_jacobian", "student_t_draws", "student_t_log_pdf"]
