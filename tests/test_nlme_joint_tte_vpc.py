"""The VPC of joint models with a time-to-event or a user log-likelihood response (issue 14 items 3-4, 8).

* PK concentration + repeated time-to-event (Weibull or constant hazard on the individual λ): the joint VPC's panel of
  the event response is the Kaplan-Meier VPC of the first event (observed product-limit curve against the simulated
  curves' interval), simulated from the same random-effect draws as the concentrations, censored at each individual's
  last record of the response.  Tested: the observed curve equals a hand-worked product limit; under the truth it lies
  in the simulated 90% band; the simulated first events follow the hazard (mean of min(T, C) = the closed form averaged
  over the random effects, to Monte-Carlo error, on the global and the per-unit streams); they use the random effects
  whose ψ also drive the concentrations (E[H_i(min(T, C))] = P(event), the martingale identity); per-unit streams do
  not depend on the individuals' order; ``model.simulate`` writes new event records; occasion effects on the other
  parameters keep one hazard per individual, on the hazard's own parameters they simulate (piecewise hazard:
  tests/test_nlme_occasions_tte.py).
* A user log-likelihood response (``outcomes.LogLik(simulate_fn=sim)``): its VPC from the user's simulator (discrete
  for integer data, continuous otherwise); without a simulator the refusal names the response and the fix; on
  per-unit streams the simulator gets a generator seeded from the seed and the unit ids.
"""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
from scipy.special import gamma as gamma_fn
from scipy.special import gammainc
from test_nlme_joint_outcomes import CONC_TIMES, _conc, _conc_only, _theta

from latentfit import ModelSpecificationError, plots
from latentfit.inference.diagnostics import VPC, DiscreteVPC
from latentfit.models import nlme
from latentfit.models.nlme import outcomes as oc

pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 on JAX (tests/conftest.py)
P = nlme.Parameter
TRUTH = {"ka": 1.0, "V": 20.0, "CL": 2.0, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.1, "a_conc": 0.3,
         "lambda": 8.0, "omega2_lambda": 0.3, "beta": 1.5}


def _spec(hazard: str) -> dict:
    spec = {"ka": P(1.2), "V": P(18.0), "CL": P(2.2), "lambda": P(6.0)}
    return {**spec, "beta": P(1.3, random=False)} if hazard == "weibull" else spec


def _model(hazard: str = "weibull", backend: str = "torch") -> nlme.NLME:
    return nlme.NLME(_conc_only, _spec(hazard), error={"conc": "constant"},
                     outcome={"ae": oc.TimeToEvent(hazard)}, backend=backend)


def _design(n: int, ends=(6.0, 12.0, 24.0)) -> pd.DataFrame:
    """Concentrations (DVID 1) and event records (DVID 2: a start at 0 and a censoring at the end of follow-up, which
    cycles through ``ends``) of ``n`` individuals (DV placeholders: simulated over)."""
    rows = []
    for i in range(1, n + 1):
        rows += [dict(ID=i, TIME=t, DV=1.0, DVID=1) for t in CONC_TIMES]
        rows += [dict(ID=i, TIME=0.0, DV=0.0, DVID=2), dict(ID=i, TIME=ends[(i - 1) % len(ends)], DV=0.0, DVID=2)]
    return pd.DataFrame(rows).sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True)


def _fit(model, values):
    theta = _theta(model, {k: v for k, v in values.items() if k in model.init_params()})
    return types.SimpleNamespace(model=model, _theta=lambda: theta), theta


def _at_truth(backend: str, n: int = 80, hazard: str = "weibull", seed: int = 1):
    """Data simulated at the truth (torch; new event records) and the ``backend`` model bound to them."""
    sim = _model(hazard).bind(_design(n))
    data = sim.simulate(_fit(sim, TRUTH)[1], seed=seed)
    model = _model(hazard, backend).bind(data)
    fit, theta = _fit(model, TRUTH)
    return model, data, fit, theta


