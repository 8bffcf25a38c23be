"""TTSEM Gaussian-mixture experiment (Karimi & Li, "Two-timescale stochastic EM algorithms", 2021).

Mixture of two unit-variance Gaussians (weights 0.2/0.8 fixed, means ±0.5 estimated, start ±1),
n = 1e5, M = 10 Monte-Carlo draws per unit visit (exact posterior draws of the labels).  Prints
``|μ − μ*|²`` (μ* = EM to convergence) at fractions of the first epoch and at the end of every epoch for
SAEM (batch, γ_k = k^(−1/2) from k = 2), iSAEM, vrTTEM and fiTTEM (γ_t = 1 for 10 iterations then
(t − 10)^(−1/2), ρ = (n/b)^(−2/3)).  The paper visits one unit per iteration; the default here is
mini-batches of b = 100 (1,000 iterations per epoch) to keep the run short on CPU — pass ``--batch 1``
for the paper's setting.

Usage: ``python benchmarks/ttsem_gmm.py [--n 100000] [--epochs 5] [--batch 100] [--samples 10]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentfit.inference.em import EM
from latentfit.inference.ttsem import TTSEM
from latentfit.models.mixture import GaussianMixture


def model(x: np.ndarray) -> GaussianMixture:
    return GaussianMixture(x, 2, "spherical", weights=[0.2, 0.8], locs=[-1.0, 1.0], covariances=[1.0, 1.0],
                           fixed=("weights", "covariances"), reg_covar=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=args.n) + np.where(rng.random(args.n) < 0.2, -0.5, 0.5)
    mu_star = EM(model(x), num_epochs=3000, progress=False).run().params["locs"].reshape(2)
    fracs = [0.1, 0.25, 0.5, 0.75, 1.0]
    runs = [("SAEM", dict(variant="saem", gamma_burn=1)),
            ("iSAEM", dict(variant="isaem", batch_size=args.batch)),
            ("vrTTEM", dict(variant="vr", batch_size=args.batch)),
            ("fiTTEM", dict(variant="fi", batch_size=args.batch))]
    print(f"n={args.n}, M={args.samples} MC draws, batch={args.batch}, mu*={np.round(mu_star, 4)}")
    cols = [f"ep {f:g}" for f in fracs] + [f"ep {e}" for e in range(2, args.epochs + 1)]
    print(f"{'engine':8s} " + " ".join(f"{c:>9s}" for c in cols) + "   s/epoch")
    for label, kw in runs:
        t0 = time.perf_counter()
        fit = TTSEM(model(x), num_epochs=args.epochs, num_samples=args.samples, seed=args.seed,
                    trace_params=["locs"], progress=False, **kw).run()
        per_epoch = (time.perf_counter() - t0) / args.epochs
        tr = fit.history["inner.locs"].reshape(args.epochs, -1, 2)  # [epochs, m, 2]
        m = tr.shape[1]
        err = ((tr - mu_star) ** 2).sum(-1)
        vals = [err[0, max(0, int(round(f * m)) - 1)] for f in fracs] + [err[e, -1] for e in range(1, args.epochs)]
        print(f"{label:8s} " + " ".join(f"{v:9.2e}" for v in vals) + f"   {per_epoch:.2f}")
    print("|mu - mu*|^2 after the given fraction of epochs (one run; SAEM makes one iteration per epoch)")


if __name__ == "__main__":
    main()
