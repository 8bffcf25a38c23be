"""f-SAEM: the nlme-IMH proposal and its effect on SAEM's convergence.

Engine tests take the ``backend`` fixture: the ``NLME`` runs on torch (Pyro backend) or on JAX
(``backend="jax"``, compiled iterations; NumPyro backend).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from backends import Backend

from latentfit.inference import likelihood
from latentfit.inference.fsaem import FSAEM
from latentfit.inference.saem import SAEM
from latentfit.models import nlme


def _array_backend(backend) -> str:
    """The ``NLME(backend=...)`` of a test backend."""
    return "torch" if backend is None or backend.name == "pyro" else "jax"


def _linear_model(seed: int = 0, backend=None) -> nlme.NLME:
    """``y_ij = b0_i + b1_i t_ij + a ε``, b ~ N(μ, Ω) (normal transforms): a linear Gaussian model."""

    def line(psi, data):
        return psi["b0"] + psi["b1"] * data.time

    design = nlme.design_table(30, [0.0, 1.0, 2.0, 4.0], dose=1.0)
    gen = nlme.NLME(line, {"b0": nlme.Parameter(2.0, "normal", omega2=0.5),
                           "b1": nlme.Parameter(-0.5, "normal", omega2=0.1)}, omega="full",
                    error_init={"a": 0.3}, data=design)
    df = gen.simulate(seed=seed)
    return nlme.NLME(line, {"b0": nlme.Parameter(0.0, "normal"), "b1": nlme.Parameter(0.0, "normal")},
                     omega="full", data=df, backend=_array_backend(backend))


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
def test_nlme_imh_is_the_exact_conditional_on_a_linear_gaussian_model(backend):
    """The Gauss–Newton Laplace proposal equals p(z_i | y_i; θ): every proposal is accepted."""
    model = _linear_model(backend=backend)
    fit = FSAEM(model, num_iters=(8, 0), imh_iters=6, imh_steps=6, progress=False, seed=1).run()
    acc = fit.acceptance["nlme_imh"]
    np.testing.assert_array_equal(acc[:6], np.ones(6))
    assert np.isnan(acc[6:]).all()  # plain saemix kernels afterwards
    assert np.isnan(fit.acceptance["prior_imh"][:6]).all() and np.isfinite(fit.acceptance["prior_imh"][6:]).all()


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
def test_nlme_imh_accepts_most_proposals_on_a_pk_model_with_both_precisions(backend):
    design = nlme.design_table(40, [0.5, 1, 2, 4, 8, 12], 100.0)
    gen = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, error_init={"a": 0.5}, data=design)
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in
             dict(omega2_ka=0.25, omega2_V=0.04, omega2_CL=0.04).items()}
    df = gen.simulate(theta, seed=2)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, error_init={"a": 0.5}, data=df,
                      backend=_array_backend(backend))
    for method in ("gauss_newton", "hessian"):
        fit = FSAEM(model, num_iters=(5, 0), imh_iters=5, burn_in=5 - 1, laplace_method=method, progress=False,
                    seed=0).run()
        assert np.nanmean(fit.acceptance["nlme_imh"]) > 0.6, method


def _rich_pk(seed: int, backend=None):
    times = [0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12]
    truth = dict(ka=1.0, V=8.0, CL=0.8, omega2_ka=0.25, omega2_V=0.04, omega2_CL=0.04, a=0.5)
    gen = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, data=nlme.design_table(100, times))
    df = gen.simulate({k: torch.tensor(v, dtype=torch.float64) for k, v in truth.items()}, seed=seed)
    # poor initial values, far from the truth
    return nlme.NLME("one_compartment_oral", {"ka": 3.0, "V": 20.0, "CL": 3.0}, data=df,
                     backend=_array_backend(backend))


def iterations_to_band(history: dict, final: dict, rel_fixed: float = 0.05, rel_var: float = 0.10) -> int | None:
    """First iteration at which every parameter is within the band around its final value."""
    names = list(final)
    traj = np.stack([history["theta." + n] for n in names], 1)
    fin = np.array([float(final[n]) for n in names])
    tol = np.array([rel_var if n.startswith("omega") else rel_fixed for n in names])
    ok = (np.abs(traj / fin - 1) < tol).all(1)
    return int(np.argmax(ok)) + 1 if ok.any() else None


@pytest.fixture(scope="module")
def rich_pk_maximum() -> dict[str, float]:
    """The exact maximum-likelihood estimate of ``_rich_pk(seed=0)``: adaptive Gauss–Hermite quadrature with 5 nodes
    per random effect, maximised (7 and 9 nodes move no parameter by more than 2e-4 relative)."""
    model = _rich_pk(seed=0)
    best = likelihood.maximise_log_likelihood_gq(model, model.init_params(), num_nodes=5)
    assert best.converged
    return {k: float(v) for k, v in best.theta.items()}


#: SAEM's settings of the f-SAEM paper's comparison: no annealing, no burn-in, K1 = 60, K2 = 40
SPEED_OPTIONS = dict(num_iters=(60, 40), anneal=False, burn_in=0, progress=False)


def _iterations_to_the_maximum(engine: type, model: nlme.NLME, ml: dict, seed: int) -> tuple[int, dict]:
    """Iterations until every parameter is within the band around the exact maximum (a run that never gets there
    counts as K1 + K2 + 1), and the final estimates."""
    fit = engine(model, seed=seed, **SPEED_OPTIONS).run()
    k = iterations_to_band(fit.history, ml)
    return (sum(SPEED_OPTIONS["num_iters"]) + 1 if k is None else k), fit.params


@pytest.mark.parametrize("backend_name", ["pyro", pytest.param("numpyro", marks=pytest.mark.slow)])
def test_fsaem_reaches_the_maximum_in_fewer_iterations_than_saem(backend_name, rich_pk_maximum):
    """Rich-data PK (N=100 × 10), poor initial values, the paper's settings (no annealing, no burn-in): iterations
    until every parameter is within ±5% (fixed effects, a) / ±10% (ω²) of the exact maximum, median over seeds 0–4.
    Measured on torch over seeds 0–9: SAEM 16–35 iterations (median 28), f-SAEM 3–7 (median 4; two seeds never,
    see test_fsaem_ends_at_the_maximum_on_every_seed), so a speed-up of 7 in the median; asserted: at least 3.
    (The JAX twin compiles both engines: slow suite.)"""
    model = _rich_pk(seed=0, backend=Backend(backend_name))
    k_saem = [_iterations_to_the_maximum(SAEM, model, rich_pk_maximum, s)[0] for s in range(5)]
    k_fsaem = [_iterations_to_the_maximum(FSAEM, model, rich_pk_maximum, s)[0] for s in range(5)]
    assert 3 * np.median(k_fsaem) <= np.median(k_saem), (k_fsaem, k_saem)


def _beyond_monte_carlo_error(params: dict, ml: dict) -> list[str]:
    """Parameters farther from the maximum than 4 Monte-Carlo SDs of one run of these settings (SDs measured over
    10 seeds: fixed effects and a ≤ 0.9%, ω² 3.9% for SAEM; f-SAEM's on its 8 seeds without the flip-flop: ≤ 0.9%
    and 3.6 / 6.2 / 7.4%): tolerances 4% (fixed effects, a) and 30% (ω²)."""
    return [k for k, v in ml.items() if abs(float(params[k]) / v - 1) > (0.30 if k.startswith("omega") else 0.04)]


@pytest.mark.slow
def test_fsaem_speed_up_is_a_median_over_ten_seeds(rich_pk_maximum):
    """Seeds 0–9 (torch): f-SAEM's median number of iterations to the band around the exact maximum is at most a
    third of SAEM's (measured 4 against 28), and every SAEM run ends within Monte-Carlo error of the maximum."""
    model = _rich_pk(seed=0)
    saem = [_iterations_to_the_maximum(SAEM, model, rich_pk_maximum, s) for s in range(10)]
    fsaem = [_iterations_to_the_maximum(FSAEM, model, rich_pk_maximum, s) for s in range(10)]
    k_saem, k_fsaem = [k for k, _ in saem], [k for k, _ in fsaem]
    assert 3 * np.median(k_fsaem) <= np.median(k_saem), (k_fsaem, k_saem)
    assert np.median(k_fsaem) <= 5 and 20 <= np.median(k_saem) <= 35, (k_fsaem, k_saem)  # README: about 4 and 28
    for seed, (_, params) in enumerate(saem):
        assert not _beyond_monte_carlo_error(params, rich_pk_maximum), (seed, params)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known f-SAEM failure: from poor initial values the nlme-IMH proposal puts one "
                   "subject in the flip-flop mode (ka_i < CL_i/V_i) in seeds 4 and 6, which the saemix kernels never "
                   "leave; those runs end with ω²_V 40% / 200% above the maximum, 22 log-likelihood units below it")
