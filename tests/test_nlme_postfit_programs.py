"""The post-fit computations of an NLME fit on JAX (individual estimates, linearisation standard errors, the
importance-sampling log-likelihood) each run as one compiled program (issue 14 item 9: saemix's default run, end to
end in a fresh process): they equal the operation-by-operation computation, and a second same-shaped fit with its
post-fit work in the same process compiles nothing."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import latentfit as lf  # noqa: E402
from latentfit.inference import fisher, laplace  # noqa: E402
from latentfit.inference import likelihood as lk  # noqa: E402
from latentfit.models import nlme  # noqa: E402

THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")


def _fit(seed: int = 0):
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="jax")
    return model.fit(lf.datasets.theophylline(saemix_form=True), seed=seed, progress=False, num_iters=(30, 20),
                     **THEO)


def _postfit(fit) -> dict[str, np.ndarray]:
    """What saemix's default run adds to the estimates: EBEs, SEs (linearisation), the IS log-likelihood."""
    out = {"ind": fit.individual_parameters().to_numpy(), "se": fit.summary()["se"].to_numpy(),
           "ll": np.array(fit.log_likelihood("is", num_samples=1000, batch_size=500)),
           "mc_se": np.array(fit.log_likelihoods["is"].mc_se)}
    return {**out, **{k: np.asarray(v) for k, v in fit.params.items()}}


@pytest.fixture(scope="module")
def fitted():
    return _fit()


