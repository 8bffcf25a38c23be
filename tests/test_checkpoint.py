"""Checkpoint and resume (``Engine.run(checkpoint=..., resume=...)``): an interrupted-then-resumed fit equals the
uninterrupted one bit for bit, on both backends; the files hold no pickle; writes are atomic; old checkpoints are
pruned; a checkpoint of another engine, options, data or version is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from backends import Backend

from latentfit import checkpoint as ckpt_mod
from latentfit.inference.fiem import FIEM
from latentfit.inference.mcmcsgd import MCMCSGD
from latentfit.inference.misso import MISSO
from latentfit.inference.saem import SAEM
from latentfit.models import GaussianMixture

ITERS = 40
STOP_AT = 25


class Interrupt(Exception):
    pass


def _stop_at(k: int, record: dict[str, Any]) -> None:
    if k == STOP_AT:
        raise Interrupt


def _intercept_data(n: int = 12, m: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1)
    return 1.0 + 0.8 * rng.normal(size=(n, 1)) + 0.5 * rng.normal(size=(n, m))


def _saem(backend: Backend, n: int = 12, **options: Any) -> SAEM:
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(_intercept_data(n)))
    kw = dict(num_iters=(ITERS // 2, ITERS // 2), seed=3, progress=False, chunk_size=5, num_draws=15)
    kw.update(options)
    return SAEM(model, **kw)


def _mixture(n: int = 60) -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    x = centres[torch.arange(n) % 3] + 0.6 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return GaussianMixture(x, 3)


def _fiem(**options: Any) -> FIEM:
    kw = dict(num_epochs=ITERS, batch_size=10, seed=2, progress=False, chunk_size=5)
    kw.update(options)
    return FIEM(_mixture(), **kw)


def _assert_same_fit(a: Any, b: Any) -> None:
    assert a.history.keys() == b.history.keys()
    for name in a.history:
        np.testing.assert_array_equal(a.history[name], b.history[name], err_msg=name)
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[name]), np.asarray(b.params[name]), err_msg=name)
    if a.latent_draws is None:
        assert b.latent_draws is None
    else:
        np.testing.assert_array_equal(a.latent_draws, b.latent_draws)


def _interrupt_and_resume(make: Any, key: Any, tmp_path: Path) -> None:
    full = make().run(key)
    d = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        make(callback=_stop_at).run(key, checkpoint=d, checkpoint_every=10)
    # chunks of 5, a checkpoint every 10: the last one before the interruption is iteration 20 (25 was not due)
    assert [k for k, _ in ckpt_mod.checkpoint_files(d)] == [10, 20]
    resumed = make().run(key, checkpoint=d, checkpoint_every=10, resume=True)
    _assert_same_fit(full, resumed)
    saved = [k for k, _ in ckpt_mod.checkpoint_files(d)]
    assert len(saved) == 3 and saved[0] >= 20 and saved[-1] == ITERS  # keep=3, the last at the end of the run
    # resuming from the final checkpoint only finalises
    again = make().run(key, resume=d)
    _assert_same_fit(full, again)


def test_saem_resume_is_bit_identical(backend: Backend, tmp_path: Path) -> None:
    _interrupt_and_resume(lambda **kw: _saem(backend, **kw), backend.key(0), tmp_path)


def test_checkpoints_every_checkpoint_every_iterations_when_chunks_are_longer(tmp_path: Path) -> None:
    """``checkpoint_every=10`` with chunks of 25: the chunks are cut to 10 iterations, so a checkpoint is written every
    10 (it had been every chunk: 25, 50, a user's interruption at 40 lost 15 iterations); the fit equals the
    unchunked run's bit for bit, and an interruption resumes to it."""
    pyro = Backend("pyro")
    make = lambda **kw: _saem(pyro, chunk_size=25, **kw)  # noqa: E731
    full = make().run(None)
    d = tmp_path / "ckpt"
    with pytest.warns(RuntimeWarning, match="interrupted"):
        part = make(callback=_KeyboardInterruptAt(37)).run(None, checkpoint=d, checkpoint_every=10, keep=10)
    assert part.interrupted
    assert [k for k, _ in ckpt_mod.checkpoint_files(d)] == [10, 20, 30, 40]  # 40: the run's end, before the callback
    for extra in d.glob(f"{ckpt_mod.checkpoint_files(d)[-1][1].stem}*"):
        extra.unlink()  # as if it stopped in the chunk 31-40: resumed from 30, the end of no chunk of 25
    assert ckpt_mod.checkpoint_files(d)[-1][0] == 30
    key = None
    _assert_same_fit(full, make().run(key, checkpoint=d, checkpoint_every=10, resume=True))


def _misso(backend: Backend, **kw: Any) -> MISSO:
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(_intercept_data()))
    return MISSO(model, num_epochs=ITERS, mc_size=3, num_chains=3, seed=1, progress=False, chunk_size=5, **kw)


