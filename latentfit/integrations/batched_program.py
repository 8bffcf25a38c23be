"""One recorded density program run over all chains at once (issue 10 item 6).

The Pyro adapter records a model's density as a TorchScript program (``torch.jit.trace``).  Recorded for one chain,
``z [N, d]``, its ops are small: at theophylline's size the program's ~80 ops cost about their dispatch alone, and
recording every chain one after another (``torch.func.vmap`` cannot be recorded) pays that dispatch once per chain.
:func:`batched_program` rewrites the one-chain program so that its chain input carries a leading chain dim
``[C, N, d]`` and every value computed from it carries that dim too: one replay for all chains.

The rewrite walks the recorded graph once.  A value is *batched* when it depends on the chain input; a node without
batched inputs is left as it is (computed once for all chains: θ's transforms, the prior's parameters).  A node with
batched inputs is rewritten by a rule of its op:

* elementwise and broadcasting ops: a batched operand of lower rank than the result gets unit dims after the chain
  dim (so broadcasting aligns the logical dims, never the chain dim);
* ops taking dims (reductions, ``narrow``, ``unbind``, ``select``, ``movedim``, ...): every dim is written from the
  end (``d - rank``), so it names the same logical dim with the chain dim in front;
* shape ops (``reshape``, ``view``, ``expand``): the recorded shapes (the program is specialised to its input
  shapes) with the chain count in front;
* ``x[idx]`` (``aten::index``) with unbatched indices: a full slice in front of the indices; ``index_add``,
  ``stack``, ``cat``, ``broadcast_tensors``: their unbatched operands expanded over the chains.

Any other op meeting a batched value (``.item()``, an index computed from the latents, an op without a rule) makes
the program not batch-safe: :func:`batched_program` returns ``None`` and the caller replays the one-chain recording
per chain.  The caller also checks the batched program against the model's own (eager) evaluation before using it.
Values are those of the per-chain replay up to the last bits of reductions (the same elements summed, in kernels
that may group them differently for a larger tensor).
"""

from __future__ import annotations

from typing import Any

import torch

#: ops applied element by element with broadcasting (every tensor operand, batched or not, broadcasts to the result)
_ELEMENTWISE = frozenset("aten::" + k for k in """
abs acos acosh add addcdiv addcmul asin asinh atan atan2 atanh bitwise_and bitwise_not bitwise_or bitwise_xor ceil
clamp clamp_max clamp_min clip copysign cos cosh digamma div eq erf erfc erfinv exp exp2 expm1 floor floor_divide
fmod frac ge gt heaviside hypot i0 isfinite isinf isnan le lerp lgamma log log10 log1p log2 log_sigmoid logaddexp
logical_and logical_not logical_or logical_xor logit lt maximum minimum mul mvlgamma nan_to_num ne neg polygamma pow
reciprocal relu remainder round rsqrt rsub sigmoid sign sin sinh softplus special_entr special_erfcx special_expit
special_log_ndtr special_ndtr special_ndtri special_xlog1py special_xlogy sqrt square sub tan tanh true_divide trunc
where xlogy""".split())

#: elementwise losses, batch-safe when unreduced (their last argument, ``reduction``, 0)
_LOSSES = frozenset({"aten::binary_cross_entropy_with_logits", "aten::binary_cross_entropy"})

#: linear algebra over the last two dims (every other dim a broadcast batch dim)
_MATRIX_OPS = frozenset("aten::" + k for k in """
cholesky cholesky_inverse cholesky_solve inverse linalg_cholesky linalg_det linalg_inv linalg_slogdet linalg_solve
linalg_solve_triangular logdet det""".split())

#: ops whose result has the shape of their first operand (the others give a dtype, or nothing of their shape)
_LIKE_SELF = frozenset("aten::" + k for k in """
alias clone contiguous detach empty_like full_like ones_like type_as to zeros_like""".split())

