"""Backend shim: the only place where torch and JAX differ for the engines and the model families.

Engines and models touch arrays through an :class:`Ops` object: ``xp`` (the array namespace), random
draws from explicit keys, functional scatter, autodiff, and a loop primitive.  Torch and JAX
differ in RNG (global generator vs. PRNG keys), in-place updates (``index_copy`` vs. ``.at[]``)
and autodiff (``torch.autograd`` vs. ``jax.grad``); everything else is plain ``xp`` math.  Each
primitive whose spelling differs between the libraries is a method here, implemented once per backend
with the library's own function: Student-t draws, forward-mode ``jvp`` / ``jacfwd``, per-row
value/gradient/Hessian, ``logsumexp``, ``solve_triangular``, the special functions (``logit``, ``ndtri``,
``log_ndtr``, ...), stable ``argsort`` and ``take_along_axis``, ``fori_loop``.  What is plain ``xp`` math
is written once on :class:`Ops` (the unrolled small Cholesky, the Gaussian log-density).  Nothing
outside this module and ``ops_jax`` asks which library an array comes from: :func:`ops_for` picks the
shim of an array, :func:`make_ops` that of a backend name, :func:`select` is ``where`` for scalars of
either backend (step-size schedules).

Random streams are explicit on both backends: a JAX PRNG key, or a ``torch.Generator`` on the device of the
model's data.  A generator is a sequential stream, so on torch ``split(key, n)`` hands out the same generator
``n`` times (its subkeys are consumed in program order) and :meth:`Ops.own_key` copies it where a pure step
starts (the caller's generator never advances).  Draws that only a library's global RNG can make (a Pyro model
run to sample its latents, ``torch.distributions`` samplers without a ``generator=``) go through
:meth:`TorchOps.global_rng_from`, which lends the key's state to torch's global generator and takes it back, so
torch's and Pyro's global RNG state is the same after a fit as before it.  A ``None`` key (post-fit helpers
inside :meth:`Ops.seed_context`) still means torch's global generator.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import numpy as np

#: ``log 2π`` (Gaussian normalising constants)
LOG_2PI = math.log(2.0 * math.pi)
#: backend names accepted by :func:`make_ops`
BACKENDS = ("torch", "jax")
#: optimiser names every backend accepts (:meth:`Ops.optimizer`)
OPTIMIZERS = ("sgd", "adam", "amsgrad", "opt-amsgrad")


class FlatOptimizer(NamedTuple):
    """A functional ascent optimiser over one flat vector: ``init(x) -> s``, ``update(g, s, x) -> (x', s')``."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]


#: Philox-4x32 round multipliers and key increments (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as
#: easy as 1, 2, 3", SC 2011; the Random123 library's constants)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF
#: the last counter word separates the domains of the counter-based streams (:meth:`TorchOps.fold_in`, per-unit
#: draws, draws shared by all units), so that no two of them ever evaluate Philox at the same counter
_TAG_SHARED, _TAG_UNIT, _TAG_FOLD = 0, 1, 2


def _mulhilo32(a: Any, m: int) -> tuple[Any, Any]:
    """High and low 32-bit words of ``a · m`` for int64 arrays ``a < 2³²`` and a constant ``m < 2³²``.

    ``m`` is split in 16-bit halves so that every partial product stays below 2⁴⁹ (no int64 overflow).
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    t = ((p_hi & 0xFFFF) << 16) + p_lo
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32(counter: tuple[Any, Any, Any, Any], key: tuple[Any, Any], rounds: int = 10) -> tuple[Any, ...]:
    """Philox-4x32-``rounds`` on int64 arrays holding 32-bit words (any array library with ``& ^ >> <<``).

    A bijection of the 128-bit counter for each 64-bit key: word ``i`` of the output is uniform on
    ``[0, 2³²)`` and outputs at distinct (counter, key) are independent for all practical purposes
    (it passes BigCrush).  Random123's known-answer vectors are tested in ``tests/test_rng_streams.py``.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


