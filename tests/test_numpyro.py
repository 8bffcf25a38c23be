"""NumPyro backend: JaxOps, the NumPyro adapter against the Pyro adapter, compiled vs eager steps.

Engine behaviour on both PPLs (exact ML, theophylline band, determinism, bad input) is tested by the
backend-parametrised tests in ``test_saem.py`` / ``test_bad_input.py`` / ``test_mcmc.py``; this file
holds what is specific to JAX: the ops shim, the adapter's agreement with the Pyro adapter on the
same model (densities and statistics to float64 round-off), the compiled iteration against the
same iteration run eagerly, chunked compilation, the PRNG-key front door and float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import models_numpyro
import models_pyro
import numpy as np
import numpyro
import numpyro.distributions as dist
import pyro
import pytest
import torch
from numpyro import handlers
from numpyro.distributions import constraints

from latentfit.examples import theophylline as theo_pyro
from latentfit.examples import theophylline_numpyro as THEO_NP
from latentfit.inference.ops_jax import JaxOps
from latentfit.inference.saem import SAEM as CoreSAEM
from latentfit.integrations.numpyro import NumPyroLatentModel
from latentfit.integrations.pyro import PyroLatentModel


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ----- JaxOps ------------------------------------------------------------------------------------------
def test_jaxops_scatter_is_functional_and_keys_reproducible():
    ops = JaxOps(dtype="float64")
    table = jnp.zeros((4, 2))
    new = ops.scatter(table, jnp.array([1, 3]), jnp.ones((2, 2)))
    assert float(table.sum()) == 0.0  # the input is untouched
    np.testing.assert_array_equal(np.asarray(new)[:, 0], [0, 1, 0, 1])
    k1, k2 = ops.split(ops.key(3))
    a, b = ops.normal(k1, (5,)), ops.normal(ops.split(ops.key(3))[0], (5,))
    assert a.dtype == jnp.float64 and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(ops.normal(k2, (5,))))
    # batched Jacobian of a row-wise map, [B, m, p]
    x = jnp.arange(6.0).reshape(3, 2)
    jac = ops.batched_jacobian(lambda v: jnp.stack([v[:, 0] * v[:, 1], v[:, 0] ** 2, v[:, 1]], -1))(x)
    xn = np.asarray(x)
    expected = np.stack([np.stack([xn[:, 1], xn[:, 0]], -1), np.stack([2 * xn[:, 0], 0 * xn[:, 0]], -1),
                         np.stack([0 * xn[:, 0], 1 + 0 * xn[:, 0]], -1)], 1)
    np.testing.assert_allclose(np.asarray(jac), expected)


def test_scan_steps_equals_python_loop_and_caches_by_key():
    ops = JaxOps(dtype="float64")

    def step(state, k):
        key, sub = jax.random.split(state["key"])
        x = state["x"] * 0.5 + jax.random.normal(sub, (3,)) + k
        return {"x": x, "key": key}, {"norm": jnp.sum(x**2), "k": k}

    state0 = {"x": jnp.zeros(3), "key": jax.random.PRNGKey(0)}
    st, infos = ops.scan_steps(step, state0, range(1, 6), key="demo")
    ref = state0
    for k in range(1, 6):
        ref, info = step(ref, jnp.int32(k))
        assert infos[k - 1]["k"] == k
        np.testing.assert_allclose(infos[k - 1]["norm"], float(info["norm"]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(st["x"]), np.asarray(ref["x"]), rtol=1e-12)
    assert ops.num_compiles == 1
    ops.scan_steps(step, st, range(6, 11), key="demo")  # same key, same length: cached
    assert ops.num_compiles == 1
    ops.scan_steps(step, st, range(6, 9), key="demo")  # another length: one more compilation
    assert ops.num_compiles == 2


# ----- the adapter agrees with the Pyro adapter on the same model -----------------------------------------
def _theta_pairs(rng: np.random.Generator, pm: PyroLatentModel) -> tuple[dict, dict]:
    theta_t = {}
    for name, p in pm.params.items():
        u = p.to_unconstrained(p.value) + torch.as_tensor(0.2 * rng.standard_normal(tuple(p.value.shape)))
        theta_t[name] = p.to_constrained(u)
    return theta_t, {n: jnp.asarray(v.numpy()) for n, v in theta_t.items()}


@pytest.mark.parametrize("case", ["theophylline", "random_slope", "random_intercept"])
def test_adapter_matches_pyro_adapter(case):
    rng = np.random.default_rng(0)
    if case == "theophylline":
        data = theo_pyro.theophylline_arrays()
        pm = PyroLatentModel(theo_pyro.theophylline_model, (), data)
        nm = NumPyroLatentModel(THEO_NP.theophylline_model, (), THEO_NP.theophylline_arrays())
    else:
        y = rng.normal(size=(30, 4))
        t = np.tile(np.linspace(0, 3, 4), (30, 1))
        args = (y,) if case == "random_intercept" else (t, y)
        pm = PyroLatentModel(getattr(models_pyro, case), tuple(torch.tensor(a) for a in args))
        nm = NumPyroLatentModel(getattr(models_numpyro, case), tuple(jnp.asarray(a) for a in args))
    # same roles, layout and closed-form patterns
    assert nm.num_units == pm.num_units and nm.latent_dim == pm.latent_dim
    assert nm.unit_plate == pm.unit_plate and nm.observed_names == pm.observed_names
    assert [(s.name, s.shape, s.offset, s.kind) for s in nm.latent_sites] == \
        [(s.name, s.shape, s.offset, s.kind) for s in pm.latent_sites]
    assert nm.closed_form_params == pm.closed_form_params and nm.numeric_params == pm.numeric_params
    assert {n: p.anneal for n, p in nm.params.items()} == {n: p.anneal for n, p in pm.params.items()}
    theta_t, theta_j = _theta_pairs(rng, pm)
    z = rng.normal(size=(3, nm.num_units, nm.latent_dim)) * 0.3
    z[..., :] += np.asarray(pm.sample_prior(pm.init_params(), None, 1)[0])
    units = np.array([4, 0, 2])
    for sel in (None, units):
        zs = z if sel is None else z[:, sel]
        ll_t, lp_t = pm.log_densities(theta_t, torch.tensor(zs), sel)
        ll_j, lp_j = nm.log_densities(theta_j, jnp.asarray(zs), None if sel is None else jnp.asarray(sel))
        np.testing.assert_allclose(np.asarray(ll_j), ll_t.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(lp_j), lp_t.numpy(), rtol=1e-10, atol=1e-10)
        s_t = pm.stats(theta_t, torch.tensor(zs), sel)
        s_j = nm.stats(theta_j, jnp.asarray(zs), None if sel is None else jnp.asarray(sel))
        assert set(s_t) == set(s_j)
        for name in s_t:
            np.testing.assert_allclose(np.asarray(s_j[name]), s_t[name].numpy(), rtol=1e-10, atol=1e-10)
    s = {n: torch.as_tensor(np.array(v)).sum(1).mean(0) for n, v in nm.stats(theta_j, jnp.asarray(z)).items()}
    m_t = pm.m_step(s, theta_t, pm.num_units)
    m_j = nm.m_step({n: jnp.asarray(v.numpy()) for n, v in s.items()}, theta_j, nm.num_units)
    for name in m_t:
        np.testing.assert_allclose(np.asarray(m_j[name]), m_t[name].numpy(), rtol=1e-9, atol=1e-12)
    # Gaussian faces (f-SAEM's Gauss-Newton proposal, linearisation likelihood / Fisher information)
    assert (nm.has_gaussian_obs, nm.has_gaussian_prior) == (pm.has_gaussian_obs, pm.has_gaussian_prior) == (True, True)
    for sel in (None, units):
        zs = z if sel is None else z[:, sel]
        jsel = None if sel is None else jnp.asarray(sel)
        for a, b in zip(nm.predict(theta_j, jnp.asarray(zs), jsel), pm.predict(theta_t, torch.tensor(zs), sel)):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-10, atol=1e-12)
        for a, b in zip(nm.observations(jsel), pm.observations(sel)):
            np.testing.assert_array_equal(np.asarray(a), b.numpy())
        for a, b in zip(nm.prior_moments(theta_j, jsel), pm.prior_moments(theta_t, sel)):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-10, atol=1e-12)
    # constrained latents
    for name, v in nm.unpack_latents(jnp.asarray(z)).items():
        np.testing.assert_allclose(np.asarray(v), pm.unpack_latents(torch.tensor(z))[name].numpy(), rtol=1e-12)


def test_model_need_not_broadcast_over_chains():
    """Chains are vmapped: a NumPyro model may index with [:, j] (no leading-dim broadcasting)."""

    def rigid(y):
        mu = numpyro.param("mu", jnp.zeros(2))
        omega = numpyro.param("omega", jnp.ones(2), constraint=constraints.positive)
        with numpyro.plate("unit", y.shape[0]):
            b = numpyro.sample("b", dist.Normal(mu, omega).to_event(1))
            assert b.shape == (y.shape[0], 2)
            numpyro.sample("y", dist.Normal(b[:, 0] + b[:, 1], 1.0), obs=y)

    y = jnp.asarray(np.random.default_rng(1).normal(size=7))
    m = NumPyroLatentModel(rigid, (y,))
    z = m.sample_prior(m.init_params(), jax.random.PRNGKey(0), 4)
    assert z.shape == (4, 7, 2)
    ll, lp = m.log_densities(m.init_params(), z)
    expected = -0.5 * (np.asarray(y) - np.asarray(z).sum(-1)) ** 2 - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(np.asarray(ll), expected, rtol=1e-12)
    assert set(m.closed_form_params) == {"mu", "omega"}


# ----- the compiled iteration is the eager iteration ----------------------------------------------------
def test_compiled_saem_step_equals_eager_step():
    y = jnp.asarray(np.random.default_rng(2).normal(1.0, 1.0, size=(40, 3)))
    model = NumPyroLatentModel(models_numpyro.random_intercept, (y,))
    engine = CoreSAEM(model, num_iters=(6, 2), num_chains=2, burn_in=1, kernels=(1, 1, 1), progress=False)
    state0 = engine.init(jax.random.PRNGKey(5))
    eager = state0
    for k in range(1, 4):
        eager, _ = engine.step(eager, jnp.int32(k), "saem")
    compiled, infos = model.ops.scan_steps(lambda s, k: engine.step(s, k, "saem"), state0, range(1, 4))
    for name in ("z", "scale_rw", "scale_block"):
        np.testing.assert_allclose(np.asarray(getattr(compiled, name)), np.asarray(getattr(eager, name)), rtol=1e-9,
                                   atol=1e-12)
    for name in eager.theta_u:
        np.testing.assert_allclose(np.asarray(compiled.theta_u[name]), np.asarray(eager.theta_u[name]),
                                   rtol=1e-9, atol=1e-12)
    assert [float(i.gamma) for i in infos] == [0.0, 1.0, 1.0]


def test_fit_compiles_one_chunk_program_and_reports_every_iteration():
    y = jnp.asarray(np.random.default_rng(3).normal(size=(20, 3)))
    seen = []
    from latentfit.numpyro import SAEM

    fit = SAEM(models_numpyro.random_intercept, num_iters=(20, 10), num_draws=5, chunk_size=10, progress=False,
               callback=lambda k, rec: seen.append(k)).run(jax.random.PRNGKey(0), y)
    assert seen == list(range(1, 31))  # the callback (and the progress bar) move chunk by chunk
    # chunks 1-10, 11-20, 21-25, 26-30 (draws kept from the last 5 only): two lengths, one program of 10 iterations
    # that runs as many as it is told (it compiled once per length: 5 and 10)
    assert fit.model.ops.num_compiles == 1
    # a NumPyro model has no units-minor face: no chunk draws made ahead, hence no (empty) draws program to compile
    assert fit.engine.chunk_randoms("saem") is None
    assert [type(program).__name__ for program, _ in fit.model.ops._compiled.values()] == ["_ConstsBound"]
    assert len(fit.history["gamma"]) == 30 and fit.latent_draws.shape[1] == 5
    # the same fit in chunks of 30 (one chunk: a loop of 30) and in chunks of 1: the same fit bit for bit
    for chunk in (30, 1):
        other = SAEM(models_numpyro.random_intercept, num_iters=(20, 10), num_draws=5, chunk_size=chunk,
                     progress=False).run(jax.random.PRNGKey(0), y)
        for name, value in fit.history.items():
            np.testing.assert_array_equal(other.history[name], value, err_msg=f"{chunk}: {name}")
        np.testing.assert_array_equal(other.latent_draws, fit.latent_draws)
        for name, value in fit.params.items():
            np.testing.assert_array_equal(other.params[name], value)
    assert fit.latents["b"].shape == (3, 5, 20, 1)
    assert fit.history["theta.mu"].shape == (30,)


# ----- front door -------------------------------------------------------------------------------------
def test_run_takes_a_prng_key_first():
    from latentfit.integrations.numpyro import as_rng_key
    from latentfit.numpyro import SAEM

    y = jnp.asarray(np.random.default_rng(4).normal(size=(10, 3)))
    with pytest.raises(TypeError, match="PRNG key"):
        SAEM(models_numpyro.random_intercept, progress=False).run(y)
    with pytest.raises(ValueError, match="num_iters"):  # options are validated at construction
        SAEM(models_numpyro.random_intercept, num_iters=(0, 5))
    assert np.array_equal(np.asarray(as_rng_key(3)), np.asarray(jax.random.PRNGKey(3)))  # int seeds accepted
    typed = jax.random.key(3)
    assert as_rng_key(typed) is not None


def test_same_model_in_both_ppls_agrees_within_monte_carlo_error():
    """Theophylline written in Pyro and in NumPyro, SAEM (300, 100), seed 0 on each side.

    Tolerance: 4·√2 × the seed-to-seed sd of each estimate (8 seeds per backend, measured once:
    relative sd ka 0.9%, V 0.5%, CL 0.5%, a 0.35%, ω²: ka 2.6%, V 8%, CL 5%; the backends' means over
    the 8 seeds agree to within a third of that sd), i.e. rtol 5% (ka), 3% (V, CL), 2% (a),
    15% / 45% / 30% (ω² of ka, V, CL).
    """
    from backends import theophylline_fit

    p, n = theophylline_fit("pyro").params, theophylline_fit("numpyro").params
    rel = np.r_[np.exp(n["mu"] - p["mu"]), n["a"] / p["a"], (n["omega"] / p["omega"]) ** 2] - 1.0
    tol = np.array([0.05, 0.03, 0.03, 0.02, 0.15, 0.45, 0.30])
    assert np.all(np.abs(rel) < tol), dict(zip(["ka", "V", "CL", "a", "w2_ka", "w2_V", "w2_CL"], rel.round(4)))


@pytest.mark.slow
def test_float32_theophylline_in_saemix_band():
    """NumPyro's default precision (float32) lands in the same saemix band."""
    with jax.enable_x64(False):
        data = THEO_NP.theophylline_arrays()
        assert data["time"].dtype == jnp.float32
        fit = THEO_NP.fit(seed=0, progress=False)
        assert fit.model.ops.dtype == jnp.float32
        p = fit.params
    ka, v, cl = np.exp(p["mu"])
    assert 1.5 <= ka <= 1.6 and 31.0 <= v <= 32.0 and 2.7 <= cl <= 2.8
    assert 0.69 <= p["a"] <= 0.76
    # against the exact maximum, within 4 Monte-Carlo SDs of one run (as test_saem.test_theophylline_in_saemix_band)
    rel = p["omega"] ** 2 / np.array([0.39472, 0.01789, 0.07075]) - 1
    assert np.all(np.abs(rel) < 4 * np.array([0.0234, 0.0818, 0.0468])), rel


