"""Pyro adapter: a plain Pyro model function becomes a :class:`LatentModel` by tracing.

Roles of the sites (found by ``poutine.trace``):

* ``pyro.param`` sites are θ (constrained values, constraints from the param store);
* unobserved ``pyro.sample`` sites inside the *unit plate* are per-unit latents ``z_i``; the unit
  plate is the plate shared by every latent site (or the one named ``unit_plate=``);
* observed sites are data; they must sit inside the unit plate (pad ragged data and ``.mask()``).

Per-unit log densities sum every dim but the unit-plate dim, masks included.  All chains of all
units are evaluated in one model call: the model runs inside an extra plate of size L at dim
``−(max_plate_nesting + 1)`` (as Pyro's ``vectorize_particles``), so models must broadcast over
extra leading batch dims (index with ``...``).

Recognised closed-form patterns (the exponential-family face of SAEM/EM):

* a Normal / LogNormal latent whose loc and scale are params (μ, ω) and a MultivariateNormal latent
  whose loc and covariance (or scale_tril) are params (μ, Ω): statistics ``Σ w_i``, ``Σ w_i w_iᵀ``;
* a Normal observation whose scale is a scalar param (constant residual error): ``Σ (y − f)²``.

Every other parameter gets the numerical M-step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyro
import pyro.distributions as pdist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import ExpTransform

from latentfit.inference.model import (
    DataError,
    LatentModel,
    LatentSite,
    ModelSpecificationError,
    ParamInfo,
)
from latentfit.inference.ops import TorchOps
from latentfit.integrations._common import (
    ClosedFormFace,
    _GaussianLatentPattern,
    _ResidualPattern,
    _SiteLayout,
    unit_frame,
)

CHAIN_PLATE = "_latentfit_chains"


class _Substitute(Messenger):
    """Lightweight replacement for ``trace(substitute(condition(model)))`` in the hot loop.

    Sets the param values and the latent values, and records the sample sites as ``nodes``
    (name -> message) without building a full Pyro ``Trace``.
    """

    def __init__(self, params: dict[str, Any], latents: dict[str, Any]) -> None:
        super().__init__()
        self.params = params
        self.latents = latents
        self.nodes: dict[str, Any] = {}

    def _pyro_param(self, msg: Any) -> None:
        value = self.params.get(msg["name"])
        if value is not None:
            msg["value"] = value

    def _pyro_sample(self, msg: Any) -> None:
        value = self.latents.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg: Any) -> None:
        self.nodes[msg["name"]] = msg


def _unwrap(fn: Any) -> tuple[Any, Any]:
    """Strip Independent / Masked / Expanded wrappers; return (base distribution, mask)."""
    mask = None
    while True:
        if isinstance(fn, pdist.MaskedDistribution):
            mask = fn._mask if mask is None else (mask & fn._mask)
            fn = fn.base_dist
        elif isinstance(fn, (pdist.Independent, torch.distributions.Independent)):
            fn = fn.base_dist
        elif isinstance(fn, pdist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, mask


def _is_lognormal(fn: Any) -> bool:
    if isinstance(fn, torch.distributions.LogNormal):
        return True
    return (isinstance(fn, torch.distributions.TransformedDistribution)
            and isinstance(_unwrap(fn.base_dist)[0], torch.distributions.Normal)
            and len(fn.transforms) == 1 and isinstance(fn.transforms[0], ExpTransform))


def _normal_base(fn: Any) -> Any:
    fn = _unwrap(fn)[0]
    if isinstance(fn, torch.distributions.LogNormal):
        return _unwrap(fn.base_dist)[0]
    if isinstance(fn, torch.distributions.TransformedDistribution):
        return _unwrap(fn.base_dist)[0]
    return fn


class PyroLatentModel(ClosedFormFace, LatentModel):
    """A Pyro model function, traced once, seen through the :class:`LatentModel` contract."""

    def __init__(self, model: Any, args: tuple = (), kwargs: dict | None = None,
                 unit_plate: str | None = None, closed_form: bool = True) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.fn = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        trace = self._trace_model()
        self._find_params(trace)
        self._find_sites(trace, unit_plate)
        self.ops = TorchOps(device=self._device, dtype=self._dtype)
        self._check_observed(trace)
        self._gauss: list[_GaussianLatentPattern] = []
        self._resid: list[_ResidualPattern] = []
        if closed_form:
            self._recognise_patterns()
        self.has_stats = bool(self._gauss or self._resid)
        self._recognise_gaussian_faces()
        self._check_initial_density()

    # ----- tracing ------------------------------------------------------------------------------------
    def _trace_model(self) -> Any:
        try:
            with pyro.validation_enabled(False):  # NaN densities are reported by site below
                return poutine.trace(self.fn).get_trace(*self.args, **self.kwargs)
        except Exception as exc:  # the model itself failed: say so, keep the original as cause
            raise ModelSpecificationError(
                f"running the model with the given arguments failed: {type(exc).__name__}: {exc}") from exc

    def _find_params(self, trace: Any) -> None:
        store = pyro.get_param_store()
        self.params = {}
        for name, site in trace.nodes.items():
            if site["type"] != "param":
                continue
            value = site["value"].detach()
            constraint = store._constraints.get(name, constraints.real)
            transform = transform_to(constraint)  # as Pyro's param store does
            self.params[name] = ParamInfo(
                name=name, value=value, to_unconstrained=transform.inv, to_constrained=transform,
                meta={"constraint": constraint})
        if not self.params:
            raise ModelSpecificationError(
                "the model has no pyro.param site, so there is nothing to estimate: declare the "
                "population parameters with pyro.param(...) (for fully Bayesian inference use "
                "pyro.infer.MCMC or SVI instead)")
        first = next(iter(self.params.values())).value
        self._device, self._dtype = first.device, first.dtype

    def _find_sites(self, trace: Any, unit_plate: str | None) -> None:
        latent, observed = [], []
        max_nesting = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_do_not_trace"):
                continue
            if site["is_observed"]:
                observed.append(name)
            else:
                latent.append(name)
            for f in site["cond_indep_stack"]:
                if f.vectorized:
                    max_nesting = max(max_nesting, -f.dim)
        if not latent:
            raise ModelSpecificationError(
                "the model has no latent sample site (every pyro.sample is observed): there is nothing "
                "to integrate out; fit it with pyro.infer.SVI (AutoDelta guide) or MAP instead")
        self.max_plate_nesting = max_nesting
        frames = {n: [f for f in trace.nodes[n]["cond_indep_stack"] if f.vectorized] for n in latent}
        frame = unit_frame(latent, frames, unit_plate, "pyro")
        self.unit_plate = frame.name
        self.unit_dim = frame.dim
        self.num_units = int(frame.size)
        self.observed_names = observed
        self.latent_names_ = latent
        # layout of the flat latent vector
        self._layout: list[_SiteLayout] = []
        offset = 0
        for n in latent:
            site = trace.nodes[n]
            fn, value = site["fn"], site["value"]
            event_shape = tuple(fn.event_shape)
            batch_shape = tuple(value.shape[: value.dim() - len(event_shape)])
            unit_axis = len(batch_shape) + self.unit_dim
            if unit_axis < 0 or batch_shape[unit_axis] != self.num_units:
                raise ModelSpecificationError(
                    f"latent site {n!r} has shape {tuple(value.shape)} without the unit dim "
                    f"{self.unit_dim} of plate {self.unit_plate!r} (size {self.num_units})")
            transform = biject_to(fn.support)
            x = value.detach().movedim(unit_axis, 0)
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
            site = trace.nodes[n]
            in_plate = any(f.name == self.unit_plate for f in site["cond_indep_stack"])
            if not in_plate:
                raise ModelSpecificationError(
                    f"observed site {n!r} is not inside the unit plate {self.unit_plate!r}: put every "
                    "observation inside the plate of the units (pad ragged data to [units, max_obs] and "
                    "mask the padding with .mask(...))")
            value = site["value"]
            fn, mask = _unwrap(site["fn"])
            full_mask = site["mask"]
            if mask is not None:
                full_mask = mask if full_mask is None else (full_mask & mask)
            bad = ~torch.isfinite(value)
            if full_mask is not None and full_mask is not True:
                m = torch.as_tensor(full_mask, device=value.device)
                bad = bad & m.expand(bad.shape) if m.dim() <= bad.dim() else bad
            nbad = int(bad.sum())
            if nbad:
                raise DataError(
                    f"observed site {n!r} holds {nbad} NaN/inf value(s) out of {value.numel()} at unmasked "
                    "positions; drop them or mask them with .mask(...) / obs_mask")
            self.observed[n] = value.detach().cpu().numpy()

    # ----- running the model with given θ and z -------------------------------------------------------------
    def _split_latents(self, z: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``[L, N, d]`` unconstrained -> per site (constrained value shaped for the chain plate, log|J|)."""
        L = z.shape[0]
        out = {}
        for s in self._layout:
            u = z[..., s.offset:s.offset + s.size].reshape((L, self.num_units) + s.u_rest)
            x = s.transform(u)
            ladj = s.transform.log_abs_det_jacobian(u, x)
            ladj = ladj.reshape(L, self.num_units, -1).sum(-1) if ladj.dim() > 2 else ladj.reshape(L, -1)
            # back to the site's layout: [L, *pad, *batch (unit axis restored), *event]
            x = x.movedim(1, 1 + s.unit_axis)
            pad = self.max_plate_nesting - len(s.batch_shape)
            x = x.reshape((L,) + (1,) * pad + tuple(x.shape[1:]))
            out[s.name] = (x, ladj)
        return out

    def _chain_model(self, L: int):
        nesting = self.max_plate_nesting

        def wrapped():
            with pyro.plate(CHAIN_PLATE, L, dim=-(nesting + 1)):
                return self.fn(*self.args, **self.kwargs)

        return wrapped

    def _run(self, theta: dict[str, Any], values: dict[str, torch.Tensor], L: int) -> Any:
        runner = _Substitute(theta, values)
        try:
            with pyro.validation_enabled(False), runner:
                self._chain_model(L)()
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ModelSpecificationError(
                f"the model failed when vectorised over {L} MCMC chain(s) (an extra batch dim at "
                f"{-(self.max_plate_nesting + 1)}): {exc}. Write the model so that it broadcasts over "
                "leading batch dims, e.g. index latent vectors with psi[..., 0] rather than psi[:, 0]"
            ) from exc
        return runner

    def _per_unit(self, log_prob: torch.Tensor, L: int) -> torch.Tensor:
        """Sum a site's log-prob over every dim but the chain and unit dims -> ``[L, N]``."""
        full = self.max_plate_nesting + 1
        lp = log_prob.reshape((1,) * (full - log_prob.dim()) + tuple(log_prob.shape)) if log_prob.dim() < full \
            else log_prob
        unit_axis = full + self.unit_dim
        lp = lp.movedim(unit_axis, 1)
        lp = lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)
        return lp.expand(L, self.num_units)

    @staticmethod
    def _site_log_prob(site: dict) -> torch.Tensor:
        lp = site["fn"].log_prob(site["value"])
        return scale_and_mask(lp, 1.0, site["mask"])

    def _densities_from_trace(self, tr: Any, ladj: dict[str, torch.Tensor], L: int):
        ll = torch.zeros(L, self.num_units, device=self._device, dtype=self._dtype)
        lp = torch.zeros_like(ll)
        for name in self.observed_names:
            ll = ll + self._per_unit(self._site_log_prob(tr.nodes[name]), L)
        for name in self.latent_names_:
            lp = lp + self._per_unit(self._site_log_prob(tr.nodes[name]), L) + ladj[name]
        return ll, lp

    def _full_z(self, z: torch.Tensor, units: Any) -> torch.Tensor:
        if units is None:
            return z
        full = z.new_zeros(z.shape[:-2] + (self.num_units, z.shape[-1]))
        return full.index_copy(-2, torch.as_tensor(units, device=z.device), z)

    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        z = self._full_z(z, units)
        lead = z.shape[:-2]
        zz = z.reshape((-1,) + tuple(z.shape[-2:]))
        L = zz.shape[0]
        split = self._split_latents(zz)
        tr = self._run(theta, {n: v[0] for n, v in split.items()}, L)
        ll, lp = self._densities_from_trace(tr, {n: v[1] for n, v in split.items()}, L)
        ll, lp = ll.reshape(lead + (self.num_units,)), lp.reshape(lead + (self.num_units,))
        if units is not None:
            idx = torch.as_tensor(units, device=z.device)
            ll, lp = ll.index_select(-1, idx), lp.index_select(-1, idx)
        return ll, lp

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        if self._gauss and len(self._gauss) == len(self._layout):
            return self._sample_gaussian_prior(theta, num_chains, units)
        with torch.no_grad():
            tr = self._run(theta, {}, num_chains)
        parts = []
        L = num_chains
        for s in self._layout:
            x = tr.nodes[s.name]["value"].detach()
            x = x.reshape((L,) + s.batch_shape + s.event_shape) if x.dim() != 1 + len(s.batch_shape) + len(
                s.event_shape) else x
            x = x.expand((L,) + s.batch_shape + s.event_shape).movedim(1 + s.unit_axis, 1)
            u = s.transform.inv(x)
            parts.append(u.reshape(L, self.num_units, s.size))
        z = torch.cat(parts, -1)
        if units is not None:
            z = z.index_select(1, torch.as_tensor(units, device=z.device))
        return z

    def _sample_gaussian_prior(self, theta: dict[str, Any], num_chains: int, units: Any) -> torch.Tensor:
        """All latents follow a recognised Gaussian pattern: draw ``μ + ω ε`` (or ``μ + Lε``) directly."""
        n = self.num_units if units is None else len(units)
        parts = []
        for s in self._layout:
            g = next(x for x in self._gauss if x.site == s.name)
            mu = theta[g.loc].detach().reshape(-1)
            eps = torch.randn((num_chains, n, s.size), device=self._device, dtype=self._dtype)
            if g.kind == "normal":
                parts.append(mu + theta[g.scale].detach().reshape(-1) * eps)
            else:
                cov = theta[g.scale].detach()
                tril = cov if g.kind == "mvn_tril" else torch.linalg.cholesky(cov)
                parts.append(mu + eps @ tril.T)
        return torch.cat(parts, -1)

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        lead = tuple(z.shape[:-2])
        out = {}
        for s in self._layout:
            u = z[..., s.offset:s.offset + s.size].reshape(lead + (z.shape[-2],) + s.u_rest)
            out[s.name] = s.transform(u)
        return out

    # ----- diagnostics of bad models --------------------------------------------------------------------
    def _check_initial_density(self) -> None:
        theta = self.init_params()
        with torch.no_grad():
            z = self.sample_prior(theta, None, 1)
            if not torch.isfinite(z).all():
                bad = [s.name for s in self._layout if not torch.isfinite(z[..., s.offset:s.offset + s.size]).all()]
                raise ModelSpecificationError(
                    f"sampling the latent site(s) {bad} from the model at the initial parameter values "
                    "gave NaN/inf; check the initial values of the pyro.param sites")
            self.raise_for_nonfinite(theta, z)

    def raise_for_nonfinite(self, theta: dict[str, Any], z: Any) -> None:
        """Raise naming the site whose log-density is NaN/inf at ``(θ, z)`` (no-op when all finite)."""
        L = z.shape[0]
        split = self._split_latents(z)
        with torch.no_grad():
            tr = self._run(theta, {n: v[0] for n, v in split.items()}, L)
            for name in self.latent_names_ + self.observed_names:
                lp = self._per_unit(self._site_log_prob(tr.nodes[name]), L)
                nbad = int((~torch.isfinite(lp)).sum())
                if nbad:
                    raise ModelSpecificationError(
                        f"the log-density of site {name!r} is NaN/inf for {nbad} of {lp.numel()} unit(s) at "
                        "the initial parameter values; check the initial pyro.param values and the "
                        "site's distribution arguments")

    # ----- exponential-family face -------------------------------------------------------------------
    def _grad_trace(self) -> tuple[Any, dict[str, torch.Tensor]]:
        theta = {n: p.value.detach().clone().requires_grad_(True) for n, p in self.params.items()}
        z = self.sample_prior(self.init_params(), None, 1)
        split = self._split_latents(z)
        tr = self._run(theta, {n: v[0] for n, v in split.items()}, 1)
        return tr, theta

    @staticmethod
    def _depends(out: torch.Tensor, theta: dict[str, torch.Tensor]) -> set[str]:
        if not out.requires_grad:
            return set()
        names = list(theta)
        grads = torch.autograd.grad(out.sum(), [theta[n] for n in names], allow_unused=True, retain_graph=True)
        return {n for n, g in zip(names, grads) if g is not None and bool((g != 0).any())}

    def _is_param(self, tensor: Any, theta: dict[str, torch.Tensor]) -> str | None:
        """Name of the param that ``tensor`` is a (broadcast) copy of, else None."""
        if not isinstance(tensor, torch.Tensor):
            return None
        deps = self._depends(tensor, theta)
        if len(deps) != 1:
            return None
        name = deps.pop()
        p = theta[name].detach()
        try:
            same = torch.equal(tensor.detach(), p.expand(tensor.shape))
        except RuntimeError:
            return None
        return name if same else None

    def _recognise_patterns(self) -> None:
        tr, theta = self._grad_trace()
        claimed: dict[str, str] = {}  # param -> site using it in closed form
        for s in self._layout:
            fn = _unwrap(tr.nodes[s.name]["fn"])[0]
            if isinstance(fn, torch.distributions.Normal) or _is_lognormal(fn):
                base = _normal_base(fn)
                loc, scale = self._is_param(base.loc, theta), self._is_param(base.scale, theta)
                if loc and scale and loc != scale and theta[loc].shape == theta[scale].shape \
                        and s.size == int(np.prod(s.u_rest) if s.u_rest else 1):
                    self._gauss.append(_GaussianLatentPattern(s.name, loc, scale, "normal"))
                    claimed[loc] = claimed[scale] = s.name
            elif isinstance(fn, torch.distributions.MultivariateNormal) and s.size == fn.event_shape[0]:
                loc = self._is_param(fn.loc, theta)
                cov = self._is_param(fn.covariance_matrix, theta)
                kind = "mvn_cov"
                if cov is None:
                    cov, kind = self._is_param(fn.scale_tril, theta), "mvn_tril"
                if loc and cov and loc != cov:
                    self._gauss.append(_GaussianLatentPattern(s.name, loc, cov, kind))
                    claimed[loc] = claimed[cov] = s.name
        for name in self.observed_names:
            fn = _unwrap(tr.nodes[name]["fn"])[0]
            if isinstance(fn, torch.distributions.Normal):
                scale = self._is_param(fn.scale, theta)
                if scale and theta[scale].numel() == 1 and scale not in self._depends(fn.loc, theta):
                    self._resid.append(_ResidualPattern(name, scale))
                    claimed[scale] = name
        # a param is closed-form only if no other site depends on it
        for pname, owner in list(claimed.items()):
            others = [n for n in self.latent_names_ + self.observed_names if n != owner]
            for other in others:
                site = tr.nodes[other]
                if pname in self._depends(self._site_log_prob(site), theta):
                    self._gauss = [g for g in self._gauss if pname not in (g.loc, g.scale)]
                    self._resid = [r for r in self._resid if r.scale != pname]
                    break
        # the residual pattern needs every observation of that site in the statistic
        self._mark_closed_form()

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        out = self._gaussian_stats(z)
        if self._resid:
            zf = self._full_z(z, units)
            lead = zf.shape[:-2]
            zz = zf.reshape((-1,) + tuple(zf.shape[-2:]))
            L = zz.shape[0]
            split = self._split_latents(zz)
            tr = self._run(theta, {n: v[0] for n, v in split.items()}, L)
            for r in self._resid:
                site = tr.nodes[r.site]
                fn, fmask = _unwrap(site["fn"])
                resid2 = (site["value"] - fn.loc) ** 2
                mask = site["mask"]
                if fmask is not None:
                    mask = fmask if mask is None else mask & fmask
                rss = self._per_unit(scale_and_mask(resid2, 1.0, mask), L).reshape(lead + (self.num_units,))
                cnt = self._per_unit(scale_and_mask(torch.ones_like(resid2), 1.0, mask), L)
                cnt = cnt.reshape(lead + (self.num_units,))
                if units is not None:
                    idx = torch.as_tensor(units, device=rss.device)
                    rss, cnt = rss.index_select(-1, idx), cnt.index_select(-1, idx)
                out[f"{r.site}.rss"] = rss
                out[f"{r.site}.nobs"] = cnt
        return out

    # ----- Gaussian faces (predict / observations / prior_moments) ---------------------------------
    # Recognised when every observed site is Normal (any loc/scale: the traced distribution gives the
    # mean and sd) and every latent site is Normal / LogNormal / MultivariateNormal whose arguments do
    # not depend on other latents (the prior of the unconstrained z_i is then Gaussian).
    def _recognise_gaussian_faces(self) -> None:
        try:
            self._find_gaussian_faces()
        except Exception:  # an unusual model: no Gaussian faces (IS / Louis still apply); errors surface later
            self.has_gaussian_obs = self.has_gaussian_prior = False

    def _find_gaussian_faces(self) -> None:
        tr, _ = self._grad_trace()
        self.has_gaussian_obs = bool(self.observed_names) and all(
            isinstance(_unwrap(tr.nodes[n]["fn"])[0], torch.distributions.Normal)
            and len(tr.nodes[n]["fn"].event_shape) <= 1 for n in self.observed_names)
        self.has_gaussian_prior = self._gaussian_prior_ok()
        if self.has_gaussian_obs:
            self._obs_values, self._obs_mask = self._observed_arrays(tr)

    def _gaussian_prior_ok(self) -> bool:
        z = self.sample_prior(self.init_params(), None, 1).detach().requires_grad_(True)
        split = self._split_latents(z)
        tr = self._run(self.init_params(), {n: v[0] for n, v in split.items()}, 1)
        for s in self._layout:
            fn = _unwrap(tr.nodes[s.name]["fn"])[0]
            if isinstance(fn, torch.distributions.MultivariateNormal):
                per_unit = int(np.prod(s.batch_shape)) // self.num_units
                if per_unit != 1:
                    return False
                args = [fn.loc, fn.scale_tril]
            elif isinstance(fn, torch.distributions.Normal) or _is_lognormal(fn):
                base = _normal_base(fn)
                args = [base.loc, base.scale]
            else:
                return False
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    (g,) = torch.autograd.grad(a.sum(), z, allow_unused=True, retain_graph=True)
                    if g is not None and bool((g != 0).any()):
                        return False  # hierarchical latents: the prior of z_i is not Gaussian
        return True

    def _obs_flat(self, x: torch.Tensor, event_dim: int, L: int) -> torch.Tensor:
        """``[L?, *pad, *batch, *event]`` -> ``[L, N, T_site]`` (unit dim second, the rest flattened)."""
        full = self.max_plate_nesting + 1 + event_dim
        x = x.reshape((1,) * (full - x.dim()) + tuple(x.shape))
        x = x.movedim(self.max_plate_nesting + 1 + self.unit_dim, 1)
        x = x.expand((L,) + tuple(x.shape[1:]))
        return x.reshape(L, self.num_units, -1)

    def _site_mask(self, site: dict) -> Any:
        fn, mask = _unwrap(site["fn"])
        full = site["mask"]
        if mask is not None:
            full = mask if (full is None or full is True) else (full & mask)
        return None if full is None or full is True else torch.as_tensor(full, device=self._device)

    def _observed_arrays(self, tr: Any) -> tuple[torch.Tensor, torch.Tensor]:
        vals, masks = [], []
        for name in self.observed_names:
            site = tr.nodes[name]
            fn = _unwrap(site["fn"])[0]
            ev = len(site["fn"].event_shape)
            shape = torch.broadcast_shapes(site["value"].shape, fn.loc.shape, fn.scale.shape)
            value = site["value"].detach().expand(shape)
            mask = self._site_mask(site)
            m = torch.ones(shape, dtype=torch.bool, device=self._device)
            if mask is not None:
                mask = mask.reshape(tuple(mask.shape) + (1,) * ev) if ev else mask
                m = m & mask.expand(shape)
            vals.append(self._obs_flat(value, ev, 1)[0])
            masks.append(self._obs_flat(m, ev, 1)[0])
        return torch.cat(vals, -1).to(self._dtype), torch.cat(masks, -1)

    def predict(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """Mean and sd of every observation given the latents, ``[..., n, T]`` (sites concatenated)."""
        if not self.has_gaussian_obs:
            raise ModelSpecificationError("predict() needs Normal observation sites (has_gaussian_obs is False for "
                                          f"the observed site(s) {self.observed_names})")
        z = self._full_z(z, units)
        lead = z.shape[:-2]
        zz = z.reshape((-1,) + tuple(z.shape[-2:]))
        L = zz.shape[0]
        split = self._split_latents(zz)
        tr = self._run(theta, {n: v[0] for n, v in split.items()}, L)
        means, sds = [], []
        for name in self.observed_names:
            site = tr.nodes[name]
            fn = _unwrap(site["fn"])[0]
            ev = len(site["fn"].event_shape)
            shape = torch.broadcast_shapes(site["value"].shape, fn.loc.shape, fn.scale.shape)
            means.append(self._obs_flat(fn.loc.expand(shape), ev, L))
            sds.append(self._obs_flat(fn.scale.expand(shape), ev, L))
        mean, sd = torch.cat(means, -1), torch.cat(sds, -1)
        mean = mean.reshape(lead + tuple(mean.shape[1:]))
        sd = sd.reshape(lead + tuple(sd.shape[1:]))
        if units is not None:
            idx = torch.as_tensor(units, device=mean.device)
            mean, sd = mean.index_select(-2, idx), sd.index_select(-2, idx)
        return mean, sd

    def observations(self, units: Any = None) -> tuple[Any, Any]:
        if not self.has_gaussian_obs:
            raise ModelSpecificationError("observations() is only available for Normal observation sites")
        y, m = self._obs_values, self._obs_mask
        if units is not None:
            idx = torch.as_tensor(units, device=y.device)
            y, m = y.index_select(0, idx), m.index_select(0, idx)
        return y, m

    def prior_moments(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """Mean ``[n, d]`` and covariance ``[n, d, d]`` of the Gaussian prior of the unconstrained latents."""
        if not self.has_gaussian_prior:
            raise ModelSpecificationError("prior_moments() needs Normal / LogNormal / MultivariateNormal latent "
                                          "sites whose arguments do not depend on other latents")
        z = self.sample_prior(theta, None, 1)
        split = self._split_latents(z)
        tr = self._run(theta, {n: v[0].detach() for n, v in split.items()}, 1)
        n, d = self.num_units, self.latent_dim
        mean = torch.zeros(n, d, device=self._device, dtype=self._dtype)
        cov = torch.zeros(n, d, d, device=self._device, dtype=self._dtype)
        for s in self._layout:
            site = tr.nodes[s.name]
            fn = _unwrap(site["fn"])[0]
            sl = slice(s.offset, s.offset + s.size)
            vshape = tuple(site["value"].shape)  # [1, *pad, *batch, *event]
            if isinstance(fn, torch.distributions.MultivariateNormal):
                k = vshape[-1]
                loc = fn.loc.expand(vshape).reshape(n, k)
                c = fn.covariance_matrix.expand(vshape + (k,)).reshape(n, k, k)
                # the unit dim is the only batch dim of size > 1 (checked in _gaussian_prior_ok)
                mean = mean.index_copy(1, torch.arange(s.offset, s.offset + k, device=self._device), loc)
                block = torch.zeros(n, d, d, device=self._device, dtype=self._dtype)
                block[:, sl, sl] = c
                cov = cov + block
            else:
                base = _normal_base(fn)
                ev = len(vshape) - 1 - self.max_plate_nesting
                loc = self._obs_flat(base.loc.expand(vshape), ev, 1)[0]
                sd = self._obs_flat(base.scale.expand(vshape), ev, 1)[0]
                mean = mean + torch.nn.functional.pad(loc, (s.offset, d - s.offset - s.size))
                cov = cov + torch.diag_embed(torch.nn.functional.pad(sd * sd, (s.offset, d - s.offset - s.size)))
        if units is not None:
            idx = torch.as_tensor(units, device=mean.device)
            mean, cov = mean.index_select(0, idx), cov.index_select(0, idx)
        return mean, cov


def write_params_to_store(params: dict[str, Any]) -> None:
    """Store the estimates in Pyro's param store (constrained values)."""
    store = pyro.get_param_store()
    for name, value in params.items():
        store[name] = torch.as_tensor(value).detach().clone() if not isinstance(value, torch.Tensor) \
            else value.detach().clone()


__all__ = ["PyroLatentModel", "write_params_to_store"]
