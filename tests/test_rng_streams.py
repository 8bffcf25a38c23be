"""Per-unit random streams (issue 13, item 1): SAEM(rng="per_unit").

Each unit's MCMC draws come from its own counter-based stream keyed by (seed or key, unit id, iteration, kernel
step): ``jax.random.fold_in`` on JAX, Philox-4x32-10 on torch.  Properties tested: Philox against Random123's
known answers; the draws are standard normal / uniform (moments and KS on 2·10⁵ draws) and a unit's draws do not
depend on the other units; a fit of permuted units gives the permuted chains and the same estimates (to 1e-12 in
float64: the only difference is the order of the sums over units); a per-unit-stream fit resumes bit for bit;
the default (``rng="global"``) is unchanged; bad options are refused with clear messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from backends import Backend
from scipy import stats

from latentfit import checkpoint as ckpt_mod
from latentfit.inference.fsaem import FSAEM
from latentfit.inference.ops import philox4x32
from latentfit.inference.saem import SAEM

#: Random123's known-answer vectors for Philox-4x32-10: (counter, key, output)
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter: tuple, key: tuple, expected: tuple) -> None:
    out = philox4x32(tuple(torch.tensor(c, dtype=torch.int64) for c in counter),
                     tuple(torch.tensor(k, dtype=torch.int64) for k in key))
    assert tuple(int(w) for w in out) == expected
    out = philox4x32(tuple(np.int64(c) for c in counter), tuple(np.int64(k) for k in key))
    assert tuple(int(w) for w in out) == expected


def test_per_unit_draws_are_standard_and_unit_local(backend: Backend) -> None:
    ops = backend.ops()
    root = ops.stream_key(backend.key(7), 7)
    key = ops.fold_in(ops.fold_in(root, 3), 1)
    n, L, d = 5000, 10, 4
    ids = np.arange(n)
    z = backend.to_numpy(ops.per_unit_normal(key, ops.asarray(ids), (L, n, d)))
    assert z.shape == (L, n, d) and z.dtype == np.float64
    # 2·10⁵ draws: |mean| < 5 SE, |var − 1| < 5 SE (SE = sqrt(2/m)), KS at the 1e-3 level
    m = z.size
    assert abs(z.mean()) < 5 / np.sqrt(m)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / m)
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    # neighbouring units and coordinates are uncorrelated (|r| < 5/sqrt(#pairs))
    flat = z.reshape(L, n * d)
    r = np.corrcoef(flat[:, :-1].ravel(), flat[:, 1:].ravel())[0, 1]
    assert abs(r) < 5 / np.sqrt(flat[:, 1:].size)
    u = backend.to_numpy(ops.per_unit_uniform(key, ops.asarray(ids), (L, n)))
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    # a unit's draws depend on its id only: any subset, in any order, draws the same numbers
    sub = np.random.default_rng(0).permutation(n)[:37]
    z_sub = backend.to_numpy(ops.per_unit_normal(key, ops.asarray(sub), (L, len(sub), d)))
    np.testing.assert_array_equal(z_sub, z[:, sub])
    # other iterations / kernel steps / seeds give other draws
    other = backend.to_numpy(ops.per_unit_normal(ops.fold_in(ops.fold_in(root, 4), 1), ops.asarray(sub),
                                                 (L, len(sub), d)))
    assert abs(np.corrcoef(other.ravel(), z_sub.ravel())[0, 1]) < 0.1
    # the shared stream of a key (saemix's random block) is one draw for every unit
    s = backend.to_numpy(ops.stream_uniform(key, (L * n,)))
    assert stats.kstest(s, "uniform").pvalue > 1e-3
    # Student-t draws of the importance-sampling log-likelihood from the units' streams (x0 / sqrt(chi2_df / df))
    from latentfit.inference.likelihood import student_t_draws

    t = backend.to_numpy(student_t_draws(ops, key, (L, n, 2), 4, ops.per_unit_streams(ops.asarray(ids))))
    assert t.shape == (L, n, 2) and stats.kstest(t.ravel(), stats.t(4).cdf).pvalue > 1e-3
    t_sub = student_t_draws(ops, key, (L, len(sub), 2), 4, ops.per_unit_streams(ops.asarray(sub)))
    np.testing.assert_allclose(backend.to_numpy(t_sub), t[:, sub], rtol=1e-14, atol=0)  # XLA: the last bit may differ


# ----- SAEM with per-unit streams ---------------------------------------------------------------------------------
def _slope_arrays(n: int = 16, m: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    t = np.tile(np.linspace(0.0, 2.0, m), (n, 1))
    b = np.array([1.0, -0.5]) + rng.normal(size=(n, 2)) @ np.array([[0.6, 0.0], [0.2, 0.3]])
    return t, b[:, :1] + b[:, 1:] * t + 0.3 * rng.normal(size=(n, m))


def _slope_engine(backend: Backend, perm: np.ndarray, cls: type = SAEM, **options: Any) -> SAEM:
    t, y = _slope_arrays()
    backend.reset()
    model = backend.latent_model(backend.models.random_slope, backend.tensor(t[perm]), backend.tensor(y[perm]))
    kw = dict(num_iters=(6, 4), seed=5, progress=False, rng="per_unit", unit_ids=perm, chunk_size=5, num_draws=5)
    kw.update(options)
    return cls(model, **kw)


def _assert_permuted(a: Any, b: Any, perm: np.ndarray, backend: Backend, tol: float = 1e-12) -> None:
    for name in a.params:
        np.testing.assert_allclose(np.asarray(b.params[name]), np.asarray(a.params[name]), rtol=0, atol=tol,
                                   err_msg=name)
    np.testing.assert_allclose(backend.to_numpy(b.state.z), backend.to_numpy(a.state.z)[:, perm], rtol=0,
                               atol=tol)
    np.testing.assert_allclose(b.latent_draws, a.latent_draws[:, :, perm], rtol=0, atol=tol)


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
def test_permuted_units_give_permuted_chains(backend: Backend) -> None:
    n = _slope_arrays()[0].shape[0]
    perm = np.random.default_rng(1).permutation(n)
    a = _slope_engine(backend, np.arange(n)).run(backend.key(5))
    b = _slope_engine(backend, perm).run(backend.key(5))
    _assert_permuted(a, b, perm, backend)
    # the chains moved (the test is not vacuous): every unit's chains left their start
    assert np.all(np.asarray(a.history["acc.rw"]).mean(0) > 0.1)
    if backend.name == "pyro":  # JAX (eager post-fit ops, ~10 s): the slow test below
        _assert_post_fit_draws_permuted(a, b, perm, backend)


@pytest.mark.slow
def test_post_fit_draws_permuted_jax() -> None:
    backend = Backend("numpyro")
    n = _slope_arrays()[0].shape[0]
    perm = np.random.default_rng(1).permutation(n)
    a, b = (_slope_engine(backend, p).run(backend.key(5)) for p in (np.arange(n), perm))
    _assert_post_fit_draws_permuted(a, b, perm, backend)


def _assert_post_fit_draws_permuted(a: Any, b: Any, perm: np.ndarray, backend: Backend) -> None:
    """Post-fit draws of a per-unit-stream fit come from the units' own streams (what makes a distributed fit's
    post-fit equal the one-process one): fresh MCMC draws at θ̂ (``standard_errors("sa", num_iters=k)``) and the
    residuals' simulations of the fit of permuted units are the permuted ones."""
    from latentfit.inference.diagnostics import simulate_observations
    from latentfit.inference.individual import sample_conditional

    ids = (np.arange(len(perm)), perm)
    draws = [sample_conditional(f.model, f._theta(), f.state.z, 3, seed=1, unit_ids=i) for f, i in zip((a, b), ids)]
    np.testing.assert_allclose(draws[1], draws[0][:, :, perm], rtol=0, atol=1e-10)
    assert np.mean(draws[0][:, -1] != backend.to_numpy(a.state.z)) > 0.5  # the chains moved from their start
    sims = [simulate_observations(f.model, f._theta(), 7, seed=2, unit_ids=i) for f, i in zip((a, b), ids)]
    np.testing.assert_allclose(sims[1], sims[0][:, perm], rtol=0, atol=1e-12)
    _assert_vpc_permuted(a, b, perm, backend)


