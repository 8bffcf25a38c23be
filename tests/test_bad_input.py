"""Bad input gives a clear error naming the problem, never a traceback from deep inside torch."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from models_pyro import random_intercept
from torch.distributions import constraints

from latentfit import DataError, ModelSpecificationError
from latentfit.pyro import SAEM

Y = torch.tensor(np.random.default_rng(0).normal(size=(20, 4)))


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def no_latent(y):
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    with pyro.plate("unit", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).expand([y.shape[0]]).to_event(0), obs=y[:, 0])


def no_param(y):
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b, 1.0), obs=y)


def two_plates(y):
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    with pyro.plate("rows", y.shape[0], dim=-1):
        b = pyro.sample("b", dist.Normal(mu, 1.0))
    with pyro.plate("cols", y.shape[1], dim=-1):
        c = pyro.sample("c", dist.Normal(0.0, 1.0))
    with pyro.plate("r2", y.shape[0], dim=-2), pyro.plate("c2", y.shape[1], dim=-1):
        pyro.sample("y", dist.Normal(b[..., :, None] + c[..., None, :], 1.0), obs=y)


def nan_at_init(y):
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    noise = pyro.param("noise", torch.tensor(-1.0, dtype=y.dtype))  # unconstrained: a negative sd
    with pyro.plate("unit", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, 1.0))
        with pyro.plate("obs", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b, noise), obs=y)


def test_no_latent_site_says_use_svi():
    with pytest.raises(ModelSpecificationError, match="no latent sample site.*SVI"):
        SAEM(no_latent, progress=False).run(Y)


def test_no_param_site():
    with pytest.raises(ModelSpecificationError, match="no pyro.param"):
        SAEM(no_param, progress=False).run(Y)


def test_latents_in_two_plates_need_unit_plate():
    with pytest.raises(ModelSpecificationError, match="unit_plate"):
        SAEM(two_plates, progress=False).run(Y)
    with pytest.raises(ModelSpecificationError, match=r"\['c'\].*outside the unit plate 'rows'"):
        SAEM(two_plates, unit_plate="rows", progress=False).run(Y)


def test_nan_in_observed_data_names_site_and_count():
    y = Y.clone()
    y[3, 1] = float("nan")
    y[5, 2] = float("inf")
    with pytest.raises(DataError, match=r"'y' holds 2 NaN/inf"):
        SAEM(random_intercept, progress=False).run(y)


def test_masked_nan_is_accepted():
    def masked(y, mask):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
        omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
        with pyro.plate("unit", y.shape[0], dim=-2):
            b = pyro.sample("b", dist.Normal(mu, omega))
            with pyro.plate("obs", y.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(b, 1.0).mask(mask), obs=torch.nan_to_num(y))

    y = Y.clone()
    y[3, 1] = float("nan")
    fit = SAEM(masked, num_iters=(10, 5), progress=False).run(y, ~torch.isnan(y))
    assert np.isfinite(fit.params["mu"])


@pytest.mark.parametrize("num_iters", [(0, 100), (-5, 10), 0, (10, -1), "many"])
def test_num_iters_must_be_positive(num_iters):
    with pytest.raises(ValueError, match="num_iters"):
        SAEM(random_intercept, num_iters=num_iters)


def test_nan_log_density_at_initial_values_names_site():
    with pytest.raises(ModelSpecificationError, match=r"site 'y' is NaN/inf"):
        SAEM(nan_at_init, progress=False).run(Y)


def test_model_that_is_not_callable():
    with pytest.raises(TypeError, match="model"):
        SAEM("not a model")
