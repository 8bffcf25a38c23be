"""Monte-Carlo EM (Wei & Tanner, JASA 1990) and mini-batch MCEM (Karimi, Lavielle & Moulines, "On the
convergence properties of the mini-batch EM and MCEM algorithms", HAL hal-02334485, 2019).

The exact per-unit statistic is replaced by a Monte-Carlo average over ``M = num_samples`` draws
``z_{i,m} ~ p(z_i | y_i; θ)`` — exact posterior draws when the model has a sampler (discrete
latents), otherwise warm-started batched MH chains (prior-IMH + component-wise RW, ``mcmc_steps``
sweeps per visit):

    S̃_i(θ) = (1/M) Σ_m S(z_{i,m}, y_i).

``MCEM``: full batch, ``θ^{k} = θ̄(Σ_i S̃_i(θ^{k−1}))``.  ``MiniBatchMCEM``: the incremental rule of
:mod:`~latentfit.inference.iem` on the MC statistics (a table of the last MC statistic per unit).

With ``rng="per_unit"`` unit i's draws at a visit (MH chains, or the inverse CDF of the exact posterior sampler
of a model with discrete latents) come from its own counter-based stream ``(visit key, unit id)``, the visit key a
word drawn from the run's stream (the same on every process), so the fit does not depend on the order of the units
or on their sharding: ``run(distributed=True)`` (each process draws for the units of the global mini-batch it holds;
statistics, acceptance rates and non-finite counts are all-reduced in float64) equals the one-process fit.  TTSEM
(:mod:`~latentfit.inference.ttsem`) shares this oracle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import mcmc
from .driver import replace_fields, state_field
from .em import EM
from .iem import MiniBatchEM
from .saem import RNG_MODES, _unit_ids
from .stats_table import start_chain
from .units import put_units, take_units

#: the visit word's range (a 62-bit counter from two draws)
_WORD = 2 ** 31


class _UnitStreamChains:
    """The MH-chain oracle of the Monte-Carlo engines with an ``rng`` option (``"global"`` | ``"per_unit"``)."""

    def __init__(self, model: Any, *args: Any, rng: str = "global", unit_ids: Any = None, **kwargs: Any) -> None:
        if rng not in RNG_MODES:
            raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
        if rng == "per_unit":
            if kwargs.get("batching", "auto") == "blocks":
                raise ValueError(f"{self.name}: rng='per_unit' visits units by their ids; batching='blocks' reorders "
                                 "them: use batching='random'")
            kwargs["batching"] = "random"
        super().__init__(model, *args, **kwargs)
        self.rng = rng
        self._unit_ids_option = unit_ids
        self._unit_ids = None
        if rng == "per_unit":
            if not model.has_posterior_sampler and not model.has_gaussian_prior:
                raise ValueError(f"{self.name}: rng='per_unit' runs per-unit MH chains whose prior proposals are "
                                 "μ_i + L ε_i from each unit's stream: it needs Gaussian latents (Normal, LogNormal or "
                                 "MultivariateNormal sites) or a model with an exact posterior sampler (discrete "
                                 "latents); use rng='global' for this model")
            self._unit_ids = _unit_ids(unit_ids, model.num_units)

    def distribute(self) -> None:
        """:meth:`StatEngine.distribute` (global mini-batches, statistics all-reduced); the default unit ids become
        the global indices of this process's units."""
        super().distribute()
        if self._unit_ids_option is None and self._unit_ids is not None:
            n = int(self.model.num_units)
            self._unit_ids = np.arange(self._unit_offset, self._unit_offset + n, dtype=np.int64)

    # ----- per-unit streams -----------------------------------------------------------------------------
    def _visit_key(self, key: Any) -> Any:
        """A counter-based key for one visit: the run's key itself on JAX (a fresh key per visit), on torch two
        words drawn from the run's generator (consumed alike by every process) folded into the seed's key."""
        ops = self.ops
        if ops.jittable:
            return key
        word = ops.randint(key, (2,), _WORD)
        return ops.fold_in(ops.stream_key(None, self.seed), word[0] * _WORD + word[1])

    def _sim_ops(self, units: Any) -> Any:
        ids = self.ops.asarray(self._unit_ids, dtype=None)
        return self.ops.per_unit_streams(ids if units is None else take_units(self.ops, ids, units, 0))

    def _initial_chains(self, theta: dict[str, Any], key: Any) -> Any:
        if self.rng != "per_unit":
            return super()._initial_chains(theta, key)
        model = self.model
        eps = self._sim_ops(None).normal(self._visit_key(key), (self.num_samples, model.num_units, model.latent_dim))
        return model.prior_transform(theta, eps)

    def oracle(self, state: Any, theta: dict[str, Any], units: Any, key: Any) -> tuple[dict[str, Any], Any]:
        """Exact posterior draws (a model with a sampler) under ``rng="per_unit"``: unit i's labels are the inverse
        CDF of uniforms from its own stream ``(visit key, unit id)``; otherwise :meth:`StatEngine.oracle`."""
        model = self.model
        if self.rng != "per_unit" or not model.has_posterior_sampler:
            return super().oracle(state, theta, units, key)
        xp = self.ops.xp
        z = model.sample_posterior(theta, self._visit_key(key), self.num_samples, units, sim=self._sim_ops(units))
        return {k: xp.mean(v, 0) for k, v in model.stats_rows(theta, z, units).items()}, state

    @staticmethod
    def _no_units(units: Any) -> bool:
        """A distributed fit's process may hold none of a mini-batch's units: it evaluates nothing (its sums are 0)
        but joins every all-reduce."""
        return units is not None and not hasattr(units, "start") and int(units.shape[0]) == 0

    def _mcmc_oracle(self, state: Any, theta: dict[str, Any], units: Any, key: Any) -> tuple[dict[str, Any], Any]:
        if self.rng != "per_unit":
            return super()._mcmc_oracle(state, theta, units, key)
        xp = self.ops.xp
        z, state = self._advance_chains(state, theta, units, key)
        if self._no_units(units):  # rows of the statistics' shape, none of them: one unit's rows, cut to 0
            one = self.ops.arange(1)
            z = xp.swapaxes(take_units(self.ops, state_field(state, "z"), one, 0), 0, 1)
            return {k: xp.mean(v, 0)[:0] for k, v in self.model.stats_rows(theta, z, one).items()}, state
        return {k: xp.mean(v, 0) for k, v in self.model.stats_rows(theta, z, units).items()}, state

    def _sweep_chains(self, state: Any, theta: dict[str, Any], units: Any, key: Any,
                      chain: mcmc.ChainState | None = None) -> tuple[mcmc.ChainState, Any]:
        """``mcmc_steps`` sweeps (prior-IMH, component-wise RW) of the units' chains, each unit drawing from its own
        stream; acceptance rates (the RW scales' adaptation) and non-finite counts over every process."""
        if self.rng != "per_unit":
            return super()._sweep_chains(state, theta, units, key, chain)
        model, ops, xp = self.model, self.ops, self.ops.xp
        sim = self._sim_ops(units)
        if units is not None and self._distributed and ops.jittable:  # a JAX local fit: rates over real units only
            from .padding import BatchMeanOps

            sim = BatchMeanOps(sim, units < int(getattr(model, "num_real_units", model.num_units)))
        z_tab = state_field(state, "z")  # [n, L, d]
        empty = self._no_units(units)

        def evaluate(z: Any) -> tuple[Any, Any]:
            if empty:
                return z[..., 0] * 0.0, z[..., 0] * 0.0
            return model.log_densities(theta, z, units)

        chain = start_chain(ops, z_tab, units, evaluate, chain)
        shape = tuple(chain.z.shape)

        def sample_prior(kk: Any) -> Any:
            return model.prior_transform(theta, sim.normal(kk, shape), units)

        keys = sim.split(self._visit_key(key), 2 * self.mcmc_steps + 1)
        scale = state_field(state, "rw_scale")
        for s in range(self.mcmc_steps):
            chain, _ = mcmc.prior_imh(sim, keys[2 * s], chain, sample_prior, evaluate)
            chain, acc = mcmc.rw_componentwise(sim, keys[2 * s + 1], chain, scale, evaluate)
            scale = mcmc.adapt_scale(scale, acc)
        state = replace_fields(state, z=put_units(ops, z_tab, units, xp.swapaxes(chain.z, 0, 1)), rw_scale=scale,
                               num_nonfinite=state_field(state, "num_nonfinite") + ops.all_sum(chain.num_nonfinite))
        return chain, state


class MCEM(_UnitStreamChains, EM):
    """Monte-Carlo EM: one full-batch MC E-step (``num_samples`` draws per unit) per epoch.

    ``rng="per_unit"`` (``unit_ids=``): each unit's MH draws from its own stream (see the module), for
    ``run(distributed=True)``."""

    name = "MCEM"
    monte_carlo = True


class MiniBatchMCEM(_UnitStreamChains, MiniBatchEM):
    """Mini-batch MCEM: refresh b units' MC statistics per iteration (default ⌈n/10⌉).

    ``rng="per_unit"`` (``unit_ids=``): each unit's MH draws from its own stream (see the module), for
    ``run(distributed=True)``."""

    name = "MiniBatchMCEM"
    monte_carlo = True

    def __init__(self, model: Any, num_epochs: int = 20, batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, num_epochs, batch_size, **kwargs)
