"""Observations with ``obs_mask=`` (Pyro and NumPyro): the missing entries integrate out exactly.

``sample("y", d, obs=y, obs_mask=m)`` is split by both PPLs into an observed site ``y_observed`` (masked to ``m``) and
a site ``y_unobserved`` (masked to ``~m``) imputing the missing entries.  No other density reads the imputed values
here, so ``∫ p(y_mis | b) dy_mis = 1``: the model fitted is ``p(y_obs, b; θ)``, the one latent is ``b``, and every
quantity has the closed form of a linear Gaussian mixed model, a multivariate normal per unit over its observed cells:
``y_i,obs ~ N(X_i μ, X_i diag(ω²) X_iᵀ + σ² I)``.  Known truths: that density (at θ̂ for the log-likelihoods), its
maximum (the estimates) and its expected Fisher information (the linearisation SEs, exact for a linear model).
The missing cells hold NaN (the usual fill) or 0: they must never be read.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from backends import Backend
from scipy import optimize, stats

from latentfit import DataError

N, T = 60, 8
PARAMS = ("mu[0]", "mu[1]", "omega[0]", "omega[1]", "sigma")
OPTIONS = {"num_iters": (100, 100), "num_chains": 10}
#: SAEM's Monte-Carlo error with OPTIONS: the RMS deviation of its estimates from the exact ML over seeds 0-7 on each
#: PPL (16 fits, measured with a scratch script, not run by the tests; each PPL's mean deviation within one RMS of 0)
MC_SD = np.array([0.0027, 0.0041, 0.0029, 0.0042, 0.00039])


@functools.cache
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time ``[N, T]``, the observed cells (2-8 per unit, a ragged series) and y with NaN in the missing cells."""
    rng = np.random.default_rng(5)
    t = np.tile(np.linspace(-1.0, 1.0, T), (N, 1))
    mask = np.arange(T)[None, :] < rng.integers(2, T + 1, N)[:, None]
    b = np.array([2.0, -1.0]) + np.array([0.7, 0.5]) * rng.standard_normal((N, 2))
    y = b[:, :1] + b[:, 1:] * t + 0.3 * rng.standard_normal((N, T))
    return t, mask, np.where(mask, y, np.nan)


