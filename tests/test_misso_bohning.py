"""MISSO's ``surrogate="bohning"`` (issue 11): non-centred latents and a quadratic majorant of the logistic likelihood.

The latents are written ``z_i = μ(x) + diag(ω(x)) ε_i`` (x: every free parameter, natural coordinates), so that the
logits are affine in x for a fixed ε and the per-unit negative complete-data log-likelihood ``−log p(y_i | z_i(x, ε))``
has Böhning's (``c = 1/4``) or Jaakkola–Jordan's (``c = (σ(η) − ½)/η`` at the anchor) quadratic majorant.  Tests:

* the stored per-draw surrogate majorises ``−log f_i(ε; x)`` at random x (every unit and chain), touches it at the
  anchor with its gradient, and Jaakkola–Jordan's curvature is at most Böhning's;
* on a hand-worked model (one Bernoulli observation per unit, ``logit = φ_i``, ``φ_i ~ N(β, ω)``) the minimiser of the
  summed surrogates after a full-batch visit is the closed form ``x⁺ = (Σ c w wᵀ)⁻¹ Σ (c w wᵀ x̄ + w (y − σ(η)))``,
  ``w = (1, ε)`` (Böhning: the MM step of logistic regression ``x̄ + 4 (Σ w wᵀ)⁻¹ Σ w (y − σ)``);
* on the benchmark's logistic mixed model (small version of tests/test_misso.py) it reaches the quadrature maximum;
* models it cannot handle are refused with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_misso import SMALL_MAX, SMALL_SE, _gq_log_lik, _small_data, _small_fit, _small_model

from latentfit.inference.misso import MISSO
from latentfit.inference.model import ModelSpecificationError


def _small_traced(backend: str):
    d = _small_data()
    if backend == "pyro":
        import pyro
        import torch

        from latentfit.integrations.pyro import PyroLatentModel

        args = tuple(torch.tensor(d[k]) if k != "num" else d[k] for k in ("t", "c", "idx", "num", "y"))
        pyro.clear_param_store()
        lm = PyroLatentModel(_small_model, args, {})
        pyro.clear_param_store()
        return lm
    import jax.numpy as jnp

    from latentfit.integrations.numpyro import NumPyroLatentModel

    args = tuple(jnp.asarray(d[k]) if k != "num" else d[k] for k in ("t", "c", "idx", "num", "y"))
    return NumPyroLatentModel(_small_numpyro_model, args, {})


def _small_numpyro_model(t, c, idx, num, y=None):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    beta = numpyro.param("beta", jnp.zeros(3))
    omega = numpyro.param("omega", jnp.full((3,), 0.5), constraint=dist.constraints.positive)
    with numpyro.plate("id", num):
        phi = numpyro.sample("phi", dist.Normal(beta, omega).to_event(1))
    with numpyro.plate("rows", len(t)):
        p = phi[idx]
        numpyro.sample("y", dist.Bernoulli(logits=p[..., 0] + p[..., 1] * t + p[..., 2] * c), obs=y)


@pytest.mark.parametrize("backend", ["pyro", pytest.param("numpyro", marks=pytest.mark.slow)])
@pytest.mark.parametrize("bound", ["jj", "bohning"])
def test_surrogate_majorises_the_negative_complete_log_likelihood(backend, bound):
    """At an anchor x̄ with a negative scale (the sign is free) and random draws: ``−log f_i(ε; x) ≤ −log f_i(ε; x̄) +
    ĝᵀ(x − x̄) + ½ (x − x̄)ᵀ B (x − x̄)`` at random x near and far, for every unit and chain; ĝ is the gradient (central
    differences); Jaakkola–Jordan's B ≤ Böhning's (positive semi-definite difference)."""
    lm = _small_traced(backend)
    ops = lm.ops
    eng = MISSO(lm, surrogate="bohning", bound=bound, num_chains=3, num_epochs=1, progress=False)
    eng.init(ops.key(0))
    rng = np.random.default_rng(3)
    n, q = lm.num_units, 6
    units = ops.arange(n)
    x_bar = np.array([-3.5, -0.4, 0.8, 0.35, -0.25, 0.3])
    z = x_bar[:3] + np.abs(x_bar[3:]) * rng.standard_normal((3, n, 3)) + 0.3 * rng.standard_normal((3, n, 3))
    xb, zb = ops.asarray(x_bar), ops.asarray(z)
    g, b = (np.asarray(ops.to_numpy(v)) for v in eng._bohning_terms(xb, zb, units))
    eps = (z - x_bar[:3]) / x_bar[3:]

    def nll(x: np.ndarray) -> np.ndarray:
        zx = x[:3] + x[3:] * eps
        return -np.asarray(ops.to_numpy(lm.log_lik(eng._bohning_theta(ops.asarray(x)), ops.asarray(zx))))

    f0 = nll(x_bar)
    h = 1e-5
    fd = np.stack([(nll(x_bar + h * e) - nll(x_bar - h * e)) / (2 * h) for e in np.eye(q)], -1)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)
    for scale in (0.01, 0.3, 1.0, 3.0):
        for _ in range(4):
            dx = scale * rng.standard_normal(q)
            bound_value = f0 + g @ dx + 0.5 * np.einsum("...i,...ij,j->...", np.broadcast_to(dx, g.shape), b, dx)
            gap = bound_value - nll(x_bar + dx)
            assert np.all(gap >= -1e-9 * (1.0 + np.abs(bound_value))), (scale, gap.min())
    if bound == "jj":
        eng4 = MISSO(lm, surrogate="bohning", bound="bohning", num_chains=3, num_epochs=1, progress=False)
        eng4.init(ops.key(0))
        _, b4 = (np.asarray(ops.to_numpy(v)) for v in eng4._bohning_terms(xb, zb, units))
        assert np.linalg.eigvalsh(b4 - b).min() > -1e-9 * np.abs(b4).max()
        assert np.all(np.trace(b, axis1=-2, axis2=-1) < np.trace(b4, axis1=-2, axis2=-1))


def _one_obs_model(y):
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    beta = pyro.param("beta", torch.tensor(0.3, dtype=torch.float64))
    omega = pyro.param("omega", torch.tensor(0.8, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("id", len(y)):
        phi = pyro.sample("phi", dist.Normal(beta, omega))
        pyro.sample("y", dist.Bernoulli(logits=phi), obs=y)


@pytest.mark.parametrize("bound", ["bohning", "jj"])
def test_minimiser_of_the_summed_surrogates_is_the_closed_form(bound):
    """One Bernoulli observation per unit, logit φ_i ~ N(β, ω): after a full-batch visit (one draw of 4 chains), x⁺ is
    the closed-form minimiser of Σ_{i, chains} [g (x − x̄) + ½ c (wᵀ(x − x̄))²], w = (1, ε), c = ¼ or JJ's."""
    import pyro
    import torch

    from latentfit.integrations.pyro import PyroLatentModel

    rng = np.random.default_rng(0)
    y = torch.tensor((rng.random(40) < 0.4).astype(float))
    pyro.clear_param_store()
    lm = PyroLatentModel(_one_obs_model, (y,), {})
    pyro.clear_param_store()
    eng = MISSO(lm, surrogate="bohning", bound=bound, num_chains=4, mc_size=4, batch_size=40, num_epochs=1,
                progress=False)
    state = eng.init(lm.ops.key(1))
    x_bar = state.memory.x.clone().numpy()
    assert x_bar.tolist() == [0.3, 0.8]
    new = eng.inner(state, lm.ops.arange(40), None, 1, lm.ops.key(2))
    phi = new.z.numpy()[..., 0]  # [n, L]: the visit's draws
    eps = (phi - x_bar[0]) / x_bar[1]
    w = np.stack([np.ones_like(eps), eps], -1)  # [n, L, 2]
    sig = 1.0 / (1.0 + np.exp(-phi))
    c = np.full_like(phi, 0.25) if bound == "bohning" else (sig - 0.5) / phi
    curv = np.einsum("nl,nli,nlj->ij", c, w, w)
    rhs = curv @ x_bar + np.einsum("nli,nl->i", w, y.numpy()[:, None] - sig)
    expected = np.linalg.solve(curv, rhs)
    np.testing.assert_allclose(new.memory.x.numpy(), expected, rtol=1e-8, atol=1e-10)
    if bound == "bohning":  # the MM step of logistic regression on the working design w
        resid = y.numpy()[:, None] - sig
        mm = x_bar + 4.0 * np.linalg.solve(np.einsum("nli,nlj->ij", w, w), np.einsum("nli,nl->i", w, resid))
        np.testing.assert_allclose(new.memory.x.numpy(), mm, rtol=1e-8, atol=1e-10)
    assert float(new.theta["omega"]) == pytest.approx(abs(float(new.memory.x[1])))


