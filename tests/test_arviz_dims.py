"""``fit.to_arviz()`` names dims as the model does: a Pyro / NumPyro site's plates (outermost to innermost), the plate
layout's size-1 dims dropped, event dims kept; NLME's unit coordinates are the subject IDs."""

from __future__ import annotations

import numpy as np
import pytest
from backends import Backend

az = pytest.importorskip("arviz")


def _group(data, name: str):
    return data[name] if not hasattr(data, name) else getattr(data, name)


def _grouped_data(num_groups: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    group = rng.permutation(np.repeat(np.arange(num_groups), rng.integers(2, 7, num_groups)))
    y = (1.0 + 0.8 * rng.standard_normal(num_groups))[group] + rng.standard_normal(group.size)
    return group, y


def test_group_plate_latents_and_obs_plate_rows(backend: Backend) -> None:
    """Tutorial style: ``b`` in plate "groups", rows in plate "rows" read ``b[group]``: dims follow the plates."""
    group, y = _grouped_data()
    fit = backend.fit("SAEM", backend.models.grouped_intercept, backend.xp.asarray(group), 8, backend.tensor(y),
                      num_iters=(10, 10), num_chains=2, progress=False)
    data = fit.to_arviz()
    b = _group(data, "posterior")["b"]
    assert b.dims == ("chain", "draw", "groups") and b.shape == (*fit.latents["b"].shape[:2], 8)
    np.testing.assert_array_equal(np.asarray(b), fit.latents["b"])
    np.testing.assert_array_equal(b["groups"].values, np.arange(8))
    obs = _group(data, "observed_data")["y"]
    assert obs.dims == ("rows",) and obs.shape == (group.size,)
    np.testing.assert_allclose(np.asarray(obs), y)
    summary = az.summary(data, var_names=["b"], kind="stats")
    assert list(summary.index) == [f"b[{g}]" for g in range(8)]


def test_nested_plates_drop_the_layout_dim(backend: Backend) -> None:
    """``b`` in ``plate("unit", dim=-2)`` is ``[N, 1]`` per draw: arviz gets ``(chain, draw, unit)``, and ``y`` in the
    nested plates ``(unit, obs)``, not ``y_dim_0, y_dim_1``."""
    rng = np.random.default_rng(0)
    y = 1.0 + 0.8 * rng.standard_normal((12, 1)) + 0.5 * rng.standard_normal((12, 4))
    fit = backend.fit("SAEM", backend.models.random_intercept, backend.tensor(y), num_iters=(10, 10),
                      num_chains=2, progress=False)
    lead = fit.latents["b"].shape[:2]
    assert fit.latents["b"].shape == (*lead, 12, 1)  # the layout's size-1 dim is there in fit.latents
    data = fit.to_arviz()
    b = _group(data, "posterior")["b"]
    assert b.dims == ("chain", "draw", "unit") and b.shape == (*lead, 12)
    np.testing.assert_array_equal(np.asarray(b), fit.latents["b"][..., 0])
    obs = _group(data, "observed_data")["y"]
    assert obs.dims == ("unit", "obs") and obs.shape == (12, 4)
    summary = az.summary(data, var_names=["b"], kind="stats")
    assert list(summary.index[:2]) == ["b[0]", "b[1]"] and len(summary) == 12


def test_event_dims_are_kept_and_imputed_sites_follow_the_plates(backend: Backend) -> None:
    """A ``.to_event(1)`` latent of size 2 in ``plate(dim=-2)`` keeps its event dim (the layout dim goes); the
    ``obs_mask=`` imputation site is laid out on the observations' plates; ``dims=`` / ``coords=`` name the rest."""
    rng = np.random.default_rng(1)
    n, t_len = 10, 4
    t = np.tile(np.linspace(0.0, 3.0, t_len), (n, 1))
    y = 1.0 + 0.5 * t + 0.3 * rng.standard_normal((n, t_len))
    mask = rng.random((n, t_len)) > 0.2
    fit = backend.fit("SAEM", backend.models.obs_mask_slope, backend.tensor(t), backend.tensor(mask),
                      backend.tensor(np.where(mask, y, np.nan)), num_iters=(10, 10), num_chains=2, progress=False)
    data = fit.to_arviz()
    post = _group(data, "posterior")
    lead = fit.latents["b"].shape[:2]
    assert post["b"].dims == ("chain", "draw", "unit", "b_dim_1") and post["b"].shape == (*lead, n, 2)
    assert post["y_unobserved"].dims == ("chain", "draw", "unit", "obs")
    assert post["y_unobserved"].shape == (*lead, n, t_len)
    for name, obs in _group(data, "observed_data").data_vars.items():
        assert obs.dims == ("unit", "obs"), name
    named = fit.to_arviz(dims={"b": ["unit", "coefficient"]}, coords={"coefficient": ["intercept", "slope"]})
    b = _group(named, "posterior")["b"]
    assert b.dims == ("chain", "draw", "unit", "coefficient")
    assert list(b["coefficient"].values) == ["intercept", "slope"]
    summary = az.summary(named, var_names=["b"], kind="stats")
    assert list(summary.index[:2]) == ["b[0, intercept]", "b[0, slope]"]


def test_nlme_units_are_the_subject_ids() -> None:
    """NLME: the unit coordinates are the IDs that index ``fit.individual_parameters()``; DV is ``(unit, ...)``."""
    import latentfit as lf
    from latentfit.models import nlme

    theo = lf.datasets.theophylline(saemix_form=True)
    theo = theo.assign(Id=theo["Id"] + 100)  # IDs that are not the units' positions
    fit = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5},
                    columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose").fit(
        theo, seed=0, num_iters=(20, 10), num_chains=2, progress=False)
    data = fit.to_arviz()
    post = _group(data, "posterior")
    ids = np.asarray(fit.individual_parameters().index)
    np.testing.assert_array_equal(ids, np.arange(101, 113))
    for name in ("ka", "V", "CL"):
        assert post[name].dims == ("chain", "draw", "unit")
        np.testing.assert_array_equal(post[name]["unit"].values, ids)
    obs = _group(data, "observed_data")["DV"]
    assert obs.dims[0] == "unit" and obs.shape[0] == 12
    np.testing.assert_array_equal(obs["unit"].values, ids)
    summary = az.summary(data, var_names=["ka"], kind="stats")
    assert list(summary.index) == [f"ka[{i}]" for i in ids]


def test_one_chain_warns_that_rhat_needs_two(backend: Backend) -> None:
    """A fit that kept one chain (SAEM's default on 50 or more units) gives arviz a NaN R-hat: ``to_arviz`` says so
    and how to get more chains; with two chains it says nothing and R-hat is finite."""
    import warnings

    group, y = _grouped_data()
    args = (backend.xp.asarray(group), 8, backend.tensor(y))
    one = backend.fit("SAEM", backend.models.grouped_intercept, *args, num_iters=(10, 10), num_chains=1,
                      progress=False)
    with pytest.warns(RuntimeWarning, match="one chain.*num_chains=4"):
        data = one.to_arviz()
    assert _group(data, "posterior")["b"].sizes["chain"] == 1
    two = backend.fit("SAEM", backend.models.grouped_intercept, *args, num_iters=(10, 10), num_chains=2,
                      progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        data = two.to_arviz()
    assert np.all(np.isfinite(az.rhat(data, var_names=["b"])["b"].values))
