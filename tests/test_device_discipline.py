"""Engines and post-fit tools never create a tensor on torch's default device.

Without a GPU this is checked by making ``meta`` the default device: any tensor an engine created without
following the data's device would land there and fail when combined with the CPU data.
"""

from __future__ import annotations

import numpy as np
import torch
from test_nlme_ode import THEO, oral_ode

import latentfit as lf
from latentfit.inference import likelihood
from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.models import nlme
from latentfit.models.mixture import GaussianMixture


def test_nlme_engines_and_post_fit_tools_follow_the_data_device():
    df = lf.datasets.theophylline(saemix_form=True)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, device="cpu", **THEO)
    ode_model = nlme.NLME(oral_ode(), {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, device="cpu", **THEO)
    z = torch.zeros((2, 12, 3), dtype=torch.float64) + torch.log(torch.tensor([1.5, 31.5, 2.75]))
    with torch.device("meta"):
        assert torch.zeros(1).device.type == "meta"  # the trap is set
        for engine in ("saem", "fsaem"):
            fit = model.fit(engine=engine, seed=0, progress=False, num_iters=(10, 5))
            assert np.isfinite(fit.log_likelihood("gq")) and np.isfinite(fit.log_likelihood("is", num_samples=200))
            assert np.isfinite(fit.log_likelihood("lin"))
            assert all(np.isfinite(v) for v in fit.standard_errors("lin").values())
        best = likelihood.maximise_log_likelihood_gq(model, fit._theta(), max_outer=2, num_nodes=5)
        assert best.theta["ka"].device.type == "cpu"
        f, _ = ode_model.predict(fit._theta(), z)
        assert f.device.type == "cpu" and bool(torch.isfinite(f).all())


def test_em_family_follows_the_data_device():
    x = torch.tensor(np.random.default_rng(0).normal(size=(200, 2)))
    with torch.device("meta"):
        for engine in (EM(GaussianMixture(x, 2, "full", seed=0), num_epochs=3, progress=False),
                       FIEM(GaussianMixture(x, 2, "diag", seed=0), num_epochs=2, batch_size=50, progress=False)):
            fit = engine.run()
            assert fit.state.theta["locs"].device.type == "cpu" and np.isfinite(fit.log_likelihood())
