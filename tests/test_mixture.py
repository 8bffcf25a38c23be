"""GaussianMixture: agreement with scikit-learn's EM, the Pyro-enumeration route, bad inputs, collapse.

Engine-level tests take the ``backend`` fixture: the mixture holds torch tensors (Pyro backend) or
JAX arrays (NumPyro backend, compiled EM epochs).  The NumPyro twin of the plain-Pyro-mixture route
(enumeration of a Categorical label) is in ``test_numpyro_engines.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.distributions import constraints

from latentfit import DataError, ModelSpecificationError
from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.integrations.pyro import PyroEnumModel
from latentfit.models.mixture import GaussianMixture

TRUE_LOCS = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
TRUE_W = np.array([0.5, 0.3, 0.2])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _simulate(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = rng.choice(3, n, p=TRUE_W)
    cov = np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 0.3]], [[0.4, -0.2], [-0.2, 0.6]]])
    x = np.stack([rng.multivariate_normal(TRUE_LOCS[k], cov[k]) for k in lab])
    return x, lab


def _sorted(params):
    order = np.lexsort((params["locs"][:, 1], params["locs"][:, 0]))
    return {k: v[order] for k, v in params.items()}


def test_parameter_recovery_on_simulated_data(backend):
    x, _ = _simulate(3000)
    fit = EM(GaussianMixture(backend.tensor(x), 3, "full", seed=0), num_epochs=200, progress=False).run()
    p = _sorted(fit.params)
    np.testing.assert_allclose(p["locs"], TRUE_LOCS[[0, 2, 1]], atol=0.1)
    np.testing.assert_allclose(p["weights"], TRUE_W[[0, 2, 1]], atol=0.03)


@pytest.mark.parametrize("cov", ["full", "diag", "spherical", "tied"])
def test_em_matches_sklearn_from_the_same_start(backend, cov):
    from sklearn.mixture import GaussianMixture as SkGMM

    x, _ = _simulate(600, seed=1)
    gm = GaussianMixture(backend.tensor(x), 3, cov, seed=0, reg_covar=1e-6)
    init = {k: backend.to_numpy(p.value) for k, p in gm.params.items()}
    prec = np.linalg.inv(init["covariances"]) if cov in ("full", "tied") else 1.0 / init["covariances"]
    sk = SkGMM(3, covariance_type=cov, tol=1e-12, max_iter=300, reg_covar=1e-6, weights_init=init["weights"],
               means_init=init["locs"], precisions_init=prec).fit(x)
    fit = EM(gm, num_epochs=300, progress=False).run()
    np.testing.assert_allclose(fit.params["locs"], sk.means_, atol=1e-6)
    np.testing.assert_allclose(fit.params["weights"], sk.weights_, atol=1e-6)
    np.testing.assert_allclose(fit.params["covariances"], sk.covariances_, atol=1e-6)
    assert abs(fit.history["objective"][-1] / len(x) - sk.score(x)) < 1e-8


@pytest.mark.parametrize("cov", ["tied", "tied_diag", "tied_spherical"])
def test_tied_m_steps_are_the_pooled_scatter_formulas(backend, cov):
    """From given responsibilities, the shared covariance is the components' scatter about their own means pooled over
    the components and divided by N (scikit-learn's "tied"; its diagonal; the mean of that diagonal), plus reg_covar;
    the E-step treats it as every component's covariance."""
    x, _ = _simulate(300, seed=11)
    reg = 1e-4
    gm = GaussianMixture(backend.tensor(x), 3, cov, seed=0, reg_covar=reg)
    r = np.random.default_rng(12).dirichlet(np.ones(3), size=len(x))
    th = gm.m_step(gm.reduce_rows({"r": backend.tensor(r)}), gm.init_params(), len(x))
    Nk = r.sum(0)
    mu = (r.T @ x) / Nk[:, None]
    dev = x[:, None, :] - mu[None]  # [n, K, d]
    full = np.einsum("ik,ika,ikb->ab", r, dev, dev) / len(x)
    want = {"tied": full + reg * np.eye(2), "tied_diag": np.diag(full) + reg,
            "tied_spherical": np.mean(np.diag(full)) + reg}[cov]
    got = {k: backend.to_numpy(v) for k, v in th.items()}
    assert got["covariances"].shape == np.shape(want)
    np.testing.assert_allclose(got["covariances"], want, rtol=1e-10)
    np.testing.assert_allclose(got["locs"], mu, rtol=1e-10)
    np.testing.assert_allclose(got["weights"], Nk / len(x), rtol=1e-10)
    Sigma = want if cov == "tied" else np.diag(np.broadcast_to(want, (2,)))
    dens = sum(got["weights"][k] * multivariate_normal(mu[k], Sigma).pdf(x) for k in range(3))
    np.testing.assert_allclose(backend.to_numpy(gm.marginal_log_lik(th)), np.log(dens), rtol=1e-10)


def _numpy_em_shared_scale(x, w, mu, sd, reg_covar=1e-6, iters=3000):
    """EM of the 1-D mixture with one scale shared by the components (plus ``reg_covar`` on the variance, as the
    library and scikit-learn do), run to convergence (``iters`` steps): (w, μ, σ, log-lik at the last E-step)."""
    w, mu, var = np.array(w, float), np.array(mu, float), float(sd) ** 2
    for _ in range(iters):
        lj = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x[:, None] - mu) ** 2 / var
        ll = np.logaddexp.reduce(lj, 1)
        r = np.exp(lj - ll[:, None])
        Nk = r.sum(0)
        w, mu = Nk / len(x), (r.T @ x) / Nk
        var = np.sum(r * (x[:, None] - mu) ** 2) / len(x) + reg_covar
    return w, mu, np.sqrt(var), ll.sum()


