"""MISSO-VI (Karimi et al., IJCAI 2021, §7) and its baselines MC-SAG, MC-Adam and BBB, on Pyro and NumPyro.

* the updates against a NumPy transcription of the closed forms, on a conjugate Gaussian model whose guide draws
  ``w = μ + σ ε0`` with a fixed ``ε0`` (so every block gradient is a known number), to 1e-10;
* MISSO and MC-Adam reach the closed-form optimum of the ELBO of the conjugate Gaussian model (AutoNormal);
* all four methods reduce the negative ELBO of a Bayesian logistic regression (200 points, 5 features);
* Pyro: evaluating a block by substituting its indices for the data plate's equals masking, to 1e-10;
* bad input raises clearly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as pdist
import pytest
import torch
from numpyro.infer.autoguide import AutoNormal as NAutoNormal
from pyro.infer.autoguide import AutoNormal as PAutoNormal

from latentfit.inference.misso_vi import MISSOVIState, make_blocks, num_samples_schedule
from latentfit.integrations.misso_vi_numpyro import MISSOVI as NumPyroMISSOVI
from latentfit.integrations.misso_vi_pyro import MISSOVI as PyroMISSOVI

jax.config.update("jax_enable_x64", True)

METHODS = ("misso", "mc-sag", "mc-adam", "bbb")
EPS0 = 0.7  # the fixed ε of the hand-worked case


@pytest.fixture(autouse=True)
def _clear_pyro_store() -> Any:
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ------------------------------------------------------------------------------------- conjugate Gaussian


def pyro_gauss_model(y: torch.Tensor) -> None:
    w = pyro.sample("w", pdist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", pdist.Normal(w, 1.0), obs=y)


def pyro_fixed_eps_guide(y: torch.Tensor) -> None:
    """q = N(μ, σ²) with the draw w = μ + σ ε0 (ε0 fixed) and its log-density log N(w; μ, σ²)."""
    mu = pyro.param("mu", torch.tensor(0.3, dtype=y.dtype))
    sigma = pyro.param("sigma", torch.tensor(0.8, dtype=y.dtype), constraint=pdist.constraints.positive)
    w = mu + sigma * EPS0
    pyro.sample("w", pdist.Delta(w, log_density=pdist.Normal(mu, sigma).log_prob(w)))


def numpyro_gauss_model(y: Any) -> None:
    w = numpyro.sample("w", ndist.Normal(0.0, 1.0))
    with numpyro.plate("data", len(y)):
        numpyro.sample("obs", ndist.Normal(w, 1.0), obs=y)


def numpyro_fixed_eps_guide(y: Any) -> None:
    mu = numpyro.param("mu", 0.3)
    sigma = numpyro.param("sigma", 0.8, constraint=ndist.constraints.positive)
    w = mu + sigma * EPS0
    numpyro.sample("w", ndist.Delta(w, log_density=ndist.Normal(mu, sigma).log_prob(w)))


def fixed_eps_block_grad(theta: np.ndarray, yb: np.ndarray, n: int) -> np.ndarray:
    """∇ of L_i = Σ_{j∈B_i} (y_j − w)²/2 + (1/n)(w²/2 − log σ − ε0²/2) at w = μ + σ ε0, in θ = (μ, log σ)."""
    mu, sigma = theta[0], np.exp(theta[1])
    w = mu + sigma * EPS0
    r = np.sum(w - yb)
    g_mu = r + w / n
    g_sigma = EPS0 * r + (w * EPS0 - 1.0 / sigma) / n
    return np.array([g_mu, sigma * g_sigma])


def numpy_reference(theta0: np.ndarray, y: np.ndarray, blocks: list[np.ndarray], visits: list[list[int]],
                    method: str, lr: float) -> list[np.ndarray]:
    """The closed-form updates, written out from the paper (no running sums, no shared code)."""
    n = len(blocks)
    grad = [fixed_eps_block_grad(theta0, y[b], n) for b in blocks]
    anchors = [theta0.copy() for _ in blocks]
    theta, out = theta0.copy(), [theta0.copy()]
    m, v = np.zeros(2), np.zeros(2)
    for t, (i,) in enumerate(visits, start=1):
        g = fixed_eps_block_grad(theta, y[blocks[i]], n)
        if method == "misso":
            anchors[i], grad[i] = theta.copy(), g
            theta = np.mean(anchors, axis=0) - lr / n * np.sum(grad, axis=0)
        elif method == "mc-sag":
            grad[i] = g
            theta = theta - lr / n * np.sum(grad, axis=0)
        elif method == "bbb":
            theta = theta - lr * g
        else:
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g**2
            theta = theta - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        out.append(theta.copy())
    return out


Y8 = np.array([0.4, 1.9, -0.3, 1.2, 2.2, 0.8, 1.5, 0.1])


def run_pyro(model: Callable, guide: Callable, data: tuple, **options: Any) -> Any:
    return PyroMISSOVI(model, guide, **options).run(*(torch.as_tensor(d) for d in data))


def run_numpyro(model: Callable, guide: Callable, data: tuple, **options: Any) -> Any:
    return NumPyroMISSOVI(model, guide, **options).run(jax.random.PRNGKey(0), *data)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_updates_equal_closed_form(ppl: str, method: str) -> None:
    """n = 4 blocks of 2: θ^{k+1} = mean(anchors) − (γ/n) Σ ĝ (MISSO), θ^k − (γ/n) Σ ĝ (MC-SAG), SGD (BBB) and
    Adam, against NumPy, to 1e-10 over 3 epochs (12 iterations)."""
    opts = dict(num_blocks=4, method=method, learning_rate=0.05, num_epochs=3, num_samples=2, seed=3,
                record=True, track_loss=False)
    if ppl == "pyro":
        fit = run_pyro(pyro_gauss_model, pyro_fixed_eps_guide, (Y8,), **opts)
        assert set(fit.params) == {"mu", "sigma"}
        assert float(pyro.param("mu").detach()) == pytest.approx(float(fit.params["mu"]))  # left in the param store
    else:
        fit = run_numpyro(numpyro_gauss_model, numpyro_fixed_eps_guide, (Y8,), **opts)
    theta0 = np.array([0.3, np.log(0.8)])
    trace = np.asarray(fit.trace["theta"])
    np.testing.assert_allclose(trace[0], theta0, atol=1e-12)
    assert fit.num_iters == 12 and len(fit.trace["blocks"]) == 12
    expected = numpy_reference(theta0, Y8, make_blocks(8, num_blocks=4), fit.trace["blocks"], method, 0.05)
    np.testing.assert_allclose(trace, np.asarray(expected), rtol=0, atol=1e-10)
    assert float(fit.params["mu"]) == pytest.approx(trace[-1][0], abs=1e-12)
    assert float(fit.params["sigma"]) == pytest.approx(np.exp(trace[-1][1]), abs=1e-12)
    assert trace[-1][0] != trace[0][0]


def test_state_running_sums_match_tables() -> None:
    """MISSO's O(dim θ) running sums equal the sums over the tables (plain NumPy vectors)."""
    rng = np.random.default_rng(0)
    state = MISSOVIState("misso", 0.1, 5)
    theta = rng.normal(size=3)
    state.init_tables(theta, [rng.normal(size=3) for _ in range(5)])
    for _ in range(40):
        i = int(rng.integers(5))
        theta = state.step(theta, [i], [rng.normal(size=3)])
        np.testing.assert_allclose(theta, np.mean(state.anchors, 0) - 0.1 / 5 * np.sum(state.grads, 0), atol=1e-12)


