"""Stepwise covariate search (issue 14, item 6; saemix's ``step.saemix``).

Simulated truth: one-compartment oral PK, N = 60 subjects × 7 samples, log CL = β_CL + 0.02·(WT − mean WT) + η_CL
(ω²_CL = 0.05, so WT explains about 45% of the CL variance), no other covariate effect; AGE and SEX are noise.
With seed 1 the true term gains 36.9 in −2LL (LRT p ≈ 1e-9) and the false ones at most 0.7, against a BIC_cov
penalty of log 60 = 4.1 per term (measured).  The table's numbers are checked against their own definitions
(AIC, BIC, BIC_cov, ΔBIC from its columns; LRT p-values against scipy's χ² law).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from latentfit import ModelSpecificationError
from latentfit.models import nlme
from latentfit.models.nlme.covariate_search import _detect_covariates, _table_row, chi2_sf

OPT = dict(columns={"id": "ID", "time": "TIME", "dv": "DV"}, dose="DOSE")
TRUTH = {"ka": 1.5, "V": 30.0, "CL": 3.0, "beta_CL_WT": 0.02, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.05,
         "a": 0.1}
FAST = dict(num_iters=(100, 50), refit={"num_iters": (50, 25)})
README = Path(__file__).resolve().parents[1] / "README.md"


def simulate(n: int = 60, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    times = [0.5, 1, 2, 4, 8, 12, 24]
    wt = rng.normal(70, 15, n).clip(40, 120)
    age = rng.uniform(20, 80, n)
    sex = rng.integers(0, 2, n)
    rep = len(times)
    tab = pd.DataFrame({"ID": np.repeat(np.arange(1, n + 1), rep), "TIME": np.tile(times, n), "DV": 1.0,
                        "DOSE": 100.0, "WT": np.repeat(wt, rep), "AGE": np.repeat(age, rep),
                        "SEX": np.repeat(sex, rep)})
    gen = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 30.0, "CL": 3.0}, covariates={"CL": {"WT": "center"}},
                    data=tab, **OPT)
    return gen.simulate(TRUTH, seed=seed)


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return simulate()


def start_model() -> nlme.NLME:
    return nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 2.0}, **OPT)


def check_table(table: pd.DataFrame, n_units: int) -> None:
    """Every number of the table from its own columns (the model of each step = the row selected before it)."""
    log_n = math.log(n_units)
    assert np.allclose(table["AIC"], table["-2LL"] + 2 * table["npar"], rtol=0, atol=1e-9)
    assert np.allclose(table["BIC"], table["-2LL"] + log_n * table["npar"], rtol=0, atol=1e-9)
    # every parameter here has a random effect: BIC_cov counts the fixed effects (npar − 3 ω² − a) at log N
    assert np.allclose(table["BIC_cov"], table["-2LL"] + log_n * (table["npar"] - 4), rtol=0, atol=1e-9)
    current = table[table["action"] == "current"]
    for step in range(1, int(table["step"].max()) + 1):
        # the step's model (the move selected before it) refitted from its estimates: the step's reference
        ref = current[current["step"] == step].iloc[0]
        before = table[table["selected"] & (table["step"] == step - 1)].iloc[0]
        assert ref["covariates"] == before["covariates"] and ref["-2LL"] <= before["-2LL"]
        rows = table[(table["step"] == step) & (table["action"] != "current")]
        assert np.allclose(rows["dBIC_cov"], rows["BIC_cov"] - ref["BIC_cov"], rtol=0, atol=1e-9)
        assert np.allclose(rows["dBIC"], rows["BIC"] - ref["BIC"], rtol=0, atol=1e-9)
        assert np.allclose(rows["dAIC"], rows["AIC"] - ref["AIC"], rtol=0, atol=1e-9)
        assert (rows["df"] == (rows["npar"] - ref["npar"]).abs()).all()
        sign = np.where(rows["npar"] > ref["npar"], 1.0, -1.0)
        assert np.allclose(rows["LRT"], sign * (ref["-2LL"] - rows["-2LL"]), rtol=0, atol=1e-9)
        neg = rows["LRT"] < 0  # a larger model fitted worse (SAEM noise): no p-value, a note
        assert np.allclose(rows["p_value"][~neg], stats.chi2.sf(rows["LRT"][~neg], rows["df"][~neg]), rtol=1e-10,
                           atol=1e-14)
        assert rows["p_value"][neg].isna().all() and (rows["note"][neg].str.startswith("LRT < 0")).all()
        assert (rows["note"][~neg] == "").all()
        # the move taken is the lowest criterion of its step, and only when it improves on the step's model
        best = rows["BIC_cov"].idxmin()
        assert rows["selected"].sum() == (1 if rows.loc[best, "dBIC_cov"] < 0 else 0)
        if rows["selected"].any():
            assert rows["selected"].idxmax() == best


def test_chi2_tail_matches_scipy():
    for df in range(1, 9):
        for x in (0.0, 1e-6, 0.3, 1.0, 3.84, 10.0, 36.9, 120.0):
            assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-11, abs=1e-300), (x, df)
    assert chi2_sf(-0.4, 1) == 1.0


def _rec(ll: float, npar: int, n_random: int, n_fixed: int = 0, n: int = 60, n_obs: int = 420) -> dict:
    """A search record as ``covariate_search`` builds it (log-likelihood, parameters, fixed effects by kind)."""
    return {"terms": {}, "ll": ll, "mc_se": 0.0, "method": "gq", "-2LL": -2 * ll, "npar": npar,
            "AIC": -2 * ll + 2 * npar, "BIC": -2 * ll + math.log(n) * npar,
            "BIC_cov": -2 * ll + math.log(n) * n_random + math.log(n_obs) * n_fixed}


def test_table_row_differences_and_a_negative_lrt():
    """dBIC (ordinary BIC) and dBIC_cov (the selection's criterion) differ when the added coefficient is on a
    parameter without a random effect (log n_obs against log N); a larger model with a higher −2LL (the audit's
    V~AGE, LRT −0.017) keeps its negative statistic, p-value NaN and a note, instead of p = 1."""
    ref = _rec(100.0, 7, 3)
    fixed_cov = _rec(103.0, 8, 3, n_fixed=1)  # a covariate on a parameter without random effect
    r = _table_row(1, "add", ("ka", "WT"), fixed_cov, ref)
    assert r["dBIC"] == pytest.approx(-6.0 + math.log(60)) and r["dBIC_cov"] == pytest.approx(-6.0 + math.log(420))
    assert r["LRT"] == pytest.approx(6.0) and r["p_value"] == pytest.approx(stats.chi2.sf(6.0, 1), rel=1e-10)
    assert r["note"] == ""
    worse = _rec(100.0 - 0.0085, 8, 4)
    r = _table_row(1, "add", ("V", "AGE"), worse, ref)
    assert r["LRT"] == pytest.approx(-0.017) and math.isnan(r["p_value"]) and r["df"] == 1
    assert r["note"].startswith("LRT < 0") and "SAEM" in r["note"]
    assert r["dBIC_cov"] == pytest.approx(0.017 + math.log(60))
    # a removal: the step's model is the larger one; its -2LL higher than the smaller model's is flagged the same way
    r = _table_row(2, "remove", ("V", "AGE"), ref, worse)
    assert r["LRT"] == pytest.approx(-0.017) and math.isnan(r["p_value"]) and r["note"].startswith("LRT < 0")
    start = _table_row(0, "start", None, ref, None)
    assert start["dBIC_cov"] == 0.0 and math.isnan(start["p_value"]) and start["note"] == ""


def test_stepwise_bic_picks_weight_on_clearance_and_the_table_is_consistent(data):
    cands = [("CL", "WT", "center"), ("V", "WT", "center"), ("CL", "AGE", "center")]
    res = nlme.covariate_search(start_model(), data, candidates=cands, direction="both", **FAST)
    assert res.covariates == {"CL": {"WT": "center"}}
    table = res.table
    check_table(table, 60)
    assert (table["logLik_method"] == "gq").all() and (table["logLik_mc_se"] == 0).all()
    steps = res.steps
    assert list(steps["action"]) == ["start", "add"] and list(steps["covariate"].iloc[1:]) == ["WT"]
    # step 2 tried both other additions and the removal of WT (the start model: its best fit, that of step 1)
    step2 = table[table["step"] == 2]
    assert sorted(step2["action"]) == ["add", "add", "current", "remove"] and not step2["selected"].any()
    step1_model = table[(table["step"] == 1) & (table["action"] == "current")]["-2LL"].iloc[0]
    assert step2.loc[step2["action"] == "remove", "-2LL"].iloc[0] == step1_model
    assert steps["p_value"].iloc[1] < 1e-6
    # the chosen model is refitted: the true coefficient within 3.5 linearisation SEs
    assert list(res.model.covariate_spec) == ["CL"] and "beta_CL_WT" in res.fit.params
    se = res.fit.standard_errors()["beta_CL_WT"]
    assert abs(float(res.fit.params["beta_CL_WT"]) - 0.02) < 3.5 * se
    assert res.fit.num_iterations == 75  # the refit's own options


def test_a_noise_covariate_is_not_selected_when_the_start_model_is_far_from_its_maximum():
    """No covariate effect; SAEM's 150 + 50 iterations from ω² = 1 leave the start model ~90 units of −2LL below its
    maximum.  Each move is warm-started from the start model's estimates: compared with the start fit itself, every
    move "gained" ~90 (ka~AGE was selected, LRT p ≈ 1e-21: a user's report).  The step's model refitted from the same
    estimates is the reference: the noise terms gain under 1 unit and nothing is selected."""
    rng = np.random.default_rng(11)
    n, times = 50, (0.5, 1, 2, 4, 8, 12, 24)
    age = rng.normal(40, 10, n)
    tab = pd.DataFrame({"ID": np.repeat(np.arange(1, n + 1), len(times)), "TIME": np.tile(times, n), "DV": 0.0,
                        "DOSE": 100.0, "AGE": np.repeat(age, len(times))})
    spec = {"ka": 1.0, "V": 20.0, "CL": 2.0}
    truth = {**spec, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.05, "a": 0.1}
    sim = nlme.NLME("one_compartment_oral", spec, data=tab, **OPT).simulate(truth, seed=2)
    res = nlme.covariate_search(nlme.NLME("one_compartment_oral", spec, **OPT), sim,
                                candidates=[("ka", "AGE"), ("CL", "AGE")], direction="forward", num_iters=(150, 50),
                                refit=False)
    assert res.covariates == {}
    table = res.table.set_index("action")
    assert table.loc["start", "-2LL"] - table.loc["current", "-2LL"] > 50  # the start fit: far from its maximum
    moves = table.loc["add"]
    assert (moves["LRT"] < 3.84).all() and not (moves["p_value"] <= 0.05).any() and (moves["dBIC_cov"] > 0).all()
    check_table(res.table, n)


@pytest.mark.slow
def test_forward_only_never_removes(data):
    res = nlme.covariate_search(start_model(), data, candidates={"CL": {"WT": "center"}, "V": {"WT": "center"}},
                                direction="forward", num_iters=(100, 50), refit=False)
    assert set(res.table["action"]) == {"start", "current", "add"}
    assert res.covariates == {"CL": {"WT": "center"}}
    check_table(res.table, 60)
    assert res.fit is not None and res.fit.num_iterations == 150  # refit=False: the search's own fit


@pytest.mark.slow
def test_backward_from_all_pairs_keeps_only_weight_on_clearance(data):
    cands = {p: {"WT": "center", "AGE": "center", "SEX": None} for p in ("ka", "V", "CL")}
    res = nlme.covariate_search(start_model(), data, candidates=cands, direction="backward", num_iters=(100, 50),
                                refit=False)
    assert res.covariates == {"CL": {"WT": "center"}}
    assert set(res.table["action"]) == {"start", "current", "remove"}
    check_table(res.table, 60)


@pytest.mark.slow
def test_default_candidates_are_every_parameter_times_every_covariate_column(data):
    res = nlme.covariate_search(start_model(), data, num_iters=(100, 50), refit=False)
    first = res.table[(res.table["step"] == 1) & (res.table["action"] != "current")]
    assert sorted(zip(first["parameter"], first["covariate"])) == sorted(
        (p, c) for p in ("ka", "V", "CL") for c in ("WT", "AGE", "SEX"))
    assert list(res.covariates) == ["CL"] and list(res.covariates["CL"]) == ["WT"]
    check_table(res.table, 60)


def test_covariate_columns_are_detected_and_bad_options_are_clear_errors(data):
    bound = start_model().bind(data)
    assert _detect_covariates(bound, data) == ["WT", "AGE", "SEX"]
    with pytest.raises(ModelSpecificationError, match="direction must be one of"):
        nlme.covariate_search(bound, direction="sideways")
    with pytest.raises(ModelSpecificationError, match=r"'Cl' is not a parameter"):
        nlme.covariate_search(bound, candidates=[("Cl", "WT")])
    with pytest.raises(ModelSpecificationError, match="the data have no column 'BMI'"):
        nlme.covariate_search(bound, candidates=[("CL", "BMI")])
    with pytest.raises(ModelSpecificationError, match="unknown transform 'sqrt'"):
        nlme.covariate_search(bound, candidates=[("CL", "WT", "sqrt")])
    with pytest.raises(ModelSpecificationError, match="no covariate column found"):
        nlme.covariate_search(bound.bind(data.drop(columns=["WT", "AGE", "SEX"])))


def test_readme_replicate_and_covariate_search_blocks_run():
    """The README's "Replicate fits" and "Covariate search" code blocks, executed verbatim."""
    text = README.read_text()
    ns: dict = {}
    for title in ("Replicate fits", "Covariate search"):
        section = re.search(rf"^### {title}.*?(?=^##)", text, flags=re.S | re.M).group(0)
        blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        assert blocks, title
        for k, code in enumerate(blocks):
            exec(compile(code, f"README:{title}[{k}]", "exec"), ns)
        if title == "Replicate fits":
            assert ns["rep_fit"].replicates is not None and len(ns["rep_fit"].replicates) == 3
        else:
            assert ns["search"].table["selected"].iloc[0]
