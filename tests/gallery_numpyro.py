"""The model gallery (issue 10), NumPyro side: the twins of ``gallery_pyro.py`` in NumPyro's own style.

Same names, arguments and parameters as the Pyro models; ``numpyro.param`` for the parameters, plates
with ``dim=None`` or explicit dims, ``x[:, 0]`` / ``x[:, None]`` indexing, ``.to_event(1)``,
``.mask(...)`` and ``obs_mask=``, group latents read through an index array (``alpha[county]``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints


def many_schools(sigma, y=None):
    """Eight schools with many schools: theta_j ~ N(mu, tau²), y_j ~ N(theta_j, sigma_j²), sigma_j known."""
    mu = numpyro.param("mu", 0.0)
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    with numpyro.plate("schools", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def radon_intercept(county, floor, num_counties, log_radon=None):
    """Radon, varying intercept: alpha_c ~ N(mu_a, sigma_a²), y_r ~ N(alpha[county_r] + beta floor_r, sigma_y²)."""
    mu_a = numpyro.param("mu_a", 0.0)
    sigma_a = numpyro.param("sigma_a", 1.0, constraint=constraints.positive)
    beta = numpyro.param("beta", 0.0)
    sigma_y = numpyro.param("sigma_y", 1.0, constraint=constraints.positive)
    with numpyro.plate("county", num_counties):
        alpha = numpyro.sample("alpha", dist.Normal(mu_a, sigma_a))
    with numpyro.plate("data", len(floor)):
        mean = alpha[county] + beta * floor
        numpyro.sample("obs", dist.Normal(mean, sigma_y), obs=log_radon)


def radon_slope(county, floor, num_counties, log_radon=None):
    """Radon, varying intercept and slope (two latent sites in the county plate)."""
    mu_a = numpyro.param("mu_a", 0.0)
    sigma_a = numpyro.param("sigma_a", 1.0, constraint=constraints.positive)
    mu_b = numpyro.param("mu_b", 0.0)
    sigma_b = numpyro.param("sigma_b", 1.0, constraint=constraints.positive)
    sigma_y = numpyro.param("sigma_y", 1.0, constraint=constraints.positive)
    with numpyro.plate("county", num_counties):
        alpha = numpyro.sample("alpha", dist.Normal(mu_a, sigma_a))
        beta = numpyro.sample("beta", dist.Normal(mu_b, sigma_b))
    with numpyro.plate("data", len(floor)):
        mean = alpha[county] + beta[county] * floor
        numpyro.sample("obs", dist.Normal(mean, sigma_y), obs=log_radon)


def mvn_slope(subject, x, num_subjects, y=None):
    """Random intercept and slope with a correlated MultivariateNormal group latent, rows read by index."""
    loc = numpyro.param("loc", jnp.zeros(2))
    cov = numpyro.param("cov", jnp.eye(2), constraint=constraints.positive_definite)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("subject", num_subjects):
        b = numpyro.sample("b", dist.MultivariateNormal(loc, covariance_matrix=cov))
    with numpyro.plate("rows", len(x)):
        mean = b[subject, 0] + b[subject, 1] * x
        numpyro.sample("y", dist.Normal(mean, sigma), obs=y)


def theophylline(dose, time, conc=None):
    """One-compartment oral PK: log(ka, V, CL)_i ~ N(mu, diag(omega²)), conc_ij ~ N(C_i(t_ij), a²)."""
    mu = numpyro.param("mu", jnp.array([0.0, 3.0, -0.7]))  # log ka, log V, log CL
    omega = numpyro.param("omega", jnp.ones(3), constraint=constraints.positive)
    a = numpyro.param("a", 1.0, constraint=constraints.positive)
    with numpyro.plate("id", len(dose), dim=-1):
        log_psi = numpyro.sample("log_psi", dist.Normal(mu, omega).to_event(1))
        ka, v, cl = jnp.exp(log_psi[:, 0]), jnp.exp(log_psi[:, 1]), jnp.exp(log_psi[:, 2])
        k = cl / v
        pred = (dose[:, None] * ka[:, None] / (v[:, None] * (ka[:, None] - k[:, None]))
                * (jnp.exp(-k[:, None] * time) - jnp.exp(-ka[:, None] * time)))
        numpyro.sample("conc", dist.Normal(pred, a).to_event(1), obs=conc)


def vector_obs(time, y):
    """Random intercept, each unit's series one vector observation: ``Normal(b[:, None] + ..., sigma).to_event(1)``."""
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    slope = numpyro.param("slope", 0.0)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0]):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        numpyro.sample("y", dist.Normal(b[:, None] + slope * time, sigma).to_event(1), obs=y)


def nested_plates(x, y):
    """Nested plates without dims (units outer: dim -1, visits inner: dim -2), so ``x`` and ``y`` are [visit, unit]."""
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    beta = numpyro.param("beta", 0.0)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    num_visits, num_units = y.shape
    with numpyro.plate("unit", num_units):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("visit", num_visits):
            numpyro.sample("y", dist.Normal(b + beta * x, sigma), obs=y)


