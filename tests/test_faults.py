"""Faults survived (issue 13, item 5), on both backends.

* a NaN log-density at a proposal is a rejection, counted (info ``num_nonfinite``) and reported: a model that is NaN
  in a region of negligible posterior mass still reaches the exact MLE;
* a NaN M-step stops the fit with :class:`NonFiniteError` naming the parameter and the iteration, and a checkpoint
  of the last good state from which ``run(resume=...)`` continues to the fit that never failed;
* ``KeyboardInterrupt`` returns the last good state and the history so far, marked ``interrupted``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from backends import Backend
from reference_em import ml_random_intercept

from latentfit import NonFiniteError
from latentfit.checkpoint import checkpoint_files
from latentfit.inference.saem import SAEM

THRESHOLD = 1.5  # the NaN M-step fires once μ passes this value


def _tail_data() -> np.ndarray:
    """40 units × 20 observations; the largest unit mean is 2.98, 9 posterior sds (0.5/√20) below the NaN region
    b > 4 of ``nan_tail``, whose posterior mass is therefore < 1e-18 for every unit."""
    rng = np.random.default_rng(0)
    return rng.normal(2.0, 0.7, size=(40, 1)) + rng.normal(0, 0.5, size=(40, 20))


def test_nan_log_density_is_counted_and_reported(backend: Backend) -> None:
    y = _tail_data()
    with pytest.warns(RuntimeWarning, match=r"\d+ MCMC proposals had a NaN/inf log-density and were rejected"):
        fit = backend.fit("SAEM", backend.models.nan_tail, backend.tensor(y), num_iters=(10, 5), progress=False)
    counts = fit.history["num_nonfinite"]
    assert counts.shape == (15,) and fit.num_nonfinite == int(counts.sum()) > 0
    assert all(np.isfinite(v).all() for v in fit.params.values())


@pytest.mark.slow
def test_nan_log_density_still_reaches_the_mle(backend: Backend) -> None:
    y = _tail_data()
    assert y.mean(1).max() < backend.models.NAN_LIMIT - 9 * 0.5 / np.sqrt(20)
    with pytest.warns(RuntimeWarning, match=r"MCMC proposals had a NaN/inf log-density and were rejected"):
        fit = backend.fit("SAEM", backend.models.nan_tail, backend.tensor(y), num_iters=(60, 100), progress=False)
    assert fit.num_nonfinite > 0
    # the exact MLE (the NaN region holds no posterior mass) to SAEM's Monte-Carlo error: 3× the largest deviation
    # over seeds 0-5 (Pyro: 0.0018, 1.0%, 0.2%)
    mu, om2, s2 = ml_random_intercept(y)
    assert abs(fit.params["mu"] - mu) < 0.006
    assert abs(fit.params["omega"] ** 2 / om2 - 1) < 0.03
    assert abs(fit.params["sigma"] ** 2 / s2 - 1) < 0.006


def _saem(backend: Backend, y: np.ndarray, nan_m_step: bool = False, **options: Any) -> SAEM:
    """Core SAEM on the random-intercept model; ``nan_m_step``: the M-step of μ returns NaN once μ > THRESHOLD."""
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(y))
    if nan_m_step:
        clean_m_step = model.m_step
        xp = model.ops.xp

        def m_step(s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
            out = dict(clean_m_step(s, theta, num_units))
            out["mu"] = xp.where(theta["mu"] > THRESHOLD, out["mu"] * float("nan"), out["mu"])
            return out

        model.m_step = m_step
    kw = dict(num_iters=(30, 30), seed=3, progress=False, chunk_size=5, num_draws=10)
    kw.update(options)
    return SAEM(model, **kw)


def _assert_same(a: Any, b: Any) -> None:
    for name, value in a.params.items():
        np.testing.assert_array_equal(value, b.params[name])
    for name, value in a.history.items():
        np.testing.assert_array_equal(value, b.history[name], err_msg=name)


@pytest.mark.slow_on("numpyro")  # the Pyro case stays in the default suite
def test_nan_m_step_stops_with_a_checkpoint_to_resume(backend: Backend, tmp_path: Any) -> None:
    with_dir = backend.name == "pyro"  # Pyro: in the checkpoint directory given; NumPyro: in a temporary one
    y = _tail_data()[:12, :4]
    clean = _saem(backend, y).run(backend.key(3))
    assert clean.num_nonfinite == 0
    mu_path = clean.history["theta.mu"]
    bad = int(np.argmax(mu_path > THRESHOLD)) + 2  # θ after iteration j feeds the M-step of iteration j + 1
    assert 6 < bad < 55
    last_good = bad - 1  # inside a chunk of 5: its good iterations are kept (run again from the chunk's start)
    assert last_good % 5  # the fault is not at a chunk's start (the replay is exercised)
    directory = tmp_path / "ckpt" if with_dir else None
    with pytest.raises(NonFiniteError, match=rf"the value of parameter 'mu' is NaN/inf at iteration {bad}\b") as err:
        _saem(backend, y, nan_m_step=True).run(backend.key(3), checkpoint=directory, checkpoint_every=50)
    e = err.value
    assert (e.parameter, e.iteration, e.last_good_iteration) == ("mu", bad, last_good)
    assert str(e.checkpoint) in str(e) and f"ckpt-{last_good:06d}" in str(e.checkpoint)
    if with_dir:
        assert checkpoint_files(directory)[-1][0] == last_good
    # the last good state, returned as an interrupted result: finite, the clean run's numbers so far
    assert e.result.interrupted and e.result.num_iterations == last_good
    for name, value in e.result.history.items():
        np.testing.assert_array_equal(value, clean.history[name][:last_good], err_msg=name)
    # a run resumed from that checkpoint (here with the M-step fixed) is the fit that never failed
    resumed = _saem(backend, y).run(backend.key(3), resume=e.checkpoint)
    _assert_same(resumed, clean)


class _InterruptAt:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, k: int, record: dict[str, Any]) -> None:
        if k == self.k:
            raise KeyboardInterrupt


def test_keyboard_interrupt_returns_last_good_state(backend: Backend, tmp_path: Any) -> None:
    y = _tail_data()[:12, :4]
    clean = _saem(backend, y).run(backend.key(3))
    with pytest.warns(RuntimeWarning, match=r"interrupted.*after iteration 25 of 60.*checkpoint"):
        fit = _saem(backend, y, callback=_InterruptAt(23)).run(backend.key(3), checkpoint=tmp_path,
                                                               checkpoint_every=20)
    assert fit.interrupted and fit.num_iterations == 25 and "interrupted" in repr(fit)
    for name, value in fit.history.items():
        assert len(value) == 25
        np.testing.assert_array_equal(value, clean.history[name][:25], err_msg=name)
    for name, value in fit.params.items():
        np.testing.assert_array_equal(value, clean.history[f"theta.{name}"][24])
    assert [k for k, _ in checkpoint_files(tmp_path)] == [20, 25]
    _assert_same(_saem(backend, y).run(backend.key(3), checkpoint=tmp_path, resume=True), clean)


def test_keyboard_interrupt_inside_a_chunk_keeps_the_chunk_start(tmp_path: Any) -> None:
    """torch runs a chunk eagerly: an interrupt inside one returns the state at the chunk's start."""
    backend = Backend("pyro")
    y = _tail_data()[:12, :4]
    clean = _saem(backend, y).run(None)
    engine = _saem(backend, y)
    evaluate = engine.model.log_densities
    calls = {"n": 0}

    def log_densities(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 170:  # inside the third chunk (iterations 11-15), ~7 evaluations per iteration
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    engine.model.log_densities = log_densities
    with pytest.warns(RuntimeWarning, match="interrupted"):
        fit = engine.run(None, checkpoint=tmp_path)
    assert fit.interrupted and fit.num_iterations in (10, 20) and len(fit.history["theta.mu"]) == fit.num_iterations
    np.testing.assert_array_equal(fit.params["mu"], clean.history["theta.mu"][fit.num_iterations - 1])
    engine.model.log_densities = evaluate
    _assert_same(_saem(backend, y).run(None, checkpoint=tmp_path, resume=True), clean)


def test_em_family_chains_count_nan_proposals_too() -> None:
    """MCEM's persistent chains (the EM family's chain sweep) report the same count per epoch (Pyro: the counting
    is backend-neutral code, run on JAX by the SAEM tests above)."""
    from latentfit.inference.mcem import MCEM

    backend = Backend("pyro")

    model = backend.latent_model(backend.models.nan_tail, backend.tensor(_tail_data()))
    with pytest.warns(RuntimeWarning, match="NaN/inf log-density"):
        fit = MCEM(model, num_epochs=8, num_samples=4, progress=False).run(backend.key(0))
    assert fit.history["num_nonfinite"].shape == (8,) and fit.num_nonfinite > 0
    assert all(np.isfinite(v).all() for v in fit.params.values())


def test_nan_gradient_stops_mcmcsgd() -> None:
    """A NaN gradient (here: the log-joint is NaN once μ > THRESHOLD) is not zeroed away: the fit stops, naming a
    parameter and the first iteration whose gradient is NaN (Pyro; the driver's check is the one the JAX M-step test
    above runs)."""
    from latentfit.inference.mcmcsgd import MCMCSGD

    backend = Backend("pyro")

    y = _tail_data()[:12, :4]
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(y))
    clean_log_joint = model.log_joint
    xp = model.ops.xp

    def log_joint(theta: dict[str, Any], z: Any, units: Any = None) -> Any:
        value = clean_log_joint(theta, z, units)
        return value * xp.where(theta["mu"] > THRESHOLD, float("nan"), 1.0)

    options = dict(num_iters=60, burn_in=5, seed=1, progress=False, chunk_size=5, learning_rate=0.1)
    clean = MCMCSGD(model, **options).run(backend.key(1))
    names = clean.engine.names
    mu_path = clean.history["iterate"][:, names.index("mu")]  # μ is unconstrained: the iterate itself
    bad = int(np.argmax(mu_path > THRESHOLD)) + 2  # the gradient of iteration k is taken at the iterate of k - 1
    assert 6 < bad < 60
    model.log_joint = log_joint
    message = rf"the gradient of parameter '\w+' is NaN/inf at iteration {bad}\b"
    with pytest.raises(NonFiniteError, match=message) as err:
        MCMCSGD(model, **options).run(backend.key(1))
    e = err.value
    assert e.parameter == names[0] and e.result.num_iterations == e.last_good_iteration == bad - 1
    assert (bad - 1) % 5  # inside a chunk: its good iterations are kept
    np.testing.assert_array_equal(e.result.history["iterate"], clean.history["iterate"][:bad - 1])
    np.testing.assert_array_equal(e.result.history["theta.mu"], clean.history["theta.mu"][:bad - 1])


