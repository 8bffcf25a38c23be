"""MCMCSGD (issue 11, item 1): stochastic-gradient ML with MCMC E-steps, on plain Pyro and NumPyro models.

Known answers come from the model gallery (``test_gallery.py``): the exact ML estimate of the random-slope radon
model (``gallery_reference.lmm_mle``) and the adaptive-quadrature ML estimate of the logistic GLMM
(``gallery_reference.glmm_mle``).  Tolerances are in units of SAEM's Monte-Carlo error on the same entry
(``test_gallery.MC_SD``): MCMCSGD's fits with Adam (the default before ``"auto"``) deviated by at most 1.6 of them
over seeds 0-2 on both entries (a scratch run), and the tests allow ``TOL_SDS = 5`` of them,
as the gallery does for SAEM.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import Backend
from test_gallery import ENTRIES, TOL_REL, TOL_SDS, _args, known_answer

from latentfit.inference.model import ModelSpecificationError


@pytest.fixture(autouse=True)
def _clean_param_store():
    import pyro

    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _fit(backend: Backend, name: str, seed: int = 0, **options):
    entry = ENTRIES[name]
    args = _args(backend, entry, entry.data())
    if backend.name == "pyro":
        import pyro

        pyro.clear_param_store()  # a Pyro fit writes its estimates to the store, where the next one would start
        return backend.front_door.MCMCSGD(entry.model(backend), seed=seed, progress=False, **options).run(*args)
    return backend.front_door.MCMCSGD(entry.model(backend), seed=seed, progress=False, **options).run(seed, *args)


def _check_known_answer(name: str, fit, tol_sds: float = TOL_SDS) -> None:
    entry = ENTRIES[name]
    est = entry.estimates(fit.params)
    for key, ref in known_answer(name).items():
        tol = max(tol_sds * entry.mc_sd[key], TOL_REL * abs(ref))
        assert abs(float(est[key]) - ref) < tol, (key, float(est[key]), ref, tol)


CASES = [
    pytest.param("radon_slope", "pyro", id="lmm_random_slope-pyro"),
    pytest.param("logistic_glmm", "numpyro", id="logistic_glmm-numpyro"),
    pytest.param("radon_slope", "numpyro", id="lmm_random_slope-numpyro", marks=pytest.mark.slow),
    pytest.param("logistic_glmm", "pyro", id="logistic_glmm-pyro", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,backend_name", CASES)
def test_reaches_the_exact_maximum(name, backend_name):
    """Random-slope LMM (exact ML) and logistic GLMM (quadrature ML), default options, 5 chains per unit."""
    fit = _fit(Backend(backend_name), name, num_chains=5)
    _check_known_answer(name, fit)
    # the average of the iterates after average_from is what the fit reports (default: Fisher scoring's, from 70)
    k0 = fit.engine.average_from
    assert fit.history["objective"].shape == (500,)
    assert np.all(np.isfinite(fit.history["grad_norm2"][k0:]))


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["pyro", "numpyro"])
def test_defaults_reach_the_quadrature_maximum_of_a_logistic_glmm(backend_name):
    """With every option at its default (one chain per unit at N = 80, saemix kernels (2, 2, 2), optimizer "auto":
    Fisher scoring here, averaged after its heavy-ball steps) MCMCSGD ends within TOL_SDS of SAEM's Monte-Carlo
    errors of the quadrature maximum."""
    _check_known_answer("logistic_glmm", _fit(Backend(backend_name), "logistic_glmm"))


def test_polyak_ruppert_average_mean_squared_error_falls_like_one_over_k():
    """The averaging rule on a quadratic ``½ Σ_j h_j x_j²`` with noisy gradients ``h x + σ ε`` and a constant step:
    the last iterate's error stays at its O(η) stationary level, the average's MSE falls like ``1/m`` with the
    Polyak–Juditsky constant ``σ² Σ_j h_j⁻²`` (4000 replicates; the O(1/m²) correction is below 5 % at m ≥ 1000)."""
    from latentfit.inference.mcmcsgd import polyak_ruppert

    rng = np.random.default_rng(0)
    h, sigma, eta, reps, k0 = np.array([1.0, 0.2]), 1.0, 0.2, 4000, 200
    x = np.full((reps, 2), 3.0)
    x_avg = x
    mse_avg, mse_last = {}, {}
    for k in range(1, k0 + 4001):
        x = x - eta * (h * x + sigma * rng.standard_normal(x.shape))
        x_avg = polyak_ruppert(x_avg, x, k - k0) if k > k0 else x
        if k - k0 in (500, 1000, 2000, 4000):
            mse_avg[k - k0] = float(np.mean(np.sum(x_avg ** 2, 1)))
            mse_last[k - k0] = float(np.mean(np.sum(x ** 2, 1)))
    constant = sigma ** 2 * np.sum(h ** -2.0)  # H⁻¹ Σ H⁻¹, traced
    for m in (1000, 2000, 4000):
        assert 0.88 < m * mse_avg[m] / constant < 1.05, (m, m * mse_avg[m] / constant)
    slope = np.polyfit(np.log(list(mse_avg)), np.log(list(mse_avg.values())), 1)[0]
    assert -1.05 < slope < -0.9, slope
    stationary = np.sum(eta * sigma ** 2 / (h * (2.0 - eta * h)))  # the last iterate's MSE, constant in k
    for m in mse_last:
        assert mse_last[m] == pytest.approx(stationary, rel=0.06)
    assert mse_avg[4000] < mse_last[4000] / 50  # ≈ 26/4000 against ≈ 0.62


@pytest.mark.parametrize("backend_name", ["pyro", pytest.param("numpyro", marks=pytest.mark.slow)])
def test_reported_estimate_is_the_average_of_the_iterates(backend_name):
    """With a named optimiser (Adam) the fit reports the mean of the iterates after ``average_from`` (unconstrained),
    the running mean before (Fisher scoring's weighted average: test_mcmcsgd_fisher.test_fisher_scoring_phases)."""
    fit = _fit(Backend(backend_name), "logistic_glmm", num_iters=40, burn_in=5, average_from=25, optimizer="adam")
    engine = fit.engine
    iterates = np.asarray(fit.history["iterate"])  # row k - 1: iterate of iteration k
    offsets = np.cumsum([0] + [int(np.prod(engine._shapes[n])) for n in engine.names])
    expected = iterates[25:].mean(0)
    for name, lo, hi in zip(engine.names, offsets[:-1], offsets[1:]):
        value = np.ravel(np.asarray(fit.params[name], dtype=float))
        if name == "omega":
            value = np.log(value)
        np.testing.assert_allclose(value, expected[lo:hi], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit.history["theta.mu"][:25], iterates[:25, offsets[engine.names.index("mu")]],
                               rtol=1e-12)


def test_mala_kernel_reaches_the_exact_maximum():
    """The gradient-based kernel (MALA, per-unit step adaptation) on the same random-slope model."""
    fit = _fit(Backend("pyro"), "radon_slope", num_chains=5, kernel="mala")
    _check_known_answer("radon_slope", fit)
    acc = fit.acceptance["mala"]
    assert 0.4 < float(np.mean(acc[-100:])) < 0.75  # adapted toward 57%


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["pyro", "numpyro"])
def test_mini_batches_reach_the_exact_maximum(backend_name):
    """10 of 50 units per gradient step (rescaled by N/b): unbiased, with a larger Monte-Carlo error."""
    fit = _fit(Backend(backend_name), "radon_slope", num_chains=5, batch_size=10, num_iters=1500)
    _check_known_answer("radon_slope", fit, tol_sds=10.0)


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
@pytest.mark.parametrize("backend_name", ["pyro", "numpyro"])
def test_user_optimiser_equals_the_named_one(backend_name):
    """A ``torch.optim`` factory / an ``optax`` transformation gives the same iterates as the named optimiser with
    the same constant rate (the engine's own optimiser is the library's)."""
    b = Backend(backend_name)
    if backend_name == "pyro":
        import torch

        user = lambda params: torch.optim.Adam(params, lr=0.05)  # noqa: E731
    else:
        import optax

        user = optax.adam(0.05)
    named = _fit(b, "logistic_glmm", num_iters=40, burn_in=5, optimizer="adam", learning_rate=lambda t: 0.05)
    own = _fit(b, "logistic_glmm", num_iters=40, burn_in=5, optimizer=user)
    for key in ("theta.mu", "theta.omega", "theta.beta"):
        np.testing.assert_allclose(own.history[key], named.history[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", [pytest.param("sgd", marks=pytest.mark.slow),
                                       pytest.param("amsgrad", marks=pytest.mark.slow), "opt-amsgrad"])
