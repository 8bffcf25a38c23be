"""Standard errors of an exact-E-step mixture fit (the EM family keeps no latent draws): the observed information is
the Hessian of the exact marginal log-likelihood (what Louis' formula over exact posterior draws estimates, without its
~1% Monte-Carlo error; ``fisher.fim_exact``), with the weights' simplex and a full covariance's symmetry as the free
directions.  References: central differences of the marginal written with scipy (their own error ~1e-6 relative)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from latentfit.inference import fisher, postfit
from latentfit.inference.em import EM
from latentfit.models.mixture import GaussianMixture

pytestmark = pytest.mark.usefixtures("jax_x64")


def _exact_se(ll, v0: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """SEs from the observed information of the exact marginal ``ll`` in free coordinates ``v`` (central
    differences)."""
    p = len(v0)
    hess = np.zeros((p, p))
    for i in range(p):
        for j in range(p):
            a, b = np.eye(p)[i] * h, np.eye(p)[j] * h
            hess[i, j] = (ll(v0 + a + b) - ll(v0 + a - b) - ll(v0 - a + b) + ll(v0 - a - b)) / (4 * h * h)
    return np.sqrt(np.diag(np.linalg.inv(-hess)))


def test_one_dimensional_two_components_match_the_exact_observed_information(backend):
    """A 1-D two-component mixture fitted by EM: every SE equal to the exact observed information's to 1e-5 (weights,
    locations, variances; Louis' formula over draws was within 1%), and the two weights' SEs equal (w₂ = 1 − w₁:
    before the simplex was respected they came out 0.038 and 0.032 against the exact 0.027)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 300), rng.normal(3, 0.7, 200)])
    fit = EM(GaussianMixture(backend.tensor(x[:, None]), 2, "full", seed=1), num_epochs=200, progress=False).run()
    p = fit.params

    def ll(v: np.ndarray) -> float:
        w, m0, m1, s0, s1 = v
        dens = w * stats.norm.pdf(x, m0, np.sqrt(s0)) + (1 - w) * stats.norm.pdf(x, m1, np.sqrt(s1))
        return float(np.log(dens).sum())

    v0 = np.array([p["weights"][0], p["locs"][0, 0], p["locs"][1, 0], p["covariances"][0, 0, 0],
                   p["covariances"][1, 0, 0]])
    exact = _exact_se(ll, v0)
    se = fit.standard_errors()  # the default ("sa": a mixture has no Gaussian faces)
    got = np.array([se["weights[0]"], se["locs[0,0]"], se["locs[1,0]"], se["covariances[0,0,0]"],
                    se["covariances[1,0,0]"]])
    np.testing.assert_allclose(got, exact, rtol=1e-5)
    assert se["weights[1]"] == pytest.approx(se["weights[0]"], rel=1e-9)
    assert list(fit.summary().columns) == ["estimate", "se", "rse%"]


