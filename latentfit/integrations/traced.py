"""One traced adapter for both PPLs: a model function becomes a :class:`LatentModel`.

:class:`TracedLatentModel` reads a Pyro or NumPyro model through a small tracing interface
(:class:`PPL`: run the model with given θ and latents, vectorise a function over chains, forward
derivatives, the distribution classes); every rule of how a model is read is written once here.

Roles of the sites:

* param sites (``pyro.param`` / ``numpyro.param``) are θ, with their constraints;
* unobserved sample sites inside the *unit plate* are per-unit latents ``z_i``; the unit plate is the
  plate shared by every latent site (or the one named ``unit_plate=``);
* observed sites are data.  Inside the unit plate their log-densities are summed per unit over every
  other dim.  Outside it (the usual hierarchical style: latents in a plate over groups, observations in a
  plate over rows reading ``alpha[group_idx]``) each element is assigned to the unit whose latents it
  depends on, found from the model by forward derivatives (or given by ``unit_index=``), and per-unit
  log-densities are sums over each group's rows.

Chains are vectorised by the PPL (``jax.vmap`` / ``torch.func.vmap``, or one evaluation per chain when
a model cannot be vmapped), so the model is evaluated exactly as the user wrote it: no extra batch dim.
Parameters, latents and the statistics share one float dtype: the widest of the parameters and the
observed data.

Recognised closed-form patterns (the exponential-family face of SAEM/EM):

* a Normal / LogNormal latent whose loc and scale are params (μ, ω) and a MultivariateNormal latent
  whose loc and covariance (or scale_tril) are params (μ, Ω): statistics ``Σ w_i``, ``Σ w_i w_iᵀ``;
* a Normal observation whose scale is a scalar param (constant residual error): ``Σ (y − f)²``.

A distribution argument "is" a param when it equals the (broadcast) param at the initial values and at
a random perturbation of all params; "depends on" is a non-zero gradient.  Every other parameter gets
the numerical M-step.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from latentfit.inference.model import (
    LAYOUT_DIM,
    DataError,
    LatentModel,
    LatentSite,
    LogisticDesign,
    LogisticDesignError,
    ModelSpecificationError,
    ParamInfo,
)
from latentfit.inference.units import take_units


class Frame(NamedTuple):
    """A vectorised plate around a site."""

    name: str
    dim: int
    size: int


@dataclass
class Site:
    """One site of a traced run, in PPL-neutral form."""

    name: str
    type: str  # "param" / "sample"
    value: Any
    fn: Any = None  # distribution (sample sites)
    mask: Any = None  # handler mask (poutine.mask / handlers.mask), on the log-density's shape (None = all)
    frames: tuple[Frame, ...] = ()
    is_observed: bool = False
    constraint: Any = None  # param sites
    module_weight: bool = False  # param sites: a weight a neural-network module computes with (PyroModule's own)


@dataclass
class _SiteLayout:
    """How a latent site's value maps to the flat per-unit vector."""

    name: str
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    unit_axis: int  # axis of the unit dim in the value
    transform: Any  # biject_to(support): unconstrained -> constrained
    x_rest: tuple[int, ...]  # constrained per-unit shape (unit axis moved out)
    u_rest: tuple[int, ...]  # unconstrained per-unit shape
    offset: int
    size: int


@dataclass
class _GaussianLatentPattern:
    site: str
    loc: str | None  # param name, or None for a zero mean (``Normal(0., omega)``, a centred random effect)
    scale: str  # param name
    kind: str  # "normal" (scale = std, elementwise) or "mvn_cov" / "mvn_tril"


@dataclass
class _ResidualPattern:
    site: str
    scale: str  # param name of the residual sd


def unit_frame(latent: list[str], frames: dict[str, list[Any]], unit_plate: str | None, ppl: str) -> Any:
    """The plate frame of the units: the one named ``unit_plate``, else the outermost plate common to all latents.

    ``frames`` maps each latent site to its (vectorised) plate frames; ``ppl`` ("pyro" / "numpyro")
    names the library in the error messages.
    """
    if unit_plate is not None:
        found = [f for n in latent for f in frames[n] if f.name == unit_plate]
        if not found:
            names = sorted({f.name for n in latent for f in frames[n]})
            raise ModelSpecificationError(
                f"unit_plate={unit_plate!r} does not enclose any latent site; plates around latent "
                f"sites: {names}")
        outside = [n for n in latent if all(f.name != unit_plate for f in frames[n])]
        if outside:
            raise ModelSpecificationError(
                f"latent site(s) {outside} are outside the unit plate {unit_plate!r}: global latents "
                f"are not supported by EM-type engines; make them {ppl}.param sites")
        return found[0]
    common = [f for f in frames[latent[0]] if all(f in frames[n] for n in latent)]
    if not common:
        where = {n: [f.name for f in frames[n]] or ["(no plate)"] for n in latent}
        raise ModelSpecificationError(
            f"latent sites are not all inside one plate ({where}); name the plate of the units "
            f"with unit_plate=... (global latents must be {ppl}.param sites)")
    return min(common, key=lambda f: f.dim)  # outermost common plate (the most negative dim)


