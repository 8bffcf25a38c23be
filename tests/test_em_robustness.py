"""The stochastic EM engines from the start a hand-written EM uses (K random points as means, the data covariance for
every component, equal weights), and their defaults.

* FIEM / sEM-VR: the variance-reduced proxy ``S̄ + (n/b) Σ_B (s̄_i(θ) − s_i)`` can leave the M-step's domain far from
  the anchor (an indefinite scatter: no covariance maximises the M-step's objective).  It used to reach the M-step and
  the next E-step raised "the covariance of component(s) [k] is singular" in the first epoch, with ``reg_covar=0.1``
  and ``regularize=True`` too; now its control variate is shrunk back into the domain and the engines reach exact
  EM's fixed point.
* A covariance that is genuinely singular (``reg_covar=0``, points on a line) stops the fit with the last good state
  in the error, as a NaN θ does.
* SEM's default step moves the statistics appreciably per epoch (it was the running mean of every proxy since the
  start: far from the maximum after 100 epochs); IEM's default refreshes blocks of n/100 units (vectorised epochs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentfit import DegenerateFitError, ModelSpecificationError, NonFiniteError
from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.inference.iem import IEM
from latentfit.inference.sem import SEM
from latentfit.inference.semvr import SEMVR
from latentfit.inference.stats_table import ControlVariate
from latentfit.models.mixture import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mixture(n: int, d: int, K: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A well-separated mixture with random full covariances, and a hand-written EM's start: K random data points as
    means, the data covariance for every component, equal weights."""
    rng = np.random.default_rng(seed)
    locs = rng.normal(size=(K, d)) * 3
    A = rng.normal(size=(K, d, d)) * 0.5
    covs = A @ A.transpose(0, 2, 1) + 0.3 * np.eye(d)
    w = rng.dirichlet(np.full(K, 5.0))
    lab = rng.choice(K, n, p=w)
    x = locs[lab] + np.einsum("nij,nj->ni", np.linalg.cholesky(covs)[lab], rng.normal(size=(n, d)))
    start = np.random.default_rng(1).choice(n, K, replace=False)
    init = dict(weights=np.full(K, 1 / K), locs=x[start], covariances=np.stack([np.cov(x.T)] * K))
    return x, init


@pytest.mark.parametrize("engine", [FIEM, SEMVR])
def test_variance_reduced_engines_reach_em_fixed_point_from_random_points(backend, engine):
    """n = 2000, d = 5, K = 5, default batch size and step: the old engines raised in the first epoch; now they
    reach exact EM's fixed point (θ to 1e-9, log-likelihood to 1e-6)."""
    x, init = _mixture(2000, 5, 5)
    em = EM(GaussianMixture(backend.tensor(x), 5, **init), num_epochs=100, progress=False).run()
    fit = engine(GaussianMixture(backend.tensor(x), 5, **init), num_epochs=40, seed=0, progress=False).run()
    for name in ("weights", "locs", "covariances"):
        np.testing.assert_allclose(fit.params[name], em.params[name], rtol=0, atol=1e-9)
    assert abs(fit.log_likelihood() - em.log_likelihood()) < 1e-6


def test_a_step_out_of_the_domain_gets_its_control_variate_shrunk():
    """The safeguard itself: a drift that would make a component's scatter indefinite after the fast step is scaled
    back, per component, to the largest c·2^-j that keeps the new S̃ in the M-step's domain; a step that stays in it
    (even with a proxy outside it: a small ρ) is the plain step ``S̃ + ρ (base + c·drift − S̃)``."""
    x, init = _mixture(500, 3, 2)
    gm = GaussianMixture(torch.tensor(x), 2, **init)
    eng = FIEM(gm, num_epochs=1, progress=False)
    base = gm.sum_expected_stats(gm.init_params())[0]
    assert bool(gm.stats_in_domain(base).all())
    drift = torch.zeros_like(base["s"])
    drift[1, :9] = -torch.eye(3, dtype=drift.dtype).reshape(-1) * base["s"][1, 0]  # component 1: its Sxx shrinks
    cv = ControlVariate(base, {"s": drift}, 100.0)
    s_tilde = {"s": base["s"] * 1.0}

    def plain(rho, c=100.0):
        return s_tilde["s"] + rho * (base["s"] + c * drift - s_tilde["s"])

    new = eng.fast_step(s_tilde, cv, 0.5)["s"]
    assert torch.equal(new[0], plain(0.5)[0])  # no drift: the plain step
    assert bool(gm.stats_in_domain({"s": new}).all()) and not bool(gm.stats_in_domain({"s": plain(0.5)})[1])
    c = float((new[1, 0] - plain(0.5, 0.0)[1, 0]) / (0.5 * drift[1, 0]))  # the factor applied to component 1
    j = round(np.log2(100.0 / c))
    assert 1 <= j <= 10 and abs(c - 100.0 * 0.5 ** j) < 1e-9 * c
    assert not bool(gm.stats_in_domain({"s": plain(0.5, 2 * c)})[1])  # the next larger factor is out
    # a proxy out of the domain, a step that is not: untouched (the paper's small ρ with b = 1)
    assert not bool(gm.stats_in_domain({"s": base["s"] + 100.0 * drift})[1])
    torch.testing.assert_close(eng.fast_step(s_tilde, cv, 1e-3)["s"], plain(1e-3), rtol=0, atol=0)


