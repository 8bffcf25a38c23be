"""latentfit.optim: AMSGrad / OPT-AMSGrad / HWA on torch and optax against NumPy references of their rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from latentfit.optim import (
    HWA,
    AMSGrad,
    OptAMSGrad,
    amsgrad,
    hwa,
    hwa_averaged,
    hwa_variance,
    opt_amsgrad,
    pyro_hwa,
    pyro_hwa_averages,
)

jax.config.update("jax_enable_x64", True)

SHAPES = {"a": (3,), "b": (2, 2)}


def _grad_sequence(n: int, seed: int = 0, growing: bool = False) -> list[dict[str, np.ndarray]]:
    """``growing``: g_t = (1 + 0.3 t) c, so every |g_t| grows; else random draws shrinking like 1/(1 + t/2)."""
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    if growing:
        return [{k: (1.0 + 0.3 * t) * c for k, c in base.items()} for t in range(n)]
    return [{k: rng.normal(size=s) / (1.0 + 0.5 * t) for k, s in SHAPES.items()} for t in range(n)]


def _init_params(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


# ---------------------------------------------------------------- NumPy references of the documented rules


def _ref_amsgrad_torch(w, grads, lr, b1, b2, eps):
    """torch: max over the uncorrected v, bias correction afterwards, ε outside the root."""
    m, v, vmax, out = 0.0, 0.0, 0.0, []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        w = w - lr / (1 - b1**t) * m / (np.sqrt(vmax / (1 - b2**t)) + eps)
        out.append(w)
    return out


def _ref_amsgrad_optax(w, grads, lr, b1, b2, eps):
    """optax: max over the bias-corrected v, ε outside the root."""
    m, v, vmax, out = 0.0, 0.0, 0.0, []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v / (1 - b2**t))
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(vmax) + eps)
        out.append(w)
    return out


def _ref_predict(hist: list[np.ndarray], predictor: str, span: int, reg: float) -> np.ndarray:
    if predictor == "last" or len(hist) < span:
        return hist[-1]
    if predictor == "mean":
        return np.mean(hist, axis=0)
    x = np.stack([h.ravel() for h in hist])
    u = np.diff(x, axis=0)
    gram = u @ u.T
    gram = gram / np.linalg.norm(gram, 2)
    z = np.linalg.solve(gram + reg * np.eye(len(gram)), np.ones(len(gram)))
    return ((z / z.sum()) @ x[:-1]).reshape(hist[-1].shape)


def _ref_opt_amsgrad(w0, grad_fn, n, lr, b1, b2, eps, predictor="last", span=5, reg=1e-3, second_moment="grad"):
    """Algorithm 2 (as recalled, see OptAMSGrad's docstring): θ, v, v̂ (v̂_0 = ε), auxiliary w_{t+1/2}, optimistic
    w_{t+1} with h_{t+1} = β1 θ_{t-1} + (1-β1) m_{t+1}; v from g_t² or, as in the authors' code, (g_t - m_t)²."""
    w, half = w0.copy(), w0.copy()
    theta, v, vhat, hist, out = np.zeros_like(w0), np.zeros_like(w0), np.full_like(w0, eps), [], []
    m = np.zeros_like(w0)  # m_1 = 0: the prediction of g_1
    for t in range(n):
        g = grad_fn(w, t)
        theta_prev = theta
        theta = b1 * theta + (1 - b1) * g
        e = g - m if second_moment == "residual" else g
        v = b2 * v + (1 - b2) * e * e
        vhat = np.maximum(vhat, v)
        half = half - lr * theta / np.sqrt(vhat)
        hist = (hist + [g])[-span:]
        m = _ref_predict(hist, predictor, span, reg)
        h = b1 * theta_prev + (1 - b1) * m
        w = half - lr * h / np.sqrt(vhat)
        out.append(w)
    return out


def _quad_grad(centres: dict[str, np.ndarray]):
    """g_t(w) = D (w - c) + a deterministic perturbation: gradients depend on the iterate."""
    rng = np.random.default_rng(7)
    noise = [{k: 0.3 * rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(200)]
    diag = {k: np.linspace(0.5, 4.0, int(np.prod(s))).reshape(s) for k, s in SHAPES.items()}

    def grad(key: str, w: np.ndarray, t: int) -> np.ndarray:
        return diag[key] * (w - centres[key]) + noise[t][key]

    return grad


# ---------------------------------------------------------------- AMSGrad


def test_torch_amsgrad_is_torch_adam_amsgrad_and_its_rule():
    w0, grads = _init_params(), _grad_sequence(30)
    kw = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    p1 = [torch.tensor(w0[k], requires_grad=True) for k in SHAPES]
    p2 = [torch.tensor(w0[k], requires_grad=True) for k in SHAPES]
    o1, o2 = AMSGrad(p1, **kw), torch.optim.Adam(p2, amsgrad=True, **kw)
    assert isinstance(o1, torch.optim.Adam) and o1.defaults["amsgrad"]
    refs = {k: _ref_amsgrad_torch(w0[k], [g[k] for g in grads], 0.05, 0.9, 0.99, 1e-8) for k in SHAPES}
    for t, g in enumerate(grads):
        for ps in (p1, p2):
            for p, k in zip(ps, SHAPES):
                p.grad = torch.tensor(g[k])
        o1.step()
        o2.step()
        for a, b, k in zip(p1, p2, SHAPES):
            assert torch.equal(a, b)
            np.testing.assert_allclose(a.detach().numpy(), refs[k][t], rtol=0, atol=1e-12)


def _run_optax(tx, w0, grads):
    params = {k: jnp.asarray(v) for k, v in w0.items()}
    state, out = tx.init(params), []
    for g in grads:
        upd, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, upd)
        out.append({k: np.asarray(v) for k, v in params.items()})
    return out


def _run_torch_amsgrad(w0, grads, **kw):
    ps = [torch.tensor(w0[k], requires_grad=True) for k in SHAPES]
    opt, out = AMSGrad(ps, **kw), []
    for g in grads:
        for p, k in zip(ps, SHAPES):
            p.grad = torch.tensor(g[k])
        opt.step()
        out.append({k: p.detach().numpy().copy() for p, k in zip(ps, SHAPES)})
    return out


def test_optax_amsgrad_rule_and_where_it_differs_from_torch():
    """optax keeps max(v_t/(1-β2^t)), torch max(v_t)/(1-β2^t): equal while the max is the current step
    (growing gradients), different once gradients shrink. Each matches the NumPy reference of its own rule."""
    w0 = _init_params()
    lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8
    for growing in (True, False):
        grads = _grad_sequence(30, growing=growing)
        got_optax = _run_optax(amsgrad(lr, b1=b1, b2=b2, eps=eps), w0, grads)
        got_torch = _run_torch_amsgrad(w0, grads, lr=lr, betas=(b1, b2), eps=eps)
        for k in SHAPES:
            gk = [g[k] for g in grads]
            ref_o = _ref_amsgrad_optax(w0[k], gk, lr, b1, b2, eps)
            ref_t = _ref_amsgrad_torch(w0[k], gk, lr, b1, b2, eps)
            for t in range(len(grads)):
                np.testing.assert_allclose(got_optax[t][k], ref_o[t], rtol=0, atol=1e-12)
                np.testing.assert_allclose(got_torch[t][k], ref_t[t], rtol=0, atol=1e-12)
            gap = max(np.abs(got_optax[t][k] - got_torch[t][k]).max() for t in range(len(grads)))
            if growing:
                assert gap < 1e-12
            else:
                assert gap > 1e-4


# ---------------------------------------------------------------- OPT-AMSGrad


@pytest.mark.parametrize(
    "predictor,span,lr,second_moment",
    [("last", 5, 0.05, "grad"), ("mean", 3, 0.05, "grad"), ("extrapolation", 4, 0.02, "grad"),
     ("last", 5, 0.05, "residual"), ("extrapolation", 4, 0.02, "residual")],
)
def test_opt_amsgrad_torch_and_optax_equal_the_paper_rule(predictor, span, lr, second_moment):
    b1, b2, eps, reg, n = 0.9, 0.99, 1e-8, 1e-3, 40
    w0 = _init_params()
    centres = _init_params(seed=5)
    grad = _quad_grad(centres)
    refs = {
        k: _ref_opt_amsgrad(w0[k], lambda w, t, k=k: grad(k, w, t), n, lr, b1, b2, eps, predictor, span, reg,
                            second_moment)
        for k in SHAPES
    }
    # torch
    ps = {k: torch.tensor(w0[k], requires_grad=True) for k in SHAPES}
    opt = OptAMSGrad(ps.values(), lr=lr, betas=(b1, b2), eps=eps, predictor=predictor, span=span, reg=reg,
                     second_moment=second_moment)
    for t in range(n):
        for k, p in ps.items():
            p.grad = torch.tensor(grad(k, p.detach().numpy(), t))
        opt.step()
        for k, p in ps.items():
            np.testing.assert_allclose(p.detach().numpy(), refs[k][t], rtol=0, atol=1e-12)
    # optax
    tx = opt_amsgrad(lr, b1=b1, b2=b2, eps=eps, predictor=predictor, span=span, reg=reg, second_moment=second_moment)
    params = {k: jnp.asarray(v) for k, v in w0.items()}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(n):
        g = {k: jnp.asarray(grad(k, np.asarray(params[k]), t)) for k in SHAPES}
        upd, state = step(g, state, params)
        params = optax.apply_updates(params, upd)
        for k in SHAPES:
            np.testing.assert_allclose(np.asarray(params[k]), refs[k][t], rtol=0, atol=1e-12)
    # the optimism matters: without the h-step the iterates would be the auxiliary ones
    assert not np.allclose(np.asarray(state.half["a"]), np.asarray(params["a"]))


def test_opt_amsgrad_schedule_uses_eta_t_and_eta_t_plus_1():
    sched = optax.linear_schedule(0.1, 0.01, 20)
    tx = opt_amsgrad(sched, b1=0.5, b2=0.9, eps=1e-8)
    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    g = jnp.array([0.3, -0.7])
    upd, state = tx.update(g, state, w)
    # t = 1: θ_1 = (1-β1) g, v̂_1 = max(ε, (1-β2) g²), w_{3/2} = w_1 - η_1 θ_1/√v̂_1, h_2 = (1-β1) g (θ_0 = 0)
    theta, vhat = 0.5 * g, jnp.maximum(1e-8, 0.1 * g * g)
    eta1, eta2 = sched(jnp.asarray(0, jnp.int32)), sched(jnp.asarray(1, jnp.int32))  # as optax calls a schedule
    assert float(eta1) != float(eta2)
    expected = w - eta1 * theta / jnp.sqrt(vhat) - eta2 * 0.5 * g / jnp.sqrt(vhat)
    np.testing.assert_allclose(np.asarray(w + upd), np.asarray(expected), rtol=0, atol=1e-12)


def _iterations_to(step_fn, tol: float, maxit: int = 2000) -> int:
    for it in range(1, maxit + 1):
        if step_fn() < tol:
            return it
    raise AssertionError("target loss not reached")


QUAD_H = np.logspace(0, 2, 10)  # ill-conditioned quadratic f(w) = ½ Σ h_i w_i², condition number 100


def _torch_iterations(cls, lr, **kw) -> int:
    h = torch.tensor(QUAD_H)
    w = torch.ones(10, dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=lr, **kw)

    def step() -> float:
        opt.zero_grad()
        (0.5 * (h * w * w).sum()).backward()
        opt.step()
        with torch.no_grad():
            return float(0.5 * (h * w * w).sum())

    return _iterations_to(step, 1e-6)


def _optax_iterations(tx) -> int:
    h = jnp.asarray(QUAD_H)
    loss = lambda w: 0.5 * jnp.sum(h * w * w)  # noqa: E731
    w = jnp.ones(10)
    state = tx.init(w)

    @jax.jit
    def one(w, state):
        upd, state = tx.update(jax.grad(loss)(w), state, w)
        w = optax.apply_updates(w, upd)
        return w, state, loss(w)

    box = {"w": w, "state": state}

    def step() -> float:
        box["w"], box["state"], value = one(box["w"], box["state"])
        return float(value)

    return _iterations_to(step, 1e-6)


def test_opt_amsgrad_accelerates_amsgrad_on_an_ill_conditioned_quadratic():
    """Deterministic gradients vary slowly, so the predicted gradient is good: at the same learning rate 0.01
    OPT-AMSGrad reaches f < 1e-6 in far fewer iterations than AMSGrad (counts pinned; both backends agree)."""
    lr = 0.01
    n_ams_torch = _torch_iterations(AMSGrad, lr)
    n_opt_torch = _torch_iterations(OptAMSGrad, lr)
    n_ext_torch = _torch_iterations(OptAMSGrad, lr, predictor="extrapolation", span=4, reg=1e-6)
    n_ams_optax = _optax_iterations(amsgrad(lr))
    n_opt_optax = _optax_iterations(opt_amsgrad(lr))
    n_ext_optax = _optax_iterations(opt_amsgrad(lr, predictor="extrapolation", span=4, reg=1e-6))
    print(
        "iterations AMSGrad / OPT-AMSGrad(last) / OPT-AMSGrad(extrapolation):",
        n_ams_torch,
        n_opt_torch,
        n_ext_torch,
        "| optax:",
        n_ams_optax,
        n_opt_optax,
        n_ext_optax,
    )
    assert (n_ams_torch, n_opt_torch, n_ext_torch) == (327, 114, 83)
    assert n_opt_optax == n_opt_torch and n_ext_optax == n_ext_torch
    assert n_opt_optax < n_ams_optax / 2


# ---------------------------------------------------------------- HWA


def test_torch_hwa_equals_running_means_of_snapshots_and_swaps():
    every, n = 3, 17
    w0 = _init_params()
    ps = [torch.tensor(w0[k], requires_grad=True) for k in SHAPES]
    opt = HWA(torch.optim.SGD(ps, lr=0.1, momentum=0.5), every=every)
    grad = _quad_grad(_init_params(seed=5))
    snaps: dict[str, list[np.ndarray]] = {k: [] for k in SHAPES}
    for k_step in range(n):
        for p, k in zip(ps, SHAPES):
            p.grad = torch.tensor(grad(k, p.detach().numpy(), k_step))
        opt.step()
        if k_step % every == 0:  # snapshots after steps 1, every + 1, 2 every + 1, ...
            for p, k in zip(ps, SHAPES):
                snaps[k].append(p.detach().numpy().copy())
    assert opt.n_averaged == len(snaps["a"]) == 6
    means, variances = opt.averaged(), opt.variances()
    for p, k in zip(ps, SHAPES):
        np.testing.assert_allclose(means[p].numpy(), np.mean(snaps[k], axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(variances[p].numpy(), np.var(snaps[k], axis=0), rtol=0, atol=1e-12)
    current = [p.detach().clone() for p in ps]
    with opt.averaged_parameters():
        for p, k in zip(ps, SHAPES):
            np.testing.assert_allclose(p.detach().numpy(), np.mean(snaps[k], axis=0), rtol=0, atol=1e-12)
        with pytest.raises(RuntimeError):
            opt.step()
    for p, c in zip(ps, current):
        assert torch.equal(p.detach(), c)
    state = opt.state_dict()
    opt2 = HWA(torch.optim.SGD(ps, lr=0.1, momentum=0.5), every=every)
    opt2.load_state_dict(state)
    assert opt2.n_averaged == 6 and torch.equal(opt2.averaged()[ps[0]], means[ps[0]])


def test_optax_hwa_equals_running_means_of_snapshots():
    every, n = 4, 19
    w0 = _init_params()
    grad = _quad_grad(_init_params(seed=5))
    tx = hwa(optax.sgd(0.1, momentum=0.5), every=every)
    params = {k: jnp.asarray(v) for k, v in w0.items()}
    state = tx.init(params)
    ref_params = {k: jnp.asarray(v) for k, v in w0.items()}
    ref_tx = optax.sgd(0.1, momentum=0.5)
    ref_state = ref_tx.init(ref_params)
    snaps: dict[str, list[np.ndarray]] = {k: [] for k in SHAPES}
    for k_step in range(n):
        g = {k: jnp.asarray(grad(k, np.asarray(params[k]), k_step)) for k in SHAPES}
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
        ref_upd, ref_state = ref_tx.update(g, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_upd)
        if k_step % every == 0:
            for k in SHAPES:
                snaps[k].append(np.asarray(params[k]))
    mean, var = hwa_averaged(state), hwa_variance(state)
    assert int(state.n) == len(snaps["a"]) == 5
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(ref_params[k]))  # updates untouched
        np.testing.assert_allclose(np.asarray(mean[k]), np.mean(snaps[k], axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(var[k]), np.var(snaps[k], axis=0), rtol=0, atol=1e-12)
    # found inside a larger state as well
    assert hwa_averaged((0, (params, state))) is state.mean


# ---------------------------------------------------------------- SVI on a conjugate normal model

X_DATA = np.random.default_rng(3).normal(1.5, 1.0, size=20)
POST_MEAN, POST_SD = X_DATA.sum() / (len(X_DATA) + 1), (1.0 / (len(X_DATA) + 1)) ** 0.5  # μ ~ N(0,1), x ~ N(μ,1)


def _pyro_svi(optim, steps: int):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    x = torch.tensor(X_DATA)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_scale=1.0)
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=4))
    losses = [svi.step() for _ in range(steps)]
    return losses, guide


