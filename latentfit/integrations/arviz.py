"""FitResult -> the installed arviz's native object.

arviz 0.x (Python < 3.12 gets 0.23) returns ``InferenceData``; arviz 1.x returns an xarray
``DataTree`` (built with ``arviz_base.from_dict``).  Either way the groups are

* ``posterior``: latent draws of the last iterations, dims ``(chain, draw, <unit plate>, ...)``;
* ``sample_stats``: acceptance rates of the MH kernels per iteration kept, averaged over the chains (the
  engines record no per-chain rates: one row, ``chain`` 0), for the draws an engine kept;
* ``observed_data``: the observed sites.

so ``arviz.summary``, ``arviz.ess``, ``arviz.rhat`` and the plots work unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _groups(fit: Any) -> tuple[dict, dict, dict, dict, dict]:
    model = fit.model
    unit_dim = getattr(model, "unit_plate", "unit")
    posterior, dims, coords = {}, {}, {unit_dim: np.arange(model.num_units)}
    imputed = set(getattr(model, "imputed_sites", ()))  # obs_mask= sites, laid out as the observations
    for name, draws in fit.latents.items():
        draws = np.asarray(draws)
        posterior[name] = draws
        if name in imputed:
            dims[name] = [f"{name}_dim_{j}" for j in range(draws.ndim - 2)]
            continue
        extra = [f"{name}_dim_{j}" for j in range(draws.ndim - 3)]
        dims[name] = [unit_dim, *extra]
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
    observed = {name: np.asarray(v) for name, v in getattr(model, "observed", {}).items()}
    for name, v in observed.items():
        dims[name] = [f"{name}_dim_{j}" for j in range(v.ndim)]
    return posterior, sample_stats, observed, dims, coords


def to_arviz(fit: Any) -> Any:
    """Build InferenceData (arviz 0.x) or DataTree (arviz 1.x) from a :class:`FitResult`."""
    import arviz as az

    posterior, sample_stats, observed, dims, coords = _groups(fit)
    major = int(str(az.__version__).split(".")[0])
    if major >= 1:  # arviz 1.x: DataTree through arviz_base
        from arviz_base import from_dict

        groups = {"posterior": posterior}
        if sample_stats:
            groups["sample_stats"] = sample_stats
        if observed:
            groups["observed_data"] = observed
        return from_dict(groups, dims=dims, coords=coords)
    return az.from_dict(posterior=posterior, sample_stats=sample_stats or None,
                        observed_data=observed or None, dims=dims, coords=coords)
