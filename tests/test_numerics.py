"""Quantities that are non-negative in exact arithmetic (squared distances, variances, masses, covariance
diagonals) but computed by cancelling expansions, and used where a negative value breaks something.

The mixture tests build inputs on which the expansion provably rounds below zero in IEEE double
arithmetic (the precondition is checked in plain numpy / Python floats, whose elementwise operations are
correctly rounded), so that they fail without the guard on any CPU, whatever its matrix-multiply kernel:

* 1-D points on a 2^-30 grid near ±4686: the data's mean is exactly 0 (every partial sum is exact), so
  the model's centring leaves them unchanged, and ``‖a‖² − 2ac + ‖c‖²`` of the two near-duplicates is one
  product per term (correctly rounded on any CPU) and negative in both orders;
* points on a 2^-20 grid near ±5e5 repeated three times: the component sums are ``3·row`` whatever the
  summation order, and the full-covariance M-step's expansion comes out below ``−reg_covar``.

The other tests hit the linear mixed model's σ² expansion (y with a large offset), SAEM's annealing of a
block Ω with a variance at 0 and the residual diagnostics' Cholesky factor of a simulated covariance.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from latentfit.inference.em import EM
from latentfit.models.mixture import GaussianMixture, _sqdist

A = 5032067192867 * 2.0 ** -30  # 4686.477773698978
C = A + 2.0 ** -30  # its nearest neighbour but one on the grid
P = np.array([545769.9269170761, 532953.24097538])  # multiples of 2^-20


def _expansion(a: float, c: float) -> float:
    """``a² − 2ac + c²`` in the order ``_sqdist`` evaluates it (plain, correctly rounded floats)."""
    return (a * a - (2 * a) * c) + c * c


def _near_duplicates() -> np.ndarray:
    half = [A] * 10 + [C] * 10 + [A + 1.0, A - 1.0]
    return np.array(half + [-v for v in half])


def test_the_inputs_round_below_zero_without_the_guards():
    """Preconditions: the raw expansions are negative on these inputs in IEEE double arithmetic."""
    assert _expansion(A, C) < 0 and _expansion(C, A) < 0
    x = _near_duplicates()
    assert x.sum() == 0.0 and all(abs(np.cumsum(x)) < 2.0 ** 22)  # exact partial sums: centring is a no-op
    # below −reg_covar: the component's covariance is not positive definite even regularised
    assert np.diagonal(_m_step_covariance(P)).min() < -1e-6


def test_squared_distances_are_never_negative(backend):
    x = backend.tensor(_near_duplicates()[:, None])
    d2 = np.asarray(_sqdist(backend.xp, x, x))
    assert d2.min() >= 0.0
    assert d2[0, 10] == 0.0 and d2[10, 0] == 0.0  # A vs C: below the expansion's resolution
    np.testing.assert_array_equal(np.diagonal(d2), 0.0)
    assert d2[0, 20] == pytest.approx(1.0)  # A vs A + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_plus_plus_seeding_on_near_duplicates(backend, seed):
    """Was: ValueError 'probabilities are not non-negative' in the k-means++ draw, for every seed."""
    gm = GaussianMixture(backend.tensor(_near_duplicates()), 3, "diag", seed=seed)
    w = np.asarray(gm.params["weights"].value)
    locs = np.sort(np.asarray(gm.params["locs"].value).ravel())
    assert np.all(w > 0) and w.sum() == pytest.approx(1.0)
    assert locs[0] < -4000 and locs[-1] > 4000  # both far clusters hold a centre


def test_full_covariance_of_repeated_points_stays_positive_definite(backend):
    """Was: ModelSpecificationError 'initial covariance(s) ... not symmetric positive definite' although
    reg_covar > 0: the M-step's expansion rounded the variances of the repeated points below −reg_covar."""
    x = backend.tensor(np.array([P] * 3 + [-P] * 3))
    gm = GaussianMixture(x, 2, "full", seed=0)
    cov = np.asarray(gm.params["covariances"].value)
    np.testing.assert_allclose(cov, np.broadcast_to(1e-6 * np.eye(2), (2, 2, 2)), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "shrank onto single points": expected here
        fit = EM(gm, num_epochs=3, progress=False).run()
    locs = np.sort(np.asarray(fit.params["locs"]), 0)
    np.testing.assert_allclose(locs, [-P, P], rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(np.asarray(fit.params["covariances"])) > 0)


def _m_step_covariance(p: np.ndarray) -> np.ndarray:
    """The full-covariance M-step's expansion for one component holding three copies of ``p`` (sum form,
    in the order of ``GaussianMixture._closed_form``, plain numpy: correctly rounded elementwise ops)."""
    d = p.size
    F = np.concatenate([np.outer(p, p).ravel(), p, [1.0]])
    S = (F + F) + F
    N, Sx, Sxx = S[-1], S[d * d:d * d + d], S[:d * d].reshape(d, d)
    mu = Sx / N
    cross = mu[:, None] * Sx[None, :]
    cov = (Sxx - cross - cross.T + N * mu[:, None] * mu[None, :]) / N
    return 0.5 * (cov + cov.T)


@pytest.mark.parametrize("p", [[-827534.2124071121, 712419.7225608826, 921163.0815324783],
                               [694500.6276378632, -962604.4113540649, 535944.8336372375, -584188.5020961761]],
                         ids=["d3", "d4"])
def test_full_covariance_of_repeated_points_in_more_dimensions(backend, p):
    """For d ≥ 3, zeroing the negative variances and clamping the correlations to [−1, 1] is not enough
    (these inputs stay indefinite): variances at the rounding level of the expansion are zeroed as well."""
    p = np.array(p)  # multiples of 2^-20
    cov = _m_step_covariance(p)
    var = np.maximum(np.diagonal(cov), 0.0)
    bound = np.sqrt(var[:, None] * var[None, :])
    clamped = np.clip(cov, -bound, bound)
    np.fill_diagonal(clamped, var)
    assert np.linalg.eigvalsh(clamped + 1e-6 * np.eye(p.size)).min() < 0  # precondition
    gm = GaussianMixture(backend.tensor(np.array([p] * 3 + [-p] * 3)), 2, "full", seed=0)
    cov = np.asarray(gm.params["covariances"].value)
    np.testing.assert_allclose(cov, np.broadcast_to(1e-6 * np.eye(p.size), cov.shape), rtol=0, atol=1e-12)


def test_negative_running_mass_gives_valid_weights(backend):
    """Incremental engines keep Σ_i r_ik as a running sum of differences: a dead component's mass can end
    just below 0, and the M-step must still return a probability vector (log ω finite)."""
    gm = GaussianMixture(backend.tensor(_near_duplicates()), 3, "diag", seed=0)
    theta = {k: p.value for k, p in gm.params.items()}
    r, _ = gm.responsibilities(theta)
    S = np.array(gm._sum_stats(r, None)["s"])
    dead = int(np.argmin(S[:, -1]))
    S[dead] = 0.0
    S[dead, -1] = -1e-17
    new = gm.m_step({"s": backend.tensor(S)}, theta, gm.num_units)
    w = np.asarray(new["weights"])
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    _, ll = gm.responsibilities({**theta, **new})
    assert np.all(np.isfinite(np.asarray(ll)))


def test_full_covariance_above_the_unrolled_cholesky_size(backend):
    """d > 6 takes the LAPACK branch of ``_precision`` (was: TypeError on torch, ``torch.min(x, dim)``
    returning a (values, indices) pair where the smallest Cholesky pivot was expected)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)) + 4.0 * rng.integers(0, 2, (200, 1))
    fit = EM(GaussianMixture(backend.tensor(x), 2, "full", seed=0), num_epochs=5, progress=False).run()
    assert np.all(np.linalg.eigvalsh(np.asarray(fit.params["covariances"])) > 0)


def test_deterministic_mode_switch():
    """``LATENTFIT_TEST_DETERMINISTIC=1`` (tests/conftest.py) runs the suite in torch's deterministic mode."""
    import os

    import torch

    wanted = os.environ.get("LATENTFIT_TEST_DETERMINISTIC", "") not in ("", "0")
    assert torch.are_deterministic_algorithms_enabled() == wanted


def test_annealing_a_block_omega_with_a_variance_at_zero():
    """SAEM's annealing rescales a block Ω to raise its variances to ``0.97 × previous``; a variance the
    M-step puts at 0 (or rounds just below) made ``sqrt(target / 0)``: inf·0 = NaN in Ω, or the sqrt of a
    negative ratio."""
    import pandas as pd
    import torch

    from latentfit.inference.saem import SAEM
    from latentfit.models import nlme

    rows = []
    for i in range(6):
        rows.append((i + 1, 0.0, np.nan, 100.0, 1))
        rows += [(i + 1, t, 5.0 - 0.3 * t + 0.1 * i, 0.0, 0) for t in (0.5, 1.0, 2.0, 4.0)]
    df = pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID"])
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, omega="full", data=df)
    eng = SAEM(model, num_iters=(20, 10), progress=False)
    theta = model.init_params()
    old = np.diag([0.3, 0.2, 0.1])
    theta["Omega"] = torch.tensor(old)
    for v0 in (0.0, -1e-18):
        new = torch.tensor([[v0, 1e-19, -1e-19], [1e-19, 0.5, 0.05], [-1e-19, 0.05, 0.01]], dtype=torch.float64)
        out = eng._anneal({"Omega": new}, theta, torch.tensor(1))["Omega"].numpy()
        np.testing.assert_allclose(np.diagonal(out), [0.97 * 0.3, 0.5, 0.97 * 0.1], rtol=1e-12)
        np.testing.assert_array_equal(out[0, 1:], 0.0)
        np.testing.assert_array_equal(out[1:, 0], 0.0)
        assert np.linalg.eigvalsh(out).min() > 0
    # a well-conditioned Ω is rescaled exactly as before (correlations kept)
    new = np.array([[0.2, 0.01, 0.0], [0.01, 0.5, 0.05], [0.0, 0.05, 0.01]])
    out = eng._anneal({"Omega": torch.tensor(new)}, theta, torch.tensor(1))["Omega"].numpy()
    s = np.sqrt(np.maximum(np.diagonal(new), 0.97 * np.diagonal(old)) / np.diagonal(new))
    np.testing.assert_allclose(out, new * s[:, None] * s[None, :], rtol=1e-14)


