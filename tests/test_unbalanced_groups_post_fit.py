"""Post-fit quantities of a tutorial-style model with unbalanced groups, against closed forms.

The model is written as the Pyro and NumPyro tutorials write it: a random intercept in a plate over groups, the
observations in a plate over rows reading ``alpha[group_idx]``, and groups of 3 to 11 rows.  It is linear and Gaussian,
so every quantity has a closed form:
- the marginal log-likelihood (each group a multivariate normal),
- the conditional mode (= mean) and sd of each intercept,
- the linearised log-likelihood (exact for a linear model).

The per-unit layout pads each group to the largest one.  A padded entry repeated the site's element 0, which belongs
to group 0.  On torch (Pyro) the batched Jacobian of the predictions is taken by reverse passes summed over units, so
group 0's Jacobian took a term from every padded entry: its Gauss–Newton precision was ~640x too large, its EBE was off
(0.91 against 1.02 on 60 groups), and the "gq" log-likelihood was off by 1.6 (-278.91 against -277.28); here group
0's term was -8.746 against -7.355.  JAX's forward mode put those terms on the padded entries themselves (masked), so
the NumPyro model was right: it stays here as the same check.  The linearised log-likelihood was also off by ~1e-7
per unit with padding on torch, because the masked entries were counted in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

GROUPS = 40


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 12, GROUPS)
    sizes[0] = 11  # group 0 (whose first row every padded entry repeated) the largest
    group_idx = np.repeat(np.arange(GROUPS), sizes)
    x = rng.normal(size=group_idx.size)
    y = rng.normal(1.0, 0.7, GROUPS)[group_idx] + 0.5 * x + rng.normal(0.0, 0.4, group_idx.size)
    return group_idx, x, y


def _exact(params: dict[str, float], group_idx: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per group: the marginal log-density, and the posterior mean and sd of its intercept."""
    mu, beta, tau, sigma = (params[k] for k in ("mu", "beta", "tau", "sigma"))
    ll, mean, sd = [], [], []
    for g in range(GROUPS):
        sel = group_idx == g
        n = int(sel.sum())
        cov = tau ** 2 * np.ones((n, n)) + sigma ** 2 * np.eye(n)
        ll.append(multivariate_normal(mu + beta * x[sel], cov).logpdf(y[sel]))
        precision = 1.0 / tau ** 2 + n / sigma ** 2
        mean.append((mu / tau ** 2 + np.sum(y[sel] - beta * x[sel]) / sigma ** 2) / precision)
        sd.append(precision ** -0.5)
    return np.array(ll), np.array(mean), np.array(sd)


def _fit_pyro():
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints

    import latentfit.pyro as lp

    group_idx, x, y = _data()

    def model(group_idx, x, num_groups, y=None):
        mu = pyro.param("mu", torch.tensor(0.0))
        beta = pyro.param("beta", torch.tensor(0.0))
        tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("groups", num_groups):
            alpha = pyro.sample("alpha", dist.Normal(mu, tau))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(alpha[group_idx] + beta * x, sigma), obs=y)

    pyro.clear_param_store()
    fit = lp.SAEM(model, num_iters=(60, 40), seed=1, progress=False).run(
        torch.tensor(group_idx), torch.tensor(x), GROUPS, torch.tensor(y))
    pyro.clear_param_store()
    return fit


def _fit_numpyro():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    import latentfit.numpyro as ln

    group_idx, x, y = _data()

    def model(group_idx, x, num_groups, y=None):
        mu = numpyro.param("mu", 0.0)
        beta = numpyro.param("beta", 0.0)
        tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("groups", num_groups):
            alpha = numpyro.sample("alpha", dist.Normal(mu, tau))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(alpha[group_idx] + beta * x, sigma), obs=y)

    return ln.SAEM(model, num_iters=(60, 40), progress=False).run(
        0, jnp.asarray(group_idx), jnp.asarray(x), GROUPS, jnp.asarray(y))


