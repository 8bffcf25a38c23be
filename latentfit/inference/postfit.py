"""What is computed from a fit after the fit: likelihoods, information criteria, standard errors, individual
estimates, residuals and VPC summaries, the summary table.

Each function takes the :class:`~latentfit.inference.results.FitResult` record and reads its model, engine
state and latent draws; results are memoised in the record's ``_cache`` (keyed on the options that change them).
The record offers them as methods (``fit.log_likelihood(...)`` is :func:`log_likelihood` ``(fit, ...)``): the
signature and docstring live here, once.  The numerical work is in the modules named below
(:mod:`.likelihood`, :mod:`.fisher`, :mod:`.individual`, :mod:`.diagnostics`); this module only chooses the
method, feeds it θ̂ and the draws, and caches.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .._hooks import user_stacklevel
from . import diagnostics, fisher, individual
from . import likelihood as lk
from .model import ModelSpecificationError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

    from .results import FitResult


# ----- latent draws and individual estimates --------------------------------------------------------------
def require_draws(fit: FitResult, what: str) -> np.ndarray:
    """The fit's latent draws ``[L, draws, N, d]`` (those an engine kept, else :func:`draws_at_estimate`'s), or an
    error naming ``what`` needed them."""
    draws = fit.latent_draws if fit.latent_draws is not None else draws_at_estimate(fit)
    if draws is None:
        raise ValueError(f"{what} needs the latent draws of the fit (FitResult.latent_draws is None): "
                         f"{_how_to_keep_draws(type(fit.engine))}")
    return draws


#: :func:`draws_at_estimate`: MCMC iterations discarded, then kept (one draw per chain and iteration)
DRAWS_BURN_IN, DRAWS_KEPT = 200, 100


def draws_at_estimate(fit: FitResult) -> np.ndarray | None:
    """Latent draws ``[L, 100, N, d]`` from ``p(z_i | y_i; θ̂)`` for a fit whose engine kept none (MCEM,
    MiniBatchMCEM, TTSEM, MISSO): the conditional sampler of the post-fit methods (prior-IMH and adaptive
    component-wise random-walk kernels at θ̂, :func:`~latentfit.inference.individual.sample_conditional`) run from
    prior draws, 200 iterations discarded and 100 kept, ``L`` chains (the engine's ``num_samples`` or
    ``num_chains``, 4 to 10), seeded by 0; computed once.  They serve what SAEM's kept draws serve: the
    conditional moments, the IS proposal, the EBEs' starts, Louis' SEs, ``fit.latents`` and ``to_arviz``.  None
    where the model has an exact posterior sampler (the EM family's enumerated mixtures: their latents are
    discrete; :func:`posterior_draws` draws their labels exactly for ``fit.latents`` and ``to_arviz``) or no prior
    sampler."""
    if "drawn_latents" in fit._cache:
        return fit._cache["drawn_latents"]
    model = fit.model
    drawn = None
    if not getattr(model, "has_posterior_sampler", False) and fit.state is not None:
        engine = fit.engine
        chains = getattr(engine, "num_chains", None) or getattr(engine, "num_samples", None) or 4
        chains = int(min(max(int(chains), 4), 10))
        theta = fit._theta()
        ops = model.ops
        try:
            z0 = model.sample_prior(theta, ops.key(0), chains)
        except NotImplementedError:
            z0 = None
        if z0 is not None:
            draws = individual.sample_conditional(model, theta, z0, DRAWS_BURN_IN + DRAWS_KEPT, seed=0)
            drawn = draws[:, DRAWS_BURN_IN:]
    fit._cache["drawn_latents"] = drawn
    return drawn


#: the engines that keep the latent draws of their last iterations (their ``num_draws=`` option), for messages
ENGINES_KEEPING_DRAWS = ("SAEM", "FSAEM", "MCMCSGD")


def _how_to_keep_draws(engine_cls: type) -> str:
    """What a user can do to get a fit with latent draws, for an engine of class ``engine_cls``: its own option
    where it has one, else the engines that keep draws (the EM family and MISSO keep none)."""
    from .driver import engine_option_names  # (driver imports the results, which import this module)

    name = engine_cls.__name__
    if "num_draws" in engine_option_names(engine_cls):
        return f"{name} kept none; run it with {name}(model, num_draws=100, ...) (num_draws > 0)"
    keepers = ", ".join(ENGINES_KEEPING_DRAWS)
    return (f"{name} keeps no latent draws (it has no num_draws option); fit the model with an engine that keeps "
            f"them ({keepers}: num_draws=100 by default), or a method that needs no draws (log_likelihood('gq') for a "
            f"model with few latent dims per unit)")


def conditional_moments(fit: FitResult) -> tuple[np.ndarray, np.ndarray]:
    """Conditional mean and sd ``[N, d]`` of the unconstrained latents, from the chains' last draws."""
    if "cond_moments" not in fit._cache:
        fit._cache["cond_moments"] = individual.conditional_moments(require_draws(fit, "conditional moments"))
    return fit._cache["cond_moments"]


