"""NumPyro's side of the traced adapter: how to run, vectorise and differentiate a NumPyro model.

:class:`NumPyroLatentModel` is :class:`~latentfit.integrations.traced.TracedLatentModel` with the
NumPyro tracing interface :class:`NumPyroPPL`: the model runs under ``handlers.substitute`` (θ) and
``handlers.condition`` (latents); chains are vectorised with ``jax.vmap``, so every density evaluation
is a pure JAX function of ``(θ, z)`` and the engines' steps compile with ``jax.jit``.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as ndist
from numpyro import handlers, validation_enabled
from numpyro.distributions import constraints
from numpyro.distributions.transforms import ExpTransform, biject_to
from numpyro.primitives import Messenger

from latentfit.inference import ops_jax_store as _store
from latentfit.inference.ops_jax import JaxOps, SharedJit, default_float_dtype, run_traced
from latentfit.inference.ops_jax_memo import fingerprint
from latentfit.integrations.enumerated import EnumeratedLatentModel
from latentfit.integrations.traced import PPL, Frame, Site, TracedLatentModel

#: the suffix ``numpyro.contrib.module`` gives the param of a module's weights (``"net$params"``)
_MODULE_SUFFIX = "$params"
#: pytree-valued params (``numpyro.contrib.module``'s ``"net$params"``): name -> (leaf names, tree structure)
_PYTREE_PARAMS: dict[str, tuple[tuple[str, ...], Any]] = {}


def _pytree_param_leaves(name: str, value: Any) -> list[tuple[str, Any]]:
    """A param site's value as ``(name, array)`` pairs: itself, or one per leaf of a pytree (a flax / haiku module's
    weights, registered by ``numpyro.contrib.module`` as one param), named ``"net$params/Dense_0/kernel"``."""
    if value is None or isinstance(value, (jax.Array, np.ndarray, float, int)):
        return [(name, value)]
    with_path, treedef = jax.tree_util.tree_flatten_with_path(value)
    names = tuple(name + "/" + "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                                        for k in path) for path, _ in with_path)
    _PYTREE_PARAMS[name] = (names, treedef)
    return [(n, leaf) for n, (_, leaf) in zip(names, with_path)]


def _regroup_pytree_params(params: dict[str, Any]) -> dict[str, Any]:
    """θ by leaf name -> the values ``handlers.substitute`` expects (pytree params rebuilt from their leaves)."""
    data = dict(params)
    for name, (names, treedef) in _PYTREE_PARAMS.items():
        if names and names[0] in params and all(n in params for n in names):
            data[name] = jax.tree_util.tree_unflatten(treedef, [params[n] for n in names])
    return data


def substitute_data(params: dict[str, Any]) -> dict[str, Any]:
    """``fit.params`` as the values a NumPyro model's param sites take: ``numpyro.handlers.substitute(model,
    data=substitute_data(fit.params))`` runs the model at the estimates.  ``fit.params`` holds a flax / haiku
    module's weights (``numpyro.contrib.module``) one leaf at a time (``"net$params/Dense_0/kernel"``), as the
    engines estimate them; here they are the module's weight tree again (``"net$params"``, for flax
    ``Net().apply({"params": ...}, x)``).  JAX arrays are immutable: these values are the trained weights; the
    module object itself holds none.  The trees are the ones traced in this process."""
    data = _regroup_pytree_params(params)
    leaves = {n for name, (names, _) in _PYTREE_PARAMS.items() if name in data for n in names}
    return {name: value for name, value in data.items() if name not in leaves}


class _UnitSubsample(Messenger):
    """Evaluate only ``units`` of a plate of ``size`` units: the plate's subsample indices become ``units`` (so it
    holds ``len(units)`` entries, as ``numpyro.plate(..., subsample_size=b)`` with these indices) and every observed
    value inside it is cut to those rows.  Applied inside ``condition``: the latents' values are the batch's."""

    def __init__(self, fn: Any, plate: str, size: int, units: Any) -> None:
        super().__init__(fn)
        self.plate, self.size, self.units = plate, int(size), units

    def process_message(self, msg: Any) -> None:
        if msg["type"] == "plate" and msg["name"] == self.plate:
            msg["value"] = self.units
            msg["args"] = (msg["args"][0], int(self.units.shape[0]))
        elif msg["type"] == "sample" and msg.get("is_observed") and msg.get("value") is not None:
            frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
            value = msg["value"]
            if frame is None:
                return
            axis = jnp.ndim(value) - len(msg["fn"].event_shape) + frame.dim
            if axis >= 0 and jnp.shape(value)[axis] == self.size:
                msg["value"] = jnp.take(value, self.units, axis=axis)


#: fingerprints of the (model, arguments) whose first run was compiled in this process (insertion order, bounded)
_FIRST_RUNS: dict[Any, None] = {}


def _tracer_slots(root: Any, tuples: bool = False) -> list[tuple[Any, Any]]:
    """``(holder, key)`` of every tracer reachable from ``root`` through lists, dicts and the attributes of NumPyro's
    and latentfit's objects (sites, distributions, transforms), each holder once; ``tuples``: also tracers inside
    tuples (which cannot be replaced in place)."""
    slots: list[tuple[Any, Any]] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            items: Any = list(obj.items())
        elif isinstance(obj, list):
            items = list(enumerate(obj))
        elif isinstance(obj, tuple):
            items = list(enumerate(obj)) if tuples else [(None, v) for v in obj if not isinstance(v, jax.core.Tracer)]
        elif type(obj).__module__.split(".")[0] in ("numpyro", "latentfit") and hasattr(obj, "__dict__") \
                and not isinstance(obj, type):
            items = list(vars(obj).items())
        else:
            return
        for k, v in items:
            if isinstance(v, jax.core.Tracer):
                slots.append((obj, k))
            else:
                visit(v)

    visit(root)
    return slots


class NumPyroPPL(PPL):
    """The tracing interface of NumPyro (see :class:`~latentfit.integrations.traced.PPL`)."""

    name = "numpyro"
    keyed_draws = True
    dist = SimpleNamespace(
        Normal=ndist.Normal, MultivariateNormal=ndist.MultivariateNormal, Categorical=ndist.CategoricalProbs,
        Independent=ndist.Independent, Masked=ndist.MaskedDistribution, Expanded=ndist.ExpandedDistribution,
        Transformed=ndist.TransformedDistribution, ExpTransform=ExpTransform)

    def obs_container_hint(self, value: Any) -> str | None:
        """NumPyro's distributions read JAX and numpy arrays (and Python numbers): what to pass for a pandas object,
        a torch tensor, a list."""
        if isinstance(value, (jax.Array, jax.core.Tracer, np.ndarray, np.generic, int, float)):
            return None
        if hasattr(value, "to_numpy"):  # pandas Series / DataFrame
            return "a numpy or JAX array, e.g. y.to_numpy()"
        if type(value).__module__.split(".")[0] == "torch":
            return "a numpy or JAX array, e.g. y.numpy() (y.detach().cpu().numpy() for a tensor on a GPU)"
        return "a numpy or JAX array, e.g. np.asarray(y)"

    def is_module_weight(self, name: str) -> bool:
        # numpyro.contrib.module's flax / haiku weights: one pytree param "net$params", a leaf "net$params/Dense_0/..."
        return name.endswith(_MODULE_SUFFIX) or _MODULE_SUFFIX + "/" in name

    def run(self, fn: Any, args: tuple, kwargs: dict, params: dict | None = None, values: dict | None = None,
            key: Any = None, subsample: tuple[str, int, Any] | None = None) -> dict[str, Site]:
        model = fn if subsample is None else _UnitSubsample(fn, *subsample)
        if values:
            model = handlers.condition(model, data=values)
        if params is not None:
            model = handlers.substitute(model, data=_regroup_pytree_params(params))
        with validation_enabled(False):  # NaN densities are rejected by MH / reported by site
            tr = handlers.trace(handlers.seed(model, rng_seed=0 if key is None else key)).get_trace(*args, **kwargs)
        sites = {}
        for name, site in tr.items():
            if site["type"] == "param":
                constraint = site["kwargs"].get("constraint", constraints.real)
                for leaf_name, leaf in _pytree_param_leaves(name, site["value"]):
                    sites[leaf_name] = Site(leaf_name, "param", leaf, constraint=constraint)
            elif site["type"] == "sample":
                frames = tuple(Frame(f.name, f.dim, f.size) for f in site["cond_indep_stack"])
                mask = site.get("mask")
                mask = None if mask is None or (isinstance(mask, bool) and mask) else jnp.asarray(mask)
                sites[name] = Site(name, "sample", site["value"], site["fn"], mask, frames,
                                   bool(site["is_observed"]))
        return sites

    def first_run(self, fn: Any, args: tuple, kwargs: dict) -> dict[str, Site]:
        """:meth:`run` as one compiled program: run eagerly, every ``jnp`` operation of the model is an XLA program of
        its own (~25 for the README model, each lowered and read back from the persistent cache in a fresh process).
        The run is traced once (its Python side: sites, distributions, plates) and the traced values it holds are
        computed by one program (:func:`~latentfit.inference.ops_jax.run_traced`) and put in their place; values the
        model passed through untouched (its data) stay the very objects it was given.  A model that cannot be traced
        (Python control flow on its values) runs eagerly, as does one whose sites keep a traced value where it cannot
        be replaced.  Only with the on-disk store on (a later process then reads one program from JAX's persistent
        cache) and for a model and arguments first seen in this process: a later fit's eager operations are already
        compiled in JAX's own caches, cheaper than a new trace."""
        seen = fingerprint(fn, args, kwargs) if _store.store_dir() is not None else None
        if seen is None or seen in _FIRST_RUNS:
            return self.run(fn, args, kwargs)
        _FIRST_RUNS[seen] = None
        while len(_FIRST_RUNS) > 256:
            del _FIRST_RUNS[next(iter(_FIRST_RUNS))]
        found: dict[str, Any] = {}

        def body() -> list[Any]:
            found["sites"] = sites = self.run(fn, args, kwargs)
            found["slots"] = slots = _tracer_slots(list(sites.values()))
            return [holder[k] if isinstance(holder, (dict, list)) else getattr(holder, k) for holder, k in slots]

        try:
            closed = jax.make_jaxpr(body)()
            values = run_traced(closed)
        except Exception:  # noqa: BLE001 - not traceable: the eager run (and its own errors)
            return self.run(fn, args, kwargs)
        for (holder, k), v in zip(found["slots"], values):
            if isinstance(holder, (dict, list)):
                holder[k] = v
            else:
                object.__setattr__(holder, k, v)
        if _tracer_slots(list(found["sites"].values()), tuples=True):  # a tracer left (in a tuple): eagerly
            return self.run(fn, args, kwargs)
        return found["sites"]

    # the analysis of a model (unit maps, patterns, Gaussian faces: ~80 eager runs of small programs) is kept in the
    # on-disk store of traced programs when JAX's persistent cache is on, under a stable digest of the model's code,
    # data and options (:func:`~latentfit.inference.ops_jax_store.stable_digest`); JSON and raw arrays, no pickle
    def analysis_key(self, *parts: Any) -> str | None:
        if _store.store_dir() is None:
            return None
        found = fingerprint(*parts)
        return None if found is None else _store.stable_digest(("traced-analysis", found))

    def load_analysis(self, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        return _store.load_record(key)

    def save_analysis(self, key: str, record: dict[str, Any], arrays: dict[str, Any]) -> None:
        _store.save_record(key, record, arrays)

    def make_ops(self, dtype: Any, device: Any) -> JaxOps:
        return JaxOps(dtype=dtype)

    def vectorise(self, f: Any, pure: bool = True, num_unmapped: int = 0) -> Any:
        return SharedJit(jax.vmap(f, in_axes=(None, 0) + (None,) * num_unmapped))

    # one-off derivatives at set-up: one compiled program each (eagerly, every primitive compiles apart); the
    # program of a function is kept on it (``f._latentfit_jvp``, gone with ``f``), so the unit-map detection's six
    # tangents of one function (traced._detect_unit_maps) trace the model once, not six times
    def jvp(self, f: Any, x: Any, t: Any) -> Any:
        program = getattr(f, "_latentfit_jvp", None)
        if program is None:
            program = SharedJit(lambda x, t: jax.jvp(f, (x,), (t,))[1])
            with contextlib.suppress(AttributeError, TypeError):  # a callable that takes no attributes
                f._latentfit_jvp = program
        return program(x, jnp.asarray(t, dtype=x.dtype))

    def grad_params(self, f: Any, theta: dict[str, Any]) -> dict[str, Any]:
        return SharedJit(jax.grad(f))(dict(theta))

    def biject_to(self, constraint: Any) -> Any:
        return biject_to(constraint)

    def float_dtype(self, values: list[Any]) -> tuple[Any, Any]:
        floats = [np.asarray(v).dtype for v in values if isinstance(v, (jax.Array, np.ndarray))
                  and jnp.issubdtype(np.asarray(v).dtype, jnp.floating)]
        cap = default_float_dtype()
        # follow the model's widest float dtype when jax can hold it (float64 needs jax_enable_x64)
        dtype = max((jnp.dtype(d) for d in floats), key=lambda d: d.itemsize, default=cap)
        return (dtype if dtype.itemsize <= cap.itemsize else cap), None

    def segment_sum(self, x: Any, idx: Any, n: int) -> Any:
        return jax.ops.segment_sum(x, idx, num_segments=n)

    def no_grad(self) -> Any:
        return contextlib.nullcontext()

    def concrete(self) -> Any:
        return jax.ensure_compile_time_eval()

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return jnp.moveaxis(x, source, destination)

    def one_hot_draws(self, key: Any, probs: Any, num: int, dtype: Any) -> Any:
        lab = jax.random.categorical(key, jnp.log(probs), axis=-1, shape=(num, probs.shape[0]))
        return jax.nn.one_hot(lab, probs.shape[-1], dtype=dtype)


class NumPyroLatentModel(TracedLatentModel):
    """A NumPyro model function, traced once, seen through the :class:`LatentModel` contract."""

    ppl = NumPyroPPL()


class NumPyroEnumModel(EnumeratedLatentModel):
    """A NumPyro model with one enumerable per-unit latent (exact E-step by enumeration)."""

    ppl = NumPyroLatentModel.ppl


def as_rng_key(rng_key: Any) -> Any:
    """A JAX PRNG key from ``rng_key`` (a key, or an int seed as NumPyro's ``seed`` handler accepts)."""
    if isinstance(rng_key, (int, np.integer)) and not isinstance(rng_key, bool):
        return jax.random.PRNGKey(int(rng_key))
    if isinstance(rng_key, (jax.Array, np.ndarray)):
        arr = rng_key
        if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key) or (arr.shape == (2,) and arr.dtype == jnp.uint32):
            return jnp.asarray(arr)
    raise TypeError(
        "run() expects a JAX PRNG key as its first argument, e.g. run(jax.random.PRNGKey(0), *model_args) "
        f"(NumPyro's convention); got {type(rng_key).__name__}")


__all__ = ["NumPyroEnumModel", "NumPyroLatentModel", "NumPyroPPL", "as_rng_key", "substitute_data"]
