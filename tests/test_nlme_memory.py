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
* Between the binding's phases a large table's freed temporaries are handed back to the OS (glibc's ``malloc_trim``,
  ``data.release_freed_memory``, a no-op where there is none): the same data, bit for bit.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from latentfit.inference import mcmc
from latentfit.inference.model import DataError
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


def test_x_missing_on_an_observation_without_mdv_column():
    """Without an MDV column the observation rows are a bool mask (with Python's ``False`` for "no MDV", ``~False``
    is -1 and the mask was an int64 0/1 array, which indexed rows 0 and 1 instead of masking): an x-variable missing on
    an observation is reported, as with MDV, not filled from the individual's other rows."""
    df = _population(3)
    df["X"] = np.linspace(0.0, 1.0, len(df))
    df.loc[df.index[df["EVID"] == 0][5], "X"] = np.nan
    for table in (df, df.drop(columns="MDV")):
        with pytest.raises(DataError, match="'X' \\(the x-variable\\) is missing on an observation"):
            read_nonmem(table, x="X")


# ----- freed heap pages handed back between the binding's phases ------------------------------------------------------
def test_release_freed_memory_is_a_safe_no_op_without_malloc_trim(monkeypatch):
    """``release_freed_memory`` calls glibc's ``malloc_trim`` where there is one and is a no-op elsewhere: a C library
    without it, one that cannot be opened, a ``malloc_trim`` that fails, or a system other than Linux never raise."""
    import ctypes
    import sys

    from latentfit.models.nlme import data as nonmem

    assert nonmem.release_freed_memory() is None  # this process's C library (glibc on the CI's Linux)
    calls = []

    class NoTrim:  # a C library without malloc_trim (musl)
        def __init__(self, name):
            calls.append(name)

    class FailingTrim:
        def __init__(self, name):
            calls.append(name)

        def malloc_trim(self, pad):
            raise OSError("no")

    def unopenable(name):
        calls.append(name)
        raise OSError("cannot open")

    for fake in (NoTrim, FailingTrim, unopenable):
        monkeypatch.setattr(ctypes, "CDLL", fake)
        assert nonmem.release_freed_memory() is None
    assert calls == [None, None, None]
    monkeypatch.setattr(sys, "platform", "darwin")  # not Linux: the C library is not even looked up
    assert nonmem.release_freed_memory() is None
    assert calls == [None, None, None]


def test_large_tables_release_freed_pages_between_phases(monkeypatch):
    """On a table of at least ``RELEASE_ROWS`` rows the reading and the binding hand freed heap pages back three times
    (after the IDs, after the observations' order, before τ); the bound data are the same bit for bit."""
    from latentfit.models.nlme import binding
    from latentfit.models.nlme import data as nonmem

    df = _population(20, seed=2)
    plain = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, data=df)
    calls = []
    for module in (nonmem, binding):
        monkeypatch.setattr(module, "RELEASE_ROWS", len(df))
        monkeypatch.setattr(module, "release_freed_memory", lambda: calls.append(1))
    trimmed = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, data=df)
    assert len(calls) == 3
    for field in ("time", "dv", "mask", "cens", "obs_rows", "dose_time", "dose_amt", "dose_rate", "dose_cmt"):
        a, b = getattr(plain.data, field), getattr(trimmed.data, field)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field
    tau, tau_trimmed = plain.design._tau, trimmed.design._tau
    assert torch.equal(tau, tau_trimmed)
    monkeypatch.setattr(nonmem, "RELEASE_ROWS", len(df) + 1)
    monkeypatch.setattr(binding, "RELEASE_ROWS", len(df) + 1)
    nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 8.0, "CL": 0.8}, data=df)
    assert len(calls) == 3  # a smaller table: not called


# ----- the MCMC kernels over blocks of units (mcmc._accept_blocks) ----------------------------------------------------
def _blocked_calls(monkeypatch) -> list[int]:
    """Count the kernel steps that go over blocks of units (a spy on ``mcmc._accept_blocks``)."""
    calls: list[int] = []
    inner = mcmc._accept_blocks

    def spy(ops, blocks, *args, **kwargs):
        calls.append(len(blocks))
        return inner(ops, blocks, *args, **kwargs)

    monkeypatch.setattr(mcmc, "_accept_blocks", spy)
    return calls


