"""MCMCSGD's Fisher-scoring step (``optimizer="fisher"``): stochastic approximation preconditioned by the
complete-data information.

Iteration k of :class:`~latentfit.inference.mcmcsgd.MCMCSGD` has the Fisher-identity gradient
``ĝ_k = Σ_i mean_chains ∇_θ log p(y_i, z_i^{(k)}; θ_{k−1})`` (unconstrained θ).  This step replaces the optimiser by

    Ĥ_k = E_{z' ~ p(z; θ)}[−∇²_θ log p(z'; θ)] + (−∇²_θ log p(y | z^{(k)}; θ)),     Γ_k = Γ_{k−1} + γ_k (Ĥ_k − Γ_{k−1}),
    θ_k = θ_{k−1} + γ_k Γ_k⁻¹ ĝ_k,

the first term the expected information of the latents' prior (one draw of every unit's latents from the prior at
θ_{k−1}; with ``information="exact"``, Gaussian latents, its exact value, the mean over the prior's 2d sigma points
``μ_i ± √d L e_j``, as ``log p(z; θ)`` is quadratic in z), the second the observed information of the likelihood at
the chains (zero where θ does not enter it, and then not computed: with MCMCSGD's pruned gradient the first term is
the Hessian of the closed-form Gaussian prior; ``information_every = m`` refreshes Γ at every m-th step only):
Fisher scoring on the complete data, the stochastic-approximation Newton step of Gu & Kong (1998, JASA) with the
expected rather than the observed complete-data Hessian (off the maximum the latter is indefinite in a location and
its log-scale).  In an exponential family this is SAEM's step in θ-space (Delyon, Lavielle & Moulines 1999: an SA
E-step is a gradient step preconditioned by the complete information, ALGORITHMS.md §1), and like EM it is slow
where most of the information is missing (a weakly identified random intercept: its complete information is 100×
the observed one in benchmarks/mcmcsgd_logistic.py).  SAEM escapes that phase by annealing its variances; here the
first ``momentum_steps`` steps add heavy-ball momentum, ``θ_k = θ_{k−1} + a Γ_k⁻¹ ĝ_k + μ (θ_{k−1} − θ_{k−2})``
(Polyak 1964) with ``a = 3``, ``μ = 0.8``: on a quadratic whose observed information is ``λ Γ`` with ``0 < λ ≤ 1`` (the
observed information never exceeds the complete one) it is stable for ``a < 2 (1 + μ)`` and contracts a slow
direction by about ``1 − a λ / (1 − μ)`` per step instead of ``1 − λ``: 15× faster where 99 % of the information is
missing.  Then (``schedule="sem"``, MCMCSGD's default for this step) ``γ_k = 1`` to the end: Fisher scoring's γ = 1
step on the complete data is stochastic EM in θ (with exact information and a Gaussian prior, ``β_k`` is the mean of
the chains' draws), whose iterates do not converge but wander around the maximum with a spread of the Monte-Carlo
noise's order, in every direction, however much information is missing; the fit reports their average after
``average_from = burn_in + momentum_steps``, weighted by index (``averaging="linear"``, which forgets the end of the
heavy-ball transient).  The schedule before, ``schedule="decay"``, took ``γ_k = (k − average_from)^{−0.6}`` after
``average_from = burn_in + num_iters / 5`` with the uniform Polyak–Ruppert average, as MCMCSGD's other optimisers; but
with the complete information as preconditioner a small γ contracts a direction by ``γ λ`` per step (λ its observed /
complete information ratio, 0.01 for this benchmark's random intercept), so the iterate froze where the γ = 1 phase
left it and the average could not remove that point's Monte-Carlo error: the fit's final log-likelihood was a draw
from the γ = 1 iterate's spread at ``average_from`` (benchmarks/mcmcsgd_logistic.py, "Fisher scoring, γ = 1 to the
end").

Schedule: ``momentum_steps`` (MCMCSGD's option; default 60 % of the first fifth of the iterations: 60 of 500).

Safeguards: Γ's eigenvalues are taken in absolute value and floored at ``1e-8`` of the largest (an indefinite or
singular estimate never gives an infinite step); each step is shrunk so that no unconstrained coordinate moves by
more than ``MAX_STEP``; a non-finite Γ or step falls back to the Adam step of that iteration (both kept in the state).
Models with more than ``MAX_PARAMS`` free parameters (a neural network) use Adam throughout: Γ is ``p × p``.
"""

