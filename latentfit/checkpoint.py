"""Checkpoints of an engine run: write every few chunks, resume bit for bit.

A checkpoint is a pair of files in one directory, ``ckpt-000120.safetensors`` (every array: the leaves of the
engine state, its random stream included (a JAX key, or a ``torch.Generator``'s state), the history so far, the
collected latent draws) and ``ckpt-000120.json`` (what
the arrays are: state paths, dtypes, the iteration reached, the engine class, its options, the data shapes, the
SHA-256 of the data (:func:`data_digest`: a resume on other data of the same shapes is refused), the library
version, the optimiser ``param_groups``, the SHA-256 of the tensors file).  Neither file can hold code:
the tensors are read by ``safetensors.numpy.load`` and the sidecar by ``json.load``.  Both are written to a
temporary file in the same directory, flushed and moved into place with ``os.replace``, the sidecar last (a
checkpoint without its sidecar is never read).  In a distributed fit (``run(distributed=True)``) every process writes
its own shard, ``ckpt-000120.rank<r>-of-<P>.*``, whose sidecar records its rank and the number of processes (a
resume with another number of processes is refused).  On ``jax.distributed`` a process holds the whole state except
the per-unit entries split over the processes: it stores its own block of those (the leaf records the unit axis and
the whole shape) and the rest whole; a resume gathers every process's blocks back (one all-gather per such entry)
before the driver shards the state again.

The state's ``NamedTuple`` records are stored field by field, by name.  Format 1 (engine states as dicts, torch's
global RNG state beside them) is refused with a message: such a run is started again.

Restoring needs the *structure* of the state (named tuples, dicts, tuples, ``torch.optim`` objects):
the driver builds a template with the engine's ``init`` and this module fills its leaves with the stored
arrays (torch optimisers through ``load_state_dict``; their parameters are copied in place so the optimiser
keeps pointing at them).  See :meth:`latentfit.inference.driver.Engine.run` (``checkpoint=``, ``resume=``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "latentfit-checkpoint"
FORMAT_VERSION = 2
_NAME = re.compile(r"^ckpt-(\d+)(?:\.rank(\d+)-of-(\d+))?\.json$")
#: engine attributes that do not change the iterates (never compared on resume)
_IGNORED_OPTIONS = frozenset({"progress", "callback", "model", "ops"})


# ----- engine description (compared on resume) ----------------------------------------------------------------
def _jsonable(value: Any) -> tuple[bool, Any]:
    """``(True, json value)`` for numbers, strings, None and tuples, lists, dataclasses of them; else ``(False, _)``."""
    if value is None or isinstance(value, (bool, str)):
        return True, value
    if isinstance(value, (int, np.integer)):
        return True, int(value)
    if isinstance(value, (float, np.floating)):
        return True, float(value)
    if isinstance(value, (tuple, list)):
        out = []
        for v in value:
            ok, j = _jsonable(v)
            if not ok:
                return False, None
            out.append(j)
        return True, out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            ok, j = _jsonable(getattr(value, f.name))
            if ok:
                out[f.name] = j
        return True, out
    return False, None


def engine_options(engine: Any) -> dict[str, Any]:
    """The engine's public attributes that are numbers, strings, tuples (or dataclasses of them), plus its phases."""
    out: dict[str, Any] = {}
    for name, value in sorted(vars(engine).items()):
        if name.startswith("_") or name in _IGNORED_OPTIONS:
            continue
        ok, j = _jsonable(value)
        if ok:
            out[name] = j
    out["phases"] = [[int(a), int(b), repr(p)] for a, b, p in engine.phases()]
    return json.loads(json.dumps(out))  # tuples -> lists, as they come back from the sidecar


def data_shapes(model: Any) -> dict[str, Any]:
    """``num_units``, ``latent_dim`` and the shape of every parameter of ``model`` (a model that is not a
    ``LatentModel``, such as the VFG's training problem, describes itself by a ``data_shapes()`` method)."""
    own = getattr(model, "data_shapes", None)
    if callable(own):
        return json.loads(json.dumps(own()))
    params = {n: list(np.shape(model.ops.to_numpy(p.value))) for n, p in model.params.items()}
    return {"num_units": int(model.num_units), "latent_dim": int(model.latent_dim), "params": params}


