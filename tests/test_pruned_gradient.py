"""The pruned gradient of MCMCSGD and MISSO (issue 11): where θ enters only the latents' prior, the Fisher-identity
gradient ``∇_θ log p(y, z; θ)`` is ``∇_θ log p(z; θ)``, taken from the closed-form Gaussian prior without running
the model (``latentfit.inference.mcmcsgd.prior_only_log_density``).

Models as users write them: a logistic mixed model with a random intercept and slope (``Normal(beta, omega)
.to_event(1)``) and a LogNormal random scale in a plate over unbalanced groups, the rows reading ``phi[group]``;
and the gallery's logistic GLMM, whose ``beta`` enters the likelihood (no pruning there).
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import Backend

from latentfit.inference.mcmcsgd import prior_only_log_density
from latentfit.inference.mstep import flatten, unflatten

SIZES = [3, 7, 2, 5, 9, 4, 6, 1, 8, 5, 3, 7]  # unbalanced groups


@pytest.fixture(autouse=True)
def _clean_param_store():
    import pyro

    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(len(SIZES)), SIZES)
    x, x2 = rng.standard_normal(len(group)), rng.standard_normal(len(group))
    phi = np.array([-0.5, 1.0]) + np.array([0.6, 0.4]) * rng.standard_normal((len(SIZES), 2))
    s = np.exp(-1.0 + 0.3 * rng.standard_normal(len(SIZES)))
    logits = phi[group, 0] + phi[group, 1] * x + s[group] * x2
    y = (rng.random(len(group)) < 1.0 / (1.0 + np.exp(-logits))).astype(float)
    return {"group": group, "x": x, "x2": x2, "y": y}


def _model(backend: Backend):
    """θ = (beta, omega, m, tau) in the latents' prior only."""
    if backend.name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch
        from torch.distributions import constraints

        def model(group, x, x2, num_groups, y=None):
            beta = pyro.param("beta", torch.tensor([0.0, 0.5], dtype=torch.float64))
            omega = pyro.param("omega", torch.tensor([1.0, 1.0], dtype=torch.float64), constraint=constraints.positive)
            m = pyro.param("m", torch.tensor(0.0, dtype=torch.float64))
            tau = pyro.param("tau", torch.tensor(0.5, dtype=torch.float64), constraint=constraints.positive)
            with pyro.plate("group", num_groups):
                phi = pyro.sample("phi", dist.Normal(beta, omega).to_event(1))
                s = pyro.sample("s", dist.LogNormal(m, tau))
            with pyro.plate("rows", len(x)):
                pyro.sample("y", dist.Bernoulli(logits=phi[group, 0] + phi[group, 1] * x + s[group] * x2), obs=y)

        return model
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(group, x, x2, num_groups, y=None):
        beta = numpyro.param("beta", jnp.array([0.0, 0.5]))
        omega = numpyro.param("omega", jnp.array([1.0, 1.0]), constraint=constraints.positive)
        m = numpyro.param("m", 0.0)
        tau = numpyro.param("tau", 0.5, constraint=constraints.positive)
        with numpyro.plate("group", num_groups):
            phi = numpyro.sample("phi", dist.Normal(beta, omega).to_event(1))
            s = numpyro.sample("s", dist.LogNormal(m, tau))
        with numpyro.plate("rows", len(x)):
            numpyro.sample("y", dist.Bernoulli(logits=phi[group, 0] + phi[group, 1] * x + s[group] * x2), obs=y)

    return model


def _args(backend: Backend, d: dict[str, np.ndarray]) -> tuple:
    xp = backend.xp
    group = xp.asarray(d["group"])
    return group, backend.tensor(d["x"]), backend.tensor(d["x2"]), len(SIZES), backend.tensor(d["y"])


def _glmm(backend: Backend):
    """The gallery's logistic GLMM: ``beta`` enters the likelihood."""
    from test_gallery import ENTRIES, _args

    entry = ENTRIES["logistic_glmm"]
    return entry.model(backend), _args(backend, entry, entry.data())


def _pieces(lm):
    names = [n for n, p in lm.params.items() if not p.fixed]
    shapes = {n: tuple(np.shape(lm.ops.to_numpy(lm.params[n].value))) for n in names}
    return names, shapes


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_depends_on_is_structural(name):
    """``ops.depends_on``: a computed zero derivative is a dependence, an output built without reading x is not
    (JAX: also through a jitted inner function, whose jaxpr is followed output by output)."""
    import jax

    from latentfit.inference.ops import make_ops

    ops = make_ops(name)
    xp, x = ops.xp, ops.asarray([1.0, 2.0])
    assert ops.depends_on(lambda v: xp.sum(v * 0.0), x)
    assert ops.depends_on(lambda v: xp.sum(v[:1] ** 2), x)
    assert not ops.depends_on(lambda v: xp.sum(xp.zeros_like(v) + 3.0), x)
    if name == "jax":
        inner = jax.jit(lambda v: (v * 2.0, xp.ones(3)))
        assert not ops.depends_on(lambda v: xp.sum(inner(v)[1]), x)
        assert ops.depends_on(lambda v: xp.sum(inner(v)[0]), x)


