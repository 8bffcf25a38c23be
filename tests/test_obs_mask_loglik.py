"""The log-likelihood of a regression whose covariate is missing in some rows, written with ``obs_mask=`` (Pyro and
NumPyro): a user audit found "is" +32 619 and "gq" −920 for the exact −2697.8 ("lin" right; AIC/BIC built on "is").

``sample("x1", d, obs=x1, obs_mask=m1)`` splits into ``x1_observed`` and an imputation site ``x1_unobserved``; the
imputed values feed x2's density, so ``x1_unobserved`` is a latent, with one element per row.  At a row where x1 is
observed that element is read by nothing (``where(m1, x1, x1_unobserved)``) and its density is masked out: a flat
direction.  Integrated over, it gave importance sampling a weight ``1 / q`` and the quadrature its grid's width per
observed entry, and the random walks, always accepting there, grew their scales without bound.  Such an element now
carries a standard normal reference density (``latent_mask`` False), which the estimators integrate out exactly.

Known truths: the observed-data likelihood of these linear Gaussian models in closed form, the observed covariates'
densities times the response's normal given them (the missing ones integrated out: ``b² s1²`` added to its variance).
"""

from __future__ import annotations

import functools

import numpy as np
from backends import Backend
from scipy import stats

# ----- the users' model: x2 ~ N(a + b x1, s2), x1 ~ N(μ1, s1) missing in ~30% of the rows ---------------------------
N = 200
PARAMS = ("mu1", "s1", "a", "b", "s2")


@functools.cache
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x1, x2, m1)``: a bivariate normal, x1 NaN where ``m1`` is False."""
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal([1.0, -1.0], [[1.0, 0.6], [0.6, 2.0]], N)
    m1 = rng.random(N) >= 0.3
    return np.where(m1, x[:, 0], np.nan), x[:, 1], m1


def exact_log_lik(p: dict[str, float]) -> np.ndarray:
    """Per row ``log p(x1_obs, x2; θ)``."""
    x1, x2, m1 = data()
    x = np.where(m1, x1, p["mu1"])
    sd = np.sqrt(p["s2"] ** 2 + np.where(m1, 0.0, p["b"] ** 2 * p["s1"] ** 2))
    return stats.norm.logpdf(x2, p["a"] + p["b"] * x, sd) + np.where(m1, stats.norm.logpdf(x, p["mu1"], p["s1"]), 0.0)


def _args(backend: Backend) -> tuple:
    x1, x2, m1 = data()
    return backend.tensor(x1), backend.tensor(x2), backend.tensor(m1)


@functools.cache
def _fit(backend_name: str):
    backend = Backend(backend_name)
    backend.reset()
    return backend.fit("SAEM", backend.models.regression_missing_x, *_args(backend), seed=0, progress=False,
                       num_iters=(40, 30))


def test_log_likelihoods_and_criteria_are_the_exact_observed_data_ones(backend):
    """At θ̂: "is" within 4 of its Monte-Carlo SEs of the exact value (and within 0.1), "gq" and "lin" exact (1e-8:
    the model is linear and Gaussian in the latent); AIC and BIC built on "is".  The chains of the unread elements
    follow their reference density (no scale growing without bound, no proposal at a non-finite density)."""
    fit = _fit(backend.name)
    theta = {k: float(fit.params[k]) for k in PARAMS}
    exact = exact_log_lik(theta)
    ll_is = fit.log_likelihood("is")
    res = fit.log_likelihoods["is"]
    assert 0 < res.mc_se < 0.05, res.mc_se
    assert abs(ll_is - exact.sum()) < min(4 * res.mc_se, 0.1), (ll_is, exact.sum(), res.mc_se)
    for method in ("gq", "lin"):
        fit.log_likelihood(method)
        np.testing.assert_allclose(fit.log_likelihoods[method].per_unit, exact, rtol=1e-8, atol=1e-8)
    assert fit.num_params == len(PARAMS)
    np.testing.assert_allclose(fit.aic, -2.0 * ll_is + 2.0 * len(PARAMS), rtol=1e-12)
    np.testing.assert_allclose(fit.bic, -2.0 * ll_is + len(PARAMS) * np.log(N), rtol=1e-12)
    assert fit.num_nonfinite == 0
    _, _, m1 = data()
    unread = np.asarray(fit.latent_draws)[..., m1, 0]
    assert np.abs(unread).max() < 8 and 0.7 < unread.std() < 1.3, (np.abs(unread).max(), unread.std())


# ----- two covariates, x ~ N(μx, σx) and w ~ LogNormal(μw, σw), missing apart; y ~ N(a + b x + c log w, σ) ---------
M = 120
PARAMS2 = ("mu_x", "s_x", "mu_w", "s_w", "a", "b", "c", "sigma")
THETA2 = dict(zip(PARAMS2, (0.7, 1.5, 0.2, 0.6, 0.1, 0.5, -0.8, 0.9)))


@functools.cache
def data2() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, w, mx, mw, y)``: x and w missing (NaN) in ~30% of the rows each, some rows missing both."""
    rng = np.random.default_rng(21)
    x = 1.0 + rng.standard_normal(M)
    w = np.exp(0.5 + 0.4 * rng.standard_normal(M))
    y = 0.5 + 0.8 * x - 1.2 * np.log(w) + 0.5 * rng.standard_normal(M)
    mx, mw = rng.random(M) > 0.3, rng.random(M) > 0.3
    return np.where(mx, x, np.nan), np.where(mw, w, np.nan), mx, mw, y