# ---------------------------------------------------------------------------------- ELBO optimum, AutoNormal

Y10 = np.random.default_rng(1).normal(1.5, 1.0, size=10)
MU_STAR, SD_STAR = Y10.sum() / 11, (1 / 11) ** 0.5  # q* = N(Σy/(N+1), 1/(N+1)): the exact posterior


@pytest.mark.parametrize(("method", "lr", "tol_mu", "tol_sd"), [("misso", 0.3, 0.06, 0.04),
                                                                 ("mc-adam", 0.05, 0.12, 0.06)])
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_reaches_elbo_optimum(ppl: str, method: str, lr: float, tol_mu: float, tol_sd: float) -> None:
    """N = 10, n = 5 blocks, AutoNormal started at σ = 1, M_k = k, 40 epochs: (μ, σ) within the tolerances of the
    closed-form optimum μ* = Σy/(N+1), σ* = (N+1)^{-1/2}, and the final negative ELBO near its minimum."""
    opts = dict(num_blocks=5, method=method, learning_rate=lr, num_epochs=40, seed=0, loss_particles=50)
    if ppl == "pyro":
        fit = run_pyro(pyro_gauss_model, PAutoNormal(pyro_gauss_model, init_scale=1.0), (Y10,),
                       vectorize_particles=True, **opts)
        mu, sd = float(fit.params["AutoNormal.locs.w"]), float(fit.params["AutoNormal.scales.w"])
    else:
        fit = run_numpyro(numpyro_gauss_model, NAutoNormal(numpyro_gauss_model, init_scale=1.0), (Y10,), **opts)
        mu, sd = float(fit.params["w_auto_loc"]), float(fit.params["w_auto_scale"])
    assert abs(mu - MU_STAR) < tol_mu and abs(sd - SD_STAR) < tol_sd, (mu, sd, MU_STAR, SD_STAR)
    # min negative ELBO = −log evidence: y ~ N(0, I + 11ᵀ)
    cov = np.eye(10) + 1.0
    log_ev = -0.5 * (Y10 @ np.linalg.solve(cov, Y10) + np.linalg.slogdet(cov)[1] + 10 * np.log(2 * np.pi))
    assert len(fit.history["loss"]) == 41 and fit.history["num_samples"] == list(range(1, 41))
    assert np.mean(fit.history["loss"][-5:]) == pytest.approx(-log_ev, abs=0.15)
    assert fit.history["loss"][0] > -log_ev + 3


