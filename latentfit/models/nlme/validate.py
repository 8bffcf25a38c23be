"""Checks of a NONMEM-style table that no record type makes valid, run by :func:`~.data.read_nonmem` first.

:func:`read_nonmem` checks the records themselves (EVID/MDV/ADDL/II/SS/RATE/DUR/CMT rules, missing or negative
times, non-numeric values, covariates missing); this module checks what comes before the records have a meaning,
each time with a :class:`~latentfit.DataError` naming the column, the ID and the row:

* a column name that appears twice (pandas would hand back a table for it);
* a cell that is not a scalar (a list, a dict, an array);
* an infinite value (``inf``, ``-inf``) in a numeric column: NONMEM values are finite numbers, and a missing one is
  ``.`` or an empty cell;
* a column of IDs that mixes numbers and text (``1`` and ``"1"`` would be two individuals);
* a covariate column that mixes numbers and text (a typo in a continuous covariate would otherwise turn it into a
  categorical one with a level per value).

Valid NONMEM features (EVID 2-4, MDV, ADDL, II, SS, RATE, DUR, CMT) are not this module's business: it rejects no
value that a record could use.  It never modifies the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from latentfit.inference.model import DataError


def _where(df: pd.DataFrame, id_col: str, pos: int) -> str:
    """``(ID <id>, row <label>)`` of the row at position ``pos``."""
    row = df.index[pos]
    ident = df[id_col].iloc[pos] if id_col in df.columns and not _duplicated(df, id_col) else "?"
    ident = ident.item() if isinstance(ident, np.generic) else ident
    return f"(ID {ident!r}, row {row})"


def _duplicated(df: pd.DataFrame, name: str) -> bool:
    return int((df.columns == name).sum()) > 1


def _is_scalar(v: Any) -> bool:
    return v is None or np.ndim(v) == 0 and not isinstance(v, (dict, set))


def _numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(value as float or NaN, is text)`` per cell: text = a non-missing cell that is not a number."""
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    text = np.isnan(num) & values.notna().to_numpy()
    return num, text


def _floats(values: pd.Series) -> np.ndarray | None:
    """The column's values as numbers where an infinity can be (None: a numpy integer or boolean column has none): a
    numpy float column as it is (no copy of it, 8 B per row), any other as :func:`_numbers` reads it."""
    if isinstance(values.dtype, np.dtype) and values.dtype.kind in "biu":
        return None
    if isinstance(values.dtype, np.dtype) and values.dtype.kind == "f":
        return values.to_numpy()
    return _numbers(values)[0]


def numbers_if_all_numeric(values: pd.Series) -> pd.Series:
    """A text (object) column whose every non-missing cell is a number (``70``, ``"70.5"``) as floats; any other
    column unchanged.  A new series: the table is not modified."""
    if values.dtype != object:
        return values
    num, text = _numbers(values)
    return values if text.any() else pd.Series(num, index=values.index, name=values.name)


def validate_table(df: pd.DataFrame, columns: dict[str, str], covariates: Iterable[str] = (),
                   regressors: Iterable[str] = (), dose: str | None = None) -> None:
    """Raise :class:`~latentfit.DataError` for the faults listed in the module docstring.

    ``columns`` maps the roles (``id``, ``time``, ``dv``, ``amt``, ...) to column names; ``covariates``,
    ``regressors`` and ``dose`` are the other columns :func:`read_nonmem` reads.  Columns absent from ``df`` are
    left to :func:`read_nonmem`'s own messages.
    """
    dup = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
    if dup:
        raise DataError(f"column name(s) {dup} appear more than once in the data; rename or drop the copies")
    id_col = columns["id"]
    used = [c for c in dict.fromkeys([*columns.values(), *covariates, *regressors, *([dose] if dose else [])])
            if c in df.columns]
    for c in used:
        values = df[c]
        if values.dtype == object:
            bad = [j for j, v in enumerate(values.to_numpy()) if not _is_scalar(v)]
            if bad:
                v = values.iloc[bad[0]]
                raise DataError(f"column {c!r} holds a {type(v).__name__} {_where(df, id_col, bad[0])}: every cell "
                                "must be a single number or text")
    numeric = [c for role, c in columns.items() if role != "id" and c in df.columns]
    numeric += [c for c in (*regressors, *([dose] if dose else [])) if c in df.columns]
    for c in dict.fromkeys(numeric):
        num = _floats(df[c])
        if num is None:  # integers, booleans: no infinity
            continue
        inf = np.isinf(num)
        if inf.any():
            j = int(np.argmax(inf))
            raise DataError(f"column {c!r} has an infinite value {num[j]} {_where(df, id_col, j)}: values must be "
                            "finite numbers (a missing DV is '.' or an empty cell)")
    if id_col in df.columns:
        ids = df[id_col]
        if isinstance(ids.dtype, np.dtype) and ids.dtype.kind in "biuf":  # a numpy number column: no text in it
            num = _floats(ids)
        else:
            num, text = _numbers(ids)
            if text.any() and (~text & ~np.isnan(num)).any():
                j, k = int(np.argmax(text)), int(np.argmax(~text & ~np.isnan(num)))
                raise DataError(f"column {id_col!r} mixes numbers ({ids.iloc[k]!r} {_where(df, id_col, k)}) and "
                                f"text ({ids.iloc[j]!r} {_where(df, id_col, j)}): write every ID the same way")
        if num is not None and np.isinf(num).any():
            j = int(np.argmax(np.isinf(num)))
            raise DataError(f"column {id_col!r} has an infinite ID {_where(df, id_col, j)}")
    for c in dict.fromkeys(covariates):
        if c not in df.columns:
            continue
        num, text = _numbers(df[c])
        finite = ~text & ~np.isnan(num)
        if text.any() and finite.any():
            j = int(np.argmax(text))
            raise DataError(f"covariate {c!r} mixes numbers and text: {df[c].iloc[j]!r} {_where(df, id_col, j)}; a "
                            "continuous covariate must be all numbers, a categorical one all labels")
        if np.isinf(num).any():
            j = int(np.argmax(np.isinf(num)))
            raise DataError(f"covariate {c!r} has an infinite value {num[j]} {_where(df, id_col, j)}")


__all__ = ["numbers_if_all_numeric", "validate_table"]
