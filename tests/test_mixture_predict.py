"""scikit-learn's face of a fitted mixture, and the messages a scikit-learn user meets (audit F: B.3, D.2).

``fit.predict_proba(x=None)`` / ``fit.predict(x=None)`` give the responsibilities and hard labels of the fitted points
or of new data (numpy or the backend's arrays) for ``GaussianMixture`` and for Pyro / NumPyro mixtures fitted by the EM
family: checked against scikit-learn's ``predict_proba`` / ``predict`` at the same parameters, and against the
responsibilities written out with scipy.  ``gm.predict(x)`` (``LatentModel.predict``, another method) says what to
call; ``gm.responsibilities`` / ``gm.predict_labels`` take ``fit.params`` (numpy).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from scipy.stats import norm

from latentfit import ModelSpecificationError
from latentfit.models import GaussianMixture

_rng = np.random.default_rng(3)
LOCS = np.array([[0.0, 0.0], [3.0, 0.5], [0.5, 3.0]])
X = LOCS[_rng.choice(3, 400, p=[0.5, 0.3, 0.2])] + _rng.normal(size=(400, 2)) * 0.8
X_NEW = _rng.uniform(-2, 5, size=(57, 2))


def _fit(backend, model, num_epochs: int = 60):
    cls = backend.engine("EM")
    if backend.name == "pyro":
        return cls(model, num_epochs=num_epochs, progress=False).run()
    return cls(model, num_epochs=num_epochs, progress=False).run(jax.random.PRNGKey(0))


def _sklearn_at(params: dict[str, np.ndarray], cov_type: str):
    """scikit-learn's GaussianMixture holding ``params`` (its precisions' Cholesky factors made from them)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    sk = SkGMM(len(params["weights"]), covariance_type=cov_type)
    cov = np.asarray(params["covariances"])
    sk.weights_, sk.means_, sk.covariances_ = params["weights"], params["locs"], cov
    if cov_type in ("full", "tied"):
        sk.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(cov))
    else:
        sk.precisions_cholesky_ = 1.0 / np.sqrt(cov)
    return sk


@pytest.mark.parametrize("cov_type", ["full", "diag", "spherical", "tied"])
def test_predict_and_predict_proba_match_sklearn(backend, cov_type):
    fit = _fit(backend, GaussianMixture(backend.tensor(X), 3, cov_type))
    sk = _sklearn_at(fit.params, cov_type)
    proba = fit.predict_proba()
    assert isinstance(proba, np.ndarray) and proba.shape == (400, 3)
    np.testing.assert_allclose(proba, sk.predict_proba(X), rtol=0, atol=1e-10)
    labels = fit.predict()
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.argmax(proba, 1))
    np.testing.assert_array_equal(labels, sk.predict(X))
    # new data: numpy, the backend's arrays, a list; the same answers
    for x_new in (X_NEW, backend.tensor(X_NEW), X_NEW.tolist()):
        np.testing.assert_allclose(fit.predict_proba(x_new), sk.predict_proba(X_NEW), rtol=0, atol=1e-10)
        np.testing.assert_array_equal(fit.predict(x_new), sk.predict(X_NEW))
    # the model's own methods take fit.params (numpy) as well as backend arrays
    gm = fit.model
    np.testing.assert_array_equal(gm.predict_labels(fit.params), labels)
    np.testing.assert_array_equal(gm.predict_labels(fit.params, X_NEW), sk.predict(X_NEW))
    r, ll = gm.responsibilities(fit.params)
    np.testing.assert_allclose(backend.to_numpy(r), proba, rtol=0, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(ll), sk.score_samples(X), rtol=1e-12)


def test_one_dimensional_data_and_tied_spherical(backend):
    """1-D points as ``[m]``; a type scikit-learn has not (one shared variance): against scipy."""
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.normal(-2, 1, 150), rng.normal(2, 1, 250)])
    fit = _fit(backend, GaussianMixture(backend.tensor(x), 2, "tied_spherical"))
    p = fit.params
    x_new = np.linspace(-4, 4, 11)
    ref = softmax(np.log(p["weights"]) + norm.logpdf(x_new[:, None], p["locs"][:, 0], np.sqrt(p["covariances"])), 1)
    np.testing.assert_allclose(fit.predict_proba(x_new), ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fit.predict(x_new[:, None]), np.argmax(ref, 1))


