"""What a mini-batch costs: one epoch of the incremental engines against one full EM epoch, same model.

Issue 10, item 5: on plain Pyro and NumPyro Gaussian mixtures (``config_enumerate`` / a ``Categorical`` label
in a data plate, full covariance, d = 2, K = 5), one FIEM epoch (n/b mini-batch steps) should cost at most 3×
one EM epoch; likewise every incremental engine on the ``GaussianMixture`` family.  Item 6: the plain
enumerated model's EM epoch against the family's (goal ≤ 2×).

Printed: wall ms per epoch (``fit.time_per_iteration``, set-up and compilation excluded), CPU ms per epoch (the
process's CPU time inside the iteration chunks: on a shared machine the wall clock counts the other jobs), each the
fastest of ``--repeats`` runs, and the CPU ratio to EM's epoch on the same model, measured in this process.

Figures (2 shared cores; other jobs' load in brackets, so even CPU ratios scatter by ±30 % between runs):

=========================  =====  ===========  =====  ==================  ==================  ====================
model                      n      engine       b      first (wall ratio)  before (CPU ratio)  now (CPU ratio)
=========================  =====  ===========  =====  ==================  ==================  ====================
plain Pyro mixture         1e5    FIEM         100    158                 102-189 [2-9]       122 [~10]
plain Pyro mixture         1e5    FIEM         1000   19.8                9.2-26 [2-9]        12.9 [~10]
plain NumPyro mixture      1e5    FIEM         100    67.6                8.4-9.8 [~9]        1.3 [~16] (was 9.1)
plain NumPyro mixture      1e5    FIEM         1000   10.2                1.8-2.5 [~9]        1.3 [~16] (was 2.0)
GaussianMixture            1e6    MiniBatchEM  2e4    4.3                 1.6-1.7             1.5-1.8 [10] (was 1.6-2.1)
GaussianMixture            1e6    IEM          2e4    4.8                 1.6-2.5             1.6-1.8 [10] (was 1.7-2.1)
GaussianMixture            1e6    FIEM         2e4    4.6                 2.9-3.5             2.5-3.3 [10] (was 2.9-3.7)
GaussianMixture            1e6    SEMVR        2e4    17.3                3.5-4.6             2.3-2.6 [10] (was 3.0-4.4)
GaussianMixture (JAX)      1e6    MiniBatchEM  2e4 / 1e3                                      0.9 / 0.6 [~16]
GaussianMixture (JAX)      1e6    IEM          2e4 / 1e3                                      0.9 / 0.6 [~16]
GaussianMixture (JAX)      1e6    FIEM         2e4 / 1e3                                      1.3 / 0.6 [~16]
GaussianMixture (JAX)      1e6    SEMVR        2e4 / 1e3                                      1.6 / 1.3 [~16]
plain Pyro mixture (EM)    1e6    EM           -      2.4 (vs family)     0.8-1.1 (vs family)
=========================  =====  ===========  =====  ==================  ==================  ====================

"First": this script's first run (wall clock, load ~1-2).  Earlier changes: recognised plain mixtures take the
family's streamed full pass and its contiguous mini-batch blocks, and keep [n, K] responsibility tables; the EM
family's full pass reads all units without a gather; the initial state snapshot is set-up time; the mixture's E-step
coefficients are computed once per θ (FIEM's two batches) and a full pass with rows is streamed in chunks.

Torch family (goal met at b = 2e4 by the median; "now" and "was": 3-10 runs of ``--only family``'s rows each, in fresh
processes, old and new code alternated, load ~10; median ratios FIEM 2.8 (was 3.3; 1 run of 10 at 3.3), SEMVR 2.45 (was
3.7), MiniBatchEM / IEM 1.6-1.7 (was 1.9)). The floor is the E-steps: FIEM two per point, SEMVR one plus its full pass
(one EM epoch), the others one, each ~1 EM epoch's work per point. What came on top, per mini-batch of b = 2e4 (1 EM
epoch ≈ 0.8 ms per 2e4 points): copies of the blocks read (the features ``[D, b]`` and ``[b, D]``, the table's old rows
``[b, K]``: now views, ``ops.read_block``); a second read of the block's features in row layout for the reduction (now
the E-step's features-major block, transposed); the E-step's unused log-sum-exp. SEMVR's full pass reduced its
``[K, n]`` table in one product read back from memory (~9 ms on top of the ~40 ms pass at n = 1e6): each chunk's sum is
now taken while it is in cache, i.e. EM's statistic bit for bit (a reduction order change: table engines' initial and
SEMVR's snapshot sums move by ~1e-13 relative in float64; in float32 the sum is ~20x closer to the exact one, 3e-6 vs
7e-5 at n = 1e6); and its first epoch repeated the initial pass at θ⁰ (now kept: with ``--epochs 3`` this is 1/3 of a
pass per epoch, in a long fit nothing, so SEMVR's steady state is ~2.6, measured epoch by epoch in one process). What
remains above the floor: the M-step and the next E-step's coefficients, ~100 dispatched ops on ``[K, d, d]`` arrays
(~0.27 ms) per mini-batch, 50 per epoch: ~0.35 of EM's epoch.

JAX (goal met on every row): an epoch already ran as one compiled program (a ``lax.fori_loop`` over its mini-batches
inside the compiled chunk of epochs, carrying θ, the tables and the key), but XLA copied the whole ``[n, K]`` table
twice per mini-batch, because nothing ordered the rows read in a step before the write into the table in the same
step (an optimisation barrier does not survive XLA's CPU pipeline; a data dependency is undone by fusion, which
duplicates the cheap slice).  The compiled epoch now carries each write to the start of the next inner iteration
(``StatEngine.put_rows``), so every read follows the table's only write and the update is in place: at n = 1e5,
b = 100 a FIEM step costs ~33 µs instead of 530-580 µs, MiniBatchEM ~8-21 µs instead of ~530 µs (load 8-12).

Pyro (goal NOT met at b = 100): each step is ~160 dispatched torch ops (two E-steps, the table update, the M-step
and the next E-step's coefficients on [K, d, d] arrays), ~0.8 ms per step against the ~20 µs that 3× EM's epoch
leaves at n = 1e5, b = 100; the mixture's eager precision is now one batched Cholesky and a triangular solve instead
of ~40 ops of an unrolled Cholesky (185 -> 159 ops per FIEM step; FIEM b = 100 CPU per epoch 846 ms [load 2-4]
-> 719 ms [~10], while EM's epoch, 6-8 ms, scatters as much as the ratio's change).  ``torch.compile`` of the
M-step and coefficients (gcc 12 present) ran 3× faster per call (0.58 vs 1.7 ms under load ~9) but compiled for 14 s
(warm inductor cache) to 87 s (cold): at ~0.6 ms saved per step it pays back only after ~25k-150k steps, so it is
not used.

Usage: ``python benchmarks/minibatch_cost.py [--n 100000] [--family-n 1000000] [--epochs 3] [--only family-jax]``
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


#: runs per configuration; the fastest is reported (a shared machine's load only ever adds time)
REPEATS = 2
#: process CPU seconds spent inside the engines' iteration chunks (see :func:`_count_chunk_cpu`)
_CHUNK_CPU = [0.0]


def _count_chunk_cpu() -> None:
    """Count the process's CPU time spent running iterations (``Engine._run_chunk``, JAX results awaited): unlike the
    wall clock, it does not count the other processes of a shared machine."""
    from latentfit.inference.driver import Engine

    if getattr(Engine._run_chunk, "_counted", False):
        return
    run_chunk = Engine._run_chunk

    def counted(self, *args, **kwargs):
        c0 = time.process_time()
        out = run_chunk(self, *args, **kwargs)
        if self.ops.jittable:
            import jax

            jax.block_until_ready(out)
        _CHUNK_CPU[0] += time.process_time() - c0
        return out

    counted._counted = True
    Engine._run_chunk = counted


def epoch_ms(make_fit, epochs: int) -> tuple[float, float, float, float]:
    """(wall ms per epoch, CPU ms per epoch, set-up + compile seconds, total seconds).

    Wall: ``fit.time_per_iteration``; CPU: the process's CPU time inside the iteration chunks per epoch (compilation
    included on a cold JAX cache, hence the repeats); each the smallest of ``REPEATS`` runs.  Set-up and total: the
    first run's."""
    _count_chunk_cpu()
    wall = cpu = first = None
    for _ in range(REPEATS):
        _CHUNK_CPU[0] = 0.0
        t0 = time.perf_counter()
        fit = make_fit(epochs)
        total = time.perf_counter() - t0
        per_cpu = 1e3 * _CHUNK_CPU[0] / epochs
        per_wall = 1e3 * fit.time_per_iteration
        if first is None:
            first = (total - epochs * fit.time_per_iteration, total)
        wall = per_wall if wall is None else min(wall, per_wall)
        cpu = per_cpu if cpu is None else min(cpu, per_cpu)
    return wall, cpu, *first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--family-n", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--repeats", type=int, default=REPEATS, help="runs per configuration (the fastest is reported)")
    ap.add_argument("--only", nargs="+", choices=["pyro", "numpyro", "family", "family-jax"],
                    default=["pyro", "numpyro", "family", "family-jax"],
                    help="sections to run (family: GaussianMixture on torch and the plain enumerated Pyro model at its "
                         "size; family-jax: GaussianMixture on JAX float64)")
    args = ap.parse_args()
    globals()["REPEATS"] = args.repeats

    import jax
    import pyro
    import torch

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

    def fiem_against_em(label, fit_of):
        """One EM epoch, then FIEM at each batch size: rows with the CPU ratio to EM's epoch."""
        em = epoch_ms(fit_of("EM"), args.epochs)
        rows.append((label, args.n, "EM", "", *em, 1.0))
        for b in args.batches:
            r = epoch_ms(fit_of("FIEM", batch_size=b), args.epochs)
            rows.append((label, args.n, "FIEM", b, *r, r[1] / em[1]))

    if "pyro" in args.only:
        fiem_against_em("plain Pyro", pyro_fit)

    # plain NumPyro model
    import latentfit.numpyro as ln

    xj = jax.numpy.asarray(x)

    def numpyro_fit(cls, **kw):
        def run(epochs):
            return getattr(ln, cls)(numpyro_mixture(init), num_epochs=epochs, progress=False, **kw).run(
                jax.random.PRNGKey(0), xj)
        return run

    if "numpyro" in args.only:
        fiem_against_em("plain NumPyro", numpyro_fit)

    if "family" in args.only:
        family(args, rows, lp)
    if "family-jax" in args.only:
        family_jax(args, rows)
    print(f"{'model':26s} {'n':>8s} {'engine':12s} {'b':>7s} {'wall ms/ep':>10s} {'CPU ms/ep':>10s} "
          f"{'set-up+compile s':>17s} {'total s':>8s} {'CPU ratio to EM':>16s}")
    for model, n, eng, b, ms, cpu, setup, tot, ratio in rows:
        print(f"{model:26s} {n:8d} {eng:12s} {str(b):>7s} {ms:10.1f} {cpu:10.1f} {setup:17.2f} {tot:8.2f} "
              f"{ratio:16.1f}")


