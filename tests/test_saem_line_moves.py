"""SAEM's line moves (:func:`latentfit.inference.mcmc.line_gibbs`) and NLME's IOV ridge (audit A1).

With inter-occasion variability the posterior of (η_i, κ_i1..κ_iK) stretches along the line η_i + t, κ_ik − t, which
leaves every occasion's parameter, hence the data's likelihood, unchanged; saemix's random-walk kernels crossed it so
slowly that the default 300 exploration iterations stopped SAEM short of the maximum (γ²_CL 3-8 SE too high, ω²_CL
and CL too low).  The line move draws the step along it from the prior's conditional and accepts it with the
likelihood ratio."""

from __future__ import annotations

import re

import numpy as np
import pytest

import latentfit as lf
from latentfit.inference import mcmc
from latentfit.models import nlme

TRUTH = {"ka": 1.2, "V": 30.0, "CL": 3.0, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.1,
         "gamma2_ka": 0.1, "gamma2_CL": 0.06, "b": 0.1}


def _line_setup(ops, flat: bool):
    """Two units, d = 3: prior N(m_i, C), likelihood N(y_i; wᵀz, s²) (w ⟂ v: flat along the line)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + 0.5 * np.eye(3)
    mean = rng.normal(size=(2, 3))
    v = np.array([[1.0, -1.0, -1.0], [1.0, 0.0, -1.0]])  # one direction per unit
    w = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]) if flat else np.array([[0.5, -1.0, 2.0], [1.0, 0.3, 0.0]])
    y, s2 = np.array([0.7, -0.4]), 0.3
    return cov, mean, v, w, y, s2


def _posterior_on_line(z0, cov, mean, v, w, y, s2):
    """Mean and variance of t along ``z0 + t v`` under prior × likelihood (closed form, per unit)."""
    prec = np.linalg.inv(cov)
    out = []
    for i in range(2):
        a = v[i] @ prec @ v[i] + (w[i] @ v[i]) ** 2 / s2
        b = v[i] @ prec @ (mean[i] - z0[i]) + (w[i] @ v[i]) * (y[i] - w[i] @ z0[i]) / s2
        out.append((b / a, 1.0 / a))
    return out


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "curved"])
def test_line_gibbs_leaves_the_conditional_on_the_line_invariant(backend, flat):
    """From one point, after 12 line moves the position along the line is distributed as the posterior's conditional
    on the line (closed form; 20000 chains: mean within 5 MC SE, variance within 4%); along a line where the
    likelihood is constant every move is accepted, and one move already draws the exact conditional."""
    ops = backend.ops()
    cov, mean, v, w, y, s2 = _line_setup(ops, flat)
    L = 20000
    z0 = np.array([[0.3, -0.2, 0.5], [-1.0, 0.4, 0.1]])
    wt, yt = ops.asarray(w), ops.asarray(y)

    def evaluate(z):
        xp = ops.xp
        ll = -0.5 * (yt - xp.sum(z * wt, -1)) ** 2 / s2
        diff = z - ops.asarray(mean)
        lp = -0.5 * xp.sum((diff @ ops.asarray(np.linalg.inv(cov))) * diff, -1)
        return ll, lp

    state = mcmc.init_chain_state(ops.asarray(np.broadcast_to(z0, (L, 2, 3)).copy()), evaluate)
    key = ops.key(1) if backend.name == "pyro" else backend.key(1)
    lines = ops.asarray(v[None])
    rates = []
    for _ in range(1 if flat else 12):
        key, k = ops.split(key)
        state, rate = mcmc.line_gibbs(ops, k, state, lines, ops.asarray(mean), ops.asarray(np.linalg.inv(cov)),
                                      evaluate)
        rates.append(float(backend.to_numpy(rate)[0]))
    z = backend.to_numpy(state.z)
    if flat:
        assert rates == [1.0]
    for i, (m, var) in enumerate(_posterior_on_line(z0, cov, mean, v, w, y, s2)):
        t = (z[:, i] - z0[i]) @ v[i] / (v[i] @ v[i])
        np.testing.assert_allclose(z[:, i], z0[i] + t[:, None] * v[i], atol=1e-10)  # stays on the line
        assert abs(t.mean() - m) < 5 * np.sqrt(var / L), (i, t.mean(), m)
        assert abs(t.var() / var - 1) < 0.04, (i, t.var(), var)


def design(num_ids: int, drop: bool = False):
    """Audit A1's design: 100 mg q24h × 3, each dosing interval an occasion, drug carried over, 7 samples each."""
    import pandas as pd

    rows = []
    for i in range(1, num_ids + 1):
        for k in range(3):
            if drop and i == 2 and k == 2:
                continue
            rows.append(dict(ID=i, TIME=24.0 * k, DV=np.nan, AMT=100.0, EVID=1, MDV=1, OCC=k + 1))
            rows += [dict(ID=i, TIME=24.0 * k + t, DV=1.0, AMT=0.0, EVID=0, MDV=0, OCC=k + 1)
                     for t in (0.5, 1, 2, 4, 8, 12, 23.5)]
    return pd.DataFrame(rows)


