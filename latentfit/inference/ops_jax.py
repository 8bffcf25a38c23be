"""JAX flavour of the backend shim (:class:`JaxOps`).

The engines are written once against :class:`~latentfit.inference.ops.Ops`; this file supplies
what JAX does differently from torch:

* randomness from explicit PRNG keys (``jax.random``), split by the engines;
* functional scatter (``table.at[idx].set(rows)``) instead of ``index_copy``;
* autodiff by function transformation (``jax.value_and_grad``, ``jax.hessian``);
* control flow as primitives (``lax.cond``, ``lax.fori_loop``) so that ``step`` can be traced;
* :meth:`JaxOps.scan_steps`: a chunk of engine iterations runs as one compiled loop.
  Compiled chunks are cached by the ``key`` the driver passes (engine, phase, collection flag)
  and by the run's longest chunk (a loop of as many iterations as it is told), so a fit compiles each phase once,
  its shorter tail chunks included, and the progress bar moves between chunks.  The executables themselves are
  shared across fits: a chunk's captured arrays (the model's data) become arguments and the program is keyed on its
  traced text and input avals (:func:`_program_for`), so a same-shaped fit compiles nothing; a function whose
  captures (code, options, data by content) were seen before is not even traced (:mod:`.ops_jax_memo`), and with
  the persistent compilation cache on, nor in a later process (:mod:`.ops_jax_store`).
  Compile time is accumulated in :attr:`JaxOps.compile_time` so benchmarks can report it apart
  from the per-iteration time.

Nothing here imports NumPyro: the adapter in ``latentfit.integrations.numpyro`` builds a model
whose ``ops`` is a :class:`JaxOps`.
"""

from __future__ import annotations

import copy
import functools
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._compilation_cache import enable_from_environment
from . import ops_jax_store as _store
from .ops import FlatOptimizer, Ops
from .ops_jax_memo import fingerprint

# ``LATENTFIT_COMPILATION_CACHE``, for every JAX fit (an NLME model on ``backend="jax"``, the command line), not only
# those through :mod:`latentfit.numpyro`; a cache folder already set (``enable_compilation_cache``) is kept
enable_from_environment()


def default_float_dtype() -> Any:
    """``float64`` when ``jax_enable_x64`` is on, else ``float32`` (JAX's default float)."""
    return jnp.result_type(float)


def _same_dtype(new: Any, old: Any) -> Any:
    """``new`` cast to the dtype of ``old`` (a no-op when they agree)."""
    return new if new.dtype == old.dtype else new.astype(old.dtype)


def _skeleton(tree: Any) -> Any:
    """The dict/list/record structure of ``tree`` with its key order, leaves dropped (to restore orders)."""
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    if hasattr(tree, "_fields"):  # a NamedTuple record (engine states)
        return type(tree)(*(_skeleton(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_skeleton(v) for v in tree)
    return None


def _fields_of(node: Any) -> dict[str, Any]:
    """The fields of an engine state: a NamedTuple record's or a dict's, by name."""
    return node._asdict() if hasattr(node, "_fields") else dict(node)


def _unit_counts(state: Any, unit_axes: dict[str, Any]) -> list[int]:
    """The number of units of every per-unit entry of ``state`` named by ``unit_axes`` (nested specs: sub-records)."""
    out = []
    fields = _fields_of(state)
    for name, spec in unit_axes.items():
        value = fields[name]
        if isinstance(spec, int):
            out.append(jax.tree_util.tree_leaves(value)[0].shape[spec])  # an array, or a dict of per-unit tables
        else:
            out.extend(_unit_counts(value, spec))
    return out


def _index(tree: Any, j: int) -> Any:
    """Row ``j`` of every leaf, keeping dict key order (``tree_map`` would sort the keys)."""
    if isinstance(tree, dict):
        return {k: _index(v, j) for k, v in tree.items()}
    if hasattr(tree, "_fields"):
        return type(tree)(*(_index(v, j) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_index(v, j) for v in tree)
    return None if tree is None else tree[j]


def _scan_upto(f: Callable, init: Any, xs: Any, count: Any) -> tuple[Any, Any]:
    """``lax.scan(f, init, xs)`` over the first ``count`` entries of ``xs`` only (a traced number: one program for
    every count up to the length of ``xs``): a loop of ``count`` iterations whose records fill arrays of ``xs``'s
    length (the entries past ``count`` zero).  ``f`` is traced once (its jaxpr evaluated in the loop's body)."""
    length = jax.tree_util.tree_leaves(xs)[0].shape[0]
    first = jax.tree_util.tree_map(lambda a: a[0], xs)
    closed, out_shape = jax.make_jaxpr(f, return_shape=True)(init, first)
    out_tree = jax.tree_util.tree_structure(out_shape)
    records = jax.tree_util.tree_map(lambda s: jnp.zeros((length, *s.shape), s.dtype), out_shape[1])

    def body(i: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        st, ys = carry
        x = jax.tree_util.tree_map(lambda a: lax.dynamic_index_in_dim(a, i, 0, keepdims=False), xs)
        out = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves((st, x)))
        new, y = jax.tree_util.tree_unflatten(out_tree, out)
        return new, jax.tree_util.tree_map(lambda b, v: lax.dynamic_update_index_in_dim(b, v, i, 0), ys, y)

    return lax.fori_loop(0, count, body, (init, records))


class StackedInfos(Sequence):
    """A compiled chunk's per-iteration info records as the scan stacked them: ``stacked`` (numpy leaves, the
    iterations on axis 0), read as a sequence of per-iteration records (:func:`_index`) where needed; the driver
    checks and records the stacked arrays in one pass (:func:`latentfit.inference.driver._first_nonfinite`)."""

    def __init__(self, stacked: Any, n: int, convert: Callable[[Any], Any] | None = None) -> None:
        self._stacked, self._n, self._convert = stacked, int(n), convert

    @property
    def stacked(self) -> Any:
        """The records as host arrays: ``convert(stacked)`` on first use when given (a chunk dispatched ahead, its
        records still on the device: :attr:`JaxOps.dispatches_ahead`)."""
        if self._convert is not None:
            self._stacked, self._convert = self._convert(self._stacked), None
        return self._stacked

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self._n))]
        if not -self._n <= j < self._n:
            raise IndexError(j)
        return _index(self.stacked, j % self._n)


def _reorder_like(new: Any, old: Any) -> Any:
    """``new`` with the dict key order of ``old`` (recursively)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = {k: _reorder_like(new[k], old[k]) for k in old if k in new}
        out.update({k: v for k, v in new.items() if k not in old})
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        parts = [_reorder_like(a, b) for a, b in zip(new, old)]
        return type(new)(*parts) if hasattr(new, "_fields") else type(new)(parts)
    return new


class ProcessGroup:
    """The processes of a ``jax.distributed`` fit, as a checkpoint sees them: ``rank`` (``jax.process_index()``),
    ``world_size`` (``jax.process_count()``) and :meth:`gather_objects` (every process's value of a small JSON-able
    object, by rank: a collective, every process calls it in the same order)."""

    def __init__(self) -> None:
        self.rank, self.world_size = int(jax.process_index()), int(jax.process_count())

    def gather_objects(self, obj: Any) -> list[Any]:
        import json

        from jax.experimental import multihost_utils

        data = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], dtype=np.int32))).reshape(-1)
        padded = np.zeros(int(sizes.max()), dtype=np.uint8)
        padded[:data.size] = data
        rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
        return [json.loads(bytes(row[:int(n)]).decode("utf-8")) for row, n in zip(rows, sizes)]


def process_block(x: Any) -> tuple[np.ndarray, int | None]:
    """``(host array, unit axis)`` of a leaf of a ``jax.distributed`` fit's state as this process holds it: the whole
    array (axis None) when it is addressable here or replicated, else this process's contiguous block of the axis the
    mesh splits (its devices' shards in order).  What a process of such a fit writes to its checkpoint."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x), None
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0)), None
    spans = [tuple(tuple(sl.indices(n)[:2]) for sl, n in zip(s.index, x.shape)) for s in x.addressable_shards]
    split = sorted({a for span in spans for a, (lo, hi) in enumerate(span) if (lo, hi) != (0, x.shape[a])})
    if len(split) != 1:
        raise ValueError(f"a state entry of shape {x.shape} is split over the processes along axes {split}: "
                         "checkpoints store blocks of one unit axis")
    axis = split[0]
    blocks = {span[axis]: s for span, s in zip(spans, x.addressable_shards)}  # one per block (devices may repeat it)
    order = sorted(blocks)
    if any(a[1] != b[0] for a, b in zip(order, order[1:])):
        raise ValueError(f"this process's blocks of a state entry of shape {x.shape} along axis {axis} are not "
                         f"contiguous ({order})")
    return np.concatenate([np.asarray(blocks[b].data) for b in order], axis=axis), axis


def whole_from_blocks(block: np.ndarray, axis: int) -> np.ndarray:
    """The whole array from every process's ``block`` along ``axis`` (process r's is the r-th: the order of
    :meth:`JaxOps.process_mesh`), on every process (``multihost_utils.process_allgather``; a collective)."""
    from jax.experimental import multihost_utils

    whole = np.asarray(multihost_utils.process_allgather(np.moveaxis(block, axis, 0), tiled=True))
    return np.moveaxis(whole, 0, axis)


def _check_same_on_every_process(state: Any) -> None:
    """Refuse a ``jax.distributed`` fit whose processes built different initial states (each takes its block of the
    units from its own copy): a SHA-256 digest of every entry (shape, dtype, bytes) is gathered from every process
    and compared, 32 bytes per entry whatever the number of units."""
    import hashlib

    from jax.experimental import multihost_utils

    leaves = jax.tree_util.tree_leaves_with_path(state)
    if not leaves:
        return

    def digest(x: Any) -> np.ndarray:
        a = np.ascontiguousarray(np.asarray(x))
        h = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
        return np.frombuffer(h.digest(), dtype=np.uint8)

    digests = np.asarray(multihost_utils.process_allgather(np.stack([digest(x) for _, x in leaves])))
    differ = np.any(digests != digests[:1], axis=(0, 2))  # [entries]
    if differ.any():
        path = leaves[int(np.argmax(differ))][0]
        raise ValueError(f"run(..., distributed=True) on JAX: the processes' initial states differ (state entry "
                         f"{jax.tree_util.keystr(path)}); every process must build the model on the same whole "
                         "data and pass the same key and options (each takes its block of the units)")


#: compiled chunk programs shared by every fit in the process, keyed by the traced program's text and the
#: shapes/dtypes of its inputs and captured arrays (:func:`_program_for`); least recently used dropped first
_PROGRAMS: OrderedDict[Hashable, Any] = OrderedDict()
PROGRAM_CACHE_SIZE = 256
#: traces by the fingerprint of what the traced function captures (:func:`_program_for`): the key of its program in
#: :data:`_PROGRAMS`, its constants, output tree and side record; least recently used dropped first
_TRACES: OrderedDict[Hashable, tuple[Hashable, tuple[Any, ...], Any, dict[str, Any]]] = OrderedDict()
#: most bytes of captured constants (the fits' data) that :data:`_TRACES` keeps alive; least recently used dropped
#: first, and a trace whose constants alone exceed it is not kept (a process fitting many large data sets in turn must
#: not hold on to all of them)
TRACE_CACHE_BYTES = 512 * 2**20
_TRACE_BYTES: dict[Hashable, int] = {}
#: look a function's fingerprint up before tracing it (:mod:`latentfit.inference.ops_jax_memo`); False: always trace
MEMOIZE_TRACES = True
#: programs traced to jaxprs by :func:`_program_for` in this process (``[count]``: tests and benchmarks read it)
TRACES = [0]
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


