"""JAX flavour of :mod:`latentfit.integrations.vfg`: flowjax flows and an optax Adam loop.

Each edge flow is a flowjax ``Chain`` of ``blocks`` affine ``Coupling`` layers (conditioner: 3-layer ReLU
MLP of width ``hidden``, i.e. ``nn_depth=2``) with a ``Permute`` (reversal) between them; a 1-D node gets
a flowjax elementwise ``Affine``; ``blocks=0`` the identity.  Parameters are the inexact arrays of the
flows (``paramax.NonTrainable`` leaves excluded), unwrapped with ``paramax.unwrap`` before use, as in
flowjax's own training loops.  The graph logic is the backend-neutral one of :mod:`latentfit.integrations.vfg`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from latentfit.integrations.vfg import VFG, VFGFit, _epoch_loss, _progress, _validate_data, negative_elbo, random_keep


def _require() -> tuple[Any, Any, Any, Any]:
    try:
        import equinox as eqx
        import flowjax.bijections as fb
        import paramax
    except ImportError as e:  # pragma: no cover
        raise ImportError("VFG(backend='jax') needs flowjax (pip install flowjax)") from e
    import jax

    return jax, eqx, fb, paramax


class JaxOps:
    """:class:`~latentfit.integrations.vfg.ArrayOps` over jax.numpy arrays."""

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self.jnp = jnp
        self.jax = jax

    def take(self, x: Any, idx: Sequence[int]) -> Any:
        return self.jnp.take(x, self.jnp.asarray(list(idx), dtype=self.jnp.int32), axis=-1)

    def pad(self, x: Any, d: int) -> Any:
        k = x.shape[-1]
        return x if k == d else self.jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - k)])

    def concat(self, xs: list[Any]) -> Any:
        return self.jnp.concatenate(xs, axis=-1)

    def where(self, c: Any, a: Any, b: Any) -> Any:
        return self.jnp.where(c, a, b)

    def abs(self, x: Any) -> Any:
        return self.jnp.abs(x)

    def sum(self, x: Any) -> Any:
        return x.sum(-1)

    def mean(self, x: Any) -> Any:
        return x.mean()

    def softplus(self, x: Any) -> Any:
        return self.jax.nn.softplus(x)

    def minimum(self, x: Any, v: float) -> Any:
        return self.jnp.minimum(x, v)

    def maximum(self, x: Any, v: float) -> Any:
        return self.jnp.maximum(x, v)


class _Bound:
    """A (unwrapped) flowjax bijection on one vector, vmapped over the rows: ``forward`` / ``inverse``."""

    def __init__(self, bij: Any) -> None:
        import jax

        self.bij = bij
        self._f = None if bij is None else jax.vmap(bij.transform)
        self._i = None if bij is None else jax.vmap(bij.inverse)

    def forward(self, h: Any) -> Any:
        return h if self._f is None else self._f(h)

    def inverse(self, h: Any) -> Any:
        return h if self._i is None else self._i(h)


def _bounded_exp(c: float) -> Any:
    import jax.numpy as jnp

    def f(u: Any) -> Any:
        return jnp.exp(c * jnp.tanh(u / c))

    return f


def _bounded_affine(c: float) -> Any:
    """flowjax ``Affine`` whose scale is re-parametrised (``eqx.tree_at``, as flowjax documents) as
    ``exp(c·tanh(u/c))``: log-scale within (−c, c), as Pyro's clamp on the torch side."""
    _, eqx, fb, paramax = _require()
    import jax.numpy as jnp

    aff = fb.Affine()
    return eqx.tree_at(lambda a: a.scale, aff, paramax.Parameterize(_bounded_exp(c), jnp.zeros(())))