def _mcmcsgd(backend: Backend, **kw: Any) -> MCMCSGD:
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(_intercept_data()))
    return MCMCSGD(model, num_iters=ITERS, burn_in=5, seed=1, progress=False, chunk_size=5, num_draws=5, **kw)


@pytest.mark.parametrize("engine", ["saem", "saem-numpyro", "fiem", "misso", "mcmcsgd"])
def test_a_checkpoint_inside_a_chunk_resumes_under_other_options(engine: str, tmp_path: Path) -> None:
    """A run checkpointed every iteration (its chunks of 5 cut at each) and interrupted at 23 resumes from 23 under the
    default ``checkpoint_every`` (chunks 21-25, ...: 23 is no chunk's end): the resumed chunk starts at 24, and the fit
    equals the uninterrupted one bit for bit (a distributed resume left at the default refused this).  On JAX the
    chunk of 2 runs in the compiled loop of 5 (told to run 2)."""
    pyro = Backend("numpyro" if engine == "saem-numpyro" else "pyro")
    make = {"saem": lambda **kw: _saem(pyro, **kw), "saem-numpyro": lambda **kw: _saem(pyro, **kw), "fiem": _fiem,
            "misso": lambda **kw: _misso(pyro, **kw), "mcmcsgd": lambda **kw: _mcmcsgd(pyro, **kw)}[engine]
    key = None if engine in ("fiem", "mcmcsgd") else pyro.key(0)
    full = make().run(key)
    d = tmp_path / "ckpt"
    with pytest.warns(RuntimeWarning, match="interrupted"):
        make(callback=_KeyboardInterruptAt(23)).run(key, checkpoint=d, checkpoint_every=1, keep=2)
    assert [k for k, _ in ckpt_mod.checkpoint_files(d)] == [22, 23]
    _assert_same_fit(full, make().run(key, checkpoint=d, resume=True))


def test_fiem_resume_is_bit_identical(tmp_path: Path) -> None:
    _interrupt_and_resume(_fiem, None, tmp_path)


def test_mcmcsgd_torch_optimizer_resume(tmp_path: Path) -> None:
    """MCMCSGD on torch keeps a ``torch.optim`` optimiser in its state (restored through ``load_state_dict``;
    OPT-AMSGrad's state holds a list of past gradients); its ``run`` override takes the checkpoint options too."""
    backend = Backend("pyro")
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(_intercept_data()))

    def make(**kw: Any) -> MCMCSGD:
        return MCMCSGD(model, num_iters=ITERS, burn_in=5, seed=1, progress=False, chunk_size=5, num_draws=5,
                       optimizer="opt-amsgrad", **kw)

    _interrupt_and_resume(make, None, tmp_path)


def test_mcmcsgd_default_change_never_resumes_silently(tmp_path: Path) -> None:
    """MCMCSGD's default optimiser became ``"auto"`` (Fisher scoring on this model) from ``"adam"``.  A checkpoint of
    an Adam fit (what the old default recorded: ``optimizer_spec="adam"``, ``fisher=False``) resumes bit for bit with
    ``optimizer="adam"`` given, and is refused with the options-differ message by an engine left at the new default;
    a fit at the new default resumes bit for bit too."""
    backend = Backend("pyro")
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(_intercept_data()))

    def make(**kw: Any) -> MCMCSGD:
        return MCMCSGD(model, num_iters=ITERS, burn_in=5, seed=1, progress=False, chunk_size=5, num_draws=5, **kw)

    _interrupt_and_resume(lambda **kw: make(optimizer="adam", **kw), None, tmp_path / "adam")
    adam = tmp_path / "adam" / "ckpt"  # where _interrupt_and_resume writes
    meta = json.loads(sorted(adam.glob("ckpt-*.json"))[-1].read_text())
    assert meta["options"]["optimizer_spec"] == "adam" and meta["options"]["fisher"] is False
    assert make().fisher is True
    with pytest.raises(ValueError, match=r"options differ.*optimizer_spec='adam' != 'auto'"):
        make().run(resume=adam)
    _interrupt_and_resume(make, None, tmp_path / "auto")


