r"""MISSO for variational inference, with the baselines MC-SAG, MC-Adam and Bayes-by-backprop.

Karimi, Wai, Moulines & Li, "MISSO: Minimization by Incremental Stochastic Surrogate Optimization for
Large Scale Nonconvex Problems" (IJCAI 2021; arXiv preprint 2018), the variational-inference instance of §7.

The negative ELBO is a finite sum over ``n`` blocks of data (a block is a set of data indices ``B_i``)

.. math::

    \mathcal L(\theta) = \frac1n \sum_{i=1}^n \mathcal L_i(\theta), \qquad
    \mathcal L_i(\theta) = -\mathbb E_{q(w;\theta)}\big[\log p(y_{B_i} \mid x_{B_i}, w)\big]
                           + \frac1n \mathrm{KL}\big(q(\cdot;\theta) \,\|\, \pi\big),

so ``Σ_i L_i`` is the full negative ELBO (the PPL's ``Trace_ELBO``: the KL and every site outside the data
plate enter each block with weight ``1/n``, the data-plate sites of block ``i`` with weight 1). The gradient
``ĝ_i ≈ ∇L_i(θ)`` is the reparameterised Monte-Carlo estimate with ``M_k`` draws ``w = t(θ, ε)``.

MISSO keeps for every block the anchor ``θ^{τ_i}`` (θ at its last visit) and ``ĝ_i`` (its gradient there), i.e.
the quadratic surrogate ``L̂_i(θ; θ^{τ_i}) = L_i(θ^{τ_i}) + ⟨ĝ_i, θ − θ^{τ_i}⟩ + (1/2γ)‖θ − θ^{τ_i}‖²``. The
tables are filled by one pass over all blocks at ``θ^0``; iteration ``k`` picks a block ``i_k`` uniformly, draws
``M_k`` samples at ``θ^k``, sets ``θ^{τ_{i_k}} = θ^k``, ``ĝ_{i_k} = ĝ_{i_k}(θ^k)`` and jumps to the minimiser of
the summed surrogates

.. math::

    \theta^{k+1} = \frac1n \sum_i \theta^{\tau_i} - \frac{\gamma}{n} \sum_i \hat g_i   \qquad (\text{MISSO}),

with running sums (O(dim θ) per iteration; recomputed from the tables once per epoch). The baselines on the same
per-block gradients:

* MC-SAG: the same gradient table, ``θ^{k+1} = θ^k − (γ/n) Σ_i ĝ_i``;
* MC-Adam: Adam (β1 = .9, β2 = .999, ε = 1e-8, bias-corrected) with step ``γ`` on ``ĝ_{i_k}``;
* BBB (Bayes-by-backprop, Blundell et al. 2015): plain SGD ``θ^{k+1} = θ^k − γ ĝ_{i_k}``.

An epoch is ``ceil(n / blocks_per_iter)`` iterations; ``M_k`` defaults to the epoch number ``k ≥ 1`` (the
paper's BNN experiments). With several blocks per iteration the tables take each block's gradient and Adam / SGD
use their mean.

The algebra below only adds, scales and takes powers of flat parameter vectors, so it runs unchanged on torch
tensors (:mod:`latentfit.integrations.misso_vi_pyro`) and JAX arrays (:mod:`latentfit.integrations.misso_vi_numpyro`).

:class:`MISSOVIEngine` runs the loop with the library's checkpoints (:mod:`latentfit.checkpoint`: safetensors + JSON
sidecar, the data's SHA-256, options compared on resume): ``run(checkpoint=dir, checkpoint_every=K epochs, keep=3,
resume=dir | True)``; a resumed fit equals the uninterrupted one bit for bit.  An iteration is computed first
(:meth:`MISSOVIState.propose`) and stored after (:meth:`MISSOVIState.commit`, with Ctrl-C held back meanwhile), and the
block generator and the oracle's random stream are put back when an iteration does not finish: ``KeyboardInterrupt``
returns the state after the last whole iteration (``interrupted=True``), a NaN/inf θ^{k+1} raises
:class:`~latentfit.NonFiniteError` with the state after iteration k checkpointed.  A ``KeyboardInterrupt`` while the
tables are first filled (before iteration 1) is not caught.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from .._hooks import user_stacklevel

METHODS = ("misso", "mc-sag", "mc-adam", "bbb")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class BlockOracle(Protocol):
    """What a PPL adapter provides: flat unconstrained parameters and per-block Monte-Carlo gradients, drawn from a
    random stream of its own that it hands out and takes back (checkpoints, an interrupted iteration undone)."""

    ops: Backend

    def grad(self, theta: Any, block: np.ndarray, num_samples: int) -> Any:
        """``ĝ_i(θ)``: the reparameterised gradient of ``L_i`` at the flat vector ``θ`` (``num_samples`` draws)."""

    def loss(self, theta: Any) -> float:
        """The full negative ELBO ``Σ_i L_i(θ)`` (a fixed number of particles)."""

    def finite(self, theta: Any) -> bool:
        """Whether every entry of ``θ`` is finite."""

    def param_slices(self) -> list[tuple[str, int, int]]:
        """``(name, start, stop)`` of each parameter's entries in the flat vector."""

    def get_stream(self) -> Any:
        """A copy of the random stream's state (a pytree of arrays, generators and ints a checkpoint holds)."""

    def set_stream(self, stream: Any) -> None:
        """Continue from a state :meth:`get_stream` returned."""


