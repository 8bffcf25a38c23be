"""The linearisation's Fisher information where θ enters the structural prediction besides through the latents:
the non-centred Normal–Normal model (NumPyro's eight-schools tutorial form), ``y_j ~ N(μ + τ z_j, σ_j²)``,
``z_j ~ N(0, 1)``, has the Jacobian ``∂f/∂z = τ``.  The model is linear in z, so its linearisation is exact and the
information is the marginal's, ``y_j ~ N(μ, τ² + σ_j²)``: ``I_μμ = Σ 1/v_j``, ``I_ττ = Σ 2τ²/v_j²``, ``I_μτ = 0``
(``v_j = τ² + σ_j²``).  With the Jacobian held at θ̂ the SE of τ came out 40% too large (1.68 against 1.21 on these
60 schools; the centred form, where τ is the prior's scale, was right)."""

from __future__ import annotations

import numpy as np
import pytest

RNG = np.random.default_rng(3)
J = 60
SIGMA = RNG.uniform(3, 12, J)
Y = 4.0 + 6.0 * RNG.standard_normal(J) + SIGMA * RNG.standard_normal(J)


def _expected_se(mu: float, tau: float) -> tuple[float, float]:
    v = tau ** 2 + SIGMA ** 2
    return float(np.sum(1.0 / v) ** -0.5), float(np.sum(2.0 * tau ** 2 / v ** 2) ** -0.5)


def _check(fit) -> None:
    mu, tau = float(fit.params["mu"]), float(fit.params["tau"])
    assert 2.0 < mu < 6.0 and 4.0 < tau < 9.0  # a sensible fit (MLE μ 3.99, τ 6.17)
    se = fit.standard_errors("lin")
    want_mu, want_tau = _expected_se(mu, tau)
    assert float(se["mu"]) == pytest.approx(want_mu, rel=1e-6)
    assert float(se["tau"]) == pytest.approx(want_tau, rel=1e-6)


@pytest.mark.parametrize("form", ["centred", "noncentred"])
def test_pyro_linearisation_se_of_a_scale_inside_the_prediction(form):
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    from latentfit.pyro import SAEM

    def model(sigma, y=None):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=torch.float64))
        tau = pyro.param("tau", torch.tensor(5.0, dtype=torch.float64), constraint=constraints.positive)
        with pyro.plate("school", len(sigma)):
            if form == "centred":
                theta = pyro.sample("theta", dist.Normal(mu, tau))
            else:
                theta = mu + tau * pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    pyro.clear_param_store()
    fit = SAEM(model, num_iters=(60, 40), num_chains=10, seed=0, progress=False).run(torch.tensor(SIGMA),
                                                                                     torch.tensor(Y))
    _check(fit)
    pyro.clear_param_store()


@pytest.mark.parametrize("form", ["centred", "noncentred"])
def test_numpyro_linearisation_se_of_a_scale_inside_the_prediction(form):
    pytest.importorskip("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    from latentfit.numpyro import SAEM

    jax.config.update("jax_enable_x64", True)

    def model(sigma, y=None):
        mu = numpyro.param("mu", 0.0)
        tau = numpyro.param("tau", 5.0, constraint=constraints.positive)
        with numpyro.plate("school", sigma.shape[0]):
            if form == "centred":
                theta = numpyro.sample("theta", dist.Normal(mu, tau))
            else:
                theta = mu + tau * numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
            numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    fit = SAEM(model, num_iters=(60, 40), num_chains=10, progress=False).run(jax.random.PRNGKey(0), jnp.asarray(SIGMA),
                                                                             jnp.asarray(Y))
    _check(fit)
