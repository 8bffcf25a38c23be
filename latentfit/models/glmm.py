"""Logistic families as ordinary Pyro / NumPyro model functions, with simulators.

* :func:`logistic_mixed_model`: the logistic mixed model (GLMM) with random intercepts and slopes,
  ``η_g ~ N(0, diag ω²)`` (or ``N(0, Ω)``), ``y_r ~ Bernoulli(σ(X_r β + Z_r η_{group_r}))`` (or Binomial);
* :func:`missing_logistic_model`: logistic regression with missing Gaussian covariates (Jiang et al.'s
  misaem; Karimi et al., MISSO, §7), ``x_i ~ N(β, Ω)``, ``y_i ~ Bernoulli(σ(δ₀ + δᵀx_i))``, NaN entries of the
  covariate matrix (MCAR) the latents; :func:`missing_logistic_log_lik` is its exact observed-data
  log-likelihood (NumPy/SciPy reference) and :func:`missing_logistic_mle` the maximiser of it.

Each builder returns ``(model, args)``: an ordinary model function of the chosen PPL and its arguments as that
PPL's arrays, so that any engine fits it, ``SAEM(model).run(*args)`` (``latentfit.pyro``) or
``SAEM(model).run(key, *args)`` (``latentfit.numpyro``); MCMCSGD and MISSO alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from latentfit import _hooks
from latentfit.inference.model import DataError

BACKENDS = ("pyro", "numpyro")


def _ppl(backend: str) -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'pyro' or 'numpyro', got {backend!r}")
    fam = _hooks.module("families")
    return fam.pyro_ppl() if backend == "pyro" else fam.numpyro_ppl()


def _arrays(ppl: Any, floats: dict[str, Any], ints: dict[str, Any]) -> dict[str, Any]:
    """NumPy values as the PPL's arrays: floats in float64 (JAX: its default float width), ints as int64."""
    xp = ppl.xp
    out = {k: xp.asarray(np.asarray(v, dtype=np.float64)) for k, v in floats.items()}
    out.update({k: xp.asarray(np.asarray(v, dtype=np.int64)) for k, v in ints.items()})
    return out


def _glm_start(y: np.ndarray, X: np.ndarray, trials: np.ndarray, offset: np.ndarray | None = None,
               num_steps: int = 25) -> np.ndarray:
    """Logistic-regression ML estimate (Newton, ridge 1e-6) of ``y ~ Binomial(trials, σ(Xβ))``: starting values."""
    beta = np.zeros(X.shape[1])
    off = np.zeros(len(y)) if offset is None else offset
    for _ in range(num_steps):
        mu = trials / (1.0 + np.exp(-(X @ beta + off)))
        w = mu * (1.0 - mu / trials)
        H = X.T @ (w[:, None] * X) + 1e-6 * np.eye(X.shape[1])
        step = np.linalg.solve(H, X.T @ (y - mu))
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


