"""Generalized EM: enumerated discrete-latent Pyro / NumPyro models without a closed-form M-step.

The full-batch ``EM`` runs the exact E-step (the responsibilities ``r_ik = p(z_i = k | y_i; θ^{k−1})`` of the
enumerated label) and maximises ``Q(θ | θ^{k−1}) = Σ_i Σ_k r_ik log p(y_i, z_i = k; θ)`` by damped Newton, keeping the
result only if Q did not decrease.  References: a closed-form Poisson-mixture EM in numpy (the same iterates, when
Newton solves each M-step), the maximum of the exact marginal log-likelihood by scipy (Bernoulli mixture, mixture of
regressions).  The mini-batch, incremental and variance-reduced engines still refuse such models.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from scipy.special import expit, gammaln, log_expit, logsumexp

from latentfit.inference.model import ModelSpecificationError

K_POIS, N_POIS = 3, 2000
W_TRUE, RATES_TRUE = np.array([0.5, 0.3, 0.2]), np.array([1.0, 5.0, 12.0])
W_INIT, RATES_INIT = np.ones(3) / 3, np.array([0.5, 3.0, 8.0])


# ----- the models, as the Pyro / NumPyro tutorials write them ---------------------------------------------------
def pyro_models() -> dict:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints

    def poisson_mixture(x):
        weights = pyro.param("weights", torch.tensor(W_INIT), constraint=constraints.simplex)
        rates = pyro.param("rates", torch.tensor(RATES_INIT), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Poisson(rates[z]), obs=x)

    def bernoulli_mixture(x):
        weights = pyro.param("weights", torch.ones(2, dtype=x.dtype) / 2, constraint=constraints.simplex)
        probs = pyro.param("probs", torch.tensor(BERN_INIT), constraint=constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Bernoulli(probs[z]).to_event(1), obs=x)

    def regression_mixture(x, y):
        weights = pyro.param("weights", torch.ones(2, dtype=y.dtype) / 2, constraint=constraints.simplex)
        coefs = pyro.param("coefs", torch.tensor(REG_INIT))  # [K, 2]: intercept and slope of each line
        sigma = pyro.param("sigma", torch.ones(2, dtype=y.dtype), constraint=constraints.positive)
        design = torch.cat([torch.ones_like(x)[:, None], x[:, None]], -1)
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal((design * coefs[z]).sum(-1), sigma[z]), obs=y)

    return {"poisson": poisson_mixture, "bernoulli": bernoulli_mixture, "regression": regression_mixture}


def numpyro_models() -> dict:
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def poisson_mixture(x):
        weights = numpyro.param("weights", jnp.asarray(W_INIT), constraint=constraints.simplex)
        rates = numpyro.param("rates", jnp.asarray(RATES_INIT), constraint=constraints.positive)
        with numpyro.plate("data", len(x)):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Poisson(rates[z]), obs=x)

    def bernoulli_mixture(x):
        weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        probs = numpyro.param("probs", jnp.asarray(BERN_INIT), constraint=constraints.unit_interval)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Bernoulli(probs[z]).to_event(1), obs=x)

    def regression_mixture(x, y):
        weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        coefs = numpyro.param("coefs", jnp.asarray(REG_INIT))
        sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
        design = jnp.concatenate([jnp.ones_like(x)[:, None], x[:, None]], -1)
        with numpyro.plate("data", len(y)):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal((design * coefs[z]).sum(-1), sigma[z]), obs=y)

    return {"poisson": poisson_mixture, "bernoulli": bernoulli_mixture, "regression": regression_mixture}


def models(backend) -> dict:
    return pyro_models() if backend.name == "pyro" else numpyro_models()


# ----- data and numpy references ----------------------------------------------------------------------------------
def poisson_data(n: int = N_POIS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.choice(K_POIS, size=n, p=W_TRUE)
    return rng.poisson(RATES_TRUE[z]).astype(float)


def poisson_em_numpy(x: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form EM of a Poisson mixture: ``w_k = Σ_i r_ik / n``, ``λ_k = Σ_i r_ik x_i / Σ_i r_ik``."""
    w, lam = W_INIT.copy(), RATES_INIT.copy()
    for _ in range(iters):
        lj = np.log(w)[:, None] + x * np.log(lam)[:, None] - lam[:, None] - gammaln(x + 1)
        r = np.exp(lj - logsumexp(lj, 0))
        mass = r.sum(1)
        w, lam = mass / len(x), (r * x).sum(1) / mass
    return w, lam


def poisson_loglik(theta: np.ndarray, x: np.ndarray) -> float:
    """``Σ_i log Σ_k w_k Poisson(x_i; λ_k)``, θ = (w_1, w_2, λ_1, λ_2, λ_3), w_3 = 1 − w_1 − w_2."""
    w = np.array([theta[0], theta[1], 1.0 - theta[0] - theta[1]])
    lam = theta[2:]
    lj = np.log(w)[:, None] + x * np.log(lam)[:, None] - lam[:, None] - gammaln(x + 1)
    return float(logsumexp(lj, 0).sum())


