"""``fit.to_arviz(log_likelihood=True)``: the ``log_likelihood`` group ``arviz.loo`` / ``arviz.waic`` read,
``log p(y_r | z; θ̂)`` of each observation at each latent draw."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from test_draws_at_estimate import G, _data, _model


@pytest.mark.slow_on("numpyro")
def test_pointwise_log_likelihood_is_each_rows_density_and_loo_reads_it(backend):
    """On the tutorial-style random intercept (rows read through ``alpha[group]``): each entry of the group equals
    ``log N(y_r; α_{g(r)}, σ̂)`` at its own draw (scipy, 1e-10); the dims are the observation plate's; ``az.loo`` and
    ``az.waic`` run on it and ``az.loo``'s pointwise values sum to its total; the default conversion has no such
    group."""
    import arviz as az

    group, y = _data()
    fit = backend.fit("SAEM", _model(backend), backend.xp.asarray(group), G, backend.tensor(y), seed=0,
                      num_iters=(60, 40))
    data = fit.to_arviz(log_likelihood=True)
    assert "log_likelihood" in data.groups() and "log_likelihood" not in fit.to_arviz().groups()
    ll = data.log_likelihood["y"]
    alpha = np.asarray(data.posterior["alpha"])  # [chain, draw, group]
    assert ll.dims[2:] == ("obs",) and ll.shape == alpha.shape[:2] + (y.size,)
    sigma = float(fit.params["sigma"])
    np.testing.assert_allclose(np.asarray(ll), stats.norm.logpdf(y, alpha[..., group], sigma), rtol=1e-10, atol=1e-10)
    loo, waic = az.loo(data, pointwise=True), az.waic(data)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(waic.elpd_waic)
    assert float(np.sum(loo.loo_i)) == pytest.approx(loo.elpd_loo)


def test_masked_rows_are_left_out_of_the_pointwise_group():
    """Rows masked out (``obs_mask=``) are not observations: the group holds the observed rows alone (Pyro's site
    ``y_observed``), along one dim ``y_observed_element``, and the observed data keep their own dims."""
    import pyro
    import torch
    from models_pyro import masked_rows
    from test_obs_mask import G as GROUPS
    from test_obs_mask import rows_data

    import latentfit.pyro as lp

    group, x, y, m = rows_data()
    pyro.clear_param_store()
    fit = lp.SAEM(masked_rows, seed=0, progress=False, num_iters=(40, 20)).run(
        torch.as_tensor(group), torch.tensor(x), GROUPS, torch.tensor(y), torch.as_tensor(m))
    data = fit.to_arviz(log_likelihood=True)
    ll = data.log_likelihood["y_observed"]
    assert ll.dims[2:] == ("y_observed_element",) and ll.shape[2] == int(m.sum())
    assert np.isfinite(np.asarray(ll)).all()
    pyro.clear_param_store()
