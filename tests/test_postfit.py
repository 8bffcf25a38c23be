"""After the fit, on theophylline (saemix's 120-row form, constant error, no covariate) against saemix 3.4.

Reference (REFERENCES.md): log-likelihood by importance sampling −172.80 (seed-to-seed SD ≈ 0.02), by
linearisation −172.07 (−171.96 with another seed: the linearisation figure itself moves by ~0.1 with
the estimates), SEs ka 0.302, V 1.362, CL 0.246 (natural scale), a 0.0566.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from latentfit.examples.theophylline import fit as fit_theophylline  # noqa: E402

SAEMIX_SE = {"ka": 0.302, "V": 1.362, "CL": 0.246, "a": 0.0566}


@pytest.fixture(scope="module")
def fit():
    pyro.clear_param_store()
    result = fit_theophylline(seed=0, progress=False)
    yield result
    pyro.clear_param_store()


def _natural_scale_se(rec) -> dict[str, float]:
    """SEs of (ka, V, CL) = exp(μ) by the delta method, and of a."""
    labels = rec.labels
    idx = [labels.index(f"mu[{j}]") for j in range(3)]
    _, se = rec.delta(lambda x: np.exp(x[idx]))
    return {"ka": se[0], "V": se[1], "CL": se[2], "a": rec.as_dict()["a"]}


def test_importance_sampling_log_likelihood_matches_saemix(fit):
    ll = fit.log_likelihood("is", num_samples=5000, seed=0)
    rec = fit.log_likelihoods["is"]
    assert rec.mc_se < 0.1
    assert abs(ll - (-172.80)) < 0.3
    assert fit.log_likelihood() == ll  # default method for a model without an exact marginal


def test_quadrature_log_likelihood_of_a_plain_pyro_fit(fit):
    """Adaptive Gauss–Hermite (deterministic) on the plain Pyro model's fit: within the importance-sampling
    estimate's Monte-Carlo error, within 0.3 of saemix, and stable in the number of nodes."""
    ll_is = fit.log_likelihood("is", num_samples=5000, seed=0)
    ll_gq = fit.log_likelihood("gq")
    assert abs(ll_gq - ll_is) < 4 * fit.log_likelihoods["is"].mc_se + 0.01
    assert abs(ll_gq - (-172.80)) < 0.3
    assert abs(fit.log_likelihood("gq", num_nodes=9) - ll_gq) < 2e-3
    assert fit.log_likelihoods["gq"].per_unit.shape == (12,)


def test_likelihood_table_by_method(fit):
    """saemix's summary of −2LL / AIC / BIC by linearisation, importance sampling and Gaussian quadrature."""
    table = fit.likelihood_table()
    assert list(table.index) == ["lin", "is", "gq"] and list(table.columns) == ["-2LL", "AIC", "BIC"]
    assert table.loc["gq", "-2LL"] == pytest.approx(-2 * fit.log_likelihood("gq"))
    assert table.loc["is", "AIC"] == pytest.approx(fit.aic)
    assert table.loc["lin", "BIC"] == pytest.approx(-2 * fit.log_likelihood("lin") + 7 * np.log(12))


def test_linearisation_log_likelihood_matches_saemix(fit):
    # tolerance 0.15: saemix's own lin figure differs by 0.11 between two seeds of the same fit
    assert abs(fit.log_likelihood("lin") - (-172.07)) < 0.15


def test_information_criteria(fit):
    ll = fit.log_likelihood()
    assert fit.num_params == 7
    assert fit.minus_two_ll == pytest.approx(-2 * ll)
    assert fit.aic == pytest.approx(-2 * ll + 14)
    assert fit.bic == pytest.approx(-2 * ll + 7 * np.log(12))


@pytest.mark.parametrize("method", ["lin", "sa"])
def test_standard_errors_match_saemix(fit, method):
    se = _natural_scale_se(fit.covariance(method))
    for name, ref in SAEMIX_SE.items():
        assert abs(se[name] / ref - 1) < 0.2, (method, name, se[name], ref)


