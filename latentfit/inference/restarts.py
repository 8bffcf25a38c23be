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

A start that fails (its k-means++ clusters give a singular covariance, or the fit degenerates: a
:class:`~latentfit.NonFiniteError` such as :class:`~latentfit.DegenerateFitError`) is skipped with a ``RuntimeWarning``
naming it; its row has a NaN log-likelihood and the error.  When every start fails, the first one's error is raised.

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

from .model import ConvergenceWarning, DegenerateFitError, ModelSpecificationError, NonFiniteError


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
    starts: list[Any] = []
    for r in range(n):  # every start computed (and checked) before the first fit
        try:
            starts.append(model.restart_start(r))
        except NonFiniteError as exc:  # a singular start: this restart is skipped, the others go on
            starts.append(exc)
    fits, rows, records, errors = [], [], [], []
    t0 = time.perf_counter()
    try:
        for r, start in enumerate(starts):
            if isinstance(start, NonFiniteError):
                seed, fit, got, failure = getattr(start, "restart_seed", -1), None, [], start
            else:
                seed, theta0 = start
                engine._start_theta = theta0
                failure = None
                with warnings.catch_warnings(record=True) as got:
                    warnings.simplefilter("always")
                    try:
                        fit = run_one(key, **options)
                    except NonFiniteError as exc:  # this start degenerated (e.g. a singular covariance)
                        fit, failure = None, exc
            if fit is not None and fit.interrupted:  # KeyboardInterrupt: the restarts end here, with this partial fit
                for w in got:
                    warnings.warn(w.message, w.category, stacklevel=user_stacklevel())
                return fit
            ll = float("nan")
            if fit is not None:
                try:  # (a last M-step may hand back a singular covariance, which the next E-step would refuse)
                    ll = float(fit.log_likelihood("exact"))
                except NonFiniteError as exc:
                    fit, failure = None, exc
                if fit is not None and not np.isfinite(ll):  # (a compiled backend's degenerate θ that the model
                    # cannot diagnose, GaussianMixture.degenerate_error's kind: NaN, no error)
                    fit, failure = None, DegenerateFitError(f"the final log-likelihood is {ll} (a degenerate "
                                                            "estimate, e.g. a singular covariance)")
                    ll = float("nan")
            fits.append(fit)
            records.append(list(got))
            errors.append(failure)
            converged = fit is not None and not any(issubclass(w.category, ConvergenceWarning) for w in got)
            rows.append({"restart": r, "seed": seed, "log_lik": ll, "score": ll / int(engine._total_units),
                         "num_iterations": 0 if fit is None else int(fit.num_iterations), "converged": converged,
                         "error": "" if failure is None else f"{type(failure).__name__}: {failure}"})
    finally:
        engine._start_theta = None
    failed = [r for r, e in enumerate(errors) if e is not None]
    if len(failed) == n:  # no start ran to the end: the first one's error, saying the others failed too
        first = errors[0]
        first.args = (f"every one of the n_init={n} starts failed; the first: {first}",) + tuple(first.args[1:])
        raise first
    import pandas as pd

    table = pd.DataFrame(rows).set_index("restart")
    ll = table["log_lik"].to_numpy()
    finite = np.isfinite(ll)
    best = int(np.argmax(np.where(finite, ll, -np.inf))) if finite.any() else 0
    table["kept"] = np.arange(n) == best
    table.attrs.update({"n_init": n, "best": best, "elapsed": time.perf_counter() - t0})
    if failed:
        warnings.warn(f"{name}(n_init={n}): restart(s) {failed} failed and were skipped (restart {failed[0]}: "
                      f"{errors[failed[0]]}); kept restart {best}, the largest final log-likelihood of the "
                      f"{n - len(failed)} that ran to the end (fit.restarts has each restart's row and error)",
                      RuntimeWarning, stacklevel=user_stacklevel())
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
