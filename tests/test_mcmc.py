"""The batched MH kernels sample a known Gaussian posterior (moments within Monte-Carlo error).

Every test runs on both backends (torch and JAX ops, the ``backend`` fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backends import Backend

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


def _sweep_per_step(ops, key, z, scales, k, kernels, evaluate, sample_prior):
    """saemix's sweep with one reduction per kernel step (every acceptance rate and non-finite count reduced where it
    is made): the reference :func:`mcmc.saemix_sweep` must equal."""
    xp = ops.xp
    n1, n2, n3 = kernels
    keys = ops.split(key, n1 + n2 + 2 * n3 + 1)
    chain = mcmc.init_chain_state(z, evaluate)
    d = z.shape[-1]
    eye = ops.asarray(np.eye(d))
    scale_rw, scale_block = scales
    acc = {"prior_imh": ops.zeros(()), "rw": ops.zeros((d,)), "block_rw": ops.zeros(())}
    for i in range(n1):
        k1, k2 = ops.split(keys[i])
        z_new = sample_prior(k1)
        ll, lp = evaluate(z_new)
        chain, ok = mcmc._accept(ops, k2, ll - chain.log_lik, chain, z_new, ll, lp)
        acc["prior_imh"] = acc["prior_imh"] + ops.unit_mean(ok * 1.0) / n1
    for i in range(n2):
        ks = ops.split(keys[n1 + i], 2 * d)
        a = ops.zeros((d,))
        for j in range(d):
            z_new = chain.z + ops.normal(ks[2 * j], tuple(chain.z.shape[:-1]))[..., None] * (scale_rw * eye[j])
            ll, lp = evaluate(z_new)
            chain, ok = mcmc._accept(ops, ks[2 * j + 1], ll + lp - chain.log_lik - chain.log_prior, chain, z_new,
                                     ll, lp, ll + lp)
            a = a + eye[j] * ops.unit_mean(ok * 1.0)
        scale_rw = mcmc.adapt_scale(scale_rw, a)
        acc["rw"] = acc["rw"] + a / n2
    for i in range(n3):
        mask = mcmc.random_block_mask(ops, keys[n1 + n2 + 2 * i], d, k)
        chain, a = mcmc.rw_block(ops, keys[n1 + n2 + 2 * i + 1], chain, scale_block, mask, evaluate)
        scale_block = mcmc.adapt_scale(scale_block, a, mask)
        acc["block_rw"] = acc["block_rw"] + a / n3
    return chain, (scale_rw, scale_block), acc, xp.sum(chain.num_nonfinite * 1.0)


@pytest.mark.parametrize("backend", [pytest.param(Backend("pyro"), id="pyro"),
                                     pytest.param(Backend("numpyro"), id="numpyro", marks=pytest.mark.slow)])
def test_saemix_sweep_equals_per_step_reductions(backend):
    """:func:`mcmc.saemix_sweep` keeps the prior-IMH acceptances, the random walk's per-coordinate acceptances and
    the non-finite counts per chain and unit and reduces them at the end of their loops (so that XLA makes one
    all-reduce of them on a sharded fit): the same chains, scales, rates and non-finite count as a sweep reducing at
    every kernel step, bit for bit on torch; on JAX (slow: 8 s of eager loops) to rounding, the kernels' loops being
    compiled and the reference's eager."""
    model = ConjugateGaussian(np.random.default_rng(0).normal(size=(60, 3)), S, backend.ops())
    ops = model.ops

    def evaluate(z):  # proposals with z_0 > 1.5 are outside the domain (NaN): counted, never accepted
        ll, lp = model.log_densities({}, z)
        return ops.xp.where(z[..., 0] > 1.5, float("nan"), ll), lp

    def sample_prior(kk):
        return model.sample_prior({}, kk, 2)

    kernels, k = (2, 2, 1), 4
    torch.manual_seed(5)
    z0 = model.sample_prior({}, ops.key(0), 2) * 0.1
    scales = (ops.asarray(np.full(3, 0.9)), ops.asarray(np.full(3, 0.7)))
    torch.manual_seed(6)
    chain, new_scales, acc = mcmc.saemix_sweep(ops, ops.key(1), z0, scales, k, kernels, evaluate, sample_prior)
    torch.manual_seed(6)
    ref, ref_scales, ref_acc, ref_count = _sweep_per_step(ops, ops.key(1), z0, scales, k, kernels, evaluate,
                                                          sample_prior)
    for a, b in [(chain.z, ref.z), (chain.log_lik, ref.log_lik), (new_scales[0], ref_scales[0]),
                 (new_scales[1], ref_scales[1])] + [(acc[n], ref_acc[n]) for n in ref_acc]:
        # torch: bit for bit; JAX: to rounding (XLA fuses the compiled loops' arithmetic)
        np.testing.assert_allclose(ops.to_numpy(a), ops.to_numpy(b), rtol=0 if backend.name == "pyro" else 1e-12,
                                   atol=0 if backend.name == "pyro" else 1e-14)
    assert float(ops.to_numpy(chain.num_nonfinite)) == float(ops.to_numpy(ref_count)) > 0
    assert 0 < float(ops.to_numpy(acc["prior_imh"])) < 1
