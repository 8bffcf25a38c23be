"""An epoch of the EM family's incremental engines is one compiled program that updates its tables in place.

On JAX one driver step (an epoch: n/b mini-batch iterations) runs as one ``lax.fori_loop`` inside the compiled chunk
of epochs, carrying θ, the per-unit tables and the key.  These tests check that this program gives the estimates of
the same steps run one operation at a time (``jax.disable_jit``: the per-step path) to 1e-12 in float64, on the
``GaussianMixture`` family and on a plain NumPyro mixture written as the tutorials write one, for FIEM, IEM, SEMVR and
MiniBatchEM, with contiguous-block and random mini-batches; and that the compiled loop writes a mini-batch's rows
into the ``[n, K]`` table in place: rows read in the same iteration as a write that nothing orders them before made
XLA copy the whole table twice per mini-batch (O(n) per step: FIEM at n = 1e5, b = 100 cost 530-580 µs per step
instead of 33 µs); the compiled epoch now carries each write to the start of the next iteration
(``StatEngine.put_rows``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

LOCS = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]])


def _data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    return LOCS[lab] + rng.normal(size=(n, 2)) * np.array([0.7, 0.5])


def _numpyro_mixture():
    """A Gaussian mixture in the NumPyro tutorials' style: the label in the data plate, marked for enumeration."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def model(x):
        w = numpyro.param("w", jnp.array([0.4, 0.35, 0.25]), constraint=constraints.simplex)
        mu = numpyro.param("mu", jnp.asarray(LOCS + 0.3))
        sigma = numpyro.param("sigma", jnp.stack([jnp.eye(2) * s + 0.1 for s in (1.0, 0.8, 1.2)]),
                              constraint=constraints.positive_definite)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            numpyro.sample("obs", dist.MultivariateNormal(mu[z], covariance_matrix=sigma[z]), obs=x)

    return model


def _model(kind: str, x: np.ndarray):
    if kind == "family":
        from latentfit.models.mixture import GaussianMixture

        return GaussianMixture(jnp.asarray(x), 3, "full", seed=0)
    import latentfit.numpyro as ln

    model = ln.FIEM(_numpyro_mixture(), progress=False).latent_model(jnp.asarray(x))
    assert model.has_expected_stats
    return model


def _engine(name: str, model, batching: str, epochs: int = 2):
    from latentfit.inference.fiem import FIEM
    from latentfit.inference.iem import IEM, MiniBatchEM
    from latentfit.inference.semvr import SEMVR

    cls, b = {"FIEM": (FIEM, 20), "IEM": (IEM, 1), "SEMVR": (SEMVR, 20), "MiniBatchEM": (MiniBatchEM, 30)}[name]
    return cls(model, num_epochs=epochs, batch_size=b, seed=3, batching=batching, progress=False)


def _compare_compiled_with_step_by_step(kind: str, cases: list[tuple[str, str]]) -> None:
    """θ and the tables after each case's epochs, each epoch compiled as one program, equal the steps run op by op
    (``jax.disable_jit``) to 1e-12 in float64."""
    with jax.enable_x64(True):
        model = _model(kind, _data(60, seed=1))
        loc = "locs" if kind == "family" else "mu"
        for name, batching in cases:
            eng = _engine(name, model, batching, epochs=1 if name == "IEM" else 2)
            assert eng.blocks == (batching == "blocks")
            start = eng.init(jax.random.PRNGKey(5))
            step = jax.jit(lambda st, k, eng=eng: eng.step(st, k, "epoch"))
            compiled = start
            for k in range(1, eng.num_epochs + 1):
                compiled, _ = step(compiled, k)
            with jax.disable_jit():
                eager = start
                for k in range(1, eng.num_epochs + 1):
                    eager, _ = eng.step(eager, k, "epoch")
            leaves = jax.tree_util.tree_leaves((compiled.theta, compiled.memory))
            assert all(a.dtype == jnp.float64 for a in leaves)
            for a, b in zip(leaves, jax.tree_util.tree_leaves((eager.theta, eager.memory))):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12,
                                           err_msg=f"{kind} {name} {batching}")
            # the fit moved: not a comparison of two copies of the initial state
            assert float(jnp.max(jnp.abs(compiled.theta[loc] - start.theta[loc]))) > 1e-3