def individual_estimates(fit: FitResult, num_steps: int = 30) -> individual.IndividualEstimates:
    """Conditional modes (EBEs), conditional means and sds of every unit, and shrinkage.

    Returns an :class:`~latentfit.inference.individual.IndividualEstimates` (``.mode``, ``.mean``,
    ``.sd`` ``[N, d]`` in unconstrained latent space, ``.shrinkage_mode``, ``.to_frame()``).  A distributed fit
    (``run(distributed=True)``): each process computes its units' estimates and every process gets those of all
    units, in unit order (a collective: every process must ask).
    """
    if "individual" not in fit._cache:
        labels = [s.name for s in getattr(fit.model, "latent_sites", ()) if s.kind == "categorical"]
        if labels and fit.latent_draws is None:
            raise ValueError(f"individual_estimates() gives conditional modes, means and sds of continuous latents; "
                             f"this model's latent {labels[0]!r} is a discrete label (a mixture): its exact posterior "
                             "is fit.predict_proba() (the responsibilities), its most probable value fit.predict()")
        local = _local_estimates(fit, num_steps)
        gather = _unit_gather(fit)
        est = local if gather is None else individual.gather_estimates(fit.model, fit._theta(), local, gather)
        est = dataclasses.replace(est, units=unit_labels(fit, est.mode.shape[0]))  # always of the units' number
        fit._cache["individual"] = est
    return fit._cache["individual"]


def _local_estimates(fit: FitResult, num_steps: int = 30) -> individual.IndividualEstimates:
    """The individual estimates of this process's units (all units but in a distributed fit): what the post-fit
    computations on this process's model (linearisation, residuals) read."""
    if "individual_local" not in fit._cache:
        model = fit.model
        # the individual parameters (individual_parameters' table) at the modes and draws, in the modes' program
        values = getattr(model, "individual_parameters", None) if getattr(model, "param_names", ()) else None
        fit._cache["individual_local"] = individual.individual_estimates(
            model, fit._theta(), require_draws(fit, "individual estimates"), num_steps=num_steps, values=values)
    return fit._cache["individual_local"]


def _distributed_ops(fit: FitResult) -> Any:
    """The engine's shim when the fit ran over torch.distributed processes, else None."""
    ops = getattr(fit.engine, "ops", None)
    return ops if hasattr(ops, "world_size") else None


def _unit_gather(fit: FitResult) -> Any:
    """A distributed fit: ``[n, ...] -> [N, ...]``, this process's rows concatenated with every process's in unit
    (rank) order; None otherwise."""
    ops = _distributed_ops(fit)
    if ops is None:
        return None
    return lambda rows: np.concatenate(ops.gather_objects(np.asarray(rows)), 0)


def _information_sum(fit: FitResult) -> Any:
    """A distributed fit: the Fisher information ``[p, p]`` summed over the processes (float64 all-reduce)."""
    ops = _distributed_ops(fit)
    if ops is None:
        return None
    return lambda fim: np.asarray(ops.to_numpy(ops.all_sum(ops.asarray(np.asarray(fim, dtype=np.float64)))))


def individual_parameters(fit: FitResult, num_steps: int = 30) -> pd.DataFrame:
    """Per-unit parameters on their natural scale (saemix's ``psi``): a pandas table.

    Columns ``<name>.mode`` (the conditional mode mapped to the natural scale), ``<name>.mean`` and
    ``<name>.sd`` (conditional mean and sd of the *transformed* draws, so that e.g. E[ka_i | y_i] is not
    confused with exp(E[log ka_i | y_i])).  Uses the model's ``individual_parameters(θ, z)`` when it has one
    (NLME: ψ_i = u⁻¹(C_i β + η_i)), else the latent sites' supports (``unpack_latents``).
    """
    import pandas as pd

    ops, model, theta = fit.model.ops, fit.model, fit._theta()
    local = _local_estimates(fit, num_steps=num_steps)
    draws = require_draws(fit, "individual parameters")
    mode = local.mode

    def values(th: dict[str, Any], z: Any) -> dict[str, Any]:
        return model.individual_parameters(th, z) if hasattr(model, "individual_parameters") \
            else model.unpack_latents(z)

    def natural(z: Any, vals: dict[str, Any]) -> dict[str, np.ndarray]:
        lead = z.ndim - 2  # chain/draw dims before the unit dim
        out = {}
        for k, v in vals.items():
            v = ops.to_numpy(v)
            out[k] = v.reshape(v.shape[:lead] + (model.num_units, -1))
        return out

    names = list(getattr(model, "param_names", ()))
    if local.values is not None and set(local.values[0]) == set(names):
        # computed with the modes, in their program (_local_estimates; a jitted dict comes back with its keys sorted:
        # the columns keep the model's order of its parameters)
        vals_mode, vals_draws = ({k: v[k] for k in names} for v in local.values)
    else:  # eager backends, models without individual parameters by name
        mode, draws = ops.asarray(mode), ops.asarray(draws)
        vals_mode, vals_draws = values(theta, mode), values(theta, draws)
    at_mode = natural(mode, vals_mode)
    sampled = natural(draws, vals_draws)
    cols: dict[str, np.ndarray] = {}
    for name, m in at_mode.items():
        flat = sampled[name].reshape((-1,) + sampled[name].shape[-2:])  # [L·draws, N, k]
        labels = [name] if m.shape[-1] == 1 else [f"{name}[{j}]" for j in range(m.shape[-1])]
        for j, lab in enumerate(labels):
            cols[f"{lab}.mode"] = m[:, j]
            cols[f"{lab}.mean"] = flat[..., j].mean(0)
            cols[f"{lab}.sd"] = flat[..., j].std(0, ddof=1)
    df = pd.DataFrame(cols)
    if _distributed_ops(fit) is not None:  # every process's units, in unit order
        df = pd.concat(_distributed_ops(fit).gather_objects(df), ignore_index=True)
    df.index = unit_labels(fit, len(df))
    return df


