"""Plots of NLME fits in the model's own terms (issue 14, item 8): time on the x-axis, subject IDs as panel titles,
smooth IPRED / PRED curves of the structural model, a prediction-corrected VPC and saemix / Monolix GOF panels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import latentfit as lf  # noqa: E402
from latentfit.models import nlme  # noqa: E402
from latentfit.plots import prediction_correct, vpc_summary  # noqa: E402

THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")


@pytest.fixture(scope="module")
def theo():
    return lf.datasets.theophylline(saemix_form=True)


@pytest.fixture(scope="module")
def fit(theo):
    model = nlme.NLME("one_compartment_oral", {"ka": nlme.Parameter(1.0, omega2=0.5), "V": 20.0, "CL": 0.5},
                      covariates={"V": "Weight"}, covariate_init={"V": {"Weight": 0.005}}, error_init={"a": 2.0})
    result = model.fit(theo, **THEO, seed=0, num_iters=(50, 20), progress=False)
    yield result
    plt.close("all")


def _oral(t: np.ndarray, dose: float, ka: float, v: float, cl: float) -> np.ndarray:
    k = cl / v
    return dose * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))


def _line(ax, label: str):
    return next(line for line in ax.lines if line.get_label() == label)


def test_individual_fits_are_drawn_against_time_with_ids_and_smooth_structural_curves(fit, theo):
    fig = fit.plot_individual_fits()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    ids = list(fit.model.data.ids)
    assert len(axes) == 12
    assert [ax.get_title() for ax in axes] == [f"Id {i}" for i in ids]
    assert axes[-1].get_xlabel() == "Time" and axes[0].get_ylabel() == "Concentration"
    xmax = max(_line(ax, "IPRED").get_xdata().max() for ax in axes)
    assert xmax == pytest.approx(24.65, abs=1e-12)  # hours, not the observation index 0–9
    modes = fit.individual_parameters()
    p = fit.params
    per_id = theo.groupby("Id").first()
    for k, ax in enumerate(axes):
        ipred, pred = _line(ax, "IPRED"), _line(ax, "PRED")
        t = np.asarray(ipred.get_xdata())
        assert len(t) >= 100 and np.all(np.diff(t) >= 0)
        dose, weight = per_id.loc[ids[k], "Dose"], per_id.loc[ids[k], "Weight"]
        pick = [0, len(t) // 7, len(t) // 2, len(t) - 1]
        want = _oral(t[pick], dose, modes["ka.mode"].iloc[k], modes["V.mode"].iloc[k], modes["CL.mode"].iloc[k])
        np.testing.assert_allclose(np.asarray(ipred.get_ydata())[pick], want, rtol=1e-8, atol=1e-10)
        v_pop = float(p["V"]) * np.exp(float(p["beta_V_Weight"]) * weight)  # log V = log V_pop + β·Weight
        want = _oral(t[pick], dose, float(p["ka"]), v_pop, float(p["CL"]))
        np.testing.assert_allclose(np.asarray(pred.get_ydata())[pick], want, rtol=1e-8, atol=1e-10)
        obs = ax.collections[0].get_offsets()
        assert np.asarray(obs)[:, 0].max() <= 24.65 + 1e-12
    plt.close(fig)


def test_individual_fits_log_scale_and_subject_selection(fit):
    fig = fit.plot_individual_fits(log=True, ids=[3, 1])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["Id 3", "Id 1"]
    assert all(ax.get_yscale() == "log" for ax in axes)
    plt.close(fig)
    with pytest.raises(ValueError, match="not in the data"):
        fit.plot_individual_fits(ids=[99])


def test_individual_fits_of_a_large_population_draw_the_first_panels_and_say_how_to_draw_others(fit):
    """Without ``units``/``ids`` the figure holds at most ``max_panels`` subjects (36 by default): a panel per subject
    of the 5000-subject benchmark population took ~170 s and drew a figure nobody can read.  A warning says so and
    how to choose others; naming the subjects, or ``max_panels=None``, draws what is asked without a warning."""
    import warnings

    ids = list(fit.model.data.ids)
    with pytest.warns(UserWarning, match=r"the first 5 of 12 subjects; choose others with ids= or units=") as seen:
        fig = fit.plot_individual_fits(max_panels=5)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [f"Id {i}" for i in ids[:5]]
    plt.close(fig)
    with pytest.warns(UserWarning, match=r"the first 5 of 12 subjects") as seen_too:
        plt.close(lf.plots.plot_individual_fits(fit, max_panels=5))
    assert [w.filename for w in (*seen, *seen_too)] == [__file__] * 2  # the user's line, whichever the call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs, drawn in (({"max_panels": None}, ids), ({"max_panels": 5, "ids": ids[6:]}, ids[6:]),
                              ({"max_panels": 5, "units": [7, 0]}, [ids[7], ids[0]]), ({}, ids)):
            fig = fit.plot_individual_fits(**kwargs)
            assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [f"Id {i}" for i in drawn], kwargs
            plt.close(fig)


def test_vpc_defaults_to_time_bins_and_prediction_correction(fit):
    fig = fit.plot_vpc(num_sims=100)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Time" and "prediction-corrected" in ax.get_ylabel()
    v = vpc_summary(fit, num_sims=100)
    assert v.bin_edges[-1] == pytest.approx(24.65, abs=1e-6) and v.bin_x.max() > 20  # time units
    median = _line(ax, "observed median")
    np.testing.assert_allclose(median.get_xdata(), v.bin_x)
    np.testing.assert_allclose(median.get_ydata(), v.observed[:, 1])
    plt.close(fig)
    raw = fit.plot_vpc(num_sims=100, pred_corrected=False, log=True)
    assert "prediction-corrected" not in raw.axes[0].get_ylabel() and raw.axes[0].get_yscale() == "log"
    plt.close(raw)


def test_a_pcvpc_corrects_each_bins_simulations_as_prediction_correct_does(fit):
    """The pcVPC corrects the simulations bin by bin (no corrected copy of all of them: ~200 MB at N = 5000, 9 -> 4
    s on that population here): the same summaries as :func:`prediction_correct` applied to every simulation."""
    from latentfit.inference.diagnostics import (
        _population_structural,
        default_bins,
        model_program,
        simulate_observations,
    )

    model, theta = fit.model, fit._theta()
    v = vpc_summary(fit, num_sims=60, seed=3)
    mask = model.data.mask & (model.data.cens == 0)
    xo, yo = model.data.x_values[mask], model.data.dv[mask]
    so = simulate_observations(model, theta, 60, 3)[:, mask]
    po = model.ops.to_numpy(model_program(model, _population_structural)(theta))[mask]
    edges = default_bins(xo, 10)
    which = np.clip(np.searchsorted(edges, xo, side="right") - 1, 0, len(edges) - 2)
    yc, sc = prediction_correct(yo, po, which), prediction_correct(so, po, which)
    np.testing.assert_array_equal(v.y, yc)
    for j, b in enumerate(np.unique(which)):
        sel = which == b
        np.testing.assert_array_equal(v.observed[j], np.quantile(yc[sel], v.quantiles))
        per_rep = np.quantile(sc[:, sel], v.quantiles, axis=1)
        np.testing.assert_array_equal(v.simulated[j, :, 1], np.median(per_rep, axis=1))


def test_a_large_vpc_simulates_in_chunks_of_replicates(fit, monkeypatch):
    """Beyond RESIDUAL_SIMULATION_BLOCK_VALUES simulated values the VPC simulates a chunk of replicates at a time
    (N = 5000 x 10, K = 500: peak memory +0.83 GB at once, growing with N): with the threshold lowered on
    theophylline, chunks of 7 replicates (the last shorter), each from the next key of the seed's stream, give the
    summaries of the same replicates binned at once (each replicate's quantiles do not depend on the chunks), and a
    VPC of the same model (its intervals within their Monte-Carlo error of the one-pass VPC's)."""
    from latentfit.inference import diagnostics
    from latentfit.inference.diagnostics import _population_structural, default_bins, model_program, simulation_chunks
    from latentfit.plots import _continuous_bins

    model, theta = fit.model, fit._theta()
    whole = vpc_summary(fit, num_sims=60, seed=3)
    np.testing.assert_array_equal(next(simulation_chunks(model, theta, 60, 3)),
                                  diagnostics.simulate_observations(model, theta, 60, 3))  # one chunk: the same
    monkeypatch.setattr(diagnostics, "RESIDUAL_SIMULATION_BLOCK_VALUES", 7 * 12 * 10)  # 7 replicates a chunk
    chunks = list(simulation_chunks(model, theta, 60, 3))
    assert [c.shape for c in chunks] == [(7, 12, 10)] * 8 + [(4, 12, 10)]
    assert not np.array_equal(chunks[0], chunks[1][:7])  # each chunk from its own key
    v = vpc_summary(fit, num_sims=60, seed=3)
    assert np.array_equal(v.observed, whole.observed) and not np.array_equal(v.simulated, whole.simulated)
    mask = model.data.mask & (model.data.cens == 0)
    xo = model.data.x_values[mask]
    po = model.ops.to_numpy(model_program(model, _population_structural)(theta))[mask]
    at_once = _continuous_bins(xo, model.data.dv[mask], np.concatenate(chunks)[:, mask], po, None, 10,
                               (0.05, 0.5, 0.95), 0.9)
    np.testing.assert_array_equal(v.simulated, at_once.simulated)
    np.testing.assert_array_equal(v.bin_edges, default_bins(xo, 10))
    # the same model's VPC: the simulated medians' medians agree with the one-pass VPC's to their spread
    spread = whole.simulated[:, :, 2] - whole.simulated[:, :, 0]
    assert np.all(np.abs(v.simulated[:, :, 1] - whole.simulated[:, :, 1]) < 0.5 * spread)


def test_prediction_correction_is_bergstrands_scaling():
    y = np.array([1.0, 2.0, 4.0, 3.0, 5.0])
    pred = np.array([2.0, 4.0, 1.0, 3.0, 6.0])
    which = np.array([0, 0, 1, 1, 1])
    med = np.array([np.median(pred[:2]), np.median(pred[2:])])  # PRED_bin
    np.testing.assert_allclose(prediction_correct(y, pred, which), y * med[which] / pred)
    sims = np.arange(10.0).reshape(2, 5) + 1.0  # replicates are scaled by the same factors
    np.testing.assert_allclose(prediction_correct(sims, pred, which), sims * (med[which] / pred))
    lb = 0.5
    np.testing.assert_allclose(prediction_correct(y, pred, which, lower_bound=lb),
                               lb + (y - lb) * (med[which] - lb) / (pred - lb))
    zero = prediction_correct(y, np.array([0.0, 4.0, 1.0, 3.0, 6.0]), which)
    assert zero[0] == y[0]  # no prediction (before absorption): left as observed


def test_vpc_summary_corrects_observations_with_the_population_predictions(fit):
    model = fit.model
    data = model.data
    v_raw = vpc_summary(fit, num_sims=50, pred_corrected=False)
    v_pc = vpc_summary(fit, num_sims=50)
    np.testing.assert_allclose(v_raw.y, data.dv[data.mask])
    pred = model.ops.to_numpy(model.structural_prediction(fit._theta(), model.prior_moments(fit._theta())[0]))
    edges = v_pc.bin_edges
    which = np.clip(np.searchsorted(edges, data.time[data.mask], side="right") - 1, 0, len(edges) - 2)
    p = pred[data.mask]
    med = np.array([np.median(p[which == b]) if (which == b).any() else np.nan for b in range(len(edges) - 1)])
    np.testing.assert_allclose(v_pc.y, data.dv[data.mask] * med[which] / p)


def test_gof_has_the_six_saemix_panels(fit):
    fig = fit.plot_gof()
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert labels == [("PRED", "DV"), ("IPRED", "DV"), ("Time", "IWRES"), ("IPRED", "IWRES"), ("Time", "NPDE"),
                      ("PRED", "NPDE")]
    identity = fig.axes[1].lines[0]
    assert np.allclose(identity.get_xdata(), identity.get_ydata())
    times = np.asarray(fig.axes[2].collections[0].get_offsets())[:, 0]
    assert times.max() == pytest.approx(24.65)
    plt.close(fig)


def test_multiple_doses_and_infusions_are_marked_and_boluses_jump():
    rows = []
    for i in range(1, 7):
        for td in (0.0, 12.0):
            rows.append(dict(ID=i, TIME=td, DV=np.nan, AMT=100.0, EVID=1, MDV=1, RATE=50.0 if i % 2 else 0.0))
        rows += [dict(ID=i, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, RATE=0.0) for t in (0.5, 1, 3, 6, 11.5, 13, 15, 24)]
    model = nlme.NLME("one_compartment_infusion", {"V": 10.0, "CL": 1.0}, error="proportional",
                      data=pd.DataFrame(rows))
    sim = model.simulate({"V": 10.0, "CL": 1.0, "omega2_V": 0.05, "omega2_CL": 0.05, "b": 0.1}, seed=1)
    fit = model.fit(sim, seed=0, num_iters=(30, 10), progress=False)
    fig = fit.plot_individual_fits(ncols=3)
    infused, bolus = fig.axes[0], fig.axes[1]  # ID 1: two 2-h infusions; ID 2: two boluses
    assert len(infused.patches) == 2 and len(bolus.patches) == 0
    assert list(_line(bolus, "dose").get_xdata()) == [0.0, 12.0]
    t, c = (np.asarray(a) for a in (_line(bolus, "IPRED").get_xdata(), _line(bolus, "IPRED").get_ydata()))
    after, before = np.flatnonzero(t == 12.0)[0], np.flatnonzero(t < 12.0)[-1]
    assert 12.0 - t[before] < 1e-9 and c[after] - c[before] > 5.0  # a vertical jump at the second bolus
    plt.close(fig)


def test_dose_response_data_are_drawn_against_their_x_variable():
    doses = [0.0, 10.0, 25.0, 50.0, 100.0, 200.0]
    design = pd.DataFrame({"subject": np.repeat(np.arange(1, 9), 6), "dose": np.tile(doses, 8), "response": 0.0})
    model = nlme.NLME("emax", {"E0": 5.0, "Emax": 20.0, "EC50": 30.0}, data=design,
                      columns={"id": "subject", "dv": "response"}, x="dose")
    truth = {"E0": 5.0, "Emax": 20.0, "EC50": 30.0, "omega2_E0": 0.04, "omega2_Emax": 0.09, "omega2_EC50": 0.16,
             "a": 1.0}
    fit = model.fit(model.simulate(truth, seed=1), seed=0, num_iters=(30, 10), progress=False)
    fig = fit.plot_individual_fits(ids=[2])
    ax = fig.axes[0]
    assert ax.get_title() == "subject 2" and ax.get_xlabel() == "dose"
    x = np.asarray(_line(ax, "IPRED").get_xdata())
    assert len(x) >= 100 and x.min() == 0.0 and x.max() == 200.0
    plt.close(fig)
    vpc = fit.plot_vpc(num_sims=50)
    assert vpc.axes[0].get_xlabel() == "dose"
    plt.close(vpc)


# ----- several responses and occasions: smooth curves on the fine grid too (user audit) -------------------------
P = nlme.Parameter
PKPD_PARAMS = {"ka": P(1.0, omega2=0.3), "V": P(10.0, omega2=0.3), "CL": P(0.5, omega2=0.3),
               "ke0": P(0.1, random=False), "E0": P(100.0, omega2=0.1), "Imax": P(0.8, transform="logit", random=False),
               "IC50": P(3.0, omega2=0.3)}
PKPD_TRUTH = {"ka": 1.0, "V": 10.0, "CL": 0.5, "ke0": 0.1, "E0": 100.0, "Imax": 0.8, "IC50": 3.0, "omega2_ka": 0.2,
              "omega2_V": 0.05, "omega2_CL": 0.1, "omega2_E0": 0.01, "omega2_IC50": 0.1, "b_conc": 0.1,
              "a_effect": 3.0}
CONC_TIMES, EFFECT_TIMES = (0.5, 1, 2, 4, 8, 24), (2, 6, 12, 24, 48, 72)
IOV_TRUTH = {"ka": 1.0, "V": 20.0, "CL": 2.0, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.1, "gamma2_CL": 0.3,
             "a": 0.1}


def _divided(lam, mu, t):
    return (np.exp(-lam * t) - np.exp(-mu * t)) / (mu - lam)


def _pkpd(t, dose, p):
    """Concentration and effect of ``oral_effect_imax`` (one oral dose at 0) in numpy, from its closed form."""
    k = p["CL"] / p["V"]
    conc = dose * p["ka"] / p["V"] * _divided(k, p["ka"], t)
    ce = (dose * p["ka"] * p["ke0"] / p["V"] * (_divided(k, p["ke0"], t) - _divided(p["ka"], p["ke0"], t))
          / (p["ka"] - k))
    return conc, p["E0"] * (1.0 - p["Imax"] * ce / (p["IC50"] + ce))


@pytest.fixture(scope="module")
def pkpd_fit():
    rows = []
    for i in range(1, 7):
        rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, DVID=1))
        rows += [dict(ID=i, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, DVID=1) for t in CONC_TIMES]
        rows += [dict(ID=i, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, DVID=2) for t in EFFECT_TIMES]
    table = pd.DataFrame(rows).sort_values(["ID", "TIME"], kind="stable")
    model = nlme.NLME("oral_effect_imax", dict(PKPD_PARAMS), error={"conc": "proportional", "effect": "constant"})
    data = model.bind(table).simulate(PKPD_TRUTH, seed=1)
    yield model.fit(data, seed=1, num_iters=(8, 2), progress=False)
    plt.close("all")


