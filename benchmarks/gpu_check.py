"""GPU check: the engines on CUDA tensors against the same runs on the CPU, one table.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--n-nlme 20000] [--n-gmm 2000000] [--quick]

For each workload the script runs the CPU and the ``--device`` versions in the same process and prints the
wall time, the speed-up, where the estimates live (every tensor of the state must be on the data's device)
and the largest relative difference between the two estimates (the same seed gives different random
streams on different devices, so stochastic engines agree only within Monte-Carlo error; plain EM must agree
to rounding).  Workloads:

* NLME one-compartment oral model, N individuals × 10 observations: SAEM (torch fast path), f-SAEM, and the
  adaptive Gauss–Hermite log-likelihood of the fit;
* a Gaussian mixture (5 components, full covariances, 2-D): plain EM and FIEM epochs.

Without a GPU, ``--device cpu`` runs the same code path twice (a smoke run of the script itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from latentfit.inference.em import EM  # noqa: E402
from latentfit.inference.fiem import FIEM  # noqa: E402
from latentfit.inference.fsaem import FSAEM  # noqa: E402
from latentfit.inference.saem import SAEM  # noqa: E402
from latentfit.models import nlme  # noqa: E402
from latentfit.models.mixture import GaussianMixture  # noqa: E402

TRUTH = dict(ka=1.0, V=8.0, CL=0.8, omega2_ka=0.16, omega2_V=0.09, omega2_CL=0.09, a=0.5)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _devices_of(state) -> set[str]:
    out: set[str] = set()

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.add(v.device.type)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(state)
    return out


def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        x, y = np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float)
        worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))))
    return worst


def _timed(fn, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def nlme_rows(n: int, device: str, num_iters) -> list[tuple]:
    times = [0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24]
    gen = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, data=nlme.design_table(n, times))
    df = gen.simulate({k: torch.tensor(v, dtype=torch.float64) for k, v in TRUTH.items()}, seed=0)
    rows = []
    for name, cls in (("SAEM", SAEM), ("f-SAEM", FSAEM)):
        res = {}
        for dev in ("cpu", device):
            model = nlme.NLME("one_compartment_oral", {"ka": 2.0, "V": 15.0, "CL": 1.5}, data=df, device=dev)
            seconds, fit = _timed(lambda m=model, c=cls: c(m, num_iters, seed=0, progress=False).run(), dev)
            res[dev] = (seconds, fit)
        (t_cpu, f_cpu), (t_dev, f_dev) = res["cpu"], res[device]
        rows.append((f"NLME N={n}x10", name, t_cpu, t_dev, _devices_of(f_dev.state), _max_rel(f_dev.params,
                                                                                               f_cpu.params)))
        if name == "SAEM":
            t_c, ll_c = _timed(lambda f=f_cpu: f.log_likelihood("gq", num_nodes=7), "cpu")
            f_dev._cache.pop("loglik", None)  # (--device cpu: the same fit object; time it again)
            t_d, ll_d = _timed(lambda f=f_dev: f.log_likelihood("gq", num_nodes=7), device)
            rows.append((f"NLME N={n}x10", "log-lik, adaptive GQ (7^3)", t_c, t_d, {device.split(':')[0]},
                         abs(ll_d - ll_c) / abs(ll_c)))
    return rows


def gmm_rows(n: int, device: str, epochs: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    locs = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0], [2.0, 2.0]])
    x = locs[rng.choice(5, n, p=[0.3, 0.25, 0.2, 0.15, 0.1])] + rng.normal(size=(n, 2))
    rows = []
    for name, make in (("EM", lambda gm: EM(gm, num_epochs=epochs, progress=False)),
                       ("FIEM", lambda gm: FIEM(gm, num_epochs=epochs, batch_size=max(n // 10, 1), progress=False,
                                                seed=0))):
        res = {}
        for dev in ("cpu", device):
            data = torch.tensor(x, device=dev)
            seconds, fit = _timed(lambda d=data, mk=make: mk(GaussianMixture(d, 5, "full", seed=0)).run(), dev)
            res[dev] = (seconds, fit)
        (t_cpu, f_cpu), (t_dev, f_dev) = res["cpu"], res[device]
        rows.append((f"GMM n={n}, K=5", f"{name}, {epochs} epochs", t_cpu, t_dev, _devices_of(f_dev.state),
                     _max_rel(f_dev.params, f_cpu.params)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None, help="default: cuda when visible, else the script says so and exits")
    ap.add_argument("--n-nlme", type=int, default=20_000)
    ap.add_argument("--n-gmm", type=int, default=2_000_000)
    ap.add_argument("--quick", action="store_true", help="small sizes and few iterations (smoke run)")
    args = ap.parse_args()
    if args.device is None:
        if not torch.cuda.is_available():
            print("no CUDA device visible to torch: GPU check skipped (--device cpu runs a smoke test of the script)")
            return
        args.device = "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch; rerun with --device cpu for a smoke run")
    num_iters = (20, 10) if args.quick else (300, 100)
    n_nlme, n_gmm = (500, 20_000) if args.quick else (args.n_nlme, args.n_gmm)
    rows = nlme_rows(n_nlme, args.device, num_iters) + gmm_rows(n_gmm, args.device, 3 if args.quick else 20)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"\ntorch {torch.__version__}; device {args.device} ({name}); CPU threads {torch.get_num_threads()}")
    print(f"{'workload':<22}{'engine':<30}{'cpu (s)':>10}{'device (s)':>12}{'speed-up':>10}{'state on':>12}"
          f"{'max rel diff':>14}")
    for data, engine, t_cpu, t_dev, where, diff in rows:
        print(f"{data:<22}{engine:<30}{t_cpu:10.2f}{t_dev:12.2f}{t_cpu / t_dev:9.1f}x{','.join(sorted(where)):>12}"
              f"{diff:14.2e}")
    print("(state on: devices of every tensor in the engine's final state; max rel diff: largest relative difference "
          "between the device and CPU estimates; stochastic engines agree within Monte-Carlo error only)")


if __name__ == "__main__":
    main()
