"""LinearMixedModel: exact EM vs statsmodels' ML fit, exact marginal, incremental / MC engines, bad inputs.

The incremental / MC engine tests take the ``backend`` fixture: the model on torch or on JAX ops
(reference: the torch EM fit).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from latentfit import DataError
from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.inference.iem import MiniBatchEM
from latentfit.inference.mcem import MCEM
from latentfit.models.mixed import LinearMixedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _simulate(n: int = 80, T: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.tile(np.linspace(0, 1, T), (n, 1))
    X = np.stack([np.ones_like(t), t], -1)
    b = rng.multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 0.5]], n)
    y = X @ np.array([2.0, -1.0]) + (X * b[:, None, :]).sum(-1) + 0.4 * rng.normal(size=(n, T))
    mask = np.ones((n, T), bool)
    mask[::3, -2:] = False  # ragged groups
    y[~mask] = np.nan
    return y, X, X.copy(), mask, t


@pytest.fixture(scope="module")
def lmm_and_em():
    y, X, Z, mask, t = _simulate()
    m = LinearMixedModel(y, X, Z)
    fit = EM(m, num_epochs=1500, progress=False).run()
    return m, fit, (y, X, Z, mask, t)


def test_em_matches_statsmodels_ml(lmm_and_em):
    import pandas as pd
    import statsmodels.api as sm

    m, fit, (y, X, Z, mask, t) = lmm_and_em
    rows = [(i, y[i, j], t[i, j]) for i in range(y.shape[0]) for j in range(y.shape[1]) if mask[i, j]]
    df = pd.DataFrame(rows, columns=["g", "y", "t"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sm.MixedLM.from_formula("y ~ t", df, groups="g", re_formula="~t").fit(reml=False)
    np.testing.assert_allclose(fit.params["beta"], ref.fe_params.values, atol=2e-4)
    np.testing.assert_allclose(fit.params["Omega"], ref.cov_re.values, atol=2e-4)
    assert abs(float(fit.params["sigma"]) - np.sqrt(ref.scale)) < 1e-4
    assert abs(fit.history["objective"][-1] - ref.llf) < 1e-6
    assert np.all(np.diff(fit.history["objective"]) >= -1e-9)


def test_marginal_log_lik_is_exact(lmm_and_em):
    m, fit, (y, X, Z, mask, _) = lmm_and_em
    th = fit.state.theta
    beta, Om, s2 = (th["beta"].numpy(), th["Omega"].numpy(), float(th["sigma"]) ** 2)
    direct = []
    for i in range(5):
        o = mask[i]
        cov = Z[i][o] @ Om @ Z[i][o].T + s2 * np.eye(o.sum())
        direct.append(multivariate_normal(X[i][o] @ beta, cov).logpdf(y[i][o]))
    np.testing.assert_allclose(m.marginal_log_lik(th)[:5].numpy(), direct, rtol=1e-10)


@pytest.mark.parametrize("engine, kwargs", [(FIEM, dict(num_epochs=200, batch_size=16)),
                                            (MiniBatchEM, dict(num_epochs=250, batch_size=16))])
def test_incremental_engines_reach_the_em_fixed_point(backend, lmm_and_em, engine, kwargs):
    _, fit, (y, X, Z, _, _) = lmm_and_em
    m = LinearMixedModel(y, X, Z, ops=backend.ops())
    got = engine(m, progress=False, **kwargs).run(backend.key(0)).params
    for k in ("beta", "Omega", "sigma"):
        np.testing.assert_allclose(got[k], fit.params[k], atol=1e-5)


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
def test_mcem_with_mh_chains_within_mc_error(backend, lmm_and_em):
    _, fit, (y, X, Z, _, _) = lmm_and_em
    m = LinearMixedModel(y, X, Z, ops=backend.ops())
    got = MCEM(m, num_epochs=80, num_samples=20, progress=False).run(backend.key(0)).params
    # Monte-Carlo SD of one run around the EM fixed point (largest coordinate, seeds 0–7, larger backend):
    # β 0.020, Ω 0.024, σ 0.0025; β and Ω within 2.5–3.3 SDs, σ within 4
    np.testing.assert_allclose(got["beta"], fit.params["beta"], atol=0.05)
    np.testing.assert_allclose(got["Omega"], fit.params["Omega"], atol=0.08)
    np.testing.assert_allclose(got["sigma"], fit.params["sigma"], atol=4 * 0.0025)


def test_pyro_model_has_the_same_log_density(lmm_and_em):
    from latentfit.integrations.pyro import PyroLatentModel

    m, fit, (y, X, Z, mask, _) = lmm_and_em
    args = tuple(torch.as_tensor(a) for a in (y, X, Z, mask))
    import pyro

    pyro.clear_param_store()
    pm = PyroLatentModel(m.pyro_model(), args)
    th = m.init_params()
    z = torch.randn(2, m.num_units, 2, dtype=torch.float64)
    ll, lp = pm.log_densities(th, z)
    ll2, lp2 = m.log_densities(th, z)
    np.testing.assert_allclose(ll.numpy(), ll2.numpy(), rtol=1e-10)
    np.testing.assert_allclose(lp.numpy(), lp2.numpy(), rtol=1e-10)


def test_bad_inputs_give_clear_errors():
    y, X, Z, mask, _ = _simulate(10)
    with pytest.raises(DataError, match="empty"):
        LinearMixedModel(np.zeros((0, 3)), np.zeros((0, 3, 1)), np.zeros((0, 3, 1)))
    with pytest.raises(DataError, match="rank deficient"):
        LinearMixedModel(y, np.concatenate([X, X[..., :1]], -1), Z)
    y_bad = y.copy()
    y_bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        LinearMixedModel(y_bad, X, Z, mask=mask)
    with pytest.raises(DataError, match=r"\[n, T, p\]"):
        LinearMixedModel(y, X[:, :2], Z)
