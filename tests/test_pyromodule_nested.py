"""Nested PyroModules (``PyroModule[nn.Linear]`` inside a ``PyroModule``, at any depth) are fitted like flat params.

A PyroModule's plain ``nn.Parameter`` attribute (``PyroModule[nn.Linear]``'s ``weight``) is read by the module itself:
its ``pyro.param`` statement's value is discarded, so θ has to be put into the module for each run.  Before, the
weights stayed at their start while the other parameters made up for them (audit D1), and SAEM crashed (the weight
was not in the graph).  Known answers: the exact marginal likelihood of a Gaussian random-intercept model is closed
form, maximised here with scipy.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam, PyroSample
from scipy.optimize import minimize
from torch import nn
from torch.distributions import constraints

import latentfit.pyro as lp

NUM_GROUPS = 60


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60 groups of 2-9 rows: y = 1 + 2 x + a_g + ε, a ~ N(0, 0.7²), ε ~ N(0, 0.5²)."""
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(NUM_GROUPS), rng.integers(2, 10, NUM_GROUPS))
    x = rng.standard_normal(len(g))
    y = 1.0 + 2.0 * x + 0.7 * rng.standard_normal(NUM_GROUPS)[g] + 0.5 * rng.standard_normal(len(g))
    return g, x, y


def _loglik(theta: np.ndarray, g: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Exact log-likelihood of y = b0 + b1 x + a_g + ε (θ = b0, b1, ω, σ), the intercepts integrated out."""
    b0, b1, omega, sigma = theta
    r = y - b0 - b1 * x
    n, s, ss = np.bincount(g), np.bincount(g, weights=r), np.bincount(g, weights=r**2)
    w2, s2 = omega**2, sigma**2
    logdet = (n - 1) * np.log(s2) + np.log(s2 + n * w2)
    quad = ss / s2 - w2 * s**2 / (s2 * (s2 + n * w2))
    return float(np.sum(-0.5 * (n * np.log(2 * np.pi) + logdet + quad)))


def _mle(g: np.ndarray, x: np.ndarray, y: np.ndarray, slope: bool = True) -> np.ndarray:
    """The exact MLE (b0, b1, ω, σ); ``slope=False``: b1 held at 0."""
    def nll(p: np.ndarray) -> float:
        return -_loglik((p[0], p[1] if slope else 0.0, np.exp(p[2]), np.exp(p[3])), g, x, y)

    p = minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-9}).x
    return np.array([p[0], p[1] if slope else 0.0, np.exp(p[2]), np.exp(p[3])])


# ----- the random-intercept model y = μ + a_g + ε, μ from a nested PyroModule[nn.Linear] (audit D1) -----------------
class FlatRI(PyroModule):
    """μ, ω, σ as the module's own PyroParams."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = PyroParam(torch.tensor(5.0))
        self.omega = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def mean(self) -> torch.Tensor:
        return self.mu

    def forward(self, g: torch.Tensor, y: torch.Tensor | None = None) -> None:
        mu = self.mean()
        with pyro.plate("groups", NUM_GROUPS):
            a = pyro.sample("alpha", dist.Normal(mu, self.omega))
        with pyro.plate("rows", len(g)):
            pyro.sample("y", dist.Normal(a[g], self.sigma), obs=y)


class NestedRI(FlatRI):
    """μ the weight of a bias-free ``PyroModule[nn.Linear](1, 1)`` on a constant input (start 5.0)."""

    def __init__(self) -> None:
        super().__init__()
        del self.mu
        self.head = PyroModule[nn.Linear](1, 1, bias=False)
        with torch.no_grad():
            self.head.weight.fill_(5.0)

    def mean(self) -> torch.Tensor:
        return self.head(torch.ones(1)).squeeze()


#: MCMCSGD fits a module's weights with Adam (``optimizer="auto"``), which needs its default 500 iterations from 5.0
ENGINES = {"SAEM": {"num_iters": (60, 60)}, "MCMCSGD": {}}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_nested_pyromodule_random_intercept_recovers_the_mle(engine: str) -> None:
    """The nested version reaches the exact MLE as closely as the flat one (before: μ stayed at 5.0, ω ≈ 4.1 against
    0.7), and the submodule holds the fitted weight afterwards, in its own ``nn.Parameter``."""
    torch.set_default_dtype(torch.float64)
    try:
        g, x, y = _data()
        y = y - 2.0 * x  # no slope in this model
        mle = _mle(g, x, y, slope=False)
        mle = {"mu": mle[0], "omega": mle[2], "sigma": mle[3]}
        args = (torch.as_tensor(g), torch.as_tensor(y))
        fits = {}
        for cls in (FlatRI, NestedRI):
            pyro.clear_param_store()
            module = cls()
            fit = getattr(lp, engine)(module, seed=0, progress=False, **ENGINES[engine]).run(*args)
            fits[cls.__name__] = (module, fit)
    finally:
        torch.set_default_dtype(torch.float32)
    flat, nested = fits["FlatRI"][1].params, fits["NestedRI"][1].params
    module = fits["NestedRI"][0]
    assert set(nested) == {"head.weight", "omega", "sigma"}
    tol = {"mu": 0.02, "omega": 0.03, "sigma": 0.01}
    for name, value in mle.items():
        assert float(flat[name]) == pytest.approx(value, abs=tol[name])
        got = float(np.ravel(nested["head.weight" if name == "mu" else name])[0])
        assert got == pytest.approx(value, abs=tol[name])
        assert got == pytest.approx(float(flat[name]), abs=tol[name])
    weight = module.head.weight
    assert isinstance(weight, nn.Parameter) and pyro.get_param_store()["head.weight"] is weight
    assert float(weight.detach()) == pytest.approx(float(np.ravel(nested["head.weight"])[0]), rel=1e-12)
    assert float(module.omega.detach()) == pytest.approx(float(nested["omega"]), rel=1e-12)


# ----- a regression y = lin(x) + a_g + ε: the line two PyroModules deep, the intercepts a PyroSample ----------------
class Line(PyroModule):
    """``b0 + b1 x`` from a ``PyroModule[nn.Linear]`` (or a plain ``nn.Linear``, which PyroModule registers with
    ``pyro.module``) one level further down."""

    def __init__(self, plain: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1) if plain else PyroModule[nn.Linear](1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, None]).squeeze(-1)


