"""Several responses (Monolix's ``YTYPE`` / NONMEM's ``DVID``): joint models such as PK/PD, each response with its
own residual error model.

    y_ij = f_r(t_ij, ψ_i) + g_r(f_r, θ_r) ε_ij,   r = r(i, j) the response of observation j (the ``DVID`` column),

with ``g_r`` constant (``a_r``), proportional (``b_r |f_r|``) or combined (``sqrt(a_r² + b_r² f_r²)``) and the
parameters named ``a_<response>``, ``b_<response>``.  The structural model returns one prediction per response:
a dict ``{response: pred [..., N, T]}`` or a tuple / list in the order of the responses; each observation takes
the prediction of its response.  Responses are given as ``error={"conc": "proportional", "effect": "constant"}``
(their order is the order of the model's outputs); the i-th response matches the i-th smallest ``DVID`` value
(Monolix: the first output is ``YTYPE`` 1) unless ``dvid={"conc": 1, "effect": 2}`` says otherwise.

M-step per response: with the statistics ``S_r = Σ_{j: r(i,j) = r} res_ij²`` (res = y − f for a constant error,
(y − f)/f for a proportional one), ``a_r = sqrt(S_r / n_r)`` or ``b_r = sqrt(S_r / n_r)`` (n_r observations of
response r); a combined error takes SAEM's numerical step, as for one response.

The library's joint model :func:`oral_effect_imax` (one-compartment oral PK, an effect compartment and an
inhibitory Imax effect, the warfarin PK/PD shape) returns ``{"conc": C, "effect": E}`` in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentfit.inference.model import DataError, ModelSpecificationError, ParamInfo

from .structural import Design, Structural, _dose_terms, _p, _superpose, _time_since

#: default name of the response column; ``YTYPE`` (Monolix) is used when the data have it and no ``DVID``
RESPONSE_COLUMNS = ("DVID", "YTYPE")
ERRORS = ("constant", "proportional", "combined")


@dataclass
class ResponseSpec:
    """The responses of a model before data are bound."""

    names: list[str]
    errors: list[str]
    init: dict[str, float]  # a_<name> / b_<name> -> initial value
    dvid: dict[str, float] | None  # explicit response -> DVID value
    outcomes: dict[str, Any] = field(default_factory=dict)  # non-Gaussian responses: name -> Outcome (after names)

    @property
    def all_names(self) -> list[str]:
        """Every response: the Gaussian ones (``error=``), then the non-Gaussian ones (``outcome=``)."""
        return list(self.names) + list(self.outcomes)

    @property
    def predicted(self) -> list[str]:
        """The responses the structural model predicts (every one but a time-to-event outcome's)."""
        return list(self.names) + [n for n, o in self.outcomes.items() if o.uses_prediction]


def parse(error: dict[str, str], error_init: dict[str, Any] | None, dvid: dict[str, Any] | None,
          outcomes: dict[str, Any] | None = None) -> ResponseSpec:
    """``error={response: model}``, ``error_init={response: {"a": ..}}`` or flat ``{"a_<response>": ..}``;
    ``outcomes``: the non-Gaussian responses of a joint model (name -> Outcome)."""
    names = [str(k) for k in error]
    outcomes = dict(outcomes or {})
    if len(names) + len(outcomes) < 1:
        raise ModelSpecificationError("error={...}: give at least one response -> error model")
    both = sorted(set(names) & set(outcomes))
    if both:
        raise ModelSpecificationError(f"response(s) {both} given both an error model and an outcome")
    errors = [str(v).lower() for v in error.values()]
    bad = {n: e for n, e in zip(names, errors, strict=True) if e not in ERRORS}
    if bad:
        raise ModelSpecificationError(f"error models of several responses must be one of {ERRORS}; got {bad}")
    init: dict[str, float] = {}
    for name, err in zip(names, errors, strict=True):
        if err in ("constant", "combined"):
            init[f"a_{name}"] = 1.0
        if err in ("proportional", "combined"):
            init[f"b_{name}"] = 0.3
    for key, value in (error_init or {}).items():
        items = ({f"{k}_{key}": v for k, v in value.items()} if isinstance(value, dict) else {str(key): value})
        for k, v in items.items():
            if k not in init:
                raise ModelSpecificationError(f"error_init: {k!r} is not a residual parameter of the responses "
                                              f"(they are {sorted(init)})")
            if not float(v) > 0:
                raise ModelSpecificationError(f"error_init: {k} must be > 0, got {v}")
            init[k] = float(v)
    if dvid is not None:
        every = names + list(outcomes)
        missing = [n for n in every if n not in dvid]
        if missing or len(dvid) != len(every):
            raise ModelSpecificationError(f"dvid= must give one DVID value per response {every}; got {dvid}")
        dvid = {str(k): float(v) for k, v in dvid.items()}
    return ResponseSpec(names, errors, init, dvid, outcomes)


@dataclass
class Responses:
    """A bound multi-response structure (backend arrays on the model's device)."""

    spec: ResponseSpec
    column: str
    values: list[float]  # DVID value of each response
    index: Any  # [N, T] response index of each observation
    counts: list[int]  # n_r: observations (uncensored) per response
    onehot: Any  # [R, N, T] 1.0 where the observation belongs to response r

    @property
    def names(self) -> list[str]:
        """The Gaussian responses (a residual error model each; the first ``len(names)`` response indices)."""
        return self.spec.names

    @property
    def all_names(self) -> list[str]:
        return self.spec.all_names


def response_column(df: Any, column: str | None) -> str:
    """The response column: ``column``, else ``DVID``, else ``YTYPE``."""
    if column is not None:
        if column not in df.columns:
            raise DataError(f"the response column {column!r} is not in the data (columns {list(df.columns)})")
        return column
    for c in RESPONSE_COLUMNS:
        if c in df.columns:
            return c
    raise DataError(f"several responses need a response column ({' or '.join(RESPONSE_COLUMNS)}, or response='...'); "
                    f"the data have {list(df.columns)}")


def bind(model: Any, data: Any, column: str) -> Responses:
    """Response index of every observation from the column (read as a per-observation regressor)."""
    spec, ops = model.response_spec, model.ops
    values = np.asarray(data.regressors[column], dtype=float)
    mask = data.mask
    seen = np.unique(values[mask])
    if spec.dvid is not None:
        levels = [spec.dvid[n] for n in spec.all_names]
    else:
        if len(seen) > len(spec.all_names):
            raise DataError(f"the response column {column!r} has values {seen.tolist()} but the model has "
                            f"{len(spec.all_names)} responses {spec.all_names}; give dvid={{response: value}}")
        levels = sorted(seen.tolist())[:len(spec.all_names)]
        if len(levels) < len(spec.all_names):
            raise DataError(f"the response column {column!r} has values {seen.tolist()}: no observation of "
                            f"{spec.all_names[len(levels):]} (give dvid={{response: value}})")
    unknown = sorted(set(seen.tolist()) - set(levels))
    if unknown:
        raise DataError(f"the response column {column!r} has values {unknown} that match no response "
                        f"({dict(zip(spec.all_names, levels, strict=True))})")
    index = np.zeros(mask.shape, dtype=np.int64)
    for r, v in enumerate(levels):
        index[values == v] = r
    uncens = mask & (data.cens == 0)
    counts = [int((uncens & (index == r)).sum()) for r in range(len(levels))]
    empty = [n for n, c in zip(spec.all_names, counts, strict=True) if c == 0]
    if empty:
        raise DataError(f"no (uncensored) observation of the response(s) {empty}")
    onehot = np.stack([(index == r) & mask for r in range(len(levels))]).astype(float)
    return Responses(spec, column, [float(v) for v in levels], ops.asarray(index), counts, ops.asarray(onehot))


def params(model: Any, spec: ResponseSpec) -> dict[str, ParamInfo]:
    """``a_<response>`` / ``b_<response>`` (closed form for constant and proportional errors without censoring)."""
    ops, xp = model.ops, model.ops.xp
    out = {}
    for name, err in zip(spec.names, spec.errors, strict=True):
        closed = err != "combined" and not model.has_censoring
        for k in ("a", "b"):
            key = f"{k}_{name}"
            if key in spec.init:
                out[key] = ParamInfo(key, ops.asarray(spec.init[key]), xp.log, xp.exp, closed_form=closed,
                                     meta={"role": "error", "response": name})
    return out


def stack(pred: Any, resp: Responses, xp: Any) -> Any:
    """The structural model's outputs as ``[R, ..., N, T]`` (dict by name, or tuple / list in response order) for
    the predicted responses (:attr:`ResponseSpec.predicted`)."""
    names = resp.spec.predicted
    if isinstance(pred, dict):
        missing = [n for n in names if n not in pred]
        if missing:
            raise ModelSpecificationError(f"the structural model returned {sorted(pred)}; the responses are "
                                          f"{names} (missing {missing})")
        return [pred[n] for n in names]
    if isinstance(pred, (tuple, list)):
        if len(pred) != len(names):
            raise ModelSpecificationError(f"the structural model returned {len(pred)} outputs for the "
                                          f"{len(names)} responses {names}")
        return list(pred)
    raise ModelSpecificationError(f"with several responses {names} the structural model must return a dict "
                                  f"{{response: prediction}} or a tuple, got {type(pred).__name__}")


def wrap(fn: Any, model: Any) -> Any:
    """``fn(psi, design)`` -> the per-observation prediction of each observation's response (the design's units
    are found from its response regressor column)."""
    resp = model._resp
    levels = [resp.values[resp.all_names.index(n)] for n in resp.spec.predicted]

    def selected(psi: dict[str, Any], d: Design) -> Any:
        xp = d.xp
        outs = stack(fn(psi, d), resp, xp)
        col = d.regressors[resp.column]
        out = outs[0]
        for r in range(1, len(outs)):
            out = xp.where(col == levels[r], outs[r], out)
        return out

    return selected


def error_sd(theta: dict[str, Any], f: Any, resp: Responses, units: Any, ops: Any) -> Any:
    """``sqrt(a_r² + b_r² f²)`` per observation (a_r = 0 for a proportional error, b_r = 0 for a constant one)."""
    xp = ops.xp
    zero = 0.0 * f
    a = zero
    b = zero
    onehot = resp.onehot if units is None else ops.take(resp.onehot, units, 1)
    for r, name in enumerate(resp.names):
        if f"a_{name}" in theta:
            a = a + onehot[r] * theta[f"a_{name}"]
        if f"b_{name}" in theta:
            b = b + onehot[r] * theta[f"b_{name}"]
    var = a * a + (b * f) ** 2
    # padding observations and a joint model's non-Gaussian ones (no error model): sd 1, masked later (the variance
    # replaced before the square root, whose derivative at 0 would make the gradients NaN)
    return xp.sqrt(xp.where(var > 0, var, 1.0))


def stats(model: Any, theta: dict[str, Any], f: Any, units: Any) -> dict[str, Any]:
    """Per response with a closed-form error: ``Σ_j res_ij²`` over its observations, ``[..., n, R]``."""
    resp, ops, xp = model._resp, model.ops, model.ops.xp
    y = model._take(model._y, units)
    mask = model._take(model._uncens_mask, units)
    onehot = resp.onehot if units is None else ops.take(resp.onehot, units, 1)
    cols = []
    for r, err in enumerate(resp.spec.errors):
        res = (y - f) / f if err == "proportional" else y - f
        cols.append(xp.sum(xp.where(mask & (onehot[r] > 0), res * res, 0.0), -1))
    return {"rss_resp": xp.stack(cols, -1)}


def m_step(s: dict[str, Any], model: Any, num_units: int) -> dict[str, Any]:
    """``a_r`` or ``b_r`` = sqrt(S_r / n_r) for constant / proportional errors (n_r scaled to ``num_units``)."""
    resp, xp = model._resp, model.ops.xp
    scale = num_units / model.num_units
    out = {}
    for r, (name, err) in enumerate(zip(resp.names, resp.spec.errors, strict=True)):
        key = {"constant": f"a_{name}", "proportional": f"b_{name}"}.get(err)
        if key is not None and model.params[key].closed_form:
            out[key] = xp.sqrt(s["rss_resp"][r] / (resp.counts[r] * scale))
    return out


# ----- library: joint PK/PD --------------------------------------------------------------------------------
def _divided(xp: Any, lam: Any, mu: Any, t: Any) -> Any:
    """``(e^{−λt} − e^{−μt}) / (μ − λ)``, with μ − λ kept away from 0 (relative 1e-7)."""
    diff = mu - lam
    tol = 1e-7 * lam
    safe = xp.where(xp.abs(diff) < tol, tol, diff)
    return (xp.exp(-lam * t) - xp.exp(-(lam + safe) * t)) / safe


def _oral_effect_imax(psi: dict[str, Any], d: Design) -> dict[str, Any]:
    xp = d.xp
    if d.dose_ss is not None or d.has_infusion or d.central_cmt:
        raise DataError("oral_effect_imax: steady-state (SS), infusion and central (CMT = 2) doses are not "
                        "supported; use an ODE model")
    tau, amt, _ = _dose_terms(d)
    ka, v, cl, ke0 = _p(psi, "ka", d), _p(psi, "V", d), _p(psi, "CL", d), _p(psi, "ke0", d)
    t, valid = _time_since(d, tau, amt)
    k = cl / v
    conc = amt * ka / v * _divided(xp, k, ka, t)
    # Ce = ke0 ∫ C(s) e^{−ke0 (t−s)} ds = amt ka ke0 / V · [g(k, ke0) − g(ka, ke0)] / (ka − k)
    diff = ka - k
    tol = 1e-7 * k
    safe = xp.where(xp.abs(diff) < tol, tol, diff)
    ce = amt * ka * ke0 / v * (_divided(xp, k, ke0, t) - _divided(xp, k + safe, ke0, t)) / safe
    conc, ce = _superpose(xp, conc, valid, d), _superpose(xp, ce, valid, d)
    e0, imax, ic50 = psi["E0"], psi["Imax"], psi["IC50"]
    return {"conc": conc, "effect": e0 * (1.0 - imax * ce / (ic50 + ce))}


def oral_effect_imax() -> Structural:
    """Joint PK/PD (warfarin-style): one-compartment oral PK ``C`` (ka, V, CL), an effect compartment
    ``dCe/dt = ke0 (C − Ce)`` and an inhibitory effect ``E = E0 (1 − Imax Ce / (IC50 + Ce))``; returns
    ``{"conc": C, "effect": E}`` in closed form (superposed over bolus doses into the depot)."""
    return Structural("oral_effect_imax", ("ka", "V", "CL", "ke0", "E0", "Imax", "IC50"), _oral_effect_imax,
                      uses_doses=True)


__all__ = ["ERRORS", "RESPONSE_COLUMNS", "ResponseSpec", "Responses", "oral_effect_imax", "parse"]