@pytest.mark.parametrize("kernels,rng,error,covariate", [
    ((2, 0, 0), "global", "constant", False),  # prior IMH alone (the carried RSS cache)
    ((0, 2, 0), "global", "constant", False),  # component-wise random walk alone
    ((0, 0, 3), "global", "constant", False),  # random-block random walk alone
    ((2, 2, 2), "per_unit", "constant", False),  # saemix's default sweep on per-unit streams
    ((2, 2, 2), "global", "combined", True),  # no cache (density_evaluator), μ_i from a covariate
])
def test_blocked_kernels_fit_unchanged(small_blocks, monkeypatch, kernels, rng, error, covariate):
    """Each kernel over blocks of 2 units (3 chains) gives the unblocked multi-chain SAEM fit bit for bit: estimates,
    chains, the chains' cache, acceptance rates and the objective of every iteration."""
    df = _population(20, seed=3)

    def fit():
        model = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 10.0, "CL": 1.0}, data=df, error=error,
                          covariates={"CL": ["WT"]} if covariate else None)
        return SAEM(model, (12, 6), seed=0, progress=False, kernels=kernels, rng=rng).run()

    calls = _blocked_calls(monkeypatch)
    blocked = fit()
    assert calls and set(calls) == {10}  # every kernel step went over 10 blocks of 2 units
    monkeypatch.setattr(TorchOps, "unit_block_values", None)
    del calls[:]
    whole = fit()
    assert not calls
    assert blocked.state.z.shape[0] == 3
    for name in whole.params:
        assert torch.equal(torch.as_tensor(blocked.params[name]), torch.as_tensor(whole.params[name])), name
    assert torch.equal(blocked.state.z, whole.state.z)
    assert (blocked.state.cache is None) == (whole.state.cache is None) == (error != "constant")
    if whole.state.cache is not None:
        assert torch.equal(blocked.state.cache, whole.state.cache)
    assert blocked.history.keys() == whole.history.keys()
    for name in whole.history:
        np.testing.assert_array_equal(np.asarray(blocked.history[name]), np.asarray(whole.history[name]),
                                      err_msg=name)


@pytest.mark.parametrize("per_unit_count", [False, True])
def test_blocked_kernel_steps_equal_unblocked(small_blocks, monkeypatch, per_unit_count):
    """Each kernel on its own (prior IMH, component-wise and block random walk, the independence sampler), over blocks
    of units and whole: the same chains, densities, counts and rates; the caller's state is never written (a pure
    step), also when a proposal's log-density is not finite."""
    model = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 10.0, "CL": 1.0}, data=_population(23, seed=4))
    ops = model.ops
    theta = model.init_params()
    z = model.sample_prior(theta, ops.key(1), 3)
    z[0, 5, 0] = float("nan")  # a chain stuck at a non-finite point leaves it
    scale = ops.asarray([0.3, 0.2, 0.4])
    mask = ops.asarray([1.0, 0.0, 1.0])
    mean = model._mu(theta)[..., model._r_sel] + 0.0 * z[0]
    log_q = ops.mvn_log_prob_fn(mean, ops.small_cholesky(model.omega_matrix(theta))[None])
    z_prop = model.sample_prior(theta, ops.key(2), 3)
    z_prop[1, 7, 2] = float("inf")  # a proposal outside the domain: rejected and counted

    def steps(evaluate):
        state = mcmc.init_chain_state(z.clone(), evaluate)
        if per_unit_count:
            state = state._replace(num_nonfinite=ops.zeros(tuple(state.log_lik.shape)))
        before = [t.clone() for t in state[:3]]
        out = [mcmc.prior_imh(ops, ops.key(3), state, lambda k: model.sample_prior(theta, k, 3), evaluate),
               mcmc.rw_componentwise(ops, ops.key(4), state, scale, evaluate),
               mcmc.rw_block(ops, ops.key(5), state, scale, mask, evaluate),
               mcmc.independent_mh(ops, ops.key(6), state, z_prop, log_q(z_prop), log_q(state.z), evaluate)]
        assert all(torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() for a, b in zip(before, state[:3]))
        return out

    calls = _blocked_calls(monkeypatch)
    evaluator = model.density_evaluator(theta)
    assert evaluator.unit_blocks(z) == [slice(i, min(i + 2, 23)) for i in range(0, 23, 2)]
    blocked = steps(evaluator)
    assert len(calls) == 1 + 3 + 1 + 1
    monkeypatch.setattr(TorchOps, "unit_block_values", None)
    whole = steps(model.density_evaluator(theta))
    for (st_b, a_b), (st_w, a_w) in zip(blocked, whole):
        for x, y in zip(st_b[:4], st_w[:4]):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(a_b * 1.0, a_w * 1.0, rtol=0, atol=0)
    assert float(ops.xp.sum(whole[3][0].num_nonfinite)) >= 1