#: a compiled chunk whose random numbers are made before its loop (``prepare`` of :meth:`JaxOps.scan_steps`) runs as
#: two programs, the draws' and the loop's (:class:`_DrawsThenLoop`), not one.  A warm process spends most of its time
#: before the first iteration deserialising the stored executables, the chunk's the longest (theophylline: 384 kB,
#: ~45-90 ms): split, the main thread reads the draws' program (103 kB) beside the read-ahead thread reading the loop's
#: (293 kB) (:class:`.ops_jax_store._ReadAhead`).  The same numbers and results bit for bit; one more dispatch a chunk.
#: Measured (saemix's default work on theophylline end to end in fresh processes, cache warm, the parent and this
#: alternated, 16 rounds): 0.242 -> 0.204 s (paired median -33 ms).  False: one program a chunk.
SEPARATE_CHUNK_DRAWS = True


class _DrawsThenLoop:
    """A compiled chunk as two programs (:data:`SEPARATE_CHUNK_DRAWS`): ``draws(state, ks)``, the chunk's random
    numbers, then ``loop(state, ks, draws)``, its iterations; called as one program is, ``(state, ks)`` in."""

    def __init__(self, draws: _ConstsBound, loop: _ConstsBound) -> None:
        self.draws, self.loop = draws, loop
        self.compiled_now = draws.compiled_now or loop.compiled_now

    @property
    def programs(self) -> tuple[_ConstsBound, _ConstsBound]:
        return self.draws, self.loop

    def __call__(self, state: Any, ks: Any, *count: Any) -> Any:
        return self.loop(state, ks, *count, self.draws(state, ks))


class _ConstsBound:
    """A compiled program with the arrays its trace captured (data, design matrices, ...) bound as arguments."""

    def __init__(self, executable: Any, consts: tuple[Any, ...], out_tree: Any = None,
                 compiled_now: bool = True) -> None:
        self.executable, self.consts, self.out_tree, self.compiled_now = executable, consts, out_tree, compiled_now

    def __call__(self, *args: Any) -> Any:
        if self.out_tree is None:
            return self.executable(*args)
        flat = jax.tree_util.tree_leaves(args)
        return jax.tree_util.tree_unflatten(self.out_tree, self.executable(self.consts, *flat))


#: XLA:CPU options of the programs compiled here (:func:`_compile`): YNNPACK library fusions for matrix products only.
#: By default XLA:CPU (jaxlib 0.10) also hands reductions, with the element-wise chains fused into them, to YNNPACK,
#: whose float64 ``exp`` and reductions ran 2x slower than XLA's own loops: NLME's density over [5000, 10]
#: observations (two exponentials, a sum over T) took 505 us there against 260 us (single thread), 6.3 of SAEM's
#: 10.6 ms per iteration at N = 5000.  An option also named in ``XLA_FLAGS`` is left to the flag; an XLA that does not
#: know an option compiles without the options.  Set to ``{}`` to compile with XLA's defaults.
#:
#: Also copy insertion with region analysis (``xla_cpu_copy_insertion_use_region_analysis``): XLA:CPU's default copies
#: loop-carried values at each iteration where it cannot prove the copy unneeded, a thunk each (~0.3 us on
#: theophylline's small arrays); the analysis drops most of them, the same values: SAEM's theophylline iteration
#: carried 36 copies (6 in the iteration's body, 3 in each of its 10 kernel steps), 12 with it.
CPU_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_copy_insertion_use_region_analysis": True}
#: XLA:CPU options added to :data:`CPU_COMPILER_OPTIONS` for the compiled chunks of :meth:`JaxOps.scan_steps` whose
#: state has an array of at least :data:`WIDE_CHUNK_ELEMENTS` entries: 512-bit vectors where the CPU has them
#: (AVX-512; a preference, capped at what the CPU has).  XLA:CPU's float64 ``exp`` then runs 8 lanes wide, 1.6
#: instead of 2.5 ns a value, the same values bit for bit; NLME's SAEM iteration on N = 5000 x 10 went from 5.0 to
#: 3.3-4.1 ms of CPU.  LLVM takes longer over wider code (the N = 5000 chunk's compilation ~+30%), hence the
#: threshold: small fits keep XLA's default width.
WIDE_VECTOR_OPTIONS: dict[str, str] = {"xla_cpu_prefer_vector_width": "512"}
#: entries of a chunk's largest state array from which it compiles with :data:`WIDE_VECTOR_OPTIONS` (None: never)
WIDE_CHUNK_ELEMENTS: int | None = 4096
#: XLA:CPU options added to :data:`CPU_COMPILER_OPTIONS` for a small program (every argument under
#: :data:`SMALL_PROGRAM_ELEMENTS` entries, and not a wide chunk): XLA's loop emitters instead of its fusion emitters,
#: the program's kernels in one codegen part, and no YNNPACK fusions (XLA's own code for small matrix products; a
#: YNNPACK fusion is set up at its executable's first call, in every process).  A warm process spends most of its CPU
#: loading the stored executables (XLA:CPU rebuilds each HLO module three times and links each object file, whose
#: sections' ``mprotect`` interrupts the other core); theophylline's programs came in 297 object files (the chunk of
#: iterations 88), now 107 (20), with ~3% fewer HLO instructions.  Measured (saemix's default work on theophylline end
#: to end in fresh processes, cache warm, alternated, 14-16 rounds): wall 0.198 -> 0.185 s, CPU 0.306 -> 0.282 s (the
#: loop emitters alone 0.190 s); then without YNNPACK fusions 0.185 -> 0.169 s and 0.182 -> 0.172 s (the SEs' program
#: 10 -> 5.5 ms).  The values move at the rounding (the IS log-likelihood by 2e-16 relative).  Large programs keep the
#: fusion emitters and YNNPACK's products, faster there (N = 5000's SAEM 12-35% slower with the loop emitters).
SMALL_PROGRAM_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False,
                                         "xla_cpu_parallel_codegen_split_count": 1,
                                         "xla_cpu_experimental_ynn_fusion_type": ""}
#: entries of a program's largest argument from which it compiles without :data:`SMALL_PROGRAM_OPTIONS` (None: never
#: with them)
SMALL_PROGRAM_ELEMENTS: int | None = 4096
#: set when this XLA refused :data:`CPU_COMPILER_OPTIONS` (an older or newer jaxlib): compile with its defaults
_OPTIONS_REFUSED: list[bool] = []
#: set while a chunk of a large state compiles (:meth:`JaxOps._chunk_program`)
_WIDE_VECTORS: list[bool] = [False]
#: while a chunk's loop program is looked up (:class:`_DrawsThenLoop`): how many of its flat arguments, the last ones,
#: are the chunk's draws, which :func:`_is_small_program` leaves out (the loop reads one iteration's row of them)
_TRAILING_DRAWS: list[int] = [0]


def _jaxpr_taint(jaxpr: Any, tainted_in: list[bool]) -> list[bool]:
    """Which outputs of ``jaxpr`` depend on the inputs flagged in ``tainted_in``: taint propagated forward through the
    equations, into call-like equations' inner jaxprs (``pjit``, ``custom_jvp_call``, ...: a ``jaxpr`` or
    ``call_jaxpr`` parameter with the outer equation's inputs and outputs), every output of any other equation reading
    a tainted variable tainted (conservative: never a false "independent")."""
    tainted = {v for v, t in zip(jaxpr.invars, tainted_in) if t}

    def is_tainted(v: Any) -> bool:
        return not hasattr(v, "val") and v in tainted  # literals carry ``val`` and are constants

    for eqn in jaxpr.eqns:
        flags = [is_tainted(v) for v in eqn.invars]
        if not any(flags):
            continue
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's open jaxpr
        if eqn.primitive.name != "scan" and inner is not None and hasattr(inner, "eqns") \
                and len(inner.invars) == len(flags) and len(inner.outvars) == len(eqn.outvars):  # a scan: conservative
            # (its carry takes taint over the iterations, which one pass over the body would miss)
            tainted.update(out for out, t in zip(eqn.outvars, _jaxpr_taint(inner, flags)) if t)
        else:
            tainted.update(eqn.outvars)
    return [is_tainted(v) for v in jaxpr.outvars]


def _is_small_program(args: Any) -> bool:
    """No array of ``args`` (arrays or avals: anything with a shape) has :data:`SMALL_PROGRAM_ELEMENTS` entries."""
    if SMALL_PROGRAM_ELEMENTS is None or _WIDE_VECTORS[0]:
        return False
    leaves = jax.tree_util.tree_leaves(args)
    if _TRAILING_DRAWS[0]:  # a chunk's loop reading its draws made beforehand: sized by its other arguments
        leaves = leaves[:-_TRAILING_DRAWS[0]]
    sizes = [int(np.prod(a.shape)) for a in leaves if hasattr(a, "shape")]
    return max(sizes, default=0) < SMALL_PROGRAM_ELEMENTS


def _compiler_options(platform: str, args: Any = None) -> dict[str, Any]:
    """:data:`CPU_COMPILER_OPTIONS` (and :data:`WIDE_VECTOR_OPTIONS` while a large chunk compiles, or
    :data:`SMALL_PROGRAM_OPTIONS` for a program of small arguments ``args``) for a CPU program, less the options that
    ``XLA_FLAGS`` sets; none elsewhere.  ``args`` None: no size known (no small-program options)."""
    import os

    if platform != "cpu" or _OPTIONS_REFUSED:
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    small = args is not None and _is_small_program(args)
    options = {**CPU_COMPILER_OPTIONS, **(SMALL_PROGRAM_OPTIONS if small else {}),
               **(WIDE_VECTOR_OPTIONS if _WIDE_VECTORS[0] else {})}
    return {k: v for k, v in options.items() if k not in flags}


def _compile(lowered: Any, platform: str) -> Any:
    """``lowered.compile()`` with :func:`_compiler_options` for its arguments (without them if this XLA does not know
    one)."""
    options = _compiler_options(platform, lowered.args_info)
    if options:
        try:
            return lowered.compile(compiler_options=options)
        except Exception as exc:  # an unknown option or enum value: this XLA's defaults from now on
            if not any(name in str(exc) for name in options):
                raise
            _OPTIONS_REFUSED.append(True)
    return lowered.compile()


try:  # JAX's own test of "no trace in progress" (private; without it, every call is taken as traced)
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - another JAX
    _trace_state_clean = None


def _tracing() -> bool:
    """True inside a trace (``jit``, ``grad``, ``vmap``, ...), or when this JAX cannot tell."""
    return _trace_state_clean is None or not _trace_state_clean()


def _special() -> Any:
    """``jax.scipy.special``, imported at first use (a warm process that only calls stored programs never needs it)."""
    import jax.scipy.special

    return jax.scipy.special


def _rotate_left(x: Any, r: int) -> Any:
    return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


