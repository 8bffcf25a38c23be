"""SAEM per-iteration time: Pyro (torch) vs NumPyro (JAX, compiled), same model, same options, and the plain
Pyro model written in the tutorials' style against the NLME fast path.

Two problems: the theophylline study (N = 12) and N simulated individuals (default 5000) of the same
one-compartment model (10 samples each).  For each backend the table gives the set-up time (tracing
and the first simulation), the JAX compile time (reported apart: it is paid once per fit), and the
steady-state time per SAEM iteration; the last column is the Pyro / NumPyro ratio of the latter.
A second table times three torch paths on the same data: the padded ``[N, T]`` Pyro model
(``latentfit/examples/theophylline.py``), the README's model (latents in a subject plate, one row per
observation read through ``log_psi[subject]``) and the NLME family's fast path, with the ratio of each
plain model's time per iteration to the NLME path's.
Timings on a shared machine are noisy: rerun with ``--repeats`` and read the medians.

    python benchmarks/backends.py [--iters 100] [--n-sim 5000] [--repeats 1] [--float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np


def simulate(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """N individuals of the theophylline model at the saemix estimates, 10 samples in 0.25–24 h."""
    rng = np.random.default_rng(seed)
    times = np.array([0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 12.0, 24.0])
    time_ = np.tile(times, (n, 1))
    dose = rng.uniform(250.0, 350.0, size=(n, 1))
    mu = np.log([1.55, 31.5, 2.75])
    omega = np.sqrt([0.4, 0.015, 0.08])
    log_psi = mu + omega * rng.standard_normal((n, 3))
    ka, v, cl = np.exp(log_psi).T
    k = cl / v
    pred = dose * (ka / (v * (ka - k)))[:, None] * (np.exp(-k[:, None] * time_) - np.exp(-ka[:, None] * time_))
    conc = pred + 0.74 * rng.standard_normal(pred.shape)
    return {"dose": dose, "time": time_, "conc": conc, "mask": np.ones_like(conc, dtype=bool)}


def theophylline_numpy() -> dict[str, np.ndarray]:
    from latentfit.examples.theophylline import theophylline_arrays

    return {k: v.numpy() for k, v in theophylline_arrays().items()}


def run_pyro(data: dict[str, np.ndarray], num_iters: tuple[int, int], seed: int) -> dict[str, float]:
    import pyro
    import torch

    from latentfit.examples.theophylline import theophylline_model
    from latentfit.pyro import SAEM

    pyro.clear_param_store()
    args = {k: torch.as_tensor(v) if v.dtype == bool else torch.as_tensor(v, dtype=torch.float64)
            for k, v in data.items()}
    t0 = time.perf_counter()
    fit = SAEM(theophylline_model, num_iters=num_iters, seed=seed, progress=False).run(**args)
    total = time.perf_counter() - t0
    iters = fit.num_iterations
    loop = fit.elapsed - fit.init_time
    return {"setup": total - loop, "compile": 0.0, "per_iter": loop / iters, "total": total,
            "ka": float(np.exp(fit.params["mu"][0]))}


def rows_model(subject, time, dose, conc=None):
    """The README's model: latents in a subject plate, rows reading ``log_psi[subject]``."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    mu = pyro.param("mu", torch.tensor([0.0, 3.0, -0.7]))
    omega = pyro.param("omega", torch.ones(3), constraint=constraints.positive)
    a = pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("id", int(subject.max()) + 1):
        log_psi = pyro.sample("log_psi", dist.Normal(mu, omega).to_event(1))
    ka, v, cl = log_psi[subject].exp().unbind(-1)
    k = cl / v
    pred = dose * ka / (v * (ka - k)) * (torch.exp(-k * time) - torch.exp(-ka * time))
    with pyro.plate("obs", len(time)):
        pyro.sample("conc", dist.Normal(pred, a), obs=conc)


def run_pyro_rows(data: dict[str, np.ndarray], num_iters: tuple[int, int], seed: int) -> dict[str, float]:
    import pyro
    import torch

    from latentfit.pyro import SAEM

    pyro.clear_param_store()
    n, t = data["time"].shape
    m = data["mask"].reshape(-1)
    subject = torch.as_tensor(np.repeat(np.arange(n), t)[m])
    time_ = torch.as_tensor(data["time"].reshape(-1)[m])
    dose = torch.as_tensor(np.repeat(data["dose"][:, 0], t)[m])
    conc = torch.as_tensor(data["conc"].reshape(-1)[m])
    t0 = time.perf_counter()
    fit = SAEM(rows_model, num_iters=num_iters, seed=seed, progress=False).run(subject, time_, dose, conc)
    total = time.perf_counter() - t0
    loop = fit.elapsed - fit.init_time
    return {"setup": total - loop, "compile": 0.0, "per_iter": loop / fit.num_iterations, "total": total,
            "ka": float(np.exp(fit.params["mu"][0]))}