def test_nan_inside_a_chunk_keeps_the_iterations_before_it(backend: Backend, tmp_path: Any) -> None:
    """A fit that goes NaN at iteration k inside a chunk (MCMCSGD, plain SGD with a constant rate: its iterations do
    not depend on num_iters; the log-joint is NaN once μ > THRESHOLD) stops with the state after k − 1 — the
    chunk's good iterations are kept — and that state, history and checkpoint are those of the fit of k − 1
    iterations, bit for bit (torch's eager chunks and JAX's compiled ones alike)."""
    from latentfit.inference.mcmcsgd import MCMCSGD

    y = _tail_data()[:12, :4]
    model = backend.latent_model(backend.models.random_intercept, backend.tensor(y))
    clean_log_joint = model.log_joint
    xp = model.ops.xp

    def log_joint(theta: dict[str, Any], z: Any, units: Any = None) -> Any:
        return clean_log_joint(theta, z, units) * xp.where(theta["mu"] > THRESHOLD, float("nan"), 1.0)

    model.log_joint = log_joint
    options = dict(optimizer="sgd", learning_rate=lambda t: 0.02, burn_in=2, average_from=3, seed=0,
                   progress=False, chunk_size=5)
    with pytest.raises(NonFiniteError, match=r"parameter 'mu' is NaN/inf at iteration 13\b.*\(iteration 12\)") as err:
        MCMCSGD(model, num_iters=60, **options).run(backend.key(0), checkpoint=tmp_path / "ckpt")
    e = err.value
    assert (e.iteration, e.last_good_iteration, e.result.num_iterations) == (13, 12, 12)
    assert checkpoint_files(tmp_path / "ckpt")[-1][0] == 12 and "ckpt-000012" in str(e.checkpoint)
    short = MCMCSGD(model, num_iters=12, **options).run(backend.key(0))
    _assert_same(e.result, short)
    assert all(len(v) == 12 for v in e.result.history.values())
    # resumed from the checkpoint (with a finite model) it is the fit that never went NaN
    model.log_joint = clean_log_joint
    resumed = MCMCSGD(model, num_iters=60, **options).run(backend.key(0), resume=e.checkpoint)
    _assert_same(resumed, MCMCSGD(model, num_iters=60, **options).run(backend.key(0)))


