"""MCMCSGD's Fisher-scoring step (``optimizer="fisher"``, latentfit/inference/preconditioned.py; issue 11).

Known answer: the closed-form ML point of the gallery's random-slope radon model (``gallery_reference.lmm_mle``),
within ``TOL_SDS`` of SAEM's Monte-Carlo errors as in tests/test_mcmcsgd.py.  The model's β and σ enter the
likelihood, so both parts of the information (the prior's at prior draws, the likelihood's at the chains) are used.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from backends import Backend
from test_mcmcsgd import _check_known_answer, _fit, _mlp_data, _numpyro_flax_mlp_model

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
    """The default schedule ("sem"): the heavy-ball steps (rate tapered from RATE), then γ = 1 to the end, and the
    reported estimate is the average of the iterates after ``average_from = burn_in + momentum_steps`` weighted by
    their index (``linear_average``), exactly."""
    fit = _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=60, burn_in=5)
    engine = fit.engine
    assert engine.fisher and engine.schedule == "sem" and engine.averaging == "linear"
    assert engine.momentum_steps == 7 and engine.average_from == 5 + 7
    rate = np.asarray(fit.history["learning_rate"])
    assert rate[5] == pytest.approx(preconditioned.RATE) and np.all(np.diff(rate[5:12]) < 0)
    np.testing.assert_allclose(rate[12:], 1.0)  # γ = 1 to the end
    iterates = np.asarray(fit.history["iterate"])[12:]  # iterations 13..60: weights 1..48
    weights = np.arange(1, len(iterates) + 1, dtype=float)
    expected = (weights[:, None] * iterates).sum(0) / weights.sum()
    np.testing.assert_allclose(Backend("pyro").to_numpy(fit.state.x_avg), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # four NumPyro fits, each compiling its chunks: 45-60 s at load 7
@pytest.mark.parametrize("schedule", ["sem", "decay"])
def test_one_compiled_phase_equals_one_iteration_per_call(schedule):
    """NumPyro: the burn-in, the heavy-ball steps and Fisher scoring are one phase told apart by k inside the compiled
    step (one program for the run).  Chunks of 7 iterations that straddle the burn-in's and the heavy-ball steps' ends
    (iterations 4 and 9) give the history and estimate of one iteration per call (chunk_size=1) to rounding, and the
    schedule of the steps is iteration by iteration the one of the phases: rate 0 in the burn-in, the tapered
    heavy-ball rate from RATE, then γ = 1 (``"decay"``: γ decaying after ``average_from``)."""
    opts = dict(optimizer="fisher", num_iters=24, burn_in=4, momentum_steps=5, information="exact", schedule=schedule)
    if schedule == "decay":
        opts["average_from"] = 14
    fits = {c: _fit(Backend("numpyro"), "radon_slope", chunk_size=c, **opts) for c in (7, 1)}
    assert fits[7].engine.phases() == [(1, 24, "fisher")]
    assert set(fits[7].history) == set(fits[1].history)
    for name in fits[7].history:
        np.testing.assert_allclose(fits[7].history[name], fits[1].history[name], rtol=1e-12, atol=1e-13, err_msg=name)
    for name, value in fits[7].params.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(fits[1].params[name]), rtol=1e-12, err_msg=name)
    rate = np.asarray(fits[7].history["learning_rate"])
    np.testing.assert_array_equal(rate[:4], 0.0)  # the burn-in: no gradient step
    taper = [preconditioned.momentum_of(t, 5)[0] for t in range(1, 6)]
    np.testing.assert_allclose(rate[4:9], taper, rtol=1e-6)  # the heavy-ball rate (float32 on JAX), RATE first
    if schedule == "sem":
        np.testing.assert_array_equal(rate[9:], 1.0)
    else:
        np.testing.assert_array_equal(rate[9:14], 1.0)
        np.testing.assert_allclose(rate[14:], [preconditioned.gamma_of(t, 10) for t in range(11, 21)], rtol=1e-12)


def test_linear_average_is_the_index_weighted_mean():
    """``linear_average``'s recursion is ``Σ_j j θ_j / Σ_j j`` over the iterates since averaging began."""
    from latentfit.inference.mcmcsgd import linear_average

    xs = np.random.default_rng(0).standard_normal((50, 3))
    avg = xs[0] * 7.0  # the count-1 step replaces whatever came before
    for m in range(1, 51):
        avg = linear_average(avg, xs[m - 1], m)
    weights = np.arange(1, 51, dtype=float)
    np.testing.assert_allclose(avg, (weights[:, None] * xs).sum(0) / weights.sum(), rtol=1e-12)


