"""Explicit random streams on torch (issue 10, item 2): a fit draws from the ``torch.Generator`` it carries in its
state, never from torch's or Pyro's global RNG.

For every engine kind on plain Pyro models (a random-intercept model with Gaussian latents, one with a Gamma latent
that only Pyro's own sampler can draw, an enumerated Gaussian mixture):

* torch's global RNG state, and Pyro's (``pyro.util.get_rng_state``: torch, Python ``random`` and numpy), are
  the same after the fit as before it;
* two fits with the same seed are bit-identical although ``torch.manual_seed`` runs between them, and
  ``run(seed)`` is honoured: ``run(7)`` equals an engine built with ``seed=7`` and differs from ``run(8)``;
* a step is pure: stepping twice from one state gives the same next state and leaves that state as it was
  (SAEM, f-SAEM, MCMCSGD; the EM family's torch steps update their per-unit tables in place).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from torch.distributions import constraints

from latentfit.checkpoint import flatten_state
from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.inference.fsaem import FSAEM
from latentfit.inference.iem import IEM, MiniBatchEM
from latentfit.inference.mcem import MCEM
from latentfit.inference.mcmcsgd import MCMCSGD
from latentfit.inference.misso import MISSO
from latentfit.inference.saem import SAEM
from latentfit.inference.sem import SEM
from latentfit.inference.semvr import SEMVR
from latentfit.inference.ttsem import TTSEM
from latentfit.integrations.pyro import PyroEnumModel, PyroLatentModel


def random_intercept(y: torch.Tensor) -> None:
    """y_ij = b_i + ε_ij, b_i ~ N(μ, ω²)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0]):
        b = pyro.sample("b", dist.Normal(mu, omega))
        pyro.sample("y", dist.Normal(b[:, None], sigma).to_event(1), obs=y)


def gamma_rate(y: torch.Tensor) -> None:
    """Poisson counts with a Gamma-distributed rate per unit (no Gaussian pattern: Pyro draws the latents)."""
    shape = pyro.param("shape", torch.tensor(2.0, dtype=y.dtype), constraint=constraints.positive)
    with pyro.plate("unit", y.shape[0]):
        lam = pyro.sample("lam", dist.Gamma(shape, 1.0))
        pyro.sample("y", dist.Poisson(lam[:, None]).to_event(1), obs=y)


