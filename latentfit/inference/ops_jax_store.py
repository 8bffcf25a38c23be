"""An on-disk store of traced programs: a fresh process with the persistent cache warm skips tracing and lowering.

The trace memo (:mod:`.ops_jax_memo`) lives in one process.  When JAX's persistent compilation cache is on
(:func:`latentfit.enable_compilation_cache`), :func:`latentfit.inference.ops_jax._program_for` also keeps each traced
program in ``<cache dir>/latentfit-traces/``, under a digest of the memo's key that is the same in every process
(:func:`stable_digest`): code objects by their bytecode, constants, names and nested code; arrays by shape, dtype and
a digest of their bytes; library functions, classes and C callables by module and qualified name; the user's classes
with their methods; JAX's trace-time configuration; plus the versions of Python, JAX, jaxlib, NumPy, NumPyro,
latentfit (and a digest of its source files) and of every library the key names, and the platform.  Anything without
such a name (an object known only by its address, a module of the user's, ...) makes the program *unstorable*: it is
traced as before.

An entry holds the program serialised by :mod:`jax.export` (StableHLO, no Python code), its captured constants (raw
bytes with dtype and shape), the output tree and the trace's side record, written as JSON.  Nothing is unpickled.  A
fresh process deserialises the program, lowers ``Exported.call`` (one primitive, no re-trace of the model) and
compiles it, which JAX's persistent cache serves.  The entry's bytes carry a BLAKE2 checksum: a truncated, corrupted
or foreign file (other versions) is ignored and the program traced again.  Writes go to a temporary file then
``os.replace`` (atomic); the folder is kept under :data:`STORE_BYTES` (least recently used files removed).

:func:`save_record` / :func:`load_record` keep other results in the same form (JSON and raw arrays, checksummed): the
traced adapter's analysis of a NumPyro model (unit maps, closed-form patterns, Gaussian faces), keyed like the programs
by a stable digest of the model's code, data and options, so a later process runs the model once instead of ~25 times
and skips ~55 of the ~90 small eager programs of that analysis.

:func:`save_executable` / :func:`load_executable` keep the compiled XLA executable of a stored program beside its entry,
under the digest of the exported program itself (:func:`program_digest`; ``<program>-<options>.lfx``), so that
entries of one program (the same code over other data or initial values: other keys, the same program with other
constants) share one executable: the bytes XLA's own ``serialize_executable`` gives (what JAX's persistent cache keeps),
plus a JSON header of the program's input and output avals and kept arguments.  A warm process then deserialises the
executable and calls it, without deserialising the exported program, lowering ``Exported.call`` to MLIR (whose first
call imports scipy's LAPACK bindings), hashing the module for JAX's cache key or reading JAX's cache.  What it trusts:
the entry's checksum, its key (the program's stable digest, the compiler options) and its environment (versions,
platform, device kind, the host CPU's feature flags) must match, else it is ignored and the program compiled as
before; nothing is unpickled, but the executable is native code that XLA loads, so the folder must be as trusted as
JAX's own cache folder (which holds the same bytes).

Read-ahead: a process that loads executables leaves a trail beside the first one it asked for
(``<first>.lfx.trail``, JSON: the names it loaded next, in order, at most :data:`TRAIL_LENGTH`).  The next process
that starts with the same executable hands that trail to a background thread, which reads, checks and deserialises
them (XLA releases the GIL) while the main thread works on, so that loading overlaps the fit instead of preceding
each program's first call; an executable asked for before the thread reached it is read by the caller, and a failed
one is read again (and refused) by the caller as without read-ahead.  ``LATENTFIT_READ_AHEAD=0`` switches it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
import tempfile
import types
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .ops_jax_memo import _Fingerprinter, _is_library_module, dtype_name

#: False: never read or write the store (the in-process memo and JAX's own cache still work)
ENABLED = True
#: most bytes the store's folder may hold; least recently used entries are removed beyond it
STORE_BYTES = 512 * 2**20
#: entries read from / written to disk in this process (tests and benchmarks read them)
STATS = {"loaded": 0, "saved": 0, "rejected": 0, "unstorable": 0, "records_loaded": 0, "records_saved": 0,
         "executables_loaded": 0, "executables_saved": 0, "executables_from_jax_cache": 0, "executables_read_ahead": 0,
         "exports_loaded": 0, "exports_saved": 0}
#: folder name under JAX's compilation cache directory
FOLDER = "latentfit-traces"
_MAGIC = b"LFTRACE\x01"
#: why a program was not stored or an entry not used (``logging.DEBUG``)
log = logging.getLogger("latentfit.trace_store")


_LEN = struct.Struct("<Q").pack


class Unstable(Exception):
    """A value of the memo's key that has no name valid in another process."""


def store_dir() -> Path | None:
    """``<jax_compilation_cache_dir>/latentfit-traces`` when the persistent cache is on and :data:`ENABLED`."""
    directory = jax.config.jax_compilation_cache_dir
    if not ENABLED or not directory or not _can_serialize():
        return None
    return Path(directory) / FOLDER


_SERIALIZABLE: list[bool] = []


def _can_serialize() -> bool:
    """``jax.export`` serialisation needs the ``flatbuffers`` package (a dependency of latentfit, optional for JAX)."""
    if not _SERIALIZABLE:
        import importlib.util

        _SERIALIZABLE.append(importlib.util.find_spec("flatbuffers") is not None)
    return _SERIALIZABLE[0]


# --- a key valid across processes -----------------------------------------------------------------------------------

_ENV: list[bytes] = []


#: file in the store folder keeping the last :func:`_source_digest` with the files' sizes and modification times
SOURCE_DIGEST_FILE = "latentfit-source.json"


