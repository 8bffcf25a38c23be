"""NumPyro adapter: a plain NumPyro model function becomes a :class:`LatentModel` by tracing.

The twin of :mod:`latentfit.integrations.pyro`, with JAX doing the array work (``JaxOps``):

* ``numpyro.param`` sites are θ (constrained values; constraints from the site's ``constraint=``);
* unobserved ``numpyro.sample`` sites inside the *unit plate* are per-unit latents ``z_i``; the unit
  plate is the plate shared by every latent site (or the one named ``unit_plate=``);
* observed sites are data; they must sit inside the unit plate (pad ragged data and ``.mask()``).

Per-unit log densities sum every dim but the unit-plate dim, masks included.  All chains are
evaluated by ``jax.vmap`` over the model run with the latents conditioned and θ substituted, so a
NumPyro model needs no extra broadcasting for chains (a model written for Pyro, which indexes with
``...``, works unchanged).  Every density evaluation is a pure JAX function of ``(θ, z)``, so the
engines' steps compile with ``jax.jit``.

Recognised closed-form patterns (same as the Pyro adapter):

* a Normal / LogNormal latent whose loc and scale are params (μ, ω) and a MultivariateNormal latent
  whose loc and covariance (or scale_tril) are params (μ, Ω): statistics ``Σ w_i``, ``Σ w_i w_iᵀ``;
* a Normal observation whose scale is a scalar param (constant residual error): ``Σ (y − f)²``.

A distribution argument "is" a param when it equals the (broadcast) param at the initial values
and at a random perturbation of all params; "depends on" is a non-zero ``jax.grad``.
Every other parameter gets the numerical M-step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as ndist
from numpyro import handlers, validation_enabled
from numpyro.distributions import constraints
from numpyro.distributions.transforms import ExpTransform, biject_to

from latentfit.inference.model import (
    DataError,
    LatentModel,
    LatentSite,
    ModelSpecificationError,
    ParamInfo,
)
from latentfit.inference.ops_jax import JaxOps, default_float_dtype
from latentfit.integrations._common import (
    ClosedFormFace,
    _GaussianLatentPattern,
    _ResidualPattern,
    _SiteLayout,
    unit_frame,
)


def _unwrap(fn: Any) -> tuple[Any, Any]:
    """Strip Independent / Masked / Expanded wrappers; return (base distribution, mask)."""
    mask = None
    while True:
        if isinstance(fn, ndist.MaskedDistribution):
            m = fn._mask
            if not (isinstance(m, bool) and m):
                mask = m if mask is None else (mask & m)
            fn = fn.base_dist
        elif isinstance(fn, (ndist.Independent, ndist.ExpandedDistribution)):
            fn = fn.base_dist
        else:
            return fn, mask


def _is_lognormal(fn: Any) -> bool:
    if isinstance(fn, ndist.LogNormal):
        return True
    return (isinstance(fn, ndist.TransformedDistribution)
            and isinstance(_unwrap(fn.base_dist)[0], ndist.Normal)
            and len(fn.transforms) == 1 and isinstance(fn.transforms[0], ExpTransform))


def _normal_base(fn: Any) -> Any:
    fn = _unwrap(fn)[0]
    if isinstance(fn, ndist.TransformedDistribution):
        return _unwrap(fn.base_dist)[0]
    return fn


def _site_mask(site: dict) -> Any:
    """Combined mask of a site (handlers.mask and ``.mask()``), or None."""
    mask = site.get("mask")
    if isinstance(mask, bool):
        mask = None if mask else jnp.asarray(False)
    fmask = _unwrap(site["fn"])[1]
    if fmask is not None:
        mask = fmask if mask is None else (mask & fmask)
    return mask


def _site_log_prob(site: dict) -> Any:
    lp = site["fn"].log_prob(site["value"])
    mask = site.get("mask")
    if mask is not None and not (isinstance(mask, bool) and mask):
        lp = jnp.where(mask, lp, 0.0)
    return lp


class _LazyJit:
    """Call ``fn`` op by op for its first eager calls, then through ``jax.jit``.

    Inside a traced engine step ``fn`` is simply inlined.  Eagerly, a handful of calls (tracing
    checks, an engine's ``init``) are cheaper op by op than compiling a fresh closure per model;
    repeated eager use (post-fit likelihoods, diagnostics) switches to the compiled function.
    """

    def __init__(self, fn: Any, eager_calls: int = 3) -> None:
        self.fn = fn
        self.jitted = jax.jit(fn)
        self.eager_calls = eager_calls
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args)):
            return self.fn(*args)
        self.calls += 1
        return self.fn(*args) if self.calls <= self.eager_calls else self.jitted(*args)


class NumPyroLatentModel(ClosedFormFace, LatentModel):
    """A NumPyro model function, traced once, seen through the :class:`LatentModel` contract."""

    def __init__(self, model: Any, args: tuple = (), kwargs: dict | None = None,
                 unit_plate: str | None = None, closed_form: bool = True) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model, got {type(model).__name__}")
        self.fn = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        trace = self._trace_model()
        self._find_params(trace)
        self.ops = JaxOps(dtype=self._dtype)
        self._find_sites(trace, unit_plate)
        self._check_observed(trace)
        # evaluations vmapped over the flattened chain dims (compiled once called eagerly a few times)
        self._densities_all = _LazyJit(jax.vmap(self._densities_one, in_axes=(None, 0)))
        self._sample_all = _LazyJit(jax.vmap(self._sample_one, in_axes=(None, 0)))
        self._resid_all = _LazyJit(jax.vmap(self._resid_one, in_axes=(None, 0)))
        self._gauss: list[_GaussianLatentPattern] = []
        self._resid: list[_ResidualPattern] = []
        self._check_initial_density()
        if closed_form:
            self._recognise_patterns()
        self.has_stats = bool(self._gauss or self._resid)
        self._recognise_gaussian_faces()

    # ----- tracing ------------------------------------------------------------------------------------
    def _trace_model(self) -> Any:
        try:
            with validation_enabled(False):  # NaN densities are reported by site below
                return handlers.trace(handlers.seed(self.fn, rng_seed=0)).get_trace(*self.args, **self.kwargs)
        except Exception as exc:  # the model itself failed: say so, keep the original as cause
            raise ModelSpecificationError(
                f"running the model with the given arguments failed: {type(exc).__name__}: {exc}") from exc

    def _find_params(self, trace: Any) -> None:
        self.params = {}
        values = {n: s["value"] for n, s in trace.items() if s["type"] == "param"}
        if not values:
            raise ModelSpecificationError(
                "the model has no numpyro.param site, so there is nothing to estimate: declare the "
                "population parameters with numpyro.param(...) (for fully Bayesian inference use "
                "numpyro.infer.MCMC or SVI instead)")
        floats = [np.asarray(v).dtype for v in values.values() if isinstance(v, (jax.Array, np.ndarray))
                  and jnp.issubdtype(np.asarray(v).dtype, jnp.floating)]
        # follow the model's float dtype when jax can hold it (float64 needs jax_enable_x64)
        self._dtype = jnp.dtype(floats[0]) if floats and jnp.dtype(floats[0]).itemsize <= \
            default_float_dtype().itemsize else default_float_dtype()
        for name, value in values.items():
            site = trace[name]
            constraint = site["kwargs"].get("constraint", constraints.real)
            transform = biject_to(constraint)
            self.params[name] = ParamInfo(
                name=name, value=jnp.asarray(value, dtype=self._dtype), to_unconstrained=transform.inv,
                to_constrained=transform, meta={"constraint": constraint})

    def _find_sites(self, trace: Any, unit_plate: str | None) -> None:
        latent, observed = [], []
        max_nesting = 0
        for name, site in trace.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                observed.append(name)
            else:
                latent.append(name)
            for f in site["cond_indep_stack"]:
                max_nesting = max(max_nesting, -f.dim)
        if not latent:
            raise ModelSpecificationError(
                "the model has no latent sample site (every numpyro.sample is observed): there is nothing "
                "to integrate out; fit it with numpyro.infer.SVI (AutoDelta guide) or MAP instead")
        self.max_plate_nesting = max_nesting
        frames = {n: list(trace[n]["cond_indep_stack"]) for n in latent}
        frame = unit_frame(latent, frames, unit_plate, "numpyro")
        self.unit_plate = frame.name
        self.unit_dim = frame.dim
        self.num_units = int(frame.size)
        self.observed_names = observed
        self.latent_names_ = latent
        self._layout: list[_SiteLayout] = []
        offset = 0
        for n in latent:
            site = trace[n]
            fn, value = site["fn"], jnp.asarray(site["value"])
            if fn.is_discrete:
                raise ModelSpecificationError(
                    f"latent site {n!r} is discrete ({type(_unwrap(fn)[0]).__name__}); the MH kernels move "
                    "continuous latents only: marginalise it out in the model or use an EM engine with an "
                    "exact E-step")
            event_shape = tuple(fn.event_shape)
            batch_shape = tuple(value.shape[: value.ndim - len(event_shape)])
            unit_axis = len(batch_shape) + self.unit_dim
            if unit_axis < 0 or batch_shape[unit_axis] != self.num_units:
                raise ModelSpecificationError(
                    f"latent site {n!r} has shape {tuple(value.shape)} without the unit dim "
                    f"{self.unit_dim} of plate {self.unit_plate!r} (size {self.num_units})")
            transform = biject_to(fn.support)
            x = jnp.moveaxis(value, unit_axis, 0)
            u = transform.inv(x)
            x_rest, u_rest = tuple(x.shape[1:]), tuple(u.shape[1:])
            size = int(np.prod(u_rest)) if u_rest else 1
            self._layout.append(_SiteLayout(n, batch_shape, event_shape, unit_axis, transform, x_rest, u_rest,
                                            offset, size))
            offset += size
        self.latent_dim = offset
        self.latent_sites = [LatentSite(s.name, s.x_rest, s.offset, s.size) for s in self._layout]

    def _check_observed(self, trace: Any) -> None:
        self.observed = {}
        for n in self.observed_names:
            site = trace[n]
            if not any(f.name == self.unit_plate for f in site["cond_indep_stack"]):
                raise ModelSpecificationError(
                    f"observed site {n!r} is not inside the unit plate {self.unit_plate!r}: put every "
                    "observation inside the plate of the units (pad ragged data to [units, max_obs] and "
                    "mask the padding with .mask(...))")
            value = np.asarray(site["value"])
            bad = ~np.isfinite(value)
            mask = _site_mask(site)
            if mask is not None:
                m = np.asarray(mask)
                if m.ndim <= bad.ndim:
                    bad = bad & np.broadcast_to(m, bad.shape)
            nbad = int(bad.sum())
            if nbad:
                raise DataError(
                    f"observed site {n!r} holds {nbad} NaN/inf value(s) out of {value.size} at unmasked "
                    "positions; drop them or mask them with .mask(...) / obs_mask")
            self.observed[n] = value

    # ----- running the model with given θ and one chain of z ------------------------------------------
    def _split_one(self, z: Any) -> tuple[dict[str, Any], Any]:
        """``[N, d]`` unconstrained -> site values (constrained, site layout) and Σ log|J| ``[N]``."""
        values, ladj_total = {}, jnp.zeros((self.num_units,), dtype=z.dtype)
        for s in self._layout:
            u = z[:, s.offset:s.offset + s.size].reshape((self.num_units,) + s.u_rest)
            x = s.transform(u)
            ladj = jnp.asarray(s.transform.log_abs_det_jacobian(u, x))
            ladj = jnp.broadcast_to(ladj, (self.num_units,) + ladj.shape[1:]) if ladj.ndim else \
                jnp.broadcast_to(ladj, (self.num_units,))
            ladj_total = ladj_total + ladj.reshape(self.num_units, -1).sum(-1)
            values[s.name] = jnp.moveaxis(x, 0, s.unit_axis)
        return values, ladj_total

    def _run(self, theta: dict[str, Any], values: dict[str, Any]) -> Any:
        model = handlers.substitute(handlers.condition(self.fn, data=values), data=dict(theta))
        with validation_enabled(False):  # NaN densities are rejected by MH / reported by site
            return handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*self.args, **self.kwargs)

    def _per_unit(self, x: Any, shape: tuple[int, ...] | None = None) -> Any:
        """Sum an array over every dim but the unit dim -> ``[N]``."""
        x = jnp.asarray(x)
        if shape is not None:
            x = jnp.broadcast_to(x, shape)
        nd = max(x.ndim, -self.unit_dim)
        x = x.reshape((1,) * (nd - x.ndim) + x.shape)
        x = jnp.moveaxis(x, nd + self.unit_dim, 0)
        x = jnp.broadcast_to(x, (self.num_units,) + x.shape[1:])
        return x.reshape(self.num_units, -1).sum(-1)

    def _densities_one(self, theta: dict[str, Any], z: Any) -> tuple[Any, Any]:
        values, ladj = self._split_one(z)
        tr = self._run(theta, values)
        ll = jnp.zeros((self.num_units,), dtype=z.dtype)
        for name in self.observed_names:
            ll = ll + self._per_unit(_site_log_prob(tr[name]))
        lp = ladj
        for name in self.latent_names_:
            lp = lp + self._per_unit(_site_log_prob(tr[name]))
        return ll, lp

    def _sample_one(self, theta: dict[str, Any], key: Any) -> Any:
        model = handlers.substitute(self.fn, data=dict(theta))
        with validation_enabled(False):
            tr = handlers.trace(handlers.seed(model, rng_seed=key)).get_trace(*self.args, **self.kwargs)
        parts = []
        for s in self._layout:
            x = jnp.broadcast_to(tr[s.name]["value"], s.batch_shape + s.event_shape)
            u = s.transform.inv(jnp.moveaxis(x, s.unit_axis, 0))
            parts.append(u.reshape(self.num_units, s.size).astype(self._dtype))
        return jnp.concatenate(parts, -1)

    def _resid_one(self, theta: dict[str, Any], z: Any) -> dict[str, Any]:
        values, _ = self._split_one(z)
        tr = self._run(theta, values)
        out = {}
        for r in self._resid:
            site = tr[r.site]
            base = _unwrap(site["fn"])[0]
            value = jnp.asarray(site["value"])
            shape = jnp.broadcast_shapes(value.shape, jnp.shape(base.loc))
            resid2 = jnp.broadcast_to((value - base.loc) ** 2, shape)
            ones = jnp.ones(shape, dtype=resid2.dtype)
            mask = _site_mask(site)
            if mask is not None:
                shape = jnp.broadcast_shapes(shape, jnp.shape(mask))
                resid2 = jnp.where(mask, resid2, 0.0)
                ones = jnp.where(mask, ones, 0.0)
            out[f"{r.site}.rss"] = self._per_unit(resid2, shape)
            out[f"{r.site}.nobs"] = self._per_unit(ones, shape)
        return out

    def _full_z(self, z: Any, units: Any) -> Any:
        if units is None:
            return z
        full = jnp.zeros(z.shape[:-2] + (self.num_units, z.shape[-1]), dtype=z.dtype)
        return full.at[..., jnp.asarray(units), :].set(z)

    @staticmethod
    def _select(x: Any, units: Any) -> Any:
        return x if units is None else jnp.take(x, jnp.asarray(units), axis=-1)

    def _guard(self, f: Any, *args: Any) -> Any:
        try:
            return f(*args)
        except (TypeError, ValueError, IndexError) as exc:
            raise ModelSpecificationError(
                f"evaluating the model with given parameters and latents failed: {type(exc).__name__}: {exc}"
            ) from exc

    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        z = self._full_z(jnp.asarray(z), units)
        lead = z.shape[:-2]
        zz = z.reshape((-1,) + tuple(z.shape[-2:]))
        ll, lp = self._guard(self._densities_all, dict(theta), zz)
        ll, lp = ll.reshape(lead + (self.num_units,)), lp.reshape(lead + (self.num_units,))
        return self._select(ll, units), self._select(lp, units)

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        if key is None:
            key = jax.random.PRNGKey(0)
        if self._gauss and len(self._gauss) == len(self._layout):
            return self._sample_gaussian_prior(theta, key, num_chains, units)
        keys = jax.random.split(key, num_chains)
        z = self._guard(self._sample_all, dict(theta), keys)
        if units is not None:
            z = jnp.take(z, jnp.asarray(units), axis=1)
        return z

    def _sample_gaussian_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any) -> Any:
        """All latents follow a recognised Gaussian pattern: draw ``μ + ω ε`` (or ``μ + Lε``) directly."""
        n = self.num_units if units is None else len(units)
        keys = jax.random.split(key, len(self._layout))
        parts = []
        for s, k in zip(self._layout, keys):
            g = next(x for x in self._gauss if x.site == s.name)
            mu = jnp.reshape(theta[g.loc], (-1,))
            eps = jax.random.normal(k, (num_chains, n, s.size), dtype=self._dtype)
            if g.kind == "normal":
                parts.append(mu + jnp.reshape(theta[g.scale], (-1,)) * eps)
            else:
                tril = theta[g.scale] if g.kind == "mvn_tril" else jnp.linalg.cholesky(theta[g.scale])
                parts.append(mu + eps @ tril.T)
        return jnp.concatenate(parts, -1).astype(self._dtype)

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        z = jnp.asarray(z)
        lead = tuple(z.shape[:-2])
        out = {}
        for s in self._layout:
            u = z[..., s.offset:s.offset + s.size].reshape(lead + (z.shape[-2],) + s.u_rest)
            out[s.name] = s.transform(u)
        return out

    # ----- diagnostics of bad models --------------------------------------------------------------------
    def _check_initial_density(self) -> None:
        theta = self.init_params()
        z = self.sample_prior(theta, jax.random.PRNGKey(0), 1)
        if not bool(jnp.all(jnp.isfinite(z))):
            bad = [s.name for s in self._layout if not bool(jnp.all(jnp.isfinite(z[..., s.offset:s.offset + s.size])))]
            raise ModelSpecificationError(
                f"sampling the latent site(s) {bad} from the model at the initial parameter values "
                "gave NaN/inf; check the initial values of the numpyro.param sites")
        self.raise_for_nonfinite(theta, z)

    def raise_for_nonfinite(self, theta: dict[str, Any], z: Any) -> None:
        """Raise naming the site whose log-density is NaN/inf at ``(θ, z)`` (no-op when all finite)."""
        zz = jnp.reshape(jnp.asarray(z), (-1,) + tuple(z.shape[-2:]))
        for zc in zz:
            values, _ = self._split_one(zc)
            tr = self._guard(self._run, dict(theta), values)
            for name in self.latent_names_ + self.observed_names:
                lp = self._per_unit(_site_log_prob(tr[name]))
                nbad = int(jnp.sum(~jnp.isfinite(lp)))
                if nbad:
                    raise ModelSpecificationError(
                        f"the log-density of site {name!r} is NaN/inf for {nbad} of {lp.size} unit(s) at "
                        "the initial parameter values; check the initial numpyro.param values and the "
                        "site's distribution arguments")

    # ----- exponential-family face -------------------------------------------------------------------
    def _perturbed_params(self) -> dict[str, Any]:
        """The initial θ moved by a random step in unconstrained space (for 'is a param' checks)."""
        rng = np.random.default_rng(12345)
        theta_u = self.unconstrain(self.init_params())
        moved = {n: v + jnp.asarray(0.3 * rng.standard_normal(np.shape(v)) + 0.1, dtype=self._dtype)
                 for n, v in theta_u.items()}
        return self.constrain(moved)

    def _recognise_patterns(self) -> None:
        theta0 = self.init_params()
        theta1 = self._perturbed_params()
        z = self.sample_prior(theta0, jax.random.PRNGKey(1), 1)[0]
        values, _ = self._split_one(z)
        traces = [self._run(theta0, values), self._run(theta1, values)]
        thetas = [theta0, theta1]

        def is_param(get: Any) -> str | None:
            """Name of the param that the tensor ``get(trace)`` is a (broadcast) copy of, else None."""
            try:
                tensors = [jnp.asarray(get(tr)) for tr in traces]
            except AttributeError:
                return None
            for name in self.params:
                ok = True
                for t, th in zip(tensors, thetas):
                    p = jnp.asarray(th[name])
                    try:
                        pb = jnp.broadcast_to(p, t.shape)
                    except ValueError:
                        ok = False
                        break
                    if t.ndim < p.ndim or not np.allclose(np.asarray(t), np.asarray(pb), rtol=1e-5, atol=1e-7):
                        ok = False
                        break
                if ok:
                    return name
            return None

        def depends(fun: Any) -> set[str]:
            """Params with a non-zero gradient of ``sum(fun(trace(θ)))``."""
            grads = jax.grad(lambda th: jnp.sum(fun(self._run(th, values))))(dict(theta0))
            return {n for n, g in grads.items() if bool(jnp.any(g != 0))}

        site_deps = {n: depends(lambda tr, n=n: _site_log_prob(tr[n]))
                     for n in self.latent_names_ + self.observed_names}
        claimed: dict[str, str] = {}
        for s in self._layout:
            fn = _unwrap(traces[0][s.name]["fn"])[0]
            if isinstance(fn, ndist.Normal) or _is_lognormal(fn):
                loc = is_param(lambda tr, s=s: _normal_base(tr[s.name]["fn"]).loc)
                scale = is_param(lambda tr, s=s: _normal_base(tr[s.name]["fn"]).scale)
                if loc and scale and loc != scale and self.params[loc].value.shape == self.params[scale].value.shape:
                    self._gauss.append(_GaussianLatentPattern(s.name, loc, scale, "normal"))
                    claimed[loc] = claimed[scale] = s.name
            elif isinstance(fn, ndist.MultivariateNormal) and s.size == fn.event_shape[0]:
                loc = is_param(lambda tr, s=s: _unwrap(tr[s.name]["fn"])[0].loc)
                cov = is_param(lambda tr, s=s: _unwrap(tr[s.name]["fn"])[0].covariance_matrix)
                kind = "mvn_cov"
                if cov is None:
                    cov, kind = is_param(lambda tr, s=s: _unwrap(tr[s.name]["fn"])[0].scale_tril), "mvn_tril"
                if loc and cov and loc != cov:
                    self._gauss.append(_GaussianLatentPattern(s.name, loc, cov, kind))
                    claimed[loc] = claimed[cov] = s.name
        for name in self.observed_names:
            fn = _unwrap(traces[0][name]["fn"])[0]
            if isinstance(fn, ndist.Normal):
                scale = is_param(lambda tr, name=name: _unwrap(tr[name]["fn"])[0].scale)
                if scale and self.params[scale].value.size == 1:
                    loc_deps = depends(lambda tr, name=name: _unwrap(tr[name]["fn"])[0].loc)
                    if scale not in loc_deps:
                        self._resid.append(_ResidualPattern(name, scale))
                        claimed[scale] = name
        # a param is closed-form only if no other site depends on it
        for pname, owner in list(claimed.items()):
            if any(pname in site_deps[other] for other in site_deps if other != owner):
                self._gauss = [g for g in self._gauss if pname not in (g.loc, g.scale)]
                self._resid = [r for r in self._resid if r.scale != pname]
        self._mark_closed_form()

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        z = jnp.asarray(z)
        out = self._gaussian_stats(z)
        if self._resid:
            zf = self._full_z(z, units)
            lead = zf.shape[:-2]
            zz = zf.reshape((-1,) + tuple(zf.shape[-2:]))
            res = self._resid_all(dict(theta), zz)
            for name, v in res.items():
                out[name] = self._select(v.reshape(lead + (self.num_units,)), units)
        return out

    # ----- Gaussian faces (predict / observations / prior_moments) ---------------------------------
    # As in the Pyro adapter: every observed site Normal (the traced distribution gives mean and sd),
    # every latent site Normal / LogNormal / MultivariateNormal with arguments free of other latents.
    def _recognise_gaussian_faces(self) -> None:
        z = self.sample_prior(self.init_params(), jax.random.PRNGKey(2), 1)[0]
        values, _ = self._split_one(z)
        tr = self._run(self.init_params(), values)
        self.has_gaussian_obs = bool(self.observed_names) and all(
            isinstance(_unwrap(tr[n]["fn"])[0], ndist.Normal) and len(tr[n]["fn"].event_shape) <= 1
            for n in self.observed_names)
        self.has_gaussian_prior = self._gaussian_prior_ok(tr, z)
        if self.has_gaussian_obs:
            self._obs_values, self._obs_mask = self._observed_arrays(tr)
        self._predict_all = _LazyJit(jax.vmap(self._predict_one, in_axes=(None, 0)))

    def _prior_args(self, tr: Any) -> list[Any]:
        args = []
        for s in self._layout:
            fn = _unwrap(tr[s.name]["fn"])[0]
            if isinstance(fn, ndist.MultivariateNormal):
                args += [fn.loc, fn.scale_tril]
            else:
                base = _normal_base(fn)
                args += [base.loc, base.scale]
        return args

    def _gaussian_prior_ok(self, tr: Any, z: Any) -> bool:
        for s in self._layout:
            fn = _unwrap(tr[s.name]["fn"])[0]
            if isinstance(fn, ndist.MultivariateNormal):
                if int(np.prod(s.batch_shape)) // self.num_units != 1:
                    return False
            elif not (isinstance(fn, ndist.Normal) or _is_lognormal(fn)):
                return False

        def total(zz):
            values, _ = self._split_one(zz)
            return sum(jnp.sum(a) for a in self._prior_args(self._run(self.init_params(), values)))

        g = jax.grad(total)(z)  # hierarchical latents: the prior of z_i is not Gaussian
        return not bool(jnp.any(g != 0))

    def _obs_flat(self, x: Any, event_dim: int) -> Any:
        """``[*pad, *batch, *event]`` -> ``[N, T_site]`` (unit dim first, the rest flattened)."""
        full = self.max_plate_nesting + event_dim
        x = jnp.reshape(x, (1,) * (full - x.ndim) + tuple(x.shape))
        x = jnp.moveaxis(x, self.max_plate_nesting + self.unit_dim, 0)
        return jnp.reshape(x, (self.num_units, -1))

    def _observed_arrays(self, tr: Any) -> tuple[Any, Any]:
        vals, masks = [], []
        for name in self.observed_names:
            site = tr[name]
            fn = _unwrap(site["fn"])[0]
            ev = len(site["fn"].event_shape)
            shape = jnp.broadcast_shapes(jnp.shape(site["value"]), jnp.shape(fn.loc), jnp.shape(fn.scale))
            value = jnp.broadcast_to(site["value"], shape)
            m = jnp.ones(shape, dtype=bool)
            mask = _site_mask(site)
            if mask is not None:
                mask = jnp.reshape(mask, jnp.shape(mask) + (1,) * ev) if ev else mask
                m = m & jnp.broadcast_to(mask, shape)
            vals.append(self._obs_flat(value, ev))
            masks.append(self._obs_flat(m, ev))
        return jnp.concatenate(vals, -1).astype(self._dtype), jnp.concatenate(masks, -1)

    def _predict_one(self, theta: dict[str, Any], z: Any) -> tuple[Any, Any]:
        values, _ = self._split_one(z)
        tr = self._run(theta, values)
        means, sds = [], []
        for name in self.observed_names:
            site = tr[name]
            fn = _unwrap(site["fn"])[0]
            ev = len(site["fn"].event_shape)
            shape = jnp.broadcast_shapes(jnp.shape(site["value"]), jnp.shape(fn.loc), jnp.shape(fn.scale))
            means.append(self._obs_flat(jnp.broadcast_to(fn.loc, shape), ev))
            sds.append(self._obs_flat(jnp.broadcast_to(fn.scale, shape), ev))
        return jnp.concatenate(means, -1), jnp.concatenate(sds, -1)

    def predict(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """Mean and sd of every observation given the latents, ``[..., n, T]`` (sites concatenated)."""
        if not self.has_gaussian_obs:
            raise ModelSpecificationError("predict() needs Normal observation sites (has_gaussian_obs is False for "
                                          f"the observed site(s) {self.observed_names})")
        z = self._full_z(jnp.asarray(z), units)
        lead = z.shape[:-2]
        mean, sd = self._predict_all(dict(theta), z.reshape((-1,) + tuple(z.shape[-2:])))
        mean = mean.reshape(lead + tuple(mean.shape[1:]))
        sd = sd.reshape(lead + tuple(sd.shape[1:]))
        if units is not None:
            idx = jnp.asarray(units)
            mean, sd = jnp.take(mean, idx, axis=-2), jnp.take(sd, idx, axis=-2)
        return mean, sd

    def observations(self, units: Any = None) -> tuple[Any, Any]:
        if not self.has_gaussian_obs:
            raise ModelSpecificationError("observations() is only available for Normal observation sites")
        y, m = self._obs_values, self._obs_mask
        if units is not None:
            idx = jnp.asarray(units)
            y, m = jnp.take(y, idx, axis=0), jnp.take(m, idx, axis=0)
        return y, m

    def prior_moments(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """Mean ``[n, d]`` and covariance ``[n, d, d]`` of the Gaussian prior of the unconstrained latents."""
        if not self.has_gaussian_prior:
            raise ModelSpecificationError("prior_moments() needs Normal / LogNormal / MultivariateNormal latent "
                                          "sites whose arguments do not depend on other latents")
        n, d = self.num_units, self.latent_dim
        values, _ = self._split_one(jnp.zeros((n, d), dtype=self._dtype))  # the arguments do not depend on z
        tr = self._run(dict(theta), values)
        mean = jnp.zeros((n, d), dtype=self._dtype)
        cov = jnp.zeros((n, d, d), dtype=self._dtype)
        for s in self._layout:
            site = tr[s.name]
            fn = _unwrap(site["fn"])[0]
            sl = slice(s.offset, s.offset + s.size)
            vshape = tuple(jnp.shape(site["value"]))  # [*batch, *event]
            if isinstance(fn, ndist.MultivariateNormal):
                k = vshape[-1]
                loc = jnp.reshape(jnp.broadcast_to(fn.loc, vshape), (n, k))
                c = jnp.reshape(jnp.broadcast_to(fn.covariance_matrix, vshape + (k,)), (n, k, k))
                mean = mean.at[:, sl].set(loc)
                cov = cov.at[:, sl, sl].set(c)
            else:
                base = _normal_base(fn)
                ev = len(site["fn"].event_shape)
                loc = self._obs_flat(jnp.broadcast_to(base.loc, vshape), ev)
                sd = self._obs_flat(jnp.broadcast_to(base.scale, vshape), ev)
                mean = mean.at[:, sl].set(loc)
                idx = jnp.arange(s.offset, s.offset + s.size)
                cov = cov.at[:, idx, idx].set(sd * sd)
        if units is not None:
            idx = jnp.asarray(units)
            mean, cov = jnp.take(mean, idx, axis=0), jnp.take(cov, idx, axis=0)
        return mean, cov


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


__all__ = ["NumPyroLatentModel", "as_rng_key"]
