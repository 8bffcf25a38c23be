"""Fits over several JAX processes (issue 13, item 3): ``run(..., distributed=True)`` after
``jax.distributed.initialize``.

Two processes (spawned with ``subprocess``, a free port, CPU collectives over gloo) each pass the whole data and the
same key; the units are sharded over the global mesh ``jax.devices()`` (one CPU device per process: process r holds
the r-th block of units and of their data), XLA all-reduces the sums over units across the processes, and every
process ends with the whole final state.  SAEM on an NLME model (theophylline, NumPyro, ``rng="per_unit"``) and FIEM
on a ``GaussianMixture`` (JAX backend) must equal the one-process fit to 1e-10 in float64 on both processes (only the
order of the sums over units differs); so must ``NLME(..., backend="jax").fit(df, distributed=True)``.  With
``checkpoint=`` each process writes its own shard (its block of the chains), and the SAEM fit interrupted and resumed
equals the uninterrupted one bit for bit (:func:`_assert_checkpoints`).

``run(..., distributed="local")`` (:func:`test_two_jax_processes_local_blocks_equal_one`): each process passes only its
block of the units (its 6 subjects' arrays; NLME: its rows of the table) and the fit equals the one-process fit of the
whole data likewise, its post-fit results complete on every process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent

CHILD = r"""
import json, sys
rank, port = int(sys.argv[2]), sys.argv[3]
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank)
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import latentfit.numpyro
from latentfit.examples.theophylline_numpyro import theophylline_arrays, theophylline_model
from latentfit.models import GaussianMixture
from test_distributed_em import ENGINES, _data
import latentfit as lf
from latentfit.models import nlme

df = lf.datasets.theophylline(saemix_form=True)
THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")


def params(fit):
    return {k: np.asarray(v).tolist() for k, v in fit.params.items()}


def split_consts(fit):
    # the per-unit data the compiled iterations captured: [shape, shard shape, processes] of those split over both
    out = []
    for program, _ in fit.engine.ops._compiled.values():
        for c in getattr(program, "consts", ()):
            s = getattr(c, "sharding", None)
            if s is not None and np.ndim(c) >= 1 and not c.is_fully_addressable and not c.is_fully_replicated:
                out.append([list(c.shape), list(s.shard_shape(c.shape)), len({d.process_index for d in s.device_set})])
    return out


def saem_record(fit):
    return {"params": params(fit), "z": np.asarray(fit.state.z).tolist(), "draws": fit.latent_draws.tolist(),
            "history": {k: np.asarray(v).tolist() for k, v in fit.history.items()}, "ll": float(fit.log_likelihood())}


def fiem_record(fit):
    return {"params": params(fit), "log_lik": fit.history["log_lik"].tolist()}


out = {"rank": rank, "processes": jax.process_count(), "devices": len(jax.devices())}
data = theophylline_arrays()
# 15 iterations in chunks of 5, the last one collecting the draws: 2 compiled programs per fit
opts = dict(num_iters=(8, 7), progress=False, rng="per_unit", chunk_size=5, num_draws=5)
saem = latentfit.numpyro.SAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **data, distributed=True)
out["saem"] = saem_record(saem)
out["saem_split"], out["z_shape"] = split_consts(saem), list(saem.state.z.shape)
# checkpoints: each process writes its shard; interrupted after iteration 10 (Ctrl-C from a callback at 9, chunk
# 6-10), resumed from 10, then from 5 once process 1 lost its later files: both equal `saem` bit for bit
import os, shutil, tempfile
from latentfit.checkpoint import load_checkpoint
ckdir = os.path.join(tempfile.gettempdir(), f"latentfit-jax-ckpt-{port}")


def interrupt(k, _record):
    if k == 9:
        raise KeyboardInterrupt


def run_record(fit):
    draws = None if fit.latent_draws is None else fit.latent_draws.tolist()  # none kept before iteration 11
    return {"params": params(fit), "z": np.asarray(fit.state.z).tolist(), "draws": draws,
            "history": {k: np.asarray(v).tolist() for k, v in fit.history.items()},
            "interrupted": bool(fit.interrupted), "num_iterations": int(fit.num_iterations)}


stopped = latentfit.numpyro.SAEM(theophylline_model, **opts, callback=interrupt).run(
    jax.random.PRNGKey(1), **data, distributed=True, checkpoint=ckdir, checkpoint_every=5)
ck = load_checkpoint(ckdir, (rank, 2))
out["ckpt"] = {"files": sorted(f for f in os.listdir(ckdir) if f.endswith(".json")), "rank": ck.meta["rank"],
               "world_size": ck.meta["world_size"], "iteration": ck.iteration,
               "blocks": {"/".join(map(str, d["path"])): [d["unit_axis"], d["shape"],
                                                          list(ck.tensors[d["tensor"]].shape)]
                          for d in ck.meta["state"] if "unit_axis" in d}}
resumed = latentfit.numpyro.SAEM(theophylline_model, **opts).run(
    jax.random.PRNGKey(1), **data, distributed=True, checkpoint=ckdir, resume=True)
if rank == 1:  # process 1 lost its checkpoints after iteration 5
    for f in os.listdir(ckdir):
        if f.startswith(("ckpt-000010.rank1", "ckpt-000015.rank1")):
            os.remove(os.path.join(ckdir, f))
