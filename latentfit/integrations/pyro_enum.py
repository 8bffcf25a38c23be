"""Exact E-step for Pyro models with discrete per-unit latents, by Pyro's parallel enumeration.

A plain Pyro mixture, e.g.::

    @config_enumerate
    def model(x):
        weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", init_locs)
        scales = pyro.param("scales", torch.ones(K, d), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

becomes a :class:`LatentModel` whose exact E-step comes from enumeration: the model runs once under
``poutine.enum`` (every value of ``z`` along a new batch dim left of the plates), per-site
log-probabilities are summed over every dim but the enumeration and unit-plate dims, which gives
``log p(y_i, z_i = k; θ)`` ``[K, n]``; its log-sum-exp is the exact ``log p(y_i; θ)`` and its softmax the
responsibilities.

Closed-form M-step: the Gaussian-mixture pattern is recognised from the enumerated trace —
``Categorical(probs)`` label with probs a param (or a constant: fixed weights) and one observed
``Normal(locs[z], scales[z])`` (diagonal; spherical when ``scales`` is ``[K]``) or
``MultivariateNormal(locs[z], covariance_matrix=covs[z] | scale_tril=trils[z])`` site (a constant
scale is held fixed).  Statistics and M-step are those of :class:`~latentfit.models.mixture.GaussianMixture`
(the same code), so both routes give the same estimates.  Other discrete models still get the exact
responsibilities and marginal log-likelihood; the engines then ask for a closed form.

A mini-batch costs a mini-batch: a recognised mixture takes the family's own E-step over the batch's rows
(``EnumMixtureFace``); any other model runs on the batch alone (the unit plate subsampled to the batch's units,
as ``pyro.plate(..., subsample=units)``, and the observations inside it cut to the batch's rows) when that
reproduces the full run's rows, else on all units.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import config_enumerate
from pyro.poutine.util import site_is_subsample

from latentfit.inference.model import LatentModel, LatentSite, ModelSpecificationError
from latentfit.inference.ops import TorchOps
from latentfit.inference.units import UnitBlock, take_units
from latentfit.integrations._common import EnumMixtureFace
from latentfit.integrations.pyro import PyroLatentModel, _UnitSubsample, _unwrap, pyro_params
from latentfit.models.mixture import GaussianMixture


def has_enumerated_latents(model: Any, args: tuple = (), kwargs: dict | None = None) -> bool:
    """True when every latent sample site of ``model`` is discrete with enumerable support."""
    try:
        tr = poutine.trace(model).get_trace(*args, **(kwargs or {}))
    except Exception:
        return False
    latent = [s for s in tr.nodes.values() if s["type"] == "sample" and not s["is_observed"]
              and not site_is_subsample(s)]
    return bool(latent) and all(getattr(s["fn"], "has_enumerate_support", False) for s in latent)


class PyroEnumModel(EnumMixtureFace, LatentModel):
    """A Pyro model with one enumerable per-unit latent, seen through the :class:`LatentModel` contract."""

    has_exact_marginal = True
    has_posterior_sampler = True

    def __init__(self, model: Any, args: tuple = (), kwargs: dict | None = None, *,
                 reg_covar: float = 1e-6) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.fn, self.args, self.kwargs = model, tuple(args), dict(kwargs or {})
        try:
            tr = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        except Exception as exc:
            raise ModelSpecificationError(f"running the model failed: {type(exc).__name__}: {exc}") from exc
        self.params, self._device, _ = pyro_params(tr)  # params, constraints, device
        # one float dtype per fit: the widest of the params and the observed data
        observed = [s["value"] for s in tr.nodes.values() if s["type"] == "sample" and s["is_observed"]]
        self._dtype, _ = PyroLatentModel.ppl.float_dtype([p.value for p in self.params.values()] + observed)
        for p in self.params.values():
            p.closed_form = True
            if p.value.is_floating_point():
                p.value = p.value.to(self._dtype)
        self.ops = TorchOps(device=self._device, dtype=self._dtype)
        self._find_sites(tr)
        self.reg_covar = float(reg_covar)
        self._gm: GaussianMixture | None = None
        self._recognise()
        self._check_family_estep()
        self.has_stats = self.has_expected_stats = self._gm is not None
        if self._gm is None:
            self.no_stats_reason = (
                "the enumeration adapter computes this model's exact responsibilities and marginal "
                "log-likelihood, but found no closed-form M-step: the recognised pattern is a Categorical "
                "label (probs a param or constant) with one Normal(locs[z], scales[z]) or "
                "MultivariateNormal(locs[z], covariance_matrix=covs[z] | scale_tril=trils[z]) observation; "
                "write the model as such a mixture, use a model family, or fit it with SVI/TraceEnum_ELBO")

    # ----- structure --------------------------------------------------------------------------------
    def _find_sites(self, tr: Any) -> None:
        latent, observed, nesting = [], [], 0
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            (observed if site["is_observed"] else latent).append(name)
            for f in site["cond_indep_stack"]:
                if f.vectorized:
                    nesting = max(nesting, -f.dim)
        if len(latent) != 1 or not getattr(tr.nodes[latent[0]]["fn"], "has_enumerate_support", False):
            raise ModelSpecificationError(
                f"the enumeration adapter needs exactly one discrete (enumerable) latent site per unit; "
                f"found latent sites {latent}")
        if not observed:
            raise ModelSpecificationError("the model has no observed site")
        self.latent_name, self.observed_names = latent[0], observed
        frames = [f for f in tr.nodes[latent[0]]["cond_indep_stack"] if f.vectorized]
        if not frames:
            raise ModelSpecificationError(f"the discrete latent {latent[0]!r} is not inside a plate of units")
        frame = min(frames, key=lambda f: f.dim)
        self.unit_plate, self.unit_dim, self.num_units = frame.name, frame.dim, int(frame.size)
        self.max_plate_nesting = nesting
        self.observed = {n: tr.nodes[n]["value"].detach().cpu().numpy() for n in observed}
        self.K = int(tr.nodes[latent[0]]["fn"].enumerate_support(expand=False).shape[0])
        self.latent_dim = self.K
        self.latent_sites = [LatentSite(latent[0], (), 0, self.K, kind="categorical")]

    def _enum_trace(self, theta: dict[str, Any], units: Any = None) -> Any:
        """The enumerated trace at θ; with ``units``, of those units alone (the unit plate subsampled and the
        observations inside it cut to the batch's rows)."""
        m = poutine.substitute(config_enumerate(self.fn, default="parallel"), data=dict(theta))
        m = poutine.enum(m, first_available_dim=-(self.max_plate_nesting + 1))
        with _UnitSubsample(self.unit_plate, self.num_units, units) if units is not None else nullcontext():
            return poutine.trace(m).get_trace(*self.args, **self.kwargs)

    def log_joint_table(self, theta: dict[str, Any], units: Any = None) -> torch.Tensor:
        """``log p(y_i, z_i = k; θ)``: ``[K, n]`` (every other dim summed out); for a mini-batch the model runs
        on the batch alone when it can (:meth:`_batch_table_ok`), else on all units."""
        batch = units is not None and not isinstance(units, UnitBlock) and self._batch_table_ok()
        if batch:
            units = torch.as_tensor(units, device=self._device)
        with torch.no_grad():
            tr = self._enum_trace(theta, units if batch else None)
        full = self.max_plate_nesting + 1
        count = len(units) if batch else self.num_units
        out = torch.zeros(self.K, count, device=self._device, dtype=self._dtype)
        for name in [self.latent_name] + self.observed_names:
            site = tr.nodes[name]
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
            lp = lp.reshape((1,) * (full - lp.dim()) + tuple(lp.shape))
            unit_axis = full + self.unit_dim
            lp = lp.movedim(unit_axis, -1)
            lp = lp.reshape(lp.shape[0], -1, lp.shape[-1]).sum(1)  # [K or 1, n]
            out = out + lp
        if units is not None and not batch:
            out = take_units(self.ops, out, units if isinstance(units, UnitBlock) else
                             torch.as_tensor(units, device=out.device), 1)
        return out

    def _check_batch_table(self) -> bool:
        """Whether the enumerated model can run on a mini-batch alone: the table of an unsorted batch with a repeated
        unit equals the full table's columns (at the initial θ).  Per-unit arguments other than the observed values
        (covariates, a mask over the units) or a model that fails on a subsampled plate keep the full run."""
        n = self.num_units
        if n < 3:
            return False
        theta = {k: p.value for k, p in self.params.items()}
        idx = torch.tensor([n - 1, 0, n // 2, 0], device=self._device)
        self._batch_table = True
        try:
            part = self.log_joint_table(theta, idx)
        except Exception:  # the model cannot run on a subsampled plate
            return False
        finally:
            self._batch_table = False
        whole = self.log_joint_table(theta)[:, idx]
        tol = float(torch.finfo(self._dtype).eps) ** 0.5
        return tuple(part.shape) == tuple(whole.shape) and bool(torch.allclose(part, whole, rtol=tol, atol=tol))

    def responsibilities(self, theta: dict[str, Any], units: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r [n, K], log p(y_i; θ) [n])`` from enumeration."""
        if self._family_estep:
            return self._family_responsibilities(theta, units)
        lj = self.log_joint_table(theta, units)
        ll = torch.logsumexp(lj, 0)
        return torch.exp(lj - ll).T, ll

    def marginal_log_lik(self, theta: dict[str, Any], units: Any = None) -> Any:
        return self.responsibilities(theta, units)[1]

    # ----- the Gaussian-mixture pattern --------------------------------------------------------------
    def _recognise(self) -> None:
        theta = {n: p.value.detach().clone().requires_grad_(True) for n, p in self.params.items()}
        tr = self._enum_trace(theta)
        K = self.K
        zfn = _unwrap(tr.nodes[self.latent_name]["fn"])[0]
        if not isinstance(zfn, torch.distributions.Categorical) or len(self.observed_names) != 1:
            return
        obs = tr.nodes[self.observed_names[0]]
        fn = _unwrap(obs["fn"])[0]
        x = obs["value"].detach()
        if self.unit_dim != -1 or x.dim() not in (1, 2) or x.shape[0] != self.num_units:
            return
        d = 1 if x.dim() == 1 else int(x.shape[1])
        roles: dict[str, tuple[str | None, Any]] = {}
        w_name = _param_of(zfn.probs.reshape(-1, K)[0], theta)
        roles["weights"] = (w_name, zfn.probs.detach().reshape(-1, K)[0])
        if isinstance(fn, torch.distributions.MultivariateNormal):
            loc = _per_component(fn.loc, K, d)
            if "covariance_matrix" in fn.__dict__ or fn._unbroadcasted_scale_tril is None:
                cov_src, kind = fn.covariance_matrix, "cov"
            else:
                cov_src, kind = fn.scale_tril, "tril"
            tril = _param_of(_per_component(cov_src, K, d * d), theta)
            cov_name = tril if tril is not None and tuple(theta[tril].shape) == (K, d, d) else None
            cov_val = _per_component(fn.covariance_matrix, K, d * d)
            cov_type = "full"
            to_user = (lambda c: c) if kind == "cov" else torch.linalg.cholesky
            if kind == "tril" and cov_name is not None and not _is_tril_param(fn.scale_tril, theta[cov_name], K, d):
                cov_name = None
            if kind == "cov" and cov_name is not None and not torch.allclose(
                    _per_component(fn.covariance_matrix, K, d * d).detach(), theta[cov_name].detach().reshape(K, -1)):
                cov_name = None
            cov_val = None if cov_val is None else cov_val.detach().reshape(K, d, d)
        elif isinstance(fn, torch.distributions.Normal):
            loc = _per_component(fn.loc, K, d)
            sc = fn.scale
            diag = _per_component(sc, K, d)
            sph = _per_component(sc, K, 1) if d > 1 else None
            if sph is not None and diag is not None and torch.allclose(diag, sph.expand(K, d)) \
                    and _param_of(sph, theta) is not None and theta[_param_of(sph, theta)].numel() == K:
                cov_type, scale_t = "spherical", sph.reshape(K)
            elif diag is not None:
                cov_type, scale_t = "diag", diag
            else:
                return
            cov_name = _param_of(scale_t, theta)
            if cov_name is not None and theta[cov_name].numel() != scale_t.numel():
                cov_name = None
            cov_val = scale_t.detach() ** 2
            to_user = torch.sqrt
        else:
            return
        if loc is None:
            return
        loc_name = _param_of(loc, theta)
        if loc_name is not None and theta[loc_name].numel() != K * d:
            return
        roles["locs"] = (loc_name, loc.detach())
        roles["covariances"] = (cov_name, cov_val)
        used = {r[0] for r in roles.values() if r[0] is not None}
        other = [p for p in self.params if p not in used]
        if other:
            for p in other:
                self.params[p].closed_form = False
            return
        fixed = [k for k, (name, _) in roles.items() if name is None]
        self._roles, self._to_user = roles, to_user
        self._gm = GaussianMixture(x.to(self._dtype), K, cov_type, weights=roles["weights"][1],
                                   locs=roles["locs"][1], covariances=cov_val, fixed=fixed,
                                   reg_covar=self.reg_covar, ops=self.ops)

    # ----- exponential-family face (statistics and M-step: EnumMixtureFace) ----------------------
    def sample_posterior(self, theta: dict[str, Any], key: Any, num_samples: int, units: Any = None) -> Any:
        r, _ = self.responsibilities(theta, units)
        # Categorical(probs=r).sample((num_samples,)), drawn from the stream ``key`` (a torch.Generator)
        lab = torch.multinomial(r.reshape(-1, r.shape[-1]), num_samples, True, generator=key).T.reshape(
            (num_samples,) + tuple(r.shape[:-1]))
        return torch.nn.functional.one_hot(lab, self.K).to(self._dtype)

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        return {self.latent_name: z.argmax(-1)}


def _param_of(tensor: Any, theta: dict[str, torch.Tensor]) -> str | None:
    """Name of the single param ``tensor`` depends on (and is a copy of), else None."""
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return None
    names = list(theta)
    probe = torch.linspace(1.0, 2.0, tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    out = (tensor.reshape(-1) * probe).sum()  # not .sum(): a normalised vector has a constant sum
    grads = torch.autograd.grad(out, [theta[n] for n in names], allow_unused=True, retain_graph=True)
    deps = [n for n, g in zip(names, grads) if g is not None and bool((g != 0).any())]
    if len(deps) != 1:
        return None
    p = theta[deps[0]].detach()
    if p.numel() != tensor.numel() or not torch.allclose(p.reshape(-1), tensor.detach().reshape(-1)):
        return None
    return deps[0]


def _per_component(t: Any, K: int, width: int) -> torch.Tensor | None:
    """``[K, width]`` rows of an enumerated tensor (enum dim first), if constant over the units."""
    if t is None:
        return None
    t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    if t.numel() % width != 0:
        return None
    if t.dim() == 0 or t.shape[0] != K:
        t = t.expand((K,) + tuple(t.shape[1:])) if t.dim() > 0 and t.shape[0] == 1 else t
        if t.dim() == 0 or t.shape[0] != K:
            return None
    flat = t.reshape(K, -1)
    if flat.shape[1] % width != 0:
        return None
    rows = flat.reshape(K, -1, width)
    if not torch.allclose(rows.detach(), rows[:, :1].detach().expand_as(rows)):
        return None
    return rows[:, 0]


def _is_tril_param(scale_tril: torch.Tensor, p: torch.Tensor, K: int, d: int) -> bool:
    rows = _per_component(scale_tril, K, d * d)
    return rows is not None and torch.allclose(rows.detach().reshape(K, d, d), p.detach())


__all__ = ["PyroEnumModel", "has_enumerated_latents"]
