"""The plain Pyro path's density evaluation (issue 10 item 6): its speed-ups compute the same values bit for bit.

* ``PyroPPL.log_prob`` evaluates a Normal (alone, ``.to_event``, ``.mask``-ed) on its compact scale: equal to
  ``fn.log_prob`` element for element (scalar, per-dim and full scales; masks; a non-Normal left to the distribution);
* the recorded density program drops its no-op views and gathers rows with ``index_select`` (``_pruned``): fewer
  nodes, the same outputs and gradients;
* the one-chain program rewritten to run all chains stacked (``batched_program``) equals its per-chain replay, values
  and gradients, on every rule of the rewrite and on the Pyro gallery; ops without a rule make it refuse, and the
  adapter then replays per chain.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from latentfit.integrations.pyro import PyroLatentModel, PyroPPL, _pruned


def _cases() -> list[tuple[object, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(7, 5, generator=g, dtype=torch.float64)
    loc = torch.randn(7, 5, generator=g, dtype=torch.float64)
    sd = torch.rand(7, 5, generator=g, dtype=torch.float64) + 0.1
    a = torch.tensor(0.7, dtype=torch.float64)
    omega = torch.tensor([0.3, 1.2, 2.5, 0.9, 0.05], dtype=torch.float64)
    mask = torch.rand(7, 5, generator=g) > 0.3
    return [
        (dist.Normal(loc, a), y),  # scalar scale expanded to every element
        (dist.Normal(loc, omega), y),  # one scale per column, expanded over rows
        (dist.Normal(loc, sd), y),  # a full scale: nothing to compact
        (dist.Normal(0.0, omega).to_event(1), y),  # latent style
        (dist.Normal(loc, a).mask(mask), y),
        (dist.Normal(loc, omega).mask(mask[:, 0:1]).to_event(1), y),
        (dist.Normal(loc[:, :1], a), y),  # value wider than the batch shape
        (torch.distributions.Normal(loc, a), y),
        (dist.StudentT(3.0, loc, a), y),  # not a Normal: the distribution's own log_prob
    ]


def test_compact_normal_log_prob_is_the_distributions_bit_for_bit():
    ppl = PyroPPL()
    for fn, value in _cases():
        fast, ref = ppl.log_prob(fn, value), fn.log_prob(value)
        assert fast.shape == ref.shape, type(fn).__name__
        assert torch.equal(fast, ref), type(fn).__name__


def _rows_model(subject, time, conc=None):
    mu = pyro.param("mu", torch.tensor([0.5, -1.0], dtype=torch.float64))
    omega = pyro.param("omega", torch.ones(2, dtype=torch.float64), constraint=dist.constraints.positive)
    a = pyro.param("a", torch.tensor(0.5, dtype=torch.float64), constraint=dist.constraints.positive)
    with pyro.plate("id", int(subject.max()) + 1):
        b = pyro.sample("b", dist.Normal(mu, omega).to_event(1))
    level, slope = b[subject].unbind(-1)
    with pyro.plate("obs", len(time)):
        pyro.sample("y", dist.Normal(level + slope * time, a), obs=conc)


def test_pruned_program_drops_views_and_keeps_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    subject = torch.arange(6).repeat_interleave(4)
    time = torch.rand(24, generator=g, dtype=torch.float64)
    conc = torch.randn(24, generator=g, dtype=torch.float64)
    pyro.clear_param_store()
    model = PyroLatentModel(_rows_model, (subject, time, conc))
    theta = model.init_params()
    z = model.sample_prior(theta, model.ops.key(0), 3)
    names = tuple(theta)

    def flat(x, *v):
        return model._densities_one(dict(zip(names, v)), x)

    vals = [theta[n] for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(flat, (z[0], *vals), check_trace=False, strict=False)
    pruned = _pruned(traced)
    assert pruned is not traced
    count = lambda f: sum(1 for n in f.graph.nodes() if n.kind() != "prim::Constant")  # noqa: E731
    assert count(pruned) < count(traced)
    kinds = [n.kind() for n in pruned.graph.nodes()]
    assert "aten::index_select" in kinds and "aten::index" not in kinds  # b[subject]
    for c in range(z.shape[0]):
        grads = []
        for f in (traced, pruned):
            v = [t.detach().clone().requires_grad_(True) for t in vals]
            ll, lp = f(z[c], *v)
            (ll.sum() + lp.sum()).backward()
            grads.append(([ll.detach(), lp.detach()], [t.grad for t in v]))
        (out_t, g_t), (out_p, g_p) = grads
        assert all(torch.equal(a, b) for a, b in zip(out_t, out_p))
        assert all(torch.equal(a, b) for a, b in zip(g_t, g_p))


# ----- one replay for all chains (latentfit/integrations/batched_program.py) ---------------------------------
def _replay(chain_map, batched: bool, theta: dict, z: torch.Tensor, *rest: torch.Tensor):
    """``chain_map(theta, z, *rest)`` with the batched program on or off: the outputs and the gradients of a fixed
    random weighting of them in θ and in z."""
    chain_map.batch_chains = batched
    th = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in theta.items()}
    zz = z.detach().clone().requires_grad_(True)
    out = chain_map(th, zz, *rest)
    flat = list(out.values()) if isinstance(out, dict) else list(out)
    g = torch.Generator().manual_seed(3)
    total = sum((o * torch.rand(o.shape, generator=g, dtype=o.dtype)).sum() for o in flat)
    leaves = [zz, *[v for v in th.values() if v.requires_grad]]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [o.detach() for o in flat], [torch.zeros_like(v) if d is None else d for v, d in zip(leaves, grads)]


def _pyro_gallery() -> list[str]:
    from test_gallery import ENTRIES

    return sorted(n for n, e in ENTRIES.items() if "pyro" in e.backends)


@pytest.mark.parametrize("name", _pyro_gallery())
def test_batched_replay_equals_per_chain_replay_on_the_gallery(name):
    """Every Pyro gallery model: the densities (all units, and a mini-batch of units passed as an argument), the
    residual sums and the predictions of 4 chains, replayed once over the stacked chains, equal the per-chain
    evaluation (the one-chain recording replayed per chain, or eager where it is refused), values and gradients in
    θ and in z, to 1e-12; the batched program is the one used wherever the per-chain recording is."""
    from backends import Backend
    from test_gallery import ENTRIES, _args

    entry, b = ENTRIES[name], Backend("pyro")
    pyro.clear_param_store()
    model = b.latent_model(entry.model(b), *_args(b, entry, entry.data()))
    rng = np.random.default_rng(0)
    theta_u = model.unconstrain(model.init_params())
    theta = model.constrain({k: v + b.tensor(0.3 * rng.standard_normal(tuple(v.shape))) for k, v in theta_u.items()})
    z = b.tensor(0.5 * rng.standard_normal((4, model.num_units, model.latent_dim)))
    units = torch.as_tensor(np.sort(rng.choice(model.num_units, max(2, model.num_units // 3), replace=False)))
    maps = [(model._densities_all, z, ())]
    if model.batch_path:  # the model runs on a mini-batch alone (plate subsampling)
        maps.append((model._densities_batch, z[:, units], (units,)))
    if model._resid:
        maps.append((model._resid_all, z, ()))
    if model.has_gaussian_obs:
        maps.append((model._predict_all, z, ()))
    batched = 0
    for chain_map, zz, rest in maps:
        (out_b, grad_b), (out_c, grad_c) = (_replay(chain_map, flag, theta, zz, *rest) for flag in (True, False))
        # batch-safe wherever the per-chain recording is used (the MultivariateNormal models' recordings are refused:
        # torch's MVN log_prob records its log(2π) as a float32 constant, 3e-8 from the eager value)
        assert any(chain_map.programs.values()) or not any(chain_map.graphs.values()), f"{name}: not batched"
        batched += bool(any(chain_map.programs.values()))
        for got, want in zip(out_b + grad_b, out_c + grad_c):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert batched >= len(maps) - (2 if name in ("mvn_slope", "mixed_shapes") else 0)
    pyro.clear_param_store()


_IDX = torch.tensor([0, 2, 2, 1, 4, 3, 0])
_L = torch.tensor([[1.0, 0.0, 0.0], [0.3, 2.0, 0.0], [-0.5, 0.1, 0.7]], dtype=torch.float64)
#: one-chain programs of ``x [5, 3]`` (the chain input) and ``w [4, 3]`` (the same for every chain), each exercising a
#: rule of the rewrite: dims written from the end, unit dims after the chain dim, recorded shapes with the chain count,
#: gathers, scatters, lists, linear algebra
_BATCH_SAFE = {
    "gather, full sum": lambda x, w: (x[_IDX] * w[0]).sum(),
    "index_add of a vector": lambda x, w: torch.zeros(5, dtype=x.dtype).index_add(0, _IDX, x[_IDX, 0] * w[1, 0]),
    "index_add of rows": lambda x, w: torch.zeros(5, 3, dtype=x.dtype).index_add(0, _IDX, x[_IDX].exp()),
    "stack, reshape": lambda x, w: torch.stack([x[:, 0], x[:, 1].exp()], -1).reshape(-1),
    "broadcast to a higher rank, positive dims": lambda x, w: (x.unsqueeze(1) - w).pow(2).sum((1, 2)),
    "lower-rank operand": lambda x, w: x.sum(0) * w,
    "matmul": lambda x, w: x @ w.T,
    "t, triangular solve": lambda x, w: torch.linalg.solve_triangular(_L, x.t(), upper=False).pow(2).sum(0),
    "cat with data, logsumexp": lambda x, w: torch.cat([x, w[:1].expand(x.shape[0], -1)], 1).logsumexp(1),
    "movedim, flatten, narrow": lambda x, w: x.movedim(0, 1).flatten().narrow(0, 2, 6),
    "where, masked_fill": lambda x, w: torch.where(x > 0, x, w[0]).masked_fill(x < -1, 0.0),
    "Bernoulli log-density": lambda x, w: -torch.nn.functional.binary_cross_entropy_with_logits(
        x, (w[:1] > 0).to(x.dtype).expand(5, 3), reduction="none"),
    "data gathered by per-chain indices": lambda x, w: w[(x > 0).long().sum(-1)],
    "unbind, permute": lambda x, w: sum(x.unsqueeze(-1).permute(2, 0, 1).unbind(1)),
}
#: not batch-safe: an op without a rule, a per-chain value gathered by per-chain indices
_NOT_BATCH_SAFE = {
    "sort": lambda x, w: x.sort(-1).values * w[0],
    "per-chain indices into per-chain values": lambda x, w: x[(x > 0).long().sum(-1)],
}


def _record(f, x, w):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(f, (x, w), check_trace=False, strict=False)


@pytest.mark.parametrize("name", list(_BATCH_SAFE))
def test_batched_program_equals_per_chain_replay(name):
    """Each rule of the rewrite: the one-chain recording rewritten for 3 chains equals its replay chain by chain,
    values and gradients in x and w, to 1e-12."""
    from latentfit.integrations.batched_program import batched_program

    g = torch.Generator().manual_seed(5)
    xs = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    recorded = _record(_BATCH_SAFE[name], xs[0], w)
    program = batched_program(recorded, 3)
    assert program is not None, name
    results = []
    for run in (lambda x, v: program(x, v), lambda x, v: torch.stack([recorded(c, v) for c in x])):
        x, v = xs.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = run(x, v)
        weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(6), dtype=out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), [x, v], allow_unused=True)
        results.append([out.detach(), *[torch.zeros(1) if d is None else d for d in grads]])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_NOT_BATCH_SAFE))
def test_batched_program_refuses_ops_that_are_not_batch_safe(name):
    from latentfit.integrations.batched_program import batched_program

    x, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert batched_program(_record(_NOT_BATCH_SAFE[name], x, w), 3) is None


def _sorted_model(subject, time, conc=None):
    """``_rows_model`` with its two latents read in sorted order: ``sort`` has no batching rule."""
    mu = pyro.param("mu", torch.tensor([0.5, -1.0], dtype=torch.float64))
    omega = pyro.param("omega", torch.ones(2, dtype=torch.float64), constraint=dist.constraints.positive)
    a = pyro.param("a", torch.tensor(0.5, dtype=torch.float64), constraint=dist.constraints.positive)
    with pyro.plate("id", int(subject.max()) + 1):
        b = pyro.sample("b", dist.Normal(mu, omega).to_event(1))
    level, slope = b.sort(-1).values[subject].unbind(-1)
    with pyro.plate("obs", len(time)):
        pyro.sample("y", dist.Normal(level + slope * time, a), obs=conc)


def test_adapter_falls_back_to_per_chain_replay_when_not_batch_safe():
    """A model with an op the rewrite has no rule for (``sort``): the adapter replays the one-chain recording per chain
    (its batched program is refused, the per-chain recording used), with the densities of the eager evaluation; the
    same model without it is batched."""
    g = torch.Generator().manual_seed(2)
    subject = torch.arange(6).repeat_interleave(4)
    time = torch.rand(24, generator=g, dtype=torch.float64)
    conc = torch.randn(24, generator=g, dtype=torch.float64)
    for model_fn, batched in ((_sorted_model, False), (_rows_model, True)):
        pyro.clear_param_store()
        model = PyroLatentModel(model_fn, (subject, time, conc))
        theta = model.init_params()
        z = model.sample_prior(theta, model.ops.key(0), 3)
        ll, lp = model.log_densities(theta, z)
        chain_map = model._densities_all
        assert any(chain_map.programs.values()) is batched
        assert any(chain_map.graphs.values()) is not batched
        eager = [model._densities_one(theta, c) for c in z]
        assert torch.equal(ll, torch.stack([e[0] for e in eager]))
        assert torch.equal(lp, torch.stack([e[1] for e in eager]))
    pyro.clear_param_store()


def _logistic_mixed(t, c, idx, num, y=None):
    beta = pyro.param("beta", torch.zeros(3, dtype=torch.float64))
    omega = pyro.param("omega", 0.5 * torch.ones(3, dtype=torch.float64), constraint=dist.constraints.positive)
    with pyro.plate("id", num):
        phi = pyro.sample("phi", dist.Normal(beta, omega).to_event(1))
    p = phi[idx]
    with pyro.plate("obs", len(t)):
        pyro.sample("y", dist.Bernoulli(logits=p[:, 0] + p[:, 1] * t + p[:, 2] * c), obs=y)


def test_ten_chains_of_a_mid_sized_program_replay_batched():
    """MISSO's 10 chains on the logistic mixed model of benchmarks/mcmcsgd_logistic.py (400 units x 15 rows: 180 000
    elements over the chains, above the former 2**17 cap) run as one batched replay, equal to the per-chain replay to
    1e-12, values and gradients (the sums over rows run per chain in another order: not bit for bit)."""
    g = torch.Generator().manual_seed(0)
    num, n = 400, 15
    idx = torch.arange(num).repeat_interleave(n)
    t = torch.linspace(-8.0, 0.0, n, dtype=torch.float64).repeat(num)
    c = 2.0 * torch.randn(num * n, generator=g, dtype=torch.float64)
    y = (torch.rand(num * n, generator=g, dtype=torch.float64) < 0.3).to(torch.float64)
    pyro.clear_param_store()
    model = PyroLatentModel(_logistic_mixed, (t, c, idx, num, y))
    theta = model.init_params()
    z = 0.5 * torch.randn(10, num, 3, generator=g, dtype=torch.float64)
    chain_map = model._densities_all
    (out_b, grad_b), (out_c, grad_c) = (_replay(chain_map, flag, theta, z) for flag in (True, False))
    # the table's key holds the chains' shape: the 10-chain signature's entry is the batched program
    assert [bool(v) for k, v in chain_map.programs.items() if k[2][0] == 10] == [True], "not batched"
    for got, want in zip(out_b + grad_b, out_c + grad_c):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    pyro.clear_param_store()
