"""SAEM per-iteration time: Pyro (torch) vs NumPyro (JAX, compiled), same model, same options, and the plain
Pyro model written in the tutorials' style against the NLME fast path.

Two problems: the theophylline study (N = 12) and N simulated individuals (default 5000) of the same
one-compartment model (10 samples each).  For each backend the table gives the set-up time of the first fit
(tracing and the first simulation), the JAX compile time of that fit (reported apart: a later same-shaped fit in
the process compiles nothing, see the ``2nd fit`` row), and the steady-state time per SAEM iteration; the last
column is the Pyro / NumPyro ratio of the latter.
A second table times three torch paths on the same data: the padded ``[N, T]`` Pyro model
(``latentfit/examples/theophylline.py``), the README's model (latents in a subject plate, one row per
observation read through ``log_psi[subject]``) and the NLME family's fast path: wall and CPU seconds of the whole
fit, ms per iteration, and each path's time per iteration over the NLME path's.
A third part fits theophylline end to end in fresh processes (data to estimates, imports excluded), by the README's
NumPyro model and by ``NLME(..., backend="jax")``: without JAX's persistent compilation cache, with it cold (filled)
and warm (``latentfit.enable_compilation_cache``), and a later fit in the no-cache process; ``traced``: programs
traced to jaxprs so far in the process (0 in a warm process: the on-disk trace store).
Timings on a shared machine are noisy: rerun with ``--repeats`` and read the medians (and the CPU seconds).
``--threads 1`` pins torch to one intra-op thread: on this 2-core machine shared at load 3-8, torch's default of two
threads made every torch path 10-30x slower per iteration (threads waiting for each other against the other
processes: at N = 5000 the README model took 1200 ms per iteration, the padded one 552-838 ms, NLME 122 ms, against
47, 24-31 and 21 ms with one thread in the same hour); the work of one iteration is too small for two threads.

    python benchmarks/backends.py [--iters 100] [--n-sim 5000] [--repeats 1] [--threads 1] [--float32]
                                  [--skip-end-to-end] [--per-chain-replay]

Figures (issue 10 item 6), torch paths after f3fbcc4 (one replay of the recorded density for all chains), the torch
part of this benchmark (``run_pyro``, ``run_pyro_rows``, ``run_nlme``) with one torch thread, float64, median of 3,
alternated in one process with the per-chain replay (``--per-chain-replay``); the machine was at load 6-7 (2 cores),
so every wall time is about twice the one at load 4.5 below, and the ratios are what to read:

==============================================  ==================  =========  ========================  =============
path                                             ms / iter           / NLME     whole fit (CPU)           goal
==============================================  ==================  =========  ========================  =============
theophylline, README Pyro model (rows), 400 it   8.69 (was 15.78)    1.17       3.76 s (2.57 s)           <= 1.5 s: not
theophylline, padded Pyro model                  7.61 (was 14.11)    1.03       3.24 s (2.19 s)           met at this
theophylline, NLME fast path                     7.41                1.00       2.98 s (2.01 s)           load
N = 5000, README Pyro model (rows), 100 it      64.7 (was 80.9)      1.99       6.92 s (3.38 s)           <= 2x: met
N = 5000, padded Pyro model                     45.6 (was 45.2)      1.41       4.72 s (2.41 s)
N = 5000, NLME fast path                        32.5                 1.00       3.33 s (1.75 s)
==============================================  ==================  =========  ========================  =============

("was": the per-chain replay, and ``x[idx]`` as recorded, alternated in the same process; estimates equal to the 12
digits printed.)  Before f3fbcc4
(``--repeats 3 --threads 1``, float64, load 4.4-4.7, after 847ddc1; wall, CPU where given; the NumPyro rows were not
re-run since):

==============================================  ==========  ============  ====================  =================
path                                             ms / iter   / NLME        whole fit             goal
==============================================  ==========  ============  ====================  =================
theophylline, README Pyro model (rows), 400 it   7.52        2.56          3.26 s (2.16 s CPU)   <= 1.5 s: not met
theophylline, padded Pyro model                  7.67        2.61          3.36 s (2.22 s CPU)
theophylline, NLME fast path                     2.94        1.00          1.18 s (0.82 s CPU)
N = 5000, README Pyro model (rows), 100 it      33.5         2.25          3.53 s (2.42 s CPU)   <= 2x: not met
N = 5000, padded Pyro model                     22.5         1.51          2.36 s (1.56 s CPU)
N = 5000, NLME fast path                        14.9         1.00          1.56 s (1.04 s CPU)
N = 5000, padded model on NumPyro               14.6         (0.98)        5.7 s set-up, 4.6 s compile
theophylline, NumPyro, fresh process, no cache   0.95        -             10.9 s (7.3 s CPU)    <= ~2 s: not met
... with the persistent cache warm                                          2.19 s (1.50 s CPU)   < 1 s: not met
... a 2nd fit in the same process (padded)       0.52        -             0.42 s                <= 0.15 s: not met
==============================================  ==========  ============  ====================  =================

(the NumPyro fresh-process fit: compilation 4.7 s, of which the 25-iteration chunk program ~4.5 s, iterations 0.38 s;
warm: cache loading 0.53 s, iterations 0.40 s, the rest tracing and set-up.)  At the start of that round (default two
torch threads, load 3.3-7.5, one repeat) the same benchmark printed: theophylline rows 5.46 ms/iteration (2.8x NLME),
3.81 s; N = 5000 rows 1200 ms (9.9x), padded 838 ms (6.9x); NumPyro theophylline set-up 3.2 s + compile 3.0 s.

The NumPyro end to end on 2026-12-02, after ba3989f (CPU compile options, unrolled Threefry draws) and 09f36b6 (the
unit-map detection traces the model once instead of six times): the third part's script, 400 iterations, fresh
processes, ``OMP_NUM_THREADS=1``, one run each, load 5.4-5.9 on 2 cores (wall about twice CPU; read the CPU):

==============================================  =====================  ==========================  ================
README NumPyro model, theophylline              whole fit (CPU)        compile (or load) + trace   goal
==============================================  =====================  ==========================  ================
fresh process, no cache                         18.5 s (9.8 s CPU)     8.7 s                       <= ~2 s: not met
... persistent cache cold (filled)              19.4 s (9.9 s CPU)     7.5 s
... persistent cache warm                       4.7-5.4 s (2.3-2.7)    1.45-1.70 s                 < 1 s: not met
a later same-shaped fit in the process          0.8-1.6 s (0.49-0.77)  0.18-0.63 s (0 compiles)   <= 0.15 s: not met
==============================================  =====================  ==========================  ================

(iterations 0.41-0.62 s wall of each.)  ba3989f made the uncached compilation cheaper: ba3989f^ and HEAD alternated
in fresh processes, no cache: 12.5 / 12.9 s CPU before, 9.4 / 10.7 s after (ka equal, all digits). 09f36b6, a
later fit, base and new alternated (two processes each, 5 fits, load 5.6-5.9): CPU median 0.78 -> 0.64 s.  Where a
later fit's time goes (cProfile, 1.49 s): 9 programs traced to jaxprs to find their shared executables (0.74 s, the
SAEM chunk 0.33 s) and printed as their cache key (0.22 s); the adapter's set-up 0.45 s (pattern recognition 0.16,
unit maps 0.11 (0.59 before 09f36b6), first density 0.08, Gaussian faces 0.08); the model traced 18 times (23
before).  In a fresh process with the cache warm the same tracing runs, plus ~80 lowerings (the persistent cache's
keys) and 9 executables loaded.  What is left: tracing each fit's programs again (a key that does not need the
trace), and the iterations themselves (~1 ms each on this machine).

After 1be2fbb (trace memo, ``latentfit/inference/ops_jax_memo.py``: a program whose captures (code, options, data by
content) were seen before is not traced again), 2026-12-03, the README NumPyro model and ``NLME(..., backend="jax")``
on theophylline, 400 iterations, ``OMP_NUM_THREADS=1``; 1be2fbb^ ("before") and 1be2fbb ("after") alternated in fresh
processes, two rounds (later fit: fits 2-4 of the no-cache process and fit 2 of the warm one), load 7.5-14 on 2
cores, so wall is 2-5x CPU: read the CPU.  Estimates and history bit-identical before/after (sha256 of every
estimate and history array: NumPyro fad72e9d9d621136, NLME 31f4d1edf053378c, in every fit):

=====================================  ========================  ========================  ==========================
CPU s (wall s)                         before                    after                     goal
=====================================  ========================  ========================  ==========================
NumPyro, fresh process, no cache       9.07-9.40 (46-61)         7.64-9.58 (8-26)
NumPyro, persistent cache warm         2.05-2.13 (4.1-6.8)       1.98-2.27 (3.2-10.0)      < 1 s: not met
NumPyro, later fit in the process      0.45-0.72 (0.9-4.6)       0.27-0.35 (0.27-0.89)     <= 0.15 s: not met
  of which tracing (``compile``)       0.24-2.30 wall            0.001-0.01 wall
NLME jax, fresh process, no cache      5.53-5.77 (13-17)         5.62-6.34 (14-29)
NLME jax, persistent cache warm        1.14-1.27 (3.1)           1.24-1.31 (2.7-9.2)       <= 0.2 s (10x saemix): not
NLME jax, later fit in the process     0.15-0.25 (0.26-0.72)     0.09-0.15 (0.23-0.71)     met in a fresh process
  of which tracing (``compile``)       0.11-0.46 wall            0.005-0.035 wall
=====================================  ========================  ========================  ==========================

A later fit now costs its iterations (NumPyro ~0.2-0.25 s CPU of 400 iterations, NLME ~0.1 s), model set-up (NumPyro
~0.03 s CPU: JAX's own caches already serve the adapter's eager work) and the fingerprints (7.5 ms for NumPyro's 9
programs, 11 ms for NLME's 3).  Another fit on other data of the same shapes fingerprints differently (arrays are keyed
by content: a trace may read values) and traces as before, sharing the executables through the program text.  The
fresh process with the cache warm is unchanged: the memo lives in the process, so the first fit still traces its
programs and lowers them to find them in JAX's cache (NLME: of 1.3 s CPU, the 3 programs' trace + lowering ~60%, the
~44 small eager programs of the set-up the rest); a persistent memo (fingerprint -> serialized executable, constants,
output tree) would skip both.

After 2492938 (on-disk trace store, ``latentfit/inference/ops_jax_store.py``: with the persistent cache on, each traced
program is also kept in ``<cache dir>/latentfit-traces`` under a digest of the memo's key valid in every process, as a
``jax.export`` serialisation with its constants and output tree; a later process deserialises it, lowers
``Exported.call`` and gets the executable from JAX's cache: it traces nothing, the ``traced`` column), 2026-12-03, same
script, a15776b ("before") and cc34c65 ("after") alternated in fresh processes from copies of the two trees (4 rounds,
each tree with its own warm cache), ``OMP_NUM_THREADS=1``, load 7.3-12.7 on 2 cores: read the CPU.  Estimates and
history bit-identical in every fit, cold and warm (NumPyro fad72e9d9d621136, NLME 31f4d1edf053378c):

=======================================  ==========================  ==========================  ===================
CPU s (wall s; programs' load, wall s)   before                      after                       goal
=======================================  ==========================  ==========================  ===================
NLME jax, persistent cache warm          1.46-2.07 (7-14; 2.6-5.3)   0.92-1.43 (3.5-7; 0.9-1.7)  <= 0.2 s: not met
NumPyro, persistent cache warm           2.60-2.75 (6-16; 1.9-5.1)   1.88-2.66 (6-12; 1.0-3.1)   < 1 s: not met
later fit in the process, NLME/NumPyro   0.13-0.18 / 0.28-0.38       0.12-0.19 / 0.29-0.39
=======================================  ==========================  ==========================  ===================

A second set an hour later, a15776b against the tree of 0219fb2 (which also makes ``JaxOps.key``'s threefry key and
``scan_steps``' iteration numbers on the host: five fewer small programs per fresh process, NLME 44 -> 39 eager
programs, NumPyro 95 -> 92), 3 rounds, load 10.1-11.3, the machine less contended: NLME jax warm 1.03-1.04 -> 0.67-0.89
s CPU (programs' load 0.88-1.00 -> 0.37-0.46 s wall), NumPyro warm 1.85-1.90 -> 1.22-1.79 s CPU (1.17-1.24 -> 0.42-0.68
s), same digests.

The first process with the cache on compiles each program from its exported form (the executable a later process
finds in JAX's cache; ``jax_explain_cache_misses`` and the compiler's log show a persistent-cache hit for each of them
there, and the only trace left is ``Exported.call``'s one-primitive wrapper).  Where a warm fresh process's time goes
now (cProfile, after): NLME (1.9 s profiled) the ~44 small eager programs of the set-up (data binding, the prior
draw, the initial residuals, the RW scales: 0.88 s, each a trace, a lowering to MLIR (a new MLIR context each, ~5 ms)
and a persistent-cache read; they stay eager because compiled, XLA fuses and contracts their arithmetic and the fit's
last digits change), the 3 stored programs 0.51 s (file read and checks 0.02, lowering ``Exported.call`` 0.10, JAX's
cache read and executable deserialisation 0.36), fingerprint + stable digest 0.12 s, iterations the rest.  Before,
the 3 programs took 0.91 s of 1.55 s (trace 0.26, jaxpr text 0.06, lowering 0.38, cache read 0.17).  NumPyro (4.1 s
profiled): the adapter's set-up 2.4 s (the model run eagerly to find unit maps, patterns and Gaussian faces: most of
the ~95 eager programs), the 9 stored programs 0.95 s (lowering 0.27, cache reads 0.59), digests 0.08 s.  What is
left is eager work, not tracing: set-up programs grouped into stored compiled programs would need the compiled
results to match the eager ones bit for bit (they do not, see ``SAEM.init``), and the adapter's analysis of the
model is Python over the model's trace.

After a9c9f3b (the NumPyro adapter's analysis of a model, i.e. unit maps, closed-form patterns and Gaussian faces, kept
in the same store as a checksummed JSON + raw-array record under a stable digest of the model's code, data and
options): a warm fresh process runs the README model once (its first trace) instead of 4 times and lowers 45 programs
instead of 100 (~91 -> ~36 eager ones; 2 stored programs loaded instead of 9, the analysis' own programs are not run).
This benchmark's third-part script (same model, data, options and 400 iterations; wrapped to count lowerings),
f629339 and a9c9f3b alternated in fresh processes, each tree with its own warm cache, ``OMP_NUM_THREADS=1``; digests
equal in every run (fad72e9d9d621136).  Set 1: 4 rounds, load 13-16.  Set 2: 5 rounds, load 5.5-10.

=======================================  ==========================  ==========================  ===================
README NumPyro model, cache warm         before (f629339)            after (a9c9f3b)             goal
=======================================  ==========================  ==========================  ===================
set 1, CPU s (wall s)                    1.67-2.45 (10.1-20.2)       0.92-1.69 (4.6-10.2)        < 1 s: not met
set 2, CPU s (wall s)                    1.82-2.34, median 2.04      1.18-1.40, median 1.33
                                         (2.9-6.8, median 3.1)       (1.9-3.4, median 2.3)
=======================================  ==========================  ==========================  ===================

What is left of the 45 lowerings (~10 ms CPU each in a warm process: a new MLIR context, then a persistent-cache read
and executable deserialisation; compiling such a tiny program instead costs about the same): ~25 from the model's
first eager trace (its own ``jnp`` operations and NumPyro's key splits; an abstract trace with the stored parameter
values and data would remove them), ~14 from ``SAEM.init`` and the driver (prior draw, RW scales, constraints: eager
on purpose, see above), 2 stored programs and the script's own 3.  ``NLME(..., backend="jax")`` is unchanged.

After f1c4c82 (issue 10 item 6 / issue 14 item 9; the eager set-up grouped): the NumPyro adapter's first run of the
model is traced once and the values it holds computed by one compiled program (``NumPyroPPL.first_run``,
``ops_jax.run_traced``; with the on-disk store on), SAEM's start (θ unconstrained, the key split, the prior draw, the
RW scales and the chains' cache) is one ``ops.jit`` program (``SAEM._chains_start``), and shapes come from
``jax.eval_shape`` (``ops.shape_of``).  Programs lowered in a warm fresh process (``jax.monitoring``): README NumPyro
model 45 -> 9 (the model's first run 1, 3 stored programs, 2 final ``exp``, the script's own 3), NLME 42 -> 6.
Estimates move at rounding (compiled, ``μ + ω ε`` of the prior draw becomes a fused multiply-add): README model seed
0 estimates equal (history 2.2e-16 relative), seed 3 5.3e-14; NLME ``fit()`` defaults 6.2e-13, per-unit streams
2.8e-16, covariate + block Ω bit-identical; torch bit-identical (NLME default / covariate + block Ω / per-unit, the
README Pyro model).
This part's model, data and 400 iterations, fresh processes with the cache warm, imports excluded, the tree of
0d7be18 ("before") and 0d7be18 plus these changes ("after") alternated, 5 rounds, each tree with its own warm cache
(a script asserting the imported tree), ``OMP_NUM_THREADS=1``, load 19.8-36.2 on 2 cores (wall 2-5x CPU: read the CPU):

=======================================  ==========================  ==========================  ===================
CPU s, median (range); wall median       before (0d7be18)            after                       goal
=======================================  ==========================  ==========================  ===================
README NumPyro model, cache warm         1.39 (1.17-1.42*); 3.9 s    0.99 (0.84-1.46); 2.9 s     < 1 s: met at the
                                                                                                 median, not in
                                                                                                 every run
NLME jax ``fit()`` defaults, warm        1.09 (0.88-1.33); 3.3 s     0.63 (0.57-0.71); 1.8 s     <= 0.2 s: not met
=======================================  ==========================  ==========================  ===================

(* one more "before" run stalled at 20.3 s CPU / 465 s wall under that load, left out of the range.)  What is left
(cProfile of the warm NLME fit, profiled 1.76 s at load ~14): reading the 4 stored executables from JAX's cache, most of
it deserialising the 1.3-1.7 MB chunk executable (130-670 ms alone, measured with ``backend.deserialize_executable``;
a one-operation program: 0.5-1 ms), the 6 lowerings (``make_ir_context`` ~5 ms each), the stable digests (~0.1 s) and
the 400 iterations (~0.1-0.15 s).  The 0.2 s goal needs a smaller chunk executable (or none loaded), not fewer
set-up programs.

The torch path, round by round.  847ddc1 (estimates bit-identical): a Normal site's log-density is computed on its
compact scale (torch's Normal expands a scalar sd to every observation, and ``scale.log()`` ran over all of them: CPU
per density evaluation at N = 5000, 1 chain 1.72 -> 1.48 ms; SAEM 26.2 -> 23.1 ms CPU per iteration), and the recorded
density program drops its no-op views (~80 of ~600 nodes for 5 chains: theophylline 0.326 -> 0.277 ms per
evaluation).  f3fbcc4: theophylline on Pyro runs ~12 model evaluations per iteration; the program was recorded for each
of the 5 chains one by one (~80 small ops each, costing their dispatch alone; ``torch.func.vmap`` cannot be recorded,
and ``vmap`` over a one-chain recording cost ~0.19 ms + 4 us per chain against ~0.05 ms per chain).  Now one chain is
recorded and its program rewritten to run all chains stacked (``latentfit/integrations/batched_program.py``; the
per-chain replay where an op is not batch-safe, or where the arrays of all chains exceed 2**17 elements and leave the
caches): one evaluation of 5 chains 0.43-0.64 -> 0.16-0.20 ms CPU; and ``x[idx]`` by a recorded index vector runs as
``index_select`` (the README model's ``log_psi[subject]`` at 50 000 rows: about 2x faster), which is what moved the
README model at N = 5000.  What is left on theophylline: per iteration ~12 evaluations of ~60 ops (~0.13 ms each) and
the sampler's own work, shared with the NLME path; the NLME path also skips one evaluation per iteration (its residual
sums carried between iterations re-score the chains at the new θ).  At N = 5000 the README model's own arithmetic on
50 000 rows (the gather, exp of [50 000, 3]) is most of an evaluation.  On NumPyro the end-to-end time is the
compilation of the SAEM chunk (the model inlined in each kernel) and ~15 set-up programs (sampling, unit-map
detection, pattern recognition: ~2.8 s wall at load 5).
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
    t0, c0 = time.perf_counter(), time.process_time()
    fit = SAEM(theophylline_model, num_iters=num_iters, seed=seed, progress=False).run(**args)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    iters = fit.num_iterations
    loop = fit.elapsed - fit.init_time
    return {"setup": total - loop, "compile": 0.0, "per_iter": loop / iters, "total": total, "cpu": cpu,
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
    t0, c0 = time.perf_counter(), time.process_time()
    fit = SAEM(rows_model, num_iters=num_iters, seed=seed, progress=False).run(subject, time_, dose, conc)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    loop = fit.elapsed - fit.init_time
    return {"setup": total - loop, "compile": 0.0, "per_iter": loop / fit.num_iterations, "total": total, "cpu": cpu,
            "ka": float(np.exp(fit.params["mu"][0]))}


def run_nlme(data: dict[str, np.ndarray], num_iters: tuple[int, int], seed: int) -> dict[str, float]:
    import pandas as pd

    from latentfit.inference.saem import SAEM
    from latentfit.models import nlme

    n, t = data["time"].shape
    m = data["mask"].reshape(-1)
    df = pd.DataFrame({"ID": np.repeat(np.arange(1, n + 1), t)[m], "TIME": data["time"].reshape(-1)[m],
                       "DV": data["conc"].reshape(-1)[m], "DOSE": np.repeat(data["dose"][:, 0], t)[m]})
    t0, c0 = time.perf_counter(), time.process_time()
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, dose="DOSE")
    fit = SAEM(model, num_iters, seed=seed, progress=False).run()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    loop = fit.elapsed - fit.init_time
    return {"setup": total - loop, "compile": 0.0, "per_iter": loop / fit.num_iterations, "total": total, "cpu": cpu,
            "ka": float(fit.params["ka"]) if "ka" in fit.params else float("nan")}


def run_numpyro(data: dict[str, np.ndarray], num_iters: tuple[int, int], seed: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from latentfit.examples.theophylline_numpyro import theophylline_model
    from latentfit.numpyro import SAEM

    dtype = jnp.result_type(float)
    args = {k: jnp.asarray(v) if v.dtype == bool else jnp.asarray(v, dtype=dtype) for k, v in data.items()}
    t0, c0 = time.perf_counter(), time.process_time()
    fit = SAEM(theophylline_model, num_iters=num_iters, progress=False).run(jax.random.PRNGKey(seed), **args)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    compile_s = fit.model.ops.compile_time
    loop = fit.elapsed - fit.init_time - compile_s
    return {"setup": total - loop - compile_s, "compile": compile_s, "per_iter": loop / fit.num_iterations,
            "total": total, "cpu": cpu, "ka": float(np.exp(fit.params["mu"][0]))}


#: theophylline fitted end to end in a fresh process (data to estimates; process start and imports excluded), by the
#: README's plain NumPyro model (``numpyro``) or the NLME family on JAX (``nlme``), then again in the same process (a
#: later fit: same shapes, same data): wall and CPU seconds, compilation (or cache loading, or tracing), iterations
_E2E_NUMPYRO = """
import sys, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpyro, numpyro.distributions as ndist
from numpyro.distributions import constraints as nconstraints
import latentfit as lf
from latentfit.numpyro import SAEM
from latentfit.models import nlme
if sys.argv[1]:
    lf.enable_compilation_cache(sys.argv[1])