def numeric_hessian(f, theta: np.ndarray, h: float = 1e-4) -> np.ndarray:
    p = len(theta)
    out = np.zeros((p, p))
    for a in range(p):
        for b in range(p):
            ea, eb = np.eye(p)[a] * h, np.eye(p)[b] * h
            out[a, b] = (f(theta + ea + eb) - f(theta + ea - eb) - f(theta - ea + eb)
                         + f(theta - ea - eb)) / (4 * h * h)
    return out


def objective(fit) -> np.ndarray:
    return np.asarray([float(np.sum(v)) for v in fit.history["objective"]])


# ----- Poisson mixture: the closed-form EM's iterates, and the truth -----------------------------------------------
def test_poisson_mixture_gem_equals_closed_form_em(backend):
    x = poisson_data()
    fit = backend.fit("EM", models(backend)["poisson"], backend.tensor(x), num_epochs=40, progress=False)
    w_ref, lam_ref = poisson_em_numpy(x, 40)
    np.testing.assert_allclose(fit.params["weights"], w_ref, rtol=1e-6)
    np.testing.assert_allclose(fit.params["rates"], lam_ref, rtol=1e-6)
    ll = objective(fit)
    assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[1:]))  # the log-likelihood never decreases
    # the objective of epoch k is the log-likelihood at θ^{k−1}: epoch 40's is numpy's after 39 iterations
    w39, lam39 = poisson_em_numpy(x, 39)
    assert ll[-1] == pytest.approx(poisson_loglik(np.r_[w39[:2], lam39], x), rel=1e-10)


@pytest.mark.slow
def test_poisson_mixture_recovers_the_truth(backend):
    x = poisson_data(seed=1)
    fit = backend.fit("EM", models(backend)["poisson"], backend.tensor(x), num_epochs=500, tol=1e-8,
                      progress=False)
    est = np.r_[fit.params["weights"][:2], fit.params["rates"]]
    info = -numeric_hessian(lambda t: poisson_loglik(t, x), est)
    se = np.sqrt(np.diag(np.linalg.inv(info)))
    truth = np.r_[W_TRUE[:2], RATES_TRUE]
    assert np.all(np.abs(est - truth) < 4 * se), (est, truth, se)
    # the fit's standard errors (the exact observed information by autodiff) are these (central differences)
    ses = fit.standard_errors()
    np.testing.assert_allclose([ses["weights[0]"], ses["weights[1]"], ses["rates[0]"], ses["rates[1]"],
                                ses["rates[2]"]], se, rtol=2e-3)
    # at the maximum: the score of the exact marginal vanishes (central differences)
    grad = np.array([(poisson_loglik(est + 1e-6 * e, x) - poisson_loglik(est - 1e-6 * e, x)) / 2e-6
                     for e in np.eye(5)])
    assert np.all(np.abs(grad) * se < 1e-2)


# ----- Bernoulli mixture and mixture of regressions: the maximum of the exact marginal by scipy ------------------
D_BERN = 4
BERN_TRUE = np.array([[0.9, 0.8, 0.2, 0.3], [0.2, 0.1, 0.7, 0.9]])
BERN_INIT = np.array([[0.6, 0.6, 0.4, 0.4], [0.4, 0.4, 0.6, 0.6]])


def bernoulli_data(n: int = 600, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.choice(2, size=n, p=[0.4, 0.6])
    return (rng.uniform(size=(n, D_BERN)) < BERN_TRUE[z]).astype(float)


def bernoulli_loglik(u: np.ndarray, x: np.ndarray) -> float:
    """Unconstrained u = (logit w_1, logit probs [2, D]) -> Σ_i log Σ_k w_k Π_j Bern(x_ij; p_kj)."""
    lw = np.array([log_expit(u[0]), log_expit(-u[0])])
    eta = u[1:].reshape(2, D_BERN)
    lj = lw[None, :] + x @ log_expit(eta).T + (1 - x) @ log_expit(-eta).T  # [n, K]
    return float(logsumexp(lj, 1).sum())


REG_TRUE = np.array([[1.0, 2.0], [-1.0, -1.5]])
REG_INIT = np.array([[0.5, 1.0], [-0.5, -0.5]])


def regression_data(n: int = 600, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=n)
    z = rng.choice(2, size=n, p=[0.45, 0.55])
    y = REG_TRUE[z, 0] + REG_TRUE[z, 1] * x + np.array([0.5, 0.8])[z] * rng.normal(size=n)
    return x, y


def regression_loglik(u: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """u = (logit w_1, coefs [2, 2], log σ [2]) -> Σ_i log Σ_k w_k N(y_i; a_k + b_k x_i, σ_k²)."""
    lw = np.array([log_expit(u[0]), log_expit(-u[0])])
    coefs, sigma = u[1:5].reshape(2, 2), np.exp(u[5:7])
    mean = coefs[:, :1] + coefs[:, 1:] * x  # [K, n]
    lj = lw[:, None] - 0.5 * ((y - mean) / sigma[:, None]) ** 2 - np.log(sigma)[:, None] - 0.5 * np.log(2 * np.pi)
    return float(logsumexp(lj, 0).sum())


def scipy_max(f, u0: np.ndarray) -> tuple[np.ndarray, float]:
    res = scipy.optimize.minimize(lambda u: -f(u), u0, method="BFGS", options={"gtol": 1e-7, "maxiter": 5000})
    res = scipy.optimize.minimize(lambda u: -f(u), res.x, method="Nelder-Mead",
                                  options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 20000})
    return res.x, -res.fun


@pytest.mark.slow
def test_bernoulli_mixture_reaches_the_marginal_maximum(backend):
    x = bernoulli_data()
    fit = backend.fit("EM", models(backend)["bernoulli"], backend.tensor(x), num_epochs=300, tol=1e-9,
                      progress=False)
    ll = objective(fit)
    assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[1:])), np.diff(ll).min()
    u0 = np.r_[0.0, np.log(BERN_INIT / (1 - BERN_INIT)).ravel()]
    u_ref, ll_ref = scipy_max(lambda u: bernoulli_loglik(u, x), u0)
    w, probs = fit.params["weights"], fit.params["probs"]
    ll_em = bernoulli_loglik(np.r_[np.log(w[0] / w[1]), np.log(probs / (1 - probs)).ravel()], x)
    assert ll_em >= ll_ref - 1e-4
    np.testing.assert_allclose(w[0], expit(u_ref[0]), atol=2e-3)
    np.testing.assert_allclose(probs, expit(u_ref[1:]).reshape(2, D_BERN), atol=2e-3)


