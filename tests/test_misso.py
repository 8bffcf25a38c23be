"""MISSO, maximum-likelihood instance (issue 11, item 2), on plain Pyro and NumPyro models of the gallery.

* On an exponential-family model (every parameter in closed form) MISSO's stored surrogates are the Monte-Carlo
  statistics of incremental (mini-batch) MCEM: with one draw of the chains per visit the two engines are the same
  algorithm, and their iterates agree to rounding on both PPLs.
* On the logistic GLMM (μ, ω in closed form, β by the quadratic surrogate with stored anchors and gradients) MISSO
  reaches the adaptive-quadrature ML estimate.  Its Monte-Carlo error with 10 epochs of the paper's ``M_k = 10 + k²``
  (root-mean-square deviation from the maximum over seeds 0-5 on NumPyro, a scratch run): μ 0.0028, ω 0.020,
  β 0.0050; the test allows 5 of them.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import Backend
from test_gallery import ENTRIES, _args, known_answer

from latentfit.inference.misso import MISSO, paper_mc_size

MISSO_MC_SD = {"mu": 0.0028, "omega": 0.020, "beta": 0.0050}


def _fit(backend: Backend, engine: str, name: str, seed: int = 0, **options):
    entry = ENTRIES[name]
    args = _args(backend, entry, entry.data())
    cls = getattr(backend.front_door, engine)
    if backend.name == "pyro":
        import pyro

        pyro.clear_param_store()
        return cls(entry.model(backend), seed=seed, progress=False, **options).run(*args)
    return cls(entry.model(backend), progress=False, **options).run(seed, *args)


@pytest.mark.parametrize("backend_name", ["pyro", "numpyro"])
def test_equals_incremental_mcem_on_an_exponential_family_model(backend_name):
    """many_schools (μ, τ closed form): MISSO with M_k = L draws per visit is mini-batch MCEM, iterate by iterate."""
    b = Backend(backend_name)
    misso = _fit(b, "MISSO", "many_schools", num_epochs=3, mc_size=10, num_chains=10, trace_params=["mu", "tau"])
    mcem = _fit(b, "MiniBatchMCEM", "many_schools", num_epochs=3, num_samples=10, trace_params=["mu", "tau"])
    for key in ("inner.mu", "inner.tau"):
        assert misso.history[key].shape == (3, 10)
        np.testing.assert_allclose(misso.history[key], mcem.history[key], rtol=1e-12, atol=1e-12)
    # and the iterates move (a non-trivial comparison)
    assert np.ptp(misso.history["inner.mu"]) > 0.1


CASES = [pytest.param("numpyro", id="numpyro"), pytest.param("pyro", id="pyro", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend_name", CASES)
def test_reaches_the_quadrature_maximum_of_a_logistic_glmm(backend_name):
    fit = _fit(Backend(backend_name), "MISSO", "logistic_glmm", num_epochs=10)
    est = ENTRIES["logistic_glmm"].estimates(fit.params)
    for key, ref in known_answer("logistic_glmm").items():
        assert abs(float(est[key]) - ref) < 5 * MISSO_MC_SD[key], (key, float(est[key]), ref)


def test_monte_carlo_size_schedule():
    """``M_k = 10 + k²`` draws per visit in epoch k, taken as ⌈M_k / L⌉ draws of the L chains."""
    entry = ENTRIES["logistic_glmm"]
    b = Backend("pyro")
    from latentfit.integrations.pyro import PyroLatentModel

    model = PyroLatentModel(entry.model(b), _args(b, entry, entry.data()), {})
    eng = MISSO(model, num_epochs=5, num_chains=4, progress=False)
    m = eng.num_batches
    draws = [eng._draws(k * m + 1) for k in range(5)]
    assert draws == [int(np.ceil((10 + k * k) / 4)) for k in range(5)] == [3, 3, 4, 5, 7]
    assert [paper_mc_size(k) for k in range(3)] == [10, 11, 14]


@pytest.mark.parametrize("options,match", [
    ({"mc_size": 0}, "mc_size must be"),
    ({"num_chains": 0}, "num_chains must be"),
    ({"num_samples": 5}, "num_chains"),
    ({"num_epochs": 0}, "num_epochs must be"),
])
def test_bad_options(options, match):
    import latentfit.pyro as lp

    entry = ENTRIES["logistic_glmm"]
    b = Backend("pyro")
    with pytest.raises((ValueError, TypeError), match=match):
        lp.MISSO(entry.model(b), progress=False, **options).run(*_args(b, entry, entry.data()))