def _source_digest() -> str:
    """A digest of latentfit's own source files (a version string does not change when a checkout is edited).  Kept in
    the store folder (:data:`SOURCE_DIGEST_FILE`) with every file's size and modification time in nanoseconds, and
    read back while they all match, as Python's bytecode cache trusts a source's size and time: a fresh process then
    reads the files' metadata, not their bytes (~1 against ~4 ms)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    files = []  # (relative path, path) of every .py file under the package, in path order (os.walk: ~4x pathlib's)
    for folder, _, names in os.walk(root):
        files += [(os.path.relpath(os.path.join(folder, name), root), os.path.join(folder, name))
                  for name in names if name.endswith(".py")]
    files.sort(key=lambda item: item[0].split(os.sep))
    stats: list[list[Any]] | None = []
    for rel, path in files:
        try:
            st = os.stat(path)
        except OSError:
            stats = None
            break
        stats.append([rel, st.st_size, st.st_mtime_ns])
    directory = store_dir()
    kept = None if directory is None or stats is None else directory / SOURCE_DIGEST_FILE
    record: Any = None
    if kept is not None:
        with contextlib.suppress(OSError, ValueError):  # absent or damaged: hash the files
            record = json.loads(kept.read_text())
    if isinstance(record, dict) and record.get("files") == stats and isinstance(record.get("digest"), str):
        return record["digest"]
    h = hashlib.blake2b(digest_size=16)
    for rel, path in files:
        h.update(rel.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    digest = h.hexdigest()
    if kept is not None:
        _replace(kept, json.dumps({"files": stats, "digest": digest}).encode())  # best effort
    return digest


def environment() -> bytes:
    """Versions and platform every entry is keyed on (computed once per process)."""
    if not _ENV:
        import jaxlib

        import latentfit

        backend = jax.default_backend()
        devices = jax.devices()
        parts = {"python": sys.version, "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
                 "numpyro": getattr(sys.modules.get("numpyro"), "__version__", None),
                 "latentfit": getattr(latentfit, "__version__", None), "latentfit_source": _source_digest(),
                 "backend": backend, "device_kind": devices[0].device_kind,
                 "platform_version": getattr(devices[0].client, "platform_version", ""),
                 "xla_flags": os.environ.get("XLA_FLAGS", "")}
        _ENV.append(json.dumps(parts, sort_keys=True).encode())
    return _ENV[0]


def _qualified(obj: Any) -> str:
    """``module:qualname`` of a library object that its module holds under that name (else :class:`Unstable`)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not module or not qualname or "<" in qualname:
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, types.ModuleType) and getattr(obj, "__name__", None):
            return f"{owner.__name__}:{obj.__name__}"
        raise Unstable(repr(obj)[:80])
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not obj and getattr(found, "__func__", None) is not obj:
        if not isinstance(obj, (types.BuiltinFunctionType, type)):  # builtins and classes: their names are theirs
            raise Unstable(f"{module}:{qualname}")
    return f"{module}:{qualname}"


#: what :meth:`_Stable.instance` fed for an object's fingerprint, by value: ``{fingerprint: (parts, packages named)}``
#: (the same model or engine is reached from every program of a fit; most of a key's nodes are such repeats)
_INSTANCES: dict[Hashable, tuple[tuple[bytes, ...], frozenset[str]]] = {}
#: most entries :data:`_INSTANCES` keeps (emptied when full)
INSTANCES_MAX = 4096


#: what :meth:`_Stable.put` feeds for None, True and False, and for a tuple's length
_CONSTANT_PARTS = {v: (b"S", _LEN(len(f"{type(v).__name__}:{v!r}")), f"{type(v).__name__}:{v!r}".encode())
                   for v in (None, True, False)}
_LEN_OF_LEN = _LEN(len(_LEN(0)))
_LEN_OF_DIGEST = _LEN(20)


