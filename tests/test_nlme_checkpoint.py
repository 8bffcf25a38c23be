"""``NLME.fit(data, checkpoint=..., resume=...)``: the checkpoint options go to the engine's run.

``fit`` used to refuse them (``TypeError: fit() got an unexpected option 'checkpoint'``).  An NLME fit interrupted
(``KeyboardInterrupt``) and resumed equals the uninterrupted fit bit for bit, on both backends; with ``replicates``
each replicate checkpoints in its own sub-folder; a checkpoint of other data is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_checkpoint import _KeyboardInterruptAt

import latentfit as lf
from latentfit import checkpoint as ckpt_mod
from latentfit.models import nlme

THEO = dict(columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose")
KW = dict(seed=0, num_iters=(20, 10), progress=False)


@pytest.fixture(scope="module")
def theo():
    return lf.datasets.theophylline(saemix_form=True)


def _model(backend: str = "torch") -> nlme.NLME:
    return nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5}, backend=backend, **THEO)


def _interrupted(model: nlme.NLME, data: Any, k: int, **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the driver's "interrupted" warning
        part = model.fit(data, callback=_KeyboardInterruptAt(k), **KW, **options)
    assert part.interrupted
    return part


def _assert_same_fit(a: Any, b: Any) -> None:
    assert not b.interrupted and a.params.keys() == b.params.keys()
    for name in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[name]), np.asarray(b.params[name]), err_msg=name)
    for name in a.history:
        np.testing.assert_array_equal(a.history[name], b.history[name], err_msg=name)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_an_interrupted_nlme_fit_resumes_bit_for_bit(theo, backend: str, tmp_path: Path) -> None:
    model = _model(backend)
    full = model.fit(theo, **KW)
    d = tmp_path / "ckpt"
    part = _interrupted(model, theo, 12, checkpoint=d, checkpoint_every=5, keep=2)
    assert part.num_iterations < 30
    saved = [k for k, _ in ckpt_mod.checkpoint_files(d)]
    assert len(saved) == 2 and 0 < saved[-1] < 30  # keep=2: the last two, before the end
    resumed = model.fit(theo, checkpoint=d, checkpoint_every=5, keep=2, resume=True, **KW)
    _assert_same_fit(full, resumed)
    assert [k for k, _ in ckpt_mod.checkpoint_files(d)][-1] == 30  # the end of the run checkpointed
    _assert_same_fit(full, model.fit(theo, resume=d, **KW))  # resume=<folder> alone: from the final one


def test_an_nlme_checkpoint_of_other_data_is_refused(theo, tmp_path: Path) -> None:
    model = _model()
    d = tmp_path / "ckpt"
    first = model.fit(theo, checkpoint=d, **KW)
    tripled = theo.copy()
    tripled["Concentration"] = 3.0 * tripled["Concentration"]  # same shapes: only the values differ
    with pytest.raises(ValueError, match="data differ from the checkpoint's"):
        model.fit(tripled, checkpoint=d, resume=True, **KW)
    _assert_same_fit(first, model.fit(theo, checkpoint=d, resume=True, **KW))


def test_nlme_replicates_checkpoint_one_folder_each_and_resume(theo, tmp_path: Path) -> None:
    """``replicates=2`` with ``checkpoint=d``: ``d/replicate-0``, ``d/replicate-1``.  An interrupted replicate ends
    the replicates (its interrupted fit returned); ``resume=True`` continues it and runs the next, and the result,
    its replicates table included, equals the uninterrupted replicates'."""
    model = _model()
    full = model.fit(theo, replicates=2, **KW)
    d = tmp_path / "ckpt"
    _interrupted(model, theo, 12, replicates=2, checkpoint=d, checkpoint_every=5)
    assert sorted(p.name for p in d.iterdir()) == ["replicate-0"]  # replicate 1 not started
    resumed = model.fit(theo, replicates=2, checkpoint=d, checkpoint_every=5, resume=True, **KW)
    assert sorted(p.name for p in d.iterdir()) == ["replicate-0", "replicate-1"]
    _assert_same_fit(full, resumed)
    np.testing.assert_array_equal(full.replicates["logLik"].to_numpy(), resumed.replicates["logLik"].to_numpy())
    again = model.fit(theo, replicates=2, resume=d, **KW)  # resume=<folder>: every replicate from its final one
    _assert_same_fit(full, again)
    with pytest.raises(ValueError, match="one sub-folder per replicate"):
        model.fit(theo, replicates=2, resume=ckpt_mod.checkpoint_files(d / "replicate-0")[-1][1], **KW)


def test_nlme_fit_still_refuses_a_misspelt_checkpoint_option(theo) -> None:
    with pytest.raises(TypeError, match="'checkpoints'; did you mean 'checkpoint'"):
        _model().fit(theo, checkpoints="x", **KW)