def test_observed_kaplan_meier_of_the_joint_vpc_is_the_product_limit():
    """First events 2 (event), 3 (censored), 4 (event; a later event ignored), 6 (event at the last record), 8
    (censored), an individual without event records left out: S = 1, 4/5 from 2, 4/5 · 2/3 from 4, · 1/2 from 6."""
    events = {1: [(0, 0), (2.0, 1), (5.0, 1), (10.0, 0)], 2: [(0, 0), (8.0, 0)], 3: [(0, 0), (4.0, 1), (10.0, 0)],
              4: [(0, 0), (3.0, 0)], 5: [(0, 0), (6.0, 1)], 6: []}
    rows = []
    for i, recs in events.items():
        rows += [dict(ID=i, TIME=t, DV=1.0 + 0.1 * i, DVID=1) for t in CONC_TIMES]
        rows += [dict(ID=i, TIME=float(t), DV=float(d), DVID=2) for t, d in recs]
    table = pd.DataFrame(rows).sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True)
    model = _model().bind(table)
    fit, _ = _fit(model, TRUTH)
    v = plots.joint_vpc_summary(fit, num_sims=20, seed=0, num_points=9)
    assert list(v) == ["conc", "ae"] and isinstance(v["conc"], VPC) and isinstance(v["ae"], DiscreteVPC)
    km = v["ae"]
    assert km.kind == "survival"
    np.testing.assert_allclose(km.x, np.arange(9.0))
    s4, s6 = 0.8 * 2 / 3, 0.8 * 2 / 3 / 2
    np.testing.assert_allclose(km.observed[0], [1, 1, 0.8, 0.8, s4, s4, s6, s6, s6], rtol=1e-12)
    assert np.all(km.simulated[0, :, 0] <= km.simulated[0, :, 2]) and km.simulated[0, 0, 1] == 1.0
    t, e = oc.first_event_times(model, response="ae")
    np.testing.assert_array_equal(t[0, :5], [2.0, 8.0, 4.0, 3.0, 6.0])
    np.testing.assert_array_equal(e[0], [True, False, True, False, True, False])
    assert t[0, 5] == -np.inf  # no records of the response: left out of the curves
    with pytest.raises(ModelSpecificationError, match="time-to-event responses \\['ae'\\]"):
        oc.first_event_times(model, response="conc")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_observed_kaplan_meier_lies_in_the_simulated_band_under_the_truth(backend):
    """Data simulated at the truth (80 individuals, follow-up 6, 12 or 24): the observed Kaplan-Meier curve of the
    first event lies within the simulated 90% band at >= 70% of the grid times (measured with data seed 1 and 300
    replicates: 88% of the 101 times on torch, 83% on JAX; over 30 data sets on torch the fraction averages 0.91, from
    0.21 to 1: the curve is one autocorrelated path), and the concentrations' quantiles in most bins."""
    model, data, fit, _ = _at_truth(backend)
    v = plots.joint_vpc_summary(fit, num_sims=300, seed=3)
    km = v["ae"]
    inside = (km.observed[0] >= km.simulated[0, :, 0] - 1e-12) & (km.observed[0] <= km.simulated[0, :, 2] + 1e-12)
    assert inside.mean() >= 0.7, inside.mean()
    conc = v["conc"]
    inside_c = (conc.observed >= conc.simulated[..., 0]) & (conc.observed <= conc.simulated[..., 2])
    assert inside_c.mean() >= 0.7, inside_c
    # the data's first events: every individual has its start record, and the events before its end of follow-up
    ev = data[data.DVID == 2]
    assert (ev.groupby("ID").TIME.min() == 0).all() and ev.DV.isin([0.0, 1.0]).all()
    assert (ev.groupby("ID").TIME.max().to_numpy() <= np.resize([6.0, 12.0, 24.0], 80)).all()


