"""Pyro's side of the traced adapter: how to run, vectorise and differentiate a Pyro model.

:class:`PyroLatentModel` is :class:`~latentfit.integrations.traced.TracedLatentModel` with the Pyro
tracing interface :class:`PyroPPL`.  The model runs under a light messenger that substitutes θ and the
latents and records every site; chains are vectorised with ``torch.func.vmap`` (one evaluation per
chain when a model cannot be vmapped, and no extra dim at all for one chain), so a model is evaluated
exactly as written: ``phi[:, 0]``, ``x[:, None]``, ``.to_event(1)`` all work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
import weakref
from operator import attrgetter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyro
import pyro.distributions as pdist
import torch
from pyro.distributions.util import scale_and_mask
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import AffineTransform, ComposeTransform, ExpTransform

from latentfit.inference.ops import TorchOps, reverse_jvp
from latentfit.integrations.batched_program import batched_program
from latentfit.integrations.enumerated import EnumeratedLatentModel
from latentfit.integrations.traced import PPL, Frame, Site, TracedLatentModel

#: how ``pyro.module`` names its weights (``"net$$$0.weight"``), and the code object of ``pyro.module``
_MODULE_DIVIDER = "$$$"
_PYRO_MODULE_CODE = pyro.primitives.module.__code__
#: the code object of ``PyroModule.__getattr__``, whose ``pyro.param`` statement for a plain ``nn.Parameter``
#: attribute (``PyroModule[nn.Linear]``'s ``weight``) discards the value the statement returns
_PYRO_GETATTR_CODE = PyroModule.__getattr__.__code__
#: model function -> ``{param name: (weak reference to the PyroModule, attribute)}`` of the plain ``nn.Parameter``
#: attributes of PyroModules its runs read (found on the first run, put in place before each later run)
_MODULE_ATTRS: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, str]]] = weakref.WeakKeyDictionary()
#: model function -> ``{param name: (weak reference to its leaf tensor, constraint)}`` of the params a PyroModule
#: keeps to itself under ``pyro.settings.set(module_local_params=True)`` (not in the param store: its PyroParams'
#: unconstrained tensors, its plain ``nn.Parameter`` attributes and its plain ``nn.Module`` children's weights), found
#: on the first run: where :func:`write_params_to_store` puts their estimates
_LOCAL_LEAVES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _module_attrs(fn: Any) -> dict[str, tuple[Any, str]]:
    """The PyroModule ``nn.Parameter`` attributes known to be read by ``fn`` (a new, unkept table if ``fn`` cannot be
    weakly referenced)."""
    return _table(_MODULE_ATTRS, fn)


def _local_leaves(fn: Any) -> dict[str, Any]:
    """The module-local params of ``fn`` known so far (:data:`_LOCAL_LEAVES`; a new, unkept table if ``fn`` cannot be
    weakly referenced)."""
    return _table(_LOCAL_LEAVES, fn)


def _table(tables: weakref.WeakKeyDictionary, fn: Any) -> dict:
    try:
        return tables.setdefault(fn, {})
    except TypeError:
        return {}


class _Runner(Messenger):
    """Substitute θ and the latents, record the param and sample sites (a light ``trace``).

    θ reaches the model through the value of each ``pyro.param`` statement, and, where a module computes with its
    own tensors instead, through the module: a ``pyro.module`` network's weights and a PyroModule's plain
    ``nn.Parameter`` attributes (``PyroModule[nn.Linear]``'s ``weight``, at any depth) are replaced by θ's values
    for the run and restored on exit."""

    def __init__(self, params: dict[str, Any] | None, values: dict[str, Any] | None,
                 module_attrs: dict[str, tuple[Any, str]] | None = None,
                 local_leaves: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.params = params or {}
        self.values = values or {}
        self.module_attrs = {} if module_attrs is None else module_attrs
        self.local_leaves = local_leaves
        self.sites: dict[str, Site] = {}

    def _pyro_param(self, msg: Any) -> None:
        name = msg["name"]
        args = msg["args"]
        if len(args) > 1 and isinstance(args[1], torch.nn.Parameter) and name not in self.module_attrs \
                and _MODULE_DIVIDER not in name:  # maybe PyroModule's statement for one (a stack walk: once per name)
            self._find_module_attr(name, args[1])
        value = self.params.get(name)
        if value is not None:
            msg["value"] = value
            if _MODULE_DIVIDER in name:
                self._swap_module_param(value)
            elif name in self.module_attrs:
                self._swap_attr(name, value)

    def _find_module_attr(self, name: str, parameter: Any) -> None:
        """Keep which PyroModule attribute ``pyro.param(name, parameter)`` stands for, when it is the statement
        ``PyroModule.__getattr__`` makes for a plain ``nn.Parameter`` (it computes with that tensor, not with the
        statement's value)."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code is not _PYRO_GETATTR_CODE:
            frame = frame.f_back
        if frame is None:
            return
        owner, attr = frame.f_locals.get("self"), frame.f_locals.get("name")
        if (isinstance(owner, PyroModule) and isinstance(attr, str) and owner._parameters.get(attr) is parameter
                and owner._pyro_get_fullname(attr) == name):
            self.module_attrs[name] = (weakref.ref(owner), attr)

    def _swap_attr(self, name: str, value: Any) -> None:
        """Put θ's ``value`` in place of the PyroModule attribute known as param ``name`` (restored on exit)."""
        owner, attr = self.module_attrs[name]
        owner = owner()
        if owner is None or attr not in owner._parameters:
            return
        if any(o is owner and a == attr for o, a, _ in self._swapped):
            return
        self._swapped.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = value

    def _swap_module_param(self, value: Any) -> None:
        """``pyro.module(name, net)`` registers ``net``'s weights as params but (by default) keeps computing with its
        own tensors: put θ's value into the module for this run (what ``update_module_params=True`` does), and
        restore the module's own parameter on exit.  Likewise the statements a PyroModule makes for a plain
        ``nn.Module`` child's weights under ``module_local_params=True`` (from ``PyroModule.__getattr__``, not
        ``pyro.module``; the child computes with its own tensors as well)."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code is not _PYRO_MODULE_CODE and not (
                frame.f_code is _PYRO_GETATTR_CODE and "param_name" in frame.f_locals):
            frame = frame.f_back
        if frame is None:
            return
        local = frame.f_locals
        net = local["nn_module"] if frame.f_code is _PYRO_MODULE_CODE else local["result"]
        dotted = local["param_name"]
        owner_path, _, attr = dotted.rpartition(".")
        owner = attrgetter(owner_path)(net) if owner_path else net
        self._swapped.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = value

    def __enter__(self) -> _Runner:
        self._swapped: list[tuple[Any, str, Any]] = []
        # a PyroModule reads its nn.Parameter before its pyro.param statement: θ must be in place beforehand
        for name in self.module_attrs.keys() & self.params.keys():
            if self.params[name] is not None:
                self._swap_attr(name, self.params[name])
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        for owner, attr, original in reversed(self._swapped):
            owner._parameters[attr] = original
        self._swapped = []
        return super().__exit__(*exc)

    def _pyro_sample(self, msg: Any) -> None:
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_param(self, msg: Any) -> None:
        name = msg["name"]
        store = pyro.get_param_store()
        constraint = store._constraints.get(name, msg["kwargs"].get("constraint", constraints.real))
        if self.local_leaves is not None and name not in self.local_leaves and name not in store:
            self._find_local_leaf(name, msg, constraint)
        self.sites[name] = Site(name, "param", msg["value"], constraint=constraint,
                                module_weight=name in self.module_attrs)

    def _find_local_leaf(self, name: str, msg: Any, constraint: Any) -> None:
        """A param a PyroModule keeps to itself (``module_local_params=True``: its statement is not ``pyro.param``'s
        and puts nothing in the store): the tensor it is stored in, the statement's ``nn.Parameter`` argument (a plain
        ``nn.Parameter`` attribute, a plain child's weight) or the unconstrained tensor of a PyroParam's value."""
        args = msg["args"]
        leaf = args[1] if len(args) > 1 and isinstance(args[1], torch.nn.Parameter) else None
        if leaf is None:  # the statement's own value (a first run substitutes none): a PyroParam's, constrained
            ref = getattr(msg["value"], "unconstrained", None)
            leaf = ref() if callable(ref) else None
        if isinstance(leaf, torch.Tensor) and leaf.is_leaf:
            self.local_leaves[name] = (weakref.ref(leaf), constraint)

    def _pyro_post_sample(self, msg: Any) -> None:
        # pyro.deterministic sites (and obs_mask's interleaved value) are Delta(...).mask(False): no density, and
        # NumPyro does not record them as sample sites either
        if site_is_subsample(msg) or msg["infer"].get("_do_not_trace") or msg["infer"].get("_deterministic"):
            return
        fn = msg["fn"]
        mask = msg["mask"]
        mask = None if mask is None or mask is True else torch.as_tensor(mask)
        frames = tuple(Frame(f.name, f.dim, f.size) for f in msg["cond_indep_stack"] if f.vectorized)
        self.sites[msg["name"]] = Site(msg["name"], "sample", msg["value"], fn, mask, frames,
                                       bool(msg["is_observed"]))


class _UnitSubsample(Messenger):
    """Evaluate only ``units`` of a plate of ``size`` units: the plate's subsample indices become ``units`` (so it
    holds ``len(units)`` entries, as ``pyro.plate(..., subsample=units)``) and every observed value inside it is
    cut to those rows.  Entered inside the messenger that conditions the latents: their values are already the
    batch's."""

    def __init__(self, plate: str, size: int, units: Any) -> None:
        super().__init__()
        self.plate, self.size, self.units = plate, int(size), units

    def _pyro_sample(self, msg: Any) -> None:
        if site_is_subsample(msg):
            if msg["name"] == self.plate:
                msg["value"] = self.units
            return
        if not msg["is_observed"] or msg["value"] is None:
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
        value = msg["value"]
        if frame is None or not isinstance(value, torch.Tensor):
            return
        axis = value.dim() - len(msg["fn"].event_shape) + frame.dim
        if axis >= 0 and value.shape[axis] == self.size:
            msg["value"] = value.index_select(axis, self.units)


class _ChainMap:
    """``f(theta, x)`` over the leading axis of ``x``: ``torch.func.vmap``, else one call per chain."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.use_vmap = True

    def __call__(self, theta: dict[str, Any], xs: Any, *rest: Any) -> Any:
        """``rest``: further arguments passed unmapped to every chain (a mini-batch's unit indices)."""
        if isinstance(xs, tuple):  # several mapped arguments (a draw and its key): one call per entry
            return _stack([self.f(theta, x, *rest) for x in zip(*xs)])
        # (under torch.jit.trace the chains are recorded one by one: vmap cannot be traced)
        if isinstance(xs, torch.Tensor) and xs.shape[0] > 1 and self.use_vmap and not torch.jit.is_tracing():
            try:
                return torch.func.vmap(self.f, in_dims=(None, 0) + (None,) * len(rest),
                                       randomness="different")(theta, xs, *rest)
            except Exception as exc:  # a model vmap cannot run (data-dependent Python control flow, .item(), ...)
                self.use_vmap = False
                self.vmap_error = exc  # kept for inspection: chains are now evaluated one by one
        outs = [self.f(theta, x, *rest) for x in xs]
        return _stack(outs)


class _TracedChainMap(_ChainMap):
    """:class:`_ChainMap` recorded by ``torch.jit.trace`` once per input signature (shapes, dtypes).

    Pyro's messengers and the model's Python run once per signature; afterwards a density evaluation
    is the recorded tensor program (autograd included), several times faster for small models.  A model
    whose recorded program differs from its eager run at a second input (data-dependent Python control
    flow) is evaluated eagerly from then on.
    """

    max_graphs = 8
    #: chains recorded one by one (vmap cannot be traced): beyond this many, vmap eagerly instead
    max_traced_chains = 16
    #: inside a functorch transform (``torch.func.jacfwd`` of the density in θ: per-unit scores), several chains run
    #: as ``vmap`` over the one-chain recording instead of the recording of every chain: the transform's per-op cost
    #: is paid once, not once per chain (the logistic mixed model of benchmarks/mcmcsgd_logistic.py, 10 chains x 400
    #: units, 6 directions: 11.8 -> 5.4 ms per Jacobian, the same values bit for bit); outside a transform the
    #: per-chain recording stays (``vmap`` over the recording was slower there: 2.2 against 1.5 ms)
    vmap_in_transforms = True

    #: one chain recorded and its program rewritten to run every chain at once (:mod:`.batched_program`: one replay
    #: instead of one per chain); the per-chain recording when the program is not batch-safe
    batch_chains = True
    #: ... while its largest tensor, over all chains, has at most this many elements: beyond, the arrays of all chains
    #: leave the CPU's caches and one replay per chain is faster (the README model of benchmarks/backends.py, 5
    #: chains x 10 rows per unit, CPU per evaluation of 5 chains: N = 500 (75 000 elements) 0.9-1.0 against 1.2-1.6
    #: ms, N = 5000 (750 000) 18-20 against 9-12 ms; the padded model at N = 5000 (250 000) about even; MISSO's 10
    #: chains on the logistic model of benchmarks/mcmcsgd_logistic.py, N = 400 x 15 rows (180 000): a whole default
    #: fit 9.4, 8.1 -> 5.9, 5.4 s CPU, alternated, estimates within 2e-13)
    max_batched_elements = 2 ** 18

    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.graphs: dict[Any, Any] = {}
        self.programs: dict[Any, Any] = {}

    def __call__(self, theta: dict[str, Any], xs: Any, *rest: Any) -> Any:
        if not isinstance(xs, torch.Tensor):
            return super().__call__(theta, xs, *rest)
        names = tuple(theta)
        vals = [torch.as_tensor(theta[n]) for n in names]
        if self.batch_chains and not _in_functorch_transform() and not torch.jit.is_tracing():
            program = self._program(names, vals, xs, rest)
            if program:
                return program(xs, *rest, *vals)
        if xs.shape[0] > self.max_traced_chains:
            return super().__call__(theta, xs, *rest)
        if xs.shape[0] > 1 and self.vmap_in_transforms and _in_functorch_transform():
            graph = self._graph(names, vals, xs[:1], rest)
            if graph:
                try:
                    return torch.func.vmap(lambda x: _first(graph(x[None], *rest, *vals)))(xs)
                except Exception:  # an op without a batching rule: the per-chain recording from now on
                    self.vmap_in_transforms = False
        graph = self._graph(names, vals, xs, rest)
        if not graph:
            return super().__call__(theta, xs, *rest)
        return graph(xs, *rest, *vals)

    def _graph(self, names: tuple[str, ...], vals: list[Any], xs: Any, rest: tuple) -> Any:
        """The recording for this input signature (recorded on first use; False: not recordable, evaluate eagerly)."""
        return self._for_signature(self.graphs, self._record, names, vals, xs, rest)

    def _program(self, names: tuple[str, ...], vals: list[Any], xs: Any, rest: tuple) -> Any:
        """The batched program for this input signature (built on first use; False: not batch-safe)."""
        return self._for_signature(self.programs, self._record_batched, names, vals, xs, rest)

    def _for_signature(self, table: dict, build: Any, names: tuple[str, ...], vals: list[Any], xs: Any,
                       rest: tuple) -> Any:
        """``table``'s entry for the input signature (names, shapes, dtypes, device), built by ``build`` on first use
        (at most ``max_graphs`` entries; None beyond)."""
        key = (names, tuple((tuple(v.shape), v.dtype) for v in vals), tuple(xs.shape), xs.dtype, xs.device,
               tuple((tuple(r.shape), r.dtype) for r in rest))
        entry = table.get(key)
        if entry is None and len(table) < self.max_graphs:
            entry = table[key] = build(names, vals, xs, rest)
        return entry

    def _record_batched(self, names: tuple[str, ...], vals: list[Any], xs: Any, rest: tuple) -> Any:
        """Record one chain, rewrite its program for ``xs.shape[0]`` chains, and check it against the eager per-chain
        evaluation at two inputs (as :meth:`_record`)."""
        f, k = self.f, len(rest)

        def one(x: Any, *v: Any) -> Any:
            return f(dict(zip(names, v[k:])), x, *v[:k])

        def eager(x: Any, *v: Any) -> Any:
            return _stack([one(c, *v) for c in x])

        args = (xs.detach(), *rest, *[v.detach() for v in vals])
        moved = (args[0] * 0.9 + 0.05, *[r.flip(0) for r in rest],
                 *[v * 1.05 if v.is_floating_point() else v for v in args[1 + k:]])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                recorded = torch.jit.trace(one, (args[0][0], *args[1:]), check_trace=False, strict=False)
            recorded = _pruned(recorded)
            if xs.shape[0] * _largest(recorded) > self.max_batched_elements:
                return False
            program = batched_program(recorded, xs.shape[0])
            if program is None:
                return False
            with torch.no_grad():
                for a in (args, moved):
                    if not _same(program(*a), eager(*a)):
                        return False
        except Exception:  # anything the tracer or the rewrite cannot handle: the per-chain recording
            return False
        return program

    def _record(self, names: tuple[str, ...], vals: list[Any], xs: Any, rest: tuple = ()) -> Any:
        eager = super().__call__
        k = len(rest)

        def flat(x: Any, *v: Any) -> Any:
            return eager(dict(zip(names, v[k:])), x, *v[:k])

        args = (xs.detach(), *rest, *[v.detach() for v in vals])
        moved = (args[0] * 0.9 + 0.05, *[r.flip(0) for r in rest],  # another batch: units must not be constants
                 *[v * 1.05 if v.is_floating_point() else v for v in args[1 + k:]])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _pruned(torch.jit.trace(flat, args, check_trace=False, strict=False))
            with torch.no_grad():
                for a in (args, moved):
                    if not _same(graph(*a), flat(*a)):
                        return False
        except Exception:  # anything the tracer cannot record: stay eager
            return False
        return graph


#: ops that only re-view a tensor: when the recorded output has the input's sizes and strides they change nothing
_VIEW_OPS = frozenset({"aten::reshape", "aten::view", "aten::broadcast_to", "aten::expand", "aten::expand_as",
                       "aten::movedim", "aten::slice", "aten::contiguous"})


def _pruned(fn: Any) -> Any:
    """A recorded function without its no-op views: broadcasts, reshapes, full slices and moves of a dim onto itself
    whose recorded output has the sizes and strides of their input (Pyro's distributions and the adapter's per-unit
    reduction record dozens per chain: ~15% of a small model's evaluation).  The recording is specialised to its
    input shapes, so those views are no-ops at every call; the values are the same.  A gather ``x[idx]`` by one
    recorded vector of non-negative indices becomes ``x.index_select(0, idx)`` (the same rows copied; about 2x faster
    at 50 000 rows: the README model's ``log_psi[subject]``).  The recording as it is when torch's graph API refuses."""
    try:
        graph = fn.graph.copy()
        for node in list(graph.nodes()):
            if node.kind() == "aten::index":
                _index_select(graph, node)
            if node.kind() not in _VIEW_OPS:
                continue
            src, out = node.inputsAt(0), node.output()
            ti, to = src.type(), out.type()
            if not (isinstance(ti, torch._C.TensorType) and isinstance(to, torch._C.TensorType)):
                continue
            same = ti.sizes() == to.sizes() and ti.strides() == to.strides() and ti.scalarType() == to.scalarType()
            if ti.sizes() is None or not same:
                continue
            out.replaceAllUsesWith(src)
        torch._C._jit_pass_dce(graph)
        return torch._C._create_function_from_graph(f"{fn.name}_pruned", graph)
    except Exception:  # a torch without this graph API: the recording as it is
        return fn


def _largest(fn: Any) -> int:
    """The most elements of a tensor of a recorded program (from its recorded shapes)."""
    most = 0
    for node in fn.graph.nodes():
        for v in node.outputs():
            t = v.type()
            if isinstance(t, torch._C.TensorType) and t.sizes() is not None:
                most = max(most, math.prod(t.sizes()))
    return most


def _index_select(graph: Any, node: Any) -> None:
    """``x[idx]`` (``aten::index``) by a single recorded 1-d integer tensor of non-negative indices, rewritten as
    ``index_select(x, 0, idx)``."""
    items = node.inputsAt(1).node()
    if items.kind() != "prim::ListConstruct" or items.inputsSize() != 1:
        return
    idx = items.inputsAt(0)
    if idx.node().kind() != "prim::Constant" or not isinstance(idx.type(), torch._C.TensorType):
        return
    value = idx.toIValue()
    if (not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype not in (torch.int64, torch.int32)
            or (value.numel() and int(value.min()) < 0)):
        return
    with graph.insert_point_guard(node):
        zero = graph.insertConstant(0)
    new = graph.create("aten::index_select", [node.inputsAt(0), zero, idx])
    new.output().setType(node.output().type())
    new.insertBefore(node)
    node.output().replaceAllUsesWith(new.output())


_NORMALS = (torch.distributions.Normal, pdist.Normal)
_INDEPENDENT = (torch.distributions.Independent, pdist.Independent)
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # the constant of torch's Normal.log_prob, written as it writes it


def _compact(x: Any) -> Any:
    """``x`` without its broadcast dims: every dim of stride 0 (an ``expand``) cut to size 1, the same values once."""
    try:
        strides = x.stride()
    except Exception:  # a tensor without strides (e.g. batched under vmap): as it is
        return x
    for dim, (size, stride) in enumerate(zip(x.shape, strides)):
        if stride == 0 and size > 1:
            x = x.narrow(dim, 0, 1)
    return x


def _log_prob(fn: Any, value: Any) -> Any:
    """``fn.log_prob(value)``, with a Normal's (alone, ``.to_event`` or ``.mask``-ed) computed on its compact scale.

    torch's Normal holds its loc and scale expanded to the batch shape, so ``scale.log()`` and ``scale**2`` of a
    scalar residual sd run over every observation (the log alone was a third of a plain model's evaluation at 50 000
    rows).  Here they run on the scale's distinct values and broadcast; every element is computed by the same
    operations as ``Normal.log_prob``, so the values are the same.  Validation is off (the adapter runs models with
    ``pyro.validation_enabled(False)``).
    """
    kind = type(fn)
    if kind in _NORMALS:
        scale = _compact(fn.scale)
        var = scale ** 2
        lp = -((value - fn.loc) ** 2) / (2 * var) - scale.log() - _LOG_SQRT_2PI
        # numpy's rule on the two int tuples: torch.broadcast_shapes goes through torch._refs, whose first use
        # imports sympy (~0.4 s of every fresh process's first Pyro fit)
        shape = np.broadcast_shapes(tuple(value.shape), tuple(fn.batch_shape))
        return lp if tuple(lp.shape) == tuple(shape) else lp.expand(shape)
    if kind in _INDEPENDENT:
        lp, k = _log_prob(fn.base_dist, value), fn.reinterpreted_batch_ndims
        return lp.reshape(tuple(lp.shape[:-k]) + (-1,)).sum(-1) if k else lp  # as Independent.log_prob sums
    if kind is pdist.MaskedDistribution and not isinstance(fn._mask, bool):
        return scale_and_mask(_log_prob(fn.base_dist, value), mask=fn._mask)
    return fn.log_prob(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-10, atol=1e-12, equal_nan=True))


def _first(out: Any) -> Any:
    """Every array of ``out`` (nested tuples / lists / dicts) at index 0 of its leading axis."""
    if isinstance(out, dict):
        return {k: _first(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_first(o) for o in out)
    return out[0]


def _in_functorch_transform() -> bool:
    """Whether the call runs inside a ``torch.func`` transform (``jacfwd``, ``vmap``, ``grad``)."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


def _stack(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in outs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([o[i] for o in outs]) for i in range(len(first)))
    return torch.stack(outs)


def _constants_in_dtype(transform: Any, dtype: Any, device: Any) -> Any:
    """``transform`` with the Python numbers of its affine parts (the ``loc`` and ``scale`` by which torch maps
    ``positive``, ``greater_than``, ``less_than`` and ``interval``: ``ComposeTransform([ExpTransform(),
    AffineTransform(0., 1)])`` for ``positive``) as 0-dim tensors of the params' ``dtype`` on their ``device``; the
    same values.  torch's forward mode (``torch.func.jvp``/``jacfwd``, MISSO's scores in θ) gives a 0-dim float32
    tangent plus a Python float a float64 tangent (the zero tangent of the number, float64, promotes it:
    pytorch/pytorch#90065), while its primal stays float32: a float32 model's scalar params came out of the map
    with float64 derivatives, which met float32 ones at the first ``index_add`` (``self (Float) and source
    (Double)``)."""
    if isinstance(transform, ComposeTransform):
        return ComposeTransform([_constants_in_dtype(t, dtype, device) for t in transform.parts],
                                cache_size=transform._cache_size)
    if isinstance(transform, AffineTransform):
        def tensor(v: Any) -> Any:
            return torch.as_tensor(v, dtype=dtype, device=device) if isinstance(v, (int, float)) else v

        return AffineTransform(tensor(transform.loc), tensor(transform.scale), event_dim=transform.event_dim,
                               cache_size=transform._cache_size)
    return transform


class PyroPPL(PPL):
    """The tracing interface of Pyro (see :class:`~latentfit.integrations.traced.PPL`)."""

    name = "pyro"
    dist = SimpleNamespace(
        Normal=torch.distributions.Normal, Categorical=torch.distributions.Categorical,
        MultivariateNormal=torch.distributions.MultivariateNormal,
        Independent=(pdist.Independent, torch.distributions.Independent), Masked=pdist.MaskedDistribution,
        Expanded=pdist.ExpandedDistribution, Transformed=torch.distributions.TransformedDistribution,
        ExpTransform=ExpTransform)

    def run(self, fn: Any, args: tuple, kwargs: dict, params: dict | None = None, values: dict | None = None,
            key: Any = None, subsample: tuple[str, int, Any] | None = None) -> dict[str, Site]:
        runner = _Runner(params, values, _module_attrs(fn), _local_leaves(fn) if params is None else None)
        batch = _UnitSubsample(*subsample) if subsample is not None else contextlib.nullcontext()
        with pyro.validation_enabled(False), runner, batch:  # NaN densities are rejected by MH / reported by site
            fn(*args, **kwargs)
        return runner.sites

    def first_run(self, fn: Any, args: tuple, kwargs: dict) -> dict[str, Site]:
        """:meth:`run`, the param sites' values copied: they are the param store's own tensors (a module's weights
        among them), which :func:`write_params_to_store` later updates in place, and they stand for the initial θ."""
        sites = self.run(fn, args, kwargs)
        for name, site in sites.items():
            if site.type == "param" and isinstance(site.value, torch.Tensor):
                sites[name] = dataclasses.replace(site, value=site.value.detach().clone())
        return sites

    def obs_container_hint(self, value: Any) -> str | None:
        """Pyro's distributions read torch tensors (and Python numbers): what to pass for a numpy array, a pandas
        object, a list."""
        if isinstance(value, (torch.Tensor, int, float)):
            return None
        if hasattr(value, "to_numpy"):  # pandas Series / DataFrame
            return "a torch tensor, e.g. torch.as_tensor(y.to_numpy())"
        if isinstance(value, (np.ndarray, np.generic)):
            return "a torch tensor, e.g. torch.as_tensor(y)"
        return "a torch tensor, e.g. torch.tensor(y)"

    def is_module_weight(self, name: str) -> bool:
        return _MODULE_DIVIDER in name  # pyro.module's "net$$$0.weight"

    def make_ops(self, dtype: Any, device: Any) -> TorchOps:
        return TorchOps(device=device, dtype=dtype)

    def log_prob(self, fn: Any, value: Any) -> Any:
        return _log_prob(fn, value)

    def vectorise(self, f: Any, pure: bool = True, num_unmapped: int = 0) -> Any:
        return _TracedChainMap(f) if pure else _ChainMap(f)  # (further arguments are passed unmapped)

    def jvp(self, f: Any, x: Any, t: Any) -> Any:
        """``∂f(x)·t`` by the double-backward trick (:func:`~latentfit.inference.ops.reverse_jvp`: torch's forward
        mode imported ``torch._dynamo``, ~0.9 s, in every fresh process that analysed a model)."""
        return reverse_jvp(f, x, t.to(x.dtype)[None])[1][0]

    def grad_params(self, f: Any, theta: dict[str, Any]) -> dict[str, Any]:
        with torch.enable_grad():
            th = {n: v.detach().clone().requires_grad_(True) for n, v in theta.items()}
            out = f(th)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return {n: torch.zeros_like(v) for n, v in th.items()}
            grads = torch.autograd.grad(out, list(th.values()), allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(th[n])).detach() for n, g in zip(th, grads)}

    def biject_to(self, constraint: Any) -> Any:
        return biject_to(constraint)

    def param_transform(self, constraint: Any, dtype: Any = None, device: Any = None) -> Any:
        """``transform_to(constraint)`` as Pyro's param store does, its number constants tensors of the fit's dtype
        (:func:`_constants_in_dtype`)."""
        transform = transform_to(constraint)
        return transform if dtype is None else _constants_in_dtype(transform, dtype, device)

    def float_dtype(self, values: list[Any]) -> tuple[Any, Any]:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        floats = [v.dtype for v in tensors if v.is_floating_point()]
        dtype = max(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.get_default_dtype()
        device = tensors[0].device if tensors else torch.device("cpu")
        return dtype, device

    def segment_sum(self, x: Any, idx: Any, n: int) -> Any:
        return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, idx, x)

    def no_grad(self) -> Any:
        return torch.no_grad()

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return x.movedim(source, destination)  # (torch.moveaxis has no vmap batching rule)

    def one_hot_draws(self, key: Any, probs: Any, num: int, dtype: Any) -> Any:
        lab = torch.multinomial(probs.reshape(-1, probs.shape[-1]), num, True, generator=key).T
        return torch.nn.functional.one_hot(lab.reshape((num,) + tuple(probs.shape[:-1])), probs.shape[-1]).to(dtype)


class PyroLatentModel(TracedLatentModel):
    """A Pyro model function, traced once, seen through the :class:`LatentModel` contract."""

    ppl = PyroPPL()


class PyroEnumModel(EnumeratedLatentModel):
    """A Pyro model with one enumerable per-unit latent (exact E-step by enumeration)."""

    ppl = PyroLatentModel.ppl


def write_params_to_store(params: dict[str, Any], model: Any = None) -> None:
    """Store the estimates in Pyro's param store (constrained values).

    A name already in the store gets the estimate copied into its stored (unconstrained) tensor, in place
    and in that tensor's dtype and device, as Pyro's own optimisers update it: the tensors ``pyro.module``
    registered are the module's ``nn.Parameter`` objects, so the user's network holds the fitted weights
    afterwards (replacing the stored tensor would leave the network at its initial weights).  A param that the
    PyroModule ``model`` keeps to itself (``pyro.settings.set(module_local_params=True)``) gets it in its module's own
    tensor, the same way, and stays out of the store, as Pyro's mode keeps it.  Any other new name, or one whose
    stored shape differs, is stored as a new tensor."""
    store = pyro.get_param_store()
    stored = dict(store.named_parameters())
    local = _local_leaves(model) if model is not None else {}
    for name, value in params.items():
        value = torch.as_tensor(value).detach()
        leaf, constraint = stored.get(name), store._constraints.get(name, constraints.real)
        if leaf is None and name in local:
            leaf, constraint = local[name][0](), local[name][1]
        if leaf is None or leaf.shape != value.shape:
            store[name] = value.clone()
            continue
        with torch.no_grad():
            leaf.copy_(transform_to(constraint).inv(value.to(leaf.device)))


__all__ = ["PyroEnumModel", "PyroLatentModel", "PyroPPL", "write_params_to_store"]