class _Stable:
    """Feeds a memo key into a hash, every value by a name or content that is the same in another process."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.packages: set[str] = set()
        self.classes: dict[type, int] = {}
        self.objects: dict[int, tuple[bytes, ...]] = {}  # what each object's fields were fed as, by identity

    def put(self, tag: bytes, payload: bytes = b"") -> None:
        self.parts += (tag, _LEN(len(payload)), payload)

    def digest(self) -> bytes:
        return hashlib.blake2b(b"".join(self.parts), digest_size=20).digest()

    def name(self, obj: Any) -> None:
        qualified = _qualified(obj)
        self.packages.add(qualified.split(":")[0].split(".")[0])
        self.put(b"N", qualified.encode())

    def __call__(self, x: Any) -> None:  # noqa: C901 - one branch per kind of value, as in the fingerprint
        kind = type(x)
        # the commonest nodes first, written out (the same bytes as ``put``): strings, None and flags, ints, tuples
        if kind is str:
            payload = x.encode("utf-8", "surrogatepass")
            self.parts += (b"s", _LEN(len(payload)), payload)
            return
        if x is None or kind is bool:
            self.parts += _CONSTANT_PARTS[x]
            return
        if kind is int:
            payload = f"int:{x!r}".encode()
            self.parts += (b"S", _LEN(len(payload)), payload)
            return
        if kind is tuple and (not x or type(x[0]) is not str or x[0] not in ("module", "instance", "set", "frozenset")):
            self.parts += (b"(", _LEN_OF_LEN, _LEN(len(x)))
            for v in x:
                self(v)
            return
        if kind is tuple and len(x) == 2 and x[0] == "module" and type(x[1]) is str:  # a module, by its name
            self.module(x[1])
        elif kind is tuple and len(x) == 4 and type(x[0]) is str and x[0] == "instance":  # an object's fields
            self.instance(x)
        elif kind is tuple and not (len(x) == 2 and x[0] in ("set", "frozenset") and type(x[1]) is tuple):
            self.put(b"(", _LEN(len(x)))
            for v in x:
                self(v)
        elif x is None or isinstance(x, (bool, int, bytes, complex)) or x is Ellipsis:
            self.put(b"S", f"{type(x).__name__}:{x!r}".encode())
        elif isinstance(x, float):
            self.put(b"F", x.hex().encode())
        elif type(x) is tuple and len(x) == 2 and x[0] in ("set", "frozenset") and type(x[1]) is tuple:
            self(frozenset(x[1]))  # a set's fingerprint: its iteration order (of strings) differs between processes
        elif kind is list:
            self.put(b"[", str(len(x)).encode())
            for v in x:
                self(v)
        elif isinstance(x, (frozenset, set)):  # code constants (``in {...}``): order-free
            parts = []
            for v in x:
                sub = _Stable()
                sub(v)
                parts.append(sub.digest())
            self.put(b"{", b"".join(sorted(parts)))
        elif isinstance(x, types.CodeType):
            self.code(x)
        elif isinstance(x, type):
            self.cls(x)
        elif isinstance(x, types.FunctionType):
            if not _is_library_module(x.__globals__.get("__name__")):
                raise Unstable("a function by identity")
            self.name(x)
        elif isinstance(x, types.ModuleType):
            self.module(x.__name__)
        elif isinstance(x, jax.tree_util.PyTreeDef):
            text = str(x)
            if " at 0x" in text:
                raise Unstable(text[:80])
            self.put(b"T", text.encode())
        elif isinstance(x, np.dtype):
            self.put(b"D", dtype_name(x).encode())
        elif hasattr(x, "axis_sizes") and hasattr(x, "spmd_axis_names"):  # JAX's AxisEnv (trace context)
            self.put(b"A", repr((sorted(dict(x.axis_sizes).items()), sorted(x.spmd_axis_names),
                                 sorted(x.explicit_mesh_axis_names))).encode())
        elif hasattr(x, "name") and hasattr(type(x), "__members__"):  # an enum member
            self.name(type(x))
            self.put(b"E", str(x.name).encode())
        elif isinstance(x, jax.Device):
            self.put(b"V", f"{x.platform}:{x.id}:{x.device_kind}".encode())
        elif isinstance(x, jax.sharding.Sharding):
            text = repr(x)
            if "0x" in text:
                raise Unstable(text[:80])
            self.put(b"H", text.encode())
        elif type(x) is object:  # a sentinel: its place in the key names it
            self.put(b"O")
        elif callable(x):  # a library's C callable (ufunc, jit-compiled function, builtin)
            self.name(x)
        else:
            raise Unstable(type(x).__qualname__)

    def instance(self, x: tuple) -> None:
        """An object's fingerprint ``("instance", class, fields, slots)``, fed as the digest of its walk (a Merkle
        tree: ``b"I"`` and 20 bytes).  The fingerprint keys an object met twice by one tuple, so a key is a graph that
        shares its objects; an object is walked once per key (:attr:`objects`) and, across the keys of a process, once
        per value: its digest depends on its value alone while no user class has been numbered (:meth:`cls`), so a
        later equal fingerprint (the model, the engine, reached from every program of a fit) is fed from
        :data:`_INSTANCES`.  Equal values are those the trace memo (``ops_jax._TRACES``) already takes for one
        another."""
        fed = self.objects.get(id(x))
        if fed is not None:
            self.parts += fed
            return
        numbered = bool(self.classes)
        try:
            hit = None if numbered else _INSTANCES.get(x)
            hashable = True
        except TypeError:  # an unhashable value inside: walk it
            hit, hashable = None, False
        if hit is not None:
            fed, named = hit
        else:
            outer_parts, outer_packages = self.parts, self.packages
            self.parts, self.packages = [], set()
            self.put(b"(", _LEN(len(x)))
            for v in x:
                self(v)
            mine, named = self.parts, self.packages
            self.parts, self.packages = outer_parts, outer_packages
            fed = (b"I", _LEN_OF_DIGEST, hashlib.blake2b(b"".join(mine), digest_size=20).digest())
            if hashable and not numbered and not self.classes:
                if len(_INSTANCES) >= INSTANCES_MAX:
                    _INSTANCES.clear()
                _INSTANCES[x] = (fed, frozenset(named))
        self.objects[id(x)] = fed
        self.parts += fed
        self.packages |= named

    def module(self, name: str) -> None:
        """A module by its name: a library's or latentfit's (the user's: its functions are not in the key)."""
        if not (_is_library_module(name) or name.split(".")[0] == "latentfit"):
            raise Unstable(f"module {name}")
        self.packages.add(name.split(".")[0])
        self.put(b"M", name.encode())

    def code(self, c: types.CodeType) -> None:
        self.put(b"C", repr((c.co_name, c.co_argcount, c.co_posonlyargcount, c.co_kwonlyargcount, c.co_flags,
                             c.co_names, c.co_varnames, c.co_freevars, c.co_cellvars)).encode() + c.co_code)
        self(tuple(c.co_consts))

    def cls(self, cls: type) -> None:
        """A library class by name; the project's by name (its source is in :func:`environment`); the user's by name
        and its methods (their code and what they capture: a method edited between runs is another key)."""
        if _is_library_module(cls.__module__) or cls.__module__ == "builtins":
            self.name(cls)
            return
        self.put(b"K", f"{cls.__module__}:{cls.__qualname__}".encode())
        if cls.__module__.split(".")[0] == "latentfit":
            return
        if cls in self.classes:
            self.put(b"R", str(self.classes[cls]).encode())
            return
        self.classes[cls] = len(self.classes)
        for c in cls.__mro__:
            if _is_library_module(c.__module__) or c.__module__ in ("builtins",) \
                    or c.__module__.split(".")[0] == "latentfit":
                continue
            for name, value in vars(c).items():
                if name in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__") \
                        or name.startswith("__dataclass"):
                    continue
                self.put(b"m", name.encode())
                walk = _Fingerprinter()
                try:
                    self(walk(value))
                except Exception as exc:  # noqa: BLE001 - anything the fingerprint cannot key
                    raise Unstable(f"{cls.__qualname__}.{name}") from exc


def stable_digest(key: Hashable) -> str | None:
    """A hex digest of a memo key (with :func:`environment` and the versions of the libraries it names), the same in
    every process; None when some part of it has no such name."""
    walk = _Stable()
    try:
        walk(key)
    except (Unstable, RecursionError) as exc:
        STATS["unstorable"] += 1
        log.debug("not stored (no stable key): %r", exc)
        return None
    for package in sorted(walk.packages):
        mod = sys.modules.get(package)
        walk.put(b"P", f"{package}={getattr(mod, '__version__', '')}".encode())
    walk.put(b"env", environment())
    return walk.digest().hex()


def program_digest(exported: bytes) -> str:
    """A hex digest of a serialised exported program and :func:`environment` (the name of its executable in the
    store): the same for every entry whose trace gave the same program, whatever its key (its constants are
    arguments); another environment (a version of latentfit or JAX) names its executables apart."""
    return hashlib.blake2b(environment() + b"\0" + bytes(exported), digest_size=20).hexdigest()


# --- trees and records as JSON --------------------------------------------------------------------------------------

def _type_name(cls: type) -> str:
    if cls in (tuple, list, dict, type(None)):
        return cls.__name__
    name = f"{cls.__module__}:{cls.__qualname__}"
    if "<" in cls.__qualname__ or _resolve(name) is not cls:
        raise Unstable(name)
    return name


def _resolve(name: str) -> Any:
    builtin = {"tuple": tuple, "list": list, "dict": dict, "NoneType": type(None)}
    if name in builtin:
        return builtin[name]
    module, qualname = name.split(":")
    found: Any = sys.modules.get(module)  # only a module already imported: loading an entry imports nothing
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type):
        raise Unstable(name)
    return found


