"""NLME fast paths of the SAEM iteration: the MCMC sweep's density evaluator, the diagonal prior draw and the MH
acceptance rules give what the plain computations give (bit for bit, or to rounding for the residual-sum-of-squares
form of the constant error)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import latentfit as lf
from latentfit.checkpoint import checkpoint_files
from latentfit.inference import mcmc
from latentfit.inference.fsaem import FSAEM
from latentfit.inference.ops import make_ops
from latentfit.inference.saem import SAEM
from latentfit.models import nlme


def _unbalanced_table(seed: int = 0) -> pd.DataFrame:
    """Six individuals with 3 to 7 observations (padding), one oral dose, a weight covariate."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(6):
        wt = rng.uniform(50, 90)
        rows.append((i + 1, 0.0, np.nan, 100.0, 1, wt))
        for t in np.sort(rng.uniform(0.2, 24, size=3 + i % 5)):
            rows.append((i + 1, t, rng.uniform(0.5, 6), 0.0, 0, wt))
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "WT"])


@pytest.mark.parametrize("error", ["constant", "exponential", "proportional", "combined"])
def test_density_evaluator_equals_log_densities(error):
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": nlme.Parameter(2.0, random=False)},
                      covariates={"V": "WT"}, error=error, error_init={"a": 0.4, "b": 0.2},
                      data=_unbalanced_table())
    assert not model._no_padding
    theta = model.init_params()
    theta["beta_V_WT"] = torch.tensor(0.01, dtype=torch.float64)
    z = model.sample_prior(theta, torch.Generator().manual_seed(1), 3)  # [3, N, 2]
    ll, lp = model.log_densities(theta, z)
    ll_fast, lp_fast = model.density_evaluator(theta)(z)
    assert torch.equal(lp_fast, lp)
    if error in ("constant", "exponential"):  # residual sum of squares: equal up to rounding
        torch.testing.assert_close(ll_fast, ll, rtol=1e-13, atol=0.0)
    else:  # the per-observation terms themselves
        assert torch.equal(ll_fast, ll)
    units = torch.tensor([4, 1, 3])
    ll_u, lp_u = model.density_evaluator(theta, units)(z[:, units])
    torch.testing.assert_close(ll_u, ll[:, units], rtol=1e-13, atol=0.0)
    assert torch.equal(lp_u, lp[:, units])


def test_diagonal_prior_draw_equals_the_cholesky_product():
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=_unbalanced_table())
    theta = model.init_params()
    theta["omega2_V"] = torch.tensor(0.37, dtype=torch.float64)
    z = model.sample_prior(theta, torch.Generator().manual_seed(3), 2)
    eps = torch.randn((2, model.num_units, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mu = model._mu_r(model._mu(theta), model.num_units)
    expected = mu + eps @ torch.sqrt(model.omega_matrix(theta)).T
    assert torch.equal(z, expected)


def test_acceptance_rules_for_finite_and_nonfinite_log_densities():
    ops = make_ops("torch")
    old = torch.tensor([[-1.0, -2.0, -np.inf, -1.0, np.nan]], dtype=torch.float64)
    new = torch.tensor([[-1.5, np.nan, -3.0, -0.5, -4.0]], dtype=torch.float64)
    zero = torch.zeros_like(old)
    state = mcmc.ChainState(torch.zeros(1, 5, 2, dtype=torch.float64), old, zero,
                            torch.tensor(0.0, dtype=torch.float64))
    z_new = torch.ones(1, 5, 2, dtype=torch.float64)
    log_ratio = new - old
    st, ok = mcmc._accept(ops, torch.Generator().manual_seed(0), log_ratio, state, z_new, new, zero)
    u = torch.rand((1, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # finite -> finite: log u < ratio; NaN proposal: rejected and counted; from -inf / NaN: any finite proposal
    expected = torch.tensor([[bool(torch.log(u[0, 0]) < -0.5), False, True, True, True]])
    assert torch.equal(ok, expected)
    assert float(st.num_nonfinite) == 1.0 and st.num_nonfinite.dtype == torch.float64
    assert torch.equal(st.log_lik, torch.where(expected, new, old))
    assert torch.equal(st.z[..., 0], expected * 1.0)


@pytest.mark.parametrize("error", ["constant", "exponential"])
def test_cached_density_equals_the_evaluator_and_rescores_bit_for_bit(error):
    """The chain's residual sums of squares: the cached evaluator gives the density evaluator's values, re-scoring the
    cache at another θ gives what evaluating there gives, and the statistics from the cache equal the recomputed ones
    (all bit for bit, padding and covariates included)."""
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, covariates={"V": "WT"},
                      error=error, error_init={"a": 0.4}, data=_unbalanced_table())
    theta = model.init_params()
    z = model.sample_prior(theta, torch.Generator().manual_seed(1), 3)
    evaluate, _ = model.cached_density(theta)
    ll, lp, rss = evaluate(z)
    ll_ref, lp_ref = model.density_evaluator(theta)(z)
    assert torch.equal(ll, ll_ref) and torch.equal(lp, lp_ref) and rss.shape == (3, model.num_units)
    other = dict(theta, a=torch.tensor(0.7, dtype=torch.float64), omega2_V=torch.tensor(0.3, dtype=torch.float64),
                 beta_V_WT=torch.tensor(0.02, dtype=torch.float64))
    evaluate2, rescore2 = model.cached_density(other)
    ll2, lp2, rss2 = evaluate2(z)
    assert torch.equal(rss2, rss)  # predictions depend on z alone (every parameter random)
    ll_r, lp_r = rescore2(z, rss)
    assert torch.equal(ll_r, ll2) and torch.equal(lp_r, lp2)
    s_ref, s_cached = model.stats(theta, z), model.stats(theta, z, cache=rss)
    assert s_ref.keys() == s_cached.keys() and all(torch.equal(s_ref[k], s_cached[k]) for k in s_ref)


def test_cached_density_only_where_predictions_ignore_theta():
    df = _unbalanced_table()
    assert nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=df).cached_density(
        nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=df).init_params()) is not None
    for model in (nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, error="proportional",
                            data=df),
                  nlme.NLME("one_compartment_oral", {"ka": nlme.Parameter(1.2, random=False), "V": 20.0, "CL": 2.0},
                            data=df)):
        assert model.cached_density(model.init_params()) is None


