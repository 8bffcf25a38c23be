"""ODE structural models (``nlme.ode``): against the closed forms, a nonlinear reference solution (scipy), dose
routing by CMT, both backends, and a fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import latentfit as lf
from latentfit.inference.laplace import conditional_modes
from latentfit.inference.model import DataError
from latentfit.models import nlme

THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
SAEMIX = dict(ka=1.5668, V=31.540, CL=2.7554, omega2_ka=0.3953, omega2_V=0.01449, omega2_CL=0.07953, a=0.7392)


def _oral_rhs(t, x, psi, xp):
    return (-psi["ka"] * x[0], psi["ka"] * x[0] - psi["CL"] / psi["V"] * x[1])


def oral_ode(**kw) -> nlme.Structural:
    return nlme.ode(_oral_rhs, ("ka", "V", "CL"), num_states=2, observe=lambda x, psi, xp: x[1] / psi["V"], **kw)


def _table(rows: list[tuple]) -> pd.DataFrame:
    """Rows (ID, TIME, AMT, RATE, CMT, EVID) -> a NONMEM table with DV = 1 at observations."""
    df = pd.DataFrame(rows, columns=["ID", "TIME", "AMT", "RATE", "CMT", "EVID"])
    df["MDV"] = df["EVID"]
    df["DV"] = np.where(df["EVID"] == 1, np.nan, 1.0)
    return df


def _multiple_dose_table(cmt: int = 1, infusion: bool = False) -> pd.DataFrame:
    """4 individuals, two doses (0 h and 12 h; different amounts), observations between and after them,
    one observation at the second dose's time."""
    rows = []
    for i in range(1, 5):
        rate = 50.0 * i if infusion else 0.0
        rows += [(i, 0.0, 100.0 * i, rate, cmt, 1), (i, 12.0, 60.0, rate, cmt, 1)]
        rows += [(i, t, 0.0, 0.0, cmt, 0) for t in (0.5, 1.0, 2.5, 6.0, 12.0, 12.5, 15.0, 24.0, 36.0)]
    return _table(rows)


def _predict(model: nlme.NLME, values: dict, seed: int = 0) -> np.ndarray:
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
    gen = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.tensor([values[p] for p in model.param_names], dtype=torch.float64))
    z = mu + 0.3 * torch.randn((3, model.num_units, len(mu)), generator=gen, dtype=torch.float64)
    return model.predict(theta, z)[0].numpy()


def test_ode_reproduces_the_closed_forms_with_multiple_doses():
    """First-order absorption (two doses, observation at a dose time), infusion into the central compartment
    and a two-compartment oral model: relative error < 5e-4 with the default step (span/200, here 0.18 h with
    rate constants up to ~4/h), < 1e-7 with max_step=0.02 (RK4: error ∝ h⁴)."""
    values = dict(ka=1.2, V=20.0, CL=2.0, omega2_ka=0.1, omega2_V=0.1, omega2_CL=0.1, a=0.1)
    df = _multiple_dose_table()
    closed = _predict(nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 1.0, "CL": 1.0}, data=df), values)
    for kw, rtol in (({}, 5e-4), ({"max_step": 0.02}, 1e-7)):
        ode_model = nlme.NLME(oral_ode(**kw), {"ka": 1.0, "V": 1.0, "CL": 1.0}, data=df)
        np.testing.assert_allclose(_predict(ode_model, values), closed, rtol=rtol, atol=1e-9)

    inf = nlme.ode(lambda t, x, psi, xp: (-psi["CL"] / psi["V"] * x[0],), ("V", "CL"), num_states=1,
                   observe=lambda x, psi, xp: x[0] / psi["V"])
    df_inf = _multiple_dose_table(infusion=True)
    v2 = {k: values[k] for k in ("V", "CL", "omega2_V", "omega2_CL", "a")}
    got = _predict(nlme.NLME(inf, {"V": 1.0, "CL": 1.0}, data=df_inf), v2)
    want = _predict(nlme.NLME("one_compartment_infusion", {"V": 1.0, "CL": 1.0}, data=df_inf), v2)
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-9)

    def two_cpt(t, x, psi, xp):
        k10, k12, k21 = psi["CL"] / psi["V1"], psi["Q"] / psi["V1"], psi["Q"] / psi["V2"]
        return (-psi["ka"] * x[0], psi["ka"] * x[0] - (k10 + k12) * x[1] + k21 * x[2], k12 * x[1] - k21 * x[2])

    names = ("ka", "CL", "V1", "Q", "V2")
    v3 = dict(ka=1.5, CL=3.0, V1=10.0, Q=2.0, V2=30.0, a=0.1, **{f"omega2_{k}": 0.05 for k in names})
    ode3 = nlme.ode(two_cpt, names, num_states=3, observe=lambda x, psi, xp: x[1] / psi["V1"])
    got = _predict(nlme.NLME(ode3, dict.fromkeys(names, 1.0), data=df), v3)
    want = _predict(nlme.NLME("two_compartment_oral", dict.fromkeys(names, 1.0), data=df), v3)
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-9)