def _json_key(k: Any) -> Any:
    if isinstance(k, (str, int)) and not isinstance(k, bool):
        return [type(k).__name__, k]
    raise Unstable(f"dict key {k!r}")


def _from_json_key(k: Any) -> Any:
    return {"str": str, "int": int}[k[0]](k[1])


def treedef_to_json(tree: Any) -> Any:
    """A PyTreeDef of tuples, lists, dicts (str/int keys), None and named tuples as JSON."""
    data = tree.node_data()
    if data is None:
        return "*"
    cls, aux = data
    if cls is dict:
        aux = [_json_key(k) for k in aux]
    elif aux is not None and not (hasattr(cls, "_fields") and issubclass(cls, tuple)):
        raise Unstable(f"node {cls}")
    return [_type_name(cls), aux, [treedef_to_json(c) for c in tree.children()]]


def treedef_from_json(obj: Any) -> Any:
    from jax._src.tree_util import default_registry

    if obj == "*":
        return jax.tree_util.tree_structure(0)
    name, aux, children = obj
    cls = _resolve(name)
    if cls is dict:
        aux = [_from_json_key(k) for k in aux]
    return jax.tree_util.PyTreeDef.from_node_data_and_children(default_registry, (cls, aux),
                                                              [treedef_from_json(c) for c in children])


def record_to_json(x: Any) -> Any:
    """A skeleton (dicts, lists, tuples, named tuples, None leaves; :func:`.ops_jax._skeleton`) as JSON."""
    if x is None:
        return None
    if isinstance(x, dict) and type(x) is dict:
        return {"dict": [[_json_key(k), record_to_json(v)] for k, v in x.items()]}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {"record": _type_name(type(x)), "items": [record_to_json(v) for v in x]}
    if type(x) in (list, tuple):
        return {type(x).__name__: [record_to_json(v) for v in x]}
    raise Unstable(f"record {type(x)}")


def record_from_json(x: Any) -> Any:
    if x is None:
        return None
    if "dict" in x:
        return {_from_json_key(k): record_from_json(v) for k, v in x["dict"]}
    if "record" in x:
        return _resolve(x["record"])(*(record_from_json(v) for v in x["items"]))
    if "list" in x:
        return [record_from_json(v) for v in x["list"]]
    return tuple(record_from_json(v) for v in x["tuple"])


# --- entries ---------------------------------------------------------------------------------------------------------

def _const_header(c: Any) -> dict[str, Any]:
    dtype = np.dtype(c.dtype) if not str(c.dtype).startswith("key<") else None
    if dtype is None or dtype.kind == "O" or bool(getattr(c, "weak_type", False)):
        raise Unstable(f"constant of dtype {c.dtype}")
    return {"dtype": str(dtype), "shape": list(np.shape(c))}


def save(digest: str, exported_bytes: bytes, consts: tuple[Any, ...], out_tree: Any, side: dict[str, Any]) -> bool:
    """Write an entry (atomically); False when part of it cannot be written (the program stays in memory only)."""
    directory = store_dir()
    if directory is None:
        return False
    try:
        header = {"digest": digest, "env": _environment_tag(),
                  "out_tree": treedef_to_json(out_tree), "side": {k: record_to_json(v) for k, v in side.items()},
                  "consts": [_const_header(c) for c in consts], "exported": len(exported_bytes)}
        blobs = [bytes(exported_bytes)] + [np.ascontiguousarray(np.asarray(c)).tobytes() for c in consts]
    except Unstable as exc:
        STATS["unstorable"] += 1
        log.debug("not stored: %r", exc)
        return False
    header["sizes"] = [len(b) for b in blobs]
    if not _write_entry(directory / f"{digest}.lft", json.dumps(header).encode(), blobs):
        return False
    STATS["saved"] += 1
    _trim(directory)
    return True


def save_export(key: str, exported_bytes: bytes) -> bool:
    """Keep a serialised exported program under ``key`` (:func:`stable_digest` of the traced program's text and avals,
    ``<key>.lfp``), so that another entry's trace of the same program (other data, other initial values) takes it
    instead of lowering the program again (:func:`load_export`); False when it cannot be written."""
    directory = store_dir()
    if directory is None:
        return False
    header = {"digest": key, "env": _environment_tag(), "exported": len(exported_bytes)}
    if not _write_entry(directory / f"{key}.lfp", json.dumps(header).encode(), [bytes(exported_bytes)]):
        return False
    STATS["exports_saved"] += 1
    _trim(directory)
    return True


