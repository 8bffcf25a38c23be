"""FitResult -> the installed arviz's native object.

arviz 0.x (Python < 3.12 gets 0.23) returns ``InferenceData``; arviz 1.x returns an xarray
``DataTree`` (built with ``arviz_base.from_dict``).  Either way the groups are

* ``posterior``: latent draws of the last iterations, dims ``(chain, draw, <unit plate>, ...)`` (an engine that keeps
  none: draws at θ̂, by MCMC, or exact ones of an exact E-step's discrete labels:
  :func:`~latentfit.inference.postfit.posterior_draws`);
* ``sample_stats``: acceptance rates of the MH kernels per iteration kept, averaged over the chains (the
  engines record no per-chain rates: one row, ``chain`` 0), for the draws an engine kept;
* ``observed_data``: the observed sites;
* ``log_likelihood`` (``log_likelihood=True``): ``log p(y | z; θ̂)`` of each observation at each latent draw;
* ``posterior_predictive`` (``posterior_predictive=True``): replicated data ``y_rep ~ p(y | z; θ̂)``, one per latent
  draw of the posterior group, each observed site under its own name and dims (``(chain, draw)`` then
  observed_data's), so ``arviz.plot_ppc`` and ``arviz.loo_pit`` read it.

so ``arviz.summary``, ``arviz.ess``, ``arviz.rhat`` and the plots work unchanged.  Dims are named as the model
names them (:meth:`~latentfit.inference.model.LatentModel.site_dims`: a Pyro / NumPyro site's plates, outermost to
innermost), ``<site>_dim_j`` where no plate names a dim; size-1 dims of the plate layout (a latent in
``plate(..., dim=-2)``) are dropped.  The unit dim's coordinates are the units' labels (NLME: the subject IDs, as
``fit.individual_parameters()`` is indexed).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from latentfit._hooks import user_stacklevel
from latentfit.inference.model import LAYOUT_DIM

_RESERVED = ("chain", "draw")


def _named(model: Any, name: str, values: np.ndarray, lead: int, sizes: dict[str, int],
           given: list[str | None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Site ``name``'s array without the plate layout's size-1 dims, and the names of its dims after the ``lead``
    (chain, draw) ones: the model's :meth:`site_dims`, ``<name>_dim_j`` where it names none or where a name's size
    disagrees with the size it has elsewhere (``sizes``: each name's size so far, updated)."""
    site_dims = getattr(model, "site_dims", None)
    if given is None:
        given = list(site_dims(name)) if callable(site_dims) else []
    given = list(given)
    ndim = values.ndim - lead
    if len(given) > ndim:  # not this array's layout: name nothing
        given = []
    given += [None] * (ndim - len(given))
    drop = tuple(lead + j for j, d in enumerate(given) if d == LAYOUT_DIM and values.shape[lead + j] == 1)
    if drop:
        values = np.squeeze(values, axis=drop)
        given = [d for j, d in enumerate(given) if lead + j not in drop]
    dims: list[str] = []
    for j, d in enumerate(given):
        size = int(values.shape[lead + j])
        if not d or d in _RESERVED or d in dims or sizes.setdefault(d, size) != size:
            d = f"{name}_dim_{j}"
        dims.append(d)
    return values, dims


def _groups(fit: Any, sizes: dict[str, int]) -> tuple[dict, dict, dict, dict, dict]:
    """The posterior, sample_stats and observed_data groups, their variables' dims and the units' coordinates
    (``sizes``: each dim name's size, filled in)."""
    from latentfit.inference.postfit import unit_labels

    model = fit.model
    posterior, dims = {}, {}
    for name, draws in fit.latents.items():
        posterior[name], dims[name] = _named(model, name, np.asarray(draws), 2, sizes)
    n_draw = next(iter(posterior.values())).shape[1] if posterior else 0
    sample_stats = {}
    # the engines record each kernel's rate per iteration as a mean over chains (and units): one row (chain 0), not a
    # copy per chain; none where the draws were made after the fit (an engine that keeps none): those rates are not
    # the draws'
    kept = getattr(fit, "latent_draws", None) is not None or not posterior
    for name, rates in (fit.acceptance.items() if kept else ()):
        rates = np.asarray(rates, dtype=float)
        tail = rates[-n_draw:] if n_draw else rates
        per_iter = tail.reshape(tail.shape[0], -1).mean(-1)
        sample_stats[f"acceptance_{name}"] = per_iter[None, :]
    observed = {}
    for name, v in (getattr(model, "observed", None) or {}).items():
        observed[name], dims[name] = _named(model, name, np.asarray(v), 0, sizes)
    coords = {}
    unit_dim = getattr(model, "unit_plate", None) or "unit"
    if unit_dim in sizes:  # the units' labels (NLME: the IDs), where the model has them for every unit
        coords[unit_dim] = np.asarray(unit_labels(fit, sizes[unit_dim]))
    return posterior, sample_stats, observed, dims, coords