# ----- logistic mixed model ----------------------------------------------------------------------------------
def logistic_mixed_model(y: Any, X: Any, Z: Any, group: Any, num_groups: int | None = None, *,
                         trials: Any = None, covariance: str = "diag", beta: Any = None, omega: Any = None,
                         backend: str = "pyro") -> tuple[Callable[..., None], tuple]:
    """The logistic mixed model as an ordinary Pyro / NumPyro model function, and its arguments.

    ``η_g ~ N(0, diag ω²)`` (``covariance="full"``: ``N(0, Ω)``) for groups g = 0..G−1,
    ``y_r ~ Bernoulli(logits = X_r β + Z_r η_{group_r})`` for rows r (``Binomial(trials_r, ·)`` with ``trials``).

    Parameters
    ----------
    y : ``[R]`` 0/1 outcomes (counts out of ``trials``)
    X, Z : ``[R, p]`` fixed-effect and ``[R, q]`` random-effect designs (include the intercept columns)
    group : ``[R]`` integer group of each row, in ``0..num_groups−1``
    covariance : ``"diag"`` (params ``beta``, ``omega``: the random-effect sds) or ``"full"`` (``beta``, ``Omega``)
    beta, omega : initial values (default: the logistic-regression fit without random effects; ω = 0.5, Ω = 0.25 I)
    backend : ``"pyro"`` or ``"numpyro"``

    Returns ``(model, args)``, ``args = (y, X, Z, group, num_groups)`` (``+ (trials,)``) as the PPL's arrays;
    ``model(*args)`` is the model.
    """
    if covariance not in ("diag", "full"):
        raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
    y_np, X_np, Z_np = (np.asarray(a, dtype=float) for a in (y, X, Z))
    g_np = np.asarray(group)
    if y_np.ndim != 1 or X_np.ndim != 2 or Z_np.ndim != 2 or g_np.ndim != 1:
        raise DataError(f"y [R], X [R, p], Z [R, q], group [R] expected; got {y_np.shape}, {X_np.shape}, "
                        f"{Z_np.shape}, {g_np.shape}")
    R = len(y_np)
    if not (X_np.shape[0] == Z_np.shape[0] == len(g_np) == R) or R == 0:
        raise DataError(f"y, X, Z and group must have the same (non-zero) number of rows; got {y_np.shape}, "
                        f"{X_np.shape}, {Z_np.shape}, {g_np.shape}")
    if not np.issubdtype(g_np.dtype, np.integer):
        if not np.all(g_np == np.round(g_np)):
            raise DataError("group must hold integer group indices")
        g_np = g_np.astype(np.int64)
    G = int(g_np.max()) + 1 if num_groups is None else int(num_groups)
    if g_np.min() < 0 or g_np.max() >= G:
        raise DataError(f"group indices must lie in 0..{G - 1}")
    n_np = np.ones(R) if trials is None else np.asarray(trials, dtype=float)
    if not all(np.all(np.isfinite(a)) for a in (y_np, X_np, Z_np, n_np)):
        raise DataError("y, X, Z and trials must be finite")
    if np.any(y_np < 0) or np.any(y_np > n_np) or np.any(y_np != np.round(y_np)):
        raise DataError("y must hold integer counts in 0..trials (0/1 without trials)")
    q = Z_np.shape[1]
    ppl = _ppl(backend)
    beta0 = _glm_start(y_np, X_np, n_np) if beta is None else np.asarray(beta, dtype=float)
    init_np: dict[str, Any] = {"beta": beta0}
    if covariance == "full":
        init_np["Omega"] = 0.25 * np.eye(q) if omega is None else np.asarray(omega, dtype=float)
    else:
        init_np["omega"] = 0.5 * np.ones(q) if omega is None else np.broadcast_to(np.asarray(omega, float), (q,))
    init = _arrays(ppl, init_np, {})
    fns = _hooks.module("glmm_families")
    model = fns.logistic_mixed_model_fn(ppl, init, covariance)
    a = _arrays(ppl, {"y": y_np, "X": X_np, "Z": Z_np, "trials": n_np}, {"group": g_np})
    args = (a["y"], a["X"], a["Z"], a["group"], G) + (() if trials is None else (a["trials"],))
    return model, args


def simulate_logistic_mixed(num_individuals: int = 1000, num_obs: int = 20, beta: Any = (-4.0, -0.5, 1.0),
                            omega: Any = (0.3, 0.2, 0.2), covariate_sd: float = 2.0, seed: int = 0
                            ) -> dict[str, Any]:
    """Simulate the logistic mixed model with random intercept and slopes on every covariate.

    Design (after the logistic mixed model of Karimi et al.): N = ``num_individuals`` individuals with
    n_i = ``num_obs`` observations each; ``X_ij = Z_ij = (1, x_ij1, …)`` with ``x_ijk ~ N(0, covariate_sd²)``
    iid (p = len(β)); ``η_i ~ N(0, diag ω²)``; ``y_ij ~ Bernoulli(σ(X_ij (β + η_i)))``.  With the defaults
    (β = (−4, −0.5, 1), ω = (0.3, 0.2, 0.2), sd 2) the linear predictor has sd ≈ 2.3 around −4 and about 10% of
    the outcomes are events (≈ 2000 events in 20000 rows, two per individual); with covariate sd 1 the rate
    falls to ≈ 4% and the small ω are hardly identified.

    Returns a dict with ``y [R]``, ``X [R, p]``, ``Z [R, p]`` (= X), ``group [R]``, ``num_groups``, the truth
    ``beta``, ``omega`` and the drawn random effects ``eta [N, p]``.
    """
    rng = np.random.default_rng(seed)
    beta_np, omega_np = np.asarray(beta, dtype=float), np.asarray(omega, dtype=float)
    p = len(beta_np)
    if omega_np.shape != (p,):
        raise ValueError(f"omega must have one sd per coefficient ({p}), got {omega_np.shape}")
    R = num_individuals * num_obs
    group = np.repeat(np.arange(num_individuals), num_obs)
    X = np.concatenate([np.ones((R, 1)), covariate_sd * rng.standard_normal((R, p - 1))], axis=1)
    eta = omega_np * rng.standard_normal((num_individuals, p))
    logits = X @ beta_np + (X * eta[group]).sum(-1)
    y = (rng.random(R) < 1.0 / (1.0 + np.exp(-logits))).astype(float)
    return {"y": y, "X": X, "Z": X.copy(), "group": group, "num_groups": num_individuals, "beta": beta_np,
            "omega": omega_np, "eta": eta}