def _feed_array(h: Any, arr: np.ndarray) -> None:
    """Feed one numpy array's dtype, shape and bytes (an object array by the ``repr`` of its items)."""
    arr = np.asarray(arr)
    h.update(f"array:{arr.dtype.str}:{list(arr.shape)};".encode())
    if arr.dtype.hasobject:
        h.update(repr(arr.tolist()).encode("utf-8"))
    else:
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def _feed(h: Any, value: Any) -> None:
    """Feed ``value`` to the hash ``h``: arrays (numpy, torch, JAX) by dtype, shape and bytes; numbers, strings and
    None by ``repr``; lists, tuples, dicts and dataclasses item by item; tables (pandas) row by row; anything else
    (a function, a network module) by its type's name alone."""
    mod = type(value).__module__.split(".")[0]
    if isinstance(value, (bool, np.bool_)):
        h.update(f"bool:{bool(value)};".encode())
    elif isinstance(value, (int, np.integer)):  # 100 and np.int64(100) alike
        h.update(f"int:{int(value)};".encode())
    elif isinstance(value, (float, np.floating)):
        h.update(f"float:{float(value)!r};".encode())
    elif value is None or isinstance(value, (complex, str, bytes, np.generic)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, np.ndarray):
        _feed_array(h, value)
    elif mod == "torch" and type(value).__name__ in ("Tensor", "Parameter"):
        t = value.detach().cpu().contiguous()
        try:
            arr = t.numpy()
        except TypeError:  # bfloat16 and the like: their bytes
            import torch

            h.update(f"torch:{t.dtype}:{list(t.shape)};".encode())
            arr = t.reshape(-1).view(torch.uint8).numpy()
        _feed_array(h, arr)
    elif mod in ("jax", "jaxlib") and hasattr(value, "dtype") and hasattr(value, "shape"):
        import jax

        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        if getattr(value, "is_fully_addressable", True):
            _feed_array(h, np.asarray(value))
        else:  # a global array of several processes: this process's shards
            for shard in value.addressable_shards:
                h.update(repr(shard.index).encode())
                _feed_array(h, np.asarray(shard.data))
    elif isinstance(value, dict):
        h.update(f"dict:{len(value)};".encode())
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}:{len(value)};".encode())
        for v in value:
            _feed(h, v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"{type(value).__name__};".encode())
        for f in dataclasses.fields(value):
            _feed(h, f.name)
            _feed(h, getattr(value, f.name))
    elif mod == "pandas" and hasattr(value, "shape"):
        import pandas as pd

        h.update(f"{type(value).__name__}:{list(value.shape)};".encode())
        if isinstance(value, pd.DataFrame):
            _feed(h, [str(c) for c in value.columns])
            _feed(h, [str(t) for t in value.dtypes])
        _feed_array(h, pd.util.hash_pandas_object(value, index=True).to_numpy())
    else:
        h.update(f"object:{type(value).__module__}.{type(value).__qualname__};".encode())


def data_digest(model: Any) -> str | None:
    """SHA-256 of the data ``model`` was built on (``model.data_arrays()``: its observed arrays and other data
    arguments), over each array's dtype, shape and bytes: recorded in a checkpoint and compared on resume.  None for a
    model that lists no data (no ``data_arrays``): its checkpoints are resumed without this check."""
    arrays = getattr(model, "data_arrays", None)
    if not callable(arrays):
        return None
    h = hashlib.sha256()
    _feed(h, arrays())
    return h.hexdigest()


#: no digest computed yet (None is a model without one)
_UNSET: Any = object()


def begin_run_digest(engine: Any, compute: bool) -> None:
    """Reset ``engine``'s data digest at the start of a run: the model as given now (before a distributed fit pads
    or shards it), hashed now when ``compute`` (a run that writes or reads checkpoints), else only if a checkpoint
    is written (a non-finite fault's)."""
    engine._digest_model = getattr(engine, "user_model", engine.model)
    engine._data_digest = data_digest(engine._digest_model) if compute else _UNSET


