"""Non-Gaussian outcomes combined with several responses and with occasions (issue 14, items 2-4).

* Joint models (``error={"conc": ...}, outcome={"ae": "binary"}``): the per-individual log-likelihood equals the sum
  of those of the separate models (the Gaussian response alone, each outcome alone on its own records) to 1e-10, for
  binary, ordinal, Poisson, negative binomial and repeated time-to-event responses; the Gaussian response's closed-form
  statistic is the one-response model's; importance sampling agrees with quadrature (1-D random effect) within 4 MC SE;
  SAEM recovers simulated PK + binary and PK + count truths within 3.5 SE (slow).
* Outcomes with occasions (``iov=``): with κ = 0 the log-likelihood is the model's without IOV exactly (binary,
  Poisson, time-to-event with κ on the hazard's scale); recovery of a Poisson model with IOV (slow).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from latentfit import DataError, ModelSpecificationError
from latentfit.inference.likelihood import log_likelihood_gq, log_likelihood_is
from latentfit.models import nlme
from latentfit.models.nlme import outcomes as oc

P = nlme.Parameter
CONC_TIMES = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0)
OUTCOME_TIMES = (1.5, 3.0, 6.0, 10.0, 24.0)


def _conc(psi, d):
    """One-compartment oral PK after 100 mg at time 0 (closed form in the time)."""
    xp = d.xp
    k = psi["CL"] / psi["V"]
    return 100.0 * psi["ka"] / (psi["V"] * (psi["ka"] - k)) * (xp.exp(-k * d.time) - xp.exp(-psi["ka"] * d.time))


def _driven(psi, d):
    """The outcome's predictor driven by the concentration: logit, log-rate or cumulative-logit shift."""
    return psi["e0"] + psi["slope"] * _conc(psi, d)


def _joint(psi, d):
    return {"conc": _conc(psi, d), "ae": _driven(psi, d)}


def _params(kind: str, random=("ka", "V", "CL")) -> dict:
    spec = {"ka": P(1.2, random="ka" in random), "V": P(18.0, random="V" in random),
            "CL": P(2.2, random="CL" in random)}
    if kind == "tte":
        return {**spec, "lambda": P(6.0), "beta": P(1.3, random=False)}
    spec.update({"e0": P(-1.5, "normal", random=False), "slope": P(0.4, "normal", random=False)})
    if kind == "ordinal":
        spec.update({"e0": P(0.0, "normal", random=False, fixed=True), "alp1": P(-0.5, "normal", random=False),
                     "alp2": P(1.0, random=False)})
    if kind == "negbin":
        spec["delta"] = P(0.4, random=False)
    return spec


OUTCOMES = {"binary": lambda: "binary", "poisson": lambda: "poisson",
            "negbin": lambda: oc.NegativeBinomial("delta"), "ordinal": lambda: oc.Ordinal(("alp1", "alp2")),
            "tte": lambda: oc.TimeToEvent("weibull")}


