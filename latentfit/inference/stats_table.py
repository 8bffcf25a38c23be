"""Shared core of the EM family: statistic oracles, per-unit tables and the epoch loop.

Every engine of the family (EM, mini-batch / incremental EM, online EM, sEM-VR, FIEM, MCEM,
TTSEM) is the same iteration (Karimi, Wai, Moulines & Lavielle, NeurIPS 2019; Karimi & Li 2021) in *sum form*
(statistics are summed over units, as ``LatentModel.m_step`` expects):

1. a **proxy** ``𝒮^{(t+1)}`` of the full-data statistic ``Σ_i s̄_i(θ^t)`` built from a mini-batch
   ``B_t`` (and, for FIEM, a second independent batch ``J_t``) — the only engine-specific part,
   a :class:`ProxyRule`;
2. the fast step ``S̃^{(t+1)} = S̃^{(t)} + ρ_{t+1} (𝒮^{(t+1)} − S̃^{(t)})`` (for the exact engines
   this is their only step size γ);
3. the slow step ``ŝ^{(t+1)} = ŝ^{(t)} + γ_{t+1} (S̃^{(t+1)} − ŝ^{(t)})`` (two-timescale engines only;
   otherwise ``ŝ = S̃``);
4. the M-step ``θ^{t+1} = θ̄(ŝ^{(t+1)})`` (closed form from the model).

The per-unit statistic ``s̄_i(θ)`` (as compact per-unit *rows* the statistics depend on linearly,
``model.reduce_rows`` giving the sums) comes from an *oracle*: exact (``model.expected_stats``) or
Monte Carlo (mean of ``S(z_{i,m}, y_i)`` over ``num_samples`` draws, exact posterior draws when the
model has a sampler, otherwise warm-started batched MH chains).

One driver step is one **epoch**: ``m = ⌈n/b⌉`` inner iterations over mini-batches of a fresh
permutation (the last batch wraps around), so history and progress count epochs (n unit visits);
inner iterations run through ``ops.fori_loop`` (on JAX a compiled loop: an epoch is one program, carrying θ, the
tables and the key).  Per-unit tables are ``[n, ...]`` arrays on the data's device in the model's dtype, updated in
place (``ops.scatter_owned`` / ``ops.put_block``; inside a compiled epoch a write is carried to the next inner
iteration, :meth:`StatEngine.put_rows`, so that XLA never copies a table).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import mcmc, restarts
from .driver import Engine, replace_fields, state_field
from .model import LatentModel, ModelSpecificationError
from .results import FitResult
from .schedules import Schedule, constant
from .units import UnitBlock, put_units, read_units, take_units

#: a variance-reduced step out of the M-step's domain: its control variate halved at most this many times, then
#: dropped (:meth:`StatEngine.fast_step`)
CV_HALVINGS = 10

#: ``batching="auto"`` cuts shuffled units into contiguous blocks from this many units on (below it the
#: random gathers of a mini-batch stay in cache and cost little)
BLOCKS_FROM_UNITS = 65536

Stats = dict[str, Any]


class StatState(NamedTuple):
    """What the next epoch of an EM-family engine needs (``None``: a field this engine does not use)."""

    #: θ^t, constrained, by parameter
    theta: dict[str, Any]
    #: the random stream (a JAX key or a ``torch.Generator``)
    key: Any
    #: the proxy rule's record: its per-unit tables and their sums (:class:`ProxyRule`; None for online EM)
    memory: Any = None
    #: ``S̃^{(t)}``, the statistics after the fast step ρ
    s_tilde: Stats | None = None
    #: ``ŝ^{(t)}``, after the slow step γ (two-timescale engines)
    s_hat: Stats | None = None
    #: Monte-Carlo oracle without an exact posterior sampler: the persistent MH chains ``[n, L, d]``
    z: Any = None
    #: their component-wise random-walk scales ``[d]``
    rw_scale: Any = None
    #: proposals rejected for a NaN/inf log-density during the current epoch
    num_nonfinite: Any = None


class EpochInfo(NamedTuple):
    """What a user may look at after each epoch (the history; ``None`` fields are not recorded)."""

    #: exact EM: ``Σ_i log p(y_i; θ)`` at the θ of the epoch's E-step (free with the E-step)
    objective: Any = None
    #: ``track_log_lik``: the exact marginal log-likelihood after the epoch (one extra pass)
    log_lik: Any = None
    #: MH proposals rejected for a NaN/inf log-density in the epoch
    num_nonfinite: Any = None
    #: ``trace_params``: those parameters after every inner iteration ``[m, ...]``
    inner: dict[str, Any] | None = None


class PendingRows(NamedTuple):
    """Rows of a per-unit table whose write is carried to the next inner iteration of a compiled epoch
    (:meth:`StatEngine.put_rows`)."""

    #: the table ``{name: [n, ...]}`` before the write
    table: Stats
    #: where the rows go: a block's first unit (contiguous blocks) or the units' indices ``[b]``
    at: Any
    #: the rows ``{name: [b, ...]}``
    rows: Stats


# ----- statistic pytrees (dicts of arrays) -----------------------------------------------------------
def s_sub(a: Stats, b: Stats) -> Stats:
    return {k: a[k] - b[k] for k in a}


def s_scale(a: Stats, c: Any) -> Stats:
    return {k: c * v for k, v in a.items()}


def s_axpy(c: Any, x: Stats, y: Stats) -> Stats:
    """``y + c x``."""
    return {k: y[k] + c * x[k] for k in y}


def s_take(ops: Any, table: Stats, idx: Any) -> Stats:
    return {k: take_units(ops, v, idx, 0) for k, v in table.items()}


def s_read(ops: Any, table: Stats, idx: Any) -> Stats:
    """:func:`s_take` for rows read at once (a block is a view of the table on eager backends, no copy): the old rows
    of a mini-batch, read before the table's write."""
    return {k: read_units(ops, v, idx, 0) for k, v in table.items()}


