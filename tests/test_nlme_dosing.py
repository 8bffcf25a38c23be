"""NONMEM dosing records in the NLME family (issue 14, item 1).

``ADDL``/``II`` additional doses, ``SS`` steady state (bolus, first-order absorption with and without lag,
infusion shorter and longer than the interval, two compartments), ``RATE``/``DUR`` infusions, ``CMT`` routing,
``EVID`` 0–4 (resets start a new period, the time may restart), ``MDV`` and time-varying covariates (LOCF or
linear).  References are hand-written NumPy superpositions of the unit responses: a steady-state dose is the
last of an explicit train of 2000 doses (the truncation, ``e^{-k·2000·II}``, is below 1e-100), so the library's
geometric-series closed forms must match to 1e-8 (they match to about 1e-15).  The ODE path (``nlme.ode``, RK4
with ``max_step`` 0.05, steady state by ``ss_periods`` intervals) must match the closed forms to 1e-6 relative:
RK4's global error at that step is about 1e-7 here (measured: 9e-8).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from latentfit import DataError
from latentfit.models import nlme

V, CL, KA, TLAG = 10.0, 2.0, 1.3, 0.7
K = CL / V
TRAIN = 2000  # doses of the explicit steady-state train


def _table(rows: list[dict], **defaults) -> pd.DataFrame:
    cols = {"ID": 1, "TIME": 0.0, "DV": np.nan, "AMT": 0.0, "EVID": 0, "MDV": 0, "ADDL": 0, "II": 0.0, "SS": 0,
            "RATE": 0.0, "CMT": 1, **defaults}
    return pd.DataFrame([{**cols, **r} for r in rows])


def _obs(times, **kw) -> list[dict]:
    return [{"TIME": float(t), "DV": 1.0, **kw} for t in times]


def _predict(structural, params: dict, df: pd.DataFrame, backend: str = "torch", **kw) -> tuple[np.ndarray, object]:
    """Population predictions at the observations (individual order, then period and time), numpy."""
    model = nlme.NLME(structural, dict(params), data=df, backend=backend, **kw)
    if backend == "jax":
        import jax.numpy as jnp
        psi = {k: jnp.full((model.num_units, 1), float(v)) for k, v in params.items()}
    else:
        psi = {k: torch.full((model.num_units, 1), float(v), dtype=torch.float64) for k, v in params.items()}
    f = np.asarray(model.ops.to_numpy(model._structural_fn(psi, model.design)))
    return f[model.data.mask], model


# ----- unit responses (NumPy) -------------------------------------------------------------------
def _bolus(s):
    return np.where(s >= 0, np.exp(-K * np.maximum(s, 0)) / V, 0.0)


def _oral(s, lag=0.0):
    u = s - lag
    return np.where(u >= 0, KA / (V * (KA - K)) * (np.exp(-K * np.maximum(u, 0)) - np.exp(-KA * np.maximum(u, 0))), 0.0)


def _infusion(s, dur):
    """Per unit amount, given over ``dur``."""
    on = np.clip(s, 0, dur)
    return np.where(s >= 0, 1.0 / (dur * K * V) * (1 - np.exp(-K * on)) * np.exp(-K * (s - on)), 0.0)


def _two_cmt(cl=2.0, v1=10.0, q=3.0, v2=25.0, ka=None):
    k10, k12, k21 = cl / v1, q / v1, q / v2
    s_ = k10 + k12 + k21
    root = np.sqrt(s_ * s_ - 4 * k10 * k21)
    a, b = 0.5 * (s_ + root), 0.5 * (s_ - root)

    def bolus(s):
        t = np.maximum(s, 0)
        return np.where(s >= 0, ((a - k21) * np.exp(-a * t) + (k21 - b) * np.exp(-b * t)) / (a - b) / v1, 0.0)

    def oral(s):
        t = np.maximum(s, 0)
        c = ((k21 - a) / ((ka - a) * (b - a)) * np.exp(-a * t) + (k21 - b) / ((ka - b) * (a - b)) * np.exp(-b * t)
             + (k21 - ka) / ((a - ka) * (b - ka)) * np.exp(-ka * t))
        return np.where(s >= 0, ka / v1 * c, 0.0)

    def infusion(s, dur):
        """Per unit amount, given over ``dur``."""
        out = 0.0
        for c, lam in (((a - k21) / ((a - b) * v1), a), ((k21 - b) / ((a - b) * v1), b)):
            on = np.clip(s, 0, dur)
            out = out + c / lam / dur * (1 - np.exp(-lam * on)) * np.exp(-lam * (s - on))
        return np.where(s >= 0, out, 0.0)

    bolus.infusion = infusion
    return bolus, oral


def _superpose(t_obs, doses, unit):
    """``Σ_d amt_d·unit(t − t_d)``; ``doses``: (time, amount) pairs."""
    t = np.asarray(t_obs, float)[:, None]
    td = np.array([d[0] for d in doses])[None]
    amt = np.array([d[1] for d in doses])[None]
    return (amt * unit(t - td)).sum(1)


def _train(t_dose, amt, ii, n=TRAIN):
    """The steady-state dose at ``t_dose`` as the last of ``n`` doses every ``ii``."""
    return [(t_dose - j * ii, amt) for j in range(n - 1, -1, -1)]


T_OBS = [0.0, 0.5, 1.0, 3.0, 11.9, 12.0, 12.3, 20.0, 36.0, 50.0]


# ----- ADDL / II ----------------------------------------------------------------------------------
def test_addl_expands_into_doses_every_ii():
    df = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, "ADDL": 3, "II": 12.0}] + _obs(T_OBS))
    f, model = _predict("one_compartment_bolus", {"V": V, "CL": CL}, df)
    doses = [(12.0 * j, 100.0) for j in range(4)]
    # an additional dose at an observation record's time (12, 36) comes after it (NONMEM): pre-dose there
    strict = np.array([_superpose([t], [dd for dd in doses if dd[0] < t or dd[0] == 0.0], _bolus)[0]
                       for t in T_OBS])
    np.testing.assert_allclose(f, strict, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(model.data.dose_time[0], [0.0, 12.0, 24.0, 36.0])
    # the same as four dose records listed after the observations at their times, exactly
    explicit = _table([{"TIME": t, "AMT": 100.0, "EVID": 1, "MDV": 1} for t, _ in doses[:1]] + _obs(T_OBS)
                      + [{"TIME": t, "AMT": 100.0, "EVID": 1, "MDV": 1} for t, _ in doses[1:]])
    explicit = explicit.sort_values("TIME", kind="stable")
    f2, _ = _predict("one_compartment_bolus", {"V": V, "CL": CL}, explicit)
    np.testing.assert_array_equal(f, f2)
    # listed before them: post-dose (the superposition counting every dose by the observation's time)
    before = _table([{"TIME": t, "AMT": 100.0, "EVID": 1, "MDV": 1} for t, _ in doses] + _obs(T_OBS))
    f3, _ = _predict("one_compartment_bolus", {"V": V, "CL": CL}, before)
    np.testing.assert_allclose(f3, _superpose(T_OBS, doses, _bolus), rtol=1e-12, atol=1e-12)


def test_addl_vectorised_over_individuals_and_oral_with_lag():
    rows = []
    for i, (n_add, ii) in enumerate([(0, 0.0), (2, 8.0), (5, 24.0)]):
        rows += [{"ID": i + 1, "AMT": 50.0 * (i + 1), "EVID": 1, "MDV": 1, "ADDL": n_add, "II": ii}]
        rows += [{"ID": i + 1, **o} for o in _obs(T_OBS)]
    df = _table(rows)
    params = {"Tlag": TLAG, "ka": KA, "V": V, "CL": CL}
    f, model = _predict("one_compartment_oral_lag", params, df)
    ref = np.concatenate([_superpose(T_OBS, [(ii * j, 50.0 * (i + 1)) for j in range(n_add + 1)],
                                     lambda s: _oral(s, TLAG))
                          for i, (n_add, ii) in enumerate([(0, 0.0), (2, 8.0), (5, 24.0)])])
    np.testing.assert_allclose(f, ref, rtol=1e-10, atol=1e-12)
    assert model.data.dose_amt.shape == (3, 6) and (model.data.dose_amt > 0).sum() == 1 + 3 + 6


# ----- SS -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["bolus", "oral", "oral_lag"])
def test_steady_state_matches_a_long_train_of_doses(route):
    t_obs = [24.0, 24.3, 25.0, 30.0, 35.9, 36.0, 40.0, 60.0]
    df = _table([{"TIME": 24.0, "AMT": 100.0, "EVID": 1, "MDV": 1, "SS": 1, "II": 12.0, "ADDL": 1}] + _obs(t_obs))
    train = _train(24.0, 100.0, 12.0)  # SS dose, then one additional (ordinary) dose at 36
    structural, params, unit = {
        "bolus": ("one_compartment_bolus", {"V": V, "CL": CL}, _bolus),
        "oral": ("one_compartment_oral", {"ka": KA, "V": V, "CL": CL}, _oral),
        "oral_lag": ("one_compartment_oral_lag", {"Tlag": TLAG, "ka": KA, "V": V, "CL": CL},
                     lambda s: _oral(s, TLAG)),
    }[route]
    f, _ = _predict(structural, params, df)
    t = np.asarray(t_obs)  # the additional dose comes after the observation record at 36 (NONMEM's order)
    ref = _superpose(t_obs, train, unit) + np.where(t > 36.0, 100.0 * unit(t - 36.0), 0.0)
    np.testing.assert_allclose(f, ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dur", [2.0, 30.0])  # shorter and longer than the interval (overlapping infusions)
def test_steady_state_infusion(dur):
    t_obs = [10.0, 10.5, 11.0, 12.0, 15.0, 21.9, 30.0, 45.0]
    df = _table([{"TIME": 10.0, "AMT": 120.0, "EVID": 1, "MDV": 1, "SS": 1, "II": 12.0, "RATE": 120.0 / dur}]
                + _obs(t_obs))
    f, _ = _predict("one_compartment_infusion", {"V": V, "CL": CL}, df)
    ref = _superpose(t_obs, _train(10.0, 120.0, 12.0), lambda s: _infusion(s, dur))
    np.testing.assert_allclose(f, ref, rtol=1e-8, atol=1e-12)


def test_steady_state_two_compartments():
    t_obs = [0.0, 0.2, 1.0, 4.0, 7.9, 8.0, 12.0]
    df = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, "SS": 1, "II": 8.0}] + _obs(t_obs))
    bolus, oral = _two_cmt(ka=1.1)
    p2 = {"CL": 2.0, "V1": 10.0, "Q": 3.0, "V2": 25.0}
    f, _ = _predict("two_compartment_bolus", p2, df)
    np.testing.assert_allclose(f, _superpose(t_obs, _train(0.0, 100.0, 8.0), bolus), rtol=1e-8, atol=1e-12)
    f, _ = _predict("two_compartment_oral", {"ka": 1.1, **p2}, df)
    np.testing.assert_allclose(f, _superpose(t_obs, _train(0.0, 100.0, 8.0), oral), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dur", [3.0, 20.0])
def test_two_compartment_infusion_and_its_steady_state(dur):
    t_obs = [0.0, 1.0, 2.9, 3.0, 7.9, 8.0, 12.0, 30.0]
    bolus, _ = _two_cmt()
    p2 = {"CL": 2.0, "V1": 10.0, "Q": 3.0, "V2": 25.0}
    dose = {"AMT": 90.0, "EVID": 1, "MDV": 1, "RATE": 90.0 / dur}
    f, _ = _predict("two_compartment_infusion", p2, _table([dose, {**dose, "TIME": 5.0, "RATE": 0.0}] + _obs(t_obs)))
    ref = (_superpose(t_obs, [(0.0, 90.0)], lambda s: bolus.infusion(s, dur))
           + _superpose(t_obs, [(5.0, 90.0)], bolus))
    np.testing.assert_allclose(f, ref, rtol=1e-10, atol=1e-12)
    f, _ = _predict("two_compartment_infusion", p2, _table([{**dose, "SS": 1, "II": 8.0}] + _obs(t_obs)))
    ref = _superpose(t_obs, _train(0.0, 90.0, 8.0), lambda s: bolus.infusion(s, dur))
    np.testing.assert_allclose(f, ref, rtol=1e-8, atol=1e-12)
    # an oral two-compartment model takes CMT 2 infusions into the central compartment
    f, _ = _predict("two_compartment_oral", {"ka": 1.1, **p2},
                    _table([{**dose, "CMT": 2}, {**dose, "TIME": 5.0, "RATE": 0.0}] + _obs(t_obs)))
    ref = (_superpose(t_obs, [(0.0, 90.0)], lambda s: bolus.infusion(s, dur))
           + _superpose(t_obs, [(5.0, 90.0)], _two_cmt(ka=1.1)[1]))
    np.testing.assert_allclose(f, ref, rtol=1e-10, atol=1e-12)


def test_ss1_resets_and_ss2_adds():
    t_obs = [30.0, 31.0, 40.0]
    early = {"TIME": 20.0, "AMT": 500.0, "EVID": 1, "MDV": 1}
    ss = {"TIME": 30.0, "AMT": 100.0, "EVID": 1, "MDV": 1, "II": 12.0}
    pars = {"V": V, "CL": CL}
    f1, _ = _predict("one_compartment_bolus", pars, _table([early, {**ss, "SS": 1}] + _obs(t_obs)))
    f2, _ = _predict("one_compartment_bolus", pars, _table([early, {**ss, "SS": 2}] + _obs(t_obs)))
    train = _superpose(t_obs, _train(30.0, 100.0, 12.0), _bolus)
    np.testing.assert_allclose(f1, train, rtol=1e-8)  # the dose at 20 is wiped by the reset
    np.testing.assert_allclose(f2, train + _superpose(t_obs, [(20.0, 500.0)], _bolus), rtol=1e-8)


# ----- RATE / DUR, CMT ----------------------------------------------------------------------------
def test_rate_minus_two_takes_the_duration_from_dur():
    by_dur = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, "RATE": -2.0, "DUR": 4.0}] + _obs(T_OBS, DUR=0.0))
    by_rate = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, "RATE": 25.0}] + _obs(T_OBS))
    f1, m1 = _predict("one_compartment_infusion", {"V": V, "CL": CL}, by_dur)
    f2, _ = _predict("one_compartment_infusion", {"V": V, "CL": CL}, by_rate)
    np.testing.assert_array_equal(f1, f2)
    assert m1.data.dose_rate[0, 0] == 25.0
    np.testing.assert_allclose(f1, _superpose(T_OBS, [(0.0, 100.0)], lambda s: _infusion(s, 4.0)), rtol=1e-12)


def test_cmt_2_doses_of_an_oral_model_go_to_the_central_compartment():
    df = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1},
                 {"TIME": 6.0, "AMT": 40.0, "EVID": 1, "MDV": 1, "CMT": 2},
                 {"TIME": 9.0, "AMT": 60.0, "EVID": 1, "MDV": 1, "CMT": 2, "RATE": 20.0}] + _obs(T_OBS, CMT=2))
    f, _ = _predict("one_compartment_oral", {"ka": KA, "V": V, "CL": CL}, df)
    ref = (_superpose(T_OBS, [(0.0, 100.0)], _oral) + _superpose(T_OBS, [(6.0, 40.0)], _bolus)
           + _superpose(T_OBS, [(9.0, 60.0)], lambda s: _infusion(s, 3.0)))
    np.testing.assert_allclose(f, ref, rtol=1e-10, atol=1e-12)


# ----- EVID, MDV ----------------------------------------------------------------------------------
def test_evid_3_and_4_reset_the_system():
    rows = [{"AMT": 100.0, "EVID": 1, "MDV": 1}] + _obs([1.0, 5.0])
    rows += [{"TIME": 6.0, "EVID": 3, "MDV": 1}] + _obs([6.0, 8.0])      # reset: nothing left
    rows += [{"TIME": 10.0, "AMT": 50.0, "EVID": 1, "MDV": 1}] + _obs([12.0])
    rows += [{"TIME": 2.0, "AMT": 80.0, "EVID": 4, "MDV": 1}] + _obs([2.0, 3.0, 14.0])  # reset + dose, time restarts
    df = _table(rows)
    f, model = _predict("one_compartment_bolus", {"V": V, "CL": CL}, df)
    ref = np.concatenate([_superpose([1.0, 5.0], [(0.0, 100.0)], _bolus), [0.0, 0.0],
                          _superpose([12.0], [(10.0, 50.0)], _bolus),
                          _superpose([2.0, 3.0, 14.0], [(2.0, 80.0)], _bolus)])
    np.testing.assert_allclose(f, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(model.data.obs_seg[0], [0, 0, 1, 1, 1, 2, 2, 2])
    # the observation rows keep the table's order of periods (the time restarts at the EVID 4 record)
    np.testing.assert_array_equal(model.data.time[0], [1.0, 5.0, 6.0, 8.0, 12.0, 2.0, 3.0, 14.0])


def test_mdv_and_evid_2_rows_are_not_observations():
    rows = [{"AMT": 100.0, "EVID": 1, "MDV": 1}] + _obs([1.0, 2.0])
    rows += [{"TIME": 3.0, "DV": 5.0, "MDV": 1}, {"TIME": 4.0, "DV": 7.0, "EVID": 2, "MDV": 1}] + _obs([5.0])
    f, model = _predict("one_compartment_bolus", {"V": V, "CL": CL}, _table(rows))
    np.testing.assert_array_equal(model.data.time[0], [1.0, 2.0, 5.0])
    assert model.data.num_obs == 3
    np.testing.assert_allclose(f, _superpose([1.0, 2.0, 5.0], [(0.0, 100.0)], _bolus), rtol=1e-12)


# ----- time-varying covariates --------------------------------------------------------------------
def test_time_varying_covariates_locf_and_linear():
    rows = [{"AMT": 100.0, "EVID": 1, "MDV": 1, "WT": 70.0}, {"TIME": 1.0, "DV": 1.0, "WT": np.nan},
            {"TIME": 2.0, "EVID": 2, "MDV": 1, "WT": 80.0}, {"TIME": 3.0, "DV": 1.0, "WT": np.nan},
            {"TIME": 4.0, "DV": 1.0, "WT": 90.0}, {"TIME": 6.0, "DV": 1.0, "WT": np.nan}]
    df = _table(rows)
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "ID": 2, "TIME": 1.0, "EVID": 0, "MDV": 0, "AMT": 0.0, "DV": 1.0,
                       "WT": np.nan}
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "ID": 2, "TIME": 5.0, "EVID": 0, "MDV": 0, "AMT": 0.0, "DV": 1.0,
                       "WT": 60.0}
    locf = nlme.read_nonmem(df, regressors=["WT"])
    np.testing.assert_array_equal(locf.regressors["WT"][0], [70.0, 80.0, 90.0, 90.0])
    np.testing.assert_array_equal(locf.regressors["WT"][1, :2], [60.0, 60.0])  # before the first value: the first
    lin = nlme.read_nonmem(df, regressors=["WT"], covariate_interpolation="linear")
    np.testing.assert_allclose(lin.regressors["WT"][0], [75.0, 85.0, 90.0, 90.0])
    np.testing.assert_array_equal(lin.regressors["WT"][1, :2], [60.0, 60.0])

    def cl_by_weight(psi, data):  # a user model reads the per-observation values
        w = data.regressors["WT"]
        return 100.0 / psi["V"] * data.xp.exp(-psi["CL"] * (w / 70.0) / psi["V"] * data.time)

    for how, wt in (("locf", [70.0, 80.0, 90.0, 90.0]), ("linear", [75.0, 85.0, 90.0, 90.0])):
        f, _ = _predict(cl_by_weight, {"V": V, "CL": CL}, df, regressors=["WT"], covariate_interpolation=how)
        t = np.array([1.0, 3.0, 4.0, 6.0])
        np.testing.assert_allclose(f[:4], 100.0 / V * np.exp(-CL * np.array(wt) / 70.0 / V * t), rtol=1e-12)


# ----- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("row, message", [
    ({"ADDL": 3, "II": 0.0}, "ADDL' > 0 without an interval"),
    ({"SS": 1, "II": 0.0}, "steady-state dose"),
    ({"SS": 3, "II": 12.0}, "other SS codes"),
    ({"ADDL": 1.5, "II": 12.0}, "non-negative integer"),
    ({"RATE": -1.0}, "RATE' = -1"),
    ({"RATE": -2.0}, "DUR' column"),
    ({"RATE": -3.0}, "must be >= 0"),
    ({"EVID": 5}, r"must be 0 \(observation\)"),
])
def test_inconsistent_dose_records_are_clear_errors(row, message):
    df = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, **row}] + _obs([1.0, 2.0]))
    with pytest.raises(DataError, match=message) as err:
        nlme.read_nonmem(df)
    assert "ID 1, row 0" in str(err.value)


def test_more_record_errors():
    base = [{"AMT": 100.0, "EVID": 1, "MDV": 1}]
    with pytest.raises(DataError, match=r"'ADDL' > 0 on a row that is not a dose .*row 1"):
        nlme.read_nonmem(_table(base + _obs([1.0], ADDL=2, II=1.0)))
    with pytest.raises(DataError, match=r"'SS' > 0 on a row that is not a dose"):
        nlme.read_nonmem(_table(base + _obs([1.0], SS=1, II=1.0)))
    with pytest.raises(DataError, match=r"needs the infusion duration 'DUR' > 0"):
        nlme.read_nonmem(_table([{**base[0], "RATE": -2.0, "DUR": 0.0}] + _obs([1.0])))
    with pytest.raises(DataError, match=r"set 'RATE' = -2"):
        nlme.read_nonmem(_table([{**base[0], "DUR": 2.0}] + _obs([1.0])))
    with pytest.raises(DataError, match=r"time before the reset .*row 3"):
        nlme.read_nonmem(_table(base + _obs([1.0]) + [{"TIME": 5.0, "EVID": 3, "MDV": 1}] + _obs([4.0])))
    with pytest.raises(DataError, match="covariate_interpolation"):
        nlme.read_nonmem(_table(base + _obs([1.0])), covariate_interpolation="spline")
    with pytest.raises(DataError, match=r"'WT' has no value on any record of ID 1"):
        nlme.read_nonmem(_table(base + _obs([1.0]), WT=np.nan), regressors=["WT"])


def test_dur_without_rate_column_is_an_infusion():
    df = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, "DUR": 4.0}] + _obs(T_OBS, DUR=0.0)).drop(columns="RATE")
    f, _ = _predict("one_compartment_infusion", {"V": V, "CL": CL}, df)
    np.testing.assert_allclose(f, _superpose(T_OBS, [(0.0, 100.0)], lambda s: _infusion(s, 4.0)), rtol=1e-12)


# ----- the ODE path on the same records ------------------------------------------------------------
def _oral_ode(ss_periods: int = 20, max_step: float | None = 0.05, **kw):
    """The one-compartment oral model as an ODE; 20 steady-state periods leave ``e^{-k·20·II}`` ≤ 4e-11 (II ≥ 6)."""

    def rhs(t, x, psi, xp):
        return (-psi["ka"] * x[0], psi["ka"] * x[0] - psi["CL"] / psi["V"] * x[1])

    return nlme.ode(rhs, ("ka", "V", "CL"), num_states=2, observe=lambda x, psi, xp: x[1] / psi["V"],
                    max_step=max_step, ss_periods=ss_periods, **kw)


def _all_records() -> pd.DataFrame:
    """Two individuals: SS oral dose with ADDL, a central infusion, an EVID 4 restart, an EVID 3 reset; and an
    SS central infusion with an SS = 2 zero-order depot input on top."""
    one = [{"AMT": 100.0, "EVID": 1, "MDV": 1, "ADDL": 3, "II": 12.0, "SS": 1}] + _obs([1.0, 5.0, 13.0], CMT=2)
    one += [{"TIME": 30.0, "AMT": 50.0, "EVID": 1, "MDV": 1, "CMT": 2, "RATE": 25.0}] + _obs([30.0, 31.0, 45.0])
    one += [{"TIME": 10.0, "AMT": 80.0, "EVID": 4, "MDV": 1}] + _obs([12.0, 13.0])
    one += [{"TIME": 14.0, "EVID": 3, "MDV": 1}] + _obs([15.0])
    two = [{"ID": 2, "AMT": 60.0, "EVID": 1, "MDV": 1, "CMT": 2, "RATE": 30.0, "SS": 1, "II": 8.0}]
    two += [{"ID": 2, **o} for o in _obs([0.5, 3.0, 7.0])]
    two += [{"ID": 2, "TIME": 7.5, "AMT": 40.0, "EVID": 1, "MDV": 1, "SS": 2, "II": 6.0, "RATE": 20.0}]  # depot
    two += [{"ID": 2, **o} for o in _obs([8.0, 20.0])]
    return _table(one + two)


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_ode_path_matches_the_closed_forms_on_every_record_type(backend):
    df = _all_records()
    params = {"ka": KA, "V": V, "CL": CL}
    closed, _ = _predict("one_compartment_oral", params, df, backend=backend)
    ode, _ = _predict(_oral_ode(), params, df, backend=backend)
    # hand-written superposition for individual 1's first period (SS train, ADDL doses)
    ref = _superpose([1.0, 5.0, 13.0], _train(0.0, 100.0, 12.0) + [(12.0 * j, 100.0) for j in (1, 2, 3)], _oral)
    np.testing.assert_allclose(closed[:3], ref, rtol=1e-8)
    assert closed[8] == 0.0  # after the EVID 3 reset
    np.testing.assert_allclose(ode, closed, rtol=1e-6, atol=1e-12)


def test_closed_forms_on_jax_equal_torch():
    df = _all_records()
    for structural, params in (("one_compartment_oral", {"ka": KA, "V": V, "CL": CL}),
                               ("two_compartment_oral", {"ka": KA, "CL": 2.0, "V1": 10.0, "Q": 3.0, "V2": 25.0})):
        f_torch, _ = _predict(structural, params, df)
        f_jax, _ = _predict(structural, params, df, backend="jax")
        np.testing.assert_allclose(f_jax, f_torch, rtol=1e-12, atol=1e-14)


def test_ode_steady_state_from_few_periods():
    """The period iterates approach the steady state as ``Σ_m c_m e^{-λ_m j II}``; after one period the fast mode
    (ka·II = 15.6) is gone and Aitken's Δ² removes the slow one (k·II = 2.4) exactly: three periods suffice."""
    df = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, "SS": 1, "II": 12.0}] + _obs([1.0, 6.0, 11.0], CMT=2))
    params = {"ka": KA, "V": V, "CL": CL}
    closed, _ = _predict("one_compartment_oral", params, df)
    for n in (3, 20):
        ode, _ = _predict(_oral_ode(ss_periods=n), params, df)
        np.testing.assert_allclose(ode, closed, rtol=1e-6)
    with pytest.raises(ValueError, match="ss_periods must be an integer >= 3"):
        _oral_ode(ss_periods=2)


