"""EM family (EM, MiniBatchEM, IEM, SEM, SEMVR, FIEM, MCEM, MiniBatchMCEM, TTSEM) on small mixtures.

Engine tests take the ``backend`` fixture: the same engine runs on a ``GaussianMixture`` holding torch
tensors (Pyro backend) or JAX arrays (NumPyro backend, compiled epochs, float64).
Reference: exact EM run to convergence (its fixed point θ*, on torch).  Exact incremental / variance-reduced
engines must reach θ* to 1e-8; decreasing-step online EM to 2e-2 in 40 epochs; Monte-Carlo engines within 4
Monte-Carlo SDs of θ*, per engine and parameter (SDs measured over seeds, see ``MC_SD``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentfit import ModelSpecificationError
from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.inference.iem import IEM, MiniBatchEM
from latentfit.inference.mcem import MCEM, MiniBatchMCEM
from latentfit.inference.semvr import SEMVR
from latentfit.inference.ttsem import TTSEM
from latentfit.models.mixture import GaussianMixture

CENTRES = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int = 400, seed: int = 0, dtype=torch.float64, backend=None):
    """``n`` points of the 3-component mixture: a torch tensor, or ``backend``'s float64 array."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 2)) * 0.6 + CENTRES[lab]
    return torch.tensor(x, dtype=dtype) if backend is None else backend.tensor(x)


def _gm(x, cov="diag", **kw) -> GaussianMixture:
    return GaussianMixture(x, 3, cov, seed=1, **kw)


@pytest.fixture(scope="module")
def data_and_star():
    x = _data()
    star = EM(_gm(x), num_epochs=400, progress=False).run().params
    return x.numpy(), star


def _err(params, star) -> float:
    return max(float(np.abs(params[k] - star[k]).max()) for k in star)


@pytest.mark.parametrize("engine, kwargs, tol", [
    ("IEM", dict(num_epochs=25, batch_size=2), 1e-8),
    ("MiniBatchEM", dict(num_epochs=60), 1e-8),
    ("FIEM", dict(num_epochs=60, batch_size=8), 1e-8),
    ("SEMVR", dict(num_epochs=60, batch_size=8), 1e-8),
    ("SEM", dict(num_epochs=40, batch_size=8), 2e-2),  # ρ_t = (t + 10)^(−0.6): the noise decays as √ρ_t
])
def test_exact_engines_reach_em_fixed_point(backend, data_and_star, engine, kwargs, tol):
    """Through the front doors (``latentfit.pyro`` / ``latentfit.numpyro``) with a ready-made model."""
    x, star = data_and_star
    fit = backend.fit(engine, _gm(backend.tensor(x)), seed=0, progress=False, **kwargs)
    assert _err(fit.params, star) < tol
    assert fit.history["theta.locs"].shape[0] == kwargs["num_epochs"]  # history counts epochs


#: Monte-Carlo SD of one run's weights / locs / covariances around θ* (largest over the coordinates of each), measured
#: over seeds 0–19 (torch) and 0–7 (JAX), the larger of the two backends
MC_SD = {
    "MCEM": dict(weights=0.0005, locs=0.0025, covariances=0.0031),
    "MiniBatchMCEM": dict(weights=0.0008, locs=0.0035, covariances=0.0043),
    "fiTTEM": dict(weights=0.0010, locs=0.0044, covariances=0.0058),
    "vrTTEM": dict(weights=0.0012, locs=0.0055, covariances=0.0073),
    "iSAEM": dict(weights=0.0010, locs=0.0046, covariances=0.0058),
    "SAEM": dict(weights=0.0005, locs=0.0018, covariances=0.0023),
}


@pytest.mark.parametrize("engine, kwargs, sd", [
    (MCEM, dict(num_epochs=40, num_samples=50), MC_SD["MCEM"]),
    (MiniBatchMCEM, dict(num_epochs=40, num_samples=20), MC_SD["MiniBatchMCEM"]),
    (TTSEM, dict(num_epochs=20, variant="fi", batch_size=8), MC_SD["fiTTEM"]),
    (TTSEM, dict(num_epochs=20, variant="vr", batch_size=8), MC_SD["vrTTEM"]),
    (TTSEM, dict(num_epochs=20, variant="isaem", batch_size=8), MC_SD["iSAEM"]),
    (TTSEM, dict(num_epochs=60, variant="saem"), MC_SD["SAEM"]),
])
def test_monte_carlo_engines_reach_em_fixed_point_within_mc_error(backend, data_and_star, engine, kwargs, sd):
    x, star = data_and_star
    fit = engine(_gm(backend.tensor(x)), seed=0, progress=False, **kwargs).run(backend.key(0))
    assert np.all(np.isfinite(fit.params["locs"]))
    for name in star:
        err = float(np.abs(fit.params[name] - star[name]).max())
        assert err < 4 * sd[name], (name, err, sd[name])


