"""The rest of scikit-learn's ``GaussianMixture`` face on a fitted mixture (audit F, D.2): ``fit.score_samples(x)`` /
``fit.score(x)`` (log-likelihood per point / its mean), ``fit.sample(m)``, and EM's stopping rule ``tol=`` with a
``ConvergenceWarning`` when a fit ends before it converged.

References: scikit-learn's own ``score_samples`` / ``score`` at the same parameters (4 covariance types, both
backends), the marginal written with scipy for a Pyro / NumPyro mixture, and the sampled points' moments against the
mixture's (within 4 Monte-Carlo standard errors)."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from scipy.stats import norm

from latentfit import ConvergenceWarning
from latentfit.inference.em import EM
from latentfit.models import GaussianMixture, LinearMixedModel

pytestmark = pytest.mark.usefixtures("jax_x64")

_rng = np.random.default_rng(4)
X = np.concatenate([_rng.normal([0.0, 0.0], 1.0, (300, 2)), _rng.normal([3.0, 0.5], 0.7, (200, 2))])
X_NEW = _rng.uniform(-2, 4, size=(31, 2))


def _sklearn_at(params: dict[str, np.ndarray], cov_type: str):
    from sklearn.mixture import GaussianMixture as SkGMM
    sk = SkGMM(len(params["weights"]), covariance_type=cov_type)
    cov = np.asarray(params["covariances"])
    sk.weights_, sk.means_, sk.covariances_ = params["weights"], params["locs"], cov
    sk.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(cov)) if cov_type in ("full", "tied") \
        else 1.0 / np.sqrt(cov)
    return sk


@pytest.mark.parametrize("cov_type", ["full", "diag", "spherical", "tied"])
def test_score_samples_and_score_match_sklearn(backend, cov_type):
    fit = EM(GaussianMixture(backend.tensor(X), 2, cov_type, seed=1), num_epochs=200, progress=False).run()
    sk = _sklearn_at(fit.params, cov_type)
    np.testing.assert_allclose(fit.score_samples(), sk.score_samples(X), rtol=0, atol=1e-10)
    for new in (X_NEW, backend.tensor(X_NEW)):
        np.testing.assert_allclose(fit.score_samples(new), sk.score_samples(X_NEW), rtol=0, atol=1e-10)
    assert fit.score() == pytest.approx(sk.score(X), abs=1e-12)
    assert fit.score() * len(X) == pytest.approx(fit.log_likelihood(), rel=1e-12)
    assert fit.score(X_NEW) == pytest.approx(sk.score(X_NEW), abs=1e-12)


def test_enumerated_mixture_scores_its_points(backend):
    """A tutorial-style Pyro / NumPyro mixture: log Σ_k w_k N(y; μ_k, σ) of the fitted points and of new ones."""
    from test_mixture_predict import _enum_mixture
    rng = np.random.default_rng(6)
    y = np.concatenate([rng.normal(-1.5, 1.0, 120), rng.normal(2.0, 1.0, 80)])
    backend.reset()
    cls = backend.engine("EM")
    options = {"num_epochs": 60, "progress": False}
    model = _enum_mixture(backend)
    fit = cls(model, **options).run(backend.tensor(y)) if backend.name == "pyro" \
        else cls(model, **options).run(jax.random.PRNGKey(0), backend.tensor(y))
    p = fit.params

    def ref(v):
        return np.log(p["weights"][0] * norm.pdf(v, p["locs"][0], p["scale"])
                      + p["weights"][1] * norm.pdf(v, p["locs"][1], p["scale"]))

    np.testing.assert_allclose(fit.score_samples(), ref(y), rtol=0, atol=1e-10)
    y_new = np.linspace(-4, 4, 9)
    np.testing.assert_allclose(fit.score_samples(backend.tensor(y_new)), ref(y_new), rtol=0, atol=1e-10)
    assert fit.score() == pytest.approx(ref(y).mean(), abs=1e-12)


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_sample_draws_from_the_fitted_mixture(backend, cov_type):
    """20 000 points: label frequencies, each component's mean and covariance within 4 Monte-Carlo SEs (the covariance
    entries' SE from the fourth moments of a Gaussian); a seed gives the same points again."""
    fit = EM(GaussianMixture(backend.tensor(X), 2, cov_type, seed=1), num_epochs=200, progress=False).run()
    p = fit.params
    m = 20000
    xs, lab = fit.sample(m, seed=3)
    assert xs.shape == (m, 2) and lab.shape == (m,) and lab.dtype == np.int64
    freq = np.bincount(lab, minlength=2) / m
    assert np.all(np.abs(freq - p["weights"]) < 4 * np.sqrt(p["weights"] * (1 - p["weights"]) / m))
    for k in range(2):
        pts = xs[lab == k]
        cov = np.asarray(p["covariances"][k])
        cov = np.diag(cov) if cov.ndim == 1 else cov
        assert np.all(np.abs(pts.mean(0) - p["locs"][k]) < 4 * np.sqrt(np.diag(cov) / len(pts)))
        se_cov = np.sqrt((cov ** 2 + np.outer(np.diag(cov), np.diag(cov))) / len(pts))
        assert np.all(np.abs(np.cov(pts.T) - cov) < 4 * se_cov)
    again, lab2 = fit.sample(m, seed=3)
    np.testing.assert_array_equal(again, xs)
    np.testing.assert_array_equal(lab2, lab)


