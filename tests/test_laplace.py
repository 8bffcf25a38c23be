"""Batched conditional modes and Laplace covariances (latentfit.inference.laplace)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentfit.inference.laplace import conditional_modes, mvn_log_prob, mvn_sample
from latentfit.inference.model import LatentModel
from latentfit.inference.ops import TorchOps


class LinearGaussian(LatentModel):
    """``y_ij = x_ij·z_i + ε``, ε ~ N(0, σ²), z_i ~ N(m, Ω): the posterior is Gaussian and known."""

    has_gaussian_obs = True
    has_gaussian_prior = True

    def __init__(self, n=7, t=5, seed=0, poisson=False):
        rng = np.random.default_rng(seed)
        self.ops = TorchOps(dtype=torch.float64)
        self.num_units, self.latent_dim = n, 2
        self.x = torch.tensor(np.stack([np.ones((n, t)), rng.uniform(0, 2, (n, t))], -1))  # [n, t, 2]
        self.mask = torch.tensor(rng.uniform(size=(n, t)) > 0.2)
        self.mask[:, 0] = True
        self.m = torch.tensor([0.5, -0.3], dtype=torch.float64)
        self.omega = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=torch.float64)
        self.sigma = 0.4
        self.poisson = poisson
        z = rng.multivariate_normal(self.m.numpy(), self.omega.numpy(), size=n)
        eta = np.einsum("ntd,nd->nt", self.x.numpy(), z)
        y = rng.poisson(np.exp(eta)) if poisson else eta + self.sigma * rng.normal(size=eta.shape)
        self.y = torch.tensor(y, dtype=torch.float64)
        if poisson:
            self.has_gaussian_obs = False

    def _take(self, a, units):
        return a if units is None else a[units]

    def predict(self, theta, z, units=None):
        mean = torch.einsum("ntd,...nd->...nt", self._take(self.x, units), z)
        return mean, torch.full_like(mean, self.sigma)

    def observations(self, units=None):
        return self._take(self.y, units), self._take(self.mask, units)

    def prior_moments(self, theta, units=None):
        n = self.num_units if units is None else len(units)
        return self.m.expand(n, 2), self.omega

    def log_densities(self, theta, z, units=None):
        y, mask = self.observations(units)
        eta = torch.einsum("ntd,...nd->...nt", self._take(self.x, units), z)
        if self.poisson:
            lp_obs = y * eta - torch.exp(eta) - torch.lgamma(y + 1)
        else:
            lp_obs = -0.5 * ((y - eta) / self.sigma) ** 2 - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)
        ll = torch.where(mask, lp_obs, 0.0).sum(-1)
        lp = torch.distributions.MultivariateNormal(self.m, self.omega).log_prob(z)
        return ll, lp


def exact_posterior(model):
    prec0 = torch.linalg.inv(model.omega)
    x = torch.where(model.mask[..., None], model.x, 0.0)
    prec = prec0 + torch.einsum("ntd,nte->nde", x, x) / model.sigma ** 2
    rhs = prec0 @ model.m + torch.einsum("ntd,nt->nd", x, torch.where(model.mask, model.y, 0.0)) / model.sigma ** 2
    cov = torch.linalg.inv(prec)
    return torch.einsum("nde,ne->nd", cov, rhs), cov


@pytest.mark.parametrize("method", ["gauss_newton", "hessian"])
def test_linear_gaussian_modes_and_covariances_are_exact(method):
    model = LinearGaussian()
    res = conditional_modes(model, {}, method=method, num_steps=3)
    mean, cov = exact_posterior(model)
    assert torch.allclose(res.mode, mean, atol=1e-10)
    assert torch.allclose(res.cov, cov, atol=1e-10)
    assert float(res.grad_norm.max()) < 1e-8


def test_units_subset_matches_full_run():
    model = LinearGaussian(n=9)
    full = conditional_modes(model, {}, num_steps=3)
    units = torch.tensor([7, 2, 4])
    sub = conditional_modes(model, {}, units=units, num_steps=3)
    assert torch.allclose(sub.mode, full.mode[units], atol=1e-10)
    assert torch.allclose(sub.cov, full.cov[units], atol=1e-10)


def test_poisson_mode_is_stationary_and_matches_scipy():
    from scipy.optimize import minimize

    model = LinearGaussian(n=6, t=8, poisson=True, seed=3)
    res = conditional_modes(model, {}, num_steps=25)  # auto -> Hessian (no Gaussian observation face)
    assert float(res.grad_norm.max()) < 1e-6
    for i in range(model.num_units):  # reference: scipy on each unit separately
        def nll(v, i=i):
            z = torch.tensor(v, dtype=torch.float64)[None]
            ll, lp = model.log_densities({}, z, torch.tensor([i]))
            return -float(ll + lp)

        ref = minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-9}).x
        np.testing.assert_allclose(res.mode[i].numpy(), ref, atol=1e-5)
    # Laplace covariance = inverse negative Hessian (Poisson: X^T diag(exp(η)) X + Ω^{-1})
    x = torch.where(model.mask[..., None], model.x, 0.0)
    eta = torch.einsum("ntd,nd->nt", model.x, res.mode)
    prec = torch.einsum("ntd,nt,nte->nde", x, torch.exp(eta), x) + torch.linalg.inv(model.omega)
    assert torch.allclose(res.precision, prec, atol=1e-8)


def test_gauss_newton_needs_gaussian_faces():
    model = LinearGaussian(poisson=True)
    with pytest.raises(ValueError, match="gauss_newton"):
        conditional_modes(model, {}, method="gauss_newton")


def test_mvn_sample_log_prob_matches_torch():
    ops = TorchOps(dtype=torch.float64)
    torch.manual_seed(0)
    mean = torch.randn(4, 3, dtype=torch.float64)
    a = torch.randn(4, 3, 3, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(3, dtype=torch.float64)
    z, logq = mvn_sample(ops, None, mean, cov, 5)
    ref = torch.distributions.MultivariateNormal(mean, cov).log_prob(z)
    assert z.shape == (5, 4, 3)
    assert torch.allclose(logq, ref, atol=1e-10)
    assert torch.allclose(mvn_log_prob(ops, z, mean, torch.linalg.cholesky(cov)), ref, atol=1e-10)


def test_forward_mode_batched_jacobian_matches_reverse_mode():
    from latentfit.inference.laplace import batched_jacobian_fwd

    ops = TorchOps(dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(z):
        return torch.stack([z[:, 0] * z[:, 1], torch.exp(z[:, 2]), z.sum(-1) ** 2, torch.sin(z[:, 0])], -1)

    assert torch.allclose(batched_jacobian_fwd(ops, f, x), ops.batched_jacobian(f)(x), atol=1e-12)