def test_regression_mixture_reaches_the_marginal_maximum(backend):
    x, y = regression_data()
    fit = backend.fit("EM", models(backend)["regression"], backend.tensor(x), backend.tensor(y), num_epochs=300,
                      tol=1e-9, progress=False)
    ll = objective(fit)
    assert np.all(np.diff(ll) >= -1e-8 * np.abs(ll[1:])), np.diff(ll).min()
    u0 = np.r_[0.0, REG_INIT.ravel(), 0.0, 0.0]
    u_ref, ll_ref = scipy_max(lambda u: regression_loglik(u, x, y), u0)
    w, coefs, sigma = fit.params["weights"], fit.params["coefs"], fit.params["sigma"]
    ll_em = regression_loglik(np.r_[np.log(w[0] / w[1]), coefs.ravel(), np.log(sigma)], x, y)
    assert ll_em >= ll_ref - 1e-4
    np.testing.assert_allclose(w[0], expit(u_ref[0]), atol=2e-3)
    np.testing.assert_allclose(coefs, u_ref[1:5].reshape(2, 2), atol=2e-3)
    np.testing.assert_allclose(sigma, np.exp(u_ref[5:]), atol=2e-3)
    np.testing.assert_allclose(coefs, REG_TRUE, atol=0.25)  # and near the truth


# ----- the other engines of the family refuse, naming EM -----------------------------------------------------------
@pytest.mark.parametrize("engine", ["MiniBatchEM", "IEM", "FIEM", "SEMVR"])
def test_other_em_engines_refuse_and_name_full_batch_em(backend, engine):
    x = backend.tensor(poisson_data(200))
    with pytest.raises(ModelSpecificationError, match=r"found no closed-form M-step.*EM \(full batch\) fits this "
                                                      r"model as it is: generalized EM"):
        backend.fit(engine, models(backend)["poisson"], x, num_epochs=2, progress=False)


# ----- the GEM guard, stopping and the convergence warning -------------------------------------------------------
def test_a_newton_result_that_lowers_q_is_not_taken(backend, monkeypatch):
    """The M-step keeps θ^{k−1} when its Newton result has a lower Q (here: forced, the Newton result moved far off
    the maximum), so the log-likelihood cannot decrease (a result with a higher Q is taken: the tests above).  Data of
    a size no other test fits (a compiled JAX step is reused by shapes)."""
    import latentfit.inference.em as em

    x = poisson_data(301)
    monkeypatch.setattr(em, "newton_maximize", lambda ops, q, x0, **kw: x0 + 3.0)  # Q falls: rejected
    fit = backend.fit("EM", models(backend)["poisson"], backend.tensor(x), num_epochs=3, progress=False)
    np.testing.assert_allclose(fit.params["rates"], RATES_INIT, rtol=1e-14)  # (the store's round trip)
    np.testing.assert_allclose(fit.params["weights"], W_INIT, rtol=1e-14)
    assert np.ptp(objective(fit)) == 0.0


def test_tol_stops_and_an_unconverged_fit_warns(backend):
    from latentfit import ConvergenceWarning

    x = backend.tensor(poisson_data(300))
    with pytest.warns(ConvergenceWarning, match="EM has not converged after 2 epochs"):
        backend.fit("EM", models(backend)["poisson"], x, num_epochs=2, progress=False)
    backend.reset()
    fit = backend.fit("EM", models(backend)["poisson"], x, num_epochs=500, tol=1e-3, progress=False)
    ll = objective(fit)
    assert len(ll) < 500 and (ll[-1] - ll[-2]) / 300 < 1e-3 <= (ll[-2] - ll[-3]) / 300
