"""VFG training through the engine driver (latentfit.integrations.vfg_engine): the FitResult shape, history and
callbacks, the same losses as a plain full-batch Adam loop, pure steps, checkpoint/resume bit for bit, Ctrl-C,
early stopping, the divergence guard, torch's global RNG untouched and tensors on the data's dtype/device."""

from __future__ import annotations

import importlib.util
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
    edge_layers,
    negative_elbo,
    num_layers,
    synthetic_imputation_data,
)
from latentfit.integrations.vfg import TorchOps as GraphOps
from latentfit.integrations.vfg_engine import VFGEngine, VFGProblem, VFGResult, random_keep, validation_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.mark.slow  # compiles (about 30-60 s on a loaded 2-core machine; 10-13 s each at load 7)
@pytest.mark.parametrize("layerwise", [False, True])
def test_jax_flavour_through_the_driver_resumes_bit_for_bit(tmp_path: Any, layerwise: bool) -> None:
    pytest.importorskip("flowjax")
    from latentfit.integrations.vfg_jax import _engine_classes

    problem_cls, engine_cls = _engine_classes()
    before = torch.get_rng_state()
    spec = VFG(SYNTHETIC_STRUCTURE, backend="jax", hidden=8, blocks=1, layerwise=layerwise)
    engine = engine_cls(problem_cls(spec, _data()), num_epochs=4, batch_size=60, learning_rate=1e-2, progress=False,
                        seed=1)
    full = engine.run()
    assert isinstance(full, VFGResult) and full.num_iterations == 4 and full.compile_time > 0
    if layerwise:  # resumed below after epoch 2, mid-schedule: layers 1, 2 | 1, 2
        np.testing.assert_array_equal(full.history["layer"], [1, 2, 1, 2])
        assert full.state.adam_t == (2, 2) and full.state.epoch == 4
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
        np.testing.assert_array_equal(np.asarray(resumed.state.adam_v[n]), np.asarray(full.state.adam_v[n]))
    assert resumed.state.adam_t == full.state.adam_t
    assert torch.equal(before, torch.get_rng_state())
    x = _data()
    assert np.isfinite(np.asarray(full.impute(np.where(np.arange(8) == 2, np.nan, x)))).all()
    assert np.asarray(full.log_prob(x)).shape == (60,)


# -- layer-wise training ----------------------------------------------------------------------------------------------
#: three layers: the flows into node2 (layer 1), into node4 (2: node2's and the leaf [4, 5]'s), into the root (3)
DEEP = [[[[0, 1], [2, 3]], [4, 5]], [6, 7]]


def _layer_names(engine: VFGEngine, layer: int) -> set[str]:
    return set(engine.trained_names(layer, engine.model.param_edge))


def test_layerwise_updates_one_layer_per_epoch_bottom_up() -> None:
    spec = VFG(DEEP, hidden=8, blocks=1, identity_init=False, layerwise=2, masking=0.5)
    assert edge_layers(spec.graph) == [1, 1, 2, 2, 3, 3] and num_layers(spec.graph) == 3
    engine = VFGEngine(VFGProblem(spec, torch.as_tensor(_data())), num_epochs=7, batch_size=20, progress=False)
    names = {layer: _layer_names(engine, layer) for layer in (1, 2, 3)}
    assert set().union(*names.values()) == set(engine.model.param_edge) and sum(map(len, names.values())) == 36
    assert {n.split(".")[0] for n in names[2]} == {"2", "3"}  # edges 2 and 3 (node2 -> node4, [4, 5] -> node4)
    state = engine.init(engine.ops.key(0))
    assert state.adam_t == (0, 0, 0) and state.epoch == 0
    visited = []
    for k in range(1, 8):
        new, info = engine.step(state, k, None)
        layer = info.layer
        visited.append(layer)
        for n, w in new.weights.items():
            if n in names[layer]:  # every weight of the trained layer moves
                assert not torch.equal(w, state.weights[n]), (k, n)
            else:  # the frozen layers: weights and Adam moments bit for bit as they were
                assert torch.equal(w, state.weights[n]) and torch.equal(new.adam_m[n], state.adam_m[n]), (k, n)
                assert torch.equal(new.adam_v[n], state.adam_v[n]), (k, n)
        steps = [new.adam_t[i] - state.adam_t[i] for i in range(3)]  # each layer's own Adam step count
        assert steps == [3 if i + 1 == layer else 0 for i in range(3)] and new.epoch == k
        state = new
    assert visited == [1, 1, 2, 2, 3, 3, 1]  # bottom-up, 2 epochs per layer, then round again
    # the divergence guard's Adam restart touches the trained layer only
    m, v, t = engine._fresh_adam(state.adam_m, state.adam_v, state.adam_t, 2)
    assert t == (state.adam_t[0], 0, state.adam_t[2])
    for n in state.adam_m:
        zero = n in names[2]
        assert torch.equal(m[n], torch.zeros_like(m[n]) if zero else state.adam_m[n])
        assert torch.equal(v[n], torch.zeros_like(v[n]) if zero else state.adam_v[n])
    # through fit(): the history records the layer of each epoch; True = one epoch per layer
    fit = VFG(DEEP, hidden=8, blocks=1, layerwise=True).fit(_data(), num_epochs=4, batch_size=30, progress=False)
    np.testing.assert_array_equal(fit.history["layer"], [1, 2, 3, 1])
    assert "layer" not in _small().fit(_data(), num_epochs=1, batch_size=30, progress=False).history