def test_each_response_of_a_pkpd_model_gets_smooth_curves_from_the_dose(pkpd_fit):
    """PK/PD (DVID): a panel per subject and response, IPRED and PRED of that response on the fine grid from the dose
    to the response's last observation, equal to the closed form at the EBEs (and at the population values); the
    concentration curve shows the absorption peak between two samples (the audit's curves were straight segments
    between the observations, from the first observation, whatever ``num_points``)."""
    fig = pkpd_fit.plot_individual_fits(ids=[1, 2])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["ID 1 · conc", "ID 1 · effect", "ID 2 · conc", "ID 2 · effect"]
    assert [ax.get_ylabel() for ax in axes] == ["conc", "effect"] * 2
    modes = pkpd_fit.individual_parameters()
    pop = {k: float(v) for k, v in pkpd_fit.params.items()}
    for k, unit in enumerate((0, 1)):
        ebe = {nm: float(modes[f"{nm}.mode"].iloc[unit]) for nm in PKPD_PARAMS}
        for r, (ax, times) in enumerate(zip(axes[2 * k:2 * k + 2], (CONC_TIMES, EFFECT_TIMES), strict=True)):
            ipred, pred = _line(ax, "IPRED"), _line(ax, "PRED")
            t = np.asarray(ipred.get_xdata())
            assert len(t) >= 150 and t[0] == 0.0 and t[-1] == times[-1] and np.all(np.diff(t) > 0)
            assert set(times) <= set(t.tolist())
            np.testing.assert_allclose(ipred.get_ydata(), _pkpd(t, 100.0, ebe)[r], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(pred.get_ydata(), _pkpd(t, 100.0, pop)[r], rtol=1e-10, atol=1e-10)
            assert sorted(ax.collections[0].get_offsets()[:, 0]) == list(times)  # this response's observations
        conc = np.asarray(_line(axes[2 * k], "IPRED").get_ydata())
        at_samples = _pkpd(np.asarray(CONC_TIMES, float), 100.0, ebe)[0]
        t_max = np.log(ebe["ka"] * ebe["V"] / ebe["CL"]) / (ebe["ka"] - ebe["CL"] / ebe["V"])
        assert t_max not in CONC_TIMES and conc.max() > at_samples.max() * (1 + 1e-6)  # the peak between samples
        assert abs(_pkpd(np.array([t_max]), 100.0, ebe)[0][0] - conc.max()) < 1e-3 * conc.max()
    plt.close(fig)
    fig = pkpd_fit.plot_individual_fits(ids=[1], num_points=400)
    assert all(len(_line(ax, "IPRED").get_xdata()) >= 400 for ax in fig.axes if ax.get_visible())
    plt.close(fig)


def _iov_fit(crossover: bool):
    rows = []
    for i in range(1, 7):
        if crossover:  # the time restarts at each occasion (a reset, EVID 4)
            for occ in (1, 2):
                rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1 if occ == 1 else 4, MDV=1, OCC=occ))
                rows += [dict(ID=i, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, OCC=occ) for t in (0.5, 1, 2, 4, 8, 12)]
        else:  # the second dose at 12 h, drug of the first carried into occasion 2
            rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, OCC=1))
            rows += [dict(ID=i, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, OCC=1) for t in (0.5, 1, 2, 4, 8)]
            rows.append(dict(ID=i, TIME=12.0, DV=np.nan, AMT=100.0, EVID=1, MDV=1, OCC=2))
            rows += [dict(ID=i, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, OCC=2) for t in (12.5, 13, 14, 16, 20, 24)]
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 2.0}, iov=["CL"])
    data = model.bind(pd.DataFrame(rows)).simulate(IOV_TRUTH, seed=1)
    return model.fit(data, seed=1, num_iters=(8, 2), progress=False)