def _tutorial_gmm(data):
    """Pyro's GMM tutorial mixture (one scale shared by the components), its parameters as params."""
    weights = pyro.param("weights", torch.tensor([0.5, 0.5], dtype=torch.float64), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=torch.float64))
    scale = pyro.param("scale", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
    with pyro.plate("data", len(data)):
        a = pyro.sample("assignment", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[a], scale), obs=data)


def _one_d_data(n=400, seed=1):
    rng = np.random.default_rng(seed)
    return np.array([0.0, 3.0])[rng.choice(2, n, p=[0.6, 0.4])] + 0.8 * rng.standard_normal(n)


def test_pyro_tutorial_gmm_with_a_shared_scale_gives_the_mle():
    """Pyro's tutorial GMM (``Normal(locs[a], scale)``, one scalar scale param): recognised as the tied mixture, EM
    lands on the maximum-likelihood estimates of a direct EM of the same model from the same start, its
    log-likelihood never decreases, and the fitted sd is written back to the user's ``scale``."""
    from latentfit.pyro import EM as PyroEM
    from latentfit.pyro import MiniBatchEM as PyroMiniBatchEM

    x = _one_d_data()
    w, mu, sd, ll = _numpy_em_shared_scale(x, [0.5, 0.5], [-1.0, 1.0], 1.0)
    pyro.clear_param_store()
    enum = PyroEnumModel(_tutorial_gmm, (torch.tensor(x),))
    assert enum._gm.covariance_type == "tied_spherical" and enum._family_estep
    pyro.clear_param_store()
    fit = PyroEM(_tutorial_gmm, num_epochs=150, progress=False).run(torch.tensor(x))
    np.testing.assert_allclose(fit.params["weights"], w, atol=1e-10)
    np.testing.assert_allclose(fit.params["locs"], mu, atol=1e-10)
    np.testing.assert_allclose(fit.params["scale"], sd, atol=1e-10)
    assert np.shape(fit.params["scale"]) == ()
    np.testing.assert_allclose(float(pyro.param("scale").detach()), sd, atol=1e-10)  # written back as the sd
    obj = np.asarray(fit.history["objective"])
    assert np.all(np.diff(obj) >= -1e-9 * np.abs(obj[1:])) and abs(obj[-1] - ll) < 1e-8
    pyro.clear_param_store()
    mb = PyroMiniBatchEM(_tutorial_gmm, num_epochs=300, batch_size=100, progress=False,
                         seed=0).run(torch.tensor(x))
    np.testing.assert_allclose(mb.params["scale"], sd, atol=1e-3)


def _numpy_em_per_component(x, w, mu, sd, iters):
    """Plain EM of the 1-D mixture with a scale per component (no regularisation): (w, μ, σ)."""
    w, mu, var = (np.array(a, float) for a in (w, mu, np.square(sd)))
    for _ in range(iters):
        lj = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x[:, None] - mu) ** 2 / var
        r = np.exp(lj - np.logaddexp.reduce(lj, 1)[:, None])
        Nk = r.sum(0)
        w, mu = Nk / len(x), (r.T @ x) / Nk
        var = np.sum(r * (x[:, None] - mu) ** 2, 0) / Nk
    return w, mu, np.sqrt(var)


