"""The adapter's analysis of a NumPyro model kept on disk (issue 10 item 6, issue 14 item 9): with the persistent cache
on, a later process reads the unit maps, closed-form patterns and Gaussian faces of a model instead of running the
model ~80 more times, and fits exactly as the first process did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

# the usual hierarchical style: latents in a plate over unbalanced groups, the rows in their own plate reading
# alpha[group]; the model's calls counted by a profile hook on its code (a counter it reads would enter its key)
SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import jax, numpy as np, numpyro, numpyro.distributions as dist
    from numpyro.distributions import constraints
    from latentfit.inference import ops_jax_store
    from latentfit.numpyro import SAEM

    def model(group, x, y=None):
        mu = numpyro.param("mu", 0.0)
        omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
        beta = numpyro.param("beta", 0.0)
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("groups", int(group.max()) + 1):
            alpha = numpyro.sample("alpha", dist.Normal(mu, omega))
        with numpyro.plate("rows", len(x)):
            numpyro.sample("y", dist.Normal(alpha[group] + beta * x, sigma), obs=y)

    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 9, size=15)
    group = np.repeat(np.arange(15), sizes)
    x = rng.normal(size=group.size)
    y = 1.0 + 0.7 * rng.normal(size=15)[group] + 0.5 * x + 0.3 * rng.normal(size=group.size)
    calls = [0]

    def count(frame, event, arg):
        if event == "call" and frame.f_code is model.__code__:
            calls[0] += 1

    lowered = []  # programs lowered to MLIR during the fit (each also a compilation or a persistent-cache read)

    def lowering(name, secs, **kw):
        if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(kw.get("fun_name"))

    key = jax.random.PRNGKey(0)
    jax.monitoring.register_event_duration_secs_listener(lowering)
    sys.setprofile(count)
    fit = SAEM(model, num_iters=(10, 5), progress=False).run(key, group, x, y)
    sys.setprofile(None)
    jax.monitoring.unregister_event_duration_listener(lowering)
    h = hashlib.sha256()
    for k in sorted(fit.params):
        h.update(np.asarray(fit.params[k]).tobytes())
    for k in sorted(fit.history):
        h.update(np.asarray(fit.history[k]).tobytes())
    print(json.dumps({"calls": calls[0], "lowered": lowered, "digest": h.hexdigest(), "closed_form": sorted(
        n for n, p in fit.model.params.items() if p.closed_form), "stats": ops_jax_store.STATS}))
""")


def _run(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_warm_process_reads_the_analysis_and_fits_bit_for_bit(tmp_path):
    env = dict(os.environ, LATENTFIT_COMPILATION_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    first = _run(env)
    second = _run(env)
    assert first["stats"]["records_saved"] == 1 and second["stats"]["records_loaded"] == 1, (first, second)
    # the first process runs the model for its analysis and traces every program; the second runs it once (its
    # first trace: sites, params, data) and loads the programs (measured 24 -> 1)
    assert second["calls"] <= 2 < first["calls"], (first["calls"], second["calls"])
    # issue 14 item 9: the warm process lowers two small eager programs; the stored programs and the model's first
    # run are called from their stored executables, nothing lowered (measured 2; 6 when they were lowered as
    # ``Exported.call``, 31 before the first run and SAEM's start became one program each); the first process lowers
    # every program it compiles (71)
    assert len(second["lowered"]) <= 2 < len(first["lowered"]), (first["lowered"], second["lowered"])
    stats = second["stats"]  # the stored programs and the model's first run
    assert stats["executables_loaded"] == stats["loaded"] + 1 > 1 and stats["rejected"] == 0, stats
    assert second["digest"] == first["digest"]
    assert second["closed_form"] == first["closed_form"] == ["mu", "omega", "sigma"]


def test_a_record_round_trips_and_a_damaged_one_is_ignored(tmp_path, monkeypatch):
    from latentfit.inference import ops_jax_store as store

    monkeypatch.setattr(store, "store_dir", lambda: tmp_path / store.FOLDER)
    arrays = {"a": np.arange(5, dtype=np.int64), "b": np.array([[True, False]]), "c": np.linspace(0, 1, 3)}
    assert store.save_record("d1", {"x": [1, "y", None]}, arrays)
    record, back = store.load_record("d1")
    assert record == {"x": [1, "y", None]} and back.keys() == arrays.keys()
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
    path = tmp_path / store.FOLDER / "d1.lfr"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert store.load_record("d1") is None
    path.write_bytes(bytes(data[:20]))
    assert store.load_record("d1") is None
    assert store.load_record("absent") is None