def _design(n: int, kind: str, seed: int = 0) -> pd.DataFrame:
    """Concentrations (DVID 1) and outcome records (DVID 2) of ``n`` individuals, sorted by ID and time; DV values
    valid for the outcome (time-to-event: a start record, events and a censoring time)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        rows += [dict(ID=i, TIME=t, DV=rng.uniform(0.5, 5.0), DVID=1) for t in CONC_TIMES]
        if kind == "tte":
            events = np.sort(rng.uniform(0.2, 23.0, size=int(rng.integers(0, 4))))
            rows += [dict(ID=i, TIME=0.0, DV=0.0, DVID=2)] + [dict(ID=i, TIME=t, DV=1.0, DVID=2) for t in events]
            rows.append(dict(ID=i, TIME=24.0, DV=0.0, DVID=2))
        else:
            high = {"binary": 1, "ordinal": 2}.get(kind, 6)
            rows += [dict(ID=i, TIME=t, DV=float(rng.integers(0, high + 1)), DVID=2) for t in OUTCOME_TIMES]
    return pd.DataFrame(rows).sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True)


def _joint_model(kind: str, **kw) -> nlme.NLME:
    return nlme.NLME(_conc_only if kind == "tte" else _joint, _params(kind, **kw),
                     error={"conc": "proportional" if kind == "poisson" else "constant"},
                     outcome={"ae": OUTCOMES[kind]()})


def _conc_only(psi, d):
    return {"conc": _conc(psi, d)}


@pytest.mark.parametrize("kind", list(OUTCOMES))
def test_joint_log_likelihood_is_the_sum_of_the_separate_models(kind):
    """log p(y_i | z_i) of the joint model = the Gaussian response's model on its records + the outcome's model on
    its own records (time-to-event: each interval closes at the previous record of its own response), per
    individual, at random z, to 1e-10; the Gaussian response's closed-form statistic is the one-response model's."""
    table = _design(12, kind)
    joint = _joint_model(kind).bind(table)
    error = "proportional" if kind == "poisson" else "constant"
    gauss = nlme.NLME(_conc, _params(kind), error=error).bind(table[table.DVID == 1])
    if kind == "tte":
        alone = nlme.NLME(None, {"lambda": P(6.0), "beta": P(1.3, random=False)},
                          outcome=OUTCOMES[kind]()).bind(table[table.DVID == 2])
    else:
        alone = nlme.NLME(_driven, _params(kind), outcome=OUTCOMES[kind]()).bind(table[table.DVID == 2])
    theta = joint.init_params()
    rng = np.random.default_rng(1)
    z = joint.prior_moments(theta)[0][None] + joint.ops.asarray(rng.normal(0, 0.3, (3, 12, joint.latent_dim)))
    th_g = {**gauss.init_params(), **{k: v for k, v in theta.items() if k in gauss.params},
            ("b" if error == "proportional" else "a"): theta["b_conc" if error == "proportional" else "a_conc"]}
    th_o = {**alone.init_params(), **{k: v for k, v in theta.items() if k in alone.params}}
    z_o = z[..., 3:4] if kind == "tte" else z  # the time-to-event model's only random effect: lambda
    got = joint.ops.to_numpy(joint.log_lik(theta, z))
    expected = gauss.ops.to_numpy(gauss.log_lik(th_g, z)) + alone.ops.to_numpy(alone.log_lik(th_o, z_o))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    s_joint, s_gauss = joint.stats(theta, z), gauss.stats(th_g, z)
    np.testing.assert_allclose(joint.ops.to_numpy(s_joint["rss_resp"][..., 0]), gauss.ops.to_numpy(s_gauss["rss"]),
                               rtol=1e-12)


def test_joint_model_errors_and_refusals():
    table = _design(5, "binary")
    with pytest.raises(ModelSpecificationError, match="both an error model and an outcome"):
        nlme.NLME(_joint, _params("binary"), error={"ae": "constant"}, outcome={"ae": "binary"})
    with pytest.raises(ModelSpecificationError, match="non-Gaussian"):
        nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "gaussian"})
    with pytest.raises(ModelSpecificationError, match="error=\\{response"):
        nlme.NLME(_joint, _params("binary"), error="proportional", outcome={"ae": "binary"})
    bad = table.copy()
    bad.loc[bad.DVID == 2, "DV"] = 2.0
    with pytest.raises(DataError, match="response 'ae': binary data need DV 0 or 1"):
        _joint_model("binary").bind(bad)
    model = _joint_model("binary").bind(table)
    assert "outcome={'ae': 'binary'}" in repr(model) and "error={'conc': 'constant'}" in repr(model)
    sims = oc.simulate_observations(model, model.init_params(), 2)  # every response (the joint VPC's simulations)
    assert sims.shape == (2,) + model.data.dv.shape and np.all(np.isfinite(sims[:, model.data.mask]))
    events = _joint_model("tte").bind(_design(5, "tte")).simulate(seed=0)  # new event records, censored at 24
    assert (events[events.DVID == 2].groupby("ID").TIME.agg(["min", "max"]) == [0.0, 24.0]).all().all()
    assert len(events[events.DVID == 1]) == 5 * len(CONC_TIMES)
    with pytest.raises(ModelSpecificationError, match="continuous data"):
        model.predict(model.init_params(), model.prior_moments(model.init_params())[0])
    # dvid= names every response, Gaussian and not
    swapped = table.assign(DVID=table.DVID.map({1: 7, 2: 3}))
    m2 = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"},
                   dvid={"conc": 7, "ae": 3}).bind(swapped)
    th = m2.init_params()
    z = m2.prior_moments(th)[0][None]
    np.testing.assert_array_equal(m2.ops.to_numpy(m2.log_lik(th, z)), model.ops.to_numpy(model.log_lik(th, z)))


def _theta(model, values):
    th = model.init_params()
    return {**th, **{k: model.ops.asarray(float(v)) for k, v in values.items()}}


PK_BINARY_TRUTH = {"ka": 1.0, "V": 20.0, "CL": 2.0, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.1,
                   "e0": -2.0, "slope": 0.6, "a_conc": 0.3}


def test_importance_sampling_agrees_with_quadrature_on_a_joint_model(monkeypatch):
    """PK + binary with a random effect on CL only (quadrature exact): the IS log-likelihood with the proposal fitted
    to each individual's conditional distribution is within 4 MC SE of Gauss-Hermite quadrature."""
    monkeypatch.setattr(oc, "PILOT_SAMPLES", 500)  # (2000 by default)
    model = _joint_model("binary", random=("CL",)).bind(_design(40, "binary"))
    truth = {k: v for k, v in PK_BINARY_TRUTH.items() if k not in ("omega2_ka", "omega2_V")}
    model = model.bind(model.simulate(_theta(model, truth), seed=3))
    ll, gq = _is_and_gq(model, _theta(model, truth), num_samples=2000, num_nodes=30)
    assert abs(ll.value - gq) < 4 * ll.mc_se + 1e-3 and ll.mc_se < 0.1, (ll.value, gq, ll.mc_se)


