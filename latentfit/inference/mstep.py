"""Numerical M-step for parameters without a closed form (saemix recipe).

saemix maximises the complete-data log-likelihood of the current simulated latents over the
parameters that have no closed-form update, then smooths the result with the SAEM step
(``θ_k = θ_{k−1} + γ_k (θ̃_k − θ_{k−1})``).  Here the maximisation is a damped Newton method in
unconstrained space with autodiff gradient and Hessian: the Hessian is made negative definite
through its eigen-decomposition (|λ| floored) and each step is chosen by a vectorisable
backtracking over fixed fractions (:func:`damped_newton_update`, shared with the batched per-unit
Newton of :mod:`latentfit.inference.laplace`), so the same code runs eagerly (torch) and compiled (JAX);
close to the maximum (predicted gain below :data:`EXACT_NEWTON_GAIN`) the full step is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .ops import Ops

#: step fractions tried by the vectorised backtracking (the best improving one wins; none: no move)
BACKTRACK = (1.0, 0.5, 0.25, 0.0625)
#: :func:`newton_maximize` takes the full Newton step, without comparing objective values, once the quadratic model
#: predicts a gain ``½ gᵀ step`` below this fraction of ``1 + |f(x)|``: there the values differ by little more than
#: their rounding, so the backtracking's choice would be noise (and the result known only to ~sqrt(machine eps)),
#: while the Newton step itself is accurate (quadratic convergence)
EXACT_NEWTON_GAIN = 1e-10


def flatten(ops: Ops, tree: dict[str, Any], names: list[str]) -> Any:
    xp = ops.xp
    if not names:
        return ops.zeros((0,))
    return xp.concatenate([xp.reshape(tree[n], (-1,)) for n in names])


def unflatten(flat: Any, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    out, offset = {}, 0
    for n in names:
        size = int(np.prod(shapes[n])) if shapes[n] else 1
        out[n] = flat[offset:offset + size].reshape(shapes[n])
        offset += size
    return out


def newton_maximize(ops: Ops, objective: Callable[[Any], Any], x0: Any, num_steps: int = 8,
                    max_step: float = 3.0, reduce: Callable[[Any], Any] | None = None) -> Any:
    """Maximise a smooth scalar ``objective`` of a flat vector, starting at ``x0``.

    ``reduce``: the objective is ``reduce(objective(x))`` — a data-parallel fit's sum over the processes
    (``ops.all_sum``, each process's ``objective`` a sum over its units): its value, gradient and Hessian are each
    process's own, summed (``∇ Σ_r f_r = Σ_r ∇ f_r``), so every process takes the same step.
    """
    xp = ops.xp
    value_and_grad = ops.value_and_grad(objective)
    hessian = ops.hessian(objective)
    if reduce is not None:
        local = objective

        def objective(x: Any) -> Any:
            return reduce(local(x))

    def body(_: int, x: Any) -> Any:
        val, g = value_and_grad(x)
        h = hessian(x)
        if reduce is not None:
            val, g, h = reduce(val), reduce(g), reduce(h)
        # a non-finite derivative (e.g. an ODE solution blowing up far in the tails) gives no step in
        # that direction rather than a failed eigen-decomposition; backtracking rejects NaN objectives
        g = xp.where(xp.isfinite(g), g, 0.0)
        h = xp.where(xp.isfinite(h), h, 0.0)
        w, v = ops.eigh(-0.5 * (h + h.T))
        w_abs = xp.abs(w)
        floor = 1e-6 * xp.max(w_abs) + 1e-8
        w_abs = xp.where(w_abs < floor, floor, w_abs)
        step = v @ ((v.T @ g) / w_abs)
        near = 0.5 * xp.sum(g * step) <= EXACT_NEWTON_GAIN * (1.0 + xp.abs(val))  # False when val is NaN
        if not ops.jittable and bool(near):  # eager: the same result without the backtracking's evaluations
            return x + step
        return xp.where(near, x + step, damped_newton_update(ops, objective, x, val, step, max_step))

    return ops.fori_loop(0, num_steps, body, x0)


def damped_newton_update(ops: Ops, objective: Callable[[Any], Any], x: Any, value: Any, step: Any,
                         max_step: float) -> Any:
    """``x + α·step`` for independent rows ``x [..., d]`` (a single vector: no leading dims).

    ``value [...]`` is ``objective(x)`` (row-wise); each row's step is capped at norm ``max_step``, and α is,
    row by row, the fraction in :data:`BACKTRACK` with the best objective that improves on ``value`` (a row
    that no fraction improves, or whose candidates are NaN, stays).  No data-dependent control flow.
    """
    xp = ops.xp
    norm = xp.sqrt(xp.sum(step * step, -1))[..., None]
    step = step * xp.where(norm > max_step, max_step / (norm + 1e-30), 1.0)
    fracs = ops.asarray(np.asarray(BACKTRACK), dtype=step.dtype)  # powers of 2: exact in any float dtype

    def try_fraction(i: Any, best: tuple[Any, Any]) -> tuple[Any, Any]:
        best_x, best_val = best
        cand = x + fracs[i] * step
        cv = objective(cand)
        better = (cv > best_val) & (cv == cv)
        return xp.where(better[..., None], cand, best_x), xp.where(better, cv, best_val)

    # one traced objective on JAX (unrolled, the four candidates made the Laplace and M-step programs four
    # objectives larger to trace and compile); torch: a loop
    return ops.fori_loop(0, len(BACKTRACK), try_fraction, (x, value))[0]