def engine_data_digest(engine: Any) -> str | None:
    """The digest of the data of the fit ``engine`` runs: the one the driver computed at the start of the run
    (``engine._data_digest``, once per run), else computed now from ``engine.model``."""
    digest = getattr(engine, "_data_digest", _UNSET)
    if digest is _UNSET:
        model = getattr(engine, "_digest_model", None)
        digest = data_digest(getattr(engine, "user_model", engine.model) if model is None else model)
        engine._data_digest = digest
    return digest


def _library_version() -> str:
    import latentfit

    return str(latentfit.__version__)


# ----- state pytrees <-> flat arrays ---------------------------------------------------------------------------
def _contiguous(array: Any) -> np.ndarray:
    """A C-contiguous copy-if-needed of ``array`` keeping 0-d shapes (``np.ascontiguousarray`` makes them 1-d)."""
    return np.require(np.asarray(array), requirements="C")


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _children(node: Any) -> list[tuple[Any, Any]] | None:
    """``[(path element, child)]`` of a container node, None for a leaf."""
    if isinstance(node, dict):
        return list(node.items())
    if _is_namedtuple(node):  # by field name: a record's fields, not their positions
        return list(zip(node._fields, node))
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    return None


def _rebuild(node: Any, children: list[Any]) -> Any:
    if isinstance(node, dict):
        return dict(zip(node.keys(), children))
    if _is_namedtuple(node):
        return type(node)(*children)
    return type(node)(children)


def _is_torch_optimizer(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.optim.Optimizer)


class _Packer:
    """Collects arrays under short tensor names and a JSON description of each."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, name: str, array: np.ndarray) -> str:
        self.tensors[name] = _contiguous(array)
        return name

    def leaf(self, x: Any, name: str) -> dict[str, Any]:
        """Describe and store one state leaf (torch tensor, JAX array, numpy array or Python scalar)."""
        mod = type(x).__module__.split(".")[0]
        if x is None:
            return {"kind": "none"}
        if isinstance(x, bool):
            return {"kind": "bool", "value": x}
        if isinstance(x, (int, np.integer)) and not isinstance(x, np.ndarray):
            return {"kind": "int", "value": int(x)}
        if isinstance(x, float) and not isinstance(x, np.floating):
            return {"kind": "float", "value": x}
        if mod == "torch":
            import torch

            if isinstance(x, torch.Generator):  # the random stream of a torch fit
                return {"kind": "torch_generator", "tensor": self.add(name, x.get_state().numpy()),
                        "device": str(x.device)}
            if isinstance(x, torch.Tensor):
                arr = x.detach().cpu().numpy()
                return {"kind": "torch", "tensor": self.add(name, arr), "dtype": str(arr.dtype),
                        "requires_grad": bool(x.requires_grad)}
        if mod in ("jax", "jaxlib"):
            import jax

            from latentfit.inference.ops_jax import process_block

            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                arr, axis = process_block(jax.random.key_data(x))
                desc = {"kind": "jax_key", "tensor": self.add(name, arr), "impl": str(jax.random.key_impl(x))}
            else:
                arr, axis = process_block(x)  # a jax.distributed fit's per-unit entry: this process's block
                desc = {"kind": "jax", "tensor": self.add(name, arr), "dtype": str(arr.dtype),
                        "weak_type": bool(getattr(x, "weak_type", False))}
            if axis is not None:
                desc.update(unit_axis=axis, shape=list(x.shape))
            return desc
        if isinstance(x, (np.ndarray, np.generic)):
            arr = np.asarray(x)
            return {"kind": "numpy", "tensor": self.add(name, arr), "scalar": isinstance(x, np.generic)}
        raise TypeError(f"cannot checkpoint a state leaf of type {type(x).__module__}.{type(x).__name__}: "
                        "checkpoints hold arrays, numbers and torch.optim optimisers only")

    def nested(self, x: Any, name: str) -> dict[str, Any]:
        """A leaf, or a list / tuple / dict of them (optimiser state entries, e.g. a list of past gradients)."""
        if isinstance(x, (list, tuple)) and not _is_namedtuple(x):
            return {"kind": type(x).__name__, "items": [self.nested(v, f"{name}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, dict) and all(isinstance(k, str) for k in x):
            return {"kind": "dict", "items": {k: self.nested(v, f"{name}/{k}") for k, v in x.items()}}
        return self.leaf(x, name)

    def optimizer(self, opt: Any, name: str) -> dict[str, Any]:
        """A ``torch.optim`` optimiser by its ``state_dict``: tensors stored, ``param_groups`` as JSON."""
        sd = opt.state_dict()
        groups = []
        for g in sd["param_groups"]:
            entry: dict[str, Any] = {}
            for k, v in g.items():
                ok, j = _jsonable(v)
                if not ok:
                    raise TypeError(f"cannot checkpoint the torch optimiser {type(opt).__name__}: its param_group "
                                    f"entry {k!r} is a {type(v).__name__} (only numbers, strings and tuples are "
                                    "stored); use a named optimiser or one with plain hyper-parameters")
                entry[k] = j
            groups.append(entry)
        state: dict[str, dict[str, Any]] = {}
        for pid, values in sd["state"].items():
            state[str(pid)] = {k: self.nested(v, f"{name}/{pid}/{k}") for k, v in values.items()}
        return {"kind": "torch_optimizer", "class": type(opt).__name__, "param_groups": groups, "state": state}


def flatten_state(state: Any) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Arrays and leaf descriptions of a state pytree, in depth-first order."""
    packer = _Packer()
    leaves: list[dict[str, Any]] = []

    def walk(node: Any, path: list[Any]) -> None:
        kids = _children(node)
        if kids is not None:
            for k, child in kids:
                walk(child, path + [k])
            return
        name = f"state/{len(leaves):04d}"
        desc = packer.optimizer(node, name) if _is_torch_optimizer(node) else packer.leaf(node, name)
        desc["path"] = [str(p) if not isinstance(p, int) else p for p in path]
        leaves.append(desc)

    walk(state, [])
    return packer.tensors, leaves


