"""NONMEM-style long data tables -> padded per-individual arrays.

A table has one row per event: ``ID, TIME, DV, AMT, EVID, MDV, CMT`` (+ ``RATE``, ``CENS``,
covariates, regressors).  Column names are configurable (``columns={"id": "Subject", ...}``).
Rules (NONMEM conventions):

* ``EVID`` = 1 is a dose, 0 an observation; without an ``EVID`` column a row with ``AMT > 0`` is a
  dose.  ``MDV = 1`` or a missing ``DV`` marks an observation row to ignore.
* ``RATE > 0`` makes a dose a zero-order infusion of duration ``AMT / RATE``; 0 is a bolus.
* ``CENS`` (Monolix convention): 1 = below the limit (``DV`` holds the LLOQ), −1 = above, 0 = observed.
* saemix-style tables without dose rows: ``dose="Dose"`` names a per-row dose column; each
  individual then gets one dose of that amount at time 0.
* ``x="dose"`` names the x-variable (saemix's ``name.X``) when it is not the time, e.g. the dose or a
  centred covariate of dose–response data: it is passed to the structural model as a regressor and as
  ``data.x``; without a time column the observations are ordered by ``x`` and ``data.time`` holds ``x``.
  Regressors may be negative; times must be ≥ 0 only in data with doses.

Validation raises :class:`~latentfit.DataError` naming the column, ID and row for unknown columns,
non-numeric values and negative times; it warns (naming the ID) for individuals without any
observation (they are dropped) and for duplicated dose records.

Observations are padded to ``[N, T]`` arrays (``T`` = most observations of one individual) with a
mask, doses to ``[N, D]`` (padding doses have amount 0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from latentfit.inference.model import DataError

DEFAULT_COLUMNS = {"id": "ID", "time": "TIME", "dv": "DV", "amt": "AMT", "evid": "EVID", "mdv": "MDV",
                   "cmt": "CMT", "rate": "RATE", "cens": "CENS"}
REQUIRED = ("id", "dv")


@dataclass
class NLMEData:
    """Padded arrays of one data set (numpy; the model moves them to its device)."""

    ids: np.ndarray  # [N] original IDs
    time: np.ndarray  # [N, T] observation times (padding: the individual's last time)
    dv: np.ndarray  # [N, T] observations (padding: 0)
    mask: np.ndarray  # [N, T] bool, True for a real observation
    cens: np.ndarray  # [N, T] 0 observed, 1 below the limit, -1 above
    dose_time: np.ndarray  # [N, D]
    dose_amt: np.ndarray  # [N, D] (padding: 0)
    dose_rate: np.ndarray  # [N, D] 0 = bolus
    dose_cmt: np.ndarray  # [N, D]
    covariates: pd.DataFrame  # one row per individual (index: ID), raw values
    regressors: dict[str, np.ndarray] = field(default_factory=dict)  # [N, T] per-observation columns
    obs_rows: np.ndarray | None = None  # [N, T] row labels of the observations in the source table (-1: padding)
    columns: dict[str, str] = field(default_factory=dict)
    x: str | None = None  # name of the x-variable column (None: the time)

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


def _id(value: Any) -> str:
    """An ID as the user wrote it (numpy scalars unwrapped)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _numeric(df: pd.DataFrame, col: str, id_col: str) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() & df[col].notna()
    if bool(bad.any()):
        row = bad.idxmax()
        raise DataError(f"column {col!r} has a non-numeric value {df.loc[row, col]!r} "
                        f"(ID {_id(df.loc[row, id_col])}, row {row})")
    return values.to_numpy(dtype=float)


