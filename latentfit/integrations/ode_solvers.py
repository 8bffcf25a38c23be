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
* torch, ``"adaptive"`` (``torchdiffeq``): ``odeint(method="dopri5")`` (Dormand–Prince 5(4)), differentiated by
  backpropagation through the solver's operations.
* torch, ``"stiff"``: RODAS4 (Hairer & Wanner 1996, §IV.7: a 6-stage Rosenbrock method of order 4 with an embedded
  order-3 error estimate, L-stable and stiffly accurate; the coefficients of Hairer's ``rodas.f``), written here on
  torch because no maintained torch ODE library has an implicit method (torchdiffeq 0.2, torchode: explicit and
  Adams only; an explicit step is bounded by ``|λ|·h ≲ 3.3``, thousands of steps on a binding process).  Each step
  solves, with ``W = I/(hγ) − J`` factorised once (``J = ∂f/∂x`` per individual, ``S × S``, by central differences
  in one batched call of ``rhs`` on ``2S + 2`` copies of the state, beside ``∂f/∂t``):

      W·k_i = f(s + c_i·h, x + Σ_{j<i} a_ij·k_j) + Σ_{j<i} (c_ij / h)·k_j + h·d_i·∂f/∂t,   i = 1..6,

  ``x₁ = x + Σ_{j<5} a_5j·k_j + k_5 + k_6`` and the local error estimate ``k_6``; the step ``h ← h·min(6, max(0.2,
  0.9·err^(−1/4)))``.  All individuals (and chains) share the steps; the operations are torch's, so gradients flow
  through the solve by backpropagation (the Jacobian included: the derivative of the computed solution).  An
  individual whose state or rates are not finite at the start of an interval (an MCMC proposal where the model is
  NaN) is left out of the error control and ends the interval NaN, as on JAX: its proposal is rejected, the others
  are solved as without it.
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
    other = "" if solver == "stiff" else ", or solver='stiff'"
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


#: RODAS4 (Hairer & Wanner's ``rodas.f``, METH = 1): γ, the abscissae c_i, the ∂f/∂t weights d_i, and the
#: lower-triangular a_ij (stage arguments) and c_ij (stage couplings); stage 6's argument is stage 5's plus k_5
RODAS4_GAMMA = 0.25
RODAS4_C = (0.0, 0.386, 0.21, 0.63, 1.0, 1.0)
RODAS4_D = (0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0)
RODAS4_A = ((), (1.544,), (0.9466785280815826, 0.2557011698983284),
            (3.314825187068521, 2.896124015972201, 0.9986419139977817),
            (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950),
            (1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950, 1.0))
RODAS4_COUPLING = ((), (-5.6688,), (-2.430093356833875, -0.2063599157091915),
                   (-0.1073529058151375, -9.594562251023355, -20.47028614809616),
                   (7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160),
                   (8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136,
                    -6.058818238834054))


def _torch_linearisation(field: Callable[[Any, Any], Any], s: float, y: Any) -> tuple[Any, Any, Any]:
    """``f(s, y) [..., S]``, its Jacobian ``∂f/∂y [..., S, S]`` and ``∂f/∂s [..., S]`` from one call of ``field`` on
    ``2S + 2`` stacked copies of the state (``field`` is elementwise over the leading axes, so the copies broadcast;
    ``s`` comes as ``[2S + 2, 1, …]``): the state; the state with its component ``j`` moved by ``±δ_j``,
    ``δ_j = eps^(1/3)·max(10⁻⁵, |y_j|)`` (central differences: error ~eps^(2/3), ~4e-11 relative in float64); and
    ``s`` moved forward by ``√(eps·max(10⁻⁵, s))`` (as ``rodas.f``; it stays inside the interval).

    A Rosenbrock method is exact only with the exact Jacobian: on a stiff system the Jacobian's error times the
    fast rates perturbs the slow modes, and one-sided differences (error ~√eps) made the steps 30× shorter on a
    system with rates 1 and 10⁶.  torch's forward-mode AD would be exact but runs its elementwise rules through
    Python references (~30-50× the cost of these copies)."""
    import torch

    n = y.shape[-1]
    eps = float(torch.finfo(y.dtype).eps)
    delta = eps ** (1.0 / 3.0) * y.detach().abs().clamp_min(1e-5)  # [..., S]
    lead = (1,) * (y.dim() - 1)
    eye = torch.eye(n, dtype=y.dtype, device=y.device).reshape(n, *lead, n)
    y0 = y.unsqueeze(0)
    moved = torch.cat([y0, y0 + eye * delta, y0 - eye * delta, y0], 0)  # [2S + 2, ..., S]
    ds = (eps * max(1e-5, abs(float(s)))) ** 0.5
    times = torch.full((2 * n + 2, *lead), float(s), dtype=y.dtype, device=y.device)
    times[-1] = float(s) + ds
    out = field(times, moved).expand(2 * n + 2, *y.shape)
    f0 = out[0]
    jac = torch.movedim(out[1:n + 1] - out[n + 1:2 * n + 1], 0, -1) / (2 * delta.unsqueeze(-2))  # [..., a, j]
    return f0, jac, (out[-1] - f0) / ds


def rodas4_step(field: Callable[[Any, Any], Any], s: float, y: Any, h: float) -> tuple[Any, Any]:
    """One RODAS4 step of ``dy/ds = field(s, y)`` (``y [..., S]``, elementwise over the leading axes) from ``s`` to
    ``s + h``: the new state and the local error estimate ``k_6`` (module docstring)."""
    import torch

    f0, jac, f_s = _torch_linearisation(field, s, y)
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    lu, pivots, _ = torch.linalg.lu_factor_ex(eye / (h * RODAS4_GAMMA) - jac)  # singular: non-finite k, rejected
    ks: list[Any] = []
    arg = y
    for i in range(6):
        if i == 0:
            rhs = f0
        else:
            arg = y + sum(a * k for a, k in zip(RODAS4_A[i], ks, strict=False))
            rhs = field(s + RODAS4_C[i] * h, arg)
        rhs = rhs + sum((c / h) * k for c, k in zip(RODAS4_COUPLING[i], ks, strict=False))
        if RODAS4_D[i]:
            rhs = rhs + (h * RODAS4_D[i]) * f_s
        ks.append(torch.linalg.lu_solve(lu, pivots, rhs.unsqueeze(-1)).squeeze(-1))
    return arg + ks[5], ks[5]


def rodas4_solve(field: Callable[[Any, Any], Any], y0: Any, *, rtol: float, atol: float, max_steps: int,
                 where: Callable[[], str] = lambda: "") -> tuple[Any, int]:
    """``y(1)`` of ``dy/ds = field(s, y)``, ``y(0) = y0 [..., S]``, by RODAS4 steps under max-norm error control
    (``|k_6| ≤ atol + rtol·max(|y|, |y₁|)`` in every component); returns it and the number of steps taken.  Raises
    the :func:`_too_many_steps` error past ``max_steps`` steps (accepted or rejected) or when the step collapses
    (``where()``: the interval, for the message)."""
    import torch

    f0 = field(0.0, y0).detach()
    live = (torch.isfinite(y0.detach()) & torch.isfinite(f0)).all(-1, keepdim=True)  # rows [..., 1] with finite rates

    def err_norm(y: Any, y1: Any, err: Any) -> float:
        scale = atol + rtol * torch.maximum(y.detach().abs(), y1.detach().abs())
        ratio = torch.where(live, err.detach().abs() / scale, 0.0)  # a dead row stays out (and ends NaN)
        value = float(torch.max(ratio)) if err.numel() else 0.0
        return value if np.isfinite(value) else float("inf")

    if not bool(live.any()):  # no row to solve: every one ends NaN
        return y0 + float("nan"), 0
    scale0 = atol + rtol * y0.detach().abs()
    d0 = float(torch.max(y0.detach().abs() / scale0)) if y0.numel() else 0.0
    d1 = float(torch.max(f0.abs() / scale0)) if y0.numel() else 0.0
    h = 1.0 if d1 <= 1e-5 else min(1.0, max(1e-6, 0.01 * max(d0, 1e-5) / d1))  # Hairer's first guess
    s, y, steps, taken = 0.0, y0, 0, 0
    while s < 1.0:
        if steps >= max_steps:
            raise _too_many_steps("stiff", max_steps, where(), (y0,), rtol)
        h = min(h, 1.0 - s)
        y1, err = rodas4_step(field, s, y, h)
        e = err_norm(y, y1, err)
        if e <= 1.0:  # (the dead rows' values: NaN, never used to steer the steps)
            y1 = torch.where(live, y1, float("nan"))
        steps += 1
        if e <= 1.0:
            s = 1.0 if 1.0 - (s + h) < 1e-12 else s + h
            y, taken = y1, taken + 1
        factor = 6.0 if e == 0.0 else min(6.0, max(0.2, 0.9 * e ** -0.25))
        h *= factor if e <= 1.0 else min(factor, 0.9)
        if h < 1e-13:
            raise _too_many_steps("stiff", max_steps, where(), (y0,), rtol, max_steps_reached=False)
    return y, taken


def _integrate_torch(solver: str, x0: tuple, events: dict[str, Any], jump: Callable, rhs: Callable,
                     params: dict[str, Any], rtol: float, atol: float, max_steps: int) -> Any:
    """A Python loop over the events; on each interval all individuals are one system (max-norm error control):
    torchdiffeq's ``dopri5`` (``"adaptive"``) or :func:`rodas4_solve` (``"stiff"``)."""
    import torch

    torchdiffeq = _require("torchdiffeq", solver, "torch") if solver != "stiff" else None

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

        if solver == "stiff":
            shape = torch.broadcast_shapes(*(v.shape for v in x), dt.shape, *(v.shape for v in params.values()))

            def stacked(s: Any, y: Any, field: Callable = field) -> Any:
                d = field(s, tuple(y[..., i] for i in range(y.shape[-1])))
                return torch.stack(torch.broadcast_tensors(*d, y[..., 0]), -1)[..., :len(d)] if len(d) else y

            y0 = torch.stack([torch.broadcast_to(v, shape) for v in x], -1)
            y1, _ = rodas4_solve(stacked, y0, rtol=rtol, atol=atol, max_steps=max_steps,
                                 where=lambda e=e: f"t={e['t0'].tolist()}")
            x = tuple(y1[..., i] for i in range(len(x)))
            continue
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
