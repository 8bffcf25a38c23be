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


def logistic_intercept(x: torch.Tensor, y: torch.Tensor) -> None:
    """y_ij ~ Bernoulli(logit⁻¹(b_i + β x_ij)), b_i ~ N(μ, ω²); x, y are [N, T] (MISSO ``surrogate="bohning"``)."""
    n, t = y.shape
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    beta = pyro.param("beta", torch.tensor(0.0, dtype=y.dtype))
    with pyro.plate("unit", n, dim=-2):
        b = pyro.sample("b", dist.Normal(mu, omega))
        with pyro.plate("obs", t, dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=b + beta * x), obs=y)


# ----- models for the bad-input tests ------------------------------------------------------------------------
def no_latent(y: torch.Tensor) -> None:
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    with pyro.plate("unit", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).expand([y.shape[0]]).to_event(0), obs=y[:, 0])


def no_param(y: torch.Tensor) -> None:
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b, 1.0), obs=y)


def two_plates(y: torch.Tensor) -> None:
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    with pyro.plate("rows", y.shape[0], dim=-1):
        b = pyro.sample("b", dist.Normal(mu, 1.0))
    with pyro.plate("cols", y.shape[1], dim=-1):
        c = pyro.sample("c", dist.Normal(0.0, 1.0))
    with pyro.plate("r2", y.shape[0], dim=-2), pyro.plate("c2", y.shape[1], dim=-1):
        pyro.sample("y", dist.Normal(b[..., :, None] + c[..., None, :], 1.0), obs=y)


def nan_at_init(y: torch.Tensor) -> None:
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    noise = pyro.param("noise", torch.tensor(-1.0, dtype=y.dtype))  # unconstrained: a negative sd
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, 1.0))
        with pyro.plate("obs", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b, noise), obs=y)


def masked_intercept(y: torch.Tensor, mask: torch.Tensor) -> None:
    """Random intercept whose NaN observations are masked out (and zeroed)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, omega))
        with pyro.plate("obs", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b, 1.0).mask(mask), obs=torch.nan_to_num(y))


#: the NaN region of ``nan_tail``: b > NAN_LIMIT
NAN_LIMIT = 4.0


def nan_tail(y: torch.Tensor) -> None:
    """``random_intercept`` whose log-density is NaN for b > NAN_LIMIT (as a model evaluated out of its domain)."""
    n, t = y.shape
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", n, dim=-2):
        b = pyro.sample("b", dist.Normal(mu, omega))
        with pyro.plate("obs", t, dim=-1):
            loc = torch.where(b > NAN_LIMIT, torch.full_like(b, float("nan")), b)
            pyro.sample("y", dist.Normal(loc, sigma), obs=y)


def grouped_intercept(group: torch.Tensor, num_groups: int, y: torch.Tensor) -> None:
    """Rows reading their group's intercept through an index array, the rows' plate sized by ``group``."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("groups", num_groups):
        b = pyro.sample("b", dist.Normal(mu, omega))
    with pyro.plate("rows", len(group)):
        pyro.sample("y", dist.Normal(b[..., group], 1.0), obs=y)


def obs_mask_slope(t: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> None:
    """y_ij = b_i0 + b_i1 t_ij + ε_ij, b_i ~ N(μ, diag ω²), ε ~ N(0, σ²); only ``mask``'s entries observed (Pyro's
    ``obs_mask=``, which imputes the others as a site ``y_unobserved``); ``y`` may hold anything there, NaN included."""
    mu = pyro.param("mu", torch.zeros(2, dtype=y.dtype))
    omega = pyro.param("omega", torch.ones(2, dtype=y.dtype), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, omega).to_event(1))
        with pyro.plate("obs", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * t, sigma), obs=y, obs_mask=mask)