def test_nonlinear_michaelis_menten_against_scipy():
    """dA/dt = −Vmax·C/(Km + C), C = A/V (no closed form): against scipy's solve_ivp (rtol 1e-10)."""
    from scipy.integrate import solve_ivp

    def mm(t, x, psi, xp):
        c = x[0] / psi["V"]
        return (-psi["Vmax"] * c / (psi["Km"] + c),)

    structural = nlme.ode(mm, ("V", "Vmax", "Km"), num_states=1, observe=lambda x, psi, xp: x[0] / psi["V"])
    df = _multiple_dose_table()
    model = nlme.NLME(structural, {"V": 1.0, "Vmax": 1.0, "Km": 1.0}, data=df)
    theta = {"V": 10.0, "Vmax": 8.0, "Km": 2.0, "omega2_V": 0.1, "omega2_Vmax": 0.1, "omega2_Km": 0.1, "a": 0.1}
    psi = np.array([[10.0, 8.0, 2.0], [12.0, 5.0, 1.0], [8.0, 10.0, 4.0], [15.0, 6.0, 0.5]])
    got = model.predict({k: torch.tensor(v, dtype=torch.float64) for k, v in theta.items()},
                        torch.tensor(np.log(psi)))[0].numpy()
    for i in range(4):
        v, vmax, km = psi[i]
        rhs = lambda t, a, v=v, vmax=vmax, km=km: [-vmax * (a[0] / v) / (km + a[0] / v)]  # noqa: E731
        first = solve_ivp(rhs, (0, 12), [100.0 * (i + 1)], rtol=1e-10, atol=1e-12, dense_output=True)
        second = solve_ivp(rhs, (12, 36), [first.y[0, -1] + 60.0], rtol=1e-10, atol=1e-12, dense_output=True)
        times = np.array([0.5, 1.0, 2.5, 6.0, 12.0, 12.5, 15.0, 24.0, 36.0])
        want = np.where(times < 12, first.sol(np.minimum(times, 12))[0], second.sol(np.maximum(times, 12))[0]) / v
        np.testing.assert_allclose(got[i], want, rtol=1e-5)


def test_default_step_and_rk4_stability_bound():
    """README: the default step is the longest individual time span / 200 and explicit RK4 needs
    ``rate × max_step < 2.8``.  Elimination ``x' = −(CL/V) x`` observed every 10 h over 100 h: the default step is
    0.5 h, so CL/V = 5.4 (rate × step 2.7: RK4's amplification 0.88 per step) decays and CL/V = 5.8 (2.9: 1.19 per
    step) blows up; ``max_step=0.45`` (23 steps of 0.435 h per interval, rate × step 2.5) makes 5.8 stable."""
    rows = [(1, 0.0, 100.0, 0.0, 1, 1)] + [(1, float(t), 0.0, 0.0, 1, 0) for t in range(10, 101, 10)]
    df = _table(rows)
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(V=1.0, CL=1.0, omega2_V=0.1, omega2_CL=0.1,
                                                                      a=0.1).items()}

    def last_concentration(cl: float, **kw) -> float:
        structural = nlme.ode(lambda t, x, psi, xp: (-psi["CL"] / psi["V"] * x[0],), ("V", "CL"), num_states=1,
                              observe=lambda x, psi, xp: x[0] / psi["V"], **kw)
        model = nlme.NLME(structural, {"V": 1.0, "CL": 1.0}, data=df)
        return float(model.predict(theta, torch.tensor(np.log([[1.0, cl]])))[0][0, -1])

    assert 0 <= last_concentration(5.4) < 1e-3  # stable (exact e^{−540}; RK4 0.88^200)
    assert last_concentration(5.8) > 1e10  # unstable: 1.19^200
    assert 0 <= last_concentration(5.8, max_step=0.45) < 1e-3