seen = []
gap = latentfit.numpyro.SAEM(theophylline_model, **opts, callback=lambda k, _: seen.append(k)).run(
    jax.random.PRNGKey(1), **data, distributed=True, resume=ckdir)
out["ckpt_runs"] = {"stopped": run_record(stopped), "resumed": run_record(resumed), "gap": run_record(gap),
                    "gap_first": seen[0]}
x = jnp.asarray(_data(40))
fiem = [latentfit.numpyro.FIEM(GaussianMixture(x, 3, "full", seed=1), **ENGINES["FIEM"], seed=3, progress=False,
                               batching="random", track_log_lik=True) for _ in range(2)]
fit = fiem[0].run(jax.random.PRNGKey(3), distributed=True)
out["fiem"], out["fiem_split"] = fiem_record(fit), split_consts(fit)
out["table_shape"] = list(fit.state.memory.table["r"].shape)
nlme_model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="jax")
nlme_opts = dict(num_iters=(8, 7), chunk_size=5, seed=0, progress=False, **THEO)
out["nlme"] = params(nlme_model.fit(df, **nlme_opts, distributed=True))  # rng="per_unit" by default then
try:  # the processes' devices are the mesh: refused before the fit starts
    fiem[1].run(jax.random.PRNGKey(3), distributed=True, devices=2)
except ValueError as e:
    out["devices_refused"] = str(e)
try:  # a process with another key: refused on every process
    latentfit.numpyro.SAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1 + rank), **data, distributed=True)
except ValueError as e:
    out["mismatch"] = str(e)
if rank == 0:  # the one-process fits (this process alone, after the last collective), to compare both processes with
    out["saem_one"] = saem_record(latentfit.numpyro.SAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **data))
    out["fiem_one"] = fiem_record(fiem[1].run(jax.random.PRNGKey(3)))
    out["nlme_one"] = params(nlme_model.fit(df, **nlme_opts, rng="per_unit"))
    try:  # one process cannot continue the 2-process checkpoints
        latentfit.numpyro.SAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **data, checkpoint=ckdir,
                                                                 resume=True)
    except ValueError as e:
        out["one_resume"] = str(e)
    shutil.rmtree(ckdir)  # process 1 is past its last use of it (later collectives)
print("RESULT" + json.dumps(out), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(child: str, timeout: float = 600) -> list[dict]:
    """Run ``child`` as processes 0 and 1 of a ``jax.distributed`` group; their RESULT records, by rank."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    # outputs to files, not pipes: a process blocked on a full pipe never reaches jax.distributed's shutdown barrier
    with tempfile.TemporaryDirectory() as tmp:
        files = [(open(Path(tmp) / f"out{r}", "w+"), open(Path(tmp) / f"err{r}", "w+")) for r in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", child, str(HERE), str(r), str(port)], stdout=out, stderr=err,
                                  text=True, env=env) for r, (out, err) in enumerate(files)]
        outs = []
        try:
            for p, (out, err) in zip(procs, files):
                p.wait(timeout=timeout)
                out.seek(0)
                err.seek(0)
                assert p.returncode == 0, err.read()[-3000:]
                line = next(ln for ln in out.read().splitlines() if ln.startswith("RESULT"))
                outs.append(json.loads(line[len("RESULT"):]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for f in (f for pair in files for f in pair):
                f.close()
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--local"]], ids=["whole", "local"])
def test_readme_commands_two_processes(flags: list[str]) -> None:
    """The README's commands: ``examples/distributed_saem_jax.py`` started twice with ``JAX_COORDINATOR_ADDRESS``,
    ``NUM_PROCESSES=2`` and ``PROCESS_ID=0/1`` (``--local``: each passes only its 6 subjects); both processes print
    estimates within 1e-10 of the one-process fit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", NUM_PROCESSES="2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}")
    env.pop("XLA_FLAGS", None)
    script = str(HERE.parent / "examples" / "distributed_saem_jax.py")
    procs = [subprocess.Popen([sys.executable, script, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(env, PROCESS_ID=str(r)), cwd=HERE.parent) for r in range(2)]
    try:
        for r, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stderr[-3000:]
            line = next(ln for ln in stdout.splitlines() if ln.startswith(f"process {r} of 2:"))
            assert float(line.split("one-process fit:")[1]) < 1e-10, stdout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _assert_equal_params(one: dict, two: dict) -> None:
    assert one.keys() == two.keys()
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=0, atol=1e-10, err_msg=name)


