"""The EM family under data parallelism (issue 13): ``run(..., distributed=True)`` on torch.distributed and
``run(..., devices=2)`` on JAX, for a Gaussian mixture (``GaussianMixture``).

Each of two gloo processes (spawned with ``torch.multiprocessing``) holds a contiguous shard of the 41 points (21
and 20); every process draws the same global mini-batches, computes the statistics of the units it owns and the
sums are all-reduced in float64, so the trajectory is the one-process fit's: estimates and objectives within 1e-10
(only the order of the sums over units differs).  The mixture's centring and k-means start come from the whole
data (``GaussianMixture.shard_view``).  On JAX the per-unit tables are split over two host devices, and the data
(``GaussianMixture.unit_data_axes``) too, also for the engines that keep no per-unit state (EM, TTSEM's "saem").

TTSEM (its four variants, and on the plain Pyro mixture) with ``rng="per_unit"``: the Monte-Carlo E-step draws each
unit's labels from its own stream, so the two-process fit equals the one-process fit to 1e-10 likewise; so does
MISSO (the paper's surrogates) with ``rng="per_unit"``, and both on two JAX host devices (their per-unit tables split).
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
import torch.multiprocessing as mp

HERE = Path(__file__).parent
CENTRES = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
#: engine name -> constructor options (small batches: many all-reduced mini-batch statistics per epoch)
ENGINES = {"EM": dict(num_epochs=8), "FIEM": dict(num_epochs=4, batch_size=4),
           "IEM": dict(num_epochs=2, batch_size=3), "MiniBatchEM": dict(num_epochs=3),
           "SEMVR": dict(num_epochs=3, batch_size=5)}
#: TTSEM's variants (Monte-Carlo E-step: exact posterior draws of the labels, from per-unit streams); "saem" takes
#: its default b = n, the units of both processes
TTSEM_CASES = {"TTSEM-fi": dict(variant="fi", num_epochs=3, batch_size=4),
               "TTSEM-vr": dict(variant="vr", num_epochs=2, batch_size=5),
               "TTSEM-isaem": dict(variant="isaem", num_epochs=2, batch_size=3),
               "TTSEM-saem": dict(variant="saem", num_epochs=4)}
TTSEM_OPTIONS = dict(num_samples=5, rng="per_unit")
#: MISSO with the paper's surrogates (exact posterior draws of the labels from per-unit streams; Louis' acceleration
#: is tested on the random intercept of tests/test_distributed.py: on this small mixture a covariance goes singular)
MISSO_OPTIONS = dict(surrogate="paper", num_epochs=3, batch_size=5, mc_size=3, num_chains=3, rng="per_unit")
#: every case of the two-process test
CASES = [*ENGINES, "pyro-FIEM", *TTSEM_CASES, "pyro-TTSEM", "MISSO"]


def _data(n: int = 41) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 2)) * 0.8 + CENTRES[rng.integers(0, 3, n)]


def pyro_mixture(x: torch.Tensor) -> None:
    """A plain Pyro mixture (enumerated label): the EM family recognises it and takes the mixture's E-step."""
    import pyro
    import pyro.distributions as dist
    from pyro.distributions import constraints

    w = pyro.param("w", torch.full((3,), 1 / 3, dtype=torch.float64), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.as_tensor(CENTRES + 0.5))
    cov = pyro.param("cov", torch.eye(2, dtype=torch.float64).repeat(3, 1, 1),
                     constraint=constraints.positive_definite)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.MultivariateNormal(mu[z], covariance_matrix=cov[z]), obs=x)