def test_nan_m_step_after_resume_into_an_empty_directory(tmp_path: Any) -> None:
    """A run resumed from one directory and checkpointing into another (empty) one that fails in its first chunk
    still writes the last good state (the resumed-from iteration) where it checkpoints."""
    backend = Backend("pyro")
    y = _tail_data()[:12, :4]
    first = tmp_path / "first"
    clean = _saem(backend, y).run(None, checkpoint=first, checkpoint_every=5, keep=100)
    bad = int(np.argmax(clean.history["theta.mu"] > THRESHOLD)) + 2
    start = (bad - 1) // 5 * 5  # the fault comes in the first chunk after the checkpoint resumed from
    assert start > 0
    source = dict(checkpoint_files(first))[start]
    with pytest.raises(NonFiniteError) as err:
        _saem(backend, y, nan_m_step=True).run(None, resume=source, checkpoint=tmp_path / "second")
    assert err.value.last_good_iteration == bad - 1 > start
    assert checkpoint_files(tmp_path / "second")[-1][0] == bad - 1
    assert str(tmp_path / "second") in str(err.value)


@pytest.mark.parametrize("seed", range(6))
def test_stacked_chunk_records_are_checked_and_recorded_as_per_iteration_ones(seed):
    """A compiled chunk's records come stacked (iterations on axis 0): the driver finds the same first NaN/inf
    (iteration, parameter, gradient before value) and records the same history, entry by entry, as from the
    per-iteration records."""
    from latentfit.inference import driver
    from latentfit.inference.ops_jax import StackedInfos

    rng = np.random.default_rng(seed)
    n = 7
    stacked = {"objective": rng.normal(size=n), "acc": {"rw": rng.uniform(size=(n, 3)), "imh": rng.uniform(size=n)},
               "grad_nonfinite": {"mu": np.zeros(n), "omega": np.zeros(n)},
               "theta": {"mu": rng.normal(size=n), "omega": rng.uniform(size=(n, 2, 2)),
                         "count": np.arange(n)}}
    for _ in range(int(rng.integers(0, 4))):  # a few faults at random places, ties in one iteration included
        j = int(rng.integers(0, n))
        where = int(rng.integers(0, 3))
        if where == 0:
            stacked["grad_nonfinite"][["mu", "omega"][int(rng.integers(0, 2))]][j] = 1.0
        elif where == 1:
            stacked["theta"]["mu"][j] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
        else:
            stacked["theta"]["omega"][j, 1, 0] = np.nan
    records = StackedInfos(stacked, n)
    per_iteration = [records[j] for j in range(n)]
    assert records[-1]["acc"]["rw"].shape == (3,) and len(records[2:5]) == 3
    expected = driver._first_nonfinite(per_iteration, 10, _NumpyOps())
    assert driver._first_nonfinite(records, 10, _NumpyOps()) == expected
    h_one: dict = {}
    for info in per_iteration:
        driver._append_history(h_one, info, _NumpyOps())
    h_all: dict = {}
    driver._extend_history(h_all, stacked, n)
    assert list(h_all) == list(h_one)
    for name in h_one:
        assert [np.shape(v) for v in h_all[name]] == [np.shape(v) for v in h_one[name]]
        np.testing.assert_array_equal(np.stack(h_all[name]), np.stack(h_one[name]))