def exact_log_lik2(p: dict[str, float]) -> np.ndarray:
    """Per row ``log p(x_obs, w_obs, y; θ)`` (w's density on its own scale, LogNormal)."""
    x, w, mx, mw, y = data2()
    x, lw = np.where(mx, x, p["mu_x"]), np.where(mw, np.log(np.where(mw, w, 1.0)), p["mu_w"])
    var = p["sigma"] ** 2 + np.where(mx, 0.0, (p["b"] * p["s_x"]) ** 2) + np.where(mw, 0.0, (p["c"] * p["s_w"]) ** 2)
    return (stats.norm.logpdf(y, p["a"] + p["b"] * x + p["c"] * lw, np.sqrt(var))
            + np.where(mx, stats.norm.logpdf(x, p["mu_x"], p["s_x"]), 0.0)
            + np.where(mw, stats.norm.logpdf(lw, p["mu_w"], p["s_w"]) - lw, 0.0))


def _model2(backend: Backend):
    x, w, mx, mw, y = data2()
    args = (backend.tensor(x), backend.tensor(w), backend.tensor(mx), backend.tensor(mw), backend.tensor(y))
    return backend.latent_model(backend.models.missing_covariates, *args)


def test_unread_elements_carry_the_reference_density_alone(backend):
    """``latent_mask`` is False exactly at the observed entries of the two imputation sites; there the log-likelihood
    does not move with the latent and the log-prior is the standard normal's (w's log-Jacobian left out), as the
    prior's moments and draws say."""
    _, _, mx, mw, _ = data2()
    unread = np.stack([mx, mw], 1)
    model = _model2(backend)
    assert [s.name for s in model.latent_sites] == ["x_unobserved", "w_unobserved"]
    np.testing.assert_array_equal(backend.to_numpy(model.latent_mask()), ~unread)
    idx = np.array([4, 0, 4])
    np.testing.assert_array_equal(backend.to_numpy(model.latent_mask(backend.xp.asarray(idx))), ~unread[idx])
    theta = {k: backend.tensor(v) for k, v in THETA2.items()}
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, M, 2))
    moved = z + np.where(unread, 3.0 * rng.standard_normal((2, M, 2)), 0.0)
    (ll0, lp0), (ll1, lp1) = (model.log_densities(theta, backend.tensor(v)) for v in (z, moved))
    np.testing.assert_allclose(backend.to_numpy(ll1), backend.to_numpy(ll0), rtol=1e-12)
    phi = np.where(unread, stats.norm.logpdf(moved) - stats.norm.logpdf(z), 0.0).sum(-1)
    np.testing.assert_allclose(backend.to_numpy(lp1) - backend.to_numpy(lp0), phi, rtol=1e-10, atol=1e-10)
    mean, cov = (backend.to_numpy(a) for a in model.prior_moments(theta))
    np.testing.assert_array_equal(mean, np.where(unread, 0.0, [0.7, 0.2]))
    np.testing.assert_allclose(np.diagonal(cov, 0, -2, -1), np.where(unread, 1.0, [1.5 ** 2, 0.6 ** 2]), rtol=1e-12)
    draws = backend.to_numpy(model.sample_prior(theta, backend.ops().key(3), 200))[:, unread]
    assert abs(draws.mean()) < 4 / np.sqrt(draws.size) and abs(draws.var() - 1) < 4 * np.sqrt(2 / draws.size)


