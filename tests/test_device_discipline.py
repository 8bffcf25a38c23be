"""Engines and post-fit tools never create a tensor on torch's default device, nor in another float dtype than the
model's.

Without a GPU this is checked by making ``meta`` the default device: any tensor an engine created without
following the data's device would land there and fail when combined with the CPU data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_nlme_ode import THEO, oral_ode
from test_obs_mask import G, rows_data, rows_exact

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


@pytest.mark.parametrize("engine, options", [("SAEM", {"num_iters": (20, 10)}), ("FSAEM", {"num_iters": (20, 10)}),
                                             ("MCMCSGD", {"num_iters": 60}),
                                             ("MISSO", {"num_epochs": 8, "mc_size": 20, "batch_size": 12}),
                                             ("MISSO", {"surrogate": "paper", "num_epochs": 8, "mc_size": 20,
                                                        "batch_size": 12})])
def test_float32_pyro_model_keeps_its_dtype_through_the_fit_and_the_post_fit_tools(engine, options):
    """An all-float32 Pyro model (torch's default dtype, the tutorials'): SAEM's step size was a float64 scalar (the
    schedules' ``select``), which promoted the 0-dim residual statistics and so σ to float64; every post-fit tool but
    "is" then failed in the Gauss–Newton precision (``expected scalar type Float but found Double``) and FSAEM's fit
    itself.  MISSO's fit failed (``index_add_(): self (Float) and source (Double)``): its forward-mode scores in θ
    gave τ and σ float64 derivatives, torch's positive map ``exp`` then ``+ 0.`` (a Python float) promoting the
    tangent of a 0-dim param (the Louis surrogate scores every free parameter; "paper" only β: it passed).  Every
    estimate stays float32 and the linearisation, exact on this linear model, is the float64 closed form at θ̂ to
    float32 rounding; MISSO keeps no latent draws: the post-fit tools draw them at θ̂ (``draws_at_estimate``), in
    float32 too."""
    import pyro
    from models_pyro import masked_rows

    import latentfit.pyro as lp

    group, x, y, m = rows_data()
    f32 = torch.float32
    pyro.clear_param_store()
    fit = getattr(lp, engine)(masked_rows, seed=0, progress=False, **options).run(
        torch.as_tensor(group), torch.tensor(x, dtype=f32), G, torch.tensor(y, dtype=f32), torch.as_tensor(m), "mask")
    assert {n: v.dtype for n, v in fit.params.items()} == {n: np.float32 for n in ("mu", "tau", "beta", "sigma")}
    theta = {k: float(v) for k, v in fit.params.items()}
    ll, mean, _, info = rows_exact(theta)
    np.testing.assert_allclose(fit.log_likelihood("gq"), ll.sum(), rtol=1e-5)
    if engine == "MISSO":
        if options.get("surrogate") == "paper":  # (Louis' 8 epochs are far from it, in float64 too)
            assert ll.sum() > -41.3  # the maximum is -40.78 (τ̂ = 0.858, σ̂ = 0.478)
    np.testing.assert_allclose(fit.log_likelihood("lin"), ll.sum(), rtol=1e-5)
    assert np.isfinite(fit.log_likelihood("is"))
    se = fit.standard_errors()
    np.testing.assert_allclose([se[k] for k in ("mu", "tau", "beta", "sigma")],
                               np.sqrt(np.diag(np.linalg.inv(info))), rtol=1e-3)
    np.testing.assert_allclose(fit.individual_estimates().mode[:, 0], mean, rtol=1e-4, atol=1e-5)
    assert len(fit.summary()) > 0



@pytest.mark.parametrize("engine, options", [("MCEM", {"num_epochs": 10, "num_samples": 20}),
                                             ("MiniBatchMCEM", {"num_epochs": 10, "num_samples": 20}),
                                             ("TTSEM", {"num_epochs": 10, "batch_size": 10}),
                                             ("MISSO", {"num_epochs": 8})])
def test_float32_random_intercept_keeps_its_dtype_through_the_em_family(engine, options):
    """The Monte-Carlo EM family and MISSO (its default Louis surrogate: ``expected m1 and m2 to have the same dtype``
    before) on a float32 random-intercept model: every estimate float32, near the closed-form maximum likelihood,
    and the quadrature's log-likelihood the float64 closed form at θ̂."""
    import pyro
    from models_pyro import random_intercept
    from scipy import stats

    import latentfit.pyro as lp

    g = torch.Generator().manual_seed(0)
    y = (1.0 + 0.8 * torch.randn(40, 1, generator=g) + 0.5 * torch.randn(40, 5, generator=g)).float()
    pyro.clear_param_store()
    fit = getattr(lp, engine)(random_intercept, seed=0, progress=False, **options).run(y)
    assert {n: v.dtype for n, v in fit.params.items()} == {n: np.float32 for n in ("mu", "omega", "sigma")}
    yy = y.double().numpy()
    ybar = yy.mean(1)
    s2 = float(((yy - ybar[:, None]) ** 2).sum()) / (40 * 4)
    mle = {"mu": float(yy.mean()), "omega": (float(ybar.var()) - s2 / 5) ** 0.5, "sigma": s2 ** 0.5}
    th = {k: float(v) for k, v in fit.params.items()}
    assert all(abs(th[k] - mle[k]) < 0.03 for k in mle)
    cov = th["omega"] ** 2 * np.ones((5, 5)) + th["sigma"] ** 2 * np.eye(5)
    exact = stats.multivariate_normal.logpdf(yy, th["mu"] * np.ones(5), cov).sum()
    np.testing.assert_allclose(fit.log_likelihood("gq"), exact, rtol=1e-5)


