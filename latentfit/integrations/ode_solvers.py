"""Adaptive and stiff ODE solvers for :func:`latentfit.models.nlme.ode` (``solver="adaptive"`` / ``"stiff"``).

``latentfit.models`` knows no array library; it reaches this module lazily (``importlib``) and hands it the
event sequence of the data and three backend-neutral callables (see :func:`integrate_events`).  Each interval
``[t_k, t_{k+1}]`` between consecutive events is mapped onto ``s ∈ [0, 1]`` (``t = t_k + s·Δ_k``, one ``Δ_k`` per
individual), so that all individuals (and chains) share the time axis ``[0, 1]`` on every interval:

    dx/ds = Δ_k · (rhs(t_k + s·Δ_k, x) + u_k).

The step size is controlled on the max-norm of the scaled local error ``err / (atol + rtol·|x|)``, so every
component meets the tolerances.  With the implicit JAX solver each individual (and chain) is its own system under
``vmap`` (own steps; a ``states × states`` Newton matrix per individual); otherwise all individuals are one system
of ``N × states`` components (the batch takes the steps of its hardest individual).

* JAX (``diffrax``): ``Tsit5`` (adaptive, 5(4) explicit Runge–Kutta of Tsitouras 2011) or ``Kvaerno5`` (stiff:
  ESDIRK 5(4), L-stable, Kværnø 2004) with a ``PIDController(rtol, atol)``; the intervals run under one
  ``lax.scan`` (one traced solve whatever the number of events), and ``DirectAdjoint`` differentiates the solve
  in reverse and forward mode (the library's Laplace and Fisher-information code uses forward-over-reverse).
* torch (``torchdiffeq``): ``odeint(method="dopri5")`` (Dormand–Prince 5(4)), differentiated by backpropagation
  through the solver's operations.  torchdiffeq 0.2 has no implicit (stiff) method, so ``"stiff"`` on torch is
  also ``dopri5``: correct to the tolerances, but its step is bounded by explicit stability (``|λ|·h ≲ 3.3``), so
  very stiff systems take many steps; use the JAX backend for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: pip extra that installs the libraries of this module
EXTRA = "pip install latentfit[ode]"


def _require(module: str, solver: str, backend: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"nlme.ode(solver={solver!r}) on the {backend} backend needs the package {module!r}, "
                          f"which is not installed: {EXTRA} (or use solver='rk4')") from exc


def integrate_events(backend: str, solver: str, *, x0: tuple, events: dict[str, Any], jump: Callable,
                     rhs: Callable, params: dict[str, Any], rtol: float, atol: float, max_steps: int) -> Any:
    """Outputs ``[..., N, E]`` at the ``E`` events of every individual.

    events : arrays ``[N, E]`` with a trailing event axis (any nesting of dicts/lists/tuples): at least ``"t0"``
        (the event time) and ``"dt"`` (the span to the next event, 0 at the last one).
    jump : ``jump(x, e) -> (x, out)`` at one event (``e``: the events' leaves at that event, without the axis):
        the state after the event's instantaneous changes (boluses, resets) and the output there (``[..., N]``).
    rhs : ``rhs(t, x, e, params) -> dx/dt`` (tuple) on the interval that starts at the event ``e``; elementwise
        over individuals (and chains), so that it also takes one individual's scalars.
    params : the individual parameters ``[..., N]`` that ``rhs`` reads.
    """
    if backend == "jax":
        return _integrate_jax(solver, x0, events, jump, rhs, params, rtol, atol, max_steps)
    if backend == "torch":
        return _integrate_torch(solver, x0, events, jump, rhs, params, rtol, atol, max_steps)
    raise ValueError(f"no adaptive ODE solver for the backend {backend!r} (torch or jax)")


def _integrate_jax(solver: str, x0: tuple, events: dict[str, Any], jump: Callable, rhs: Callable,
                   params: dict[str, Any], rtol: float, atol: float, max_steps: int) -> Any:
    """One ``lax.scan`` over the events.  On each interval, ``"adaptive"``: all individuals (and chains) are one
    system of ``N × num_states`` components (measured faster than per-individual solves); ``"stiff"``: every
    individual is its own system under ``vmap`` (own step sizes; the implicit solver's Newton matrix is
    ``num_states × num_states`` per individual, where one system would make it dense ``N·S × N·S``: theophylline
    with 5 chains, 452 ms against 58 ms per evaluation).

    A solve that fails (more than ``max_steps`` steps, or another diffrax failure) does not raise inside the program
    (``throw=False``): that individual's outputs from there on are NaN (a proposal there is rejected by the MCMC
    kernels, as any NaN log-density) and its later intervals are skipped.  Called eagerly (outside ``jit``), a
    failure raises the clear :func:`_too_many_steps` error instead of equinox's runtime error."""
    diffrax = _require("diffrax", solver, "JAX")
    import jax
    import jax.numpy as jnp
    from jax import lax

    method = diffrax.Kvaerno5() if solver == "stiff" else diffrax.Tsit5()
    controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_jax_max_norm)
    seq = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, -1, 0), events)
    num_states = len(x0)
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in x0), events["dt"].shape[:-1],
                                 *(jnp.shape(v) for v in params.values()))

    def code(result: Any) -> Any:
        """0: solved, 1: more than max_steps steps, 2: another failure."""
        return jnp.where(result == diffrax.RESULTS.successful, 0,
                         jnp.where(result == diffrax.RESULTS.max_steps_reached, 1, 2)).astype(jnp.int32)

    def one(y0: Any, p: dict[str, Any], e: dict[str, Any]) -> tuple[Any, Any]:
        """One individual's interval: ``y0 [S]`` -> ``y1 [S]`` (time rescaled to s ∈ [0, 1]) and its code."""
        def field(s: Any, y: Any, args: Any) -> Any:
            d = rhs(e["t0"] + s * e["dt"], tuple(y[i] for i in range(num_states)), e, p)
            return e["dt"] * jnp.stack([jnp.asarray(di, dtype=y.dtype) for di in d])

        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), method, 0.0, 1.0, None, y0,
                                  saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
                                  adjoint=diffrax.DirectAdjoint(), max_steps=max_steps, throw=False)
        return sol.ys[-1], code(sol.result)

    def body(carry: tuple, e: dict[str, Any]) -> tuple[tuple, Any]:
        x, failed = carry  # failed [..., N]: an earlier interval's solve failed
        x, out = jump(x, e)
        out = jnp.where(failed[..., None] if jnp.ndim(out) > failed.ndim else failed, jnp.nan, out)
        e = {**e, "dt": jnp.where(failed, 0.0, e["dt"])}  # nothing more to solve where it failed
        x = tuple(jnp.where(failed, 0.0, v) for v in x)

        def solve_joint(y0: tuple) -> tuple[tuple, Any]:
            def field(s: Any, y: tuple, args: Any) -> tuple:
                return tuple(e["dt"] * d for d in rhs(e["t0"] + s * e["dt"], y, e, params))

            sol = diffrax.diffeqsolve(diffrax.ODETerm(field), method, 0.0, 1.0, None, y0,
                                      saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
                                      adjoint=diffrax.DirectAdjoint(), max_steps=max_steps, throw=False)
            return (tuple(jnp.asarray(y[-1], dtype=v.dtype) for y, v in zip(sol.ys, y0, strict=True)),
                    jnp.broadcast_to(code(sol.result), shape))

        def solve_each(y0: tuple) -> tuple[tuple, Any]:
            flat = lambda a: jnp.broadcast_to(a, shape).reshape(-1)  # noqa: E731
            ys = jnp.stack([flat(v) for v in y0], -1)  # [M, S]
            y1, codes = jax.vmap(one)(ys, {k: flat(v) for k, v in params.items()}, jax.tree_util.tree_map(flat, e))
            return (tuple(jnp.asarray(y1[:, i].reshape(shape), dtype=v.dtype) + 0 * v for i, v in enumerate(y0)),
                    codes.reshape(shape))

        def skip(y0: tuple) -> tuple[tuple, Any]:
            return tuple(jnp.broadcast_to(v, shape).astype(v.dtype) + 0 * v for v in y0), jnp.zeros(shape, jnp.int32)

        x = tuple(jnp.broadcast_to(v, shape).astype(v.dtype) for v in x)
        x, codes = lax.cond(jnp.any(e["dt"] > 0), solve_each if solver == "stiff" else solve_joint, skip, x)
        return (x, failed | (codes > 0)), (out, codes)

    init = (tuple(jnp.broadcast_to(v, shape).astype(jnp.result_type(v)) for v in x0), jnp.zeros(shape, bool))
    _, (outs, codes) = lax.scan(body, init, seq)
    if not isinstance(codes, jax.core.Tracer):  # eager: a failure is an error with the clear message
        codes = np.asarray(codes)  # [E, ..., N]
        if codes.any():
            k, *rest = np.argwhere(codes > 0)[0]
            n = int(rest[-1])
            t0 = float(np.asarray(events["t0"])[n, k])
            raise _too_many_steps(solver, max_steps, f"t={t0:g} and t={t0 + float(np.asarray(events['dt'])[n, k]):g} "
                                  f"(individual {n + 1} of the data)", x0, rtol, codes[k][tuple(rest)] == 1, "jax")
    return jnp.moveaxis(outs, 0, -1)