#: ops taking dims, by the positions of their dim arguments; ``"out"``: dims counted in the result (``unsqueeze``,
#: ``stack``), else in the first operand
_DIM_ARGS: dict[str, tuple[tuple[int, ...], str]] = {
    "aten::sum": ((1,), "in"), "aten::mean": ((1,), "in"), "aten::logsumexp": ((1,), "in"),
    "aten::amax": ((1,), "in"), "aten::amin": ((1,), "in"), "aten::prod": ((1,), "in"), "aten::all": ((1,), "in"),
    "aten::any": ((1,), "in"), "aten::softmax": ((1,), "in"), "aten::log_softmax": ((1,), "in"),
    "aten::cumsum": ((1,), "in"), "aten::cumprod": ((1,), "in"), "aten::narrow": ((1,), "in"),
    "aten::select": ((1,), "in"), "aten::slice": ((1,), "in"), "aten::unbind": ((1,), "in"),
    "aten::index_select": ((1,), "in"), "aten::transpose": ((1, 2), "in"), "aten::movedim": ((1, 2), "in"),
    "aten::flatten": ((1, 2), "in"), "aten::diagonal": ((2, 3), "in"), "aten::squeeze": ((1,), "in"),
    "aten::unsqueeze": ((1,), "out"), "aten::split": ((2,), "in"), "aten::chunk": ((2,), "in"),
    "aten::flip": ((1,), "in"), "aten::roll": ((2,), "in"), "aten::tril": ((), "in"), "aten::triu": ((), "in"),
    "aten::size": ((1,), "in"),
}
#: the full-reduction forms (``x.sum()``): their dims are every logical dim
_FULL_REDUCTIONS = frozenset({"aten::sum", "aten::mean", "aten::prod", "aten::amax", "aten::amin"})
_VIEWS = frozenset({"aten::reshape", "aten::view", "aten::expand", "aten::broadcast_to"})
#: ops whose results are the same for every chain (a dtype, a device, a new tensor of a given shape)
_UNBATCHED_RESULTS = frozenset({"prim::dtype", "prim::device", "aten::new_zeros", "aten::new_ones", "aten::new_full",
                                "aten::new_empty"})


class NotBatchable(Exception):
    """The recorded program has an op that cannot run over stacked chains (names the op)."""


def batched_program(fn: Any, num_chains: int, batched_inputs: tuple[int, ...] = (0,)) -> Any:
    """``fn`` (a recorded one-chain program) rewritten to take ``num_chains`` chains stacked on a leading dim of the
    inputs at ``batched_inputs``; every output gets that dim (outputs that do not depend on the chains are expanded
    to it).  ``None`` when an op of the program is not batch-safe."""
    try:
        graph = fn.graph.copy()
        _Batcher(graph, int(num_chains), batched_inputs).run()
        torch._C._jit_pass_dce(graph)
        return torch._C._create_function_from_graph(f"{fn.name}_chains", graph)
    except NotBatchable:
        return None


def _ival(v: Any) -> Any:
    """The constant behind ``v`` (a constant or a list of constants), else raise."""
    node = v.node()
    if node.kind() == "prim::Constant":
        return v.toIValue()
    if node.kind() == "prim::ListConstruct" and all(i.node().kind() == "prim::Constant" for i in node.inputs()):
        return [i.toIValue() for i in node.inputs()]
    raise NotBatchable(f"{node.kind()} gives a dim argument that is not a constant")


def _is_tensor(v: Any) -> bool:
    return isinstance(v.type(), torch._C.TensorType)


