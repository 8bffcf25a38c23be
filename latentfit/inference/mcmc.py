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

Blocks of units (eager backends, many units): when ``evaluate`` is a
:class:`~latentfit.inference.model.UnitBlockEvaluator` whose ``unit_blocks(z)`` are not None (torch, once an
``[L, n, T]`` temporary of the model would pass :attr:`~latentfit.inference.ops.Ops.unit_block_values`), each kernel
step draws its random numbers whole and in the same order as the unblocked step (the proposal noise, then the
uniforms), then evaluates, accepts and writes one block of units at a time into the output chain arrays
(:func:`_accept_blocks`): one block's proposals, log-densities and masks are alive at once instead of ``[L, N]`` arrays
of each, and the chains are the unblocked step's bit for bit (the same element-wise operations on each unit; the
acceptance rates are means of the same 0/1 indicators, whose sums are exact).  JAX never blocks (XLA fuses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .ops import Ops

#: ``z -> (log_lik, log_prior)``, or ``z -> (log_lik, log_prior, cache)`` for a chain that carries a per-unit cache
Evaluate = Callable[[Any], tuple[Any, ...]]

TARGET_ACCEPTANCE = 0.4
ADAPT_RATE = 0.4


class ChainState(NamedTuple):
    z: Any  # [L, n, d]
    log_lik: Any  # [L, n]
    log_prior: Any  # [L, n]
    #: proposals rejected so far because their log-density was NaN or ±inf (a float scalar)
    num_nonfinite: Any = 0.0
    #: what the model keeps per chain and unit to re-score the state without re-evaluating it (e.g. NLME's residual
    #: sum of squares ``[L, n]``; :meth:`~latentfit.inference.model.LatentModel.cached_density`); None: nothing
    cache: Any = None


def _evaluate(evaluate: Evaluate, z: Any) -> tuple[Any, Any, Any]:
    """``(log_lik, log_prior, cache)`` of ``z`` (cache None for an evaluator of two values)."""
    out = evaluate(z)
    return out[0], out[1], (out[2] if len(out) > 2 else None)


def init_chain_state(z: Any, evaluate: Evaluate, cache: Any = None,
                     rescore: Callable[[Any, Any], tuple[Any, Any]] | None = None) -> ChainState:
    """The chains at ``z``: evaluated, or, given the ``cache`` of ``z`` kept from an earlier θ and the model's
    ``rescore(z, cache) -> (log_lik, log_prior)`` at the current θ, re-scored without evaluating the model."""
    if cache is not None and rescore is not None:
        ll, lp = rescore(z, cache)
    else:
        ll, lp, cache = _evaluate(evaluate, z)
    # a zero count of the backend's float type (NaN-safe: ``0 * Σ ll`` would not be)
    return ChainState(z, ll, lp, (ll == ll).sum() * 0.0, cache)


def _accept(ops: Ops, key: Any, log_ratio: Any, state: ChainState, z_new: Any, ll_new: Any, lp_new: Any,
            target_new: Any = None, cache_new: Any = None):
    """MH acceptance ``log u < log_ratio``, with the fault rules every kernel shares.

    A proposal whose log-density ``ll_new + lp_new`` (``target_new`` when the caller has it) is NaN or ±inf (outside
    the model's domain, an overflow) is rejected and counted in ``num_nonfinite``; a chain whose current log-density
    is non-finite accepts any finite proposal (it leaves the bad point rather than staying stuck there); the chain's
    ``cache`` (if any) follows the accepted states.  The
    comparison ``log u < log_ratio`` decides only where both log-densities are finite (elsewhere its value, False
    for a NaN ratio, is masked out), so the ratio needs no cleaning.
    """
    xp = ops.xp
    u = ops.uniform(key, tuple(log_ratio.shape))
    finite_new = xp.isfinite(ll_new + lp_new if target_new is None else target_new)
    finite_old = xp.isfinite(state.log_lik + state.log_prior)
    ok = finite_new & (~finite_old | (xp.log(u) < log_ratio))
    z = xp.where(ok[..., None], z_new, state.z)
    ll = xp.where(ok, ll_new, state.log_lik)
    lp = xp.where(ok, lp_new, state.log_prior)
    count = _count_nonfinite(xp, state.num_nonfinite, ~finite_new)
    cache = state.cache if state.cache is None else xp.where(ok, cache_new, state.cache)
    return ChainState(z, ll, lp, count, cache), ok


def _count_nonfinite(xp: Any, count: Any, bad: Any) -> Any:
    """``count`` plus the proposals in ``bad [L, n]``: a scalar total, or per chain and unit when ``count`` is
    ``[L, n]`` (:func:`saemix_sweep` sums it once at the end: one reduction over the units per sweep, not one per
    kernel step, which is one cross-device all-reduce each on a sharded fit)."""
    if getattr(count, "ndim", 0):
        return count + bad * 1.0
    return count + xp.sum(bad)


def _unit_blocks(evaluate: Evaluate, z: Any) -> list[slice] | None:
    """The contiguous blocks of units ``evaluate`` asks the kernels to step over for draws shaped like ``z``
    (:class:`~latentfit.inference.model.UnitBlockEvaluator`); None: the whole population at once."""
    blocks_of = getattr(evaluate, "unit_blocks", None)
    return None if blocks_of is None else blocks_of(z)


#: ``(block, ll_new, lp_new, ll_old, lp_old) -> (log_ratio, target_new or None)`` of a kernel, on a block of units
Ratio = Callable[[slice, Any, Any, Any, Any], tuple[Any, Any]]


def _rw_ratio(block: slice, ll_new: Any, lp_new: Any, ll_old: Any, lp_old: Any) -> tuple[Any, Any]:
    """The random-walk ratio ``π(z')/π(z)`` (as :func:`rw_componentwise` and :func:`rw_block` form it)."""
    target_new = ll_new + lp_new
    return target_new - ll_old - lp_old, target_new


def _accept_blocks(ops: Ops, blocks: list[slice], evaluate: Any, u: Any, state: ChainState,
                   propose: Callable[[slice], Any], ratio: Ratio, in_place: bool = False) -> tuple[ChainState, Any]:
    """:func:`_accept` over contiguous blocks of the units, with the same operations on each unit.

    For each block: the proposals ``propose(block)`` ``[L, b, d]``, their log-densities from
    ``evaluate.for_units(block)``, the ratio, and the accepted values written into the output arrays, fresh ones
    (``in_place``: the state's own, which the caller owns and no longer needs: a sweep after its first step).  ``u``
    ``[L, n]`` are the uniforms, drawn whole by the caller where :func:`_accept` draws them.  Returns the state and
    the acceptance indicators ``[L, n]`` (bool).  A per-chain-and-unit count of non-finite proposals stays one; a
    scalar count adds each block's sum (exact: integer-valued floats).
    """
    xp = ops.xp
    per_unit_count = bool(getattr(state.num_nonfinite, "ndim", 0))
    has_cache = state.cache is not None
    z_out, ll_out, lp_out = (state.z, state.log_lik, state.log_prior) if in_place else (None, None, None)
    cache_out = state.cache if in_place and has_cache else None
    count = state.num_nonfinite
    count_out = count if in_place and per_unit_count else None
    ok_out = None
    for b in blocks:
        z_old, ll_old, lp_old = state.z[:, b], state.log_lik[:, b], state.log_prior[:, b]
        z_new = propose(b)
        ll_new, lp_new, c_new = _evaluate(evaluate.for_units(b), z_new)
        log_ratio, target_new = ratio(b, ll_new, lp_new, ll_old, lp_old)
        finite_new = xp.isfinite(ll_new + lp_new if target_new is None else target_new)
        finite_old = xp.isfinite(ll_old + lp_old)
        ok = finite_new & (~finite_old | (xp.log(u[:, b]) < log_ratio))
        z_out = ops.write_units(z_out, b, xp.where(ok[..., None], z_new, z_old), state.z)
        ll_out = ops.write_units(ll_out, b, xp.where(ok, ll_new, ll_old), state.log_lik)
        lp_out = ops.write_units(lp_out, b, xp.where(ok, lp_new, lp_old), state.log_prior)
        if has_cache:
            cache_out = ops.write_units(cache_out, b, xp.where(ok, c_new, state.cache[:, b]), state.cache)
        if per_unit_count:
            count_out = ops.write_units(count_out, b, count[:, b] + (~finite_new) * 1.0, count)
        else:
            count = count + xp.sum(~finite_new)
        ok_out = ops.write_units(ok_out, b, ok, state.log_lik)
    return ChainState(z_out, ll_out, lp_out, count_out if per_unit_count else count,
                      cache_out if has_cache else None), ok_out


def prior_imh(ops: Ops, key: Any, state: ChainState, sample_prior: Callable[[Any], Any],
              evaluate: Evaluate) -> tuple[ChainState, Any]:
    """Independent MH with the prior as proposal; returns the state and the acceptance rate."""
    state, ok = _prior_imh(ops, key, state, sample_prior, evaluate)
    return state, ops.unit_mean(ok * 1.0)


def _prior_imh(ops: Ops, key: Any, state: ChainState, sample_prior: Callable[[Any], Any],
               evaluate: Evaluate, in_place: bool = False) -> tuple[ChainState, Any]:
    """:func:`prior_imh` with the acceptance indicators ``[L, n]`` (no reduction over the units); ``in_place``: the
    caller owns the state's arrays (over blocks of units they are overwritten, :func:`_accept_blocks`)."""
    k1, k2 = ops.split(key)
    z_new = sample_prior(k1)
    blocks = _unit_blocks(evaluate, state.z)
    if blocks is not None:
        u = ops.uniform(k2, tuple(state.log_lik.shape))
        return _accept_blocks(ops, blocks, evaluate, u, state, lambda b: z_new[:, b],
                              lambda b, ll_new, lp_new, ll_old, lp_old: (ll_new - ll_old, None), in_place)
    ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
    return _accept(ops, k2, ll_new - state.log_lik, state, z_new, ll_new, lp_new, cache_new=c_new)


def independent_mh(ops: Ops, key: Any, state: ChainState, z_new: Any, log_q_new: Any, log_q_old: Any,
                   evaluate: Evaluate) -> tuple[ChainState, Any]:
    """Independence sampler with the full ratio ``π(z')q(z) / (π(z)q(z'))`` (f-SAEM, TTSEM).

    ``z_new`` are the proposals, ``log_q_new``/``log_q_old`` the proposal log-densities at the
    proposals and at the current states (``[L, n]``).  Returns the state and the per-unit
    acceptance indicators ``[L, n]``.
    """
    blocks = _unit_blocks(evaluate, state.z)
    if blocks is not None:
        u = ops.uniform(key, tuple(state.log_lik.shape))
        return _accept_blocks(
            ops, blocks, evaluate, u, state, lambda b: z_new[:, b],
            lambda b, ll_new, lp_new, ll_old, lp_old: (
                (ll_new + lp_new - log_q_new[:, b]) - (ll_old + lp_old - log_q_old[:, b]), None))
    ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
    log_ratio = (ll_new + lp_new - log_q_new) - (state.log_lik + state.log_prior - log_q_old)
    return _accept(ops, key, log_ratio, state, z_new, ll_new, lp_new, cache_new=c_new)


def rw_componentwise(ops: Ops, key: Any, state: ChainState, scale: Any,
                     evaluate: Evaluate, in_place: bool = False) -> tuple[ChainState, Any]:
    """One sweep of coordinate-wise random-walk MH; returns the state and acceptance per coordinate.

    The acceptances are kept per chain, unit and coordinate ``[L, n, d]`` during the sweep and averaged over the
    units once at its end (one all-reduce per sweep on a sharded fit instead of d: XLA combines the d means).
    Over blocks of units (:func:`_accept_blocks`; ``in_place``: the caller owns the state's arrays) each coordinate's
    indicators are kept as a bool ``[L, n]`` instead."""
    xp = ops.xp
    d = state.z.shape[-1]
    keys = ops.split(key, 2 * d)
    eye = ops.asarray([[1.0 if i == j else 0.0 for i in range(d)] for j in range(d)])
    blocks = _unit_blocks(evaluate, state.z)
    if blocks is not None:
        oks = []
        for j in range(d):
            shape = tuple(state.z.shape[:-1])
            eps = ops.normal(keys[2 * j], shape)
            u = ops.uniform(keys[2 * j + 1], shape)
            step, z_old = scale * eye[j], state.z

            def propose(b: slice, eps: Any = eps, step: Any = step, z_old: Any = z_old) -> Any:
                return z_old[:, b] + eps[:, b][..., None] * step

            state, ok = _accept_blocks(ops, blocks, evaluate, u, state, propose, _rw_ratio, in_place)
            in_place = True  # the arrays are this call's from here on
            oks.append(ok)
            del eps, u
        return state, ops.zeros((d,)) + xp.stack([ops.unit_mean(ok * 1.0) for ok in oks])

    def body(j: Any, carry: tuple[ChainState, Any]) -> tuple[ChainState, Any]:
        # one latent coordinate (a loop over the small d, vectorised over chains and units)
        st, acc_units = carry
        onehot = eye[j]
        z_new = st.z + ops.normal(keys[2 * j], tuple(st.z.shape[:-1]))[..., None] * (scale * onehot)
        ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
        target_new = ll_new + lp_new
        log_ratio = target_new - st.log_lik - st.log_prior
        st, ok = _accept(ops, keys[2 * j + 1], log_ratio, st, z_new, ll_new, lp_new, target_new, c_new)
        return st, acc_units + (ok * 1.0)[..., None] * (onehot > 0)

    # in the dtype of ``ok * 1.0``, as the per-step rates were (torch: its default float type)
    state, acc_units = ops.fori_loop(0, d, body, (state, (ops.zeros(tuple(state.z.shape)) > 1) * 1.0))
    # one mean per coordinate, each as the per-step rate was (the same slice of 0/1 values): independent reductions
    # at one place, which XLA combines into one all-reduce
    return state, ops.zeros((d,)) + xp.stack([ops.unit_mean(acc_units[..., j]) for j in range(d)])


def random_block_mask(ops: Ops, key: Any, d: int, k: Any) -> Any:
    """Mask of a random block of ``r = (k mod (d−1)) + 2`` coordinates (all of them when d ≤ 2)."""
    if d <= 2:
        return ops.ones((d,))
    return block_mask_of(ops, ops.shared_uniform(key, (d,)), d, k)  # one block for all units (per-unit streams too)


def block_mask_of(ops: Ops, u: Any, d: int, k: Any) -> Any:
    """:func:`random_block_mask` from its uniforms ``u [..., d]`` (the coordinates of the ``r`` smallest; several
    blocks' at once, row by row)."""
    if d <= 2:
        return ops.ones(tuple(u.shape))
    return (ops.xp.argsort(u) < (k % (d - 1)) + 2) * 1.0  # along the last axis (numpy, JAX, torch)


def rw_block(ops: Ops, key: Any, state: ChainState, scale: Any, mask: Any,
             evaluate: Evaluate, in_place: bool = False) -> tuple[ChainState, Any]:
    """Random-walk MH moving the coordinates in ``mask`` jointly; returns state and acceptance (``in_place``: see
    :func:`_accept_blocks`)."""
    k1, k2 = ops.split(key)
    blocks = _unit_blocks(evaluate, state.z)
    if blocks is not None:
        noise = ops.normal(k1, tuple(state.z.shape))
        u = ops.uniform(k2, tuple(state.log_lik.shape))
        step, z_old = scale * mask, state.z
        state, ok = _accept_blocks(ops, blocks, evaluate, u, state, lambda b: z_old[:, b] + noise[:, b] * step,
                                   _rw_ratio, in_place)
        return state, ops.unit_mean(ok * 1.0)
    z_new = state.z + ops.normal(k1, tuple(state.z.shape)) * (scale * mask)
    ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
    target_new = ll_new + lp_new
    log_ratio = target_new - state.log_lik - state.log_prior
    state, ok = _accept(ops, k2, log_ratio, state, z_new, ll_new, lp_new, target_new, c_new)
    return state, ops.unit_mean(ok * 1.0)


def line_gibbs(ops: Ops, key: Any, state: ChainState, lines: Any, mean: Any, prec: Any,
               evaluate: Evaluate) -> tuple[ChainState, Any]:
    """Moves along fixed lines of the latent space, one line after the other; returns the state and the acceptance
    rate per line ``[r]``.

    ``lines [r, n, d]`` are directions ``v_i`` per unit (e.g. NLME's IOV ridge, ``η_i + t``, ``κ_ik − t``, along which
    the predictions do not change), the prior is Gaussian ``z_i ~ N(mean_i, P⁻¹)`` (``mean [n, d]``, ``prec`` = P
    ``[d, d]``).  The step ``t`` of the move ``z_i + t v_i`` is drawn from the prior's conditional along the line,
    ``t ~ N(b_i / a_i, 1 / a_i)`` with ``a_i = v_iᵀ P v_i`` and ``b_i = v_iᵀ P (mean_i − z_i)``, and accepted with the
    likelihood ratio ``p(y_i | z_i + t v_i) / p(y_i | z_i)`` (an independence sampler on the line whose proposal is the
    prior's conditional: the prior terms cancel).  Where the likelihood is constant along the line this is an exact
    Gibbs draw of the step, always accepted, however strongly the posterior correlates the coordinates along the
    line, which random-walk kernels cross by steps of the posterior's width across it.  A unit whose ``v_i`` is 0
    stays where it is."""
    xp = ops.xp
    r = int(lines.shape[0])
    keys = ops.split(key, 2 * r)
    rates = []
    for j in range(r):  # a handful of lines (one per parameter with IOV)
        v = lines[j]  # [n, d]
        pv = v @ prec  # [n, d]
        a = xp.sum(pv * v, -1)  # [n] (> 0 for a non-zero v_i)
        active = a > 0
        a_safe = xp.where(active, a, 1.0 + 0.0 * a)
        b = xp.sum(pv * (mean - state.z), -1)  # [L, n]
        eps = ops.normal(keys[2 * j], tuple(b.shape))
        t = xp.where(active, (b + eps * xp.sqrt(a_safe)) / a_safe, 0.0 * b)
        z_new = state.z + t[..., None] * v
        ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
        state, ok = _accept(ops, keys[2 * j + 1], ll_new - state.log_lik, state, z_new, ll_new, lp_new,
                            cache_new=c_new)
        rates.append(ops.unit_mean(ok * 1.0))
    return state, ops.zeros((r,)) + xp.stack(rates)


def adapt_scale(scale: Any, acceptance: Any, mask: Any = None) -> Any:
    """saemix adaptation ``d_j ← d_j (1 + 0.4 (acc_j − 0.4))`` (only where ``mask`` is 1)."""
    new = scale * (1.0 + ADAPT_RATE * (acceptance - TARGET_ACCEPTANCE))
    if mask is None:
        return new
    return mask * new + (1.0 - mask) * scale


def saemix_sweep(ops: Ops, key: Any, z: Any, scales: tuple[Any, Any], k: Any, kernels: tuple[int, int, int],
                 evaluate: Evaluate, sample_prior: Callable[[Any], Any] | None, cache: Any = None,
                 rescore: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                 prior_transform: Callable[[Any], Any] | None = None,
                 randoms: SweepRandoms | None = None, compact: bool = False
                 ) -> tuple[ChainState, tuple[Any, Any], dict]:
    """saemix's MCMC step from draws ``z [L, n, d]``: ``n1`` prior-IMH, ``n2`` component-wise RW and ``n3``
    random-block RW iterations (``kernels``), the RW scales ``(scale_rw, scale_block)`` adapted as they go.
    With the ``cache`` of ``z`` carried from the previous sweep and ``rescore``, the starting state is re-scored at
    the new θ instead of evaluated (``evaluate`` then returns the cache of each proposal as a third value).

    Kernel repetitions run under ``ops.fori_loop`` (a Python loop on torch, one traced body on JAX, which keeps
    the compiled program small).  Returns the chain state, the adapted scales and the acceptance rates per
    kernel (averaged over repetitions); ``chain.num_nonfinite`` counts the proposals rejected for a non-finite
    log-density.

    Reductions over the units (each a cross-device all-reduce on a sharded fit, a collective on a distributed one)
    are made only where the next step needs them: one per random-walk sweep or block step (the scales adapt to the
    acceptance of every unit); the prior-IMH acceptances and the non-finite counts are kept per chain and unit and
    reduced after their loops (XLA combines these reductions with the statistics' into one all-reduce), with the same
    values as per-step reductions (the same means of the same 0/1 indicators; sums of counts are exact).

    ``prior_transform`` (a compiled backend; ``ε -> μ + L ε`` on ``[L, d, n]``, given instead of ``sample_prior``):
    the units-minor sweep, :func:`_saemix_sweep_units_minor`, whose random numbers are ``randoms`` if given (drawn
    beforehand from ``key`` by :func:`sweep_randoms`: the same numbers), else drawn from ``key`` here; ``compact``: its
    kernels as one loop over their steps (:func:`_kernel_steps_compact`).
    """
    n1, n2, n3 = kernels
    xp = ops.xp
    if prior_transform is not None:
        if randoms is not None and not isinstance(randoms, SweepRandoms):  # laid out flat (sweep_draws_from_key_bits)
            randoms = unpack_sweep_randoms(randoms, kernels, (int(z.shape[0]), int(z.shape[2]), int(z.shape[1])))
        if randoms is None:
            L, n, d = (int(s) for s in z.shape)
            randoms = sweep_randoms(ops, key, kernels, (L, d, n))
        return _saemix_sweep_units_minor(ops, randoms, z, scales, k, kernels, evaluate, prior_transform, cache,
                                         rescore, compact)
    keys = ops.split(key, n1 + n2 + 2 * n3 + 1)
    if _unit_blocks(evaluate, z) is not None:
        return _saemix_sweep_blocked(ops, keys, z, scales, k, kernels, evaluate, sample_prior, cache, rescore)
    chain = init_chain_state(z, evaluate, cache, rescore)
    chain = chain._replace(num_nonfinite=ops.zeros(tuple(chain.log_lik.shape)))  # per chain and unit until the end
    acc: dict[str, Any] = {}
    d = chain.z.shape[-1]
    scale_rw, scale_block = scales
    if n1:
        eye = ops.asarray([[1.0 if i == j else 0.0 for i in range(n1)] for j in range(n1)])

        def imh(i, carry):
            ch, ok_units = carry
            ch, ok = _prior_imh(ops, keys[i], ch, sample_prior, evaluate)
            return ch, ok_units + (ok * 1.0)[..., None] * (eye[i] > 0)

        ok_units = (ops.zeros(tuple(chain.log_lik.shape) + (n1,)) > 1) * 1.0  # the dtype of ``ok * 1.0``
        chain, ok_units = ops.fori_loop(0, n1, imh, (chain, ok_units))
        rate = ops.zeros(())
        for i in range(n1):  # each repetition's rate, summed in their order; XLA combines the n1 reductions
            rate = rate + ops.unit_mean(ok_units[..., i]) / n1
        acc["prior_imh"] = rate
    if n2:
        def rw(i, carry):
            ch, scale, rate = carry
            ch, a = rw_componentwise(ops, keys[n1 + i], ch, scale, evaluate)
            return ch, adapt_scale(scale, a), rate + a / n2

        chain, scale_rw, acc["rw"] = ops.fori_loop(0, n2, rw, (chain, scale_rw, ops.zeros((d,))))
    if n3:
        def block(i, carry):
            ch, scale, rate = carry
            mask = random_block_mask(ops, keys[n1 + n2 + 2 * i], d, k)
            ch, a = rw_block(ops, keys[n1 + n2 + 2 * i + 1], ch, scale, mask, evaluate)
            return ch, adapt_scale(scale, a, mask), rate + a / n3

        chain, scale_block, acc["block_rw"] = ops.fori_loop(0, n3, block, (chain, scale_block, ops.zeros(())))
    chain = chain._replace(num_nonfinite=xp.sum(chain.num_nonfinite))
    return chain, (scale_rw, scale_block), acc


def _mh_test(xp: Any, u: Any, log_ratio: Any) -> Any:
    """The MH test ``log u < log_ratio`` as ``u < exp(log_ratio)``: one ``exp`` per test instead of a ``log``
    (XLA:CPU's float64 ``log`` runs scalar, ~4.5 ns a value against ~2 ns for ``exp``).  The same decisions except
    where ``log_ratio`` lies within a rounding of ``log u`` (a probability of ~1e-16 per test); ``u = 0``
    (``log u = -inf``) accepts every ``log_ratio > -inf``, as before (where ``exp`` underflows to 0)."""
    return (u < xp.exp(log_ratio)) | ((u == 0) & (log_ratio > -xp.inf))


def _accepted(xp: Any, u: Any, log_ratio: Any, state: ChainState, target_new: Any) -> tuple[Any, Any]:
    """``(accepted, proposal finite)`` ``[L, n]``: a finite proposal is accepted by the test :func:`_mh_test` or
    when the current state is not finite."""
    finite_new = xp.isfinite(target_new)
    return finite_new & (~xp.isfinite(state.log_lik + state.log_prior) | _mh_test(xp, u, log_ratio)), finite_new


def _accept_drawn(xp: Any, u: Any, log_ratio: Any, state: ChainState, z_new: Any, ll_new: Any, lp_new: Any,
                  target_new: Any = None, cache_new: Any = None) -> tuple[ChainState, Any]:
    """:func:`_accept` on chains laid out ``[L, d, n]`` with the uniforms ``u [L, n]`` drawn beforehand
    (:func:`_saemix_sweep_units_minor`) and the test :func:`_mh_test`."""
    ok, finite_new = _accepted(xp, u, log_ratio, state, ll_new + lp_new if target_new is None else target_new)
    z = xp.where(ok[..., None, :], z_new, state.z)
    ll = xp.where(ok, ll_new, state.log_lik)
    lp = xp.where(ok, lp_new, state.log_prior)
    count = _count_nonfinite(xp, state.num_nonfinite, ~finite_new)
    cache = state.cache if state.cache is None else xp.where(ok, cache_new, state.cache)
    return ChainState(z, ll, lp, count, cache), ok


def _sweep_draws(ops: Ops, keys: Any, kernels: tuple[int, int, int], shape: tuple[int, int, int]) -> tuple:
    """Every random number of a units-minor sweep (chains ``shape = (L, d, n)``), drawn before its kernels from the
    keys the step-by-step kernels draw them from: ``(ε of the prior draws and block steps [n1 + n3, L, d, n],
    ε of the component-wise moves [n2, d, L, n], uniforms [n1 + n2 d + n3, L, n])``, the same numbers
    (:meth:`~latentfit.inference.ops.Ops.stacked_draws`).  Drawn in one vectorised pass each (XLA:CPU runs a normal
    draw over ``[L, n]`` with L = 1 as a scalar loop, ~15 ns a value against ~6 over ``[K, L, n]``, and duplicated the
    threefry hash into the two fusions reading a draw inside the kernels), they are read from memory by the kernels."""
    xp = ops.xp
    n1, n2, n3 = kernels
    L, d, n = shape
    # the prior-IMH and block steps' (normal, uniform) key pairs [n1 + n3, 2, 2]; the component-wise sweeps' keys
    # [n2, 2d, 2] (rw_componentwise: ε_j, u_j of move j): each a split of the sweep's keys, vectorised
    eps_prior = eps_rw = None
    u_keys = []
    if n1 + n3:
        pairs = ops.stacked_draws(ops.split, xp.stack([keys[i] for i in range(n1)]
                                                      + [keys[n1 + n2 + 2 * i + 1] for i in range(n3)]))
        eps_prior = ops.stacked_draws(lambda kk: ops.normal_units_minor(kk, (L, d, n)), pairs[:, 0])
        u_keys = [pairs[:n1, 1], pairs[n1:, 1]]
    if n2:
        moves = ops.stacked_draws(lambda kk: ops.split(kk, 2 * d), keys[n1:n1 + n2])
        eps_rw = ops.stacked_draws(lambda kk: ops.normal(kk, (L, n)), xp.reshape(moves[:, 0::2], (n2 * d, -1)))
        eps_rw = xp.reshape(eps_rw, (n2, d, L, n))
        u_keys.insert(1, xp.reshape(moves[:, 1::2], (n2 * d, -1)))
    u = ops.stacked_draws(lambda kk: ops.uniform(kk, (L, n)), xp.concatenate(u_keys)) if u_keys else None
    return eps_prior, eps_rw, u


class SweepRandoms(NamedTuple):
    """Every random number of one units-minor sweep (:func:`sweep_randoms`): the normals of the prior draws and block
    steps ``[n1 + n3, L, d, n]``, of the component-wise moves ``[n2, d, L, n]``, the MH uniforms
    ``[n1 + n2 d + n3, L, n]`` and the random blocks' uniforms ``[n3, d]`` (None where a kernel is off, or d ≤ 2)."""

    eps_prior: Any
    eps_rw: Any
    u: Any
    block_u: Any


def sweep_randoms(ops: Ops, key: Any, kernels: tuple[int, int, int], shape: tuple[int, int, int]) -> SweepRandoms:
    """Every random number of a units-minor sweep over chains ``shape = (L, d, n)`` from its ``key``, the same numbers
    as the step-by-step kernels draw: the sweep's keys ``split(key, n1 + n2 + 2 n3 + 1)``, the kernels' draws from
    them (:func:`_sweep_draws`) and the random blocks' uniforms (``shared_uniform`` of ``keys[n1 + n2 + 2i]``, as
    :func:`random_block_mask`).  A pure function of ``key``: a compiled chunk draws every iteration's at once
    (``SAEM.chunk_randoms``)."""
    n1, n2, n3 = kernels
    d = shape[1]
    keys = ops.split(key, n1 + n2 + 2 * n3 + 1)
    eps_prior, eps_rw, u = _sweep_draws(ops, keys, kernels, shape)
    block_u = None
    if n3 and d > 2:
        block_u = ops.stacked_draws(lambda kk: ops.shared_uniform(kk, (d,)),
                                    ops.xp.stack([keys[n1 + n2 + 2 * i] for i in range(n3)]))
    return SweepRandoms(eps_prior, eps_rw, u, block_u)


def _sweep_key_rows(kernels: tuple[int, int, int], d: int) -> tuple[list[int], list[int]]:
    """``(rows, counters)`` of :func:`sweep_key_bits`' second pass: entry e hashes counter ``counters[e]`` under the
    sweep's key ``rows[e]``."""
    n1, n2, n3 = kernels
    rows, counters = [], []
    for r in list(range(n1)) + [n1 + n2 + 2 * i + 1 for i in range(n3)]:
        rows += [r, r]
        counters += [0, 1]
    for i in range(n2):
        rows += [n1 + i] * (2 * d)
        counters += list(range(2 * d))
    if d > 2:
        for i in range(n3):
            rows += [n1 + n2 + 2 * i] * d
            counters += list(range(d))
    return rows, counters


def stacked_sweep_key_bits(ops: Any, keys: Any, kernels: tuple[int, int, int], d: int) -> Any:
    """:func:`sweep_key_bits` of each key of ``keys`` ``[K, 2]`` stacked ``[K, E, 2]``, bit for bit: its two threefry
    passes (the sweep's keys ``split(key, n1 + n2 + 2 n3 + 1)``, then the hashes drawn from them) as one hash over
    ``[K, W]`` entries applied twice in a loop (:meth:`~latentfit.inference.ops_jax.JaxOps.repeated`), each pass
    reading its keys and counters from a table by the pass's index.  One copy of the hash's ~160 HLO instructions
    instead of two in a compiled chunk (a smaller executable to load; the pass over K · W ≈ 650 entries costs
    microseconds)."""
    xp = ops.xp
    n1, n2, n3 = kernels
    first = n1 + n2 + 2 * n3 + 1
    rows, counters = _sweep_key_rows(kernels, d)
    width = max(first, len(rows))
    table_rows = np.zeros((2, width), dtype=np.int32)  # pass 0: every entry under the key itself (row 0)
    table_rows[1, :len(rows)] = rows
    table_counters = np.zeros((2, width), dtype=np.uint32)
    table_counters[0] = np.arange(width)  # pass 0: split(key, first) (the entries past it unused)
    table_counters[1, :len(counters)] = counters
    table_rows, table_counters = xp.asarray(table_rows), xp.asarray(table_counters)
    num = int(keys.shape[0])
    src = xp.zeros((num, width, 2), dtype=keys.dtype).at[:, 0].set(keys)

    def one_pass(i: Any, src: Any) -> Any:
        chosen = xp.take(src, table_rows[i], axis=1)  # [K, W, 2]
        b1, b2 = ops.threefry_hash(chosen, table_counters[i])
        return xp.stack([b1, b2], -1)

    return ops.repeated(one_pass, 2, src)[:, :len(rows)]


def sweep_key_bits(ops: Any, key: Any, kernels: tuple[int, int, int], d: int) -> Any:
    """The hashes ``(b1, b2)`` ``[E, 2]`` a units-minor sweep's draws come from, one threefry pass over the sweep's keys
    ``keys = split(key, n1 + n2 + 2 n3 + 1)``: the prior-IMH and block steps' ``split(keys[r], 2)`` (their normals'
    and uniforms' keys), the component-wise sweeps' ``split(keys[n1 + i], 2d)``, then the random blocks' 64-bit
    uniforms ``keys[n1 + n2 + 2i]`` (d > 2): what :func:`sweep_randoms` splits and draws, key by key
    (``ops``: :class:`~latentfit.inference.ops_jax.JaxOps`, raw threefry keys)."""
    n1, n2, n3 = kernels
    keys = ops.split(key, n1 + n2 + 2 * n3 + 1)
    rows, counters = _sweep_key_rows(kernels, d)
    b1, b2 = ops.threefry_hash(keys[np.array(rows)], counters)
    return ops.xp.stack([b1, b2], -1)


def sweep_draws_from_key_bits(ops: Any, key_bits: Any, kernels: tuple[int, int, int], shape: tuple[int, int, int],
                              draw_dtype: Any, dtype: Any) -> Any:
    """Every random number of units-minor sweeps from their :func:`sweep_key_bits` ``[..., E, 2]``, flat ``[...,
    M]`` in the arrays' ``dtype`` (:func:`unpack_sweep_randoms` gives the :class:`SweepRandoms`): the normals and
    uniforms in ``draw_dtype`` from one threefry pass over all their keys and counters (the units-minor counters of
    the prior draws), the random blocks' uniforms in ``dtype`` from the keys' own bits; what :func:`sweep_randoms`
    draws, bit for bit.  One elementwise pass whose output only the chunk's loop reads: XLA:CPU has no consumer to
    copy the hash into."""
    xp = ops.xp
    n1, n2, n3 = kernels
    L, d, n = shape
    lead = tuple(key_bits.shape[:-2])
    m = 2 * (n1 + n3)
    pairs = xp.reshape(key_bits[..., :m, :], lead + (n1 + n3, 2, 2))  # [..., r, (normal, uniform), 2]
    moves = xp.reshape(key_bits[..., m:m + 2 * d * n2, :], lead + (n2, 2 * d, 2))
    l_, j_, i_ = np.meshgrid(np.arange(L), np.arange(d), np.arange(n), indexing="ij")
    minor = (l_ * n * d + i_ * d + j_).reshape(-1)  # entry (l, j, i) of [L, d, n]: the index of (l, i, j) in [L, n, d]
    flat = np.arange(L * n)
    parts, counters = [], []  # (keys [..., R, 2], values per key) in the output's order
    if n1 + n3:
        parts.append((pairs[..., 0, :], L * d * n))
        counters.append(np.tile(minor, n1 + n3))
    if n2:
        parts.append((xp.reshape(moves[..., 0::2, :], lead + (n2 * d, 2)), L * n))
        counters.append(np.tile(flat, n2 * d))
    num_normal = sum(int(k.shape[-2]) * size for k, size in parts)
    u_keys = [pairs[..., :n1, 1, :]] + ([xp.reshape(moves[..., 1::2, :], lead + (n2 * d, 2))] if n2 else []) \
        + [pairs[..., n1:, 1, :]]
    u_keys = xp.concatenate(u_keys, -2)
    parts.append((u_keys, L * n))
    counters.append(np.tile(flat, int(u_keys.shape[-2])))
    keys = xp.concatenate([xp.reshape(xp.broadcast_to(k[..., :, None, :], lead + (int(k.shape[-2]), size, 2)),
                                      lead + (-1, 2)) for k, size in parts], -2)
    b1, b2 = ops.threefry_hash(keys, np.concatenate(counters))
    is_normal = np.arange(int(b1.shape[-1])) < num_normal
    out = xp.where(is_normal, ops.normals_from_bits(b1, b2, draw_dtype),
                   ops.floats_from_bits(b1, b2, draw_dtype)).astype(dtype)
    if n3 and d > 2:
        block = key_bits[..., m + 2 * d * n2:, :]
        out = xp.concatenate([out, ops.floats_from_bits(block[..., 0], block[..., 1], dtype)], -1)
    return out


def unpack_sweep_randoms(row: Any, kernels: tuple[int, int, int], shape: tuple[int, int, int]) -> SweepRandoms:
    """The :class:`SweepRandoms` of one sweep laid out flat by :func:`sweep_draws_from_key_bits`."""
    n1, n2, n3 = kernels
    L, d, n = shape
    sizes = [(n1 + n3) * L * d * n, n2 * d * L * n, (n1 + n2 * d + n3) * L * n, n3 * d if d > 2 else 0]
    ends = np.cumsum(sizes)
    shapes = [(n1 + n3, L, d, n), (n2, d, L, n), (n1 + n2 * d + n3, L, n), (n3, d)]
    return SweepRandoms(*(row[e - z:e].reshape(sh) if z else None for z, e, sh in zip(sizes, ends, shapes)))


def _saemix_sweep_units_minor(ops: Ops, randoms: SweepRandoms, z: Any, scales: tuple[Any, Any], k: Any,
                              kernels: tuple[int, int, int], evaluate: Evaluate, prior_transform: Callable[[Any], Any],
                              cache: Any, rescore: Callable[[Any, Any], tuple[Any, Any]] | None, compact: bool = False
                              ) -> tuple[ChainState, tuple[Any, Any], dict]:
    """:func:`saemix_sweep` on a compiled backend with the chains laid out ``[L, d, n]``, the units on the minor axis,
    so that XLA:CPU vectorises the proposals, priors and selects over the units (over ``[L, n, d]`` with d = 3 its
    fused loops run scalar); ``evaluate``, ``rescore`` and ``prior_transform`` (``ε -> μ + L ε``) take and give that
    layout, and the returned chains are ``[L, n, d]`` again.

    The sweep's random numbers ``randoms`` are drawn before its kernels (:func:`sweep_randoms`: the same numbers as the
    step-by-step kernels', vectorised), the MH tests are :func:`_mh_test`, and a component-wise sweep keeps each
    move's acceptance indicators ``[d, L, n]`` by row (the same 0/1 values as a running ``[L, n, d]`` sum): the states,
    scales and rates of :func:`saemix_sweep`'s kernels up to the rounding of the model's densities in this layout.
    The kernels run as a loop each (:func:`_kernel_loops`), or, ``compact``, as one loop over their steps
    (:func:`_kernel_steps_compact`: the same numbers, a smaller program)."""
    xp = ops.xp
    z = xp.swapaxes(z, -1, -2)
    chain = init_chain_state(z, evaluate, cache, rescore)
    chain = chain._replace(num_nonfinite=ops.zeros(tuple(chain.log_lik.shape)))  # per chain and unit until the end
    kernel_steps = _kernel_steps_compact if compact else _kernel_loops
    chain, (scale_rw, scale_block), acc = kernel_steps(ops, randoms, chain, scales, k, kernels, evaluate,
                                                       prior_transform)
    chain = chain._replace(num_nonfinite=xp.sum(chain.num_nonfinite), z=xp.swapaxes(chain.z, -1, -2))
    return chain, (scale_rw, scale_block), acc


def _kernel_context(ops: Ops, chain: ChainState) -> tuple[Any, tuple[int, int, int], Callable[[Any, Any], Any]]:
    """``(xp, (L, d, n), one)`` of a units-minor sweep's chains: the array module, their shape and ``one(table, i)
    = table[i]`` for a traced ``i`` (a slice, no gather)."""
    return ops.xp, tuple(int(s) for s in chain.z.shape), lambda table, i: ops.take_block(table, i, 1)[0]


def _kernel_loops(ops: Ops, randoms: SweepRandoms, chain: ChainState, scales: tuple[Any, Any], k: Any,
                  kernels: tuple[int, int, int], evaluate: Evaluate, prior_transform: Callable[[Any], Any]
                  ) -> tuple[ChainState, tuple[Any, Any], dict]:
    """The units-minor sweep's kernels as saemix runs them, a loop each: the ``n1`` prior-IMH steps, the ``n2``
    component-wise sweeps (an inner loop over the d coordinates) and the ``n3`` random-block steps."""
    xp, (L, d, n), one = _kernel_context(ops, chain)
    n1, n2, n3 = kernels
    eps_prior, eps_rw, u_all, block_u = randoms
    acc: dict[str, Any] = {}
    scale_rw, scale_block = scales

    def target_step(ch: ChainState, u: Any, z_new: Any) -> tuple[ChainState, Any]:  # a random-walk step
        ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
        target_new = ll_new + lp_new
        return _accept_drawn(xp, u, target_new - ch.log_lik - ch.log_prior, ch, z_new, ll_new, lp_new, target_new,
                             c_new)

    if n1:
        def imh(i, carry):
            ch, oks = carry
            z_new = prior_transform(one(eps_prior, i))
            ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
            ch, ok = _accept_drawn(xp, one(u_all, i), ll_new - ch.log_lik, ch, z_new, ll_new, lp_new, cache_new=c_new)
            return ch, ops.put_block(oks, i, (ok * 1.0)[None])

        chain, oks = ops.fori_loop(0, n1, imh, (chain, ops.zeros((n1, L, n))))
        rate = ops.zeros(())
        for i in range(n1):  # each repetition's rate, summed in their order; XLA combines the n1 reductions
            rate = rate + ops.unit_mean(oks[i]) / n1
        acc["prior_imh"] = rate
    if n2:
        eye = ops.asarray([[1.0 if i == j else 0.0 for i in range(d)] for j in range(d)])

        def rw(i, carry):
            ch, scale, rate = carry
            eps_i = one(eps_rw, i)  # [d, L, n]

            def move(j, inner):
                st, oks = inner
                z_new = st.z + one(eps_i, j)[..., None, :] * (scale * eye[j])[:, None]
                st, ok = target_step(st, one(u_all, n1 + i * d + j), z_new)
                return st, ops.put_block(oks, j, (ok * 1.0)[None])

            ch, oks = ops.fori_loop(0, d, move, (ch, ops.zeros((d, L, n))))
            a = ops.zeros((d,)) + xp.stack([ops.unit_mean(oks[j]) for j in range(d)])
            return ch, adapt_scale(scale, a), rate + a / n2

        chain, scale_rw, acc["rw"] = ops.fori_loop(0, n2, rw, (chain, scale_rw, ops.zeros((d,))))
    if n3:
        def block(i, carry):
            ch, scale, rate = carry
            mask = ops.ones((d,)) if block_u is None else block_mask_of(ops, one(block_u, i), d, k)
            z_new = ch.z + one(eps_prior, n1 + i) * (scale * mask)[:, None]
            ch, ok = target_step(ch, one(u_all, n1 + n2 * d + i), z_new)
            a = ops.unit_mean(ok * 1.0)
            return ch, adapt_scale(scale, a, mask), rate + a / n3

        chain, scale_block, acc["block_rw"] = ops.fori_loop(0, n3, block, (chain, scale_block, ops.zeros(())))
    return chain, (scale_rw, scale_block), acc


def _kernel_steps_compact(ops: Ops, randoms: SweepRandoms, chain: ChainState, scales: tuple[Any, Any], k: Any,
                          kernels: tuple[int, int, int], evaluate: Evaluate, prior_transform: Callable[[Any], Any]
                          ) -> tuple[ChainState, tuple[Any, Any], dict]:
    """:func:`_kernel_loops` as one loop over the sweep's ``n1 + n2 d + n3`` kernel steps whose body makes the step's
    proposal (its kernel's) and runs one model evaluation and MH test: the same proposals, tests and adaptation, bit
    for bit (the prior-IMH rate may differ in its last bit: its reductions are made step by step), in a program
    with one copy of the model's evaluation instead of three (theophylline: a chunk of 3708 HLO instructions instead of
    4589, loaded ~25% faster).  Each step also computes its kernel's bookkeeping for the others (a select), which costs
    ~5-10% more per iteration where the arithmetic dominates (N = 5000): SAEM uses it where loading dominates, with
    the draws made before the chunk (``SAEM.chunk_randoms``).

    XLA:CPU runs each fusion of the step as a thunk of its own (~0.3 us each on theophylline's ``[5, 12]`` arrays),
    so what a step updates is carried stacked, each stack updated by one fusion: the chains' log-likelihood,
    log-prior, cache and per-unit non-finite count (``[L, n]`` each) as ``[2-4, L, n]``, and the scales and
    acceptance rates of the walks with the steps' rates as one vector ``[3 d + 1 + steps]``, and the random blocks'
    masks are made before the loop (a kernel step: 30 -> 20 thunks); the same values."""
    xp, (L, d, n), one = _kernel_context(ops, chain)

    def stackable(x: Any) -> bool:
        return x is not None and tuple(getattr(x, "shape", ())) == tuple(chain.log_lik.shape) \
            and x.dtype == chain.log_lik.dtype

    packs_cache, packs_count = stackable(chain.cache), stackable(chain.num_nonfinite)
    n1, n2, n3 = kernels
    eps_prior, eps_rw, u_all, block_u = randoms
    acc: dict[str, Any] = {}
    scale_rw, scale_block = scales
    num_rw = n2 * d
    num_steps = n1 + num_rw + n3
    eye = ops.asarray([[1.0 if i == j else 0.0 for i in range(d)] for j in range(d)])
    if n2:
        eps_rw = xp.reshape(eps_rw, (num_rw, L, n))  # move j of sweep i: row i d + j
    masks = None
    if n3 and block_u is not None:  # every block step's mask before the loop: one sort of [n3, d], not one a step
        masks = block_mask_of(ops, block_u, d, k)

    num_selected = 2 + packs_cache  # rows of the stack replaced where a proposal is accepted

    def packed(ch: ChainState) -> tuple[Any, Any, Any, Any]:
        """``(z, [log_lik, log_prior(, cache)(, count)] stacked, count if not stacked, cache if not stacked)``."""
        rows = [ch.log_lik, ch.log_prior] + ([ch.cache] if packs_cache else []) \
            + ([ch.num_nonfinite] if packs_count else [])
        return ch.z, xp.stack(rows), None if packs_count else ch.num_nonfinite, None if packs_cache else ch.cache

    def unpacked(z: Any, values: Any, count: Any, cache: Any) -> ChainState:
        return ChainState(z, values[0], values[1], values[num_selected] if packs_count else count,
                          values[2] if packs_cache else cache)

    def book_of(scale_rw: Any, scale_block: Any, rate_rw: Any, rate_block: Any, rates: Any) -> Any:
        """The walks' scales and rates and the steps' rates as one vector ``[scale_rw (d), scale_block (d), rate_rw
        (d), rate_block, rates (num_steps)]``: one fusion a step updates it."""
        return xp.concatenate([scale_rw, scale_block, rate_rw, xp.reshape(rate_block, (1,)), rates])

    def book_parts(book: Any) -> tuple[Any, Any, Any, Any, Any]:
        return book[:d], book[d:2 * d], book[2 * d:3 * d], book[3 * d], book[3 * d + 1:]

    step_rows = ops.arange(num_steps)  # the steps' indices, for rates[s] = a

    def step(s, carry):
        """Kernel step ``s``: prior IMH ``s < n1``, then move ``j = (s − n1) mod d`` of the component-wise sweep
        ``(s − n1) div d``, then the random-block steps; one proposal, evaluation and MH test whatever its kernel."""
        chain_parts, book = carry
        ch = unpacked(*chain_parts)
        scale_rw, scale_block, rate_rw, rate_block, rates = book_parts(book)
        is_imh, is_block = s < n1, s >= n1 + num_rw
        is_rw = ~is_imh & ~is_block
        if n1 + n3:  # the prior draws' and block steps' normals: rows s (IMH) and n1 + i (block step i)
            e = one(eps_prior, xp.clip(xp.where(is_block, s - num_rw, s), 0, n1 + n3 - 1))
        j = xp.clip(s - n1, 0, max(num_rw - 1, 0)) % d  # the coordinate a component-wise move changes
        mask = ops.ones((d,))
        if masks is not None:
            mask = one(masks, xp.clip(s - n1 - num_rw, 0, n3 - 1))
        # a random walk's proposal z + ν w: a move's (ν its normal on every row, w its scale on row j only) or a block
        # step's (ν its normals, w the scales on the block's rows)
        if n2 and n3:
            move = one(eps_rw, xp.clip(s - n1, 0, num_rw - 1))[..., None, :]
            noise = xp.where(is_rw, move, e)
            weight = xp.where(is_rw, scale_rw * one(eye, j), scale_block * mask)
        elif n2:
            noise, weight = one(eps_rw, xp.clip(s - n1, 0, num_rw - 1))[..., None, :], scale_rw * one(eye, j)
        else:
            noise, weight = (e, scale_block * mask) if n3 else (None, None)
        if noise is None:
            z_new = prior_transform(e)
        else:
            if n1:  # only the step's own proposal is computed (the prior's transform costs ~d times a walk's)
                z_new = ops.cond(is_imh, lambda z, e, nu, w: prior_transform(e),
                                 lambda z, e, nu, w: z + nu * w[:, None], ch.z, e, noise, weight)
            else:
                z_new = ch.z + noise * weight[:, None]
        ll_new, lp_new, c_new = _evaluate(evaluate, z_new)
        target_new = ll_new + lp_new
        # the prior IMH's ratio is the likelihoods' (the prior is its proposal), the random walks' the targets'
        log_ratio = xp.where(is_imh, ll_new - ch.log_lik, target_new - ch.log_lik - ch.log_prior)
        # _accept_drawn, the log-densities (and cache) selected stacked
        ok, finite_new = _accepted(xp, one(u_all, s), log_ratio, ch, target_new)
        z_parts, values, count, cache = chain_parts
        new_rows = [ll_new, lp_new] + ([c_new] if packs_cache else [])
        selected = xp.where(ok[None], xp.stack(new_rows), values[:num_selected])
        if packs_count:
            values, count = xp.concatenate([selected, (values[num_selected] + ~finite_new * 1.0)[None]]), None
        else:
            values, count = selected, _count_nonfinite(xp, count, ~finite_new)
        chain_parts = (xp.where(ok[..., None, :], z_new, z_parts), values, count,
                       cache if cache is None else xp.where(ok, c_new, cache))
        a = ops.unit_mean(ok * 1.0)  # step s's acceptance rate (one reduction over the units a step)
        rates = xp.where(step_rows == s, a, rates)  # rates[s] = a, in the book's fusion
        if n2:  # after a sweep's last move: its moves' rates adapt the scales (saemix)
            end = is_rw & (j == d - 1)
            a_sweep = ops.zeros((d,)) + ops.take_block(rates, xp.clip(s - d + 1, 0, num_steps - d), d)
            scale_rw = xp.where(end, adapt_scale(scale_rw, a_sweep), scale_rw)
            rate_rw = xp.where(end, rate_rw + a_sweep / n2, rate_rw)
        if n3:
            scale_block = xp.where(is_block, adapt_scale(scale_block, a, mask), scale_block)
            rate_block = xp.where(is_block, rate_block + a / n3, rate_block)
        return chain_parts, book_of(scale_rw, scale_block, rate_rw, rate_block, rates)

    carry = (packed(chain), book_of(scale_rw, scale_block, ops.zeros((d,)), ops.zeros(()), ops.zeros((num_steps,))))
    chain_parts, book = ops.fori_loop(0, num_steps, step, carry)
    chain = unpacked(*chain_parts)
    dtypes = scale_rw.dtype, scale_block.dtype
    scale_rw, scale_block, rate_rw, rate_block, rates = book_parts(book)
    scale_rw, scale_block = scale_rw.astype(dtypes[0]), scale_block.astype(dtypes[1])
    if n1:
        rate = ops.zeros(())
        for i in range(n1):  # each repetition's rate, summed in their order
            rate = rate + rates[i] / n1
        acc["prior_imh"] = rate
    if n2:
        acc["rw"] = rate_rw
    if n3:
        acc["block_rw"] = rate_block
    return chain, (scale_rw, scale_block), acc


def _saemix_sweep_blocked(ops: Ops, keys: Any, z: Any, scales: tuple[Any, Any], k: Any, kernels: tuple[int, int, int],
                          evaluate: Evaluate, sample_prior: Callable[[Any], Any], cache: Any,
                          rescore: Callable[[Any, Any], tuple[Any, Any]] | None
                          ) -> tuple[ChainState, tuple[Any, Any], dict]:
    """:func:`saemix_sweep` over blocks of units (an eager backend; the same draws, states and rates bit for bit).

    After the first kernel step the sweep owns its chain arrays and later steps overwrite them block by block
    (``in_place``), so the chains cost one set of ``[L, N]`` arrays, not two; ``z`` and ``cache`` (the caller's)
    are never written.  The acceptance indicators of a step are one bool ``[L, N]`` each, the non-finite count a
    scalar (exact: integer-valued floats) instead of a per-unit array."""
    n1, n2, n3 = kernels
    chain = init_chain_state(z, evaluate, cache, rescore)
    chain = chain._replace(num_nonfinite=ops.zeros(()))
    acc: dict[str, Any] = {}
    d = chain.z.shape[-1]
    scale_rw, scale_block = scales
    owned = False  # z (and a carried cache) are the caller's until the first step has written fresh arrays
    if n1:
        rate = ops.zeros(())
        oks = []
        for i in range(n1):
            chain, ok = _prior_imh(ops, keys[i], chain, sample_prior, evaluate, in_place=owned)
            owned = True
            oks.append(ok)
        for ok in oks:  # each repetition's rate, summed in their order (as the unblocked sweep)
            rate = rate + ops.unit_mean(ok * 1.0) / n1
        acc["prior_imh"] = rate
        del oks
    if n2:
        rate = ops.zeros((d,))
        for i in range(n2):
            chain, a = rw_componentwise(ops, keys[n1 + i], chain, scale_rw, evaluate, in_place=owned)
            owned = True
            scale_rw, rate = adapt_scale(scale_rw, a), rate + a / n2
        acc["rw"] = rate
    if n3:
        rate = ops.zeros(())
        for i in range(n3):
            mask = random_block_mask(ops, keys[n1 + n2 + 2 * i], d, k)
            chain, a = rw_block(ops, keys[n1 + n2 + 2 * i + 1], chain, scale_block, mask, evaluate, in_place=owned)
            owned = True
            scale_block, rate = adapt_scale(scale_block, a, mask), rate + a / n3
        acc["block_rw"] = rate
    chain = chain._replace(num_nonfinite=ops.xp.sum(chain.num_nonfinite))
    return chain, (scale_rw, scale_block), acc


#: MALA's target acceptance rate (Roberts & Rosenthal 1998) and the Robbins–Monro rate of its step adaptation
MALA_TARGET = 0.574
MALA_ADAPT_RATE = 0.5


class GradChainState(NamedTuple):
    """Chains of a gradient-based kernel: draws ``[L, n, d]``, log-target ``[L, n]`` and its gradient, and the
    count of proposals rejected for a non-finite log-target or gradient."""

    z: Any
    log_target: Any
    grad: Any
    num_nonfinite: Any = 0.0


def mala(ops: Ops, key: Any, state: GradChainState, log_step: Any,
         value_and_grad: Callable[[Any], tuple[Any, Any]]) -> tuple[GradChainState, Any]:
    """One Metropolis-adjusted Langevin step per chain, with a per-unit step size ``h_i = exp(log_step_i)``.

    ``z' = z + ½h² ∇log π(z) + h ε``, accepted with the ratio ``π(z') q(z | z') / (π(z) q(z' | z))``
    (Roberts & Tweedie 1996).  ``value_and_grad(z) -> (log π [L, n], ∇ [L, n, d])``.  Returns the state and the
    per-unit acceptance rate averaged over chains ``[n]``.
    """
    xp = ops.xp
    k1, k2 = ops.split(key)
    h = xp.exp(log_step)[..., None]  # [n, 1]
    mean_fwd = state.z + 0.5 * h * h * state.grad
    z_new = mean_fwd + h * ops.normal(k1, tuple(state.z.shape))
    lt_new, g_new = value_and_grad(z_new)
    mean_bwd = z_new + 0.5 * h * h * g_new
    log_q_bwd = -xp.sum((state.z - mean_bwd) ** 2, -1) / (2.0 * h[..., 0] ** 2)
    log_q_fwd = -xp.sum((z_new - mean_fwd) ** 2, -1) / (2.0 * h[..., 0] ** 2)
    log_ratio = lt_new + log_q_bwd - state.log_target - log_q_fwd
    u = ops.uniform(k2, tuple(log_ratio.shape))
    finite_new = xp.isfinite(lt_new) & xp.all(xp.isfinite(g_new), -1)
    finite = xp.isfinite(log_ratio) & finite_new
    ok = finite & (xp.log(u) < xp.where(finite, log_ratio, 0.0))
    z = xp.where(ok[..., None], z_new, state.z)
    lt = xp.where(ok, lt_new, state.log_target)
    g = xp.where(ok[..., None], g_new, state.grad)
    count = state.num_nonfinite + xp.sum((~finite_new) * 1.0)
    return GradChainState(z, lt, g, count), xp.mean(ok * 1.0, 0)


def adapt_log_step(log_step: Any, acceptance: Any) -> Any:
    """Per-unit Robbins–Monro adaptation ``log h_i ← log h_i + 0.5 (acc_i − 0.574)``."""
    return log_step + MALA_ADAPT_RATE * (acceptance - MALA_TARGET)
