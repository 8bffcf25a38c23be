"""Visual predictive checks of NLME fits with discrete, count and time-to-event outcomes (issue 14, items 4 and 8):
proportions per category and time bin, and the Kaplan-Meier curve of the first event, as Monolix and saemix draw
them.  The simulations behind the bands are checked against closed-form expectations at the truth."""

from __future__ import annotations

import types

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from test_nlme_outcomes import _simulated, _theta  # noqa: E402

from latentfit.models import nlme  # noqa: E402
from latentfit.models.nlme import outcomes as oc  # noqa: E402
from latentfit.plots import discrete_vpc_summary, plot_vpc  # noqa: E402


def _at_truth(case: str, **options):
    """A bound model of simulated data and a stand-in for a fit at the true parameters."""
    model, truth = _simulated(case, **options)
    theta = _theta(model, truth)
    return model, truth, types.SimpleNamespace(model=model, _theta=lambda: theta)


def test_kaplan_meier_matches_a_hand_worked_product_limit():
    # S(1) = 4/5; at 2 one event among 4 at risk (the censoring at 2 counts after it): 0.6; at 3: 0.6 * 1/2
    time = np.array([[1.0, 2.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 5.0, 5.0]])
    event = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=bool)
    grid = np.array([0.0, 1.0, 1.5, 2.0, 3.0, 5.0])
    km = oc.kaplan_meier(time, event, grid)
    np.testing.assert_allclose(km[0], [1.0, 0.8, 0.8, 0.6, 0.3, 0.3], rtol=1e-15)
    np.testing.assert_allclose(km[1], [1.0, 1.0, 1.0, 0.6, 0.6, 0.6], rtol=1e-15)  # two events of 5 at risk


def test_first_events_of_the_data_are_read_from_the_records():
    model, _, _ = _at_truth("tte_weibull", num_ids=30)
    t, e = oc.first_event_times(model)
    df = model.table
    for i, ident in enumerate(model.data.ids):
        rows = df[(df.ID == ident) & (df.DV == 1) & (df.TIME > 0)]
        if len(rows):
            assert e[0, i] and t[0, i] == rows.TIME.min()
        else:
            assert not e[0, i] and t[0, i] == df[df.ID == ident].TIME.max()


def test_simulated_first_event_survival_equals_its_closed_form():
    """At the truth the simulated Kaplan-Meier curves average to the marginal survival of the first event,
    E_η[exp(−(t/λ_i)^β)], λ_i = λ e^{η_i}, computed by Gauss-Hermite quadrature (80 000 simulated individuals:
    within 4 Monte-Carlo SE)."""
    model, truth, _ = _at_truth("tte_weibull")
    t, e = oc.first_event_times(model, _theta(model, truth), 400, seed=5)
    grid = np.array([0.5, 1.0, 2.0, 3.0, 5.0, 7.5])
    km = oc.kaplan_meier(t, e, grid).mean(0)
    x, w = np.polynomial.hermite_e.hermegauss(60)
    lam = truth["lambda"] * np.exp(np.sqrt(truth["omega2_lambda"]) * x)
    exact = (w * np.exp(-(grid[:, None] / lam) ** truth["beta"])).sum(1) / w.sum()
    se = np.sqrt(exact * (1 - exact) / t.size)
    assert np.all(np.abs(km - exact) < 4 * se), (km, exact)


def test_simulated_binary_data_have_the_closed_form_proportions():
    model, truth, _ = _at_truth("binary")
    y = oc.simulate_observations(model, _theta(model, truth), 200, seed=2)
    assert y.shape == (200,) + model.data.dv.shape and set(np.unique(y)) <= {0.0, 1.0}
    x, w = np.polynomial.hermite_e.hermegauss(60)
    t = model.data.time[0]
    logit = truth["theta1"] + np.sqrt(truth["omega2_theta1"]) * x[:, None] + truth["theta2"] * t
    exact = (w[:, None] / (1 + np.exp(-logit))).sum(0) / w.sum()
    frac = y.mean((0, 1))
    se = np.sqrt(exact * (1 - exact) / (y.shape[0] * y.shape[1]))
    assert np.all(np.abs(frac - exact) < 4 * se), (frac, exact)