def test_fisher_scoring_decay_schedule():
    """``schedule="decay"`` (the schedule before; the default with mini-batches): the heavy-ball steps, then γ = 1
    until ``average_from = burn_in + num_iters // 5``, then ``γ = (k − k₀)^{−α}``, the uniform (Polyak–Ruppert) average
    reported."""
    fit = _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=60, burn_in=5, schedule="decay")
    engine = fit.engine
    assert engine.fisher and engine.average_from == 5 + 12 and engine.momentum_steps == 7
    assert engine.averaging == "uniform"
    batches = _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=8, burn_in=2, batch_size=10).engine
    assert batches.batch_size == 10 and batches.schedule == "decay" and batches.averaging == "uniform"
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
    # NaN off the diagonal: torch's eigh raised (did not converge) on it before it was replaced by the identity
    broken = torch.tensor([[0.07, 0.0, np.nan], [0.0, 160.0, np.nan], [0.0, 0.0, np.nan]], dtype=torch.float64)
    step, ok = preconditioned.solve(ops, broken, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
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


@pytest.mark.slow_on("numpyro")  # eager JAX steps: 30-70 s each at load 6
@pytest.mark.parametrize("prune", [True, False])
def test_exact_information_is_the_closed_form_fisher_information(backend, prune):
    """``information="exact"``: after the first Fisher step (γ = 1, so Γ_1 = Ĥ_1), Γ is the prior's expected
    information in closed form.  Model: ``phi_g ~ Normal(beta, omega)`` (2 dims) and ``s_g ~ LogNormal(m, tau)`` over
    G = 12 groups, θ in the prior only; in x = (beta, log omega, m, log tau) the information of ``N(μ, σ)`` is
    ``G / σ²`` for the mean and ``2 G`` for ``log σ``, cross terms 0.  With ``prune=False`` the likelihood's observed
    information at the chains is added (0 here: θ does not enter it) and the prior's comes from the model's density."""
    from test_pruned_gradient import SIZES, _args, _data, _model

    from latentfit.inference.mcmcsgd import MCMCSGD

    lm = backend.latent_model(_model(backend), *_args(backend, _data()))
    engine = MCMCSGD(lm, optimizer="fisher", information="exact", num_iters=5, burn_in=0, prune=prune,
                     progress=False)
    state = engine.init(backend.key(3))
    assert (engine._prior_only is not None) == prune
    state, _ = engine.step(state, lm.ops.asarray(np.array(1), dtype=None), engine.phases()[0][2])
    g = len(SIZES)
    theta0 = {n: np.atleast_1d(lm.ops.to_numpy(lm.params[n].value)) for n in engine.names}
    expected = {"beta": g / theta0["omega"] ** 2, "omega": np.full(2, 2.0 * g), "m": g / theta0["tau"] ** 2,
                "tau": np.array([2.0 * g])}
    diag = np.concatenate([expected[n] for n in engine.names])
    np.testing.assert_allclose(backend.to_numpy(state.opt["gamma"]), np.diag(diag), rtol=1e-10, atol=1e-9)


def test_exact_information_refuses_non_gaussian_latents_and_unknown_names():
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    import latentfit.pyro as lp
    from latentfit.inference.model import ModelSpecificationError

    def model(x, group, num_groups, y=None):
        rate = pyro.param("rate", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
        with pyro.plate("group", num_groups):
            u = pyro.sample("u", dist.Gamma(2.0, rate))
        with pyro.plate("rows", len(x)):
            pyro.sample("y", dist.Poisson(u[group] * torch.exp(x)), obs=y)

    group = torch.arange(4).repeat_interleave(3)
    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64)
    args = (x, group, 4, torch.ones(12, dtype=torch.float64))
    with pytest.raises(ModelSpecificationError, match="needs Gaussian latents"):
        lp.MCMCSGD(model, optimizer="fisher", information="exact", num_iters=3, burn_in=1, progress=False).run(*args)
    with pytest.raises(ValueError, match="information must be one of"):
        lp.MCMCSGD(model, optimizer="fisher", information="sigma", num_iters=3, burn_in=1, progress=False).run(*args)


def test_momentum_steps_option():
    """``momentum_steps=3``: three heavy-ball steps (rate tapered from RATE), then γ = 1 until ``average_from``."""
    fit = _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=60, burn_in=5, momentum_steps=3,
               average_from=29)
    assert fit.engine.momentum_steps == 3 and fit.engine.average_from == 29
    rate = np.asarray(fit.history["learning_rate"])
    assert rate[5] == pytest.approx(preconditioned.RATE) and np.all(np.diff(rate[5:8]) < 0)
    np.testing.assert_allclose(rate[8:29], 1.0)
    with pytest.raises(ValueError, match="momentum_steps must be >= 0"):
        _fit(Backend("pyro"), "radon_slope", optimizer="fisher", num_iters=20, momentum_steps=-1)


