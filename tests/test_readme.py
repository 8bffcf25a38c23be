"""The README's code blocks run as written (issue "Core v2": models as users write them).

The Pyro and NumPyro theophylline blocks are executed verbatim, in order, in one namespace, then the
"After the fit" block on the Pyro fit.  Their estimates must land on the exact maximum-likelihood point of
the model (adaptive Gauss–Hermite maximum, independently confirmed: ka 1.5794, V 31.626, CL 2.7480,
ω² 0.3947 / 0.01789 / 0.07075, a 0.7380, logLik −172.718) within SAEM's Monte-Carlo error at the
README's settings (5 chains, K2 = 100: run-to-run SD about 0.7% on the fixed effects, 8% on ω²_V).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"
EXACT = {"ka": 1.5794, "V": 31.626, "CL": 2.7480, "om2": np.array([0.3947, 0.01789, 0.07075]), "a": 0.7380}


def _blocks() -> dict[str, str]:
    """Python blocks of the README keyed by the heading of their section."""
    text = README.read_text()
    out: dict[str, str] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = section.splitlines()[0].strip()
        code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        if code:
            out[heading] = "\n".join(code)
    return out


def _check_theophylline(mu: np.ndarray, omega: np.ndarray, a: float) -> None:
    ka, v, cl = np.exp(mu)
    # fixed effects: 5 SD of the run-to-run spread (0.7 / 0.35 / 0.45%) -> 3.5 / 2 / 2.5%
    assert abs(ka / EXACT["ka"] - 1) < 0.035
    assert abs(v / EXACT["V"] - 1) < 0.02
    assert abs(cl / EXACT["CL"] - 1) < 0.025
    # variances: 4 SD of the spread (2.9 / 8.0 / 4.1%)
    rel = np.abs(np.asarray(omega) ** 2 / EXACT["om2"] - 1)
    assert (rel < np.array([0.12, 0.32, 0.17])).all(), rel
    assert abs(a / EXACT["a"] - 1) < 0.03


@pytest.fixture(scope="module")
def readme_namespace() -> dict:
    import pyro

    pyro.clear_param_store()
    blocks = _blocks()
    ns: dict = {}
    exec(compile(blocks["A plain Pyro model, fitted by SAEM"], "README:pyro", "exec"), ns)
    exec(compile(blocks["NumPyro: the same engines, compiled"], "README:numpyro", "exec"), ns)
    return ns


def test_readme_pyro_block_fits_theophylline(readme_namespace):
    fit = readme_namespace["fit"]
    p = fit.params
    _check_theophylline(p["mu"], p["omega"], float(p["a"]))
    # one dtype per fit: the float32 params of the README model follow the float64 data
    assert all(np.asarray(v).dtype == np.float64 for v in p.values())
    assert fit.model.num_units == 12 and fit.model.unit_plate == "id"


def test_readme_numpyro_block_fits_theophylline(readme_namespace):
    p = readme_namespace["np_fit"].params
    _check_theophylline(np.asarray(p["mu"]), np.asarray(p["omega"]), float(p["a"]))


def test_readme_after_the_fit_block_runs(readme_namespace):
    ns = dict(readme_namespace)
    fit = ns["fit"]
    t, m = fit.model.observations()
    # the regressor of each observation in the model's per-unit layout (here: the sampling times)
    ns["x"] = fit.model._obs_flat(fit.model.ops.asarray(ns["time"]), "conc").cpu().numpy()
    exec(compile(_blocks()["After the fit (any model fitted by SAEM)"], "README:after", "exec"), ns)
    # the quadrature log-likelihood at SAEM's estimate sits just below the exact maximum
    ll = fit.log_likelihood("gq")
    assert -172.718 - 0.25 < ll <= -172.718 + 1e-3
    se = fit.standard_errors()
    assert all(np.isfinite(v) and v > 0 for v in se.values())


def test_readme_mcmcsgd_block_reaches_the_quadrature_maximum():
    """The "Models without sufficient statistics" block: a plain Pyro logistic GLMM fitted by MCMCSGD lands on the
    adaptive-quadrature ML estimate (``gallery_reference.glmm_mle``, independent of latentfit) within 5 of SAEM's
    Monte-Carlo errors on the same data (the gallery's ``logistic_glmm`` entry: 0.0043 / 0.0078 / 0.0021)."""
    import pyro
    from gallery_reference import glmm_mle

    pyro.clear_param_store()
    ns: dict = {}
    exec(compile(_blocks()["Models without sufficient statistics"], "README:mcmcsgd", "exec"), ns)
    ref = glmm_mle(ns["y"], ns["group"], ns["x"], 80, "bernoulli")
    p = ns["glmm_fit"].params
    for key, mc_sd in (("mu", 0.0043), ("omega", 0.0078), ("beta", 0.0021)):
        assert abs(float(p[key]) - ref[key]) < 5 * mc_sd, (key, float(p[key]), ref[key])
    se = ns["glmm_fit"].standard_errors("sa")
    assert all(np.isfinite(v) and v > 0 for v in se.values())
    assert ns["glmm_fit"].engine.random_stop is not None
