"""Several responses (issue 14 item 3): DVID / YTYPE, one error model per response, joint PK/PD recovery."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import solve_ivp
from scipy.stats import norm

from latentfit.inference.model import DataError, ModelSpecificationError
from latentfit.models import nlme
from latentfit.models.nlme.responses import oral_effect_imax
from latentfit.plots import vpc_summary

README = Path(__file__).resolve().parents[1] / "README.md"
P = nlme.Parameter
PARAMS = {"ka": P(1.0, omega2=0.3), "V": P(10.0, omega2=0.3), "CL": P(0.5, omega2=0.3), "ke0": P(0.1, random=False),
          "E0": P(100.0, omega2=0.1), "Imax": P(0.8, transform="logit", random=False), "IC50": P(3.0, omega2=0.3)}
TRUTH = {"ka": 1.0, "V": 10.0, "CL": 0.5, "ke0": 0.1, "E0": 100.0, "Imax": 0.8, "IC50": 3.0, "omega2_ka": 0.2,
         "omega2_V": 0.05, "omega2_CL": 0.1, "omega2_E0": 0.01, "omega2_IC50": 0.1, "b_conc": 0.1, "a_effect": 3.0}
ERRORS = {"conc": "proportional", "effect": "constant"}


def pkpd_design(num_ids: int, conc_times=(0.5, 1, 2, 4, 8, 24), effect_times=(2, 6, 12, 24, 48, 72),
                column: str = "DVID", values=(1, 2)) -> pd.DataFrame:
    """One oral dose of 100 at time 0; concentrations (first value) and effects (second value) at their times."""
    ids = np.arange(1, num_ids + 1)
    dose = pd.DataFrame({"ID": ids, "TIME": 0.0, "DV": np.nan, "AMT": 100.0, "EVID": 1, "MDV": 1, column: values[0]})
    parts = [dose]
    for times, value in ((conc_times, values[0]), (effect_times, values[1])):
        parts.append(pd.DataFrame({"ID": np.repeat(ids, len(times)), "TIME": np.tile(np.asarray(times, float),
                                                                                       num_ids),
                                   "DV": 0.0, "AMT": 0.0, "EVID": 0, "MDV": 0, column: value}))
    table = pd.concat(parts)
    return table.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable").reset_index(
        drop=True)


def _model(data: pd.DataFrame, **kw) -> nlme.NLME:
    return nlme.NLME(oral_effect_imax(), dict(PARAMS), error=dict(ERRORS), data=data, **kw)


def test_effect_compartment_closed_form_matches_the_ode():
    """C and E of :func:`oral_effect_imax` against LSODA on depot/central/effect ODEs (two doses), 1e-7 relative."""
    ka, v, cl, ke0, e0, imax, ic50 = 0.9, 12.0, 0.6, 0.15, 80.0, 0.7, 2.5
    times = np.array([0.5, 1.0, 3.0, 7.0, 12.0, 20.0, 30.0, 47.0])
    df = pd.DataFrame({"ID": 1, "TIME": np.r_[0.0, 24.0, times], "DV": np.r_[np.nan, np.nan, np.ones(8)],
                       "AMT": np.r_[100.0, 50.0, np.zeros(8)], "EVID": np.r_[1, 1, np.zeros(8, int)],
                       "DVID": np.r_[1, 1, np.tile([1, 2], 4)]}).sort_values("TIME", kind="stable")
    model = nlme.NLME(oral_effect_imax(), {"ka": ka, "V": v, "CL": cl, "ke0": ke0, "E0": e0,
                                           "Imax": P(imax, transform="logit"), "IC50": ic50},
                      error=dict(ERRORS), data=df)
    theta = model.init_params()
    pred = model.ops.to_numpy(model.structural_prediction(theta, model.prior_moments(theta)[0]))[0]

    def rhs(t, x):
        return [-ka * x[0], ka * x[0] - cl / v * x[1], ke0 * (x[1] / v - x[2])]

    x1 = solve_ivp(rhs, (0, 24), [100.0, 0, 0], method="LSODA", rtol=1e-11, atol=1e-12, dense_output=True)
    start = x1.sol(24.0) + [50.0, 0, 0]
    x2 = solve_ivp(rhs, (24, 50), start, method="LSODA", rtol=1e-11, atol=1e-12, dense_output=True)
    state = np.stack([x1.sol(t) if t <= 24 else x2.sol(t) for t in np.sort(times)])
    conc, ce = state[:, 1] / v, state[:, 2]
    effect = e0 * (1 - imax * ce / (ic50 + ce))
    obs_t = np.sort(times)
    expected = np.where(np.isin(np.arange(8), [1, 3, 5, 7]), effect, conc)  # DVID 1, 2, 1, 2, ... by time
    assert obs_t.tolist() == times.tolist()
    np.testing.assert_allclose(pred, expected, rtol=1e-7)


def test_log_likelihood_per_response_error_models():
    """Each observation's density uses its response's prediction and error model (against scipy)."""
    df = _model(pkpd_design(4)).simulate(dict(TRUTH), seed=0)
    model = _model(df)
    ops = model.ops
    theta = dict(model.init_params(), b_conc=ops.asarray(0.15), a_effect=ops.asarray(2.5))
    z = model.sample_prior(theta, ops.key(0), 1)
    ll = ops.to_numpy(model.log_densities(theta, z)[0])[0]
    f = ops.to_numpy(model.structural_prediction(theta, z))[0]
    y, dvid = model.data.dv, model.data.regressors["DVID"]
    sd = np.where(dvid == 1, 0.15 * np.abs(f), 2.5)
    np.testing.assert_allclose(ll, norm.logpdf(y, f, sd).sum(-1), rtol=1e-12)
    # the M-step of each response's error parameter: the root mean square of its residuals
    stats = {k: v.sum(0) for k, v in model.stats(theta, z[0]).items()}
    new = model.m_step(stats, theta, model.num_units)
    res_c, res_e = ((y - f) / f)[dvid == 1], (y - f)[dvid == 2]
    assert float(new["b_conc"]) == pytest.approx(np.sqrt(np.mean(res_c ** 2)), rel=1e-12)
    assert float(new["a_effect"]) == pytest.approx(np.sqrt(np.mean(res_e ** 2)), rel=1e-12)


def test_one_response_equals_the_single_error_model():
    """``error={"y": "combined"}`` with a one-output model is the plain combined-error model (same log-density)."""
    df = pkpd_design(5, effect_times=())
    df["DV"] = np.where(df["EVID"] == 0, 5.0, np.nan)
    plain = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 10.0, "CL": 0.5}, error="combined", data=df)
    base = nlme.structural.one_compartment_oral().fn
    multi = nlme.NLME(lambda psi, d: {"y": base(psi, d)}, {"ka": 1.0, "V": 10.0, "CL": 0.5},
                      error={"y": "combined"}, data=df)
    theta = plain.init_params()
    z = plain.sample_prior(theta, plain.ops.key(0), 2)
    theta_m = {"ka": theta["ka"], "V": theta["V"], "CL": theta["CL"], "omega2_ka": theta["omega2_ka"],
               "omega2_V": theta["omega2_V"], "omega2_CL": theta["omega2_CL"], "a_y": theta["a"], "b_y": theta["b"]}
    np.testing.assert_allclose(plain.ops.to_numpy(multi.log_densities(theta_m, z)[0]),
                               plain.ops.to_numpy(plain.log_densities(theta, z)[0]), rtol=1e-13)
    assert not multi.params["a_y"].closed_form and multi.params["a_y"].meta["response"] == "y"


def test_response_columns_and_errors():
    df = pkpd_design(3, column="YTYPE", values=(5, 7))
    model = _model(df)
    assert model._resp.column == "YTYPE" and model._resp.values == [5.0, 7.0] and model._resp.counts == [18, 18]
    swapped = _model(df, dvid={"conc": 7, "effect": 5})
    np.testing.assert_array_equal(model.ops.to_numpy(swapped._resp.index), 1 - model.ops.to_numpy(model._resp.index))
    with pytest.raises(DataError, match="match no response"):
        _model(df, dvid={"conc": 5, "effect": 6})
    with pytest.raises(DataError, match="response column"):
        _model(df.drop(columns="YTYPE"))
    with pytest.raises(ModelSpecificationError, match="error models"):
        nlme.NLME(oral_effect_imax(), dict(PARAMS), error={"conc": "exponential", "effect": "constant"})
    with pytest.raises(ModelSpecificationError, match="error_init"):
        nlme.NLME(oral_effect_imax(), dict(PARAMS), error=dict(ERRORS), error_init={"conc": {"a": 1.0}})
    with pytest.raises(ModelSpecificationError, match="several responses"):
        nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 10.0, "CL": 0.5}, dvid={"y": 1})
    single = nlme.NLME(lambda psi, d: {"conc": d.time * psi["V"]}, dict(PARAMS), error=dict(ERRORS))
    with pytest.raises(ModelSpecificationError, match="missing"):
        single.bind(df).check_initial_values()


def _z_scores(fit, truth: dict[str, float] = TRUTH) -> dict[str, float]:
    """(estimate − truth) / SE; for variances and error parameters on the log scale (log(est/truth) / RSE), where
    their sampling distribution is close to normal."""
    table = fit.summary()
    out = {}
    for name, value in truth.items():
        est, se = float(table.loc[name, "estimate"]), float(table.loc[name, "se"])
        log_scale = name.startswith(("omega2_", "gamma2_", "a_", "b_"))
        out[name] = np.log(est / value) / (se / est) if log_scale else (est - value) / se
    return out


def _recovery(seed: int, num_ids: int, num_iters=(300, 100)) -> dict[str, float]:
    df = _model(pkpd_design(num_ids)).simulate(dict(TRUTH), seed=seed)
    return _z_scores(_model(df).fit(seed=seed, progress=False, num_iters=num_iters))


def test_readme_block_recovers_the_truth():
    """The README's PK/PD block, executed verbatim (40 subjects): every estimate within 3.5 SE of the truth
    it simulated from (variances and error parameters on the log scale)."""
    text = README.read_text()
    section = text.split("### Several responses (DVID / YTYPE): joint PK/PD\n", 1)[1].split("\n### ", 1)[0]
    ns = {"np": np, "pd": pd, "nlme": nlme}
    exec(compile(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0], "README:pkpd_fit", "exec"), ns)
    z = _z_scores(ns["pkpd_fit"], ns["truth_pkpd"])
    assert max(abs(v) for v in z.values()) < 3.5, z


@pytest.mark.slow
def test_joint_pkpd_recovery_three_seeds():
    """60 individuals, saemix's iterations, 3 seeds: every z-score within 3.5, each parameter's mean z-score within
    3.5/√3."""
    zs = [_recovery(seed=s, num_ids=60) for s in (21, 22, 23)]
    for name in TRUTH:
        vals = [z[name] for z in zs]
        assert max(abs(v) for v in vals) < 3.5, (name, vals)
        assert abs(np.mean(vals)) < 3.5 / np.sqrt(3), (name, vals)


def test_individual_fits_have_a_panel_per_subject_and_response():
    """``plot_individual_fits``: one panel per (subject, response), each drawing only its response's observations and
    predictions (smooth, from the dose); occasions whose times overlap (a restart): a panel each, one IPRED curve of
    that occasion; the VPC: one panel per response."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pkpd_design(3)
    df = pd.concat([df, df.assign(EVID=np.where(df["EVID"] == 1, 4, 0), OCC=2)]).fillna({"OCC": 1})
    df = df.sort_values(["ID", "OCC"], kind="stable").reset_index(drop=True)
    data = _model(df, iov=["CL"]).simulate(dict(TRUTH), seed=0)
    fit = _model(data, iov=["CL"]).fit(seed=0, num_iters=(8, 2), progress=False)
    fig = fit.plot_individual_fits()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [f"ID {i} · {r} · OCC {k}" for i in (1, 2, 3) for r in ("conc", "effect")
                                               for k in (1, 2)]
    conc, effect = (0.5, 1, 2, 4, 8, 24), (2, 6, 12, 24, 48, 72)
    for ax, times, k in zip(axes[:4], (conc, conc, effect, effect), (1, 2, 1, 2), strict=True):
        ipred = [ln for ln in ax.get_lines() if ln.get_label().startswith("IPRED")]
        assert [ln.get_label() for ln in ipred] == [f"IPRED · OCC {k}"]
        t = np.asarray(ipred[0].get_xdata())
        assert len(t) >= 150 and t[0] == 0.0 and t[-1] == times[-1] and set(times) <= set(t.tolist())
        assert sorted(ax.collections[0].get_offsets()[:, 0]) == list(times)
    plt.close(fig)
    # the VPC: one panel per response, each binning its own observations
    for name, times in (("conc", (0.5, 1, 2, 4, 8, 24)), ("effect", (2, 6, 12, 24, 48, 72))):
        v = vpc_summary(fit, num_sims=20, response=name, pred_corrected=False)
        assert sorted(set(v.x)) == list(times) and len(v.x) == 3 * 2 * 6
    with pytest.raises(ValueError, match="several responses"):
        vpc_summary(fit, num_sims=5)
    fig = fit.plot_vpc(num_sims=20)
    assert [ax.get_title() for ax in fig.axes] == ["conc", "effect"]
    plt.close(fig)