def _occasion_parameters(fit, unit: int) -> list[dict[str, float]]:
    """ka, V and CL of each occasion of ``unit`` at the EBEs (CL with that occasion's κ)."""
    modes, kappa = fit.individual_parameters(), fit.individual_estimates().to_frame()
    base = {nm: float(modes[f"{nm}.mode"].iloc[unit]) for nm in ("ka", "V", "CL")}
    return [dict(base, CL=base["CL"] * np.exp(float(kappa[f"kappa_CL[{k}].mode"].iloc[unit]))) for k in (0, 1)]


def test_occasions_of_a_crossover_get_a_panel_each_with_their_own_kappa():
    """IOV, cross-over (time restarting at 0 with EVID 4): the occasions would overlap on one time axis, so each gets
    its own panel (one y-scale per subject), its colour and legend entry; its IPRED is the closed form at that
    occasion's κ (EBE), its PRED the population curve, on the fine grid from the occasion's dose."""
    fit = _iov_fit(crossover=True)
    fig = fit.plot_individual_fits(ids=[1, 2])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["ID 1 · OCC 1", "ID 1 · OCC 2", "ID 2 · OCC 1", "ID 2 · OCC 2"]
    pop = {k: float(fit.params[k]) for k in ("ka", "V", "CL")}
    for unit in (0, 1):
        per_occ = _occasion_parameters(fit, unit)
        assert abs(np.log(per_occ[0]["CL"] / per_occ[1]["CL"])) > 1e-3  # the occasions' κ differ
        pair = axes[2 * unit:2 * unit + 2]
        colours = []
        for k, ax in enumerate(pair):
            ipred = [ln for ln in ax.get_lines() if ln.get_label().startswith("IPRED")]
            assert [ln.get_label() for ln in ipred] == [f"IPRED · OCC {k + 1}"]
            t = np.asarray(ipred[0].get_xdata())
            assert len(t) >= 150 and t[0] == 0.0 and t[-1] == 12.0
            p = per_occ[k]
            np.testing.assert_allclose(ipred[0].get_ydata(), _oral(t, 100.0, p["ka"], p["V"], p["CL"]), rtol=1e-10,
                                       atol=1e-10)
            pred = _line(ax, f"PRED · OCC {k + 1}")
            np.testing.assert_allclose(pred.get_ydata(), _oral(t, 100.0, pop["ka"], pop["V"], pop["CL"]), rtol=1e-10,
                                       atol=1e-10)
            colours.append(ipred[0].get_color())
        assert colours[0] != colours[1] and pair[0].get_ylim() == pair[1].get_ylim()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:4] == ["IPRED · OCC 1", "PRED · OCC 1", "IPRED · OCC 2", "PRED · OCC 2"]
    plt.close(fig)


