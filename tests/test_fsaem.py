"""f-SAEM: the nlme-IMH proposal and its effect on SAEM's convergence.

Engine tests take the ``backend`` fixture: the ``NLME`` runs on torch (Pyro backend) or on JAX
(``backend="jax"``, compiled iterations; NumPyro backend).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

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


def test_nlme_imh_is_the_exact_conditional_on_a_linear_gaussian_model(backend):
    """The Gauss–Newton Laplace proposal equals p(z_i | y_i; θ): every proposal is accepted."""
    model = _linear_model(backend=backend)
    fit = FSAEM(model, num_iters=(8, 0), imh_iters=6, imh_steps=6, progress=False, seed=1).run()
    acc = fit.acceptance["nlme_imh"]
    np.testing.assert_array_equal(acc[:6], np.ones(6))
    assert np.isnan(acc[6:]).all()  # plain saemix kernels afterwards
    assert np.isnan(fit.acceptance["prior_imh"][:6]).all() and np.isfinite(fit.acceptance["prior_imh"][6:]).all()


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


def test_fsaem_reaches_the_estimates_in_fewer_iterations_than_saem(backend):
    """Rich-data PK (N=100 × 10), poor initial values, reference settings (no annealing, no burn-in):
    iterations until every parameter enters ±5% (fixed effects, a) / ±10% (ω²) of SAEM's final estimate."""
    model = _rich_pk(seed=0, backend=backend)
    opts = dict(num_iters=(60, 40), anneal=False, burn_in=0, progress=False, seed=3)
    saem = SAEM(model, **opts).run()
    fsaem = FSAEM(model, **opts).run()
    final = saem.params
    k_saem = iterations_to_band(saem.history, final)
    k_fsaem = iterations_to_band(fsaem.history, final)
    assert k_fsaem is not None and k_saem is not None
    assert k_fsaem < k_saem, (k_fsaem, k_saem)
    # both end at the same estimates (within Monte-Carlo noise: 3% fixed effects and a, 12% ω²)
    for name, value in final.items():
        tol = 0.12 if name.startswith("omega") else 0.03
        assert abs(float(fsaem.params[name]) / float(value) - 1) < tol, name


def test_options_are_validated_and_phases_follow_imh_iters(backend):
    model = _linear_model(backend=backend)
    with pytest.raises(ValueError, match="imh_iters"):
        FSAEM(model, imh_iters=-1)
    with pytest.raises(ValueError, match="imh_steps"):
        FSAEM(model, imh_steps=0)
    assert FSAEM(model, num_iters=(20, 5), imh_iters=10).phases() == [(1, 10, "imh"), (11, 25, "saem")]
    assert FSAEM(model, num_iters=(20, 5), imh_iters=0).phases() == [(1, 25, "saem")]
    assert FSAEM(model, num_iters=(3, 0), imh_iters=10, burn_in=0).phases() == [(1, 3, "imh")]


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