def read_nonmem(df: pd.DataFrame, columns: dict[str, str] | None = None, covariates: list[str] | tuple = (),
                regressors: list[str] | tuple = (), dose: str | None = None, x: str | None = None) -> NLMEData:
    """Validate a NONMEM-style table and pad it (see the module docstring).

    Parameters
    ----------
    df : the long table (pandas DataFrame).
    columns : mapping from the roles ``id, time, dv, amt, evid, mdv, cmt, rate, cens`` to column
        names (defaults: the upper-case NONMEM names).
    covariates : individual-level covariate columns (first value per individual is used).
    regressors : per-observation columns passed to the structural model (e.g. a concentration for
        an Emax model), padded like ``DV``.
    dose : saemix-style per-row dose column (one dose at time 0 per individual) when the table has
        no dose rows.
    x : the x-variable column when it is not the time (a dose, a concentration, a centred covariate);
        the time column is then optional.
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
    for role in ("amt", "evid", "mdv", "cmt", "rate", "cens"):
        if columns and role in columns and cols[role] not in df.columns:
            raise DataError(f"column {cols[role]!r} (role {role!r}) is not in the data; columns are {available}")
    for name in list(covariates) + list(regressors) + ([dose] if dose else []):
        if name not in df.columns:
            raise DataError(f"column {name!r} is not in the data; columns are {available}")
    present = {role: c for role, c in cols.items() if c in df.columns}
    id_col = cols["id"]
    if df[id_col].isna().any():
        row = df[id_col].isna().idxmax()
        raise DataError(f"column {id_col!r} has a missing ID at row {row}")
    num = {role: _numeric(df, c, id_col) for role, c in present.items() if role not in ("id", "dv")}
    dv = _numeric(df, cols["dv"], id_col)
    for name in list(regressors) + ([dose] if dose else []):
        num[name] = _numeric(df, name, id_col)
    time = num["time"] if has_time else num[x]
    if has_time and np.isnan(time).any():
        row = df.index[np.isnan(time)][0]
        raise DataError(f"column {cols['time']!r} has a missing time (ID {_id(df.loc[row, id_col])}, row {row})")
    amt = np.nan_to_num(num.get("amt", np.zeros(len(df))))
    if "evid" in num:
        evid = np.nan_to_num(num["evid"]).astype(int)
    else:
        evid = (amt > 0).astype(int)
    mdv = np.nan_to_num(num["mdv"]).astype(int) if "mdv" in num else np.zeros(len(df), dtype=int)
    rate = np.nan_to_num(num.get("rate", np.zeros(len(df))))
    cmt = np.nan_to_num(num.get("cmt", np.ones(len(df)))).astype(int)
    cens = np.nan_to_num(num.get("cens", np.zeros(len(df)))).astype(int)
    if not np.isin(cens, (-1, 0, 1)).all():
        row = df.index[~np.isin(cens, (-1, 0, 1))][0]
        raise DataError(f"column {cols['cens']!r} must be -1, 0 or 1 (ID {_id(df.loc[row, id_col])}, row {row})")
    is_dose = evid == 1
    is_obs = (evid == 0) & (mdv == 0) & ~np.isnan(dv)
    if (is_dose & (amt <= 0)).any():
        row = df.index[is_dose & (amt <= 0)][0]
        raise DataError(f"dose record without a positive amount (ID {_id(df.loc[row, id_col])}, row {row})")
    if x is not None and np.isnan(num[x][is_obs]).any():
        row = df.index[is_obs & np.isnan(num[x])][0]
        raise DataError(f"column {x!r} (the x-variable) is missing on an observation (ID {_id(df.loc[row, id_col])}, "
                        f"row {row})")
    if not has_time and is_dose.any():
        row = df.index[is_dose][0]
        raise DataError(f"dose record (ID {_id(df.loc[row, id_col])}, row {row}) in data without a time column "
                        f"{cols['time']!r}: dose records need times (or use dose= for one dose per individual)")
    has_doses = bool(is_dose.any()) or dose is not None
    if has_time and has_doses and (time < 0).any():
        row = df.index[time < 0][0]
        raise DataError(f"negative time {df.loc[row, cols['time']]} (ID {_id(df.loc[row, id_col])}, row {row}): times "
                        f"must be >= 0 in data with doses; a regressor that is not a time (a centred covariate, a "
                        f"log-dose) goes in x= or regressors=, not in the time column")
    time = np.nan_to_num(time)

    ids_all = df[id_col].to_numpy()
    uniq = pd.unique(ids_all)
    obs_per_id = pd.Series(is_obs).groupby(ids_all).sum()
    keep = [i for i in uniq if obs_per_id.get(i, 0) > 0]
    dropped = [i for i in uniq if obs_per_id.get(i, 0) == 0]
    if dropped:
        rows = {_id(i): [int(r) for r in df.index[ids_all == i][:3]] for i in dropped[:5]}
        names = [_id(i) for i in dropped[:5]]
        warnings.warn(f"individual(s) without any observation are dropped: ID(s) {', '.join(names)} "
                      f"(first rows {rows})",
                      stacklevel=3)
    if not keep:
        raise DataError("no individual has an observation")
    # duplicated dose records (same ID, time, amount and compartment)
    if is_dose.any():
        dose_df = pd.DataFrame({"id": ids_all[is_dose], "t": time[is_dose], "a": amt[is_dose], "c": cmt[is_dose]},
                               index=df.index[is_dose])
        dup = dose_df.duplicated(keep="first")
        if bool(dup.any()):
            row = dup.idxmax()
            warnings.warn(f"duplicated dose record (ID {_id(dose_df.loc[row, 'id'])}, row {row}): same time, amount "
                          f"and compartment as an earlier row; both doses are given", stacklevel=3)

    n = len(keep)
    pos = {i: k for k, i in enumerate(keep)}
    order = np.array([pos.get(i, -1) for i in ids_all])
    obs_idx = np.where(is_obs & (order >= 0))[0]
    obs_idx = obs_idx[np.lexsort((time[obs_idx], order[obs_idx]))]
    counts = np.bincount(order[obs_idx], minlength=n)
    t_max = int(counts.max())
    slot = np.arange(len(obs_idx)) - np.repeat(np.cumsum(counts) - counts, counts)
    who = order[obs_idx]
    time_a = np.zeros((n, t_max))
    dv_a = np.zeros((n, t_max))
    mask = np.zeros((n, t_max), dtype=bool)
    cens_a = np.zeros((n, t_max), dtype=int)
    rows_a = np.full((n, t_max), -1, dtype=np.int64)
    time_a[who, slot] = time[obs_idx]
    dv_a[who, slot] = dv[obs_idx]
    mask[who, slot] = True
    cens_a[who, slot] = cens[obs_idx]
    rows_a[who, slot] = np.arange(len(df))[obs_idx]
    last = time_a[np.arange(n), counts - 1]
    time_a = np.where(mask, time_a, last[:, None])  # padding: a valid time, masked out
    regs = {}
    for name in regressors:
        r = np.zeros((n, t_max))
        r[who, slot] = np.nan_to_num(num[name][obs_idx])
        regs[name] = np.where(mask, r, r[np.arange(n), counts - 1][:, None])

    # doses
    if dose is not None:
        first_rows = pd.Series(np.arange(len(df))).groupby(ids_all).first()
        d_amt = np.array([num[dose][first_rows[i]] for i in keep])[:, None]
        d_time = np.zeros((n, 1))
        d_rate = np.zeros((n, 1))
        d_cmt = np.ones((n, 1), dtype=int)
    else:
        dose_idx = np.where(is_dose & (order >= 0))[0]
        dose_idx = dose_idx[np.lexsort((time[dose_idx], order[dose_idx]))]
        dcounts = np.bincount(order[dose_idx], minlength=n)
        d_max = max(int(dcounts.max()) if len(dose_idx) else 0, 1)
        dslot = np.arange(len(dose_idx)) - np.repeat(np.cumsum(dcounts) - dcounts, dcounts)
        dwho = order[dose_idx]
        d_time, d_amt, d_rate = np.zeros((n, d_max)), np.zeros((n, d_max)), np.zeros((n, d_max))
        d_cmt = np.ones((n, d_max), dtype=int)
        d_time[dwho, dslot] = time[dose_idx]
        d_amt[dwho, dslot] = amt[dose_idx]
        d_rate[dwho, dslot] = rate[dose_idx]
        d_cmt[dwho, dslot] = cmt[dose_idx]

    cov_df = _covariate_table(df, ids_all, keep, list(covariates), id_col)
    return NLMEData(ids=np.asarray(keep), time=time_a, dv=dv_a, mask=mask, cens=cens_a, dose_time=d_time,
                    dose_amt=d_amt, dose_rate=d_rate, dose_cmt=d_cmt, covariates=cov_df, regressors=regs,
                    obs_rows=rows_a, columns=cols if has_time else {k: v for k, v in cols.items() if k != "time"},
                    x=x)


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
        col = df[c]
        if col.isna().any():
            row = col.isna().idxmax()
            raise DataError(f"covariate {c!r} is missing (ID {_id(df.loc[row, id_col])}, row {row})")
        grouped = col.groupby(ids_all)
        varying = grouped.nunique() > 1
        if bool(varying.any()):
            who = [_id(i) for i in varying.index[varying][:3]]
            warnings.warn(f"covariate {c!r} varies within individual(s) {who}; the first value is used",
                          stacklevel=4)
        out[c] = grouped.first().reindex(keep).to_numpy()
    return out


__all__ = ["DEFAULT_COLUMNS", "NLMEData", "design_table", "read_nonmem"]
