"""Backend shim: the only place where torch and JAX differ for the engines.

Engines touch arrays through an :class:`Ops` object: ``xp`` (the array namespace), random
draws from explicit keys, functional scatter, autodiff, and a loop primitive.  Torch and JAX
differ in RNG (global generator vs. PRNG keys), in-place updates (``index_copy`` vs. ``.at[]``)
and autodiff (``torch.autograd`` vs. ``jax.grad``); everything else is plain ``xp`` math.

The torch flavour keeps a *dummy* key (``None``) and draws from torch's global generator, which
the engine driver seeds and forks (``torch.random.fork_rng``) so that runs are reproducible and
the user's RNG state is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class Ops:
    """Interface of the backend shim (see :class:`TorchOps` and ``JaxOps``)."""

    name: str = "abstract"
    xp: Any = None
    #: True when engine steps can be traced and compiled (JAX).
    jittable: bool = False

    # --- creation -----------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.asarray(np.zeros(shape), dtype=dtype)

    def ones(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.asarray(np.ones(shape), dtype=dtype)

    def arange(self, n: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    # --- functional updates of owned buffers ------------------------------------------------------
    def scatter_owned(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[idx] = rows`` where the caller owns ``table`` and never reads the old value again.

        Semantics are functional (use the returned array); a backend may update in place. Under
        ``jit`` JAX's ``.at[].set`` in a loop carry is already in place, so the default is ``scatter``.
        Used by the per-unit statistic tables of the incremental EM engines (one row update per
        mini-batch must not copy an n-row table).
        """
        return self.scatter(table, idx, rows)


class TorchOps(Ops):
    """torch flavour: arrays on ``device`` in ``dtype`` (those of the model's data/params)."""

    name = "torch"
    jittable = False

    def __init__(self, device: Any = None, dtype: Any = None) -> None:
        import torch

        self.torch = torch
        self.xp = torch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()

    # --- creation -----------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        torch = self.torch
        if isinstance(x, torch.Tensor):
            if x.dtype == torch.bool or (dtype is None and not x.is_floating_point()):
                return x.to(device=self.device)
            return x.to(device=self.device, dtype=dtype or self.dtype)
        arr = np.asarray(x)
        if arr.dtype == bool:
            return torch.as_tensor(arr, device=self.device)
        if dtype is None and np.issubdtype(arr.dtype, np.integer):
            return torch.as_tensor(arr, device=self.device, dtype=torch.long)
        return torch.as_tensor(arr, device=self.device, dtype=dtype or self.dtype)

    def arange(self, n: int) -> Any:
        return self.torch.arange(n, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    # --- random -------------------------------------------------------------------------------
    def key(self, seed: int) -> Any:
        return None

    def split(self, key: Any, n: int = 2) -> list[Any]:
        return [None] * n

    def normal(self, key: Any, shape: tuple[int, ...]) -> Any:
        return self.torch.randn(shape, device=self.device, dtype=self.dtype)

    def uniform(self, key: Any, shape: tuple[int, ...]) -> Any:
        return self.torch.rand(shape, device=self.device, dtype=self.dtype)

    def randint(self, key: Any, shape: tuple[int, ...], high: int) -> Any:
        return self.torch.randint(high, shape, device=self.device)

    def permutation(self, key: Any, n: int) -> Any:
        return self.torch.randperm(n, device=self.device)

    def seed_context(self, seed: int):
        """Context manager: reproducible global RNG inside, user's RNG state restored after."""
        torch = self.torch
        devices = [self.device] if self.device.type == "cuda" else []
        ctx = torch.random.fork_rng(devices=devices)

        class _Seeded:
            def __enter__(self_inner):
                ctx.__enter__()
                torch.manual_seed(seed)
                return self_inner

            def __exit__(self_inner, *exc):
                return ctx.__exit__(*exc)

        return _Seeded()

    # --- functional updates ---------------------------------------------------------------------
    def scatter(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[idx] = rows`` without mutating ``table`` (rows along axis 0)."""
        return table.index_copy(0, idx, rows.to(table.dtype))

    def scatter_owned(self, table: Any, idx: Any, rows: Any) -> Any:
        """In-place ``table[idx] = rows`` (the caller owns ``table``); returns ``table``."""
        return table.index_copy_(0, idx, rows.to(table.dtype))

    def scatter_axis1(self, table: Any, idx: Any, rows: Any) -> Any:
        """``table[:, idx] = rows`` without mutating ``table``."""
        return table.index_copy(1, idx, rows.to(table.dtype))

    def take(self, x: Any, idx: Any, axis: int = 0) -> Any:
        return x.index_select(axis, idx)

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    # --- autodiff -----------------------------------------------------------------------------
    def value_and_grad(self, f: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, Any]]:
        torch = self.torch

        def vg(x):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                val = f(x)
                (g,) = torch.autograd.grad(val, x)
            return val.detach(), g.detach()

        return vg

    def grad(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        vg = self.value_and_grad(f)
        return lambda x: vg(x)[1]

    def hessian(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        torch = self.torch

        def h(x):
            with torch.enable_grad():
                return torch.autograd.functional.hessian(f, x.detach()).detach()

        return h

    def batched_jacobian(self, f: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Jacobian of ``f: [B, p] -> [B, m]`` where row b of the output depends on row b only.

        Returns ``[B, m, p]``; computed with p forward-over-reverse passes (p is small).
        """
        torch = self.torch

        def jac(x):
            x = x.detach()
            with torch.enable_grad():
                xr = x.clone().requires_grad_(True)
                out = f(xr)
                rows = []
                for j in range(out.shape[-1]):
                    (g,) = torch.autograd.grad(out[..., j].sum(), xr, retain_graph=True)
                    rows.append(g)
            return torch.stack(rows, dim=-2).detach()

        return jac

    # --- control flow -------------------------------------------------------------------------
    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        return true_fn(*operands) if bool(pred) else false_fn(*operands)

    def fori_loop(self, lower: int, upper: int, body: Callable[[int, Any], Any], init: Any) -> Any:
        val = init
        for i in range(lower, upper):
            val = body(i, val)
        return val

    def jit(self, f: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
        return f

    def scan_steps(self, step: Callable, state: Any, ks: range, key: Any = None) -> tuple[Any, list[Any]]:
        """Apply ``state, info = step(state, k)`` for k in ks; return final state and infos.

        ``key`` identifies the (static) step function, for backends that cache compilations.
        """
        infos = []
        for k in ks:
            state, info = step(state, self.torch.tensor(k, device=self.device))
            infos.append(info)
        return state, infos

    def cholesky(self, a: Any) -> Any:
        return self.torch.linalg.cholesky(a)

    def solve(self, a: Any, b: Any) -> Any:
        return self.torch.linalg.solve(a, b)

    def eigh(self, a: Any) -> tuple[Any, Any]:
        return self.torch.linalg.eigh(a)

    def tree_map(self, f: Callable, tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: self.tree_map(f, v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.tree_map(f, v) for v in tree)
        return f(tree) if tree is not None else None