def _too_many_steps(solver: str, max_steps: int, where: str, x0: tuple, rtol: float,
                    max_steps_reached: bool = True, backend: str = "torch") -> RuntimeError:
    """The error of a solve that needed more than ``max_steps`` steps (or otherwise failed), with what to do; on
    float32 arrays with an ``rtol`` finer than they resolve, says so."""
    what = (f"needed more than max_steps={max_steps} steps" if max_steps_reached else "failed (the implicit "
            "solver's Newton iterations or the step size collapsed)")
    hint = ""
    eps = _eps(x0)
    if eps is not None and eps > 1e-10 and rtol < 100 * eps:
        hint = (f"; the arrays are float32 (on JAX: jax_enable_x64 is off), which cannot resolve rtol={rtol:g} "
                f"(below 100 × eps = {100 * eps:.1g}): turn on float64 with jax.config.update('jax_enable_x64', "
                f"True) before building the model, or loosen rtol")
    other = ("" if backend == "jax" and solver == "stiff" else ", or solver='stiff'" if backend == "jax"
             else ", or use the JAX backend's 'stiff' solver")
    return RuntimeError(f"nlme.ode(solver={solver!r}): the solver {what} between the events at {where} (a stiff or "
                        f"badly scaled system?): raise max_steps=, loosen rtol/atol{other}{hint}")


