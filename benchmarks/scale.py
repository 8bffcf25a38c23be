"""Scale benchmark (issue 13): SAEM on large PK populations over processes (torch.distributed) and devices (JAX).

    python benchmarks/scale.py [--quick] [--sizes 5000,100000] [--processes 1,2,4] [--devices 1,2,4]
                               [--memory-sizes 100000,1000000] [--iters 6,4] [--mmap-threshold 131072]
                               [--jax-process-sizes 20000,200000] [--jax-processes 2]
                               [--memory-modes keep,drop] [--memory-before DIR] [--memory-repeats 3]

Data: the one-compartment oral population of ``benchmarks/nlme.py`` (10 observations per individual at
0.25 … 24 h, one dose of 100 at time 0; ka = 1, V = 8, CL = 0.8, ω² = 0.16/0.09/0.09, a = 0.5), simulated here in
closed form with numpy so that N = 10⁶ costs seconds.

1. **torch.distributed** (gloo, one machine): P processes spawned by ``torch.multiprocessing``, each reading only its
   contiguous block of individuals (written by the parent), binding an NLME to it and running
   ``SAEM(..., rng="per_unit").run(distributed=True)`` (one intra-op thread each).  P = 1 is the plain one-process
   fit.  Reported per P: time per SAEM iteration (initialisation excluded; the slowest process), peak resident memory
   per process (``VmHWM``: imports, the block's data and the fit), and the largest difference of the estimates from
   the one-process fit.
2. **JAX devices**: one process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, the NLME with
   ``backend="jax"`` and ``run(devices=d)`` (chains split; the data were replicated when the table below was
   measured, and are now split too: the arrays with a leading unit axis), d = 1, 2, 4: time per iteration
   (compilation excluded), peak resident memory of the process during that fit, estimates against d = 1.
3. **Memory**: one process, N individuals, per individual over ``RSS0`` (the resident memory after the imports and a
   50-individual fit, so that neither counts as per-unit memory): the simulated table (the caller's DataFrame), the
   resident memory after binding it, the peak while binding and the peak during a short SAEM run (``VmHWM``, reset
   after binding), against the bytes the per-unit state needs (the model's arrays with one row per individual plus the
   chains ``z [L, N, d]``, each block of memory once: a row viewed N times counts once).  Two workflows
   (``--memory-modes``): ``keep``, the caller keeps its table through the fit, and ``drop``, it drops it once the model
   is bound (``model.fit(read_nonmem(path))``; since the model keeps a compact copy of the table instead of the
   caller's DataFrame, the DataFrame is then freed).  ``--memory-before DIR`` runs every row also with the library of
   another checkout, alternated in fresh processes (``--memory-repeats``).  ``--mmap-threshold`` sets glibc's
   ``MALLOC_MMAP_THRESHOLD_`` for it.

4. **JAX processes, whole data vs each process its block**: 2 processes (``jax.distributed``, one CPU device each,
   collectives over gloo) fitting ``NLME(backend="jax")`` with ``rng="per_unit"``, every process reading the whole
   table (``distributed=True``) or only its block of the individuals (``distributed="local"``, issue 13 item 3):
   per process the resident memory the table and the binding left, the peaks while binding and during the fit
   (compilation included), time per iteration, and the estimates against the whole-data run.

On a machine with fewer cores than processes or devices the runs are oversubscribed: the times then measure
contention, not scaling (the table prints the core count and the load average).

Measured (2026-12-02, ``python benchmarks/scale.py``, 2 CPU cores shared with other jobs: load average 13-18
throughout, so 2 and 4 processes/devices are oversubscribed and the times are contention, not scaling)::

    1. torch.distributed (gloo, one machine; one thread per process)
           N processes  units/proc   ms/iter  peak MiB/proc   max |Δθ| vs 1
        5000         1        5000     178.7            353         0.0e+00
        5000         2        2500     397.2            351         3.6e-15
        5000         4        1250     416.3            345         0.0e+00
      100000         1      100000    2164.7            815         0.0e+00
      100000         2       50000    2016.9            526         4.2e-17
      100000         4       25000    1917.9            437         4.2e-17

    2. JAX host devices (one process; chains split, data replicated)
           N   devices   ms/iter  compile s  peak MiB   max |Δθ| vs 1
        5000         1     115.8       14.6       668         0.0e+00
        5000         2      96.3       18.1       724         8.7e-16
        5000         4      89.5       17.3       773         8.7e-16
      100000         1     781.7       13.7      1150         0.0e+00
      100000         2     741.3       16.2      1453         2.7e-15
      100000         4     795.7       13.5      1567         9.0e-16

    3. memory per individual, one process (torch, SAEM (3, 0) iterations, 1 chain; B/individual; 2026-12-02 15:24-15:54,
       load average 11-16; before: the library before 218a32d, same measurement)
                    N   table   data  bind pk   peak  state  +copies  peak/state   fit   ms/iter
       before  100000     533   1568     3679   2366    716      816        3.30   797      1017
       before 1000000     528   1535     3528   2359    716      816        3.29   824     17572
       after   100000     533   1093     2550   2455    386      626        6.36  1362       998
       after  1000000     528   1067     2379   1924    386      626        4.98   857     17443
       with MALLOC_MMAP_THRESHOLD_=131072 (bind pk: before dde8679's earlier frees in read_nonmem):
       before  100000     533   1559     3513   2205    716      816        3.08   646      1984
       before 1000000     528   1536     3471   2152    716      816        3.01   616     47748
       after   100000     533   1084     2721   1728    386      626        4.48   645      2121
       after  1000000     528   1071     2690   1687    386      626        4.37   616     16627

    3'. the same after blocked evaluation and compact reading (2026-12-02 20:55-21:17, load 5-9; two runs each with
       glibc's default allocator, one with the mmap threshold; state: 322 B, as the fixed-effect design no longer
       holds an [N, m, p] array, 64 B per individual that was counted in the 386 B)
                    N   table   data  bind pk   peak  state  +copies  peak/state   fit
       default  100000     532    937     1585   1690    322      626        5.25   753
       default  100000     532    937     1585   1704    322      626        5.29   767
       default 1000000     528    925     1544   1610    322      626        5.00   684
       default 1000000     528    925     1544   1534    322      626        4.76   608
       mmap     100000     532    938     1550   1401    322      626        4.35   463
       mmap    1000000     528    925     1521   1376    322      626        4.27   450

    4. JAX processes (2026-12-03 08:24-08:32, ``--skip torch,jax,memory --jax-process-sizes 20000,200000``, SAEM
       (10, 5); 2 cores shared with other jobs, load 7-10; MiB per process, the largest over the 2 processes; data, bind
       pk and fit pk over RSS0, the resident memory after the imports: 199 MiB)
           N   mode rows/proc   data bind pk  fit pk peak MiB/proc  ms/iter compile s  max |Δθ| vs whole
       20000  whole    220000     78      87     467           665    207.9      23.6            0.0e+00
       20000  local    110000     66      72     480           679    188.4      30.5            0.0e+00
      200000  whole   2200000    296     374    1001          1199   1135.6      22.4            0.0e+00
      200000  local   1100000    174     207     731           930    598.5      29.3            0.0e+00

   With its block alone a process holds half the table and half the bound data: at N = 2·10⁵ the data it keeps fall
   from 296 to 174 MiB (~50 MiB of it is the first binding's fixed cost, 56 MiB already at N = 2000), the binding's peak
   from 374 to 207 MiB, the fit's from 1001 to 731 MiB and the process's peak from 1199 to 930 MiB (-22 %).  At
   N = 2·10⁴ the data are small (78 against 66 MiB) and the fit's peak is mostly the compilation's (~400 MiB either
   way; the local mode's is 13 MiB higher, likely its programs' one-slot global copies of the block's data, not
   measured apart): the process's peak is 665 against 679 MiB.  The estimates are the same to the last bit in both
   modes.  The times are under load (contention): at 2·10⁵ the local mode was 1.9× faster per iteration in this one
   run, not investigated and not a stable figure.

   Blocks of unequal size (``--jax-modes whole,local,uneq``; 2026-12-03, load 10-15; process 0 holding 1/3 of the
   individuals, padded with dummy individuals of weight 0 to process 1's 2/3)::

           N   mode rows/proc RSS0 MiB   data bind pk  fit pk peak MiB/proc  ms/iter compile s  max |Δθ| vs whole
       20000  whole    220000      196     79      86     484           679    226.5      26.8            0.0e+00
       20000  local    110000      196     66      73     465           660    369.5      31.0            0.0e+00
       20000   uneq    146674      196     69      75     509           704    436.0      36.6            3.6e-15

   The larger block sets the padded size (13 333 individuals on both processes), so each process's fit works on 2/3
   of the individuals instead of 1/2: its peak is 704 against 660 MiB with equal blocks (the compilation's ~400 MiB
   dominate at this N); the estimates equal the whole-data run's to 3.6e-15.

Parts 1-2 at N = 10⁵ again (2026-12-03 21:37-22:06, tree 4c9b05e + the CPU clocks; ``--sizes 100000 --iters 20,10
--skip jaxproc,memory``; 2 CPU cores shared with other jobs, load 4.5-9.6).  ms/iter: the fit's wall time per iteration
(set-up and compilation excluded); med ms / CPU ms: the median over chunks of 5 iterations after the first, of the wall
and of the CPU time (``time.process_time``) per iteration; torch: CPU of the slowest process and summed over the
processes.  Part 1 is the second of two runs (the first shared the machine with a test run of mine: 1113 / 2147 /
1550 ms/iter, CPU 651 / 388 / 266 ms per process, the same estimates)::

    1. torch.distributed (gloo, one machine; one thread per process)
           N processes  units/proc   ms/iter  med ms CPU ms/proc CPU ms all  peak MiB/proc   max |Δθ| vs 1  load
      100000         1      100000    1035.9   962.5       494.5      494.5            566         0.0e+00   5.4
      100000         2       50000    1397.3  1429.2       373.0      740.9            452         2.7e-15   7.0
      100000         4       25000    1482.2  1444.0       253.8      888.4            395         0.0e+00   9.6

    2. JAX host devices (one process; chains and the per-unit data split)
           N   devices   ms/iter  med ms  CPU ms  compile s  peak MiB   max |Δθ| vs 1  load
      100000         1     265.2   241.8   187.5       15.7       860         0.0e+00   8.3
      100000         2     285.9   273.5   211.7       17.3      1118         8.7e-16   8.6
      100000         4     209.9   198.2   188.3        8.2      1196         0.0e+00   8.0

   The machine has 2 cores, shared: 2 processes can at best halve the wall time and 4 processes (or 4 devices) on
   2 cores cannot speed anything up; the wall times here measure contention.  The CPU time per process falls with
   its block (495 -> 373 -> 254 ms), less than in proportion: the summed CPU grows (495 -> 741 -> 888 ms), the cost
   of the all-reduces, of the per-iteration work that does not shrink with the block (the M-step, the statistics'
   reductions, Python) and of the processes competing for 2 cores.  On JAX the CPU per iteration is the same on 1, 2
   and 4 devices (188-212 ms: the same work, partitioned; the host "devices" share the process's threads).  The peak
   per process falls with the block on torch (566 -> 452 -> 395 MiB; ~250 MiB of it are the imports); on JAX the
   peak is of one process running the three fits in turn (each after the previous one's peak was reset), so it grows
   with the compiled programs kept.  Every run's estimates equal the one-process fit's to 2.7e-15.

Part 3 again (2026-12-03 22:00-22:03, same tree, load 4-6, glibc's default allocator; B per individual)::

                    N chains  table  data bind pk  peak state +copies peak/state -table proc-table  fit
               100000      1    533   940    1267  1374   322     626       4.27   2.61       2.61  433
              1000000      1    528   926    1215  1224   322     626       3.80   2.16       2.16  298

   Linear in N: the resident memory per individual is the same at 10⁵ and 10⁶ but for the fit's fixed-size block
   temporaries (~100 B per individual at 10⁵, ~15 at 10⁶).  Against the 322 B of per-unit state the process's peak is
   3.80x at 10⁶ (4.27x at 10⁵) with the caller's DataFrame (528 B per individual, which the model keeps by reference
   and the simulation and re-binding read) and 2.16x (2.61x) without it: the 3x goal is met for what the library
   allocates and NOT met when the caller's table is counted.  What the fit adds at its peak (a dispatch-mode count of
   the live torch storages, N = 2·10⁵, one chain: 223 B per individual) is the state's chains and cache (32 B), the
   sweep's output chains and caches (~56 B), the prior proposal being evaluated and its draw (48 B, ``[L, N, d]``),
   ~40 B of ``[L, N]`` log-densities, uniforms and differences, and one block's temporaries (~50 B at 2·10⁵); the
   driver's last-good snapshot (32 B, numpy) came on top.  Cutting the 3x with the table would need ~260 B per
   individual less, about all of the fit's own increment.

   The snapshot is gone for SAEM and f-SAEM (their steps never write into their input, ``Engine.pure_step``: the
   driver keeps the last good state by reference).  Before (bbfebc9) and after alternated in fresh processes at
   N = 10⁶ (2026-12-03 22:33-22:40, load 5-6), B per individual::

                                    table  data bind pk  peak state peak/state -table proc-table  fit
       mmap threshold 131072 before   529   926    1159  1161   322       3.61   1.96       1.96  235
                             after    529   927    1160  1129   322       3.51   1.87       1.96  203
                             before   529   926    1159  1160   322       3.60   1.96       1.96  235
                             after    529   927    1161  1130   322       3.51   1.87       1.96  203
       glibc's default       before   528   926    1215  1224   322       3.80   2.16       2.16  298
       (22:00-22:31)         after    529   925    1215  1247   322       3.87   2.23       2.23  322
                             before   529   926    1215  1287   322       4.00   2.36       2.36  361
                             after    528   926    1216  1248   322       3.88   2.23       2.23  322

   With a fixed mmap threshold the fit's peak falls by the snapshot's 32 B (1160 -> 1129); with glibc's default
   allocator the run-to-run spread (1224-1287 before) is larger than the change.  The process's peak is now the
   binding's (1.16 kB: the table, the bound data and read_nonmem's temporaries) with the mmap threshold.  The 3x goal
   counting the caller's table is still NOT met (3.5-3.9x); without it the process's peak is 1.96-2.23x the state.

Every run's estimates agree with the one-process / one-device fit to rounding (≤ 4e-15).  Per process, the peak
memory falls with the block (815 → 437 MiB at N = 10⁵); the imports alone are ~256 MiB.  Re-run of parts 1-2 at
N = 5000 after the memory changes (load 11-13): 133 / 217 / 449 ms per iteration and 359 / 354 / 350 MiB on 1 / 2 / 4
processes, 50 / 40 / 64 ms and 616 / 685 / 731 MiB on 1 / 2 / 4 JAX devices, estimates within 3.6e-15.

Memory (part 3).  The bound model no longer keeps copies that the fit never reads: the observations with NaN padding
(``model.observed``, now built when asked), log y without the exponential error, the censoring codes as floats without
censored data, ``X_i`` (the same identity matrix for each individual when there is no covariate: one row viewed N
times), and NLMEData's period array without a reset; the censoring codes are int8 and the table row positions int32.
The resident data fell from 1.5 to 1.1 kB per individual, of which 0.53 kB is the caller's table, and the state itself
from 716 to 386 B (the dropped arrays were counted in it).  read_nonmem's per-row temporaries (11 rows of 8 bytes per
individual each) are freed sooner, so the binding peak fell from 3.5-3.7 to 2.4-2.6 kB.  At N = 10⁶ the peak during
the fit is 1.92 kB per individual (2.36 kB before); at 10⁵ it did not fall (2.37 → 2.46 kB) because glibc kept more
freed heap pages resident in that run: with a fixed mmap threshold the fit's own increment is the same before and
after (645 B) and the peak falls by 0.47 kB at both sizes.  The 3× goal is NOT met: the peak is 5.0× (10⁶) and 6.4×
(10⁵) the state.  Beyond the table (0.53 kB, the caller's) and the bound arrays (0.54 kB), the fit adds ~0.6 kB even
with a fixed mmap threshold (tensors alive at its peak, a line tracer found: 0.4-0.5 kB, three ``[L, N, T]`` float64
arrays at once inside the one-compartment model and the residual sum of squares, 240 B, plus the kernels' chain states
and ``[L, N, 1]`` parameters) and, with glibc's default allocator, a further 0.3-0.6 kB of freed heap pages that it
keeps resident (``MALLOC_MMAP_THRESHOLD_=131072`` removes them at a cost in system time at N = 10⁵).  The binding, not
the fit, sets the process's peak.  Within 3× of 386 B would need evaluating the model over blocks of individuals (the
``[L, N, T]`` temporaries) and not counting the caller's table.
The N = 10⁶ time per iteration (17 s, vs 0.9 s at 10⁵) was measured under that load and is not a scaling figure.

Part 3 again (3').  Three changes, the fits unchanged bit for bit (tests/test_nlme_memory.py):
* ``read_nonmem`` reads its per-row codes narrow (EVID int8, MDV a bool, CENS int8, row and individual indices int32)
  and views absent columns (CMT, CENS, RATE, ADDL, II, SS) and the single period as one value on every row: the
  binding peak falls from 2.4-2.5 to 1.5-1.6 kB per individual (tracemalloc inside ``read_nonmem``: 1.85 -> 1.0 kB).
* Without covariates the fixed-effect design views a copy of its first row: it viewed the first row of the
  ``[N, m, p]`` array, which kept all of it (64 B per individual at m = p = 3).  The bound data fall from 1.07-1.09 to
  0.93 kB per individual, of which 0.53 kB is the caller's table.
* On torch the structural model and the residual sums run over blocks of individuals once an ``[L, n, T]``
  temporary would exceed 2 MiB (``Ops.unit_blocks``; a block's design views the model's τ = t − t_d), so the fit's
  temporaries no longer grow with N: the fit's own peak (``fit``) falls from 0.62-0.65 to 0.45-0.46 kB with a fixed
  mmap threshold, and to 0.61-0.77 kB with glibc's default allocator (0.86-1.8 kB before, run to run).  What is left
  at the peak (a line tracer, N = 10⁵, one chain) is the state of a random-walk step: eight ``[L, N, d]`` and about
  25 ``[L, N]`` float64 arrays (chains, proposals and their log-densities), not the data.
The process peak (the binding's or the fit's) is now 1.5-1.7 kB per individual against 2.4-2.5 kB before: 4.8-5.3x
the state's 322 B with the caller's table, 3.1-3.6x without it.  The 3x goal is still NOT met: the fit's own increment
is 1.9-2.4x the state, the caller's table 1.6x, the bound data's copies for the post-fit tools (row positions,
censoring codes, the observation mask) 0.3x.

    3''. the MCMC kernels over blocks of individuals, then read_nonmem reading float columns in place
       (2026-12-03 05:25-06:31, load 3-12 on 2 cores shared with other jobs; before: cea399e; kernels: 7701ec5;
       +read: the commit after it, two runs each and one with the mmap threshold; -table: (peak - table) / state;
       proc-table: (max(bind pk, peak) - table) / state, the process's peak without the caller's table)
                    N   table   data  bind pk   peak  state  +copies  peak/state  -table  proc-table   fit
       before  100000     532    948     1583   1610    322      626        5.00    3.35        3.35   662
       before 1000000     528    926     1544   1631    322      626        5.07    3.43        3.43   705
       kernels 100000     532    948     1591   1442    322      626        4.48    2.83        3.29   495
       kernels 100000     532    937     1586   1360    322      626        4.22    2.57        3.27   423
       kernels 1000000    528    925     1544   1261    322      626        3.92    2.28        3.15   336
       kernels 1000000    528    925     1544   1262    322      626        3.92    2.28        3.16   337
       kernels mmap 1e5   532    938     1549   1240    322      626        3.85    2.20        3.16   302
       kernels mmap 1e6   528    925     1521   1159    322      626        3.60    1.96        3.08   234
       +read   100000     532    937     1388   1379    322      626        4.28    2.63        2.66   442
       +read   100000     532    948     1252   1458    322      626        4.53    2.88        2.88   510
       +read  1000000     528    926     1214   1238    322      626        3.85    2.20        2.20   312
       +read  1000000     528    926     1214   1246    322      626        3.87    2.23        2.23   320
       +read mmap 1e5     532    938     1188   1241    322      626        3.86    2.20        2.20   304
       +read mmap 1e6     528    926     1159   1160    322      626        3.60    1.96        1.96   234

Part 3 again (3'').  Two changes, the fits unchanged bit for bit:
* On torch the sweep's kernels (prior IMH, component-wise and block random walk, and the independence sampler) run over
  the same blocks of individuals as the model's evaluation (``mcmc._accept_blocks``; the model hands them a
  ``UnitBlockEvaluator``): each step draws its noise and uniforms whole, in the order it drew them before, then
  evaluates, accepts and writes one block at a time into the output chains, which the sweep overwrites in place after
  its first step; the acceptance indicators are one bool ``[L, N]`` per step and the non-finite count a scalar
  (tests/test_nlme_memory.py).  The live tensors a fit creates (a dispatch-mode count of their storages, one chain)
  peak at 268 instead of 417 B per individual at N = 10⁵ (~100 B of which are one block's fixed-size temporaries) and
  at 201 B at N = 10⁶: the driver's last-good snapshot and the SAEM state (their z and cache, 64 B), the sweep's
  chains (48 B), and the prior proposal being drawn (three ``[L, N, d]`` in ``sample_prior``) or one step's new
  chains.  The fit's own resident increment falls from 662-705 to 312-510 B per individual (234-304 B with the mmap
  threshold).
* ``read_nonmem`` reads the table's float64 columns as read-only views instead of copies (``pd.to_numeric`` copied
  each: 88 B per individual and column at 11 rows), and AMT without NaN without ``nan_to_num``'s copy; a table
  already in (individual, time) order is not lexsorted again.  Its peak (tracemalloc, N = 10⁵) falls from 1006 to
  647 B per individual, the binding's resident peak from 1.54-1.59 to 1.21-1.39 kB.
The process's peak (the fit's or the binding's, whichever is higher) is now 1.21-1.46 kB per individual against
1.61-1.63 kB before: 2.2-2.9x the state's 322 B without the caller's table (1.96-2.2x with the mmap threshold), 3.9-4.5x
with it.  So the 3x goal is met for what the library allocates (the bound data and the fit), and NOT met if the
caller's DataFrame (0.53 kB per individual, 1.6x the state by itself) is counted.

Part 3 again (3'''): the model no longer keeps the caller's table (2026-12-04 03:55-04:02, 2 CPU cores shared with other
jobs, load 6.2-7.5, glibc's default allocator; ``--skip torch,jax,jaxproc --memory-modes keep,drop --memory-before
<4fd200b's library> --memory-repeats 2``: before (4fd200b) and after (1f0c0d6) alternated in fresh processes, two
runs of each row; B per individual over RSS0 (272 MiB); keep: the caller holds its DataFrame through the fit, drop: it
drops it once the model is bound)::

                    N  table  data bind pk  peak state +copies peak/state  proc proc/state  fit
       before keep 1e5    533   940    1264  1385   322     626       4.30  1385       4.30  445
       after  keep 1e5    533   943    1147  1459   322     110       4.53  1459       4.53  517
       before drop 1e5    533   940    1263  1325   322     626       4.11  1325       4.11  384
       after  drop 1e5    533   415    1145   849   322     110       2.64  1145       3.56  435
       before keep 1e6    529   926    1215  1239   322     626       3.85  1239       3.85  314
       after  keep 1e6    529   937    1049  1198   322     110       3.72  1198       3.72  262
       before drop 1e6    529   926    1215  1216   322     626       3.77  1216       3.77  290
       after  drop 1e6    529   409    1049   695   322     110       2.16  1049       3.26  286
       after  keep 1e5    533   943    1145  1421   322     110       4.41  1421       4.41  478
       before keep 1e5    533   940    1391  1361   322     626       4.23  1391       4.32  420
       after  drop 1e5    533   415    1148   781   322     110       2.43  1148       3.56  366
       before drop 1e5    533   940    1264  1344   322     626       4.17  1344       4.17  404
       after  keep 1e6    529   937    1049  1199   322     110       3.72  1199       3.72  262
       before keep 1e6    529   926    1216  1216   322     626       3.78  1216       3.78  290
       after  drop 1e6    529   409    1049   735   322     110       2.28  1049       3.26  326
       before drop 1e6    529   926    1215  1239   322     626       3.85  1239       3.85  313

       proc/state, median (range)      keep 1e5          drop 1e5          keep 1e6          drop 1e6
       of the two runs:   before   4.31 (4.30-4.32)  4.14 (4.11-4.17)  3.81 (3.78-3.85)  3.81 (3.77-3.85)
                          after    4.47 (4.41-4.53)  3.56 (3.56-3.56)  3.72 (3.72-3.72)  3.26 (3.26-3.26)

(proc: the process's peak, the binding's or the fit's, whichever is higher; +copies: what the bound model keeps beyond
the state: its NLMEData arrays not in the state and its table, the caller's DataFrame before, the compact copy after.)
Two changes (1f0c0d6):
* The bound model keeps a compact exact copy of its table (``models/nlme/stored.py``) instead of the caller's
  DataFrame: the IDs one value per run, DV and the time read from the bound ``[N, T]`` arrays at the observation rows,
  one value for the dose rows and for AMT/EVID/MDV: 12 B per individual instead of 528 (``+copies`` 626 -> 110 B).
  When the caller drops its table the resident data fall from 926-940 to 409-415 B per individual, and the fit's peak
  from 3.8-4.2x to 2.2-2.6x the state.  The tools that read the table again (``simulate``, the time-to-event and
  occasion simulations, re-binding, the covariate search) rebuild it: ~0.15 s per 10⁵ individuals (a new DataFrame per
  ``model.table``), the same table bit for bit (tests/test_nlme_stored_table.py).
* The binding's peak is lower: ``read_nonmem`` places the observations by the mask instead of row/slot index arrays,
  keeps the kept IDs as an array, does not gather the periods without a reset and frees its dose temporaries earlier,
  and ``bind_data`` no longer builds the ``[N, m, p]`` design (and its restriction, 144 B per individual) of a model
  without covariates: 1215-1264 -> 1049-1148 B per individual (tracemalloc inside the binding, N = 10⁵: 565 -> 507 B
  over the table).
The process's peak is now the binding's (the caller's table, 529 B, plus the bound data and ``read_nonmem``'s
temporaries), 1049 B per individual at 10⁶.  So, against the state's 322 B: with the caller keeping its table the
process's peak is 3.7x at 10⁶ and 4.4-4.5x at 10⁵ (the 3x goal NOT met; the fit's peak at 10⁵ with the table kept,
1421-1459 B, is above the before runs' 1361-1385 in these two runs, within the run-to-run spread glibc's default
allocator showed before, not investigated further); with the caller dropping its table once bound, the fit's peak is
2.2-2.6x (met) but the process's peak, the binding's, is 3.26x at 10⁶ and 3.56x at 10⁵: the 3x goal is NOT met for the
whole process either.  Meeting it with the table dropped needs the binding's peak ~85 B per individual lower at 10⁶
(the table itself is 1.64x the state and must exist while it is read): ``read_nonmem``'s per-row codes and dose
temporaries (~100 B per individual alive at its peak) are what is left to cut, or a reader of the table in blocks.

Then ``read_nonmem``'s peak lower (2523176: the duplicate-dose check's frame freed after the check, the observations
placed over blocks of individuals, the dose temporaries freed as soon as read; tracemalloc, the binding's peak over the
table at N = 10⁵: 647 (4fd200b) -> 507 (1f0c0d6) -> 427 B per individual).  The same measurement again, 4fd200b against
this tree alternated (2026-12-04 04:19-04:24, load 2.1-3.1, two runs of each row), B per individual::

                    N  table  data bind pk  peak state +copies peak/state  proc proc/state  fit
       before keep 1e5    533   940    1262  1360   322     626       4.22  1360       4.22  420
       after  keep 1e5    533   943    1069  1345   322     110       4.18  1345       4.18  402
       before drop 1e5    533   940    1265  1442   322     626       4.48  1442       4.48  502
       after  drop 1e5    533   414    1068   797   322     110       2.48  1068       3.32  383
       before keep 1e6    528   926    1216  1216   322     626       3.78  1216       3.78  290
       after  keep 1e6    529   937    1007  1246   322     110       3.87  1246       3.87  310
       before drop 1e6    529   926    1216  1216   322     626       3.78  1216       3.78  290
       after  drop 1e6    529   409    1006   723   322     110       2.25  1006       3.12  315
       after  keep 1e5    533   943    1071  1346   322     110       4.18  1346       4.18  403
       before keep 1e5    533   940    1265  1483   322     626       4.61  1483       4.61  543
       after  drop 1e5    533   415    1070   921   322     110       2.86  1070       3.32  507
       before drop 1e5    533   940    1264  1367   322     626       4.25  1367       4.25  427
       after  keep 1e6    529   937    1006  1246   322     110       3.87  1246       3.87  309
       before keep 1e6    529   925    1215  1215   322     626       3.77  1215       3.77  290
       after  drop 1e6    529   409    1006   723   322     110       2.25  1006       3.12  315
       before drop 1e6    529   926    1215  1263   322     626       3.92  1263       3.92  338

       proc/state, median (range)      keep 1e5          drop 1e5          keep 1e6          drop 1e6
       of the two runs:   before   4.41 (4.22-4.61)  4.36 (4.25-4.48)  3.77 (3.77-3.78)  3.85 (3.78-3.92)
                          after    4.18 (4.18-4.18)  3.32 (3.32-3.32)  3.87 (3.87-3.87)  3.12 (3.12-3.12)

The binding's peak fell from 1215-1265 to 1006-1071 B per individual.  Where the caller drops its table once bound,
the process's peak (now the binding's: the table, 529 B, must exist while it is read) is 3.12x the state at 10⁶ and
3.32x at 10⁵, against 3.8-4.4x before; the fit's peak alone is 2.25-2.86x.  Where the caller keeps its table, the
process's peak is the fit's (the table, the bound data and the fit's increment): 3.87x at 10⁶, 4.18x at 10⁵ (before:
3.77-3.78x and 4.22-4.61x; at 10⁶ the after runs' fit increment was 310 B against 290, within glibc's run-to-run
spread seen above).  The 3x goal is therefore NOT met in either workflow: with the table dropped it is missed by
~40 B per individual at 10⁶ (the binding's peak would have to fall from 1006 to ~966 B), with the table kept by the
table's own 1.64x.

Then the binding's own temporaries (478001c).  A line tracer reading ``VmRSS``/``VmHWM`` at every line of the binding
(N = 10⁶, the benchmark's table) showed where its resident peak came from: not from what tracemalloc sees alive (the
binding's live peak was only ~18 B per individual above the bound model's ~410 B), but from freed temporaries of 1-32 MB
(per-row bool/int8 masks, per-dose int64/float64 gathers, a hash table of the IDs) whose heap pages glibc keeps; the
last array, τ = t − t_d (80 B, mapped), then lands on top of them.  ``read_nonmem`` now reads integer code columns
(EVID, MDV, CMT, CENS) as they are (no per-row float64 copy, MDV tested without ``nan_to_num``/``abs`` copies), reads
the IDs of a table sorted by integer ID from their runs (no hash table; else one ``pd.factorize``), checks duplicate
doses only where an ID has two dose records, writes absent dose columns (RATE, CMT, SS, II, the period) as their one
value instead of gathering them at every dose, builds no slot array with one dose per ID and no sort of doses already
in order, pads the observation times per block, and the design no longer copies the int64 compartment array.  Bound
arrays and model tensors are the same bit for bit (45 tables and 8 bound models against b9f1241;
tests/test_nlme_stored_table.py).  b9f1241 against 478001c alternated in fresh processes (2026-12-04 04:46-04:49,
load 3.6-3.8, two runs of each row; ``--skip torch,jax,jaxproc --memory-sizes 1000000,100000 --memory-modes drop
--memory-before <b9f1241's library> --memory-repeats 2``), B per individual::

                    N  table  data bind pk  peak state +copies peak/state  proc proc/state  fit
       before drop 1e6    529   409    1006   663   322     110       2.06  1006       3.13  254
       after  drop 1e6    529   377     934   606   322     102       1.88   934       2.90  229
       before drop 1e5    533   415    1070   990   322     110       3.07  1070       3.32  575
       after  drop 1e5    533   407    1048   810   322     102       2.51  1048       3.26  403
       after  drop 1e6    529   377     934   670   322     102       2.08   934       2.90  292
       before drop 1e6    529   409    1006   694   322     110       2.16  1006       3.12  285
       after  drop 1e5    533   407    1046   861   322     102       2.67  1046       3.25  455
       before drop 1e5    533   415    1065   822   322     110       2.55  1065       3.31  407

       proc/state, median (range) of the two runs     drop 1e5          drop 1e6
                                          before   3.31 (3.31-3.32)  3.12 (3.12-3.13)
                                          after    3.25 (3.25-3.26)  2.90 (2.90-2.90)

With the caller dropping its table once bound, the binding's peak at 10⁶ fell from 1006 to 934 B per individual and
the process's peak (still the binding's: the table, 529 B, must exist while it is read) is 2.90x the state: the 3x
goal IS met at N = 10⁶ in the drop workflow (by ~30 B per individual; the fit's own peak is 1.9-2.1x).  At 10⁵ it is
NOT met (3.25x): there the binding's temporaries are all below glibc's mmap threshold, so their freed pages stay
resident (the tracer: ~75 B per individual of them at the end of the binding, ~60 B of which are the table
validation's and the reading's first per-row arrays); cutting the remaining per-row gathers (observation positions
as int64 before their int32 cast, the observations' per-individual counts, the in-order check) moved it by < 10 B
and was left out.  tracemalloc (N = 2·10⁴): the binding's peak fell from 492 to 435 B per individual, what it
allocates beyond what the bound model keeps from 82 to 33 B (test_binding_needs_less_than_the_table_again).
With the caller keeping its table (same trees, 04:51-04:53, load 3.2-3.5, N = 10⁶, two runs each) the process's
peak is the fit's, 3.70-3.72x before and 3.75-3.94x after (fit peaks 1190-1198 against 1207-1270 B per individual;
the fit's input is the same bit for bit and its peak spread 1198-1246 B over runs of one tree above): the 3x goal is
NOT met there (the table alone is 1.64x the state).

Then the freed heap pages handed back between the binding's phases (43ee668).  The line tracer at N = 10⁵ showed why
10⁵ stayed at 3.25x: each freed mapped temporary raises glibc's mmap threshold to its size (up to 32 MB), so after
the table validation's first 8.8 MB copies every per-row temporary came from the heap, and their freed pages (the IDs'
int64 codes and their gather at the observations, the in-order check's and the counts' gathered copies: ~100 B per
individual) stayed resident under the arrays made next, last under τ = t − t_d (80 B).  Now
``data.release_freed_memory`` (glibc's ``malloc_trim(0)`` through ctypes; a no-op without glibc) runs on tables of
≥ 2¹⁷ rows after the IDs, after the observations' order and counts, and before τ, which ``bind_data`` makes last;
``validate_table`` checks infinities on a float column in place (it copied each numeric column: the resident memory
reached 919 B per individual, the table included, at 10⁵) and skips integer columns.  What is left at the peak is
live data: the table (533 B) and what the bound model keeps (~400 B).  Bound arrays, the stored table, fits and
``simulate()`` are the same bit for bit.
d14499b (before) against 43ee668 (after) alternated in fresh processes (2026-12-04 11:36-11:47, load 4.1-4.8, two
runs of each row; ``--skip torch,jax,jaxproc --memory-modes drop,keep --memory-before <d14499b's checkout>
--memory-repeats 2``), B per individual over RSS0 (271 MiB)::

                    N  table  data bind pk  peak state +copies peak/state  proc proc/state  fit
       before drop 1e5    533   407    1049   897   322     102       2.79  1049       3.26  490
       after  drop 1e5    533   387     933   789   322     102       2.45   933       2.90  402
       before keep 1e5    533   935    1051  1348   322     102       4.19  1348       4.19  414
       after  keep 1e5    533   915     933  1309   322     102       4.07  1309       4.07  394
       before drop 1e6    529   377     934   694   322     102       2.15   934       2.90  317
       after  drop 1e6    529   377     905   668   322     102       2.08   905       2.81  291
       before keep 1e6    529   905     934  1206   322     102       3.75  1206       3.75  301
       after  keep 1e6    529   905     905  1141   322     102       3.54  1141       3.54  236
       after  drop 1e5    533   387     937   847   322     102       2.63   937       2.91  460
       before drop 1e5    533   407    1044   832   322     102       2.58  1044       3.24  426
       after  keep 1e5    533   915     937  1303   322     102       4.05  1303       4.05  388
       before keep 1e5    533   935    1050  1340   322     102       4.16  1340       4.16  406
       after  drop 1e6    529   377     905   614   322     102       1.91   905       2.81  236
       before drop 1e6    529   377     934   663   322     102       2.06   934       2.90  285
       after  keep 1e6    529   905     905  1245   322     102       3.87  1245       3.87  340
       before keep 1e6    529   905     934  1135   322     102       3.52  1135       3.52  230

       proc/state, median (range)      drop 1e5          drop 1e6          keep 1e5          keep 1e6
       of the two runs:   before   3.25 (3.24-3.26)  2.90 (2.90-2.90)  4.17 (4.16-4.19)  3.63 (3.52-3.75)
                          after    2.90 (2.90-2.91)  2.81 (2.81-2.81)  4.06 (4.05-4.07)  3.71 (3.54-3.87)

What is met, reading by reading (state 322 B per individual):
* Drop workflow (the caller drops its table once bound), the process's peak over the state: 2.90x at 10⁵ and 2.81x
  at 10⁶: the 3x goal IS met at both sizes (at 10⁵ by ~30 B per individual; the peak is now the binding's live data,
  the table and the bound model, not freed pages).  The fit's own peak is 1.9-2.6x.
* Slope, (peak(10⁶)·10⁶ − peak(10⁵)·10⁵) / 9·10⁵ over the state: drop 2.80x (901-902 B; before 2.86x), met; keep
  3.5-3.9x (1122-1239 B; before 3.45-3.7x), NOT met.
* Keep workflow (the caller holds its table through the fit), the process's peak (the fit's) over the state: 4.05-4.07x
  at 10⁵, 3.54-3.87x at 10⁶: NOT met.  Without the caller's table (its memory, not the library's): (peak − table) /
  state 2.39-2.41x at 10⁵ (770-776 B; before 2.51-2.53x) and 1.90-2.22x at 10⁶ (612-716 B; before 1.88-2.10x): met.
  The keep rows at 10⁶ spread with the fit's increment (236-340 B, run to run with glibc's default allocator, as in
  the tables above); the binding is not their peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TIMES = np.array([0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24])
TRUTH = dict(ka=1.0, V=8.0, CL=0.8, omega2_ka=0.16, omega2_V=0.09, omega2_CL=0.09, a=0.5)
START = {"ka": 2.0, "V": 15.0, "CL": 1.5}
DOSE = 100.0


# ----- data ----------------------------------------------------------------------------------------------------------
def simulate(n: int, seed: int = 0, first_id: int = 1):
    """A NONMEM table (``ID, TIME, DV, AMT, EVID, MDV``) of ``n`` individuals of the one-compartment oral model."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    log_psi = np.log([TRUTH["ka"], TRUTH["V"], TRUTH["CL"]]) + rng.normal(size=(n, 3)) * np.sqrt(
        [TRUTH["omega2_ka"], TRUTH["omega2_V"], TRUTH["omega2_CL"]])
    ka, v, cl = np.exp(log_psi).T[..., None]
    k = cl / v
    conc = DOSE * ka / (v * (ka - k)) * (np.exp(-k * TIMES) - np.exp(-ka * TIMES))
    dv = conc + TRUTH["a"] * rng.normal(size=conc.shape)
    t_obs = len(TIMES)
    evid = np.tile(np.r_[1, np.zeros(t_obs, dtype=int)], n)
    return pd.DataFrame({"ID": np.repeat(np.arange(first_id, first_id + n), t_obs + 1),
                         "TIME": np.concatenate([np.zeros((n, 1)), np.broadcast_to(TIMES, (n, t_obs))], 1).ravel(),
                         "DV": np.concatenate([np.full((n, 1), np.nan), dv], 1).ravel(),
                         "AMT": np.where(evid == 1, DOSE, 0.0), "EVID": evid, "MDV": evid})


