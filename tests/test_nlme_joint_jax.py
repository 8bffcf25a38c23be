"""Joint models (several responses, non-Gaussian outcomes, occasions) on the JAX path (issue 14, items 2-4).

Each joint form of tests/test_nlme_responses.py, tests/test_nlme_joint_outcomes.py and tests/test_nlme_occasions.py,
built with ``backend="jax"`` (float64): PK/PD with an error model per response, PK + binary / ordinal / Poisson /
negative binomial / Weibull time-to-event, a Poisson and a time-to-event outcome with ``iov=``, PK + binary with IOV on
CL, and PK/PD with IOV.

* The log-densities (log p(y_i | z_i) and log p(z_i), per individual) and the SAEM statistics equal torch's for the
  same θ and latents to 1e-10.
* Tried by hand as a user would (45 SAEM iterations, N = 30, both backends, float64 and float32): every
  form fits, and the IS and quadrature log-likelihoods and Louis' SEs run on JAX; the Gaussian faces (predictions,
  residuals) of a joint model with a non-Gaussian response are refused on JAX as on torch, with the same
  ``ModelSpecificationError`` (tested below); its VPC is one per response (tests/test_nlme_joint_vpc.py).
* The discrete VPC's simulations of an outcome model with IOV: each record at its occasion's κ (this failed on
  torch and JAX alike); the Kaplan-Meier VPC of time-to-event data with IOV simulates on both backends (the
  piecewise hazard's checks: tests/test_nlme_occasions_tte.py).
* The importance-sampling log-likelihood on JAX agrees with Gauss-Hermite quadrature and with torch's IS value within
  4 MC SE (slow: 29 s at load ~5 since 74118fa compiles the Laplace steps, 71 s at load ~8 before).
* SAEM on JAX recovers a simulated PK + binary truth (100 individuals, saemix's 300 + 100 iterations) within
  3.5 SE (Louis) of the truth (slow; measured: within 1.58 SE, the largest ω²_ka).

Time of one joint fit (PK + binary, 100 individuals, 6 concentrations + 5 events each, SAEM defaults 300 + 100
iterations, float64; ``OMP_NUM_THREADS=1``, torch ``set_num_threads(1)``; one process, fits in the order torch, JAX,
JAX again, torch again; shared 2-core machine at load average 7.7-9.3, so CPU time (``time.process_time``, all
threads) is the figure, wall time inflated 2-5x by the other jobs):

| backend | CPU time | wall time |
|---|---|---|
| torch | 10.0 s / 9.9 s (second run) | 51.1 s / 23.4 s |
| JAX, first fit (compilation included) | 18.4 s | 80.9 s |
| JAX, second fit (same shapes: compiled programs reused) | 1.6 s | 6.6 s |

The two JAX fits give the same estimates; torch's and JAX's differ by their random draws only (e.g. ka 1.019 vs
1.044, ω²_ka 0.135 vs 0.142).  Post-fit computations on JAX cost more than on torch, mostly compiling programs run
once (PK + binary, N = 30, 45 iterations, wall time at load ~7, JAX vs torch: IS 42 s vs 0.9 s, Louis SEs 21 s vs
8.8 s, quadrature 68 s vs 1.3 s).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_nlme_joint_outcomes import (
    JOINT_PY,
    JOINT_TOML,
    OUTCOMES,
    PK_BINARY_TRUTH,
    _conc_only,
    _design,
    _joint,
    _log_rate,
    _occasion_design,
    _params,
    _theta,
    _within,
)
from test_nlme_responses import ERRORS, PARAMS, TRUTH, oral_effect_imax, pkpd_design

from latentfit import ModelSpecificationError
from latentfit.inference.likelihood import log_likelihood_gq, log_likelihood_is
from latentfit.models import nlme
from latentfit.models.nlme import outcomes as oc

P = nlme.Parameter


pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 on JAX (tests/conftest.py)


def _pkpd(backend: str, iov: bool = False) -> tuple[nlme.NLME, pd.DataFrame]:
    table = pkpd_design(8)
    if iov:  # a second period at time 100 opened by a reset-and-dose record (EVID 4)
        second = table.assign(TIME=table.TIME + 100.0, EVID=table.EVID.replace(1, 4), OCC=2)
        table = pd.concat([table.assign(OCC=1), second]).sort_values(["ID", "TIME"], kind="stable")
    kw = {"iov": {"CL": 0.2}} if iov else {}
    torch_model = nlme.NLME(oral_effect_imax(), dict(PARAMS), error=dict(ERRORS), **kw).bind(table)
    table = torch_model.simulate({**TRUTH, **({"gamma2_CL": 0.05} if iov else {})}, seed=1)
    return nlme.NLME(oral_effect_imax(), dict(PARAMS), error=dict(ERRORS), backend=backend, **kw), table


def _outcome_joint(kind: str, backend: str) -> tuple[nlme.NLME, pd.DataFrame]:
    return (nlme.NLME(_conc_only if kind == "tte" else _joint, _params(kind),
                      error={"conc": "proportional" if kind == "poisson" else "constant"},
                      outcome={"ae": OUTCOMES[kind]()}, backend=backend), _design(8, kind))


def _poisson_iov(backend: str) -> tuple[nlme.NLME, pd.DataFrame]:
    table = _occasion_design(8, per=4, occasions=3)
    table["DV"] = np.random.default_rng(0).integers(0, 6, len(table)).astype(float)
    return nlme.NLME(_log_rate, {"lam": P(3.0), "slope": P(-0.1, "normal", random=False)}, outcome="poisson",
                     iov={"lam": 0.3}, backend=backend), table


def _tte_iov(backend: str) -> tuple[nlme.NLME, pd.DataFrame]:
    table = pd.DataFrame({"ID": [1, 1, 1, 1, 1, 2, 2, 2, 2], "TIME": [0, 2.5, 8, 12, 19, 0, 9, 11, 20.0],
                          "DV": [0, 1, 0, 1, 0, 0, 0, 1, 1], "OCC": [1, 1, 1, 2, 2, 1, 1, 2, 2]})
    return nlme.NLME(None, {"lambda": P(4.0), "beta": P(1.4, random=False)}, outcome=oc.TimeToEvent("weibull"),
                     iov={"lambda": 0.2}, backend=backend), table


def _binary_iov(backend: str) -> tuple[nlme.NLME, pd.DataFrame]:
    table = _design(8, "binary")
    table["OCC"] = np.where(table.TIME < 5, 1, 2)
    return nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"},
                     iov={"CL": 0.2}, backend=backend), table


FORMS = {"pkpd": lambda b: _pkpd(b), "pkpd_iov": lambda b: _pkpd(b, iov=True),
         **{f"pk_{kind}": (lambda b, kind=kind: _outcome_joint(kind, b)) for kind in OUTCOMES},
         "poisson_iov": _poisson_iov, "tte_iov": _tte_iov, "pk_binary_iov": _binary_iov}


def _pair(form: str) -> tuple[nlme.NLME, nlme.NLME]:
    torch_model, table = FORMS[form]("torch")
    jax_model, _ = FORMS[form]("jax")
    return torch_model.bind(table), jax_model.bind(table)


def _to_jax(model: nlme.NLME, tree: dict) -> dict:
    return {k: model.ops.asarray(np.asarray(v)) for k, v in tree.items()}


@pytest.mark.parametrize("form", list(FORMS))
def test_jax_log_densities_and_statistics_equal_torch(form):
    """For the same θ (a perturbed start) and latents, log p(y_i | z_i), log p(z_i) and the SAEM statistics on JAX
    (one compiled program each, float64) equal torch's to 1e-10."""
    mt, mj = _pair(form)
    assert str(mj.ops.dtype) == "float64"
    rng = np.random.default_rng(3)
    theta_t = mt.init_params()
    theta_t = {k: v * (1.0 + 0.05 * rng.standard_normal(np.shape(mt.ops.to_numpy(v)))) for k, v in theta_t.items()}
    theta_np = {k: mt.ops.to_numpy(v) for k, v in theta_t.items()}
    z = mt.ops.to_numpy(mt.prior_moments(theta_t)[0])[None] + rng.normal(0, 0.3, (3, mt.num_units, mt.latent_dim))
    expected = [mt.ops.to_numpy(a) for a in mt.log_densities(theta_t, mt.ops.asarray(z))]
    assert np.all(np.isfinite(expected[0])) and np.all(expected[0] != 0)
    densities = mj.ops.jit(mj.log_densities)
    got = [np.asarray(a) for a in densities(_to_jax(mj, theta_np), mj.ops.asarray(z))]
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == np.float64
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)
    s_t = mt.stats(theta_t, mt.ops.asarray(z))
    s_j = mj.ops.jit(mj.stats)(_to_jax(mj, theta_np), mj.ops.asarray(z))
    assert set(s_j) == set(s_t)
    for k in s_t:
        np.testing.assert_allclose(np.asarray(s_j[k]), mt.ops.to_numpy(s_t[k]), rtol=1e-10, atol=1e-10, err_msg=k)