def _fit(x: torch.Tensor, engine: str, **run_options: object):
    import pyro

    import latentfit.pyro
    from latentfit.models import GaussianMixture

    options = dict(seed=3, progress=False, batching="random", track_log_lik=True)
    if engine == "pyro-FIEM":  # the user's Pyro model, parameters from its pyro.param initial values
        pyro.clear_param_store()
        return latentfit.pyro.FIEM(pyro_mixture, **ENGINES["FIEM"], **options).run(x, **run_options)
    if engine == "pyro-TTSEM":  # its enumerated label drawn from the per-unit streams
        pyro.clear_param_store()
        return latentfit.pyro.TTSEM(pyro_mixture, **TTSEM_CASES["TTSEM-fi"], **TTSEM_OPTIONS, **options).run(
            x, **run_options)
    if engine == "MISSO":
        return latentfit.pyro.MISSO(GaussianMixture(x, 3, "full", seed=1), **MISSO_OPTIONS, **options).run(
            **run_options)
    if engine in TTSEM_CASES:
        return latentfit.pyro.TTSEM(GaussianMixture(x, 3, "full", seed=1), **TTSEM_CASES[engine], **TTSEM_OPTIONS,
                                    **options).run(**run_options)
    cls = getattr(latentfit.pyro, engine)
    return cls(GaussianMixture(x, 3, "full", seed=1), **ENGINES[engine], **options).run(**run_options)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = _data()
        shard = np.array_split(np.arange(len(x)), world)[rank]
        for engine in CASES:
            fit = _fit(torch.as_tensor(x[shard]), engine, distributed=True)
            np.savez(Path(out) / f"{engine}-rank{rank}.npz", log_lik=fit.history["log_lik"],
                     final_log_lik=fit.log_likelihood(), bic=fit.bic,  # post-fit: all-reduced over the processes
                     **{f"hist_{k}": np.asarray(v) for k, v in fit.history.items() if k != "time"},
                     **{f"param_{k}": np.asarray(v) for k, v in fit.params.items()})
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed_em")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("engine", CASES)
def test_two_processes_equal_one(two_processes: Path, engine: str) -> None:
    one = _fit(torch.as_tensor(_data()), engine)
    for rank in range(2):
        r = np.load(two_processes / f"{engine}-rank{rank}.npz")
        assert set(one.params) == {k[len("param_"):] for k in r.files if k.startswith("param_")}
        for name, value in one.params.items():
            np.testing.assert_allclose(r[f"param_{name}"], np.asarray(value), rtol=0, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(r["log_lik"], one.history["log_lik"], rtol=1e-12, atol=0)
        # the whole history (θ after every epoch, log-likelihoods, counts)
        assert {k[len("hist_"):] for k in r.files if k.startswith("hist_")} == set(one.history) - {"time"}
        for name, value in one.history.items():
            if name != "time":
                np.testing.assert_allclose(r[f"hist_{name}"], value, rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_allclose([r["final_log_lik"], r["bic"]], [one.log_likelihood(), one.bic], rtol=1e-12)
    if "TTSEM" in engine or engine == "MISSO":  # Monte-Carlo: the estimates move around the k-means start (MC noise)
        assert np.ptp(one.history["log_lik"]) > 1e-3
    else:  # the fits moved: the log-likelihood increased from the k-means start
        assert one.history["log_lik"][-1] > one.history["log_lik"][0]


CHILD = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import latentfit.numpyro
from latentfit.models import GaussianMixture
from test_distributed_em import _jax_engine, _data

x = jnp.asarray(_data(40))
out = {"num_devices": len(jax.devices())}
for name in sys.argv[2].split(","):
    cls, options = _jax_engine(name)
    fits = [cls(GaussianMixture(x, 3, "full", seed=1), **options, seed=3, progress=False, batching="random",
                track_log_lik=True).run(jax.random.PRNGKey(3), devices=devices) for devices in (None, 2)]
    table = getattr(fits[1].state.memory, "snap_table" if name in ("SEMVR", "TTSEM-vr") else "table")["r"]
    out[name] = {"diff": max(float(np.max(np.abs(np.asarray(fits[0].params[k]) - np.asarray(fits[1].params[k]))))
                             for k in fits[0].params),
                 "log_lik_diff": float(np.max(np.abs(fits[0].history["log_lik"] - fits[1].history["log_lik"]))),
                 "history_diff": max(float(np.max(np.abs(np.asarray(fits[0].history[k])
                                                         - np.asarray(fits[1].history[k]))))
                                     for k in fits[0].history if k != "time"),
                 "moved": float(fits[0].history["log_lik"][-1] - fits[0].history["log_lik"][0]),
                 "log_lik_range": float(np.ptp(fits[0].history["log_lik"])),
                 "table_devices": len(table.sharding.device_set),
                 "table_shard": list(table.sharding.shard_shape(table.shape))}
for name in ("EM", "TTSEM-saem"):  # no per-unit state (exact posterior draws, no table): the data alone are split
    cls, options = _jax_engine(name)
    engines = [cls(GaussianMixture(x, 3, "full", seed=1), **options, seed=3, progress=False, track_log_lik=True)
               for _ in range(2)]
    fits = [engine.run(jax.random.PRNGKey(3), devices=devices) for engine, devices in zip(engines, (None, 2))]
    programs = [p[0] for p in engines[1].model.ops._compiled.values()]
    features = [c for p in programs for c in getattr(p, "consts", ()) if np.shape(c) == (7, 40)]  # Fᵀ [D, n]
    out[name] = {"diff": max(float(np.max(np.abs(np.asarray(fits[0].params[k]) - np.asarray(fits[1].params[k]))))
                             for k in fits[0].params),
                 "history_diff": max(float(np.max(np.abs(np.asarray(fits[0].history[k])
                                                         - np.asarray(fits[1].history[k]))))
                                     for k in fits[0].history if k != "time"),
                 "moved": float(fits[0].history["log_lik"][-1] - fits[0].history["log_lik"][0]),
                 "data_shards": sorted({tuple(c.sharding.shard_shape(c.shape)) for c in features})}
print("RESULT" + json.dumps(out))
"""


def _jax_engine(name: str) -> tuple[type, dict]:
    """The NumPyro engine class and options of a case of this file (``ENGINES``, ``TTSEM_CASES`` or ``"MISSO"``)."""
    import latentfit.numpyro

    if name in TTSEM_CASES:
        return latentfit.numpyro.TTSEM, {**TTSEM_CASES[name], **TTSEM_OPTIONS}
    if name == "MISSO":
        return latentfit.numpyro.MISSO, MISSO_OPTIONS
    return getattr(latentfit.numpyro, name), ENGINES.get(name, {})


def _two_devices(engines: list[str]) -> None:
    """``engines`` with their per-unit tables ``[40, K]`` split over two host devices (a subprocess with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=2``) equal the one-device fits to 1e-10."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(HERE), ",".join(engines)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert out["num_devices"] == 2
    for name in engines:
        res = out[name]
        assert res["diff"] < 1e-10 and res["log_lik_diff"] < 1e-9 and res["history_diff"] < 1e-9, res
        if name in ENGINES:  # exact E-steps: the log-likelihood increased from the k-means start
            assert res["moved"] > 0
        else:  # Monte-Carlo: it moves around the k-means start
            assert res["log_lik_range"] > 1e-3, res
        assert res["table_devices"] == 2 and res["table_shard"] == [20, 3]
    for name in ("EM", "TTSEM-saem"):  # no per-unit state: the data's feature rows are split, 20 points per device
        res = out[name]
        assert res["diff"] < 1e-10 and res["history_diff"] < 1e-9 and res["data_shards"] == [[7, 20]], res
        assert res["moved"] > 0 if name == "EM" else res["moved"] != 0


def test_fiem_two_jax_devices_equal_one() -> None:
    _two_devices(["FIEM"])


@pytest.mark.slow
def test_iem_semvr_two_jax_devices_equal_one() -> None:
    _two_devices(["IEM", "SEMVR"])


@pytest.mark.slow
def test_ttsem_misso_two_jax_devices_equal_one() -> None:
    """TTSEM (fi, vr, isaem) and MISSO (the paper's surrogates) with ``rng="per_unit"``: each unit's labels are drawn
    from its own stream, so with the per-unit tables ``[40, 3]`` split over two host devices the parameters and the
    whole history equal the one-device fit to 1e-10.  TTSEM's "saem" variant keeps no per-unit state here (exact
    draws, no table): like EM, only the data are split."""
    _two_devices(["TTSEM-fi", "TTSEM-vr", "TTSEM-isaem", "MISSO"])


def test_distributed_refusals() -> None:
    """Monte-Carlo E-steps and one-process block mini-batches are refused before any process group is needed; the
    exact engines ask for one."""
    from latentfit.models import GaussianMixture
    from latentfit.pyro import EM, FIEM, MCEM, TTSEM

    model = GaussianMixture(torch.as_tensor(_data()), 3, "full", seed=1)
    with pytest.raises(ValueError, match="Monte-Carlo E-steps are not supported"):
        MCEM(model, num_epochs=2, progress=False).run(distributed=True)
    with pytest.raises(ValueError, match="Monte-Carlo E-steps are not supported"):  # TTSEM's global stream
        TTSEM(model, num_epochs=2, progress=False).run(distributed=True)
    with pytest.raises(ValueError, match="batching='blocks'"):
        FIEM(model, num_epochs=2, batching="blocks", progress=False).run(distributed=True)
    with pytest.raises(RuntimeError, match="torchrun"):
        EM(model, num_epochs=2, progress=False).run(distributed=True)
