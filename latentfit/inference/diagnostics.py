"""Residual diagnostics and visual predictive checks (pure array code on model predictions).

For a model with a Gaussian observation face (``y_ij ~ N(f_ij(z_i), g_ij²)``):

* ``PRED``  population prediction ``f(m_i)`` at the prior mean of the latents (saemix ``ppred``);
* ``IPRED`` individual prediction ``f(ẑ_i)`` at the conditional mode (saemix ``ipred``);
* ``IWRES`` individual weighted residual ``(y − IPRED) / g(ẑ_i)``;
* ``PWRES`` population weighted residual ``V_i^{-1/2}(y_i − E[y_i])`` with the mean and covariance of
  ``y_i`` under the model estimated from K simulated data sets (Cholesky decorrelation);
* ``NPDE``  normalised prediction distribution errors (Brendel et al. 2006, Comets et al. 2008):
  observations and simulations are decorrelated with the same ``V_i^{-1/2}``, ``pde_ij`` is the
  fraction of decorrelated simulations below the decorrelated observation (clipped to
  ``[1/(2K), 1 − 1/(2K)]``), ``npde = Φ⁻¹(pde)``; under the model they are i.i.d. N(0, 1);
* VPC: quantiles of the observations per bin of the independent variable against prediction
  intervals of the same quantiles over simulated replicates of the data set.

Simulations draw ``z ~ p(z; θ̂)`` with ``model.sample_prior`` and ``y = f(z) + g(z) ε``.
Masked (padding) observations come back as NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from .model import LatentModel, ModelSpecificationError
from .ops import ProgramsByModel
from .units import max_over_processes, prior_draws_on_streams

#: the compiled simulations and predictions of each model (:func:`model_program`)
_PROGRAMS = ProgramsByModel()


def _simulate(model: LatentModel, theta: dict[str, Any], key: Any, num_sims: int) -> Any:
    """``[K, N, T]`` observations ``y = f(z) + g(z) ε`` of ``z ~ p(z; θ)`` from one key (backend array)."""
    ops = model.ops
    k1, k2 = ops.split(key)
    z = model.sample_prior(theta, k1, num_sims)
    mean, sd = model.predict(theta, z)
    return mean + sd * ops.normal(k2, tuple(mean.shape))


def _predict(model: LatentModel, theta: dict[str, Any], z: Any) -> tuple[Any, Any]:
    """``model.predict``: mean and sd of the observations at the latents ``z``."""
    return model.predict(theta, z)


def _population_predict(model: LatentModel, theta: dict[str, Any]) -> tuple[Any, Any]:
    """``model.predict`` at the latents' prior means (PRED and its sd)."""
    return model.predict(theta, model.prior_moments(theta)[0])


def _population_structural(model: Any, theta: dict[str, Any]) -> Any:
    """An NLME model's structural prediction at the latents' prior means (PRED on the data's scale)."""
    return model.structural_prediction(theta, model.prior_moments(theta)[0])


def model_program(model: LatentModel, body: Any, *static: Any) -> Any:
    """``body(model, *args, *static)`` (a module-level function: :func:`_simulate` ``(θ, key)``, :func:`_predict`
    ``(θ, z)``, :func:`_population_predict` and :func:`_population_structural` ``(θ)``, or a plot's; ``static``:
    trailing Python arguments, e.g. the number of simulations) as one compiled program on JAX, made once per model
    (``ops.jit``: a later process reads it from the on-disk store); the same operations, op by op, on torch.  Op by
    op on JAX each operation was a program to lower and read back from the cache in every fresh process
    (theophylline's residuals ~0.6 s, its VPC ~0.4 s with the cache warm)."""

    def make(ref: Any) -> Any:
        return lambda *args: body(ref(), *args, *static)

    return _PROGRAMS.get_program(model, (body, static), make)


