"""Checkpoints of distributed fits (issue 13): every process of a ``run(..., distributed=True, checkpoint=dir)`` writes
its own shard (``ckpt-<k>.rank<r>-of-<world>.*``: its per-unit state, the history, its RNG state, the world size in
the sidecar), and a 2-process fit interrupted (Ctrl-C from a callback) and resumed equals the uninterrupted 2-process
fit bit for bit, for SAEM (per-unit streams, random-slope model) and FIEM (Gaussian mixture).  A checkpoint of a
2-process fit is refused by a 1-process run, and one whose process holds another block of data by every process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import _data as _slope_data
from test_distributed_em import _data as _mixture_data

SAEM_OPTIONS = dict(num_iters=(6, 4), seed=5, progress=False, rng="per_unit", chunk_size=3, num_draws=4)
FIEM_OPTIONS = dict(num_epochs=7, batch_size=4, seed=3, progress=False, batching="random", chunk_size=3)
INTERRUPT_AT = 5  # a callback raises KeyboardInterrupt here: the chunk ending at 6 is the last good state


def _interrupt(k: int, _record: dict) -> None:
    if k == INTERRUPT_AT:
        raise KeyboardInterrupt


def _saem(x: np.ndarray, y: np.ndarray, **options: object):
    import models_pyro
    import pyro

    from latentfit.pyro import SAEM

    pyro.clear_param_store()
    callback = options.pop("callback", None)
    return SAEM(models_pyro.random_slope, **SAEM_OPTIONS, callback=callback).run(
        torch.as_tensor(x), torch.as_tensor(y), **options)


def _fiem(x: np.ndarray, **options: object):
    from latentfit.models import GaussianMixture
    from latentfit.pyro import FIEM

    callback = options.pop("callback", None)
    return FIEM(GaussianMixture(torch.as_tensor(x), 3, "full", seed=1), **FIEM_OPTIONS, callback=callback).run(
        **options)


def _fits(rank: int, world: int, out: Path) -> dict[str, dict]:
    """Uninterrupted and interrupted-then-resumed fits of this process's shards."""
    t, y = _slope_data()
    x = _mixture_data()
    s_slope = np.array_split(np.arange(len(t)), world)[rank]
    s_mix = np.array_split(np.arange(len(x)), world)[rank]
    runs = {"SAEM": lambda **o: _saem(t[s_slope], y[s_slope], distributed=True, **o),
            "FIEM": lambda **o: _fiem(x[s_mix], distributed=True, **o)}
    results = {}
    for name, fit in runs.items():
        whole = fit()
        stopped = fit(checkpoint=out / name, checkpoint_every=3, callback=_interrupt)
        resumed = fit(checkpoint=out / name, resume=True)
        results[name] = {"whole": whole, "stopped": stopped, "resumed": resumed}
    # process 1 lost its latest checkpoint (iteration 6): both resume from the latest they share (3)
    fit = runs["SAEM"]
    fit(checkpoint=out / "gap", checkpoint_every=3, callback=_interrupt)
    if rank == 1:
        for p in (out / "gap").glob("ckpt-000006.rank1-of-2.*"):
            p.unlink()
    seen: list[int] = []
    results["SAEM"]["resumed_gap"] = fit(checkpoint=out / "gap", resume=True, callback=lambda k, _: seen.append(k))
    results["SAEM"]["gap_first_iteration"] = seen[0]
    # process 1's block corrected (same shapes), process 0's unchanged: every process refuses the resume
    _saem(t[s_slope], y[s_slope], distributed=True, checkpoint=out / "stale")
    block = 2.0 * y[s_slope] + 3.0 if rank == 1 else y[s_slope]
    try:
        _saem(t[s_slope], block, distributed=True, checkpoint=out / "stale", resume=True)
        results["SAEM"]["stale_refusal"] = ""
    except ValueError as err:
        results["SAEM"]["stale_refusal"] = str(err)
    return results


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, fits in _fits(rank, world, Path(out)).items():
            arrays = {}
            for kind, fit in fits.items():
                if not hasattr(fit, "history"):
                    arrays[kind] = np.array(fit)
                    continue
                arrays[f"{kind}/interrupted"] = np.array(fit.interrupted)
                arrays[f"{kind}/num_iterations"] = np.array(fit.num_iterations)
                for k, v in fit.history.items():
                    arrays[f"{kind}/history/{k}"] = v
                for k, v in fit.params.items():
                    arrays[f"{kind}/param/{k}"] = np.asarray(v)
            np.savez(Path(out) / f"{name}-rank{rank}.npz", **arrays)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed_checkpoint")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("engine", ["SAEM", "FIEM"])
def test_resumed_two_process_fit_is_bit_identical(two_processes: Path, engine: str) -> None:
    for rank in range(2):
        r = np.load(two_processes / f"{engine}-rank{rank}.npz")
        assert bool(r["stopped/interrupted"]) and int(r["stopped/num_iterations"]) == 6
        assert not bool(r["resumed/interrupted"]) and int(r["resumed/num_iterations"]) == 10 - 3 * (engine == "FIEM")
        whole = {k[len("whole/"):]: r[k] for k in r.files if k.startswith("whole/")}
        if engine == "SAEM":
            assert int(r["gap_first_iteration"]) == 4  # resumed after iteration 3, the latest both processes saved
        for kind in ("resumed", "resumed_gap") if engine == "SAEM" else ("resumed",):
            resumed = {k[len(kind) + 1:]: r[k] for k in r.files if k.startswith(kind + "/")}
            assert set(whole) == set(resumed)
            for k, v in whole.items():
                if k.startswith(("history/", "param/")):
                    np.testing.assert_array_equal(resumed[k], v, err_msg=f"{kind} {k}")
    # each process wrote its own shard, with the world size in the sidecar
    import json

    files = sorted(p.name for p in (two_processes / engine).iterdir() if p.suffix == ".json")
    assert {f.split(".")[1] for f in files} == {"rank0-of-2", "rank1-of-2"}
    meta = json.loads((two_processes / engine / files[-1]).read_text())
    assert meta["world_size"] == 2 and meta["rank"] == 1
    # the shards differ: each holds its own units (state and per-unit tables of different sizes)
    assert meta["shapes"]["num_units"] in (7, 20)


def test_a_changed_block_is_refused_by_every_process(two_processes: Path) -> None:
    """Each process's sidecar holds its own block's data digest; process 1's block changed alone is refused there, and
    process 0 refuses too (naming process 1), so no process goes on alone into the fit's collectives."""
    own = str(np.load(two_processes / "SAEM-rank1.npz")["stale_refusal"])
    other = str(np.load(two_processes / "SAEM-rank0.npz")["stale_refusal"])
    assert own.startswith("the data differ from the checkpoint's (the block of process 1 of 2)")
    assert other.startswith("process 1 of the distributed fit refuses its checkpoint: the data differ")


def test_one_process_refuses_a_two_process_checkpoint(two_processes: Path) -> None:
    with pytest.raises(ValueError, match=r"written by a fit over \[2\] process\(es\), this one runs over 1"):
        _fiem(_mixture_data(), checkpoint=two_processes / "FIEM", resume=True)
