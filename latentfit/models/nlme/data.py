"""NONMEM-style long data tables -> padded per-individual arrays.

A table has one row per event: ``ID, TIME, DV, AMT, EVID, MDV, CMT`` (+ ``RATE``, ``CENS``,
covariates, regressors).  Column names are configurable (``columns={"id": "Subject", ...}``).
Rules (NONMEM conventions):

* ``EVID``: 0 observation, 1 dose, 2 other event (e.g. a covariate change), 3 reset (the system returns to
  its initial state: doses before it no longer act), 4 reset and dose.  Without an ``EVID`` column a row
  with ``AMT > 0`` is a dose.  ``MDV = 1`` or a missing ``DV`` marks an observation row to ignore.
* ``RATE > 0`` makes a dose a zero-order infusion of duration ``AMT / RATE``; 0 is a bolus; ``RATE = -2``
  takes the duration from ``DUR`` (``RATE`` = ``AMT / DUR``), as in NONMEM (without a ``RATE`` column, a
  ``DUR > 0`` makes an infusion).  ``RATE = -1`` (rate estimated in the model) is not supported.
* ``ADDL`` additional doses every ``II`` after the dose (``ADDL + 1`` doses at ``t, t + II, ...``); they are
  expanded here into ordinary dose records (vectorised).
* ``SS = 1``: the dose is given at steady state: the system is reset, then the dose is the last of an
  infinite train every ``II`` (the structural model adds the train's past, in closed form or by
  integration); ``SS = 2``: the steady state is added to the current state without a reset.  The
  additional doses of an ``SS`` record are ordinary doses.
* Periods: a reset (``EVID`` 3 or 4, or an ``SS = 1`` dose) starts a new period of the individual (the
  records that follow it in the table); a dose acts only on the observations of its own period (so
  additional doses scheduled past a reset are cancelled by it).  The time may restart at a reset, but must
  not precede the reset's time within its period.
* Records at the same time are taken in the order of the table, as NONMEM/PREDPP does: an observation listed
  before a dose (or a reset, or a steady-state dose) at its time is a pre-dose (trough) sample, which that dose
  does not reach; listed after it, the dose acts on it.  An additional dose (``ADDL``) that falls at the time of
  an observation record comes after that record (NONMEM's rule).  A table sorted stably by ``ID, TIME`` keeps
  this order (``df.sort_values(["ID", "TIME"], kind="stable")``); a table of every dose row followed by every
  observation row makes same-time observations post-dose, the reverse order pre-dose.
* Time-varying covariates (``regressors=`` columns): their value at each observation is carried forward from
  the last record that has one (``covariate_interpolation="locf"``, the default; before the first value: the
  first value) or linearly interpolated in time between the records around it (``"linear"``; constant
  outside), using every record of the individual (doses and ``EVID`` 2 rows included).
* ``CENS`` (Monolix convention): 1 = below the limit (``DV`` holds the LLOQ), −1 = above, 0 = observed.
* saemix-style tables without dose rows: ``dose="Dose"`` names a per-row dose column; each
  individual then gets one dose of that amount at time 0.
* ``x="dose"`` names the x-variable (saemix's ``name.X``) when it is not the time, e.g. the dose or a
  centred covariate of dose–response data: it is passed to the structural model as a regressor and as
  ``data.x``; without a time column the observations are ordered by ``x`` and ``data.time`` holds ``x``.
  Regressors may be negative; times must be ≥ 0 only in data with doses.

Validation raises :class:`~latentfit.DataError` naming the column, ID and row for unknown columns,
non-numeric values, negative times and inconsistent dose records (``ADDL > 0`` or ``SS`` without ``II > 0``,
``RATE = -2`` without ``DUR``, ``ADDL``/``SS`` on a row that is not a dose, unknown ``EVID``/``SS`` codes);
it warns (naming the ID) for individuals without any observation (they are dropped) and for duplicated dose records.

Observations are padded to ``[N, T]`` arrays (``T`` = most observations of one individual) with a
mask, doses to ``[N, D]`` (padding doses have amount 0).
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from latentfit._hooks import user_stacklevel
from latentfit.inference.model import DataError

from .validate import numbers_if_all_numeric, validate_table

DEFAULT_COLUMNS = {"id": "ID", "time": "TIME", "dv": "DV", "amt": "AMT", "evid": "EVID", "mdv": "MDV",
                   "cmt": "CMT", "rate": "RATE", "cens": "CENS", "addl": "ADDL", "ii": "II", "ss": "SS", "dur": "DUR"}
INTERPOLATIONS = ("locf", "linear")
REQUIRED = ("id", "dv")
CODES = ("evid", "mdv", "cmt", "cens")  # roles whose integer columns are read as they are (no float copy)


@dataclass
class NLMEData:
    """Padded arrays of one data set (numpy; the model moves them to its device)."""

    ids: np.ndarray  # [N] original IDs
    time: np.ndarray  # [N, T] observation times (padding: the individual's last time)
    dv: np.ndarray  # [N, T] observations (padding: 0)
    mask: np.ndarray  # [N, T] bool, True for a real observation
    cens: np.ndarray  # [N, T] int8: 0 observed, 1 below the limit, -1 above
    dose_time: np.ndarray  # [N, D]
    dose_amt: np.ndarray  # [N, D] (padding: 0)
    dose_rate: np.ndarray  # [N, D] 0 = bolus
    dose_cmt: np.ndarray  # [N, D]
    covariates: pd.DataFrame  # one row per individual (index: ID), raw values
    regressors: dict[str, np.ndarray] = field(default_factory=dict)  # [N, T] per-observation columns
    obs_rows: np.ndarray | None = None  # [N, T] positions of the observations in the source table (-1: padding; int32
    #: below 2³¹ rows)
    columns: dict[str, str] = field(default_factory=dict)
    x: str | None = None  # name of the x-variable column (None: the time)
    dose_ss: np.ndarray | None = None  # [N, D] 0, 1 (steady state after a reset) or 2 (steady state added)
    dose_ii: np.ndarray | None = None  # [N, D] dosing interval of a steady-state dose (0 otherwise)
    dose_seg: np.ndarray | None = None  # [N, D] period of the dose (a reset starts a new period)
    obs_seg: np.ndarray | None = None  # [N, T] period of the observation (None: no reset, one period)
    seg_start: np.ndarray | None = None  # [N, S] time of the reset starting each period (period 0: -inf; padding: inf)
    #: time-varying covariates read as step functions of time (``steps=``): name -> ``(time, period, value)``, each
    #: ``[N, R]``, the individual's records that have a value, by period and time (padding: the last record repeated)
    regressor_steps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: every row of the source table, in its order: individual index (-1: dropped), time and period
    record_unit: np.ndarray | None = None
    record_time: np.ndarray | None = None
    record_seg: np.ndarray | None = None
    #: order of the records at equal times (None: every dose at an observation's time acts on it): the position of
    #: each observation [N, T] and dose [N, D] among the individual's records (an additional dose: +inf, after any
    #: record at its time; padding: +inf); a dose at an observation's time acts on it iff its rank is lower
    obs_rank: np.ndarray | None = None
    dose_rank: np.ndarray | None = None

    @property
    def has_ss(self) -> bool:
        """Some dose is given at steady state (``SS`` 1 or 2)."""
        return self.dose_ss is not None and bool((self.dose_ss[self.dose_amt > 0] > 0).any())

    @property
    def has_resets(self) -> bool:
        """Some individual has more than one period (``EVID`` 3/4 or ``SS = 1`` resets)."""
        return self.obs_seg is not None and bool((self.obs_seg > 0).any() or (self.dose_seg > 0).any())

    @property
    def x_values(self) -> np.ndarray:
        """``[N, T]`` values of the x-variable (the time unless ``x=`` was given)."""
        return self.time if self.x is None else self.regressors[self.x]

    @property
    def num_individuals(self) -> int:
        return int(self.time.shape[0])

    @property
    def num_obs(self) -> int:
        return int(self.mask.sum())


def release_freed_memory() -> None:
    """Hand the free pages of the C heap back to the OS (glibc's ``malloc_trim(0)``): on Linux with glibc only, a no-op
    elsewhere (no ``malloc_trim``: musl, macOS, Windows), and it never fails.

    Why: reading and binding a large table makes per-row temporaries of 1-32 MB.  glibc maps a block above its mmap
    threshold and unmaps it when it is freed, but each such free raises the threshold to that block's size (up to
    32 MB), so the later temporaries come from the heap, whose freed pages stay resident (and fragmented) until glibc
    reuses them.  They are not live data, yet they count in the process's peak when the next large arrays are made
    on top of them: at 10⁵ individuals ~100 B per individual, a third of the fit's per-unit state.  :func:`read_nonmem`
    and the binding call this between their phases on large tables; the data read are the same either way."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))  # the process's C library (AttributeError: not glibc)
    except Exception:  # noqa: BLE001 - an optimisation of the resident memory only: never an error of the binding
        pass