# NumPyro: eager JAX gradients of the whole model, ~2 min of wall time at load 18 (the JAX structural check stays in
# the default suite through the no-pruning case and test_depends_on_is_structural)
@pytest.mark.slow_on("numpyro")
def test_pruned_gradient_equals_the_full_one(backend):
    """At a θ and latents away from the initial values, the closed-form prior's gradient equals the gradient of the
    model's complete log-density (1e-12), and the closed form is the model's log-prior up to a term free of θ (the
    LogNormal site's log-Jacobian)."""
    lm = backend.latent_model(_model(backend), *_args(backend, _data()))
    names, shapes = _pieces(lm)
    ops, xp = lm.ops, lm.ops.xp
    theta0 = lm.init_params()
    prior = prior_only_log_density(lm, names, shapes, theta0)
    assert prior is not None
    rng = np.random.default_rng(1)
    x = flatten(ops, lm.unconstrain(theta0), names) + ops.asarray(0.3 * rng.standard_normal(6))
    z = ops.asarray(rng.standard_normal((2, len(SIZES), lm.latent_dim)))

    def theta_of(v):
        return lm.constrain(unflatten(v, names, shapes))

    full = ops.to_numpy(ops.grad(lambda v: xp.sum(lm.log_joint(theta_of(v), z)))(x))
    pruned = ops.to_numpy(ops.grad(lambda v: xp.sum(prior(theta_of(v), z, None)))(x))
    assert np.max(np.abs(pruned)) > 1.0
    np.testing.assert_allclose(pruned, full, rtol=1e-12, atol=1e-12)
    units = ops.asarray(np.array([4, 0, 9]), dtype=None)
    gap = [ops.to_numpy(prior(theta_of(v), z[:, [4, 0, 9]], units) - lm.log_prior(theta_of(v), z[:, [4, 0, 9]], units))
           for v in (x, x * 0.5)]
    np.testing.assert_allclose(gap[0], gap[1], atol=1e-12)


@pytest.mark.slow_on("numpyro")  # the NumPyro adapter's set-up; JAX's structural check: test_depends_on_is_structural
def test_no_pruning_where_theta_enters_the_likelihood(backend):
    """The gallery's logistic GLMM reads ``beta`` in the logits: no pruned density, and MCMCSGD (Pyro) differentiates
    the complete log-density."""
    model, args = _glmm(backend)
    lm = backend.latent_model(model, *args)
    names, shapes = _pieces(lm)
    assert lm.closed_form_log_prior() is not None  # the prior alone would have a closed form
    assert prior_only_log_density(lm, names, shapes, lm.init_params()) is None
    if backend.name == "pyro":  # the engine's choice (the NumPyro fit would only add its compilation)
        backend.reset()
        fit = backend.fit("MCMCSGD", model, *args, num_iters=3, burn_in=1, progress=False)
        assert fit.engine._prior_only is None


@pytest.mark.slow_on("numpyro")
def test_mcmcsgd_pruned_fit_equals_the_full_one(backend):
    """25 iterations of MCMCSGD (Adam) with and without pruning: the same iterates up to rounding (1e-9), the
    objective's value (the sweep's own densities when pruned) too."""
    args = _args(backend, _data())
    fits = {}
    for prune in (True, False):
        backend.reset()
        fits[prune] = backend.fit("MCMCSGD", _model(backend), *args, num_iters=25, burn_in=5, prune=prune,
                                  progress=False)
    assert fits[True].engine._prior_only is not None and fits[False].engine._prior_only is None
    for key in ("iterate", "objective"):
        np.testing.assert_allclose(np.asarray(fits[True].history[key]), np.asarray(fits[False].history[key]),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_fisher_pruned_fit_equals_the_full_one():
    """Fisher scoring (Pyro), 20 iterations with and without pruning (the information of the closed-form prior at
    the prior draws): the same iterates (1e-9)."""
    b = Backend("pyro")
    args = _args(b, _data())
    fits = {}
    for prune in (True, False):
        b.reset()
        fits[prune] = b.fit("MCMCSGD", _model(b), *args, num_iters=20, burn_in=5, prune=prune, optimizer="fisher",
                            progress=False)
    np.testing.assert_allclose(np.asarray(fits[True].history["iterate"]), np.asarray(fits[False].history["iterate"]),
                               rtol=1e-9, atol=1e-9)


def test_misso_pruned_scores_equal_the_full_ones():
    """MISSO (Louis-accelerated, Pyro) with and without pruning: the same estimates after 2 epochs (1e-9)."""
    b = Backend("pyro")
    args = _args(b, _data())
    est = {}
    for prune in (True, False):
        b.reset()
        fit = b.fit("MISSO", _model(b), *args, num_epochs=2, mc_size=10, prune=prune, surrogate="louis",
                    progress=False)
        assert (fit.engine._prior_only is not None) == prune
        est[prune] = np.concatenate([np.ravel(b.to_numpy(b.xp.as_tensor(v))) for v in fit.params.values()])
    np.testing.assert_allclose(est[True], est[False], rtol=1e-9, atol=1e-9)


def test_jaxpr_taint_takes_a_scan_conservatively():
    """A scan's carry moves taint between its slots over the iterations: with the carry ``(a, b) -> (b, 2x)`` the
    final ``a`` depends on ``x`` (from the second iteration on), which one pass over the body would miss; the
    analysis must say "depends" (a false "independent" would prune a gradient that is not zero)."""
    import jax

    from latentfit.inference.ops_jax import _jaxpr_taint

    def f(x):
        (a, _), _ = jax.lax.scan(lambda c, _: ((c[1], 2.0 * x), None), (0.0, 0.0), None, length=3)
        return a

    closed = jax.make_jaxpr(f)(1.0)
    assert [e.primitive.name for e in closed.jaxpr.eqns] == ["scan"]
    assert _jaxpr_taint(closed.jaxpr, [True]) == [True]
    assert float(jax.grad(f)(1.0)) == 2.0  # the dependence is real
