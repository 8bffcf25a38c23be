# ruff: noqa: E501  (the docstring pastes the printed table, wider than the line limit)
"""MISSO-VI on a Bayesian neural network (issue 11, item 5): negative ELBO per epoch against MC-SAG, MC-Adam, BBB and Pyro SVI.

    python benchmarks/misso_vi_bnn.py [--full] [--epochs E] [--seed 0] [--threads 1] [--block-eval auto|mask|block]
                                      [--methods MISSO,Adam,...] [--ppl pyro|numpyro]

What it measures
----------------
scikit-learn's bundled ``load_digits`` (1797 8×8 images, 10 classes; pixels / 16), split 80/20 (seed 0): 1437
training, 360 test images.  The model is an ordinary Pyro model, a Bayesian neural network 64-64-10 (tanh hidden
layer, softmax output) with N(0, 1) priors on all 4810 weights and biases, the data in ``pyro.plate("data", N)``
(indexed by the plate's indices, so the same model also runs mini-batched by ``subsample_size``); the guide is
Pyro's ``AutoNormal`` (mean-field Gaussian, locs started at N(0, 1/fan_in), biases 0, scales 0.01), 9620
variational parameters.

Methods, all from the same start, each for ``E`` epochs over blocks / mini-batches of 128 images (12 per epoch):

* ``MISSO`` / ``MC-SAG`` / ``MC-Adam`` / ``BBB``: ``latentfit.pyro.MISSOVI(model, guide, block_size=128,
  method=..., learning_rate=γ)`` with the paper's ``M_k = k`` Monte-Carlo draws in epoch k (§7: MISSO = the
  minimiser of the summed quadratic surrogates, MC-SAG its gradient-table twin, MC-Adam Adam on the fresh block
  gradient, BBB plain SGD on it); γ is per method (below), chosen on a short grid at seed 0;
* ``Adam`` / ``AMSGrad`` / ``OPT-AMSGrad`` / ``HWA``: what a Pyro user writes, ``pyro.infer.SVI(model, guide,
  optim, Trace_ELBO())`` on random mini-batches (``subsample_size=128``: Pyro rescales the batch by N/128), one
  draw per step, ``torch.optim.Adam``, ``latentfit.optim.AMSGrad`` / ``OptAMSGrad`` and ``latentfit.optim.pyro_hwa``
  (HWA around Adam, one snapshot per epoch; its row is evaluated at the *averaged* variational parameters).

Reported: the full negative ELBO (``Trace_ELBO`` with 10 draws on all 1437 images, same evaluator for every
method) at the start and after epochs 1, 5, 10, ..., the test accuracy of the posterior predictive (mean of the
softmax over 32 draws of the guide) at the end, and the wall time (training and the per-epoch evaluations).

``--ppl numpyro`` runs the same model, guide, start, blocks and step sizes in NumPyro (``latentfit.numpyro``'s
``MISSOVI``; ``numpyro.infer.SVI`` with ``optax.adam``, ``latentfit.optim.amsgrad`` / ``opt_amsgrad`` /
``hwa``); its times include JAX compilation, which dominates at this size.  One run, ``--ppl numpyro --epochs 5``
(same machine, load ≈ 12)::

    method            lr       e=0       e=1       e=5 test acc    time
    -------------------------------------------------------------------
    MISSO          3e-02   23188.3   21262.8   20222.0    0.931   162.4
    MC-SAG         1e-02   23188.3   20715.6   19813.1    0.964    62.4
    MC-Adam        3e-02   23188.3   18582.6   11547.9    0.958    47.3
    BBB            1e-02   23188.3   22070.7   19844.9    0.956    56.3
    Adam           3e-02   23151.2   18563.0   11578.4    0.961    67.0
    AMSGrad        3e-02   23151.2   18695.2   12073.8    0.956    25.7
    OPT-AMSGrad    3e-02   23151.2   18321.7    3654.6    0.892    23.7
    HWA            3e-02   23151.2   22660.4   16502.6    0.947    24.7

(the Pyro rows at e=5 agree within Monte-Carlo noise, except OPT-AMSGrad's fast phase, 3655 vs 4529; optax's
AMSGrad takes the maximum of the bias-corrected v and so departs from Adam, torch's does not.)

``--block-eval`` chooses how MISSOVI evaluates a block's gradient: ``mask`` runs model and guide over all N
images with the likelihood masked outside the block (the general rule, cost ∝ N), ``block`` substitutes the
block's indices for the data plate's (cost ∝ block size; needs a model that indexes its data by the plate, as
this one does), ``auto`` (default) checks the substitution and uses it when it is exact.

Figures (default run, ``--seed 0``, 10 epochs; 2 CPU cores shared with many other jobs, load average ≈ 15, so
the times are noisy; torch on one thread)
---------------------------------------------------------------------------------------------------------------
::

    negative ELBO (all training images, 10 draws) after epoch e; test accuracy (posterior predictive); wall time (s)
    method            lr       e=0       e=1       e=5      e=10 test acc    time
    -----------------------------------------------------------------------------
    MISSO          3e-02   23165.3   21250.5   20237.1   19959.2    0.944    27.9
    MC-SAG         1e-02   23165.3   20730.1   19828.2   19487.5    0.969    23.2
    MC-Adam        3e-02   23165.3   18566.6   11591.5    4803.6    0.942    21.7
    BBB            1e-02   23165.3   21039.5   19840.0   19530.5    0.936    16.8
    Adam           3e-02   23153.0   18615.4   11611.3    5295.9    0.906    12.9
    AMSGrad        3e-02   23153.0   18615.4   11611.3    5295.9    0.906     6.1
    OPT-AMSGrad    3e-02   23153.0   20875.6    4528.8    3381.1    0.853     7.0
    HWA            3e-02   23153.0   22464.3   16526.4   12376.9    0.958     6.1

(e=0 differs between the MISSOVI rows and the SVI rows only by the Monte-Carlo noise of the 10-draw evaluator:
MISSOVI reports its own ``history["loss"]``, drawn on its seed.)

Findings.  The negative ELBO of this model is dominated by the KL term of 4810 weights whose guide scales start at
0.01: most of the decrease is the log-scales growing by several units.  The steps that divide by a running
gradient magnitude (MC-Adam, Adam, AMSGrad, OPT-AMSGrad) move every log-scale at ≈ lr per step and get there;
MISSO, MC-SAG and BBB take steps proportional to the raw gradient, whose log-scale components are O(1/n) per
block, and after 10 epochs have closed only 15 % of the gap (at the largest stable step of the grid: MISSO
diverges at γ = 0.1).  Among them MC-SAG ≈ BBB < MISSO in neg-ELBO (the MISSO step averages anchors up to an
epoch old).  OPT-AMSGrad reaches the lowest neg-ELBO (no bias correction and v̂_0 = ε: its first steps are ≈ 3 lr); AMSGrad equals
Adam here (in 120 steps torch's uncorrected v is still growing, 1 − β2^t ≈ 0.11, so its maximum never binds).  HWA's average includes the early iterates, so it
trails Adam in neg-ELBO while its test accuracy is the best of the SVI rows.  MISSOVI's rows cost ≈ 2-4× the SVI
rows: they use M_k = k draws per gradient (55 per block over 10 epochs, plus the initial table pass) where SVI uses
one.  Block evaluation: with ``--block-eval mask`` the MISSO and MC-SAG trajectories are identical (same numbers)
and took 29.7 / 26.9 s instead of 27.9 / 23.2 s; one block gradient (1 draw) costs ≈ 28 ms masked (all 1437
images) vs ≈ 25 ms substituted (128 images): at this size Pyro's per-trace overhead, not the data, dominates.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from latentfit.integrations.misso_vi_pyro import MISSOVI  # noqa: E402
from latentfit.optim import AMSGrad, OptAMSGrad, pyro_hwa  # noqa: E402

HIDDEN = 64
BATCH = 128
EVAL_PARTICLES = 10
PRED_DRAWS = 32
#: step sizes: the best of a short grid at seed 0, 3 epochs (MISSO {1e-2, 3e-2, 1e-1: diverges}, MC-SAG {1e-2,
#: 3e-2}, BBB {5e-3, 1e-2}, MC-Adam {1e-2, 3e-2}); the Adam family shares MC-Adam's 3e-2
LR = {"MISSO": 3e-2, "MC-SAG": 1e-2, "MC-Adam": 3e-2, "BBB": 1e-2,
      "Adam": 3e-2, "AMSGrad": 3e-2, "OPT-AMSGrad": 3e-2, "HWA": 3e-2}
MISSO_METHODS = {"MISSO": "misso", "MC-SAG": "mc-sag", "MC-Adam": "mc-adam", "BBB": "bbb"}


# ----- data, model, guide -------------------------------------------------------------------------------------
def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    f = torch.float32
    return {"x": torch.tensor(Xtr, dtype=f), "y": torch.tensor(ytr), "x_test": torch.tensor(Xte, dtype=f),
            "y_test": torch.tensor(yte)}


def forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Logits of the 64-64-10 network (tanh hidden layer)."""
    return torch.tanh(x @ w1 + b1) @ w2 + b2


