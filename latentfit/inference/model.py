"""The contract between a model and the engines: :class:`LatentModel`.

N *units* (individuals, data points: the outermost data plate) are independent given θ.
Every per-unit latent is flattened into one vector ``z_i ∈ R^d`` in *unconstrained* space (the
log-Jacobian of the map to the support is part of ``log_prior``), so random-walk, independent and
Laplace proposals all work.  Latent arrays carry leading chain dims: ``z`` is ``[..., n, d]``
for the units ``units`` (``None`` = all N units), and per-unit densities come back ``[..., n]``.

Optional exponential-family face (used by SAEM/EM-type engines):

* ``stats(theta, z, units)`` -> dict of per-unit sufficient statistics ``S(z_i, y_i)``, each
  ``[..., n, *shape]``;
* ``m_step(s, theta)`` -> the closed-form parameters ``θ̄(s)`` from statistics summed over units
  (``s = Σ_i S_i``);
* ``expected_stats(theta, units)`` -> exact ``s̄_i(θ)`` when the E-step is tractable.

Parameters that the closed form does not cover are maximised numerically (saemix recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .ops import Ops

#: :meth:`LatentModel.site_dims`' entry for a size-1 dim that only the plate layout makes (a batch dim no plate
#: names, there for broadcasting): the arviz conversion drops it
LAYOUT_DIM = ""


class ModelSpecificationError(ValueError):
    """The model cannot be fitted as written; the message says what to change."""


class LogisticDesignError(ModelSpecificationError):
    """The model lacks the affine logistic structure of :class:`LogisticDesign` (MISSO's ``surrogate="bohning"``); the
    message says why.  ``surrogate="auto"`` takes this refusal, and only it, as "use ``"louis"``"."""


class DataError(ValueError):
    """The data handed to the model are unusable (NaN, wrong shape, ...)."""


class UnitBlockEvaluator:
    """``z -> (log_lik, log_prior[, cache])`` of n units (``whole``) that also evaluates contiguous blocks of them.

    ``for_units(block)`` (a ``slice`` of the n units) is an evaluator of ``z[..., block, :]`` that runs the same
    operations on the block's rows, so its values are the whole evaluation's for those units bit for bit;
    ``unit_blocks(z)`` are the blocks an eager backend steps over for draws shaped like ``z`` (None: one block; the
    rule of :meth:`~latentfit.inference.ops.Ops.unit_blocks`).  The MCMC kernels (:mod:`~latentfit.inference.mcmc`)
    then keep one block's proposals, log-densities and masks alive at a time instead of ``[L, N]`` arrays of each.
    A plain callable is the same contract without blocks.
    """

    def __init__(self, whole: Callable[[Any], tuple[Any, ...]], for_units: Callable[[slice], Callable[[Any], tuple]],
                 unit_blocks: Callable[[Any], list[slice] | None]) -> None:
        self._whole = whole
        self._for_units = for_units
        self._unit_blocks = unit_blocks
        self._built: dict[tuple[int, int], Callable[[Any], tuple[Any, ...]]] = {}

    def __call__(self, z: Any) -> tuple[Any, ...]:
        return self._whole(z)

    def unit_blocks(self, z: Any) -> list[slice] | None:
        return self._unit_blocks(z)

    def for_units(self, block: slice) -> Callable[[Any], tuple[Any, ...]]:
        """The evaluator of the units ``block`` (built once per block)."""
        key = (int(block.start), int(block.stop))
        fn = self._built.get(key)
        if fn is None:
            fn = self._built[key] = self._for_units(block)
        return fn


class ConvergenceWarning(UserWarning):
    """A fit may not have reached the maximum (e.g. replicate fits ending at different log-likelihoods)."""


class NonFiniteError(FloatingPointError):
    """An M-step or a gradient gave a NaN/inf parameter: the fit stopped rather than return it.

    ``parameter`` and ``iteration`` name the first failure; ``checkpoint`` is the checkpoint of the last good
    state (iteration ``last_good_iteration``) that ``run(resume=checkpoint)`` continues from; ``result`` is a
    :class:`~latentfit.FitResult` of that state and the history up to it (``result.interrupted`` is true).
    """

    def __init__(self, message: str, *, parameter: str, iteration: int, last_good_iteration: int,
                 checkpoint: Any = None, result: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.iteration = iteration
        self.last_good_iteration = last_good_iteration
        self.checkpoint = checkpoint
        self.result = result


class DegenerateFitError(NonFiniteError, ModelSpecificationError):
    """The estimate reached a point where the model's density is degenerate, e.g. a Gaussian mixture's covariance
    became singular with no ``reg_covar`` floor (its log-density unbounded): the E-step at that θ cannot be taken.

    A model raises it from the E-step; during a fit the driver handles it as a :class:`NonFiniteError` (whose
    attributes it sets): ``iteration`` is the iteration whose E-step failed, ``result`` / ``checkpoint`` the last good
    state (``result.interrupted`` is true).  Outside a fit (a post-fit computation at such a θ) they are None.
    """

    def __init__(self, message: str, *, parameter: str | None = None, iteration: int | None = None,
                 last_good_iteration: int | None = None, checkpoint: Any = None, result: Any = None) -> None:
        super().__init__(message, parameter=parameter, iteration=iteration, last_good_iteration=last_good_iteration,
                         checkpoint=checkpoint, result=result)


@dataclass
class LatentSite:
    """Layout of one latent site inside the flat per-unit vector ``z_i``."""

    name: str
    shape: tuple[int, ...]  # per-unit shape of the site's value (unit dim removed)
    offset: int
    size: int
    # which family of closed-form statistics the site belongs to (None = none)
    kind: str | None = None


@dataclass
class ParamInfo:
    """A model parameter θ_j: constrained value, shape and bijection to R^shape."""

    name: str
    value: Any  # constrained initial value (backend array)
    to_unconstrained: Any
    to_constrained: Any
    closed_form: bool = False
    # "std" / "cov" / None: how simulated annealing treats this parameter
    anneal: str | None = None
    fixed: bool = False
    meta: dict = field(default_factory=dict)


class LogisticDesign(NamedTuple):
    """The affine structure of a logistic likelihood with Gaussian latents (MISSO's ``surrogate="bohning"``).

    The latents are ``z_i = μ(x) + diag(ω(x)) ε_i`` (``moments``), the logits of every observation ``r`` of unit i
    are affine, ``η_r = η⁰_r + a_rᵀ z_i + b_rᵀ x`` in the free parameters ``x`` (natural coordinates, flattened in
    ``names`` order), and ``−∂²/∂η² log p(y_r | η) ≤ c_r`` (Böhning: ``c_r = total_count_r / 4``)."""

    #: the free parameters, in the order of ``x``
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    #: ``Σ_{r ∈ unit i} c_r w̃_r w̃_rᵀ`` with ``w̃_r = (a_r, b_r)``, ``[n, d + q, d + q]``
    curvature: Any
    #: ``(theta, z [..., b, d], units) -> Σ_{r ∈ unit i} ∂ log p(y_r | η_r)/∂η_r · w̃_r`` ``[..., b, d + q]``
    scores: Callable[..., Any]
    #: ``theta -> (mean [d], lower Cholesky factor [d, d])`` of every unit's latents' prior
    moments: Callable[..., Any]
    #: columns of ``x`` that are latents' scales (the likelihood is even in their sign)
    scale_cols: Any


class LatentModel:
    """Base class; adapters (Pyro, NumPyro) and model families subclass it."""

    ops: Ops
    num_units: int
    latent_dim: int
    latent_sites: list[LatentSite]
    params: dict[str, ParamInfo]
    #: names of observed sites and their values (numpy), for results / arviz
    observed: dict[str, np.ndarray]

    # ----- parameters ----------------------------------------------------------------------------
    def init_params(self) -> dict[str, Any]:
        return {name: p.value for name, p in self.params.items()}

    def unconstrain(self, theta: dict[str, Any]) -> dict[str, Any]:
        return {n: self.params[n].to_unconstrained(v) for n, v in theta.items()}

    def constrain(self, theta_u: dict[str, Any]) -> dict[str, Any]:
        return {n: self.params[n].to_constrained(v) for n, v in theta_u.items()}

    @property
    def closed_form_params(self) -> list[str]:
        return [n for n, p in self.params.items() if p.closed_form and not p.fixed]

    @property
    def numeric_params(self) -> list[str]:
        return [n for n, p in self.params.items() if not p.closed_form and not p.fixed]

    # ----- densities -----------------------------------------------------------------------------
    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """``(log p(y_i | z_i; θ), log p(z_i; θ))``, each ``[..., n]`` (log-Jacobian included)."""
        raise NotImplementedError

    def latent_mask(self, units: Any = None) -> Any:
        """``[n, d]`` bool: True where the coordinate is a latent of the unit, False where it is a placeholder that no
        density of the model reads (an ``obs_mask=`` imputation site at an entry observed in this unit:
        ``where(mask, y, y_unobserved)`` never reads it).  Such a coordinate has no density of its own either; the
        model gives it a reference density instead, the standard normal ``φ(z_j)``, free of θ and of the data, in
        ``log_prior`` (and ``prior_moments`` / ``sample_prior`` alike), so that ``p(y_i; θ) = ∫ p(y_i, z; θ) dz`` is
        unchanged (``∫ φ = 1``) and every chain has a proper target.  Importance sampling and quadrature integrate it
        out exactly (``z_j = 0``, weight ``1 / φ(0)``) instead of by sampling.  None (the default): every coordinate is
        a latent."""
        return None

    def density_evaluator(self, theta: dict[str, Any], units: Any = None) -> Callable[[Any], tuple[Any, Any]]:
        """``z -> log_densities(theta, z, units)``, for many evaluations at one θ (an MCMC sweep); a model may
        compute what depends on θ alone once (NLME does)."""
        return lambda z: self.log_densities(theta, z, units)

    def cached_density(self, theta: dict[str, Any]) -> tuple[Callable[[Any], tuple[Any, Any, Any]],
                                                             Callable[[Any, Any], tuple[Any, Any]]] | None:
        """Optional face for SAEM's sweeps: ``(evaluate, rescore)`` with ``evaluate(z) -> (log_lik, log_prior, cache)``
        (the :meth:`density_evaluator` values plus a per-unit ``cache [..., n]`` from which the log-likelihood follows
        at any θ) and ``rescore(z, cache) -> (log_lik, log_prior)`` at this θ for a cache made at another θ, bit for bit
        what ``evaluate`` gives; :meth:`stats` then takes ``cache=``.  None (the default): the model has no such
        cache, and each sweep evaluates its starting state."""
        return None

    def initial_cache(self, theta: dict[str, Any], z: Any) -> Any:
        """The ``cache`` of :meth:`cached_density`'s ``evaluate(z)`` alone (SAEM's start; a model may skip the
        densities it does not need there), or None without a cache."""
        cached = self.cached_density(theta)
        return None if cached is None else cached[0](z)[2]

    def units_minor_density(self, theta: dict[str, Any]) -> tuple[Callable[[Any], tuple[Any, Any, Any]],
                                                                  Callable[[Any, Any], tuple[Any, Any]],
                                                                  Callable[[Any], Any]] | None:
        """Optional face for SAEM's compiled sweeps with the chains laid out units-minor, ``z [L, d, n]``
        (:func:`~latentfit.inference.mcmc.saemix_sweep`): ``(evaluate, rescore, prior_transform)``, what
        :meth:`cached_density` and :meth:`prior_transform` give, each taking (and giving) that layout, equal to them up
        to rounding.  None (the default): the sweep keeps ``[L, n, d]``."""
        return None

    def latent_lines(self) -> Any | None:
        """Optional: directions ``[r, n, d]`` (one per line and unit; a numpy array, constants of the data that a
        compiled step captures) along which SAEM adds a Gibbs
        move from the Gaussian prior's conditional, accepted by the likelihood ratio
        (:func:`~latentfit.inference.mcmc.line_gibbs`; needs :meth:`prior_moments`): lines of the latent space along
        which the likelihood barely changes and the posterior stretches far beyond the random walks' steps (NLME's
        IOV ridge, η up and every κ of the unit down).  None (the default): no such move."""
        return None

    def log_lik(self, theta: dict[str, Any], z: Any, units: Any = None) -> Any:
        return self.log_densities(theta, z, units)[0]

    def log_prior(self, theta: dict[str, Any], z: Any, units: Any = None) -> Any:
        return self.log_densities(theta, z, units)[1]

    def log_joint(self, theta: dict[str, Any], z: Any, units: Any = None) -> Any:
        ll, lp = self.log_densities(theta, z, units)
        return ll + lp

    def closed_form_log_prior(self) -> Callable[[dict[str, Any], Any, Any], Any] | None:
        """A cheap ``(theta, z, units) -> log p(z_i; θ) + c(z_i)`` ``[..., n]``: the latents' log-prior up to a term
        free of θ (the log-Jacobian of fixed transforms), computed from θ without running the model; None (the default)
        when the model has none.  MCMCSGD and MISSO differentiate it instead of the complete log-density where the
        likelihood does not depend on the free parameters (``∇_θ log p(y, z; θ) = ∇_θ log p(z; θ)`` there)."""
        return None

    def logistic_design(self, theta: dict[str, Any]) -> LogisticDesign:
        """The affine logistic structure of :class:`LogisticDesign` at θ (MISSO's ``surrogate="bohning"``); a model
        without it raises :class:`LogisticDesignError` (the default)."""
        raise LogisticDesignError(
            f"MISSO surrogate='bohning' needs a traced Pyro / NumPyro model with Normal latents and Bernoulli / "
            f"Binomial observations whose logits are affine in the latents and params; {type(self).__name__} has none")

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        """Draw ``z ~ p(z; θ)`` for every unit: ``[num_chains, n, d]`` (unconstrained)."""
        raise NotImplementedError

    def prior_transform(self, theta: dict[str, Any], eps: Any, units: Any = None) -> Any:
        """``z_i = μ_i + L ε_i`` from standard normal noise ``eps [..., n, d]`` (``Ω = L Lᵀ``): a prior draw whose
        randomness is the caller's (per-unit streams).  Needs a Gaussian prior (:meth:`prior_moments`)."""
        if not self.has_gaussian_prior:
            raise ModelSpecificationError(
                "drawing from the prior with per-unit random streams needs Gaussian latents (Normal, LogNormal or "
                "MultivariateNormal sites whose parameters do not depend on other latents); this model's are not: "
                "use rng='global'")
        xp = self.ops.xp
        mean, cov = self.prior_moments(theta, units)
        chol = self.ops.small_cholesky(cov)  # [d, d] or [n, d, d]
        return mean + xp.sum(chol * eps[..., None, :], -1)

    # ----- exponential-family face (optional) ----------------------------------------------------
    has_stats: bool = False
    has_expected_stats: bool = False

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        return {}

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        return {}

    def expected_stats(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        raise NotImplementedError

    def sum_expected_stats(self, theta: dict[str, Any], units: Any = None) -> tuple[dict[str, Any], Any]:
        """``(Σ_i s̄_i(θ), Σ_i log p(y_i; θ) or None)`` over ``units``; a model may fuse both in one pass."""
        xp = self.ops.xp
        s = self.expected_stats(theta, units)
        ll = xp.sum(self.marginal_log_lik(theta, units)) if self.has_exact_marginal else None
        return {k: xp.sum(v, 0) for k, v in s.items()}, ll

    # exact responsibilities with a numerical M-step (generalized EM): a model with one enumerated discrete latent
    # and no closed-form M-step; the full-batch EM engine then maximises Q numerically
    #: ``responsibilities(theta)`` gives the exact ``r_ik = p(z_i = k | y_i; θ)`` and ``expected_log_joint`` the
    #: ``Q(θ | θ_old)`` they weigh: :class:`~latentfit.inference.em.EM` runs generalized EM when ``has_expected_stats``
    #: is False (no closed form)
    has_exact_responsibilities: bool = False

    def responsibilities(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """``(r [n, K], log p(y_i; θ) [n])``: ``r_ik = p(z_i = k | y_i; θ)`` (models with
        :attr:`has_exact_responsibilities`)."""
        raise NotImplementedError

    def expected_log_joint(self, theta: dict[str, Any], r: Any) -> Any:
        """``Q(θ) = Σ_i Σ_k r_ik log p(y_i, z_i = k; θ)`` over all units, a scalar differentiable in θ, the
        responsibilities ``r [n, K]`` held fixed (models with :attr:`has_exact_responsibilities`)."""
        raise NotImplementedError

    # compact per-unit rows for the incremental engines' tables: any pytree that the statistics
    # depend on *linearly* (e.g. a mixture's responsibilities r_i, with S_i = r_i ⊗ F(y_i)); the
    # default rows are the statistics themselves
    def expected_rows(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        """Per-unit rows of the exact statistics ``s̄_i(θ)`` (see :meth:`reduce_rows`)."""
        return self.expected_stats(theta, units)

    def expected_rows_and_sum(self, theta: dict[str, Any],
                              units: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(rows, Σ_i s̄_i(θ))``: :meth:`expected_rows` and their :meth:`reduce_rows` over ``units`` (a full pass of
        the variance-reduced engines); a model may fuse both in one pass over the data."""
        rows = self.expected_rows(theta, units)
        return rows, self.reduce_rows(rows, units)

    def stats_rows(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        """Per-unit rows of the complete-data statistics ``S(z_i, y_i)`` for draws ``z [..., n, ...]``."""
        return self.stats(theta, z, units)

    def reduce_rows(self, rows: dict[str, Any], units: Any = None) -> dict[str, Any]:
        """``Σ_{i∈units} S_i`` from per-unit rows (linear in the rows)."""
        xp = self.ops.xp
        return {k: xp.sum(v, 0) for k, v in rows.items()}

    # exact posterior draws of the latents (discrete latents, conjugate models); used by the
    # Monte-Carlo EM engines (MCEM, TTSEM) instead of MCMC when available
    has_posterior_sampler: bool = False

    def sample_posterior(self, theta: dict[str, Any], key: Any, num_samples: int, units: Any = None,
                         sim: Any = None) -> Any:
        """Draws ``z ~ p(z_i | y_i; θ)``: ``[num_samples, n, ...]`` in the layout ``stats`` accepts.

        ``sim``: the shim whose ``uniform(key, [num_samples, n, 1])`` the draws are made from (per-unit streams,
        :class:`~latentfit.inference.ops.UnitStreamOps`: unit i's draws depend on ``(key, id_i)`` only); None: the
        model's own stream."""
        raise NotImplementedError

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        """Messages about degenerate estimates (collapsed components, ...); engines warn with them."""
        return []

    def stats_in_domain(self, s: dict[str, Any]) -> Any | None:
        """Where the statistics ``s`` lie in the domain of :meth:`m_step`: ``[G]`` booleans, one per block of the
        statistics (axis 0 of every array of ``s``, e.g. a mixture's components: ``s["s"] [K, D]``); with one leading
        batch axis on every array (``[B, K, D]``), ``[B, G]``.  In the domain means: statistics that
        some distribution of the latents could give (a mass > 0, a positive definite scatter), so that the M-step has
        a maximiser.  Exact and averaged statistics always are; a variance-reduced step (FIEM, sEM-VR) may not be, and
        the engines then shrink its control variate (:meth:`~latentfit.inference.stats_table.StatEngine.fast_step`).
        None (the default): every statistic is (no check)."""
        return None

    def shard_view(self, ops: Any, offset: int, total: int) -> LatentModel:
        """This model as the shard ``offset .. offset + num_units − 1`` of a data-parallel fit over ``total`` units
        (``ops``: the shim whose ``all_sum`` / ``gather_units`` reach every process).  A model whose initial values
        or constants depend on the data (a mixture's k-means start, its centring) returns a view computing them
        from the whole data; the default is the model itself (parameters that do not depend on the data)."""
        return self

    def data_arrays(self) -> dict[str, Any]:
        """The data the model was built on (arrays by name, or nested lists / dicts of them): a checkpoint records
        their SHA-256 and a resume on other data is refused (:func:`latentfit.checkpoint.data_digest`).  The default
        is :attr:`observed`; a model whose fit reads other data (covariates, designs) lists them too."""
        return dict(getattr(self, "observed", None) or {})

    def unit_data_axes(self) -> list[tuple[Any, int]]:
        """The arrays the model's computations capture that hold one slice per unit, each with its unit axis:
        ``run(devices=n)`` splits them along it over the devices (the data of a plate at ``dim=-1``, ``y [T, N]``).
        The default names none: the captured arrays whose leading axis has the units' length are split along it."""
        return []

    # ----- optional Gaussian faces (NLME-type models) ------------------------------------------
    # Used by f-SAEM's Gauss–Newton proposal, the linearisation log-likelihood / Fisher information
    # and residual diagnostics.  A model sets the flag when it implements the method.
    has_gaussian_obs: bool = False
    has_gaussian_prior: bool = False
    has_exact_marginal: bool = False
    #: ``predict`` / ``prior_moments`` with ``units=`` evaluate those units alone (a traced model evaluates all of
    #: them and selects): post-fit simulations may then go in blocks of units (:func:`~.diagnostics.residuals`)
    evaluates_unit_subsets: bool = False
    #: values per unit of the largest temporary of one evaluation of ``log_densities`` at one point (e.g. an NLME
    #: model's observations × doses): the post-fit quadrature sizes its blocks of grid points and units by it
    #: (:func:`~latentfit.inference.likelihood.gq_log_lik_per_unit`); 1 when unknown
    density_values_per_unit: int = 1
    #: the linearisation's Jacobian ``J_i = ∂f_i/∂z`` is held at θ̂ when differentiating its moments in θ (saemix's
    #: ``fim.saemix``; exact where θ enters ``f`` through z only): :mod:`~latentfit.inference.fisher`
    linearisation_holds_jacobian: bool = False
    #: the params that are weights of a neural-network module (``pyro.module``, a PyroModule's plain ``nn.Parameter``
    #: attributes, ``numpyro.contrib.module``): their complete-data information is indefinite, so MCMCSGD's
    #: ``optimizer="auto"`` fits them with Adam
    module_params: frozenset[str] = frozenset()

    def predict(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """Mean and sd of every (padded) observation given the latents: ``[..., n, T]`` each.

        The observation model is ``y_ij ~ N(mean_ij, sd_ij²)`` (``sd`` may depend on the mean:
        proportional / combined error).
        """
        raise NotImplementedError

    def sample_observations(self, theta: dict[str, Any], z: Any, key: Any) -> dict[str, Any]:
        """Replicated data, one per latent draw: ``y_rep ~ p(y | z_s; θ)`` of every observed site (:attr:`observed`),
        for ``z [..., N, d]`` (unconstrained, every unit), each ``[..., *the site's shape]`` (numpy or backend arrays;
        masked-out entries drawn too, where the model defines them).  Posterior predictive checks
        (``fit.to_arviz(posterior_predictive=True)``)."""
        raise NotImplementedError(f"{type(self).__name__} does not simulate its observations given the latents")

    def observations(self, units: Any = None) -> tuple[Any, Any]:
        """Observed values and mask of the padded observations: ``[n, T]`` each."""
        raise NotImplementedError

    def prior_moments(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """``z_i ~ N(mean_i, cov)`` in unconstrained space: mean ``[n, d]``, cov ``[d, d]`` or ``[n, d, d]``."""
        raise NotImplementedError

    def marginal_log_lik(self, theta: dict[str, Any], units: Any = None) -> Any:
        """Exact ``log p(y_i; θ)`` per unit ``[n]`` (discrete or conjugate latents)."""
        raise NotImplementedError

    def initial_values_finite(self, theta: dict[str, Any]) -> Any:
        """A flag (an array) that is False when the model's check of its starting values ``θ`` fails, for an engine
        to compute inside its own start (on JAX SAEM's start program: one compiled program fewer, issue 14 item 9);
        None: the model has no such check.  :meth:`check_initial_values` then reports the failure."""
        return None

    def check_initial_values(self) -> None:
        """Raise a clear error when the starting values are unusable (e.g. the log-likelihood is not finite there);
        nothing by default.  An engine calls it where it did not compute :meth:`initial_values_finite`, or where that
        flag is False."""

    def raise_for_nonfinite(self, theta: dict[str, Any], z: Any) -> None:
        """Raise a clear error when the log-density is NaN/inf at ``(θ, z)`` (adapters name the site)."""
        ll, lp = self.log_densities(theta, z)
        xp = self.ops.xp
        if not bool(xp.all(xp.isfinite(ll + lp))):
            raise ModelSpecificationError("the model's log-density is NaN/inf at the initial parameter values")

    # ----- presentation -------------------------------------------------------------------------
    def unpack_latents(self, z: Any) -> dict[str, Any]:
        """Split ``[..., n, d]`` unconstrained latents into constrained values per site."""
        raise NotImplementedError

    def site_dims(self, name: str) -> list[str | None]:
        """Names of the dims of site ``name``'s array, outermost first, for arviz: of a latent's draws after the chain
        and draw dims (``fit.latents[name]``: the unit dim, then the per-unit shape), of an observed site's values
        (:attr:`observed`).  Each is a plate's name, None (no name: arviz's ``<site>_dim_j``) or :data:`LAYOUT_DIM`
        (a size-1 dim of the plate layout, dropped); a list shorter than the array names its leading dims alone.
        The default names a latent's unit dim (``unit_plate``, else ``"unit"``) and nothing else."""
        if name in (getattr(self, "observed", None) or {}) or name in getattr(self, "imputed_sites", ()):
            return []
        return [getattr(self, "unit_plate", None) or "unit"]
