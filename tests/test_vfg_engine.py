"""VFG training through the engine driver (latentfit.integrations.vfg_engine): the FitResult shape, history and
callbacks, the same losses as a plain full-batch Adam loop, pure steps, checkpoint/resume bit for bit, Ctrl-C,
early stopping, the divergence guard, torch's global RNG untouched and tensors on the data's dtype/device."""

from __future__ import annotations

import math
import random
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from latentfit.inference.results import FitResult
from latentfit.integrations.vfg import (
    SYNTHETIC_STRUCTURE,
    VFG,
    _lr_at,
    _make_torch_flows,
    negative_elbo,
    synthetic_imputation_data,
)
from latentfit.integrations.vfg import TorchOps as GraphOps
from latentfit.integrations.vfg_engine import VFGEngine, VFGProblem, VFGResult, random_keep, validation_split


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n: int = 60, dtype: Any = np.float64) -> np.ndarray:
    return synthetic_imputation_data(n, seed=3).astype(dtype)


def _small(**kw: Any) -> VFG:
    return VFG(SYNTHETIC_STRUCTURE, hidden=8, blocks=1, **kw)


class Interrupt(Exception):
    pass


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_fit_result_shape_history_callbacks_and_progress(capsys: pytest.CaptureFixture) -> None:
    calls: list = []
    fit = _small(masking=0.5).fit(_data(), num_epochs=3, batch_size=20, progress=True, validation=0.2,
                                  callback=lambda k, info: calls.append((k, info)))
    assert isinstance(fit, VFGResult) and isinstance(fit, FitResult) and isinstance(fit.engine, VFGEngine)
    assert fit.num_iterations == 3 and not fit.interrupted and fit.latent_draws is None
    assert set(fit.history) == {"loss", "val_loss", "rollbacks"}
    assert all(v.shape == (3,) for v in fit.history.values()) and np.isfinite(fit.history["loss"]).all()
    assert [k for k, _ in calls] == [1, 2, 3]
    for k, info in calls:
        assert {n: float(v) for n, v in info.items()} == {n: float(v[k - 1]) for n, v in fit.history.items()}
    assert fit.val_history == list(fit.history["val_loss"])
    assert "VFG" in capsys.readouterr().err  # the driver's progress bar
    # estimates = the weights by name, with the flows' names and shapes
    shapes = {n: tuple(p.shape) for n, p in fit.flows.named_parameters()}
    assert {n: v.shape for n, v in fit.params.items()} == shapes and len(shapes) == 6 * 6
    for n, p in fit.flows.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), fit.params[n])
    assert fit.init_time >= 0 and fit.compile_time == 0.0 and fit.time_per_iteration > 0
    assert fit.elapsed >= fit.init_time
    # the VFG's uses are on the result; latent-variable post-fit computations are refused with a message
    x = _data()
    assert fit.impute(np.where(np.arange(8) == 2, np.nan, x)).shape == x.shape
    assert fit.encode(x).shape == (60, 2) and fit.decode(fit.encode(x)).shape == x.shape
    assert fit.log_prob(x).shape == (60,) and fit.sample(4).shape == (4, 8)
    assert math.isfinite(fit.negative_elbo(x)) and "VFGResult(3 epochs" in repr(fit)
    for refused in (fit.summary, fit.log_likelihood, fit.standard_errors, fit.residuals, fit.to_arviz,
                    fit.plot_convergence):
        with pytest.raises(TypeError, match="no meaning for a VFG fit"):
            refused()
    with pytest.raises(TypeError, match="fit.aic has no meaning"):
        _ = fit.aic


