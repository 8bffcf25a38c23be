"""Several responses from one ``nlme.ode`` integration: ``observe`` returning a dict or a tuple (a joint PK / indirect
response model), against scipy's LSODA (rtol 1e-10), on both backends and solvers, and a fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp

from latentfit.models import nlme

TH = {"ka": 1.0, "V": 10.0, "CL": 0.5, "kin": 5.0, "kout": 0.05, "Imax": 0.9, "IC50": 2.0}
PSI = np.array([[1.0, 10.0, 0.5, 5.0, 0.05, 0.9, 2.0],      # ψ of the three subjects (columns in TH's order)
                [1.6, 7.0, 0.8, 4.0, 0.08, 0.9, 1.0],
                [0.6, 14.0, 0.3, 6.0, 0.04, 0.9, 3.5]])
CONC_T, EFFECT_T = (1, 4, 12, 50, 100), (0, 24, 48, 96, 144, 200)


def idr_rhs(t, x, p, xp):
    """Oral one-compartment PK (depot, central) and an indirect response with inhibited production:
    ``dR/dt = kin (1 − Imax C/(IC50 + C)) − kout R``, ``R(0) = kin/kout``."""
    c = x[1] / p["V"]
    return (-p["ka"] * x[0], p["ka"] * x[0] - p["CL"] / p["V"] * x[1],
            p["kin"] * (1 - p["Imax"] * c / (p["IC50"] + c)) - p["kout"] * x[2])


def idr_ode(observe, **kw) -> nlme.Structural:
    return nlme.ode(idr_rhs, tuple(TH), num_states=3, observe=observe,
                    initial=lambda p, xp: (0.0 * p["V"], 0.0 * p["V"], p["kin"] / p["kout"]), **kw)


def as_dict(x, p, xp):
    return {"effect": x[2], "conc": x[1] / p["V"]}  # any order: read by name


def as_tuple(x, p, xp):
    return (x[1] / p["V"], x[2])  # the order of error={...}


def _table(num: int = 3) -> pd.DataFrame:
    """50 mg q24h × 5 (ADDL = 4) into the depot; concentrations (DVID 1) and effects (DVID 2) at their own times."""
    rows = []
    for i in range(1, num + 1):
        rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=50.0, EVID=1, MDV=1, CMT=1, DVID=1, ADDL=4, II=24.0))
        rows += [dict(ID=i, TIME=float(t), DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1, DVID=1, ADDL=0, II=0.0)
                 for t in CONC_T]
        rows += [dict(ID=i, TIME=float(t), DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1, DVID=2, ADDL=0, II=0.0)
                 for t in EFFECT_T]
    return pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")


def _lsoda(psi: np.ndarray) -> dict[tuple[int, float], float]:
    """Reference: the five doses as jumps, LSODA (rtol 1e-10) between events; ``{(DVID, t): value}``."""
    p = dict(zip(TH, psi, strict=True))
    x, t, out = np.array([0.0, 0.0, p["kin"] / p["kout"]]), 0.0, {}
    events = sorted([(24.0 * m, 0, None) for m in range(5)] + [(float(s), 1, 1) for s in CONC_T]
                    + [(float(s), 1, 2) for s in EFFECT_T])
    for te, _, dvid in events:
        if te > t:
            x = solve_ivp(lambda s, y: idr_rhs(s, y, p, np), (t, te), x, method="LSODA", rtol=1e-10,
                          atol=1e-12).y[:, -1]
            t = te
        if dvid is None:
            x[0] += 50.0
        else:
            out[(dvid, te)] = x[1] / p["V"] if dvid == 1 else x[2]
    return out


def _check_against_lsoda(structural: nlme.Structural, backend: str, rtol: float) -> None:
    df = _table()
    model = nlme.NLME(structural, dict(TH), error={"conc": "proportional", "effect": "constant"},
                      backend=backend).bind(df)
    ops = model.ops
    theta = model.init_params()
    pred = np.asarray(ops.to_numpy(model.structural_prediction(theta, ops.asarray(np.log(PSI)))))
    obs = df[df.EVID == 0]
    for i in range(3):
        ref = _lsoda(PSI[i])
        sub = obs[obs.ID == i + 1]
        want = np.array([ref[(r.DVID, r.TIME)] for r in sub.itertuples()])
        np.testing.assert_allclose(pred[i, :len(want)], want, rtol=rtol)


@pytest.mark.parametrize("observe", [as_dict, as_tuple])
def test_joint_pk_idr_rk4_matches_lsoda_on_torch(observe):
    """RK4 with max_step=0.05: every concentration and effect of three subjects within 1e-6 (measured 3.4e-8) of
    LSODA, one integration for both responses, whether observe returns a dict (by name) or a tuple (in order)."""
    _check_against_lsoda(idr_ode(observe, max_step=0.05), "torch", 1e-6)


def test_joint_pk_idr_adaptive_matches_lsoda_on_torch():
    """torchdiffeq's dopri5 (rtol 1e-9, atol 1e-10) through the same events: within 1e-6."""
    pytest.importorskip("torchdiffeq")
    _check_against_lsoda(idr_ode(as_dict, solver="adaptive", rtol=1e-9, atol=1e-10), "torch", 1e-6)