def family(args, rows, lp) -> None:
    """The GaussianMixture family's engines, and the plain enumerated Pyro model at the family's size (item 6)."""
    import pyro
    import torch

    from latentfit.inference.em import EM
    from latentfit.inference.fiem import FIEM
    from latentfit.inference.iem import IEM, MiniBatchEM
    from latentfit.inference.semvr import SEMVR
    from latentfit.models.mixture import GaussianMixture

    xf = torch.tensor(simulate(args.family_n))
    gm = GaussianMixture(xf, 5, "full", seed=0)
    em_f = epoch_ms(lambda e: EM(gm, num_epochs=e, seed=0, progress=False).run(), args.epochs)
    rows.append(("GaussianMixture", args.family_n, "EM", "", *em_f, 1.0))
    b = args.family_n // 50
    for cls in (MiniBatchEM, IEM, FIEM, SEMVR):
        r = epoch_ms(lambda e, c=cls: c(gm, num_epochs=e, batch_size=b, seed=0, progress=False).run(), args.epochs)
        rows.append(("GaussianMixture", args.family_n, cls.__name__, b, *r, r[1] / em_f[1]))
    init_f = init_values(xf.numpy())

    def plain_big(epochs):
        pyro.clear_param_store()
        return lp.EM(pyro_mixture(init_f), num_epochs=epochs, progress=False).run(xf)

    r = epoch_ms(plain_big, args.epochs)
    rows.append(("plain Pyro (vs family EM)", args.family_n, "EM", "", *r, r[1] / em_f[1]))


def family_jax(args, rows) -> None:
    """The GaussianMixture family's engines on JAX (float64): each epoch one compiled loop over its mini-batches."""
    import jax

    from latentfit.inference.em import EM
    from latentfit.inference.fiem import FIEM
    from latentfit.inference.iem import IEM, MiniBatchEM
    from latentfit.inference.semvr import SEMVR
    from latentfit.models.mixture import GaussianMixture

    with jax.enable_x64(True):
        gm = GaussianMixture(jax.numpy.asarray(simulate(args.family_n)), 5, "full", seed=0)
        em = epoch_ms(lambda e: EM(gm, num_epochs=e, seed=0, progress=False).run(), args.epochs)
        rows.append(("GaussianMixture (JAX)", args.family_n, "EM", "", *em, 1.0))
        for b in (args.family_n // 50, args.family_n // 1000):
            for cls in (MiniBatchEM, IEM, FIEM, SEMVR):
                r = epoch_ms(lambda e, c=cls, b=b: c(gm, num_epochs=e, batch_size=b, seed=0, progress=False).run(),
                             args.epochs)
                rows.append(("GaussianMixture (JAX)", args.family_n, cls.__name__, b, *r, r[1] / em[1]))


if __name__ == "__main__":
    main()
