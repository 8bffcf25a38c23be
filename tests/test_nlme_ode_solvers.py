"""Library ODE solvers behind ``nlme.ode(..., solver="adaptive" | "stiff")`` (diffrax on JAX; torchdiffeq and RODAS4
on torch):
a stiff target-mediated drug disposition model against scipy's LSODA and BDF, the closed-form oral model with two
doses, gradients through the solve against finite differences, clear errors, and a JAX SAEM fit."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_nlme_ode import SAEMIX, THEO, _multiple_dose_table, _predict, _table, oral_ode

import latentfit as lf
from latentfit.models import nlme


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


# --- target-mediated drug disposition (full TMDD, Mager & Jusko 2001) -------------------------------------------------
# A: drug amount in the central volume V (doses go here), R: free target, P: drug–target complex (concentrations):
#   dA/dt = −kel·A − V·(kon·L·R − koff·P),  L = A/V
#   dR/dt = kdeg·R0 − kdeg·R − kon·L·R + koff·P,  R(0) = R0
#   dP/dt = kon·L·R − koff·P − kint·P
# Binding (kon·L up to ~1000/h right after a dose, kon·R0 = 100/h) is 4-5 orders of magnitude faster than the
# slowest process (koff, kdeg ~ 0.05/h): stiff.
TMDD = ("V", "kel", "kon", "koff", "kint", "kdeg", "R0")


def _tmdd_rhs(t, x, psi, xp):
    a, r, p = x
    lig = a / psi["V"]
    bind = psi["kon"] * lig * r - psi["koff"] * p
    return (-psi["kel"] * a - psi["V"] * bind, psi["kdeg"] * (psi["R0"] - r) - bind, bind - psi["kint"] * p)


def _tmdd(solver: str, **kw) -> nlme.Structural:
    return nlme.ode(_tmdd_rhs, TMDD, num_states=3, observe=lambda x, psi, xp: x[0] / psi["V"],
                    initial=lambda psi, xp: (0.0 * psi["R0"], psi["R0"], 0.0 * psi["R0"]), dose_compartment=1,
                    solver=solver, **kw)


TMDD_PSI = np.array([[3.0, 0.10, 10.0, 0.05, 0.10, 0.20, 10.0],
                     [2.5, 0.15, 5.0, 0.02, 0.05, 0.10, 20.0],
                     [4.0, 0.08, 20.0, 0.10, 0.20, 0.30, 5.0]])
TMDD_TIMES = (0.05, 0.25, 1.0, 4.0, 12.0, 24.0, 24.1, 30.0, 48.0, 72.0)


def _tmdd_table():
    """3 individuals: 300 nmol at 0 h and 150 nmol at 24 h (an observation at the second dose's time)."""
    rows = []
    for i in range(1, 4):
        rows += [(i, 0.0, 300.0, 0.0, 1, 1), (i, 24.0, 150.0, 0.0, 1, 1)]
        rows += [(i, t, 0.0, 0.0, 1, 0) for t in TMDD_TIMES]
    return _table(rows)


def _tmdd_scipy(method: str, psi_rows: np.ndarray = TMDD_PSI) -> np.ndarray:
    """Free ligand L = A/V at TMDD_TIMES by solve_ivp (rtol 1e-10, atol 1e-12), interval by interval."""
    from scipy.integrate import solve_ivp

    out = np.zeros((len(psi_rows), len(TMDD_TIMES)))
    times = np.array(TMDD_TIMES)
    for i, row in enumerate(psi_rows):
        psi = dict(zip(TMDD, row, strict=True))
        rhs = lambda t, x, psi=psi: np.array(_tmdd_rhs(t, x, psi, np))  # noqa: E731
        first = solve_ivp(rhs, (0.0, 24.0), [300.0, psi["R0"], 0.0], method=method, rtol=1e-10, atol=1e-12,
                          dense_output=True)
        x24 = first.y[:, -1] + np.array([150.0, 0.0, 0.0])
        second = solve_ivp(rhs, (24.0, 72.0), x24, method=method, rtol=1e-10, atol=1e-12, dense_output=True)
        # an observation at 24 h follows the dose there (doses first at equal times)
        a = np.where(times < 24.0, first.sol(np.minimum(times, 24.0))[0], second.sol(np.maximum(times, 24.0))[0])
        out[i] = a / psi["V"]
    return out


def _tmdd_theta() -> dict[str, float]:
    return {**dict.fromkeys(TMDD, 1.0), **{f"omega2_{k}": 0.1 for k in TMDD}, "a": 0.1}


#: moderately stiff (kon / 20: binding up to ~50/h against 0.02/h) for torchdiffeq's explicit dopri5
TMDD_PSI_MILD = TMDD_PSI * np.array([1, 1, 1 / 20, 1, 1, 1, 1])


def _references(psi_rows: np.ndarray) -> np.ndarray:
    lsoda, bdf = _tmdd_scipy("LSODA", psi_rows), _tmdd_scipy("BDF", psi_rows)
    np.testing.assert_allclose(lsoda, bdf, rtol=1e-7)  # the two references agree well below the tested 1e-6
    return bdf


def test_stiff_tmdd_against_scipy_on_torch():
    """torch's "stiff" solver (RODAS4, a Rosenbrock method: implicit in the linearisation, L-stable) on the stiff TMDD
    against LSODA/BDF to 1e-6 relative (rtol 1e-7), in < 5000 steps for the 10 intervals (measured ~2400).  The
    explicit dopri5 (``"adaptive"``) is bounded by stability there (binding up to kon·L ≈ 1000/h): measured 6x the
    time at rtol 1e-6, and 3e-4 relative error where the tolerance asks 1e-6.  The fixed-step
    RK4 default (step 72 h / 200 = 0.36 h, kon·L·h ≈ 18 > 2.8) is unstable, which the binding says (its
    step-halving check at the initial values)."""
    from latentfit.integrations import ode_solvers

    reference = _references(TMDD_PSI)
    model = nlme.NLME(_tmdd("stiff", rtol=1e-7, atol=1e-9), dict.fromkeys(TMDD, 1.0), data=_tmdd_table())
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in _tmdd_theta().items()}
    steps = []
    solve = ode_solvers.rodas4_solve

    def counted(*args, **kwargs):
        y, taken = solve(*args, **kwargs)
        steps.append(taken)
        return y, taken

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ode_solvers, "rodas4_solve", counted)
        got = model.predict(theta, torch.tensor(np.log(TMDD_PSI)))[0].numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-6)
    assert len(steps) == 10 and sum(steps) < 5000, steps  # 10 intervals between the 11 distinct event times
    with pytest.warns(nlme.SolverWarning, match=r"not finite .*h = 0.36, the default max_step"):
        rk4 = nlme.NLME(_tmdd("rk4"), dict.fromkeys(TMDD, 1.0), data=_tmdd_table())
    rk4_pred = rk4.predict(theta, torch.tensor(np.log(TMDD_PSI)))[0].numpy()
    assert not np.allclose(rk4_pred, reference, rtol=1e-2)