def audit_model(data=None, backend: str = "torch") -> nlme.NLME:
    """The audit's model and starting values: ω² 0.3, γ² 0.2, CL 2 (truth 3)."""
    return nlme.NLME("one_compartment_oral", {"ka": nlme.Parameter(1.0, omega2=0.3),
                                              "V": nlme.Parameter(20.0, omega2=0.3),
                                              "CL": nlme.Parameter(2.0, omega2=0.3)},
                     iov={"ka": 0.2, "CL": 0.2}, error="proportional", error_init={"b": 0.3}, data=data,
                     backend=backend)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_iov_lines_leave_the_likelihood_unchanged(backend):
    """NLME's lines: +1 on the parameter's η column, −1 on its κ at the individual's real occasions (individual 2 has
    two of three), and the log-likelihood (drug carried across the occasions) is the same all along them while the
    log-prior changes."""
    model = audit_model(design(3, drop=True), backend)
    lines = model.latent_lines()
    assert lines.shape == (2, 3, 3 + 2 * 3)
    assert model._iov.carry == "one_compartment_oral"
    np.testing.assert_array_equal(lines[1, 1], [0, 0, 1, 0, 0, 0, -1, -1, 0])  # CL, individual 2: occasions 1-2
    np.testing.assert_array_equal(lines[0, 0], [1, 0, 0, -1, -1, -1, 0, 0, 0])  # ka, individual 1
    theta = {**model.init_params(), **{k: model.ops.asarray(v) for k, v in TRUTH.items()}}
    z = model.sample_prior(theta, model.ops.key(0) if backend == "torch" else __import__("jax").random.PRNGKey(0), 4)
    ll0, lp0 = (model.ops.to_numpy(x) for x in model.log_densities(theta, z))
    for j in range(2):
        ll, lp = (model.ops.to_numpy(x) for x in model.log_densities(theta, z + 0.37 * model.ops.asarray(lines[j])))
        np.testing.assert_allclose(ll, ll0, rtol=1e-9, atol=1e-9 if backend == "torch" else 1e-3)
        assert np.all(np.abs(lp - lp0) > 1e-3)
    assert audit_model(design(3), backend).bind(design(3)).latent_lines() is not None
    no_iov = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 2.0}, data=design(3), backend=backend)
    assert no_iov.latent_lines() is None
    iov_only = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": nlme.Parameter(2.0, random=False)},
                         iov=["CL"], data=design(3), backend=backend)
    assert iov_only.latent_lines() is None  # κ without an η: no ridge



@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_line_moves_run_in_saem_and_fsaem_fits(backend):
    """A short fit per engine (6 subjects): SAEM records the line moves' acceptance at every iteration, 1 (the
    likelihood is flat along the ridge), per-unit streams included; f-SAEM records NaN in its Laplace-proposal phase
    and 1 after it; without ``line_moves=True`` (the default, saemix's kernels alone) there are none."""
    df = audit_model(design(6)).simulate(TRUTH, seed=0)
    runs = [("saem", {}), ("fsaem", {})] + ([("saem", {"rng": "per_unit"})] if backend == "torch" else [])
    for engine, kw in runs:  # JAX: two compiled engines (compiling dominates: the per-unit streams on torch only)
        fit = audit_model(df, backend).fit(engine=engine, seed=0, progress=False, num_iters=(12, 4), line_moves=True,
                                           **kw)
        acc = np.asarray(fit.history["acc.line"], dtype=float)
        assert acc.shape == (16, 2)
        done = acc[np.isfinite(acc[:, 0])]
        assert len(done) == (6 if engine == "fsaem" else 16) and np.all(done == 1.0), (engine, kw, acc)
    if backend == "torch":
        fit = audit_model(df, backend).fit(seed=0, progress=False, num_iters=(12, 4))
        assert "acc.line" not in fit.history

# ----- the drift check at the end of the exploration phase (SAEM.drifting_parameters) ------------------------------
def _ar1(rng: np.random.Generator, n: int, rho: float) -> np.ndarray:
    x = np.zeros(n)
    e = rng.normal(size=n) * np.sqrt(1 - rho ** 2)
    for k in range(1, n):
        x[k] = rho * x[k - 1] + e[k]
    return x


