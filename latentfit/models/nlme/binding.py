"""Binding an NLME to a data table, and designs at other points of the x-variable.

:func:`bind_data` reads the table (:func:`~latentfit.models.nlme.data.read_nonmem`), builds the fixed-effect design
``X_i`` (population values and covariate columns, :class:`~latentfit.models.nlme.spec.FixedEffect`), the arrays the
densities and the M-step read (on the model's backend), the structural model's :class:`Design` and the parameters
(:func:`build_params`).  :func:`with_init` replaces starting values; :func:`prediction_grid` and
:func:`structural_prediction_at` evaluate the structural model between the observations (smooth curves of the plots).
Functions of the model (:class:`~latentfit.models.nlme.NLME` offers them as methods).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from latentfit.inference.model import DataError, LatentSite, ModelSpecificationError, ParamInfo

from . import occasions as _occ
from . import outcomes as _outcomes
from . import responses as _resp
from .data import RELEASE_ROWS, NLMEData, _id, pad_data, pad_individuals, read_nonmem, release_freed_memory
from .spec import FixedEffect, covariate_columns, merge_read_options, transform_pair
from .stored import StoredTable
from .structural import Design, SolverWarning

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import NLME


def bind(model: NLME, data: pd.DataFrame | None = None, **read_options: Any) -> NLME:
    """A copy of the model bound to ``data`` (default: the bound table) with the data options ``columns``,
    ``dose``, ``regressors``, ``x`` (as in :func:`read_nonmem`; an option already given with another value is an
    error)."""
    new = copy.copy(model)
    new.read_options = merge_read_options(model.read_options, read_options, "bind/fit")
    if data is None:
        if model._table is None:
            raise ModelSpecificationError("the model has no data: pass data= to NLME(...), .bind(data) or "
                                          ".fit(data)")
        data = model._table.frame()
    bind_data(new, data)
    return new


def bind_data(model: NLME, df: pd.DataFrame) -> None:
    """Bind the table ``df`` to ``model`` in place: the data read as NONMEM records, the fixed-effect design
    ``X_i`` ``[N, m, p]`` and its restriction to the random parameters, Ω's block mask, the observation arrays
    (padding masked), the structural model's :class:`Design`, the latent sites and the parameters."""
    ops, xp = model.ops, model.ops.xp
    opts = model.read_options
    cov_cols = sorted({c for items in model.covariate_spec.values() for c, _ in items})
    if model.iov_init and model.occasion_column not in df.columns:
        raise DataError(f"iov={list(model.iov_init)} needs the occasion column {model.occasion_column!r}, which is "
                        f"not in the data (columns {list(df.columns)}); name it with occasion='...'")
    response_col = _resp.response_column(df, model.response_column) if model.response_spec is not None else None
    regressors = tuple(dict.fromkeys(tuple(model.structural.regressors) + tuple(model.structural.covariates)
                                     + tuple(opts["regressors"])
                                     + ((model.occasion_column,) if model.iov_init else ())
                                     + ((response_col,) if response_col else ())))
    data = read_nonmem(df, columns=opts["columns"], covariates=cov_cols, regressors=regressors, dose=opts["dose"],
                       x=opts["x"], covariate_interpolation=opts["covariate_interpolation"] or "locf",
                       records=bool(model.iov_init), steps=tuple(model.structural.covariates))
    if getattr(model, "pad_widths", None) is not None:  # a block of a distributed fit: the other blocks' shapes
        data = pad_data(data, model.pad_widths)
    if getattr(model, "pad_units_to", None) is not None:  # a padded block of a JAX local fit (NLME.pad_units)
        data = pad_individuals(data, model.pad_units_to)
    if model.structural.uses_doses:
        if data.x is not None and "time" not in data.columns:
            raise DataError(f"the structural model {model.structural.name!r} is a function of the time since the "
                            f"doses: the data need a time column (columns={{'time': ...}}), not only x=")
        if not (data.dose_amt > 0).any():
            raise DataError(f"the structural model {model.structural.name!r} is driven by doses, but the data have "
                            f"none: add dose rows (AMT > 0, EVID = 1) or name a per-row dose column (dose='Dose')")
    # the table as the post-fit tools and re-bindings read it again, compact and exact (stored.py): not a reference
    # to the caller's DataFrame, which is freed when the caller drops it
    model.data, model._table = data, StoredTable(df, data)
    n, m = data.num_individuals, len(model.param_names)
    model.num_units = n
    # ----- fixed effects and design X_i [N, m, p] -------------------------------------------
    effects: list[FixedEffect] = []
    references = dict(model.covariate_reference)  # given, or an earlier binding's: kept (a design keeps the fit's)
    for j, pname in enumerate(model.param_names):
        effects.append(FixedEffect(pname, j, np.broadcast_to(1.0, (n,)), True))  # ones: a view, no [N] array
        for col, tr in model.covariate_spec.get(pname, []):
            columns, used = covariate_columns(data.covariates[col], col, tr, references.get(col))
            if used is not None:
                references.setdefault(col, used)
            for suffix, values in columns:
                effects.append(FixedEffect(f"beta_{pname}_{col}{suffix}", j, values, False))
    model.effects = effects
    model.covariate_reference = {c: r for c, r in references.items() if c in cov_cols}
    p = len(effects)
    # without covariates X_i = I for every individual: one [1, m, p] block (the [N, m, p] array and its restriction,
    # 144 B per individual at m = p = 3, were built only to be viewed one row at a time)
    rows_x = 1 if p == m else n
    x = np.zeros((rows_x, m, p))
    for k, e in enumerate(effects):
        x[:, e.param, k] = e.column[:rows_x]
    model.r_idx = [model.param_names.index(nm) for nm in model.random_names]
    d = len(model.r_idx)
    model.latent_dim = d
    model.cols_r = [k for k, e in enumerate(effects) if model.spec[model.param_names[e.param]].random]
    xr = x[:, model.r_idx, :][:, :, model.cols_r]  # [N, d, p_r]
    model.free_r = [i for i, k in enumerate(model.cols_r) if not (effects[k].is_pop
                                                                and model.spec[effects[k].name].fixed)]
    model.fixed_r = [i for i in range(len(model.cols_r)) if i not in model.free_r]
    pr = len(model.cols_r)
    eye_pr = np.eye(pr)
    model._sel_free = ops.asarray(eye_pr[:, model.free_r])  # [p_r, f]
    model._sel_fixed = ops.asarray(eye_pr[:, model.fixed_r])  # [p_r, c]
    if p == m:  # no covariate: X_i = I for every individual, one [m, p] block viewed N times (no [N, m, p] arrays)
        if ops.jittable:  # JAX has no views: its broadcast is a copy, made here on the host (no program to run)
            model._x = ops.asarray(np.broadcast_to(x, (n, m, p)))
            model._xr = ops.asarray(np.broadcast_to(xr, (n,) + xr.shape[1:]))
        else:
            model._x = xp.broadcast_to(ops.asarray(x), (n, m, p))
            model._xr = xp.broadcast_to(ops.asarray(xr), (n,) + xr.shape[1:])
        # Σ_i X_iᵀ X_i: N times the one block's (entries 0 or 1: the same sums as over N rows, exactly)
        model._xtx = ops.asarray(np.einsum("njp,nkq->jkpq", xr, xr) * float(n))
    else:
        model._x = ops.asarray(x)
        model._xr = ops.asarray(xr)
        model._xtx = ops.asarray(np.einsum("njp,nkq->jkpq", xr, xr))
    del x, xr
    model._r_sel = ops.asarray(np.array(model.r_idx, dtype=np.int64))  # index arrays (JAX needs arrays)
    model._cols_r_sel = ops.asarray(np.array(model.cols_r, dtype=np.int64))
    emb = np.zeros((d, m))
    emb[np.arange(d), model.r_idx] = 1.0
    model._embed = ops.asarray(emb)
    model._all_random = d == m
    model._no_covariates = p == m
    # diagonal Ω and no covariate on a parameter with random effect: the GLS decouples into means
    model._simple = model.diagonal_omega and len(model.cols_r) == d
    model._fixed_r_mask = ops.asarray(np.array([model.spec[nm].fixed for nm in model.random_names]))
    kinds = {nm: model.spec[nm].transform for nm in model.param_names}
    model._pop_kinds = set(kinds.values())
    model._kind_masks, model._safe_raw = {}, {}
    for kind in model._pop_kinds - {"normal"}:
        mask = np.array([e.is_pop and kinds[model.param_names[e.param]] == kind for e in effects])
        model._kind_masks[kind] = ops.asarray(mask)
        model._safe_raw[kind] = 0.5 if kind in ("logit", "probit") else 1.0
    model._eye = ops.asarray(np.eye(d))
    block_mask = np.zeros((d, d))
    for block in model.omega_blocks:
        idx = [model.random_names.index(b) for b in block]
        block_mask[np.ix_(idx, idx)] = 1.0
    model._block_mask = ops.asarray(block_mask)
    # ----- observations ----------------------------------------------------------------------
    if model.error == "exponential":
        bad = data.mask & (data.dv <= 0)
        if bad.any():
            i, t = np.argwhere(bad)[0]
            raise DataError(f"exponential error needs DV > 0: ID {_id(data.ids[i])}, row {data.obs_rows[i, t]} has "
                            f"DV = {data.dv[i, t]}")
    # [N, T] arrays only where the model reads them: log y for the exponential error, the censoring codes and the
    # uncensored mask when some observation is censored (else the mask itself)
    model._y = ops.asarray(data.dv)
    model._ylog = (ops.asarray(np.log(np.where(data.mask & (data.dv > 0), data.dv, 1.0)))
                   if model.error == "exponential" else None)
    model._mask = ops.asarray(data.mask)
    model._no_padding = bool(data.mask.all())
    model._num_obs_unit = ops.asarray(data.mask.sum(-1).astype(float))  # observations per individual [N]
    model.has_censoring = bool((data.cens[data.mask] != 0).any())
    model._cens = ops.asarray(data.cens.astype(float)) if model.has_censoring else None
    model._uncens_mask = ops.asarray(data.mask & (data.cens == 0)) if model.has_censoring else model._mask
    model.num_obs = int((data.mask & (data.cens == 0)).sum())
    model.has_gaussian_obs = model.outcome is None
    if model.response_spec is not None:  # the response of each observation (a joint model's constants read it)
        model._resp = _resp.bind(model, data, response_col)
    model._outcome_consts = _outcomes.bind(model, data) if model.outcome is not None else {}
    regs = {k: ops.asarray(v) for k, v in data.regressors.items()}
    covariates = {c: ops.asarray(np.array(pd.to_numeric(data.covariates[c], errors="coerce"), dtype=float))
                  for c in data.covariates.columns if pd.api.types.is_numeric_dtype(data.covariates[c])}
    doses_precede_obs = bool(data.dose_amt.shape[1] == 1 and (data.dose_amt > 0).all() and data.obs_rank is None
                             and (data.dose_time[:, :1] <= data.time).all())
    doses = dose_design(model, data)
    # τ = t − t_d [N, T, D] and the amounts [N, 1, D] made on the host in the arrays' dtype (the same numbers: an
    # IEEE subtraction), not by three small programs on JAX; τ, the largest array made here, comes last, after the
    # pages of the reading's and the checks' freed temporaries went back to the OS (not on top of them)
    if len(df) >= RELEASE_ROWS:
        release_freed_memory()
    t, td, amt = (np.asarray(ops.to_numpy(ops.asarray(a))) for a in (data.time, data.dose_time, data.dose_amt))
    tau_amt = (ops.asarray(t[..., :, None] - td[..., None, :]), ops.asarray(amt[..., None, :]))
    model.design = Design(xp, ops.asarray(data.time), ops.asarray(data.dose_time), ops.asarray(data.dose_amt),
                         ops.asarray(data.dose_rate), regs, covariates, doses_precede_obs=doses_precede_obs,
                         dose_cmt=ops.asarray(data.dose_cmt.astype(np.int64, copy=False)), ops=ops,
                         x=None if data.x is None else regs[data.x], **doses,
                         dv=model._outcome_consts.get("dv"), time_after_dose_of=tau_amt,
                         covariate_steps={k: tuple(ops.asarray(a) for a in v)
                                          for k, v in data.regressor_steps.items()})
    model._structural_fn = model.structural.bound(model.design)
    if model.response_spec is not None and model.response_spec.predicted:  # each observation: its response's
        model._structural_fn = _resp.wrap(model._structural_fn, model)
    model.latent_sites = [LatentSite(nm, (), k, 1, kind="gaussian") for k, nm in enumerate(model.random_names)]
    model.params = build_params(model)
    if model._resp is not None:
        model.params.update(_resp.params(model, model.response_spec))
    if model.iov_init:  # κ columns after the d η columns of the latent
        model._iov = _occ.bind(model, data, model.occasion_column)
        model.latent_dim = d + model._iov.size
        model.latent_sites += _occ.latent_sites(model._iov)
        model.params.update(_occ.params(model, model._iov))
        _occ.bind_carry(model)  # drug carried across occasion boundaries: the exact piecewise predictions
        if model.outcome is not None:  # a hazard with κ: each interval split at the occasions' starts
            _outcomes.bind_occasions(model)
    model._design_minor = _units_minor_design(model)
    check_structural(model)