def ragged_mask(time, y):
    """Ragged series padded with NaN ([unit, visit]), the padding masked out with ``.mask(...)``."""
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    slope = numpyro.param("slope", 0.0)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    observed = ~jnp.isnan(y)
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("visit", y.shape[1], dim=-1):
            mean = b + slope * jnp.nan_to_num(time)
            numpyro.sample("y", dist.Normal(mean, sigma).mask(observed), obs=jnp.nan_to_num(y))


def ragged_obs_mask(time, y):
    """The ragged series of ``ragged_mask`` with NumPyro's ``obs_mask=`` (missing entries imputed as latents)."""
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    slope = numpyro.param("slope", 0.0)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0], dim=-2):
        b = numpyro.sample("b", dist.Normal(mu, omega))
        with numpyro.plate("visit", y.shape[1], dim=-1):
            mean = b + slope * jnp.nan_to_num(time)
            numpyro.sample("y", dist.Normal(mean, sigma), obs=jnp.nan_to_num(y), obs_mask=~jnp.isnan(y))

def two_biomarkers(num_subjects, id1, t1, id2, t2, y1=None, y2=None):
    """Two biomarkers per subject, each with its own rows (own index array), level and residual sd; a common slope."""
    mu1 = numpyro.param("mu1", 0.0)
    omega1 = numpyro.param("omega1", 1.0, constraint=constraints.positive)
    mu2 = numpyro.param("mu2", 0.0)
    omega2 = numpyro.param("omega2", 1.0, constraint=constraints.positive)
    slope = numpyro.param("slope", 0.0)
    sigma1 = numpyro.param("sigma1", 1.0, constraint=constraints.positive)
    sigma2 = numpyro.param("sigma2", 1.0, constraint=constraints.positive)
    with numpyro.plate("subject", num_subjects):
        b1 = numpyro.sample("b1", dist.Normal(mu1, omega1))
        b2 = numpyro.sample("b2", dist.Normal(mu2, omega2))
    with numpyro.plate("rows1", len(id1)):
        numpyro.sample("y1", dist.Normal(b1[id1] + slope * t1, sigma1), obs=y1)
    with numpyro.plate("rows2", len(id2)):
        numpyro.sample("y2", dist.Normal(b2[id2] + slope * t2, sigma2), obs=y2)


def poisson_glmm(group, x, num_groups, counts=None):
    """Poisson GLMM: u_g ~ N(mu, omega²), counts_r ~ Poisson(exp(u[group_r] + beta x_r))."""
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    beta = numpyro.param("beta", 0.0)
    with numpyro.plate("group", num_groups):
        u = numpyro.sample("u", dist.Normal(mu, omega))
    with numpyro.plate("rows", len(x)):
        numpyro.sample("counts", dist.Poisson(jnp.exp(u[group] + beta * x)), obs=counts)


def logistic_glmm(group, x, num_groups, y=None):
    """Logistic GLMM: u_g ~ N(mu, omega²), y_r ~ Bernoulli(logits = u[group_r] + beta x_r)."""
    mu = numpyro.param("mu", 0.0)
    omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
    beta = numpyro.param("beta", 0.0)
    with numpyro.plate("group", num_groups):
        u = numpyro.sample("u", dist.Normal(mu, omega))
    with numpyro.plate("rows", len(x)):
        numpyro.sample("y", dist.Bernoulli(logits=u[group] + beta * x), obs=y)


def lognormal_decay(time, y):
    """A positive 2-vector per unit, ``LogNormal(mu, omega).to_event(1)`` with vector params: y = A exp(-k t)."""
    mu = numpyro.param("mu", jnp.array([1.0, -1.0]))
    omega = numpyro.param("omega", jnp.array([0.5, 0.5]), constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("unit", y.shape[0]):
        psi = numpyro.sample("psi", dist.LogNormal(mu, omega).to_event(1))
        pred = psi[:, 0, None] * jnp.exp(-psi[:, 1, None] * time)
        numpyro.sample("y", dist.Normal(pred, sigma).to_event(1), obs=y)


def mixed_shapes(group, x1, x2, num_groups, y=None):
    """Latents of several shapes per group: a scalar intercept and a 2-vector of slopes (MVN, Cholesky param)."""
    mu_a = numpyro.param("mu_a", 0.0)
    omega_a = numpyro.param("omega_a", 1.0, constraint=constraints.positive)
    loc_b = numpyro.param("loc_b", jnp.zeros(2))
    scale_tril_b = numpyro.param("scale_tril_b", jnp.eye(2), constraint=constraints.lower_cholesky)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("group", num_groups):
        a = numpyro.sample("a", dist.Normal(mu_a, omega_a))
        b = numpyro.sample("b", dist.MultivariateNormal(loc_b, scale_tril=scale_tril_b))
    with numpyro.plate("rows", len(x1)):
        mean = a[group] + b[group, 0] * x1 + b[group, 1] * x2
        numpyro.sample("y", dist.Normal(mean, sigma), obs=y)