def _is_and_gq(model, theta, num_samples: int, num_nodes: int):
    """The IS log-likelihood (proposal fitted to each individual's conditional distribution) and quadrature's."""
    mu = model.ops.to_numpy(model.prior_moments(theta)[0])
    mean, sd, df = oc.importance_proposal(model, theta, mu, np.full_like(mu, 0.3), 4)
    ll = log_likelihood_is(model, theta, mean, sd, num_samples=num_samples, df=df)
    return ll, log_likelihood_gq(model, theta, num_nodes=num_nodes).value


def _within(fit, truth, k=3.5):
    """Every estimate within ``k`` SE (Louis) of the truth (3.5: a two-sided tail of 5e-4 per parameter, as in
    tests/test_nlme_outcomes.py; the variances' SEs are the least reliable); the z-scores are printed (``-s``)."""
    se = fit.standard_errors()
    est = {n: float(v) for n, v in fit.params.items()}
    off = {n: (est[n] - truth[n]) / se[n] for n in truth}
    print({n: round(v, 2) for n, v in off.items()})
    assert all(abs(v) < k for v in off.values()), off
    return off


@pytest.mark.slow
def test_joint_pk_binary_recovery():
    """PK (constant error) + a binary event whose logit is e0 + slope·C(t): 100 simulated individuals, one seed,
    every estimate within 3.5 SE (Louis) of the truth."""
    model = _joint_model("binary").bind(_design(100, "binary"))
    data = model.simulate(_theta(model, PK_BINARY_TRUTH), seed=1)
    fit = model.fit(data, seed=0, progress=False)
    _within(fit, PK_BINARY_TRUTH)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_joint_pk_count_recovery(seed):
    """PK (proportional error) + a Poisson count with log-rate e0 + slope·C(t), 120 individuals, 3 seeds."""
    truth = {"ka": 1.0, "V": 20.0, "CL": 2.0, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.1,
             "e0": 0.2, "slope": 0.25, "b_conc": 0.15}
    model = _joint_model("poisson").bind(_design(120, "poisson"))
    data = model.simulate(_theta(model, truth), seed=seed)
    fit = model.fit(data, seed=seed, progress=False)
    _within(fit, truth)


# ----- outcomes with occasions -------------------------------------------------------------------------------------
def _occasion_design(n: int, per: int = 6, occasions: int = 2) -> pd.DataFrame:
    """``occasions`` periods of ``per`` records each, periods following each other in time (period k at 10 k + 0..)."""
    times = np.concatenate([10.0 * k + np.arange(per) for k in range(occasions)])
    return pd.DataFrame({"ID": np.repeat(np.arange(1, n + 1), len(times)), "TIME": np.tile(times, n), "DV": 0.0,
                         "OCC": np.tile(np.repeat(np.arange(1, occasions + 1), per), n)})


def _within_period(psi, d):
    return psi["theta1"] + psi["theta2"] * (d.time % 10.0)


def _log_rate(psi, d):
    return d.xp.log(psi["lam"]) + psi["slope"] * (d.time % 10.0)


