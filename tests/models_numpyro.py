"""Plain NumPyro models shared by the tests: the twins of ``models_pyro.py`` (each written once per PPL)."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints


def random_intercept(y: jnp.ndarray) -> None:
    """y_ij = b_i + ε_ij, b_i ~ N(μ, ω²), ε ~ N(0, σ²); y is [N, T]."""
    n, t = y.shape
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", n, dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("obs", t, dim=-1):
            numpyro.sample("y", dist.Normal(b, sigma), obs=y)


def logistic_intercept(x: jnp.ndarray, y: jnp.ndarray) -> None:
    """y_ij ~ Bernoulli(logit⁻¹(b_i + β x_ij)), b_i ~ N(μ, ω²); x, y are [N, T] (MISSO ``surrogate="bohning"``)."""
    n, t = y.shape
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    beta = numpyro.param("beta", jnp.array(0.0, dtype=y.dtype))
    with numpyro.plate("unit", n, dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("obs", t, dim=-1):
            numpyro.sample("y", dist.Bernoulli(logits=b + beta * x), obs=y)


def random_slope(t: jnp.ndarray, y: jnp.ndarray) -> None:
    """y_ij = b_i0 + b_i1 t_ij + ε_ij, b_i ~ N(μ, Ω) (full 2×2 Ω), ε ~ N(0, σ²)."""
    n, m = y.shape
    mu = numpyro.param("mu", jnp.zeros(2, dtype=y.dtype))
    cov = numpyro.param("cov", jnp.eye(2, dtype=y.dtype), constraint=constraints.positive_definite)
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", n, dim=-2):
        b = numpyro.sample("b", dist.MultivariateNormal(mu, covariance_matrix=cov))
        with numpyro.plate("obs", m, dim=-1):
            numpyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * t, sigma), obs=y)


# ----- models for the bad-input tests ------------------------------------------------------------------------
def no_latent(y: jnp.ndarray) -> None:
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    with numpyro.plate("unit", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[:, 0])


def no_param(y: jnp.ndarray) -> None:
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(b, 1.0), obs=y)


def two_plates(y: jnp.ndarray) -> None:
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    with numpyro.plate("rows", y.shape[0], dim=-1):
        b = numpyro.sample("b", dist.Normal(mu, 1.0))
    with numpyro.plate("cols", y.shape[1], dim=-1):
        c = numpyro.sample("c", dist.Normal(0.0, 1.0))
    with numpyro.plate("r2", y.shape[0], dim=-2), numpyro.plate("c2", y.shape[1], dim=-1):
        numpyro.sample("y", dist.Normal(b[..., :, None] + c[..., None, :], 1.0), obs=y)


def nan_at_init(y: jnp.ndarray) -> None:
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    noise = numpyro.param("noise", jnp.array(-1.0, dtype=y.dtype))  # unconstrained: a negative sd
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, 1.0))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(b, noise), obs=y)


def masked_intercept(y: jnp.ndarray, mask: jnp.ndarray) -> None:
    """Random intercept whose NaN observations are masked out (and zeroed)."""
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(b, 1.0).mask(mask), obs=jnp.nan_to_num(y))


#: the NaN region of ``nan_tail``: b > NAN_LIMIT
NAN_LIMIT = 4.0


def nan_tail(y: jnp.ndarray) -> None:
    """``random_intercept`` whose log-density is NaN for b > NAN_LIMIT (as a model evaluated out of its domain)."""
    n, t = y.shape
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", n, dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("obs", t, dim=-1):
            numpyro.sample("y", dist.Normal(jnp.where(b > NAN_LIMIT, jnp.nan, b), sigma), obs=y)


def grouped_intercept(group: jnp.ndarray, num_groups: int, y: jnp.ndarray) -> None:
    """Rows reading their group's intercept through an index array, the rows' plate sized by ``group``."""
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        b = numpyro.sample("b", dist.Normal(mu, omega))
    with numpyro.plate("rows", len(group)):
        numpyro.sample("y", dist.Normal(b[..., group], 1.0), obs=y)


def obs_mask_slope(t: jnp.ndarray, mask: jnp.ndarray, y: jnp.ndarray) -> None:
    """y_ij = b_i0 + b_i1 t_ij + ε_ij, b_i ~ N(μ, diag ω²), ε ~ N(0, σ²); only ``mask``'s entries observed (NumPyro's
    ``obs_mask=``, which imputes the others as a site ``y_unobserved``); ``y`` may hold anything there, NaN included."""
    mu = numpyro.param("mu", jnp.zeros(2, dtype=y.dtype))
    omega = numpyro.param("omega", jnp.ones(2, dtype=y.dtype), constraint=constraints.positive)
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega).to_event(1))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(b[..., 0] + b[..., 1] * t, sigma), obs=y, obs_mask=mask)


def masked_rows(group: jnp.ndarray, x: jnp.ndarray, num_groups: int, y: jnp.ndarray, m: jnp.ndarray,
                how: str = "obs_mask") -> None:
    """y_r = a_g(r) + β x_r + ε_r, a_j ~ N(μ, τ²), ε ~ N(0, σ²): rows outside the unit plate read through ``a[group]``
    (unbalanced groups), only ``m``'s rows observed: ``how`` = ``"obs_mask"`` (``obs=y, obs_mask=m``), ``"mask"``
    (``.mask(m)``) or ``"handler"`` (``handlers.mask``); ``y`` may hold NaN at the other rows."""
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    tau = numpyro.param("tau", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    beta = numpyro.param("beta", jnp.array(0.0, dtype=y.dtype))
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("group", num_groups):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    with numpyro.plate("rows", x.shape[0]):
        d = dist.Normal(a[group] + beta * x, sigma)
        if how == "obs_mask":
            numpyro.sample("y", d, obs=y, obs_mask=m)
        elif how == "mask":
            numpyro.sample("y", d.mask(m), obs=y)
        else:
            with numpyro.handlers.mask(mask=m):
                numpyro.sample("y", d, obs=y)


def missing_covariate(x: jnp.ndarray, observed: jnp.ndarray, y: jnp.ndarray) -> None:
    """y_i ~ N(β x_i, 1) with the covariate x_i ~ N(μ, 1) observed where ``observed``: its imputed entries
    (``x_unobserved``) feed y's density, so they are latents."""
    mu = numpyro.param("mu", jnp.array(0.0, dtype=y.dtype))
    beta = numpyro.param("beta", jnp.array(0.0, dtype=y.dtype))
    with numpyro.plate("unit", y.shape[0]):
        xi = numpyro.sample("x", dist.Normal(mu, 1.0), obs=x, obs_mask=observed)
        numpyro.sample("y", dist.Normal(beta * xi, 1.0), obs=y)