def numpyro_model(subject, time, dose, conc=None):
    mu = numpyro.param("mu", jnp.array([0.0, 3.0, -0.7]))
    omega = numpyro.param("omega", jnp.ones(3), constraint=nconstraints.positive)
    a = numpyro.param("a", 1.0, constraint=nconstraints.positive)
    with numpyro.plate("id", int(subject.max()) + 1):
        log_psi = numpyro.sample("log_psi", ndist.Normal(mu, omega).to_event(1))
    ka, v, cl = jnp.exp(log_psi[subject]).T
    k = cl / v
    pred = dose * ka / (v * (ka - k)) * (jnp.exp(-k * time) - jnp.exp(-ka * time))
    with numpyro.plate("obs", len(time)):
        numpyro.sample("conc", ndist.Normal(pred, a), obs=conc)

def fit_once():
    df = lf.datasets.theophylline(saemix_form=True)
    if sys.argv[2] == "nlme":
        model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend="jax")
        fit = model.fit(df, columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose", seed=0,
                        progress=False, num_iters=(300, 100))
        return fit, float(fit.params["ka"])
    fit = SAEM(numpyro_model, num_iters=(300, 100), progress=False).run(
        jax.random.PRNGKey(0), df["Id"].values - 1,
        *(jnp.asarray(df[c].values) for c in ("Time", "Dose", "Concentration")))
    return fit, float(jnp.exp(fit.params["mu"][0]))