@config_enumerate
def mixture(x: torch.Tensor) -> None:
    """Two-component 1-D Gaussian mixture, the labels enumerated."""
    weights = pyro.param("weights", torch.tensor([0.5, 0.5], dtype=x.dtype), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=x.dtype))
    scales = pyro.param("scales", torch.tensor([1.0, 1.0], dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=x)


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = 1.0 + 0.8 * torch.randn(12, 1, generator=g, dtype=torch.float64) \
        + 0.5 * torch.randn(12, 4, generator=g, dtype=torch.float64)
    counts = torch.poisson(3.0 * torch.ones(12, 3, dtype=torch.float64), generator=g)
    x = torch.cat([torch.randn(20, generator=g, dtype=torch.float64) - 2.0,
                   torch.randn(20, generator=g, dtype=torch.float64) + 2.0])
    return {"y": y, "counts": counts, "x": x}


def _models() -> dict[str, Any]:
    data = _data()
    pyro.clear_param_store()
    torch.manual_seed(1)  # tracing a Pyro model draws its latents: done here, before the RNG states are read
    return {"intercept": PyroLatentModel(random_intercept, (data["y"],)),
            "gamma": PyroLatentModel(gamma_rate, (data["counts"],), closed_form=False),
            "mixture": PyroEnumModel(mixture, (data["x"],))}


SMALL = dict(progress=False, chunk_size=3)
ENGINES = {
    "SAEM": ("intercept", lambda m, **kw: SAEM(m, (6, 3), **SMALL, **kw)),
    "SAEM-per_unit": ("intercept", lambda m, **kw: SAEM(m, (6, 3), rng="per_unit", **SMALL, **kw)),
    "SAEM-gamma": ("gamma", lambda m, **kw: SAEM(m, (6, 3), **SMALL, **kw)),
    "FSAEM": ("intercept", lambda m, **kw: FSAEM(m, (6, 3), imh_iters=3, **SMALL, **kw)),
    "MCMCSGD": ("intercept", lambda m, **kw: MCMCSGD(m, 8, burn_in=2, batch_size=5, **SMALL, **kw)),
    "MCMCSGD-mala": ("gamma", lambda m, **kw: MCMCSGD(m, 8, burn_in=2, kernel="mala", **SMALL, **kw)),
    "MCEM-mcmc": ("intercept", lambda m, **kw: MCEM(m, 4, num_samples=3, **SMALL, **kw)),
    "TTSEM": ("intercept", lambda m, **kw: TTSEM(m, 3, batch_size=4, num_samples=3, **SMALL, **kw)),
    "EM": ("mixture", lambda m, **kw: EM(m, 4, **SMALL, **kw)),
    "MCEM": ("mixture", lambda m, **kw: MCEM(m, 4, num_samples=3, **SMALL, **kw)),
    "MiniBatchEM": ("mixture", lambda m, **kw: MiniBatchEM(m, 3, batch_size=8, **SMALL, **kw)),
    "IEM": ("mixture", lambda m, **kw: IEM(m, 2, **SMALL, **kw)),
    "FIEM": ("mixture", lambda m, **kw: FIEM(m, 3, batch_size=8, **SMALL, **kw)),
    "SEMVR": ("mixture", lambda m, **kw: SEMVR(m, 3, batch_size=8, **SMALL, **kw)),
    "SEM": ("mixture", lambda m, **kw: SEM(m, 3, batch_size=8, **SMALL, **kw)),
    "MISSO": ("intercept", lambda m, **kw: MISSO(m, 3, mc_size=3, num_chains=3, **SMALL, **kw)),
    "MISSO-paper-gamma": ("gamma", lambda m, **kw: MISSO(m, 3, mc_size=3, num_chains=3, surrogate="paper", **SMALL,
                                                          **kw)),
}


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return _models()


def _global_rng() -> tuple[Any, ...]:
    py = pyro.util.get_rng_state()
    return torch.get_rng_state().clone(), py["torch"].clone(), py["random"], repr(py["numpy"])


def _same_global(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def _assert_identical(a: Any, b: Any) -> None:
    assert a.history.keys() == b.history.keys()
    for name in a.history:
        np.testing.assert_array_equal(a.history[name], b.history[name], err_msg=name)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)


def _differs(a: Any, b: Any) -> bool:
    return any(not np.array_equal(a.params[n], b.params[n]) for n in a.params)


@pytest.mark.parametrize("name", list(ENGINES))
def test_fit_leaves_global_rng_alone_and_follows_its_seed(models: dict[str, Any], name: str) -> None:
    which, make = ENGINES[name]
    model = models[which]
    torch.manual_seed(123)
    before = _global_rng()
    first = make(model, seed=3).run()
    assert _same_global(before, _global_rng()), "the fit changed torch's / Pyro's global RNG state"
    torch.manual_seed(999)  # a user's global seed between two fits changes nothing
    second = make(model, seed=3).run()
    _assert_identical(first, second)
    _assert_identical(make(model, seed=0).run(7), make(model, seed=7).run())  # run(seed) is honoured
    if name != "EM":  # exact EM draws nothing
        assert _differs(make(model).run(7), make(model).run(8))


@pytest.mark.parametrize("name,k", [("SAEM", 1), ("FSAEM", 1), ("SAEM-gamma", 1), ("MCMCSGD", 1), ("MCMCSGD", 3),
                                    ("MCMCSGD-mala", 3)])
def test_step_is_pure(models: dict[str, Any], name: str, k: int) -> None:
    """Two steps from one state give the same next state and leave it as it was: the step copies the generator
    it is given (and MCMCSGD's torch optimiser before stepping it).  Iteration ``k`` of the first phase: MCMCSGD's
    burn-in (k = 1) and its gradient steps (k = 3, after ``burn_in=2``) are one phase told apart by k."""
    which, make = ENGINES[name]
    engine = make(models[which], seed=2)
    state = engine.init(engine.ops.key(2))
    phase = engine.phases()[0][2]
    before = flatten_state(state)[0]
    one, _ = engine.step(state, engine.ops.asarray(np.array(k)), phase)
    two, _ = engine.step(state, engine.ops.asarray(np.array(k)), phase)
    after = flatten_state(state)[0]
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=f"the step changed its input state: {k}")
    a, b = flatten_state(one)[0], flatten_state(two)[0]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_generator_on_the_data_device_round_trips_through_checkpoints(models: dict[str, Any], tmp_path) -> None:
    """The state's generator lives on the data's device and a resumed fit continues its stream bit for bit."""
    make = ENGINES["SAEM"][1]
    model = models["intercept"]
    state = make(model, seed=4).init(model.ops.key(4))
    assert isinstance(state.key, torch.Generator) and state.key.device == model.ops.device
    whole = make(model, seed=4).run(checkpoint=tmp_path, checkpoint_every=3)
    for suffix in (".json", ".safetensors"):  # keep iterations 3 and 6: resume from 6
        (tmp_path / f"ckpt-000009{suffix}").unlink()
    torch.manual_seed(5)
    resumed = make(model, seed=4).run(checkpoint=tmp_path, resume=True)
    _assert_identical(whole, resumed)


def test_misso_state_is_a_typed_record(models: dict[str, Any]) -> None:
    """MISSO's state names its surrogate table's parts; the parts a surrogate does not use are None; an epoch returns a
    new record (θ, memory, generator) and leaves the engine's attributes alone."""
    from latentfit.inference.misso import MISSOMemory, MISSOState

    n = 12
    louis = ENGINES["MISSO"][1](models["intercept"], seed=2)
    state = louis.init(louis.ops.key(2))
    assert isinstance(state, MISSOState) and isinstance(state.memory, MISSOMemory)
    mem = state.memory
    assert mem.anchor is None and mem.grad is None and mem.curvature is None  # every parameter in closed form
    assert all(v.shape[0] == n for v in mem.table.values()) and tuple(mem.visited_at.shape) == (n, 3)
    assert tuple(mem.info_complete.shape) == tuple(mem.info_missing.shape) == (3, 3)
    assert tuple(state.z.shape)[:2] == (n, 3)
    paper = ENGINES["MISSO-paper-gamma"][1](models["gamma"], seed=2)
    attrs = dict(vars(paper))
    pstate = paper.init(paper.ops.key(2))
    assert pstate.memory.table == {} and pstate.memory.visited_at is None and pstate.memory.info_missing is None
    assert tuple(pstate.memory.anchor.shape) == tuple(pstate.memory.grad.shape) == (n, 1)
    new, info = paper.step(pstate, paper.ops.asarray(np.array(1)), "epoch")
    assert isinstance(new, MISSOState) and new.memory is not pstate.memory and new.key is not pstate.key
    assert not np.array_equal(new.theta["shape"], pstate.theta["shape"])
    assert info.num_nonfinite is not None and vars(paper).keys() == attrs.keys()
    assert all(vars(paper)[k] is v for k, v in attrs.items())