def test_ode_default_step_when_the_time_restarts():
    """A later period whose times all precede the first period's: the default step comes from the span of the
    event times (50 / 200 here), not from last − first (negative)."""
    rows = [{"TIME": 10.0, "AMT": 100.0, "EVID": 1, "MDV": 1}] + _obs([12.0, 30.0, 50.0], CMT=2)
    rows += [{"TIME": 0.0, "AMT": 60.0, "EVID": 4, "MDV": 1}] + _obs([1.0, 5.0], CMT=2)
    params = {"ka": KA, "V": V, "CL": CL}
    closed, _ = _predict("one_compartment_oral", params, _table(rows))
    ode, _ = _predict(_oral_ode(max_step=None), params, _table(rows))
    np.testing.assert_allclose(closed, np.concatenate([_superpose([12.0, 30.0, 50.0], [(10.0, 100.0)], _oral),
                                                       _superpose([1.0, 5.0], [(0.0, 60.0)], _oral)]), rtol=1e-12)
    np.testing.assert_allclose(ode, closed, rtol=2e-4)  # RK4 at h = 0.25 (ka·h = 0.33): measured 7.9e-5


@pytest.mark.parametrize("structural, params", [
    ("one_compartment_oral_lag", {"Tlag": TLAG, "ka": KA, "V": V, "CL": CL}),
    ("one_compartment_infusion", {"V": V, "CL": CL}),
    ("two_compartment_oral", {"ka": KA, "CL": 2.0, "V1": 10.0, "Q": 3.0, "V2": 25.0}),
])
def test_gradients_through_the_steady_state_closed_forms(structural, params):
    """SAEM's numerical steps differentiate the predictions: autograd equals central differences (step 1e-6,
    truncation O(h²) ~ 1e-12, rounding ~ 1e-10 relative) on SS, ADDL, CMT-routed and reset records."""
    rows = [{"AMT": 100.0, "EVID": 1, "MDV": 1, "SS": 1, "II": 12.0, "ADDL": 1, "RATE": 40.0}]
    rows += _obs([0.3, 1.0, 3.0, 13.0, 20.0], CMT=2)
    rows += [{"TIME": 21.0, "AMT": 30.0, "EVID": 4, "MDV": 1, "CMT": 2}] + _obs([21.5, 25.0])
    model = nlme.NLME(structural, dict(params), data=_table(rows))
    mask = torch.as_tensor(model.data.mask)

    def f(values: torch.Tensor) -> torch.Tensor:
        psi = {k: values[j].reshape(1, 1) for j, k in enumerate(params)}
        return model._structural_fn(psi, model.design)[mask]

    x0 = torch.tensor(list(params.values()), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(f, x0)
    assert torch.isfinite(jac).all()
    for j in range(len(params)):
        h = 1e-6 * x0[j]
        e = torch.zeros_like(x0)
        e[j] = h
        fd = (f(x0 + e) - f(x0 - e)) / (2 * h)
        np.testing.assert_allclose(jac[:, j].numpy(), fd.numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("structural, params, unit", [
    ("one_compartment_oral_lag", {"Tlag": TLAG, "ka": KA, "V": V, "CL": CL}, lambda s: _oral(s, TLAG)),
    ("two_compartment_oral", {"ka": KA, "CL": 2.0, "V1": 10.0, "Q": 3.0, "V2": 25.0}, _two_cmt(ka=KA)[1]),
])
def test_zero_order_input_into_the_depot(structural, params, unit):
    """``RATE > 0`` on a depot dose of an oral model: ``R ∫_0^{min(s, D)} unit(s − u) du`` (SciPy quadrature);
    at steady state, the same as the end of 200 such doses every II (a long run, by ADDL)."""
    from scipy.integrate import quad

    dur, t_obs = 3.0, [0.5, 1.0, 2.0, 3.5, 6.0, 11.0]
    df = _table([{"AMT": 90.0, "EVID": 1, "MDV": 1, "RATE": 30.0}] + _obs(t_obs, CMT=2))
    f, _ = _predict(structural, params, df)
    ref = [30.0 * quad(lambda u, s=s: float(unit(np.array(s - u))), 0.0, min(s, dur), epsabs=1e-13, limit=200)[0]
           for s in t_obs]
    np.testing.assert_allclose(f, ref, rtol=1e-8, atol=1e-12)
    start = 12.0 * 199
    ss = _table([{"TIME": start, "AMT": 90.0, "EVID": 1, "MDV": 1, "RATE": 30.0, "SS": 1, "II": 12.0}]
                + _obs([start + t for t in t_obs], CMT=2))
    run = _table([{"AMT": 90.0, "EVID": 1, "MDV": 1, "RATE": 30.0, "ADDL": 199, "II": 12.0}]
                 + _obs([start + t for t in t_obs], CMT=2))
    f_ss, _ = _predict(structural, params, ss)
    f_run, _ = _predict(structural, params, run)
    np.testing.assert_allclose(f_ss, f_run, rtol=1e-8)


def test_ode_steady_state_of_a_long_half_life_by_aitken_extrapolation():
    """k = 0.01 (half-life 69 h) dosed every 12 h: 20 periods alone leave e^{-k·20·II} = 9% of the train out; the
    Aitken Δ² limit of the last three iterates is exact once the fast mode (ka) is gone, so the ODE matches the
    closed form to RK4's error."""
    df = _table([{"AMT": 100.0, "EVID": 1, "MDV": 1, "SS": 1, "II": 12.0, "RATE": 50.0}]
                + _obs([1.0, 3.0, 6.0, 11.0], CMT=2))
    params = {"ka": KA, "V": V, "CL": 0.1}
    closed, _ = _predict("one_compartment_oral", params, df)
    ode, _ = _predict(_oral_ode(ss_periods=20), params, df)
    np.testing.assert_allclose(ode, closed, rtol=1e-6)