def _unit_moments(i: int, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit i's observed y, its design X [n_i, 2] and its marginal covariance at θ = (μ0, μ1, ω0, ω1, σ)."""
    t, mask, y = data()
    m = mask[i]
    x = np.stack([np.ones(m.sum()), t[i, m]], 1)
    cov = x @ np.diag(theta[2:4] ** 2) @ x.T + theta[4] ** 2 * np.eye(m.sum())
    return y[i, m], x, cov


def exact_log_lik(theta: np.ndarray) -> np.ndarray:
    """Per-unit marginal log-likelihood of the observed cells ``log N(y_i,obs; X_i μ, C_i)``."""
    out = []
    for i in range(N):
        y, x, cov = _unit_moments(i, theta)
        out.append(stats.multivariate_normal.logpdf(y, x @ theta[:2], cov))
    return np.array(out)


@functools.cache
def exact_ml() -> np.ndarray:
    """The maximum of the exact likelihood (BFGS on μ, log ω, log σ)."""
    def theta_of(p):
        return np.concatenate([p[:2], np.exp(p[2:])])

    res = optimize.minimize(lambda p: -exact_log_lik(theta_of(p)).sum(), np.array([2.0, -1.0, -0.5, -0.9, -1.2]),
                            method="BFGS", options={"gtol": 1e-7})
    assert np.max(np.abs(res.jac)) < 1e-5, res
    return theta_of(res.x)


def expected_information_se(theta: np.ndarray) -> np.ndarray:
    """SEs from the expected Fisher information: ``Xᵀ C⁻¹ X`` for μ, ``½ tr(C⁻¹ ∂_a C C⁻¹ ∂_b C)`` for (ω, σ)."""
    info = np.zeros((5, 5))
    for i in range(N):
        _, x, cov = _unit_moments(i, theta)
        prec = np.linalg.inv(cov)
        info[:2, :2] += x.T @ prec @ x
        dcov = [2 * theta[2 + k] * np.outer(x[:, k], x[:, k]) for k in range(2)] + [2 * theta[4] * np.eye(len(x))]
        for a in range(3):
            for b in range(3):
                info[2 + a, 2 + b] += 0.5 * np.trace(prec @ dcov[a] @ prec @ dcov[b])
    return np.sqrt(np.diag(np.linalg.inv(info)))


def _args(backend: Backend, fill: float) -> tuple:
    t, mask, y = data()
    return backend.tensor(t), backend.tensor(mask), backend.tensor(np.where(mask, y, fill))


@functools.cache
def _fit(backend_name: str, fill: float):
    backend = Backend(backend_name)
    backend.reset()
    return backend.fit("SAEM", backend.models.obs_mask_slope, *_args(backend, fill), seed=0, progress=False,
                       **OPTIONS)


def _theta_hat(fit) -> np.ndarray:
    p = fit.params
    return np.concatenate([np.asarray(p["mu"]), np.asarray(p["omega"]), np.atleast_1d(np.asarray(p["sigma"]))])


@pytest.mark.parametrize("fill", [np.nan, 0.0])
def test_imputed_entries_are_no_latents_and_densities_read_the_observed_cells(backend, fill):
    """The one latent is b; per unit ``log p(y_obs | b) = Σ_obs log N(y; b0 + b1 t, σ)`` and ``log p(b)``."""
    model = backend.latent_model(backend.models.obs_mask_slope, *_args(backend, fill))
    assert [s.name for s in model.latent_sites] == ["b"] and model.observed_names == ["y_observed"]
    rng = np.random.default_rng(0)
    theta = {"mu": backend.tensor([1.5, -0.5]), "omega": backend.tensor([0.8, 0.3]), "sigma": backend.tensor(0.4)}
    z = rng.standard_normal((3, N, 2))
    ll, lp = model.log_densities(theta, backend.tensor(z))
    t, mask, y = data()
    rows = stats.norm.logpdf(np.nan_to_num(y), z[..., :1] + z[..., 1:] * t, 0.4)
    np.testing.assert_allclose(backend.to_numpy(ll), np.where(mask, rows, 0.0).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(lp), stats.norm.logpdf(z, [1.5, -0.5], [0.8, 0.3]).sum(-1),
                               rtol=1e-12)


def test_nan_at_an_observed_entry_is_refused(backend):
    t, mask, y = data()
    y = y.copy()
    y[4, 0] = np.nan  # every unit observes its first cell
    with pytest.raises(DataError, match=r"'y_observed' holds 1 NaN/inf value\(s\) .* at unmasked positions"):
        backend.latent_model(backend.models.obs_mask_slope, backend.tensor(t), backend.tensor(mask),
                             backend.tensor(y))


def test_nan_filled_fit_is_the_zero_filled_fit_at_the_exact_ml(backend):
    """NaN in the missing cells poisoned Pyro's fit (σ stuck at its start, 1.0; ω 0.44, 0.17 for 0.63, 0.41): the
    fit must not read them.  Both fills give the same fit, within 5 Monte-Carlo SDs of the exact maximum."""
    nan_fit, zero_fit = _fit(backend.name, np.nan), _fit(backend.name, 0.0)
    np.testing.assert_allclose(_theta_hat(nan_fit), _theta_hat(zero_fit), rtol=1e-10, atol=1e-12)
    assert np.all(np.abs(_theta_hat(nan_fit) - exact_ml()) < 5 * MC_SD), (_theta_hat(nan_fit), exact_ml())


def test_log_likelihoods_are_the_marginal_of_the_observed_cells(backend):
    """IS integrates over b alone (with the imputed cells as latents its flat directions gave +12 000 for -192.7):
    within 4 Monte-Carlo SEs of the exact value at θ̂; "lin" and "gq" are exact for this linear Gaussian model."""
    fit = _fit(backend.name, np.nan)
    exact = exact_log_lik(_theta_hat(fit))
    fit.log_likelihood("is")
    is_ll = fit.log_likelihoods["is"]
    assert 0 < is_ll.mc_se < 0.5
    assert abs(is_ll.value - exact.sum()) < 4 * is_ll.mc_se, (is_ll.value, exact.sum(), is_ll.mc_se)
    for method in ("lin", "gq"):
        fit.log_likelihood(method)
        np.testing.assert_allclose(fit.log_likelihoods[method].per_unit, exact, rtol=1e-9, atol=1e-9)


def test_linearisation_standard_errors_are_the_expected_information(backend):
    fit = _fit(backend.name, np.nan)
    se = fit.standard_errors("lin")
    np.testing.assert_allclose([se[p] for p in PARAMS], expected_information_se(_theta_hat(fit)), rtol=1e-6)


def test_imputed_covariate_read_by_another_density_stays_a_latent(backend):
    """A missing covariate's imputed values feed y's density: they are latents, integrated over by the fit."""
    x = np.array([0.5, np.nan, -1.0, np.nan, 2.0])
    model = backend.latent_model(backend.models.missing_covariate, backend.tensor(np.nan_to_num(x)),
                                 backend.tensor(~np.isnan(x)), backend.tensor(np.array([1.0, 0.2, -1.5, 0.7, 2.2])))
    assert [s.name for s in model.latent_sites] == ["x_unobserved"]


def test_nan_in_the_missing_cells_of_an_imputed_covariate_is_never_read(backend):
    """With the imputed covariate a latent, μ is read by both halves of the split site and has no closed form: it is
    fitted by Newton steps on the gradient, and at a masked NaN that gradient was ``0 · ∂lp/∂μ = NaN`` (the step then
    kept μ at its start).  NaN and 0 in the missing cells give the same fit, μ away from its start."""
    rng = np.random.default_rng(3)
    x = 1.0 + rng.standard_normal(100)
    y = 0.8 * x + rng.standard_normal(100)
    observed = rng.random(100) < 0.7
    fits = []
    for fill in (np.nan, 0.0):
        backend.reset()
        fits.append(backend.fit("SAEM", backend.models.missing_covariate, backend.tensor(np.where(observed, x, fill)),
                                backend.tensor(observed), backend.tensor(y), seed=0, progress=False,
                                num_iters=(30, 20)))
    got = [np.array([float(f.params["mu"]), float(f.params["beta"])]) for f in fits]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-10)
    assert abs(got[0][0]) > 0.5 and np.all(np.isfinite(got[0]))


