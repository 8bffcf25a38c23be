"""JAX fits over several processes where each process holds only its block of the units (``distributed="local"``).

After ``jax.distributed.initialize`` every process builds its model on its own units (its rows of a NONMEM table, its
units' arrays), as a ``torchrun`` rank does.  The engine then runs on :class:`JaxProcessOps`, the JAX twin of the torch
shim :class:`~latentfit.inference.ops.DistributedOps`: the sums over units that the engines already route through
``ops`` (``all_sum``, ``unit_mean``, ``gather_units``) reach every process, and every process runs the same M-step on
the same statistics.

Inside a compiled chunk of iterations those reductions are XLA collectives: the chunk, traced on this process's
shapes, runs under ``jax.shard_map`` over a mesh ``"units"`` of one device per process (process r's first device,
in process order), every input (state, captured data) entering as process r's block of a global array with one slot
per process (``jax.make_array_from_single_device_arrays``), so the program on process r sees exactly its own arrays;
``all_sum`` is ``lax.psum``, ``gather_units`` ``lax.all_gather`` (tiled, process order).  Outside a trace (an engine's
set-up, post-fit computations) they are host collectives (``multihost_utils.process_allgather``).  The compiled
programs are shared by the fits of a process (keyed by the traced program's text and its inputs' shapes, the data
being arguments), and every process checks before compiling that the others' inputs have the same shapes and their
programs the same cross-process operations (a mismatch would otherwise hang).

The global unit index of process r's first unit is the number of units of the processes before it (as on torch), so
per-unit random streams (``rng="per_unit"``) use the global indices and the fit equals the one-process fit of the
whole data up to the order of the sums (1e-10 in float64).  Blocks of unequal size are padded to the largest with
dummy units that count for nothing (:mod:`~latentfit.inference.padding`; :meth:`JaxProcessOps.pad_units` leaves them
out of the acceptance rates and of the gathers).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .ops_jax import (
    _ADDRESS,
    PROGRAM_CACHE_SIZE,
    JaxOps,
    ProcessGroup,
    SharedJit,
    _aval_key,
    _compile,
    whole_from_blocks,
)

AXIS = "units"
#: compiled programs of :class:`_ProcessProgram`, shared by the fits of this process: keyed by the traced program's
#: text, its inputs' shapes and dtypes and the mesh (the data are arguments); least recently used dropped first
_PROCESS_PROGRAMS: OrderedDict[Hashable, Any] = OrderedDict()


def process_devices() -> list[Any]:
    """One device per process of the ``jax.distributed`` group, in process order: each process's first device."""
    first: dict[int, Any] = {}
    for d in jax.devices():
        first.setdefault(int(d.process_index), d)
    return [first[p] for p in sorted(first)]


def _collectives(jaxpr: Any) -> list[str]:
    """The cross-process operations of a jaxpr, in program order (nested jaxprs included), with their operand types:
    what every process's program must do alike (the rest may differ, e.g. a block without padded entries)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("psum", "all_gather", "pmax", "pmin", "ppermute", "all_to_all", "psum_scatter"):
            out.append(f"{eqn.primitive.name}{[str(v.aval) for v in eqn.invars]}")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _collectives(inner)
    return out


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer) or any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(x))


class _ProcessProgram:
    """``fn`` compiled once for the shapes of its arguments, run by every process on its own arrays under
    ``shard_map`` (see the module docstring); called with this process's arguments, returns this process's outputs."""

    #: each program is compiled for its process group (no cross-fit reuse)
    compiled_now = True

    def __init__(self, ops: JaxProcessOps, fn: Callable, args: tuple[Any, ...]) -> None:
        from jax.sharding import NamedSharding, PartitionSpec

        self.ops = ops
        mesh, n = ops.mesh, ops.world_size
        closed, out_shape = jax.make_jaxpr(fn, axis_env=[(AXIS, n)], return_shape=True)(*args)
        flat = jax.tree_util.tree_leaves(args)
        consts = [jnp.asarray(c) for c in closed.consts]
        ops.check_same_program(consts, flat, _collectives(closed.jaxpr))
        self.sharding = NamedSharding(mesh, PartitionSpec(AXIS))
        self.out_tree = jax.tree_util.tree_structure(out_shape)
        self.consts = tuple(self.to_global(c) for c in consts)  # this process's data, once
        jaxpr = closed.jaxpr
        num_consts = len(consts)

        def body(*blocks: Any) -> list[Any]:
            values = [b[0] for b in blocks]
            outs = jax.core.eval_jaxpr(jaxpr, values[:num_consts], *values[num_consts:])
            return [o[None] for o in outs]

        num_in = num_consts + len(flat)
        num_out = len(jax.tree_util.tree_leaves(out_shape))
        text = str(jaxpr)
        key = (_ADDRESS.sub("", text), num_consts, tuple(_aval_key(x) for x in list(consts) + flat),
               tuple(d.id for d in mesh.devices.flat))
        shared = "callback" not in text  # a host callback is known only by its address
        hit = _PROCESS_PROGRAMS.get(key) if shared else None
        if hit is not None:  # a same-shaped fit before (its data are arguments): no compilation
            _PROCESS_PROGRAMS.move_to_end(key)
            self.executable, self.compiled_now = hit, False
            return
        spec = PartitionSpec(AXIS)
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * num_in, out_specs=[spec] * num_out,
                               check_vma=False)
        stacked = [self.to_global(jnp.asarray(x)) for x in flat]
        self.executable = _compile(jax.jit(mapped).lower(*self.consts, *stacked), mesh.devices.flat[0].platform)
        if shared:
            _PROCESS_PROGRAMS[key] = self.executable
            while len(_PROCESS_PROGRAMS) > PROGRAM_CACHE_SIZE:
                _PROCESS_PROGRAMS.popitem(last=False)

    def to_global(self, x: Any) -> Any:
        """``x`` as this process's slot of a global array ``[processes, *x.shape]``."""
        x = jnp.asarray(x)
        local = jax.device_put(x[None], self.ops.device_of_process)
        return jax.make_array_from_single_device_arrays((self.ops.world_size, *x.shape), self.sharding, [local])

    def __call__(self, *args: Any) -> Any:
        flat = jax.tree_util.tree_leaves(args)
        outs = self.executable(*self.consts, *(self.to_global(x) for x in flat))
        return jax.tree_util.tree_unflatten(self.out_tree, [o.addressable_shards[0].data[0] for o in outs])