def test_pyro_param_maps_keep_a_float32_derivative():
    """torch maps ``positive``, ``greater_than``, ``less_than`` and ``interval`` by an affine part with Python-number
    constants; torch's forward mode makes the derivative of a 0-dim float32 tensor plus a Python float float64
    (pytorch/pytorch#90065).  The params' maps hold those constants as tensors of the fit's dtype: float32
    derivatives, the same values."""
    from torch.distributions import constraints, transform_to

    from latentfit.integrations.pyro import PyroPPL

    x = torch.tensor(0.3)
    for c in (constraints.positive, constraints.greater_than(1.0), constraints.less_than(2.0),
              constraints.interval(-1.0, 3.0), constraints.unit_interval, constraints.real):
        t = PyroPPL().param_transform(c, torch.float32, x.device)
        y, dy = torch.func.jvp(t, (x,), (torch.ones_like(x),))
        _, dx = torch.func.jvp(t.inv, (y,), (torch.ones_like(y),))
        assert (y.dtype, dy.dtype, dx.dtype) == (torch.float32,) * 3
        assert torch.equal(y, transform_to(c)(x)) and torch.equal(t.inv(y), transform_to(c).inv(y))

def test_a_small_cpu_fit_iterates_on_one_torch_thread_and_restores_the_callers_setting(monkeypatch):
    """Small problems run their iterations on one intra-op thread (:meth:`TorchOps.iteration_threads`: on a busy
    machine torch's other threads spun for the core, theophylline 16.5 s against 1.9 s), the caller's setting back
    after the fit, also when it fails; a large problem keeps torch's threads."""
    from latentfit.inference.ops import TorchOps
    from latentfit.inference.saem import SAEM

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    try:
        df = lf.datasets.theophylline(saemix_form=True)
        model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, data=df, **THEO)
        step = SAEM.step

        def spy(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            return step(self, *args, **kwargs)

        monkeypatch.setattr(SAEM, "step", spy)
        engine = SAEM(model, (6, 2), seed=0, progress=False)
        assert engine.problem_elements() == 120 * engine.num_chains
        engine.run()
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(TorchOps, "SMALL_PROBLEM_ELEMENTS", 100)  # the same fit as a "large" problem
        SAEM(model, (6, 2), seed=0, progress=False).run()
        assert set(seen) == {2} and torch.get_num_threads() == 2
        monkeypatch.setattr(TorchOps, "SMALL_PROBLEM_ELEMENTS", 32768)
        monkeypatch.setattr(SAEM, "step", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
        with pytest.raises(ValueError, match="boom"):
            SAEM(model, (6, 2), seed=0, progress=False).run()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
