"""Standard errors after short SAEM fits (issue 14): never an SE of exactly 0 for an estimated parameter.

A fit shorter than its ``num_draws = 100`` kept draws (e.g. 45 iterations, (30, 15)) kept the draws of the
exploration phase too, where θ_k is far from θ̂: their scores at θ̂ spread far more than under p(z | y; θ̂), Louis'
information came out indefinite (eigenvalues down to −1e7 on theophylline), its inverse had negative variances and
the SEs were clipped to 0.0 (theophylline: V, β_V_Weight, ω²_V, ω²_CL, a; PK + binary: every ω² and a_conc, on both
backends).  Louis' formula now averages the draws of the smoothing phase only (fresh draws at θ̂ when it kept fewer
than 10 iterations), and a variance that is still negative or a parameter without information gets NaN with a
warning naming it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import latentfit as lf
from latentfit.inference import fisher, postfit
from latentfit.models import nlme

THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
#: linearisation SEs of saemix's theophylline model (no covariate) at a full (300, 100) fit (torch, seed 0)
SE_FULL = {"ka": 0.305, "V": 1.53, "CL": 0.224, "omega2_ka": 0.172, "omega2_V": 0.0108, "omega2_CL": 0.033,
           "a": 0.0564}


pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 on JAX (tests/conftest.py)


def _short_fit(backend: str, num_iters=(30, 15)):
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, error="constant", backend=backend)
    return model.fit(lf.datasets.theophylline(saemix_form=True), **THEO, seed=0, num_iters=num_iters,
                     progress=False)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_louis_standard_errors_after_a_45_iteration_fit(backend):
    """45 SAEM iterations (30, 15) on theophylline: Louis' SEs average the 15 smoothing-phase draws (exactly
    :func:`fisher.fim_louis` on ``latent_draws[:, -15:]``), are positive, within a factor 1.5 of the linearisation SEs
    of a full fit (they were 0.0 for V, ω²_V, ω²_CL and a before the fix), and no warning is raised; JAX's
    information equals torch's at the same θ and draws."""
    fit = _short_fit(backend)
    assert fit.latent_draws.shape[1] == 45  # the fit kept exploration-phase draws too
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rec = fit.covariance("sa")
    expected = fisher.fim_louis(fit.model, fit._theta(), fit.latent_draws[:, -15:])
    np.testing.assert_allclose(rec.fim, expected.fim, rtol=1e-10, atol=1e-8)
    se = rec.as_dict()
    assert np.all(np.linalg.eigvalsh(rec.fim) > 0)
    ratio = {k: se[k] / SE_FULL[k] for k in SE_FULL}
    assert all(1 / 1.5 < r < 1.5 for r in ratio.values()), ratio
    if backend == "jax":  # the same θ and draws on torch: the same information (float64)
        torch_model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, error="constant")
        torch_model = torch_model.bind(lf.datasets.theophylline(saemix_form=True), **THEO)
        theta = {k: torch_model.ops.asarray(np.array(v)) for k, v in fit.params.items()}
        on_torch = fisher.fim_louis(torch_model, theta, fit.latent_draws[:, -15:])
        np.testing.assert_allclose(rec.fim, on_torch.fim, rtol=1e-9, atol=1e-6)


def test_fit_without_smoothing_phase_uses_fresh_draws_at_the_estimate():
    """``num_iters=45`` (K2 = 0: no iteration at θ̂) gets ``num_draws`` fresh MCMC iterations at θ̂, the same as
    ``num_iters=100`` asked explicitly; every SE positive (torch; JAX draws them with one compiled iteration)."""
    fit = _short_fit("torch", num_iters=45)
    assert fit.engine.settled_from() == 46
    se = fit.covariance("sa")
    fresh = fit.covariance("sa", num_iters=100)
    np.testing.assert_allclose(se.se, fresh.se, rtol=1e-12)
    assert np.all(se.se > 0) and np.all(np.isfinite(se.se))


def test_singular_or_indefinite_information_gives_nan_with_a_warning():
    """An information with a zero row (the likelihood flat in ``CL``) or a negative variance (indefinite information)
    gives NaN for that parameter, with a RuntimeWarning naming it and why; the other SEs are the inverse's."""
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, error="constant")
    model = model.bind(lf.datasets.theophylline(saemix_form=True), **THEO)
    theta = model.init_params()
    pv = fisher.ParamVector(model, theta)
    p = len(pv.free)
    fim = np.diag(np.arange(1.0, p + 1.0))
    cl = pv.free.index("CL")
    flat = fim.copy()
    flat[cl, cl] = 0.0
    with pytest.warns(RuntimeWarning, match=r"NaN for CL: the 'sa' information about it is zero"):
        rec = fisher._finish("sa", model, pv, flat)
    se = rec.as_dict()
    assert np.isnan(se["CL"]) and all(np.isfinite(v) and v > 0 for k, v in se.items() if k != "CL")
    indefinite = fim.copy()
    indefinite[0, 1] = indefinite[1, 0] = 3.0  # [[1, 3], [3, 2]]: eigenvalues -1.2 and 4.2
    with pytest.warns(RuntimeWarning, match=r"NaN for ka, V: negative variance, .* not positive definite"):
        rec = fisher._finish("sa", model, pv, indefinite)
    se = rec.as_dict()
    assert np.isnan(se["ka"]) and np.isnan(se["V"]) and np.isfinite(se["CL"]) and se["CL"] > 0


def test_settled_draws_of_a_default_fit_are_all_kept_draws():
    """A fit whose kept draws all lie in the smoothing phase (K2 >= num_draws) uses them all, as before."""
    fit = _short_fit("torch", num_iters=(10, 12))
    draws = fit.latent_draws[:, -12:]  # as if the fit had kept 12 draws: all from the smoothing phase
    np.testing.assert_array_equal(postfit._settled_draws(fit, draws, 0), draws)
    np.testing.assert_array_equal(postfit._settled_draws(fit, fit.latent_draws, 0), draws)