def test_plain_mixture_reg_covar_is_an_option_and_zero_gives_the_exact_em():
    """``EM(model, reg_covar=0.0)``: a plain Pyro mixture's M-step adds nothing to the variances, and the estimates
    equal a hand-written EM from the same start to rounding; the default keeps scikit-learn's 1e-6."""
    from latentfit.pyro import EM as PyroEM

    x = _one_d_data(300, seed=4)

    def model(data):
        weights = pyro.param("weights", torch.tensor([0.5, 0.5], dtype=torch.float64), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=torch.float64))
        scales = pyro.param("scales", torch.tensor([1.0, 1.0], dtype=torch.float64), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            a = pyro.sample("assignment", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[a], scales[a]), obs=data)

    for iters in (1, 5):
        w, mu, sd = _numpy_em_per_component(x, [0.5, 0.5], [-1.0, 1.0], [1.0, 1.0], iters)
        pyro.clear_param_store()
        fit = PyroEM(model, num_epochs=iters, reg_covar=0.0, progress=False).run(torch.tensor(x))
        np.testing.assert_allclose(fit.params["weights"], w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(fit.params["locs"], mu, rtol=0, atol=1e-12)
        np.testing.assert_allclose(fit.params["scales"], sd, rtol=0, atol=1e-12)
    pyro.clear_param_store()
    fit = PyroEM(model, num_epochs=1, progress=False).run(torch.tensor(x))  # the default: variances + 1e-6
    w, mu, sd = _numpy_em_per_component(x, [0.5, 0.5], [-1.0, 1.0], [1.0, 1.0], 1)
    np.testing.assert_allclose(fit.params["scales"] ** 2 - sd**2, 1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="reg_covar must be >= 0"):
        PyroEM(model, reg_covar=-1.0)
    with pytest.raises(TypeError, match=r"GaussianMixture\(x, K, reg_covar=\.\.\.\)"):
        PyroEM(GaussianMixture(torch.tensor(x)[:, None], 2), reg_covar=0.0)
    pyro.clear_param_store()


def test_pyro_mixture_with_a_shared_scale_tril_matches_sklearn_tied():
    """A 2-D ``MultivariateNormal(locs[a], scale_tril=L)`` with one Cholesky-factor param: the tied mixture; EM from
    scikit-learn's start gives its "tied" estimates, and ``L`` holds the Cholesky factor of the fitted covariance."""
    from sklearn.mixture import GaussianMixture as SkGMM

    from latentfit.pyro import EM as PyroEM

    x, _ = _simulate(400, seed=13)
    L0 = np.array([[1.5, 0.0], [0.3, 1.2]])
    w0, mu0 = np.array([0.4, 0.3, 0.3]), np.array([[0.5, 0.5], [3.0, 0.5], [0.5, 3.0]])

    def model(data):
        w = pyro.param("w", torch.tensor(w0), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor(mu0))
        L = pyro.param("L", torch.tensor(L0), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(data)):
            a = pyro.sample("a", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.MultivariateNormal(locs[a], scale_tril=L), obs=data)

    sk = SkGMM(3, covariance_type="tied", tol=1e-12, max_iter=500, reg_covar=1e-6, weights_init=w0,
               means_init=mu0, precisions_init=np.linalg.inv(L0 @ L0.T)).fit(x)
    pyro.clear_param_store()
    fit = PyroEM(model, num_epochs=500, progress=False).run(torch.tensor(x))
    L = fit.params["L"]
    np.testing.assert_allclose(L @ L.T, sk.covariances_, atol=1e-6)
    np.testing.assert_allclose(L, np.linalg.cholesky(sk.covariances_), atol=1e-6)
    np.testing.assert_allclose(fit.params["locs"], sk.means_, atol=1e-6)
    np.testing.assert_allclose(fit.params["w"], sk.weights_, atol=1e-6)
    obj = np.asarray(fit.history["objective"])
    assert np.all(np.diff(obj) >= -1e-9 * np.abs(obj[1:])) and abs(obj[-1] / len(x) - sk.score(x)) < 1e-8


@pytest.mark.parametrize("shape, cov", [((2,), "tied_diag"), ((), "tied_spherical")])
def test_pyro_mixture_with_one_shared_normal_scale_gives_the_tied_estimates(shape, cov):
    """``Normal(locs[a], s).to_event(1)`` on 2-D data with one ``[d]`` or scalar scale param shared by the components:
    the tied_diag / tied_spherical mixture; Pyro EM gives GaussianMixture's EM estimates and ``s`` gets the sd."""
    from latentfit.pyro import EM as PyroEM

    x = torch.tensor(_simulate(300, seed=14)[0])
    gm = GaussianMixture(x, 3, cov, seed=0)
    init = {k: p.value.clone() for k, p in gm.params.items()}

    def model(data):
        w = pyro.param("w", init["weights"].clone(), constraint=constraints.simplex)
        mu = pyro.param("mu", init["locs"].clone())
        s = pyro.param("s", init["covariances"].sqrt().clone(), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            a = pyro.sample("a", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(mu[a], s).to_event(1), obs=data)

    pyro.clear_param_store()
    enum = PyroEnumModel(model, (x,))
    assert enum._gm.covariance_type == cov and enum._family_estep and tuple(init["covariances"].shape) == shape
    ref = EM(gm, num_epochs=60, progress=False).run().params
    pyro.clear_param_store()
    fit = PyroEM(model, num_epochs=60, progress=False).run(x)
    np.testing.assert_allclose(fit.params["s"] ** 2, ref["covariances"], atol=1e-10)
    np.testing.assert_allclose(fit.params["mu"], ref["locs"], atol=1e-10)
    np.testing.assert_allclose(fit.params["w"], ref["weights"], atol=1e-10)


@pytest.mark.parametrize("cov", ["tied", "tied_diag", "tied_spherical"])
def test_pyro_model_of_a_tied_mixture_round_trips(cov):
    x = torch.tensor(_simulate(100, seed=4)[0])
    gm = GaussianMixture(x, 3, cov, seed=0)
    pyro.clear_param_store()
    enum = PyroEnumModel(gm.pyro_model(), (x,))
    np.testing.assert_allclose(enum.marginal_log_lik(enum.init_params()).numpy(),
                               gm.marginal_log_lik(gm.init_params()).numpy(), rtol=1e-10)


def test_marginal_log_lik_is_exact():
    x, _ = _simulate(50, seed=2)
    gm = GaussianMixture(x, 3, "full", seed=0)
    th = gm.init_params()
    dens = sum(float(th["weights"][k]) * multivariate_normal(th["locs"][k].numpy(), th["covariances"][k].numpy()).pdf(x)
               for k in range(3))
    np.testing.assert_allclose(gm.marginal_log_lik(th).numpy(), np.log(dens), rtol=1e-10)
    assert gm.has_exact_marginal


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_full_pass_is_the_e_step_and_em_statistic(dtype):
    """Above one chunk of points, the full pass of the table engines (rows and their sum in one streamed pass) gives
    the responsibilities of ``responsibilities`` and the statistic of EM's ``sum_expected_stats`` bit for bit, and
    the one-product reduction of the rows to rounding; a mini-batch block's rows and features are those of the
    whole data."""
    from latentfit.inference.units import UnitBlock
    from latentfit.models.mixture import CHUNK

    x, _ = _simulate(CHUNK + 7000, seed=3)
    gm = GaussianMixture(torch.tensor(x, dtype=dtype), 3, "full", seed=0)
    th = gm.init_params()
    rows, total = gm.expected_rows_and_sum(th)
    r, ll = gm.responsibilities(th)
    assert torch.equal(rows["r"], r)
    assert torch.equal(total["s"], gm.sum_expected_stats(th)[0]["s"])
    one_product = gm.reduce_rows(rows)["s"]
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert float((total["s"] - one_product).abs().max() / one_product.abs().max()) < tol
    block = UnitBlock(CHUNK - 100, 500)
    assert torch.equal(gm.expected_rows(th, block)["r"], gm.responsibilities(th, block)[0])
    assert torch.equal(gm._features(block), gm.F[CHUNK - 100:CHUNK + 400])
    np.testing.assert_allclose(gm.expected_rows(th, block)["r"].numpy(), r[CHUNK - 100:CHUNK + 400].numpy(),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    assert torch.isfinite(ll).all()


def _plain_pyro_mixture(init, cov):
    def model(x):
        w = pyro.param("w", init["weights"].clone(), constraint=constraints.simplex)
        mu = pyro.param("mu", init["locs"].clone())
        if cov == "full":
            c = pyro.param("sigma", init["covariances"].clone(), constraint=constraints.positive_definite)
        else:
            c = pyro.param("scale", init["covariances"].sqrt().clone(), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            if cov == "full":
                pyro.sample("obs", dist.MultivariateNormal(mu[z], covariance_matrix=c[z]), obs=x)
            else:
                pyro.sample("obs", dist.Normal(mu[z], c[z]).to_event(1), obs=x)

    return model


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_plain_pyro_mixture_with_enumeration_gives_gaussianmixture_estimates(cov):
    from latentfit.pyro import EM as PyroEM
    from latentfit.pyro import FIEM as PyroFIEM

    x = torch.tensor(_simulate(200, seed=3)[0])
    gm = GaussianMixture(x, 3, cov, seed=0)
    init = {k: p.value.clone() for k, p in gm.params.items()}
    model = _plain_pyro_mixture(init, cov)
    pyro.clear_param_store()
    enum = PyroEnumModel(model, (x,))
    th_user = enum.init_params()
    np.testing.assert_allclose(enum.marginal_log_lik(th_user).numpy(), gm.marginal_log_lik(gm.init_params()).numpy(),
                               rtol=1e-10)
    r_enum, _ = enum.responsibilities(th_user)
    r_gm, _ = gm.responsibilities(gm.init_params())
    np.testing.assert_allclose(r_enum.numpy(), r_gm.numpy(), atol=1e-12)
    ref = EM(gm, num_epochs=60, progress=False).run().params
    pyro.clear_param_store()
    fit = PyroEM(model, num_epochs=60, progress=False).run(x)
    c = "sigma" if cov == "full" else "scale"
    got = fit.params[c] if cov == "full" else fit.params[c] ** 2
    np.testing.assert_allclose(fit.params["mu"], ref["locs"], atol=1e-10)
    np.testing.assert_allclose(got, ref["covariances"], atol=1e-10)
    np.testing.assert_allclose(pyro.param("mu").detach().numpy(), ref["locs"], atol=1e-10)  # written back
    pyro.clear_param_store()
    fit = PyroFIEM(model, num_epochs=40, batch_size=20, progress=False).run(x)
    np.testing.assert_allclose(fit.params["mu"], EM(GaussianMixture(x, 3, cov, seed=0), num_epochs=400,
                                                    progress=False).run().params["locs"], atol=1e-7)


def test_pyro_model_of_the_family_round_trips():
    x = torch.tensor(_simulate(100, seed=4)[0])
    gm = GaussianMixture(x, 3, "spherical", seed=0)
    pyro.clear_param_store()
    enum = PyroEnumModel(gm.pyro_model(), (x,))
    np.testing.assert_allclose(enum.marginal_log_lik(enum.init_params()).numpy(),
                               gm.marginal_log_lik(gm.init_params()).numpy(), rtol=1e-10)


def test_fixed_parameters_stay_fixed_and_means_only_model_is_exact(backend):
    rng = np.random.default_rng(5)
    lab = rng.choice(2, 500, p=[0.2, 0.8])
    x = rng.normal(size=500) + np.where(lab == 0, -0.5, 0.5)
    gm = GaussianMixture(backend.tensor(x), 2, "spherical", weights=[0.2, 0.8], locs=[-1.0, 1.0],
                         covariances=[1.0, 1.0], fixed=("weights", "covariances"), reg_covar=0.0)
    fit = EM(gm, num_epochs=300, progress=False).run()
    np.testing.assert_allclose(fit.params["weights"], [0.2, 0.8])
    np.testing.assert_allclose(fit.params["covariances"], [1.0, 1.0])
    r, _ = gm.responsibilities(fit.state.theta)
    r = backend.to_numpy(r)
    mu = (r.T @ x) / r.sum(0)  # fixed point μ_k = Σ r_ik x_i / Σ r_ik
    np.testing.assert_allclose(fit.params["locs"][:, 0], mu, atol=1e-6)


def test_posterior_draws_follow_responsibilities():
    x, _ = _simulate(20, seed=6)
    gm = GaussianMixture(x, 3, "diag", seed=0)
    th = gm.init_params()
    torch.manual_seed(0)
    z = gm.sample_posterior(th, None, 4000)
    r, _ = gm.responsibilities(th)
    assert z.shape == (4000, 20, 3)
    np.testing.assert_allclose(z.mean(0).numpy(), r.numpy(), atol=0.03)


def test_bad_inputs_give_clear_errors():
    x, _ = _simulate(10)
    with pytest.raises(DataError, match="empty"):
        GaussianMixture(np.zeros((0, 2)), 2)
    with pytest.raises(DataError, match="exceeds the number of data points"):
        GaussianMixture(x, 11)
    with pytest.raises(DataError, match="NaN"):
        GaussianMixture(np.array([[0.0, np.nan], [1.0, 2.0]]), 1)
    with pytest.raises(ModelSpecificationError, match="singular"):
        GaussianMixture(x, 2, "full", covariances=np.zeros((2, 2, 2)))
    with pytest.raises(ModelSpecificationError, match="singular"):
        GaussianMixture(x, 2, "diag", covariances=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(x, 2, "shared")
    with pytest.raises(ValueError, match="probability vector"):
        GaussianMixture(x, 2, weights=[0.7, 0.7])


def test_singular_covariance_during_fit_is_reported():
    """Data on a line, no covariance floor: the full covariance becomes singular -> clear error.
    Torch only: the check is data-dependent Python control flow, which a compiled JAX epoch cannot raise from."""
    t = np.linspace(0, 1, 40)
    x = np.stack([t, 2 * t], 1)
    gm = GaussianMixture(x, 1, "full", reg_covar=0.0, covariances=np.eye(2)[None])
    with pytest.raises(ModelSpecificationError, match="singular"):
        EM(gm, num_epochs=3, progress=False).run()


def test_collapsing_component_warns_and_never_gives_nan(backend):
    rng = np.random.default_rng(7)
    x = backend.tensor(rng.normal(size=(200, 2)))
    far = np.array([[0.0, 0.0], [0.5, 0.0], [60.0, 60.0]])
    gm = GaussianMixture(x, 3, "full", locs=far, covariances=np.stack([np.eye(2)] * 3), weights=[0.4, 0.4, 0.2])
    with pytest.warns(RuntimeWarning, match="collapsed"):
        fit = EM(gm, num_epochs=30, progress=False).run()
    for v in fit.params.values():
        assert np.all(np.isfinite(v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = GaussianMixture(x, 3, "full", locs=far, covariances=np.stack([np.eye(2)] * 3),
                              weights=[0.4, 0.4, 0.2], regularize=True)
        fit = FIEM(reg, num_epochs=10, batch_size=20, progress=False).run()
    assert np.all(np.isfinite(fit.params["covariances"])) and fit.params["weights"].min() > 0


def test_ttsem_on_a_plain_pyro_mixture_uses_enumerated_posterior_draws():
    from latentfit.pyro import TTSEM as PyroTTSEM

    x = torch.tensor(_simulate(200, seed=8)[0])
    gm = GaussianMixture(x, 3, "diag", seed=0)
    init = {k: p.value.clone() for k, p in gm.params.items()}
    ref = EM(gm, num_epochs=300, progress=False).run().params
    pyro.clear_param_store()
    fit = PyroTTSEM(_plain_pyro_mixture(init, "diag"), num_epochs=20, batch_size=10, variant="vr",
                    progress=False).run(x)
    np.testing.assert_allclose(fit.params["mu"], ref["locs"], atol=2e-2)


def test_enumerated_model_without_closed_form_says_so():
    from latentfit.pyro import EM as PyroEM
    from latentfit.pyro import MiniBatchEM as PyroMiniBatchEM

    counts = torch.tensor(np.random.default_rng(9).poisson(3.0, size=50), dtype=torch.float64)

    def poisson_mixture(y):
        w = pyro.param("w", torch.tensor([0.5, 0.5], dtype=torch.float64), constraint=constraints.simplex)
        rates = pyro.param("rates", torch.tensor([1.0, 5.0], dtype=torch.float64), constraint=constraints.positive)
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Poisson(rates[z]), obs=y)

    pyro.clear_param_store()
    enum = PyroEnumModel(poisson_mixture, (counts,))
    th = enum.init_params()
    direct = np.log(0.5 * np.exp(-1.0) * 1.0 ** counts.numpy() + 0.5 * np.exp(-5.0) * 5.0 ** counts.numpy()) \
        - np.array([np.sum(np.log(np.arange(1, int(c) + 1))) for c in counts.numpy()])
    np.testing.assert_allclose(enum.marginal_log_lik(th).numpy(), direct, rtol=1e-10)
    pyro.clear_param_store()
    with pytest.raises(ModelSpecificationError, match=r"no closed-form M-step.*EM \(full batch\) fits this model"):
        PyroMiniBatchEM(poisson_mixture, num_epochs=3, batch_size=10, progress=False).run(counts)
    pyro.clear_param_store()  # full-batch EM fits it: generalized EM (tests/test_em_numeric_mstep.py)
    fit = PyroEM(poisson_mixture, num_epochs=300, tol=1e-4, progress=False).run(counts)
    assert np.all(np.diff(np.asarray(fit.history["objective"], dtype=float)) >= 0)