def test_imputed_cells_are_drawn_from_their_conditional_given_the_latents(backend):
    """The imputation site the fit integrated out is drawn after it, one draw per latent draw (what NUTS's samples of
    ``y_unobserved`` are, with θ at θ̂): at the missing cells, ``(y_mis − b0 − b1 t) / σ̂`` over all draws and cells is
    a standard normal sample (its mean within 4 SE of 0, its variance within 4 SE of 1, uncorrelated with the
    latent's mean b0 + b1 t); the draws are reproducible and reach arviz laid out as the observations."""
    fit = _fit(backend.name, np.nan)
    latents = fit.latents
    t, mask, _ = data()
    assert set(latents) == {"b", "y_unobserved"}
    b, imputed = np.asarray(latents["b"]), np.asarray(latents["y_unobserved"])
    lead = b.shape[:2]
    assert imputed.shape == (*lead, N, T)
    mean = b[..., 0] + b[..., 1] * t  # b [L, K, N, 1, 2] -> [L, K, N, T]
    z = ((imputed - mean) / float(fit.params["sigma"]))[..., ~mask]
    count = z.size
    assert count > 1000 and np.all(np.isfinite(z))
    assert abs(z.mean()) < 4 / np.sqrt(count), z.mean()
    assert abs(z.var() - 1.0) < 4 * np.sqrt(2 / count), z.var()
    assert abs(np.corrcoef(z.ravel(), mean[..., ~mask].ravel())[0, 1]) < 4 / np.sqrt(count)
    # draws differ across draws and chains; the property again gives the same values
    assert np.std(imputed[..., ~mask], axis=(0, 1)).min() > 0
    fit._cache.pop("latents")
    np.testing.assert_array_equal(np.asarray(fit.latents["y_unobserved"]), imputed)
    idata = fit.to_arviz()
    posterior = idata["posterior"] if not hasattr(idata, "posterior") else idata.posterior
    assert posterior["y_unobserved"].shape == (*lead, N, T)


# ----- rows outside the unit plate (``a[group]``), masked ------------------------------------------------------------
#: the groups' sizes (2-9 rows, unbalanced), the masked rows (~20%, group 3 entirely) and a binary covariate
G = 12
ROWS_THETA = {"mu": 1.2, "tau": 0.6, "beta": -0.7, "sigma": 0.5}


