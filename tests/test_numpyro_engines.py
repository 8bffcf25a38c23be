"""Cross-backend and NumPyro-specific engine tests.

The engine tests themselves run on both backends through the ``backend`` fixture (test_em_family,
test_mixture, test_mixed, test_fsaem).  Here: exact engines (no randomness once the data order is
fixed) agree between torch and JAX to round-off on the same model; the NumPyro front door refuses a
torch model; f-SAEM's Laplace proposal stays the exact conditional through ``model.numpyro_model``
(the NumPyro adapter's Gaussian faces); a plain NumPyro mixture is fitted by enumeration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from latentfit.models import nlme
from latentfit.models.mixture import GaussianMixture

CENTRES = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])


def _mixture_data(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 3, n)
    return rng.normal(size=(n, 2)) * 0.6 + CENTRES[lab]


@pytest.mark.parametrize("engine, options", [
    ("EM", dict(num_epochs=30)),
    ("IEM", dict(num_epochs=3, batch_size=10, shuffle=False)),
    ("MiniBatchEM", dict(num_epochs=5, shuffle=False)),
])
def test_exact_engines_agree_on_torch_and_jax(engine, options):
    import latentfit.numpyro as lnp
    import latentfit.pyro as lpy

    x = _mixture_data()
    fit_t = getattr(lpy, engine)(GaussianMixture(torch.tensor(x), 3, "full", seed=1), progress=False,
                                 **options).run()
    fit_j = getattr(lnp, engine)(GaussianMixture(jnp.asarray(x), 3, "full", seed=1), progress=False,
                                 **options).run(jax.random.PRNGKey(0))
    assert fit_j.model.ops.name == "jax"
    for name, value in fit_t.params.items():
        np.testing.assert_allclose(fit_j.params[name], value, rtol=1e-9, atol=1e-10)


def test_numpyro_front_door_refuses_a_torch_model():
    import latentfit.numpyro as lnp

    with pytest.raises(TypeError, match="JAX arrays"):
        lnp.EM(GaussianMixture(torch.tensor(_mixture_data(50)), 2, seed=1))


def _linear_nlme(seed: int = 0) -> nlme.NLME:
    """``y_ij = b0_i + b1_i t_ij + a ε``, b ~ N(μ, Ω): a linear Gaussian model (as in test_fsaem)."""

    def line(psi, data):
        return psi["b0"] + psi["b1"] * data.time

    design = nlme.design_table(30, [0.0, 1.0, 2.0, 4.0], dose=1.0)
    gen = nlme.NLME(line, {"b0": nlme.Parameter(2.0, "normal", omega2=0.5),
                           "b1": nlme.Parameter(-0.5, "normal", omega2=0.1)}, omega="full",
                    error_init={"a": 0.3}, data=design)
    df = gen.simulate(seed=seed)
    return nlme.NLME(line, {"b0": nlme.Parameter(0.0, "normal"), "b1": nlme.Parameter(0.0, "normal")},
                     omega="full", data=df)


def test_fsaem_on_the_numpyro_model_of_an_nlme():
    """Through the NumPyro adapter (its Gaussian faces give the Gauss-Newton proposal): still exact."""
    from latentfit.numpyro import FSAEM

    model = _linear_nlme()
    fit = FSAEM(model.numpyro_model, num_iters=(4, 0), imh_iters=4, imh_steps=4, burn_in=2, progress=False).run(
        jax.random.PRNGKey(2))
    assert fit.engine.laplace_method == "gauss_newton"
    np.testing.assert_array_equal(fit.acceptance["nlme_imh"], np.ones(4))


def _plain_numpyro_mixture(init: dict, cov: str):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(x):
        w = numpyro.param("w", init["weights"], constraint=constraints.simplex)
        mu = numpyro.param("mu", init["locs"])
        if cov == "full":
            c = numpyro.param("sigma", init["covariances"], constraint=constraints.positive_definite)
        else:
            c = numpyro.param("scale", jnp.sqrt(init["covariances"]), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            if cov == "full":
                numpyro.sample("obs", dist.MultivariateNormal(mu[z], covariance_matrix=c[z]), obs=x)
            else:
                numpyro.sample("obs", dist.Normal(mu[z], c[z]).to_event(1), obs=x)

    return model


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_plain_numpyro_mixture_by_enumeration_gives_gaussianmixture_estimates(cov):
    """A NumPyro mixture with a Categorical label: exact E-step by enumeration over the label, the
    Gaussian-mixture M-step recognised; EM lands on GaussianMixture's EM estimates (to 1e-9)."""
    from latentfit.inference.em import EM as CoreEM
    from latentfit.integrations.numpyro import NumPyroEnumModel
    from latentfit.numpyro import EM

    x = jnp.asarray(_mixture_data(200, seed=3))
    gm = GaussianMixture(x, 3, cov, seed=0)
    init = {k: p.value for k, p in gm.params.items()}
    model = _plain_numpyro_mixture(init, cov)
    enum = NumPyroEnumModel(model, (x,))
    cov_name = "sigma" if cov == "full" else "scale"
    assert enum.has_expected_stats and set(enum.closed_form_params) == {"w", "mu", cov_name}
    th = enum.init_params()
    np.testing.assert_allclose(enum.marginal_log_lik(th), gm.marginal_log_lik(gm.init_params()), rtol=1e-10)
    np.testing.assert_allclose(enum.responsibilities(th)[0], gm.responsibilities(gm.init_params())[0], atol=1e-12)
    ref = CoreEM(gm, num_epochs=40, progress=False).run(jax.random.PRNGKey(0)).params
    fit = EM(model, num_epochs=40, progress=False).run(jax.random.PRNGKey(0), x)
    got = fit.params["sigma"] if cov == "full" else fit.params["scale"] ** 2
    np.testing.assert_allclose(fit.params["mu"], ref["locs"], atol=1e-9)
    np.testing.assert_allclose(got, ref["covariances"], atol=1e-9)
    np.testing.assert_allclose(fit.params["w"], ref["weights"], atol=1e-9)


