"""``fit.to_arviz(posterior_predictive=True)``: replicated data ``y_rep ~ p(y | z; θ̂)`` at each latent draw of the
posterior group (``az.plot_ppc``, ``az.loo_pit``), and the exact-E-step fits' posterior group (the EM family's
mixtures: labels drawn from the responsibilities at θ̂)."""

from __future__ import annotations

import functools

import matplotlib
import numpy as np
import pytest
from backends import Backend
from test_draws_at_estimate import G, _data, _model

matplotlib.use("Agg")
az = pytest.importorskip("arviz")


@functools.cache
def _gaussian_fit(name: str):
    """SAEM on the tutorial-style random intercept (``alpha`` in plate "group", rows in plate "obs" reading
    ``alpha[group]``), fitted once per backend."""
    backend = Backend(name)
    backend.reset()
    group, y = _data()
    fit = backend.fit("SAEM", _model(backend), backend.xp.asarray(group), G, backend.tensor(y), seed=0,
                      num_iters=(60, 40), progress=False)
    backend.reset()
    return fit


def _within(err: np.ndarray, tol: np.ndarray | float, what: str) -> None:
    bad = np.abs(err) > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} outside, worst {np.max(np.abs(err) / tol):.2f}x"


@pytest.mark.slow_on("numpyro")
def test_gaussian_replicates_have_the_conditional_mean_and_variance(backend):
    """Each ``y_rep`` at draw s is ``N(α_{g(r)}^{(s)}, σ̂²)``: the residuals ``y_rep − α[group]`` over the 400 kept
    draws have mean 0 per row (4 Monte-Carlo SEs ``σ̂ / √S``) and variance ``σ̂²`` (4 SEs of a sample variance);
    given one fixed draw of the latents repeated 4000 times, the mean of ``y_rep`` per row is that draw's ``α_{g(r)}``
    (4 SEs ``σ̂ / √4000``).  Dims and coords are observed_data's after (chain, draw); the same seed gives the same
    draws, another seed others; the default conversion has no such group."""
    group, y = _data()
    fit = _gaussian_fit(backend.name)
    data = fit.to_arviz(posterior_predictive=True)
    assert "posterior_predictive" in data.groups() and "posterior_predictive" not in fit.to_arviz().groups()
    rep, obs = data.posterior_predictive["y"], data.observed_data["y"]
    alpha = np.asarray(data.posterior["alpha"])  # [chain, draw, group]
    assert rep.dims == ("chain", "draw") + obs.dims == ("chain", "draw", "obs")
    assert rep.shape == alpha.shape[:2] + obs.shape
    np.testing.assert_array_equal(rep["obs"].values, obs["obs"].values)
    sigma = float(fit.params["sigma"])
    resid = np.asarray(rep) - alpha[..., group]
    count = resid.shape[0] * resid.shape[1]
    _within(resid.reshape(count, -1).mean(0), 4 * sigma / np.sqrt(count), "row means")
    var = resid.var()
    assert abs(var / sigma**2 - 1) < 4 * np.sqrt(2 / resid.size), (var, sigma**2)
    again = fit.to_arviz(posterior_predictive=True).posterior_predictive["y"]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(rep))
    other = fit.to_arviz(posterior_predictive=True, seed=1).posterior_predictive["y"]
    assert not np.allclose(np.asarray(other), np.asarray(rep))
    # many replicates at one draw of the latents: their mean is the mean given that draw
    model, ops = fit.model, fit.model.ops
    one = fit.latent_draws[0, -1]  # [G, 1] unconstrained (= alpha)
    many = model.sample_observations(fit._theta(), ops.asarray(np.repeat(one[None], 4000, 0)),
                                     ops.key(3))["y"]
    assert many.shape == (4000, y.size)
    _within(many.mean(0) - one[group, 0], 4 * sigma / np.sqrt(4000), "means given one draw")
    _within(many.std(0) / sigma - 1, 4 / np.sqrt(2 * 4000), "sds given one draw")


@pytest.mark.slow_on("numpyro")
def test_plot_ppc_and_loo_pit_read_the_group(backend):
    """``az.plot_ppc`` draws the replicates against the data (Agg backend) and ``az.loo_pit`` (which needs the
    ``log_likelihood`` group too) gives one value in [0, 1] per observation."""
    import matplotlib.pyplot as plt

    fit = _gaussian_fit(backend.name)
    data = fit.to_arviz(log_likelihood=True, posterior_predictive=True)
    axes = az.plot_ppc(data, num_pp_samples=20, random_seed=0)
    assert axes is not None
    plt.close("all")
    pit = np.asarray(az.loo_pit(idata=data, y="y"))
    assert pit.shape == (data.observed_data["y"].size,) and np.all((pit >= 0) & (pit <= 1))


