"""Which units a mini-batch holds: an index array (a gather) or a contiguous block (a slice).

The incremental engines visit units in mini-batches.  Drawn as random index sets, every batch gathers its
rows from the data and the per-unit tables at random addresses: on large data that gather, not the
arithmetic, is the cost of a step (each row a cache miss).  When a model can reorder its units
(``model.permuted_units(perm)``), the engines instead shuffle the units once and cut them into contiguous
blocks, visited in a fresh random order every epoch: a batch is then a :class:`UnitBlock`, read and written
as a slice.  The blocks are a fixed random partition, as in the incremental EM of Neal & Hinton (1998),
so the engines' statistics and their convergence theory are those of n/b "super-units".

Also the per-unit random streams of post-fit draws (:func:`unit_streams`, :func:`prior_draws_on_streams`) and
the one cross-process reduction the simulators need (:func:`max_over_processes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .model import LatentModel


def unit_streams(ops: Any, seed: int, unit_ids: Any) -> tuple[Any, Any]:
    """``(per-unit streams view, root key)`` of post-fit draws keyed by ``(seed, unit id)``: unit i's draws depend
    on the seed and its id only (torch: the seed's Philox key; JAX: ``PRNGKey(seed)``)."""
    sim = ops.per_unit_streams(ops.asarray(np.asarray(unit_ids, dtype=np.int64), dtype=None))
    return sim, ops.stream_key(ops.key(seed), seed)


def prior_draws_on_streams(model: LatentModel, theta: dict[str, Any], num_sims: int, seed: int, unit_ids: Any,
                           ops: Any) -> tuple[Any, Any, Any]:
    """``(streams, root key, z)``: ``num_sims`` prior draws ``z_i = μ_i + L ε_i`` ``[K, n, d]`` with unit i's ``ε``
    from its stream ``(seed, unit id)`` (:func:`unit_streams`); the streams and key
    (``fold_in(root, 2)`` onwards) serve the unit's further draws."""
    if not model.has_gaussian_prior:
        raise ValueError("per-unit streams draw each unit's latents as μ_i + L ε_i: they need Gaussian latents")
    sim, root = unit_streams(ops, seed, unit_ids)
    eps = sim.normal(ops.fold_in(root, 1), (int(num_sims), model.num_units, model.latent_dim))
    return sim, root, model.prior_transform(theta, eps)


def max_over_processes(ops: Any, value: int) -> int:
    """``value``'s maximum over the processes of a distributed fit (``ops`` with ``gather_objects``), else itself;
    every process must call it."""
    return max(ops.gather_objects(value)) if hasattr(ops, "gather_objects") else value


class UnitBlock:
    """Units ``start, …, start + size − 1`` (``start`` may be a traced scalar inside a compiled loop)."""

    __slots__ = ("start", "size")

    def __init__(self, start: Any, size: int) -> None:
        self.start, self.size = start, int(size)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"UnitBlock(start={self.start}, size={self.size})"


def take_units(ops: Any, x: Any, units: Any, axis: int = 0) -> Any:
    """Rows of ``x`` for ``units`` along ``axis``: a slice for a :class:`UnitBlock`, else a gather."""
    if isinstance(units, UnitBlock):
        return ops.take_block(x, units.start, units.size, axis)
    return ops.take(x, units, axis)


def read_units(ops: Any, x: Any, units: Any, axis: int = 0) -> Any:
    """:func:`take_units` for rows read at once: a block is a view of ``x`` on eager backends (no copy), so it must
    be read before ``x`` is next written; an index array is gathered."""
    if isinstance(units, UnitBlock):
        return ops.read_block(x, units.start, units.size, axis)
    return ops.take(x, units, axis)


def put_units(ops: Any, table: Any, units: Any, rows: Any) -> Any:
    """``table[units] = rows`` along axis 0 (the caller owns ``table``; the result is the table to use)."""
    if isinstance(units, UnitBlock):
        return ops.put_block(table, units.start, rows)
    return ops.scatter_owned(table, units, rows)