def check_structural(model: NLME) -> None:
    """The structural model's self-check (:attr:`~latentfit.models.nlme.structural.Structural.check`: an ODE's RK4
    step halving, or its solver tolerances against the arrays' precision) at the initial values with the random
    effects at 0: a :class:`SolverWarning` naming the individual and time where its numerical solution looks
    unreliable (a fit from there would get wrong predictions, or reject the proposals whose predictions overflow,
    without a word)."""
    check = model.structural.check
    if check is None:
        return
    theta = model.init_params()
    psi = model.individual_parameters(theta, model.prior_moments(theta)[0])  # [N, 1] each (κ = 0: one set)
    design = (model.design if model.design.occ_start is None
              else dataclasses.replace(model.design, occ_start=None, occ_seg=None, occ_valid=None))
    found = check(psi, design)
    if found is not None:
        i, j, message = found
        data = model.data
        where = ("" if i is None else f" at the initial parameter values (random effects 0), ID {_id(data.ids[i])} "
                 f"at {data.columns.get('time') or data.x or 'time'} {data.time[i, j]:g}")
        warnings.warn(f"{model.structural.name}{where}: {message}", SolverWarning, stacklevel=4)


def _units_minor_design(model: NLME) -> dict[str, Any] | None:
    """The design, observations and mask laid out ``[T, N]`` for :meth:`NLME.units_minor_density` (SAEM's compiled
    sweeps): a compiled backend, a library model element-wise in its design (:attr:`Structural.elementwise`) with one
    dose per individual, the log-likelihood a function of the residual sums of squares; else None.  Transposed on the
    host (no program to compile): about 24·T + 40 bytes more per individual (280 B at T = 10)."""
    ops, s = model.ops, model.structural
    if not (getattr(ops, "jittable", False) and s.elementwise and s.bind is None and model._structural_fn is s.fn
            and model._iov is None and model.pad_units_to is None and model._rss_scored and model._all_random):
        return None

    def transpose(a: Any) -> Any:  # [N, T, ...] -> [T, N, ...]
        return ops.asarray(np.swapaxes(np.asarray(a), 0, 1))

    design = model.design.units_minor(transpose)
    if design is None:
        return None
    y = model._ylog if model.error == "exponential" else model._y
    return {"design": design, "y": transpose(y), "mask": None if model._no_padding else transpose(model._mask)}