def _poisson_model(backend: Backend):
    """Tutorial-style Poisson GLMM: ``u`` in plate "group", counts in plate "rows" reading ``u[group]``."""
    if backend.name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        def model(group, x, num_groups, counts):
            mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
            omega = pyro.param("omega", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
            beta = pyro.param("beta", torch.tensor(0.0, dtype=x.dtype))
            with pyro.plate("group", num_groups):
                u = pyro.sample("u", dist.Normal(mu, omega))
            with pyro.plate("rows", len(x)):
                pyro.sample("counts", dist.Poisson(torch.exp(u[group] + beta * x)), obs=counts)
        return model
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(group, x, num_groups, counts):
        mu = numpyro.param("mu", jnp.array(0.0, dtype=x.dtype))
        omega = numpyro.param("omega", jnp.array(1.0, dtype=x.dtype), constraint=constraints.positive)
        beta = numpyro.param("beta", jnp.array(0.0, dtype=x.dtype))
        with numpyro.plate("group", num_groups):
            u = numpyro.sample("u", dist.Normal(mu, omega))
        with numpyro.plate("rows", len(x)):
            numpyro.sample("counts", dist.Poisson(jnp.exp(u[group] + beta * x)), obs=counts)
    return model


@pytest.mark.slow_on("numpyro")
def test_poisson_replicates_are_counts_with_the_conditional_rate(backend):
    """Counts: the replicates are non-negative integers with observed_data's dims; averaged over the draws, their
    mean and variance per row both equal the mean over the draws of the rate ``exp(u_g + β̂ x)`` (a Poisson's mean
    and variance), the mean to 4 Monte-Carlo SEs, the variance within 25%; ``az.plot_ppc`` reads them as discrete
    data."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(10)
    num = 20
    group = rng.permutation(np.repeat(np.arange(num), rng.integers(3, 12, num)))
    x = rng.standard_normal(group.size)
    counts = rng.poisson(np.exp((0.5 + 0.6 * rng.standard_normal(num))[group] + 0.3 * x)).astype(float)
    fit = backend.fit("SAEM", _poisson_model(backend), backend.xp.asarray(group), backend.tensor(x), num,
                      backend.tensor(counts), seed=0, num_iters=(60, 40), progress=False)
    data = fit.to_arviz(posterior_predictive=True)
    rep = data.posterior_predictive["counts"]
    assert rep.dims == ("chain", "draw", "rows") and rep.shape[2:] == counts.shape
    values = np.asarray(rep)
    assert np.all(values >= 0) and np.array_equal(values, np.round(values))
    u = np.asarray(data.posterior["u"])
    rate = np.exp(u[..., group] + float(fit.params["beta"]) * x)
    count = values.shape[0] * values.shape[1]
    flat, rate = values.reshape(count, -1), rate.reshape(count, -1)
    # E[y_rep] = E[rate]; Var(mean of y_rep) = E[rate]/S + Var(rate)/S, the draws being one per latent draw
    se = np.sqrt((rate.mean(0) + rate.var(0)) / count)
    _within(flat.mean(0) - rate.mean(0), 4 * se, "row means")
    # Var(y_rep) = E[rate] + Var(rate) (the law of total variance)
    np.testing.assert_allclose(flat.var(0).mean(), (rate.mean(0) + rate.var(0)).mean(), rtol=0.25)
    az.plot_ppc(data, num_pp_samples=10, random_seed=0)
    plt.close("all")


def test_event_dims_nested_plates_and_masked_cells_follow_observed_data(backend):
    """A ``.to_event(1)`` latent in ``plate(dim=-2)`` with the observations in nested plates and ``obs_mask=``: each
    observed site's replicates have its observed_data's dims after (chain, draw), masked cells drawn too (finite)."""
    rng = np.random.default_rng(1)
    n, t_len = 10, 4
    t = np.tile(np.linspace(0.0, 3.0, t_len), (n, 1))
    y = 1.0 + 0.5 * t + 0.3 * rng.standard_normal((n, t_len))
    mask = rng.random((n, t_len)) > 0.2
    fit = backend.fit("SAEM", backend.models.obs_mask_slope, backend.tensor(t), backend.tensor(mask),
                      backend.tensor(np.where(mask, y, np.nan)), num_iters=(10, 10), num_chains=2, progress=False)
    data = fit.to_arviz(posterior_predictive=True)
    lead = fit.latents["b"].shape[:2]
    observed = data.observed_data
    assert set(data.posterior_predictive.data_vars) == set(observed.data_vars)
    for name, obs in observed.data_vars.items():
        rep = data.posterior_predictive[name]
        assert rep.dims == ("chain", "draw") + obs.dims == ("chain", "draw", "unit", "obs"), name
        assert rep.shape == lead + obs.shape and np.isfinite(np.asarray(rep)).all(), name


def _event_model(backend: Backend):
    """Padded ``[units, times]`` data: ``b`` in the unit plate, ``y ~ Normal(b + slope t, σ).to_event(1)`` inside it
    (as the README's padded theophylline model writes its observation)."""
    if backend.name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        def model(t, y):
            mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
            omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
            slope = pyro.param("slope", torch.tensor(0.0, dtype=y.dtype))
            sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
            with pyro.plate("id", y.shape[0]):
                b = pyro.sample("b", dist.Normal(mu, omega))
                pyro.sample("y", dist.Normal(b[:, None] + slope * t, sigma).to_event(1), obs=y)
        return model
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(t, y):
        mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
        omega = numpyro.param("omega", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
        slope = numpyro.param("slope", jnp.array(0.0, dtype=y.dtype))
        sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
        with numpyro.plate("id", y.shape[0]):
            b = numpyro.sample("b", dist.Normal(mu, omega))
            numpyro.sample("y", dist.Normal(b[:, None] + slope * t, sigma).to_event(1), obs=y)
    return model


def test_event_observations_keep_their_event_dim(backend):
    """A ``.to_event(1)`` observation ``[id, time]``: replicates ``(chain, draw, id, y_dim_1)`` as observed_data, each
    draw's row centred on its own ``b_i + slope t`` (residual mean within 4 Monte-Carlo SEs)."""
    rng = np.random.default_rng(2)
    n, t_len = 12, 5
    t = np.tile(np.linspace(0.0, 2.0, t_len), (n, 1))
    y = (1.0 + 0.7 * rng.standard_normal(n))[:, None] + 0.4 * t + 0.3 * rng.standard_normal((n, t_len))
    fit = backend.fit("SAEM", _event_model(backend), backend.tensor(t), backend.tensor(y), num_iters=(30, 20),
                      num_chains=2, progress=False)
    data = fit.to_arviz(posterior_predictive=True)
    rep, obs = data.posterior_predictive["y"], data.observed_data["y"]
    assert obs.dims == ("id", "y_dim_1") and rep.dims == ("chain", "draw", "id", "y_dim_1")
    b = np.asarray(data.posterior["b"])
    resid = np.asarray(rep) - (b[..., None] + float(fit.params["slope"]) * t)
    sigma = float(fit.params["sigma"])
    assert abs(resid.mean()) < 4 * sigma / np.sqrt(resid.size)
    assert abs(resid.var() / sigma**2 - 1) < 4 * np.sqrt(2 / resid.size)


def test_masked_rows_are_drawn_and_laid_out_as_observed_data():
    """Rows left out by ``.mask(m)`` (Pyro, grouped rows): drawn too, the group laid out as observed_data (NaN there
    in the data, finite draws in the replicates)."""
    import pyro
    import torch
    from models_pyro import masked_rows
    from test_obs_mask import G as GROUPS
    from test_obs_mask import rows_data

    import latentfit.pyro as lp

    group, x, y, m = rows_data()
    pyro.clear_param_store()
    fit = lp.SAEM(masked_rows, seed=0, progress=False, num_iters=(40, 20)).run(
        torch.as_tensor(group), torch.tensor(x), GROUPS, torch.tensor(y), torch.as_tensor(m), how="mask")
    pyro.clear_param_store()
    data = fit.to_arviz(posterior_predictive=True)
    rep, obs = data.posterior_predictive["y"], data.observed_data["y"]
    assert rep.dims == ("chain", "draw") + obs.dims and rep.shape[2:] == obs.shape
    assert np.isfinite(np.asarray(rep)).all()


# ----- the EM family: exact posterior draws of the labels -----------------------------------------------------------
def _mixture_data(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.5]])  # overlapping: responsibilities away from 0 and 1
    return centres[rng.integers(0, 3, n)] + 0.8 * rng.standard_normal((n, 2))


def _check_labels(fit, r: np.ndarray, name: str = "z") -> None:
    """The posterior's labels: 4 chains of independent draws whose frequencies per unit match the responsibilities
    ``r [N, K]`` (4 binomial SEs, floored at 1/S), that ``fit.latents`` holds and ``az.summary`` reads."""
    data = fit.to_arviz()
    z = data.posterior[name]
    n, k = r.shape
    assert z.dims[:2] == ("chain", "draw") and z.shape[0] == 4 and z.shape[2:] == (n,)
    labels = np.asarray(z).reshape(-1, n)
    count = labels.shape[0]
    np.testing.assert_array_equal(fit.latents[name].reshape(-1, n), labels)
    freq = np.stack([(labels == j).mean(0) for j in range(k)], 1)
    _within(freq - r, 4 * np.sqrt(np.maximum(r * (1 - r), 1.0 / count) / count), "label frequencies")
    np.testing.assert_allclose(freq.sum(0), r.sum(0), atol=4 * np.sqrt((r * (1 - r)).sum(0) / count).max())
    summary = az.summary(data, var_names=[name], kind="stats")
    assert len(summary) == n and np.isfinite(summary["mean"]).all()
    np.testing.assert_allclose(summary["mean"].to_numpy(), labels.mean(0), atol=0.01)


@pytest.mark.parametrize("engine", ["EM", "IEM", "FIEM", "SEMVR", "MiniBatchEM"])
def test_gaussian_mixture_posterior_labels_follow_the_responsibilities(engine):
    """``GaussianMixture`` fitted by each exact-E-step engine (which keep no draws): ``to_arviz()`` now has a
    posterior group of the labels drawn from the responsibilities at θ̂ (it had none); the replicated points of
    component k have its mean and covariance (4 SEs); the default ``standard_errors`` still work and
    ``conditional_moments`` still asks for continuous draws."""
    import torch

    from latentfit.inference.em import EM
    from latentfit.inference.fiem import FIEM
    from latentfit.inference.iem import IEM, MiniBatchEM
    from latentfit.inference.semvr import SEMVR
    from latentfit.models.mixture import GaussianMixture

    cls = {"EM": EM, "IEM": IEM, "FIEM": FIEM, "SEMVR": SEMVR, "MiniBatchEM": MiniBatchEM}[engine]
    options = {"EM": {}, "IEM": {"batch_size": 50}, "FIEM": {"batch_size": 50}, "SEMVR": {"batch_size": 50},
               "MiniBatchEM": {"batch_size": 100}}[engine]
    x = _mixture_data()
    fit = cls(GaussianMixture(torch.tensor(x), 3, "full", seed=1), num_epochs=30, progress=False, **options).run()
    assert fit.latent_draws is None
    r = fit.model.ops.to_numpy(fit.model.responsibilities(fit._theta())[0])
    _check_labels(fit, r)
    if engine != "EM":
        return
    data = fit.to_arviz(posterior_predictive=True)
    rep, obs = data.posterior_predictive["obs"], data.observed_data["obs"]
    assert rep.dims == ("chain", "draw") + obs.dims and rep.shape[2:] == x.shape
    labels, points = np.asarray(data.posterior["z"]).reshape(-1), np.asarray(rep).reshape(-1, 2)
    for k in range(3):
        got = points[labels == k]
        cov = fit.params["covariances"][k]
        se = np.sqrt(np.diag(cov) / len(got))
        _within(got.mean(0) - fit.params["locs"][k], 4 * se, f"component {k} mean")
        np.testing.assert_allclose(np.cov(got.T), cov, atol=4 * np.sqrt(2 / len(got)) * np.diag(cov).max())
    assert all(np.isfinite(v) for v in fit.standard_errors().values())
    with pytest.raises(ValueError, match="needs the latent draws"):
        fit.conditional_moments()


def _enum_mixture(backend: Backend):
    """A Gaussian mixture as the PPLs' tutorials write one: a ``Categorical`` label in the data plate."""
    from test_enum_family_estep import _numpyro_model, _pyro_model

    return _pyro_model("diag") if backend.name == "pyro" else _numpyro_model("diag")


@pytest.mark.parametrize("engine", ["EM", "IEM"])
def test_enumerated_mixture_labels_replicates_and_log_likelihood(backend, engine):
    """A Pyro / NumPyro mixture with an enumerated label, fitted by EM / IEM: the posterior's labels follow the
    responsibilities; ``y_rep`` (observed_data's dims) is drawn from the labelled component (the model run with the
    labels given: the means of component k's points within 4 SEs of ``mu[k]``); the ``log_likelihood`` group reads
    the same label draws."""
    x = _mixture_data(200, 1)
    options = {"num_epochs": 20} if engine == "EM" else {"num_epochs": 20, "batch_size": 50}
    fit = backend.fit(engine, _enum_mixture(backend), backend.tensor(x), seed=0, progress=False, **options)
    r = backend.to_numpy(fit.model.responsibilities(fit._theta())[0])
    _check_labels(fit, r)
    data = fit.to_arviz(posterior_predictive=True, log_likelihood=True)
    rep, obs = data.posterior_predictive["obs"], data.observed_data["obs"]
    assert rep.dims == ("chain", "draw") + obs.dims and rep.shape[2:] == x.shape
    labels, points = np.asarray(data.posterior["z"]).reshape(-1), np.asarray(rep).reshape(-1, 2)
    for k in range(3):
        got = points[labels == k]
        if len(got) < 50:
            continue
        scale = np.asarray(fit.params["scale"])[k]
        _within(got.mean(0) - np.asarray(fit.params["mu"])[k], 4 * scale / np.sqrt(len(got)), f"component {k}")
    assert np.isfinite(np.asarray(data.log_likelihood["obs"])).all()


def test_nlme_replicates_on_the_dv_scale():
    """NLME (constant error): ``DV`` replicates laid out as observed_data, NaN exactly where it is (the padding);
    standardised by the model's own prediction and sd at each draw, they are N(0, 1) (mean and variance within 4
    Monte-Carlo SEs)."""
    import latentfit as lf
    from latentfit.models import nlme

    theo = lf.datasets.theophylline(saemix_form=True)
    fit = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5},
                    columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose").fit(
        theo, seed=0, num_iters=(20, 10), num_chains=2, progress=False)
    data = fit.to_arviz(posterior_predictive=True)
    rep, obs = data.posterior_predictive["DV"], data.observed_data["DV"]
    assert rep.dims == ("chain", "draw") + obs.dims and rep.shape[2:] == obs.shape
    np.testing.assert_array_equal(np.isnan(np.asarray(rep)), np.broadcast_to(np.isnan(np.asarray(obs)), rep.shape))
    model = fit.model
    mean, sd = model.predict(fit._theta(), model.ops.asarray(fit.latent_draws))
    std = ((np.asarray(rep) - model.ops.to_numpy(mean)) / model.ops.to_numpy(sd))[~np.isnan(np.asarray(rep))]
    assert abs(std.mean()) < 4 / np.sqrt(std.size) and abs(std.var() - 1) < 4 * np.sqrt(2 / std.size)