class _NoCacheSAEM(SAEM):
    carries_cache = False


@pytest.mark.parametrize("rng", ["global", "per_unit"])
def test_saem_with_the_carried_cache_equals_the_full_evaluation(rng):
    """SAEM whose chains carry the residual sums of squares between iterations gives the fit of the evaluating
    sweep bit for bit (estimates and histories); f-SAEM keeps no cache."""
    df = lf.datasets.theophylline(saemix_form=True)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df,
                      columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    fits = [cls(model, (12, 4), seed=4, progress=False, burn_in=2, rng=rng).run() for cls in (SAEM, _NoCacheSAEM)]
    assert fits[0].state.cache is not None and fits[1].state.cache is None
    for name in fits[0].params:
        assert torch.equal(torch.as_tensor(fits[0].params[name]), torch.as_tensor(fits[1].params[name])), name
    for name in ("objective", "gamma"):
        assert np.array_equal(np.asarray(fits[0].history[name]), np.asarray(fits[1].history[name])), name
    assert FSAEM(model, (3, 1), seed=0, progress=False, burn_in=1).init(model.ops.key(0)).cache is None


def test_float32_normal_draws_on_jax_are_the_float32_stream_cast():
    """The JAX shim's float32-draw view gives the float32 normals cast exactly (float64 arrays), the model's dtype gives
    the shim itself; on torch SAEM keeps its stream and refuses another draw dtype."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    ops = make_ops("jax", dtype="float64")
    key = jax.random.PRNGKey(3)
    draws = ops.with_draw_dtype("float32").normal(key, (2, 6, 3))
    assert draws.dtype == jnp.float64 and ops.normal(key, (1,)).dtype == jnp.float64
    assert np.array_equal(np.asarray(draws), np.asarray(jax.random.normal(key, (2, 6, 3), jnp.float32), np.float64))
    # the acceptance uniforms too (32 bits a value); the uniforms every unit shares (saemix's block) stay float64
    uniforms = ops.with_draw_dtype("float32").uniform(key, (2, 6))
    assert uniforms.dtype == jnp.float64
    assert np.array_equal(np.asarray(uniforms), np.asarray(jax.random.uniform(key, (2, 6), jnp.float32), np.float64))
    assert np.array_equal(np.asarray(ops.with_draw_dtype("float32").shared_uniform(key, (3,))),
                          np.asarray(jax.random.uniform(key, (3,), jnp.float64)))
    assert ops.with_draw_dtype("float64").draw_dtype is None and ops.draw_dtype is None
    torch_model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=_unbalanced_table())
    assert torch_model.mcmc_draw_dtype is None
    assert SAEM(torch_model, (3, 1), burn_in=1, progress=False).draw_dtype is None
    assert SAEM(torch_model, (3, 1), burn_in=1, progress=False, draw_dtype="float64").draw_dtype is None
    with pytest.raises(ValueError, match="JAX option"):
        SAEM(torch_model, (3, 1), burn_in=1, progress=False, draw_dtype="float32")


@pytest.mark.slow
def test_float32_draws_recover_the_population_as_float64_draws():
    """JAX SAEM with float32 normal draws (default) and with float64 ones on the same simulated population (N = 300,
    saemix settings): each estimate within 4 Monte-Carlo SDs of the float64 fits' mean (3 seeds each)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    times = [0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24]
    truth = dict(ka=1.0, V=8.0, CL=0.8, omega2_ka=0.16, omega2_V=0.09, omega2_CL=0.09, a=0.5)
    gen = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, data=nlme.design_table(300, times))
    df = gen.simulate({k: torch.tensor(v, dtype=torch.float64) for k, v in truth.items()}, seed=1)
    model = nlme.NLME("one_compartment_oral", {"ka": 2.0, "V": 15.0, "CL": 1.5}, data=df, backend="jax")
    assert SAEM(model, progress=False).draw_dtype == "float32"  # NLME's default on JAX
    assert SAEM(model, progress=False).sim_ops.draw_dtype == np.float32
    assert SAEM(model, progress=False, draw_dtype="float64").draw_dtype is None
    assert SAEM(model, progress=False, rng="per_unit").draw_dtype is None
    est = {dt: np.array([[float(v) for v in model.fit(seed=s, progress=False, draw_dtype=dt).params.values()]
                         for s in range(3)]) for dt in ("float32", "float64")}
    ref_mean, ref_sd = est["float64"].mean(0), est["float64"].std(0, ddof=1)
    sd = np.maximum(ref_sd, 0.002 * np.abs(ref_mean))  # 3 seeds: an SD estimate floored at 0.2%
    assert np.all(np.abs(est["float32"].mean(0) - ref_mean) < 4 * sd * np.sqrt(1 / 3 + 1 / 3)), (est, ref_sd)