def _assert_vpc_permuted(a: Any, b: Any, perm: np.ndarray, backend: Backend) -> None:
    """The VPC of a per-unit-stream fit simulates each unit from its own stream: the fit of permuted units gives the
    permuted replicates and the same VPC (plain and prediction-corrected); a shard of the units (a distributed
    process's block: a model of some units with their ids) gives those units' replicates."""
    import types

    from latentfit.plots import _vpc_simulations, vpc_summary

    sims = [_vpc_simulations(f, 7, 2) for f in (a, b)]
    np.testing.assert_allclose(sims[1], sims[0][:, perm], rtol=0, atol=1e-12)
    assert sims[0].shape == (7,) + _slope_arrays()[0].shape and np.std(sims[0][:, 0, 0]) > 0.1  # replicates vary
    t, y = _slope_arrays()
    for pc in (False, True):
        va, vb = (vpc_summary(f, x, num_sims=20, seed=2, pred_corrected=pc, max_bins=4)
                  for f, x in ((a, t), (b, t[perm])))
        assert va.observed.shape == (4, 3) and va.simulated.shape == (4, 3, 3)
        for name in ("bin_edges", "bin_x", "observed", "simulated"):
            np.testing.assert_allclose(getattr(vb, name), getattr(va, name), rtol=0, atol=1e-12, err_msg=name)
    sub = perm[:7]  # a shard: units perm[:7], in that order, at a's estimates
    model = backend.latent_model(backend.models.random_slope, backend.tensor(t[sub]), backend.tensor(y[sub]))
    shard = types.SimpleNamespace(model=model, _theta=a._theta,
                                  engine=types.SimpleNamespace(rng="per_unit", _unit_ids=sub, ops=model.ops))
    np.testing.assert_allclose(_vpc_simulations(shard, 7, 2), sims[0][:, sub], rtol=0, atol=1e-12)