def test_every_named_optimiser_fits(optimizer):
    """SGD (rate scaled to the gradient's size), AMSGrad and OPT-AMSGrad all climb to the maximum's neighbourhood."""
    rate = 1e-3 if optimizer == "sgd" else 0.05
    fit = _fit(Backend("numpyro"), "logistic_glmm", num_chains=5, optimizer=optimizer, learning_rate=rate)
    _check_known_answer("logistic_glmm", fit, tol_sds=10.0)


def test_random_stopping_report():
    """N ~ P(N = ℓ) ∝ η_{ℓ+1}: the report's iterate and squared gradient norm are the history's at N."""
    fit = _fit(Backend("pyro"), "logistic_glmm", num_iters=60, burn_in=10, num_chains=2)
    report = fit.engine.random_stop if hasattr(fit.engine, "random_stop") else None
    assert report is not None
    assert 10 < report.iteration <= 60
    assert report.grad_norm2 == pytest.approx(float(fit.history["grad_norm2"][report.iteration - 1]))
    # before averaging starts (iteration 30) the reported θ is the iterate, as the history records it
    if report.iteration <= 30:
        assert float(report.theta["mu"]) == pytest.approx(float(fit.history["theta.mu"][report.iteration - 1]))
    rates = fit.history["learning_rate"]
    assert np.all(rates[:10] == 0) and np.all(rates[10:] > 0)
    assert rates[-1] < rates[10]  # the default rate decays after average_from
    # the arviz object of any fit: the latents' draws as the posterior group
    idata = fit.to_arviz()
    assert "u" in idata.posterior and idata.posterior["u"].shape[-1] == 80


