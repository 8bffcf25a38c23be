"""What a traced function captures, as a hashable key: the memo that lets a later fit skip tracing.

:func:`latentfit.inference.ops_jax._program_for` finds the shared executable of a chunk of iterations (or of an
``ops.jit`` closure) by tracing it to a jaxpr and keying on the program's text: ~50 ms per program, 9 programs per
SAEM fit of the README's NumPyro model, most of a later fit's time.  :func:`fingerprint` instead reads what the
function would trace *from*: its code and everything it reaches (closure cells, defaults, referenced globals, bound
``self`` and the attributes of every object reachable from there, partials), with

* every array (numpy, JAX) keyed by its shape, dtype, weak type, placement **and content** (a digest of its bytes):
  a trace may read a captured array's values (``int(idx.max())``, ``if mask.all():``, ``float(y.mean())``), so only
  equal values guarantee an equal program;
* Python scalars by type and exact value (``float.hex``), containers element by element in order;
* functions and classes of installed libraries (``site-packages``: jax, numpy, numpyro, ...) and modules by identity
  (assumed not to change while the process runs), the project's and the user's functions by code, defaults, closure
  and referenced globals, their classes by identity plus their scalar class attributes (a flag toggled on a class);
* JAX's trace-time configuration (``jax_enable_x64``, default precision, ...: ``config.trace_context()``).

Anything else (a tracer, a C object without ``__dict__`` that is not a library callable, a generator, a lock, ...)
makes the function *unfingerprintable* and :func:`fingerprint` returns ``None``: the caller then traces as before.
Two functions with equal fingerprints trace to the same program from equal constants, so the memo hands back the
first one's executable *and* its constants (equal values).  Different data of the same shapes give another
fingerprint (their content differs): such a fit traces again and still shares the executable through the program
text, as before.  An object may define ``__trace_fingerprint__()`` returning the part of it that a trace can read
(:class:`~latentfit.inference.ops_jax.JaxOps` leaves out its caches and timers).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import operator
import os
import random
import sys
import sysconfig
import types
import weakref
from collections.abc import Hashable
from typing import Any

import jax
import numpy as np

try:  # JAX's own trace-time configuration, part of jit's cache keys
    from jax._src.config import trace_context as _trace_context
except ImportError:  # pragma: no cover - another JAX: the few options that change a trace
    def _trace_context() -> Hashable:
        return tuple(bool(getattr(jax.config, name, False)) for name in ("jax_enable_x64",)) + (
            str(jax.config.jax_default_matmul_precision),)


_TRACER, _TREEDEF = jax.core.Tracer, jax.tree_util.PyTreeDef
_ARRAYS = (np.ndarray, jax.Array)
_VALUES = (enum.Enum, jax.Device, jax.sharding.Sharding)


class Unfingerprintable(Exception):
    """Raised inside :func:`fingerprint` for a value it cannot key: the caller traces instead."""


#: folders of installed packages: functions, classes and objects defined there are keyed by identity
_LIBRARY_DIRS = tuple({os.path.realpath(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                                     sysconfig.get_paths()["stdlib"]) if p})
_LIBRARY_MODULES: dict[str, bool] = {}
_SCALARS = (type(None), bool, int, str, bytes, complex, type(Ellipsis), type(NotImplemented))
#: attribute names skipped on every object: references back to caches of compiled programs
_SKIP_ATTRS = frozenset({"__weakref__"})


def _is_library_module(name: str | None) -> bool:
    """A module installed under ``site-packages`` or the standard library (not the project's, not ``__main__``)."""
    if not name:
        return False
    known = _LIBRARY_MODULES.get(name)
    if known is None:
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if "latentfit" in name.split("."):  # ours, wherever it is installed
            known = False
        elif mod is None or path is None:
            known = name.split(".")[0] in sys.builtin_module_names or name in ("builtins",)
        else:  # resolved: a link into a library folder from elsewhere (an editable install) is not a library's
            path = os.path.realpath(path)
            known = any(path.startswith(d + os.sep) for d in _LIBRARY_DIRS)
        _LIBRARY_MODULES[name] = known
    return known


def _module_level(obj: Any, module: str | None) -> bool:
    """``obj`` is what its module's namespace holds under its qualified name (not a closure made per call)."""
    found: Any = sys.modules.get(module or "")
    for part in getattr(obj, "__qualname__", "<locals>").split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    return found is obj or getattr(found, "__func__", None) is obj


#: digests of JAX arrays (immutable) by id, with a weak reference to the array: ``{id: (ref, key)}``
_JAX_DIGESTS: dict[int, tuple[Any, tuple[Any, ...]]] = {}


def _array_key(x: Any) -> tuple[Any, ...]:
    """Shape, dtype, weak type, placement and a digest of the bytes of an array (a JAX array's digest is computed
    once: it cannot change)."""
    if isinstance(x, jax.Array):
        known = _JAX_DIGESTS.get(id(x))
        if known is not None and known[0]() is x:
            return known[1]
        key, ident = _host_array_key(x), id(x)
        try:
            ref = weakref.ref(x, lambda _: _JAX_DIGESTS.pop(ident, None))
        except TypeError:  # no weak references to this kind of array: digest it every time
            return key
        _JAX_DIGESTS[id(x)] = (ref, key)
        return key
    return _host_array_key(x)


#: ``str(dtype)`` by dtype (numpy builds a dtype's name on each call)
_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """``str(dtype)``, memoised."""
    try:
        name = _DTYPE_NAMES.get(dtype)
    except TypeError:  # an unhashable dtype-like
        return str(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def _host_array_key(x: Any) -> tuple[Any, ...]:
    host = np.asarray(x)
    if host.dtype == object:
        raise Unfingerprintable("object array")
    digest = hashlib.blake2b(np.ascontiguousarray(host).view(np.uint8).reshape(-1).data, digest_size=16).digest() \
        if host.size else b""
    return ("array", type(x).__name__, host.shape, dtype_name(host.dtype), bool(getattr(x, "weak_type", False)),
            str(getattr(x, "sharding", "")), digest)


class _Fingerprinter:
    """One pass over an object graph.  An object met again is keyed by its first key (the same tuple), so an object's
    key does not depend on where the walk met it first: the model reached through an engine or directly gives one key,
    which the store's digest memo (``ops_jax_store._INSTANCES``) then finds for every program of a fit.  A cycle is a
    reference to an object still being walked, keyed by how many levels up the path it lies (``("cycle", k)``); the
    key of an object holding a cycle that leaves it depends on the path: met again, such an object is keyed by its
    visit number (``("ref", n)``), and no object holding that reference is reused (each object is walked once)."""

    def __init__(self) -> None:
        self.done: dict[int, Hashable] = {}  # keys of the objects walked (their keys hold no cycle leaving them)
        self.seen: dict[int, int] = {}  # visit numbers of the objects walked
        self.active: dict[int, int] = {}  # objects being walked, by depth on the path
        self.low = 0  # the shallowest depth a cycle met in the current object's walk reaches up to
        self.keep: list[Any] = []  # keeps every visited object alive during the pass (ids stay unique)
        self.classes: dict[type, Hashable] = {}  # each class's key (a class does not change during the pass)
        self.globals: dict[tuple[types.CodeType, int], tuple[tuple[str, bool], ...]] = {}  # names a code reads

    def __call__(self, obj: Any) -> Hashable:
        if isinstance(obj, _SCALARS):
            return obj if type(obj) in (str, type(None)) else (type(obj).__name__, obj)
        if isinstance(obj, float):
            return ("float", type(obj).__name__, obj.hex())
        oid = id(obj)
        key = self.done.get(oid)
        if key is not None:
            return key
        active = self.active
        depth = len(active)
        up = active.get(oid)
        if up is not None:  # a cycle: the object ``depth - up`` levels up the path
            self.low = min(self.low, up)
            return ("cycle", depth - up)
        ref = self.seen.get(oid)
        if ref is not None:  # walked before, its key holding a cycle that left it: by its visit number
            self.low = -1
            return ("ref", ref)
        self.seen[oid] = len(self.seen)
        active[oid] = depth
        self.keep.append(obj)
        outer_low, self.low = self.low, depth
        try:
            key = self._visit(obj)
        finally:
            del active[oid]
        if self.low >= depth:  # no cycle leaves the object: its key is its own wherever it is met
            self.done[oid] = key
        self.low = min(outer_low, self.low)
        return key

    def _items(self, values: Any) -> tuple[Hashable, ...]:
        return tuple(self(v) for v in values)

    def _visit(self, obj: Any) -> Hashable:
        kind = type(obj)
        if kind is dict:  # the common kinds first (most of a model's graph)
            return ("dict", None, None, tuple((self(k), self(v)) for k, v in obj.items()))
        if kind is tuple or kind is list:
            return (kind.__name__, None, self._items(obj))
        if kind is types.FunctionType:
            return self._function(obj)
        if kind is types.MethodType:
            return ("method", self(obj.__self__), self(obj.__func__))
        if isinstance(obj, _TRACER):
            raise Unfingerprintable("a tracer")
        if isinstance(obj, _ARRAYS):
            if isinstance(obj, jax.Array) and dtype_name(obj.dtype).startswith("key<"):  # typed PRNG keys
                return ("key", str(obj.dtype), _array_key(jax.random.key_data(obj)))
            return _array_key(obj)
        if isinstance(obj, np.generic):
            return ("npscalar", str(obj.dtype), obj.tobytes())
        if isinstance(obj, np.dtype):
            return ("dtype", dtype_name(obj))
        if isinstance(obj, weakref.ref):
            return ("weakref", self(obj()))
        if isinstance(obj, types.ModuleType):
            return ("module", obj.__name__)
        if isinstance(obj, (tuple, list)):
            return (type(obj).__name__, self._class(type(obj)) if type(obj) not in (tuple, list) else None,
                    self._items(obj))
        if isinstance(obj, _TREEDEF):  # a value: equal trees of equal node types and aux data
            return ("treedef", obj)
        if isinstance(obj, types.MappingProxyType):
            return ("mappingproxy", tuple((self(k), self(v)) for k, v in obj.items()))
        if isinstance(obj, dict):
            extra = self(obj.default_factory) if hasattr(obj, "default_factory") else None
            return (type(obj).__name__, self._class(type(obj)) if type(obj) is not dict else None, extra,
                    tuple((self(k), self(v)) for k, v in obj.items()))
        if isinstance(obj, (set, frozenset)):  # in iteration order (the order a trace would see)
            return (type(obj).__name__, self._items(obj))
        if isinstance(obj, slice):
            return ("slice", self(obj.start), self(obj.stop), self(obj.step))
        if isinstance(obj, range):
            return ("range", obj.start, obj.stop, obj.step)
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, types.MethodType):
            return ("method", self(obj.__self__), self(obj.__func__))
        if isinstance(obj, types.CodeType):
            return ("code", obj)
        if isinstance(obj, (staticmethod, classmethod)):
            return (type(obj).__name__, self(obj.__func__))
        if isinstance(obj, property):
            return ("property", self(obj.fget), self(obj.fset))
        if isinstance(obj, type):
            return self._class(obj)
        if isinstance(obj, (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodDescriptorType,
                            types.MethodWrapperType, types.BuiltinMethodType)):
            owner = getattr(obj, "__self__", None)
            if owner is not None and not isinstance(owner, types.ModuleType):
                return ("builtin-method", getattr(obj, "__name__", ""), self(owner))
            return ("builtin", obj)
        if isinstance(obj, random.Random):  # its state lives in C, not in ``__dict__``
            raise Unfingerprintable("random.Random")
        if isinstance(obj, functools.partial):
            return ("partial", self(obj.func), self._items(obj.args), self(obj.keywords))
        custom = getattr(type(obj), "__trace_fingerprint__", None)
        if custom is not None:
            return ("custom", self._class(type(obj)), self(custom(obj)))
        if "pandas" in sys.modules:
            import pandas as pd

            if isinstance(obj, (pd.DataFrame, pd.Series, pd.Index)):
                return self._pandas(obj, pd)
        if type(obj) is object:  # a sentinel
            return ("sentinel", obj)
        if isinstance(obj, _VALUES):  # values, hashable
            return ("value", type(obj), obj)
        if _is_library_module(getattr(type(obj), "__module__", None)) and not hasattr(obj, "__dict__") \
                and not hasattr(type(obj), "__slots__"):
            # a library's C callable (jit-compiled function, ufunc, ...): by identity; any other C object (an
            # iterator, a random generator, a buffer: state a trace may read) cannot be keyed
            if callable(obj) and type(obj).__hash__ is not None:
                return ("object", obj)
            raise Unfingerprintable(type(obj).__qualname__)
        return self._instance(obj)

    def _instance(self, obj: Any) -> Hashable:
        state = getattr(obj, "__dict__", None)
        slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ()) if s not in ("__dict__",
                                                                                              "__weakref__")]
        if state is None and not slots:
            raise Unfingerprintable(type(obj).__qualname__)
        fields = tuple((k, self(v)) for k, v in (state or {}).items() if k not in _SKIP_ATTRS)
        slotted = tuple((s, self(getattr(obj, s, None))) for s in slots)
        return ("instance", self._class(type(obj)), fields, slotted)

    def _class(self, cls: type) -> Hashable:
        """A class by identity; the project's and the user's classes with their data attributes too (a flag or an
        option set on the class), not their methods."""
        known = self.classes.get(cls)
        if known is not None:
            return known
        if _is_library_module(cls.__module__) or cls.__module__ == "builtins":
            known = self.classes[cls] = ("class", cls)
            return known
        attrs = tuple((c.__qualname__, name, self(vars(c)[name])) for c, name in _class_data(cls))
        known = self.classes[cls] = ("class", cls, attrs)
        return known

    def _function(self, fn: types.FunctionType) -> Hashable:
        module = fn.__globals__.get("__name__")  # ``__module__`` and ``__qualname__`` may be a wrapped function's
        library = _is_library_module(module)
        if library and _module_level(fn, module):
            return ("function", fn)  # a library's module-level function (or method): itself
        code = fn.__code__
        cells = ()
        if fn.__closure__:
            try:
                cells = tuple(self(c.cell_contents) for c in fn.__closure__)
            except ValueError:  # an empty cell (a name assigned after the function was made)
                raise Unfingerprintable("empty closure cell") from None
        if library:  # a library's closure (``jax.vmap``'s, ``jax.grad``'s): its code and captures; globals static
            return ("closure", code, module, self(fn.__defaults__), self(fn.__kwdefaults__), cells)
        glob = fn.__globals__
        read = self.globals.get((code, id(glob)))
        if read is None:  # the names the code reads from its globals (True) or finds nowhere (False)
            builtins = glob.get("__builtins__", {})
            read = self.globals[code, id(glob)] = tuple(
                (name, name in glob) for name in _global_names(code)
                if name in glob or not ((isinstance(builtins, dict) and name in builtins) or hasattr(builtins, name)))
        names = [(name, self(glob[name]) if bound else "<unbound>") for name, bound in read]
        return ("function", code, glob.get("__name__"), self(fn.__defaults__), self(fn.__kwdefaults__), cells,
                tuple(names))

    def _pandas(self, obj: Any, pd: Any) -> Hashable:
        frame = obj.to_frame() if isinstance(obj, pd.Series) else obj
        if isinstance(obj, pd.Index):
            return ("pd.Index", tuple(map(str, obj)), str(obj.dtype))
        if isinstance(obj, pd.DataFrame) and not obj.shape[1]:  # no columns: its index (pandas' row hash ~0.1-0.3 ms)
            return ("pandas", type(obj).__name__, (), (), self(dict(obj.attrs)), self._pandas(obj.index, pd))
        values = pd.util.hash_pandas_object(frame, index=True).to_numpy()
        return ("pandas", type(obj).__name__, tuple(map(str, frame.columns)), tuple(map(dtype_name, frame.dtypes)),
                self(dict(frame.attrs)), _array_key(values))