def test_m_step_maps_an_indefinite_scatter_to_the_nearest_valid_covariance():
    """Statistics no posterior gives (d = 3: a scatter with positive variances and correlations in [−1, 1], yet
    indefinite): the covariance is the scatter's PSD part plus reg_covar·I, never indefinite (it was the indefinite
    matrix plus reg_covar·I); a valid statistic's M-step is unchanged (EM's fixed point)."""
    x, init = _mixture(300, 3, 2)
    gm = GaussianMixture(torch.tensor(x), 2, reg_covar=1e-3, **init)
    theta = gm.init_params()
    s = gm.sum_expected_stats(theta)[0]["s"].clone()
    valid = gm.m_step({"s": s}, theta, 300)["covariances"]
    m = torch.tensor([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]], dtype=s.dtype)  # eigenvalues −0.8, 1.9, 1.9
    N, mu = s[0, -1], s[0, 9:12] / s[0, -1]
    bad = s.clone()
    bad[0, :9] = (N * (m + torch.outer(mu, mu))).reshape(-1)  # component 0's scatter/N is m
    assert not bool(gm.stats_in_domain({"s": bad})[0])
    cov = gm.m_step({"s": bad}, theta, 300)["covariances"]
    w, u = torch.linalg.eigh(m)
    nearest = (u * w.clamp(min=0)) @ u.T
    torch.testing.assert_close(cov[0], nearest + 1e-3 * torch.eye(3, dtype=s.dtype), rtol=0, atol=1e-9)
    assert torch.equal(cov[1], valid[1])


def test_a_singular_covariance_stops_the_fit_with_the_last_good_state():
    """Points on a line with reg_covar=0: the covariance becomes singular.  The error says so and what to do, and holds
    the last good state (a NonFiniteError, as a NaN θ; a ModelSpecificationError, as before)."""
    t = np.linspace(0, 1, 40)
    x = np.stack([t, 2 * t], 1)
    gm = GaussianMixture(x, 1, "full", reg_covar=0.0, covariances=np.eye(2)[None])
    with pytest.raises(DegenerateFitError, match=r"singular.*reg_covar=0.*iteration 2") as info:
        EM(gm, num_epochs=30, chunk_size=10, progress=False).run()
    err = info.value
    assert isinstance(err, NonFiniteError) and isinstance(err, ModelSpecificationError)
    assert (err.iteration, err.last_good_iteration) == (2, 1)
    assert err.result.interrupted and err.result.history["theta.covariances"].shape[0] == 1
    assert "regularize=True" not in str(err)  # (it floors no covariance)


def test_sem_default_step_moves_the_statistics():
    """n = 1000, overlapping components, start at random points: SEM's default reaches EM's maximum within 0.5
    log-likelihood units in 30 epochs (the running-mean step 1/(t + 5) was 271 units below it)."""
    x, init = _mixture(1000, 2, 3, seed=3)
    em = EM(GaussianMixture(x, 3, **init), num_epochs=500, progress=False).run().log_likelihood()
    fit = SEM(GaussianMixture(x, 3, **init), num_epochs=30, seed=0, progress=False).run()
    assert em - fit.log_likelihood() < 0.5
    old = SEM(GaussianMixture(x, 3, **init), num_epochs=30, seed=0, rho=lambda t: 1.0 / (t + 5.0),
              progress=False).run()
    assert em - old.log_likelihood() > 10


def test_iem_default_epoch_is_one_hundred_vectorised_blocks():
    """IEM's default refreshes blocks of ⌈n/100⌉ units (Neal & Hinton's blocks): 100 iterations per epoch whatever n,
    not n; FIEM and sEM-VR take at least 50 units per mini-batch."""
    x = np.random.default_rng(0).normal(size=(20000, 2))
    eng = IEM(GaussianMixture(x, 2), num_epochs=1, progress=False)
    assert (eng.batch_size, eng.num_batches) == (200, 100)
    assert IEM(GaussianMixture(x, 2), batch_size=1, progress=False).num_batches == 20000  # b = 1 on request
    fit = IEM(GaussianMixture(x[:3000], 2), num_epochs=1, trace_params=["locs"], progress=False).run()
    assert fit.history["inner.locs"].shape[:2] == (1, 100)
    for engine in (FIEM, SEMVR):
        small = engine(GaussianMixture(x[:500], 2), progress=False)
        assert (small.batch_size, small.num_batches) == (50, 10)
        assert engine(GaussianMixture(x, 2), progress=False).batch_size == 200
        assert engine(GaussianMixture(x[:30], 2), progress=False).batch_size == 30