class _Interrupt(Exception):
    pass


def test_saem_resume_with_the_carried_cache_is_bit_identical(tmp_path):
    """The chains' residual sums of squares are part of SAEM's state: a fit interrupted at iteration 17 and resumed
    from its last checkpoint equals the uninterrupted one bit for bit (estimates, histories)."""
    df = lf.datasets.theophylline(saemix_form=True)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df,
                      columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")

    def make(**kw):
        return SAEM(model, (16, 8), seed=3, progress=False, burn_in=2, chunk_size=5, **kw)

    def stop(k, record):
        if k == 17:
            raise _Interrupt

    full = make().run()
    assert full.state.cache is not None
    with pytest.raises(_Interrupt):
        make(callback=stop).run(checkpoint=tmp_path / "ckpt", checkpoint_every=5)
    saved = [k for k, _ in checkpoint_files(tmp_path / "ckpt")]
    assert saved and saved[-1] < 24  # the resumed run starts from a checkpoint before the end
    resumed = make().run(checkpoint=tmp_path / "ckpt", checkpoint_every=5, resume=True)
    for name in full.history:
        np.testing.assert_array_equal(np.asarray(full.history[name]), np.asarray(resumed.history[name]),
                                      err_msg=name)
    for name in full.params:
        assert torch.equal(torch.as_tensor(full.params[name]), torch.as_tensor(resumed.params[name])), name


class _RowMajorSAEM(SAEM):
    units_minor_sweep = False


def _user_oral(psi, d):
    """The one-compartment oral model written as a user would (predictions ``[..., N, T]``, one dose of 100)."""
    xp = d.xp
    ka, v, cl = psi["ka"], psi["V"], psi["CL"]
    k = cl / v
    return 100.0 * ka / (v * (ka - k)) * (xp.exp(-k * d.time) - xp.exp(-ka * d.time))


def _units_minor_case(case):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    if case == "theophylline":
        model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5},
                          data=lf.datasets.theophylline(saemix_form=True), backend="jax",
                          columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    elif case == "covariate_full_exponential":
        model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=_unbalanced_table(),
                          covariates={"CL": "WT"}, omega="full", error="exponential", backend="jax")
    else:
        model = nlme.NLME(_user_oral, {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=_unbalanced_table(), backend="jax")
    assert (model._design_minor is None) == (case == "user_function")
    return model


@pytest.mark.parametrize("case", ["covariate_full_exponential", "user_function"])
def test_units_minor_density_equals_the_cached_density(case):
    """NLME's face for chains laid out ``[L, d, N]`` (a library model's residuals ``[L, T, N]``) gives, eagerly, what
    :meth:`cached_density` and :meth:`prior_transform` give on ``[L, N, d]``, bit for bit: unbalanced data (padding),
    a covariate with a full Ω (at its diagonal start) and the exponential error; a user's structural function (units-
    minor chains, row-major predictions); None on torch and with per-unit padding."""
    import jax.numpy as jnp

    model = _units_minor_case(case)
    theta = model.init_params()
    z = model.sample_prior(theta, model.ops.key(1), 2)
    evaluate, rescore, transform = model.units_minor_density(theta)
    row, minor = model.cached_density(theta)[0](z), evaluate(jnp.swapaxes(z, -1, -2))
    for a, b in zip(row, minor):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(rescore(jnp.swapaxes(z, -1, -2), row[2])[1]), np.asarray(row[1]))
    eps = model.ops.normal(model.ops.key(2), tuple(z.shape))
    assert np.array_equal(np.swapaxes(np.asarray(transform(jnp.swapaxes(eps, -1, -2))), -1, -2),
                          np.asarray(model.prior_transform(theta, eps)))
    assert nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0},
                     data=_unbalanced_table()).units_minor_density(theta) is None  # torch