@pytest.mark.parametrize("fit_fn", [_fit_pyro, _fit_numpyro], ids=["pyro", "numpyro"])
def test_quadrature_ebes_and_linearisation_of_unbalanced_groups_are_the_closed_forms(fit_fn):
    fit = fit_fn()
    params = {k: float(np.asarray(v)) for k, v in fit.params.items()}
    group_idx, x, y = _data()
    ll, mean, sd = _exact(params, group_idx, x, y)
    gq = fit.log_likelihood("gq")
    np.testing.assert_allclose(fit.log_likelihoods["gq"].per_unit, ll, rtol=0, atol=1e-8)
    assert gq == pytest.approx(ll.sum(), abs=1e-7)
    assert fit.log_likelihood("lin") == pytest.approx(ll.sum(), abs=1e-7)  # linear in the intercepts: exact
    est = fit.individual_estimates()
    np.testing.assert_allclose(np.asarray(est.mode)[:, 0], mean, rtol=0, atol=1e-8)
    # the linearisation SEs of the fixed effects: the expected information of the marginal model, Σ_g X_gᵀ V_g⁻¹ X_g
    info = np.zeros((2, 2))
    for g in range(GROUPS):
        sel = group_idx == g
        v = params["tau"] ** 2 * np.ones((sel.sum(), sel.sum())) + params["sigma"] ** 2 * np.eye(sel.sum())
        design = np.stack([np.ones(sel.sum()), x[sel]], 1)
        info += design.T @ np.linalg.solve(v, design)
    se = fit.standard_errors(method="lin")
    np.testing.assert_allclose([se["mu"], se["beta"]], np.sqrt(np.diag(np.linalg.inv(info))), rtol=1e-7)
    # importance sampling around the conditional moments agrees within its Monte-Carlo error
    is_ = fit.log_likelihood("is")
    assert abs(is_ - ll.sum()) < 4 * fit.log_likelihoods["is"].mc_se + 1e-3
    assert np.all(np.isfinite(sd))


@pytest.mark.parametrize("fit_fn", [_fit_pyro, _fit_numpyro], ids=["pyro", "numpyro"])
def test_vpc_and_residual_plots_take_x_per_row(fit_fn):
    """The x-axis of the VPC and of the residual plots given as the user has it, one value per row of the plate over
    rows (or by the name of the model's argument), not in the [groups, rows] layout the library pads to: each
    observation gets its own row's x, the same VPC as with x in that layout; an x of another length names both
    shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentfit.plots import vpc_summary

    group_idx, x, y = _data()
    fit = fit_fn()
    obs, mask = (np.asarray(fit.model.ops.to_numpy(a)) for a in fit.model.observations())
    mask = mask.astype(bool)
    laid = fit.model.observation_layout(x)
    assert laid.shape == obs.shape
    # the observations in that layout are y's rows: x follows them, row by row
    np.testing.assert_array_equal(fit.model.observation_layout(y)[mask], obs[mask])
    order = np.argsort(obs[mask])
    np.testing.assert_array_equal(laid[mask][order], x[np.argsort(y)])
    by_row = vpc_summary(fit, x, num_sims=50, seed=1)
    by_name = vpc_summary(fit, "x", num_sims=50, seed=1)
    padded = vpc_summary(fit, laid, num_sims=50, seed=1)
    for v in (by_row, by_name):
        np.testing.assert_array_equal(v.simulated, padded.simulated)
        np.testing.assert_array_equal(v.bin_edges, padded.bin_edges)
    assert sorted(by_row.x) == sorted(x)
    for fig in (fit.plot_vpc(x, num_sims=50), fit.plot_residuals(x="x")):
        plt.close(fig)
    with pytest.raises(ValueError, match=r"x must have the shape of the observed site 'obs'.*got \(5,\)"):
        vpc_summary(fit, x[:5], num_sims=50)
