"""Inter-occasion variability (issue 14 item 2): κ per (individual, occasion), γ² M-step, simulation and recovery."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

import latentfit as lf
from latentfit.inference.model import DataError, ModelSpecificationError
from latentfit.models import nlme

README = Path(__file__).resolve().parents[1] / "README.md"
PARAMS = {"ka": 1.0, "V": 20.0, "CL": 2.0}
TRUTH = {"ka": 1.0, "V": 20.0, "CL": 2.0, "omega2_ka": 0.1, "omega2_V": 0.05, "omega2_CL": 0.1,
         "gamma2_CL": 0.08, "a": 0.2}


def crossover(num_ids: int, num_occasions: int = 3, times=(0.5, 1, 2, 4, 8, 12), labels=None) -> pd.DataFrame:
    """A NONMEM table: each occasion starts with a dose of 100 (EVID 4, reset and dose, from the second one)."""
    labels = list(range(1, num_occasions + 1)) if labels is None else list(labels)
    ids = np.repeat(np.arange(1, num_ids + 1), num_occasions)
    occ = np.tile(labels, num_ids)
    first = np.tile(np.arange(num_occasions) == 0, num_ids)
    doses = pd.DataFrame({"ID": ids, "TIME": 0.0, "DV": np.nan, "AMT": 100.0, "EVID": np.where(first, 1, 4),
                          "MDV": 1, "OCC": occ})
    obs = pd.DataFrame({"ID": np.repeat(ids, len(times)), "TIME": np.tile(times, len(ids)), "DV": 0.0, "AMT": 0.0,
                        "EVID": 0, "MDV": 0, "OCC": np.repeat(occ, len(times))})
    table = pd.concat([doses, obs]).reset_index(drop=True)
    order = np.lexsort((table["EVID"] == 0, table["TIME"], table["OCC"].map({v: k for k, v in enumerate(labels)}),
                        table["ID"]))
    return table.iloc[order].reset_index(drop=True)


def _model(data: pd.DataFrame, backend: str = "torch", **kw) -> nlme.NLME:
    return nlme.NLME("one_compartment_oral", dict(PARAMS), error="constant", iov=["CL"], data=data, backend=backend,
                     **kw)


def test_occasion_indices_and_layout():
    """Occasion labels are ranked per individual (any values; fewer occasions for some individuals)."""
    df = crossover(4, 3, labels=[2, 5, 9])
    df = df[~((df["ID"] == 2) & (df["OCC"] == 9))]  # individual 2 has two occasions
    model = _model(df)
    occ = model._iov
    assert occ.num_occasions == 3 and occ.total == 11
    assert model.latent_dim == 3 + 3 and [s.name for s in model.latent_sites][-1] == "kappa_CL"
    np.testing.assert_array_equal(model.ops.to_numpy(occ.valid)[1], [1, 1, 0])
    idx = model.ops.to_numpy(occ.occ)
    assert (idx[0] == np.repeat([0, 1, 2], 6)).all() and (idx[1][:12] == np.repeat([0, 1], 6)).all()
    np.testing.assert_array_equal(occ.labels[0], [2, 5, 9])
    assert "gamma2_CL" in model.params and model.params["gamma2_CL"].closed_form


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_iov_densities_reduce_to_the_plain_model(backend):
    """At κ = 0 the likelihood is the plain model's; the prior adds Σ log N(κ; 0, γ²) over every slot; κ shifts
    each occasion's φ and nothing else."""
    df = _model(crossover(5, 2)).simulate({k: v for k, v in TRUTH.items()}, seed=3)
    plain = nlme.NLME("one_compartment_oral", dict(PARAMS), error="constant", data=df, backend=backend)
    model = _model(df, backend)
    ops = model.ops
    theta0, theta = plain.init_params(), model.init_params()
    z = plain.sample_prior(theta0, ops.key(0), 2)  # [2, 5, 3]
    kappa = np.random.default_rng(0).normal(0.0, 0.3, (2, 5, 2))
    z_iov = ops.asarray(np.concatenate([ops.to_numpy(z), kappa], -1))
    z_zero = ops.asarray(np.concatenate([ops.to_numpy(z), 0 * kappa], -1))
    ll0, lp0 = (ops.to_numpy(v) for v in plain.log_densities(theta0, z))
    ll1, lp1 = (ops.to_numpy(v) for v in model.log_densities(theta, z_zero))
    tol = 0 if backend == "torch" else 1e-5
    np.testing.assert_allclose(ll1, ll0, rtol=tol, atol=tol)
    np.testing.assert_allclose(lp1, lp0 + 2 * norm.logpdf(0.0, 0.0, np.sqrt(0.25)), rtol=1e-6)
    _, lp2 = (ops.to_numpy(v) for v in model.log_densities(theta, z_iov))
    np.testing.assert_allclose(lp2, lp0 + norm.logpdf(kappa, 0.0, 0.5).sum(-1), rtol=1e-6)
    # κ of occasion 2 acts on occasion 2's observations only, like a shifted log CL in the plain model
    f = ops.to_numpy(model.structural_prediction(theta, z_iov))
    zn = ops.to_numpy(z).copy()
    zn[..., 2] += kappa[..., 1]
    f_shift = ops.to_numpy(plain.structural_prediction(theta0, ops.asarray(zn)))
    np.testing.assert_allclose(f[..., 6:], f_shift[..., 6:], rtol=1e-5)


