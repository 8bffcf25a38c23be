"""TTSEM on the one-compartment PK model with lag time (the NLME family), MH-chain E-step.

The TTSEM paper's PK experiment (Tlag = 1, ka = 1, V = 8, k = 0.1 i.e. CL = 0.8, ω = (.4, .5, .2, .3),
σ² = 0.5), scaled down to 100 patients × 10 observations: fiTTEM and vrTTEM (mini-batches of 20,
5 chains per patient, 25 epochs) reach the maximum-likelihood estimate on the same data, as a precise SAEM run finds
it (20 chains, K2 = 300: two seeds agree within 0.2% on the fixed effects and 1.1% on the variances), within their
measured Monte-Carlo error (``TOL``).
"""

from __future__ import annotations

import numpy as np
import pytest

from latentfit.inference.saem import SAEM
from latentfit.inference.ttsem import TTSEM
from latentfit.models import nlme

TRUTH = {"Tlag": 1.0, "ka": 1.0, "V": 8.0, "CL": 0.8}
OMEGA2 = {"Tlag": 0.16, "ka": 0.25, "V": 0.04, "CL": 0.09}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pk_data():
    params = {k: nlme.Parameter(v, omega2=OMEGA2[k]) for k, v in TRUTH.items()}
    sim_model = nlme.NLME("one_compartment_oral_lag", params, error="constant", error_init={"a": np.sqrt(0.5)})
    design = nlme.design_table(100, [0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 24], dose=100.0)
    data = sim_model.bind(design).simulate(seed=1)
    return data, SAEM(_model(data), num_iters=(150, 300), num_chains=20, seed=0, progress=False).run().params


#: relative tolerance against the precise SAEM estimate: |mean offset| + 4 SD of one TTSEM run, both measured over
#: seeds 0–19 (the larger of fiTTEM and vrTTEM).  The offsets are significant for ka (+1.0%) and ω²_ka (−5.1%): after
#: 25 epochs the slow timescale has not quite settled.  SDs: fixed effects 0.5–1.2%, ω² 2.1–5.7%, a 0.6%.
TOL = dict(Tlag=0.025, ka=0.06, V=0.025, CL=0.025, omega2_Tlag=0.125, omega2_ka=0.28, omega2_V=0.18, omega2_CL=0.125,
           a=0.03)


def _model(data):
    start = {k: nlme.Parameter(1.3 * v, omega2=0.5) for k, v in TRUTH.items()}
    return nlme.NLME("one_compartment_oral_lag", start, error="constant", data=data)


@pytest.mark.parametrize("variant", ["fi", "vr"])
def test_ttsem_reaches_the_saem_estimate_on_pk_with_lag(pk_data, variant):
    data, ref = pk_data
    fit = TTSEM(_model(data), num_epochs=25, variant=variant, batch_size=20, num_samples=5, seed=0,
                progress=False).run()
    for name, tol in TOL.items():
        assert abs(float(fit.params[name]) / float(ref[name]) - 1) < tol, (name, fit.params[name], ref[name])
    assert fit.history["theta.ka"].shape[0] == 25