def _assert_checkpoints(out: dict, saem: dict) -> None:
    """A process's checkpoints of the 2-process SAEM fit: its own shard files (rank and world size in the sidecar, the
    chains stored as its block [5, 6, 3] of [5, 12, 3]); the fit interrupted after iteration 10 (chunks of 5) and
    resumed from 10, or from 5 (the latest iteration both processes still had), equals the uninterrupted fit bit for
    bit."""
    ck, runs = out["ckpt"], out["ckpt_runs"]
    rank = out["rank"]
    assert ck["rank"] == rank and ck["world_size"] == 2 and ck["iteration"] == 10
    assert ck["files"] == [f"ckpt-{k:06d}.rank{r}-of-2.json" for k in (5, 10) for r in range(2)], ck["files"]
    assert ck["blocks"]["z"] == [1, [5, 12, 3], [5, 6, 3]], ck["blocks"]
    assert all(shape[axis] == 12 and block[axis] == 6 for axis, shape, block in ck["blocks"].values())
    stopped = runs["stopped"]
    assert stopped["interrupted"] and stopped["num_iterations"] == 10 and stopped["draws"] is None
    for name, value in saem["history"].items():  # the first 10 iterations as the uninterrupted fit's
        np.testing.assert_array_equal(np.asarray(stopped["history"][name], float), np.asarray(value[:10], float),
                                      err_msg=f"stopped {name}")
    assert runs["gap_first"] == 6  # resumed after iteration 5
    for kind in ("resumed", "gap"):
        run = runs[kind]
        assert not run["interrupted"] and run["num_iterations"] == 15
        assert run["params"] == saem["params"], kind
        for name in ("z", "draws"):
            np.testing.assert_array_equal(run[name], saem[name], err_msg=f"{kind} {name}")
        assert run["history"].keys() == saem["history"].keys()
        for name, value in saem["history"].items():
            np.testing.assert_array_equal(np.asarray(run["history"][name], float), np.asarray(value, float),
                                          err_msg=f"{kind} {name}")


@pytest.mark.slow
def test_two_jax_processes_equal_one() -> None:
    outs = _two_processes(CHILD)
    assert [o["rank"] for o in outs] == [0, 1]
    one, one_fiem = outs[0]["saem_one"], outs[0]["fiem_one"]
    for out in outs:
        assert out["processes"] == 2 and out["devices"] == 2
        saem = out["saem"]
        _assert_equal_params(one["params"], saem["params"])
        for name in ("z", "draws"):  # the chains [5, 12, 3] and the draws kept: all 12 subjects on every process
            np.testing.assert_allclose(saem[name], one[name], rtol=0, atol=1e-10, err_msg=name)
        assert np.shape(saem["z"]) == (5, 12, 3) and out["z_shape"] == [5, 12, 3]
        assert saem["history"].keys() == one["history"].keys()
        for name, value in one["history"].items():
            np.testing.assert_allclose(np.asarray(saem["history"][name], float), np.asarray(value, float), rtol=1e-10,
                                       atol=1e-10, err_msg=name)
        np.testing.assert_allclose(saem["ll"], one["ll"], rtol=1e-12)
        # theophylline's per-subject data [12, ...] were split, 6 subjects on each process
        split = out["saem_split"]
        assert split and all(s[0][0] == 12 and s[1][0] == 6 and s[2] == 2 for s in split), split
        fiem = out["fiem"]
        _assert_equal_params(one_fiem["params"], fiem["params"])
        np.testing.assert_allclose(fiem["log_lik"], one_fiem["log_lik"], rtol=0, atol=1e-9)
        assert out["table_shape"] == [40, 3]
        # the points' rows [40, D] and the features-major copy Fᵀ [D, 40] (GaussianMixture.unit_data_axes), 20 each
        split = out["fiem_split"]
        assert split and all(s[2] == 2 and [(a, b) for a, b in zip(s[0], s[1]) if a != b] == [(40, 20)]
                             for s in split), split
        assert any(s[0][0] == 40 for s in split) and any(s[0][-1] == 40 and s[0][0] != 40 for s in split), split
        _assert_equal_params(outs[0]["nlme_one"], out["nlme"])  # NLME(..., backend="jax").fit(df, distributed=True)
        assert "initial states differ (state entry" in out["mismatch"]
        assert "devices= is not supported with it" in out["devices_refused"]
        _assert_checkpoints(out, saem)
        assert "every process must build the model on the same whole data" in out["mismatch"]
    assert "written by a fit over [2] process(es), this one runs over 1" in outs[0]["one_resume"]
    assert one_fiem["log_lik"][-1] > one_fiem["log_lik"][0]  # the fits moved
    assert max(np.ptp(np.asarray(v, float)) for k, v in one["history"].items() if k.startswith("theta.")) > 1e-3


def test_distributed_jax_needs_initialize() -> None:
    """Without ``jax.distributed.initialize``, ``run(..., distributed=True)`` on JAX is refused with the command to run
    (``JaxOps.process_mesh``, the driver's first call); torch's shim has no such mesh (each process its shard)."""
    jax = pytest.importorskip("jax")
    from latentfit.inference.ops import make_ops
    from latentfit.inference.ops_jax import JaxOps

    if jax.distributed.is_initialized():  # pragma: no cover - a test process inside a group
        pytest.skip("this process belongs to a jax.distributed group")
    with pytest.raises(RuntimeError, match=r"jax.distributed.initialize\(coordinator_address=.*'gloo'"):
        JaxOps().process_mesh()
    assert make_ops("torch").process_mesh() is None
    import latentfit as lf
    from latentfit.models import nlme

    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="jax")
    with pytest.raises(RuntimeError, match=r"jax.distributed.initialize"):  # NLME's front door: before any fit
        model.fit(lf.datasets.theophylline(saemix_form=True), columns={"id": "Id", "time": "Time",
                  "dv": "Concentration"}, dose="Dose", distributed=True)


