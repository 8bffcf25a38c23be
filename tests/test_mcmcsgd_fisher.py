"""MCMCSGD's Fisher-scoring step (``optimizer="fisher"``, latentfit/inference/preconditioned.py; issue 11).

Known answer: the closed-form ML point of the gallery's random-slope radon model (``gallery_reference.lmm_mle``),
within ``TOL_SDS`` of SAEM's Monte-Carlo errors as in tests/test_mcmcsgd.py.  The model's β and σ enter the
likelihood, so both parts of the information (the prior's at prior draws, the likelihood's at the chains) are used.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import Backend
from test_mcmcsgd import _check_known_answer, _fit, _mlp_data

from latentfit.inference import preconditioned


@pytest.fixture(autouse=True)
def _clean_param_store():
    import pyro

    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["pyro", "numpyro"])
def test_fisher_scoring_reaches_the_closed_form_maximum(backend_name):
    """Random-slope LMM, 5 chains per unit, 300 iterations: the averaged Fisher-scoring iterate is within Monte-Carlo
    error of the closed-form ML point."""
    fit = _fit(Backend(backend_name), "radon_slope", num_chains=5, optimizer="fisher", num_iters=300)
    assert fit.engine.fisher
    _check_known_answer("radon_slope", fit)


def test_fisher_scoring_phases():
    """The heavy-ball steps (rate tapered from RATE), then γ = 1 until ``average_from = burn_in + num_iters // 5``,
    then ``γ = (k − k₀)^{−α}``; the averaged estimate is reported."""
    fit = _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=60, burn_in=5)
    engine = fit.engine
    assert engine.fisher and engine.average_from == 5 + 12 and engine.momentum_steps == 7
    rate = np.asarray(fit.history["learning_rate"])
    assert rate[5] == pytest.approx(preconditioned.RATE)  # the first heavy-ball step (iteration 6)
    assert np.all(np.diff(rate[5:12]) < 0)  # tapered toward Fisher scoring's γ = 1
    np.testing.assert_allclose(rate[12:17], 1.0)  # γ = 1 until average_from
    np.testing.assert_allclose(rate[17 + 9], 10.0 ** -preconditioned.ALPHA)  # then (k − k₀)^−α
    assert np.all(np.isfinite(fit.history["iterate"])) and np.all(np.isfinite(fit.history["grad_norm2"]))


def test_solve_is_safe_on_an_indefinite_singular_or_broken_information():
    """Γ's eigenvalues are used in absolute value and floored; a non-finite Γ gives no step and ``ok`` False (the
    engine then takes its Adam step); the trust region caps a coordinate's move at MAX_STEP."""
    import torch

    from latentfit.inference.ops import make_ops

    ops = make_ops("torch")
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    step, ok = preconditioned.solve(ops, torch.tensor([[2.0, 0.0], [0.0, -4.0]], dtype=torch.float64), g)
    assert bool(ok) and torch.allclose(step, torch.tensor([0.5, 0.5], dtype=torch.float64))
    step, ok = preconditioned.solve(ops, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64), g)
    assert bool(ok) and bool(torch.all(torch.isfinite(step)))
    assert float(preconditioned.trust_region(ops, step).abs().max()) == pytest.approx(preconditioned.MAX_STEP)
    step, ok = preconditioned.solve(ops, torch.tensor([[np.nan, 0.0], [0.0, 1.0]], dtype=torch.float64), g)
    assert not bool(ok) and bool(torch.all(step == 0))


def test_a_broken_information_falls_back_to_adam(monkeypatch):
    """Where Γ is not usable at any step, the fit is Adam's: every step is the Adam fall-back's."""
    import torch

    solve = preconditioned.solve

    def broken(ops, gamma, grad):
        return solve(ops, gamma, grad)[0], torch.zeros((), dtype=torch.bool)

    monkeypatch.setattr(preconditioned, "solve", broken)
    fit = _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=60, burn_in=5)
    it = np.asarray(fit.history["iterate"])
    assert np.all(np.isfinite(it))
    # Adam moves every coordinate by at most about its rate per step
    assert np.max(np.abs(np.diff(it[5:], axis=0))) < 0.1


