"""Gaussian mixture models with an exact E-step and a closed-form (optionally regularised) M-step.

``GaussianMixture(x, K, covariance_type)`` is a :class:`LatentModel` (units = data points, latent =
the component label, one-hot) that the EM family fits through its fast path (``expected_stats`` /
``m_step`` in closed form, no Pyro tracing), and hands out an ordinary Pyro model function
(:meth:`GaussianMixture.pyro_model`) with the same parameter names.

Statistics.  With the per-point features ``F(x) = [q(x), x, 1]`` — ``q(x) = vec(x xᵀ)`` (full),
``x²`` (diagonal) or ``‖x‖²`` (spherical) — the complete-data statistic is ``S_i = z_i ⊗ F(x_i)``
(``[K, D]``) and the exact E-step replaces the one-hot ``z_i`` by the responsibilities
``r_ik ∝ ω_k N(x_i; μ_k, Σ_k)``.  Every log-density ``log ω_k N(x; μ_k, Σ_k)`` is linear in ``F(x)``,
so one E-step over n points is two matrix products (``F @ C`` and ``rᵀ F``) and a softmax.  Data
are centred internally (numerical safety of the quadratic expansion).

M-step (with the regulariser ``R(θ)`` of Karimi, Wai, Moulines & Lavielle, NeurIPS 2019, as an option):
``ω_k = (N_k/n + ε)/(1 + εK)``, ``μ_k = S_x,k/(N_k + δ)``,
``Σ_k = (S_xx,k − μ_k S_x,kᵀ − S_x,k μ_kᵀ + N_k μ_k μ_kᵀ)/N_k + reg_covar·I``; ε = δ = 0 is the plain MLE.
The shared ("tied") types use the features of their per-component counterparts (tied: full, tied_diag: diag,
tied_spherical: spherical) and pool the components' scatter: ``Σ = Σ_k (S_xx,k − μ_k S_x,kᵀ − S_x,k μ_kᵀ +
N_k μ_k μ_kᵀ)/Σ_k N_k + reg_covar·I`` (scikit-learn's "tied"), its diagonal (tied_diag: per coordinate
``Σ_k Σ_i r_ik (x_ij − μ_kj)²/N``) and the mean of that diagonal over the coordinates (tied_spherical).
A component whose mass vanishes keeps its previous mean and covariance (never NaN) and the fit
warns about it.  Quantities that are non-negative in exact arithmetic but come out of a cancelling
expansion are clamped: masses ``N_k`` (a running sum of differences in the incremental engines), the
variances (full: a variance at the rounding level of ``E[x_i²]`` is 0 and correlations stay in [−1, 1],
before ``reg_covar``) and the k-means++ squared distances.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from latentfit.inference.model import (
    DataError,
    DegenerateFitError,
    LatentModel,
    LatentSite,
    ModelSpecificationError,
    ParamInfo,
)
from latentfit.inference.ops import LOG_2PI, Ops, ops_for
from latentfit.inference.units import UnitBlock, read_units

from ._integrations import families

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied", "tied_diag", "tied_spherical")
#: each shared ("tied") type's per-component counterpart: the same features, E-step and scatter statistics
PER_COMPONENT = {"tied": "full", "tied_diag": "diag", "tied_spherical": "spherical"}
#: rows per chunk of the streamed full-data E-step (eager backends): keeps [chunk, K] arrays in cache
CHUNK = 32768
#: a full-covariance variance below CANCELLATION·eps·E[x_i²] (the rounding level of the M-step's expansion) is 0
CANCELLATION = 64


def _identity(x: Any) -> Any:
    return x



def _numeric_data(x: Any) -> Any:
    """``x`` as floating-point data (lists and numpy arrays of numbers, bool and integer arrays of any backend
    become floats, as in scikit-learn); non-numeric values raise :class:`DataError`.  Never modifies ``x``."""
    if not hasattr(x, "dtype") or isinstance(x, np.ndarray) and x.dtype.kind not in "biuf":
        try:
            x = np.asarray(x, dtype=float)
        except (TypeError, ValueError) as err:
            raise DataError(f"x must hold numbers (an [n, d] array of floats): {err}") from None
    if str(x.dtype).rsplit(".", 1)[-1].startswith(("bool", "int", "uint")):
        x = x * 1.0  # a new float array of the same backend and device
    return x

class GaussianMixture(LatentModel):
    """K-component Gaussian mixture on ``x`` (``[n, d]`` or ``[n]``).

    Parameters
    ----------
    x : array ``[n, d]`` or ``[n]``
        Data (torch tensor, numpy array); the model lives on its device in its dtype (numpy: float64).
    num_components : int
        K (at most n).
    covariance_type : {"full", "diag", "spherical", "tied", "tied_diag", "tied_spherical"}
        Parameter ``covariances`` is ``[K, d, d]``, ``[K, d]`` or ``[K]`` accordingly (one covariance per
        component), or one covariance shared by all the components: ``"tied"`` a full ``[d, d]`` matrix
        (scikit-learn's "tied"), ``"tied_diag"`` a diagonal ``[d]`` (variances per coordinate),
        ``"tied_spherical"`` one variance ``[]`` (a scalar; for 1-D data the mixture with one shared scale).
        Statistics: the per-component counterpart's (full / diag / spherical: ``S = Σ_i r_i ⊗ F(x_i)``,
        ``[K, D]``); the M-step pools the components' scatter matrices (or their diagonals, or the mean of the
        diagonal) and divides by ``Σ_k N_k``.
    weights, locs, covariances : optional
        Initial values; missing ones come from greedy k-means++ seeding plus Lloyd iterations on a
        subsample of at most 20 000 points.
    fixed : sequence of str
        Parameters held at their initial values (e.g. ``("weights", "covariances")`` for the
        means-only GMM of the FIEM / TTSEM papers).
    reg_covar : float
        Added to the covariance diagonal in the M-step (scikit-learn's default 1e-6).
    regularize : bool or (ε, δ)
        The regularised M-step (Karimi et al., NeurIPS 2019: Dirichlet-type ε on weights, ridge δ on means);
        ``True`` uses ``(1e-3, 1e-3)``.
    seed : int
        Seed of the k-means++ initialisation (scikit-learn's ``random_state``).  An engine of the EM family with
        ``n_init=R`` (scikit-learn's ``n_init``) fits R starts, k-means++ from seeds ``seed, seed + 1, ...``, and keeps
        the one with the largest final log-likelihood (``fit.restarts``: :meth:`restart_start`).
    """

    has_stats = True
    has_expected_stats = True
    has_exact_marginal = True
    has_posterior_sampler = True

    def __init__(self, x: Any, num_components: int, covariance_type: str = "full", *,
                 weights: Any = None, locs: Any = None, covariances: Any = None,
                 fixed: tuple[str, ...] | list[str] = (), reg_covar: float = 1e-6,
                 regularize: bool | tuple[float, float] = False, seed: int = 0, init_iters: int = 100,
                 ops: Ops | None = None) -> None:
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
        x = _numeric_data(x)
        self.ops = ops if ops is not None else ops_for(x)
        ops, xp = self.ops, self.ops.xp
        x = ops.asarray(x)
        if x.ndim == 1:
            x = xp.reshape(x, (-1, 1))
        if x.ndim != 2:
            raise DataError(f"x must be [n, d] or [n], got shape {tuple(x.shape)}")
        n, d = int(x.shape[0]), int(x.shape[1])
        if n == 0:
            raise DataError("x is empty: a Gaussian mixture needs at least one data point")
        if d == 0:
            raise DataError(f"x has no columns (shape {tuple(x.shape)}): a Gaussian mixture needs at least one feature")
        if not bool(xp.all(xp.isfinite(x))):
            raise DataError("x holds NaN/inf values; drop or impute them first")
        K = int(num_components)
        if K < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if K > n:
            raise DataError(f"num_components={K} exceeds the number of data points n={n}")
        unknown = [p for p in fixed if p not in ("weights", "locs", "covariances")]
        if unknown:
            raise ValueError(f"fixed names unknown parameters {unknown}; choose from weights, locs, covariances")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
        if regularize is True:
            regularize = (1e-3, 1e-3)
        self.eps_w, self.delta_mu = (float(regularize[0]), float(regularize[1])) if regularize else (0.0, 0.0)
        self.K, self.d, self.num_units, self.covariance_type = K, d, n, covariance_type
        #: the per-component type whose features and E-step this one uses (itself for the per-component types)
        self.base_type = PER_COMPONENT.get(covariance_type, covariance_type)
        self.tied = covariance_type in PER_COMPONENT
        #: units of the whole fit (this model may be one process's shard: :meth:`shard_view`)
        self.total_units = n
        self.reg_covar = float(reg_covar)
        self.x = x
        self._fixed: frozenset = frozenset()
        self._tiny_mass = 10.0 * float(xp.finfo(x.dtype).eps) * n
        self._shard: tuple[Any, int] | None = None  # (ops reaching every process, first unit) of a shard view
        self._init_options = (weights, locs, covariances, seed, init_iters)
        self._set_features(xp.mean(x, 0))
        self._eye = ops.asarray(np.eye(d))
        self.latent_dim = K
        self.latent_sites = [LatentSite("z", (), 0, K, kind="categorical")]
        self.observed = {"obs": ops.to_numpy(x)}
        init = self._initial_values(weights, locs, covariances, seed, init_iters)
        self.params = {name: ParamInfo(name=name, value=v, to_unconstrained=_identity, to_constrained=_identity,
                                       closed_form=True, fixed=name in fixed,
                                       meta={"constraint": {"weights": "simplex", "locs": "real",
                                                            "covariances": "positive"}[name]})
                       for name, v in init.items()}
        self._check_covariances(init["covariances"], given=covariances is not None)
        self._fixed = frozenset(name for name in self.params if self.params[name].fixed)

    def _feature_rows(self, xc: Any) -> Any:
        """``F(x) = [q(x), x, 1]`` of centred rows ``xc [m, d]``: ``[m, D]``."""
        ops, xp, d = self.ops, self.ops.xp, self.d
        q = {"full": lambda v: xp.reshape(v[:, :, None] * v[:, None, :], (v.shape[0], d * d)),
             "diag": lambda v: v * v,
             "spherical": lambda v: xp.sum(v * v, 1, keepdims=True)}[self.base_type](xc)
        self.dq = int(q.shape[1])
        return xp.concatenate([q, xc, ops.ones((int(xc.shape[0]), 1))], 1)

    def _set_features(self, shift: Any) -> None:
        """Centre the data at ``shift``: rows ``F [n, D]`` for mini-batch gathers and a features-major copy
        ``FT [D, n]`` for full passes (reductions over components then run across contiguous rows)."""
        self.shift = shift
        self._coef_cache: tuple[Any, Any] | None = None  # (θ arrays' stamps, C) of the last E-step (eager backends)
        self.F = self._feature_rows(self.x - shift)
        self.FT = self.F.T + 0.0
        self.D = int(self.F.shape[1])

    def unit_data_axes(self) -> list[tuple[Any, int]]:
        """The points ``x [n, d]``, their feature rows ``F [n, D]`` (axis 0) and ``Fᵀ [D, n]`` (axis 1): what
        ``run(devices=k)`` splits over the devices."""
        return [(self.x, 0), (self.F, 0), (self.FT, 1)]

    def shard_view(self, ops: Any, offset: int, total: int) -> GaussianMixture:
        """This mixture as points ``offset ..`` of a data-parallel fit over ``total`` points: centred at the mean
        of all the points (all-reduced), the missing initial values from the k-means start of the whole data's
        subsample (the rows gathered from every process: the one-process model's start), and the M-step's
        weights over ``total`` points."""
        xp = self.ops.xp
        view = copy.copy(self)
        view.total_units = int(total)
        view._shard = (ops, int(offset))
        view._tiny_mass = 10.0 * float(xp.finfo(self.x.dtype).eps) * total
        view._set_features(ops.all_sum(xp.sum(self._real_rows(self.x), 0)) / total)
        weights, locs, covariances, seed, iters = self._init_options
        init = view._initial_values(weights, locs, covariances, seed, iters)
        view.params = {name: dataclasses.replace(p, value=init[name]) for name, p in self.params.items()}
        return view

    def pad_units(self, size: int) -> GaussianMixture:
        """This mixture with its points padded to ``size`` by copies of the last one: the dummy units of a
        ``distributed="local"`` JAX fit with blocks of unequal size (``inference/padding.py`` weighs them 0; the
        centring and the k-means start of :meth:`shard_view` read the real points only)."""
        n = int(self.num_units)
        if size <= n:
            return self
        view = copy.copy(self)
        idx = np.concatenate([np.arange(n), np.full(int(size) - n, n - 1)])
        view.x = self.ops.take(self.x, self.ops.asarray(idx), 0)
        view.num_units = int(size)
        view._set_features(self.shift)
        return view

    def _real_rows(self, a: Any) -> Any:
        """``a``'s rows of real points: the first ``num_real_units`` of a padded block (:meth:`pad_units`)."""
        real = int(getattr(self, "num_real_units", self.num_units))
        return a if real == self.num_units else a[:real]

    def _centred_rows(self, idx: np.ndarray | None) -> Any:
        """Centred points ``idx`` (sorted global indices; None: all), gathered from every process in a shard view."""
        ops = self.ops
        xc = self.x - self.shift
        if self._shard is None:
            return xc if idx is None else ops.take(xc, ops.asarray(idx), 0)
        dist, offset = self._shard
        xc = self._real_rows(xc)
        if idx is not None:
            mine = idx[(idx >= offset) & (idx < offset + int(xc.shape[0]))] - offset
            xc = ops.take(xc, ops.asarray(mine), 0)
        return dist.gather_units(xc, 0)

    # ----- initialisation -----------------------------------------------------------------------------
    def _initial_values(self, weights: Any, locs: Any, covariances: Any, seed: int, iters: int) -> dict[str, Any]:
        ops, xp, K, d = self.ops, self.ops.xp, self.K, self.d
        out: dict[str, Any] = {}
        if weights is None or locs is None or covariances is None:
            r, sub = self._kmeans_responsibilities(seed, iters, None if locs is None else ops.asarray(locs))
            s = (r.T @ self._feature_rows(sub)) * (self.total_units / int(r.shape[0]))
            plain = self._closed_form(s, None)
        if weights is None:
            out["weights"] = plain["weights"]
        else:
            w = ops.asarray(weights)
            if tuple(w.shape) != (K,) or not bool(xp.all(w >= 0)) or abs(float(xp.sum(w)) - 1) > 1e-6:
                raise ValueError(f"weights must be a probability vector of length K={K}")
            out["weights"] = w
        if locs is None:
            out["locs"] = plain["locs"]
        else:
            m = xp.reshape(ops.asarray(locs), (K, d)) if self.d == 1 else ops.asarray(locs)
            if tuple(m.shape) != (K, d):
                raise ValueError(f"locs must have shape ({K}, {d}), got {tuple(m.shape)}")
            out["locs"] = m
        if covariances is None:
            out["covariances"] = plain["covariances"]
        else:
            c = ops.asarray(covariances)
            shape = {"full": (K, d, d), "diag": (K, d), "spherical": (K,), "tied": (d, d), "tied_diag": (d,),
                     "tied_spherical": ()}[self.covariance_type]
            if tuple(c.shape) != shape:
                try:
                    c = xp.reshape(c + ops.zeros(shape), shape)
                except Exception:
                    raise ValueError(f"covariances must have shape {shape} for covariance_type="
                                     f"{self.covariance_type!r}, got {tuple(c.shape)}") from None
            out["covariances"] = c
        return out

    def restart_start(self, restart: int) -> tuple[int, dict[str, Any]]:
        """``(seed, θ₀)`` of restart ``r`` of an ``n_init`` fit (:mod:`latentfit.inference.restarts`): the k-means++
        start drawn from seed ``seed + r`` (``seed``: this model's), i.e. the initial values of
        ``GaussianMixture(x, K, ..., seed=seed + r)`` with the same data and options, bit for bit (restart 0: this
        model's own).  Initial values given (weights, covariances) stay; given ``locs`` make every start the same and
        are refused.  A start whose k-means++ clusters give a singular covariance raises a
        :class:`~latentfit.DegenerateFitError` (the restarts skip it)."""
        weights, locs, covariances, seed, iters = self._init_options
        r = int(restart)
        if locs is not None:
            raise ModelSpecificationError(
                "n_init > 1 restarts k-means++ from the seeds seed, seed + 1, ...; with locs= given every restart "
                "starts at the same point (the clusters around those locs): leave locs out, or use n_init=1")
        if r == 0:
            return int(seed), self.init_params()
        init = self._initial_values(weights, locs, covariances, int(seed) + r, iters)
        try:
            self._check_covariances(init["covariances"], given=covariances is not None)
        except ModelSpecificationError as exc:  # this start only: the restarts go on without it
            err = DegenerateFitError(f"restart {r} (seed {int(seed) + r}): {exc}", parameter="covariances")
            err.restart_seed = int(seed) + r
            raise err from exc
        return int(seed) + r, {name: init[name] for name in self.params}

    def _kmeans_responsibilities(self, seed: int, iters: int, locs: Any) -> tuple[Any, Any]:
        """Hard assignments ``[m, K]`` of a subsample (≤ 20 000 centred points, returned with them) from
        k-means++ seeding + Lloyd iterations (the initial θ is the M-step of these)."""
        ops, xp, K, n = self.ops, self.ops.xp, self.K, self.total_units
        rng = np.random.default_rng(seed)
        sub = self._centred_rows(None if n <= 20000 else np.sort(rng.choice(n, 20000, replace=False)))
        if locs is None:  # greedy k-means++ (2 + log K candidates per centre), then Lloyd to convergence
            m = int(sub.shape[0])
            trials = 2 + int(np.log(K))
            centres = [sub[int(rng.integers(m))]]
            d2 = xp.sum((sub - centres[0]) ** 2, 1)
            for _ in range(1, K):
                p = np.maximum(ops.to_numpy(d2).astype(np.float64), 0.0)  # weights must be >= 0 (rng.choice)
                tot = p.sum()
                cand = rng.choice(m, trials, p=p / tot) if tot > 0 else rng.integers(m, size=trials)
                cd = _sqdist(xp, sub, ops.take(sub, ops.asarray(cand), 0))  # [m, trials]
                pot = xp.sum(xp.minimum(d2[:, None], cd), 0)
                best = int(xp.argmin(pot))
                centres.append(sub[int(cand[best])])
                d2 = xp.minimum(d2, cd[:, best])
            c = xp.stack(centres)
            lab_old = None
            for _ in range(iters):
                lab = xp.argmin(_sqdist(xp, sub, c), 1)
                if lab_old is not None and bool(xp.all(lab == lab_old)):
                    break
                lab_old = lab
                onehot = _one_hot(ops, lab, K)
                cnt = xp.sum(onehot, 0)
                newc = (onehot.T @ sub) / xp.where(cnt > 0, cnt, 1.0)[:, None]
                c = xp.where((cnt > 0)[:, None], newc, c)
        else:
            c = locs - self.shift
        return _one_hot(ops, xp.argmin(_sqdist(xp, sub, c), 1), K), sub

    def _check_covariances(self, cov: Any, given: bool = True) -> None:
        """Refuse a singular initial covariance: the user's (``given``), or the automatic start's (the k-means
        clusters' covariances plus ``reg_covar``: singular with ``reg_covar=0`` for a cluster of identical or
        collinear points), each with its own remedy."""
        xp = self.ops.xp
        if self.base_type == "full":
            cov = cov[None] if self.tied else cov
            sym = bool(xp.all(xp.abs(cov - xp.swapaxes(cov, -1, -2)) <= 1e-8 * (1 + xp.abs(cov))))
            ev = xp.linalg.eigvalsh(cov)
            if sym and bool(xp.all(ev > 0)):
                return
            bad = [k for k in range(self.K) if not bool(xp.all(ev[k] > 0))] if not self.tied else []
        else:
            positive = cov > 0
            if bool(xp.all(positive)):
                return
            bad = [] if self.tied else [k for k in range(self.K) if not bool(xp.all(positive[k]))]
        which = f"component(s) {bad}" if bad else "the components"
        if given:
            raise ModelSpecificationError(
                f"the initial covariances you gave ({which}) are not symmetric positive definite (singular "
                "covariance); give positive definite covariances=..., or leave covariances out for the automatic "
                "start")
        raise ModelSpecificationError(
            f"the automatic start (the data clustered by k-means++, or around the locs given; each cluster's "
            f"covariance plus reg_covar={self.reg_covar:g}) gave {which} a singular covariance: the points of such "
            "a cluster are identical or collinear, and reg_covar adds nothing to their covariance. Set reg_covar > 0 "
            "(default 1e-6), or give initial values (locs=..., covariances=...), or use fewer components")

    # ----- E-step ------------------------------------------------------------------------------------
    def _coefficients(self, theta: dict[str, Any]) -> Any:
        """``C [D, K]`` with ``log ω_k N(x; μ_k, Σ_k) = F(x) @ C[:, k]`` (centred x).

        Eager backends keep the last ``C`` with the θ arrays it came from: an engine that evaluates two mini-batches
        at one θ (FIEM) computes the precisions once.  (Compiled steps merge repeated work themselves.)"""
        theta = self._theta_arrays(theta)
        if self.ops.jittable:
            return self._coefficients_of(theta)
        key = (theta["weights"], theta["locs"], theta["covariances"])
        cached = self._coef_cache
        if cached is not None and same_arrays(cached[0], key):
            return cached[1]
        C = self._coefficients_of(theta)
        self._coef_cache = (array_stamps(key), C)
        return C

    def _theta_arrays(self, theta: Any) -> dict[str, Any]:
        """``theta`` with its host values (``fit.params``: numpy arrays, lists, numbers) as this model's arrays (its
        backend, device and dtype); backend arrays are kept as they are (the engines' θ: no copy, no cache miss).
        Anything but a dict of the three parameters is refused, saying what to pass."""
        if not isinstance(theta, dict) or not all(k in theta for k in ("weights", "locs", "covariances")):
            got = f"a dict with keys {sorted(theta)}" if isinstance(theta, dict) else f"a {type(theta).__name__}"
            raise TypeError(f"GaussianMixture: θ must be a dict of the parameters weights, locs and covariances "
                            f"(e.g. fit.params), got {got}; for the labels or responsibilities of data x use "
                            "fit.predict(x) / fit.predict_proba(x), or gm.predict_labels(fit.params, x)")
        host = (np.ndarray, np.generic, list, tuple, float, int)
        if not any(isinstance(v, host) for v in theta.values()):
            return theta
        return {k: self.ops.asarray(v) if isinstance(v, host) else v for k, v in theta.items()}

    def _coefficients_of(self, theta: dict[str, Any]) -> Any:
        ops, xp, d = self.ops, self.ops.xp, self.d
        w, mu, cov = theta["weights"], theta["locs"] - self.shift, theta["covariances"]
        tiny = xp.finfo(w.dtype).tiny
        log_w = xp.log(w + tiny)
        if self.tied:  # the shared covariance as every component's: the per-component type's coefficients
            cov = cov[None] + ops.zeros((self.K,) + tuple(cov.shape))
        if self.base_type == "full":
            prec, logdet = self._precision(cov)
            pm = xp.sum(prec * mu[:, None, :], -1)  # [K, d]
            cq = -0.5 * xp.reshape(prec, (self.K, d * d))
            c0 = -0.5 * xp.sum(pm * mu, -1) - 0.5 * logdet
        else:
            check = self.reg_covar == 0 and "covariances" not in self._fixed
            if check and not self.ops.jittable and not bool(xp.all(cov > 0)):
                raise DegenerateFitError(_ZERO_VARIANCE, parameter="covariances")
            var = cov if self.base_type == "diag" else cov[:, None] + ops.zeros((self.K, d))
            pm = mu / var
            cq = -0.5 / var if self.base_type == "diag" else -0.5 / cov[:, None]
            c0 = -0.5 * xp.sum(mu * pm, -1) - 0.5 * xp.sum(xp.log(var), -1)
        c0 = c0 - 0.5 * d * LOG_2PI + log_w
        return xp.concatenate([cq, pm, c0[:, None]], 1).T  # [D, K]

    def _precision(self, cov: Any) -> tuple[Any, Any]:
        """``(Σ_k^{-1}, log det Σ_k)``.

        Compiled steps with small d: an unrolled Cholesky (elementwise ops XLA fuses, no LAPACK call per mini-batch).
        Eager backends: one batched Cholesky and one triangular solve, ``Σ⁻¹ = L⁻ᵀ L⁻¹`` (the unrolled form is ~40
        dispatched ops on ``[K]`` arrays, 5× the cost of the three LAPACK-backed calls at d = 2)."""
        ops, xp = self.ops, self.ops.xp
        if self.d <= 6 and ops.jittable:
            prec, logdet, pivot = _small_spd_inverse(xp, cov, self.d)
        else:
            try:
                chol = ops.cholesky(cov)
            except Exception:  # an eager backend refuses a matrix that is not positive definite
                chol = None
            if chol is None:  # which components fail: the unrolled pivots (NaN-safe), or the eigenvalues
                pivot = _small_spd_inverse(xp, cov, self.d)[2] if self.d <= 6 else xp.amin(xp.linalg.eigvalsh(cov), -1)
                logdet = prec = None
            else:
                inv_l = ops.solve_triangular(chol, self._eye + 0 * cov, lower=True)  # L⁻¹
                prec = xp.swapaxes(inv_l, -1, -2) @ inv_l
                diag = xp.diagonal(chol, 0, -2, -1)
                logdet = 2.0 * xp.sum(xp.log(diag), -1)
                pivot = xp.amin(diag, -1)  # (torch.min(x, dim) is a (values, indices) pair)
        if not ops.jittable and (prec is None or not bool(xp.all(pivot > 0))):
            bad = [k for k in range(self.K) if not bool(pivot[k] > 0)]
            if not bad:  # the Cholesky refused a matrix whose unrolled pivots stay (barely) positive: which one
                bad = [k for k in range(self.K) if not self._cholesky_ok(cov[k])]
            raise DegenerateFitError(self._singular_message(bad), parameter="covariances")
        return 0.5 * (prec + xp.swapaxes(prec, -1, -2)), logdet

    def _singular_message(self, bad: list[int]) -> str:
        floor = (f"reg_covar={self.reg_covar:g} is below the rounding level of the data's scale: increase it"
                 if self.reg_covar > 0 else "reg_covar=0 puts no floor under the covariances: give reg_covar > 0 "
                 "(scikit-learn's default is 1e-6)")
        return (f"the covariance of component(s) {bad} is singular (not positive definite: its points span fewer than "
                f"d={self.d} dimensions); {floor}")

    def degenerate_error(self, theta: dict[str, Any]) -> DegenerateFitError | None:
        """The :class:`~latentfit.DegenerateFitError` an eager E-step raises at ``theta`` (a covariance that is not
        positive definite: a component shrunk onto identical or collinear points), checked on the host; None when
        every covariance is positive definite or holds NaN (another failure).  What a compiled backend's E-step,
        which cannot raise, is asked after it produced NaN (the fit's driver) or a NaN log-likelihood
        (:func:`~latentfit.inference.likelihood.log_likelihood_exact`), so that both backends say the same."""
        cov = np.asarray(self.ops.to_numpy(self._theta_arrays(theta)["covariances"]), dtype=np.float64)
        if not np.all(np.isfinite(cov)):
            return None
        if self.base_type != "full":
            if bool(np.all(cov > 0)):
                return None
            return DegenerateFitError(_ZERO_VARIANCE, parameter="covariances")
        mats = np.broadcast_to(cov, (self.K, self.d, self.d))
        bad = []
        for k in range(self.K):
            try:
                np.linalg.cholesky(mats[k])
            except np.linalg.LinAlgError:
                bad.append(k)
        return DegenerateFitError(self._singular_message(bad), parameter="covariances") if bad else None

    def _cholesky_ok(self, cov_k: Any) -> bool:
        """Whether the eager backend's Cholesky takes one component's covariance (an error path's diagnosis)."""
        try:
            self.ops.cholesky(cov_k)
        except Exception:  # noqa: BLE001 - the backend's refusal, whatever its type
            return False
        return True

    def _features_t(self, units: Any) -> Any:
        """``F(x_i)ᵀ`` for the units: ``[D, b]`` (a block is a slice of the features-major copy: a view on eager
        backends, the features are never written)."""
        if units is None:
            return self.FT
        if isinstance(units, UnitBlock):
            return read_units(self.ops, self.FT, units, 1)
        return self.ops.take(self.F, units, 0).T

    def _features(self, units: Any) -> Any:
        """``F(x_i)`` for the units: ``[b, D]`` (a block on an eager backend: the transposed view of the features-major
        block that the E-step of the same units reads, so a mini-batch reads its features once)."""
        if units is None:
            return self.F
        if isinstance(units, UnitBlock) and not self.ops.jittable:
            return read_units(self.ops, self.FT, units, 1).T
        return read_units(self.ops, self.F, units, 0)

    def permuted_units(self, perm: Any) -> GaussianMixture:
        """The same mixture with its points in the order ``perm`` (a view sharing θ's layout and initial
        values; the engines cut it into contiguous mini-batch blocks, see :mod:`latentfit.inference.units`)."""
        view = copy.copy(self)
        view.x = self.ops.take(self.x, perm, 0)
        view.F = self.ops.take(self.F, perm, 0)
        view.FT = view.F.T + 0.0
        return view

    def log_component(self, theta: dict[str, Any], units: Any = None) -> Any:
        """``log ω_k + log N(x_i; μ_k, Σ_k)``: ``[n, K]``."""
        return (self._coefficients(theta).T @ self._features_t(units)).T

    def responsibilities(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """``(r [n, K], log p(x_i; θ) [n])``; all units on an eager backend are streamed in cache-sized chunks into
        one ``[n, K]`` table (a full pass of the variance-reduced engines: their snapshot's rows)."""
        return self._responsibilities(theta, units, True)

    def _responsibilities(self, theta: dict[str, Any], units: Any, log_lik: bool) -> tuple[Any, Any]:
        """:meth:`responsibilities`; ``log_lik=False``: the responsibilities only (second item None)."""
        CT = self._coefficients(theta).T
        if units is not None or self.ops.jittable or self.num_units <= CHUNK:
            r_t, ll = self._softmax_t(CT @ self._features_t(units), log_lik=log_lik)
            return r_t.T, ll
        r_t, ll, _ = self._stream(CT, log_lik, False)
        return r_t.T, ll

    def _stream(self, CT: Any, log_lik: bool, stats: bool) -> tuple[Any, Any, Any]:
        """All units (eager backend) streamed in cache-sized chunks: ``(r [K, n], log p(x_i) [n] or None,
        Σ_i r_i ⊗ F(x_i) or None)``, the sum accumulated chunk by chunk as :meth:`sum_expected_stats` does."""
        ops, xp, n = self.ops, self.ops.xp, self.num_units
        r_t, ll, S = ops.zeros((self.K, n)), ops.zeros((n,)) if log_lik else None, 0.0
        for a in range(0, n, CHUNK):  # (eager: numpy-like in-place writes into this call's own arrays)
            Fc = self.FT[:, a:a + CHUNK]
            e, tot, m = self._softmax_parts(CT @ Fc)
            rc = r_t[:, a:a + CHUNK]
            xp.divide(e, tot, out=rc)  # the responsibilities straight into the table's columns
            if log_lik:
                ll[a:a + CHUNK] = xp.log(tot) + m
            if stats:  # while the chunk is in cache
                S = S + rc @ Fc.T
        return r_t, ll, S if stats else None

    def _softmax_parts(self, lc_t: Any) -> tuple[Any, Any, Any]:
        """``(e [K, b], Σ_k e [b], max_k lc [b])`` with ``e = exp(lc − max_k lc)``: the pieces of the softmax."""
        xp = self.ops.xp
        m = xp.amax(lc_t, 0)
        e = xp.exp(lc_t - m)
        return e, xp.sum(e, 0), m

    def _softmax_t(self, lc_t: Any, log_lik: bool = True) -> tuple[Any, Any]:
        """Column-wise softmax and log-sum-exp of ``[K, b]`` log-weights (one exp per entry); ``log_lik=False``: the
        softmax only (None for the log-sum-exp)."""
        e, tot, m = self._softmax_parts(lc_t)
        return e / tot, self.ops.xp.log(tot) + m if log_lik else None

    def _sum_stats(self, r: Any, units: Any) -> dict[str, Any]:
        return {"s": r.T @ self._features(units)}  # [K, D]

    def expected_stats(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        r, _ = self.responsibilities(theta, units)
        return {"s": r[:, :, None] * self._features(units)[:, None, :]}  # [b, K, D]

    # compact rows for the incremental engines' tables: S_i = r_i ⊗ F(x_i) is linear in r_i [K]
    def expected_rows(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return {"r": self._responsibilities(theta, units, False)[0]}

    def expected_rows_and_sum(self, theta: dict[str, Any],
                              units: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The rows ``r`` and ``Σ_i r_i ⊗ F(x_i)``; all units on an eager backend in one streamed pass, each chunk's
        sum taken while it is in cache (the sum is then :meth:`sum_expected_stats`' own, bit for bit, rather than
        one ``[K, n] @ [n, D]`` product read back from memory)."""
        if units is not None or self.ops.jittable or self.num_units <= CHUNK:
            rows = self.expected_rows(theta, units)
            return rows, self.reduce_rows(rows, units)
        r_t, _, S = self._stream(self._coefficients(theta).T, False, True)
        return {"r": r_t.T}, {"s": S}

    def stats_rows(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        return {"r": z}

    def reduce_rows(self, rows: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return {"s": rows["r"].T @ self._features(units)}

    def sum_expected_stats(self, theta: dict[str, Any], units: Any = None) -> tuple[dict[str, Any], Any]:
        """``Σ_i r_i ⊗ F(x_i)`` and ``Σ_i log p(x_i)`` in one pass; eager backends stream cache-sized chunks."""
        xp = self.ops.xp
        FT = self._features_t(units)
        n = int(FT.shape[1])
        CT = self._coefficients(theta).T
        if self.ops.jittable or n <= CHUNK:
            r_t, ll = self._softmax_t(CT @ FT)
            return {"s": r_t @ FT.T}, xp.sum(ll)
        S, L = 0.0, 0.0
        for a in range(0, n, CHUNK):
            Fc = FT[:, a:a + CHUNK]
            r_t, ll = self._softmax_t(CT @ Fc)
            S = S + r_t @ Fc.T
            L = L + xp.sum(ll)
        return {"s": S}, L

    def marginal_log_lik(self, theta: dict[str, Any], units: Any = None) -> Any:
        return self.responsibilities(theta, units)[1]

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        """``S(z_i, x_i) = z_i ⊗ F(x_i)`` for one-hot ``z`` ``[..., n, K]``."""
        return {"s": z[..., :, :, None] * self._features(units)[:, None, :]}

    def param_basis(self, name: str) -> np.ndarray | None:
        """The free directions of parameter ``name``'s stored coordinates (its transforms are the identity), for the
        standard errors (:func:`~latentfit.inference.fisher._finish`): the weights sum to one (the K − 1 directions
        ``e_k − e_K``), a full covariance matrix is symmetric (``d(d+1)/2`` directions per matrix); None: every
        coordinate is free."""
        K, d = self.K, self.d
        if name == "weights":
            basis = np.zeros((K, K - 1))
            basis[:K - 1] = np.eye(K - 1)
            basis[K - 1] = -1.0
            return basis
        if name == "covariances" and self.base_type == "full":
            pairs = [(i, j) for i in range(d) for j in range(i, d)]
            one = np.zeros((d * d, len(pairs)))
            for c, (i, j) in enumerate(pairs):
                one[i * d + j, c] = one[j * d + i, c] = 1.0
            return np.kron(np.eye(1 if self.tied else K), one)
        return None

    def sample_posterior(self, theta: dict[str, Any], key: Any, num_samples: int, units: Any = None,
                         sim: Any = None) -> Any:
        """One-hot labels drawn from the responsibilities: ``[num_samples, n, K]`` (inverse CDF of uniforms from
        ``sim``, default the model's shim)."""
        ops, xp = self.ops, self.ops.xp
        r, _ = self.responsibilities(theta, units)
        cdf = xp.cumsum(r, 1)
        u = (ops if sim is None else sim).uniform(key, (num_samples, int(r.shape[0]), 1))
        lab = xp.sum(u > cdf[None, :, :-1], -1)
        return _one_hot(ops, lab, self.K)

    # ----- M-step ------------------------------------------------------------------------------------
    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        return self._closed_form(s["s"], theta, skip=self._fixed, num_units=num_units)

    def _closed_form(self, S: Any, theta: dict[str, Any] | None, skip: frozenset = frozenset(),
                     num_units: int | None = None) -> dict[str, Any]:
        """M-step from statistics ``S [K, D]`` summed over ``num_units`` points (default all of them); parameters
        in ``skip`` (fixed ones) are not computed."""
        xp, K, d, dq = self.ops.xp, self.K, self.d, self.dq
        n = self.total_units if num_units is None else num_units
        Nk = S[:, -1]
        Sx = S[:, dq:dq + d]
        Sq = S[:, :dq]
        eps, delta = self.eps_w, self.delta_mu
        out: dict[str, Any] = {}
        if "weights" not in skip:
            # a running sum of differences (incremental / variance-reduced engines) can leave a dead
            # component's mass just below 0: a negative weight would make log ω NaN in the next E-step
            w = (xp.maximum(Nk, 0 * Nk) / n + eps) / (1.0 + eps * K)
            out["weights"] = w / xp.sum(w)
        alive = Nk > self._tiny_mass
        Nsafe = xp.where(alive, Nk, 1.0)
        mu_c = Sx / (Nsafe + delta)[:, None]
        if "locs" not in skip:
            mu = mu_c + self.shift
            out["locs"] = mu if theta is None else xp.where(alive[:, None], mu, theta["locs"])
        if "covariances" in skip:
            return out
        if self.tied:
            out["covariances"] = self._tied_covariance(Sq, Sx, Nk, mu_c, alive, theta)
            return out
        if self.covariance_type == "full":
            Sxx = xp.reshape(Sq, (K, d, d))
            cross = mu_c[:, :, None] * Sx[:, None, :]
            cov = (Sxx - cross - xp.swapaxes(cross, -1, -2) + Nk[:, None, None] * mu_c[:, :, None] * mu_c[:, None, :])
            cov = cov / Nsafe[:, None, None]
            cov = 0.5 * (cov + xp.swapaxes(cov, -1, -2))
            # the expansion cancels ‖μ‖² against E[xxᵀ]: at the rounding level of E[x_i²] a variance is 0
            m2 = xp.diagonal(Sxx, 0, -2, -1) / Nsafe[:, None]
            cov = _clamp_covariance(xp, cov, CANCELLATION * float(xp.finfo(cov.dtype).eps) * m2, self._eye > 0)
            cov = self._nearest_psd(cov, alive) + self.reg_covar * self._eye
            alive_c = alive[:, None, None]
        elif self.covariance_type == "diag":
            cov = (Sq - 2 * mu_c * Sx + Nk[:, None] * mu_c * mu_c) / Nsafe[:, None] + self.reg_covar
            cov = xp.maximum(cov, self.reg_covar + 0 * cov)
            alive_c = alive[:, None]
        else:
            cov = (Sq[:, 0] - 2 * xp.sum(mu_c * Sx, 1) + Nk * xp.sum(mu_c * mu_c, 1)) / (Nsafe * d) + self.reg_covar
            cov = xp.maximum(cov, self.reg_covar + 0 * cov)
            alive_c = alive
        # a component without mass keeps its previous mean and covariance (never 0/0)
        out["covariances"] = cov if theta is None else xp.where(alive_c, cov, theta["covariances"])
        return out

    def _nearest_psd(self, cov: Any, alive: Any) -> Any:
        """Symmetric ``cov [G, d, d]`` mapped into the positive semi-definite cone where it is not positive
        definite: its negative eigenvalues set to 0 (the nearest such matrix in Frobenius norm; the scatter of
        statistics outside the M-step's domain, which no posterior gives).  ``reg_covar`` added after it makes the
        covariance ≥ reg_covar·I: with a valid scatter ``W`` this is ``W/N + reg_covar·I`` as before, so exact EM's
        fixed point is unchanged.  A positive definite ``cov`` (every exact or averaged statistic) is returned as is;
        the eigendecomposition runs only when some matrix of a component with mass (``alive [G]``; the others keep
        their previous value) fails the Cholesky test."""
        ops, xp = self.ops, self.ops.xp
        ok = ops.positive_definite(cov) | ~alive

        def clip(c: Any) -> Any:
            w, u = ops.eigh(c)
            p = (u * xp.maximum(w, 0 * w)[..., None, :]) @ xp.swapaxes(u, -1, -2)
            return xp.where(ok[:, None, None], c, 0.5 * (p + xp.swapaxes(p, -1, -2)))

        return ops.cond(xp.all(ok), lambda c: c, clip, cov)

    def stats_in_domain(self, s: dict[str, Any]) -> Any:
        """``[..., K]``: component k's statistics ``(N_k, S_x,k, S_xx,k)`` are the moments of some distribution of
        points (the moment matrix ``[[S_xx, S_x], [S_xᵀ, N]]`` is positive definite: a mass > 0 and a positive definite
        scatter ``S_xx − S_x S_xᵀ/N``; diag: per coordinate, spherical: summed over them), the domain where the M-step
        has a maximiser.  With the covariances fixed, a mass > 0."""
        ops, xp, d, dq = self.ops, self.ops.xp, self.d, self.dq
        S = s["s"]
        N, Sx, Sq = S[..., -1], S[..., dq:dq + d], S[..., :dq]
        if "covariances" in self._fixed:
            return N > 0
        if self.base_type == "full":  # the moment matrix gathered from S's columns in one take
            if getattr(self, "_moment_index", None) is None:  # kept as numpy: an array made while tracing would leak
                self._moment_index = _moment_matrix_index(d)
            M = ops.take(S, ops.asarray(self._moment_index), S.ndim - 1)
            return ops.positive_definite(xp.reshape(M, tuple(S.shape[:-1]) + (d + 1, d + 1)))
        if self.base_type == "diag":
            return (N > 0) & xp.all(Sq * N[..., None] - Sx * Sx > 0, -1)
        return (N > 0) & (Sq[..., 0] * N - xp.sum(Sx * Sx, -1) > 0)

    def _tied_covariance(self, Sq: Any, Sx: Any, Nk: Any, mu_c: Any, alive: Any, theta: dict[str, Any] | None) -> Any:
        """The shared covariance: the components' scatter about their means pooled and divided by ``Σ_k N_k``
        (components without mass add nothing); all mass gone (never in practice) keeps the previous value."""
        xp, K, d = self.ops.xp, self.K, self.d
        Nk = xp.maximum(Nk, 0 * Nk)
        total = xp.sum(Nk)
        Ntot = xp.where(total > self._tiny_mass, total, 1.0)
        if self.covariance_type == "tied":
            Sxx = xp.reshape(Sq, (K, d, d))
            cross = mu_c[:, :, None] * Sx[:, None, :]
            scatter = Sxx - cross - xp.swapaxes(cross, -1, -2) + Nk[:, None, None] * mu_c[:, :, None] * mu_c[:, None, :]
            scatter = xp.where(alive[:, None, None], scatter, 0 * scatter)
            cov = xp.sum(scatter, 0)[None] / Ntot
            cov = 0.5 * (cov + xp.swapaxes(cov, -1, -2))
            m2 = xp.sum(xp.diagonal(Sxx, 0, -2, -1), 0)[None] / Ntot  # rounding level of the expansion
            cov = _clamp_covariance(xp, cov, CANCELLATION * float(xp.finfo(cov.dtype).eps) * m2, self._eye > 0)
            cov = self._nearest_psd(cov, total[None] > self._tiny_mass)[0] + self.reg_covar * self._eye
        else:
            if self.covariance_type == "tied_diag":  # per coordinate: [K, d]
                scatter = Sq - 2 * mu_c * Sx + Nk[:, None] * mu_c * mu_c
                scatter = xp.where(alive[:, None], scatter, 0 * scatter)
                cov = xp.sum(scatter, 0) / Ntot + self.reg_covar
            else:  # tied_spherical: summed over the coordinates, [K]
                scatter = Sq[:, 0] - 2 * xp.sum(mu_c * Sx, 1) + Nk * xp.sum(mu_c * mu_c, 1)
                scatter = xp.where(alive, scatter, 0 * scatter)
                cov = xp.sum(scatter, 0) / (Ntot * d) + self.reg_covar
            cov = xp.maximum(cov, self.reg_covar + 0 * cov)
        return cov if theta is None else xp.where(total > self._tiny_mass, cov, theta["covariances"])

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        xp, out = self.ops.xp, []
        w = self.ops.to_numpy(theta["weights"])
        dead = [k for k in range(self.K) if w[k] * self.total_units < 1e-3]
        if dead:
            out.append(f"component(s) {dead} collapsed (weight·n < 1e-3): the mixture has fewer than "
                       f"K={self.K} components' worth of data; reduce num_components or use regularize=True")
        cov = theta["covariances"]
        ev = xp.linalg.eigvalsh(cov) if self.base_type == "full" else cov
        if self.tied:
            if float(np.min(self.ops.to_numpy(ev))) <= 1.01 * self.reg_covar:
                out.append(f"the shared covariance shrank onto a subspace (at the reg_covar floor {self.reg_covar:g}); "
                           "use a larger reg_covar")
            return out
        ev = self.ops.to_numpy(ev).reshape(self.K, -1)
        small = [k for k in range(self.K) if k not in dead and ev[k].min() <= 1.01 * self.reg_covar]
        if small:
            out.append(f"component(s) {small} shrank onto single points (covariance at the reg_covar floor "
                       f"{self.reg_covar:g}); use regularize=True or a larger reg_covar")
        return out

    # ----- LatentModel face for MCMC engines / post-fit tools ------------------------------------------
    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        xp = self.ops.xp
        lc = self.log_component(theta, units)
        log_w = xp.log(theta["weights"] + xp.finfo(lc.dtype).tiny)
        ll = xp.sum(z * (lc - log_w), -1)
        lp = xp.sum(z * log_w, -1)
        return ll, lp

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        ops, xp = self.ops, self.ops.xp
        n = self.num_units if units is None else len(units)
        cdf = xp.cumsum(theta["weights"], 0)
        u = ops.uniform(key, (num_chains, n, 1))
        return _one_hot(ops, xp.sum(u > cdf[:-1], -1), self.K)

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        return {"z": self.ops.xp.argmax(z, -1)}

    def sample_observations(self, theta: dict[str, Any], z: Any, key: Any) -> dict[str, Any]:
        """``{"obs": [..., n, d]}``: each point drawn from its labelled component, ``x = μ_k + L_k ε`` (``L_k`` the
        Cholesky factor of ``Σ_k``), at each draw of the one-hot labels ``z [..., n, K]`` (one pass per component)."""
        ops, xp, d = self.ops, self.ops.xp, self.d
        z = ops.asarray(z)
        lab = xp.argmax(z, -1)
        locs = xp.reshape(ops.asarray(theta["locs"]), (self.K, d))
        cov = ops.asarray(theta["covariances"])
        eps = ops.normal(key, tuple(lab.shape) + (d,))
        out = 0.0 * eps
        for k in range(self.K):
            c = cov if self.tied else cov[k]
            if self.base_type == "full":
                step = eps @ xp.swapaxes(xp.linalg.cholesky(c), -1, -2)
            else:  # diag: variances [d]; spherical: one variance
                step = eps * xp.sqrt(c)
            out = xp.where((lab == k)[..., None], locs[k] + step, out)
        return {"obs": ops.to_numpy(out)}

    def predict_proba(self, theta: dict[str, Any], x: Any = None) -> np.ndarray:
        """Responsibilities ``p(z_i = k | x_i; θ) ∝ ω_k N(x_i; μ_k, Σ_k)``, ``[n, K]`` numpy (scikit-learn's
        ``GaussianMixture.predict_proba``): of this model's points, or of new points ``x`` (``[m, d]``, or ``[m]``
        when d = 1; numpy, torch or JAX).  ``theta``: ``fit.params`` (numpy) or backend arrays."""
        ops, xp = self.ops, self.ops.xp
        if x is None:
            return ops.to_numpy(self._responsibilities(theta, None, False)[0])
        rows = self._new_rows(x)
        C = self._coefficients(theta)
        out = []
        for a in range(0, int(rows.shape[0]), CHUNK):
            r_t, _ = self._softmax_t(C.T @ xp.swapaxes(self._feature_rows(rows[a:a + CHUNK]), 0, 1), log_lik=False)
            out.append(ops.to_numpy(r_t).T)
        return np.concatenate(out, 0) if out else np.zeros((0, self.K))

    def score_samples(self, theta: dict[str, Any], x: Any = None) -> np.ndarray:
        """``log p(x_i; θ) = log Σ_k ω_k N(x_i; μ_k, Σ_k)`` ``[n]`` numpy (scikit-learn's ``score_samples``) of this
        model's points or of new points ``x`` (:meth:`predict_proba`'s forms)."""
        ops, xp = self.ops, self.ops.xp
        if x is None:
            return ops.to_numpy(self.marginal_log_lik(theta))
        rows = self._new_rows(x)
        C = self._coefficients(theta)
        out = []
        for a in range(0, int(rows.shape[0]), CHUNK):
            _, ll = self._softmax_t(C.T @ xp.swapaxes(self._feature_rows(rows[a:a + CHUNK]), 0, 1))
            out.append(ops.to_numpy(ll))
        return np.concatenate(out, 0) if out else np.zeros((0,))

    def sample_points(self, theta: dict[str, Any], num_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(x [m, d], labels [m])`` numpy: ``m`` new points drawn from the mixture at ``θ`` (scikit-learn's
        ``sample``): a label from the weights, then the point from its component."""
        ops = self.ops
        m = int(num_samples)
        if m < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        key = ops.key(int(seed))
        k1, k2 = ops.split(key, 2)
        weights = ops.asarray(theta["weights"])
        cdf = ops.xp.cumsum(weights, 0)
        lab = ops.xp.sum(ops.uniform(k1, (m, 1)) > cdf[:-1], -1)
        z = _one_hot(ops, lab, self.K)
        return self.sample_observations(theta, z, k2)["obs"], ops.to_numpy(lab).astype(np.int64)

    def predict_labels(self, theta: dict[str, Any], x: Any = None) -> np.ndarray:
        """Hard labels ``argmax_k p(z_i = k | x_i; θ)`` ``[n]`` (int64 numpy; scikit-learn's ``predict``) of this
        model's points or of new points ``x`` (:meth:`predict_proba`)."""
        return np.argmax(self.predict_proba(theta, x), 1).astype(np.int64)

    def _new_rows(self, x: Any) -> Any:
        """New points as centred ``[m, d]`` rows of this model's backend and dtype (refusing other widths, NaN)."""
        ops, xp = self.ops, self.ops.xp
        x = ops.asarray(_numeric_data(x))
        if x.ndim == 1 and self.d == 1:
            x = xp.reshape(x, (-1, 1))
        if x.ndim != 2 or int(x.shape[1]) != self.d:
            raise DataError(f"x must be [m, {self.d}]" + (" or [m]" if self.d == 1 else "") +
                            f" (the model's {self.d} feature(s)), got shape {tuple(x.shape)}")
        if not bool(xp.all(xp.isfinite(x))):
            raise DataError("x holds NaN/inf values; drop or impute them first")
        return x - self.shift

    def predict(self, theta: Any = None, z: Any = None, units: Any = None) -> Any:
        """Not scikit-learn's ``predict``: :meth:`LatentModel.predict` is the observation mean and sd given the latents
        (the models with Gaussian faces', for linearisation and residuals), which a mixture has not.  The model holds
        no fitted parameters either (the fit does): cluster labels are ``fit.predict(x=None)``, responsibilities
        ``fit.predict_proba(x=None)``, or ``gm.predict_labels(fit.params, x=None)`` / ``gm.predict_proba(...)``."""
        raise TypeError(
            "GaussianMixture.predict is not scikit-learn's predict (it is the observation-mean hook of models with "
            "Gaussian faces, which a mixture has not), and the model holds no fitted parameters: for cluster labels "
            "use fit.predict(x) (x=None: the fitted points), for responsibilities fit.predict_proba(x), where fit "
            "is the engine's result (e.g. fit = EM(gm).run()); or gm.predict_labels(fit.params, x) / "
            "gm.predict_proba(fit.params, x)")

    # ----- Pyro model ------------------------------------------------------------------------------------
    def pyro_model(self):
        """An ordinary Pyro model function ``model(x)`` of this mixture (enumerated label ``z``).

        Parameters ``weights``, ``locs``, ``covariances`` start at this model's initial values.  Built by
        :func:`latentfit.integrations.families.mixture_model`.
        """
        fam = families()
        return fam.mixture_model(self, fam.pyro_ppl())


def array_stamps(arrays: tuple[Any, ...]) -> tuple[tuple[Any, Any], ...]:
    """The arrays with their in-place modification counters (torch's ``_version``; 0 where arrays are immutable)."""
    return tuple((a, getattr(a, "_version", 0)) for a in arrays)


def same_arrays(stamps: tuple[tuple[Any, Any], ...], arrays: tuple[Any, ...]) -> bool:
    """``arrays`` are the very objects of ``stamps``, unmodified since (the stamps hold references: no id reuse)."""
    return len(stamps) == len(arrays) and all(a is s and getattr(a, "_version", 0) == v
                                              for (s, v), a in zip(stamps, arrays))


_ZERO_VARIANCE = ("a component variance is 0 (singular covariance): reg_covar=0 puts no floor under the variances; "
                  "give reg_covar > 0 (scikit-learn's default is 1e-6)")


def _small_spd_inverse(xp: Any, A: Any, d: int) -> tuple[Any, Any, Any]:
    """Batched inverse, log-determinant and smallest Cholesky pivot² of SPD ``A [K, d, d]`` (d small).

    Unrolled Cholesky ``A = L Lᵀ``, ``M = L^{-1}``, ``A^{-1} = Mᵀ M``: O(d³) elementwise ops on [K].
    A non-positive pivot (singular matrix) gives pivot ≤ 0 (and NaN entries) for the caller to report.
    """
    L = [[None] * d for _ in range(d)]
    pivots = []
    for j in range(d):
        s = A[:, j, j]
        for k in range(j):
            s = s - L[j][k] * L[j][k]
        pivots.append(s)
        L[j][j] = xp.sqrt(xp.where(s > 0, s, float("nan")))
        for i in range(j + 1, d):
            t = A[:, i, j]
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i][j] = t / L[j][j]
    M = [[None] * d for _ in range(d)]
    for i in range(d):
        M[i][i] = 1.0 / L[i][i]
        for j in range(i - 1, -1, -1):
            t = L[i][j] * M[j][j]
            for k in range(j + 1, i):
                t = t + L[i][k] * M[k][j]
            M[i][j] = -t / L[i][i]
    rows = []
    for a in range(d):
        row = []
        for b in range(d):
            t = 0.0
            for k in range(max(a, b), d):
                t = t + M[k][a] * M[k][b]
            row.append(t)
        rows.append(xp.stack(row, -1))
    prec = xp.stack(rows, -2)
    logdet = 2.0 * sum(xp.log(L[j][j]) for j in range(d))
    pivot = pivots[0]
    for p in pivots[1:]:
        pivot = xp.minimum(pivot, p)
    return prec, logdet, pivot


def _moment_matrix_index(d: int) -> np.ndarray:
    """Columns of the full-covariance statistics ``[vec(x xᵀ), x, 1]`` that make the moment matrix
    ``[[x xᵀ, x], [xᵀ, 1]]`` (row-major ``(d + 1)²`` entries)."""
    a = np.arange(d + 1)
    i, j = np.meshgrid(a, a, indexing="ij")
    idx = np.where((i < d) & (j < d), i * d + j, d * d + np.minimum(i, j))
    return np.where((i == d) & (j == d), d * d + d, idx).ravel().astype(np.int64)


def _clamp_covariance(xp: Any, cov: Any, noise: Any, eye: Any) -> Any:
    """Symmetric ``cov [K, d, d]`` made positive semi-definite where rounding broke it: variances at or below
    their rounding level ``noise [K, d]`` (negative ones included) become 0 with their covariances, and
    correlations are clamped to [−1, 1] (``|c_ij| ≤ √(c_ii c_jj)``).  Leaves a well-conditioned ``cov`` as is."""
    var = xp.diagonal(cov, 0, -2, -1)
    var = xp.where((var > noise) & (var > 0), var, 0 * var)
    bound = xp.sqrt(var[:, :, None] * var[:, None, :])
    off = xp.minimum(xp.maximum(cov, -bound), bound)
    return xp.where(eye, var[:, :, None] + 0 * cov, off)


def _sqdist(xp: Any, a: Any, c: Any) -> Any:
    """Squared distances ``‖a_i − c_j‖²`` ``[m, t]`` by the expansion ``‖a‖² − 2a·c + ‖c‖²`` (one matrix
    product), clamped at 0: the expansion rounds below zero for (near-)duplicate points, by amounts that
    depend on the CPU's matrix-multiply kernel, and the k-means++ draw weights must be non-negative."""
    d2 = xp.sum(a * a, 1)[:, None] - 2 * a @ c.T + xp.sum(c * c, 1)[None, :]
    return xp.maximum(d2, 0 * d2)


def _one_hot(ops: Ops, labels: Any, K: int) -> Any:
    return (labels[..., None] == ops.arange(K)) * 1.0 + ops.zeros(tuple(labels.shape) + (K,))


__all__ = ["GaussianMixture"]
