"""optax GradientTransformations: :func:`amsgrad`, :func:`opt_amsgrad` and the :func:`hwa` averaging wrapper.

Usable with any optax loop or directly as the optimiser of ``numpyro.infer.SVI`` (which wraps an optax
transformation with ``numpyro.optim.optax_to_numpyro``). Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from latentfit.optim._checks import (
    check_beta,
    check_every,
    check_lr,
    check_nonneg,
    check_predictor,
    check_second_moment,
)

__all__ = ["HWAState", "OptAMSGradState", "amsgrad", "hwa", "hwa_averaged", "hwa_variance", "opt_amsgrad"]


def amsgrad(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """``optax.amsgrad`` with argument checks.

    optax's rule (``bias_correction_nu=True``, the default) takes the maximum over the *bias-corrected* second
    moment, unlike torch (maximum of the uncorrected one, corrected afterwards)::

        m_t = β1 m_{t-1} + (1-β1) g_t,  v_t = β2 v_{t-1} + (1-β2) g_t²,  v^max_t = max(v^max_{t-1}, v_t/(1-β2^t))
        w_t = w_{t-1} - lr · (m_t/(1-β1^t)) / (sqrt(v^max_t + eps_root) + ε)
    """
    check_lr(learning_rate)
    check_beta(b1, "b1")
    check_beta(b2, "b2")
    check_nonneg(eps, "eps")
    check_nonneg(eps_root, "eps_root")
    return optax.amsgrad(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, **kwargs)


class OptAMSGradState(NamedTuple):
    """State of :func:`opt_amsgrad`: step count, θ, v, v̂, the auxiliary iterate w_{t-1/2}, past gradients, and
    the last prediction m_t (``second_moment="residual"`` only; ``()`` otherwise)."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any
    half: Any
    history: Any
    prediction: Any = ()


def _extrapolate(hist: jax.Array, reg: float) -> jax.Array:
    """Regularised minimal polynomial extrapolation of the rows x_0..x_{r-1} of ``hist`` (oldest first)."""
    x = hist.reshape(hist.shape[0], -1)
    u = x[1:] - x[:-1]
    gram = u @ u.T
    scale = jnp.linalg.norm(gram, ord=2)
    gram = gram / jnp.where(scale > 0, scale, 1.0)
    z = jnp.linalg.solve(gram + reg * jnp.eye(gram.shape[0], dtype=x.dtype), jnp.ones(gram.shape[0], dtype=x.dtype))
    c = z / z.sum()
    return (c @ x[:-1]).reshape(hist.shape[1:])


def opt_amsgrad(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    predictor: str = "last",
    span: int = 5,
    reg: float = 1e-8,
    second_moment: str = "grad",
) -> optax.GradientTransformation:
    """OPT-AMSGrad (Wang, Li, Karimi & Li 2019, arXiv:1903.01435, Algorithm 2) as an optax transformation.

    With g_t the gradient at the current parameters w_t::

        θ_t = β1 θ_{t-1} + (1-β1) g_t,   v_t = β2 v_{t-1} + (1-β2) g_t²,   v̂_t = max(v̂_{t-1}, v_t)
        w_{t+1/2} = w_{t-1/2} - η_t θ_t / sqrt(v̂_t)                  (w_{-1/2} = w_1, kept in the state)
        h_{t+1}  = β1 θ_{t-1} + (1-β1) m_{t+1}                       (m_{t+1}: prediction of g_{t+1})
        w_{t+1}  = w_{t+1/2} - η_{t+1} h_{t+1} / sqrt(v̂_t),         update = w_{t+1} - w_t

    θ_0 = v_0 = 0, v̂_0 = ε (no bias correction, no ε in the denominator). ``learning_rate`` is a float or an optax
    schedule (η_t = schedule(t-1), η_{t+1} = schedule(t)). ``predictor``: ``"last"`` (m_{t+1} = g_t),
    ``"mean"`` (mean of the last ``span`` gradients) or ``"extrapolation"`` (the paper's regularised minimal
    polynomial extrapolation of the last ``span`` gradients, Scieur et al. 2016, per leaf; see
    :class:`latentfit.optim.OptAMSGrad`); g_t until ``span`` gradients are stored. ``update`` needs ``params``.
    ``second_moment="residual"``: v averages (g_t − m_t)², the error of the previous prediction (m_1 = 0). The same
    rule as :class:`latentfit.optim.OptAMSGrad`, whose docstring says how far it was checked against the paper and
    the authors' code.
    """
    check_lr(learning_rate)
    check_beta(b1, "b1")
    check_beta(b2, "b2")
    check_nonneg(eps, "eps")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0 (it is the initial v̂ of OPT-AMSGrad), got {eps!r}")
    check_predictor(predictor, span)
    check_nonneg(reg, "reg")
    residual = check_second_moment(second_moment) == "residual"
    lr = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
    keep_history = predictor != "last"

    def init_fn(params: Any) -> OptAMSGradState:
        zeros = optax.tree.zeros_like(params)
        return OptAMSGradState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros,
            nu=optax.tree.zeros_like(params),
            nu_max=jax.tree.map(lambda p: jnp.full_like(p, eps), params),
            half=jax.tree.map(jnp.asarray, params),
            history=jax.tree.map(lambda p: jnp.zeros((span, *jnp.shape(p)), jnp.result_type(p)), params)
            if keep_history
            else (),
            prediction=optax.tree.zeros_like(params) if residual else (),
        )

    def update_fn(updates: Any, state: OptAMSGradState, params: Any = None) -> tuple[Any, OptAMSGradState]:
        if params is None:
            raise ValueError("opt_amsgrad needs params in update(grads, state, params)")
        count = state.count
        eta_t, eta_next = lr(count), lr(count + 1)
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        err = jax.tree.map(lambda g, m: g - m, updates, state.prediction) if residual else updates
        nu = jax.tree.map(lambda v, e: b2 * v + (1.0 - b2) * e * e, state.nu, err)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        half = jax.tree.map(lambda w, m, v: w - eta_t * m / jnp.sqrt(v), state.half, mu, nu_max)
        if keep_history:
            history = jax.tree.map(lambda h, g: jnp.concatenate([h[1:], g[None]], 0), state.history, updates)
            full = count + 1 >= span
            if predictor == "mean":
                guess = jax.tree.map(lambda h, g: jnp.where(full, h.mean(0), g), history, updates)
            else:
                guess = jax.tree.map(lambda h, g: jnp.where(full, _extrapolate(h, reg), g), history, updates)
        else:
            history, guess = (), updates
        new_w = jax.tree.map(
            lambda w, m_prev, m, v: w - eta_next * (b1 * m_prev + (1.0 - b1) * m) / jnp.sqrt(v),
            half,
            state.mu,
            guess,
            nu_max,
        )
        out = jax.tree.map(lambda w, p: (w - p).astype(jnp.result_type(p)), new_w, params)
        return out, OptAMSGradState(count + 1, mu, nu, nu_max, half, history, guess if residual else ())

    return optax.GradientTransformation(init_fn, update_fn)


