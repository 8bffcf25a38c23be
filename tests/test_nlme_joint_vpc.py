"""The VPC of a joint model (issue 14 items 3-4, 8): PK concentration + a binary outcome, one VPC per response.

From one set of simulated data sets (every response of a replicate from the same random-effect draws): the
Gaussian response's VPC (quantiles per time bin, prediction-corrected by default) and the binary response's discrete
VPC (proportion of events per time bin), as Monolix draws a joint model's VPC, one panel per response.  On both
backends: the observed summaries equal a hand computation; under the true parameters the observed summaries lie
within the simulated 90% intervals in most bins; the per-unit streams' simulations are valid.  (Time-to-event and
user log-likelihood responses: tests/test_nlme_joint_tte_vpc.py.)
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from test_nlme_joint_outcomes import PK_BINARY_TRUTH, _conc_only, _design, _joint, _params, _theta

from latentfit import ModelSpecificationError, plots
from latentfit.inference.diagnostics import VPC, DiscreteVPC
from latentfit.models import nlme
from latentfit.models.nlme import outcomes as oc

pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 on JAX (tests/conftest.py)


def _at_truth(backend: str, n: int = 60):
    """PK + binary data simulated at the truth (torch) and the ``backend`` model bound to them, with a stand-in fit
    at the truth."""
    sim = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"}).bind(
        _design(n, "binary"))
    data = sim.simulate(_theta(sim, PK_BINARY_TRUTH), seed=1)
    model = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"},
                      backend=backend).bind(data)
    theta = _theta(model, PK_BINARY_TRUTH)
    return model, data, types.SimpleNamespace(model=model, _theta=lambda: theta)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_joint_vpc_per_response(backend):
    model, data, fit = _at_truth(backend)
    edges = {"conc": np.array([0.0, 0.75, 1.5, 3.0, 6.0, 10.0, 13.0]), "ae": np.array([0.0, 2.0, 4.0, 8.0, 15, 30])}
    v = plots.joint_vpc_summary(fit, num_sims=200, seed=3, bins=edges, pred_corrected=False)
    assert list(v) == ["conc", "ae"] and isinstance(v["conc"], VPC) and isinstance(v["ae"], DiscreteVPC)
    # observed summaries by hand: quantiles of the concentrations and the event fraction per time bin
    for name, dvid in (("conc", 1), ("ae", 2)):
        rows = data[data.DVID == dvid]
        which = np.clip(np.searchsorted(edges[name], rows.TIME, side="right") - 1, 0, len(edges[name]) - 2)
        per_bin = [rows.DV.to_numpy()[which == b] for b in range(len(edges[name]) - 1) if (which == b).any()]
        if name == "conc":
            np.testing.assert_allclose(v[name].observed, [np.quantile(d, (0.05, 0.5, 0.95)) for d in per_bin])
        else:
            assert v[name].labels == ["P(DV = 1)"]
            np.testing.assert_allclose(v[name].observed[0], [d.mean() for d in per_bin])
    # under the true parameters the observed summaries fall within the simulated 90% intervals in most bins
    inside_c = (v["conc"].observed >= v["conc"].simulated[..., 0]) & (v["conc"].observed <= v["conc"].simulated[..., 2])
    ae = v["ae"]
    inside_a = (ae.observed >= ae.simulated[..., 0]) & (ae.observed <= ae.simulated[..., 2])
    assert inside_c.mean() >= 0.7 and inside_a.mean() >= 0.6, (inside_c, inside_a)
    # the default VPC: the concentrations prediction-corrected (here one sampling time per bin and no covariate:
    # every record of a bin has the bin's PRED, so the correction is the identity), the same binary panel
    pc = plots.joint_vpc_summary(fit, num_sims=200, seed=3, bins=edges)
    for name in ("conc", "ae"):
        np.testing.assert_allclose(pc[name].observed, v[name].observed, rtol=1e-12)
        np.testing.assert_allclose(pc[name].simulated, v[name].simulated, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])  # JAX: 13 s, compiles
def test_joint_simulations_on_unit_streams_and_refusals(backend):
    """Simulations on the individuals' streams: concentrations real, events 0/1, NaN off the records; the Gaussian
    response's simulations have the residual SD of the truth around the prediction at the drawn random effects (the
    simulations of the two responses share one set of draws).  A joint model's time-to-event records hold NaN (their
    first events go to the Kaplan-Meier VPC: tests/test_nlme_joint_tte_vpc.py); a user log-likelihood response without
    a simulator is refused, naming the response."""
    model, data, _ = _at_truth(backend, n=20)
    theta = _theta(model, PK_BINARY_TRUTH)
    y = oc.simulate_observations(model, theta, 50, seed=2, unit_ids=np.arange(model.num_units))
    conc = model.data.mask & (model.data.dv >= 0) & (np.asarray(model.ops.to_numpy(model._resp.index)) == 0)
    ae = model.data.mask & ~conc
    assert np.all(np.isfinite(y[:, model.data.mask])) and np.all(np.isnan(y[:, ~model.data.mask]))
    assert set(np.unique(y[:, ae])) <= {0.0, 1.0} and len(np.unique(y[:, conc])) > 100
    z = model.ops.to_numpy(model.sample_prior(theta, model.ops.key(4), 300))
    f = model.ops.to_numpy(model.structural_prediction(theta, model.ops.asarray(z)))
    y = oc.simulate_observations(model, theta, 300, seed=4)  # the same prior draws as the line above
    resid = (y - f)[:, conc]
    assert abs(resid.std() / PK_BINARY_TRUTH["a_conc"] - 1) < 0.05 and abs(resid.mean()) < 0.01
    tte = nlme.NLME(_conc_only, _params("tte"), error={"conc": "constant"}, outcome={"ae": oc.TimeToEvent("weibull")},
                    backend=backend).bind(_design(4, "tte"))
    y = oc.simulate_observations(tte, tte.init_params(), 3)  # the event records: first events instead (Kaplan-Meier)
    events = tte.data.mask & (np.asarray(tte.ops.to_numpy(tte._resp.index)) == 1)
    assert np.all(np.isnan(y[:, events])) and np.all(np.isfinite(y[:, tte.data.mask & ~events]))
    user = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "loglik"},
                     backend=backend).bind(_design(4, "binary"))
    with pytest.raises(ModelSpecificationError, match="response 'ae': a user log-likelihood response has no simulator"):
        oc.simulate_observations(user, user.init_params(), 3)


def test_joint_vpc_figure(tmp_path):
    """plot_vpc of a joint model: one panel per response (titles, axes), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    _, _, fit = _at_truth("torch", n=30)
    fig = plots.plot_vpc(fit, num_sims=50, seed=1)
    assert [ax.get_title() for ax in fig.axes] == ["conc", "ae"]
    assert fig.axes[0].get_ylabel() == "conc (prediction-corrected)" and fig.axes[1].get_ylabel() == "ae: proportion"
    fig.savefig(tmp_path / "joint_vpc.png")
    assert (tmp_path / "joint_vpc.png").stat().st_size > 10_000