class Noise(PyroModule):
    """σ, a PyroParam of a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)


class Regression(PyroModule):
    """The "Modules in Pyro" tutorial's style: nested PyroModules, the latents a PyroSample drawn in a plate."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.mean = PyroModule[nn.Module]()
        self.mean.line = Line(plain)
        self.noise = Noise()
        self.omega = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.alpha = PyroSample(lambda self: dist.Normal(0.0, self.omega))

    def forward(self, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("groups", NUM_GROUPS):
            a = self.alpha
        with pyro.plate("rows", len(g)):
            pyro.sample("y", dist.Normal(self.mean.line(x) + a[g], self.noise.sigma), obs=y)


def _fit_regression(engine: str, plain: bool) -> tuple[Regression, nn.Linear, tuple[float, float], object]:
    """Fit :class:`Regression` (float64, seed 0); the module, its line, the line's start (b0, b1), the fit."""
    g, x, y = _data()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        torch.manual_seed(0)
        module = Regression(plain)
        lin = module.mean.line.lin
        start = (float(lin.bias.detach()), float(lin.weight.detach()))
        fit = getattr(lp, engine)(module, seed=0, progress=False, **ENGINES[engine]).run(
            torch.as_tensor(g), torch.as_tensor(x), torch.as_tensor(y))
    finally:
        torch.set_default_dtype(torch.float32)
    return module, lin, start, fit


@pytest.mark.parametrize("engine", list(ENGINES))
def test_nested_linear_layer_is_fitted(engine: str) -> None:
    """The line's weight and bias, two PyroModules deep, are fitted (before: MCMCSGD left them at their random start,
    560 log-likelihood units short, and SAEM crashed: "the differentiated Tensor ... not used in the graph"): the fit
    reaches the exact maximum, and equals the fit of the same model with a plain ``nn.Linear`` child (which
    PyroModule registers with ``pyro.module``, always fitted); the layer computes with the fitted values afterwards,
    in its own ``nn.Parameter`` objects."""
    g, x, y = _data()
    mle = _mle(g, x, y)
    module, lin, start, fit = _fit_regression(engine, plain=False)
    registered = {"weight": lin.weight, "bias": lin.bias}
    assert set(fit.params) == {"mean.line.lin.weight", "mean.line.lin.bias", "omega", "noise.sigma"}
    est = {n: float(np.ravel(v)[0]) for n, v in fit.params.items()}
    theta = (est["mean.line.lin.bias"], est["mean.line.lin.weight"], est["omega"], est["noise.sigma"])
    best = _loglik(mle, g, x, y)
    assert _loglik((*start, 1.0, 1.0), g, x, y) < best - 100                   # a start far from the answer
    # within Monte-Carlo error of the maximum (SAEM's 60 + 60 iterations leave b0, which the intercepts' mean
    # shadows, 0.09 short: 0.55 log-likelihood units; the plain nn.Linear's fit below is the same)
    assert _loglik(theta, g, x, y) > best - 1.0
    assert est["mean.line.lin.weight"] == pytest.approx(mle[1], abs=0.02)
    assert est["noise.sigma"] == pytest.approx(mle[3], abs=0.01)
    # the module holds the estimates, in its own nn.Parameters (still the param store's entries)
    store = pyro.get_param_store()
    for name, parameter in registered.items():
        assert getattr(lin, name) is parameter and store["mean.line.lin." + name] is parameter
        assert float(parameter.detach()) == pytest.approx(est["mean.line.lin." + name], rel=1e-12)
    assert float(module.noise.sigma.detach()) == pytest.approx(est["noise.sigma"], rel=1e-12)
    assert float(module.omega.detach()) == pytest.approx(est["omega"], rel=1e-12)

    _, plain_lin, plain_start, plain_fit = _fit_regression(engine, plain=True)
    assert plain_start == start
    for name, value in est.items():
        assert float(np.ravel(plain_fit.params[name.replace("lin.", "lin$$$")])[0]) == pytest.approx(value, rel=1e-8)
    assert float(plain_lin.weight.detach()) == pytest.approx(est["mean.line.lin.weight"], rel=1e-8)


def test_pyromodule_weights_are_module_params() -> None:
    """A PyroModule's plain ``nn.Parameter``s are a network's weights, as ``pyro.module``'s are (MCMCSGD's
    ``optimizer="auto"`` gives them Adam); its PyroParams are not."""
    from latentfit.integrations.pyro import PyroLatentModel

    g, x, y = _data()
    args = (torch.as_tensor(g), torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))
    for plain, prefix in ((False, "mean.line.lin."), (True, "mean.line.lin$$$")):
        pyro.clear_param_store()
        model = PyroLatentModel(Regression(plain), args)
        assert set(model.params) == {prefix + "weight", prefix + "bias", "omega", "noise.sigma"}
        assert model.module_params == {prefix + "weight", prefix + "bias"}