def _reduce_to(x: Any, shape: tuple[int, ...]) -> Any:
    """Average ``x`` over the dims that broadcasting a param of ``shape`` added or expanded."""
    extra = x.ndim - len(shape)
    if extra > 0:
        x = x.mean(axis=tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if dims:
        x = x.mean(axis=dims, keepdims=True)
    return x.reshape(shape)


class PPL:
    """What the adapters need from a PPL (implemented in ``integrations/pyro.py`` and ``numpyro.py``).

    ``run(fn, args, kwargs, params=None, values=None, key=None, subsample=None) -> {name: Site}`` runs the model
    once (θ substituted, latents conditioned, the rest sampled from ``key``; ``subsample=(plate, size, units)``: that
    plate subsampled to ``units`` and the observations inside it cut to their rows); ``vectorise(f, pure=True,
    num_unmapped=0)`` maps ``f(theta, x, *rest)`` over the leading axis of ``x`` (``pure``: may be compiled);
    ``jvp(f, x, t)`` and ``grad_params(f, theta)`` are forward / reverse derivatives (zeros where unused);
    ``float_dtype(values) -> (dtype, device)`` is the fit's one float dtype; ``segment_sum(x, idx, n)`` sums the
    elements of each index; ``log_prob(fn, value)`` is ``fn.log_prob(value)`` (possibly computed faster);
    ``one_hot_draws(key, probs, num, dtype)`` draws labels one-hot; ``make_ops``, ``biject_to``, ``no_grad`` and
    ``moveaxis`` are the library's own.  ``dist`` names the distribution classes
    (Normal, MultivariateNormal, Categorical, Independent, Masked, Expanded, Transformed, ExpTransform).
    """

    name: str = ""  # "pyro" / "numpyro", for messages
    dist: Any = None

    def param_transform(self, constraint: Any, dtype: Any = None, device: Any = None) -> Any:
        """Unconstrained -> constrained map of a param (the PPL's own choice); its constants, if it has any, in the
        fit's ``dtype`` on its ``device``."""
        return self.biject_to(constraint)

    def log_prob(self, fn: Any, value: Any) -> Any:
        """``fn.log_prob(value)`` (a PPL may compute it faster, with the same values)."""
        return fn.log_prob(value)

    #: draws from a distribution take an explicit PRNG key (NumPyro); False: the global generator (Pyro), lent a
    #: key's stream by ``ops.global_rng_from``
    keyed_draws: bool = False

    def sample_value(self, fn: Any, key: Any = None) -> Any:
        """One draw of the distribution ``fn`` (``key``: a PRNG key where :attr:`keyed_draws`, else None)."""
        return fn.sample() if key is None else fn.sample(key)

    def obs_container_hint(self, value: Any) -> str | None:
        """None when ``value`` is of a type this PPL's distributions read as an observation; else what to pass
        instead (for :func:`check_obs_container`'s message).  Accepts anything by default."""
        return None

    def is_module_weight(self, name: str) -> bool:
        """Whether param ``name`` is a weight of a neural-network module registered by the PPL's module helper
        (``pyro.module``, ``numpyro.contrib.module``), by the name that helper gives it; False by default."""
        return False

    def first_run(self, fn: Any, args: tuple, kwargs: dict) -> dict[str, Site]:
        """The model's first run (:meth:`run` without θ or latents given); a PPL may compute it in one program."""
        return self.run(fn, args, kwargs)

    def analysis_key(self, *parts: Any) -> Any:
        """A key of the model's analysis valid in a later process (code, data and options), or None: no store."""
        return None

    def load_analysis(self, key: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(record, arrays)`` kept under ``key`` by :meth:`save_analysis`, or None."""
        return None

    def save_analysis(self, key: Any, record: dict[str, Any], arrays: dict[str, Any]) -> None:
        """Keep the analysis of a model (JSON ``record``, numpy ``arrays``) for a later process (no-op by default)."""

    def concrete(self) -> Any:
        """Context in which computations on concrete values run eagerly, even while an engine's step is being traced
        for compilation (JAX); nothing to do on eager backends."""
        return contextlib.nullcontext()

    # ----- distributions ----------------------------------------------------------------------------
    def unwrap(self, fn: Any) -> Any:
        """Strip Independent / Masked / Expanded wrappers."""
        d = self.dist
        while isinstance(fn, (d.Independent, d.Masked, d.Expanded)):
            fn = fn.base_dist
        return fn

    def normal_of(self, fn: Any) -> Any:
        """The Normal of a Normal or LogNormal (a Normal through one ``exp``) distribution, else None."""
        d, fn = self.dist, self.unwrap(fn)
        if isinstance(fn, d.Transformed) and len(fn.transforms) == 1 and isinstance(fn.transforms[0], d.ExpTransform):
            fn = self.unwrap(fn.base_dist)
        return fn if isinstance(fn, d.Normal) else None

    def value_mask(self, fn: Any, handler_mask: Any, ops: Any) -> Any:
        """Mask on the shape of the site's value: the handler mask (event dims appended) and every ``.mask()``
        inside ``fn`` (a ``.mask(m).to_event(1)`` masks single values; its log-density masks itself)."""
        out, d = None, self.dist
        if handler_mask is not None:
            m = ops.asarray(handler_mask, dtype=None)
            out = m.reshape(tuple(m.shape) + (1,) * len(fn.event_shape))
        while isinstance(fn, (d.Independent, d.Masked, d.Expanded)):
            if isinstance(fn, d.Masked) and not (isinstance(fn._mask, bool) and fn._mask):
                m = ops.asarray(fn._mask, dtype=None)
                m = m.reshape(tuple(m.shape) + (1,) * len(fn.event_shape))
                out = m if out is None else out & m
            fn = fn.base_dist
        return out


#: the end of the messages refusing a model whose log-density is NaN/inf at every prior draw of the latents tried
_NONFINITE_HINT = ("the prior puts the latents where the model is not defined (e.g. the log of a latent drawn below "
                   "0), or the data or the initial param values make the density NaN/inf there; check the initial "
                   "param values, the site's distribution arguments and the data there")


def check_obs_container(ppl: PPL, site: Site) -> None:
    """DataError naming the observed ``site`` when its value is a container the PPL's log-densities cannot read (a
    numpy array, pandas Series or list for Pyro; a torch tensor or pandas Series for NumPyro): they failed later with
    a bare ``TypeError`` (``numpy.ndarray - Tensor``) or a JAX tracer error, naming neither the site nor the fix."""
    hint = ppl.obs_container_hint(site.value)
    if hint is not None:
        kind = type(site.value)
        raise DataError(f"observed site {site.name!r} was given a {kind.__module__}.{kind.__qualname__}, which "
                        f"{ppl.name} distributions cannot read: pass {hint}")


def enlarging_obs_shape(dist_shape: tuple[int, ...], value_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast shape when an observation of ``value_shape`` enlarges a distribution of ``dist_shape`` (batch +
    event) in an outer-product way, else None.

    Broadcast together, the data adds dims (or sizes) the distribution lacks while the data itself is broadcast along
    a dim where the distribution has more than one entry (missing there, or of size 1): a column ``y[:, None]`` of
    shape ``(n, 1)`` for a plate of ``n`` rows becomes an ``(n, n)`` site, every row compared with every row's mean.
    Data that only enlarges (a distribution ``(N, 1)`` given ``(N, T)`` data, a scalar distribution given a vector
    outside any plate), or only is broadcast (a scalar for a whole plate), keeps its meaning and is accepted, as is
    data of the distribution's own shape."""
    full = tuple(np.broadcast_shapes(dist_shape, value_shape))
    if full == tuple(dist_shape):
        return None
    for d in range(1, len(dist_shape) + 1):
        v = value_shape[-d] if d <= len(value_shape) else 1
        if dist_shape[-d] > 1 and v == 1:
            return full
    return None


def discrete_latent_error(ppl: str, name: str, dist_name: str, enumerable: bool,
                          others: list[str]) -> ModelSpecificationError:
    """The error of a traced model (the engines that draw continuous latents: SAEM, FSAEM, MCMCSGD, and the EM family
    for a model its enumeration adapter does not take) with a discrete latent site ``name``: what the engine needs,
    which engines take such a latent, and how."""
    head = f"latent site {name!r} is discrete ({dist_name})"
    continuous = ("SAEM, FSAEM and MCMCSGD move continuous latents only (random-walk, Laplace and gradient-based "
                  "proposals in unconstrained space), so they cannot fit it")
    if enumerable and not others:
        return ModelSpecificationError(
            f"{head} with a finite support, which the EM family sums out exactly; {continuous}. Fit the model with "
            f"an engine of the EM family from latentfit.{ppl}: EM (exact), MiniBatchEM, IEM, SEM, SEMVR, FIEM, or "
            f"MCEM / MiniBatchMCEM / TTSEM (labels drawn from their exact posterior), e.g. EM(model).run(...); the "
            "model needs no change (config_enumerate / infer={'enumerate': 'parallel'} is optional). Their "
            "M-step is in closed form for a Gaussian mixture (Categorical label, Normal / MultivariateNormal "
            "observation); other enumerated models get the exact E-step and log-likelihood but no M-step")
    if enumerable:
        return ModelSpecificationError(
            f"{head} with a finite support, beside the latent site(s) {others}: the EM family sums out one discrete "
            f"latent per unit only when it is the model's only latent, and {continuous}; no engine takes both. Sum "
            f"{name!r} out in the model (the log-sum-exp over its values, added with a factor) and fit the "
            "continuous latents with SAEM, or make the continuous ones parameters")
    return ModelSpecificationError(
        f"{head} with a support that cannot be enumerated (infinite): the EM family sums out a discrete latent of "
        f"finite support only (Categorical, Bernoulli, ...), and {continuous}. Sum {name!r} out in the model (over a "
        "truncated range, with a factor), replace it with a finite Categorical over a truncated range (then fit "
        "with the EM family), or with a continuous latent")


class TracedBase(LatentModel):
    """What every traced model shares: the model run with θ substituted and latents conditioned (on all units or a
    mini-batch's alone), its params in one float dtype, the per-unit reduction of log-densities."""

    ppl: PPL
    _unit_map: dict[str, Any] = {}  # observed site outside the unit plate -> unit of each element (traced models)
    _batch_path: bool | None = None  # checked on first use (fits that never evaluate a batch pay nothing)
    #: leaf imputation sites of ``obs_mask=`` observations (not latents, see ``_leaf_imputations``) -> their constant
    _imputed: dict[str, Any] = {}
    #: latent sites' elements that no density reads (see ``_find_unread``), and the ``[N, d]`` mask they make
    _unread: dict[str, np.ndarray] = {}
    _latent_unread: np.ndarray | None = None
    #: observed sites holding NaN/inf at masked-out entries -> a finite value of the site read there instead
    _masked_fill: dict[str, float] = {}
    #: params whose first-run site says they are a module's weights (a PyroModule's ``nn.Parameter`` attributes)
    _module_weights: frozenset[str] = frozenset()

    def _setup(self, model: Any, args: tuple, kwargs: dict | None) -> dict[str, Site]:
        """Keep the model and its arguments, trace it once, read its params and the fit's dtype and ``ops``."""
        if not callable(model):
            raise TypeError(f"model must be a callable {self.ppl.name} model, got {type(model).__name__}")
        self.fn, self.args, self.kwargs = model, tuple(args), dict(kwargs or {})
        trace = self._trace_model()
        self._find_params(trace)
        self.ops = self.ppl.make_ops(self._dtype, self._device)
        # each sample site's plates, value shape and event rank, for site_dims (arviz's dims)
        self._site_plates = {n: (tuple(s.frames), tuple(int(k) for k in np.shape(s.value)),
                                 len(tuple(getattr(s.fn, "event_shape", ()))))
                             for n, s in trace.items() if s.type == "sample"}
        return trace

    def _value_dims(self, name: str) -> list[str | None]:
        """The dims of site ``name``'s value as the model gave it: a batch dim is named by the plate at its position
        when the sizes agree, else a size-1 one is :data:`LAYOUT_DIM` (broadcast), else unnamed; event dims unnamed."""
        frames, shape, event = self._site_plates[name]
        batch = len(shape) - event
        by_dim = {int(f.dim): f for f in frames}
        dims: list[str | None] = []
        for k, size in enumerate(shape[:batch]):
            frame = by_dim.get(k - batch)
            if frame is not None and int(frame.size) == size:
                dims.append(frame.name)
            else:
                dims.append(LAYOUT_DIM if size == 1 else None)
        return dims + [None] * (len(shape) - batch)

    def site_dims(self, name: str) -> list[str | None]:
        """The plates of site ``name``'s dims, outermost first (:meth:`LatentModel.site_dims`): an observed or
        imputed site's as its value lays them out, a latent's unit dim first (as :meth:`unpack_latents` does)."""
        if name not in getattr(self, "_site_plates", {}):
            return super().site_dims(name)
        layout = {s.name: s for s in getattr(self, "_layout", ())}
        if name in layout:
            dims = self._value_dims(name)
            axis = layout[name].unit_axis
            return [self.unit_plate, *dims[:axis], *dims[axis + 1:]]
        if name in self.observed_names or name in self._imputed:
            return self._value_dims(name)
        return super().site_dims(name)

    def pointwise_log_likelihood(self, theta: dict[str, Any], z: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """``log p(y | z_s; θ)`` of every observed element at each draw ``z [S, N, d]`` (unconstrained, every unit):
        ``{site: [S, *batch shape]}`` as numpy arrays (an event dim's terms summed, as the site's density sums them),
        and ``{site: [*batch shape]}`` True where the element is observed (False where a handler mask or ``obs_mask``
        leaves it out).  One model run per draw (vectorised over the draws as the chains are)."""
        names = list(self.observed_names)

        def one(th: dict[str, Any], zz: Any) -> list[Any]:
            values, _ = self._split_one(zz)
            sites = self._run(th, values)
            return [self.ppl.log_prob(sites[n].fn, sites[n].value) for n in names]

        z = self.ops.asarray(z)
        lps = self._guard(self.ppl.vectorise(one), dict(theta), z)
        values, _ = self._split_one(z[0])
        sites = self._run(dict(theta), values)
        xp, out, observed = self.ops.xp, {}, {}
        for n, lp in zip(names, lps):
            mask = sites[n].mask
            shape = tuple(lp.shape[1:])
            keep = xp.ones(shape, dtype=bool) if mask is None else xp.broadcast_to(mask, shape)
            out[n], observed[n] = self.ops.to_numpy(lp), np.asarray(self.ops.to_numpy(keep), dtype=bool)
        return out, observed

    def sample_observations(self, theta: dict[str, Any], z: Any, key: Any) -> dict[str, Any]:
        """Replicated data ``y_rep ~ p(y | z_s; θ)`` of every observed site at each draw ``z [..., N, d]``
        (unconstrained, every unit; :meth:`LatentModel.sample_observations`): the model run at θ with the latents
        given, each observed site's distribution sampled once per draw, ``{site: [..., *value shape]}`` (numpy, the
        observed values' dtype).  Masked-out entries (``.mask(m)``, ``poutine.mask``, ``obs_mask=``) are drawn too:
        they are what the model predicts there.  One run per draw, vectorised over the draws as the chains are
        (``torch.func.vmap`` with different randomness per draw; ``jax.vmap`` over split keys), from ``key``'s
        stream: the same key gives the same draws."""
        names = list(self.observed_names)
        ops = self.ops
        z = ops.asarray(z)
        lead = tuple(z.shape[:-2])
        count = int(np.prod(lead))
        z = z.reshape((count,) + tuple(z.shape[-2:]))
        if key is None:
            key = ops.key(0)
        program = getattr(self, "_observe_all", None)
        if program is None:  # made once per model (Pyro: remembers whether vmap can run the model)
            program = self._observe_all = self.ppl.vectorise(self._observe_one, pure=False)
        mapped = (z, ops.split(key, count)) if self.ppl.keyed_draws else z
        with self.ppl.no_grad(), ops.global_rng_from(key):  # Pyro draws from the global RNG: the key's stream
            draws = self._guard(program, dict(theta), mapped)
        out = {}
        for n, y in zip(names, draws):
            y = np.asarray(ops.to_numpy(y))
            dtype = np.asarray(self.observed[n]).dtype
            if np.issubdtype(dtype, np.number) and y.dtype != dtype:
                y = y.astype(dtype)
            out[n] = y.reshape(lead + tuple(y.shape[1:]))
        return out

    def _observe_one(self, theta: dict[str, Any], draw: Any) -> list[Any]:
        """One draw of every observed site at one draw of the latents (``draw``: ``z [N, d]``, or ``(z, key)``)."""
        z, key = draw if isinstance(draw, tuple) else (draw, None)
        values, _ = self._split_one(z)
        sites = self._run(theta, values)
        names = list(self.observed_names)
        keys = [None] * len(names) if key is None else list(self.ops.split(key, len(names)))
        out = []
        for n, k in zip(names, keys):
            fn, shape = sites[n].fn, tuple(np.shape(sites[n].value))
            event = tuple(fn.event_shape)
            if tuple(fn.batch_shape) + event != shape and len(shape) >= len(event):
                # data that enlarge the distribution (an [N, 1] mean given [N, T] data): one draw per observed value
                batch = tuple(np.broadcast_shapes(tuple(fn.batch_shape), shape[:len(shape) - len(event)]))
                fn = fn.expand(batch)
            out.append(self.ppl.sample_value(fn, k))
        return out

    def data_arrays(self) -> dict[str, Any]:
        """The model function's arguments (``model(*args, **kwargs)``: observed arrays, covariates, sizes), what a
        checkpoint's data digest covers."""
        return {"args": self.args, "kwargs": self.kwargs}

    def _trace_model(self) -> dict[str, Site]:
        try:
            return self.ppl.first_run(self.fn, self.args, self.kwargs)
        except Exception as exc:  # the model itself failed: say so, keep the original as cause
            raise ModelSpecificationError(
                f"running the model with the given arguments failed: {type(exc).__name__}: {exc}") from exc

    def _find_params(self, trace: dict[str, Site]) -> None:
        params = {n: s for n, s in trace.items() if s.type == "param"}
        if not params:
            raise ModelSpecificationError(
                f"the model has no {self.ppl.name}.param site, so there is nothing to estimate: declare the "
                f"population parameters with {self.ppl.name}.param(...) (for fully Bayesian inference use "
                f"{self.ppl.name}.infer.MCMC or SVI instead)")
        observed = [s.value for s in trace.values() if s.type == "sample" and s.is_observed]
        self._dtype, self._device = self.ppl.float_dtype([s.value for s in params.values()] + observed)
        ops = self.ppl.make_ops(self._dtype, self._device)
        self._module_weights = frozenset(n for n, s in params.items() if s.module_weight)
        self.params = {}
        for name, site in params.items():
            transform = self.ppl.param_transform(site.constraint, self._dtype, self._device)
            self.params[name] = ParamInfo(
                name=name, value=ops.stop_gradient(ops.asarray(site.value, dtype=self._dtype)),
                to_unconstrained=transform.inv, to_constrained=transform, meta={"constraint": site.constraint})

    def param_basis(self, name: str) -> np.ndarray | None:
        """The free directions of param ``name``'s unconstrained coordinates, for the standard errors
        (:func:`~latentfit.inference.fisher._finish`): Pyro's param store maps ``constraints.simplex`` by
        ``transform_to``, a softmax over the last axis, which adding a constant to a row leaves unchanged, so each row
        of K coordinates has K − 1 free directions (``e_k − 1/K``, k < K); None: every coordinate is free (NumPyro's
        stick-breaking simplex has K − 1 coordinates)."""
        info = self.params.get(name)
        if info is None or type(info.to_constrained).__name__ != "SoftmaxTransform":
            return None
        shape = tuple(info.value.shape)
        K = int(shape[-1]) if shape else 1
        if K < 2:
            return None
        row = np.eye(K)[:, :K - 1] - 1.0 / K
        return np.kron(np.eye(int(np.prod(shape[:-1]))), row)

    @property
    def module_params(self) -> frozenset[str]:
        """The params that are weights of a neural-network module (:meth:`PPL.is_module_weight`, or so marked by
        the first run's site)."""
        return frozenset(n for n in self.params if self.ppl.is_module_weight(n) or n in self._module_weights)

    def _run(self, theta: dict[str, Any], values: dict[str, Any], units: Any = None) -> dict[str, Site]:
        """One run at θ with the latents ``values``; with ``units``, only those units (the unit plate subsampled,
        the latents the batch's, the observations inside the plate cut to the batch's rows)."""
        subsample = None if units is None else (self.unit_plate, self.num_units, units)
        if self._imputed:
            values = {**values, **self._imputed}
        sites = self.ppl.run(self.fn, self.args, self.kwargs, params=theta, values=values, subsample=subsample)
        return self._fill_masked(sites)

    def _fill_masked(self, sites: dict[str, Site]) -> dict[str, Site]:
        """The observed values with their masked-out NaN/inf entries replaced by a finite value of the site.

        A masked entry's log-density is dropped by ``where(mask, lp, 0)``, but its derivative is ``0 · ∂lp/∂θ`` and
        ``∂lp/∂θ`` at a NaN observation is NaN: every gradient in θ (numerical M-steps, scores, Fisher information) came
        out NaN, and a Newton M-step kept its old value (Pyro ``obs_mask=`` with NaN fill: σ stayed at 1.0).  The
        entries are never read otherwise (``_check_observed`` refuses a NaN at an unmasked entry), so any finite
        value in the support does: an observed value of the same site."""
        if not self._masked_fill:
            return sites
        xp = self.ops.xp
        for name, fill in self._masked_fill.items():
            site = sites.get(name)
            if site is not None and site.value is not None:
                sites[name] = replace(site, value=xp.where(xp.isfinite(site.value), site.value, fill))
        return sites

    def _per_unit(self, x: Any, name: str | None = None, count: int | None = None) -> Any:
        """Sum an array laid out like site ``name`` over every dim but the unit dim -> ``[N]`` (``[count]`` for a
        mini-batch evaluated alone)."""
        xp = self.ops.xp
        n = self.num_units if count is None else int(count)
        if name is not None and name in self._unit_map:
            flat = xp.broadcast_to(x, self._lp_shape[name]).reshape(-1)
            return self.ppl.segment_sum(flat, self._unit_map_arrays[name], self.num_units)
        nd = max(x.ndim, -self.unit_dim)
        x = x.reshape((1,) * (nd - x.ndim) + tuple(x.shape))
        x = self.ppl.moveaxis(x, nd + self.unit_dim, 0)
        x = xp.broadcast_to(x, (n,) + tuple(x.shape[1:]))
        return x.reshape(n, -1).sum(-1)

    def _guard(self, f: Any, *args: Any) -> Any:
        try:
            return f(*args)
        except (TypeError, ValueError, IndexError, RuntimeError) as exc:
            if isinstance(exc, (ModelSpecificationError, DataError)):
                raise
            raise ModelSpecificationError(
                f"evaluating the model with given parameters and latents failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _site_shape(self, site: Site) -> tuple[int, ...]:
        """Shape of the site's log-density (its batch shape, the mask broadcast in).  Data whose shape does not
        broadcast against the distribution (an observation vector a row short of its plate) is a DataError naming
        the site, the shape expected and the shape given: the PPLs only fail later, deep inside a log-density."""
        shape = tuple(site.fn.batch_shape)
        event = tuple(site.fn.event_shape)
        vshape = tuple(np.shape(site.value))
        vb = vshape[: len(vshape) - len(event)]
        expects = (f"but its {type(site.fn).__name__} expects shape {shape + event} (batch {shape}, event {event}"
                   f"{self._plates_of(site)})")
        try:
            np.broadcast_shapes(shape + event, vshape)
            enlarged = enlarging_obs_shape(shape + event, vshape) if site.is_observed else None
            shape = tuple(np.broadcast_shapes(shape, vb))
        except ValueError:
            raise DataError(
                f"observed site {site.name!r} was given data of shape {vshape}, {expects}: check the array passed "
                f"for {site.name!r}") from None
        if enlarged is not None:
            raise DataError(
                f"observed site {site.name!r} was given data of shape {vshape}, {expects}: broadcast together they "
                f"would make a site of shape {enlarged}, every observation paired with every other's distribution; "
                f"check the array passed for {site.name!r} (a column y[:, None] where a vector y is expected?)")
        if site.mask is not None:
            mshape = tuple(np.shape(site.mask))
            try:
                shape = tuple(np.broadcast_shapes(shape, mshape))
            except ValueError:
                raise DataError(f"the mask of observed site {site.name!r} has shape {mshape}, which does not "
                                f"broadcast to the site's shape {shape}{self._plates_of(site)}") from None
        return shape

    @staticmethod
    def _plates_of(site: Site) -> str:
        """``"; plates 'rows' (size 117, dim -1)"``: the plates around a site, for messages."""
        if not site.frames:
            return ""
        plates = ", ".join(f"{f.name!r} (size {f.size}, dim {f.dim})" for f in site.frames)
        return f"; plate{'s' if len(site.frames) > 1 else ''} {plates}"

    def _index(self, units: Any) -> Any:
        return self.ops.asarray(units, dtype=None)

    def _site_lp(self, site: Site) -> Any:
        """The site's log-density, zero where its handler mask is off."""
        lp = self.ppl.log_prob(site.fn, site.value)
        return lp if site.mask is None else self.ops.xp.where(site.mask, lp, self.ops.xp.zeros_like(lp))

    @property
    def batch_path(self) -> bool:
        """Whether a mini-batch is evaluated by running the model on its units alone (checked once, on first use)."""
        if self._batch_path is None:
            with self.ppl.concrete(), self.ppl.no_grad():  # first use may be inside a step being compiled
                self._batch_path = self._check_batch_path()
        return self._batch_path

    @batch_path.setter
    def batch_path(self, value: bool) -> None:
        self._batch_path = bool(value)

    def _rows_match(self, pairs: list[tuple[Any, Any]]) -> bool:
        """Whether each pair (a full run's rows for a batch, the batch run alone) agrees to √eps."""
        for a, b in pairs:
            a, b = np.asarray(self.ops.to_numpy(a)), np.asarray(self.ops.to_numpy(b))
            tol = float(np.finfo(a.dtype).eps) ** 0.5
            if a.size != b.size or not np.allclose(a.ravel(), b.ravel(), rtol=tol, atol=tol):
                return False
        return True

    def _perturbed_params(self) -> dict[str, Any]:
        """The initial θ moved by a random step in unconstrained space (for 'is a param' checks)."""
        rng = np.random.default_rng(12345)
        theta_u = self.unconstrain(self.init_params())
        moved = {n: v + self.ops.asarray(0.3 * rng.standard_normal(tuple(v.shape)) + 0.1)
                 for n, v in theta_u.items()}
        return {n: self.ops.stop_gradient(v) for n, v in self.constrain(moved).items()}


class TracedLatentModel(TracedBase):
    """A Pyro / NumPyro model function, traced once, seen through the :class:`LatentModel` contract."""

    ppl: PPL

    def __init__(self, model: Any, args: tuple = (), kwargs: dict | None = None,
                 unit_plate: str | None = None, closed_form: bool = True, unit_index: Any = None) -> None:
        trace = self._setup(model, args, kwargs)
        self._find_sites(trace, unit_plate)
        self._check_observed(trace)
        self._check_arguments_finite(trace)
        self._densities_all = self.ppl.vectorise(self._densities_one)
        self._densities_batch = self.ppl.vectorise(self._densities_one, num_unmapped=1)
        self._resid_batch = self.ppl.vectorise(self._resid_one, num_unmapped=1)
        self._sample_all = self.ppl.vectorise(self._sample_one, pure=False)
        self._impute_all = self.ppl.vectorise(self._impute_one, pure=False)
        self._resid_all = self.ppl.vectorise(self._resid_one)
        self._predict_all = self.ppl.vectorise(self._predict_one)
        self._gauss: list[_GaussianLatentPattern] = []
        self._resid: list[_ResidualPattern] = []
        key = self.ppl.analysis_key(type(self).__qualname__, model, self.args, self.kwargs, unit_plate, closed_form,
                                    unit_index)
        stored = None if key is None else self.ppl.load_analysis(key)
        if stored is not None and self._restore_analysis(*stored):
            return
        self._find_unit_maps(trace, unit_index)
        self._check_initial_density()
        if closed_form:
            self._recognise_patterns()
        self.has_stats = bool(self._gauss or self._resid)
        self._recognise_gaussian_faces()
        if key is not None:
            self.ppl.save_analysis(key, *self._analysis_record())

    # ----- the analysis kept on disk (a later process reads it instead of running the model ~80 more times) ------
    def _analysis_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What the analysis of the model found, beyond its first trace: unit maps, closed-form patterns and Gaussian
        faces, as JSON and numpy arrays (:meth:`PPL.save_analysis`)."""
        record: dict[str, Any] = {
            "gauss": [[g.site, g.loc, g.scale, g.kind] for g in self._gauss],
            "resid": [[r.site, r.scale] for r in self._resid],
            "unit_map": sorted(self._unit_map), "has_gaussian_obs": bool(self.has_gaussian_obs),
            "has_gaussian_prior": bool(self.has_gaussian_prior), "obs_layouts": {}}
        arrays = {f"unit_map/{n}": np.asarray(m) for n, m in self._unit_map.items()}
        if self.has_gaussian_obs:
            for n, (kind, gather, valid, full, ev) in self._obs_layouts.items():
                record["obs_layouts"][n] = [kind, [int(v) for v in full], int(ev)]
                if kind == "rows":
                    arrays[f"gather/{n}"], arrays[f"valid/{n}"] = np.asarray(gather), np.asarray(valid)
            arrays["obs_values"] = np.asarray(self.ops.to_numpy(self._obs_values))
            arrays["obs_mask"] = np.asarray(self.ops.to_numpy(self._obs_mask))
        return record, arrays

    def _restore_analysis(self, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
        """Set what :meth:`_analysis_record` kept; False (nothing set) when the record does not fit this model."""
        try:
            unit_map = {n: arrays[f"unit_map/{n}"] for n in record["unit_map"]}
            gauss = [_GaussianLatentPattern(*g) for g in record["gauss"]]
            resid = [_ResidualPattern(*r) for r in record["resid"]]
            names = {n for g in gauss for n in (g.loc, g.scale) if n is not None} | {r.scale for r in resid}
            sites = {g.site for g in gauss} | {r.site for r in resid}
            if not names <= set(self.params) or not sites <= set(self.latent_names_) | set(self.observed_names) \
                    or not set(unit_map) <= set(self.observed_names):
                return False
            layouts = {}
            if record["has_gaussian_obs"]:
                for n in self.observed_names:
                    kind, full, ev = record["obs_layouts"][n]
                    gather = arrays[f"gather/{n}"] if kind == "rows" else None
                    valid = arrays[f"valid/{n}"] if kind == "rows" else None
                    layouts[n] = (kind, gather, valid, tuple(full), ev)
                values, mask = arrays["obs_values"], arrays["obs_mask"]
        except (KeyError, TypeError, ValueError):
            return False
        self._unit_map = unit_map
        if unit_map:  # as _find_unit_maps leaves the model (what the programs' fingerprints read)
            self._unit_map_arrays = {n: self.ops.asarray(m.astype(np.int64), dtype=None) for n, m in unit_map.items()}
        self._gauss, self._resid = gauss, resid
        self._mark_closed_form()
        self.has_stats = bool(self._gauss or self._resid)
        self.has_gaussian_obs, self.has_gaussian_prior = bool(record["has_gaussian_obs"]), \
            bool(record["has_gaussian_prior"])
        if self.has_gaussian_obs:
            self._obs_layouts = layouts
            self._obs_values = self.ops.asarray(values, dtype=self._dtype)
            self._obs_mask = self.ops.asarray(mask, dtype=None)
        return True

    # ----- tracing ------------------------------------------------------------------------------------
    def _find_sites(self, trace: dict[str, Site], unit_plate: str | None) -> None:
        latent = [n for n, s in trace.items() if s.type == "sample" and not s.is_observed]
        observed = [n for n, s in trace.items() if s.type == "sample" and s.is_observed]
        for n in observed:
            check_obs_container(self.ppl, trace[n])
        self._imputed = self._leaf_imputations(trace, latent, observed)
        latent = [n for n in latent if n not in self._imputed]
        if not observed:
            raise ModelSpecificationError(
                f"the model has no observed sample site: every {self.ppl.name}.sample site ({', '.join(latent)}) is "
                "latent. Did you pass the data (obs=...)? run(...) must give the model the arrays its observed "
                "sites read (e.g. the y of obs=y)")
        if not latent:
            raise ModelSpecificationError(
                f"the model has no latent sample site (every {self.ppl.name}.sample is observed): there is "
                f"nothing to integrate out; fit it with {self.ppl.name}.infer.SVI (AutoDelta guide) or MAP instead")
        frames = {n: list(trace[n].frames) for n in latent}
        frame = unit_frame(latent, frames, unit_plate, self.ppl.name)
        self.unit_plate, self.unit_dim, self.num_units = frame.name, frame.dim, int(frame.size)
        self.max_plate_nesting = max([-f.dim for s in trace.values() if s.type == "sample" for f in s.frames],
                                     default=0)
        self.observed_names, self.latent_names_ = observed, latent
        self._layout: list[_SiteLayout] = []
        offset = 0
        for n in latent:
            site = trace[n]
            fn, value = site.fn, self.ops.asarray(site.value)
            if getattr(fn.support, "is_discrete", False):
                raise discrete_latent_error(self.ppl.name, n, type(self.ppl.unwrap(fn)).__name__,
                                            bool(getattr(fn, "has_enumerate_support", False)),
                                            [m for m in latent if m != n])
            event_shape = tuple(fn.event_shape)
            batch_shape = tuple(value.shape[: value.ndim - len(event_shape)])
            unit_axis = len(batch_shape) + self.unit_dim
            if unit_axis < 0 or batch_shape[unit_axis] != self.num_units:
                raise ModelSpecificationError(
                    f"latent site {n!r} has shape {tuple(value.shape)} without the unit dim "
                    f"{self.unit_dim} of plate {self.unit_plate!r} (size {self.num_units})")
            transform = self.ppl.biject_to(fn.support)
            def unit_first(v: Any, unit_axis: int = unit_axis) -> Any:
                return self.ppl.moveaxis(self.ops.asarray(v, dtype=self._dtype), unit_axis, 0)

            # shapes only (JAX: abstract evaluation, no program)
            x_rest = self.ops.shape_of(unit_first, value)[1:]
            u_rest = self.ops.shape_of(lambda v, f=unit_first, t=transform: t.inv(f(v)), value)[1:]
            size = int(np.prod(u_rest)) if u_rest else 1
            self._layout.append(_SiteLayout(n, batch_shape, event_shape, unit_axis, transform, x_rest, u_rest,
                                            offset, size))
            offset += size
        self.latent_dim = offset
        self.latent_sites = [LatentSite(s.name, s.x_rest, s.offset, s.size) for s in self._layout]
        self._find_unread(trace, observed)

    def _find_unread(self, trace: dict[str, Site], observed: list[str]) -> None:
        """The elements of the latents that no density reads (:meth:`latent_mask`): an ``obs_mask=`` imputation site
        ``{name}_unobserved`` kept as a latent (its imputed entries feed another density: a missing covariate) holds
        an element for every entry, but both PPLs read ``where(obs_mask, y, y_unobserved)`` and mask its density to
        ``~obs_mask``: at an observed entry the element is read by nothing and has no density, a flat direction.
        Integrated over, it gave importance sampling a weight ``1 / q`` and the quadrature its grid's width per
        observed entry (a regression with a covariate missing in 30% of 1000 rows: "is" +32 619, "gq" −920 for
        −2697.8), and the random walks, always accepting there, grew their scales without bound.  Each such element
        gets the reference density ``φ`` instead (:meth:`_reference_log_density`).  Found from the observed twin's
        mask (``obs_mask`` and any mask around it: only entries it counts, which are certainly observed).  Sets
        ``_unread`` ``{site: [N, *batch dims] bool}`` and ``_latent_unread`` ``[N, d]`` (None when every element is
        read)."""
        self._unread: dict[str, np.ndarray] = {}
        self._latent_unread: np.ndarray | None = None
        suffix = "_unobserved"
        for s in self._layout:
            twin = s.name[: -len(suffix)] + "_observed" if s.name.endswith(suffix) else None
            if twin is None or twin not in observed:
                continue
            vmask = self.ppl.value_mask(trace[twin].fn, trace[twin].mask, self.ops)
            if vmask is None:
                continue
            try:
                m = np.broadcast_to(np.asarray(self.ops.to_numpy(vmask), dtype=bool), s.batch_shape + s.event_shape)
            except ValueError:
                continue
            m = np.all(m.reshape(s.batch_shape + (-1,)), -1) if s.event_shape else m  # [*batch]
            m = np.moveaxis(m, s.unit_axis, 0)  # [N, *batch dims but the unit's]
            if m.any():
                self._unread[s.name] = np.ascontiguousarray(m)
        if self._unread:
            cols = []
            for s in self._layout:
                m = self._unread.get(s.name, np.zeros((self.num_units,) + s.x_rest[:len(s.batch_shape) - 1], bool))
                m = m.reshape(m.shape + (1,) * (len(s.u_rest) - (m.ndim - 1)))
                cols.append(np.broadcast_to(m, (self.num_units,) + s.u_rest).reshape(self.num_units, s.size))
            self._latent_unread = np.concatenate(cols, -1)

    def latent_mask(self, units: Any = None) -> Any:
        """``[n, d]`` bool, False at the elements no density reads (:meth:`_find_unread`); None when there are
        none."""
        if self._latent_unread is None:
            return None
        return self._select(self.ops.asarray(~self._latent_unread, dtype=None), units, axis=-2)

    def _reference_log_density(self, z: Any, units: Any = None) -> Any:
        """``Σ_j log φ(z_ij)`` over unit i's unread elements (:meth:`LatentModel.latent_mask`), ``[..., n]``: the
        standard normal reference density that stands for the density they do not have."""
        xp = self.ops.xp
        unread = self._select(self.ops.asarray(self._latent_unread, dtype=None), units, axis=-2)
        terms = -0.5 * z * z - 0.5 * float(np.log(2.0 * np.pi))
        return xp.sum(xp.where(unread, terms, xp.zeros_like(terms)), -1)

    def _leaf_imputations(self, trace: dict[str, Site], latent: list[str], observed: list[str]) -> dict[str, Any]:
        """The imputation sites of ``obs_mask=`` observations that no other site reads -> the constant they are
        conditioned on.

        Both PPLs split ``sample(name, d, obs=y, obs_mask=m)`` into an observed site ``{name}_observed`` (masked to
        ``m``) and a latent ``{name}_unobserved`` (masked to ``~m``) that imputes the missing entries.  When no other
        site's log-density depends on the imputed values, they integrate out exactly, ``∫ p(y_mis | z; θ) dy_mis = 1``:
        ``p(y_obs, z; θ)`` is the model without them, and that is what is fitted.  Kept as latents they add nothing to
        the likelihood but dims to integrate over, flat ones at the observed entries (the masked density is 0 there):
        importance sampling's weights there are ``1 / q`` (the log-likelihood of a random-slope model came out
        +12 000 instead of -193) and the MH chains wander without bound.  A site whose value does feed another density
        (a missing covariate) stays a latent.  The test: at the initial θ and at a random perturbation of it (a
        coefficient starting at 0 hides a dependence), every other site's log-density is unchanged when the site alone
        moves to another draw from the model."""
        suffix = "_unobserved"
        candidates = [n for n in latent if n.endswith(suffix) and n[: -len(suffix)] + "_observed" in observed]
        if not candidates:
            return {}
        ppl, to_np = self.ppl, self.ops.to_numpy
        values = {n: trace[n].value for n in latent}
        key = self.ops.key(5)

        # each a compiled program on JAX (eagerly, each of the model's operations compiled apart: 1.4 s of a
        # 40-group NumPyro model's 4.5 s set-up)
        def draw(k: Any) -> dict[str, Any]:
            sites = ppl.run(self.fn, self.args, self.kwargs, key=k)
            return {n: sites[n].value for n in candidates}

        def lps(theta: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
            sites = ppl.run(self.fn, self.args, self.kwargs, params=theta, values=given)
            return {n: self._site_lp(s) for n, s in sites.items() if s.type == "sample"}

        lps_program = self.ops.jit(lps)
        with ppl.no_grad():
            with self.ops.global_rng_from(key):  # Pyro draws from the global RNG: lend it the key's stream
                other = self.ops.jit(draw)(key)
            thetas = [dict(self.init_params()), self._perturbed_params()]
            before = [{n: to_np(v) for n, v in lps_program(theta, values).items()} for theta in thetas]
            leaves = {}
            for name in candidates:
                same = True
                for theta, ref in zip(thetas, before):
                    after = {n: to_np(v) for n, v in lps_program(theta, {**values, name: other[name]}).items()}
                    same = same and all(np.array_equal(lp, after[n], equal_nan=True)
                                        for n, lp in ref.items() if n != name and n in after)
                if same:
                    leaves[name] = self.ops.asarray(0.0, dtype=self._dtype)
        return leaves

    def _check_observed(self, trace: dict[str, Site]) -> None:
        self.observed = {}
        self._masked_fill = {}
        self._unit_observed: list[tuple[Any, int]] = []  # observed values as the model got them, their unit axis
        self._in_unit_plate = {}
        self._lp_shape = {}
        for n in self.observed_names + self.latent_names_:
            site = trace[n]
            self._in_unit_plate[n] = any(f.name == self.unit_plate for f in site.frames)
            self._lp_shape[n] = self._site_shape(site)
        for n in self.observed_names:
            site = trace[n]
            value = self.ops.to_numpy(site.value)
            support = getattr(site.fn, "support", None)
            if value.dtype == bool and not getattr(support, "is_discrete", True):
                family = type(getattr(site.fn, "base_dist", site.fn)).__name__
                raise DataError(f"observed site {n!r} holds bool values, but its {family} is a continuous "
                                "distribution: pass numbers (e.g. y.double() / y.astype(float))")
            nonfinite = ~np.isfinite(value) if np.issubdtype(value.dtype, np.number) else np.zeros(value.shape, bool)
            unmasked = np.ones(value.shape, bool)
            vmask = self.ppl.value_mask(site.fn, site.mask, self.ops)
            if vmask is not None:
                m = np.asarray(self.ops.to_numpy(vmask), dtype=bool)
                try:
                    unmasked = np.broadcast_to(m, value.shape)
                except ValueError:
                    pass
            nbad = int((nonfinite & unmasked).sum())
            if nbad:
                raise DataError(
                    f"observed site {n!r} holds {nbad} NaN/inf value(s) out of {value.size} at unmasked "
                    "positions; drop them or mask them with .mask(...) / obs_mask")
            if nonfinite.any():  # all masked out: read a finite value of the site there (see _fill_masked)
                finite = value[~nonfinite & unmasked]
                self._masked_fill[n] = float(finite.flat[0]) if finite.size else 0.0
            self.observed[n] = value
            axis = np.ndim(site.value) - len(site.fn.event_shape) + self.unit_dim
            if self._in_unit_plate[n] and axis >= 0 and np.shape(site.value)[axis] == self.num_units:
                self._unit_observed.append((site.value, axis))

    def _nonfinite_arguments(self) -> list[tuple[str, np.ndarray]]:
        """``(name, ~isfinite(value))`` of each numeric argument of the model (or entry of a dict / list / tuple
        argument) holding NaN/inf, named as the model's signature names it."""
        try:
            named = dict(inspect.signature(self.fn).bind_partial(*self.args, **self.kwargs).arguments)
        except (TypeError, ValueError):
            named = {**{f"argument {i}": a for i, a in enumerate(self.args)}, **self.kwargs}
        items = []
        for name, value in named.items():
            if isinstance(value, dict):
                items += [(f"{name}[{k!r}]", v) for k, v in value.items()]
            elif isinstance(value, (list, tuple)):
                items += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            else:
                items.append((name, value))
        out = []
        for name, value in items:
            if not hasattr(value, "shape"):
                continue
            try:
                arr = np.asarray(self.ops.to_numpy(value))
            except Exception:  # not an array of this backend
                continue
            if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
                out.append((name, ~np.isfinite(arr)))
        return out

    def _check_arguments_finite(self, trace: dict[str, Site]) -> None:
        """A NaN/inf in the model's arguments (a covariate) that makes a site's log-density NaN/inf is a DataError
        naming the site, its first bad row and the argument, before the unit-map analysis (which would read the NaN
        derivatives as rows depending on several units) or the initial-density check blame the model."""
        bad_args = self._nonfinite_arguments()
        if not bad_args:
            return
        xp = self.ops.xp
        with self.ppl.no_grad():
            for name in self.latent_names_ + self.observed_names:
                lp = np.asarray(self.ops.to_numpy(xp.broadcast_to(self._site_lp(trace[name]), self._lp_shape[name])))
                if np.isfinite(lp).all():
                    continue
                first = np.unravel_index(int(np.argmax(~np.isfinite(lp))), lp.shape)
                culprit, aligned = None, False
                for arg, mask in bad_args:  # the argument NaN/inf at that row, among those laid out like the site
                    try:
                        hit = bool(np.broadcast_to(mask, lp.shape)[first])
                    except ValueError:
                        continue
                    aligned = True
                    if hit:
                        culprit = (arg, mask)
                        break
                if culprit is None:
                    if aligned:  # the arguments laid out like the site are finite there: not theirs
                        continue
                    culprit = bad_args[0]  # read through an index (x[g]): cannot tell which, name the first
                arg, mask = culprit
                where = f"row {first[0]}" if lp.ndim == 1 else f"element {tuple(int(i) for i in first)}"
                at = tuple(int(i) for i in np.argwhere(mask)[0])
                at = "" if not at else f" (the first at index {at[0] if len(at) == 1 else at})"
                kind = "observed site" if name in self.observed_names else "latent site"
                raise DataError(
                    f"the log-density of {kind} {name!r} is NaN/inf at {where}{self._plates_of(trace[name])}: the "
                    f"model's argument {arg!r} holds {int(mask.sum())} NaN/inf value(s){at}; "
                    "drop or fill those rows, or mask the observations they feed (.mask(...) / obs_mask)")

    # ----- row -> unit maps of observations outside the unit plate -------------------------------------
    def _find_unit_maps(self, trace: dict[str, Site], unit_index: Any) -> None:
        """For every observed site outside the unit plate: the unit of each element of its log-density."""
        self._unit_map: dict[str, Any] = {}
        outside = [n for n in self.observed_names if not self._in_unit_plate[n]]
        if not outside:
            return
        if unit_index is not None:
            for n in outside:
                idx = unit_index[n] if isinstance(unit_index, dict) else unit_index
                self._unit_map[n] = self._map_from_index(trace[n], np.asarray(self.ops.to_numpy(idx)))
        else:
            maps = self._detect_unit_maps(outside, trace)
            self._unit_map.update(maps)
        for n, m in self._unit_map.items():
            if m.min() < 0 or m.max() >= self.num_units:
                raise DataError(f"unit_index of site {n!r} holds values outside [0, {self.num_units})")
        self._unit_map_arrays = {n: self.ops.asarray(m.astype(np.int64), dtype=None) for n, m in
                                 self._unit_map.items()}

    def _map_from_index(self, site: Site, idx: np.ndarray) -> np.ndarray:
        shape = self._lp_shape[site.name]
        idx = idx.astype(np.int64).reshape(-1)
        axes = [a for a, s in enumerate(shape) if s == idx.size]
        if len(axes) != 1:
            raise ModelSpecificationError(
                f"unit_index has {idx.size} entries but the log-density of site {site.name!r} has shape {shape}: "
                "give one unit index per row of the site's plate")
        view = [1] * len(shape)
        view[axes[0]] = idx.size
        return np.broadcast_to(idx.reshape(view), shape).reshape(-1)

    def _lp_of_unit(self, site: Site) -> Any:
        """The site's log-density as :meth:`_detect_unit_maps` reads it: with its masks off (``.mask(m)``,
        ``obs_mask=``, a mask handler) wherever that is finite, broadcast to its traced shape.  A masked-out element's
        log-density is a constant 0, free of every latent: it went to unit 0, whose layout then held every masked
        observation of the data, and the batched reverse-mode Jacobians of the predictions (summed over units) added
        their rows to their own units' (the linearised log-likelihood, the Gauss–Newton precisions of the EBEs and the
        lin standard errors off).  Unmasked, the element depends on its own unit's latents.  The ``.to_event`` dims
        are summed as the distribution's own log-density sums them."""
        masked = self._broadcast_lp(site)
        fn = site.fn
        if site.mask is None and self.ppl.value_mask(fn, None, self.ops) is None:
            return masked
        xp = self.ops.xp
        base = self.ppl.unwrap(fn)
        lp = self.ppl.log_prob(base, site.value)
        extra = len(fn.event_shape) - len(base.event_shape)  # the dims .to_event(k) reinterpreted
        if extra > 0:
            lp = lp.reshape(tuple(lp.shape[:lp.ndim - extra]) + (-1,)).sum(-1)
        lp = xp.broadcast_to(lp, tuple(masked.shape))
        # a masked placeholder outside the support (its density not finite): as before, free of every latent
        return xp.where(xp.isfinite(lp), lp, masked)

    def _detect_unit_maps(self, names: list[str], trace: dict[str, Site] | None = None
                          ) -> dict[str, np.ndarray]:
        """Which unit's latents each element depends on, by three forward derivatives.

        With tangents ``t_c = w · (i + 1)^c`` on unit i's latents (c = 0, 1, 2; ``w`` random positive
        weights per latent coordinate), an element depending on unit u only has derivatives
        ``J_c = g · (u + 1)^c``: ``J_1 / J_0 − 1`` is its unit, and ``J_2 / J_0 = (u + 1)²`` confirms it.  An
        element whose derivatives are NaN/inf at a draw (a latent drawn outside the model's domain) is read at further
        draws; one NaN/inf at all of them is refused, naming the site and the elements (``trace``: the first run, for
        the site's plates in the message).
        """
        rng = np.random.default_rng(7)
        theta = self.init_params()
        n, d = self.num_units, self.latent_dim
        weights = self.ops.asarray(0.5 + rng.random(d))
        ranks = self.ops.asarray(np.arange(1, n + 1, dtype=np.float64))

        def per_element(z):
            values, _ = self._split_one(z)
            sites = self._run(theta, values)
            xp = self.ops.xp
            return xp.concatenate([self._lp_of_unit(sites[m]).reshape(-1) for m in names])

        sizes = [int(np.prod(self._lp_shape[m])) for m in names]

        def site_of(element: int) -> str:
            return names[int(np.searchsorted(np.cumsum(sizes), element, side="right"))]

        units, pending = None, None
        attempts = 2 + self.initial_redraws // 4
        for attempt in range(attempts):
            if attempt >= 2 and not pending.any():
                break
            z = self.sample_prior(theta, self.ops.key(11 + attempt), 1)[0]
            jac = [self.ops.to_numpy(self.ppl.jvp(per_element, z, weights * ranks[:, None] ** c)) for c in range(3)]
            # an element whose log-density is NaN/inf at this draw (a latent drawn outside the model's domain) tells
            # nothing here: redrawn below
            finite = np.isfinite(jac[0]) & np.isfinite(jac[1]) & np.isfinite(jac[2])
            with np.errstate(divide="ignore", invalid="ignore"):
                r1, r2 = jac[1] / jac[0], jac[2] / jac[0]
            top = float(np.max(np.abs(jac[0][finite]), initial=0.0))
            zero = finite & (np.abs(jac[0]) <= 1e-12 * max(1.0, top))
            u = np.rint(np.where(finite, r1, 1.0)) - 1
            with np.errstate(invalid="ignore"):
                single = ~finite | zero | ((np.abs(r1 - np.rint(r1)) < 1e-3 * np.maximum(1.0, np.abs(r1)))
                                           & (np.abs(r2 - (u + 1) ** 2) < 1e-3 * np.maximum(1.0, (u + 1) ** 2)))
            if not single.all():
                site = site_of(int(np.argmin(single)))
                raise ModelSpecificationError(
                    f"observed site {site!r} is outside the unit plate {self.unit_plate!r} and some of its elements "
                    f"depend on the latents of several units: latentfit cannot tell which unit each row belongs to. "
                    f"Pass unit_index=<int array: the unit of each row of {site!r}>, or put the observations "
                    f"inside the plate {self.unit_plate!r}")
            u = np.where(zero | ~finite, -1, u).astype(np.int64)
            units = u if units is None else np.where(units < 0, u, units)
            pending = ~finite if pending is None else pending & ~finite
        if pending.any():
            site = site_of(int(np.argmax(pending)))
            start = sum(sizes[:names.index(site)])
            bad = np.flatnonzero(pending[start:start + sizes[names.index(site)]])
            shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
            plates = self._plates_of(trace[site]) if trace is not None else ""
            raise ModelSpecificationError(
                f"the log-density of observed site {site!r} is NaN/inf at {bad.size} of its {sizes[names.index(site)]} "
                f"element(s) (index {shown}{plates}) at the initial parameter "
                f"values, at each of {attempts} draw(s) of the latents from the model's prior: {_NONFINITE_HINT}")
        units = np.where(units < 0, 0, units)  # elements free of every latent: any unit (a constant there)
        return dict(zip(names, np.split(units, np.cumsum(sizes)[:-1])))

    # ----- running the model with given θ and one chain of z ------------------------------------------
    def _split_one(self, z: Any, units: Any = None) -> tuple[dict[str, Any], Any]:
        """``[N, d]`` unconstrained -> site values (constrained, site layout) and Σ log|J| ``[N]`` (N: the rows of
        ``z``, all units or a mini-batch's, ``units``).  An element no density reads (:meth:`_find_unread`) is
        given to the model at ``u = 0`` and has no log|J|: it has no density to carry to the unconstrained space (a
        positive imputed covariate's ``exp`` made its flat direction ``e^u``, a drift for the chains and a term of the
        integrand; its reference density is added by :meth:`_densities_one`), and whatever its chain holds never
        reaches the model (wandering without bound, it made ``exp`` overflow and the masked density NaN)."""
        xp = self.ops.xp
        n = int(z.shape[0])
        values, ladj_total = {}, 0.0
        for s in self._layout:
            u = z[:, s.offset:s.offset + s.size].reshape((n,) + s.u_rest)
            unread = self._unread.get(s.name)
            if unread is not None:
                m = self._select(self.ops.asarray(unread, dtype=None), units, axis=-unread.ndim)
                u = xp.where(m.reshape(tuple(m.shape) + (1,) * (u.ndim - m.ndim)), xp.zeros_like(u), u)
            x = s.transform(u)
            ladj = s.transform.log_abs_det_jacobian(u, x)
            ladj = xp.broadcast_to(ladj, (n,) + tuple(ladj.shape[1:])) if ladj.ndim else xp.broadcast_to(ladj, (n,))
            if unread is not None and ladj.ndim >= unread.ndim:
                ladj = xp.where(m.reshape(tuple(m.shape) + (1,) * (ladj.ndim - m.ndim)), xp.zeros_like(ladj), ladj)
            ladj_total = ladj_total + ladj.reshape(n, -1).sum(-1)
            values[s.name] = self.ppl.moveaxis(x, 0, s.unit_axis)
        return values, ladj_total

    def _lp_shape_of(self, name: str, count: int | None = None) -> tuple[int, ...]:
        """Shape of site ``name``'s log-density over all units, or over ``count`` units of a mini-batch."""
        shape = self._lp_shape[name]
        axis = len(shape) + self.unit_dim
        if count is None or not self._in_unit_plate[name] or axis < 0 or shape[axis] != self.num_units:
            return shape
        return shape[:axis] + (int(count),) + shape[axis + 1:]

    def _broadcast_lp(self, site: Site, count: int | None = None) -> Any:
        """The site's masked log-density, broadcast to its traced shape (of ``count`` units of a mini-batch)."""
        return self.ops.xp.broadcast_to(self._site_lp(site), self._lp_shape_of(site.name, count))

    def _densities_one(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """``(log p(y_i | z_i; θ), log p(z_i; θ) + log|J|)`` of one chain ``z [N, d]`` (with ``units``: ``z`` holds
        those units only and the model is run on them alone)."""
        count = None if units is None else int(z.shape[0])
        values, ladj = self._split_one(z, units)
        sites = self._run(theta, values, units)
        ll = 0.0
        for name in self.observed_names:
            ll = ll + self._per_unit(self._broadcast_lp(sites[name], count), name, count)
        lp = ladj
        for name in self.latent_names_:
            lp = lp + self._per_unit(self._broadcast_lp(sites[name], count), None, count)
        if self._latent_unread is not None:
            lp = lp + self._reference_log_density(z, units)
        xp = self.ops.xp
        ll = xp.zeros_like(lp) + ll
        return ll, lp

    def _sample_one(self, theta: dict[str, Any], key: Any) -> Any:
        xp = self.ops.xp
        sites = self.ppl.run(self.fn, self.args, self.kwargs, params=theta, key=key)
        parts = []
        for s in self._layout:
            x = xp.broadcast_to(sites[s.name].value, s.batch_shape + s.event_shape)
            u = s.transform.inv(self.ppl.moveaxis(x, s.unit_axis, 0))
            parts.append(u.reshape(self.num_units, s.size))
        return self.ops.asarray(xp.concatenate(parts, -1), dtype=self._dtype)

    def _resid_one(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        xp = self.ops.xp
        count = None if units is None else int(z.shape[0])
        values, _ = self._split_one(z)
        sites = self._run(theta, values, units)
        out = {}
        for r in self._resid:
            site = sites[r.site]
            base = self.ppl.unwrap(site.fn)
            resid2 = (site.value - base.loc) ** 2
            ones = xp.ones_like(resid2)
            vmask = self.ppl.value_mask(site.fn, site.mask, self.ops)
            if vmask is not None:
                resid2 = xp.where(vmask, resid2, xp.zeros_like(resid2))
                ones = xp.where(vmask, ones, xp.zeros_like(ones))
            ev = len(site.fn.event_shape)
            if ev:  # .to_event(k): sum the event dims (the site's log-density shape)
                resid2 = resid2.reshape(tuple(resid2.shape[: resid2.ndim - ev]) + (-1,)).sum(-1)
                ones = ones.reshape(tuple(ones.shape[: ones.ndim - ev]) + (-1,)).sum(-1)
            shape = self._lp_shape_of(r.site, count)
            out[f"{r.site}.rss"] = self._per_unit(xp.broadcast_to(resid2, shape), r.site, count)
            out[f"{r.site}.nobs"] = self._per_unit(xp.broadcast_to(ones, shape), r.site, count)
        return out

    # ----- the LatentModel contract -------------------------------------------------------------------------
    def _full_z(self, z: Any, units: Any) -> Any:
        """The batch's latents ``z [..., b, d]`` placed among all N units for a run of the whole model; the other
        units sit at the batch's mean latent (a value the model is finite at wherever it is at the batch's own: at
        0, a one-compartment model has ka = ke and its 0/0 made the gradient of a mini-batch NaN through the units
        it then drops).  The units are independent given θ, so the batch's densities do not depend on that value."""
        if units is None:
            return z
        xp = self.ops.xp
        # an empty batch (a data-parallel process owning none of a mini-batch's units): the others at 0, not at the
        # NaN mean of no latents (a distribution's argument check would refuse it)
        fill = self.ops.stop_gradient(xp.mean(z, -2, keepdims=True)) if z.shape[-2] else 0.0 * xp.sum(z, -2,
                                                                                                       keepdims=True)
        full = xp.broadcast_to(fill, tuple(z.shape[:-2]) + (self.num_units, z.shape[-1])) + 0.0 * fill
        lead = int(np.prod(z.shape[:-2]))  # explicit: ``-1`` is ambiguous for a batch of no units
        return self.ops.scatter_axis1(full.reshape((lead,) + tuple(full.shape[-2:])), self._index(units),
                                      z.reshape((lead,) + tuple(z.shape[-2:]))).reshape(full.shape)

    def _select(self, x: Any, units: Any, axis: int = -1) -> Any:
        return x if units is None else self.ops.take(x, self._index(units), axis=x.ndim + axis)

    def _chains(self, f: Any, theta: dict[str, Any], z: Any, *rest: Any) -> tuple[Any, tuple[int, ...]]:
        z = self.ops.asarray(z)
        lead = tuple(z.shape[:-2])
        out = self._guard(f, dict(theta), z.reshape((int(np.prod(lead)),) + tuple(z.shape[-2:])), *rest)
        return out, lead

    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        if units is not None and self.batch_path:  # a mini-batch costs a mini-batch: the model runs on it alone
            (ll, lp), lead = self._chains(self._densities_batch, theta, z, self._index(units))
            b = len(units)
            return ll.reshape(lead + (b,)), lp.reshape(lead + (b,))
        (ll, lp), lead = self._chains(self._densities_all, theta, self._full_z(self.ops.asarray(z), units))
        ll, lp = ll.reshape(lead + (self.num_units,)), lp.reshape(lead + (self.num_units,))
        return self._select(ll, units), self._select(lp, units)

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        if key is None:
            key = self.ops.key(0)
        if self._latent_unread is not None:  # the unread elements from their reference density (latent_mask)
            key, k_ref = self.ops.split(key, 2)
            z = self._sample_prior(theta, key, num_chains, units)
            unread = self._select(self.ops.asarray(self._latent_unread, dtype=None), units, axis=-2)
            return self.ops.xp.where(unread, self.ops.asarray(self.ops.normal(k_ref, tuple(z.shape)), dtype=z.dtype),
                                     z)
        return self._sample_prior(theta, key, num_chains, units)

    def _sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        if self._gauss and len(self._gauss) == len(self._layout):
            return self._sample_gaussian_prior(theta, key, num_chains, units)
        keys = self.ops.split(key, num_chains)
        # the PPL's own samplers draw from the global RNG (Pyro): lend them the key's stream
        with self.ppl.no_grad(), self.ops.global_rng_from(key):
            z = self._guard(self._sample_all, dict(theta), keys)
        return self._select(z, units, axis=-2)

    def _sample_gaussian_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any) -> Any:
        """All latents follow a recognised Gaussian pattern: draw ``μ + ω ε`` (or ``μ + Lε``) directly."""
        xp = self.ops.xp
        n = self.num_units if units is None else len(units)
        keys = self.ops.split(key, len(self._layout))
        parts = []
        for s, k in zip(self._layout, keys):
            g = next(x for x in self._gauss if x.site == s.name)
            mu = self.ops.stop_gradient(theta[g.loc]).reshape(-1) if g.loc is not None else 0.0
            eps = self.ops.normal(k, (num_chains, n, s.size))
            scale = self.ops.stop_gradient(theta[g.scale])
            if g.kind == "normal":
                parts.append(mu + scale.reshape(-1) * eps)
            else:
                tril = scale if g.kind == "mvn_tril" else self.ops.cholesky(scale)
                parts.append(mu + eps @ tril.T)
        return self.ops.asarray(xp.concatenate(parts, -1), dtype=self._dtype)

    def closed_form_log_prior(self) -> Any:
        """Every latent a recognised Gaussian pattern (``Normal(μ, ω)``, ``MultivariateNormal(μ, Ω)`` with params μ, ω,
        Ω of the site's per-unit size or scalars): ``(theta, z, units) -> Σ_sites log N(z_s; μ, Ω)`` ``[..., n]``, the
        unconstrained latents' log-prior without running the model (a LogNormal site's log-Jacobian, free of θ, left
        out); None otherwise."""
        if not self._gauss or len(self._gauss) != len(self._layout) or self._latent_unread is not None:
            return None
        pats = []
        for s in self._layout:
            g = next((x for x in self._gauss if x.site == s.name), None)
            if g is None:
                return None
            size = {n: int(np.prod(tuple(self.params[n].value.shape))) for n in (g.loc, g.scale) if n is not None}
            if g.loc is not None and size[g.loc] not in (1, s.size) or \
                    size[g.scale] not in ((1, s.size) if g.kind == "normal" else (s.size * s.size,)):
                return None
            pats.append((s.offset, s.size, g))
        xp, half_log_2pi = self.ops.xp, 0.5 * float(np.log(2.0 * np.pi))

        def log_prior(theta: dict[str, Any], z: Any, units: Any = None) -> Any:
            total = 0.0
            for offset, size, g in pats:
                r = z[..., offset:offset + size] - (theta[g.loc].reshape(-1) if g.loc is not None else 0.0)
                if g.kind == "normal":
                    sd = theta[g.scale].reshape(-1)
                    total = total + xp.sum(-0.5 * (r / sd) ** 2 - xp.log(sd) - half_log_2pi, -1)
                else:
                    m = theta[g.scale].reshape(size, size)
                    chol = m if g.kind == "mvn_tril" else xp.linalg.cholesky(m)
                    u = r @ xp.swapaxes(xp.linalg.inv(chol), -1, -2)  # L⁻¹ r per unit
                    total = total + (-0.5 * xp.sum(u * u, -1) - xp.sum(xp.log(xp.abs(xp.diagonal(chol))))
                                     - size * half_log_2pi)
            return total

        dim = self.latent_dim

        def moments(theta: dict[str, Any]) -> tuple[Any, Any]:
            """Every unit's prior mean ``[d]`` and the lower Cholesky factor ``[d, d]`` of its covariance (the same
            for every unit: the patterns' parameters are params), from θ without running the model."""
            mean, chol = [], self.ops.zeros((dim, dim), dtype=self._dtype)
            for offset, size, g in pats:
                loc = theta[g.loc].reshape(-1) if g.loc is not None else self.ops.zeros((1,), dtype=self._dtype)
                mean.append(xp.broadcast_to(loc, (size,)))
                if g.kind == "normal":
                    block = xp.broadcast_to(theta[g.scale].reshape(-1), (size,))[:, None] * self.ops.asarray(
                        np.eye(size), dtype=self._dtype)
                else:
                    m = theta[g.scale].reshape(size, size)
                    block = m if g.kind == "mvn_tril" else xp.linalg.cholesky(m)
                rows = self.ops.asarray(np.eye(dim)[:, offset:offset + size], dtype=self._dtype)  # [d, size]
                chol = chol + rows @ block @ xp.swapaxes(rows, -1, -2)
            return xp.concatenate(mean, -1), chol

        roles = [(g.loc, "loc") for _, _, g in pats if g.loc is not None] + [(g.scale, "scale") for _, _, g in pats]
        diagonal = all(g.kind == "normal" for _, _, g in pats) and all(
            {r for m, r in roles if m == n} != {"loc", "scale"} for n, _ in roles)

        def information(theta: dict[str, Any]) -> dict[str, Any]:
            """One unit's Fisher information ``E[−∇²_θ log p(z; θ)]`` in the constrained parameters, diagonal: for
            ``Normal(μ, σ)`` per coordinate ``1/σ²`` for μ and ``2/σ²`` for σ (cross terms 0), summed over the
            coordinates (and sites) a parameter entry serves; ``{name: [size]}``."""
            out: dict[str, Any] = {}
            for _, size, g in pats:
                prec = 1.0 / xp.broadcast_to(theta[g.scale].reshape(-1), (size,)) ** 2  # 1/σ_c² per coordinate
                for name, value in ((g.loc, prec), (g.scale, 2.0 * prec)):
                    if name is None:
                        continue
                    n = int(np.prod(tuple(self.params[name].value.shape)))
                    add = value if n == size else xp.sum(value, -1, keepdims=True)
                    out[name] = out[name] + add if name in out else add
            return out

        #: every unit's prior is the same (its parameters are params, no unit's data): MCMCSGD's exact information
        #: is then one unit's times the number of units (:meth:`MCMCSGD._fisher_step`): ``information`` in closed
        #: form (Normal sites, no parameter both a mean and a scale), else the log-prior's Hessian at ``moments``'
        #: sigma points
        log_prior.same_for_every_unit = True
        log_prior.moments = moments
        log_prior.information = information if diagonal else None
        return log_prior

    # ----- MISSO's Böhning surrogate (logistic likelihoods, Gaussian latents) -----------------------------------
    def logistic_design(self, theta: dict[str, Any]) -> LogisticDesign:
        """The affine structure of MISSO's ``surrogate="bohning"`` (:class:`~latentfit.inference.model.LogisticDesign`):
        every latent a recognised ``Normal(μ, ω)`` pattern, every observed site a Bernoulli (or Binomial with a fixed
        ``total_count``) whose logits are affine in the latents and the free parameters jointly; raises
        :class:`LogisticDesignError` (a :class:`ModelSpecificationError`) with the reason otherwise.

        The logits' coefficients are read by differences (exact for an affine map, up to rounding): ``η(z, θ)`` at
        z = 0, θ = ``theta`` and at unit steps of each latent coordinate (the same for every unit: a row's logit
        depends on its own unit's latents only) and of each free parameter's entry; checked at two random points."""
        xp, ops = self.ops.xp, self.ops
        prior = self.closed_form_log_prior()
        if prior is None or any(g.kind != "normal" for g in self._gauss):
            raise LogisticDesignError(
                "MISSO surrogate='bohning' needs every latent to be a Normal(loc, scale) site whose loc and scale are "
                "params (or 0) of the site's size or scalars; this model's latents are not")
        free = [n for n, p in self.params.items() if not p.fixed]
        if not free:
            raise LogisticDesignError("MISSO surrogate='bohning': the model has no free parameter")
        scales = {g.scale for g in self._gauss}
        locs = {g.loc for g in self._gauss if g.loc is not None}
        if scales & locs:
            raise LogisticDesignError("MISSO surrogate='bohning': a param is both a latent's loc and a scale")
        for n in free:
            info = self.params[n]
            v = ops.asarray(info.value, dtype=self._dtype)
            if n not in scales and float(ops.to_numpy(xp.max(xp.abs(info.to_unconstrained(v + 1.0) - v - 1.0)))) > 1e-9:
                raise LogisticDesignError(
                    f"MISSO surrogate='bohning': param {n!r} is constrained; the surrogate is quadratic in the natural "
                    "coordinates, which only the latents' scales (sign-free) may leave unconstrained")
        shapes = {n: tuple(np.shape(ops.to_numpy(theta[n]))) for n in free}
        sizes = [int(np.prod(shapes[n])) if shapes[n] else 1 for n in free]
        q, d, n_units = int(sum(sizes)), self.latent_dim, self.num_units
        event_dims: dict[str, int] = {}

        def logits_of(th: dict[str, Any], z: Any) -> list[tuple[Any, Any, Any]]:
            """``(logits, weight, value)`` per observed site, each of the site's value shape (weight: the Böhning
            curvature ``total_count/4``, 0 where masked)."""
            values, _ = self._split_one(z)
            sites = self._run(th, values)
            out = []
            for name in self.observed_names:
                site = sites[name]
                fn = self.ppl.unwrap(site.fn)
                kind = type(fn).__name__
                if not (kind.startswith("Bernoulli") or kind.startswith("Binomial")):
                    raise LogisticDesignError(
                        f"MISSO surrogate='bohning' needs Bernoulli or Binomial observed sites; {name!r} is {kind}")
                vshape = tuple(np.shape(site.value))
                event_dims[name] = len(site.fn.event_shape)
                logits = xp.broadcast_to(fn.logits, vshape)
                count = fn.total_count if kind.startswith("Binomial") else 1.0
                weight = xp.broadcast_to(0.25 * ops.asarray(count, dtype=self._dtype) + 0.0 * logits, vshape)
                vmask = self.ppl.value_mask(site.fn, site.mask, ops)
                if vmask is not None:
                    weight = xp.where(xp.broadcast_to(vmask, vshape), weight, xp.zeros_like(weight))
                out.append((logits, weight, xp.broadcast_to(ops.asarray(site.value, dtype=self._dtype), vshape),
                            count))
            return out

        th0 = {k: ops.asarray(v, dtype=self._dtype) for k, v in theta.items()}
        z0 = ops.zeros((n_units, d), dtype=self._dtype)
        base = logits_of(th0, z0)
        eye_d = np.eye(d)
        cols: list[list[Any]] = [[] for _ in base]  # per site: the d + q coefficient arrays
        for k in range(d):
            step = logits_of(th0, z0 + ops.asarray(eye_d[k], dtype=self._dtype))
            for s, (a, b) in enumerate(zip(step, base)):
                cols[s].append(a[0] - b[0])
        offsets = np.cumsum([0] + sizes)
        for i, n in enumerate(free):
            for j in range(sizes[i]):
                e = np.zeros(sizes[i])
                e[j] = 1.0
                th = dict(th0)
                th[n] = th0[n] + ops.asarray(e.reshape(shapes[n]), dtype=self._dtype)
                step = logits_of(th, z0)
                for s, (a, b) in enumerate(zip(step, base)):
                    cols[s].append(a[0] - b[0])
        rng = np.random.default_rng(0)
        for _ in range(2):  # affine in (z, θ) jointly: the prediction from the coefficients at random points
            u, dt = rng.normal(size=d), rng.normal(size=q)
            th = dict(th0)
            for i, n in enumerate(free):
                th[n] = th0[n] + ops.asarray(dt[offsets[i]:offsets[i + 1]].reshape(shapes[n]), dtype=self._dtype)
            got = logits_of(th, z0 + ops.asarray(u, dtype=self._dtype))
            coef = np.concatenate([u, dt])
            for s, (g, b) in enumerate(zip(got, base)):
                pred = b[0] + sum(float(coef[c]) * cols[s][c] for c in range(d + q))
                err = float(ops.to_numpy(xp.max(xp.abs(g[0] - pred))))
                ref = 1.0 + float(ops.to_numpy(xp.max(xp.abs(g[0]))))
                if not err <= 1e-8 * ref:
                    raise LogisticDesignError(
                        f"MISSO surrogate='bohning' needs logits affine in the latents and the free params; those of "
                        f"{self.observed_names[s]!r} are not (off by {err:.3g} at a random point)")

        # every element of every observed site: its unit, its coefficients w̃ = (a, b), its pairs' products w̃_a w̃_b
        units_of, w_rows = [], []
        for s, name in enumerate(self.observed_names):
            vshape = tuple(np.shape(ops.to_numpy(base[s][0])))
            ev = event_dims[name]
            lp_shape = vshape[:len(vshape) - ev]
            if name in self._unit_map:
                per_lp = np.asarray(self._unit_map[name]).reshape(-1)
            else:
                axis = len(lp_shape) + self.unit_dim
                per_lp = np.broadcast_to(np.arange(n_units).reshape((-1,) + (1,) * (len(lp_shape) - axis - 1)),
                                         lp_shape).reshape(-1)
            units_of.append(np.repeat(per_lp, int(np.prod(vshape[len(vshape) - ev:])) if ev else 1))
            w_rows.append(xp.stack([xp.reshape(ops.stop_gradient(c), (-1,)) for c in cols[s]], -1))  # [R_s, D]
        # each unit's elements gathered into a padded block [N, T] (index R: a zero element), no scatter per draw
        unit_of = np.concatenate(units_of)
        order = np.argsort(unit_of, kind="stable")
        counts = np.bincount(unit_of, minlength=n_units)
        width = max(int(counts.max()) if counts.size else 0, 1)
        slot = np.arange(unit_of.size) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        gather = np.full((n_units, width), unit_of.size, dtype=np.int64)
        gather[unit_of[order], slot] = order
        gather_idx = ops.asarray(gather.reshape(-1), dtype=None)
        w_all = xp.concatenate(w_rows, 0)  # [R, D]
        weight_all = xp.concatenate([xp.reshape(b[1], (-1,)) for b in base], 0)  # [R]

        def by_unit(x: Any) -> Any:
            """``[..., R] -> [..., N, T]``: every unit's elements (0 in the padding)."""
            pad = xp.concatenate([x, xp.zeros_like(x[..., :1])], -1)
            return xp.reshape(ops.take(pad, gather_idx, axis=pad.ndim - 1), tuple(x.shape[:-1]) + (n_units, width))

        w_units = xp.stack([by_unit(w_all[:, c]) for c in range(d + q)], -1)  # [N, T, D]
        w_units_t = xp.swapaxes(w_units, -1, -2)  # [N, D, T]
        p_rows = ops.stop_gradient((w_units_t * by_unit(weight_all)[:, None, :]) @ w_units)  # Σ_r c_r w̃ w̃ᵀ
        scale_cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(free) if n in scales]
                                    or [np.zeros(0, int)]).astype(int)
        for c in scale_cols:  # a scale must enter through the latents only (the likelihood is then even in its sign)
            if float(ops.to_numpy(xp.max(xp.abs(w_all[:, d + c])))) > 0.0:
                raise LogisticDesignError("MISSO surrogate='bohning': a latent's scale param enters the logits")

        def rows_one(th: dict[str, Any], z: Any) -> tuple[Any, Any]:
            """Every element's ``y_r − count_r σ(η_r)`` and Jaakkola–Jordan curvature ``count_r (σ(η_r) − ½)/η_r``
            (≤ Böhning's ``count_r / 4``), 0 where masked: ``[R]`` each."""
            resid, lam = [], []
            for logits, weight, value, count in logits_of(th, z):
                on = weight > 0
                prob = 1.0 / (1.0 + xp.exp(-logits))
                small = xp.abs(logits) < 1e-4
                safe = xp.where(small, xp.ones_like(logits), logits)
                resid.append(xp.reshape((value - count * prob) * on, (-1,)))
                lam.append(xp.reshape(xp.where(small, 0.25 + 0.0 * logits, (prob - 0.5) / safe) * count * on, (-1,)))
            return xp.concatenate(resid, 0), xp.concatenate(lam, 0)

        rows_all = self.ppl.vectorise(rows_one)

        def scores(th: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
            """Per unit, ``Σ_r (y_r − count_r σ(η_r)) w̃_r`` ``[..., b, D]``, ``Σ_r λ_r w̃_r w̃_rᵀ`` ``[..., b, D, D]``."""
            (resid, lam), lead = self._chains(rows_all, th, self._full_z(ops.asarray(z), units))
            resid, lam = resid.reshape((-1, int(resid.shape[-1]))), lam.reshape((-1, int(lam.shape[-1])))
            wu, wut = (w_units, w_units_t) if units is None else \
                (take_units(ops, w_units, units), take_units(ops, w_units_t, units))
            r_u, l_u = by_unit(resid), by_unit(lam)  # [L, N, T]
            if units is not None:
                r_u, l_u = take_units(ops, r_u, units, 1), take_units(ops, l_u, units, 1)
            g = (r_u[..., None, :] @ wu)[..., 0, :]  # [L, b, D]
            c = (wut * l_u[..., None, :]) @ wu  # [L, b, D, D]
            b = int(g.shape[-2])
            return g.reshape(lead + (b, d + q)), c.reshape(lead + (b, d + q, d + q))

        return LogisticDesign(names=free, shapes=shapes, curvature=ops.stop_gradient(p_rows), scores=scores,
                              moments=prior.moments, scale_cols=scale_cols)

    def unit_data_axes(self) -> list[tuple[Any, int]]:
        """The model's array arguments with a unit axis, found from its plate structure: an observed value in the
        unit plate (or an argument of its shape, a design laid out like it) along the axis the plate's ``dim`` gives
        it (``ndim − event_dim + dim``); another argument along the axis ``dim`` counts from its right (the plate's
        broadcasting rule), when that axis has the units' length.  ``run(devices=n)`` splits them along it."""
        out: list[tuple[Any, int]] = []
        by_shape = {tuple(np.shape(v)): axis for v, axis in reversed(self._unit_observed)}

        def visit(x: Any) -> None:
            if isinstance(x, dict):
                for v in x.values():
                    visit(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    visit(v)
            elif hasattr(x, "shape") and hasattr(x, "dtype"):
                shape = tuple(np.shape(x))
                axis = next((a for v, a in self._unit_observed if v is x), by_shape.get(shape))
                if axis is None and len(shape) + self.unit_dim >= 0 \
                        and shape[len(shape) + self.unit_dim] == self.num_units:
                    axis = len(shape) + self.unit_dim
                if axis is not None:
                    out.append((x, axis))

        visit(self.args)
        visit(self.kwargs)
        # observed values the model holds itself (a closure's data): the same arrays its runs capture
        out += [(v, a) for v, a in self._unit_observed if not any(v is x for x, _ in out)]
        return out

    def pad_extent(self) -> dict[str, int] | None:
        """The rows of each observed site outside the unit plate (rows reading ``alpha[group_idx]``), None if there is
        none: what a ``distributed="local"`` JAX fit gathers from every process to pad the rows alike
        (:meth:`pad_units`)."""
        if not self._unit_map:
            return None
        return {name: int(np.prod(self._lp_shape[name])) for name in sorted(self._unit_map)}

    def pad_units(self, size: int, rows: dict[str, int] | None = None) -> TracedLatentModel:
        """This model traced again on its array arguments padded along their unit axes (:meth:`unit_data_axes`) to
        ``size`` units with copies of the last unit (the dummy units of a ``distributed="local"`` JAX fit with blocks
        of unequal size, :mod:`~latentfit.inference.padding`).  Rows outside the unit plate (``alpha[group_idx]``)
        are padded to ``rows[site]`` with copies of the last row read by the last dummy unit (:meth:`_pad_rows`).
        Refused for per-unit data the model holds itself (a closure's), and when the plate's size does not follow
        the arrays."""
        from latentfit.inference.padding import pad_axis

        if self._unit_map:
            return self._pad_rows(size, rows)
        if size == self.num_units:
            return self
        axes = self.unit_data_axes()
        held = [a for a, _ in self._unit_observed
                if not any(a is x for x, _ in axes if self._is_argument(x))]
        if held:
            raise ModelSpecificationError(
                "distributed='local' on JAX with blocks of unequal size pads the model's array arguments; this model "
                "holds per-unit data itself (a closure's): pass the data as arguments, or give every process the "
                "same number of units")

        def pad(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: pad(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(pad(v) for v in x)
            axis = next((a for v, a in axes if v is x), None)
            return x if axis is None else pad_axis(x, axis, size)

        return self._padded_copy(pad(self.args), pad(self.kwargs), size, "the model's array arguments",
                                 "the unit plate's size must follow the arrays' (e.g. y.shape[0], not an int argument)")

    def _padded_copy(self, args: tuple, kwargs: dict, size: int, what: str, fix: str, **options: Any) -> Any:
        """The model on padded arguments, with this model's starting values; refused unless its plate has ``size``
        units."""
        new = type(self)(self.fn, args, kwargs, unit_plate=self.unit_plate,
                         closed_form=bool(self._gauss or self._resid), **options)
        if new.num_units != size:
            raise ModelSpecificationError(
                f"distributed='local' on JAX with blocks of unequal size: padding {what} to {size} units gave a plate "
                f"of {new.num_units}; {fix}")
        new.params = self.params  # the starting values as given
        return new

    def _pad_rows(self, size: int, rows: dict[str, int] | None) -> TracedLatentModel:
        """Pad a grouped model (latents in the unit plate over ``n`` groups, rows outside it reading
        ``alpha[group_idx]``) to ``size`` groups and ``rows[site]`` rows: every array argument with this process's
        number of rows on its first axis gets copies of its last row, the group index (the integer argument equal to
        the rows' unit map) gives them the last dummy group ``size − 1``, and an ``int`` argument equal to ``n`` (the
        plate's size) becomes ``size``.  The dummy groups (weight 0) then hold the extra rows, or none."""
        from latentfit.inference.padding import pad_axis

        names = sorted(self._unit_map)
        counts = {name: int(np.prod(self._lp_shape[name])) for name in names}
        shapes = {name: tuple(self._lp_shape[name]) for name in names}
        target = dict(counts) if rows is None else {name: int(rows[name]) for name in names}
        if size == self.num_units and target == counts:
            return self
        n = int(self.num_units)
        if any(len(shape) != 1 for shape in shapes.values()) or len(set(counts.values())) != 1 \
                or counts[names[0]] == n:
            raise ModelSpecificationError(
                "distributed='local' on JAX pads each block with dummy units; this model's observations outside the "
                f"unit plate ({names}: rows reading alpha[group_idx]) have shapes {sorted(set(shapes.values()))} "
                f"for {n} units: latentfit pads one plate of rows (not of the units' number) read through one index "
                "array; give every process the same numbers of units and rows, or pass the rows as per-unit arrays "
                "[units, rows] with a mask")
        r, r_new = counts[names[0]], target[names[0]]
        unit_map = self._unit_map[names[0]]
        last = size - 1
        found = {"index": 0, "size": 0}

        def pad(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: pad(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(pad(v) for v in x)
            if isinstance(x, (int, np.integer)) and not isinstance(x, bool) and int(x) == n and size != n:
                found["size"] += 1
                return type(x)(size)
            if not (hasattr(x, "shape") and hasattr(x, "dtype")) or np.ndim(x) == 0:
                return x
            if np.shape(x)[0] == n:  # a per-group array (a group-level covariate)
                return pad_axis(x, 0, size)
            if np.shape(x)[0] != r:
                return x
            a = np.asarray(x)
            if a.ndim == 1 and np.issubdtype(a.dtype, np.integer) and np.array_equal(a, unit_map):
                found["index"] += 1
                out = np.concatenate([a, np.full(r_new - r, last, dtype=a.dtype)])
                return out if isinstance(x, np.ndarray) else self.ops.xp.asarray(out)
            return pad_axis(x, 0, r_new)

        args, kwargs = pad(self.args), pad(self.kwargs)
        if r_new > r and found["index"] != 1 or found["size"] > 1:
            raise ModelSpecificationError(
                "distributed='local' on JAX pads each block's rows outside the unit plate (rows reading "
                f"alpha[group_idx]); this model's arguments hold {found['index']} integer arrays equal to the rows' "
                f"groups and {found['size']} int arguments equal to the number of groups ({n}): latentfit needs "
                "exactly one group index array (and at most one such int, the plate's size); give every process the "
                "same numbers of groups and rows")
        index = {name: np.concatenate([np.asarray(self._unit_map[name]), np.full(r_new - r, last)]) for name in names}
        return self._padded_copy(args, kwargs, size, "the model's groups", "the plate's size must be an int argument "
                                 "or follow the group index (e.g. int(group_idx.max()) + 1)", unit_index=index)

    def _is_argument(self, x: Any) -> bool:
        """Whether ``x`` is (in) one of the model's arguments."""
        found = []

        def visit(v: Any) -> None:
            if isinstance(v, dict):
                for w in v.values():
                    visit(w)
            elif isinstance(v, (list, tuple)):
                for w in v:
                    visit(w)
            elif v is x:
                found.append(v)

        visit(self.args)
        visit(self.kwargs)
        return bool(found)

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        z = self.ops.asarray(z)
        lead = tuple(z.shape[:-2])
        out = {}
        for s in self._layout:
            u = z[..., s.offset:s.offset + s.size].reshape(lead + (z.shape[-2],) + s.u_rest)
            out[s.name] = s.transform(u)
        return out

    @property
    def imputed_sites(self) -> list[str]:
        """The ``obs_mask=`` imputation sites the fit integrates out (:meth:`_leaf_imputations`): not latents, but
        :meth:`impute` draws them."""
        return list(self._imputed)

    def impute(self, theta: dict[str, Any], z: Any, key: Any) -> dict[str, Any]:
        """Draws of the imputation sites that the fit integrates out (:attr:`imputed_sites`), one per latent draw
        ``z [..., N, d]``: the PPL's own site ``{name}_unobserved`` run at θ with the latents given, i.e. a draw of
        ``p(y_mis | z; θ)``, the conditional of the missing cells given the latents (what NUTS's samples of that
        site are, with θ at the estimate).  Its entries at the observed cells are draws too, of no meaning (both
        PPLs mask them out of the site's density): read it through the mask, ``where(mask, y, y_unobserved)``.
        Arrays ``[..., *site shape]``; ``{}`` when the fit integrates out no imputation site."""
        if not self._imputed:
            return {}
        z = self.ops.asarray(z)
        lead = tuple(z.shape[:-2])
        count = int(np.prod(lead))
        if key is None:
            key = self.ops.key(0)
        keys = self.ops.split(key, count)
        with self.ppl.no_grad(), self.ops.global_rng_from(key):  # Pyro draws from the global RNG: the key's stream
            out = self._guard(self._impute_all, dict(theta), (z.reshape((count,) + tuple(z.shape[-2:])), keys))
        return {n: v.reshape(lead + tuple(v.shape[1:])) for n, v in out.items()}

    def _impute_one(self, theta: dict[str, Any], draw: tuple[Any, Any]) -> dict[str, Any]:
        z, key = draw
        values, _ = self._split_one(z)
        sites = self.ppl.run(self.fn, self.args, self.kwargs, params=theta, values=values, key=key)
        return {n: sites[n].value for n in self._imputed}

    # ----- mini-batches evaluated alone --------------------------------------------------------------------
    def _check_batch_path(self) -> bool:
        """Whether the model can be run on a mini-batch of units alone (the unit plate subsampled, the observations
        inside it cut to the batch's rows): when, at the initial θ and a prior draw of the latents, the densities
        (and residual statistics) of an unsorted batch with a repeated unit equal the full run's rows for it.
        Observations outside the unit plate (rows reading ``alpha[group_idx]``), per-unit arguments that are not
        observed values (covariates, masks over the units) or a model that fails on a subsampled plate keep the
        full run, whose rows are then selected."""
        n = self.num_units
        if self._unit_map or n < 3:
            return False
        theta = self.init_params()
        z = self.sample_prior(theta, self.ops.key(3), 1)
        idx = np.array([n - 1, 0, n // 2, 0])
        units = self.ops.asarray(idx, dtype=None)
        try:
            with self.ppl.no_grad():
                ll, lp = self.log_densities(theta, z)
                (bll, blp), _ = self._chains(self._densities_batch, theta, self.ops.take(z, units, 1), units)
                pairs = [(ll[..., idx], bll), (lp[..., idx], blp)]
                if self._resid:
                    full, _ = self._chains(self._resid_all, theta, z)
                    part, _ = self._chains(self._resid_batch, theta, self.ops.take(z, units, 1), units)
                    pairs += [(full[k][..., idx], part[k]) for k in full]
        except Exception:  # the model cannot run on a subsampled plate
            return False
        return self._rows_match(pairs)

    # ----- diagnostics of bad models --------------------------------------------------------------------
    #: draws of the latents beyond the first that :meth:`_check_initial_density` tries for a unit whose log-density
    #: is not finite at the first (a prior draw outside the model's domain)
    initial_redraws: int = 31

    def _check_initial_density(self) -> None:
        """Refuse a model whose log-density is not finite at the initial θ, naming the site.

        The latents are one draw from the model's prior (a fixed key); a unit whose log-density is NaN/inf there is
        redrawn :attr:`initial_redraws` times, and the model is refused only for units finite at none of the draws:
        with ``y ~ Normal(log(alpha[g]), σ)``, ``alpha ~ Normal(3, 1)``, one unit's draw below 0 (0.13 % each)
        refused a valid model on every seed (the engines reject such states as they reject such proposals)."""
        theta = self.init_params()
        z = self.sample_prior(theta, self.ops.key(0), 1)
        finite = np.isfinite(self.ops.to_numpy(z))
        if not finite.all():
            bad = [s.name for s in self._layout if not finite[..., s.offset:s.offset + s.size].all()]
            raise ModelSpecificationError(
                f"sampling the latent site(s) {bad} from the model at the initial parameter values "
                f"gave NaN/inf; check the initial values of the {self.ppl.name}.param sites")
        ll, lp = self.log_densities(theta, z)  # the compiled densities; the site-by-site diagnosis only when needed
        bad = ~np.isfinite(np.reshape(self.ops.to_numpy(ll + lp), (-1,)))
        if not bad.any():
            return
        draws = 1 + self.initial_redraws
        if self.initial_redraws > 0:
            more = self.sample_prior(theta, self.ops.key(1), self.initial_redraws)
            ll, lp = self.log_densities(theta, more)
            bad &= ~np.isfinite(np.reshape(self.ops.to_numpy(ll + lp), (self.initial_redraws, -1))).any(0)
        if bad.any():
            self.raise_for_nonfinite(theta, z, units=np.flatnonzero(bad), draws=draws)

    def raise_for_nonfinite(self, theta: dict[str, Any], z: Any, units: np.ndarray | None = None,
                            draws: int = 1) -> None:
        """Raise naming the site whose log-density is NaN/inf at ``(θ, z)`` (no-op when all finite).  ``units``: the
        units (indices) non-finite at each of ``draws`` prior draws of their latents (``z``: the first), named in the
        message, which then says that the latents' draws, not only θ, may be at fault."""
        z = self.ops.asarray(z)
        zz = z.reshape((-1,) + tuple(z.shape[-2:]))
        with self.ppl.no_grad():
            for c in range(zz.shape[0]):
                values, _ = self._split_one(zz[c])
                sites = self._guard(self._run, dict(theta), values)
                for name in self.latent_names_ + self.observed_names:
                    lp = self.ops.to_numpy(self._per_unit(self._broadcast_lp(sites[name]), name))
                    nonfinite = ~np.isfinite(lp)
                    if units is not None:
                        nonfinite &= np.isin(np.arange(lp.size), units)
                    nbad = int(nonfinite.sum())
                    if not nbad:
                        continue
                    if units is None:
                        raise ModelSpecificationError(
                            f"the log-density of site {name!r} is NaN/inf for {nbad} of {lp.size} unit(s) at "
                            f"the initial parameter values; check the initial {self.ppl.name}.param values and "
                            "the site's distribution arguments")
                    shown = ", ".join(str(int(i)) for i in np.flatnonzero(nonfinite)[:10])
                    raise ModelSpecificationError(
                        f"the log-density of site {name!r} is NaN/inf for {nbad} of {lp.size} unit(s) (unit index "
                        f"{shown}{', ...' if nbad > 10 else ''}) at the initial parameter values, at each of {draws} "
                        f"draw(s) of their latents from the model's prior: {_NONFINITE_HINT}")

    # ----- exponential-family face -------------------------------------------------------------------
    def _recognise_patterns(self) -> None:
        ppl, to_np = self.ppl, self.ops.to_numpy
        theta0 = self.init_params()
        theta1 = self._perturbed_params()
        z = self.sample_prior(theta0, self.ops.key(1), 1)[0]
        values, _ = self._split_one(z)
        with ppl.no_grad():
            traces = [self._run(theta0, values), self._run(theta1, values)]
        thetas = [theta0, theta1]

        def is_param(get: Any) -> str | None:
            """Name of the param that the tensor ``get(trace)`` is a (broadcast) copy of, else None."""
            try:
                tensors = [np.asarray(to_np(get(tr))) for tr in traces]
            except AttributeError:
                return None
            for name in self.params:
                ok = True
                for t, th in zip(tensors, thetas):
                    p = np.asarray(to_np(th[name]))
                    try:
                        pb = np.broadcast_to(p, t.shape)
                    except ValueError:
                        ok = False
                        break
                    if t.ndim < p.ndim or not np.allclose(t, pb, rtol=1e-5, atol=1e-7):
                        ok = False
                        break
                if ok:
                    return name
            return None

        def is_zero(get: Any) -> bool:
            """The tensor ``get(trace)`` is 0 everywhere at both θ (a constant zero mean)."""
            try:
                return all(bool(np.all(np.asarray(to_np(get(tr))) == 0)) for tr in traces)
            except AttributeError:
                return False

        def depends(fun: Any) -> set[str]:
            """Params with a non-zero gradient of ``sum(fun(trace(θ)))``."""
            grads = ppl.grad_params(lambda th: fun(self._run(th, values)).sum(), dict(theta0))
            return {n for n, g in grads.items() if bool(np.any(to_np(g) != 0))}

        site_deps = {n: depends(lambda tr, n=n: self._broadcast_lp(tr[n]))
                     for n in self.latent_names_ + self.observed_names}
        d = ppl.dist
        claimed: dict[str, str] = {}
        for s in self._layout:
            fn = ppl.unwrap(traces[0][s.name].fn)
            if ppl.normal_of(fn) is not None:
                loc = is_param(lambda tr, s=s: ppl.normal_of(tr[s.name].fn).loc)
                scale = is_param(lambda tr, s=s: ppl.normal_of(tr[s.name].fn).scale)
                # a centred random effect, Normal(0., omega): closed-form omega with the mean held at 0
                zero = loc is None and scale and is_zero(lambda tr, s=s: ppl.normal_of(tr[s.name].fn).loc)
                if zero or (loc and scale and loc != scale and
                            tuple(self.params[loc].value.shape) == tuple(self.params[scale].value.shape)):
                    self._gauss.append(_GaussianLatentPattern(s.name, loc, scale, "normal"))
                    claimed[scale] = s.name
                    if loc:
                        claimed[loc] = s.name
            elif isinstance(fn, d.MultivariateNormal) and s.size == fn.event_shape[0]:
                loc = is_param(lambda tr, s=s: ppl.unwrap(tr[s.name].fn).loc)
                cov = is_param(lambda tr, s=s: ppl.unwrap(tr[s.name].fn).covariance_matrix)
                kind = "mvn_cov"
                if cov is None:
                    cov, kind = is_param(lambda tr, s=s: ppl.unwrap(tr[s.name].fn).scale_tril), "mvn_tril"
                zero = loc is None and cov and is_zero(lambda tr, s=s: ppl.unwrap(tr[s.name].fn).loc)
                if zero or (loc and cov and loc != cov):
                    self._gauss.append(_GaussianLatentPattern(s.name, loc, cov, kind))
                    claimed[cov] = s.name
                    if loc:
                        claimed[loc] = s.name
        for name in self.observed_names:
            fn = ppl.unwrap(traces[0][name].fn)
            if isinstance(fn, d.Normal):
                scale = is_param(lambda tr, name=name: ppl.unwrap(tr[name].fn).scale)
                if scale and int(np.prod(tuple(self.params[scale].value.shape))) == 1:
                    loc_deps = depends(lambda tr, name=name: ppl.unwrap(tr[name].fn).loc)
                    if scale not in loc_deps:
                        self._resid.append(_ResidualPattern(name, scale))
                        claimed[scale] = name
        # a param is closed-form only if no other site depends on it
        for pname, owner in list(claimed.items()):
            if any(pname in site_deps[other] for other in site_deps if other != owner):
                self._gauss = [g for g in self._gauss if pname not in (g.loc, g.scale)]
                self._resid = [r for r in self._resid if r.scale != pname]
        self._mark_closed_form()

    def _mark_closed_form(self) -> None:
        """Flag the recognised params closed-form, set their annealing and the latent sites' kinds."""
        for g in self._gauss:
            if g.loc is not None:
                self.params[g.loc].closed_form = True
            self.params[g.scale].closed_form = True
            # mvn_tril: annealed through its covariance
            self.params[g.scale].anneal = {"normal": "std", "mvn_cov": "cov", "mvn_tril": None}[g.kind]
            self.latent_sites = [LatentSite(x.name, x.shape, x.offset, x.size, g.kind if x.name == g.site else x.kind)
                                 for x in self.latent_sites]
        for r in self._resid:
            self.params[r.scale].closed_form = True

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        """Scales of recognised Normal latents that fell onto the M-step's variance floor (1e-12)."""
        out = []
        for g in self._gauss:
            if g.kind == "normal" and float(np.min(self.ops.to_numpy(theta[g.scale]))) ** 2 < 1e-11:
                out.append(f"the scale {g.scale!r} of latent site {g.site!r} collapsed to ~0: the data barely identify "
                           f"that variance and SAEM's Monte-Carlo noise with few chains can drive it to zero; rerun "
                           f"with more chains (num_chains=...) or drop that random effect")
        return out

    def _site_u(self, z: Any, site: str) -> Any:
        s = next(x for x in self._layout if x.name == site)
        return z[..., s.offset:s.offset + s.size]

    def _gaussian_stats(self, z: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g in self._gauss:
            w = self._site_u(z, g.site)  # z holds the units ``units`` already (LatentModel contract)
            out[f"{g.site}.s1"] = w
            out[f"{g.site}.s2"] = w * w if g.kind == "normal" else w[..., :, None] * w[..., None, :]
        return out

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        xp = self.ops.xp
        out: dict[str, Any] = {}
        n = float(num_units)
        for g in self._gauss:
            s1, s2 = s[f"{g.site}.s1"] / n, s[f"{g.site}.s2"] / n
            if g.kind == "normal":
                p_shape = tuple(self.params[g.loc if g.loc is not None else g.scale].value.shape)
                mu = _reduce_to(s1, p_shape) if g.loc is not None else 0.0 * s1
                var = _reduce_to(s2 - 2 * mu * s1 + mu * mu, p_shape)
                if g.loc is not None:
                    out[g.loc] = mu
                out[g.scale] = xp.sqrt(xp.clip(var, 1e-12))
            else:
                mu = s1 if g.loc is not None else 0.0 * s1
                cov = s2 - mu[:, None] * mu[None, :]
                cov = 0.5 * (cov + cov.T) + 1e-10 * self.ops.asarray(np.eye(cov.shape[-1]), dtype=cov.dtype)
                if g.loc is not None:
                    out[g.loc] = mu.reshape(tuple(self.params[g.loc].value.shape))
                out[g.scale] = cov if g.kind == "mvn_cov" else xp.linalg.cholesky(cov)
        for r in self._resid:
            rss, cnt = s[f"{r.site}.rss"], s[f"{r.site}.nobs"]
            sd = xp.sqrt(xp.clip(rss / xp.clip(cnt, 1.0), 1e-24))
            out[r.scale] = sd.reshape(self.params[r.scale].value.shape)
        return out

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        z = self.ops.asarray(z)
        out = self._gaussian_stats(z)
        if self._resid and units is not None and self.batch_path:
            res, lead = self._chains(self._resid_batch, theta, z, self._index(units))
            for name, v in res.items():
                out[name] = v.reshape(lead + (len(units),))
        elif self._resid:
            res, lead = self._chains(self._resid_all, theta, self._full_z(z, units))
            for name, v in res.items():
                out[name] = self._select(v.reshape(lead + (self.num_units,)), units)
        return out

    # ----- Gaussian faces (predict / observations / prior_moments) ---------------------------------
    # Recognised when every observed site is Normal (the traced distribution gives mean and sd) and every
    # latent site is Normal / LogNormal / MultivariateNormal whose arguments do not depend on other latents
    # (the prior of the unconstrained z_i is then Gaussian).  Observations are laid out per unit,
    # ``[N, T]`` padded with a mask (T = the largest number of observations of a unit).
    def _recognise_gaussian_faces(self) -> None:
        """Find the faces; a model on which they fail is refused, naming the cause (on both PPLs alike)."""
        try:
            self._find_gaussian_faces()
        except (ModelSpecificationError, DataError):
            raise
        except Exception as exc:
            raise ModelSpecificationError(
                "reading the Gaussian faces of the model (the means and sds of its Normal observations, the moments of "
                f"its Gaussian latents) failed: {type(exc).__name__}: {exc}") from exc

    def _find_gaussian_faces(self) -> None:
        z = self.sample_prior(self.init_params(), self.ops.key(2), 1)[0]
        values, _ = self._split_one(z)
        with self.ppl.no_grad():
            sites = self._run(self.init_params(), values)
        self.has_gaussian_obs = bool(self.observed_names) and all(
            isinstance(self.ppl.unwrap(sites[n].fn), self.ppl.dist.Normal) for n in self.observed_names)
        self.has_gaussian_prior = self._gaussian_prior_ok(sites, z)
        if self.has_gaussian_obs:
            self._obs_layouts = {n: self._obs_layout(sites[n]) for n in self.observed_names}
            self._obs_values, self._obs_mask = self._observed_arrays(sites)

    def _gaussian_prior_ok(self, sites: dict[str, Site], z: Any) -> bool:
        d = self.ppl.dist
        for s in self._layout:
            fn = self.ppl.unwrap(sites[s.name].fn)
            if isinstance(fn, d.MultivariateNormal):
                if int(np.prod(s.batch_shape)) // self.num_units != 1:
                    return False
            elif self.ppl.normal_of(fn) is None:
                return False

        def total(th):
            values, _ = self._split_one(th["z"])
            tr = self._run(self.init_params(), values)
            out = 0.0
            for s in self._layout:
                fn = self.ppl.unwrap(tr[s.name].fn)
                if isinstance(fn, d.MultivariateNormal):
                    out = out + self.ops.xp.sum(fn.loc) + self.ops.xp.sum(fn.scale_tril)
                else:
                    base = self.ppl.normal_of(fn)
                    xp = self.ops.xp
                    out = out + xp.sum(base.loc * 1.0) + xp.sum(base.scale * 1.0)
            return out

        g = self.ppl.grad_params(total, {"z": z})["z"]  # hierarchical latents: the prior of z_i is not Gaussian
        return not bool(np.any(self.ops.to_numpy(g) != 0))

    def _obs_layout(self, site: Site) -> tuple[str, Any, Any, tuple[int, ...], int]:
        """How a Normal site's elements map to the per-unit layout: (kind, gather index, valid, shape, event dims).

        Inside the unit plate: the unit dim first, every other dim flattened (no padding).  Outside it
        (grouped rows): each unit's elements in order, padded to the largest group.
        """
        fn = self.ppl.unwrap(site.fn)
        ev_shape = tuple(site.fn.event_shape)
        full = tuple(np.broadcast_shapes(tuple(np.shape(site.value)), tuple(np.shape(fn.loc)),
                                         tuple(np.shape(fn.scale))))
        k = int(np.prod(ev_shape)) if ev_shape else 1
        if site.name in self._unit_map:
            units = self._unit_map[site.name]  # per element of the log-density (batch shape)
            order = np.argsort(units, kind="stable")
            counts = np.bincount(units, minlength=self.num_units)
            t = int(counts.max()) if counts.size else 0
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            pos = np.arange(units.size) - np.repeat(starts, counts)
            gather = np.zeros((self.num_units, t), dtype=np.int64)
            valid = np.zeros((self.num_units, t), dtype=bool)
            gather[units[order], pos] = order
            valid[units[order], pos] = True
            # events: element e's k values sit at e*k .. e*k+k-1 of the flattened array
            gather = (gather[..., None] * k + np.arange(k)).reshape(self.num_units, t * k)
            valid = np.repeat(valid, k, axis=-1)
            return ("rows", gather, valid, full, len(ev_shape))
        return ("plate", None, None, full, len(ev_shape))

    def _obs_flat(self, x: Any, name: str) -> Any:
        """Site ``name``'s array (broadcast to the site's full shape) -> ``[N, T_site]``."""
        xp = self.ops.xp
        kind, gather, valid, full, ev = self._obs_layouts[name]
        x = xp.broadcast_to(x, full)
        if kind == "rows":
            flat = x.reshape(-1)
            g = self.ops.asarray(gather, dtype=None)
            return self.ops.take(flat, g.reshape(-1), axis=0).reshape(tuple(gather.shape))
        unit_axis = len(full) - ev + self.unit_dim
        x = self.ppl.moveaxis(x, unit_axis, 0)
        return x.reshape(self.num_units, -1)

    def observation_layout(self, x: np.ndarray) -> np.ndarray:
        """``x`` laid out as :meth:`observations` ``[N, T]``: an array of that shape as it is, or one laid out as the
        observed site's data (one value per row of a plate over rows read through ``alpha[group_idx]``, or the
        site's own shape), placed where that site's observations are (a model with several observed sites needs
        the ``[N, T]`` layout).  For the x-axis of the VPC and the residual plots."""
        x = np.asarray(x)
        values = getattr(self, "_obs_values", None)
        if values is None:
            return x
        target = tuple(values.shape[-2:])
        if x.shape == target:
            return x
        names = [n for n in self.observed_names if n in self._obs_layouts]
        shapes = {n: tuple(self._obs_layouts[n][3]) for n in names}
        if len(names) != 1:
            raise ValueError(f"x must have the shape of the observations {target} (several observed sites: "
                             f"{', '.join(f'{n} {shapes[n]}' for n in names)}), got {x.shape}")
        name = names[0]
        try:
            full = np.broadcast_to(x, shapes[name])
        except ValueError:
            raise ValueError(f"x must have the shape of the observed site {name!r}'s data {shapes[name]} (or of the "
                             f"observations {target}), got {x.shape}") from None
        flat = self._obs_flat(self.ops.asarray(np.array(full, dtype=float)), name)
        return np.asarray(self.ops.to_numpy(flat), dtype=float)

    def _observed_arrays(self, sites: dict[str, Site]) -> tuple[Any, Any]:
        xp = self.ops.xp
        vals, masks = [], []
        for name in self.observed_names:
            site = sites[name]
            kind, gather, valid, full, _ = self._obs_layouts[name]
            value = xp.broadcast_to(self.ops.asarray(site.value), full)
            m = np.ones(full, dtype=bool)
            vmask = self.ppl.value_mask(site.fn, site.mask, self.ops)
            if vmask is not None:
                m = m & np.broadcast_to(np.asarray(self.ops.to_numpy(vmask), dtype=bool), full)
            m = self._obs_flat(self.ops.asarray(m, dtype=None), name)
            if kind == "rows":
                m = m & self.ops.asarray(valid, dtype=None)
            vals.append(self._obs_flat(value, name))
            masks.append(m)
        return self.ops.asarray(xp.concatenate(vals, -1), dtype=self._dtype), xp.concatenate(masks, -1)

    def _predict_one(self, theta: dict[str, Any], z: Any) -> tuple[Any, Any]:
        xp = self.ops.xp
        values, _ = self._split_one(z)
        sites = self._run(theta, values)
        means, sds = [], []
        for name in self.observed_names:
            fn = self.ppl.unwrap(sites[name].fn)
            means.append(self._unit_local(self._obs_flat(fn.loc, name), name))
            sds.append(self._unit_local(self._obs_flat(fn.scale, name), name))
        return xp.concatenate(means, -1), xp.concatenate(sds, -1)

    def _unit_local(self, x: Any, name: str) -> Any:
        """Site ``name``'s ``[N, T_site]`` array with its padded entries cut from the derivatives: a group's padding
        repeats the site's element 0, which belongs to another unit (rows read through ``alpha[group_idx]``, unbalanced
        groups).  The batched Jacobians of the predictions (Gauss–Newton precisions of the EBEs and of the quadrature,
        the linearised log-likelihood) are reverse passes summed over units on torch, so that unit's Jacobian took a
        term from every padded entry: its precision 640x too large, its EBE and the "gq" log-likelihood off (1.6 on a
        random-intercept model of 60 groups; JAX's forward mode put the terms on the masked entries).  The values are
        unchanged (masked wherever they are read)."""
        kind, _, valid, _, _ = self._obs_layouts[name]
        if kind != "rows" or bool(np.all(valid)):
            return x
        keep = self.ops.asarray(valid, dtype=None)
        return self.ops.xp.where(keep, x, self.ops.stop_gradient(x))

    def predict(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """Mean and sd of every observation given the latents, ``[..., n, T]`` (sites concatenated)."""
        if not self.has_gaussian_obs:
            raise ModelSpecificationError("predict() needs Normal observation sites (has_gaussian_obs is False for "
                                          f"the observed site(s) {self.observed_names})")
        (mean, sd), lead = self._chains(self._predict_all, theta, self._full_z(self.ops.asarray(z), units))
        mean = mean.reshape(lead + tuple(mean.shape[1:]))
        sd = sd.reshape(lead + tuple(sd.shape[1:]))
        return self._select(mean, units, axis=-2), self._select(sd, units, axis=-2)

    def observations(self, units: Any = None) -> tuple[Any, Any]:
        if not self.has_gaussian_obs:
            raise ModelSpecificationError("observations() is only available for Normal observation sites")
        return self._select(self._obs_values, units, axis=-2), self._select(self._obs_mask, units, axis=-2)

    def prior_moments(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """Mean ``[n, d]`` and covariance ``[n, d, d]`` of the Gaussian prior of the unconstrained latents."""
        if not self.has_gaussian_prior:
            raise ModelSpecificationError("prior_moments() needs Normal / LogNormal / MultivariateNormal latent "
                                          "sites whose arguments do not depend on other latents")
        xp = self.ops.xp
        n, d = self.num_units, self.latent_dim
        values, _ = self._split_one(self.ops.zeros((n, d), dtype=self._dtype))  # the arguments do not depend on z
        sites = self._run(dict(theta), values)
        means, variances, blocks = [], [], []
        for s in self._layout:
            site = sites[s.name]
            fn = self.ppl.unwrap(site.fn)
            vshape = tuple(np.shape(site.value))  # [*batch, *event]
            if isinstance(fn, self.ppl.dist.MultivariateNormal):
                k = vshape[-1]
                means.append(xp.broadcast_to(fn.loc, vshape).reshape(n, k))
                blocks.append((s.offset, xp.broadcast_to(fn.covariance_matrix, vshape + (k,)).reshape(n, k, k)))
                variances.append(self.ops.zeros((n, k), dtype=self._dtype))
            else:
                base = self.ppl.normal_of(fn)
                loc = self.ppl.moveaxis(xp.broadcast_to(base.loc, vshape), s.unit_axis, 0).reshape(n, -1)
                sd = self.ppl.moveaxis(xp.broadcast_to(base.scale, vshape), s.unit_axis, 0).reshape(n, -1)
                means.append(loc)
                variances.append(sd * sd)
        mean = xp.concatenate(means, -1)
        cov = xp.concatenate(variances, -1)[..., :, None] * self.ops.asarray(np.eye(d))  # diagonal blocks
        for offset, c in blocks:
            cov = _add_block(self.ops, cov, offset, c)
        if self._latent_unread is not None:  # the unread elements' reference density, N(0, 1) (latent_mask)
            unread = self.ops.asarray(self._latent_unread, dtype=None)
            mean = xp.where(unread, xp.zeros_like(mean), mean)
            cov = xp.where(unread[:, :, None] | unread[:, None, :], self.ops.asarray(np.eye(d)) + 0.0 * cov, cov)
        return self._select(mean, units, axis=-2), self._select(cov, units, axis=-3)


def _add_block(ops: Any, full: Any, offset: int, block: Any) -> Any:
    """``full[:, o:o+k, o:o+k] += block`` without in-place updates (adds a zero-padded copy of ``block``)."""
    xp = ops.xp
    n, d = full.shape[0], full.shape[-1]
    k = block.shape[-1]
    before, after = offset, d - offset - k
    rows = xp.concatenate([ops.zeros((n, before, k), dtype=block.dtype), block,
                           ops.zeros((n, after, k), dtype=block.dtype)], 1)
    return full + xp.concatenate([ops.zeros((n, d, before), dtype=block.dtype), rows,
                                  ops.zeros((n, d, after), dtype=block.dtype)], 2)


__all__ = ["PPL", "Frame", "Site", "TracedLatentModel"]