def load_export(key: str) -> bytes | None:
    """The exported program :func:`save_export` kept under ``key``, or None (absent, damaged, foreign: lowered
    again)."""

    def exported(header: dict[str, Any], body: bytes, offset: int) -> bytes:
        if len(body) - offset != header["exported"]:
            raise ValueError("size")
        return body[offset:]

    return _load_checked(f"{key}.lfp", key, exported, "exports_loaded")


def _load_checked(name: str, digest: str, parse: Callable[[dict[str, Any], bytes, int], Any], counter: str) -> Any:
    """``parse(header, body, offset)`` of the store's entry ``name`` (checked: :func:`_read_entry`), counted in
    ``STATS[counter]``; None when it is absent or unreadable (counted as rejected: the caller computes it again)."""
    path, data = _entry_bytes(name)
    if data is None:
        return None
    try:
        header, body, offset = _read_entry(data, digest)
        out = parse(header, body, offset)
    except Exception as exc:  # noqa: BLE001 - any unreadable entry: computed again
        STATS["rejected"] += 1
        log.debug("entry %s ignored: %r", name, exc)
        return None
    _touch(path)
    STATS[counter] += 1
    return out


def _environment_tag() -> str:
    """What an entry's header records of :func:`environment` (an entry from another one is foreign)."""
    return hashlib.blake2b(environment(), digest_size=16).hexdigest()


def _write_entry(path: Path, head: bytes, blobs: list[bytes]) -> bool:
    """Write ``magic | BLAKE2(body) | body``, ``body = len(head) | head | blobs``, to ``path`` atomically (a temporary
    file, then ``os.replace``); False when it is too large for the store or cannot be written."""
    body = struct.pack("<Q", len(head)) + head + b"".join(blobs)
    payload = _MAGIC + hashlib.blake2b(body, digest_size=32).digest() + body
    if len(payload) > STORE_BYTES // 4:
        return False
    return _replace(path, payload)


def _replace(path: Path, payload: bytes) -> bool:
    """Write ``payload`` to ``path`` atomically (a temporary file beside it, then ``os.replace``): a reader sees the
    old file or the new one, never a part; False when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def _read_entry(data: bytes, digest: str) -> tuple[dict[str, Any], bytes, int]:
    """``(header, body, offset of the first blob)`` of an entry's bytes, checked (magic, checksum, the key and the
    environment); ValueError when any check fails."""
    if data[:len(_MAGIC)] != _MAGIC:
        raise ValueError("not an entry")
    check, body = data[len(_MAGIC):len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
    if hashlib.blake2b(body, digest_size=32).digest() != check:
        raise ValueError("checksum")
    (size,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + size])
    if header["digest"] != digest or header["env"] != _environment_tag():
        raise ValueError("another key or environment")
    return header, body, 8 + size


def _entry_bytes(name: str) -> tuple[Path | None, bytes | None]:
    """The path and bytes of the store's entry ``name``; ``(None, None)`` without a store, ``(path, None)`` when it
    cannot be read (absent)."""
    directory = store_dir()
    if directory is None:
        return None, None
    path = directory / name
    try:
        return path, path.read_bytes()
    except OSError:
        return path, None


def _touch(path: Path) -> None:
    """Mark an entry recently used (for :func:`_trim`); best effort: a read-only folder only ages the entry."""
    try:
        os.utime(path)
    except OSError:
        return


def load(digest: str, deserialize: bool = True) -> tuple[Any, tuple[Any, ...], Any, dict[str, Any]] | None:
    """``(exported, consts, out_tree, side)`` of an entry, or None (absent, truncated, corrupted, foreign);
    ``deserialize=False``: ``exported`` is the serialised program's bytes (for :func:`jax.export.deserialize`)."""
    path, data = _entry_bytes(f"{digest}.lft")
    if data is None:
        return None
    try:
        header, body, offset = _read_entry(data, digest)
        blobs = []
        for n in header["sizes"]:
            blobs.append(body[offset:offset + n])
            offset += n
        if offset != len(body) or len(blobs) != len(header["consts"]) + 1:
            raise ValueError("sizes")
        exported = jax.export.deserialize(bytearray(blobs[0])) if deserialize else blobs[0]
        # one batched transfer (~0.05 instead of ~0.1 ms an array: a program's constants are a few small arrays)
        consts = tuple(jax.device_put([np.frombuffer(b, dtype=np.dtype(h["dtype"])).reshape(h["shape"])
                                       for b, h in zip(blobs[1:], header["consts"])]))
        out_tree = treedef_from_json(header["out_tree"])
        side = {k: record_from_json(v) for k, v in header["side"].items()}
    except Exception as exc:  # noqa: BLE001 - any unreadable entry: trace instead
        STATS["rejected"] += 1
        log.debug("entry %s ignored: %r", path.name, exc)
        return None
    _touch(path)
    STATS["loaded"] += 1
    return exported, consts, out_tree, side


# --- compiled executables --------------------------------------------------------------------------------------------

_HOST: list[str] = []


def _host_tag() -> str:
    """The host CPU's model and feature flags (XLA:CPU compiles for the host: an executable built on a CPU with other
    instructions must not run here); computed once per process.  ``platform.processor()`` (which runs ``uname -p``
    in a subprocess on Linux, ~10 ms) only where ``/proc/cpuinfo`` cannot be read."""
    if not _HOST:
        import platform

        text = platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(("flags", "model name", "Features", "CPU part")):
                        text += line
                    elif not line.strip() and len(text) > 64:  # the first processor's block is enough
                        break
        except OSError:
            pass
        if len(text) <= len(platform.machine()):
            text += platform.processor()
        _HOST.append(hashlib.blake2b(text.encode(), digest_size=16).hexdigest())
    return _HOST[0]