class Ops:
    """Interface of the backend shim (see :class:`TorchOps` and ``JaxOps``)."""

    name: str = "abstract"
    xp: Any = None
    #: True when engine steps can be traced and compiled (JAX).
    jittable: bool = False
    #: True when the driver may dispatch a chunk before it records the previous one (``JaxOps``: immutable arrays,
    #: asynchronous dispatch); False where a step may write its state in place (torch)
    dispatches_ahead: bool = False
    #: seconds spent compiling engine steps (cumulative; stays 0 on eager backends)
    compile_time: float = 0.0
    #: values of the largest ``[..., n, T]`` temporary that an eager evaluation over ``n`` units creates before it
    #: goes over blocks of units (:meth:`unit_blocks`); None: never (compiled programs fuse element-wise chains and
    #: create no such temporaries)
    unit_block_values: int | None = None

    def computed_once(self, f: Callable[..., Any], key: Any, *args: Any) -> Any:
        """``f(key, *args)``, which a compiled program computes once into memory for all its readers (JAX:
        :meth:`~latentfit.inference.ops_jax.JaxOps.computed_once`); ``key``: an unsigned integer array (a PRNG key's
        data) that ``f`` reads."""
        return f(key, *args)

    def unit_blocks(self, n: int, values_per_unit: int) -> list[slice] | None:
        """Contiguous blocks of the ``n`` units over which an eager evaluation of ``values_per_unit`` values per unit
        keeps each temporary within :attr:`unit_block_values` (so that its memory does not grow with N); None when
        one block (all units) fits, or when the backend compiles."""
        cap = self.unit_block_values
        if cap is None or n * values_per_unit <= cap:
            return None
        size = max(1, cap // max(1, values_per_unit))
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    # --- creation -----------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.asarray(np.zeros(shape), dtype=dtype)

    def ones(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.asarray(np.ones(shape), dtype=dtype)

    def arange(self, n: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def placed_like(self, values: dict[str, np.ndarray], like: Any) -> dict[str, Any]:
        """Host arrays ``values`` as backend arrays placed where the arrays of ``like`` (a pytree) are (here: the
        backend's device, as :meth:`asarray` places them)."""
        return {k: self.asarray(v) for k, v in values.items()}

    def shape_of(self, f: Callable, *args: Any) -> tuple[int, ...]:
        """The shape of ``f(*args)`` (a backend that can infers it without computing: no program to run)."""
        return tuple(np.shape(f(*args)))

    def read_block(self, x: Any, start: Any, size: int, axis: int = 0) -> Any:
        """``x[start:start + size]`` along ``axis`` to be read at once: a view where the backend has views (the caller
        reads it before ``x`` is next written), else :meth:`take_block`."""
        return self.take_block(x, start, size, axis)

    # --- functional updates of owned buffers ------------------------------------------------------
    def scatter_owned(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[idx] = rows`` where the caller owns ``table`` and never reads the old value again.

        Semantics are functional (use the returned array); a backend may update in place. Under
        ``jit`` JAX's ``.at[].set`` in a loop carry is already in place, so the default is ``scatter``.
        Used by the per-unit statistic tables of the incremental EM engines (one row update per
        mini-batch must not copy an n-row table).
        """
        return self.scatter(table, idx, rows)

    # --- threads ------------------------------------------------------------------------------
    def iteration_threads(self, elements: int) -> Any:
        """Context in which an engine runs its iterations over arrays of about ``elements`` entries (nothing to do
        here; torch on CPU: one intra-op thread for a small problem, :meth:`TorchOps.iteration_threads`)."""
        return contextlib.nullcontext()

    # --- random -------------------------------------------------------------------------------
    def seed_context(self, seed: int) -> Any:
        """Context manager making the backend's draws reproducible inside (nothing to do with explicit keys)."""
        return contextlib.nullcontext()

    def own_key(self, key: Any) -> Any:
        """A key a pure step may consume without changing ``key`` (JAX keys are values: ``key`` itself)."""
        return key

    def global_rng_from(self, key: Any) -> Any:
        """Context in which a library's own global-RNG draws come from ``key`` (JAX: nothing to do)."""
        return contextlib.nullcontext()

    #: dtype in which MCMC normal draws are cheapest when the model accepts draws narrower than its arrays (JAX:
    #: ``"float32"``, float64 normals cost about a third of an NLME SAEM iteration); None: the arrays' own dtype
    fast_draw_dtype: str | None = None

    def with_draw_dtype(self, dtype: Any) -> Any:
        """A view of this shim whose normal draws are made in ``dtype`` (JAX: ``JaxOps.with_draw_dtype``); the arrays'
        own dtype (or None) is this shim."""
        if dtype is None or str(dtype).replace("torch.", "") == str(getattr(self, "dtype", "")).replace("torch.", ""):
            return self
        raise ValueError(f"draw_dtype={dtype!r}: normal draws in another dtype than the model's arrays are a JAX "
                         f"option; the {self.name} backend draws in its arrays' dtype")

    def normal_units_minor(self, key: Any, shape: tuple[int, ...]) -> Any:
        """``normal(key, (..., n, d))`` laid out as ``shape = (..., d, n)``: the same numbers, its last two axes swapped
        (JAX on CPU draws them in that layout directly, ``JaxOps.normal_units_minor``)."""
        shape = tuple(shape)
        return self.xp.swapaxes(self.normal(key, shape[:-2] + (shape[-1], shape[-2])), -1, -2)

    def stacked_draws(self, draw: Callable[[Any], Any], keys: Any) -> Any:
        """``stack([draw(keys[i]) for i])``: one draw per key of ``keys`` (stacked keys, as :meth:`split` gives them),
        the same numbers (JAX: vectorised over the keys, ``jax.vmap``)."""
        return self.xp.stack([draw(keys[i]) for i in range(len(keys))])

    def shared_uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        """Uniform draws that every unit shares (e.g. saemix's random block); :meth:`uniform` here, the key's
        own stream under :meth:`per_unit_streams`."""
        return self.uniform(key, shape)

    # --- reductions over the units of every process (identity here; :class:`DistributedOps` all-reduces) ---------
    def all_sum(self, x: Any) -> Any:
        """``x`` summed over the processes of a data-parallel fit (a one-process fit: ``x``)."""
        return x

    def unit_mean(self, x: Any) -> Any:
        """Mean of ``x [..., n]`` over all its entries, the units of every process included."""
        return self.xp.mean(x)

    def gather_units(self, x: Any, axis: int) -> Any:
        """``x`` concatenated along its unit ``axis`` over the processes, in rank order (one process: ``x``)."""
        return x

    def distributed(self) -> Any:
        """A view of this shim for a data-parallel fit over processes (torch.distributed)."""
        raise ValueError(f"distributed=True fits over torch.distributed processes (a Pyro model); the {self.name} "
                         "backend shards units over devices with run(..., devices=n)")

    def process_mesh(self) -> Any:
        """The device mesh of ``run(..., distributed=True)`` when the backend spreads one program over the processes
        (JAX after ``jax.distributed.initialize``: ``JaxOps.process_mesh``); None: each process holds its own shard
        of the units and the engine switches to :meth:`distributed` (torch.distributed)."""
        return None

    def local_state(self, state: Any) -> Any:
        """``state`` with every array whole on this process (JAX: the entries split over the processes of a
        ``jax.distributed`` fit are gathered); as is here."""
        return state

    def shard_units(self, state: dict[str, Any], unit_axes: dict[str, int], devices: Any,
                    data_axes: Any = (), num_units: int | None = None) -> dict[str, Any]:
        """Place the per-unit entries of ``state`` (and the model's per-unit arrays ``data_axes``, pairs ``(array,
        unit axis)``) over ``devices`` (JAX: ``JaxOps.shard_units``); None: as is."""
        if devices is None:
            return state
        raise ValueError(f"devices= shards the units over JAX devices (a NumPyro model); the {self.name} backend "
                         "runs on the device of the model's data")

    def per_unit_streams(self, unit_ids: Any) -> Any:
        """A view of this shim whose ``split`` / ``normal`` / ``uniform`` draw from per-unit streams
        (:class:`UnitStreamOps`)."""
        return UnitStreamOps(self, unit_ids)

    # --- linear algebra and densities written once over ``xp`` -----------------------------------------
    def small_cholesky(self, a: Any, max_unrolled: int = 8) -> Any:
        """Lower Cholesky factor of SPD matrices ``[..., d, d]``, unrolled in ``xp`` ops for small d.

        LAPACK's ``potrf`` carries a large fixed cost per call on some CPU builds (tens of ms for a
        3×3 matrix); for the small d of per-unit latents an unrolled Cholesky–Banachiewicz is much
        faster and differentiable.  Falls back to :meth:`cholesky` above ``max_unrolled``.
        """
        xp = self.xp
        d = a.shape[-1]
        if d > max_unrolled:
            return self.cholesky(a)
        rows: list[list[Any]] = [[None] * d for _ in range(d)]
        for j in range(d):
            s = a[..., j, j]
            for k in range(j):
                s = s - rows[j][k] * rows[j][k]
            ljj = xp.sqrt(s)
            rows[j][j] = ljj
            for i in range(j + 1, d):
                s = a[..., i, j]
                for k in range(j):
                    s = s - rows[i][k] * rows[j][k]
                rows[i][j] = s / ljj
        zero = 0.0 * a[..., 0, 0]
        return xp.stack([xp.stack([rows[i][j] if j <= i else zero for j in range(d)], -1) for i in range(d)], -2)

    def column_cholesky(self, a: Any) -> Any:
        """Lower Cholesky factor ``L`` of SPD matrices ``[..., d, d]`` in ``xp`` ops, a column per step of
        :meth:`fori_loop`.  Right-looking: ``L[:, j]`` is column ``j`` of the updated matrix ``S`` over ``√S_jj``
        (below the diagonal), then ``S ← S − L[:, j] L[:, j]ᵀ``, so every entry is ``(a_ij − Σ_k l_ik l_jk) / l_jj``
        summed in order, as in :meth:`small_cholesky`.  No LAPACK call, no constant, and a loop body of a few array
        operations whatever ``d`` (unrolled, the factor and inverse of an 11 x 11 matrix compiled to ~2000 XLA
        instructions).  A compiled program that would otherwise call LAPACK (``potrf``, ``getrf``) needs no LAPACK
        kernels: on JAX/CPU their first use in a process imports scipy's bindings (~0.1 s).  For the small ``d`` of
        per-unit latents and observation vectors; :meth:`spd_solve` and :meth:`spd_inverse` use it on backends that
        prefer it (:attr:`spd_without_lapack`)."""
        xp = self.xp
        d = a.shape[-1]
        rows = self.arange(d)

        def column(j: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            s, chol = carry
            c = s[..., :, j]  # [..., d]
            pivot = xp.sqrt(c[..., j])[..., None]
            col = xp.where(rows > j, c / pivot, xp.where(rows == j, pivot, xp.zeros_like(c)))
            return s - col[..., :, None] * col[..., None, :], xp.where(rows == j, col[..., :, None], chol)

        return self.fori_loop(0, d, column, (a, xp.zeros_like(a)))[1]

    def positive_definite(self, a: Any) -> Any:
        """``[...]`` booleans: symmetric ``a [..., d, d]`` is positive definite (its Cholesky factorisation succeeds,
        every pivot > 0; a NaN entry gives False).  Written once in ``xp`` ops (:meth:`small_cholesky`: elementwise
        operations a compiled program fuses, no LAPACK call, for small d); torch asks LAPACK's ``cholesky_ex``, which
        reports instead of raising."""
        xp = self.xp
        pivots = xp.diagonal(self.small_cholesky(a), 0, -2, -1)
        return xp.all(pivots > 0, -1)

    def forward_substitution(self, chol: Any, b: Any) -> Any:
        """``L⁻¹ b`` for lower ``L [..., d, d]``, ``b [..., d, m]``, a row per loop step: ``x_j = b_j / l_jj``, then
        ``b ← b − L[:, j] x_j`` (column-oriented, vectorised over the right-hand sides)."""
        xp = self.xp
        d = chol.shape[-1]
        rows = self.arange(d)[:, None]

        def row(j: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            rest, x = carry
            xj = rest[..., j, :] / chol[..., j, j][..., None]  # [..., m]
            return rest - chol[..., :, j, None] * xj[..., None, :], xp.where(rows == j, xj[..., None, :], x)

        return self.fori_loop(0, d, row, (b, xp.zeros_like(b)))[1]

    def cholesky_solve(self, chol: Any, b: Any) -> Any:
        """``(L Lᵀ)⁻¹ b`` for lower ``L [..., d, d]`` and ``b [..., d, m]``: forward then back substitution in ``xp``
        ops, a row of the solution per loop step, vectorised over the ``m`` right-hand sides."""
        xp = self.xp
        d = chol.shape[-1]
        rows = self.arange(d)[:, None]
        y = self.forward_substitution(chol, b)

        def row(k: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:  # Lᵀ x = y, from the last row up
            rest, x = carry
            j = d - 1 - k
            xj = rest[..., j, :] / chol[..., j, j][..., None]
            return rest - chol[..., j, :, None] * xj[..., None, :], xp.where(rows == j, xj[..., None, :], x)

        return self.fori_loop(0, d, row, (y, xp.zeros_like(y)))[1]

    def cholesky_inverse(self, chol: Any) -> Any:
        """``(L Lᵀ)⁻¹ = Wᵀ W`` with ``W = L⁻¹`` (forward substitution on the identity) for lower ``L [..., d, d]``:
        symmetric to the last bit (both triangles sum the same products in the same order)."""
        xp = self.xp
        d = chol.shape[-1]
        eye = xp.zeros_like(chol) + xp.eye(d, dtype=chol.dtype)
        w = self.forward_substitution(chol, eye)
        return xp.sum(w[..., :, :, None] * w[..., :, None, :], -3)

    #: the largest ``d`` that :meth:`spd_solve` / :meth:`spd_inverse` factor in ``xp`` ops on a backend that prefers
    #: it (:attr:`spd_without_lapack`: a loop of ``d`` steps, each ``O(d²)`` per matrix); above, LAPACK
    MAX_SPD_WITHOUT_LAPACK = 32
    #: whether :meth:`spd_solve` / :meth:`spd_inverse` use :meth:`column_cholesky` for ``d <=``
    #: :attr:`MAX_SPD_WITHOUT_LAPACK` instead of the library's LAPACK-backed ``solve`` / ``inv``
    spd_without_lapack = False

    def spd_solve(self, a: Any, b: Any) -> Any:
        """``a⁻¹ b`` for symmetric positive definite ``a [..., d, d]``, ``b [..., d, m]``: the library's ``solve``,
        or on a backend with :attr:`spd_without_lapack` and small d a Cholesky factor and two substitutions in ``xp``
        ops (:meth:`column_cholesky`, :meth:`cholesky_solve`: the same solution to rounding)."""
        if self.spd_without_lapack and a.shape[-1] <= self.MAX_SPD_WITHOUT_LAPACK:
            return self.cholesky_solve(self.column_cholesky(a), b)
        return self.solve(a, b)

    def spd_inverse(self, a: Any) -> Any:
        """``a⁻¹`` for symmetric positive definite ``a [..., d, d]`` (see :meth:`spd_solve`)."""
        if self.spd_without_lapack and a.shape[-1] <= self.MAX_SPD_WITHOUT_LAPACK:
            return self.cholesky_inverse(self.column_cholesky(a))
        return self.xp.linalg.inv(a)

    def mvn_log_prob_fn(self, mean: Any, chol: Any) -> Callable[[Any], Any]:
        """``x ↦ log N(x; mean, L Lᵀ)`` for ``x [..., n, d]``, ``mean [n, d]``, ``chol`` L ``[n, d, d]`` or ``[d, d]``.

        ``L⁻¹`` (one triangular solve) and ``log|L|`` are computed once, so the returned function is cheap
        to call repeatedly (f-SAEM's independent proposal evaluates it at every IMH step).
        """
        xp = self.xp
        d = chol.shape[-1]
        eye = xp.broadcast_to(self.asarray(np.eye(d), dtype=chol.dtype), tuple(chol.shape))
        chol_inv = self.solve_triangular(chol, eye, lower=True)
        half_logdet = xp.sum(xp.log(xp.diagonal(chol, 0, -2, -1)), -1)

        def log_prob(x: Any) -> Any:
            u = xp.sum(chol_inv * (x - mean)[..., None, :], -1)  # L⁻¹(x − mean)  [..., n, d]
            return -0.5 * xp.sum(u * u, -1) - half_logdet - 0.5 * d * LOG_2PI

        return log_prob

    def mvn_log_prob(self, x: Any, mean: Any, chol: Any) -> Any:
        """``log N(x; mean, L Lᵀ)`` (see :meth:`mvn_log_prob_fn`)."""
        return self.mvn_log_prob_fn(mean, chol)(x)


class UnitStreamOps:
    """The shim ``base`` with per-unit random streams: the kernels run unchanged on it.

    Keys are counter-based: ``split(key, n)`` is ``fold_in(key, j)`` for ``j < n``, and ``normal`` / ``uniform`` of a
    shape ``[L, n, ...]`` give unit ``unit_ids[u]`` (axis 1) draws that depend on ``(key, unit_ids[u])`` only
    (``base.per_unit_normal``).  A unit's draws at iteration k and kernel step j are therefore the same whatever the
    other units, their order, or the device or process holding the unit.  Everything else is ``base``'s.
    """

    def __init__(self, base: Ops, unit_ids: Any) -> None:
        self.base = base
        self.unit_ids = unit_ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def split(self, key: Any, n: int = 2) -> Any:
        return self.base.fold_in(key, self.base.arange(n))

    def normal(self, key: Any, shape: tuple[int, ...]) -> Any:
        return self.base.per_unit_normal(key, self.unit_ids, shape, axis=1)

    def uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        return self.base.per_unit_uniform(key, self.unit_ids, shape, axis=1)

    def shared_uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        return self.base.stream_uniform(key, shape)


class DistributedOps:
    """The torch shim ``base`` inside a ``torch.distributed`` process group: each process holds a shard of the units,
    and the sums over units (statistics, acceptance counts, the objective) are all-reduced in float64, so every
    process runs the same M-step on the same statistics (gloo on CPU, NCCL on GPU).  Everything else is ``base``'s.
    """

    def __init__(self, base: Ops) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group: start the "
                               "script with torchrun and call torch.distributed.init_process_group('gloo') (or "
                               "'nccl' on GPUs) first")
        self.base = base
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def all_sum(self, x: Any) -> Any:
        torch = self.base.torch
        y = torch.as_tensor(x, device=self.base.device).to(torch.float64).clone()
        self.dist.all_reduce(y, op=self.dist.ReduceOp.SUM)
        return y.to(x.dtype) if isinstance(x, torch.Tensor) else y

    def unit_mean(self, x: Any) -> Any:
        torch = self.base.torch
        total = self.all_sum(torch.stack([x.sum().to(torch.float64),
                                          torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)]))
        return (total[0] / total[1]).to(x.dtype)

    def gather_units(self, x: Any, axis: int) -> Any:
        parts: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(parts, x.detach().cpu())
        return self.base.torch.cat(parts, dim=axis).to(self.base.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable Python values), in rank order."""
        parts: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(parts, obj)
        return parts

    def distributed(self) -> DistributedOps:
        return self

    def per_unit_streams(self, unit_ids: Any) -> Any:
        return UnitStreamOps(self, unit_ids)


class _LentGenerator:
    """Lends the state of the generator ``key`` to torch's global generator of its device, and takes it back."""

    def __init__(self, torch: Any, key: Any) -> None:
        self.torch, self.key = torch, key
        self.cuda = key.device.type == "cuda"

    def _get(self) -> Any:
        torch = self.torch
        return torch.cuda.get_rng_state(self.key.device) if self.cuda else torch.get_rng_state()

    def _set(self, state: Any) -> None:
        torch = self.torch
        if self.cuda:
            torch.cuda.set_rng_state(state, self.key.device)
        else:
            torch.set_rng_state(state)

    def __enter__(self) -> _LentGenerator:
        self.saved = self._get()
        self._set(self.key.get_state())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.key.set_state(self._get())
        self._set(self.saved)


class TorchOps(Ops):
    """torch flavour: arrays on ``device`` in ``dtype`` (those of the model's data/params)."""

    name = "torch"
    jittable = False
    unit_block_values = 2 ** 18  # 2 MiB of float64 per [..., n, T] temporary

    def __init__(self, device: Any = None, dtype: Any = None) -> None:
        import torch

        self.torch = torch
        self.xp = torch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()

    # --- creation -----------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        torch = self.torch
        if isinstance(x, torch.Tensor):
            if x.dtype == torch.bool or (dtype is None and not x.is_floating_point()):
                return x.to(device=self.device)
            return x.to(device=self.device, dtype=dtype or self.dtype)
        arr = np.asarray(x)
        if not arr.flags.writeable:  # (a pandas column's values, a broadcast view): torch would share it and warn
            arr = arr.copy()
        if arr.dtype == bool:
            return torch.as_tensor(arr, device=self.device)
        if dtype is None and np.issubdtype(arr.dtype, np.integer):
            return torch.as_tensor(arr, device=self.device, dtype=torch.long)
        return torch.as_tensor(arr, device=self.device, dtype=dtype or self.dtype)

    def arange(self, n: int) -> Any:
        return self.torch.arange(n, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    # --- random -------------------------------------------------------------------------------
    # A key is a ``torch.Generator`` on ``device`` (a sequential stream); ``None`` draws from torch's global one.
    def key(self, seed: int) -> Any:
        """A fresh generator on the data's device seeded with ``seed`` (the stream of a fit)."""
        return self.torch.Generator(device=self.device).manual_seed(int(seed))

    def split(self, key: Any, n: int = 2) -> list[Any]:
        """``n`` subkeys: the generator itself ``n`` times (a sequential stream is consumed in program order)."""
        return [key] * n

    def own_key(self, key: Any) -> Any:
        """A copy of the generator ``key`` (same device, seed and position): a step draws from the copy and hands it
        on in its new state, so the state it was given keeps its generator where it was (pure steps)."""
        if not isinstance(key, self.torch.Generator):
            return key
        out = self.torch.Generator(device=key.device)
        out.set_state(key.get_state())
        return out

    def normal(self, key: Any, shape: tuple[int, ...]) -> Any:
        return self.torch.randn(shape, device=self.device, dtype=self.dtype, generator=key)

    def uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        return self.torch.rand(shape, device=self.device, dtype=self.dtype, generator=key)

    def randint(self, key: Any, shape: tuple[int, ...], high: int) -> Any:
        return self.torch.randint(high, shape, device=self.device, generator=key)

    def permutation(self, key: Any, n: int) -> Any:
        return self.torch.randperm(n, device=self.device, generator=key)

    def student_t(self, key: Any, df: float, shape: tuple[int, ...]) -> Any:
        """Standard Student-t draws with ``df`` degrees of freedom.  An integer ``df``: ``t = x₀ / sqrt(χ²/df)`` with
        ``χ² = −2 log Π_{k ≤ df/2} (1 − u_k)`` (plus ``x₁²`` for an odd df), the normals and uniforms drawn in float32
        (as JAX's, :func:`~latentfit.inference.ops_jax._student_t_integer_df`) and the arithmetic in the model's
        dtype: ~39 instead of 64 ns a draw (df = 4) with ``torch.distributions.StudentT``'s gamma sampler in float64
        (the importance-sampling log-likelihood at N = 5000, 5000 draws a subject: 9 -> 6.5 s).  A product of more
        than 32 factors is taken as a sum of logarithms (no underflow).  Else ``torch.distributions.StudentT``."""
        torch = self.torch
        if float(df).is_integer() and df >= 1:
            df, size = int(df), int(np.prod(shape)) if shape else 1
            draw = torch.float32 if self.dtype == torch.float64 else self.dtype
            # one row per variate (contiguous: torch reduces a short last axis slowly); one log of the product
            x = torch.randn((1 + df % 2, size), generator=key, device=self.device, dtype=draw).to(self.dtype)
            u = torch.rand((df // 2, size), generator=key, device=self.device, dtype=draw).to(self.dtype)
            if df > 65:  # 1 − u in (0, 1]: a finite log
                chi2 = -2.0 * torch.log1p(-u).sum(0)
            elif df > 1:
                prod = 1.0 - u[0]
                for k in range(1, df // 2):
                    prod = prod * (1.0 - u[k])
                chi2 = -2.0 * torch.log(prod)
            else:
                chi2 = x[1] * x[1]
            if df % 2 and df > 1:
                chi2 = chi2 + x[1] * x[1]
            return (x[0] / torch.sqrt(chi2 / df)).reshape(tuple(shape))
        law = torch.distributions.StudentT(torch.tensor(float(df), device=self.device, dtype=self.dtype))
        with self.global_rng_from(key):
            return law.sample(tuple(shape))

    def global_rng_from(self, key: Any) -> Any:
        """Context in which draws from torch's global generator (of ``key``'s device) come from ``key`` instead.

        The generator's state is lent to the global generator on entry and taken back, advanced, on exit; the global
        state the caller had is restored, so code that can only draw globally (a Pyro model sampling its latents,
        ``Distribution.sample``) draws from the explicit stream and leaves torch's and Pyro's RNG untouched.  A
        ``None`` key: the global generator itself (nothing lent).
        """
        if not isinstance(key, self.torch.Generator):
            return contextlib.nullcontext()
        return _LentGenerator(self.torch, key)

    #: problems (an engine's estimate of its arrays' entries: observations × chains) under which a CPU fit runs its
    #: iterations on one intra-op thread (None: torch's setting always).  torch's own grain (32768) leaves arrays
    #: this small on one thread anyway, while its reductions and small matrix products still wake the others: on a
    #: busy machine their OpenMP threads spin for the core the first one needs.  Measured on 2 cores with other work
    #: running: theophylline's 400 SAEM iterations 16.5 s with 2 threads, 1.9 s with 1; a 30-subject model of three
    #: doses each 5.7 s against 1.1-1.3 s; on a quiet machine 1 thread is as fast (theophylline 1.38-1.51 s against
    #: 1.46-1.63 s).  Larger problems keep torch's threads (N = 5000 x 10: 1.6-2.0 s either way).
    SMALL_PROBLEM_ELEMENTS: int | None = 32768

    def iteration_threads(self, elements: int) -> Any:
        """One intra-op thread while a CPU engine iterates over a problem of under :data:`SMALL_PROBLEM_ELEMENTS`
        entries (the caller's setting restored after); torch's setting otherwise."""
        torch = self.torch
        limit = type(self).SMALL_PROBLEM_ELEMENTS
        if self.device.type != "cpu" or limit is None or elements >= limit or torch.get_num_threads() <= 1:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def one_thread() -> Any:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(before)

        return one_thread()

    def seed_context(self, seed: int):
        """Context manager: reproducible global RNG inside, user's RNG state restored after (post-fit helpers)."""
        torch = self.torch
        devices = [self.device] if self.device.type == "cuda" else []
        ctx = torch.random.fork_rng(devices=devices)

        class _Seeded:
            def __enter__(self_inner):
                ctx.__enter__()
                torch.manual_seed(seed)
                return self_inner

            def __exit__(self_inner, *exc):
                return ctx.__exit__(*exc)

        return _Seeded()

    # --- counter-based streams (per-unit random numbers) -------------------------------------------
    # A stream key is an int64 tensor ``[..., 2]`` of two 32-bit words; draws are Philox-4x32-10 evaluated at
    # counters built from (position, unit id), vectorised over units on the data's device: unit i's draws
    # depend on (key, i) only, never on how many units there are, their order, or the process holding them.
    def stream_key(self, key: Any, seed: int) -> Any:
        """Root key of the counter-based streams: the two 32-bit words of the seed of the generator ``key`` (its
        ``initial_seed``; ``seed`` when ``key`` is None)."""
        if isinstance(key, self.torch.Generator):
            seed = key.initial_seed()
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        return self.torch.tensor([seed & _MASK32, seed >> 32], dtype=self.torch.int64, device=self.device)

    def _words(self, x: Any) -> Any:
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return x.to(device=self.device, dtype=torch.int64)
        return torch.as_tensor(np.asarray(x, dtype=np.int64), device=self.device)

    def fold_in(self, key: Any, data: Any) -> Any:
        """A new key per integer of ``data`` (scalar or ``[m]``): ``[2]`` or ``[m, 2]`` (as ``jax.random.fold_in``).

        The key is the first two output words of Philox at the counter ``(data_lo, data_hi, 0, tag)``.
        """
        torch = self.torch
        d = self._words(data)
        zero = torch.zeros_like(d)
        out = philox4x32((d & _MASK32, (d >> 32) & _MASK32, zero, zero + _TAG_FOLD), (key[..., 0], key[..., 1]))
        return torch.stack([out[0], out[1]], -1)

    def _uniform_pairs(self, words: tuple[Any, ...]) -> tuple[Any, Any]:
        """Two float64 uniforms on (0, 1) from the four words of one Philox output (53 random bits each)."""
        torch = self.torch

        def u53(a: Any, b: Any) -> Any:
            return (((a >> 5) << 26) + (b >> 6)).to(torch.float64).add_(0.5).mul_(2.0 ** -53)

        return u53(words[0], words[1]), u53(words[2], words[3])

    def _counter_draws(self, key: Any, c1: Any, c2: Any, tag: int, count: int, normal: bool) -> Any:
        """``count`` draws per row of ``c1``/``c2`` (``[n, 1]``): uniforms, or normals by Box–Muller."""
        torch = self.torch
        m = -(-count // 2)
        j = torch.arange(m, device=self.device, dtype=torch.int64)[None, :]
        c0, c1, c2 = torch.broadcast_tensors(j, c1, c2)
        u1, u2 = self._uniform_pairs(philox4x32((c0, c1, c2, torch.full_like(c0, tag)), (key[0], key[1])))
        if normal:
            r = torch.sqrt(-2.0 * torch.log(u1))
            angle = (2.0 * math.pi) * u2
            pair = (r * torch.cos(angle), r * torch.sin(angle))
        else:
            pair = (u1, u2)
        out = torch.stack(pair, -1).reshape(c0.shape[0], 2 * m)[:, :count]
        return out.to(self.dtype)

    def _per_unit(self, key: Any, units: Any, shape: tuple[int, ...], axis: int, normal: bool) -> Any:
        shape = tuple(int(s) for s in shape)
        axis = axis % len(shape)
        ids = self._words(units).reshape(-1, 1)
        if ids.shape[0] != shape[axis]:
            raise ValueError(f"per-unit draws of shape {shape}: axis {axis} has {shape[axis]} entries but "
                             f"{ids.shape[0]} unit ids were given")
        rest = shape[:axis] + shape[axis + 1:]
        count = int(np.prod(rest)) if rest else 1
        draws = self._counter_draws(key, ids & _MASK32, (ids >> 32) & _MASK32, _TAG_UNIT, count, normal)
        return self.torch.movedim(draws.reshape((ids.shape[0],) + rest), 0, axis)

    def distributed(self) -> DistributedOps:
        """This shim inside the current ``torch.distributed`` process group (:class:`DistributedOps`)."""
        return DistributedOps(self)

    def per_unit_normal(self, key: Any, units: Any, shape: tuple[int, ...], axis: int = 1) -> Any:
        """Standard normal draws of ``shape`` whose slice ``u`` along ``axis`` comes from unit ``units[u]``'s stream.

        Unit ``i``'s draws are Box–Muller transforms of Philox-4x32-10 at counters ``(j, i_lo, i_hi, 1)`` under
        ``key``: they depend on ``(key, i)`` and their position only.
        """
        return self._per_unit(key, units, shape, axis, True)

    def per_unit_uniform(self, key: Any, units: Any, shape: tuple[int, ...], axis: int = 1) -> Any:
        """Uniform draws on (0, 1), per unit as :meth:`per_unit_normal`."""
        return self._per_unit(key, units, shape, axis, False)

    def stream_uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        """Uniform draws on (0, 1) of ``shape`` from the stream ``key`` itself (shared by all units)."""
        shape = tuple(int(s) for s in shape)
        zero = self.torch.zeros((1, 1), dtype=self.torch.int64, device=self.device)
        return self._counter_draws(key, zero, zero, _TAG_SHARED, int(np.prod(shape)), False).reshape(shape)

    # --- functional updates ---------------------------------------------------------------------
    def scatter(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[idx] = rows`` without mutating ``table`` (rows along axis 0)."""
        return table.index_copy(0, idx, rows.to(table.dtype))

    def scatter_owned(self, table: Any, idx: Any, rows: Any) -> Any:
        """In-place ``table[idx] = rows`` (the caller owns ``table``); returns ``table``."""
        return table.index_copy_(0, idx, rows.to(table.dtype))

    def scatter_axis1(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[:, idx] = rows`` without mutating ``table``."""
        return table.index_copy(1, idx, rows.to(table.dtype))

    def take(self, x: Any, idx: Any, axis: int = 0) -> Any:
        """``x`` at the indices ``idx`` (an index array: a gather; a ``slice``: a view) along ``axis``."""
        if isinstance(idx, slice):
            return x[(slice(None),) * axis + (idx,)]
        return x.index_select(axis, idx)

    def take_block(self, x: Any, start: Any, size: int, axis: int = 0) -> Any:
        """``x[start:start + size]`` along ``axis``: a copy of a contiguous block (a slice, no gather)."""
        return x.narrow(axis, int(start), size).clone()

    def read_block(self, x: Any, start: Any, size: int, axis: int = 0) -> Any:
        """``x[start:start + size]`` along ``axis`` as a view (no copy: read it before ``x`` is next written)."""
        return x.narrow(axis, int(start), size)

    def put_block(self, table: Any, start: Any, rows: Any) -> Any:
        """In place ``table[start:start + len(rows)] = rows`` (the caller owns ``table``); returns ``table``."""
        table.narrow(0, int(start), int(rows.shape[0])).copy_(rows)
        return table

    def write_units(self, out: Any, block: slice, value: Any, like: Any = None) -> Any:
        """In place ``out[:, block] = value`` (axis 1: the units of ``[L, n, ...]``; the caller owns ``out``); ``out``
        None: a new uninitialised array of ``like``'s shape in ``value``'s dtype first.  Returns ``out``."""
        if out is None:
            out = self.torch.empty(tuple(like.shape), dtype=value.dtype, device=value.device)
        out[:, block] = value
        return out

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    # --- autodiff -----------------------------------------------------------------------------
    def value_and_grad(self, f: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, Any]]:
        torch = self.torch

        def vg(x):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                val = f(x)
                (g,) = torch.autograd.grad(val, x)
            return val.detach(), g.detach()

        return vg

    def grad(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        vg = self.value_and_grad(f)
        return lambda x: vg(x)[1]

    def depends_on(self, f: Callable[[Any], Any], x: Any) -> bool:
        """Whether ``f(x)`` is connected to ``x`` in autograd's graph (structurally, whatever the values: False only
        when no operation on the way to the output reads ``x``; a zero derivative that is computed counts as True)."""
        torch = self.torch
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = f(x)
            if not out.requires_grad:
                return False
            (g,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        return g is not None

    def hessian(self, f: Callable[[Any], Any], vectorize: bool = False) -> Callable[[Any], Any]:
        """Hessian of ``f: R^p -> R``; ``vectorize``: the p reverse passes of its rows batched in one
        (``torch.autograd.functional.hessian(vectorize=True)``; MISSO's curvature: 2x faster on the logistic mixed
        model of benchmarks/mcmcsgd_logistic.py, the same values there)."""
        torch = self.torch

        def h(x):
            with torch.enable_grad():
                return torch.autograd.functional.hessian(f, x.detach(), vectorize=vectorize).detach()

        return h

    def jacobian(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Jacobian ``[q, p]`` of ``f: R^p -> R^q``, its q reverse passes batched in one."""
        torch = self.torch

        def j(x):
            with torch.enable_grad():
                return torch.autograd.functional.jacobian(f, x.detach(), vectorize=True).detach()

        return j

    def jvp(self, f: Callable[[Any], Any], x: Any, v: Any) -> tuple[Any, Any]:
        """``(f(x), ∂f(x)·v)`` by forward mode (``torch.func.jvp``)."""
        torch = self.torch
        with torch.enable_grad():
            out, tangent = torch.func.jvp(f, (x.detach().clone(),), (v,))
        return out.detach(), tangent.detach()

    def jacfwd(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Jacobian ``[*out_shape, p]`` of ``f: R^p -> R^out_shape`` by forward mode (``torch.func.jacfwd``).

        The p tangents are vmapped over one evaluation of ``f``: random draws inside ``f`` (a PPL tracing a
        model before substituting values) are shared by all of them, as in a single call.
        """
        torch = self.torch

        def jac(x: Any) -> Any:
            with torch.enable_grad():
                return torch.func.jacfwd(f, randomness="same")(x.detach()).detach()

        return jac

    def jacobian_columns(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """:meth:`jacfwd`'s Jacobian ``[*out_shape, p]``, its columns by :func:`reverse_jvp` along the unit vectors
        (the double-backward trick; ``f`` evaluated once: random draws inside it are shared by every column).  For
        the post-fit derivatives (the SEs' moments, transforms and scores), where torch's forward mode costs more
        than its arithmetic: its rules for the element-wise binary operations call Python references whose first
        use imports ``torch._dynamo`` (torch 2.13: ~0.9 s in every fresh process computing SEs)."""
        torch = self.torch

        def jac(x: Any) -> Any:
            eye = torch.eye(int(x.shape[-1]), dtype=x.dtype, device=x.device)
            return torch.movedim(reverse_jvp(f, x, eye)[1], 0, -1)

        return jac

    def value_grad_hessian(self, f: Callable[[Any], Any], z: Any, hessian: bool = True) -> tuple[Any, Any, Any]:
        """Per-row value ``[n]``, gradient ``[n, d]`` and Hessian ``[n, d, d]`` (or None) of ``f: [n, d] -> [n]``.

        Row i of ``f`` must depend on row i of ``z`` only (independent units); the Hessian takes ``d``
        reverse-over-reverse passes (d is small).
        """
        torch = self.torch
        d = z.shape[-1]
        with torch.enable_grad():
            x = z.detach().requires_grad_(True)
            v = f(x)
            (g,) = torch.autograd.grad(v.sum(), x, create_graph=hessian)
            if not hessian:
                return v.detach(), g.detach(), None
            rows = []
            for j in range(d):
                (hj,) = torch.autograd.grad(g[..., j].sum(), x, retain_graph=j < d - 1)
                rows.append(hj)
        return v.detach(), g.detach(), torch.stack(rows, dim=-2).detach()

    def batched_jacobian(self, f: Callable[[Any], Any], differentiable: bool = False) -> Callable[[Any], Any]:
        """Jacobian of ``f: [B, p] -> [B, m]`` where row b of the output depends on row b only.

        Returns ``[B, m, p]``; computed with m reverse passes (cheaper on torch than its forward mode).
        ``differentiable``: the passes keep their graph, so the Jacobian can be differentiated in what ``f`` reads
        besides ``x`` (the parameters of the linearisation's moments, :mod:`latentfit.inference.fisher`).
        """
        torch = self.torch

        def jac(x):
            x = x.detach()
            with torch.enable_grad():
                xr = x.clone().requires_grad_(True)
                out = f(xr)
                rows = []
                for j in range(out.shape[-1]):
                    (g,) = torch.autograd.grad(out[..., j].sum(), xr, retain_graph=True, create_graph=differentiable,
                                               allow_unused=differentiable)
                    rows.append(torch.zeros_like(xr) if g is None else g)
            jacobian = torch.stack(rows, dim=-2)
            return jacobian if differentiable else jacobian.detach()

        return jac

    # --- optimisers (gradient engines) -----------------------------------------------------------
    def optimizer(self, spec: Any, learning_rate: Callable[[Any], Any]) -> FlatOptimizer:
        """A functional *ascent* optimiser over one flat parameter vector, from ``torch.optim``.

        ``spec``: ``"sgd"``, ``"adam"``, ``"amsgrad"`` (``torch.optim.Adam(amsgrad=True)``), ``"opt-amsgrad"``
        (:class:`latentfit.optim.OptAMSGrad`), or a factory ``params -> torch.optim.Optimizer`` (its own
        learning rate is kept).  ``learning_rate(t)`` gives the rate of gradient step ``t`` (1-based).

        ``"sgd"``, ``"adam"`` and ``"amsgrad"`` are pure tensor updates (:func:`_torch_adam_update`): the arithmetic of
        ``torch.optim``'s single-tensor ``SGD`` / ``Adam`` step with the gradient ``−g``, op for op, so the iterates are
        those of the torch optimiser stepped in place, bit for bit (tests/test_ops.py), without building an optimiser
        object per step (0.3 ms of an MCMCSGD iteration on benchmarks/mcmcsgd_logistic.py).  The others keep the
        optimiser object in the state; ``update`` steps a copy of it (loads ``x``, sets the gradient to ``−g``: torch
        optimisers minimise), so the state given is left as it was.
        """
        torch = self.torch
        if spec in ("sgd", "adam", "amsgrad"):
            return _torch_functional_optimizer(torch, spec, learning_rate)
        named = {}
        if spec == "opt-amsgrad":
            from latentfit.optim import OptAMSGrad

            named["opt-amsgrad"] = lambda p, lr: OptAMSGrad(p, lr=lr)
        own_rate = isinstance(spec, str)
        if own_rate:
            make = named[spec]
            factory = lambda p: make(p, float(learning_rate(1)))  # noqa: E731
        else:
            factory = spec

        def init(x: Any) -> dict[str, Any]:
            leaf = x.detach().clone().requires_grad_(True)
            opt = factory([leaf])
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
            return {"opt": opt, "leaf": leaf, "t": 0}

        def fresh_copy(state: dict[str, Any]) -> dict[str, Any]:
            """A named optimiser's state copied without ``copy.deepcopy`` of the optimiser object: a new leaf and a
            new optimiser from the factory, the old one's group options (the learning rate included) and its
            per-parameter state (tensors cloned, anything else deep-copied) — the values ``deepcopy`` gives, so the
            steps are the same bit for bit."""
            old_leaf, old = state["leaf"], state["opt"]
            leaf = old_leaf.detach().clone().requires_grad_(True)
            opt = factory([leaf])
            for group, old_group in zip(opt.param_groups, old.param_groups):
                group.update({k: copy.deepcopy(v) for k, v in old_group.items() if k != "params"})
            if old_leaf in old.state:
                opt.state[leaf] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                   for k, v in old.state[old_leaf].items()}
            return dict(state, opt=opt, leaf=leaf)

        def update(g: Any, state: dict[str, Any], x: Any) -> tuple[Any, dict[str, Any]]:
            # a torch optimiser steps in place: step a copy (the optimiser with its parameter), so the state given
            # is left as it was (a pure update, as optax's); a user's optimiser object is deep-copied whole
            state = fresh_copy(state) if own_rate else copy.deepcopy(state)
            leaf, opt, t = state["leaf"], state["opt"], state["t"] + 1
            with torch.no_grad():
                leaf.copy_(x)
            leaf.grad = (-g).to(leaf.dtype)
            if own_rate:
                for group in opt.param_groups:
                    group["lr"] = float(learning_rate(t))
            opt.step()
            return leaf.detach().clone(), dict(state, t=t)

        return FlatOptimizer(init, update)

    # --- control flow -------------------------------------------------------------------------
    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        return true_fn(*operands) if bool(pred) else false_fn(*operands)

    def fori_loop(self, lower: int, upper: int, body: Callable[[int, Any], Any], init: Any) -> Any:
        val = init
        for i in range(lower, upper):
            val = body(i, val)
        return val

    def map(self, f: Callable[[Any], Any], xs: Any) -> Any:
        """``stack([f(x) for x in xs])`` over the leading axis of one array (JAX: ``lax.map``, one loop body in a
        compiled program instead of a copy per entry)."""
        return self.xp.stack([f(x) for x in xs])

    def jit(self, f: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
        return f

    def jit_once(self, key: Hashable, make: Callable[[], Callable]) -> Callable:
        """``jit(make())`` made once per ``key`` for this shim and kept with it (a backend that compiles: the same
        compiled function at every call, outside what a trace's fingerprint reads); here ``make()`` itself."""
        return make()

    def scan_steps(self, step: Callable, state: Any, ks: range, key: Any = None,
                   capacity: int | None = None) -> tuple[Any, list[Any]]:
        """Apply ``state, info = step(state, k)`` for k in ks; return final state and infos.

        ``key`` identifies the (static) step function, for backends that cache compilations; ``capacity`` (the
        longest chunk) lets them compile one program for every shorter chunk too.
        """
        infos = []
        for k in ks:
            state, info = step(state, self.torch.tensor(k, device=self.device))
            infos.append(info)
        return state, infos

    def argsort(self, a: Any, axis: int = -1) -> Any:
        """Stable ``argsort`` along ``axis``."""
        return self.torch.argsort(a, dim=axis, stable=True)

    def take_along_axis(self, a: Any, idx: Any, axis: int = -1) -> Any:
        return self.torch.take_along_dim(a, idx, axis)

    # --- special functions --------------------------------------------------------------------------
    def logsumexp(self, x: Any, axis: int) -> Any:
        return self.torch.logsumexp(x, dim=axis)

    def logit(self, x: Any) -> Any:
        return self.torch.special.logit(x)

    def expit(self, x: Any) -> Any:
        return self.torch.special.expit(x)

    def ndtri(self, x: Any) -> Any:
        return self.torch.special.ndtri(x)

    def ndtr(self, x: Any) -> Any:
        return self.torch.special.ndtr(x)

    def log_ndtr(self, x: Any) -> Any:
        return self.torch.special.log_ndtr(x)

    def gammaln(self, x: Any) -> Any:
        """``log Γ(x)`` elementwise (x > 0)."""
        return self.torch.special.gammaln(x)

    # --- linear algebra -------------------------------------------------------------------------
    def cholesky(self, a: Any) -> Any:
        return self.torch.linalg.cholesky(a)

    def positive_definite(self, a: Any) -> Any:
        return self.torch.linalg.cholesky_ex(a).info == 0  # (LAPACK's potrf reports a NaN pivot as a failure)

    def solve(self, a: Any, b: Any) -> Any:
        return self.torch.linalg.solve(a, b)

    def solve_triangular(self, a: Any, b: Any, lower: bool = True) -> Any:
        """``a⁻¹ b`` for triangular ``a [..., d, d]``, ``b [..., d, m]``."""
        return self.torch.linalg.solve_triangular(a, b, upper=not lower)

    def eigh(self, a: Any) -> tuple[Any, Any]:
        return self.torch.linalg.eigh(a)

    def tree_map(self, f: Callable, tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: self.tree_map(f, v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.tree_map(f, v) for v in tree)
        return f(tree) if tree is not None else None


# ----- torch derivatives without forward mode; the per-model program caches -----------------------------------
def reverse_jvp(f: Callable[[Any], Any], x: Any, tangents: Any) -> tuple[Any, Any]:
    """``(f(x), [J(x) v for v in tangents])`` (torch; ``tangents [k, *x.shape]`` -> ``[k, *out.shape]``) by the
    double-backward trick: ``g(u) = J(x)ᵀu`` by one reverse pass kept differentiable, then ``J v = ∂(g·v)/∂u`` by one
    reverse pass of that graph per direction; ``f`` is evaluated once.  The values of forward mode without it:
    torch's forward-mode rules for the element-wise binary operations call Python references whose first use imports
    ``torch._dynamo`` (and sympy; ~0.9 s in a fresh process).  Each pass differentiates a scalar: an explicit
    ``grad_outputs`` makes torch import sympy (~0.4 s) to compare its shape."""
    import torch

    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x)
        if not out.requires_grad:  # f does not read x
            return out.detach(), out.new_zeros((tangents.shape[0],) + tuple(out.shape))
        u = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad((out * u).sum(), x, create_graph=True, allow_unused=True)
        cols = []
        for v in tangents.to(x.dtype):
            col = None
            if g is not None and g.requires_grad:  # else no path from x to out
                (col,) = torch.autograd.grad((g * v).sum(), u, retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(out) if col is None else col.detach())
    return out.detach(), torch.stack(cols)


class ProgramsByModel(weakref.WeakKeyDictionary):
    """The compiled programs of each model, by key (post-fit work: the SEs' information, the IS, linearised and
    quadrature log-likelihoods): ``programs.get_program(model, key, body)`` is ``model.ops.jit(body(ref))``, made once
    per model and key, ``ref`` a weak reference to the model.  The cache holds each model weakly and its programs
    read the model through ``ref``, so nothing here keeps a model alive: the model and its programs are freed with
    its last user.  ``programs[model]`` (``.get(model)``) is the model's ``{key: program}``."""

    def get_program(self, model: Any, key: Hashable, body: Callable[[Callable[[], Any]], Callable]) -> Callable:
        per_model = self.setdefault(model, {})
        if key not in per_model:
            per_model[key] = model.ops.jit(body(weakref.ref(model)))
        return per_model[key]


# ----- choosing a backend (the only place, with ops_jax, that knows which library an array comes from) -----
def make_ops(backend: str = "torch", *, device: Any = None, dtype: Any = None) -> Ops:
    """The shim of a backend by name: ``"torch"`` (float64 unless ``dtype``) or ``"jax"`` (JAX's default float)."""
    if backend == "torch":
        import torch

        return TorchOps(device=device, dtype=dtype if dtype is not None else torch.float64)
    if backend == "jax":
        from .ops_jax import JaxOps

        return JaxOps(dtype=dtype, device=device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _is_jax(x: Any) -> bool:
    return type(x).__module__.startswith(("jax", "jaxlib")) or getattr(x, "__name__", "") == "jax.numpy"


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") or getattr(x, "__name__", "") == "torch"


def ops_for(x: Any) -> Ops:
    """The shim for data ``x``: a torch tensor keeps its device (and floating dtype), a JAX array gets
    :class:`~latentfit.inference.ops_jax.JaxOps`, anything else (numpy, lists) torch float64.  ``x`` may
    also be an array namespace (``torch``, ``jax.numpy``)."""
    if _is_torch(x):
        if getattr(x, "__name__", "") == "torch":
            return make_ops("torch")
        return TorchOps(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
    if _is_jax(x):
        from .ops_jax import JaxOps

        return JaxOps()
    return make_ops("torch")


def select(cond: Any, a: Any, b: Any) -> Any:
    """Elementwise ``where`` for a Python bool or a scalar of either backend (schedules see all three)."""
    if isinstance(cond, bool):
        return a if cond else b
    if _is_torch(cond):
        import torch

        return torch.where(cond, torch.as_tensor(a, dtype=torch.float64, device=cond.device),
                           torch.as_tensor(b, dtype=torch.float64, device=cond.device))
    import jax.numpy as jnp

    return jnp.where(cond, a, b)


#: ``torch.optim.Adam``'s defaults
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def _torch_functional_optimizer(torch: Any, spec: str, learning_rate: Callable[[Any], Any]) -> FlatOptimizer:
    """``"sgd"``, ``"adam"``, ``"amsgrad"`` as pure updates of ``x`` and the state ``{"t", "exp_avg", "exp_avg_sq"}``
    (amsgrad: and ``"max_exp_avg_sq"``): the operations of ``torch.optim``'s single-tensor step
    (``_single_tensor_sgd`` without momentum, ``_single_tensor_adam``) in the same order on new tensors, with the
    gradient ``−g`` (ascent) and ``lr = learning_rate(t)`` at step t: the iterates equal those of the torch optimiser
    stepped in place, bit for bit."""
    beta1, beta2 = _ADAM_BETAS

    def init(x: Any) -> dict[str, Any]:
        if spec == "sgd":
            return {"t": 0}
        z = torch.zeros_like(x.detach(), memory_format=torch.preserve_format)
        state = {"t": 0, "exp_avg": z, "exp_avg_sq": z.clone()}
        if spec == "amsgrad":
            state["max_exp_avg_sq"] = z.clone()
        return state

    def update(g: Any, state: dict[str, Any], x: Any) -> tuple[Any, dict[str, Any]]:
        t = state["t"] + 1
        lr = float(learning_rate(t))
        with torch.no_grad():
            grad = (-g).to(x.dtype)
            if spec == "sgd":
                return x.detach().add(grad, alpha=-lr), {"t": t}
            exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
            exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = float(t)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            new = {"t": t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            second = exp_avg_sq
            if spec == "amsgrad":
                second = new["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
            denom = (second.sqrt() / bias_correction2_sqrt).add_(_ADAM_EPS)
            return x.detach().addcdiv(exp_avg, denom, value=-step_size), new

    return FlatOptimizer(init, update)
