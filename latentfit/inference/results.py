"""`FitResult`: what every engine returns (numpy values, backend-neutral)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class FitResult:
    """Estimates, history and latent draws of one fit.

    Attributes
    ----------
    params : dict of numpy arrays
        Final estimates θ̂ (constrained space).
    history : dict of numpy arrays
        Per-iteration records: ``theta.<name>`` ``[iters, *shape]``, ``objective`` (complete-data
        log-likelihood, averaged over chains), ``gamma``, acceptance rates ``acc.<kernel>``.
    latents : dict of numpy arrays
        Draws of the latent sites over the last iterations, ``[chain, draw, unit, *site_shape]``
        (constrained space).

    After the fit (any model fitted by SAEM, plain Pyro / NumPyro models included):
    :meth:`log_likelihood` (``"is"`` | ``"lin"`` | ``"exact"``), :attr:`minus_two_ll`, :attr:`aic`,
    :attr:`bic`; :meth:`standard_errors` / :meth:`covariance` (``"lin"`` | ``"sa"``), :meth:`summary`
    (estimate, SE, RSE%); :meth:`individual_estimates` (conditional modes, means, sds, shrinkage);
    :meth:`residuals` (PRED, IPRED, IWRES, PWRES, NPDE), :meth:`vpc`; plots ``plot_convergence``,
    ``plot_observations_vs_predictions``, ``plot_residuals``, ``plot_individual_fits``, ``plot_vpc``, ``plot_gof``.
    Linearisation and residual diagnostics need the model's Gaussian faces (``has_gaussian_obs`` /
    ``has_gaussian_prior``).
    """

    engine: Any
    model: Any
    state: dict[str, Any]
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

    # ----- estimates -------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        theta = self.engine.theta_of(self.state)
        return {n: self.model.ops.to_numpy(v) for n, v in theta.items()}

    @property
    def latents(self) -> dict[str, np.ndarray]:
        if self.latent_draws is None:
            return {}
        if "latents" not in self._cache:
            ops = self.model.ops
            z = ops.asarray(self.latent_draws)
            self._cache["latents"] = {n: ops.to_numpy(v) for n, v in self.model.unpack_latents(z).items()}
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

    # ----- post-fit inference ------------------------------------------------------------------------
    def _theta(self) -> dict[str, Any]:
        """θ̂ as backend arrays (constrained)."""
        return self.engine.theta_of(self.state)

    def _require_draws(self, what: str) -> np.ndarray:
        if self.latent_draws is None:
            raise ValueError(f"{what} needs the latent draws of the fit (FitResult.latent_draws is None: the engine "
                             "kept no draws; run it with num_draws > 0)")
        return self.latent_draws

    def conditional_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Conditional mean and sd ``[N, d]`` of the unconstrained latents, from the chains' last draws."""
        if "cond_moments" not in self._cache:
            from .individual import conditional_moments

            self._cache["cond_moments"] = conditional_moments(self._require_draws("conditional moments"))
        return self._cache["cond_moments"]

    def individual_estimates(self, num_steps: int = 30):
        """Conditional modes (EBEs), conditional means and sds of every unit, and shrinkage.

        Returns an :class:`~latentfit.inference.individual.IndividualEstimates` (``.mode``, ``.mean``,
        ``.sd`` ``[N, d]`` in unconstrained latent space, ``.shrinkage_mode``, ``.to_frame()``).
        """
        if "individual" not in self._cache:
            from .individual import individual_estimates

            self._cache["individual"] = individual_estimates(
                self.model, self._theta(), self._require_draws("individual estimates"), num_steps=num_steps)
        return self._cache["individual"]

    def individual_parameters(self, num_steps: int = 30):
        """Per-unit parameters on their natural scale (saemix's ``psi``): a pandas table.

        Columns ``<name>.mode`` (the conditional mode mapped to the natural scale), ``<name>.mean`` and
        ``<name>.sd`` (conditional mean and sd of the *transformed* draws, so that e.g. E[ka_i | y_i] is not
        confused with exp(E[log ka_i | y_i])).  Uses the model's ``individual_parameters(θ, z)`` when it has one
        (NLME: ψ_i = u⁻¹(C_i β + η_i)), else the latent sites' supports (``unpack_latents``).
        """
        import pandas as pd

        ops, model, theta = self.model.ops, self.model, self._theta()
        draws = ops.asarray(self._require_draws("individual parameters"))
        mode = ops.asarray(self.individual_estimates(num_steps=num_steps).mode)

        def natural(z: Any) -> dict[str, np.ndarray]:
            if hasattr(model, "individual_parameters"):
                vals = model.individual_parameters(theta, z)
            else:
                vals = model.unpack_latents(z)
            lead = z.ndim - 2  # chain/draw dims before the unit dim
            out = {}
            for k, v in vals.items():
                v = ops.to_numpy(v)
                out[k] = v.reshape(v.shape[:lead] + (model.num_units, -1))
            return out

        at_mode = natural(mode)
        sampled = natural(draws)
        cols: dict[str, np.ndarray] = {}
        for name, m in at_mode.items():
            flat = sampled[name].reshape((-1,) + sampled[name].shape[-2:])  # [L·draws, N, k]
            labels = [name] if m.shape[-1] == 1 else [f"{name}[{j}]" for j in range(m.shape[-1])]
            for j, lab in enumerate(labels):
                cols[f"{lab}.mode"] = m[:, j]
                cols[f"{lab}.mean"] = flat[..., j].mean(0)
                cols[f"{lab}.sd"] = flat[..., j].std(0, ddof=1)
        df = pd.DataFrame(cols)
        df.index.name = "unit"
        return df

    def _default_ll_method(self) -> str:
        return "exact" if getattr(self.model, "has_exact_marginal", False) else "is"

    def log_likelihood(self, method: str | None = None, *, num_samples: int = 5000, df: int = 4, seed: int = 0,
                       batch_size: int = 500, num_nodes: int = 12) -> float:
        """Observed-data log-likelihood ``Σ_i log p(y_i; θ̂)``.

        ``method``: ``"exact"`` (model's exact marginal; default when ``model.has_exact_marginal``),
        ``"is"`` (importance sampling, Student-t proposal around the conditional moments; ``num_samples``
        draws per unit, ``df`` degrees of freedom, fixed ``seed``), ``"lin"`` (linearisation at the
        conditional modes; models with Gaussian faces) or ``"gq"`` (adaptive Gauss–Hermite quadrature with
        ``num_nodes`` nodes per latent coordinate around the conditional modes: deterministic, for small
        latent dimensions; saemix's ``llgq``).  The detailed result (per-unit terms, Monte-Carlo
        SE) is kept in ``fit.log_likelihoods[method]``.
        """
        from . import likelihood as lk

        method = method or self._default_ll_method()
        if method not in ("is", "lin", "gq", "exact"):
            raise ValueError(f"method must be 'is', 'lin', 'gq' or 'exact', got {method!r}")
        key = {"is": (method, num_samples, df, seed), "gq": (method, num_nodes)}.get(method, (method,))
        cache = self._cache.setdefault("loglik", {})
        if key not in cache:
            theta = self._theta()
            if method == "exact":
                res = lk.log_likelihood_exact(self.model, theta)
            elif method == "gq":
                z0 = self.conditional_moments()[0] if self.latent_draws is not None else None
                res = lk.log_likelihood_gq(self.model, theta, z0, num_nodes=num_nodes)
            elif method == "lin":
                res = lk.log_likelihood_lin(self.model, theta, self.model.ops.asarray(self.individual_estimates().mode))
            else:
                mean, sd = self.conditional_moments()
                # a model may fit the proposal to each unit's conditional distribution (NLME outcome models)
                tune = getattr(self.model, "importance_proposal", None)
                if tune is not None:
                    mean, sd, df = tune(theta, mean, sd, df)
                res = lk.log_likelihood_is(self.model, theta, mean, sd, num_samples=num_samples, df=df, seed=seed,
                                           batch_size=batch_size)
            res = self._across_processes(res)
            cache[key] = res
            self._cache.setdefault("loglik_by_method", {})[method] = res
        return cache[key].value

    def _across_processes(self, res: Any) -> Any:
        """A distributed fit's log-likelihood: every process's sum over its units, all-reduced (Monte-Carlo variances
        add); ``per_unit`` keeps this process's terms.  Every process must ask for the same method (a collective)."""
        ops = self.engine.ops
        if not hasattr(ops, "world_size"):
            return res
        import dataclasses

        se = 0.0 if res.mc_se is None else float(res.mc_se)
        value, var = (float(v) for v in ops.to_numpy(ops.all_sum(ops.asarray(np.array([float(res.value), se * se])))))
        return dataclasses.replace(res, value=value, mc_se=None if res.mc_se is None else var ** 0.5)

    @property
    def num_units(self) -> int:
        """Units of the fit: of every process in a distributed fit (the model holds this process's shard)."""
        return int(getattr(self.engine, "_total_units", self.model.num_units))

    @property
    def log_likelihoods(self) -> dict[str, Any]:
        """The log-likelihoods computed so far, by method (``LogLikelihood`` records)."""
        return dict(self._cache.get("loglik_by_method", {}))

    @property
    def num_params(self) -> int:
        """Number of estimated scalar parameters (AIC/BIC): fixed parameters excluded, a simplex of K weights
        counts K − 1, a symmetric or triangular k×k matrix k(k+1)/2 (a Cholesky factor of a correlation
        k(k−1)/2).  A model may override this with a ``num_free_params`` attribute."""
        override = getattr(self.model, "num_free_params", None)
        if override is not None:
            return int(override() if callable(override) else override)
        count = 0
        for name, info in self.model.params.items():
            if not info.fixed:
                count += _free_size(np.asarray(self.params[name]), info.meta.get("constraint", None))
        return count

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

    def likelihood_table(self, methods: tuple[str, ...] | list[str] | None = None):
        """−2LL, AIC and BIC by each likelihood method, as saemix prints them (pandas, one row per method).

        Default methods: ``"exact"`` when the model has an exact marginal, else ``"lin"`` (models with Gaussian
        faces), ``"is"`` and ``"gq"`` (small latent dimension, up to 4 coordinates per unit).
        """
        import pandas as pd

        if methods is None:
            m = self.model
            if getattr(m, "has_exact_marginal", False):
                methods = ["exact"]
            else:
                methods = (["lin"] if (m.has_gaussian_obs and m.has_gaussian_prior) else []) + ["is"]
                if m.latent_dim <= 4:
                    methods.append("gq")
        p, n = self.num_params, self.num_units
        rows = {}
        for method in methods:
            ll = self.log_likelihood(method)
            rows[method] = {"-2LL": -2.0 * ll, "AIC": -2.0 * ll + 2.0 * p, "BIC": -2.0 * ll + p * float(np.log(n))}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "method"
        return table

    def _default_se_method(self) -> str:
        m = self.model
        return "lin" if (m.has_gaussian_obs and m.has_gaussian_prior) else "sa"

    def standard_errors(self, method: str | None = None, *, num_iters: int = 0, seed: int = 0) -> dict[str, float]:
        """Standard errors of every parameter (constrained scale, :meth:`param_table` labels).

        ``method``: ``"lin"`` (expected Fisher information of the model linearised at the conditional modes, as
        saemix does at the conditional means; default for models with Gaussian faces) or ``"sa"`` (Louis' formula
        averaged over draws of the latents: the SAEM chains' last draws, or ``num_iters`` fresh MCMC iterations at
        θ̂ when ``num_iters > 0``).  The full record (covariance, Fisher information, ``.delta(fn)`` for derived
        quantities) is ``fit.covariance(method)``.
        """
        return self.covariance(method, num_iters=num_iters, seed=seed).as_dict()

    def covariance(self, method: str | None = None, *, num_iters: int = 0, seed: int = 0):
        """:class:`~latentfit.inference.fisher.StandardErrors` record of ``method`` (see :meth:`standard_errors`)."""
        from . import fisher

        method = method or self._default_se_method()
        if method not in ("lin", "sa"):
            raise ValueError(f"method must be 'lin' or 'sa', got {method!r}")
        key = (method, num_iters, seed)
        cache = self._cache.setdefault("se_records", {})
        if key not in cache:
            theta = self._theta()
            if method == "lin":
                z_hat = self.model.ops.asarray(self.individual_estimates().mode)
                rec = fisher.fim_linearisation(self.model, theta, z_hat)
            else:
                draws = self._require_draws("standard errors by stochastic approximation")
                if num_iters > 0:
                    from .individual import sample_conditional

                    draws = sample_conditional(self.model, theta, draws[:, -1], num_iters, seed=seed)
                rec = fisher.fim_louis(self.model, theta, draws)
            cache[key] = rec
        self._cache["se"] = cache[key].as_dict()
        return cache[key]

    def residuals(self, num_sims: int = 1000, seed: int = 0):
        """PRED, IPRED, IWRES, EPRED, PWRES and NPDE (``[N, T]`` arrays; ``.to_frame()``)."""
        key = (num_sims, seed)
        cache = self._cache.setdefault("residuals", {})
        if key not in cache:
            from .diagnostics import residuals

            cache[key] = residuals(self.model, self._theta(), self.model.ops.asarray(self.individual_estimates().mode),
                                   num_sims=num_sims, seed=seed)
        return cache[key]

    def vpc(self, x: Any, num_sims: int = 500, bins: Any = None, level: float = 0.9, seed: int = 0):
        """Visual-predictive-check summaries against ``x`` (``[N, T]`` array or model keyword name)."""
        from latentfit.plots import resolve_x

        from .diagnostics import vpc

        return vpc(self.model, self._theta(), resolve_x(self, x), num_sims=num_sims, bins=bins, level=level,
                   seed=seed)

    def summary(self, se: bool = True, method: str | None = None):
        """pandas table: estimate, SE and RSE%.

        ``method`` (``"lin"`` | ``"sa"``, see :meth:`standard_errors`): the standard errors by that method; if
        they cannot be computed (the model lacks the Gaussian faces, the fit kept no draws, ...) the error is
        raised, never a table without its SE columns.  Without ``method``: the standard errors computed last,
        else those of the default method; where the default method does not apply to this fit (e.g. an EM fit,
        which keeps no latent draws) the table holds the estimates only and a ``RuntimeWarning`` says why.
        ``se=False``: estimates only.  A fit with replicates (:attr:`replicates`) adds the range of each estimate
        over the replicates (``replicates.min``, ``replicates.max``; the table in ``.attrs["replicates"]``).
        """
        import warnings

        import pandas as pd

        rows = self.param_table()
        df = pd.DataFrame({"estimate": [v for _, v in rows]}, index=[n for n, _ in rows])
        se_map = self._cache.get("se")
        if se and method is not None:
            se_map = self.standard_errors(method)  # a requested method that fails raises
        elif se and se_map is None:
            try:
                se_map = self.standard_errors()
            except (ValueError, NotImplementedError) as err:
                warnings.warn(f"summary(): no standard errors for this fit ({err}); pass se=False for the "
                              "estimates alone", RuntimeWarning, stacklevel=2)
                se_map = None
        if se and se_map is not None:
            df["se"] = [se_map.get(n, np.nan) for n, _ in rows]
            df["rse%"] = 100.0 * df["se"] / df["estimate"].abs()
        if self.replicates is not None:  # the range of each estimate over the replicate fits
            reps = self.replicates
            df["replicates.min"] = [reps[n].min() if n in reps else np.nan for n, _ in rows]
            df["replicates.max"] = [reps[n].max() if n in reps else np.nan for n, _ in rows]
            df.attrs["replicates"] = reps
        df.index.name = "parameter"
        return df

    # ----- plots and interop -----------------------------------------------------------------------
    def plot_convergence(self, params: list[str] | None = None, ncols: int = 3, figsize=None):
        """One panel per scalar parameter against the iteration (saemix's convergence plot)."""
        import matplotlib.pyplot as plt

        series = []
        for name, values in self.history.items():
            if not name.startswith("theta."):
                continue
            pname = name[len("theta."):]
            if params is not None and pname not in params:
                continue
            arr = values.reshape(values.shape[0], -1)
            for j in range(arr.shape[1]):
                label = pname if arr.shape[1] == 1 else f"{pname}[{j}]"
                series.append((label, arr[:, j]))
        if "objective" in self.history and params is None:
            series.append(("complete-data log-lik", self.history["objective"]))
        n = len(series)
        nrows = int(np.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, min(ncols, n), figsize=figsize or (4 * min(ncols, n), 2.6 * nrows),
                                 squeeze=False)
        iters = np.arange(1, self.num_iterations + 1)
        for ax, (label, y) in zip(axes.flat, series):
            ax.plot(iters[: len(y)], y, lw=1)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("iteration")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        return fig

    def plot_observations_vs_predictions(self, **kwargs):
        """Observations against PRED and IPRED (see :mod:`latentfit.plots`)."""
        from latentfit.plots import plot_observations_vs_predictions

        return plot_observations_vs_predictions(self, **kwargs)

    def plot_residuals(self, x: Any = None, **kwargs):
        """IWRES / PWRES / NPDE against x (or predictions) and the NPDE QQ plot."""
        from latentfit.plots import plot_residuals

        return plot_residuals(self, x, **kwargs)

    def plot_individual_fits(self, x: Any = None, **kwargs):
        """Observations, IPRED and PRED per unit (NLME: against time, smooth curves, panels by subject ID; ``log``,
        ``ids``, ``num_points``; see :func:`latentfit.plots.plot_individual_fits`)."""
        from latentfit.plots import plot_individual_fits

        return plot_individual_fits(self, x, **kwargs)

    def plot_vpc(self, x: Any = None, **kwargs):
        """Visual predictive check (simulated prediction intervals of the 5/50/95% quantiles); NLME: against time by
        default, prediction-corrected unless ``pred_corrected=False``; other models need ``x``."""
        from latentfit.plots import plot_vpc

        return plot_vpc(self, x, **kwargs)

    def plot_gof(self, x: Any = None, **kwargs):
        """Goodness-of-fit panels (saemix / Monolix): DV vs PRED / IPRED, IWRES vs x / IPRED, NPDE vs x / PRED."""
        from latentfit.plots import plot_gof

        return plot_gof(self, x, **kwargs)

    def to_arviz(self):
        """The installed arviz's native object (InferenceData on 0.x, DataTree on 1.x)."""
        from latentfit.integrations.arviz import to_arviz

        return to_arviz(self)

    def __repr__(self) -> str:
        est = ", ".join(f"{n}={v:.4g}" for n, v in self.param_table()[:8])
        stopped = ", interrupted" if self.interrupted else ""
        return f"FitResult({self.engine.name}, {self.num_iterations} iterations{stopped}, {est})"


def _free_size(value: np.ndarray, constraint: Any) -> int:
    """Free scalar entries of one parameter (see :attr:`FitResult.num_params`)."""
    cname = (constraint if isinstance(constraint, str) else type(constraint).__name__).lower()
    size = int(value.size)
    if "simplex" in cname and value.ndim >= 1:
        return size - size // value.shape[-1]
    if value.ndim >= 2 and value.shape[-1] == value.shape[-2] and value.shape[-1] > 1:
        k = value.shape[-1]
        batch = size // (k * k)
        if "corr" in cname:
            return batch * k * (k - 1) // 2
        symmetric = np.allclose(value, np.swapaxes(value, -1, -2))
        lower = np.allclose(np.triu(value, 1), 0.0)
        if symmetric or lower or any(w in cname for w in ("definite", "cholesky", "symmetric")):
            return batch * k * (k + 1) // 2
    return size