def test_blocked_sweep_keeps_fewer_arrays_alive(monkeypatch):
    """The live tensors a SAEM sweep creates (a dispatch-mode count of their storages) peak lower over blocks of units:
    one block's proposals, log-densities and masks at a time instead of ``[L, N]`` arrays of each (N = 600 units of 8
    observations, 2 chains; blocks of 40 units)."""
    monkeypatch.setattr(TorchOps, "unit_block_values", 2 * 8 * 40)
    model = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 10.0, "CL": 1.0}, data=_population(600, seed=6))
    engine = SAEM(model, (3, 0), num_chains=2, seed=0, progress=False, burn_in=1)

    def sweep_peak():
        state = engine.init(model.ops.key(0))
        with _LiveTensors() as live:
            out = engine.step(state, torch.tensor(1), "saem")
        return live.peak, out

    calls = _blocked_calls(monkeypatch)
    blocked_peak, blocked = sweep_peak()
    assert calls
    monkeypatch.setattr(mcmc, "_unit_blocks", lambda evaluate, z: None)  # the model still evaluates over blocks
    whole_peak, whole = sweep_peak()
    assert torch.equal(blocked[0].z, whole[0].z) and torch.equal(blocked[0].cache, whole[0].cache)
    per_unit = 600 * 2 * 8  # bytes of one float64 [L, N] array
    # kernels on whole [L, N] arrays: about 25 of them and 8 [L, N, d] at the peak (49 [L, N]); over blocks: the
    # chains (4 + 3 for z), the SAEM state's (4), one step's noise and uniforms (2-4) and one block's temporaries
    assert whole_peak > 40 * per_unit
    assert blocked_peak < 0.5 * whole_peak, (blocked_peak / per_unit, whole_peak / per_unit)


