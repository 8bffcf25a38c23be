"""VFG imputation benchmarks (Ren, Karimi, Li & Li 2022; issue 12), printed tables, peers in the same process.

1. ``synthetic``: the paper's set, ``x1 = x2 = z1``, ``x3 = x4 = 2 sin z1``, ``x5 = x6 = z2``, ``x7 = x8 = z2²``,
   ``z1 ~ N(0, 1)``, ``z2 ~ N(1, 2²)``; per set 1000 complete training rows and 300 test rows with x3, x4, x7,
   x8 missing; MSE over the missing entries (mean ± sd over sets) and seconds per set (fit + transform).
   VFG: tree ``[[[0,1],[2,3]],[[4,5],[6,7]]]``, 4 affine coupling blocks per edge (width 64), nodes padded
   to 4 coordinates, 80 % Alg. 2 masked steps, β = 0.1.  Peers: column mean, ``KNNImputer(5)``,
   ``IterativeImputer`` and MICE (5 × ``IterativeImputer(sample_posterior=True)``, averaged).
2. ``network``: the linear Gaussian Bayesian network of the issue (7 nodes, 5000 rows, F missing in the last
   500); VFG on the known DAG (one aggregation node per family, A, B, D shared; nodes padded to 4
   coordinates, 2 coupling blocks of width 32, every step an Alg. 2 masked step dropping about one section,
   β = 0.01); standardised MSE (MSE / Var F) next to the noise floor, the exact conditional ``E[F | rest]``.
3. ``sklearn``: 20 % MCAR on ``load_diabetes`` and ``load_breast_cancer``; standardised MSE (each column
   divided by its sd) over the masked entries, and seconds; ``VFGImputer`` (one section per column).

Quick by default (fewer epochs/sets: this runs on a shared machine); ``--full`` uses the paper's sizes
(10 synthetic sets, 150 epochs).  Usage: ``python benchmarks/vfg.py [--part all|synthetic|network|sklearn]
[--full] [--sets N] [--epochs N] [--backend torch|jax]``.

Measured (torch, one thread, fits drawing from their own generator; shared 2-core machine at load 5-8; MSE, in
brackets wall seconds per set or data set):

* ``--part synthetic --full`` (16.6 min wall, roughly 7 CPU-minutes): VFG 0.123 ± 0.038 (84 s), KNN(5) 0.328 ± 0.171,
  IterativeImputer 5e16-5e25 (diverges), MICE 24.6 ± 3.5 and mean 24.6 ± 3.5; VFG below KNN on 9 of 10 sets (set 10:
  0.1379 against 0.1375).  Before the stream change: VFG 0.114 ± 0.065.
* ``--part all`` (67 s CPU, 2.2 min wall): network VFG 0.00262 (29 s) = 1.58× the floor 0.00166, KNN 0.00468,
  IterativeImputer 0.00166; diabetes VFG 0.764 (6 s), KNN 0.691, IterativeImputer 0.579, mean 0.989;
  breast_cancer VFG 0.504 (33 s), KNN 0.853, IterativeImputer 0.174, mean 1.119; synthetic 2 sets × 60 epochs
  VFG 0.242 ± 0.041 (27 s), KNN 0.264 ± 0.019.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from latentfit.models.vfg import (
    GAUSSIAN_NETWORK_DAG,
    SYNTHETIC_MISSING,
    SYNTHETIC_STRUCTURE,
    VFG,
    VFGImputer,
    gaussian_network_conditional_f,
    gaussian_network_data,
    synthetic_imputation_data,
)

Imputer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train with NaN, test with NaN) -> imputed test


def _np(a: object) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def peers() -> dict[str, Imputer]:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer

    def mice(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        # exact duplicate columns (x1 = x2): a 1e-6 jitter keeps BayesianRidge's posterior sd > 0
        trj = tr + 1e-6 * np.random.default_rng(0).standard_normal(tr.shape)
        return np.mean([IterativeImputer(sample_posterior=True, random_state=s).fit(trj).transform(te)
                        for s in range(5)], 0)

    return {
        "mean": lambda tr, te: SimpleImputer().fit(tr).transform(te),
        "KNN(5)": lambda tr, te: KNNImputer(n_neighbors=5).fit(tr).transform(te),
        "IterativeImputer": lambda tr, te: IterativeImputer(random_state=0, max_iter=10).fit(tr).transform(te),
        "MICE (5×)": mice,
    }


def _table(title: str, rows: dict[str, tuple[float, float, float]], col: str = "MSE") -> None:
    print(f"\n{title}\n")
    print(f"| {'method':<22} | {col + ' mean':>12} | {col + ' sd':>10} | {'s':>8} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 12}|{'-' * 10}|")
    for k, (m, sd, t) in rows.items():
        print(f"| {k:<22} | {m:12.4g} | {sd:10.3g} | {t:8.2f} |")


def synthetic(args: argparse.Namespace) -> None:
    epochs = args.epochs or (150 if args.full else 60)
    sets = args.sets or (10 if args.full else 2)

    def vfg(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        fit = VFG(SYNTHETIC_STRUCTURE, backend=args.backend, masking=0.8, beta=0.1, min_dim=4).fit(
            tr, num_epochs=epochs, batch_size=128, learning_rate=3e-3, seed=0, progress=False)
        return _np(fit.impute(te))

    ms = {"VFG": vfg, **peers()}
    mse: dict[str, list[float]] = {k: [] for k in ms}
    secs: dict[str, list[float]] = {k: [] for k in ms}
    for s in range(args.first_set, args.first_set + sets):
        x = synthetic_imputation_data(1300, seed=1000 + s)
        tr, te = x[:1000], x[1000:]
        te_nan = te.copy()
        te_nan[:, SYNTHETIC_MISSING] = np.nan
        for name, f in ms.items():
            t0 = time.perf_counter()
            imp = f(tr, te_nan)
            secs[name].append(time.perf_counter() - t0)
            mse[name].append(float(((imp - te)[:, SYNTHETIC_MISSING] ** 2).mean()))
        print(f"set {s + 1} (seed {1000 + s}): " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in mse.items()), flush=True)
    _table(f"Synthetic set: {sets} sets × (1000 train + 300 test), MSE on x3, x4, x7, x8 (VFG {args.backend}, "
           f"{epochs} epochs)", {k: (float(np.mean(mse[k])), float(np.std(mse[k])), float(np.mean(secs[k])))
                                 for k in ms})


def network(args: argparse.Namespace) -> None:
    epochs = args.epochs or (60 if args.full else 30)
    x = gaussian_network_data(5000, seed=0)
    xm = x.copy()
    xm[4500:, 5] = np.nan
    te = x[4500:, 5]
    var = float(x[:, 5].var())
    rows: dict[str, tuple[float, float, float]] = {}
    t0 = time.perf_counter()
    floor = float(((gaussian_network_conditional_f(x[4500:]) - te) ** 2).mean()) / var
    rows["exact E[F | rest]"] = (floor, 0.0, time.perf_counter() - t0)
    t0 = time.perf_counter()
    fit = VFG(GAUSSIAN_NETWORK_DAG, backend=args.backend, hidden=32, blocks=2, min_dim=4, masking=1.0,
              mask_drop=0.01, beta=args.network_beta).fit(xm, num_epochs=epochs, batch_size=256, learning_rate=1e-2,
                                                          seed=0, progress=False)
    imp = _np(fit.impute(xm))[4500:, 5]
    rows["VFG (known DAG)"] = (float(((imp - te) ** 2).mean()) / var, 0.0, time.perf_counter() - t0)
    for name, f in peers().items():
        if name == "MICE (5×)":
            continue
        t0 = time.perf_counter()
        imp = f(xm, xm)[4500:, 5]
        rows[name] = (float(((imp - te) ** 2).mean()) / var, 0.0, time.perf_counter() - t0)
    _table(f"Linear Gaussian network (5000 rows, F missing in the last 500), MSE / Var F (VFG {epochs} epochs, "
           f"β = {args.network_beta}; VFG/floor = {rows['VFG (known DAG)'][0] / floor:.2f})", rows, "std MSE")


def bundled(args: argparse.Namespace) -> None:
    from sklearn.datasets import load_breast_cancer, load_diabetes

    epochs = args.epochs or (200 if args.full else 20)
    for name, loader in (("diabetes", load_diabetes), ("breast_cancer", load_breast_cancer)):
        x = loader().data.astype(np.float64)
        rng = np.random.default_rng(0)
        miss = rng.random(x.shape) < 0.2
        miss[miss.all(1), 0] = False  # keep one entry in a row that lost all
        xm = np.where(miss, np.nan, x)
        sd = x.std(0)

        def vfg(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
            return VFGImputer(backend=args.backend, min_dim=4, num_epochs=epochs, batch_size=128).fit(tr).transform(te)

        rows: dict[str, tuple[float, float, float]] = {}
        for k, f in {"VFG (VFGImputer)": vfg, **peers()}.items():
            if k == "MICE (5×)":
                continue
            t0 = time.perf_counter()
            imp = f(xm, xm)
            err = ((imp - x) / sd)[miss] ** 2
            rows[k] = (float(err.mean()), 0.0, time.perf_counter() - t0)
        _table(f"{name} ({x.shape[0]} × {x.shape[1]}), 20 % MCAR, standardised MSE on the masked entries "
               f"(VFG {epochs} epochs)", rows, "std MSE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="all", choices=["all", "synthetic", "network", "sklearn"])
    p.add_argument("--full", action="store_true", help="the paper's sizes (slow)")
    p.add_argument("--sets", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--first-set", type=int, default=0, help="synthetic: index of the first set (seed 1000 + i)")
    p.add_argument("--network-beta", type=float, default=0.01)
    p.add_argument("--backend", default="torch", choices=["torch", "jax"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("all", "network"):
        network(args)
    if args.part in ("all", "sklearn"):
        bundled(args)
    if args.part in ("all", "synthetic"):
        synthetic(args)


if __name__ == "__main__":
    main()
