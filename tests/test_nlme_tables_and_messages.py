"""What a saemix user met in an audit of the NLME API (issue 14, item 0): the post-fit tables are indexed by the
subjects' IDs (not 0-based units), a table whose records of a subject go back in time is read in time order with a
warning naming the rows (NONMEM stops; a decreasing time is often a typing error), a fixed parameter has no standard
error (NaN, not 0: "perfectly estimated"), and an initial error parameter the error model has not is named (it was
ignored without a word)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from latentfit.models import nlme

DATA = Path(__file__).resolve().parents[1] / "examples" / "theophylline.csv"
INIT = {"ka": 1.5, "V": 30.0, "CL": 2.7}
ITERS = dict(num_iters=(10, 5), seed=0, progress=False)


def _theo() -> pd.DataFrame:
    return pd.read_csv(DATA, na_values=["."])


@pytest.fixture(scope="module")
def fit():
    df = _theo()
    df["ID"] = df["ID"] * 10 + 100  # IDs 110, 120, ...: not the units' 0-based positions
    return nlme.NLME("one_compartment_oral", INIT).fit(df, **ITERS)


def test_post_fit_tables_are_indexed_by_the_subjects_ids(fit):
    ids = [110 + 10 * k for k in range(12)]
    psi = fit.individual_parameters()
    assert psi.index.name == "ID" and list(psi.index) == ids
    est = fit.individual_estimates().to_frame()
    assert est.index.name == "ID" and list(est.index) == ids
    res = fit.residuals().to_frame()
    assert list(res.columns[:4]) == ["ID", "unit", "obs", "TIME"]
    obs = _theo().query("EVID == 0")
    np.testing.assert_array_equal(res["ID"].to_numpy(dtype=float), obs["ID"].to_numpy() * 10 + 100)
    np.testing.assert_array_equal(res["TIME"].to_numpy(), obs["TIME"].to_numpy())
    np.testing.assert_array_equal(res["DV"].to_numpy(), obs["DV"].to_numpy())
    # an explicit x still gives the "x" column
    assert "x" in fit.residuals().to_frame(x=fit.model.data.x_values).columns


def _order_warnings(df: pd.DataFrame) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nlme.NLME("one_compartment_oral", INIT, data=df)
    return [str(w.message) for w in caught if "not in time order" in str(w.message)]


def test_records_going_back_in_time_are_read_in_time_order_with_a_warning():
    df = _theo()
    bad = df.copy()
    bad.loc[5, "TIME"] = 0.1  # ID 1: 0.1 h after the record at 2.02 h
    msgs = _order_warnings(bad)
    assert msgs == ["the observation records of ID 1 are not in time order: row 5 has TIME 0.1 after 2.02 at row 4; "
                    "they are read in time order (NONMEM would stop: check the time, or sort the table by ID and "
                    "time)"]
    # read in time order: the same model as the sorted table
    with pytest.warns(UserWarning, match="not in time order"):
        a = nlme.NLME("one_compartment_oral", INIT, data=bad)
    b = nlme.NLME("one_compartment_oral", INIT, data=bad.sort_values(["ID", "TIME"], kind="stable"))
    np.testing.assert_array_equal(a.data.x_values, b.data.x_values)
    # an observation row appended at the end of the table, earlier than the subject's last observation
    late = pd.concat([df, df.iloc[[3]].assign(TIME=12.0)], ignore_index=True)
    assert len(_order_warnings(late)) == 1 and "row 132 has TIME 12.0 after 24.37 at row 10" in _order_warnings(late)[0]
    # no warning: the usual table; the dose rows, then the observation rows (as pandas concatenates them: each kind in
    # time order, e.g. doses at 0 and 12 before the observations); a reset (EVID 3) that restarts the time
    assert _order_warnings(df) == []
    doses, observations = df[df["EVID"] == 1], df[df["EVID"] == 0]
    assert _order_warnings(pd.concat([doses, observations], ignore_index=True)) == []
    second = doses.assign(TIME=12.0)
    assert _order_warnings(pd.concat([doses, second, observations], ignore_index=True)) == []
    one = df[df["ID"] == 1]
    reset = pd.concat([one, one.iloc[[0]].assign(EVID=3, AMT=0.0), one.assign(TIME=one["TIME"])], ignore_index=True)
    reset.loc[len(one), "TIME"] = 0.0
    assert _order_warnings(pd.concat([reset, df[df["ID"] == 2]], ignore_index=True)) == []


def test_a_fixed_parameter_has_no_standard_error(fit):
    df = _theo()
    fixed = nlme.NLME("one_compartment_oral", {**INIT, "ka": nlme.Parameter(1.5, fixed=True)}).fit(df, **ITERS)
    for method in ("lin", "sa"):
        table = fixed.summary(method=method)
        assert np.isnan(table.loc["ka", "se"]) and np.isnan(table.loc["ka", "rse%"]), method
        assert np.isfinite(table.drop(index="ka")["se"]).all() and (table.drop(index="ka")["se"] > 0).all()
    assert np.isnan(fixed.standard_errors()["ka"])


def test_an_initial_error_parameter_the_error_model_has_not_is_named():
    with pytest.warns(UserWarning, match=r"error_init gives \['b'\], which the 'constant' error model has not \(its "
                                         r"parameters: \['a'\]; .*\): ignored"):
        nlme.NLME("one_compartment_oral", INIT, error_init={"b": 0.2})
    with pytest.warns(UserWarning, match=r"error_init gives \['a'\], which the 'proportional'"):
        nlme.NLME("one_compartment_oral", INIT, error="proportional", error_init={"a": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nlme.NLME("one_compartment_oral", INIT, error="combined", error_init={"a": 0.5, "b": 0.2},
                          data=_theo())
    assert float(model.init_params()["b"]) == 0.2


def test_an_mdv_0_observation_without_a_value_is_named():
    df = _theo()
    df.loc[3, "DV"] = np.nan  # ID 1's third sample: '.' in the file, MDV still 0
    with pytest.warns(UserWarning, match=r"1 observation record\(s\) with MDV = 0 have no 'DV' value \('\.' or empty; "
                                         r"first: ID 1, row 3\): read as missing \(set MDV = 1 on them to say so\)"):
        model = nlme.NLME("one_compartment_oral", INIT, data=df)
    assert model.num_obs == 119
    with warnings.catch_warnings():  # MDV = 1 says so: no warning; no MDV column: NaN is missing, as always
        warnings.simplefilter("error")
        nlme.NLME("one_compartment_oral", INIT, data=df.assign(MDV=np.where(df["DV"].isna(), 1, 0)))
        nlme.NLME("one_compartment_oral", INIT, data=df.drop(columns="MDV"))
