"""NLME model family: data tables, structural library, densities, closed-form M-step, Pyro model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.integrate import solve_ivp

from latentfit import DataError, ModelSpecificationError
from latentfit.models import nlme
from latentfit.models.nlme.structural import Design


# ----- data ---------------------------------------------------------------------------------------
def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "ID": [1, 1, 1, 1, 1, 2, 2, 2, 2, 3],
        "TIME": [0, 1, 2, 12, 13, 0, 0.5, 3, 5, 1],
        "DV": [np.nan, 5.0, 4.0, np.nan, 7.0, np.nan, 2.0, np.nan, 1.5, 3.0],
        "AMT": [100, 0, 0, 50, 0, 200, 0, 0, 0, 0],
        "EVID": [1, 0, 0, 1, 0, 1, 0, 0, 0, 0],
        "MDV": [1, 0, 0, 1, 0, 1, 0, 0, 0, 0],
        "WT": [70, 70, 70, 70, 70, 80, 80, 80, 80, 60],
    })


def test_read_nonmem_pads_observations_and_doses():
    data = nlme.read_nonmem(_table(), covariates=["WT"])
    assert list(data.ids) == [1, 2, 3]
    assert data.time.shape == (3, 3) and data.dose_amt.shape == (3, 2)
    np.testing.assert_array_equal(data.mask, [[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(data.dv[0], [5, 4, 7])
    np.testing.assert_allclose(data.dv[1, :2], [2, 1.5])  # the NaN DV row (t=3) is ignored
    np.testing.assert_allclose(data.dose_amt, [[100, 50], [200, 0], [0, 0]])
    np.testing.assert_allclose(data.dose_time[0], [0, 12])
    assert data.num_obs == 6
    assert list(data.covariates["WT"]) == [70, 80, 60]


def test_read_nonmem_configurable_columns_and_saemix_dose_column():
    df = pd.DataFrame({"Id": [1, 1, 2], "t": [1.0, 2.0, 1.5], "y": [1.0, 2.0, 3.0], "Dose": [10.0, 10.0, 20.0]})
    data = nlme.read_nonmem(df, columns={"id": "Id", "time": "t", "dv": "y"}, dose="Dose")
    np.testing.assert_allclose(data.dose_amt[:, 0], [10, 20])
    np.testing.assert_allclose(data.dose_time[:, 0], [0, 0])


def test_infusion_from_rate_column_matches_the_closed_form():
    df = pd.DataFrame({"ID": [1, 1, 1, 1], "TIME": [0.0, 1.0, 2.0, 5.0], "DV": [np.nan, 1.0, 2.0, 1.0],
                       "AMT": [100.0, 0, 0, 0], "RATE": [50.0, 0, 0, 0], "EVID": [1, 0, 0, 0]})
    model = nlme.NLME("one_compartment_infusion", {"V": 10.0, "CL": 2.0}, data=df)
    np.testing.assert_allclose(model.data.dose_rate, [[50.0]])
    f = model.structural_prediction(model.init_params(), model.prior_moments(model.init_params())[0])[0].numpy()
    k, t_inf = 0.2, 2.0
    during = 50 / (k * 10) * (1 - np.exp(-k * np.array([1.0, 2.0])))
    after = 50 / (k * 10) * (1 - np.exp(-k * t_inf)) * np.exp(-k * 3.0)
    np.testing.assert_allclose(f, np.r_[during, after], rtol=1e-12)


def test_data_validation_errors_name_the_problem():
    df = _table()
    with pytest.raises(DataError, match="'CONC'.*not in the data"):
        nlme.read_nonmem(df, columns={"dv": "CONC"})
    with pytest.raises(DataError, match="'HEIGHT'"):
        nlme.read_nonmem(df, covariates=["HEIGHT"])
    bad = df.astype({"TIME": object})
    bad.loc[2, "TIME"] = "two"
    with pytest.raises(DataError, match=r"'TIME'.*'two'.*ID 1.*row 2"):
        nlme.read_nonmem(bad)
    neg = df.copy()
    neg.loc[6, "TIME"] = -0.5
    with pytest.raises(DataError, match=r"negative time.*ID 2.*row 6"):
        nlme.read_nonmem(neg)


def test_data_warnings_for_no_observation_and_duplicated_doses():
    df = _table()
    extra = pd.DataFrame({"ID": [4, 1], "TIME": [0, 12], "DV": [np.nan, np.nan], "AMT": [10, 50], "EVID": [1, 1],
                          "MDV": [1, 1], "WT": [50, 70]})
    df = pd.concat([df, extra], ignore_index=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data = nlme.read_nonmem(df)
    msgs = " | ".join(str(x.message) for x in w)
    assert "without any observation" in msgs and "ID(s) 4" in msgs
    assert "duplicated dose record (ID 1, row 11)" in msgs
    assert list(data.ids) == [1, 2, 3]


# ----- structural library vs an ODE solver ----------------------------------------------------------
def _ode_reference(kind, p, doses, times):
    """Concentrations from the compartmental ODEs (scipy, tight tolerances), doses as events."""
    ka, cl = p.get("ka", 0.0), p["CL"]
    v1 = p.get("V", p.get("V1"))
    q, v2 = p.get("Q", 0.0), p.get("V2", 1.0)
    tlag = p.get("Tlag", 0.0)

    def rhs(t, x, rate_in):
        depot, central, periph = x
        return [-ka * depot, ka * depot - (cl / v1) * central - (q / v1) * central + (q / v2) * periph + rate_in,
                (q / v1) * central - (q / v2) * periph]

    events = sorted({0.0, *[t + tlag for t, _, _ in doses], *[t + a / r for t, a, r in doses if r > 0],
                     *times})
    x = np.zeros(3)
    out = {}
    for t0, t1 in zip(events[:-1], events[1:]):
        for td, amt, rate in doses:
            if abs(td + tlag - t0) < 1e-12 and rate == 0:
                x[0 if kind == "oral" else 1] += amt
        rate_in = sum(r for td, a, r in doses if r > 0 and td <= t0 < td + a / r - 1e-12)
        sol = solve_ivp(rhs, (t0, t1), x, args=(rate_in,), rtol=1e-10, atol=1e-12)
        x = sol.y[:, -1]
        out[t1] = x[1] / v1
    return np.array([out[t] for t in times])


@pytest.mark.parametrize("name,kind,params,rates", [
    ("one_compartment_bolus", "iv", {"V": 10.0, "CL": 2.0}, (0, 0)),
    ("one_compartment_infusion", "iv", {"V": 10.0, "CL": 2.0}, (50.0, 0)),
    ("one_compartment_oral", "oral", {"ka": 1.3, "V": 10.0, "CL": 2.0}, (0, 0)),
    ("one_compartment_oral_lag", "oral", {"Tlag": 0.7, "ka": 1.3, "V": 10.0, "CL": 2.0}, (0, 0)),
    ("two_compartment_bolus", "iv", {"CL": 2.0, "V1": 10.0, "Q": 3.0, "V2": 25.0}, (0, 0)),
    ("two_compartment_oral", "oral", {"ka": 0.9, "CL": 2.0, "V1": 10.0, "Q": 3.0, "V2": 25.0}, (0, 0)),
])
def test_structural_models_match_ode_with_multiple_doses(name, kind, params, rates):
    doses = [(0.0, 100.0, rates[0]), (6.0, 60.0, rates[1])]
    times = np.array([0.5, 1.0, 1.9, 3.0, 6.5, 7.0, 9.0, 14.0])
    f = nlme.LIBRARY[name]()
    t = torch.tensor
    design = Design(torch, t(times[None]), t([[d[0] for d in doses]]), t([[d[1] for d in doses]]),
                    t([[d[2] for d in doses]]))
    psi = {k: t([[v]], dtype=torch.float64) for k, v in params.items()}
    pred = f(psi, design)[0].numpy()
    ref = _ode_reference(kind, params, doses, times)
    np.testing.assert_allclose(pred, ref, rtol=1e-6, atol=1e-9)


def test_oral_bateman_is_continuous_at_ka_equal_k():
    torch.set_default_dtype(torch.float64)
    try:
        f = nlme.one_compartment_oral()
        d = Design(torch, torch.tensor([[1.0, 3.0]]), torch.zeros(1, 1), torch.tensor([[100.0]]), torch.zeros(1, 1))
        at = f({"ka": torch.tensor([[0.2]]), "V": torch.tensor([[10.0]]), "CL": torch.tensor([[2.0]])}, d)
        near = f({"ka": torch.tensor([[0.2 + 1e-6]]), "V": torch.tensor([[10.0]]), "CL": torch.tensor([[2.0]])}, d)
        limit = 100 / 10 * 0.2 * torch.tensor([1.0, 3.0]) * torch.exp(-0.2 * torch.tensor([1.0, 3.0]))
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.allclose(at[0], limit, rtol=1e-6) and torch.allclose(near[0], limit, rtol=1e-5)


def test_emax_models_use_the_regressor_column():
    df = pd.DataFrame({"ID": [1, 1, 2], "TIME": [0.0, 1.0, 0.0], "DV": [1.0, 2.0, 1.5], "CONC": [0.0, 4.0, 2.0]})
    model = nlme.NLME(nlme.sigmoid_emax(x="CONC"), {"E0": 1.0, "Emax": 3.0, "EC50": 2.0, "gamma": 1.5}, data=df)
    z = model.prior_moments(model.init_params())[0]
    mean, _ = model.predict(model.init_params(), z)
    c = np.array([[0.0, 4.0], [2.0, 2.0]])
    ref = 1.0 + 3.0 * c ** 1.5 / (2.0 ** 1.5 + c ** 1.5)
    np.testing.assert_allclose(mean.numpy()[0], ref[0], rtol=1e-12)
    np.testing.assert_allclose(mean.numpy()[1, 0], ref[1, 0], rtol=1e-12)


# ----- densities ------------------------------------------------------------------------------------
def _pk_table(n=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append((i + 1, 0.0, np.nan, 100.0, 1, rng.uniform(50, 90), "M" if i % 2 else "F"))
        for t in (0.5, 1.0, 2.0, 4.0, 8.0)[: 3 + i % 3]:
            rows.append((i + 1, t, rng.uniform(1, 6), 0.0, 0, rows[-1][5], rows[-1][6]))
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "WT", "SEX"])


@pytest.mark.parametrize("error", ["constant", "proportional", "combined", "exponential"])
def test_log_densities_match_scipy(error):
    df = _pk_table()
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": nlme.Parameter(2.0, random=False)},
                      covariates={"V": {"WT": "log-center", "SEX": None}}, omega=[("ka", "V")], error=error,
                      error_init={"a": 0.4, "b": 0.2}, data=df)
    theta = model.init_params()
    theta["beta_V_WT"] = torch.tensor(0.8, dtype=torch.float64)
    theta["beta_V_SEX_M"] = torch.tensor(-0.1, dtype=torch.float64)
    theta["Omega"] = torch.tensor([[0.3, 0.05], [0.05, 0.1]], dtype=torch.float64)
    torch.manual_seed(0)
    z = model.sample_prior(theta, None, 2)  # [2, N, 2]
    ll, lp = model.log_densities(theta, z)
    data = model.data
    wt = data.covariates["WT"].to_numpy()
    male = (data.covariates["SEX"] == "M").to_numpy()
    mu_v = math.log(20.0) + 0.8 * np.log(wt / wt.mean()) - 0.1 * male
    mu = np.stack([np.full(len(wt), math.log(1.2)), mu_v], -1)
    zz = z.numpy()
    ref_lp = np.stack([[stats.multivariate_normal(mu[i], theta["Omega"].numpy()).logpdf(zz[c, i])
                        for i in range(len(wt))] for c in range(2)])
    np.testing.assert_allclose(lp.numpy(), ref_lp, rtol=1e-10)
    ka, v, cl = np.exp(zz[..., 0:1]), np.exp(zz[..., 1:2]), 2.0
    t = data.time
    f = 100 * ka / (v * (ka - cl / v)) * (np.exp(-cl / v * t) - np.exp(-ka * t))
    a, b = 0.4, 0.2
    y = data.dv
    if error == "exponential":
        terms = stats.norm(np.log(f), a).logpdf(np.log(np.where(data.mask, y, 1.0)))
    else:
        sd = {"constant": a + 0 * f, "proportional": b * f, "combined": np.sqrt(a ** 2 + b ** 2 * f ** 2)}[error]
        terms = stats.norm(f, sd).logpdf(y)
    ref_ll = np.where(data.mask, terms, 0.0).sum(-1)
    np.testing.assert_allclose(ll.numpy(), ref_ll, rtol=1e-10)


def test_censored_observations_use_the_normal_cdf():
    df = _pk_table(n=3)
    df["CENS"] = 0
    df.loc[2, "CENS"] = 1  # below LLOQ: DV holds the limit
    df.loc[3, "CENS"] = -1  # above the limit
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, error_init={"a": 0.5}, data=df)
    theta = model.init_params()
    z = model.prior_moments(theta)[0]
    ll, _ = model.log_densities(theta, z)
    f, _ = model.predict(theta, z)
    y, mask = model.data.dv, model.data.mask
    terms = stats.norm(f.numpy(), 0.5).logpdf(y)
    terms[0, 1] = stats.norm.logcdf((y[0, 1] - f[0, 1].item()) / 0.5)
    terms[0, 2] = stats.norm.logsf((y[0, 2] - f[0, 2].item()) / 0.5)
    np.testing.assert_allclose(ll.numpy(), np.where(mask, terms, 0).sum(-1), rtol=1e-10)
    assert not model.params["a"].closed_form  # the residual error then takes the numerical step
    assert not model.observations()[1][0, 1]  # censored values leave the Gaussian face


# ----- closed-form M-step -----------------------------------------------------------------------------
def _phi_stats(model, phi):
    theta = model.init_params()
    return theta, {k: v.sum(0) for k, v in model.stats(theta, phi).items()}


def test_m_step_diagonal_is_ols_per_parameter():
    df = _pk_table(n=40, seed=1)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0},
                      covariates={"V": ["WT", "SEX"], "CL": {"WT": "log"}}, data=df)
    rng = np.random.default_rng(2)
    phi = torch.tensor(rng.normal(size=(40, 3)) * [0.3, 0.2, 0.25] + [0.1, 3.0, 0.7])
    theta, s = _phi_stats(model, phi)
    out = model.m_step(s, theta, 40)
    cov = model.data.covariates
    designs = [np.ones((40, 1)),
               np.column_stack([np.ones(40), cov["WT"], (cov["SEX"] == "M").astype(float)]),
               np.column_stack([np.ones(40), np.log(cov["WT"])])]
    for j, (name, x) in enumerate(zip(["ka", "V", "CL"], designs)):
        coef, *_ = np.linalg.lstsq(x, phi[:, j].numpy(), rcond=None)
        np.testing.assert_allclose(math.log(float(out[name])), coef[0], rtol=1e-9)
        resid = phi[:, j].numpy() - x @ coef
        np.testing.assert_allclose(float(out[f"omega2_{name}"]), np.mean(resid ** 2), rtol=1e-9)
    np.testing.assert_allclose(float(out["beta_V_WT"]), np.linalg.lstsq(designs[1], phi[:, 1].numpy(),
                                                                         rcond=None)[0][1], rtol=1e-9)


def test_m_step_block_omega_iterates_to_the_gaussian_mle():
    """Block Ω with different covariates per parameter (seemingly unrelated regressions): iterating the
    closed-form ECM step converges to a stationary point of the Gaussian log-likelihood."""
    df = _pk_table(n=50, seed=3)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, covariates={"V": "WT"},
                      omega="full", data=df)
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3, 3))
    phi = torch.tensor(rng.normal(size=(50, 3)) @ a * 0.2 + [0.1, 3.0, 0.7])
    theta, s = _phi_stats(model, phi)
    for _ in range(200):
        theta.update(model.m_step(s, theta, 50))

    def loglik(beta_ka, beta_v, beta_w, beta_cl, omega):
        th = dict(theta, ka=beta_ka.exp(), V=beta_v.exp(), beta_V_WT=beta_w, CL=beta_cl.exp(), Omega=omega)
        return model._log_prior(th, phi, model._mu(th)).sum()

    args = [torch.log(theta["ka"]), torch.log(theta["V"]), theta["beta_V_WT"], torch.log(theta["CL"]),
            theta["Omega"]]
    args = [x.detach().clone().requires_grad_(True) for x in args]
    grads = torch.autograd.grad(loglik(*args), args)
    for g in grads:
        assert float(g.abs().max()) < 1e-6


def test_fixed_parameter_is_not_estimated():
    df = _pk_table(n=20, seed=5)
    model = nlme.NLME("one_compartment_oral", {"ka": nlme.Parameter(1.5, fixed=True), "V": 20.0, "CL": 2.0},
                      data=df)
    assert "ka" not in model.closed_form_params and "ka" not in model.numeric_params
    phi = torch.tensor(np.random.default_rng(0).normal(size=(20, 3)) * 0.2 + [0.9, 3.0, 0.7])
    theta, s = _phi_stats(model, phi)
    out = model.m_step(s, theta, 20)
    assert "ka" not in out
    np.testing.assert_allclose(float(out["omega2_ka"]), np.mean((phi[:, 0].numpy() - math.log(1.5)) ** 2))


def test_m_step_fast_path_equals_the_general_gls():
    import copy

    df = _pk_table(n=30, seed=6)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": nlme.Parameter(20.0, fixed=True), "CL": 2.0},
                      data=df)
    assert model._simple
    general = copy.copy(model)
    general._simple = False
    phi = torch.tensor(np.random.default_rng(1).normal(size=(30, 3)) * 0.3 + [0.2, 3.1, 0.6])
    theta = model.init_params()
    fast = model.m_step({k: v.sum(0) for k, v in model.stats(theta, phi).items()}, theta, 30)
    slow = general.m_step({k: v.sum(0) for k, v in general.stats(theta, phi).items()}, theta, 30)
    assert fast.keys() == slow.keys() and "V" not in fast
    for k in fast:
        assert torch.allclose(fast[k], slow[k], rtol=1e-12), k


def test_residual_error_closed_form():
    df = _pk_table(n=5)
    for error, name in [("constant", "a"), ("proportional", "b"), ("exponential", "a")]:
        model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, error=error, data=df)
        theta = model.init_params()
        z = model.prior_moments(theta)[0]
        s = {k: v.sum(0) for k, v in model.stats(theta, z).items()}
        f = model.structural_prediction(theta, z).numpy()
        y, m = model.data.dv, model.data.mask
        res = {"constant": y - f, "proportional": (y - f) / f, "exponential": np.log(np.where(m, y, 1)) - np.log(f)}
        expected = np.sqrt(np.sum(np.where(m, res[error], 0) ** 2) / m.sum())
        np.testing.assert_allclose(float(model.m_step(s, theta, 5)[name]), expected, rtol=1e-12)


# ----- faces, transforms, Pyro model, errors ---------------------------------------------------------
def test_gaussian_faces_reproduce_the_log_likelihood():
    df = _pk_table()
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, error="combined", data=df)
    theta = model.init_params()
    z = model.sample_prior(theta, None, 3)
    mean, sd = model.predict(theta, z)
    y, mask = model.observations()
    ref = torch.where(mask, torch.distributions.Normal(mean, sd).log_prob(y), 0.0).sum(-1)
    assert torch.allclose(model.log_lik(theta, z), ref, atol=1e-10)
    mu, om = model.prior_moments(theta)
    ref_lp = torch.distributions.MultivariateNormal(mu, om).log_prob(z)
    assert torch.allclose(model.log_prior(theta, z), ref_lp, atol=1e-10)
    units = torch.tensor([4, 1])
    assert torch.allclose(model.log_lik(theta, z[:, units], units), ref[:, units], atol=1e-10)


@pytest.mark.parametrize("transform,value", [("logit", 0.3), ("probit", 0.8), ("normal", -1.5)])
def test_parameter_transforms_round_trip(transform, value):
    df = _pk_table()
    f = lambda psi, d: psi["e0"] + 0.0 * d.time  # noqa: E731
    model = nlme.NLME(f, {"e0": nlme.Parameter(value, transform=transform)}, data=df)
    info = model.params["e0"]
    phi = info.to_unconstrained(torch.tensor(value, dtype=torch.float64))
    assert abs(float(info.to_constrained(phi)) - value) < 1e-12
    z = model.prior_moments(model.init_params())[0]
    assert torch.allclose(model.unpack_latents(z)["e0"], torch.full((6,), value, dtype=torch.float64))


def test_pyro_model_has_the_same_log_joint():
    import pyro
    from pyro import poutine

    df = _pk_table()
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, error="proportional",
                      covariates={"CL": "WT"}, data=df)
    pyro.clear_param_store()
    theta = model.init_params()
    z = model.sample_prior(theta, None, 1)[0]
    cond = poutine.condition(model.pyro_model, data={"phi": z[:, None, :]})
    tr = poutine.trace(cond).get_trace()
    tr.compute_log_prob()
    total = sum(site["log_prob_sum"] for site in tr.nodes.values() if site["type"] == "sample")
    ll, lp = model.log_densities(theta, z)
    assert abs(float(total.detach()) - float((ll + lp).sum())) < 1e-8
    assert set(pyro.get_param_store().keys()) == {"ka", "V", "CL", "beta_CL_WT", "omega2_ka", "omega2_V",
                                                   "omega2_CL", "b"}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_nonfinite_likelihood_names_the_observation(backend):
    """A starting value where an individual's log-likelihood is not finite is refused before any iteration, naming
    the row.  SAEM's start checks it (``LatentModel.initial_values_finite``; on JAX inside the start's compiled
    program), so an engine run directly on the model refuses it too, and the replicates' fits as well."""
    if backend == "jax":
        pytest.importorskip("jax")
    from latentfit.inference.saem import SAEM

    df = _pk_table(n=3)
    df.loc[1, "TIME"] = 0.0  # an observation at the dosing time: oral prediction 0
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, error="proportional", data=df,
                      backend=backend)
    named = r"ID 1 \(row 1, TIME 0.0.*use error='combined'"
    with pytest.raises(ModelSpecificationError, match=named):
        model.fit(progress=False, num_iters=(3, 0), burn_in=0)
    with pytest.raises(ModelSpecificationError, match=named):
        SAEM(model, num_iters=(3, 0), burn_in=0, progress=False).run()
    with pytest.raises(ModelSpecificationError, match=named):
        model.fit(progress=False, num_iters=(3, 0), burn_in=0, replicates=2)
    # the check's flag, as the start program computes it: False here, True once the error model allows a zero
    theta = model.init_params()
    assert not bool(model.initial_values_finite(theta))
    combined = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, error="combined", data=df,
                         backend=backend)
    assert bool(combined.initial_values_finite(combined.init_params()))