#: the data attributes of the project's and the user's classes (:func:`_class_data`), with the class dicts they were
#: read from: ``{class: (names and values of each class of its MRO, (class, name) of each data attribute)}``
_CLASS_DATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _class_data(cls: type) -> tuple[tuple[type, str], ...]:
    """``(class, name)`` of each data attribute (not a method, property or other descriptor, not a dunder) of the
    classes of ``cls``'s MRO that are not a library's, in MRO order; recomputed when any of those class dicts holds
    another name or object than when last read (their names and values compared by identity)."""
    mro = tuple(c for c in cls.__mro__ if not (_is_library_module(c.__module__) or c.__module__ == "builtins"))
    snapshot = tuple((tuple(vars(c)), tuple(vars(c).values())) for c in mro)
    known = _CLASS_DATA.get(cls)
    if known is not None and len(known[0]) == len(snapshot) and all(
            len(a[0]) == len(b[0]) and all(map(operator.is_, a[0], b[0])) and all(map(operator.is_, a[1], b[1]))
            for a, b in zip(known[0], snapshot)):
        return known[1]
    data = tuple((c, name) for c in mro for name, value in vars(c).items()
                 if not (name.startswith("__") or callable(value) or isinstance(
                     value, (property, staticmethod, classmethod, types.MemberDescriptorType,
                             types.GetSetDescriptorType)) or hasattr(value, "__get__")))
    _CLASS_DATA[cls] = (snapshot, data)
    return data


_NAMES_CACHE: dict[types.CodeType, tuple[str, ...]] = {}


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name a code object (and the code nested in it: comprehensions, inner functions) may read as a global
    (``co_names`` also holds attribute names: those that are not globals are skipped by the caller)."""
    names = _NAMES_CACHE.get(code)
    if names is None:
        found: dict[str, None] = {}
        stack = [code]
        while stack:
            c = stack.pop()
            found.update(dict.fromkeys(c.co_names))
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        names = _NAMES_CACHE[code] = tuple(found)
    return names


def fingerprint(*objs: Any) -> Hashable | None:
    """A hashable key of what tracing ``objs`` (functions, with what they capture) can read, with JAX's trace-time
    configuration; ``None`` when something reachable cannot be keyed (then trace)."""
    walk = _Fingerprinter()
    primitives = sys.modules.get("numpyro.primitives")  # effect handlers active around the trace (a user's ``with``)
    handlers = list(getattr(primitives, "_PYRO_STACK", ()))
    try:
        return (walk(objs), walk(handlers), _trace_context())
    except (Unfingerprintable, RecursionError):
        return None