def test_estimators_integrate_the_unread_elements_out_exactly(backend):
    """At a θ away from any estimate: "gq" exact (1e-8) for this model (Gaussian in the latents log w and x); "is" with
    the diagonal and the full proposal within 4 Monte-Carlo SEs (and 0.1), whatever the proposal holds at the unread
    elements (a chain's wandering values there give the same numbers)."""
    from latentfit.inference import laplace, likelihood

    _, _, mx, mw, _ = data2()
    unread = np.stack([mx, mw], 1)
    model = _model2(backend)
    theta = {k: backend.tensor(v) for k, v in THETA2.items()}
    exact = exact_log_lik2(THETA2)
    gq = likelihood.log_likelihood_gq(model, theta, num_nodes=7)
    np.testing.assert_allclose(gq.per_unit, exact, rtol=1e-8, atol=1e-8)
    lap = laplace.conditional_modes(model, theta)
    mode, cov = backend.to_numpy(lap.mode), backend.to_numpy(lap.cov)
    sd, chol = np.sqrt(np.diagonal(cov, 0, -2, -1)), np.linalg.cholesky(cov)
    wander = np.where(unread, 40.0, mode), np.where(unread, 25.0, sd)
    results = [likelihood.log_likelihood_is(model, theta, mean, scale, num_samples=2000)
               for mean, scale in ((mode, sd), (mode, chol), wander)]
    for res in results:
        assert 0 < res.mc_se < 0.05, res.mc_se
        assert abs(res.value - exact.sum()) < min(4 * res.mc_se, 0.1), (res.value, exact.sum(), res.mc_se)
    np.testing.assert_allclose(results[2].per_unit, results[0].per_unit, rtol=1e-12)


def test_importance_moments_ignore_the_unread_elements(backend):
    """The pilot pass of adaptive importance sampling: the unread elements hold no weight (the moments of the latents
    are those of a proposal that leaves them at 0, whatever it held there)."""
    from latentfit.inference import laplace, likelihood

    _, _, mx, mw, _ = data2()
    unread = np.stack([mx, mw], 1)
    model = _model2(backend)
    theta = {k: backend.tensor(v) for k, v in THETA2.items()}
    lap = laplace.conditional_modes(model, theta)
    mode, sd = backend.to_numpy(lap.mode), np.sqrt(np.diagonal(backend.to_numpy(lap.cov), 0, -2, -1))
    a = likelihood.importance_moments(model, theta, mode, sd, num_samples=500)
    b = likelihood.importance_moments(model, theta, np.where(unread, 40.0, mode), np.where(unread, 25.0, sd),
                                      num_samples=500)
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.where(unread, 0.0, u), np.where(unread, 0.0, v), rtol=1e-10, atol=1e-12)
