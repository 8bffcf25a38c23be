"""VFG training through the library's engine driver: :class:`VFGEngine` (torch; its JAX twin, which shares the step,
is in :mod:`latentfit.integrations.vfg_jax`) and :class:`VFGResult`.

One driver iteration is one *epoch* of Alg. 1 (with Alg. 2 masked steps on the fixed schedule of
:func:`~latentfit.integrations.vfg._masked_step`): the training rows in a random order, cut into mini-batches; on each
batch one Adam step on the negative ELBO ``−ELBO(x_B) = mean_{i∈B} [−log p(x_i | x̂_i) + β KL_i]`` with the rate
``η_t = s · η (0.1 + 0.45 (1 + cos(π t / (T − 1))))`` (cosine decay over the ``T`` steps of the run; ``s`` halves at
each rollback) and the gradient norm clipped.  The step is pure in its arguments: it reads the flows' weights and
Adam's moments from the state (:class:`VFGState`), copies the weights into a workspace module (scratch space,
overwritten at the start of every epoch, so the result depends on the state alone), trains it and returns new
tensors; its random stream is a copy of the state's ``torch.Generator`` (permutations, masks), on the data's device.

Layer-wise training (``VFG(layerwise=k)``): epoch ``e`` (0-based, ``state.epoch``) updates only the weights of layer
``l = (e // k) mod L + 1`` (the flows into the nodes of height ``l``): an Adam of its own per layer (moments and step
count), gradient clipping over that layer's gradient; the frozen layers' weights and moments pass through unchanged
(a block-coordinate scheme).  The schedule position is ``state.epoch``, so a resumed run continues mid-schedule; the
history's ``layer`` entry records the layer of each epoch.

Divergence guard (the step's own behaviour, not a driver stop): when an epoch's loss is NaN/inf, the epoch is run
again from its starting weights with a fresh Adam state and half the learning rate (the stream continues, so the
rerun sees other batches); ``info.rollbacks`` counts the reruns of the epoch, and after 5 reruns in a fit the step
raises ``RuntimeError``.  (The loop this replaces skipped the diverged epoch instead of rerunning it.)

Early stopping: with ``validation`` a held-out fraction of the rows is scored after each epoch (plain −ELBO, plus the
masked one under ``masking``); the state keeps the best weights, and with ``patience`` the run stops
(:meth:`VFGEngine.stopped`) once that many epochs in a row did not improve on the best; the result holds the best
weights.

The result, :class:`VFGResult`, is a :class:`~latentfit.inference.results.FitResult` (``params`` = the weights by
name, ``history`` = ``loss``, ``val_loss``, ``rollbacks`` per epoch, ``init_time``, ``compile_time``,
``time_per_iteration``, ``interrupted``, ``state``) with the VFG's uses on it (``impute``, ``encode``, ``decode``,
``log_prob``, ``sample``, ...); the post-fit computations of latent-variable models (likelihoods, standard errors,
residuals, ...) have no meaning for its network weights and are refused with a message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from latentfit.inference.driver import Engine
from latentfit.inference.ops import TorchOps as EngineOps
from latentfit.inference.results import FitResult
from latentfit.integrations.vfg import (
    VFG,
    TorchOps,
    VFGFit,
    _epoch_loss,
    _lr_at,
    _make_torch_flows,
    _masked_step,
    _validate_data,
    edge_layers,
    layer_at,
    negative_elbo,
    num_layers,
)

#: rollbacks allowed in one fit before the divergence guard gives up
MAX_ROLLBACKS = 5


class VFGProblem:
    """What a VFG fit trains on: the model ``spec`` (a :class:`~latentfit.integrations.vfg.VFG`) and the data ``x``
    (a float tensor ``[n, d]``, NaN = missing), standardised (NaN-aware column means and deviations) and zero-filled
    where missing, on ``x``'s device and in its dtype; ``ops`` the engine shim of that device and dtype."""

    def __init__(self, spec: VFG, x: Any) -> None:
        import torch

        x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
        if not x.is_floating_point():
            x = x.float()
        self.spec = spec
        self.graph = spec.graph
        self.ops = EngineOps(device=x.device, dtype=x.dtype)
        self.loc, self.scale = _validate_data(spec, x.detach().cpu().double().numpy())
        loc = torch.as_tensor(self.loc, dtype=x.dtype, device=x.device)
        scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        self.col_obs = (~torch.isnan(x)).to(x.dtype)
        self.xs = torch.nan_to_num((x - loc) / scale, nan=0.0).detach()
        self.array_ops = TorchOps()  # the graph logic's array interface
        self.num_units = int(x.shape[0])
        self.latent_dim = int(self.graph.root_dim)
        # the workspace the steps train from the state's weights (its initial weights are never read): built from a
        # throw-away generator, so torch's global RNG is untouched
        self.flows = self.build_flows(torch.Generator(device=x.device).manual_seed(0))
        #: the edge (index into ``graph.edges``) of every weight, by name (layer-wise training)
        self.param_edge = {f"{k}.{n}": k for k, f in enumerate(self.flows) for n, _ in f.named_parameters()}
        self.objective = _objective_module()(self)

    def build_flows(self, key: Any) -> Any:
        """The edge flows (a ``ModuleList``) with initial weights drawn from the generator ``key``."""
        s = self.spec
        return _make_torch_flows(self.graph, s.hidden, s.blocks, s.log_scale_clip, self.ops.device, self.ops.dtype,
                                 key, s.identity_init)

    def weight_shapes(self) -> dict[str, list[int]]:
        return {n: list(p.shape) for n, p in self.flows.named_parameters()}

    def training_data(self) -> np.ndarray:
        """The training rows in their units, NaN where missing ``[n, d]``."""
        xs, obs = self.xs.detach().cpu().double().numpy(), self.col_obs.detach().cpu().numpy()
        return np.where(obs > 0, xs * self.scale + self.loc, np.nan)

    def data_arrays(self) -> dict[str, Any]:
        """The standardised data and its observed-entry mask (what a checkpoint's data digest covers)."""
        return {"xs": self.xs, "col_obs": self.col_obs, "loc": self.loc, "scale": self.scale}

    def data_shapes(self) -> dict[str, Any]:
        """What a checkpoint records about the problem (compared on resume)."""
        return {"num_units": self.num_units, "latent_dim": self.latent_dim, "params": self.weight_shapes()}