def test_model_file_with_backend_jax_builds_the_joint_model(tmp_path):
    """``[engine] backend = "jax"`` in the joint model file of tests/test_nlme_joint_outcomes.py (``[error.conc]``
    beside ``[outcome.ae]``) builds a JAX model whose log-likelihood equals the torch Python API model's to 1e-10."""
    from latentfit.models.nlme.config import parse_config

    (tmp_path / "joint.py").write_text(JOINT_PY)
    cfg = parse_config(JOINT_TOML.replace("[engine]", '[engine]\nbackend = "jax"'), tmp_path / "joint.toml")
    assert cfg.backend == "jax"
    table = _design(10, "binary")
    api = nlme.NLME(_joint, _params("binary", random=("CL",)), error={"conc": "constant"},
                    outcome={"ae": "binary"}).bind(table)
    from_file = cfg.model(table)
    assert str(from_file.ops.dtype) == "float64" and type(from_file.ops).__name__ == "JaxOps"
    theta = {k: api.ops.to_numpy(v) for k, v in api.init_params().items()}
    z = api.ops.to_numpy(api.prior_moments(api.init_params())[0])[None] + np.random.default_rng(4).normal(
        0, 0.2, (2, 10, 1))
    got = np.asarray(from_file.ops.jit(from_file.log_lik)(_to_jax(from_file, theta), from_file.ops.asarray(z)))
    np.testing.assert_allclose(got, api.ops.to_numpy(api.log_lik(api.init_params(), api.ops.asarray(z))),
                               rtol=1e-10, atol=1e-10)


