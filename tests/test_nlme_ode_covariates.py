"""Time-varying covariates in ODE kinetics (``nlme.ode(..., covariates=("WT",))``): ``rhs`` reads ``psi["WT"]`` at
the time (last value carried forward over every record, EVID 2 rows included), against the closed form of a
one-compartment bolus whose clearance follows the weight, on both backends and solvers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from latentfit.models import nlme

WEIGHTS = ((70.0, 100.0), (50.0, 80.0))  # per subject: weight before and after the EVID = 2 record at 30 h
TIMES = np.array([1.0, 2.0, 12.0, 24.0, 30.0, 36.0, 48.0])


def rhs(t, x, p, xp):
    """``dA/dt = −CL (WT/70)^0.75 / V · A``: allometric clearance at the current weight."""
    return (-p["CL"] * (p["WT"] / 70.0) ** 0.75 / p["V"] * x[0],)


def _table() -> pd.DataFrame:
    """100 mg IV bolus at 0; the first weight is on the 2 h observation (before it: that value, NOCB), the second on an
    EVID = 2 record at 30 h (an observation at 30 h too); DV rows without weight carry the last one."""
    rows = []
    for i, (w0, w1) in enumerate(WEIGHTS, 1):
        rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, WT=np.nan))
        rows += [dict(ID=i, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, WT=w0 if t == 2.0 else np.nan)
                 for t in TIMES[TIMES <= 24]]
        rows.append(dict(ID=i, TIME=30.0, DV=np.nan, AMT=0.0, EVID=2, MDV=1, WT=w1))
        rows += [dict(ID=i, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, WT=np.nan) for t in TIMES[TIMES >= 30]]
    return pd.DataFrame(rows)


def _exact(times: np.ndarray, v: float = 10.0, cl: float = 2.0) -> np.ndarray:
    """``C(t) = 100/V e^{−k₀ t}`` before 30 h, ``100/V e^{−30 k₀ − k₁ (t − 30)}`` after (k = CL (WT/70)^0.75 / V)."""
    out = []
    for w0, w1 in WEIGHTS:
        k0, k1 = cl * (w0 / 70) ** 0.75 / v, cl * (w1 / 70) ** 0.75 / v
        out.append(100.0 / v * np.where(times < 30, np.exp(-k0 * times), np.exp(-30 * k0 - k1 * (times - 30))))
    return np.array(out)


def _model(backend: str, **kw) -> nlme.NLME:
    structural = nlme.ode(rhs, ("V", "CL"), num_states=1, observe=lambda x, p, xp: x[0] / p["V"],
                          covariates=("WT",), **kw)
    return nlme.NLME(structural, {"V": 10.0, "CL": 2.0}, backend=backend).bind(_table())


def _predict(model: nlme.NLME) -> np.ndarray:
    theta = model.init_params()
    return np.asarray(model.ops.to_numpy(model.structural_prediction(theta, model.prior_moments(theta)[0])))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_clearance_follows_the_weight_between_records_rk4(backend):
    """RK4 (max_step=0.1): within 1e-6 of the closed form (measured 2.7e-8), the weight change at 30 h being an event
    of the integration; the same model with the weight as a constant individual covariate would be off by 20-40%
    after 30 h."""
    if backend == "jax":
        pytest.importorskip("jax").config.update("jax_enable_x64", True)
    pred = _predict(_model(backend, max_step=0.1))
    np.testing.assert_allclose(pred, _exact(TIMES), rtol=1e-6)


def test_clearance_follows_the_weight_adaptive_and_on_a_prediction_grid():
    """torchdiffeq's dopri5 (rtol 1e-10): within 1e-8 (measured 3e-10); the smooth curves of the plots (a prediction
    grid through the same step functions) match the closed form at every grid point."""
    pytest.importorskip("torchdiffeq")
    model = _model("torch", solver="adaptive", rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_predict(model), _exact(TIMES), rtol=1e-8)
    grid = model.prediction_grid(40)
    assert grid is not None
    theta = model.init_params()
    at = np.asarray(model.structural_prediction_at(theta, model.prior_moments(theta)[0], grid))
    g, mask = grid
    want = np.array([_exact(np.asarray(g[i], dtype=float))[i] for i in range(2)])
    np.testing.assert_allclose(at[mask], want[mask], rtol=1e-7)


def test_covariate_names_must_differ_from_the_parameters():
    with pytest.raises(ValueError, match=r"covariates \['V'\] are also parameter names"):
        nlme.ode(rhs, ("V", "CL"), num_states=1, observe=lambda x, p, xp: x[0] / p["V"], covariates=("V",))


def test_covariate_records_across_a_reset():
    """A reset and dose (EVID 4, the time restarting at 0) that sets the weight to 100, then an EVID 2 record at 20 h
    (50 kg): each period's clearance follows its own records (LOCF in period-then-time order), to 1e-7 (RK4)."""
    rows = [dict(ID=1, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, WT=70.0)]
    rows += [dict(ID=1, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, WT=np.nan) for t in (1.0, 12.0)]
    rows += [dict(ID=1, TIME=0.0, DV=np.nan, AMT=100.0, EVID=4, MDV=1, WT=100.0)]
    rows += [dict(ID=1, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, WT=np.nan) for t in (2.0, 12.0)]
    rows += [dict(ID=1, TIME=20.0, DV=np.nan, AMT=0.0, EVID=2, MDV=1, WT=50.0),
             dict(ID=1, TIME=24.0, DV=1.0, AMT=0.0, EVID=0, MDV=0, WT=np.nan)]
    structural = nlme.ode(rhs, ("V", "CL"), num_states=1, observe=lambda x, p, xp: x[0] / p["V"],
                          covariates=("WT",), max_step=0.1)
    model = nlme.NLME(structural, {"V": 10.0, "CL": 2.0}).bind(pd.DataFrame(rows))
    k = lambda w: 2.0 * (w / 70) ** 0.75 / 10  # noqa: E731
    want = 10 * np.exp([-k(70) * 1, -k(70) * 12, -k(100) * 2, -k(100) * 12, -k(100) * 20 - k(50) * 4])
    np.testing.assert_allclose(_predict(model)[0], want, rtol=1e-7)