@pytest.mark.slow
@pytest.mark.parametrize("case", ["theophylline", "covariate_full_exponential", "user_function"])
def test_units_minor_sweep_equals_the_row_major_sweep(case):
    """JAX SAEM whose compiled sweep holds the chains ``[L, d, N]`` fits what the ``[L, N, d]`` sweep fits: the same
    draws, the densities equal up to rounding, estimates within 1e-10 relative, chains within 1e-8."""
    model = _units_minor_case(case)
    fits = [cls(model, (20, 10), seed=2, progress=False, burn_in=2).run() for cls in (SAEM, _RowMajorSAEM)]
    for name in fits[0].params:
        a, b = np.asarray(fits[0].params[name]), np.asarray(fits[1].params[name])
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-300, err_msg=name)
    assert np.max(np.abs(np.asarray(fits[0].state.z) - np.asarray(fits[1].state.z))) < 1e-8
    assert SAEM(model, progress=False, rng="per_unit").units_minor_sweep  # ...and per-unit streams keep [L, N, d]


@pytest.mark.parametrize("kernels", [(1, 1, 1), pytest.param((2, 2, 2), marks=pytest.mark.slow),
                                     pytest.param((0, 3, 0), marks=pytest.mark.slow),
                                     pytest.param((1, 0, 2), marks=pytest.mark.slow)])