def test_full_batch_losses_equal_a_plain_adam_loop() -> None:
    # one batch, no masking, no validation: the stream only orders the batch's rows, so the engine's losses equal a
    # plain loop's (torch.optim.Adam on the flows, cosine rate, clipped gradient norm) to rounding; the weights start
    # from what torch.manual_seed(seed) would draw (measured: the loop this engine replaced gave the same losses
    # bit for bit, 16.658828171431182, ... on these data with hidden=16, blocks=2)
    x = torch.as_tensor(_data(80))
    spec = _small()
    epochs, lr, seed = 4, 1e-2, 5
    fit = spec.fit(x, num_epochs=epochs, batch_size=1000, learning_rate=lr, seed=seed, progress=False)
    flows = _make_torch_flows(spec.graph, 8, 1, spec.log_scale_clip, "cpu", torch.float64,
                              torch.Generator().manual_seed(seed))
    params = list(flows.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    loc, scale = x.mean(0), x.std(0, unbiased=False)
    xs = (x - loc) / scale
    obs = torch.ones_like(xs)
    ref = []
    for t in range(epochs):
        loss = negative_elbo(spec.graph, flows, GraphOps(), xs, obs, None, spec.beta, spec.likelihood, spec.sigma)
        for g in opt.param_groups:
            g["lr"] = _lr_at(lr, t, epochs, True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.clip_grad)
        opt.step()
        ref.append(float(loss.detach()))
    np.testing.assert_allclose(fit.history["loss"], ref, rtol=1e-12)
    for n, p in flows.named_parameters():
        np.testing.assert_allclose(fit.params[n], p.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_steps_are_pure_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(11)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    spec = _small(masking=0.5)
    a = spec.fit(_data(), num_epochs=2, batch_size=20, seed=4, progress=False, validation=0.2)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.manual_seed(999)  # another global state: the same fit
    b = spec.fit(_data(), num_epochs=2, batch_size=20, seed=4, progress=False, validation=0.2)
    c = spec.fit(_data(), num_epochs=2, batch_size=20, seed=5, progress=False, validation=0.2)
    assert np.array_equal(a.history["loss"], b.history["loss"]) and not np.array_equal(a.history["loss"],
                                                                                          c.history["loss"])
    # the engine's split is the first draw of its stream (benchmarks reproduce it with validation_split)
    train, val = validation_split(torch.Generator().manual_seed(4), 60, 0.2)
    assert torch.equal(a.state.val_idx, val) and torch.equal(a.state.train_idx, train)
    # step(state, k) is pure: the same output twice, its input (weights, Adam moments, generator) unchanged
    engine = a.engine
    s0 = engine.init(engine.ops.key(4))
    g0 = s0.key.get_state().clone()
    w0 = {n: w.clone() for n, w in s0.weights.items()}
    s1, i1 = engine.step(s0, 1, None)
    s1b, i1b = engine.step(s0, 1, None)
    assert torch.equal(s0.key.get_state(), g0) and _states_equal(s0.weights, w0)
    assert _states_equal(s1.weights, s1b.weights) and _states_equal(s1.adam_v, s1b.adam_v) and i1 == i1b
    assert s1.adam_t == s1.num_steps == 3 and not _states_equal(s1.weights, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensors_follow_the_data(dtype: torch.dtype) -> None:
    x = torch.as_tensor(_data(40), dtype=dtype)
    fit = _small(masking=0.5).fit(x, num_epochs=1, batch_size=20, progress=False, validation=0.25)
    st = fit.state
    for group in (st.weights, st.adam_m, st.adam_v, st.best_weights):
        assert all(w.dtype == dtype and w.device == x.device for w in group.values())
    assert st.key.device == x.device and st.train_idx.device == x.device and st.val_keep.dtype == dtype
    assert fit.device == x.device and fit.dtype == dtype
    out = fit.impute(torch.where(torch.arange(8) == 3, torch.nan, x))
    assert out.dtype == dtype and out.device == x.device
    keep = random_keep(torch.Generator().manual_seed(0), 500, 4, 0.5, x)
    assert keep.dtype == dtype and set(keep.sum(1).tolist()) <= {1.0, 2.0, 3.0}  # never none, never all kept


def test_checkpoint_resume_is_bit_identical_and_ctrl_c_keeps_the_last_epoch(tmp_path: Any) -> None:
    spec = _small(masking=0.5)
    x = _data()
    kw = dict(num_epochs=5, batch_size=20, seed=2, progress=False, validation=0.2)
    full = spec.fit(x, **kw)

    def stop_at(k: int, info: Any) -> None:
        if k == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        spec.fit(x, checkpoint=tmp_path / "a", checkpoint_every=2, callback=stop_at, **kw)
    resumed = spec.fit(x, checkpoint=tmp_path / "a", checkpoint_every=2, resume=True, **kw)
    for n in full.history:
        np.testing.assert_array_equal(resumed.history[n], full.history[n])
    assert _states_equal(resumed.state.weights, full.state.weights)
    assert _states_equal(resumed.state.adam_v, full.state.adam_v)
    assert torch.equal(resumed.state.key.get_state(), full.state.key.get_state())

    def ctrl_c(k: int, info: Any) -> None:
        if k == 3:
            raise KeyboardInterrupt

    with pytest.warns(RuntimeWarning, match="interrupted"):
        cut = spec.fit(x, checkpoint=tmp_path / "b", callback=ctrl_c, **kw)
    assert cut.interrupted and cut.num_iterations == 3 and len(cut.history["loss"]) == 3
    np.testing.assert_array_equal(cut.history["loss"], full.history["loss"][:3])
    assert np.isfinite(cut.impute(np.where(np.arange(8) == 0, np.nan, x))).all()
    again = spec.fit(x, checkpoint=tmp_path / "b", resume=True, **kw)
    assert _states_equal(again.state.weights, full.state.weights)
    with pytest.raises(ValueError, match="options differ"):
        _small(masking=0.8).fit(x, checkpoint=tmp_path / "b", resume=True, **kw)


def test_early_stopping_keeps_the_best_weights_and_stops_on_resume(tmp_path: Any) -> None:
    x = _data()
    kw = dict(num_epochs=30, batch_size=20, learning_rate=5e-2, progress=False, validation=0.25, patience=1)
    fit = _small().fit(x, checkpoint=tmp_path, **kw)
    val = fit.history["val_loss"]
    assert fit.num_iterations == len(val) < 30 and val[-1] >= val[:-1].min()  # stopped at the first non-improvement
    best = int(np.argmin(val))
    assert fit.state.best_val == val[best] and _states_equal(fit.state.weights, fit.state.best_weights)
    again = _small().fit(x, checkpoint=tmp_path, resume=True, **kw)  # the stopped run's checkpoint: nothing to do
    assert again.num_iterations == fit.num_iterations and _states_equal(again.state.weights, fit.state.weights)


def test_divergence_guard_reruns_the_epoch_at_half_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = VFGEngine(VFGProblem(_small(), torch.as_tensor(_data())), num_epochs=3, batch_size=20,
                       progress=False)
    real = VFGEngine._epoch
    seen: list = []

    def flaky(self: VFGEngine, state: Any, m: Any, v: Any, t: int, key: Any, lr_scale: float) -> Any:
        seen.append(({n: w.clone() for n, w in state.weights.items()}, t, lr_scale))
        out = real(self, state, m, v, t, key, lr_scale)
        return (*out[:4], math.nan) if len(seen) == 2 else out  # epoch 2's first run diverges

    monkeypatch.setattr(VFGEngine, "_epoch", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rollback is the step's own business: no driver stop, no warning
        fit = engine.run()
    np.testing.assert_array_equal(fit.history["rollbacks"], [0, 1, 0])
    assert np.isfinite(fit.history["loss"]).all() and fit.state.rollbacks == 1 and fit.state.lr_scale == 0.5
    # the rerun starts from the epoch's starting weights with a fresh Adam state at half the rate
    assert _states_equal(seen[1][0], seen[2][0]) and (seen[1][1], seen[2][1]) == (3, 0)
    assert (seen[1][2], seen[2][2], seen[3][2]) == (1.0, 0.5, 0.5)
    monkeypatch.setattr(VFGEngine, "_epoch", lambda self, state, m, v, t, key, s: (*real(self, state, m, v, t, key,
                                                                                         s)[:4], math.nan))
    with pytest.raises(RuntimeError, match="diverged"):
        engine.run()


@pytest.mark.slow  # compiles (about 30-60 s on a loaded 2-core machine)
def test_jax_flavour_through_the_driver_resumes_bit_for_bit(tmp_path: Any) -> None:
    pytest.importorskip("flowjax")
    from latentfit.integrations.vfg_jax import _engine_classes

    problem_cls, engine_cls = _engine_classes()
    before = torch.get_rng_state()
    engine = engine_cls(problem_cls(VFG(SYNTHETIC_STRUCTURE, backend="jax", hidden=8, blocks=1), _data()),
                        num_epochs=4, batch_size=60, learning_rate=1e-2, progress=False, seed=1)
    full = engine.run()
    assert isinstance(full, VFGResult) and full.num_iterations == 4 and full.compile_time > 0
    assert np.isfinite(full.history["loss"]).all() and full.history["loss"][-1] < full.history["loss"][0]

    def stop_at(k: int, info: Any) -> None:
        if k == 2:
            raise Interrupt

    engine.callback = stop_at
    with pytest.raises(Interrupt):
        engine.run(checkpoint=tmp_path)
    engine.callback = None
    resumed = engine.run(checkpoint=tmp_path, resume=True)
    np.testing.assert_array_equal(resumed.history["loss"], full.history["loss"])
    for n, w in full.params.items():
        np.testing.assert_array_equal(resumed.params[n], w)
    assert torch.equal(before, torch.get_rng_state())
    x = _data()
    assert np.isfinite(np.asarray(full.impute(np.where(np.arange(8) == 2, np.nan, x)))).all()
    assert np.asarray(full.log_prob(x)).shape == (60,)