# ---------------------------------------------------------------------------------- logistic regression

_rng = np.random.default_rng(0)
X = _rng.normal(size=(200, 5))
YB = (_rng.uniform(size=200) < 1 / (1 + np.exp(-X @ np.array([1.5, -1.0, 0.5, 0.0, 2.0])))).astype(float)


def pyro_logistic(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", pdist.Normal(torch.zeros(5, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", pdist.Bernoulli(logits=x @ w), obs=y)


def numpyro_logistic(x: Any, y: Any) -> None:
    w = numpyro.sample("w", ndist.Normal(np.zeros(5), 1.0).to_event(1))
    with numpyro.plate("data", len(y)):
        numpyro.sample("obs", ndist.Bernoulli(logits=x @ w), obs=y)


@pytest.mark.parametrize(("method", "lr"), [("misso", 0.1), ("mc-sag", 0.1), ("mc-adam", 0.05), ("bbb", 0.05)])
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_logistic_regression_elbo_decreases(ppl: str, method: str, lr: float) -> None:
    """10 blocks of 20 points, 8 epochs, M_k = min(k, 4): the negative ELBO (20 particles) drops from ≈ 150-230
    to below 100 (its minimum is ≈ 88)."""
    opts = dict(num_blocks=10, method=method, learning_rate=lr, num_epochs=8, num_samples=lambda k: min(k, 4),
                loss_particles=20, seed=1)
    if ppl == "pyro":
        fit = run_pyro(pyro_logistic, PAutoNormal(pyro_logistic), (X, YB), **opts)
        w = fit.params["AutoNormal.locs.w"].numpy()
    else:
        fit = run_numpyro(numpyro_logistic, NAutoNormal(numpyro_logistic), (X, YB), **opts)
        w = np.asarray(fit.params["w_auto_loc"])
    loss = fit.history["loss"]
    assert loss[0] > 140 and np.mean(loss[-2:]) < 100, loss
    assert np.all(np.sign(w[[0, 1, 2, 4]]) == [1, -1, 1, 1]) and fit.time > 0 and fit.num_iters == 80