def _closed_form(hazard: str, lam: float, omega2: float, beta: float, ends: np.ndarray) -> tuple[float, float]:
    """``(E min(T, C), P(T <= C))`` averaged over the individuals' ends ``C`` and over λ_i = λ e^η, η ~ N(0, ω²)
    (Gauss-Hermite, 60 nodes): ``E min(T, C) = ∫_0^C S = λ Γ(1 + 1/β) P(1/β, (C/λ)^β)``, ``P(T <= C) = 1 −
    e^{−(C/λ)^β}`` (β = 1: constant hazard)."""
    b = 1.0 if hazard == "constant" else beta
    x, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    li = lam * np.exp(np.sqrt(omega2) * x)[:, None]  # [Q, 1]
    h = (ends[None] / li) ** b
    mean = (w[:, None] * li * gamma_fn(1 + 1 / b) * gammainc(1 / b, h)).sum(0).mean()
    prob = (w[:, None] * (1 - np.exp(-h))).sum(0).mean()
    return mean, prob


@pytest.mark.parametrize("backend, hazard", [("torch", "constant"), ("torch", "weibull"), ("jax", "weibull")])
@pytest.mark.parametrize("streams", [False, True])
def test_simulated_first_events_follow_the_hazard(backend, hazard, streams):
    """The simulated first events (400 replicates of 60 individuals) censored at the design's ends 6 / 12 / 24: the
    mean of min(T, C) and the event fraction equal the closed form averaged over λ's random effect within 4 MC SE;
    global stream and per-unit streams (measured, in MC SE, global / per-unit: torch constant 1.4 / 0.02, Weibull
    1.1 / 0.25; JAX Weibull 0.30 / -0.73)."""
    model = _model(hazard, backend).bind(_design(60))
    fit, theta = _fit(model, TRUTH)
    ids = np.arange(model.num_units) + 100 if streams else None
    t, e = oc.first_event_times(model, theta, 400, seed=5, unit_ids=ids, response="ae")
    ends = np.resize([6.0, 12.0, 24.0], 60)
    assert t.shape == (400, 60) and np.all(t <= ends) and np.all(t[~e] == np.broadcast_to(ends, t.shape)[~e])
    mean, prob = _closed_form(hazard, TRUTH["lambda"], TRUTH["omega2_lambda"], TRUTH["beta"], ends)
    assert abs(t.mean() - mean) < 4 * t.std() / np.sqrt(t.size), (t.mean(), mean)
    assert abs(e.mean() - prob) < 4 * np.sqrt(prob * (1 - prob) / e.size), (e.mean(), prob)


def test_first_events_and_concentrations_share_the_random_effect_draws():
    """One set of draws for every response: with ψ of the prior draws ``model.sample_prior(θ, key(seed), K)`` (the
    draws the concentrations' replicates are built on: their residuals around f(ψ) have SD a_conc), the simulated
    first events satisfy E[H_i(min(T, C))] = P(event) (the counting process' martingale), which fails for the λ of
    other draws (checked: the same identity with the draws shuffled across individuals is off by > 10 MC SE)."""
    model = _model("weibull").bind(_design(60))
    _, theta = _fit(model, TRUTH)
    y, first = oc.simulate_joint(model, theta, 400, seed=7)
    t, e = first["ae"]
    z = model.sample_prior(theta, model.ops.key(7), 400)
    psi = {k: model.ops.to_numpy(v)[..., 0] for k, v in model._psi(model._mu(theta), z).items()}
    h = (t / psi["lambda"]) ** TRUTH["beta"]
    assert abs(h.mean() - e.mean()) < 4 * h.std() / np.sqrt(h.size), (h.mean(), e.mean())
    shuffled = (t / np.roll(psi["lambda"], 1, axis=1)) ** TRUTH["beta"]
    assert abs(shuffled.mean() - e.mean()) > 10 * shuffled.std() / np.sqrt(h.size)
    f = model.ops.to_numpy(model.structural_prediction(theta, z))
    conc = model.data.mask & (np.asarray(model.ops.to_numpy(model._resp.index)) == 0)
    resid = (y - f)[:, conc]
    assert abs(resid.std() / TRUTH["a_conc"] - 1) < 0.05
    assert np.all(np.isnan(y[:, model.data.mask & ~conc]))  # the event records: first events instead


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_per_unit_streams_do_not_depend_on_the_individuals_order(backend):
    """rng='per_unit': each individual's concentrations and first events come from its stream (seed, unit id); the
    individuals in reverse order (their unit ids with them) get the same replicates, and the same VPC."""
    model, data, _, theta = _at_truth(backend, n=20)
    ids = np.arange(20) * 3 + 1
    y, first = oc.simulate_joint(model, theta, 30, seed=2, unit_ids=ids)
    rev = data.assign(ID=21 - data.ID).sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True)
    other = _model("weibull", backend).bind(rev)
    y_r, first_r = oc.simulate_joint(other, theta, 30, seed=2, unit_ids=ids[::-1].copy())
    np.testing.assert_allclose(first_r["ae"][0][:, ::-1], first["ae"][0], rtol=1e-12)
    np.testing.assert_array_equal(first_r["ae"][1][:, ::-1], first["ae"][1])
    np.testing.assert_allclose(y_r[:, ::-1], y, rtol=1e-12)
    assert 0.05 < first["ae"][1].mean() < 0.95
    fit = types.SimpleNamespace(model=model, _theta=lambda: theta,
                                engine=types.SimpleNamespace(rng="per_unit", _unit_ids=ids, ops=model.ops))
    rev_ids = ids[::-1].copy()
    fit_r = types.SimpleNamespace(model=other, _theta=lambda: theta,
                                  engine=types.SimpleNamespace(rng="per_unit", _unit_ids=rev_ids, ops=other.ops))
    va, vb = plots.joint_vpc_summary(fit, num_sims=30, seed=2), plots.joint_vpc_summary(fit_r, num_sims=30, seed=2)
    np.testing.assert_allclose(vb["ae"].simulated, va["ae"].simulated, rtol=1e-12)
    np.testing.assert_allclose(vb["ae"].observed, va["ae"].observed, rtol=1e-12)