def dose_design(model: NLME, data: NLMEData, grid: np.ndarray | None = None,
                period: np.ndarray | None = None) -> dict[str, Any]:
    """The steady-state, period and routing fields of a :class:`Design` (None where the data do not need
    them, so that the common case stays as fast as before); ``grid``: the periods of grid times, ``period`` or
    else by the resets' times."""
    ops, out = model.ops, {}
    real = data.dose_amt > 0
    if data.has_ss:
        out.update(dose_ss=ops.asarray(data.dose_ss), dose_ii=ops.asarray(data.dose_ii))
    if data.has_resets:
        obs_seg = (data.obs_seg if grid is None else period if period is not None
                   else (data.seg_start[:, None, 1:] <= grid[..., None]).sum(-1))
        out.update(dose_seg=ops.asarray(data.dose_seg), obs_seg=ops.asarray(np.asarray(obs_seg, dtype=float)))
    if data.obs_rank is not None and grid is None:  # records at equal times in the table's order (NONMEM's)
        out.update(obs_rank=ops.asarray(data.obs_rank), dose_rank=ops.asarray(data.dose_rank))
    out["central_cmt"] = bool((data.dose_cmt[real] == 2).any())
    out["has_infusion"] = bool((data.dose_rate[real] > 0).any())
    return out