def s_put(ops: Any, table: Stats, idx: Any, rows: Stats) -> Stats:
    """``table[idx] = rows`` for every statistic (the engine owns its tables)."""
    return {k: put_units(ops, v, idx, rows[k]) for k, v in table.items()}


def s_copy(ops: Any, a: Stats) -> Stats:
    """A copy the caller owns (JAX arrays are immutable: no copy needed)."""
    return {k: v.clone() if hasattr(v, "clone") else v for k, v in a.items()}


def start_chain(ops: Any, z_tab: Any, units: Any, evaluate: Any,
                chain: mcmc.ChainState | None = None) -> mcmc.ChainState:
    """The units' chains ``[L, b, d]`` from the table ``z_tab [n, L, d]``, evaluated; or ``chain``, the same chains
    as the previous sweep at the same θ left them, with its fault count reset (a count is added to the state once)."""
    if chain is None:
        return mcmc.init_chain_state(ops.xp.swapaxes(take_units(ops, z_tab, units, 0), 0, 1), evaluate)
    return chain._replace(num_nonfinite=chain.num_nonfinite * 0.0)


def default_fast_step(num_units: int, batch_size: int) -> float:
    """``ρ = (n/b)^(−2/3)`` (FIEM / sEM-VR / TTSEM papers' practical default, per mini-batch)."""
    return min(1.0, (num_units / batch_size) ** (-2.0 / 3.0))


# ----- proxies ----------------------------------------------------------------------------------------
class ProxyRule:
    """How an engine forms ``𝒮^{(t+1)}`` (one file per engine defines one, with its memory record)."""

    #: a second, independent mini-batch J_t per iteration (FIEM)
    needs_second_batch: bool = False
    #: fields of the rule's memory record holding one row per unit on axis 0 (split over devices / processes)
    unit_tables: tuple[str, ...] = ()
    #: those of them whose rows ``proxy`` writes once per inner iteration, through :meth:`StatEngine.put_rows`
    rows_written: tuple[str, ...] = ()

    def init(self, eng: StatEngine, theta: dict[str, Any], full: Stats | None, rows: Stats | None) -> Any:
        """The rule's memory record (None: memoryless); ``full = Σ_i s̄_i(θ⁰)``, ``rows`` its per-unit table."""
        return None

    def epoch_start(self, eng: StatEngine, state: StatState, theta: dict[str, Any], key: Any) -> StatState:
        return state

    def proxy(self, eng: StatEngine, state: StatState, theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, StatState]:
        raise NotImplementedError

    def objective(self, state: StatState) -> Any:
        """What the epoch reports as ``objective`` (exact EM: the log-likelihood of its E-step); None: nothing."""
        return None


