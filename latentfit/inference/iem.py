"""Mini-batch EM and incremental EM (iEM) on the shared statistics core.

Neal & Hinton, "A view of the EM algorithm that justifies incremental, sparse, and other variants" (1998)
for incremental EM; Karimi, Lavielle & Moulines, "On the convergence properties of the mini-batch EM and MCEM
algorithms" (HAL hal-02334485, 2019) for mini-batch EM.
A table keeps the last exact statistic of every unit, ``s_i = s̄_i(θ^{τ_i})``; at iteration t a
mini-batch ``B_t`` is refreshed at the current θ and the running sum follows:

    𝒮^{(t+1)} = 𝒮^{(t)} + Σ_{i∈B_t} (s̄_i(θ^t) − s_i),   s_i ← s̄_i(θ^t)  (i ∈ B_t),
    θ^{t+1} = θ̄(𝒮^{(t+1)})                                     (γ = ρ = 1).

``b = 1`` is the FIEM paper's iEM, ``b = n`` is EM; ``IEM`` defaults to n/100 blocks (Neal & Hinton's blocks).
With a Monte-Carlo oracle the same rule is mini-batch MCEM (``MiniBatchMCEM``) and, with two timescales, iSAEM
(``TTSEM(variant="isaem")``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .stats_table import ProxyRule, StatEngine, Stats, StatState, s_copy, s_read, s_sub


class IncrementalMemory(NamedTuple):
    """The incremental rule's memory."""

    #: ``s_i``, the last statistic of every unit ``[n, ...]``
    table: Stats
    #: ``𝒮 = Σ_i s_i``, the running sum
    s_run: Stats


class IncrementalRule(ProxyRule):
    """``𝒮 ← 𝒮 + Σ_{B}(s̄_i(θ) − s_i)`` with a per-unit table refreshed on the batch."""

    unit_tables = ("table",)
    rows_written = ("table",)

    def init(self, eng: StatEngine, theta: dict[str, Any], full: Stats, rows: Stats) -> IncrementalMemory:
        return IncrementalMemory(table=rows, s_run=s_copy(eng.ops, full))

    def proxy(self, eng: StatEngine, state: StatState, theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, StatState]:
        ops = eng.ops
        new, state = eng.oracle(state, theta, bi, key)
        mem = state.memory
        delta = eng.reduce(s_sub(new, s_read(ops, mem.table, bi)), bi)
        s_run = {k: v + delta[k] for k, v in mem.s_run.items()}
        table = eng.put_rows(mem.table, bi, new)
        return s_run, state._replace(memory=IncrementalMemory(table=table, s_run=s_run))


class MiniBatchEM(StatEngine):
    """Mini-batch EM: refresh b units' exact statistics per iteration (default ⌈n/10⌉: 10 per epoch)."""

    name = "MiniBatchEM"
    rule = IncrementalRule()
    batches_per_epoch = 10


class IEM(MiniBatchEM):
    """Incremental EM (Neal & Hinton): the mini-batch rule with n/100 blocks per epoch by default (b = ⌈n/100⌉).

    Neal & Hinton's incremental EM refreshes one *block* of the data per iteration; a block of one unit
    (``batch_size=1``, the FIEM paper's iEM) is the limiting case.  Per unit visited it makes the same progress per
    epoch, but each iteration is a Python-level step of fixed cost (~0.4 ms on a CPU): with b = 1 an epoch at
    n = 10⁶ took ~6 minutes, against ~0.1 s for an epoch of exact EM.  With 100 blocks an epoch costs 100 steps of
    vectorised E-steps over n/100 units each whatever n.
    """

    name = "IEM"
    batches_per_epoch = 100

    def __init__(self, model: Any, num_epochs: int = 20, batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, num_epochs, batch_size, **kwargs)