def test_drift_check_on_synthetic_trajectories():
    """The drift check on histories of known law, 300 + 100 iterations: stationary AR(1) noise about the estimates
    (ρ = 0.9 / 0.98, stationary sd 0.1 on the log scale; converged NLME fits measure ρ 0-0.75) flags at most 4 / 20
    of the 900 trajectories of 100 histories of 9 parameters (measured 2 / 11: a rate of 0.2% / 1.2% per parameter,
    against 3% / 12% with ρ from the window's own residuals, whose line absorbs a slow wander); a drift like the
    audit's stuck IOV fit (an exponential approach, still +5% over iterations 226-300, scatter sd 0.5%: measured CL
    +5.1%, t = 7.3) is flagged in at least 18 of 20 histories, naming the drifting parameter alone."""
    from latentfit.inference.saem import SAEM

    model = audit_model(design(2))
    engine = SAEM(model, progress=False)
    rng = np.random.default_rng(3)
    truth = {k: float(np.asarray(v)) for k, v in model.init_params().items()}
    k = np.arange(1, 401)
    for rho, allowed in ((0.9, 4), (0.98, 20)):
        flagged = 0
        for _ in range(100):
            history = {f"theta.{n}": v * np.exp(0.1 * _ar1(rng, 400, rho)) for n, v in truth.items()}
            stats = engine.drift_statistics(history)
            flagged += sum(abs(r) > 5.0 * se for r, se in stats.values())
        assert flagged <= allowed, (rho, flagged)
    caught = 0
    for _ in range(20):
        history = {f"theta.{n}": v * np.exp(0.02 * _ar1(rng, 400, 0.9)) for n, v in truth.items()}
        history["theta.CL"] = truth["CL"] * np.exp(0.005 * _ar1(rng, 400, 0.8) - 0.6 * np.exp(-k / 150))
        msgs = engine.drifting_parameters(history)
        if msgs:
            caught += 1
            assert len(msgs) == 1 and re.search(r": CL \+0\.0[4-6]\d* \(t = \+\d", msgs[0]), msgs
            assert "omega2" not in msgs[0] and "gamma2" not in msgs[0], msgs
            assert "iterations 226-300" in msgs[0] and "num_iters=(900, 100)" in msgs[0] and "fsaem" in msgs[0]
    assert caught >= 18, caught  # measured 19 (t 4.6-21)


# ----- end to end: audit A1's design, simulated by the model -------------------------------------------------------
def _z_scores(fit) -> dict[str, float]:
    """(estimate − truth) / SE; variances and the error parameter on the log scale (log(estimate / truth) / RSE)."""
    table = fit.summary()
    out = {}
    for name, value in TRUTH.items():
        est, se = float(table.loc[name, "estimate"]), float(table.loc[name, "se"])
        log_scale = name.startswith(("omega2_", "gamma2_")) or name == "b"
        out[name] = np.log(est / value) / (se / est) if log_scale else (est - value) / se
    return out


def _audit_fit(num_ids: int, seed: int, **options):
    import warnings

    df = audit_model(design(num_ids)).simulate(TRUTH, seed=seed)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit = audit_model(df).fit(seed=seed, progress=False, **options)
    return fit, [str(w.message) for w in seen if issubclass(w.category, lf.ConvergenceWarning)]


def test_iov_fit_with_line_moves_recovers_the_truth():
    """40 subjects × 3 occasions (drug carried over), the audit's starts (CL 2 against 3, ω² 0.3, γ² 0.2), saemix's
    300 + 100 iterations: the fit with ``line_moves=True`` recovers the truth, CL, ω²_CL and γ²_CL within 2 SE (measured
    +0.81, 0.00, +0.91), every estimate within 2.5, and raises no ConvergenceWarning."""
    fit, warned = _audit_fit(40, 1, line_moves=True)
    z = _z_scores(fit)
    assert warned == [], warned
    assert all(abs(z[n]) < 2.0 for n in ("CL", "omega2_CL", "gamma2_CL")), z
    assert max(abs(v) for v in z.values()) < 2.5, z
    assert np.all(np.asarray(fit.history["acc.line"], dtype=float) > 0.99)  # flat along the ridge: Gibbs draws


@pytest.mark.slow
def test_iov_saemix_kernels_alone_stop_short():
    """The same data with saemix's kernels alone (``line_moves=False``) stop short of the maximum: γ²_CL too high (the
    IIV/IOV split reversed as in the audit; measured +3.8 SE against +0.91 with the line moves) and the linearised
    log-likelihood lower (−25.0 against −18.6).  The margins asserted (γ²_CL above 2 SE and 1.5 SE above the default
    fit's, 2 log-likelihood units) leave room for the Monte-Carlo path, which differs with the threads and the process
    a test runs in.  (The drift check does not flag this one: CL's t over iterations 226-300 is below 5 once the
    autocorrelation is taken from iterations 151-300.)"""
    stuck, _ = _audit_fit(40, 1)
    moved, _ = _audit_fit(40, 1, line_moves=True)
    z_stuck, z_moved = _z_scores(stuck), _z_scores(moved)
    assert z_stuck["gamma2_CL"] > 2.0 and z_stuck["gamma2_CL"] > z_moved["gamma2_CL"] + 1.5, (z_stuck, z_moved)
    assert moved.log_likelihood("lin") > stuck.log_likelihood("lin") + 2.0