def unit_labels(fit: FitResult, n: int | None = None) -> pd.Index:
    """The units' labels for the post-fit tables: the model's ``unit_labels()`` (NLME: the IDs, named as the ID
    column) when it has them for all ``n`` units, else ``0 .. n-1`` named ``unit``."""
    import pandas as pd

    n = fit.model.num_units if n is None else n
    labels = getattr(fit.model, "unit_labels", None)
    if callable(labels):
        index = labels()
        if len(index) == n:
            return index
    return pd.RangeIndex(n, name="unit")


# ----- labels of a mixture (scikit-learn's predict / predict_proba) ------------------------------------------
def predict_proba(fit: FitResult, x: Any = None) -> np.ndarray:
    """Responsibilities ``p(z_i = k | y_i; θ̂)`` ``[n, K]`` (numpy; scikit-learn's ``predict_proba``) of a fit whose
    latent is a discrete label with an exact posterior (``GaussianMixture``; a Pyro / NumPyro mixture fitted by the
    EM family): of the fitted units (``x=None``; a distributed fit: this process's), or of new data ``x`` (numpy or the
    backend's arrays; ``GaussianMixture``: points ``[m, d]``; a model function: its positional arguments, a tuple, or
    the first alone).  Column k is the label's k-th value; the rows sum to 1."""
    model = fit.model
    method = getattr(model, "predict_proba", None)
    if method is None:
        kinds = {s.kind for s in getattr(model, "latent_sites", ())}
        why = ("its latents are continuous: their conditional modes and means are fit.individual_estimates()"
               if "categorical" not in kinds else "it computes no exact responsibilities")
        raise ValueError(f"predict / predict_proba give the labels of a mixture (GaussianMixture, or a Pyro / NumPyro "
                         f"model with one Categorical label fitted by the EM family); this fit's model "
                         f"({type(model).__name__}) has none: {why}")
    return method(fit._theta(), x)


def predict(fit: FitResult, x: Any = None) -> np.ndarray:
    """Hard labels ``argmax_k p(z_i = k | y_i; θ̂)`` ``[n]`` (int64 numpy; scikit-learn's ``predict``): the most
    probable label of each fitted unit (``x=None``) or of new data ``x`` (:func:`predict_proba`)."""
    return np.argmax(predict_proba(fit, x), 1).astype(np.int64)


def score_samples(fit: FitResult, x: Any = None) -> np.ndarray:
    """``log p(y_i; θ̂)`` ``[n]`` (numpy; scikit-learn's ``score_samples``) of the fitted units (``x=None``) or of new
    data ``x`` (:func:`predict_proba`'s forms) under a mixture's exact marginal (the labels summed out)."""
    method = getattr(fit.model, "score_samples", None)
    if method is None:
        raise ValueError(f"score / score_samples need a model with an exact marginal likelihood that takes new data "
                         f"(GaussianMixture, or a Pyro / NumPyro mixture fitted by the EM family); this fit's model "
                         f"({type(fit.model).__name__}) has none: fit.log_likelihood() gives the fitted data's")
    return method(fit._theta(), x)


def score(fit: FitResult, x: Any = None) -> float:
    """Mean log-likelihood per unit ``(1/n) Σ_i log p(y_i; θ̂)`` (scikit-learn's ``score``) of the fitted units or of
    new data ``x`` (:func:`score_samples`)."""
    return float(np.mean(score_samples(fit, x)))


