"""Latent draws at θ̂ for the engines that keep none (MCEM, MiniBatchMCEM, TTSEM, MISSO): the post-fit methods that
need draws (the default IS log-likelihood, AIC/BIC, Louis' SEs, the EBEs, ``fit.latents``, ``to_arviz``) draw them
from ``p(z | y; θ̂)`` by MCMC (:func:`latentfit.inference.postfit.draws_at_estimate`) instead of refusing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

NAMES = ("mu", "omega", "sigma")
G = 15


def _data() -> tuple[np.ndarray, np.ndarray]:
    """``(group, y)``: 15 groups of 2-11 rows, shuffled (rows read through ``alpha[group]``)."""
    rng = np.random.default_rng(3)
    group = rng.permutation(np.repeat(np.arange(G), rng.integers(2, 12, G)))
    y = (1.0 + 0.8 * rng.standard_normal(G))[group] + 0.5 * rng.standard_normal(group.size)
    return group, y


def _exact(theta: dict[str, float]) -> tuple[float, np.ndarray, np.ndarray]:
    """The exact marginal log-likelihood, and the posterior means and variances of the intercepts."""
    group, y = _data()
    mu, omega, sigma = (theta[k] for k in NAMES)
    ll, mean, var = 0.0, np.zeros(G), np.zeros(G)
    for j in range(G):
        r = y[group == j]
        n = r.size
        cov = omega ** 2 * np.ones((n, n)) + sigma ** 2 * np.eye(n)
        ll += stats.multivariate_normal.logpdf(r, mu * np.ones(n), cov)
        var[j] = 1.0 / (1.0 / omega ** 2 + n / sigma ** 2)
        mean[j] = var[j] * (mu / omega ** 2 + r.sum() / sigma ** 2)
    return ll, mean, var


def _exact_observed_se(theta: dict[str, float]) -> np.ndarray:
    """SEs of (μ, ω, σ) from the exact observed information (the closed form's Hessian by central differences)."""
    x0 = np.array([theta[k] for k in NAMES])

    def ll(v: np.ndarray) -> float:
        return _exact(dict(zip(NAMES, v)))[0]

    h, hess = 1e-4, np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            a, b = np.eye(3)[i] * h, np.eye(3)[j] * h
            hess[i, j] = (ll(x0 + a + b) - ll(x0 + a - b) - ll(x0 - a + b) + ll(x0 - a - b)) / (4 * h * h)
    return np.sqrt(np.diag(np.linalg.inv(-hess)))


def _model(backend):
    """The random intercept written as the tutorials write it, on ``backend``'s PPL."""
    if backend.name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        def model(group, num_groups, y):
            mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
            omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
            sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
            with pyro.plate("group", num_groups):
                alpha = pyro.sample("alpha", dist.Normal(mu, omega))
            with pyro.plate("obs", y.shape[0]):
                pyro.sample("y", dist.Normal(alpha[group], sigma), obs=y)
        return model
    import numpyro
    import numpyro.distributions as dist
    from jax import numpy as jnp
    from numpyro.distributions import constraints

    def model(group, num_groups, y):
        mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
        omega = numpyro.param("omega", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
        sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
        with numpyro.plate("group", num_groups):
            alpha = numpyro.sample("alpha", dist.Normal(mu, omega))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(alpha[group], sigma), obs=y)
    return model


@pytest.mark.slow_on("numpyro")
def test_mcem_fit_has_draws_log_likelihood_ses_and_arviz(backend):
    """MCEM used to refuse ``log_likelihood()``, ``aic``, Louis' SEs, the EBEs and ``to_arviz``'s posterior (it keeps
    no draws).  Now: IS within 4 Monte-Carlo SEs (and 0.05) of the exact marginal at θ̂; Louis' SEs within 10% of the
    exact observed information's; the EBEs equal the exact posterior means (a Gaussian posterior: mode = mean) to
    1e-4; the draws' means and sds per group match the exact conditional ones (100 draws × L chains, correlated: 4
    SEs of 10× fewer independent draws, sds within 25%); arviz has a posterior that ``az.summary`` reads."""
    import arviz as az

    group, y = _data()
    fit = backend.fit("MCEM", _model(backend), backend.xp.asarray(group), G, backend.tensor(y), seed=0)
    theta = {k: float(fit.params[k]) for k in NAMES}
    ll_exact, mean, var = _exact(theta)
    value = fit.log_likelihood()
    detail = fit.log_likelihoods["is"]
    assert abs(value - ll_exact) < max(4 * float(detail.mc_se), 0.05), (value, ll_exact)
    assert fit.aic == pytest.approx(-2 * value + 2 * 3)
    se = fit.standard_errors("sa")
    np.testing.assert_allclose([se[k] for k in NAMES], _exact_observed_se(theta), rtol=0.10)
    est = fit.individual_estimates()
    np.testing.assert_allclose(np.asarray(est.mode)[:, 0], mean, atol=1e-4)
    draws = fit.latents["alpha"]  # [L, 100, G]
    assert draws.shape[1:] == (100, G) and draws.shape[0] >= 4
    flat = draws.reshape(-1, G)
    np.testing.assert_allclose(flat.mean(0), mean, atol=4 * float(np.sqrt(var.max() / (flat.shape[0] / 10))))
    np.testing.assert_allclose(flat.std(0), np.sqrt(var), rtol=0.25)
    idata = fit.to_arviz()
    assert "posterior" in idata.groups() and idata.posterior["alpha"].shape == draws.shape
    summary = az.summary(idata, var_names=["alpha"])
    assert len(summary) == G and np.isfinite(summary["mean"]).all()


def test_ttsem_and_misso_get_draws_too():
    """TTSEM and MISSO (Pyro): the default log-likelihood works (it refused) and is the exact one within 0.05."""
    import pyro
    import torch

    import latentfit.pyro as lp

    group, y = _data()

    class PyroBackend:
        name = "pyro"

    for name in ("TTSEM", "MISSO"):
        pyro.clear_param_store()
        fit = getattr(lp, name)(_model(PyroBackend), seed=0, progress=False).run(torch.as_tensor(group), G,
                                                                                  torch.tensor(y))
        theta = {k: float(fit.params[k]) for k in NAMES}
        assert abs(fit.log_likelihood() - _exact(theta)[0]) < 0.05, name
        assert fit.latents["alpha"].shape[1:] == (100, G)
    pyro.clear_param_store()