def missing_covariates(x: jnp.ndarray, w: jnp.ndarray, mx: jnp.ndarray, mw: jnp.ndarray, y: jnp.ndarray) -> None:
    """A regression with two covariates missing in some rows, in the users' style: ``x ~ N(μx, σx)`` observed where
    ``mx``, ``w ~ LogNormal(μw, σw)`` (positive: its latent is ``log w``) observed where ``mw``, and
    ``y ~ N(a + b x + c log w, σ)``; the missing entries hold NaN."""
    mu_x = numpyro.param("mu_x", jnp.array(0.0, dtype=y.dtype))
    s_x = numpyro.param("s_x", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    mu_w = numpyro.param("mu_w", jnp.array(0.0, dtype=y.dtype))
    s_w = numpyro.param("s_w", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    a = numpyro.param("a", jnp.array(0.0, dtype=y.dtype))
    b = numpyro.param("b", jnp.array(0.0, dtype=y.dtype))
    c = numpyro.param("c", jnp.array(0.0, dtype=y.dtype))
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("rows", y.shape[0]):
        xi = numpyro.sample("x", dist.Normal(mu_x, s_x), obs=x, obs_mask=mx)
        wi = numpyro.sample("w", dist.LogNormal(mu_w, s_w), obs=w, obs_mask=mw)
        numpyro.sample("y", dist.Normal(a + b * xi + c * jnp.log(wi), sigma), obs=y)

def regression_missing_x(x1: jnp.ndarray, x2: jnp.ndarray, m1: jnp.ndarray) -> None:
    """x2 ~ N(a + b x1, s2) with the covariate x1 ~ N(μ1, s1) observed where ``m1`` (NaN elsewhere): a user's
    bivariate normal in conditional form, the imputed x1 a latent of the rows that miss it."""
    mu1 = numpyro.param("mu1", jnp.array(0.0, dtype=x2.dtype))
    s1 = numpyro.param("s1", jnp.array(1.0, dtype=x2.dtype), constraint=constraints.positive)
    a = numpyro.param("a", jnp.array(0.0, dtype=x2.dtype))
    b = numpyro.param("b", jnp.array(0.0, dtype=x2.dtype))
    s2 = numpyro.param("s2", jnp.array(1.0, dtype=x2.dtype), constraint=constraints.positive)
    with numpyro.plate("units", x2.shape[0]):
        v1 = numpyro.sample("x1", dist.Normal(mu1, s1), obs=x1, obs_mask=m1)
        numpyro.sample("x2", dist.Normal(a + b * v1, s2), obs=x2)

def group_covariate(group: jnp.ndarray, x: jnp.ndarray, num_groups: int, y: jnp.ndarray | None = None) -> None:
    """y_r = a_g(r) + x_r + ε_r, a_j ~ N(μ, τ²): rows outside the unit plate; ``y=None`` leaves the data out."""
    mu = numpyro.param("mu", jnp.array(0.0, dtype=x.dtype))
    tau = numpyro.param("tau", jnp.array(1.0, dtype=x.dtype), constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    with numpyro.plate("rows", len(x)):
        numpyro.sample("y", dist.Normal(a[group] + x, 1.0), obs=y)


def poisson_latent(y: jnp.ndarray) -> None:
    """A Poisson count per unit as the latent: discrete with an unbounded support (not enumerable)."""
    rate = numpyro.param("rate", jnp.array(2.0, dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0]):
        k = numpyro.sample("k", dist.Poisson(rate))
        numpyro.sample("y", dist.Normal(k, 1.0), obs=y)


def grouped_intercept_f64(group: jnp.ndarray, num_groups: int, y: jnp.ndarray) -> None:
    """:func:`grouped_intercept` reading nothing of its data but its use as ``obs=`` (any container reaches ``y``)."""
    mu = numpyro.param("mu", jnp.array(0.0, dtype=jnp.float64))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=jnp.float64), constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        b = numpyro.sample("b", dist.Normal(mu, omega))
    with numpyro.plate("rows", len(group)):
        numpyro.sample("y", dist.Normal(b[..., group], 1.0), obs=y)


def log_intercept(group: jnp.ndarray, scale: jnp.ndarray, num_groups: int, y: jnp.ndarray) -> None:
    """y_r ~ N(log(scale_r a_g(r)), 0.5²), a_j ~ N(μ, ω²) with μ starting at 0.5: a prior draw of a_j below 0 (31 %)
    puts its unit outside the model's domain; ``scale_r = 0`` puts it there for every draw."""
    mu = numpyro.param("mu", jnp.array(0.5, dtype=jnp.float64))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=jnp.float64), constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(mu, omega))
    with numpyro.plate("rows", len(group)):
        numpyro.sample("y", dist.Normal(jnp.log(scale * a[..., group]), 0.5), obs=y)


