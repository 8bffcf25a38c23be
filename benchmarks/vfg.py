"""VFG imputation on the paper's synthetic set (Ren, Karimi, Li & Li 2022): VFG vs column mean, KNN(5),
IterativeImputer and MICE (5 × IterativeImputer(sample_posterior=True), imputations averaged).

Data: ``x1 = x2 = z1``, ``x3 = x4 = 2 sin z1``, ``x5 = x6 = z2``, ``x7 = x8 = z2²``, ``z1 ~ N(0, 1)``,
``z2 ~ N(1, 2²)``; per set ``--train`` training rows (complete) and ``--test`` test rows with x3, x4, x7,
x8 missing; MSE over the missing entries, mean ± sd over ``--sets`` sets, and seconds per set (fit +
transform).  VFG: tree ``[[[0,1],[2,3]],[[4,5],[6,7]]]``, 4 affine coupling blocks per edge (width 64),
nodes padded to 4 coordinates, masking (Alg. 2) on.

Usage: ``python benchmarks/vfg.py [--sets 10] [--train 1000] [--test 300] [--epochs 150] [--backend torch]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from latentfit.models.vfg import SYNTHETIC_MISSING, SYNTHETIC_STRUCTURE, VFG, synthetic_imputation_data


def methods(args: argparse.Namespace) -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer

    def vfg(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        fit = VFG(SYNTHETIC_STRUCTURE, backend=args.backend, masking=True, min_dim=4).fit(
            tr, num_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=0, progress=False)
        out = fit.impute(te)
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out)

    def mice(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        # x1 = x2 exactly: a 1e-6 jitter keeps BayesianRidge's posterior sd > 0 (else truncnorm raises)
        trj = tr + 1e-6 * np.random.default_rng(0).standard_normal(tr.shape)
        return np.mean([IterativeImputer(sample_posterior=True, random_state=s).fit(trj).transform(te)
                        for s in range(5)], 0)

    return {
        "VFG": vfg,
        "mean": lambda tr, te: SimpleImputer().fit(tr).transform(te),
        "KNN(5)": lambda tr, te: KNNImputer(n_neighbors=5).fit(tr).transform(te),
        "IterativeImputer": lambda tr, te: IterativeImputer(random_state=0).fit(tr).transform(te),
        "MICE (5×)": mice,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", type=int, default=10)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="torch", choices=["torch", "jax"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ms = methods(args)
    mse: dict[str, list[float]] = {k: [] for k in ms}
    secs: dict[str, list[float]] = {k: [] for k in ms}
    for s in range(args.sets):
        x = synthetic_imputation_data(args.train + args.test, seed=1000 + s)
        tr, te = x[: args.train], x[args.train:]
        te_nan = te.copy()
        te_nan[:, SYNTHETIC_MISSING] = np.nan
        for name, f in ms.items():
            t0 = time.perf_counter()
            imp = f(tr, te_nan)
            secs[name].append(time.perf_counter() - t0)
            mse[name].append(float(((imp - te)[:, SYNTHETIC_MISSING] ** 2).mean()))
        print(f"set {s + 1}/{args.sets}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in mse.items()), flush=True)
    print(f"\n{args.sets} sets × ({args.train} train + {args.test} test), MSE on x3, x4, x7, x8 (VFG: {args.backend}, "
          f"{args.epochs} epochs)\n")
    print(f"| {'method':<18} | {'MSE mean':>9} | {'MSE sd':>8} | {'s / set':>8} |")
    print(f"|{'-' * 20}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for k in ms:
        print(f"| {k:<18} | {np.mean(mse[k]):9.3f} | {np.std(mse[k]):8.3f} | {np.mean(secs[k]):8.2f} |")


if __name__ == "__main__":
    main()
