"""Bad input gives a clear error naming the problem, never a traceback from deep inside torch or JAX.

Every test runs on both backends (the same errors from ``latentfit.pyro`` and ``latentfit.numpyro``);
the models are written once per PPL in ``models_pyro.py`` / ``models_numpyro.py``."""

from __future__ import annotations

import numpy as np
import pytest

from latentfit import DataError, ModelSpecificationError

Y = np.random.default_rng(0).normal(size=(20, 4))


def _fit(backend, model, *args, **options):
    return backend.fit("SAEM", model, *args, progress=False, **options)


def test_no_latent_site_says_use_svi(backend):
    with pytest.raises(ModelSpecificationError, match="no latent sample site.*SVI"):
        _fit(backend, backend.models.no_latent, backend.tensor(Y))


def test_no_param_site(backend):
    with pytest.raises(ModelSpecificationError, match=rf"no {backend.name}\.param"):
        _fit(backend, backend.models.no_param, backend.tensor(Y))


def test_latents_in_two_plates_need_unit_plate(backend):
    with pytest.raises(ModelSpecificationError, match="unit_plate"):
        _fit(backend, backend.models.two_plates, backend.tensor(Y))
    with pytest.raises(ModelSpecificationError, match=r"\['c'\].*outside the unit plate 'rows'"):
        _fit(backend, backend.models.two_plates, backend.tensor(Y), unit_plate="rows")


def test_nan_in_observed_data_names_site_and_count(backend):
    y = Y.copy()
    y[3, 1] = float("nan")
    y[5, 2] = float("inf")
    with pytest.raises(DataError, match=r"'y' holds 2 NaN/inf"):
        _fit(backend, backend.models.random_intercept, backend.tensor(y))


def test_masked_nan_is_accepted(backend):
    y = Y.copy()
    y[3, 1] = float("nan")
    fit = _fit(backend, backend.models.masked_intercept, backend.tensor(y), backend.tensor(~np.isnan(y)),
               num_iters=(10, 5))
    assert np.isfinite(fit.params["mu"])


@pytest.mark.parametrize("num_iters", [(0, 100), (-5, 10), 0, (10, -1), "many"])
def test_num_iters_must_be_positive(backend, num_iters):
    with pytest.raises(ValueError, match="num_iters"):
        backend.engine("SAEM")(backend.models.random_intercept, num_iters=num_iters)


def test_nan_log_density_at_initial_values_names_site(backend):
    with pytest.raises(ModelSpecificationError, match=r"site 'y' is NaN/inf"):
        _fit(backend, backend.models.nan_at_init, backend.tensor(Y))


def test_model_that_is_not_callable(backend):
    with pytest.raises(TypeError, match="model"):
        backend.engine("SAEM")("not a model")
