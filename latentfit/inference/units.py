"""Which units a mini-batch holds: an index array (a gather) or a contiguous block (a slice).

The incremental engines visit units in mini-batches.  Drawn as random index sets, every batch gathers its
rows from the data and the per-unit tables at random addresses: on large data that gather, not the
arithmetic, is the cost of a step (each row a cache miss).  When a model can reorder its units
(``model.permuted_units(perm)``), the engines instead shuffle the units once and cut them into contiguous
blocks, visited in a fresh random order every epoch: a batch is then a :class:`UnitBlock`, read and written
as a slice.  The blocks are a fixed random partition, as in the incremental EM of Neal & Hinton (1998),
so the engines' statistics and their convergence theory are those of n/b "super-units".
"""

from __future__ import annotations

from typing import Any


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


def put_units(ops: Any, table: Any, units: Any, rows: Any) -> Any:
    """``table[units] = rows`` along axis 0 (the caller owns ``table``; the result is the table to use)."""
    if isinstance(units, UnitBlock):
        return ops.put_block(table, units.start, rows)
    return ops.scatter_owned(table, units, rows)
