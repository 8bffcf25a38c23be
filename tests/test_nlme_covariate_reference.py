"""Covariate references (issue 14, items 0 and 7): a covariate centred at the data's mean (``"center"``,
``"log-center"``) or categorical keeps the centre and the levels of the data the model was first bound to (or the
user's ``covariate_reference=``) when the model is bound to another table: a design simulated at a fit's estimates
is centred as the fitted data were.  Before, each binding recomputed the mean, so designs of 50 kg and 100 kg
subjects simulated the same concentrations.  The command line writes the references (``covariates.csv``) and its
``simulate`` / ``vpc`` apply them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from latentfit import DataError, ModelSpecificationError  # noqa: E402
from latentfit.cli import main  # noqa: E402
from latentfit.models import nlme  # noqa: E402
from latentfit.models.nlme.config import ConfigError, parse_config, read_covariate_reference  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "theophylline.csv"
INIT = {"ka": 1.5, "V": 30.0, "CL": 2.7}


def _theo() -> pd.DataFrame:
    return pd.read_csv(DATA, na_values=["."])


def _mean_weight(df: pd.DataFrame) -> float:
    return float(df.groupby("ID")["WT"].first().mean())


def _column(model: nlme.NLME, name: str) -> np.ndarray:
    return np.asarray(next(e.column for e in model.effects if e.name == name), dtype=float)


@pytest.mark.parametrize("transform", ["log-center", "center"])
def test_a_design_keeps_the_fitted_datas_centre(transform):
    df = _theo()
    model = nlme.NLME("one_compartment_oral", INIT, covariates={"V": {"WT": transform}}, data=df)
    centre = _mean_weight(df)
    assert model.covariate_reference == {"WT": pytest.approx(centre, rel=1e-15)}
    light, heavy = model.bind(df.assign(WT=50.0)), model.bind(df.assign(WT=100.0))
    form = (lambda w: np.log(w / centre)) if transform == "log-center" else (lambda w: w - centre)
    for bound, weight in ((light, 50.0), (heavy, 100.0)):
        assert bound.covariate_reference == model.covariate_reference
        np.testing.assert_allclose(_column(bound, "beta_V_WT"), form(weight), rtol=1e-14)
    # the simulated concentrations differ as V does (same seed: the same random effects and residuals)
    theta = {k: np.asarray(model.ops.to_numpy(v)) for k, v in model.init_params().items()}
    theta["beta_V_WT"] = 1.0 if transform == "log-center" else 0.02
    a, b = light.simulate(theta, seed=1), heavy.simulate(theta, seed=1)
    obs = a["EVID"] == 0
    assert not np.allclose(a.loc[obs, "DV"], b.loc[obs, "DV"])
    # a model bound to the design alone centres at the design's mean (no fit to take it from): 0 for everyone
    alone = nlme.NLME("one_compartment_oral", INIT, covariates={"V": {"WT": transform}}, data=df.assign(WT=50.0))
    np.testing.assert_allclose(_column(alone, "beta_V_WT"), 0.0, atol=1e-15)


def test_a_given_reference_is_used_and_kept():
    df = _theo()
    model = nlme.NLME("one_compartment_oral", INIT, covariates={"V": {"WT": "log-center"}, "CL": {"WT": "center"}},
                      covariate_reference={"WT": 70}, data=df)
    weights = df.groupby("ID")["WT"].first().to_numpy()
    np.testing.assert_allclose(_column(model, "beta_V_WT"), np.log(weights / 70.0), rtol=1e-14)
    np.testing.assert_allclose(_column(model, "beta_CL_WT"), weights - 70.0, rtol=1e-14)
    assert model.covariate_reference == {"WT": 70.0}
    # fit(df) of an unbound model: the reference given, not the data's mean
    fit = nlme.NLME("one_compartment_oral", INIT, covariates={"V": {"WT": "log-center"}},
                    covariate_reference={"WT": 70}).fit(df, num_iters=(6, 2), seed=0, progress=False)
    assert fit.model.covariate_reference == {"WT": 70.0}


def test_categorical_levels_are_kept_for_a_design_of_one_level():
    df = _theo()
    df["SEX"] = np.where(df["ID"] % 3 == 0, "F", "M")
    model = nlme.NLME("one_compartment_oral", INIT, covariates={"CL": {"SEX": "categorical"}}, data=df)
    assert model.covariate_reference == {"SEX": ("F", "M")}
    males = model.bind(df.assign(SEX="M"))  # one level: refused before (no reference level in the design)
    np.testing.assert_array_equal(_column(males, "beta_CL_SEX_M"), 1.0)
    with pytest.raises(DataError, match=r"'SEX' has level\(s\) \['X'\] that the model's levels \['F', 'M'\]"):
        model.bind(df.assign(SEX="X"))
    # the reference level given: M, so F has the coefficient; numbers and text of a number are one level
    given = nlme.NLME("one_compartment_oral", INIT, covariates={"CL": {"SEX": "categorical"}},
                      covariate_reference={"SEX": ["M", "F"]}, data=df)
    np.testing.assert_array_equal(_column(given, "beta_CL_SEX_F"), (df.groupby("ID")["SEX"].first() == "F"))
    coded = df.assign(SEX=np.where(df["SEX"] == "F", 1.0, 0.0))
    by_text = nlme.NLME("one_compartment_oral", INIT, covariates={"CL": {"SEX": "categorical"}},
                        covariate_reference={"SEX": ["0", "1"]}, data=coded.assign(SEX=1.0))
    np.testing.assert_array_equal(_column(by_text, "beta_CL_SEX_1"), 1.0)


@pytest.mark.parametrize("reference, message", [
    ({"AGE": 40}, r"'AGE' is not a covariate of the model \(\['WT'\]\)"),
    ({"WT": "heavy"}, r"'WT' needs a number"),
    ({"WT": 0.0}, r"'WT' must be centred at a finite positive value"),
    ({"WT": ["a"]}, r"at least two distinct values"),
])
def test_bad_references_are_refused(reference, message):
    with pytest.raises(ModelSpecificationError, match=message):
        nlme.NLME("one_compartment_oral", INIT, covariates={"V": {"WT": "log-center"}}, covariate_reference=reference)


MODEL = ('[model]\nstructural = "oral1cpt"\n[parameters]\nka = 1.5\nV = 30.0\nCL = 2.7\n'
         '[covariates.V]\nWT = { transform = "log-center" }\n[error]\nmodel = "constant"\na = 0.7\n'
         '[engine]\niterations = [12, 4]\n[report]\nvpc_simulations = 20\n')


def test_the_command_line_writes_the_references_and_simulates_designs_with_them(tmp_path, capsys):
    (tmp_path / "m.toml").write_text(MODEL)
    out = tmp_path / "fit"
    assert main(["nlme", "fit", str(tmp_path / "m.toml"), str(DATA), "--out", str(out), "--no-progress"]) == 0
    refs = pd.read_csv(out / "covariates.csv")
    assert list(refs.columns) == ["covariate", "kind", "value"] and refs["covariate"].tolist() == ["WT"]
    assert refs["kind"].tolist() == ["center"] and refs["value"].iloc[0] == _mean_weight(_theo())  # exact repr
    assert "WT centred at 69.5833 (log(WT / 69.5833))" in (out / "report.html").read_text(encoding="utf-8")
    est = pd.read_csv(out / "estimates.csv").set_index("parameter")["estimate"]
    sims = {}
    for weight in (50.0, 100.0):
        design = _theo().drop(columns="DV").assign(WT=weight)
        design.to_csv(tmp_path / f"d{weight:g}.csv", index=False)
        path = tmp_path / f"s{weight:g}.csv"
        assert main(["nlme", "simulate", str(tmp_path / "m.toml"), "--from", str(out), "--design",
                     str(tmp_path / f"d{weight:g}.csv"), "--out", str(path), "--seed", "4"]) == 0
        sims[weight] = pd.read_csv(path, na_values=["."])
        # the library's simulation of the design by the fitted model (its centre kept)
        fitted = nlme.NLME("one_compartment_oral", INIT, covariates={"V": {"WT": "log-center"}}, error_init={"a": 0.7},
                           data=_theo())
        ref = fitted.bind(_theo().assign(WT=weight)).simulate({k: est[k] for k in fitted.params}, seed=4)
        np.testing.assert_array_equal(sims[weight].drop(columns="REP")["DV"].to_numpy(), ref["DV"].to_numpy())
    obs = sims[50.0]["EVID"] == 0
    assert not np.allclose(sims[50.0].loc[obs, "DV"], sims[100.0].loc[obs, "DV"])
    # estimates without covariates.csv: a centred covariate's reference must come from the model file
    (out / "covariates.csv").unlink()
    capsys.readouterr()
    rc = main(["nlme", "simulate", str(tmp_path / "m.toml"), "--from", str(out), "--design", str(tmp_path / "d50.csv"),
               "--out", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "no covariates.csv beside them" in err and "reference = <value>" in err, err


def test_model_file_references_and_levels(tmp_path):
    text = MODEL.replace('WT = { transform = "log-center" }',
                         'WT = { transform = "log-center", reference = 70 }\n[covariates.CL]\n'
                         'SEX = { transform = "categorical", levels = ["M", "F"] }')
    cfg = parse_config(text, tmp_path / "m.toml")
    assert cfg.covariate_reference == {"WT": 70.0, "SEX": ("M", "F")}
    df = _theo().assign(SEX=lambda d: np.where(d["ID"] % 2 == 0, "F", "M"))
    assert cfg.model(df).covariate_reference == {"WT": 70.0, "SEX": ("M", "F")}
    # the fit's covariates.csv against the model file: the same reference is fine, another one is an error
    (tmp_path / "covariates.csv").write_text("covariate,kind,value\nWT,center,70.0\nSEX,level,M\nSEX,level,F\n")
    assert read_covariate_reference(tmp_path, cfg) == {"WT": 70.0, "SEX": ("M", "F")}
    (tmp_path / "covariates.csv").write_text("covariate,kind,value\nWT,center,72.5\n")
    with pytest.raises(ConfigError, match=r"gives covariate 'WT' the reference 70.0, but the estimates were fitted "
                                          r"with 72.5"):
        read_covariate_reference(tmp_path, cfg)
    with pytest.raises(ConfigError, match=r"levels must list the covariate's levels"):
        parse_config(text.replace('levels = ["M", "F"]', 'levels = "M"'), tmp_path / "m.toml")


def test_the_reference_levels_coefficient_and_a_misspelled_parameter_table_are_named(tmp_path):
    df = _theo().assign(SEX=lambda d: np.where(d["ID"] % 2 == 0, "F", "M"))
    with pytest.raises(ModelSpecificationError, match=r"'F' is the reference level of SEX \(levels F, M; .*\), which "
                                                      r"has no coefficient: give those of the other level\(s\), M"):
        nlme.NLME("one_compartment_oral", INIT, covariates={"CL": {"SEX": "categorical"}},
                  covariate_init={"CL": {"SEX_F": 0.2}}, data=df)
    text = MODEL.replace("[covariates.V]", "[covariates.Cl]")
    with pytest.raises(ConfigError, match=r"m\.toml, line 7: \[covariates\] 'Cl' is not a parameter"):
        parse_config(text, tmp_path / "m.toml")
