"""Closed-form maximum-likelihood references (exact EM / balanced ANOVA formulas)."""

from __future__ import annotations

import numpy as np


def ml_random_intercept(y: np.ndarray) -> tuple[float, float, float]:
    """Exact ML of the balanced one-way random-effects model: (μ, ω², σ²)."""
    n, t = y.shape
    ybar = y.mean(1)
    s2 = ((y - ybar[:, None]) ** 2).sum() / (n * (t - 1))
    om2 = ((ybar - ybar.mean()) ** 2).mean() - s2 / t
    return float(ybar.mean()), float(om2), float(s2)


def em_random_slope(t: np.ndarray, y: np.ndarray, iters: int = 3000) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact EM (Gaussian E-step) for y_ij = b_i0 + b_i1 t_ij + ε_ij, b_i ~ N(μ, Ω): (μ, Ω, σ²)."""
    n, m = y.shape
    x = np.stack([np.ones_like(t), t], -1)
    xtx = np.einsum("ntk,ntl->nkl", x, x)
    xty = np.einsum("ntk,nt->nk", x, y)
    mu, cov, s2 = np.zeros(2), np.eye(2), 1.0
    for _ in range(iters):
        prior_prec = np.linalg.inv(cov)
        v = np.linalg.inv(prior_prec[None] + xtx / s2)
        mean = np.einsum("nkl,nl->nk", v, (prior_prec @ mu)[None] + xty / s2)
        mu = mean.mean(0)
        d = mean - mu
        cov = (d.T @ d + v.sum(0)) / n
        r = y - np.einsum("ntk,nk->nt", x, mean)
        s2 = ((r**2).sum() + np.einsum("ntk,nkl,ntl->", x, v, x)) / (n * m)
    return mu, cov, float(s2)