def _forced_pendulum(s, y):
    """A nonlinear, time-dependent test field (elementwise over the leading axes; ``s`` broadcasts against
    ``y[..., 0]``): y₀' = y₁, y₁' = −sin y₀ + 0.3·cos(2s)·y₀²."""
    s = torch.as_tensor(s, dtype=y.dtype)
    a, b = y[..., 0], y[..., 1]
    return torch.stack([b + 0 * s, -torch.sin(a) + 0.3 * torch.cos(2 * s) * a ** 2], -1)


def test_rodas4_is_fourth_order_with_a_third_order_error_estimate():
    """Fixed steps h = 2/n on a nonlinear, time-dependent problem against DOP853 at rtol 1e-13: the global error falls
    16× (2⁴) per halving of h, and the error estimate k₆ of one step (the order-3 embedded solution's local error,
    O(h⁴)) 16× as well: a wrong digit in any of the 41 coefficients (or the ∂f/∂t terms) breaks one of them."""
    from scipy.integrate import solve_ivp

    from latentfit.integrations.ode_solvers import rodas4_step

    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.4]], dtype=torch.float64)  # two "individuals"
    np_field = lambda s, y: _forced_pendulum(s, torch.tensor(y)).numpy()  # noqa: E731
    exact = np.stack([solve_ivp(np_field, (0.0, 2.0), y, method="DOP853", rtol=1e-13, atol=1e-14).y[:, -1]
                      for y in y0.numpy()])
    errors, estimates = [], []
    for n in (10, 20, 40, 80):
        h, y, s = 2.0 / n, y0, 0.0
        for i in range(n):
            y, err = rodas4_step(_forced_pendulum, s, y, h)
            s += h
            if i == 0:
                estimates.append(float(err.abs().max()))
        errors.append(float(np.abs(y.numpy() - exact).max()))
    global_ratios = np.array(errors[:-1]) / np.array(errors[1:])
    local_ratios = np.array(estimates[1:-1]) / np.array(estimates[2:])  # the first pair is pre-asymptotic
    assert np.all((global_ratios > 13.0) & (global_ratios < 19.0)), global_ratios
    assert np.all((local_ratios > 13.0) & (local_ratios < 19.0)), local_ratios


