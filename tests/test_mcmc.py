"""The batched MH kernels sample a known Gaussian posterior (moments within Monte-Carlo error).

Every test runs on both backends (torch and JAX ops, the ``backend`` fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentfit.inference import mcmc
from latentfit.inference.model import LatentModel, LatentSite


class ConjugateGaussian(LatentModel):
    """z_i ~ N(0, I_d), y_i | z_i ~ N(z_i, s² I_d): posterior N(y/(1+s²), s²/(1+s²) I)."""

    def __init__(self, y: np.ndarray, s: float, ops) -> None:
        self.ops = ops
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


def _moments_ok(z: np.ndarray) -> None:
    z = z.reshape(-1, D)
    n = z.shape[0]
    mean_err = np.abs(z.mean(0) - POST_MEAN)
    assert np.all(mean_err < 4.5 * np.sqrt(POST_VAR / n)), (z.mean(0), POST_MEAN)
    var = z.var(0)
    # var of the sample variance of Gaussian draws: 2σ⁴/(n−1)
    assert np.all(np.abs(var - POST_VAR) < 4.5 * np.sqrt(2 * POST_VAR**2 / (n - 1))), (var, POST_VAR)


def _run(backend, kernel: str, iters: int = 60) -> tuple[np.ndarray, list]:
    torch.manual_seed(1)
    model = ConjugateGaussian(Y, S, backend.ops())
    ops = model.ops
    key = ops.key(1)  # None on torch (global generator), a PRNG key on JAX

    def evaluate(z):
        return model.log_densities({}, z)

    def step(state, scale, k1, k2, k):
        if kernel == "prior_imh":
            state, acc = mcmc.prior_imh(ops, k1, state, lambda kk: model.sample_prior({}, kk, 1), evaluate)
        elif kernel == "rw":
            state, acc = mcmc.rw_componentwise(ops, k1, state, scale, evaluate)
            scale = mcmc.adapt_scale(scale, acc)
        else:
            mask = mcmc.random_block_mask(ops, k1, D, k)
            state, acc = mcmc.rw_block(ops, k2, state, scale, mask, evaluate)
            scale = mcmc.adapt_scale(scale, acc, mask)
        return state, scale, acc

    step = ops.jit(step)  # compiled once on JAX (identity on torch)
    key, k0 = ops.split(key)
    state = mcmc.init_chain_state(model.sample_prior({}, k0, 1), evaluate)
    scale = ops.asarray(np.full(D, 0.5))
    rates = []
    for k in range(1, iters + 1):
        key, k1, k2 = ops.split(key, 3)
        state, scale, acc = step(state, scale, k1, k2, k)
        rates.append(ops.to_numpy(acc))
    return ops.to_numpy(state.z), rates


@pytest.mark.parametrize("kernel", ["prior_imh", "rw", "block"])
def test_kernel_samples_gaussian_posterior(backend, kernel):
    z, rates = _run(backend, kernel)
    _moments_ok(z)
    assert 0.0 < float(np.mean([np.mean(r) for r in rates])) < 1.0


def test_scale_adaptation_reaches_target_acceptance(backend):
    _, rates = _run(backend, "rw", iters=120)
    late = np.mean(rates[-40:], axis=0)
    assert np.all(np.abs(late - mcmc.TARGET_ACCEPTANCE) < 0.08), late


def test_independent_mh_with_exact_posterior_accepts_everything(backend):
    torch.manual_seed(2)
    model = ConjugateGaussian(Y[:500], S, backend.ops())
    ops, xp = model.ops, model.ops.xp
    key = ops.key(2)
    post_mean = ops.asarray(POST_MEAN)

    def evaluate(z):
        return model.log_densities({}, z)

    def log_q(z):
        return -0.5 * xp.sum((z - post_mean) ** 2, -1) / POST_VAR

    key, k0 = ops.split(key)
    state = mcmc.init_chain_state(model.sample_prior({}, k0, 1), evaluate)
    for _ in range(3):
        key, k1, k2 = ops.split(key, 3)
        prop = post_mean + np.sqrt(POST_VAR) * ops.normal(k1, tuple(state.z.shape))
        state, ok = mcmc.independent_mh(ops, k2, state, prop, log_q(prop), log_q(state.z), evaluate)
        assert bool(xp.all(ok))
