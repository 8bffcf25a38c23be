"""FitResult -> the installed arviz's native object.

arviz 0.x (Python < 3.12 gets 0.23) returns ``InferenceData``; arviz 1.x returns an xarray
``DataTree`` (built with ``arviz_base.from_dict``).  Either way the groups are

* ``posterior``: latent draws of the last iterations, dims ``(chain, draw, <unit plate>, ...)``;
* ``sample_stats``: acceptance rates of the MH kernels per iteration kept, averaged over the chains (the
  engines record no per-chain rates: one row, ``chain`` 0), for the draws an engine kept;
* ``observed_data``: the observed sites.

so ``arviz.summary``, ``arviz.ess``, ``arviz.rhat`` and the plots work unchanged.  Dims are named as the model
names them (:meth:`~latentfit.inference.model.LatentModel.site_dims`: a Pyro / NumPyro site's plates, outermost to
innermost), ``<site>_dim_j`` where no plate names a dim; size-1 dims of the plate layout (a latent in
``plate(..., dim=-2)``) are dropped.  The unit dim's coordinates are the units' labels (NLME: the subject IDs, as
``fit.individual_parameters()`` is indexed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def _groups(fit: Any) -> tuple[dict, dict, dict, dict, dict]:
    from latentfit.inference.postfit import unit_labels

    model = fit.model
    posterior, dims, sizes = {}, {}, {}
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
    from latentfit.inference.postfit import require_draws

    model = fit.model
    pointwise = getattr(model, "pointwise_log_likelihood", None)
    if pointwise is None:
        raise ValueError(f"to_arviz(log_likelihood=True) needs a Pyro or NumPyro model (its observation sites' "
                         f"densities element by element); {type(model).__name__} has none")
    draws = require_draws(fit, "to_arviz(log_likelihood=True)")
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


def to_arviz(fit: Any, *, dims: dict[str, list[str]] | None = None, coords: dict[str, Any] | None = None,
             log_likelihood: bool = False) -> Any:
    """Build InferenceData (arviz 0.x) or DataTree (arviz 1.x) from a :class:`FitResult`.

    ``dims`` / ``coords`` (arviz's meaning) replace the names found for those variables and dims, e.g. a Pyro
    ``log_psi`` of event shape (3,): ``dims={"log_psi": ["id", "parameter"]}, coords={"parameter": ["ka", "V", "CL"]}``
    (dims after chain and draw, the plate layout's size-1 dims already dropped).

    ``log_likelihood=True`` (Pyro / NumPyro models) adds the ``log_likelihood`` group that ``arviz.loo`` /
    ``arviz.waic`` / ``arviz.compare`` read: ``log p(y_r | z; θ̂)`` of each observation at each latent draw, the
    parameters at their estimates.  So it is the *conditional* leave-one-out of observations given the latents
    (each row held out from its own group's effect only), with θ̂ plugged in, not a leave-one-group-out of the
    marginal model; compare models fitted to the same data by it, and by AIC/BIC for the marginal likelihood."""
    import arviz as az

    posterior, sample_stats, observed, found_dims, found_coords = _groups(fit)
    loglik, ll_dims = _log_likelihood(fit, {}) if log_likelihood else ({}, {})
    dims = {**found_dims, **{k: list(v) for k, v in (dims or {}).items()}}
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
        return tree
    data = az.from_dict(posterior=posterior, sample_stats=sample_stats or None, observed_data=observed or None,
                        dims=dims, coords=coords)
    if loglik:
        extra = az.from_dict(log_likelihood=loglik, dims=ll_dims, coords=coords)
        data.add_groups({"log_likelihood": extra.log_likelihood})
    return data