def test_specification_errors_are_clear():
    with pytest.raises(ModelSpecificationError, match="unknown structural model"):
        nlme.NLME("three_compartment", {"V": 1.0})
    with pytest.raises(ModelSpecificationError, match=r"missing \['CL'\]"):
        nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 2.0})
    with pytest.raises(ModelSpecificationError, match="transform"):
        nlme.NLME("one_compartment_bolus", {"V": nlme.Parameter(1.0, transform="boxcox"), "CL": 1.0})
    with pytest.raises(ModelSpecificationError, match="random effect"):
        nlme.NLME("one_compartment_bolus", {"V": nlme.Parameter(1.0, random=False),
                                            "CL": nlme.Parameter(1.0, random=False)})
    with pytest.raises(ModelSpecificationError, match="not a parameter"):
        nlme.NLME("one_compartment_bolus", {"V": 1.0, "CL": 1.0}, covariates={"ka": "WT"})
    with pytest.raises(ModelSpecificationError, match="error model"):
        nlme.NLME("one_compartment_bolus", {"V": 1.0, "CL": 1.0}, error="poisson")
    with pytest.raises(ModelSpecificationError, match="no data"):
        nlme.NLME("one_compartment_bolus", {"V": 1.0, "CL": 1.0}).fit()
    with pytest.raises(DataError, match="exponential error needs DV > 0"):
        df = _pk_table()
        df.loc[1, "DV"] = -1.0
        nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 2.0, "CL": 1.0}, error="exponential", data=df)


