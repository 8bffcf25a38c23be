# ruff: noqa: E501  (the docstring pastes the printed tables, wider than the line limit)
"""MCMCSGD benchmark (issue 11, item 5): a logistic mixed model with three random effects, against the exact maximum.

    python benchmarks/mcmcsgd_logistic.py [--quick] [--seed 0] [--threads 1] [--remedies]
    python benchmarks/mcmcsgd_logistic.py --seeds 0 1 2 [--num 400] [--svi-steps 5000] [--target-slack 0.1]

What it measures
----------------
The logistic mixed model of MISSO'18 (ALGORITHMS.md §11): N = 1200 individuals, n_i = 15 observations each,

    y_ij ~ Bernoulli(logit⁻¹(Σ_k x_ijk φ_ik)),   φ_i = β + η_i,   η_ik ~ N(0, ω_k²) independent,

β = (−4, −0.5, 1), ω = (0.3, 0.2, 0.2), covariates x_ij = (1, t_j, c_ij).  It is written once as a plain Pyro
model and once as a NumPyro model (``φ_i ~ Normal(β, ω).to_event(1)`` in a plate over individuals, the
observations in a plate over the 18 000 rows read through ``φ[id]``) and fitted, in one process, by

* ``MCMCSGD`` (Pyro, NumPyro), default options (500 iterations, saemix kernels (2, 2, 2); until 4 December 2026
  Adam 0.05 with averaging over the second half, since then ``optimizer="auto"``: Fisher scoring with
  ``information="exact"`` on this model, see the last section); in the multi-seed table also ``MCMCSGD fisher``
  (``optimizer="fisher"``);
* ``SAEM`` (Pyro, NumPyro), default options (``num_iters=(300, 100)``);
* ``MCEM`` (Pyro front door), default options (100 epochs), as it accepts the model (a failure would be printed
  with its reason);
* Pyro ``SVI``: ``AutoNormal`` guide on the random effects, β and ω ``pyro.param``s of the model (Trace_ELBO,
  ClippedAdam lr 0.05 decaying tenfold, 15000 steps; the note under table 1 gives the −ELBO's trend over the last
  quarter: 4000 steps at lr 0.02 were far from converged, and the ELBO still drifts slowly as the guide's scales
  settle, which keeps shrinking ω);
* NumPyro ``NUTS``: β ~ Normal(0, 10), ω ~ HalfNormal(1), the random effects non-centred (φ = β + ω ε,
  ε ~ N(0, 1): the centred form funnels on the weakly identified ω₁), 500 warm-up / 500 draws, one chain;
  posterior means.

All rows are compared with the **exact maximum**: ``maximise_log_likelihood_gq`` (adaptive Gauss–Hermite
quadrature, 5 nodes per random effect = 125 points per individual) on the traced Pyro model, started at the
true θ; it must report ``converged``.  Its log-likelihood with 7 nodes is printed too (the quadrature error).
Its standard errors come from the Hessian of the 5-node quadrature log-likelihood in (β, log ω), the grid held
at the conditional modes / Laplace covariances of θ̂ (delta method for ω).

Table 1, one row per method: wall time split into set-up (tracing, chains' initialisation), compile (JAX) and
iterations; estimates; ``LL`` = the log-likelihood at the estimate, by the *same* deterministic method for every
row (5-node adaptive GQ on the traced Pyro model, modes by 30 Newton steps); ``ΔLL`` = LL − LL(exact maximum);
``max|Δ|/SE`` = max over the six parameters of |estimate − exact| / SE(exact).

Table 2, time to the same log-likelihood: for MCMCSGD and SAEM, the running estimate ``fit.history["theta.*"]``
(MCMCSGD: the Polyak–Ruppert average after ``average_from``, the iterate before) is evaluated with the same
5-node GQ at checkpoints (iterations 10, 20, 30, 50, 75, 100, 150, 200, ...); the first checkpoint whose LL is
within 0.5 of the exact maximum's is reported as iterations × time per iteration (set-up and compilation
excluded; the next column adds them).  The resolution is that of the checkpoints.

Design (and why)
----------------
With β₁ = −4 the event rate at x = (1, 0, 0) is exp(−4) ≈ 2 %, and ω₁ (the random intercept's sd) shows in the
data only where the other covariates are near 0: whatever the design, ω₁ is weakly identified (SE ≈ 0.13-0.19 at
the truth in every design tried).  With t_j = (j − 1)/14 ∈ [0, 1] and an individual-level covariate (binary or
N(3, 1)) the information for ω is *singular* at the truth (no standard errors; the maximum of a t ∈ [−8, 0],
c_i ~ N(0, 1) design had ω₁ = 0.007, on the boundary).  So this benchmark uses

* t_j = −8 + 8 (j − 1)/14 ∈ [−8, 0] (time before the last visit: the rate falls from ≈ 50 % at the first visit
  to ≈ 2 % at the last one for c = 0), and
* c_ij ~ N(0, 2²), a time-varying covariate drawn per observation (so that ω₃ is a within-individual random
  slope, identified by the variation of c within an individual);

event rate ≈ 26 %; SEs at the truth (β; ω) ≈ (0.075, 0.014, 0.021; 0.13, 0.010, 0.032): ω₁ still has a
relative SE of about 40 %, and the comparison is measured in those SEs.

Multi-seed table (``--seeds 0 1 2``; the defaults since MCMCSGD's kernels became SAEM's (2, 2, 2))
--------------------------------------------------------------------------------------------------
Per seed s (data simulated with seed s, N = 400 individuals × 15, each fit with seed s), in one process: the exact
maximum (AGQ, 5 nodes), then ``SAEM`` (Pyro), ``MCMCSGD`` (Pyro, NumPyro), ``MISSO`` (Pyro) with *their defaults*,
and Pyro ``SVI`` (AutoNormal, 5000 steps).  Columns: ``dLL (AGQ)`` = LL(estimate) − LL(exact maximum) by the same
5-node AGQ (deterministic); ``dLL (IS)`` = the importance-sampling LL at the estimate (Student-t(4) proposal at the
Laplace modes, 2000 draws per individual, seed 0) minus the exact maximum's AGQ LL, and ``IS MC se`` its
Monte-Carlo SE (the IS row of the exact maximum shows the IS estimator's own bias, −0.2); ``time to SAEM LL`` =
iterations × time per iteration until the running estimate (``fit.history["theta.*"]``, evaluated by AGQ on a grid
of checkpoints) first reaches SAEM's final LL on the same seed minus 0.1 (``--target-slack``), averaged over the
seeds where it does (count in brackets).  Load: 2 CPU cores shared with 4-5 other jobs (load average 11-15);
wall times are only comparable within a seed, and roughly.  Output of ``--seeds 0 1 2`` (2048 s)::

    seed 0: exact LL -2224.396 converged=True (153.2 s); IS at it -2224.475 ± 0.201
      SAEM (Pyro)              dLL   -0.745  IS   -0.906 ± 0.207  max|d|/SE  0.97  total   20.0 s  iters   19.8 s  to SAEM's LL: 264 it, 13.10 s
      MCMCSGD (Pyro)           dLL   -0.417  IS   -0.573 ± 0.213  max|d|/SE  1.17  total   30.5 s  iters   30.3 s  to SAEM's LL: 261 it, 15.84 s
      MCMCSGD (NumPyro)        dLL   -0.831  IS   -1.021 ± 0.221  max|d|/SE  1.61  total   92.4 s  iters    6.7 s  to SAEM's LL: 398 it, 5.34 s
      MISSO (Pyro)             dLL  -63.426  IS  -63.626 ± 0.225  max|d|/SE  9.81  total  592.6 s  iters  589.9 s  to SAEM's LL: never
      SVI AutoNormal (Pyro)    dLL   -1.250  IS   -1.404 ± 0.215  max|d|/SE  1.24  total   77.9 s  iters   77.8 s  to SAEM's LL: never
    seed 1: exact LL -2191.663 converged=True (20.7 s); IS at it -2191.876 ± 0.215
      SAEM (Pyro)              dLL   -0.786  IS   -0.968 ± 0.211  max|d|/SE  0.73  total    8.3 s  iters    8.3 s  to SAEM's LL: 209 it, 4.32 s
      MCMCSGD (Pyro)           dLL   -0.094  IS   -0.304 ± 0.217  max|d|/SE  0.31  total   12.1 s  iters   12.1 s  to SAEM's LL: 284 it, 6.86 s
      MCMCSGD (NumPyro)        dLL   -0.690  IS   -0.931 ± 0.225  max|d|/SE  1.01  total    7.3 s  iters    6.2 s  to SAEM's LL: 466 it, 5.75 s
      MISSO (Pyro)             dLL  -80.298  IS  -80.547 ± 0.224  max|d|/SE 10.51  total  370.3 s  iters  369.6 s  to SAEM's LL: never
      SVI AutoNormal (Pyro)    dLL   -1.664  IS   -1.861 ± 0.215  max|d|/SE  1.02  total   30.8 s  iters   30.8 s  to SAEM's LL: never
    seed 2: exact LL -2239.690 converged=True (11.3 s); IS at it -2239.983 ± 0.245
      SAEM (Pyro)              dLL   -0.909  IS   -1.143 ± 0.212  max|d|/SE  0.65  total    6.1 s  iters    6.1 s  to SAEM's LL: 264 it, 4.01 s
      MCMCSGD (Pyro)           dLL   -0.293  IS   -0.553 ± 0.228  max|d|/SE  0.34  total    9.8 s  iters    9.7 s  to SAEM's LL: 261 it, 5.08 s
      MCMCSGD (NumPyro)        dLL   -0.799  IS   -1.100 ± 0.257  max|d|/SE  0.57  total    5.5 s  iters    4.4 s  to SAEM's LL: 398 it, 3.54 s
      MISSO (Pyro)             dLL  -65.298  IS  -65.566 ± 0.227  max|d|/SE  7.05  total  163.4 s  iters  162.9 s  to SAEM's LL: never
      SVI AutoNormal (Pyro)    dLL   -2.239  IS   -2.479 ± 0.216  max|d|/SE  0.78  total   43.1 s  iters   43.1 s  to SAEM's LL: never

    Summary over seeds [0, 1, 2] (N = 400 individuals x 15): mean ± sd over seeds; LL differences to each seed's exact maximum (AGQ 5 nodes)
    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    exact maximum (AGQ)         +0.00 ±  0.00       -0.20      0.22       0.00        nan                     -
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78       11.4            7.14 (3/3)
    MCMCSGD (Pyro)              -0.27 ±  0.16       -0.48      0.22       0.61       17.4            9.26 (3/3)
    MCMCSGD (NumPyro)           -0.77 ±  0.07       -1.02      0.23       1.06        5.8            4.88 (3/3)
    MISSO (Pyro)               -69.67 ±  9.25      -69.91      0.23       9.12      374.1           never (0/3)
    SVI AutoNormal (Pyro)       -1.72 ±  0.50       -1.91      0.22       1.01       50.6           never (0/3)

The time-to-target column of that run was read on a grid of checkpoints (±60 iterations).  The first crossing is
now located to one iteration (bisection between the grid's checkpoints); a second run, ``--seeds 0 1 2 --only
MCMCSGD`` (533 s, load average 6-10; the estimates are the same fits, bit for bit)::

    seed 0:  SAEM (Pyro) to SAEM's LL: 257 it, 6.22 s    MCMCSGD (Pyro) 260 it, 4.64 s     MCMCSGD (NumPyro) 396 it, 2.39 s
    seed 1:  SAEM (Pyro) to SAEM's LL: 198 it, 6.43 s    MCMCSGD (Pyro) 263 it, 13.61 s    MCMCSGD (NumPyro) 434 it, 3.78 s
    seed 2:  SAEM (Pyro) to SAEM's LL: 237 it, 5.72 s    MCMCSGD (Pyro) 242 it, 5.67 s     MCMCSGD (NumPyro) 365 it, 2.84 s

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78       10.8            6.12 (3/3)
    MCMCSGD (Pyro)              -0.27 ±  0.16       -0.48      0.22       0.61       15.5            7.97 (3/3)
    MCMCSGD (NumPyro)           -0.77 ±  0.07       -1.02      0.23       1.06        3.8            3.00 (3/3)

MISSO's default surrogate.  The MISSO rows above are the paper's algorithm (then the default, now
``surrogate="paper"``: incremental MCEM on this model, 20 epochs of 10 % batches).  MISSO's default is now the
paper's step accelerated by Louis' rule (latentfit/inference/misso.py: missing information estimated from the
draws, fractions capped at 0.9, warm-start epochs, a 5-SE trust region; 12 epochs of 50 % batches).  Output of
``--seeds 0 1 2 --only "MISSO (Pyro)"`` (348 s, load average 8-11; SAEM's rows are the same fits as above)::

    seed 0:  MISSO (Pyro)   dLL -2.558  IS -2.796 ± 0.244  max|d|/SE 2.55  total 43.2 s (SAEM 15.1 s)
    seed 1:  MISSO (Pyro)   dLL -1.182  IS -1.450 ± 0.246  max|d|/SE 0.78  total 19.0 s (SAEM  8.4 s)
    seed 2:  MISSO (Pyro)   dLL -1.371  IS -1.672 ± 0.251  max|d|/SE 0.62  total 19.2 s (SAEM  8.4 s)

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78       10.6            6.27 (3/3)
    MISSO (Pyro)                -1.70 ±  0.75       -1.97      0.25       1.32       26.1           never (0/3)

From 70 units short to 1.7 (seed 0's maximum has ω₁ ≈ 0.002, on the boundary, where the missing fraction of
log ω₁ tends to 1 and the capped step is slow: ω₁ stays 2.5 SE above it), at 2.5× SAEM's time, but not yet within
SAEM's Monte-Carlo error (−0.81 ± 0.09) nor as fast.  Earlier settings of the same run: cap 0.8 with a 20-SE trust
region, −2.91 ± 0.66 (38 s against 15 s); a first design, an observed-information Newton step on the
Fisher-identity gradients of every parameter (stored anchors, cap 0.95, 20-SE trust region), −0.98 ± 0.75 at 3×
SAEM's time, but it diverged on two fit seeds of three at N = 100 (tests/test_misso.py's data; its quadratic
surrogate in log ω overshoots where EM's closed form does not).  ``MISSO b=10% (Pyro)`` (``--only MISSO``) is the
10 % variant; with that first design it reached −2.12 on seed 0 in 113 s (50 %: −1.84 in 16 s).

MISSO, present default (14 epochs instead of 12, otherwise as above; diagnosis in latentfit/inference/misso.py: the
gap was the rate of convergence, not Monte-Carlo noise).  Output of ``--seeds 0 1 2 --only MISSO`` (199 s, load
average 2.6-5.8; the 10 % variant is ``batch_size=40``, the same 14 epochs)::

    seed 0: SAEM (Pyro)         dLL -0.745  IS -0.906 ± 0.207  max|d|/SE 0.97  total  1.7 s  to SAEM's LL: 257 it, 1.07 s
            MISSO (Pyro)        dLL -1.683  IS -1.901 ± 0.236  max|d|/SE 2.24  total  6.7 s  to SAEM's LL: never
            MISSO b=10% (Pyro)  dLL -1.353  IS -1.560 ± 0.231  max|d|/SE 2.04  total 34.5 s  to SAEM's LL: never
    seed 1: SAEM (Pyro)         dLL -0.786  IS -0.968 ± 0.211  max|d|/SE 0.73  total  1.7 s  to SAEM's LL: 198 it, 0.83 s
            MISSO (Pyro)        dLL -0.628  IS -0.886 ± 0.242  max|d|/SE 0.63  total  5.6 s  to SAEM's LL: 13 it, 5.16 s
            MISSO b=10% (Pyro)  dLL -0.408  IS -0.655 ± 0.236  max|d|/SE 0.47  total 26.3 s  to SAEM's LL: 13 it, 24.37 s
    seed 2: SAEM (Pyro)         dLL -0.909  IS -1.143 ± 0.212  max|d|/SE 0.65  total  1.7 s  to SAEM's LL: 237 it, 1.01 s
            MISSO (Pyro)        dLL -0.313  IS -0.602 ± 0.245  max|d|/SE 0.15  total  5.8 s  to SAEM's LL: 13 it, 5.33 s
            MISSO b=10% (Pyro)  dLL -0.476  IS -0.770 ± 0.252  max|d|/SE 0.19  total 30.1 s  to SAEM's LL: 11 it, 23.62 s

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78        1.7            0.97 (3/3)
    MISSO (Pyro)                -0.87 ±  0.72       -1.13      0.24       1.00        6.0            5.25 (2/3)
    MISSO b=10% (Pyro)          -0.75 ±  0.53       -0.99      0.24       0.90       30.2           23.99 (2/3)

Reading: the mean is at SAEM's level and two data sets of three end within or better than SAEM's Monte-Carlo
error, but seed 0 (maximum at ω₁ ≈ 0.002: the capped step moves log ω₁, whose missing fraction is ≈ 0.999, by
1 % of its gap per iteration; ω₁ = 0.36 at the end, 2.2 SE) is still 0.9 units behind SAEM, so the accuracy goal
is met on two data sets of three, not on all.  The speed goal is not met: MISSO reaches SAEM's final log-likelihood
(minus 0.1) after 13 of 14 epochs, 5.3 s against SAEM's 1.0 s, and its whole run costs 3.5× SAEM's (the 10 %
variant 18×: ten visits per epoch, each dominated by per-call costs).  The 1-unit variant was run for 3 epochs on
seed 1 (a scratch run, load ~2): −833, −477, −245 after epochs 1-3 against the 50 % default's −960, −645, −442, at
72 s against 0.6 s of CPU (400 visits per epoch); its 14 epochs, whose later visits take up to 14 draws, were not
run.

MISSO's cost reduced, the same estimates (latentfit/inference/misso.py, "Cost": the per-unit scores with the chains
vmapped over the one-chain recording inside ``jacfwd``, a visit's draws not re-evaluating the chains, the curvature's
Hessian vectorised; every estimate and history bit for bit as before).  Output of ``--seeds 0 1 2 --only "MISSO
(Pyro)"`` (315 s, torch on one thread, load average 12-16 on the 2 cores: every time is about 3× the load-3 run's)::

    seed 0: SAEM (Pyro)   dLL -0.745  IS -0.906 ± 0.207  max|d|/SE 0.97  total  5.9 s  to SAEM's LL: 257 it, 3.82 s
            MISSO (Pyro)  dLL -1.683  IS -1.901 ± 0.236  max|d|/SE 2.24  total 17.3 s  to SAEM's LL: never
    seed 1: SAEM (Pyro)   dLL -0.786  IS -0.968 ± 0.211  max|d|/SE 0.73  total  6.9 s  to SAEM's LL: 198 it, 3.41 s
            MISSO (Pyro)  dLL -0.628  IS -0.886 ± 0.242  max|d|/SE 0.63  total 20.4 s  to SAEM's LL: 13 it, 18.11 s
    seed 2: SAEM (Pyro)   dLL -0.909  IS -1.143 ± 0.212  max|d|/SE 0.65  total  5.9 s  to SAEM's LL: 237 it, 3.51 s
            MISSO (Pyro)  dLL -0.313  IS -0.602 ± 0.245  max|d|/SE 0.15  total 19.1 s  to SAEM's LL: 13 it, 17.11 s

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78        6.3            3.58 (3/3)
    MISSO (Pyro)                -0.87 ±  0.72       -1.13      0.24       1.00       18.2           17.61 (2/3)

A second run, ``--seeds 0 1 2 --only "MISSO (Pyro)" MCMCSGD`` (205 s, load average 2-6; every estimate again the same,
MCMCSGD's too: it has one chain, which the changes do not touch)::

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    exact maximum (AGQ)         +0.00 ±  0.00       -0.20      0.22       0.00        nan                     -
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78        2.5            1.42 (3/3)
    MCMCSGD (Pyro)              -0.27 ±  0.16       -0.48      0.22       0.61        4.3            2.18 (3/3)
    MCMCSGD (NumPyro)           -0.77 ±  0.07       -1.02      0.23       1.06        2.5            2.03 (3/3)
    MISSO (Pyro)                -0.87 ±  0.72       -1.13      0.24       1.00        8.9            8.92 (2/3)

(MISSO 7.4, 7.3 and 12.2 s on seeds 0-2, the last during a load spike; SAEM 2.4-2.5 s.)

Reading: MISSO's whole run is 2.9× SAEM's in the first run and 3.6× in the second (3.5× before), and it reaches SAEM's
final log-likelihood in 4.9× and 6.3× SAEM's time (5.4× before): wall-time ratios on this shared machine move by more
than the change.  In CPU time, one default fit on data seed 1 alternated with the previous code (old, new, old, new;
load ~15) took 8.2, 7.9 → 6.4, 6.3 s (SAEM 3.5 s): 22% less.  The speed goal is still not met: the MH sweeps are ~65%
of a fit, and they cost what the draws need: ⌈M_k / 10⌉ sweeps of the 10 chains per visit, 204 over the 14 epochs,
each evaluation running the whole data set (the model's observations lie outside its unit plate, so a mini-batch
cannot be run alone): 2040 chain-sweeps of the data against SAEM's 400 one-chain iterations.

After the batched Pyro replay (f3fbcc4, one replay of the recorded density program for all chains) and the cheaper
pure optimiser update (ab5949d), 2 December 2026 (before f4c8a76, the batched program's larger cap, for MISSO).  Output of ``--seeds 0 1 2 --num 400 --threads 1 --only "MISSO
(Pyro)" MCMCSGD`` (451 s; load average 5.3-6.9 on the 2 cores throughout, the process got 54 % of a core: 237 s of
CPU; the SVI row was not run); the printed ΔLL, IS log-likelihoods and iterations to the target are those of the runs
above on every seed (and MCMCSGD's θ history on seed 0 equals the previous code's bit for bit, alternated in one
process)::

    seed 0: SAEM (Pyro)        total  7.1 s  to SAEM's LL: 257 it, 4.58 s
            MCMCSGD (Pyro)     total 11.9 s  to SAEM's LL: 260 it, 6.17 s
            MCMCSGD (NumPyro)  total 26.0 s  iters 3.7 s  to SAEM's LL: 396 it, 2.91 s
            MISSO (Pyro)       total 18.2 s  to SAEM's LL: never
    seed 1: SAEM (Pyro)        total  5.6 s  to SAEM's LL: 198 it, 2.74 s
            MCMCSGD (Pyro)     total  9.2 s  to SAEM's LL: 263 it, 4.86 s
            MCMCSGD (NumPyro)  total  4.7 s  iters 3.7 s  to SAEM's LL: 434 it, 3.17 s
            MISSO (Pyro)       total 17.6 s  to SAEM's LL: 13 it, 15.66 s
    seed 2: SAEM (Pyro)        total  7.2 s  to SAEM's LL: 237 it, 4.28 s
            MCMCSGD (Pyro)     total 10.5 s  to SAEM's LL: 242 it, 5.07 s
            MCMCSGD (NumPyro)  total  4.5 s  iters 3.5 s  to SAEM's LL: 365 it, 2.53 s
            MISSO (Pyro)       total 23.1 s  to SAEM's LL: 13 it, 20.60 s

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    exact maximum (AGQ)         +0.00 ±  0.00       -0.20      0.22       0.00        nan                     -
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78        6.6            3.87 (3/3)
    MCMCSGD (Pyro)              -0.27 ±  0.16       -0.48      0.22       0.61       10.5            5.36 (3/3)
    MCMCSGD (NumPyro)           -0.77 ±  0.07       -1.02      0.23       1.06        3.6            2.87 (3/3)
    MISSO (Pyro)                -0.87 ±  0.72       -1.13      0.24       1.00       18.9           18.13 (2/3)

At this load the torch wall times are 2.1-2.6× the load-2-6 run's above; the ratios to SAEM are what to read: MCMCSGD (Pyro)
1.39× SAEM's time to SAEM's LL (1.53× before), MISSO 4.7× (6.3×), MCMCSGD (NumPyro) 0.74× (1.43×: NumPyro's compiled
iterations do not share the torch process's load the same way; compare within a PPL).  CPU time, one process, data and
fit seed 1, two alternated rounds (load 5.8-6.3, CPU per iteration = the whole fit's process time / iterations):
SAEM 8.6, 8.4 ms; MCMCSGD (Pyro) 10.9, 10.4 ms (with the deep-copying optimiser update, alternated: 10.4, 11.4);
MISSO 710, 787 ms per epoch.  So CPU to SAEM's LL on seed 1: SAEM 198 × 8.5 = 1.7 s, MCMCSGD 263 × 10.7 = 2.8 s
(1.7×), MISSO 13 × 750 = 9.7 s (5.8×).

Why f3fbcc4 changed little here.  At N = 400 MCMCSGD's default is ``ceil(50 / N) = 1`` chain, so the batched program
is the one-chain recording it replaced; and MISSO's 10-chain sweeps did not use it either: 10 chains × 18 000
elements (the largest tensor of the one-chain program, the [6 000, 3] gather of φ) were over the 2**17 cap, so they
replayed per chain (its jacfwd scores run inside a functorch transform, where the adapter keeps vmap over the
one-chain recording anyway).  f4c8a76 raises the cap to 2**18: a whole default MISSO fit (data/fit seed 1, CPU, 1
thread, alternated in one process, 2 rounds, load 5.7-5.9) 9.4, 8.1 → 5.9, 5.4 s, estimates within 1.6e-13.
Output of ``--seeds 0 1 2 --num 400 --threads 1 --only "MISSO (Pyro)"`` after f4c8a76 (153 s, load average 4.2-5.2,
76 % of a core; the printed figures of every fit as before)::

    seed 0: SAEM (Pyro)   total 4.1 s  to SAEM's LL: 257 it, 2.64 s    MISSO (Pyro)  total 9.2 s  to SAEM's LL: never
    seed 1: SAEM (Pyro)   total 3.9 s  to SAEM's LL: 198 it, 1.92 s    MISSO (Pyro)  total 6.6 s  to SAEM's LL: 13 it, 6.08 s
    seed 2: SAEM (Pyro)   total 2.9 s  to SAEM's LL: 237 it, 1.72 s    MISSO (Pyro)  total 6.5 s  to SAEM's LL: 13 it, 5.90 s

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78        3.6            2.10 (3/3)
    MISSO (Pyro)                -0.87 ±  0.72       -1.13      0.24       1.00        7.3            5.99 (2/3)

MISSO's iterations now cost 2.0× SAEM's (2.9× in the run before f4c8a76 above, 3.6× in the load-2-6 run) and it reaches
SAEM's final LL in 2.9× SAEM's time (4.7×, 6.3×).  Profile of a Pyro MCMCSGD iteration
(seed 0, 500 iterations, 1 thread, process time around each part, load ~5): 8.5-8.9 ms in all, of which the saemix
sweep (2, 2, 2) 6.3 ms — 11 density evaluations (the chain re-evaluated at the new θ, then 10 proposals) at about
0.45 ms each, plus the kernels' arithmetic and draws — the Fisher-identity value and gradient 1.0 ms (one forward of
the program with θ requiring grad, 12th evaluation, and its backward), the optimiser update 0.73-0.75 ms, the rest
(unflatten, constrain, averaging, checks) about 0.5 ms; SAEM's whole iteration is 6.2-6.4 ms (the same sweep and a
closed-form M-step).  No evaluation is redundant: the sweep's first evaluation and the gradient's forward are at
(θ_{k−1}, z_{k−1}) and (θ_{k−1}, z_k), and the sweep's own last evaluation gives the gradient's value but not its
graph.  The update deep-copied the torch optimiser object on every step to stay pure; ab5949d copies only the leaf,
the group options and the per-parameter state (the same iterates bit for bit, test_ops::test_torch_flat_optimizer_is_pure_and_steps_as_torch):
0.73-0.75 → 0.49-0.53 ms per step (timed around the update, 3 alternated rounds), 3 % of an iteration, within the
noise of whole-fit timings at this load.

Does "at least as fast as SAEM to the same LL" hold now?  *MCMCSGD (NumPyro)*: yes in wall time (2.87 against SAEM
Pyro's 3.87 s), but that compares a compiled JAX loop with a torch one; against SAEM on NumPyro it was not measured
here.  *MCMCSGD (Pyro)*: no — it needs about as many iterations as SAEM (260/263/242 against 257/198/237) and each costs
~1.25× SAEM's (the gradient and the optimiser step over a closed-form M-step), so it is 1.2-1.8× slower by seed (wall; 1.4× on
average, 1.7× in CPU on seed 1); matching SAEM would need the per-iteration overhead (≈2 ms) gone or fewer iterations (the averaging starts at 250, just before the
crossing).  *MISSO (Pyro)*: no — 2.9× SAEM's time after f4c8a76 (4.7× before, 5.8× in CPU), and it misses the target on
seed 0; what is left is the MH sweeps its M_k draws need (⌈M_k / 10⌉ sweeps of 10 chains per visit), not per-call
overhead.  Accuracy is unchanged: MCMCSGD (both PPLs) within SAEM's
Monte-Carlo error of the exact maximum on every seed, MISSO on two seeds of three.

Can MCMCSGD (Pyro) get to SAEM's LL faster?  Levers measured on 3 December 2026 (scratch runs, N = 400, data seeds
0-2, torch on one thread, load average 5-13 on the 2 cores; ``k`` = iterations until the running estimate reaches
SAEM's final LL − 0.1 as above, ``–`` never; the last row's ``k`` on a grid of 10 iterations; every row but the
last two alters one default)::

    dLL / k                                        seed 0        seed 1        seed 2
    SAEM (Pyro), defaults                       -0.75 / 257   -0.79 / 198   -0.91 / 237
    MCMCSGD defaults                            -0.42 / 260   -0.09 / 263   -0.29 / 242
    average_from=100 (the rate decays from it)  -7.19 / –    -12.27 / –     -5.16 / –
    average_from=150                            -1.11 / –     -2.21 / –     -0.45 / 219
    num_iters=300 (average_from 150)            -1.39 / –     -3.70 / –     -0.63 / 219
    learning_rate=0.1, average_from=100         -1.32 / –     -0.21 / 200   -0.65 / 240
    mcmc_steps=(1, 2, 2)                        -1.73 / –     -0.53 / 226   -0.28 / 240
    mcmc_steps=(0, 2, 2)                        -1.21 / –     -0.47 / 378   -0.19 / 304
    mcmc_steps=(2, 1, 2)                        -1.24 / –     -0.64 / 255   -0.57 / 245
    mcmc_steps=(1, 1, 2)                        -1.11 / –     -0.41 / 252   -0.33 / 177
    gradient at the pre-sweep draws (below)     -1.08 / –     -1.16 / –     -0.47 / 265
    rate 0.1 to t = 90, 0.05 to 240, then
      0.05/√(t−240), averaged from 150          -0.92 / –     -0.10 / 220   -0.81 / 200

* **Where the time goes.**  CPU per iteration, the engines' ``step`` on data seed 0 in one process, 8 alternated
  blocks of 50 iterations (load 11-12): MCMCSGD 8.24 ms (median; min 7.79), SAEM 6.72 ms (5.81): 1.23× (a second
  timing at load 6-10: 7.99 against 5.93 ms, 1.35×).  The sweep is the same; MCMCSGD adds the gradient's forward
  and backward pass (~1.0 ms), the optimiser step (~0.5 ms) and the flat-vector bookkeeping (~0.5 ms).  So it must
  reach the target in 0.75-0.8× SAEM's iterations to break even.
* **Iterations.**  The averaged estimate reaches SAEM's LL only once the averaging has started after the iterate's
  transient: at Adam's 0.05 the iterate's LL is still −21 to −42 at iteration 100 and −2.5 to −7 at 150 (a step of
  Adam moves each coordinate by at most about η, and β₁ must travel from 0 to −4), and its constant-rate noise keeps
  it 1-4 LL units below the maximum, which only the average removes.  Starting the average (and the decay) earlier
  freezes an unconverged iterate (rows 3-5); a larger rate shortens the transient (the iterate at −1.6 to −6 by
  iteration 100) but leaves seed 0 1.3 below; fewer kernel steps make an iteration up to a quarter cheaper ((1, 1, 2):
  8 model evaluations instead of 12) but leave seed 0 short of SAEM's LL and are not faster on seed 1.  None beats
  SAEM on all three seeds.
* **Single fits are noisy on data seed 0.**  With fit seeds 10, 11, 12 on data seed 0: SAEM −1.29, −1.63, −0.52;
  MCMCSGD (defaults) −1.24, −1.74, −0.92 (never reaching SAEM's seed-0 LL): the default's −0.42 with fit seed 0 was a
  lucky draw, and a single-fit "time to SAEM's LL" compares two random variables whose spread (≈ 0.5 LL units) is the
  size of the gaps above.
* **Over fit seeds, with a fixed target.**  12 more fits of each (data seeds 0-2 × fit seeds 10-13, defaults, load
  6-12), the target the exact maximum's LL − 0.9 (SAEM's mean ΔLL over data seeds, −0.81, minus 0.1): final ΔLL
  SAEM −0.94 on average (−2.27 to −0.11; 7 of 12 end at or above the target), MCMCSGD −0.67 (−1.74 to −0.05; 8 of
  12); the running estimate first reaches the target in 9 of 12 fits for both, after a median of 226 iterations
  (SAEM: 182-303) against 259 (MCMCSGD: 193-377; fewer than SAEM in 1 of the 7 fits where both reach it).  At
  1.23-1.35× the CPU per iteration that is 1.4-1.55× SAEM's CPU time to the same log-likelihood, while ending 0.27
  LL units closer to the maximum: the accuracy goal is met, the speed goal is not.
* **Sharing the gradient's forward pass with the sweep (dropped).**  Taking the gradient at the chains' draws
  ``z_{k−1}`` *before* the sweep makes its forward pass also the sweep's starting log-densities at ``θ_{k−1}``: one
  evaluation of 12 fewer, 7.93 ms (min 7.44) against 8.24 in the same block timing (−4%).  But the draws then target
  ``θ_{k−2}``, and ΔLL got worse on 5 of 6 fits (the row above; data seed 0, fit seeds 10-12: −2.16, −1.25, −1.81
  against −1.24, −1.74, −0.92; mean of the six differences −0.54 LL units).  Why: where a unit's data say little
  about its random effect (the intercept: posterior ≈ prior), the draws carry the previous location, and the score
  Σ_i (z_i − β)/ω² gains a term ≈ −N (β_{k−1} − β_{k−2}) / ω₁² (N / ω₁² ≈ 7 000 here, against an observed
  information of 1/SE² ≈ 60 for β₁): a drag that outweighs the signal while β moves.  Seed 1, β₁ − β̂₁ of the
  iterate at iterations 200 / 300 / 400: 0.40 / 0.21 / 0.16 with the lag against 0.15 / −0.02 / −0.03 without.  The
  "O(η) bias" of one step of lag is multiplied by the complete-data information, here 100× the observed one.
* **Chains transported with θ (dropped, one seed).**  Moving the chains with the prior before each sweep,
  ``z ← β_k + ω_k (z − β_{k−1}) / ω_{k−1}``, did not shorten the transient (seed 1: iterate LL −55 at iteration 100
  against −42; final ΔLL −0.08): the transient is Adam's step length, not the chains' lag.

What would: a cheaper iteration *and* a shorter transient, together.  The gradient of the log-prior alone, where the
model's likelihood does not depend on θ (as here; the same iterate bit for bit), measured as a scratch subclass with
``Normal(β, ω).log_prob(z)`` for the model's density in the gradient, the same block timing (load 6-10): 7.39 ms
median (min 6.54) against MCMCSGD's 7.99 (7.56) and SAEM's 5.93 (5.57), i.e. 1.25× SAEM instead of 1.35× — in the
library it would be the Pyro adapter's recorded program with the likelihood's output pruned, or the recognised
Gaussian prior in closed form, used when no observed site depends on a free parameter.  Even so an iteration costs
the optimiser step and the bookkeeping more than SAEM's closed-form M-step, so MCMCSGD must also need ≤ 0.8× SAEM's
iterations, i.e. a transient shorter than Adam's at η = 0.05 allows (a curvature-scaled step; the Newton–Robbins–Monro
and BHHH preconditioners tried earlier failed, see below).  Neither is in this change, which alters no default and no
code: the multi-seed table above stands.

Fisher scoring, ``optimizer="fisher"`` (latentfit/inference/preconditioned.py; 3 December 2026, scratch runs then
the library's step; Pyro, N = 400, data = fit seeds 0-2, torch on one thread, load average 9-14 on the 2 cores; ``k`` =
iterations until the running estimate reaches SAEM's final LL − 0.1 (SAEM: 257 / 198 / 237), ``–`` never)::

    dLL / k                                                   seed 0        seed 1        seed 2
    Newton, observed complete Hessian −∇² log p(y, z)         diverged (first step β₃ → 8e6)
    Fisher scoring, γ = 1 to t = 100, averaged from 110     -2.75 / –     -9.18 / –     -0.10 / 81
      the same, γ = 1 to t = 150                            -1.44 / –         -             -
    30 Fisher steps, then Adam 0.05, averaged from 100      -1.11 / –     -1.32 / –     -0.41 / 72
    heavy ball (a 3, μ 0.8) 60 steps, γ = 1 to 100          -0.90 / –     -0.61 / 165   -0.77 / 81
      the same, 100 steps, γ = 1 to 150                     -3.67 / –         -             -
    library: 60 tapered heavy-ball steps, trust region     -1.37 / –     -0.41 / 96    -0.64 / 200
      untapered a 2, μ 0.6                                  -2.02 / –     -1.81 / –     -0.62 / 162

* The complete-data Hessian in (β, log ω) is indefinite off the maximum (its (β₁, log ω₁) block has determinant
  ∝ N²(v − m²): negative while the draws' mean offset m from β exceeds their sd), so the step uses the *expected*
  information of the latents' prior, from one prior draw of every unit at θ_{k−1}, plus the likelihood's observed
  information at the chains (zero here: θ enters only the prior).
* Fisher scoring alone is EM: β₁ is at −3.37 after 100 iterations on seed 1 (maximum −3.92, SE 0.125) and creeps at
  the EM rate, the complete information of the intercept (N/ω₁² ≈ 7 400) being 100× the observed one (≈ 64).  SAEM
  escapes this phase by annealing ω; here heavy-ball momentum (rate a, momentum μ; stable for a < 2(1 + μ) since the
  observed information is at most the complete one) shortens it: the iterate is 6-16 LL units below the maximum
  after 30 iterations (Adam: 21-42 after 100).  But the momentum also amplifies the draws' noise, and where it
  leaves the iterate decides the rest (the EM-rate phase again): seed 0, whose maximum has ω₁ = 0.002 on the
  boundary, ends 1.4 units below the maximum (SAEM −0.75) in every variant, i.e. outside SAEM's Monte-Carlo error.
* Cost: the information is a Hessian of the prior's density at the prior draws every iteration.  CPU per
  iteration, whole fits on seed 1 divided by their iterations, alternated in one process (load 9-14): SAEM 7.75,
  MCMCSGD Adam 11.1, Fisher 15.2 ms (medians of 2); with the Hessian's p reverse passes batched
  (``vectorize=True``, the same iterates): Fisher 13.0-13.2 against SAEM 6.9-8.7 ms.  At 1.7× SAEM's CPU per
  iteration, Fisher must need fewer than 0.6× SAEM's iterations: it did on seed 1 only (96 against 198).

Output of ``--seeds 0 1 2 --num 400 --threads 1 --only SAEM MCMCSGD`` with the rows ``MCMCSGD fisher`` (``optimizer=
"fisher"``, all else default; 1408 s, load average 14 falling to 4 during the run: wall times are comparable within a
seed only, and roughly; the Pyro Fisher rows ran before the Hessian was vectorised, the same iterates)::

    seed 0:  SAEM (Pyro)               dLL -0.745  to SAEM's LL: 257 it, 16.15 s
             MCMCSGD (Pyro)            dLL -0.417                260 it, 20.99 s
             MCMCSGD (NumPyro)         dLL -0.831                396 it,  3.77 s
             MCMCSGD fisher (Pyro)     dLL -1.374                never
             MCMCSGD fisher (NumPyro)  dLL -1.471                never    (compile 157 s at load 14)
    seed 1:  SAEM (Pyro)               dLL -0.786                198 it,  7.14 s
             MCMCSGD (Pyro)            dLL -0.094                263 it, 15.53 s
             MCMCSGD (NumPyro)         dLL -0.690                434 it,  2.19 s
             MCMCSGD fisher (Pyro)     dLL -0.412                 96 it,  3.86 s
             MCMCSGD fisher (NumPyro)  dLL -0.697                167 it,  1.32 s
    seed 2:  SAEM (Pyro)               dLL -0.909                237 it,  3.19 s
             MCMCSGD (Pyro)            dLL -0.293                242 it,  3.84 s
             MCMCSGD (NumPyro)         dLL -0.799                365 it,  1.45 s
             MCMCSGD fisher (Pyro)     dLL -0.637                200 it,  2.46 s
             MCMCSGD fisher (NumPyro)  dLL -0.453                122 it,  0.65 s

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)
    ------------------------------------------------------------------------------------------------------------
    exact maximum (AGQ)         +0.00 ±  0.00       -0.20      0.22       0.00        nan                     -
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78       15.0            8.83 (3/3)
    MCMCSGD (Pyro)              -0.27 ±  0.16       -0.48      0.22       0.61       25.9           13.45 (3/3)
    MCMCSGD (NumPyro)           -0.77 ±  0.07       -1.02      0.23       1.06        3.1            2.47 (3/3)
    MCMCSGD fisher (Pyro)       -0.81 ±  0.50       -1.05      0.23       0.96       35.5            3.16 (2/3)
    MCMCSGD fisher (NumPyro)    -0.87 ±  0.53       -1.11      0.23       1.09        3.6            0.99 (2/3)

The Adam rows are the earlier runs' fits, bit for bit (same ΔLL and iterations).  In CPU time (iterations × the
alternated per-iteration medians above, SAEM 7.8 and Fisher 13.1 ms): seed 1 Fisher 1.26 s against SAEM 1.54 s (0.82×),
seed 2 2.62 s against 1.85 s (1.42×), seed 0 never (SAEM 2.0 s).  The NumPyro Fisher rows reach SAEM's LL in fewer
iterations than NumPyro's Adam on seeds 1-2 (167 / 122 against 434 / 365) and miss it on seed 0 likewise.

So ``optimizer="fisher"`` is an option, not the default: it shortens the transient several-fold, but it misses SAEM's
log-likelihood on seed 0 (−1.37 / −1.47, outside SAEM's Monte-Carlo error −0.81 ± 0.09) and costs 1.7× SAEM per
iteration on Pyro, so it is not faster than SAEM to SAEM's log-likelihood on all three data sets.

The pruned gradient (``prune=True``, the default since ee9d00c; 3 December 2026).  θ = (β, ω) enters only the random
effects' prior ``Normal(β, ω)``, so ``∇_θ log p(y, z; θ) = ∇_θ log p(z; θ)``: MCMCSGD's gradient, Fisher scoring's
information and MISSO's scores and curvature now come from the adapter's closed-form Gaussian prior, without running
the model (``latentfit.inference.mcmcsgd.prior_only_log_density``: the independence of the observed sites from θ is
read from the model's own computation, torch's autograd graph or JAX's jaxpr, and the closed form is checked against
the model's gradient at the start).  The fits are those of the full gradient up to rounding: on every seed the same
ΔLL and the same iterations to SAEM's LL as the tables above (Adam −0.417 / 260, −0.094 / 263, −0.293 / 242;
Fisher −1.374 / never, −0.412 / 96, −0.637 / 200; scratch runs, load 8-18).  CPU (torch on one thread, load 8-19 on
the 2 cores):

    MCMCSGD (Pyro), per iteration, the three seeds back to back (full → pruned):  10.61 → 9.81, 10.39 → 9.42,
        12.40 → 11.24 ms (SAEM in the same runs 9.46, 7.68, 8.61 ms)
    data seed 1, whole fits alternated in one process (medians of 2, first round included; per iteration):
        SAEM 13.60 ms (its fit CPU 5.44 s: the SAEM of the working tree, which held another helper's changes)
        MCMCSGD Adam     full 12.68 → pruned 12.15 ms          Fisher full 17.21 → pruned 15.52 ms
        Fisher pruned, Γ refreshed every 5 steps (information_every=5): 13.26 ms
        MISSO default fit: full 10.36, 7.66, 8.11, 8.77 s → pruned 5.88, 5.24, 6.98, 5.79 s (four alternated pairs)
    NumPyro (compiled), data seed 1, two alternated rounds after a warm-up: MCMCSGD Adam 1.99, 2.35 → 2.10, 2.14 s per
        fit, Fisher 2.14, 2.57 → 2.21, 2.38 s (the same estimates to 6 digits: XLA already dropped the likelihood's
        backward pass; the warm-up fits' compilations 76 → 50 s and 164 → 121 s of wall time at load 19)

So the pruned gradient saves 0.5-1.2 ms of a Pyro MCMCSGD iteration (the model's forward pass over the 6 000 rows,
≈ 8 %) and a quarter of a MISSO fit (the per-visit scores), and costs nothing on NumPyro.  It does not change the
verdict on the speed goal: MCMCSGD with Adam still needs as many iterations as SAEM (242-263 against 198-257), so
it is not faster than SAEM on seed 1 (263 against 198 iterations); Fisher scoring reaches SAEM's LL in fewer
iterations on seeds 1-2 but costs 1.5-1.65× SAEM per iteration in the back-to-back runs (12.66 against 7.68 ms,
12.55 against 8.61 ms): 1.22 s against SAEM's 1.52 s of CPU to the target on seed 1, 2.51 s against 2.04 s on seed
2, and never on seed 0; refreshing Γ every 5 steps saves about 2 ms an iteration but made seed 0 worse (ΔLL −3.42, a
scratch run).  MISSO: see the run below.

Output of ``--seeds 0 1 2 --num 400 --threads 1 --only "MCMCSGD (Pyro)" "MCMCSGD (NumPyro)" "fisher (Pyro)" "MISSO
(Pyro)"`` on a clean export of ee9d00c (2227 s; load average 12-20 on the 2 cores, with load spikes: the wall times
compare nothing, e.g. MCMCSGD (Pyro) 39.9 s against SAEM's 7.6 s on seed 1; read the ΔLL and the iterations, every
one the same as before the pruned gradient)::

    seed 0:  SAEM (Pyro)            dLL -0.745   to SAEM's LL: 257 it
             MCMCSGD (Pyro)         dLL -0.417                 260 it
             MCMCSGD (NumPyro)      dLL -0.831                 396 it
             MCMCSGD fisher (Pyro)  dLL -1.374                 never
             MISSO (Pyro)           dLL -1.683                 never
    seed 1:  SAEM (Pyro)            dLL -0.786                 198 it
             MCMCSGD (Pyro)         dLL -0.094                 263 it
             MCMCSGD (NumPyro)      dLL -0.690                 434 it
             MCMCSGD fisher (Pyro)  dLL -0.412                  96 it
             MISSO (Pyro)           dLL -0.628                  13 of 14 epochs
    seed 2:  SAEM (Pyro)            dLL -0.909                 237 it
             MCMCSGD (Pyro)         dLL -0.293                 242 it
             MCMCSGD (NumPyro)      dLL -0.799                 365 it
             MCMCSGD fisher (Pyro)  dLL -0.637                 200 it
             MISSO (Pyro)           dLL -0.313                  13 of 14 epochs

    method                           dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE
    ---------------------------------------------------------------------------
    SAEM (Pyro)                 -0.81 ±  0.09       -1.01      0.21       0.78
    MCMCSGD (Pyro)              -0.27 ±  0.16       -0.48      0.22       0.61
    MCMCSGD (NumPyro)           -0.77 ±  0.07       -1.02      0.23       1.06
    MCMCSGD fisher (Pyro)       -0.81 ±  0.50       -1.05      0.23       0.96
    MISSO (Pyro)                -0.87 ±  0.72       -1.13      0.24       1.00

The goal "MCMCSGD and MISSO (Pyro, defaults) at least as fast as SAEM to SAEM's LL on every seed" is still not met:
MCMCSGD needs 260 / 263 / 242 iterations against SAEM's 257 / 198 / 237 at 1.04-1.31× its CPU per iteration (the
back-to-back runs above), and MISSO reaches SAEM's LL only at its 13th epoch (seeds 1-2) or never (seed 0).

Fisher scoring: a longer γ = 1 phase, and ``information="exact"`` (3 December 2026, later).  Two new options of
``optimizer="fisher"`` (latentfit/inference/preconditioned.py), defaults unchanged: (1) ``momentum_steps`` (default,
as before, 60 % of the steps before ``average_from = burn_in + num_iters / 5``: 60 and 110 of 500 iterations), so that
the 60 heavy-ball steps can be followed by a longer γ = 1 phase, ``average_from=210, momentum_steps=60`` ("long γ = 1"
below); (2) ``information="exact"``: the prior's part of Γ is its exact expectation,
the mean of the log-prior's Hessian over the 2d sigma points ``μ_i ± √d L e_j`` of every unit (exact because
``log p(z; θ)`` is quadratic in z; here diag(N/ω², 2N) in (β, log ω), tested against that closed form), instead of
one prior draw per unit.  Scratch harness (/tmp, not in the repository: the same data, exact maxima, AGQ checkpoints
and ``first_reach`` as ``--seeds``), Pyro, N = 400, torch on one thread, load average 5-7 on the 2 cores.  ``k`` =
iterations until the running estimate reaches SAEM's final LL − 0.1; CPU = k × the step's CPU per iteration,
measured by timing ``engine.step`` in one process, 6 alternated blocks of 40 iterations after 20 of warm-up (data
seed 0, load 4.8-6.3; medians): SAEM 4.89 ms, MCMCSGD Adam 5.78 (1.18×), Fisher 7.09 (1.45×), Fisher
``information="exact"`` 11.38 (2.33×: its Hessian runs over 6 × 400 sigma points; 1.4 → 4.2 ms)::

    dLL / k / CPU to SAEM's LL          seed 0                  seed 1                 seed 2
    SAEM                             -0.745 / 257 / 1.26 s   -0.786 / 198 / 0.97 s   -0.909 / 237 / 1.16 s
    MCMCSGD Adam (default)           -0.417 / 260 / 1.50 s   -0.094 / 263 / 1.52 s   -0.293 / 242 / 1.40 s
    fisher (default schedule)        -1.374 / never          -0.412 /  96 / 0.68 s   -0.637 / 200 / 1.42 s
    fisher, long γ = 1               -1.128 / 158 / 1.12 s   -0.243 /  96 / 0.68 s   -0.206 / 120 / 0.85 s
    fisher, long γ = 1, "exact"      -1.019 / 159 / 1.81 s   -0.522 /  78 / 0.89 s   -0.762 /  68 / 0.77 s
    NumPyro fisher (default)         -1.471 / never          -0.697 / 167            -0.453 / 122
    NumPyro fisher, long γ = 1       -1.152 / never          -1.011 / 143            -1.148 / 116

With the long γ = 1 phase, Pyro's Fisher scoring reaches SAEM's log-likelihood on all three seeds in 0.40-0.61× SAEM's
iterations and, at 1.45× its CPU per iteration, in 0.70-0.89× its CPU (iterations only, as the table's "time to SAEM
LL": set-up and the result's post-processing excluded).  The crossing is made by the iterate itself (before the
averaging starts at 210): on seed 0 the final average ends 0.38 LL units below SAEM's (−1.13 against −0.75), within
SAEM's own spread over fit seeds (below) but not better.  In whole-fit CPU per iteration (``time.process_time`` around
each fit divided by its iterations; single fits, not alternated, at load 5-7: SAEM 2.4-3.1 s per fit of 400
iterations, Fisher 4.3-5.4 s per 500, i.e. 1.5-1.8× per iteration) it is 1.70 / 0.83 / 1.19 s against SAEM's
1.51 / 1.53 / 1.38 s: slower on seed 0.  (A profile of one Fisher fit: the sweep 5.3 s of 8.4 under cProfile, Γ's
Hessian 1.4 s, set-up and result negligible.)  The exact
information shortens the approach on seeds 1-2 (78 / 68 iterations) but costs more than it saves; it stays an
option (noise-free Γ, no stream drawn).  Refreshing Γ every step of the heavy-ball phase but only every 5th / 10th
step after it (a scratch patch; ``information_every`` alone also thins the momentum steps, where a stale Γ is
unstable) saves about 1.4 ms of Hessian per thinned step but costs iterations: dLL / k −0.98 / never, −0.08 / 148,
−0.45 / 191 (every 5th) and −0.67 / 271, −0.80 / 118, −0.80 / 307 (every 10th), against −1.13 / 158, −0.24 / 96,
−0.21 / 120 refreshed every step: not kept.  Single fits are noisy (±0.5 LL units, see above), so the same comparison
with fit seeds 10 and 20 on each data set (9 fits in all with the table's; the target is each fit seed's own SAEM)::

    dLL / k              data 0: fit 10 / fit 20       data 1: fit 10 / fit 20      data 2: fit 10 / fit 20
    SAEM                 -1.29 / 188   -1.89 / 285     -1.51 / 288   -0.70 / 368    -2.27 / 126   -0.69 / 259
    MCMCSGD Adam         -1.24 / 368   -0.86 / 274     -0.43 / 192   -1.94 / never  -0.72 / 156   -0.30 / 272
    fisher (default)     -2.04 / never -0.93 / 104     -1.08 /  77   -0.07 /  67    -2.66 / never -0.22 /  54
    fisher, long γ = 1   -2.44 / never -1.04 / 151     -1.43 /  77   -0.31 /  67    -0.32 / 138   -0.44 /  54

Over the 9 Pyro fits: mean ΔLL SAEM −1.20, Adam −0.70, Fisher (default) −1.05, long γ = 1 −0.84; reached SAEM's
LL: Adam 8, Fisher 6, long γ = 1 8 of 9; faster than SAEM to it in step CPU: Adam 1, Fisher 5, long γ = 1 7 of 9 (not
data 0 / fit 10, never; data 2 / fit 10, 138 against SAEM's 126 iterations).  The long γ = 1 phase removes two of the
three "never"s and is better on the Pyro table's three seeds, but not on every fit (fit seed 20: −0.93 → −1.04,
−0.07 → −0.31, −0.22 → −0.44) and not on NumPyro (the table: ΔLL worse on seeds 1-2, seed 0 still never), so the
default schedule is unchanged.  Verdict on the issue's goal (not met): with ``optimizer="fisher", average_from=210,
momentum_steps=60`` Pyro MCMCSGD is at least as fast as SAEM to SAEM's log-likelihood on the benchmark's 3 seeds in
iteration CPU, but not in whole-fit CPU on seed 0, not on every fit seed (7 of 9), and not on NumPyro (seed 0
never); MCMCSGD's default (Adam) is faster in 1 of 9 fits; MISSO was not changed (epoch 13 of 14, or never on seed
0, as above).  The ``--seeds`` script's own run of these rows was not made (the row ``MCMCSGD fisher exact (Pyro)``
and the CPU column were added to ``--seeds``).

Cost per iteration, and the exact information in closed form (4 December 2026, issue 11 items 1-2).  Where the step
goes, Pyro, N = 400, data seed 0, ``engine.step`` timed in one process by parts (process time around the sweep and
around the whole step), 10 alternated blocks of 20 steps after 20 of warm-up, medians (load 7.8 on the 2 cores, other
helpers' jobs running)::

                              model evaluations / step    step     sweep    rest
    SAEM                                11                5.82     5.44     0.39 ms
    MCMCSGD Adam                        11                6.47     5.43     1.06
    MCMCSGD fisher (information draw)   11                8.35     5.46     2.89
    MCMCSGD fisher, information exact   11               11.38 (before) → 7.31 (5.31 sweep, 2.01 rest)

The sweeps are the same (11 evaluations of the model: the chains at the new θ, then 10 proposals; the pruned gradient
runs no model), so everything MCMCSGD adds is in "rest": the gradient of the closed-form prior (one backward pass,
≈ 0.4 ms), the optimiser step, and for Fisher scoring Γ.  Changes: (1) torch's named optimisers ("sgd", "adam",
"amsgrad") are pure tensor updates, op for op torch.optim's single-tensor step, instead of an optimiser object copied
and stepped per iteration (≈ 0.3 ms; the iterates bit for bit those of torch.optim, tests/test_ops.py, and a 150-
iteration Adam fit's history hash unchanged); (2) ``information="exact"`` no longer differentiates the log-prior over
the 2d × N sigma points (4.2 ms): every unit's prior being the same, Γ = N Jᵀ I₁ J with I₁ one unit's information in
closed form (1/σ² for a mean, 2/σ² for a sd) and J = dθ/dx from the transforms' own log|det| — equal to the sigma
points to 1e-12 (tests/test_mcmcsgd_fisher.py) and, on this model, the same fits (seed 0: −1.019 / 159 as before).
A second timing (load 8): SAEM 8.06, Adam 8.71 (1.08×), fisher draw 11.37 (1.41×), fisher exact 9.26 ms (1.15×).
What is left of "rest" (≈ 1.4 ms for Fisher over SAEM's 0.4) is per-op overhead of eager torch on a 6-vector (the
gradient's backward pass, the eigen-solve, the trust region, the flat-vector bookkeeping).

Over 9 fits (data seeds 0-2 × fit seeds {data seed, 10, 20}; scratch harness with this file's data, exact maxima,
``running_log_lik`` and ``first_reach``; target = the same fit seed's SAEM final LL − 0.1; "CPU" = iterations to it ×
the step CPU per iteration above (SAEM 5.82, Adam 6.47, fisher draw 8.35, fisher exact 7.31 ms); ``-`` never; load
6-9, torch on one thread; "long" = ``average_from=210, momentum_steps=60``; fits of Adam and of the draw variants are
the earlier code's bit for bit, their CPU the new one's)::

    dLL / k / CPU       d0/f0           d0/f10          d0/f20          d1/f1           d1/f10          d1/f20          d2/f2           d2/f10          d2/f20
    SAEM              -0.75/257/1.50  -1.29/188/1.09  -1.89/285/1.66  -0.79/198/1.15  -0.52/193/1.12  -1.58/270/1.57  -0.91/237/1.38  -0.11/318/1.85  -0.97/333/1.94
    Adam (default)    -0.42/260/1.68  -1.24/368/2.38  -0.86/274/1.77  -0.09/263/1.70  -0.62/-         -0.93/193/1.25  -0.29/242/1.57  -0.05/302/1.95  -0.14/169/1.09
    fisher            -1.37/-         -2.04/-         -0.93/104/0.87  -0.41/96/0.80   -0.68/-         -0.13/53/0.44   -0.64/200/1.67  -0.96/-         -0.78/187/1.56
    fisher long       -1.13/158/1.32  -2.44/-         -1.04/151/1.26  -0.24/96/0.80   -0.39/218/1.82  -0.85/53/0.44   -0.21/120/1.00  -0.39/-         -0.53/144/1.20
    fisher exact      -1.50/-         -1.09/164/1.20  -1.62/90/0.66   -0.34/78/0.57   -0.73/-         -1.21/52/0.38   -0.74/68/0.50   -0.04/112/0.82  -0.44/101/0.74
    fisher exact long -1.02/159/1.16  -0.57/166/1.21  -1.17/90/0.66   -0.52/78/0.57   -0.28/229/1.67  -1.12/52/0.38   -0.76/68/0.50   -0.00/210/1.54  -1.34/160/1.17

    over the 9 fits       mean dLL (SAEM -0.98)   reach SAEM's LL   faster than SAEM to it (step CPU)
    Adam (default)             -0.52                  8 / 9               2 / 9
    fisher                     -0.88                  5 / 9               4 / 9
    fisher long                -0.80                  7 / 9               6 / 9
    fisher exact               -0.86                  7 / 9               6 / 9
    fisher exact long          -0.75                  9 / 9               7 / 9

(SAEM's d1/f10, d2/f10 and d2/f20 fits are not the ones of the earlier 9-fit table above, whose harness seeded those
fits differently; d0's are the same.)  ``optimizer="fisher", information="exact", average_from=210,
momentum_steps=60`` reaches SAEM's log-likelihood on every fit, ends closer to the maximum on average (−0.75 against
SAEM's −0.98; range −1.34 to −0.00, SAEM −1.89 to −0.11), and is faster than SAEM to it in 7 of 9 fits (0.24-0.83× its
CPU; slower on d0/f10, 1.21 against 1.09 s (1.11×), and d1/f10, 1.67 against 1.12 s (1.49×)).  The crossing is made by the γ = 1
iterate before the averaging starts (k ≤ 229); the average that follows is noisier than the iterate at first (seed 0:
the iterate at −0.78 at iteration 159, the average −2.64 at 227, −1.02 at 500).  The goal "at least as fast as SAEM
to the same LL" is therefore **not met on every fit** (7 of 9, Pyro), and MCMCSGD's default (Adam) is faster in 2 of
9; no default was changed.  NumPyro, the same 9 fits (``optimizer="fisher", information="exact", average_from=210,
momentum_steps=60``; target: the Pyro SAEM fit's LL − 0.1 on the same data and fit seed; dLL / k)::

    NumPyro fisher exact long  -1.28/-  -0.98/212  -0.66/91  -0.78/73  -0.65/-  -0.44/73  -1.23/130  -0.29/-  -0.61/173

mean dLL −0.77; reaches the target in 6 of 9 fits (in fewer iterations than SAEM in 5 of them); never on d0/f0,
d1/f10, d2/f10 — so on NumPyro too the variant is not faster on every fit, and it stays an option.  MISSO was not
changed this round.

Fisher scoring, γ = 1 to the end (``schedule="sem"``, the default of ``optimizer="fisher"`` since 4 December 2026).
Why the variants above were a lottery: the running estimate's LL of "fisher exact long" (the stored checkpoints of the
9 fits) settles within ~30 iterations of ``average_from = 210`` at the value the γ = 1 iterate had there (d0/f0: −0.78 at
iteration 159, −2.64 at 227, −1.02 at 500; d2/f10 Pyro −0.06 at 227, −0.00 at 500, NumPyro −0.42, −0.29): with Γ the
*complete* information a step γ < 1 moves a direction by γ λ of its gap (λ = observed / complete information, ≈ 0.01
for ω₁), so the decaying γ freezes the iterate and the average only removes the noise of the fast directions.  The γ = 1
iterate itself is stochastic EM in θ: it never converges, but its spread around the maximum is of the Monte-Carlo
order in every direction (an AR(1) of coefficient 1 − λ: stationary LL deficit ≈ ¼ per direction, whatever λ), and a
long average of it loses the noise of every direction (for a stable linear recursion the long-run mean is the noise's
mean over the Jacobian, whatever the step).  PPLs: the same table of draws fed to both (the sweep's output replaced, all
else as is: 300 iterations of "fisher exact long") gives the same iterates on Pyro and NumPyro, 6e-9 at iteration 70
(≤ 9e-7 in the heavy-ball phase) and 2e-16 after it, the same final estimate to 6e-17: the code paths are one
algorithm, and NumPyro's 6/9 against Pyro's 9/9 above was Monte-Carlo luck (the two fits NumPyro missed, d1/f10 and
d2/f10, Pyro reached at iterations 229 and 210, on the averaging's first steps).

Averaging study (scratch harness with this file's data, exact maxima, ``running_log_lik`` and ``first_reach``; one fit
per cell with ``optimizer="fisher", information="exact", momentum_steps=60`` and γ = 1 to iteration 499, its iterates
averaged offline; the library's ``schedule="sem"`` reproduces the "linear from 70" running estimate to 1e-16; target:
the same PPL's SAEM fit of the same data and fit seed, final LL − 0.1; "faster" = k × the step-CPU ratio below ≤
SAEM's k)::

    9 fits (d0-2 x f{s, 10, 20})     Pyro: mean dLL / reach / faster     NumPyro: mean dLL / reach / faster
    the γ = 1 iterate                     -0.96   8/9   6/9                   -1.27   8/9   6/9
    uniform mean from 70                  -0.50   9/9   8/9                   -0.45   9/9   8/9
    linear weights from 70  (= "sem")     -0.53   9/9   9/9                   -0.43   9/9   8/9
    weights ∝ t³ from 70                  -0.58   9/9   8/9                   -0.46   9/9   7/9
    last half of the iterates since 70    -0.61   9/9   9/9                   -0.46   9/9   7/9
    uniform / linear from 100             -0.51 / -0.54, 8/9 faster           -0.45 / -0.43, 7/9 / 8/9
    fisher exact long (before)            -0.75   9/9   7/9                   -0.77   6/9 (target Pyro SAEM's)

Step CPU (``engine._run_chunk`` timed in one process, data seed 0, 8 alternated blocks of 25 iterations after 100 of
warm-up, medians, NumPyro compiled; load 2.8-3.7 on the 2 cores): Pyro SAEM 4.45, fisher exact "sem" 5.24 (1.18×),
Adam 4.94 ms (1.11×); NumPyro SAEM 3.88, fisher exact "sem" 3.96 (1.02×), Adam 3.91 ms (1.01×).

18 fits per PPL (the 9 above and fit seeds 30, 40, 50 on each data seed, new fits with the library's default
``optimizer="fisher", information="exact"``), dLL / k (iterations to the same PPL's SAEM final LL − 0.1), ``*`` faster
than SAEM in step CPU, ``-`` never::

    Pyro      d0: f0        f10        f20        f30        f40        f50        d1: f1     f10        f20        f30        f40        f50        d2: f2     f10        f20        f30        f40        f50
    SAEM      -0.75/257  -1.29/188  -1.89/285  -1.44/328  -2.03/320  -2.24/162  -0.79/198  -0.52/193  -1.58/270  -0.40/279  -1.65/161  -1.39/162  -0.91/237  -0.11/318  -0.97/333  -0.55/292  -0.22/309  -0.74/251
    sem       -0.37/177* -1.15/133* -1.55/93*  -0.74/121* -0.75/76*  -0.72/66*  -0.33/60*  -0.26/84*  -0.28/52*  -0.11/276  -1.76/65*  -0.33/95*  -0.57/68*  -0.02/126* -0.23/96*  -0.01/89*  -0.31/138* -0.23/68*
    NumPyro
    SAEM      -3.49/151  -1.85/230  -1.40/306  -1.02/236  -1.64/180  -0.56/304  -0.55/310  -0.84/181  -0.77/251  -1.00/192  -0.83/307  -0.27/314  -0.42/233  -0.48/205  -0.38/277  -1.16/176  -0.66/205  -0.31/273
    sem       -0.68/36*  -0.52/112* -0.72/181* -0.53/232  -0.93/263  -0.77/214* -0.33/73*  -0.71/102* -0.21/78*  -0.09/83*  -0.17/202* -0.25/416  -0.36/434  -0.02/70*  -0.32/83*  -0.21/104* -0.20/159* -0.97/-

    over the 18 fits     mean dLL (SAEM)     reaches SAEM's LL    faster than SAEM to it (step CPU)
    Pyro  sem             -0.54 (-1.08)          18/18                  17/18
    NumPyro sem           -0.44 (-0.98)          17/18                  13/18

Verdict: with ``optimizer="fisher", information="exact"`` (now γ = 1 to the end, linear averaging) MCMCSGD ends closer
to the maximum than SAEM on average on both PPLs (by 0.5 LL units) and reaches SAEM's final log-likelihood faster in
17 of 18 Pyro fits (the loss, d1/f30: 276 against 279 iterations at 1.18× the CPU per iteration, a target 0.5 below
the maximum) but in 13 of 18 NumPyro fits: it loses where that fit's SAEM ended within 0.3-0.4 of the maximum (d1/f50,
d2/f2, d2/f50, where "sem" ends at −0.97 and never reaches −0.41) or on data seed 0 (ω₁'s maximum on the boundary,
d0/f30 232 against 236 iterations, d0/f40 263 against 180).  So the goal "at least as fast as SAEM to SAEM's
log-likelihood in every fit" is met on Pyro in 17 of 18 fits and not on NumPyro (13 of 18); the MCMCSGD default stays
Adam (faster than SAEM in 2 of 9 Pyro fits), ``optimizer="fisher", information="exact"`` the recommended choice for
models of few parameters with Gaussian random effects.
Tried and dropped (the 9 first fits, scratch patch): heavy-ball momentum kept after the first 60 steps (rate 1.5,
momentum 0.5, instead of γ = 1; the long-run average of a stable linear recursion does not depend on its step, only its
transient does): Pyro mean dLL −1.06, faster in 7/9 (two fits end −2.0 and −2.2: the larger excursions of the iterate
drag the chains), NumPyro −0.52, faster in 9/9: no better overall.  With mini-batches (``batch_size``) Fisher scoring
keeps ``schedule="decay"`` by default: a γ = 1 step on a batch's draws never averages the batches' sampling noise out
of the iterate (not measured here).

NumPyro's cost (4 December 2026; the NumPyro rows of the 18-fit table).  Per iteration, MCMCSGD fisher and SAEM cost
the same on JAX (``engine._run_chunk`` of 25 iterations, 10 alternated blocks, two processes per tree, load 6-7:
1.01-1.02× SAEM's CPU before and after; the shared saemix sweep is the whole iteration, the Fisher step and SAEM's
M-step are within the timing noise).  The gap was the fit's fixed cost: five compiled chunk programs (burn-in,
heavy-ball and scoring phases, and their remainder chunks of 10 and 5 iterations: 17 s of XLA compilation against
SAEM's one program, 4.2-4.7 s), a set-up check run as ~150 eager JAX operations (3.0-3.4 s against SAEM's 0.8 s), and
in every later fit five programs traced again.  The three phases are now one compiled program (k tells them apart
inside the step) and the check one compiled call: the first fit of a fresh process (fisher first, then SAEM; old and
new trees alternated twice, load 2-6) CPU 20.6-23.9 → 7.9-8.1 s (SAEM 4.7-5.5 s), compilation 17 → 3.5 s; later fits
2.0-2.2 → 1.76 s CPU for 500 iterations (SAEM 1.38-1.42 s for 400).  ``--seeds 0 1 2 --fit-seeds -1 10 20 30 40 50
--only "SAEM (NumPyro)" "fisher exact (NumPyro)"`` before and after (old and new trees side by side, load 3-7, 1363
s): the same 18 fits (every dLL and k as in the table above), whole-fit CPU of a later fit 2.28-2.62 → 1.88-2.20 s
(SAEM 1.48-1.77 s), mean CPU to SAEM's LL − 0.1 (k × the whole fit's CPU per iteration) 0.88 → 0.66 s (SAEM 1.03-1.05
s), first fit 20.9 → 5.8 s CPU.  Reached 17/18 and faster than SAEM 13/18 before and after, whether "faster" is k ×
the step-CPU ratio or k × the whole fit's CPU per iteration: four of the five losses are iterations (d0/f40 263
against 180, d1/f50 416 against 314, d2/f2 434 against 233, d2/f50 never), not cost; d0/f30 (232 against 236
iterations) needs an iteration 1.7 % cheaper than SAEM's and is a tie (0.896 against 0.891 s; before 1.090 s).  So on
NumPyro the goal stays unmet on 5 of 18 fits, for the reason given in the verdict above.  Pyro's 18 fits rerun after
the change (``--only "fisher exact (Pyro)"``, 654 s, load 3-5; the torch path is bit-identical): every dLL and k
as in the table, reached 18/18, faster 17/18 (d1/f30 again), mean CPU to SAEM's LL 0.50 s against SAEM's 0.98 s.

Reading.  With the defaults MCMCSGD ends as close to the exact maximum as SAEM or closer (Pyro −0.27, NumPyro −0.77,
SAEM −0.81 LL units; within 1.1 SE on every parameter), i.e. within SAEM's own Monte-Carlo error; the IS
log-likelihood used to check it has an MC error of 0.2 (and a −0.2 bias), the size of the remaining gaps.  (The
NumPyro fits, other random streams, were behind the Pyro ones on all three seeds; four more fit seeds (10-13) on
data seed 1 gave ΔLL −0.50, −0.05, −1.26, −0.40 (NumPyro, mean −0.55) and −0.62, −0.43, −0.52, −0.29 (Pyro, mean
−0.47): no PPL effect, and the Monte-Carlo spread of one fit's ΔLL is about ±0.35 — Pyro's −0.09 on seed 1 was luck.)  *Speed*: the
running average reaches SAEM's final log-likelihood after about as many iterations as SAEM (Pyro 242-263, just
after the averaging starts at 250, against SAEM's 198-257; NumPyro 365-434), and a Pyro MCMCSGD iteration (a
gradient of the complete log-likelihood and an Adam step) costs a little more than SAEM's closed-form M-step (about
1.15×): in wall time MCMCSGD was faster on seed 0, equal on seed 2 and twice slower on seed 1 (a load spike), 8.0 s
against 6.1 s on average.  So the goal "at least as fast as SAEM" is met only roughly on Pyro, not reliably
(NumPyro's compiled iterations are faster than Pyro SAEM's, which compares PPLs, not algorithms).  SVI's mean-field guide stays 1.7 ± 0.5 LL below (ω shrunk).  **MISSO** with its then defaults (the paper's
surrogates, 20 epochs of 10 % batches, the paper's M_k = 10 + k² draws per visit) ends 70 LL units below the
maximum at 15-30× SAEM's time (its default surrogate now: see above):
each epoch is an incremental Monte-Carlo EM step, and EM converges slowly on this model (β and the weakly identified
ω₁ under shrinkage; SAEM's first phase escapes this by annealing the variances).  A scratch run (seed 0, N = 400)
with ``mc_size=10`` (constant) and 100 epochs reached −5.1 in 166 s and was still climbing (−801 after epoch 1,
−71 after 25, −11 after 70): MISSO needs hundreds of epochs here, which the growing M_k makes unaffordable.

Why the kernels changed.  With one sweep of each kernel (the old default ``(1, 1, 1)``) the chains' draws of
φ_i = (intercept, slope, c-slope) mix slowly (a strongly correlated posterior, component-wise moves), the gradient
noise is autocorrelated over tens of iterations, and Adam, whose steps are normalised by that noise, drifts slowly
along the correlated β direction: the last-half average still carried the approach (seed 1: the average was 2 SE
off in β₁, β₂, β₃ while the iterates' own spread was 0.1-0.4 SE).  Two sweeps (saemix's and SAEM's (2, 2, 2))
halve the noise's correlation time; the remedies table below (the ``mcmc_steps=2`` row) and the table above agree.
Tried and dropped (scratch runs on seed 1, N = 400): a Newton–Robbins–Monro step preconditioned by the
complete-data information (Gu & Kong 1998; Cai 2010) collapses ω like EM without SAEM's annealing (ΔLL −38); one
preconditioned by the per-unit score outer products (BHHH) was noisy at γ = 1 and biased at γ = 0.3 (−6.8); Adam
at η = 0.15 was worse than at 0.05 (−4.8).

Figures (full run, ``--seed 0``, 2 CPU cores shared with other jobs, torch on one thread; timings are noisy;
MCMCSGD with the old one-sweep kernels ``(1, 1, 1)``)
---------------------------------------------------------------------------------------------------------------
::

    data: N = 1200 individuals x 15 observations, event rate 0.258, seed 0; true beta = [-4.0, -0.5, 1.0], omega = [0.3, 0.2, 0.2]
    exact maximum (AGQ 5 nodes/dim, from the truth): converged=True after 7 outer iterations, 33.2 s; LL = -6520.744 (5 nodes), -6520.692 (7 nodes)
      estimate: b1=-4.0749, b2=-0.5222, b3=1.0011, w1=0.4180, w2=0.1831, w3=0.2220
      SE:       b1=0.0762, b2=0.0136, b3=0.0212, w1=0.0980, w2=0.0102, w3=0.0275

    Table 1: wall time (s), estimates, log-likelihood at the estimate (AGQ 5 nodes) and distance to the exact maximum
    method                      setup compile  iters  total       b1      b2      b3      w1      w2      w3         LL     dLL max|d|/SE
    -------------------------------------------------------------------------------------------------------------------------------------
    exact maximum (AGQ)                                33.2  -4.0749 -0.5222  1.0011  0.4180  0.1831  0.2220   -6520.74    0.00      0.00
      its SE                                                  0.0762  0.0136  0.0212  0.0980  0.0102  0.0275
    MCMCSGD (Pyro)                0.0     0.0    4.5    4.6  -3.9306 -0.5003  0.9728  0.4098  0.1799  0.1939   -6522.84   -2.10      1.89
    MCMCSGD (NumPyro)             1.9     9.9    3.5   15.3  -4.0232 -0.5128  0.9906  0.4953  0.1786  0.1926   -6521.91   -1.17      1.07
    SAEM (Pyro)                   0.0     0.0    3.6    3.6  -4.0945 -0.5261  1.0040  0.4087  0.1809  0.2097   -6521.06   -0.32      0.45
    SAEM (NumPyro)                0.2     3.2    4.4    7.8  -4.0942 -0.5263  1.0021  0.4837  0.1804  0.2166   -6521.04   -0.30      0.67
    MCEM (Pyro)                   0.0     0.0    5.9    5.9  -3.1487 -0.3808  0.8317  0.2050  0.1663  0.1301   -6613.30  -92.56     12.15
    SVI AutoNormal (Pyro)         0.0     0.0   69.5   69.5  -4.1041 -0.5329  1.0001  0.1929  0.1842  0.2289   -6524.00   -3.26      2.30
    NUTS post. mean (NumPyro)       -       -   91.7   91.7  -4.0700 -0.5209  1.0004  0.4022  0.1836  0.2164   -6520.79   -0.04      0.20
    truth                                                    -4.0000 -0.5000  1.0000  0.3000  0.2000  0.2000   -6523.76
      SVI AutoNormal (Pyro): -ELBO over the last quarter: mean 6604.0, trend -30.6
      NUTS post. mean (NumPyro): 0 divergent transitions; posterior sd of (beta, omega): 0.074, 0.013, 0.021, 0.122, 0.010, 0.027

    Table 2: time until the running estimate's LL (AGQ 5 nodes, at checkpoints) is within 0.5 of the exact maximum's
    method                     iters   s/iter  time (s)  +setup+compile   LL - LLmax at the checkpoints
    ---------------------------------------------------------------------------------------------------
    MCMCSGD (Pyro)             never   0.0090         -               -   10:-4454.7 20:-2558.0 30:-1572.6 50:-822.6 75:-318.0 100:-101.0 150:-16.3 200:-13.2 250:-7.2 300:-3.8 350:-3.1 400:-2.6 450:-2.3 500:-2.1
    MCMCSGD (NumPyro)          never   0.0071         -               -   10:-4454.7 20:-2534.2 30:-1540.2 50:-826.4 75:-318.3 100:-107.2 150:-17.0 200:-5.8 250:-9.0 300:-1.8 350:-1.3 400:-1.2 450:-1.2 500:-1.2
    SAEM (Pyro)                  350   0.0089      3.11            3.15   10:-1916.0 20:-864.9 30:-462.5 50:-126.0 75:-25.7 100:-8.7 150:-1.8 200:-0.8 250:-0.8 300:-1.2 350:-0.3
    SAEM (NumPyro)               350   0.0110      3.85            7.27   10:-1934.1 20:-887.0 30:-444.8 50:-111.3 75:-21.2 100:-9.3 150:-1.8 200:-2.0 250:-1.7 300:-0.7 350:-0.3

    (benchmark wall time 289 s)

Findings of that run: SAEM (default options) ends within 0.3 of the exact maximum's LL and within 0.7 SE on every
parameter; MCMCSGD with its defaults (500 iterations, one chain per individual) ends 1.2 (NumPyro) and 2.1 (Pyro)
below it, within 1.1 and 1.9 SE (its β₁ and ω₃ are the farthest), and its running average never gets within 0.5
in 500 iterations, while SAEM gets there at iteration 350 (3-4 s): on this model SAEM is the faster of the two
to the same log-likelihood (an iteration costs about the same, 0.007-0.011 s, for both).  MCEM with its default 100 epochs
stops far from the maximum (ΔLL −93).  SVI's ω₁ is about half the maximum's (0.19 vs 0.42, the mean-field
bias) and its ELBO was still falling.  NUTS's posterior means are within 0.2 SE of the maximum (a flat-ish prior,
N = 1200).

Remedies study (``--remedies``: the same design with N = 400 individuals, data and fit seeds 0, 1, 2, each against
its own exact maximum; MCMCSGD on Pyro, all other options at the then defaults: 500 iterations, Adam 0.05,
η/√(t − 250) and averaging after iteration 250, one chain, saemix kernels (1, 1, 1); "default" is that, and
``mcmc_steps=2`` the present default)::

    ΔLL = LL(estimate) − LL(exact maximum)          seed 0   seed 1   seed 2    mean   (max|Δ|/SE per seed)
    default                                          -1.31    -2.49    -0.16   -1.32   (1.72, 2.07, 0.19)
    1000 iterations                                  -1.68    -2.41    -1.46   -1.85   (1.79, 2.09, 0.61)
    num_chains=3                                     -1.84    -0.06    -0.39   -0.76   (1.67, 0.16, 0.45)
    num_chains=5                                     -0.34    -0.14    -0.28   -0.25   (1.05, 0.34, 0.40)
    num_chains=10                                    -0.59    -0.39    +0.02   -0.32   (1.22, 0.76, 0.13)
    mcmc_steps=2 (kernels (2, 2, 2))                 -0.42    -0.09    -0.29   -0.27   (1.17, 0.31, 0.34)
    num_chains=5, 250 iterations (≈ default cost)    -5.54    -7.63    -5.66   -6.28
    η k^-0.6 after 100, averaging from 100          -10.32    -8.08    -5.77   -8.06
    η k^-0.75 after 100, averaging from 100         -13.94   -10.08    -7.87  -10.63
    num_chains=5 + η k^-0.6, averaging from 100      -6.78   -10.31    -6.13   -7.74

(times not comparable: the machine's load varied by 5× during the study.)  Reading: the default's shortfall is
Monte-Carlo noise of the averaged iterate, not a lack of iterations (1000 iterations with one chain are no better,
and the 1-chain rows scatter by ±1 between seeds); more MCMC effort per gradient, independent chains (5-10) or a
second kernel sweep, brings every seed within 0.6 of the maximum (mean −0.25 to −0.32).  An earlier averaging
start with a faster decay is much worse: at iteration 100 the iterates are still 100 LL units from the maximum
and the average never forgets them.  Defaults unchanged: the gain is not uniform (seed 2 is already at −0.16 with
the default and −0.28/−0.29 with the remedies, within the noise), so the recommendation is an option, not a new
default: ``num_chains=5`` or ``mcmc_steps=2`` when the last log-likelihood unit matters (500 iterations at N = 400, one
back-to-back timing under load ≈ 12: default 8.6 / 10.7 s, ``mcmc_steps=2`` 18.1 s, ``num_chains=5`` 25.5 s).  A preconditioner from the Louis information was not tried (it needs a new engine option).


MISSO ``surrogate="bohning"`` (4 December 2026; latentfit/inference/misso.py: non-centred latents φ = β + ω ε, the
logistic likelihood majorised by Jaakkola–Jordan's quadratic bound at each draw, per-unit stored curvatures, the exact
minimiser of the summed surrogates; every surrogate a majorant; 20 epochs of 50 % batches, M_k = 10 draws per visit to
epoch 11, then 20, 30, 40).  Output of ``--seeds 0 1 2 --fit-seeds --num 400 --threads 1 --only "MISSO louis" "MISSO
bohning (" "SAEM (NumPyro)"`` (the 9 fits of data seeds 0-2 × fit seeds {s, 10, 20}; load average 3.7-5.3 on the 2
cores, other jobs running); the NumPyro columns' CPU is that of a second run, ``--seeds 0 1 2 --fit-seeds -1 10 20
--only "SAEM (NumPyro)" "MISSO bohning (NumPyro)"`` after the set-up visit was compiled (load ~2.5; the same fits,
d0/f0 compiles: -); per fit ΔLL / epochs or iterations to SAEM's final LL − 0.1 (NumPyro rows: SAEM (NumPyro)'s) /
whole-fit CPU s::

    fit       SAEM (Pyro)     MISSO louis (Pyro)  MISSO bohning (Pyro)  SAEM (NumPyro)   MISSO bohning (NumPyro)
    d0/f0     -0.74/257/2.6   -1.68/never/4.9     -0.03/10/1.7          -3.49/151/ -     -0.04/ 8/ -
    d0/f10    -1.29/188/2.2   -1.93/never/4.6     -0.07/10/2.2          -1.85/230/1.9    -0.07/ 9/2.0
    d0/f20    -1.89/285/2.4   -2.03/never/4.7     -0.11/ 9/2.3          -1.40/306/1.9    -0.06/ 9/2.1
    d1/f1     -0.79/198/2.3   -0.63/13/4.4        -0.14/11/2.3          -0.55/310/1.9    -0.29/12/1.8
    d1/f10    -0.52/193/3.1   -0.63/never/5.0     -0.12/12/2.0          -0.83/181/1.9    -0.11/11/1.7
    d1/f20    -1.58/270/2.1   -0.47/12/4.5        -0.17/11/1.8          -0.77/251/1.8    -0.09/11/1.9
    d2/f2     -0.91/237/2.3   -0.31/13/3.5        -0.75/14/1.9          -0.42/233/1.9    -0.80/never/1.9
    d2/f10    -0.11/318/2.0   -0.50/never/4.0     -0.85/never/1.5       -0.48/205/1.8    -1.01/never/1.7
    d2/f20    -0.97/333/2.1   -0.31/12/3.5        -0.81/14/1.6          -0.38/277/1.9    -0.91/never/1.7
    mean ΔLL  -0.98 ± 0.54    -0.94 ± 0.72        -0.34 ± 0.35          -1.13 ± 1.01     -0.37 ± 0.41
    reached   9/9             4/9                 8/9                   9/9              6/9

(MISSO louis (NumPyro), the former default: −0.95 ± 0.63, reached 6/9, 4.9-6.6 s CPU per fit.)  CPU to SAEM's LL,
measured directly: MISSO truncated at the epoch where it reached the target (``num_epochs=k``: the same iterates, the
schedule does not depend on it; its whole CPU, set-up included) against SAEM's whole-fit CPU × k / 400, alternated in
one process, 2 rounds each, load 2.1-3.5 (NumPyro: every program compiled once before, untimed)::

    fit      Pyro: SAEM   MISSO   ratio          NumPyro: SAEM   MISSO   ratio
    d0/f0       2.11 1.31  0.62 0.74  0.43             0.84 0.78  1.12 0.81  1.19
    d0/f10      0.92 1.06  0.64 0.64  0.65             1.28 1.24  1.40 0.88  0.90
    d0/f20      1.48 1.44  0.51 0.52  0.35             1.75 1.59  1.18 0.97  0.64
    d1/f1       0.96 1.00  0.59 0.67  0.64             1.91 1.56  1.46 1.41  0.83
    d1/f10      1.08 1.10  0.85 0.83  0.77             0.89 0.80  1.02 0.85  1.10
    d1/f20      1.81 1.56  0.82 0.64  0.43             1.36 1.15  1.32 0.85  0.85
    d2/f2       1.62 1.20  0.93 0.80  0.62             (never)
    d2/f20      1.81 1.92  1.01 0.98  0.54             (never)
    d2/f10      (MISSO never)                          (never)

Reading.  The issue's goal (within Monte-Carlo error of the exact maximum and at least as fast as SAEM to SAEM's LL):
on Pyro it is met on 8 of 9 fits (0.35-0.77× SAEM's CPU; whole fits 1.5-2.3 s against SAEM's 2.0-3.1 s, and
ΔLL −0.03 to −0.17 on data seeds 0-1, including seed 0's boundary maximum ω₁ ≈ 0.002 that the other surrogates never
reached); on NumPyro on 4 of 9 (0.64-0.90×; slower on d0/f0 and d1/f10, 1.19× and 1.10×).  It is **not met on data
seed 2**: there the maximum has a large ω₁ (0.43, SE 0.2), MISSO ends at ω₁ ≈ 0.1-0.13 and ΔLL −0.75 to −1.01, still
climbing by ~0.04 per epoch: in the non-centred coordinates the weakly identified ω₁ has a large fraction of missing
information (the surrogate's curvature in ω₁ is the complete-data one, Σ_r c_r ε_r², against an observed information
of ~1/SE²), so its majorant steps are short — the mirror image of the centred surrogates, slow where ω₁ is small.  It
reaches Pyro SAEM's LL on 2 of those 3 fits (epoch 14), not NumPyro SAEM's (which ended at −0.38 to −0.48 there).  The
former default (``"louis"``) reached SAEM's LL on 4/9 (Pyro) and 6/9 (NumPyro) fits at 2-5× SAEM's CPU.

MISSO ``surrogate="bohning"`` with working parameters (issue 11, data seed 2; latentfit/inference/misso.py, option
``expand``: the non-centred latents' prior ``N(m, diag(s²))`` with a working location m and scale s, minimised in
closed form from two more stored rows per unit; parameter-expanded EM, i.e. interweaving the centred and non-centred
augmentations).  The same 9 fits per PPL, the same rules as the table above (ΔLL of the 20-epoch estimate by 5-node
AGQ; the target SAEM's final LL − 0.1 on the same PPL, from the SAEM columns above, the same fits; first epoch at or
above it; whole-fit CPU s, NumPyro's first fit in its process includes the compilations, 33-50 s), in a scratch
harness equivalent to ``--seeds 0 1 2 --fit-seeds -1 10 20 --only "MISSO bohning"`` (rows ``MISSO bohning none``
and ``MISSO bohning loc+scale`` added; load average 0.9-4.8).  ``none`` reproduces the table above to the printed
digits.  Per fit ΔLL / epoch reached / CPU::

    fit     Pyro: none        location        loc+scale     NumPyro: none     location        loc+scale
    d0/f0   -0.03/10/2.4    -0.02/ 9/1.9    -0.77/20/3.0          -0.04/ 8/ -     -0.08/ 6/ -     -0.94/ 8/ -
    d0/f10  -0.07/10/1.9    -0.09/ 8/2.1    -1.15/18/2.0          -0.07/ 9/1.7    -0.05/ 8/1.9    -0.70/10/2.0
    d0/f20  -0.11/ 9/1.7    -0.09/ 7/2.2    -1.04/11/2.1          -0.06/ 9/1.5    -0.09/ 9/1.4    -0.87/14/1.5
    d1/f1   -0.14/11/1.5    -0.08/10/2.2    -0.23/11/2.1          -0.29/12/2.2    -0.19/11/2.0    -0.12/11/2.7
    d1/f10  -0.12/12/1.7    -0.08/11/2.3    -0.20/13/2.2          -0.11/11/2.0    -0.09/10/1.9    -0.10/11/2.1
    d1/f20  -0.17/11/2.1    -0.11/ 9/2.2    -0.13/ 9/2.0          -0.09/11/1.5    -0.07/11/1.5    -0.15/11/1.5
    d2/f2   -0.75/14/1.9    -0.60/12/2.0    +0.01/ 9/2.1          -0.80/ - /2.4   -0.58/ - /2.9   +0.00/10/2.5
    d2/f10  -0.85/ - /1.8   -0.71/ - /2.2   +0.03/13/2.3          -1.01/ - /1.6   -0.70/ - /1.8   +0.03/10/1.5
    d2/f20  -0.81/14/1.6    -0.45/11/2.2    -0.04/ 9/1.9          -0.91/ - /1.6   -0.70/ - /1.4   +0.02/11/1.6
    mean    -0.34 ± 0.35    -0.25 ± 0.26    -0.39 ± 0.46          -0.37 ± 0.41    -0.28 ± 0.29    -0.31 ± 0.40
    reached 8/9             8/9             9/9                   6/9             6/9             9/9

CPU to the target, measured directly as in the table above (MISSO truncated at its epoch, whole CPU; SAEM's whole-fit
CPU × its iterations to the target / 400; alternated in one process, 2 rounds; NumPyro: every program compiled once
before, untimed; load average 0.9-3)::

    fit      Pyro: SAEM   none (k)           location (k)         NumPyro: SAEM   none (k)          location (k)
    d0/f0     1.32 1.42  0.68 0.58 (10) 0.46   0.74 0.54 ( 9) 0.47       0.75 0.84  0.86 0.46 ( 8) 0.83  0.76 0.40 ( 6) 0.73
    d0/f10    0.91 1.09  0.59 0.71 (10) 0.65   0.53 0.65 ( 8) 0.59       1.06 1.03  0.65 0.42 ( 9) 0.51  0.63 0.38 ( 8) 0.48
    d0/f20    1.53 1.73  0.63 0.74 ( 9) 0.42   0.70 0.54 ( 7) 0.38       1.56 1.57  0.57 0.54 ( 9) 0.35  0.80 0.49 ( 9) 0.41
    d1/f1     1.29 1.03  0.81 0.66 (11) 0.63   0.74 0.60 (10) 0.58       1.62 1.66  1.23 0.65 (12) 0.57  0.96 0.53 (11) 0.45
    d1/f10    0.98 0.96  0.70 0.73 (12) 0.73   0.70 0.63 (11) 0.69       0.97 0.92  0.98 0.54 (11) 0.80  0.85 0.50 (10) 0.71
    d1/f20    1.35 1.37  0.66 0.68 (11) 0.49   0.58 0.64 ( 9) 0.45       1.31 1.31  0.59 0.67 (11) 0.48  0.56 0.59 (11) 0.44
    d2/f2     1.40 1.26  1.01 0.86 (14) 0.70   0.96 0.84 (12) 0.68       (never)
    d2/f20    1.65 1.67  0.86 0.86 (14) 0.52   0.75 0.60 (11) 0.41       (never)
    d2/f10    (never)                                                    (never)

Reading.  ``expand="location"`` (now the default of ``surrogate="bohning"``) reaches the target earlier on every fit
that reaches it (1-3 epochs on Pyro, 0-2 on NumPyro) and ends higher on average (−0.25 / −0.28 against −0.34 /
−0.37); three data-seed-0 fits end 0.02-0.04 lower (d0/f10 Pyro, d0/f0 and d0/f20 NumPyro: the fit seeds' scatter
there), the CPU to the target is 0.38-0.69× SAEM's on Pyro and 0.41-0.73× on NumPyro (``none``: 0.42-0.73×,
0.35-0.83×; two ratios worse: d0/f0 Pyro 0.47 against 0.46, d0/f20 NumPyro 0.41 against 0.35 at the same epoch).  It does **not** solve data seed
2: ΔLL −0.45 to −0.71, SAEM's LL reached on 2/3 Pyro fits, 0/3 NumPyro.  ``expand="location+scale"`` does (ΔLL −0.04
to +0.03 on all six seed-2 fits, ω₁ 0.42-0.45 against 0.43, reached 9/9 on both PPLs), but makes data seed 0 worse
(−0.70 to −1.15 against −0.03 to −0.11; ω₁ ends at 0.25-0.31 against the maximum's 0.002), so it stays opt-in.  Why
(misso.py docstring): the direction mostly of ω₁ closes only 3.9% of its gap per epoch in the non-centred coordinates
(less in the centred ones), so where a fit ends is set by its first epochs (ω₁ collapses towards 0 without the
working scale, is inflated with it).  The goal on data seed 2 with the default is **not met**; with the opt-in
working scale it is met there and lost on data seed 0.

MISSO ``surrogate="bohning"``, ``accelerate=True`` (issue 11, data seed 2; latentfit/inference/misso.py: from epoch 4
the MM step is Louis' step with the summed majorants' curvature as the complete information and the observed
information from the outer products of the units' stored scores, fractions capped at 0.75, a 1-SE trust region, no
latent scale halved beyond the MM point).  ``--seeds 0 1 2 --fit-seeds -1 10 20 --only "SAEM (NumPyro)" "MISSO
bohning (Pyro)" "MISSO bohning (NumPyro)" "MISSO bohning accelerate"`` (one process, load 5-7 on the 2 cores: two
helpers' jobs beside it; 585 s)::

    method                               dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  time to SAEM LL (s)  CPU to it (s)
    SAEM (Pyro)                        -0.98 ±  0.54       -1.19      0.21       0.94         1.50 (9/9)           0.99
    SAEM (NumPyro)                     -1.13 ±  1.01       -1.38      0.23       1.13         1.26 (9/9)           1.16
    MISSO bohning (Pyro)               -0.25 ±  0.26       -0.42      0.20       0.50         1.07 (8/9)           0.64
    MISSO bohning (NumPyro)            -0.28 ±  0.29       -0.46      0.20       0.53         0.74 (6/9)           1.32
    MISSO bohning accelerate (Pyro)    -0.10 ±  0.10       -0.28      0.21       0.35         0.67 (8/9)           0.48
    MISSO bohning accelerate (NumPyro) -0.13 ±  0.10       -0.31      0.21       0.42         0.51 (9/9)           0.77

The two plain rows reproduce the tables above to the printed digits.  Accelerated, every fit ends within 0.32 of the
exact maximum (the IS log-likelihood's MC error is 0.2): data seed 2 −0.10, −0.32, +0.02 (Pyro) and −0.30, −0.28,
−0.00 (NumPyro) against −0.60, −0.71, −0.45 and −0.58, −0.70, −0.70.  Fit by fit, CPU to the target against SAEM's
CPU to it: Pyro faster on 8 of 9 (0.43-0.52 s against 0.74-1.22 s; d2/f10 never reaches it: SAEM ends at −0.11 there,
MISSO at −0.32), NumPyro faster on 8 of 9 (0.44-0.78 s against 0.69-1.23 s, and d0/f0, its first fit with the
compilations, 2.36 against 2.85; d2/f10 0.78 against 0.76).  So the goal (within Monte-Carlo error of the exact
maximum and at least as fast as SAEM to its log-likelihood) holds for ``accelerate`` on 16 of 18 fits, against 13 of 18
(reached and faster; NumPyro d0/f0 4.90 s with its compilations) for the plain surrogate.  On fits without a slow direction the step only adds noise (misso.py
docstring: the tutorial-style grouped model −0.04 to −0.08 against −0.002 to −0.013), so it stays opt-in.

MISSO's defaults now ``surrogate="auto"`` (4 December 2026; latentfit/inference/misso.py): ``"bohning"`` with
``accelerate=True`` on a model with the affine logistic structure (this one), ``"louis"`` elsewhere; the rows
``MISSO (Pyro)`` / ``MISSO (NumPyro)`` run ``MISSO(model)`` with no option.  ``--seeds 0 1 2 --fit-seeds -1 10 20
--num 400 --threads 1 --only "SAEM (NumPyro)" "MISSO (Pyro)" "MISSO (NumPyro)"`` (nice 19, load 4-7 on the 2 cores:
other helpers' jobs beside it; 312 s)::

    method                                       dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)  CPU to it (s)
    SAEM (Pyro)                             -0.98 ±  0.54       -1.19      0.21       0.94        1.8            1.13 (9/9)           1.07
    SAEM (NumPyro)                          -1.13 ±  1.01       -1.38      0.23       1.13        1.6            0.92 (9/9)           1.20
    MISSO (Pyro)                            -0.10 ±  0.10       -0.28      0.21       0.35        1.4            0.48 (8/9)           0.50
    MISSO (NumPyro)                         -0.13 ±  0.10       -0.31      0.21       0.42        0.9            0.40 (9/9)           1.11

The estimates are the ``accelerate`` rows above to the printed digits (an ``"auto"`` fit is the explicit
``surrogate="bohning", accelerate=True`` fit bit for bit).  Every fit ends within 0.32 of the exact maximum (worst:
Pyro d2/f10 −0.315, NumPyro d2/f2 −0.299; the IS log-likelihood's MC error is 0.2); largest max|Δ|/SE 0.68 (Pyro
d0/f20) and 0.62 (NumPyro d1/f10).  Fit by fit, MISSO's CPU to SAEM's final LL − 0.1 against SAEM's CPU to it (same
PPL): Pyro faster on 8 of 9 (0.41-0.58 s against 0.80-1.39 s; d2/f10 never reaches it: SAEM ends at −0.11 there,
MISSO at −0.32), NumPyro on 7 of 9 (0.38-0.77 s against 0.69-1.27 s; d0/f0, the first fit, compiles: 5.33 s against
2.96 s; d2/f10 0.86 against 0.81 s).  So the issue's goal holds with the defaults on 15 of 18 fits (16 in the run
above, whose compiling NumPyro d0/f0 was faster than SAEM's).

MCMCSGD's defaults now ``optimizer="auto"`` (4 December 2026): MCMCSGD's default is Fisher scoring on this model (7 free
parameters, no network; ``information="exact"`` by default for its Gaussian random effects).  ``--seeds 0 1 2
--fit-seeds -1 10 20 --num 400 --threads 1 --only "SAEM (" "MCMCSGD ("`` (niced, load 3-6 on the 2 cores; 1504 s)::

    method                                       dLL (AGQ)    dLL (IS)  IS MC se  max|d|/SE  iters (s)   time to SAEM LL (s)  CPU to it (s)
    exact maximum (AGQ)                     +0.00 ±  0.00       -0.20      0.22       0.00        nan                     -              -
    SAEM (Pyro)                             -0.98 ±  0.54       -1.19      0.21       0.94        9.8            5.54 (9/9)           1.21
    SAEM (NumPyro)                          -1.13 ±  1.01       -1.38      0.23       1.13        3.0            1.43 (9/9)           1.25
    MCMCSGD (Pyro)                          -0.53 ±  0.50       -0.74      0.22       0.74       15.7            3.68 (9/9)           0.58
    MCMCSGD (NumPyro)                       -0.43 ±  0.24       -0.67      0.23       0.68        6.2            1.15 (9/9)           0.59

Every default fit's dLL and iterations to the target equal the "sem" rows of the 18-fit table above for these 9 fits
(the same algorithm, bit for bit).  CPU to the same PPL's SAEM final LL − 0.1 (k × the whole fit's CPU per
iteration), MCMCSGD against SAEM: Pyro faster in 9 of 9 fits (0.26-1.30 s against 0.91-1.62 s); NumPyro in 8 of 9
(0.31-0.76 s against 0.70-1.34 s; the loss d2/f2, 434 against 233 iterations, 1.83 against 0.94 s; d0/f0's SAEM,
3.00 s, is the process's first NumPyro fit and pays the compilations: 7 of 8 without it, mean 0.61 against 1.03 s).
The wall times are not comparable (the niced process shared the cores with test runs).  Worst fits: data seed 0
(ω₁'s maximum on the boundary), Pyro f10 / f20 −1.15 / −1.55, where SAEM ends at −1.29 / −1.89.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # both PPLs in float64, the same data

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402
from torch.distributions import constraints  # noqa: E402

import latentfit.numpyro as lnp  # noqa: E402
import latentfit.pyro as lpy  # noqa: E402
from latentfit.inference.laplace import conditional_modes  # noqa: E402
from latentfit.inference.likelihood import (  # noqa: E402
    _gq_grid,
    gq_log_lik_per_unit,
    log_likelihood_gq,
    log_likelihood_is,
    maximise_log_likelihood_gq,
)
from latentfit.integrations.pyro import PyroLatentModel  # noqa: E402

BETA = np.array([-4.0, -0.5, 1.0])
OMEGA = np.array([0.3, 0.2, 0.2])
BETA0 = [0.0, 0.0, 0.0]  # the engines' starting point (a neutral one, not the truth)
OMEGA0 = [0.5, 0.5, 0.5]
NODES = 5
LABELS = ["b1", "b2", "b3", "w1", "w2", "w3"]
CHECKPOINTS = [10, 20, 30, 50, 75, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 800, 1000]


# ----- data and models -----------------------------------------------------------------------------------------
def simulate(num: int, n_obs: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    j = np.arange(n_obs)
    t = np.tile(-8.0 + 8.0 * j / (n_obs - 1), num)
    c = 2.0 * rng.standard_normal(num * n_obs)
    idx = np.repeat(np.arange(num), n_obs)
    phi = BETA + OMEGA * rng.standard_normal((num, 3))
    logit = phi[idx, 0] + phi[idx, 1] * t + phi[idx, 2] * c
    y = (rng.random(num * n_obs) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
    return {"t": t, "c": c, "idx": idx, "num": num, "y": y}


def pyro_model(t, c, idx, num, y=None):
    beta = pyro.param("beta", torch.tensor(BETA0, dtype=torch.float64))
    omega = pyro.param("omega", torch.tensor(OMEGA0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("id", num):
        phi = pyro.sample("phi", dist.Normal(beta, omega).to_event(1))
    with pyro.plate("rows", len(t)):
        p = phi[idx]
        pyro.sample("y", dist.Bernoulli(logits=p[..., 0] + p[..., 1] * t + p[..., 2] * c), obs=y)


def numpyro_model(t, c, idx, num, y=None):
    beta = numpyro.param("beta", jnp.array(BETA0))
    omega = numpyro.param("omega", jnp.array(OMEGA0), constraint=ndist.constraints.positive)
    with numpyro.plate("id", num):
        phi = numpyro.sample("phi", ndist.Normal(beta, omega).to_event(1))
    with numpyro.plate("rows", len(t)):
        p = phi[idx]
        numpyro.sample("y", ndist.Bernoulli(logits=p[..., 0] + p[..., 1] * t + p[..., 2] * c), obs=y)


def nuts_model(t, c, idx, num, y=None):
    beta = numpyro.sample("beta", ndist.Normal(0.0, 10.0).expand([3]).to_event(1))
    omega = numpyro.sample("omega", ndist.HalfNormal(1.0).expand([3]).to_event(1))
    with numpyro.plate("id", num):
        eps = numpyro.sample("eps", ndist.Normal(0.0, 1.0).expand([3]).to_event(1))
    phi = beta + omega * eps
    with numpyro.plate("rows", len(t)):
        p = phi[idx]
        numpyro.sample("y", ndist.Bernoulli(logits=p[..., 0] + p[..., 1] * t + p[..., 2] * c), obs=y)


def torch_args(d):
    return (torch.tensor(d["t"]), torch.tensor(d["c"]), torch.tensor(d["idx"]), d["num"], torch.tensor(d["y"]))


def jax_args(d):
    return (jnp.asarray(d["t"]), jnp.asarray(d["c"]), jnp.asarray(d["idx"]), d["num"], jnp.asarray(d["y"]))


# ----- the exact maximum and the common log-likelihood ----------------------------------------------------------
class Reference:
    """The traced Pyro model, its 5-node AGQ maximum and standard errors, and LL(θ) by the same quadrature."""

    def __init__(self, d):
        pyro.clear_param_store()
        self.lm = PyroLatentModel(pyro_model, torch_args(d), {})
        pyro.clear_param_store()
        self.ops = self.lm.ops
        t0 = time.perf_counter()
        truth = {"beta": torch.tensor(BETA), "omega": torch.tensor(OMEGA)}
        best = maximise_log_likelihood_gq(self.lm, truth, num_nodes=NODES)
        self.time = time.perf_counter() - t0
        self.converged, self.num_outer = best.converged, best.num_outer
        p = best.as_dict(self.ops)
        self.theta = {"beta": np.asarray(p["beta"]), "omega": np.asarray(p["omega"])}
        self.ll = self.log_lik(self.theta)
        self.ll_gq_fit = best.log_lik.value
        self.ll7 = log_likelihood_gq(self.lm, best.theta, num_nodes=7, num_steps=30).value
        self.se = self._standard_errors()

    def log_lik(self, theta) -> float:
        th = {k: torch.as_tensor(np.asarray(v, dtype=float)) for k, v in theta.items()}
        return float(log_likelihood_gq(self.lm, th, num_nodes=NODES, num_steps=30).value)

    def _standard_errors(self) -> np.ndarray:
        theta = {k: torch.tensor(v) for k, v in self.theta.items()}
        lap = conditional_modes(self.lm, theta, num_steps=30)
        chol, grid = self.ops.small_cholesky(lap.cov), _gq_grid(self.lm, NODES)

        def f(x):
            th = {"beta": x[:3], "omega": torch.exp(x[3:])}
            return gq_log_lik_per_unit(self.lm, th, lap.mode, chol, grid).sum()

        x0 = torch.cat([theta["beta"], torch.log(theta["omega"])])
        h = torch.autograd.functional.hessian(f, x0).numpy()
        cov = np.linalg.inv(-h)
        se = np.sqrt(np.where(np.diag(cov) > 0, np.diag(cov), np.nan))
        se[3:] *= self.theta["omega"]
        return se

    def vector(self) -> np.ndarray:
        return np.concatenate([self.theta["beta"], self.theta["omega"]])


def as_vector(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(params["beta"], float)), np.ravel(np.asarray(params["omega"], float))])


# ----- the fits ------------------------------------------------------------------------------------------------
def run_engine(front, engine, ppl, d, seed, options):
    cpu0 = time.process_time()
    if ppl == "pyro":
        pyro.clear_param_store()  # a Pyro fit writes its estimates to the store, where the next one would start
        fit = getattr(front, engine)(pyro_model, seed=seed, progress=False, **options).run(*torch_args(d))
        pyro.clear_param_store()
    else:
        fit = getattr(front, engine)(numpyro_model, seed=seed, progress=False, **options).run(seed, *jax_args(d))
    cpu = time.process_time() - cpu0  # the whole fit's CPU time (set-up and result included)
    iters = fit.elapsed - fit.init_time - fit.compile_time
    return {"fit": fit, "setup": fit.init_time, "compile": fit.compile_time, "iters": iters,
            "total": fit.elapsed, "theta": as_vector(fit.params), "cpu": cpu}


def run_svi(d, seed, steps):
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    args = torch_args(d)
    t0 = time.perf_counter()
    guide = AutoNormal(pyro_model)
    lrd = 0.1 ** (1.0 / steps)  # the rate decays tenfold over the run
    svi = SVI(pyro_model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": lrd}), Trace_ELBO())
    losses = [svi.step(*args)]  # the first step builds the guide's parameters
    setup = time.perf_counter() - t0
    for _ in range(steps - 1):
        losses.append(svi.step(*args))
    total = time.perf_counter() - t0
    theta = np.concatenate([pyro.param("beta").detach().numpy(), pyro.param("omega").detach().numpy()])
    tail = np.asarray(losses[-max(steps // 4, 1):])
    pyro.clear_param_store()
    note = f"-ELBO over the last quarter: mean {tail.mean():.1f}, trend {np.polyfit(np.arange(len(tail)), tail, 1)[0] * len(tail):+.1f}"
    return {"setup": setup, "compile": 0.0, "iters": total - setup, "total": total, "theta": theta, "note": note}


def run_nuts(d, seed, warmup, samples):
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(nuts_model), num_warmup=warmup, num_samples=samples, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), *jax_args(d))
    s = mcmc.get_samples()
    jax.block_until_ready(s["beta"])
    total = time.perf_counter() - t0
    theta = np.concatenate([np.asarray(s["beta"]).mean(0), np.asarray(s["omega"]).mean(0)])
    div = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    note = f"{div} divergent transitions; posterior sd of (beta, omega): " + ", ".join(
        f"{v:.3f}" for v in np.concatenate([np.asarray(s["beta"]).std(0), np.asarray(s["omega"]).std(0)]))
    return {"setup": float("nan"), "compile": float("nan"), "iters": total, "total": total, "theta": theta,
            "note": note}


def time_to_ll(ref, row, tol=0.5):
    """First checkpoint of the running estimate within ``tol`` of the exact maximum's LL (or None)."""
    fit = row["fit"]
    h_beta, h_omega = fit.history["theta.beta"], fit.history["theta.omega"]
    n = len(h_beta)
    trail = []
    for k in [k for k in CHECKPOINTS if k < n] + [n]:
        ll = ref.log_lik({"beta": h_beta[k - 1], "omega": h_omega[k - 1]})
        trail.append((k, ll - ref.ll))
        if ll > ref.ll - tol:
            return k, k * fit.time_per_iteration, trail
    return None, None, trail