def test_the_fits_theta_is_its_last_history_row_not_a_program_call(fitted, monkeypatch):
    """θ̂ of a compiled run (``fit.params``, the post-fit programs' θ) is the last history row of the chunk that ended
    in the final state, placed as θ_u is: the constraint's compiled program is not called (in a fresh process: one
    program fewer to key and load), and its value is that program's bit for bit.  Any other state still goes
    through the program."""
    fit = fitted
    engine, ops = fit.engine, fit.model.ops
    assert engine._recorded_theta[0] is fit.state
    calls = []
    original = ops.jit_once
    monkeypatch.setattr(ops, "jit_once", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    theta = fit._theta()
    params = fit.params
    assert calls == []
    assert list(theta) == list(fit.state.theta_u)  # θ_u's order
    program = jax.jit(fit.model.constrain)(fit.state.theta_u)
    for name, value in theta.items():
        assert isinstance(value, jax.Array) and value.dtype == program[name].dtype
        assert value.sharding == fit.state.theta_u[next(iter(fit.state.theta_u))].sharding
        np.testing.assert_array_equal(np.asarray(value), np.asarray(program[name]))
        np.testing.assert_array_equal(params[name], fit.history[f"theta.{name}"][-1])
    other = fit.state._replace(theta_u=dict(fit.state.theta_u))  # an equal state, not the run's: the program
    again = engine.theta_of(other)
    assert calls and all(np.array_equal(np.asarray(again[k]), np.asarray(theta[k])) for k in theta)


def test_individual_parameters_come_from_the_modes_program(fitted, monkeypatch):
    """The individual parameters ψ_i at the modes and at the draws are computed by the modes' program (one program
    to key, load and call instead of two): ``individual_parameters`` calls no program of its own, and its table
    equals the model's ψ at the modes and the draws' means and sds computed apart."""
    import dataclasses

    fit = dataclasses.replace(fitted, _cache={})
    ops, model = fit.model.ops, fit.model
    programs = []
    original = ops.jit
    monkeypatch.setattr(ops, "jit", lambda fn, *a, **k: programs.append(fn) or original(fn, *a, **k))
    table = fit.individual_parameters()
    assert len(programs) == 1  # the modes' search (with the prior moments and ψ)
    local = fit._cache["individual_local"]
    assert local.values is not None and list(local.values[0]) == sorted(model.param_names)
    theta = fit._theta()
    at_mode = model.individual_parameters(theta, ops.asarray(local.mode))
    draws = np.asarray(fit.latent_draws)
    at_draws = model.individual_parameters(theta, ops.asarray(draws))
    for name in model.param_names:
        np.testing.assert_allclose(table[f"{name}.mode"], np.asarray(at_mode[name])[:, 0], rtol=1e-13)
        flat = np.asarray(at_draws[name]).reshape(-1, model.num_units)
        np.testing.assert_allclose(table[f"{name}.mean"], flat.mean(0), rtol=1e-13)
        np.testing.assert_allclose(table[f"{name}.sd"], flat.std(0, ddof=1), rtol=1e-10)
    assert list(table.columns[:3]) == [f"{model.param_names[0]}.{c}" for c in ("mode", "mean", "sd")]


def test_importance_sampling_reads_the_units_minor_density(fitted, monkeypatch):
    """The IS log-likelihood's densities come from the model's units-minor face (z laid out ``[S, d, n]``, as SAEM's
    sweeps read it) where it has one: the per-unit terms equal those of ``log_densities`` over ``[S, n, d]`` up to
    rounding, with the same draws."""
    fit = fitted
    model, theta = fit.model, fit._theta()
    ops = model.ops
    mean, sd = fit.conditional_moments()
    assert model.units_minor_density(theta) is not None
    args = (theta, ops.asarray(mean), ops.asarray(sd), ops.key(2))
    sizes = (300, 100, 4, 0.5)  # (num_samples, batch_size, df, defensive)
    minor = jax.jit(lambda *a: lk._is_terms(model, sizes, *a))(*args)
    monkeypatch.setattr(type(model), "units_minor_density", lambda self, th: None)
    plain = jax.jit(lambda *a: lk._is_terms(model, sizes, *a))(*args)
    np.testing.assert_allclose(np.asarray(minor[0]), np.asarray(plain[0]), rtol=1e-13, atol=0.0)
    np.testing.assert_allclose(float(minor[1]), float(plain[1]), rtol=1e-10)


def test_importance_sampling_draws_its_proposal_in_float32(fitted):
    """On JAX the IS proposal's Student-t draws are made from float32 normals and uniforms (as SAEM's MCMC draws:
    a smaller, faster program): the log-likelihood equals the estimator recomputed by hand from those draws
    (``log mean_s p(y_i, z_s) / q_i(z_s)``), and over 12 seeds its mean is within 3 standard errors of the adaptive
    quadrature's value (no bias from the float32 grid)."""
    fit = fitted
    model, theta = fit.model, fit._theta()
    ops = model.ops
    mean, sd = (np.asarray(v) for v in fit.conditional_moments())
    sizes, df = (600, 300), 4
    res = lk.log_likelihood_is(model, theta, mean, sd, num_samples=sizes[0], batch_size=sizes[1], df=df, seed=5)
    draw = ops.with_draw_dtype("float32")
    keys = ops.split(ops.key(5), sizes[0] // sizes[1])
    t = np.concatenate([np.asarray(draw.student_t(k, df, (sizes[1] * mean.size,))).reshape((sizes[1],) + mean.shape)
                        for k in keys])
    z = mean + np.maximum(sd, 1e-8) * t
    ll, lp = (np.asarray(v) for v in model.log_densities(theta, ops.asarray(z)))
    log_q = np.sum(lk.student_t_log_pdf(t, float(df), np), -1) - np.sum(np.log(np.maximum(sd, 1e-8)), -1)
    lw = ll + lp - log_q
    mx = lw.max(0)
    np.testing.assert_allclose(res.per_unit, mx + np.log(np.mean(np.exp(lw - mx), 0)), rtol=1e-10)
    values = [lk.log_likelihood_is(model, theta, mean, sd, seed=s).value for s in range(12)]
    gq = lk.log_likelihood_gq(model, theta, num_nodes=12).value
    assert abs(np.mean(values) - gq) < 3 * np.std(values, ddof=1) / np.sqrt(len(values)) + 1e-3, (values, gq)


def test_a_model_is_freed_after_its_post_fit_programs(fitted):
    """The per-model caches of the post-fit programs (the IS, linearised and quadrature log-likelihoods', the
    linearisation's and Louis' information's) hold their model weakly: a fitted model is freed with its last user,
    after its EBEs, both kinds of SEs and its log-likelihoods (they held it, and its data and programs, for the life
    of the process)."""
    import gc
    import weakref

    fit = _fit(seed=1)  # the fixture's shapes: its programs again
    fit.summary()
    fit.standard_errors("sa")
    fit.log_likelihood("is", num_samples=1000, batch_size=500)
    fit.log_likelihood("gq", num_nodes=4)
    lk.log_likelihood_lin(fit.model, fit._theta(), fit.individual_estimates().mode)
    for cache in (fisher._LIN, fisher._LOUIS, lk._IS, lk._LIN_LL, lk._GQ):
        assert cache.get(fit.model), cache  # each made its program(s) for this model
    model = weakref.ref(fit.model)
    del fit
    gc.collect()
    assert model() is None


@pytest.mark.slow
def test_fused_postfit_programs_equal_the_operation_by_operation_values(fitted):
    """The Newton loop of the modes against its steps run one by one, the importance-sampling program against its
    operations run eagerly (some twenty small programs to compile: slow)."""
    fit = fitted
    model, theta = fit.model, fit._theta()
    ops = model.ops
    mean, sd = fit.conditional_moments()
    # conditional modes: the compiled Newton loop against the same steps run one by one
    mode = ops.to_numpy(laplace.conditional_mode(model, theta, z0=ops.asarray(mean), num_steps=30))
    step = ops.jit(laplace._newton_functions(model, None, laplace.resolve_method(model, "auto"), 10.0)[0])
    z = ops.asarray(mean)
    for _ in range(30):
        z = step(theta, z)
    np.testing.assert_allclose(mode, ops.to_numpy(z), rtol=1e-12, atol=0.0)
    np.testing.assert_array_equal(mode, fit.individual_estimates().mode)
    # importance sampling: the same draws (a loop over the full batches, then the tail) and terms as op by op
    sizes = (40, 16, 4, 0.5)  # (num_samples, batch_size, df, defensive share)
    args = (theta, ops.asarray(mean), ops.asarray(sd), ops.key(3))
    per_unit, mc_se, ess = lk._is_program(model, sizes)(*args)
    eager = lk._is_terms(model, sizes, *args)
    np.testing.assert_allclose(np.asarray(per_unit), np.asarray(eager[0]), rtol=1e-12, atol=0.0)
    np.testing.assert_allclose(float(mc_se), float(eager[1]), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(ess), np.asarray(eager[2]), rtol=1e-10)
    res = lk.log_likelihood_is(model, theta, mean, sd, num_samples=40, batch_size=16, seed=3)
    assert res.value == pytest.approx(float(np.sum(np.asarray(per_unit))), rel=1e-14)
    # the full proposal (Laplace law refined by a weighted pilot): its program against its operations run eagerly
    lap_sizes = (1000, 10, 15)  # pilot draws (two batches of the model's density, mapped), df, Newton steps
    fused = lk._laplace_proposal_program(model, lap_sizes)(theta, ops.asarray(mean), ops.key(4))
    eager = lk._laplace_proposal_terms(model, lap_sizes, theta, ops.asarray(mean), ops.key(4))
    for a, b in zip(fused, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    m_full, chol = lk.laplace_proposal(model, theta, mean, num_samples=1000, df=10, seed=4)
    np.testing.assert_array_equal(m_full, np.asarray(fused[0]))
    np.testing.assert_allclose(np.tril(chol), chol, rtol=0, atol=0)
    assert np.all(np.diagonal(chol, 0, -2, -1) > 0)


def test_the_full_proposal_starts_from_the_ebes_without_a_newton_search_of_its_own(fitted, monkeypatch):
    """The full IS proposal's Laplace law is taken at the EBEs (the individual estimates' 30 Newton steps from the
    chains' means, computed once for both): its program holds no Newton loop, and the proposal equals the one whose
    program searched the modes itself from the chains' means (theophylline: the modes agree to the last bit)."""
    from latentfit.inference import postfit

    model, theta, ops = fitted.model, fitted._theta(), fitted.model.ops
    mean, sd = fitted.conditional_moments()
    est = fitted.individual_estimates()
    searched = lk.laplace_proposal(model, theta, mean, df=4, seed=1)  # 15 Newton steps of its own
    at_modes = lk.laplace_proposal(model, theta, est.mode, df=4, seed=1, num_steps=0)
    for a, b in zip(searched, at_modes):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    asked: list[tuple] = []
    real = lk.laplace_proposal

    def spy(*args, **kwargs):
        asked.append((np.asarray(args[2]), kwargs.get("num_steps")))
        return real(*args, **kwargs)

    monkeypatch.setattr(lk, "laplace_proposal", spy)
    got = postfit._full_proposal(fitted, theta, mean, sd, 4, 0, None, None)
    assert asked[-1][1] == 0 and np.array_equal(asked[-1][0], est.mode)
    assert est.precision is not None and est.precision.shape == est.mode.shape + est.mode.shape[-1:]
    np.testing.assert_allclose(got[0], searched[0], rtol=1e-10, atol=1e-12)
    # a model whose EBEs cannot be had: the proposal searches the modes itself, from the chains' means
    monkeypatch.setattr(postfit, "_local_estimates", lambda fit: (_ for _ in ()).throw(ValueError("no modes")))
    postfit._full_proposal(fitted, theta, mean, sd, 4, 0, None, None)
    assert asked[-1][1] == lk.FULL_NEWTON_STEPS and np.array_equal(asked[-1][0], mean)
    # no search: its program holds no loop of Newton steps (a while loop in the lowered text), the searching one does
    texts = {steps: jax.jit(lambda th, z, k, steps=steps: lk._laplace_proposal_terms(model, (1000, 10, steps), th, z,
                                                                                      k)).lower(
        theta, ops.asarray(mean), ops.key(4)).as_text() for steps in (0, 15)}
    assert texts[0].count("stablehlo.while") < texts[15].count("stablehlo.while")
    assert len(texts[0]) < 0.8 * len(texts[15])
    with pytest.raises(ValueError, match="num_steps"):
        real(model, theta, None, num_steps=0)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_ebes_bring_the_laplace_precision_and_the_proposal_reads_it(fitted, backend):
    """The modes' search returns the precision ``P_i`` at the modes it found (on JAX its loop's last evaluation, the
    step not taken): equal to ``P_i`` evaluated afterwards at those modes, the modes unchanged by it.  The full
    proposal given ``P_i`` (``precision=``) equals the one that computes ``Γ_i`` itself at the modes, and its program
    holds none of the model's derivatives (a smaller program for a warm process to load)."""
    from latentfit.inference import individual

    if backend == "jax":
        model, theta, ops = fitted.model, fitted._theta(), fitted.model.ops
        est = fitted.individual_estimates()
    else:
        pytest.importorskip("torch")
        model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="torch",
                          data=lf.datasets.theophylline(saemix_form=True), **THEO)
        ops = model.ops
        theta = {k: ops.asarray(np.asarray(v)) for k, v in fitted._theta().items()}
        mean, _ = fitted.conditional_moments()  # two draws at the JAX fit's conditional means: the search's start
        est = individual.individual_estimates(model, theta, np.asarray(mean)[None] + np.zeros((2, 1, 1)))
    lap = laplace.conditional_modes(model, theta, z0=ops.asarray(est.mode), num_steps=0, spd=True)
    np.testing.assert_allclose(est.precision, np.asarray(ops.to_numpy(lap.precision)), rtol=1e-10, atol=1e-12)
    plain = laplace.conditional_mode(model, theta, z0=ops.asarray(est.mean), num_steps=30)
    np.testing.assert_allclose(est.mode, np.asarray(ops.to_numpy(plain)), rtol=1e-12, atol=1e-14)
    given = lk.laplace_proposal(model, theta, est.mode, df=4, seed=1, num_steps=0, precision=est.precision)
    computed = lk.laplace_proposal(model, theta, est.mode, df=4, seed=1, num_steps=0)
    for a, b in zip(given, computed):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="precision"):
        lk.laplace_proposal(model, theta, est.mode, num_steps=3, precision=est.precision)
    if backend == "jax":
        z, key, prec = ops.asarray(est.mode), ops.key(4), ops.asarray(est.precision)
        with_p = jax.jit(lambda th, z, k, p: lk._laplace_proposal_terms(model, (1000, 10, 0, True), th, z, k, None,
                                                                        None, p)).lower(theta, z, key, prec).as_text()
        without = jax.jit(lambda th, z, k: lk._laplace_proposal_terms(model, (1000, 10, 0, False), th, z, k)).lower(
            theta, z, key).as_text()
        assert len(with_p) < 0.85 * len(without)


def test_linearisation_program_equals_torch_and_a_second_fit_compiles_nothing(fitted):
    import torch

    first = _postfit(fitted)
    model, theta, ops = fitted.model, fitted._theta(), fitted.model.ops
    mode = fitted.individual_estimates().mode
    # the linearisation information and the reported parameters' Jacobian (one compiled program) against torch's
    # operation-by-operation values at the same θ̂ and modes
    fim, jc, lin = fisher._lin_information(model)(theta, ops.asarray(mode))
    twin = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5},
                     data=lf.datasets.theophylline(saemix_form=True), **THEO)
    theta_t = {k: torch.as_tensor(np.array(v)) for k, v in theta.items()}
    fim_t, jc_t, lin_t = fisher._lin_information(twin)(theta_t, torch.as_tensor(np.array(mode)))
    np.testing.assert_allclose(np.asarray(fim), fim_t.numpy(), rtol=1e-10, atol=0.0)
    np.testing.assert_allclose(np.asarray(jc), jc_t.numpy(), rtol=1e-12, atol=0.0)
    np.testing.assert_allclose(np.asarray(lin), lin_t.numpy(), rtol=1e-12, atol=0.0)  # the ll.lin terms (LAPACK)
    assert np.all(np.isfinite(first["se"])) and np.all(first["se"] > 0)
    compiles: list[str] = []  # XLA compilations (or persistent-cache reads), counted through JAX's own events

    def count(name: str, secs: float, **_: object) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        second = _postfit(_fit())
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert not compiles, len(compiles)
    assert first.keys() == second.keys()
    for name, value in first.items():  # the same fit and post-fit values, bit for bit
        np.testing.assert_array_equal(value, second[name], err_msg=name)