def test_louis_standard_errors_match_saem():
    """SEs by Louis' formula at MCMCSGD's estimate agree with those at SAEM's (the same maximum) to 10%."""
    from test_gallery import ENTRIES as entries

    b = Backend("pyro")
    fit = _fit(b, "radon_slope", num_chains=5)
    se = fit.standard_errors("sa")
    entry = entries["radon_slope"]
    import latentfit.pyro as lp

    saem = lp.SAEM(entry.model(b), num_iters=(100, 200), num_chains=5, seed=0, progress=False).run(
        *_args(b, entry, entry.data()))
    se_saem = saem.standard_errors("sa")
    for k, v in se_saem.items():
        assert np.isfinite(se[k]) and se[k] > 0
        assert se[k] == pytest.approx(v, rel=0.1), k


# ----- neural-network parameters --------------------------------------------------------------------------------

def _mlp_model():
    """A tutorial-style Pyro model with an MLP (``pyro.module``) inside: y = mlp(x) + u[group] + ε (torch seed 0)."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn
    from torch.distributions import constraints

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()

    def model(x, group, num_groups, y=None):
        net = pyro.module("mlp", mlp)
        omega = pyro.param("omega", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
        sigma = pyro.param("sigma", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
        with pyro.plate("group", num_groups):
            u = pyro.sample("u", dist.Normal(0.0, omega))
        with pyro.plate("rows", len(x)):
            pyro.sample("y", dist.Normal(net(x[:, None]).squeeze(-1) + u[group], sigma), obs=y)
    return mlp, model


def _mlp_data():
    rng = np.random.default_rng(0)
    num = 40
    group = rng.permutation(np.repeat(np.arange(num), rng.integers(3, 10, num)))
    x = rng.uniform(-2.0, 2.0, len(group))
    u = 0.7 * rng.standard_normal(num)
    y = np.sin(2.0 * x) + u[group] + 0.3 * rng.standard_normal(len(group))
    return group, x, y, num


def test_pyro_module_weights_are_fitted():
    """A small MLP mean function (``pyro.module``) with random intercepts: its weights are parameters, and the
    fit climbs from the start's IS log-likelihood to near the truth (σ = 0.3, ω = 0.7)."""
    import pyro
    import torch

    import latentfit.pyro as lp

    mlp, model = _mlp_model()

    group, x, y, num = _mlp_data()
    args = (torch.as_tensor(x), torch.as_tensor(group), num, torch.as_tensor(y))
    w0 = mlp[2].weight.detach().clone()
    start = lp.MCMCSGD(model, num_iters=20, num_chains=4, burn_in=19, seed=0, progress=False).run(*args)
    pyro.clear_param_store()
    # one sweep of each kernel per iteration (the default is SAEM's two): the test is about the weights, and four
    # chains per unit already average the gradient
    fit = lp.MCMCSGD(model, num_iters=1000, num_chains=4, mcmc_steps=1, seed=0, progress=False).run(*args)
    assert {"mlp$$$0.weight", "mlp$$$2.bias"} <= set(fit.params)
    assert fit.log_likelihood("is", num_samples=500) > start.log_likelihood("is", num_samples=500) + 100
    assert float(fit.params["sigma"]) == pytest.approx(0.3, abs=0.03)
    assert float(fit.params["omega"]) == pytest.approx(0.7, abs=0.15)
    # the estimates are written to Pyro's param store, into the module's own tensors (as SVI leaves them)
    assert not torch.equal(mlp[2].weight.detach(), w0)
    assert torch.allclose(mlp[2].weight.detach(), torch.as_tensor(fit.params["mlp$$$2.weight"]))
    assert torch.allclose(pyro.param("mlp$$$2.weight").detach(), torch.as_tensor(fit.params["mlp$$$2.weight"]))


