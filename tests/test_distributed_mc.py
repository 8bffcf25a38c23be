"""Data-parallel MCMCSGD and Monte-Carlo EM on torch.distributed (issue 13, item 2): ``run(..., distributed=True)``.

Two gloo processes spawned with ``torch.multiprocessing`` hold 8 and 7 of 15 units of a random-intercept model;
each advances the chains of its units, the Fisher-identity gradient (a sum over units) is all-reduced in float64 and
both take the same optimiser step.  Mini-batches are drawn from the shared generator, so both processes pick the
same global batch (a process may hold none of its units: it then joins the all-reduces with zeros).  With per-unit
streams the fit equals the one-process fit to 1e-10 in float64: estimates and the whole history (iterates,
objective, squared gradient norms, acceptance rates) on every process, and the processes' chains side by side are
the one-process chains.  MCEM and MiniBatchMCEM (MH chains, ``rng="per_unit"``) likewise: statistics all-reduced,
the same global mini-batches, estimates, history and chains equal to 1e-10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

OPTIONS = dict(num_iters=14, burn_in=3, seed=4, progress=False, rng="per_unit", chunk_size=5, num_draws=4,
               learning_rate=0.1)
#: full batch, a mini-batch of 3 of the 15 units (some batches fall on one process only), MALA with a mini-batch
CASES = {"full": {}, "batch": {"batch_size": 3}, "mala": {"kernel": "mala", "batch_size": 5}}
#: Monte-Carlo EM engines (MH chains on per-unit streams): class name and options
EM_OPTIONS = dict(num_epochs=4, seed=2, progress=False, rng="per_unit", num_samples=3, chunk_size=3)
EM_CASES = {"MCEM": ("MCEM", {}), "MiniBatchMCEM": ("MiniBatchMCEM", {"batch_size": 3})}


def _data(n: int = 15, m: int = 4) -> np.ndarray:
    rng = np.random.default_rng(8)
    return 1.0 + 0.7 * rng.normal(size=(n, 1)) + 0.4 * rng.normal(size=(n, m))


def _fit(y: np.ndarray, case: str, **run_options: object):
    import models_pyro
    import pyro

    import latentfit.pyro

    pyro.clear_param_store()
    if case in EM_CASES:
        name, extra = EM_CASES[case]
        engine = getattr(latentfit.pyro, name)(models_pyro.random_intercept, **EM_OPTIONS, **extra)
    else:
        engine = latentfit.pyro.MCMCSGD(models_pyro.random_intercept, **OPTIONS, **CASES[case])
    return engine.run(torch.as_tensor(y), **run_options)


def _record(fit) -> dict[str, np.ndarray]:
    out = {f"param_{k}": np.asarray(v) for k, v in fit.params.items()}
    out.update({f"hist_{k}": np.asarray(v) for k, v in fit.history.items()})
    out["z"] = fit.state.z.numpy()
    if fit.latent_draws is not None:
        out["draws"] = fit.latent_draws
    return out


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        y = _data()
        shard = np.array_split(np.arange(len(y)), world)[rank]
        for case in [*CASES, *EM_CASES]:
            np.savez(Path(out) / f"{case}-rank{rank}.npz", **_record(_fit(y[shard], case, distributed=True)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed_mc")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(two_processes: Path, case: str) -> None:
    y = _data()
    one = _record(_fit(y, case))
    ranks = [np.load(two_processes / f"{case}-rank{r}.npz") for r in range(2)]
    for r in ranks:
        for name, value in one.items():
            if name.startswith(("param_", "hist_")):
                np.testing.assert_allclose(r[name], value, rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(np.concatenate([r["z"] for r in ranks], 1), one["z"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.concatenate([r["draws"] for r in ranks], 2), one["draws"], rtol=0, atol=1e-10)
    assert np.all(one["hist_grad_norm2"][OPTIONS["burn_in"]:] > 0)  # the gradient steps moved θ
    assert one["z"].shape[0] == 4  # saemix's ceil(50 / 15) chains, from the global number of units


@pytest.mark.parametrize("case", list(EM_CASES))
def test_monte_carlo_em_two_processes_equal_one(two_processes: Path, case: str) -> None:
    y = _data()
    one = _record(_fit(y, case))
    ranks = [np.load(two_processes / f"{case}-rank{r}.npz") for r in range(2)]
    for r in ranks:
        assert sorted(k for k in r.files if k.startswith("param_")) == ["param_mu", "param_omega", "param_sigma"]
        for name, value in one.items():
            if name.startswith(("param_", "hist_")):
                np.testing.assert_allclose(r[name], value, rtol=1e-10, atol=1e-10, err_msg=name)
    # the chains [n, L, d] of the ranks' units, stacked, are the one-process chains
    np.testing.assert_allclose(np.concatenate([r["z"] for r in ranks], 0), one["z"], rtol=0, atol=1e-10)
    assert np.ptp(one["hist_theta.mu"]) > 0.05  # the estimates moved


def test_distributed_needs_per_unit_streams() -> None:
    import models_pyro

    from latentfit.pyro import MCMCSGD

    with pytest.raises(ValueError, match="needs rng='per_unit'"):
        MCMCSGD(models_pyro.random_intercept, **dict(OPTIONS, rng="global")).run(torch.as_tensor(_data()),
                                                                                 distributed=True)
    with pytest.raises(ValueError, match="rng must be one of"):
        MCMCSGD(models_pyro.random_intercept, **dict(OPTIONS, rng="unit"))
    from latentfit.pyro import MCEM

    with pytest.raises(ValueError, match="MCEM / MiniBatchMCEM with rng='per_unit'"):
        MCEM(models_pyro.random_intercept, **dict(EM_OPTIONS, rng="global")).run(torch.as_tensor(_data()),
                                                                                distributed=True)


JAX_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import models_numpyro
from latentfit.numpyro import MCMCSGD

y = jnp.asarray(1.0 + 0.7 * np.random.default_rng(8).normal(size=(16, 1))
                + 0.4 * np.random.default_rng(9).normal(size=(16, 4)))
opts = json.loads(sys.argv[2])
out = {}
for name, extra in json.loads(sys.argv[3]).items():
    one = MCMCSGD(models_numpyro.random_intercept, **opts, **extra).run(jax.random.PRNGKey(3), y)
    two = MCMCSGD(models_numpyro.random_intercept, **opts, **extra).run(jax.random.PRNGKey(3), y, devices=2)
    z = two.state.z
    out[name] = {
        "params_diff": max(float(np.max(np.abs(np.asarray(one.params[k]) - np.asarray(two.params[k]))))
                           for k in one.params),
        "history_diff": max(float(np.max(np.abs(np.asarray(one.history[k]) - np.asarray(two.history[k])))) for k
                            in one.history),
        "z_diff": float(np.max(np.abs(np.asarray(one.state.z) - np.asarray(z)))),
        "z_shard": list(z.sharding.shard_shape(z.shape)), "z_devices": len(z.sharding.device_set),
        "grad_norm2_min": float(np.min(np.asarray(one.history["grad_norm2"])[opts["burn_in"]:])),
    }
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_two_jax_devices_equal_one() -> None:
    """``run(devices=2)`` (NumPyro): the chains ``[4, 16, 1]`` split 8 units per host device, the gradient's sum over
    units an all-reduce; estimates, history and chains equal the one-device fit to 1e-10 (full batch, a mini-batch
    of 3, MALA with a mini-batch: its per-unit step sizes sharded too)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    opts = {k: v for k, v in OPTIONS.items() if k != "seed"}
    proc = subprocess.run([sys.executable, "-c", JAX_CHILD, str(Path(__file__).parent), json.dumps(opts),
                           json.dumps(CASES)], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    for case, res in out.items():
        assert res["params_diff"] < 1e-10 and res["history_diff"] < 1e-10 and res["z_diff"] < 1e-10, (case, res)
        assert res["z_devices"] == 2 and res["z_shard"] == [4, 8, 1], (case, res)
        assert res["grad_norm2_min"] > 0, case
