"""One traced adapter for both PPLs (issue 10, item 4): the Gaussian faces are read by the same code on Pyro and
NumPyro, so they agree on which faces a model has, and a face that cannot be read is refused on both alike (the loud
behaviour: a :class:`ModelSpecificationError` naming the cause, never a silently dropped face on one PPL only)."""

from __future__ import annotations

import pytest
from backends import Backend
from test_gallery import ENTRIES, _args

from latentfit.inference import ops_jax_store
from latentfit.inference.model import ModelSpecificationError
from latentfit.integrations.traced import TracedLatentModel


def _model(backend: Backend, name: str):
    entry = ENTRIES[name]
    return backend.latent_model(entry.model(backend), *_args(backend, entry, entry.data()))


@pytest.mark.slow  # 15-25 s per NumPyro model under load (set-up compiles)
@pytest.mark.parametrize("name, faces", [("many_schools", (True, True)), ("poisson_glmm", (False, True)),
                                         ("lognormal_decay", (True, True))])
def test_gaussian_faces_agree_on_both_ppls(backend, name, faces):
    """Normal observations and Normal / LogNormal latents have the faces; Poisson observations have none."""
    model = _model(backend, name)
    assert (model.has_gaussian_obs, model.has_gaussian_prior) == faces


@pytest.mark.parametrize("ppl", ["pyro", pytest.param("numpyro", marks=pytest.mark.slow)])  # (NumPyro: ~20 s)
def test_a_failing_gaussian_face_is_refused_on_both_ppls(ppl, monkeypatch):
    def broken(self, site):
        raise RuntimeError(f"cannot lay out {site.name}")

    backend = Backend(ppl)
    backend.reset()
    monkeypatch.setattr(TracedLatentModel, "_obs_layout", broken)
    # the faces are read, not taken from a stored analysis (an earlier test of the process may leave JAX's persistent
    # cache, and so the on-disk analysis store, on: its NumPyro case failed in one process after other slow tests)
    monkeypatch.setattr(ops_jax_store, "ENABLED", False)
    with pytest.raises(ModelSpecificationError, match="Gaussian faces .* RuntimeError: cannot lay out obs"):
        _model(backend, "many_schools")
    backend.reset()
