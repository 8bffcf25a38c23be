"""``n_init``: several starts of one EM-family fit, the best kept (scikit-learn's ``GaussianMixture(n_init=...)``).

``Engine(model, n_init=R).run()`` fits the model R times, restart r from the model's random start number r
(``model.restart_start(r)``: ``GaussianMixture`` draws its k-means++ start from seed ``seed + r``, restart 0 being the
single fit), each with the same engine options and key, and returns the fit whose final log-likelihood
``ℓ_r = Σ_i log p(y_i; θ̂_r)`` (the model's exact marginal, ``fit.log_likelihood()``) is the largest (the first of
equal ones, as scikit-learn).  The kept fit is restart r's own result, so it equals the single fit
``Engine(GaussianMixture(x, K, seed=seed + r)).run()`` bit for bit, and ``fit.restarts`` (a pandas table, one row per
restart: seed, final log-likelihood, its mean per unit, epochs, converged, kept) says what the others reached.

Criterion: scikit-learn keeps the largest *lower bound*, the mean log-likelihood that the last E-step computed at the
θ before the last M-step; here the log-likelihood at the returned θ̂ (one more exact pass per restart), which EM never
makes lower, so a restart is judged by the θ it hands back.  At convergence (``tol``) the two differ by less than
``tol`` per unit.

Warnings: each restart runs with its warnings recorded; those of the kept restart are issued again (its
:class:`~latentfit.ConvergenceWarning` saying which restart it is), those of the others dropped (scikit-learn warns only
when the best initialisation did not converge).  A restart counts as converged when its run issued no
``ConvergenceWarning`` (EM: stopped by ``tol``, or a last gain per unit below it).

Cost: the restarts run one after the other (R fits and R extra E-step passes).  EM's state holds one θ and the
mixture's E-step, M-step, singular-covariance checks and ``tol`` stop are written for one parameter set; a batch of
restarts would need a restart axis through every one of them, and per-restart stopping (scikit-learn's ``tol`` stops
each initialisation at its own iteration) would then be masking.  Programs compiled on JAX are shared by the restarts
(the start enters as an argument: ``n_init`` and the start are not part of the engine's trace fingerprint).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from latentfit._hooks import user_stacklevel

from .model import ConvergenceWarning, ModelSpecificationError


def check_n_init(n_init: Any) -> int:
    """``n_init`` as an int ≥ 1; anything else (0, negative, a float, a bool, a string) refused saying what it is."""
    if isinstance(n_init, (bool, np.bool_)) or not isinstance(n_init, (int, np.integer)):
        raise ValueError(f"n_init must be a positive integer (the number of starts, scikit-learn's n_init), got "
                         f"{n_init!r} (a {type(n_init).__name__})")
    if int(n_init) < 1:
        raise ValueError(f"n_init must be a positive integer (the number of starts, scikit-learn's n_init), got "
                         f"{int(n_init)}: at least one start is needed")
    return int(n_init)


def check_restartable(engine_name: str, model: Any, n_init: int) -> None:
    """Refuse ``n_init > 1`` on a model without random starts (``restart_start``) or without an exact log-likelihood
    to compare the restarts by."""
    if n_init == 1:
        return
    if not callable(getattr(model, "restart_start", None)):
        raise ModelSpecificationError(
            f"{engine_name}(n_init={n_init}) restarts a model's random start (GaussianMixture: k-means++ from seeds "
            f"seed, seed + 1, ...); {type(model).__name__} has no random start (a model function's parameters start "
            "at its param sites' values): use n_init=1, or fit it from starts of your own and compare "
            "fit.log_likelihood()")
    if not getattr(model, "has_exact_marginal", False):
        raise ModelSpecificationError(
            f"{engine_name}(n_init={n_init}) keeps the restart of the largest exact log-likelihood; "
            f"{type(model).__name__} has none: use n_init=1")


def run_restarts(engine: Any, run_one: Any, key: Any, options: dict[str, Any]) -> Any:
    """Fit ``engine.n_init`` restarts with ``run_one(key, **options)`` (the engine's single run) and return the best
    one's result with ``fit.restarts`` (see the module docstring)."""
    n = int(engine.n_init)
    name = engine.name
    for option in ("checkpoint", "resume", "distributed"):
        if options.get(option) not in (None, False):
            raise ValueError(f"{name}(n_init={n}): run({option}=...) is not supported with restarts; run the starts "
                             f"one by one (GaussianMixture(..., seed=s) for s = seed, seed + 1, ...) with {option}=")
    model = engine.user_model
    starts = [model.restart_start(r) for r in range(n)]  # every start computed (and checked) before the first fit
    fits, rows, records = [], [], []
    t0 = time.perf_counter()
    try:
        for r, (seed, theta0) in enumerate(starts):
            engine._start_theta = theta0
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                fit = run_one(key, **options)
            if fit.interrupted:  # KeyboardInterrupt: the restarts end here, with this restart's partial fit
                for w in got:
                    warnings.warn(w.message, w.category, stacklevel=user_stacklevel())
                return fit
            ll = float(fit.log_likelihood("exact"))
            fits.append(fit)
            records.append(list(got))
            converged = not any(issubclass(w.category, ConvergenceWarning) for w in got)
            rows.append({"restart": r, "seed": seed, "log_lik": ll, "score": ll / int(engine._total_units),
                         "num_iterations": int(fit.num_iterations), "converged": converged})
    finally:
        engine._start_theta = None
    import pandas as pd

    table = pd.DataFrame(rows).set_index("restart")
    ll = table["log_lik"].to_numpy()
    finite = np.isfinite(ll)
    best = int(np.argmax(np.where(finite, ll, -np.inf))) if finite.any() else 0
    table["kept"] = np.arange(n) == best
    table.attrs.update({"n_init": n, "best": best, "elapsed": time.perf_counter() - t0})
    for w in records[best]:
        message = str(w.message)
        if issubclass(w.category, ConvergenceWarning):
            seed = int(table["seed"].iloc[best])
            message = (f"{message} (the kept start of n_init={n}: restart {best}, seed {seed}, the largest final "
                       "log-likelihood)")
        warnings.warn(message, w.category, stacklevel=user_stacklevel())
    fit = fits[best]
    fit.restarts = table
    return fit
