"""The shared engine driver: one loop for every engine.

An engine is a pair ``init(key) -> state`` / ``step(state, k, phase) -> (state, info)``, as in blackjax: the state
is a ``NamedTuple`` of backend arrays (what the next step needs, the random stream included: a JAX key or a
``torch.Generator``), the info a ``NamedTuple`` of what a user may look at (its non-``None`` fields become the
history), and ``step`` is pure (it changes neither its inputs nor the engine).  ``phase`` is a static value
(e.g. whether f-SAEM's Laplace proposal runs); iterations are grouped into phases so that a JAX
backend compiles one function per phase and runs chunks of iterations under ``lax.scan``,
while torch runs the same ``step`` eagerly.  The driver alone owns the loop, the progress bar, the history of θ
and of the objective, the collection of the last latent draws, callbacks, the key of the run (``run(key)``: a
key, a generator or an int seed; default the engine's ``seed``), and
checkpoints (``run(checkpoint=dir)``, ``run(resume=dir)``: :mod:`latentfit.checkpoint`).

Callbacks: ``Engine(model, callback=f)`` calls ``f(k, record)`` after every iteration ``k`` (1-based; an epoch in the
EM family), ``record`` that iteration's row of the history (``theta.<name>``, ``objective``, ...), in order, after the
iterations' chunk (``chunk_size`` iterations) has run. ``f`` stops the fit early by returning ``True`` or raising
``StopIteration``: the result is an ordinary one (``interrupted`` False) holding the first ``k`` iterations
(``num_iterations == k``, a history of ``k`` rows, θ after iteration ``k``): the chunk's iterations past ``k`` are
dropped and those up to ``k`` run again from the chunk's start (they are deterministic given the state and its stream:
the same values), and the checkpoint, if any, is written at ``k``. Any other return value goes on. In a distributed
fit every process runs the callback and must decide alike (a stop on one process alone leaves the others waiting).

Faults: proposals with a NaN/inf log-density are rejected by the kernels and counted (info ``num_nonfinite``,
summed in a warning at the end); a NaN/inf parameter or gradient stops the fit with :class:`NonFiniteError`
and a checkpoint of the last good state; ``KeyboardInterrupt`` returns that state as a result marked
``interrupted``.  The last good state is the one at the end of the last completed chunk.
"""

from __future__ import annotations

import difflib
import inspect
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._hooks import user_stacklevel
from .model import ConvergenceWarning, DegenerateFitError, LatentModel, NonFiniteError
from .results import FitResult

Callback = Callable[[int, dict[str, Any]], Any]
#: keyword options of :meth:`Engine.run` besides the key