def sample(fit: FitResult, num_samples: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x [m, d], labels [m])``: new points drawn from a fitted ``GaussianMixture`` (scikit-learn's ``sample``)."""
    method = getattr(fit.model, "sample_points", None)
    if method is None:
        raise ValueError(f"sample draws new points from a fitted GaussianMixture; this fit's model "
                         f"({type(fit.model).__name__}) is not one (a Pyro / NumPyro model: fit.to_arviz("
                         "posterior_predictive=True) draws replicates of its data, or run the model under "
                         "Predictive with fit.params)")
    return method(fit._theta(), num_samples, seed)


# ----- likelihood and information criteria ---------------------------------------------------------------
def default_ll_method(fit: FitResult) -> str:
    """``"exact"`` when the model has an exact marginal, else ``"is"``."""
    return "exact" if getattr(fit.model, "has_exact_marginal", False) else "is"


def log_likelihood(fit: FitResult, method: str | None = None, *, num_samples: int = 5000, df: int = 4, seed: int = 0,
                   batch_size: int = 500, num_nodes: int = 12, proposal: str = "full") -> float:
    """Observed-data log-likelihood ``Σ_i log p(y_i; θ̂)``.

    ``method``: ``"exact"`` (model's exact marginal; default when ``model.has_exact_marginal``),
    ``"is"`` (importance sampling, Student-t proposal around the conditional moments; ``num_samples``
    draws per unit, ``df`` degrees of freedom, fixed ``seed``), ``"lin"`` (linearisation at the
    conditional modes; models with Gaussian faces) or ``"gq"`` (adaptive Gauss–Hermite quadrature with
    ``num_nodes`` nodes per latent coordinate around the conditional modes: deterministic, for small
    latent dimensions; saemix's ``llgq``).  The detailed result (per-unit terms, Monte-Carlo
    SE) is kept in ``fit.log_likelihoods[method]``.

    ``proposal`` (``"is"``): ``"full"`` (the default: each unit's Laplace law, mode and covariance, refined by a
    weighted pilot pass, correlations included, as a Student-t with at least 10 degrees of freedom in a defensive
    mixture with 5% of diagonal draws: :func:`~latentfit.inference.likelihood.laplace_proposal`) or ``"diagonal"``
    (saemix's: each latent coordinate's Student-t around the chains' conditional mean and sd).  The log of an
    importance-sampling mean is biased low by about half its Monte-Carlo variance, summed over units, and a proposal
    that misses the conditional law's shape makes it far worse with an MC SE that does not show it: an IOV model
    (IIV + 3 κ on CL, η/κ correlation −0.96, N = 100, quadrature 187.03): diagonal 137.17 ± 2.76, the chains'
    covariance 182.85 ± 1.51, ``"full"`` within 0.1 at ± 0.056; theophylline: SE 0.057 diagonal, 0.014 full (torch
    ~3 -> ~2-8 s).  A warning (:class:`~latentfit.inference.likelihood.ImportanceSamplingWarning`) names the units
    whose effective sample size is below 100 draws (``fit.log_likelihoods["is"].ess``).
    """
    return _log_likelihood_result(fit, method, num_samples=num_samples, df=df, seed=seed, batch_size=batch_size,
                                  num_nodes=num_nodes, proposal=proposal).value


def _log_likelihood_result(fit: FitResult, method: str | None = None, *, num_samples: int = 5000, df: int = 4,
                           seed: int = 0, batch_size: int = 500, num_nodes: int = 12,
                           proposal: str = "full") -> lk.LogLikelihood:
    """:func:`log_likelihood`'s detailed result (value, per-unit terms, Monte-Carlo SE), computed once per options."""
    method = method or default_ll_method(fit)
    if method not in ("is", "lin", "gq", "exact"):
        raise ValueError(f"method must be 'is', 'lin', 'gq' or 'exact', got {method!r}")
    if proposal not in ("diagonal", "full"):
        raise ValueError(f"proposal must be 'diagonal' or 'full', got {proposal!r}")
    if method == "is" and (int(df) != df or df < 1):
        raise ValueError(f"df must be a positive integer (Student-t proposal), got {df!r}")
    key = {"is": (method, num_samples, df, seed) + ((proposal,) if proposal != "diagonal" else ()),
           "gq": (method, num_nodes)}.get(method, (method,))
    cache = fit._cache.setdefault("loglik", {})
    if key not in cache:
        model, theta = fit.model, fit._theta()
        if method == "exact":
            res = lk.log_likelihood_exact(model, theta)
        elif method == "gq":
            z0 = conditional_moments(fit)[0] if fit.latent_draws is not None else None
            res = lk.log_likelihood_gq(model, theta, z0, num_nodes=num_nodes)
        elif method == "lin":  # as saemix's FIM step: with the linearisation SEs, by the same program
            require_linearisable(fit, "log_likelihood('lin') (the linearisation log-likelihood)")
            terms = covariance(fit, "lin").log_lik_terms
            res = lk.LogLikelihood("lin", float(terms.sum()), terms)
        else:
            mean, sd = conditional_moments(fit)
            # a model may fit the proposal to each unit's conditional distribution (NLME outcome models)
            tune = getattr(model, "importance_proposal", None)
            ids = _stream_ids(fit)  # a fit with per-unit streams: each unit's draws (pilot pass too) from its own
            dist = fit.engine.ops if ids is not None else None
            if tune is not None:
                mean, sd, df = tune(theta, mean, sd, df) if ids is None else tune(theta, mean, sd, df, unit_ids=ids,
                                                                                  ops=dist)
            defensive = 0.5
            if proposal == "full":  # each unit's Laplace law refined by a weighted pilot pass, correlations included
                mean, sd, df, defensive = _full_proposal(fit, theta, mean, sd, df, seed, ids, dist)
            res = lk.log_likelihood_is(model, theta, mean, sd, num_samples=num_samples, df=df, seed=seed,
                                       batch_size=batch_size, unit_ids=ids, ops=dist, defensive=defensive)
            lk.check_effective_sample_size(res, proposal)
        res = _across_processes(fit, res)
        cache[key] = res
        fit._cache.setdefault("loglik_by_method", {})[method] = res
    return cache[key]


#: what a model whose conditional modes or Laplace covariances cannot be computed raises (:func:`_full_proposal`: a
#: log-density not twice differentiable, a singular precision, a backend without the derivatives)
_NO_LAPLACE = (RuntimeError, ValueError, TypeError, NotImplementedError, np.linalg.LinAlgError)


def _full_proposal(fit: FitResult, theta: dict[str, Any], mean: Any, sd: Any, df: int, seed: int, ids: Any,
                   dist: Any) -> tuple[Any, Any, int, float]:
    """``(mean, L, df, defensive)`` of :func:`log_likelihood`'s ``proposal="full"``
    (:func:`~latentfit.inference.likelihood.laplace_proposal` at the conditional modes, the EBEs of
    :func:`individual_estimates`: computed once for both, so the proposal's program holds no Newton search of its own;
    a model without EBEs gets the search from the chains' means).  A model whose conditional modes cannot be computed
    (its log-density not twice differentiable) gets the kept draws' covariance instead
    (:func:`~latentfit.inference.likelihood.conditional_scale`, half the draws from the diagonal proposal), with a
    warning."""
    model = fit.model
    failures = _NO_LAPLACE
    try:
        try:  # the EBEs (30 Newton steps from the chains' means, kept for the tables) and the search's precision
            # there as the Laplace law
            local = _local_estimates(fit)
            start, steps, precision = local.mode, 0, local.precision
        except failures:
            start, steps, precision = mean, lk.FULL_NEWTON_STEPS, None
        mean, scale = lk.laplace_proposal(model, theta, start, df=df, seed=seed + 1, num_steps=steps, unit_ids=ids,
                                          ops=dist, precision=precision)
    except failures as err:
        warnings.warn(f"log_likelihood('is', proposal='full'): no Laplace approximation of the conditional laws "
                      f"({type(err).__name__}: {err}); the proposal's covariance comes from the kept draws",
                      lk.ImportanceSamplingWarning, stacklevel=4)
        scale = lk.conditional_scale(require_draws(fit, "the full IS proposal"), model.ops.to_numpy(sd))
        return mean, scale, df, 0.5
    return mean, scale, lk.full_proposal_df(model, df), lk.FULL_DEFENSIVE


def _across_processes(fit: FitResult, res: lk.LogLikelihood) -> lk.LogLikelihood:
    """A distributed fit's log-likelihood: every process's sum over its units, all-reduced (Monte-Carlo variances
    add); ``per_unit`` keeps this process's terms.  Every process must ask for the same method (a collective)."""
    ops = fit.engine.ops
    if not hasattr(ops, "world_size"):
        return res
    se = 0.0 if res.mc_se is None else float(res.mc_se)
    value, var = (float(v) for v in ops.to_numpy(ops.all_sum(ops.asarray(np.array([float(res.value), se * se])))))
    return dataclasses.replace(res, value=value, mc_se=None if res.mc_se is None else var ** 0.5)


def num_params(fit: FitResult) -> int:
    """Number of estimated scalar parameters (AIC/BIC): fixed parameters excluded, a simplex of K weights
    counts K − 1, a symmetric or triangular k×k matrix k(k+1)/2 (a Cholesky factor of a correlation
    k(k−1)/2).  A model may override this with a ``num_free_params`` attribute."""
    override = getattr(fit.model, "num_free_params", None)
    if override is not None:
        return int(override() if callable(override) else override)
    count = 0
    params = fit.params
    for name, info in fit.model.params.items():
        if not info.fixed:
            count += free_size(np.asarray(params[name]), info.meta.get("constraint", None))
    return count


def free_size(value: np.ndarray, constraint: Any) -> int:
    """Free scalar entries of one parameter (see :func:`num_params`)."""
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


def likelihood_table(fit: FitResult, methods: tuple[str, ...] | list[str] | None = None, *,
                     proposal: str = "full", num_samples: int = 5000) -> pd.DataFrame:
    """−2LL, AIC and BIC by each likelihood method, as saemix prints them (pandas, one row per method), with the
    Monte-Carlo standard error of −2LL as Monolix prints it (``"MC SE"``: importance sampling's; 0 for the
    deterministic methods).

    Default methods: ``"exact"`` when the model has an exact marginal, else ``"lin"`` (models with Gaussian
    faces), ``"is"`` and ``"gq"`` (small latent dimension, up to 4 coordinates per unit).  ``proposal`` and
    ``num_samples``: the importance sampling's (:func:`log_likelihood`).
    """
    import pandas as pd

    if methods is None:
        m = fit.model
        if getattr(m, "has_exact_marginal", False):
            methods = ["exact"]
        else:
            methods = (["lin"] if (m.has_gaussian_obs and m.has_gaussian_prior) else []) + ["is"]
            if m.latent_dim <= 4:
                methods.append("gq")
    p, n = fit.num_params, fit.num_units
    rows = {}
    for method in methods:
        options = {"proposal": proposal, "num_samples": num_samples} if method == "is" else {}
        res = _log_likelihood_result(fit, method, **options)
        ll, se = float(res.value), res.mc_se
        rows[method] = {"-2LL": -2.0 * ll, "AIC": -2.0 * ll + 2.0 * p, "BIC": -2.0 * ll + p * float(np.log(n)),
                        "MC SE": 2.0 * float(se or 0.0)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


# ----- standard errors and the summary table ----------------------------------------------------------------
#: :func:`exact_posterior_draws`: the draws of each unit's latents Louis' formula averages over, and the most
#: draws × units (2 M), which lowers the count on large data sets (at least 20: the information is a sum over the
#: units, so its Monte-Carlo error still shrinks with N)
EXACT_POSTERIOR_DRAWS, EXACT_POSTERIOR_BUDGET = 1000, 2_000_000


def exact_posterior_draws(fit: FitResult, seed: int = 0, num_chains: int = 10) -> np.ndarray:
    """``[num_chains, S/num_chains, N, ...]`` draws from the exact posterior at θ̂ (``model.sample_posterior``: a
    mixture's labels drawn from the responsibilities, one-hot), for Louis' formula on a fit whose E-step is exact and
    keeps no draws.  S = 1000 draws per unit (fewer where ``S × N`` would pass 2 M, at least 20; a multiple of
    ``num_chains``): the information's Monte-Carlo error is then about 1% of its SEs (a 1-D two-component mixture:
    within 1% of the exact observed information's).  The draws are independent: the "chains" only split them for
    arviz (:func:`posterior_draws`)."""
    model = fit.model
    chains = int(num_chains)
    count = int(min(EXACT_POSTERIOR_DRAWS, max(20, EXACT_POSTERIOR_BUDGET // max(int(model.num_units), 1))))
    count = max(count // chains, 1) * chains
    z = model.ops.to_numpy(model.sample_posterior(fit._theta(), model.ops.key(seed), count))
    return z.reshape((chains, count // chains) + z.shape[1:])


#: :func:`posterior_draws` of an exact-E-step fit: the exact posterior draws split into this many "chains"
EXACT_POSTERIOR_CHAINS = 4


def posterior_draws(fit: FitResult) -> np.ndarray | None:
    """The latent draws ``[L, draws, N, d]`` that :attr:`FitResult.latents` and ``fit.to_arviz()`` show (and its
    ``log_likelihood`` / ``posterior_predictive`` groups read): those the engine kept, else :func:`draws_at_estimate`'s
    MCMC draws at θ̂, else, for a model with an exact posterior sampler (the EM family's mixtures, Gaussian or
    enumerated Pyro / NumPyro ones: discrete labels), independent draws from ``p(z_i | y_i; θ̂)``
    (:func:`exact_posterior_draws`, seed 0, as 4 "chains": 4 × 250 one-hot labels per unit, fewer on large data:
    draws × units ≤ 2 M, at least 4 × 5); computed once.  None where none of these exists.

    Unlike :func:`require_draws` (the conditional moments, EBEs and IS proposal of continuous latents), the exact
    label draws count here: they describe the posterior, they are no MCMC output to average over."""
    if fit.latent_draws is not None:
        return fit.latent_draws
    drawn = draws_at_estimate(fit)
    if drawn is not None or fit.state is None or not getattr(fit.model, "has_posterior_sampler", False):
        return drawn
    if "exact_latents" not in fit._cache:
        try:
            fit._cache["exact_latents"] = exact_posterior_draws(fit, 0, EXACT_POSTERIOR_CHAINS)
        except NotImplementedError:
            fit._cache["exact_latents"] = None
    return fit._cache["exact_latents"]


def require_linearisable(fit: FitResult, what: str) -> None:
    """Refuse the linearisation (``"lin"``) where it does not apply, before anything is computed for it: a model
    whose latents are discrete labels (a mixture) with the methods that apply, any other model without the Gaussian
    faces with :func:`~latentfit.inference.likelihood.require_gaussian_faces`' message."""
    model = fit.model
    labels = [s.name for s in getattr(model, "latent_sites", ()) if s.kind == "categorical"]
    if labels:
        exact = getattr(model, "has_exact_marginal", False)
        raise ModelSpecificationError(
            f"{what} linearises the model around the conditional modes of continuous latents with Gaussian faces; "
            f"this model's latent {labels[0]!r} is a discrete label ({type(model).__name__}, a mixture), so it does "
            "not apply. Use standard_errors('sa') (Louis' formula"
            + (" over exact draws of the labels from the responsibilities at θ̂; the default here)" if exact else ")")
            + (" and log_likelihood('exact') (the exact marginal; the default here)" if exact
               else " and log_likelihood('is')"))
    lk.require_gaussian_faces(model, what)


def default_se_method(fit: FitResult) -> str:
    """``"lin"`` for models with Gaussian faces, else ``"sa"``."""
    m = fit.model
    return "lin" if (m.has_gaussian_obs and m.has_gaussian_prior) else "sa"


def standard_errors(fit: FitResult, method: str | None = None, *, num_iters: int = 0,
                    seed: int = 0) -> dict[str, float]:
    """Standard errors of every parameter (constrained scale, :meth:`~FitResult.param_table` labels).

    ``method``: ``"lin"`` (expected Fisher information of the model linearised at the conditional modes, as
    saemix does at the conditional means; default for models with Gaussian faces) or ``"sa"`` (for a fit with an
    exact E-step, the EM family's mixtures: the exact observed information, the Hessian of the marginal; else Louis'
    formula averaged over draws of the latents: the SAEM chains' draws of the smoothing phase (fresh draws at θ̂ when
    it kept fewer than :data:`MIN_SETTLED_ITERS` iterations, e.g. a short fit), or ``num_iters`` fresh MCMC iterations
    at θ̂ when ``num_iters > 0``, from the units' own streams after a fit with ``rng="per_unit"``, so that a distributed
    fit gets the one-process result).  The full record (covariance, Fisher information, ``.delta(fn)`` for derived
    quantities) is ``fit.covariance(method)``.
    """
    return covariance(fit, method, num_iters=num_iters, seed=seed).as_dict()


def covariance(fit: FitResult, method: str | None = None, *, num_iters: int = 0,
               seed: int = 0) -> fisher.StandardErrors:
    """:class:`~latentfit.inference.fisher.StandardErrors` record of ``method`` (see :func:`standard_errors`)."""
    method = method or default_se_method(fit)
    if method not in ("lin", "sa"):
        raise ValueError(f"method must be 'lin' or 'sa', got {method!r}")
    key = (method, num_iters, seed)
    cache = fit._cache.setdefault("se_records", {})
    if key not in cache:
        model, theta = fit.model, fit._theta()
        if method == "lin":
            require_linearisable(fit, "standard_errors('lin') (the linearisation Fisher information)")
            z_hat = model.ops.asarray(_local_estimates(fit).mode)
            rec = fisher.fim_linearisation(model, theta, z_hat, reduce=_information_sum(fit))
        elif fit.latent_draws is None and getattr(model, "has_exact_marginal", False) \
                and getattr(model, "has_posterior_sampler", False):
            # an exact E-step (the EM family's mixtures): the Hessian of the exact marginal, what Louis' formula
            # estimates, without its Monte-Carlo error
            rec = fisher.fim_exact(model, theta, reduce=_information_sum(fit))
        elif fit.latent_draws is None and getattr(model, "has_posterior_sampler", False):
            # an exact posterior sampler without an exact marginal: Louis' formula over exact posterior draws at θ̂
            draws = exact_posterior_draws(fit, seed)
            batch = max(1, 500_000 // max(int(model.num_units), 1))  # draws per pass: their scores' memory bounded
            rec = fisher.fim_louis(model, theta, draws, batch_size=batch, reduce=_information_sum(fit),
                                   unbiased=True)
        else:
            draws = require_draws(fit, "standard errors by stochastic approximation")
            if num_iters > 0:
                draws = _fresh_draws(fit, draws[:, -1], num_iters, seed)
            else:
                draws = _settled_draws(fit, draws, seed)
            rec = fisher.fim_louis(model, theta, draws, reduce=_information_sum(fit))
        cache[key] = rec
    fit._cache["se"] = cache[key].as_dict()
    return cache[key]


#: fewest kept iterations at θ̂ (times the chains) Louis' formula averages over; a fit with fewer (e.g. 45 SAEM
#: iterations (30, 15) keep 15) gets fresh draws at θ̂ instead
MIN_SETTLED_ITERS = 10


def _settled_draws(fit: FitResult, draws: np.ndarray, seed: int) -> np.ndarray:
    """The kept draws ``[L, D, N, d]`` of the iterations at θ̂ (from ``engine.settled_from()``: SAEM's smoothing
    phase).  A fit shorter than its ``num_draws`` kept draws of the exploration phase too, where θ_k is far from θ̂:
    their scores at θ̂ spread far more than under p(z | y; θ̂), which made Louis' information indefinite and its
    inverse's diagonal negative (standard errors clipped to 0).  With fewer than :data:`MIN_SETTLED_ITERS` settled
    iterations, ``engine.num_draws`` fresh MCMC iterations at θ̂ from the chains' last states replace them."""
    settled = getattr(fit.engine, "settled_from", lambda: 1)()
    first = fit.num_iterations - draws.shape[1] + 1  # iteration of the first kept draw
    kept = draws[:, max(0, settled - first):]
    if kept.shape[1] >= min(MIN_SETTLED_ITERS, draws.shape[1]) and settled <= fit.num_iterations:
        return kept
    return _fresh_draws(fit, draws[:, -1], max(int(getattr(fit.engine, "num_draws", 0)), MIN_SETTLED_ITERS, 1), seed)


def _stream_ids(fit: FitResult) -> np.ndarray | None:
    """The units' ids of a fit with per-unit streams (``rng="per_unit"``), for post-fit draws on those streams; None
    for a fit on one global stream (refused for a distributed fit, whose processes would each draw their own)."""
    engine = fit.engine
    ids = getattr(engine, "_unit_ids", None) if getattr(engine, "rng", None) == "per_unit" else None
    if ids is None and _distributed_ops(fit) is not None:
        raise ValueError("fresh draws after a distributed fit need the fit's per-unit streams (rng='per_unit' with "
                         "an engine that keeps unit ids, e.g. SAEM)")
    return ids


def _fresh_draws(fit: FitResult, z0: Any, num_iters: int, seed: int) -> np.ndarray:
    """``num_iters`` fresh MCMC iterations at θ̂ from the chains' states ``z0 [L, N, d]``.  A fit with
    ``rng="per_unit"`` draws them from its units' streams (a distributed fit: each process its units', with the
    random walk's scales and acceptance over every process), so they are the same whatever the sharding."""
    ids = _stream_ids(fit)
    return individual.sample_conditional(fit.model, fit._theta(), z0, num_iters, seed=seed, unit_ids=ids,
                                         ops=fit.engine.ops if ids is not None else None)


def summary(fit: FitResult, se: bool = True, method: str | None = None) -> pd.DataFrame:
    """pandas table: estimate, SE and RSE%.

    ``method`` (``"lin"`` | ``"sa"``, see :func:`standard_errors`): the standard errors by that method; if
    they cannot be computed (the model lacks the Gaussian faces, the fit kept no draws, ...) the error is
    raised, never a table without its SE columns.  Without ``method``: the standard errors computed last,
    else those of the default method; where the default method does not apply to this fit (e.g. an EM fit,
    which keeps no latent draws) the table holds the estimates only and a ``RuntimeWarning`` says why.
    ``se=False``: estimates only.  A fit with replicates (``fit.replicates``) adds the range of each estimate
    over the replicates (``replicates.min``, ``replicates.max``; the table in ``.attrs["replicates"]``).
    """
    import pandas as pd

    rows = fit.param_table()
    df = pd.DataFrame({"estimate": [v for _, v in rows]}, index=[n for n, _ in rows])
    se_map = fit._cache.get("se")
    if se and method is not None:
        se_map = standard_errors(fit, method)  # a requested method that fails raises
    elif se and se_map is None:
        try:
            se_map = standard_errors(fit)
        except (ValueError, NotImplementedError) as err:
            warnings.warn(f"summary(): no standard errors for this fit ({err}); pass se=False for the "
                          "estimates alone", RuntimeWarning, stacklevel=user_stacklevel())
            se_map = None
    if se and se_map is not None:
        df["se"] = [se_map.get(n, np.nan) for n, _ in rows]
        df["rse%"] = 100.0 * df["se"] / df["estimate"].abs()
    if fit.replicates is not None:  # the range of each estimate over the replicate fits
        reps = fit.replicates
        df["replicates.min"] = [reps[n].min() if n in reps else np.nan for n, _ in rows]
        df["replicates.max"] = [reps[n].max() if n in reps else np.nan for n, _ in rows]
        df.attrs["replicates"] = reps
    df.index.name = "parameter"
    return df


# ----- residuals and predictive checks ----------------------------------------------------------------------
def residuals(fit: FitResult, num_sims: int = 1000, seed: int = 0) -> diagnostics.Residuals:
    """PRED, IPRED, IWRES, EPRED, PWRES and NPDE (``[N, T]`` arrays; ``.to_frame()``).  A fit with ``rng="per_unit"``
    simulates each unit from its own stream; a distributed fit's processes compute their units' residuals and every
    process gets those of all units, in unit order (a collective: call it on every process)."""
    key = (num_sims, seed)
    cache = fit._cache.setdefault("residuals", {})
    if key not in cache:
        ids = _stream_ids(fit)
        res = diagnostics.residuals(fit.model, fit._theta(), fit.model.ops.asarray(_local_estimates(fit).mode),
                                    num_sims=num_sims, seed=seed, unit_ids=ids,
                                    ops=fit.engine.ops if ids is not None else None)
        ops = _distributed_ops(fit)
        if ops is not None:  # every process's units, in unit order (rows padded to the widest process's)
            res = diagnostics.Residuals(**{f.name: _gather_padded(ops, getattr(res, f.name))
                                           for f in dataclasses.fields(res) if f.init})
        res.units = unit_labels(fit, res.y.shape[0])
        data = getattr(fit.model, "data", None)
        x = getattr(data, "x_values", None)
        if x is not None and np.shape(x) == res.y.shape:  # NLME: each observation's time (or x-variable)
            res.x, res.x_name = np.asarray(x), str(getattr(fit.model, "x_name", "x"))
        labels = getattr(fit.model, "observation_labels", None) or {}
        res.labels = {k: v for k, v in labels.items() if np.shape(v) == res.y.shape}  # e.g. a joint model's DVID
        cache[key] = res
    return cache[key]


def _gather_padded(ops: Any, rows: np.ndarray) -> np.ndarray:
    """``[n, T_r]`` rows of every process concatenated in rank order, padded to the largest ``T_r`` (NaN, or False
    for a mask)."""
    parts = ops.gather_objects(np.asarray(rows))
    width = max(p.shape[1] for p in parts)
    fill = False if rows.dtype == bool else np.nan
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=fill) for p in parts], 0)


def resolve_x(fit: FitResult, x: Any) -> np.ndarray | None:
    """``x`` as an ``[N, T]`` numpy array, the layout of ``fit.model.observations()``.  ``x``: an array of that
    layout, or laid out as the observed site's data (e.g. one value per row of a plate over rows, read through
    ``alpha[group_idx]``: :meth:`observation_layout` of a traced model), or the name of an argument of the model
    call (keyword, or positional by the model function's parameter names)."""
    if x is None:
        return None
    model = fit.model
    if isinstance(x, str):
        arguments = dict(getattr(model, "kwargs", {}) or {})
        fn, args = getattr(model, "fn", None), getattr(model, "args", ())
        if fn is not None and args:
            import inspect

            try:
                names = [p.name for p in inspect.signature(fn).parameters.values()
                         if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):
                names = []
            arguments = {**dict(zip(names, args)), **arguments}
        if x not in arguments:
            raise ValueError(f"x={x!r} is not an argument of the model call (available: {sorted(arguments)})")
        x = arguments[x]
    values = np.asarray(model.ops.to_numpy(x) if not isinstance(x, np.ndarray) else x, dtype=float)
    layout = getattr(model, "observation_layout", None)
    return layout(values) if layout is not None else values


def vpc(fit: FitResult, x: Any, num_sims: int = 500, bins: Any = None, level: float = 0.9,
        seed: int = 0) -> diagnostics.VPC:
    """Visual-predictive-check summaries against ``x`` (``[N, T]`` array or model keyword name)."""
    return diagnostics.vpc(fit.model, fit._theta(), resolve_x(fit, x), num_sims=num_sims, bins=bins, level=level,
                           seed=seed)


__all__ = ["conditional_moments", "covariance", "default_ll_method", "default_se_method", "free_size",
           "individual_estimates", "individual_parameters", "likelihood_table", "log_likelihood", "num_params",
           "posterior_draws", "require_draws", "residuals", "resolve_x", "standard_errors", "summary", "vpc"]
