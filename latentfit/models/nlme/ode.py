"""ODE structural models: batched fixed-step Runge–Kutta with NONMEM dose events, backend-neutral.

``ode(rhs, parameters, num_states=..., observe=...)`` turns a right-hand side

    dx/dt = rhs(t, x, psi, xp) + u(t),     x(t0) = initial(psi, xp) (default 0),

into a :class:`~latentfit.models.nlme.structural.Structural` usable by :class:`NLME` like the closed-form
library (and, written with ``xp`` operations, on both backends).  ``x`` is a tuple of ``num_states`` arrays
``[..., N]`` (leading chain dims allowed), ``psi`` a dict of ``[..., N]`` arrays, and the prediction at an
observation time is ``observe(x, psi, xp)`` (several responses of a joint model, e.g. PK and
an indirect-response PD: a dict ``{response: [..., N]}`` or a tuple in the responses' order, integrated once).

Doses follow the data: a bolus (``RATE`` 0) adds ``AMT`` to compartment ``CMT`` (1-based; or
``dose_compartment`` for every dose) at its time; an infusion adds the zero-order input
``u_CMT = RATE`` on ``[t_d, t_d + AMT/RATE)``.  For every individual the dose times, the infusion ends
and the observation times are merged and sorted (at equal times in the table's order, as NONMEM and the
closed forms: an observation listed before a same-time dose is read before it), and each interval between
consecutive events is integrated with classical RK4 steps (local error O(h⁵)) of at most ``max_step``
(default: the longest event-to-event span over 200); the input is constant on each interval since every
discontinuity is an event.  Explicit RK4 is stable for ``|λ|·h ≤ 2.78`` (λ the fastest rate constant, e.g. ka):
pass a smaller ``max_step`` for fast processes.  All individuals are integrated at once (their own step sizes),
so the only Python loops are over events and substeps, never over individuals.

NONMEM records (see :func:`~latentfit.models.nlme.data.read_nonmem`): additional doses (``ADDL``/``II``) arrive
expanded; a reset (``EVID`` 3/4, ``SS = 1``) starts a new period, whose events come after the earlier period's
(the time may restart): at the first event of a period the states return to ``initial``, earlier infusions stop
and no state carries over the change.  A steady-state dose (``SS`` 1 or 2, interval ``τ = II``) first
integrates ``ss_periods`` dosing intervals of the same dose from the initial state (each: the bolus, or the
infusion over its duration ``D ≤ τ``, then the rest of ``τ``, with RK4 steps of at most ``max_step``), which
approaches the pre-dose steady state geometrically, ``x_j = x_∞ − Σ_m c_m e^{−λ_m j τ}``; the last three
iterates are extrapolated by Aitken's Δ² (exact once the slowest mode alone is left, i.e. the faster modes'
``e^{−λ·ss_periods·τ}`` are negligible; nonlinear systems converge the same way near their steady state), so long
half-lives (``λ_min τ`` small) need no more periods; raise ``ss_periods`` when a fast mode is not yet gone.
``SS = 1`` takes that state, ``SS = 2`` adds it to the current state (superposition, exact for linear systems);
then the dose itself is given.

Event times come from the data, so
a lag time must be written into ``rhs``/``observe`` rather than into the dose times.

Occasions (IOV, :mod:`~latentfit.models.nlme.occasions`) whose drug carries into the next occasion: the design holds
each occasion's start and the parameters come per occasion (``[..., K, N, 1]``); every interval between events is
integrated with the parameters of the occasion in force at its start, from the state reached at the end of the one
before (the occasion starts are records, hence events), and each output is observed with its event's occasion.

``solver="adaptive"`` or ``"stiff"`` replaces the RK4 steps by error-controlled solvers from diffrax (JAX:
``Tsit5``, and the implicit ``Kvaerno5`` for stiff systems such as target-mediated disposition) or on torch
(torchdiffeq's ``dopri5``; for ``"stiff"`` the library's RODAS4, a Rosenbrock method) with tolerances
``rtol``/``atol``, on the same events (one solve per interval for all individuals at once; doses and resets as jumps
of the state; steady-state doses: RK4 only), differentiable in
reverse and forward mode; the backend code lives in :mod:`latentfit.integrations.ode_solvers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from latentfit import _hooks
from latentfit.inference.model import DataError

from .structural import Design, Structural


def _events(d: Design, num_states: int, dose_compartment: int | None) -> dict[str, Any]:
    """Sorted event table ``[N, E]`` (E = 2D + T): times, bolus amounts per compartment, infusions."""
    xp, ops = d.xp, d.backend_ops()
    amt, rate, t_dose = d.dose_amt, d.dose_rate, d.dose_time  # [N, D]
    real = amt > 0
    last = xp.maximum(xp.amax(d.time, -1), xp.amax(xp.where(real, t_dose, d.time[:, :1]), -1))[:, None]
    t_dose = xp.where(real, t_dose, last)  # padding doses: harmless events at the end
    is_inf = real & (rate > 0)
    t_end = xp.where(is_inf, t_dose + amt / xp.where(is_inf, rate, 1.0), t_dose)
    steps = d.covariate_steps  # time-varying covariates: their records are events too (the kinetics change there)
    times = xp.concatenate([t_dose, t_end, *(st[0] for st in steps.values()), d.time], -1)
    if d.obs_rank is None:  # stable: doses (and covariate records) before observations at equal times
        order = ops.argsort(times)
    else:  # at equal times, the records in the table's order (NONMEM's): by rank, then (stably) by time; infusion
        # ends and covariate records first
        first = 0.0 * times[:, :times.shape[-1] - d.time.shape[-1] - t_dose.shape[-1]] - float("inf")
        rank = xp.concatenate([xp.where(real, d.dose_rank, float("inf")), first, d.obs_rank], -1)
        order = ops.argsort(rank)
        order = ops.take_along_axis(order, ops.argsort(ops.take_along_axis(times, order)))
    seg = None
    if d.obs_seg is not None:  # periods first, then times (stable: doses before observations at equal times)
        top = xp.maximum(xp.amax(d.obs_seg, -1), xp.amax(d.dose_seg, -1))[:, None]
        seg_d = xp.where(real, d.dose_seg, top)  # padding doses: in the last period
        seg = xp.concatenate([seg_d, seg_d, *(st[1] for st in steps.values()), d.obs_seg], -1)
        order = ops.take_along_axis(order, ops.argsort(ops.take_along_axis(seg, order)))
    n_dose, n_obs = amt.shape[-1], d.time.shape[-1]
    zeros_c = xp.zeros_like(times[:, 2 * n_dose:times.shape[-1] - n_obs])  # [N, C]: the covariates' records
    if dose_compartment is not None:
        cmt = xp.zeros_like(amt) + (dose_compartment - 1)
    elif d.dose_cmt is not None:
        cmt = d.dose_cmt - 1
    else:
        cmt = xp.zeros_like(amt)
    bolus_amt = xp.where(real & ~is_inf, amt, 0.0)
    zeros_d = xp.zeros_like(amt)
    zeros_t = xp.zeros_like(d.time)
    # bolus amount of every event into every compartment: [N, E] per compartment
    boluses = []
    for c in range(num_states):
        per_event = xp.concatenate([xp.where(cmt == c, bolus_amt, 0.0), zeros_d, zeros_c, zeros_t], -1)
        boluses.append(ops.take_along_axis(per_event, order))
    sorted_t = ops.take_along_axis(times, order)
    # position of each observation in the sorted events, as a one-hot [N, T, E] (gather by matmul)
    inverse = ops.argsort(order)
    pos = inverse[:, times.shape[-1] - n_obs:] * 1.0  # float, so that nothing is created on a default device
    e_idx = xp.cumsum(xp.ones_like(times[0]), 0) - 1.0  # 0, 1, ..., E-1 on the data's device
    one = xp.ones_like(d.time[:, :1])[..., None]  # [N, 1, 1] in the data's dtype
    onehot = xp.where(pos[..., None] == e_idx, one, 0.0 * one)
    inf_rate = xp.where(is_inf, rate, 0.0)
    ev = {"t": sorted_t, "bolus": boluses, "onehot": onehot, "t_dose": t_dose, "t_end": t_end,
          "inf_rate": inf_rate, "cmt": cmt, "n_obs": n_obs, "reset": None, "seg": None, "inf_seg": None, "ss": None,
          "cov": {}}
    s = None
    if seg is not None:
        s = ops.take_along_axis(seg, order)
        ev["seg"], ev["inf_seg"] = s, seg_d
        ev["reset"] = xp.concatenate([s[:, :1] != s[:, :1], s[:, 1:] != s[:, :-1]], -1)  # [N, E]: a new period
    for name, (c_t, c_seg, c_val) in steps.items():
        # last value carried forward at each event (before the first record: the first value): the records are
        # sorted by (period, time), so those at or before an event are a prefix and the value is
        # v_0 + Σ_{r ≥ 1} [record r at or before the event] (v_r − v_{r−1}) (no integer gather)
        te = sorted_t[:, :, None]
        later_seg = None if s is None else c_seg[:, None, 1:] - s[:, :, None]  # [N, E, R-1]: record's − event's
        before = (c_t[:, None, 1:] <= te if s is None else
                  (later_seg < 0) | ((later_seg == 0) & (c_t[:, None, 1:] <= te)))
        jumps = (c_val[:, 1:] - c_val[:, :-1])[:, None, :]
        ev["cov"][name] = c_val[:, :1] + xp.sum(xp.where(before, jumps, 0.0 * jumps), -1)  # [N, E]
    if d.dose_ss is not None:
        def per_event(a: Any) -> Any:
            return ops.take_along_axis(xp.concatenate([a, zeros_d, zeros_c, zeros_t], -1), order)
        ev["ss"] = per_event(xp.where(real, d.dose_ss, 0.0))
        ev["ss_ii"] = per_event(d.dose_ii)
        ev["ss_dur"] = per_event(t_end - t_dose)
        ev["ss_rate"] = [per_event(xp.where(cmt == c, inf_rate, 0.0)) for c in range(num_states)]
    return ev


def _infusion_input(xp: Any, ev: dict[str, Any], mid: Any, num_states: int, seg: Any = None) -> list[Any]:
    """Zero-order input per compartment on an interval with midpoint ``mid [N]`` (in period ``seg [N]``): ``[N]``
    each."""
    on = (ev["t_dose"] <= mid[:, None]) & (mid[:, None] < ev["t_end"])
    if seg is not None:  # an infusion stops at a reset
        on = on & (ev["inf_seg"] == seg[:, None])
    r = xp.where(on, ev["inf_rate"], 0.0)
    return [xp.sum(xp.where(ev["cmt"] == c, r, 0.0), -1) for c in range(num_states)]


def _infusion_inputs(xp: Any, ev: dict[str, Any], mid: Any, num_states: int) -> list[Any]:
    """Zero-order input per compartment on every interval (midpoints ``mid [N, E]``; an infusion stops at a reset):
    ``[N, E]`` each."""
    on = (ev["t_dose"][:, None, :] <= mid[..., None]) & (mid[..., None] < ev["t_end"][:, None, :])
    if ev["seg"] is not None:
        on = on & (ev["inf_seg"][:, None, :] == ev["seg"][..., None])
    r = xp.where(on, ev["inf_rate"][:, None, :], 0.0)
    return [xp.sum(xp.where(ev["cmt"][:, None, :] == c, r, 0.0), -1) for c in range(num_states)]


SOLVERS = ("rk4", "adaptive", "stiff")


def ode(rhs: Callable[..., tuple], parameters: tuple[str, ...] | list[str], *, num_states: int, ss_periods: int = 50,
        observe: Callable[..., Any], initial: Callable[..., tuple] | None = None,
        dose_compartment: int | None = None, max_step: float | None = None, solver: str = "rk4",
        rtol: float = 1e-6, atol: float = 1e-8, max_steps: int = 4096, name: str = "ode",
        check: bool = True, covariates: tuple[str, ...] | list[str] = ()) -> Structural:
    """A structural model from an ODE system (see the module docstring).

    Parameters
    ----------
    rhs : ``rhs(t, x, psi, xp) -> tuple`` of ``num_states`` derivatives (``t`` is ``[N]``).
    parameters : the individual parameters ``psi`` the functions read (order of ``NLME``'s parameters).
    num_states : number of compartments/states.
    observe : ``observe(x, psi, xp) -> [..., N]`` prediction from the state (e.g. ``x[1] / psi["V"]``); a joint
        model's several responses (``NLME(..., error={"conc": ..., "effect": ...})``): a dict ``{response: [..., N]}``
        or a tuple in the responses' order (e.g. ``(x[1] / psi["V"], x[2])``), all from one integration.
    initial : ``initial(psi, xp) -> tuple`` of states at each individual's first event (default 0).
    dose_compartment : 1-based compartment receiving every dose (default: the data's ``CMT``).
    ss_periods : dosing intervals integrated to reach the steady state of an ``SS`` dose (module docstring).
    max_step : longest RK4 step (time units of the data); default: the longest span from an individual's first
        to last event, over 200.  RK4 only.
    solver : ``"rk4"`` (default: fixed steps, above), ``"adaptive"`` or ``"stiff"``: error-controlled solvers from
        the libraries (``pip install latentfit[ode]``), one solve per event interval for all individuals at once,
        differentiable.  JAX: diffrax ``Tsit5`` / ``Kvaerno5`` (implicit, L-stable); torch: torchdiffeq ``dopri5``
        / RODAS4 (L-stable Rosenbrock, order 4, written in torch: torchdiffeq has no implicit method).
        See :mod:`latentfit.integrations.ode_solvers`.
    rtol, atol : relative and absolute local error tolerances of the adaptive solvers (per state component:
        ``|err| ≤ atol + rtol·|x|``; defaults as rxode2's, 1e-6 and 1e-8 in the states' units).
    max_steps : most steps per event interval of the adaptive solvers (more is an error).
    covariates : time-varying covariate columns of the data that the kinetics read: ``rhs``, ``observe`` and
        ``initial`` find each in ``psi[name]`` (``[N]``) at the time, its last value carried forward over all the
        individual's records (dose and ``EVID = 2`` rows included; before the first value: the first value).  Their
        records are events (the integration restarts there), so a ``CL`` that follows ``WT(t)`` changes exactly at
        the record, as NONMEM's ``$PK`` re-evaluated at every record.
    check : when :class:`NLME` gets its data, RK4: solve once more with the step halved at the initial values
        (random effects 0) and warn (:class:`~latentfit.models.nlme.structural.SolverWarning`, naming the individual,
        the time and the step) where a prediction is not finite or moves by more than 1% of the individual's largest
        prediction: an unstable or too coarse step.  Costs two solves (on JAX two compilations, ~1-2 s each for
        theophylline, shared by later bindings of the same shapes); adaptive solvers: warn when ``rtol`` is below
        100 × the machine epsilon of the arrays' dtype (JAX float32 without x64); ``False`` skips it.
    """
    if int(num_states) != num_states or num_states < 1:
        raise ValueError(f"num_states must be a positive integer, got {num_states!r}")
    if max_step is not None and not max_step > 0:
        raise ValueError(f"max_step must be positive, got {max_step!r}")
    if int(ss_periods) != ss_periods or ss_periods < 3:
        raise ValueError(f"ss_periods must be an integer >= 3 (Aitken's extrapolation uses the last three), got "
                         f"{ss_periods!r}")
    if dose_compartment is not None and not 1 <= dose_compartment <= num_states:
        raise ValueError(f"dose_compartment must be in 1..{num_states} (1-based, as CMT), got {dose_compartment!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    covariates = tuple(str(c) for c in covariates)
    clash = sorted(set(covariates) & set(parameters))
    if clash:
        raise ValueError(f"covariates {clash} are also parameter names: rhs reads both in psi, so they must differ")
    if solver != "rk4":
        if max_step is not None:
            raise ValueError(f"max_step is the fixed step of solver='rk4'; solver={solver!r} chooses its steps from "
                             f"rtol and atol (drop max_step=)")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be positive, got rtol={rtol!r}, atol={atol!r}")
        if int(max_steps) != max_steps or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")

    def make_fn(steps: list[int] | None, ss_steps: dict[int, tuple[int, int]] | None = None
                ) -> Callable[[dict[str, Any], Design], Any]:
        def fn(psi_in: dict[str, Any], d: Design, refine: Any = 1) -> Any:
            """Predictions; ``refine``: RK4 steps ``refine`` times as many (an int, or on JAX a traced int32: the
            loops' trip counts then come at run time, one program for every ``refine``)."""
            xp, ops = d.xp, d.backend_ops()
            psi = {k: v[..., 0] for k, v in psi_in.items()}  # [..., N]
            ev = _events(d, num_states, dose_compartment)
            n_ev = ev["t"].shape[-1]
            at_event = _occasion_params(xp, d, ev, psi)  # occasions chained: each event's occasion's parameters
            if at_event is not None:
                psi_k, psi = psi, at_event(0)
            plan = steps if steps is not None else _plan_eagerly(d)
            if len(plan) != n_ev - 1:
                raise ValueError(f"the ODE model was prepared for {len(plan) + 1} events per individual and got "
                                 f"{n_ev}: bind it to this data (NLME does so when it receives its data)")
            ref = next(iter(psi.values()))
            zero = 0.0 * ref

            def with_cov(p: dict[str, Any], k: int) -> dict[str, Any]:
                """``p`` and the time-varying covariates' values at event k (on the interval from it)."""
                return {**p, **{c: v[:, k] for c, v in ev["cov"].items()}} if ev["cov"] else p

            x = (tuple(zero + v for v in initial(with_cov(psi, 0), xp)) if initial is not None
                 else tuple(zero for _ in range(num_states)))
            if len(x) != num_states:
                raise ValueError(f"initial() returned {len(x)} states, expected num_states={num_states}")

            def f(t: Any, state: tuple, u: list[Any], p: dict[str, Any]) -> tuple:
                dx = rhs(t, state, p, xp)
                if len(dx) != num_states:
                    raise ValueError(f"rhs returned {len(dx)} derivatives, expected num_states={num_states}")
                return tuple(dxi + ui for dxi, ui in zip(dx, u, strict=True))

            def rk4(h: Any, u: list[Any], p: dict[str, Any] = psi) -> Callable:
                def body(_: int, carry: tuple) -> tuple:
                    t, state = carry
                    k1 = f(t, state, u, p)
                    k2 = f(t + 0.5 * h, tuple(xi + 0.5 * h * ki for xi, ki in zip(state, k1, strict=True)), u, p)
                    k3 = f(t + 0.5 * h, tuple(xi + 0.5 * h * ki for xi, ki in zip(state, k2, strict=True)), u, p)
                    k4 = f(t + h, tuple(xi + h * ki for xi, ki in zip(state, k3, strict=True)), u, p)
                    state = tuple(xi + h / 6.0 * (a + 2.0 * b + 2.0 * c + e)
                                  for xi, a, b, c, e in zip(state, k1, k2, k3, k4, strict=True))
                    return t + h, state
                return body

            if solver != "rk4":
                if steps is None and _ss_plan_eagerly(d):
                    raise DataError(f"steady-state doses (SS 1/2) are integrated by solver='rk4' only, not "
                                    f"solver={solver!r}")
                return _solve_adaptive(xp, ops, ev, x, psi, zero,
                                       None if at_event is None else (psi_k, at_event))

            ss_plan = ss_steps if steps is not None else _ss_plan_eagerly(d)

            def steady_state(k: int, x: tuple, x_init: tuple, p: dict[str, Any]) -> tuple:
                """Pre-dose steady state of the SS doses of event k: ``ss_periods`` intervals from ``x_init``."""
                n_on, n_off = ss_plan[k]
                is_ss = ev["ss"][:, k] > 0
                tau = xp.where(is_ss, ev["ss_ii"][:, k], 1.0)
                dur = xp.where(is_ss, ev["ss_dur"][:, k], 0.0)
                amt = [ev["bolus"][c][:, k] for c in range(num_states)]
                u_on = [ev["ss_rate"][c][:, k] for c in range(num_states)]
                u_off = [0.0 * a for a in amt]

                def period(j: Any, state: tuple) -> tuple:
                    t0 = ev["t"][:, k] - (ss_periods - j) * tau
                    state = tuple(xi + a for xi, a in zip(state, amt, strict=True))
                    if n_on:
                        _, state = ops.fori_loop(0, n_on * refine, rk4(dur / (n_on * refine), u_on, p), (t0, state))
                    if n_off:
                        _, state = ops.fori_loop(0, n_off * refine, rk4((tau - dur) / (n_off * refine), u_off, p),
                                                 (t0 + dur, state))
                    return state

                x_a = ops.fori_loop(0, int(ss_periods) - 2, period, x_init)
                x_b = period(int(ss_periods) - 2, x_a)
                x_c = period(int(ss_periods) - 1, x_b)
                x_ss = tuple(_aitken(xp, a, b, c) for a, b, c in zip(x_a, x_b, x_c, strict=True))
                return tuple(xp.where(is_ss, xi + s - x0, xi) for xi, s, x0 in zip(x, x_ss, x_init, strict=True))

            t_ev, outputs, x_init, layout = ev["t"], [], x, []
            for k in range(n_ev):
                p = with_cov(psi if at_event is None else at_event(k), k)
                if at_event is not None and initial is not None:  # a reset returns to this occasion's initial state
                    x_init = tuple(zero + v for v in initial(p, xp))
                if ev["reset"] is not None and k > 0:  # a new period: back to the initial state
                    x = tuple(xp.where(ev["reset"][:, k], a, b) for a, b in zip(x_init, x, strict=True))
                if k in ss_plan:
                    x = steady_state(k, x, x_init, p)
                x = tuple(xi + ev["bolus"][c][:, k] for c, xi in enumerate(x))
                outputs.append(_stack_outputs(xp, observe(x, p, xp), zero, layout))
                if k == n_ev - 1 or plan[k] == 0:
                    continue
                t0, t1 = t_ev[:, k], xp.maximum(t_ev[:, k + 1], t_ev[:, k])  # no step back where a period restarts
                u = _infusion_input(xp, ev, 0.5 * (t0 + t1), num_states, None if ev["seg"] is None else ev["seg"][:, k])
                n = plan[k] * refine
                _, x = ops.fori_loop(0, n, rk4((t1 - t0) / n, u, p), (t0, x))  # one traced body on JAX
            return _gather(xp, xp.stack(outputs, -1), ev["onehot"], layout[0])  # outputs [..., N, (R,) E]

        return fn

    def _solve_adaptive(xp: Any, ops: Any, ev: dict[str, Any], x: tuple, psi: dict[str, Any], zero: Any,
                        occasions: tuple | None = None) -> Any:
        """The events' sequence solved by the library solvers (see :mod:`latentfit.integrations.ode_solvers`);
        ``occasions``: ``(ψ [..., K, N], at_event)`` when each interval takes its occasion's parameters (``"p"``
        among the events, ``[..., N, E]``)."""
        t_ev = ev["t"]
        # no step back where a period restarts (a reset), nothing after the last event
        gap = t_ev[:, 1:] - t_ev[:, :-1]
        dt = xp.concatenate([xp.where(gap > 0, gap, 0.0 * gap), 0.0 * t_ev[:, :1]], -1)
        events = {"t0": t_ev, "dt": dt, "bolus": list(ev["bolus"]),
                  "u": _infusion_inputs(xp, ev, t_ev + 0.5 * dt, num_states)}
        if ev["reset"] is not None:
            events["reset"] = ev["reset"]
        if ev["cov"]:  # the time-varying covariates' values on the interval from each event
            events["cov"] = dict(ev["cov"])
        if occasions is not None:
            events["p"] = {nm: xp.stack([v[nm] for v in map(occasions[1], range(t_ev.shape[-1]))], -1)
                           for nm in psi}
        x_init, layout = x, []

        def jump(state: tuple, e: dict[str, Any]) -> tuple[tuple, Any]:
            p = {**e.get("p", psi), **e.get("cov", {})}
            if "reset" in e:  # a new period: back to the initial state (false at each individual's first event)
                init = x_init if "p" not in e or initial is None else tuple(zero + v for v in initial(p, xp))
                state = tuple(xp.where(e["reset"], a, b) for a, b in zip(init, state, strict=True))
            state = tuple(xi + e["bolus"][c] for c, xi in enumerate(state))
            return state, _stack_outputs(xp, observe(state, p, xp), zero, layout)

        def field(t: Any, state: tuple, e: dict[str, Any], p: dict[str, Any]) -> tuple:
            dx = rhs(t, state, {**e.get("p", p), **e.get("cov", {})}, xp)
            if len(dx) != num_states:
                raise ValueError(f"rhs returned {len(dx)} derivatives, expected num_states={num_states}")
            return tuple(dxi + ui for dxi, ui in zip(dx, e["u"], strict=True))

        out = _hooks.module("ode_solvers").integrate_events(
            ops.name, solver, x0=x, events=events, jump=jump, rhs=field, params=psi, rtol=rtol, atol=atol,
            max_steps=int(max_steps))  # [..., N, (R,) E]
        return _gather(xp, out, ev["onehot"], layout[0])

    def _plan_eagerly(d: Design) -> list[int]:
        """Steps per interval from concrete data arrays (read back as numpy), checking the dose compartments."""
        ops = d.backend_ops()
        t_ev = _events(d, num_states, dose_compartment)["t"]
        try:
            t_ev, amt = ops.to_numpy(t_ev), ops.to_numpy(d.dose_amt)
            cmt = None if d.dose_cmt is None else ops.to_numpy(d.dose_cmt)
        except Exception as exc:  # traced arrays under jit
            raise ValueError("an unbound ODE structural model cannot plan its steps inside a compiled function; "
                             "bind it to the data first (Structural.bound(design), done by NLME)") from exc
        if cmt is not None and dose_compartment is None:
            _check_cmt(amt, cmt, num_states)
        return _steps_per_interval(t_ev, max_step)

    def _ss_plan_eagerly(d: Design) -> dict[int, tuple[int, int]]:
        """Event index -> RK4 steps ``(during the infusion, after it)`` of one steady-state dosing interval, for the
        events where some individual has an SS dose (static, from the concrete data)."""
        if d.dose_ss is None:
            return {}
        ev = _events(d, num_states, dose_compartment)
        ops = d.backend_ops()
        try:
            t, ss, ii, dur = (np.asarray(ops.to_numpy(ev[key]), dtype=float) for key in ("t", "ss", "ss_ii", "ss_dur"))
        except Exception as exc:  # traced arrays under jit
            raise ValueError("an unbound ODE structural model cannot plan its steady states inside a compiled "
                             "function; bind it to the data first (Structural.bound(design), done by NLME)") from exc
        on = ss > 0
        if (on & (dur > ii * (1 + 1e-12))).any():
            raise DataError("a steady-state infusion longer than its interval II (overlapping infusions at steady "
                            "state) is not supported by ODE models; use a closed-form model or shorten the infusion")
        h = _step(t, max_step)
        plan = {}
        for k in np.where(on.any(0))[0]:
            d_on, d_off = dur[:, k][on[:, k]].max(), (ii[:, k] - dur[:, k])[on[:, k]].max()
            plan[int(k)] = (int(np.ceil(d_on / h - 1e-9)) if d_on > 0 else 0,
                            int(np.ceil(d_off / h - 1e-9)) if d_off > 0 else 0)
        return plan

    def bind(design: Design) -> Callable[[dict[str, Any], Design], Any]:
        ss_plan = _ss_plan_eagerly(design)
        if ss_plan and solver != "rk4":
            raise DataError(f"steady-state doses (SS 1/2) are integrated by solver='rk4' only, not solver={solver!r}: "
                            f"use solver='rk4' (max_step= small enough for the fast processes) or a closed-form model")
        return make_fn(_plan_eagerly(design), ss_plan)

    def step_check(psi: dict[str, Any], design: Design) -> tuple[int | None, int | None, str] | None:
        """RK4 step halving at ``psi [N, 1]`` (concrete arrays): the predictions ``f_h`` with the planned steps and
        ``f_{h/2}`` with twice as many.  RK4's global error is ``O(h⁴)``, so ``f_h − f_{h/2} ≈ (15/16)(f_h − f)``
        estimates the error of the fit's predictions; an unstable step (``|λ|·h > 2.78`` for some rate λ of the
        system) makes them differ by orders of magnitude or overflow.  Returns the worst observation ``(i, j)`` and a
        message where a prediction is not finite or ``|f_h − f_{h/2}| > 10⁻²·max_j |f_{h/2}|`` (per individual and
        response); None otherwise, and for the adaptive solvers (error-controlled)."""
        ops = design.backend_ops()
        if solver != "rk4":  # error-controlled: only the tolerances against the arrays' precision
            dtype = np.asarray(ops.to_numpy(design.time[:1, :1])).dtype
            eps = float(np.finfo(dtype).eps)
            if rtol < 100 * eps:
                return None, None, (
                    f"rtol={rtol:g} is finer than the arrays' precision resolves ({dtype}: "
                    f"100 × eps = {100 * eps:.1g}): the implicit solver's Newton iterations stall (more than "
                    f"max_steps steps) and the explicit one cannot reach it; use float64 (on JAX: "
                    f"jax.config.update('jax_enable_x64', True) before building the model) or rtol >= {100 * eps:.1g}")
            return None
        plan, ss_plan = _plan_eagerly(design), _ss_plan_eagerly(design)
        f = make_fn(plan, ss_plan)
        # JAX: one compiled program, the step count a run-time argument (eagerly, every fori_loop would compile on its
        # own: seconds); torch: eager
        solve = ops.jit(lambda p, refine: f(p, design, refine))
        one, two = np.int32(1), np.int32(2)  # (a compiled program's run-time argument; an index eagerly)
        coarse, fine = _as_numpy(ops, solve(psi, one)), _as_numpy(ops, solve(psi, two))  # [R, N, T]
        h = _step(ops.to_numpy(_events(design, num_states, dose_compartment)["t"]), max_step)
        step = f"max_step={max_step:g}" if max_step is not None else "the default max_step: the longest span / 200"
        advice = (f"the RK4 step (at most h = {h:.4g}, {step}) is unstable (explicit RK4 needs |rate| × h < 2.8 for "
                  f"every rate constant of the system, e.g. ka or kon·R) or too coarse: pass a smaller max_step= "
                  f"(e.g. {h / 10:.2g}), or solver='adaptive' (error-controlled; solver='stiff' for stiff systems "
                  f"such as target-mediated disposition, on backend='jax')")
        bad = ~(np.isfinite(coarse) & np.isfinite(fine))
        if bad.any():
            r, i, j = np.argwhere(bad)[0]
            return int(i), int(j), (f"the ODE prediction is {coarse[r, i, j]:.4g} (with the step halved: "
                                    f"{fine[r, i, j]:.4g}), not finite ({int(bad[:, i].sum())} of this individual's "
                                    f"{bad[:, i].size} predictions): {advice}")
        scale = np.abs(fine).max(-1, keepdims=True)
        rel = np.abs(coarse - fine) / np.where(scale > 0, scale, 1.0)
        if rel.max() > 1e-2:  # the individual where the step is worst, at its first such observation
            r, i = np.unravel_index(int(np.argmax(rel.max(-1))), rel.shape[:2])
            j = int(np.argmax(rel[r, i] > 1e-2))
            return int(i), int(j), (f"the ODE prediction {coarse[r, i, j]:.4g} becomes {fine[r, i, j]:.4g} with the "
                                    f"step halved (a change of {rel[r, i, j]:.2g} × the individual's largest "
                                    f"prediction): {advice}")
        return None

    return Structural(name, tuple(parameters), make_fn(None), bind=bind, carry="ode",
                      check=step_check if check else None, covariates=covariates)


def _stack_outputs(xp: Any, obs: Any, zero: Any, layout: list) -> Any:
    """``observe``'s output at one event as an array: ``[..., N]`` (one response) or ``[..., N, R]`` (a dict or a
    tuple / list of R responses); ``layout`` receives its kind once (None; the dict's names; R)."""
    if isinstance(obs, dict):
        kind: Any = tuple(obs)
        parts = [obs[k] for k in kind]
    elif isinstance(obs, tuple | list):
        kind, parts = len(obs), list(obs)
    else:
        kind, parts = None, None
    if not layout:
        layout.append(kind)
    if parts is None:
        return obs + zero
    if not parts:
        raise ValueError("observe() returned no response")
    return xp.stack([v + zero for v in parts], -1)


def _gather(xp: Any, out: Any, onehot: Any, kind: Any) -> Any:
    """Each observation's prediction from the outputs at the events, ``[..., N, E]`` -> ``[..., N, T]`` (the one-hot
    ``[N, T, E]`` of its event: a gather by matmul), or ``[..., N, R, E]`` -> R arrays ``[..., N, T]``, a dict with
    ``observe``'s names or a tuple in its order (as :mod:`~latentfit.models.nlme.responses` reads a joint model's
    outputs)."""
    if kind is None:
        return xp.einsum("...ne,nte->...nt", out, onehot)
    pred = xp.einsum("...nre,nte->...nrt", out, onehot)
    parts = [pred[..., r, :] for r in range(pred.shape[-2])]
    return dict(zip(kind, parts, strict=True)) if isinstance(kind, tuple) else tuple(parts)


def _as_numpy(ops: Any, pred: Any) -> np.ndarray:
    """Predictions (an array ``[N, T]``, or a dict / tuple of them: several responses) as ``[R, N, T]`` numpy."""
    parts = list(pred.values()) if isinstance(pred, dict) else list(pred) if isinstance(pred, tuple | list) else [pred]
    return np.stack([np.asarray(ops.to_numpy(p), dtype=float) for p in parts])


def _occasion_params(xp: Any, d: Design, ev: dict[str, Any], psi: dict[str, Any]) -> Callable[[int], dict] | None:
    """With occasions chained (``d.occ_start`` set, ``psi [..., K, N]``): ``k -> ψ [..., N]`` of the occasion in
    force at event k (:func:`~latentfit.models.nlme.piecewise.occasion_index`), which the interval from event k
    integrates with; None otherwise."""
    if d.occ_start is None:
        return None
    from .piecewise import occasion_index

    seg = ev["seg"] if ev["seg"] is not None else 0.0 * ev["t"]
    j = occasion_index(d, ev["t"], seg)  # [N, E]
    k_occ = next(iter(psi.values())).shape[-2]
    weights = [xp.where(j == float(k), 1.0, 0.0) for k in range(k_occ)]

    def at_event(e: int) -> dict[str, Any]:
        return {nm: sum(v[..., k, :] * weights[k][:, e] for k in range(k_occ)) for nm, v in psi.items()}

    return at_event


def _aitken(xp: Any, a: Any, b: Any, c: Any) -> Any:
    """Aitken's Δ² limit of the period iterates ``a, b, c`` of one state: ``c + Δ₂ r/(1 − r)`` with ``r = Δ₂/Δ₁``, where
    the increments ``Δ₁ = b − a``, ``Δ₂ = c − b`` shrink geometrically (``0 < r < 1 − 10⁻⁶``) and are above rounding
    (``|Δ₁| > 10³ ε |c|``); else ``c``.  Exact for a linear system once one mode (the slowest) is left."""
    d1, d2 = b - a, c - b
    eps = float(xp.finfo(c.dtype).eps)
    ok = (xp.abs(d1) > 1e3 * eps * xp.abs(c)) & (d1 * d2 > 0) & (xp.abs(d2) < (1.0 - 1e-6) * xp.abs(d1))
    r = xp.where(ok, d2 / xp.where(ok, d1, 1.0), 0.0)
    return c + xp.where(ok, d2 * r / (1.0 - r), 0.0)


def _steps_per_interval(t_ev: Any, max_step: float | None) -> list[int]:
    """RK4 steps for each interval between consecutive events: ``ceil(max_i Δt_ik / max_step)`` (static ints
    from the data's sorted event times ``[N, E]``; valid for any subset of the individuals).  The default step is
    the longest span of an individual's event times over 200 (periods may restart the time: max − min)."""
    t = np.asarray(t_ev, dtype=float)
    gaps = np.diff(t, axis=-1).max(0) if t.shape[-1] > 1 else np.zeros(0)
    h = _step(t, max_step)
    return [int(np.ceil(g / h - 1e-9)) if g > 0 else 0 for g in gaps]


def _step(t_ev: Any, max_step: float | None) -> float:
    """The longest RK4 step: ``max_step``, else the longest span of an individual's event times ``[N, E]`` over 200."""
    if max_step is not None:
        return float(max_step)
    t = np.asarray(t_ev, dtype=float)
    return max(float((t.max(-1) - t.min(-1)).max()) / 200.0, 1e-12)


def _check_cmt(amt: np.ndarray, cmt: np.ndarray, num_states: int) -> None:
    """Dose compartments outside 1..num_states are a data error (numpy arrays ``[N, D]``)."""
    bad = (amt > 0) & ((cmt < 1) | (cmt > num_states))
    if bad.any():
        raise DataError(f"dose CMT values {sorted(set(cmt[bad].tolist()))} are outside 1..{num_states} (the "
                        f"ODE model has {num_states} states); fix the CMT column or pass dose_compartment=")


__all__ = ["ode"]
