"""Data-parallel SAEM on JAX (issue 13, item 3): ``run(..., devices=n)`` shards the units over a device mesh.

The child process gets two CPU devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (read when JAX
initialises, hence a subprocess).  A 2-device fit with per-unit streams must equal the 1-device fit to 1e-10 in
float64 (only the order of the sums over units differs), with the chains really split over both devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent

CHILD = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import models_numpyro
from latentfit.numpyro import SAEM, FSAEM

rng = np.random.default_rng(2)
n, m = 16, 5
t = np.tile(np.linspace(0.0, 2.0, m), (n, 1))
b = np.array([1.0, -0.5]) + rng.normal(size=(n, 2)) @ np.array([[0.6, 0.0], [0.2, 0.3]])
y = b[:, :1] + b[:, 1:] * t + 0.3 * rng.normal(size=(n, m))
args = (jnp.asarray(t), jnp.asarray(y))
out = {"num_devices": len(jax.devices())}
opts = dict(num_iters=(6, 4), progress=False, rng="per_unit", chunk_size=5, num_draws=5)
engines = {"saem": (SAEM, {}), "fsaem": (FSAEM, {"imh_iters": 3})}
for name in filter(None, sys.argv[2].split(",")):
    cls, extra = engines[name]
    one = cls(models_numpyro.random_slope, **opts, **extra).run(jax.random.PRNGKey(3), *args)
    two = cls(models_numpyro.random_slope, **opts, **extra).run(jax.random.PRNGKey(3), *args, devices=2)
    z = two.state.z
    out[name] = {
        "params_one": {k: np.asarray(v).tolist() for k, v in one.params.items()},
        "params_two": {k: np.asarray(v).tolist() for k, v in two.params.items()},
        "z_diff": float(np.max(np.abs(np.asarray(one.state.z) - np.asarray(z)))),
        "draws_diff": float(np.max(np.abs(one.latent_draws - two.latent_draws))),
        "z_devices": len(z.sharding.device_set),
        "z_shard_shape": list(z.sharding.shard_shape(z.shape)),
        "acc_rw": np.nanmean(np.asarray(one.history["acc.rw"]), 0).tolist(),
    }
cls = SAEM
try:
    cls(models_numpyro.random_slope, **opts).run(jax.random.PRNGKey(3), jnp.asarray(t[:15]), jnp.asarray(y[:15]),
                                                 devices=2)
except ValueError as e:
    out["uneven"] = str(e)
try:
    cls(models_numpyro.random_slope, **opts).run(jax.random.PRNGKey(3), *args, devices=3)
except ValueError as e:
    out["too_many"] = str(e)
print("RESULT" + json.dumps(out))
"""


def _two_devices(engines: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(HERE), engines], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def two_device_run() -> dict:
    """The error checks only (no fit): the fits run through the README's command below."""
    return _two_devices("")


def _check_equal(out: dict, engine: str) -> None:
    assert out["num_devices"] == 2
    res = out[engine]
    for name, value in res["params_one"].items():
        np.testing.assert_allclose(res["params_two"][name], value, rtol=0, atol=1e-10, err_msg=name)
    assert res["z_diff"] < 1e-10 and res["draws_diff"] < 1e-10
    # the chains [L, 16, 2] really are split: 8 units on each device
    assert res["z_devices"] == 2 and res["z_shard_shape"][1] == 8
    assert min(res["acc_rw"]) > 0.1  # the chains moved


def test_readme_command_two_devices_equal_one() -> None:
    """``XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/sharded_saem.py`` (README): theophylline,
    12 subjects, 6 per device, estimates within 1e-10 of the one-device fit."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE.parent / "examples" / "sharded_saem.py")], capture_output=True,
                          text=True, env=env, timeout=1200, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 devices; chains [5, 12, 3] stored [5, 6, 3] per device" in proc.stdout, proc.stdout
    diff = float(proc.stdout.split("largest difference from the one-device fit:")[1].split()[0])
    assert diff < 1e-10, proc.stdout


@pytest.mark.slow
def test_saem_two_devices_equal_one() -> None:
    """The chains of the 1- and 2-device fits agree too (random-slope model, 16 units)."""
    _check_equal(_two_devices("saem"), "saem")


@pytest.mark.slow
def test_fsaem_two_devices_equal_one() -> None:
    """f-SAEM's IMH phase (per-unit MAPs ``mode [N, d]`` sharded on axis 0) and then its saemix phase."""
    _check_equal(_two_devices("fsaem"), "fsaem")


def test_sharding_errors(two_device_run: dict) -> None:
    assert "15 units cannot be split evenly over 2 devices" in two_device_run["uneven"]
    assert "devices=3: JAX sees 2 device(s)" in two_device_run["too_many"]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count" in two_device_run["too_many"]


