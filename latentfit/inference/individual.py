"""Individual (per-unit) estimates after a fit: conditional modes, means, sds and shrinkage.

* conditional modes (EBEs, MAP) ``ẑ_i = argmax_z log p(y_i | z; θ̂) + log p(z; θ̂)``: batched damped
  Newton of :func:`latentfit.inference.laplace.conditional_modes`, started at the conditional means;
* conditional means and sds ``E[z_i | y_i; θ̂]``, ``sd[z_i | y_i; θ̂]``: Monte-Carlo averages over the
  SAEM chains' last draws (``FitResult.latent_draws [L, draws, N, d]``), or over fresh draws from
  :func:`sample_conditional` (MCMC at θ̂);
* shrinkage (saemix, Monolix): ``sh_j = 1 − var_i(ẑ_ij − m_ij) / Ω_jj`` for the modes (η-shrinkage),
  and the same with the conditional means, where ``m_i`` and ``Ω`` are the prior moments of ``z_i``.

All values are in the model's unconstrained latent space; ``model.unpack_latents`` maps them to the
latent sites' supports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import mcmc
from .laplace import conditional_mode
from .model import LatentModel
from .units import unit_streams


@dataclass
class IndividualEstimates:
    """Per-unit estimates (numpy, unconstrained space) and shrinkage per latent coordinate."""

    mode: np.ndarray  # [N, d]
    mean: np.ndarray  # [N, d]
    sd: np.ndarray  # [N, d]
    shrinkage_mode: np.ndarray | None  # [d] (None without a Gaussian prior face)
    shrinkage_mean: np.ndarray | None
    labels: list[str]
    #: the model's individual values (``values`` of :func:`individual_estimates`) at the modes and at the draws, by
    #: name (numpy), where they were computed with the modes; else None
    values: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    #: the units' labels (a pandas Index: an NLME's IDs), the index of :meth:`to_frame`; None: 0 .. N-1
    units: Any = None
    #: ``P_i`` ``[N, d, d]`` at the modes, the precision of the Newton search (Gauss–Newton or the floored negative
    #: Hessian): the Laplace law ``N(ẑ_i, P_i⁻¹)`` of the full IS proposal; None where not computed
    precision: np.ndarray | None = None

    def to_frame(self):
        """Long pandas table: one row per unit (indexed by the units' labels, an NLME's IDs), columns
        ``<label>.mode/.mean/.sd``."""
        import pandas as pd

        cols = {}
        for j, lab in enumerate(self.labels):
            cols[f"{lab}.mode"] = self.mode[:, j]
            cols[f"{lab}.mean"] = self.mean[:, j]
            cols[f"{lab}.sd"] = self.sd[:, j]
        df = pd.DataFrame(cols)
        if self.units is not None:
            df.index = self.units
        else:
            df.index.name = "unit"
        return df

    def shrinkage_frame(self):
        import pandas as pd

        if self.shrinkage_mode is None:
            raise ValueError("shrinkage needs the model's Gaussian prior face (prior_moments); this model has none")
        return pd.DataFrame({"shrinkage_mode%": 100 * np.asarray(self.shrinkage_mode),
                             "shrinkage_mean%": 100 * np.asarray(self.shrinkage_mean)}, index=self.labels)


def latent_labels(model: LatentModel) -> list[str]:
    """``site[j]`` label of every coordinate of the flat latent vector."""
    labels = []
    for s in model.latent_sites:
        labels += [s.name] if s.size == 1 else [f"{s.name}[{j}]" for j in range(s.size)]
    return labels


def conditional_moments(draws: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over chains and draws of ``[L, draws, N, d]`` latent draws -> ``[N, d]`` each."""
    z = np.asarray(draws)
    z = z.reshape((-1,) + z.shape[-2:])
    return z.mean(0), z.std(0, ddof=1) if z.shape[0] > 1 else np.zeros(z.shape[1:])