@pytest.mark.slow_on("numpyro")  # eager JAX steps
def test_exact_information_in_closed_form_equals_the_sigma_points_of_every_unit(backend):
    """``information="exact"`` with the pruned gradient: Γ in closed form (``Jᵀ I₁ J`` times the units, Hessian-free;
    J from the elementwise transforms' log|det|, or by autodiff), one unit's sigma points times the units, and the
    Hessian of the log-prior over the sigma points of every unit (the path before) agree to 1e-12 at a θ away from
    the start, and equal the hand-computed information there: in x = (beta, log omega, m, log tau), ``G / ω²`` for
    each mean, ``2 G`` for each log-scale (G = 12 groups)."""
    from test_pruned_gradient import SIZES, _args, _data, _model

    from latentfit.inference.mcmcsgd import MCMCSGD

    lm = backend.latent_model(_model(backend), *_args(backend, _data()))
    ops = lm.ops
    moved = ops.asarray(np.array([0.3, -0.2, 0.4, -0.7, 0.25, 0.6]), dtype=None)  # (beta, log omega, m, log tau)
    gammas, calls = {}, {}
    for path in ("closed", "closed, J by autodiff", "one unit", "every unit"):
        engine = MCMCSGD(lm, optimizer="fisher", information="exact", num_iters=5, burn_in=0, progress=False)
        state = engine.init(backend.key(3))
        state = state._replace(x=state.x + moved)
        closed, one = engine._closed_form_information, engine._one_unit_sigma_points
        calls[path] = []
        if path == "closed":  # the transforms (identity, exp) are elementwise: J from their log|det|
            assert engine._elementwise_slopes(state.x) is not None
        else:
            engine._elementwise_slopes = lambda x: None

        def closed_form(*a, _f=closed, _p=path, **kw):
            out = _f(*a, **kw) if _p.startswith("closed") else None
            calls[_p].append(out is not None)
            return out

        engine._closed_form_information = closed_form
        engine._one_unit_sigma_points = (one if path != "every unit" else lambda *a, **kw: None)
        state, _ = engine.step(state, ops.asarray(np.array(1), dtype=None), engine.phases()[0][2])
        gammas[path] = backend.to_numpy(state.opt["gamma"])
    assert calls["closed"] == calls["closed, J by autodiff"] == [True]  # the closed form applied to this model
    g = len(SIZES)
    x = backend.to_numpy(moved) + np.array([0.0, 0.5, 0.0, 0.0, 0.0, np.log(0.5)])  # the start: beta (0, .5), tau .5
    omega, tau = np.exp(x[2:4]), np.exp(x[5])
    hand = np.diag([g / omega[0] ** 2, g / omega[1] ** 2, 2.0 * g, 2.0 * g, g / tau ** 2, 2.0 * g])
    np.testing.assert_allclose(gammas["closed"], hand, rtol=1e-12, atol=1e-10)
    for path in ("closed, J by autodiff", "one unit", "every unit"):
        np.testing.assert_allclose(gammas[path], gammas["closed"], rtol=1e-12, atol=1e-10 * np.max(hand))