def test_rodas4_is_l_stable_and_takes_steps_its_stiffness_would_forbid_an_explicit_method():
    """On y' = λy one step is y·R(hλ): |R| < 1 on the whole negative axis and R → 0 as hλ → −∞ (L-stability: a fast
    transient is damped in one step).  A linear system with rates 1 and 10⁶ (its solution by the matrix
    exponential) is solved to 1e-8 in < 500 steps, where an explicit method's step is bounded by ~3.3 / 10⁶ (3·10⁵
    steps)."""
    from scipy.linalg import expm

    from latentfit.integrations.ode_solvers import rodas4_solve, rodas4_step

    for z in -np.logspace(-2, 10, 49):
        y1, _ = rodas4_step(lambda s, y, z=z: z * y, 0.0, torch.ones(1, 1, dtype=torch.float64), 1.0)
        assert abs(float(y1)) < 1.0, z
    y1, _ = rodas4_step(lambda s, y: -1e12 * y, 0.0, torch.ones(1, 1, dtype=torch.float64), 1.0)
    assert abs(float(y1)) < 1e-10
    q = np.array([[1.0, 1.0], [-1.0, 1.0]]) / np.sqrt(2.0)
    a = q @ np.diag([-1.0, -1e6]) @ q.T
    at = torch.tensor(a)
    y0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    y1, steps = rodas4_solve(lambda s, y: y @ at.T, y0, rtol=1e-9, atol=1e-12, max_steps=1000)
    exact = y0.numpy() @ expm(a).T
    np.testing.assert_allclose(y1.numpy(), exact, rtol=1e-8)
    assert steps < 500, steps  # measured 372 (most of them resolving the fast transient to 1e-9)


@pytest.mark.slow
def test_stiff_tmdd_against_scipy_on_jax():
    """JAX: diffrax's Kvaerno5 (implicit, L-stable) on the stiff TMDD against LSODA/BDF to 1e-6 relative (rtol 1e-8),
    with chain dimensions.  Slow (compilation of the implicit solver in forward and reverse mode: ~30 s loaded)."""
    jax = _jax()
    reference = _references(TMDD_PSI)
    model = nlme.NLME(_tmdd("stiff", rtol=1e-8, atol=1e-10, max_steps=20000), dict.fromkeys(TMDD, 1.0),
                      data=_tmdd_table(), backend="jax")
    z = np.broadcast_to(np.log(TMDD_PSI), (2, *TMDD_PSI.shape))
    got = np.asarray(model.predict(_tmdd_theta(), jax.numpy.asarray(z))[0])
    np.testing.assert_allclose(got, np.broadcast_to(reference, got.shape), rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_adaptive_solvers_reproduce_the_closed_form_with_two_doses(backend):
    """One-compartment first-order absorption, two doses (one at an observation's time), four individuals and three
    chains: the adaptive solver at rtol 1e-10 matches the closed form to 1e-8 relative (RK4's default step: 5e-4)."""
    values = dict(ka=1.2, V=20.0, CL=2.0, omega2_ka=0.1, omega2_V=0.1, omega2_CL=0.1, a=0.1)
    df = _multiple_dose_table()
    start = {"ka": 1.0, "V": 1.0, "CL": 1.0}
    if backend == "torch":
        closed = _predict(nlme.NLME("one_compartment_oral", start, data=df), values)
        got = _predict(nlme.NLME(oral_ode(solver="adaptive", rtol=1e-10, atol=1e-12), start, data=df), values)
    else:
        jax = _jax()
        z = jax.numpy.asarray(np.log([[1.2, 20.0, 2.0]]) + 0.3 * np.random.default_rng(0).normal(size=(3, 4, 3)))
        closed = np.asarray(nlme.NLME("one_compartment_oral", start, data=df, backend="jax").predict(values, z)[0])
        model = nlme.NLME(oral_ode(solver="adaptive", rtol=1e-10, atol=1e-12), start, data=df, backend="jax")
        got = np.asarray(model.predict(values, z)[0])
    np.testing.assert_allclose(got, closed, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend, solver", [("torch", "adaptive"),
                                             pytest.param("torch", "stiff", marks=pytest.mark.slow),  # ~100-200 s
                                             pytest.param("jax", "adaptive", marks=pytest.mark.slow),
                                             pytest.param("jax", "stiff", marks=pytest.mark.slow)])