class Engine:
    """Base class of every engine (SAEM, EM, FIEM, ...).

    Subclasses implement :meth:`init`, :meth:`step` and :meth:`phases`; :meth:`run` is shared.
    """

    #: name shown in progress bars and results
    name: str = "engine"
    #: the model class the engine trains (a :class:`LatentModel`; the VFG engine trains its own problem record)
    model_type: type = LatentModel
    #: the record :meth:`run` returns (a :class:`FitResult`, or a documented subclass)
    result_type: type = FitResult
    #: whether ``run(distributed="local")`` works on JAX (each process its block; the engine's distributed form
    #: compiled over the processes): SAEM, f-SAEM, MCMCSGD and the EM family with MISSO (their mini-batches of one
    #: static size on every process, the other processes' units weighing 0; the Monte-Carlo ones with
    #: ``rng="per_unit"``).
    jax_local_blocks: bool = False
    #: whether :meth:`step` never writes into the state it is given (it copies the generator it draws from and writes
    #: fresh arrays; tests/test_torch_streams.py::test_step_is_pure): the driver then keeps the last good state by
    #: reference on torch too, instead of a host copy of its per-unit arrays (the chains kept twice)
    pure_step: bool = False

    def __init__(self, model: LatentModel, *, seed: int = 0, progress: bool = True,
                 callback: Callback | None = None, num_draws: int = 100, chunk_size: int = 25) -> None:
        if not isinstance(model, self.model_type):
            raise TypeError(f"{type(self).__name__} expects a {self.model_type.__name__}, got {type(model).__name__}")
        self.model = model
        self.ops = model.ops
        self.seed = int(seed)
        self.progress = progress
        self.callback = callback
        self.num_draws = int(num_draws)
        self.chunk_size = int(chunk_size)

    #: attributes no trace reads, left out of :meth:`__trace_fingerprint__`: the seed (it enters a run as its key, an
    #: argument of the programs), the progress bar and the callback (the host's, between chunks) and the last run's θ
    #: record (:meth:`_record_theta`)
    _UNTRACED = frozenset({"seed", "progress", "callback", "_recorded_theta"})

    def __trace_fingerprint__(self) -> dict[str, Any]:
        """What a trace through this engine reads (:mod:`~latentfit.inference.ops_jax_memo`): its options and model,
        not :data:`_UNTRACED`.  A fit with another seed, bar or callback is then served by the programs of an earlier
        one, in the process and from the persistent cache, instead of tracing and compiling them again (theophylline
        on JAX, cache warm for seed 0: seed 1 took 2.8 s, two programs compiled; now ~0.15 s)."""
        return {k: v for k, v in vars(self).items() if k not in self._UNTRACED}

    # ----- to implement ------------------------------------------------------------------------
    def init(self, key: Any) -> Any:
        """The state before iteration 1 (a ``NamedTuple``), drawn from ``key``."""
        raise NotImplementedError

    def step(self, state: Any, k: Any, phase: Any) -> tuple[Any, Any]:
        """Iteration ``k`` (1-based) in ``phase``: ``(next state, info record)``, a pure function of its arguments
        (no change to ``self``, the model or ``state``'s random stream: a torch generator is copied first)."""
        raise NotImplementedError

    def phases(self) -> list[tuple[int, int, Any]]:
        """Iteration ranges ``[(first, last, phase), ...]``, 1-based and inclusive."""
        raise NotImplementedError

    def distribute(self) -> None:
        """Switch this engine to a data-parallel fit over the current torch.distributed process group."""
        raise ValueError(f"{self.name} does not support distributed=True yet (SAEM, f-SAEM, MCMCSGD, the exact engines "
                         "of the EM family and MCEM / MiniBatchMCEM / TTSEM / MISSO do)")

    def jax_local_masks(self) -> bool | str:
        """Whether a ``distributed="local"`` JAX fit weighs its units even with blocks of equal size (mini-batches of
        one static size on every process, other processes' units weighing 0: :mod:`~latentfit.inference.padding`);
        ``"spare"``: and every block gets one more dummy unit, which a batch's entries of other processes name."""
        return False

    def unit_axes(self) -> dict[str, int]:
        """The state entries that hold one row per unit, and their unit axis (sharded by ``run(devices=...)``)."""
        return {}

    def latent_draw(self, state: Any) -> Any | None:
        """Current latent draws ``[L, N, d]`` to keep at the end of the run (None: no latents)."""
        return state_field(state, "z")

    def finalize(self, state: dict[str, Any]) -> dict[str, Any]:
        """Hook run once after the loop (e.g. a last exact E-step); warns with the model's ``fit_warnings``."""
        for msg in self.model.fit_warnings(self.theta_of(state)):
            warnings.warn(f"{self.name}: {msg}", RuntimeWarning, stacklevel=user_stacklevel())
        return state

    def convergence_warnings(self, history: dict[str, list]) -> list[str]:
        """Signs, read from the whole run's history, that the fit stopped before it converged (one message each;
        none by default)."""
        return []

    @property
    def result_model(self) -> LatentModel:
        """The model the fit's result holds (post-fit computations); the steps' model by default."""
        return self.model

    def theta_of(self, state: Any) -> dict[str, Any]:
        """θ (constrained) of ``state``; on a backend that compiles, one compiled ``model.constrain`` per model
        (:meth:`~latentfit.inference.ops.Ops.jit_once`: in a warm fresh process a stored executable, where eager
        transforms lowered a program, ~0.03 s), inlined inside a trace; the names in ``θ_u``'s order."""
        model, theta_u = self.model, state_field(state, "theta_u")
        recorded = getattr(self, "_recorded_theta", None)
        if recorded is not None and recorded[0] is state:  # the run's final state: its θ, as the history recorded it
            if recorded[2] is None:
                self._recorded_theta = recorded = (state, recorded[1], self.ops.placed_like(recorded[1], theta_u))
            theta = recorded[2]
        else:
            theta = self.ops.jit_once(("constrain", id(model)), lambda: model.constrain)(theta_u)
        return {**{k: theta[k] for k in theta_u if k in theta}, **theta}  # a compiled dict: keys sorted; θ_u's order

    def _record_theta(self, state: Any, stacked: dict[str, Any]) -> None:
        """Keep ``state``'s θ from the last row of its chunk's stacked records (``history_theta``, computed by the
        chunk's program), where the engine records θ itself (:meth:`theta_of`), so that :meth:`theta_of` of the
        run's final state (the fit's ``params``, its post-fit computations) reads it instead of calling the
        constraint's compiled program: in a fresh process that program is one more to key and load (~3-5 ms).
        Only on a compiling backend (on torch the constraint is a few eager operations)."""
        theta = stacked.get("theta")
        cls = type(self)
        if not isinstance(theta, dict) or cls.theta_of is not Engine.theta_of \
                or cls.history_theta is not Engine.history_theta:
            self._recorded_theta = None
            return
        self._recorded_theta = (state, {k: np.asarray(v[-1, ...]) for k, v in theta.items()}, None)

    def history_theta(self, state: Any) -> dict[str, Any] | None:
        """The parameters recorded in the history after each iteration (``theta.<name>``) and checked for NaN/inf:
        θ by default; None records none (an engine whose parameters are network weights keeps its own checks)."""
        return self.theta_of(state)

    def settled_from(self) -> int:
        """First iteration whose latent draws target p(z | y; θ̂) (approximately): post-fit estimates that average
        the kept draws at θ̂ (Louis' information) use the draws from this iteration on.  All kept draws by default."""
        return 1

    def stopped(self, state: Any) -> bool:
        """Whether the run ends early after a chunk ending in ``state`` (e.g. early stopping on a validation
        loss); checked after every chunk, and on resume."""
        return False

    # ----- the shared loop ---------------------------------------------------------------------
    @property
    def num_iterations(self) -> int:
        return max(last for _, last, _ in self.phases())

    def problem_elements(self) -> int:
        """About how many entries the iterations' arrays hold: the model's observations (else its units' latent
        coordinates) times the chains (:meth:`Ops.iteration_threads`)."""
        model = self.model
        size = getattr(model, "num_obs", None)
        if size is None:
            observed = getattr(model, "observed", None)
            if isinstance(observed, dict) and observed:
                size = sum(int(np.size(v)) for v in observed.values())
        if size is None:
            size = int(getattr(model, "num_units", 1)) * int(getattr(model, "latent_dim", 1) or 1)
        return int(size) * max(1, int(getattr(self, "num_chains", 1) or 1))

    def run(self, *args: Any, **kwargs: Any) -> FitResult:
        """:meth:`_run` (the options below) under the backend's thread setting for the problem's size
        (:meth:`Ops.iteration_threads`: one intra-op torch thread for a small CPU fit)."""
        with self.ops.iteration_threads(self.problem_elements()):
            return self._run(*args, **kwargs)

    def _run(self, key: Any = None, *, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, keep: int = 3,
            resume: str | os.PathLike | bool | None = None, devices: Any = None,
            distributed: bool = False) -> FitResult:
        """Run the engine from ``key``: the backend's key (a JAX PRNG key, a ``torch.Generator`` on the data's device,
        copied, never advanced), or an int seed; default ``ops.key(seed)``.  Ignored when resuming (the checkpoint
        holds the stream).  Neither torch's nor Pyro's global RNG is read or changed by a fit.

        ``checkpoint``: a directory where, after every multiple of ``checkpoint_every`` iterations (default
        ``chunk_size``; the chunks are cut there) and at the end of the run, the state, history, draws and RNG are
        written (:mod:`latentfit.checkpoint`), keeping the last ``keep``.  ``resume``: a directory (its
        latest checkpoint) or a checkpoint file to continue from, on an engine built with the same model, data and
        options (a checkpoint records the data's SHA-256, :func:`~latentfit.checkpoint.data_digest`: one written for
        other data of the same shapes is refused); ``True`` continues from ``checkpoint`` if it holds one, else
        starts afresh.  A resumed run equals the uninterrupted one bit for bit (history and parameters).

        ``devices`` (JAX): shard the units over a device mesh — a number of devices, a list of devices or a
        ``jax.sharding.Mesh`` with an axis ``"units"`` (:meth:`~latentfit.inference.ops_jax.JaxOps.shard_units`):
        the per-unit state (:meth:`unit_axes`) is split, the rest replicated, and sums over units become
        all-reduces.  The estimates equal the one-device fit's up to the order of those sums (1e-10 in float64).

        ``distributed=True`` on JAX (after ``jax.distributed.initialize``; every process passes the same whole data and
        key): the units are sharded over the devices of every process (:meth:`~latentfit.inference.ops_jax.JaxOps.
        process_mesh`, process r holding the r-th block) as ``devices=`` does on one process, and every process ends
        with the whole final state, so the result equals the one-process fit's (1e-10 in float64).
        ``distributed="whole"`` says the same explicitly.

        ``distributed="local"`` (JAX after ``jax.distributed.initialize``, or torch as ``True``): each process passes
        only its block of the units (its units' arrays; NLME: its rows of the table), so no process holds the whole
        data.  As on torch, process r's units are the global units ``offset_r .. offset_r + n_r − 1`` with
        ``offset_r = n_0 + … + n_{r−1}`` (the counts gathered from every process), per-unit streams use those global
        indices, and the sums over units reach every process (:class:`~latentfit.inference.ops_jax_procs.
        JaxProcessOps`: XLA collectives over one device per process inside the compiled chunks); the estimates and
        history equal the one-process fit of the whole data (1e-10 in float64).  On JAX, blocks of unequal size are
        padded to the largest with dummy units of weight 0 (``model.pad_units``: NLME, ``GaussianMixture``, NumPyro
        models whose per-unit data are array arguments, and grouped NumPyro models whose rows read ``alpha[group_idx]``,
        their rows padded alike and read by a dummy group; :mod:`~latentfit.inference.padding`); every process
        passing the same data is
        refused.  The result holds this process's block of the per-unit state and draws (its real units), as a torch
        rank's does; the post-fit computations (log-likelihood, standard errors, individual estimates) reach every
        process and give the same, complete results on each, per-unit outputs in global unit order.  On JAX: SAEM,
        f-SAEM, MCMCSGD, the EM family and MISSO (:attr:`jax_local_blocks`; MCEM, MiniBatchMCEM, TTSEM and MISSO with
        ``rng="per_unit"``; mini-batches of one static size on every process, the other processes' units weighing 0:
        :meth:`jax_local_masks`).

        ``distributed=True`` (torch, inside a ``torchrun`` script with an initialised process group): this process's
        model holds its shard of the units; statistics and acceptance counts are all-reduced in float64 and every
        process runs the same M-step (:meth:`distribute`: SAEM, f-SAEM and MCMCSGD with ``rng="per_unit"``, MCMCSGD
        all-reducing its gradient, SAEM its numerical M-step's objective, gradient and Hessian; the exact engines of
        the EM family and MCEM / MiniBatchMCEM / TTSEM / MISSO with ``rng="per_unit"``, whose processes draw the same
        global mini-batches).  With ``checkpoint=`` every process (torch or JAX) writes its own shard
        (``ckpt-<k>.rank<r>-of-<world>.*``, its per-unit state, history and RNG; on JAX its block of the per-unit
        entries and the rest whole); a resume needs the same number of processes and continues from the latest
        iteration all of them saved.

        Faults: a NaN/inf parameter (M-step) or gradient raises :class:`~latentfit.NonFiniteError` naming the
        parameter and the iteration, after writing a checkpoint of the last good state (after the iteration before
        the fault: the iterations of its chunk before it are run again from the chunk's start, :meth:`_replay_good`;
        in ``checkpoint``, else in a temporary directory named in the message); ``KeyboardInterrupt`` returns the
        last good state and the
        history so far as a result with ``interrupted=True`` (checkpointed when ``checkpoint`` is given).
        """
        from latentfit.checkpoint import begin_run_digest

        over_processes = False  # one program over the devices of several JAX processes (jax.distributed)
        self._process_group = None  # their ranks, for checkpoints
        self._padding: _Padding | None = None  # a JAX local fit's block padded with dummy units
        self._recorded_theta: tuple | None = None  # (state, θ's host rows, θ placed) of the last recorded chunk
        mode = distributed_mode(distributed)
        # the digest of the data as given (before a distributed fit pads them): once per run, when checkpointing
        begin_run_digest(self, compute=checkpoint is not None or resume not in (None, False))
        if mode is not None:
            mesh = self.ops.process_mesh()
            if mesh is not None and devices is not None:
                raise ValueError(f"{self.name}: distributed={distributed!r} on JAX shards the units over the "
                                 "processes; devices= is not supported with it")
            if mesh is None or mode == "local":
                if mesh is None and distributed == "whole":
                    raise ValueError(f"{self.name}: distributed='whole' (every process passes the whole data) is a "
                                     "JAX mode; on torch each process builds its model on its own block of the units "
                                     "(distributed=True or 'local'; NLME's fit(df, distributed='whole') takes the "
                                     "whole table on both backends)")
                if mesh is not None:  # JAX, each process its block: the blocks must be of one global array
                    if not self.jax_local_blocks:
                        raise ValueError(f"{self.name}: distributed='local' on JAX (each process passes its block) "
                                         "is supported by SAEM, f-SAEM, MCMCSGD, the EM family and MISSO; pass "
                                         "every process the whole data with distributed=True, or use the torch "
                                         "backend")
                    counts = check_process_blocks(self.name, self.model, self.ops.process_group())
                    # rows outside the unit plate (alpha[group_idx]): every process's count, padded alike
                    extent = getattr(getattr(self, "user_model", self.model), "pad_extent", None)
                    extents = self.ops.process_group().gather_objects(None if extent is None else extent())
                    if len(set(counts)) > 1 or self.jax_local_masks() or any(e != extents[0] for e in extents):
                        self._pad_block(counts, extents)  # pad each block to the largest
                self.distribute()
                if self._padding is not None:
                    self._padded_distribute()
            else:
                devices, over_processes = mesh, True
                self._process_group = self.ops.process_group()
        ops = self.ops
        total = self.num_iterations
        resume_from = self._resume_source(checkpoint, resume)
        every = self.chunk_size if checkpoint_every is None else int(checkpoint_every)
        if checkpoint is not None and (every < 1 or int(keep) < 1):
            raise ValueError(f"checkpoint_every and keep must be >= 1, got {checkpoint_every} and {keep}")
        if key is None:
            key = ops.key(self.seed)
        elif isinstance(key, (int, np.integer)):
            key = ops.key(int(key))
        else:
            key = ops.own_key(key)
        collect_from = total - min(self.num_draws, total) + 1
        history: dict[str, list] = {}
        blocks: dict[str, tuple[int, list[np.ndarray]]] = {}  # compiled chunks' records, stacked (_history_arrays)
        draws: list[np.ndarray] = []
        compiled_before = ops.compile_time
        t0 = time.perf_counter()
        state = self.init(key)
        start = 0
        if resume_from is not None:
            state, history, draws, start = self._restore(resume_from, state, total)
        sharded = devices is not None
        state = ops.shard_units(state, self.unit_axes() if sharded else {}, devices,
                                data_axes=getattr(self.model, "unit_data_axes", list)() if sharded else (),
                                num_units=getattr(self.model, "num_units", None) if sharded else None)
        last_saved = start
        good = self._snapshot(state, start)  # set-up: the state, or a copy (torch, steps that write in place)
        t_init = time.perf_counter() - t0
        bar = _progress_bar(total, self.progress, self.name)
        if bar is not None and start:
            bar.update(start)
        interrupted = False
        done = start if self.stopped(state) else total  # iterations the result holds (fewer when stopped early)
        # the chunks to run, in order: each phase split so the tail (draw collection) is its own chunk, then by
        # chunk_size, less those done before the checkpoint we resumed from.  A compiled backend's chunk j + 1 is
        # dispatched before chunk j's records are read (JAX runs it meanwhile: the host's bookkeeping overlaps the
        # device's iterations); a state written in place (torch) is recorded before the next chunk starts
        # with checkpoints, chunks cut after every multiple of checkpoint_every (a checkpoint ends a chunk)
        align = every if checkpoint is not None else 0
        # a checkpoint written under another checkpoint_every (or chunk_size) may lie inside a chunk: it starts there
        bounds = [(a, b, phase) for first, last, phase in self.phases()
                  for a, b in _chunk_bounds(first, last, collect_from, self.chunk_size, align)]
        chunks = [(max(a, start + 1), b, phase, a >= collect_from) for a, b, phase in bounds if b > start]
        # a compiled backend runs every chunk, shorter ones too, in one program of the longest's length
        self._chunk_capacity = max(b - a + 1 for a, b, _ in bounds) if bounds else None
        ahead = getattr(ops, "dispatches_ahead", False)
        try:
            # dispatched chunks not yet recorded: (a, b, phase, collect, state, infos)
            pending: list[Any] = []
            degenerate: DegenerateFitError | None = None  # a step's E-step found θ degenerate (eager backends)
            for j in range(len(chunks) + 1):
                if j < len(chunks) and done == total:
                    a, b, phase, collect = chunks[j]
                    try:
                        state, infos = self._run_chunk(state, a, b, phase, collect)
                    except DegenerateFitError as err:  # handled as a NaN θ at that iteration: its chunk replayed
                        if err.iteration is None:
                            raise
                        degenerate, infos = err, []
                    pending.append((a, b, phase, collect, state, infos))
                # record all but the chunk just dispatched ahead (all of them at the end, or once stopped)
                while len(pending) > (1 if ahead and j < len(chunks) and done == total else 0):
                    a, b, phase, collect, st, infos = pending.pop(0)
                    if done < total:  # stopped early: a chunk dispatched after the stop is dropped
                        continue
                    stacked = _stacked_records(infos)  # a compiled chunk's records, stacked (None: a list)
                    fault = _first_nonfinite(infos, a, ops) if stacked is None \
                        else _first_nonfinite_stacked(stacked, len(infos), a)
                    if fault is None and degenerate is not None:
                        fault = (degenerate.iteration, degenerate.parameter, "the E-step at the value")
                    if fault is not None:
                        # the chunk's good iterations a .. k-1 run again from its start state, then recorded (and
                        # checkpointed) as the last good state; the error raised after them
                        replayed = self._replay_good(fault, good, a, phase, collect, st)
                        if replayed is None:
                            raise self._nonfinite_error(fault, good, st, checkpoint, last_saved, history, draws,
                                                        collect_from, int(keep), t0, t_init, degenerate)
                        b, st, infos, stacked = replayed
                    if stacked is not None:  # each leaf's rows at once
                        z = stacked.get("_z")
                        if z is not None and collect:
                            draws.extend(z[i] for i in range(len(infos)))
                        _extend_history(history, {k: v for k, v in stacked.items() if k != "_z"}, len(infos),
                                        blocks=blocks)
                        self._record_theta(st, stacked)
                    else:
                        for info in infos:
                            z = info.pop("_z", None)
                            if z is not None and collect:
                                draws.append(ops.to_numpy(z))
                            _append_history(history, info, ops)
                    ran = b - a + 1  # iterations of this chunk recorded (the progress bar's)
                    chunk_start, good = good, self._snapshot(st, b)
                    if b < total and self.stopped(st):
                        done = b
                        state = st
                    # (a KeyboardInterrupt raised by the callback keeps this chunk's end as the last good state)
                    asked = self._call_back(a, b, history) if self.callback is not None else None
                    if asked is not None and asked < b:  # the callback stopped the fit inside the chunk
                        cut = self._replay_good((asked + 1, "", ""), chunk_start, a, phase, collect, st)
                        if cut is None:  # the chunk's start state was not kept apart: the fit stops at its end
                            warnings.warn(f"{self.name}: the callback asked to stop after iteration {asked}; this "
                                          f"engine's state cannot be replayed, so the fit stops after iteration {b}, "
                                          "the end of its chunk (chunk_size=1 stops at the callback's iteration)",
                                          RuntimeWarning, stacklevel=user_stacklevel())
                        else:
                            b, st, _, cut_stacked = cut
                            _truncate(history, draws, b, collect_from)
                            if cut_stacked is not None:
                                self._record_theta(st, cut_stacked)
                            else:
                                self._recorded_theta = None
                            good = self._snapshot(st, b)
                    if asked is not None:
                        fault = None  # stopped at or before the iteration before a fault: a result, no error
                        done = b
                        state = st
                    if checkpoint is not None and (b - last_saved >= every or b == done):
                        self._save(checkpoint, st, b, history, draws, int(keep))
                        last_saved = b
                    if bar is not None:
                        bar.update(ran)
                    if fault is not None:
                        raise self._nonfinite_error(fault, good, st, checkpoint, last_saved, history, draws,
                                                    collect_from, int(keep), t0, t_init, degenerate)
        except KeyboardInterrupt:
            interrupted = True
            state = self._from_snapshot(good, state)
            _truncate(history, draws, good.iteration, collect_from)
            where = ""
            if checkpoint is not None and good.iteration > last_saved:
                path = self._save(checkpoint, state, good.iteration, history, draws, int(keep))
                where = f"; checkpoint {str(path)!r} (run(resume=...) continues)"
            warnings.warn(f"{self.name}: interrupted; the result holds the last good state, after iteration "
                          f"{good.iteration} of {total}, and the history so far (fit.interrupted is True)"
                          f"{where}", RuntimeWarning, stacklevel=user_stacklevel())
        finally:
            if bar is not None:
                bar.close()
        if over_processes:  # every process gets the whole state: the result is a one-process fit's
            state = ops.shard_units(ops.local_state(state), {}, None)
        state = self.finalize(state)
        _warn_nonfinite(self.name, history)
        if not interrupted:
            for msg in self.convergence_warnings(history):
                warnings.warn(f"{self.name}: {msg}", ConvergenceWarning, stacklevel=user_stacklevel())
        return self._result(state, history, draws, t0, t_init, good.iteration if interrupted else done,
                            compiled_before, interrupted, blocks=blocks)

    def _call_back(self, a: int, b: int, history: dict[str, list]) -> int | None:
        """Call ``callback(k, record)`` for iterations ``a .. b`` (their history rows, now recorded); the iteration
        after which it asked to stop (it returned True, or raised ``StopIteration``), or None."""
        for i, k in enumerate(range(a, b + 1)):
            record = {n: v[len(v) - (b - a + 1) + i] for n, v in history.items()}
            try:
                answer = self.callback(k, record)
            except StopIteration:
                return k
            if callback_stops(answer):
                return k
        return None

    def _result(self, state: dict[str, Any], history: dict[str, list], draws: list[np.ndarray], t0: float,
                t_init: float, done: int, compiled_before: float, interrupted: bool,
                blocks: dict[str, tuple[int, list[np.ndarray]]] | None = None) -> FitResult:
        hist = _history_arrays(history, blocks)
        latents = np.stack(draws, axis=1) if draws else None  # [L, draws, N, d]
        model = self.result_model
        pad = getattr(self, "_padding", None)
        if pad is not None:  # the real units only: this process's block as a torch rank's result holds it
            n = pad.num_real
            state = _take_units(state, self.unit_axes(), n)
            latents = None if latents is None else latents[:, :, :n]
            model = pad.model
            if getattr(self, "_unit_ids", None) is not None:
                self._unit_ids = self._unit_ids[:n]
        return self.result_type(engine=self, model=model, state=state, history=hist,
                                latent_draws=latents, elapsed=time.perf_counter() - t0, init_time=t_init,
                                num_iterations=done, compile_time=self.ops.compile_time - compiled_before,
                                interrupted=interrupted)

    # ----- blocks of unequal size (JAX local) --------------------------------------------------
    def _pad_block(self, counts: list[int], extents: list[Any] | None = None) -> None:
        """Pad this process's block to the largest block's ``max(counts)`` units with dummy units that count for
        nothing (:mod:`~latentfit.inference.padding`: ``model.pad_units`` copies its last unit, :func:`masked_units`
        zeroes their per-unit values), so that every process's arrays have one shape.  A grouped model's rows
        outside the unit plate (``extents``: every process's ``model.pad_extent()``) are padded to one more than the
        most rows of a process, the extra rows read by one more dummy unit (the last)."""
        from .padding import masked_units

        model = getattr(self, "user_model", self.model)
        rows = None
        if extents and all(isinstance(e, dict) and e.keys() == extents[0].keys() for e in extents):
            rows = {name: max(e[name] for e in extents) + 1 for name in extents[0]}
        n = int(model.num_units)
        size = max(counts) + int(self.jax_local_masks() == "spare") + int(rows is not None)
        pad_units = getattr(model, "pad_units", None)
        padded, message = model, None
        try:
            if pad_units is not None:  # every process: a model that cannot be padded is refused on each
                padded = pad_units(size) if rows is None else pad_units(size, rows)
            elif size > n:
                message = (f"this model ({type(model).__name__}) cannot pad its block with dummy units; split the "
                           f"{sum(counts)} units into {len(counts)} equal blocks")
        except ValueError as e:  # ModelSpecificationError and the like
            message = str(e)
        # decided alike on every process (one that needs no padding must not go on alone into the fit's collectives)
        messages = [m for m in self.ops.process_group().gather_objects(message) if m]
        if messages:
            raise ValueError(f"{self.name}: distributed='local' on JAX: the processes hold {counts} units: "
                             f"{messages[0]}")
        self._padding = _Padding(model, n, size, counts)
        self.model = masked_units(padded, n)
        if getattr(self, "user_model", None) is model:  # the EM family's model as given (its distribute reads it)
            self.user_model = self.model

    def _padded_distribute(self) -> None:
        """After :meth:`distribute` on a padded block: the process shim leaves the dummy units out of its acceptance
        rates and gathers, the dummy units get ids of their own (after every real unit's), and the result's model is
        the real block's view."""
        pad = self._padding
        ops = self.ops
        rank = int(ops.rank)
        total = sum(pad.counts)
        ops.pad_units(pad.counts, pad.size)
        ids = getattr(self, "_unit_ids", None)
        if ids is not None:
            extra = total + rank * pad.size + np.arange(pad.size - pad.num_real, dtype=np.int64)
            self._unit_ids = np.concatenate([np.asarray(ids, dtype=np.int64)[:pad.num_real], extra])
        offset = sum(pad.counts[:rank])
        self._padding = pad._replace(model=pad.model.shard_view(ops, offset, total))

    # ----- faults ------------------------------------------------------------------------------
    def _snapshot(self, state: Any, iteration: int) -> _Snapshot:
        """The state after ``iteration`` (its random stream included), kept until the next chunk completes.

        JAX arrays are immutable: the state itself.  torch states may be updated in place (per-unit tables,
        optimisers, the generator), so they are copied to host arrays as a checkpoint would store them, unless the
        engine's steps never write into their input (``pure_step``: the state itself); a state a checkpoint cannot
        hold (an optimiser with callables in its param_groups) is kept by reference.
        """
        if self.ops.jittable or self.pure_step:
            return _Snapshot(iteration, state, None)
        from latentfit.checkpoint import flatten_state

        try:
            tensors, leaves = flatten_state(state)
        except TypeError:
            return _Snapshot(iteration, state, None)
        return _Snapshot(iteration, {k: np.array(v, copy=True) for k, v in tensors.items()}, leaves)

    def _from_snapshot(self, good: _Snapshot, template: dict[str, Any]) -> dict[str, Any]:
        if good.leaves is None:
            return good.state
        from latentfit.checkpoint import restore_state

        return restore_state(template, good.leaves, good.state, self.ops)

    def _replay_good(self, fault: tuple[int, str, str], good: _Snapshot, first: int, phase: Any, collect: bool,
                     state: Any) -> tuple[int, Any, Any, dict[str, Any] | None] | None:
        """A chunk from ``first`` went NaN/inf at iteration ``k`` (``fault``): its good iterations ``first .. k-1``
        run again from the chunk's start state ``good`` (the iterations are deterministic given the state and its
        random stream: the same values bit for bit), as ``(k - 1, state, infos, stacked)``; None where there are
        none, or the start state was not kept apart from the chunk's (a torch state a checkpoint cannot hold), or
        the replay is not finite (it then differs from the first run)."""
        k = fault[0]
        if k <= first or good.iteration != first - 1:
            return None
        if not (self.ops.jittable or self.pure_step or good.leaves is not None):
            return None
        st, infos = self._run_chunk(self._from_snapshot(good, state), first, k - 1, phase, collect)
        stacked = _stacked_records(infos)
        again = _first_nonfinite(infos, first, self.ops) if stacked is None \
            else _first_nonfinite_stacked(stacked, len(infos), first)
        return None if again is not None else (k - 1, st, infos, stacked)

    def _nonfinite_error(self, fault: tuple[int, str, str], good: _Snapshot, state: dict[str, Any],
                         checkpoint: Any, last_saved: int, history: dict[str, list], draws: list[np.ndarray],
                         collect_from: int, keep: int, t0: float, t_init: float,
                         degenerate: DegenerateFitError | None = None) -> NonFiniteError:
        """Restore the last good state, checkpoint it, and build the error naming the parameter and iteration
        (``degenerate``: the model's error from the E-step of that iteration, raised again with the state)."""
        k, name, what = fault
        state = self.ops.local_state(self._from_snapshot(good, state))
        diagnose = getattr(self.model, "degenerate_error", None)
        if degenerate is None and diagnose is not None:  # a compiled E-step cannot raise: the model says whether the
            # last good θ, whose E-step made the NaN, is degenerate (as an eager E-step raises it)
            try:
                degenerate = diagnose(self.theta_of(state))
            except Exception:  # noqa: BLE001 - no diagnosis: the plain non-finite error
                degenerate = None
        _truncate(history, draws, good.iteration, collect_from)
        from latentfit.checkpoint import checkpoint_files, engine_shard

        # already written (a resumed run's directory may hold none: then write it)
        saved = [p for it, p in checkpoint_files(checkpoint, engine_shard(self)) if it == good.iteration] \
            if checkpoint is not None else []
        if saved and last_saved == good.iteration:
            path = saved[-1]
        else:
            directory = checkpoint if checkpoint is not None else tempfile.mkdtemp(prefix="latentfit-nonfinite-")
            path = self._save(directory, state, good.iteration, history, draws, keep)
        result = self._result(state, history, draws, t0, t_init, good.iteration, 0.0, True)
        if degenerate is not None:
            msg = (f"{self.name}: {degenerate.args[0]} (the E-step of iteration {k}); the fit stopped. The last good "
                   f"state (iteration {good.iteration}) is checkpointed at {str(path)!r} (run(resume=...) continues "
                   "from it; the exception's .result holds it).")
            return DegenerateFitError(msg, parameter=name, iteration=k, last_good_iteration=good.iteration,
                                      checkpoint=path, result=result)
        msg = (f"{self.name}: {what} of parameter {name!r} is NaN/inf at iteration {k}; the fit stopped. The last good "
               f"state (iteration {good.iteration}) is checkpointed at {str(path)!r} (run(resume=...) continues from "
               "it; the exception's .result holds it). Check the model for values that overflow or leave the "
               "domain (log/sqrt of a quantity that can be <= 0, a variance that can reach 0) and the data for "
               "outliers, or start from other initial values.")
        return NonFiniteError(msg, parameter=name, iteration=k, last_good_iteration=good.iteration,
                              checkpoint=path, result=result)

    # ----- checkpoints -------------------------------------------------------------------------
    def _resume_source(self, checkpoint: Any, resume: Any) -> Any:
        """Where to resume from (None: a fresh run); refuses to start afresh over another run's checkpoints."""
        if checkpoint is None and (resume is None or resume is False):  # a plain run: nothing to read or check
            return None
        from latentfit.checkpoint import checkpoint_world_sizes, engine_shard, resume_source

        shard = engine_shard(self)
        if shard is None:  # one process: the rules every engine shares
            return resume_source(checkpoint, resume)
        if resume is True:
            if checkpoint is None:
                raise ValueError("resume=True continues from the checkpoint directory: pass checkpoint=<dir>")
            found = bool(checkpoint_world_sizes(checkpoint))
            if shard is not None:  # every process decides alike (directories need not be shared)
                found = any(self._processes().gather_objects(found))
            if not found:
                return None
            resume = checkpoint
        if resume not in (None, False):
            if shard is not None and os.path.isdir(resume):
                return self._common_checkpoint(resume, shard)
            return resume
        if checkpoint is not None and checkpoint_world_sizes(checkpoint):
            raise FileExistsError(f"{str(checkpoint)!r} already holds checkpoints: pass resume=True to continue that "
                                  "run, or use an empty directory")
        return None

    def _common_checkpoint(self, directory: Any, shard: tuple[int, int]) -> Any:
        """This process's checkpoint at the latest iteration every process of the distributed fit saved."""
        from latentfit.checkpoint import checkpoint_files, load_checkpoint

        mine = dict(checkpoint_files(directory, shard))
        common = set(mine)
        # before any process raises: none waits for another
        for iterations in self._processes().gather_objects(sorted(mine)):
            common &= set(iterations)
        if not mine:
            load_checkpoint(directory, shard)  # raises: no checkpoint, or one of a fit over another number of processes
        if not common:
            raise FileNotFoundError(f"the processes' checkpoints in {str(directory)!r} share no iteration (process "
                                    f"{shard[0]} holds {sorted(mine)}): resume from an earlier copy")
        return mine[max(common)]

    def _processes(self) -> Any:
        """What reaches every process of a distributed fit: the JAX run's process group, else torch's ``ops``."""
        group = getattr(self, "_process_group", None)
        return self.ops if group is None else group

    def _save(self, directory: Any, state: Any, iteration: int, history: dict[str, list],
              draws: list[np.ndarray], keep: int) -> Any:
        from latentfit.checkpoint import save_checkpoint

        return save_checkpoint(directory, self, state, iteration, history, draws, keep=keep)

    def _restore(self, source: Any, template: dict[str, Any], total: int) -> tuple[dict[str, Any], dict[str, list],
                                                                                  list[np.ndarray], int]:
        """Load and check a checkpoint (its state holds the random stream); return ``(state, history, draws,
        iteration)``.  Any iteration of the run resumes: its chunk is cut there (the iterations are those of the
        uninterrupted run, whatever ``checkpoint_every`` or chunks wrote it)."""
        from latentfit.checkpoint import engine_shard, load_checkpoint, restore_state

        shard = engine_shard(self)
        ckpt = load_checkpoint(source, shard)
        problem: ValueError | None = None
        try:
            ckpt.check_compatible(self)
        except ValueError as err:
            problem = err
        if shard is not None:  # refused on every process alike (one alone must not go on into the fit's collectives)
            found = [(r, m) for r, m in enumerate(self._processes().gather_objects(None if problem is None
                                                                                   else str(problem))) if m]
            if found and problem is None:
                raise ValueError(f"process {found[0][0]} of the distributed fit refuses its checkpoint: {found[0][1]}")
        if problem is not None:
            raise problem
        start = ckpt.iteration
        if not 0 <= start <= total:
            raise ValueError(f"{self.name}: the checkpoint is at iteration {start}, past this engine's {total} "
                             "iterations")
        state = restore_state(template, ckpt.meta["state"], ckpt.tensors, self.ops)
        return state, ckpt.history, ckpt.draws, start

    def chunk_randoms(self, phase: Any) -> Callable[[Any, Any], Any] | None:
        """A compiled backend's hook: ``prepare(state, ks)`` making the random numbers of a chunk's iterations ``ks``
        before them, stacked over the chunk (or None: each step draws its own), each iteration's slice then passed
        to :meth:`step` as ``randoms=``; None (default): no such hook."""
        return None

    def _run_chunk(self, state: dict[str, Any], first: int, last: int, phase: Any,
                   collect: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        prepare = self.chunk_randoms(phase) if self.ops.jittable else None

        def one(st: dict[str, Any], k: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            if prepare is not None:
                k, randoms = k
                st, info = self.step(st, k, phase) if randoms is None else self.step(st, k, phase, randoms=randoms)
            else:
                try:
                    st, info = self.step(st, k, phase)
                except DegenerateFitError as err:  # (eager backends) the iteration whose E-step failed
                    if err.iteration is None:
                        err.iteration = int(k)
                    raise
            info = info_dict(info)
            theta = self.history_theta(st)
            if theta is not None:
                info["theta"] = theta
            # compiled backends always return the draw, so one compiled chunk serves both cases
            if collect or self.ops.jittable:
                z = self.latent_draw(st)
                if z is not None:
                    info["_z"] = z
            return st, info

        # compiled chunks are cached per engine instance and phase (two engines may differ in options)
        key = (self, phase, collect and not self.ops.jittable)
        capacity = getattr(self, "_chunk_capacity", None)
        if prepare is None:
            return self.ops.scan_steps(one, state, range(first, last + 1), key=key, capacity=capacity)
        return self.ops.scan_steps(one, state, range(first, last + 1), key=key, prepare=prepare, capacity=capacity)


def callback_stops(answer: Any) -> bool:
    """Whether a callback's return value asks the fit to stop: ``True`` (a Python or numpy bool), as XGBoost's and
    scipy's callbacks do; anything else (None, a number, a loss) goes on."""
    return answer is True or (isinstance(answer, np.bool_) and bool(answer))


#: values of ``run(distributed=...)``: True (JAX: every process passes the whole data; torch: its block), "whole",
#: "local" (each process passes its block of the units)
DISTRIBUTED_MODES = (False, True, "whole", "local")


def engine_option_names(engine_cls: type) -> frozenset[str]:
    """The keyword options an engine's constructor takes: those of its ``__init__`` and, where that passes
    ``**kwargs`` on, of its base classes' (``MISSO(**kwargs)`` -> the EM family's ``callback=``, ``seed=``...)."""
    names: set[str] = set()
    for cls in engine_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())[2:]  # past self and the model
        except (TypeError, ValueError):
            break
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return frozenset(names)


def unknown_option_error(call: str, engine: str, unknown: list[str], options: Any, also: Any = ()) -> TypeError:
    """``TypeError`` for options ``call`` (``"fit()"``, ``"SAEM(...)"``) does not take: each with the closest of
    ``options`` (the engine's) and ``also`` (the caller's own), and the engine's options listed."""
    candidates = sorted(set(options) | set(also))
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, candidates, n=1)
        hints.append(f"{k!r}; did you mean {close[0]!r}?" if close else f"{k!r}")
    s = "s" if len(unknown) > 1 else ""
    return TypeError(f"{call} got an unexpected option{s} {', '.join(hints)} "
                     f"(options of {engine}: {', '.join(sorted(options))})")


