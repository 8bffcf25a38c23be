"""The shared engine driver: one loop for every engine.

An engine is a pair ``init(key) -> state`` / ``step(state, k, phase) -> (state, info)`` over a
small state record (a dict of backend arrays, a pytree for JAX).  ``phase`` is a static value
(e.g. whether f-SAEM's Laplace proposal runs); iterations are grouped into phases so that a JAX
backend compiles one function per phase and runs chunks of iterations under ``lax.scan``,
while torch runs the same ``step`` eagerly.  The driver owns the progress bar, the history of θ
and of the objective, the collection of the last latent draws, callbacks and seeding, and
checkpoints (``run(checkpoint=dir)``, ``run(resume=dir)``: :mod:`latentfit.checkpoint`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .model import LatentModel
from .results import FitResult

Callback = Callable[[int, dict[str, Any]], Any]
#: keyword options of :meth:`Engine.run` besides the key


class Engine:
    """Base class of every engine (SAEM, EM, FIEM, ...).

    Subclasses implement :meth:`init`, :meth:`step` and :meth:`phases`; :meth:`run` is shared.
    """

    #: name shown in progress bars and results
    name: str = "engine"

    def __init__(self, model: LatentModel, *, seed: int = 0, progress: bool = True,
                 callback: Callback | None = None, num_draws: int = 100, chunk_size: int = 25) -> None:
        if not isinstance(model, LatentModel):
            raise TypeError(f"{type(self).__name__} expects a LatentModel, got {type(model).__name__}")
        self.model = model
        self.ops = model.ops
        self.seed = int(seed)
        self.progress = progress
        self.callback = callback
        self.num_draws = int(num_draws)
        self.chunk_size = int(chunk_size)

    # ----- to implement ------------------------------------------------------------------------
    def init(self, key: Any) -> dict[str, Any]:
        raise NotImplementedError

    def step(self, state: dict[str, Any], k: Any, phase: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        raise NotImplementedError

    def phases(self) -> list[tuple[int, int, Any]]:
        """Iteration ranges ``[(first, last, phase), ...]``, 1-based and inclusive."""
        raise NotImplementedError

    def latent_draw(self, state: dict[str, Any]) -> Any | None:
        """Current latent draws ``[L, N, d]`` to keep at the end of the run (None: no latents)."""
        return state.get("z")

    def finalize(self, state: dict[str, Any]) -> dict[str, Any]:
        """Hook run once after the loop (e.g. a last exact E-step); warns with the model's ``fit_warnings``."""
        for msg in self.model.fit_warnings(self.theta_of(state)):
            warnings.warn(f"{self.name}: {msg}", RuntimeWarning, stacklevel=3)
        return state

    def theta_of(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.model.constrain(state["theta_u"])

    # ----- the shared loop ---------------------------------------------------------------------
    @property
    def num_iterations(self) -> int:
        return max(last for _, last, _ in self.phases())

    def run(self, key: Any = None, *, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, keep: int = 3,
            resume: str | os.PathLike | bool | None = None) -> FitResult:
        """Run the engine; ``key`` is the backend's PRNG key (default ``ops.key(seed)``; ignored when resuming).

        ``checkpoint``: a directory where, at the end of each chunk at least ``checkpoint_every`` iterations (default
        ``chunk_size``) after the previous checkpoint, and at the end of the run, the state, history, draws and RNG
        are written (:mod:`latentfit.checkpoint`), keeping the last ``keep``.  ``resume``: a directory (its
        latest checkpoint) or a checkpoint file to continue from, on an engine built with the same model and
        options; ``True`` continues from ``checkpoint`` if it holds one, else starts afresh.  A resumed run equals
        the uninterrupted one bit for bit (history and parameters).
        """
        ops = self.ops
        total = self.num_iterations
        resume_from = self._resume_source(checkpoint, resume)
        every = self.chunk_size if checkpoint_every is None else int(checkpoint_every)
        if checkpoint is not None and (every < 1 or int(keep) < 1):
            raise ValueError(f"checkpoint_every and keep must be >= 1, got {checkpoint_every} and {keep}")
        if key is None:
            key = ops.key(self.seed)
        collect_from = total - min(self.num_draws, total) + 1
        history: dict[str, list] = {}
        draws: list[np.ndarray] = []
        compiled_before = ops.compile_time
        t0 = time.perf_counter()
        with ops.seed_context(self.seed):
            state = self.init(key)
            start = 0
            if resume_from is not None:
                state, history, draws, start = self._restore(resume_from, state, collect_from)
            last_saved = start
            t_init = time.perf_counter() - t0
            bar = _progress_bar(total, self.progress, self.name)
            if bar is not None and start:
                bar.update(start)
            for first, last, phase in self.phases():
                # split each phase so the tail (draw collection) is its own chunk, then by chunk_size
                bounds = _chunk_bounds(first, last, collect_from, self.chunk_size)
                for a, b in bounds:
                    if b <= start:  # done before the checkpoint we resumed from
                        continue
                    collect = a >= collect_from
                    state, infos = self._run_chunk(state, a, b, phase, collect)
                    for info in infos:
                        z = info.pop("_z", None)
                        if z is not None and collect:
                            draws.append(ops.to_numpy(z))
                        _append_history(history, info, ops)
                    if checkpoint is not None and (b - last_saved >= every or b == total):
                        self._save(checkpoint, state, b, history, draws, int(keep))
                        last_saved = b
                    if self.callback is not None:
                        for j, k in enumerate(range(a, b + 1)):
                            self.callback(k, {n: v[len(v) - (b - a + 1) + j] for n, v in history.items()})
                    if bar is not None:
                        bar.update(b - a + 1)
            if bar is not None:
                bar.close()
            state = self.finalize(state)
        elapsed = time.perf_counter() - t0
        hist = {n: np.stack(v) for n, v in history.items()}
        latents = np.stack(draws, axis=1) if draws else None  # [L, draws, N, d]
        return FitResult(engine=self, model=self.model, state=state, history=hist,
                         latent_draws=latents, elapsed=elapsed, init_time=t_init,
                         num_iterations=total,
                         compile_time=ops.compile_time - compiled_before)

    # ----- checkpoints -------------------------------------------------------------------------
    def _resume_source(self, checkpoint: Any, resume: Any) -> Any:
        """Where to resume from (None: a fresh run); refuses to start afresh over another run's checkpoints."""
        from latentfit.checkpoint import checkpoint_files

        if resume is True:
            if checkpoint is None:
                raise ValueError("resume=True continues from the checkpoint directory: pass checkpoint=<dir>")
            return checkpoint if checkpoint_files(checkpoint) else None
        if resume not in (None, False):
            return resume
        if checkpoint is not None and checkpoint_files(checkpoint):
            latest = checkpoint_files(checkpoint)[-1][1].name
            raise FileExistsError(f"{str(checkpoint)!r} already holds checkpoints (latest {latest}): pass "
                                  "resume=True to continue that run, or use an empty directory")
        return None

    def _save(self, directory: Any, state: dict[str, Any], iteration: int, history: dict[str, list],
              draws: list[np.ndarray], keep: int) -> None:
        from latentfit.checkpoint import save_checkpoint

        save_checkpoint(directory, self, state, iteration, history, draws, rng=self._rng_state(), keep=keep)

    def _rng_state(self) -> dict[str, np.ndarray]:
        """The global RNG state draws come from (torch's, inside the driver's forked context); JAX: none."""
        return {} if self.ops.jittable else self.ops.rng_state()

    def _restore(self, source: Any, template: dict[str, Any],
                 collect_from: int) -> tuple[dict[str, Any], dict[str, list], list[np.ndarray], int]:
        """Load and check a checkpoint; restore the RNG; return ``(state, history, draws, iteration)``."""
        from latentfit.checkpoint import load_checkpoint, restore_state

        ckpt = load_checkpoint(source)
        ckpt.check_compatible(self)
        start = ckpt.iteration
        ends = {b for first, last, _ in self.phases()
                for _, b in _chunk_bounds(first, last, collect_from, self.chunk_size)}
        if start not in ends:
            raise ValueError(f"checkpoint iteration {start} is not the end of a chunk of this engine")
        state = restore_state(template, ckpt.meta["state"], ckpt.tensors, self.ops)
        if not self.ops.jittable:
            self.ops.set_rng_state({k[len("rng/"):]: v for k, v in ckpt.tensors.items() if k.startswith("rng/")})
        return state, ckpt.history, ckpt.draws, start

    def _run_chunk(self, state: dict[str, Any], first: int, last: int, phase: Any,
                   collect: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        def one(st: dict[str, Any], k: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            st, info = self.step(st, k, phase)
            info = dict(info)
            info["theta"] = self.theta_of(st)
            # compiled backends always return the draw, so one compiled chunk serves both cases
            if collect or self.ops.jittable:
                z = self.latent_draw(st)
                if z is not None:
                    info["_z"] = z
            return st, info

        # compiled chunks are cached per engine instance and phase (two engines may differ in options)
        key = (self, phase, collect and not self.ops.jittable)
        return self.ops.scan_steps(one, state, range(first, last + 1), key=key)


def _chunk_bounds(first: int, last: int, collect_from: int, chunk: int) -> list[tuple[int, int]]:
    cuts = [first]
    if first < collect_from <= last:
        cuts.append(collect_from)
    cuts.append(last + 1)
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


def _progress_bar(total: int, enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, leave=False)


def default_num_chains(num_units: int) -> int:
    """saemix default: ``ceil(50 / N)`` chains per unit, at least 1."""
    return max(1, int(np.ceil(50 / max(num_units, 1))))
