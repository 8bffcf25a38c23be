"""Post-fit likelihood and Fisher information against exact results on a linear Gaussian mixed model.

Random-slope model (plain Pyro, MultivariateNormal random effects with a full covariance param):
``y_i ~ N(X_i μ, X_i Ω X_iᵀ + σ² I)`` exactly, the conditional law of ``b_i`` is Gaussian and known,
so the linearisation is exact, importance sampling must agree within its Monte-Carlo error and Louis'
identity ``−∇²log p(y; θ) = −E[∇²ℓ] − Cov[∇ℓ]`` holds at any θ.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from models_pyro import random_slope

from latentfit.inference import fisher, likelihood
from latentfit.inference.laplace import conditional_modes
from latentfit.inference.model import ModelSpecificationError
from latentfit.integrations.pyro import PyroLatentModel


@pytest.fixture(scope="module")
def setup():
    pyro.clear_param_store()
    rng = np.random.default_rng(1)
    n, m = 15, 5
    t = np.tile(np.linspace(0, 4, m), (n, 1))
    b = rng.multivariate_normal([1.0, 0.5], [[0.5, 0.1], [0.1, 0.2]], size=n)
    y = b[:, :1] + b[:, 1:] * t + rng.normal(0, 0.3, size=(n, m))
    model = PyroLatentModel(random_slope, (torch.tensor(t), torch.tensor(y)))
    # an arbitrary θ (not the MLE): the identities checked below hold at any θ
    theta = {"mu": torch.tensor([0.8, 0.6], dtype=torch.float64),
             "cov": torch.tensor([[0.6, 0.05], [0.05, 0.15]], dtype=torch.float64),
             "sigma": torch.tensor(0.35, dtype=torch.float64)}
    yield model, theta, torch.tensor(t), torch.tensor(y)
    pyro.clear_param_store()


def _design(t):
    return torch.stack([torch.ones_like(t), t], -1)  # [n, m, 2]


def exact_marginal(theta, t, y):
    x = _design(t)
    mean = x @ theta["mu"]
    cov = x @ theta["cov"] @ x.transpose(-1, -2) + theta["sigma"] ** 2 * torch.eye(t.shape[1], dtype=t.dtype)
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(y)  # [n]


def exact_posterior(theta, t, y):
    x = _design(t)
    p0 = torch.linalg.inv(theta["cov"])
    prec = p0 + x.transpose(-1, -2) @ x / theta["sigma"] ** 2
    cov = torch.linalg.inv(prec)
    mean = (cov @ (p0 @ theta["mu"] + (x.transpose(-1, -2) @ y[..., None])[..., 0] / theta["sigma"] ** 2)[..., None])
    return mean[..., 0], cov


def test_gaussian_faces_are_recognised(setup):
    model, theta, t, y = setup
    assert model.has_gaussian_obs and model.has_gaussian_prior
    m, cov = model.prior_moments(theta)
    assert torch.allclose(m, theta["mu"].expand(15, 2)) and torch.allclose(cov, theta["cov"].expand(15, 2, 2))
    obs, mask = model.observations()
    assert torch.equal(obs, y) and bool(mask.all())
    z = torch.randn(3, 15, 2, dtype=torch.float64)
    mean, sd = model.predict(theta, z)
    assert torch.allclose(mean, z[..., :1] + z[..., 1:] * t) and torch.allclose(sd, theta["sigma"].expand(3, 15, 5))


def test_linearisation_is_exact_for_a_linear_model(setup):
    model, theta, t, y = setup
    modes = conditional_modes(model, theta, num_steps=5).mode
    lin = likelihood.log_likelihood_lin(model, theta, modes)
    exact = exact_marginal(theta, t, y)
    np.testing.assert_allclose(lin.per_unit, exact.numpy(), atol=1e-9)


def test_importance_sampling_agrees_within_monte_carlo_error(setup):
    model, theta, t, y = setup
    mean, cov = exact_posterior(theta, t, y)
    sd = torch.sqrt(torch.diagonal(cov, 0, -2, -1))
    res = likelihood.log_likelihood_is(model, theta, mean, sd, num_samples=4000, seed=3)
    exact = float(exact_marginal(theta, t, y).sum())
    assert res.mc_se < 0.15  # diagonal Student-t proposal, correlated posterior
    assert abs(res.value - exact) < 4 * res.mc_se + 1e-3
    again = likelihood.log_likelihood_is(model, theta, mean, sd, num_samples=4000, seed=3)
    assert again.value == res.value  # fixed seed: reproducible


def test_full_proposal_scale_is_the_draws_shrunk_covariance_factor():
    """``likelihood.conditional_scale``: each unit's ``L_i`` with ``L_i L_iᵀ = (1 − λ) S_i + λ diag(S_i)`` (``S_i`` the
    draws' covariance, ``λ = (d + 1) / K``), lower triangular; with given sds the draws give only the correlations;
    ``K ≤ d + 1`` draws give the diagonal proposal."""
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(2, 40, 6, 3)) @ np.array([[1.0, 0.6, 0.0], [0.0, 0.8, 0.3], [0.0, 0.0, 0.5]])
    scale = likelihood.conditional_scale(draws)
    z = draws.reshape(-1, 6, 3)
    cov = np.stack([np.cov(z[:, i].T) for i in range(6)])
    lam = 4 / 80
    want = (1 - lam) * cov + lam * cov * np.eye(3)
    np.testing.assert_allclose(scale @ np.swapaxes(scale, -1, -2), want, rtol=1e-12, atol=1e-14)
    assert np.all(np.triu(scale, 1) == 0)
    sd = np.full((6, 3), 2.0)
    given = likelihood.conditional_scale(draws, sd)
    np.testing.assert_allclose(np.diagonal(given @ np.swapaxes(given, -1, -2), 0, -2, -1), 4.0, rtol=1e-12)
    few = likelihood.conditional_scale(draws[:1, :4])
    np.testing.assert_allclose(few, np.sqrt(np.var(draws[0, :4], 0, ddof=1))[..., None] * np.eye(3), rtol=1e-12)


def test_full_proposal_importance_sampling_is_exact_in_expectation_and_closer(setup):
    """A proposal scaled by each unit's covariance factor (``cond_sd`` ``[n, d, d]``, in a defensive mixture with the
    diagonal proposal of the same sds): the exact marginal within the Monte-Carlo error, with less of it than the
    diagonal proposal on this correlated posterior; a diagonal factor is the diagonal proposal itself (the same draws,
    the terms to rounding)."""
    model, theta, t, y = setup
    mean, cov = exact_posterior(theta, t, y)
    sd = torch.sqrt(torch.diagonal(cov, 0, -2, -1))
    exact = float(exact_marginal(theta, t, y).sum())
    diagonal = likelihood.log_likelihood_is(model, theta, mean, sd, num_samples=4000, seed=3)
    full = likelihood.log_likelihood_is(model, theta, mean, torch.linalg.cholesky(cov), num_samples=4000, seed=3)
    assert abs(full.value - exact) < 4 * full.mc_se + 1e-3
    assert full.mc_se < 0.6 * diagonal.mc_se, (full.mc_se, diagonal.mc_se)
    as_matrix = likelihood.log_likelihood_is(model, theta, mean, torch.diag_embed(sd), num_samples=4000, seed=3)
    np.testing.assert_allclose(as_matrix.per_unit, diagonal.per_unit, rtol=1e-13)
    # a misjudged covariance (a ridge: correlation 0.999 where the posterior's is not) stays within the diagonal
    # component's reach: the weights are at most twice the diagonal proposal's
    ridge = torch.tensor([[1.0, 0.0], [0.999, (1 - 0.999 ** 2) ** 0.5]], dtype=torch.float64)
    misjudged = likelihood.log_likelihood_is(model, theta, mean, sd[..., None] * ridge, num_samples=4000, seed=3)
    assert abs(misjudged.value - exact) < 4 * misjudged.mc_se + 1e-3 and misjudged.mc_se < 2 * diagonal.mc_se


def _expected_information(model, theta, t, y):
    """−∇²_x E_{y~p(y;θ0)}[log p(y; θ(x))] at x0 (closed-form expectation; independent of fisher.py)."""
    pv = fisher.ParamVector(model, theta)
    x = _design(t)
    eye = torch.eye(t.shape[1], dtype=t.dtype)
    mean0 = x @ theta["mu"]
    v0 = x @ theta["cov"] @ x.transpose(-1, -2) + theta["sigma"] ** 2 * eye

    def neg_kl(u):
        th = pv.theta_of(u)
        mean = x @ th["mu"]
        v = x @ th["cov"] @ x.transpose(-1, -2) + th["sigma"] ** 2 * eye
        vinv = torch.linalg.inv(v)
        d = (mean - mean0)[..., None]
        return -0.5 * (torch.logdet(v) + torch.einsum("nab,nba->n", vinv, v0)
                       + (d.transpose(-1, -2) @ vinv @ d)[..., 0, 0]).sum()

    return -torch.autograd.functional.hessian(neg_kl, pv.x0).numpy()


def test_linearised_fisher_is_the_exact_expected_information(setup):
    model, theta, t, y = setup
    modes = conditional_modes(model, theta, num_steps=5).mode
    rec = fisher.fim_linearisation(model, theta, modes)
    expected = _expected_information(model, theta, t, y)
    np.testing.assert_allclose(rec.fim, expected, atol=1e-8 * np.abs(expected).max())
    # the cov param has 3 free entries: its symmetric pair shares one SE, ``se`` is the delta-method sd
    se = rec.as_dict()
    assert abs(se["cov[0,1]"] - se["cov[1,0]"]) < 1e-12 and se["cov[0,1]"] > 0


def test_louis_identity_with_exact_posterior_draws(setup):
    model, theta, t, y = setup
    mean, cov = exact_posterior(theta, t, y)
    torch.manual_seed(0)
    draws = torch.distributions.MultivariateNormal(mean, cov).sample((4000,))  # [S, n, 2]
    rec = fisher.fim_louis(model, theta, draws.numpy(), batch_size=1000)
    pv = fisher.ParamVector(model, theta)
    observed = -torch.autograd.functional.hessian(lambda u: exact_marginal(pv.theta_of(u), t, y).sum(),
                                                  pv.x0).numpy()
    used = np.abs(observed).max(1) > 0
    obs, got = observed[np.ix_(used, used)], rec.fim[np.ix_(used, used)]
    # Monte-Carlo error of the score covariance: compare the covariances (SEs) within 8%
    se_obs = np.sqrt(np.diag(np.linalg.inv(obs)))
    se_got = np.sqrt(np.diag(np.linalg.inv(got)))
    np.testing.assert_allclose(se_got, se_obs, rtol=0.08)


def test_linearisation_needs_gaussian_faces():
    pyro.clear_param_store()

    def poisson_model(y):
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("unit", y.shape[0], dim=-2):
            b = pyro.sample("b", pyro.distributions.Normal(mu, 1.0))
            with pyro.plate("obs", y.shape[1], dim=-1):
                pyro.sample("y", pyro.distributions.Poisson(b.exp()), obs=y)

    model = PyroLatentModel(poisson_model, (torch.ones(4, 3),))
    assert not model.has_gaussian_obs and model.has_gaussian_prior
    with pytest.raises(ModelSpecificationError, match="Gaussian faces"):
        likelihood.log_likelihood_lin(model, model.init_params(), torch.zeros(4, 1))
    pyro.clear_param_store()


def _np_marginal(v, t, y):
    """Exact log p(y; θ) of the random-slope model, θ = (μ0, μ1, Ω00, Ω01, Ω11, σ) (numpy)."""
    mu, cov, sigma = v[:2], np.array([[v[2], v[3]], [v[3], v[4]]]), v[5]
    x = np.stack([np.ones_like(t), t], -1)
    mean = x @ mu
    vcov = x @ cov @ np.swapaxes(x, -1, -2) + sigma ** 2 * np.eye(t.shape[1])
    r = y - mean
    _, logdet = np.linalg.slogdet(vcov)
    return float(np.sum(-0.5 * np.einsum("na,nab,nb->n", r, np.linalg.inv(vcov), r) - 0.5 * logdet
                        - 0.5 * t.shape[1] * np.log(2 * np.pi)))


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
def test_is_and_louis_on_both_backends(backend):
    """IS log-likelihood and Louis SEs on the Pyro and the NumPyro adapter against numpy closed forms."""
    rng = np.random.default_rng(1)
    n, m = 15, 5
    t = np.tile(np.linspace(0, 4, m), (n, 1))
    b = rng.multivariate_normal([1.0, 0.5], [[0.5, 0.1], [0.1, 0.2]], size=n)
    y = b[:, :1] + b[:, 1:] * t + rng.normal(0, 0.3, size=(n, m))
    model = backend.latent_model(backend.models.random_slope, backend.tensor(t), backend.tensor(y))
    # at the MLE (the observed information is only reparameterisation-invariant where the score vanishes)
    from scipy.optimize import minimize

    v0 = minimize(lambda v: -_np_marginal(v, t, y), np.array([0.8, 0.6, 0.6, 0.05, 0.15, 0.35]), method="BFGS",
                  options={"gtol": 1e-9}).x
    theta = {"mu": backend.tensor(v0[:2]), "cov": backend.tensor([[v0[2], v0[3]], [v0[3], v0[4]]]),
             "sigma": backend.tensor(v0[5])}
    # exact posterior of b_i (numpy)
    x = np.stack([np.ones_like(t), t], -1)
    p0 = np.linalg.inv([[v0[2], v0[3]], [v0[3], v0[4]]])
    cov_post = np.linalg.inv(p0 + np.einsum("nta,ntb->nab", x, x) / v0[5] ** 2)
    mean_post = np.einsum("nab,nb->na", cov_post, p0 @ v0[:2] + np.einsum("nta,nt->na", x, y) / v0[5] ** 2)
    sd_post = np.sqrt(np.diagonal(cov_post, 0, -2, -1))
    res = likelihood.log_likelihood_is(model, theta, mean_post, sd_post, num_samples=2000, batch_size=1000, seed=3)
    exact = _np_marginal(v0, t, y)
    assert abs(res.value - exact) < 4 * res.mc_se + 1e-3
    # adaptive Gauss–Hermite: the integrand is Gaussian, so any number of nodes is exact (1 node = Laplace)
    for nodes in (1, 3):
        gq = likelihood.log_likelihood_gq(model, theta, num_nodes=nodes)
        assert gq.value == pytest.approx(exact, abs=1e-8) and gq.per_unit.shape == (n,)
    # and maximising it from elsewhere finds scipy's maximum of the closed form
    start = {"mu": backend.tensor([0.5, 0.8]), "cov": backend.tensor([[0.9, 0.0], [0.0, 0.4]]),
             "sigma": backend.tensor(0.6)}
    best = likelihood.maximise_log_likelihood_gq(model, start, num_nodes=2)
    assert best.converged and best.log_lik.value == pytest.approx(exact, abs=1e-6)
    got = best.as_dict(model.ops)
    np.testing.assert_allclose(np.r_[got["mu"], got["cov"][0], got["cov"][1, 1], got["sigma"]],
                               np.r_[v0[:4], v0[4:]], atol=1e-4)
    # Louis' identity with exact posterior draws against the finite-difference observed information
    draws = mean_post + np.einsum("nab,snb->sna", np.linalg.cholesky(cov_post), rng.normal(size=(2000, n, 2)))
    rec = fisher.fim_louis(model, theta, draws, batch_size=2000)
    h = 1e-4
    hess = np.zeros((6, 6))
    for i in range(6):
        for j in range(6):
            e_i, e_j = np.eye(6)[i] * h, np.eye(6)[j] * h
            hess[i, j] = (_np_marginal(v0 + e_i + e_j, t, y) - _np_marginal(v0 + e_i - e_j, t, y)
                          - _np_marginal(v0 - e_i + e_j, t, y) + _np_marginal(v0 - e_i - e_j, t, y)) / (4 * h * h)
    se_exact = np.sqrt(np.diag(np.linalg.inv(-hess)))
    se = rec.as_dict()
    got = np.array([se["mu[0]"], se["mu[1]"], se["cov[0,0]"], se["cov[0,1]"], se["cov[1,1]"], se["sigma"]])
    np.testing.assert_allclose(got, se_exact, rtol=0.1)


def test_exact_marginal_is_the_default_for_mixtures():
    """GaussianMixture (has_exact_marginal): log_likelihood() is Σ_i log Σ_k ω_k N(x_i; μ_k, Σ_k), AIC/BIC count
    K − 1 weights, K·d means and K·d(d+1)/2 covariance entries."""
    from scipy.stats import multivariate_normal

    from latentfit.inference.em import EM
    from latentfit.models.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    x = rng.normal(size=(300, 2)) * 0.6 + centres[rng.integers(0, 3, 300)]
    fit = EM(GaussianMixture(torch.tensor(x), 3, "full", seed=1), num_epochs=50, progress=False).run()
    p = fit.params
    dens = sum(p["weights"][k] * multivariate_normal(p["locs"][k], p["covariances"][k]).pdf(x) for k in range(3))
    assert fit.log_likelihood() == pytest.approx(np.log(dens).sum(), abs=1e-8)
    assert fit.log_likelihoods["exact"].per_unit.shape == (300,)
    assert fit.num_params == 2 + 6 + 9
    assert fit.bic == pytest.approx(-2 * fit.log_likelihood() + 17 * np.log(300))
    # EM keeps no latent draws: the exact observed information (tests/test_mixture_standard_errors.py)
    table = fit.summary()
    assert list(table.columns) == ["estimate", "se", "rse%"] and np.isfinite(table["se"]).all()
    assert list(fit.summary(se=False).columns) == ["estimate"]


def _poisson_intercept(y):
    """y_ij ~ Poisson(exp(b_i)), b_i ~ N(μ, ω²): a plain Pyro model with no Gaussian observation face."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=torch.distributions.constraints.positive)
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", pyro.distributions.Normal(mu, omega))
        with pyro.plate("obs", y.shape[1], dim=-1):
            pyro.sample("y", pyro.distributions.Poisson(b.exp()), obs=y)