# ----- logistic regression with missing covariates ----------------------------------------------------------
def missing_logistic_model(X: Any, y: Any, *, delta0: float | None = None, delta: Any = None, beta: Any = None,
                           Omega: Any = None, backend: str = "pyro") -> tuple[Callable[..., None], tuple]:
    """Logistic regression with missing Gaussian covariates as an ordinary Pyro / NumPyro model function.

    ``x_i = (x_i,mis, x_i,obs) ~ N(β, Ω)`` (p covariates, Ω full), ``y_i | x_i ~ Bernoulli(σ(δ₀ + δᵀx_i))``;
    θ = (δ₀, δ, β, Ω) as params ``delta0``, ``delta``, ``beta``, ``Omega``; the NaN entries of ``X`` (missing
    completely at random) are the latents (sites ``x{j}_unobserved``, one per covariate, see
    :func:`latentfit.integrations.glmm_families.missing_logistic_model_fn`).

    Initial values (default): β and Ω the available-case means and covariance (Ω regularised to be positive
    definite), (δ₀, δ) the logistic fit on mean-imputed covariates.  Returns ``(model, (X, y))``.
    """
    X_np, y_np = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    if X_np.ndim != 2 or y_np.ndim != 1 or X_np.shape[0] != y_np.shape[0] or len(y_np) == 0:
        raise DataError(f"X [N, p] and y [N] expected; got {X_np.shape}, {y_np.shape}")
    if np.any(np.isinf(X_np)) or not np.all(np.isin(y_np, (0.0, 1.0))):
        raise DataError("X must be finite or NaN (missing) and y must hold 0/1")
    obs = ~np.isnan(X_np)
    if np.any(obs.sum(0) < 2):
        raise DataError("every covariate needs at least two observed values")
    p = X_np.shape[1]
    mean = np.nanmean(X_np, 0)
    Xc = np.where(obs, X_np - mean, 0.0)
    cnt = obs.T.astype(float) @ obs.astype(float)
    cov = (Xc.T @ Xc) / np.maximum(cnt, 1.0)
    lam = np.linalg.eigvalsh(0.5 * (cov + cov.T))
    cov = 0.5 * (cov + cov.T) + max(0.0, 1e-3 * np.mean(np.diag(cov)) - lam.min()) * np.eye(p)
    d_start = _glm_start(y_np, np.concatenate([np.ones((len(y_np), 1)), np.where(obs, X_np, mean)], 1),
                         np.ones(len(y_np)))
    init_np = {"delta0": np.asarray(d_start[0] if delta0 is None else delta0, dtype=float),
               "delta": d_start[1:] if delta is None else np.asarray(delta, dtype=float),
               "beta": mean if beta is None else np.asarray(beta, dtype=float),
               "Omega": cov if Omega is None else np.asarray(Omega, dtype=float)}
    ppl = _ppl(backend)
    init = _arrays(ppl, init_np, {})
    fns = _hooks.module("glmm_families")
    model = fns.missing_logistic_model_fn(ppl, init)
    a = _arrays(ppl, {"X": X_np, "y": y_np}, {})
    return model, (a["X"], a["y"])