def distributed_mode(distributed: Any) -> str | None:
    """``run(distributed=...)`` as None (one process), ``"auto"`` (True: the backend's default), ``"whole"`` or
    ``"local"``; anything else is refused."""
    if distributed is None or distributed is False:
        return None
    if distributed is True:
        return "auto"
    if distributed in ("whole", "local"):
        return str(distributed)
    raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {distributed!r}")


def check_process_blocks(name: str, model: Any, group: Any) -> list[int]:
    """Every process's number of units (process order) in a ``distributed="local"`` JAX fit; refuses every process
    holding the same data (the whole data passed everywhere: that is ``distributed=True``).  Collectives: every
    process calls it."""
    import hashlib

    counts = [int(c) for c in group.gather_objects(int(model.num_units))]
    h = hashlib.sha256()
    for site, value in sorted(getattr(model, "observed", {}).items()):
        a = np.ascontiguousarray(np.asarray(value))
        h.update(f"{site}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    digests = group.gather_objects(h.hexdigest())
    if len(digests) > 1 and getattr(model, "observed", None) and all(d == digests[0] for d in digests):
        raise ValueError(f"{name}: distributed='local': every process passed the same data ({counts[0]} units "
                         "each); pass each process its own block of the units, or pass the whole data with "
                         "distributed=True (each process then takes its block)")
    return counts


class _Padding(NamedTuple):
    """A JAX local fit's block padded with dummy units: the real block's model (after :meth:`Engine.distribute`: its
    shard view), its number of units, the padded size and every process's number of units."""

    model: Any
    num_real: int
    size: int
    counts: list[int]


def _take_units(state: Any, axes: dict[str, Any], n: int) -> Any:
    """``state`` with its per-unit entries (``axes``: field -> unit axis, or a dict of sub-fields) cut to the first
    ``n`` units."""
    changes = {}
    for name, axis in axes.items():
        value = state_field(state, name)
        if value is None:
            continue
        if isinstance(axis, dict):
            changes[name] = _take_units(value, axis, n)
        else:
            changes[name] = _cut(value, axis, n)
    return replace_fields(state, **changes) if changes else state


def _cut(value: Any, axis: int, n: int) -> Any:
    """``value`` (an array, or a dict of arrays: a table of statistics) cut to its first ``n`` rows along ``axis``."""
    if isinstance(value, dict):
        return {k: _cut(v, axis, n) for k, v in value.items()}
    return value[(slice(None),) * axis + (slice(0, n),)]


class _Snapshot(NamedTuple):
    """The last good state: after ``iteration``; ``state`` the state (``leaves`` None) or its host arrays."""

    iteration: int
    state: Any
    leaves: list[dict[str, Any]] | None


def state_field(state: Any, name: str, default: Any = None) -> Any:
    """Field ``name`` of an engine state: a ``NamedTuple`` (every engine here) or a dict (``default`` if absent)."""
    if isinstance(state, dict):
        return state.get(name, default)
    return getattr(state, name, default)


def replace_fields(state: Any, **changes: Any) -> Any:
    """``state`` with some fields replaced, without changing it: a record's ``_replace`` (a dict: a new dict)."""
    if isinstance(state, dict):
        return dict(state, **changes)
    return state._replace(**changes)


def info_dict(info: Any) -> dict[str, Any]:
    """The history entries of a step's info record: its non-``None`` fields, by name (a dict is taken as is)."""
    if isinstance(info, dict):
        return dict(info)
    return {k: v for k, v in info._asdict().items() if v is not None}


def _stacked_records(infos: Any) -> dict[str, Any] | None:
    """A compiled chunk's records stacked (:class:`~latentfit.inference.ops_jax.StackedInfos`: a dict of numpy
    arrays, or of dicts of them, the iterations on axis 0), or None (a list of per-iteration records)."""
    stacked = getattr(infos, "stacked", None)

    def plain(tree: Any) -> bool:
        return all(plain(v) if isinstance(v, dict) else isinstance(v, np.ndarray) and v.ndim >= 1
                   for v in tree.values())

    return stacked if isinstance(stacked, dict) and plain(stacked) else None


def _first_nonfinite(infos: Any, first: int, ops: Any) -> tuple[int, str, str] | None:
    """``(iteration, parameter, "the gradient" | "the value")`` of the first NaN/inf gradient entry (info
    ``grad_nonfinite``, counts per parameter) or parameter value (info ``theta``) in a chunk; None if all finite.
    A compiled chunk's stacked records are checked leaf by leaf (the same answer: the first iteration, and in it
    the gradients before the values, each in its order)."""
    stacked = _stacked_records(infos)
    if stacked is not None:
        return _first_nonfinite_stacked(stacked, len(infos), first)
    for j, info in enumerate(infos):
        for name, count in (info.get("grad_nonfinite") or {}).items():
            if float(ops.to_numpy(count)) > 0:
                return first + j, name, "the gradient"
        for name, value in info.get("theta", {}).items():
            arr = np.asarray(ops.to_numpy(value))
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                return first + j, name, "the value"
    return None


def _first_nonfinite_stacked(stacked: dict[str, Any], n: int, first: int) -> tuple[int, str, str] | None:
    """:func:`_first_nonfinite` of ``n`` iterations' stacked records (:func:`_stacked_records`), leaf by leaf."""
    found = []
    candidates = [(name, count, "the gradient") for name, count in (stacked.get("grad_nonfinite") or {}).items()]
    candidates += [(name, value, "the value") for name, value in stacked.get("theta", {}).items()]
    for order, (name, value, what) in enumerate(candidates):
        if what == "the gradient":
            bad = np.flatnonzero(np.asarray(value, dtype=float).reshape(n, -1)[:, 0] > 0)
        elif value.dtype.kind in "fc":
            bad = np.flatnonzero(~np.isfinite(value).reshape(n, -1).all(1))
        else:
            continue
        if bad.size:
            found.append((int(bad[0]), order, name, what))
    if not found:
        return None
    j, _, name, what = min(found)
    return first + j, name, what


def _truncate(history: dict[str, list], draws: list[np.ndarray], done: int, collect_from: int) -> None:
    """Cut the history (and the collected draws) back to the first ``done`` iterations, in place."""
    for v in history.values():
        del v[done:]
    del draws[max(0, done - collect_from + 1):]


#: :func:`final_trend` flags a rise over the last quarter of the iterations beyond this many standard errors ...
TREND_SIGMAS = 3.0
#: ... and beyond this many log-likelihood units
TREND_UNITS = 1.0


def final_trend(values: Any, share: float = 0.25, context: Any = None) -> tuple[float, float]:
    """``(rise, se)``: the least-squares line's rise over the last ``share`` of ``values`` (e.g. the complete-data
    log-likelihood per iteration) and its standard error, inflated by the residuals' lag-1 autocorrelation ρ as for an
    AR(1) series, ``(1 + ρ) / (1 − ρ)`` (MCMC draws at consecutive iterations are correlated); ``(0, inf)`` with
    fewer than 20 finite values.

    ``context``: a longer stretch of the series (e.g. ``values`` and the iterations before them) to estimate ρ from,
    the lag-1 autocorrelation of its residuals about a quadratic, corrected for its small-sample bias
    (``ρ̂ + (3 + 4ρ̂) / m`` over m values) and capped at 0.99.  The residuals of the short window about its own line
    underestimate a high ρ (the line absorbs the slow wander: a 75-iteration window of an AR(1) with ρ = 0.95 gave
    |t| > 4 in 6% of the draws, against 1.3% so), and the quadratic keeps a curved drift out of ρ (a line through
    it would call the curvature autocorrelation)."""
    v = np.asarray(values, dtype=float).reshape(len(values), -1).sum(-1)
    w = v[len(v) - max(int(len(v) * share), 1):]
    w = w[np.isfinite(w)]
    if w.size < 20:
        return 0.0, float("inf")
    t = np.arange(w.size, dtype=float) - (w.size - 1) / 2
    slope = float(t @ (w - w.mean()) / (t @ t))
    resid = w - w.mean() - slope * t
    c = None if context is None else np.asarray(context, dtype=float).reshape(len(context), -1).sum(-1)
    c = None if c is None else c[np.isfinite(c)]
    if c is not None and c.size >= w.size:
        u = np.arange(c.size, dtype=float)
        u = (u - u.mean()) / u.std()
        r = c - np.polyval(np.polyfit(u, c, 2), u)
        rho = float(np.corrcoef(r[:-1], r[1:])[0, 1]) if r.std() > 0 else 0.0
        rho = float(np.clip(rho + (3.0 + 4.0 * rho) / c.size, 0.0, 0.99))
    else:
        rho = float(np.clip(np.corrcoef(resid[:-1], resid[1:])[0, 1], 0.0, 0.95)) if resid.std() > 0 else 0.0
    se = float(np.sqrt(resid.var() / (t @ t) * (1 + rho) / (1 - rho)))
    return slope * w.size, se * w.size


def _warn_nonfinite(name: str, history: dict[str, list]) -> None:
    counts = history.get("num_nonfinite")
    if not counts:
        return
    per_iter = np.asarray([float(np.sum(c)) for c in counts])
    total = int(per_iter.sum())
    if total > 0:
        warnings.warn(f"{name}: {total} MCMC proposals had a NaN/inf log-density and were rejected (in "
                      f"{int((per_iter > 0).sum())} of {len(per_iter)} iterations; fit.num_nonfinite, and "
                      "fit.history['num_nonfinite'] per iteration). A few are harmless; many mean the chains keep "
                      "leaving the model's domain (e.g. the log of a quantity that can be negative).",
                      RuntimeWarning, stacklevel=user_stacklevel())


def _chunk_bounds(first: int, last: int, collect_from: int, chunk: int, align: int = 0) -> list[tuple[int, int]]:
    """Chunks ``(a, b)`` of at most ``chunk`` iterations covering ``first..last``, cut where the draws' collection
    starts and (``align``) after every multiple of ``align`` (the checkpoints' iterations)."""
    cuts = {first, last + 1}
    if first < collect_from <= last:
        cuts.add(collect_from)
    if align > 0:
        cuts.update(range((first // align + 1) * align + 1, last + 1, align))
    cuts = sorted(cuts)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        k = a
        while k < b:
            out.append((k, min(k + chunk, b) - 1))
            k += chunk
    return out


def _append_history(history: dict[str, list], info: dict[str, Any], ops: Any, prefix: str = "") -> None:
    for name, value in info.items():
        if isinstance(value, dict):
            _append_history(history, value, ops, prefix=f"{prefix}{name}.")
        else:
            history.setdefault(prefix + name, []).append(ops.to_numpy(value))


def _extend_history(history: dict[str, list], stacked: dict[str, Any], n: int, prefix: str = "",
                    blocks: dict[str, tuple[int, list[np.ndarray]]] | None = None) -> None:
    """:func:`_append_history` of ``n`` iterations at once from their stacked records: each iteration's entry is its
    row of the leaf (a view; a 0-d array for a scalar entry, as one iteration's record gives).  ``blocks``: each
    entry's stacked leaves too, with the entry's length before the first (:func:`_history_arrays`)."""
    for name, value in stacked.items():
        if isinstance(value, dict):
            _extend_history(history, value, n, prefix=f"{prefix}{name}.", blocks=blocks)
        else:
            rows = history.setdefault(prefix + name, [])
            if blocks is not None:
                blocks.setdefault(prefix + name, (len(rows), []))[1].append(value)
            rows.extend(value[j, ...] for j in range(n))


def _history_arrays(history: dict[str, list], blocks: dict[str, tuple[int, list[np.ndarray]]] | None
                    ) -> dict[str, np.ndarray]:
    """The history's entries as arrays: an entry made only of whole stacked blocks (:func:`_extend_history`, nothing
    restored, truncated or appended row by row) is their concatenation, the same values as stacking its rows, in one
    copy (stacking 400 rows of views took ~0.1 ms an entry at the end of a fit); any other, its rows stacked."""
    out = {}
    for name, rows in history.items():
        kept = None if blocks is None else blocks.get(name)
        if kept is not None and kept[0] == 0 and sum(len(b) for b in kept[1]) == len(rows):
            out[name] = np.concatenate(kept[1])
        else:
            out[name] = np.stack(rows)
    return out


def _progress_bar(total: int, enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, leave=False)


def default_num_chains(num_units: int) -> int:
    """saemix default: ``ceil(50 / N)`` chains per unit, at least 1."""
    return max(1, int(np.ceil(50 / max(num_units, 1))))
