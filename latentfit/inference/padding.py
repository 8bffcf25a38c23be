"""Dummy units that count for nothing: blocks of unequal size in a ``distributed="local"`` JAX fit.

The processes of a JAX local fit run one compiled program over one device each (``jax.shard_map``), so every
process's arrays must have one shape.  A process holding ``n_r`` units of a largest block of ``n_max`` pads its block
to ``n_max`` units (``model.pad_units(n_max)``: copies of its last unit, so that every computation on them stays
finite), and :func:`masked_units` weights each unit by ``w_i ∈ {0, 1}`` (1 for its own units):

    ℓ̃_i(θ, z_i) = w_i · ℓ_i(θ, z_{c(i)}),      S̃_i = w_i · S_i(z_{c(i)}),

for the per-unit log-likelihood, log-prior and statistics, ``c(i)`` being the unit a dummy unit copies (``i`` for
a real one): a dummy unit is evaluated at that unit's draws, where its values and their gradients are finite, and
weighed by ``where``, not a product, so that nothing of it reaches a sum.  Every sum over units (statistics,
objective, numerical M-step, gradient) is then the sum over the real units, exactly; the dummy units' chains target
a flat density, are never read, and are left out of the acceptance rates and of the gathered draws by the process
shim (:class:`~latentfit.inference.ops_jax_procs.JaxProcessOps` with ``pad_units``); the fit's result holds the real
units only.

The same weights serve mini-batches of one static size on every process (MCMCSGD, the EM family, MISSO): an entry
naming another process's unit carries the index ``n`` (``≥`` the block's size), weighs 0, reads unit 0, and its table
writes are dropped (JAX drops out-of-range scatter updates).  Engines with MH chains in a mini-batch (MCMCSGD; MCEM,
MiniBatchMCEM, TTSEM and MISSO without an exact posterior sampler) name a spare dummy unit instead (one more per
block), so that the chains' proposals for those entries never overwrite a real unit's draws in a model that
evaluates a batch through all its units; their acceptance rates count the batch's real entries only
(:class:`BatchMeanOps`).

What a model pads (``model.pad_units(size)``): NLME its individuals' rows, ``GaussianMixture`` its points (its centring
and k-means start read the real points only), a NumPyro model its per-unit array arguments; a grouped NumPyro model
(latents in a plate over groups, rows outside it reading ``alpha[group_idx]``) also its rows, to one more than the
most rows of a process (``model.pad_extent()`` gathered by the driver), the extra rows copies of the last one whose
group index names the last dummy group (its ``int`` plate-size argument, or ``int(group_idx.max()) + 1``, follows).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .model import LatentModel


class MaskedUnits:
    """Mix-in of :func:`masked_units`: the per-unit values of the model it is mixed into, weighted by ``unit_mask``."""

    #: ``[n]`` bool on the model's backend: True for the process's own units, False for the dummy ones
    unit_mask: Any
    #: the number of real units (the leading ``num_real_units`` of the ``num_units``)
    num_real_units: int

    def _mask_of(self, units: Any) -> Any:
        """The weights of ``units``; an index ``≥ n`` (another process's unit in a mini-batch of one static size)
        weighs 0 and reads unit ``index mod n``."""
        if units is None:
            return self.unit_mask
        n = self.unit_mask.shape[0]
        return self.ops.take(self.unit_mask, units % n) & (units < n)

    def _units(self, units: Any) -> Any:
        return None if units is None else units % self.unit_mask.shape[0]

    def _masked_z(self, z: Any, units: Any = None) -> Any:
        """The draws a dummy unit is evaluated at: those of the unit it copies (finite wherever that unit's are,
        whatever its own flat-target chain holds).  A mini-batch holds no dummy unit (its entries of other processes
        read unit 0's draws and data)."""
        n = int(z.shape[-2])
        if units is not None:
            return z
        # a gather on every process, even one without dummy units: one program over the processes
        src = np.concatenate([np.arange(self.num_real_units), np.full(n - self.num_real_units,
                                                                      self.num_real_units - 1)])
        return self.ops.take(z, self.ops.asarray(src, dtype=None), axis=z.ndim - 2)

    def _mask_values(self, mask: Any, *values: Any) -> tuple[Any, ...]:
        xp = self.ops.xp
        return tuple(xp.where(mask, v, xp.zeros_like(v)) if v is not None else None for v in values)

    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        mask = self._mask_of(units)
        ll, lp = super().log_densities(theta, self._masked_z(z, units), self._units(units))
        return self._mask_values(mask, ll, lp)

    def density_evaluator(self, theta: dict[str, Any], units: Any = None) -> Any:
        mask = self._mask_of(units)
        inner = super().density_evaluator(theta, self._units(units))

        def evaluate(z: Any) -> tuple[Any, Any]:
            ll, lp = inner(self._masked_z(z, units))
            return self._mask_values(mask, ll, lp)

        return evaluate

    def cached_density(self, theta: dict[str, Any]) -> Any:
        inner = super().cached_density(theta)
        if inner is None:
            return None
        evaluate0, rescore0 = inner
        mask = self.unit_mask

        def evaluate(z: Any) -> tuple[Any, Any, Any]:
            ll, lp, cache = evaluate0(self._masked_z(z))
            return (*self._mask_values(mask, ll, lp), cache)

        def rescore(z: Any, cache: Any) -> tuple[Any, Any]:
            return self._mask_values(mask, *rescore0(self._masked_z(z), cache))

        return evaluate, rescore

    def initial_cache(self, theta: dict[str, Any], z: Any) -> Any:
        return super().initial_cache(theta, self._masked_z(z))

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        return super().sample_prior(theta, key, num_chains, self._units(units))

    def latent_mask(self, units: Any = None) -> Any:
        return super().latent_mask(self._units(units))

    def closed_form_log_prior(self) -> Any:
        """The model's cheap log-prior (if it has one), weighed as :meth:`log_densities`."""
        inner = getattr(super(), "closed_form_log_prior", lambda: None)()
        if inner is None:
            return None

        def log_prior(theta: dict[str, Any], z: Any, units: Any = None) -> Any:
            return self._mask_values(self._mask_of(units), inner(theta, self._masked_z(z, units),
                                                                 self._units(units)))[0]

        return log_prior

    def sample_posterior(self, theta: dict[str, Any], key: Any, num_samples: int, units: Any = None,
                         **options: Any) -> Any:
        return super().sample_posterior(theta, key, num_samples, self._units(units), **options)

    def prior_transform(self, theta: dict[str, Any], eps: Any, units: Any = None) -> Any:
        return super().prior_transform(theta, eps, self._units(units))

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None, **options: Any) -> dict[str, Any]:
        mask = self._mask_of(units)
        out = super().stats(theta, self._masked_z(z, units), self._units(units), **options)
        return {k: self._weigh(mask, v, z.ndim - 2) for k, v in out.items()}

    def stats_rows(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        mask = self._mask_of(units)
        out = super().stats_rows(theta, self._masked_z(z, units), self._units(units))
        return {k: self._weigh(mask, v, z.ndim - 2) for k, v in out.items()}

    # ----- exact E-steps (the EM family) --------------------------------------------------------------------
    def _zero_rows(self, mask: Any, rows: dict[str, Any]) -> dict[str, Any]:
        return {k: self._weigh(mask, v, 0) for k, v in rows.items()}

    def expected_stats(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return self._zero_rows(self._mask_of(units), super().expected_stats(theta, self._units(units)))

    def expected_rows(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return self._zero_rows(self._mask_of(units), super().expected_rows(theta, self._units(units)))

    def reduce_rows(self, rows: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return super().reduce_rows(self._zero_rows(self._mask_of(units), rows), self._units(units))

    def expected_rows_and_sum(self, theta: dict[str, Any], units: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        rows = self.expected_rows(theta, units)
        return rows, self.reduce_rows(rows, units)

    def sum_expected_stats(self, theta: dict[str, Any], units: Any = None) -> tuple[dict[str, Any], Any]:
        xp = self.ops.xp
        s = self.expected_stats(theta, units)
        ll = xp.sum(self.marginal_log_lik(theta, units)) if self.has_exact_marginal else None
        return {k: xp.sum(v, 0) for k, v in s.items()}, ll

    def marginal_log_lik(self, theta: dict[str, Any], units: Any = None) -> Any:
        return self._mask_values(self._mask_of(units), super().marginal_log_lik(theta, self._units(units)))[0]

    def _weigh(self, mask: Any, v: Any, axis: int) -> Any:
        """``v`` (units on ``axis``: after the draws' leading dims) with the dummy units' rows set to 0."""
        xp = self.ops.xp
        m = xp.reshape(mask, (mask.shape[0],) + (1,) * (v.ndim - axis - 1))
        return xp.where(m, v, xp.zeros_like(v))


class BatchMeanOps:
    """The shim ``base`` whose :meth:`unit_mean` averages the entries of a mini-batch ``[..., b]`` where ``mask [b]``
    (this process's units of a batch of one static size on every process), over every process; the rest is
    ``base``'s."""

    def __init__(self, base: Any, mask: Any) -> None:
        self.base, self.mask = base, mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def unit_mean(self, x: Any) -> Any:
        xp = self.base.xp
        m = xp.broadcast_to(self.mask, x.shape)
        wide = xp.result_type(float)
        total = self.base.all_sum(xp.stack([xp.sum(xp.where(m, x, xp.zeros_like(x))).astype(wide),
                                            xp.sum(m).astype(wide)]))
        return (total[0] / total[1]).astype(x.dtype)


def masked_units(model: LatentModel, num_real: int) -> LatentModel:
    """``model`` (of ``n`` units, the first ``num_real`` real and the rest dummies) with every per-unit value of the
    dummy units set to 0 (:class:`MaskedUnits`); a copy, of a subclass of the model's class."""
    import copy

    cls = model.__class__

    class Masked(MaskedUnits, cls):  # type: ignore[misc, valid-type]
        pass

    Masked.__name__ = Masked.__qualname__ = f"Masked{cls.__name__}"
    out = copy.copy(model)
    out.__class__ = Masked
    n = int(model.num_units)
    out.unit_mask = model.ops.asarray(np.arange(n) < int(num_real), dtype=None)
    out.num_real_units = int(num_real)
    return out


def pad_axis(a: Any, axis: int, size: int) -> Any:
    """``a`` padded along ``axis`` to ``size`` with copies of its last slice (numpy or the array's own library)."""
    n = a.shape[axis]
    if n >= size:
        return a
    if n == 0:
        raise ValueError("a block of 0 units cannot be padded (nothing to copy): give every process some units")
    idx = np.concatenate([np.arange(n), np.full(size - n, n - 1)])
    if isinstance(a, np.ndarray):
        return np.take(a, idx, axis=axis)
    return a[(slice(None),) * (axis % a.ndim) + (idx,)]


__all__ = ["MaskedUnits", "masked_units", "pad_axis"]
