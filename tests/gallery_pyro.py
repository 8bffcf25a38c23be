"""The model gallery (issue 10), Pyro side: models written the way Pyro's tutorials write them.

Nothing here knows about latentfit: plates with ``dim=None`` or explicit dims, plain ``x[:, 0]`` /
``x[:, None]`` indexing, ``.to_event(1)``, ``.mask(...)``, latents of a group read by the rows of a
data plate through an index array (``alpha[county]``), parameters declared with ``pyro.param``.
The NumPyro twins (same names, same arguments, same parameters) are in ``gallery_numpyro.py``; the
data, the reference densities and the known answers are in ``test_gallery.py``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def many_schools(sigma, y=None):
    """Eight schools with many schools: theta_j ~ N(mu, tau²), y_j ~ N(theta_j, sigma_j²), sigma_j known."""
    mu = pyro.param("mu", torch.tensor(0.0))
    tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("schools", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def radon_intercept(county, floor, num_counties, log_radon=None):
    """Radon, varying intercept: alpha_c ~ N(mu_a, sigma_a²), y_r ~ N(alpha[county_r] + beta floor_r, sigma_y²)."""
    mu_a = pyro.param("mu_a", torch.tensor(0.0))
    sigma_a = pyro.param("sigma_a", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("beta", torch.tensor(0.0))
    sigma_y = pyro.param("sigma_y", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("county", num_counties):
        alpha = pyro.sample("alpha", dist.Normal(mu_a, sigma_a))
    with pyro.plate("data", len(floor)):
        mean = alpha[county] + beta * floor
        pyro.sample("obs", dist.Normal(mean, sigma_y), obs=log_radon)


def radon_slope(county, floor, num_counties, log_radon=None):
    """Radon, varying intercept and slope (two latent sites in the county plate)."""
    mu_a = pyro.param("mu_a", torch.tensor(0.0))
    sigma_a = pyro.param("sigma_a", torch.tensor(1.0), constraint=constraints.positive)
    mu_b = pyro.param("mu_b", torch.tensor(0.0))
    sigma_b = pyro.param("sigma_b", torch.tensor(1.0), constraint=constraints.positive)
    sigma_y = pyro.param("sigma_y", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("county", num_counties):
        alpha = pyro.sample("alpha", dist.Normal(mu_a, sigma_a))
        beta = pyro.sample("beta", dist.Normal(mu_b, sigma_b))
    with pyro.plate("data", len(floor)):
        mean = alpha[county] + beta[county] * floor
        pyro.sample("obs", dist.Normal(mean, sigma_y), obs=log_radon)


def mvn_slope(subject, x, num_subjects, y=None):
    """Random intercept and slope with a correlated MultivariateNormal group latent, rows read by index."""
    loc = pyro.param("loc", torch.zeros(2))
    cov = pyro.param("cov", torch.eye(2), constraint=constraints.positive_definite)
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("subject", num_subjects):
        b = pyro.sample("b", dist.MultivariateNormal(loc, covariance_matrix=cov))
    with pyro.plate("rows", len(x)):
        mean = b[subject, 0] + b[subject, 1] * x
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def theophylline(dose, time, conc=None):
    """One-compartment oral PK: log(ka, V, CL)_i ~ N(mu, diag(omega²)), conc_ij ~ N(C_i(t_ij), a²)."""
    mu = pyro.param("mu", torch.tensor([0.0, 3.0, -0.7]))  # log ka, log V, log CL
    omega = pyro.param("omega", torch.ones(3), constraint=constraints.positive)
    a = pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("id", len(dose), dim=-1):
        log_psi = pyro.sample("log_psi", dist.Normal(mu, omega).to_event(1))
        ka, v, cl = log_psi[:, 0].exp(), log_psi[:, 1].exp(), log_psi[:, 2].exp()
        k = cl / v
        pred = (dose[:, None] * ka[:, None] / (v[:, None] * (ka[:, None] - k[:, None]))
                * (torch.exp(-k[:, None] * time) - torch.exp(-ka[:, None] * time)))
        pyro.sample("conc", dist.Normal(pred, a).to_event(1), obs=conc)


def vector_obs(time, y):
    """Random intercept, each unit's series one vector observation: ``Normal(b[:, None] + ..., sigma).to_event(1)``."""
    mu = pyro.param("mu", torch.tensor(0.0))
    omega = pyro.param("omega", torch.tensor(1.0), constraint=constraints.positive)
    slope = pyro.param("slope", torch.tensor(0.0))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0]):
        b = pyro.sample("b", dist.Normal(mu, omega))
        pyro.sample("y", dist.Normal(b[:, None] + slope * time, sigma).to_event(1), obs=y)