def make_flows(model: VFG, key: Any) -> list[Any]:
    """One flowjax bijection per node (its edge to the parent; None for the root and identity edges)."""
    jax, _, fb, _ = _require()
    import jax.numpy as jnp

    flows: list[Any] = []
    for node in model.graph.nodes:
        if node.parent is None or model.blocks == 0:
            flows.append(None)
            continue
        dim = model.graph.nodes[node.parent].dim
        if dim == 1:
            flows.append(fb.Affine(jnp.zeros(1), jnp.ones(1)))
            continue
        parts: list[Any] = []
        for b in range(model.blocks):
            key, sub = jax.random.split(key)
            parts.append(fb.Coupling(sub, transformer=_bounded_affine(model.log_scale_clip), untransformed_dim=dim // 2,
                                     dim=dim, nn_width=model.hidden, nn_depth=2, nn_activation=jax.nn.relu))
            if b < model.blocks - 1:
                parts.append(fb.Permute(jnp.arange(dim - 1, -1, -1)))
        flows.append(fb.Chain(parts))
    return flows


def bound_flows(flows: list[Any]) -> list[_Bound]:
    """Unwrap (paramax) and vmap the flows for the graph logic."""
    _, _, _, paramax = _require()
    return [_Bound(None if f is None else paramax.unwrap(f)) for f in flows]


def fit_jax(model: VFG, x: Any, num_epochs: int, batch_size: int, lr: float, seed: int, progress: bool) -> VFGFit:
    """Minibatch ``optax.adam`` on the negative ELBO (plain and, with masking, Alg. 2 steps alternating)."""
    jax, eqx, _, paramax = _require()
    import jax.numpy as jnp
    import optax

    xn = np.asarray(x, dtype=np.float64)
    loc, scale = _validate_data(model, xn)
    ops = JaxOps()
    flows = make_flows(model, jax.random.PRNGKey(seed))
    params, static = eqx.partition(flows, eqx.is_inexact_array, is_leaf=lambda v: isinstance(v, paramax.NonTrainable))
    xs_np = (xn - loc) / scale
    col_obs = jnp.asarray(~np.isnan(xs_np), dtype=jnp.float32)
    xs = jnp.asarray(np.nan_to_num(xs_np, nan=0.0), dtype=jnp.float32)
    opt = optax.chain(optax.clip_by_global_norm(model.clip_grad), optax.adam(lr)) if model.clip_grad else optax.adam(lr)
    opt_state = opt.init(params)
    g = model.graph

    def loss_fn(p: Any, xb: Any, ob: Any, keep: Any) -> Any:
        fl = bound_flows(eqx.combine(p, static))
        return negative_elbo(g, fl, ops, xb, ob, keep, model.beta, model.likelihood, model.sigma)

    def make_step(masked: bool) -> Any:
        @jax.jit
        def step(p: Any, s: Any, xb: Any, ob: Any, keep: Any) -> Any:
            loss, grads = jax.value_and_grad(loss_fn)(p, xb, ob, keep if masked else None)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        return step

    plain, masked = make_step(False), make_step(True)
    rng = np.random.default_rng(seed)
    n = xn.shape[0]
    bs = min(batch_size, n)
    n_leaves = len(g.leaves)
    history: list[float] = []
    step_i = 0
    t0 = time.perf_counter()
    bar = _progress(num_epochs, progress, "VFG")
    dummy = jnp.ones((1, n_leaves), jnp.float32)
    for _ in range(num_epochs):
        perm = rng.permutation(n)
        acc = np.zeros((2, 2))  # [plain, masked] × [loss sum, rows]
        for s in range(0, n, bs):
            idx = jnp.asarray(perm[s:s + bs])
            xb, ob = xs[idx], col_obs[idx]
            if model.masking and step_i % 2 == 1 and n_leaves > 1:
                keep = jnp.asarray(random_keep(rng, len(idx), n_leaves))
                params, opt_state, loss = masked(params, opt_state, xb, ob, keep)
                acc[1] += np.array([float(loss) * len(idx), len(idx)])
            else:
                params, opt_state, loss = plain(params, opt_state, xb, ob, dummy)
                acc[0] += np.array([float(loss) * len(idx), len(idx)])
            step_i += 1
        history.append(_epoch_loss(acc))
        bar.set_postfix(loss=f"{history[-1]:.4g}")
        bar.update()
    bar.close()
    fit = VFGFit(model, eqx.combine(params, static), ops, loc, scale, history, time.perf_counter() - t0)
    fit.dtype = jnp.float32
    return fit