CHILD_LOCAL = r"""
import json, sys
rank, port = int(sys.argv[2]), sys.argv[3]
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank)
import numpy as np
import latentfit as lf
import latentfit.numpyro
from latentfit.examples.theophylline_numpyro import theophylline_arrays, theophylline_model
from latentfit.models import nlme

out = {"rank": rank}


def record(fit):
    return {"params": {k: np.asarray(v).tolist() for k, v in fit.params.items()},
            "history": {k: np.asarray(v, float).tolist() for k, v in fit.history.items()}}


data = theophylline_arrays()
mine = {k: v[6 * rank:6 * rank + 6] for k, v in data.items()}  # this process's 6 of the 12 subjects, nothing else
opts = dict(num_iters=(8, 7), progress=False, rng="per_unit", chunk_size=5, num_draws=5)
fit = latentfit.numpyro.SAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **mine, distributed="local")
ebe = fit.individual_estimates()  # every subject's, gathered in subject order
out["saem"] = dict(record(fit), z=np.asarray(fit.state.z).tolist(), num_units=fit.num_units,
                   ll=float(fit.log_likelihood()), mode=np.asarray(ebe.mode).tolist(),
                   mean=np.asarray(ebe.mean).tolist())
# checkpoints: each process writes its block, every iteration (its chunks of 5 cut at each); interrupted after
# iteration 9 and resumed under the default checkpoint_every (9 is inside the chunk 6-10): the uninterrupted fit
import os, shutil, tempfile
ckdir = os.path.join(tempfile.gettempdir(), f"latentfit-jax-local-ckpt-{port}")


def interrupt(k, _record):
    if k == 9:
        raise KeyboardInterrupt


stopped = latentfit.numpyro.SAEM(theophylline_model, **opts, callback=interrupt).run(
    jax.random.PRNGKey(1), **mine, distributed="local", checkpoint=ckdir, checkpoint_every=1)
resumed = latentfit.numpyro.SAEM(theophylline_model, **opts).run(
    jax.random.PRNGKey(1), **mine, distributed="local", checkpoint=ckdir, resume=True)
out["ckpt"] = dict(record(resumed), z=np.asarray(resumed.state.z).tolist(), stopped_at=stopped.num_iterations,
                   files=sorted(f for f in os.listdir(ckdir) if f.endswith(f".rank{rank}-of-2.json")))
# NLME: process 1's subjects lost their first observation, so the blocks are read as [6, 10] and [6, 9] arrays and
# padded alike; each process reads only its rows of the table
df = lf.datasets.theophylline(saemix_form=True)
ids = sorted(df["Id"].unique())
first = df.groupby("Id").cumcount() == 0
df = df[~(first & df["Id"].isin(ids[6:]))].reset_index(drop=True)
THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="jax")
nlme_opts = dict(num_iters=(8, 7), chunk_size=5, seed=0, progress=False, **THEO)
block = df[df["Id"].isin(ids[6 * rank:6 * rank + 6])]
out["nlme_block_width"] = int(model.bind(block, **THEO).data.time.shape[1])
out["nlme"] = record(model.fit(block, **nlme_opts, distributed="local"))
errors = {}
try:  # subjects 6 and 7 in both processes' rows
    model.fit(df[df["Id"].isin(ids[5 * rank:5 * rank + 7])], **nlme_opts, distributed="local")
except Exception as e:
    errors["overlap"] = f"{type(e).__name__}: {e}"
# blocks of 7 and 5 subjects: each padded to 7 with dummy subjects of weight 0 (inference/padding.py)
part = slice(0, 7) if rank == 0 else slice(7, 12)
fit = latentfit.numpyro.SAEM(theophylline_model, **opts).run(
    jax.random.PRNGKey(1), **{k: v[part] for k, v in data.items()}, distributed="local")
ebe = fit.individual_estimates()
out["unequal"] = dict(record(fit), z=np.asarray(fit.state.z).tolist(), num_units=fit.num_units,
                      ll=float(fit.log_likelihood()), mean=np.asarray(ebe.mean).tolist(),
                      draws=list(fit.latent_draws.shape))
out["nlme_unequal"] = record(model.fit(df[df["Id"].isin(ids[part])], **nlme_opts, distributed="local"))
try:  # the whole data on every process
    latentfit.numpyro.SAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **data, distributed="local")
except Exception as e:
    errors["same"] = f"{type(e).__name__}: {e}"
out["errors"] = errors
if rank == 0:  # the one-process fits of the whole data (this process alone, after the last collective)
    one = latentfit.numpyro.SAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **data)
    ebe = one.individual_estimates()
    out["saem_one"] = dict(record(one), z=np.asarray(one.state.z).tolist(), ll=float(one.log_likelihood()),
                           mode=np.asarray(ebe.mode).tolist(), mean=np.asarray(ebe.mean).tolist())
    out["nlme_one"] = record(model.fit(df, **nlme_opts, rng="per_unit"))
    shutil.rmtree(ckdir)  # process 1 is past its last use of it (later collectives)
print("RESULT" + json.dumps(out), flush=True)
"""