@pytest.mark.parametrize("case", ["binary", "ordinal", "poisson"])
def test_vpc_proportions_per_bin(case):
    """Observed curves are the data's proportions per time (each time its own bin here); at the truth the observed
    curves lie inside the simulated 90 % intervals in most bins (calibration), and the intervals are ordered."""
    model, _, fit = _at_truth(case)
    v = discrete_vpc_summary(fit, num_sims=200, seed=1)
    assert v.kind == "proportion" and v.simulated.shape == v.observed.shape + (3,)
    dv, tt = model.data.dv[model.data.mask], model.data.time[model.data.mask]
    times = np.unique(tt)
    np.testing.assert_array_equal(v.x, times)
    values = {"binary": [1.0], "ordinal": [0.0, 1.0, 2.0, 3.0]}.get(case)
    if values is not None:
        assert v.labels == [f"P(DV = {k:g})" for k in values]
        expect = np.array([[np.mean(dv[tt == s] == k) for s in times] for k in values])
    else:  # counts: P(DV <= k) at the observed quartiles
        cuts = np.unique(np.round(np.quantile(dv, [0.25, 0.5, 0.75])))
        assert v.labels == [f"P(DV <= {k:g})" for k in cuts]
        expect = np.array([[np.mean(dv[tt == s] <= k) for s in times] for k in cuts])
    np.testing.assert_allclose(v.observed, expect, rtol=1e-14)
    lo, med, hi = np.moveaxis(v.simulated, -1, 0)
    assert np.all(lo <= med) and np.all(med <= hi)
    assert np.mean((v.observed >= lo) & (v.observed <= hi)) >= 0.7


def test_vpc_figures_of_outcome_models():
    _, _, fit = _at_truth("ordinal")
    fig = plot_vpc(fit, num_sims=50)
    assert [ax.get_title() for ax in fig.axes] == [f"P(DV = {k})" for k in range(4)]
    _, _, fit = _at_truth("tte_constant", num_ids=60)
    fig = plot_vpc(fit, num_sims=50)
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "probability of no event yet"
    with pytest.raises(ValueError, match="Kaplan-Meier"):
        plot_vpc(fit, x="TIME")
    with pytest.raises(ValueError, match="discrete"):
        discrete_vpc_summary(types.SimpleNamespace(model=object()))


def _permuted(model, perm):
    """The model bound to the table with its individuals in the order ``perm``."""
    df = model.table
    ids = model.data.ids[perm]
    return model.bind(pd.concat([df[df.ID == i] for i in ids], ignore_index=True))


def _stream_fit(model, theta, ids):
    """A stand-in for a fit with ``rng="per_unit"`` and these unit ids."""
    return types.SimpleNamespace(model=model, _theta=lambda: theta,
                                 engine=types.SimpleNamespace(rng="per_unit", _unit_ids=np.asarray(ids),
                                                              ops=model.ops))