def _objective_module() -> Any:
    from torch import nn

    class Objective(nn.Module):
        """The mean negative ELBO of a batch as a module of the flows (``functional_call`` evaluates it with any
        weights)."""

        def __init__(self, problem: VFGProblem) -> None:
            super().__init__()
            self.flows = problem.flows
            self.graph, self.spec, self.array_ops = problem.graph, problem.spec, TorchOps()

        def forward(self, x: Any, col_obs: Any, keep: Any = None) -> Any:
            s = self.spec
            return negative_elbo(self.graph, self.flows, self.array_ops, x, col_obs, keep, s.beta, s.likelihood,
                                 s.sigma)

    return Objective


class VFGState(NamedTuple):
    """What the next VFG epoch needs."""

    #: the flows' weights by parameter name (``flows.<edge>.layers.<block>...``): the estimates
    weights: dict[str, Any]
    #: Adam's first and second moments by parameter name, and its step count since its last (re)start (under
    #: ``layerwise`` a tuple: one count per layer, each layer's Adam being its own)
    adam_m: dict[str, Any]
    adam_v: dict[str, Any]
    adam_t: int | tuple[int, ...]
    #: the random stream (a ``torch.Generator`` on the data's device)
    key: Any
    #: mini-batch steps taken so far (position in the learning-rate and masking schedules)
    num_steps: int
    #: the learning-rate factor, halved at each rollback
    lr_scale: float
    #: rollbacks so far in the fit
    rollbacks: int
    #: training rows, and (with ``validation``) held-out rows and their Alg. 2 masks (None without)
    train_idx: Any
    val_idx: Any = None
    val_keep: Any = None
    #: with ``validation``: the best held-out loss so far, its weights, and epochs since it improved
    best_val: float | None = None
    best_weights: dict[str, Any] | None = None
    stale: int = 0
    #: epochs completed (under ``layerwise``, the position in the layer schedule: the next epoch trains layer
    #: ``layer_at(epoch, layerwise, L)``)
    epoch: int = 0