def _log_likelihood(fit: Any, sizes: dict[str, int]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The ``log_likelihood`` group: ``log p(y_r | z; θ̂)`` of every observed element at each latent draw
    ``[chain, draw, ...]`` (the site's batch dims; where some elements are masked, the observed ones alone along one
    dim ``<site>_element``), and its variables' dims."""
    model = fit.model
    pointwise = getattr(model, "pointwise_log_likelihood", None)
    if pointwise is None:
        raise ValueError(f"to_arviz(log_likelihood=True) needs a Pyro or NumPyro model (its observation sites' "
                         f"densities element by element); {type(model).__name__} has none")
    draws = _draws(fit, "to_arviz(log_likelihood=True)")
    lead = tuple(draws.shape[:2])
    values, observed = pointwise(fit._theta(), draws.reshape((-1,) + tuple(draws.shape[2:])))
    out: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    for name, lp in values.items():
        lp = lp.reshape(lead + tuple(lp.shape[1:]))
        keep = observed[name]
        if not keep.all():
            out[name] = lp[..., keep]
            dims[name] = [f"{name}_element"]
            continue
        site_dims = getattr(model, "site_dims", None)
        given = list(site_dims(name))[:lp.ndim - 2] if callable(site_dims) else None
        out[name], dims[name] = _named(model, name, lp, 2, sizes, given)
    return out, dims


def _draws(fit: Any, what: str) -> np.ndarray:
    """The latent draws of the posterior group (:func:`~latentfit.inference.postfit.posterior_draws`), or an error
    naming ``what`` needed them."""
    from latentfit.inference.postfit import posterior_draws, require_draws

    draws = posterior_draws(fit)
    return require_draws(fit, what) if draws is None else draws


def _posterior_predictive(fit: Any, seed: int, sizes: dict[str, int],
                          observed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The ``posterior_predictive`` group: ``y_rep ~ p(y | z; θ̂)`` of each observed site at each latent draw
    ``[chain, draw, ...]`` (:meth:`~latentfit.inference.model.LatentModel.sample_observations`: one pass vectorised
    over the draws, from ``seed``), laid out as observed_data (the plate layout's size-1 dims dropped alike), and its
    variables' dims (observed_data's)."""
    model = fit.model
    draws = _draws(fit, "to_arviz(posterior_predictive=True)")
    ops = model.ops
    try:
        with ops.seed_context(seed):
            reps = model.sample_observations(fit._theta(), ops.asarray(draws), ops.key(seed))
    except NotImplementedError as exc:
        raise ValueError(f"to_arviz(posterior_predictive=True) needs a model that simulates its observations given "
                         f"the latents (Pyro / NumPyro models, GaussianMixture, LinearMixedModel, NLME with a "
                         f"residual error model): {exc}") from exc
    lead = tuple(draws.shape[:2])
    out: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    for name, y in reps.items():
        y = np.asarray(ops.to_numpy(y) if not isinstance(y, np.ndarray) else y)
        y = y.reshape(lead + tuple(y.shape[len(lead):]))
        out[name], dims[name] = _named(model, name, y, 2, sizes)
        if name in observed and out[name].shape[2:] != observed[name].shape:
            raise ValueError(f"posterior predictive draws of {name!r} have shape {out[name].shape[2:]}, its "
                             f"observed data {observed[name].shape}")
    return out, dims


def to_arviz(fit: Any, *, dims: dict[str, list[str]] | None = None, coords: dict[str, Any] | None = None,
             log_likelihood: bool = False, posterior_predictive: bool = False, seed: int = 0) -> Any:
    """Build InferenceData (arviz 0.x) or DataTree (arviz 1.x) from a :class:`FitResult`.

    ``dims`` / ``coords`` (arviz's meaning) replace the names found for those variables and dims, e.g. a Pyro
    ``log_psi`` of event shape (3,): ``dims={"log_psi": ["id", "parameter"]}, coords={"parameter": ["ka", "V", "CL"]}``
    (dims after chain and draw, the plate layout's size-1 dims already dropped).

    ``log_likelihood=True`` (Pyro / NumPyro models) adds the ``log_likelihood`` group that ``arviz.loo`` /
    ``arviz.waic`` / ``arviz.compare`` read: ``log p(y_r | z; θ̂)`` of each observation at each latent draw, the
    parameters at their estimates.  So it is the *conditional* leave-one-out of observations given the latents
    (each row held out from its own group's effect only), with θ̂ plugged in, not a leave-one-group-out of the
    marginal model; compare models fitted to the same data by it, and by AIC/BIC for the marginal likelihood.

    ``posterior_predictive=True`` adds the ``posterior_predictive`` group that ``arviz.plot_ppc`` and
    ``arviz.loo_pit`` read: for each latent draw of the posterior group (chain, draw), replicated data
    ``y_rep ~ p(y | z; θ̂)`` of every observed site, named and laid out as observed_data (its dims after chain and
    draw; masked-out or missing entries drawn too, where the model defines them: read them through the mask), the
    parameters at their estimates; drawn from ``seed``'s stream (the same seed, the same draws).  Pyro / NumPyro
    models (one model run per draw, vectorised over the draws), the EM family's mixtures (their posterior group's
    labels drawn at θ̂), ``LinearMixedModel``, and NLME models with a residual error model (``y = f + g ε``, on the
    DV's scale; censored observations drawn uncensored, the padding NaN as in observed_data)."""
    import arviz as az

    sizes: dict[str, int] = {}
    posterior, sample_stats, observed, found_dims, found_coords = _groups(fit, sizes)
    chains = {np.shape(v)[0] for v in posterior.values()}
    if chains == {1}:  # e.g. SAEM's default ⌈50 / N⌉ chains on 50 or more units
        warnings.warn(f"to_arviz: the posterior group has one chain ({type(fit.model).__name__}'s fit kept one), so "
                      f"arviz's R-hat is NaN (it needs 2 or more); refit with num_chains=4 for between-chain "
                      f"diagnostics", RuntimeWarning, stacklevel=user_stacklevel())
    loglik, ll_dims = _log_likelihood(fit, {}) if log_likelihood else ({}, {})
    ppc, pp_dims = _posterior_predictive(fit, seed, dict(sizes), observed) if posterior_predictive else ({}, {})
    user_dims = {k: list(v) for k, v in (dims or {}).items()}
    dims = {**found_dims, **user_dims}
    pp_dims = {**pp_dims, **{k: v for k, v in user_dims.items() if k in pp_dims}}
    coords = {**found_coords, **(coords or {})}
    major = int(str(az.__version__).split(".")[0])
    if major >= 1:  # arviz 1.x: DataTree through arviz_base
        from arviz_base import from_dict

        groups = {"posterior": posterior}
        if sample_stats:
            groups["sample_stats"] = sample_stats
        if observed:
            groups["observed_data"] = observed
        tree = from_dict(groups, dims=dims, coords=coords)
        if loglik:  # its own dims (an observed site's may differ: event dims summed, masked elements left out)
            extra = from_dict({"log_likelihood": loglik}, dims=ll_dims, coords=coords)
            tree["log_likelihood"] = extra["log_likelihood"]
        if ppc:  # observed_data's dims, after (chain, draw)
            extra = from_dict({"posterior_predictive": ppc}, dims=pp_dims, coords=coords)
            tree["posterior_predictive"] = extra["posterior_predictive"]
        return tree
    data = az.from_dict(posterior=posterior, sample_stats=sample_stats or None, observed_data=observed or None,
                        dims=dims, coords=coords)
    if loglik:
        extra = az.from_dict(log_likelihood=loglik, dims=ll_dims, coords=coords)
        data.add_groups({"log_likelihood": extra.log_likelihood})
    if ppc:
        extra = az.from_dict(posterior_predictive=ppc, dims=pp_dims, coords=coords)
        data.add_groups({"posterior_predictive": extra.posterior_predictive})
    return data
