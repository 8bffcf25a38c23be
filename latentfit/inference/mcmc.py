"""Batched Metropolis–Hastings kernels for per-unit latents (saemix's MCMC step).

All kernels advance every chain of every unit in one vectorised call: ``z`` is ``[L, n, d]``
(chains × units × latent dim, unconstrained space) and the target of unit i is
``π_i(z) ∝ p(y_i | z; θ) p(z; θ)``.  ``evaluate(z) -> (log_lik, log_prior)`` returns ``[L, n]``
arrays, and a :class:`ChainState` caches both for the current state so that each proposal costs
one model evaluation.

Kernels (Kuhn & Lavielle, "Maximum likelihood estimation in nonlinear mixed effects models", CSDA 2005; as
in saemix: Comets, Lavenu & Lavielle, "Parameter estimation in nonlinear mixed effect models using saemix,
an R implementation of the SAEM algorithm", J. Stat. Softw. 2017):

1. independent proposal from the prior, ``z' ~ p(z; θ)``: the prior cancels and the ratio is
   ``p(y_i|z')/p(y_i|z)``;
2. component-wise random walk ``z'_j = z_j + d_j ε``, one coordinate at a time;
3. random-block random walk over a random block of ``r = (k mod (d−1)) + 2`` coordinates.

After kernels 2 and 3 the scales adapt toward 40% acceptance: ``d_j ← d_j (1 + 0.4 (acc_j − 0.4))``.
A generic independence sampler (full IMH ratio) serves f-SAEM's Laplace proposal and TTSEM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .ops import Ops

Evaluate = Callable[[Any], tuple[Any, Any]]

TARGET_ACCEPTANCE = 0.4
ADAPT_RATE = 0.4


class ChainState(NamedTuple):
    z: Any  # [L, n, d]
    log_lik: Any  # [L, n]
    log_prior: Any  # [L, n]


def init_chain_state(z: Any, evaluate: Evaluate) -> ChainState:
    ll, lp = evaluate(z)
    return ChainState(z, ll, lp)


def _accept(ops: Ops, key: Any, log_ratio: Any, state: ChainState, z_new: Any, ll_new: Any, lp_new: Any):
    xp = ops.xp
    u = ops.uniform(key, tuple(log_ratio.shape))
    # NaN proposals (outside the model's domain) are always rejected
    ok = xp.log(u) < xp.where(log_ratio != log_ratio, -xp.inf, log_ratio)
    z = xp.where(ok[..., None], z_new, state.z)
    ll = xp.where(ok, ll_new, state.log_lik)
    lp = xp.where(ok, lp_new, state.log_prior)
    return ChainState(z, ll, lp), ok


def prior_imh(ops: Ops, key: Any, state: ChainState, sample_prior: Callable[[Any], Any],
              evaluate: Evaluate) -> tuple[ChainState, Any]:
    """Independent MH with the prior as proposal; returns the state and the acceptance rate."""
    k1, k2 = ops.split(key)
    z_new = sample_prior(k1)
    ll_new, lp_new = evaluate(z_new)
    state, ok = _accept(ops, k2, ll_new - state.log_lik, state, z_new, ll_new, lp_new)
    return state, ops.xp.mean(ok * 1.0)


def independent_mh(ops: Ops, key: Any, state: ChainState, z_new: Any, log_q_new: Any, log_q_old: Any,
                   evaluate: Evaluate) -> tuple[ChainState, Any]:
    """Independence sampler with the full ratio ``π(z')q(z) / (π(z)q(z'))`` (f-SAEM, TTSEM).

    ``z_new`` are the proposals, ``log_q_new``/``log_q_old`` the proposal log-densities at the
    proposals and at the current states (``[L, n]``).  Returns the state and the per-unit
    acceptance indicators ``[L, n]``.
    """
    ll_new, lp_new = evaluate(z_new)
    log_ratio = (ll_new + lp_new - log_q_new) - (state.log_lik + state.log_prior - log_q_old)
    return _accept(ops, key, log_ratio, state, z_new, ll_new, lp_new)


def rw_componentwise(ops: Ops, key: Any, state: ChainState, scale: Any,
                     evaluate: Evaluate) -> tuple[ChainState, Any]:
    """One sweep of coordinate-wise random-walk MH; returns the state and acceptance per coordinate."""
    xp = ops.xp
    d = state.z.shape[-1]
    keys = ops.split(key, 2 * d)
    eye = ops.asarray([[1.0 if i == j else 0.0 for i in range(d)] for j in range(d)])

    def body(j: Any, carry: tuple[ChainState, Any]) -> tuple[ChainState, Any]:
        # one latent coordinate (a loop over the small d, vectorised over chains and units)
        st, acc = carry
        onehot = eye[j]
        step = ops.normal(keys[2 * j], tuple(st.z.shape[:-1]))[..., None] * (scale * onehot)
        z_new = st.z + step
        ll_new, lp_new = evaluate(z_new)
        log_ratio = ll_new + lp_new - st.log_lik - st.log_prior
        st, ok = _accept(ops, keys[2 * j + 1], log_ratio, st, z_new, ll_new, lp_new)
        return st, acc + onehot * xp.mean(ok * 1.0)

    return ops.fori_loop(0, d, body, (state, ops.zeros((d,))))


def random_block_mask(ops: Ops, key: Any, d: int, k: Any) -> Any:
    """Mask of a random block of ``r = (k mod (d−1)) + 2`` coordinates (all of them when d ≤ 2)."""
    xp = ops.xp
    if d <= 2:
        return ops.ones((d,))
    r = (k % (d - 1)) + 2
    ranks = xp.argsort(ops.uniform(key, (d,)))
    return (ranks < r) * 1.0


def rw_block(ops: Ops, key: Any, state: ChainState, scale: Any, mask: Any,
             evaluate: Evaluate) -> tuple[ChainState, Any]:
    """Random-walk MH moving the coordinates in ``mask`` jointly; returns state and acceptance."""
    xp = ops.xp
    k1, k2 = ops.split(key)
    step = ops.normal(k1, tuple(state.z.shape)) * (scale * mask)
    z_new = state.z + step
    ll_new, lp_new = evaluate(z_new)
    log_ratio = ll_new + lp_new - state.log_lik - state.log_prior
    state, ok = _accept(ops, k2, log_ratio, state, z_new, ll_new, lp_new)
    return state, xp.mean(ok * 1.0)


def adapt_scale(scale: Any, acceptance: Any, mask: Any = None) -> Any:
    """saemix adaptation ``d_j ← d_j (1 + 0.4 (acc_j − 0.4))`` (only where ``mask`` is 1)."""
    new = scale * (1.0 + ADAPT_RATE * (acceptance - TARGET_ACCEPTANCE))
    if mask is None:
        return new
    return mask * new + (1.0 - mask) * scale
