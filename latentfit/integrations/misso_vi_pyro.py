"""MISSO-VI for Pyro: ``from latentfit.pyro import MISSOVI`` (algorithm: :mod:`latentfit.inference.misso_vi`).

The model is an ordinary Pyro model over all its data with a data plate of full size, as in Pyro's SVI
tutorials (``with pyro.plate("data", len(y)): pyro.sample("obs", ..., obs=y)``). Block ``i`` is evaluated by
running the model and the guide over all data with the data-plate sites masked outside ``B_i`` and every other
site (priors of global latents, their guide factors) scaled by ``1/n``: ``Trace_ELBO.differentiable_loss`` of
the weighted pair is then ``L_i(θ)``. When the model indexes its data by the data plate's indices
(``with pyro.plate("data", N) as idx: ... obs=y[idx]``, Pyro's mini-batch idiom), the block can instead be
*substituted* for the plate's indices (``block_eval="block"``; ``"auto"``, the default, checks on one block that
both rules give the same loss and then uses the substitution): model and guide then run on the block's data only,
cost ∝ |B_i| instead of N, with the plate's N/|B_i| rescaling undone so the loss is still ``L_i(θ)``.

Parameters are the unconstrained leaves of Pyro's param store (the guide's and any ``pyro.param`` of the model),
flattened into one vector; at the end they are left at the fitted values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from latentfit.inference import misso_vi as _core
from latentfit.inference.misso_vi import MISSOVIResult

BLOCK_EVALS = ("auto", "mask", "block")


class BlockWeight(Messenger):
    """Restrict a model (or guide) to one block: data-plate sites get ``mask`` (shape ``(N,)`` at the plate's
    dim), all other sample sites get ``scale *= global_scale`` (``1/n``).

    With ``indices`` instead of a mask, the block's indices are substituted for the data plate's subsample (the
    plate's ``_Subsample`` site), so the plate has size |B|; Pyro then scales its sites by N/|B|, which is undone
    here (``scale *= |B|/N``)."""

    def __init__(self, plate: str, mask: torch.Tensor | None, global_scale: float,
                 indices: torch.Tensor | None = None) -> None:
        super().__init__()
        self.plate, self.block_mask, self.global_scale = plate, mask, global_scale
        self.indices = indices

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        if isinstance(msg["fn"], _Subsample):
            if self.indices is not None and msg["name"] == self.plate:
                msg["value"] = self.indices
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.plate:
                if self.block_mask is not None:
                    m = self.block_mask.reshape((-1,) + (1,) * (-frame.dim - 1))
                    msg["mask"] = m if msg["mask"] is None else msg["mask"] & m
                if self.indices is not None:
                    msg["scale"] = msg["scale"] * (frame.size / frame.full_size)
                return
        msg["scale"] = msg["scale"] * self.global_scale


def model_plates(model: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[dict[str, tuple[int, int | None]], int]:
    """``{plate name: (full size, subsample size)}`` of the plates seen in one trace of ``model``, and its
    ``max_plate_nesting`` (for vectorised particles)."""
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    plates: dict[str, tuple[int, int | None]] = {}
    nesting = 0
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.vectorized:
                full = frame.full_size if frame.full_size is not None else frame.size
                plates[frame.name] = (int(full), int(frame.size))
                nesting = max(nesting, -int(frame.dim))
    return plates, nesting


class PyroBlockOracle:
    """Per-block reparameterised gradients of ``L_i`` and the full negative ELBO for a Pyro model / guide."""

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict,
                 plate: str, size: int, num_blocks: int, loss_particles: int, vectorize_particles: bool,
                 max_plate_nesting: int) -> None:
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.plate, self.size, self.n = plate, size, num_blocks
        self.vectorize, self.max_plate_nesting = vectorize_particles, max_plate_nesting
        self.loss_particles = loss_particles
        with poutine.trace(param_only=True) as capture:
            Trace_ELBO().differentiable_loss(model, guide, *args, **kwargs)
        sites = [(name, site["value"].unconstrained()) for name, site in capture.trace.nodes.items()]
        if not sites:
            raise ValueError("MISSOVI found no parameters in the model or the guide (pyro.param sites)")
        self.names = [name for name, _ in sites]
        self.leaves = [leaf for _, leaf in sites]
        self.dtype = self.leaves[0].dtype
        self.device = self.leaves[0].device
        self.shapes = [leaf.shape for leaf in self.leaves]
        self.numels = [leaf.numel() for leaf in self.leaves]
        self._elbos: dict[int, Trace_ELBO] = {}
        self._max_plate_nesting: int | None = None
        self.block_eval = "mask"
        self.ops = _core.Backend("torch", torch, self.device)
        self._stream: tuple[torch.Generator, ...] = ()

    # ---- the random stream
    def start_stream(self) -> None:
        """Make torch's RNG as it is now (seeded by ``run``, inside its ``fork_rng``) the oracle's own stream: a CPU
        ``torch.Generator`` (and one on the parameters' CUDA device), put into torch's RNG for each evaluation and
        read back after it (Pyro's samplers draw from torch's global generators), so the fit's draws depend on this
        stream alone and a checkpoint holds it."""
        cpu = torch.Generator()
        cpu.set_state(torch.get_rng_state())
        gens = [cpu]
        if self.device.type == "cuda":
            gen = torch.Generator(device=self.device)
            gen.set_state(torch.cuda.get_rng_state(self.device))
            gens.append(gen)
        self._stream = tuple(gens)

    @contextmanager
    def _drawing(self) -> Iterator[None]:
        if not self._stream:
            yield
            return
        torch.set_rng_state(self._stream[0].get_state())
        if len(self._stream) > 1:
            torch.cuda.set_rng_state(self._stream[1].get_state(), self.device)
        yield
        self._stream[0].set_state(torch.get_rng_state())
        if len(self._stream) > 1:
            self._stream[1].set_state(torch.cuda.get_rng_state(self.device))

    def get_stream(self) -> tuple[torch.Generator, ...]:
        out = []
        for g in self._stream:
            copy = torch.Generator(device=g.device)
            copy.set_state(g.get_state())
            out.append(copy)
        return tuple(out)

    def set_stream(self, stream: Any) -> None:
        gens = tuple(stream)
        if len(gens) != len(self._stream):
            raise ValueError(f"the checkpoint holds {len(gens)} random stream(s), this fit draws from "
                             f"{len(self._stream)} (CPU{' and CUDA' if len(self._stream) > 1 else ''})")
        for mine, saved in zip(self._stream, gens):
            mine.set_state(saved.get_state())

    def finite(self, theta: torch.Tensor) -> bool:
        return bool(torch.isfinite(theta).all())

    def param_slices(self) -> list[tuple[str, int, int]]:
        out, start = [], 0
        for name, size in zip(self.names, self.numels):
            out.append((name, start, start + size))
            start += size
        return out

    def param_shapes(self) -> dict[str, list[int]]:
        return {name: list(shape) for name, shape in zip(self.names, self.shapes)}

    # ---- flat vector <-> param store
    def flat(self) -> torch.Tensor:
        return torch.cat([leaf.detach().reshape(-1).to(self.dtype) for leaf in self.leaves]).clone()

    def set(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for leaf, piece in zip(self.leaves, torch.split(theta, self.numels)):
                leaf.copy_(piece.reshape(leaf.shape))

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        self.set(theta)
        return {name: pyro.param(name).detach().clone() for name in self.names}

    # ---- the oracle
    def _elbo(self, num_particles: int) -> Trace_ELBO:
        if num_particles not in self._elbos:
            kw: dict[str, Any] = {"num_particles": num_particles, "vectorize_particles": self.vectorize,
                                  "max_plate_nesting": self.max_plate_nesting}
            self._elbos[num_particles] = Trace_ELBO(**kw)
        return self._elbos[num_particles]

    def _weigh(self, block: np.ndarray, mode: str) -> BlockWeight:
        idx = torch.as_tensor(block, device=self.device)
        if mode == "block":
            return BlockWeight(self.plate, None, 1.0 / self.n, indices=idx)
        mask = torch.zeros(self.size, dtype=torch.bool, device=self.device)
        mask[idx] = True
        return BlockWeight(self.plate, mask, 1.0 / self.n)

    def block_loss(self, theta: torch.Tensor, block: np.ndarray, num_samples: int, mode: str) -> torch.Tensor:
        """``L_i(θ)`` (``num_samples`` draws) with the block masked (``"mask"``) or substituted (``"block"``)."""
        self.set(theta)
        weigh = self._weigh(block, mode)
        return self._elbo(num_samples).differentiable_loss(weigh(self.model), weigh(self.guide), *self.args,
                                                           **self.kwargs)

    def choose_block_eval(self, mode: str, block: np.ndarray, seed: int) -> str:
        """Set how blocks are evaluated (the torch RNG stream is left as it was).

        ``"auto"``: substitute the block when, on ``block`` at the current θ with the same random draws, the
        substituted loss equals the masked one (relative 1e3 × machine ε); otherwise (an error, e.g. a model that
        uses its full data tensors inside the plate, or a different value, e.g. local latents drawn per datum)
        mask."""
        if mode not in BLOCK_EVALS:
            raise ValueError(f"block_eval must be one of {BLOCK_EVALS}, got {mode!r}")
        if mode != "auto":
            if mode == "block":
                try:
                    with torch.no_grad(), torch.random.fork_rng():
                        self.block_loss(self.flat(), block, 1, "block")
                except Exception as err:
                    raise ValueError(
                        f"block_eval='block' needs a model that indexes its data by the plate {self.plate!r}'s "
                        f"indices (with pyro.plate({self.plate!r}, N) as idx: ... obs=y[idx]); substituting a "
                        f"block failed: {err}") from err
            self.block_eval = mode
            return mode
        theta = self.flat()
        values = []
        try:
            with torch.no_grad():
                for m in ("mask", "block"):
                    with torch.random.fork_rng():
                        torch.manual_seed(seed)
                        values.append(float(self.block_loss(theta, block, 1, m)))
        except Exception:
            self.block_eval = "mask"
            return "mask"
        tol = 1e3 * float(torch.finfo(self.dtype).eps) * max(1.0, abs(values[0]))
        self.block_eval = "block" if abs(values[0] - values[1]) <= tol else "mask"
        return self.block_eval

    def grad(self, theta: torch.Tensor, block: np.ndarray, num_samples: int) -> torch.Tensor:
        with self._drawing():
            loss = self.block_loss(theta, block, num_samples, self.block_eval)
            grads = torch.autograd.grad(loss, self.leaves, allow_unused=True)
        return torch.cat([(torch.zeros_like(leaf) if g is None else g).reshape(-1).to(self.dtype)
                          for g, leaf in zip(grads, self.leaves)])

    def loss(self, theta: torch.Tensor) -> float:
        self.set(theta)
        with torch.no_grad(), self._drawing():
            return float(self._elbo(self.loss_particles).loss(self.model, self.guide, *self.args, **self.kwargs))


class MISSOVI(_core.MISSOVIBase):
    """MISSO (or MC-SAG, MC-Adam, BBB) for the variational parameters of a Pyro guide.

    ``MISSOVI(model, guide, num_blocks=..., method="misso", learning_rate=γ, num_samples=M, num_epochs=...,
    seed=...).run(*model_args, **model_kwargs)`` returns a :class:`~latentfit.inference.misso_vi.MISSOVIResult`
    (``params``: constrained values of the param store's entries, also left in the store; ``history["loss"]``:
    full negative ELBO ``Σ_i L_i`` at θ^0 and after each epoch, ``loss_particles`` draws).

    Options: ``num_blocks`` / ``block_size`` / ``blocks`` (the partition of the data plate; default one datum per
    block), ``method`` in ``("misso", "mc-sag", "mc-adam", "bbb")``, ``learning_rate`` γ (= 1/L for MISSO),
    ``num_samples`` (int, or callable epoch ↦ M_k; default M_k = k), ``num_epochs``, ``seed``, ``plate`` (the data
    plate's name; default ``"data"`` or the model's only plate), ``blocks_per_iter``, ``loss_particles``,
    ``track_loss``, ``record`` (keep θ^k and the blocks visited in ``result.trace``), ``vectorize_particles``
    (passed to ``Trace_ELBO``), ``block_eval`` (``"auto"``, ``"mask"`` or ``"block"``: mask the data outside the
    block, or substitute the block's indices for the data plate's, see the module docstring; the rule used is in
    ``result.extra["block_eval"]``), ``callback`` (``callback(epoch, record)`` after each epoch; ``record``: its
    ``loss``, ``num_samples`` and the ``iteration`` reached; returning True or raising ``StopIteration`` stops the fit
    after that epoch, an ordinary result). The update rules are in
    :mod:`latentfit.inference.misso_vi`.

    Checkpoints, as for the other engines: ``run(*args, checkpoint="ckpt", checkpoint_every=K)`` writes the state
    every ``K`` epochs and at the end, ``run(*args, resume="ckpt")`` (or ``checkpoint="ckpt", resume=True``) continues
    it bit for bit, also with a larger ``num_epochs``; Ctrl-C returns the last good state with
    ``result.interrupted``, a NaN/inf parameter raises :class:`~latentfit.NonFiniteError`.

    Example: Bayesian linear regression, ``y ~ N(x w, 1)``, ``w ~ N(0, I)``, with ``AutoNormal``:

    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from latentfit.integrations.misso_vi_pyro import MISSOVI
    >>> def model(x, y):
    ...     w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("obs", dist.Normal(x @ w, 1.0), obs=y)
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 2, generator=g); y = x @ torch.tensor([1.0, -1.0]) + torch.randn(40, generator=g)
    >>> pyro.clear_param_store()
    >>> fit = MISSOVI(model, AutoNormal(model), num_blocks=4, learning_rate=0.05, num_epochs=20,
    ...               num_samples=4).run(x, y)
    >>> exact = torch.linalg.solve(x.T @ x + torch.eye(2), x.T @ y)        # the posterior mean
    >>> bool((fit.params["AutoNormal.locs.w"] - exact).abs().max() < 0.1)
    True
    """

    ppl_name = "Pyro"

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any] | None = None, *,
                 vectorize_particles: bool = False, block_eval: str = "auto", **options: Any) -> None:
        super().__init__(model, guide, **options)
        self.vectorize_particles = bool(vectorize_particles)
        if block_eval not in BLOCK_EVALS:
            raise ValueError(f"block_eval must be one of {BLOCK_EVALS}, got {block_eval!r}")
        self.block_eval = block_eval

    def run(self, *args: Any, **kwargs: Any) -> MISSOVIResult:
        """Fit ``guide`` to ``model(*args, **kwargs)``.

        ``run(*args, checkpoint=dir, checkpoint_every=K, keep=3, resume=dir | True, **kwargs)``: the state is written
        to ``dir`` every ``K`` epochs (default 1) and at the end, and a run continues from it bit for bit
        (:meth:`~latentfit.inference.misso_vi.MISSOVIEngine.run`); these four are taken out of the model's keyword
        arguments.  The fit draws from a stream of its own, seeded by ``seed``: torch's global RNG is neither read
        nor changed."""
        options = self._run_options(kwargs)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            plates, nesting = model_plates(self.model, args, kwargs)
            plate, size = _core.find_data_plate(plates, self.plate)
            blocks = self._blocks(size)
            oracle = PyroBlockOracle(self.model, self.guide, args, kwargs, plate, size, len(blocks),
                                     self.loss_particles, self.vectorize_particles, nesting)
            block_eval = oracle.choose_block_eval(self.block_eval, blocks[0], self.seed)
            oracle.start_stream()
            problem = _core.MISSOVIProblem(args, kwargs, size, oracle.param_shapes())
            engine = self._engine(oracle, oracle.flat(), blocks, problem, oracle.params,
                                  lambda t: t.detach().cpu().numpy().copy(), plate=plate, block_eval=block_eval,
                                  vectorize_particles=self.vectorize_particles)
            result = engine.run(**options)
        result.extra["blocks"] = blocks
        result.extra["plate"] = plate
        result.extra["block_eval"] = block_eval
        return result


__all__ = ["MISSOVI", "BlockWeight", "PyroBlockOracle"]