def pyro_logistic_indexed(x: torch.Tensor, y: torch.Tensor) -> None:
    """``pyro_logistic`` written with Pyro's mini-batch idiom: the data indexed by the plate's indices."""
    w = pyro.sample("w", pdist.Normal(torch.zeros(5, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(y)) as idx:
        pyro.sample("obs", pdist.Bernoulli(logits=x[idx] @ w), obs=y[idx])


@pytest.mark.parametrize(("method", "lr"), [("misso", 0.1), ("mc-sag", 0.1), ("mc-adam", 0.05), ("bbb", 0.05)])
def test_pyro_block_substitution_equals_masking(method: str, lr: float) -> None:
    """Substituting a block's indices for the data plate's (model and guide run on |B| points) gives the same
    trajectory as masking the other N − |B| points, to 1e-10 (blocks of unequal size: 6 × 30 + 20, so the undone
    N/|B| rescaling differs between blocks); ``"auto"`` chooses the substitution for a model indexing its data and
    masking for one that uses its full tensors, where ``"block"`` is refused."""
    opts = dict(block_size=30, method=method, learning_rate=lr, num_epochs=3, num_samples=lambda k: min(k, 3),
                seed=2, record=True, track_loss=False)
    traces = {}
    for mode in ("mask", "block", "auto"):
        pyro.clear_param_store()
        fit = run_pyro(pyro_logistic_indexed, PAutoNormal(pyro_logistic_indexed), (X, YB), block_eval=mode, **opts)
        assert fit.extra["block_eval"] == ("block" if mode == "auto" else mode)
        traces[mode] = np.asarray(fit.trace["theta"])
    assert traces["mask"].shape == (22, 10) and np.abs(traces["mask"][-1] - traces["mask"][0]).max() > 0.1
    np.testing.assert_allclose(traces["block"], traces["mask"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(traces["auto"], traces["mask"], rtol=0, atol=1e-10)
    pyro.clear_param_store()
    fit = run_pyro(pyro_logistic, PAutoNormal(pyro_logistic), (X, YB), **opts)  # full tensors in the plate
    assert fit.extra["block_eval"] == "mask"
    np.testing.assert_allclose(np.asarray(fit.trace["theta"]), traces["mask"], rtol=0, atol=1e-10)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="indexes its data by the plate 'data'"):
        run_pyro(pyro_logistic, PAutoNormal(pyro_logistic), (X, YB), block_eval="block", **opts)
    with pytest.raises(ValueError, match="block_eval must be one of"):
        PyroMISSOVI(pyro_logistic, PAutoNormal(pyro_logistic), block_eval="subsample")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", [PyroMISSOVI, NumPyroMISSOVI])
def test_bad_options(cls: type) -> None:
    with pytest.raises(ValueError, match="MISSOVI needs a guide"):
        cls(pyro_gauss_model)
    guide = pyro_fixed_eps_guide
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
        cls(pyro_gauss_model, guide, learning_rate=-0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        cls(pyro_gauss_model, guide, learning_rate="fast")
    with pytest.raises(ValueError, match="method must be one of"):
        cls(pyro_gauss_model, guide, method="adam")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        cls(pyro_gauss_model, guide, num_samples=0)
    with pytest.raises(ValueError, match="num_epochs must be a positive integer"):
        cls(pyro_gauss_model, guide, num_epochs=2.5)
    with pytest.raises(ValueError, match="not both"):
        cls(pyro_gauss_model, guide, num_blocks=2, block_size=4)
    with pytest.raises(TypeError, match="guide must be callable"):
        cls(pyro_gauss_model, "AutoNormal")
    assert cls(pyro_gauss_model, guide, method="MC_SAG").method == "mc-sag"


def test_bad_blocks_and_schedule() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        make_blocks(8, num_blocks=9)
    with pytest.raises(ValueError, match="partition"):
        make_blocks(8, blocks=[[0, 1, 2], [3, 4]])
    assert [b.tolist() for b in make_blocks(5, block_size=2)] == [[0, 1], [2, 3], [4]]
    assert [num_samples_schedule(None)(k) for k in (1, 2, 7)] == [1, 2, 7]
    with pytest.raises(ValueError, match=r"num_samples\(3\)"):
        num_samples_schedule(lambda k: k - 3)(3)


def test_bad_models_pyro() -> None:
    def no_plate(y: torch.Tensor) -> None:
        w = pyro.sample("w", pdist.Normal(0.0, 1.0))
        pyro.sample("obs", pdist.Normal(w, 1.0).expand([len(y)]).to_event(1), obs=y)

    def subsampled(y: torch.Tensor) -> None:
        w = pyro.sample("w", pdist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=4) as idx:
            pyro.sample("obs", pdist.Normal(w, 1.0), obs=y[idx])

    y = torch.as_tensor(Y8, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs the model's data plate"):
        PyroMISSOVI(no_plate, PAutoNormal(no_plate), num_epochs=1).run(y)
    with pytest.raises(ValueError, match="subsampled"):
        PyroMISSOVI(subsampled, PAutoNormal(subsampled), num_epochs=1).run(y)
    with pytest.raises(ValueError, match="no plate named 'obs'"):
        PyroMISSOVI(pyro_gauss_model, PAutoNormal(pyro_gauss_model), plate="obs", num_epochs=1).run(y)
    with pytest.raises(ValueError, match="exceeds"):
        PyroMISSOVI(pyro_gauss_model, PAutoNormal(pyro_gauss_model), num_blocks=9, num_epochs=1).run(y)


def test_bad_models_numpyro() -> None:
    def subsampled(y: Any) -> None:
        w = numpyro.sample("w", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", len(y), subsample_size=4) as idx:
            numpyro.sample("obs", ndist.Normal(w, 1.0), obs=y[idx])

    with pytest.raises(ValueError, match="subsampled"):
        NumPyroMISSOVI(subsampled, NAutoNormal(subsampled), num_epochs=1).run(jax.random.PRNGKey(0), Y8)
    with pytest.raises(TypeError, match="PRNG key"):
        NumPyroMISSOVI(numpyro_gauss_model, numpyro_fixed_eps_guide).run("key", Y8)