def test_simulate_writes_new_event_records():
    """model.simulate of a joint model with a time-to-event response: the concentrations at their records, the event
    response's records replaced by a start at 0, the simulated events and a censoring at the individual's last record
    time (the design's), a valid data set for the model."""
    model = _model("constant").bind(_design(30))
    _, theta = _fit(model, TRUTH)
    table = model.simulate(theta, seed=4)
    conc = table[table.DVID == 1]
    assert len(conc) == 30 * len(CONC_TIMES) and conc.DV.gt(0).all()
    ev = table[table.DVID == 2]
    ends = np.resize([6.0, 12.0, 24.0], 30)
    last = ev.groupby("ID").tail(1)
    np.testing.assert_array_equal(last.TIME.to_numpy(), ends)
    assert (ev.groupby("ID").head(1).TIME == 0).all() and (ev.DV == 1).sum() > 10
    assert (table.groupby("ID").TIME.diff().dropna() >= 0).all() and list(table.ID.unique()) == list(range(1, 31))
    refit = _model("constant").bind(table)  # a valid data set for the model
    assert np.isfinite(refit.ops.to_numpy(refit.log_lik(theta, refit.prior_moments(theta)[0]))).all()


def _iov_model(iov: dict) -> nlme.NLME:
    return nlme.NLME(_conc_only, _spec("constant"), error={"conc": "constant"},
                     outcome={"ae": oc.TimeToEvent("constant")}, iov=iov)