def test_louis_with_fresh_draws_at_the_estimate(fit):
    """SEs by Louis' formula from 60 fresh MCMC iterations at θ̂ agree with the linearisation within 20%."""
    sa = fit.standard_errors("sa", num_iters=60, seed=1)
    lin = fit.standard_errors("lin")
    for name in ("mu[0]", "mu[1]", "mu[2]", "a"):
        assert abs(sa[name] / lin[name] - 1) < 0.2, (name, sa[name], lin[name])


def test_summary_shows_se_and_rse(fit):
    df = fit.summary(method="lin")
    assert list(df.columns) == ["estimate", "se", "rse%"]
    assert (df["se"] > 0).all()
    np.testing.assert_allclose(df["rse%"], 100 * df["se"] / df["estimate"].abs())
    se = fit.standard_errors("lin")
    assert df.loc["a", "se"] == pytest.approx(se["a"])
    # without a method, summary() shows the standard errors computed last
    fit.standard_errors("sa")
    assert fit.summary().loc["a", "se"] == pytest.approx(fit.standard_errors("sa")["a"])


def test_individual_estimates(fit):
    ie = fit.individual_estimates()
    assert ie.mode.shape == ie.mean.shape == ie.sd.shape == (12, 3)
    model, theta = fit.model, fit.engine.theta_of(fit.state)
    # the modes are stationary points of log p(y_i, z_i)
    z = torch.tensor(ie.mode).requires_grad_(True)
    (g,) = torch.autograd.grad(model.log_joint(theta, z).sum(), z)
    assert float(g.abs().max()) < 1e-5
    # modes and means are close for this nearly-Gaussian posterior (within one conditional sd)
    assert np.all(np.abs(ie.mode - ie.mean) < ie.sd)
    # η-shrinkage in [0, 1): ka is well informed, V has the largest shrinkage (saemix: ~3%, ~20%, ~10%)
    assert np.all((ie.shrinkage_mode > -0.2) & (ie.shrinkage_mode < 0.5))
    assert ie.shrinkage_mode[1] == ie.shrinkage_mode.max()
    assert ie.to_frame().shape == (12, 9)


def test_residuals_and_npde(fit):
    res = fit.residuals(num_sims=1000, seed=0)
    m = res.mask
    assert m.sum() == 120
    # IWRES are standardised by the residual sd: their rms is close to 1 (IPRED from the modes over-fit a little)
    assert 0.7 < np.sqrt(np.mean(res.iwres[m] ** 2)) < 1.1
    # NPDE are N(0, 1) under the model
    assert abs(res.npde[m].mean()) < 0.25 and 0.75 < res.npde[m].std() < 1.25
    assert abs(res.pwres[m].mean()) < 0.25 and 0.75 < res.pwres[m].std() < 1.25
    # PRED is the prediction at the prior mean, IPRED at the mode
    theta = fit.engine.theta_of(fit.state)
    mean, _ = fit.model.prior_moments(theta)
    np.testing.assert_allclose(res.pred, fit.model.predict(theta, mean)[0].numpy())
    assert res.to_frame().shape[0] == 120


def test_vpc_brackets_the_observed_median(fit):
    v = fit.vpc("time", num_sims=200)
    assert v.observed.shape == (len(v.bin_x), 3) and v.simulated.shape == (len(v.bin_x), 3, 3)
    inside = (v.observed[:, 1] >= v.simulated[:, 1, 0]) & (v.observed[:, 1] <= v.simulated[:, 1, 2])
    assert inside.mean() >= 0.8


def test_plots(fit):
    figs = {
        "obs": fit.plot_observations_vs_predictions(),
        "res": fit.plot_residuals(x="time"),
        "ind": fit.plot_individual_fits(x="time"),
        "vpc": fit.plot_vpc("time", num_sims=100),
    }
    assert len(figs["obs"].axes) == 2 and len(figs["res"].axes) == 4
    assert sum(ax.get_visible() for ax in figs["ind"].axes) == 12
    assert len(figs["vpc"].axes[0].collections) >= 4  # observations + 3 prediction bands
    for f in figs.values():
        plt.close(f)
    with pytest.raises(ValueError, match="not a keyword argument"):
        fit.plot_vpc("no_such_argument")