def test_numpyro_tutorial_gmm_with_a_shared_scale_gives_the_mle():
    """The NumPyro twin of the Pyro tutorial's GMM with one scale shared by the components (``Normal(locs[a], scale)``,
    a scalar param): the same enumeration adapter recognises the tied mixture; EM gives the maximum-likelihood
    estimates of a direct EM of the same model from the same start, and its log-likelihood never decreases."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from test_mixture import _numpy_em_shared_scale, _one_d_data

    from latentfit.integrations.numpyro import NumPyroEnumModel
    from latentfit.numpyro import EM

    def model(data):
        weights = numpyro.param("weights", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
        scale = numpyro.param("scale", jnp.array(1.0), constraint=constraints.positive)
        with numpyro.plate("data", len(data)):
            a = numpyro.sample("assignment", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[a], scale), obs=data)

    x = _one_d_data()
    w, mu, sd, ll = _numpy_em_shared_scale(x, [0.5, 0.5], [-1.0, 1.0], 1.0)
    enum = NumPyroEnumModel(model, (jnp.asarray(x),))
    assert enum._gm.covariance_type == "tied_spherical" and set(enum.closed_form_params) == {"weights", "locs", "scale"}
    fit = EM(model, num_epochs=150, progress=False).run(jax.random.PRNGKey(0), jnp.asarray(x))
    np.testing.assert_allclose(fit.params["weights"], w, atol=1e-10)
    np.testing.assert_allclose(fit.params["locs"], mu, atol=1e-10)
    np.testing.assert_allclose(fit.params["scale"], sd, atol=1e-10)
    obj = np.asarray(fit.history["objective"])
    assert np.all(np.diff(obj) >= -1e-9 * np.abs(obj[1:])) and abs(obj[-1] - ll) < 1e-8