class _NumpyOps:
    @staticmethod
    def to_numpy(x: Any) -> np.ndarray:
        return np.asarray(x)


class _StopAfter(SAEM):
    """SAEM that ends early once ``after`` chunks are recorded (the ``stopped`` hook, as VFG's early stopping)."""

    def __init__(self, *args: Any, after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.calls = after, 0

    def stopped(self, state: Any) -> bool:
        self.calls += 1  # once at the start, then once per recorded chunk
        return self.calls > self.after


def test_jax_chunks_dispatched_ahead_are_recorded_in_order(monkeypatch: Any) -> None:
    """On JAX the driver dispatches chunk j + 1 before it reads chunk j's records (``JaxOps.dispatches_ahead``).  The
    fit, its history, an early stop (the chunk dispatched after the stopping one is dropped) and a NaN M-step's error
    and last good state are those of the driver that records each chunk before the next (bit for bit)."""
    from latentfit.inference.ops_jax import JaxOps

    backend = Backend("numpyro")
    y = _tail_data()[:12, :4]

    def runs() -> tuple[Any, Any, Any]:
        model = backend.latent_model(backend.models.random_intercept, backend.tensor(y))
        stopping = _StopAfter(model, after=3, num_iters=(30, 30), seed=3, progress=False, chunk_size=5, num_draws=10)
        with pytest.raises(NonFiniteError) as err:
            _saem(backend, y, nan_m_step=True).run(backend.key(3))
        return _saem(backend, y).run(backend.key(3)), stopping.run(backend.key(3)), err.value

    clean, stopped, error = runs()
    monkeypatch.setattr(JaxOps, "dispatches_ahead", False)
    clean_in_turn, stopped_in_turn, error_in_turn = runs()
    _assert_same(clean, clean_in_turn)
    _assert_same(stopped, stopped_in_turn)
    assert stopped.num_iterations == 15 and len(stopped.history["theta.mu"]) == 15
    np.testing.assert_array_equal(stopped.params["mu"], clean.history["theta.mu"][14])
    assert (error.iteration, error.last_good_iteration) == (error_in_turn.iteration, error_in_turn.last_good_iteration)
    # the last good state is the iteration before the fault (inside its chunk of 5), the clean run's numbers
    assert error.last_good_iteration == error.iteration - 1 and error.last_good_iteration % 5
    _assert_same(error.result, error_in_turn.result)
    for name, value in error.result.history.items():
        np.testing.assert_array_equal(value, clean.history[name][:error.last_good_iteration], err_msg=name)