def _grouped_line_data() -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """30 groups of 6 rows: y = 2 − 1.5 x + u_group + ε, u ~ N(0, 0.7²), ε ~ N(0, 0.3²)."""
    rng = np.random.default_rng(3)
    num = 30
    group = np.repeat(np.arange(num), 6)
    x = rng.standard_normal(len(group))
    y = 2.0 - 1.5 * x + 0.7 * rng.standard_normal(num)[group] + 0.3 * rng.standard_normal(len(group))
    return x, group, num, y


@pytest.mark.parametrize("engine", ["MCMCSGD", "SAEM"])
def test_pyro_module_holds_the_fitted_weights(engine):
    """After a fit, the user's ``nn.Module`` computes with the fitted weights, as after Pyro's SVI: the estimates are
    copied into the tensors ``pyro.module`` registered (the module's own ``nn.Parameter`` objects, still the param
    store's), not put in the store as new tensors that the module never sees."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn
    from torch.distributions import constraints

    import latentfit.pyro as lp

    torch.manual_seed(0)
    linear = nn.Linear(1, 1).double()
    registered = dict(linear.named_parameters())
    start = {n: p.detach().clone() for n, p in registered.items()}

    def model(x, group, num_groups, y=None):
        pyro.module("lin", linear)
        omega = pyro.param("omega", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
        sigma = pyro.param("sigma", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
        with pyro.plate("group", num_groups):
            u = pyro.sample("u", dist.Normal(0.0, omega))
        with pyro.plate("rows", len(x)):
            pyro.sample("y", dist.Normal(linear(x[:, None]).squeeze(-1) + u[group], sigma), obs=y)

    x, group, num, y = _grouped_line_data()
    args = (torch.as_tensor(x), torch.as_tensor(group), num, torch.as_tensor(y))
    options = {"num_iters": 60} if engine == "MCMCSGD" else {"num_iters": (30, 20)}
    fit = getattr(lp, engine)(model, seed=0, progress=False, **options).run(*args)

    store = pyro.get_param_store()
    for name, parameter in linear.named_parameters():
        fitted = torch.as_tensor(fit.params["lin$$$" + name])
        assert parameter is registered[name]                       # the module's tensors were updated, not replaced
        assert store["lin$$$" + name] is parameter                 # ... and are still the param store's entries
        assert torch.allclose(parameter.detach(), fitted)
        assert not torch.allclose(parameter.detach(), start[name])
    slope, intercept = float(linear.weight.detach()), float(linear.bias.detach())
    assert abs(slope + 1.5) < 0.5 * abs(float(start["weight"]) + 1.5)   # moved towards the truth (short fits)
    with torch.no_grad():                                           # the forward pass uses the fitted weights
        grid = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
        assert torch.allclose(linear(grid[:, None]).squeeze(-1), intercept + slope * grid)
    assert float(pyro.param("sigma")) == pytest.approx(float(fit.params["sigma"]))


def _numpyro_flax_mlp_model():
    """The NumPyro form of the MLP model: a flax MLP (1-16-1, tanh) through ``numpyro.contrib.module.flax_module``
    as the mean, random intercepts per group (51 free parameters)."""
    import flax.linen as nn
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import flax_module
    from numpyro.distributions import constraints

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))

    def model(x, group, num_groups, y=None):
        net = flax_module("mlp", MLP(), input_shape=(1, 1))
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("group", num_groups):
            u = numpyro.sample("u", dist.Normal(0.0, omega))
        with numpyro.plate("rows", len(x)):
            numpyro.sample("y", dist.Normal(net(x[:, None]).squeeze(-1) + u[group], sigma), obs=y)

    return model


@pytest.mark.slow
def test_numpyro_flax_module_weights_are_fitted():
    """The same model with a flax MLP through ``numpyro.contrib.module.flax_module``."""
    pytest.importorskip("flax")
    import jax.numpy as jnp

    import latentfit.numpyro as ln

    model = _numpyro_flax_mlp_model()
    group, x, y, num = _mlp_data()
    args = (jnp.asarray(x), jnp.asarray(group), num, jnp.asarray(y))
    start = ln.MCMCSGD(model, num_iters=20, num_chains=4, burn_in=19, progress=False).run(0, *args)
    fit = ln.MCMCSGD(model, num_iters=1000, num_chains=4, mcmc_steps=1, progress=False).run(0, *args)
    assert "mlp$params/Dense_0/kernel" in fit.params
    assert fit.log_likelihood("is", num_samples=500) > start.log_likelihood("is", num_samples=500) + 100
    assert float(fit.params["sigma"]) == pytest.approx(0.3, abs=0.03)


def test_numpyro_module_weights_rebuilt_for_the_module():
    """NumPyro's fitted flax weights are ``fit.params`` leaves (JAX arrays are immutable: the module holds none);
    ``substitute_data`` rebuilds the module's weight tree from them, which flax's ``apply`` and
    ``handlers.substitute`` take: the model then computes with the fitted weights."""
    pytest.importorskip("flax")
    import flax.linen as nn
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import flax_module
    from numpyro.distributions import constraints

    import latentfit.numpyro as ln

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)

    def model(x, group, num_groups, y=None):
        net = flax_module("lin", Linear(), input_shape=(1, 1))
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("group", num_groups):
            u = numpyro.sample("u", dist.Normal(0.0, omega))
        with numpyro.plate("rows", len(x)):
            numpyro.sample("y", dist.Normal(net(x[:, None]).squeeze(-1) + u[group], sigma), obs=y)

    x, group, num, y = _grouped_line_data()
    fit = ln.MCMCSGD(model, num_iters=60, progress=False).run(0, jnp.asarray(x), jnp.asarray(group), num,
                                                              jnp.asarray(y))
    data = ln.substitute_data(fit.params)
    assert set(data) == {"lin$params", "omega", "sigma"}
    kernel, bias = fit.params["lin$params/Dense_0/kernel"], fit.params["lin$params/Dense_0/bias"]
    np.testing.assert_array_equal(data["lin$params"]["Dense_0"]["kernel"], kernel)
    grid = jnp.linspace(-1.0, 1.0, 5)[:, None]
    np.testing.assert_allclose(Linear().apply({"params": data["lin$params"]}, grid), grid @ kernel + bias)
    run = numpyro.handlers.substitute(numpyro.handlers.seed(model, 0), data=data)
    trace = numpyro.handlers.trace(run).get_trace(jnp.asarray(x), jnp.asarray(group), num)
    np.testing.assert_array_equal(trace["lin$params"]["value"]["Dense_0"]["bias"], bias)
    assert float(trace["sigma"]["value"]) == pytest.approx(float(fit.params["sigma"]))


# ----- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    ({"learning_rate": -0.1}, "learning_rate must be positive"),
    ({"learning_rate": float("nan")}, "learning_rate must be positive"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of"),
    ({"kernel": "hmc"}, "kernel must be one of"),
    ({"num_iters": 0}, "num_iters must be a positive int"),
    ({"burn_in": 600}, "burn_in must be in"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"mcmc_steps": (0, 0, 0)}, "mcmc_steps"),
    ({"schedule": "anneal"}, "schedule must be one of"),
    ({"averaging": "ema"}, "averaging must be one of"),
])
def test_bad_options_fail_at_construction(options, match):
    import latentfit.pyro as lp

    with pytest.raises(ValueError, match=match):
        lp.MCMCSGD(ENTRIES["logistic_glmm"].model(Backend("pyro")), **options)


def test_model_without_latents_is_refused():
    import pyro
    import pyro.distributions as dist
    import torch

    import latentfit.pyro as lp

    def regression(x, y):
        b = pyro.param("b", torch.tensor(0.0, dtype=torch.float64))
        with pyro.plate("rows", len(x)):
            pyro.sample("y", dist.Normal(b * x, 1.0), obs=y)

    x = torch.linspace(0, 1, 10, dtype=torch.float64)
    with pytest.raises(ModelSpecificationError, match="no latent sample site"):
        lp.MCMCSGD(regression, progress=False).run(x, 2 * x)


def test_convergence_plot_leaves_network_weights_out_by_default():
    """``plot_convergence`` of a model with a ``pyro.module`` MLP (1-16-1: 49 weights) draws the model's own params
    and the objective, and says in a ``UserWarning`` how many network weights it left out and how to draw them;
    ``params=`` draws what it names, without the warning; a model whose params are all network weights draws them."""
    import warnings
    from types import SimpleNamespace

    import matplotlib
    import pyro
    import torch

    import latentfit.pyro as lp
    from latentfit.plots import plot_convergence

    matplotlib.use("Agg")
    mlp, model = _mlp_model()

    group, x, y, num = _mlp_data()
    pyro.clear_param_store()
    fit = lp.MCMCSGD(model, num_iters=10, burn_in=2, num_chains=2, seed=0, progress=False).run(
        torch.as_tensor(x), torch.as_tensor(group), num, torch.as_tensor(y))
    assert fit.model.module_params == {"mlp$$$0.weight", "mlp$$$0.bias", "mlp$$$2.weight", "mlp$$$2.bias"}

    def titles(fig):
        return [ax.get_title() for ax in fig.axes if ax.get_visible()]

    with pytest.warns(UserWarning, match=r"49 network weights \(4 params: mlp\$\$\$0\.weight, .*params=") as seen:
        fig = fit.plot_convergence()
    assert titles(fig) == ["omega", "sigma", "complete-data log-lik"] and len(seen) == 1
    assert len(str(seen[0].message)) < 250  # one short line, not the weights' names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert titles(fit.plot_convergence(params=["mlp$$$2.weight", "sigma"])) == [
            f"mlp$$$2.weight[{j}]" for j in range(16)] + ["sigma"]
        # a model whose params are all network weights: every weight is drawn (here 3 of them) and the objective
        history = {"theta.net.w": np.zeros((5, 2)), "theta.net.b": np.ones((5,)), "objective": np.arange(5.0)}
        only_net = SimpleNamespace(history=history, num_iterations=5,
                                   model=SimpleNamespace(module_params=frozenset({"net.w", "net.b"})))
        assert titles(plot_convergence(only_net)) == ["net.w[0]", "net.w[1]", "net.b", "complete-data log-lik"]


def test_standard_error_warning_counts_network_weights():
    """The NaN-SE warning lists the model's own params and counts the network weights, naming only a few."""
    from latentfit.inference.fisher import _names

    labels = [f"net.w[{i}]" for i in range(600)] + ["omega", "sigma"] + [f"c[{i}]" for i in range(12)]
    which = np.ones(len(labels), bool)
    which[601] = False  # sigma has its SE
    text = _names(labels, which, frozenset({"net.w"}))
    assert text == ("omega, c[0], c[1], c[2], c[3], c[4], c[5], c[6] and 5 more; "
                    "600 network weights (net.w[0], net.w[1], net.w[2], ...)")
    assert _names(labels[600:602], np.array([True, False])) == "omega"