def build_params(model: NLME) -> dict[str, ParamInfo]:
    ops, xp = model.ops, model.ops.xp
    params: dict[str, ParamInfo] = {}
    ident = lambda v: v  # noqa: E731
    for e in model.effects:
        pname = model.param_names[e.param]
        sp = model.spec[pname]
        random = sp.random
        if e.is_pop:
            u, uinv = transform_pair(ops, sp.transform)
            params[e.name] = ParamInfo(e.name, ops.asarray(sp.init), u, uinv, closed_form=random, fixed=sp.fixed,
                                       meta={"role": "population", "transform": sp.transform})
        else:
            params[e.name] = ParamInfo(e.name, ops.asarray(model.covariate_init.get(e.name, 0.0)), ident, ident,
                                       closed_form=random, meta={"role": "covariate", "parameter": pname})
    unknown = sorted(set(model.covariate_init) - set(params))
    if unknown:
        names = [e.name for e in model.effects if not e.is_pop]
        for pname, items in model.covariate_spec.items():  # the reference level of a categorical covariate?
            for col, _ in items:
                levels = model.covariate_reference.get(col)
                if isinstance(levels, tuple) and any(u == f"beta_{pname}_{col}_{levels[0]}" for u in unknown):
                    raise ModelSpecificationError(
                        f"covariate_init: {levels[0]!r} is the reference level of {col} (levels "
                        f"{', '.join(map(str, levels))}; the first sorted unless covariate_reference= / levels = "
                        f"names them), which has no coefficient: give those of the other level(s), "
                        f"{', '.join(map(str, levels[1:]))}")
        raise ModelSpecificationError(f"covariate_init: unknown covariate coefficient(s) {unknown}; the model has "
                                      f"{names or 'no covariate'}")
    if model.diagonal_omega:
        for nm in model.random_names:
            params[f"omega2_{nm}"] = ParamInfo(f"omega2_{nm}", ops.asarray(model.spec[nm].omega2), xp.log, xp.exp,
                                               closed_form=True, anneal="var", meta={"role": "omega"})
    else:
        om = np.diag([model.spec[nm].omega2 for nm in model.random_names])
        params["Omega"] = ParamInfo("Omega", ops.asarray(om), ident, ident, closed_form=True, anneal="cov",
                                    meta={"role": "omega", "names": list(model.random_names)})
    closed_err = model.error != "combined" and not model.has_censoring
    if model.outcome is None and model.error in ("constant", "combined", "exponential"):
        params["a"] = ParamInfo("a", ops.asarray(model.error_init["a"]), xp.log, xp.exp, closed_form=closed_err,
                                meta={"role": "error"})
    if model.error in ("proportional", "combined"):
        params["b"] = ParamInfo("b", ops.asarray(model.error_init["b"]), xp.log, xp.exp, closed_form=closed_err,
                                meta={"role": "error"})
    return params