def _options_tag(options: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(options, sort_keys=True).encode(), digest_size=8).hexdigest()


def _aval_json(aval: Any) -> list[Any]:
    return [list(aval.shape), str(np.dtype(aval.dtype)), bool(aval.weak_type)]


def save_executable(digest: str, options: dict[str, Any], compiled: Any) -> bool:
    """Keep ``compiled`` (a ``jax.stages.Compiled`` of a stored program, compiled with ``options``) under ``digest``;
    False (nothing written) for what a later process could not call as this one does: several devices, effects, host
    callbacks, mutable arrays, non-default layouts, an executable XLA cannot serialise."""
    directory = store_dir()
    if directory is None:
        return False
    try:
        from jax.sharding import SingleDeviceSharding

        unloaded = compiled._executable._unloaded_executable
        device = jax.devices()[0]
        if (tuple(unloaded.device_list) != (device,) or unloaded.unordered_effects or unloaded.ordered_effects
                or unloaded.host_callbacks or unloaded.mut is not None or unloaded.pgle_profiler is not None
                or any(x is not None for x in unloaded.dispatch_in_layouts)
                or not all(isinstance(s, SingleDeviceSharding) and s._device == device
                           for s in (*unloaded.input_shardings, *unloaded.output_shardings))):
            raise Unstable("not a plain single-device executable")
        for aval, layout in zip((*unloaded.input_avals, *unloaded.output_avals),
                                (*unloaded.xla_in_layouts, *unloaded.xla_out_layouts)):
            if layout is not None and tuple(layout.major_to_minor) != tuple(range(len(aval.shape))):
                raise Unstable("a non-default layout")
        import re

        targets = set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text() or ""))
        if any(not t.startswith("lapack_") for t in targets):  # a handler this module does not know how to set up
            raise Unstable(f"custom calls {sorted(targets)}")
        header = {"digest": digest, "env": _environment_tag(), "host": _host_tag(), "options": options,
                  "lapack": bool(targets),
                  "platform": device.platform, "device_kind": device.device_kind,
                  "num_args": len(unloaded.all_args_info.in_avals) if unloaded.all_args_info is not None else None,
                  "kept": sorted(int(i) for i in unloaded.kept_var_idx),
                  "inputs": [_aval_json(a) for a in unloaded.input_avals],
                  "outputs": [_aval_json(a) for a in unloaded.output_avals],
                  "committed": bool(unloaded.committed), "name": str(unloaded.name)}
        if header["num_args"] is None:
            raise Unstable("no argument record")
        blob = bytes(device.client.serialize_executable(unloaded.xla_executable))
    except Exception as exc:  # noqa: BLE001 - anything this JAX does not offer: JAX's own cache serves it
        STATS["unstorable"] += 1
        log.debug("executable not stored: %r", exc)
        return False
    head = json.dumps(header).encode()
    if not _write_entry(directory / f"{digest}-{_options_tag(options)}.lfx", head, [blob]):
        return False
    STATS["executables_saved"] += 1
    _trim(directory)
    return True


#: the canonical dtype's name of an argument's dtype, by (dtype, x64 enabled) (:func:`_arg_key`)
_ARG_DTYPES: dict[tuple[Any, bool], str] = {}


def _arg_key(x: Any) -> tuple[tuple[int, ...], str]:
    """An argument's shape and dtype as the executable takes it (JAX's canonical dtype: float32 without x64).  An
    array's own ``dtype`` and ``shape`` are read and the dtype's canonical name memoised: every call of a stored
    executable checks each argument (~30 a chunk of iterations), and ``np.result_type`` of a JAX array goes through
    its deprecated dtype conversion (a warning filter each time)."""
    dtype, shape = getattr(x, "dtype", None), getattr(x, "shape", None)
    if not isinstance(dtype, np.dtype) or not isinstance(shape, tuple):  # a Python scalar, a typed key, ...
        return tuple(np.shape(x)), str(jax.dtypes.canonicalize_dtype(np.result_type(x)))
    memo = (dtype, bool(jax.config.jax_enable_x64))
    name = _ARG_DTYPES.get(memo)
    if name is None:
        name = _ARG_DTYPES[memo] = str(jax.dtypes.canonicalize_dtype(dtype))
    return shape, name


class StoredExecutable:
    """A deserialised executable called as ``jax.stages.Compiled`` is (``(consts, *flat)`` in, its flat outputs out),
    through JAX's own dispatch of one device's executable (argument transfer, result arrays)."""

    def __init__(self, call: Any, num_args: int, kept: list[int], inputs: list[tuple[tuple[int, ...], str]],
                 num_outputs: int) -> None:
        self._call, self.num_args, self.kept, self.inputs, self.num_outputs = call, num_args, kept, inputs, num_outputs

    def __call__(self, consts: tuple[Any, ...], *flat: Any) -> list[Any]:
        args = (*consts, *flat)
        if len(args) != self.num_args \
                or any(_arg_key(args[i]) != expected for i, expected in zip(self.kept, self.inputs)):
            raise TypeError("arguments that do not match the stored executable's")
        return self._call(*args)


def discard_executable(digest: str, options: dict[str, Any]) -> None:
    """Remove the executable kept under ``digest`` and ``options`` (best effort: one that failed to run)."""
    directory = store_dir()
    if directory is not None:
        try:
            (directory / f"{digest}-{_options_tag(options)}.lfx").unlink()
        except OSError:
            pass


# --- read-ahead: the executables a process loaded after its first one, deserialised beside the main thread -----------

