"""Online EM (sEM; Cappé & Moulines, "On-line expectation–maximization algorithm for latent data models",
JRSS-B 2009) on the shared statistics core.

    𝒮^{(t+1)} = (n/b) Σ_{i∈B_t} s̄_i(θ^t),   S̃^{(t+1)} = S̃^{(t)} + ρ_t (𝒮^{(t+1)} − S̃^{(t)}),
    θ^{t+1} = θ̄(S̃^{(t+1)}),   ρ_t = 1/(t + 5) by default (FIEM paper's GMM setting).

No memory beyond the running statistic.  With a Monte-Carlo oracle and a slow step γ it is
(mini-batch / online) SAEM: ``TTSEM(variant="saem")``.
"""

from __future__ import annotations

from typing import Any

from .stats_table import ProxyRule, StatEngine, Stats, s_scale


class OnlineRule(ProxyRule):
    """``𝒮 = (n/b) Σ_{i∈B} s̄_i(θ)``: an unbiased, memoryless proxy."""

    def proxy(self, eng: StatEngine, state: dict[str, Any], theta: dict[str, Any], bi: Any, bj: Any,
              key: Any) -> tuple[Stats, dict[str, Any]]:
        new, state = eng.oracle(state, theta, bi, key)
        return s_scale(eng.reduce(new, bi), eng.batch_scale), state


class SEM(StatEngine):
    """Online EM with a decreasing step ``ρ_t = 1/(t + 5)`` (default mini-batch ⌈n/100⌉)."""

    name = "SEM"
    rule = OnlineRule()
    needs_table = False
    batches_per_epoch = 100

    def default_rho(self, n: int, b: int) -> Any:
        return lambda t: 1.0 / (t + 5.0)