def masked_rows(group: torch.Tensor, x: torch.Tensor, num_groups: int, y: torch.Tensor, m: torch.Tensor,
                how: str = "obs_mask") -> None:
    """y_r = a_g(r) + β x_r + ε_r, a_j ~ N(μ, τ²), ε ~ N(0, σ²): rows outside the unit plate read through ``a[group]``
    (unbalanced groups), only ``m``'s rows observed: ``how`` = ``"obs_mask"`` (``obs=y, obs_mask=m``), ``"mask"``
    (``.mask(m)``) or ``"handler"`` (``poutine.mask``); ``y`` may hold NaN at the other rows."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    tau = pyro.param("tau", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    beta = pyro.param("beta", torch.tensor(0.0, dtype=y.dtype))
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("group", num_groups):
        a = pyro.sample("a", dist.Normal(mu, tau))
    with pyro.plate("rows", x.shape[0]):
        d = dist.Normal(a[group] + beta * x, sigma)
        if how == "obs_mask":
            pyro.sample("y", d, obs=y, obs_mask=m)
        elif how == "mask":
            pyro.sample("y", d.mask(m), obs=y)
        else:
            with pyro.poutine.mask(mask=m):
                pyro.sample("y", d, obs=y)


def missing_covariate(x: torch.Tensor, observed: torch.Tensor, y: torch.Tensor) -> None:
    """y_i ~ N(β x_i, 1) with the covariate x_i ~ N(μ, 1) observed where ``observed``: its imputed entries
    (``x_unobserved``) feed y's density, so they are latents."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    beta = pyro.param("beta", torch.tensor(0.0, dtype=y.dtype))
    with pyro.plate("unit", y.shape[0]):
        xi = pyro.sample("x", dist.Normal(mu, 1.0), obs=x, obs_mask=observed)
        pyro.sample("y", dist.Normal(beta * xi, 1.0), obs=y)


def missing_covariates(x: torch.Tensor, w: torch.Tensor, mx: torch.Tensor, mw: torch.Tensor, y: torch.Tensor) -> None:
    """A regression with two covariates missing in some rows, in the users' style: ``x ~ N(μx, σx)`` observed where
    ``mx``, ``w ~ LogNormal(μw, σw)`` (positive: its latent is ``log w``) observed where ``mw``, and
    ``y ~ N(a + b x + c log w, σ)``; the missing entries hold NaN."""
    mu_x = pyro.param("mu_x", torch.tensor(0.0, dtype=y.dtype))
    s_x = pyro.param("s_x", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    mu_w = pyro.param("mu_w", torch.tensor(0.0, dtype=y.dtype))
    s_w = pyro.param("s_w", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    a = pyro.param("a", torch.tensor(0.0, dtype=y.dtype))
    b = pyro.param("b", torch.tensor(0.0, dtype=y.dtype))
    c = pyro.param("c", torch.tensor(0.0, dtype=y.dtype))
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("rows", y.shape[0]):
        xi = pyro.sample("x", dist.Normal(mu_x, s_x), obs=x, obs_mask=mx)
        wi = pyro.sample("w", dist.LogNormal(mu_w, s_w), obs=w, obs_mask=mw)
        pyro.sample("y", dist.Normal(a + b * xi + c * torch.log(wi), sigma), obs=y)

def regression_missing_x(x1: torch.Tensor, x2: torch.Tensor, m1: torch.Tensor) -> None:
    """x2 ~ N(a + b x1, s2) with the covariate x1 ~ N(μ1, s1) observed where ``m1`` (NaN elsewhere): a user's
    bivariate normal in conditional form, the imputed x1 a latent of the rows that miss it."""
    mu1 = pyro.param("mu1", torch.tensor(0.0, dtype=x2.dtype))
    s1 = pyro.param("s1", torch.tensor(1.0, dtype=x2.dtype), constraint=constraints.positive)
    a = pyro.param("a", torch.tensor(0.0, dtype=x2.dtype))
    b = pyro.param("b", torch.tensor(0.0, dtype=x2.dtype))
    s2 = pyro.param("s2", torch.tensor(1.0, dtype=x2.dtype), constraint=constraints.positive)
    with pyro.plate("units", x2.shape[0]):
        v1 = pyro.sample("x1", dist.Normal(mu1, s1), obs=x1, obs_mask=m1)
        pyro.sample("x2", dist.Normal(a + b * v1, s2), obs=x2)

def group_covariate(group: torch.Tensor, x: torch.Tensor, num_groups: int, y: torch.Tensor | None = None) -> None:
    """y_r = a_g(r) + x_r + ε_r, a_j ~ N(μ, τ²): rows outside the unit plate; ``y=None`` leaves the data out."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    tau = pyro.param("tau", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("groups", num_groups):
        a = pyro.sample("a", dist.Normal(mu, tau))
    with pyro.plate("rows", len(x)):
        pyro.sample("y", dist.Normal(a[group] + x, 1.0), obs=y)


def poisson_latent(y: torch.Tensor) -> None:
    """A Poisson count per unit as the latent: discrete with an unbounded support (not enumerable)."""
    rate = pyro.param("rate", torch.tensor(2.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0]):
        k = pyro.sample("k", dist.Poisson(rate))
        pyro.sample("y", dist.Normal(k, 1.0), obs=y)


def grouped_intercept_f64(group: torch.Tensor, num_groups: int, y: torch.Tensor) -> None:
    """:func:`grouped_intercept` reading nothing of its data but its use as ``obs=`` (any container reaches ``y``)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=torch.float64))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("groups", num_groups):
        b = pyro.sample("b", dist.Normal(mu, omega))
    with pyro.plate("rows", len(group)):
        pyro.sample("y", dist.Normal(b[..., group], 1.0), obs=y)