def test_occasions_that_follow_in_time_share_a_panel_and_meet_at_the_boundary():
    """IOV with a second dose at 12 h and no reset: one panel per subject, occasion 1's curve from the dose to just
    before occasion 2 starts (not stopping at its last sample), occasion 2's from its start; occasion 2 carries the
    drug of the first dose under its own κ (the closed form of the chained one-compartment model)."""
    fit = _iov_fit(crossover=False)
    fig = fit.plot_individual_fits(ids=[1, 2])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["ID 1", "ID 2"]
    for unit, ax in enumerate(axes):
        (p1, p2), dose = _occasion_parameters(fit, unit), 100.0
        first, second = _line(ax, "IPRED · OCC 1"), _line(ax, "IPRED · OCC 2")
        t1, c1 = (np.asarray(a) for a in (first.get_xdata(), first.get_ydata()))
        t2, c2 = (np.asarray(a) for a in (second.get_xdata(), second.get_ydata()))
        assert t1[0] == 0.0 and 12.0 - 1e-9 < t1[-1] < 12.0 and t2[0] == 12.0 and t2[-1] == 24.0
        assert len(t1) >= 150 and len(t2) >= 150 and first.get_color() != second.get_color()
        np.testing.assert_allclose(c1, _oral(t1, dose, p1["ka"], p1["V"], p1["CL"]), rtol=1e-10, atol=1e-10)
        ka, v, k2, s = p2["ka"], p2["V"], p2["CL"] / p2["V"], t2 - 12.0
        depot, central = dose * np.exp(-ka * 12.0), v * _oral(np.array([12.0]), dose, ka, p1["V"], p1["CL"])[0]
        want = (central * np.exp(-k2 * s) + (depot + dose) * ka / (ka - k2) * (np.exp(-k2 * s) - np.exp(-ka * s))) / v
        np.testing.assert_allclose(c2, want, rtol=1e-10, atol=1e-10)
    plt.close(fig)