# ----- printing ------------------------------------------------------------------------------------------------
def fmt_t(x):
    return "     -" if x is None or not np.isfinite(x) else f"{x:6.1f}"


# ----- the remedies study (--remedies) -------------------------------------------------------------------------
def _decay(eta: float, t0: int, alpha: float):
    """η_t = η until t0, then η (t − t0)^−α (a schedule of the gradient-step count)."""
    def schedule(t):
        over = t - t0
        return eta * (over <= 0) + eta * (over > 0) * (over * (over > 0) + 1.0 * (over <= 0)) ** (-alpha)
    return schedule


ONE_SWEEP = {"mcmc_steps": 1}  # the study's baseline: the old default kernels (1, 1, 1)
REMEDIES = {
    "default": ONE_SWEEP,
    "num_chains=3": {**ONE_SWEEP, "num_chains": 3},
    "num_chains=5": {**ONE_SWEEP, "num_chains": 5},
    "num_chains=10": {**ONE_SWEEP, "num_chains": 10},
    "num_chains=5, 250 iters": {**ONE_SWEEP, "num_chains": 5, "num_iters": 250},
    "mcmc_steps=2": {"mcmc_steps": 2},
    "1000 iters": {**ONE_SWEEP, "num_iters": 1000},
    "eta k^-0.6, avg from 100": {**ONE_SWEEP, "average_from": 100, "learning_rate": _decay(0.05, 100, 0.6)},
    "eta k^-0.75, avg from 100": {**ONE_SWEEP, "average_from": 100, "learning_rate": _decay(0.05, 100, 0.75)},
    "chains=5 + eta k^-0.6, avg 100": {**ONE_SWEEP, "num_chains": 5, "average_from": 100,
                                       "learning_rate": _decay(0.05, 100, 0.6)},
}


