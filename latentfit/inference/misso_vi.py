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
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

METHODS = ("misso", "mc-sag", "mc-adam", "bbb")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class BlockOracle(Protocol):
    """What a PPL adapter provides: flat unconstrained parameters and per-block Monte-Carlo gradients."""

    def grad(self, theta: Any, block: np.ndarray, num_samples: int) -> Any:
        """``ĝ_i(θ)``: the reparameterised gradient of ``L_i`` at the flat vector ``θ`` (``num_samples`` draws)."""

    def loss(self, theta: Any) -> float:
        """The full negative ELBO ``Σ_i L_i(θ)`` (a fixed number of particles)."""


@dataclass
class MISSOVIResult:
    """Result of :class:`MISSOVI`: ``params`` (constrained guide / model params), ``history["loss"]`` (full
    negative ELBO at θ^0 and after each epoch), ``time`` (seconds), ``theta`` (final flat unconstrained vector)
    and, with ``record=True``, ``trace`` (``theta``: θ^0, θ^1, …; ``blocks``: the block indices of each
    iteration)."""

    params: dict[str, Any]
    history: dict[str, list[float]]
    time: float
    method: str
    num_iters: int
    theta: Any = None
    trace: dict[str, list[Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        loss = self.history.get("loss", [])
        last = f"{loss[-1]:.4g}" if loss else "n/a"
        return (f"MISSOVIResult(method={self.method!r}, num_iters={self.num_iters}, final loss={last}, "
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
        if self.uses_tables:
            for i, g in zip(blocks, grads):
                self.sum_grads = self.sum_grads + (g - self.grads[i])
                self.grads[i] = g
                if self.method == "misso":
                    self.sum_anchors = self.sum_anchors + (theta - self.anchors[i])
                    self.anchors[i] = theta
            if self.method == "misso":
                return self.sum_anchors / self.n - (self.lr / self.n) * self.sum_grads
            return theta - (self.lr / self.n) * self.sum_grads
        g = grads[0]
        for other in grads[1:]:
            g = g + other
        if len(grads) > 1:
            g = g / len(grads)
        if self.method == "bbb":
            return theta - self.lr * g
        b1, b2 = ADAM_BETAS
        self.t += 1
        self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
        self.v = (1 - b2) * g * g if self.v is None else b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        return theta - self.lr * m_hat / (v_hat ** 0.5 + ADAM_EPS)


# ------------------------------------------------------------------------------------------------- driver


def run_misso_vi(oracle: BlockOracle, theta0: Any, blocks: Sequence[np.ndarray], *, method: str, lr: float,
                 num_epochs: int, schedule: Callable[[int], int], rng: np.random.Generator,
                 blocks_per_iter: int = 1, record: bool = False, track_loss: bool = True,
                 to_numpy: Callable[[Any], np.ndarray] = np.asarray) -> tuple[Any, dict[str, Any], int]:
    """Run ``num_epochs`` epochs of ``method`` from ``theta0``; returns (θ, history, number of iterations).

    ``history["loss"]`` is ``oracle.loss`` at θ^0 and after each epoch (when ``track_loss``),
    ``history["num_samples"]`` the ``M_k`` of each epoch; with ``record`` also ``history["trace"]``."""
    n = len(blocks)
    b = _positive_int(blocks_per_iter, "blocks_per_iter")
    if b > n:
        raise ValueError(f"blocks_per_iter={b} exceeds the number of blocks {n}")
    state = MISSOVIState(method, lr, n)
    iters_per_epoch = -(-n // b)
    theta = theta0
    history: dict[str, Any] = {"loss": [], "num_samples": []}
    trace: dict[str, list[Any]] = {"theta": [to_numpy(theta)], "blocks": []}
    if track_loss:
        history["loss"].append(float(oracle.loss(theta)))
    if state.uses_tables:
        m0 = schedule(1)
        state.init_tables(theta, [oracle.grad(theta, blk, m0) for blk in blocks])
    k = 0
    for epoch in range(1, num_epochs + 1):
        m = schedule(epoch)
        history["num_samples"].append(m)
        for _ in range(iters_per_epoch):
            chosen = [int(i) for i in (rng.integers(n, size=1) if b == 1 else rng.choice(n, size=b, replace=False))]
            grads = [oracle.grad(theta, blocks[i], m) for i in chosen]
            theta = state.step(theta, chosen, grads)
            k += 1
            if record:
                trace["theta"].append(to_numpy(theta))
                trace["blocks"].append(chosen)
        if state.uses_tables:
            state.resum()
        if track_loss:
            history["loss"].append(float(oracle.loss(theta)))
    if record:
        history["trace"] = trace
    return theta, history, k


def fit(oracle: BlockOracle, theta0: Any, blocks: Sequence[np.ndarray], *, method: str, lr: float,
        num_epochs: int, schedule: Callable[[int], int], seed: int, blocks_per_iter: int, record: bool,
        track_loss: bool, params_of: Callable[[Any], dict[str, Any]],
        to_numpy: Callable[[Any], np.ndarray]) -> MISSOVIResult:
    """Time :func:`run_misso_vi` and wrap its output in a :class:`MISSOVIResult`."""
    start = time.perf_counter()
    theta, history, k = run_misso_vi(oracle, theta0, blocks, method=method, lr=lr, num_epochs=num_epochs,
                                     schedule=schedule, rng=np.random.default_rng(seed),
                                     blocks_per_iter=blocks_per_iter, record=record, track_loss=track_loss,
                                     to_numpy=to_numpy)
    trace = history.pop("trace", None)
    params = params_of(theta)
    return MISSOVIResult(params=params, history=history, time=time.perf_counter() - start, method=method,
                         num_iters=k, theta=theta, trace=trace)


# ------------------------------------------------------------------------------------------ front door


class MISSOVIBase:
    """Option checks shared by the Pyro and NumPyro front doors (see :mod:`latentfit.pyro`'s ``MISSOVI``)."""

    ppl_name = "?"

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any] | None = None, *,
                 num_blocks: int | None = None, block_size: int | None = None,
                 blocks: Sequence[Sequence[int]] | None = None, method: str = "misso",
                 learning_rate: float = 1e-3, num_samples: int | Callable[[int], int] | None = None,
                 num_epochs: int = 10, seed: int = 0, plate: str | None = None, blocks_per_iter: int = 1,
                 loss_particles: int = 10, track_loss: bool = True, record: bool = False) -> None:
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

    def _blocks(self, size: int) -> list[np.ndarray]:
        return make_blocks(size, self.num_blocks, self.block_size, self.blocks)


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