def _restore_leaf(desc: dict[str, Any], tensors: dict[str, np.ndarray], template: Any, ops: Any) -> Any:
    kind = desc["kind"]
    if kind == "none":
        return None
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](desc["value"])
    arr = tensors[desc["tensor"]]
    if "dtype" in desc and str(arr.dtype) != desc["dtype"]:
        raise ValueError(f"the checkpoint's tensor {desc['tensor']!r} is {arr.dtype}, its sidecar says "
                         f"{desc['dtype']}: the checkpoint was altered")
    if kind == "numpy":
        return arr[()] if desc.get("scalar") else arr.copy()
    if kind == "torch_generator":
        import torch

        device = template.device if isinstance(template, torch.Generator) else desc["device"]
        gen = torch.Generator(device=device)
        gen.set_state(torch.from_numpy(arr.copy()))
        return gen
    if kind == "torch":
        import torch

        device = template.device if isinstance(template, torch.Tensor) else getattr(ops, "device", "cpu")
        out = torch.as_tensor(arr.copy(), device=device)
        return out.requires_grad_(True) if desc.get("requires_grad") else out
    if kind in ("jax", "jax_key") and "unit_axis" in desc:  # a block of a jax.distributed fit: gather every process's
        from latentfit.inference.ops_jax import whole_from_blocks

        arr = whole_from_blocks(arr, int(desc["unit_axis"]))
        want = list(desc["shape"]) if kind == "jax" else list(desc["shape"]) + list(arr.shape[len(desc["shape"]):])
        if list(arr.shape) != want:
            raise ValueError(f"the processes' blocks of state entry {'/'.join(map(str, desc['path']))!r} make an "
                             f"array of shape {list(arr.shape)}, the checkpoint recorded {desc['shape']}")
    if kind == "jax":
        import jax.numpy as jnp

        out = jnp.asarray(arr, dtype=arr.dtype)
        if desc.get("weak_type"):
            from jax._src.lax.lax import _convert_element_type

            out = _convert_element_type(out, arr.dtype, weak_type=True)
        return out
    if kind == "jax_key":
        import jax

        return jax.random.wrap_key_data(arr, impl=desc["impl"])
    raise ValueError(f"unknown leaf kind {kind!r} in the checkpoint")


