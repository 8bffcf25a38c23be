"""Data-parallel SAEM, f-SAEM, MCMCSGD and Monte-Carlo EM on torch.distributed (issue 13, item 2):
``run(..., distributed=True)``.

Two gloo processes spawned with ``torch.multiprocessing`` each hold a contiguous shard of the units (8 and 7 of
15: uneven on purpose); statistics and acceptance counts are all-reduced in float64 and both run the same M-step.
With per-unit streams the fit equals the one-process fit to 1e-10 in float64 (only the order of the sums over
units differs): same estimates on every rank, and the ranks' chains side by side are the one-process chains.

MCMCSGD (random intercept, 8 + 7 of 15 units): each process advances the chains of its units, the Fisher-identity
gradient (a sum over units) is all-reduced in float64 and both take the same optimiser step; mini-batches are drawn
from the shared generator, so both pick the same global batch (a process may hold none of its units: it then joins
the all-reduces with zeros; 4 of the 14 iterations of the batch_size=3 case).  Estimates, the whole history
(iterates, objective, squared gradient norms, acceptance rates) and the chains equal the one-process fit to 1e-10.
MCEM, MiniBatchMCEM and fiTTEM (MH chains, ``rng="per_unit"``) likewise, and SAEM with numerical M-steps (the random
intercept with its closed forms off: values, gradients and Hessians of the complete-data log-likelihood
all-reduced), and MISSO (both surrogates; statistics, quadratic surrogates' gradients and anchors, curvature and
Louis' informations all-reduced).  One spawn serves every engine.
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


# ----- MCMCSGD and the Monte-Carlo EM engines (random intercept, 15 units) -----------------------------------------
MC_OPTIONS = dict(num_iters=14, burn_in=3, seed=4, progress=False, rng="per_unit", chunk_size=5, num_draws=4,
               learning_rate=0.1)
#: full batch, a mini-batch of 3 of the 15 units (some batches fall on one process only), MALA with a mini-batch
MC_CASES = {"full": {}, "batch": {"batch_size": 3}, "mala": {"kernel": "mala", "batch_size": 5}}
#: Monte-Carlo EM engines (MH chains on per-unit streams): class name and options
EM_OPTIONS = dict(num_epochs=4, seed=2, progress=False, rng="per_unit", num_samples=3, chunk_size=3)
EM_CASES = {"MCEM": ("MCEM", {}), "MiniBatchMCEM": ("MiniBatchMCEM", {"batch_size": 3}),
            "TTSEM": ("TTSEM", {"batch_size": 3})}


#: SAEM with numerical M-steps only: the random intercept with its closed forms switched off
NUMERIC_OPTIONS = dict(num_iters=(6, 4), burn_in=2, seed=1, progress=False, rng="per_unit", chunk_size=5,
                       num_draws=4, newton_steps=4)


def _numeric_fit(y: np.ndarray, **run_options: object):
    import models_pyro
    import pyro

    from latentfit.inference.saem import SAEM
    from latentfit.integrations.pyro import PyroLatentModel

    pyro.clear_param_store()
    model = PyroLatentModel(models_pyro.random_intercept, (torch.as_tensor(y),), closed_form=False)
    assert model.closed_form_params == [] and set(model.numeric_params) == {"mu", "omega", "sigma"}
    return SAEM(model, **NUMERIC_OPTIONS).run(**run_options)


#: MISSO (per-unit MH chains, ``rng="per_unit"``): (closed-form M-step?, options).  The closed-form model exercises the
#: statistics table and Louis' informations; with its closed forms off every parameter has the quadratic surrogate
#: (anchors, gradients, curvature), with the paper's step and with Louis' acceleration.  Mini-batches of 3 of the 15
#: units fall on one process only at some visits.
MISSO_OPTIONS = dict(num_epochs=3, mc_size=3, num_chains=3, seed=2, progress=False, rng="per_unit", chunk_size=3)
MISSO_CASES = {"louis": (True, {"batch_size": 3}), "paper-numeric": (False, {"surrogate": "paper", "batch_size": 3}),
               "louis-numeric": (False, {}),
               # a logistic random intercept (models_pyro.logistic_intercept on the data's signs), the accelerated
               # majorant from epoch 1: the stored curvatures, scores and visit points of the units split too
               "bohning": (True, {"surrogate": "bohning", "batch_size": 3, "accelerate": 1}),
               # the default surrogate="auto" on the same logistic model: each process reads its block's design and
               # chooses "bohning" (checked alike on every process), accelerated from epoch 1 (accelerate given)
               "auto": (True, {"batch_size": 3, "accelerate": 1})}
#: the MISSO cases fitted on models_pyro.logistic_intercept
LOGISTIC_CASES = ("bohning", "auto")


def _logistic_args(y: np.ndarray) -> tuple:
    """``(x, y)`` of models_pyro.logistic_intercept from the random-intercept data: x the centred values, y their signs
    about 1 (each unit's rows are its own, so a process's shard is the same units' rows)."""
    return torch.as_tensor(y - 1.0), torch.as_tensor((y > 1.0).astype(float))


def _misso_fit(y: np.ndarray, case: str, **run_options: object):
    import models_pyro
    import pyro

    from latentfit.inference.misso import MISSO
    from latentfit.integrations.pyro import PyroLatentModel

    pyro.clear_param_store()
    closed_form, extra = MISSO_CASES[case]
    if case in LOGISTIC_CASES:
        model = PyroLatentModel(models_pyro.logistic_intercept, _logistic_args(y))
    else:
        model = PyroLatentModel(models_pyro.random_intercept, (torch.as_tensor(y),), closed_form=closed_form)
    return MISSO(model, **MISSO_OPTIONS, **extra).run(**run_options)


def _mc_data(n: int = 15, m: int = 4) -> np.ndarray:
    rng = np.random.default_rng(8)
    return 1.0 + 0.7 * rng.normal(size=(n, 1)) + 0.4 * rng.normal(size=(n, m))


def _mc_fit(y: np.ndarray, case: str, **run_options: object):
    import models_pyro
    import pyro

    import latentfit.pyro

    pyro.clear_param_store()
    if case in EM_CASES:
        name, extra = EM_CASES[case]
        engine = getattr(latentfit.pyro, name)(models_pyro.random_intercept, **EM_OPTIONS, **extra)
    else:
        engine = latentfit.pyro.MCMCSGD(models_pyro.random_intercept, **MC_OPTIONS, **MC_CASES[case])
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
        t, y = _data()
        shard = np.array_split(np.arange(len(t)), world)[rank]
        for engine in ENGINES:
            fit = _fit(t[shard], y[shard], engine, distributed=True)
            np.savez(Path(out) / f"{engine}-rank{rank}.npz", z=fit.state.z.numpy(), draws=fit.latent_draws,
                     objective=fit.history["objective"], acc=fit.history["acc.rw"],
                     **{f"param_{k}": np.asarray(v) for k, v in fit.params.items()})
        y = _mc_data()
        shard = np.array_split(np.arange(len(y)), world)[rank]
        for case in [*MC_CASES, *EM_CASES]:
            np.savez(Path(out) / f"mc-{case}-rank{rank}.npz", **_record(_mc_fit(y[shard], case, distributed=True)))
        np.savez(Path(out) / f"numeric-rank{rank}.npz", **_record(_numeric_fit(y[shard], distributed=True)))
        for case in MISSO_CASES:
            fit = _misso_fit(y[shard], case, distributed=True)
            np.savez(Path(out) / f"misso-{case}-rank{rank}.npz", **_record(fit))
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


PARAMS = ["param_mu", "param_omega", "param_sigma"]


def _assert_ranks_equal_one(one: dict, ranks: list, params: list[str] | None = None) -> None:
    """Every rank's estimates and whole history equal the one-process fit's to 1e-10."""
    for r in ranks:
        if params is not None:
            assert sorted(k for k in r.files if k.startswith("param_")) == params
        for name, value in one.items():
            if name.startswith(("param_", "hist_")):
                np.testing.assert_allclose(r[name], value, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("case", list(MC_CASES))
def test_mcmcsgd_two_processes_equal_one(two_processes: Path, case: str) -> None:
    y = _mc_data()
    one = _record(_mc_fit(y, case))
    ranks = [np.load(two_processes / f"mc-{case}-rank{r}.npz") for r in range(2)]
    _assert_ranks_equal_one(one, ranks)
    np.testing.assert_allclose(np.concatenate([r["z"] for r in ranks], 1), one["z"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.concatenate([r["draws"] for r in ranks], 2), one["draws"], rtol=0, atol=1e-10)
    assert np.all(one["hist_grad_norm2"][MC_OPTIONS["burn_in"]:] > 0)  # the gradient steps moved θ
    assert one["z"].shape[0] == 4  # saemix's ceil(50 / 15) chains, from the global number of units


@pytest.mark.parametrize("case", list(EM_CASES))
def test_monte_carlo_em_two_processes_equal_one(two_processes: Path, case: str) -> None:
    y = _mc_data()
    one = _record(_mc_fit(y, case))
    ranks = [np.load(two_processes / f"mc-{case}-rank{r}.npz") for r in range(2)]
    _assert_ranks_equal_one(one, ranks, PARAMS)
    # the chains [n, L, d] of the ranks' units, stacked, are the one-process chains
    np.testing.assert_allclose(np.concatenate([r["z"] for r in ranks], 0), one["z"], rtol=0, atol=1e-10)
    assert np.ptp(one["hist_theta.mu"]) > 0.05  # the estimates moved


def test_numeric_m_step_two_processes_equal_one(two_processes: Path) -> None:
    """SAEM whose every parameter has a numerical M-step (Newton on the complete-data log-likelihood): each process
    differentiates its units' sum, values, gradients and Hessians are all-reduced in float64, and both take the
    same steps; estimates, the whole history and the chains equal the one-process fit to 1e-10."""
    y = _mc_data()
    one = _record(_numeric_fit(y))
    ranks = [np.load(two_processes / f"numeric-rank{r}.npz") for r in range(2)]
    _assert_ranks_equal_one(one, ranks, PARAMS)
    np.testing.assert_allclose(np.concatenate([r["z"] for r in ranks], 1), one["z"], rtol=0, atol=1e-10)
    burn_in = NUMERIC_OPTIONS["burn_in"]
    for name in ("mu", "omega", "sigma"):  # the numerical steps moved every parameter from its initial value
        assert np.all(np.abs(one[f"hist_theta.{name}"][burn_in:] - one[f"hist_theta.{name}"][0]) > 1e-3), name


@pytest.mark.parametrize("case", list(MISSO_CASES))
def test_misso_two_processes_equal_one(two_processes: Path, case: str) -> None:
    """MISSO with ``rng="per_unit"``: each process advances its units' chains of the global mini-batch and keeps
    their stored surrogates; statistics, quadratic-surrogate gradients and anchors, curvature and Louis'
    informations are all-reduced in float64.  Estimates, the whole history and the chains == 1 process to 1e-10."""
    y = _mc_data()
    fit = _misso_fit(y, case)
    assert fit.engine.surrogate == ("bohning" if case in LOGISTIC_CASES else MISSO_CASES[case][1].get("surrogate",
                                                                                                      "louis"))
    one = _record(fit)
    ranks = [np.load(two_processes / f"misso-{case}-rank{r}.npz") for r in range(2)]
    names = ("mu", "omega", "beta") if case in LOGISTIC_CASES else ("mu", "omega", "sigma")
    _assert_ranks_equal_one(one, ranks, sorted(f"param_{n}" for n in names))
    np.testing.assert_allclose(np.concatenate([r["z"] for r in ranks], 0), one["z"], rtol=0, atol=1e-10)
    for name in names:  # every parameter moved
        assert np.ptp(one[f"hist_theta.{name}"]) > 1e-3, name


def test_mc_engines_need_per_unit_streams() -> None:
    import models_pyro

    from latentfit.pyro import MCMCSGD

    with pytest.raises(ValueError, match="needs rng='per_unit'"):
        MCMCSGD(models_pyro.random_intercept, **dict(MC_OPTIONS, rng="global")).run(torch.as_tensor(_mc_data()),
                                                                                 distributed=True)
    with pytest.raises(ValueError, match="rng must be one of"):
        MCMCSGD(models_pyro.random_intercept, **dict(MC_OPTIONS, rng="unit"))
    from latentfit.pyro import MCEM

    with pytest.raises(ValueError, match="MCEM / MiniBatchMCEM with rng='per_unit'"):
        MCEM(models_pyro.random_intercept, **dict(EM_OPTIONS, rng="global")).run(torch.as_tensor(_mc_data()),
                                                                                distributed=True)
    from latentfit.pyro import MISSO

    with pytest.raises(ValueError, match="TTSEM and MISSO too"):  # MISSO's draws on the global stream
        MISSO(models_pyro.random_intercept, **dict(MISSO_OPTIONS, rng="global")).run(torch.as_tensor(_mc_data()),
                                                                                    distributed=True)


JAX_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, sys.argv[1])
import models_numpyro
import latentfit.numpyro
from latentfit.inference.misso import MISSO
from latentfit.integrations.numpyro import NumPyroLatentModel

y = jnp.asarray(1.0 + 0.7 * np.random.default_rng(8).normal(size=(16, 1))
                + 0.4 * np.random.default_rng(9).normal(size=(16, 4)))
opts = json.loads(sys.argv[2])
out = {}


def fit(name, extra, devices):
    extra = dict(extra)
    if name == "MISSO" and extra.pop("logistic", False):  # a logistic intercept on the data's signs
        extra.pop("closed_form")
        model = NumPyroLatentModel(models_numpyro.logistic_intercept, (y - 1.0, (y > 1.0).astype(y.dtype)))
        return MISSO(model, **opts, **extra).run(jax.random.PRNGKey(3), devices=devices)
    if name == "MISSO":  # the adapter's model, its closed forms on or off (quadratic surrogates)
        model = NumPyroLatentModel(models_numpyro.random_intercept, (y,), closed_form=extra.pop("closed_form"))
        return MISSO(model, **opts, **extra).run(jax.random.PRNGKey(3), devices=devices)
    cls = getattr(latentfit.numpyro, name)
    return cls(models_numpyro.random_intercept, **opts, **extra).run(jax.random.PRNGKey(3), y, devices=devices)


def unit_tables(node, path=""):
    # every per-unit array of the state ([16, ...]): its shard's shape and the number of devices holding it
    if hasattr(node, "_fields"):
        node = node._asdict()
    if isinstance(node, dict):
        return {k: v for name, x in node.items() for k, v in unit_tables(x, f"{path}{name}.").items()}
    if hasattr(node, "sharding") and np.ndim(node) and np.shape(node)[0] == 16:
        return {path[:-1]: [list(node.sharding.shard_shape(node.shape)), len(node.sharding.device_set)]}
    return {}


for case, (name, extra) in json.loads(sys.argv[3]).items():
    one, two = fit(name, extra, None), fit(name, extra, 2)
    z = two.state.z
    out[case] = {
        "unit_tables": unit_tables(two.state),
        "params_diff": max(float(np.max(np.abs(np.asarray(one.params[k]) - np.asarray(two.params[k]))))
                           for k in one.params),
        # each record relative to its scale (at least 1): a squared gradient norm of 3e5 (Fisher scoring's first steps)
        # differs by a few ulps, 1e-10 absolute
        "history_diff": max(float(np.max(np.abs(np.asarray(one.history[k]) - np.asarray(two.history[k])))
                                  / max(1.0, float(np.max(np.abs(np.asarray(one.history[k])))))) for k
                            in one.history if k != "time"),
        "z_diff": float(np.max(np.abs(np.asarray(one.state.z) - np.asarray(z)))),
        "z_shard": list(z.sharding.shard_shape(z.shape)), "z_devices": len(z.sharding.device_set),
        "mu_range": float(np.ptp(np.asarray(one.history.get("theta.mu", [0.0])))),
        "grad_norm2_min": float(np.min(np.asarray(one.history.get("grad_norm2", [1.0]))[opts.get("burn_in", 0):])),
    }
print("RESULT" + json.dumps(out))
"""


def _two_jax_devices(options: dict, cases: dict) -> dict:
    """Run each ``{case: (engine name, options)}`` on one and on two host devices in a child process (NumPyro,
    ``random_intercept`` on 16 units; ``"MISSO"`` on the adapter's model with ``closed_form`` taken from the options);
    the child's comparison of the two fits, by case."""
    import json

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    opts = {k: v for k, v in options.items() if k != "seed"}
    proc = subprocess.run([sys.executable, "-c", JAX_CHILD, str(Path(__file__).parent), json.dumps(opts),
                           json.dumps(cases)], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])


@pytest.mark.slow
def test_mcmcsgd_two_jax_devices_equal_one() -> None:
    """``run(devices=2)`` (NumPyro): the chains ``[4, 16, 1]`` split 8 units per host device, the gradient's sum over
    units an all-reduce; estimates, history (relative to each record's scale) and chains equal the one-device fit to
    1e-10 (full batch, a mini-batch of 3, MALA with a mini-batch: its per-unit step sizes sharded too)."""
    out = _two_jax_devices(MC_OPTIONS, {case: ("MCMCSGD", extra) for case, extra in MC_CASES.items()})
    for case, res in out.items():
        assert res["params_diff"] < 1e-10 and res["history_diff"] < 1e-10 and res["z_diff"] < 1e-10, (case, res)
        assert res["z_devices"] == 2 and res["z_shard"] == [4, 8, 1], (case, res)
        assert res["grad_norm2_min"] > 0, case


@pytest.mark.slow
def test_monte_carlo_em_two_jax_devices_equal_one() -> None:
    """MCEM, MiniBatchMCEM and fiTTEM (TTSEM) with ``rng="per_unit"`` and ``devices=2`` (NumPyro): the chains
    ``[16, 3, 1]`` and the per-unit statistics tables split 8 units per device; estimates, the whole history and the
    chains equal the one-device fit to 1e-10."""
    out = _two_jax_devices(EM_OPTIONS, EM_CASES)
    for case, res in out.items():
        assert res["params_diff"] < 1e-10 and res["history_diff"] < 1e-10 and res["z_diff"] < 1e-10, (case, res)
        assert res["z_shard"] == [8, 3, 1] and res["mu_range"] > 0.05, (case, res)
    # fiTTEM's (and MiniBatchMCEM's) per-unit statistics table: 8 of the 16 rows on each device
    for case in ("TTSEM", "MiniBatchMCEM"):
        tables = out[case]["unit_tables"]
        assert {"memory.table.b.s1", "memory.table.y.rss", "z"} <= set(tables), (case, tables)
        assert all(shard[0] == 8 and devices == 2 for shard, devices in tables.values()), (case, tables)


#: which per-unit tables each MISSO case keeps (besides the chains ``z``): statistics rows (closed forms), the quadratic
#: surrogates' anchors and gradients (closed forms off), Louis' visit points
MISSO_TABLES = {"louis": {"memory.table.b.s1", "memory.table.y.rss", "memory.visited_at"},
                "paper-numeric": {"memory.anchor", "memory.grad"},
                "louis-numeric": {"memory.anchor", "memory.grad", "memory.visited_at"},
                "bohning": {"memory.curv_rows", "memory.lin_rows", "memory.grad", "memory.visited_at"}}
MISSO_TABLES["auto"] = MISSO_TABLES["bohning"]


@pytest.mark.slow
def test_misso_two_jax_devices_equal_one() -> None:
    """MISSO with ``rng="per_unit"`` and ``devices=2`` (NumPyro), both surrogates: every per-unit table (statistics
    rows, anchors, gradients, visit points) and the chains ``[16, 3, 1]`` split 8 units per device; estimates, the
    whole history and the chains equal the one-device fit to 1e-10."""
    cases = {case: ("MISSO", dict(extra, closed_form=closed_form, logistic=case in LOGISTIC_CASES))
             for case, (closed_form, extra) in MISSO_CASES.items()}
    out = _two_jax_devices(MISSO_OPTIONS, cases)
    for case, res in out.items():
        assert res["params_diff"] < 1e-10 and res["history_diff"] < 1e-10 and res["z_diff"] < 1e-10, (case, res)
        tables = res["unit_tables"]
        assert MISSO_TABLES[case] | {"z"} <= set(tables), (case, tables)
        assert all(shard[0] == 8 and devices == 2 for shard, devices in tables.values()), (case, tables)
        assert res["mu_range"] > 1e-3, (case, res)
