"""JAX flavour of :mod:`latentfit.integrations.vfg`: flowjax flows trained by optax's Adam through the engine driver.

Each edge flow is a flowjax ``Chain`` of ``blocks`` affine ``Coupling`` layers (conditioner: 3-layer ReLU
MLP of width ``hidden``, i.e. ``nn_depth=2``) with a ``Permute`` (reversal) between them; a 1-D node gets
a flowjax elementwise ``Affine``; ``blocks=0`` the identity.  Parameters are the inexact arrays of the
flows (``paramax.NonTrainable`` leaves excluded), unwrapped with ``paramax.unwrap`` before use, as in
flowjax's own training loops.  The graph logic is the backend-neutral one of :mod:`latentfit.integrations.vfg`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from latentfit.integrations.vfg import (
    VFG,
    VFGFit,
    _epoch_loss,
    _validate_data,
    negative_elbo,
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
    new_fit.training_data = fit.training_data
    return new_fit


# ----------------------------------------------------------------------------------------------------
# training through the engine driver
# ----------------------------------------------------------------------------------------------------
def _engine_classes() -> tuple[type, type]:
    """The JAX flavour's problem record and engine (built on first use: the module imports no engine at the top)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    jax, eqx, _, paramax = _require()
    import jax.numpy as jnp
    import optax

    from latentfit.inference.ops_jax import JaxOps as EngineJaxOps
    from latentfit.integrations.vfg import _lr_at, _masked_step
    from latentfit.integrations.vfg_engine import VFGEngine, VFGState, validation_size

    class EagerJaxOps(EngineJaxOps):
        """The driver's shim for the VFG's JAX flavour: JAX arrays; an epoch runs in Python (each mini-batch step
        is a compiled function), so the driver does not compile the whole step."""

        jittable = False

        def scan_steps(self, step: Callable, state: Any, ks: range, key: Any = None,
                       capacity: int | None = None) -> tuple[Any, list[Any]]:
            infos = []
            for k in ks:
                state, info = step(state, k)
                infos.append(info)
            return state, infos

    class VFGJaxProblem:
        """:class:`~latentfit.integrations.vfg_engine.VFGProblem` of the JAX flavour: standardised, zero-filled data
        in JAX's default float dtype; the flows' trainable arrays by name (``jax.tree_util.keystr`` paths)."""

        def __init__(self, spec: VFG, x: Any) -> None:
            xn = np.asarray(x, dtype=np.float64)
            self.spec, self.graph = spec, spec.graph
            self.ops = EagerJaxOps()
            self.loc, self.scale = _validate_data(spec, xn)
            xs = (xn - self.loc) / self.scale
            self.col_obs = jnp.asarray(~np.isnan(xs), dtype=self.ops.dtype)
            self.xs = jnp.asarray(np.nan_to_num(xs, nan=0.0), dtype=self.ops.dtype)
            self.num_units, self.latent_dim = int(xn.shape[0]), int(self.graph.root_dim)
            self.array_ops = JaxOps()
            params, self.static = self._partition(make_flows(spec, jax.random.PRNGKey(0)))
            paths, self.treedef = jax.tree_util.tree_flatten_with_path(params)
            self.names = [jax.tree_util.keystr(path) for path, _ in paths]
            self.shapes = {n: list(a.shape) for n, (_, a) in zip(self.names, paths)}
            #: the training rows in their units, NaN where missing (the fitted root distribution of ``sample``)
            self.training_data = lambda: xn
            #: the edge (index into ``graph.edges``: the flows' list index) of every weight, by name
            self.param_edge = {n: int(path[0].idx) for n, (path, _) in zip(self.names, paths)}

        @staticmethod
        def _partition(flows: Any) -> tuple[Any, Any]:
            return eqx.partition(flows, eqx.is_inexact_array, is_leaf=lambda v: isinstance(v, paramax.NonTrainable))

        def build_weights(self, key: Any) -> dict[str, Any]:
            """Initial weights (flowjax's initialisers) drawn from ``key``, by name."""
            params, _ = self._partition(make_flows(self.spec, key))
            return {n: a.astype(self.ops.dtype) for n, a in zip(self.names, jax.tree_util.tree_leaves(params))}

        def flows_of(self, weights: dict[str, Any]) -> Any:
            """The flows holding ``weights``."""
            params = jax.tree_util.tree_unflatten(self.treedef, [weights[n] for n in self.names])
            return eqx.combine(params, self.static)

        def _training_rows(self) -> np.ndarray:
            """The training rows in their units, NaN where missing ``[n, d]``."""
            xs, obs = np.asarray(self.xs, dtype=np.float64), np.asarray(self.col_obs)
            return np.where(obs > 0, xs * self.scale + self.loc, np.nan)

        def data_arrays(self) -> dict[str, Any]:
            """The standardised data and its observed-entry mask (what a checkpoint's data digest covers)."""
            return {"xs": self.xs, "col_obs": self.col_obs, "loc": self.loc, "scale": self.scale}

        def data_shapes(self) -> dict[str, Any]:
            return {"num_units": self.num_units, "latent_dim": self.latent_dim, "params": self.shapes}

    def random_keep_jax(key: Any, n: int, n_leaves: int, drop: float, dtype: Any) -> Any:
        """:func:`~latentfit.integrations.vfg_engine.random_keep` drawn from a JAX key."""
        if n_leaves == 1:
            return jnp.ones((n, 1), dtype)
        k1, k2, k3 = jax.random.split(key, 3)
        keep = jax.random.uniform(k1, (n, n_leaves)) >= drop
        cols = jnp.arange(n_leaves)
        pick = jax.random.randint(k2, (n, 1), 0, n_leaves) == cols
        keep = keep | (pick & ~keep.any(1, keepdims=True))
        pick = jax.random.randint(k3, (n, 1), 0, n_leaves) == cols
        keep = keep & ~(pick & keep.all(1, keepdims=True))
        return keep.astype(dtype)

    class VFGJaxEngine(VFGEngine):
        """:class:`~latentfit.integrations.vfg_engine.VFGEngine` of the JAX flavour: the same epoch, divergence guard
        and early stopping; each mini-batch step (``optax.clip_by_global_norm`` then ``optax.scale_by_adam``, rate
        ``η_t``) compiled once per (plain/masked, batch size), compile time in ``fit.compile_time``; the stream a JAX
        key in the state, split per epoch."""

        model_type = VFGJaxProblem

        def __init__(self, problem: Any, **options: Any) -> None:
            super().__init__(problem, **options)
            self._compiled: dict[Any, Any] = {}

        def init(self, key: Any) -> Any:
            p = self.model
            k_split, k_flows, k_keep, key = jax.random.split(key, 4)
            n_val = validation_size(p.num_units, self.validation)
            val = None
            train = jnp.arange(p.num_units)
            if n_val:
                perm = jax.random.permutation(k_split, p.num_units)
                train, val = jnp.sort(perm[n_val:]), jnp.sort(perm[:n_val])
            weights = p.build_weights(k_flows)
            val_keep = None
            if val is not None and self.masking and self.num_leaves > 1:
                val_keep = random_keep_jax(k_keep, n_val, self.num_leaves, self.mask_drop, p.ops.dtype)
            zeros = {n: jnp.zeros_like(w) for n, w in weights.items()}
            return VFGState(weights=weights, adam_m=zeros, adam_v=dict(zeros), adam_t=self._fresh_count(), key=key,
                            num_steps=0, lr_scale=1.0, rollbacks=0, train_idx=train, val_idx=val, val_keep=val_keep,
                            best_val=math.inf if val is not None else None,
                            best_weights=dict(weights) if val is not None else None, stale=0)

        @staticmethod
        def _zeros_like(w: Any) -> Any:
            return jnp.zeros_like(w)

        @staticmethod
        def _next_key(key: Any) -> tuple[Any, Any]:
            return tuple(jax.random.split(key))

        def _loss(self, weights: dict[str, Any], xb: Any, ob: Any, keep: Any) -> Any:
            p, s = self.model, self.model.spec
            return negative_elbo(p.graph, bound_flows(p.flows_of(weights)), p.array_ops, xb, ob, keep, s.beta,
                                 s.likelihood, s.sigma)

        def _function(self, kind: str, args: tuple[Any, ...]) -> Any:
            """The compiled batch step (``kind`` "plain" / "masked") or held-out loss ("val" / "val_masked") for
            these argument shapes and trained/frozen weights (``args[0]`` / ``args[1]``: a layer-wise step
            differentiates the first only), compiled ahead of time on first use (time added to
            ``ops.compile_time``)."""
            cache_key = (kind, tuple(args[0]), *(tuple(np.shape(a)) for a in args[5:7]))
            if cache_key in self._compiled:
                return self._compiled[cache_key]
            masked = kind.endswith("masked")
            clip = optax.clip_by_global_norm(self.clip_grad) if self.clip_grad else optax.identity()
            adam = optax.scale_by_adam()

            def batch_step(w: Any, frozen: Any, m: Any, v: Any, t: Any, xb: Any, ob: Any, keep: Any, lr: Any) -> Any:
                def loss_of(a: Any) -> Any:
                    return self._loss({**frozen, **a}, xb, ob, keep if masked else None)

                loss, grads = jax.value_and_grad(loss_of)(w)
                grads, _ = clip.update(grads, clip.init(w))
                upd, st = adam.update(grads, optax.ScaleByAdamState(count=t, mu=m, nu=v))
                w = jax.tree_util.tree_map(lambda a, u: a - lr * u, w, upd)
                return w, st.mu, st.nu, st.count, loss

            def held_out(w: Any, frozen: Any, m: Any, v: Any, t: Any, xb: Any, ob: Any, keep: Any, lr: Any) -> Any:
                return self._loss(w, xb, ob, keep if masked else None)

            fn = batch_step if kind in ("plain", "masked") else held_out
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            self.ops.compile_time += time.perf_counter() - t0
            self._compiled[cache_key] = compiled
            return compiled

        def _epoch(self, state: Any, m: Any, v: Any, t: int, key: Any, lr_scale: float) -> Any:
            p = self.model
            layer = self.layer_of(state.epoch)
            names = self.trained_names(layer, state.weights)
            k_perm, key = jax.random.split(key)
            perm = state.train_idx[jax.random.permutation(k_perm, self.num_train)]
            w = {n: state.weights[n] for n in names}  # the trained weights, and the frozen ones (layer-wise)
            frozen = {n: a for n, a in state.weights.items() if n not in w}
            m_all, v_all = m, v
            m, v = {n: m_all[n] for n in names}, {n: v_all[n] for n in names}
            count = jnp.asarray(self._count(t, layer), jnp.int32)
            losses: list[tuple[int, int, Any]] = []
            step = state.num_steps
            dummy = jnp.ones((1, self.num_leaves), p.ops.dtype)
            for s in range(0, self.num_train, self.batch):
                idx = perm[s:s + self.batch]
                nb = int(idx.shape[0])
                masked = _masked_step(step, self.masking) and self.num_leaves > 1
                keep = dummy
                if masked:
                    key, sub = jax.random.split(key)
                    keep = random_keep_jax(sub, nb, self.num_leaves, self.mask_drop, p.ops.dtype)
                lr = jnp.asarray(lr_scale * _lr_at(self.learning_rate, step, self.total_steps, self.lr_decay),
                                 p.ops.dtype)
                args = (w, frozen, m, v, count, p.xs[idx], p.col_obs[idx], keep, lr)
                w, m, v, count, loss = self._function("masked" if masked else "plain", args)(*args)
                losses.append((int(masked), nb, loss))
                step += 1
            values = jax.device_get([loss for _, _, loss in losses])  # the epoch's one host sync
            acc = np.zeros((2, 2))
            for (kind, nb, _), value in zip(losses, values):
                acc[kind] += np.array([float(value) * nb, nb])
            loss_value = _epoch_loss(acc)
            if not np.isfinite(acc[:, 0]).all():
                loss_value = math.nan
            weights = {n: w.get(n, a) for n, a in state.weights.items()}
            m_new = {n: m.get(n, a) for n, a in m_all.items()}
            v_new = {n: v.get(n, a) for n, a in v_all.items()}
            return weights, m_new, v_new, self._with_count(t, layer, self._count(t, layer) + len(losses)), loss_value

        def _held_out(self, weights: dict[str, Any], val_idx: Any, val_keep: Any) -> float:
            p = self.model
            xb, ob = p.xs[val_idx], p.col_obs[val_idx]
            lr = jnp.asarray(0.0, p.ops.dtype)
            args = (weights, {}, None, None, None, xb, ob, jnp.ones((1, self.num_leaves), p.ops.dtype), lr)
            value = float(self._function("val", args)(*args))
            if val_keep is not None:
                args = (weights, {}, None, None, None, xb, ob, val_keep, lr)
                value += float(self._function("val_masked", args)(*args))
            return value

        def flows_with(self, weights: dict[str, Any]) -> Any:
            return self.model.flows_of(weights)

    _CLASSES = (VFGJaxProblem, VFGJaxEngine)
    return _CLASSES


_CLASSES: tuple[type, type] | None = None


def fit_jax_engine(spec: VFG, x: Any, *, num_epochs: int, batch_size: int, learning_rate: float, seed: int,
                   progress: bool, validation: float, patience: int | None, lr_decay: bool, callback: Any,
                   checkpoint: Any = None, checkpoint_every: int | None = None, resume: Any = None) -> Any:
    """:meth:`VFG.fit <latentfit.integrations.vfg.VFG.fit>` on JAX: the flavour's engine through the driver; a
    :class:`~latentfit.integrations.vfg_engine.VFGResult`."""
    problem_cls, engine_cls = _engine_classes()
    engine = engine_cls(problem_cls(spec, x), num_epochs=num_epochs, batch_size=batch_size,
                        learning_rate=learning_rate, lr_decay=lr_decay, validation=validation, patience=patience,
                        seed=seed, progress=progress, callback=callback)
    return engine.run(checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
