"""Step-size schedules: plain callables of the iteration count (optax style).

Every schedule maps an iteration number ``k`` (1-based; a Python int or a backend scalar) to a
step size, using only arithmetic and :func:`~latentfit.inference.ops.select` (``where``) so that it also
works inside a compiled JAX loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .ops import select

Schedule = Callable[[Any], Any]

def constant(value: float) -> Schedule:
    """``γ_k = value``."""
    return lambda k: value + 0.0 * k


def polynomial(alpha: float = 0.5, scale: float = 1.0, num_ones: int = 0) -> Schedule:
    """``γ_k = 1`` for ``k ≤ num_ones``, then ``scale · (k − num_ones)^(−alpha)``.

    The Robbins–Monro schedule of TTSEM (α = 0.5–0.6) and online EM.
    """

    def gamma(k: Any) -> Any:
        kk = k - num_ones
        kk_pos = kk * (kk > 0) + 1 * (kk <= 0)
        return select(kk <= 0, 1.0, scale * kk_pos ** (-alpha))

    return gamma


@dataclass(frozen=True)
class SaemixPhases:
    """saemix / Monolix step-size phases.

    ``γ_k = 0`` for ``k ≤ burn_in`` (MCMC only), ``γ_k = 1`` for ``k ≤ K1`` (exploration, no
    memory), ``γ_k = 1/(k − K1)`` for ``K1 < k ≤ K1 + K2`` (smoothing; Kuhn & Lavielle 2004).
    Iteration numbers ``k`` are 1-based and count the burn-in (as in saemix).
    """

    K1: int = 300
    K2: int = 100
    burn_in: int = 5
    #: simulated annealing of the random-effect variances during the first ``anneal_iters``
    anneal_iters: int | None = None
    anneal_factor: float = 0.97

    @property
    def num_iters(self) -> int:
        return self.K1 + self.K2

    @property
    def sa_iters(self) -> int:
        return self.K1 // 2 if self.anneal_iters is None else self.anneal_iters

    def __call__(self, k: Any) -> Any:
        denom = (k - self.K1) * (k > self.K1) + 1 * (k <= self.K1)
        g = select(k <= self.K1, 1.0, 1.0 / denom)
        return select(k <= self.burn_in, 0.0, g)

    def annealing(self, k: Any) -> Any:
        """True while variances are annealed (``k ≤ K1/2`` by default)."""
        return k <= self.sa_iters