@pytest.mark.parametrize("kind", ["binary", "poisson", "tte"])
def test_kappa_zero_gives_the_model_without_occasions(kind):
    """With κ = 0 an outcome model with IOV has exactly the log-likelihood of the model without IOV; κ ≠ 0 on one
    occasion changes only that occasion's terms."""
    if kind == "tte":
        spec, iov, outcome, fn = {"lambda": P(4.0), "beta": P(1.4, random=False)}, {"lambda": 0.2}, \
            oc.TimeToEvent("weibull"), None
        table = pd.DataFrame({"ID": [1, 1, 1, 1, 1, 2, 2, 2, 2], "TIME": [0, 2.5, 8, 12, 19, 0, 9, 11, 20.0],
                              "DV": [0, 1, 0, 1, 0, 0, 0, 1, 1], "OCC": [1, 1, 1, 2, 2, 1, 1, 2, 2]})
    else:
        fn = _within_period if kind == "binary" else _log_rate
        spec = ({"theta1": P(-0.5, "normal"), "theta2": P(0.2, "normal", random=False)} if kind == "binary"
                else {"lam": P(3.0), "slope": P(-0.1, "normal", random=False)})
        iov, outcome = {next(iter(spec)): 0.3}, kind
        table = _occasion_design(7)
        table["DV"] = np.random.default_rng(0).integers(0, 2 if kind == "binary" else 6, len(table)).astype(float)
    with_iov = nlme.NLME(fn, spec, outcome=outcome, iov=iov).bind(table)
    without = nlme.NLME(fn, spec, outcome=outcome).bind(table)
    theta = with_iov.init_params()
    rng = np.random.default_rng(2)
    ops = with_iov.ops
    eta = ops.asarray(rng.normal(0, 0.5, (2, with_iov.num_units, 1))) + with_iov.prior_moments(theta)[0][None, :, :1]
    zero = ops.xp.zeros_like(eta)
    z = ops.xp.concatenate([eta, zero, zero], -1)
    base = ops.to_numpy(without.log_lik(without.init_params(), eta))
    np.testing.assert_array_equal(ops.to_numpy(with_iov.log_lik(theta, z)), base)
    terms0 = ops.to_numpy(oc.log_prob(with_iov, theta, z))
    z2 = ops.xp.concatenate([eta, zero, zero + 0.4], -1)  # κ on the second occasion only
    terms2 = ops.to_numpy(oc.log_prob(with_iov, theta, z2))
    occ = ops.to_numpy(with_iov._iov.occ)
    mask = with_iov.data.mask
    assert np.array_equal(terms2[:, (occ == 0) & mask], terms0[:, (occ == 0) & mask])
    assert np.all(terms2[:, (occ == 1) & mask] != terms0[:, (occ == 1) & mask])


@pytest.mark.slow
def test_poisson_with_occasions_recovery():
    """A Poisson count with IOV on the rate: 120 individuals x 3 occasions x 4 counts, every estimate (γ² included)
    within 3.5 SE of the truth."""
    model = nlme.NLME(_log_rate, {"lam": P(2.0), "slope": P(0.0, "normal", random=False)}, outcome="poisson",
                      iov={"lam": 0.2}).bind(_occasion_design(120, per=4, occasions=3))
    truth = {"lam": 4.0, "slope": -0.15, "omega2_lam": 0.3, "gamma2_lam": 0.15}
    fit = model.fit(model.simulate(_theta(model, truth), seed=1), seed=1, progress=False)
    _within(fit, truth)


JOINT_TOML = """
[model]
file = "joint.py"
function = "joint"

[parameters]
ka = { init = 1.2, random = false }
V = { init = 18.0, random = false }
CL = 2.2
e0 = { init = -1.5, transform = "normal", random = false }
slope = { init = 0.4, transform = "normal", random = false }

[error.conc]
model = "constant"
dvid = 1

[outcome.ae]
type = "binary"
dvid = 2

[engine]
iterations = [40, 20]
"""

JOINT_PY = """
def joint(psi, d):
    xp = d.xp
    k = psi["CL"] / psi["V"]
    c = 100.0 * psi["ka"] / (psi["V"] * (psi["ka"] - k)) * (xp.exp(-k * d.time) - xp.exp(-psi["ka"] * d.time))
    return {"conc": c, "ae": psi["e0"] + psi["slope"] * c}
"""


def test_model_file_with_a_joint_outcome_builds_the_same_model(tmp_path):
    """``[error.conc]`` beside ``[outcome.ae]`` (with their DVID values) build the Python API's joint model (same
    log-likelihood to 1e-12)."""
    from latentfit.models.nlme.config import ConfigError, parse_config

    (tmp_path / "joint.py").write_text(JOINT_PY)
    cfg = parse_config(JOINT_TOML, tmp_path / "joint.toml")
    assert cfg.dvid == {"conc": 1.0, "ae": 2.0} and cfg.report["se_method"] == "sa"
    table = _design(30, "binary")
    api = _joint_model("binary", random=("CL",)).bind(table)
    table = api.simulate(_theta(api, {k: v for k, v in PK_BINARY_TRUTH.items() if k[-2:] not in ("ka", "_V")}),
                         seed=2)
    api = api.bind(table)
    from_file = cfg.model(table)
    theta = api.init_params()
    z = api.prior_moments(theta)[0][None] + api.ops.asarray(np.random.default_rng(4).normal(0, 0.2, (2, 30, 1)))
    np.testing.assert_allclose(api.ops.to_numpy(from_file.log_lik(theta, z)), api.ops.to_numpy(api.log_lik(theta, z)),
                               rtol=1e-12)
    with pytest.raises(ConfigError, match=r"\[outcome.ae\].*unknown key 'kind'"):
        parse_config(JOINT_TOML.replace('type = "binary"', 'kind = "binary"'), tmp_path / "joint.toml")


