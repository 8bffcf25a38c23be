"""SAEM: stochastic approximation EM with an MCMC simulation step (MCMC-SAEM).

Delyon, Lavielle & Moulines (1999); Kuhn & Lavielle (2004, 2005); saemix (Comets et al. 2017).
Iteration k (1-based), with L chains per unit:

1. simulation: a few MH kernels targeting ``p(z_i | y_i; θ_{k−1})`` (prior-IMH, component-wise
   RW, random-block RW; saemix defaults ``(2, 2, 2)``), batched over units and chains;
2. stochastic approximation: ``ŝ_k = ŝ_{k−1} + γ_k (S(z^{(k)}) − ŝ_{k−1})``, S averaged over chains;
3. M-step: ``θ_k = θ̄(ŝ_k)`` in closed form where the model has one; other parameters are set by
   a γ-smoothed numerical maximisation of the complete-data log-likelihood (saemix recipe).

Step sizes follow saemix's phases (:class:`~latentfit.inference.schedules.SaemixPhases`); the
random-effect variances are annealed during the first ``K1/2`` iterations,
``ω²_k = max(0.97 ω²_{k−1}, ω̂²_k)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._hooks import user_stacklevel
from . import mcmc
from .driver import Engine, default_num_chains, final_trend
from .model import ConvergenceWarning, LatentModel
from .mstep import flatten, newton_maximize, unflatten
from .ops import Ops
from .schedules import SaemixPhases

#: where SAEM's MCMC draws come from (the ``rng`` option)
RNG_MODES = ("global", "per_unit")
#: a fit warns (:class:`~latentfit.ConvergenceWarning`) when an annealed variance's log wandered with a larger sd than
#: this over the exploration iterations after the annealing (:meth:`SAEM.wandering_variances`)
WANDER_LOG_SD = 0.5
#: a fit warns (:class:`~latentfit.ConvergenceWarning`) when a parameter's trajectory over the last quarter of the
#: exploration iterations still drifts (:meth:`SAEM.drifting_parameters`): a least-squares slope beyond this many of
#: its AR(1)-corrected standard errors (:func:`~latentfit.inference.driver.final_trend`, ρ from the iterations after
#: the annealing)
DRIFT_SIGMAS = 5.0


class SAEMState(NamedTuple):
    """What SAEM's (and f-SAEM's) next iteration needs."""

    #: θ_k in unconstrained space, by parameter
    theta_u: dict[str, Any]
    #: the chains ``z [L, N, d]`` (unconstrained latents)
    z: Any
    #: adaptive scales of the component-wise and block random walks ``[d]``
    scale_rw: Any
    scale_block: Any
    #: the random stream: a JAX key or a ``torch.Generator`` on the data's device
    key: Any
    #: ``ŝ_k``, the stochastic approximation of the statistics (models with statistics; else None)
    s_hat: dict[str, Any] | None = None
    #: root of the per-unit counter-based streams (``rng="per_unit"``; else None)
    stream: Any = None
    #: f-SAEM: warm start of the per-unit MAPs ``[N, d]`` (else None)
    mode: Any = None
    #: the chains' per-unit cache ``[L, N]`` when the model offers one (:meth:`LatentModel.cached_density`, e.g. NLME's
    #: residual sums of squares): the next sweep re-scores its starting state from it; else None
    cache: Any = None


class SAEMInfo(NamedTuple):
    """What a user may look at after each SAEM iteration (the history)."""

    #: mean over chains of ``Σ_i log p(y_i, z_i; θ_{k−1})`` at the new draws
    objective: Any
    #: the step size γ_k
    gamma: Any
    #: acceptance rates by kernel
    acc: dict[str, Any]
    #: proposals rejected for a NaN/inf log-density
    num_nonfinite: Any


def per_unit_ids(engine: str, model: Any, rng: str, unit_ids: Any) -> np.ndarray | None:
    """The units' ids under ``rng="per_unit"`` (:func:`_unit_ids`), None under ``"global"``; per-unit streams draw
    each unit's prior proposals as ``μ_i + L ε_i`` from its own stream, so they need Gaussian latents."""
    if rng != "per_unit":
        return None
    if not model.has_gaussian_prior:
        raise ValueError(f"{engine}: rng='per_unit' draws each unit's prior proposals as μ_i + L ε_i from its "
                         "own stream, which needs Gaussian latents (Normal, LogNormal or MultivariateNormal "
                         "sites whose parameters do not depend on other latents); use rng='global' for this "
                         "model")
    return _unit_ids(unit_ids, model.num_units)


def _unit_ids(unit_ids: Any, n: int) -> np.ndarray:
    """The units' ids for per-unit streams: distinct non-negative integers, one per unit (default ``0 .. n−1``)."""
    if unit_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(unit_ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"unit_ids must give one id per unit: expected {n} ids, got an array of shape {ids.shape}")
    if ids.dtype.kind not in "iu" and not (ids.dtype.kind == "f" and np.all(ids == np.round(ids))):
        raise ValueError(f"unit_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if np.any(ids < 0) or np.any(ids >= 2 ** 31):
        raise ValueError(f"unit_ids must lie in [0, 2**31), got min {ids.min()} and max {ids.max()}")
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"unit_ids must be distinct: {uniq[counts > 1][:5].tolist()} repeat")
    return ids


