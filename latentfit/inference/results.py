"""`FitResult`: the record every engine returns (backend-neutral).

The record holds what the fit produced (engine, model, final state, history, latent draws, timings) and reads
estimates off it.  What is computed after the fit (likelihoods, standard errors, individual estimates, residuals,
the summary table) lives in :mod:`latentfit.inference.postfit` as functions of the record; the record offers each
as a method of the same name and signature (the functions themselves, so the two cannot drift).  Plots and the
arviz conversion belong to the layers above (:mod:`latentfit.plots`, :mod:`latentfit.integrations.arviz`):
``fit.plot_*()`` and ``fit.to_arviz()`` call them through hooks (:mod:`latentfit._hooks`), so nothing in
``inference/`` imports upwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentfit import _hooks

from . import postfit


@dataclass
class FitResult:
    """Estimates, history and latent draws of one fit.

    Attributes
    ----------
    params : dict of numpy arrays
        Final estimates θ̂ (constrained space).
    history : dict of numpy arrays
        Per-iteration records (an iteration is an epoch in the EM family): ``theta.<name>`` ``[iters, *shape]``, θ
        after each iteration; ``objective``, the engine's: SAEM / f-SAEM the complete-data log-likelihood
        ``log p(y, z_k; θ_{k−1})`` of iteration k's draws, averaged over the chains; MCMCSGD that of its chains at the
        θ the gradient was taken at; exact ``EM`` the observed-data log-likelihood ``Σ_i log p(y_i; θ_{k−1})`` its
        E-step computed, at the θ *before* the iteration (row 1: the initial θ) — so one row behind ``theta.*``; the
        other engines of the EM family record none, but ``log_lik`` (``track_log_lik=True``: ``Σ_i log p(y_i; θ_k)``
        after the iteration); ``gamma``, acceptance rates ``acc.<kernel>``.
    latents : dict of numpy arrays
        Draws of the latent sites over the last iterations, ``[chain, draw, unit, *site_shape]``
        (constrained space); the EM family's mixtures: labels drawn from the exact responsibilities at θ̂, 4 chains of
        250 draws while draws × units ≤ 2 M, fewer on large data, at least 4 × 5 (n = 100 000: 4 × 5).

    After the fit (any model fitted by SAEM, plain Pyro / NumPyro models included):
    :meth:`log_likelihood` (``"is"`` | ``"lin"`` | ``"exact"``), :attr:`minus_two_ll`, :attr:`aic`,
    :attr:`bic`; :meth:`standard_errors` / :meth:`covariance` (``"lin"`` | ``"sa"``), :meth:`summary`
    (estimate, SE, RSE%); :meth:`individual_estimates` (conditional modes, means, sds, shrinkage);
    :meth:`residuals` (PRED, IPRED, IWRES, PWRES, NPDE), :meth:`vpc`; plots ``plot_convergence``,
    ``plot_observations_vs_predictions``, ``plot_residuals``, ``plot_individual_fits``, ``plot_vpc``, ``plot_gof``.
    Linearisation and residual diagnostics need the model's Gaussian faces (``has_gaussian_obs`` /
    ``has_gaussian_prior``).  A mixture (``GaussianMixture``, an enumerated Pyro / NumPyro mixture):
    :meth:`predict_proba` (responsibilities ``[n, K]``), :meth:`predict` (hard labels), :meth:`score_samples` /
    :meth:`score` (log-likelihood per unit / its mean), of the fitted units or of new data, and :meth:`sample` (new
    points of a ``GaussianMixture``), as scikit-learn's.
    """

    engine: Any
    model: Any
    state: Any  # the engine's last state record (a NamedTuple: fit.state.z, fit.state.theta, ...)
    history: dict[str, np.ndarray]
    latent_draws: np.ndarray | None  # [L, draws, N, d] unconstrained
    elapsed: float
    init_time: float
    num_iterations: int
    #: seconds spent compiling (JAX backends), part of ``elapsed``
    compile_time: float = 0.0
    #: True when the run stopped early (``KeyboardInterrupt``, or the result kept on a ``NonFiniteError``): the
    #: state is the last good one, after ``num_iterations`` iterations
    interrupted: bool = False
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_nonfinite(self) -> int:
        """MCMC proposals rejected because their log-density was NaN/inf, summed over the run (history
        ``num_nonfinite``, one count per iteration)."""
        counts = self.history.get("num_nonfinite")
        return 0 if counts is None else int(np.sum(counts))
    #: replicate fits (NLME ``fit(..., replicates=R)``): one row per replicate (seed, logLik, MC SE, estimates)
    replicates: Any = field(default=None, repr=False)
    #: ``n_init`` starts of an EM-family fit (:mod:`~latentfit.inference.restarts`): one row per restart (seed, final
    #: log-likelihood ``log_lik`` and its mean per unit ``score``, ``num_iterations``, ``converged``, ``kept``)
    restarts: Any = field(default=None, repr=False)

    # ----- estimates -------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        theta = self.engine.theta_of(self.state)
        return {n: self.model.ops.to_numpy(v) for n, v in theta.items()}

    def _theta(self) -> dict[str, Any]:
        """θ̂ as backend arrays (constrained)."""
        return self.engine.theta_of(self.state)

    @property
    def latents(self) -> dict[str, np.ndarray]:
        """Draws of the latent sites ``[chain, draw, unit, *site_shape]`` (constrained): the engine's last
        iterations', or for an engine that keeps none, draws from ``p(z | y; θ̂)`` by MCMC
        (:func:`~latentfit.inference.postfit.draws_at_estimate`), or exact ones where the E-step is exact (the EM
        family's mixtures: labels drawn from the responsibilities at θ̂, :func:`~latentfit.inference.postfit.
        posterior_draws`); ``{}`` where none exists."""
        kept = postfit.posterior_draws(self)
        if kept is None:
            return {}
        if "latents" not in self._cache:
            ops = self.model.ops
            z = ops.asarray(kept)
            latents = {n: ops.to_numpy(v) for n, v in self.model.unpack_latents(z).items()}
            # obs_mask= imputation sites the fit integrated out: a draw of each given each latent draw, at θ̂
            if getattr(self.model, "imputed_sites", None):
                draws = self.model.impute(self._theta(), z, ops.key(0))
                latents.update({n: ops.to_numpy(v) for n, v in draws.items()})
            self._cache["latents"] = latents
        return self._cache["latents"]

    @property
    def acceptance(self) -> dict[str, np.ndarray]:
        """Acceptance rate per kernel and iteration (``[iters]`` or ``[iters, d]``)."""
        return {n[len("acc."):]: v for n, v in self.history.items() if n.startswith("acc.")}

    @property
    def time_per_iteration(self) -> float:
        """Seconds per iteration, set-up and compilation excluded."""
        return (self.elapsed - self.init_time - self.compile_time) / max(self.num_iterations, 1)

    def param_table(self) -> list[tuple[str, float]]:
        """Flat list of ``(label, value)``, one per scalar element of every parameter."""
        rows = []
        for name, value in self.params.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                rows.append((name, float(arr)))
            else:
                for idx in np.ndindex(arr.shape):
                    rows.append((f"{name}[{','.join(map(str, idx))}]", float(arr[idx])))
        return rows

    @property
    def num_units(self) -> int:
        """Units of the fit: of every process in a distributed fit (the model holds this process's shard)."""
        return int(getattr(self.engine, "_total_units", self.model.num_units))

    # ----- post-fit computations (functions of the record in postfit.py) -------------------------------
    conditional_moments = postfit.conditional_moments
    individual_estimates = postfit.individual_estimates
    individual_parameters = postfit.individual_parameters
    log_likelihood = postfit.log_likelihood
    likelihood_table = postfit.likelihood_table
    standard_errors = postfit.standard_errors
    covariance = postfit.covariance
    summary = postfit.summary
    residuals = postfit.residuals
    vpc = postfit.vpc
    predict = postfit.predict
    predict_proba = postfit.predict_proba
    score_samples = postfit.score_samples
    score = postfit.score
    sample = postfit.sample

    @property
    def log_likelihoods(self) -> dict[str, Any]:
        """The log-likelihoods computed so far, by method (``LogLikelihood`` records)."""
        return dict(self._cache.get("loglik_by_method", {}))

    @property
    def num_params(self) -> int:
        """Number of estimated scalar parameters (AIC/BIC; see :func:`~latentfit.inference.postfit.num_params`)."""
        return postfit.num_params(self)

    @property
    def minus_two_ll(self) -> float:
        """−2 log-likelihood (default method: exact marginal when available, else importance sampling)."""
        return -2.0 * self.log_likelihood()

    @property
    def aic(self) -> float:
        """``−2LL + 2 p`` (p = :attr:`num_params`)."""
        return self.minus_two_ll + 2.0 * self.num_params

    @property
    def bic(self) -> float:
        """``−2LL + p log N`` with N the number of units (saemix's BIC)."""
        return self.minus_two_ll + self.num_params * float(np.log(self.num_units))

    # ----- plots and interop (the layers above, through hooks) ---------------------------------------
    def plot_convergence(self, params: list[str] | None = None, ncols: int = 3, figsize: Any = None) -> Any:
        """One panel per scalar parameter against the iteration (saemix's convergence plot;
        :func:`latentfit.plots.plot_convergence`)."""
        return _hooks.call("plot_convergence", self, params, ncols=ncols, figsize=figsize)

    def plot_observations_vs_predictions(self, **kwargs: Any) -> Any:
        """Observations against PRED and IPRED (see :mod:`latentfit.plots`)."""
        return _hooks.call("plot_observations_vs_predictions", self, **kwargs)

    def plot_residuals(self, x: Any = None, **kwargs: Any) -> Any:
        """IWRES / PWRES / NPDE against x (or predictions) and the NPDE QQ plot."""
        return _hooks.call("plot_residuals", self, x, **kwargs)

    def plot_individual_fits(self, x: Any = None, **kwargs: Any) -> Any:
        """Observations, IPRED and PRED per unit (NLME: against time, smooth curves from the dose, panels by subject ID
        and response, a colour per occasion; ``log``, ``ids``, ``num_points``; the first ``max_panels=36`` units unless
        ``units``/``ids`` name others; see :func:`latentfit.plots.plot_individual_fits`)."""
        return _hooks.call("plot_individual_fits", self, x, **kwargs)

    def plot_vpc(self, x: Any = None, **kwargs: Any) -> Any:
        """Visual predictive check (simulated prediction intervals of the 5/50/95% quantiles); NLME: against time by
        default, prediction-corrected unless ``pred_corrected=False``; other models need ``x``."""
        return _hooks.call("plot_vpc", self, x, **kwargs)

    def plot_gof(self, x: Any = None, **kwargs: Any) -> Any:
        """Goodness-of-fit panels (saemix / Monolix): DV vs PRED / IPRED, IWRES vs x / IPRED, NPDE vs x / PRED."""
        return _hooks.call("plot_gof", self, x, **kwargs)

    def to_arviz(self, *, dims: dict[str, list[str]] | None = None, coords: dict[str, Any] | None = None,
                 log_likelihood: bool = False, posterior_predictive: bool = False, seed: int = 0) -> Any:
        """The installed arviz's native object (InferenceData on 0.x, DataTree on 1.x;
        :func:`latentfit.integrations.arviz.to_arviz`): dims named by the model's plates; ``dims`` / ``coords``
        name others (an event dim's parameters); ``log_likelihood=True`` adds the pointwise ``log p(y | z; θ̂)`` that
        ``az.loo`` reads, ``posterior_predictive=True`` replicated data ``y_rep ~ p(y | z; θ̂)``, one per latent draw
        (``az.plot_ppc``; drawn from ``seed``)."""
        return _hooks.call("to_arviz", self, dims=dims, coords=coords, log_likelihood=log_likelihood,
                           posterior_predictive=posterior_predictive, seed=seed)

    def __repr__(self) -> str:
        est = ", ".join(f"{n}={v:.4g}" for n, v in self.param_table()[:8])
        stopped = ", interrupted" if self.interrupted else ""
        return f"FitResult({self.engine.name}, {self.num_iterations} iterations{stopped}, {est})"


#: hooks :class:`FitResult` calls (bound by ``latentfit/__init__.py``)
HOOKS = ("plot_convergence", "plot_observations_vs_predictions", "plot_residuals", "plot_individual_fits", "plot_vpc",
         "plot_gof", "to_arviz")