#: tables of at least this many rows are read with release_freed_memory between phases (a per-row float64 temporary
#: of 1 MiB; below, the freed pages are few and the call's ~2 ms not worth it)
RELEASE_ROWS = 1 << 17


def _id(value: Any) -> str:
    """An ID as the user wrote it (numpy scalars unwrapped)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _numeric(df: pd.DataFrame, col: str, id_col: str, codes: bool = False) -> np.ndarray:
    """The column ``col`` as float64, read-only.  A float64 column is the table's own memory (no copy: at 10⁶
    individuals × 11 rows a copy is 88 MB; read-only, so nothing here can write into the caller's table);
    ``codes``: an integer column (EVID, MDV, CMT, CENS: codes, read as integers) as well."""
    if df[col].dtype == np.float64 or (codes and df[col].dtype.kind in "iu"):
        out = df[col].to_numpy().view()
        out.flags.writeable = False
        return out
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() & df[col].notna()
    if bool(bad.any()):
        row = bad.idxmax()
        raise DataError(f"column {col!r} has a non-numeric value {df.loc[row, col]!r} "
                        f"(ID {_id(df.loc[row, id_col])}, row {row})")
    return values.to_numpy(dtype=float)


def _one(a: np.ndarray) -> Any:
    """The value of ``a`` if it is one value viewed on every row (a broadcast: an absent column), else None."""
    return a[0] if a.ndim == 1 and a.strides == (0,) and len(a) else None


def _factorize(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pd.factorize(ids)``: each row's code and the IDs in the order of the table.  Integer IDs in increasing runs
    (a sorted table) are read from the runs, without a hash table of the IDs (~40 B per individual)."""
    if ids.dtype.kind in "iu" and len(ids) > 1:
        new = ids[1:] != ids[:-1]
        starts = np.flatnonzero(new) + 1
        del new
        first = ids[np.concatenate([[0], starts])]
        if bool(np.all(first[1:] > first[:-1])):
            codes = np.zeros(len(ids), dtype=np.int64)
            codes[starts] = 1
            np.cumsum(codes, out=codes)
            return codes, first
    return pd.factorize(ids)


def _no_nan(a: np.ndarray) -> np.ndarray:
    """``np.nan_to_num(a)``; an integer array (no NaN) as it is, not copied."""
    return a if a.dtype.kind in "iu" else np.nan_to_num(a)


def _missing(mdv: np.ndarray) -> np.ndarray:
    """``|nan_to_num(MDV)| >= 1`` per row (MDV ≠ 0 as an integer; NaN: 0) without a float copy of the column."""
    return (mdv >= 1) | (mdv <= -1)


def _in_order(key: np.ndarray, time: np.ndarray) -> bool:
    """Rows already sorted by ``key`` then ``time`` (what a stable lexsort would leave as they are)."""
    same = key[1:] == key[:-1]
    return bool(np.all((key[1:] > key[:-1]) | (same & (time[1:] >= time[:-1]))))


