"""Nonlinear mixed-effects models (saemix / Monolix style) as a :class:`LatentModel`.

    y_ij = f(t_ij, ψ_i) + g(f, θ) ε_ij,   ε_ij ~ N(0, 1),
    φ_i = u(ψ_i) = C_i β + η_i,           η_i ~ N(0, Ω),

with ``u`` = log (log-normal), identity (normal), logit or probit per parameter, covariates in
``C_i`` (continuous, optionally centred / log-transformed, and categorical as indicator columns),
fixed (not estimated) parameters, parameters without random effect, diagonal or block Ω, and
residual errors ``g = a`` (constant), ``b|f|`` (proportional), ``sqrt(a² + b² f²)`` (combined) or
``log y = log f + a ε`` (exponential).  Observations below / above a limit (``CENS`` = ±1) contribute
``log Φ(±(LOQ − f)/g)``.

The latent of individual i is ``z_i = φ_i`` restricted to the parameters with a random effect
(Gaussian prior ``N(μ_i, Ω)``, ``μ_i = C_i β``).  The class implements the engines' contract
directly with ``ops.xp`` math (no Pyro tracing in the SAEM loop), plus

* the exponential-family face (saemix's M-step): statistics ``φ_i φ_iᵀ``, ``X_iᵀ ⊗ φ_i`` and the
  residual sum of squares; ``m_step`` solves β by generalised least squares with the current Ω,
  ``Ω = (1/N) Σ (φ_i − X_iβ)(φ_i − X_iβ)ᵀ`` (masked to its block structure) and the constant /
  proportional / exponential residual parameter in closed form; the remaining parameters (fixed
  effects without random effect, combined error) take the SAEM numerical step;
* the Gaussian faces ``predict`` / ``observations`` / ``prior_moments`` (f-SAEM's Gauss–Newton
  proposal, linearisation, residual diagnostics);
* :attr:`pyro_model`: the same model as an ordinary Pyro model function.

Example (a fit runs in :meth:`NLME.fit`'s example)
-------------------------------------------------
>>> from latentfit.models import nlme
>>> model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": nlme.Parameter(20.0, omega2=0.5), "CL": 0.5},
...                   covariates={"V": "Weight"}, omega=[("V", "CL")], error="combined", error_init={"a": 0.5})
>>> model
NLME(one_compartment_oral, parameters=['ka', 'V', 'CL'], random=['ka', 'V', 'CL'], error='combined', no data)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from latentfit.inference.model import DataError, LatentModel, LatentSite, ModelSpecificationError, ParamInfo
from latentfit.inference.ops import BACKENDS, LOG_2PI, Ops, make_ops

from .._integrations import families
from . import occasions as _occ
from . import outcomes as _outcomes
from . import responses as _resp
from .data import NLMEData, _id, read_nonmem
from .structural import Design, Structural, resolve

TRANSFORMS = ("log", "normal", "logit", "probit")
_TRANSFORM_ALIASES = {"lognormal": "log", "log-normal": "log", "identity": "normal", "none": "normal"}
ERRORS = ("constant", "proportional", "combined", "exponential")
COV_TRANSFORMS = ("linear", "center", "log", "log-center", "categorical")
#: options of :func:`read_nonmem` that :class:`NLME`, :meth:`NLME.bind` and :meth:`NLME.fit` accept
DATA_OPTIONS = ("columns", "dose", "regressors", "x", "covariate_interpolation")
#: options of the model itself (given to ``NLME(...)``, not to ``fit``)
MODEL_OPTIONS = ("parameters", "covariates", "omega", "error", "error_init", "covariate_init", "backend", "dtype",
                 "device", "iov", "occasion", "response", "dvid")
#: floor of a random-effect variance in the M-step; below COLLAPSED_OMEGA2 a fit warns
OMEGA2_FLOOR = 1e-12
COLLAPSED_OMEGA2 = 1e-6


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


def _transform_pair(ops: Ops, kind: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(u, u^{-1})``: ψ -> φ and back."""
    if kind == "log":
        return ops.xp.log, ops.xp.exp
    if kind == "normal":
        return (lambda v: v), (lambda v: v)
    if kind == "logit":
        return ops.logit, ops.expit
    return ops.ndtri, ops.ndtr


@dataclass
class _FixedEffect:
    name: str  # θ name
    param: int  # index of the individual parameter
    column: np.ndarray  # [N] covariate values (ones for the population value)
    is_pop: bool