class VFGInfo(NamedTuple):
    """What a user may look at after each epoch (the history; ``callback(epoch, info)``)."""

    #: the epoch's mean −ELBO over its plain steps (over its masked steps when it had none)
    loss: float
    #: reruns of this epoch by the divergence guard
    rollbacks: int
    #: the held-out loss (plain −ELBO, plus the masked one under ``masking``); None without ``validation``
    val_loss: float | None = None
    #: under ``layerwise``, the layer (1 … L) this epoch trained; None otherwise
    layer: int | None = None


def random_keep(key: Any, n: int, n_leaves: int, drop: float, like: Any) -> Any:
    """Alg. 2's random observed subsets on the device of ``like``: each section dropped w.p. ``drop``, at least one
    kept and (with two or more sections) at least one dropped per row; ``[n, n_leaves]`` of 0/1 in ``like``'s dtype
    (the paper's rule with drop probability 1/2 by default; drawn from the generator ``key`` without a host sync)."""
    import torch

    dev = like.device
    if n_leaves == 1:
        return torch.ones((n, 1), dtype=like.dtype, device=dev)
    keep = torch.rand((n, n_leaves), generator=key, device=dev) >= drop
    cols = torch.arange(n_leaves, device=dev)
    pick = torch.randint(n_leaves, (n, 1), generator=key, device=dev) == cols
    keep = keep | (pick & ~keep.any(1, keepdim=True))  # nothing kept: keep one section at random
    pick = torch.randint(n_leaves, (n, 1), generator=key, device=dev) == cols
    keep = keep & ~(pick & keep.all(1, keepdim=True))  # everything kept: drop one at random
    return keep.to(like.dtype)


def validation_size(n: int, frac: float) -> int:
    """Held-out rows for ``validation=frac`` of ``n`` rows (checks the fraction)."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"validation must be a fraction in [0, 1), got {frac}")
    if frac == 0.0:
        return 0
    k = int(round(frac * n))
    if k < 1 or n - k < 2:
        raise ValueError(f"validation={frac} leaves {k} validation and {n - k} training rows: need >= 1 and >= 2")
    return k


def validation_split(key: Any, n: int, frac: float, device: Any = None) -> tuple[Any, Any]:
    """``(training rows, held-out rows or None)`` (sorted): the engine's split, the first draw of its stream."""
    import torch

    k = validation_size(n, frac)
    if k == 0:
        return torch.arange(n, device=device), None
    perm = torch.randperm(n, generator=key, device=device)
    return perm[k:].sort().values, perm[:k].sort().values