def _model(df, backend: str = "torch"):
    from latentfit.models import nlme

    return nlme.NLME("one_compartment_oral", dict(START), data=df, backend=backend)


# ----- memory --------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_mib() -> float:
    """Peak resident memory since the process started or the last :func:`reset_peak` (``VmHWM``)."""
    return _status_kib("VmHWM") / 1024


def release_freed() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS counts live data."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0: ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _storage(x) -> tuple[int, int]:
    """``(address, bytes)`` of the memory behind an array: a torch tensor's storage, a numpy array's base (views and
    arrays sharing memory count once; a row broadcast N times counts its one row)."""
    if hasattr(x, "untyped_storage"):
        st = x.untyped_storage()
        return st.data_ptr(), st.nbytes()
    if isinstance(x, np.ndarray):
        while isinstance(x.base, np.ndarray):
            x = x.base
        return x.__array_interface__["data"][0], x.nbytes
    return id(x), int(np.prod(x.shape)) * np.dtype(str(x.dtype)).itemsize


def per_unit_bytes(model, state, n: int, seen: set[int] | None = None) -> int:
    """Bytes of the arrays with one row per individual: the model's (and its design's) and the engine state's, each
    memory block once (``seen``: the blocks already counted, updated)."""
    seen = set() if seen is None else seen
    total = 0

    def add(x, axis_ok) -> None:
        nonlocal total
        shape = tuple(getattr(x, "shape", ()))
        if not hasattr(x, "dtype") or not shape or not axis_ok(shape):
            return
        address, nbytes = _storage(x)
        if address in seen:
            return
        seen.add(address)
        total += nbytes

    def walk(obj, axis_ok, depth=0) -> None:
        if depth > 2:
            return
        items = obj.items() if isinstance(obj, dict) else obj._asdict().items() if hasattr(obj, "_asdict") \
            else vars(obj).items() if hasattr(obj, "__dict__") else ()  # a dict, an engine state record, an object
        for _, v in items:
            if isinstance(v, dict) or hasattr(v, "_asdict"):
                walk(v, axis_ok, depth + 1)
            else:
                add(v, axis_ok)

    walk(model, lambda s: s[0] == n)
    walk(model.design, lambda s: s[0] == n)
    walk(state, lambda s: n in s[:2])
    return total