class _Batcher:
    def __init__(self, graph: Any, num_chains: int, batched_inputs: tuple[int, ...]) -> None:
        self.g, self.b = graph, num_chains
        self.sizes: dict[int, tuple[int, ...]] = {}  # logical sizes of tensor values, by unique id
        self.batched: set[int] = set()
        self.lists: set[int] = set()  # lists holding a batched tensor (read by the list-aware rules)
        inputs = list(graph.inputs())
        for i in batched_inputs:
            self.batched.add(inputs[i].unique())
        for v in inputs:
            self._record_sizes(v)
        for node in graph.nodes():
            for v in node.outputs():
                self._record_sizes(v)

    def _record_sizes(self, v: Any) -> None:
        t = v.type()
        if isinstance(t, torch._C.TensorType) and t.sizes() is not None:
            self.sizes[v.unique()] = tuple(t.sizes())

    # ----- helpers -------------------------------------------------------------------------------------------
    def size(self, v: Any) -> tuple[int, ...]:
        s = self.sizes.get(v.unique())
        if s is None:
            raise NotBatchable(f"{v.node().kind()} gives a tensor of unrecorded shape")
        return s

    def is_b(self, v: Any) -> bool:
        return v.unique() in self.batched

    def mark(self, v: Any, sizes: tuple[int, ...] | None = None) -> Any:
        self.batched.add(v.unique())
        if sizes is not None:
            self.sizes[v.unique()] = tuple(sizes)
        return v

    def const(self, node: Any, value: Any) -> Any:
        with self.g.insert_point_guard(node):
            return self.g.insertConstant(value)

    def op(self, node: Any, kind: str, args: list[Any]) -> Any:
        """A new node ``kind(args)`` before ``node`` (Python values become constants)."""
        with self.g.insert_point_guard(node):
            vals = [a if isinstance(a, torch._C.Value) else self.g.insertConstant(a) for a in args]
        new = self.g.create(kind, vals)  # every argument positional, as the recorded nodes hold them
        new.output().setType(torch._C.TensorType.get())
        new.insertBefore(node)
        return new.output()

    def pad(self, node: Any, v: Any, rank: int) -> Any:
        """Batched ``v`` with unit dims after the chain dim up to logical rank ``rank``."""
        s = self.size(v)
        if len(s) >= rank:
            return v
        new = (1,) * (rank - len(s)) + s
        return self.mark(self.op(node, "aten::reshape", [v, [self.b, *new]]), new)

    def expand(self, node: Any, v: Any) -> Any:
        """Unbatched tensor ``v`` repeated over the chains (contiguous: a result written into must own its memory)."""
        s = self.size(v)
        e = self.op(node, "aten::expand", [v, [self.b, *s], False])
        return self.mark(self.op(node, "aten::contiguous", [e, 0]), s)

    def dim(self, node: Any, pos: int, rank: int) -> None:
        """Rewrite the dim argument(s) at input ``pos`` from the end (``d - rank``)."""
        value = _ival(node.inputsAt(pos))
        dims = value if isinstance(value, list) else [value]
        if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
            raise NotBatchable(f"{node.kind()}: dims {value}")
        new = [d - rank if d >= 0 else d for d in dims]
        node.replaceInput(pos, self.const(node, new if isinstance(value, list) else new[0]))

    # ----- the walk ------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.g.nodes()):
            if list(node.blocks()):
                raise NotBatchable(f"{node.kind()} has blocks")
            ins = list(node.inputs())
            if not any(v.unique() in self.batched or v.unique() in self.lists for v in ins):
                continue
            self.rewrite(node, node.kind(), ins)
        self.outputs()

    def outputs(self) -> None:
        ret = self.g.return_node()
        for i, v in enumerate(list(ret.inputs())):
            node = v.node()
            if node.kind() in ("prim::TupleConstruct", "prim::DictConstruct", "prim::ListConstruct"):
                for j, e in enumerate(list(node.inputs())):
                    if _is_tensor(e) and not self.is_b(e):
                        node.replaceInput(j, self.expand(node, e))
                node.output().setType(_erase(node.output().type()))
            elif _is_tensor(v) and not self.is_b(v):
                ret.replaceInput(i, self.expand(ret, v))
        for node in self.g.nodes():  # the recorded sizes are the logical ones: leave shapes to the interpreter
            for v in node.outputs():
                if _is_tensor(v):
                    v.setType(torch._C.TensorType.get())
        for v in self.g.inputs():
            if _is_tensor(v):
                v.setType(torch._C.TensorType.get())

    def rewrite(self, node: Any, kind: str, ins: list[Any]) -> None:  # noqa: C901 (one rule per op family)
        for v in ins:
            if v.unique() in self.lists and kind not in ("aten::stack", "aten::cat", "aten::broadcast_tensors",
                                                         "aten::index", "prim::ListUnpack"):
                raise NotBatchable(f"{kind} reads a list of per-chain tensors")
        outs = list(node.outputs())
        if kind == "prim::ListConstruct":
            self.lists.add(node.output().unique())
            return
        if kind in _UNBATCHED_RESULTS:
            return
        if kind in _ELEMENTWISE:
            if kind.endswith("_"):
                raise NotBatchable(kind)
            rank = len(self.size(outs[0]))
            for i, v in enumerate(ins):
                if _is_tensor(v) and self.is_b(v):
                    node.replaceInput(i, self.pad(node, v, rank))
                elif not _is_tensor(v) and self.is_b(v):
                    raise NotBatchable(f"{kind} reads a per-chain number")
            self.mark(outs[0])
            return
        if kind in _LOSSES:  # elementwise when unreduced (Bernoulli's log_prob: reduction="none")
            if _ival(ins[-1]) != 0:
                raise NotBatchable(f"{kind} reduced")
            out = self.size(outs[0])
            for i, v in enumerate(ins):  # every operand at the result's shape (the kernels write into the target's)
                if _is_tensor(v):
                    v = self.pad(node, v, len(out)) if self.is_b(v) else v
                    node.replaceInput(i, self.mark(self.op(node, "aten::expand", [v, [self.b, *out], False]), out))
            self.mark(outs[0])
            return
        if kind in _MATRIX_OPS:  # over the trailing two dims, broadcasting the others
            rank = len(self.size(outs[0]))
            for i, v in enumerate(ins):
                if _is_tensor(v) and self.is_b(v):
                    if len(self.size(v)) < 2:
                        raise NotBatchable(f"{kind} of a vector")
                    node.replaceInput(i, self.pad(node, v, rank))
                elif self.is_b(v):
                    raise NotBatchable(f"{kind} with a per-chain argument")
            for v in outs:
                self.mark(v)
            return
        if kind in ("aten::t", "aten::mT"):  # the last two dims swapped (a vector unchanged)
            rank = len(self.size(ins[0]))
            new = self.op(node, "aten::transpose", [ins[0], -1, -2]) if rank >= 2 else ins[0]
            self.mark(new, self.size(outs[0]))
            node.output().replaceAllUsesWith(new)
            return
        if kind == "aten::permute":
            if not self.is_b(ins[0]) or self.is_b(ins[1]):
                raise NotBatchable("aten::permute with a per-chain argument")
            rank = len(self.size(ins[0]))
            node.replaceInput(1, self.const(node, [0] + [d % rank + 1 for d in _ival(ins[1])]))
            self.mark(outs[0])
            return
        if kind in _LIKE_SELF:
            if self.is_b(ins[0]):
                self.mark(outs[0])
            return
        if kind in _VIEWS:
            if not self.is_b(ins[0]):
                raise NotBatchable(f"{kind} with a per-chain shape")
            out = self.size(outs[0])
            if kind in ("aten::expand", "aten::broadcast_to"):
                node.replaceInput(0, self.pad(node, ins[0], len(out)))
            node.replaceInput(1, self.const(node, [self.b, *out]))
            self.mark(outs[0])
            return
        if kind in _DIM_ARGS:
            self.dims(node, kind, ins, outs)
            return
        if kind == "aten::index":
            self.index(node, ins, outs)
            return
        if kind == "aten::index_add":
            self.index_add(node, ins, outs)
            return
        if kind in ("aten::stack", "aten::cat", "aten::broadcast_tensors"):
            self.list_op(node, kind, ins, outs)
            return
        if kind == "prim::ListUnpack":
            if ins[0].unique() in self.batched:
                for v in outs:
                    self.mark(v)
                return
            raise NotBatchable("prim::ListUnpack of a list of per-chain tensors")
        if kind == "aten::matmul":
            self.matmul(node, ins, outs)
            return
        if kind == "aten::masked_fill":
            if not self.is_b(ins[0]):
                node.replaceInput(0, self.expand(node, ins[0]))
            if _is_tensor(ins[1]) and self.is_b(ins[1]):
                node.replaceInput(1, self.pad(node, ins[1], len(self.size(outs[0]))))
            if _is_tensor(ins[2]) and self.is_b(ins[2]):
                raise NotBatchable("aten::masked_fill with a per-chain fill value")
            self.mark(outs[0])
            return
        if kind in ("prim::TupleConstruct", "prim::DictConstruct"):
            self.lists.add(outs[0].unique())  # the program's outputs (handled at the return); read by nothing else
            return
        raise NotBatchable(f"{kind} on a per-chain value")

    def dims(self, node: Any, kind: str, ins: list[Any], outs: list[Any]) -> None:
        if not self.is_b(ins[0]):
            raise NotBatchable(f"{kind} with a per-chain argument")
        for v in ins[1:]:
            if self.is_b(v):
                raise NotBatchable(f"{kind} with a per-chain argument")
        positions, counted = _DIM_ARGS[kind]
        rank = len(self.size(ins[0]))
        full = kind in _FULL_REDUCTIONS and (len(ins) < 3 or _ival(ins[1]) in (None, []))
        if not full and any(pos >= len(ins) for pos in positions):
            raise NotBatchable(f"{kind} without its dim")  # x.all(), x.squeeze(): every dim, the chain dim too
        if full:  # x.sum(): every logical dim
            dims = list(range(-rank, 0))
            if not dims:  # a 0-d value: nothing to reduce
                node.output().replaceAllUsesWith(ins[0])
                return
            if kind in ("aten::sum", "aten::mean"):
                dtype = ins[1] if len(ins) == 2 else ins[3]
                new = self.op(node, kind, [ins[0], dims, False, dtype])
            elif kind in ("aten::amax", "aten::amin"):
                new = self.op(node, kind, [ins[0], dims, False])
            else:
                raise NotBatchable(f"{kind} over every dim")
            self.mark(new, ())
            node.output().replaceAllUsesWith(new)
            return
        if kind in ("aten::tril", "aten::triu"):
            if rank < 2:
                raise NotBatchable(kind)
        if counted == "out":
            rank = len(self.size(outs[0]))
        for pos in positions:
            if pos < len(ins):
                self.dim(node, pos, rank)
        if kind == "aten::size":
            return  # an int: the same for every chain
        for v in outs:
            if _is_tensor(v) or v.type().kind() == "ListType":
                self.mark(v)

    def index(self, node: Any, ins: list[Any], outs: list[Any]) -> None:
        src, idx = ins
        lnode = idx.node()
        if lnode.kind() != "prim::ListConstruct":
            raise NotBatchable("aten::index with indices that are not a list")
        items = list(lnode.inputs())
        if any(self.is_b(i) for i in items):
            if self.is_b(src):
                raise NotBatchable("aten::index of per-chain values by per-chain indices")
            tensors = [k for k, i in enumerate(items) if _is_tensor(i)]
            if tensors != [0] or len(items) != 1:
                raise NotBatchable("aten::index by per-chain indices other than a single leading index")
            self.lists.discard(idx.unique())
            self.mark(outs[0])  # x[idx] with idx [C, ...]: [C, ..., rest] as wanted
            return
        tensors = [k for k, i in enumerate(items) if _is_tensor(i)]
        if tensors and tensors != list(range(tensors[0], tensors[-1] + 1)):
            raise NotBatchable("aten::index with advanced indices apart")
        none = self.const(node, None)
        new = self.g.create("prim::ListConstruct", [none, *items])
        new.output().setType(idx.type())
        new.insertBefore(node)
        node.replaceInput(1, new.output())
        self.mark(outs[0])

    def index_add(self, node: Any, ins: list[Any], outs: list[Any]) -> None:
        if self.is_b(ins[2]):
            raise NotBatchable("aten::index_add with per-chain indices")
        rank = len(self.size(ins[0]))
        for pos in (0, 3):
            if not self.is_b(ins[pos]):
                node.replaceInput(pos, self.expand(node, ins[pos]))
            elif len(self.size(ins[pos])) != rank:
                raise NotBatchable("aten::index_add of operands of different ranks")
        if rank != 1:
            self.dim(node, 1, rank)
            self.mark(outs[0])
            return
        # a vector per chain: one index_add over the flattened chains, unit i of chain c at c * n + i (torch's
        # index_add of a matrix along its last dim loops over the indices in Python-sized steps: 2x slower at 50 000
        # rows; the flat one adds the same values in the same order)
        n = self.size(ins[0])[0]
        index = ins[2]
        shift = torch.arange(self.b, dtype=torch.int64).mul_(n).unsqueeze_(1)
        if index.node().kind() == "prim::Constant":
            flat_index = self.const(node, (index.toIValue().unsqueeze(0) + shift).reshape(-1))
        else:
            flat_index = self.op(node, "aten::reshape", [
                self.op(node, "aten::add", [self.op(node, "aten::unsqueeze", [index, 0]), shift, 1]), [-1]])
        flat_self = self.op(node, "aten::reshape", [node.inputsAt(0), [-1]])
        flat_src = self.op(node, "aten::reshape", [node.inputsAt(3), [-1]])
        new = self.op(node, "aten::index_add", [flat_self, 0, flat_index, flat_src, ins[4]])
        out = self.mark(self.op(node, "aten::reshape", [new, [self.b, n]]), (n,))
        node.output().replaceAllUsesWith(out)

    def list_op(self, node: Any, kind: str, ins: list[Any], outs: list[Any]) -> None:
        lst = ins[0]
        lnode = lst.node()
        if lnode.kind() != "prim::ListConstruct":
            raise NotBatchable(f"{kind} of a list that is not built in the program")
        items = list(lnode.inputs())
        if kind == "aten::broadcast_tensors":
            rank = max(len(self.size(i)) for i in items)
            new_items = [self.pad(lnode, i, rank) if self.is_b(i) else i for i in items]
        else:
            new_items = [i if self.is_b(i) else self.expand(lnode, i) for i in items]
        for j, i in enumerate(new_items):
            lnode.replaceInput(j, i)
        self.lists.discard(lst.unique())
        if kind == "aten::broadcast_tensors":
            self.mark(outs[0])  # a list: every tensor of it gets the chain dim (ListUnpack reads it)
            return
        self.dim(node, 1, len(self.size(outs[0])) if kind == "aten::stack" else len(self.size(items[0])))
        self.mark(outs[0])

    def matmul(self, node: Any, ins: list[Any], outs: list[Any]) -> None:
        a, b = ins
        ra, rb = len(self.size(a)), len(self.size(b))
        if self.is_b(a) and self.is_b(b):
            if ra < 2 or rb < 2:
                raise NotBatchable("aten::matmul of per-chain vectors")
            rank = max(ra, rb)
            node.replaceInput(0, self.pad(node, a, rank))
            node.replaceInput(1, self.pad(node, b, rank))
        elif self.is_b(a):
            if rb > 2:
                raise NotBatchable("aten::matmul by a batch of matrices")
        elif rb < 2 or ra > 2:
            raise NotBatchable("aten::matmul of a per-chain vector")
        self.mark(outs[0])


def _erase(t: Any) -> Any:
    """A container type with its tensor shapes erased."""
    if isinstance(t, torch._C.TupleType):
        return torch._C.TupleType([_erase(e) for e in t.elements()])
    if isinstance(t, torch._C.TensorType):
        return torch._C.TensorType.get()
    return t


__all__ = ["NotBatchable", "batched_program"]