def test_devices_on_torch_is_refused() -> None:
    from backends import Backend

    from latentfit.inference.saem import SAEM

    backend = Backend("pyro")
    backend.reset()
    model = backend.latent_model(backend.models.random_intercept, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="devices= shards the units over JAX devices"):
        SAEM(model, num_iters=(3, 0), burn_in=1, progress=False).run(devices=2)


DATA_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import models_numpyro
from latentfit.numpyro import SAEM

rng = np.random.default_rng(2)
n, m = 16, 5
t = np.tile(np.linspace(0.0, 2.0, m), (n, 1)) + rng.uniform(0, 0.1, size=(n, m))
b = np.array([1.0, -0.5]) + rng.normal(size=(n, 2)) @ np.array([[0.6, 0.0], [0.2, 0.3]])
y = b[:, :1] + b[:, 1:] * t + 0.3 * rng.normal(size=(n, m))
args = (jnp.asarray(t), jnp.asarray(y))
opts = dict(num_iters=(6, 4), progress=False, rng="per_unit", chunk_size=5, num_draws=5)
one = SAEM(models_numpyro.random_slope, **opts).run(jax.random.PRNGKey(3), *args)
two = SAEM(models_numpyro.random_slope, **opts).run(jax.random.PRNGKey(3), *args, devices=2)
placed = []
for program, _ in two.engine.ops._compiled.values():
    for c in program.consts:
        if hasattr(c, "sharding") and np.ndim(c) >= 1 and np.shape(c)[0] == n and np.size(c) > n:
            match = [k for k, a in (("t", t), ("y", y)) if np.shape(c) == a.shape and np.array_equal(np.asarray(c), a)]
            placed.append({"data": match, "shard": list(c.sharding.shard_shape(c.shape)),
                           "devices": len(c.sharding.device_set)})
out = {"diff": max(float(np.max(np.abs(np.asarray(one.params[k]) - np.asarray(two.params[k])))) for k in one.params),
       "placed": placed}

import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints


def transposed(t, w, y):
    # y [T, N] (the unit plate at dim=-1), the design t [T, N] laid out like it, a per-unit offset w [1, N]
    m, n = y.shape
    mu = numpyro.param("mu", jnp.zeros(2, dtype=y.dtype))
    omega = numpyro.param("omega", jnp.ones(2, dtype=y.dtype), constraint=constraints.positive)
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", n, dim=-1):
        b = numpyro.sample("b", dist.Normal(mu, omega).to_event(1))
        with numpyro.plate("obs", m, dim=-2):
            numpyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * t + w, sigma), obs=y)


w = rng.normal(size=(1, n))
data = {"t": t.T, "w": w, "y": y.T + w}
args = tuple(jnp.asarray(data[k]) for k in ("t", "w", "y"))
one = SAEM(transposed, **opts).run(jax.random.PRNGKey(3), *args)
two = SAEM(transposed, **opts).run(jax.random.PRNGKey(3), *args, devices=2)
placed = []
for program, _ in two.engine.ops._compiled.values():
    for c in program.consts:
        match = [k for k, a in data.items() if np.shape(c) == a.shape and np.array_equal(np.asarray(c), a)]
        if match:
            placed.append({"data": match, "shard": list(c.sharding.shard_shape(c.shape)),
                           "devices": len(c.sharding.device_set)})
out["transposed"] = {
    "diff": max(float(np.max(np.abs(np.asarray(one.params[k]) - np.asarray(two.params[k])))) for k in one.params),
    "history_diff": max(float(np.max(np.abs(one.history[k] - two.history[k]))) for k in one.history if k != "time"),
    "omega": np.asarray(one.params["omega"]).tolist(), "placed": placed}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_model_data_sharded_over_devices() -> None:
    """The per-unit data the compiled iterations capture (``t`` and ``y``, ``[16, 5]``) are split over the 2 devices
    like the chains (``[8, 5]`` on each), not replicated; the estimates still equal the one-device fit (1e-10).  So are
    those of a model whose unit plate is at ``dim=-1`` (``y, t [5, 16]``, an offset ``w [1, 16]``), along their unit
    axis (the adapter's ``unit_data_axes``): ``[5, 8]`` and ``[1, 8]`` on each device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", DATA_CHILD, str(HERE)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert out["diff"] < 1e-10
    data = [p for p in out["placed"] if p["data"]]
    assert {name for p in data for name in p["data"]} == {"t", "y"}, out["placed"]
    assert all(p["shard"] == [8, 5] and p["devices"] == 2 for p in data), out["placed"]
    # per-unit data whose unit axis is not the leading one (a plate at dim=-1): split along it, found from the plate
    res = out["transposed"]
    assert res["diff"] < 1e-10 and res["history_diff"] < 1e-10, res
    assert min(res["omega"]) > 0.05, res  # the random effects' scales were estimated (not collapsed)
    shards = {name: (p["shard"], p["devices"]) for p in res["placed"] for name in p["data"]}
    assert shards == {"t": ([5, 8], 2), "y": ([5, 8], 2), "w": ([1, 8], 2)}, res["placed"]