@pytest.mark.slow
def test_command_line_fits_a_joint_model(tmp_path):
    """``latentfit nlme fit`` on the joint model file: estimates with SEs (Louis) and the report (convergence and the
    VPC of each response; no residuals or GOF for a joint model with a non-Gaussian response)."""
    from latentfit.cli import main

    (tmp_path / "joint.py").write_text(JOINT_PY)
    api = _joint_model("binary", random=("CL",)).bind(_design(30, "binary"))
    table = api.simulate(_theta(api, {k: v for k, v in PK_BINARY_TRUTH.items() if k[-2:] not in ("ka", "_V")}),
                         seed=2)
    table.to_csv(tmp_path / "joint.csv", index=False)
    (tmp_path / "joint.toml").write_text(JOINT_TOML)
    rc = main(["nlme", "fit", str(tmp_path / "joint.toml"), str(tmp_path / "joint.csv"), "--out",
               str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    est = pd.read_csv(tmp_path / "out" / "estimates.csv").set_index("parameter")
    assert set(est.index) == {"ka", "V", "CL", "e0", "slope", "a_conc", "omega2_CL"} and est["se"].notna().all()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "residuals (IWRES, PWRES, NPDE) are for continuous data" in html and "fig-convergence" in html
    assert "fig-discrete_vpc" not in html and "fig-gof" not in html and "fig-joint_vpc" in html


def test_importance_sampling_agrees_with_quadrature_with_occasions(monkeypatch):
    """A Poisson model with IOV on its rate (latent η, κ_1, κ_2: quadrature on 16³ nodes is exact enough): the IS
    log-likelihood is within 4 MC SE of quadrature (measured: 0.03 apart, MC SE 0.19, 40 individuals)."""
    monkeypatch.setattr(oc, "PILOT_SAMPLES", 1000)
    truth = {"lam": 4.0, "slope": -0.15, "omega2_lam": 0.3, "gamma2_lam": 0.15}
    model = nlme.NLME(_log_rate, {"lam": P(4.0), "slope": P(-0.15, "normal", random=False)}, outcome="poisson",
                      iov={"lam": 0.15}).bind(_occasion_design(40, per=4, occasions=2))
    model = model.bind(model.simulate(_theta(model, truth), seed=5))
    ll, gq = _is_and_gq(model, _theta(model, truth), num_samples=3000, num_nodes=16)
    assert abs(ll.value - gq) < 4 * ll.mc_se + 1e-3 and ll.mc_se < 0.4, (ll.value, gq, ll.mc_se)


def test_joint_model_with_occasions_at_kappa_zero_is_the_joint_model():
    """A joint PK + binary model with IOV on CL (occasions 1: t < 5, 2: later): κ = 0 gives the joint model's
    log-likelihood without IOV exactly, and its simulation runs (each record at its occasion's parameters)."""
    table = _design(8, "binary")
    table["OCC"] = np.where(table.TIME < 5, 1, 2)
    with_iov = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"},
                         iov={"CL": 0.2}).bind(table)
    without = _joint_model("binary").bind(table)
    theta = with_iov.init_params()
    ops = with_iov.ops
    noise = ops.asarray(np.random.default_rng(3).normal(0, 0.3, (2, 8, 3)))
    eta = with_iov.prior_moments(theta)[0][None, :, :3] + noise
    z = ops.xp.concatenate([eta, ops.xp.zeros_like(eta[..., :2])], -1)
    np.testing.assert_array_equal(ops.to_numpy(with_iov.log_lik(theta, z)),
                                  ops.to_numpy(without.log_lik(without.init_params(), eta)))
    sim = with_iov.simulate(seed=1)
    assert set(sim.loc[sim.DVID == 2, "DV"]) <= {0.0, 1.0} and (sim.loc[sim.DVID == 1, "DV"] != 0).all()