from __future__ import annotations

from typing import Any

#: free parameters above which ``"fisher"`` (and ``"auto"``) use Adam instead: Γ is p × p, its Hessian p passes
MAX_PARAMS = 64
#: heavy-ball rate and momentum of the first phase (stable for RATE < 2 (1 + MOMENTUM) when observed ≤ complete)
RATE, MOMENTUM = 3.0, 0.8
#: decay exponent of γ_k after ``average_from``
ALPHA = 0.6
#: the largest move of one unconstrained coordinate in one step (a trust region against a near-singular Γ)
MAX_STEP = 2.0
#: eigenvalues of Γ below this fraction of the largest are raised to it
EIG_FLOOR = 1e-8


def information(ops: Any, log_terms: Any, x: Any) -> Any:
    """``−∇²_x log_terms(x)``: the Hessian of a scalar function of the flat free parameters, negated."""
    return -ops.hessian(log_terms, vectorize=True)(x)


def solve(ops: Any, gamma: Any, grad: Any) -> tuple[Any, Any]:
    """``Γ⁻¹ ĝ`` with Γ's eigenvalues in absolute value, floored at ``EIG_FLOOR`` of the largest; and whether Γ and
    the step are finite (else the caller falls back to its Adam step)."""
    xp = ops.xp
    sym = 0.5 * (gamma + xp.swapaxes(gamma, -1, -2))
    ok_in = xp.all(xp.isfinite(sym))
    # a non-finite Γ is replaced by the identity before the decomposition (not ``0 · Γ + I``, which keeps its NaNs: an
    # eigensolver may then fail to converge rather than return NaNs, torch's ``linalg.eigh`` raising)
    eye = xp.diag(xp.ones_like(xp.diagonal(sym)))
    sym = xp.where(ok_in, sym, eye)
    w, v = ops.eigh(sym)
    w = xp.abs(w)
    w = xp.maximum(w, EIG_FLOOR * xp.max(w) + 1e-300)
    step = v @ ((xp.swapaxes(v, -1, -2) @ grad) / w)
    ok = ok_in & xp.all(xp.isfinite(step)) & (xp.max(w) > 0)
    return xp.where(ok, step, 0.0 * grad), ok


def trust_region(ops: Any, step: Any) -> Any:
    """``step`` shrunk so that ``max_j |step_j| ≤ MAX_STEP``."""
    xp = ops.xp
    big = xp.max(xp.abs(step))
    return step * xp.where(big > MAX_STEP, MAX_STEP / (big + 1e-300), 1.0)


#: the momentum phase's rate and momentum fall linearly to Fisher scoring's (1, 0) over the phase (or stay: False)
TAPER = True


def momentum_of(t: Any, steps: int) -> tuple[Any, Any]:
    """Heavy-ball rate and momentum of gradient step ``t ≤ steps``: ``(RATE, MOMENTUM)``, tapered linearly toward
    ``(1, 0)`` at ``t = steps`` when ``TAPER``."""
    if not TAPER:
        return RATE + 0.0 * t, MOMENTUM + 0.0 * t
    left = 1.0 - (t - 1) / max(steps, 1)
    return 1.0 + (RATE - 1.0) * left, MOMENTUM * left


def gamma_of(t: Any, explore: int) -> Any:
    """``γ_t = 1`` for gradient steps ``t ≤ explore``, then ``(t − explore)^{−ALPHA}``."""
    over = t - explore
    return 1.0 * (over <= 0) + (over > 0) * (over * (over > 0) + 1.0 * (over <= 0)) ** (-ALPHA)


__all__ = ["ALPHA", "MAX_PARAMS", "MAX_STEP", "MOMENTUM", "RATE", "gamma_of", "information", "solve", "trust_region"]
