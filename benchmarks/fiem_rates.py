"""FIEM rates (Karimi, Wai, Moulines & Lavielle, NeurIPS 2019, GMM experiment): iterations to precision vs n.

Model: 1-D mixture of two unit-variance Gaussians, weights (0.2, 0.8) and σ = 1 fixed, means
estimated (truth ±0.5, start ±1) — the reference code's GMM.  For each n, μ* is EM run to
convergence; we count the iterations (unit visits, batch size 1; one EM iteration = n) until
``|μ − μ*|² < 1e-3`` for iEM, sEM-VR, FIEM and EM, print the table and the least-squares growth exponent
of log(iterations) against log(n) (theory / paper: iEM ∝ n, sEM-VR and FIEM ∝ n^(2/3), EM ∝ n).

Counts are read from the per-iteration θ trace (``trace_params``); each engine is driven epoch by epoch
through its own ``init``/``step`` and stopped at the first epoch that reaches the precision.  The initial
full pass that every incremental engine makes (ŝ⁰ = s̄(θ⁰)) is not counted, as in the paper.  iEM visits units in a fresh
random permutation each epoch.  Usage: ``python benchmarks/fiem_rates.py [--ns 1000 10000 100000] [--reps 1]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.inference.iem import IEM
from latentfit.inference.semvr import SEMVR
from latentfit.models.mixture import GaussianMixture

PRECISION = 1e-3


def model(x: np.ndarray) -> GaussianMixture:
    return GaussianMixture(x, 2, "spherical", weights=[0.2, 0.8], locs=[-1.0, 1.0], covariances=[1.0, 1.0],
                           fixed=("weights", "covariances"), reg_covar=0.0)


def simulate(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.random(n) < 0.2
    return rng.normal(size=n) + np.where(lab, -0.5, 0.5)


def run_until_precision(cls, gm: GaussianMixture, mu_star: np.ndarray, seed: int, max_epochs: int) -> float:
    """Drive the engine epoch by epoch (its own init/step) and stop at the first epoch that reaches
    the precision; return the number of unit visits (batch size 1) to get there."""
    eng = cls(gm, num_epochs=max_epochs, batch_size=1, seed=seed, trace_params=["locs"], progress=False)
    n = gm.num_units
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state = eng.init(None)
        for k in range(1, max_epochs + 1):
            state, info = eng.step(state, k, "epoch")
            tr = info.inner["locs"].numpy().reshape(-1, 2)
            err = ((tr - mu_star.reshape(1, 2)) ** 2).sum(1)
            hit = np.nonzero(err < PRECISION)[0]
            if hit.size:
                return float((k - 1) * n + hit[0] + 1)
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table: dict[str, list[float]] = {k: [] for k in ("iEM", "sEM-VR", "FIEM", "EM")}
    timing: dict[str, float] = {k: 0.0 for k in table}
    for n in args.ns:
        counts: dict[str, list[float]] = {k: [] for k in table}
        for rep in range(args.reps):
            x = simulate(n, seed=rep)
            em = EM(model(x), num_epochs=3000, progress=False).run()
            mu_star = em.params["locs"]
            err = ((em.history["theta.locs"].reshape(-1, 2) - mu_star.reshape(1, 2)) ** 2).sum(1)
            counts["EM"].append(float((np.nonzero(err < PRECISION)[0][0] + 1) * n))
            for label, cls in (("iEM", IEM), ("sEM-VR", SEMVR), ("FIEM", FIEM)):
                t0 = time.perf_counter()
                counts[label].append(run_until_precision(cls, model(x), mu_star, rep, max_epochs=12))
                timing[label] += time.perf_counter() - t0
        for k in table:
            table[k].append(float(np.nanmean(counts[k])))
        print(f"n={n}: " + ", ".join(f"{k} {table[k][-1]:.0f}" for k in table), flush=True)
    print(f"\niterations (batch size 1) to |mu - mu*|^2 < {PRECISION:g}, mean over {args.reps} rep(s)")
    print(f"{'n':>8s} " + " ".join(f"{k:>10s}" for k in table))
    for i, n in enumerate(args.ns):
        print(f"{n:8d} " + " ".join(f"{table[k][i]:10.0f}" for k in table))
    if len(args.ns) > 1:
        logn = np.log(np.array(args.ns, dtype=float))
        print("growth exponent (slope of log iterations vs log n; goal iEM ~ 1, FIEM and sEM-VR ~ 2/3):")
        for k in table:
            y = np.log(np.array(table[k]))
            ok = np.isfinite(y)
            slope = np.polyfit(logn[ok], y[ok], 1)[0] if ok.sum() > 1 else float("nan")
            print(f"  {k:8s} {slope:.2f}")
    print("wall time of the incremental runs (s): " + ", ".join(f"{k} {timing[k]:.1f}" for k in timing if k != "EM"))


if __name__ == "__main__":
    main()