def _eps(x0: tuple) -> float | None:
    """Machine epsilon of the states' floating dtype (None if not floating)."""
    try:
        return float(np.finfo(np.dtype(str(x0[0].dtype).replace("torch.", ""))).eps)
    except (TypeError, ValueError, AttributeError, IndexError):
        return None


def _jax_max_norm(y: Any) -> Any:
    """Max-norm of a pytree (every component within its tolerance); 0 for an empty tree."""
    import jax
    import jax.numpy as jnp

    leaves = [jnp.max(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(y) if leaf.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(())


def _integrate_torch(solver: str, x0: tuple, events: dict[str, Any], jump: Callable, rhs: Callable,
                     params: dict[str, Any], rtol: float, atol: float, max_steps: int) -> Any:
    """A Python loop over the events; on each interval all individuals are one system (max-norm error control)."""
    torchdiffeq = _require("torchdiffeq", solver, "torch")
    import torch

    def at(tree: Any, k: int) -> Any:
        if isinstance(tree, dict):
            return {key: at(v, k) for key, v in tree.items()}
        if isinstance(tree, list | tuple):
            return type(tree)(at(v, k) for v in tree)
        return tree[..., k]

    def linf(y: Any) -> Any:
        return max(torch.max(torch.abs(v)) for v in y) if isinstance(y, tuple) else torch.max(torch.abs(y))

    n_ev = events["t0"].shape[-1]
    span = torch.tensor([0.0, 1.0], dtype=events["t0"].dtype, device=events["t0"].device)
    x, outputs = tuple(x0), []
    for k in range(n_ev):
        e = at(events, k)
        x, out = jump(x, e)
        outputs.append(out)
        dt = e["dt"]
        if k == n_ev - 1 or not bool(torch.any(dt > 0)):
            continue

        def field(s: Any, y: tuple, dt: Any = dt, e: dict = e) -> tuple:
            return tuple(dt * d for d in rhs(e["t0"] + s * dt, y, e, params))

        try:
            ys = torchdiffeq.odeint(field, x, span, rtol=rtol, atol=atol, method="dopri5",
                                    options={"norm": linf, "max_num_steps": max_steps})
        except AssertionError as exc:
            if "max_num_steps" not in str(exc):
                raise
            raise _too_many_steps(solver, max_steps, f"t={e['t0'].tolist()}", x, rtol) from exc
        x = tuple(y[-1] for y in ys)
    return torch.stack(outputs, -1)


__all__ = ["integrate_events", "EXTRA"]
