"""MCMC-SGD warns when its complete-data log-likelihood is still rising at the end of the run (the optimiser stopped
before a stationary point; e.g. a network under the default 500 Adam iterations), and not on a converged fit."""

from __future__ import annotations

import warnings

import numpy as np
from backends import Backend

from latentfit.inference.driver import final_trend


def _ar1(rng: np.random.Generator, n: int, rho: float, scale: float) -> np.ndarray:
    e = rng.standard_normal(n) * scale
    out = np.empty(n)
    out[0] = e[0]
    for t in range(1, n):
        out[t] = rho * out[t - 1] + e[t]
    return out


def test_final_trend_finds_a_rise_and_its_error() -> None:
    """A line with AR(1) noise: the rise over the last quarter is recovered within 3 of its standard errors, and on
    flat noise the rise is within 3 standard errors of 0 in at least 95% of 400 series (the AR(1) inflation keeps the
    error honest for correlated draws)."""
    rng = np.random.default_rng(0)
    n = 400
    line = np.linspace(0.0, 40.0, n)  # rises 10 over the last quarter
    rise, se = final_trend(line + _ar1(rng, n, 0.5, 1.0))
    assert abs(rise - 10.0) < 3 * se and se < 2.0
    false = 0
    for _ in range(400):
        rise, se = final_trend(_ar1(rng, n, 0.5, 1.0))
        false += abs(rise) > 3 * se
    assert false <= 20
    assert final_trend(np.ones(30))[0] == 0.0  # constant: no rise
    assert final_trend(np.arange(10.0)) == (0.0, float("inf"))  # too short to tell


def _grouped(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(20), 5)
    y = (2.0 + 0.7 * rng.standard_normal(20))[group] + rng.standard_normal(group.size)
    return group, y


def _rising_messages(record: list) -> list[str]:
    return [str(w.message) for w in record if "still rising" in str(w.message)]


def test_mcmcsgd_warns_while_still_climbing_and_not_once_converged(backend: Backend) -> None:
    """Adam at a small constant rate from μ = 0 (the maximum near 2) is still climbing after 200 iterations (μ about
    0.8): one warning, naming the rise; the default optimiser on the same data converges and says nothing."""
    group, y = _grouped()
    args = (backend.xp.asarray(group), 20, backend.tensor(y))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        backend.fit("MCMCSGD", backend.models.grouped_intercept, *args, num_iters=200, optimizer="adam",
                    learning_rate=lambda t: 0.01, num_chains=10, progress=False)
    assert len(_rising_messages(seen)) == 1
    assert "num_iters" in _rising_messages(seen)[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit = backend.fit("MCMCSGD", backend.models.grouped_intercept, *args, progress=False)
    assert _rising_messages(seen) == []
    assert abs(float(fit.params["mu"]) - y.mean()) < 0.2
