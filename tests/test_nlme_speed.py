"""NLME fast paths of the SAEM iteration: the MCMC sweep's density evaluator, the diagonal prior draw and the MH
acceptance rules give what the plain computations give (bit for bit, or to rounding for the residual-sum-of-squares
form of the constant error)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from latentfit.inference import mcmc
from latentfit.inference.ops import make_ops
from latentfit.models import nlme


def _unbalanced_table(seed: int = 0) -> pd.DataFrame:
    """Six individuals with 3 to 7 observations (padding), one oral dose, a weight covariate."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(6):
        wt = rng.uniform(50, 90)
        rows.append((i + 1, 0.0, np.nan, 100.0, 1, wt))
        for t in np.sort(rng.uniform(0.2, 24, size=3 + i % 5)):
            rows.append((i + 1, t, rng.uniform(0.5, 6), 0.0, 0, wt))
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "WT"])


@pytest.mark.parametrize("error", ["constant", "exponential", "proportional", "combined"])
def test_density_evaluator_equals_log_densities(error):
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": nlme.Parameter(2.0, random=False)},
                      covariates={"V": "WT"}, error=error, error_init={"a": 0.4, "b": 0.2},
                      data=_unbalanced_table())
    assert not model._no_padding
    theta = model.init_params()
    theta["beta_V_WT"] = torch.tensor(0.01, dtype=torch.float64)
    z = model.sample_prior(theta, torch.Generator().manual_seed(1), 3)  # [3, N, 2]
    ll, lp = model.log_densities(theta, z)
    ll_fast, lp_fast = model.density_evaluator(theta)(z)
    assert torch.equal(lp_fast, lp)
    if error in ("constant", "exponential"):  # residual sum of squares: equal up to rounding
        torch.testing.assert_close(ll_fast, ll, rtol=1e-13, atol=0.0)
    else:  # the per-observation terms themselves
        assert torch.equal(ll_fast, ll)
    units = torch.tensor([4, 1, 3])
    ll_u, lp_u = model.density_evaluator(theta, units)(z[:, units])
    torch.testing.assert_close(ll_u, ll[:, units], rtol=1e-13, atol=0.0)
    assert torch.equal(lp_u, lp[:, units])


def test_diagonal_prior_draw_equals_the_cholesky_product():
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=_unbalanced_table())
    theta = model.init_params()
    theta["omega2_V"] = torch.tensor(0.37, dtype=torch.float64)
    z = model.sample_prior(theta, torch.Generator().manual_seed(3), 2)
    eps = torch.randn((2, model.num_units, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mu = model._mu_r(model._mu(theta), model.num_units)
    expected = mu + eps @ torch.sqrt(model.omega_matrix(theta)).T
    assert torch.equal(z, expected)


def test_acceptance_rules_for_finite_and_nonfinite_log_densities():
    ops = make_ops("torch")
    old = torch.tensor([[-1.0, -2.0, -np.inf, -1.0, np.nan]], dtype=torch.float64)
    new = torch.tensor([[-1.5, np.nan, -3.0, -0.5, -4.0]], dtype=torch.float64)
    zero = torch.zeros_like(old)
    state = mcmc.ChainState(torch.zeros(1, 5, 2, dtype=torch.float64), old, zero,
                            torch.tensor(0.0, dtype=torch.float64))
    z_new = torch.ones(1, 5, 2, dtype=torch.float64)
    log_ratio = new - old
    st, ok = mcmc._accept(ops, torch.Generator().manual_seed(0), log_ratio, state, z_new, new, zero)
    u = torch.rand((1, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # finite -> finite: log u < ratio; NaN proposal: rejected and counted; from -inf / NaN: any finite proposal
    expected = torch.tensor([[bool(torch.log(u[0, 0]) < -0.5), False, True, True, True]])
    assert torch.equal(ok, expected)
    assert float(st.num_nonfinite) == 1.0 and st.num_nonfinite.dtype == torch.float64
    assert torch.equal(st.log_lik, torch.where(expected, new, old))
    assert torch.equal(st.z[..., 0], expected * 1.0)
