"""The batched MH kernels sample a known Gaussian posterior (moments within Monte-Carlo error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentfit.inference import mcmc
from latentfit.inference.model import LatentModel, LatentSite
from latentfit.inference.ops import TorchOps


class ConjugateGaussian(LatentModel):
    """z_i ~ N(0, I_d), y_i | z_i ~ N(z_i, s² I_d): posterior N(y/(1+s²), s²/(1+s²) I)."""

    def __init__(self, y: np.ndarray, s: float, ops=None) -> None:
        self.ops = ops or TorchOps(dtype=torch.float64)
        self.y = self.ops.asarray(y)
        self.s = s
        self.num_units, self.latent_dim = y.shape
        self.latent_sites = [LatentSite("z", (self.latent_dim,), 0, self.latent_dim)]
        self.params = {}

    def log_densities(self, theta, z, units=None):
        xp = self.ops.xp
        ll = -0.5 * xp.sum((self.y - z) ** 2, -1) / self.s**2
        lp = -0.5 * xp.sum(z**2, -1)
        return ll, lp

    def sample_prior(self, theta, key, num_chains, units=None):
        return self.ops.normal(key, (num_chains, self.num_units, self.latent_dim))


N_UNITS, D, S = 4000, 2, 0.8
Y = np.tile(np.array([[1.0, -2.0]]), (N_UNITS, 1))
POST_MEAN = Y[0] / (1 + S**2)
POST_VAR = S**2 / (1 + S**2)


def _moments_ok(z: torch.Tensor) -> None:
    z = z.reshape(-1, D).numpy()
    n = z.shape[0]
    mean_err = np.abs(z.mean(0) - POST_MEAN)
    assert np.all(mean_err < 4.5 * np.sqrt(POST_VAR / n)), (z.mean(0), POST_MEAN)
    var = z.var(0)
    # var of the sample variance of Gaussian draws: 2σ⁴/(n−1)
    assert np.all(np.abs(var - POST_VAR) < 4.5 * np.sqrt(2 * POST_VAR**2 / (n - 1))), (var, POST_VAR)


def _run(kernel: str, iters: int = 60) -> tuple[torch.Tensor, list]:
    torch.manual_seed(1)
    model = ConjugateGaussian(Y, S)
    ops = model.ops

    def evaluate(z):
        return model.log_densities({}, z)

    state = mcmc.init_chain_state(model.sample_prior({}, None, 1), evaluate)
    scale = ops.asarray(np.full(D, 0.5))
    rates = []
    for k in range(1, iters + 1):
        if kernel == "prior_imh":
            state, acc = mcmc.prior_imh(ops, None, state, lambda key: model.sample_prior({}, key, 1), evaluate)
        elif kernel == "rw":
            state, acc = mcmc.rw_componentwise(ops, None, state, scale, evaluate)
            scale = mcmc.adapt_scale(scale, acc)
        else:
            mask = mcmc.random_block_mask(ops, None, D, k)
            state, acc = mcmc.rw_block(ops, None, state, scale, mask, evaluate)
            scale = mcmc.adapt_scale(scale, acc, mask)
        rates.append(acc)
    return state.z, rates


@pytest.mark.parametrize("kernel", ["prior_imh", "rw", "block"])
def test_kernel_samples_gaussian_posterior(kernel):
    z, rates = _run(kernel)
    _moments_ok(z)
    assert 0.0 < float(np.mean([np.mean(r.numpy()) for r in rates])) < 1.0


def test_scale_adaptation_reaches_target_acceptance():
    _, rates = _run("rw", iters=120)
    late = np.mean([r.numpy() for r in rates[-40:]], axis=0)
    assert np.all(np.abs(late - mcmc.TARGET_ACCEPTANCE) < 0.08), late


def test_independent_mh_with_exact_posterior_accepts_everything():
    torch.manual_seed(2)
    model = ConjugateGaussian(Y[:500], S)
    ops = model.ops

    def evaluate(z):
        return model.log_densities({}, z)

    def log_q(z):
        return -0.5 * torch.sum((z - torch.as_tensor(POST_MEAN)) ** 2, -1) / POST_VAR

    state = mcmc.init_chain_state(model.sample_prior({}, None, 1), evaluate)
    for _ in range(3):
        prop = torch.as_tensor(POST_MEAN) + np.sqrt(POST_VAR) * torch.randn_like(state.z)
        state, ok = mcmc.independent_mh(ops, None, state, prop, log_q(prop), log_q(state.z), evaluate)
        assert bool(ok.all())
