"""A mini-batch costs a mini-batch (issue 10, item 5): plain models run on the batch's units alone.

The adapters evaluate a mini-batch by running the user's model with the unit plate subsampled to the batch's units
(``plate(..., subsample=units)``) and the observations inside the plate cut to the batch's rows, instead of padding
the batch's latents to all N units and running the whole model.  These tests count the units the model sees, check
that the batch's densities, statistics and enumerated log-joint table equal the full run's rows for those units
exactly, and that a mini-batch engine gives the same estimates with and without the batch path on a fixed seed.
Models the batch path cannot describe (observations outside the unit plate, a mask over the units) keep the full
run: they are detected at set-up.
"""

from __future__ import annotations

import numpy as np
import pytest

N, T = 40, 5


def _grouped_data(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1.0 + 0.8 * rng.normal(size=(N, 1)) + 0.5 * rng.normal(size=(N, T))


def _np(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)


# ----- random intercepts, tutorial style: ``b[:, None]`` and ``.to_event(1)`` inside the unit plate --------------
def _pyro_intercepts(seen: list):
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    def model(y):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
        omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
        sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
        with pyro.plate("unit", y.shape[0]) as idx:
            seen.append(len(idx))
            b = pyro.sample("b", dist.Normal(mu, omega))
            pyro.sample("y", dist.Normal(b[:, None], sigma).to_event(1), obs=y)

    return model


def _numpyro_intercepts(seen: list):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(y):
        mu = numpyro.param("mu", 0.0)
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("unit", y.shape[0]) as idx:
            seen.append(int(idx.shape[0]))
            b = numpyro.sample("b", dist.Normal(mu, omega))
            numpyro.sample("y", dist.Normal(b[:, None], sigma).to_event(1), obs=y)

    return model


def _traced(ppl: str, seen: list, y: np.ndarray):
    if ppl == "pyro":
        import pyro
        import torch

        from latentfit.integrations.pyro import PyroLatentModel

        pyro.clear_param_store()
        return PyroLatentModel(_pyro_intercepts(seen), (torch.tensor(y),)), torch.as_tensor
    import jax.numpy as jnp

    from latentfit.integrations.numpyro import NumPyroLatentModel

    return NumPyroLatentModel(_numpyro_intercepts(seen), (jnp.asarray(y),)), jnp.asarray


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_traced_batch_runs_the_model_on_the_batch_alone(ppl):
    seen: list[int] = []
    model, index = _traced(ppl, seen, _grouped_data())
    assert model.batch_path, "a model with its observations inside the unit plate runs on a batch alone"
    theta = model.init_params()
    z = model.sample_prior(theta, model.ops.key(5), 3)  # [3 chains, N, 1]
    units = np.array([17, 3, 39, 3, 0, 22])  # unsorted, with a repeat
    zb = model.ops.take(z, index(units), 1)
    ll, lp = model.log_densities(theta, z)  # the whole model
    stats = model.stats(theta, z)
    seen.clear()
    bll, blp = model.log_densities(theta, zb, index(units))
    bstats = model.stats(theta, zb, index(units))
    assert seen and set(seen) == {len(units)}, f"the model saw {sorted(set(seen))} units, not the batch's 6"
    rtol = 1e-12 if ppl == "pyro" else 2e-6  # float64 / float32
    np.testing.assert_allclose(_np(bll), _np(ll)[:, units], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(_np(blp), _np(lp)[:, units], rtol=rtol, atol=rtol)
    assert set(bstats) == set(stats) == {"b.s1", "b.s2", "y.rss", "y.nobs"}
    for k in stats:
        np.testing.assert_allclose(_np(bstats[k]), _np(stats[k])[:, units], rtol=rtol, atol=rtol)


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_traced_minibatch_engine_same_estimates_with_and_without_batch_path(ppl):
    from latentfit.inference.mcem import MiniBatchMCEM

    y = _grouped_data(1)
    fits = []
    for batch_path in (False, True):
        model, _ = _traced(ppl, [], y)
        model.batch_path = batch_path
        fit = MiniBatchMCEM(model, num_epochs=3, batch_size=8, num_samples=4, seed=3, progress=False).run()
        fits.append({k: float(np.asarray(v)) for k, v in fit.params.items()})
    tol = 1e-10 if ppl == "pyro" else 1e-5
    for k in fits[0]:
        assert abs(fits[0][k] - fits[1][k]) <= tol * (1 + abs(fits[0][k])), (k, fits)


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_observations_outside_the_unit_plate_keep_the_full_run(ppl):
    """Radon style (latents in a plate over groups, rows reading ``alpha[group]``): the rows of a batch of groups
    are not a slice of the data, so the model keeps the full run and the batch's rows are selected from it."""
    rng = np.random.default_rng(2)
    group = rng.integers(0, 6, 50)
    y = rng.normal(size=50) + group * 0.3
    if ppl == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch
        from torch.distributions import constraints

        from latentfit.integrations.pyro import PyroLatentModel

        def model(group, y):
            mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
            omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
            with pyro.plate("groups", 6):
                alpha = pyro.sample("alpha", dist.Normal(mu, omega))
            with pyro.plate("rows", len(y)):
                pyro.sample("y", dist.Normal(alpha[group], 1.0), obs=y)

        pyro.clear_param_store()
        m = PyroLatentModel(model, (torch.tensor(group), torch.tensor(y)))
        index = torch.as_tensor
    else:
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro.distributions import constraints

        from latentfit.integrations.numpyro import NumPyroLatentModel

        def model(group, y):
            mu = numpyro.param("mu", 0.0)
            omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
            with numpyro.plate("groups", 6):
                alpha = numpyro.sample("alpha", dist.Normal(mu, omega))
            with numpyro.plate("rows", len(y)):
                numpyro.sample("y", dist.Normal(alpha[group], 1.0), obs=y)

        m = NumPyroLatentModel(model, (jnp.asarray(group), jnp.asarray(y)))
        index = jnp.asarray
    assert not m.batch_path
    theta = m.init_params()
    z = m.sample_prior(theta, m.ops.key(0), 2)
    units = np.array([4, 1, 1])
    ll, _ = m.log_densities(theta, z)
    bll, _ = m.log_densities(theta, m.ops.take(z, index(units), 1), index(units))
    np.testing.assert_allclose(_np(bll), _np(ll)[:, units], rtol=1e-6)


# ----- enumerated discrete labels in a data plate (config_enumerate) -----------------------------------------
def _poisson_mixture(ppl: str, seen: list, x: np.ndarray):
    """A Poisson mixture as both PPLs' tutorials write one: the label in the data plate, enumerated."""
    if ppl == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.infer import config_enumerate
        from torch.distributions import constraints

        from latentfit.integrations.pyro import PyroEnumModel

        @config_enumerate
        def model(x):
            w = pyro.param("w", torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), constraint=constraints.simplex)
            rate = pyro.param("rate", torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64),
                              constraint=constraints.positive)
            with pyro.plate("data", len(x)) as idx:
                seen.append(len(idx))
                z = pyro.sample("z", dist.Categorical(w))
                pyro.sample("obs", dist.Poisson(rate[z]), obs=x)

        pyro.clear_param_store()
        return PyroEnumModel(model, (torch.tensor(x),)), torch.as_tensor
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    from latentfit.integrations.numpyro import NumPyroEnumModel

    def model(x):
        w = numpyro.param("w", jnp.array([0.5, 0.3, 0.2]), constraint=constraints.simplex)
        rate = numpyro.param("rate", jnp.array([1.0, 4.0, 9.0]), constraint=constraints.positive)
        with numpyro.plate("data", len(x)) as idx:
            seen.append(int(idx.shape[0]))
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("obs", dist.Poisson(rate[z]), obs=x)

    return NumPyroEnumModel(model, (jnp.asarray(x),)), jnp.asarray


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_enumerated_table_of_a_batch_runs_the_model_on_the_batch_alone(ppl):
    x = np.random.default_rng(3).poisson(np.array([1.0, 4.0, 9.0])[np.arange(90) % 3]).astype(float)
    seen: list[int] = []
    model, index = _poisson_mixture(ppl, seen, x)
    assert model.batch_path
    theta = model.init_params()
    full = _np(model.log_joint_table(theta))  # [K, n]
    units = np.array([88, 2, 45, 2, 0])
    seen.clear()
    part = _np(model.log_joint_table(theta, index(units)))
    r, ll = model.responsibilities(theta, index(units))
    assert seen and set(seen) == {len(units)}, f"the model saw {sorted(set(seen))} units, not the batch's 5"
    rtol = 1e-12 if ppl == "pyro" else 2e-6
    np.testing.assert_allclose(part, full[:, units], rtol=rtol, atol=rtol)
    ll_full = np.logaddexp.reduce(full, 0)
    np.testing.assert_allclose(_np(ll), ll_full[units], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(_np(r), np.exp(full - ll_full).T[units], rtol=rtol, atol=rtol)


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_enumerated_minibatch_engines_same_estimates_with_and_without_batch_path(ppl):
    """A Gaussian mixture in a data plate (``config_enumerate``) on the enumeration route (the family E-step switched
    off): MiniBatchEM and FIEM (NumPyro: FIEM) give the same estimates whether a batch runs alone or is selected from
    a full run, and the same as the recognised mixture's own E-step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_enum_family_estep import _adapter, _data

    from latentfit.inference.fiem import FIEM
    from latentfit.inference.iem import MiniBatchEM

    x = _data(150, seed=4)
    engines = ((MiniBatchEM, 30), (FIEM, 25)) if ppl == "pyro" else ((FIEM, 25),)  # (each NumPyro fit compiles)
    for cls, b in engines:
        out = []
        for route in ("full", "batch", "family"):
            model = _adapter(ppl, "full", x)
            assert model.batch_path and model._family_estep
            model._family_estep = route == "family"
            model.batch_path = route == "batch"
            fit = cls(model, num_epochs=3, batch_size=b, seed=1, progress=False).run()
            out.append({k: _np(v) for k, v in fit.params.items()})
        tol = 1e-10 if ppl == "pyro" else 2e-5
        for other in out[1:]:
            for k in out[0]:
                np.testing.assert_allclose(other[k], out[0][k], rtol=tol, atol=tol, err_msg=f"{cls.__name__} {k}")


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_a_mask_over_the_units_keeps_the_full_run(ppl):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_enum_family_estep import _adapter, _data

    x = _data(60, seed=5)
    mask = np.arange(60) % 3 > 0
    model = _adapter(ppl, "full", x, mask)
    assert not model.batch_path and not model._family_estep
    theta = model.init_params()
    units = np.array([59, 0, 30])
    idx = units if ppl == "numpyro" else __import__("torch").as_tensor(units)
    np.testing.assert_allclose(_np(model.log_joint_table(theta, idx)), _np(model.log_joint_table(theta))[:, units])


# ----- the GaussianMixture family's per-step work ------------------------------------------------------------
def test_mixture_full_pass_streamed_in_chunks_equals_one_product():
    """All units' responsibilities (the variance-reduced engines' snapshot rows) are streamed in cache-sized chunks on
    torch; they equal the one-product E-step over the same units (rounding only)."""
    import torch

    from latentfit.models.mixture import CHUNK, GaussianMixture

    n = CHUNK + 1234
    rng = np.random.default_rng(6)
    x = torch.tensor(rng.normal(size=(n, 2)) + 3.0 * (np.arange(n) % 3)[:, None])
    gm = GaussianMixture(x, 3, "full", seed=0)
    theta = gm.init_params()
    r, ll = gm.responsibilities(theta)
    r1, ll1 = gm.responsibilities(theta, torch.arange(n))
    np.testing.assert_allclose(_np(r), _np(r1), atol=1e-14)
    np.testing.assert_allclose(_np(ll), _np(ll1), rtol=1e-13)


def test_mixture_coefficients_reused_only_for_the_same_unmodified_parameters():
    """FIEM evaluates two mini-batches at one θ: the E-step coefficients are computed once per θ, and recomputed when
    θ is a new array or was modified in place."""
    import torch

    from latentfit.models.mixture import GaussianMixture

    x = torch.tensor(np.random.default_rng(7).normal(size=(300, 2)))
    gm = GaussianMixture(x, 2, "full", seed=0)
    theta = gm.init_params()
    c1 = gm._coefficients(theta)
    assert gm._coefficients(theta) is c1
    theta["locs"].add_(0.5)  # in place: the cached coefficients are stale
    c2 = gm._coefficients(theta)
    assert c2 is not c1
    torch.testing.assert_close(c2, gm._coefficients_of(theta))
    moved = dict(theta, covariances=theta["covariances"] * 1.1)
    torch.testing.assert_close(gm._coefficients(moved), gm._coefficients_of(moved))


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_a_full_run_batch_leaves_the_other_units_where_the_model_is_finite(ppl):
    """A model the batch path does not run alone (theophylline: per-unit arrays and a mask) evaluates a mini-batch in
    a run of the whole model, the other units at the batch's mean latent.  At 0 (the old fill) the one-compartment
    model has ka = ke, 0/0, and the gradient of the batch's log-density in the residual scale was NaN through the
    units it then drops (MCMCSGD with batch_size stopped at its first gradient).  The batch's densities and their
    gradient in θ equal the full run's rows, and are finite."""
    if ppl == "pyro":
        import pyro
        import torch

        from latentfit.examples.theophylline import theophylline_arrays, theophylline_model
        from latentfit.integrations.pyro import PyroLatentModel as Adapter

        pyro.clear_param_store()  # the example's "mu" is [3]: another test's "mu" of another shape must not be read
    else:
        import jax

        from latentfit.examples.theophylline_numpyro import theophylline_arrays, theophylline_model
        from latentfit.integrations.numpyro import NumPyroLatentModel as Adapter
    model = Adapter(theophylline_model, (), theophylline_arrays())
    assert not model.batch_path
    ops = model.ops
    theta = model.init_params()
    z = model.sample_prior(theta, ops.key(0), 2)
    units = ops.asarray(np.array([3, 7, 1]), dtype=None)
    z_batch = ops.take(z, units, axis=1)

    def batch(th):
        ll, lp = model.log_densities(th, z_batch, units)
        return (ll + lp).sum()

    def rows(th):
        ll, lp = model.log_densities(th, z)
        return ops.take(ll + lp, units, axis=1).sum()

    names = sorted(theta)
    if ppl == "pyro":
        grads = []
        for f in (batch, rows):
            th = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
            grads.append(dict(zip(names, torch.autograd.grad(f(th), [th[k] for k in names]))))
    else:
        grads = [jax.grad(f)(theta) for f in (batch, rows)]
    for name in names:
        g, g_rows = _np(grads[0][name]), _np(grads[1][name])
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, g_rows, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(_np(batch(theta)), _np(rows(theta)), rtol=1e-13)
    if ppl == "pyro":
        pyro.clear_param_store()
