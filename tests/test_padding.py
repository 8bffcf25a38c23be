"""Dummy units of weight 0 (``inference/padding.py``): what a ``distributed="local"`` JAX fit pads a block with, checked
in one process (the two-process fits are ``tests/test_jax_distributed.py``'s slow tests).

A block padded to ``size`` units by ``model.pad_units(size)`` and weighed by :func:`masked_units` must give exactly the
sums over units of the unpadded block: statistics, log-likelihood, log-densities.  ``GaussianMixture`` pads its points;
a grouped NumPyro model (latents in a plate over groups, rows reading ``alpha[group_idx]``, unbalanced groups) pads
its groups and its rows, the extra rows read by the last dummy group.
"""

from __future__ import annotations

import numpy as np
import pytest


def test_mixture_pad_units_sums_as_the_block() -> None:
    """A mixture of 21 points padded to 25 (copies of the last point) and weighed: the expected statistics summed, the
    marginal log-likelihood, the statistics of a mini-batch naming index n (another process's point) and a sampled
    posterior all count the 21 real points only."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from latentfit.inference.padding import masked_units
    from latentfit.models import GaussianMixture

    rng = np.random.default_rng(0)
    x = rng.normal(size=(21, 2)) + np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])[rng.integers(0, 3, 21)]
    model = GaussianMixture(jnp.asarray(x), 3, "full", seed=1)
    padded = model.pad_units(25)
    assert padded.num_units == 25 and model.num_units == 21 and model.pad_units(21) is model
    np.testing.assert_array_equal(np.asarray(padded.x)[21:], np.repeat(x[-1:], 4, 0))
    masked = masked_units(padded, 21)
    theta = model.init_params()
    s0, ll0 = model.sum_expected_stats(theta)
    s1, ll1 = masked.sum_expected_stats(theta)
    np.testing.assert_allclose(np.asarray(s1["s"]), np.asarray(s0["s"]), rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(float(ll1), float(ll0), rtol=1e-13)
    np.testing.assert_allclose(float(jnp.sum(masked.marginal_log_lik(theta))), float(ll0), rtol=1e-13)
    batch = jnp.asarray([3, 25, 20, 25])  # 25: another process's point in a batch of one static size
    rows = masked.expected_rows(theta, batch)
    ref = model.expected_rows(theta, jnp.asarray([3, 20]))
    for k, v in rows.items():
        np.testing.assert_array_equal(np.asarray(v)[[1, 3]], 0.0)
        np.testing.assert_allclose(np.asarray(v)[[0, 2]], np.asarray(ref[k]), rtol=1e-13)
    z = masked.sample_posterior(theta, jax.random.PRNGKey(0), 2, batch)
    assert np.all(np.isfinite(np.asarray(z)))


def _grouped_data(groups: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    county = np.repeat(np.arange(groups), rng.integers(2, 7, size=groups))
    floor = rng.normal(size=county.size)
    y = 1.0 + 0.7 * rng.normal(size=groups)[county] + 0.5 * floor + 0.3 * rng.normal(size=county.size)
    return county, floor, y


def test_grouped_model_pads_groups_and_rows() -> None:
    """The gallery's radon model (``num_counties`` an int argument, unbalanced counties) padded to 9 groups and 3 more
    rows: the extra rows copy the last one and read the last dummy group, the plate follows, and the weighed model's
    log-likelihood and log-prior of the real groups are the block's (the dummy groups' 0, whatever their draws).  The
    same model sizing its plate by ``int(county.max()) + 1`` is fitted over two processes in the slow test."""
    pytest.importorskip("numpyro")
    import jax

    jax.config.update("jax_enable_x64", True)
    import gallery_numpyro

    from latentfit.inference.padding import masked_units
    from latentfit.integrations.numpyro import NumPyroLatentModel

    county, floor, y = _grouped_data()
    model = NumPyroLatentModel(gallery_numpyro.radon_intercept, (county, floor, 7), {"log_radon": y})
    assert model.pad_extent() == {"obs": county.size}
    padded = model.pad_units(9, {"obs": county.size + 3})
    assert padded.num_units == 9 and padded.pad_extent() == {"obs": county.size + 3} and padded.args[2] == 9
    np.testing.assert_array_equal(np.asarray(padded.args[0])[-3:], 8)  # the extra rows: the last dummy group
    np.testing.assert_array_equal(np.asarray(padded.args[1])[-3:], floor[-1])
    masked = masked_units(padded, 7)
    theta = model.init_params()
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 7, 1))
    z_pad = np.concatenate([z, 50.0 * rng.normal(size=(2, 2, 1))], 1)  # the dummy groups' chains: anything
    ll0, lp0 = model.log_densities(theta, jax.numpy.asarray(z))
    ll1, lp1 = masked.log_densities(theta, jax.numpy.asarray(z_pad))
    np.testing.assert_allclose(np.asarray(ll1)[:, :7], np.asarray(ll0), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(lp1)[:, :7], np.asarray(lp0), rtol=1e-13)
    np.testing.assert_array_equal(np.asarray(ll1)[:, 7:], 0.0)
    np.testing.assert_array_equal(np.asarray(lp1)[:, 7:], 0.0)


def test_grouped_model_padding_refusals() -> None:
    """A grouped model whose group index cannot be told from its arguments (two integer arrays equal to the rows'
    groups) is refused with the library's message, naming what it found."""
    pytest.importorskip("numpyro")
    import jax
    import numpyro
    import numpyro.distributions as dist

    jax.config.update("jax_enable_x64", True)
    from latentfit.inference.model import ModelSpecificationError
    from latentfit.integrations.numpyro import NumPyroLatentModel

    def two_indices(county, copy, floor, log_radon=None):
        mu = numpyro.param("mu", 0.0)
        with numpyro.plate("groups", 7):
            alpha = numpyro.sample("alpha", dist.Normal(mu, 1.0))
        with numpyro.plate("rows", len(floor)):
            numpyro.sample("obs", dist.Normal(alpha[county] + 0.0 * copy, 1.0), obs=log_radon)

    county, floor, y = _grouped_data()
    model = NumPyroLatentModel(two_indices, (county, county.copy(), floor), {"log_radon": y})
    with pytest.raises(ModelSpecificationError, match="2 integer arrays equal to the rows' groups"):
        model.pad_units(9, {"obs": county.size + 1})