class _LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages created inside (views of one storage once; storages that existed before, such
    as the model's data, not counted): ``live`` now and ``peak`` (after each operation)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}
        self.live = self.peak = 0
        self.before = {o.untyped_storage().data_ptr() for o in gc.get_objects() if isinstance(o, torch.Tensor)}

    def _drop(self, ptr: int) -> None:
        rec = self.refs[ptr]
        rec[0] -= 1
        if rec[0] == 0:
            self.live -= rec[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or getattr(t, "_live_counted", False):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.before:
                continue
            t._live_counted = True
            rec = self.refs.setdefault(ptr, [0, storage.nbytes()])
            if rec[0] == 0:
                self.live += rec[1]
            rec[0] += 1
            weakref.finalize(t, self._drop, ptr)
        self.peak = max(self.peak, self.live)
        return out


def test_rows_out_of_order_read_as_sorted():
    """A table whose rows are shuffled within individuals binds the same padded data as the sorted one (read_nonmem
    sorts only a table that is out of order; equal times keep their table order)."""
    df = _population(15, seed=7)
    shuffled = df.sample(frac=1.0, random_state=3).sort_values("ID", kind="stable").reset_index(drop=True)
    assert not shuffled["TIME"].equals(df["TIME"])
    a, b = read_nonmem(df), read_nonmem(shuffled)
    for field in ("time", "dv", "mask", "cens", "dose_time", "dose_amt"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_array_equal(shuffled["DV"].to_numpy()[b.obs_rows[b.mask]], b.dv[b.mask])
    # two observations at one time: the earlier row of the table first, as a stable sort leaves them
    tie = read_nonmem(pd.concat([df, df[df["ID"].eq(2) & df["EVID"].eq(0)].iloc[[3]].assign(DV=-1.0)])
                      .sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True))
    row = tie.dv[1][tie.mask[1]]
    assert row[4] == -1.0 and row[3] == a.dv[1][3]


def test_read_nonmem_reads_float_columns_in_place():
    """The table's float64 columns (TIME, DV, AMT) are read as read-only views, not copied: the peak of what
    read_nonmem allocates (tracemalloc) stays below 750 B per individual on this table (9 rows of 8 B per column and
    individual; ~890 B when each float column was copied, ~600 B now), and the caller's table is unchanged."""
    n, t = 3000, len(TIMES)
    dose_row = np.tile(np.r_[True, np.zeros(t, bool)], n)
    df = pd.DataFrame({"ID": np.repeat(np.arange(1, n + 1), t + 1), "TIME": np.tile(np.r_[0.0, TIMES], n),
                       "DV": np.where(dose_row, np.nan, np.random.default_rng(0).normal(size=n * (t + 1)) + 5.0),
                       "AMT": np.where(dose_row, 100.0, 0.0), "EVID": dose_row.astype(int),
                       "MDV": dose_row.astype(int)})
    before = df.copy()
    gc.collect()
    tracemalloc.start()
    try:
        data = read_nonmem(df)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pd.testing.assert_frame_equal(df, before)
    assert peak < 750 * n, peak / n
    np.testing.assert_array_equal(data.dv, df["DV"].to_numpy().reshape(n, t + 1)[:, 1:])
    np.testing.assert_array_equal(data.time, np.broadcast_to(TIMES, (n, t)))
    np.testing.assert_array_equal(data.dose_amt, np.full((n, 1), 100.0))


@pytest.mark.parametrize("rng", ["global", "per_unit"])
def test_saem_step_is_pure_and_the_last_good_state_is_not_copied(small_blocks, monkeypatch, tmp_path, rng):
    """SAEM's step on the NLME fast path (its kernels over blocks of units, writing fresh chains) leaves the state it
    is given as it was, so the driver keeps the last good state by reference (no host copy of the chains: the chains
    kept twice) and a fit interrupted inside a chunk still returns, and resumes from, the state at the chunk's start.
    """
    from latentfit.checkpoint import flatten_state

    model = nlme.NLME("one_compartment_oral", {"ka": 1.5, "V": 10.0, "CL": 1.0}, data=_population(40, seed=2))
    engine = SAEM(model, (6, 4), seed=0, progress=False, burn_in=1, chunk_size=3, rng=rng)
    state = engine.init(model.ops.key(0))
    assert engine._snapshot(state, 0).state is state
    before = flatten_state(state)[0]
    for phase_index in (0, -1):
        engine.step(state, torch.tensor(2), engine.phases()[phase_index][2])
        for k, v in flatten_state(state)[0].items():
            np.testing.assert_array_equal(v, before[k], err_msg=f"the step changed its input state: {k}")
    accept, calls = mcmc._accept_blocks, {"n": 0, "stop": None}

    def counted(*args, **kwargs):  # a KeyboardInterrupt inside the second chunk (iterations 4-6)
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return accept(*args, **kwargs)

    monkeypatch.setattr(mcmc, "_accept_blocks", counted)
    first_chunk = []
    clean = SAEM(model, (6, 4), seed=0, progress=False, burn_in=1, chunk_size=3, rng=rng,
                 callback=lambda k, record: first_chunk.append(calls["n"]) if k == 3 else None).run()
    calls.update(n=0, stop=first_chunk[0] + 3)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        part = SAEM(model, (6, 4), seed=0, progress=False, burn_in=1, chunk_size=3, rng=rng).run(checkpoint=tmp_path)
    assert calls["n"] == calls["stop"] and part.interrupted and part.num_iterations == 3
    resumed = SAEM(model, (6, 4), seed=0, progress=False, burn_in=1, chunk_size=3, rng=rng).run(resume=tmp_path)
    for name, value in clean.history.items():
        np.testing.assert_array_equal(resumed.history[name], value, err_msg=name)
    k = part.num_iterations
    for name, value in part.history.items():
        np.testing.assert_array_equal(value, clean.history[name][:k], err_msg=name)
    for name, value in part.params.items():
        np.testing.assert_array_equal(np.asarray(value), clean.history[f"theta.{name}"][k - 1], err_msg=name)
