"""The opt-in persistent compilation cache (issue "Core v2", item 3): a NumPyro fit re-run in a new process with
``LATENTFIT_COMPILATION_CACHE`` set reuses the compiled programs of the first run (same estimates, a fraction of the
compile time), and :func:`latentfit.enable_compilation_cache` sets JAX's cache options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np, numpyro, numpyro.distributions as dist
    from numpyro.distributions import constraints
    from latentfit.numpyro import SAEM

    def model(y):
        mu = numpyro.param("mu", 0.0)
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("unit", y.shape[0], dim=-2):
            b = numpyro.sample("b", dist.Normal(mu, omega))
            with numpyro.plate("obs", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(b, sigma), obs=y)

    rng = np.random.default_rng(0)
    y = 1.0 + 0.8 * rng.normal(size=(50, 1)) + 0.5 * rng.normal(size=(50, 6))
    fit = SAEM(model, num_iters=(20, 20), progress=False).run(jax.random.PRNGKey(0), y)
    print(json.dumps({"compile": fit.compile_time, "mu": float(fit.params["mu"]),
                      "cache_dir": jax.config.jax_compilation_cache_dir}))
""")


def _run(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_reuses_the_compiled_programs(tmp_path):
    env = dict(os.environ, LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    first = _run(env)
    assert first["cache_dir"] == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())  # programs were written
    second = _run(env)
    assert second["mu"] == first["mu"]
    # measured 5.4 s -> 0.8 s (what remains is tracing and lowering, not XLA compilation)
    assert second["compile"] < 0.5 * first["compile"], (first, second)


def test_enable_compilation_cache_sets_jax_options(tmp_path):
    import jax

    import latentfit

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        path = latentfit.enable_compilation_cache(tmp_path / "c", min_compile_time_secs=0.25)
        assert path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_second_same_shaped_fit_in_one_process_compiles_nothing():
    """Item 3: compiled chunks are keyed on the traced program and the avals of its inputs, with the data passed as
    arguments, so a second fit of a same-shaped model on other data reuses the first fit's executables; its
    estimates equal those of a fit that compiled afresh."""
    import jax
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    from latentfit.inference import ops_jax
    from latentfit.numpyro import SAEM

    def model(y):
        mu = numpyro.param("mu", 0.0)
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("unit", y.shape[0], dim=-2):
            b = numpyro.sample("b", dist.Normal(mu, omega))
            with numpyro.plate("obs", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(b, sigma), obs=y)

    def data(seed):
        rng = np.random.default_rng(seed)
        return 1.0 + 0.8 * rng.normal(size=(40, 1)) + 0.5 * rng.normal(size=(40, 5))

    def fit(y):
        return SAEM(model, num_iters=(10, 10), progress=False).run(jax.random.PRNGKey(0), y)

    compiles: list[str] = []  # XLA compilations, counted through JAX's own monitoring events

    def count(name: str, secs: float, **_: object) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        first = fit(data(0))
        programs, compiled_first = dict(ops_jax._PROGRAMS), len(compiles)
        second = fit(data(1))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert dict(ops_jax._PROGRAMS).keys() == programs.keys()  # nothing new was compiled
    # the second fit compiles nothing at all (eager set-up included): a count, not a timing (the suite's workers
    # share 2 cores; its compile_time, the tracing that finds the programs, was 0.10 s alone and 1.2 s in a run)
    assert compiled_first > 0 and len(compiles) == compiled_first, (compiled_first, len(compiles))
    assert second.compile_time < first.compile_time, (first.compile_time, second.compile_time)
    assert float(second.params["mu"]) != float(first.params["mu"])  # the new data were used, not the old ones
    saved = dict(ops_jax._PROGRAMS)
    ops_jax._PROGRAMS.clear()
    try:
        fresh = fit(data(1))
    finally:
        ops_jax._PROGRAMS.update(saved)
    for name in fresh.params:
        np.testing.assert_array_equal(np.asarray(second.params[name]), np.asarray(fresh.params[name]))
    # a different shape is a different program
    rng = np.random.default_rng(2)
    fit(1.0 + rng.normal(size=(30, 5)))
    assert set(ops_jax._PROGRAMS) - set(saved)


def _line(psi, data):
    return psi["b0"] + psi["b1"] * data.time


@pytest.mark.parametrize("engine", ["SAEM", pytest.param("FSAEM", marks=pytest.mark.slow),
                                    pytest.param("MCMCSGD", marks=pytest.mark.slow)])
def test_a_fit_with_another_seed_bar_or_callback_reuses_the_programs(engine, monkeypatch):
    """Issue 14 item 9: an NLME fit on JAX with another seed, progress bar or callback than an earlier one traces
    nothing (their programs are keyed on what a trace reads: ``Engine.__trace_fingerprint__`` leaves those out), so
    the persistent cache serves it too (theophylline, cache warm for seed 0: seed 1 took 2.8 s, two programs compiled;
    now ~0.15 s).  Its result is the one a fit of that seed gets from programs traced afresh, bit for bit (a program
    that had baked another seed in would not give it), and its callback is called."""
    import jax
    import numpy as np

    from latentfit.inference import ops_jax, ops_jax_store
    from latentfit.inference.fsaem import FSAEM
    from latentfit.inference.mcmcsgd import MCMCSGD
    from latentfit.inference.saem import SAEM
    from latentfit.models import nlme

    jax.config.update("jax_enable_x64", True)
    cls = {"SAEM": SAEM, "FSAEM": FSAEM, "MCMCSGD": MCMCSGD}[engine]
    options = {"num_iters": 15} if engine == "MCMCSGD" else {"num_iters": (10, 5)}
    design = nlme.design_table(20, [0.0, 1.0, 2.0, 4.0], dose=1.0)
    gen = nlme.NLME(_line, {"b0": nlme.Parameter(2.0, "normal", omega2=0.5),
                            "b1": nlme.Parameter(-0.5, "normal", omega2=0.1)}, error_init={"a": 0.3}, data=design)
    df = gen.simulate(seed=0)

    def model():
        return nlme.NLME(_line, {"b0": nlme.Parameter(0.0, "normal"), "b1": nlme.Parameter(0.0, "normal")}, data=df,
                         backend="jax")

    def history_of(fit):
        return {k: np.asarray(v) for k, v in fit.history.items()}

    m = model()
    first = cls(m, seed=0, progress=False, **options).run()
    traces = ops_jax.TRACES[0]
    seen: list[int] = []
    second = cls(m, seed=1, progress=True, callback=lambda k, record: seen.append(k), **options).run()
    assert ops_jax.TRACES[0] == traces  # nothing traced: the first fit's programs
    assert seen == list(range(1, second.num_iterations + 1))
    assert any(not np.array_equal(v, history_of(first)[k]) for k, v in history_of(second).items())  # seed 1's draws
    saved = dict(ops_jax._TRACES), dict(ops_jax._PROGRAMS)
    ops_jax._TRACES.clear()
    ops_jax._PROGRAMS.clear()
    try:
        with monkeypatch.context() as patch:  # nor from the suite's persistent store
            patch.setattr(ops_jax_store, "ENABLED", False)
            fresh = cls(model(), seed=1, progress=False, **options).run()
    finally:
        ops_jax._TRACES.update(saved[0])
        ops_jax._PROGRAMS.update(saved[1])
    assert ops_jax.TRACES[0] > traces  # traced afresh
    for k, v in history_of(fresh).items():
        np.testing.assert_array_equal(history_of(second)[k], v, err_msg=k)


def test_shared_jit_binds_each_closures_arrays_as_arguments():
    """Two closures over different arrays of one shape share one executable, each computing with its own array;
    another shape is another program; under a transformation (grad) the function is inlined."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from latentfit.inference import ops_jax

    def closure(data):
        return ops_jax.SharedJit(lambda t: jnp.sum(jnp.sin(t * data) ** 2))

    a, b = np.linspace(0.0, 1.0, 7), np.linspace(-2.0, 3.0, 7)
    t = jnp.asarray(np.linspace(0.5, 1.5, 7))
    before = set(ops_jax._PROGRAMS)
    fa, fb = closure(a), closure(b)
    np.testing.assert_allclose(float(fa(t)), float(jnp.sum(jnp.sin(t * a) ** 2)), rtol=1e-6)
    np.testing.assert_allclose(float(fb(t)), float(jnp.sum(jnp.sin(t * b) ** 2)), rtol=1e-6)
    assert len(set(ops_jax._PROGRAMS) - before) == 1  # one executable for both closures
    fc = closure(np.ones(5))
    np.testing.assert_allclose(float(fc(jnp.ones(5))), float(jnp.sum(jnp.sin(jnp.ones(5)) ** 2)), rtol=1e-6)
    assert len(set(ops_jax._PROGRAMS) - before) == 2
    np.testing.assert_allclose(jax.grad(fa)(t), jax.grad(lambda s: jnp.sum(jnp.sin(s * a) ** 2))(t), rtol=1e-6)


#: read by :func:`_reads_a_global` at trace time (the memo must see a change)
_OFFSET = 1.0


def _reads_a_global(t):
    return t + _OFFSET


class _Toggle:
    """A class attribute read at trace time (the memo must see it toggled on the class)."""

    square = False

    def __call__(self, t):
        return t * t if self.square else t


def test_trace_memo_keys_on_everything_the_closure_captures(monkeypatch):
    """:func:`ops_jax._program_for` skips tracing a function whose captures it has seen (fingerprint of code, captured
    scalars, captured functions, globals, class attributes and arrays by content); anything that changes the program
    or its constants gives another entry, and every call computes its own closure's answer.  Different data of one
    shape still share one executable (through the traced program's text)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from latentfit.inference import ops_jax

    traces = []
    make_jaxpr = jax.make_jaxpr
    monkeypatch.setattr(jax, "make_jaxpr", lambda *a, **k: traces.append(1) or make_jaxpr(*a, **k))

    def closure(scale, power, fn, data):
        def g(t):  # a Python float, a Python int, a captured function and a captured array
            return jnp.sum(fn(t * scale) ** power * data)
        return ops_jax.SharedJit(g)  # a new SharedJit per "fit": only the process-wide memo can skip the trace

    t = jnp.asarray(np.linspace(0.1, 1.0, 5))
    a, b = np.linspace(0.0, 1.0, 5), np.linspace(2.0, 3.0, 5)

    def check(scale, power, fn, data, new_trace):
        before, programs = len(traces), len(ops_jax._PROGRAMS)
        out = float(closure(scale, power, fn, data)(t))
        np.testing.assert_allclose(out, float(jnp.sum(fn(t * scale) ** power * data)), rtol=1e-12)
        assert (len(traces) > before) == new_trace, (scale, power, fn, new_trace)
        return len(ops_jax._PROGRAMS) - programs

    check(2.0, 2, jnp.sin, a, True)
    assert check(2.0, 2, jnp.sin, a.copy(), False) == 0  # the same captures (equal content): no trace
    check(3.0, 2, jnp.sin, a, True)  # a captured float that changes the program's constants
    check(2.0, 3, jnp.sin, a, True)  # a captured int that changes the program
    check(2.0, 2, jnp.cos, a, True)  # a captured library function
    assert check(2.0, 2, jnp.sin, b, True) == 0  # other data of the same shape: traced, the executable shared
    check(2.0, 2, lambda x: x * 0.5, a, True)  # captured user functions that differ only in a literal ...
    check(2.0, 2, lambda x: x * 0.25, a, True)
    half = 0.5
    check(2.0, 2, lambda x: x * half, a, True)  # ... or in what they capture
    half = 0.75  # noqa: F841 (the lambda above reads the cell; a new lambda over the new value below)
    check(2.0, 2, lambda x: x * half, a, True)

    # values read while tracing (a Python branch on a captured array) and globals read by the traced code
    def branching(data):
        return ops_jax.SharedJit(lambda s: s + 1.0 if float(np.sum(data)) > 0 else s - 1.0)

    assert float(branching(np.ones(3))(jnp.zeros(3))[0]) == 1.0
    assert float(branching(-np.ones(3))(jnp.zeros(3))[0]) == -1.0
    global _OFFSET
    try:
        # (a new closure each time: ``jax.make_jaxpr`` itself caches a function's trace by identity, as ``jax.jit``)
        assert float(ops_jax.SharedJit(lambda s: _reads_a_global(s))(jnp.zeros(2))[0]) == 1.0
        _OFFSET = 5.0
        assert float(ops_jax.SharedJit(lambda s: _reads_a_global(s))(jnp.zeros(2))[0]) == 5.0
    finally:
        _OFFSET = 1.0
    toggle = _Toggle()
    assert float(ops_jax.SharedJit(lambda s: toggle(s))(jnp.full(2, 3.0))[0]) == 3.0
    _Toggle.square = True
    try:
        assert float(ops_jax.SharedJit(lambda s: toggle(s))(jnp.full(2, 3.0))[0]) == 9.0
    finally:
        _Toggle.square = False
    # a closure over something that cannot be keyed (a generator; a Python RNG, its state in C) is traced every
    # time, and still right
    gen = (i for i in range(3))
    before = len(traces)
    for _ in range(2):
        assert float(ops_jax.SharedJit(lambda s: s * 2.0 if gen is not None else s)(jnp.ones(1))[0]) == 2.0
    assert len(traces) == before + 2
    import random

    rng = random.Random(0)
    draws = [float(ops_jax.SharedJit(lambda s: s + rng.random())(jnp.zeros(1))[0]) for _ in range(2)]
    assert draws[0] != draws[1] and len(traces) == before + 4


def test_later_same_data_fit_traces_nothing_and_options_still_count(monkeypatch):
    """A later fit of the same model on the same data takes every program from the trace memo (no tracing at all) and
    reproduces the first fit exactly; a fit with a changed float option (``anneal_factor``) is not served the first
    fit's program: its estimates equal those of a fit that traced and compiled from scratch."""
    import jax
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    from latentfit.inference import ops_jax
    from latentfit.numpyro import SAEM

    def model(y):
        mu = numpyro.param("mu", 0.0)
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("unit", y.shape[0], dim=-2):
            b = numpyro.sample("b", dist.Normal(mu, omega))
            with numpyro.plate("obs", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(b, sigma), obs=y)

    rng = np.random.default_rng(3)
    y = 1.0 + 0.8 * rng.normal(size=(30, 1)) + 0.5 * rng.normal(size=(30, 4))

    def fit(**options):
        return SAEM(model, num_iters=(12, 8), progress=False, **options).run(jax.random.PRNGKey(0), y)

    def params(f):
        return {k: np.asarray(v) for k, v in f.params.items()}

    first = fit()
    traces = []
    make_jaxpr = jax.make_jaxpr
    monkeypatch.setattr(jax, "make_jaxpr", lambda *a, **k: traces.append(1) or make_jaxpr(*a, **k))
    second = fit()
    assert not traces  # nothing traced
    assert second.compile_time < 0.1 * first.compile_time, (first.compile_time, second.compile_time)
    for name, value in params(first).items():
        np.testing.assert_array_equal(value, params(second)[name])
    assert first.history.keys() == second.history.keys()
    for name, value in first.history.items():  # every iteration's record, θ included
        np.testing.assert_array_equal(np.asarray(value), np.asarray(second.history[name]))
    other = fit(anneal_factor=0.5)
    assert traces  # another option: traced again
    saved = dict(ops_jax._PROGRAMS), dict(ops_jax._TRACES)
    ops_jax._PROGRAMS.clear()
    ops_jax._TRACES.clear()
    try:
        fresh = fit(anneal_factor=0.5)
    finally:
        ops_jax._PROGRAMS.update(saved[0])
        ops_jax._TRACES.update(saved[1])
    assert any(not np.array_equal(v, params(first)[k]) for k, v in params(other).items())
    for name, value in params(fresh).items():
        np.testing.assert_array_equal(value, params(other)[name])


def test_later_nlme_jax_fit_traces_nothing(monkeypatch):
    """``NLME(..., backend="jax")`` on theophylline: a later fit of the same model and data is served by the trace
    memo (nothing traced) and reproduces the first fit's estimates and history exactly."""
    import jax
    import numpy as np

    import latentfit as lf
    from latentfit.models import nlme

    df = lf.datasets.theophylline(saemix_form=True)

    def fit():
        model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="jax")
        return model.fit(df, columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose", seed=0,
                         progress=False, num_iters=(30, 20))

    first = fit()
    traces = []
    make_jaxpr = jax.make_jaxpr
    monkeypatch.setattr(jax, "make_jaxpr", lambda *a, **k: traces.append(1) or make_jaxpr(*a, **k))
    second = fit()
    assert not traces
    for name, value in first.params.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(second.params[name]))
    assert first.history.keys() == second.history.keys()
    for name, value in first.history.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(second.history[name]))


