"""Inter-occasion variability (IOV): κ random effects per (individual, occasion), as in Monolix and NONMEM.

    φ_ijk = C_i β + η_i + κ_ik,   η_i ~ N(0, Ω),   κ_ik ~ N(0, Γ),   Γ = diag(γ²_1, ..., γ²_q),

for the observations j of occasion k of individual i (the ``OCC`` column; Monolix's "occasion" level of
variability, NONMEM's ``ETA`` per occasion with ``SAME`` blocks).  Only the parameters named in ``iov=`` get a κ;
the others vary between individuals only.

Latent layout.  The latent of individual i is ``z_i = (φ_i [d], κ_i [q, K])`` flattened to ``d + q·K`` columns
(``K`` = most occasions of one individual; an individual with fewer occasions has padding slots whose κ follow
their prior N(0, γ²), which is independent of the data, so they change neither the likelihood nor the M-step).
The engines' MCMC kernels (prior IMH, component-wise and block random walks) and the f-SAEM / linearisation
Gaussian faces therefore sample and use κ like any other latent coordinate, vectorised over individuals and
occasions.

Complete-data sufficient statistic of Γ: ``S_q = Σ_i Σ_{k ≤ K_i} κ_ikq²``; closed-form M-step
``γ²_q = S_q / Σ_i K_i`` (the complete-data log-likelihood factorises into p(φ_i; β, Ω) Π_k p(κ_ik; Γ) p(y | φ, κ),
so β and Ω keep saemix's M-step on the φ part).

Predictions.  Occasion k lasts from its first record (dose, observation or other row, ``b_k``) to the first
record of occasion k+1; within it the system evolves with occasion k's parameters, and the compartment amounts at
``b_{k+1}`` carry into occasion k+1 (Monolix's and NONMEM's semantics).  When nothing carries (every occasion
starts with a reset, ``EVID`` 3/4 or ``SS = 1``, or no dose acts on a later occasion's observations), the
structural model is evaluated once per occasion with that occasion's parameters (an extra leading batch axis of
size K, so library, user and ODE models work unchanged), and each observation takes the prediction of its own
occasion: the fast path, exact there.  Otherwise (:func:`bind_carry`) the library's linear models chain the
occasions in closed form (:mod:`~latentfit.models.nlme.piecewise`), ODE models integrate each occasion from the
previous one's state with its own parameters, and other models (user functions, lag times, the joint PK/PD) are
refused.  Occasions must follow each other in time within an individual (the records of one occasion contiguous in
``(period, time)``); rows whose occasion has no observation belong to the occasion in force at their time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from latentfit.inference.model import DataError, LatentSite, ModelSpecificationError, ParamInfo
from latentfit.inference.ops import LOG_2PI

#: default initial inter-occasion variance γ² (φ scale)
GAMMA2_INIT = 0.25
#: default name of the occasion column (Monolix / NONMEM)
OCCASION_COLUMN = "OCC"
GAMMA2_FLOOR = 1e-12


def parse_iov(iov: Any, param_names: list[str]) -> dict[str, float]:
    """``iov=`` as ``{parameter: initial γ²}``: a name, a list of names (γ² = :data:`GAMMA2_INIT`) or a dict."""
    if iov is None:
        return {}
    if isinstance(iov, str):
        iov = [iov]
    out = ({str(k): float(v) for k, v in iov.items()} if isinstance(iov, dict)
           else {str(k): GAMMA2_INIT for k in iov})
    unknown = [k for k in out if k not in param_names]
    if unknown:
        raise ModelSpecificationError(f"iov: {unknown} not parameter(s) of the structural model ({param_names})")
    bad = {k: v for k, v in out.items() if not (np.isfinite(v) and v > 0)}
    if bad:
        raise ModelSpecificationError(f"iov: initial inter-occasion variances must be > 0, got {bad}")
    return out


@dataclass
class Occasions:
    """The bound occasion structure of an IOV model (backend arrays follow the model's device)."""

    names: list[str]  # parameters with a κ, in the order of the structural model
    column: str  # the occasion column
    num_occasions: int  # K: most occasions of one individual
    offset: int  # d: first latent column of κ
    occ: Any  # [N, T] occasion index 0..K-1 of each observation (padding: 0)
    valid: Any  # [N, K] 1.0 where individual i has occasion k, else 0.0
    embed: Any  # [q, m]: κ coordinates -> structural parameters
    total: int  # Σ_i K_i
    labels: np.ndarray  # [N, K] occasion values as in the data (NaN: padding)
    #: how drug carries from one occasion into the next (:func:`bind_carry`): None (fast path: nothing carries, or
    #: a stateless model), a key of :data:`~latentfit.models.nlme.piecewise.SYSTEMS` (closed form) or ``"ode"``
    carry: str | None = None

    @property
    def size(self) -> int:
        return len(self.names) * self.num_occasions


def bind(model: Any, data: Any, column: str) -> Occasions:
    """Occasion indices of the observations of ``data`` (the column was read as a per-observation regressor)."""
    ops = model.ops
    values = np.asarray(data.regressors[column], dtype=float)
    mask = data.mask
    if not np.isfinite(values[mask]).all():
        i, t = np.argwhere(mask & ~np.isfinite(values))[0]
        raise DataError(f"occasion column {column!r}: no value for ID {data.ids[i]!r} (observation {t})")
    ind, pos = np.nonzero(mask)
    frame = pd.DataFrame({"ind": ind, "occ": values[ind, pos]})
    rank = frame.groupby("ind")["occ"].rank(method="dense").to_numpy().astype(np.int64) - 1
    occ = np.zeros(mask.shape, dtype=np.int64)
    occ[ind, pos] = rank
    counts = np.zeros(mask.shape[0], dtype=np.int64)
    np.maximum.at(counts, ind, rank + 1)
    k_max = int(counts.max())
    valid = np.arange(k_max)[None, :] < counts[:, None]
    labels = np.full((mask.shape[0], k_max), np.nan)
    labels[ind, rank] = values[ind, pos]
    names = [n for n in model.param_names if n in model.iov_init]
    emb = np.zeros((len(names), len(model.param_names)))
    emb[np.arange(len(names)), [model.param_names.index(n) for n in names]] = 1.0
    return Occasions(names, column, k_max, model.latent_dim, ops.asarray(occ), ops.asarray(valid.astype(float)),
                     ops.asarray(emb), int(counts.sum()), labels)


def starts(data: Any, labels: pd.Series, occ: Occasions) -> tuple[np.ndarray, ...]:
    """Start of each occasion after the first, ``(time, period, valid, continuous)`` ``[N, K-1]`` (numpy): the
    ``(period, time)`` of its first record in the table, whose occasion column is ``labels`` (padding: the
    individual's last observation time, period -1, valid False); continuous: no reset between the last record of the
    occasion before and this start."""
    n, k_max = occ.labels.shape
    time = np.tile(data.time.max(-1, keepdims=True), (1, max(k_max - 1, 0)))
    seg, valid, cont = np.full_like(time, -1.0), np.zeros(time.shape, bool), np.zeros(time.shape, bool)
    if k_max < 2:
        return time, seg, valid, cont
    unit = np.asarray(data.record_unit)
    lab = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=float)
    keep = (unit >= 0) & np.isfinite(lab)
    u, t, s, lab = unit[keep], np.asarray(data.record_time)[keep], np.asarray(data.record_seg)[keep], lab[keep]
    hit = occ.labels[u] == lab[:, None]  # the individual's observed occasions (others: in force at their time)
    known = hit.any(1)
    u, t, s, rank = u[known], t[known], s[known], hit[known].argmax(1)
    order = np.lexsort((rank, t, s, u))
    u, t, s, rank = u[order], t[order], s[order], rank[order]
    back = (u[1:] == u[:-1]) & (rank[1:] < rank[:-1])
    if back.any():
        i = int(u[1:][back][0])
        raise DataError(f"occasion column {occ.column!r}: the occasions of ID {data.ids[i]!r} are not in time order "
                        f"(a record of occasion {occ.labels[i, rank[1:][back][0]]!r} after one of occasion "
                        f"{occ.labels[i, rank[:-1][back][0]]!r}): occasions must follow each other in time")
    first = np.r_[True, (u[1:] != u[:-1]) | (rank[1:] != rank[:-1])]
    last = np.r_[first[1:], True]
    fi, la = np.nonzero(first & (rank > 0))[0], np.nonzero(last)[0]
    time[u[fi], rank[fi] - 1] = t[fi]
    seg[u[fi], rank[fi] - 1] = s[fi]
    valid[u[fi], rank[fi] - 1] = True
    seg_last = np.full((n, k_max), -2.0)
    seg_last[u[la], rank[la]] = s[la]
    cont = valid & (seg == seg_last[:, :-1])
    return time, seg, valid, cont


