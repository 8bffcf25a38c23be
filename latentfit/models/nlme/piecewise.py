"""Occasions chained exactly in the closed-form library models: parameters switch at the occasion boundary and the
compartment amounts carry over (Monolix's and NONMEM's inter-occasion variability).

Within occasion k (from its start ``b_k``, the time of its first record, to ``b_{k+1}``) the linear system
``dA/dt = M_k A + u(t)`` evolves with occasion k's parameters, so for ``t`` in occasion k

    A(t) = Σ_{doses d of occasion k} A_d(t; ψ_k) + e^{M_k (t − b_k)} A(b_k),

where ``A_d`` is the usual closed-form response to a dose (bolus, infusion, steady state; the amounts in every
compartment) and the carried amounts ``A(b_k)`` are the same expression at ``b_k`` under occasion k−1's
parameters (a recursion over the few occasions, vectorised over individuals and chains).  An infusion still running
at ``b_k`` is split there: its remainder is an infusion of occasion k.  The amount in compartment ``j`` after a
unit amount in compartment ``i`` is a sum of exponentials ``Σ_l c_l e^{−λ_l s}`` (:data:`SYSTEMS`):

* one compartment (``k = CL/V``): ``e^{−ks}``;
* two compartments (``k10 = CL/V1``, ``k12 = Q/V1``, ``k21 = Q/V2``, macro-constants α > β):
  ``e^{Ms} = [(M + βI) e^{−αs} − (M + αI) e^{−βs}] / (β − α)`` (Sylvester), e.g. central → peripheral
  ``k12 (e^{−βs} − e^{−αs})/(α − β)``;
* first-order absorption (depot → compartment j): the convolution ``ka e^{−ka s} ⋆ Σ_l c_l e^{−λ_l s} =
  Σ_l ka c_l (e^{−λ_l s} − e^{−ka s})/(ka − λ_l)`` (ka − λ_l kept from 0 as in the Bateman function).

The prediction is the central amount over the occasion's volume.  A reset (``EVID`` 3/4, ``SS = 1``) empties the
compartments, so nothing carries across one.  An observation takes the occasion in force at its time (at a time
shared by the end of one occasion and the start of the next: the new one).  Checked against the ODE path
(``nlme.ode``, adaptive solver at tight tolerances) in ``tests/test_nlme_occasions.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from .structural import _central_iv, _macro


def _one(p: dict[str, Any], xp: Any) -> dict[tuple[int, int], list]:
    return {(0, 0): [(1.0, p["CL"] / p["V"])]}


def _two(p: dict[str, Any], xp: Any) -> dict[tuple[int, int], list]:
    v1 = p["V1"]
    k12 = p["Q"] / v1
    alpha, beta, k21 = _macro(xp, p["CL"], v1, p["Q"], p["V2"])
    den = alpha - beta
    return {(0, 0): [((alpha - k21) / den, alpha), ((k21 - beta) / den, beta)],
            (0, 1): [(-k12 / den, alpha), (k12 / den, beta)],
            (1, 0): [(-k21 / den, alpha), (k21 / den, beta)],
            (1, 1): [((k21 - beta) / den, alpha), ((alpha - k21) / den, beta)]}


def _with_depot(inner: dict[tuple[int, int], list], ka: Any, xp: Any) -> dict[tuple[int, int], list]:
    """A depot (state 0, first-order absorption ``ka`` into the inner system's compartment 0) before the system."""
    out: dict[tuple[int, int], list] = {(0, 0): [(1.0, ka)]}
    for (i, j), terms in inner.items():
        out[(i + 1, j + 1)] = terms
        if i == 0:
            conv = []
            for c, lam in terms:
                diff = ka - lam
                tol = 1e-7 * lam
                safe = xp.where(xp.abs(diff) < tol, tol, diff)
                conv += [(ka * c / safe, lam), (-ka * c / safe, lam + safe)]
            out[(0, j + 1)] = conv
    return out


#: ``carry`` key of a library model -> (unit responses ``(psi, xp) -> {(from, to): [(c, λ)]}``, number of states,
#: central state, volume parameter, first-order absorption, infusions honoured)
SYSTEMS: dict[str, tuple[Any, int, int, str, bool, bool]] = {
    "one_compartment_bolus": (_one, 1, 0, "V", False, False),
    "one_compartment_infusion": (_one, 1, 0, "V", False, True),
    "one_compartment_oral": (lambda p, xp: _with_depot(_one(p, xp), p["ka"], xp), 2, 1, "V", True, True),
    "two_compartment_bolus": (_two, 2, 0, "V1", False, False),
    "two_compartment_infusion": (_two, 2, 0, "V1", False, True),
    "two_compartment_oral": (lambda p, xp: _with_depot(_two(p, xp), p["ka"], xp), 3, 1, "V1", True, True),
}


def occasion_index(d: Any, t: Any, seg: Any) -> Any:
    """Occasion in force at the points ``(period seg, time t)`` ``[N, P]``: the number of later occasions started
    by then (float)."""
    xp = d.xp
    start, oseg, ok = d.occ_start[:, None, :], d.occ_seg[:, None, :], d.occ_valid[:, None, :] > 0
    after = ok & ((seg[..., None] > oseg) | ((seg[..., None] == oseg) & (t[..., None] >= start)))
    return xp.sum(xp.where(after, 1.0, 0.0), -1)


def _exp_sum(xp: Any, terms: list, s: Any) -> Any:
    out = 0.0
    for c, lam in terms:
        out = out + c * xp.exp(-lam * s)
    return out


def predict(key: str, psi: dict[str, Any], d: Any) -> Any:
    """Piecewise predictions ``[..., N, T]`` of the library model ``key`` (:data:`SYSTEMS`) from the parameters of
    every occasion ``psi[name] [..., K, N, 1]`` and the design ``d`` with its occasion starts (module docstring)."""
    unit, n_states, central, vol, oral, infusions = SYSTEMS[key]
    xp = d.xp
    k_occ = next(iter(psi.values())).shape[-3]
    zeros_t = 0.0 * d.time
    obs_seg = zeros_t if d.obs_seg is None else d.obs_seg
    zeros_d = 0.0 * d.dose_time
    dose_seg = zeros_d if d.dose_seg is None else d.dose_seg
    rate = d.dose_rate if infusions else zeros_d
    is_inf = (d.dose_amt > 0) & (rate > 0)
    t_end = xp.where(is_inf, d.dose_time + d.dose_amt / xp.where(is_inf, rate, 1.0), d.dose_time)
    dose_occ = occasion_index(d, d.dose_time, dose_seg)  # [N, D]
    obs_occ = occasion_index(d, d.time, obs_seg)  # [N, T]
    if oral and d.central_cmt and d.dose_cmt is not None:
        src = xp.where(d.dose_cmt == 2, 1.0, 0.0) + zeros_d  # [N, D] 1: central, 0: depot
    else:
        src = zeros_d + (0.0 if oral else float(central))
    ss = (zeros_d, zeros_d) if d.dose_ss is None else (d.dose_ss, d.dose_ii)

    simple = d.dose_ss is None and not (infusions and d.has_infusion)  # boluses only: Σ c e^{−λt} per dose
    n_obs = d.time.shape[-1]
    # every occasion at once (a leading axis K): occasion k's doses (and the remainder of infusions still running at
    # its start b_k) at the observations and at every start, under occasion k's parameters
    occ_ids = [float(k) for k in range(k_occ)]
    first = 0.0 * d.time[:, :1]
    b = xp.stack([first] + [d.occ_start[:, k:k + 1] for k in range(k_occ - 1)])  # [K, N, 1] (b_0 unused)
    bs = xp.stack([first - 1.0] + [d.occ_seg[:, k:k + 1] for k in range(k_occ - 1)])
    ok = xp.stack([first > 0.0] + [d.occ_valid[:, k:k + 1] > 0 for k in range(k_occ - 1)])  # b_0: no carry
    kcol = xp.stack([first + v for v in occ_ids])  # [K, N, 1]
    cont = ok & is_inf & (dose_occ < kcol) & (dose_seg == bs) & (t_end > b)  # [K, N, D]
    t_dose = xp.where(cont, b + zeros_d, d.dose_time)
    amt = xp.where(cont, rate * (t_end - b), xp.where(dose_occ == kcol, d.dose_amt, 0.0))
    ss_code = xp.where(cont, 0.0, ss[0])
    t_eval = xp.concatenate([d.time, d.occ_start], -1)  # [N, P = T + K - 1]
    seg_eval = xp.concatenate([obs_seg, d.occ_seg], -1)
    p4 = {nm: v[..., None] for nm, v in psi.items()}  # [..., K, N, 1, 1]
    terms = unit(p4, xp)
    tau = t_eval[:, :, None] - t_dose[:, :, None, :]  # [K, N, P, D]
    a = amt[:, :, None, :]
    if d.obs_rank is None:
        given = tau >= 0
    else:  # at an observation's time, the doses listed before it (NONMEM's record order); at an occasion's start
        # every dose of the earlier occasions (a continued infusion: ranked first)
        rank_eval = xp.concatenate([d.obs_rank, 0.0 * d.occ_start + float("inf")], -1)  # [N, P]
        rank_d = xp.where(cont, -float("inf"), d.dose_rank)  # [K, N, D]
        given = (tau > 0) | ((tau == 0) & (rank_d[:, :, None, :] < rank_eval[:, :, None]))
    valid = given & (a > 0) & (seg_eval[:, :, None] == dose_seg[:, None, :])
    t = xp.where(valid, tau, 0.0)
    shim = SimpleNamespace(xp=xp, single_dose=False, dose_ss=None if d.dose_ss is None else ss_code,
                           dose_ii=None if d.dose_ss is None else ss[1])  # as _central_iv reads them
    r, s_d = rate[:, None, :], src[:, None, :]
    decay: dict[int, Any] = {}  # e^{−λt} once per rate constant

    def response(pairs: list) -> Any:
        if not simple:
            return _central_iv(shim, a, r, pairs, t)
        out = 0.0
        for c, lam in pairs:
            if id(lam) not in decay:
                decay[id(lam)] = xp.exp(-lam * t)
            out = out + c * decay[id(lam)]
        return a * out

    amounts = []  # [..., K, N, P] per state
    for j in range(n_states):
        total = 0.0
        for i in ((0, central) if oral else (central,)):
            if (i, j) in terms:
                total = total + xp.where(valid & (s_d == float(i)), response(terms[(i, j)]), 0.0)
        amounts.append(xp.sum(total + 0.0 * t, -1))
    # the carried amounts' responses e^{M_k (t − b_k)} at the same points (0 where a reset came in between)
    same = (seg_eval == bs) & ok  # [K, N, P]
    el = xp.where(same, t_eval - b, 0.0)
    terms = unit(psi, xp)  # [..., K, N, 1]
    carry = {ij: xp.where(same, _exp_sum(xp, pairs, el), 0.0) for ij, pairs in terms.items()}
    # the recursion over the occasions: x = amounts at b_k carried in from occasion k−1
    pred, x = None, None
    for k in range(k_occ):
        amt_k = [a_j[..., k, :, :] for a_j in amounts]  # [..., N, P]
        if k > 0:
            amt_k = [a_j + sum(x[i][..., None] * carry[(i, j)][..., k, :, :] for i in range(n_states)
                               if (i, j) in carry) for j, a_j in enumerate(amt_k)]
        conc = amt_k[central][..., :n_obs] / psi[vol][..., k, :, :]
        pred = conc if pred is None else xp.where(obs_occ == float(k), conc, pred)
        if k < k_occ - 1:
            nok = d.occ_valid[:, k] > 0
            x = [xp.where(nok, a_j[..., n_obs + k], 0.0) for a_j in amt_k]
    return pred


__all__ = ["SYSTEMS", "occasion_index", "predict"]