class VFGEngine(Engine):
    """Mini-batch Adam on a VFG's negative ELBO, one epoch per driver iteration (see the module docstring).

    ``VFGEngine(VFGProblem(spec, x), num_epochs=100, batch_size=128, learning_rate=1e-3, lr_decay=True,
    validation=0.0, patience=None, seed=0).run()`` -> :class:`VFGResult`; ``run`` takes the driver's
    ``checkpoint=``, ``checkpoint_every=`` (epochs), ``resume=`` and a key (a ``torch.Generator`` or an int seed).
    """

    name = "VFG"
    model_type = VFGProblem

    def __init__(self, problem: VFGProblem, *, num_epochs: int = 100, batch_size: int = 128,
                 learning_rate: float = 1e-3, lr_decay: bool = True, validation: float = 0.0,
                 patience: int | None = None, seed: int = 0, progress: bool = True, callback: Any = None) -> None:
        super().__init__(problem, seed=seed, progress=progress, callback=callback, num_draws=0, chunk_size=1)
        if num_epochs < 0 or batch_size < 1 or not learning_rate > 0:
            raise ValueError(f"need num_epochs >= 0, batch_size >= 1 and learning_rate > 0, got {num_epochs}, "
                             f"{batch_size}, {learning_rate}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 (epochs without improvement), got {patience}")
        self.num_epochs = int(num_epochs)
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.lr_decay = bool(lr_decay)
        self.validation = float(validation)
        self.patience = None if patience is None else int(patience)
        n_val = validation_size(problem.num_units, self.validation)
        self.num_train = problem.num_units - n_val
        self.batch = min(self.batch_size, self.num_train)
        self.total_steps = self.num_epochs * math.ceil(self.num_train / self.batch)  # T of the rate schedule
        spec = problem.spec  # the model's options, compared on resume with the engine's
        self.beta, self.masking, self.mask_drop, self.likelihood = spec.beta, spec.masking, spec.mask_drop, \
            spec.likelihood
        self.sigma, self.clip_grad, self.log_scale_clip = spec.sigma, spec.clip_grad, spec.log_scale_clip
        self.num_leaves = len(problem.graph.leaves)
        self.layerwise, self.num_layers = spec.layerwise, num_layers(problem.graph)
        layers = edge_layers(problem.graph)
        self._layer_names = {layer: [n for n, e in problem.param_edge.items() if layers[e] == layer]
                             for layer in range(1, self.num_layers + 1)}

    # ----- the engine contract ------------------------------------------------------------------------
    def phases(self) -> list[tuple[int, int, Any]]:
        return [(1, self.num_epochs, None)]

    def init(self, key: Any) -> VFGState:
        """The held-out split (with ``validation``), then the initial weights, then the held-out rows' masks, all
        from ``key`` (not advanced: the state holds a copy)."""
        p = self.model
        key = self.ops.own_key(key)
        train, val = validation_split(key, p.num_units, self.validation, p.ops.device)
        flows = p.build_flows(key)
        weights = {n: w.detach() for n, w in flows.named_parameters()}
        val_keep = None
        if val is not None and self.masking and self.num_leaves > 1:
            val_keep = random_keep(key, len(val), self.num_leaves, self.mask_drop, p.xs)
        zeros = {n: self._zeros_like(w) for n, w in weights.items()}
        validating = val is not None
        return VFGState(weights=weights, adam_m=zeros, adam_v=dict(zeros), adam_t=self._fresh_count(), key=key,
                        num_steps=0, lr_scale=1.0, rollbacks=0, train_idx=train, val_idx=val, val_keep=val_keep,
                        best_val=math.inf if validating else None,
                        best_weights=dict(weights) if validating else None, stale=0)

    def step(self, state: VFGState, k: Any, phase: Any) -> tuple[VFGState, VFGInfo]:
        """Epoch ``k``: the mini-batch steps (on one layer's flows under ``layerwise``), the divergence guard, the
        held-out score; pure."""
        key = self.ops.own_key(state.key)
        layer = self.layer_of(state.epoch)
        lr_scale, rollbacks = state.lr_scale, state.rollbacks
        m, v, t = state.adam_m, state.adam_v, state.adam_t
        while True:
            key, epoch_key = self._next_key(key)
            weights, m_new, v_new, t_new, loss = self._epoch(state, m, v, t, epoch_key, lr_scale)
            if math.isfinite(loss):
                break
            rollbacks += 1  # back to the epoch's starting weights, a fresh Adam state and half the rate
            if rollbacks > MAX_ROLLBACKS:
                raise RuntimeError(f"VFG training diverged (non-finite loss) {rollbacks} times despite halving the "
                                   f"learning rate each time (now {self.learning_rate * lr_scale:.2g}): lower "
                                   "learning_rate or log_scale_clip, or standardise the data")
            lr_scale *= 0.5
            m, v, t = self._fresh_adam(m, v, t, layer)
        num_steps = state.num_steps + math.ceil(self.num_train / self.batch)
        new = state._replace(weights=weights, adam_m=m_new, adam_v=v_new, adam_t=t_new, key=key,
                             num_steps=num_steps, lr_scale=lr_scale, rollbacks=rollbacks, epoch=state.epoch + 1)
        val_loss = None
        if state.val_idx is not None:
            val_loss = self._held_out(weights, state.val_idx, state.val_keep)
            if val_loss < state.best_val or not math.isfinite(state.best_val):
                new = new._replace(best_val=val_loss, best_weights=weights, stale=0)
            else:
                new = new._replace(stale=state.stale + 1)
        return new, VFGInfo(loss=loss, rollbacks=rollbacks - state.rollbacks, val_loss=val_loss,
                            layer=layer if self.layerwise else None)

    # ----- layer-wise training ------------------------------------------------------------------------
    def layer_of(self, epoch: int) -> int:
        """The layer (1 … L) epoch ``epoch`` (0-based) trains; 0 (every layer) without ``layerwise``."""
        return layer_at(epoch, self.layerwise, self.num_layers)

    def trained_names(self, layer: int, names: Any) -> list[str]:
        """The weights an epoch on ``layer`` updates: those of the layer's edges, or all ``names`` (layer 0)."""
        return list(names) if layer == 0 else self._layer_names[layer]

    def _fresh_count(self) -> int | tuple[int, ...]:
        return (0,) * self.num_layers if self.layerwise else 0

    @staticmethod
    def _count(t: Any, layer: int) -> int:
        """Adam's step count of ``layer``'s block (of all weights, layer 0)."""
        return int(t if layer == 0 else t[layer - 1])

    @staticmethod
    def _with_count(t: Any, layer: int, count: int) -> Any:
        return int(count) if layer == 0 else (*t[:layer - 1], int(count), *t[layer:])

    def _fresh_adam(self, m: dict[str, Any], v: dict[str, Any], t: Any, layer: int) -> tuple[Any, Any, Any]:
        """Adam restarted on the weights ``layer`` trains (all, layer 0): zero moments and count; the other layers'
        Adam states are kept."""
        m, v = dict(m), dict(v)
        for n in self.trained_names(layer, m):
            m[n], v[n] = self._zeros_like(m[n]), self._zeros_like(v[n])
        return m, v, self._with_count(t, layer, 0)

    def _epoch(self, state: VFGState, m: dict[str, Any], v: dict[str, Any], t: int, key: Any,
               lr_scale: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int, float]:
        """One pass over the training rows from ``state.weights`` and the Adam state ``(m, v, t)``:
        ``(weights, m, v, t, epoch loss)`` (new tensors; the inputs are not changed).  Under ``layerwise`` only the
        weights of the epoch's layer take Adam steps (their own moments and count); the others, and their moments,
        come back as they went in."""
        import torch

        p = self.model
        layer = self.layer_of(state.epoch)
        names = self.trained_names(layer, state.weights)
        # the workspace's parameters take the state's weights (it is the engine's scratch space: every epoch starts by
        # overwriting it, so the result depends on the state alone; once per epoch rather than a functional_call per
        # batch, which cost 6 % of the epoch)
        params = dict(p.flows.named_parameters())
        with torch.no_grad():
            for n, w in params.items():
                w.copy_(state.weights[n])
        trained = [params[n] for n in names]
        count = self._count(t, layer)
        opt = None
        if trained:
            opt = torch.optim.Adam(trained, lr=self.learning_rate)
            if count > 0:  # continue Adam from the state's moments (copies: Adam updates them in place)
                sd = opt.state_dict()
                sd["state"] = {i: {"step": torch.tensor(float(count)), "exp_avg": m[n].clone(),
                                   "exp_avg_sq": v[n].clone()} for i, n in enumerate(names)}
                opt.load_state_dict(sd)
        if layer:  # frozen layers: no weight gradients (the messages still flow through them)
            for n, w in params.items():
                w.requires_grad_(n in set(names))
        try:
            loss_value = self._batches(state, key, lr_scale, opt, trained)
        finally:
            for w in params.values():
                w.requires_grad_(True)
        weights = {n: w.detach().clone() for n, w in params.items()}
        if opt is None:
            return weights, m, v, t, loss_value
        st = opt.state_dict()["state"]
        m_new, v_new = dict(m), dict(v)
        for i, n in enumerate(names):  # Adam's own tensors: this optimiser is dropped
            m_new[n], v_new[n] = st[i]["exp_avg"], st[i]["exp_avg_sq"]
        return weights, m_new, v_new, self._with_count(t, layer, int(st[0]["step"])), loss_value

    def _batches(self, state: VFGState, key: Any, lr_scale: float, opt: Any, trained: list[Any]) -> float:
        """The epoch's mini-batch steps on the workspace (``opt`` over the ``trained`` parameters; None: no weights):
        the epoch loss."""
        import torch

        p = self.model
        perm = state.train_idx[torch.randperm(self.num_train, generator=key, device=p.ops.device)]
        acc = torch.zeros(2, dtype=torch.float64, device=p.ops.device)  # loss sums of [plain, masked] steps
        rows = [0, 0]
        step = state.num_steps
        for s in range(0, self.num_train, self.batch):
            idx = perm[s:s + self.batch]
            keep = None
            if _masked_step(step, self.masking) and self.num_leaves > 1:
                keep = random_keep(key, len(idx), self.num_leaves, self.mask_drop, p.xs)
            loss = p.objective(p.xs[idx], p.col_obs[idx], keep)
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_scale * _lr_at(self.learning_rate, step, self.total_steps, self.lr_decay)
                opt.zero_grad()
                loss.backward()
                if self.clip_grad:
                    torch.nn.utils.clip_grad_norm_(trained, self.clip_grad)
                opt.step()
            kind = int(keep is not None)
            acc[kind] += loss.detach().double() * len(idx)
            rows[kind] += len(idx)
            step += 1
        sums = acc.tolist()  # the epoch's one host sync
        loss_value = _epoch_loss(np.array([[sums[0], rows[0]], [sums[1], rows[1]]]))
        if not math.isfinite(sums[0] + sums[1]):
            loss_value = math.nan
        return loss_value

    @staticmethod
    def _zeros_like(w: Any) -> Any:
        return w.new_zeros(w.shape)

    @staticmethod
    def _next_key(key: Any) -> tuple[Any, Any]:
        """``(the stream after an epoch, the epoch's key)``: a torch generator is one sequential stream (the epoch
        advances it in place)."""
        return key, key

    def _held_out(self, weights: dict[str, Any], val_idx: Any, val_keep: Any) -> float:
        """The held-out −ELBO: plain, plus the masked one with ``val_keep``."""
        import torch
        from torch.func import functional_call

        p = self.model
        named = {f"flows.{n}": w for n, w in weights.items()}
        with torch.no_grad():
            x, o = p.xs[val_idx], p.col_obs[val_idx]
            v = float(functional_call(p.objective, named, (x, o, None)))
            if val_keep is not None:
                v += float(functional_call(p.objective, named, (x, o, val_keep)))
        return v

    def stopped(self, state: VFGState) -> bool:
        return self.patience is not None and state.val_idx is not None and state.stale >= self.patience

    def theta_of(self, state: VFGState) -> dict[str, Any]:
        return dict(state.weights)

    def history_theta(self, state: VFGState) -> None:
        return None  # network weights: not kept per epoch (the divergence guard checks the loss)

    def finalize(self, state: VFGState) -> VFGState:
        """With ``validation``: the best held-out weights."""
        if state.best_weights is not None:
            return state._replace(weights=state.best_weights)
        return state

    @property
    def result_model(self) -> VFG:
        return self.model.spec

    def flows_with(self, weights: dict[str, Any]) -> Any:
        """A copy of the flows holding ``weights`` (what the result's :class:`VFGFit` evaluates)."""
        import torch

        p = self.model
        flows = p.build_flows(torch.Generator(device=p.ops.device))  # its initial weights are replaced
        with torch.no_grad():
            for n, w in flows.named_parameters():
                w.copy_(weights[n])
        return flows