def test_theophylline_permuted_units() -> None:
    """d = 3 exercises saemix's random block (one shared block for all units); f-SAEM's IMH phase draws through
    the same per-unit streams."""
    from latentfit.examples.theophylline import theophylline_arrays, theophylline_model

    backend = Backend("pyro")
    backend.reset()
    arr = theophylline_arrays()
    args = [arr[k] for k in ("dose", "time", "conc", "mask")]
    n = args[0].shape[0]
    perm = np.random.default_rng(0).permutation(n)
    fits = []
    for p in (np.arange(n), perm):
        model = backend.latent_model(theophylline_model, *(a[torch.as_tensor(p)] for a in args))
        fits.append(FSAEM(model, num_iters=(6, 4), imh_iters=3, seed=2, progress=False, rng="per_unit",
                          unit_ids=p, chunk_size=5, num_draws=5).run())
    _assert_permuted(fits[0], fits[1], perm, backend)


def test_per_unit_resume_is_bit_identical(tmp_path: Path) -> None:
    """torch (the JAX state's stream root is the run's key, an ordinary key leaf: test_checkpoint covers those)."""
    backend = Backend("pyro")
    perm = np.arange(_slope_arrays()[0].shape[0])
    full = _slope_engine(backend, perm, num_iters=(10, 10)).run(backend.key(1))
    d = tmp_path / "ckpt"
    _slope_engine(backend, perm, num_iters=(10, 10)).run(backend.key(1), checkpoint=d, checkpoint_every=10)
    ckpt = ckpt_mod.checkpoint_files(d)
    assert [k for k, _ in ckpt] == [10, 20]
    for f in d.glob("ckpt-000020.*"):  # as if the run had stopped after iteration 10
        f.unlink()
    resumed = _slope_engine(backend, perm, num_iters=(10, 10)).run(backend.key(1), checkpoint=d, resume=True)
    for name in full.params:
        np.testing.assert_array_equal(np.asarray(full.params[name]), np.asarray(resumed.params[name]))
    for name in full.history:
        np.testing.assert_array_equal(full.history[name], resumed.history[name], err_msg=name)


def test_options_are_checked() -> None:
    backend = Backend("pyro")
    backend.reset()
    t, y = _slope_arrays()
    model = backend.latent_model(backend.models.random_slope, backend.tensor(t), backend.tensor(y))
    with pytest.raises(ValueError, match="rng must be one of"):
        SAEM(model, rng="per-unit")
    with pytest.raises(ValueError, match="expected 16 ids"):
        SAEM(model, rng="per_unit", unit_ids=np.arange(15))
    with pytest.raises(ValueError, match="distinct"):
        SAEM(model, rng="per_unit", unit_ids=np.r_[np.arange(15), 0])
    with pytest.raises(ValueError, match="integers"):
        SAEM(model, rng="per_unit", unit_ids=np.linspace(0, 1, 16))
    with pytest.raises(ValueError, match="rng must be one of"):
        from latentfit.pyro import SAEM as PyroSAEM

        PyroSAEM(backend.models.random_slope, rng="unit")


def test_non_gaussian_latents_are_refused() -> None:
    import pyro
    import pyro.distributions as dist
    from torch.distributions import constraints

    def gamma_intercept(y: torch.Tensor) -> None:
        rate = pyro.param("rate", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
        with pyro.plate("unit", y.shape[0], dim=-2):
            b = pyro.sample("b", dist.Gamma(torch.tensor(2.0, dtype=y.dtype), rate))
            with pyro.plate("obs", y.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(b, 1.0), obs=y)

    backend = Backend("pyro")
    backend.reset()
    model = backend.latent_model(gamma_intercept, backend.tensor(np.ones((6, 3))))
    with pytest.raises(ValueError, match="Gaussian latents.*rng='global'"):
        SAEM(model, rng="per_unit")