def test_refusals_on_jax_are_torch_refusals():
    """What a joint model with a non-Gaussian response refuses on torch it refuses on JAX, with the same message:
    the Gaussian faces (predict, VPC simulation, residuals); the VPC of a joint model with a user log-likelihood
    response without a simulator.
    (The simulations of the joint VPC of each response: tests/test_nlme_joint_vpc.py.)"""
    messages = []
    for backend in ("torch", "jax"):
        model, table = _outcome_joint("binary", backend)
        model = model.bind(table)
        theta = model.init_params()
        with pytest.raises(ModelSpecificationError, match="continuous data") as predict:
            model.predict(theta, model.prior_moments(theta)[0])
        user = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "loglik"},
                         backend=backend).bind(table)
        with pytest.raises(ModelSpecificationError, match="response 'ae': a user log-likelihood response has no "
                                                          "simulator") as discrete:
            oc.simulate_observations(user, user.init_params(), 2)
        messages.append((str(predict.value), str(discrete.value)))
    assert messages[0] == messages[1]


def _is_gq_model(backend: str) -> nlme.NLME:
    """PK + binary with a random effect on CL only (quadrature exact), 40 simulated individuals (as in
    tests/test_nlme_joint_outcomes.py)."""
    truth = {k: v for k, v in PK_BINARY_TRUTH.items() if k not in ("omega2_ka", "omega2_V")}
    spec = _params("binary", random=("CL",))
    torch_model = nlme.NLME(_joint, spec, error={"conc": "constant"}, outcome={"ae": "binary"}).bind(
        _design(40, "binary"))
    table = torch_model.simulate(_theta(torch_model, truth), seed=3)
    return nlme.NLME(_joint, spec, error={"conc": "constant"}, outcome={"ae": "binary"}, backend=backend).bind(table)


@pytest.mark.slow
def test_jax_importance_sampling_agrees_with_quadrature_and_torch(monkeypatch):
    """The IS log-likelihood (proposal fitted to each individual's conditional distribution) on JAX is within
    4 MC SE of quadrature on JAX, of quadrature on torch (these two equal to 1e-8) and of torch's IS value."""
    monkeypatch.setattr(oc, "PILOT_SAMPLES", 500)
    truth = {k: v for k, v in PK_BINARY_TRUTH.items() if k not in ("omega2_ka", "omega2_V")}
    out = {}
    for backend in ("torch", "jax"):
        model = _is_gq_model(backend)
        theta = _theta(model, truth)
        mu = model.ops.to_numpy(model.prior_moments(theta)[0])
        mean, sd, df = oc.importance_proposal(model, theta, mu, np.full_like(mu, 0.3), 4)
        ll = log_likelihood_is(model, theta, mean, sd, num_samples=2000, df=df)
        out[backend] = (ll, log_likelihood_gq(model, theta, num_nodes=30).value)
    (ll_t, gq_t), (ll_j, gq_j) = out["torch"], out["jax"]
    assert abs(gq_j - gq_t) < 1e-8, (gq_j, gq_t)
    assert ll_j.mc_se < 0.1 and abs(ll_j.value - gq_j) < 4 * ll_j.mc_se + 1e-3, (ll_j.value, gq_j, ll_j.mc_se)
    se = float(np.hypot(ll_j.mc_se, ll_t.mc_se))
    assert abs(ll_j.value - ll_t.value) < 4 * se, (ll_j.value, ll_t.value, se)