@functools.cache
def rows_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(group, x, y, m)``: y holds NaN at the masked rows."""
    rng = np.random.default_rng(11)
    group = rng.permutation(np.repeat(np.arange(G), rng.integers(2, 10, G)))
    x = rng.binomial(1, 0.6, group.size).astype(float)
    y = (1.2 + 0.6 * rng.standard_normal(G))[group] - 0.7 * x + 0.5 * rng.standard_normal(group.size)
    m = rng.random(group.size) > 0.2
    m[group == 3] = False
    return group, x, np.where(m, y, np.nan), m


def _rows_args(backend: Backend, how: str = "obs_mask") -> tuple:
    group, x, y, m = rows_data()
    return backend.xp.asarray(group), backend.tensor(x), G, backend.tensor(y), backend.tensor(m), how


def rows_exact(theta: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group: the marginal log-likelihood of its observed rows, the exact posterior mean and variance of a_j,
    and the expected Fisher information ``[4, 4]`` in (μ, τ, β, σ) (the linearisation's, exact for this model)."""
    group, x, y, m = rows_data()
    mu, tau, beta, sigma = (theta[k] for k in ("mu", "tau", "beta", "sigma"))
    ll, mean, var, info = np.zeros(G), np.zeros(G), np.zeros(G), np.zeros((4, 4))
    for j in range(G):
        r = (group == j) & m
        n = int(r.sum())
        var[j] = 1.0 / (1.0 / tau ** 2 + n / sigma ** 2)
        mean[j] = var[j] * (mu / tau ** 2 + np.sum(y[r] - beta * x[r]) / sigma ** 2)
        if n == 0:
            continue
        cov = tau ** 2 * np.ones((n, n)) + sigma ** 2 * np.eye(n)
        ll[j] = stats.multivariate_normal.logpdf(y[r], mu + beta * x[r], cov)
        prec = np.linalg.inv(cov)
        design = np.stack([np.ones(n), x[r]], 1)
        info[np.ix_([0, 2], [0, 2])] += design.T @ prec @ design
        dcov = [2 * tau * np.ones((n, n)), 2 * sigma * np.eye(n)]
        info[np.ix_([1, 3], [1, 3])] += [[0.5 * np.trace(prec @ a @ prec @ b) for b in dcov] for a in dcov]
    return ll, mean, var, info


@pytest.mark.parametrize("how", ["obs_mask", "mask", "handler"])
def test_masked_rows_outside_the_unit_plate_stay_with_their_group(backend, how):
    """A masked row's log-density is a constant 0, free of every latent: its unit was taken to be 0, whose layout held
    every masked row of the data (on both PPLs), and on torch the batched Jacobians of the predictions (reverse passes
    summed over units) added those rows to their own groups' (entries 2 for 1): the linearised log-likelihood was off
    (-704.50 for -703.84 on 40 groups, 0.09 with one masked row), and so were the Gauss–Newton precisions and the lin
    SEs.  On this linear model the linearisation, the Laplace mode and covariance are exact, at any expansion point."""
    from latentfit.inference import laplace, likelihood

    group, x, y, m = rows_data()
    model = backend.latent_model(backend.models.masked_rows, *_rows_args(backend, how))
    values, mask = model.observations()
    assert tuple(mask.shape) == (G, int(np.bincount(group).max()))
    assert np.array_equal(backend.to_numpy(mask).sum(-1), np.bincount(group[m], minlength=G))
    theta = {k: backend.tensor(v) for k, v in ROWS_THETA.items()}
    ll, mean, var, _ = rows_exact(ROWS_THETA)
    z = backend.tensor(np.random.default_rng(0).normal(1.0, 1.0, (G, 1)))
    lin = likelihood.log_likelihood_lin(model, theta, z)
    np.testing.assert_allclose(lin.per_unit, ll, rtol=1e-10, atol=1e-10)
    jac = backend.to_numpy(likelihood.structural_jacobian(model, theta, z))[..., 0]
    np.testing.assert_array_equal(jac, backend.to_numpy(mask) * 1.0)
    res = laplace.conditional_modes(model, theta)
    np.testing.assert_allclose(backend.to_numpy(res.mode)[:, 0], mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(res.cov)[:, 0, 0], var, rtol=1e-10)


def test_masked_rows_lin_log_likelihood_and_standard_errors_are_exact(backend):
    """After a fit: "lin" and "gq" are the exact marginal of the observed rows at θ̂ (1e-8), the lin SEs those of the
    expected Fisher information (the mean's SE was 2% too small with the masked rows on unit 0)."""
    fit = backend.fit("SAEM", backend.models.masked_rows, *_rows_args(backend), seed=0, progress=False,
                      num_iters=(30, 20))
    theta = {k: float(v) for k, v in fit.params.items()}
    ll, _, _, info = rows_exact(theta)
    for method in ("lin", "gq"):
        fit.log_likelihood(method)
        np.testing.assert_allclose(fit.log_likelihoods[method].per_unit, ll, rtol=1e-8, atol=1e-8)
    se = fit.standard_errors("lin")
    np.testing.assert_allclose([se[k] for k in ("mu", "tau", "beta", "sigma")],
                               np.sqrt(np.diag(np.linalg.inv(info))), rtol=1e-6)