def _threefry2x32_unrolled(k1: Any, k2: Any, x1: Any, x2: Any) -> tuple[Any, Any]:
    """The Threefry-2x32 hash (20 rounds; Salmon et al., SC 2011) as JAX computes it, written out: XLA fuses the rounds
    into one loop over the counters, where JAX's CPU lowering runs them as a 5-iteration ``while`` of separate
    passes over memory (3-4x slower for 10^5 values)."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _threefry_bits(key: Any, bit_width: int, shape: tuple[int, ...], swap_last: bool = False) -> Any:
    """``jax.random.bits`` of a threefry key (its data ``uint32[2]``) bit for bit, the hash unrolled: the counters
    of the partitionable threefry (``jax_threefry_partitionable``, JAX's default) are the flat index ``[hi, lo]``;
    other cases (that flag off, 2^32 values or more, a scalar) go to JAX's own implementation.  ``swap_last``: the
    bits of the shape with its last two axes swapped, transposed back (:func:`units_minor_threefry_impl`)."""
    from jax.extend.random import threefry_prng_impl

    size = int(np.prod(shape)) if shape else 1
    logical = tuple(shape[:-2]) + (shape[-1], shape[-2]) if swap_last else tuple(shape)
    if not shape or size >= 2 ** 32 or not jax.config.jax_threefry_partitionable:
        bits = threefry_prng_impl.random_bits(key, bit_width, logical)
        return jnp.swapaxes(bits, -1, -2) if swap_last else bits
    strides = np.cumprod((1,) + tuple(logical[:0:-1]))[::-1]
    if swap_last:  # the counter of entry (..., a, b) is the flat index of (..., b, a) in the logical shape
        strides = np.concatenate([strides[:-2], strides[-1:], strides[-2:-1]])
    lo = sum(lax.broadcasted_iota(np.uint32, tuple(shape), d) * np.uint32(s) for d, s in enumerate(strides))
    b1, b2 = _threefry2x32_unrolled(key[0], key[1], jnp.zeros(tuple(shape), np.uint32), lo)
    if bit_width == 64:
        return lax.shift_left(b1.astype(np.uint64), np.uint64(32)) | b2.astype(np.uint64)
    bits = b1 ^ b2
    return bits if bit_width == 32 else bits.astype({8: np.uint8, 16: np.uint16}[bit_width])


@functools.partial(jax.jit, static_argnums=1)
def _split_unrolled(key: Any, n: int) -> Any:
    """``jax.random.split(key, n)`` of a raw threefry key (partitionable threefry: the hash of the counters ``[0, i]``)
    bit for bit, the hash unrolled (:func:`_threefry2x32_unrolled`); one compiled program when called eagerly."""
    b1, b2 = _threefry2x32_unrolled(key[0], key[1], jnp.zeros((n,), np.uint32), lax.iota(np.uint32, n))
    return jnp.stack([b1, b2], axis=1)


_FAST_THREEFRY: list[Any] = []


def fast_threefry_impl() -> Any:
    """A PRNG implementation equal to JAX's ``threefry2x32`` (same seeds, splits, fold-ins and bits) whose bits come
    from :func:`_threefry_bits`; None if this JAX cannot define one."""
    if not _FAST_THREEFRY:
        try:
            from jax.extend.random import define_prng_impl
            from jax.extend.random import threefry_prng_impl as fry

            _FAST_THREEFRY.append(define_prng_impl(key_shape=(2,), seed=fry.seed, split=fry.split,
                                                   random_bits=_threefry_bits, fold_in=fry.fold_in,
                                                   name="threefry2x32_unrolled", tag="fry_unrolled"))
        except Exception:  # pragma: no cover - a JAX without jax.extend.random
            _FAST_THREEFRY.append(None)
    return _FAST_THREEFRY[0]


_UNITS_MINOR_THREEFRY: list[Any] = []


def units_minor_threefry_impl() -> Any:
    """:func:`fast_threefry_impl` whose ``random_bits(key, width, (..., d, n))`` are those of the shape ``(..., n, d)``
    with the last two axes swapped: a draw made directly in the units-minor layout ``[L, d, n]`` of SAEM's sweep
    (:meth:`JaxOps.normal_units_minor`), the same numbers as ``swapaxes(normal(key, [L, n, d]))`` with each unit's
    coordinates in a vectorised loop over the units; None if this JAX cannot define one."""
    if not _UNITS_MINOR_THREEFRY:
        try:
            from jax.extend.random import define_prng_impl
            from jax.extend.random import threefry_prng_impl as fry

            _UNITS_MINOR_THREEFRY.append(define_prng_impl(
                key_shape=(2,), seed=fry.seed, split=fry.split, fold_in=fry.fold_in,
                random_bits=functools.partial(_threefry_bits, swap_last=True), name="threefry2x32_units_minor",
                tag="fry_units_minor"))
        except Exception:  # pragma: no cover - a JAX without jax.extend.random
            _UNITS_MINOR_THREEFRY.append(None)
    return _UNITS_MINOR_THREEFRY[0]


def _draw_key(key: Any) -> Any:
    """``key`` (raw ``uint32[2]`` threefry data, as ``jax.random.PRNGKey`` makes) as a key of
    :func:`fast_threefry_impl` on CPU, where JAX's own lowering is the rolled loop: the same draws, faster; other keys
    and platforms unchanged."""
    if jax.default_backend() != "cpu" or jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or tuple(key.shape) != (2,):
        return key
    impl = fast_threefry_impl()
    if impl is None:
        return key
    return jax.random.wrap_key_data(key, impl=impl)


def _runtime_one(x: Any) -> Any:
    """An int32 1 that XLA cannot fold (``w // w`` of the first word of ``x``, with its low bit set), for a loop's
    trip count (:meth:`JaxOps.computed_once`, :meth:`JaxOps.repeated`); None outside a trace or for an ``x`` that is
    not unsigned integer data (a typed PRNG key)."""
    if not isinstance(x, jax.core.Tracer) or not jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return None
    word = x.reshape(-1)[0].astype(np.uint32) | np.uint32(1)
    return (word // word).astype(np.int32)


def _raw_threefry(key: Any) -> bool:
    """:meth:`JaxOps.raw_threefry`: ``key`` (or a stack of keys) is raw data ``uint32[..., 2]`` of JAX's
    partitionable threefry."""
    return (tuple(key.shape[-1:]) == (2,) and key.dtype == np.uint32 and bool(jax.config.jax_threefry_partitionable)
            and jax.config.jax_default_prng_impl == "threefry2x32" and not jax.config.jax_enable_custom_prng)


def _one_hash_draws(key: Any, count: int) -> bool:
    """Whether :func:`_normals_and_uniforms` gives ``jax.random``'s draws of ``key``'s splits bit for bit: a raw
    threefry key on CPU (:meth:`JaxOps.raw_threefry`), under 2^32 values, in float32 or float64."""
    return jax.default_backend() == "cpu" and tuple(key.shape) == (2,) and _raw_threefry(key) and count < 2 ** 32


def _normals_and_uniforms(k_normal: Any, num_normal: int, k_uniform: Any, num_uniform: int,
                          dtype: Any) -> tuple[Any, Any]:
    """``(jax.random.normal(k_normal, [num_normal]), jax.random.uniform(k_uniform, [num_uniform]))`` in ``dtype``
    (float32 or float64; raw threefry keys: :func:`_one_hash_draws`) bit for bit, from one threefry pass over both
    keys' counters (entry ``e`` of a draw is the hash of the counters ``[0, e]`` under its key): one copy of the
    unrolled hash in the program instead of two (~180 HLO instructions each, which a warm process deserialises)."""
    total = num_normal + num_uniform
    entry = lax.iota(np.uint32, total)
    first = entry < np.uint32(num_normal)
    counters = jnp.where(first, entry, entry - np.uint32(num_normal))
    b1, b2 = _threefry2x32_unrolled(jnp.where(first, k_normal[0], k_uniform[0]),
                                    jnp.where(first, k_normal[1], k_uniform[1]), jnp.zeros((total,), np.uint32),
                                    counters)
    word = JaxOps.word_from_bits(b1, b2, dtype)
    return JaxOps.normals_from_word(word[:num_normal], dtype), JaxOps.floats_from_word(word[num_normal:], dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _student_t_integer_df(key: Any, shape: tuple[int, ...], df: int, dtype: Any, draw_dtype: Any) -> Any:
    """Standard Student-t draws ``t = x₀ / sqrt(χ²_df / df)`` ``[*shape]`` for an integer ``df``, the chi-square as
    ``−2 Σ_{k ≤ df/2} log(1 − u_k)`` (a sum of df/2 exponentials ×2) plus ``x₁²`` for an odd df: 1 or 2 standard
    normals and ``⌊df/2⌋`` uniforms a draw (drawn in ``draw_dtype`` if given, as :meth:`JaxOps.normal`) instead of
    df + 1 normals, whose inverse error function was most of the cost of the IS log-likelihood's draws (5000 a unit,
    df = 4: 3.5x fewer operations); one compiled program per shape.

    Drawn flat (``[size · k]``, the draws of ``shape + (k,)`` in row-major order: the same numbers, the threefry
    counters being the flat index) and reshaped at the end: XLA:CPU vectorises a fused loop along its minor axis, which
    was the normals' axis of length 1 and the uniforms' of length 2 (scalar code for the hash, the inverse error
    function and the logarithms: the IS log-likelihood's draws 11.6 -> 4.4 ms)."""
    k_normal, k_uniform = jax.random.split(key)
    size, nx, nu = int(np.prod(shape)), 1 + df % 2, df // 2
    if _one_hash_draws(key, size * (nx + nu)):
        x, u = _normals_and_uniforms(k_normal, size * nx, k_uniform, size * nu, draw_dtype or dtype)
        x, u = x.astype(dtype), u.astype(dtype)
    else:
        x = jax.random.normal(_draw_key(k_normal), (size * nx,), dtype=draw_dtype or dtype).astype(dtype)
        u = jax.random.uniform(_draw_key(k_uniform), (size * nu,), dtype=draw_dtype or dtype).astype(dtype)
    chi2 = -2.0 * jnp.sum(jnp.reshape(jnp.log1p(-u), (size, nu)), -1)  # 1 − u in (0, 1]: a finite log
    x = jnp.reshape(x, (size, nx))
    if df % 2:
        chi2 = chi2 + x[:, 1] * x[:, 1]
    return jnp.reshape(x[:, 0] / jnp.sqrt(chi2 / df), shape)


def _aval_key(x: Any) -> tuple[Any, ...]:
    """Shape, dtype, weak type and placement of an input: what a compiled program is specialised on."""
    return (tuple(np.shape(x)), str(jnp.result_type(x)), bool(getattr(x, "weak_type", False)),
            str(getattr(x, "sharding", "")))


def _program_for(fn: Callable, *args: Any, side: dict[str, Any] | None = None) -> _ConstsBound:
    """``fn`` compiled for ``args`` with every array it captures passed as an argument, reused across fits.

    ``fn`` is traced to a jaxpr (cheap); its captured constants (the model's data, index maps, ...) are lifted to
    arguments, so two fits of same-shaped models with different data trace to the same program text and share one
    XLA executable (issue "Core v2", item 3: a second fit compiles nothing).  The key is the program's text
    (function addresses removed: they name differentiation rules), the input tree and every input's aval; a
    program that calls back to the host is compiled for its own closure only.

    Before tracing, ``fn``'s :func:`~latentfit.inference.ops_jax_memo.fingerprint` (its code and everything it
    captures, arrays by content) is looked up in :data:`_TRACES`: a function that captures what an earlier one
    captured traces to the same program from equal constants, so the earlier trace's executable and constants are
    used without tracing (a later same-data fit: ~1 ms instead of ~50 ms per program).  ``side``: a dict the trace
    fills (the info skeleton of :meth:`JaxOps.scan_steps`), saved with the trace and restored on a memo hit.
    """
    flat, in_tree = jax.tree_util.tree_flatten(args)
    in_avals = tuple(_aval_key(x) for x in flat)
    memo_key = memo_entry = None
    if MEMOIZE_TRACES:
        found = fingerprint(fn)
        memo_key = None if found is None else (found, in_tree, in_avals)
    if memo_key is not None:
        memo_entry = _HashedKey(memo_key)
        traced = _TRACES.get(memo_entry)
        executable = None if traced is None else _PROGRAMS.get(traced[0])
        if executable is not None:
            _TRACES.move_to_end(memo_entry)
            _PROGRAMS.move_to_end(traced[0])
            if side is not None:
                side.update(traced[3])
            return _ConstsBound(executable, traced[1], traced[2], compiled_now=False)
    digest = _store.stable_digest(memo_key) if memo_key is not None and _store.store_dir() is not None else None
    if digest is not None:
        stored = _from_store(digest, flat)
        if stored is not None:
            program_key, executable, consts, out_tree, saved_side = stored
            _PROGRAMS[program_key] = executable
            while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
                _PROGRAMS.popitem(last=False)
            _remember_trace(memo_entry, (program_key, consts, out_tree, saved_side))
            if side is not None:
                side.update(saved_side)
            return _ConstsBound(executable, consts, out_tree, compiled_now=True)
    TRACES[0] += 1
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    consts = tuple(closed.consts)
    text = str(closed.jaxpr)
    shared = "callback" not in text  # a host callback is known only by its address: such a program is not shared
    key = (_ADDRESS.sub("", text), in_tree, tuple(_aval_key(c) for c in consts), in_avals)
    out_tree = jax.tree_util.tree_structure(out_shape)
    hit = _PROGRAMS.get(key) if shared else None
    if hit is not None:
        _PROGRAMS.move_to_end(key)
        executable, compiled_now = hit, False
        if digest is not None:  # a later process loads this trace too (same program, its own constants)
            _exported_program(closed.jaxpr, consts, flat, out_tree, side, digest, compile=False, key=key)
    else:
        jaxpr = closed.jaxpr

        def run(consts_: tuple[Any, ...], *flat_: Any) -> Any:
            return jax.core.eval_jaxpr(jaxpr, list(consts_), *flat_)

        executable = _exported_program(jaxpr, consts, flat, out_tree, side, digest, key=key) \
            if shared and digest else None
        if executable is None:
            executable = _compile(jax.jit(run).lower(consts, *flat), jax.default_backend())
        compiled_now = True
        if shared:
            _PROGRAMS[key] = executable
        while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
            _PROGRAMS.popitem(last=False)
    if shared and memo_entry is not None:
        _remember_trace(memo_entry, (key, consts, out_tree, dict(side or {})))
    return _ConstsBound(executable, consts, out_tree, compiled_now=compiled_now)


def run_traced(closed: Any) -> list[Any]:
    """The outputs of a traced ``ClosedJaxpr`` without inputs, computed by one compiled program whose captured arrays
    are its arguments: a set-up computation traced once for its Python side (a model's first run), then run as one
    executable, shared with every same-shaped trace (:data:`_PROGRAMS`) and served by JAX's persistent cache in a later
    process, instead of one small program per operation."""
    consts = tuple(closed.consts)
    text = str(closed.jaxpr)
    key = ("run_traced", _ADDRESS.sub("", text), tuple(_aval_key(c) for c in consts))
    shared = "callback" not in text
    executable = _PROGRAMS.get(key) if shared else None
    if executable is None:
        jaxpr = closed.jaxpr
        # with the store on, the executable is kept under a digest of the key (the program's text, its constants'
        # avals, the versions and latentfit's source): a later process calls it without lowering anything
        digest = _store.stable_digest(key) if shared and STORE_EXECUTABLES and _store.store_dir() is not None \
            else None

        def compiled() -> Any:
            def run(consts_: tuple[Any, ...]) -> Any:
                return jax.core.eval_jaxpr(jaxpr, list(consts_))

            return _compile_stored(run, (consts,), digest)

        if digest is not None:
            options = _compiler_options(jax.default_backend(), (consts,))
            stored = _store.load_executable(digest, options, list(consts), len(jaxpr.outvars))
            if stored is not None:
                executable = _FirstRunChecked(stored, compiled, lambda: _store.discard_executable(digest, options))
        if executable is None:
            executable = compiled()
        if shared:
            _PROGRAMS[key] = executable
            while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
                _PROGRAMS.popitem(last=False)
    else:
        _PROGRAMS.move_to_end(key)
    return list(executable(consts))


def _exported_program(jaxpr: Any, consts: tuple[Any, ...], flat: list[Any], out_tree: Any,
                      side: dict[str, Any] | None, digest: str, compile: bool = True, key: Hashable = None) -> Any:
    """The traced program serialised with :mod:`jax.export`, kept in the on-disk store under ``digest``
    (:mod:`.ops_jax_store`), and compiled from the exported form: the executable a later process loads from JAX's
    persistent cache without tracing.  None when ``jax.export`` cannot carry the program (host callbacks, effects,
    typed-key or weak-typed constants, ...): it is compiled as before and kept in memory only.  ``compile=False``:
    store it only (its executable is already in :data:`_PROGRAMS`).  ``key``: the program's text key
    (:func:`_program_for`): where the store kept an export of that program (another key's trace of it: other data,
    other initial values), it is taken instead of lowering the program again (theophylline's five: ~0.75 s)."""
    export_key = _store.stable_digest(("exported", key)) if key is not None else None
    blob = None if export_key is None else _store.load_export(export_key)
    exported = None
    if blob is None:
        num_consts = len(consts)

        def run_flat(*all_: Any) -> Any:
            return jax.core.eval_jaxpr(jaxpr, list(all_[:num_consts]), *all_[num_consts:])

        try:
            exported = jax.export.export(jax.jit(run_flat))(*consts, *flat)
            blob = exported.serialize()
        except Exception as exc:  # noqa: BLE001 - a program jax.export cannot carry: compiled as before, not stored
            _store.STATS["unstorable"] += 1
            _store.log.debug("not stored (jax.export): %r", exc)
            return None
        if export_key is not None:
            _store.save_export(export_key, blob)
    if not _store.save(digest, blob, consts, out_tree, dict(side or {})):
        return None
    if not compile:
        return exported
    program = _store.program_digest(blob)

    def compiled() -> Any:
        return _compile_exported(jax.export.deserialize(bytearray(blob)) if exported is None else exported, consts,
                                 flat, program)

    # the same program traced under another key (other data or initial values: its constants are arguments) was
    # compiled and kept before: its executable, not XLA's compilation (theophylline: ~3 s of the five programs)
    stored = _stored_executable(program, consts, flat, out_tree.num_leaves, compiled) if STORE_EXECUTABLES else None
    return compiled() if stored is None else stored


def _stored_executable(program: str, consts: tuple[Any, ...], flat: list[Any], num_outputs: int,
                       compiled: Callable[[], Any]) -> Any:
    """The store's executable of the exported program ``program`` (:func:`.ops_jax_store.program_digest`) for
    ``(consts, *flat)``, its first run checked (``compiled``: the fallback), or None (none kept)."""
    options = _compiler_options(jax.default_backend(), (consts, *flat))
    stored = _store.load_executable(program, options, [*consts, *flat], num_outputs)
    if stored is None:
        return None
    return _FirstRunChecked(stored, compiled, lambda: _store.discard_executable(program, options))


def _compile_exported(exported: Any, consts: tuple[Any, ...], flat: list[Any], digest: str | None = None) -> Any:
    """``Exported.call`` lowered (one primitive: nothing of the model is traced) and compiled for ``(consts, *flat)``
    with :func:`_compiler_options` (JAX's persistent cache serves it in a later process); with ``digest``, the
    executable is also kept in the on-disk store (:func:`.ops_jax_store.save_executable`), which a later process loads
    without lowering anything."""

    def call(consts_: tuple[Any, ...], *flat_: Any) -> Any:
        return exported.call(*consts_, *flat_)

    return _compile_stored(call, (consts, *flat), digest)


def _compile_stored(fn: Callable, args: tuple[Any, ...], digest: str | None) -> Any:
    """``jax.jit(fn)`` lowered for ``args`` and compiled with :func:`_compiler_options`; with ``digest`` (and
    :data:`STORE_EXECUTABLES`), compiled under a name that carries it, without source locations
    (:func:`_strip_debug_info`), and its executable kept in the on-disk store unless JAX's cache served it
    (:data:`_CACHE_HITS`)."""
    store = digest is not None and STORE_EXECUTABLES
    if store:  # the module's name, hence JAX's cache key, carries the digest (:data:`_CACHE_HITS`)
        fn.__name__ = fn.__qualname__ = f"stored_{digest[:24]}"
    platform = jax.default_backend()
    hits = _CACHE_HITS[0]
    lowered = jax.jit(fn).lower(*args)
    if store:
        _strip_debug_info(lowered)
    compiled = _compile(lowered, platform)
    if store:
        if _CACHE_HITS[0] == hits:
            _store.save_executable(digest, _compiler_options(platform, args), compiled)
        else:
            _store.STATS["executables_from_jax_cache"] += 1
    return compiled


def _strip_debug_info(lowered: Any) -> None:
    """Remove the source locations (Python file, line, the ops' name stacks) from a lowered module before it is
    compiled for the store: the executable's HLO then carries no op metadata, which was a third of its bytes and about
    an eighth of the time a later process takes to deserialise it (theophylline's stored executables 3.0 -> 1.9 MB,
    0.26 -> 0.23 s of CPU); the compiled code is the same (estimates bit-identical).  Best effort: a JAX whose lowered
    module is not the one it compiles, or without the pass, keeps the locations."""
    try:
        from jax._src.lib.mlir import passmanager

        module = lowered.compiler_ir("stablehlo")
        with module.context:
            passmanager.PassManager.parse("builtin.module(strip-debuginfo)").run(module.operation)
    except Exception as exc:  # noqa: BLE001 - locations are only debugging aids
        _store.log.debug("locations kept: %r", exc)


#: executables served by JAX's persistent cache in this process.  Such an executable is not kept in the store: XLA:CPU
#: serialises a deserialised executable without part of its code (a program whose ``log`` is an XLA-internal function
#: came back 20 KB short and failed in the next process: "Function wrapped_log not found").  Stored programs are
#: compiled under a name that carries their digest (:func:`.ops_jax_store.program_digest`), so JAX's cache serves one
#: only when that program's executable was lost (absent, damaged, foreign), not a program of another key (e.g. the
#: same program after an edit of latentfit, whose environment every executable's header records).
_CACHE_HITS = [0]


def _count_cache_hit(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[0] += 1


jax.monitoring.register_event_listener(_count_cache_hit)


#: keep the compiled executables of stored programs in the on-disk store and call them from there in a later process
#: (:func:`.ops_jax_store.load_executable`); False: JAX's persistent cache serves them (after lowering)
STORE_EXECUTABLES = True


def _from_store(digest: str, flat: list[Any]) -> tuple[Hashable, Any, tuple[Any, ...], Any, dict[str, Any]] | None:
    """``(program key, executable, constants, output tree, side record)`` of a stored trace (:mod:`.ops_jax_store`),
    or None (no entry, an unreadable one, or one whose inputs do not match ``flat``)."""
    found = _store.load(digest, deserialize=False)
    if found is None:
        return None
    blob, consts, out_tree, side = found
    program = _store.program_digest(blob)  # entries of one program share its executable
    program_key = ("stored", program)
    executable = _PROGRAMS.get(program_key)
    def compiled() -> Any:
        exported = jax.export.deserialize(bytearray(blob))
        expected = [(tuple(a.shape), str(a.dtype)) for a in exported.in_avals]
        if expected != [(tuple(np.shape(x)), str(jnp.result_type(x))) for x in (*consts, *flat)] \
                or exported.out_tree.num_leaves != out_tree.num_leaves:
            raise ValueError("the entry's inputs or outputs do not match")
        return _compile_exported(exported, consts, flat, program)

    if executable is None and STORE_EXECUTABLES:
        executable = _stored_executable(program, consts, flat, out_tree.num_leaves, compiled)
    if executable is None:
        try:
            executable = compiled()
        except Exception as exc:  # noqa: BLE001 - an entry that does not fit: trace instead
            _store.STATS["rejected"] += 1
            _store.log.debug("entry %s ignored: %r", digest, exc)
            return None
    return program_key, executable, consts, out_tree, side


class _FirstRunChecked:
    """A stored executable whose first run is awaited: if XLA fails to run it (an executable whose checksum holds but
    whose code is incomplete, e.g. "Function ... not found"), it is discarded and the program compiled from its trace
    instead (``fallback``), so a bad entry costs a compilation, never the fit."""

    def __init__(self, stored: Any, fallback: Callable[[], Any], discard: Callable[[], None]) -> None:
        self.run, self._fallback, self._discard = stored, fallback, discard

    def __call__(self, *args: Any) -> Any:
        if self._fallback is None:
            return self.run(*args)
        try:
            out = jax.block_until_ready(self.run(*args))
        except jax.errors.JaxRuntimeError as exc:
            _store.STATS["rejected"] += 1
            _store.log.debug("stored executable failed to run, compiled instead: %r", exc)
            self._discard()
            self.run = self._fallback()
            out = self.run(*args)
        self._fallback = self._discard = None
        return out


class _HashedKey:
    """A memo key of :data:`_TRACES` with its hash computed once: a fingerprint is a deep tuple, and a tuple's hash is
    recomputed over every node at each dict operation (five per new trace: a few ms over a fit's programs in a fresh
    process, where the strings' hashes are not cached yet).  Equal when the keys are equal."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self._hash = hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HashedKey) and self._hash == other._hash and self.key == other.key


def _remember_trace(memo_key: Hashable, entry: tuple[Hashable, tuple[Any, ...], Any, dict[str, Any]]) -> None:
    """Keep ``entry`` in :data:`_TRACES`, then drop the least recently used traces until at most
    :data:`PROGRAM_CACHE_SIZE` remain and their constants hold at most :data:`TRACE_CACHE_BYTES`."""
    size = sum(int(getattr(c, "nbytes", 0)) for c in entry[1])
    if size > TRACE_CACHE_BYTES:
        return
    _TRACES.pop(memo_key, None)
    _TRACE_BYTES.pop(memo_key, None)
    _TRACES[memo_key], _TRACE_BYTES[memo_key] = entry, size
    total = sum(_TRACE_BYTES.values())
    while _TRACES and (len(_TRACES) > PROGRAM_CACHE_SIZE or total > TRACE_CACHE_BYTES):
        dropped, _ = _TRACES.popitem(last=False)
        total -= _TRACE_BYTES.pop(dropped, 0)


class SharedJit:
    """``jax.jit`` whose executables are shared by every function that traces to the same program.

    A closure over one model's data (a density, a residual function) is compiled once per input signature; a second
    model of the same shapes reuses the executable with its own data bound as arguments (:func:`_program_for`).
    Called inside a trace (an engine step), ``fn`` is simply inlined.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._programs: dict[Hashable, _ConstsBound] = {}

    def __trace_fingerprint__(self) -> Any:
        """What a trace through this function reads: the function (its executables are a cache)."""
        return self.fn

    def __call__(self, *args: Any) -> Any:
        flat, tree = jax.tree_util.tree_flatten(args)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in flat):
            return self.fn(*args)
        signature = (tree, self._signature(flat))
        program = self._programs.get(signature)
        if program is None:
            program = self._programs[signature] = self._compile(args)
        return program(*args)

    def _signature(self, flat: list[Any]) -> tuple[Any, ...]:
        """What a compiled program is specialised on, per input leaf."""
        return tuple(_aval_key(x) for x in flat)

    def _compile(self, args: tuple[Any, ...]) -> Callable:
        """The program for ``args`` (outside a trace)."""
        return _program_for(self.fn, *args)


#: element-wise functions of one array (the parameters' usual transforms): :meth:`JaxOps.shape_of` needs no trace
_ELEMENTWISE_UNARY = (jnp.log, jnp.exp, jnp.log1p, jnp.expm1, jnp.sqrt, jnp.square, jnp.tanh, jnp.arctanh)


class JaxOps(Ops):
    """JAX flavour: ``xp = jax.numpy``, explicit PRNG keys, compiled chunks of iterations."""

    name = "jax"
    fast_draw_dtype = "float32"
    jittable = True
    #: the driver dispatches a chunk before it reads the previous chunk's records (:class:`StackedInfos`, copied from
    #: the device when read): the host's bookkeeping of one chunk overlaps the next chunk's iterations
    dispatches_ahead = True
    #: small SPD solves and inverses in ``jnp`` ops (:meth:`Ops.spd_solve`): a compiled program without LAPACK custom
    #: calls needs no LAPACK kernels, whose first use in a process imports scipy's bindings (~0.1 s of a warm run)
    spd_without_lapack = True

    def __init__(self, dtype: Any = None, device: Any = None) -> None:
        self.xp = jnp
        self.dtype = jnp.dtype(dtype) if dtype is not None else default_float_dtype()
        self.device = device
        #: compiled chunk functions, by (driver key, loop length, loop of a given count, mesh)
        self._compiled: dict[tuple[Hashable, ...], Any] = {}
        #: seconds spent tracing + compiling chunk functions (cumulative)
        self.compile_time = 0.0
        #: number of chunk compilations
        self.num_compiles = 0
        #: ``(mesh, {state entry: unit axis})`` while a run shards its units over devices (:meth:`shard_units`)
        self._units_mesh: tuple[Any, dict[str, int]] | None = None
        #: the model's per-unit arrays of that run, ``{id: (array, unit axis)}`` (:meth:`_sharded_program`)
        self._unit_data: dict[int, tuple[Any, int]] = {}
        #: dtype of the normal draws when it is not ``dtype`` (:meth:`with_draw_dtype`); None: ``dtype``
        self.draw_dtype: Any = None

    # --- creation -----------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        if isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            if x.dtype == jnp.bool_ or (dtype is None and not jnp.issubdtype(x.dtype, jnp.floating)):
                return x
            return x.astype(dtype or self.dtype)
        arr = np.asarray(x)
        if arr.dtype == bool or (dtype is None and np.issubdtype(arr.dtype, np.integer)):
            target = arr.dtype  # jnp.asarray would run (and compile) a conversion program
        elif _tracing():  # a constant of the trace
            return jnp.asarray(arr, dtype=dtype or self.dtype)
        else:  # floats, eagerly: ~30 against ~150 us a call through jnp.asarray (a model's data are dozens of arrays)
            target = dtype or self.dtype
        # a host copy in JAX's dtype (numpy's cast rounds as XLA's does), then a transfer
        return jax.device_put(np.array(arr, dtype=jax.dtypes.canonicalize_dtype(target), copy=True))

    def placed_like(self, values: dict[str, np.ndarray], like: Any) -> dict[str, Any]:
        """Host arrays ``values`` on the devices, with the sharding, of the first array of ``like`` (a pytree), their
        dtypes kept: one batched transfer, no program."""
        leaves = [x for x in jax.tree_util.tree_leaves(like) if isinstance(x, jax.Array)]
        host = [np.asarray(v) for v in values.values()]
        placed = jax.device_put(host, leaves[0].sharding) if leaves else jax.device_put(host)
        return dict(zip(values, placed))

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return jnp.zeros(shape, dtype=dtype or self.dtype)

    def ones(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return jnp.ones(shape, dtype=dtype or self.dtype)

    def arange(self, n: int) -> Any:
        return jnp.arange(n)

    #: attributes that no trace reads (caches and timers), left out of :meth:`__trace_fingerprint__`
    _UNTRACED = frozenset({"_compiled", "_jitted", "compile_time", "num_compiles"})

    def __trace_fingerprint__(self) -> dict[str, Any]:
        """The shim's settings (dtype, device, draw dtype, mesh), not its compiled chunks or timers
        (:mod:`latentfit.inference.ops_jax_memo`)."""
        return {k: v for k, v in vars(self).items() if k not in self._UNTRACED}

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def shape_of(self, f: Callable, *args: Any) -> tuple[int, ...]:
        """``jax.eval_shape``: an abstract evaluation (eagerly, each operation of ``f`` would be a program to lower);
        an element-wise function of one array (a parameter's ``log`` transform): that array's shape, without a
        trace (~0.3 ms each)."""
        if len(args) == 1 and hasattr(args[0], "shape") and any(f is g for g in _ELEMENTWISE_UNARY):
            return tuple(args[0].shape)
        return tuple(jax.eval_shape(f, *args).shape)

    # --- random -------------------------------------------------------------------------------
    def key(self, seed: int) -> Any:
        seed = int(seed)
        if 0 <= seed < 2 ** 31 and jax.config.jax_default_prng_impl == "threefry2x32" \
                and not jax.config.jax_enable_custom_prng:
            # the threefry key's data [seed >> 32, seed & 0xFFFFFFFF], made on the host: ``PRNGKey`` runs two small
            # programs (each a lowering and a compilation or cache read in a fresh process) for these two integers
            return jax.device_put(np.array([0, seed], dtype=np.uint32))
        return jax.random.PRNGKey(seed)

    def split(self, key: Any, n: int = 2) -> Any:
        """``n`` new keys, stacked (unpack them, iterate, or index with a traced integer).  On CPU a raw threefry key
        (``uint32[2]``, partitionable threefry) is split by :func:`_split_unrolled`: the same keys, without the rolled
        5-iteration ``while`` loop of JAX's CPU lowering (some forty small thunks per split, 8 splits per SAEM
        iteration)."""
        if (jax.default_backend() == "cpu" and tuple(key.shape) == (2,) and key.dtype == np.uint32
                and jax.config.jax_threefry_partitionable and 0 < n < 2 ** 32
                and jax.config.jax_default_prng_impl == "threefry2x32"):
            return _split_unrolled(key, int(n))
        return jax.random.split(key, n)

    def normal(self, key: Any, shape: tuple[int, ...]) -> Any:
        """``jax.random.normal`` (threefry bits from :func:`fast_threefry_impl`: the same numbers)."""
        key = _draw_key(key)
        if self.draw_dtype is not None:  # drawn in a cheaper dtype, cast (exactly) to the arrays' dtype
            return jax.random.normal(key, tuple(shape), dtype=self.draw_dtype).astype(self.dtype)
        return jax.random.normal(key, tuple(shape), dtype=self.dtype)

    def normal_units_minor(self, key: Any, shape: tuple[int, ...]) -> Any:
        """:meth:`normal` of the shape ``(..., n, d)`` laid out as ``shape = (..., d, n)`` (its last two axes swapped):
        the same numbers, drawn in the units-minor layout (:func:`units_minor_threefry_impl`; on another platform, or
        for a key that is not raw threefry data, the draw transposed)."""
        shape = tuple(shape)
        impl = units_minor_threefry_impl() if jax.default_backend() == "cpu" else None
        if impl is None or jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or tuple(key.shape) != (2,) \
                or len(shape) < 2:
            return jnp.swapaxes(self.normal(key, shape[:-2] + (shape[-1], shape[-2])), -1, -2)
        key = jax.random.wrap_key_data(key, impl=impl)
        if self.draw_dtype is not None:
            return jax.random.normal(key, shape, dtype=self.draw_dtype).astype(self.dtype)
        return jax.random.normal(key, shape, dtype=self.dtype)

    def with_draw_dtype(self, dtype: Any) -> JaxOps:
        """A view of this shim whose :meth:`normal` and :meth:`uniform` draws are made in ``dtype`` and cast to the
        arrays' dtype (the same compiled-chunk cache).  ``float32`` normals cost about a third of ``float64`` ones on
        CPU (18 vs 53 ns per value: the inverse error function in float64 dominates); they are the normal law
        quantised at 2^-23 in probability, tails cut near ±5.4 sd (a 1e-7 probability): about 1e-7 sd from it in
        Wasserstein distance, far below the Monte-Carlo error of the MCMC proposals they drive.  ``float32``
        uniforms (32 random bits a value instead of 64) lie on the grid ``k 2^-23``: an MH test ``log u < log r``
        then accepts with probability ``⌈r 2^23⌉ 2^-23``, at most 1.2e-7 above r."""
        view = copy.copy(self)
        view.draw_dtype = None if dtype is None or jnp.dtype(dtype) == self.dtype else jnp.dtype(dtype)
        return view

    def uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        """``jax.random.uniform`` (threefry bits from :func:`fast_threefry_impl`: the same numbers); in the view's draw
        dtype if any (:meth:`with_draw_dtype`: SAEM's acceptance uniforms), cast exactly to the arrays' dtype."""
        if self.draw_dtype is not None:
            return jax.random.uniform(_draw_key(key), tuple(shape), dtype=self.draw_dtype).astype(self.dtype)
        return jax.random.uniform(_draw_key(key), tuple(shape), dtype=self.dtype)

    # --- threefry by hand: several draws from different keys in one hash (a compiled chunk's draws) ----------------
    def raw_threefry(self, key: Any) -> bool:
        """Whether ``key`` is raw threefry data (``uint32[2]``) of JAX's partitionable threefry, whose draws
        :meth:`threefry_hash` and :meth:`floats_from_bits` reproduce bit for bit."""
        return _raw_threefry(key)

    def threefry_hash(self, keys: Any, counters: Any) -> tuple[Any, Any]:
        """The threefry-2x32 hash ``(b1, b2)`` of the counters ``[0, counters]`` under per-entry keys ``keys
        [..., E, 2]`` (``counters [E]``): entry e of a key's ``split`` is ``(b1, b2)`` of its index, its 32 random bits
        (``random_bits``) of the flat index e are ``b1 ^ b2`` and its 64 bits ``b1 << 32 | b2`` (raw keys,
        partitionable threefry: :meth:`raw_threefry`)."""
        if not isinstance(counters, jax.Array):  # a traced table row stays as it is
            counters = jnp.asarray(np.asarray(counters, dtype=np.uint32))
        return _threefry2x32_unrolled(keys[..., 0], keys[..., 1], jnp.zeros(counters.shape, np.uint32), counters)

    @staticmethod
    def floats_from_bits(b1: Any, b2: Any, dtype: Any, low: float = 0.0, high: float = 1.0) -> Any:
        """``jax.random.uniform`` on ``[low, high)`` in ``dtype`` from the hash :meth:`threefry_hash` gave its bits
        (JAX's construction: the mantissa bits under the exponent of 1, minus 1, scaled), bit for bit."""
        return JaxOps.floats_from_word(JaxOps.word_from_bits(b1, b2, dtype), dtype, low, high)

    @staticmethod
    def word_from_bits(b1: Any, b2: Any, dtype: Any) -> Any:
        """The random word of a ``dtype`` draw (``jax.random.bits`` of its width) from the hash's ``(b1, b2)``:
        ``b1 << 32 | b2`` (64 bits) or ``b1 ^ b2`` (32 bits)."""
        bits = jnp.finfo(jnp.dtype(dtype)).bits
        if bits == 64:
            return lax.shift_left(b1.astype(np.uint64), np.uint64(32)) | b2.astype(np.uint64)
        if bits == 32:
            return b1 ^ b2
        raise ValueError(f"draws of {jnp.dtype(dtype)} are not made from threefry bits here")

    @staticmethod
    def floats_from_word(bits: Any, dtype: Any, low: float = 0.0, high: float = 1.0) -> Any:
        """:meth:`floats_from_bits` from the random word :meth:`word_from_bits` gave."""
        dtype = jnp.dtype(dtype)
        finfo = jnp.finfo(dtype)
        uint = np.uint64 if finfo.bits == 64 else np.uint32
        one = np.array(1.0, dtype).view(uint)
        floats = lax.bitcast_convert_type(lax.shift_right_logical(bits, uint(finfo.bits - finfo.nmant)) | one,
                                          dtype) - jnp.array(1.0, dtype)
        low, high = jnp.array(low, dtype), jnp.array(high, dtype)
        return lax.max(low, floats * (high - low) + low)

    @classmethod
    def normals_from_bits(cls, b1: Any, b2: Any, dtype: Any) -> Any:
        """``jax.random.normal`` in ``dtype`` from the hash's bits (``√2 erfinv(u)``, ``u`` uniform on
        ``(−1, 1)``), bit for bit."""
        return cls.normals_from_word(cls.word_from_bits(b1, b2, dtype), dtype)

    @classmethod
    def normals_from_word(cls, bits: Any, dtype: Any) -> Any:
        """:meth:`normals_from_bits` from the random word :meth:`word_from_bits` gave."""
        dtype = jnp.dtype(dtype)
        low = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
        u = cls.floats_from_word(bits, dtype, low, 1.0)
        return lax.mul(np.array(np.sqrt(2), dtype), lax.erf_inv(u))

    def stacked_draws(self, draw: Callable[[Any], Any], keys: Any) -> Any:
        """``draw`` of each key of ``keys`` stacked, as one vectorised draw (``jax.vmap``: the same numbers; one fusion
        over ``[K, ...]`` instead of K)."""
        return jax.vmap(draw)(keys)

    def shared_uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        """Uniform draws every unit shares (saemix's random block), in the arrays' dtype whatever the draw dtype."""
        return jax.random.uniform(_draw_key(key), tuple(shape), dtype=self.dtype)

    def randint(self, key: Any, shape: tuple[int, ...], high: int) -> Any:
        return jax.random.randint(key, tuple(shape), 0, high)

    def permutation(self, key: Any, n: int) -> Any:
        return jax.random.permutation(key, n)

    def student_t(self, key: Any, df: float, shape: tuple[int, ...]) -> Any:
        """Standard Student-t draws with ``df`` degrees of freedom: for an integer ``df``, a normal over the square
        root of a chi-square made of exponentials (:func:`_student_t_integer_df`); else ``jax.random.t``, whose
        gamma sampler takes ~3.4 s of CPU to compile for each new shape (a first importance-sampling log-likelihood
        compiled it for every batch shape)."""
        if float(df).is_integer() and df >= 1:
            return _student_t_integer_df(key, tuple(int(s) for s in shape), int(df), jnp.dtype(self.dtype),
                                           None if self.draw_dtype is None else jnp.dtype(self.draw_dtype))
        return jax.random.t(key, float(df), tuple(shape), dtype=self.dtype)

    # --- per-unit streams (counter-based: ``fold_in``) ---------------------------------------------
    def stream_key(self, key: Any, seed: int) -> Any:
        """Root key of the per-unit streams: the run's key (``seed`` is already in it)."""
        return key

    def fold_in(self, key: Any, data: Any) -> Any:
        """``jax.random.fold_in`` of a scalar, or vmapped over an integer vector (stacked keys)."""
        data = jnp.asarray(data)
        if data.ndim == 0:
            return jax.random.fold_in(key, data)
        return jax.vmap(jax.random.fold_in, (None, 0))(key, data)

    def _per_unit(self, draw: Callable, key: Any, units: Any, shape: tuple[int, ...], axis: int) -> Any:
        shape = tuple(int(s) for s in shape)
        axis = axis % len(shape)
        units = jnp.asarray(units)
        if units.shape[0] != shape[axis]:
            raise ValueError(f"per-unit draws of shape {shape}: axis {axis} has {shape[axis]} entries but "
                             f"{units.shape[0]} unit ids were given")
        rest = shape[:axis] + shape[axis + 1:]
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, units)
        draws = jax.vmap(lambda k: draw(k, rest, dtype=self.dtype))(keys)
        return jnp.moveaxis(draws, 0, axis)

    def per_unit_normal(self, key: Any, units: Any, shape: tuple[int, ...], axis: int = 1) -> Any:
        """Standard normal draws of ``shape`` whose slice ``u`` along ``axis`` comes from the key
        ``fold_in(key, units[u])``: they depend on ``(key, unit id)`` and their position only."""
        return self._per_unit(jax.random.normal, key, units, shape, axis)

    def per_unit_uniform(self, key: Any, units: Any, shape: tuple[int, ...], axis: int = 1) -> Any:
        """Uniform draws on [0, 1), per unit as :meth:`per_unit_normal`."""
        return self._per_unit(jax.random.uniform, key, units, shape, axis)

    def stream_uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        """Uniform draws from the stream ``key`` itself (shared by all units)."""
        return jax.random.uniform(key, tuple(shape), dtype=self.dtype)

    # --- data parallelism: the unit axis over a device mesh ---------------------------------------------
    def process_mesh(self) -> Any:
        """The mesh ``"units"`` over the devices of every process of a ``jax.distributed`` run (``jax.devices()``,
        process 0's first): ``run(..., distributed=True)`` shards the units over it, process r holding the r-th
        contiguous block, and XLA's collectives (gloo on CPU, NCCL on GPU) sum the statistics across processes."""
        if not jax.distributed.is_initialized():
            raise RuntimeError("distributed=True on JAX needs jax.distributed.initialize(coordinator_address=..., "
                               "num_processes=..., process_id=...) first (on CPU, after jax.config.update("
                               "'jax_cpu_collectives_implementation', 'gloo')); one process shards the units over "
                               "its own devices with run(..., devices=n)")
        from jax.sharding import Mesh

        return Mesh(np.asarray(jax.devices()), ("units",))

    def distributed(self) -> Any:
        """The shim of a ``jax.distributed`` fit whose processes each hold their block of the units
        (``run(..., distributed="local")``): :class:`~latentfit.inference.ops_jax_procs.JaxProcessOps`."""
        from .ops_jax_procs import JaxProcessOps

        return JaxProcessOps(self)

    def process_group(self) -> ProcessGroup:
        """Rank, number of processes and an object gather of a ``jax.distributed`` fit (its checkpoints' shards)."""
        return ProcessGroup()

    def local_state(self, state: Any) -> Any:
        """``state`` with the arrays split over several processes gathered whole onto this process's default device
        (``multihost_utils.process_allgather``; replicated ones: the local copy), so the result of a
        ``jax.distributed`` fit is the same on every process, like a one-process fit's."""
        from jax.experimental import multihost_utils

        def whole(x: Any) -> Any:
            if not isinstance(x, jax.Array) or x.is_fully_addressable:
                return x
            if x.is_fully_replicated:
                return jnp.asarray(np.asarray(x.addressable_data(0)))
            return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))

        return _reorder_like(jax.tree_util.tree_map(whole, state), state)

    def shard_units(self, state: dict[str, Any], unit_axes: dict[str, int], devices: Any,
                    data_axes: Any = (), num_units: int | None = None) -> dict[str, Any]:
        """Place ``state`` on a one-axis mesh ``"units"``: the entries in ``unit_axes`` split along their unit axis,
        everything else replicated (``jax.sharding.NamedSharding``); ``devices=None`` runs unsharded.  ``data_axes``:
        pairs ``(array, unit axis)`` of the model's per-unit data (``LatentModel.unit_data_axes``), split along that
        axis when the compiled iterations capture them (:meth:`_sharded_program`).  ``num_units``: the model's number
        of units, which lets an engine without per-unit state (EM, the exact-draw TTSEM) shard the model's data alone.

        ``devices``: a number of devices (the first of ``jax.devices()``), a sequence of devices, or a
        ``jax.sharding.Mesh`` with an axis ``"units"``.  The compiled chunks are then partitioned by XLA (GSPMD):
        each device advances the chains of its units, and sums over units (statistics, acceptance rates, the
        objective) become all-reduces, so the fit equals the one-device fit up to the order of those sums.
        """
        if devices is None:
            self._units_mesh, self._unit_data = None, {}
            return state
        from jax.sharding import Mesh

        if isinstance(devices, Mesh):
            if "units" not in devices.axis_names:
                raise ValueError(f"the mesh must have an axis named 'units', got axes {devices.axis_names}")
            mesh = devices
        else:
            available = jax.devices()
            if isinstance(devices, (int, np.integer)):
                if not 1 <= int(devices) <= len(available):
                    raise ValueError(
                        f"devices={int(devices)}: JAX sees {len(available)} device(s) ({available[0].platform}). On "
                        "CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=<n> before JAX is imported")
                devs = available[:int(devices)]
            else:
                devs = list(devices)
            mesh = Mesh(np.asarray(devs), ("units",))
        counts = _unit_counts(state, unit_axes) + ([int(num_units)] if num_units else [])
        counts += [int(np.shape(x)[axis]) for x, axis in data_axes]
        if not counts:
            raise ValueError("devices=: this engine has no per-unit state, and the model names no per-unit data, to "
                             "shard over devices")
        size = mesh.shape["units"]
        for n in counts:
            if n % size:
                raise ValueError(f"{n} units cannot be split evenly over {size} devices: use a number of devices "
                                 f"that divides {n}")
        if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
            # one program over several processes: each takes its block from its own copy of the state, so the
            # copies (the key, the data's initial values) must agree
            _check_same_on_every_process(state)
        self._units_mesh = (mesh, dict(unit_axes))
        self._unit_count = int(num_units) if num_units else None
        self._unit_data = {id(x): (x, int(axis)) for x, axis in data_axes}  # the arrays kept: their ids stay theirs
        return self._place_units(state)

    def _place_units(self, state: Any) -> Any:
        return _reorder_like(jax.device_put(state, self._unit_shardings(state)), state)

    def _unit_shardings(self, state: Any) -> Any:
        """The shardings of ``state``'s leaves on the run's mesh (the tree of ``state``): per-unit entries split along
        their unit axis, the others replicated."""
        from jax.sharding import NamedSharding, PartitionSpec

        mesh, axes = self._units_mesh
        replicated = NamedSharding(mesh, PartitionSpec())

        def place(node: Any, spec: Any) -> Any:
            """Shardings of ``node``: ``spec`` an axis (every leaf split along it), a dict of the fields' specs
            (a record's or dict's fields), or None (replicated)."""
            if isinstance(spec, int):
                sharding = NamedSharding(mesh, PartitionSpec(*([None] * spec), "units"))
                return jax.tree_util.tree_map(lambda _: sharding, node)
            if spec is None:
                return jax.tree_util.tree_map(lambda _: replicated, node)
            fields = _fields_of(node)
            placed = {name: place(value, spec.get(name)) for name, value in fields.items()}
            return type(node)(**placed) if hasattr(node, "_fields") else placed

        return place(state, axes)

    # --- functional updates ---------------------------------------------------------------------
    def scatter(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[idx] = rows`` without mutating ``table`` (rows along axis 0)."""
        return table.at[idx].set(jnp.asarray(rows).astype(table.dtype))

    def scatter_axis1(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[:, idx] = rows`` without mutating ``table``."""
        return table.at[:, idx].set(jnp.asarray(rows).astype(table.dtype))

    def take(self, x: Any, idx: Any, axis: int = 0) -> Any:
        """``x`` at the indices ``idx`` (an index array or a ``slice``) along ``axis``."""
        if isinstance(idx, slice):
            return x[(slice(None),) * axis + (idx,)]
        return jnp.take(x, idx, axis=axis)

    def take_block(self, x: Any, start: Any, size: int, axis: int = 0) -> Any:
        """``x[start:start + size]`` along ``axis`` (``start`` may be traced): a slice, no gather."""
        return lax.dynamic_slice_in_dim(x, start, size, axis)

    def put_block(self, table: Any, start: Any, rows: Any) -> Any:
        """``table[start:start + len(rows)] = rows`` (functional; in place inside a compiled loop)."""
        return lax.dynamic_update_slice_in_dim(table, jnp.asarray(rows).astype(table.dtype), start, 0)

    def write_units(self, out: Any, block: slice, value: Any, like: Any = None) -> Any:
        """``out[:, block] = value`` (functional; ``out`` None: zeros of ``like``'s shape in ``value``'s dtype).  The
        kernels never block on JAX (:attr:`unit_block_values` is None): here for the interface."""
        if out is None:
            out = jnp.zeros(tuple(like.shape), dtype=value.dtype)
        return out.at[:, block].set(value)

    def stop_gradient(self, x: Any) -> Any:
        return lax.stop_gradient(x)

    # --- autodiff -----------------------------------------------------------------------------
    def value_and_grad(self, f: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, Any]]:
        return jax.value_and_grad(f)

    def grad(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return jax.grad(f)

    def depends_on(self, f: Callable[[Any], Any], x: Any) -> bool:
        """Whether an output of ``f``'s jaxpr is computed from ``x`` (structurally, whatever the values; False only
        when no equation on the way to the output reads ``x``): :func:`_jaxpr_taint`."""
        closed = jax.make_jaxpr(f)(x)
        return any(_jaxpr_taint(closed.jaxpr, [True] * len(closed.jaxpr.invars)))

    def hessian(self, f: Callable[[Any], Any], vectorize: bool = False) -> Callable[[Any], Any]:
        """Hessian of ``f: R^p -> R`` (``jax.hessian``, batched already: ``vectorize`` is the torch option)."""
        return jax.hessian(f)

    def jacobian(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Jacobian ``[q, p]`` of ``f: R^p -> R^q`` (``jax.jacfwd``)."""
        return jax.jacfwd(f)

    def jvp(self, f: Callable[[Any], Any], x: Any, v: Any) -> tuple[Any, Any]:
        """``(f(x), ∂f(x)·v)`` by forward mode (``jax.jvp``)."""
        return jax.jvp(f, (x,), (v,))

    def jacfwd(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Jacobian ``[*out_shape, p]`` of ``f: R^p -> R^out_shape`` by forward mode (``jax.jacfwd``)."""
        return jax.jacfwd(f)

    def jacobian_columns(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """:meth:`jacfwd` (torch's variant avoids its forward mode's import cost; JAX's forward mode has none)."""
        return jax.jacfwd(f)

    def value_grad_hessian(self, f: Callable[[Any], Any], z: Any, hessian: bool = True) -> tuple[Any, Any, Any]:
        """Per-row value ``[n]``, gradient ``[n, d]`` and Hessian ``[n, d, d]`` (or None) of ``f: [n, d] -> [n]``.

        Row i of ``f`` must depend on row i of ``z`` only (independent units); the Hessian takes ``d``
        forward-over-reverse passes (d is small).
        """

        def total(x: Any) -> tuple[Any, Any]:
            v = f(x)
            return jnp.sum(v), v

        grad_fn = jax.grad(total, has_aux=True)
        g, v = grad_fn(z)
        if not hessian:
            return v, g, None
        cols = []
        for j in range(z.shape[-1]):
            e = jnp.zeros_like(z).at[..., j].set(1.0)
            _, hj = jax.jvp(lambda x: grad_fn(x)[0], (z,), (e,))
            cols.append(hj)
        return v, g, jnp.stack(cols, axis=-1)

    def batched_jacobian(self, f: Callable[[Any], Any], differentiable: bool = False) -> Callable[[Any], Any]:
        """Jacobian of ``f: [B, p] -> [B, m]`` where row b of the output depends on row b only.

        Returns ``[B, m, p]``: p forward-mode passes (one per input coordinate), vectorised (differentiable in what
        ``f`` reads, whatever ``differentiable``).  The Jacobian goes to memory once (an optimisation barrier): its
        readers (the products ``JᵀWJ`` of Gauss–Newton, in several layouts) would otherwise each get XLA:CPU's copy of
        the tangent computation fused in (theophylline's modes' program held three, ~100 HLO instructions each).
        """

        def jac(x):
            p = x.shape[-1]
            tangents = jnp.broadcast_to(jnp.eye(p, dtype=x.dtype)[:, None, :], (p,) + tuple(x.shape))
            return lax.optimization_barrier(jax.vmap(lambda t: jax.jvp(f, (x,), (t,))[1], out_axes=-1)(tangents))

        return jac

    # --- optimisers (gradient engines) -----------------------------------------------------------
    def optimizer(self, spec: Any, learning_rate: Callable[[Any], Any]) -> FlatOptimizer:
        """A functional *ascent* optimiser over one flat vector, from ``optax``.

        ``spec``: ``"sgd"``, ``"adam"``, ``"amsgrad"`` (optax's), ``"opt-amsgrad"``
        (:func:`latentfit.optim.opt_amsgrad`), or an ``optax.GradientTransformation`` (used as given, its own
        learning rate kept).  ``learning_rate(t)`` gives the rate of gradient step ``t`` (1-based); optax counts
        from 0.
        """
        import optax

        if isinstance(spec, str):
            def rate(count: Any) -> Any:
                return learning_rate(count + 1)

            if spec == "opt-amsgrad":
                from latentfit.optim import opt_amsgrad

                tx = opt_amsgrad(rate)
            else:
                tx = {"sgd": optax.sgd, "adam": optax.adam, "amsgrad": optax.amsgrad}[spec](rate)
        elif isinstance(spec, optax.GradientTransformation):
            tx = spec
        else:
            raise TypeError(f"optimizer must be a name or an optax.GradientTransformation, got {type(spec).__name__}")

        def update(g: Any, state: Any, x: Any) -> tuple[Any, Any]:
            updates, state = tx.update(-g, state, x)
            return optax.apply_updates(x, updates), state

        return FlatOptimizer(tx.init, update)

    # --- control flow -------------------------------------------------------------------------
    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        """``lax.cond`` inside a trace; outside one (a concrete predicate) the chosen branch alone, eagerly
        (``lax.cond`` would compile both branches first)."""
        if not isinstance(pred, jax.core.Tracer):
            return true_fn(*operands) if bool(pred) else false_fn(*operands)
        return lax.cond(pred, true_fn, false_fn, *operands)

    def fori_loop(self, lower: int, upper: int, body: Callable[[int, Any], Any], init: Any) -> Any:
        """``lax.fori_loop``; the carry keeps the dtypes of ``init`` (mixed float32/float64 models)."""

        def typed_body(i: Any, val: Any) -> Any:
            return jax.tree_util.tree_map(_same_dtype, body(i, val), val)

        return lax.fori_loop(lower, upper, typed_body, init)

    def map(self, f: Callable[[Any], Any], xs: Any) -> Any:
        return lax.map(f, xs)

    def computed_once(self, f: Callable[..., Any], key: Any, *args: Any) -> Any:
        """``f(key, *args)`` computed in a loop of one iteration, so that its readers read it from memory.

        XLA:CPU copies a small elementwise producer into each of its consumers' fusions: a threefry hash (~150 HLO
        instructions, 20 rounds) and the draws made from it were computed, and compiled, once per reader (the IS
        log-likelihood's Student-t draws: three times).  A loop's result has no producer to copy.  The trip count is
        ``k // k`` of the key's first word with its low bit set (1 at run time, which XLA does not fold), and the
        key is carried through the loop (xor'ed with ``1 − trip count``, 0), so the loop is neither removed as
        running once nor its body hoisted as invariant.  Outside a trace, or for a key that is not unsigned integer
        data (a typed PRNG key): ``f(key, *args)``."""
        trips = _runtime_one(key)
        if trips is None:
            return f(key, *args)
        zero = (np.int32(1) - trips).astype(key.dtype)
        out = jax.eval_shape(f, key, *args)

        def body(i: Any, carry: Any) -> Any:
            k, _ = carry
            return k ^ zero, f(k, *args)

        init = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out)
        return lax.fori_loop(0, trips, body, (key, init))[1]

    def repeated(self, f: Callable[[Any, Any], Any], times: int, x: Any) -> Any:
        """``x ← f(i, x)`` for ``i < times`` in a loop whose trip count XLA cannot fold (``times · (w // w)`` of the
        first word of ``x``'s first leaf, unsigned, with its low bit set): the body compiled once, never unrolled or
        copied per pass (e.g. two passes of a threefry hash, :func:`~latentfit.inference.mcmc.stacked_sweep_key_bits`).
        Outside a trace: a Python loop."""
        one = _runtime_one(jax.tree_util.tree_leaves(x)[0])
        if one is None:
            for i in range(times):
                x = f(i, x)
            return x
        return lax.fori_loop(0, one * np.int32(times), f, x)

    def jit(self, f: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
        # without static arguments: executables shared with every same-shaped closure (:class:`SharedJit`)
        return SharedJit(f) if not static_argnums else jax.jit(f, static_argnums=static_argnums)

    def jit_once(self, key: Hashable, make: Callable[[], Callable]) -> Callable:
        """One :class:`SharedJit` of ``make()`` per ``key``, kept in this shim's ``_jitted`` (left out of its
        fingerprint): e.g. the driver's ``θ = constrain(θ_u)`` after a fit, one stored program instead of an eager
        operation per parameter, each lowered in a fresh process."""
        jitted = self.__dict__.setdefault("_jitted", {})
        fn = jitted.get(key)
        if fn is None:
            fn = jitted[key] = SharedJit(make())
        return fn

    def scan_steps(self, step: Callable, state: Any, ks: range, key: Any = None,
                   prepare: Callable[[Any, Any], Any] | None = None,
                   capacity: int | None = None) -> tuple[Any, list[Any]]:
        """Run ``state, info = step(state, k)`` for k in ``ks`` as one compiled loop.

        Returns the final state and one info dict per iteration (numpy leaves, host side).
        ``key`` names the step function (engine, phase, ...): a chunk with the same key and
        length reuses the compiled executable; ``key=None`` disables the cache.  ``prepare``: ``xs =
        prepare(state, ks)`` computed before the loop (arrays stacked over the chunk, or None), each step then called
        as ``step(state, (k, xs[k]))``; in a program of its own (:data:`SEPARATE_CHUNK_DRAWS`) or the loop's.

        ``capacity`` (the driver's longest chunk): the program runs a loop of ``len(ks)`` iterations, a number it
        takes as an argument, over arrays of ``capacity`` iterations (:func:`_scan_upto`), so every chunk of a run,
        its remainder chunks included, and a later fit of another number of iterations, share one executable of
        each key.  A fit of 30 iterations in chunks of 25 compiled its loop twice (25 and 5 iterations: ~2.8 s each
        for a NumPyro random-intercept model of 2000 groups); the draws of ``prepare`` are made for ``capacity``
        iterations, those past ``len(ks)`` unread.  None: a program for each length (``lax.scan``).
        """
        n = len(ks)
        if n == 0:
            return state, []
        dynamic = capacity is not None
        length = max(n, int(capacity)) if dynamic else n
        # jnp.arange: three small programs
        ks_arr = jax.device_put(np.arange(ks.start, ks.start + length, dtype=np.int32))
        count = (jax.device_put(np.int32(n)),) if dynamic else ()
        if self._units_mesh is not None:  # every chunk starts from the same placement (the executable's)
            state = self._place_units(state)
            from jax.sharding import NamedSharding, PartitionSpec

            ks_arr = jax.device_put(ks_arr, NamedSharding(self._units_mesh[0], PartitionSpec()))
            count = tuple(jax.device_put(c, NamedSharding(self._units_mesh[0], PartitionSpec())) for c in count)
        mesh_id = None if self._units_mesh is None else id(self._units_mesh[0])
        cache_key = (key, length, dynamic, mesh_id) if key is not None else None
        compiled = self._compiled.get(cache_key) if cache_key is not None else None
        xs = None
        if compiled is None:
            info_order: dict[str, Any] = {}
            state_order = _skeleton(state)

            def typed_step(st, k):
                # the step sees the state's dicts in the engine's key order (scan sorts them), and
                # keeps the carry's dtypes (an M-step may promote a float32 θ to float64 when the
                # data are float64): lax.scan needs the same types in and out
                st = _reorder_like(st, state_order)
                new, info = step(st, k)
                new = jax.tree_util.tree_map(_same_dtype, new, st)
                info_order["info"] = _skeleton(info)
                return new, info

            def loop(st, seq, count_):
                if not count_:
                    return lax.scan(typed_step, st, seq)
                return _scan_upto(typed_step, st, seq, count_[0])

            def chunk(st, kk, *count_):
                if prepare is None:
                    return loop(st, kk, count_)
                return loop(st, (kk, prepare(_reorder_like(st, state_order), kk)), count_)

            t0 = time.perf_counter()
            draws = None
            if prepare is not None and self._units_mesh is None and SEPARATE_CHUNK_DRAWS:
                def chunk_draws(st, kk):
                    return prepare(_reorder_like(st, state_order), kk)

                draws = _program_for(chunk_draws, state, ks_arr)
                if draws.out_tree is None or draws.out_tree.num_leaves == 0:  # prepare found no draws to make
                    draws = None
            if draws is None:
                program = self._chunk_program(chunk, state, ks_arr, info_order, *count)
            else:
                def chunk_loop(st, kk, *count_and_xs):
                    return loop(st, (kk, count_and_xs[-1]), count_and_xs[:-1])

                # the draws dispatched before the loop's program is looked up (keyed, loaded): in a later process
                # the main thread reads the draws' program while the read-ahead thread reads the loop's
                xs = draws(state, ks_arr)
                program = _DrawsThenLoop(draws, self._chunk_program(chunk_loop, state, ks_arr, info_order, *count,
                                                                    xs))
            compiled = (program, info_order)
            self.compile_time += time.perf_counter() - t0
            self.num_compiles += int(program.compiled_now)
            if cache_key is not None:
                self._compiled[cache_key] = compiled
        program, info_order = compiled
        if xs is not None:  # the chunk's draws just made
            new_state, infos = program.loop(state, ks_arr, *count, xs)
        else:
            new_state, infos = program(state, ks_arr, *count)
        # JAX hands dicts back with sorted keys: restore the engine's order (parameters, history)
        state = _reorder_like(new_state, state)
        order = info_order.get("info")

        def host(tree: Any) -> Any:  # the records of the chunk's n iterations (of a loop over ``length``)
            return _reorder_like(jax.tree_util.tree_map(lambda v: np.asarray(v)[:n], tree), order)

        # the records stay on the device until read (the driver reads them after dispatching the next chunk)
        return state, StackedInfos(infos, n, host)

    def _chunk_program(self, chunk: Callable, state: Any, ks: Any, side: dict[str, Any], *rest: Any) -> Any:
        """The compiled ``chunk(state, ks)`` of :meth:`scan_steps` (``side``: filled by the trace): shared across fits
        (:func:`_program_for`), or for the run's mesh when its units are sharded (no cross-fit reuse)."""
        sizes = [int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(state)]
        _WIDE_VECTORS[0] = WIDE_CHUNK_ELEMENTS is not None and max(sizes, default=0) >= WIDE_CHUNK_ELEMENTS
        _TRAILING_DRAWS[0] = len(jax.tree_util.tree_leaves(rest))
        try:
            if self._units_mesh is None:
                return _program_for(chunk, state, ks, *rest, side=side)
            return self._sharded_program(chunk, state, ks, *rest)
        finally:
            _WIDE_VECTORS[0] = False
            _TRAILING_DRAWS[0] = 0

    def _sharded_program(self, fn: Callable, state: Any, *rest: Any) -> _ConstsBound:
        """``fn(state, *rest)`` compiled for the run's mesh with the arrays its trace captured (the model's data,
        designs, index maps) lifted to arguments and placed: one of the model's per-unit arrays (``data_axes`` of
        :meth:`shard_units`, found from its plate structure: ``y [T, N]`` of a plate at ``dim=-1``) is split over the
        mesh along its unit axis, any other array whose leading axis has the units' length (the per-unit state's)
        along that axis, as the chains are, so each device holds its units' data; the others are replicated.
        Placement never changes a result (XLA partitions the program to match), only where the data live and what
        moves between devices."""
        from jax.sharding import NamedSharding, PartitionSpec

        mesh, axes = self._units_mesh
        size = mesh.shape["units"]
        units = {n for n in _unit_counts(state, axes) + [getattr(self, "_unit_count", None) or 0]
                 if n and n % size == 0}
        replicated = NamedSharding(mesh, PartitionSpec())
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(state, *rest)

        def place(const: Any) -> Any:
            shape = np.shape(const)
            known = self._unit_data.get(id(const))
            if known is not None and known[0] is const:  # the model's per-unit data: its unit axis
                axis = known[1] if known[1] < len(shape) and shape[known[1]] % size == 0 else None
            else:
                axis = 0 if shape and shape[0] in units else None
            if axis is None:
                return jax.device_put(const, replicated)
            return jax.device_put(const, NamedSharding(mesh, PartitionSpec(*([None] * axis), "units")))

        consts = tuple(place(c) for c in closed.consts)
        jaxpr = closed.jaxpr

        def run(consts_: tuple[Any, ...], *flat_: Any) -> Any:
            return jax.core.eval_jaxpr(jaxpr, list(consts_), *flat_)

        flat = jax.tree_util.tree_leaves((state, *rest))
        # the state comes back placed as it went in, the info records replicated: every process reads them whole
        # (a mesh over several processes can hand back only what each process holds)
        state_out = jax.tree_util.tree_leaves(self._unit_shardings(state))
        num_out = len(jax.tree_util.tree_leaves(out_shape))
        out_shardings = state_out + [replicated] * (num_out - len(state_out))
        executable = _compile(jax.jit(run, out_shardings=out_shardings).lower(consts, *flat),
                              mesh.devices.flat[0].platform)
        return _ConstsBound(executable, consts, jax.tree_util.tree_structure(out_shape))

    def clear_cache(self) -> None:
        """Forget the compiled chunks (e.g. after changing an engine's options in place)."""
        self._compiled.clear()

    def argsort(self, a: Any, axis: int = -1) -> Any:
        """Stable ``argsort`` along ``axis``."""
        return jnp.argsort(a, axis=axis, stable=True)

    def take_along_axis(self, a: Any, idx: Any, axis: int = -1) -> Any:
        return jnp.take_along_axis(a, idx, axis)

    # --- special functions (jax.scipy.special imported where used: ~2-3 ms of a process's first JAX model) -------
    def logsumexp(self, x: Any, axis: int) -> Any:
        return _special().logsumexp(x, axis=axis)

    def logit(self, x: Any) -> Any:
        return _special().logit(x)

    def expit(self, x: Any) -> Any:
        return _special().expit(x)

    def ndtri(self, x: Any) -> Any:
        return _special().ndtri(x)

    def ndtr(self, x: Any) -> Any:
        return _special().ndtr(x)

    def log_ndtr(self, x: Any) -> Any:
        return _special().log_ndtr(x)

    def gammaln(self, x: Any) -> Any:
        return _special().gammaln(x)

    # --- linear algebra -------------------------------------------------------------------------
    def cholesky(self, a: Any) -> Any:
        return jnp.linalg.cholesky(a)

    def solve(self, a: Any, b: Any) -> Any:
        return jnp.linalg.solve(a, b)

    def solve_triangular(self, a: Any, b: Any, lower: bool = True) -> Any:
        """``a⁻¹ b`` for triangular ``a [..., d, d]``, ``b [..., d, m]``."""
        import jax.scipy.linalg  # imported where used: ~6 ms of a process's first JAX model otherwise

        return jax.scipy.linalg.solve_triangular(a, b, lower=lower)

    def eigh(self, a: Any) -> tuple[Any, Any]:
        return jnp.linalg.eigh(a)

    def tree_map(self, f: Callable, tree: Any) -> Any:
        return jax.tree_util.tree_map(f, tree)


__all__ = ["JaxOps", "ProcessGroup", "SharedJit", "default_float_dtype", "process_block", "whole_from_blocks"]
