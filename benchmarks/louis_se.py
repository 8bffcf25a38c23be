"""Louis standard errors (``fit.standard_errors()``, method ``"sa"``) on torch and JAX: first and later calls.

    python benchmarks/louis_se.py [--n 100] [--backend torch|jax|both] [--repeats 3]

The joint PK + binary model of tests/test_nlme_joint_jax.py (N individuals, 6 concentrations + 5 events each,
float64), fitted with SAEM defaults (300 + 100 iterations; the Louis average runs over the 100 smoothing-phase draws).
For each backend, in a fresh process: CPU time (``time.process_time``, torch with one thread) of
``standard_errors()`` on the first fit (JAX: tracing + compiling the derivative program), then on ``--repeats``
later fits of the same shapes (other seeds: another θ̂ and other draws).

Measured 2026-12-03 (this script, fresh process per backend, N = 100, 1 thread, shared 2-core machine at load
average 10.2-10.8; CPU seconds):

| backend | first call | later calls (median of 3) |
|---|---|---|
| torch | 2.29 | 0.51 (0.51, 0.53, 0.50) |
| JAX, before (a new closure per call: traced again each time) | 6.3 | 0.38 (0.98 under cProfile, 0.48 of it tracing) |
| JAX, after (the derivative program made once per model, θ an argument) | 7.00 | 0.18 (0.15, 0.20, 0.18) |

Where the time went on JAX: the first call compiles jax.hessian (forward-over-reverse) of the complete
log-likelihood summed over draws and units plus its forward Jacobian per draw and unit (5.0 s CPU of compilation at
load ~11; a forward-over-forward variant compiles in 3.6 s but runs 1.7x slower, not kept); the compiled program
itself runs in 0.19 s against torch's 0.35 s.  Before c0c44f9 a fit with num_iters > 0 fresh draws (and since then,
a fit without a smoothing phase) drew them op by op on JAX, ~2 s CPU per MCMC iteration (222 s for 100): that path
is one compiled program per iteration now.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def run_backend(backend: str, n: int, repeats: int) -> tuple[float, list[float]]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import torch

    torch.set_num_threads(1)
    import jax

    jax.config.update("jax_enable_x64", True)
    from test_nlme_joint_outcomes import PK_BINARY_TRUTH, _design, _joint, _params, _theta

    from latentfit.models import nlme

    def make(b: str) -> nlme.NLME:
        return nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"}, backend=b)

    sim = make("torch").bind(_design(n, "binary"))
    data = sim.simulate(_theta(sim, PK_BINARY_TRUTH), seed=1)
    times = []
    for rep in range(repeats + 1):
        fit = make(backend).fit(data, seed=rep, progress=False)
        t = time.process_time()
        fit.standard_errors()
        times.append(time.process_time() - t)
    return times[0], times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--backend", default="both")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.backend == "both":
        print(f"load average {os.getloadavg()[0]:.1f}; CPU seconds of standard_errors() (N = {args.n})")
        print("| backend | first call | later calls (median) |\n|---|---|---|")
        for b in ("torch", "jax"):  # a fresh process each: the first call's compilation counted
            subprocess.run([sys.executable, __file__, "--backend", b, "--n", str(args.n), "--repeats",
                            str(args.repeats)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return
    first, later = run_backend(args.backend, args.n, args.repeats)
    print(f"| {args.backend} | {first:.2f} | {np.median(later):.2f} ({', '.join(f'{t:.2f}' for t in later)}) |",
          flush=True)


if __name__ == "__main__":
    main()