def test_units_minor_sweep_draws_are_the_step_by_step_kernels_draws(kernels):
    """The units-minor sweep draws its random numbers before its kernels (``mcmc._sweep_draws``, one vectorised draw
    each): the normals and uniforms the step-by-step kernels draw from the same keys (the prior-IMH and block steps'
    ``(k1, k2) = split(key)``, the component-wise moves' ``split(key, 2d)``), bit for bit, in the float32 draw view;
    kernels with and without each kind of step."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    sim = make_ops("jax", dtype="float64").with_draw_dtype("float32")
    L, d, n = 2, (2 if kernels == (1, 1, 1) else 3), 7

    def step_by_step(keys, kernels):
        n1, n2, n3 = kernels
        prior, rw, uniforms = [], [], []
        for i in range(n1):
            k1, k2 = sim.split(keys[i])
            prior.append(sim.normal_units_minor(k1, (L, d, n)))
            uniforms.append(sim.uniform(k2, (L, n)))
        for i in range(n2):
            ks = sim.split(keys[n1 + i], 2 * d)
            rw.append(jnp.stack([sim.normal(ks[2 * j], (L, n)) for j in range(d)]))
            uniforms += [sim.uniform(ks[2 * j + 1], (L, n)) for j in range(d)]
        for i in range(n3):
            k1, k2 = sim.split(keys[n1 + n2 + 2 * i + 1])
            prior.append(sim.normal_units_minor(k1, (L, d, n)))
            uniforms.append(sim.uniform(k2, (L, n)))
        return tuple(jnp.stack(w) if w else None for w in (prior, rw, uniforms))

    keys = sim.split(sim.key(11), sum(kernels) + kernels[2] + 1)
    got, want = jax.jit(lambda ks: (mcmc._sweep_draws(sim, ks, kernels, (L, d, n)), step_by_step(ks, kernels)))(keys)
    for g, w in zip(got, want):
        assert (g is None and w is None) or np.array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_mh_test_decides_as_log_u_below_the_ratio(backend):
    """``u < exp(log_ratio)`` (the units-minor sweep's MH test) decides as ``log u < log_ratio``: 10^6 float32 grid
    uniforms (exact zeros included) against ratios around log u (a quarter of them within 1e-12 of it), far below it
    (exp underflows), ±inf and NaN; the decisions differ only where the ratio is within 4 roundings of log u."""
    if backend == "jax":
        pytest.importorskip("jax").config.update("jax_enable_x64", True)
    ops = make_ops(backend, dtype="float64" if backend == "jax" else None)
    rng = np.random.default_rng(0)
    u = np.floor(rng.uniform(size=10 ** 6) * 2.0 ** 23) * 2.0 ** -23
    u[:1000] = 0.0
    r = np.log(np.where(u > 0, u, 1e-9)) + rng.normal(scale=rng.choice([1e-12, 1e-3, 1.0, 30.0], size=u.size))
    r[:8] = [-np.inf, np.inf, np.nan, -800.0, -746.0, -745.0, 0.0, -1e308]
    r[1000:1008] = [-np.inf, np.inf, np.nan, -800.0, -16.0, -15.0, 0.0, -1e308]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_u = np.log(u)
    want = log_u < r
    got = ops.to_numpy(mcmc._mh_test(ops.xp, ops.asarray(u), ops.asarray(r)))
    differ = got != want
    with np.errstate(invalid="ignore"):
        gap = np.abs(r - log_u)
    assert np.array_equal(got[:8], want[:8]) and np.array_equal(got[1000:1008], want[1000:1008])
    assert np.all(gap[differ] <= 4 * np.finfo(float).eps * np.maximum(1.0, np.abs(log_u[differ])))
    assert differ.sum() < 20  # ties within rounding: 5 of the 2.5e5 ratios drawn within 1e-12 of log u


def test_large_chunks_compile_with_wide_vectors_and_the_same_exp(monkeypatch):
    """JaxOps compiles a chunk whose state has an array of ``WIDE_CHUNK_ELEMENTS`` entries or more with the wide-vector
    options (512-bit, a preference XLA caps at the CPU's width), smaller chunks and other programs without them;
    float64 ``exp`` gives the same values at both widths."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    seen = []
    compile_ = ops_jax._compile
    monkeypatch.setattr(ops_jax, "_compile", lambda lowered, platform: seen.append(
        ops_jax._compiler_options(platform)) or compile_(lowered, platform))
    ops = make_ops("jax", dtype="float64")
    small = 4096 // 2
    for size in (small, 4096):
        ops.scan_steps(lambda st, k: (st * 0.5 + 1.0, {"s": st.sum()}), jnp.ones((size,)), range(2))
    wide = set(ops_jax.WIDE_VECTOR_OPTIONS.items())
    if jax.default_backend() == "cpu" and not ops_jax._OPTIONS_REFUSED:
        assert [wide <= set(o.items()) for o in seen] == [False, True]
    x = jnp.asarray(np.random.default_rng(1).uniform(-40.0, 5.0, size=(10, 1000)))
    outs = []
    for flag in (False, True):
        ops_jax._WIDE_VECTORS[0] = flag
        try:
            outs.append(np.asarray(compile_(jax.jit(jnp.exp).lower(x), jax.default_backend())(x)))
        finally:
            ops_jax._WIDE_VECTORS[0] = False
    assert np.array_equal(outs[0], outs[1])


def _compact_case(d: int, structural: str = "library") -> nlme.NLME:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    ka = nlme.Parameter(1.2) if d == 3 else nlme.Parameter(1.2, random=False)
    f = "one_compartment_oral" if structural == "library" else _user_oral
    return nlme.NLME(f, {"ka": ka, "V": 20.0, "CL": 2.0}, data=_unbalanced_table(), backend="jax")


@pytest.mark.parametrize("kernels,d,merged,structural", [
    ((2, 2, 2), 3, True, "library"), ((2, 2, 2), 3, False, "library"),
    pytest.param((2, 2, 2), 3, True, "user", marks=pytest.mark.slow),
    pytest.param((1, 0, 2), 3, True, "library", marks=pytest.mark.slow),
    pytest.param((0, 3, 0), 3, True, "library", marks=pytest.mark.slow),
    pytest.param((2, 0, 0), 3, True, "library", marks=pytest.mark.slow),
    pytest.param((1, 1, 1), 2, True, "library", marks=pytest.mark.slow)])
def test_compact_chunks_fit_what_the_kernel_loops_fit(kernels, d, merged, structural, monkeypatch):
    """A small JAX fit's chunks draw every iteration's random numbers before their loop (``SAEM.chunk_randoms``: the
    key chain, then the draws: ``merged``, the key bits of every iteration (``mcmc.stacked_sweep_key_bits``) and one
    threefry pass over every key of the chunk (``mcmc.sweep_draws_from_key_bits``); else each iteration's
    ``mcmc.sweep_randoms`` vectorised over the chunk) and run the sweep's kernel steps in one loop
    (``mcmc._kernel_steps_compact``).  The fit is the one the kernels' own loops, drawing in the loop, give:
    estimates, chains, draws, RNG state and history bit for bit, but the prior-IMH acceptance rate, whose reductions
    are made step by step (within 1e-15); chunks of 25 and a shorter tail; kernels with and without each kind of step,
    d = 2 (no random block to draw), and a user's structural function."""
    from latentfit.inference.ops_jax import JaxOps

    if not merged:
        monkeypatch.setattr(JaxOps, "raw_threefry", lambda self, key: False)
    model = _compact_case(d, structural)

    def fit(max_bytes: int):
        engine = SAEM(model, (20, 11), seed=3, progress=False, burn_in=2, kernels=kernels, num_draws=7)
        engine.CHUNK_RANDOMS_BYTES = max_bytes
        assert engine.chunk_randoms("saem") is not None  # the hook; whether it draws is decided on the chunk
        return engine.run()

    compact, loops = fit(2 ** 20), fit(0)
    for name in compact.params:
        assert np.array_equal(np.asarray(compact.params[name]), np.asarray(loops.params[name])), name
    assert np.array_equal(np.asarray(compact.state.z), np.asarray(loops.state.z))
    assert np.array_equal(np.asarray(compact.state.key), np.asarray(loops.state.key))
    assert np.array_equal(np.asarray(compact.latent_draws), np.asarray(loops.latent_draws))
    assert set(compact.history) == set(loops.history)
    for name, value in compact.history.items():
        if name == "acc.prior_imh":
            np.testing.assert_allclose(value, loops.history[name], rtol=0, atol=1e-15)
        else:
            assert np.array_equal(np.asarray(value), np.asarray(loops.history[name]), equal_nan=True), name


def test_a_chunks_draws_and_loop_run_as_two_programs_and_fit_what_one_program_fits(monkeypatch):
    """A small JAX fit's chunk whose draws are made before its loop runs as two compiled programs
    (``ops_jax.SEPARATE_CHUNK_DRAWS``: the draws', then the loop's, which a later process deserialises on two threads):
    estimates, chains, draws, RNG state and history bit for bit those of the chunk as one program; one pair for the
    chunks of 25 and the tail of 6 (a loop of as many iterations as it is told, over 25 iterations' draws); the loop
    compiled with the small-program options, its large draws argument left out of that choice."""
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    options: list[dict[str, Any]] = []
    choose = ops_jax._compiler_options

    def recording(platform: str, args: Any = None) -> dict[str, Any]:  # each program's, compiled or loaded
        chosen = choose(platform, args)
        if args is not None:
            options.append(chosen)
        return chosen

    monkeypatch.setattr(ops_jax, "_compiler_options", recording)
    for cache in ("_PROGRAMS", "_TRACES"):  # compiled here whatever ran before in this process
        monkeypatch.setattr(ops_jax, cache, type(getattr(ops_jax, cache))())

    def fit(separate: bool) -> Any:
        monkeypatch.setattr(ops_jax, "SEPARATE_CHUNK_DRAWS", separate)
        engine = SAEM(_compact_case(3), (20, 11), seed=3, progress=False, burn_in=2, num_draws=7)
        result = engine.run()
        programs = [program for program, _ in engine.ops._compiled.values()]
        return result, programs, engine

    (two, programs, engine), (one, single, _) = fit(True), fit(False)
    assert [type(p).__name__ for p in programs] == ["_DrawsThenLoop"]  # one for both chunk lengths
    assert [type(p).__name__ for p in single] == ["_ConstsBound"]
    draws = engine.chunk_randoms("saem")(engine.init(engine.ops.key(3)), jnp.arange(1, 26))
    assert draws["sweep"].size > ops_jax.SMALL_PROGRAM_ELEMENTS  # the loop's argument, yet a small program
    assert len(options) >= 3 and all(o.get("xla_cpu_use_fusion_emitters") is False for o in options), options
    for name in two.params:
        assert np.array_equal(np.asarray(two.params[name]), np.asarray(one.params[name])), name
    assert np.array_equal(np.asarray(two.state.z), np.asarray(one.state.z))
    assert np.array_equal(np.asarray(two.state.key), np.asarray(one.state.key))
    assert np.array_equal(np.asarray(two.latent_draws), np.asarray(one.latent_draws))
    for name, value in two.history.items():
        assert np.array_equal(np.asarray(value), np.asarray(one.history[name]), equal_nan=True), name


@pytest.mark.parametrize("kernels, d", [((2, 2, 2), 3), ((1, 0, 2), 4), ((0, 3, 0), 3), ((2, 0, 0), 1),
                                          ((1, 1, 1), 2)])
def test_stacked_sweep_key_bits_are_each_keys_bits(kernels, d):
    """``mcmc.stacked_sweep_key_bits`` (a chunk's key bits: the two threefry passes as one hash applied twice in a
    loop, ``JaxOps.repeated``) equals ``mcmc.sweep_key_bits`` of each key bit for bit, eagerly and compiled; the
    compiled chunk then holds one copy of that hash instead of two (fewer HLO instructions to load)."""
    import jax
    import jax.numpy as jnp

    from latentfit.inference.ops_jax import JaxOps

    ops = JaxOps(jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(11), 7)  # [7, 2] raw threefry keys
    assert ops.raw_threefry(keys[0])
    want = np.stack([np.asarray(mcmc.sweep_key_bits(ops, k, kernels, d)) for k in keys])
    eager = mcmc.stacked_sweep_key_bits(ops, keys, kernels, d)
    compiled = jax.jit(lambda kk: mcmc.stacked_sweep_key_bits(ops, kk, kernels, d))
    assert np.array_equal(np.asarray(eager), want) and np.array_equal(np.asarray(compiled(keys)), want)
    text = compiled.lower(keys).compile().as_text()
    assert text.count("while(") >= 1  # the passes in a loop, not unrolled


def test_chunk_randoms_are_drawn_only_where_they_are_small():
    """``SAEM.chunk_randoms``: on a small JAX fit, each iteration's next key (the key chain of ``split(key, 3)``) and
    sweep draws stacked over the chunk (each iteration's ``mcmc.sweep_randoms`` of its ``k_sim``, laid out flat, bit
    for bit, eagerly too); none above ``CHUNK_RANDOMS_BYTES``, with per-unit streams, on torch, or for
    f-SAEM (whose simulation is its own)."""
    import jax.numpy as jnp

    model = _compact_case(3)
    engine = SAEM(model, (20, 10), seed=3, progress=False)
    state = engine.init(engine.ops.key(3))
    out = engine.chunk_randoms("saem")(state, jnp.arange(1, 6))
    key = state.key
    for k in range(5):
        key = engine.ops.split(key, 3)[0]
        assert np.array_equal(np.asarray(out["key"][k]), np.asarray(key))
    L, n, d = state.z.shape
    randoms = mcmc.unpack_sweep_randoms(out["sweep"][2], engine.kernels, (L, d, n))  # iteration 3's, laid out flat
    want = mcmc.sweep_randoms(engine.sim_ops, engine.ops.split(out["key"][1], 3)[1], engine.kernels, (L, d, n))
    for got, drawn in zip(randoms, want):
        assert np.array_equal(np.asarray(got), np.asarray(drawn))
    assert randoms.eps_prior.shape == (4, L, d, n) and randoms.u.shape == (2 + 2 * d + 2, L, n)
    engine.CHUNK_RANDOMS_BYTES = 100
    assert engine.chunk_randoms("saem")(state, jnp.arange(1, 6)) is None
    assert SAEM(model, (20, 10), progress=False, rng="per_unit").chunk_randoms("saem") is None
    idle = SAEM(model, (6, 3), progress=False, burn_in=2, kernels=(0, 0, 0))  # no MCMC move: nothing to draw
    assert idle.chunk_randoms("saem") is None
    assert np.array_equal(np.asarray(idle.run().state.z), np.asarray(idle.init(idle.ops.key(0)).z))
    assert FSAEM(model, (20, 10), progress=False).chunk_randoms("saem") is None
    torch_model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=_unbalanced_table())
    assert SAEM(torch_model, (20, 10), progress=False).chunk_randoms("saem") is None


def test_threefry_by_hand_draws_what_jax_random_draws():
    """``JaxOps.threefry_hash`` with per-entry keys and counters, ``floats_from_bits`` and ``normals_from_bits`` give
    the draws of ``jax.random`` (through the shim) bit for bit: normals and uniforms in float32 and float64, the
    units-minor normals (counters of the transposed layout), 64-bit uniforms and key splits, keys stacked."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    ops = make_ops("jax", dtype="float64")
    keys = ops.split(ops.key(5), 4)
    assert ops.raw_threefry(keys[0])

    def by_hand(counters, dtype, kind):
        kk = jnp.broadcast_to(keys[:, None, :], (4, len(counters), 2))
        b1, b2 = ops.threefry_hash(kk, counters)
        if kind == "split":
            return jnp.stack([b1, b2], -1)
        draw = ops.normals_from_bits if kind == "normal" else ops.floats_from_bits
        return draw(b1, b2, dtype).astype(ops.dtype)

    l_, j_, i_ = np.meshgrid(np.arange(2), np.arange(3), np.arange(5), indexing="ij")
    minor = (l_ * 15 + i_ * 3 + j_).reshape(-1)
    def both(dtype):
        sim = ops.with_draw_dtype(dtype)
        drawn = lambda draw: jax.vmap(draw)(keys)  # noqa: E731
        return [(drawn(lambda k: sim.normal(k, (7, 5))), by_hand(np.arange(35), dtype, "normal").reshape(4, 7, 5)),
                (drawn(lambda k: sim.uniform(k, (7, 5))), by_hand(np.arange(35), dtype, "uniform").reshape(4, 7, 5)),
                (drawn(lambda k: sim.normal_units_minor(k, (2, 3, 5))),
                 by_hand(minor, dtype, "normal").reshape(4, 2, 3, 5)),
                (drawn(lambda k: sim.shared_uniform(k, (3,))), by_hand(np.arange(3), "float64", "uniform")),
                (drawn(lambda k: sim.split(k, 6)), by_hand(np.arange(6), None, "split"))]

    for dtype in ("float32", "float64"):
        for want, got in jax.jit(functools.partial(both, dtype))():
            assert want.shape == got.shape and np.array_equal(np.asarray(want), np.asarray(got)), dtype


def test_a_value_computed_once_is_the_same_value_and_compiles_smaller():
    """``JaxOps.computed_once`` (a loop of one iteration whose count XLA cannot fold, the key carried through it):
    inside a compiled program it gives ``f``'s value bit for bit and its loop survives XLA's simplification; outside
    a trace it is ``f`` itself; torch's is ``f``.  The importance-sampling log-likelihood draws its Student-t values
    through it: the same terms bit for bit, in a program of fewer HLO instructions (XLA:CPU had copied the draws'
    threefry hashes and inverse error function into each reader's fusion)."""
    import re

    import jax
    import jax.numpy as jnp

    import latentfit as lf
    from latentfit.inference import likelihood, ops_jax
    from latentfit.inference.ops import Ops, make_ops
    from latentfit.inference.ops_jax import JaxOps
    from latentfit.models import nlme

    ops = make_ops("jax", dtype="float64")
    key = jax.random.key_data(jax.random.PRNGKey(3))

    def draw(k: Any) -> Any:
        return ops.normal(k, (40, 3))

    def readers(k: Any, once: bool) -> Any:
        t = ops.computed_once(draw, k) if once else draw(k)
        return jnp.exp(t).sum() + (t * t / (1 + t * t)).sum(), t

    plain, once = (jax.jit(lambda k, o=o: readers(k, o)) for o in (False, True))
    assert np.array_equal(np.asarray(plain(key)[1]), np.asarray(once(key)[1]))
    assert np.asarray(plain(key)[0]) == np.asarray(once(key)[0])
    text = once.lower(key).compile().as_text()
    assert "while(" in text and '"known_trip_count"' not in text.split("while(")[-1].split("\n")[0]
    assert np.array_equal(np.asarray(ops.computed_once(draw, key)), np.asarray(draw(key)))  # eager: f itself
    typed = jax.random.key(3)  # a typed key: f itself
    fn = jax.jit(lambda k: ops.computed_once(lambda kk: jax.random.normal(kk, (4,)), k))
    assert np.array_equal(np.asarray(fn(typed)), np.asarray(jax.random.normal(typed, (4,))))
    torch_ops = make_ops("torch", dtype="float64")
    assert torch_ops.computed_once(lambda k, a: k + a, 1, 2) == 3

    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5},
                      data=lf.datasets.theophylline(saemix_form=True), backend="jax",
                      columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    theta = model.init_params()
    m = model.ops.asarray(np.zeros((model.num_units, 3)))
    s = model.ops.asarray(np.full((model.num_units, 3), 0.3))

    def compiled(identity: bool) -> tuple[int, Any]:
        if identity:
            JaxOps.computed_once = Ops.computed_once  # the draws in the program as they are
        try:
            fn = jax.jit(lambda th, mm, ss, kk: likelihood._is_terms(model, (2000, 500, 4, 0.5), th, mm, ss, kk))
            compiled = ops_jax._compile(fn.lower(theta, m, s, key), "cpu")  # with the library's XLA options
            return len(re.findall(r"^\s+\S+ = ", compiled.as_text(), re.M)), compiled(theta, m, s, key)
        finally:
            JaxOps.computed_once = once_method

    once_method = JaxOps.computed_once
    (n_once, out_once), (n_plain, out_plain) = compiled(False), compiled(True)
    assert np.array_equal(np.asarray(out_once[0]), np.asarray(out_plain[0]))
    assert n_once < 0.85 * n_plain, (n_once, n_plain)