def _occasion_at(t: np.ndarray, s: np.ndarray, start: np.ndarray, seg: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Occasion in force at ``(period s, time t) [N, P]`` (numpy)."""
    after = valid[:, None, :] & ((s[..., None] > seg[:, None, :])
                                 | ((s[..., None] == seg[:, None, :]) & (t[..., None] >= start[:, None, :])))
    return after.sum(-1)


def bind_carry(model: Any) -> None:
    """Choose how occasions chain (see the module docstring): the fast path when nothing carries, else the exact
    piecewise predictions (``model.design`` gains the occasion starts; ``model._structural_fn`` returns them,
    repeated along the occasion axis so that :func:`select` and the outcome models see the usual layout)."""
    from . import piecewise as _pw

    occ, data, ops = model._iov, model.data, model.ops
    start, seg, valid, cont = starts(data, model._table.column(occ.column), occ)
    if not cont.any():
        return  # every occasion starts with a reset (or one occasion): the per-occasion evaluation is exact
    mode = model.structural.carry
    if mode != "ode":  # closed forms and user functions: does a dose act on a later occasion's observations?
        real = data.dose_amt > 0
        d_seg = data.dose_seg if data.dose_seg is not None else np.zeros_like(data.dose_time)
        o_seg = data.obs_seg if data.obs_seg is not None else np.zeros_like(data.time)
        d_occ = _occasion_at(data.dose_time, d_seg, start, seg, valid)
        o_occ = _occasion_at(data.time, o_seg, start, seg, valid)
        acts = (real[:, None, :] & data.mask[:, :, None] & (d_seg[:, None, :] == o_seg[:, :, None])
                & (d_occ[:, None, :] < o_occ[:, :, None]))
        if mode == "stateless" or not acts.any():
            return
        if mode is None:
            raise ModelSpecificationError(
                f"iov: drug given in one occasion acts on the observations of a later one (no reset between them), "
                f"and the structural model {model.structural.name!r} cannot carry its state across the occasion "
                f"boundary with the new occasion's parameters; write it as an ODE model (nlme.ode(...)), which "
                f"integrates each occasion from the previous one's state, or use a library model "
                f"({sorted(_pw.SYSTEMS)}); data where every occasion starts with a reset (EVID 4) fit any model")
        if data.dose_ss is not None:
            ss_inf = real & (data.dose_ss > 0) & (data.dose_rate > 0)
            end = data.dose_time + np.where(ss_inf, data.dose_amt / np.where(ss_inf, data.dose_rate, 1.0), 0.0)
            crosses = ss_inf & (_occasion_at(end, d_seg, start, seg, valid) > d_occ)
            if crosses.any():
                i = int(np.argwhere(crosses)[0][0])
                raise DataError(f"iov: a steady-state infusion of ID {data.ids[i]!r} runs into the next occasion; "
                                f"this is not supported (start the occasion with a reset, or use an ODE model)")
    if model._resp is not None and mode != "ode":  # an ODE model's responses come from the one chained integration
        raise ModelSpecificationError("iov with several responses: drug carries across an occasion boundary (no "
                                      "reset), which is supported for single-response models and ODE models "
                                      "(nlme.ode, observe returning every response) only")
    model.design = dataclasses.replace(model.design, occ_start=ops.asarray(start), occ_seg=ops.asarray(seg),
                                       occ_valid=ops.asarray(valid.astype(float)))
    model._structural_fn = chained(model._structural_fn, mode, occ.num_occasions)
    occ.carry = mode


def chained(base: Any, mode: str, k_occ: int) -> Any:
    """The exact piecewise predictions of occasions that carry drug into the next (``mode``: ``"ode"``, ``base``
    integrating each occasion from the previous one's state, or a key of
    :data:`~latentfit.models.nlme.piecewise.SYSTEMS`), on a design with the occasions' starts; repeated along an
    occasion axis of size ``k_occ`` so that :func:`select` and the outcome models see the usual layout."""
    from . import piecewise as _pw

    def piecewise(psi: dict[str, Any], d: Any) -> Any:
        pred = base(psi, d) if mode == "ode" else _pw.predict(mode, psi, d)
        shape = tuple(pred.shape[:-2]) + (k_occ,) + tuple(pred.shape[-2:])
        return d.xp.broadcast_to(pred[..., None, :, :], shape)

    return piecewise


def latent_sites(occ: Occasions) -> list[LatentSite]:
    """One site ``kappa_<name>`` of K coordinates per parameter with IOV, after the d η columns."""
    k = occ.num_occasions
    return [LatentSite(f"kappa_{nm}", (k,), occ.offset + j * k, k, kind="gaussian") for j, nm in enumerate(occ.names)]


def params(model: Any, occ: Occasions) -> dict[str, ParamInfo]:
    """``gamma2_<name>``: inter-occasion variances (closed-form M-step, annealed like the ω²)."""
    ops, xp = model.ops, model.ops.xp
    return {f"gamma2_{nm}": ParamInfo(f"gamma2_{nm}", ops.asarray(model.iov_init[nm]), xp.log, xp.exp,
                                      closed_form=True, anneal="var", meta={"role": "gamma"}) for nm in occ.names}


def gamma2(theta: dict[str, Any], occ: Occasions, xp: Any) -> Any:
    """``[γ²_1, ..., γ²_q]``."""
    return xp.stack([theta[f"gamma2_{nm}"] for nm in occ.names])


def split(z: Any, occ: Occasions) -> tuple[Any, Any]:
    """``z [..., n, d + qK]`` -> ``(φ part [..., n, d], κ [..., n, q, K])``."""
    d = occ.offset
    kappa = z[..., d:]
    return z[..., :d], kappa.reshape(tuple(kappa.shape[:-1]) + (len(occ.names), occ.num_occasions))


def phi_by_occasion(phi: Any, kappa: Any, occ: Occasions, xp: Any) -> Any:
    """``φ_ik = φ_i + κ_ik`` in all m parameters: ``φ [..., n, m]``, ``κ [..., n, q, K]`` -> ``[..., K, n, m]``."""
    kap = xp.moveaxis(kappa, -1, -3)  # [..., K, n, q]
    return phi[..., None, :, :] + kap @ occ.embed


def select(pred: Any, occ: Occasions, units: Any, ops: Any, index: Any = None) -> Any:
    """Each observation's prediction at its own occasion: ``[..., K, n, T]`` -> ``[..., n, T]`` (``index [n, T]``:
    the occasion of other points, e.g. a fine grid's; default the observations')."""
    xp = ops.xp
    idx = index if index is not None else occ.occ if units is None else ops.take(occ.occ, units, 0)
    out = pred[..., 0, :, :]
    for k in range(1, occ.num_occasions):  # K occasions (a handful), not a loop over data
        out = xp.where(idx == k, pred[..., k, :, :], out)
    return out


def log_prior(theta: dict[str, Any], kappa: Any, occ: Occasions, xp: Any) -> Any:
    """``Σ_q Σ_k log N(κ_ikq; 0, γ²_q)`` over every slot (padding slots included: their prior is proper)
    ``[..., n]``."""
    var = gamma2(theta, occ, xp)[:, None]  # [q, 1]
    k = occ.num_occasions
    return (-0.5 * xp.sum(kappa * kappa / var, (-2, -1))
            - 0.5 * k * xp.sum(xp.log(var)) - 0.5 * occ.size * LOG_2PI)


def sample(theta: dict[str, Any], key: Any, lead: tuple[int, ...], occ: Occasions, ops: Any) -> Any:
    """Prior draws of κ, flattened ``[*lead, qK]`` (``lead`` = chains, units)."""
    sd = moments_sd(theta, occ, ops.xp)
    return ops.normal(key, tuple(lead) + (occ.size,)) * sd


def moments_sd(theta: dict[str, Any], occ: Occasions, xp: Any) -> Any:
    """Prior sd of the flattened κ columns ``[qK]`` (γ_q repeated K times)."""
    g = xp.sqrt(gamma2(theta, occ, xp))
    return xp.reshape(g[:, None] * xp.ones_like(occ.valid[0])[None, :], (occ.size,))


def stats(kappa: Any, occ: Occasions, units: Any, ops: Any) -> dict[str, Any]:
    """``Σ_{k ≤ K_i} κ_ikq²`` per individual, ``[..., n, q]``."""
    valid = occ.valid if units is None else ops.take(occ.valid, units, 0)
    return {"kappa2": ops.xp.sum(kappa * kappa * valid[..., None, :], -1)}


def m_step(s: dict[str, Any], occ: Occasions, num_units: int, num_units_bound: int, xp: Any) -> dict[str, Any]:
    """``γ²_q = S_q / Σ_i K_i`` (``Σ_i K_i`` scaled to ``num_units`` when the statistics cover another count)."""
    total = occ.total * (num_units / num_units_bound)
    g2 = xp.clip(s["kappa2"] / total, GAMMA2_FLOOR)
    return {f"gamma2_{nm}": g2[j] for j, nm in enumerate(occ.names)}


def unpack(kappa: Any, occ: Occasions) -> dict[str, Any]:
    """``{"kappa_<name>": [..., n, K]}``."""
    return {f"kappa_{nm}": kappa[..., j, :] for j, nm in enumerate(occ.names)}


__all__ = ["GAMMA2_INIT", "OCCASION_COLUMN", "Occasions", "bind", "parse_iov"]