def bnn_model(x: torch.Tensor, y: torch.Tensor | None = None, subsample_size: int | None = None) -> None:
    """Bayesian 64-64-10 network, N(0, 1) priors; the data plate's indices pick the images (mini-batches)."""
    n, d = x.shape
    zero = torch.zeros((), dtype=x.dtype)
    w1 = pyro.sample("w1", dist.Normal(zero, 1.0).expand([d, HIDDEN]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(zero, 1.0).expand([HIDDEN]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(zero, 1.0).expand([HIDDEN, 10]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(zero, 1.0).expand([10]).to_event(1))
    with pyro.plate("data", n, subsample_size=subsample_size) as idx:
        logits = forward(x[idx], w1, b1, w2, b2)
        pyro.sample("obs", dist.Categorical(logits=logits), obs=None if y is None else y[idx])


def make_guide(seed: int) -> AutoNormal:
    gen = torch.Generator().manual_seed(seed)

    def init_loc(site: dict) -> torch.Tensor:
        shape = site["fn"].shape()
        if len(shape) == 2:
            return torch.randn(shape, generator=gen) / math.sqrt(shape[0])
        return torch.zeros(shape)

    return AutoNormal(bnn_model, init_loc_fn=init_loc, init_scale=0.01)


# ----- evaluation ---------------------------------------------------------------------------------------------
class Evaluator:
    """The full negative ELBO (fixed draws) and the posterior-predictive test accuracy of a guide."""

    def __init__(self, data: dict[str, torch.Tensor], seed: int) -> None:
        self.data, self.seed = data, seed
        self.elbo = Trace_ELBO(num_particles=EVAL_PARTICLES)

    def neg_elbo(self, guide: AutoNormal) -> float:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(self.seed + 12345)
            return float(self.elbo.loss(bnn_model, guide, self.data["x"], self.data["y"]))

    def accuracy(self, guide: AutoNormal) -> float:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(self.seed + 54321)
            prob = 0.0
            for _ in range(PRED_DRAWS):
                w = guide(self.data["x"], self.data["y"])
                prob = prob + torch.softmax(forward(self.data["x_test"], w["w1"], w["b1"], w["w2"], w["b2"]), -1)
            return float((prob.argmax(-1) == self.data["y_test"]).double().mean())


# ----- runners ------------------------------------------------------------------------------------------------
def run_misso(name: str, data: dict, epochs: int, seed: int, block_eval: str, ev: Evaluator) -> dict:
    pyro.clear_param_store()
    guide = make_guide(seed)
    guide(data["x"], data["y"])  # create the params (same start for every method)
    curve: list[float] = [ev.neg_elbo(guide)]
    t0 = time.perf_counter()
    fit = MISSOVI(bnn_model, guide, block_size=BATCH, method=MISSO_METHODS[name], learning_rate=LR[name],
                  num_epochs=epochs, seed=seed, loss_particles=EVAL_PARTICLES, block_eval=block_eval
                  ).run(data["x"], data["y"])
    wall = time.perf_counter() - t0
    curve = [float(v) for v in fit.history["loss"]]  # the same estimator (10 draws, all data), MISSOVI's seed
    return {"curve": curve, "acc": ev.accuracy(guide), "time": wall, "eval": fit.extra.get("block_eval", "mask")}


def run_svi(name: str, data: dict, epochs: int, seed: int, ev: Evaluator) -> dict:
    pyro.clear_param_store()
    guide = make_guide(seed)
    guide(data["x"], data["y"])
    lr = LR[name]
    steps = -(-len(data["y"]) // BATCH)
    if name == "Adam":
        optim = pyro.optim.Adam({"lr": lr})
    elif name == "AMSGrad":
        optim = pyro.optim.PyroOptim(AMSGrad, {"lr": lr})
    elif name == "OPT-AMSGrad":
        optim = pyro.optim.PyroOptim(OptAMSGrad, {"lr": lr})
    else:
        optim = pyro_hwa(torch.optim.Adam, {"lr": lr}, every=steps)
    svi = SVI(bnn_model, guide, optim, Trace_ELBO())
    curve = [ev.neg_elbo(guide)]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    for _ in range(epochs):
        for _ in range(steps):
            svi.step(data["x"], data["y"], subsample_size=BATCH)
        if name == "HWA":
            for opt in optim.optim_objs.values():
                opt.swap()
            curve.append(ev.neg_elbo(guide))
            for opt in optim.optim_objs.values():
                opt.swap()
        else:
            curve.append(ev.neg_elbo(guide))
    wall = time.perf_counter() - t0
    if name == "HWA":
        for opt in optim.optim_objs.values():
            opt.swap()
    return {"curve": curve, "acc": ev.accuracy(guide), "time": wall, "eval": "-"}


# ----- the NumPyro twin (--ppl numpyro) ------------------------------------------------------------------------
def numpyro_rows(names: list[str], data: dict, epochs: int, seed: int) -> dict:
    """The same model, guide (AutoNormal, same starting locs), blocks and step sizes in NumPyro: MISSOVI (its block
    gradients jit-compiled over a block mask) and ``numpyro.infer.SVI`` with optax ``adam``, ``latentfit.optim``'s
    ``amsgrad`` / ``opt_amsgrad`` / ``hwa(adam)``; times include JAX compilation."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    import optax
    from numpyro.infer import SVI as NSVI
    from numpyro.infer import Predictive
    from numpyro.infer import Trace_ELBO as NTrace_ELBO
    from numpyro.infer.autoguide import AutoNormal as NAutoNormal
    from numpyro.infer.initialization import init_to_value

    from latentfit.integrations.misso_vi_numpyro import MISSOVI as NMISSOVI
    from latentfit.optim import amsgrad, hwa, hwa_averaged, opt_amsgrad

    def model(x, y=None, subsample_size=None):
        n, d = x.shape
        w1 = numpyro.sample("w1", ndist.Normal(0.0, 1.0).expand([d, HIDDEN]).to_event(2))
        b1 = numpyro.sample("b1", ndist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1))
        w2 = numpyro.sample("w2", ndist.Normal(0.0, 1.0).expand([HIDDEN, 10]).to_event(2))
        b2 = numpyro.sample("b2", ndist.Normal(0.0, 1.0).expand([10]).to_event(1))
        with numpyro.plate("data", n, subsample_size=subsample_size) as idx:
            logits = jnp.tanh(x[idx] @ w1 + b1) @ w2 + b2
            numpyro.sample("obs", ndist.Categorical(logits=logits), obs=None if y is None else y[idx])

    gen = torch.Generator().manual_seed(seed)  # the Pyro rows' starting locs, drawn in the same order
    d = data["x"].shape[1]
    init = {}
    for name, shape in (("w1", (d, HIDDEN)), ("b1", (HIDDEN,)), ("w2", (HIDDEN, 10)), ("b2", (10,))):
        init[name] = (jnp.asarray((torch.randn(shape, generator=gen) / math.sqrt(shape[0])).numpy()) if len(shape) == 2
                      else jnp.zeros(shape))
    x, y = jnp.asarray(data["x"].numpy()), jnp.asarray(data["y"].numpy())
    x_te, y_te = jnp.asarray(data["x_test"].numpy()), np.asarray(data["y_test"].numpy())
    steps = -(-len(y) // BATCH)
    elbo = NTrace_ELBO(num_particles=EVAL_PARTICLES)
    key_eval = jax.random.PRNGKey(seed + 12345)

    def guide_new():
        return NAutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)

    def accuracy(guide, params):
        draws = Predictive(guide, params=params, num_samples=PRED_DRAWS)(jax.random.PRNGKey(seed + 54321), x, y)
        logits = jnp.tanh(x_te @ draws["w1"] + draws["b1"][:, None]) @ draws["w2"] + draws["b2"][:, None]
        prob = jax.nn.softmax(logits, -1).mean(0)
        return float(np.mean(np.asarray(prob.argmax(-1)) == y_te))

    rows = {}
    for name in names:
        guide = guide_new()
        t0 = time.perf_counter()
        if name in MISSO_METHODS:
            fit = NMISSOVI(model, guide, block_size=BATCH, method=MISSO_METHODS[name], learning_rate=LR[name],
                           num_epochs=epochs, seed=seed, loss_particles=EVAL_PARTICLES).run(jax.random.PRNGKey(seed), x, y)
            wall = time.perf_counter() - t0
            rows[name] = {"curve": [float(v) for v in fit.history["loss"]], "acc": accuracy(guide, fit.params),
                          "time": wall, "eval": "mask"}
            continue
        lr = LR[name]
        if name == "Adam":
            tx = optax.adam(lr)
        elif name == "AMSGrad":
            tx = amsgrad(lr)
        elif name == "OPT-AMSGrad":
            tx = opt_amsgrad(lr)
        else:
            tx = hwa(optax.adam(lr), every=steps)
        svi = NSVI(lambda xx, yy: model(xx, yy, subsample_size=BATCH), guide, tx, NTrace_ELBO())
        state = svi.init(jax.random.PRNGKey(seed), x, y)
        update = jax.jit(svi.update)

        def current(state, svi=svi, averaged=(name == "HWA")):
            return svi.constrain_fn(hwa_averaged(state.optim_state)) if averaged else svi.get_params(state)

        curve = [float(elbo.loss(key_eval, svi.get_params(state), model, guide, x, y))]
        for _ in range(epochs):
            for _ in range(steps):
                state, _ = update(state, x, y)
            curve.append(float(elbo.loss(key_eval, current(state), model, guide, x, y)))
        wall = time.perf_counter() - t0
        rows[name] = {"curve": curve, "acc": accuracy(guide, current(state)), "time": wall, "eval": "-"}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="50 epochs (default: 10)")
    ap.add_argument("--epochs", type=int, default=None, help="number of epochs (overrides --full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--block-eval", default="auto", choices=("auto", "mask", "block"),
                    help="how MISSOVI evaluates a block (see the docstring)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the rows")
    ap.add_argument("--ppl", default="pyro", choices=("pyro", "numpyro"), help="the PPL of the model and guide")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    epochs = a.epochs if a.epochs is not None else (50 if a.full else 10)
    data = load_data(0)
    ev = Evaluator(data, a.seed)
    names = list(LR) if a.methods is None else [m.strip() for m in a.methods.split(",")]
    print(f"load_digits: {len(data['y'])} training / {len(data['y_test'])} test images; BNN 64-{HIDDEN}-10, "
          f"{64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10} weights; blocks / mini-batches of {BATCH}; {epochs} epochs; "
          f"seed {a.seed}; torch threads {a.threads}")
    cols = [0] + [e for e in range(1, epochs + 1) if e == 1 or e % 5 == 0]
    if epochs not in cols:
        cols.append(epochs)
    rows = numpyro_rows(names, data, epochs, a.seed) if a.ppl == "numpyro" else {}
    for name in names if a.ppl == "pyro" else []:
        if name in MISSO_METHODS:
            rows[name] = run_misso(name, data, epochs, a.seed, a.block_eval, ev)
        else:
            rows[name] = run_svi(name, data, epochs, a.seed, ev)
    for name in names:
        r = rows[name]
        print(f"  {name:12s} done in {r['time']:.1f} s (block evaluation: {r['eval']})", flush=True)
    print("\nnegative ELBO (all training images, 10 draws) after epoch e; test accuracy (posterior predictive); "
          "wall time (s)")
    head = f"{'method':12s} {'lr':>7s} " + " ".join(f"{'e=' + str(c):>9s}" for c in cols) + f" {'test acc':>8s} {'time':>7s}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:12s} {LR[name]:7.0e} " + " ".join(f"{r['curve'][c]:9.1f}" for c in cols)
              + f" {r['acc']:8.3f} {r['time']:7.1f}")


if __name__ == "__main__":
    main()
