"""FIEM: fast incremental EM, SAGA-style (Karimi, Wai, Moulines & Lavielle, "On the global convergence of
(fast) incremental expectation maximization methods", NeurIPS 2019).

A table keeps ``s_i = s̄_i(θ^{t_i})`` refreshed only by a second, independent mini-batch ``J_t``,
with its running sum ``S̄``.  Per iteration:

    𝒮^{(t+1)} = S̄^{(t)} + (n/b) Σ_{i∈B_t} (s̄_i(θ^t) − s_i),
    S̄^{(t+1)} = S̄^{(t)} + Σ_{j∈J_t} (s̄_j(θ^t) − s_j),   s_j ← s̄_j(θ^t)  (j ∈ J_t),
    S̃^{(t+1)} = S̃^{(t)} + ρ (𝒮^{(t+1)} − S̃^{(t)}),      θ^{t+1} = θ̄(S̃^{(t+1)}),

with a constant ``ρ = (n/b)^(−2/3)`` (the paper's practical ``n^(−2/3)`` for b = 1).  Storing the
statistics (rather than θ per unit, as the reference code) is equivalent and saves two E-steps.

Far from the table's θ (the first epochs from a crude start) the fast step can carry ``S̃`` out of the M-step's domain
(a negative mass, an indefinite scatter: the E-step then met a singular covariance); the control variate is then shrunk,
block by block, until the new ``S̃`` is back (:meth:`~latentfit.inference.stats_table.StatEngine.fast_step`), which
leaves the fixed point and the asymptotic rule as they are.  Default mini-batch: ⌈n/100⌉ units, at least 50 (or n):
the scaled drift of a handful of units has a relative noise of order 1/√b; from a crude start at n = 500 (b = 5)
FIEM and sEM-VR ended in a spurious local maximum in 3 of 12 runs, with b = 50 in none.
With a Monte-Carlo oracle and a slow step this is fiTTEM (``TTSEM(variant="fi")``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .stats_table import (
    ControlVariate,
    ProxyRule,
    StatEngine,
    Stats,
    StatState,
    default_fast_step,
    s_copy,
    s_read,
    s_sub,
)


class SagaMemory(NamedTuple):
    """The SAGA rule's memory."""

    #: ``s_i = s̄_i(θ^{t_i})``, refreshed by the j-batches ``[n, ...]``
    table: Stats
    #: ``S̄ = Σ_i s_i``
    s_bar: Stats


class SagaRule(ProxyRule):
    """SAGA control variate: the table's sum plus the drift of the i-batch; the j-batch refreshes."""

    needs_second_batch = True
    unit_tables = ("table",)
    rows_written = ("table",)

    def init(self, eng: StatEngine, theta: dict[str, Any], full: Stats, rows: Stats) -> SagaMemory:
        return SagaMemory(table=rows, s_bar=s_copy(eng.ops, full))

    def proxy(self, eng: StatEngine, state: StatState, theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, StatState]:
        ops = eng.ops
        ki, kj = ops.split(key) if key is not None else (None, None)
        new_i, state = eng.oracle(state, theta, bi, ki)
        table, s_bar = state.memory
        drift_i = eng.reduce(s_sub(new_i, s_read(ops, table, bi)), bi)
        proxy = ControlVariate(s_bar, drift_i, eng.batch_scale)
        new_j, state = eng.oracle(state, theta, bj, kj)
        drift_j = eng.reduce(s_sub(new_j, s_read(ops, table, bj)), bj)
        s_bar = {k: v + drift_j[k] for k, v in s_bar.items()}
        table = eng.put_rows(table, bj, new_j)
        return proxy, state._replace(memory=SagaMemory(table=table, s_bar=s_bar))


class FIEM(StatEngine):
    """FIEM with constant step ``ρ = (n/b)^(−2/3)`` (default b = ⌈n/100⌉, at least 50 units; the paper's setting is
    b = 1).

    Example
    -------
    FIEM with mini-batches of 10 reaches the fixed point of exact EM (to rounding) in 20 epochs:

    >>> import numpy as np, torch
    >>> from latentfit.inference.fiem import FIEM
    >>> from latentfit.inference.em import EM
    >>> from latentfit.models import GaussianMixture
    >>> g = torch.Generator().manual_seed(0)
    >>> centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    >>> x = centres[torch.arange(300) % 3] + 0.6 * torch.randn(300, 2, generator=g, dtype=torch.float64)
    >>> fit = FIEM(GaussianMixture(x, 3), num_epochs=20, batch_size=10, seed=0, progress=False).run()
    >>> em = EM(GaussianMixture(x, 3), num_epochs=100, progress=False).run()
    >>> bool(np.abs(fit.params["locs"] - em.params["locs"]).max() < 1e-10)
    True
    """

    name = "FIEM"
    rule = SagaRule()
    batches_per_epoch = 100
    min_batch_size = 50

    def default_rho(self, n: int, b: int) -> float:
        return default_fast_step(n, b)