def read_nonmem(df: pd.DataFrame, columns: dict[str, str] | None = None, covariates: list[str] | tuple = (),
                regressors: list[str] | tuple = (), dose: str | None = None, x: str | None = None,
                covariate_interpolation: str = "locf", records: bool = False,
                steps: list[str] | tuple = ()) -> NLMEData:
    """Validate a NONMEM-style table and pad it (see the module docstring).

    Parameters
    ----------
    df : the long table (pandas DataFrame).
    columns : mapping from the roles ``id, time, dv, amt, evid, mdv, cmt, rate, cens, addl, ii, ss, dur`` to
        column names (defaults: the upper-case NONMEM names).
    covariates : individual-level covariate columns (first value per individual is used).
    regressors : per-observation columns passed to the structural model (e.g. a concentration for
        an Emax model, a time-varying covariate), padded like ``DV``; missing values on an observation
        row are filled from the individual's other records (``covariate_interpolation``).
    dose : saemix-style per-row dose column (one dose at time 0 per individual) when the table has
        no dose rows.
    x : the x-variable column when it is not the time (a dose, a concentration, a centred covariate);
        the time column is then optional.
    covariate_interpolation : ``"locf"`` (last value carried forward, default) or ``"linear"`` (in time): how the
        ``regressors`` are read at the observations from all the records.
    records : keep every row's individual index, time and period (``record_unit`` / ``record_time`` /
        ``record_seg``: three arrays per row of the table, which only the occasions' boundaries read).
    steps : ``regressors`` also kept as step functions of time (``regressor_steps``: every record with a value,
        dose and ``EVID = 2`` rows included), for ODE models whose kinetics read them between the records.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(df).__name__}")
    cols = dict(DEFAULT_COLUMNS)
    if columns:
        unknown_roles = set(columns) - set(DEFAULT_COLUMNS)
        if unknown_roles:
            raise DataError(f"unknown column role(s) {sorted(unknown_roles)}; roles are {sorted(DEFAULT_COLUMNS)}")
        cols.update(columns)
    available = list(df.columns)
    for role in REQUIRED:
        if cols[role] not in df.columns:
            raise DataError(f"column {cols[role]!r} (role {role!r}) is not in the data; columns are {available}")
    has_time = cols["time"] in df.columns
    if not has_time and x is None:
        raise DataError(f"column {cols['time']!r} (role 'time') is not in the data; columns are {available}: name "
                        f"the time column (columns={{'time': ...}}), or, for data without time (e.g. dose–response), "
                        f"the x-variable (x='dose')")
    if x is not None and x not in df.columns:
        raise DataError(f"column {x!r} (the x-variable, x=) is not in the data; columns are {available}")
    if x is not None:
        regressors = tuple(dict.fromkeys((x, *regressors)))
    if covariate_interpolation not in INTERPOLATIONS:
        raise DataError(f"covariate_interpolation must be one of {INTERPOLATIONS}, got {covariate_interpolation!r}")
    for role in ("amt", "evid", "mdv", "cmt", "rate", "cens", "addl", "ii", "ss", "dur"):
        if columns and role in columns and cols[role] not in df.columns:
            raise DataError(f"column {cols[role]!r} (role {role!r}) is not in the data; columns are {available}")
    for name in list(covariates) + list(regressors) + ([dose] if dose else []):
        if name not in df.columns:
            raise DataError(f"column {name!r} is not in the data; columns are {available}")
    validate_table(df, cols, covariates, regressors, dose)  # table-level faults (validate.py)
    present = {role: c for role, c in cols.items() if c in df.columns}
    id_col = cols["id"]
    if df[id_col].isna().any():
        row = df[id_col].isna().idxmax()
        raise DataError(f"column {id_col!r} has a missing ID at row {row}")
    num = {role: _numeric(df, c, id_col, codes=role in CODES) for role, c in present.items()
           if role not in ("id", "dv")}
    dv = _numeric(df, cols["dv"], id_col)
    for name in list(regressors) + ([dose] if dose else []):
        num[name] = _numeric(df, name, id_col)
    time = num["time"] if has_time else num[x]
    if has_time and np.isnan(time).any():
        row = df.index[np.isnan(time)][0]
        raise DataError(f"column {cols['time']!r} has a missing time (ID {_id(df.loc[row, id_col])}, row {row})")
    n_rows = len(df)
    amt = num.get("amt", np.zeros(n_rows))
    if np.isnan(amt).any():  # no copy without NaN
        amt = np.nan_to_num(amt)
    fail = _failer(df, id_col)
    if "evid" in num:
        evid_f = _no_nan(num["evid"])
        fail(~np.isin(evid_f, (0, 1, 2, 3, 4)), f"column {cols['evid']!r} must be 0 (observation), 1 (dose), 2 (other "
                                                f"event), 3 (reset) or 4 (reset and dose)")
        evid = evid_f.astype(np.int8)  # codes 0-4 (checked): the narrowest type, 1 byte per row
        del evid_f
    else:
        evid = (amt > 0).astype(np.int8)
    # per-row codes in their narrowest form (10⁶ individuals × 11 rows: 88 MB per int64 array); an absent column is
    # one value viewed on every row
    missing_dv = _missing(num["mdv"]) if "mdv" in num else np.False_  # MDV ≠ 0 (as int); numpy's False: ~ is True
    cmt = _no_nan(num["cmt"]).astype(int) if "cmt" in num else np.broadcast_to(1, (n_rows,))
    if "cens" in num:
        cens = _no_nan(num["cens"]).astype(int)
        fail(~np.isin(cens, (-1, 0, 1)), f"column {cols['cens']!r} must be -1, 0 or 1")
        cens = cens.astype(np.int8)
    else:
        cens = np.broadcast_to(np.int8(0), (n_rows,))
    is_dose = np.isin(evid, (1, 4))
    is_obs = (evid == 0) & ~missing_dv & ~np.isnan(dv)  # bool (with Python's False, ~False = -1 made it int64)
    evid_obs = evid == 0  # observation records (with or without a value): their time order is checked
    if "mdv" in num:  # NONMEM's form: an observation record (EVID 0, MDV 0) without a value is a fault there
        empty = (evid == 0) & ~missing_dv & np.isnan(dv)
        if bool(empty.any()):
            row = df.index[empty][0]
            warnings.warn(f"{int(empty.sum())} observation record(s) with MDV = 0 have no {cols['dv']!r} value ('.' "
                          f"or empty; first: ID {_id(df.loc[row, id_col])}, row {row}): read as missing (set MDV = 1 "
                          f"on them to say so)", stacklevel=user_stacklevel())
    del missing_dv
    fail(is_dose & (amt <= 0), "dose record without a positive amount")
    rate, addl, ii, ss = _dose_records(num, cols, is_dose, amt, fail)
    for role in ("evid", "mdv", "cmt", "cens"):  # read: their per-row float copies are not needed any more
        if role not in regressors and role != dose:
            num.pop(role, None)
    if x is not None and np.isnan(num[x][is_obs]).any():
        row = df.index[is_obs & np.isnan(num[x])][0]
        raise DataError(f"column {x!r} (the x-variable) is missing on an observation (ID {_id(df.loc[row, id_col])}, "
                        f"row {row})")
    if not has_time and (is_dose | (evid > 1)).any():
        row = df.index[is_dose | (evid > 1)][0]
        raise DataError(f"dose or event record (ID {_id(df.loc[row, id_col])}, row {row}) in data without a time "
                        f"column {cols['time']!r}: dose records need times (or use dose= for one dose per individual)")
    has_doses = bool(is_dose.any()) or dose is not None
    if has_time and has_doses and (time < 0).any():
        row = df.index[time < 0][0]
        raise DataError(f"negative time {df.loc[row, cols['time']]} (ID {_id(df.loc[row, id_col])}, row {row}): times "
                        f"must be >= 0 in data with doses; a regressor that is not a time (a centred covariate, a "
                        f"log-dose) goes in x= or regressors=, not in the time column")
    if not has_time:  # a time column has no NaN (checked above): no copy
        time = np.nan_to_num(time)
    ids_all = df[id_col].to_numpy()
    # periods: a reset (EVID 3/4, SS = 1 dose) starts a new one, in the order of the table
    reset = np.isin(evid, (3, 4))
    del evid  # per-row arrays are freed once read (10⁶ individuals × 11 rows: 11 MB per byte of a row)
    if ss.strides != (0,) or (len(ss) and ss[0] != 0):  # SS given: a steady-state dose after a reset is one too
        reset |= is_dose & (ss == 1)
    if reset.any() or records:
        seg = pd.Series(reset.astype(np.int64)).groupby(ids_all).cumsum().to_numpy()
    else:  # one period: 0 viewed on every row
        seg = np.broadcast_to(np.int64(0), (n_rows,))
    if reset.any():
        start = pd.Series(np.where(reset, time, np.nan)).groupby([ids_all, seg]).transform("first").to_numpy()
        fail(time < start, f"time before the reset (EVID 3/4 or SS = 1 dose) that starts this period: the "
                           f"{cols['time']!r} of the records after a reset must not precede its time")

    # the IDs in the order of the table (pd.unique's) with each row's code: one hash pass, no grouped frame
    codes, uniq = _factorize(ids_all)
    has_obs = np.zeros(len(uniq), dtype=bool)
    has_obs[codes[is_obs]] = True
    keep_ids = uniq[has_obs]  # an array (the list of IDs is built at the end, after the per-row arrays are freed)
    dropped = uniq[~has_obs]
    n = len(keep_ids)
    index_type = np.int32 if len(df) < 2 ** 31 else np.int64  # row and individual indices: 4 bytes each
    kept_at = np.full(len(uniq), -1, dtype=index_type)
    kept_at[has_obs] = np.arange(n, dtype=index_type)
    order = kept_at[codes]  # row -> individual (-1: dropped), as pd.Index(keep_ids).get_indexer(ids_all)
    # a duplicated dose needs an ID with two dose records: without one there is nothing to check
    several_doses = bool(is_dose.any()) and int(np.bincount(codes[is_dose], minlength=len(uniq)).max()) > 1
    all_kept = not len(dropped)  # every row's individual is kept (order >= 0): no [rows] mask of it
    del codes, has_obs, kept_at
    if n_rows >= RELEASE_ROWS:  # the IDs' per-row temporaries (codes, hash table) were freed
        release_freed_memory()
    if len(dropped):
        rows = {_id(i): [int(r) for r in df.index[ids_all == i][:3]] for i in dropped[:5]}
        names = [_id(i) for i in dropped[:5]]
        warnings.warn(f"individual(s) without any observation are dropped: ID(s) {', '.join(names)} "
                      f"(first rows {rows})",
                      stacklevel=user_stacklevel())
    if not len(keep_ids):
        raise DataError("no individual has an observation")
    # duplicated dose records (same ID, time, amount and compartment)
    if several_doses:
        dose_df = pd.DataFrame({"id": ids_all[is_dose], "t": time[is_dose], "a": amt[is_dose], "c": cmt[is_dose],
                                "s": seg[is_dose]}, index=df.index[is_dose])
        dup = dose_df.duplicated(keep="first")
        if bool(dup.any()):
            row = dup.idxmax()
            warnings.warn(f"duplicated dose record (ID {_id(dose_df.loc[row, 'id'])}, row {row}): same time, amount "
                          f"and compartment as an earlier row; both doses are given", stacklevel=user_stacklevel())
        del dose_df, dup  # five columns per dose row, not needed past the check

    if has_time:
        _warn_unsorted(df, id_col, cols["time"], order, seg, time, [("observation records", evid_obs),
                                                                    ("dose records", is_dose)])
    del evid_obs
    obs_idx = np.where(is_obs if all_kept else is_obs & (order >= 0))[0].astype(index_type)
    del is_obs
    # by individual, period and time (stable: table order at equal times); one period: no period key (it would
    # gather an [n_obs] array of zeros), and a table already in that order (the usual one) is not sorted again
    if reset.any() or records:
        obs_idx = obs_idx[np.lexsort((time[obs_idx], seg[obs_idx], order[obs_idx]))]
    elif not _in_order(order[obs_idx], time[obs_idx]):
        obs_idx = obs_idx[np.lexsort((time[obs_idx], order[obs_idx]))]
    counts = np.bincount(order[obs_idx], minlength=n)
    t_max = int(counts.max())
    if n_rows >= RELEASE_ROWS:  # the sort's and the counts' gathered [n_obs] copies were freed
        release_freed_memory()
    # the observations sorted by individual fill each individual's first counts[i] slots: in row-major order these
    # are the True entries of the mask, so boolean assignments place them (no [n_obs] row / slot index arrays)
    mask = np.arange(t_max) < counts[:, None]
    time_a = np.zeros((n, t_max))
    dv_a = np.zeros((n, t_max))
    cens_a = np.zeros((n, t_max), dtype=np.int8)  # the narrowest types: these are kept for the post-fit tools
    rows_a = np.full((n, t_max), -1, dtype=index_type)
    ends = np.cumsum(counts)
    step = max(1, (1 << 16) // t_max)  # blocks of individuals: no [n_obs] gathered copy of a whole column
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        rows, block = obs_idx[(ends[i0 - 1] if i0 else 0):ends[i1 - 1]], mask[i0:i1]
        time_a[i0:i1][block] = time[rows]
        dv_a[i0:i1][block] = dv[rows]
        cens_a[i0:i1][block] = cens[rows]
        rows_a[i0:i1][block] = rows
        # padding: the individual's last time, masked out (in place, per block: no [N] index or time arrays)
        last = time_a[i0:i1][np.arange(i1 - i0), counts[i0:i1] - 1]
        np.copyto(time_a[i0:i1], last[:, None], where=~block)
    del ends, rows, block, last  # (rows views obs_idx, freed below)
    # one period (no reset): no [N, T] array of zeros (the structural models read None as one period)
    seg_a = None
    if reset.any():
        seg_a = np.zeros((n, t_max))
        seg_a[mask] = seg[obs_idx]
        seg_a = np.where(mask, seg_a, seg_a[np.arange(n), counts - 1][:, None])
    regs = {}
    per_obs = _time_varying(num, list(regressors), time, seg, order, obs_idx, covariate_interpolation, df, id_col)
    for name in regressors:
        r = np.zeros((n, t_max))
        r[mask] = per_obs[name]
        regs[name] = np.where(mask, r, r[np.arange(n), counts - 1][:, None])
    step_fns = {name: _steps(num[name], time, seg, order, n) for name in steps}
    # per-row arrays the doses and periods below do not read, freed before they build theirs (11 rows of 10⁶
    # individuals: 88 MB each)
    del dv, cens, obs_idx, per_obs
    num = {dose: num[dose]} if dose is not None else {}

    # doses (ADDL expanded: ADDL + 1 doses every II)
    if dose is not None:
        first_rows = pd.Series(np.arange(len(df))).groupby(ids_all).first()
        d_amt = np.array([num[dose][first_rows[i]] for i in keep_ids])[:, None]
        d_time = np.zeros((n, 1))
        d_rate = np.zeros((n, 1))
        d_cmt = np.ones((n, 1), dtype=int)
        d_ss, d_ii, d_seg = np.zeros((n, 1)), np.zeros((n, 1)), np.zeros((n, 1))
        d_rank = None
    else:
        # a per-row column absent from the table is one value viewed on every row (_one): it is written as that value,
        # not gathered at every dose ([dose rows] copies, whose freed pages the process kept at the binding's peak)
        rows_d = np.flatnonzero(is_dose if all_kept else is_dose & (order >= 0))
        if _one(addl) == 0:  # no additional dose: each record once (k = 0)
            src, k = rows_d, None
            e_time = time[src]
            e_time += 0.0  # time + 0 * II as below (-0.0 -> 0.0)
        else:
            reps = addl[rows_d] + 1
            src = np.repeat(rows_d, reps)
            k = np.arange(len(src)) - np.repeat(np.cumsum(reps) - reps, reps)  # 0 for the record, 1.. for ADDL
            e_time = time[src] + k * ii[src]
            del reps
        del rows_d
        dwho = order[src]
        one_seg = _one(seg) == 0  # one period (no reset): every dose in period 0
        # stable: table order at equal times; one period orders nothing, and doses already in (individual, time)
        # order are not sorted
        if not one_seg:
            perm = np.lexsort((e_time, seg[src], dwho))
        elif not _in_order(dwho, e_time):
            perm = np.lexsort((e_time, dwho))
        else:
            perm = None
        if perm is not None:
            src, e_time, dwho = src[perm], e_time[perm], dwho[perm]
            k = None if k is None else k[perm]
            del perm  # freed as soon as read
        dcounts = np.bincount(dwho, minlength=n)
        d_max = max(int(dcounts.max()) if len(src) else 0, 1)
        # each individual's doses fill its first slots; at most one dose each: slot 0 (no [doses] slot array)
        dslot = 0 if d_max == 1 else np.arange(len(src)) - np.repeat(np.cumsum(dcounts) - dcounts, dcounts)
        del dcounts
        d_time, d_amt, d_rate = np.zeros((n, d_max)), np.zeros((n, d_max)), np.zeros((n, d_max))
        d_ss, d_ii, d_seg = np.zeros((n, d_max)), np.zeros((n, d_max)), np.zeros((n, d_max))
        d_cmt = np.ones((n, d_max), dtype=int)
        d_time[dwho, dslot] = e_time
        del e_time
        d_amt[dwho, dslot] = amt[src]

        def place(out: np.ndarray, values: np.ndarray) -> None:
            """``out[dwho, dslot] = values[src]``; a constant column as its value."""
            c = _one(values)
            out[dwho, dslot] = values[src] if c is None else c

        place(d_rate, rate)
        place(d_cmt, cmt)
        d_rank = np.full((n, d_max), np.inf)  # the record's row; an additional dose (k > 0) after any record
        d_rank[dwho, dslot] = src if k is None else np.where(k == 0, src, np.inf)
        ss_one, ii_one = _one(ss), _one(ii)
        if ss_one is None or ss_one != 0:  # additional doses are ordinary doses
            first = k == 0 if k is not None else True
            d_ss[dwho, dslot] = np.where(first, ss[src], 0)
            d_ii[dwho, dslot] = np.where(first & (ss[src] > 0), ii[src] if ii_one is None else ii_one, 0.0)
        if not one_seg:
            place(d_seg, seg)
            # padding doses (amount 0) stay in the individual's last period
            d_seg = np.where(d_amt > 0, d_seg, np.maximum.accumulate(d_seg, axis=1))
        del src, k, dwho, dslot
    # time of the reset that starts each period [N, S] (period 0: -inf, padding: inf)
    # without a reset every record is in period 0 (no [rows] gather of the periods)
    n_seg = int(seg[order >= 0].max()) + 1 if reset.any() and (order >= 0).any() else 1
    seg_start = np.full((n, n_seg), np.inf)
    seg_start[:, 0] = -np.inf
    if reset.any():
        r_rows = np.where(reset & (order >= 0))[0]
        seg_start[order[r_rows], seg[r_rows]] = time[r_rows]

    obs_rank, dose_rank = (None, None) if d_rank is None else _record_ranks(rows_a, mask, time_a, seg_a, d_rank,
                                                                            d_amt, d_time, d_seg)
    if obs_rank is not None and has_time:  # the table's order decides at equal times: it should be in time order
        _warn_unsorted(df, id_col, cols["time"], order, seg, time, [("records (doses and observations)", order >= 0)],
                       note="; records at the same time are taken in the table's order (an observation listed before "
                            "a dose at its time is pre-dose): sort the table stably by ID and time")
    # the IDs as they always were: np.asarray of the list of the table's values (numbers: the array itself; other
    # values: e.g. str, as a numpy unicode array); no Python list of a million numbers
    keep = keep_ids if keep_ids.dtype.kind in "biuf" else list(keep_ids)
    cov_df = _covariate_table(df, ids_all, keep, list(covariates), id_col)
    return NLMEData(ids=np.asarray(keep), time=time_a, dv=dv_a, mask=mask, cens=cens_a, dose_time=d_time,
                    dose_amt=d_amt, dose_rate=d_rate, dose_cmt=d_cmt, covariates=cov_df, regressors=regs,
                    obs_rows=rows_a, columns=cols if has_time else {k: v for k, v in cols.items() if k != "time"},
                    x=x, dose_ss=d_ss, dose_ii=d_ii, dose_seg=d_seg, obs_seg=seg_a, seg_start=seg_start,
                    obs_rank=obs_rank, dose_rank=dose_rank, regressor_steps=step_fns,
                    **(dict(record_unit=order, record_seg=seg,  # the time: not a view of the caller's table
                           record_time=time if time.flags.owndata else time.copy()) if records else {}))


def _record_ranks(rows: np.ndarray, mask: np.ndarray, time: np.ndarray, seg: np.ndarray | None,
                  d_rank: np.ndarray, d_amt: np.ndarray, d_time: np.ndarray, d_seg: np.ndarray
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(obs_rank [N, T], dose_rank [N, D])``: the table positions of the observations (``rows``, -1: padding) and
    of the doses (``d_rank``: their rows, +inf for additional doses and padding), less each individual's first
    position (small numbers: exact in float32); ``(None, None)`` where no dose at an observation's time (same
    individual and period) comes after it, so that every dose at an observation's time acts on it (the common
    case: no ranks carried).  The check runs over blocks of individuals (``[n, T, D]`` comparisons of at most 2²⁰
    elements: no per-observation temporaries)."""
    n, t_max = mask.shape
    d_max = d_amt.shape[1]
    step = max(1, (1 << 20) // max(t_max * d_max, 1))
    need = False
    for i0 in range(0, n, step):
        b = slice(i0, min(i0 + step, n))
        tie = ((time[b, :, None] == d_time[b, None, :]) & mask[b, :, None] & (d_amt[b, None, :] > 0)
               & (d_rank[b, None, :] > rows[b, :, None]))
        if seg is not None:
            tie &= seg[b, :, None] == d_seg[b, None, :]
        if tie.any():
            need = True
            break
    if not need:
        return None, None
    obs_rank = np.where(mask, rows, np.inf)
    base = np.minimum(obs_rank.min(1), np.where(d_amt > 0, d_rank, np.inf).min(1))[:, None]
    obs_rank -= base
    return obs_rank, d_rank - base


def data_widths(data: NLMEData) -> tuple[int, int, int]:
    """``(T, D, S)``: the padded numbers of observations, doses and periods per individual of ``data``."""
    return int(data.time.shape[1]), int(data.dose_amt.shape[1]), int(data.seg_start.shape[1])


def pad_data(data: NLMEData, widths: tuple[int, int, int]) -> NLMEData:
    """``data`` padded to at least ``widths`` ``(T, D, S)`` observations, doses and periods per individual, with the
    padding :func:`read_nonmem` uses (observations: the individual's last time, period and regressor values, DV 0,
    masked out, source row -1; doses: amount 0 at time 0 in the last period; periods: starting at +inf), so that
    blocks of individuals read apart hold arrays of one shape (a ``distributed="local"`` JAX fit)."""
    t, d, s = (max(int(w), have) for w, have in zip(widths, data_widths(data)))
    if (t, d, s) == data_widths(data):
        return data

    def wider(a: np.ndarray | None, width: int, fill: Any = None) -> np.ndarray | None:
        """``a [N, w]`` padded to ``[N, width]`` with ``fill`` (None: its last column)."""
        if a is None or a.shape[1] >= width:
            return a
        pad = np.repeat(a[:, -1:], width - a.shape[1], axis=1) if fill is None else \
            np.full((a.shape[0], width - a.shape[1]), fill, dtype=a.dtype)
        return np.concatenate([a, pad], axis=1)

    return dataclasses.replace(
        data, time=wider(data.time, t), dv=wider(data.dv, t, 0.0), mask=wider(data.mask, t, False),
        cens=wider(data.cens, t, 0), obs_rows=wider(data.obs_rows, t, -1), obs_seg=wider(data.obs_seg, t),
        regressors={k: wider(v, t) for k, v in data.regressors.items()},
        dose_time=wider(data.dose_time, d, 0.0), dose_amt=wider(data.dose_amt, d, 0.0),
        dose_rate=wider(data.dose_rate, d, 0.0), dose_cmt=wider(data.dose_cmt, d, 1),
        dose_ss=wider(data.dose_ss, d, 0.0), dose_ii=wider(data.dose_ii, d, 0.0), dose_seg=wider(data.dose_seg, d),
        obs_rank=wider(data.obs_rank, t, np.inf), dose_rank=wider(data.dose_rank, d, np.inf),
        seg_start=wider(data.seg_start, s, np.inf))


def pad_individuals(data: NLMEData, size: int) -> NLMEData:
    """``data`` with ``size − N`` dummy individuals appended, copies of the last one (the dummy units of a
    ``distributed="local"`` JAX fit whose blocks differ in size; the fit gives them weight 0): every per-individual
    array repeats its last row, the covariate table its last row, and the source rows of their observations are -1."""
    n = data.num_individuals
    if size <= n:
        return data
    if data.record_unit is not None:
        raise ValueError("pad_individuals: data read with their records (inter-occasion variability) cannot be padded")
    idx = np.concatenate([np.arange(n), np.full(size - n, n - 1)])

    def more(a: Any) -> Any:
        if isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[0] == n:
            return a[idx]
        return a

    changes = {f.name: more(getattr(data, f.name)) for f in dataclasses.fields(data)
               if f.name not in ("ids", "covariates", "regressors", "obs_rows", "regressor_steps")}
    ids = np.asarray(data.ids)
    pad_ids = np.array([f"__pad{j}" for j in range(size - n)], dtype=object)
    rows = None if data.obs_rows is None else np.concatenate(
        [data.obs_rows, np.full((size - n,) + data.obs_rows.shape[1:], -1, dtype=data.obs_rows.dtype)])
    cov = data.covariates.iloc[idx]
    return dataclasses.replace(data, **changes, ids=np.concatenate([ids.astype(object), pad_ids]), covariates=cov,
                               regressors={k: more(v) for k, v in data.regressors.items()}, obs_rows=rows,
                               regressor_steps={k: tuple(more(a) for a in v) for k, v in data.regressor_steps.items()})


def _warn_unsorted(df: pd.DataFrame, id_col: str, time_col: str, order: np.ndarray, seg: np.ndarray,
                   time: np.ndarray, kinds: list[tuple[str, np.ndarray]], note: str = "") -> None:
    """Warn when an individual's records of one kind (``kinds``: name and row mask, e.g. the observations, the doses)
    are not in time order in the table (within a period: a reset, EVID 3/4 or an SS = 1 dose, may restart the time).
    They are read in time order, but NONMEM stops on such a table ("data records out of order") and a decreasing
    time is often a typing error.  Each kind apart: a table of every dose row, then every observation row (as pandas
    concatenates them) is in order.  O(rows) for a table grouped by ID (the usual), a stable sort otherwise."""
    one_period = seg.strides == (0,)
    for kind, mask in kinds:
        rows = np.flatnonzero(mask)
        if len(rows) < 2:
            continue
        key = order[rows].astype(np.int64)
        if not one_period:
            key = key * (int(seg.max()) + 1) + seg[rows]
        t = time[rows]
        if _in_order(key, t):
            continue
        perm = np.argsort(key, kind="stable")
        k, tt, who = key[perm], t[perm], order[rows[perm]]
        back = np.flatnonzero((k[1:] == k[:-1]) & (tt[1:] < tt[:-1]) & (who[1:] >= 0))
        if not len(back):
            continue
        row, prev = df.index[rows[perm[back[0] + 1]]], df.index[rows[perm[back[0]]]]
        warnings.warn(f"the {kind} of ID {_id(df.loc[row, id_col])} are not in time order: row {row} has "
                      f"{time_col} {df.loc[row, time_col]} after {df.loc[prev, time_col]} at row {prev}; they are read "
                      f"in time order (NONMEM would stop: check the time, or sort the table by ID and time){note}",
                      stacklevel=user_stacklevel())
        return


def _failer(df: pd.DataFrame, id_col: str) -> Any:
    """``fail(bad, message)``: a DataError naming the ID and row of the first ``bad`` row (if any)."""

    def fail(bad: np.ndarray, message: str) -> None:
        if bool(np.any(bad)):
            row = df.index[np.asarray(bad)][0]
            raise DataError(f"{message} (ID {_id(df.loc[row, id_col])}, row {row})")

    return fail


def _dose_records(num: dict[str, np.ndarray], cols: dict[str, str], is_dose: np.ndarray, amt: np.ndarray,
                  fail: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``RATE`` (``-2``: ``AMT/DUR``), ``ADDL`` (int), ``II`` and ``SS`` per row (0 off the dose rows)."""
    zeros = np.broadcast_to(0.0, (len(amt),))  # 0 viewed on every row (read only)
    if not {"rate", "dur", "addl", "ii", "ss"} & set(num):  # bolus doses only: nothing to check, no per-row copies
        return zeros, np.broadcast_to(np.int64(0), (len(amt),)), zeros, zeros
    rate, dur, addl, ii, ss = (np.nan_to_num(num.get(r, zeros)) for r in ("rate", "dur", "addl", "ii", "ss"))
    c = {r: repr(cols[r]) for r in ("rate", "dur", "addl", "ii", "ss")}
    fail(~np.isin(ss, (0, 1, 2)), f"column {c['ss']} must be 0, 1 (steady state after a reset) or 2 (steady state "
                                  f"added to the current state); other SS codes are not supported")
    fail((addl < 0) | (addl != np.round(addl)), f"column {c['addl']} (additional doses) must be a non-negative "
                                               f"integer")
    fail(ii < 0, f"column {c['ii']} (interdose interval) must be >= 0")
    fail(~is_dose & (addl > 0), f"{c['addl']} > 0 on a row that is not a dose (EVID 1 or 4): additional doses "
                                f"repeat a dose record")
    fail(~is_dose & (ss > 0), f"{c['ss']} > 0 on a row that is not a dose (EVID 1 or 4): steady state is a "
                              f"property of a dose record")
    fail(is_dose & (addl > 0) & (ii <= 0), f"{c['addl']} > 0 without an interval: give the time between the "
                                           f"additional doses in {c['ii']} (> 0)")
    fail(is_dose & (ss > 0) & (ii <= 0), f"steady-state dose ({c['ss']} > 0) without an interval: give its dosing "
                                         f"interval in {c['ii']} (> 0); a steady-state constant infusion (II = 0) is "
                                         f"not supported")
    fail(is_dose & (rate == -1), f"{c['rate']} = -1 (rate estimated in the model) is not supported: give the rate "
                                 f"({c['rate']} > 0) or the duration ({c['rate']} = -2 and {c['dur']})")
    fail(is_dose & (rate < 0) & (rate != -1) & (rate != -2), f"column {c['rate']} must be >= 0 (0: bolus), or -2 "
                                                             f"(duration in {c['dur']})")
    fail((dur < 0), f"column {c['dur']} (infusion duration) must be >= 0")
    if "rate" in num:
        by_dur = is_dose & (rate == -2)
        if "dur" not in num:
            fail(by_dur, f"{c['rate']} = -2 takes the infusion duration from a {c['dur']} column, which the data lack "
                         f"(name it with columns={{'dur': ...}})")
        fail(is_dose & (rate == 0) & (dur > 0), f"{c['dur']} > 0 on a dose with {c['rate']} = 0: set {c['rate']} = -2 "
                                                f"to give the infusion by its duration")
    else:
        by_dur = is_dose & (dur > 0)
    fail(by_dur & (dur <= 0), f"{c['rate']} = -2 needs the infusion duration {c['dur']} > 0")
    rate = np.where(by_dur, amt / np.where(by_dur, dur, 1.0), np.where(is_dose, rate, 0.0))
    return rate, np.where(is_dose, addl, 0).astype(np.int64), np.where(is_dose, ii, 0.0), np.where(is_dose, ss, 0)


def _time_varying(num: dict[str, np.ndarray], names: list[str], time: np.ndarray, seg: np.ndarray,
                  order: np.ndarray, obs_idx: np.ndarray, how: str, df: pd.DataFrame,
                  id_col: str) -> dict[str, np.ndarray]:
    """Values of the ``names`` columns at the observation rows ``obs_idx``: LOCF or linear interpolation in time
    over all the records of the individual (periods in table order), vectorised with grouped fills."""
    if not names:
        return {}
    rec = np.where(order >= 0)[0]
    rec = rec[np.lexsort((time[rec], seg[rec], order[rec]))]
    grp = order[rec]
    at = np.empty(len(time), dtype=np.int64)
    at[rec] = np.arange(len(rec))
    sel = at[obs_idx]
    out = {}
    for name in names:
        v = pd.Series(num[name][rec])
        prev_v, next_v = v.groupby(grp).ffill(), v.groupby(grp).bfill()
        if how == "locf":
            val = prev_v.fillna(next_v).to_numpy()
        else:
            t = pd.Series(np.where(v.isna(), np.nan, time[rec]))
            t0, t1 = t.groupby(grp).ffill().to_numpy(), t.groupby(grp).bfill().to_numpy()
            v0, v1 = prev_v.to_numpy(), next_v.to_numpy()
            tt = time[rec]
            span = np.where(t1 > t0, t1 - t0, 1.0)
            w = np.where(t1 > t0, (tt - t0) / span, 0.0)
            val = np.where(np.isnan(v0), v1, np.where(np.isnan(v1), v0, v0 + w * (v1 - v0)))
        miss = np.isnan(val[sel])
        if miss.any():
            row = df.index[obs_idx[miss]][0]
            raise DataError(f"column {name!r} has no value on any record of ID {_id(df.loc[row, id_col])} (row {row}): "
                            f"a per-observation column needs at least one value per individual")
        out[name] = val[sel]
    return out


def _steps(values: np.ndarray, time: np.ndarray, seg: np.ndarray, order: np.ndarray,
           n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A per-row column as step functions of time: ``(time, period, value) [N, R]``, each individual's records that
    have a value sorted by period and time (table order at ties), padded with its last record (every individual has
    one: :func:`_time_varying` checked it)."""
    rec = np.where((order >= 0) & ~np.isnan(values))[0]
    seg = np.broadcast_to(seg, time.shape)
    rec = rec[np.lexsort((time[rec], seg[rec], order[rec]))]
    counts = np.bincount(order[rec], minlength=n)
    width = max(int(counts.max()), 1)
    mask = np.arange(width) < counts[:, None]
    out = []
    for a in (time, seg, values):
        m = np.zeros((n, width))
        m[mask] = a[rec]
        out.append(np.where(mask, m, m[np.arange(n), np.maximum(counts - 1, 0)][:, None]))
    return out[0], out[1], out[2]


def design_table(num_individuals: int, times: Any, dose: float | Any = 100.0,
                 covariates: dict[str, Any] | None = None) -> pd.DataFrame:
    """A NONMEM-style design for simulation studies: one dose at time 0 and observations at ``times``.

    ``times`` is a list of sampling times (shared) or an ``[N, T]`` array; ``dose`` a number or
    one amount per individual; ``covariates`` maps a column name to one value per individual.
    ``DV`` is 0 (fill it with :meth:`NLME.simulate`).  Columns: ``ID, TIME, DV, AMT, EVID, MDV``.
    """
    n = int(num_individuals)
    times = np.asarray(times, dtype=float)
    times = np.broadcast_to(times, (n, times.shape[-1])) if times.ndim == 1 else times
    doses = np.broadcast_to(np.asarray(dose, dtype=float), (n,))
    t_obs = times.shape[1]
    ids = np.repeat(np.arange(1, n + 1), t_obs + 1)
    time = np.concatenate([np.zeros((n, 1)), times], 1).ravel()
    evid = np.tile(np.r_[1, np.zeros(t_obs, dtype=int)], n)
    amt = np.where(evid == 1, np.repeat(doses, t_obs + 1), 0.0)
    df = pd.DataFrame({"ID": ids, "TIME": time, "DV": np.where(evid == 1, np.nan, 0.0), "AMT": amt, "EVID": evid,
                       "MDV": evid})
    for name, values in (covariates or {}).items():
        df[name] = np.repeat(np.asarray(values), t_obs + 1)
    return df


def _covariate_table(df: pd.DataFrame, ids_all: np.ndarray, keep: list[Any], covariates: list[str],
                     id_col: str) -> pd.DataFrame:
    out = pd.DataFrame(index=pd.Index(keep, name=id_col))
    for c in covariates:
        col = numbers_if_all_numeric(df[c])  # '70.5' written as text is still a weight (validate.py)
        if col.isna().any():
            row = col.isna().idxmax()
            raise DataError(f"covariate {c!r} is missing (ID {_id(df.loc[row, id_col])}, row {row})")
        grouped = col.groupby(ids_all)
        varying = grouped.nunique() > 1
        if bool(varying.any()):
            who = [_id(i) for i in varying.index[varying][:3]]
            warnings.warn(f"covariate {c!r} varies within individual(s) {who}; the first value is used (for a "
                          f"time-varying covariate read per observation, name it in regressors=)",
                          stacklevel=user_stacklevel())
        out[c] = grouped.first().reindex(keep).to_numpy()
    return out


__all__ = ["DEFAULT_COLUMNS", "NLMEData", "design_table", "read_nonmem"]