# ----- the engine -------------------------------------------------------------------------------------
class StatEngine(Engine):
    """Base of the EM family: epochs of mini-batch proxies, fast/slow steps and a closed-form M-step.

    Parameters
    ----------
    model : LatentModel
        With ``m_step`` (closed form) and ``expected_stats`` (exact engines) or ``stats`` and either
        ``sample_posterior`` or MH-able latents (Monte-Carlo engines).
    num_epochs : int
        Epochs (n unit visits each); the unit of progress and history.
    batch_size : int, optional
        Mini-batch size b (engine default when None).
    rho, gamma : float or callable of the inner iteration t (1-based), optional
        Fast step (the step of the exact engines) and slow step (two-timescale engines).
    shuffle : bool
        Visit units in a fresh random permutation each epoch (True) or in index order.
    batching : {"auto", "random", "blocks"}
        How shuffled mini-batches are drawn.  ``"random"``: a fresh permutation of the units cut into
        batches every epoch (random gathers).  ``"blocks"``: the units are shuffled once, when the engine is
        built, from its ``seed`` (the model's ``permuted_units``), and cut into contiguous blocks, visited in a
        fresh random order every epoch, so a batch is a slice of the data and of the per-unit tables
        (:mod:`latentfit.inference.units`).
        ``"auto"``: blocks when the model can reorder its units and n ≥ ``BLOCKS_FROM_UNITS``.
    num_samples : int
        Monte-Carlo draws per unit visit (MC engines).
    mcmc_steps : int
        MH sweeps per visit when the model has no exact posterior sampler (MC engines).
    trace_params : list of str, optional
        Record these parameters after *every* inner iteration (history ``inner.<name>``,
        ``[epochs, m, ...]``): for rates measured in iterations.
    track_log_lik : bool
        Record the exact marginal log-likelihood after each epoch (one extra pass).
    callback : callable, optional
        ``callback(epoch, record)`` after each epoch, ``record`` its history row; returning True (or raising
        ``StopIteration``) stops the fit after that epoch, an ordinary result of that many epochs
        (:mod:`~latentfit.inference.driver`).
    n_init : int
        Starts fitted (scikit-learn's ``n_init``; a model with random starts, ``GaussianMixture``: k-means++ from seeds
        ``seed, seed + 1, ...``), the one with the largest final log-likelihood returned, each start's in
        ``fit.restarts`` (:mod:`~latentfit.inference.restarts`).
    """

    name = "stat-engine"
    rule: ProxyRule = ProxyRule()
    monte_carlo: bool = False
    two_timescale: bool = False
    #: default mini-batches per epoch when ``batch_size`` is not given (None: full batch, b = n)
    batches_per_epoch: int | None = None
    #: the default mini-batch has at least this many units (or all n)
    min_batch_size: int = 1
    #: initial full pass and table (False for EM / MCEM, which need neither)
    needs_init_pass: bool = True
    needs_table: bool = True

    def __init__(self, model: LatentModel, num_epochs: int = 20, batch_size: int | None = None, *,
                 rho: float | Schedule | None = None, gamma: float | Schedule | None = None,
                 seed: int = 0, shuffle: bool = True, batching: str = "auto", num_samples: int = 10,
                 mcmc_steps: int = 2,
                 trace_params: list[str] | tuple[str, ...] | None = None, track_log_lik: bool = False,
                 progress: bool = True, callback: Any = None, chunk_size: int = 25, n_init: int = 1) -> None:
        super().__init__(model, seed=seed, progress=progress, callback=callback, num_draws=0,
                         chunk_size=chunk_size)
        self.validate_options(num_epochs=num_epochs, batch_size=batch_size, num_samples=num_samples, n_init=n_init)
        #: starts fitted, the best kept (:mod:`~latentfit.inference.restarts`); the start of the current restart
        self.n_init = restarts.check_n_init(n_init)
        self._start_theta: dict[str, Any] | None = None
        n = int(model.num_units)
        if n < 1:
            raise ModelSpecificationError("the model has no units (empty data)")
        batch_option = batch_size
        if batch_size is None:
            batch_size = self.default_batch_size(n)
        b = int(batch_size)
        if b > n:
            raise ValueError(f"batch_size={b} exceeds the number of units n={n}")
        self.num_epochs = int(num_epochs)
        self.batch_size = b
        self.num_batches = math.ceil(n / b)
        self.shuffle = bool(shuffle)
        #: units of the whole fit and this process's first unit (a distributed fit: :meth:`distribute`)
        self._total_units, self._unit_offset, self._distributed = n, 0, False
        self._options = {"batch_size": batch_option, "rho": rho, "gamma": gamma, "batching": batching}
        if batching not in ("auto", "random", "blocks"):
            raise ValueError(f"batching must be 'auto', 'random' or 'blocks', got {batching!r}")
        can_reorder = callable(getattr(model, "permuted_units", None))
        if batching == "blocks" and not can_reorder:
            raise ModelSpecificationError(
                f"batching='blocks' needs a model that can reorder its units (model.permuted_units); "
                f"{type(model).__name__} cannot: use batching='random'")
        self.blocks = self.shuffle and self.num_batches > 1 and can_reorder and (
            batching == "blocks" or (batching == "auto" and n >= BLOCKS_FROM_UNITS))
        self.user_model = model  # what the fit's result holds; the steps work on ``self.model``
        if self.blocks:  # one shuffle, when the engine is built: batches are contiguous blocks of the shuffled view
            self.model = model.permuted_units(model.ops.permutation(model.ops.key(self.seed), n))
        self.num_samples = int(num_samples)
        self.mcmc_steps = int(mcmc_steps)
        self.trace_params = list(trace_params or [])
        self.track_log_lik = bool(track_log_lik)
        self.rho = _as_schedule(rho if rho is not None else self.default_rho(n, b))
        self.gamma = _as_schedule(gamma if gamma is not None else self.default_gamma(n, b))
        self._check_model()
        restarts.check_restartable(self.name, model, self.n_init)
        unknown = [p for p in self.trace_params if p not in model.params]
        if unknown:
            raise ValueError(f"trace_params {unknown} are not parameters of the model ({list(model.params)})")

    # ----- defaults and validation --------------------------------------------------------------------
    def default_batch_size(self, n: int) -> int:
        """``⌈n / batches_per_epoch⌉`` units, at least ``min_batch_size`` (at most n); without
        ``batches_per_epoch``, n."""
        if not self.batches_per_epoch:
            return n
        return max(-(-n // self.batches_per_epoch), min(n, self.min_batch_size))

    def default_rho(self, n: int, b: int) -> float | Schedule:
        return 1.0

    def default_gamma(self, n: int, b: int) -> float | Schedule:
        return 1.0

    @staticmethod
    def validate_options(*args: Any, num_epochs: int = 20, batch_size: int | None = None,
                         num_samples: int = 10, n_init: int = 1, **_: Any) -> None:
        if args:
            num_epochs = args[0]
        if len(args) > 1:
            batch_size = args[1]
        if int(num_epochs) < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        restarts.check_n_init(n_init)

    def _check_model(self) -> None:
        model = self.model
        if self.monte_carlo:
            if not model.has_stats:
                reason = getattr(model, "no_stats_reason", None)
                if reason:
                    raise ModelSpecificationError(reason)
                raise ModelSpecificationError(
                    f"{self.name} needs sufficient statistics (model.stats / m_step); no closed-form "
                    "statistic was found for this model")
        elif not model.has_expected_stats:
            reason = getattr(model, "no_stats_reason", None)
            raise ModelSpecificationError(
                reason or f"{self.name} needs an exact E-step (model.expected_stats): discrete latents with "
                "enumeration or a model family that supplies it; for continuous latents use MCEM, "
                "MiniBatchMCEM, TTSEM or SAEM")
        numeric = model.numeric_params
        if numeric:
            raise ModelSpecificationError(
                f"{self.name} needs a closed-form M-step for every parameter; {numeric} have none "
                "(use SAEM, which maximises them numerically)")

    # ----- oracles ---------------------------------------------------------------------------------------
    def oracle(self, state: StatState, theta: dict[str, Any], units: Any, key: Any) -> tuple[Stats, StatState]:
        """Per-unit statistics ``s̄_i(θ)`` (exact) or their MC estimate, ``[b, ...]`` each."""
        model, xp = self.model, self.ops.xp
        if not self.monte_carlo:
            return model.expected_rows(theta, units), state
        if model.has_posterior_sampler:
            z = model.sample_posterior(theta, key, self.num_samples, units)
            return {k: xp.mean(v, 0) for k, v in model.stats_rows(theta, z, units).items()}, state
        return self._mcmc_oracle(state, theta, units, key)

    def reduce(self, rows: Stats, units: Any) -> Stats:
        """``Σ_{i∈units}`` of the statistics whose per-unit rows are ``rows`` (model.reduce_rows), over the units of
        every process in a distributed fit (``ops.all_sum``: float64 all-reduce)."""
        return self._all_sum(self.model.reduce_rows(rows, units))

    def _all_sum(self, stats: Stats) -> Stats:
        return {k: self.ops.all_sum(v) for k, v in stats.items()}

    def full_pass(self, state: StatState, theta: dict[str, Any],
                  key: Any) -> tuple[Stats, Stats | None, Any, StatState]:
        """``(Σ_i s̄_i(θ), per-unit rows or None, Σ_i log p(y_i; θ) or None, state)`` over all units."""
        ops = self.ops
        if not self.monte_carlo and not self.needs_table:
            total, ll = self.model.sum_expected_stats(theta, None)
            return self._all_sum(total), None, None if ll is None else ops.all_sum(ll), state
        if not self.monte_carlo:  # the rows and their sum in one pass (all units as None: no gather of every row)
            rows, total = self.model.expected_rows_and_sum(theta, None)
            return self._all_sum(total), rows, None, state
        # MH chains are read from their table by index
        chains = self.monte_carlo and not self.model.has_posterior_sampler
        rows, state = self.oracle(state, theta, ops.arange(self.model.num_units) if chains else None, key)
        return self.reduce(rows, None), rows, None, state

    def _mcmc_oracle(self, state: StatState, theta: dict[str, Any], units: Any,
                     key: Any) -> tuple[Stats, StatState]:
        """Warm-started MH chains (num_samples per unit): statistics at the chains' new states."""
        z, state = self._advance_chains(state, theta, units, key)
        stats = self.model.stats_rows(theta, z, units)
        return {k: self.ops.xp.mean(v, 0) for k, v in stats.items()}, state

    def _advance_chains(self, state: StatState, theta: dict[str, Any], units: Any,
                        key: Any) -> tuple[Any, StatState]:
        """``mcmc_steps`` sweeps (prior-IMH, component-wise RW) of the units' persistent chains: ``[L, b, d]``."""
        chain, state = self._sweep_chains(state, theta, units, key)
        return chain.z, state

    def _sweep_chains(self, state: StatState, theta: dict[str, Any], units: Any, key: Any,
                      chain: mcmc.ChainState | None = None) -> tuple[mcmc.ChainState, StatState]:
        """:meth:`_advance_chains` returning the chains' final :class:`~latentfit.inference.mcmc.ChainState`.
        ``chain``: the units' chains as the previous sweep at the same θ left them (their densities are not
        re-evaluated: the same values; its fault count is not counted again)."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        z_tab = state_field(state, "z")  # [n, L, d]

        def evaluate(z):
            return model.log_densities(theta, z, units)

        def sample_prior(kk):
            return model.sample_prior(theta, kk, self.num_samples, units)

        chain = start_chain(ops, z_tab, units, evaluate, chain)
        keys = ops.split(key, 2 * self.mcmc_steps + 1)
        scale = state_field(state, "rw_scale")
        for s in range(self.mcmc_steps):
            chain, _ = mcmc.prior_imh(ops, keys[2 * s], chain, sample_prior, evaluate)
            chain, acc = mcmc.rw_componentwise(ops, keys[2 * s + 1], chain, scale, evaluate)
            scale = mcmc.adapt_scale(scale, acc)
        state = replace_fields(state, z=put_units(ops, z_tab, units, xp.swapaxes(chain.z, 0, 1)), rw_scale=scale,
                               num_nonfinite=state_field(state, "num_nonfinite") + chain.num_nonfinite)
        return chain, state

    def _initial_chains(self, theta: dict[str, Any], key: Any) -> Any:
        """The MH chains' starting draws ``[L, n, d]`` from the prior (mcem's per-unit streams override it)."""
        return self.model.sample_prior(theta, key, self.num_samples)

    # ----- M-step ------------------------------------------------------------------------------------------
    def m_step(self, s: Stats, theta: dict[str, Any]) -> dict[str, Any]:
        new = dict(theta)
        new.update(self.model.m_step(s, theta, self._total_units))
        return new

    def theta_of(self, state: StatState) -> dict[str, Any]:
        return state_field(state, "theta")

    def start_params(self) -> dict[str, Any]:
        """θ⁰: the model's initial values, or the current restart's start (``n_init``)."""
        return self.model.init_params() if self._start_theta is None else dict(self._start_theta)

    # ----- engine protocol ------------------------------------------------------------------------------
    #: a trace reads neither the number of starts nor the current start (θ₀ enters a run through its state)
    _UNTRACED = Engine._UNTRACED | {"n_init", "_start_theta"}

    def _run(self, key: Any = None, **options: Any) -> FitResult:
        """:meth:`Engine._run`; with ``n_init > 1``, that many starts, the best kept
        (:func:`~latentfit.inference.restarts.run_restarts`: ``fit.restarts``)."""
        if self.n_init == 1:
            return super()._run(key, **options)
        return restarts.run_restarts(self, super()._run, key, options)

    def phases(self) -> list[tuple[int, int, Any]]:
        return [(1, self.num_epochs, "epoch")]

    def init(self, key: Any) -> StatState:
        ops = self.ops
        model, xp = self.model, ops.xp
        theta = self.start_params()
        state = StatState(theta=theta, key=key)
        if self.monte_carlo and not model.has_posterior_sampler:
            key, k0 = ops.split(key)
            z = self._initial_chains(theta, k0)  # [L, n, d]
            sd = xp.std(xp.reshape(ops.gather_units(z, 1), (-1, z.shape[-1])), 0)  # every process's draws
            state = state._replace(z=xp.swapaxes(z, 0, 1) + 0.0, rw_scale=0.5 * xp.where(sd > 0, sd, 1.0),
                                   num_nonfinite=ops.zeros(()))
        if self.needs_init_pass:
            key, k1 = ops.split(key)
            full, rows, _, state = self.full_pass(state, theta, k1)
            state = state._replace(memory=self.rule.init(self, theta, full, rows), s_tilde=full,
                                   s_hat=s_copy(ops, full) if self.two_timescale else None)
        else:
            state = state._replace(memory=self.rule.init(self, theta, None, None))
        return state._replace(key=key)

    def unit_axes(self) -> dict[str, Any]:
        """The rule's per-unit tables (fields of ``memory``) and the MH chains ``z [n, L, d]`` hold the units on
        axis 0."""
        axes: dict[str, Any] = {}
        if self.rule.unit_tables:
            axes["memory"] = {name: 0 for name in self.rule.unit_tables}
        if self.monte_carlo and not self.model.has_posterior_sampler:
            axes["z"] = 0
        return axes

    def distribute(self) -> None:
        """Data-parallel fit over the torch.distributed group (exact E-steps).

        This process's model holds a contiguous shard of the units (rank order; ``model.shard_view`` makes it
        consistent with the whole data, e.g. a mixture's centring and initial values).  Every process draws the
        same *global* mini-batches of unit indices (torch's generator, seeded alike on every process: the
        permutations are the one-process fit's), computes the statistics of the units of the batch it owns,
        and the sums are all-reduced in float64, so the trajectory is the one-process fit's up to the order of
        the sums.  Batch size and step-size defaults follow the global number of units.  Monte-Carlo engines
        need per-unit streams (MCEM, MiniBatchMCEM, TTSEM, MISSO with ``rng="per_unit"``:
        :mod:`~latentfit.inference.mcem`).
        """
        if self.monte_carlo and getattr(self, "rng", "global") != "per_unit":
            raise ValueError(f"{self.name}: distributed=True supports the exact engines of the EM family (EM, "
                             "MiniBatchEM, IEM, FIEM, SEMVR, SEM) and MCEM / MiniBatchMCEM with rng='per_unit' "
                             "(each unit's draws from its own stream; TTSEM and MISSO too); other Monte-Carlo "
                             "E-steps are not supported")
        if self._options["batching"] == "blocks":
            raise ValueError(f"{self.name}: batching='blocks' shuffles the units of one process; a distributed fit "
                             "draws random mini-batches (batching='random' or 'auto')")
        base = self.user_model.ops
        ops = base.distributed()
        n = int(getattr(self.user_model, "num_real_units", self.user_model.num_units))  # a padded block: real units
        counts = [int(c) for c in ops.gather_units(ops.asarray(np.array([n])), 0).tolist()]
        total, offset = sum(counts), sum(counts[:ops.rank])
        self.user_model = self.model = self.user_model.shard_view(ops, offset, total)
        self._total_units, self._unit_offset, self._distributed = total, offset, True
        self.blocks = False
        b = self._options["batch_size"]
        if b is None:
            b = self.default_batch_size(total)
        b = int(b)
        if b > total:
            raise ValueError(f"batch_size={b} exceeds the number of units n={total}")
        self.batch_size, self.num_batches = b, math.ceil(total / b)
        rho, gamma = self._options["rho"], self._options["gamma"]
        self.rho = _as_schedule(rho if rho is not None else self.default_rho(total, b))
        self.gamma = _as_schedule(gamma if gamma is not None else self.default_gamma(total, b))
        self.ops = ops

    def _owned(self, units: Any) -> Any:
        """The units of a global mini-batch that this process holds, as its local indices (one process: all).  A
        JAX local fit keeps one shape on every process: the other processes' units become index ``n`` (the model's
        number of units), which the weighed model (:mod:`~latentfit.inference.padding`) counts as 0 and the table
        writes drop."""
        if not self._distributed:
            return units
        lo = self._unit_offset
        n = int(getattr(self.model, "num_real_units", self.model.num_units))
        mine = (units >= lo) & (units < lo + n)
        if self.ops.jittable:
            other = self.model.num_units - (self.jax_local_masks() == "spare")  # the spare dummy unit, or n
            return self.ops.xp.where(mine, units - lo, other)
        return units[mine] - lo

    def real_rows(self, rows: Any, units: Any = None) -> Any:
        """``rows [b, ...]`` of ``units`` (None: all) with the entries of dummy units and of other processes' units (a
        JAX local fit's padded block and masked batches, :mod:`~latentfit.inference.padding`) set to 0: per-unit
        values that the weighed model does not zero (MISSO's anchors); ``rows`` itself otherwise."""
        real = getattr(self.model, "num_real_units", None)
        if real is None:
            return rows
        xp = self.ops.xp
        idx = self.ops.arange(self.model.num_units) if units is None else units
        keep = xp.reshape(idx < int(real), (-1,) + (1,) * (rows.ndim - 1))
        return xp.where(keep, rows, xp.zeros_like(rows))

    #: ``run(distributed="local")`` on JAX: every engine of the family (mini-batches of one static size on every
    #: process, :meth:`_owned`); the Monte-Carlo ones with ``rng="per_unit"`` (:meth:`distribute` refuses the others)
    jax_local_blocks = True

    def jax_local_masks(self) -> bool | str:
        """The units are weighed in a JAX local fit (the other processes' units of a mini-batch weigh 0).  MH chains
        (a Monte-Carlo E-step without an exact posterior sampler): ``"spare"``, the other processes' units of a
        batch name a spare dummy unit (its chain's draws never land on a real unit's, also in a model that
        evaluates a batch through all its units) instead of the index ``n``, which would read and write unit 0's
        and the last unit's chains."""
        if self.monte_carlo and not self.model.has_posterior_sampler:
            return "spare"
        return True

    @property
    def result_model(self) -> LatentModel:
        """Post-fit computations see the user's model, not the shuffled view (θ does not depend on the order)."""
        return self.user_model

    def step(self, state: StatState, k: Any, phase: Any) -> tuple[StatState, EpochInfo]:
        """Epoch k: ``m`` inner iterations over the mini-batches of a fresh permutation.

        Pure in ``(state, k, phase)`` up to the per-unit tables, which a torch step updates in place (as a JAX
        step does with its donated loop carry): the state given to a torch step is consumed.
        """
        ops, xp = self.ops, self.ops.xp
        m = self.num_batches
        if not ops.jittable:
            k = int(k)
        key, k_perm, k_perm2, k_epoch, k_loop = ops.split(ops.own_key(state_field(state, "key")), 5)
        if state_field(state, "num_nonfinite") is not None:  # counted per epoch
            state = replace_fields(state, num_nonfinite=ops.zeros(()))
        state = self.rule.epoch_start(self, replace_fields(state), state_field(state, "theta"), k_epoch)
        batches = self._batches(k_perm)
        batches_j = self._batches(k_perm2) if self.rule.needs_second_batch else batches
        theta0 = state_field(state, "theta")
        trace = {p: ops.zeros((m,) + tuple(theta0[p].shape)) for p in self.trace_params}
        loop_keys = ops.split(k_loop, m)
        positions = ops.arange(m) if trace else None
        first_t = (k - 1) * m

        deferred = self._deferred_tables()
        if deferred:  # the loop carry holds each written table with a pending write (first: batch 0's own rows)
            state = self._pend(state, deferred, batches[0])

        def body(j: Any, carry: tuple[dict[str, Any], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
            st, tr = carry
            st = self._write_pending(st, deferred)
            kj = loop_keys[j]
            bi, bj = batches[j], batches_j[j]
            if self.blocks:
                bi, bj = UnitBlock(bi, self.batch_size), UnitBlock(bj, self.batch_size)
            else:
                bi, bj = self._owned(bi), self._owned(bj)
            st = self.inner(st, bi, bj, first_t + j + 1, kj)
            if tr:
                jj = positions[j:j + 1] if not ops.jittable else xp.reshape(j, (1,))
                tr = {p: ops.scatter_owned(v, jj, state_field(st, "theta")[p][None]) for p, v in tr.items()}
            return st, tr

        if not deferred:
            state, trace = ops.fori_loop(0, m, body, (state, trace))
        else:  # while the loop is traced (the engine's attributes are left as they were)
            self._defer_writes = True
            try:
                state, trace = ops.fori_loop(0, m, body, (state, trace))
            finally:
                del self._defer_writes
        state = replace_fields(self._write_pending(state, deferred), key=key)
        log_lik = None
        if self.track_log_lik and self.model.has_exact_marginal:
            log_lik = ops.all_sum(xp.sum(self.model.marginal_log_lik(state_field(state, "theta"))))
        return state, EpochInfo(objective=self.rule.objective(state), log_lik=log_lik,
                                num_nonfinite=state_field(state, "num_nonfinite"), inner=trace or None)

    # ----- table writes inside a compiled epoch ---------------------------------------------------------------
    #: set while a compiled epoch loop is traced: :meth:`put_rows` returns the write instead of doing it
    _defer_writes: bool = False

    def put_rows(self, table: Stats, units: Any, rows: Stats) -> Stats | PendingRows:
        """``table[units] = rows`` for a table of the rule's memory (the engine owns it).

        Eager backends write in place now.  In a compiled epoch loop (JAX) the write is carried to the start of the
        next inner iteration (a :class:`PendingRows`): every read of the table then follows its only write in data
        order, and XLA updates the loop-carried table in place.  Written at once, the rows read in the same
        iteration (the old rows of the batch, FIEM's second batch) are ordered before the write by nothing that
        survives XLA's fusion, and the compiled loop copied the whole ``[n, ...]`` table twice per mini-batch: FIEM at
        n = 1e5, b = 100 spent 530-580 µs per step instead of 33 µs.
        """
        if self._defer_writes:
            return PendingRows(table, units.start if isinstance(units, UnitBlock) else units, rows)
        return s_put(self.ops, table, units, rows)

    def _deferred_tables(self) -> tuple[str, ...]:
        """The memory fields whose writes a compiled epoch defers (an engine with its own inner iteration, such as
        MISSO, writes its tables itself)."""
        if not self.ops.jittable or type(self).inner is not StatEngine.inner:
            return ()
        return tuple(self.rule.rows_written)

    def _pend(self, state: StatState, fields: tuple[str, ...], first: Any) -> StatState:
        """Each table of ``fields`` with a write of its own rows at the units ``first`` pending (a no-op write that
        gives the loop carry its structure)."""
        units = UnitBlock(first, self.batch_size) if self.blocks else first
        mem = state.memory
        pending = {f: PendingRows(getattr(mem, f), first, s_take(self.ops, getattr(mem, f), units)) for f in fields}
        return state._replace(memory=mem._replace(**pending))

    def _write_pending(self, state: StatState, fields: tuple[str, ...]) -> StatState:
        """The state with the pending writes of ``fields`` done."""
        if not fields:
            return state
        mem, done = state.memory, {}
        for f in fields:
            p = getattr(mem, f)
            at = UnitBlock(p.at, self.batch_size) if self.blocks else p.at
            done[f] = s_put(self.ops, p.table, at, p.rows)
        return state._replace(memory=mem._replace(**done))

    def inner(self, state: StatState, bi: Any, bj: Any, t: Any, key: Any) -> StatState:
        """One inner iteration: proxy, fast step ρ, slow step γ, M-step."""
        theta = state.theta
        proxy, state = self.rule.proxy(self, state, theta, bi, bj, key)
        rho = self.rho(t)
        s_tilde = self.fast_step(state.s_tilde, proxy, rho)
        # keep the state's structure fixed (a compiled loop carry): s_tilde is stored only if kept
        if state.s_tilde is not None or rho is not _ONE:
            state = state._replace(s_tilde=s_tilde)
        s_hat = s_tilde
        if self.two_timescale:
            gamma = self.gamma(t)
            s_hat = s_axpy(gamma, s_sub(s_tilde, state.s_hat), state.s_hat)
            state = state._replace(s_hat=s_hat)
        return state._replace(theta=self.m_step(s_hat, theta))

    def _batches(self, key: Any) -> Any:
        """``[m, b]`` unit indices: a permutation (or 0..n−1) cut in mini-batches, the last wrapping.

        With ``blocks``: ``[m]`` first units of the blocks, in a random order (the last block ends at n and
        overlaps its neighbour when b does not divide n).
        """
        ops, xp, n = self.ops, self.ops.xp, self._total_units
        m, b = self.num_batches, self.batch_size
        if self.blocks:
            starts = ops.permutation(key, m) * b
            return xp.where(starts > n - b, n - b, starts)
        if m == 1 and b == n:  # full batch: the order is irrelevant
            return xp.reshape(ops.arange(n), (1, n))
        order = ops.permutation(key, n) if self.shuffle else ops.arange(n)
        if m * b == n:
            return xp.reshape(order, (m, b))
        pos = ops.arange(m * b) % n
        return xp.reshape(ops.take(order, pos, 0), (m, b))

    def fast_step(self, s_tilde: Stats | None, proxy: Stats | ControlVariate, rho: Any) -> Stats:
        """``S̃ + ρ (𝒮 − S̃)`` (``𝒮`` itself for ρ = 1).

        A variance-reduced proxy (FIEM, sEM-VR: a :class:`ControlVariate`, ``𝒮 = base + c·drift``) is an unbiased
        estimate of ``Σ_i s̄_i(θ)``, which always lies in the M-step's domain (statistics some posterior gives: a mass
        ≥ 0, a positive semi-definite scatter).  Far from the anchor (the first epochs from a crude start, a component
        whose mass moves fast) the step can carry ``S̃`` out of it: a negative mass or an indefinite scatter, where the
        M-step has no maximiser.  Block by block (``model.stats_in_domain``: a mixture's components), the control
        variate's factor is then the largest of ``c, c/2, …, c/2^CV_HALVINGS`` that keeps the new ``S̃`` in the domain,
        else 0 (``S̃ + ρ (base − S̃)``: a convex combination of ``S̃`` and the table's sum of valid per-unit statistics).
        A step that stays in the domain (every step once the drift is small, so the fixed point and the asymptotic
        rule are the paper's; nearly every step with the paper's ρ = n^(−2/3) and b = 1) is left as it is.  A model
        without ``stats_in_domain`` gets the plain step."""
        if isinstance(proxy, ControlVariate):
            base, drift, c = proxy
        else:
            base, drift, c = proxy, None, 0.0
        one = rho is _ONE or s_tilde is None

        def step(f: Any) -> Stats:  # the new S̃ with the control variate's factor f (a scalar, or [..., G, 1, ...])
            target = base if drift is None else {k: v + _blocks(f, v) * drift[k] for k, v in base.items()}
            return target if one else {k: v + rho * (target[k] - v) for k, v in s_tilde.items()}

        full = step(c)
        check = getattr(self.model, "stats_in_domain", None)
        if drift is None or check is None:
            return full
        ok = check(full)
        if ok is None:
            return full
        ops, xp = self.ops, self.ops.xp

        def shrunk(_: Any) -> Stats:
            first = next(iter(drift.values()))
            factors = ops.asarray(c * 0.5 ** np.arange(CV_HALVINGS + 1), dtype=first.dtype)  # [H+1]
            valid = check(_candidates(base, drift, None if one else s_tilde, rho, factors))  # [H+1, G]
            largest = xp.argmax(valid * 1, 0)  # the first (largest) factor in the domain
            return step(xp.where(xp.any(valid, 0), ops.take(factors, largest, 0), 0 * factors[0]))  # [G]

        return ops.cond(xp.all(ok), lambda _: full, shrunk, 0)

    def latent_draw(self, state: StatState) -> Any | None:
        return None

    @property
    def batch_scale(self) -> float:
        """``n / b``: scales a mini-batch sum to a full-data sum (n: the units of every process)."""
        return self._total_units / self.batch_size


class ControlVariate(NamedTuple):
    """A variance-reduced proxy ``𝒮 = base + scale·drift`` as its parts (:meth:`StatEngine.fast_step`)."""

    #: the table's or snapshot's sum ``S̄``
    base: Stats
    #: the mini-batch's summed change ``Σ_{i∈B} (s̄_i(θ) − s_i)``
    drift: Stats
    #: ``n / b``
    scale: Any


def _blocks(f: Any, v: Any) -> Any:
    """A factor per block ``f [G]`` shaped to multiply a statistic ``v [G, ...]`` (a scalar as is)."""
    if isinstance(f, (int, float)) or getattr(f, "ndim", 0) == 0:
        return f
    return f.reshape(tuple(f.shape) + (1,) * (v.ndim - 1))


def _candidates(base: Stats, drift: Stats, s_tilde: Stats | None, rho: Any, factors: Any) -> Stats:
    """The new ``S̃`` for each control-variate factor ``factors [H]``: ``[H, ...]`` per statistic (``s_tilde`` None:
    ρ = 1, the proxy itself)."""
    out = {}
    for k, v in base.items():
        target = v[None] + factors.reshape((-1,) + (1,) * v.ndim) * drift[k][None]
        out[k] = target if s_tilde is None else s_tilde[k][None] + rho * (target - s_tilde[k][None])
    return out


class _One(float):
    """The constant step 1 (lets the exact engines skip the fast-step arithmetic)."""


_ONE = _One(1.0)


def _as_schedule(value: float | Schedule) -> Schedule:
    if callable(value):
        return value
    v = float(value)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"a constant step size must be in (0, 1], got {v}")
    if v == 1.0:
        return lambda t: _ONE
    return constant(v)