@pytest.mark.parametrize("engine", [MiniBatchEM, IEM, FIEM, SEMVR])
def test_full_batch_pass_equals_em_iterations(backend, engine):
    """b = n: the incremental table / control variates reduce to the EM update (ρ = (n/b)^(−2/3) = 1)."""
    x = _data(150, backend=backend)
    em = EM(_gm(x, "full"), num_epochs=3, progress=False).run()
    fit = engine(_gm(x, "full"), num_epochs=3, batch_size=150, progress=False).run()
    for k in ("weights", "locs", "covariances"):
        np.testing.assert_allclose(fit.history[f"theta.{k}"], em.history[f"theta.{k}"], rtol=0, atol=1e-12)


def test_iem_one_pass_in_fixed_order_matches_sequential_em_updates(backend):
    """iEM (b = 1, sequential order) = Neal–Hinton: after visiting unit i the statistic is
    Σ_{j≤i} s̄_j(θ^{j−1}) + Σ_{j>i} s̄_j(θ⁰); replayed here by hand with the model's own E/M maps."""
    x = _data(30, backend=backend)
    gm = _gm(x)
    fit = IEM(gm, num_epochs=1, batch_size=1, shuffle=False, trace_params=["locs"], progress=False).run(
        backend.key(0))
    theta = gm.init_params()
    table = backend.to_numpy(gm.expected_stats(theta)["s"]).copy()
    for i in range(30):
        table[i] = backend.to_numpy(gm.expected_stats(theta, gm.ops.asarray(np.array([i])))["s"][0])
        theta = dict(theta, **gm.m_step({"s": backend.tensor(table.sum(0))}, theta, 30))
        np.testing.assert_allclose(fit.history["inner.locs"][0, i], backend.to_numpy(theta["locs"]), atol=1e-12)


def test_em_log_likelihood_never_decreases(backend):
    x = _data(300, seed=3, backend=backend)
    gm = _gm(x, "full")
    fit = EM(gm, num_epochs=60, progress=False).run(backend.key(0))
    ll = fit.history["objective"]
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[:-1]))
    assert ll[-1] > ll[0]
    # the objective is the exact marginal log-likelihood at the θ of that E-step
    theta = {k: backend.tensor(v[-2]) for k, v in
             ((n[len("theta."):], fit.history[n]) for n in fit.history if n.startswith("theta."))}
    assert abs(float(gm.marginal_log_lik(theta).sum()) - ll[-1]) < 1e-8


def test_tables_and_snapshots_follow_data_dtype_and_device():
    """Torch only: float32 / device of torch tables (JAX float32 is test_engines_are_backend_neutral_on_jax)."""
    x = _data(120, dtype=torch.float32)
    for engine in (FIEM, SEMVR, MiniBatchEM):
        eng = engine(_gm(x), num_epochs=2, batch_size=10, progress=False)
        fit = eng.run()
        memory = fit.state.memory
        tables = [v for key in ("table", "snap_table") if key in getattr(memory, "_fields", ())
                  for v in getattr(memory, key).values()]
        assert tables
        for t in tables + list(fit.state.s_tilde.values()):
            assert t.dtype == torch.float32 and t.device == x.device
            assert t.shape[0] in (120, 3)
        assert fit.params["locs"].dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tables_on_gpu():  # torch only: CUDA placement of torch tables
    x = _data(200).cuda()
    fit = FIEM(_gm(x), num_epochs=3, batch_size=20, progress=False).run()
    assert fit.state.memory.table["r"].device.type == "cuda"
    assert fit.state.theta["locs"].device.type == "cuda"


def test_inner_trace_records_every_iteration(backend):
    x = _data(100, backend=backend)
    fit = FIEM(_gm(x), num_epochs=3, batch_size=10, trace_params=["locs"], progress=False).run(backend.key(0))
    assert fit.history["inner.locs"].shape == (3, 10, 3, 2)
    np.testing.assert_allclose(fit.history["inner.locs"][:, -1], fit.history["theta.locs"])


def test_bad_options_give_clear_errors(backend):
    gm = _gm(_data(50, backend=backend))  # engines validate their options against the model, never change it
    with pytest.raises(ValueError, match="batch_size=60 exceeds"):
        FIEM(gm, batch_size=60)
    with pytest.raises(ValueError, match="num_epochs"):
        IEM(gm, num_epochs=0)
    with pytest.raises(ValueError, match="variant"):
        TTSEM(gm, variant="fast")
    with pytest.raises(ValueError, match="full-batch"):
        EM(gm, batch_size=10)
    with pytest.raises(ValueError, match="trace_params"):
        FIEM(gm, trace_params=["mu"])
    with pytest.raises(ValueError, match="constant step"):
        FIEM(gm, rho=2.0)