class _ProcessJit(SharedJit):
    """:meth:`JaxProcessOps.jit`: ``fn`` as a :class:`_ProcessProgram` per input signature (inlined inside a trace).
    The signature leaves out placement, so that every process compiles (a collective) for the same calls."""

    def __init__(self, ops: JaxProcessOps, fn: Callable) -> None:
        super().__init__(fn)
        self.ops = ops

    def _signature(self, flat: list[Any]) -> tuple[Any, ...]:
        return tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in flat)

    def _compile(self, args: tuple[Any, ...]) -> Callable:
        return _ProcessProgram(self.ops, self.fn, args)


class JaxProcessOps(JaxOps):
    """The JAX shim of a fit whose processes each hold their block of the units (``run(..., distributed="local")``):
    ``base``'s arrays and draws, with ``all_sum`` / ``unit_mean`` / ``gather_units`` over every process (collectives
    inside compiled chunks, host collectives outside), ``rank`` / ``world_size`` / ``gather_objects`` as torch's
    :class:`~latentfit.inference.ops.DistributedOps` has them (post-fit computations and checkpoints use them)."""

    def __init__(self, base: JaxOps) -> None:
        if not jax.distributed.is_initialized():
            base.process_mesh()  # raises with the command to run
        super().__init__(base.dtype, base.device)
        self.draw_dtype = base.draw_dtype
        self.base = base
        group = ProcessGroup()
        self.rank, self.world_size = group.rank, group.world_size
        from jax.sharding import Mesh

        devices = process_devices()
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        self.device_of_process = devices[self.rank]
        #: blocks of unequal size padded with dummy units (:meth:`pad_units`): every process's real count, and the size
        self.counts: list[int] | None = None
        self.padded_size: int | None = None

    def pad_units(self, counts: list[int], size: int) -> None:
        """Every process's block is padded to ``size`` units, its first ``counts[r]`` real
        (:mod:`~latentfit.inference.padding`): :meth:`unit_mean` and :meth:`gather_units` leave the dummy units out."""
        self.counts, self.padded_size = [int(c) for c in counts], int(size)

    def with_draw_dtype(self, dtype: Any) -> JaxProcessOps:
        if dtype is None or jnp.dtype(dtype) == self.dtype:
            return self
        new = JaxProcessOps(self.base.with_draw_dtype(dtype))
        return new

    def distributed(self) -> JaxProcessOps:
        return self

    def process_group(self) -> JaxProcessOps:
        return self

    # --- reductions over every process's units ---------------------------------------------------------------
    def all_sum(self, x: Any) -> Any:
        """``x`` summed over the processes (in float64 when x64 is on, as torch's all-reduce)."""
        wide = jnp.result_type(float)
        if _is_traced(x):
            x = jnp.asarray(x)
            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != wide:
                return lax.psum(x.astype(wide), AXIS).astype(x.dtype)
            return lax.psum(x, AXIS)
        from jax.experimental import multihost_utils

        a = np.asarray(x)
        kind = a.dtype
        if np.issubdtype(kind, np.floating):
            a = a.astype(np.float64)
        total = np.asarray(multihost_utils.process_allgather(a)).reshape((self.world_size,) + a.shape).sum(0)
        return jnp.asarray(total.astype(kind) if hasattr(x, "dtype") else total)

    def _padded(self, x: Any, axis: int) -> bool:
        """Whether ``x`` holds a padded block along ``axis`` (its length the padded size)."""
        return self.padded_size is not None and jnp.ndim(x) > 0 and jnp.shape(x)[axis] == self.padded_size

    def unit_mean(self, x: Any) -> Any:
        """Mean of ``x [..., n]`` over all its entries on every process (a padded block: its real units' entries)."""
        x = jnp.asarray(x)
        wide = jnp.result_type(float)
        if self._padded(x, -1):
            real = self.counts[self.rank]
            mask = jnp.asarray(np.arange(self.padded_size) < real)
            part = jnp.sum(jnp.where(mask, x, jnp.zeros_like(x))).astype(wide)
            count = float(x.size // self.padded_size * sum(self.counts))
            total = self.all_sum(jnp.stack([part, jnp.asarray(0.0, dtype=wide)]))
            return (total[0] / count).astype(x.dtype)
        total = self.all_sum(jnp.stack([jnp.sum(x).astype(wide), jnp.asarray(float(x.size), dtype=wide)]))
        return (total[0] / total[1]).astype(x.dtype)

    def gather_units(self, x: Any, axis: int) -> Any:
        """``x`` concatenated along its unit ``axis`` over the processes, in process order (padded blocks: their
        real units only; outside a trace, blocks of any sizes)."""
        if _is_traced(x):
            axis = axis % jnp.ndim(x)
            out = lax.all_gather(x, AXIS, axis=axis, tiled=True)
            if self._padded(x, axis):
                keep = np.concatenate([r * self.padded_size + np.arange(c) for r, c in enumerate(self.counts)])
                out = jnp.take(out, jnp.asarray(keep), axis=axis)
            return out
        a = np.asarray(x)
        if self._padded(a, axis):
            a = np.take(a, np.arange(self.counts[self.rank]), axis=axis)
        shapes = self.gather_objects(list(a.shape))
        if any(s != shapes[0] for s in shapes):
            return jnp.asarray(np.concatenate(self.gather_objects(a), axis=axis))
        return jnp.asarray(whole_from_blocks(a, axis))

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (any picklable value: arrays, tables), in process order, as torch's
        ``all_gather_object`` (a collective; pickles between the processes of this fit only)."""
        import pickle

        from jax.experimental import multihost_utils

        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], dtype=np.int64))).reshape(-1)
        padded = np.zeros(int(sizes.max()), dtype=np.uint8)
        padded[:data.size] = data
        rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
        return [pickle.loads(bytes(row[:int(n)])) for row, n in zip(rows, sizes)]  # noqa: S301 - our own processes

    # --- compiled programs over the processes ------------------------------------------------------------------
    def fori_loop(self, lower: int, upper: int, body: Callable[[int, Any], Any], init: Any) -> Any:
        """``lax.fori_loop``; called outside a trace (an engine's set-up, e.g. MISSO's first surrogates), the loop
        runs as one program over the processes (:meth:`jit`), where its reductions are collectives: ``lax`` traces
        the body, which a host collective cannot enter."""
        if _is_traced((lower, upper, init)):
            return super().fori_loop(lower, upper, body, init)
        loop = self.jit(lambda lo, hi, val: JaxOps.fori_loop(self, lo, hi, body, val))
        return loop(jnp.asarray(lower), jnp.asarray(upper), init)

    def jit(self, f: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
        if static_argnums:
            raise ValueError("distributed='local' on JAX: a compiled function with static arguments is not supported")
        return _ProcessJit(self, f)

    def _chunk_program(self, chunk: Callable, state: Any, ks: Any, side: dict[str, Any], *rest: Any) -> Any:
        return _ProcessProgram(self, chunk, (state, ks, *rest))

    def check_same_program(self, consts: list[Any], flat: list[Any], collectives: list[str]) -> None:
        """Refuse a program whose inputs differ in shape or dtype between the processes (blocks of unequal size, data
        padded otherwise) or whose cross-process operations differ (they would wait for each other forever)."""
        mine = [[list(np.shape(x)), str(jnp.result_type(x))] for x in list(consts) + list(flat)]
        digest = hashlib.sha256(repr((mine, collectives)).encode()).hexdigest()
        digests = self.gather_objects(digest)
        if all(d == digests[0] for d in digests):
            return
        every = self.gather_objects((mine, collectives))
        for j, entries in enumerate(zip(*(m for m, _ in every))):
            if any(e != entries[0] for e in entries):
                what = "captured array" if j < len(consts) else "state entry"
                raise ValueError(f"distributed='local' on JAX: a {what} of the compiled iterations has shapes/dtypes "
                                 f"{[e[0] for e in entries]} on processes 0..{self.world_size - 1}; every process's "
                                 "block must have the same shapes (the same number of units, and data padded alike)")
        if any(len(m) != len(every[0][0]) for m, _ in every):
            raise ValueError("distributed='local' on JAX: the processes' compiled iterations capture different numbers "
                             f"of arrays ({[len(m) for m, _ in every]}): their models differ in more than their data")
        raise ValueError("distributed='local' on JAX: the processes' compiled iterations reduce over the processes "
                         f"differently ({[len(c) for _, c in every]} cross-process operations): their models take "
                         "different code paths on their blocks")
