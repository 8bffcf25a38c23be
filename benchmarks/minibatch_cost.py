"""What a mini-batch costs: one epoch of the incremental engines against one full EM epoch, same model.

Issue 10, item 5: on plain Pyro and NumPyro Gaussian mixtures (``config_enumerate`` / a ``Categorical`` label
in a data plate, full covariance, d = 2, K = 5), one FIEM epoch (n/b mini-batch steps) should cost at most 3×
one EM epoch; likewise every incremental engine on the ``GaussianMixture`` family.  Item 6: the plain
enumerated model's EM epoch against the family's.

Printed: ms per epoch (steady state: ``fit.time_per_iteration``, compilation excluded and reported apart
on JAX) and the ratio to EM's epoch on the same model, measured in this process.

Usage: ``python benchmarks/minibatch_cost.py [--n 100000] [--family-n 1000000] [--epochs 3]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def simulate(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    locs = np.array([[0.0, 0.0], [5.0, 1.0], [-3.0, 4.0], [2.0, -4.0], [6.0, 6.0]])
    a = rng.normal(size=(5, 2, 2)) * 0.6
    covs = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(2)
    lab = rng.choice(5, n, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    return locs[lab] + np.einsum("nij,nj->ni", np.linalg.cholesky(covs)[lab], rng.normal(size=(n, 2)))


def init_values(x: np.ndarray) -> dict[str, np.ndarray]:
    idx = np.random.default_rng(1).choice(len(x), 5, replace=False)
    return {"w": np.full(5, 0.2), "mu": x[idx], "sigma": np.stack([np.cov(x.T)] * 5)}


def pyro_mixture(init: dict[str, np.ndarray]):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints
    from pyro.infer import config_enumerate

    @config_enumerate
    def model(x):
        w = pyro.param("w", torch.tensor(init["w"]), constraint=constraints.simplex)
        mu = pyro.param("mu", torch.tensor(init["mu"]))
        sigma = pyro.param("sigma", torch.tensor(init["sigma"]), constraint=constraints.positive_definite)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("obs", dist.MultivariateNormal(mu[z], covariance_matrix=sigma[z]), obs=x)

    return model


def numpyro_mixture(init: dict[str, np.ndarray]):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(x):
        w = numpyro.param("w", jnp.asarray(init["w"]), constraint=constraints.simplex)
        mu = numpyro.param("mu", jnp.asarray(init["mu"]))
        sigma = numpyro.param("sigma", jnp.asarray(init["sigma"]), constraint=constraints.positive_definite)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("obs", dist.MultivariateNormal(mu[z], covariance_matrix=sigma[z]), obs=x)

    return model


def epoch_ms(make_fit, epochs: int) -> tuple[float, float, float]:
    """(ms per epoch, set-up + compile seconds, total seconds) of one run."""
    t0 = time.perf_counter()
    fit = make_fit(epochs)
    total = time.perf_counter() - t0
    return 1e3 * fit.time_per_iteration, total - epochs * fit.time_per_iteration, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--family-n", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[100, 1000])
    args = ap.parse_args()

    import jax
    import pyro
    import torch

    from latentfit.inference.em import EM
    from latentfit.inference.fiem import FIEM
    from latentfit.inference.iem import IEM, MiniBatchEM
    from latentfit.inference.semvr import SEMVR
    from latentfit.models.mixture import GaussianMixture

    torch.set_num_threads(1)
    x = simulate(args.n)
    init = init_values(x)
    rows = []

    # plain Pyro model
    import latentfit.pyro as lp

    xt = torch.tensor(x)

    def pyro_fit(cls, **kw):
        def run(epochs):
            pyro.clear_param_store()
            return getattr(lp, cls)(pyro_mixture(init), num_epochs=epochs, progress=False, **kw).run(xt)
        return run

    em = epoch_ms(pyro_fit("EM"), args.epochs)
    rows.append(("plain Pyro", args.n, "EM", "", *em, 1.0))
    for b in args.batches:
        r = epoch_ms(pyro_fit("FIEM", batch_size=b), 1)
        rows.append(("plain Pyro", args.n, "FIEM", b, *r, r[0] / em[0]))

    # plain NumPyro model
    import latentfit.numpyro as ln

    xj = jax.numpy.asarray(x)

    def numpyro_fit(cls, **kw):
        def run(epochs):
            return getattr(ln, cls)(numpyro_mixture(init), num_epochs=epochs, progress=False, **kw).run(
                jax.random.PRNGKey(0), xj)
        return run

    em_j = epoch_ms(numpyro_fit("EM"), args.epochs)
    rows.append(("plain NumPyro", args.n, "EM", "", *em_j, 1.0))
    for b in args.batches:
        r = epoch_ms(numpyro_fit("FIEM", batch_size=b), 2)
        rows.append(("plain NumPyro", args.n, "FIEM", b, *r, r[0] / em_j[0]))

    # the family, and the plain enumerated Pyro model at the family's size (item 6)
    xf = torch.tensor(simulate(args.family_n))
    gm = GaussianMixture(xf, 5, "full", seed=0)
    em_f = epoch_ms(lambda e: EM(gm, num_epochs=e, seed=0, progress=False).run(), args.epochs)
    rows.append(("GaussianMixture", args.family_n, "EM", "", *em_f, 1.0))
    b = args.family_n // 50
    for cls in (MiniBatchEM, IEM, FIEM, SEMVR):
        r = epoch_ms(lambda e, c=cls: c(gm, num_epochs=e, batch_size=b, seed=0, progress=False).run(), 2)
        rows.append(("GaussianMixture", args.family_n, cls.__name__, b, *r, r[0] / em_f[0]))
    init_f = init_values(xf.numpy())

    def plain_big(epochs):
        pyro.clear_param_store()
        return lp.EM(pyro_mixture(init_f), num_epochs=epochs, progress=False).run(xf)

    r = epoch_ms(plain_big, args.epochs)
    rows.append(("plain Pyro (vs family EM)", args.family_n, "EM", "", *r, r[0] / em_f[0]))

    print(f"{'model':26s} {'n':>8s} {'engine':12s} {'b':>7s} {'ms/epoch':>10s} {'set-up+compile s':>17s} "
          f"{'total s':>8s} {'ratio to EM epoch':>18s}")
    for model, n, eng, b, ms, setup, tot, ratio in rows:
        print(f"{model:26s} {n:8d} {eng:12s} {str(b):>7s} {ms:10.1f} {setup:17.2f} {tot:8.2f} {ratio:18.1f}")


if __name__ == "__main__":
    main()
