"""Post-fit tables and goodness-of-fit figures of a model with several responses (joint PK/PD): the residual table
carries the data's response column (DVID, or the name the data use, YTYPE) and the GOF, observed-vs-predicted and
residual figures have a row of panels per response, titled with its name."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from latentfit.models import nlme  # noqa: E402
from latentfit.models.nlme.responses import oral_effect_imax  # noqa: E402
from latentfit.report import residuals_table  # noqa: E402

P = nlme.Parameter
PARAMS = {"ka": P(1.0, omega2=0.3), "V": P(10.0, omega2=0.3), "CL": P(0.5, omega2=0.3), "ke0": P(0.1, random=False),
          "E0": P(100.0, omega2=0.1), "Imax": P(0.8, transform="logit", random=False), "IC50": P(3.0, omega2=0.3)}
TRUTH = {"ka": 1.0, "V": 10.0, "CL": 0.5, "ke0": 0.1, "E0": 100.0, "Imax": 0.8, "IC50": 3.0, "omega2_ka": 0.2,
         "omega2_V": 0.05, "omega2_CL": 0.1, "omega2_E0": 0.01, "omega2_IC50": 0.1, "b_conc": 0.1, "a_effect": 3.0}
ERRORS = {"conc": "proportional", "effect": "constant"}
CONC_T, EFFECT_T = (0.5, 1, 2, 4, 8, 24), (2, 6, 12, 24, 48, 72)  # both at 24: the column tells them apart


def _design(num_ids: int, column: str, values: tuple) -> pd.DataFrame:
    ids = np.arange(1, num_ids + 1)
    parts = [pd.DataFrame({"ID": ids, "TIME": 0.0, "DV": np.nan, "AMT": 100.0, "EVID": 1, "MDV": 1,
                           column: values[0]})]
    for times, value in ((CONC_T, values[0]), (EFFECT_T, values[1])):
        parts.append(pd.DataFrame({"ID": np.repeat(ids, len(times)), "TIME": np.tile(np.asarray(times, float), num_ids),
                                   "DV": 0.0, "AMT": 0.0, "EVID": 0, "MDV": 0, column: value}))
    return pd.concat(parts).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False],
                                        kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module", params=[("DVID", (1, 2)), ("YTYPE", (5, 7))], ids=["DVID", "YTYPE"])
def joint_fit(request):
    column, values = request.param
    model = nlme.NLME(oral_effect_imax(), dict(PARAMS), error=dict(ERRORS), data=_design(8, column, values))
    data = model.simulate(dict(TRUTH), seed=1)
    fit = nlme.NLME(oral_effect_imax(), dict(PARAMS), error=dict(ERRORS), data=data).fit(
        seed=0, num_iters=(8, 2), progress=False)
    return fit, data, column, values


def test_residual_tables_carry_the_response_column(joint_fit):
    fit, data, column, values = joint_fit
    frame = fit.residuals(num_sims=50).to_frame()
    assert list(frame.columns[:5]) == ["ID", "unit", "obs", "TIME", column]
    obs = data[data["EVID"] == 0]
    # row by row the data's response value at that ID and time (the table is in the data's order per individual)
    merged = frame.merge(obs[["ID", "TIME", column, "DV"]], on=["ID", "TIME", column], suffixes=("", "_data"))
    assert len(merged) == len(frame) == len(obs)
    np.testing.assert_allclose(merged["DV"], merged["DV_data"], rtol=1e-12)
    at24 = frame[frame["TIME"] == 24.0]
    assert sorted(at24[column].unique().tolist()) == list(values) and len(at24) == 2 * 8
    assert frame[column].dtype.kind == "i"
    # the effect rows are the large values (E0 100), the concentration rows the small ones
    assert frame.loc[frame[column] == values[1], "DV"].min() > frame.loc[frame[column] == values[0], "DV"].max()
    # the CLI's residuals.csv: ID, TIME, the response column, then DV and the residuals
    table = residuals_table(fit)
    assert list(table.columns[:4]) == ["ID", "TIME", column, "DV"]
    assert (table[column].to_numpy() == frame[column].to_numpy()).all()


def test_gof_figures_have_a_row_per_response(joint_fit, tmp_path):
    fit = joint_fit[0]
    fig = fit.plot_gof()
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 12
    assert titles[:6] == ["conc · DV vs PRED", "conc · DV vs IPRED", "conc · IWRES vs TIME", "conc · IWRES vs IPRED",
                          "conc · NPDE vs TIME", "conc · NPDE vs PRED"]
    assert titles[6:] == [t.replace("conc", "effect") for t in titles[:6]]
    # each panel holds its response's observations only: 8 subjects × 6 times
    for ax in fig.axes:
        assert len(ax.collections[0].get_offsets()) == 48
    dv_conc = fig.axes[0].collections[0].get_offsets()[:, 1]
    dv_effect = fig.axes[6].collections[0].get_offsets()[:, 1]
    assert dv_effect.min() > dv_conc.max()
    fig.savefig(tmp_path / "gof.png")
    plt.close(fig)
    fig = fit.plot_observations_vs_predictions()
    assert [ax.get_title() for ax in fig.axes] == ["conc · DV vs PRED", "conc · DV vs IPRED", "effect · DV vs PRED",
                                                   "effect · DV vs IPRED"]
    plt.close(fig)
    fig = fit.plot_residuals()
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 8 and titles[3] == "conc · NPDE QQ plot" and titles[7] == "effect · NPDE QQ plot"
    assert all(t.startswith("conc · ") for t in titles[:4]) and all(t.startswith("effect · ") for t in titles[4:])
    plt.close(fig)


def test_single_response_tables_and_figures_unchanged():
    df = _design(6, "DVID", (1, 2))
    df = df[(df["DVID"] == 1)].drop(columns="DVID")
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 10.0, "CL": 0.5}, data=df, error="proportional")
    data = model.simulate({"ka": 1.0, "V": 10.0, "CL": 0.5, "b": 0.1}, seed=0)
    fit = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 10.0, "CL": 0.5}, data=data,
                    error="proportional").fit(seed=0, num_iters=(8, 2), progress=False)
    assert list(fit.residuals(num_sims=50).to_frame().columns[:5]) == ["ID", "unit", "obs", "TIME", "DV"]
    fig = fit.plot_gof()
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "DV vs PRED"
    plt.close(fig)
    assert len(fit.plot_residuals().axes) == 4 and len(fit.plot_observations_vs_predictions().axes) == 2
    plt.close("all")