def test_doses_follow_the_cmt_column_and_bad_compartments_are_refused():
    """A bolus into CMT 2 (the central compartment) is the closed-form IV bolus; CMT 3 in a 2-state model is a
    data error at model construction; dose_compartment= overrides the column."""
    values = dict(V=20.0, CL=2.0, omega2_V=0.1, omega2_CL=0.1, a=0.1)
    bolus = dict(ka=1.0, **values, omega2_ka=0.1)
    v_cl = np.log(np.array([[15.0, 1.0], [20.0, 2.0], [25.0, 4.0], [30.0, 3.0]]))
    z3 = torch.tensor(np.concatenate([np.zeros((4, 1)), v_cl], 1))  # ka is irrelevant without depot doses

    def at(model, vals, z):
        return model.predict({k: torch.tensor(v, dtype=torch.float64) for k, v in vals.items()}, z)[0].numpy()

    df = _multiple_dose_table(cmt=2)
    got = at(nlme.NLME(oral_ode(), {"ka": 1.0, "V": 1.0, "CL": 1.0}, data=df), bolus, z3)
    want = at(nlme.NLME("one_compartment_bolus", {"V": 1.0, "CL": 1.0}, data=df), values, torch.tensor(v_cl))
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-9)
    with pytest.raises(DataError, match=r"CMT values \[3\] are outside 1..2"):
        nlme.NLME(oral_ode(), {"ka": 1.0, "V": 1.0, "CL": 1.0}, data=_multiple_dose_table(cmt=3))
    forced = nlme.NLME(oral_ode(dose_compartment=2), {"ka": 1.0, "V": 1.0, "CL": 1.0},
                       data=_multiple_dose_table(cmt=3))
    np.testing.assert_allclose(at(forced, bolus, z3), want, rtol=5e-4, atol=1e-9)
    with pytest.raises(ValueError, match="dose_compartment must be in 1..2"):
        oral_ode(dose_compartment=3)
    with pytest.raises(ValueError, match="max_step must be positive"):
        oral_ode(max_step=0.0)


def test_theophylline_ode_likelihood_and_jax_fit():
    """Theophylline as an ODE: the log-likelihood of the data given the conditional modes at saemix's estimates
    equals the closed form's to 5e-3; the same model compiled with JAX (steps under lax.fori_loop) gives the
    same predictions as torch and fits within saemix's band."""
    df = lf.datasets.theophylline(saemix_form=True)
    ode_model = nlme.NLME(oral_ode(), {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, **THEO)
    closed = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, **THEO)
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in SAEMIX.items()}
    modes = conditional_modes(closed, theta, num_steps=20).mode
    ll_ode, lp_ode = ode_model.log_densities(theta, modes)
    ll_closed, lp_closed = closed.log_densities(theta, modes)
    # (default step: the fastest absorber, ka ≈ 8/h, carries most of the RK4 error)
    assert abs(float(ll_ode.sum() - ll_closed.sum())) < 5e-3 and torch.allclose(lp_ode, lp_closed)

    import jax

    jax.config.update("jax_enable_x64", True)
    jax_model = nlme.NLME(oral_ode(), {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, backend="jax", **THEO)
    z = np.log([[1.5, 31.5, 2.75]]) + 0.2 * np.random.default_rng(0).normal(size=(2, 12, 3))
    f_jax = np.asarray(jax_model.predict({k: float(v) for k, v in SAEMIX.items()}, jax.numpy.asarray(z))[0])
    np.testing.assert_allclose(f_jax, ode_model.predict(theta, torch.tensor(z))[0].numpy(), rtol=1e-9)
    p = jax_model.fit(seed=0, progress=False).params
    for name in ("ka", "V", "CL", "a"):
        assert abs(float(p[name]) / SAEMIX[name] - 1) < 0.03, (name, p[name])


@pytest.mark.slow
def test_compiled_jax_ode_iterations_are_much_faster_than_eager_torch():
    """README: theophylline as an ODE takes about 1.5 ms per SAEM iteration compiled against 0.36 s eagerly on torch
    (2-core CPU, idle).  Absolute times depend on the machine and its load; the ratio is asserted (measured: 240 on an
    idle machine, 490 on a loaded one), with the compiled iteration time excluding compilation."""
    import jax

    jax.config.update("jax_enable_x64", True)
    df = lf.datasets.theophylline(saemix_form=True)
    jax_fit = nlme.NLME(oral_ode(), {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, backend="jax", **THEO).fit(
        seed=0, progress=False)
    torch_fit = nlme.NLME(oral_ode(), {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, **THEO).fit(
        seed=0, progress=False, num_iters=(6, 4))
    assert torch_fit.time_per_iteration > 50 * jax_fit.time_per_iteration, (
        torch_fit.time_per_iteration, jax_fit.time_per_iteration)
