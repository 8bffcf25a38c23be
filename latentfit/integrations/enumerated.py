"""Exact E-step for models with one discrete per-unit latent, on either PPL: the label summed out by enumeration.

A plain mixture as both PPLs' tutorials write one (NumPyro alike, ``config_enumerate`` optional)::

    @config_enumerate
    def model(x):
        weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", init_locs)
        scales = pyro.param("scales", torch.ones(K, d), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

is a traced model whose label is summed out: the model runs once per value k of the label (every unit's label
set to k, broadcast over the units as parallel enumeration hands it; the K runs vectorised like chains), which
gives ``log p(y_i, z_i = k; θ)`` ``[K, n]``; its log-sum-exp is the exact ``log p(y_i; θ)`` and its softmax the
responsibilities.

The Gaussian mixture (``Categorical(probs)`` with probs a param or a constant and one observed
``Normal(locs[z], scales[z])`` (diagonal; spherical when ``scales`` is ``[K]``) or
``MultivariateNormal(locs[z], covariance_matrix=covs[z] | scale_tril=trils[z])``; a constant role is held fixed;
or one scale shared by the components, as Pyro's GMM tutorial writes it: ``Normal(locs[z], scale)`` with ``scale`` a
scalar param (one variance, "tied_spherical") or a ``[d]`` param (shared diagonal, "tied_diag"), or
``MultivariateNormal(locs[z], covariance_matrix=cov | scale_tril=tril)`` with one ``[d, d]`` param ("tied"))
is recognised by comparing the per-component arguments with the params at the initial θ and at a random
perturbation; its statistics and M-step are :class:`~latentfit.models.mixture.GaussianMixture`'s, so both PPLs and
the family give the same estimates.  Other discrete models get the exact responsibilities and marginal
log-likelihood; full-batch EM then runs generalized EM (its M-step maximises
``Q(θ | θ_old) = Σ_i Σ_k r_ik log p(y_i, z_i = k; θ)`` numerically, :meth:`expected_log_joint`), the other engines ask
for a closed form.  A mini-batch costs a mini-batch: the mixture's own E-step
over the batch's rows when it equals the enumeration (``_family_estep``), else the model run on the batch alone
when that reproduces the full run's rows (``batch_path``), else the full run's columns.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import numpy as np

from latentfit.inference.model import LatentSite, ModelSpecificationError
from latentfit.inference.units import UnitBlock, take_units
from latentfit.integrations.traced import Site, TracedBase, check_obs_container
from latentfit.models.mixture import GaussianMixture, array_stamps, same_arrays


class EnumeratedLatentModel(TracedBase):
    """A model with one enumerable per-unit latent, seen through the :class:`LatentModel` contract."""

    has_exact_marginal = True
    has_posterior_sampler = True
    #: exact responsibilities at any θ (:meth:`responsibilities`) and ``Q`` (:meth:`expected_log_joint`): without a
    #: recognised closed form, the full-batch EM maximises Q numerically (generalized EM)
    has_exact_responsibilities = True
    #: responsibilities by the recognised mixture's own E-step (set by :meth:`_check_family_estep`)
    _family_estep = False

    def __init__(self, model: Any, args: tuple = (), kwargs: dict | None = None, *, reg_covar: float = 1e-6) -> None:
        trace = self._setup(model, args, kwargs)
        for p in self.params.values():
            p.closed_form = True
        self._find_sites(trace)
        self.reg_covar = float(reg_covar)
        self._table_all = self.ppl.vectorise(self._table_one, pure=False)
        self._table_batch = self.ppl.vectorise(self._table_one, pure=False, num_unmapped=1)
        self._gm: GaussianMixture | None = None
        self._recognise()
        self._check_family_estep()
        self.has_stats = self.has_expected_stats = self._gm is not None
        if self._gm is None:
            self.no_stats_reason = (
                "the enumeration adapter computes this model's exact responsibilities and marginal "
                "log-likelihood, but found no closed-form M-step: the recognised pattern is a Categorical "
                "label (probs a param or constant) with one Normal(locs[z], scales[z]) observation (or one "
                "scale shared by the components: Normal(locs[z], scale), a scalar or [d] param) or "
                "MultivariateNormal(locs[z], covariance_matrix=covs[z] | scale_tril=trils[z]) observation (or "
                "one shared [d, d] covariance_matrix=cov | scale_tril=tril). "
                "EM (full batch) fits this model as it is: generalized EM, the exact E-step with a numerical "
                "(Newton) M-step; the mini-batch, incremental and Monte-Carlo engines need the closed form "
                "(write the model as such a mixture or use a model family), or fit it with SVI/TraceEnum_ELBO")

    @classmethod
    def has_enumerated_latents(cls, model: Any, args: tuple = (), kwargs: dict | None = None) -> bool:
        """True when every latent sample site of ``model`` is discrete with enumerable support."""
        try:
            trace = cls.ppl.run(model, tuple(args), dict(kwargs or {}))
        except Exception:
            return False
        latent = [s for s in trace.values() if s.type == "sample" and not s.is_observed]
        return bool(latent) and all(getattr(s.fn, "has_enumerate_support", False) for s in latent)

    # ----- structure and the enumerated table -------------------------------------------------------
    def _find_sites(self, trace: dict[str, Site]) -> None:
        latent = [n for n, s in trace.items() if s.type == "sample" and not s.is_observed]
        self.observed_names = [n for n, s in trace.items() if s.type == "sample" and s.is_observed]
        if len(latent) != 1 or not getattr(trace[latent[0]].fn, "has_enumerate_support", False):
            raise ModelSpecificationError(
                f"the enumeration adapter needs exactly one discrete (enumerable) latent site per unit; "
                f"found latent sites {latent}")
        if not self.observed_names:
            raise ModelSpecificationError("the model has no observed sample site: did you pass the data (obs=...)?")
        for n in self.observed_names:  # a container the PPL cannot read, data that would broadcast the site up
            check_obs_container(self.ppl, trace[n])
            self._site_shape(trace[n])
        site = trace[latent[0]]
        if not site.frames:
            raise ModelSpecificationError(f"the discrete latent {latent[0]!r} is not inside a plate of units")
        frame = min(site.frames, key=lambda f: f.dim)
        self.latent_name = latent[0]
        self.unit_plate, self.unit_dim, self.num_units = frame.name, frame.dim, int(frame.size)
        self.max_plate_nesting = max(-f.dim for s in trace.values() if s.type == "sample" for f in s.frames)
        self.observed = {n: self.ops.to_numpy(trace[n].value) for n in self.observed_names}
        self._support = site.fn.enumerate_support(expand=False)  # [K, 1, ...]: value k broadcast over the units
        self.K = self.latent_dim = int(self._support.shape[0])
        self.latent_sites = [LatentSite(self.latent_name, (), 0, self.K, kind="categorical")]

    def _table_one(self, theta: dict[str, Any], value: Any, units: Any = None) -> Any:
        """``log p(y_i, z_i = value; θ)`` of every unit (of ``units`` alone: the model run on them)."""
        sites = self._run(theta, {self.latent_name: value}, units)
        count = self.num_units if units is None else int(units.shape[0])
        out = self.ops.zeros((count,), dtype=self._dtype)
        for name in [self.latent_name] + self.observed_names:
            out = out + self._per_unit(self._site_lp(sites[name]), None, count)
        return out

    def log_joint_table(self, theta: dict[str, Any], units: Any = None, differentiable: bool = False) -> Any:
        """``log p(y_i, z_i = k; θ)``: ``[K, n]`` (every other dim summed out); for a mini-batch the model runs on the
        batch alone when it can (:attr:`batch_path`), else on all units.  ``differentiable``: in θ (torch records
        the graph; the E-steps do not need it)."""
        block = isinstance(units, UnitBlock)
        with contextlib.nullcontext() if differentiable else self.ppl.no_grad():
            if units is not None and not block and self.batch_path:
                return self._table_batch(dict(theta), self._support, self._index(units))
            out = self._table_all(dict(theta), self._support)
        return out if units is None else take_units(self.ops, out, units if block else self._index(units), 1)

    def _check_batch_path(self) -> bool:
        """Whether the model can run on a mini-batch alone: the table of an unsorted batch with a repeated unit
        equals the full table's columns (at the initial θ).  Per-unit arguments other than the observed values
        (covariates, a mask over the units) or a model that fails on a subsampled plate keep the full run."""
        n = self.num_units
        if n < 3:
            return False
        theta, idx = self.init_params(), np.array([n - 1, 0, n // 2, 0])
        try:
            part = self._table_batch(dict(theta), self._support, self._index(idx))
        except Exception:  # the model cannot run on a subsampled plate
            return False
        return self._rows_match([(self.ops.to_numpy(self._table_all(dict(theta), self._support))[:, idx], part)])

    def responsibilities(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """``(r [n, K], log p(y_i; θ) [n])``."""
        if self._family_estep:
            return self._gm.responsibilities(self._internal(theta), units)
        lj = self.log_joint_table(theta, units)
        ll = self.ops.logsumexp(lj, 0)
        return self.ops.xp.exp(lj - ll).T, ll

    def marginal_log_lik(self, theta: dict[str, Any], units: Any = None) -> Any:
        """``log p(y_i; θ)`` ``[n]``, differentiable in θ (the exact observed information differentiates it)."""
        if self._family_estep:
            return self.responsibilities(theta, units)[1]
        return self.ops.logsumexp(self.log_joint_table(theta, units, differentiable=True), 0)

    def expected_log_joint(self, theta: dict[str, Any], r: Any) -> Any:
        """``Q(θ) = Σ_i Σ_k r_ik log p(y_i, z_i = k; θ)``: the enumerated table of every unit (the model run once per
        label value, vectorised), differentiable in θ, weighed by the responsibilities ``r [n, K]`` held fixed (a
        zero weight drops its entry, also where the table is −inf).  Generalized EM's M-step maximises it."""
        xp = self.ops.xp
        table = self._table_all(dict(theta), self._support)  # [K, n]
        w = self.ops.stop_gradient(r).T
        return xp.sum(xp.where(w > 0, w * table, 0.0))

    def predict_proba(self, theta: dict[str, Any], x: Any = None) -> np.ndarray:
        """Responsibilities ``p(z_i = k | y_i; θ)`` ``[n, K]`` (numpy; the label's k-th enumerated value) of the
        model's units, or of new data ``x``: the model's positional arguments for them, a tuple, or one array for
        the first argument alone (the others kept), the observations included (the labels' posterior reads them).
        The model is read again on the new arguments (a trace) and evaluated at ``theta``."""
        theta = {k: self.ops.asarray(v) for k, v in theta.items()}
        model = self
        if x is not None:
            args = tuple(x) if isinstance(x, tuple) else (x,) + self.args[1:]
            model = type(self)(self.fn, args, self.kwargs, reg_covar=self.reg_covar)
        return self.ops.to_numpy(model.responsibilities(theta)[0])

    def score_samples(self, theta: dict[str, Any], x: Any = None) -> np.ndarray:
        """``log p(y_i; θ)`` ``[n]`` (numpy; the labels summed out) of the model's units or of new data ``x``
        (:meth:`predict_proba`'s forms)."""
        theta = {k: self.ops.asarray(v) for k, v in theta.items()}
        model = self
        if x is not None:
            args = tuple(x) if isinstance(x, tuple) else (x,) + self.args[1:]
            model = type(self)(self.fn, args, self.kwargs, reg_covar=self.reg_covar)
        return self.ops.to_numpy(model.marginal_log_lik(theta))

    def sample_posterior(self, theta: dict[str, Any], key: Any, num_samples: int, units: Any = None,
                         sim: Any = None) -> Any:
        r = self.responsibilities(theta, units)[0]
        if sim is None:
            return self.ppl.one_hot_draws(key, r, num_samples, self._dtype)
        # inverse CDF of uniforms from sim's streams (per-unit streams: unit i's labels depend on (key, id_i) only)
        xp = self.ops.xp
        u = sim.uniform(key, (num_samples, int(r.shape[0]), 1))
        lab = xp.sum(u > xp.cumsum(r, 1)[None, :, :-1], -1)
        K = int(r.shape[1])
        return (lab[..., None] == self.ops.arange(K)) * 1.0 + self.ops.zeros(tuple(lab.shape) + (K,), dtype=self._dtype)

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        return {self.latent_name: z.argmax(-1)}

    def _split_one(self, z: Any) -> tuple[dict[str, Any], Any]:
        """One draw of the one-hot labels ``z [N, K]`` -> the label site's value (as the model's first run laid it
        out) and no log-Jacobian: what a model run conditioned on the labels reads (the pointwise log-likelihood and
        the replicated data of :class:`~latentfit.integrations.traced.TracedBase`)."""
        shape = self._site_plates[self.latent_name][1]
        labels = z.argmax(-1)
        if int(np.prod(shape)) == int(labels.shape[0]):
            labels = labels.reshape(shape)
        return {self.latent_name: labels}, 0.0

    # ----- the Gaussian-mixture pattern ---------------------------------------------------------------
    def _recognise(self) -> None:
        K, to_np, dist = self.K, self.ops.to_numpy, self.ppl.dist
        if len(self.observed_names) != 1 or self.unit_dim != -1:
            return
        obs_name = self.observed_names[0]
        thetas = [self.init_params(), self._perturbed_params()]
        with self.ppl.no_grad():
            runs = [[self._run(th, {self.latent_name: v}) for v in self._support] for th in thetas]
        zfn = self.ppl.unwrap(runs[0][0][self.latent_name].fn)
        obs = [[self.ppl.unwrap(r[obs_name].fn) for r in per_theta] for per_theta in runs]
        x = runs[0][0][obs_name].value
        if not isinstance(zfn, dist.Categorical) or x.ndim not in (1, 2) or x.shape[0] != self.num_units:
            return
        d = 1 if x.ndim == 1 else int(x.shape[1])
        ths = [{n: np.asarray(to_np(v)) for n, v in th.items()} for th in thetas]

        def rows(get: Any, width: int) -> list[np.ndarray] | None:
            """Per-component ``[K, width]`` values of ``get(fn)`` (constant over the units), at each θ."""
            out = []
            for per_theta in obs:
                rs = []
                for fn in per_theta:
                    t = np.asarray(to_np(get(fn)))
                    if t.size % width:
                        return None
                    t = t.reshape(-1, width)
                    if not np.allclose(t, t[:1]):
                        return None
                    rs.append(t[0])
                out.append(np.stack(rs))
            return out

        def param_of(values: list[np.ndarray] | None, shape: tuple[int, ...] | None = None) -> str | None:
            """The param equal to ``values`` at both θ (of ``shape``, if given)."""
            for name in self.params if values is not None else ():
                if all(th[name].size == v.size and np.allclose(th[name].reshape(v.shape), v)
                       for th, v in zip(ths, values)) and (shape is None or ths[0][name].shape == shape):
                    return name
            return None

        def shared(values: list[np.ndarray] | None) -> list[np.ndarray] | None:
            """The one row of ``[K, width]`` values equal for every component at each θ (a scale shared by them)."""
            if values is None or not all(np.allclose(v, v[:1]) for v in values):
                return None
            return [v[0] for v in values]

        probs = [np.reshape(to_np(self.ppl.unwrap(r[0][self.latent_name].fn).probs), (-1, K))[0] for r in runs]
        roles: dict[str, tuple[str | None, Any]] = {"weights": (param_of(probs), probs[0])}
        if isinstance(obs[0][0], dist.MultivariateNormal):
            loc = rows(lambda fn: fn.loc, d)
            cov = rows(lambda fn: fn.covariance_matrix, d * d)
            cov_name, form = param_of(cov, (K, d, d)), "cov"
            if cov_name is None:
                cov_name, form = param_of(rows(lambda fn: fn.scale_tril, d * d), (K, d, d)), "tril"
            cov_type, cov_val = "full", None if cov is None else cov[0].reshape(K, d, d)
            one = shared(cov)
            if cov_name is None and one is not None:  # one [d, d] covariance / Cholesky factor for every component
                cov_name, form = param_of(one, (d, d)), "cov"
                if cov_name is None:
                    cov_name, form = param_of(shared(rows(lambda fn: fn.scale_tril, d * d)), (d, d)), "tril"
                if cov_name is not None:
                    cov_type, cov_val = "tied", one[0].reshape(d, d)
        elif isinstance(obs[0][0], dist.Normal):
            loc, diag, form = rows(lambda fn: fn.loc, d), rows(lambda fn: fn.scale, d), "sd"
            if diag is None:
                return
            sph = [v[:, :1] for v in diag]
            cov_name = param_of(sph, (K,)) if d > 1 and all(np.allclose(v, s) for v, s in zip(diag, sph)) else None
            if cov_name is not None:
                cov_type, cov_val = "spherical", sph[0].reshape(K) ** 2
            else:
                cov_type, cov_val, cov_name = "diag", diag[0] ** 2, param_of(diag)
            one = shared(diag)
            if cov_name is None and one is not None:  # one scale for every component: a scalar or a [d] param
                same = all(np.allclose(v, v[:1]) for v in one)
                tied_name = param_of([v[:1] for v in one]) if same else None
                if tied_name is not None:
                    cov_type, cov_val, cov_name = "tied_spherical", one[0][0] ** 2, tied_name
                elif (tied_name := param_of(one)) is not None:
                    cov_type, cov_val, cov_name = "tied_diag", one[0] ** 2, tied_name
        else:
            return
        if loc is None:
            return
        roles["locs"] = (param_of(loc), loc[0])
        roles["covariances"] = (cov_name, cov_val)
        used = {name for name, _ in roles.values() if name is not None}
        other = [p for p in self.params if p not in used]
        if other or cov_val is None:
            for p in other:
                self.params[p].closed_form = False
            return
        self._roles, self._cov_form = roles, form
        init = {role: self.ops.asarray(v, dtype=self._dtype) for role, (_, v) in roles.items()}
        self._gm = GaussianMixture(self.ops.asarray(x, dtype=self._dtype), K, cov_type, weights=init["weights"],
                                   locs=init["locs"], covariances=init["covariances"],
                                   fixed=[k for k, (name, _) in roles.items() if name is None],
                                   reg_covar=self.reg_covar, ops=self.ops)

    def _check_family_estep(self) -> None:
        """Use the mixture's own E-step when it reproduces the enumerated table.

        Enumeration runs the whole model (all n units, every component) on every call; the recognised mixture
        computes ``log ω_k + log N(x_i; μ_k, Σ_k)`` as one ``[K, D] @ [D, b]`` product over the requested units only.
        It is used only if, at the initial θ and at a second θ (every free role moved: locations shifted, weights
        reversed, covariances scaled), its log-joint table equals the enumerated one to ``√eps`` relative: a mask, a
        scale, an extra factor or a different parameterisation in the user's model keeps the enumeration path.
        """
        if self._gm is None:
            return
        xp = self.ops.xp
        theta0 = self.init_params()
        base = self._internal(theta0)
        moved = dict(base)
        for role, (name, _value) in self._roles.items():
            if name is None:
                continue
            v = base[role]
            if role == "locs":
                moved[role] = v + 0.37 * xp.std(self._gm.x, 0) + 0.1
            elif role == "weights":
                moved[role] = xp.flip(v, (0,)) if v.shape[0] > 1 else v
            else:
                moved[role] = 1.3 * v

        def gap(theta: dict[str, Any]) -> tuple[Any, Any, Any]:
            enum = self.log_joint_table(theta)  # [K, n]
            own = self._gm.log_component(self._internal(theta)).T
            return xp.max(xp.abs(enum - own)), xp.max(xp.abs(enum)), xp.all(xp.isfinite(own))

        gap = self.ops.jit(gap)  # one compiled program on JAX (op by op, each op compiles apart)
        eps = float(xp.finfo(self._gm.x.dtype).eps)
        for internal in (base, moved):
            theta = dict(theta0)
            theta.update(self._external(internal, theta0))
            diff, size, finite = gap(theta)
            if not bool(finite) or float(diff) > eps ** 0.5 * (1.0 + float(size)):
                return
        self._family_estep = True

    def _external(self, internal: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
        """Mixture roles -> the user's params (shapes of ``template``); fixed roles are skipped."""
        xp, out = self.ops.xp, {}
        for role, v in internal.items():
            name = self._roles[role][0]
            if name is None:
                continue
            if role == "covariances" and self._cov_form != "cov":  # the user's Cholesky factors or sds
                v = xp.linalg.cholesky(v) if self._cov_form == "tril" else xp.sqrt(v)
            out[name] = xp.reshape(v, tuple(template[name].shape))
        return out

    def _internal(self, theta: dict[str, Any]) -> dict[str, Any]:
        """The user's params -> the mixture's roles; eager backends reuse the last result for the same θ arrays (so
        the mixture's own per-θ cache applies: FIEM evaluates two mini-batches at one θ)."""
        if self.ops.jittable:
            return self._internal_of(theta)
        key = tuple(theta[name] for name, _ in self._roles.values() if name is not None)
        cached = getattr(self, "_internal_cache", None)
        if cached is not None and same_arrays(cached[0], key):
            return cached[1]
        out = self._internal_of(theta)
        self._internal_cache = (array_stamps(key), out)
        return out

    def _internal_of(self, theta: dict[str, Any]) -> dict[str, Any]:
        xp, out = self.ops.xp, {}
        for role, (name, _value) in self._roles.items():
            gm_shape = tuple(self._gm.params[role].value.shape)
            if name is None:
                out[role] = self._gm.params[role].value
                continue
            # (covariances: squared in the mixture's dtype; a tensor stays in its graph, no torch.asarray warning)
            v = self.ops.asarray(theta[name], dtype=self._gm.x.dtype)
            if role == "covariances" and self._cov_form == "tril":
                v = v @ xp.swapaxes(v, -1, -2)
            elif role == "covariances" and self._cov_form == "sd":
                v = v * v
            out[role] = xp.reshape(v, gm_shape)
        return out

    # ----- exponential-family face: the mixture's statistics and M-step, mapped to the user's params ----------
    def expected_stats(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        r, _ = self.responsibilities(theta, units)
        return {"s": r[:, :, None] * self._gm._features(units)[:, None, :]}

    def sum_expected_stats(self, theta: dict[str, Any], units: Any = None) -> tuple[dict[str, Any], Any]:
        if self._family_estep:  # the mixture's own pass (streamed in cache-sized chunks on eager backends)
            return self._gm.sum_expected_stats(self._internal(theta), units)
        r, ll = self.responsibilities(theta, units)
        return self._gm._sum_stats(r, units), ll.sum()

    # compact rows for the incremental engines' tables: S_i = r_i ⊗ F(x_i) is linear in r_i [K]
    def expected_rows(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        if self._family_estep:  # the mixture's rows (no log-likelihoods computed on the way)
            return self._gm.expected_rows(self._internal(theta), units)
        return {"r": self.responsibilities(theta, units)[0]}

    def expected_rows_and_sum(self, theta: dict[str, Any],
                              units: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        if self._family_estep:  # the mixture's streamed pass
            return self._gm.expected_rows_and_sum(self._internal(theta), units)
        return super().expected_rows_and_sum(theta, units)

    def stats_rows(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        return {"r": z}

    def reduce_rows(self, rows: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return self._gm.reduce_rows(rows, units)

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        return self._gm.stats(theta, z, units)

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        return self._external(self._gm.m_step(s, self._internal(theta), num_units), theta)

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        return self._gm.fit_warnings(self._internal(theta)) if self._gm is not None else []

    def stats_in_domain(self, s: dict[str, Any]) -> Any | None:
        return self._gm.stats_in_domain(s) if self._gm is not None else None

    @property
    def permuted_units(self) -> Any:
        """With the family E-step: the model with its units reordered (the engines then cut contiguous mini-batch
        blocks, :mod:`latentfit.inference.units`); None (no reordering) while the model is enumerated."""
        return self._permuted_view if self._family_estep else None

    def _permuted_view(self, perm: Any) -> Any:
        return self._view(self._gm.permuted_units(perm))

    def shard_view(self, ops: Any, offset: int, total: int) -> Any:
        """One process's shard of a data-parallel fit: the recognised mixture centres its statistics at the mean of
        every process's data (``GaussianMixture.shard_view``); the user's parameters start where the model says."""
        return self if self._gm is None else self._view(self._gm.shard_view(ops, offset, total))

    def _view(self, gm: GaussianMixture) -> Any:
        view = copy.copy(self)
        view._gm, view._internal_cache = gm, None
        return view

    # ----- LatentModel face for samplers / post-fit tools ---------------------------------------------------
    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        xp = self.ops.xp
        if self._family_estep:  # equal to the enumerated table (checked at set-up), in this view's unit order
            lj = self._gm.log_component(self._internal(theta), units)
        else:
            lj = self.log_joint_table(theta, units).T  # [n, K]
        lz = xp.log(self._internal(theta)["weights"]) if self._gm is not None else xp.zeros_like(lj[0])
        return (z * (lj - lz)).sum(-1), (z * lz).sum(-1)


__all__ = ["EnumeratedLatentModel"]