#: iterations per chunk of the timed fits of parts 1-2 (the clocks below read the time at each chunk's end)
CHUNK = 5


class _ChunkClock:
    """An engine callback reading the process's CPU time (``time.process_time``: every thread of the process) and the
    wall clock when each chunk of iterations ends; per iteration: the median over the chunks after the first, so that
    neither the set-up nor a chunk that compiled (JAX: the first chunk of each phase) counts."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float, float]] = []

    def __call__(self, k: int, record: dict) -> None:
        if k % CHUNK == 0:
            self.marks.append((k, time.process_time(), time.perf_counter()))

    def _per_iter(self, col: int) -> float:
        steps = [(b[col] - a[col]) / (b[0] - a[0]) for a, b in zip(self.marks, self.marks[1:])]
        return float(np.median(steps)) if steps else float("nan")

    def cpu_per_iter(self) -> float:
        return self._per_iter(1)

    def wall_per_iter(self) -> float:
        return self._per_iter(2)


# ----- 1. torch.distributed ------------------------------------------------------------------------------------------
def _torch_worker(rank: int, world: int, workdir: str, num_iters: tuple[int, int]) -> None:
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{workdir}/init-{world}", rank=rank, world_size=world)
    try:
        from latentfit.inference.saem import SAEM

        df = pd.read_pickle(Path(workdir) / f"block{rank}of{world}.pkl")
        model = _model(df)
        del df
        release_freed()
        clock = _ChunkClock()
        engine = SAEM(model, num_iters, seed=0, progress=False, rng="per_unit", burn_in=min(5, num_iters[0] // 2),
                      chunk_size=CHUNK, callback=clock)
        fit = engine.run(distributed=distributed)
        out = {"seconds_per_iter": (fit.elapsed - fit.init_time) / fit.num_iterations, "peak_mib": peak_mib(),
               "cpu_per_iter": clock.cpu_per_iter(), "wall_per_iter": clock.wall_per_iter(),
               "num_units": int(model.num_units),
               "params": {k: np.asarray(v, dtype=float).tolist() for k, v in fit.params.items()}}
        (Path(workdir) / f"result{rank}of{world}.json").write_text(json.dumps(out))
    finally:
        if distributed:
            dist.destroy_process_group()


def torch_processes(n: int, processes: list[int], num_iters: tuple[int, int]) -> list[dict]:
    import torch.multiprocessing as mp

    df = simulate(n)
    ids = df["ID"].to_numpy()
    rows = []
    with tempfile.TemporaryDirectory(prefix="latentfit-scale-") as workdir:
        for world in processes:
            for rank, block in enumerate(np.array_split(np.arange(1, n + 1), world)):
                df[(ids >= block[0]) & (ids <= block[-1])].to_pickle(Path(workdir) / f"block{rank}of{world}.pkl")
            t0 = time.perf_counter()
            mp.spawn(_torch_worker, args=(world, workdir, num_iters), nprocs=world, join=True)
            wall = time.perf_counter() - t0
            results = [json.loads((Path(workdir) / f"result{r}of{world}.json").read_text()) for r in range(world)]
            rows.append({"n": n, "processes": world, "wall_s": wall, "load": os.getloadavg()[0],
                         "ms_per_iter": 1000 * max(r["seconds_per_iter"] for r in results),
                         "median_wall_ms": 1000 * max(r["wall_per_iter"] for r in results),
                         "cpu_ms_per_proc": 1000 * max(r["cpu_per_iter"] for r in results),
                         "cpu_ms_total": 1000 * sum(r["cpu_per_iter"] for r in results),
                         "peak_mib": max(r["peak_mib"] for r in results),
                         "units_per_process": [r["num_units"] for r in results], "params": results[0]["params"],
                         "params_agree": all(r["params"] == results[0]["params"] for r in results)})
    return rows


# ----- 2. JAX devices ------------------------------------------------------------------------------------------------
def _jax_child(n: int, devices: list[int], num_iters: tuple[int, int]) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    from latentfit.inference.saem import SAEM

    model = _model(simulate(n), backend="jax")
    gc.collect()
    rows = []
    for d in devices:
        reset_peak()
        clock = _ChunkClock()
        engine = SAEM(model, num_iters, seed=0, progress=False, rng="per_unit", burn_in=min(5, num_iters[0] // 2),
                      chunk_size=CHUNK, callback=clock)
        fit = engine.run(devices=d)
        iters = (fit.elapsed - fit.init_time - fit.compile_time) / fit.num_iterations
        rows.append({"n": n, "devices": d, "ms_per_iter": 1000 * iters, "compile_s": fit.compile_time,
                     "cpu_ms_per_iter": 1000 * clock.cpu_per_iter(), "wall_ms_per_iter": 1000 * clock.wall_per_iter(),
                     "peak_mib": peak_mib(), "load": os.getloadavg()[0],
                     "params": {k: np.asarray(v, dtype=float).tolist() for k, v in fit.params.items()}})
    print("RESULT" + json.dumps(rows))


def jax_devices(n: int, devices: list[int], num_iters: tuple[int, int]) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={max(devices)}", JAX_PLATFORMS="cpu")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import scale; "
            f"scale._jax_child({n}, {devices!r}, {tuple(num_iters)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])


# ----- 4. JAX processes: the whole data on every process vs each process its block -------------------------------
def _jax_process_child(rank: int, world: int, port: int, workdir: str, mode: str, num_iters: tuple[int, int]) -> None:
    import jax
    import pandas as pd

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=world, process_id=rank)
    from latentfit.models import nlme

    release_freed()
    rss0 = rss_mib()
    reset_peak()
    name = {"whole": "whole.pkl", "local": f"block{rank}of{world}.pkl", "uneq": f"uneq{rank}of{world}.pkl"}[mode]
    df = pd.read_pickle(Path(workdir) / name)
    rows = len(df)
    model = nlme.NLME("one_compartment_oral", dict(START), backend="jax").bind(df)
    del df  # the model keeps the table by reference
    bind_peak = peak_mib()
    release_freed()
    rss1 = rss_mib()
    reset_peak()
    fit = model.fit(seed=0, progress=False, num_iters=num_iters, burn_in=min(5, num_iters[0] // 2),
                    distributed=True if mode == "whole" else "local")
    iters = (fit.elapsed - fit.init_time - fit.compile_time) / fit.num_iterations
    print("RESULT" + json.dumps({"rank": rank, "rss0_mib": rss0, "bind_peak_mib": bind_peak, "rss1_mib": rss1,
                                 "peak_mib": peak_mib(), "ms_per_iter": 1000 * iters, "compile_s": fit.compile_time,
                                 "rows": rows,
                                 "params": {k: np.asarray(v, dtype=float).tolist() for k, v in fit.params.items()}}),
          flush=True)


def jax_processes(n: int, num_iters: tuple[int, int], world: int = 2,
                  modes: tuple[str, ...] = ("whole", "local")) -> dict[str, list[dict]]:
    """Part 4: ``NLME(backend="jax").fit(..., distributed=...)`` over ``world`` processes (one CPU device each,
    collectives over gloo): every process reading the whole table (``distributed=True``) or only its block of the
    individuals (``distributed="local"``; ``"uneq"``: blocks of unequal size, process r holding a share ∝ r + 1 of the
    individuals, padded to the largest with dummy individuals); per process its resident memory after the imports and
    its peak."""
    import socket

    df = simulate(n)
    ids = df["ID"].to_numpy()
    out = {}
    with tempfile.TemporaryDirectory(prefix="latentfit-scale-") as workdir:
        df.to_pickle(Path(workdir) / "whole.pkl")
        for rank, block in enumerate(np.array_split(np.arange(1, n + 1), world)):
            df[(ids >= block[0]) & (ids <= block[-1])].to_pickle(Path(workdir) / f"block{rank}of{world}.pkl")
        cuts = np.cumsum(np.arange(1, world + 1)) * n // (world * (world + 1) // 2)
        for rank, (lo, hi) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            df[(ids > lo) & (ids <= hi)].to_pickle(Path(workdir) / f"uneq{rank}of{world}.pkl")
        del df, ids
        env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
        env.pop("XLA_FLAGS", None)
        for mode in modes:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import scale; "
                    "scale._jax_process_child(int(sys.argv[1]), {world}, {port}, {workdir!r}, {mode!r}, "
                    "{num_iters!r})").format(world=world, port=port, workdir=workdir, mode=mode,
                                             num_iters=tuple(num_iters))
            procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env) for r in range(world)]
            rows = []
            for p in procs:
                stdout, stderr = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(stderr[-3000:])
                rows.append(json.loads(next(ln for ln in stdout.splitlines()
                                            if ln.startswith("RESULT"))[len("RESULT"):]))
            out[mode] = rows
    return out


# ----- 3. memory per unit --------------------------------------------------------------------------------------------
def _memory_child(n: int, keep_table: bool = True) -> None:
    """Part 3 in this process: ``keep_table``: the caller keeps its DataFrame through the fit (else it drops it once
    the model is bound, as ``model.fit(read_nonmem(path))`` does)."""
    import torch

    torch.set_num_threads(1)
    import latentfit
    from latentfit.inference.saem import SAEM

    # a fit of 50 individuals first: the imports and first calls it triggers are not per-unit memory
    SAEM(_model(simulate(50)), (3, 0), burn_in=1, seed=0, progress=False, num_draws=1).run()
    release_freed()
    rss0 = rss_mib()
    t0 = time.perf_counter()
    df = simulate(n)
    release_freed()
    rss_table = rss_mib()
    reset_peak()
    model = _model(df)
    kept = df if keep_table else None
    del df
    bind_peak = peak_mib()
    release_freed()
    bind_s = time.perf_counter() - t0
    rss1 = rss_mib()
    reset_peak()
    engine = SAEM(model, (3, 0), burn_in=1, seed=0, progress=False, num_draws=1)
    fit = engine.run()
    peak = peak_mib()
    seen: set[int] = set()
    need = per_unit_bytes(model, fit.state, n, seen)
    copies = sum(nbytes for address, nbytes in {_storage(v) for v in vars(model.data).values()
                                               if isinstance(v, np.ndarray)} if address not in seen)
    stored = getattr(model, "_table", None)  # the model's compact table (StoredTable), or, before it, the caller's
    copies += int(stored.nbytes) if stored is not None else int(model.table.memory_usage(deep=True).sum())
    del kept
    print("RESULT" + json.dumps({"n": n, "rss0_mib": rss0, "rss_table_mib": rss_table, "bind_peak_mib": bind_peak,
                                 "rss1_mib": rss1, "peak_mib": peak, "need_bytes": need, "copies_bytes": copies,
                                 "bind_s": bind_s, "ms_per_iter": 1000 * (fit.elapsed - fit.init_time) / 3,
                                 "chains": int(engine.num_chains), "keep_table": keep_table,
                                 "library": os.path.dirname(os.path.dirname(latentfit.__file__))}))


def memory(n: int, mmap_threshold: int | None = None, keep_table: bool = True, library: str | None = None) -> dict:
    """Part 3 for ``n`` individuals in a fresh process; ``mmap_threshold``: glibc's ``MALLOC_MMAP_THRESHOLD_`` for
    it (blocks above it are mapped and handed back when freed, so freed temporaries stop holding heap pages);
    ``keep_table``: the caller keeps its table through the fit; ``library``: a checkout whose ``latentfit`` the
    process imports (default: this one's)."""
    first = f"sys.path.insert(0, {os.path.abspath(library)!r}); " if library else ""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import scale; {first}"
            f"scale._memory_child({n}, {bool(keep_table)})")
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    out["load"] = os.getloadavg()[0]
    return out