def _refuse(what: str) -> Any:
    def method(self: VFGResult, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{what} has no meaning for a VFG fit: its parameters are network weights, not a "
                        "statistical model's parameters with a likelihood, latent draws or residuals. Use "
                        "fit.log_prob(x) (the ELBO per row), fit.negative_elbo(x), fit.impute(x), fit.history['loss']")

    method.__name__ = what.rsplit(".", 1)[-1]
    method.__doc__ = f"Refused: {what} has no meaning for a VFG fit."
    return method


def _refused_property(what: str) -> property:
    return property(_refuse(what))


@dataclass(repr=False, eq=False)
class VFGResult(FitResult):
    """A VFG fit through the engine driver: a :class:`~latentfit.inference.results.FitResult` whose ``params`` are
    the flows' weights by name, ``history`` the per-epoch ``loss``, ``rollbacks`` (and ``val_loss``), ``model`` the
    :class:`~latentfit.integrations.vfg.VFG`; with the VFG's uses — ``impute``, ``encode``, ``decode``,
    ``reconstruct``, ``log_prob``, ``negative_elbo``, ``sample``, ``edge_flows`` — evaluated by the fitted flows
    (:attr:`fitted`, a :class:`~latentfit.integrations.vfg.VFGFit`).  The latent-variable post-fit computations
    (likelihoods, standard errors, summaries, residuals, plots, arviz) are refused with a ``TypeError``."""

    def __post_init__(self) -> None:
        self.history.setdefault("loss", np.zeros(0))

    @property
    def fitted(self) -> VFGFit:
        """The fitted flows as a :class:`~latentfit.integrations.vfg.VFGFit` (built once)."""
        if "fitted" not in self._cache:
            problem = self.engine.model
            fit = VFGFit(self.model, self.engine.flows_with(self.state.weights), problem.array_ops, problem.loc,
                         problem.scale, [float(v) for v in self.history["loss"]], self.elapsed)
            fit.device, fit.dtype = problem.ops.device, problem.ops.dtype
            fit.val_history = self.val_history
            fit.training_data = problem.training_data
            self._cache["fitted"] = fit
        return self._cache["fitted"]

    # ----- what a VFG fit offers ----------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """The flows' weights by name (``flows.<edge>.layers.<block>...``), as NumPy arrays."""
        return {n: self.engine.ops.to_numpy(w) for n, w in self.state.weights.items()}

    @property
    def graph(self) -> Any:
        return self.model.graph

    @property
    def flows(self) -> Any:
        return self.fitted.flows

    @property
    def loc(self) -> np.ndarray:
        return self.engine.model.loc

    @property
    def scale(self) -> np.ndarray:
        return self.engine.model.scale

    @property
    def device(self) -> Any:
        return self.engine.model.ops.device

    @property
    def dtype(self) -> Any:
        return self.engine.model.ops.dtype

    @property
    def val_history(self) -> list[float]:
        """Per epoch, the held-out loss (``history['val_loss']``; empty without ``validation``)."""
        return [float(v) for v in self.history.get("val_loss", [])]

    @property
    def seconds(self) -> float:
        """Wall time of the fit (``elapsed``)."""
        return self.elapsed

    @property
    def num_units(self) -> int:
        return self.engine.model.num_units

    def encode(self, x: Any, all_nodes: bool = False) -> Any:
        """See :meth:`VFGFit.encode <latentfit.integrations.vfg.VFGFit.encode>`."""
        return self.fitted.encode(x, all_nodes)

    def decode(self, h: Any) -> Any:
        """See :meth:`VFGFit.decode <latentfit.integrations.vfg.VFGFit.decode>`."""
        return self.fitted.decode(h)

    def reconstruct(self, x: Any) -> Any:
        return self.fitted.reconstruct(x)

    def impute(self, x: Any, mask: Any = None) -> Any:
        """See :meth:`VFGFit.impute <latentfit.integrations.vfg.VFGFit.impute>`."""
        return self.fitted.impute(x, mask)

    def sample(self, n: int, seed: int = 0, roots: str = "fitted") -> Any:
        """See :meth:`VFGFit.sample <latentfit.integrations.vfg.VFGFit.sample>`."""
        return self.fitted.sample(n, seed, roots)

    def negative_elbo(self, x: Any) -> float:
        return self.fitted.negative_elbo(x)

    def log_prob(self, x: Any, mask: Any = None) -> Any:
        """See :meth:`VFGFit.log_prob <latentfit.integrations.vfg.VFGFit.log_prob>`."""
        return self.fitted.log_prob(x, mask)

    def edge_flows(self) -> dict[tuple[int, int], Any]:
        return self.fitted.edge_flows()

    # ----- what it refuses ----------------------------------------------------------------------------------
    conditional_moments = _refuse("fit.conditional_moments")
    individual_estimates = _refuse("fit.individual_estimates")
    individual_parameters = _refuse("fit.individual_parameters")
    log_likelihood = _refuse("fit.log_likelihood")
    likelihood_table = _refuse("fit.likelihood_table")
    standard_errors = _refuse("fit.standard_errors")
    covariance = _refuse("fit.covariance")
    summary = _refuse("fit.summary")
    residuals = _refuse("fit.residuals")
    vpc = _refuse("fit.vpc")
    plot_convergence = _refuse("fit.plot_convergence")
    plot_observations_vs_predictions = _refuse("fit.plot_observations_vs_predictions")
    plot_residuals = _refuse("fit.plot_residuals")
    plot_individual_fits = _refuse("fit.plot_individual_fits")
    plot_vpc = _refuse("fit.plot_vpc")
    plot_gof = _refuse("fit.plot_gof")
    to_arviz = _refuse("fit.to_arviz")
    minus_two_ll = _refused_property("fit.minus_two_ll")
    aic = _refused_property("fit.aic")
    bic = _refused_property("fit.bic")
    num_params = _refused_property("fit.num_params")

    def __repr__(self) -> str:
        loss = self.history["loss"]
        last = f", loss={float(loss[-1]):.4g}" if len(loss) else ""
        stopped = ", interrupted" if self.interrupted else ""
        return f"VFGResult({self.num_iterations} epochs{stopped}{last})"


VFGEngine.result_type = VFGResult


def fit_torch(spec: VFG, x: Any, *, num_epochs: int, batch_size: int, learning_rate: float, seed: int,
              progress: bool, validation: float, patience: int | None, lr_decay: bool, callback: Any,
              checkpoint: Any = None, checkpoint_every: int | None = None, resume: Any = None) -> VFGResult:
    """:meth:`VFG.fit <latentfit.integrations.vfg.VFG.fit>` on torch: the engine through the driver."""
    engine = VFGEngine(VFGProblem(spec, x), num_epochs=num_epochs, batch_size=batch_size,
                       learning_rate=learning_rate, lr_decay=lr_decay, validation=validation, patience=patience,
                       seed=seed, progress=progress, callback=callback)
    return engine.run(checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)


__all__ = ["VFGEngine", "VFGInfo", "VFGProblem", "VFGResult", "VFGState", "fit_torch", "random_keep",
           "validation_split"]