@dataclass
class Residuals:
    """``[N, T]`` arrays (NaN at masked entries)."""

    y: np.ndarray
    mask: np.ndarray
    pred: np.ndarray
    ipred: np.ndarray
    iwres: np.ndarray
    epred: np.ndarray
    pwres: np.ndarray
    npde: np.ndarray

    #: set after the fit (``FitResult.residuals``): the units' labels (an NLME's IDs: a pandas Index named as the ID
    #: column) and the observations' x-values with their name (an NLME's time), columns of :meth:`to_frame`
    units: Any = field(default=None, init=False, repr=False, compare=False)
    x: Any = field(default=None, init=False, repr=False, compare=False)
    x_name: str = field(default="x", init=False, repr=False, compare=False)
    #: per-observation label columns (``[N, T]`` arrays by name, after the x-value in :meth:`to_frame`): a model with
    #: several responses, its response column (``DVID``/``YTYPE``)
    labels: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def to_frame(self, x: np.ndarray | None = None):
        """Long pandas table of the observed entries: the unit's label (an NLME's ID column), unit, obs index, the
        x-value (``x``, else the fit's: an NLME's TIME), the label columns (a joint model's response column, e.g.
        DVID), DV, PRED, IPRED, residuals."""
        import pandas as pd

        unit, obs = np.nonzero(self.mask)
        cols: dict[str, Any] = {}
        if self.units is not None and self.units.name not in (None, "unit", "obs"):
            cols[self.units.name] = np.asarray(self.units, dtype=object)[unit]
        cols.update({"unit": unit, "obs": obs})
        if x is not None:
            cols["x"] = np.asarray(x)[unit, obs]
        elif self.x is not None:
            cols[self.x_name] = np.asarray(self.x)[unit, obs]
        for name, values in self.labels.items():
            cols[name] = np.asarray(values)[unit, obs]
        for name in ("y", "pred", "ipred", "iwres", "epred", "pwres", "npde"):
            cols[name.upper() if name != "y" else "DV"] = getattr(self, name)[unit, obs]
        return pd.DataFrame(cols)


def _require_obs(model: LatentModel) -> None:
    """Refuse residuals, goodness-of-fit plots and simulated observations of a model without Gaussian observations."""
    if model.has_gaussian_obs:
        return
    outcome = getattr(model, "outcome", None)  # an NLME outcome model (binary, count, time-to-event, ...)
    if outcome is not None:
        raise ModelSpecificationError(
            "goodness-of-fit and residual plots are for continuous data with a residual error model; this model's "
            f"outcome is {outcome.name} (outcome={outcome!r}): use fit.plot_vpc()")
    raise ModelSpecificationError(
        "residuals, goodness-of-fit plots and VPCs need Gaussian observations (a Normal likelihood of the observed "
        "sites), which this model does not have")


def simulate_observations(model: LatentModel, theta: dict[str, Any], num_sims: int, seed: int = 0, *,
                          unit_ids: Any = None, ops: Any = None) -> np.ndarray:
    """``K`` replicated data sets ``[K, N, T]`` from ``z ~ p(z; θ)``, ``y ~ N(f(z), g(z)²)``.

    ``unit_ids`` (``[N]`` distinct ints): per-unit streams — unit i's simulations come from the counter-based stream
    ``(seed, unit_ids[i])`` only, whatever the other units or the process holding the unit (Gaussian latents,
    ``model.prior_transform``; ``ops``: a distributed fit's shim, whose processes agree on the observations' width).
    """
    _require_obs(model)
    if unit_ids is not None:
        return _simulate_per_unit(model, theta, int(num_sims), seed, unit_ids, model.ops if ops is None else ops)
    ops = model.ops
    with ops.seed_context(seed):
        y = model_program(model, _simulate, int(num_sims))(theta, ops.key(seed))
    return ops.to_numpy(y)