# ----- NLME family: model.numpyro_model ------------------------------------------------------------------
def _user_oral(psi: dict, d) -> jnp.ndarray:
    """One-compartment oral model written with jax.numpy (single dose at t = 0)."""
    ka, v, cl = psi["ka"], psi["V"], psi["CL"]  # [..., N, 1]
    k = cl / v
    dose = d.dose_amt[..., :1]
    return dose * ka / (v * (ka - k)) * (jnp.exp(-k * d.time) - jnp.exp(-ka * d.time))


@pytest.mark.parametrize("structural, error", [("one_compartment_oral", "proportional"), (_user_oral, "combined")])
def test_nlme_numpyro_model_has_the_same_log_joint(structural, error):
    from numpyro.infer.util import log_density

    import latentfit as lf
    from latentfit.models import nlme

    df = lf.datasets.theophylline(saemix_form=True)
    model = nlme.NLME(structural, {"ka": 1.2, "V": 25.0, "CL": 2.0}, covariates={"CL": "Weight"}, error=error,
                      data=df, columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    jax_model = model.with_ops(JaxOps())  # what numpyro_model evaluates: the same NLME on JAX arrays
    theta = jax_model.init_params()
    z = jax_model.sample_prior(theta, jax.random.PRNGKey(0), 1)[0]
    total, tr = log_density(handlers.condition(model.numpyro_model, data={"phi": z[:, None, :]}), (), {}, {})
    ll, lp = jax_model.log_densities(theta, z)
    np.testing.assert_allclose(float(total), float(jnp.sum(ll + lp)), rtol=1e-12)
    if isinstance(structural, str):  # library models run on both backends: the torch NLME agrees
        ll_t, lp_t = model.log_densities(model.init_params(), torch.tensor(np.asarray(z)))
        np.testing.assert_allclose(float(total), float((ll_t + lp_t).sum()), rtol=1e-12)
    params = {n for n, s in tr.items() if s["type"] == "param"}
    assert params == set(model.params)
    # the adapter sees the NLME's latent layout and Gaussian faces
    nm = NumPyroLatentModel(model.numpyro_model)
    assert nm.num_units == 12 and nm.latent_dim == 3 and nm.has_gaussian_obs and nm.has_gaussian_prior


def test_jvp_compiles_and_traces_each_function_once():
    """NumPyroPPL.jvp keeps the compiled derivative on the function: three tangents of one function trace it once (the
    unit-map detection's six derivatives of one model evaluation), a new input shape traces it again, and every
    result is the forward derivative of its own tangent."""
    from latentfit.integrations.numpyro import NumPyroPPL

    ppl, calls = NumPyroPPL(), []

    def g(x):
        return jnp.sin(x) * jnp.arange(1.0, x.shape[0] + 1.0)

    def f(x):
        calls.append(x.shape)
        return g(x)

    for i, n in enumerate((3, 3, 3, 5, 5)):
        x = jnp.linspace(0.1, 1.0, n)
        t = x ** i
        np.testing.assert_allclose(np.asarray(ppl.jvp(f, x, t)), np.asarray(jax.jvp(g, (x,), (t,))[1]), rtol=1e-14)
    assert calls == [(3,), (5,)]


def test_unit_map_detection_traces_the_model_once():
    """The row -> unit map found by forward derivatives (no unit_index) costs one trace of the model more than the
    map given: its six derivatives share one compiled program, and the map found is the one given."""
    calls = []

    def model(subject, y=None):
        calls.append(1)
        mu = numpyro.param("mu", 0.0)
        with numpyro.plate("g", 4):
            b = numpyro.sample("b", dist.Normal(mu, 1.0))
        with numpyro.plate("rows", subject.shape[0]):
            numpyro.sample("y", dist.Normal(b[subject], 0.5), obs=y)

    subject = jnp.array([0, 0, 1, 2, 2, 2, 3, 1])
    y = jnp.linspace(-1.0, 1.0, 8)
    found = NumPyroLatentModel(model, args=(subject, y))
    n_found, calls[:] = len(calls), []
    given = NumPyroLatentModel(model, args=(subject, y), unit_index=subject)
    assert n_found - len(calls) == 1
    np.testing.assert_array_equal(found._unit_map["y"], given._unit_map["y"])


@pytest.mark.parametrize("x64, engine, options", [(False, "SAEM", {"num_iters": (20, 10)}),
                                                  (True, "SAEM", {"num_iters": (20, 10)}),
                                                  (True, "MCMCSGD", {"num_iters": 60})])
def test_float32_model_keeps_its_dtype_through_the_fit_and_the_post_fit_tools(x64, engine, options):
    """A float32 NumPyro model, JAX's float64 off (its default) or on: the estimates stay float32 and the
    linearisation, exact on this linear model, is the float64 closed form at θ̂ to float32 rounding.  With float64 on,
    MCMCSGD's fit failed: the burn-in counted its non-finite gradient entries in float32, the gradient step in float64
    (``bool * 1.0``), and ``lax.cond`` refused the two branches."""
    from test_obs_mask import G, rows_data, rows_exact

    import latentfit.numpyro as ln

    group, x, y, m = rows_data()
    with jax.enable_x64(x64):
        fit = getattr(ln, engine)(models_numpyro.masked_rows, progress=False, **options).run(
            jax.random.PRNGKey(0), jnp.asarray(group), jnp.asarray(x, jnp.float32), G, jnp.asarray(y, jnp.float32),
            jnp.asarray(m), "mask")
        assert {n: v.dtype for n, v in fit.params.items()} == {n: np.float32 for n in ("mu", "tau", "beta", "sigma")}
        theta = {k: float(v) for k, v in fit.params.items()}
        ll, _, _, info = rows_exact(theta)
        np.testing.assert_allclose(fit.log_likelihood("lin"), ll.sum(), rtol=1e-5)
        se = fit.standard_errors()
        np.testing.assert_allclose([se[k] for k in ("mu", "tau", "beta", "sigma")],
                                   np.sqrt(np.diag(np.linalg.inv(info))), rtol=1e-3)