class HWAState(NamedTuple):
    """State of :func:`hwa`: the inner state, steps taken k, snapshots averaged n, running mean and mean of w²."""

    inner_state: Any
    k: jax.Array
    n: jax.Array
    mean: Any
    sq: Any


def hwa(inner: optax.GradientTransformation, every: int = 1) -> optax.GradientTransformationExtraArgs:
    """Hyper-parameter weight averaging around ``inner``: after the k-th update (k = 0, 1, ...) with
    k % every == 0 and n = k // every, with w the new parameters (``params + inner updates``)::

        μ_HWA ← (n μ_HWA + w)/(n + 1),   s_HWA ← (n s_HWA + w²)/(n + 1),   σ²_HWA = s_HWA - μ_HWA²

    The updates are the inner ones, unchanged; :func:`hwa_averaged` / :func:`hwa_variance` read the averages from
    the state (or from any pytree holding it, e.g. a NumPyro ``svi_state``). ``update`` needs ``params``.
    """
    every = check_every(every)
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(f"inner must be an optax GradientTransformation, got {type(inner).__name__}")
    inner_x = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> HWAState:
        return HWAState(
            inner_state=inner_x.init(params),
            k=jnp.zeros([], jnp.int32),
            n=jnp.zeros([], jnp.int32),
            mean=optax.tree.zeros_like(params),
            sq=optax.tree.zeros_like(params),
        )

    def update_fn(updates: Any, state: HWAState, params: Any = None, **extra_args: Any) -> tuple[Any, HWAState]:
        if params is None:
            raise ValueError("hwa needs params in update(grads, state, params)")
        updates, inner_state = inner_x.update(updates, state.inner_state, params, **extra_args)
        new_params = optax.apply_updates(params, updates)
        take = state.k % every == 0
        n = state.n.astype(jnp.result_type(float))
        mean = jax.tree.map(lambda m, w: jnp.where(take, (n * m + w) / (n + 1), m), state.mean, new_params)
        sq = jax.tree.map(lambda s, w: jnp.where(take, (n * s + w * w) / (n + 1), s), state.sq, new_params)
        return updates, HWAState(inner_state, state.k + 1, state.n + take.astype(jnp.int32), mean, sq)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_hwa_state(state: Any) -> HWAState:
    if isinstance(state, HWAState):
        return state
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, HWAState)) if isinstance(s, HWAState)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one HWAState in the given state, found {len(found)}")
    return found[0]


def hwa_averaged(state: Any) -> Any:
    """The HWA mean μ_HWA (a params pytree) from an :class:`HWAState` or any pytree holding exactly one."""
    return _find_hwa_state(state).mean


def hwa_variance(state: Any) -> Any:
    """σ²_HWA = mean of w² - μ_HWA² (clamped at 0), a params pytree."""
    s = _find_hwa_state(state)
    return jax.tree.map(lambda q, m: jnp.maximum(q - m * m, 0.0), s.sq, s.mean)
