"""Known answers for the model gallery, computed with NumPy/SciPy only (nothing of latentfit).

* :func:`lmm_mle`: the exact maximum-likelihood estimate of a linear Gaussian mixed model, written per group
  as ``y_g ~ N(X_g β, Z_g Ω Z_gᵀ + diag(v_g))`` where ``v_g`` holds, for each observation, either a known
  variance or the variance σ_c² of its residual class c.  β is profiled out (generalised least squares), the
  variance parameters are maximised with ``scipy.optimize.minimize``.
* :func:`glmm_mle`: the maximum-likelihood estimate of a GLMM with one Gaussian random intercept per group
  (Poisson or Bernoulli rows), the integrals by adaptive Gauss–Hermite quadrature around each group's mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special


# ----- linear Gaussian mixed models -------------------------------------------------------------------
@dataclass
class Group:
    """One group: observations ``y [n]``, fixed-effect design ``X [n, p]``, random-effect design ``Z [n, q]``;
    ``resid [n]`` the residual class of each observation (an index into the σ² vector), or ``known_var [n]``."""

    y: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    resid: np.ndarray | None = None
    known_var: np.ndarray | None = None


def _omega(blocks: list[tuple[str, int]], v: np.ndarray) -> np.ndarray:
    """Ω from unconstrained values: per block, log-sds ("diag") or a log-diagonal Cholesky factor ("full")."""
    q = sum(k for _, k in blocks)
    omega = np.zeros((q, q))
    i = j = 0
    for kind, k in blocks:
        if kind == "diag":
            omega[i:i + k, i:i + k] = np.diag(np.exp(2.0 * v[j:j + k]))
            j += k
        else:
            chol = np.zeros((k, k))
            rows, cols = np.tril_indices(k)
            chol[rows, cols] = v[j:j + len(rows)]
            chol[np.diag_indices(k)] = np.exp(np.diag(chol))
            omega[i:i + k, i:i + k] = chol @ chol.T
            j += len(rows)
        i += k
    return omega


def _num_omega(blocks: list[tuple[str, int]]) -> int:
    return sum(k if kind == "diag" else k * (k + 1) // 2 for kind, k in blocks)


def _stack_by_size(groups: list[Group]) -> list[dict[str, np.ndarray]]:
    """Groups of equal size stacked into ``[B, n, ...]`` arrays (one batch per size)."""
    out = []
    for n in sorted({len(g.y) for g in groups}):
        gs = [g for g in groups if len(g.y) == n]
        batch = {"y": np.stack([g.y for g in gs]), "X": np.stack([g.X for g in gs]), "Z": np.stack([g.Z for g in gs])}
        if gs[0].known_var is not None:
            batch["known_var"] = np.stack([g.known_var for g in gs])
        else:
            batch["resid"] = np.stack([g.resid for g in gs])
        out.append(batch)
    return out


def _profile(batches: list[dict[str, np.ndarray]], omega: np.ndarray, sigma2: np.ndarray
             ) -> tuple[float, np.ndarray]:
    """Log-likelihood maximised over β (GLS) at given Ω, σ²; returns (value, β̂)."""
    parts = []
    xtx, xty = 0.0, 0.0
    for b in batches:
        v = b["known_var"] if "known_var" in b else sigma2[b["resid"]]
        cov = np.einsum("bnq,qr,bmr->bnm", b["Z"], omega, b["Z"]) + v[:, :, None] * np.eye(v.shape[1])
        chol = np.linalg.cholesky(cov)
        lx = np.linalg.solve(chol, b["X"])
        ly = np.linalg.solve(chol, b["y"][..., None])[..., 0]
        logdet = 2.0 * np.log(np.diagonal(chol, 0, -2, -1)).sum()
        parts.append((lx, ly, logdet, b["y"].size))
        xtx = xtx + np.einsum("bnp,bnr->pr", lx, lx)
        xty = xty + np.einsum("bnp,bn->p", lx, ly)
    beta = np.linalg.solve(xtx, xty)
    value = 0.0
    for lx, ly, logdet, n in parts:
        r = ly - lx @ beta
        value += -0.5 * (np.sum(r * r) + logdet + n * np.log(2.0 * np.pi))
    return value, beta


@dataclass
class LMMFit:
    beta: np.ndarray
    omega: np.ndarray
    sigma2: np.ndarray
    log_lik: float


def lmm_mle(groups: list[Group], omega_blocks: list[tuple[str, int]], num_resid: int = 1) -> LMMFit:
    """Exact ML estimate of a linear Gaussian mixed model (see the module docstring).

    ``omega_blocks``: the block-diagonal structure of Ω, e.g. ``[("diag", 1), ("full", 2)]``; ``num_resid``:
    the number of residual variances (0 when every group has ``known_var``).
    """
    batches = _stack_by_size(groups)
    k = _num_omega(omega_blocks)

    def negll(v: np.ndarray) -> float:
        omega = _omega(omega_blocks, v[:k])
        return -_profile(batches, omega, np.exp(2.0 * v[k:]))[0]

    x = np.zeros(k + num_resid)
    for method in ("BFGS", "Nelder-Mead", "BFGS"):  # BFGS, then polish without numerical gradients, then again
        opts = {"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000} if method == "Nelder-Mead" else {"gtol": 1e-9}
        x = optimize.minimize(negll, x, method=method, options=opts).x
    omega = _omega(omega_blocks, x[:k])
    sigma2 = np.exp(2.0 * x[k:])
    value, beta = _profile(batches, omega, sigma2)
    return LMMFit(beta, omega, sigma2, value)


# ----- GLMMs with one random intercept per group -------------------------------------------------------
FAMILIES = {
    # log p(y | η), d/dη, d²/dη²
    "poisson": (lambda y, eta: y * eta - np.exp(eta) - special.gammaln(y + 1.0),
                lambda y, eta: y - np.exp(eta), lambda y, eta: -np.exp(eta)),
    "bernoulli": (lambda y, eta: y * eta - np.logaddexp(0.0, eta),
                  lambda y, eta: y - special.expit(eta), lambda y, eta: -special.expit(eta) * special.expit(-eta)),
}


def glmm_log_lik(theta: np.ndarray, y: np.ndarray, group: np.ndarray, x: np.ndarray, num_groups: int,
                 family: str, num_nodes: int = 20) -> float:
    """``Σ_g log ∫ Π_{r in g} p(y_r | u + β x_r) N(u; μ, ω²) du`` by adaptive Gauss–Hermite quadrature;
    ``theta = (μ, log ω, β)``."""
    mu, omega, beta = theta[0], np.exp(theta[1]), theta[2]
    logp, d1, d2 = FAMILIES[family]
    u = np.full(num_groups, mu)
    for _ in range(50):  # Newton for each group's mode of log p(y_g | u) + log N(u; μ, ω²)
        eta = u[group] + beta * x
        g = np.bincount(group, d1(y, eta), num_groups) - (u - mu) / omega**2
        h = np.bincount(group, d2(y, eta), num_groups) - 1.0 / omega**2
        step = g / h
        u = u - step
        if np.max(np.abs(step)) < 1e-13:
            break
    eta = u[group] + beta * x
    sd = 1.0 / np.sqrt(-(np.bincount(group, d2(y, eta), num_groups) - 1.0 / omega**2))
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)  # ∫ f(t) exp(-t²/2) dt ≈ Σ w_k f(t_k)
    uk = u[:, None] + sd[:, None] * nodes[None, :]  # [G, K]
    eta = uk[group] + beta * x[:, None]  # [R, K]
    ll = np.zeros((num_groups, num_nodes))
    np.add.at(ll, group, logp(y[:, None], eta))
    lprior = -0.5 * ((uk - mu) / omega) ** 2 - np.log(omega) - 0.5 * np.log(2.0 * np.pi)
    terms = ll + lprior + 0.5 * nodes**2 + np.log(weights)
    return float(np.sum(special.logsumexp(terms, axis=1) + np.log(sd)))


def glmm_mle(y: np.ndarray, group: np.ndarray, x: np.ndarray, num_groups: int, family: str) -> dict[str, float]:
    """ML estimate of ``u_g ~ N(μ, ω²)``, ``y_r ~ family(η_r = u[group_r] + β x_r)``: ``{mu, omega, beta, log_lik}``."""

    def negll(t: np.ndarray) -> float:
        return -glmm_log_lik(t, y, group, x, num_groups, family)

    t = np.array([0.0, 0.0, 0.0])
    for method in ("BFGS", "Nelder-Mead", "BFGS"):
        opts = {"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000} if method == "Nelder-Mead" else {"gtol": 1e-8}
        t = optimize.minimize(negll, t, method=method, options=opts).x
    return {"mu": float(t[0]), "omega": float(np.exp(t[1])), "beta": float(t[2]), "log_lik": -float(negll(t))}