def test_em_tol_stops_where_the_gain_per_point_falls_below_it():
    """tol=1e-3: the fit stops at the first epoch whose E-step's mean log-likelihood rose by less than tol (the
    history's objective), earlier than num_epochs, and it does not warn; the same fit without tol runs every epoch."""
    n = len(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit = EM(GaussianMixture(X, 2, seed=1), num_epochs=500, tol=1e-3, progress=False).run()
    gains = np.diff(fit.history["objective"]) / n
    assert fit.num_iterations < 500 and len(fit.history["objective"]) == fit.num_iterations
    assert gains[-1] < 1e-3 and np.all(gains[:-1] >= 1e-3)
    full = EM(GaussianMixture(X, 2, seed=1), num_epochs=60, progress=False).run()
    assert full.num_iterations == 60
    np.testing.assert_allclose(full.history["objective"][:fit.num_iterations], fit.history["objective"], rtol=1e-12)


def test_em_warns_when_it_ends_before_converging():
    """4 epochs from a poor start (both means near the origin; the mean log-likelihood still rises by 6.2e-3 per
    epoch): a ConvergenceWarning saying by how much and what to do; a long fit does not warn.  A user's callback still
    stops a fit with tol."""
    with pytest.warns(ConvergenceWarning, match=r"still rose by 0.00617 in the last epoch .*num_epochs=.*tol="):
        EM(GaussianMixture(X, 2, locs=[[0.0, 0.0], [0.3, 0.0]]), num_epochs=4, progress=False).run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        EM(GaussianMixture(X, 2, seed=1), num_epochs=300, progress=False).run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # stopped by the user: no warning
        fit = EM(GaussianMixture(X, 2, seed=1), num_epochs=500, tol=1e-12, callback=lambda k, r: k == 7,
                 progress=False).run()
    assert fit.num_iterations == 7


def test_tol_and_scores_refuse_what_does_not_apply():
    """A bad tol; score / sample on a model without them (a linear mixed model: tol works there, on its exact
    marginal) say what applies."""
    from test_mixed import _simulate

    y, Xd, Z, _, _ = _simulate(30)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        EM(GaussianMixture(X, 2), tol=0.0)
    fit = EM(LinearMixedModel(y, Xd, Z), num_epochs=200, tol=1e-6, progress=False).run()
    assert fit.num_iterations < 200
    with pytest.raises(ValueError, match="score / score_samples need a model"):
        fit.score()
    with pytest.raises(ValueError, match="sample draws new points from a fitted GaussianMixture"):
        fit.sample(3)


def test_em_tol_on_a_tutorial_mixture(backend):
    """``tol`` on a Pyro / NumPyro mixture written as the tutorials write it: the fit stops at the first epoch whose
    E-step's mean log-likelihood rose by less than tol, without a warning, and its history is the first epochs of the
    same fit run without tol; ended early (3 epochs from a poor start), the fit warns."""
    from test_mixture_predict import _enum_mixture
    rng = np.random.default_rng(6)
    y = np.concatenate([rng.normal(-1.5, 1.0, 120), rng.normal(2.0, 1.0, 80)])
    cls = backend.engine("EM")

    def run(**options):
        backend.reset()
        eng = cls(_enum_mixture(backend), progress=False, **options)
        return eng.run(backend.tensor(y)) if backend.name == "pyro" else eng.run(jax.random.PRNGKey(0),
                                                                                  backend.tensor(y))

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit = run(num_epochs=500, tol=1e-4)
    gains = np.diff(fit.history["objective"]) / len(y)
    assert 3 < fit.num_iterations < 500 and gains[-1] < 1e-4 and np.all(gains[:-1] >= 1e-4)
    full = run(num_epochs=fit.num_iterations + 5)
    np.testing.assert_allclose(full.history["objective"][:fit.num_iterations], fit.history["objective"], rtol=1e-10)
    with pytest.warns(ConvergenceWarning, match="tol="):
        run(num_epochs=3)