def test_linear_mixed_model_replicates():
    """``LinearMixedModel`` (EM: its draws made at θ̂ by MCMC): ``y_rep = X β̂ + Z b + σ̂ ε`` per draw, laid out as
    observed_data with NaN on the padding; the residuals' variance is ``σ̂²`` (4 SEs)."""
    from test_mixed import _simulate

    from latentfit.inference.em import EM
    from latentfit.models.mixed import LinearMixedModel

    y, X, Z, mask, _ = _simulate(40)
    fit = EM(LinearMixedModel(y, X, Z), num_epochs=200, progress=False).run()
    data = fit.to_arviz(posterior_predictive=True)
    rep, obs = data.posterior_predictive["y"], data.observed_data["y"]
    assert rep.dims == ("chain", "draw") + obs.dims and rep.shape[2:] == y.shape
    values = np.asarray(rep)
    np.testing.assert_array_equal(np.isnan(values), np.broadcast_to(~mask, values.shape))
    b = np.asarray(data.posterior["b"])  # [chain, draw, n, q]
    X0, Z0 = (np.where(mask[..., None], a, 0.0) for a in (X, Z))
    mean = X0 @ fit.params["beta"] + np.einsum("ntq,cdnq->cdnt", Z0, b)
    resid = (values - mean)[:, :, mask]
    sigma = float(fit.params["sigma"])
    assert abs(resid.mean()) < 4 * sigma / np.sqrt(resid.size)
    assert abs(resid.var() / sigma**2 - 1) < 4 * np.sqrt(2 / resid.size)


def test_a_model_that_cannot_simulate_is_named(monkeypatch):
    """A model without ``sample_observations`` (the :class:`LatentModel` default) is refused with a ValueError naming
    the option and the models that have it; the conversion without the group still works."""
    import torch

    from latentfit.inference.em import EM
    from latentfit.inference.model import LatentModel
    from latentfit.models.mixture import GaussianMixture

    fit = EM(GaussianMixture(torch.tensor(_mixture_data(60)), 2, "diag", seed=1), num_epochs=5, progress=False).run()
    monkeypatch.setattr(type(fit.model), "sample_observations", LatentModel.sample_observations)
    with pytest.raises(ValueError, match=r"posterior_predictive=True.*GaussianMixture does not simulate"):
        fit.to_arviz(posterior_predictive=True)
    assert "posterior" in fit.to_arviz().groups()