def test_pyro_svi_with_opt_amsgrad_and_hwa():
    import pyro

    losses, guide = _pyro_svi(pyro.optim.PyroOptim(OptAMSGrad, {"lr": 0.05}), 300)
    assert np.mean(losses[-50:]) < np.mean(losses[:10]) - 5.0
    assert abs(float(guide.locs.mu.detach()) - POST_MEAN) < 0.1
    optim = pyro_hwa(OptAMSGrad, {"lr": 0.05}, every=5)
    losses, guide = _pyro_svi(optim, 300)
    assert np.mean(losses[-50:]) < np.mean(losses[:10]) - 5.0
    avg = pyro_hwa_averages(optim)
    assert set(avg) == {"AutoNormal.locs.mu", "AutoNormal.scales.mu"}
    assert all(isinstance(o, HWA) and o.n_averaged == 60 for o in optim.optim_objs.values())
    # the averages include the early transient, so only a loose check against the exact posterior
    assert abs(float(avg["AutoNormal.locs.mu"][0]) - POST_MEAN) < 0.2
    assert 0.3 * POST_SD < float(avg["AutoNormal.scales.mu"][0]) < 3.0 * POST_SD
    assert float(avg["AutoNormal.locs.mu"][1]) > 0.0


def test_numpyro_svi_with_opt_amsgrad_and_hwa():
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    x = jnp.asarray(X_DATA)

    def model():
        mu = numpyro.sample("mu", ndist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ndist.Normal(mu, 1.0), obs=x)

    guide = AutoNormal(model, init_scale=1.0)
    svi = SVI(model, guide, hwa(opt_amsgrad(0.05), every=5), Trace_ELBO(num_particles=4))
    result = svi.run(jax.random.PRNGKey(0), 400, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.mean(losses[-50:]) < np.mean(losses[:10]) - 5.0
    assert abs(float(result.params["mu_auto_loc"]) - POST_MEAN) < 0.1
    avg = hwa_averaged(result.state)  # unconstrained: the scale is stored as its log
    assert abs(float(avg["mu_auto_loc"]) - POST_MEAN) < 0.2
    assert 0.3 * POST_SD < float(jnp.exp(avg["mu_auto_scale"])) < 3.0 * POST_SD
    assert float(hwa_variance(result.state)["mu_auto_loc"]) > 0.0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make",
    [
        lambda p: AMSGrad(p, lr=-1e-3),
        lambda p: AMSGrad(p, lr=float("nan")),
        lambda p: AMSGrad(p, betas=(1.0, 0.999)),
        lambda p: OptAMSGrad(p, lr=float("inf")),
        lambda p: OptAMSGrad(p, betas=(0.9, -0.1)),
        lambda p: OptAMSGrad(p, eps=0.0),
        lambda p: OptAMSGrad(p, predictor="median"),
        lambda p: OptAMSGrad(p, predictor="mean", span=1),
        lambda p: HWA(torch.optim.SGD(p, lr=0.1), every=0),
        lambda p: HWA(torch.optim.SGD(p, lr=0.1), every=1.5),
        lambda p: amsgrad(-0.1),
        lambda p: amsgrad(0.1, b2=1.0),
        lambda p: opt_amsgrad(float("nan")),
        lambda p: opt_amsgrad(0.1, b1=1.2),
        lambda p: opt_amsgrad(0.1, predictor="extrapolation", span=1),
        lambda p: opt_amsgrad(0.1, second_moment="prediction"),
        lambda p: OptAMSGrad(p, second_moment="g2"),
        lambda p: hwa(optax.sgd(0.1), every=0),
        lambda p: hwa(optax.sgd(0.1), every=-3),
    ],
)
def test_bad_input_raises_value_error(make):
    with pytest.raises(ValueError):
        make([torch.zeros(2, requires_grad=True)])


def test_optax_update_without_params_raises():
    for tx in (opt_amsgrad(0.1), hwa(optax.sgd(0.1))):
        state = tx.init(jnp.zeros(2))
        with pytest.raises(ValueError, match="params"):
            tx.update(jnp.ones(2), state)