def test_layerwise_on_a_dag_uses_topological_levels() -> None:
    # leaf b has two parents in different layers: p (height 1) and q (height 2, above p); its edge to q is in layer 2
    dag = {"a": [0, 1], "b": [2, 3], "p": ["a", "b"], "q": ["b", "p"]}
    spec = VFG(dag, hidden=8, blocks=1, identity_init=False, layerwise=True)
    names = {n.name: n.index for n in spec.graph.nodes}
    layer_of = dict(zip(spec.graph.edges, edge_layers(spec.graph)))
    assert layer_of == {(names["a"], names["p"]): 1, (names["b"], names["p"]): 1, (names["b"], names["q"]): 2,
                        (names["p"], names["q"]): 2}
    fit = spec.fit(_data()[:, :4], num_epochs=2, batch_size=30, progress=False)
    np.testing.assert_array_equal(fit.history["layer"], [1, 2])
    start = fit.engine.init(fit.engine.ops.key(0))  # the fit's initial state (seed 0)
    after_1, _ = fit.engine.step(start, 1, None)
    for n, w in after_1.weights.items():
        trained = layer_of[spec.graph.edges[fit.engine.model.param_edge[n]]] == 1
        assert torch.equal(w, start.weights[n]) != trained, n
    assert _states_equal(fit.engine.step(after_1, 2, None)[0].weights, fit.state.weights)


def test_layerwise_decreases_the_negative_elbo() -> None:
    # constant rate: a 4-epoch fit is the first 4 epochs of the 8-epoch one, so the objective is seen after layer 1's
    # block (epochs 1-4) and after layer 2's (5-8): each block lowers it
    x = _data(200)
    spec = VFG(SYNTHETIC_STRUCTURE, hidden=16, blocks=2, layerwise=4)
    kw = dict(batch_size=50, learning_rate=1e-2, lr_decay=False, progress=False)
    untrained = spec.fit(x, num_epochs=0, **kw)
    with pytest.warns(UserWarning, match=r"4 epochs never train layer\(s\) \[2\]"):
        half = spec.fit(x, num_epochs=4, **kw)
    full = spec.fit(x, num_epochs=8, **kw)
    nelbo = [f.negative_elbo(x) for f in (untrained, half, full)]
    assert nelbo[0] - 0.1 > nelbo[1] > nelbo[2] + 0.01, nelbo
    np.testing.assert_array_equal(full.history["loss"][:4], half.history["loss"])  # the same first 4 epochs
    assert full.history["loss"][-1] < full.history["loss"][0]

def test_layerwise_resume_mid_schedule_is_bit_identical(tmp_path: Any) -> None:
    # 2 epochs per layer, mini-batches, masked steps, held-out rows: interrupted after epoch 4, resumed from the
    # checkpoint of epoch 3 (layer 2's first epoch): the same fit bit for bit
    spec = VFG(SYNTHETIC_STRUCTURE, hidden=8, blocks=1, layerwise=2, masking=0.5)
    x = _data()
    kw = dict(num_epochs=7, batch_size=20, seed=2, progress=False, validation=0.2)
    full = spec.fit(x, **kw)
    np.testing.assert_array_equal(full.history["layer"], [1, 1, 2, 2, 1, 1, 2])

    def stop_at(k: int, info: Any) -> None:
        if k == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        spec.fit(x, checkpoint=tmp_path, checkpoint_every=3, callback=stop_at, **kw)
    resumed = spec.fit(x, checkpoint=tmp_path, checkpoint_every=3, resume=True, **kw)
    for n in full.history:
        np.testing.assert_array_equal(resumed.history[n], full.history[n])
    for field in ("weights", "adam_m", "adam_v", "best_weights"):
        assert _states_equal(getattr(resumed.state, field), getattr(full.state, field)), field
    assert resumed.state.adam_t == full.state.adam_t and resumed.state.epoch == full.state.epoch == 7
    assert torch.equal(resumed.state.key.get_state(), full.state.key.get_state())
    with pytest.raises(ValueError, match="layerwise"):  # the schedule is an option compared on resume
        VFG(SYNTHETIC_STRUCTURE, hidden=8, blocks=1, layerwise=3, masking=0.5).fit(
            x, checkpoint=tmp_path, resume=True, **kw)