def test_linear_mixed_model_with_a_large_offset_in_y(backend):
    """σ² = (Σyᵀy − 2βᵀg + βᵀHβ − …)/N cancelled Σyᵀy: with y ~ 1e8 (σ = 0.4) every digit was lost and σ
    fell to its 1e-150 floor.  The statistics are now those of y − Xβ_ols: the fit is the same whatever the
    offset (β shifted by it)."""
    from latentfit.models.mixed import LinearMixedModel

    rng = np.random.default_rng(0)
    n, T = 60, 6
    t = np.tile(np.linspace(0, 1, T), (n, 1))
    X = np.stack([np.ones_like(t), t], -1)
    b = rng.multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 0.5]], n)
    y = X @ np.array([2.0, -1.0]) + (X * b[:, None, :]).sum(-1) + 0.4 * rng.normal(size=(n, T))
    fits = []
    for offset in (0.0, 1e8):
        m = LinearMixedModel(y + offset, X, X.copy(), ops=backend.ops())
        fits.append(EM(m, num_epochs=200, progress=False).run(backend.key(0)).params)
    ref, big = fits
    np.testing.assert_allclose(big["sigma"], ref["sigma"], rtol=1e-6)
    np.testing.assert_allclose(big["Omega"], ref["Omega"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(big["beta"]) - [1e8, 0.0], ref["beta"], atol=1e-6)


def test_decorrelation_with_a_singular_simulated_covariance():
    """PWRES / NPDE factor the covariance of simulated observations, PSD in exact arithmetic: a singular one
    (two observations always equal: rank 1) made ``np.linalg.cholesky`` raise for the whole data set."""
    from latentfit.inference.diagnostics import decorrelate

    cov = np.stack([np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([[2.0, 0.5], [0.5, 1.0]])])
    mask = np.ones((2, 2), bool)
    resid = np.array([[[0.3, 0.3], [1.0, -1.0]]])  # [B=1, N=2, T=2]
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(cov)  # precondition
    out = decorrelate(resid, cov, mask)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 1], np.linalg.solve(np.linalg.cholesky(cov[1]), resid[0, 1]), rtol=1e-15)
    assert out[0, 0, 0] == pytest.approx(0.3, rel=1e-5)  # first coordinate: r_1 / √V_11