def test_gradients_through_the_solve_match_finite_differences(backend, solver):
    """d/dz of ``Σ_t w_t·pred_it`` (z the log-parameters, two doses, the parameters change the step sequence too)
    through the adaptive solve (JAX: also the implicit one, per individual under vmap): reverse mode (torch
    autograd; jax.grad) and forward mode (jax.jvp, as used by the Laplace/Fisher code) against central differences
    (step 1e-5 at rtol 1e-10: truncation ~1e-10, solver noise ~1e-10/1e-5), to 1e-6 relative to the largest
    derivative."""
    values = dict(ka=1.2, V=20.0, CL=2.0, omega2_ka=0.1, omega2_V=0.1, omega2_CL=0.1, a=0.1)
    df = _multiple_dose_table()
    start = {"ka": 1.0, "V": 1.0, "CL": 1.0}
    z0 = np.log([[1.2, 20.0, 2.0], [0.8, 15.0, 3.0], [2.0, 25.0, 1.5], [1.0, 18.0, 2.5]])
    w = np.random.default_rng(1).uniform(0.5, 1.5, size=(4, 9))
    if backend == "torch":
        model = nlme.NLME(oral_ode(solver=solver, rtol=1e-10, atol=1e-12), start, data=df)
        th = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
        wt = torch.tensor(w)

        def per_unit(z):
            return (model.predict(th, z)[0] * wt).sum(-1)

        zt = torch.tensor(z0, requires_grad=True)
        autos = [torch.autograd.grad(per_unit(zt).sum(), zt)[0].numpy()]
        f = lambda z: per_unit(torch.as_tensor(z)).detach().numpy()  # noqa: E731
    else:
        jax = _jax()
        jnp = jax.numpy
        model = nlme.NLME(oral_ode(solver=solver, rtol=1e-10, atol=1e-12), start, data=df, backend="jax")

        def per_unit(z):
            return (model.predict(values, z)[0] * w).sum(-1)

        per_unit = jax.jit(per_unit)
        rev = np.asarray(jax.grad(lambda z: per_unit(z).sum())(jnp.asarray(z0)))
        fwd = np.stack([np.asarray(jax.jvp(per_unit, (jnp.asarray(z0),), (jnp.asarray(np.eye(3)[j] + 0 * z0),))[1])
                        for j in range(3)], -1)
        autos = [rev, fwd]
        f = lambda z: np.asarray(per_unit(jnp.asarray(z)))  # noqa: E731
    eps = 1e-5
    fd = np.stack([(f(z0 + eps * np.eye(3)[j]) - f(z0 - eps * np.eye(3)[j])) / (2 * eps) for j in range(3)], -1)
    for auto in autos:
        np.testing.assert_allclose(auto, fd, rtol=0, atol=1e-6 * np.abs(fd).max())


def test_a_nan_individual_on_torch_stiff_is_nan_and_leaves_the_others_alone():
    """An MCMC proposal where the model is NaN (here one individual's log-parameters) must not stop the solve (the
    step control would shrink to nothing) nor change the others: that individual's predictions are NaN (the proposal
    is rejected, as on JAX) and the others' equal their clean solve to the solver's tolerance (the shared steps differ:
    the NaN individual leaves the error control)."""
    values = dict(ka=1.2, V=20.0, CL=2.0, omega2_ka=0.1, omega2_V=0.1, omega2_CL=0.1, a=0.1)
    model = nlme.NLME(oral_ode(solver="stiff", rtol=1e-7, atol=1e-9), {"ka": 1.0, "V": 1.0, "CL": 1.0},
                      data=_multiple_dose_table())
    th = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
    z = torch.tensor(np.log([[1.2, 20.0, 2.0], [0.8, 15.0, 3.0], [2.0, 25.0, 1.5], [1.0, 18.0, 2.5]]))
    clean = model.predict(th, z)[0].numpy()
    z_bad = z.clone()
    z_bad[1, 0] = float("nan")
    got = model.predict(th, z_bad)[0].numpy()
    assert np.isnan(got[1]).all()
    np.testing.assert_allclose(got[[0, 2, 3]], clean[[0, 2, 3]], rtol=1e-6, atol=0)


def test_solver_options_are_checked():
    with pytest.raises(ValueError, match="solver must be one of"):
        oral_ode(solver="lsoda")
    with pytest.raises(ValueError, match="max_step is the fixed step of solver='rk4'"):
        oral_ode(solver="adaptive", max_step=0.1)
    with pytest.raises(ValueError, match="rtol and atol must be positive"):
        oral_ode(solver="stiff", rtol=0.0)
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        oral_ode(solver="stiff", max_steps=0)