def simulation_chunks(model: LatentModel, theta: dict[str, Any], num_sims: int, seed: int = 0,
                      max_values: int | None = None) -> Any:
    """:func:`simulate_observations`' ``num_sims`` replicated data sets (one stream), as arrays ``[K_c, N, T]`` of at
    most ``max_values`` values (:data:`RESIDUAL_SIMULATION_BLOCK_VALUES`; at least one replicate each): all at once,
    the same values, when they fit; else each chunk of replicates from the next key of the seed's stream."""
    _require_obs(model)
    ops, k = model.ops, int(num_sims)
    width = int(model.observations()[0].shape[-1])
    per_chunk = max(1, int(RESIDUAL_SIMULATION_BLOCK_VALUES if max_values is None else max_values)
                    // max(model.num_units * width, 1))
    if per_chunk >= k:
        yield simulate_observations(model, theta, k, seed)
        return
    with ops.seed_context(seed):
        key = ops.key(seed)
        for a in range(0, k, per_chunk):
            chunk_key, key = ops.split(key)
            yield ops.to_numpy(model_program(model, _simulate, min(per_chunk, k - a))(theta, chunk_key))


def _simulate_per_unit(model: LatentModel, theta: dict[str, Any], num_sims: int, seed: int, unit_ids: Any,
                       ops: Any) -> np.ndarray:
    """:func:`simulate_observations` on per-unit streams: ``z_i = μ_i + L ε_i`` and the observation noise from unit
    i's stream (drawn at the width of every process's observations, so a unit's draws do not depend on its shard)."""
    sim, root, z = prior_draws_on_streams(model, theta, num_sims, seed, unit_ids, ops)
    mean, sd = model.predict(theta, z)
    width = max_over_processes(ops, int(mean.shape[-1]))
    noise = sim.normal(ops.fold_in(root, 2), (num_sims, model.num_units, width))[..., :int(mean.shape[-1])]
    return ops.to_numpy(mean + sd * noise)


def _simulate_on_streams(model: LatentModel, theta: dict[str, Any], root: Any, ids: Any, units: Any,
                         num_sims: int) -> Any:
    """:func:`_simulate_per_unit`'s simulations ``[K, b, T]`` of the units ``units`` (row indices) alone, unit i's
    from its stream ``(seed, ids[i])`` (``root``: the streams' root key): the same values as those units' rows of
    all units' simulations."""
    ops = model.ops
    sim = ops.per_unit_streams(ids)
    eps = sim.normal(ops.fold_in(root, 1), (num_sims, int(ids.shape[0]), model.latent_dim))
    mean, sd = model.predict(theta, model.prior_transform(theta, eps, units), units)
    return mean + sd * sim.normal(ops.fold_in(root, 2), (num_sims, int(ids.shape[0]), int(mean.shape[-1])))


def _simulate_units(model: LatentModel, theta: dict[str, Any], key: Any, units: Any, num_sims: int) -> Any:
    """:func:`_simulate` of the units ``units`` (row indices) alone, from ``key``."""
    ops = model.ops
    k1, k2 = ops.split(key)
    mean, sd = model.predict(theta, model.sample_prior(theta, k1, num_sims, units), units)
    return mean + sd * ops.normal(k2, tuple(mean.shape))


def _simulates_in_blocks(model: LatentModel, num_values: int) -> bool:
    """Whether :func:`residuals` simulates ``num_values`` values in blocks of units (more than
    :data:`RESIDUAL_SIMULATION_BLOCK_VALUES`, and a model that evaluates a subset of units alone)."""
    return num_values > RESIDUAL_SIMULATION_BLOCK_VALUES and bool(getattr(model, "evaluates_unit_subsets", False))


def _inv_norm_cdf(p: np.ndarray) -> np.ndarray:
    return np.vectorize(NormalDist().inv_cdf, otypes=[float])(p)


def _psd_cholesky(cov: np.ndarray) -> np.ndarray:
    """Cholesky factors of symmetric positive semi-definite ``cov [N, T, T]``.

    A simulated covariance is PSD in exact arithmetic but can be singular to rounding (an observation
    that is a near-exact function of others): a unit whose factorisation fails is retried with a diagonal
    jitter of 1e-12, 1e-10, … relative to its largest variance; the other units are untouched.
    """
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        pass
    eye = np.eye(cov.shape[-1])
    out = np.empty_like(cov)
    for i, c in enumerate(cov):
        scale = max(float(np.abs(np.diagonal(c)).max()), np.finfo(float).tiny)
        for rel in (0.0, 1e-12, 1e-10, 1e-8, 1e-6):
            try:
                out[i] = np.linalg.cholesky(c + rel * scale * eye)
                break
            except np.linalg.LinAlgError:
                continue
        else:
            raise np.linalg.LinAlgError(f"the simulated covariance of unit {i} is not positive semi-definite")
    return out


def _lower_factor(cov: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``L_i`` ``[N, T, T]``, ``L_i L_iᵀ = V_i`` restricted to the observed entries (identity rows and columns at the
    others)."""
    eye = np.eye(cov.shape[-1])
    both = mask[:, :, None] & mask[:, None, :]
    return _psd_cholesky(np.where(both, cov, eye))


def _forward_solve(chol: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``L_i⁻¹ r_i`` for lower-triangular ``chol [N, T, T]`` and ``r [N, T, B]``: forward substitution, one row of
    every unit's system at a time (T steps, each a batched product over the units and the B right-hand sides).  The
    same backward-stable solve as LAPACK's per unit, without its per-unit copies (``np.linalg.solve`` of ``[N, T, K]``
    right-hand sides took ~4.8 s at N = 5000, K = 1000); an explicit ``L_i⁻¹`` loses digits on an ill-conditioned
    ``V_i``."""
    x = np.empty(np.broadcast_shapes(chol.shape[:-1], r.shape[:-2] + r.shape[-2:-1]) + r.shape[-1:])
    for t in range(chol.shape[-1]):
        acc = r[..., t, :]
        if t:
            acc = acc - np.matmul(chol[..., t:t + 1, :t], x[..., :t, :])[..., 0, :]
        x[..., t, :] = acc / chol[..., t, t, None]
    return x


def decorrelate(resid: np.ndarray, cov: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``L_i⁻¹ r_i`` with ``L_i L_iᵀ = V_i`` restricted to the observed entries (``resid [..., N, T]``)."""
    r = np.where(mask, resid, 0.0)
    lead = r.shape[:-2]
    rr = np.moveaxis(r.reshape((-1,) + r.shape[-2:]), 0, -1)  # [N, T, B]
    out = _forward_solve(_lower_factor(cov, mask), rr)
    return np.moveaxis(out, -1, 0).reshape(lead + r.shape[-2:])


#: simulated values (replicates × units × observations) whitened at once by :func:`residuals`: the units go in blocks
#: of about this many (a few arrays of 8 bytes each), whatever the population (N = 5000, K = 1000: 400 MB at once)
RESIDUAL_BLOCK_VALUES = 2 ** 18
#: simulated values (replicates × units × observations) from which :func:`residuals` simulates in blocks of units of
#: about this many (models that evaluate a subset of units alone, ``LatentModel.evaluates_unit_subsets``): the
#: simulations of N = 5000 x 10 with K = 1000 at once took 1.6 GB at their peak, and grew with N
RESIDUAL_SIMULATION_BLOCK_VALUES = 2 ** 21


def _pwres_and_pde(y: np.ndarray, sims: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(EPRED, PWRES, pde)`` ``[N, T]`` of observations ``y`` against simulations ``sims [K, N, T]``: the mean and
    covariance ``V_i`` of unit i's K simulations (unbiased), then observations and simulations whitened by the same
    ``L_i⁻¹`` (:func:`_forward_solve`) and ``pde`` the fraction of whitened simulations below the whitened observation.
    Each unit's values depend on its own simulations only, so the units go in blocks (:data:`RESIDUAL_BLOCK_VALUES`),
    each a few batched products over ``[B, T, K]`` arrays."""
    k, n, t = sims.shape
    epred, pwres, pde = (np.zeros((n, t)) for _ in range(3))
    step = max(1, RESIDUAL_BLOCK_VALUES // max(k * t, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        m = mask[a:b]
        s = np.ascontiguousarray(np.moveaxis(sims[:, a:b], 0, -1))  # [B, T, K]
        mean = s.mean(-1)
        c = np.where(m[..., None], s - mean[..., None], 0.0)  # centred; unobserved entries 0
        cov = np.matmul(c, np.swapaxes(c, -1, -2)) / max(k - 1, 1)  # [B, T, T]
        chol = _lower_factor(cov, m)
        y_dec = _forward_solve(chol, np.where(m, y[a:b] - mean, 0.0)[..., None])[..., 0]
        epred[a:b], pwres[a:b] = mean, y_dec
        pde[a:b] = (_forward_solve(chol, c) < y_dec[..., None]).mean(-1)
    return epred, pwres, pde


def residuals(model: LatentModel, theta: dict[str, Any], z_mode: Any, num_sims: int = 1000,
              seed: int = 0, *, unit_ids: Any = None, ops: Any = None) -> Residuals:
    """PRED, IPRED, IWRES, EPRED (simulated mean), PWRES and NPDE of every observation.

    ``unit_ids`` / ``ops``: simulations on per-unit streams (:func:`simulate_observations`); every residual is a
    function of its unit's data and simulations, so a distributed fit's processes compute their units'.
    """
    _require_obs(model)
    dist_ops = ops
    ops = model.ops
    y, mask = (ops.to_numpy(a) for a in model.observations())
    mask = mask.astype(bool)
    most = int(mask.sum(-1).max()) if mask.size else 0
    most = max_over_processes(dist_ops, most)  # every process decides alike (none waits for one that raised)
    if int(num_sims) <= most:
        # the simulated covariance of a unit has rank ≤ num_sims − 1: singular, nothing to decorrelate with
        raise ValueError(f"num_sims={num_sims} must exceed the number of observations of every unit ({most}): "
                         f"PWRES/NPDE decorrelate with a covariance estimated from the simulations")
    ipred_t, isd_t = model_program(model, _predict)(theta, ops.asarray(z_mode))
    ipred, isd = ops.to_numpy(ipred_t), ops.to_numpy(isd_t)
    k, (n, width) = int(num_sims), y.shape
    if dist_ops is None and _simulates_in_blocks(model, k * n * width):
        # blocks of units: memory bounded whatever N.  A fit on per-unit streams: each unit's simulations from its own
        # stream, the values of the whole simulation; another: each block from the next key of the seed's stream
        step = max(1, RESIDUAL_SIMULATION_BLOCK_VALUES // (k * width))
        epred, pwres, pde, pred = (np.zeros((n, width)) for _ in range(4))
        if unit_ids is not None:
            ids = np.asarray(unit_ids, dtype=np.int64)
            root, program = ops.stream_key(ops.key(seed), seed), model_program(model, _simulate_on_streams, k)
        else:
            program = model_program(model, _simulate_units, k)
        with ops.seed_context(seed):
            key = ops.key(seed)
            for a in range(0, n, step):
                b = min(n, a + step)
                units = ops.asarray(np.arange(a, b), dtype=None)
                if unit_ids is not None:
                    sims = program(theta, root, ops.asarray(ids[a:b], dtype=None), units)
                else:
                    block_key, key = ops.split(key)
                    sims = program(theta, block_key, units)
                sims = ops.to_numpy(sims)
                epred[a:b], pwres[a:b], pde[a:b] = _pwres_and_pde(y[a:b], sims, mask[a:b])
                if not model.has_gaussian_prior:
                    pred[a:b] = np.median(sims, 0)
        if model.has_gaussian_prior:
            pred = ops.to_numpy(model_program(model, _population_predict)(theta)[0])
    else:
        sims = simulate_observations(model, theta, num_sims, seed, unit_ids=unit_ids, ops=dist_ops)  # [K, N, T]
        if model.has_gaussian_prior:
            pred = ops.to_numpy(model_program(model, _population_predict)(theta)[0])
        else:
            pred = np.median(sims, 0)
        epred, pwres, pde = _pwres_and_pde(y, sims, mask)
    pde = np.clip(pde, 1.0 / (2 * num_sims), 1.0 - 1.0 / (2 * num_sims))
    npde = _inv_norm_cdf(pde)
    nan = np.where(mask, 1.0, np.nan)
    iwres = (y - ipred) / isd
    return Residuals(y=y * nan, mask=mask, pred=pred * nan, ipred=ipred * nan, iwres=iwres * nan, epred=epred * nan,
                     pwres=pwres * nan, npde=npde * nan)


@dataclass
class VPC:
    """Binned observed quantiles and simulated prediction intervals of those quantiles."""

    bin_edges: np.ndarray  # [B + 1]
    bin_x: np.ndarray  # [B] median x of the observations in each bin
    quantiles: tuple[float, ...]
    observed: np.ndarray  # [B, Q] observed quantiles
    simulated: np.ndarray  # [B, Q, 3] lower / median / upper of the simulated quantiles
    level: float
    x: np.ndarray  # observed x (flat, observed entries)
    y: np.ndarray  # observations (flat)


@dataclass
class DiscreteVPC:
    """VPC of discrete or event data: observed curves against simulated prediction intervals of the same curves.

    ``kind`` "proportion": per bin of x, the fraction of observations in each category (``labels``, e.g.
    ``P(DV = 1)``) or at or below a count; "survival": the Kaplan-Meier curve of the time to the first event on
    ``x`` (a time grid)."""

    kind: str
    labels: list[str]
    x: np.ndarray  # [B] median x of each bin, or [G] the time grid
    observed: np.ndarray  # [C, B]
    simulated: np.ndarray  # [C, B, 3] lower / median / upper over the simulated data sets
    level: float
    bin_edges: np.ndarray | None = None


def default_bins(x: np.ndarray, max_bins: int = 10) -> np.ndarray:
    """Bin edges: the distinct values when there are few, else quantiles of x."""
    ux = np.unique(x)
    if ux.size <= max_bins:
        mids = 0.5 * (ux[1:] + ux[:-1])
        return np.concatenate([[ux[0] - 1e-9], mids, [ux[-1] + 1e-9]])
    edges = np.unique(np.quantile(x, np.linspace(0, 1, max_bins + 1)))
    edges[0] -= 1e-9
    edges[-1] += 1e-9
    return edges


def vpc(model: LatentModel, theta: dict[str, Any], x: Any, *, num_sims: int = 500, bins: Any = None,
        quantiles: tuple[float, ...] = (0.05, 0.5, 0.95), level: float = 0.9, seed: int = 0,
        max_bins: int = 10) -> VPC:
    """Visual predictive check against the independent variable ``x [N, T]`` (e.g. time)."""
    _require_obs(model)
    ops = model.ops
    y, mask = (ops.to_numpy(a) for a in model.observations())
    mask = mask.astype(bool)
    x = np.asarray(x, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x must have the shape of the observations {y.shape}, got {x.shape}")
    sims = simulate_observations(model, theta, num_sims, seed)
    xo, yo = x[mask], y[mask]
    so = sims[:, mask]  # [K, M]
    edges = np.asarray(bins, dtype=float) if bins is not None else default_bins(xo, max_bins)
    which = np.clip(np.searchsorted(edges, xo, side="right") - 1, 0, len(edges) - 2)
    q = np.asarray(quantiles)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    obs_q, sim_q, bx, keep = [], [], [], []
    for b in range(len(edges) - 1):  # loop over bins (few), vectorised over replicates
        sel = which == b
        if not sel.any():
            continue
        keep.append(b)
        bx.append(np.median(xo[sel]))
        obs_q.append(np.quantile(yo[sel], q))
        per_rep = np.quantile(so[:, sel], q, axis=1)  # [Q, K]
        sim_q.append(np.stack([np.quantile(per_rep, lo, axis=1), np.median(per_rep, axis=1),
                               np.quantile(per_rep, hi, axis=1)], -1))
    return VPC(bin_edges=edges, bin_x=np.asarray(bx), quantiles=tuple(quantiles), observed=np.asarray(obs_q),
               simulated=np.asarray(sim_q), level=level, x=xo, y=yo)


__all__ = ["DiscreteVPC", "Residuals", "VPC", "decorrelate", "default_bins", "residuals", "simulate_observations",
           "vpc"]
