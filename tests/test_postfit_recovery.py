"""Wald-interval coverage of the standard errors on the plain Pyro path (slow).

20 data sets simulated from the theophylline Pyro model (40 subjects × 10 times, truth near saemix's
estimates), each fitted by SAEM; for every parameter the 95% Wald interval ``θ̂ ± 1.96·SE`` must cover
the truth in 80–100% of the data sets (binomial: 19/20 expected, ≥ 16/20 with probability 0.98 per
parameter at the nominal level), with SEs by linearisation and by Louis' formula.
The NLME family's own recovery test (tests/test_nlme_fit.py) uses the same ``standard_errors``.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from latentfit.examples.theophylline import theophylline_model
from latentfit.pyro import SAEM

TRUTH = {"mu": np.log([1.5, 32.0, 2.8]), "omega": np.sqrt([0.4, 0.02, 0.08]), "a": np.array(0.7)}
TIMES = [0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.0, 9.0, 12.0, 24.0]


def _simulate(seed: int, n: int = 40) -> dict[str, torch.Tensor]:
    pyro.clear_param_store()
    for name, value in TRUTH.items():
        pyro.param(name, torch.tensor(value, dtype=torch.float64),
                   constraint=torch.distributions.constraints.positive if name != "mu" else
                   torch.distributions.constraints.real)
    time = torch.tensor(TIMES, dtype=torch.float64).expand(n, -1).clone()
    dose = torch.full((n, 1), 320.0, dtype=torch.float64)
    mask = torch.ones(n, len(TIMES), dtype=torch.bool)
    pyro.set_rng_seed(seed)
    tr = poutine.trace(theophylline_model).get_trace(dose, time, None, mask)
    pyro.clear_param_store()
    return {"dose": dose, "time": time, "conc": tr.nodes["conc"]["value"].detach(), "mask": mask}


@pytest.mark.slow
def test_wald_coverage_20_data_sets():
    labels = ["mu[0]", "mu[1]", "mu[2]", "omega[0]", "omega[1]", "omega[2]", "a"]
    truth = np.concatenate([TRUTH["mu"], TRUTH["omega"], [TRUTH["a"]]])
    covered = {m: [] for m in ("lin", "sa")}
    for seed in range(20):
        data = _simulate(1000 + seed)
        fit = SAEM(theophylline_model, num_iters=(200, 100), seed=seed, progress=False).run(**data)
        est = np.array([dict(fit.param_table())[k] for k in labels])
        for method in covered:
            se = fit.standard_errors(method)
            covered[method].append(np.abs(est - truth) < 1.96 * np.array([se[k] for k in labels]))
        pyro.clear_param_store()
    for method, cov in covered.items():
        rate = np.mean(cov, 0)
        assert np.all((rate >= 0.8) & (rate <= 1.0)), (method, dict(zip(labels, rate)))
