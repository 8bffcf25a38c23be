"""Numerical safety of ``nlme.ode``: the RK4 step-halving check at the initial values (an unstable or too coarse
fixed step warns, naming the individual, the time and the step)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from latentfit.models import nlme


def _oral_rhs(t, x, psi, xp):
    return (-psi["ka"] * x[0], psi["ka"] * x[0] - psi["CL"] / psi["V"] * x[1])


def _oral(**kw) -> nlme.Structural:
    return nlme.ode(_oral_rhs, ("ka", "V", "CL"), num_states=2, observe=lambda x, psi, xp: x[1] / psi["V"], **kw)


def _fast_absorption_table() -> pd.DataFrame:
    """One 100 mg oral dose, observations out to 240 h: the default step is 240/200 = 1.2 h, so ka = 5/h gives
    ka·h = 6 on the long intervals, beyond RK4's stability bound 2.78 (the audit's case)."""
    rows = [dict(ID=1, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, CMT=1)]
    rows += [dict(ID=1, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1) for t in (0.25, 0.5, 1, 2, 4, 8, 24, 72, 240)]
    rows += [dict(ID=2, TIME=0.0, DV=np.nan, AMT=50.0, EVID=1, MDV=1, CMT=1)]
    rows += [dict(ID=2, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1) for t in (1, 6, 24)]
    return pd.DataFrame(rows)


def _bind(structural: nlme.Structural, backend: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nlme.NLME(structural, {"ka": 5.0, "V": 25.0, "CL": 2.0}, backend=backend).bind(_fast_absorption_table())
    return [w for w in caught if issubclass(w.category, nlme.SolverWarning)]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_unstable_default_step_warns_with_the_individual_time_and_step(backend):
    """ka·h = 6 > 2.78: the RK4 predictions of ID 1 diverge (−639 at 24 h, −2e295 at 240 h in float64; NaN in JAX's
    float32) and the binding warns once, naming ID 1, the step 1.2 and the remedies; ``max_step=0.1`` (ka·h = 0.5)
    and ``check=False`` are silent.  ID 2 (24 h span) is integrated with the same step and is fine."""
    caught = _bind(_oral(), backend)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "ID 1 at TIME" in text and "h = 1.2" in text and "the default max_step" in text
    assert "smaller max_step=" in text and "solver='adaptive'" in text and "solver='stiff'" in text
    assert _bind(_oral(max_step=0.1), backend) == []
    assert _bind(_oral(check=False), backend) == []


def test_a_too_coarse_but_stable_step_warns_and_names_the_individual_and_time():
    """max_step=0.48: ID 2's first interval (0 → 1 h) takes 3 steps of 1/3 h, ka·h = 1.67 (stable, but RK4's
    per-step factor 0.23 against e^{−1.67} = 0.19): its 1 h prediction moves by 1.4% of its peak when the step is
    halved, and is that far from the exact solution; max_step=0.3 (4 steps of 0.25 h, ka·h = 1.25) is within 1% and
    silent."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = nlme.NLME(_oral(max_step=0.48), {"ka": 5.0, "V": 25.0, "CL": 2.0}).bind(_fast_absorption_table())
    text = [str(w.message) for w in caught if issubclass(w.category, nlme.SolverWarning)]
    assert len(text) == 1 and "ID 2 at TIME 1:" in text[0] and "with the step halved" in text[0], text
    assert "max_step=0.48" in text[0]
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(ka=5.0, V=25.0, CL=2.0, omega2_ka=0.1,
                                                                      omega2_V=0.1, omega2_CL=0.1, a=0.1).items()}
    pred = model.structural_prediction(theta, torch.log(torch.tensor([[5.0, 25.0, 2.0]] * 2, dtype=torch.float64)))
    t = torch.tensor([1.0, 6.0, 24.0], dtype=torch.float64)
    exact = 50 * 5 / (25 * (5 - 0.08)) * (torch.exp(-0.08 * t) - torch.exp(-5 * t))
    assert float((pred[1, :3] - exact).abs().max() / exact.max()) > 1e-2  # what the warning is about
    assert _bind(_oral(max_step=0.3), "torch") == []