def test_layerwise_bad_values_and_too_few_epochs() -> None:
    for bad in (-1, 1.5, "yes", None, [2]):
        with pytest.raises(ValueError, match="layerwise must be a bool or the number of epochs per layer"):
            VFG(SYNTHETIC_STRUCTURE, layerwise=bad)
    assert VFG(SYNTHETIC_STRUCTURE, layerwise=False).layerwise == VFG(SYNTHETIC_STRUCTURE, layerwise=0).layerwise == 0
    assert VFG(SYNTHETIC_STRUCTURE, layerwise=True).layerwise == 1 and VFG(DEEP, layerwise=np.int64(3)).layerwise == 3
    with pytest.warns(UserWarning, match=r"never train layer\(s\) \[3\]"):
        VFG(DEEP, hidden=8, blocks=1, layerwise=2).fit(_data(), num_epochs=5, batch_size=30, progress=False)


@pytest.mark.slow  # two compiles: 14-18 s at load 7-8 on the shared 2-core machine (JAX import included)
@pytest.mark.skipif(importlib.util.find_spec("flowjax") is None, reason="flowjax not installed")
def test_layerwise_step_agrees_across_flavours() -> None:
    # the same float64 weights in both flavours, one full batch per epoch, no masking: one epoch on layer 1 (layer 2
    # frozen), then one on layer 2; the JAX engine's weights equal the torch engine's to 1e-6 (measured: 1e-16)
    import jax

    from latentfit.integrations.vfg import TorchOps, VFGFit
    from latentfit.integrations.vfg_jax import _engine_classes, fit_from_torch

    structure = [[[0], [1]], [2, 3]]  # two layers: leaves -> node, then node and the leaf [2, 3] -> root
    x = _data(40)[:, :4]
    kw = dict(hidden=4, blocks=1, layerwise=True, identity_init=False)
    opts = dict(num_epochs=2, batch_size=40, learning_rate=5e-2, progress=False)
    torch_engine = VFGEngine(VFGProblem(VFG(structure, **kw), torch.as_tensor(x)), **opts)
    states = [torch_engine.init(torch_engine.ops.key(0))]
    for k in (1, 2):
        states.append(torch_engine.step(states[-1], k, None)[0])
    with jax.enable_x64(True):
        problem_cls, engine_cls = _engine_classes()
        problem = problem_cls(VFG(structure, backend="jax", **kw), x)
        jax_engine = engine_cls(problem, **opts)

        def as_jax(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
            fit = VFGFit(torch_engine.model.spec, torch_engine.flows_with(weights), TorchOps(), torch_engine.model.loc,
                         torch_engine.model.scale, [], 0.0)
            fit.dtype = torch.float64
            params, _ = problem._partition(fit_from_torch(fit).flows)
            return dict(zip(problem.names, jax.tree_util.tree_leaves(params)))

        state = jax_engine.init(jax.random.PRNGKey(0))._replace(weights=as_jax(states[0].weights))
        for k in (1, 2):
            state, info = jax_engine.step(state, k, None)
            ref, before = as_jax(states[k].weights), as_jax(states[k - 1].weights)
            assert info.layer == k and state.adam_t == states[k].adam_t == ((1, 0) if k == 1 else (1, 1))
            moved = set()
            for n, w in ref.items():
                assert state.weights[n].dtype == np.float64
                np.testing.assert_allclose(np.asarray(state.weights[n]), np.asarray(w), rtol=1e-6, atol=1e-6)
                if not np.array_equal(np.asarray(w), np.asarray(before[n])):
                    moved.add(problem.param_edge[n])
            assert moved == ({0, 1} if k == 1 else {2, 3})  # the layer's edges moved, the others did not