def _quadrature_log_lik(v, y):
    """Σ_i log ∫ Π_j Poisson(y_ij; e^b) N(b; μ, ω²) db on a fine grid (numpy)."""
    from scipy.special import gammaln, logsumexp

    mu, omega = v
    b = np.linspace(mu - 9 * omega, mu + 9 * omega, 4001)
    log_prior = -0.5 * ((b - mu) / omega) ** 2 - np.log(omega) - 0.5 * np.log(2 * np.pi)
    ll = (y.sum(1)[:, None] * b[None] - y.shape[1] * np.exp(b)[None] - gammaln(y + 1).sum(1)[:, None])
    return float(np.sum(logsumexp(ll + log_prior, axis=1) + np.log(b[1] - b[0])))


def test_plain_pyro_poisson_model_is_loglik_and_louis_se():
    """A non-Gaussian plain Pyro model: IS log-likelihood against quadrature, Louis SEs against the
    finite-difference observed information of the quadrature likelihood, clear errors for what needs faces."""
    from latentfit.pyro import SAEM

    pyro.clear_param_store()
    rng = np.random.default_rng(2)
    y = rng.poisson(np.exp(rng.normal(0.5, 0.6, size=(100, 1))), size=(100, 5)).astype(float)
    fit = SAEM(_poisson_intercept, num_iters=(100, 100), seed=0, progress=False).run(torch.tensor(y))
    v = np.array([fit.params["mu"], fit.params["omega"]], dtype=float)
    ll = fit.log_likelihood()
    assert fit.log_likelihoods["is"].method == "is"
    assert abs(ll - _quadrature_log_lik(v, y)) < 4 * fit.log_likelihoods["is"].mc_se + 0.01
    h = 1e-4
    hess = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            e_i, e_j = np.eye(2)[i] * h, np.eye(2)[j] * h
            hess[i, j] = (_quadrature_log_lik(v + e_i + e_j, y) - _quadrature_log_lik(v + e_i - e_j, y)
                          - _quadrature_log_lik(v - e_i + e_j, y) + _quadrature_log_lik(v - e_i - e_j, y)) / (4 * h * h)
    se_exact = np.sqrt(np.diag(np.linalg.inv(-hess)))
    se = fit.standard_errors()  # default "sa" without Gaussian faces
    np.testing.assert_allclose([se["mu"], se["omega"]], se_exact, rtol=0.15)
    # adaptive Gauss–Hermite quadrature (Hessian-scaled: no Gaussian observation face) is deterministic
    assert fit.log_likelihood("gq") == pytest.approx(_quadrature_log_lik(v, y), abs=1e-4)
    assert fit.log_likelihoods["gq"].per_unit.shape == (100,)
    from scipy.optimize import minimize

    v_ml = minimize(lambda w: -_quadrature_log_lik(w, y), v, method="Nelder-Mead",
                    options={"xatol": 1e-7, "fatol": 1e-9}).x
    best = likelihood.maximise_log_likelihood_gq(fit.model, fit.model.init_params())
    np.testing.assert_allclose([float(best.theta["mu"]), float(best.theta["omega"])], v_ml, atol=2e-4)
    with pytest.raises(ModelSpecificationError, match="pass fewer nodes"):
        likelihood.gauss_hermite_grid(6, 12)
    with pytest.raises(ValueError, match="num_nodes must be a positive integer"):
        fit.log_likelihood("gq", num_nodes=0)
    assert list(fit.summary().columns) == ["estimate", "se", "rse%"]
    with pytest.raises(ModelSpecificationError, match="Gaussian faces"):
        fit.summary(method="lin")  # the requested method fails: an error, not a table without SEs
    with pytest.raises(ModelSpecificationError, match="Gaussian faces"):
        fit.log_likelihood("lin")
    with pytest.raises(ModelSpecificationError, match="need Gaussian observations \\(a Normal likelihood"):
        fit.residuals()
    with pytest.raises(ValueError, match="method must be"):
        fit.log_likelihood("quadrature")
    with pytest.raises(ValueError, match="df must be a positive integer"):
        fit.log_likelihood("is", df=2.5)
    pyro.clear_param_store()