def with_init(model: NLME, init: dict[str, Any]) -> NLME:
    """A copy of the (bound) model whose starting values are ``init`` (names as in ``fit.params``, natural
    scale: population values, ``beta_*``, ``omega2_*`` or ``Omega``, ``a``, ``b``)."""
    model._require_data()
    unknown = sorted(set(init) - set(model.params))
    if unknown:
        raise ModelSpecificationError(f"init: unknown parameter(s) {unknown}; the model's parameters are "
                                      f"{list(model.params)}")
    ops = model.ops
    params = dict(model.params)
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
            if np.any(v * (1.0 - ops.to_numpy(model._block_mask)) != 0):
                raise ModelSpecificationError(f"init: 'Omega' has non-zero entries outside the blocks "
                                              f"{model.omega_blocks}")
        value_b = ops.asarray(v)
        if not np.all(np.isfinite(ops.to_numpy(info.to_unconstrained(value_b)))):
            raise ModelSpecificationError(f"init: {name}={v} is outside its domain "
                                          f"({info.meta.get('transform') or info.meta.get('role')})")
        params[name] = dataclasses.replace(info, value=value_b)
    new = copy.copy(model)
    new.params = params
    return new


@dataclasses.dataclass(frozen=True)
class PredictionGrid:
    """Fine grid of the x-variable per individual (numpy arrays ``[N, G]``), made of pieces: one per (response,
    period, occasion) of the individual's observations, each sorted in x.  Unpacks as ``(x, mask)``."""

    x: np.ndarray  # [N, G] points (padding: the row's last point)
    mask: np.ndarray  # [N, G] bool, True for a real point
    period: np.ndarray | None  # [N, G] period of each point (a reset starts a new one); None: one period
    response: np.ndarray  # [N, G] response index (0 without several responses)
    occasion: np.ndarray  # [N, G] occasion index 0..K-1 (0 without occasions)

    def __iter__(self) -> Any:
        return iter((self.x, self.mask))

    def __getitem__(self, k: int) -> np.ndarray:
        return (self.x, self.mask)[k]