def test_trace_memo_keeps_at_most_its_byte_budget_of_data(monkeypatch):
    """The memo holds the traces' captured constants (the fits' data) alive: least recently used traces are dropped
    once their constants pass ``TRACE_CACHE_BYTES``, and a trace larger than the budget is not kept at all."""
    import jax.numpy as jnp

    from latentfit.inference import ops_jax

    monkeypatch.setattr(ops_jax, "_TRACES", type(ops_jax._TRACES)())
    monkeypatch.setattr(ops_jax, "_TRACE_BYTES", {})
    monkeypatch.setattr(ops_jax, "TRACE_CACHE_BYTES", 3 * 800)  # three traces of 100 float64 constants
    x = jnp.ones(3)
    for k in range(5):
        data = jnp.full(100, float(k))
        ops_jax._program_for(lambda v, data=data: v * data.sum(), x)
    assert len(ops_jax._TRACES) == 3 and sum(ops_jax._TRACE_BYTES.values()) == 3 * 800
    assert sorted(float(entry[1][0][0]) for entry in ops_jax._TRACES.values()) == [2.0, 3.0, 4.0]  # the newest
    big = jnp.ones(1000)
    ops_jax._program_for(lambda v: v * big.sum(), x)
    assert len(ops_jax._TRACES) == 3  # 8 kB of constants: not kept