@pytest.mark.slow_on("numpyro")  # ~50 s of CPU (its MC engines compile); the Pyro case stays in the default suite
def test_exact_engines_refuse_continuous_latents_and_mc_engines_fit_them(backend):
    """Balanced one-way random-effects model (a plain Pyro / NumPyro model through the front door):
    MLE in closed form (μ̂ = ȳ, σ̂² = within MS, ω̂² = between variance − σ̂²/T); EM asks for an exact
    E-step; MCEM through the batched MH chains lands within 4 Monte-Carlo SDs of it (SD of μ̂, σ̂², ω̂² over seeds
    0–7: 0.006 / 0.0014 / 0.0071 on torch, 0.004 / 0.0012 / 0.0080 on JAX; no bias beyond it)."""
    rng = np.random.default_rng(0)
    n, T = 60, 6
    y = 1.0 + 0.8 * rng.normal(size=(n, 1)) + 0.5 * rng.normal(size=(n, T))
    with pytest.raises(ModelSpecificationError, match="exact E-step"):
        backend.fit("EM", backend.models.random_intercept, backend.tensor(y), num_epochs=5, progress=False)
    backend.reset()
    fit = backend.fit("MCEM", backend.models.random_intercept, backend.tensor(y), num_epochs=60, num_samples=20,
                      mcmc_steps=2, progress=False)
    ybar = y.mean(1)
    sigma2 = float(((y - ybar[:, None]) ** 2).sum() / (n * (T - 1)))
    omega2 = float(ybar.var()) - sigma2 / T
    assert abs(float(fit.params["mu"]) - float(y.mean())) < 4 * 0.006
    assert abs(float(fit.params["sigma"]) ** 2 - sigma2) < 4 * 0.0014
    assert abs(float(fit.params["omega"]) ** 2 - omega2) < 4 * 0.008


def test_engines_are_backend_neutral_on_jax():
    """Same engines, JAX ops (compiled epochs, float32): FIEM reaches the torch EM fixed point to float32
    precision (1e-4), TTSEM within Monte-Carlo error."""
    jnp = pytest.importorskip("jax.numpy")
    from latentfit.inference.ops_jax import JaxOps

    x = _data(200).numpy()
    star = EM(_gm(torch.as_tensor(x)), num_epochs=300, progress=False).run().params
    fit = FIEM(_gm(x, ops=JaxOps(dtype=jnp.float32)), num_epochs=25, batch_size=10, progress=False).run()
    assert fit.params["locs"].dtype == np.float32
    assert _err(fit.params, star) < 1e-4
    fit = TTSEM(_gm(x, ops=JaxOps(dtype=jnp.float32)), num_epochs=20, batch_size=10, progress=False).run()
    # 4 Monte-Carlo SDs (measured over seeds 0–7: weights 0.0010, locs 0.0042, covariances 0.0071)
    for name, sd in dict(weights=0.0010, locs=0.0042, covariances=0.0071).items():
        assert float(np.abs(fit.params[name] - star[name]).max()) < 4 * sd, name


def test_semvr_first_epoch_reuses_the_initial_snapshot(monkeypatch):
    """An eager SEMVR fit's first epoch starts at θ⁰, where the initial pass has just computed the exact snapshot:
    it keeps that snapshot (one full pass per epoch in all, the initial one included) and the fit equals, bit for
    bit, the fit that recomputes it."""
    from latentfit.inference.semvr import SnapshotRule
    from latentfit.inference.stats_table import StatEngine

    model = GaussianMixture(_data(300), 3, "full", seed=0)
    passes = [0]
    full_pass = StatEngine.full_pass

    def counted(self, *args, **kwargs):
        passes[0] += 1
        return full_pass(self, *args, **kwargs)

    monkeypatch.setattr(StatEngine, "full_pass", counted)
    fit = SEMVR(model, num_epochs=4, batch_size=30, seed=1, progress=False).run()
    assert passes[0] == 4
    init = SnapshotRule.init

    def forgetful(self, eng, theta, full, rows):  # the snapshot is not known to be θ⁰'s: recomputed at epoch 1
        memory = init(self, eng, theta, full, rows)
        eng.__dict__.pop("_snapshot_at", None)
        return memory

    monkeypatch.setattr(SnapshotRule, "init", forgetful)
    passes[0] = 0
    again = SEMVR(model, num_epochs=4, batch_size=30, seed=1, progress=False).run()
    assert passes[0] == 5
    for name in fit.params:
        np.testing.assert_array_equal(fit.params[name], again.params[name])