def _assert_same_fit(one: dict, two: dict) -> None:
    """Parameters and history of a fit equal the one-process fit's to 1e-10 (the order of the sums over units)."""
    _assert_equal_params(one["params"], two["params"])
    assert two["history"].keys() == one["history"].keys()
    for name, value in one["history"].items():
        np.testing.assert_allclose(two["history"][name], value, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.slow
def test_two_jax_processes_local_blocks_equal_one() -> None:
    """``run(..., distributed="local")``: each of 2 processes passes only its block of the subjects (theophylline's
    arrays [6, ...] of [12, ...]; NLME: its rows of the table) and the SAEM fit equals the one-process fit of the whole
    data to 1e-10 in float64, parameters and history, on both processes.  Process r's units are the global units
    6r .. 6r + 5 (their per-unit streams), its chains its block of the one-process chains; the post-fit log-likelihood
    (summed over the processes) and the individual estimates (gathered in subject order) are those of the one-process
    fit on both processes (conditional modes: a damped Newton, ~sqrt(eps), as tests/test_distributed_nlme.py).  NLME
    blocks read with different numbers of observations (10 and 9 per subject) are padded alike.  With ``checkpoint=``
    each process writes its block; the fit interrupted after iteration 10 and resumed equals the uninterrupted one bit
    for bit.  Blocks of 7 and 5 subjects (NumPyro arrays and NLME rows), padded to 7 with dummy subjects of weight 0,
    give the one-process fit likewise, the result holding the real subjects only.  Overlapping NLME blocks and the
    whole data on every process are refused with the reason named."""
    outs = _two_processes(CHILD_LOCAL)
    one = outs[0]["saem_one"]
    for out in outs:
        r, saem = out["rank"], out["saem"]
        _assert_same_fit(one, saem)
        assert saem["num_units"] == 12
        np.testing.assert_allclose(saem["z"], np.asarray(one["z"])[:, 6 * r:6 * r + 6], rtol=0, atol=1e-10)
        np.testing.assert_allclose(saem["ll"], one["ll"], rtol=1e-10)
        np.testing.assert_allclose(saem["mean"], one["mean"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(saem["mode"], one["mode"], rtol=1e-6, atol=1e-6)
        assert np.shape(saem["mode"]) == (12, 3)
        ck = out["ckpt"]  # interrupted after iteration 9, resumed inside a chunk: the uninterrupted fit bit for bit
        assert ck["stopped_at"] == 9
        # written at 7, 8, 9 (keep=3), then at 15 (the end; 10 was not due under the default every 5)
        assert ck["files"] == [f"ckpt-{k:06d}.rank{r}-of-2.json" for k in (8, 9, 15)], ck["files"]
        assert ck["params"] == saem["params"] and ck["z"] == saem["z"] and ck["history"] == saem["history"]
        assert out["nlme_block_width"] == (10 if r == 0 else 9)
        _assert_same_fit(outs[0]["nlme_one"], out["nlme"])
        errors = out["errors"]
        assert "ModelSpecificationError" in errors["overlap"] and "6 (processes [0, 1])" in errors["overlap"]
        unequal = out["unequal"]  # 7 and 5 subjects, padded to 7: the one-process fit likewise, real units only
        _assert_same_fit(one, unequal)
        assert unequal["num_units"] == 12 and unequal["draws"] == [5, 5, 7 - 2 * r, 3]
        np.testing.assert_allclose(unequal["z"], np.asarray(one["z"])[:, 7 * r:7 + 5 * r], rtol=0, atol=1e-10)
        np.testing.assert_allclose(unequal["ll"], one["ll"], rtol=1e-10)
        np.testing.assert_allclose(unequal["mean"], one["mean"], rtol=1e-10, atol=1e-10)
        _assert_same_fit(outs[0]["nlme_one"], out["nlme_unequal"])
        assert "every process passed the same data" in errors["same"]
    assert max(np.ptp(np.asarray(v, float)) for k, v in one["history"].items() if k.startswith("theta.")) > 1e-3


CHILD_ENGINES = r"""
import json, sys
rank, port = int(sys.argv[2]), sys.argv[3]
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                           shutdown_timeout_seconds=1800)  # process 0's one-process fits at the end
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import latentfit.numpyro
from latentfit.examples.theophylline_numpyro import theophylline_arrays, theophylline_model
from latentfit.models import GaussianMixture
from test_distributed_em import ENGINES, _data

out = {"rank": rank}


def record(fit):
    return {"params": {k: np.asarray(v).tolist() for k, v in fit.params.items()},
            "history": {k: np.asarray(v, float).tolist() for k, v in fit.history.items()
                        if k in ("log_lik", "objective", "grad_norm2") or k.startswith("theta")}}


import numpyro, numpyro.distributions as dist
from numpyro.distributions import constraints


def intercepts(y):  # the random-intercept model of latentfit.numpyro's docstring
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(b, sigma), obs=y)


data = theophylline_arrays()
rng = np.random.default_rng(0)
y = jnp.asarray(1.0 + 0.8 * rng.normal(size=(12, 1)) + 0.5 * rng.normal(size=(12, 6)))
part = slice(0, 7) if rank == 0 else slice(7, 12)  # 7 and 5 units: padded to 7
# all units per step (theophylline), and mini-batches of 5 with MALA (random intercepts: a mini-batch of the NumPyro
# theophylline model evaluates its other units at z = 0, where ka = ke and the one-compartment formula is 0/0)
sgd = {"full": (theophylline_model, data, dict()), "batch": (intercepts, {"y": y}, dict(batch_size=5, kernel="mala"))}
opts = dict(num_iters=12, burn_in=2, progress=False, rng="per_unit", chunk_size=4, num_draws=4)
for name, (fn, arrays, extra) in sgd.items():
    fit = latentfit.numpyro.MCMCSGD(fn, **opts, **extra).run(jax.random.PRNGKey(1), **{k: v[part] for k, v in
                                                             arrays.items()}, distributed="local")
    out[name] = dict(record(fit), z=np.asarray(fit.state.z).tolist())
x = np.asarray(_data(40))
em = {name: dict(ENGINES[name], seed=3, progress=False, batching="random", track_log_lik=True)
      for name in ("MiniBatchEM", "IEM", "FIEM")}
for name, o in em.items():  # 20 and 20 points: mini-batches of one static size, the other process's points masked
    model = GaussianMixture(jnp.asarray(x[20 * rank:20 * rank + 20]), 3, "full", seed=1)
    out[name] = record(getattr(latentfit.numpyro, name)(model, **o).run(jax.random.PRNGKey(3), distributed="local"))
# 21 and 19 points: the mixture pads its block (its centring and k-means start from the real points)
out["FIEM_uneq"] = record(latentfit.numpyro.FIEM(GaussianMixture(jnp.asarray(x[:21] if rank == 0 else x[21:]), 3,
                                                                 "full", seed=1), **em["FIEM"]).run(
    jax.random.PRNGKey(3), distributed="local"))
errors = {}
try:  # a Monte-Carlo E-step on the global stream
    latentfit.numpyro.MCEM(theophylline_model, num_epochs=2, progress=False).run(
        jax.random.PRNGKey(1), **{k: v[6 * rank:6 * rank + 6] for k, v in data.items()}, distributed="local")
except ValueError as e:
    errors["mcem"] = str(e)
out["errors"] = errors
if rank == 0:  # the one-process fits of the whole data
    for name, (fn, arrays, extra) in sgd.items():
        fit = latentfit.numpyro.MCMCSGD(fn, **opts, **extra).run(jax.random.PRNGKey(1), **arrays)
        out[name + "_one"] = dict(record(fit), z=np.asarray(fit.state.z).tolist())
    for name, o in em.items():
        model = GaussianMixture(jnp.asarray(x), 3, "full", seed=1)
        out[name + "_one"] = record(getattr(latentfit.numpyro, name)(model, **o).run(jax.random.PRNGKey(3)))
print("RESULT" + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_two_jax_processes_local_more_engines() -> None:
    """``run(..., distributed="local")`` on JAX beyond SAEM: MCMCSGD on blocks of 7 and 5 units (padded to 7 with dummy
    units of weight 0): theophylline with all units per step and saemix's kernels, random intercepts with mini-batches
    of 5 and MALA (every process draws the same global batch, a batch of one static size in which the other process's
    units weigh 0),
    and MiniBatchEM, IEM and FIEM on a mixture of 20 + 20 points (the same masked mini-batches, table writes of the
    other process's units dropped), and FIEM on 21 + 19 points (the mixture padded), equal the one-process fit to 1e-10
    in float64 (gradients / statistics psum'ed, every process the same optimiser step / M-step).  A Monte-Carlo
    E-step on the global stream is refused with the reason named."""
    outs = _two_processes(CHILD_ENGINES, timeout=1800)
    one = outs[0]
    for out in outs:
        r = out["rank"]
        for name in ("full", "batch", "MiniBatchEM", "IEM", "FIEM"):
            _assert_same_fit(one[name + "_one"], out[name])
        _assert_same_fit(one["FIEM_one"], out["FIEM_uneq"])
        for name in ("full", "batch"):  # this process's real subjects' chains
            np.testing.assert_allclose(out[name]["z"], np.asarray(one[name + "_one"]["z"])[:, 7 * r:7 + 5 * r],
                                       rtol=0, atol=1e-10)
        assert "rng='per_unit'" in out["errors"]["mcem"], out["errors"]
    for name in ("full", "batch"):
        assert np.ptp(one[name + "_one"]["history"]["objective"]) > 0.1  # the fits moved



CHILD_MC = r"""
import json, sys
rank, port = int(sys.argv[2]), sys.argv[3]
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
# the one-process fits after the last collective take minutes on a loaded machine: the other process waits at the
# shutdown barrier meanwhile
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                           shutdown_timeout_seconds=1800)
import jax.numpy as jnp
import numpy as np
import numpyro, numpyro.distributions as dist
from numpyro.distributions import constraints
sys.path.insert(0, sys.argv[1])
import latentfit.numpyro
from latentfit.models import GaussianMixture
from test_distributed_em import MISSO_OPTIONS, TTSEM_CASES, TTSEM_OPTIONS, _data


def record(fit):
    return {"params": {k: np.asarray(v).tolist() for k, v in fit.params.items()},
            "history": {k: np.asarray(v, float).tolist() for k, v in fit.history.items()
                        if k in ("log_lik", "objective") or k.startswith("theta")}}


def intercepts(y):  # the random-intercept model of latentfit.numpyro's docstring
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(b, sigma), obs=y)


x = np.asarray(_data(40))
rng = np.random.default_rng(0)
y = jnp.asarray(1.0 + 0.8 * rng.normal(size=(12, 1)) + 0.5 * rng.normal(size=(12, 6)))
# a mixture of 21 + 19 points (exact posterior draws of the labels from per-unit streams, the mixture padded) and
# random intercepts on 7 + 5 units (MH chains; a spare dummy unit for the other process's units of a batch)
CASES = {"MCEM": ("mix", dict(num_epochs=3, num_samples=5)),
         "MiniBatchMCEM": ("int", dict(num_epochs=2, batch_size=5, num_samples=3)),
         "TTSEM": ("mix", {**TTSEM_CASES["TTSEM-fi"], **TTSEM_OPTIONS}),
         "MISSO": ("int", dict(num_epochs=2, batch_size=5, mc_size=3, num_chains=3)),
         "MISSO-paper": ("mix", MISSO_OPTIONS)}
PARTS = {"mix": (slice(0, 21), slice(21, 40)), "int": (slice(0, 7), slice(7, 12))}


def fit(name, part, **run):
    kind, options = CASES[name]
    options = dict(options, rng="per_unit", seed=3, progress=False)
    engine = getattr(latentfit.numpyro, name.split("-")[0])
    if kind == "mix":
        model = GaussianMixture(jnp.asarray(x[part]), 3, "full", seed=1)
        return record(engine(model, **options, track_log_lik=True).run(jax.random.PRNGKey(3), **run))
    return record(engine(intercepts, **options).run(jax.random.PRNGKey(3), y=y[part], **run))


out = {"rank": rank}
for name, (kind, _) in CASES.items():
    out[name] = fit(name, PARTS[kind][rank], distributed="local")
for name in list(CASES)[rank::2]:  # the one-process fits of the whole data, shared by the processes
    out[name + "_one"] = fit(name, slice(None))
print("RESULT" + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_two_jax_processes_local_monte_carlo_engines() -> None:
    """``run(..., distributed="local")`` on JAX for the Monte-Carlo engines of the EM family and MISSO, with
    ``rng="per_unit"`` and blocks of unequal size: MCEM, fiTTEM and MISSO (the paper's surrogates) on a mixture of
    21 + 19 points (exact posterior draws of the labels, each point's from its own stream; the mixture padded with a
    dummy point of weight 0), MiniBatchMCEM and MISSO (Louis' acceleration, anchors summed over the real units only) on
    random intercepts of 7 + 5 units (MH chains; the other process's units of a batch name a spare dummy unit; the
    acceptance rates that adapt the random-walk scales count the real units) equal the one-process fit to 1e-10 in
    float64, parameters and history, on both processes."""
    outs = _two_processes(CHILD_MC, timeout=1800)
    one = {k: v for out in outs for k, v in out.items() if k.endswith("_one")}
    for out in outs:
        for name in ("MCEM", "MiniBatchMCEM", "TTSEM", "MISSO", "MISSO-paper"):
            _assert_same_fit(one[name + "_one"], out[name])
    for name in ("MCEM", "MiniBatchMCEM", "TTSEM", "MISSO", "MISSO-paper"):  # the fits moved
        history = one[name + "_one"]["history"]
        assert max(np.ptp(np.asarray(v, float)) for k, v in history.items() if k.startswith("theta.")) > 1e-2, name


CHILD_PADDED = r"""
import json, os, shutil, sys, tempfile
rank, port = int(sys.argv[2]), sys.argv[3]
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
# the one-process fits after the last collective take minutes on a loaded machine: the other process waits at the
# shutdown barrier meanwhile
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                           shutdown_timeout_seconds=1800)
import jax.numpy as jnp
import numpy as np
import numpyro, numpyro.distributions as dist
from numpyro.distributions import constraints
sys.path.insert(0, sys.argv[1])
import latentfit.numpyro
from gallery_numpyro import radon_intercept
from latentfit.examples.theophylline_numpyro import theophylline_arrays, theophylline_model


def record(fit):
    return {"params": {k: np.asarray(v).tolist() for k, v in fit.params.items()},
            "history": {k: np.asarray(v, float).tolist() for k, v in fit.history.items()}}


def grouped(county, floor, log_radon=None):  # the plate's size from the group index
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    beta = numpyro.param("beta", 0.0)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", int(county.max()) + 1):
        alpha = numpyro.sample("alpha", dist.Normal(mu, omega))
    with numpyro.plate("rows", len(floor)):
        numpyro.sample("obs", dist.Normal(alpha[county] + beta * floor, sigma), obs=log_radon)


def intercepts(y):
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(b, sigma), obs=y)


out = {"rank": rank}
opts = dict(num_iters=(8, 7), progress=False, rng="per_unit", chunk_size=5, num_draws=5)
# 12 counties of 2-8 houses: 6 + 6 counties (27 and 28 rows) and 7 + 5 counties, each process its rows
rng = np.random.default_rng(0)
G = 12
county = np.repeat(np.arange(G), rng.integers(2, 9, size=G))
floor = rng.normal(size=county.size)
log_radon = 1.0 + 0.7 * rng.normal(size=G)[county] + 0.5 * floor + 0.3 * rng.normal(size=county.size)
for cut in (6, 7):
    lo, hi = (0, cut) if rank == 0 else (cut, G)
    rows = (county >= lo) & (county < hi)
    fit = latentfit.numpyro.SAEM(radon_intercept, **opts).run(jax.random.PRNGKey(2), county[rows] - lo, floor[rows],
                                                              hi - lo, log_radon=log_radon[rows], distributed="local")
    out[f"radon{cut}"] = dict(record(fit), num_units=fit.num_units, z=list(np.shape(fit.state.z)))
fit = latentfit.numpyro.SAEM(grouped, **opts).run(jax.random.PRNGKey(2), county[rows] - lo, floor[rows],  # 7 + 5
                                                  log_radon=log_radon[rows], distributed="local")
out["grouped"] = record(fit)
# f-SAEM on blocks of 7 + 5 units: random intercepts (the Laplace step exact), theophylline checkpointed
part = slice(0, 7) if rank == 0 else slice(7, 12)
rng = np.random.default_rng(0)
y = jnp.asarray(1.0 + 0.8 * rng.normal(size=(12, 1)) + 0.5 * rng.normal(size=(12, 6)))
out["fsaem_int"] = record(latentfit.numpyro.FSAEM(intercepts, **opts).run(jax.random.PRNGKey(1), y=y[part],
                                                                            distributed="local"))
data = theophylline_arrays()
mine = {k: v[part] for k, v in data.items()}
out["fsaem"] = record(latentfit.numpyro.FSAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **mine,
                                                                                distributed="local"))
ckdir = os.path.join(tempfile.gettempdir(), f"latentfit-jax-padded-ckpt-{port}")


def interrupt(k, _record):
    if k == 9:
        raise KeyboardInterrupt


stopped = latentfit.numpyro.FSAEM(theophylline_model, **opts, callback=interrupt).run(
    jax.random.PRNGKey(1), **mine, distributed="local", checkpoint=ckdir, checkpoint_every=5)
from latentfit.checkpoint import load_checkpoint
ck = load_checkpoint(ckdir, (rank, 2))
resumed = latentfit.numpyro.FSAEM(theophylline_model, **opts).run(
    jax.random.PRNGKey(1), **mine, distributed="local", checkpoint=ckdir, resume=True)
out["ckpt"] = dict(record(resumed), z=np.asarray(resumed.state.z).tolist(), stopped_at=stopped.num_iterations,
                   saved_z=list(ck.tensors[next(d["tensor"] for d in ck.meta["state"] if d["path"] == ["z"])].shape),
                   files=sorted(f for f in os.listdir(ckdir) if f.endswith(f".rank{rank}-of-2.json")))
if rank == 0:  # the one-process fits of the whole data, shared by the processes
    out["radon_one"] = record(latentfit.numpyro.SAEM(radon_intercept, **opts).run(
        jax.random.PRNGKey(2), county, floor, G, log_radon=log_radon))
    out["grouped_one"] = record(latentfit.numpyro.SAEM(grouped, **opts).run(jax.random.PRNGKey(2), county, floor,
                                                                            log_radon=log_radon))
    shutil.rmtree(ckdir)  # process 1 is past its last use of it
else:
    out["fsaem_int_one"] = record(latentfit.numpyro.FSAEM(intercepts, **opts).run(jax.random.PRNGKey(1), y=y))
    out["fsaem_one"] = record(latentfit.numpyro.FSAEM(theophylline_model, **opts).run(jax.random.PRNGKey(1), **data))
print("RESULT" + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_two_jax_processes_local_grouped_fsaem_checkpoint() -> None:
    """``run(..., distributed="local")`` on JAX with padded blocks, beyond the per-unit arrays of
    :func:`test_two_jax_processes_local_blocks_equal_one`:

    * the gallery's radon model (latents in a plate over counties, houses' rows reading ``alpha[county]``, unbalanced
      counties, ``num_counties`` an int argument): 6 + 6 counties of 27 and 28 rows, and 7 + 5 counties, each process
      its rows (padded to 29 and 39 rows, the extra rows read by a dummy county of weight 0); the same model sizing its
      plate by ``int(county.max()) + 1``; SAEM equal to the one-process fit to 1e-10, the result holding the real
      counties;
    * f-SAEM on 7 + 5 units: random intercepts (the Laplace step exact) to 1e-10; theophylline to 1e-8 (its Newton
      modes settle to ~sqrt(eps), and the one-process fit moves by 1.5e-9 when its subjects are reordered);
    * checkpoints of the padded f-SAEM fit: each process writes its padded block (chains [5, 7, 3]: process 1's 5
      subjects and 2 dummy ones), and the fit interrupted after iteration 10 and resumed equals the uninterrupted
      padded fit bit for bit."""
    outs = _two_processes(CHILD_PADDED, timeout=1800)
    one = {k: v for out in outs for k, v in out.items() if k.endswith("_one")}
    for out in outs:
        r = out["rank"]
        for cut in (6, 7):
            _assert_same_fit(one["radon_one"], out[f"radon{cut}"])
            assert out[f"radon{cut}"]["num_units"] == 12
            assert out[f"radon{cut}"]["z"][1] == (cut if r == 0 else 12 - cut)  # the real counties only
        _assert_same_fit(one["grouped_one"], out["grouped"])
        _assert_same_fit(one["fsaem_int_one"], out["fsaem_int"])
        for name, value in one["fsaem_one"]["params"].items():
            np.testing.assert_allclose(out["fsaem"]["params"][name], value, rtol=1e-8, atol=1e-8, err_msg=name)
        ck = out["ckpt"]
        assert ck["stopped_at"] == 10
        assert ck["files"] == [f"ckpt-{k:06d}.rank{r}-of-2.json" for k in (5, 10, 15)], ck["files"]
        assert ck["saved_z"] == [5, 7, 3], ck["saved_z"]  # this process's block, padded to the larger one's 7
        assert ck["params"] == out["fsaem"]["params"] and ck["history"] == out["fsaem"]["history"]
    for name in ("radon_one", "grouped_one", "fsaem_int_one"):
        assert max(np.ptp(np.asarray(v, float)) for k, v in one[name]["history"].items()
                   if k.startswith("theta.")) > 1e-2, name