def test_fit_option_errors_speak_the_users_terms():
    """A too-short fit names num_iters and the default burn-in the user never set; a misspelt option is named with
    the closest valid one (it had been SAEM.__init__()'s "unexpected keyword argument")."""
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 2.0, "CL": 1.0}, data=_pk_table())
    with pytest.raises(ValueError, match=r"num_iters=\(K1, K2\): K1 = 5 must exceed SAEM's burn-in of 5 iterations "
                                         r"\(burn_in=, default 5\); give more iterations or a smaller burn_in"):
        model.fit(num_iters=(5, 5), progress=False)
    with pytest.raises(TypeError, match=r"fit\(\) got an unexpected option 'num_iter'; did you mean 'num_iters'\? "
                                        r"\(options of SAEM: .*burn_in"):
        model.fit(num_iter=(5, 5), progress=False)
    with pytest.raises(TypeError, match=r"unexpected option 'seeds'; did you mean 'seed'\?"):
        model.fit(seeds=0, progress=False)
    with pytest.raises(TypeError, match=r"unexpected option 'column'; did you mean 'columns'\? \(options of FSAEM"):
        model.fit(engine="fsaem", column={"dv": "DV"}, progress=False)


def _jax_pair():
    import jax

    jax.config.update("jax_enable_x64", True)
    df = _pk_table(n=8, seed=9)
    kw = dict(covariates={"V": "WT"}, error="combined", error_init={"a": 0.4, "b": 0.2}, data=df)
    spec = {"ka": 1.2, "V": 20.0, "CL": nlme.Parameter(2.0, random=False)}
    mt = nlme.NLME("one_compartment_oral", spec, **kw)
    mj = nlme.NLME("one_compartment_oral", spec, backend="jax", **kw)
    z = np.random.default_rng(0).normal(size=(2, 8, 2)) * 0.2 + [0.2, 3.0]
    return mt, mj, z