def test_fsaem_ends_at_the_maximum_on_every_seed(rich_pk_maximum):
    model = _rich_pk(seed=0)
    for seed in range(10):
        _, params = _iterations_to_the_maximum(FSAEM, model, rich_pk_maximum, seed)
        assert not _beyond_monte_carlo_error(params, rich_pk_maximum), (seed, params)


def test_options_are_validated_and_phases_follow_imh_iters(backend):
    model = _linear_model(backend=backend)
    with pytest.raises(ValueError, match="imh_iters"):
        FSAEM(model, imh_iters=-1)
    with pytest.raises(ValueError, match="imh_steps"):
        FSAEM(model, imh_steps=0)
    assert FSAEM(model, num_iters=(20, 5), imh_iters=10).phases() == [(1, 10, "imh"), (11, 25, "saem")]
    assert FSAEM(model, num_iters=(20, 5), imh_iters=0).phases() == [(1, 25, "saem")]
    assert FSAEM(model, num_iters=(3, 0), imh_iters=10, burn_in=0).phases() == [(1, 3, "imh")]


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
def test_fsaem_front_door_for_plain_ppl_models(backend):
    """``latentfit.pyro.FSAEM`` / ``latentfit.numpyro.FSAEM`` run f-SAEM on an ordinary Pyro / NumPyro model
    (the theophylline example)."""
    suffix = "" if backend.name == "pyro" else "_numpyro"
    example = importlib.import_module(f"latentfit.examples.theophylline{suffix}")
    fit = backend.fit("FSAEM", example.theophylline_model, num_iters=(12, 3), imh_iters=5, seed=0, progress=False,
                      model_kwargs=example.theophylline_arrays())
    acc = fit.acceptance["nlme_imh"]
    assert np.all(acc[:5] > 0.6) and np.isnan(acc[5:]).all()
    if backend.name == "pyro":
        import pyro

        assert "a" in pyro.get_param_store()
    else:  # NumPyro has no param store: the estimates live in fit.params
        assert "a" in fit.params
