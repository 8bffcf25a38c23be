"""A checkpoint records the SHA-256 of its fit's data: a resume on other data of the same shapes is refused.

``run(checkpoint=d, resume=True)`` on corrected data (same shapes, same options and seed) used to continue the old
data's run and return its estimates.  The sidecar now holds ``data_sha256`` (:func:`latentfit.checkpoint.
data_digest`: the model's arguments, each array by dtype, shape and bytes), compared on resume; a checkpoint without
one (an older latentfit's) is resumed unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch
from backends import Backend

from latentfit import checkpoint as ckpt_mod

OPTIONS = dict(num_iters=(15, 15), progress=False, chunk_size=5, num_draws=10)


class Interrupt(Exception):
    """Raised by a callback to stop a fit part-way (its checkpoints stay)."""


def _stop_at(k: int, record: dict[str, Any]) -> None:
    if k == 17:
        raise Interrupt


def _data(n: int = 12, m: int = 4) -> np.ndarray:
    rng = np.random.default_rng(5)
    return 1.0 + 0.8 * rng.normal(size=(n, 1)) + 0.5 * rng.normal(size=(n, m))


def _fit(backend: Backend, y: np.ndarray, callback: Any = None, **run_options: Any) -> Any:
    """The front door's SAEM on the random-intercept model of ``y``, with the driver's ``run_options``."""
    backend.reset()
    cls = backend.engine("SAEM")
    data = backend.tensor(y)
    if backend.name == "pyro":
        return cls(backend.models.random_intercept, seed=3, callback=callback, **OPTIONS).run(data, **run_options)
    return cls(backend.models.random_intercept, callback=callback, **OPTIONS).run(jax.random.PRNGKey(3), data,
                                                                                   **run_options)


def _assert_same_fit(a: Any, b: Any) -> None:
    assert a.history.keys() == b.history.keys()
    for name in a.history:
        np.testing.assert_array_equal(a.history[name], b.history[name], err_msg=name)
    for name in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[name]), np.asarray(b.params[name]), err_msg=name)


def _sidecars(d: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for _, p in ckpt_mod.checkpoint_files(d)]


def test_resume_on_other_data_is_refused_and_on_the_same_data_is_bit_identical(backend: Backend,
                                                                                tmp_path: Path) -> None:
    y = _data()
    full = _fit(backend, y)
    d = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        _fit(backend, y, callback=_stop_at, checkpoint=d, checkpoint_every=5)
    metas = _sidecars(d)
    assert len(metas) == 3 and metas[-1]["iteration"] < 30  # keep=3, the run interrupted
    digests = {m["data_sha256"] for m in metas}
    assert len(digests) == 1 and len(digests.pop()) == 64  # one digest per run, a SHA-256
    before = sorted(p.name for p in d.iterdir())
    corrected = 2.0 * y + 3.0  # same shapes, options and seed: only the data differ
    for options in ({"checkpoint": d, "resume": True}, {"resume": d}):
        with pytest.raises(ValueError, match=r"data differ from the checkpoint's.*resume=False with a new"):
            _fit(backend, corrected, **options)
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written by the refused runs
    resumed = _fit(backend, y, checkpoint=d, checkpoint_every=5, resume=True)
    _assert_same_fit(full, resumed)
    assert {m["data_sha256"] for m in _sidecars(d)} == {metas[0]["data_sha256"]}
    # the corrected data fitted afresh in a new folder: their own estimates, not the old run's
    fresh = _fit(backend, corrected, checkpoint=tmp_path / "new", resume=True)
    _assert_same_fit(_fit(backend, corrected), fresh)
    assert not np.allclose(np.asarray(fresh.params["mu"]), np.asarray(full.params["mu"]))


def test_a_changed_covariate_is_refused_too(tmp_path: Path) -> None:
    """Every argument of the model counts, not only the observed site: a covariate (the times of a random-slope
    model) changed alone is refused."""
    backend = Backend("pyro")
    rng = np.random.default_rng(0)
    t = np.tile(np.arange(5.0), (10, 1))
    y = 1.0 + 0.5 * t + 0.3 * rng.normal(size=t.shape)
    cls = backend.engine("SAEM")

    def run(times: np.ndarray, **options: Any) -> Any:
        backend.reset()
        return cls(backend.models.random_slope, seed=0, **OPTIONS).run(backend.tensor(times), backend.tensor(y),
                                                                         **options)

    d = tmp_path / "ckpt"
    first = run(t, checkpoint=d)
    with pytest.raises(ValueError, match="data differ from the checkpoint's"):
        run(t + 1.0, resume=d)
    _assert_same_fit(first, run(t, resume=d))


def test_a_checkpoint_without_a_digest_resumes_unchecked(tmp_path: Path) -> None:
    """A checkpoint written before the digest existed (no ``data_sha256`` in its sidecar) is accepted: resumed bit
    for bit on its data, and not refused on other data (there is nothing to compare)."""
    backend = Backend("pyro")
    y = _data()
    full = _fit(backend, y)
    d = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        _fit(backend, y, callback=_stop_at, checkpoint=d, checkpoint_every=5)
    for _, sidecar in ckpt_mod.checkpoint_files(d):
        meta = json.loads(sidecar.read_text())
        del meta["data_sha256"]
        sidecar.write_text(json.dumps(meta))
    _assert_same_fit(full, _fit(backend, y, resume=d))
    _fit(backend, 2.0 * y + 3.0, resume=d)  # not refused


class _Data:
    """A stand-in model whose data are ``arrays``."""

    def __init__(self, arrays: Any) -> None:
        self.arrays = arrays

    def data_arrays(self) -> Any:
        return self.arrays


def test_data_digest_covers_values_dtypes_shapes_and_every_argument() -> None:
    digest = lambda *args, **kwargs: ckpt_mod.data_digest(_Data({"args": args, "kwargs": kwargs}))  # noqa: E731
    y = np.arange(12.0).reshape(3, 4)
    g = np.array([0, 1, 2])
    base = digest(g, 3, y)
    assert base == digest(g.copy(), 3, y.copy())  # equal data, other objects
    assert base == digest(g, np.int64(3), np.asfortranarray(y))  # an int as numpy's, another memory layout
    assert base == digest(torch.as_tensor(g), 3, torch.as_tensor(y))  # the same arrays in torch
    assert base == digest(g, 3, jax.numpy.asarray(y))  # and in JAX
    changed = [digest(g, 3, y + 1e-12 * (y == 5.0)), digest(g, 3, y.astype(np.float32)), digest(g, 3, y.reshape(4, 3)),
               digest(g[::-1].copy(), 3, y), digest(g, 4, y), digest(g, 3, y, scale=1.0)]
    assert len({base, *changed}) == len(changed) + 1  # each change alone changes the digest
    assert digest(a=1, b=2) == digest(b=2, a=1)  # keyword arguments by name, not order
    assert ckpt_mod.data_digest(object()) is None  # a model that lists no data: no digest (no check)