def test_exact_information_in_closed_form_with_parameters_shared_over_coordinates():
    """A Normal site of 3 coordinates whose mean and sd are scalars: one unit's information sums over the coordinates
    (``3 / σ²`` for the mean, ``2 · 3`` for log σ); the closed form equals the sigma points of every unit (1e-12)."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    from latentfit.inference.mcmcsgd import MCMCSGD
    from latentfit.integrations.pyro import PyroLatentModel

    def model(x, y=None):
        mu = pyro.param("mu", torch.tensor(0.2, dtype=torch.float64))
        sigma = pyro.param("sigma", torch.tensor(0.7, dtype=torch.float64), constraint=constraints.positive)
        with pyro.plate("unit", x.shape[0]):
            phi = pyro.sample("phi", dist.Normal(mu, sigma).expand([3]).to_event(1))
            pyro.sample("y", dist.Normal((phi * x).sum(-1), 1.0), obs=y)

    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_normal((15, 3)))
    lm = PyroLatentModel(model, (x, torch.tensor(rng.standard_normal(15))), {})
    gammas = {}
    for path in ("closed", "every unit"):
        engine = MCMCSGD(lm, optimizer="fisher", information="exact", num_iters=5, burn_in=0, progress=False)
        state = engine.init(lm.ops.key(0))
        if path == "every unit":
            engine._closed_form_information = lambda *a, **kw: None
            engine._one_unit_sigma_points = lambda *a, **kw: None
        state, _ = engine.step(state, torch.tensor(1), engine.phases()[0][2])
        gammas[path] = state.opt["gamma"].numpy()
    np.testing.assert_allclose(gammas["closed"], np.diag([15 * 3 / 0.7 ** 2, 15 * 2.0 * 3]), rtol=1e-12)
    np.testing.assert_allclose(gammas["every unit"], gammas["closed"], rtol=1e-12, atol=1e-9)


# ----- the default optimiser: "auto" --------------------------------------------------------------------------
def _unwarned_engine(model: object) -> tuple[object, list[str]]:
    """``MCMCSGD(model)`` with every option at its default, and the UserWarnings its construction gave."""
    import warnings

    from latentfit.inference.mcmcsgd import MCMCSGD

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = MCMCSGD(model, progress=False)
    return engine, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_the_default_optimizer_is_auto_and_fisher_scoring_on_a_small_model(backend):
    """With no ``optimizer`` given, the random-slope model (7 free parameters, no module) gets Fisher scoring with its
    own schedule: the γ = 1 steps after 60 heavy-ball steps, the index-weighted average — on both PPLs, silently."""
    import inspect

    from test_gallery import ENTRIES, _args

    from latentfit.inference.mcmcsgd import MCMCSGD

    assert inspect.signature(MCMCSGD).parameters["optimizer"].default == "auto"
    entry = ENTRIES["radon_slope"]
    lm = backend.latent_model(entry.model(backend), *_args(backend, entry, entry.data()))
    assert not lm.module_params
    engine, warned = _unwarned_engine(lm)
    assert warned == []
    assert engine.fisher is True and engine.optimizer_spec == "auto" and engine.information == "exact"
    assert engine.schedule == "sem" and engine.averaging == "linear"
    assert engine.momentum_steps == 60 and engine.average_from == engine.burn_in + 60


def _pyro_mlp_model(hidden: int, sigma: float | None):
    """Random intercepts around an MLP mean ``pyro.module`` (``3 hidden + 1`` weights), σ a param or fixed."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn
    from torch.distributions import constraints

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()

    def model(x, group, num_groups, y=None):
        net = pyro.module("mlp", mlp)
        omega = pyro.param("omega", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
        scale = sigma if sigma is not None else pyro.param("sigma", torch.tensor(1.0, dtype=x.dtype),
                                                           constraint=constraints.positive)
        with pyro.plate("group", num_groups):
            u = pyro.sample("u", dist.Normal(0.0, omega))
        with pyro.plate("rows", len(x)):
            pyro.sample("y", dist.Normal(net(x[:, None]).squeeze(-1) + u[group], scale), obs=y)

    return model


@pytest.mark.parametrize("hidden,sigma,num_free", [(21, 0.3, 65), (16, None, 51)])
def test_the_default_uses_adam_without_a_warning_on_a_neural_network(hidden, sigma, num_free):
    """A ``pyro.module`` MLP with random intercepts gets Adam from the default, without a warning: above
    ``MAX_PARAMS`` free parameters (65), and below it too (51: an MLP's complete-data information is indefinite,
    and Fisher scoring took tests/test_mcmcsgd.py's fit of this model far below its start).  ``"fisher"`` still
    means Fisher scoring on the 51-parameter one."""
    import torch

    from latentfit.inference.mcmcsgd import MCMCSGD
    from latentfit.integrations.pyro import PyroLatentModel

    group, x, y, num = _mlp_data()
    args = (torch.as_tensor(x), torch.as_tensor(group), num, torch.as_tensor(y))
    lm = PyroLatentModel(_pyro_mlp_model(hidden, sigma), args)
    assert sum(p.value.numel() for p in lm.params.values()) == num_free
    assert lm.module_params == {n for n in lm.params if n.startswith("mlp$$$")} and len(lm.module_params) == 4
    engine, warned = _unwarned_engine(lm)
    assert warned == []
    assert engine.fisher is False and engine.momentum_steps == 0 and engine.schedule is None
    assert engine.averaging == "uniform" and engine.average_from == engine.num_iters // 2
    if num_free <= preconditioned.MAX_PARAMS:
        assert MCMCSGD(lm, optimizer="fisher", progress=False).fisher is True


def test_the_default_uses_adam_on_a_numpyro_flax_module():
    """The NumPyro counterpart: a flax MLP through ``numpyro.contrib.module.flax_module`` (51 free parameters)."""
    pytest.importorskip("flax")
    import jax.numpy as jnp

    from latentfit.integrations.numpyro import NumPyroLatentModel

    group, x, y, num = _mlp_data()
    lm = NumPyroLatentModel(_numpyro_flax_mlp_model(), (jnp.asarray(x), jnp.asarray(group), num, jnp.asarray(y)))
    assert lm.module_params == set(lm.params) - {"omega", "sigma"} and len(lm.module_params) == 4
    engine, warned = _unwarned_engine(lm)
    assert warned == [] and engine.fisher is False


def _log_alpha_data() -> tuple[np.ndarray, np.ndarray]:
    """80 groups of 1-11 rows, ``y = log(|a_g + 0.5 ε| + 0.1)``, ``a_g ~ N(1, 0.7²)``: data for ``log_alpha``."""
    rng = np.random.default_rng(4)
    group = np.repeat(np.arange(80), rng.integers(1, 12, 80))
    a = 1.0 + 0.7 * rng.standard_normal(80)
    return group, np.log(np.abs(a[group] + 0.5 * rng.standard_normal(len(group))) + 0.1)


def _log_alpha_loglik(theta: np.ndarray, group: np.ndarray, y: np.ndarray) -> float:
    """The exact log-likelihood of ``models_*.log_alpha``, ``Σ_j log ∫_{a>0} N(a; μ, ω²) Π_r N(y_r; log a, σ²) da`` (a
    group's likelihood is 0 at a ≤ 0), by quadrature on a grid of ``u = log a`` (step 0.01 on [−12, 4])."""
    from scipy.special import logsumexp

    mu, omega, sigma = theta
    u = np.linspace(-12.0, 4.0, 1601)
    n = np.bincount(group)[:, None]
    s1, s2 = np.bincount(group, weights=y)[:, None], np.bincount(group, weights=y * y)[:, None]
    log_prior = -0.5 * np.log(2 * np.pi * omega**2) - 0.5 * (np.exp(u) - mu) ** 2 / omega**2 + u
    log_lik = -0.5 * n * np.log(2 * np.pi * sigma**2) - 0.5 * (s2 - 2 * u * s1 + n * u * u) / sigma**2
    return float(np.sum(logsumexp(log_prior + log_lik, axis=1) + np.log(u[1] - u[0])))


@functools.cache
def _log_alpha_mle() -> tuple[np.ndarray, float]:
    """The exact ML point of ``log_alpha`` on :func:`_log_alpha_data` and its log-likelihood."""
    from scipy.optimize import minimize

    group, y = _log_alpha_data()

    def nll(p):
        return -_log_alpha_loglik((p[0], np.exp(p[1]), np.exp(p[2])), group, y)

    r = minimize(nll, [1.0, np.log(0.5), np.log(0.5)], method="Nelder-Mead",
                 options=dict(xatol=1e-6, fatol=1e-8, maxiter=2000))
    return np.array([r.x[0], np.exp(r.x[1]), np.exp(r.x[2])]), -float(r.fun)


@pytest.mark.filterwarnings("ignore:MCMCSGD.*NaN/inf log-density")  # the prior-IMH's proposals below 0: rejected
@pytest.mark.parametrize("backend_name,information", [
    ("pyro", "exact"), ("pyro", "draw"), ("numpyro", "exact"),
    pytest.param("numpyro", "draw", marks=pytest.mark.slow)])
def test_fisher_scoring_where_the_likelihood_is_undefined_at_prior_points(backend_name, information):
    """``y ~ N(log a_g, σ²)``, ``a_g ~ N(μ, ω²)`` from μ = 10 (the audit's model): σ enters the likelihood, so Γ takes
    the likelihood's information at the chains (all a > 0) and the prior's at its sigma points or draws, some below
    0 as μ − ω nears 0.  Evaluated together, the NaN likelihood there made the whole Hessian NaN: torch's eigh raised
    (Pyro: ``linalg.eigh ... failed to converge``), and on JAX every step fell back to Adam, 200 iterations ending at
    μ ≈ 3-7, ω ≈ 4-6 (MLE: μ 1.094, ω 0.553).  Now the fit reaches the exact (quadrature) ML point: over seeds 0-3 on
    both PPLs and both informations (a scratch run) within 0.005 of μ, 0.01 of ω, 0.002 of σ, and 0.01 of its
    log-likelihood; allowed: 0.02, 0.03, 0.006 and 0.05."""
    backend = Backend(backend_name)
    group, y = _log_alpha_data()
    mle, best = _log_alpha_mle()
    idx = backend.tensor(group, dtype=backend.xp.int64)
    fit = backend.fit("MCMCSGD", backend.models.log_alpha, idx, 80, backend.tensor(y), seed=0, progress=False,
                      num_iters=200, information=information)
    assert fit.engine.fisher and fit.engine.information == information
    est = np.array([float(fit.params[k]) for k in ("mu", "omega", "sigma")])
    assert np.all(np.abs(est - mle) < [0.02, 0.03, 0.006]), (est, mle)
    assert best - _log_alpha_loglik(est, group, y) < 0.05