def nested_plates(x, y):
    """Nested plates without dims (units outer: dim -1, visits inner: dim -2), so ``x`` and ``y`` are [visit, unit]."""
    mu = pyro.param("mu", torch.tensor(0.0))
    omega = pyro.param("omega", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("beta", torch.tensor(0.0))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    num_visits, num_units = y.shape
    with pyro.plate("unit", num_units):
        b = pyro.sample("b", dist.Normal(mu, omega))
        with pyro.plate("visit", num_visits):
            pyro.sample("y", dist.Normal(b + beta * x, sigma), obs=y)


def ragged_mask(time, y):
    """Ragged series padded with NaN ([unit, visit]), the padding masked out with ``.mask(...)``."""
    mu = pyro.param("mu", torch.tensor(0.0))
    omega = pyro.param("omega", torch.tensor(1.0), constraint=constraints.positive)
    slope = pyro.param("slope", torch.tensor(0.0))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    observed = ~torch.isnan(y)
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, omega))
        with pyro.plate("visit", y.shape[1], dim=-1):
            mean = b + slope * torch.nan_to_num(time)
            pyro.sample("y", dist.Normal(mean, sigma).mask(observed), obs=torch.nan_to_num(y))


def ragged_obs_mask(time, y):
    """The ragged series of ``ragged_mask`` with Pyro's ``obs_mask=``, the missing entries left NaN in ``obs``."""
    mu = pyro.param("mu", torch.tensor(0.0))
    omega = pyro.param("omega", torch.tensor(1.0), constraint=constraints.positive)
    slope = pyro.param("slope", torch.tensor(0.0))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, omega))
        with pyro.plate("visit", y.shape[1], dim=-1):
            mean = b + slope * torch.nan_to_num(time)
            pyro.sample("y", dist.Normal(mean, sigma), obs=y, obs_mask=~torch.isnan(y))


def two_biomarkers(num_subjects, id1, t1, id2, t2, y1=None, y2=None):
    """Two biomarkers per subject, each with its own rows (own index array), level and residual sd; a common slope."""
    mu1 = pyro.param("mu1", torch.tensor(0.0))
    omega1 = pyro.param("omega1", torch.tensor(1.0), constraint=constraints.positive)
    mu2 = pyro.param("mu2", torch.tensor(0.0))
    omega2 = pyro.param("omega2", torch.tensor(1.0), constraint=constraints.positive)
    slope = pyro.param("slope", torch.tensor(0.0))
    sigma1 = pyro.param("sigma1", torch.tensor(1.0), constraint=constraints.positive)
    sigma2 = pyro.param("sigma2", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("subject", num_subjects):
        b1 = pyro.sample("b1", dist.Normal(mu1, omega1))
        b2 = pyro.sample("b2", dist.Normal(mu2, omega2))
    with pyro.plate("rows1", len(id1)):
        pyro.sample("y1", dist.Normal(b1[id1] + slope * t1, sigma1), obs=y1)
    with pyro.plate("rows2", len(id2)):
        pyro.sample("y2", dist.Normal(b2[id2] + slope * t2, sigma2), obs=y2)


def poisson_glmm(group, x, num_groups, counts=None):
    """Poisson GLMM: u_g ~ N(mu, omega²), counts_r ~ Poisson(exp(u[group_r] + beta x_r))."""
    mu = pyro.param("mu", torch.tensor(0.0))
    omega = pyro.param("omega", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("beta", torch.tensor(0.0))
    with pyro.plate("group", num_groups):
        u = pyro.sample("u", dist.Normal(mu, omega))
    with pyro.plate("rows", len(x)):
        pyro.sample("counts", dist.Poisson(torch.exp(u[group] + beta * x)), obs=counts)


def logistic_glmm(group, x, num_groups, y=None):
    """Logistic GLMM: u_g ~ N(mu, omega²), y_r ~ Bernoulli(logits = u[group_r] + beta x_r)."""
    mu = pyro.param("mu", torch.tensor(0.0))
    omega = pyro.param("omega", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("beta", torch.tensor(0.0))
    with pyro.plate("group", num_groups):
        u = pyro.sample("u", dist.Normal(mu, omega))
    with pyro.plate("rows", len(x)):
        pyro.sample("y", dist.Bernoulli(logits=u[group] + beta * x), obs=y)


def lognormal_decay(time, y):
    """A positive 2-vector per unit, ``LogNormal(mu, omega).to_event(1)`` with vector params: y = A exp(-k t)."""
    mu = pyro.param("mu", torch.tensor([1.0, -1.0]))
    omega = pyro.param("omega", torch.tensor([0.5, 0.5]), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0]):
        psi = pyro.sample("psi", dist.LogNormal(mu, omega).to_event(1))
        pred = psi[:, 0, None] * torch.exp(-psi[:, 1, None] * time)
        pyro.sample("y", dist.Normal(pred, sigma).to_event(1), obs=y)


def mixed_shapes(group, x1, x2, num_groups, y=None):
    """Latents of several shapes per group: a scalar intercept and a 2-vector of slopes (MVN, Cholesky param)."""
    mu_a = pyro.param("mu_a", torch.tensor(0.0))
    omega_a = pyro.param("omega_a", torch.tensor(1.0), constraint=constraints.positive)
    loc_b = pyro.param("loc_b", torch.zeros(2))
    scale_tril_b = pyro.param("scale_tril_b", torch.eye(2), constraint=constraints.lower_cholesky)
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("group", num_groups):
        a = pyro.sample("a", dist.Normal(mu_a, omega_a))
        b = pyro.sample("b", dist.MultivariateNormal(loc_b, scale_tril=scale_tril_b))
    with pyro.plate("rows", len(x1)):
        mean = a[group] + b[group, 0] * x1 + b[group, 1] * x2
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)