def test_periods_that_restart_the_time_are_drawn_apart_with_their_own_doses():
    """No IOV, a reset (EVID 4) restarting the time with another dose: each period's curve from its own dose (the
    grid read the periods from the time alone, so one curve, the second period's, was drawn over both)."""
    rows = []
    for i in range(1, 5):
        for per, amt in ((1, 100.0), (2, 50.0)):
            rows.append(dict(ID=i, TIME=0.0, DV=np.nan, AMT=amt, EVID=1 if per == 1 else 4, MDV=1))
            rows += [dict(ID=i, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0) for t in (0.5, 1, 2, 4, 8, 12)]
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 2.0})
    data = model.bind(pd.DataFrame(rows)).simulate({k: v for k, v in IOV_TRUTH.items() if k != "gamma2_CL"}, seed=1)
    fit = model.fit(data, seed=1, num_iters=(8, 2), progress=False)
    fig = fit.plot_individual_fits(ids=[2])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["ID 2 · period 1", "ID 2 · period 2"]
    modes = fit.individual_parameters()
    for ax, dose in zip(axes, (100.0, 50.0), strict=True):
        ipred = _line(ax, "IPRED")
        t = np.asarray(ipred.get_xdata())
        assert len(t) >= 150 and t[0] == 0.0 and t[-1] == 12.0
        want = _oral(t, dose, modes["ka.mode"].iloc[1], modes["V.mode"].iloc[1], modes["CL.mode"].iloc[1])
        np.testing.assert_allclose(ipred.get_ydata(), want, rtol=1e-10, atol=1e-10)
    plt.close(fig)