def run_nlme(data: dict[str, np.ndarray], num_iters: tuple[int, int], seed: int) -> dict[str, float]:
    import pandas as pd

    from latentfit.inference.saem import SAEM
    from latentfit.models import nlme

    n, t = data["time"].shape
    m = data["mask"].reshape(-1)
    df = pd.DataFrame({"ID": np.repeat(np.arange(1, n + 1), t)[m], "TIME": data["time"].reshape(-1)[m],
                       "DV": data["conc"].reshape(-1)[m], "DOSE": np.repeat(data["dose"][:, 0], t)[m]})
    t0 = time.perf_counter()
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, dose="DOSE")
    fit = SAEM(model, num_iters, seed=seed, progress=False).run()
    total = time.perf_counter() - t0
    loop = fit.elapsed - fit.init_time
    return {"setup": total - loop, "compile": 0.0, "per_iter": loop / fit.num_iterations, "total": total,
            "ka": float(fit.params["ka"]) if "ka" in fit.params else float("nan")}


def run_numpyro(data: dict[str, np.ndarray], num_iters: tuple[int, int], seed: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from latentfit.examples.theophylline_numpyro import theophylline_model
    from latentfit.numpyro import SAEM

    dtype = jnp.result_type(float)
    args = {k: jnp.asarray(v) if v.dtype == bool else jnp.asarray(v, dtype=dtype) for k, v in data.items()}
    t0 = time.perf_counter()
    fit = SAEM(theophylline_model, num_iters=num_iters, progress=False).run(jax.random.PRNGKey(seed), **args)
    total = time.perf_counter() - t0
    compile_s = fit.model.ops.compile_time
    loop = fit.elapsed - fit.init_time - compile_s
    return {"setup": total - loop - compile_s, "compile": compile_s, "per_iter": loop / fit.num_iterations,
            "total": total, "ka": float(np.exp(fit.params["mu"][0]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="SAEM iterations per fit (K1 = 0.8 of them)")
    parser.add_argument("--theo-iters", type=int, default=400, help="iterations on theophylline (300, 100)")
    parser.add_argument("--n-sim", type=int, default=5000, help="simulated individuals")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--float32", action="store_true", help="JAX in float32 (default float64, as torch)")
    opts = parser.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", not opts.float32)
    problems = [("theophylline", theophylline_numpy(), (int(0.75 * opts.theo_iters), opts.theo_iters
                                                         - int(0.75 * opts.theo_iters))),
                (f"simulated N={opts.n_sim}", simulate(opts.n_sim), (int(0.8 * opts.iters),
                                                                     opts.iters - int(0.8 * opts.iters)))]
    print(f"SAEM, kernels (2,2,2), default chains; torch {_version('torch')} eager vs JAX {jax.__version__} "
          f"{'float32' if opts.float32 else 'float64'} compiled; cpu count {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy)")
    header = f"{'problem':<22}{'iters':>6}{'backend':>9}{'setup s':>9}{'compile s':>11}{'ms/iter':>10}{'ka':>8}"
    print(header + f"{'pyro/numpyro':>14}")
    print("-" * (len(header) + 14))
    for name, data, num_iters in problems:
        res = {}
        for backend, runner in (("pyro", run_pyro), ("numpyro", run_numpyro)):
            runs = [runner(data, num_iters, seed) for seed in range(opts.repeats)]
            res[backend] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        ratio = res["pyro"]["per_iter"] / res["numpyro"]["per_iter"]
        for backend in ("pyro", "numpyro"):
            r = res[backend]
            line = (f"{name:<22}{sum(num_iters):>6}{backend:>9}{r['setup']:>9.2f}{r['compile']:>11.2f}"
                    f"{1000 * r['per_iter']:>10.2f}{r['ka']:>8.3f}")
            print(line + (f"{ratio:>14.1f}" if backend == "numpyro" else ""))
        # a second fit of the same-shaped model in this process (another seed): compiled programs are reused
        r = run_numpyro(data, num_iters, opts.repeats)
        print(f"{name:<22}{sum(num_iters):>6}{'2nd fit':>9}{r['setup']:>9.2f}{r['compile']:>11.2f}"
              f"{1000 * r['per_iter']:>10.2f}{r['ka']:>8.3f}   (NumPyro, same process; total {r['total']:.2f} s "
              f"against {res['numpyro']['total']:.2f} s)")
        sys.stdout.flush()
    print()
    header = f"{'problem':<22}{'iters':>6}{'torch path':>24}{'total s':>9}{'ms/iter':>10}{'ka':>8}{'/ NLME':>8}"
    print(header)
    print("-" * len(header))
    for name, data, num_iters in problems:
        res = {}
        for label, runner in (("padded Pyro model", run_pyro), ("README Pyro model (rows)", run_pyro_rows),
                              ("NLME fast path", run_nlme)):
            runs = [runner(data, num_iters, seed) for seed in range(opts.repeats)]
            res[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        base = res["NLME fast path"]["per_iter"]
        for label, r in res.items():
            print(f"{name:<22}{sum(num_iters):>6}{label:>24}{r['total']:>9.2f}{1000 * r['per_iter']:>10.2f}"
                  f"{r['ka']:>8.3f}{r['per_iter'] / base:>8.1f}")
        sys.stdout.flush()


def _version(mod: str) -> str:
    import importlib

    return importlib.import_module(mod).__version__


if __name__ == "__main__":
    main()