#: saemix's default work on theophylline in a fresh process with the compilation cache in ``argv[1]``: what it imported
#: from scipy, what it traced and what it read from the store
WARM_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import latentfit as lf
from latentfit.inference import ops_jax, ops_jax_store
from latentfit.models import nlme

if sys.argv[1] != "-":
    lf.enable_compilation_cache(sys.argv[1])
ka, seed = (float(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (1.0, 0)
before = sorted(m for m in sys.modules if m.split(".")[0] == "scipy")
lowered = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: lowered.append(1) if name == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
model = nlme.NLME("one_compartment_oral", {"ka": ka, "V": 20.0, "CL": 0.5}, backend="jax")
fit = model.fit(lf.datasets.theophylline(saemix_form=True), seed=seed, progress=False, num_iters=(30, 20),
                columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
ebe = fit.individual_parameters().select_dtypes("number").to_numpy()
se = fit.summary()["se"].to_numpy()
ll = fit.log_likelihood("is", num_samples=1000, batch_size=500)
lin, gq = fit.log_likelihood("lin"), fit.log_likelihood("gq")  # saemix's ll.lin (default) and ll.gq
print(json.dumps({"lin": float(lin), "gq": float(gq), "scipy_before": before,
                  "scipy": sorted(m for m in sys.modules if m.split(".")[0] == "scipy"),
                  "traces": ops_jax.TRACES[0], "lowered": len(lowered),
                  "params": {k: float(v) for k, v in fit.params.items()}, "ebe": ebe.tolist(), "se": se.tolist(),
                  "ll": float(ll), **ops_jax_store.STATS}))
"""


@pytest.mark.slow  # two processes, the first compiling every program (~10 s of CPU)
def test_a_warm_process_fits_and_post_fits_without_lapack_or_scipy(tmp_path):
    """Issue 14 item 9: with the compilation cache warm, a fresh process's theophylline fit, EBEs, linearisation SEs
    and IS, linearised and quadrature log-likelihoods trace and lower nothing, call no LAPACK kernel (the modes'
    Newton solves, the information's V⁻¹, the linearised covariances' and the Laplace covariances' factors are the
    shim's SPD helpers), so scipy is never imported (its cython LAPACK bindings, which jaxlib loads at a LAPACK
    kernel's first use, took 0.11-0.17 s of the ~0.6 s run); the results equal the first process's bit for bit."""
    from test_compilation_cache import run_twice

    pytest.importorskip("flatbuffers")
    first, second = run_twice(WARM_SCRIPT, tmp_path / "cache", 600)
    assert first["traces"] > 0 and first["executables_saved"] > 0, first
    assert second["scipy_before"] == [] and second["scipy"] == [], second["scipy"][:5]
    assert second["traces"] == 0 and second["lowered"] == 0, second
    assert second["executables_loaded"] >= first["executables_saved"] - 1, (first, second)  # the data's analysis
    for name in ("params", "ebe", "se", "ll", "lin", "gq"):
        assert second[name] == first[name], name


@pytest.mark.slow  # three processes, two compiling every program (~10 s of CPU each)
def test_other_initial_values_and_seed_reuse_the_stored_programs(tmp_path):
    """Issue 14 item 9: with the cache warm from a theophylline fit, a fresh process fitting from other initial values
    with another seed traces its programs (the initial values are part of what they read) but lowers and compiles
    none: each program's export and executable are the stored ones (kept under the program's text and the exported
    program: 5.6 s -> ~1.2 s measured); its results equal a process without any cache, bit for bit."""
    import json
    import os
    import subprocess
    import sys

    from test_compilation_cache import _plain_env

    import latentfit

    pytest.importorskip("flatbuffers")
    env = _plain_env(os.path.dirname(os.path.dirname(latentfit.__file__)))

    def run(cache: str, *argv: str) -> dict:
        out = subprocess.run([sys.executable, "-c", WARM_SCRIPT, cache, *argv], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cache = str(tmp_path / "cache")
    first = run(cache)
    assert first["executables_saved"] > 0 and first["exports_saved"] == first["saved"] > 0, first
    other = run(cache, "2.0", "1")
    assert other["traces"] > 0 and other["lowered"] == 0, other
    assert other["executables_saved"] == 0 and other["executables_loaded"] >= other["saved"], other
    assert other["exports_loaded"] >= other["saved"] > 0 and other["exports_saved"] == 0, other
    plain = run("-", "2.0", "1")
    assert plain["executables_loaded"] == 0 and plain["lowered"] > 0, plain
    for name in ("params", "ebe", "se", "ll", "lin", "gq"):
        assert other[name] == plain[name], name
    assert other["params"] != first["params"]


def test_linearised_and_quadrature_log_likelihoods_are_compiled_programs(fitted):
    """saemix's ``ll.lin`` (its default run) and ``ll.gq`` on JAX each run as one compiled program, LAPACK-free (a
    later process finds them in the store: theophylline with the cache warm, ``log_likelihood("lin")`` 0.9 -> ~0.005 s
    and ``("gq")`` 0.96 -> ~0.06 s; op by op each ran dozens of small programs and imported scipy for LAPACK): the same
    values as the operation-by-operation computation over the same units (rounding), and a second call at other
    parameters traces nothing."""
    from latentfit.inference import ops_jax

    fit, model = fitted, fitted.model
    ops, theta = model.ops, fitted._theta()
    modes = ops.asarray(laplace.conditional_mode(model, theta))
    all_units = np.arange(model.num_units)  # the op-by-op path (``units`` given)
    lin = lk.log_likelihood_lin(model, theta, modes)
    np.testing.assert_allclose(lin.per_unit, lk.log_likelihood_lin(model, theta, modes, all_units).per_unit,
                               rtol=1e-11)
    gq = lk.log_likelihood_gq(model, theta, modes)
    np.testing.assert_allclose(gq.per_unit, lk.log_likelihood_gq(model, theta, modes, units=all_units).per_unit,
                               rtol=1e-10)
    gq_program = lk._GQ[model][(30, "auto", False)]  # the defaults' program, from the given start (z0)
    for program, args in ((lk._LIN_LL[model][()], (modes,)), (gq_program, (lk._gq_grid(model, 12), modes))):
        assert "custom_call" not in jax.jit(program.fn).lower(theta, *args).as_text()  # no LAPACK kernel
    traces = ops_jax.TRACES[0]
    other = {k: v * 1.01 for k, v in theta.items()}
    lin2 = lk.log_likelihood_lin(model, other, modes)
    gq2 = lk.log_likelihood_gq(model, other, modes)
    assert ops_jax.TRACES[0] == traces and lin2.value != lin.value and gq2.value != gq.value
    # the fit's own (its EBEs' modes: the same optimum to ~1e-8), with its linearisation SEs as saemix's FIM step
    # gives ll.lin: the SEs' program's terms, no program of its own
    assert fit.log_likelihood("lin") == pytest.approx(lin.value, rel=1e-9)
    assert fit.log_likelihoods["lin"].per_unit is fit.covariance("lin").log_lik_terms


def test_residuals_and_the_vpc_simulate_and_predict_in_compiled_programs(fitted):
    """The residuals' and the prediction-corrected VPC's simulations and predictions, and the individual fits' curves,
    on JAX are compiled programs (``diagnostics.model_program``; theophylline with the cache warm: residuals 0.6 ->
    0.04 s, VPC 0.37 -> 0.04 s; op by op each operation was a program to load in every fresh process): the same
    values as the operations run one by one, and other parameters or another seed trace nothing."""
    from latentfit import plots
    from latentfit.inference import diagnostics, ops_jax
    from latentfit.plots import vpc_summary

    fit, model = fitted, fitted.model
    theta, modes = fit._theta(), model.ops.asarray(fit.individual_estimates().mode)
    compiled = diagnostics.residuals(model, theta, modes, num_sims=200, seed=4)
    vpc = vpc_summary(fit, num_sims=100, seed=2)

    class Eager(diagnostics.ProgramsByModel):  # the bodies called directly: the operations one by one
        def get_program(self, model, key, body):
            return body(lambda: model)

    programs = diagnostics._PROGRAMS
    try:
        diagnostics._PROGRAMS = Eager()
        eager = diagnostics.residuals(model, theta, modes, num_sims=200, seed=4)
        eager_vpc = vpc_summary(fit, num_sims=100, seed=2)
    finally:
        diagnostics._PROGRAMS = programs
    for name in ("pred", "ipred", "iwres", "epred", "pwres", "npde"):
        np.testing.assert_allclose(getattr(compiled, name), getattr(eager, name), rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_allclose(vpc.simulated, eager_vpc.simulated, rtol=1e-12)
    np.testing.assert_allclose(vpc.observed, eager_vpc.observed, rtol=1e-12)
    curves = plots._individual_fits_nlme(fit, model, None, [0, 1], 2, None, False, 50)
    keys = {key for key in programs.get(model, {})}
    assert {(diagnostics._simulate, (200,)), (diagnostics._simulate, (100,)), (diagnostics._predict, ()),
            (diagnostics._population_predict, ()), (diagnostics._population_structural, ()),
            (plots._curves_on_grid, (50,))} <= keys, keys
    ipred, pred = np.asarray(programs[model][(plots._curves_on_grid, (50,))](theta, modes))
    z = np.stack([np.asarray(modes), np.asarray(model.prior_moments(theta)[0])])
    eager_curves = np.asarray(model.structural_prediction_at(theta, z, model.prediction_grid(50)[0]))
    np.testing.assert_allclose(np.stack([ipred, pred]), eager_curves, rtol=1e-12)
    traces = ops_jax.TRACES[0]
    other = {k: v * 1.01 for k, v in theta.items()}
    again = diagnostics.residuals(model, other, modes, num_sims=200, seed=5)
    vpc_summary(fit, num_sims=100, seed=3)
    programs[model][(plots._curves_on_grid, (50,))](other, modes)
    assert ops_jax.TRACES[0] == traces and not np.allclose(again.epred, compiled.epred, equal_nan=True)
    import matplotlib.pyplot as plt

    plt.close(curves)