def test_too_many_steps_is_a_clear_error_on_torch():
    model = nlme.NLME(_tmdd("stiff", max_steps=5), dict.fromkeys(TMDD, 1.0), data=_tmdd_table())
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in _tmdd_theta().items()}
    with pytest.raises(RuntimeError, match="more than max_steps=5 steps"):
        model.predict(theta, torch.tensor(np.log(TMDD_PSI)))


def test_a_missing_library_names_the_extra(monkeypatch):
    """Without torchdiffeq (or diffrax), the adaptive solvers say which package and which pip extra to install."""
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # import fails as if not installed
    model = nlme.NLME(oral_ode(solver="adaptive"), {"ka": 1.0, "V": 1.0, "CL": 1.0}, data=_multiple_dose_table())
    values = dict(ka=1.2, V=20.0, CL=2.0, omega2_ka=0.1, omega2_V=0.1, omega2_CL=0.1, a=0.1)
    with pytest.raises(ImportError, match=r"needs the package 'torchdiffeq'.*pip install latentfit\[ode\]"):
        _predict(model, values)


@pytest.mark.slow
def test_theophylline_adaptive_jax_fit_agrees_with_rk4_and_saemix():
    """Theophylline written as an ODE, fitted by SAEM on JAX with solver="adaptive" (Tsit5, rtol 1e-6): within the
    band of the RK4 ODE fit test (3% of saemix's estimates), and within the same 3% of the RK4 fit from the same
    seed (the chains part as soon as one accept/reject differs, so the gap is Monte-Carlo error: 1.1% on a
    measured).  Slow: about 100 s per fit under load (0.19 s per iteration against RK4's 0.008 s)."""
    _jax()
    df = lf.datasets.theophylline(saemix_form=True)
    start = {"ka": 1.0, "V": 20.0, "CL": 0.5}
    adaptive = nlme.NLME(oral_ode(solver="adaptive"), start, data=df, backend="jax", **THEO).fit(
        seed=0, progress=False).params
    rk4 = nlme.NLME(oral_ode(), start, data=df, backend="jax", **THEO).fit(seed=0, progress=False).params
    for name in ("ka", "V", "CL", "a"):
        assert abs(float(adaptive[name]) / SAEMIX[name] - 1) < 0.03, (name, adaptive[name])
        assert abs(float(adaptive[name]) / float(rk4[name]) - 1) < 0.03, (name, adaptive[name], rk4[name])


def test_adaptive_solver_follows_nonmem_records_and_refuses_steady_state():
    """ADDL doses, an infusion into the central compartment, an EVID 4 restart (the time restarts) and an EVID 3
    reset: the adaptive solver (torch, rtol 1e-10) matches the closed form to 1e-8 relative; an SS dose is refused
    with a message naming the solver that handles it."""
    from test_nlme_dosing import _obs
    from test_nlme_dosing import _table as _records

    rows = [{"AMT": 100.0, "EVID": 1, "MDV": 1, "ADDL": 2, "II": 12.0}] + _obs([1.0, 5.0, 13.0, 25.0], CMT=2)
    rows += [{"TIME": 30.0, "AMT": 50.0, "EVID": 1, "MDV": 1, "CMT": 2, "RATE": 25.0}] + _obs([30.0, 31.0, 45.0])
    rows += [{"TIME": 10.0, "AMT": 80.0, "EVID": 4, "MDV": 1}] + _obs([12.0, 13.0])
    rows += [{"TIME": 14.0, "EVID": 3, "MDV": 1}] + _obs([15.0])
    df = _records(rows)
    params = {"ka": 1.3, "V": 10.0, "CL": 2.0}
    psi = {k: torch.full((1, 1), v, dtype=torch.float64) for k, v in params.items()}

    def predict(structural, data):
        model = nlme.NLME(structural, dict(params), data=data)
        return model._structural_fn(psi, model.design).numpy()[model.data.mask]

    closed = predict("one_compartment_oral", df)
    assert closed[-1] == 0.0  # after the EVID 3 reset
    np.testing.assert_allclose(predict(oral_ode(solver="adaptive", rtol=1e-10, atol=1e-12), df), closed,
                               rtol=1e-8, atol=1e-12)
    ss = _records([{"AMT": 100.0, "EVID": 1, "MDV": 1, "SS": 1, "II": 12.0}] + _obs([1.0, 5.0]))
    with pytest.raises(lf.DataError, match="steady-state doses .* solver='rk4' only"):
        predict(oral_ode(solver="adaptive"), ss)