def _enum_mixture(backend):
    """A 1-D mixture with one shared scale as the PPLs' tutorials write it (no enumerate marking)."""
    if backend.name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch
        from torch.distributions import constraints

        def model(data):
            w = pyro.param("weights", torch.ones(2, dtype=torch.float64) / 2, constraint=constraints.simplex)
            locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=torch.float64))
            scale = pyro.param("scale", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
            with pyro.plate("data", len(data)):
                z = pyro.sample("z", dist.Categorical(w))
                pyro.sample("obs", dist.Normal(locs[z], scale), obs=data)

        return model
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(data):
        w = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
        scale = numpyro.param("scale", jnp.array(1.0), constraint=constraints.positive)
        with numpyro.plate("data", len(data)):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("obs", dist.Normal(locs[z], scale), obs=data)

    return model


def test_enumerated_mixture_predicts_its_labels(backend):
    rng = np.random.default_rng(11)
    y = np.concatenate([rng.normal(-2, 1, 120), rng.normal(2, 1, 180)])
    model = _enum_mixture(backend)
    backend.reset()
    cls = backend.engine("EM")
    options = {"num_epochs": 60, "progress": False}
    if backend.name == "pyro":
        fit = cls(model, **options).run(backend.tensor(y))
    else:
        fit = cls(model, **options).run(jax.random.PRNGKey(0), backend.tensor(y))
    p = fit.params

    def ref(v):
        return softmax(np.log(p["weights"]) + norm.logpdf(v[:, None], p["locs"], p["scale"]), 1)

    np.testing.assert_allclose(fit.predict_proba(), ref(y), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fit.predict(), np.argmax(ref(y), 1))
    y_new = np.linspace(-4, 4, 9)
    for x_new in (backend.tensor(y_new), (backend.tensor(y_new),)):  # the model's first argument, or all of them
        np.testing.assert_allclose(fit.predict_proba(x_new), ref(y_new), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(fit.predict(x_new), np.argmax(ref(y_new), 1))


def test_predict_on_a_model_with_continuous_latents_says_what_applies(backend):
    rng = np.random.default_rng(12)
    y = rng.normal(2.0, 0.7, size=(20, 1)) + rng.normal(0, 0.5, size=(20, 3))
    fit = backend.fit("SAEM", backend.models.random_intercept, backend.tensor(y), num_iters=(8, 2), progress=False)
    with pytest.raises(ValueError, match=r"labels of a mixture.*its latents are continuous.*individual_estimates"):
        fit.predict()


def test_messages_a_scikit_learn_user_meets():
    """``gm.predict(x)`` had raised "LatentModel.predict() missing 1 required positional argument: 'z'";
    ``gm.predict_labels(x)`` an IndexError; ``gm.responsibilities(fit.params)`` a numpy-minus-Tensor TypeError."""
    gm = GaussianMixture(X, 3)
    fit = _fit(_PYRO, gm, 20)
    with pytest.raises(TypeError, match=r"GaussianMixture\.predict is not scikit-learn's predict.*fit\.predict\(x\).*"
                                        r"fit\.predict_proba\(x\).*gm\.predict_labels\(fit\.params, x\)"):
        gm.predict(X)
    with pytest.raises(TypeError, match=r"θ must be a dict of the parameters weights, locs and covariances \(e\.g\. "
                                        r"fit\.params\), got a ndarray.*fit\.predict\(x\)"):
        gm.predict_labels(X)
    with pytest.raises(ValueError, match=r"x must be \[m, 2\]"):
        fit.predict(X_NEW[:, :1])
    with pytest.raises(ValueError, match=r"latent 'z' is a discrete label \(a mixture\): its exact posterior is "
                                         r"fit\.predict_proba\(\)"):
        fit.individual_estimates()


def test_linearisation_on_a_mixture_says_which_methods_apply():
    """Was: "individual estimates needs the latent draws of the fit ... EM keeps no latent draws", naming another
    method; the linearisation needs continuous latents."""
    fit = _fit(_PYRO, GaussianMixture(X, 3), 20)
    message = (r"linearises the model around the conditional modes of continuous latents.*latent 'z' is a discrete "
               r"label \(GaussianMixture, a mixture\).*standard_errors\('sa'\).*log_likelihood\('exact'\)")
    with pytest.raises(ModelSpecificationError, match=r"standard_errors\('lin'\).*" + message):
        fit.standard_errors("lin")
    with pytest.raises(ModelSpecificationError, match=r"log_likelihood\('lin'\).*" + message):
        fit.log_likelihood("lin")


def test_a_singular_automatic_start_is_not_blamed_on_the_user():
    """20 identical points and reg_covar=0: the k-means start's cluster of them has a singular covariance.  Was:
    "initial covariance(s) ... give positive definite covariances", though the user gave none."""
    rng = np.random.default_rng(13)
    x = np.concatenate([rng.normal(size=(200, 2)), np.full((20, 2), 10.0)])
    with pytest.raises(ModelSpecificationError, match=r"the automatic start \(the data clustered by k-means\+\+.*\) "
                                                      r"gave component\(s\) \[\d\] a singular covariance.*Set "
                                                      r"reg_covar > 0.*give initial values.*fewer components"):
        GaussianMixture(x, 4, reg_covar=0.0)
    GaussianMixture(x, 4)  # the default reg_covar starts
    with pytest.raises(ModelSpecificationError, match=r"the initial covariances you gave \(component\(s\) \[0, 1\]\)"):
        GaussianMixture(x, 2, covariances=np.zeros((2, 2, 2)))
    with pytest.raises(ModelSpecificationError, match=r"the initial covariances you gave \(component\(s\) \[1\]\)"):
        GaussianMixture(x, 2, "diag", covariances=np.array([[1.0, 1.0], [1.0, 0.0]]))


def test_no_torch_warning_leaks_from_the_library():
    """pandas data (read-only numpy values) had triggered torch's "given NumPy array is not writable"; the enumerated
    mixture's parameters, torch's "torch.asarray: unspecified requires_grad" (its standard errors)."""
    import pyro
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit = _fit(_PYRO, GaussianMixture(pd.DataFrame(X, columns=["a", "b"]), 3), 5)
        assert fit.predict_proba(pd.DataFrame(X_NEW)).shape == (57, 3)
        model = _enum_mixture(_PYRO)
        pyro.clear_param_store()
        rng = np.random.default_rng(14)
        y = torch.as_tensor(np.concatenate([rng.normal(-2, 1, 60), rng.normal(2, 1, 90)]))
        se = _PYRO.engine("EM")(model, num_epochs=20, progress=False).run(y).standard_errors()
    assert np.all(np.isfinite(list(se.values())))
    pyro.clear_param_store()


class _Pyro:
    """The torch backend's helpers where a test needs no ``backend`` fixture."""

    name = "pyro"

    @staticmethod
    def engine(name):
        import latentfit.pyro

        return getattr(latentfit.pyro, name)


_PYRO = _Pyro()
