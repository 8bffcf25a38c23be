"""Visual predictive checks of NLME fits with discrete, count and time-to-event outcomes (issue 14, items 4 and 8):
proportions per category and time bin, and the Kaplan-Meier curve of the first event, as Monolix and saemix draw
them.  The simulations behind the bands are checked against closed-form expectations at the truth."""

from __future__ import annotations

import types

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from test_nlme_outcomes import _simulated, _theta  # noqa: E402

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


def test_distributed_fit_is_refused():
    """A distributed fit's outcome simulations are not on the units' streams yet: refused, not a per-process VPC."""
    _, _, fit = _at_truth("binary")
    fit.engine = types.SimpleNamespace(ops=types.SimpleNamespace(world_size=2))  # the torch.distributed shim's mark
    with pytest.raises(NotImplementedError, match="distributed fit"):
        discrete_vpc_summary(fit, num_sims=10)
