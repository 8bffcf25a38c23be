"""Memory of large NLME fits (issue 13, "memory per unit"): per-observation work over blocks of units, compact
per-row codes while reading the table, no hidden copies.

* On eager torch the structural model and the residuals run over contiguous blocks of the units once a
  ``[..., n, T]`` temporary would exceed ``Ops.unit_block_values`` (:meth:`NLME._unitwise`): the densities, the
  residual sums of squares SAEM carries and the M-step's statistics must equal the one-block evaluation, and a whole
  SAEM fit must not change (the same operations on each unit's rows).
* ``read_nonmem`` keeps its per-row codes narrow (absent columns are one value viewed on every row); the bound data
  must be what they were (checked against a table whose optional columns are given explicitly).
* The design of a block views the model's ``τ = t − t_d`` instead of computing its own; the fixed-effect design of a
  model without covariates keeps one ``[m, p]`` block, not the ``[N, m, p]`` array it was cut from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from latentfit.inference.ops import TorchOps
from latentfit.inference.saem import SAEM
from latentfit.models import nlme
from latentfit.models.nlme.data import read_nonmem
from latentfit.models.nlme.mstep import _rss

TIMES = np.array([0.25, 0.5, 1, 2, 4, 8, 12, 24])


def _population(n: int, seed: int = 0, weight: bool = False) -> pd.DataFrame:
    """One-compartment oral population (one dose of 100 at time 0, 8 observations; a few individuals with fewer)."""
    rng = np.random.default_rng(seed)
    ka, v, cl = np.exp(np.log([1.0, 8.0, 0.8]) + rng.normal(size=(n, 3)) * 0.3).T[..., None]
    k = cl / v
    dv = 100 * ka / (v * (ka - k)) * (np.exp(-k * TIMES) - np.exp(-ka * TIMES)) + 0.4 * rng.normal(size=(n, len(TIMES)))
    rows = []
    for i in range(n):
        keep = len(TIMES) - (i % 3)  # unbalanced: 8, 7 or 6 observations
        rows.append(pd.DataFrame({"ID": i + 1, "TIME": np.r_[0.0, TIMES[:keep]], "DV": np.r_[np.nan, dv[i, :keep]],
                                  "AMT": np.r_[100.0, np.zeros(keep)], "EVID": np.r_[1, np.zeros(keep, int)],
                                  "MDV": np.r_[1, np.zeros(keep, int)], "WT": 70 + 10 * rng.normal()}))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 units (8 observations, one chain): several blocks even on a small population, the last one short."""
    monkeypatch.setattr(TorchOps, "unit_block_values", 56)


def test_unit_blocks_partition():
    ops = TorchOps()
    assert ops.unit_blocks(1000, 10) is None  # 10⁴ values: one block
    blocks = ops.unit_blocks(100_000, 10)
    assert blocks[0] == slice(0, 2 ** 18 // 10)
    assert sum(b.stop - b.start for b in blocks) == 100_000 and blocks[-1].stop == 100_000
    assert all(b.start == a.stop for a, b in zip(blocks, blocks[1:]))
    assert ops.unit_blocks(3, 2 ** 20) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least one unit per block
    x = torch.arange(12.0).reshape(6, 2)
    assert ops.take(x, slice(2, 4), 0).data_ptr() == x[2:].data_ptr()  # a slice is a view, not a gather


@pytest.mark.parametrize("error,covariate", [("constant", False), ("combined", True), ("exponential", False)])
def test_blocked_densities_equal_one_block(small_blocks, monkeypatch, error, covariate):
    df = _population(40)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 10.0, "CL": 1.0}, error=error, data=df,
                      covariates={"CL": ["WT"]} if covariate else None)
    theta = model.init_params()
    z = torch.as_tensor(np.random.default_rng(1).normal(size=(3, 40, 3)) * 0.3) + model._mu(theta)[..., model._r_sel]
    units = torch.tensor([3, 0, 17, 39, 5, 22, 8, 11, 30])

    def evaluate():
        out = [*model.log_densities(theta, z), *model.density_evaluator(theta)(z),
               *model.log_densities(theta, z[:, units], units), *model.density_evaluator(theta, units)(z[:, units]),
               _rss(model, theta, z, None), _rss(model, theta, z[:, units], units)]
        cached = model.cached_density(theta)
        if cached is not None:
            out += [*cached[0](z), model.initial_cache(theta, z)]
        return out

    blocked = evaluate()
    monkeypatch.setattr(TorchOps, "unit_block_values", None)
    whole = evaluate()
    assert model.ops.unit_blocks(40, 3 * 8) is None
    for a, b in zip(blocked, whole):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_blocked_saem_fit_unchanged(small_blocks, monkeypatch):
    """SAEM over blocks of units gives the one-block fit bit for bit (the same operations on each row)."""
    df = _population(20, seed=3)  # 3 chains (saemix: 50 / N), blocks of 2 units

    def fit():
        model = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 10.0, "CL": 1.0}, data=df)
        return SAEM(model, (15, 10), seed=0, progress=False).run()

    blocked = fit()
    monkeypatch.setattr(TorchOps, "unit_block_values", None)
    whole = fit()
    for name in whole.params:
        assert torch.equal(torch.as_tensor(blocked.params[name]), torch.as_tensor(whole.params[name])), name
    assert blocked.state.z.shape[0] > 1 and torch.equal(blocked.state.z, whole.state.z)  # several chains


def test_block_design_views_the_model_design():
    model = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 10.0, "CL": 1.0}, data=_population(20))
    block = model.design.take(model.ops, slice(5, 12))
    tau, amt = block.time_after_dose()
    whole_tau, _ = model.design.time_after_dose()
    assert tau.data_ptr() == whole_tau[5:].data_ptr() and tau.shape[0] == 7
    assert torch.equal(tau, block.time[..., :, None] - block.dose_time[..., None, :])
    assert torch.equal(amt, block.dose_amt[..., None, :])
    # no covariate: X_i = I viewed N times, holding one [m, p] block (not the [N, m, p] array it came from)
    assert model._x.untyped_storage().nbytes() == model._xr.untyped_storage().nbytes() == 9 * 8


def test_compact_codes_read_the_same_data():
    """Absent optional columns (viewed constants) and present ones (narrow types) give the same bound data."""
    df = _population(12, seed=5)
    full = df.assign(CMT=1, CENS=0, RATE=0.0, ADDL=0, II=0.0, SS=0)
    a, b = read_nonmem(df), read_nonmem(full)
    for field in ("time", "dv", "mask", "cens", "obs_rows", "dose_time", "dose_amt", "dose_rate", "dose_cmt",
                  "dose_ss", "dose_ii", "dose_seg", "seg_start"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.obs_seg is None and b.obs_seg is None
    assert a.obs_rows.dtype == np.int32 and a.cens.dtype == np.int8
    # the rows point at the observations
    np.testing.assert_array_equal(df["DV"].to_numpy()[a.obs_rows[a.mask]], a.dv[a.mask])


@pytest.mark.parametrize("mdv,observed", [(0.4, True), (-0.7, True), (1.0, False), (-2.0, False), (np.nan, True)])
def test_mdv_as_integer(mdv, observed):
    """MDV is read as an integer (as before the compact codes): |MDV| < 1 is 0, an observation; NaN is 0."""
    df = _population(3)
    df["MDV"] = df["MDV"].astype(float)
    df.loc[2, "MDV"] = mdv
    data = read_nonmem(df)
    assert int(data.mask.sum()) == int(df["EVID"].eq(0).sum()) - (not observed)
