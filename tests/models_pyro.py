"""Plain Pyro models shared by the tests (each written once)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def random_intercept(y: torch.Tensor) -> None:
    """y_ij = b_i + ε_ij, b_i ~ N(μ, ω²), ε ~ N(0, σ²); y is [N, T]."""
    n, t = y.shape
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", n, dim=-2):
        b = pyro.sample("b", dist.Normal(mu, omega))
        with pyro.plate("obs", t, dim=-1):
            pyro.sample("y", dist.Normal(b, sigma), obs=y)


def random_slope(t: torch.Tensor, y: torch.Tensor) -> None:
    """y_ij = b_i0 + b_i1 t_ij + ε_ij, b_i ~ N(μ, Ω) (full 2×2 Ω), ε ~ N(0, σ²)."""
    n, m = y.shape
    mu = pyro.param("mu", torch.zeros(2, dtype=y.dtype))
    cov = pyro.param("cov", torch.eye(2, dtype=y.dtype), constraint=constraints.positive_definite)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", n, dim=-2):
        b = pyro.sample("b", dist.MultivariateNormal(mu, covariance_matrix=cov))
        with pyro.plate("obs", m, dim=-1):
            pyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * t, sigma), obs=y)