def simulate_missing_logistic(N: int = 1000, p: int = 3, beta: Any = None, Omega: Any = None,
                              delta0: float = 0.0, delta: Any = (1.0, 1.0, 0.0), missing: float = 0.1,
                              seed: int = 0) -> dict[str, Any]:
    """Simulate the synthetic study of MISSO §7 (after Jiang et al., misaem).

    ``x_i ~ N(β, Ω)`` (default β = 0, Ω = the AR(1) correlation 0.5^|j−k|), ``y_i ~ Bernoulli(σ(δ₀ + δᵀx_i))``
    with (δ₀; δ) = (0; 1, 1, 0), then each covariate entry is deleted (NaN) independently with probability
    ``missing`` (MCAR).  Returns ``X`` (with NaN), ``X_full``, ``y`` and the truth ``beta``, ``Omega``,
    ``delta0``, ``delta``.
    """
    rng = np.random.default_rng(seed)
    beta_np = np.zeros(p) if beta is None else np.asarray(beta, dtype=float)
    idx = np.arange(p)
    Omega_np = 0.5 ** np.abs(idx[:, None] - idx[None, :]) if Omega is None else np.asarray(Omega, dtype=float)
    delta_np = np.asarray(delta, dtype=float)
    if beta_np.shape != (p,) or Omega_np.shape != (p, p) or delta_np.shape != (p,):
        raise ValueError(f"beta, delta must be ({p},) and Omega ({p}, {p})")
    X_full = beta_np + rng.standard_normal((N, p)) @ np.linalg.cholesky(Omega_np).T
    y = (rng.random(N) < 1.0 / (1.0 + np.exp(-(delta0 + X_full @ delta_np)))).astype(float)
    X = np.where(rng.random((N, p)) < missing, np.nan, X_full)
    return {"X": X, "X_full": X_full, "y": y, "beta": beta_np, "Omega": Omega_np, "delta0": float(delta0),
            "delta": delta_np}


def missing_logistic_log_lik(X: Any, y: Any, delta0: float, delta: Any, beta: Any, Omega: Any,
                             num_nodes: int = 100) -> float:
    """Exact observed-data log-likelihood of :func:`missing_logistic_model` (NumPy/SciPy reference).

    ``ℓ(θ) = Σ_i [log N(x_i,obs; β_o, Ω_oo) + log ∫ p(y_i | t) N(t; m_i, v_i) dt]``: given x_i,obs the missing
    block is Gaussian, ``x_mis ~ N(β_m + Ω_mo Ω_oo⁻¹(x_obs − β_o), Ω_mm − Ω_mo Ω_oo⁻¹ Ω_om)`` (Schur complement), so the
    linear predictor ``t = δ₀ + δᵀx_i`` is ``N(m_i, v_i)`` and the Bernoulli integral is one-dimensional; it is
    computed by Gauss–Hermite with ``num_nodes`` nodes (exact to ~1e-10 at 100 nodes for |δ|, Ω of order one).
    Complete rows contribute their complete-data log-likelihood (v_i = 0). Rows are grouped by missingness
    pattern, so the cost is one linear solve per pattern.
    """
    from scipy import special, stats

    X_np, y_np = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    delta_np, beta_np, Omega_np = (np.asarray(a, dtype=float) for a in (delta, beta, Omega))
    if X_np.ndim != 2 or y_np.shape != (X_np.shape[0],):
        raise DataError(f"X [N, p] and y [N] expected; got {X_np.shape}, {y_np.shape}")
    p = X_np.shape[1]
    if delta_np.shape != (p,) or beta_np.shape != (p,) or Omega_np.shape != (p, p):
        raise ValueError(f"delta, beta must be ({p},) and Omega ({p}, {p}); got {delta_np.shape}, "
                         f"{beta_np.shape}, {Omega_np.shape}")
    miss = np.isnan(X_np)
    nodes, weights = np.polynomial.hermite_e.hermegauss(int(num_nodes))
    logw = np.log(weights / np.sqrt(2.0 * np.pi))
    total = 0.0
    for pattern in np.unique(miss, axis=0):
        rows = np.all(miss == pattern, axis=1)
        o, m = ~pattern, pattern
        xo = X_np[rows][:, o]
        if o.any():
            total += float(np.sum(stats.multivariate_normal(beta_np[o], Omega_np[np.ix_(o, o)]).logpdf(xo)))
        t_mean = float(delta0) + xo @ delta_np[o]
        if m.any():
            if o.any():
                A = np.linalg.solve(Omega_np[np.ix_(o, o)], Omega_np[np.ix_(o, m)])  # [o, m]
                mu_m = beta_np[m] + (xo - beta_np[o]) @ A
                S = Omega_np[np.ix_(m, m)] - Omega_np[np.ix_(m, o)] @ A
            else:
                mu_m, S = np.broadcast_to(beta_np[m], (int(rows.sum()), int(m.sum()))), Omega_np[np.ix_(m, m)]
            t_mean = t_mean + mu_m @ delta_np[m]
            t_sd = np.sqrt(max(float(delta_np[m] @ S @ delta_np[m]), 0.0))
            t = t_mean[:, None] + t_sd * nodes[None, :]
            yy = y_np[rows][:, None]
            total += float(np.sum(special.logsumexp(yy * t - np.logaddexp(0.0, t) + logw, axis=1)))
        else:
            total += float(np.sum(y_np[rows] * t_mean - np.logaddexp(0.0, t_mean)))
    return total