def remedies(num: int = 400, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """MCMCSGD (Pyro) variants on smaller data sets (N individuals × 15), ΔLL to each data set's exact maximum."""
    for seed in seeds:
        d = simulate(num, 15, seed)
        ref = Reference(d)
        print(f"seed {seed}: exact LL {ref.ll:.3f} converged={ref.converged} ({ref.time:.1f} s)", flush=True)
        for name, options in REMEDIES.items():
            r = run_engine(lpy, "MCMCSGD", "pyro", d, seed, options)
            ll = ref.log_lik({"beta": r["theta"][:3], "omega": r["theta"][3:]})
            worst = np.max(np.abs(r["theta"] - ref.vector()) / ref.se)
            print(f"  {name:32s} dLL {ll - ref.ll:8.3f}  max|d|/SE {worst:5.2f}  time {r['total']:6.1f} s", flush=True)


# ----- the multi-seed table (--seeds) ---------------------------------------------------------------------------
def is_log_lik(ref, theta, num_samples: int = 2000):
    """IS log-likelihood at θ (Student-t(4) proposal at the Laplace modes/covariances of the traced Pyro model,
    ``num_samples`` draws per individual, seed 0): the value and its Monte-Carlo SE, the same for every row."""
    th = {k: torch.as_tensor(np.asarray(v, dtype=float)) for k, v in theta.items()}
    lap = conditional_modes(ref.lm, th, num_steps=30)
    sd = torch.sqrt(torch.diagonal(lap.cov, dim1=-2, dim2=-1))
    res = log_likelihood_is(ref.lm, th, lap.mode, sd, num_samples=num_samples, df=4, seed=0)
    return float(res.value), float(res.mc_se)


def running_log_lik(ref, fit, num_checkpoints: int = 24):
    """LL (AGQ) of the running estimate ``fit.history["theta.*"]`` at checkpoints: ``[(iteration, LL), ...]``."""
    h_beta, h_omega = np.asarray(fit.history["theta.beta"]), np.asarray(fit.history["theta.omega"])
    n = len(h_beta)
    grid = np.unique(np.concatenate([np.geomspace(1, n, num_checkpoints // 2), np.linspace(n / 4, n, num_checkpoints // 2)]))
    grid = np.unique(np.clip(np.round(grid).astype(int), 1, n))
    return [(int(k), ref.log_lik({"beta": h_beta[k - 1], "omega": h_omega[k - 1]})) for k in grid]


def first_reach(ref, fit, target: float, trail) -> int | None:
    """The iteration at which the running estimate first reaches ``target``, to one iteration: the first checkpoint of
    ``trail`` at or above it, then bisection between it and the checkpoint before (the running estimate's LL is
    nearly monotone there; a non-monotone stretch could hide an earlier crossing)."""
    hit = [i for i, (_, v) in enumerate(trail) if v >= target]
    if not hit:
        return None
    hi = trail[hit[0]][0]
    lo = trail[hit[0] - 1][0] if hit[0] > 0 else 0  # LL(lo) < target (or lo = 0: before the first iteration)
    h_beta, h_omega = np.asarray(fit.history["theta.beta"]), np.asarray(fit.history["theta.omega"])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ref.log_lik({"beta": h_beta[mid - 1], "omega": h_omega[mid - 1]}) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _multi_seed_row(ref, name: str, r: dict, targets: dict[str, float], target_slack: float) -> dict:
    """One fit's row of the multi-seed table: ΔLL (AGQ, IS), max|Δ|/SE, and the first iteration at which its running
    estimate reaches the target (a SAEM row sets its PPL's target: its final LL − ``target_slack``)."""
    theta = {"beta": r["theta"][:3], "omega": r["theta"][3:]}
    ll = ref.log_lik(theta)
    ll_is, se_is = is_log_lik(ref, theta)
    row = {"dll": ll - ref.ll, "is": ll_is - ref.ll, "is_se": se_is, "total": r["total"],
           "iters": r["iters"], "worst": float(np.max(np.abs(r["theta"] - ref.vector()) / ref.se)),
           "ttt": float("nan"), "k": None, "cpu_ttt": float("nan")}
    ppl = "NumPyro" if "(NumPyro)" in name else "Pyro"
    if name.startswith("SAEM ("):
        targets[ppl] = ll - target_slack
    target = targets.get(ppl, targets.get("Pyro"))
    if "fit" in r and target is not None:
        k = first_reach(ref, r["fit"], target, running_log_lik(ref, r["fit"]))
        if k is not None:
            row["k"] = k
            row["ttt"] = k * r["fit"].time_per_iteration
            # CPU: k × the whole fit's CPU per iteration (its set-up and result spread over the iterations)
            row["cpu_ttt"] = k * r["cpu"] / r["fit"].num_iterations
    reach = "never" if row["k"] is None else f"{row['k']} it, {row['ttt']:.2f} s, CPU {row['cpu_ttt']:.2f} s"
    cpu = f"  CPU {r['cpu']:.2f} s" if "cpu" in r else ""
    print(f"  {name:24s} dLL {row['dll']:+8.3f}  IS {row['is']:+8.3f} ± {row['is_se']:.3f}  max|d|/SE "
          f"{row['worst']:5.2f}  total {row['total']:6.1f} s{cpu}  iters {row['iters']:6.1f} s  to SAEM's LL: {reach}",
          flush=True)
    return row


def multi_seed(num: int, seeds, svi_steps: int, target_slack: float, only=None, fit_seeds=None) -> None:
    """Per seed (data and fit seed; with ``fit_seeds``, every data seed is fitted with each of them, ``-1`` standing for
    the data seed): the exact maximum, SAEM, MCMCSGD (Pyro, NumPyro), MISSO and SVI with their defaults; ΔLL (AGQ) of
    the final estimates, their IS log-likelihood and its MC error, and the time of each running estimate to SAEM's
    final log-likelihood (minus ``target_slack``): the NumPyro rows' target is ``SAEM (NumPyro)``'s where that row
    runs (``--only`` words matching it), else ``SAEM (Pyro)``'s.  Summary: mean ± sd over the fits."""
    methods = {
        "SAEM (Pyro)": lambda d, seed: run_engine(lpy, "SAEM", "pyro", d, seed, {}),
        "SAEM (NumPyro)": lambda d, seed: run_engine(lnp, "SAEM", "numpyro", d, seed, {}),
        "MCMCSGD (Pyro)": lambda d, seed: run_engine(lpy, "MCMCSGD", "pyro", d, seed, {}),
        "MCMCSGD (NumPyro)": lambda d, seed: run_engine(lnp, "MCMCSGD", "numpyro", d, seed, {}),
        "MCMCSGD fisher (Pyro)": lambda d, seed: run_engine(lpy, "MCMCSGD", "pyro", d, seed, {"optimizer": "fisher"}),
        "MCMCSGD fisher (NumPyro)": lambda d, seed: run_engine(lnp, "MCMCSGD", "numpyro", d, seed,
                                                               {"optimizer": "fisher"}),
        "MCMCSGD fisher exact (Pyro)": lambda d, seed: run_engine(lpy, "MCMCSGD", "pyro", d, seed,
                                                                  {"optimizer": "fisher", "information": "exact"}),
        "MCMCSGD fisher exact (NumPyro)": lambda d, seed: run_engine(
            lnp, "MCMCSGD", "numpyro", d, seed, {"optimizer": "fisher", "information": "exact"}),
        "MCMCSGD fisher exact long (Pyro)": lambda d, seed: run_engine(
            lpy, "MCMCSGD", "pyro", d, seed, {"optimizer": "fisher", "information": "exact", "average_from": 210,
                                              "momentum_steps": 60, "schedule": "decay"}),
        "MISSO (Pyro)": lambda d, seed: run_engine(lpy, "MISSO", "pyro", d, seed, {}),
        "MISSO (NumPyro)": lambda d, seed: run_engine(lnp, "MISSO", "numpyro", d, seed, {}),
        "MISSO louis (Pyro)": lambda d, seed: run_engine(lpy, "MISSO", "pyro", d, seed, {"surrogate": "louis"}),
        "MISSO louis (NumPyro)": lambda d, seed: run_engine(lnp, "MISSO", "numpyro", d, seed, {"surrogate": "louis"}),
        "MISSO bohning (Pyro)": lambda d, seed: run_engine(lpy, "MISSO", "pyro", d, seed, {"surrogate": "bohning"}),
        "MISSO bohning (NumPyro)": lambda d, seed: run_engine(lnp, "MISSO", "numpyro", d, seed,
                                                              {"surrogate": "bohning"}),
        "MISSO bohning 1/4 (Pyro)": lambda d, seed: run_engine(lpy, "MISSO", "pyro", d, seed,
                                                               {"surrogate": "bohning", "bound": "bohning"}),
        "MISSO bohning none (Pyro)": lambda d, seed: run_engine(lpy, "MISSO", "pyro", d, seed,
                                                                {"surrogate": "bohning", "expand": "none"}),
        "MISSO bohning none (NumPyro)": lambda d, seed: run_engine(lnp, "MISSO", "numpyro", d, seed,
                                                                   {"surrogate": "bohning", "expand": "none"}),
        "MISSO bohning loc+scale (Pyro)": lambda d, seed: run_engine(
            lpy, "MISSO", "pyro", d, seed, {"surrogate": "bohning", "expand": "location+scale"}),
        "MISSO bohning loc+scale (NumPyro)": lambda d, seed: run_engine(
            lnp, "MISSO", "numpyro", d, seed, {"surrogate": "bohning", "expand": "location+scale"}),
        "MISSO bohning accelerate (Pyro)": lambda d, seed: run_engine(
            lpy, "MISSO", "pyro", d, seed, {"surrogate": "bohning", "accelerate": True}),
        "MISSO bohning accelerate (NumPyro)": lambda d, seed: run_engine(
            lnp, "MISSO", "numpyro", d, seed, {"surrogate": "bohning", "accelerate": True}),
        "MISSO b=10% (Pyro)": lambda d, seed: run_engine(lpy, "MISSO", "pyro", d, seed,
                                                         {"batch_size": -(-d["num"] // 10)}),
        "SVI AutoNormal (Pyro)": lambda d, seed: run_svi(d, seed, svi_steps),
    }
    if only:
        methods = {k: v for k, v in methods.items() if k == "SAEM (Pyro)" or any(o in k for o in only)}
    else:  # the 10% variant is opt-in (--only MISSO): at N = 400 it costs several times the default's time
        methods.pop("MISSO b=10% (Pyro)")
        for k in ("MISSO (NumPyro)", "MISSO louis (Pyro)", "MISSO louis (NumPyro)", "MISSO bohning (Pyro)",
                  "MISSO bohning (NumPyro)", "MISSO bohning 1/4 (Pyro)", "MISSO bohning none (Pyro)",
                  "MISSO bohning none (NumPyro)", "MISSO bohning loc+scale (Pyro)",
                  "MISSO bohning loc+scale (NumPyro)", "MISSO bohning accelerate (Pyro)",
                  "MISSO bohning accelerate (NumPyro)"):  # opt-in (--only MISSO ...)
            methods.pop(k)
        methods.pop("SAEM (NumPyro)")  # opt-in too (--only SAEM): the default table's target is Pyro's SAEM
    rows: dict[str, list[dict]] = {name: [] for name in ["exact maximum (AGQ)", *methods]}
    for data_seed in seeds:
        d = simulate(num, 15, data_seed)
        ref = Reference(d)
        ll_is, se_is = is_log_lik(ref, ref.theta)
        rows["exact maximum (AGQ)"].append({"dll": 0.0, "is": ll_is - ref.ll, "is_se": se_is, "total": ref.time,
                                            "iters": float("nan"), "ttt": float("nan"), "worst": 0.0})
        print(f"seed {data_seed}: exact LL {ref.ll:.3f} converged={ref.converged} ({ref.time:.1f} s); IS at it "
              f"{ll_is:.3f} ± {se_is:.3f}", flush=True)
        for seed in [data_seed if f < 0 else f for f in (fit_seeds or [-1])]:
            if fit_seeds:
                print(f" fit seed {seed}", flush=True)
            targets: dict[str, float] = {}
            for name, plan in methods.items():
                r = plan(d, seed)
                rows[name].append(_multi_seed_row(ref, name, r, targets, target_slack))

    print()
    print(f"Summary over seeds {list(seeds)} (N = {num} individuals x 15): mean ± sd over seeds; LL differences to "
          "each seed's exact maximum (AGQ 5 nodes)")
    head = (f"{'method':<36}{'dLL (AGQ)':>18}{'dLL (IS)':>12}{'IS MC se':>10}{'max|d|/SE':>11}{'iters (s)':>11}"
            f"{'time to SAEM LL (s)':>22}{'CPU to it (s)':>15}")
    print(head)
    print("-" * len(head))
    for name, rs in rows.items():
        dll = np.array([r["dll"] for r in rs])
        isd = np.array([r["is"] for r in rs])
        ttt = np.array([r["ttt"] for r in rs])
        reached = int(np.sum(np.isfinite(ttt)))
        ttt_s = "-" if name.startswith("exact") else (
            f"{np.nanmean(ttt):.2f} ({reached}/{len(rs)})" if reached else f"never (0/{len(rs)})")
        cpu = np.array([r.get("cpu_ttt", np.nan) for r in rs])
        cpu_s = f"{np.nanmean(cpu):.2f}" if np.any(np.isfinite(cpu)) else "-"
        print(f"{name:<36}{dll.mean():+9.2f} ± {dll.std(ddof=1) if len(rs) > 1 else 0.0:5.2f}{isd.mean():+12.2f}"
              f"{np.mean([r['is_se'] for r in rs]):10.2f}{np.mean([r['worst'] for r in rs]):11.2f}"
              f"{np.nanmean([r['iters'] for r in rs]) if not name.startswith('exact') else np.nan:11.1f}{ttt_s:>22}"
              f"{cpu_s:>15}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 100, few iterations: a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--remedies", action="store_true",
                    help="the remedies study instead (N = 400, seeds 0-2, MCMCSGD variants; see the docstring)")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="the multi-seed table instead (SAEM, MCMCSGD, MISSO, SVI, exact maximum on each seed)")
    ap.add_argument("--num", type=int, default=400, help="individuals in the multi-seed table")
    ap.add_argument("--svi-steps", type=int, default=5000, help="SVI steps in the multi-seed table")
    ap.add_argument("--only", nargs="+", help="multi-seed table: only the methods whose name contains one of these "
                    "words (SAEM, the target, always runs), e.g. --only MCMCSGD")
    ap.add_argument("--fit-seeds", type=int, nargs="+",
                    help="multi-seed table: fit every data seed with each of these seeds (-1: the data seed), e.g. "
                    "--seeds 0 1 2 --fit-seeds -1 10 20 (the 9 fits of the docstring's tables)")
    ap.add_argument("--target-slack", type=float, default=0.1,
                    help="time-to-target: the running estimate's LL >= SAEM's final LL minus this")
    a = ap.parse_args()
    if a.seeds:
        torch.set_num_threads(a.threads)
        warnings.filterwarnings("ignore", category=UserWarning)
        multi_seed(a.num, a.seeds, a.svi_steps, a.target_slack, a.only, a.fit_seeds)
        return
    if a.remedies:
        torch.set_num_threads(a.threads)
        remedies()
        return
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    if a.quick:
        num, sgd_iters, saem_iters, svi_steps, nuts = 100, 60, (30, 10), 200, (100, 100)
    else:
        num, sgd_iters, saem_iters, svi_steps, nuts = 1200, None, None, 15000, (500, 500)
    d = simulate(num, 15, a.seed)
    print(f"data: N = {num} individuals x 15 observations, event rate {d['y'].mean():.3f}, seed {a.seed}; "
          f"true beta = {BETA.tolist()}, omega = {OMEGA.tolist()}")

    ref = Reference(d)
    print(f"exact maximum (AGQ {NODES} nodes/dim, from the truth): converged={ref.converged} after {ref.num_outer} "
          f"outer iterations, {ref.time:.1f} s; LL = {ref.ll:.3f} ({NODES} nodes), {ref.ll7:.3f} (7 nodes)")
    print("  estimate: " + ", ".join(f"{k}={v:.4f}" for k, v in zip(LABELS, ref.vector())))
    print("  SE:       " + ", ".join(f"{k}={v:.4f}" for k, v in zip(LABELS, ref.se)))
    if not ref.converged:
        print("  WARNING: the quadrature maximiser did not report convergence")

    opt_sgd = {} if sgd_iters is None else {"num_iters": sgd_iters}
    opt_saem = {} if saem_iters is None else {"num_iters": saem_iters}
    rows, notes = {}, []
    plans = [("MCMCSGD (Pyro)", lambda: run_engine(lpy, "MCMCSGD", "pyro", d, a.seed, opt_sgd)),
             ("MCMCSGD (NumPyro)", lambda: run_engine(lnp, "MCMCSGD", "numpyro", d, a.seed, opt_sgd)),
             ("SAEM (Pyro)", lambda: run_engine(lpy, "SAEM", "pyro", d, a.seed, opt_saem)),
             ("SAEM (NumPyro)", lambda: run_engine(lnp, "SAEM", "numpyro", d, a.seed, opt_saem)),
             ("MCEM (Pyro)", lambda: run_engine(lpy, "MCEM", "pyro", d, a.seed, {})),
             ("SVI AutoNormal (Pyro)", lambda: run_svi(d, a.seed, svi_steps)),
             ("NUTS post. mean (NumPyro)", lambda: run_nuts(d, a.seed, *nuts))]
    for name, plan in plans:
        try:
            row = plan()
        except Exception as e:  # a method that refuses the model: print why and go on
            notes.append(f"{name}: skipped, {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        row["ll"] = ref.log_lik({"beta": row["theta"][:3], "omega": row["theta"][3:]})
        rows[name] = row
        if "note" in row:
            notes.append(f"{name}: {row['note']}")

    print()
    print("Table 1: wall time (s), estimates, log-likelihood at the estimate (AGQ 5 nodes) and distance to the "
          "exact maximum")
    head = (f"{'method':<26}{'setup':>7}{'compile':>8}{'iters':>7}{'total':>7} "
            + "".join(f"{k:>8}" for k in LABELS) + f"{'LL':>11}{'dLL':>8}{'max|d|/SE':>10}")
    print(head)
    print("-" * len(head))
    print(f"{'exact maximum (AGQ)':<26}{'':>7}{'':>8}{'':>7}{ref.time:7.1f} "
          + "".join(f"{v:8.4f}" for v in ref.vector()) + f"{ref.ll:11.2f}{0.0:8.2f}{0.0:10.2f}")
    print(f"{'  its SE':<26}{'':>29} " + "".join(f"{v:8.4f}" for v in ref.se))
    for name, r in rows.items():
        dev = np.abs(r["theta"] - ref.vector()) / ref.se
        print(f"{name:<26}{fmt_t(r['setup']):>7}{fmt_t(r['compile']):>8}{fmt_t(r['iters']):>7}{fmt_t(r['total']):>7} "
              + "".join(f"{v:8.4f}" for v in r["theta"])
              + f"{r['ll']:11.2f}{r['ll'] - ref.ll:8.2f}{np.nanmax(dev):10.2f}")
    print(f"{'truth':<26}{'':>29} " + "".join(f"{v:8.4f}" for v in np.concatenate([BETA, OMEGA]))
          + f"{ref.log_lik({'beta': BETA, 'omega': OMEGA}):11.2f}")
    for note in notes:
        print("  " + note)

    print()
    print("Table 2: time until the running estimate's LL (AGQ 5 nodes, at checkpoints) is within 0.5 of the exact "
          "maximum's")
    head2 = f"{'method':<26}{'iters':>6}{'s/iter':>9}{'time (s)':>10}{'+setup+compile':>16}   LL - LLmax at the checkpoints"
    print(head2)
    print("-" * len(head2))
    for name in ("MCMCSGD (Pyro)", "MCMCSGD (NumPyro)", "SAEM (Pyro)", "SAEM (NumPyro)"):
        if name not in rows:
            continue
        r = rows[name]
        k, secs, trail = time_to_ll(ref, r)
        tpi = r["fit"].time_per_iteration
        trail_s = " ".join(f"{kk}:{dl:+.1f}" for kk, dl in trail)
        if k is None:
            print(f"{name:<26}{'never':>6}{tpi:9.4f}{'-':>10}{'-':>16}   {trail_s}")
        else:
            print(f"{name:<26}{k:6d}{tpi:9.4f}{secs:10.2f}{secs + r['setup'] + r['compile']:16.2f}   {trail_s}")


if __name__ == "__main__":
    t_start = time.perf_counter()
    main()
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.0f} s)")
