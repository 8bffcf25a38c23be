"""sEM-VR: stochastic EM with SVRG-style variance reduction (Chen, Zhu, Teh & Zhang, "Stochastic expectation
maximization with variance reduction", NeurIPS 2018).

At the start of every epoch ``ℓ`` a snapshot θ̃ = θ^{ℓ} is taken with its full statistic
``S̄(θ̃) = Σ_i s̄_i(θ̃)`` and the per-unit table ``s̄_i(θ̃)``; then, for each mini-batch,

    𝒮^{(t+1)} = S̄(θ̃) + (n/b) Σ_{i∈B_t} (s̄_i(θ^t) − s̄_i(θ̃)),
    S̃^{(t+1)} = S̃^{(t)} + ρ (𝒮^{(t+1)} − S̃^{(t)}),   θ^{t+1} = θ̄(S̃^{(t+1)}),

with a constant ``ρ = (n/b)^(−2/3)`` (the paper's practical ``n^(−2/3)`` for b = 1); the snapshot
refreshes every epoch (``m = n/b``).  A step that would leave the M-step's domain gets its control variate shrunk,
block by block, and the default mini-batch has at least 50 units, as FIEM's (:mod:`~latentfit.inference.fiem`).  With a
Monte-Carlo oracle and a slow step this is vrTTEM
(``TTSEM(variant="vr")``), whose snapshot table holds the stored MC statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .stats_table import ControlVariate, ProxyRule, StatEngine, Stats, StatState, default_fast_step, s_read, s_sub


class SnapshotMemory(NamedTuple):
    """The SVRG rule's memory: the epoch's snapshot θ̃."""

    #: ``s̄_i(θ̃)`` per unit ``[n, ...]``
    snap_table: Stats
    #: ``S̄(θ̃) = Σ_i s̄_i(θ̃)``
    snap_sum: Stats


class SnapshotRule(ProxyRule):
    """SVRG control variate around the epoch's snapshot."""

    unit_tables = ("snap_table",)

    def init(self, eng: StatEngine, theta: dict[str, Any], full: Stats, rows: Stats) -> SnapshotMemory:
        memory = SnapshotMemory(snap_table=rows, snap_sum={k: v + 0.0 for k, v in full.items()})
        if not eng.monte_carlo and not eng.ops.jittable:
            eng._snapshot_at = (tuple(theta.values()), rows)
        return memory

    def epoch_start(self, eng: StatEngine, state: StatState, theta: dict[str, Any], key: Any) -> StatState:
        """The snapshot at the epoch's θ: one full pass, unless the memory already holds the exact snapshot at this very
        θ (the first epoch of an eager fit, right after the initial pass at θ⁰: the same values, one pass less)."""
        at = getattr(eng, "_snapshot_at", None)
        if at is not None:
            del eng._snapshot_at
            arrays, rows = at
            if state.memory.snap_table is rows and len(arrays) == len(theta) and all(
                    a is b for a, b in zip(arrays, theta.values())):
                return state
        full, rows, _, state = eng.full_pass(state, theta, key)
        return state._replace(memory=SnapshotMemory(snap_table=rows, snap_sum=full))

    def proxy(self, eng: StatEngine, state: StatState, theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, StatState]:
        ops = eng.ops
        new, state = eng.oracle(state, theta, bi, key)
        snap_table, snap_sum = state.memory
        delta = eng.reduce(s_sub(new, s_read(ops, snap_table, bi)), bi)
        return ControlVariate(snap_sum, delta, eng.batch_scale), state


class SEMVR(StatEngine):
    """sEM-VR with constant step ``ρ = (n/b)^(−2/3)`` and a snapshot per epoch (default b = ⌈n/100⌉, at least 50
    units)."""

    name = "SEMVR"
    rule = SnapshotRule()
    batches_per_epoch = 100
    min_batch_size = 50

    def default_rho(self, n: int, b: int) -> float:
        return default_fast_step(n, b)