#: deserialise, in a background thread, the executables that the last process starting with the same executable
#: loaded next (:func:`_read_ahead`); False (or ``LATENTFIT_READ_AHEAD=0``): each is read when it is asked for
READ_AHEAD = os.environ.get("LATENTFIT_READ_AHEAD", "1") != "0"
#: most executables a trail names (the first ones a process loaded after its first)
TRAIL_LENGTH = 24


class _ReadAhead:
    """One daemon thread deserialising the entries of a trail (``<first>.trail``: the ``.lfx`` names the last process
    that began with the executable ``<first>`` loaded after it, in order), so that their XLA deserialisation (~0.01-0.07
    s of CPU each, the GIL released) overlaps the main thread's work; :meth:`take` hands one over (or None: not read
    ahead, or failed: the caller reads it itself).  The process's own trail is written at exit when it differs."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self.first: str | None = None
        self.trail: list[str] = []  # the .lfx names this process loaded, in order
        self.read: list[str] = []  # the trail read at the first load
        self.pending: list[str] = []  # names still to be read by the thread, in order
        self.ready: dict[str, Any] = {}  # name -> (path, data, header, offset, executable) or None (failed)
        self.busy: str | None = None
        self.stop = False

    def start(self, first: str, directory: Path, device: Any) -> None:
        """Called at the process's first load (``first``): read its trail and start the thread on it."""
        import atexit
        import threading

        self.first = first
        try:
            names = json.loads((directory / f"{first}.trail").read_text())
            self.read = [str(n) for n in names if isinstance(n, str) and n.endswith(".lfx")][:TRAIL_LENGTH]
        except (OSError, ValueError):
            self.read = []
        atexit.register(self.close, directory)
        # in the order the last process asked for them (the chunk of iterations, the largest program, comes right
        # after a fit's first executable; then the post-fit programs as they are called): the largest first read the
        # importance-sampling program before the standard errors', which a fit's SEs, asked for first, then read on
        # the main thread beside the thread's work (end to end ~0.167 -> ~0.159 s).  An entry asked for before the
        # thread reached it is read by the caller (:meth:`take`)
        self.pending = [n for n in self.read if n != first and (directory / n).is_file()]
        if len(self.pending) > 1:  # the larger of the first two first: a compiled fit asks for its chunk's draws
            # (a small program) right before the chunk's loop (the largest): the main thread reads the draws' program
            # itself while this thread reads the loop's (:class:`.ops_jax._DrawsThenLoop`)
            try:
                sizes = [(directory / n).stat().st_size for n in self.pending[:2]]
            except OSError:
                sizes = [0, 0]
            if sizes[1] > sizes[0]:
                self.pending[:2] = self.pending[1::-1]
        if self.pending:
            threading.Thread(target=self._work, args=(directory, device), name="latentfit-read-ahead",
                             daemon=True).start()

    def _work(self, directory: Path, device: Any) -> None:
        from jax._src.lib import xla_client as xc

        while True:
            with self.lock:
                if self.stop or not self.pending:
                    self.busy = None
                    self.done.notify_all()
                    return
                name = self.busy = self.pending.pop(0)
            found = None
            try:
                path = directory / name
                data = path.read_bytes()
                header, body, offset = _read_entry(data, name.split("-")[0])
                if not header["lapack"]:  # LAPACK's handlers are set up on the main thread (load_executable)
                    executable = device.client.deserialize_executable(body[offset:], xc.DeviceList((device,)), None)
                    found = (path, data, header, body, offset, executable)
            except Exception as exc:  # noqa: BLE001 - the main thread reads it itself
                log.debug("read-ahead of %s failed: %r", name, exc)
            with self.lock:
                self.ready[name] = found
                self.busy = None
                self.done.notify_all()

    def take(self, name: str) -> Any:
        """The entry ``name`` read ahead (waiting while the thread reads it), or None (not on the trail, failed)."""
        with self.lock:
            if name in self.pending:  # asked for before the thread reached it: the caller reads it now
                self.pending.remove(name)
                return None
            while self.busy == name:
                self.done.wait()
            return self.ready.pop(name, None)

    def note(self, name: str) -> None:
        if len(self.trail) <= TRAIL_LENGTH and name not in self.trail:
            self.trail.append(name)

    def forget(self) -> None:
        """In a forked child: the thread is not there (and may have held the lock): nothing to wait for or write."""
        import threading

        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self.first, self.busy, self.stop, self.pending, self.ready = None, None, True, [], {}

    def close(self, directory: Path) -> None:
        """At exit: stop the thread (after the entry it is reading) and keep this process's trail if it changed."""
        with self.lock:
            self.stop = True
            self.pending.clear()
            while self.busy is not None:
                self.done.wait()
            self.ready.clear()
        trail = [n for n in self.trail[1:] if n != self.first][:TRAIL_LENGTH]
        if self.first is not None and trail and trail != self.read:
            _replace(directory / f"{self.first}.trail", json.dumps(trail).encode())  # best effort


_AHEAD: list[_ReadAhead] = []


def _forget_read_ahead() -> None:
    for ahead in _AHEAD:
        ahead.forget()
    _AHEAD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_read_ahead)


def _read_ahead(name: str, device: Any) -> Any:
    """The entry ``name`` if the read-ahead thread has it (None otherwise); at the process's first load, start the
    thread on that executable's trail.  Every name asked for is noted in this process's trail."""
    directory = store_dir()
    if directory is None or not READ_AHEAD:
        return None
    if not _AHEAD:
        _AHEAD.append(_ReadAhead())
        _AHEAD[0].note(name)
        _AHEAD[0].start(name, directory, device)
        return None
    ahead = _AHEAD[0]
    ahead.note(name)
    return ahead.take(name)


