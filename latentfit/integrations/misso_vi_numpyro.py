"""MISSO-VI for NumPyro: ``from latentfit.numpyro import MISSOVI`` (algorithm: :mod:`latentfit.inference.misso_vi`).

The twin of :mod:`latentfit.integrations.misso_vi_pyro`. The model is an ordinary NumPyro model over all its data
with a data plate of full size (``with numpyro.plate("data", len(y)): numpyro.sample("obs", ..., obs=y)``).
Block ``i`` is evaluated by running model and guide over all data with the data-plate sites masked outside
``B_i`` and every other site scaled by ``1/n``; ``numpyro.infer.Trace_ELBO().loss`` of the weighted pair is then a
one-particle estimate of ``L_i(θ)`` and ``jax.grad`` of it (jit-compiled once; the block enters as a boolean mask
of fixed shape) is ``ĝ_i``; ``M`` particles average ``M`` such gradients on independent keys (the gradient of
``Trace_ELBO(num_particles=M)``, in one compiled loop whose length is not static). θ is the flat vector
(``ravel_pytree``) of the unconstrained params that ``numpyro.infer.SVI.init`` finds in model and guide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.primitives import Messenger

from latentfit.inference import misso_vi as _core
from latentfit.inference.misso_vi import MISSOVIResult
from latentfit.integrations.numpyro import as_rng_key


class BlockWeight(Messenger):
    """Restrict a model (or guide) to one block: data-plate sites get ``fn.mask(mask)`` (``mask`` of shape
    ``(N,)`` at the plate's dim), all other sample sites ``scale *= global_scale`` (``1/n``)."""

    def __init__(self, fn: Callable[..., Any] | None, plate: str, mask: Any, global_scale: float) -> None:
        super().__init__(fn)
        self.plate, self.block_mask, self.global_scale = plate, mask, global_scale

    def process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.plate:
                if self.block_mask is not None:
                    msg["fn"] = msg["fn"].mask(jnp.reshape(self.block_mask, (-1,) + (1,) * (-frame.dim - 1)))
                return
        msg["scale"] = self.global_scale if msg["scale"] is None else msg["scale"] * self.global_scale


def model_plates(model: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, tuple[int, int | None]]:
    """``{plate name: (size, subsample_size)}`` of the plates seen in one trace of ``model``."""
    trace = handlers.trace(handlers.seed(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
    plates: dict[str, tuple[int, int | None]] = {}
    for name, site in trace.items():
        if site["type"] == "plate":
            size, subsample_size = site["args"]
            plates[name] = (int(size), None if subsample_size is None else int(subsample_size))
    return plates


class NumPyroBlockOracle:
    """Per-block reparameterised gradients of ``L_i`` and the full negative ELBO for a NumPyro model / guide."""

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict,
                 plate: str, size: int, num_blocks: int, loss_particles: int, rng_key: Any) -> None:
        init_key, self.key = jax.random.split(rng_key)
        svi = SVI(model, guide, numpyro.optim.SGD(0.0), Trace_ELBO())
        state = svi.init(init_key, *args, **kwargs)
        unconstrained = svi.optim.get_params(state.optim_state)
        if not unconstrained:
            raise ValueError("MISSOVI found no parameters in the model or the guide (numpyro.param sites)")
        self.theta0, unravel = ravel_pytree(unconstrained)
        leaves = jax.tree_util.tree_flatten_with_path(unconstrained)[0]  # ravel_pytree's order
        self._slices: list[tuple[str, int, int]] = []
        self._shapes: dict[str, list[int]] = {}
        start = 0
        for path, leaf in leaves:
            name = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
            count = int(np.size(leaf))
            self._slices.append((name, start, start + count))
            self._shapes[name] = list(np.shape(leaf))
            start += count
        self.ops = _core.Backend("jax", jnp)
        constrain = svi.constrain_fn
        self.size, self.calls = size, 0
        global_scale = 1.0 / num_blocks

        def block_loss(theta: Any, key: Any, mask: Any) -> Any:
            params = constrain(unravel(theta))
            return Trace_ELBO().loss(key, params, BlockWeight(model, plate, mask, global_scale),
                                     BlockWeight(guide, plate, mask, global_scale), *args, **kwargs)

        def full_loss(theta: Any, key: Any) -> Any:
            return Trace_ELBO(num_particles=loss_particles).loss(key, constrain(unravel(theta)), model, guide,
                                                                 *args, **kwargs)

        one_grad = jax.grad(block_loss)

        def mean_grad(theta: Any, key: Any, mask: Any, num_samples: Any) -> Any:
            # M one-particle gradients on the keys fold_in(key, m), in one compiled loop (M is traced: no
            # recompilation when M_k grows)
            def body(m: Any, total: Any) -> Any:
                return total + one_grad(theta, jax.random.fold_in(key, m), mask)
            return jax.lax.fori_loop(0, num_samples, body, jnp.zeros_like(theta)) / num_samples

        self._grad = jax.jit(mean_grad)
        self._finite = jax.jit(lambda theta: jnp.all(jnp.isfinite(theta)))
        self._loss = jax.jit(full_loss)
        self.params = jax.jit(lambda theta: constrain(unravel(theta)))

    def _next_key(self) -> Any:
        self.calls += 1
        return jax.random.fold_in(self.key, self.calls)

    def grad(self, theta: Any, block: np.ndarray, num_samples: int) -> Any:
        mask = np.zeros(self.size, dtype=bool)
        mask[block] = True
        return self._grad(theta, self._next_key(), jnp.asarray(mask), num_samples)

    def loss(self, theta: Any) -> float:
        return float(self._loss(theta, self._next_key()))

    def finite(self, theta: Any) -> bool:
        return bool(self._finite(theta))

    def param_slices(self) -> list[tuple[str, int, int]]:
        return list(self._slices)

    def param_shapes(self) -> dict[str, list[int]]:
        return dict(self._shapes)

    def get_stream(self) -> tuple[Any, int]:
        """The random stream: the run's key and the number of draws taken from it (draw ``c`` uses
        ``fold_in(key, c)``)."""
        return self.key, int(self.calls)

    def set_stream(self, stream: Any) -> None:
        self.key, self.calls = stream[0], int(stream[1])


class MISSOVI(_core.MISSOVIBase):
    """MISSO (or MC-SAG, MC-Adam, BBB) for the variational parameters of a NumPyro guide.

    ``MISSOVI(model, guide, num_blocks=..., method="misso", learning_rate=γ, num_samples=M, num_epochs=...,
    seed=...).run(rng_key, *model_args, **model_kwargs)`` returns a
    :class:`~latentfit.inference.misso_vi.MISSOVIResult` (``params``: constrained params of model and guide;
    ``history["loss"]``: full negative ELBO at θ^0 and after each epoch, ``loss_particles`` draws). ``rng_key``
    drives the Monte-Carlo draws, ``seed`` the choice of blocks. Options as in the Pyro ``MISSOVI`` (no
    ``vectorize_particles``); the update rules are in :mod:`latentfit.inference.misso_vi`.

    Example: Bayesian linear regression, ``y ~ N(x w, 1)``, ``w ~ N(0, I)``, with ``AutoNormal``:

    >>> import jax, numpy as np, numpyro, numpyro.distributions as dist
    >>> from numpyro.infer.autoguide import AutoNormal
    >>> from latentfit.integrations.misso_vi_numpyro import MISSOVI
    >>> def model(x, y):
    ...     w = numpyro.sample("w", dist.Normal(np.zeros(2), 1.0).to_event(1))
    ...     with numpyro.plate("data", len(y)):
    ...         numpyro.sample("obs", dist.Normal(x @ w, 1.0), obs=y)
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(40, 2)); y = x @ np.array([1.0, -1.0]) + rng.normal(size=40)
    >>> fit = MISSOVI(model, AutoNormal(model), num_blocks=4, learning_rate=0.05, num_epochs=20, num_samples=4).run(
    ...     jax.random.PRNGKey(0), x, y)
    >>> exact = np.linalg.solve(x.T @ x + np.eye(2), x.T @ y)               # the posterior mean
    >>> bool(np.abs(np.asarray(fit.params["w_auto_loc"]) - exact).max() < 0.1)
    True
    """

    ppl_name = "NumPyro"

    def run(self, rng_key: Any, *args: Any, **kwargs: Any) -> MISSOVIResult:
        """Fit ``guide`` to ``model(*args, **kwargs)``; ``rng_key`` is a ``jax.random.PRNGKey`` (or an int).

        ``checkpoint=``, ``checkpoint_every=`` (epochs), ``keep=`` and ``resume=`` as in the Pyro ``MISSOVI``
        (taken out of the model's keyword arguments); a resumed run continues the checkpoint's random stream (its
        key and counter), whatever ``rng_key`` is given."""
        options = self._run_options(kwargs)
        key = as_rng_key(rng_key)
        plate, size = _core.find_data_plate(model_plates(self.model, args, kwargs), self.plate)
        blocks = self._blocks(size)
        oracle = NumPyroBlockOracle(self.model, self.guide, args, kwargs, plate, size, len(blocks),
                                    self.loss_particles, key)
        problem = _core.MISSOVIProblem(args, kwargs, size, oracle.param_shapes())
        engine = self._engine(oracle, oracle.theta0, blocks, problem, oracle.params, lambda t: np.array(t),
                              plate=plate)
        result = engine.run(**options)
        result.extra["blocks"] = blocks
        result.extra["plate"] = plate
        return result


__all__ = ["MISSOVI", "BlockWeight", "NumPyroBlockOracle"]