@pytest.mark.parametrize("case", ["binary", "ordinal", "poisson", "negative_binomial", "tte_weibull"])
def test_per_unit_streams_give_permuted_draws_and_the_same_vpc(case):
    """A fit with ``rng="per_unit"`` draws each individual's replicates from its own stream (random effects from its
    normals, the observations / first-event times by inversion at its uniforms): the individuals in another order
    give the permuted replicates and the same VPC (1e-12), a block of individuals (a distributed process's shard) gives
    those individuals' replicates, and the replicates have the law of the global-stream simulator (means per time
    within 4 Monte-Carlo SE of the two samples' difference)."""
    model, truth = _simulated(case, **({"num_ids": 80} if case.startswith("tte") else {}))
    theta = _theta(model, truth)
    n = model.num_units
    perm = np.random.default_rng(3).permutation(n)
    other = _permuted(model, perm)
    a, b = _stream_fit(model, theta, np.arange(n)), _stream_fit(other, theta, perm)
    shard = perm[:7]
    sub = _stream_fit(_permuted(model, shard), theta, shard)
    if case.startswith("tte"):
        draws = [oc.first_event_times(f.model, theta, 40, 2, unit_ids=f.engine._unit_ids) for f in (a, b, sub)]
        for k in range(2):  # times, events
            np.testing.assert_allclose(draws[1][k], draws[0][k][:, perm], rtol=0, atol=1e-12)
            np.testing.assert_allclose(draws[2][k], draws[0][k][:, shard], rtol=0, atol=1e-12)
        t, e = draws[0]
        ref_t, ref_e = oc.first_event_times(model, theta, 40, 2)  # the global stream: another sample, the same law
        sims, ref = np.where(e, t, np.inf), np.where(ref_e, ref_t, np.inf)
        grid = np.array([1.0, 2.0, 4.0, 7.0])
        surv = [(x[..., None] > grid).reshape(-1, len(grid)).mean(0) for x in (sims, ref)]
        se = np.sqrt(surv[1] * (1 - surv[1]) * 2 / sims.size)
    else:
        draws = [oc.simulate_observations(f.model, theta, 30, 2, unit_ids=f.engine._unit_ids) for f in (a, b, sub)]
        np.testing.assert_allclose(draws[1], draws[0][:, perm], rtol=0, atol=1e-12)
        np.testing.assert_allclose(draws[2], draws[0][:, shard], rtol=0, atol=1e-12)
        ref = oc.simulate_observations(model, theta, 30, 2)  # the global stream: another sample, the same law
        assert np.isnan(draws[0]).sum() == np.isnan(ref).sum()
        surv = [x.mean((0, 1)) for x in (draws[0], ref)]
        se = np.sqrt((draws[0].reshape(-1, draws[0].shape[-1]).var(0) + ref.reshape(-1, ref.shape[-1]).var(0))
                     / (draws[0].shape[0] * n))
    assert np.all(np.abs(surv[0] - surv[1]) < 4 * se), (surv, se)
    va, vb = (discrete_vpc_summary(f, num_sims=30, seed=2) for f in (a, b))
    assert va.kind == ("survival" if case.startswith("tte") else "proportion")
    for name in ("x", "observed", "simulated", "bin_edges"):
        if getattr(va, name) is not None:
            np.testing.assert_allclose(getattr(vb, name), getattr(va, name), rtol=0, atol=1e-12, err_msg=name)
    assert np.all(va.simulated[..., 0] <= va.simulated[..., 2]) and np.any(va.simulated[..., 0] < va.simulated[..., 2])


def test_user_simulator_on_unit_streams_gets_a_generator_of_the_unit_ids():
    """A user log-likelihood's simulator draws every individual from one generator: on per-unit streams (e.g. a
    distributed fit; before: refused) it gets one seeded from the seed and the unit ids, so the same ids give the same
    VPC and other ids other draws; the global stream still uses the seed's generator."""
    model, truth = _simulated("binary")

    def loglik(psi, d):
        f = psi["theta1"] + psi["theta2"] * d.time
        return d.dv * f - d.xp.logaddexp(0.0 * f, f)

    def sim(psi, d, rng):
        f = psi["theta1"] + psi["theta2"] * np.asarray(d.time)
        return (rng.random(f.shape) < 1 / (1 + np.exp(-f))).astype(float)

    spec = {"theta1": nlme.Parameter(-0.5, "normal"), "theta2": nlme.Parameter(0.1, "normal", random=False)}
    user = nlme.NLME(loglik, spec, outcome=oc.LogLik(simulate_fn=sim)).bind(model.table)
    theta = _theta(user, truth)
    assert discrete_vpc_summary(types.SimpleNamespace(model=user, _theta=lambda: theta), num_sims=5).kind == \
        "proportion"
    ids = np.arange(user.num_units)
    a, b = (discrete_vpc_summary(_stream_fit(user, theta, ids), num_sims=5) for _ in range(2))
    np.testing.assert_array_equal(a.simulated, b.simulated)
    sims = [oc.simulate_observations(user, theta, 5, seed=0, unit_ids=i) for i in (ids, ids, ids + 1)]
    np.testing.assert_array_equal(sims[0], sims[1])
    assert not np.array_equal(sims[0], sims[2])


def test_distributed_fit_without_unit_streams_is_refused():
    """A distributed fit whose engine kept no unit streams cannot simulate per process: refused."""
    _, _, fit = _at_truth("binary")
    fit.engine = types.SimpleNamespace(ops=types.SimpleNamespace(world_size=2))  # the torch.distributed shim's mark
    with pytest.raises(ValueError, match="per-unit streams"):
        discrete_vpc_summary(fit, num_sims=10)