def test_occasions_on_the_pk_parameters_keep_one_hazard_and_on_the_hazard_simulate():
    """IOV on CL (two occasions), none on λ: the hazard is one per individual, so the first events are drawn as
    without IOV (mean of min(T, C) and event fraction = the closed form within 4 MC SE), the data simulate and the
    joint VPC has its Kaplan-Meier panel; IOV on λ itself (before: refused): the VPC and model.simulate run, the
    simulated event records carrying each occasion."""
    table = _design(60).assign(OCC=lambda d: np.where(d.TIME < 3, 1, 2))
    model = _iov_model({"CL": 0.2}).bind(table)
    theta = _theta(model, {**{k: v for k, v in TRUTH.items() if k != "beta"}, "gamma2_CL": 0.1})
    t, e = oc.first_event_times(model, theta, 400, seed=5, response="ae")
    mean, prob = _closed_form("constant", TRUTH["lambda"], TRUTH["omega2_lambda"], 1.0, np.resize([6.0, 12, 24], 60))
    assert abs(t.mean() - mean) < 4 * t.std() / np.sqrt(t.size), (t.mean(), mean)
    assert abs(e.mean() - prob) < 4 * np.sqrt(prob * (1 - prob) / e.size), (e.mean(), prob)
    data = model.simulate(theta, seed=3)
    fit = types.SimpleNamespace(model=_iov_model({"CL": 0.2}).bind(data), _theta=lambda: theta)
    v = plots.joint_vpc_summary(fit, num_sims=100, seed=1)
    assert v["ae"].kind == "survival" and v["ae"].observed[0, 0] == 1.0 and isinstance(v["conc"], VPC)
    hazard = _iov_model({"lambda": 0.2}).bind(table)
    th = _theta(hazard, {"gamma2_lambda": 0.1})
    v = plots.joint_vpc_summary(types.SimpleNamespace(model=hazard, _theta=lambda: th), num_sims=3)
    assert v["ae"].kind == "survival"
    events = hazard.simulate(th, seed=0).query("DVID == 2")
    assert set(events.OCC) == {1, 2} and (events.groupby("ID").TIME.first() == 0).all()


# ----- user log-likelihood responses --------------------------------------------------------------------------------
def _user(psi, d):
    """Concentrations and the log-likelihood of a count response ~ Poisson(e^{e0 + slope · C}) or of a continuous one
    ~ N(e0 + slope · C, 0.5²) (the DV's kind chosen by ``d.regressors["KIND"]``)."""
    xp = d.xp
    c = _conc(psi, d)
    m = psi["e0"] + psi["slope"] * c
    pois = d.dv * m - xp.exp(m)  # (up to log y!)
    norm = -0.5 * ((d.dv - m) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi))
    return {"conc": c, "ll": xp.where(d.regressors["KIND"] > 0, norm, pois)}


def _user_sim(psi, d, rng):
    """The simulator of :func:`_user`'s ``ll`` response: ``sim(psi, data, rng) -> DV [N, T]`` (numpy)."""
    time = np.asarray(d.time)
    k = psi["CL"] / psi["V"]
    c = 100.0 * psi["ka"] / (psi["V"] * (psi["ka"] - k)) * (np.exp(-k * time) - np.exp(-psi["ka"] * time))
    m = psi["e0"] + psi["slope"] * c
    kind = np.asarray(d.regressors["KIND"])
    return np.where(kind > 0, m + 0.5 * rng.standard_normal(m.shape), rng.poisson(np.exp(np.minimum(m, 20))))


USER_TRUTH = {"a_conc": 0.3, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.1}


def _user_model(simulate=True):
    spec = {"ka": P(1.0), "V": P(20.0), "CL": P(2.0), "e0": P(0.5, "normal", random=False),
            "slope": P(0.2, "normal", random=False)}
    return nlme.NLME(_user, spec, error={"conc": "constant"},
                     outcome={"ll": oc.LogLik(simulate_fn=_user_sim if simulate else None)}, regressors=("KIND",))


def _user_data(kind: int, n: int = 40) -> pd.DataFrame:
    design = _design(n).query("DVID == 1").assign(KIND=kind)
    ll = design.assign(DVID=2, TIME=design.TIME + 0.25)
    table = pd.concat([design, ll]).sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True)
    return _user_model().bind(table).simulate(_theta(_user_model().bind(table), USER_TRUTH), seed=kind)