def test_many_parameters_use_adam():
    """A model with a ``pyro.module`` MLP (64 weights) and a scale, 65 free parameters, keeps Adam: ``"fisher"``
    warns, ``"auto"`` silently."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn
    from torch.distributions import constraints

    import latentfit.pyro as lp

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, 21), nn.Tanh(), nn.Linear(21, 1)).double()  # 42 + 22 = 64 weights

    def model(x, group, num_groups, y=None):
        net = pyro.module("mlp", mlp)
        omega = pyro.param("omega", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
        with pyro.plate("group", num_groups):
            u = pyro.sample("u", dist.Normal(0.0, omega))
        with pyro.plate("rows", len(x)):
            pyro.sample("y", dist.Normal(net(x[:, None]).squeeze(-1) + u[group], 0.3), obs=y)

    group, x, y, num = _mlp_data()
    args = (torch.as_tensor(x), torch.as_tensor(group), num, torch.as_tensor(y))
    with pytest.warns(UserWarning, match="at most 64 free parameters"):
        fit = lp.MCMCSGD(model, optimizer="fisher", num_iters=12, burn_in=10, progress=False).run(*args)
    assert not fit.engine.fisher and fit.engine.average_from == 10
    pyro.clear_param_store()
    fit = lp.MCMCSGD(model, optimizer="auto", num_iters=12, burn_in=10, progress=False).run(*args)
    assert not fit.engine.fisher


@pytest.mark.parametrize("optimizer", ["newton", "Fisher"])
def test_unknown_step_names_are_refused(optimizer):
    from test_gallery import ENTRIES

    import latentfit.pyro as lp

    with pytest.raises(ValueError, match="optimizer must be one of"):
        lp.MCMCSGD(ENTRIES["radon_slope"].model(Backend("pyro")), optimizer=optimizer)


def test_fisher_scoring_on_per_unit_streams_does_not_depend_on_the_order_of_the_units():
    """``rng="per_unit"``: Fisher scoring's prior draws come from each unit's stream too, so units given in another
    order give the same estimates and the permuted chains (what makes a distributed fit equal one process)."""
    from test_rng_streams import _assert_permuted, _slope_arrays, _slope_engine

    from latentfit.inference.mcmcsgd import MCMCSGD

    backend = Backend("pyro")
    n = _slope_arrays()[0].shape[0]
    perm = np.random.default_rng(1).permutation(n)
    options = dict(cls=MCMCSGD, num_iters=16, burn_in=2, optimizer="fisher")
    a = _slope_engine(backend, np.arange(n), **options).run(backend.key(5))
    b = _slope_engine(backend, perm, **options).run(backend.key(5))
    assert a.engine.fisher and np.ptp(np.asarray(a.history["iterate"])[2:], 0).max() > 0.01  # Fisher steps moved θ
    _assert_permuted(a, b, perm, backend, tol=1e-10)
    # each unit's prior draw is its own (on this model the sum over units alone would not show it)
    ea, eb = (_slope_engine(backend, p, **options) for p in (np.arange(n), perm))
    draws = []
    for engine in (ea, eb):
        state = engine.init(backend.key(5))
        draws.append(backend.to_numpy(engine._prior_draw(state, engine.theta_of(state), state.z, None,
                                                         engine.ops.split(state.key)[1], 7)))
    np.testing.assert_array_equal(draws[1], draws[0][:, perm])


def test_information_refreshed_every_m_steps(monkeypatch):
    """``information_every=4``: Γ's Hessian is computed at gradient steps 1, 5, 9, 13 of 15 only (4 calls; 15 with the
    default), and the fit stays finite."""
    calls = {"n": 0}
    original = preconditioned.information

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(preconditioned, "information", counted)
    counts = {}
    for every in (4, 1):
        calls["n"] = 0
        fit = _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=20, burn_in=5, information_every=every)
        counts[every] = calls["n"]
        assert np.all(np.isfinite(fit.history["iterate"]))
    assert counts == {4: 4, 1: 15}