def _restore_nested(desc: dict[str, Any], tensors: dict[str, np.ndarray], ops: Any) -> Any:
    if desc["kind"] in ("list", "tuple"):
        items = [_restore_nested(d, tensors, ops) for d in desc["items"]]
        return items if desc["kind"] == "list" else tuple(items)
    if desc["kind"] == "dict":
        return {k: _restore_nested(d, tensors, ops) for k, d in desc["items"].items()}
    return _restore_leaf(desc, tensors, None, ops)


def _restore_optimizer(desc: dict[str, Any], tensors: dict[str, np.ndarray], opt: Any, ops: Any) -> Any:
    if desc.get("kind") != "torch_optimizer":
        raise ValueError(f"the checkpoint holds a {desc.get('kind')} where this engine's state has a torch optimiser")
    if desc["class"] != type(opt).__name__:
        raise ValueError(f"checkpoint optimiser is {desc['class']}, this engine's is {type(opt).__name__}")
    current = opt.state_dict()
    groups = []
    for saved, now in zip(desc["param_groups"], current["param_groups"]):
        g = dict(now)
        for k, v in saved.items():
            g[k] = tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v
        groups.append(g)
    state = {int(pid): {k: _restore_nested(d, tensors, ops) for k, d in values.items()}
             for pid, values in desc["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": groups})
    return opt


def restore_state(template: Any, leaves: list[dict[str, Any]], tensors: dict[str, np.ndarray], ops: Any) -> Any:
    """The state pytree ``template`` (from the engine's ``init``) with its leaves replaced by the stored ones.

    Raises ``ValueError`` when the structures differ.  Tensors that are parameters of a torch optimiser in the
    state are overwritten in place (the optimiser holds them).
    """
    by_path = {tuple(d["path"]): d for d in leaves}
    used: set[tuple[Any, ...]] = set()
    opt_params: set[int] = set()

    def find_optimizers(node: Any) -> None:
        kids = _children(node)
        if kids is not None:
            for _, child in kids:
                find_optimizers(child)
        elif _is_torch_optimizer(node):
            opt_params.update(id(p) for g in node.param_groups for p in g["params"])

    find_optimizers(template)

    def walk(node: Any, path: list[Any]) -> Any:
        kids = _children(node)
        if kids is not None:
            return _rebuild(node, [walk(child, path + [k]) for k, child in kids])
        key = tuple(str(p) if not isinstance(p, int) else p for p in path)
        desc = by_path.get(key)
        if desc is None:
            raise ValueError(f"the checkpoint's engine state has no entry {'/'.join(map(str, key))!r} "
                             "(written by another version of the engine?)")
        used.add(key)
        if _is_torch_optimizer(node):
            return _restore_optimizer(desc, tensors, node, ops)
        value = _restore_leaf(desc, tensors, node, ops)
        want, got = getattr(node, "shape", None), getattr(value, "shape", None)
        if want is not None and got is not None and tuple(want) != tuple(got):
            raise ValueError(f"the checkpoint's state entry {'/'.join(map(str, key))!r} has shape {list(got)}, this "
                             f"engine's has {list(want)}: the checkpoint was altered or belongs to another fit")
        if id(node) in opt_params:  # keep the tensor the optimiser updates
            import torch

            with torch.no_grad():
                node.copy_(value)
            return node
        return value

    out = walk(template, [])
    extra = sorted("/".join(map(str, p)) for p in set(by_path) - used)
    if extra:
        raise ValueError(f"the checkpoint's engine state has entries this engine does not: {extra}")
    return out


# ----- files ---------------------------------------------------------------------------------------------------
#: ``(rank, world size)`` of one process of a distributed fit; None: a one-process fit
Shard = tuple[int, int] | None