@pytest.mark.parametrize("kind", [0, 1])
def test_user_log_likelihood_response_vpc_from_its_simulator(kind):
    """A user log-likelihood response with ``simulate_fn``: counts (kind 0) get the discrete VPC (P(DV <= k) at the
    observed quartiles, observed by hand), continuous data (kind 1) the uncorrected VPC of their quantiles; at the
    simulating parameters most bins' observed summaries lie in the simulated 90% intervals."""
    data = _user_data(kind)
    model = _user_model().bind(data)
    fit, _ = _fit(model, USER_TRUTH)
    v = plots.joint_vpc_summary(fit, num_sims=200, seed=1)
    ll = v["ll"]
    rows = data[data.DVID == 2]
    which = np.clip(np.searchsorted(ll.bin_edges, rows.TIME, side="right") - 1, 0, len(ll.bin_edges) - 2)
    per_bin = [rows.DV.to_numpy()[which == b] for b in range(len(ll.bin_edges) - 1) if (which == b).any()]
    if kind == 0:
        assert isinstance(ll, DiscreteVPC) and ll.labels[0].startswith("P(DV <= ")
        cut = float(ll.labels[0].split("<= ")[1].rstrip(")"))
        np.testing.assert_allclose(ll.observed[0], [np.mean(d <= cut) for d in per_bin])
    else:
        assert isinstance(ll, VPC)
        np.testing.assert_allclose(ll.observed, [np.quantile(d, (0.05, 0.5, 0.95)) for d in per_bin])
    inside = (ll.observed >= ll.simulated[..., 0]) & (ll.observed <= ll.simulated[..., 2])
    assert inside.mean() >= 0.7, inside


def test_user_log_likelihood_response_without_simulator_is_refused_with_the_fix():
    data = _user_data(1, n=10)
    model = _user_model(simulate=False).bind(data)
    fit, theta = _fit(model, USER_TRUTH)
    fix = (r"response 'll': .*no simulator.*outcome=\{'ll': nlme.outcomes.LogLik\(simulate_fn=sim\)\}"
           r".*sim\(psi, data, rng\)")
    with pytest.raises(ModelSpecificationError, match=fix):
        plots.joint_vpc_summary(fit, num_sims=3)
    with pytest.raises(ModelSpecificationError, match="response 'll'"):
        model.simulate(theta)
    with_sim = _user_model().bind(data)
    streams = types.SimpleNamespace(model=with_sim, _theta=lambda: theta,
                                    engine=types.SimpleNamespace(rng="per_unit", _unit_ids=np.arange(10),
                                                                 ops=with_sim.ops))
    a, b = (plots.joint_vpc_summary(streams, num_sims=3)["ll"] for _ in range(2))  # (before: refused)
    np.testing.assert_array_equal(a.simulated, b.simulated)


def test_joint_vpc_figure_has_the_kaplan_meier_panel(tmp_path):
    """plot_vpc of PK + time-to-event: a concentration panel and a Kaplan-Meier panel (titles, axes), saved."""
    import matplotlib

    matplotlib.use("Agg")
    _, _, fit, _ = _at_truth("torch", n=40)
    fig = plots.plot_vpc(fit, num_sims=100, seed=1)
    assert [ax.get_title() for ax in fig.axes] == ["conc", "ae"]
    assert fig.axes[1].get_ylabel() == "ae: probability of no event yet" and fig.axes[1].get_xlabel() == "TIME"
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert labels == ["simulated 90% PI", "simulated median", "observed (Kaplan-Meier)"]
    fig.savefig(tmp_path / "joint_tte_vpc.png")
    assert (tmp_path / "joint_tte_vpc.png").stat().st_size > 10_000


TTE_TOML = """
[model]
file = "pk.py"
function = "conc"

[parameters]
ka = { init = 1.2, random = false }
V = { init = 18.0, random = false }
CL = 2.2
lambda = 6.0
beta = { init = 1.3, random = false }

[error.conc]
model = "constant"
dvid = 1

[outcome.ae]
type = "tte"
hazard = "weibull"
scale = "lambda"
shape = "beta"
dvid = 2

[engine]
iterations = [40, 20]
"""

TTE_PY = """
def conc(psi, d):
    xp = d.xp
    k = psi["CL"] / psi["V"]
    c = 100.0 * psi["ka"] / (psi["V"] * (psi["ka"] - k)) * (xp.exp(-k * d.time) - xp.exp(-psi["ka"] * d.time))
    return {"conc": c}
"""