def test_gamma2_m_step_is_the_mean_square_over_real_occasions():
    df = crossover(6, 3)
    df = df[~((df["ID"] <= 2) & (df["OCC"] == 3))]
    model = _model(df)
    ops = model.ops
    theta = model.init_params()
    z = ops.to_numpy(model.sample_prior(theta, ops.key(1), 1))[0]
    stats = {k: ops.to_numpy(v).sum(0) for k, v in model.stats(theta, ops.asarray(z)).items()}
    new = model.m_step({k: ops.asarray(v) for k, v in stats.items()}, theta, model.num_units)
    kappa = z[:, 3:]
    valid = np.ones((6, 3), bool)
    valid[:2, 2] = False
    assert float(new["gamma2_CL"]) == pytest.approx((kappa[valid] ** 2).mean(), rel=1e-12)
    # the η part of the M-step is unchanged: the plain model on the φ columns
    plain = nlme.NLME("one_compartment_oral", dict(PARAMS), error="constant", data=df)
    plain_stats = {k: ops.to_numpy(v).sum(0) for k, v in plain.stats(theta, ops.asarray(z[:, :3])).items()}
    old = plain.m_step({k: ops.asarray(v) for k, v in plain_stats.items()}, plain.init_params(), 6)
    for name in ("ka", "V", "CL", "omega2_ka", "omega2_V", "omega2_CL"):
        assert float(new[name]) == pytest.approx(float(old[name]), rel=1e-12)


def test_a_model_without_iov_is_unchanged_by_an_occasion_column():
    """No ``iov=``: the occasion column is ignored and the fit is bit-identical to the one on the data without it."""
    df = lf.datasets.theophylline(saemix_form=True)
    with_occ = df.assign(OCC=np.where(df["Time"] > 5, 2, 1))
    opts = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose", seed=0, progress=False,
                num_iters=(30, 15))
    model = nlme.NLME("one_compartment_oral", dict(PARAMS))
    a, b = model.fit(df, **opts), model.fit(with_occ, **opts)
    assert b.model.latent_dim == 3 and b.model._iov is None
    assert all(float(a.params[k]) == float(b.params[k]) for k in a.params)


def test_iov_errors():
    with pytest.raises(ModelSpecificationError, match="iov"):
        nlme.NLME("one_compartment_oral", dict(PARAMS), iov=["Q"])
    with pytest.raises(ModelSpecificationError, match="> 0"):
        nlme.NLME("one_compartment_oral", dict(PARAMS), iov={"CL": 0.0})
    with pytest.raises(DataError, match="occasion"):
        _model(crossover(3, 2).rename(columns={"OCC": "PERIOD"}))
    model = _model(crossover(3, 2).rename(columns={"OCC": "PERIOD"}), occasion="PERIOD")
    assert model._iov.num_occasions == 2


def _z_scores(fit, truth: dict[str, float]) -> dict[str, float]:
    """(estimate − truth) / SE; for the variances and the error parameter on the log scale, log(estimate / truth) /
    RSE, where their sampling distribution is close to normal."""
    table = fit.summary()
    out = {}
    for name, value in truth.items():
        est, se = float(table.loc[name, "estimate"]), float(table.loc[name, "se"])
        log_scale = name.startswith(("omega2_", "gamma2_")) or name == "a"
        out[name] = np.log(est / value) / (se / est) if log_scale else (est - value) / se
    return out


def _recovery(seed: int, num_ids: int, num_iters=(300, 100)):
    """Simulate 3 occasions per subject at TRUTH, fit, and return the z-scores."""
    df = _model(crossover(num_ids, 3)).simulate(dict(TRUTH), seed=seed)
    return _z_scores(_model(df).fit(seed=seed, progress=False, num_iters=num_iters), TRUTH)


def test_readme_block_recovers_the_truth():
    """The README's occasions block, executed verbatim (40 subjects): every estimate within 3.5 SE of the truth
    it simulated from (variances and error parameters on the log scale)."""
    text = README.read_text()
    section = text.split("### Inter-occasion variability (OCC)\n", 1)[1].split("\n### ", 1)[0]
    ns = {"np": np, "pd": pd, "nlme": nlme}
    exec(compile(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0], "README:iov_fit", "exec"), ns)
    z = _z_scores(ns["iov_fit"], ns["truth_iov"])
    assert max(abs(v) for v in z.values()) < 3.5, z


@pytest.mark.slow
def test_iov_recovery_three_seeds():
    """100 individuals × 3 occasions, saemix's iterations, 3 seeds: every z-score within 3.5 and the mean z-score
    of each parameter over the seeds within 3.5/√3 (no systematic bias beyond Monte-Carlo error)."""
    zs = [_recovery(seed=s, num_ids=100) for s in (11, 12, 13)]
    for name in TRUTH:
        vals = [z[name] for z in zs]
        assert max(abs(v) for v in vals) < 3.5, (name, vals)
        assert abs(np.mean(vals)) < 3.5 / np.sqrt(3), (name, vals)