def test_reaches_the_quadrature_maximum():
    """Defaults of ``surrogate="bohning"`` (20 epochs of 50% batches, M_k = 10 … 40): the log-likelihood at the
    estimate within 0.5 of the 5-node AGQ maximum's and every parameter within 1 SE (N = 100, data seed 1)."""
    est, lm = _small_fit(surrogate="bohning")
    dll = _gq_log_lik(lm, est) - _gq_log_lik(lm, SMALL_MAX)
    assert dll > -0.5, (dll, est)
    assert np.all(np.abs(est - SMALL_MAX) < 1.0 * SMALL_SE), ((est - SMALL_MAX) / SMALL_SE, est)


@pytest.mark.slow
@pytest.mark.parametrize("backend,seed", [("pyro", 2), ("pyro", 3), ("numpyro", 1), ("numpyro", 2)])
def test_reaches_the_quadrature_maximum_on_more_fits(backend, seed):
    """The same check on other fit seeds and on NumPyro (its own random streams)."""
    if backend == "pyro":
        est, lm = _small_fit(seed=seed, surrogate="bohning")
    else:
        import jax.numpy as jnp

        import latentfit.numpyro as ln

        d = _small_data()
        args = tuple(jnp.asarray(d[k]) if k != "num" else d[k] for k in ("t", "c", "idx", "num", "y"))
        fit = ln.MISSO(_small_numpyro_model, surrogate="bohning", progress=False).run(seed, *args)
        est = np.concatenate([np.asarray(fit.params["beta"]), np.asarray(fit.params["omega"])])
        lm = _small_traced("pyro")
    dll = _gq_log_lik(lm, est) - _gq_log_lik(lm, SMALL_MAX)
    assert dll > -0.5, (dll, est)
    assert np.all(np.abs(est - SMALL_MAX) < 1.0 * SMALL_SE), ((est - SMALL_MAX) / SMALL_SE, est)