@pytest.mark.slow
def test_command_line_report_has_the_joint_vpc_with_the_kaplan_meier_panel(tmp_path):
    """``latentfit nlme fit`` of PK + Weibull time-to-event (40 individuals, 40 + 20 iterations; 31 s CPU): the report
    has the joint VPC figure (the concentration and Kaplan-Meier panels) embedded, and writes joint_vpc.png."""
    from latentfit.cli import main

    (tmp_path / "pk.py").write_text(TTE_PY)
    (tmp_path / "pk.toml").write_text(TTE_TOML)
    model = _model().bind(_design(40))
    model.simulate(_fit(model, TRUTH)[1], seed=1).to_csv(tmp_path / "pk.csv", index=False)
    rc = main(["nlme", "fit", str(tmp_path / "pk.toml"), str(tmp_path / "pk.csv"), "--out", str(tmp_path / "out"),
               "--no-progress"])
    assert rc == 0
    html = (tmp_path / "out" / "report.html").read_text()
    figure = html[html.index('<figure id="fig-joint_vpc">'):]
    assert "data:image/png;base64," in figure[:figure.index("</figure>")]
    assert (tmp_path / "out" / "joint_vpc.png").read_bytes()[:4] == b"\x89PNG"
    assert "Kaplan-Meier" in figure[:figure.index("</figure>")]  # the caption


USER_PY = """
import numpy as np


def joint(psi, d):
    xp = d.xp
    k = psi["CL"] / psi["V"]
    c = 100.0 * psi["ka"] / (psi["V"] * (psi["ka"] - k)) * (xp.exp(-k * d.time) - xp.exp(-psi["ka"] * d.time))
    m = psi["e0"] + psi["slope"] * c
    return {"conc": c, "ll": -0.5 * ((d.dv - m) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi))}


def sim(psi, d, rng):
    t = np.asarray(d.time)
    k = psi["CL"] / psi["V"]
    c = 100.0 * psi["ka"] / (psi["V"] * (psi["ka"] - k)) * (np.exp(-k * t) - np.exp(-psi["ka"] * t))
    return psi["e0"] + psi["slope"] * c + 0.5 * rng.standard_normal(c.shape)
"""

USER_TOML = """
[model]
file = "user.py"
function = "joint"

[parameters]
ka = 1.0
V = 20.0
CL = 2.0
e0 = { init = 0.5, transform = "normal", random = false }
slope = { init = 0.2, transform = "normal", random = false }

[error.conc]
model = "constant"
dvid = 1

[outcome.ll]
type = "loglik"
simulate = "sim"
dvid = 2

[engine]
iterations = [30, 20]
"""


def test_model_file_names_the_user_simulator(tmp_path):
    """``[outcome.ll] type = "loglik"`` with ``simulate = "sim"``: the function of the [model] file becomes the
    response's simulator (model.simulate, the joint VPC: a continuous VPC for continuous data); errors name the key."""
    from latentfit.models.nlme.config import ConfigError, parse_config

    (tmp_path / "user.py").write_text(USER_PY)
    cfg = parse_config(USER_TOML, tmp_path / "user.toml")
    table = _user_data(1, n=30).drop(columns="KIND")
    model = cfg.model(table)
    assert callable(model.outcome.outcomes["ll"].simulate_fn)
    data = model.simulate(_theta(model, USER_TRUTH), seed=2)
    assert data[data.DVID == 2].DV.nunique() == len(data[data.DVID == 2])  # continuous draws
    fit, _ = _fit(cfg.model(data), USER_TRUTH)
    v = plots.joint_vpc_summary(fit, num_sims=100, seed=1)
    assert isinstance(v["ll"], VPC) and isinstance(v["conc"], VPC)
    with pytest.raises(ConfigError, match=r"\[outcome.ll\] simulate = \.\.\. names the simulator of a user"):
        parse_config(USER_TOML.replace('type = "loglik"', 'type = "binary"'), tmp_path / "user.toml")
    with pytest.raises(ConfigError, match="function 'nosuch' is not defined"):
        parse_config(USER_TOML.replace('simulate = "sim"', 'simulate = "nosuch"'), tmp_path / "user.toml")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:standard errors set to NaN")  # a 50-iteration fit: SEs are not the point