@dataclass
class MISSOVIResult:
    """Result of :class:`MISSOVI`: ``params`` (constrained guide / model params), ``history["loss"]`` (full
    negative ELBO at θ^0 and after each epoch), ``time`` (seconds), ``theta`` (final flat unconstrained vector)
    and, with ``record=True``, ``trace`` (``theta``: θ^0, θ^1, …; ``blocks``: the block indices of each
    iteration).  ``interrupted``: the run stopped early (``KeyboardInterrupt``, or the result a
    :class:`~latentfit.NonFiniteError` carries) and this is its last good state, after ``num_iters`` iterations."""

    params: dict[str, Any]
    history: dict[str, list[float]]
    time: float
    method: str
    num_iters: int
    theta: Any = None
    trace: dict[str, list[Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False

    def __repr__(self) -> str:
        loss = self.history.get("loss", [])
        last = f"{loss[-1]:.4g}" if loss else "n/a"
        stopped = ", interrupted" if self.interrupted else ""
        return (f"MISSOVIResult(method={self.method!r}, num_iters={self.num_iters}{stopped}, final loss={last}, "
                f"time={self.time:.2f}s, params={sorted(self.params)})")


# ----------------------------------------------------------------------------------------------- options


def check_method(method: Any) -> str:
    """The update rule: one of :data:`METHODS` (case-insensitive, ``_`` for ``-`` allowed)."""
    name = str(method).lower().replace("_", "-") if isinstance(method, str) else None
    if name not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return name


def check_learning_rate(lr: Any) -> float:
    """γ: a finite number > 0."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise ValueError(f"learning_rate must be a positive number, got {lr!r}")
    value = float(lr)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"learning_rate must be finite and > 0, got {lr!r}")
    return value


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def num_samples_schedule(num_samples: Any) -> Callable[[int], int]:
    """``M_k`` as a function of the epoch ``k ≥ 1``: ``None`` → ``k`` (the paper's default), an int → constant,
    a callable ``k -> M_k`` → checked when called."""
    if num_samples is None:
        return lambda epoch: max(int(epoch), 1)
    if callable(num_samples):
        def schedule(epoch: int) -> int:
            return _positive_int(num_samples(epoch), f"num_samples({epoch})")
        return schedule
    m = _positive_int(num_samples, "num_samples")
    return lambda epoch: m


def make_blocks(size: int, num_blocks: Any = None, block_size: Any = None,
                blocks: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """Partition ``range(size)`` into contiguous blocks (``np.array_split``): ``num_blocks`` of them, or blocks of
    ``block_size`` (the last one may be shorter); or check user-given ``blocks`` (a partition of ``range(size)``).
    Default: one datum per block."""
    if blocks is not None:
        if num_blocks is not None or block_size is not None:
            raise ValueError("give blocks, or num_blocks / block_size, not both")
        out = [np.asarray(b, dtype=np.int64).reshape(-1) for b in blocks]
        if not out or any(b.size == 0 for b in out):
            raise ValueError("blocks must be a non-empty list of non-empty index arrays")
        allidx = np.sort(np.concatenate(out))
        if allidx.size != size or not np.array_equal(allidx, np.arange(size)):
            raise ValueError(f"blocks must partition range({size}) (the data plate's indices)")
        return out
    if num_blocks is not None and block_size is not None:
        raise ValueError("give num_blocks or block_size, not both")
    if block_size is not None:
        bs = _positive_int(block_size, "block_size")
        n = -(-size // bs)
        return [np.arange(i * bs, min((i + 1) * bs, size)) for i in range(n)]
    n = size if num_blocks is None else _positive_int(num_blocks, "num_blocks")
    if n > size:
        raise ValueError(f"num_blocks={n} exceeds the {size} data of the data plate")
    return [np.asarray(b, dtype=np.int64) for b in np.array_split(np.arange(size), n)]


# ------------------------------------------------------------------------------------------------ algebra


class MISSOVIState:
    """The tables and the update rules, on flat parameter vectors of any array type (torch / JAX / NumPy).

    ``anchors[i]`` = θ^{τ_i} (MISSO only), ``grads[i]`` = ĝ_i (MISSO and MC-SAG), with running sums
    ``sum_anchors`` / ``sum_grads``; ``m`` / ``v`` / ``t`` are Adam's moments and step count."""

    def __init__(self, method: str, lr: float, num_blocks: int) -> None:
        self.method = check_method(method)
        self.lr = check_learning_rate(lr)
        self.n = _positive_int(num_blocks, "num_blocks")
        self.anchors: list[Any] = []
        self.grads: list[Any] = []
        self.sum_anchors: Any = None
        self.sum_grads: Any = None
        self.m: Any = None
        self.v: Any = None
        self.t = 0

    @property
    def uses_tables(self) -> bool:
        return self.method in ("misso", "mc-sag")

    def init_tables(self, theta0: Any, grads: Sequence[Any]) -> None:
        """Fill the tables from one pass over all blocks at θ^0 (``grads[i] = ĝ_i(θ^0)``)."""
        if len(grads) != self.n:
            raise ValueError(f"need {self.n} initial block gradients, got {len(grads)}")
        self.grads = list(grads)
        if self.method == "misso":
            self.anchors = [theta0] * self.n
        self.resum()

    def resum(self) -> None:
        """Recompute the running sums from the tables (removes round-off drift; O(n dim θ))."""
        total = self.grads[0]
        for g in self.grads[1:]:
            total = total + g
        self.sum_grads = total
        if self.method == "misso":
            total = self.anchors[0]
            for a in self.anchors[1:]:
                total = total + a
            self.sum_anchors = total

    def step(self, theta: Any, blocks: Sequence[int], grads: Sequence[Any]) -> Any:
        """One iteration at θ^k with the fresh gradients ``grads[j] = ĝ_{blocks[j]}(θ^k)``; returns θ^{k+1}."""
        theta_next, update = self.propose(theta, blocks, grads)
        self.commit(update)
        return theta_next

    def propose(self, theta: Any, blocks: Sequence[int], grads: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        """θ^{k+1} and the new table rows, sums and moments of one iteration, the state left unchanged (``blocks``
        distinct): :meth:`commit` stores them, so that a NaN θ^{k+1} or an interruption leaves the state of θ^k."""
        update: dict[str, Any] = {}
        if self.uses_tables:
            misso = self.method == "misso"
            sum_grads, sum_anchors = self.sum_grads, self.sum_anchors
            for i, g in zip(blocks, grads):
                sum_grads = sum_grads + (g - self.grads[i])
                if misso:
                    sum_anchors = sum_anchors + (theta - self.anchors[i])
            update = {"rows": list(zip(blocks, grads)), "theta": theta, "sum_grads": sum_grads,
                      "sum_anchors": sum_anchors}
            if misso:
                return sum_anchors / self.n - (self.lr / self.n) * sum_grads, update
            return theta - (self.lr / self.n) * sum_grads, update
        g = grads[0]
        for other in grads[1:]:
            g = g + other
        if len(grads) > 1:
            g = g / len(grads)
        if self.method == "bbb":
            return theta - self.lr * g, update
        b1, b2 = ADAM_BETAS
        t = self.t + 1
        m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
        v = (1 - b2) * g * g if self.v is None else b2 * self.v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        return theta - self.lr * m_hat / (v_hat ** 0.5 + ADAM_EPS), {"m": m, "v": v, "t": t}

    def commit(self, update: dict[str, Any]) -> None:
        """Store what :meth:`propose` computed."""
        if self.uses_tables:
            for i, g in update["rows"]:
                self.grads[i] = g
                if self.method == "misso":
                    self.anchors[i] = update["theta"]
            self.sum_grads = update["sum_grads"]
            self.sum_anchors = update["sum_anchors"]
        elif update:
            self.m, self.v, self.t = update["m"], update["v"], update["t"]


# ------------------------------------------------------------------------------------------------- driver


class MISSOVIRecord(NamedTuple):
    """What a checkpoint of a MISSO-VI fit holds (:mod:`latentfit.checkpoint`, field by field): θ^k, the tables
    (``grads`` / ``anchors`` stacked ``[n, dim θ]``, None where the method keeps none) with their running sums, Adam's
    ``m`` / ``v`` / ``t``, the iterations done ``iteration`` (k) and epochs closed ``epoch``, the state of the
    block-choosing NumPy generator (:func:`pcg64_words`) and the oracle's random stream (Pyro: ``torch.Generator``s;
    NumPyro: its key and call counter)."""

    theta: Any
    grads: Any
    anchors: Any
    sum_grads: Any
    sum_anchors: Any
    m: Any
    v: Any
    t: int
    iteration: int
    epoch: int
    blocks_rng: np.ndarray
    stream: Any


_MASK64 = (1 << 64) - 1


def pcg64_words(rng: np.random.Generator) -> np.ndarray:
    """The state of NumPy's PCG64 generator ``rng`` as 6 uint64 words (state and increment, 128 bits each, and the
    buffered 32-bit half)."""
    st = rng.bit_generator.state
    if st.get("bit_generator") != "PCG64":
        raise TypeError(f"the block choice draws from PCG64, not {st.get('bit_generator')}")
    s, inc = int(st["state"]["state"]), int(st["state"]["inc"])
    return np.array([s >> 64, s & _MASK64, inc >> 64, inc & _MASK64, int(st["has_uint32"]), int(st["uinteger"])],
                    dtype=np.uint64)


def set_pcg64_words(rng: np.random.Generator, words: np.ndarray) -> None:
    """Put the state :func:`pcg64_words` wrote back into ``rng``."""
    w = [int(x) for x in np.asarray(words, dtype=np.uint64).reshape(-1)]
    if len(w) != 6:
        raise ValueError(f"the checkpoint's block-choice generator state has {len(w)} words, not 6")
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": (w[0] << 64) | w[1],
                                                                   "inc": (w[2] << 64) | w[3]},
                               "has_uint32": w[4], "uinteger": w[5]}


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back while the state is written (a few assignments), raising it afterwards: an
    interruption then finds the state of a whole iteration.  Only in the main thread under Python's default handler
    (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class Backend(NamedTuple):
    """What the checkpoint machinery and the loop need to know of the oracle's arrays: ``name`` (``"torch"`` /
    ``"jax"``, the checkpoint's backend), ``xp`` (``torch`` / ``jax.numpy``: ``stack``), ``device``."""

    name: str
    xp: Any
    device: Any = None


class MISSOVIProblem:
    """The fit's data as a checkpoint records them: the model's arguments (``data_arrays``: their SHA-256,
    :func:`latentfit.checkpoint.data_digest`) and ``data_shapes`` (the data plate's size as ``num_units`` and the
    unconstrained shape of every parameter), compared on resume."""

    def __init__(self, args: tuple, kwargs: dict, size: int, params: dict[str, list[int]]) -> None:
        self.args, self.kwargs, self.size, self.params = args, kwargs, int(size), dict(params)

    def data_arrays(self) -> dict[str, Any]:
        return {"args": self.args, "kwargs": self.kwargs}

    def data_shapes(self) -> dict[str, Any]:
        return {"num_units": self.size, "latent_dim": 0, "params": {k: list(v) for k, v in self.params.items()}}


class MISSOVIEngine:
    """One MISSO-VI fit: the loop over epochs and iterations, with checkpoints, resume and faults as the other engines
    have them (:meth:`run`).  Its public attributes are the options a checkpoint records and a resume compares
    (:func:`latentfit.checkpoint.engine_options`): ``num_epochs`` is not among them, so a finished or interrupted fit
    can be continued for more epochs."""

    name = "MISSOVI"

    def __init__(self, oracle: BlockOracle, theta0: Any, blocks: Sequence[np.ndarray], problem: MISSOVIProblem, *,
                 method: str, learning_rate: float, num_epochs: int, schedule: Callable[[int], int], seed: int,
                 blocks_per_iter: int = 1, record: bool = False, track_loss: bool = True,
                 callback: Callable[[int, dict[str, Any]], Any] | None = None,
                 params_of: Callable[[Any], dict[str, Any]] = dict,
                 to_numpy: Callable[[Any], np.ndarray] = np.asarray, options: dict[str, Any] | None = None) -> None:
        n = len(blocks)
        b = _positive_int(blocks_per_iter, "blocks_per_iter")
        if b > n:
            raise ValueError(f"blocks_per_iter={b} exceeds the number of blocks {n}")
        self.method = check_method(method)
        self.learning_rate = check_learning_rate(learning_rate)
        self.seed = int(seed)
        self.blocks_per_iter = b
        self.num_blocks = n
        h = hashlib.sha256()
        for blk in blocks:
            h.update(np.asarray(blk, dtype=np.int64).tobytes() + b";")
        self.blocks_sha256 = h.hexdigest()
        self.record, self.track_loss = bool(record), bool(track_loss)
        for key, value in (options or {}).items():
            setattr(self, key, value)
        self.callback = callback
        self.model = problem
        self.ops = oracle.ops
        self._oracle, self._theta0, self._blocks = oracle, theta0, list(blocks)
        self._num_epochs = _positive_int(num_epochs, "num_epochs")
        self._schedule, self._params_of, self._to_numpy = schedule, params_of, to_numpy
        self._iters_per_epoch = -(-n // b)

    @property
    def num_iterations(self) -> int:
        return self._num_epochs * self._iters_per_epoch

    def phases(self) -> list[tuple[int, int, Any]]:
        return []

    # ----- the run -------------------------------------------------------------------------------
    def run(self, *, checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
            keep: int = 3, resume: str | os.PathLike | bool | None = None) -> MISSOVIResult:
        """Run ``num_epochs`` epochs (from a checkpoint when resuming); returns a :class:`MISSOVIResult`.

        ``checkpoint``: a directory where the state (:class:`MISSOVIRecord`) and the history are written after every
        ``checkpoint_every`` epochs (default 1) and at the end, keeping the last ``keep``; files ``ckpt-<k>.*`` are
        named by the iterations done.  ``resume``: a directory (its latest intact checkpoint) or a checkpoint file,
        or True (``checkpoint``'s, when it holds one, else start afresh); the checkpoint must be of the same method,
        options, data (SHA-256) and library version.  The resumed fit equals the uninterrupted one bit for bit.
        ``KeyboardInterrupt`` returns the state after the last whole iteration (``interrupted=True``; checkpointed
        when ``checkpoint`` is given); a NaN/inf θ raises :class:`~latentfit.NonFiniteError` after checkpointing the
        state before that iteration (in ``checkpoint``, else a temporary directory)."""
        from latentfit.checkpoint import begin_run_digest, resume_source

        start = time.perf_counter()
        begin_run_digest(self, compute=checkpoint is not None or resume not in (None, False))
        source = resume_source(checkpoint, resume)
        every = 1 if checkpoint_every is None else checkpoint_every
        if checkpoint is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral)
                                       or every < 1 or isinstance(keep, bool) or not isinstance(keep, numbers.Integral)
                                       or keep < 1):
            raise ValueError(f"checkpoint_every and keep must be >= 1, got {checkpoint_every} and {keep}")
        oracle, blocks, n, b = self._oracle, self._blocks, self.num_blocks, self.blocks_per_iter
        rng = np.random.default_rng(self.seed)
        state = MISSOVIState(self.method, self.learning_rate, n)
        history: dict[str, list[Any]] = {"loss": [], "num_samples": []}
        trace: dict[str, list[Any]] = {"theta": [], "blocks": []}
        if source is None:
            theta, k, epoch = self._theta0, 0, 0
            if self.record:
                trace["theta"].append(self._to_numpy(theta))
            if self.track_loss:
                history["loss"].append(float(oracle.loss(theta)))
            if state.uses_tables:
                m0 = self._schedule(1)
                state.init_tables(theta, [oracle.grad(theta, blk, m0) for blk in blocks])
        else:
            theta, k, epoch = self._restore(source, state, rng, history, trace)
        total, ipe = self.num_iterations, self._iters_per_epoch
        last_saved = k if source is not None else -1
        interrupted = False
        pending: tuple[Any, Any] | None = None  # (block generator, stream) before the iteration under way
        try:
            while epoch < self._num_epochs:
                e = epoch + 1
                m = self._schedule(e)
                while k < e * ipe:
                    pending = (rng.bit_generator.state, oracle.get_stream())
                    chosen = [int(i) for i in (rng.integers(n, size=1) if b == 1
                                               else rng.choice(n, size=b, replace=False))]
                    grads = [oracle.grad(theta, blocks[i], m) for i in chosen]
                    theta_next, update = state.propose(theta, chosen, grads)
                    if not oracle.finite(theta_next):
                        self._rewind(rng, pending)
                        pending = None
                        raise self._nonfinite_error(theta_next, state, theta, k, epoch, rng, history, trace,
                                                    checkpoint, keep, start)
                    with _uninterrupted():
                        state.commit(update)
                        theta = theta_next
                        k += 1
                        if self.record:
                            trace["theta"].append(self._to_numpy(theta))
                            trace["blocks"].append(chosen)
                        pending = None
                # the epoch's end: running sums recomputed from the tables, the loss (which draws from the stream)
                pending = (rng.bit_generator.state, oracle.get_stream())
                loss = float(oracle.loss(theta)) if self.track_loss else None
                with _uninterrupted():
                    if state.uses_tables:
                        state.resum()
                    history["num_samples"].append(m)
                    if loss is not None:
                        history["loss"].append(loss)
                    epoch = e
                    pending = None
                if checkpoint is not None and (epoch % every == 0 or epoch == self._num_epochs):
                    self._save(checkpoint, state, theta, k, epoch, rng, history, trace, keep)
                    last_saved = k
                if self.callback is not None and self._stop_asked(epoch, loss, m, k):
                    if checkpoint is not None and last_saved != k:
                        self._save(checkpoint, state, theta, k, epoch, rng, history, trace, keep)
                    break
        except KeyboardInterrupt:
            if pending is not None:
                self._rewind(rng, pending)
            interrupted = True
            where = ""
            if checkpoint is not None and k > last_saved:
                path = self._save(checkpoint, state, theta, k, epoch, rng, history, trace, keep)
                where = f"; checkpoint {str(path)!r} (run(resume=...) continues)"
            warnings.warn(f"{self.name}: interrupted; the result holds the last good state, after iteration {k} of "
                          f"{total}, and the history so far (fit.interrupted is True){where}", RuntimeWarning,
                          stacklevel=user_stacklevel())
        return self._result(theta, k, history, trace, start, interrupted)

    def _stop_asked(self, epoch: int, loss: Any, m: int, k: int) -> bool:
        """Call ``callback(epoch, record)``; whether it asked the fit to stop after this epoch (it returned True or
        raised ``StopIteration``, as the driver's engines' callbacks do:
        :func:`~latentfit.inference.driver.callback_stops`)."""
        from .driver import callback_stops

        try:
            return callback_stops(self.callback(epoch, {"loss": loss, "num_samples": m, "iteration": k}))
        except StopIteration:
            return True

    def _rewind(self, rng: np.random.Generator, pending: tuple[Any, Any]) -> None:
        """Put the block generator and the oracle's stream back as they were before the unfinished iteration."""
        rng.bit_generator.state = pending[0]
        self._oracle.set_stream(pending[1])

    def _result(self, theta: Any, k: int, history: dict[str, list[Any]], trace: dict[str, list[Any]], start: float,
                interrupted: bool) -> MISSOVIResult:
        hist = {"loss": list(history["loss"]), "num_samples": list(history["num_samples"])}
        out = {"theta": list(trace["theta"]), "blocks": list(trace["blocks"])} if self.record else None
        return MISSOVIResult(params=self._params_of(theta), history=hist, time=time.perf_counter() - start,
                             method=self.method, num_iters=k, theta=theta, trace=out, interrupted=interrupted)

    # ----- faults --------------------------------------------------------------------------------
    def _nonfinite_error(self, theta_next: Any, state: MISSOVIState, theta: Any, k: int, epoch: int,
                         rng: np.random.Generator, history: dict[str, list[Any]], trace: dict[str, list[Any]],
                         checkpoint: Any, keep: int, start: float) -> Exception:
        """Checkpoint the state after iteration ``k`` (the last good one) and build the error naming the parameter
        whose entry of θ^{k+1} is NaN/inf."""
        from latentfit.inference.model import NonFiniteError

        values = np.asarray(self._to_numpy(theta_next)).reshape(-1)
        first = int(np.argmax(~np.isfinite(values)))
        name = next((nm for nm, lo, hi in self._oracle.param_slices() if lo <= first < hi), f"theta[{first}]")
        directory = checkpoint if checkpoint is not None else tempfile.mkdtemp(prefix="latentfit-nonfinite-")
        path = self._save(directory, state, theta, k, epoch, rng, history, trace, keep)
        result = self._result(theta, k, history, trace, start, True)
        msg = (f"{self.name}: the unconstrained value of parameter {name!r} is NaN/inf at iteration {k + 1}; the fit "
               f"stopped. The last good state (iteration {k}) is checkpointed at {str(path)!r} (run(resume=...) "
               "continues from it; the exception's .result holds it). Check the model for values that overflow or "
               "leave the domain (log/sqrt of a quantity that can be <= 0, a variance that can reach 0) and the data "
               "for outliers, or use a smaller learning_rate.")
        return NonFiniteError(msg, parameter=name, iteration=k + 1, last_good_iteration=k, checkpoint=path,
                              result=result)

    # ----- checkpoints ---------------------------------------------------------------------------
    def _record(self, state: MISSOVIState, theta: Any, k: int, epoch: int, rng: np.random.Generator) -> MISSOVIRecord:
        xp = self.ops.xp
        tables = state.uses_tables and bool(state.grads)
        return MISSOVIRecord(
            theta=theta, grads=xp.stack(state.grads) if tables else None,
            anchors=xp.stack(state.anchors) if tables and self.method == "misso" else None,
            sum_grads=state.sum_grads, sum_anchors=state.sum_anchors, m=state.m, v=state.v, t=int(state.t),
            iteration=int(k), epoch=int(epoch), blocks_rng=pcg64_words(rng), stream=self._oracle.get_stream())

    def _save(self, directory: Any, state: MISSOVIState, theta: Any, k: int, epoch: int, rng: np.random.Generator,
              history: dict[str, list[Any]], trace: dict[str, list[Any]], keep: int) -> Any:
        from latentfit.checkpoint import save_checkpoint

        arrays = {"loss": [np.float64(x) for x in history["loss"]],
                  "num_samples": [np.int64(x) for x in history["num_samples"]],
                  "trace_theta": [np.asarray(x) for x in trace["theta"]],
                  "trace_blocks": [np.asarray(x, dtype=np.int64) for x in trace["blocks"]]}
        arrays = {name: rows for name, rows in arrays.items() if rows}  # an empty entry is not stored
        return save_checkpoint(directory, self, self._record(state, theta, k, epoch, rng), k, arrays, [],
                               keep=int(keep))

    def _restore(self, source: Any, state: MISSOVIState, rng: np.random.Generator, history: dict[str, list[Any]],
                 trace: dict[str, list[Any]]) -> tuple[Any, int, int]:
        """Load and check a checkpoint and put its state into ``state``, ``rng``, the oracle's stream, ``history``
        and ``trace``; returns ``(θ, iterations done, epochs closed)``."""
        from latentfit.checkpoint import load_checkpoint, restore_state

        ckpt = load_checkpoint(source)
        ckpt.check_compatible(self)
        d = int(self._theta0.shape[0])
        shape = np.broadcast_to(np.zeros((), np.uint8), (self.num_blocks, d))  # the tables' shape (no memory)
        template = MISSOVIRecord(theta=self._theta0, grads=shape if state.uses_tables else None,
                                 anchors=shape if self.method == "misso" else None, sum_grads=None, sum_anchors=None,
                                 m=None, v=None, t=0, iteration=0, epoch=0, blocks_rng=np.zeros(6, np.uint64),
                                 stream=self._oracle.get_stream())
        rec = restore_state(template, ckpt.meta["state"], ckpt.tensors, self.ops)
        k, epoch = int(rec.iteration), int(rec.epoch)
        if k != ckpt.iteration or not epoch * self._iters_per_epoch <= k <= (epoch + 1) * self._iters_per_epoch:
            raise ValueError(f"the checkpoint's state is at iteration {k}, epoch {epoch}, its sidecar says iteration "
                             f"{ckpt.iteration}: the checkpoint was altered")
        if k > self.num_iterations:
            raise ValueError(f"{self.name}: the checkpoint is at iteration {k} (epoch {epoch}), past this run's "
                             f"{self.num_iterations} iterations (num_epochs={self._num_epochs}); pass a larger "
                             "num_epochs to continue it")
        if state.uses_tables:
            state.grads = list(rec.grads)
            if self.method == "misso":
                state.anchors = list(rec.anchors)
        state.sum_grads, state.sum_anchors = rec.sum_grads, rec.sum_anchors
        state.m, state.v, state.t = rec.m, rec.v, int(rec.t)
        set_pcg64_words(rng, rec.blocks_rng)
        self._oracle.set_stream(rec.stream)
        saved = ckpt.history
        history["loss"] = [float(x) for x in saved.get("loss", [])]
        history["num_samples"] = [int(x) for x in saved.get("num_samples", [])]
        trace["theta"] = [np.array(x) for x in saved.get("trace_theta", [])]
        trace["blocks"] = [[int(i) for i in x] for x in saved.get("trace_blocks", [])]
        return rec.theta, k, epoch


# ------------------------------------------------------------------------------------------ front door


class MISSOVIBase:
    """Option checks shared by the Pyro and NumPyro front doors (see :mod:`latentfit.pyro`'s ``MISSOVI``)."""

    ppl_name = "?"

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any] | None = None, *,
                 num_blocks: int | None = None, block_size: int | None = None,
                 blocks: Sequence[Sequence[int]] | None = None, method: str = "misso",
                 learning_rate: float = 1e-3, num_samples: int | Callable[[int], int] | None = None,
                 num_epochs: int = 10, seed: int = 0, plate: str | None = None, blocks_per_iter: int = 1,
                 loss_particles: int = 10, track_loss: bool = True, record: bool = False,
                 callback: Callable[[int, dict[str, Any]], Any] | None = None) -> None:
        if not callable(model):
            raise TypeError(f"MISSOVI needs a {self.ppl_name} model function, got {type(model).__name__}")
        if guide is None:
            raise ValueError(f"MISSOVI needs a guide (the variational family q(w; θ)), e.g. "
                             f"{self.ppl_name.lower()}.infer.autoguide.AutoNormal(model), or a guide function with "
                             f"{self.ppl_name.lower()}.param sites")
        if not callable(guide):
            raise TypeError(f"the guide must be callable, got {type(guide).__name__}")
        self.model = model
        self.guide = guide
        self.method = check_method(method)
        self.learning_rate = check_learning_rate(learning_rate)
        self.schedule = num_samples_schedule(num_samples)
        self.num_epochs = _positive_int(num_epochs, "num_epochs")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        if plate is not None and not isinstance(plate, str):
            raise ValueError(f"plate must be the name of the model's data plate, got {plate!r}")
        self.plate = plate
        if num_blocks is not None and block_size is not None:
            raise ValueError("give num_blocks or block_size, not both")
        if num_blocks is not None:
            _positive_int(num_blocks, "num_blocks")
        if block_size is not None:
            _positive_int(block_size, "block_size")
        self.num_blocks, self.block_size, self.blocks = num_blocks, block_size, blocks
        self.blocks_per_iter = _positive_int(blocks_per_iter, "blocks_per_iter")
        self.loss_particles = _positive_int(loss_particles, "loss_particles")
        self.track_loss = bool(track_loss)
        self.record = bool(record)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(epoch, record), got {type(callback).__name__}")
        self.callback = callback
        self._num_samples = num_samples

    def _blocks(self, size: int) -> list[np.ndarray]:
        return make_blocks(size, self.num_blocks, self.block_size, self.blocks)

    def _run_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Take ``run``'s own options (:data:`RUN_OPTIONS`) out of the model's keyword arguments."""
        return {k: kwargs.pop(k) for k in RUN_OPTIONS if k in kwargs}

    def _engine(self, oracle: BlockOracle, theta0: Any, blocks: list[np.ndarray], problem: MISSOVIProblem,
                params_of: Callable[[Any], dict[str, Any]], to_numpy: Callable[[Any], np.ndarray],
                **options: Any) -> MISSOVIEngine:
        """The fit of these options on ``oracle`` (``options``: the PPL's own, recorded in checkpoints)."""
        spec = self._num_samples
        num_samples = spec if spec is None or isinstance(spec, numbers.Integral) else \
            f"callable {getattr(spec, '__qualname__', type(spec).__name__)}"
        recorded = {"ppl": self.ppl_name, "num_samples": num_samples, "loss_particles": self.loss_particles,
                    **options}
        return MISSOVIEngine(oracle, theta0, blocks, problem, method=self.method, learning_rate=self.learning_rate,
                             num_epochs=self.num_epochs, schedule=self.schedule, seed=self.seed,
                             blocks_per_iter=self.blocks_per_iter, record=self.record, track_loss=self.track_loss,
                             callback=self.callback, params_of=params_of, to_numpy=to_numpy, options=recorded)


#: keyword arguments of ``MISSOVI.run`` that are the fit's (checkpoints), not the model's
RUN_OPTIONS = ("checkpoint", "checkpoint_every", "keep", "resume")


def find_data_plate(plates: dict[str, tuple[int, int | None]], name: str | None) -> tuple[str, int]:
    """Pick the data plate among the model's plates ``{name: (size, subsample_size)}``: ``name`` when given,
    else ``"data"``, else the only plate. A subsampled plate is refused (MISSOVI chooses the blocks)."""
    if name is None:
        if "data" in plates:
            name = "data"
        elif len(plates) == 1:
            name = next(iter(plates))
        else:
            raise ValueError("MISSOVI needs the model's data plate: name it 'data' or pass plate=<its name>; "
                             f"the model has plates {sorted(plates)}")
    if name not in plates:
        raise ValueError(f"the model has no plate named {name!r} (its plates: {sorted(plates)}); MISSOVI splits "
                         "the data plate into blocks")
    size, subsample_size = plates[name]
    if subsample_size is not None and subsample_size < size:
        raise ValueError(f"plate {name!r} is subsampled (subsample_size={subsample_size} < {size}); write the model "
                         "over all its data (a plate of full size) and let MISSOVI choose the blocks")
    return name, int(size)