#: a NumPyro fit in a fresh process: ``argv`` = data seed, prior scale read from a global by the model (a changed
#: closure value), the SAEM ``kernels`` option (an engine option), and "version" to pretend another latentfit version
STORE_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import jax, numpy as np, numpyro, numpyro.distributions as dist
    from numpyro.distributions import constraints
    import latentfit
    from latentfit.inference import ops_jax, ops_jax_store
    from latentfit.numpyro import SAEM

    seed, SCALE, kernel, version = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if version != "-":
        latentfit.__version__ = version
    if sys.argv[5:] == ["wait-ahead"]:  # start the read-ahead on the store's trail and let it finish before the fit
        import pathlib, time
        (trail,) = pathlib.Path(ops_jax_store.store_dir()).glob("*.lfx.trail")
        ops_jax_store._read_ahead(trail.name[:-len(".trail")], jax.devices()[0])
        while ops_jax_store._AHEAD[0].pending or ops_jax_store._AHEAD[0].busy:
            time.sleep(0.01)

    def model(y):
        mu = numpyro.param("mu", 0.0)
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("unit", y.shape[0], dim=-2):
            b = numpyro.sample("b", dist.Normal(mu, omega * SCALE))
            with numpyro.plate("obs", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(b, sigma), obs=y)

    rng = np.random.default_rng(seed)
    y = 1.0 + 0.8 * rng.normal(size=(30, 1)) + 0.5 * rng.normal(size=(30, 4))
    fit = SAEM(model, num_iters=(15, 10), progress=False, kernels=(kernel, 2, 2)).run(jax.random.PRNGKey(0), y)
    h = hashlib.sha256()
    for k in sorted(fit.params):
        h.update(np.ascontiguousarray(np.asarray(fit.params[k])).tobytes())
    for k in sorted(fit.history):
        h.update(np.ascontiguousarray(np.asarray(fit.history[k])).tobytes())
    print(json.dumps({"sha": h.hexdigest(), "traces": ops_jax.TRACES[0], "source": latentfit.__file__,
                      **ops_jax_store.STATS}))