@pytest.mark.slow  # the op-by-op run compiles each primitive apart: ~15 s idle
def test_compiled_epoch_equals_the_steps_run_one_by_one():
    """FIEM (two batches read, one written per step) on the family with contiguous blocks."""
    _compare_compiled_with_step_by_step("family", [("FIEM", "blocks")])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["family", "plain"])
def test_compiled_epoch_equals_the_steps_run_one_by_one_every_engine(kind):
    """FIEM, SEMVR, MiniBatchEM and IEM, blocks and random mini-batches, on the family and the plain NumPyro mixture."""
    _compare_compiled_with_step_by_step(kind, [("FIEM", "blocks"), ("FIEM", "random"), ("SEMVR", "blocks"),
                                               ("MiniBatchEM", "random"), ("IEM", "blocks"), ("IEM", "random")])


@pytest.mark.parametrize("name, batching", [
    ("IEM", "blocks"),  # b = 1: XLA turns the batch's sums into elementwise products it duplicates freely
    pytest.param("FIEM", "blocks", marks=pytest.mark.slow), pytest.param("FIEM", "random", marks=pytest.mark.slow),
    pytest.param("MiniBatchEM", "random", marks=pytest.mark.slow)])
def test_compiled_epoch_updates_the_table_in_place(name, batching):
    """No copy of the per-unit table in the compiled epoch but the one at its entry (this program's input is not
    donated); with the writes done at once the loop body copied it twice per mini-batch."""
    from latentfit.models.mixture import GaussianMixture

    with jax.enable_x64(True):
        n = 5003
        model = GaussianMixture(jnp.asarray(_data(n, seed=2)), 3, "full", seed=0)
        eng = _engine(name, model, batching, epochs=1)
        state = eng.init(jax.random.PRNGKey(0))
        hlo = jax.jit(lambda st, k: eng.step(st, k, "epoch")).lower(state, 1).compile().as_text()
        table_copies = re.findall(rf"f64\[{n},3\]\{{[0-9,]+\}} copy\(", hlo)
        assert len(table_copies) <= 1, f"{name}: the [n, K] table is copied {len(table_copies)} times per epoch"


# ----- eager (torch) steps: fewer dispatched ops ------------------------------------------------------------------
def test_eager_precision_equals_the_unrolled_cholesky_and_names_a_singular_component():
    """On an eager backend the mixture's precisions come from one batched Cholesky and a triangular solve instead of
    the unrolled Cholesky the compiled steps use: the same Σ⁻¹ and log det Σ (1e-12), and a singular component is
    still named in the error."""
    import torch

    from latentfit.inference.model import ModelSpecificationError
    from latentfit.models.mixture import GaussianMixture, _small_spd_inverse

    gm = GaussianMixture(torch.tensor(_data(90, seed=3)), 3, "full", seed=0)
    a = torch.tensor(np.random.default_rng(4).normal(size=(3, 2, 2)))
    cov = a @ a.transpose(-1, -2) + 0.2 * torch.eye(2, dtype=torch.float64)
    prec, logdet = gm._precision(cov)
    ref, ref_logdet, _ = _small_spd_inverse(torch, cov, 2)
    np.testing.assert_allclose(prec.numpy(), (0.5 * (ref + ref.transpose(-1, -2))).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logdet.numpy(), ref_logdet.numpy(), rtol=1e-12)
    np.testing.assert_allclose((prec @ cov).numpy(), np.broadcast_to(np.eye(2), (3, 2, 2)), atol=1e-12)
    singular = cov.clone()
    singular[1] = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    with pytest.raises(ModelSpecificationError, match=r"component\(s\) \[1\] is singular"):
        gm._precision(singular)