def _validate_num_iters(num_iters: Any) -> tuple[int, int]:
    if isinstance(num_iters, (int, np.integer)):
        num_iters = (int(num_iters), 0)
    try:
        k1, k2 = (int(v) for v in num_iters)
    except (TypeError, ValueError):
        raise ValueError(f"num_iters must be an int or a pair (K1, K2) of ints, got {num_iters!r}") from None
    if k1 <= 0 or k2 < 0:
        raise ValueError(f"num_iters must be positive: got K1={k1}, K2={k2} (K1 > 0, K2 >= 0)")
    return k1, k2


def _validate_burn_in(burn_in: int, k1: int) -> None:
    """Refuse a burn-in that leaves no exploration iteration, in terms of the options the user sets."""
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    if burn_in >= k1:
        raise ValueError(f"num_iters=(K1, K2): K1 = {k1} must exceed SAEM's burn-in of {burn_in} iterations "
                         f"(burn_in=, default 5); give more iterations or a smaller burn_in")


class SAEM(Engine):
    """MCMC-SAEM on a :class:`LatentModel` (backend-neutral).

    Parameters
    ----------
    num_iters : (K1, K2)
        Exploration (γ = 1) and smoothing (γ = 1/(k − K1)) iterations; saemix default (300, 100).
    num_chains : int, optional
        Chains per unit; default saemix's ``ceil(50 / N)``.
    burn_in : int
        Initial iterations with γ = 0 (MCMC only); saemix default 5.
    kernels : (n1, n2, n3)
        Iterations of the prior-IMH, component-wise RW and block RW kernels; saemix ``(2, 2, 2)``.
    line_moves : bool
        After those kernels, a Gibbs move along each of the model's :meth:`~LatentModel.latent_lines` (NLME with IOV:
        η_i up and every κ_ik down, which leaves the predictions unchanged; :func:`mcmc.line_gibbs`, one model
        evaluation per line); default False (saemix's kernels alone): it removed the IOV bias of audit G's design but
        sent every fit of a 100-subject cross-over design with the drug carried over (``tests/test_nlme_occasions.py``,
        seed 13) to a known local optimum (IS log-likelihood −680.8 and −724.3 for two replicates against −580.4
        without), not yet understood; opt in where IOV estimates drift (the end-of-exploration drift warning).
    anneal : bool
        Simulated annealing of the latent variances during the first ``anneal_iters`` (K1/2).
    rng : ``"global"`` | ``"per_unit"``
        Where the MCMC draws come from.  ``"global"`` (default): one stream of the backend, consumed by all units
        together.  ``"per_unit"``: unit i's draws at iteration k and kernel step j come from its own counter-based
        stream ``(seed or key, unit_ids[i], k, j)`` (``jax.random.fold_in`` on JAX, Philox-4x32-10 on torch), so
        the fit does not depend on the order of the units or on how they are sharded over devices or
        processes.  Needs a Gaussian prior for the prior draws (``model.prior_transform``).
    unit_ids : sequence of int, optional
        The identity of each unit for ``rng="per_unit"`` (distinct non-negative integers, one per unit in the
        model's order; default ``0 .. N−1``): the same ids give a unit the same draws in any order or shard.
    draw_dtype : ``"float32"`` | ``"float64"`` | None
        dtype of the MCMC kernels' normal draws (``rng="global"``; JAX), cast to the model's dtype: float32 normals
        cost a third of float64 ones on a CPU (:meth:`JaxOps.with_draw_dtype`).  None (default): the model's
        ``mcmc_draw_dtype`` (NLME on JAX: ``"float32"``), else the model's dtype.
    callback : callable, optional
        ``callback(k, record)`` after each iteration, ``record`` its history row; returning True (or raising
        ``StopIteration``) stops the fit after iteration k, an ordinary result of k iterations
        (:mod:`~latentfit.inference.driver`).
    """

    name = "SAEM"
    jax_local_blocks = True  # run(distributed="local") on JAX (tests/test_jax_distributed.py)
    pure_step = True  # the driver keeps the last good state by reference (tests/test_nlme_memory.py)
    #: the chains carry the model's per-unit cache between iterations (:meth:`LatentModel.cached_density`); f-SAEM's
    #: Laplace phase does not keep it
    carries_cache = True
    #: compiled sweeps hold the chains laid out ``[L, d, N]`` where the model offers that face
    #: (:meth:`LatentModel.units_minor_density`; ``rng="global"``): the same draws, values equal up to rounding
    units_minor_sweep = True

    def __init__(self, model: LatentModel, num_iters: Any = (300, 100), num_chains: int | None = None, *,
                 seed: int = 0, progress: bool = True, burn_in: int = 5, kernels: tuple[int, int, int] = (2, 2, 2),
                 anneal: bool = True, anneal_iters: int | None = None, anneal_factor: float = 0.97,
                 newton_steps: int = 8, num_draws: int = 100, callback=None, chunk_size: int = 25,
                 rng: str = "global", unit_ids: Any = None, draw_dtype: str | None = None,
                 line_moves: bool = False) -> None:
        super().__init__(model, seed=seed, progress=progress, callback=callback, num_draws=num_draws,
                         chunk_size=chunk_size)
        self.line_moves = bool(line_moves)
        self.validate_options(num_iters, num_chains, rng=rng)
        self.rng = rng
        dt = draw_dtype if draw_dtype is not None else getattr(model, "mcmc_draw_dtype", None)
        if rng == "per_unit":  # the per-unit streams draw in the model's dtype
            dt = None
        view = self.ops.with_draw_dtype(dt) if dt is not None else self.ops  # refused on a backend without the option
        #: dtype of the kernels' normal draws when it is not the model's (None: the model's)
        self.draw_dtype = None if getattr(view, "draw_dtype", None) is None else str(dt)
        self._unit_ids = per_unit_ids(self.name, model, rng, unit_ids)
        self._unit_ids_option = unit_ids
        k1, k2 = _validate_num_iters(num_iters)
        _validate_burn_in(burn_in, k1)
        if len(kernels) != 3 or any(int(n) < 0 for n in kernels):
            raise ValueError(f"kernels must be three non-negative counts, got {kernels!r}")
        self.schedule = SaemixPhases(K1=k1, K2=k2, burn_in=burn_in,
                                     anneal_iters=anneal_iters if anneal else 0, anneal_factor=anneal_factor)
        self.num_chains = int(num_chains) if num_chains is not None else default_num_chains(model.num_units)
        self._num_chains_option = num_chains
        #: units of the whole fit (all processes of a distributed fit)
        self._total_units = int(model.num_units)
        self.kernels = tuple(int(n) for n in kernels)
        self.newton_steps = int(newton_steps)
        # shapes in unconstrained space (the numerical step works there; e.g. a positive-definite
        # matrix may be a vector of its Cholesky factor's entries)
        self._param_shapes = {n: model.ops.shape_of(p.to_unconstrained, p.value) for n, p in model.params.items()}

    @staticmethod
    def validate_options(num_iters: Any = (300, 100), num_chains: int | None = None, rng: str = "global",
                         **_: Any) -> None:
        _validate_num_iters(num_iters)
        if rng not in RNG_MODES:
            raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
        if num_chains is not None and int(num_chains) < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")

    # ----- engine protocol -------------------------------------------------------------------------
    def phases(self) -> list[tuple[int, int, Any]]:
        return [(1, self.schedule.num_iters, "saem")]

    def settled_from(self) -> int:
        """The smoothing phase (``K1 + 1``): before it θ_k moves (γ = 1, annealed variances), so the chains' draws
        are not draws at θ̂; without a smoothing phase (K2 = 0) no iteration is settled."""
        sch = self.schedule
        return sch.K1 + 1 if sch.K2 > 0 else sch.num_iters + 1

    def init(self, key: Any) -> SAEMState:
        model, ops = self.model, self.ops
        theta = model.init_params()
        root = ops.stream_key(key, self.seed) if self.rng == "per_unit" else None
        # one process: the scales need no collective and are part of the chains' start
        local = type(ops).gather_units is Ops.gather_units
        checked = None
        finite: Any = False  # the model's check of its starting values (LatentModel.initial_values_finite) not run
        if ops.jittable:  # one compiled program (a persistent-cache hit in a later process), not ~15-45 eager ones
            def start(theta: dict[str, Any], key: Any, root: Any) -> tuple:
                # the prior draw computed once, in memory: XLA:CPU would copy its hash and inverse error function into
                # each fusion that reads it (:meth:`_chains_draw`); then what follows from it: the scales, the cache
                # and the check (:meth:`_start_eager`); and the model's check of its starting values (None: none)
                theta_u, key_next, z = ops.computed_once(lambda k, th, r: self._chains_draw(th, k, r), key, theta, root)
                return (theta_u, key_next, z, *self._chains_finish(theta, z, local), self._start_eager(theta, z),
                        model.initial_values_finite(theta))

            try:
                theta_u, key_next, z, scale, cache, checked, finite = ops.jit(start)(theta, key, root)
                # a jitted dict comes back with its keys sorted: the parameters' order (summaries, history) is θ's
                theta_u = {**{k: theta_u[k] for k in theta if k in theta_u}, **theta_u}
                key = key_next
            except Exception:  # noqa: BLE001 - a prior draw that cannot be traced: eagerly (its own errors, if any)
                checked, finite = None, False
                theta_u, key, z, scale, cache = self._chains_start(theta, key, root, local)
        else:
            theta_u, key, z, scale, cache = self._chains_start(theta, key, root, local)
        if finite is not None and not bool(finite):  # not computed, or False: the model checks (and names the fault)
            model.check_initial_values()
        all_bad, s_hat = self._start(theta, z) if checked is None else checked
        if bool(all_bad):
            model.raise_for_nonfinite(theta, z)
        if scale is None:
            scale = self._rw_scales(z)
        return SAEMState(theta_u=theta_u, z=z, scale_rw=scale[0], scale_block=scale[1], key=key,
                         s_hat=s_hat, stream=root, cache=cache)

    def _chains_start(self, theta: dict[str, Any], key: Any, root: Any, local: bool = True) -> tuple:
        """``(θ unconstrained, key, z, RW scales or None, cache)``: the chains' prior draw (:meth:`_chains_draw`), then
        saemix's RW scales (``local``: one process) and the chains' cache (:meth:`_chains_finish`)."""
        theta_u, key, z = self._chains_draw(theta, key, root)
        return (theta_u, key, z, *self._chains_finish(theta, z, local))

    def _chains_draw(self, theta: dict[str, Any], key: Any, root: Any) -> tuple:
        """``(θ unconstrained, key, z)``: the chains' prior draw.  A compiled program of its own on JAX (issue 14 item
        9), where XLA fuses the arithmetic and contracts ``μ + ω ε`` into fused multiply-adds: the draws differ from
        the eager operations' in their last bit, and a fit's estimates by rounding (≤ 1e-12 relative).  :meth:`init`
        compiles it with the scales, the cache and the check, through ``computed_once``: XLA:CPU fuses a copy of an
        elementwise producer into each consumer, and the draw (its threefry hash and inverse error function, ~575
        instructions) had been copied into seven fusions, a 4175-instruction executable."""
        model, ops = self.model, self.ops
        # the split once in memory: XLA:CPU copied its hash into the draw's fusion too (~160 instructions)
        k_prior, key = ops.computed_once(lambda k: ops.split(k), key)
        if root is None:
            z = model.sample_prior(theta, k_prior, self.num_chains)
        else:  # iteration 0 of the per-unit streams
            eps = self.sim_ops.normal(ops.fold_in(root, 0), (self.num_chains, model.num_units, model.latent_dim))
            z = model.prior_transform(theta, eps)
        return model.unconstrain(theta), key, z

    def _chains_finish(self, theta: dict[str, Any], z: Any, local: bool = True) -> tuple:
        """``(RW scales or None, cache)`` of the chains' start ``z``: saemix's RW scales (``local``: one process, no
        collective) and the chains' cache."""
        cache = self.model.initial_cache(theta, z) if self.carries_cache else None
        return self._rw_scales(z) if local else None, cache

    def _rw_scales(self, z: Any) -> tuple[Any, Any]:
        """saemix rw.init: d_j = 0.5·sd of the prior draws in each coordinate (over every process's units), for the
        component-wise and the block kernel (two arrays: a torch step adapts them in place)."""
        xp, ops = self.ops.xp, self.ops
        sd = xp.std(xp.reshape(ops.gather_units(z, 1), (-1, z.shape[-1])), 0)
        sd = xp.where(sd > 0, sd, 1.0)
        return 0.5 * sd, 0.5 * sd

    @property
    def _start(self) -> Callable[..., tuple]:
        """:meth:`_start_eager` as one compiled program on JAX (keyed on shapes and dtypes, so the persistent
        compilation cache serves it) instead of some thirty eager operations; its outputs are those of the eager
        operations bit for bit (a flag and zeros)."""
        return self.ops.jit(self._start_eager)

    def _start_eager(self, theta: dict[str, Any], z: Any) -> tuple:
        """Whether every initial chain's log-density is non-finite, and the zeroed statistics (their shapes)."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        ll, lp = model.log_densities(theta, z)
        all_bad = xp.all(~xp.isfinite(ll + lp))
        s_hat = None
        if model.has_stats:
            s_hat = ops.tree_map(xp.zeros_like, self._chain_mean_stats(theta, z))
        return all_bad, s_hat

    def distribute(self) -> None:
        """Data-parallel SAEM over the torch.distributed group: this process's model holds a contiguous shard of the
        units (rank order), the default ids are their global indices, the default number of chains is the global
        saemix default, and sums over units are all-reduced (``ops.distributed()``): the statistics, and the
        numerical M-step's objective, gradient and Hessian (:meth:`_numeric_step`)."""
        if self.rng != "per_unit":
            raise ValueError(f"{self.name}: distributed=True needs rng='per_unit' (each unit's draws from its own "
                             "stream, so that the fit does not depend on the number of processes)")
        ops = self.model.ops.distributed()
        n = int(getattr(self.model, "num_real_units", self.model.num_units))  # a padded block: its real units
        counts = [int(c) for c in ops.gather_units(ops.asarray(np.array([n]), dtype=None), 0).tolist()]
        self._total_units = sum(counts)
        offset = sum(counts[:ops.rank])
        self.model = self.model.shard_view(ops, offset, self._total_units)  # e.g. NLME: the global observation count
        if self._num_chains_option is None:
            self.num_chains = default_num_chains(self._total_units)
        if self._unit_ids_option is None:
            self._unit_ids = np.arange(offset, offset + n, dtype=np.int64)
        self.ops = ops

    def unit_axes(self) -> dict[str, int]:
        """The chains ``z [L, N, d]`` (and their model cache ``[L, N]``, when carried) hold the units on axis 1."""
        if self.carries_cache and self.model.cached_density(self.model.init_params()) is not None:
            return {"z": 1, "cache": 1}
        return {"z": 1}

    @property
    def sim_ops(self) -> Any:
        """The shim the MCMC kernels draw through: ``ops``, or its per-unit-stream view (``rng="per_unit"``)."""
        if self.rng != "per_unit":
            return self.ops if self.draw_dtype is None else self.ops.with_draw_dtype(self.draw_dtype)
        return self.ops.per_unit_streams(self.ops.asarray(self._unit_ids))

    def step(self, state: SAEMState, k: Any, phase: Any, randoms: dict[str, Any] | None = None
             ) -> tuple[SAEMState, SAEMInfo]:
        """Iteration k: simulation, stochastic approximation, M-step; a pure function of ``(state, k, phase)``.
        ``randoms``: this iteration's next key and sweep draws made beforehand (:meth:`chunk_randoms`)."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta = model.constrain(state.theta_u)
        if randoms is None:
            key, k_sim, k_m = ops.split(ops.own_key(state.key), 3)
            if state.stream is not None:  # per-unit streams: iteration k's key, folded in per kernel step and unit
                k_sim = ops.fold_in(state.stream, k)
            chain, acc, state = self.simulate(state, theta, k, k_sim, phase)
        else:  # this iteration's next key and draws, made before the chunk's loop
            key = randoms["key"]
            chain, acc, state = self.simulate(state, theta, k, None, phase, randoms=randoms["sweep"])
        objective = xp.mean(ops.all_sum(xp.sum(chain.log_lik + chain.log_prior, -1)))
        # the step size in the model's dtype: torch's schedules give a float64 scalar, which would promote the
        # 0-dim statistics (a residual sum of squares) of a float32 model, and the scale set from them, to float64
        gamma = ops.asarray(self.schedule(k), dtype=ops.dtype)
        state = state._replace(z=chain.z, key=key)
        new_theta_u, s_hat = self.maximize(state, theta, chain.z, gamma, k)
        state = state._replace(theta_u=new_theta_u, s_hat=s_hat)
        return state, SAEMInfo(objective=objective, gamma=gamma, acc=acc,
                               num_nonfinite=ops.all_sum(chain.num_nonfinite))

    # ----- building blocks (overridden by f-SAEM and friends) ----------------------------------------
    def simulate(self, state: SAEMState, theta: dict[str, Any], k: Any, key: Any, phase: Any,
                 randoms: mcmc.SweepRandoms | None = None) -> tuple[mcmc.ChainState, dict[str, Any], SAEMState]:
        """The MCMC step: saemix kernels 1–3 with scale adaptation (:func:`mcmc.saemix_sweep`; ``randoms``: its
        draws, made beforehand from ``key``'s stream by :meth:`chunk_randoms`, for a small chunk whose program size
        matters more than its arithmetic: the sweep then runs its kernels' steps in one loop, the compact program)."""
        model, sim = self.model, self.sim_ops
        if self.rng == "per_unit" or self.draw_dtype is not None:  # the prior's noise from the kernels' stream
            shape = tuple(state.z.shape)

            def sample_prior(kk: Any) -> Any:
                return model.prior_transform(theta, sim.normal(kk, shape))
        else:
            def sample_prior(kk: Any) -> Any:
                return model.sample_prior(theta, kk, self.num_chains)
        cached = model.cached_density(theta) if state.cache is not None else None
        evaluate, rescore = cached if cached is not None else (model.density_evaluator(theta), None)
        minor = self._minor_face(theta, cached)
        transform = None
        if minor is not None:  # the prior draws are transform(normal_units_minor(kk, [L, d, N])): those of sample_prior
            evaluate, rescore, transform = minor
        lines = self._latent_lines() if minor is None and key is not None else None
        if lines is not None:
            key, k_line = sim.split(key)
        chain, scales, acc = mcmc.saemix_sweep(
            sim, key, state.z, (state.scale_rw, state.scale_block), k, self.kernels,
            evaluate=evaluate, sample_prior=sample_prior, cache=state.cache, rescore=rescore,
            prior_transform=transform, randoms=randoms, compact=randoms is not None)
        if lines is not None:  # the model's ridges (NLME's IOV): a Gibbs move along each, after saemix's kernels
            mean, cov = model.prior_moments(theta)
            chain, acc["line"] = mcmc.line_gibbs(sim, k_line, chain, self.ops.asarray(lines), mean,
                                                 self.ops.xp.linalg.inv(cov), evaluate)
        return chain, acc, state._replace(scale_rw=scales[0], scale_block=scales[1], cache=chain.cache)

    def _latent_lines(self) -> Any:
        """The model's :meth:`~LatentModel.latent_lines` (numpy, computed once per model: a backend array made
        inside a compiled step's trace would be that trace's), or None (also with ``line_moves=False``)."""
        if not getattr(self, "line_moves", False):
            return None
        if getattr(self, "_lines_of", None) is not self.model:
            self._lines_of, self._lines = self.model, self.model.latent_lines()
        return self._lines

    def _minor_face(self, theta: dict[str, Any], cached: Any) -> Any:
        """The model's face for a compiled sweep over the chains laid out ``[L, d, N]`` (the same draws;
        :meth:`LatentModel.units_minor_density`), or None where the sweep runs in the ``[L, N, d]`` layout."""
        if cached is None or self.rng != "global" or not self.units_minor_sweep:
            return None
        return self.model.units_minor_density(theta)

    #: the most bytes a compiled chunk's draws made beforehand may take (:meth:`chunk_randoms`); above it each
    #: iteration draws its own: the draws are written once and read back by their iteration, which costs more than
    #: drawing them in the loop once they no longer stay in a core's cache (N = 5000 x 10, 28 MB a chunk: ~10% slower)
    CHUNK_RANDOMS_BYTES = 2 ** 20

    def chunk_randoms(self, phase: Any) -> Callable[[SAEMState, Any], Any] | None:
        """A compiled backend's draws of a whole chunk of iterations made before them: ``prepare(state, ks)`` gives
        each iteration's next key and its sweep's draws stacked over the chunk (``{"key": [K, ...], "sweep": [K,
        M]}``, the draws laid out flat by :func:`mcmc.sweep_draws_from_key_bits`; a :class:`mcmc.SweepRandoms` of
        ``[K, ...]`` where the keys are not raw threefry data), or None where a step draws its own (the sweep in the
        ``[L, N, d]`` layout, per-unit streams, an engine whose simulation is not SAEM's, draws over
        :data:`CHUNK_RANDOMS_BYTES`).

        The same numbers as the steps' own: the key chain ``key_k, k_sim = split(key_{k−1}, 3)[:2]``, then each
        iteration's :func:`mcmc.sweep_randoms` of ``k_sim``: the key chain's splits in a loop, then each iteration's
        key bits (:func:`mcmc.stacked_sweep_key_bits`, one hash in a loop of two passes) and every normal and uniform
        in one threefry pass over the chunk's keys, or vectorised over the chunk.  Drawn inside the loop, each of an
        iteration's dozen threefry hashes (the key splits, normals and uniforms) was a fusion of ~150 HLO instructions
        that XLA:CPU also copied into several consumers: ~2000 of the theophylline chunk's 4800 instructions, whose
        deserialisation is most of a warm process's loading time (issue 14 item 9); the key bits' two passes as one
        hash: 2525 -> 2416."""
        ops = self.ops
        if not ops.jittable or self.rng != "global" or type(self).simulate is not SAEM.simulate \
                or not sum(self.kernels) or self._latent_lines() is not None:  # kernels (0, 0, 0): no draws
            return None
        if not self.units_minor_sweep or type(self.model).units_minor_density is LatentModel.units_minor_density:
            return None  # a model without the units-minor face (Pyro, NumPyro, ...): prepare could never draw
        model, sim, kernels = self.model, self.sim_ops, self.kernels

        def prepare(state: SAEMState, ks: Any) -> dict[str, Any] | None:
            theta = model.constrain(state.theta_u)
            cached = model.cached_density(theta) if state.cache is not None else None
            if state.stream is not None or self._minor_face(theta, cached) is None:
                return None
            num = int(ks.shape[0])
            L, n, d = (int(s) for s in state.z.shape)
            n1, n2, n3 = kernels
            size = num * L * n * ((n1 + n3) * d + n2 * d + n1 + n2 * d + n3) * np.dtype(ops.dtype).itemsize
            if size > self.CHUNK_RANDOMS_BYTES:
                return None

            key0 = ops.own_key(state.key)
            merged = hasattr(sim, "threefry_hash") and sim.raw_threefry(key0)
            # the key chain in a loop: its outputs are the loop's, which XLA:CPU cannot copy into their consumers (a
            # small elementwise producer is copied into each)
            empty_keys = ops.xp.zeros((num,) + tuple(key0.shape), dtype=key0.dtype)

            def chain(i: Any, carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
                key, keys, sims = carry
                # the split once in memory: XLA:CPU copied its hash into the sweep's key split too (~160 instructions)
                key, k_sim, _ = ops.computed_once(lambda k: ops.split(k, 3), key)
                return key, ops.put_block(keys, i, key[None]), ops.put_block(sims, i, k_sim[None])

            _, keys, sims = ops.fori_loop(0, num, chain, (key0, empty_keys, empty_keys))
            if merged:  # each iteration's key bits (two passes as one hash in a loop: one copy of the hash), then
                # every draw of the chunk in one hash, laid out flat (the steps unpack their row)
                sims = mcmc.stacked_sweep_key_bits(sim, sims, kernels, d)
                sweep = mcmc.sweep_draws_from_key_bits(sim, sims, kernels, (L, d, n), sim.draw_dtype or ops.dtype,
                                                       ops.dtype)
            else:
                sweep = ops.stacked_draws(lambda kk: mcmc.sweep_randoms(sim, kk, kernels, (L, d, n)), sims)
            return {"key": keys, "sweep": sweep}

        return prepare

    def _chain_mean_stats(self, theta: dict[str, Any], z: Any, cache: Any = None) -> dict[str, Any]:
        """``Σ_i mean_chains S(z_i, y_i)`` (statistics summed over units; ``cache``: the chains' model cache)."""
        ops, xp = self.ops, self.ops.xp
        stats = self.model.stats(theta, z) if cache is None else self.model.stats(theta, z, cache=cache)
        return {n: xp.mean(ops.all_sum(xp.sum(v, 1)), 0) for n, v in stats.items()}

    def maximize(self, state: SAEMState, theta: dict[str, Any], z: Any, gamma: Any,
                 k: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """SA of the statistics and M-step (skipped while γ = 0)."""
        model, xp = self.model, self.ops.xp
        theta_u = state.theta_u
        s_hat = None
        new_theta = dict(theta)
        if model.has_stats:
            stats = self._chain_mean_stats(theta, z, state.cache)
            s_hat = {n: state.s_hat[n] + gamma * (stats[n] - state.s_hat[n]) for n in stats}
            closed = model.m_step(s_hat, theta, self._total_units)
            closed = self._anneal(closed, theta, k)
            new_theta.update(closed)
        numeric = model.numeric_params
        if numeric:
            new_theta = self._numeric_step(new_theta, z, gamma, numeric)
        new_theta_u = dict(theta_u)
        new_theta_u.update(model.unconstrain({n: new_theta[n] for n in new_theta if n in model.closed_form_params
                                              or n in numeric}))
        active = gamma > 0
        new_theta_u = {n: xp.where(active, v, theta_u[n]) for n, v in new_theta_u.items()}
        if s_hat is not None:
            s_hat = {n: xp.where(active, v, state.s_hat[n]) for n, v in s_hat.items()}
        return new_theta_u, s_hat

    def _result(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._result(*args, **kwargs)
        if not result.interrupted:
            for msg in self.wandering_variances(result.history) + self.drifting_parameters(result.history):
                warnings.warn(f"{self.name}: {msg}", ConvergenceWarning, stacklevel=user_stacklevel())
        return result

    def drift_window(self) -> tuple[int, int, int]:
        """``(start, first, last)``: the drift check reads the exploration iterations ``first+1 .. last`` (1-based),
        the last quarter of K1, and estimates their autocorrelation from ``start+1 .. last``, the iterations after
        the annealing and the burn-in."""
        sch = self.schedule
        last = sch.K1
        start = max(sch.sa_iters, sch.burn_in)
        return start, max(start, last - last // 4), last

    def drift_statistics(self, history: dict[str, Any]) -> dict[str, tuple[float, float]]:
        """``{label: (rise, se)}`` of each parameter's trajectory over :meth:`drift_window` (each entry of an array
        parameter, a covariance matrix's diagonal; a positive parameter on the log scale, so that its rise is
        relative): the least-squares line's rise over the window and its AR(1)-corrected standard error, ρ from the
        iterations after the annealing (:func:`~latentfit.inference.driver.final_trend` ``context=``).  Empty when
        the window has fewer than 20 iterations."""
        start, first, last = self.drift_window()
        out: dict[str, tuple[float, float]] = {}
        if last - first < 20:
            return out
        for name, info in self.model.params.items():
            values = history.get(f"theta.{name}")
            if values is None or len(values) < last:
                continue
            values = np.asarray(values, dtype=float)
            if getattr(info, "anneal", None) == "cov" and values.ndim == 3:
                values = np.diagonal(values, 0, -2, -1)
            values = values.reshape(len(values), -1)[start:last]
            for j in range(values.shape[1]):
                x = values[:, j]
                if not np.all(np.isfinite(x)) or np.ptp(x) == 0:
                    continue
                if np.all(x > 0):
                    x = np.log(x)
                rise, se = final_trend(x[first - start:], share=1.0, context=x)
                out[name if values.shape[1] == 1 else f"{name}[{j}]"] = (float(rise), float(se))
        return out

    def drifting_parameters(self, history: dict[str, Any]) -> list[str]:
        """A message naming the parameters still drifting at the end of the exploration phase: over its last
        quarter (γ = 1, the annealing over; :meth:`drift_window`) the least-squares line of the trajectory rises
        (or falls) by more than :data:`DRIFT_SIGMAS` AR(1)-corrected standard errors (:meth:`drift_statistics`).
        A converged exploration fluctuates about the maximum; a drift means the chains or the parameters were still
        travelling when the smoothing phase (γ = 1/(k − K1)) froze them, short of the maximum.  Example: IOV on ka
        and CL with saemix's kernels alone (``line_moves=False``), N = 80 × 3 occasions: CL still +5% (t = 7.3) and
        ω²_CL −24% (t = −5.1) over iterations 226-300, γ²_CL ending 3.6 SE too high.  On AR(1) noise
        (ρ = 0.95-0.98, 75 iterations) |t| > 5 in 0.7-1% of the draws."""
        found = [f"{label} {rise:+.3g} (t = {rise / se:+.1f})"
                 for label, (rise, se) in self.drift_statistics(history).items() if abs(rise) > DRIFT_SIGMAS * se]
        if not found:
            return []
        _, first, last = self.drift_window()
        k1, k2 = self.schedule.K1, self.schedule.K2
        return [f"the estimates were still drifting at the end of the exploration phase (iterations {first + 1}-"
                f"{last}, γ = 1): " + ", ".join(found) + " (each one's rise over those iterations, relative (log) "
                "for a positive parameter, and its t against the iterations' autocorrelated noise); the smoothing "
                f"phase froze them short of the maximum: rerun with more exploration iterations (num_iters=({3 * k1}, "
                f"{k2})) or engine='fsaem'"
                + (" or line_moves=True (a model with IOV: a move along its η/κ ridge)"
                   if self._latent_lines() is None and getattr(self.model, "latent_lines", lambda: None)() is not None
                   else "")
                + ", and look at fit.plot_convergence()"]

    def wandering_variances(self, history: dict[str, Any]) -> list[str]:
        """Messages about the annealed variances (NLME's ω², Ω's diagonal) whose estimate carries a large Monte-Carlo
        error: over the second half of the exploration iterations after the annealing (``3K1/4 < k ≤ K1`` by default,
        γ = 1) the sd of their log exceeded :data:`WANDER_LOG_SD`.  The first half is left out: there a variance the
        annealing held up is still coming down (dispersed starts with doubled ω², K1 = 150: theophylline's ω²_V fell
        over a factor 10 after iteration 75, converging, not wandering).

        Why: with γ = 1 each iteration's ω² is the M-step of that iteration's draws alone, a noisy EM map.  A variance
        the data identify weakly (each unit's posterior close to its prior, most of the information missing) is one
        EM moves slowly: the map's slope is near 1, so the noise accumulates (an AR(1) whose stationary sd grows as
        1/sqrt(1 − slope²)), and near 0 the slope tends to 1 and the log's noise drifts it down.  The smoothing phase
        (γ = 1/(k − K1)) then barely moves such a variance (its bias decays like (k − K1)^−(1 − slope)): the estimate
        stays about where the exploration left it, anywhere in the range it wandered over.  On the README's
        ``emax_score`` model (N = 40, saemix's ⌈50/N⌉ = 2 chains) ω²_S's log had sd 0.39-1.16 over 6 seeds, its
        estimate 0.0003-0.043 and the log-likelihood up to 2 units below the maximum; with 10 chains sd 0.12-0.26,
        all within 0.2 of the maximum.  Well identified variances measure 0.02-0.45 (the other three of that model,
        2 chains), 0.1-0.23 (theophylline, 5 chains)), about sqrt(2 / (N L)) for N L draws."""
        sch = self.schedule
        last = sch.K1
        first = (max(sch.sa_iters, sch.burn_in) + last) // 2  # iterations first+1 .. last, 1-based
        if last - first < 20:
            return []
        out = []
        for name, info in self.model.params.items():
            kind = getattr(info, "anneal", None)
            values = history.get(f"theta.{name}")
            if kind not in ("var", "std", "cov") or values is None:
                continue
            values = np.asarray(values, dtype=float)
            if len(values) < last:
                continue
            if kind == "cov":
                values = np.diagonal(values, 0, -2, -1)
            values = values.reshape(len(values), -1)
            window = values[first:last]
            with np.errstate(divide="ignore", invalid="ignore"):
                logs = np.log(window) * (2.0 if kind == "std" else 1.0)
            for j in range(values.shape[1]):
                if not np.all(np.isfinite(logs[:, j])):
                    continue
                sd = float(np.std(logs[:, j]))
                if sd <= WANDER_LOG_SD:
                    continue
                label = name if values.shape[1] == 1 else f"{name}[{j}, {j}]" if kind == "cov" else f"{name}[{j}]"
                spread = math.exp(float(logs[:, j].max() - logs[:, j].min()))
                med = float(np.median(window[:, j]))
                out.append(f"the estimate of {label} carries a large Monte-Carlo error: over the exploration "
                           f"iterations {first + 1}-{last} (γ = 1, the annealing over) it wandered over a factor "
                           f"{spread:.3g} (sd of its log {sd:.2f} > {WANDER_LOG_SD}; median {med:.3g}) and the fit "
                           f"ends at {values[-1, j]:.3g}: a variance the data identify weakly moves slowly under EM, "
                           f"so the smoothing phase keeps about where the exploration left it, and the fit may end "
                           f"below the maximum; rerun with more chains (num_chains=, e.g. 10) or compare fits from "
                           f"several seeds (NLME: fit(..., replicates=4))")
        return out

    def _anneal(self, closed: dict[str, Any], theta: dict[str, Any], k: Any) -> dict[str, Any]:
        """``ω²_k = max(0.97 ω²_{k−1}, ω̂²_k)`` during the annealing iterations."""
        if self.schedule.sa_iters <= 0:
            return closed
        xp = self.ops.xp
        annealing = self.schedule.annealing(k)
        factor = self.schedule.anneal_factor
        out = dict(closed)
        for name, value in closed.items():
            kind = self.model.params[name].anneal
            if kind == "std":
                floor = theta[name] * factor ** 0.5
                out[name] = xp.where(annealing, xp.maximum(value, floor), value)
            elif kind == "var":
                out[name] = xp.where(annealing, xp.maximum(value, theta[name] * factor), value)
            elif kind == "cov":
                old_diag = xp.diagonal(theta[name], 0, -2, -1)
                new_diag = xp.diagonal(value, 0, -2, -1)
                target = xp.maximum(new_diag, factor * old_diag)
                # a variance estimated at 0 (or rounded below) has no correlation to keep: that row and
                # column become 0 off the diagonal, rather than 0/0 and the sqrt of a negative ratio
                bad = ~(new_diag > 0)
                scale = xp.sqrt(target / xp.where(bad, 1.0 + 0 * new_diag, new_diag))
                annealed = value * scale[..., :, None] * scale[..., None, :]
                eye = self.ops.asarray(np.eye(value.shape[-1])) > 0
                annealed = xp.where(bad[..., :, None] | bad[..., None, :],
                                    xp.where(eye, target[..., :, None] + 0 * value, 0 * value), annealed)
                out[name] = xp.where(annealing, annealed, value)
        return out

    def _numeric_step(self, theta: dict[str, Any], z: Any, gamma: Any, names: list[str]) -> dict[str, Any]:
        """θ̃ = argmax mean_chains Σ_i log p(y_i, z_i; θ); θ ← θ + γ(θ̃ − θ) in unconstrained space.

        A distributed fit sums the objective over the units of every process: each process differentiates its own
        units' sum and the values, gradients and Hessians are all-reduced in float64 (``newton_maximize(reduce=)``),
        so every process takes the same Newton steps."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta_u = model.unconstrain({n: theta[n] for n in names})
        x0 = flatten(ops, theta_u, names)
        shapes = {n: self._param_shapes[n] for n in names}
        fixed = {n: v for n, v in theta.items() if n not in names}
        # optional model hook: the same objective up to terms constant in `names`, cheaper to evaluate
        hook = getattr(model, "numeric_objective", None)
        prepared = hook(fixed, z, names) if hook is not None else None

        def objective(x):
            th = dict(fixed)
            th.update(model.constrain(unflatten(x, names, shapes)))
            if prepared is not None:
                return prepared(th)
            return xp.mean(xp.sum(model.log_joint(th, z), -1))

        x_new = newton_maximize(ops, objective, x0, num_steps=self.newton_steps,
                                reduce=ops.all_sum if hasattr(ops, "world_size") else None)
        x = x0 + gamma * (x_new - x0)
        out = dict(theta)
        out.update(model.constrain(unflatten(x, names, shapes)))
        return out