""")


def _fit(env: dict[str, str], seed: int = 0, scale: float = 1.0, kernel: int = 2, version: str = "-",
         wait_ahead: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", STORE_SCRIPT, str(seed), str(scale), str(kernel), version,
                          *(["wait-ahead"] if wait_ahead else [])], env=env,
                         capture_output=True, text=True, timeout=600, cwd=env["PYTHONPATH"])
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _store_env(tmp_path, source: str) -> dict[str, str]:
    return dict(_plain_env(source), LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"))


def _plain_env(source: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=source)
    env.pop("LATENTFIT_COMPILATION_CACHE", None)
    return env


def run_twice(script: str, cache: Any, timeout: int) -> tuple[dict, dict]:
    """``script`` (taking the cache directory) in two fresh processes importing this checkout's latentfit, without the
    user's cache variable: the JSON records of their last output lines, the first (cold) and the second (warm)."""
    import latentfit

    env = _plain_env(os.path.dirname(os.path.dirname(latentfit.__file__)))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script, str(cache)], env=env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs[0], runs[1]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store filled by one process: ``(environment, the fit's record)``.  The processes import a copy of the
    package made once: entries are keyed on latentfit's source, which must not change between them."""
    import shutil

    import latentfit

    pytest.importorskip("flatbuffers")
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(os.path.dirname(latentfit.__file__), source / "latentfit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = _store_env(tmp_path_factory.mktemp("store"), str(source))
    first = _fit(env)
    first["entries"] = sorted(os.listdir(os.path.join(env["LATENTFIT_COMPILATION_CACHE"], "latentfit-traces")))
    return env, first


def test_second_process_traces_nothing_with_the_store(stored):
    """Issue 10 item 6 / issue 14 item 9: with the persistent cache on, a second process fitting the same model on
    the same data loads every traced program from the on-disk store (``latentfit-traces``): it traces nothing, and
    its estimates and history are bit-identical to the first process's and to a fit without any cache."""
    env, first = stored
    assert first["source"].startswith(env["PYTHONPATH"])  # the copy
    assert first["traces"] > 0 and first["saved"] == first["traces"], first
    assert len([f for f in first["entries"] if f.endswith(".lft")]) == first["saved"]
    assert len([f for f in first["entries"] if f.endswith(".lfr")]) == first["records_saved"] == 1  # the analysis
    # every stored program's executable kept beside it (``.lfx``), and called from there by the second process
    # (and the model's first run: ``run_traced`` keeps its executable too)
    assert first["executables_saved"] == first["saved"] + 1, first
    assert first["exports_saved"] == first["saved"] and first["exports_loaded"] == 0, first  # ``.lfp``: by the text
    assert len([f for f in first["entries"] if f.endswith(".lfx")]) == first["executables_saved"]
    second = _fit(env)
    # the model's analysis read from its record: only the fit's own programs are needed (the analysis' are not run)
    assert second["traces"] == 0 and 0 < second["loaded"] <= first["saved"] and second["rejected"] == 0, second
    assert second["records_loaded"] == 1, second
    assert second["executables_loaded"] == second["loaded"] + 1 and second["executables_saved"] == 0, second
    assert second["sha"] == first["sha"] == _fit(_plain_env(env["PYTHONPATH"]))["sha"]


@pytest.mark.parametrize("change", [pytest.param({"scale": 1.5}, marks=pytest.mark.slow), {"version": "0.0.0-other"},
                                    {"seed": 1}, pytest.param({"kernel": 3}, marks=pytest.mark.slow)])
def test_the_store_does_not_serve_other_data_options_closures_or_versions(stored, change):
    """A second process that differs in a value the model reads from a global, the latentfit version, the data or an
    engine option does not reuse the stored traces: it traces again and equals a fit without any cache.  Other data
    of the same shapes trace to the same programs (the data are arguments): their stored executables serve it,
    nothing is compiled (issue 14 item 9: theophylline with other values or initial values 5.6 -> ~2 s warm)."""
    env, first = stored
    again = _fit(env, **change)
    assert again["traces"] > 0 and again["loaded"] < first["saved"], again
    assert again["loaded"] == 0 or "version" not in change, again  # another version: no entry at all
    if "version" in change:  # the same fit, traced again
        assert again["sha"] == first["sha"]
        # the same programs under new keys are compiled afresh (their executables are named by the exported program
        # and the environment, ``ops_jax_store.program_digest``, which the version is part of), not taken from JAX's
        # cache (an executable XLA deserialised comes back short when serialised: "Function wrapped_log not found" in
        # the next process), and a third process calls their stored executables
        assert again["executables_saved"] == again["saved"] + 1 > 1, again
        third = _fit(env, **change)
        assert third["executables_loaded"] == third["loaded"] + 1 > 1 and third["traces"] == 0, third
        assert third["sha"] == first["sha"]
    else:
        assert again["sha"] == _fit(_plain_env(env["PYTHONPATH"]), **change)["sha"]
        assert again["sha"] != first["sha"]  # the change mattered
    if "seed" in change:  # every traced program's executable read from the store (named by the program, not the
        # key); compiled: at most the model's first run (``run_traced``), whose program carries values of the data
        assert again["executables_loaded"] >= again["saved"] > 1 and again["executables_saved"] <= 1, again
        assert again["executables_from_jax_cache"] == 0, again
        # nor lowered: each program's export is the one the first process kept under the program's text
        assert again["exports_loaded"] >= again["saved"] and again["exports_saved"] == 0, again


@pytest.mark.slow  # three more processes (~15 s of CPU each)
def test_a_corrupted_or_truncated_entry_is_ignored(stored, tmp_path):
    """Entries (programs and the analysis' record) truncated, with flipped bytes, or replaced by garbage are ignored
    without an error (checksum): the model is analysed and its programs traced again, and the fit is the same."""
    import shutil

    env, first = stored
    env = dict(env, LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"))
    shutil.copytree(stored[0]["LATENTFIT_COMPILATION_CACHE"], tmp_path / "cache")
    entries = [tmp_path / "cache" / "latentfit-traces" / name for name in first["entries"]
               if name.endswith((".lft", ".lfr"))]  # the first fit's programs and record (their executables: not read)
    assert len(entries) >= 3
    for i, entry in enumerate(entries):
        data = bytearray(entry.read_bytes())
        if i % 3 == 0:
            entry.write_bytes(bytes(data[: len(data) // 2]))  # truncated
        elif i % 3 == 1:
            data[len(data) // 2] ^= 0xFF  # one byte flipped
            entry.write_bytes(bytes(data))
        else:
            entry.write_bytes(b"not an entry at all")
    second = _fit(env)
    assert second["rejected"] == len(entries) and second["traces"] == first["traces"], second
    assert second["loaded"] == second["records_loaded"] == 0
    assert second["sha"] == first["sha"]


def test_a_later_process_reads_its_executables_ahead(stored, tmp_path, monkeypatch):
    """Issue 14 item 9: a process that loads stored executables leaves a trail (``<first>.lfx.trail``: the ones it
    loaded after its first, in order); the next process starting with the same executable deserialises the others in
    a background thread while it works, and hands each over when asked: the same executables, the same fit bit for
    bit.  A damaged trail is ignored, and the read-ahead can be switched off."""
    import shutil

    env, first = stored
    env = dict(env, LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"))
    shutil.copytree(stored[0]["LATENTFIT_COMPILATION_CACHE"], tmp_path / "cache")
    folder = tmp_path / "cache" / "latentfit-traces"
    for trail in folder.glob("*.trail"):  # whatever earlier tests left: this test writes its own
        trail.unlink()
    second = _fit(env)  # loads every executable itself and leaves its trail
    assert second["executables_read_ahead"] == 0 and second["executables_loaded"] >= 3, second
    (trail,) = folder.glob("*.lfx.trail")
    names = json.loads(trail.read_text())
    assert len(names) == second["executables_loaded"] - 1 and all((folder / n).exists() for n in names)
    # the thread given time to read the whole trail: every executable after the first comes from it
    third = _fit(env, wait_ahead=True)
    assert third["executables_loaded"] == second["executables_loaded"], third
    assert third["executables_read_ahead"] == len(names) and third["rejected"] == 0, third
    assert third["sha"] == second["sha"] == first["sha"]
    # racing the fit (what a user's process does): the caller reads what the thread has not reached, the same fit
    raced = _fit(env)
    assert raced["executables_loaded"] == second["executables_loaded"] and raced["rejected"] == 0, raced
    assert raced["executables_read_ahead"] <= len(names) and raced["sha"] == first["sha"], raced
    trail.write_text("{not json")
    fourth = _fit(dict(env))
    assert fourth["executables_read_ahead"] == 0 and fourth["sha"] == first["sha"], fourth
    assert json.loads(trail.read_text()) == names  # written again by the fourth process
    off = _fit(dict(env, LATENTFIT_READ_AHEAD="0"))
    assert off["executables_read_ahead"] == 0 and off["executables_loaded"] == second["executables_loaded"], off
    assert off["sha"] == first["sha"]


def test_the_read_ahead_follows_the_trails_order(tmp_path, monkeypatch):
    """The read-ahead thread reads the trail's entries in the order the last process asked for them (the post-fit
    programs as a fit calls them: the standard errors' before the larger importance-sampling program's), leaving out
    the first executable and entries no longer in the store."""
    import threading

    from latentfit.inference import ops_jax_store

    started = []
    monkeypatch.setattr(threading, "Thread", lambda **kw: type("T", (), {"start": lambda self: started.append(kw)})())
    monkeypatch.setattr("atexit.register", lambda *a, **k: None)
    names = [f"{c * 40}-x.lfx" for c in "abcde"]
    for name, size in zip(names, (10, 500, 20, 300, 40)):
        (tmp_path / name).write_bytes(b"\0" * size)
    (tmp_path / names[3]).unlink()  # trimmed from the store since
    (tmp_path / f"{names[0]}.trail").write_text(json.dumps(names[1:]))
    ahead = ops_jax_store._ReadAhead()
    ahead.start(names[0], tmp_path, None)
    assert ahead.pending == [names[1], names[2], names[4]] and len(started) == 1


def test_the_read_ahead_begins_with_the_larger_of_the_trails_first_two(tmp_path, monkeypatch):
    """A compiled fit asks for its chunk's draws (a small program) right before the chunk's loop (the largest): the
    read-ahead thread begins with the larger of the trail's first two entries, so that the main thread reads the
    smaller one itself beside it; the rest in the trail's order."""
    import threading

    from latentfit.inference import ops_jax_store

    monkeypatch.setattr(threading, "Thread", lambda **kw: type("T", (), {"start": lambda self: None})())
    monkeypatch.setattr("atexit.register", lambda *a, **k: None)
    names = [f"{c * 40}-x.lfx" for c in "abcd"]
    for name, size in zip(names, (10, 100, 500, 50)):
        (tmp_path / name).write_bytes(b"\0" * size)
    (tmp_path / f"{names[0]}.trail").write_text(json.dumps(names[1:]))
    ahead = ops_jax_store._ReadAhead()
    ahead.start(names[0], tmp_path, None)
    assert ahead.pending == [names[2], names[1], names[3]]
    assert ahead.take(names[1]) is None and ahead.pending == [names[2], names[3]]  # the caller reads it itself


def test_a_damaged_stored_executable_is_ignored(stored, tmp_path):
    """Issue 14 item 9: stored executables (``.lfx``) truncated, with a flipped byte, or replaced by garbage are
    ignored without an error (checksum): the programs are compiled from their stored traces as before (JAX's cache),
    their executables written again, and the fit is bit-identical."""
    import shutil

    env, first = stored
    env = dict(env, LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"))
    shutil.copytree(stored[0]["LATENTFIT_COMPILATION_CACHE"], tmp_path / "cache")
    folder = tmp_path / "cache" / "latentfit-traces"
    executables = [folder / name for name in first["entries"] if name.endswith(".lfx")]
    assert len(executables) == first["executables_saved"] >= 3
    for i, entry in enumerate(executables):
        data = bytearray(entry.read_bytes())
        if i % 3 == 0:
            entry.write_bytes(bytes(data[: len(data) // 2]))
        elif i % 3 == 1:
            data[len(data) // 2] ^= 0xFF
            entry.write_bytes(bytes(data))
        else:
            entry.write_bytes(b"not an executable")
    second = _fit(env)
    assert second["traces"] == 0 and second["loaded"] > 0, second  # the traces still served (the fit's own)
    # each executable read is refused and compiled again from its trace: kept when compiled afresh, not when JAX's
    # cache served it (XLA serialises an executable it deserialised without part of its code)
    assert second["executables_loaded"] == 0 and second["rejected"] == second["loaded"] + 1, second  # + first run
    assert second["executables_saved"] + second["executables_from_jax_cache"] == second["rejected"], second
    assert second["sha"] == first["sha"]


def test_a_stored_executable_that_fails_to_run_is_compiled_instead(stored, tmp_path):
    """An executable whose entry is sound (checksum, key, environment) but whose code is incomplete (here: each one
    deserialised and serialised again, which XLA:CPU does without part of its code; XLA then fails to run it,
    "Function ... not found") is discarded at its first run and its program compiled from its trace: no error, the
    fit bit-identical."""
    import shutil
    import struct

    import jax
    from jax._src.lib import xla_client as xc

    from latentfit.inference import ops_jax_store as store

    env, first = stored
    env = dict(env, LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"))
    shutil.copytree(stored[0]["LATENTFIT_COMPILATION_CACHE"], tmp_path / "cache")
    device = jax.devices()[0]
    shortened = 0
    for entry in (tmp_path / "cache" / "latentfit-traces").glob("*.lfx"):
        body = entry.read_bytes()[len(store._MAGIC) + 32:]
        (size,) = struct.unpack("<Q", body[:8])
        blob = body[8 + size:]
        again = bytes(device.client.serialize_executable(
            device.client.deserialize_executable(blob, xc.DeviceList((device,)), None)))
        shortened += len(again) < len(blob)
        assert store._write_entry(entry, body[8:8 + size], [again])
    assert shortened >= first["executables_saved"] - 1, shortened  # measured 8 of 9
    second = _fit(env)
    assert second["executables_loaded"] == second["loaded"] + 1 >= second["rejected"] > 0, second  # failed to run
    assert second["sha"] == first["sha"]


LAPACK_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    import latentfit
    from latentfit.inference import ops_jax_store
    from latentfit.inference.ops_jax import JaxOps

    latentfit.enable_compilation_cache(sys.argv[1])
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3, 3)) + 3 * np.eye(3)
    ops = JaxOps()
    solve = ops.jit(lambda b: ops.xp.linalg.solve(a, b[..., None])[..., 0].sum(0) * ops.xp.exp(b[0]))
    out = np.asarray(solve(ops.asarray(rng.normal(size=(5, 3)))))
    print(json.dumps({"out": out.tobytes().hex(), **ops_jax_store.STATS}))
""")


def test_a_stored_lapack_executable_runs_in_a_fresh_process(tmp_path):
    """A stored executable that calls LAPACK (a batched solve) runs in a fresh process that lowered nothing (its
    LAPACK handlers are set up before it is loaded: without that, XLA calls a null kernel) and gives the first
    process's numbers bit for bit."""
    pytest.importorskip("flatbuffers")
    first, second = run_twice(LAPACK_SCRIPT, tmp_path / "cache", 300)
    assert first["executables_saved"] == 1 and second["executables_loaded"] == 1, (first, second)
    assert second["out"] == first["out"]


def test_a_stored_executable_round_trips_and_foreign_ones_are_refused(tmp_path, monkeypatch):
    """:func:`ops_jax_store.save_executable` / :func:`load_executable` in one process: a program with LAPACK calls
    and an unused argument, called from its stored executable, gives its compiled outputs bit for bit; an entry under
    other compiler options, from another host CPU or environment, for other arguments or damaged is not used."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from latentfit.inference import ops_jax_store as store

    monkeypatch.setattr(store, "store_dir", lambda: tmp_path / store.FOLDER)

    def program(consts, x, unused):
        a, b = consts
        return [jnp.linalg.solve(a, b * x), jnp.exp(x).sum(), unused.shape[0] * x]

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(4, 4)) + 4 * np.eye(4))
    consts, x, unused = (a, jnp.asarray(rng.normal(size=4))), jnp.asarray(rng.normal(size=4)), jnp.zeros(3)
    compiled = jax.jit(program).lower(consts, x, unused).compile()
    options = {"opt": "1"}
    assert store.save_executable("k1", options, compiled)
    args = [*consts, x, unused]
    loaded = store.load_executable("k1", options, args, 3)
    assert loaded is not None
    want = compiled(consts, x, unused)
    for _ in range(2):
        got = loaded(consts, x, unused)
        assert len(got) == 3 and all(np.asarray(g).tobytes() == np.asarray(w).tobytes() for g, w in zip(got, want))
    x2 = jnp.asarray(rng.normal(size=4))  # other values, same program
    assert np.array_equal(np.asarray(loaded(consts, x2, unused)[0]), np.asarray(compiled(consts, x2, unused)[0]))
    with pytest.raises(TypeError):
        loaded(consts, jnp.zeros(5), unused)
    assert store.load_executable("k1", {"opt": "2"}, args, 3) is None  # other options: another file
    assert store.load_executable("k1", options, [*consts, jnp.zeros(5), unused], 3) is None
    assert store.load_executable("k1", options, args, 2) is None
    assert store.load_executable("k2", options, args, 3) is None  # absent
    monkeypatch.setattr(store, "_host_tag", lambda: "another CPU")
    assert store.load_executable("k1", options, args, 3) is None
    monkeypatch.undo()
    monkeypatch.setattr(store, "store_dir", lambda: tmp_path / store.FOLDER)
    monkeypatch.setattr(store, "_environment_tag", lambda: "another jax")
    assert store.load_executable("k1", options, args, 3) is None
    monkeypatch.undo()
    monkeypatch.setattr(store, "store_dir", lambda: tmp_path / store.FOLDER)
    path = next((tmp_path / store.FOLDER).glob("k1-*.lfx"))
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    assert store.load_executable("k1", options, args, 3) is None


def test_stable_digest_names_what_a_trace_reads():
    """The store's key (:func:`ops_jax_store.stable_digest`): equal for equal captures made separately (code by
    content, arrays by content), different when a captured value, an array's content or a method of the user's class
    differs (classes are named, so their methods must be in the key), and None for what has no name outside this
    process (a module of the user's)."""
    import types

    import numpy as np

    from latentfit.inference import ops_jax_store as store
    from latentfit.inference.ops_jax_memo import fingerprint

    def key(fn):
        return store.stable_digest(fingerprint(fn))

    def closure(scale, data):
        return lambda t: (t * scale * data).sum()

    a = np.linspace(0.0, 1.0, 5)
    assert key(closure(2.0, a)) == key(closure(2.0, a.copy())) is not None
    assert key(closure(2.0, a)) != key(closure(3.0, a))
    assert key(closure(2.0, a)) != key(closure(2.0, a + 1e-12))

    def user_class(power):
        namespace: dict = {}
        exec(f"class Model:\n    def f(self, t):\n        return t ** {power}\n", namespace)
        cls = namespace["Model"]
        cls.__module__ = "user_models"
        return cls()

    one, two = user_class(2), user_class(3)
    assert type(one).__qualname__ == type(two).__qualname__
    assert key(lambda t: one.f(t)) != key(lambda t: two.f(t))  # same name, another method
    mod = types.ModuleType("user_helpers")
    assert key(lambda t: mod.g(t)) is None


def test_stable_digest_feeds_a_repeated_object_from_its_memo(monkeypatch):
    """An object reached from several keys of a process (a model, an engine) is walked once for the store's digests
    (:meth:`ops_jax_store._Stable.instance`, fed as the digest of its fields): every digest equals the one an empty
    memo gives (a fresh process, keys in any order), a later key is fed the object from the memo (far fewer values
    walked), the model met first through another object or directly is one fingerprint (so the memo finds it), and an
    object holding a user's class (numbered per key) is not remembered."""
    import types

    import latentfit as lf
    from latentfit.inference import ops_jax_store as store
    from latentfit.inference.ops_jax_memo import fingerprint
    from latentfit.models import nlme

    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5},
                      data=lf.datasets.theophylline(saemix_form=True), backend="jax",
                      columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    theta = model.init_params()
    engine = types.SimpleNamespace(ops=model.ops, design=model.design, model=model)  # the model's parts met first
    keys = [fingerprint(f) for f in (lambda z: model.log_densities(theta, z), model.constrain,
                                     lambda z: model.predict(theta, z), lambda: engine)]

    def model_keys(key: Any, out: list) -> list:
        if isinstance(key, tuple):
            if len(key) == 4 and key[0] == "instance" and "NLME" in repr(key[1])[:200]:
                out.append(key)
            else:
                for part in key:
                    model_keys(part, out)
        return out

    found = [model_keys(k, []) for k in keys]
    assert all(len(f) == 1 for f in found) and all(f[0] == found[0][0] for f in found)
    monkeypatch.setattr(store, "_INSTANCES", {})
    visits: list[int] = []
    call = store._Stable.__call__
    monkeypatch.setattr(store._Stable, "__call__", lambda self, x: (visits.append(1), call(self, x))[1])
    fed = [store.stable_digest(k) for k in keys]
    assert None not in fed and len(set(fed)) == len(fed) and len(store._INSTANCES) > 0
    start = len(visits)
    assert store.stable_digest(keys[0]) == fed[0]
    from_memo = len(visits) - start
    monkeypatch.setattr(store, "_INSTANCES", {})  # a fresh process: the same digests, each object walked
    start = len(visits)
    assert store.stable_digest(keys[-1]) == fed[-1]
    assert len(visits) - start > 5 * from_memo
    assert [store.stable_digest(k) for k in keys[::-1]] == fed[::-1]

    class Scaled:  # a user's class: numbered per key, so an object holding it is walked every time
        def __init__(self, c):
            self.c = c

        def f(self, t):
            return t * self.c

    holder = Scaled(2.0)
    before = len(store._INSTANCES)
    assert store.stable_digest(fingerprint(lambda t: holder.f(t))) is not None
    assert len(store._INSTANCES) == before


def test_fingerprint_keys_an_object_by_its_value_wherever_it_is_met():
    """:func:`ops_jax_memo.fingerprint` keys an object met twice by its value (sharing is no difference to a trace), a
    cycle by how far up the path it points (equal structures, equal keys; another length or value, another key), and
    an object met again whose key holds a cycle leaving it by its visit number (each object walked once)."""
    import types

    from latentfit.inference.ops_jax_memo import fingerprint

    shared = [1.0, 2.0]
    assert fingerprint((shared, shared)) == fingerprint((shared, [1.0, 2.0]))
    assert fingerprint((shared, shared)) != fingerprint((shared, [1.0, 3.0]))

    def ring(n: int, x: float) -> Any:
        nodes = [types.SimpleNamespace(x=x) for _ in range(n)]
        for a, b in zip(nodes, nodes[1:] + nodes[:1]):
            a.next = b
        return nodes[0]

    assert fingerprint(ring(2, 1.0)) == fingerprint(ring(2, 1.0)) is not None
    assert fingerprint(ring(2, 1.0)) != fingerprint(ring(3, 1.0))
    assert fingerprint(ring(2, 1.0)) != fingerprint(ring(2, 2.0))
    a, b = ring(3, 1.0), ring(3, 1.0)
    assert fingerprint((a, a.next, a.next.next)) == fingerprint((b, b.next, b.next.next)) is not None
    assert fingerprint((a, a.next, a.next.next)) != fingerprint((a, a.next.next, a.next))
    # a chain of objects each holding the head (every key has a cycle leaving it) and reaching the next one twice: one
    # walk per object (walked once per path, the 60 links would take 2^60 visits)
    head = types.SimpleNamespace(x=-1.0)
    node = head
    for i in range(60):
        nxt = types.SimpleNamespace(x=float(i), head=head)
        node.next, node.also = nxt, nxt
        node = nxt
    assert fingerprint([head, head.next, head.next.next, head.next]) is not None


def test_stable_digest_feeds_the_bytes_of_the_plain_rules():
    """The written-out branches of :meth:`ops_jax_store._Stable.__call__` (strings, None and flags, ints, plain tuples)
    feed the bytes the general rules do (``put(tag, payload)``: tag, payload length, payload), so the store's keys do
    not change: random nested keys, tuples that look like the special forms (a module, an object's fields, a set)
    included."""
    import random

    import numpy as np

    from latentfit.inference import ops_jax_store as store

    def plain(x: Any, parts: list[bytes]) -> None:
        def put(tag: bytes, payload: bytes = b"") -> None:
            parts.extend((tag, store._LEN(len(payload)), payload))

        if type(x) is str:
            put(b"s", x.encode("utf-8", "surrogatepass"))
        elif x is None or type(x) in (bool, int, bytes):
            put(b"S", f"{type(x).__name__}:{x!r}".encode())
        elif type(x) is float:
            put(b"F", x.hex().encode())
        elif isinstance(x, np.dtype):
            put(b"D", str(x).encode())
        elif type(x) is tuple and x and type(x[0]) is str and x[0] in ("module", "instance", "set", "frozenset"):
            walk = store._Stable()
            walk(x)  # a special form: the walker's own branch (not written out)
            parts.extend(walk.parts)
        else:
            put(b"(", store._LEN(len(x)))
            for v in x:
                plain(v, parts)

    rng = random.Random(0)
    leaves = ["", "a", "module", "instance", "set", "é\udc80", None, True, False, 0, 1, -7, 2 ** 70, 1.5, b"xy",
              np.dtype("float64"), np.dtype("int32")]

    def draw(depth: int = 0) -> Any:
        if depth > 3 or rng.random() < 0.3:
            return rng.choice(leaves)
        if rng.random() < 0.1:
            return rng.choice([("module", "numpy"), ("set", ("p", "q", "r")), ("frozenset", ("a",))])
        return tuple(draw(depth + 1) for _ in range(rng.randint(0, 4)))

    compared = 0
    for _ in range(2000):
        key = draw()
        walk, parts = store._Stable(), []
        try:
            walk(key)
        except store.Unstable:  # e.g. ("module", "instance"): no such library module; the reference agrees
            with pytest.raises(store.Unstable):
                plain(key, parts)
            continue
        plain(key, parts)
        assert b"".join(walk.parts) == b"".join(parts), key
        compared += 1
    assert compared > 1500


def test_an_argument_check_reads_the_arrays_own_dtype():
    """:func:`ops_jax_store._arg_key` (each call of a stored executable checks its arguments with it) gives what
    ``np.shape`` and ``np.result_type`` give, canonicalised, with x64 on and off: JAX and numpy arrays, numpy and
    Python scalars, empty arrays, key data."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from latentfit.inference import ops_jax_store as store

    def reference(x: Any) -> tuple[tuple[int, ...], str]:
        return tuple(np.shape(x)), str(jax.dtypes.canonicalize_dtype(np.result_type(x)))

    was = bool(jax.config.jax_enable_x64)
    try:
        for x64 in (True, False):
            jax.config.update("jax_enable_x64", x64)
            values = [jnp.ones((3, 2)), jnp.ones(3, jnp.float32), jnp.asarray(2.0), np.ones(2, np.int64),
                      np.ones((0, 5), np.uint32), np.float64(2.0), np.int32(3), 1.0, 2, True,
                      jax.random.key_data(jax.random.PRNGKey(0))]
            for x in values:
                assert store._arg_key(x) == reference(x), (x64, x)
    finally:
        jax.config.update("jax_enable_x64", was)


def test_the_source_digest_is_kept_with_the_files_sizes_and_times(tmp_path, monkeypatch):
    """:func:`ops_jax_store._source_digest` hashes latentfit's ``.py`` files in path order; with a store folder it
    keeps the digest beside the files' sizes and modification times and reads it back while they match (a changed
    time or size hashes the files again)."""
    import hashlib
    import json
    from pathlib import Path

    from latentfit.inference import ops_jax_store as store

    root = Path(store.__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    full = h.hexdigest()
    monkeypatch.setattr(store, "store_dir", lambda: None)
    assert store._source_digest() == full
    monkeypatch.setattr(store, "store_dir", lambda: tmp_path)
    assert store._source_digest() == full  # hashed, then kept
    kept = tmp_path / store.SOURCE_DIGEST_FILE
    record = json.loads(kept.read_text())
    assert record["digest"] == full and len(record["files"]) == len(list(root.rglob("*.py")))
    record["digest"] = "0" * 32  # a kept digest is read back while every size and time match ...
    kept.write_text(json.dumps(record))
    assert store._source_digest() == "0" * 32
    record["files"][0][2] += 1  # ... and not once one differs
    kept.write_text(json.dumps(record))
    assert store._source_digest() == full
    kept.write_text("not json")
    assert store._source_digest() == full


def test_the_store_folder_stays_under_its_bound(tmp_path, monkeypatch):
    """Writes go through a temporary file and ``os.replace``; beyond :data:`ops_jax_store.STORE_BYTES` the least
    recently used entries are removed (a read marks an entry used)."""
    import time

    import jax
    import numpy as np

    from latentfit.inference import ops_jax_store as store

    pytest.importorskip("flatbuffers")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        tree = jax.tree_util.tree_structure((0, {"a": 0}))
        monkeypatch.setattr(store, "STORE_BYTES", 12_000)
        for i in range(4):
            assert store.save(f"entry{i}", b"x" * 2500, (np.arange(4.0),), tree, {})
            os.utime(store.store_dir() / f"entry{i}.lft", (time.time() - 100 + 10 * i,) * 2)
        assert store.load("entry0") is None  # fake program bytes: read, checked, refused when deserialised ...
        os.utime(store.store_dir() / "entry0.lft")  # ... a real entry read is marked used like this
        assert store.save("entry4", b"x" * 2500, (np.arange(4.0),), tree, {})
        names = sorted(p.name for p in store.store_dir().iterdir())
        assert names == ["entry0.lft", "entry2.lft", "entry3.lft", "entry4.lft"], names  # entry1: least recent
        assert sum(p.stat().st_size for p in store.store_dir().iterdir()) <= 12_000
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_frame_without_columns_is_keyed_by_its_index_and_attrs():
    """A DataFrame with no columns (an NLME model's covariate table without covariates) is fingerprinted by its index
    and attributes without pandas' row hash: equal frames give equal keys, another index or attrs another key."""
    import pandas as pd

    from latentfit.inference import ops_jax_store as store
    from latentfit.inference.ops_jax_memo import fingerprint

    def captured(x: Any) -> Any:
        return lambda: x

    a, same = pd.DataFrame(index=range(12)), pd.DataFrame(index=range(12))
    longer, labelled = pd.DataFrame(index=range(13)), pd.DataFrame(index=[f"u{i}" for i in range(12)])
    flagged = pd.DataFrame(index=range(12))
    flagged.attrs["unit"] = "h"
    key = fingerprint(captured(a))
    assert key == fingerprint(captured(same))
    for other in (longer, labelled, flagged, pd.DataFrame({"x": range(12)})):
        assert fingerprint(captured(other)) != key
    assert store.stable_digest(key) == store.stable_digest(fingerprint(captured(same))) is not None


ENV_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import latentfit
    from latentfit.inference import ops_jax_store
    from latentfit.models import nlme

    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="jax",
                      data=latentfit.datasets.theophylline(saemix_form=True),
                      columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    fit = model.fit(num_iters=(10, 5), progress=False)
    print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "numpyro": "latentfit.numpyro" in sys.modules,
                      **ops_jax_store.STATS}))
""")


def test_the_environment_variable_turns_the_cache_on_for_an_nlme_jax_fit(tmp_path):
    """``LATENTFIT_COMPILATION_CACHE`` (the README's way to turn the cache on) serves an NLME model on
    ``backend="jax"`` (and so the command line's ``--backend jax``), not only fits through ``latentfit.numpyro``:
    it was read only when that module was imported, and such a fit compiled everything in every process."""
    import latentfit

    pytest.importorskip("flatbuffers")
    env = dict(_plain_env(os.path.dirname(os.path.dirname(latentfit.__file__))),
               LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", ENV_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["dir"] == str(tmp_path / "cache") and not first["numpyro"], first
    assert first["saved"] > 0 and first["executables_saved"] > 0, first
    assert second["loaded"] > 0 and second["executables_saved"] == 0 and second["rejected"] == 0, second


KEEP_SCRIPT = textwrap.dedent("""
    import sys

    import jax

    from latentfit import enable_compilation_cache

    enable_compilation_cache(sys.argv[1])
    import latentfit.numpyro  # noqa: F401
    from latentfit.inference import ops_jax  # noqa: F401

    print(jax.config.jax_compilation_cache_dir)
""")


def test_a_cache_folder_the_user_chose_is_kept_whatever_the_environment_says(tmp_path):
    """A folder set with ``enable_compilation_cache`` before importing ``latentfit.numpyro`` (and the JAX backend) is
    kept although ``LATENTFIT_COMPILATION_CACHE`` names another: the NumPyro module's import replaced it with the
    variable's folder, so the user's programs went elsewhere."""
    import latentfit

    env = dict(_plain_env(os.path.dirname(os.path.dirname(latentfit.__file__))),
               LATENTFIT_COMPILATION_CACHE=str(tmp_path / "from-environment"))
    chosen = str(tmp_path / "chosen")
    out = subprocess.run([sys.executable, "-c", KEEP_SCRIPT, chosen], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == chosen
    assert not (tmp_path / "from-environment").exists()