def log_intercept(group: torch.Tensor, scale: torch.Tensor, num_groups: int, y: torch.Tensor) -> None:
    """y_r ~ N(log(scale_r a_g(r)), 0.5²), a_j ~ N(μ, ω²) with μ starting at 0.5: a prior draw of a_j below 0 (31 %)
    puts its unit outside the model's domain; ``scale_r = 0`` puts it there for every draw."""
    mu = pyro.param("mu", torch.tensor(0.5, dtype=torch.float64))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("groups", num_groups):
        a = pyro.sample("a", dist.Normal(mu, omega))
    with pyro.plate("rows", len(group)):
        pyro.sample("y", dist.Normal(torch.log(scale * a[..., group]), 0.5), obs=y)


def log_alpha(group: torch.Tensor, num_groups: int, y: torch.Tensor) -> None:
    """y_r ~ N(log a_g(r), σ²), a_j ~ N(μ, ω²), μ starting at 10: σ enters the likelihood, which is NaN at an a_j
    below 0 (outside the posterior's support, but inside the Gaussian prior's)."""
    mu = pyro.param("mu", torch.tensor(10.0, dtype=torch.float64))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("groups", num_groups):
        a = pyro.sample("a", dist.Normal(mu, omega))
    with pyro.plate("rows", len(group)):
        pyro.sample("y", dist.Normal(torch.log(a[..., group]), sigma), obs=y)


def label_mixture(y: torch.Tensor) -> None:
    """A two-component Poisson mixture: a finite (enumerable) Categorical label per unit, no config_enumerate."""
    w = pyro.param("weights", torch.ones(2, dtype=y.dtype) / 2, constraint=constraints.simplex)
    rates = pyro.param("rates", torch.tensor([1.0, 5.0], dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0]):
        z = pyro.sample("z", dist.Categorical(w))
        pyro.sample("y", dist.Poisson(rates[z]), obs=y)


def label_and_intercept(y: torch.Tensor) -> None:
    """A Categorical label and a Normal intercept per unit: a discrete and a continuous latent."""
    w = pyro.param("weights", torch.ones(2, dtype=y.dtype) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=y.dtype))
    with pyro.plate("unit", y.shape[0]):
        z = pyro.sample("z", dist.Categorical(w))
        a = pyro.sample("a", dist.Normal(locs[z], 1.0))
        pyro.sample("y", dist.Normal(a, 1.0), obs=y)
