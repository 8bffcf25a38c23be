"""The bound table kept compact: what a bound NLME remembers of the caller's DataFrame (issue 13, memory per unit).

A bound model used to keep the caller's table by reference, for the tools that read it again after binding
(:meth:`NLME.simulate` returns a copy of it with ``DV`` simulated, time-to-event simulations copy each individual's
first record, the occasions' boundaries read the occasion column, and every re-binding — another backend, a covariate
model of the covariate search, a block of a distributed fit, new data options — reads it whole).  That kept the
table alive after the caller dropped it: 528 B per individual for an 11-row PK table, 1.6x the fit's per-unit state.

:class:`StoredTable` keeps it instead as the smallest of a few exact encodings per column, most of which read arrays
the bound :class:`~latentfit.models.nlme.data.NLMEData` holds anyway:

* ``const``: one value on every row (``CMT = 1``, a constant ``MDV``);
* ``runs``: one value per run of rows with the same ID (the ID itself, covariates), with the runs' lengths (4 bytes
  per run, shared by the columns);
* ``split``: the observation rows (``data.obs_rows``) read from a bound ``[N, T]`` array (``DV`` from ``data.dv``,
  the time from ``data.time``, regressors, ``CENS`` from ``data.cens``) or one value there (``AMT = 0``,
  ``EVID = 0``), and the other rows (doses, events, rows without observation: usually one or two per individual)
  stored or one value there;
* ``whole``: the column itself (a copy), when nothing above is exact or smaller.

Each encoding is chosen only after checking it bit for bit at binding (floats compared by their bits: a NaN stays the
NaN it was, −0.0 stays −0.0), so :meth:`StoredTable.frame` rebuilds a DataFrame equal to the bound one in values,
dtypes, index, column labels and ``attrs``; every tool that read the table reads the same numbers.  The rebuilt table
is the table as it was at binding (the caller's later edits of its own DataFrame are not seen, as the bound arrays
never saw them either).  Columns of dtypes whose values cannot be compared exactly here (object columns, floating
extension arrays, time zones...) are kept whole.  The index is kept as it is (a ``RangeIndex`` is a few bytes; another
index costs its own size).

For the benchmark's table (``ID, TIME, DV, AMT, EVID, MDV``, 11 rows per individual) this is ~20 B per individual
(the IDs' values and run lengths, the dose rows' times) instead of 528.  Rebuilding costs a pass over the rows (a new
DataFrame each time :attr:`NLME.table` is read).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: numpy kinds compared by their bits: bool, signed and unsigned integers, floats, datetimes and timedeltas
_BIT_KINDS = "biufmM"
#: rows (or observations) compared per step while encoding (keeps the temporaries small next to the table)
_CHUNK = 1 << 16


def _bits(a: np.ndarray) -> np.ndarray:
    """``a`` viewed as unsigned integers of its width (exact equality: NaN payloads and signed zeros kept)."""
    return a.view(f"u{a.dtype.itemsize}")


def _exact_codes(arr: Any) -> np.ndarray | None:
    """Integer codes equal exactly where the values are equal (None: no exact comparison for this array)."""
    dtype = arr.dtype
    if isinstance(dtype, np.dtype):
        return _bits(np.asarray(arr)) if dtype.kind in _BIT_KINDS else None
    exact = isinstance(dtype, (pd.StringDtype, pd.CategoricalDtype, pd.BooleanDtype)) or \
        pd.api.types.is_integer_dtype(dtype)  # strings, categories, nullable booleans and integers
    if not exact:
        return None
    return pd.factorize(arr, use_na_sentinel=False)[0]


def _values(s: pd.Series) -> Any:
    """The values of ``s``: a numpy array (a view) for a numpy dtype, else its extension array."""
    return s.to_numpy() if isinstance(s.dtype, np.dtype) else s.array


def _all_equal(codes: np.ndarray) -> bool:
    """Every value equal (compared over chunks)."""
    return all(bool((codes[i:i + _CHUNK] == codes[0]).all()) for i in range(0, len(codes), _CHUNK))


@dataclass
class _Part:
    """Values of a set of rows: ``("const", value [1])``, ``("vals", values [k])`` or ``("ref", A [N, T])`` (the bound
    array at the observation rows, cast to the column's dtype)."""

    kind: str
    values: Any

    def nbytes(self) -> int:
        return 0 if self.kind == "ref" else int(self.values.nbytes)


@dataclass
class _Column:
    """One column: ``kind`` ``const`` / ``runs`` / ``whole`` (``values``: one value, one per run, every row) or
    ``split`` (``obs``, ``other``: :class:`_Part` of the observation rows and of the others)."""

    kind: str
    dtype: Any
    values: Any = None
    obs: _Part | None = None
    other: _Part | None = None

    def nbytes(self) -> int:
        if self.kind == "split":
            return self.obs.nbytes() + self.other.nbytes()
        return int(self.values.nbytes)


class StoredTable:
    """The bound table, exactly, in the compact form described in the module docstring."""

    def __init__(self, df: pd.DataFrame, data: Any) -> None:
        self.num_rows = n_rows = len(df)
        self.index = df.index
        self.columns = df.columns
        self.attrs = copy.deepcopy(df.attrs) if df.attrs else {}
        self.allows_duplicate_labels = df.flags.allows_duplicate_labels
        self._obs_rows = data.obs_rows
        id_col = data.columns.get("id")
        ids = df[id_col] if id_col in df.columns and isinstance(df[id_col], pd.Series) else None
        id_codes = None if ids is None else _exact_codes(_values(ids))
        self.run_lengths = self._run_starts = None
        self._id_codes = None if n_rows == 0 else id_codes
        if self._id_codes is not None:
            starts = np.concatenate([np.zeros(1, dtype=np.int64)]
                                    + [i0 + 1 + np.flatnonzero(c) for i0, c in self._changes(id_codes)])
            index_type = np.int32 if n_rows < 2 ** 31 else np.int64
            self.run_lengths = np.diff(np.r_[starts, n_rows]).astype(index_type)
            self._run_starts = starts
        self._refs = [a for a in (data.dv, data.time, *data.regressors.values(), data.cens) if a is not None]
        other = np.ones(n_rows, dtype=bool)
        for _, pos in self._obs_chunks():
            other[pos] = False
        self._other_pos = np.flatnonzero(other)
        del other
        self._cols = [self._encode(df.iloc[:, j]) for j in range(df.shape[1])]
        del self._other_pos, self._run_starts, self._id_codes
        self._refs = None

    # ----- encoding (over chunks of rows or individuals: the temporaries stay small next to the table) ------------
    def _changes(self, codes: np.ndarray):
        """``(r0, changed)`` over chunks: ``changed[k]``: row ``r0 + k + 1`` differs from row ``r0 + k``."""
        for r0 in range(0, len(codes) - 1, _CHUNK):
            r1 = min(r0 + _CHUNK, len(codes) - 1)
            yield r0, codes[r0 + 1:r1 + 1] != codes[r0:r1]

    def _obs_chunks(self):
        """``(individuals, positions)`` over chunks of individuals: the table rows of their observations, in the
        order of the ``[N, T]`` arrays' valid entries."""
        rows = self._obs_rows
        step = max(1, _CHUNK // max(1, rows.shape[1]))
        for i0 in range(0, rows.shape[0], step):
            block = rows[i0:i0 + step]
            yield slice(i0, i0 + step), block[block >= 0]

    def _encode(self, s: pd.Series) -> _Column:
        """The smallest exact encoding of the column ``s``."""
        numpy = isinstance(s.dtype, np.dtype)
        arr = _values(s)
        codes = _exact_codes(arr)
        if codes is None:  # no exact comparison: the column as it is
            return _Column("whole", s.dtype, arr.copy())
        if _all_equal(codes):
            return _Column("const", s.dtype, arr[:1].copy())
        best, size = _Column("whole", s.dtype), int(arr.nbytes)
        if self._id_codes is not None and self._constant_in_runs(codes):
            runs = arr.take(self._run_starts)
            if runs.nbytes < size:
                best, size = _Column("runs", s.dtype, runs), int(runs.nbytes)
        parts = self._split(arr, codes, size) if numpy else None
        if parts is not None and parts[0].nbytes() + parts[1].nbytes() < size:
            best = _Column("split", s.dtype, obs=parts[0], other=parts[1])
        if best.kind == "whole":
            best.values = arr.copy()
        return best

    def _constant_in_runs(self, codes: np.ndarray) -> bool:
        """The column (``codes``) changes only where the ID does."""
        for (_, changed), (_, id_changed) in zip(self._changes(codes), self._changes(self._id_codes)):
            if (changed & ~id_changed).any():
                return False
        return True

    def _split(self, arr: np.ndarray, codes: np.ndarray, size: int) -> tuple[_Part, _Part] | None:
        """The observation rows' and the other rows' parts of the numpy column ``arr`` (``codes``: its bits); None when
        they would take ``size`` bytes or more."""
        first = next((pos[:1] for _, pos in self._obs_chunks() if len(pos)), np.zeros(0, dtype=np.intp))
        obs = None
        if all((codes[pos] == codes[first]).all() for _, pos in self._obs_chunks()):
            obs = _Part("const", arr[first].copy())
        for a in self._refs if obs is None else ():
            if self._matches(a, arr):
                obs = _Part("ref", a)
                break
        if obs is None:
            if (self._obs_rows >= 0).sum() * arr.dtype.itemsize >= size:
                return None
            obs = _Part("vals", np.concatenate([arr[pos] for _, pos in self._obs_chunks()]))
        at = codes[self._other_pos]
        other = _Part("const", arr[self._other_pos[:1]].copy()) if _all_equal(at) and len(at) else \
            _Part("vals", arr[self._other_pos])
        return obs, other

    def _matches(self, a: np.ndarray, arr: np.ndarray) -> bool:
        """The bound ``[N, T]`` array ``a`` at the observation rows, cast to the column's dtype, is the column there
        bit for bit (checked over blocks of individuals)."""
        if a.shape != self._obs_rows.shape or a.dtype.kind not in "biuf" or arr.dtype.kind not in "biuf":
            return False
        with np.errstate(invalid="ignore", over="ignore"):
            for units, pos in self._obs_chunks():
                block = a[units]
                mine = block[self._obs_rows[units] >= 0].astype(arr.dtype)
                if not np.array_equal(_bits(mine), _bits(arr[pos])):
                    return False
        return True

    # ----- decoding ---------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes this object holds beyond the bound arrays (the parts it reads from them are not counted)."""
        index = 0 if isinstance(self.index, pd.RangeIndex) else int(self.index.memory_usage(deep=True))
        runs = 0 if self.run_lengths is None else int(self.run_lengths.nbytes)
        return sum(c.nbytes() for c in self._cols) + runs + index

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(valid [N, T], positions of the observation rows, the other rows (bool [R]))``."""
        valid = self._obs_rows >= 0
        obs_pos = self._obs_rows[valid]
        is_other = np.ones(self.num_rows, dtype=bool)
        is_other[obs_pos] = False
        return valid, obs_pos, is_other

    def _decode(self, col: _Column, rows: Any = None) -> Any:
        n = self.num_rows
        if col.kind == "whole":
            return col.values.copy()
        if col.kind == "const":
            return np.repeat(col.values, n) if isinstance(col.values, np.ndarray) else \
                col.values.take(np.zeros(n, dtype=np.intp))
        if col.kind == "runs":
            if isinstance(col.values, np.ndarray):
                return np.repeat(col.values, self.run_lengths)
            return col.values.take(np.repeat(np.arange(len(self.run_lengths)), self.run_lengths))
        valid, obs_pos, is_other = rows if rows is not None else self._rows()
        out = np.empty(n, dtype=col.dtype)
        for pos, part in ((obs_pos, col.obs), (is_other, col.other)):
            if part.kind == "ref":
                out[pos] = part.values[valid]  # cast to the column's dtype (exact: checked at binding)
            else:
                out[pos] = part.values if part.kind == "vals" else part.values[0]
        return out

    def column(self, label: Any) -> pd.Series:
        """The column ``label`` (the first of that label) as a Series on the table's index."""
        j = self.columns.get_loc(label)
        if isinstance(j, slice):
            j = j.start
        elif not isinstance(j, (int, np.integer)):
            j = int(np.flatnonzero(j)[0])
        return pd.Series(self._decode(self._cols[j]), index=self.index, name=self.columns[j], copy=False)

    def frame(self) -> pd.DataFrame:
        """The bound table, rebuilt (a new DataFrame at each call)."""
        rows = self._rows() if any(c.kind == "split" for c in self._cols) else None
        out = pd.DataFrame({j: self._decode(c, rows) for j, c in enumerate(self._cols)}, index=self.index, copy=False)
        out.columns = self.columns
        if self.attrs:
            out.attrs = copy.deepcopy(self.attrs)
        if not self.allows_duplicate_labels:
            out = out.set_flags(allows_duplicate_labels=False)
        return out

    def describe(self) -> dict[str, str]:
        """Each column's encoding (``label: kind``, ``split``: ``split(obs part/other part)``), for tests and
        benchmarks."""
        out = {}
        for label, c in zip(self.columns, self._cols):
            out[str(label)] = f"split({c.obs.kind}/{c.other.kind})" if c.kind == "split" else c.kind
        return out


__all__ = ["StoredTable"]