def _unpack_missing(v: np.ndarray, p: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(δ₀, δ, β, log-Cholesky of Ω) → (δ₀, δ, β, Ω)."""
    L = np.zeros((p, p))
    L[np.tril_indices(p)] = v[1 + 2 * p:]
    L[np.diag_indices(p)] = np.exp(np.diag(L))
    return float(v[0]), v[1:1 + p], v[1 + p:1 + 2 * p], L @ L.T


def missing_logistic_mle(X: Any, y: Any, *, start: dict[str, Any] | None = None, num_nodes: int = 100,
                         gtol: float = 1e-6) -> dict[str, Any]:
    """Maximiser of :func:`missing_logistic_log_lik`: BFGS on (δ₀, δ, β, log-Cholesky of Ω), central-difference
    gradients (forward differences stall BFGS near the optimum).

    ``start`` (optional) maps ``delta0``, ``delta``, ``beta``, ``Omega`` to starting values; by default those of
    :func:`missing_logistic_model` (available-case moments, logistic fit on mean-imputed covariates). Returns
    ``delta0``, ``delta``, ``beta``, ``Omega``, ``log_lik``, ``grad_max`` (largest |∂ℓ/∂v| at the end, the check
    that it is a stationary point), ``success`` and ``nit``.
    """
    from scipy import optimize

    X_np, y_np = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    if X_np.ndim != 2 or y_np.shape != (X_np.shape[0],):
        raise DataError(f"X [N, p] and y [N] expected; got {X_np.shape}, {y_np.shape}")
    p = X_np.shape[1]
    if start is None:
        obs = ~np.isnan(X_np)
        mean = np.nanmean(X_np, 0)
        Xc = np.where(obs, X_np - mean, 0.0)
        cov = (Xc.T @ Xc) / np.maximum(obs.T.astype(float) @ obs.astype(float), 1.0)
        cov = 0.5 * (cov + cov.T)
        cov = cov + max(0.0, 1e-3 * np.mean(np.diag(cov)) - np.linalg.eigvalsh(cov).min()) * np.eye(p)
        d0 = _glm_start(y_np, np.concatenate([np.ones((len(y_np), 1)), np.where(obs, X_np, mean)], 1),
                        np.ones(len(y_np)))
        start = {"delta0": d0[0], "delta": d0[1:], "beta": mean, "Omega": cov}
    L0 = np.linalg.cholesky(np.asarray(start["Omega"], dtype=float))
    L0[np.diag_indices(p)] = np.log(np.diag(L0))
    v0 = np.concatenate([np.ravel(np.asarray(start["delta0"], dtype=float))[:1],
                         np.asarray(start["delta"], dtype=float), np.asarray(start["beta"], dtype=float),
                         L0[np.tril_indices(p)]])

    def negll(v: np.ndarray) -> float:
        return -missing_logistic_log_lik(X_np, y_np, *_unpack_missing(v, p), num_nodes=num_nodes)

    def grad(v: np.ndarray, h: float = 1e-5) -> np.ndarray:
        return np.array([(negll(v + e) - negll(v - e)) / (2 * h) for e in h * np.eye(len(v))])

    res = optimize.minimize(negll, v0, jac=grad, method="BFGS", options={"gtol": gtol, "maxiter": 5000})
    delta0, delta, beta, Omega = _unpack_missing(res.x, p)
    return {"delta0": delta0, "delta": delta, "beta": beta, "Omega": Omega, "log_lik": -float(res.fun),
            "grad_max": float(np.max(np.abs(grad(res.x)))), "success": bool(res.success), "nit": int(res.nit)}


__all__ = ["logistic_mixed_model", "missing_logistic_log_lik", "missing_logistic_mle", "missing_logistic_model",
           "simulate_logistic_mixed", "simulate_missing_logistic"]
