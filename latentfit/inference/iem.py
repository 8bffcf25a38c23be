"""Mini-batch EM and incremental EM (iEM) on the shared statistics core.

Neal & Hinton, "A view of the EM algorithm that justifies incremental, sparse, and other variants" (1998)
for incremental EM; Karimi, Lavielle & Moulines, "On the convergence properties of the mini-batch EM and MCEM
algorithms" (HAL hal-02334485, 2019) for mini-batch EM.
A table keeps the last exact statistic of every unit, ``s_i = s̄_i(θ^{τ_i})``; at iteration t a
mini-batch ``B_t`` is refreshed at the current θ and the running sum follows:

    𝒮^{(t+1)} = 𝒮^{(t)} + Σ_{i∈B_t} (s̄_i(θ^t) − s_i),   s_i ← s̄_i(θ^t)  (i ∈ B_t),
    θ^{t+1} = θ̄(𝒮^{(t+1)})                                     (γ = ρ = 1).

``b = 1`` is iEM, ``b = n`` is EM.  With a Monte-Carlo oracle the same rule is mini-batch MCEM
(``MiniBatchMCEM``) and, with two timescales, iSAEM (``TTSEM(variant="isaem")``).
"""

from __future__ import annotations

from typing import Any

from .stats_table import ProxyRule, StatEngine, Stats, s_copy, s_put, s_sub, s_take


class IncrementalRule(ProxyRule):
    """``𝒮 ← 𝒮 + Σ_{B}(s̄_i(θ) − s_i)`` with a per-unit table refreshed on the batch."""

    unit_tables = ("table",)

    def init(self, eng: StatEngine, state: dict[str, Any], theta: dict[str, Any], full: Stats,
             rows: Stats) -> dict[str, Any]:
        state["table"] = rows
        state["s_run"] = s_copy(eng.ops, full)
        return state

    def proxy(self, eng: StatEngine, state: dict[str, Any], theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, dict[str, Any]]:
        ops = eng.ops
        new, state = eng.oracle(state, theta, bi, key)
        old = s_take(ops, state["table"], bi)
        delta = eng.reduce(s_sub(new, old), bi)
        s_run = {k: v + delta[k] for k, v in state["s_run"].items()}
        table = s_put(ops, state["table"], bi, new)
        return s_run, dict(state, s_run=s_run, table=table)


class MiniBatchEM(StatEngine):
    """Mini-batch EM: refresh b units' exact statistics per iteration (default ⌈n/10⌉: 10 per epoch)."""

    name = "MiniBatchEM"
    rule = IncrementalRule()
    batches_per_epoch = 10


class IEM(MiniBatchEM):
    """Incremental EM (Neal & Hinton): the mini-batch rule, one unit per iteration by default."""

    name = "IEM"

    def __init__(self, model: Any, num_epochs: int = 20, batch_size: int | None = 1, **kwargs: Any) -> None:
        super().__init__(model, num_epochs, batch_size, **kwargs)