def test_pwres_and_npde_of_unit_blocks_are_the_per_unit_formula():
    """EPRED, PWRES and the pde of :func:`~latentfit.inference.diagnostics._pwres_and_pde` (units in blocks, the
    simulations whitened by forward substitution) are the textbook computation unit by unit: the mean and unbiased
    covariance of the unit's simulations at its observed entries, ``L⁻¹ (y − E y)`` with LAPACK's solve, the fraction
    of whitened simulations below the whitened observation; and the blocks' size changes nothing (N = 5000, K = 1000:
    10.8 -> 0.6 s, where LAPACK's solve of [N, T, K] right-hand sides took 4.8 s and the arrays were 400 MB each)."""
    from latentfit.inference import diagnostics

    rng = np.random.default_rng(5)
    k, n, t = 400, 9, 6
    mix = rng.normal(size=(n, t, t)) * 0.4 + np.eye(t)
    sims = np.einsum("nts,kns->knt", mix, rng.normal(size=(k, n, t))) + rng.normal(size=(n, t))
    mask = rng.random((n, t)) > 0.25
    mask[:, 0] = True
    mask[3] = [True, False, False, False, False, False]  # one observation
    sims[:, ~mask] = np.nan  # padding: never read
    y = np.where(mask, sims[0] + 0.3 * rng.normal(size=(n, t)), np.nan)
    epred, pwres, pde = diagnostics._pwres_and_pde(y, sims, mask)
    for i in range(n):
        seen = mask[i]
        s = sims[:, i, seen]
        mean = s.mean(0)
        chol = np.linalg.cholesky(np.atleast_2d(np.cov(s, rowvar=False)))
        want = np.linalg.solve(chol, y[i, seen] - mean)
        sims_dec = np.linalg.solve(chol, (s - mean).T).T  # [K, T_i]
        np.testing.assert_allclose(epred[i, seen], mean, rtol=1e-13)
        np.testing.assert_allclose(pwres[i, seen], want, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(pde[i, seen], (sims_dec < want).mean(0))
    saved = diagnostics.RESIDUAL_BLOCK_VALUES
    try:
        for size in (1, 3 * k * t, 10 ** 9):  # a unit, three units, all at once
            diagnostics.RESIDUAL_BLOCK_VALUES = size
            for a, b in zip(diagnostics._pwres_and_pde(y, sims, mask), (epred, pwres, pde)):
                np.testing.assert_allclose(a[mask], b[mask], rtol=1e-14, atol=0)
    finally:
        diagnostics.RESIDUAL_BLOCK_VALUES = saved


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_residuals_of_a_large_population_simulate_in_blocks_of_units(backend, monkeypatch):
    """Beyond RESIDUAL_SIMULATION_BLOCK_VALUES simulated values the residuals simulate a block of units at a time
    (N = 5000 x 10, K = 1000: peak memory +1.6 GB at once, growing with N; +0.14 GB in blocks).  Checked with the
    threshold lowered on theophylline: no simulation holds more units than a block; a fit on per-unit streams gets the
    values of the whole simulation (its units' streams: bit for bit on torch, to the float32 draws' rounding on JAX);
    another fit's blocks draw from the seed's stream in turn: reproducible, a new seed new values, and the NPDE a
    standard normal sample; occasions (κ per subject and occasion) go in blocks too."""
    pytest.importorskip("jax")
    import pandas as pd

    import latentfit as lf
    from latentfit.inference import diagnostics
    from latentfit.models import nlme

    df = lf.datasets.theophylline(saemix_form=True)
    spec = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
    init = {"ka": nlme.Parameter(1.5, omega2=0.4), "V": nlme.Parameter(31.0, omega2=0.02),
            "CL": nlme.Parameter(2.7, omega2=0.07)}
    truth = nlme.NLME("one_compartment_oral", init, data=df, error_init={"a": 0.7}, **spec)
    data = truth.simulate(seed=11)  # theophylline's design, DV from the model
    model = nlme.NLME("one_compartment_oral", init, data=data, backend=backend, error_init={"a": 0.7}, **spec)
    theta = model.init_params()
    z = model.prior_moments(theta)[0]
    k, width = 300, 10
    whole = diagnostics.residuals(model, theta, z, num_sims=k, seed=3, unit_ids=np.arange(12))
    glob = diagnostics.residuals(model, theta, z, num_sims=k, seed=3)
    seen = []
    whiten = diagnostics._pwres_and_pde

    def spy(y, sims, mask):
        seen.append(sims.shape)
        return whiten(y, sims, mask)

    monkeypatch.setattr(diagnostics, "_pwres_and_pde", spy)
    monkeypatch.setattr(diagnostics, "RESIDUAL_SIMULATION_BLOCK_VALUES", 5 * k * width)  # blocks of 5 units
    blocks = diagnostics.residuals(model, theta, z, num_sims=k, seed=3, unit_ids=np.arange(12))
    assert seen == [(k, 5, width), (k, 5, width), (k, 2, width)]  # each block's simulations, alone
    exact = backend == "torch"
    for name in ("pred", "ipred", "iwres", "epred", "pwres", "npde"):
        a, b = getattr(whole, name)[whole.mask], getattr(blocks, name)[blocks.mask]
        if exact or name in ("pred", "ipred", "iwres"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    if not exact:  # a pde may move by one simulation: its NPDE by a step of Φ⁻¹
        assert np.mean(whole.npde[whole.mask] == blocks.npde[blocks.mask]) > 0.95
    seen.clear()
    one = diagnostics.residuals(model, theta, z, num_sims=k, seed=3)
    assert seen == [(k, 5, width), (k, 5, width), (k, 2, width)]
    again = diagnostics.residuals(model, theta, z, num_sims=k, seed=3)
    other = diagnostics.residuals(model, theta, z, num_sims=k, seed=4)
    np.testing.assert_array_equal(one.npde, again.npde)
    assert not np.allclose(one.epred[one.mask], other.epred[other.mask])
    np.testing.assert_array_equal(one.pred, glob.pred)
    for res in (glob, one):  # 120 observations simulated at θ: their NPDE are a standard normal sample
        npde = res.npde[res.mask]
        assert abs(np.mean(npde)) < 0.3 and 0.75 < np.std(npde) < 1.25, (np.mean(npde), np.std(npde))
    # an occasion model: κ per (subject, occasion) drawn with each block's subjects
    occ = df.assign(OCC=np.where(df["Time"] < 5.0, 1, 2))
    iov = nlme.NLME("one_compartment_oral", init, data=occ, backend=backend, iov={"CL": 0.05}, **spec)
    th = iov.init_params()
    res = diagnostics.residuals(iov, th, iov.prior_moments(th)[0], num_sims=k, seed=1)
    assert np.all(np.isfinite(res.npde[res.mask])) and isinstance(res.to_frame(), pd.DataFrame)


def test_residuals_need_more_simulations_than_observations_per_unit():
    """With num_sims ≤ T the simulated covariance is singular by construction: a clear error, not a
    LinAlgError from the Cholesky factorisation."""
    import pandas as pd

    from latentfit.inference.diagnostics import residuals
    from latentfit.models import nlme

    rows = []
    for i in range(4):
        rows.append((i + 1, 0.0, np.nan, 100.0, 1))
        rows += [(i + 1, t, 5.0 - 0.3 * t + 0.1 * i, 0.0, 0) for t in (0.5, 1.0, 2.0, 4.0, 8.0)]
    df = pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID"])
    model = nlme.NLME("one_compartment_oral", {"ka": 1.2, "V": 20.0, "CL": 2.0}, data=df)
    theta = model.init_params()
    z = model.prior_moments(theta)[0]
    with pytest.raises(ValueError, match="num_sims=5 must exceed"):
        residuals(model, theta, z, num_sims=5)
    res = residuals(model, theta, z, num_sims=50)
    assert np.all(np.isfinite(res.npde[res.mask]))