def _stem(iteration: int, shard: Shard) -> str:
    """``ckpt-000120`` (one process) or ``ckpt-000120.rank1-of-2`` (process 1 of a 2-process fit: its shard)."""
    return f"ckpt-{int(iteration):06d}" + ("" if shard is None else f".rank{shard[0]}-of-{shard[1]}")


def checkpoint_files(directory: str | os.PathLike, shard: Shard = None) -> list[tuple[int, Path]]:
    """``[(iteration, sidecar path)]`` of the complete checkpoints in ``directory``, oldest first: a one-process fit's
    (``shard`` None) or those of process ``rank`` of a ``world``-process fit (``shard=(rank, world)``)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    want = None if shard is None else (str(int(shard[0])), str(int(shard[1])))
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and (None if m.group(2) is None else (m.group(2), m.group(3))) == want \
                and p.with_suffix(".safetensors").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def engine_shard(engine: Any) -> Shard:
    """``(rank, world size)`` of an engine running a distributed fit (its ``ops`` reach every process, or, on JAX, the
    run's process group), else None."""
    procs = engine._processes() if hasattr(engine, "_processes") else engine.ops
    return (int(procs.rank), int(procs.world_size)) if hasattr(procs, "world_size") else None


def resume_source(checkpoint: str | os.PathLike | None, resume: Any) -> Any:
    """Where a one-process run with ``run(checkpoint=..., resume=...)`` continues from: None (a fresh run), else a
    directory or checkpoint file for :func:`load_checkpoint`.  ``resume=True`` continues from ``checkpoint`` when it
    holds checkpoints and starts afresh otherwise; a fresh run refuses a ``checkpoint`` directory that holds another
    run's checkpoints."""
    if checkpoint is None and (resume is None or resume is False):  # a plain run: nothing to read or check
        return None
    if resume is True:
        if checkpoint is None:
            raise ValueError("resume=True continues from the checkpoint directory: pass checkpoint=<dir>")
        return checkpoint if checkpoint_world_sizes(checkpoint) else None
    if resume not in (None, False):
        return resume
    if checkpoint is not None and checkpoint_world_sizes(checkpoint):
        raise FileExistsError(f"{str(checkpoint)!r} already holds checkpoints: pass resume=True to continue that "
                              "run, or use an empty directory")
    return None


def checkpoint_world_sizes(directory: str | os.PathLike) -> list[int]:
    """The numbers of processes of the fits whose checkpoints ``directory`` holds (1: a one-process fit)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = {int(m.group(3) or 1) for p in d.iterdir() if (m := _NAME.match(p.name))}
    return sorted(found)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass
class Checkpoint:
    """A loaded checkpoint: the sidecar ``meta`` (a dict) and the ``tensors`` (numpy arrays by name)."""

    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None

    @property
    def iteration(self) -> int:
        return int(self.meta["iteration"])

    @property
    def history(self) -> dict[str, list[np.ndarray]]:
        """History so far, as the driver keeps it (one array per iteration and entry)."""
        return {n: list(self.tensors[f"history/{j:04d}"]) for j, n in enumerate(self.meta["history"])}

    @property
    def draws(self) -> list[np.ndarray]:
        return list(self.tensors["draws"]) if "draws" in self.tensors else []

    def check_compatible(self, engine: Any) -> None:
        """Raise ``ValueError`` naming what differs between this checkpoint and ``engine`` (class, backend, version,
        data shapes, options, the data's digest: :func:`data_digest`; a checkpoint without one, written by an older
        latentfit or of a model that lists no data, is not checked for it)."""
        meta = self.meta
        cls = type(engine).__name__
        if meta["engine"] != cls:
            raise ValueError(f"checkpoint was written by {meta['engine']}, not {cls}")
        rank, world = engine_shard(engine) or (0, 1)
        saved_world, saved_rank = int(meta.get("world_size", 1)), int(meta.get("rank", 0))
        if (saved_world, saved_rank) != (world, rank):
            raise ValueError(f"checkpoint was written by process {saved_rank} of a fit over {saved_world} process(es), "
                             f"this is process {rank} of {world}: a distributed fit resumes with the same number of "
                             "processes, each from its own shard")
        if meta["backend"] != engine.ops.name:
            raise ValueError(f"checkpoint was written on the {meta['backend']} backend, not {engine.ops.name}")
        version = _library_version()
        if meta["latentfit_version"] != version:
            raise ValueError(f"checkpoint was written by latentfit {meta['latentfit_version']}, this is {version}")
        problems = []
        saved, now = meta["shapes"], data_shapes(engine.model)
        for k in ("num_units", "latent_dim"):
            if saved[k] != now[k]:
                problems.append(f"{k} {saved[k]} != {now[k]}")
        for n in sorted(set(saved["params"]) | set(now["params"])):
            a, b = saved["params"].get(n), now["params"].get(n)
            if a != b:
                problems.append(f"param {n!r} shape {a} != {b}" if a is not None and b is not None
                                else f"param {n!r} only in the {'checkpoint' if b is None else 'model'}")
        if problems:
            raise ValueError("checkpoint data shapes differ (checkpoint != this model): " + "; ".join(problems))
        saved, now = meta["options"], engine_options(engine)
        diffs = [f"{k}={saved.get(k, '<unset>')!r} != {now.get(k, '<unset>')!r}"
                 for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diffs:
            raise ValueError("checkpoint options differ (checkpoint != this engine): " + "; ".join(diffs))
        saved_digest, digest = meta.get("data_sha256"), engine_data_digest(engine)
        if saved_digest is not None and digest is not None and saved_digest != digest:
            where = "" if (saved_world, saved_rank) == (1, 0) else f" (the block of process {rank} of {world})"
            raise ValueError(f"the data differ from the checkpoint's{where}: the checkpoint was written by a fit of "
                             f"other data of the same shapes (its data SHA-256 {saved_digest[:12]}..., this fit's "
                             f"{digest[:12]}...); continuing it would return estimates of the old data.  To fit these "
                             "data, start afresh: resume=False with a new (or emptied) checkpoint folder")


def load_checkpoint(path: str | os.PathLike, shard: Shard = None) -> Checkpoint:
    """Load the latest checkpoint of a directory (process ``shard = (rank, world)``'s of a distributed fit), or the
    checkpoint ``ckpt-XXXXXX.json`` / ``.safetensors`` given.

    Only ``json`` and ``safetensors`` are read: nothing is unpickled.  Raises ``FileNotFoundError`` when there is
    none and :class:`CheckpointDamaged` (a ``ValueError``) when the tensors file does not match its sidecar or a file
    does not parse.  In a directory a damaged latest checkpoint is skipped, with a ``UserWarning``, for the latest
    intact one kept beside it (``keep``); the error is raised when none is intact.
    """
    p = Path(path)
    if not p.is_dir():
        sidecar = p.with_suffix(".json")
        if not sidecar.is_file():
            raise FileNotFoundError(f"no checkpoint at {str(p)!r} (neither a directory nor a ckpt-*.json file)")
        return _read_checkpoint(sidecar)
    found = checkpoint_files(p, shard)
    if not found:
        sizes = checkpoint_world_sizes(p)
        if sizes:
            mine = 1 if shard is None else int(shard[1])
            raise ValueError(f"the checkpoints in {str(p)!r} were written by a fit over {sizes} process(es), this "
                             f"one runs over {mine}: a distributed fit resumes with the same number of processes")
        raise FileNotFoundError(f"no checkpoint (ckpt-*.json + .safetensors) in {str(p)!r}")
    # the latest intact one: a damaged file (a crash or a full disk while it was written, an altered copy) does not
    # block the older ones kept beside it; a warning names what was skipped
    first: Exception | None = None
    for _, sidecar in reversed(found):
        try:
            ckpt = _read_checkpoint(sidecar)
        except (CheckpointDamaged, FileNotFoundError) as err:
            first = first or err
            continue
        if first is not None:
            warnings.warn(f"{first} — resuming from the latest intact checkpoint instead, {str(sidecar)!r}",
                          UserWarning, stacklevel=2)
        return ckpt
    assert first is not None
    raise first


class CheckpointDamaged(ValueError):
    """A checkpoint file that is truncated, altered or unreadable (:func:`load_checkpoint` skips it in a directory)."""


def _read_checkpoint(sidecar: Path) -> Checkpoint:
    """The checkpoint of the sidecar ``ckpt-XXXXXX.json`` and its tensors file, checked."""
    from safetensors.numpy import load

    try:
        with open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointDamaged(f"{str(sidecar)!r} is not a readable checkpoint sidecar (truncated or corrupted "
                                f"JSON: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(sidecar)!r} is not a latentfit checkpoint")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {meta['format_version']} is newer than this latentfit reads "
                         f"({FORMAT_VERSION})")
    if int(meta.get("format_version", 0)) < FORMAT_VERSION:
        raise ValueError(f"{str(sidecar)!r} is a checkpoint of format {meta.get('format_version')}, written by an "
                         f"older latentfit ({meta.get('latentfit_version')}) whose engine states were dicts and whose "
                         "torch fits drew from torch's global RNG; this version (format "
                         f"{FORMAT_VERSION}) carries typed states and the random stream in them and cannot continue "
                         "it: start the fit again")
    tensor_path = sidecar.with_suffix(".safetensors")
    if not tensor_path.is_file():
        raise FileNotFoundError(f"the checkpoint {str(sidecar)!r} has no tensors file {str(tensor_path)!r}")
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointDamaged(f"{str(tensor_path)!r} does not match its sidecar (SHA-256 differs): the file is "
                                "truncated or was altered")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors' own error type: a header that does not parse
        raise CheckpointDamaged(f"{str(tensor_path)!r} is not a readable safetensors file ({err})") from None
    return Checkpoint(meta=meta, tensors=tensors, path=sidecar)


def save_checkpoint(directory: str | os.PathLike, engine: Any, state: Any, iteration: int,
                    history: dict[str, list[np.ndarray]], draws: list[np.ndarray],
                    keep: int | None = None) -> Path:
    """Write ``ckpt-<iteration>.safetensors`` + ``.json`` atomically; keep the last ``keep``. Returns the sidecar.

    A process of a distributed fit (``engine.ops`` with ``rank`` and ``world_size``) writes its own shard,
    ``ckpt-<iteration>.rank<r>-of-<world>.*``, with the rank and world size in the sidecar.
    """
    from safetensors.numpy import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, leaves = flatten_state(state)
    names = list(history)
    for j, n in enumerate(names):
        tensors[f"history/{j:04d}"] = _contiguous(np.stack(history[n]))
    if draws:
        tensors["draws"] = _contiguous(np.stack(draws))
    data = save(tensors)
    shard = engine_shard(engine)
    rank, world = shard if shard is not None else (0, 1)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "latentfit_version": _library_version(),
        "engine": type(engine).__name__, "backend": engine.ops.name, "iteration": int(iteration),
        "num_iterations": int(engine.num_iterations), "options": engine_options(engine),
        "shapes": data_shapes(engine.model), "state": leaves, "history": names,
        "sha256": hashlib.sha256(data).hexdigest(), "world_size": world, "rank": rank,
    }
    digest = engine_data_digest(engine)
    if digest is not None:
        meta["data_sha256"] = digest
    stem = d / _stem(iteration, shard)
    sidecar, tensors_file = stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.safetensors"
    _atomic_write(tensors_file, data)
    _atomic_write(sidecar, json.dumps(meta, indent=1, allow_nan=True).encode("utf-8"))
    if keep is not None:
        for _, old in checkpoint_files(d, shard)[:-keep]:
            old.unlink()  # the sidecar first: a tensors file alone is never read
            old.with_suffix(".safetensors").unlink(missing_ok=True)
    return sidecar


__all__ = ["Checkpoint", "begin_run_digest", "checkpoint_files", "checkpoint_world_sizes", "data_digest",
           "data_shapes", "engine_data_digest", "engine_options", "engine_shard", "load_checkpoint", "restore_state",
           "resume_source", "save_checkpoint"]
