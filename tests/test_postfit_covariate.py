"""Theophylline with Weight on log V (saemix's covariate example; saemix 3.4, Comets, Lavenu & Lavielle 2017):
log-likelihood by importance sampling −171.36, by linearisation (at the conditional means) −170.64, by Gaussian
quadrature −171.33.  The exact maximum (adaptive Gauss–Hermite, 9 nodes, maximised): −171.3084.

Two ways of writing the model: the NLME family (closed-form saemix M-step, fast) and a plain Pyro
model whose latent loc depends on the covariate (``log V_i = log V_pop + β·Weight_i + η_i``; the
adapter cannot use the closed form for μ, β, ω, so they take the numerical M-step: slow test).
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import latentfit as lf
from latentfit.examples.theophylline import one_compartment_oral, theophylline_arrays
from latentfit.models import nlme

LL_MAX = -171.3084
#: the linearised log-likelihood at the conditional modes of this library's fits, seeds 0–9: −170.720 ± 0.026
#: (saemix's −170.64 linearises at the conditional means: 0.10 higher at saemix's own estimates)
LL_LIN, LL_LIN_SD = -170.720, 0.026


def _check_log_likelihoods(fit):
    """IS against the deterministic quadrature at the same θ̂ within 4 Monte-Carlo SDs (reported mc_se 0.055 with the
    default 5000 draws; measured seed-to-seed SD 0.08 over IS seeds 0–2 at 10 fits), the quadrature value below the
    exact maximum by less than 4 run-to-run SDs of a SAEM estimate's log-likelihood (0.016 over seeds 0–9), the
    linearisation within 4 SDs of its mean over seeds."""
    ll_is = fit.log_likelihood("is")
    assert abs(ll_is - fit.log_likelihood("gq")) < 4 * fit.log_likelihoods["is"].mc_se
    assert LL_MAX - 4 * 0.016 < fit.log_likelihood("gq") < LL_MAX + 1e-4
    assert abs(fit.log_likelihood("lin") - LL_LIN) < 4 * LL_LIN_SD
THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")


def theophylline_weight(dose, time, weight, conc=None, mask=None):
    """Plain Pyro model: ``log_psi_i ~ N(μ + (0, β·Weight_i, 0), diag(ω²))``."""
    mu = pyro.param("mu", torch.tensor([np.log(1.0), np.log(20.0), np.log(0.5)], dtype=time.dtype))
    beta = pyro.param("beta", torch.tensor(0.0, dtype=time.dtype))
    omega = pyro.param("omega", torch.ones(3, dtype=time.dtype), constraint=constraints.positive)
    a = pyro.param("a", torch.tensor(1.0, dtype=time.dtype), constraint=constraints.positive)
    zero = torch.zeros_like(weight)
    loc = mu + torch.stack([zero, beta * weight, zero], -1)  # [N, 1, 3]
    with pyro.plate("id", time.shape[0], dim=-2):
        log_psi = pyro.sample("log_psi", dist.Normal(loc, omega).to_event(1))
        pred = one_compartment_oral(log_psi, dose, time)
        with pyro.plate("time", time.shape[1], dim=-1):
            pyro.sample("conc", dist.Normal(pred, a).mask(mask), obs=conc)


def test_nlme_weight_on_log_v_log_likelihood_matches_saemix():
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, covariates={"V": "Weight"},
                      data=lf.datasets.theophylline(saemix_form=True), **THEO)
    fit = model.fit(seed=0, progress=False)
    _check_log_likelihoods(fit)
    assert fit.num_params == 8
    df = fit.summary()
    assert df.loc["beta_V_Weight", "se"] > 0 and np.isfinite(df["rse%"]).all()


@pytest.mark.slow
def test_plain_pyro_weight_on_log_v_log_likelihood_matches_saemix():
    from latentfit.pyro import SAEM

    pyro.clear_param_store()
    data = theophylline_arrays()
    weight = lf.datasets.theophylline(saemix_form=True).groupby("Id")["Weight"].first().to_numpy()
    data["weight"] = torch.tensor(weight[:, None])
    fit = SAEM(theophylline_weight, seed=0, progress=False, newton_steps=2).run(**data)
    assert fit.model.has_gaussian_prior and "beta" in fit.model.numeric_params
    _check_log_likelihoods(fit)
    se = fit.standard_errors("sa")
    assert 0 < se["beta"] < 0.01
    pyro.clear_param_store()