# ----- the same fits with PyroModule's local params (``pyro.settings.set(module_local_params=True)``) ---------------
@pytest.fixture
def module_local_params():
    """Pyro's mode in which a PyroModule keeps its params to itself (not in the param store); restored afterwards."""
    before = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=True)
    try:
        yield
    finally:
        pyro.settings.set(module_local_params=before)


def _estimates(fit) -> dict[str, float]:
    return {n: float(np.ravel(v)[0]) for n, v in fit.params.items()}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_module_local_params_give_the_same_fits(engine: str, module_local_params) -> None:
    """Under ``module_local_params=True`` the nested :class:`Regression` (its line a ``PyroModule[nn.Linear]``, or a
    plain ``nn.Linear`` child, whose weights PyroModule then declares from ``__getattr__`` instead of ``pyro.module``)
    gives the fit of the default mode, to rounding; the modules hold the estimates in their own tensors afterwards,
    and the param store stays empty, as that mode keeps it.  Before, the plain child's weights were not put into the
    module for the runs (MCMCSGD left them at their start, SAEM crashed: "the differentiated Tensor ... not used in
    the graph"), and no module held the estimates (they went to the store, which the modules no longer read)."""
    for plain in (False, True):
        with pyro.settings.context(module_local_params=False):
            expected = _estimates(_fit_regression(engine, plain)[3])
        pyro.clear_param_store()
        module, lin, start, fit = _fit_regression(engine, plain)
        got = _estimates(fit)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (plain, name)
        assert len(pyro.get_param_store()) == 0
        prefix = "mean.line.lin" + ("$$$" if plain else ".")
        assert (float(lin.bias.detach()), float(lin.weight.detach())) != start
        assert float(lin.weight.detach()) == pytest.approx(got[prefix + "weight"], rel=1e-12)
        assert float(lin.bias.detach()) == pytest.approx(got[prefix + "bias"], rel=1e-12)
        assert isinstance(lin.weight, nn.Parameter) and isinstance(module.noise.sigma_unconstrained, nn.Parameter)
        assert float(module.noise.sigma.detach()) == pytest.approx(got["noise.sigma"], rel=1e-12)
        assert float(module.omega.detach()) == pytest.approx(got["omega"], rel=1e-12)


def test_module_local_params_nested_random_intercept(module_local_params) -> None:
    """:class:`NestedRI` (μ the weight of a nested ``PyroModule[nn.Linear]``) under ``module_local_params=True``: SAEM's
    fit equals the default mode's, and the submodule holds the fitted weight."""
    torch.set_default_dtype(torch.float64)
    try:
        g, x, y = _data()
        args = (torch.as_tensor(g), torch.as_tensor(y - 2.0 * x))
        fits = {}
        for local in (False, True):
            with pyro.settings.context(module_local_params=local):
                pyro.clear_param_store()
                module = NestedRI()
                fits[local] = module, _estimates(lp.SAEM(module, seed=0, progress=False, **ENGINES["SAEM"]).run(*args))
    finally:
        torch.set_default_dtype(torch.float32)
    (_, expected), (module, got) = fits[False], fits[True]
    assert got.keys() == expected.keys() == {"head.weight", "omega", "sigma"}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9), name
    assert float(module.head.weight.detach()) == pytest.approx(got["head.weight"], rel=1e-12)
    assert float(module.sigma.detach()) == pytest.approx(got["sigma"], rel=1e-12)
    assert len(pyro.get_param_store()) == 0


def test_module_local_params_weights_are_module_params(module_local_params) -> None:
    """:func:`test_pyromodule_weights_are_module_params` under ``module_local_params=True``."""
    test_pyromodule_weights_are_module_params()
