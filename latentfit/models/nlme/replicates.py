"""Replicate SAEM fits of one NLME model: convergence you can check (issue 14, item 0).

``NLME.fit(data, replicates=R)`` runs R independent SAEM fits (seeds ``seed, seed + 1, ...``; optionally from
dispersed starts or from starts given by the user), computes each replicate's observed-data log-likelihood at its
estimate, returns the fit with the largest one and warns (:class:`~latentfit.ConvergenceWarning`) when the
replicates disagree by more than their Monte-Carlo error.

Log-likelihood: adaptive Gauss–Hermite quadrature (deterministic; 12 nodes per latent coordinate up to d = 3, 7 for
d = 4, as ``fit.log_likelihood("gq")``), else importance sampling with the same seed for every replicate and its
Monte-Carlo SE.

Warning rule: replicate r is *behind* when ``ℓ_best − ℓ_r > max(3·sqrt(se_best² + se_r²), tolerance)``, with
``tolerance = 0.5`` log-likelihood units by default.  Why: (i) 3 combined MC standard errors make a false alarm
from the likelihood estimator's own noise rare (one-sided 0.13% per pair; the GQ error at these node counts is
< 0.001, so its SE counts 0); (ii) replicates that reached the *same* maximum still differ, because each SAEM
estimate carries its own Monte-Carlo error, by ``½ δᵀ I δ`` near the maximum: on theophylline, 4 seeds end within
0.04 log-likelihood units of each other (GQ), so 0.5 is over 10 times that noise, while the local optima the issue
reports (and the flip-flop mode of oral absorption) are 2–5 units lower.

The replicates run one after the other: the SAEM engine keeps one parameter vector per fit (its M-step,
annealing and numerical step are not batched over parameter sets), so a batched pass would need a model with one
copy of the parameters per replicate.  Each replicate costs one fit.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentfit._hooks import user_stacklevel
from latentfit.inference.model import ConvergenceWarning, ModelSpecificationError

from .._integrations import fit_nlme

#: default tolerance (log-likelihood units) below which replicates are taken to agree (see the module docstring)
TOLERANCE = 0.5
#: φ-scale sd of the dispersed starts of the fixed effects (``dispersed_starts=True``) and the ω² inflation factor
DISPERSED_SCALE = 0.5
OMEGA_INFLATION = 2.0


def replicate_log_likelihood(fit: Any, method: str = "auto", seed: int = 0) -> tuple[float, float, str]:
    """``(ℓ, MC SE, method)`` of one fit: GQ when the latent dimension allows (d ≤ 4), else IS with ``seed``."""
    d = fit.model.latent_dim
    if method == "auto":
        method = "gq" if d <= 4 else "is"
    if method == "gq":
        value = fit.log_likelihood("gq", num_nodes=12 if d <= 3 else 7)
        return value, 0.0, "gq"
    if method == "is":
        value = fit.log_likelihood("is", seed=seed)
        return value, float(fit.log_likelihoods["is"].mc_se or 0.0), "is"
    raise ValueError(f"ll_method must be 'auto', 'gq' or 'is', got {method!r}")


def dispersed_init(model: Any, rng: np.random.Generator, scale: float = DISPERSED_SCALE,
                   omega_factor: float = OMEGA_INFLATION) -> dict[str, Any]:
    """Starting values drawn around the model's own: each estimated population value moved by ``scale · N(0, 1)``
    on its transformed (φ) scale, every ω² (or Ω) multiplied by ``omega_factor``; the rest unchanged."""
    ops = model.ops
    init: dict[str, Any] = {}
    for name, info in model.params.items():
        role = info.meta.get("role")
        if info.fixed:
            continue
        if role == "population":
            phi = float(ops.to_numpy(info.to_unconstrained(info.value)))
            init[name] = float(ops.to_numpy(info.to_constrained(ops.asarray(phi + scale * rng.standard_normal()))))
        elif role == "omega":
            init[name] = omega_factor * np.asarray(ops.to_numpy(info.value), dtype=float)
    return init


#: dispersed starts drawn for a replicate before giving up when each has a non-finite log-likelihood
DISPERSED_TRIES = 20


def _start(model: Any, r: int, seed: int, scale: float, starts: list[dict[str, Any] | None] | None
           ) -> tuple[Any, str]:
    """Replicate ``r``'s model with its starting values and their kind ("init", "given", "dispersed"), checked
    (:meth:`NLME.check_initial_values`: every individual's log-likelihood finite at the start).  A dispersed start
    where it is not is drawn again from the replicate's generator (up to :data:`DISPERSED_TRIES` draws); a given start
    or the model's own is refused with the check's error, naming the replicate."""
    if starts is not None and starts[r]:
        start, kind = starts[r], "given"
    elif r > 0 and scale > 0:
        rng = np.random.default_rng([seed, r])
        for _ in range(DISPERSED_TRIES):
            model_r = model.with_init(dispersed_init(model, rng, scale))
            try:
                model_r.check_initial_values()
            except ModelSpecificationError:
                continue
            return model_r, "dispersed"
        raise ModelSpecificationError(f"replicate {r}: none of {DISPERSED_TRIES} dispersed starts (scale {scale:g}) "
                                      f"gives a finite log-likelihood; use a smaller dispersed_starts= or starts=")
    else:
        start, kind = None, "init"
    model_r = model.with_init(start) if start else model
    try:
        model_r.check_initial_values()
    except ModelSpecificationError as exc:
        raise ModelSpecificationError(f"replicate {r} ({kind} start): {exc}") from None
    return model_r, kind


#: the sub-folder of a ``checkpoint=`` folder holding replicate r's checkpoints
REPLICATE_FOLDER = "replicate-{r}"


def _holds_checkpoints(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("ckpt-*.json"))


def replicate_checkpoints(options: dict[str, Any], replicates: int) -> list[dict[str, Any]]:
    """Each replicate's ``checkpoint`` / ``resume`` options: one sub-folder per replicate (``<folder>/replicate-<r>``),
    so each resumes from its own run.  ``resume=True`` (with ``checkpoint=``) continues the replicates that have
    checkpoints and starts the others; ``resume=<folder>`` continues replicate r from ``<folder>/replicate-<r>`` where
    it holds checkpoints (the others start afresh) and is refused when none does or when it names one checkpoint
    file (whose replicate would be ambiguous)."""
    checkpoint, resume = options.get("checkpoint"), options.get("resume")
    out: list[dict[str, Any]] = [{} for _ in range(replicates)]
    if checkpoint is not None:
        for r in range(replicates):
            out[r]["checkpoint"] = Path(checkpoint) / REPLICATE_FOLDER.format(r=r)
    if resume is None or isinstance(resume, bool):
        return out
    folder = Path(resume)
    if not folder.is_dir():
        raise ModelSpecificationError(f"replicates={replicates} with resume={str(resume)!r}: the replicates resume "
                                      "from a folder holding one sub-folder per replicate (replicate-0, ...: what "
                                      "checkpoint=<folder> writes), not from one checkpoint file")
    found = [_holds_checkpoints(folder / REPLICATE_FOLDER.format(r=r)) for r in range(replicates)]
    if not any(found):
        raise FileNotFoundError(f"no replicate's checkpoint in {str(resume)!r}: replicates={replicates} resume from "
                                f"its sub-folders replicate-0 .. replicate-{replicates - 1} (what checkpoint= wrote)")
    for r in range(replicates):
        out[r]["resume"] = folder / REPLICATE_FOLDER.format(r=r) if found[r] else False
    return out


def fit_replicates(model: Any, engine: str, options: dict[str, Any], replicates: int, *,
                   dispersed_starts: bool | float = False, starts: list[dict[str, Any] | None] | None = None,
                   tolerance: float = TOLERANCE, ll_method: str = "auto") -> Any:
    """Run the replicates (see the module docstring) and return the best fit, with ``fit.replicates`` set.

    ``model``: bound, with its starting values set.  Replicate 0 runs exactly the single fit (same seed, same start);
    replicate r > 0 has seed ``seed + r`` and starts at ``starts[r]`` when given (natural-scale values by name as in
    ``fit.params``; None: the model's own), else at :func:`dispersed_init` when ``dispersed_starts`` (True: φ-scale
    sd 0.5; a number: that sd), else at the model's own start.
    ``checkpoint=<folder>``: replicate r checkpoints in ``<folder>/replicate-<r>`` (:func:`replicate_checkpoints`);
    an interrupted replicate (``KeyboardInterrupt``) ends the replicates and its interrupted fit is returned, so a
    rerun with ``resume=True`` continues it (the finished replicates resume from their last checkpoints).
    """
    if int(replicates) != replicates or replicates < 1:
        raise ModelSpecificationError(f"replicates must be a positive integer, got {replicates!r}")
    replicates = int(replicates)
    if starts is not None:
        starts = list(starts)
        if len(starts) != replicates:
            raise ModelSpecificationError(f"starts has {len(starts)} entries but replicates={replicates}: give one "
                                          f"start (a dict of initial values, or None) per replicate")
    if not tolerance >= 0:
        raise ModelSpecificationError(f"tolerance must be >= 0 (log-likelihood units), got {tolerance!r}")
    scale = DISPERSED_SCALE if dispersed_starts is True else float(dispersed_starts or 0.0)
    if scale < 0:
        raise ModelSpecificationError(f"dispersed_starts must be True/False or a scale >= 0, got {dispersed_starts!r}")
    seed = int(options.get("seed", 0))
    folders = replicate_checkpoints(options, replicates)
    # every replicate's start, checked before the first fit runs (a bad start is refused before any work is done)
    plans = [_start(model, r, seed, scale, starts) for r in range(replicates)]
    fits, rows = [], []
    for r, (model_r, kind) in enumerate(plans):
        fit = fit_nlme(model_r, engine, {**options, "seed": seed + r, **folders[r]})
        if getattr(fit, "interrupted", False):  # KeyboardInterrupt: the replicates end here (resume=True continues)
            return fit
        ll, se, method = replicate_log_likelihood(fit, ll_method, seed=seed)
        fits.append(fit)
        rows.append({"replicate": r, "seed": seed + r, "start": kind, "logLik": ll, "mc_se": se, "method": method,
                     **dict(fit.param_table())})
    table = pd.DataFrame(rows).set_index("replicate")
    ll = table["logLik"].to_numpy()
    se = table["mc_se"].to_numpy()
    finite = np.isfinite(ll)
    best = int(np.nanargmax(np.where(finite, ll, -np.inf))) if finite.any() else 0
    gap = ll[best] - ll
    threshold = np.maximum(3.0 * np.sqrt(se[best] ** 2 + se ** 2), tolerance)
    behind = ~finite | (gap > threshold)
    table.insert(table.columns.get_loc("method") + 1, "best", np.arange(replicates) == best)
    table.insert(table.columns.get_loc("best"), "behind", behind)
    spread = float(np.nanmax(ll) - np.nanmin(ll)) if finite.any() else math.nan
    table.attrs.update({"spread": spread, "tolerance": float(tolerance), "best": best})
    if behind.any():
        lagging = ", ".join(f"replicate {r} (seed {table['seed'].iloc[r]}, logLik {ll[r]:.3f})"
                            for r in np.flatnonzero(behind))
        warnings.warn(
            f"replicate fits disagree: their log-likelihoods ({table['method'].iloc[best]}) span {spread:.3f} "
            f"(more than max(3 MC SE, {tolerance:g})); {lagging} ended below the best, replicate {best} (seed "
            f"{table['seed'].iloc[best]}, logLik {ll[best]:.3f}), which is returned. A lower replicate is stuck at a "
            f"local optimum or not converged: see fit.replicates, and rerun with more iterations (num_iters=) or "
            f"other starting values", ConvergenceWarning, stacklevel=user_stacklevel())
    out = fits[best]
    out.replicates = table
    return out


__all__ = ["DISPERSED_SCALE", "DISPERSED_TRIES", "OMEGA_INFLATION", "REPLICATE_FOLDER", "TOLERANCE", "dispersed_init",
           "fit_replicates", "replicate_checkpoints", "replicate_log_likelihood"]
