"""Data-parallel SAEM on torch.distributed (issue 13, item 2): ``run(..., distributed=True)``.

Two gloo processes spawned with ``torch.multiprocessing`` each hold a contiguous shard of the units (8 and 7 of
15: uneven on purpose); statistics and acceptance counts are all-reduced in float64 and both run the same M-step.
With per-unit streams the fit equals the one-process fit to 1e-10 in float64 (only the order of the sums over
units differs): same estimates on every rank, and the ranks' chains side by side are the one-process chains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

OPTIONS = dict(num_iters=(6, 4), seed=5, progress=False, rng="per_unit", chunk_size=5, num_draws=5)


def _data(n: int = 15, m: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    t = np.tile(np.linspace(0.0, 2.0, m), (n, 1))
    b = np.array([1.0, -0.5]) + rng.normal(size=(n, 2)) @ np.array([[0.6, 0.0], [0.2, 0.3]])
    return t, b[:, :1] + b[:, 1:] * t + 0.3 * rng.normal(size=(n, m))


ENGINES = {"SAEM": {}, "FSAEM": {"imh_iters": 3}}


def _fit(t: np.ndarray, y: np.ndarray, engine: str = "SAEM", **run_options: object):
    import models_pyro
    import pyro

    import latentfit.pyro

    pyro.clear_param_store()  # the parameters start from the model's initial values, whatever ran before
    cls = getattr(latentfit.pyro, engine)
    return cls(models_pyro.random_slope, **OPTIONS, **ENGINES[engine]).run(torch.as_tensor(t), torch.as_tensor(y),
                                                                           **run_options)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        t, y = _data()
        shard = np.array_split(np.arange(len(t)), world)[rank]
        for engine in ENGINES:
            fit = _fit(t[shard], y[shard], engine, distributed=True)
            np.savez(Path(out) / f"{engine}-rank{rank}.npz", z=fit.state.z.numpy(), draws=fit.latent_draws,
                     objective=fit.history["objective"], acc=fit.history["acc.rw"],
                     **{f"param_{k}": np.asarray(v) for k, v in fit.params.items()})
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_equal_one(two_processes: Path, engine: str) -> None:
    t, y = _data()
    one = _fit(t, y, engine)
    ranks = [np.load(two_processes / f"{engine}-rank{r}.npz") for r in range(2)]
    for r in ranks:
        for name, value in one.params.items():
            np.testing.assert_allclose(r[f"param_{name}"], np.asarray(value), rtol=0, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(r["objective"], one.history["objective"], rtol=1e-12, atol=0)
        np.testing.assert_array_equal(r["acc"], one.history["acc.rw"])  # acceptance counts summed exactly
    np.testing.assert_allclose(np.concatenate([r["z"] for r in ranks], 1), one.state.z.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.concatenate([r["draws"] for r in ranks], 2), one.latent_draws, rtol=0, atol=1e-10)
    assert one.state.z.shape[0] == 4  # saemix's ceil(50 / 15) chains, from the global number of units


@pytest.mark.slow
def test_readme_torchrun_command() -> None:
    """``torchrun --standalone --nproc_per_node=2 examples/distributed_saem.py`` (README): theophylline, 6 subjects per
    process, estimates within 1e-10 of the one-process fit."""
    root = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "examples/distributed_saem.py"],
                          capture_output=True, text=True, cwd=root, timeout=1200,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes, 6 subjects on rank 0" in proc.stdout, proc.stdout
    diff = float(proc.stdout.split("largest difference from the one-process fit:")[1].split()[0])
    assert diff < 1e-10, proc.stdout


def test_distributed_needs_a_process_group_and_per_unit_streams() -> None:
    t, y = _data()
    with pytest.raises(RuntimeError, match="torchrun"):
        _fit(t, y, distributed=True)
    import models_pyro

    from latentfit.pyro import SAEM

    with pytest.raises(ValueError, match="needs rng='per_unit'"):
        SAEM(models_pyro.random_slope, **dict(OPTIONS, rng="global")).run(torch.as_tensor(t), torch.as_tensor(y),
                                                                          distributed=True)
