"""A callback stops a fit early: ``callback(k, record)`` returning True (or raising ``StopIteration``) ends the fit
after iteration k with an ordinary result of k iterations, the same state as the uninterrupted run's after k.

Was: the return value was ignored (50 of 50 epochs ran when it returned True) and ``StopIteration`` propagated out of
``run()`` (audit F, B.3).  The stop may fall inside a chunk of iterations (``chunk_size=25``): the chunk's iterations
past k are dropped and those up to k run again from the chunk's start (the iterations are deterministic), so the
result is exact on every engine the driver runs, compiled (JAX) or not.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import torch

from latentfit.models import GaussianMixture

_rng = np.random.default_rng(0)
X = np.concatenate([_rng.normal(-2.0, 1.0, (150, 2)), _rng.normal(2.0, 1.0, (150, 2))])
Y = _rng.normal(2.0, 0.7, size=(40, 1)) + _rng.normal(0, 0.5, size=(40, 4))


def _mixture(backend, engine: str, callback=None, num_epochs: int = 40):
    x = backend.tensor(X)
    options = {"num_epochs": num_epochs, "progress": False}
    if engine == "MCEM":
        options["num_samples"] = 2
    if engine in ("FIEM", "MiniBatchEM"):
        options["batch_size"] = 30
    if callback is not None:
        options["callback"] = callback
    cls = backend.engine(engine)
    if backend.name == "pyro":
        return cls(GaussianMixture(x, 2), seed=0, **options).run()
    return cls(GaussianMixture(x, 2), **options).run(jax.random.PRNGKey(0))


def _saem(backend, callback=None):
    options = {"num_iters": (30, 10), "progress": False}
    if callback is not None:
        options["callback"] = callback
    backend.reset()
    return backend.fit("SAEM", backend.models.random_intercept, backend.tensor(Y), **options)


def _recorder(stop: int, how: str):
    seen: list[int] = []

    def callback(k, record):
        seen.append(k)
        assert isinstance(record, dict) and any(name.startswith("theta.") for name in record)
        if k == stop:
            if how == "raise":
                raise StopIteration
            return np.bool_(True) if how == "numpy" else True
        return None

    return callback, seen


def _check_stopped(fit, full, stop: int, seen: list[int], exact: bool) -> None:
    assert seen == list(range(1, stop + 1))
    assert fit.num_iterations == stop and not fit.interrupted
    for name, rows in fit.history.items():
        assert len(rows) == stop, name
        np.testing.assert_array_equal(rows, full.history[name][:stop])
    for name, value in fit.params.items():  # θ after iteration `stop` of the uninterrupted run
        expected = full.history[f"theta.{name}"][stop - 1]
        if exact:
            np.testing.assert_array_equal(value, expected)
        else:
            np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("engine", "stop", "how"), [("EM", 7, "true"), ("EM", 25, "numpy"), ("FIEM", 30, "raise"),
                                                     ("MiniBatchEM", 7, "true"), ("MCEM", 30, "true")])
def test_em_family_callback_stops_after_its_epoch(backend, engine, stop, how):
    """Stops inside the first chunk (7), inside the second (30: on JAX the chunk after it was already dispatched) and
    at a chunk's end (25)."""
    full = _mixture(backend, engine)
    callback, seen = _recorder(stop, how)
    fit = _mixture(backend, engine, callback)
    _check_stopped(fit, full, stop, seen, exact=backend.name == "pyro")
    assert fit.log_likelihood() == pytest.approx(_mixture(backend, engine, num_epochs=stop).log_likelihood(),
                                                 rel=1e-12)


def test_saem_callback_stops_after_its_iteration(backend):
    full = _saem(backend)
    callback, seen = _recorder(12, "true")
    fit = _saem(backend, callback)
    _check_stopped(fit, full, 12, seen, exact=backend.name == "pyro")
    assert fit.latents  # the draws of the iterations kept, as for any fit


def test_other_return_values_go_on(backend):
    """Only True stops: a callback returning a loss, a list or None runs every iteration."""
    answers = iter([0.5, [1], None, 2.0] * 20)
    fit = _mixture(backend, "EM", lambda k, record: next(answers), num_epochs=30)
    assert fit.num_iterations == 30 and len(fit.history["objective"]) == 30


def test_stop_writes_the_checkpoint_at_its_iteration(tmp_path):
    """With ``checkpoint=`` the stopped fit's last checkpoint is at the callback's iteration, and a resume from it
    continues as the uninterrupted run."""
    from latentfit.inference.em import EM

    x = torch.as_tensor(X)
    fit = EM(GaussianMixture(x, 2), num_epochs=40, progress=False, callback=lambda k, r: k == 9).run(
        checkpoint=tmp_path / "ck", checkpoint_every=5)
    assert fit.num_iterations == 9
    saved = sorted(int(p.name[len("ckpt-"):-len(".json")]) for p in (tmp_path / "ck").glob("ckpt-*.json"))
    assert saved[-1] == 9 and saved[:-1] == [5]
    resumed = EM(GaussianMixture(x, 2), num_epochs=40, progress=False).run(resume=tmp_path / "ck")
    full = EM(GaussianMixture(x, 2), num_epochs=40, progress=False).run()
    np.testing.assert_array_equal(resumed.params["locs"], full.params["locs"])


def test_a_state_that_cannot_be_replayed_stops_at_its_chunk_end(monkeypatch):
    """Where the chunk's start state was not kept apart from it (a torch state a checkpoint cannot hold), the fit stops
    at the end of the chunk and says so."""
    from latentfit.inference import driver
    from latentfit.inference.em import EM

    monkeypatch.setattr(driver.Engine, "_snapshot", lambda self, state, k: driver._Snapshot(k, state, None))
    with pytest.warns(RuntimeWarning, match=r"asked to stop after iteration 3.*stops after iteration 10"):
        fit = EM(GaussianMixture(torch.as_tensor(X), 2), num_epochs=40, progress=False, chunk_size=10,
                 callback=lambda k, r: k == 3).run()
    assert fit.num_iterations == 10 and len(fit.history["objective"]) == 10


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_misso_vi_callback_stops_after_its_epoch(ppl):
    from test_misso_vi import Y10, numpyro_gauss_model, pyro_gauss_model, run_numpyro, run_pyro

    def fit(callback=None):
        opts = dict(num_blocks=5, method="misso", learning_rate=0.3, num_epochs=8, seed=0, callback=callback)
        if ppl == "pyro":
            import pyro
            from pyro.infer.autoguide import AutoNormal

            pyro.clear_param_store()
            return run_pyro(pyro_gauss_model, AutoNormal(pyro_gauss_model), (Y10,), **opts)
        from numpyro.infer.autoguide import AutoNormal

        return run_numpyro(numpyro_gauss_model, AutoNormal(numpyro_gauss_model), (Y10,), **opts)

    full = fit()
    seen: list[int] = []

    def stop_at_three(epoch, record):
        seen.append(epoch)
        if epoch == 3:
            raise StopIteration

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary result: no "interrupted" warning
        stopped = fit(stop_at_three)
    assert seen == [1, 2, 3] and not stopped.interrupted and stopped.num_iters == 3 * 5
    assert len(stopped.history["loss"]) == 4  # the initial loss and 3 epochs'
    np.testing.assert_allclose(stopped.history["loss"], full.history["loss"][:4], rtol=0, atol=0)