def test_command_line_report_of_a_user_log_likelihood_response(tmp_path):
    """``latentfit nlme fit`` of PK + a user log-likelihood response with its simulator (30 individuals, 30 + 20
    iterations): the report has the joint VPC figure."""
    from latentfit.cli import main

    (tmp_path / "user.py").write_text(USER_PY)
    (tmp_path / "user.toml").write_text(USER_TOML)
    _user_data(1, n=30).drop(columns="KIND").to_csv(tmp_path / "user.csv", index=False)
    rc = main(["nlme", "fit", str(tmp_path / "user.toml"), str(tmp_path / "user.csv"), "--out", str(tmp_path / "out"),
               "--no-progress"])
    assert rc == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert '<figure id="fig-joint_vpc">' in html and (tmp_path / "out" / "joint_vpc.png").exists()


def test_report_without_a_user_simulator_keeps_the_convergence_figure():
    """The report of a fit with a user log-likelihood (one outcome, or a joint model's response) but no simulator:
    the convergence figure and no VPC (which would raise), after a short torch fit; with a simulator, the VPC."""
    import matplotlib

    matplotlib.use("Agg")
    from latentfit import report

    def logit_ll(psi, d):
        f = psi["theta1"] + psi["theta2"] * d.time
        return d.dv * f - d.xp.logaddexp(0.0 * f, f)

    rng = np.random.default_rng(0)
    binary = pd.DataFrame({"ID": np.repeat(np.arange(1, 21), 4), "TIME": np.tile(np.arange(4.0), 20),
                           "DV": rng.integers(0, 2, 80).astype(float)})
    spec = {"theta1": P(0.0, "normal"), "theta2": P(0.0, "normal", random=False)}
    single = nlme.NLME(logit_ll, spec, outcome="loglik").fit(binary, seed=0, progress=False, num_iters=(10, 5))
    assert list(report.figures(single, vpc_simulations=5)) == ["convergence"]
    data = _user_data(1, n=10)
    joint = _user_model(simulate=False).fit(data, seed=0, progress=False, num_iters=(10, 5))
    assert list(report.figures(joint, vpc_simulations=5)) == ["convergence"]
    with_sim = _user_model().fit(data, seed=0, progress=False, num_iters=(10, 5))
    assert list(report.figures(with_sim, vpc_simulations=5)) == ["joint_vpc", "convergence"]


def test_one_user_log_likelihood_with_continuous_data_gets_the_quantile_vpc(tmp_path):
    """A model with one user log-likelihood outcome, a simulator and continuous data: the VPC of the 5/50/95%
    quantiles per time bin (observed by hand; most bins inside the simulated 90% intervals at the simulating values),
    drawn in one panel (before: proportions at rounded quartiles, as for counts)."""
    import matplotlib

    matplotlib.use("Agg")

    def gauss_ll(psi, d):
        return -0.5 * ((d.dv - psi["e0"] - psi["slope"] * d.time) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi))

    def sim(psi, d, rng):
        mean = psi["e0"] + psi["slope"] * np.asarray(d.time)
        return mean + 0.5 * rng.standard_normal(mean.shape)

    spec = {"e0": P(1.0, "normal"), "slope": P(0.3, "normal", random=False)}
    design = pd.DataFrame({"ID": np.repeat(np.arange(1, 61), 5), "TIME": np.tile(np.arange(5.0), 60), "DV": 0.0})
    model = nlme.NLME(gauss_ll, spec, outcome=oc.LogLik(simulate_fn=sim)).bind(design)
    theta = _theta(model, {"omega2_e0": 0.4})
    data = model.simulate(theta, seed=1)
    model = model.bind(data)
    fit = types.SimpleNamespace(model=model, _theta=lambda: theta)
    v = plots.discrete_vpc_summary(fit, num_sims=200, seed=2, bins=np.arange(-0.5, 5.0))
    assert isinstance(v, VPC)
    np.testing.assert_allclose(v.observed, [np.quantile(data.DV[data.TIME == t], (0.05, 0.5, 0.95)) for t in range(5)])
    inside = (v.observed >= v.simulated[..., 0]) & (v.observed <= v.simulated[..., 2])
    assert inside.mean() >= 0.7, inside
    fig = plots.plot_vpc(fit, num_sims=50, seed=1)
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "TIME"
    fig.savefig(tmp_path / "user_vpc.png")