def log_alpha(group: jnp.ndarray, num_groups: int, y: jnp.ndarray) -> None:
    """y_r ~ N(log a_g(r), σ²), a_j ~ N(μ, ω²), μ starting at 10: σ enters the likelihood, which is NaN at an a_j
    below 0 (outside the posterior's support, but inside the Gaussian prior's)."""
    mu = numpyro.param("mu", jnp.array(10.0, dtype=jnp.float64))
    omega = numpyro.param("omega", jnp.array(1.0, dtype=jnp.float64), constraint=constraints.positive)
    sigma = numpyro.param("sigma", jnp.array(1.0, dtype=jnp.float64), constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(mu, omega))
    with numpyro.plate("rows", len(group)):
        numpyro.sample("y", dist.Normal(jnp.log(a[..., group]), sigma), obs=y)


def label_mixture(y: jnp.ndarray) -> None:
    """A two-component Poisson mixture: a finite (enumerable) Categorical label per unit, no enumerate marking."""
    w = numpyro.param("weights", jnp.ones(2, dtype=y.dtype) / 2, constraint=constraints.simplex)
    rates = numpyro.param("rates", jnp.array([1.0, 5.0], dtype=y.dtype), constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Poisson(rates[z]), obs=y)


def label_and_intercept(y: jnp.ndarray) -> None:
    """A Categorical label and a Normal intercept per unit: a discrete and a continuous latent."""
    w = numpyro.param("weights", jnp.ones(2, dtype=y.dtype) / 2, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.array([-1.0, 1.0], dtype=y.dtype))
    with numpyro.plate("unit", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        a = numpyro.sample("a", dist.Normal(locs[z], 1.0))
        numpyro.sample("y", dist.Normal(a, 1.0), obs=y)
