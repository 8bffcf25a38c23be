"""Mini-batches as contiguous blocks of shuffled units (``batching="blocks"``, issue 10 item 5).

The incremental engines shuffle the units once and visit contiguous blocks in a fresh random order each
epoch: a batch is a slice, not a gather.  The blocks form a fixed partition (Neal & Hinton's incremental EM),
so the exact engines keep their fixed point: they must land on plain EM's maximum, on both backends,
whether b divides n or the last block overlaps its neighbour.
"""

from __future__ import annotations

import numpy as np
import pytest

from latentfit.inference.em import EM
from latentfit.inference.fiem import FIEM
from latentfit.inference.iem import IEM, MiniBatchEM
from latentfit.inference.model import ModelSpecificationError
from latentfit.inference.semvr import SEMVR
from latentfit.inference.stats_table import BLOCKS_FROM_UNITS
from latentfit.inference.units import UnitBlock, put_units, take_units
from latentfit.models.mixture import GaussianMixture

LOCS = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]])


def _data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    return LOCS[lab] + rng.normal(size=(n, 2)) * 0.7


def test_blocks_are_slices_on_both_backends(backend):
    x = backend.tensor(np.arange(20.0).reshape(10, 2))
    gm = GaussianMixture(x, 2, "diag", seed=0)
    ops = gm.ops
    blk = UnitBlock(3, 4)
    np.testing.assert_array_equal(backend.to_numpy(take_units(ops, x, blk)), np.arange(20.0).reshape(10, 2)[3:7])
    table = backend.tensor(np.zeros((10, 2)))
    out = put_units(ops, table, blk, backend.tensor(np.ones((4, 2))))
    expect = np.zeros((10, 2))
    expect[3:7] = 1
    np.testing.assert_array_equal(backend.to_numpy(out), expect)
    # the features of a block equal those of the same units gathered by index
    idx = ops.arange(10)[3:7]
    np.testing.assert_allclose(backend.to_numpy(gm._features_t(blk)), backend.to_numpy(gm._features_t(idx)))


@pytest.mark.parametrize("cls, b, backend_name", [(IEM, 50, "pyro"), (FIEM, 50, "pyro"), (SEMVR, 70, "pyro"),
                                                   (MiniBatchEM, 70, "pyro"), (FIEM, 70, "numpyro")])
def test_blocked_engines_reach_the_em_maximum(cls, b, backend_name):
    """n = 600: b = 50 divides it, b = 70 does not (the last block overlaps its neighbour)."""
    from backends import Backend

    backend = Backend(backend_name)
    x = backend.tensor(_data(600))
    ref = EM(GaussianMixture(x, 3, "full", seed=0), num_epochs=400, progress=False).run().params
    gm = GaussianMixture(x, 3, "full", seed=0)
    epochs = 60 if cls is not MiniBatchEM else 120
    eng = cls(gm, num_epochs=epochs, batch_size=b, batching="blocks", seed=1, progress=False)
    assert eng.blocks
    fit = eng.run()
    assert fit.model is gm and eng.user_model is gm  # post-fit tools see the user's model, not the shuffled view
    assert eng.model is not gm  # the steps work on the shuffled view, made once when the engine was built
    # exact engines land on EM's fixed point; mini-batch EM's constant step leaves O(ρ) noise (ρ = 1 here)
    tol = 1e-7 if cls is not MiniBatchEM else 5e-2
    for name in ("weights", "locs", "covariances"):
        np.testing.assert_allclose(fit.params[name], ref[name], atol=tol)


def test_auto_batching_and_errors():
    import torch

    small = GaussianMixture(torch.tensor(_data(300)), 3, "diag", seed=0)
    assert not FIEM(small, num_epochs=1, batch_size=30, progress=False).blocks  # random gathers stay in cache
    assert FIEM(small, num_epochs=1, batch_size=30, batching="blocks", progress=False).blocks
    assert not FIEM(small, num_epochs=1, batch_size=30, batching="blocks", shuffle=False, progress=False).blocks
    big = GaussianMixture(torch.tensor(_data(BLOCKS_FROM_UNITS)), 3, "diag", seed=0, init_iters=1)
    assert FIEM(big, num_epochs=1, batch_size=1024, progress=False).blocks
    assert not FIEM(big, num_epochs=1, batch_size=1024, batching="random", progress=False).blocks
    with pytest.raises(ValueError, match="batching must be"):
        FIEM(small, num_epochs=1, batch_size=30, batching="stripes")

    class NoReorder(GaussianMixture):  # a model that cannot reorder its units
        permuted_units = None

    with pytest.raises(ModelSpecificationError, match="permuted_units"):
        FIEM(NoReorder(torch.tensor(_data(300)), 3, "diag"), num_epochs=1, batch_size=30, batching="blocks")