def _occasion_spans(model: NLME) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Start ``(time, period, valid)`` ``[N, K-1]`` of occasions 2..K (:func:`~.occasions.starts`); None without
    several occasions."""
    occ = model._iov
    if occ is None or occ.num_occasions < 2:
        return None
    return _occ.starts(model.data, model._table.column(occ.column), occ)[:3]


def prediction_grid(model: NLME, num_points: int = 150) -> PredictionGrid | None:
    """A fine grid of the x-variable per individual (:class:`PredictionGrid`, unpacking as ``(grid [N, G],
    mask [N, G])``), for smooth curves.

    The grid is made of one piece per (response, period, occasion) of the individual's observations, each with
    ``num_points`` equally spaced points from the first dose of its period and occasion (or its first observation,
    or the occasion's start when an occasion follows another in the same period) to its last observation (or to just
    before the next occasion's start in the same period, so that the occasions' curves meet), plus its observation
    times, the dose times of its period (and the instant before each, so that a bolus draws a jump) and infusion
    ends; rows are padded with their last value (``mask`` False).  None when the structural model needs
    per-observation regressors that a grid cannot interpolate (``regressors=`` columns other than the response and
    occasion columns, or an ``x=`` column in data that also have a time column).
    """
    model._require_data()
    data, ops = model.data, model.ops
    resp, occ = model._resp, model._iov
    labelled = {c.column for c in (resp, occ) if c is not None}
    extra = (set(data.regressors) - ({data.x} if data.x is not None else set()) - labelled
             - set(model.structural.covariates))  # step functions of time: the grid reads them as the model does
    if extra or (data.x is not None and "time" in data.columns):
        return None
    xv, mask = data.x_values, data.mask
    zeros = np.zeros(mask.shape, dtype=np.int64)
    obs_seg = data.obs_seg if data.obs_seg is not None else zeros
    dose_seg = data.dose_seg if data.dose_seg is not None else np.zeros(data.dose_time.shape)
    r_obs = np.asarray(ops.to_numpy(resp.index)) if resp is not None else zeros
    k_obs = np.asarray(ops.to_numpy(occ.occ)) if occ is not None else zeros
    spans = _occasion_spans(model)
    rows = []
    for i in range(data.num_individuals):
        m = mask[i]
        pieces = []
        for r, s, k in sorted(set(zip(r_obs[i][m].tolist(), obs_seg[i][m].tolist(), k_obs[i][m].tolist()))):
            obs = xv[i][m & (r_obs[i] == r) & (obs_seg[i] == s) & (k_obs[i] == k)]
            lo, hi = float(obs.min()), float(obs.max())
            pts = [obs]
            if data.x is None:
                begin, end = -np.inf, np.inf  # the occasion's span within the period
                if spans is not None:
                    start, seg, valid = (a[i] for a in spans)
                    if k > 0 and valid[k - 1] and seg[k - 1] == s:
                        begin = float(start[k - 1])
                        lo = min(lo, begin)
                    if k < len(start) and valid[k] and seg[k] == s and start[k] > hi:
                        end = float(start[k])
                        hi = float(np.nextafter(end, -np.inf))
                real = (data.dose_amt[i] > 0) & (dose_seg[i] == s)
                t_d, amt, rate = data.dose_time[i][real], data.dose_amt[i][real], data.dose_rate[i][real]
                first = t_d[(t_d >= begin) & (t_d < end)]
                lo = min(lo, float(first.min())) if first.size else lo
                ends = t_d[rate > 0] + amt[rate > 0] / rate[rate > 0]
                pts += [t_d, np.nextafter(t_d[t_d > lo], -np.inf), ends]
            g = np.unique(np.concatenate([np.linspace(lo, hi, int(num_points)), *pts]))
            g = g[(g >= lo) & (g <= hi)]
            pieces.append((g, r, s, k))
        rows.append(pieces)
    width = max(sum(len(g) for g, *_ in pieces) for pieces in rows)

    def padded(values: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.stack([np.concatenate([v, np.full(width - len(v), v[-1])]).astype(dtype) for v in values])

    x = padded([np.concatenate([g for g, *_ in p]) for p in rows], float)
    labels = [padded([np.concatenate([np.full(len(g), lab[j]) for g, *lab in p]) for p in rows], np.int64)
              for j in range(3)]
    lengths = np.array([sum(len(g) for g, *_ in p) for p in rows])
    return PredictionGrid(x, np.arange(width)[None, :] < lengths[:, None],
                          labels[1] if data.has_resets else None, labels[0], labels[2])


def _grid_labels(model: NLME, grid: np.ndarray) -> PredictionGrid:
    """Labels of the points of a plain ``grid [N, G]``: the period and the occasion in force at each time, the first
    response."""
    data = model.data
    period = (data.seg_start[:, None, 1:] <= grid[..., None]).sum(-1) if data.has_resets else None
    occasion = np.zeros(grid.shape, dtype=np.int64)
    spans = _occasion_spans(model)
    if spans is not None:
        seg = np.zeros(grid.shape) if period is None else period
        occasion = _occ._occasion_at(grid, seg, *spans).astype(np.int64)
    return PredictionGrid(grid, np.ones(grid.shape, bool), period, np.zeros(grid.shape, dtype=np.int64), occasion)


def structural_prediction_at(model: NLME, theta: dict[str, Any], z: Any, grid: Any) -> Any:
    """``f(x, ψ_i)`` at the points of ``grid`` (a :class:`PredictionGrid` of :func:`prediction_grid`, or an array
    ``[N, G]`` of the x-variable), with each individual's doses and covariates; ``z [..., N, d]`` -> ``[..., N, G]``
    (backend array).  Each point takes the prediction of its response, in its period, with its occasion's
    parameters (ψ_i with that occasion's κ_ik); a plain array: the first response, the period and occasion in force
    at each time."""
    model._require_data()
    ops, d, data = model.ops, model.design, model.data
    pg = grid if isinstance(grid, PredictionGrid) else _grid_labels(model, np.asarray(grid, dtype=float))
    gx = np.asarray(pg.x, dtype=float)
    g = ops.asarray(gx)
    resp, occ = model._resp, model._iov
    regs = {data.x: g} if data.x is not None else {}
    if resp is not None:  # the response column: each point's response's value (what the prediction selects by)
        regs[resp.column] = ops.asarray(np.asarray(resp.values, dtype=float)[pg.response])
    if occ is not None:
        labels = np.nan_to_num(occ.labels)
        regs[occ.column] = ops.asarray(np.take_along_axis(labels, np.minimum(pg.occasion, labels.shape[1] - 1), 1))
    doses = dose_design(model, data, gx, pg.period)
    chained = occ is not None and occ.carry is not None
    design = Design(d.xp, g, d.dose_time, d.dose_amt, d.dose_rate, regs, d.covariates, False, d.dose_cmt, ops,
                    None if data.x is None else g, **doses, occ_start=d.occ_start if chained else None,
                    occ_seg=d.occ_seg if chained else None, occ_valid=d.occ_valid if chained else None,
                    covariate_steps=d.covariate_steps)
    fn = model.structural.bound(design)
    if model.response_spec is not None and model.response_spec.predicted:
        fn = _resp.wrap(fn, model)
    mu = model._mu(theta)
    if occ is None:
        return fn(model._psi(mu, z), design)
    if chained:
        fn = _occ.chained(fn, occ.carry, occ.num_occasions)
    pred = fn(model._psi_by_occasion(mu, z), design)  # [..., K, N, G]
    return _occ.select(pred, occ, None, ops, index=ops.asarray(pg.occasion))


__all__ = ["PredictionGrid", "bind", "bind_data", "build_params", "dose_design", "prediction_grid",
           "structural_prediction_at", "with_init"]
