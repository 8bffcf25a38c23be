"""Theophylline: a one-compartment oral PK model written as a plain Pyro model, fitted by SAEM.

    C(t) = D·ka / (V·(ka − k)) · (exp(−k t) − exp(−ka t)),   k = CL / V,
    log(ka, V, CL)_i ~ N(μ, diag(ω²)),   y_ij ~ N(C_i(t_ij), a²).

The model below is an ordinary Pyro model: nothing in it is specific to latentfit.
``fit()`` runs it; ``latentfit demo`` fits it and compares with saemix.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

import latentfit as lf


def one_compartment_oral(log_psi: torch.Tensor, dose: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """Concentration of a one-compartment model with first-order absorption (``...`` broadcasting)."""
    ka, v, cl = log_psi[..., 0].exp(), log_psi[..., 1].exp(), log_psi[..., 2].exp()
    k = cl / v
    return dose * ka / (v * (ka - k)) * (torch.exp(-k * time) - torch.exp(-ka * time))


def theophylline_model(dose: torch.Tensor, time: torch.Tensor, conc: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> None:
    """``dose [N, 1]``, ``time/conc/mask [N, T]`` (padding masked out)."""
    n_id, n_t = time.shape
    mu = pyro.param("mu", torch.tensor([np.log(1.0), np.log(20.0), np.log(0.5)], dtype=time.dtype))
    omega = pyro.param("omega", torch.ones(3, dtype=time.dtype), constraint=constraints.positive)
    a = pyro.param("a", torch.tensor(1.0, dtype=time.dtype), constraint=constraints.positive)
    with pyro.plate("id", n_id, dim=-2):
        log_psi = pyro.sample("log_psi", dist.Normal(mu, omega).to_event(1))  # [..., N, 1, 3]
        pred = one_compartment_oral(log_psi, dose, time)
        with pyro.plate("time", n_t, dim=-1):
            obs = dist.Normal(pred, a)
            pyro.sample("conc", obs.mask(mask) if mask is not None else obs, obs=conc)


def theophylline_arrays(dtype=torch.float64, device=None) -> dict[str, torch.Tensor]:
    """The 120-row saemix form as padded ``[N, T]`` tensors (12 × 10, no padding needed)."""
    df = lf.datasets.theophylline(saemix_form=True)
    groups = [g for _, g in df.groupby("Id", sort=True)]
    n_t = max(len(g) for g in groups)
    time = np.zeros((len(groups), n_t))
    conc = np.zeros((len(groups), n_t))
    mask = np.zeros((len(groups), n_t), dtype=bool)
    dose = np.zeros((len(groups), 1))
    for i, g in enumerate(groups):
        m = len(g)
        time[i, :m], conc[i, :m], mask[i, :m] = g["Time"], g["Concentration"], True
        time[i, m:] = 1.0  # harmless padding, masked out
        dose[i, 0] = g["Dose"].iloc[0]
    kw = {"dtype": dtype, "device": device}
    return {"dose": torch.tensor(dose, **kw), "time": torch.tensor(time, **kw), "conc": torch.tensor(conc, **kw),
            "mask": torch.tensor(mask, device=device)}


def fit(seed: int = 0, progress: bool = True, num_iters=(300, 100)):
    from latentfit.pyro import SAEM

    pyro.clear_param_store()
    data = theophylline_arrays()
    return SAEM(theophylline_model, num_iters=num_iters, seed=seed, progress=progress).run(**data)