class NLME(LatentModel):
    """Nonlinear mixed-effects model (see the module docstring).

    Parameters
    ----------
    structural : a library name (``"one_compartment_oral"``, ...), a :class:`Structural`, or a
        function ``f(psi, data) -> pred [..., N, T]``.
    parameters : dict name -> initial value or :class:`Parameter` (log-normal with random effect by default).
    covariates : dict parameter -> covariate column(s): a name, a list, or a dict ``{column: transform}``
        with transform ``"linear"`` (raw, saemix default), ``"center"``, ``"log"``, ``"log-center"``
        or ``"categorical"`` (non-numeric columns are categorical; the first sorted level is the reference).
    omega : ``"diagonal"`` (default), ``"full"``, or a list of blocks (tuples of parameter names).
    error : ``"constant"``, ``"proportional"``, ``"combined"`` or ``"exponential"``.
    error_init : initial residual parameters, e.g. ``{"a": 1.0, "b": 0.1}`` (saemix's ``error.init``; default
        ``a = 1``, ``b = 0.3``).
    covariate_init : initial covariate coefficients (φ scale; default 0), by name as in ``fit.params``
        (``{"beta_V_Weight": 0.01}``) or per parameter (``{"V": {"Weight": 0.01}}``; categorical:
        ``{"CL": {"SEX_M": 0.2}}``).
    data : optional data table to bind now (else pass it to :meth:`fit` / :meth:`bind`).
    columns, dose, regressors, x : data options of :func:`~latentfit.models.nlme.data.read_nonmem`: column names by
        role (``{"id": "Id", "time": "Time", "dv": "Concentration"}``), a per-row dose column (saemix form), per-
        observation regressor columns, the x-variable when it is not the time (dose–response data). They may
        be given here or to :meth:`fit` / :meth:`bind`.
    covariate_interpolation : how ``regressors`` (time-varying covariates) are read at the observations from all
        the records: ``"locf"`` (last value carried forward, default) or ``"linear"`` (in time); given here or to
        :meth:`bind`.
    outcome : ``None`` (continuous data with the residual ``error`` model) or a non-Gaussian outcome: ``"binary"``,
        ``"poisson"``, ``nlme.outcomes.Ordinal(thresholds=...)``, ``NegativeBinomial(dispersion=...)``,
        ``TimeToEvent(hazard=...)`` (structural None) or ``"loglik"`` (``structural`` is then the user's
        ``loglik(psi, data)``): :mod:`latentfit.models.nlme.outcomes`.
    dtype, device : of the arrays (torch: float64, CPU by default).
    backend : ``"torch"`` (default) or ``"jax"`` (JaxOps: engines compile their iterations with ``lax.scan``).
    iov : inter-occasion variability (Monolix's occasion level): the parameters with a κ random effect per
        (individual, occasion), ``φ_ik = C_i β + η_i + κ_ik``, ``κ_ik ~ N(0, γ²)``; a list of names (initial γ² 0.25)
        or a dict name -> initial γ²; estimated as ``gamma2_<name>`` (:mod:`latentfit.models.nlme.occasions`).
    occasion : the occasion column of the data (default ``"OCC"``); used with ``iov``.
    Several responses (PK/PD): ``error={"conc": "proportional", "effect": "constant"}`` (one error model per
        response, parameters ``a_<response>`` / ``b_<response>``; ``error_init={"conc": {"b": 0.1}}``); the structural
        model returns ``{response: prediction}`` (or a tuple in that order); ``response`` names the response column
        (default ``DVID``, else ``YTYPE``), whose i-th smallest value is the i-th response unless ``dvid={"conc": 1,
        "effect": 2}`` (:mod:`latentfit.models.nlme.responses`).
    """

    has_stats = True
    has_gaussian_prior = True

    def __init__(self, structural: Any, parameters: dict[str, Any], covariates: dict[str, Any] | None = None,
                 omega: Any = "diagonal", error: str = "constant", error_init: dict[str, float] | None = None,
                 data: pd.DataFrame | None = None, columns: dict[str, str] | None = None, dose: str | None = None,
                 regressors: tuple[str, ...] | list[str] = (), dtype: Any = None, device: Any = None,
                 backend: str = "torch", x: str | None = None, outcome: Any = None,
                 covariate_init: dict[str, Any] | None = None, covariate_interpolation: str | None = None,
                 iov: Any = None, occasion: str | None = None, response: str | None = None,
                 dvid: dict[str, Any] | None = None) -> None:

        if not isinstance(parameters, dict) or not parameters:
            raise ModelSpecificationError("parameters must be a non-empty dict name -> initial value or Parameter")
        self.outcome = _outcomes.make_outcome(outcome)
        if self.outcome is None:
            self.structural: Structural = resolve(structural, list(parameters))
        else:
            self.structural = _outcomes.setup(self, structural, parameters, error, error_init)
        self.param_names = _outcomes.parameter_names(self.structural, self.outcome)
        missing = [p for p in self.param_names if p not in parameters]
        extra = [p for p in parameters if p not in self.param_names]
        if missing or extra:
            raise ModelSpecificationError(f"the structural model {self.structural.name!r} has parameters "
                                          f"{self.param_names}; missing {missing}, unknown {extra}")
        self.spec: dict[str, Parameter] = {}
        for name in self.param_names:
            p = parameters[name]
            if isinstance(p, dict):
                p = Parameter(**p)
            elif not isinstance(p, Parameter):
                p = Parameter(float(p))
            tr = _TRANSFORM_ALIASES.get(str(p.transform).lower(), str(p.transform).lower())
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
            self.spec[name] = p
        self.random_names = [n for n in self.param_names if self.spec[n].random]
        if self.outcome is not None:
            self.outcome.check_spec(self.spec)
        if not self.random_names:
            raise ModelSpecificationError("at least one parameter needs a random effect (Parameter(random=True))")
        self.covariate_spec = self._parse_covariates(covariates or {})
        self.iov_init = _occ.parse_iov(iov, self.param_names)
        self.occasion_column = str(occasion) if occasion is not None else _occ.OCCASION_COLUMN
        self._iov: _occ.Occasions | None = None
        self.omega_blocks = self._parse_omega(omega)
        self.response_spec = _resp.parse(error, error_init, dvid) if isinstance(error, dict) else None
        self.response_column = response
        self._resp: _resp.Responses | None = None
        if self.response_spec is not None:
            error, error_init = "responses", None
        elif dvid is not None or response is not None:
            raise ModelSpecificationError("response= / dvid= are for several responses: give error={response: "
                                          "error model, ...}")
        self.error = str(error).lower()
        if self.error not in ERRORS and self.response_spec is None:
            raise ModelSpecificationError(f"unknown error model {error!r}; use one of {ERRORS}")
        init = {"a": 1.0, "b": 0.3}
        if error_init:
            unknown = set(error_init) - {"a", "b"}
            if unknown:
                raise ModelSpecificationError(f"error_init has unknown keys {sorted(unknown)} (use 'a', 'b')")
            init.update({k: float(v) for k, v in error_init.items()})
        if any(v <= 0 for v in init.values()):
            raise ModelSpecificationError(f"residual error parameters must be > 0, got {init}")
        self.error_init = init
        self.covariate_init = self._parse_covariate_init(covariate_init or {})
        self.read_options = dict.fromkeys(DATA_OPTIONS)
        self.read_options["regressors"] = ()
        self.read_options = self._merge_read_options({"columns": columns, "dose": dose, "regressors": regressors,
                                                      "x": x, "covariate_interpolation": covariate_interpolation},
                                                     "NLME(...)")
        if backend not in BACKENDS:
            raise ModelSpecificationError(f"backend must be 'torch' or 'jax', got {backend!r}")
        self.ops = make_ops(backend, device=device, dtype=dtype)
        self.data: NLMEData | None = None
        self.table: pd.DataFrame | None = None
        if data is not None:
            self._bind(data)

    # ----- specification parsing ------------------------------------------------------------------
    def _parse_covariates(self, covariates: dict[str, Any]) -> dict[str, list[tuple[str, str | None]]]:
        out: dict[str, list[tuple[str, str | None]]] = {}
        for pname, spec in covariates.items():
            if pname not in self.param_names:
                raise ModelSpecificationError(f"covariates: {pname!r} is not a parameter ({self.param_names})")
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

    def _parse_covariate_init(self, init: dict[str, Any]) -> dict[str, float]:
        """Flat ``{"beta_<param>_<column>": value}`` (checked against the design when data are bound)."""
        out: dict[str, float] = {}
        for key, value in init.items():
            if isinstance(value, dict):
                if key not in self.param_names:
                    raise ModelSpecificationError(f"covariate_init: {key!r} is not a parameter ({self.param_names})")
                out.update({f"beta_{key}_{col}": float(v) for col, v in value.items()})
            else:
                out[str(key)] = float(value)
        bad = [k for k, v in out.items() if not np.isfinite(v)]
        if bad:
            raise ModelSpecificationError(f"covariate_init: non-finite initial value(s) for {bad}")
        return out

    def _merge_read_options(self, given: dict[str, Any], where: str) -> dict[str, Any]:
        """The data options with ``given`` added; an option given twice with different values is an error."""
        unknown = set(given) - set(DATA_OPTIONS)
        if unknown:
            raise ModelSpecificationError(f"unknown data option(s) {sorted(unknown)}; data options are "
                                          f"{list(DATA_OPTIONS)}")
        out = dict(self.read_options)
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

    def _parse_omega(self, omega: Any) -> list[tuple[str, ...]]:
        if isinstance(omega, str):
            if omega == "diagonal":
                return [(n,) for n in self.random_names]
            if omega in ("full", "block"):
                return [tuple(self.random_names)]
            raise ModelSpecificationError(f"omega must be 'diagonal', 'full' or a list of blocks, got {omega!r}")
        blocks, seen = [], set()
        for block in omega:
            block = (block,) if isinstance(block, str) else tuple(block)
            for n in block:
                if n not in self.random_names:
                    raise ModelSpecificationError(f"omega block {block}: {n!r} is not a parameter with a random "
                                                  f"effect ({self.random_names})")
                if n in seen:
                    raise ModelSpecificationError(f"omega blocks: {n!r} appears twice")
                seen.add(n)
            blocks.append(block)
        blocks += [(n,) for n in self.random_names if n not in seen]
        return blocks

    @property
    def diagonal_omega(self) -> bool:
        return all(len(b) == 1 for b in self.omega_blocks)

    # ----- binding data ---------------------------------------------------------------------------
    def bind(self, data: pd.DataFrame | None = None, **read_options: Any) -> NLME:
        """A copy of the model bound to ``data`` (default: the bound table) with the data options ``columns``,
        ``dose``, ``regressors``, ``x`` (as in :func:`read_nonmem`; an option already given with another value is an
        error)."""
        new = copy.copy(self)
        new.read_options = self._merge_read_options(read_options, "bind/fit")
        if data is None:
            if self.table is None:
                raise ModelSpecificationError("the model has no data: pass data= to NLME(...), .bind(data) or "
                                              ".fit(data)")
            data = self.table
        new._bind(data)
        return new

    def _bind(self, df: pd.DataFrame) -> None:
        ops, xp = self.ops, self.ops.xp
        opts = self.read_options
        cov_cols = sorted({c for items in self.covariate_spec.values() for c, _ in items})
        if self.iov_init and self.occasion_column not in df.columns:
            raise DataError(f"iov={list(self.iov_init)} needs the occasion column {self.occasion_column!r}, which is "
                            f"not in the data (columns {list(df.columns)}); name it with occasion='...'")
        response_col = _resp.response_column(df, self.response_column) if self.response_spec is not None else None
        regressors = tuple(dict.fromkeys(tuple(self.structural.regressors) + tuple(opts["regressors"])
                                         + ((self.occasion_column,) if self.iov_init else ())
                                         + ((response_col,) if response_col else ())))
        data = read_nonmem(df, columns=opts["columns"], covariates=cov_cols, regressors=regressors, dose=opts["dose"],
                           x=opts["x"], covariate_interpolation=opts["covariate_interpolation"] or "locf")
        if self.structural.uses_doses:
            if data.x is not None and "time" not in data.columns:
                raise DataError(f"the structural model {self.structural.name!r} is a function of the time since the "
                                f"doses: the data need a time column (columns={{'time': ...}}), not only x=")
            if not (data.dose_amt > 0).any():
                raise DataError(f"the structural model {self.structural.name!r} is driven by doses, but the data have "
                                f"none: add dose rows (AMT > 0, EVID = 1) or name a per-row dose column (dose='Dose')")
        self.data, self.table = data, df
        n, m = data.num_individuals, len(self.param_names)
        self.num_units = n
        # ----- fixed effects and design X_i [N, m, p] -------------------------------------------
        effects: list[_FixedEffect] = []
        for j, pname in enumerate(self.param_names):
            effects.append(_FixedEffect(pname, j, np.ones(n), True))
            for col, tr in self.covariate_spec.get(pname, []):
                for suffix, values in _covariate_columns(data.covariates[col], col, tr):
                    effects.append(_FixedEffect(f"beta_{pname}_{col}{suffix}", j, values, False))
        self.effects = effects
        p = len(effects)
        x = np.zeros((n, m, p))
        for k, e in enumerate(effects):
            x[:, e.param, k] = e.column
        self.r_idx = [self.param_names.index(nm) for nm in self.random_names]
        d = len(self.r_idx)
        self.latent_dim = d
        self.cols_r = [k for k, e in enumerate(effects) if self.spec[self.param_names[e.param]].random]
        xr = x[:, self.r_idx, :][:, :, self.cols_r]  # [N, d, p_r]
        self.free_r = [i for i, k in enumerate(self.cols_r) if not (effects[k].is_pop
                                                                    and self.spec[effects[k].name].fixed)]
        self.fixed_r = [i for i in range(len(self.cols_r)) if i not in self.free_r]
        pr = len(self.cols_r)
        eye_pr = np.eye(pr)
        self._sel_free = ops.asarray(eye_pr[:, self.free_r])  # [p_r, f]
        self._sel_fixed = ops.asarray(eye_pr[:, self.fixed_r])  # [p_r, c]
        self._x = ops.asarray(x)
        self._xr = ops.asarray(xr)
        self._xtx = ops.asarray(np.einsum("njp,nkq->jkpq", xr, xr))
        self._r_sel = ops.asarray(np.array(self.r_idx, dtype=np.int64))  # index arrays (JAX needs arrays)
        self._cols_r_sel = ops.asarray(np.array(self.cols_r, dtype=np.int64))
        emb = np.zeros((d, m))
        emb[np.arange(d), self.r_idx] = 1.0
        self._embed = ops.asarray(emb)
        self._all_random = d == m
        self._no_covariates = p == m
        # diagonal Ω and no covariate on a parameter with random effect: the GLS decouples into means
        self._simple = self.diagonal_omega and len(self.cols_r) == d
        self._fixed_r_mask = ops.asarray(np.array([self.spec[nm].fixed for nm in self.random_names]))
        kinds = {nm: self.spec[nm].transform for nm in self.param_names}
        self._pop_kinds = set(kinds.values())
        self._kind_masks, self._safe_raw = {}, {}
        for kind in self._pop_kinds - {"normal"}:
            mask = np.array([e.is_pop and kinds[self.param_names[e.param]] == kind for e in effects])
            self._kind_masks[kind] = ops.asarray(mask)
            self._safe_raw[kind] = 0.5 if kind in ("logit", "probit") else 1.0
        self._eye = ops.asarray(np.eye(d))
        block_mask = np.zeros((d, d))
        for block in self.omega_blocks:
            idx = [self.random_names.index(b) for b in block]
            block_mask[np.ix_(idx, idx)] = 1.0
        self._block_mask = ops.asarray(block_mask)
        # ----- observations ----------------------------------------------------------------------
        if self.error == "exponential":
            bad = data.mask & (data.dv <= 0)
            if bad.any():
                i, t = np.argwhere(bad)[0]
                raise DataError(f"exponential error needs DV > 0: ID {_id(data.ids[i])}, row {data.obs_rows[i, t]} has "
                                f"DV = {data.dv[i, t]}")
        self._y = ops.asarray(data.dv)
        self._ylog = ops.asarray(np.log(np.where(data.mask & (data.dv > 0), data.dv, 1.0)))
        self._mask = ops.asarray(data.mask)
        self._no_padding = bool(data.mask.all())
        self._cens = ops.asarray(data.cens.astype(float))
        self.has_censoring = bool((data.cens[data.mask] != 0).any())
        self._uncens_mask = ops.asarray(data.mask & (data.cens == 0))
        self.num_obs = int((data.mask & (data.cens == 0)).sum())
        self.has_gaussian_obs = self.outcome is None
        self._outcome_consts = _outcomes.bind(self, data) if self.outcome is not None else {}
        regs = {k: ops.asarray(v) for k, v in data.regressors.items()}
        self.design = Design(xp, ops.asarray(data.time), ops.asarray(data.dose_time), ops.asarray(data.dose_amt),
                             ops.asarray(data.dose_rate), regs,
                             {c: ops.asarray(np.array(pd.to_numeric(data.covariates[c], errors="coerce"), dtype=float))
                              for c in data.covariates.columns
                              if pd.api.types.is_numeric_dtype(data.covariates[c])},
                             doses_precede_obs=bool(data.dose_amt.shape[1] == 1 and (data.dose_amt > 0).all()
                                                    and (data.dose_time[:, :1] <= data.time).all()),
                             dose_cmt=ops.asarray(data.dose_cmt.astype(np.int64)), ops=ops,
                             x=None if data.x is None else regs[data.x], **self._dose_design(data),
                             dv=self._outcome_consts.get("dv"))
        self._structural_fn = self.structural.bound(self.design)
        if self.response_spec is not None:  # each observation takes its response's prediction
            self._resp = _resp.bind(self, data, response_col)
            self._structural_fn = _resp.wrap(self._structural_fn, self)
        self.observed = {"DV": np.where(data.mask, data.dv, np.nan)}
        self.latent_sites = [LatentSite(nm, (), k, 1, kind="gaussian") for k, nm in enumerate(self.random_names)]
        self.params = self._build_params()
        if self._resp is not None:
            self.params.update(_resp.params(self, self.response_spec))
        if self.iov_init:  # κ columns after the d η columns of the latent
            self._iov = _occ.bind(self, data, self.occasion_column)
            self.latent_dim = d + self._iov.size
            self.latent_sites += _occ.latent_sites(self._iov)
            self.params.update(_occ.params(self, self._iov))

    def _dose_design(self, data: NLMEData, grid: np.ndarray | None = None) -> dict[str, Any]:
        """The steady-state, period and routing fields of a :class:`Design` (None where the data do not need
        them, so that the common case stays as fast as before); ``grid``: periods of grid times (by the resets'
        times)."""
        ops, out = self.ops, {}
        real = data.dose_amt > 0
        if data.has_ss:
            out.update(dose_ss=ops.asarray(data.dose_ss), dose_ii=ops.asarray(data.dose_ii))
        if data.has_resets:
            obs_seg = data.obs_seg if grid is None else (data.seg_start[:, None, 1:] <= grid[..., None]).sum(-1)
            out.update(dose_seg=ops.asarray(data.dose_seg), obs_seg=ops.asarray(np.asarray(obs_seg, dtype=float)))
        out["central_cmt"] = bool((data.dose_cmt[real] == 2).any())
        out["has_infusion"] = bool((data.dose_rate[real] > 0).any())
        return out

    def _require_data(self) -> None:
        if self.data is None:
            raise ModelSpecificationError("the model has no data: pass data= to NLME(...), .bind(data) or .fit(data)")

    def _build_params(self) -> dict[str, ParamInfo]:
        ops, xp = self.ops, self.ops.xp
        params: dict[str, ParamInfo] = {}
        ident = lambda v: v  # noqa: E731
        for e in self.effects:
            pname = self.param_names[e.param]
            sp = self.spec[pname]
            random = sp.random
            if e.is_pop:
                u, uinv = _transform_pair(ops, sp.transform)
                params[e.name] = ParamInfo(e.name, ops.asarray(sp.init), u, uinv, closed_form=random, fixed=sp.fixed,
                                           meta={"role": "population", "transform": sp.transform})
            else:
                params[e.name] = ParamInfo(e.name, ops.asarray(self.covariate_init.get(e.name, 0.0)), ident, ident,
                                           closed_form=random, meta={"role": "covariate", "parameter": pname})
        unknown = sorted(set(self.covariate_init) - set(params))
        if unknown:
            names = [e.name for e in self.effects if not e.is_pop]
            raise ModelSpecificationError(f"covariate_init: unknown covariate coefficient(s) {unknown}; the model has "
                                          f"{names or 'no covariate'}")
        if self.diagonal_omega:
            for nm in self.random_names:
                params[f"omega2_{nm}"] = ParamInfo(f"omega2_{nm}", ops.asarray(self.spec[nm].omega2), xp.log, xp.exp,
                                                   closed_form=True, anneal="var", meta={"role": "omega"})
        else:
            om = np.diag([self.spec[nm].omega2 for nm in self.random_names])
            params["Omega"] = ParamInfo("Omega", ops.asarray(om), ident, ident, closed_form=True, anneal="cov",
                                        meta={"role": "omega", "names": list(self.random_names)})
        closed_err = self.error != "combined" and not self.has_censoring
        if self.outcome is None and self.error in ("constant", "combined", "exponential"):
            params["a"] = ParamInfo("a", ops.asarray(self.error_init["a"]), xp.log, xp.exp, closed_form=closed_err,
                                    meta={"role": "error"})
        if self.error in ("proportional", "combined"):
            params["b"] = ParamInfo("b", ops.asarray(self.error_init["b"]), xp.log, xp.exp, closed_form=closed_err,
                                    meta={"role": "error"})
        return params

    # ----- building blocks --------------------------------------------------------------------------
    def _beta(self, theta: dict[str, Any]) -> Any:
        """All fixed effects in φ-space, ``[p]``."""
        xp = self.ops.xp
        raw = xp.stack([theta[e.name] for e in self.effects])
        if self._pop_kinds == {"log"} and len(self.effects) == len(self.param_names):
            return xp.log(raw)  # common case: every parameter log-normal, no covariate
        out = raw
        for kind, mask in self._kind_masks.items():
            u, _ = _transform_pair(self.ops, kind)
            out = xp.where(mask, u(xp.where(mask, raw, self._safe_raw[kind])), out)
        return out

    def _take(self, a: Any, units: Any) -> Any:
        return a if units is None else self.ops.take(a, units, 0)

    def _mu(self, theta: dict[str, Any], units: Any = None) -> Any:
        """``μ_i = X_i β`` for every parameter, ``[n, m]``."""
        if self._no_covariates and units is None:
            return self._beta(theta)  # [m], broadcasts against [n, m]
        return self._take(self._x, units) @ self._beta(theta)

    def _mu_r(self, mu: Any, n: int) -> Any:
        xp = self.ops.xp
        mu_r = mu if self._all_random else mu[..., self._r_sel]
        return xp.broadcast_to(mu_r, (n, len(self.r_idx))) if mu_r.ndim == 1 else mu_r

    def omega_matrix(self, theta: dict[str, Any]) -> Any:
        """Ω ``[d, d]`` (random-effect covariance)."""
        if self.diagonal_omega:
            return self._omega_diag(theta)[:, None] * self._eye
        return theta["Omega"]

    def _omega_diag(self, theta: dict[str, Any]) -> Any:
        xp = self.ops.xp
        return xp.stack([theta[f"omega2_{nm}"] for nm in self.random_names])

    def _psi(self, mu: Any, z: Any) -> dict[str, Any]:
        xp = self.ops.xp
        if self._all_random:
            phi = z
        else:
            phi = mu + (z - mu[..., self._r_sel]) @ self._embed
        if self._pop_kinds == {"log"}:
            psi = xp.exp(phi)
            return {nm: psi[..., j:j + 1] for j, nm in enumerate(self.param_names)}
        return {nm: self.params[nm].to_constrained(phi[..., j:j + 1]) for j, nm in enumerate(self.param_names)}

    def individual_parameters(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        """ψ_i per parameter name, ``[..., n, 1]`` (natural scale; with IOV the individual's value, κ = 0)."""
        if self._iov is not None:
            z = _occ.split(z, self._iov)[0]
        return self._psi(self._mu(theta, units), z)

    def structural_prediction(self, theta: dict[str, Any], z: Any, units: Any = None, mu: Any = None) -> Any:
        """``f(t_ij, ψ_i)`` ``[..., n, T]``."""
        self._require_data()
        mu = self._mu(theta, units) if mu is None else mu
        if self._iov is not None:
            return self._structural_prediction_iov(mu, z, units)
        psi = self._psi(mu, z)
        return self._structural_fn(psi, self.design.take(self.ops, units))

    def _structural_prediction_iov(self, mu: Any, z: Any, units: Any) -> Any:
        """IOV: the structural model at each occasion's φ_i + κ_ik (a leading axis of size K), each observation
        taking its own occasion's prediction (:mod:`~latentfit.models.nlme.occasions`)."""
        xp, occ = self.ops.xp, self._iov
        z_phi, kappa = _occ.split(z, occ)
        phi = mu + (z_phi - mu[..., self._r_sel]) @ self._embed if not self._all_random else z_phi
        phi_k = _occ.phi_by_occasion(xp.broadcast_to(phi, tuple(z_phi.shape[:-1]) + (len(self.param_names),)),
                                     kappa, occ, xp)
        psi = {nm: self.params[nm].to_constrained(phi_k[..., j:j + 1]) for j, nm in enumerate(self.param_names)}
        pred = self._structural_fn(psi, self.design.take(self.ops, units))
        return _occ.select(pred, occ, units, self.ops)

    @property
    def x_name(self) -> str:
        """Name of the x-variable of the plots: the ``x=`` column, else the time column."""
        self._require_data()
        return self.data.x if self.data.x is not None else self.data.columns.get("time", "time")

    def prediction_grid(self, num_points: int = 150) -> tuple[np.ndarray, np.ndarray] | None:
        """A fine grid of the x-variable per individual, ``(grid [N, G], mask [N, G])`` (numpy), for smooth curves.

        Each individual's grid spans its first dose (or observation) to its last observation with ``num_points``
        equally spaced points, plus its observation times, dose times (and the instant before each, so that a
        bolus draws a jump) and infusion ends; rows are padded with their last value (``mask`` False).  None
        when the structural model needs per-observation regressors that a grid cannot interpolate (other
        ``regressors=`` columns, or an ``x=`` column in data that also have a time column).
        """
        self._require_data()
        data = self.data
        extra = set(data.regressors) - ({data.x} if data.x is not None else set())
        if extra or (data.x is not None and "time" in data.columns):
            return None
        xv, rows = data.x_values, []
        for i in range(data.num_individuals):
            obs = xv[i][data.mask[i]]
            lo, hi = float(obs.min()), float(obs.max())
            pts = [np.linspace(lo, hi, int(num_points)), obs]
            if data.x is None:
                real = data.dose_amt[i] > 0
                t_d, amt, rate = data.dose_time[i][real], data.dose_amt[i][real], data.dose_rate[i][real]
                lo = min(lo, float(t_d.min())) if t_d.size else lo
                pts[0] = np.linspace(lo, hi, int(num_points))
                ends = t_d[rate > 0] + amt[rate > 0] / rate[rate > 0]
                pts += [t_d, np.nextafter(t_d[t_d > lo], -np.inf), ends]
            g = np.unique(np.concatenate(pts))
            rows.append(g[(g >= lo) & (g <= hi)])
        width = max(len(r) for r in rows)
        grid = np.stack([np.concatenate([r, np.full(width - len(r), r[-1])]) for r in rows])
        mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
        return grid, mask

    def structural_prediction_at(self, theta: dict[str, Any], z: Any, grid: np.ndarray) -> Any:
        """``f(x, ψ_i)`` at the points ``grid [N, G]`` of the x-variable (e.g. :meth:`prediction_grid`), with each
        individual's doses and covariates; ``z [..., N, d]`` -> ``[..., N, G]`` (backend array)."""
        self._require_data()
        ops, d = self.ops, self.design
        g = ops.asarray(np.asarray(grid, dtype=float))
        regs = {self.data.x: g} if self.data.x is not None else {}
        design = Design(d.xp, g, d.dose_time, d.dose_amt, d.dose_rate, regs, d.covariates, False, d.dose_cmt, ops,
                        None if self.data.x is None else g, **self._dose_design(self.data, np.asarray(grid, float)))
        psi = self._psi(self._mu(theta), z)
        return self.structural.bound(design)(psi, design)

    def _error_sd(self, theta: dict[str, Any], f: Any, units: Any = None) -> Any:
        xp = self.ops.xp
        if self._resp is not None:
            return _resp.error_sd(theta, f, self._resp, units, self.ops)
        if self.error in ("constant", "exponential"):
            return theta["a"] + 0.0 * f
        if self.error == "proportional":
            return theta["b"] * xp.abs(f)
        return xp.sqrt(theta["a"] ** 2 + (theta["b"] * f) ** 2)

    def _obs_terms(self, theta: dict[str, Any], f: Any, units: Any) -> Any:
        """Per-observation log-density ``[..., n, T]`` (padding = 0)."""
        xp = self.ops.xp
        mask = None if self._no_padding else self._take(self._mask, units)
        if self.error == "exponential":
            y = self._take(self._ylog, units)
            f = xp.log(f)
        else:
            y = self._take(self._y, units)
        if self.error in ("constant", "exponential"):
            a = theta["a"]
            r = (y - f) / a
            lp = -0.5 * r * r - (xp.log(a) + 0.5 * LOG_2PI)
        else:
            sd = self._error_sd(theta, f, units)
            r = (y - f) / sd
            lp = -0.5 * r * r - xp.log(sd) - 0.5 * LOG_2PI
        if self.has_censoring:
            cens = self._take(self._cens, units)
            lcdf = self.ops.log_ndtr(cens * r)  # below: Φ((LOQ−f)/g), above: Φ(−(LOQ−f)/g)
            lp = xp.where(cens != 0, lcdf, lp)
        return lp if self._no_padding else xp.where(mask, lp, 0.0)

    # ----- LatentModel contract ----------------------------------------------------------------------
    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        xp = self.ops.xp
        mu = self._mu(theta, units)
        if self.outcome is not None:
            return xp.sum(_outcomes.log_prob(self, theta, z, units, mu), -1), self._log_prior(theta, z, mu)
        f = self.structural_prediction(theta, z, units, mu=mu)
        ll = xp.sum(self._obs_terms(theta, f, units), -1)
        return ll, self._log_prior(theta, z, mu)

    def _log_prior(self, theta: dict[str, Any], z: Any, mu: Any) -> Any:
        xp = self.ops.xp
        if self._iov is not None:
            z, kappa = _occ.split(z, self._iov)
            return self._log_prior_eta(theta, z, mu) + _occ.log_prior(theta, kappa, self._iov, xp)
        return self._log_prior_eta(theta, z, mu)

    def _log_prior_eta(self, theta: dict[str, Any], z: Any, mu: Any) -> Any:
        xp = self.ops.xp
        diff = z - (mu if self._all_random else mu[..., self._r_sel])
        d = len(self.r_idx)
        if self.diagonal_omega:
            var = self._omega_diag(theta)
            return -0.5 * xp.sum(diff * diff / var, -1) - (0.5 * xp.sum(xp.log(var)) + 0.5 * d * LOG_2PI)
        om = theta["Omega"]
        prec = xp.linalg.inv(om)
        _, logdet = xp.linalg.slogdet(om)
        quad = xp.sum((diff @ prec) * diff, -1)
        return -0.5 * quad - 0.5 * logdet - 0.5 * d * LOG_2PI

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        ops, xp = self.ops, self.ops.xp
        self._require_data()
        n = self.num_units if units is None else len(units)
        mu_r = self._mu_r(self._mu(theta, units), n)
        if self.diagonal_omega:
            chol = self.ops.xp.sqrt(self.omega_matrix(theta))
        else:
            chol = ops.small_cholesky(self.omega_matrix(theta))
        if self._iov is not None:
            key, k_kappa = ops.split(key)
        eps = ops.normal(key, (num_chains,) + tuple(mu_r.shape))
        z = mu_r + eps @ xp.swapaxes(chol, -1, -2)
        if self._iov is not None:
            z = xp.concatenate([z, _occ.sample(theta, k_kappa, (num_chains, n), self._iov, ops)], -1)
        return z

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        out = {nm: self.params[nm].to_constrained(z[..., k]) for k, nm in enumerate(self.random_names)}
        if self._iov is not None:
            out.update(_occ.unpack(_occ.split(z, self._iov)[1], self._iov))
        return out

    def check_initial_values(self) -> None:
        """Raise a clear error when any individual's log-density is not finite at the initial values
        (at the prior means), e.g. a zero prediction under a proportional error."""
        xp = self.ops.xp
        theta = self.init_params()
        z = self.prior_moments(theta)[0]
        ll, lp = self.log_densities(theta, z)
        if not bool(xp.all(xp.isfinite(ll + lp))):
            self.raise_for_nonfinite(theta, z[None])

    def raise_for_nonfinite(self, theta: dict[str, Any], z: Any) -> None:
        """Name the first individual / observation whose log-density is not finite, with a hint."""
        if self.outcome is not None:
            _outcomes.raise_for_nonfinite(self, theta, z)
            return super().raise_for_nonfinite(theta, z)
        ops = self.ops
        mu = self._mu(theta)
        f = ops.to_numpy(self.structural_prediction(theta, z, mu=mu))
        terms = ops.to_numpy(self._obs_terms(theta, self.structural_prediction(theta, z, mu=mu), None))
        bad = ~np.isfinite(terms)
        if bad.any():
            idx = np.argwhere(bad)[0]
            c, i, t = (0, *idx) if idx.size == 2 else tuple(idx[-3:])
            hint = ""
            if not np.isfinite(f[c, i, t]):
                hint = "the structural model returns NaN/inf there (check the initial parameter values)"
            elif self.error == "proportional" and f[c, i, t] == 0:
                hint = "the prediction is 0 there, so a proportional error has sd 0: use error='combined'"
            elif self.error == "exponential" and f[c, i, t] <= 0:
                hint = "the prediction is <= 0 there, where an exponential error needs a positive prediction"
            raise ModelSpecificationError(
                f"the log-likelihood is not finite at the initial parameter values for ID {_id(self.data.ids[i])} "
                f"(row {self.data.obs_rows[i, t]}, {self.data.columns.get('time') or self.data.x} "
                f"{self.data.time[i, t]}, prediction {f[c, i, t]:.4g})"
                + (f": {hint}" if hint else ""))
        super().raise_for_nonfinite(theta, z)

    # ----- exponential-family face (saemix M-step) ------------------------------------------------
    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        xp = self.ops.xp
        z_all, iov_stats = z, {}
        if self._iov is not None:
            z, kappa = _occ.split(z, self._iov)
            iov_stats = _occ.stats(kappa, self._iov, units, self.ops)
        if self._simple:
            out = {"phi": z, "phi2": z * z}
        else:
            out = {
                "phiphi": z[..., :, None] * z[..., None, :],
                "Xphi": self._take(self._xr, units)[:, :, None, :] * z[..., :, None, :, None],  # X_i[j, p] φ_ik
            }
        if self.params.get("a") is not None and self.params["a"].closed_form or \
                self.params.get("b") is not None and self.params["b"].closed_form:
            f = self.structural_prediction(theta, z_all, units)
            mask = self._take(self._uncens_mask, units)
            if self.error == "exponential":
                res = self._take(self._ylog, units) - xp.log(f)
            elif self.error == "proportional":
                res = (self._take(self._y, units) - f) / f
            else:
                res = self._take(self._y, units) - f
            out["rss"] = xp.sum(xp.where(mask, res * res, 0.0), -1)
        if self._resp is not None and any(p.closed_form for p in self.params.values() if p.meta.get("response")):
            out.update(_resp.stats(self, theta, self.structural_prediction(theta, z_all, units), units))
        out.update(iov_stats)
        return out

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        """β by GLS with the current Ω, then Ω and the residual parameter in closed form (saemix); with IOV
        also the occasion variances γ² (:func:`~latentfit.models.nlme.occasions.m_step`)."""
        out = self._m_step_eta(s, theta, num_units)
        if self._iov is not None:
            out.update(_occ.m_step(s, self._iov, num_units, self.num_units, self.ops.xp))
        if self._resp is not None:
            out.update(_resp.m_step(s, self, num_units))
        return out

    def _m_step_eta(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        xp = self.ops.xp
        if self._simple:
            return self._m_step_simple(s, theta, num_units)
        omega = self.omega_matrix(theta)
        prec = xp.linalg.inv(omega)
        d, pr = self.latent_dim, len(self.cols_r)
        a_mat = xp.reshape(xp.reshape(prec, (1, d * d)) @ xp.reshape(self._xtx, (d * d, pr * pr)), (pr, pr))
        b_vec = xp.reshape(xp.reshape(prec, (1, d * d)) @ xp.reshape(s["Xphi"], (d * d, pr)), (pr,))
        beta_all = self._beta(theta)[self._cols_r_sel]
        beta_c = self._sel_fixed.T @ beta_all
        a_ff = self._sel_free.T @ a_mat @ self._sel_free
        rhs = self._sel_free.T @ (b_vec - a_mat @ self._sel_fixed @ beta_c)
        beta_f = xp.linalg.solve(a_ff, rhs[:, None])[:, 0]
        beta = self._sel_free @ beta_f + self._sel_fixed @ beta_c
        cross = (s["Xphi"] @ beta).T  # [j, k] = Σ_i φ_ij (X_i β)_k
        quad = (self._xtx @ beta) @ beta  # Σ_i (X_i β)(X_i β)ᵀ
        om = (s["phiphi"] - cross - cross.T + quad) / num_units
        om = 0.5 * (om + om.T) * self._block_mask
        # rounding can push a collapsing variance to ≤ 0: floor the diagonal (saemix's cutoff)
        diag = xp.diagonal(om, 0, -2, -1)
        om = om + self.ops.asarray(np.eye(d)) * (xp.clip(diag, OMEGA2_FLOOR) - diag)
        out: dict[str, Any] = {}
        for i, k in enumerate(self.cols_r):
            e = self.effects[k]
            if e.is_pop and self.spec[e.name].fixed:
                continue
            out[e.name] = self.params[e.name].to_constrained(beta[i])
        if self.diagonal_omega:
            for i, nm in enumerate(self.random_names):
                out[f"omega2_{nm}"] = om[i, i]
        else:
            out["Omega"] = om
        if "rss" in s:
            name = "b" if self.error == "proportional" else "a"
            out[name] = xp.sqrt(s["rss"] / self.num_obs)
        return out

    def _m_step_simple(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        """Diagonal Ω, no covariate: ``β_j = S1_j / N``, ``ω²_j = S2_j / N − β_j²`` (the GLS decouples)."""
        xp = self.ops.xp
        beta_old = self._beta(theta)[self._r_sel]
        beta = xp.where(self._fixed_r_mask, beta_old, s["phi"] / num_units)
        om = xp.clip((s["phi2"] - 2.0 * beta * s["phi"]) / num_units + beta * beta, OMEGA2_FLOOR)
        out: dict[str, Any] = {}
        for i, nm in enumerate(self.random_names):
            if not self.spec[nm].fixed:
                out[nm] = self.params[nm].to_constrained(beta[i])
            out[f"omega2_{nm}"] = om[i]
        if "rss" in s:
            out["b" if self.error == "proportional" else "a"] = xp.sqrt(s["rss"] / self.num_obs)
        return out

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        """A random-effect variance that fell to ~0 (SAEM with few chains can absorb a weakly identified variance
        at zero, where EM's map is stationary)."""
        om = self.ops.to_numpy(self.omega_matrix(theta))
        collapsed = [f"{nm} (ω²={om[i, i]:.2g})" for i, nm in enumerate(self.random_names)
                     if om[i, i] < COLLAPSED_OMEGA2]
        if not collapsed:
            return []
        return [f"the variance of the random effect on {', '.join(collapsed)} collapsed to ~0: the data barely "
                f"identify it, and SAEM's Monte-Carlo noise with few chains can drive such a variance to zero; rerun "
                f"with more chains (num_chains=...), a larger initial variance, or without that random effect"]

    def numeric_objective(self, theta: dict[str, Any], z: Any, names: list[str]) -> Callable[[dict], Any] | None:
        """Cheap objective for SAEM's numerical step (hook read by the engine).

        Over residual-error parameters only, the structural predictions are computed once and only the
        observation terms are re-evaluated; otherwise the prior (constant in parameters without random
        effect) is left out.
        """
        xp = self.ops.xp
        if set(names) <= {n for n, p in self.params.items() if p.meta.get("role") == "error"}:
            f = self.ops.stop_gradient(self.structural_prediction(theta, z))
            return lambda th: xp.mean(xp.sum(self._obs_terms(th, f, None), (-2, -1)))
        if not any(n in self.closed_form_params or n.startswith("omega2") or n == "Omega" for n in names):
            return lambda th: xp.mean(xp.sum(self.log_lik(th, z), -1))
        return None

    # ----- Gaussian faces ----------------------------------------------------------------------------
    def predict(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """Mean and sd of the (transformed, for exponential error: log) observations, ``[..., n, T]``."""
        _outcomes.require_gaussian(self, "predict()")
        f = self.structural_prediction(theta, z, units)
        if self.error == "exponential":
            f = self.ops.xp.log(f)
        return f, self._error_sd(theta, f, units)

    def observations(self, units: Any = None) -> tuple[Any, Any]:
        """``(y, mask)`` ``[n, T]``: DV (log DV for exponential error); censored values are masked out."""
        _outcomes.require_gaussian(self, "observations()")
        self._require_data()
        y = self._ylog if self.error == "exponential" else self._y
        return self._take(y, units), self._take(self._uncens_mask, units)

    def prior_moments(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        n = self.num_units if units is None else len(units)
        mean, cov = self._mu_r(self._mu(theta, units), n), self.omega_matrix(theta)
        if self._iov is None:
            return mean, cov
        xp, size = self.ops.xp, self._iov.size  # κ: mean 0, variance γ² per slot, independent of η
        var = _occ.moments_sd(theta, self._iov, xp) ** 2
        mean = xp.concatenate([mean, xp.zeros_like(mean[:, :1]) * xp.ones_like(var)], -1)
        top = xp.concatenate([cov, xp.zeros_like(cov[:, :1]) * xp.ones_like(var)], -1)
        bottom = xp.concatenate([xp.zeros_like(var)[:, None] * xp.ones_like(cov[:1, :]),
                                 var[:, None] * self.ops.asarray(np.eye(size))], -1)
        return mean, xp.concatenate([top, bottom], -2)

    # ----- simulation -----------------------------------------------------------------------------
    def simulate(self, theta: dict[str, Any] | None = None, seed: int = 0) -> pd.DataFrame:
        """A copy of the bound table with ``DV`` simulated from the model at ``theta`` (default: initial values)."""
        self._require_data()
        ops = self.ops
        theta = self.init_params() if theta is None else {
            n: ops.asarray(v) if not hasattr(v, "shape") or isinstance(v, np.ndarray) else v
            for n, v in {**self.init_params(), **theta}.items()}
        if self.outcome is not None:
            return _outcomes.simulate(self, theta, seed)
        with ops.seed_context(seed):
            k1, k2 = ops.split(ops.key(seed))
            z = self.sample_prior(theta, k1, 1)[0]
            mean, sd = self.predict(theta, z)
            eps = ops.normal(k2, tuple(mean.shape))
        y = ops.to_numpy(mean + sd * eps)
        if self.error == "exponential":
            y = np.exp(y)
        out = self.table.copy()
        dv_col = self.data.columns["dv"]
        out[dv_col] = out[dv_col].astype(float)
        rows = self.data.obs_rows
        valid = rows >= 0
        out.iloc[rows[valid], out.columns.get_loc(dv_col)] = y[valid]
        return out

    # ----- front doors ------------------------------------------------------------------------------
    def fit(self, data: pd.DataFrame | None = None, engine: str = "saem", *, columns: dict[str, str] | None = None,
            dose: str | None = None, regressors: tuple[str, ...] | list[str] = (), x: str | None = None,
            init: dict[str, Any] | None = None, replicates: int = 1, dispersed_starts: bool | float = False,
            starts: list[dict[str, Any] | None] | None = None, **options: Any):
        """Fit by SAEM (``engine="saem"``) or f-SAEM (``"fsaem"``); returns a FitResult.

        ``data`` with the data options ``columns``, ``dose``, ``regressors``, ``x``, ``covariate_interpolation`` (the
        same as the constructor's; an option given to both with different values is an error).  ``init``: starting
        values by name as in ``fit.params`` (natural scale; e.g. a previous fit's ``params``), overriding those of the
        specification.
        ``options`` go to the engine (``num_iters``, ``num_chains``, ``seed``, ``progress``, ...).
        ``distributed=True`` (torch, every process of a ``torchrun`` script passing the same whole table): each process
        fits its contiguous block of individuals with ``rng="per_unit"``, statistics all-reduced in float64
        (:func:`latentfit.integrations.families.nlme_shard`); the estimates equal a one-process ``rng="per_unit"`` fit.

        ``replicates=R`` (> 1) runs R independent fits (seeds ``seed``, ``seed + 1``, ...; replicate 0 is the single
        fit), from ``starts`` (one dict of initial values or None per replicate) or, with ``dispersed_starts`` (True,
        or the φ-scale sd), from starts drawn around ``init`` with inflated ω²; it returns the fit with the largest
        log-likelihood (quadrature, else importance sampling) with the table ``fit.replicates`` (seed, logLik, MC SE,
        estimates), and warns (:class:`~latentfit.ConvergenceWarning`) when a replicate ends more than
        max(3 MC SE, 0.5) below the best (:mod:`latentfit.models.nlme.replicates`).
        The numerical step (combined error, parameters without random effect) is warm-started at the
        previous estimate, so 3 Newton steps per iteration are the default here (``newton_steps``; outcome models:
        1).
        Engines are loaded lazily, through :mod:`latentfit.integrations.families` (``models/`` never imports an
        engine).

        Example (saemix's ``theo.saemix`` table: columns ``Id, Dose, Time, Concentration, Weight``):

        >>> import latentfit as lf
        >>> from latentfit.models import nlme
        >>> df = lf.datasets.theophylline(saemix_form=True)
        >>> model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5})
        >>> fit = model.fit(df, columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose",
        ...                 seed=0, progress=False)
        >>> sorted(fit.params)
        ['CL', 'V', 'a', 'ka', 'omega2_CL', 'omega2_V', 'omega2_ka']
        >>> print(f"ka = {float(fit.params['ka']):.1f}")
        ka = 1.6
        """
        misplaced = sorted(set(options) & set(MODEL_OPTIONS))
        if misplaced:
            raise ModelSpecificationError(f"{', '.join(misplaced)}: model option(s), given to NLME(...), not to fit() "
                                          f"(fit takes the data, the data options {list(DATA_OPTIONS)}, init= and "
                                          f"the engine's options)")
        # outcome models: one warm-started Newton step per iteration (half the time; estimates within 0.15 SE)
        options.setdefault("newton_steps", 3 if self.outcome is None else 1)
        read = {"columns": columns, "dose": dose, "regressors": regressors, "x": x,
                "covariate_interpolation": options.pop("covariate_interpolation", None)}
        given = any(v not in (None, ()) for v in read.values())
        model = self.bind(data, **read) if data is not None or given else self
        model._require_data()
        if init:
            model = model.with_init(init)
        model.check_initial_values()
        if replicates != 1 or starts is not None or dispersed_starts:
            from .replicates import fit_replicates

            return fit_replicates(model, engine, options, replicates, dispersed_starts=dispersed_starts,
                                  starts=starts)
        return families().fit_nlme(model, engine, options)

    def shard_view(self, ops: Any, offset: int, total: int) -> NLME:
        """This bound model as one process's block of individuals in a data-parallel fit: the residual variance's
        M-step averages over the observations of every process (``num_obs`` all-reduced).  Inter-occasion variability
        and several responses (their M-steps count per process) are refused."""
        if self.iov_init or getattr(self, "_resp", None) is not None:
            raise ModelSpecificationError("distributed=True: inter-occasion variability and several responses are not "
                                          "supported yet (their M-steps count occasions/observations per process)")
        view = copy.copy(self)
        view.num_obs = int(round(float(ops.all_sum(ops.asarray(np.array(float(self.num_obs)))))))
        return view

    def with_init(self, init: dict[str, Any]) -> NLME:
        """A copy of the (bound) model whose starting values are ``init`` (names as in ``fit.params``, natural
        scale: population values, ``beta_*``, ``omega2_*`` or ``Omega``, ``a``, ``b``)."""
        self._require_data()
        unknown = sorted(set(init) - set(self.params))
        if unknown:
            raise ModelSpecificationError(f"init: unknown parameter(s) {unknown}; the model's parameters are "
                                          f"{list(self.params)}")
        ops = self.ops
        params = dict(self.params)
        for name, value in init.items():
            info = params[name]
            v = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=float)
            shape = np.shape(ops.to_numpy(info.value))
            if v.shape != shape:
                raise ModelSpecificationError(f"init: {name!r} needs shape {shape}, got {v.shape}")
            if name == "Omega":
                v = 0.5 * (v + v.T)
                if not np.all(np.linalg.eigvalsh(v) > 0):
                    raise ModelSpecificationError("init: 'Omega' must be positive definite")
                if np.any(v * (1.0 - ops.to_numpy(self._block_mask)) != 0):
                    raise ModelSpecificationError(f"init: 'Omega' has non-zero entries outside the blocks "
                                                  f"{self.omega_blocks}")
            value_b = ops.asarray(v)
            if not np.all(np.isfinite(ops.to_numpy(info.to_unconstrained(value_b)))):
                raise ModelSpecificationError(f"init: {name}={v} is outside its domain "
                                              f"({info.meta.get('transform') or info.meta.get('role')})")
            params[name] = dataclasses.replace(info, value=value_b)
        new = copy.copy(self)
        new.params = params
        return new

    @property
    def pyro_model(self) -> Callable[[], None]:
        """The model as an ordinary Pyro model function (no arguments; data bound).

        Sites: one ``pyro.param`` per estimated parameter (fixed ones are constants), ``phi`` (the
        latent ``[N, 1, d]`` inside plate ``id``), ``DV`` (observed, masked padding).  Built by
        :func:`latentfit.integrations.families.nlme_model`.
        """
        _outcomes.require_gaussian(self, "pyro_model")
        fam = families()
        return fam.nlme_model(self, fam.pyro_ppl())

    def with_ops(self, ops: Any) -> NLME:
        """A copy of the model whose arrays live on the backend ``ops`` (e.g. ``JaxOps()``), data re-bound."""
        new = copy.copy(self)
        new.ops = ops
        if self.table is not None:
            new._bind(self.table)
        return new

    @property
    def numpyro_model(self) -> Callable[[], None]:
        """The model as an ordinary NumPyro model function (no arguments; data bound as JAX arrays).

        The twin of :attr:`pyro_model` (same sites: one ``numpyro.param`` per estimated parameter,
        ``phi`` ``[N, 1, d]`` in plate ``id``, ``DV`` observed with the padding masked), evaluated by a
        JAX copy of this model (:meth:`with_ops`), so a user structural function written with
        ``jax.numpy`` (or with the ``xp`` of the design) works.  Fit it with ``latentfit.numpyro``.
        """
        _outcomes.require_gaussian(self, "numpyro_model")
        fam = families()
        return fam.nlme_model(self, fam.numpyro_ppl())

    def __repr__(self) -> str:
        bound = f"{self.num_units} individuals, {self.num_obs} observations" if self.data is not None else "no data"
        return (f"NLME({self.structural.name}, parameters={self.param_names}, random={self.random_names}, "
                f"{_outcomes.describe(self)}, {bound})")


def _covariate_columns(values: pd.Series, col: str, transform: str | None) -> list[tuple[str, np.ndarray]]:
    """Design columns of one covariate: ``[(name suffix, values [N])]``."""
    categorical = transform == "categorical" or not pd.api.types.is_numeric_dtype(values)
    if categorical:
        levels = sorted(pd.unique(values), key=lambda v: str(v))
        if len(levels) < 2:
            raise DataError(f"categorical covariate {col!r} has a single level {levels}")
        return [(f"_{lev}", (values.to_numpy() == lev).astype(float)) for lev in levels[1:]]
    v = values.to_numpy(dtype=float)
    if transform in (None, "linear"):
        return [("", v)]
    if transform == "center":
        return [("", v - v.mean())]
    if (v <= 0).any():
        i = int(np.argmax(v <= 0))
        raise DataError(f"covariate {col!r} must be > 0 for a log transform (ID {values.index[i]})")
    if transform == "log":
        return [("", np.log(v))]
    return [("", np.log(v / v.mean()))]


__all__ = ["NLME", "Parameter"]