@pytest.mark.slow
def test_jax_joint_fit_recovers_the_truth():
    """PK (constant error) + a binary event with logit e0 + slope·C(t), 100 simulated individuals, SAEM defaults on
    JAX (float64): every estimate within 3.5 SE (Louis) of the truth; the IS log-likelihood (JAX) within 4 MC SE of
    torch's at the JAX estimates."""
    torch_model = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"}).bind(
        _design(100, "binary"))
    data = torch_model.simulate(_theta(torch_model, PK_BINARY_TRUTH), seed=1)
    model = nlme.NLME(_joint, _params("binary"), error={"conc": "constant"}, outcome={"ae": "binary"},
                      backend="jax")
    fit = model.fit(data, seed=0, progress=False)
    _within(fit, PK_BINARY_TRUTH)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_discrete_vpc_simulations_with_occasions(backend, monkeypatch):
    """The discrete VPC's simulations of an outcome model with IOV (a Poisson rate with κ per occasion; this failed
    on both backends, the κ coordinates fed to the model without occasions): each record's log-rate is
    log λ_i + κ_i,occ(record) + slope·t of the prior draw, on the global stream and on per-unit streams; a time-to-event
    model with IOV on its scale simulates its first events (before: refused), censored at each end of follow-up."""
    model, table = _poisson_iov(backend)
    model = model.bind(table)
    theta = _theta(model, {"lam": 4.0, "slope": -0.15, "omega2_lam": 0.3, "gamma2_lam": 0.15})
    seen = []
    sample, sample_at = oc.Poisson.sample, oc.Poisson.sample_at
    monkeypatch.setattr(oc.Poisson, "sample", lambda self, rng, f, *a: seen.append(f) or sample(self, rng, f, *a))
    monkeypatch.setattr(oc.Poisson, "sample_at", lambda self, u, f, *a: seen.append(f) or sample_at(self, u, f, *a))
    y = oc.simulate_observations(model, theta, 5, seed=2)
    y_units = oc.simulate_observations(model, theta, 5, seed=2, unit_ids=np.arange(model.num_units))
    assert y.shape == y_units.shape == (5,) + model.data.dv.shape
    assert np.all(np.isfinite(y[:, model.data.mask])) and np.all(y[:, model.data.mask] >= 0)
    z = model.ops.to_numpy(model.sample_prior(theta, model.ops.key(2), 5))  # the same draws as the first call
    occ = model.ops.to_numpy(model._iov.occ).astype(int)  # [N, T] occasion index of each record
    kappa = np.take_along_axis(z[:, :, 1:], np.broadcast_to(occ, (5,) + occ.shape), -1)
    expected = z[:, :, :1] + kappa + theta["slope"].item() * (model.data.time % 10.0)
    mask = model.data.mask
    np.testing.assert_allclose(seen[0][:, mask], expected[:, mask], rtol=1e-10, atol=1e-10)
    assert seen[1].shape == seen[0].shape and not np.allclose(seen[1], seen[0])  # the per-unit streams' own draws
    tte, tte_table = _tte_iov(backend)
    tte = tte.bind(tte_table)
    t, e = oc.first_event_times(tte, tte.init_params(), 3)
    assert t.shape == e.shape == (3, 2) and np.all(t[~e] == np.broadcast_to([19.0, 20.0], t.shape)[~e])


def test_report_of_time_to_event_data_with_occasions_has_the_kaplan_meier_vpc():
    """The report's figures of a time-to-event model with IOV on its scale: the Kaplan-Meier VPC (before: refused,
    so only the convergence plot) and the convergence plot (a short torch fit)."""
    import matplotlib

    matplotlib.use("Agg")
    from latentfit import report

    model, table = _tte_iov("torch")
    fit = model.fit(table, seed=0, progress=False, num_iters=(10, 5))
    figs = report.figures(fit, vpc_simulations=5)
    assert list(figs) == ["discrete_vpc", "convergence"]