# ----- report --------------------------------------------------------------------------------------------------------
def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={float(np.ravel(v)[0]):.4g}" for k, v in params.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (N = 2000 and 8000; memory at 2e4 and 1e5)")
    ap.add_argument("--sizes", default=None, help="populations for the process/device tables (default 5000,100000)")
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--devices", default="1,2,4")
    ap.add_argument("--memory-sizes", default=None, help="populations for the memory table (default 100000,1000000)")
    ap.add_argument("--iters", default="10,5", help="SAEM iterations K1,K2 of the timed fits")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="part 3 with glibc's MALLOC_MMAP_THRESHOLD_ set to this many bytes (e.g. 1048576)")
    ap.add_argument("--memory-modes", default="keep,drop",
                    help="part 3: keep (the caller keeps its table through the fit), drop (it drops it once bound)")
    ap.add_argument("--memory-before", default=None,
                    help="part 3: a checkout (the directory holding latentfit/) measured as 'before', alternated with "
                         "this one in fresh processes")
    ap.add_argument("--memory-repeats", type=int, default=1, help="part 3: runs of each row (alternated)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: torch,jax,jaxproc,memory")
    ap.add_argument("--jax-process-sizes", default=None,
                    help="populations for part 4, JAX processes whole vs local (default 20000; --quick 4000)")
    ap.add_argument("--jax-processes", type=int, default=2, help="processes of part 4")
    ap.add_argument("--jax-modes", default="whole,local",
                    help="part 4's modes: whole, local (equal blocks), uneq (blocks of unequal size, padded)")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("2000,8000" if args.quick else "5000,100000")).split(",")]
    mem_sizes = [int(s) for s in (args.memory_sizes or ("20000,100000" if args.quick else "100000,1000000")).split(",")]
    jax_proc_sizes = [int(s) for s in (args.jax_process_sizes or ("4000" if args.quick else "20000")).split(",")]
    processes = [int(p) for p in args.processes.split(",")]
    devices = [int(d) for d in args.devices.split(",")]
    num_iters = tuple(int(k) for k in args.iters.split(","))
    skip = set(filter(None, args.skip.split(",")))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; SAEM {num_iters} iterations, "
          "rng='per_unit', float64")
    if "torch" not in skip:
        print("\n1. torch.distributed (gloo, one machine; one thread per process)")
        print(f"{'N':>8}{'processes':>10}{'units/proc':>12}{'ms/iter':>10}{'med ms':>8}{'CPU ms/proc':>12}"
              f"{'CPU ms all':>11}{'peak MiB/proc':>15}{'max |Δθ| vs 1':>16}{'load':>6}")
        for n in sizes:
            rows = torch_processes(n, processes, num_iters)
            base = next(r for r in rows if r["processes"] == 1)["params"] if 1 in processes else rows[0]["params"]
            for r in rows:
                agree = "" if r["params_agree"] else "  (processes disagree!)"
                print(f"{n:>8}{r['processes']:>10}{max(r['units_per_process']):>12}{r['ms_per_iter']:>10.1f}"
                      f"{r['median_wall_ms']:>8.1f}{r['cpu_ms_per_proc']:>12.1f}{r['cpu_ms_total']:>11.1f}"
                      f"{r['peak_mib']:>15.0f}{_max_diff(r['params'], base):>16.1e}{r['load']:>6.1f}{agree}")
            print(f"{'':>8}estimates (1 process): {_fmt(base)}")
    if "jax" not in skip:
        print("\n2. JAX host devices (one process, XLA_FLAGS=--xla_force_host_platform_device_count; chains split, "
              "data replicated)")
        print(f"{'N':>8}{'devices':>10}{'ms/iter':>10}{'med ms':>8}{'CPU ms':>8}{'compile s':>11}{'peak MiB':>10}"
              f"{'max |Δθ| vs 1':>16}{'load':>6}")
        for n in sizes:
            rows = jax_devices(n, devices, num_iters)
            base = rows[0]["params"]
            for r in rows:
                print(f"{n:>8}{r['devices']:>10}{r['ms_per_iter']:>10.1f}{r['wall_ms_per_iter']:>8.1f}"
                      f"{r['cpu_ms_per_iter']:>8.1f}{r['compile_s']:>11.1f}{r['peak_mib']:>10.0f}"
                      f"{_max_diff(r['params'], base):>16.1e}{r['load']:>6.1f}")
        print("(ms/iter: the fit's wall time per iteration, set-up (and JAX compilation) excluded; med ms and CPU ms: "
              f"the median over chunks of {CHUNK} iterations after the first of the wall and CPU time per iteration "
              "(CPU: time.process_time, every thread of the process; torch: CPU ms/proc the slowest process, CPU ms "
              "all the sum over the processes); load: the 1-minute load average after the run.  With more processes "
              "or devices than free cores the runs are oversubscribed: the times then measure contention, not "
              "scaling)")
    if "jaxproc" not in skip:
        print(f"\n4. JAX processes (jax.distributed, {args.jax_processes} processes x 1 CPU device, gloo): every "
              "process reading the whole table (distributed=True) or only its block (distributed='local')")
        print(f"{'N':>8}{'mode':>7}{'rows/proc':>10}{'RSS0 MiB':>9}{'data':>7}{'bind pk':>8}{'fit pk':>8}"
              f"{'peak MiB/proc':>14}{'ms/iter':>9}{'compile s':>10}{'max |Δθ| vs whole':>19}")
        for n in jax_proc_sizes:
            res = jax_processes(n, num_iters, args.jax_processes, tuple(args.jax_modes.split(",")))
            base = res["whole"][0]["params"]
            for mode, rows in res.items():
                top = lambda key, rows=rows: max(r[key] - r["rss0_mib"] for r in rows)  # noqa: E731
                diff = max(_max_diff(r["params"], base) for r in rows)
                print(f"{n:>8}{mode:>7}{max(r['rows'] for r in rows):>10}{max(r['rss0_mib'] for r in rows):>9.0f}"
                      f"{top('rss1_mib'):>7.0f}{top('bind_peak_mib'):>8.0f}{top('peak_mib'):>8.0f}"
                      f"{max(max(r['peak_mib'], r['bind_peak_mib']) for r in rows):>14.0f}"
                      f"{max(r['ms_per_iter'] for r in rows):>9.1f}{max(r['compile_s'] for r in rows):>10.1f}"
                      f"{diff:>19.1e}")
        print("(MiB, the largest over the processes.  RSS0: a process's resident memory after the imports and "
              "jax.distributed.initialize; data: what reading the table and binding it left resident; bind pk: the "
              "peak while reading and binding; fit pk: the peak during the fit (VmHWM reset after binding; compilation "
              "included); all three over RSS0; peak MiB/proc: the process's peak)")
    if "memory" not in skip:
        modes = [m.strip() for m in args.memory_modes.split(",")]
        runs = [("before", args.memory_before), ("after", None)] if args.memory_before else [("", None)]
        print("\n3. memory per individual, one process (torch, SAEM (3, 0) iterations, saemix default chains"
              + (f"; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold})" if args.mmap_threshold else ")")
              + (f"; before: the library in {args.memory_before}, after: this checkout's, alternated in fresh "
                 "processes" if args.memory_before else ""))
        print(f"{'':>7}{'table':>6}{'N':>9}{'RSS0 MiB':>9}{'table':>6}{'data':>6}{'bind pk':>8}{'peak':>6}{'state':>6}"
              f"{'+copies':>8}{'peak/state':>11}{'proc':>6}{'proc/state':>11}{'fit':>5}{'ms/iter':>9}{'load':>6}"
              "   (B/unit)")
        results: dict[tuple[str, str, int], list[float]] = {}
        for rep in range(args.memory_repeats):
            for n in mem_sizes:
                for mode in modes:
                    for label, library in (runs if rep % 2 == 0 else runs[::-1]):
                        r = memory(n, args.mmap_threshold, keep_table=mode == "keep", library=library)
                        per = lambda mib, n=n: mib * 2 ** 20 / n  # noqa: E731
                        table = per(r["rss_table_mib"] - r["rss0_mib"])
                        data = per(r["rss1_mib"] - r["rss0_mib"])
                        bind_peak = per(r["bind_peak_mib"] - r["rss0_mib"])
                        peak = per(r["peak_mib"] - r["rss0_mib"])
                        state = r["need_bytes"] / n
                        proc = max(peak, bind_peak)
                        fit_only = per(r["peak_mib"] - r["rss1_mib"])
                        results.setdefault((label, mode, n), []).append(proc / state)
                        print(f"{label:>7}{mode:>6}{n:>9}{r['rss0_mib']:>9.0f}{table:>6.0f}{data:>6.0f}"
                              f"{bind_peak:>8.0f}{peak:>6.0f}{state:>6.0f}{r['copies_bytes'] / n:>8.0f}"
                              f"{peak / state:>11.2f}{proc:>6.0f}{proc / state:>11.2f}{fit_only:>5.0f}"
                              f"{r['ms_per_iter']:>9.0f}{r['load']:>6.1f}", flush=True)
        print("(table keep: the caller keeps its DataFrame through the fit; drop: it drops it once the model is bound. "
              "RSS0: after imports and a 50-individual fit; table: the simulated table (the caller's DataFrame); "
              "data: resident memory added by the table and the binding (freed pages handed back; with drop, after the "
              "caller dropped its table); bind pk: the peak while binding; peak: the peak during the fit; all over "
              "RSS0; state: the arrays with one row per individual the fit uses (model tensors + chains; each memory "
              "block once); +copies: what the bound model also keeps (its NLMEData arrays not shared with the state, "
              "and its table: the caller's DataFrame before, the compact StoredTable after); peak/state: the fit's "
              "peak over the state; proc: the process's peak (the binding's or the fit's, whichever is higher); fit: "
              "the peak during the fit over the bound data's RSS; load: the 1-minute load average after the run)")
        print(f"{'':>7}{'table':>6}{'N':>9}   proc/state: median (range) over {args.memory_repeats} run(s)")
        for (label, mode, n), vals in results.items():
            print(f"{label:>7}{mode:>6}{n:>9}   {np.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
