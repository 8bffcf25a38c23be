"""Plain enumerated mixtures take the recognised mixture's own E-step, and only when it is exact.

A plain Pyro / NumPyro Gaussian mixture (``config_enumerate`` / a ``Categorical`` label in a data plate) is
recognised as :class:`GaussianMixture`; its responsibilities then come from the family's fused product over the
requested units (a mini-batch costs a mini-batch) instead of enumerating the whole model.  The switch is made
only when the family's log-joint table equals the enumerated one: these tests check that equality directly
against the enumeration, on the batch rows too, and that a model the family does not describe (a per-point
mask) keeps the enumeration path with the right answer.
"""

from __future__ import annotations

import numpy as np
import pytest

LOCS = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]])


def _data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    return LOCS[lab] + rng.normal(size=(n, 2)) * np.array([0.7, 0.5])


def _init() -> dict[str, np.ndarray]:
    return {"w": np.array([0.4, 0.35, 0.25]), "mu": LOCS + 0.3,
            "sigma": np.stack([np.eye(2) * s for s in (1.0, 0.8, 1.2)]) + 0.1}


def _pyro_model(cov: str, mask=None):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints

    init = {k: torch.tensor(v) for k, v in _init().items()}

    def model(x):
        w = pyro.param("w", init["w"].clone(), constraint=constraints.simplex)
        mu = pyro.param("mu", init["mu"].clone())
        if cov == "full":
            c = pyro.param("sigma", init["sigma"].clone(), constraint=constraints.positive_definite)
        else:
            c = pyro.param("scale", torch.ones(3, 2), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            d = dist.MultivariateNormal(mu[z], covariance_matrix=c[z]) if cov == "full" \
                else dist.Normal(mu[z], c[z]).to_event(1)
            pyro.sample("obs", d if mask is None else d.mask(mask), obs=x)

    return model


def _numpyro_model(cov: str, mask=None):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    init = {k: jnp.asarray(v) for k, v in _init().items()}

    def model(x):
        w = numpyro.param("w", init["w"], constraint=constraints.simplex)
        mu = numpyro.param("mu", init["mu"])
        if cov == "full":
            c = numpyro.param("sigma", init["sigma"], constraint=constraints.positive_definite)
        else:
            c = numpyro.param("scale", jnp.ones((3, 2)), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            d = dist.MultivariateNormal(mu[z], covariance_matrix=c[z]) if cov == "full" \
                else dist.Normal(mu[z], c[z]).to_event(1)
            numpyro.sample("obs", d if mask is None else d.mask(mask), obs=x)

    return model


def _adapter(ppl: str, cov: str, x: np.ndarray, mask=None):
    if ppl == "pyro":
        import pyro
        import torch

        from latentfit.integrations.pyro import PyroEnumModel

        pyro.clear_param_store()
        m = None if mask is None else torch.tensor(mask)
        return PyroEnumModel(_pyro_model(cov, m), (torch.tensor(x),))
    import jax.numpy as jnp

    from latentfit.integrations.numpyro import NumPyroEnumModel

    m = None if mask is None else jnp.asarray(mask)
    return NumPyroEnumModel(_numpyro_model(cov, m), (jnp.asarray(x),))


def _np(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
@pytest.mark.parametrize("cov", ["full", "diag"])
def test_family_estep_equals_enumeration_on_full_data_and_batches(ppl, cov):
    x = _data(240, seed=1)
    enum = _adapter(ppl, cov, x)
    assert enum._family_estep, "a plain Gaussian mixture should take the family E-step"
    th = enum.init_params()
    # a third θ, not one of the two the set-up compared at: a few EM-like moves of every parameter
    th = {k: v * 1.05 if k != "w" else v[::-1] * 1.0 for k, v in th.items()} if ppl == "numpyro" else \
        {k: (v.flip(0) if k == "w" else v * 1.05) for k, v in th.items()}
    table = _np(enum.log_joint_table(th))  # the enumeration, [K, n]
    ll_enum = np.logaddexp.reduce(table, 0)
    r_enum = np.exp(table - ll_enum).T
    r, ll = enum.responsibilities(th)
    np.testing.assert_allclose(_np(ll), ll_enum, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(_np(r), r_enum, atol=1e-12)
    units = np.array([7, 3, 200, 3, 51])  # a mini-batch, unsorted, with a repeat
    idx = units if ppl == "numpyro" else __import__("torch").as_tensor(units)
    rb, llb = enum.responsibilities(th, idx)
    np.testing.assert_allclose(_np(rb), r_enum[units], atol=1e-12)
    np.testing.assert_allclose(_np(llb), ll_enum[units], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_masked_mixture_keeps_enumeration_and_is_right(ppl):
    x = _data(120, seed=2)
    mask = np.ones(120, dtype=bool)
    mask[::4] = False  # these points carry no likelihood: their responsibilities are the weights
    enum = _adapter(ppl, "full", x, mask)
    assert not enum._family_estep, "a masked observation is not the family's model"
    th = enum.init_params()
    r, _ = enum.responsibilities(th)
    r = _np(r)
    np.testing.assert_allclose(r[~mask], np.broadcast_to(_init()["w"], (30, 3)), atol=1e-12)
    from scipy.stats import multivariate_normal

    init = _init()
    dens = np.stack([init["w"][k] * multivariate_normal(init["mu"][k], init["sigma"][k]).pdf(x[mask])
                     for k in range(3)], 1)
    np.testing.assert_allclose(r[mask], dens / dens.sum(1, keepdims=True), atol=1e-10)
