"""Theophylline: the one-compartment oral PK model written as a plain NumPyro model, fitted by SAEM.

    C(t) = D·ka / (V·(ka − k)) · (exp(−k t) − exp(−ka t)),   k = CL / V,
    log(ka, V, CL)_i ~ N(μ, diag(ω²)),   y_ij ~ N(C_i(t_ij), a²).

The twin of :mod:`latentfit.examples.theophylline` (same model, same data, same SAEM options); the whole
SAEM iteration is compiled by JAX.  ``fit()`` runs it (the repository's ``examples/theophylline_numpyro.py`` prints
the result).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import latentfit as lf


def one_compartment_oral(log_psi: jnp.ndarray, dose: jnp.ndarray, time: jnp.ndarray) -> jnp.ndarray:
    """Concentration of a one-compartment model with first-order absorption (``...`` broadcasting)."""
    ka, v, cl = jnp.exp(log_psi[..., 0]), jnp.exp(log_psi[..., 1]), jnp.exp(log_psi[..., 2])
    k = cl / v
    return dose * ka / (v * (ka - k)) * (jnp.exp(-k * time) - jnp.exp(-ka * time))


def theophylline_model(dose: jnp.ndarray, time: jnp.ndarray, conc: jnp.ndarray | None = None,
                       mask: jnp.ndarray | None = None) -> None:
    """``dose [N, 1]``, ``time/conc/mask [N, T]`` (padding masked out)."""
    n_id, n_t = time.shape
    mu = numpyro.param("mu", jnp.array([np.log(1.0), np.log(20.0), np.log(0.5)], dtype=time.dtype))
    omega = numpyro.param("omega", jnp.ones(3, dtype=time.dtype), constraint=constraints.positive)
    a = numpyro.param("a", jnp.array(1.0, dtype=time.dtype), constraint=constraints.positive)
    with numpyro.plate("id", n_id, dim=-2):
        log_psi = numpyro.sample("log_psi", dist.Normal(mu, omega).to_event(1))  # [N, 1, 3]
        pred = one_compartment_oral(log_psi, dose, time)
        with numpyro.plate("time", n_t, dim=-1):
            obs = dist.Normal(pred, a)
            numpyro.sample("conc", obs.mask(mask) if mask is not None else obs, obs=conc)


def theophylline_arrays(dtype=None) -> dict[str, jnp.ndarray]:
    """The 120-row saemix form as padded ``[N, T]`` arrays (12 × 10, no padding needed)."""
    df = lf.datasets.theophylline(saemix_form=True)
    groups = [g for _, g in df.groupby("Id", sort=True)]
    n_t = max(len(g) for g in groups)
    time = np.ones((len(groups), n_t))  # padding at t = 1, masked out
    conc = np.zeros((len(groups), n_t))
    mask = np.zeros((len(groups), n_t), dtype=bool)
    dose = np.zeros((len(groups), 1))
    for i, g in enumerate(groups):
        m = len(g)
        time[i, :m], conc[i, :m], mask[i, :m] = g["Time"], g["Concentration"], True
        dose[i, 0] = g["Dose"].iloc[0]
    dtype = dtype or jnp.result_type(float)
    return {"dose": jnp.asarray(dose, dtype), "time": jnp.asarray(time, dtype), "conc": jnp.asarray(conc, dtype),
            "mask": jnp.asarray(mask)}


def fit(seed: int = 0, progress: bool = True, num_iters=(300, 100), **options):
    from latentfit.numpyro import SAEM

    data = theophylline_arrays()
    return SAEM(theophylline_model, num_iters=num_iters, progress=progress, **options).run(
        jax.random.PRNGKey(seed), **data)