def test_jax_backend_log_densities_match_torch():
    """The same NLME code runs on JAX ops (``backend="jax"``)."""
    mt, mj, z = _jax_pair()
    tt, tj = mt.init_params(), mj.init_params()
    for a, b in zip(mt.log_densities(tt, torch.tensor(z)), mj.log_densities(tj, mj.ops.asarray(z))):
        np.testing.assert_allclose(np.asarray(b), a.numpy(), rtol=1e-10)


@pytest.mark.slow
def test_jax_backend_statistics_m_step_and_modes_match_torch():
    """Eager JAX compiles every primitive on first use, hence slow: statistics, M-step and Laplace agree."""
    from latentfit.inference.laplace import conditional_modes

    mt, mj, z = _jax_pair()
    tt, tj = mt.init_params(), mj.init_params()
    st = {k: v.mean(0).sum(0) for k, v in mt.stats(tt, torch.tensor(z)).items()}
    sj = {k: v.mean(0).sum(0) for k, v in mj.stats(tj, mj.ops.asarray(z)).items()}
    out_t, out_j = mt.m_step(st, tt, 8), mj.m_step(sj, tj, 8)
    for k in out_t:
        np.testing.assert_allclose(np.asarray(out_j[k]), out_t[k].numpy(), rtol=1e-10)
    lt, lj = conditional_modes(mt, tt, num_steps=2), conditional_modes(mj, tj, num_steps=2)
    np.testing.assert_allclose(np.asarray(lj.mode), lt.mode.numpy(), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(lj.cov), lt.cov.numpy(), rtol=1e-6)