def shrinkage(model: LatentModel, theta: dict[str, Any], z: Any,
              gather: Callable[[np.ndarray], np.ndarray] | None = None,
              moments: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | None:
    """``1 − var_i(z_ij − m_ij) / Ω_jj`` (saemix/Monolix η-shrinkage) for per-unit estimates ``z [N, d]``.

    ``gather`` (a distributed fit): concatenates an ``[n, ...]`` array of this process's units with every other
    process's, in unit order, so that the variance runs over all the fit's units.  ``moments``: the prior moments
    ``(m, Ω)`` at θ as numpy arrays (:func:`prior_moments`), when the caller has them."""
    if not model.has_gaussian_prior:
        return None
    m, omega = prior_moments(model, theta) if moments is None else moments
    var = np.diagonal(omega, 0, -2, -1)
    eta = np.asarray(z) - m
    if gather is not None:
        eta = gather(eta)
        var = gather(var) if var.ndim == 2 else var
    var = var.mean(0) if var.ndim == 2 else var
    return 1.0 - eta.var(0, ddof=1) / var


def prior_moments(model: LatentModel, theta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The prior moments ``(m [N, d], Ω)`` at θ as numpy arrays (on JAX one compiled program, not one per
    operation)."""
    ops = model.ops
    m, omega = ops.jit(model.prior_moments)(theta)
    return ops.to_numpy(m), ops.to_numpy(omega)


def sample_conditional(model: LatentModel, theta: dict[str, Any], z0: Any, num_iters: int = 200, *,
                       seed: int = 0, kernels: tuple[int, int] = (2, 2), thin: int = 1, unit_ids: Any = None,
                       ops: Any = None) -> np.ndarray:
    """MCMC draws from ``p(z_i | y_i; θ)`` for every unit at fixed θ (prior-IMH + adaptive component-wise RW).

    ``z0`` are the starting states ``[L, N, d]``; returns ``[L, num_iters // thin, N, d]`` (numpy).

    ``unit_ids`` (``[N]`` distinct ints, e.g. a fit's with ``rng="per_unit"``): per-unit streams — unit i's draws at
    iteration k and kernel step j come from the counter-based stream ``(seed, k, j, unit_ids[i])``, so they do not
    depend on the other units or on the process holding the unit (needs Gaussian latents, ``model.prior_transform``).
    ``ops``: the shim whose ``unit_mean`` / ``gather_units`` reach every unit (a distributed fit's: the random walk's
    initial scales and its acceptance rates are then over the units of every process); default ``model.ops``.
    """
    ops = model.ops if ops is None else ops
    xp = ops.xp

    def evaluate(z: Any) -> tuple[Any, Any]:
        return model.log_densities(theta, z)

    z0 = ops.asarray(z0)
    L = z0.shape[0]
    if unit_ids is not None:
        return _sample_conditional_per_unit(model, theta, ops, z0, num_iters, seed, kernels, thin, unit_ids)

    def iteration(th: dict[str, Any], key: Any, chain: mcmc.ChainState, scale: Any) -> tuple[Any, Any, Any]:
        """One iteration at θ = ``th``: ``kernels[0]`` prior-IMH, ``kernels[1]`` component-wise RW sweeps."""
        def at_theta(z: Any) -> tuple[Any, Any]:
            return model.log_densities(th, z)

        key, *ks = ops.split(key, kernels[0] + kernels[1] + 1)
        ki = iter(ks)
        for _ in range(kernels[0]):
            chain, _ = mcmc.prior_imh(ops, next(ki), chain, lambda kk: model.sample_prior(th, kk, L), at_theta)
        for _ in range(kernels[1]):
            chain, acc = mcmc.rw_componentwise(ops, next(ki), chain, scale, at_theta)
            scale = mcmc.adapt_scale(scale, acc)
        return key, chain, scale

    step = ops.jit(iteration)  # one compiled program per shape on JAX (eager, op by op, it took ~2 s an iteration)
    out = []
    with ops.seed_context(seed):
        key = ops.key(seed)
        chain = mcmc.init_chain_state(z0, evaluate)
        flat = xp.reshape(z0, (-1, z0.shape[-1]))
        sd = xp.std(flat, 0) if flat.shape[0] > 1 else ops.ones((z0.shape[-1],))
        scale = 0.5 * xp.where(sd > 0, sd, 1.0)
        for it in range(num_iters):
            key, chain, scale = step(theta, key, chain, scale)
            if (it + 1) % thin == 0:
                out.append(ops.to_numpy(chain.z))
    return np.stack(out, 1)


def _sample_conditional_per_unit(model: LatentModel, theta: dict[str, Any], ops: Any, z0: Any, num_iters: int,
                                 seed: int, kernels: tuple[int, int], thin: int, unit_ids: Any) -> np.ndarray:
    """:func:`sample_conditional` on per-unit streams (the kernels draw through ``ops.per_unit_streams``)."""
    xp = ops.xp
    if not model.has_gaussian_prior:
        raise ValueError("per-unit streams draw each unit's prior proposals as μ_i + L ε_i: they need Gaussian latents")
    sim, root = unit_streams(ops, seed, unit_ids)
    shape = tuple(z0.shape)

    def evaluate(z: Any) -> tuple[Any, Any]:
        return model.log_densities(theta, z)

    chain = mcmc.init_chain_state(z0, evaluate)
    flat = xp.reshape(ops.gather_units(z0, 1), (-1, shape[-1]))  # every process's units
    sd = xp.std(flat, 0) if flat.shape[0] > 1 else ops.ones((shape[-1],))
    scale = 0.5 * xp.where(sd > 0, sd, 1.0)
    out = []
    for it in range(num_iters):
        keys = sim.split(ops.fold_in(root, it + 1), kernels[0] + kernels[1])
        for j in range(kernels[0]):
            chain, _ = mcmc.prior_imh(sim, keys[j], chain,
                                      lambda kk: model.prior_transform(theta, sim.normal(kk, shape)), evaluate)
        for j in range(kernels[1]):
            chain, acc = mcmc.rw_componentwise(sim, keys[kernels[0] + j], chain, scale, evaluate)
            scale = mcmc.adapt_scale(scale, acc)
        if (it + 1) % thin == 0:
            out.append(ops.to_numpy(chain.z))
    return np.stack(out, 1)


def individual_estimates(model: LatentModel, theta: dict[str, Any], draws: Any, *, num_steps: int = 30,
                         method: str = "auto", values: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
                         ) -> IndividualEstimates:
    """Conditional modes (Newton from the conditional means), means, sds and shrinkage of every unit.

    ``values(θ, z)`` (e.g. NLME's individual parameters ψ_i, by name): also computed at the modes and at the draws, in
    the modes' program on a compiling backend (``.values``; one program fewer to key, load and call).  The search's
    precision at the modes comes with them (``.precision``: the full IS proposal's Laplace law)."""
    ops = model.ops
    mean, sd = conditional_moments(draws)
    z0 = ops.asarray(mean)
    at_draws = values is not None and ops.jittable
    searched = int(num_steps) > 0  # the search's precision at the modes comes with them (none without a search)
    if model.has_gaussian_prior or at_draws:
        # what else reads θ̂ and the modes, from the modes' program: the prior moments (for the shrinkages) and the
        # individual values; one program, not two or three
        def also(th: dict[str, Any], modes: Any, *zd: Any) -> dict[str, Any]:
            out = {"moments": model.prior_moments(th)} if model.has_gaussian_prior else {}
            if at_draws:
                out["values"] = (values(th, modes), values(th, zd[0]))
            return out

        mode, extra = conditional_mode(model, theta, z0=z0, num_steps=num_steps, method=method, also=also,
                                       also_args=(ops.asarray(draws),) if at_draws else (), with_precision=searched)
    else:
        mode, extra = conditional_mode(model, theta, z0=z0, num_steps=num_steps, method=method,
                                       with_precision=searched), {}
    mode, precision = mode if searched else (mode, None)
    moments = tuple(ops.to_numpy(m) for m in extra["moments"]) if "moments" in extra else None
    computed = extra.get("values")
    if computed is not None:
        computed = tuple({k: ops.to_numpy(v) for k, v in part.items()} for part in computed)
    mode = ops.to_numpy(mode)
    return IndividualEstimates(mode=mode, mean=mean, sd=sd, shrinkage_mode=shrinkage(model, theta, mode,
                                                                                      moments=moments),
                               shrinkage_mean=shrinkage(model, theta, mean, moments=moments),
                               labels=latent_labels(model), values=computed,
                               precision=None if precision is None else ops.to_numpy(precision))


def gather_estimates(model: LatentModel, theta: dict[str, Any], local: IndividualEstimates,
                     gather: Callable[[np.ndarray], np.ndarray]) -> IndividualEstimates:
    """A distributed fit's estimates of every unit, in unit order, from this process's ``local`` ones (each process
    computes its units: modes, means and sds are per unit) and ``gather`` (see :func:`shrinkage`); the shrinkage
    runs over all units."""
    return IndividualEstimates(mode=gather(local.mode), mean=gather(local.mean), sd=gather(local.sd),
                               shrinkage_mode=shrinkage(model, theta, local.mode, gather),
                               shrinkage_mean=shrinkage(model, theta, local.mean, gather), labels=local.labels)


__all__ = ["IndividualEstimates", "conditional_moments", "gather_estimates", "individual_estimates",
           "latent_labels", "sample_conditional", "shrinkage"]
