"""The NLME specification: parameters, transforms, covariates, Ω blocks, residual error and data options.

Pure functions of what the user wrote (no data, no arrays): :class:`~latentfit.models.nlme.NLME` calls them in its
constructor and when it binds data; they raise :class:`~latentfit.ModelSpecificationError` with the offending name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from latentfit.inference.model import DataError, ModelSpecificationError
from latentfit.inference.ops import Ops

TRANSFORMS = ("log", "normal", "logit", "probit")
TRANSFORM_ALIASES = {"lognormal": "log", "log-normal": "log", "identity": "normal", "none": "normal"}
ERRORS = ("constant", "proportional", "combined", "exponential")
COV_TRANSFORMS = ("linear", "center", "log", "log-center", "categorical")
#: options of :func:`read_nonmem` that :class:`NLME`, :meth:`NLME.bind` and :meth:`NLME.fit` accept
DATA_OPTIONS = ("columns", "dose", "regressors", "x", "covariate_interpolation")
#: options of the model itself (given to ``NLME(...)``, not to ``fit``)
MODEL_OPTIONS = ("parameters", "covariates", "omega", "error", "error_init", "covariate_init", "backend", "dtype",
                 "device", "iov", "occasion", "response", "dvid")


@dataclass
class Parameter:
    """One individual parameter ψ.

    init : initial population value (natural scale; saemix's ``psi0``).
    transform : ``"log"`` (log-normal, default), ``"normal"``, ``"logit"``, ``"probit"`` (saemix's ``transform.par``
        0 = normal, 1 = log, 2 = probit, 3 = logit).
    random : whether ψ has a random effect (``False``: the same value for every individual, estimated by SAEM's
        numerical step; saemix's ``covariance.model`` with a 0 diagonal).
    fixed : population value fixed at ``init`` (not estimated; saemix's ``fixed.estim = 0``).
    omega2 : initial variance of the random effect (saemix's ``omega.init``; default 1).
    """

    init: float
    transform: str = "log"
    random: bool = True
    fixed: bool = False
    omega2: float = 1.0


def transform_pair(ops: Ops, kind: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(u, u^{-1})``: ψ -> φ and back."""
    if kind == "log":
        return ops.xp.log, ops.xp.exp
    if kind == "normal":
        return (lambda v: v), (lambda v: v)
    if kind == "logit":
        return ops.logit, ops.expit
    return ops.ndtri, ops.ndtr


@dataclass
class FixedEffect:
    """One column of the fixed-effect design: a population value or a covariate coefficient."""

    name: str  # θ name
    param: int  # index of the individual parameter
    column: np.ndarray  # [N] covariate values (ones for the population value)
    is_pop: bool


def parse_parameters(structural_name: str, param_names: list[str], parameters: dict[str, Any]) -> dict[str, Parameter]:
    """Every parameter of the structural model ``structural_name`` as a checked :class:`Parameter` (a float is a
    log-normal one with a random effect; a dict holds :class:`Parameter`'s fields), in the structural model's
    order."""
    missing = [p for p in param_names if p not in parameters]
    extra = [p for p in parameters if p not in param_names]
    if missing or extra:
        raise ModelSpecificationError(f"the structural model {structural_name!r} has parameters "
                                      f"{param_names}; missing {missing}, unknown {extra}")
    spec: dict[str, Parameter] = {}
    for name in param_names:
        p = parameters[name]
        if isinstance(p, dict):
            p = Parameter(**p)
        elif not isinstance(p, Parameter):
            p = Parameter(float(p))
        tr = TRANSFORM_ALIASES.get(str(p.transform).lower(), str(p.transform).lower())
        if tr not in TRANSFORMS:
            raise ModelSpecificationError(f"parameter {name!r}: unknown transform {p.transform!r}; "
                                          f"use one of {TRANSFORMS}")
        p = Parameter(float(p.init), tr, bool(p.random), bool(p.fixed), float(p.omega2))
        if tr == "log" and p.init <= 0:
            raise ModelSpecificationError(f"parameter {name!r} is log-normal: its initial value must be > 0, "
                                          f"got {p.init}")
        if tr in ("logit", "probit") and not 0 < p.init < 1:
            raise ModelSpecificationError(f"parameter {name!r} ({tr}) needs an initial value in (0, 1), "
                                          f"got {p.init}")
        if p.random and p.omega2 <= 0:
            raise ModelSpecificationError(f"parameter {name!r}: omega2 must be > 0, got {p.omega2}")
        spec[name] = p
    return spec


def parse_covariates(param_names: list[str], covariates: dict[str, Any]) -> dict[str, list[tuple[str, str | None]]]:
    """``{parameter: [(column, transform or None), ...]}`` from a name, a list or a ``{column: transform}`` dict."""
    out: dict[str, list[tuple[str, str | None]]] = {}
    for pname, spec in covariates.items():
        if pname not in param_names:
            raise ModelSpecificationError(f"covariates: {pname!r} is not a parameter ({param_names})")
        if isinstance(spec, str):
            items = [(spec, None)]
        elif isinstance(spec, dict):
            items = [(c, t) for c, t in spec.items()]
        else:
            items = [(c, None) for c in spec]
        for c, t in items:
            if t is not None and t not in COV_TRANSFORMS:
                raise ModelSpecificationError(f"covariate {c!r} on {pname!r}: unknown transform {t!r}; "
                                              f"use one of {COV_TRANSFORMS}")
        out[pname] = items
    return out


def parse_covariate_init(param_names: list[str], init: dict[str, Any]) -> dict[str, float]:
    """Flat ``{"beta_<param>_<column>": value}`` (checked against the design when data are bound)."""
    out: dict[str, float] = {}
    for key, value in init.items():
        if isinstance(value, dict):
            if key not in param_names:
                raise ModelSpecificationError(f"covariate_init: {key!r} is not a parameter ({param_names})")
            out.update({f"beta_{key}_{col}": float(v) for col, v in value.items()})
        else:
            out[str(key)] = float(value)
    bad = [k for k, v in out.items() if not np.isfinite(v)]
    if bad:
        raise ModelSpecificationError(f"covariate_init: non-finite initial value(s) for {bad}")
    return out


def merge_read_options(current: dict[str, Any], given: dict[str, Any], where: str) -> dict[str, Any]:
    """The data options ``current`` with ``given`` added; an option given twice with different values is an error."""
    unknown = set(given) - set(DATA_OPTIONS)
    if unknown:
        raise ModelSpecificationError(f"unknown data option(s) {sorted(unknown)}; data options are "
                                      f"{list(DATA_OPTIONS)}")
    out = dict(current)
    for name, value in given.items():
        if name == "regressors":
            value = (value,) if isinstance(value, str) else tuple(value or ())
            if not value:
                continue
        elif value is None:
            continue
        elif name == "columns":
            if not isinstance(value, dict):
                raise ModelSpecificationError(f"columns must be a dict role -> column name, got {value!r}")
            value = dict(value)
        elif not isinstance(value, str):
            raise ModelSpecificationError(f"{name} must be a column name (str), got {value!r}")
        old = out[name]
        if old not in (None, ()) and old != value:
            raise ModelSpecificationError(f"data option {name}={value!r} given to {where} conflicts with "
                                          f"{name}={old!r} given before (to NLME(...) or bind); give it once")
        out[name] = value
    return out


def parse_omega(random_names: list[str], omega: Any) -> list[tuple[str, ...]]:
    """The blocks of Ω: ``"diagonal"``, ``"full"`` or a list of blocks (the parameters left out: 1×1 blocks)."""
    if isinstance(omega, str):
        if omega == "diagonal":
            return [(n,) for n in random_names]
        if omega in ("full", "block"):
            return [tuple(random_names)]
        raise ModelSpecificationError(f"omega must be 'diagonal', 'full' or a list of blocks, got {omega!r}")
    blocks, seen = [], set()
    for block in omega:
        block = (block,) if isinstance(block, str) else tuple(block)
        for n in block:
            if n not in random_names:
                raise ModelSpecificationError(f"omega block {block}: {n!r} is not a parameter with a random "
                                              f"effect ({random_names})")
            if n in seen:
                raise ModelSpecificationError(f"omega blocks: {n!r} appears twice")
            seen.add(n)
        blocks.append(block)
    blocks += [(n,) for n in random_names if n not in seen]
    return blocks


def parse_error_init(error_init: dict[str, float] | None) -> dict[str, float]:
    """Initial residual parameters ``{"a": ..., "b": ...}`` (defaults ``a = 1``, ``b = 0.3``), all > 0."""
    init = {"a": 1.0, "b": 0.3}
    if error_init:
        unknown = set(error_init) - {"a", "b"}
        if unknown:
            raise ModelSpecificationError(f"error_init has unknown keys {sorted(unknown)} (use 'a', 'b')")
        init.update({k: float(v) for k, v in error_init.items()})
    if any(v <= 0 for v in init.values()):
        raise ModelSpecificationError(f"residual error parameters must be > 0, got {init}")
    return init


def level_key(value: Any) -> str:
    """A categorical level as text, the same for a level read from a table (``1``, ``1.0``, ``"1"``) and from
    ``covariates.csv``: integral numbers without a decimal point, other numbers by ``repr`` (text that reads as a
    number as that number), other text as is."""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return level_key(number) if np.isfinite(number) else value
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


def parse_covariate_reference(covariate_spec: dict[str, list[tuple[str, str | None]]],
                              reference: dict[str, Any] | None) -> dict[str, Any]:
    """``{column: mean (float) or levels (tuple, the first the reference level)}`` given by the user for the
    covariates centred (``"center"``, ``"log-center"``: the value they are centred at) or categorical (their levels,
    the reference level first); checked against the covariate model."""
    out: dict[str, Any] = {}
    columns = {c: t for items in covariate_spec.values() for c, t in items}
    for col, value in (reference or {}).items():
        if col not in columns:
            raise ModelSpecificationError(f"covariate_reference: {col!r} is not a covariate of the model "
                                          f"({sorted(columns) or 'none'})")
        if isinstance(value, list | tuple | np.ndarray):
            levels = tuple(value)
            if len(levels) < 2 or len({level_key(v) for v in levels}) != len(levels):
                raise ModelSpecificationError(f"covariate_reference: the levels of {col!r} must be at least two "
                                              f"distinct values (the reference level first), got {list(levels)}")
            out[col] = levels
            continue
        try:
            center = float(value)
        except (TypeError, ValueError):
            raise ModelSpecificationError(f"covariate_reference: {col!r} needs a number (the value it is centred "
                                          f"at) or a list of levels, got {value!r}") from None
        if not np.isfinite(center) or (columns[col] == "log-center" and center <= 0):
            raise ModelSpecificationError(f"covariate_reference: {col!r} must be centred at a finite "
                                          f"{'positive ' if columns[col] == 'log-center' else ''}value, got {value!r}")
        out[col] = center
    return out


def covariate_columns(values: pd.Series, col: str, transform: str | None,
                      reference: Any = None) -> tuple[list[tuple[str, np.ndarray]], Any]:
    """Design columns of one covariate, ``[(name suffix, values [N])]``, and the reference they used: the mean a
    ``"center"`` / ``"log-center"`` covariate is centred at, or a categorical covariate's levels (the first, the
    reference level, has no column); None for the other transforms.  ``reference`` given (an earlier binding's, or
    the user's ``covariate_reference=``): used as is, so that a model bound to a design (simulations, a VPC on
    other data) keeps the fit's covariate model; else computed from ``values`` (the mean over the individuals;
    the levels sorted)."""
    categorical = transform == "categorical" or not pd.api.types.is_numeric_dtype(values)
    if categorical:
        keys = np.array([level_key(v) for v in values.to_numpy()], dtype=object)
        if isinstance(reference, tuple):
            levels = list(reference)
            known = {level_key(v) for v in levels}
            unknown = sorted({k for k in keys if k not in known})
            if unknown:
                raise DataError(f"categorical covariate {col!r} has level(s) {unknown} that the model's levels "
                                f"{[level_key(v) for v in levels]} do not include")
        else:
            levels = sorted(pd.unique(values), key=lambda v: str(v))
            if len(levels) < 2:
                raise DataError(f"categorical covariate {col!r} has a single level {levels}")
        return [(f"_{lev}", (keys == level_key(lev)).astype(float)) for lev in levels[1:]], tuple(levels)
    v = values.to_numpy(dtype=float)
    if transform in (None, "linear"):
        return [("", v)], None
    center = float(reference) if isinstance(reference, float | int) else float(v.mean())
    if transform == "center":
        return [("", v - center)], center
    if (v <= 0).any():
        i = int(np.argmax(v <= 0))
        raise DataError(f"covariate {col!r} must be > 0 for a log transform (ID {values.index[i]})")
    if transform == "log":
        return [("", np.log(v))], None
    return [("", np.log(v / center))], center


__all__ = ["COV_TRANSFORMS", "DATA_OPTIONS", "ERRORS", "MODEL_OPTIONS", "TRANSFORMS", "FixedEffect", "Parameter",
           "covariate_columns", "level_key", "merge_read_options", "parse_covariate_init", "parse_covariate_reference",
           "parse_covariates", "parse_error_init", "parse_omega", "parse_parameters", "transform_pair"]