def test_joint_pk_idr_on_jax_rk4_and_adaptive():
    """JAX (float64): RK4 compiled, and diffrax's Tsit5 (rtol 1e-9): within 1e-6 of LSODA."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("diffrax")
    jax.config.update("jax_enable_x64", True)
    _check_against_lsoda(idr_ode(as_tuple, max_step=0.05), "jax", 1e-6)
    _check_against_lsoda(idr_ode(as_dict, solver="adaptive", rtol=1e-9, atol=1e-10), "jax", 1e-6)


def test_observe_outputs_must_match_the_responses():
    """A tuple of the wrong length, or a dict without a response, is a clear error (responses.stack)."""
    df = _table(1)
    theta = None
    for observe, match in ((lambda x, p, xp: (x[1] / p["V"],), "returned 1 outputs for the 2 responses"),
                           (lambda x, p, xp: {"conc": x[1] / p["V"]}, r"missing \['effect'\]")):
        model = nlme.NLME(idr_ode(observe, max_step=0.5, check=False), dict(TH),
                          error={"conc": "proportional", "effect": "constant"}).bind(df)
        theta = model.init_params()
        with pytest.raises(Exception, match=match):
            model.structural_prediction(theta, torch.log(torch.tensor(PSI[:1])))


def _single_dose_table(num: int) -> pd.DataFrame:
    """One 100 mg dose; concentrations at 1, 4, 12, 24 h, effects at 0, 24, 48, 96 h (10 events per subject: a
    small compiled program)."""
    rows = []
    for i in range(1, num + 1):
        rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, CMT=1, DVID=1))
        rows += [dict(ID=i, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1, DVID=1) for t in (1.0, 4.0, 12.0, 24.0)]
        rows += [dict(ID=i, TIME=t, DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=1, DVID=2) for t in (0.0, 24.0, 48.0, 96.0)]
    return pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")


@pytest.mark.slow
def test_joint_pk_idr_ode_fit_recovers_the_truth():
    """40 subjects simulated from the joint ODE model (JAX, RK4), fitted from starts 10-40% off: the PK estimates
    (ka, V, CL) within 15% of the truth, the baseline kin/kout within 10%, the residual parameters of both responses
    within 30% (measured: ka +4.6%, V +7.4%, CL −0.5%, kin/kout +7.3%, IC50 −1.2%, b_conc −2.4%, a_effect +2.2%;
    ~3 min, mostly compilation)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    P = nlme.Parameter
    spec = {"ka": P(1.0, random=False), "V": P(10.0, omega2=0.3), "CL": P(0.5, omega2=0.3),
            "kin": P(5.0, omega2=0.3), "kout": P(0.05, random=False), "Imax": P(0.9, fixed=True, random=False),
            "IC50": P(2.0, random=False)}
    truth = {**TH, "omega2_V": 0.05, "omega2_CL": 0.1, "omega2_kin": 0.05, "b_conc": 0.1, "a_effect": 3.0}
    model = nlme.NLME(idr_ode(as_dict, max_step=0.5), spec, error={"conc": "proportional", "effect": "constant"},
                      backend="jax")
    data = model.bind(_single_dose_table(40)).simulate(truth, seed=2)
    # parameters without a random effect move slowly under SAEM: those start 10% off, the others 30-40%
    start = {"ka": 1.1, "V": 14.0, "CL": 0.35, "kin": 4.0, "kout": 0.055, "IC50": 2.2}
    fit = model.fit(data, seed=0, progress=False, num_iters=(150, 80), init=start)
    p = {k: float(v) for k, v in fit.params.items() if np.size(v) == 1}
    for name in ("ka", "V", "CL"):
        assert abs(p[name] / TH[name] - 1) < 0.15, (name, p)
    assert abs(p["kin"] / p["kout"] / (TH["kin"] / TH["kout"]) - 1) < 0.1, p
    for name in ("b_conc", "a_effect"):
        assert abs(p[name] / truth[name] - 1) < 0.3, (name, p)


def test_joint_ode_with_occasions_carrying_drug_matches_single_response_models():
    """IOV on CL with drug carried across the occasion boundary (day 3: no reset): the joint ODE model (one chained
    integration, each interval with its occasion's κ) gives the concentration of the single-response ODE model and
    the effect of one observing x[2], both of which chain their state across occasions (tested against scipy in
    tests/test_nlme_occasions.py), to 1e-12."""
    df = _table(2)
    df["OCC"] = np.where(df["TIME"] >= 60.0, 2, 1)
    kw = dict(iov={"CL": 0.1}, max_step=0.1)

    def model(observe, error):
        return nlme.NLME(idr_ode(observe, max_step=kw["max_step"], check=False), dict(TH), error=error,
                         iov=kw["iov"]).bind(df)

    joint = model(as_tuple, {"conc": "proportional", "effect": "constant"})
    assert joint._iov.carry == "ode"  # drug carries into occasion 2: the chained integration
    conc = model(lambda x, p, xp: x[1] / p["V"], "proportional")
    effect = model(lambda x, p, xp: x[2], "constant")
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([torch.tensor(np.log(PSI[:2])), 0.3 * torch.randn((2, 2), generator=gen, dtype=torch.float64)], -1)
    theta = joint.init_params()
    got = joint.structural_prediction(theta, z).numpy()
    is_conc = (df[df.EVID == 0].groupby("ID")["DVID"].apply(list)).tolist()
    want_c = conc.structural_prediction(conc.init_params(), z).numpy()
    want_e = effect.structural_prediction(effect.init_params(), z).numpy()
    for i in range(2):
        dv = np.array(is_conc[i])
        np.testing.assert_allclose(got[i, :len(dv)], np.where(dv == 1, want_c[i, :len(dv)], want_e[i, :len(dv)]),
                                   rtol=1e-12)
    # κ moves occasion 2's concentrations (the test is not vacuous)
    z0 = torch.cat([z[:, :7], torch.zeros((2, 2), dtype=torch.float64)], -1)
    assert not np.allclose(got, joint.structural_prediction(theta, z0).numpy(), rtol=1e-3)
