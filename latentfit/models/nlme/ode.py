"""ODE structural models: batched fixed-step Runge–Kutta with NONMEM dose events, backend-neutral.

``ode(rhs, parameters, num_states=..., observe=...)`` turns a right-hand side

    dx/dt = rhs(t, x, psi, xp) + u(t),     x(t0) = initial(psi, xp) (default 0),

into a :class:`~latentfit.models.nlme.structural.Structural` usable by :class:`NLME` like the closed-form
library (and, written with ``xp`` operations, on both backends).  ``x`` is a tuple of ``num_states`` arrays
``[..., N]`` (leading chain dims allowed), ``psi`` a dict of ``[..., N]`` arrays, and the prediction at an
observation time is ``observe(x, psi, xp)``.

Doses follow the data: a bolus (``RATE`` 0) adds ``AMT`` to compartment ``CMT`` (1-based; or
``dose_compartment`` for every dose) at its time; an infusion adds the zero-order input
``u_CMT = RATE`` on ``[t_d, t_d + AMT/RATE)``.  For every individual the dose times, the infusion ends
and the observation times are merged and sorted (doses first at equal times, as the closed forms count a
dose at the observation's time), and each interval between consecutive events is integrated with classical
RK4 steps (local error O(h⁵)) of at most ``max_step`` (default: the longest event-to-event span over 200);
the input is constant on each interval since every discontinuity is an event.  Explicit RK4 is stable for
``|λ|·h ≤ 2.78`` (λ the fastest rate constant, e.g. ka): pass a smaller ``max_step`` for fast processes.
All individuals are integrated at once (their own step sizes), so the only
Python loops are over events and substeps, never over individuals.  Event times come from the data, so
a lag time must be written into ``rhs``/``observe`` rather than into the dose times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

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
    times = xp.concatenate([t_dose, t_end, d.time], -1)
    order = ops.argsort(times)
    n_dose, n_obs = amt.shape[-1], d.time.shape[-1]
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
        per_event = xp.concatenate([xp.where(cmt == c, bolus_amt, 0.0), zeros_d, zeros_t], -1)
        boluses.append(ops.take_along_axis(per_event, order))
    sorted_t = ops.take_along_axis(times, order)
    # position of each observation in the sorted events, as a one-hot [N, T, E] (gather by matmul)
    inverse = ops.argsort(order)
    pos = inverse[:, 2 * n_dose:] * 1.0  # float, so that nothing is created on a default device
    e_idx = xp.cumsum(xp.ones_like(times[0]), 0) - 1.0  # 0, 1, ..., E-1 on the data's device
    one = xp.ones_like(d.time[:, :1])[..., None]  # [N, 1, 1] in the data's dtype
    onehot = xp.where(pos[..., None] == e_idx, one, 0.0 * one)
    inf_rate = xp.where(is_inf, rate, 0.0)
    return {"t": sorted_t, "bolus": boluses, "onehot": onehot, "t_dose": t_dose, "t_end": t_end,
            "inf_rate": inf_rate, "cmt": cmt, "n_obs": n_obs}


def _infusion_input(xp: Any, ev: dict[str, Any], mid: Any, num_states: int) -> list[Any]:
    """Zero-order input per compartment on an interval with midpoint ``mid [N]``: ``[N]`` each."""
    on = (ev["t_dose"] <= mid[:, None]) & (mid[:, None] < ev["t_end"])
    r = xp.where(on, ev["inf_rate"], 0.0)
    return [xp.sum(xp.where(ev["cmt"] == c, r, 0.0), -1) for c in range(num_states)]


def ode(rhs: Callable[..., tuple], parameters: tuple[str, ...] | list[str], *, num_states: int,
        observe: Callable[..., Any], initial: Callable[..., tuple] | None = None,
        dose_compartment: int | None = None, max_step: float | None = None, name: str = "ode") -> Structural:
    """A structural model from an ODE system (see the module docstring).

    Parameters
    ----------
    rhs : ``rhs(t, x, psi, xp) -> tuple`` of ``num_states`` derivatives (``t`` is ``[N]``).
    parameters : the individual parameters ``psi`` the functions read (order of ``NLME``'s parameters).
    num_states : number of compartments/states.
    observe : ``observe(x, psi, xp) -> [..., N]`` prediction from the state (e.g. ``x[1] / psi["V"]``).
    initial : ``initial(psi, xp) -> tuple`` of states at each individual's first event (default 0).
    dose_compartment : 1-based compartment receiving every dose (default: the data's ``CMT``).
    max_step : longest RK4 step (time units of the data); default: the longest span from an individual's first
        to last event, over 200.
    """
    if int(num_states) != num_states or num_states < 1:
        raise ValueError(f"num_states must be a positive integer, got {num_states!r}")
    if max_step is not None and not max_step > 0:
        raise ValueError(f"max_step must be positive, got {max_step!r}")
    if dose_compartment is not None and not 1 <= dose_compartment <= num_states:
        raise ValueError(f"dose_compartment must be in 1..{num_states} (1-based, as CMT), got {dose_compartment!r}")

    def make_fn(steps: list[int] | None) -> Callable[[dict[str, Any], Design], Any]:
        def fn(psi_in: dict[str, Any], d: Design) -> Any:
            xp, ops = d.xp, d.backend_ops()
            psi = {k: v[..., 0] for k, v in psi_in.items()}  # [..., N]
            ev = _events(d, num_states, dose_compartment)
            n_ev = ev["t"].shape[-1]
            plan = steps if steps is not None else _plan_eagerly(d)
            if len(plan) != n_ev - 1:
                raise ValueError(f"the ODE model was prepared for {len(plan) + 1} events per individual and got "
                                 f"{n_ev}: bind it to this data (NLME does so when it receives its data)")
            ref = next(iter(psi.values()))
            zero = 0.0 * ref
            x = (tuple(zero + v for v in initial(psi, xp)) if initial is not None
                 else tuple(zero for _ in range(num_states)))
            if len(x) != num_states:
                raise ValueError(f"initial() returned {len(x)} states, expected num_states={num_states}")

            def f(t: Any, state: tuple, u: list[Any]) -> tuple:
                dx = rhs(t, state, psi, xp)
                if len(dx) != num_states:
                    raise ValueError(f"rhs returned {len(dx)} derivatives, expected num_states={num_states}")
                return tuple(dxi + ui for dxi, ui in zip(dx, u, strict=True))

            def rk4(h: Any, u: list[Any]) -> Callable:
                def body(_: int, carry: tuple) -> tuple:
                    t, state = carry
                    k1 = f(t, state, u)
                    k2 = f(t + 0.5 * h, tuple(xi + 0.5 * h * ki for xi, ki in zip(state, k1, strict=True)), u)
                    k3 = f(t + 0.5 * h, tuple(xi + 0.5 * h * ki for xi, ki in zip(state, k2, strict=True)), u)
                    k4 = f(t + h, tuple(xi + h * ki for xi, ki in zip(state, k3, strict=True)), u)
                    state = tuple(xi + h / 6.0 * (a + 2.0 * b + 2.0 * c + e)
                                  for xi, a, b, c, e in zip(state, k1, k2, k3, k4, strict=True))
                    return t + h, state
                return body

            t_ev, outputs = ev["t"], []
            for k in range(n_ev):
                x = tuple(xi + ev["bolus"][c][:, k] for c, xi in enumerate(x))
                outputs.append(observe(x, psi, xp) + zero)
                if k == n_ev - 1 or plan[k] == 0:
                    continue
                t0, t1 = t_ev[:, k], t_ev[:, k + 1]
                u = _infusion_input(xp, ev, 0.5 * (t0 + t1), num_states)
                _, x = ops.fori_loop(0, plan[k], rk4((t1 - t0) / plan[k], u), (t0, x))  # one traced body on JAX
            out = xp.stack(outputs, -1)  # [..., N, E]
            return xp.einsum("...ne,nte->...nt", out, ev["onehot"])

        return fn

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

    def bind(design: Design) -> Callable[[dict[str, Any], Design], Any]:
        return make_fn(_plan_eagerly(design))

    return Structural(name, tuple(parameters), make_fn(None), bind=bind)


def _steps_per_interval(t_ev: Any, max_step: float | None) -> list[int]:
    """RK4 steps for each interval between consecutive events: ``ceil(max_i Δt_ik / max_step)`` (static ints
    from the data's sorted event times ``[N, E]``; valid for any subset of the individuals)."""
    t = np.asarray(t_ev, dtype=float)
    gaps = np.diff(t, axis=-1).max(0) if t.shape[-1] > 1 else np.zeros(0)
    h = max_step if max_step is not None else max(float((t[:, -1] - t[:, 0]).max()) / 200.0, 1e-12)
    return [int(np.ceil(g / h - 1e-9)) if g > 0 else 0 for g in gaps]


def _check_cmt(amt: np.ndarray, cmt: np.ndarray, num_states: int) -> None:
    """Dose compartments outside 1..num_states are a data error (numpy arrays ``[N, D]``)."""
    bad = (amt > 0) & ((cmt < 1) | (cmt > num_states))
    if bad.any():
        raise DataError(f"dose CMT values {sorted(set(cmt[bad].tolist()))} are outside 1..{num_states} (the "
                        f"ODE model has {num_states} states); fix the CMT column or pass dose_compartment=")


__all__ = ["ode"]