for label in ("E2E", "LATER"):
    t0, c0 = time.perf_counter(), time.process_time()
    fit, ka = fit_once()
    compile_s = fit.model.ops.compile_time
    from latentfit.inference import ops_jax
    print(label, time.perf_counter() - t0, time.process_time() - c0, compile_s,
          fit.elapsed - fit.init_time - compile_s, ka, getattr(ops_jax, "TRACES", [float("nan")])[0])
"""


def numpyro_end_to_end(path: str = "numpyro") -> list[tuple[str, list[float]]]:
    """Theophylline (``path``: the README's NumPyro model, or ``"nlme"``: the NLME family on JAX) in fresh processes:
    without the persistent compilation cache, then with it cold (filled) and warm
    (``latentfit.enable_compilation_cache``); each process then fits again (a later fit of the same shapes)."""
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label, arg in (("no cache", ""), ("cache cold", cache), ("cache warm", cache)):
            run = subprocess.run([sys.executable, "-c", _E2E_NUMPYRO, arg, path], capture_output=True, text=True,
                                 cwd=os.path.join(os.path.dirname(__file__), ".."))
            out = {line.split()[0]: line for line in run.stdout.splitlines() if line.startswith(("E2E", "LATER"))}
            if run.returncode != 0 or "E2E" not in out:
                print(f"(end to end failed: {(run.stderr or run.stdout).strip()[-300:]})")
                return rows
            rows.append((label, [float(v) for v in out["E2E"].split()[1:]]))
            if label == "no cache" and "LATER" in out:
                rows.append(("later fit", [float(v) for v in out["LATER"].split()[1:]]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="SAEM iterations per fit (K1 = 0.8 of them)")
    parser.add_argument("--theo-iters", type=int, default=400, help="iterations on theophylline (300, 100)")
    parser.add_argument("--n-sim", type=int, default=5000, help="simulated individuals")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--float32", action="store_true", help="JAX in float32 (default float64, as torch)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's own choice, one per core)")
    parser.add_argument("--skip-end-to-end", action="store_true", help="skip the fresh-process NumPyro fits")
    parser.add_argument("--per-chain-replay", action="store_true",
                        help="Pyro: replay the recorded density once per chain (the path before the batched program)")
    opts = parser.parse_args(argv)
    import jax
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.per_chain_replay:
        from latentfit.integrations.pyro import _TracedChainMap

        _TracedChainMap.batch_chains = False

    jax.config.update("jax_enable_x64", not opts.float32)
    problems = [("theophylline", theophylline_numpy(), (int(0.75 * opts.theo_iters), opts.theo_iters
                                                         - int(0.75 * opts.theo_iters))),
                (f"simulated N={opts.n_sim}", simulate(opts.n_sim), (int(0.8 * opts.iters),
                                                                     opts.iters - int(0.8 * opts.iters)))]
    print(f"SAEM, kernels (2,2,2), default chains; torch {_version('torch')} eager vs JAX {jax.__version__} "
          f"{'float32' if opts.float32 else 'float64'} compiled; cpu count {os.cpu_count()}, torch threads "
          f"{torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy)")
    header = f"{'problem':<22}{'iters':>6}{'backend':>9}{'setup s':>9}{'compile s':>11}{'ms/iter':>10}{'ka':>8}"
    print(header + f"{'pyro/numpyro':>14}")
    print("-" * (len(header) + 14))
    for name, data, num_iters in problems:
        res = {}
        for backend, runner in (("pyro", run_pyro), ("numpyro", run_numpyro)):
            runs = [runner(data, num_iters, seed) for seed in range(opts.repeats)]
            res[backend] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            # set-up and compilation of the first fit (later same-shaped fits in this process compile nothing)
            res[backend].update({k: runs[0][k] for k in ("setup", "compile")})
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
    header = (f"{'problem':<22}{'iters':>6}{'torch path':>26}{'total s':>9}{'cpu s':>8}{'ms/iter':>10}{'ka':>8}"
              f"{'/ NLME':>8}")
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
            print(f"{name:<22}{sum(num_iters):>6}{label:>26}{r['total']:>9.2f}{r['cpu']:>8.2f}"
                  f"{1000 * r['per_iter']:>10.2f}{r['ka']:>8.3f}{r['per_iter'] / base:>8.2f}")
        sys.stdout.flush()
    if opts.skip_end_to_end:
        return
    for path, title in (("numpyro", "The README's NumPyro model"), ("nlme", 'NLME(..., backend="jax")')):
        print(f"\n{title} on theophylline (400 iterations), end to end in a fresh process (data to estimates, imports "
              "excluded; saemix: about 2 s end to end, issue 14's constant, R not installed here), then a later fit "
              "in the same process")
        print(f"{'persistent cache':<18}{'wall s':>8}{'cpu s':>8}{'compile s':>11}{'iters s':>9}{'ka':>8}"
              f"{'traced':>8}")
        for label, (wall, cpu, compile_s, iters_s, ka, traces) in numpyro_end_to_end(path):
            print(f"{label:<18}{wall:>8.2f}{cpu:>8.2f}{compile_s:>11.2f}{iters_s:>9.2f}{ka:>8.3f}{traces:>8.0f}")


def _version(mod: str) -> str:
    import importlib

    return importlib.import_module(mod).__version__


if __name__ == "__main__":
    main()