def test_two_dimensional_full_covariances_are_symmetric_directions(backend):
    """2-D, two full-covariance components: the SEs of the 11 free coordinates (w₁, the locations, each covariance's
    three entries) equal to the exact observed information's to 1e-4 (the differences' own error), and c₀₁'s SE
    equal to c₁₀'s."""
    rng = np.random.default_rng(1)
    c0, c1 = np.array([[1.0, 0.4], [0.4, 0.8]]), np.array([[0.5, -0.2], [-0.2, 0.6]])
    x = np.concatenate([rng.multivariate_normal([0, 0], c0, 400), rng.multivariate_normal([3, 1], c1, 300)])
    fit = EM(GaussianMixture(backend.tensor(x), 2, "full", seed=1), num_epochs=300, progress=False).run()
    p = fit.params

    def unpack(v: np.ndarray) -> tuple:
        w = v[0]
        m = v[1:5].reshape(2, 2)
        cs = [np.array([[v[5 + 3 * k], v[6 + 3 * k]], [v[6 + 3 * k], v[7 + 3 * k]]]) for k in range(2)]
        return w, m, cs

    def ll(v: np.ndarray) -> float:
        w, m, cs = unpack(v)
        mvn = stats.multivariate_normal
        dens = w * mvn(m[0], cs[0]).pdf(x) + (1 - w) * mvn(m[1], cs[1]).pdf(x)
        return float(np.log(dens).sum())

    cov = p["covariances"]
    v0 = np.concatenate([[p["weights"][0]], p["locs"].ravel(),
                         [cov[0, 0, 0], cov[0, 0, 1], cov[0, 1, 1], cov[1, 0, 0], cov[1, 0, 1], cov[1, 1, 1]]])
    exact = _exact_se(ll, v0, h=1e-4)
    se = fit.standard_errors("sa")
    names = ["weights[0]", "locs[0,0]", "locs[0,1]", "locs[1,0]", "locs[1,1]"] + \
        [f"covariances[{k},{i},{j}]" for k in range(2) for i, j in ((0, 0), (0, 1), (1, 1))]
    np.testing.assert_allclose([se[n] for n in names], exact, rtol=1e-4)
    for k in range(2):
        assert se[f"covariances[{k},0,1]"] == pytest.approx(se[f"covariances[{k},1,0]"], rel=1e-9)


def test_exact_information_is_what_louis_formula_estimates_and_is_blocked_exactly():
    """The Hessian of the marginal equals Louis' formula over exact label draws within the latter's Monte-Carlo error
    (1000 draws per unit: ~1%), and the blocked Hessian (blocks of 7 units, a ragged last one) equals the one-block
    Hessian to rounding."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal([0, 0], 1.0, (150, 2)), rng.normal([2.5, 1], 0.7, (100, 2))])
    fit = EM(GaussianMixture(x, 2, "full", seed=1), num_epochs=200, progress=False).run()
    theta = fit._theta()
    exact = fisher.fim_exact(fit.model, theta)
    blocked = fisher.fim_exact(fit.model, theta, block_size=7)
    np.testing.assert_allclose(blocked.fim, exact.fim, rtol=1e-10, atol=1e-9)
    louis = fisher.fim_louis(fit.model, theta, postfit.exact_posterior_draws(fit, 0), unbiased=True)
    se, se_louis = exact.as_dict(), louis.as_dict()
    ratio = np.array([se_louis[k] / se[k] for k in se if np.isfinite(se[k])])
    assert np.all(np.abs(ratio - 1) < 0.04) and abs(np.mean(ratio) - 1) < 0.01


def test_enumerated_mixture_matches_the_exact_observed_information(backend):
    """A tutorial-style Pyro / NumPyro mixture (a Categorical label per point; weights on the simplex, a scale through
    a log transform) fitted by EM: its SEs equal the exact observed information's to 1e-4."""
    rng = np.random.default_rng(5)
    y = np.concatenate([rng.normal(-1.5, 1.0, 200), rng.normal(2.0, 1.0, 150)])
    backend.reset()
    options = {"num_epochs": 300, "progress": False}
    cls = backend.engine("EM")
    from test_mixture_predict import _enum_mixture  # the tutorial's mixture, one shared scale

    model = _enum_mixture(backend)
    if backend.name == "pyro":
        fit = cls(model, **options).run(backend.tensor(y))
    else:
        fit = cls(model, **options).run(jax.random.PRNGKey(0), backend.tensor(y))
    p = fit.params

    def ll(v: np.ndarray) -> float:
        w, m0, m1, sd = v
        return float(np.log(w * stats.norm.pdf(y, m0, sd) + (1 - w) * stats.norm.pdf(y, m1, sd)).sum())

    exact = _exact_se(ll, np.array([p["weights"][0], p["locs"][0], p["locs"][1], float(p["scale"])]), h=1e-4)
    se = fit.standard_errors()
    np.testing.assert_allclose([se["weights[0]"], se["locs[0]"], se["locs[1]"], se["scale"]], exact, rtol=1e-4)
    assert se["weights[1]"] == pytest.approx(se["weights[0]"], rel=1e-9)
