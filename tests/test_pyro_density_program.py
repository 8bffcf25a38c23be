"""The plain Pyro path's density evaluation (issue 10 item 6): its speed-ups compute the same values bit for bit.

* ``PyroPPL.log_prob`` evaluates a Normal (alone, ``.to_event``, ``.mask``-ed) on its compact scale: equal to
  ``fn.log_prob`` element for element (scalar, per-dim and full scales; masks; a non-Normal left to the distribution);
* the recorded density program drops its no-op views (``_pruned``): fewer nodes, the same outputs and gradients.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
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