def test_refuses_models_without_the_logistic_structure():
    import pyro
    import pyro.distributions as dist
    import torch

    import latentfit.pyro as lp

    def normal_obs(y):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=torch.float64))
        sd = pyro.param("sd", torch.tensor(1.0, dtype=torch.float64), constraint=dist.constraints.positive)
        with pyro.plate("id", len(y)):
            z = pyro.sample("z", dist.Normal(mu, sd))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def fixed_scale(y):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=torch.float64))
        with pyro.plate("id", len(y)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Bernoulli(logits=z), obs=y)

    def quadratic_logits(y):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=torch.float64))
        sd = pyro.param("sd", torch.tensor(1.0, dtype=torch.float64), constraint=dist.constraints.positive)
        with pyro.plate("id", len(y)):
            z = pyro.sample("z", dist.Normal(mu, sd))
            pyro.sample("y", dist.Bernoulli(logits=z * z), obs=y)

    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    for model, match in ((normal_obs, "Bernoulli or Binomial"), (fixed_scale, "every latent to be a Normal"),
                         (quadratic_logits, "affine in the latents")):
        pyro.clear_param_store()
        with pytest.raises(ModelSpecificationError, match=match):
            lp.MISSO(model, surrogate="bohning", num_epochs=1, progress=False).run(y)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="bound must be"):
        lp.MISSO(fixed_scale, surrogate="bohning", bound="tight", progress=False).run(y)


@pytest.mark.slow  # four fits of 40 epochs (~4 s on an idle core)
def test_resume_is_bit_identical(tmp_path):
    """The stored surrogates (``curv_rows``, ``lin_rows``, their sums, the signed x) and the chains round-trip through
    a checkpoint: a run interrupted at epoch 25 and resumed from epoch 20 equals the uninterrupted one."""
    import pyro
    import torch
    from test_checkpoint import ITERS, _interrupt_and_resume

    from latentfit.integrations.pyro import PyroLatentModel

    y = torch.tensor((np.random.default_rng(0).random(30) < 0.4).astype(float))
    pyro.clear_param_store()
    lm = PyroLatentModel(_one_obs_model, (y,), {})
    pyro.clear_param_store()

    def make(**kw):
        return MISSO(lm, surrogate="bohning", num_epochs=ITERS, mc_size=3, num_chains=3, seed=1, progress=False,
                     chunk_size=5, **kw)

    _interrupt_and_resume(make, lm.ops.key(0), tmp_path)