def test_stiff_tmdd_with_the_default_step_warns_not_finite():
    """Target-mediated disposition (kon·R0 = 25/h) with the default step (2.5 h): every RK4 prediction is NaN; the
    binding says so (and suggests solver='stiff')."""
    th = {"V": 3.0, "kel": 0.015, "kon": 5.0, "koff": 0.01, "ksyn": 0.5, "kdeg": 0.1, "kint": 0.05}

    def rhs(t, x, psi, xp):
        c, r, rc = x[0] / psi["V"], x[1], x[2]
        bind = psi["kon"] * c * r - psi["koff"] * rc
        return (-psi["kel"] * x[0] - bind * psi["V"], psi["ksyn"] - psi["kdeg"] * r - bind, bind - psi["kint"] * rc)

    rows = [dict(ID=1, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, CMT=1)]
    rows += [dict(ID=1, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1) for t in (1.0, 24.0, 168.0, 504.0)]
    structural = nlme.ode(rhs, tuple(th), num_states=3, observe=lambda x, psi, xp: x[0] / psi["V"],
                          initial=lambda psi, xp: (0.0 * psi["V"], psi["ksyn"] / psi["kdeg"], 0.0 * psi["V"]))
    with pytest.warns(nlme.SolverWarning, match=r"ID 1 at TIME 1: the ODE prediction is nan .*not finite \(4 of"):
        nlme.NLME(structural, dict(th)).bind(pd.DataFrame(rows))


@pytest.fixture
def jax_float32():
    """JAX with jax_enable_x64 off for the test (NLME's arrays then float32), restored afterwards."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("diffrax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield jax
    jax.config.update("jax_enable_x64", before)


def _two_doses() -> pd.DataFrame:
    rows = []
    for i, amt in ((1, 100.0), (2, 60.0)):
        rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=amt, EVID=1, MDV=1, CMT=1))
        rows += [dict(ID=i, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1) for t in (1.0, 4.0, 12.0)]
    return pd.DataFrame(rows)


def test_jax_float32_tolerances_below_its_precision_warn_and_too_many_steps_is_a_clear_error(jax_float32):
    """float32 (x64 off): rtol=1e-8 is below 100·eps = 1.2e-5, which the binding says; the implicit solver then
    stalls, and an eager prediction raises the one-line error (max_steps, where, what to do, float32) instead of
    equinox's runtime error."""
    jnp = jax_float32.numpy
    with pytest.warns(nlme.SolverWarning, match=r"rtol=1e-08 is finer than .*float32.*jax_enable_x64"):
        model = nlme.NLME(_oral(solver="stiff", rtol=1e-8, atol=1e-10, max_steps=64),
                          {"ka": 1.3, "V": 25.0, "CL": 4.0}, backend="jax").bind(_two_doses())
    theta = model.init_params()
    z = jnp.log(jnp.array([[1.3, 25.0, 4.0]] * 2))
    with pytest.raises(RuntimeError, match=r"solver='stiff'\): the solver needed more than max_steps=64 steps "
                                           r"between the events at t=0 and t=1 \(individual 1.*loosen rtol/atol; the "
                                           r"arrays are float32"):
        model.structural_prediction(theta, z)


@pytest.mark.slow
def test_jax_float32_tolerances_above_its_precision_are_silent_and_met(jax_float32):
    """float32, the implicit solver with rtol=1e-4: no warning, and within 1e-4 of the closed form."""
    jnp = jax_float32.numpy
    z = jnp.log(jnp.array([[1.3, 25.0, 4.0]] * 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loose = nlme.NLME(_oral(solver="stiff", rtol=1e-4, atol=1e-6), {"ka": 1.3, "V": 25.0, "CL": 4.0},
                          backend="jax").bind(_two_doses())
    assert not [w for w in caught if issubclass(w.category, nlme.SolverWarning)]
    pred = np.asarray(loose.structural_prediction(loose.init_params(), z))
    assert pred.dtype == np.float32
    t = np.array([1.0, 4.0, 12.0])
    k = 4.0 / 25.0
    exact = np.array([[100.0], [60.0]]) * 1.3 / (25 * (1.3 - k)) * (np.exp(-k * t) - np.exp(-1.3 * t))
    np.testing.assert_allclose(pred, exact, rtol=1e-4)


def test_a_failed_jax_solve_inside_jit_gives_nan_predictions_not_an_exception():
    """Inside a compiled program (SAEM's sweeps) a solve that needs more than max_steps steps makes that individual's
    predictions NaN from the failed interval on (its log-density NaN: the proposal is rejected); eagerly the same
    model raises the clear error.  float64."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("diffrax")
    jax.config.update("jax_enable_x64", True)
    model = nlme.NLME(_oral(solver="adaptive", max_steps=3), {"ka": 1.3, "V": 25.0, "CL": 4.0},
                      backend="jax").bind(_two_doses())
    theta = model.init_params()
    z = jax.numpy.log(jax.numpy.array([[1.3, 25.0, 4.0]] * 2))
    pred = np.asarray(jax.jit(lambda zz: model.structural_prediction(theta, zz))(z))
    assert pred.shape == (2, 3) and np.isnan(pred).all()
    with pytest.raises(RuntimeError, match=r"needed more than max_steps=3 steps .*or solver='stiff'"):
        model.structural_prediction(theta, z)