def load_executable(digest: str, options: dict[str, Any], args: list[Any],
                    num_outputs: int) -> StoredExecutable | None:
    """The executable :func:`save_executable` kept under ``digest`` and ``options``, ready to call on ``args`` (the
    program's flat arguments) for ``num_outputs`` outputs, or None (absent, truncated, corrupted, foreign, or not
    matching).  Read ahead by a background thread where the last process that began as this one did loaded it
    (:class:`_ReadAhead`)."""
    name = f"{digest}-{_options_tag(options)}.lfx"
    device = jax.devices()[0]
    ahead = _read_ahead(name, device)
    if ahead is not None:
        path, data, header, body, offset, executable = ahead
        STATS["executables_read_ahead"] += 1
    else:
        path, data = _entry_bytes(name)
        executable = None
    if data is None:
        return None
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import pxla
        from jax._src.lib import xla_client as xc
        from jax.sharding import SingleDeviceSharding

        if executable is None:
            header, body, offset = _read_entry(data, digest)
        if header["host"] != _host_tag() or header["options"] != options or header["platform"] != device.platform \
                or header["device_kind"] != device.device_kind or header["num_args"] != len(args) \
                or len(header["outputs"]) != num_outputs:
            raise ValueError("another host, device or compiler options")
        inputs = [(tuple(shape), dtype) for shape, dtype, _ in header["inputs"]]
        kept = [int(i) for i in header["kept"]]
        if len(kept) != len(inputs) or any(_arg_key(args[i]) != inputs[j] for j, i in enumerate(kept)):
            raise ValueError("arguments that do not match")
        for a in args:
            if isinstance(a, jax.Array) and a.devices() != {device}:
                raise ValueError("an argument on another device")
        if header["lapack"]:  # its LAPACK kernels' handlers (scipy's), as lowering a program that calls them sets up
            from jax._src.lax import linalg

            linalg.initialize_lapack()
        devices = xc.DeviceList((device,))
        if executable is None:
            executable = device.client.deserialize_executable(body[offset:], devices, None)

        def avals(rows: list[Any]) -> list[Any]:
            return [jax_core.ShapedArray(tuple(shape), np.dtype(dtype), weak_type=weak) for shape, dtype, weak in rows]

        sharding = SingleDeviceSharding(device)
        in_avals, out_avals = avals(header["inputs"]), avals(header["outputs"])
        unloaded = pxla.UnloadedMeshExecutable(
            xla_executable=executable, device_list=devices, backend=device.client, input_avals=in_avals,
            input_shardings=[sharding] * len(in_avals), output_avals=out_avals,
            output_shardings=[sharding] * len(out_avals), committed=bool(header["committed"]),
            name=str(header["name"]), unordered_effects=[], ordered_effects=[], keepalive=[], host_callbacks=[],
            kept_var_idx=set(kept), mut=None, xla_in_layouts=[None] * len(in_avals),
            dispatch_in_layouts=[None] * len(in_avals), xla_out_layouts=[None] * len(out_avals), all_args_info=None,
            pgle_profiler=None)
        call = unloaded.build_unsafe_call()
    except Exception as exc:  # noqa: BLE001 - any unusable executable: compile as before
        STATS["rejected"] += 1
        log.debug("executable %s ignored: %r", path.name, exc)
        return None
    _touch(path)
    STATS["executables_loaded"] += 1
    return StoredExecutable(call, len(args), kept, inputs, num_outputs)


def save_record(digest: str, record: Any, arrays: dict[str, np.ndarray]) -> bool:
    """Write a record (JSON-able ``record`` and named numpy ``arrays``: e.g. an adapter's analysis of a model) under
    ``digest`` (from :func:`stable_digest`), atomically and with a checksum as the programs' entries; False when it
    cannot be written."""
    directory = store_dir()
    if directory is None:
        return False
    try:
        names = sorted(arrays)
        blobs = [np.ascontiguousarray(arrays[n]) for n in names]
        for b in blobs:
            if b.dtype.kind not in "biuf":
                raise Unstable(f"array of dtype {b.dtype}")
        header = {"digest": digest, "env": _environment_tag(),
                  "record": record,
                  "arrays": [[n, str(b.dtype), list(b.shape), b.nbytes] for n, b in zip(names, blobs)]}
        head = json.dumps(header).encode()
    except (Unstable, TypeError, ValueError) as exc:
        STATS["unstorable"] += 1
        log.debug("record not stored: %r", exc)
        return False
    if not _write_entry(directory / f"{digest}.lfr", head, [b.tobytes() for b in blobs]):
        return False
    STATS["records_saved"] += 1
    _trim(directory)
    return True


def load_record(digest: str) -> tuple[Any, dict[str, np.ndarray]] | None:
    """``(record, arrays)`` written by :func:`save_record`, or None (absent, truncated, corrupted, foreign: analysed
    again)."""

    def record(header: dict[str, Any], body: bytes, offset: int) -> tuple[Any, dict[str, np.ndarray]]:
        arrays = {}
        for name, dtype, shape, nbytes in header["arrays"]:
            arrays[name] = np.frombuffer(body[offset:offset + nbytes], dtype=np.dtype(dtype)).reshape(shape).copy()
            offset += nbytes
        if offset != len(body):
            raise ValueError("sizes")
        return header["record"], arrays

    return _load_checked(f"{digest}.lfr", digest, record, "records_loaded")


def _trim(directory: Path) -> None:
    """Remove the least recently used entries until the folder holds at most :data:`STORE_BYTES`."""
    try:
        entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in directory.glob("*.lf[prtx]")]
    except OSError:
        return
    with contextlib.suppress(OSError):  # the read-ahead trails of executables no longer kept (best effort)
        for trail in directory.glob("*.lfx.trail"):
            if not trail.with_suffix("").exists():
                trail.unlink()
    total = sum(s for _, s, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= STORE_BYTES:
            break
        try:
            path.unlink()
            total -= size
        except OSError:
            pass


__all__ = ["ENABLED", "STATS", "STORE_BYTES", "StoredExecutable", "discard_executable", "load", "load_executable",
           "load_export", "load_record", "program_digest", "save", "save_executable", "save_export", "save_record",
           "stable_digest", "store_dir"]