@pytest.mark.parametrize("backend_name", [pytest.param("pyro", id="pyro"),
                                          pytest.param("numpyro", id="numpyro", marks=pytest.mark.slow)])
def test_misso_resume_is_bit_identical(backend_name: str, tmp_path: Path) -> None:
    """MISSO's typed state (per-unit surrogate rows, visit anchors, averaged informations, MH chains) round-trips
    (NumPyro is slow-marked: four fits compile MISSO's epoch four times, ~40 s under load)."""
    backend = Backend(backend_name)
    backend.reset()
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(_intercept_data()))

    def make(**kw: Any) -> MISSO:
        return MISSO(model, num_epochs=ITERS, mc_size=3, num_chains=3, seed=1, progress=False, chunk_size=5, **kw)

    _interrupt_and_resume(make, backend.key(0), tmp_path)


def test_files_are_safe_atomic_and_pruned(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    d = tmp_path / "ckpt"
    _fiem(num_epochs=30).run(checkpoint=d, checkpoint_every=5, keep=2)
    files = sorted(p.name for p in d.iterdir())
    assert files == ["ckpt-000025.json", "ckpt-000025.safetensors", "ckpt-000030.json", "ckpt-000030.safetensors"]
    meta = json.loads((d / "ckpt-000030.json").read_text())
    tensors = load_file(str(d / "ckpt-000030.safetensors"))
    assert meta["engine"] == "FIEM" and meta["iteration"] == 30 and meta["shapes"]["num_units"] == 60
    assert meta["options"]["batch_size"] == 10 and meta["latentfit_version"]
    assert all(t in tensors for leaf in meta["state"] for t in [leaf.get("tensor")] if t)
    # the random stream is a state leaf (the torch.Generator's state), not torch's global RNG
    streams = [leaf for leaf in meta["state"] if leaf["kind"] == "torch_generator"]
    assert len(streams) == 1 and tensors[streams[0]["tensor"]].dtype == np.uint8
    assert not any(name.startswith("rng/") for name in tensors)
    # no pickle anywhere: a safetensors file is a length-prefixed JSON header plus raw bytes
    data = (d / "ckpt-000030.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert set(header) - {"__metadata__"} == set(tensors)
    assert not any(p.read_bytes().startswith(b"\x80") for p in d.iterdir())  # the pickle protocol marker
    # a fresh run refuses to mix with another run's checkpoints
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        _fiem(num_epochs=30).run(checkpoint=d)


def test_format_1_is_refused_with_a_message(tmp_path: Path) -> None:
    """A checkpoint of format 1 (dict states, torch's global RNG) is refused, saying why and what to do."""
    d = tmp_path / "ckpt"
    _fiem(num_epochs=10).run(checkpoint=d)
    sidecar = d / "ckpt-000010.json"
    meta = json.loads(sidecar.read_text())
    meta["format_version"] = 1
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 1.*older latentfit.*start the fit again"):
        _fiem(num_epochs=20).run(checkpoint=d, resume=True)


def test_failed_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ckpt"

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _fiem(num_epochs=5).run(checkpoint=d)
    assert list(d.iterdir()) == []


def test_mismatches_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Backend("pyro")
    d = tmp_path / "ckpt"
    _saem(backend, num_iters=(10, 0)).run(checkpoint=d)
    with pytest.raises(ValueError, match="checkpoint was written by SAEM, not FIEM"):
        _fiem().run(resume=d)
    with pytest.raises(ValueError, match=r"num_units 12 != 20"):
        _saem(backend, n=20, num_iters=(10, 0)).run(resume=d)
    with pytest.raises(ValueError, match=r"options differ.*num_chains=5 != 2"):
        _saem(backend, num_iters=(10, 0), num_chains=2).run(resume=d)
    with pytest.raises(ValueError, match=r"options differ.*phases"):
        _saem(backend, num_iters=(10, 5)).run(resume=d)
    monkeypatch.setattr("latentfit.__version__", "9.9.9")
    with pytest.raises(ValueError, match=r"written by latentfit 0\.1\.0, this is 9\.9\.9"):
        _saem(backend, num_iters=(10, 0)).run(resume=d)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _saem(backend).run(resume=tmp_path / "empty")


def test_pyro_front_door_passes_checkpoint_options(tmp_path):
    """``latentfit.pyro.SAEM(model, ...).run(*model_args, checkpoint=..., resume=...)``: the driver's options are
    taken out of the model's keyword arguments; the resumed fit equals the uninterrupted one."""
    import pyro
    import pyro.distributions as dist
    from torch.distributions import constraints

    import latentfit.pyro as lp

    def model(y):
        mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
        omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
        sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
        with pyro.plate("unit", y.shape[0], dim=-2):
            b = pyro.sample("b", dist.Normal(mu, omega))
            with pyro.plate("obs", y.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(b, sigma), obs=y)

    y = torch.as_tensor(_intercept_data())
    options = {"num_iters": (20, 20), "seed": 0, "progress": False, "chunk_size": 5}
    pyro.clear_param_store()
    full = lp.SAEM(model, **options).run(y)
    pyro.clear_param_store()
    with pytest.raises(Interrupt):
        lp.SAEM(model, callback=_stop_at, **options).run(y, checkpoint=tmp_path, checkpoint_every=10)
    pyro.clear_param_store()
    resumed = lp.SAEM(model, **options).run(y, resume=tmp_path)
    for name, values in full.history.items():
        np.testing.assert_array_equal(resumed.history[name], values)


class _KeyboardInterruptAt:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, k: int, record: dict[str, Any]) -> None:
        if k == self.k:
            raise KeyboardInterrupt


@pytest.mark.slow_on("numpyro")  # its one-iteration chunk program compiles apart: ~17 s at load 6
def test_resume_after_an_interruption_at_iteration_137(backend: Backend, tmp_path: Path) -> None:
    """A 140-iteration SAEM fit (one iteration per chunk, draws collected from 131 on) stopped at iteration 137 in
    two ways: a crash (an exception the driver does not catch) leaves the periodic checkpoint of iteration 130 and
    the resumed run redoes 131-137; a ``KeyboardInterrupt`` returns the state after 137 and checkpoints it.  Either
    way the resumed fit equals the uninterrupted one bit for bit (history, θ, collected draws)."""
    def make(**kw: Any) -> SAEM:
        return _saem(backend, num_iters=(110, 30), chunk_size=1, num_draws=10, **kw)

    key = backend.key(0)
    full = make().run(key)
    assert full.latent_draws.shape[1] == 10
    crash, keyboard = tmp_path / "crash", tmp_path / "keyboard"
    with pytest.raises(Interrupt):
        make(callback=lambda k, record: _stop_at(k - 112, record)).run(key, checkpoint=crash, checkpoint_every=10)
    assert [k for k, _ in ckpt_mod.checkpoint_files(crash)] == [110, 120, 130]
    with pytest.warns(RuntimeWarning, match=r"interrupted.*after iteration 137 of 140"):
        part = make(callback=_KeyboardInterruptAt(137)).run(key, checkpoint=keyboard, checkpoint_every=10)
    assert part.interrupted and part.num_iterations == 137
    assert [k for k, _ in ckpt_mod.checkpoint_files(keyboard)] == [120, 130, 137]
    for name, value in part.history.items():
        np.testing.assert_array_equal(value, full.history[name][:137], err_msg=name)
    for d in (crash, keyboard):
        _assert_same_fit(full, make().run(key, checkpoint=d, checkpoint_every=10, resume=True))


def _tamper(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of checkpoint directory ``src`` whose last checkpoint's files (sidecar dict, tensors dict) ``edit``
    changes; returns ``dst``."""
    import shutil

    shutil.copytree(src, dst)
    sidecar = ckpt_mod.checkpoint_files(dst)[-1][1]
    edit(sidecar, sidecar.with_suffix(".safetensors"))
    return dst


def _resave(sidecar: Path, tensors_file: Path, change: Any) -> None:
    """Rewrite the tensors file with ``change(meta, tensors)`` applied and the sidecar's SHA-256 made to match (a
    tampering that the checksum alone cannot see)."""
    from safetensors.numpy import load_file, save

    meta = json.loads(sidecar.read_text())
    tensors = load_file(str(tensors_file))
    change(meta, tensors)
    data = save(tensors)
    tensors_file.write_bytes(data)
    import hashlib

    meta["sha256"] = hashlib.sha256(data).hexdigest()
    sidecar.write_text(json.dumps(meta))


def _chain_leaf(meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's description of SAEM's chains ``z [L, N, d]``."""
    return next(leaf for leaf in meta["state"] if leaf["path"] and leaf["path"][-1] == "z")


def test_tampered_checkpoints_are_refused(tmp_path: Path) -> None:
    """A checkpoint altered after it was written (files truncated, a state array of another shape or dtype with its
    checksum updated, the sidecar's engine or data shape edited, the tensors file gone) is refused with a message
    saying what is wrong, before any state is used; the untouched copy still resumes."""
    backend = Backend("pyro")
    good = tmp_path / "good"
    _saem(backend, num_iters=(10, 0)).run(checkpoint=good)

    def truncate(path_index: int) -> Any:
        def edit(sidecar: Path, tensors_file: Path) -> None:
            path = (sidecar, tensors_file)[path_index]
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        return edit

    def chains_of_shape(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        name = _chain_leaf(meta)["tensor"]
        tensors[name] = np.ascontiguousarray(tensors[name][:, :7])  # 7 of the 12 units

    def chains_in_float32(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        name = _chain_leaf(meta)["tensor"]
        tensors[name] = tensors[name].astype(np.float32)

    def edit_meta(change: Any) -> Any:
        def edit(sidecar: Path, tensors_file: Path) -> None:
            meta = json.loads(sidecar.read_text())
            change(meta)
            sidecar.write_text(json.dumps(meta))
        return edit

    # a damaged latest checkpoint among others: the latest intact one resumes, with a warning naming the damage; the
    # same damage on the only checkpoint is refused with that message
    damage = {"truncated tensors": (truncate(1), r"does not match its sidecar \(SHA-256 differs\).*truncated"),
              "truncated sidecar": (truncate(0), r"not a readable checkpoint sidecar \(truncated or corrupted")}
    complete = _saem(backend, num_iters=(10, 0)).run(resume=good)
    for i, (edit, message) in enumerate(damage.values()):
        d = _tamper(good, tmp_path / f"damaged{i}", edit)
        assert [k for k, _ in ckpt_mod.checkpoint_files(d)] == [5, 10]
        with pytest.warns(UserWarning, match=message + ".*resuming from the latest intact checkpoint instead.*000005"):
            resumed = _saem(backend, num_iters=(10, 0)).run(resume=d)
        assert resumed.num_iterations == 10
        np.testing.assert_array_equal(resumed.history["objective"], complete.history["objective"])
        for k in complete.params:
            np.testing.assert_array_equal(resumed.params[k], complete.params[k])
        alone = tmp_path / f"alone{i}"
        alone.mkdir()
        for f in ckpt_mod.checkpoint_files(d)[-1][1].parent.glob("ckpt-000010.*"):
            (alone / f.name).write_bytes(f.read_bytes())
        with pytest.raises(ValueError, match=message):
            _saem(backend, num_iters=(10, 0)).run(resume=alone)
    cases = {
        "wrong shape": (lambda s, t: _resave(s, t, chains_of_shape), ValueError,
                        r"state entry '.*z' has shape \[5, 7, 1\], this engine's has \[5, 12, 1\]"),
        "wrong dtype": (lambda s, t: _resave(s, t, chains_in_float32), ValueError,
                        r"is float32, its sidecar says float64: the checkpoint was altered"),
        "wrong engine": (edit_meta(lambda m: m.update(engine="FIEM")), ValueError,
                         "checkpoint was written by FIEM, not SAEM"),
        "wrong data shape": (edit_meta(lambda m: m["shapes"].update(num_units=13)), ValueError,
                             r"data shapes differ.*num_units 13 != 12"),
    }
    for i, (edit, error, message) in enumerate(cases.values()):
        d = _tamper(good, tmp_path / f"case{i}", edit)
        with pytest.raises(error, match=message):
            _saem(backend, num_iters=(10, 0)).run(resume=d)
    # a sidecar named directly whose tensors file is gone (in a directory, a sidecar alone is skipped: the sidecar is
    # written last, so a write cut short leaves the previous complete checkpoint the latest)
    d = _tamper(good, tmp_path / "no-tensors", lambda s, t: t.unlink())
    with pytest.raises(FileNotFoundError, match="has no tensors file"):
        _saem(backend, num_iters=(10, 0)).run(resume=d / ckpt_mod.checkpoint_files(good)[-1][1].name)
    # the untouched checkpoint resumes (a finished fit: it only finalises)
    assert _saem(backend, num_iters=(10, 0)).run(resume=good).num_iterations == 10
