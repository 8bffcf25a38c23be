"""Exact E-step for NumPyro models with one discrete per-unit latent (the twin of ``pyro_enum``).

A plain NumPyro mixture, e.g.::

    def model(x):
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        mu = numpyro.param("mu", init_locs)
        scale = numpyro.param("scale", jnp.ones((K, d)), constraint=constraints.positive)
        with numpyro.plate("data", len(x)):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("obs", dist.Normal(mu[z], scale[z]).to_event(1), obs=x)

becomes a :class:`LatentModel` with an exact E-step.  NumPyro's own enumeration needs ``funsor``;
for a single discrete latent none is needed: the model runs once per value ``k`` of the label
(``jax.vmap`` over the support, ``z_i = k`` for every unit), which gives ``log p(y_i, z_i = k; θ)``
``[K, n]``; its log-sum-exp is ``log p(y_i; θ)`` and its softmax the responsibilities.

The Gaussian-mixture pattern (``Categorical(probs)`` with probs a param or a constant, one observed
``Normal(locs[z], scales[z])`` (diagonal; spherical when ``scales`` is ``[K]``) or
``MultivariateNormal(locs[z], covariance_matrix=covs[z] | scale_tril=trils[z])``) is recognised by
comparing the per-component arguments with the params at the initial values and at a random
perturbation; statistics and M-step are :class:`~latentfit.models.mixture.GaussianMixture`'s, as
on the Pyro side, so both PPLs give the same estimates.  A mini-batch costs a mini-batch: the recognised
mixture's own E-step over the batch's rows, or the model run on the batch alone (the unit plate subsampled to the
batch's units and the observations inside it cut to its rows) when that reproduces the full run's rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as ndist
from numpyro import handlers, validation_enabled

from latentfit.inference.model import LatentModel, LatentSite, ModelSpecificationError
from latentfit.inference.ops_jax import JaxOps, SharedJit
from latentfit.inference.units import UnitBlock, take_units
from latentfit.integrations._common import EnumMixtureFace
from latentfit.integrations.numpyro import (
    NumPyroLatentModel,
    _site_log_prob,
    _UnitSubsample,
    _unwrap,
    numpyro_params,
)
from latentfit.models.mixture import GaussianMixture


def _trace(model: Any, args: tuple, kwargs: dict) -> Any:
    with validation_enabled(False):
        return handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*args, **kwargs)


def has_enumerated_latents(model: Any, args: tuple = (), kwargs: dict | None = None) -> bool:
    """True when every latent sample site of ``model`` is discrete with enumerable support."""
    try:
        tr = _trace(model, tuple(args), dict(kwargs or {}))
    except Exception:
        return False
    latent = [s for s in tr.values() if s["type"] == "sample" and not s["is_observed"]]
    return bool(latent) and all(getattr(s["fn"], "has_enumerate_support", False) for s in latent)


class NumPyroEnumModel(EnumMixtureFace, LatentModel):
    """A NumPyro model with one enumerable per-unit latent, seen through the :class:`LatentModel` contract."""

    has_exact_marginal = True
    has_posterior_sampler = True
    ppl = NumPyroLatentModel.ppl  # the per-unit reduction shared with the traced adapter

    def __init__(self, model: Any, args: tuple = (), kwargs: dict | None = None, *, reg_covar: float = 1e-6) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model, got {type(model).__name__}")
        self.fn, self.args, self.kwargs = model, tuple(args), dict(kwargs or {})
        try:
            tr = _trace(model, self.args, self.kwargs)
        except Exception as exc:
            raise ModelSpecificationError(f"running the model failed: {type(exc).__name__}: {exc}") from exc
        self.params, _ = numpyro_params(tr)  # params and constraints
        # one float dtype per fit: the widest of the params and the observed data
        observed = [s["value"] for s in tr.values() if s["type"] == "sample" and s["is_observed"]]
        self._dtype, _ = self.ppl.float_dtype([p.value for p in self.params.values()] + observed)
        for p in self.params.values():
            p.closed_form = True
            if jnp.issubdtype(jnp.result_type(p.value), jnp.floating):
                p.value = jnp.asarray(p.value, dtype=self._dtype)
        self.ops = JaxOps(dtype=self._dtype)
        self._find_sites(tr)
        self.reg_covar = float(reg_covar)
        self._gm: GaussianMixture | None = None
        self._recognise()
        self.has_stats = self.has_expected_stats = self._gm is not None
        self._table = SharedJit(jax.vmap(self._table_one, in_axes=(None, 0)))  # one program, not op by op
        self._table_units = SharedJit(jax.vmap(self._table_one, in_axes=(None, 0, None)))  # a mini-batch alone
        self._check_family_estep()

    # ----- structure --------------------------------------------------------------------------------
    def _find_sites(self, tr: Any) -> None:
        latent = [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]
        observed = [n for n, s in tr.items() if s["type"] == "sample" and s["is_observed"]]
        if len(latent) != 1 or not getattr(tr[latent[0]]["fn"], "has_enumerate_support", False):
            raise ModelSpecificationError(
                f"the enumeration adapter needs exactly one discrete (enumerable) latent site per unit; "
                f"found latent sites {latent}")
        if not observed:
            raise ModelSpecificationError("the model has no observed site")
        site = tr[latent[0]]
        frames = list(site["cond_indep_stack"])
        if not frames:
            raise ModelSpecificationError(f"the discrete latent {latent[0]!r} is not inside a plate of units")
        frame = min(frames, key=lambda f: f.dim)
        self.latent_name, self.observed_names = latent[0], observed
        self.unit_plate, self.unit_dim, self.num_units = frame.name, frame.dim, int(frame.size)
        self.max_plate_nesting = max(-f.dim for s in tr.values() if s["type"] == "sample"
                                     for f in s["cond_indep_stack"])
        self.observed = {n: np.asarray(tr[n]["value"]) for n in observed}
        self._support = jnp.asarray(site["fn"].enumerate_support(expand=False))  # [K, 1, ...]
        self._value_shape = tuple(jnp.shape(site["value"]))
        self.K = int(self._support.shape[0])
        self.latent_dim = self.K
        self.latent_sites = [LatentSite(latent[0], (), 0, self.K, kind="categorical")]

    def _run_at(self, theta: dict[str, Any], k_value: Any, units: Any = None) -> Any:
        """Trace of the model with every unit's label set to ``k_value`` (a support element); with ``units``, of
        those units alone (the unit plate subsampled, the observations inside it cut to the batch's rows)."""
        shape = self._value_shape
        model = self.fn
        if units is not None:
            axis = len(shape) + self.unit_dim  # the label's unit axis (a Categorical has no event dims)
            shape = shape[:axis] + (int(units.shape[0]),) + shape[axis + 1:]
            model = _UnitSubsample(model, self.unit_plate, self.num_units, units)
        values = {self.latent_name: jnp.broadcast_to(k_value, shape)}
        model = handlers.substitute(handlers.condition(model, data=values), data=dict(theta))
        return _trace(model, self.args, self.kwargs)

    def _table_one(self, theta: dict[str, Any], k_value: Any, units: Any = None) -> Any:
        tr = self._run_at(theta, k_value, units)
        count = self.num_units if units is None else int(units.shape[0])
        out = jnp.zeros((count,), dtype=self._dtype)
        for name in [self.latent_name] + self.observed_names:
            out = out + NumPyroLatentModel._per_unit(self, _site_log_prob(tr[name]), None, count)
        return out

    def log_joint_table(self, theta: dict[str, Any], units: Any = None) -> Any:
        """``log p(y_i, z_i = k; θ)``: ``[K, n]`` (every other dim summed out); for a mini-batch the model runs on
        the batch alone when it can (:meth:`_batch_table_ok`), else on all units."""
        if units is not None and not isinstance(units, UnitBlock) and self._batch_table_ok():
            return self._table_units(dict(theta), self._support, jnp.asarray(units))
        out = self._table(dict(theta), self._support)
        return out if units is None else take_units(self.ops, out, units if isinstance(units, UnitBlock)
                                                    else jnp.asarray(units), 1)

    def _check_batch_table(self) -> bool:
        """Whether the model can run on a mini-batch alone: the table of an unsorted batch with a repeated unit
        equals the full table's columns (at the initial θ).  Per-unit arguments other than the observed values
        (covariates, a mask over the units) or a model that fails on a subsampled plate keep the full run."""
        with jax.ensure_compile_time_eval():  # first use may be inside a step being compiled
            return self._batch_table_check()

    def _batch_table_check(self) -> bool:
        n = self.num_units
        if n < 3:
            return False
        theta = self.init_params()
        idx = jnp.asarray([n - 1, 0, n // 2, 0])
        try:
            part = np.asarray(self._table_units(dict(theta), self._support, idx))
        except Exception:  # the model cannot run on a subsampled plate
            return False
        whole = np.asarray(self._table(dict(theta), self._support))[:, np.asarray(idx)]
        tol = float(jnp.finfo(self._dtype).eps) ** 0.5
        return part.shape == whole.shape and bool(np.allclose(part, whole, rtol=tol, atol=tol))

    def responsibilities(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """``(r [n, K], log p(y_i; θ) [n])`` by enumeration."""
        if self._family_estep:
            return self._family_responsibilities(theta, units)
        lj = self.log_joint_table(theta, units)
        ll = jax.scipy.special.logsumexp(lj, 0)
        return jnp.exp(lj - ll).T, ll

    def marginal_log_lik(self, theta: dict[str, Any], units: Any = None) -> Any:
        return self.responsibilities(theta, units)[1]

    # ----- the Gaussian-mixture pattern --------------------------------------------------------------
    def _recognise(self) -> None:
        K = self.K
        if len(self.observed_names) != 1:
            return
        thetas = [self.init_params(), NumPyroLatentModel._perturbed_params(self)]
        traces = [[self._run_at(th, self._support[k]) for k in range(K)] for th in thetas]
        zfn = _unwrap(traces[0][0][self.latent_name]["fn"])[0]
        obs = [[_unwrap(tr[self.observed_names[0]]["fn"])[0] for tr in per_theta] for per_theta in traces]
        x = jnp.asarray(traces[0][0][self.observed_names[0]]["value"])
        if not isinstance(zfn, ndist.CategoricalProbs) or self.unit_dim != -1 or x.ndim not in (1, 2) \
                or x.shape[0] != self.num_units:
            return
        d = 1 if x.ndim == 1 else int(x.shape[1])

        def rows(get: Any, width: int) -> list[Any] | None:
            """Per-component ``[K, width]`` values of ``get(fn, k)`` (constant over units), per θ."""
            out = []
            for per_theta in obs:
                rs = []
                for fn in per_theta:
                    t = jnp.asarray(get(fn))
                    if t.size % width:
                        return None
                    t = jnp.reshape(t, (-1, width))
                    if not bool(jnp.allclose(t, t[:1])):
                        return None
                    rs.append(t[0])
                out.append(jnp.stack(rs))
            return out

        def param_of(values: list[Any] | None, shape: tuple[int, ...] | None = None) -> str | None:
            if values is None:
                return None
            for name in self.params:
                ok = all(jnp.size(th[name]) == v.size and bool(jnp.allclose(jnp.reshape(th[name], v.shape), v))
                         for th, v in zip(thetas, values))
                if ok and (shape is None or tuple(jnp.shape(thetas[0][name])) == shape):
                    return name
            return None

        probs = [jnp.reshape(_unwrap(per_theta[0][self.latent_name]["fn"])[0].probs, (-1, K))[0]
                 for per_theta in traces]
        roles: dict[str, tuple[str | None, Any]] = {"weights": (param_of(probs), probs[0])}
        fn0 = obs[0][0]
        if isinstance(fn0, ndist.MultivariateNormal):
            loc = rows(lambda fn: fn.loc, d)
            cov = rows(lambda fn: fn.covariance_matrix, d * d)
            tril = rows(lambda fn: fn.scale_tril, d * d)
            cov_name, to_user = param_of(cov, (K, d, d)), (lambda c: c)
            if cov_name is None:
                cov_name, to_user = param_of(tril, (K, d, d)), jnp.linalg.cholesky
            cov_type, cov_val = "full", None if cov is None else jnp.reshape(cov[0], (K, d, d))
        elif isinstance(fn0, ndist.Normal):
            loc = rows(lambda fn: fn.loc, d)
            diag = rows(lambda fn: fn.scale, d)
            if diag is None:
                return
            sph = [v[:, :1] for v in diag]
            cov_name = param_of(sph, (K,)) if d > 1 and all(bool(jnp.allclose(v, s)) for v, s in zip(diag, sph)) \
                else None
            if cov_name is not None:
                cov_type, cov_val = "spherical", jnp.reshape(sph[0], (K,)) ** 2
            else:
                cov_type, cov_val = "diag", diag[0] ** 2
                cov_name = param_of(diag)
            to_user = jnp.sqrt
        else:
            return
        if loc is None:
            return
        loc_name = param_of(loc)
        roles["locs"] = (loc_name, loc[0])
        roles["covariances"] = (cov_name, cov_val)
        used = {r[0] for r in roles.values() if r[0] is not None}
        other = [p for p in self.params if p not in used]
        if other or cov_val is None:
            for p in other:
                self.params[p].closed_form = False
            return
        fixed = [k for k, (name, _) in roles.items() if name is None]
        self._roles, self._to_user = roles, to_user
        self._gm = GaussianMixture(x.astype(self._dtype), K, cov_type, weights=roles["weights"][1],
                                   locs=roles["locs"][1], covariances=cov_val, fixed=fixed,
                                   reg_covar=self.reg_covar, ops=self.ops)

    # ----- exponential-family face (statistics and M-step: EnumMixtureFace) ----------------------
    def sample_posterior(self, theta: dict[str, Any], key: Any, num_samples: int, units: Any = None) -> Any:
        r, _ = self.responsibilities(theta, units)
        lab = jax.random.categorical(key, jnp.log(r), axis=-1, shape=(num_samples, r.shape[0]))
        return jax.nn.one_hot(lab, self.K, dtype=self._dtype)

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        return {self.latent_name: jnp.argmax(z, -1)}


__all__ = ["NumPyroEnumModel", "has_enumerated_latents"]
