"""JAX flavour of :mod:`latentfit.integrations.vfg`: flowjax flows and an optax Adam loop.

Each edge flow is a flowjax ``Chain`` of ``blocks`` affine ``Coupling`` layers (conditioner: 3-layer ReLU
MLP of width ``hidden``, i.e. ``nn_depth=2``) with a ``Permute`` (reversal) between them; a 1-D node gets
a flowjax elementwise ``Affine``; ``blocks=0`` the identity.  Parameters are the inexact arrays of the
flows (``paramax.NonTrainable`` leaves excluded), unwrapped with ``paramax.unwrap`` before use, as in
flowjax's own training loops.  The graph logic is the backend-neutral one of :mod:`latentfit.integrations.vfg`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from latentfit.integrations.vfg import (
    VFG,
    VFGFit,
    _epoch_loss,
    _masked_step,
    _progress,
    _split_validation,
    _validate_data,
    epoch_info,
    negative_elbo,
    random_keep,
)


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
    """One flowjax bijection per edge of ``model.graph.edges`` (None: an identity edge, ``blocks=0``), on the
    parent's dimension."""
    jax, eqx, fb, _ = _require()
    import jax.numpy as jnp

    flows: list[Any] = []
    for _, parent in model.graph.edges:
        if model.blocks == 0:
            flows.append(None)
            continue
        dim = model.graph.nodes[parent].dim
        if dim == 1:
            flows.append(fb.Affine(jnp.zeros(1), jnp.ones(1)))
            continue
        parts: list[Any] = []
        for b in range(model.blocks):
            key, sub = jax.random.split(key)
            cpl = fb.Coupling(sub, transformer=_bounded_affine(model.log_scale_clip), untransformed_dim=dim // 2,
                              dim=dim, nn_width=model.hidden, nn_depth=2, nn_activation=jax.nn.relu)
            if model.identity_init:  # last conditioner layer at zero: the coupling starts as the identity
                last = cpl.conditioner.layers[-1]
                cpl = eqx.tree_at(lambda c: (c.conditioner.layers[-1].weight, c.conditioner.layers[-1].bias), cpl,
                                  (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
            parts.append(cpl)
            if b < model.blocks - 1:
                parts.append(fb.Permute(jnp.arange(dim - 1, -1, -1)))
        flows.append(fb.Chain(parts))
    return flows


def bound_flows(flows: list[Any]) -> list[_Bound]:
    """Unwrap (paramax) and vmap the flows for the graph logic."""
    _, _, _, paramax = _require()
    return [_Bound(None if f is None else paramax.unwrap(f)) for f in flows]


def fit_jax(model: VFG, x: Any, num_epochs: int, batch_size: int, lr: float, seed: int, progress: bool,
            validation: float = 0.0, patience: int | None = None, lr_decay: bool = True,
            callback: Callable[[int, dict[str, float]], Any] | None = None) -> VFGFit:
    """Minibatch ``optax.adam`` on the negative ELBO (plain and, with masking, Alg. 2 steps on the same
    schedule as the torch flavour), cosine learning-rate decay, optional early stopping on held-out rows."""
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
    rng = np.random.default_rng(seed)
    tr_idx, va_idx = _split_validation(rng, xn.shape[0], validation)
    n = len(tr_idx)
    bs = min(batch_size, n)
    total = num_epochs * int(np.ceil(n / bs))
    # the cosine decay of :func:`~latentfit.integrations.vfg._lr_at`, traced
    adam = optax.adam((lambda t: lr * (0.1 + 0.45 * (1.0 + jnp.cos(jnp.pi * t / max(total - 1, 1)))))
                      if lr_decay and total > 1 else lr)
    opt = optax.chain(optax.clip_by_global_norm(model.clip_grad), adam) if model.clip_grad else adam
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
    n_leaves = len(g.leaves)
    va_keep = None
    if va_idx is not None and model.masking and n_leaves > 1:
        va_keep = jnp.asarray(random_keep(rng, len(va_idx), n_leaves, model.mask_drop))
    val_loss = jax.jit(lambda p, xb, ob: loss_fn(p, xb, ob, None))
    val_masked = jax.jit(loss_fn)
    history: list[float] = []
    val_history: list[float] = []
    best: tuple[float, Any] | None = None
    stale = 0
    step_i = 0
    t0 = time.perf_counter()
    bar = _progress(num_epochs, progress, "VFG")
    dummy = jnp.ones((1, n_leaves), jnp.float32)
    good, restarts = params, 0  # the last finite epoch's weights
    for _ in range(num_epochs):
        perm = tr_idx[rng.permutation(n)]
        acc = np.zeros((2, 2))  # [plain, masked] × [loss sum, rows]
        diverged = False
        for s in range(0, n, bs):
            idx = jnp.asarray(perm[s:s + bs])
            xb, ob = xs[idx], col_obs[idx]
            if _masked_step(step_i, model.masking) and n_leaves > 1:
                keep = jnp.asarray(random_keep(rng, len(idx), n_leaves, model.mask_drop))
                params, opt_state, loss = masked(params, opt_state, xb, ob, keep)
                acc[1] += np.array([float(loss) * len(idx), len(idx)])
            else:
                params, opt_state, loss = plain(params, opt_state, xb, ob, dummy)
                acc[0] += np.array([float(loss) * len(idx), len(idx)])
            step_i += 1
            if not np.isfinite(float(loss)):
                diverged = True
                break
        if diverged:  # back to the last finite weights with a fresh Adam state (the torch flavour also halves
            restarts += 1  # the learning rate; the compiled optax schedule is kept here)
            if restarts > 5:
                raise RuntimeError("VFG training diverged (non-finite loss) 6 times: lower learning_rate or "
                                   "log_scale_clip, or standardise the data")
            params, opt_state = good, opt.init(good)
            continue
        good = params
        history.append(_epoch_loss(acc))
        if va_idx is not None:
            vi = jnp.asarray(va_idx)
            v = float(val_loss(params, xs[vi], col_obs[vi]))
            if va_keep is not None:
                v += float(val_masked(params, xs[vi], col_obs[vi], va_keep))
            val_history.append(v)
            if best is None or v < best[0] or not np.isfinite(best[0]):
                best, stale = (v, params), 0
            else:
                stale += 1
        if callback is not None:
            callback(len(history), epoch_info(history, val_history, va_idx is not None))
        if va_idx is not None and patience is not None and stale >= patience:
            break
        bar.set_postfix(loss=f"{history[-1]:.4g}")
        bar.update()
    bar.close()
    if best is not None:
        params = best[1]
    fit = VFGFit(model, eqx.combine(params, static), ops, loc, scale, history, time.perf_counter() - t0)
    fit.dtype = jnp.float32
    fit.val_history = val_history
    return fit


def fit_from_torch(fit: Any) -> VFGFit:
    """The JAX flavour of a torch fit (a :class:`~latentfit.integrations.vfg_engine.VFGResult` or a
    :class:`VFGFit`) with the *same weights*: every Pyro
    ``AffineCoupling`` hypernet (``DenseNN``) becomes the conditioner MLP of a flowjax ``Coupling`` (its last
    layer's rows interleaved: Pyro outputs ``[shift…, log-scale…]``, flowjax ``[shift, log-scale]`` per
    coordinate), the elementwise affine of a 1-D node a flowjax ``Affine``; standardisation constants and
    history are shared.  The arrays follow the torch dtype (float64 needs JAX's x64 mode, e.g. inside
    ``with jax.enable_x64(True):``, around this call and the calls on the result)."""
    jax, eqx, fb, _ = _require()
    import jax.numpy as jnp

    fit = getattr(fit, "fitted", fit)  # a VFGResult (the torch engine's) holds its flows as a VFGFit
    if fit.model.backend != "torch":
        raise ValueError(f"fit_from_torch needs a torch-fitted VFG, got backend {fit.model.backend!r}")
    import copy

    model = copy.copy(fit.model)
    model.backend = "jax"
    dtype = jnp.float64 if str(fit.dtype).endswith("float64") else jnp.float32
    if dtype == jnp.float64 and jnp.zeros(()).dtype != jnp.float64:
        raise ValueError("the torch fit is float64: call fit_from_torch inside `with jax.enable_x64(True):`")

    def arr(t: Any) -> Any:
        return jnp.asarray(t.detach().cpu().numpy(), dtype=dtype)

    flows = make_flows(model, jax.random.PRNGKey(0))
    out: list[Any] = []
    for k, (tflow, jflow) in enumerate(zip(fit.flows, flows)):
        if jflow is None:
            out.append(None)
            continue
        if isinstance(jflow, fb.Affine):  # 1-D node: y = e^s x + b
            aff = tflow.layers[0]
            out.append(fb.Affine(arr(aff.shift), jnp.exp(arr(aff.log_scale))))
            continue
        parts = list(jflow.bijections)
        for b, layer in enumerate(tflow.layers):
            lin = layer.nn.net.layers  # Pyro DenseNN: Linear, Linear, Linear
            cpl = parts[2 * b]
            d2 = lin[-1].weight.shape[0] // 2
            w_last = np.asarray(lin[-1].weight.detach().cpu().numpy())
            b_last = np.asarray(lin[-1].bias.detach().cpu().numpy())
            w_last = np.stack([w_last[:d2], w_last[d2:]], 1).reshape(w_last.shape)
            b_last = np.stack([b_last[:d2], b_last[d2:]], 1).reshape(b_last.shape)
            new = [(arr(lin[i].weight), arr(lin[i].bias)) for i in range(len(lin) - 1)]
            new.append((jnp.asarray(w_last, dtype=dtype), jnp.asarray(b_last, dtype=dtype)))
            if len(cpl.conditioner.layers) != len(new):
                raise ValueError(f"edge {k}: conditioner depth {len(cpl.conditioner.layers)} != {len(new)}")
            for i, (w, bb) in enumerate(new):
                cpl = eqx.tree_at(lambda c, i=i: (c.conditioner.layers[i].weight, c.conditioner.layers[i].bias), cpl,
                                  (w, bb))
            cpl = jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, cpl)
            parts[2 * b] = cpl
        out.append(fb.Chain(parts))
    new_fit = VFGFit(model, out, JaxOps(), fit.loc, fit.scale, list(fit.history), fit.seconds)
    new_fit.dtype = dtype
    new_fit.val_history = list(fit.val_history)
    return new_fit
