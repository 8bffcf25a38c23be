"""Density on scikit-learn's digits (8 × 8 = 64 dims): a tree VFG against a RealNVP and a VAE (issue 12).

Protocol (one process, the same data for every model):

* data: ``load_digits`` (1797 images, pixels 0…16), shuffled with seed 0, the last 20 % (360 images) held
  out as the test set; uniform dequantisation ``y = (x + u) / 17``, ``u ~ U(0, 1)^64`` (one fixed draw per
  image), so ``y`` lies in ``(0, 1)^64``; 10 % of the training images held out for early stopping (the
  same rows for every model: the VFG's own ``validation`` split, reproduced); every model standardises the
  columns with the training mean and sd and reports densities of ``y`` itself (the ``−Σ log s_c``
  change of variables included).
* metric: test negative log-likelihood in nats per dimension of ``y`` (per image = 64 ×; add
  ``log 17 = 2.833`` nats to get a bound on the NLL per pixel of the 17-level integer image), the weights of
  the epoch with the best validation loss, and the training time in CPU seconds of this process (one torch
  thread by default: about the wall time on an idle core, whatever else loads the machine).
* models, about the same number of parameters (the VFG's; the peers' widths are solved for it):

  - **VFG**: the tree ``[[q00, q01], [q10, q11]]`` over the four 4 × 4 quadrants (16 pixels each), two
    half-image nodes and a root, every node 16-D; 6 edges × ``blocks`` Pyro affine couplings (width
    ``hidden``); Gaussian leaves with σ on the standardised scale (the model has no learned σ), β-ELBO
    training (β = 0.1, the paper's density setting, and β = 1, the ELBO that is reported); a second row per
    fit re-estimates σ per column after training (:func:`vfg_log_prob_column_sigma`).  Its number is
    ``−fit.log_prob(y)``: the paper's ELBO with β = 1 and deterministic states — the entropy of q is dropped, so
    it is *not* a guaranteed bound on ``log p(y)``, and the model is a 64 → 16 autoencoder (flows keep the
    dimension; aggregation averages).
  - **RealNVP**: the same flow library and the same coupling as the VFG's edges (Pyro ``AffineCoupling`` on
    32 + 32 coordinates, its log-scale bounded smoothly by ``2·tanh(u/2)`` and its conditioner's last layer
    started at zero, :class:`SoftClampHyper`; a fixed random ``Permute`` between blocks, standard-normal base):
    an exact density.  With Pyro's default coupling instead (hard clamp of the log-scale at 3, random init), one
    validation image (of 144: its pixel (6, 0), on the left edge, is 8/16, where 1291 of the 1294 training images
    have 0 and none more than 3: 21.5 training sd out) went through the last couplings 17 → 45 → 496 → 5.8·10⁴
    (scale up to ×20 and a ReLU shift net extrapolating linearly) and scored 3·10⁷ nats/pixel from epoch 4 while the
    median was ordinary, so early stopping kept epoch 2 (test −0.707).  The bound alone still lets that image reach
    80-320 nats/pixel from epoch 4 (selection: epoch 3, test −0.794), the zero init alone 10⁸-10¹¹; both together
    (as the VFG) keep it at 8-97 nats/pixel over the first 16 epochs (10³-10⁶ later, as the flow overfits), and the
    mean rule's epoch (10, test −0.986) agrees with a trimmed mean's (2 images off each end: epoch 17, −0.988) and
    the median's (epoch 17 or 21, −0.988 / −0.948) within 0.04; the best test value of any of the first 25 epochs is
    −1.006.
  - **VAE**: 16-D latent (the VFG root's dimension), MLP encoder/decoder (2 hidden ReLU layers), Gaussian
    decoder with a learned sd per pixel; reported as the test ELBO (a bound) and the importance-weighted
    estimate with K samples (IWAE, a tighter bound, → log p as K → ∞).
  - **Gaussian**: the full-covariance maximum-likelihood Gaussian (closed form, a reference).

Model selection, the same rule for every trained model: the weights of the epoch with the lowest mean validation
loss (each model's training objective on the 144 held-out rows).  The RealNVP's row also prints its validation
median and worst image at that epoch.

Measured (150 epochs, one process, 3 min 24 s wall, 117 s CPU, load 3.8-4.8 on a shared 2-core machine), test NLL
per pixel / training CPU s: VFG β = 0.1 −0.144 / 45 (σ_c: −0.269), β = 1 −0.196 / 49 (σ_c: −0.335); RealNVP
(8 couplings, width 91, best epoch 10) −0.986 / 13.5; VAE (width 222) ELBO −0.838, IWAE (K = 500) −0.859 / 5.8;
Gaussian full covariance −0.791, independent −0.490.  The RealNVP is the best model, the VAE second; VFG loses to
every peer, the independent-pixel Gaussian included, at 3.5× the RealNVP's CPU time.  The VAE's worst validation
image is the same one (5.6 nats/pixel at its best epoch 143; the median rule picks 150).

Usage: ``python benchmarks/vfg_density.py [--quick] [--epochs N] [--betas 0.1 1] [--sigmas 1 0.5]
[--models vfg realnvp vae gaussian] [--threads 1]``;
``--quick`` trains 15 epochs (a smoke run of a few minutes), the default 150.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from latentfit.integrations.vfg import _make_torch_flows
from latentfit.integrations.vfg_engine import validation_split
from latentfit.models.vfg import VFG

LOG_2PI = math.log(2 * math.pi)


# -- data ---------------------------------------------------------------------------------------------------
def quadrant(r0: int, c0: int) -> list[int]:
    """Column indices of the 4 × 4 block of the 8 × 8 image whose top-left pixel is (r0, c0)."""
    return [8 * r + c for r in range(r0, r0 + 4) for c in range(c0, c0 + 4)]


#: the VFG tree: quadrants → top / bottom halves → root
DIGITS_TREE = [[quadrant(0, 0), quadrant(0, 4)], [quadrant(4, 0), quadrant(4, 4)]]


def digits_split(seed: int = 0, test_frac: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Dequantised digits ``(x + u) / 17`` in (0, 1)^64, shuffled: (train, test) float32."""
    from sklearn.datasets import load_digits

    x = load_digits().data
    rng = np.random.default_rng(seed)
    y = ((x + rng.random(x.shape)) / 17.0).astype(np.float32)[rng.permutation(len(x))]
    n_test = int(round(test_frac * len(x)))
    return y[:-n_test], y[-n_test:]


# -- peers ----------------------------------------------------------------------------------------------------
class SoftClampHyper(nn.Module):
    """A coupling's conditioner as the VFG's edges build it: a Pyro ``DenseNN`` whose log-scale output is bounded
    smoothly, ``c·tanh(u/c)``, and whose last layer starts at zero (the coupling starts as the identity).  Pyro's
    own ``log_scale_max_clip`` (default 3: up to ×20 per coupling) is a hard clamp that passes gradients through."""

    def __init__(self, net: nn.Module, clip: float) -> None:
        super().__init__()
        self.net, self.clip = net, clip
        with torch.no_grad():
            net.layers[-1].weight.zero_()  # type: ignore[index, union-attr]
            net.layers[-1].bias.zero_()  # type: ignore[index, union-attr]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, u = self.net(x)
        return shift, self.clip * torch.tanh(u / self.clip)


def realnvp(dim: int, blocks: int, hidden: int, seed: int,
            clip: float = 2.0) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """A RealNVP from Pyro's transforms: ``blocks`` affine couplings with the VFG edges' conditioner
    (:class:`SoftClampHyper`, log-scale bound ``clip`` = the VFG's ``log_scale_clip``), a fixed random
    permutation between them, N(0, I) base.  Returns (module holding the parameters, ``log_prob``)."""
    import pyro.distributions as dist
    from pyro.distributions.transforms import AffineCoupling, Permute
    from pyro.nn import DenseNN

    torch.manual_seed(seed)
    split = dim // 2
    couplings = nn.ModuleList([
        AffineCoupling(split, SoftClampHyper(DenseNN(split, [hidden, hidden], [dim - split, dim - split]), clip),
                       log_scale_min_clip=-clip, log_scale_max_clip=clip)
        for _ in range(blocks)])
    gen = torch.Generator().manual_seed(seed)
    transforms: list = []
    for b, c in enumerate(couplings):
        transforms.append(c)
        if b < blocks - 1:
            transforms.append(Permute(torch.randperm(dim, generator=gen)))
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    flow = dist.TransformedDistribution(base, transforms)
    return couplings, flow.log_prob


class VAE(nn.Module):
    """Gaussian VAE: ``z ~ N(0, I_k)``, ``y | z ~ N(μ_θ(z), diag σ²)`` (σ a learned vector), encoder
    ``q(z | y) = N(m_φ(y), diag s_φ(y)²)``; both MLPs with two hidden ReLU layers of width ``hidden``."""

    def __init__(self, dim: int, latent: int, hidden: int) -> None:
        super().__init__()
        self.latent = latent
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))
        self.log_sd = nn.Parameter(torch.zeros(dim))

    def _log_weights(self, y: torch.Tensor, k: int) -> torch.Tensor:
        """``log p(y, z_j) − log q(z_j | y)`` for ``k`` reparameterised draws: ``[k, n]``."""
        m, log_s = self.enc(y).chunk(2, -1)
        log_s = log_s.clamp(-8.0, 4.0)
        eps = torch.randn(k, *m.shape)
        z = m + log_s.exp() * eps
        mu = self.dec(z)
        log_lik = (-0.5 * ((y - mu) / self.log_sd.exp()) ** 2 - self.log_sd - 0.5 * LOG_2PI).sum(-1)
        log_prior = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
        log_q = (-0.5 * eps**2 - log_s - 0.5 * LOG_2PI).sum(-1)
        return log_lik + log_prior - log_q

    def elbo(self, y: torch.Tensor) -> torch.Tensor:
        """Per-row single-sample ELBO."""
        return self._log_weights(y, 1)[0]

    def iwae(self, y: torch.Tensor, k: int, chunk: int = 100) -> torch.Tensor:
        """Per-row importance-weighted bound ``log (1/K) Σ_j w_j`` (Burda et al. 2016)."""
        out = []
        for s in range(0, len(y), chunk):
            lw = self._log_weights(y[s:s + chunk], k)
            out.append(torch.logsumexp(lw, 0) - math.log(k))
        return torch.cat(out)


def vfg_log_prob_column_sigma(fit: object, y_fit: np.ndarray, y_eval: np.ndarray) -> np.ndarray:
    """Per-row ELBO of ``y_eval`` after re-estimating the leaves' sd per column, ``σ_c² = mean r_c²`` over
    ``y_fit`` (``r`` the standardised residuals ``(y − x̂) / s_c``): the closed-form maximiser of the training ELBO
    in σ with the flows fixed (the VFG trains one σ for all columns).  Only the Gaussian term changes:
    ``ELBO_σc = ELBO_σ + Σ_c [½ r_c²/σ² + log σ − ½ r_c²/σ_c² − log σ_c]``."""
    def resid(y: np.ndarray) -> np.ndarray:
        return (y - fit.reconstruct(y).numpy()) / fit.scale  # type: ignore[attr-defined]

    sigma_c = np.sqrt((resid(y_fit) ** 2).mean(0))
    sigma = fit.model.sigma  # type: ignore[attr-defined]
    r = resid(y_eval)
    adjust = (0.5 * r**2 / sigma**2 + math.log(sigma)).sum(1) - (0.5 * r**2 / sigma_c**2 + np.log(sigma_c)).sum(1)
    return fit.log_prob(y_eval).numpy() + adjust  # type: ignore[attr-defined]


Row = tuple[str, float, float, float, int, str]  # name, test NLL/dim, val NLL/dim, seconds, parameters, note


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def width_for(target: int, count: Callable[[int], int]) -> int:
    """The width ``h`` whose parameter count ``count(h)`` (increasing in ``h``) is closest to ``target``."""
    lo, hi = 1, 4096
    while hi - lo > 1:  # bisection: count(lo) < target <= count(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda h: abs(count(h) - target))


def train(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], val_fn: Callable[[], float],
          y: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> tuple[float, int]:
    """Adam with the VFG's cosine decay (lr → lr/10), gradient norm clipped at 10; keeps the weights of the
    best validation epoch.  Returns (CPU seconds, best epoch)."""
    from latentfit.integrations.vfg import _lr_at

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    total = epochs * math.ceil(len(y) / batch_size)
    best, best_state, best_epoch, step = math.inf, None, -1, 0
    t0 = time.process_time()
    for epoch in range(epochs):
        perm = torch.as_tensor(rng.permutation(len(y)))
        for s in range(0, len(y), batch_size):
            for g in opt.param_groups:
                g["lr"] = _lr_at(lr, step, total, True)
            loss = loss_fn(y[perm[s:s + batch_size]])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
        with torch.no_grad():
            v = val_fn()
        if math.isfinite(v) and v < best:
            best, best_state, best_epoch = v, copy.deepcopy(model.state_dict()), epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    return time.process_time() - t0, best_epoch


def realnvp_row(args: argparse.Namespace, d: int, vfg_params: int, s_tr: torch.Tensor, s_va: torch.Tensor,
                s_te: torch.Tensor, log_jac: float, epochs: int, bs: int, rows: list[Row]) -> None:
    nvp_blocks = 2 * args.blocks
    h_nvp = width_for(vfg_params, lambda h: n_params(realnvp(d, nvp_blocks, h, 0)[0]))
    mods, log_prob = realnvp(d, nvp_blocks, h_nvp, args.seed)
    secs, best = train(mods, lambda b: -log_prob(b).mean(), lambda: float(-log_prob(s_va).mean()), s_tr, epochs, bs,
                       args.lr, args.seed)
    with torch.no_grad():
        nll = (float(-log_prob(s_te).mean()) + log_jac) / d
        val_rows = (-log_prob(s_va) + log_jac) / d
    rows.append((f"RealNVP ({nvp_blocks} couplings, width {h_nvp})", nll, float(val_rows.mean()), secs, n_params(mods),
                 f"exact, best epoch {best + 1}, val median {float(val_rows.median()):.3f}, "
                 f"worst val image {float(val_rows.max()):.1f}"))
    print(rows[-1], flush=True)


def vae_rows(args: argparse.Namespace, d: int, vfg_params: int, s_tr: torch.Tensor, s_va: torch.Tensor,
             s_te: torch.Tensor, log_jac: float, epochs: int, bs: int, rows: list[Row]) -> None:
    """A VAE of the same size, latent = the VFG root's dimension."""
    latent = 16
    h_vae = width_for(vfg_params, lambda h: n_params(VAE(d, latent, h)))
    torch.manual_seed(args.seed)
    vae = VAE(d, latent, h_vae)
    secs, best = train(vae, lambda b: -vae.elbo(b).mean(), lambda: float(-vae.elbo(s_va).mean()), s_tr, epochs, bs,
                       args.lr, args.seed)
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        elbo_te = (float(-vae.elbo(s_te).mean()) + log_jac) / d
        elbo_va = (float(-vae.elbo(s_va).mean()) + log_jac) / d
        iw_te = (float(-vae.iwae(s_te, args.iwae_k).mean()) + log_jac) / d
        iw_va = (float(-vae.iwae(s_va, args.iwae_k).mean()) + log_jac) / d
    rows.append((f"VAE (latent {latent}, width {h_vae}), ELBO", elbo_te, elbo_va, secs, n_params(vae),
                 f"bound, best epoch {best + 1}"))
    rows.append((f"VAE, IWAE K = {args.iwae_k}", iw_te, iw_va, secs, n_params(vae), "tighter bound, same fit"))
    print(rows[-2:], flush=True)


def gaussian_rows(d: int, s_tr: torch.Tensor, s_va: torch.Tensor, s_te: torch.Tensor, log_jac: float,
                  rows: list[Row]) -> None:
    """Maximum-likelihood Gaussians on the (standardised) training rows: independent pixels and full covariance."""
    t0 = time.process_time()
    mu, cov = s_tr.double().mean(0), torch.cov(s_tr.double().T, correction=0)
    gauss = torch.distributions.MultivariateNormal(mu, cov + 1e-6 * torch.eye(d, dtype=torch.float64))
    secs = time.process_time() - t0
    rows.append(("Gaussian, full covariance (MLE)", (float(-gauss.log_prob(s_te.double()).mean()) + log_jac) / d,
                 (float(-gauss.log_prob(s_va.double()).mean()) + log_jac) / d, secs, d + d * (d + 1) // 2,
                 "exact"))
    ind = torch.distributions.Normal(s_tr.double().mean(0), s_tr.double().std(0, correction=0))
    nll_te = (float(-ind.log_prob(s_te.double()).sum(1).mean()) + log_jac) / d
    nll_va = (float(-ind.log_prob(s_va.double()).sum(1).mean()) + log_jac) / d
    rows.append(("Gaussian, independent pixels (MLE)", nll_te, nll_va, 0.0, 2 * d, "exact"))


def print_table(rows: list[Row], y_train: np.ndarray, y_test: np.ndarray, va_idx: np.ndarray, epochs: int, bs: int,
                lr: float) -> None:
    print(f"\nDigits density: {len(y_train)} train ({len(va_idx)} of them for early stopping) / {len(y_test)} test "
          f"images, 64 dims, dequantised (x + u)/17; {epochs} epochs, batch {bs}, Adam lr {lr} (cosine); "
          f"NLL in nats per dimension (per image: × 64; discrete pixels: + log 17 = 2.833)\n")
    head = f"| {'model':<40} | {'test NLL/dim':>12} | {'val NLL/dim':>11} | {'train CPU s':>11} | {'params':>7} |"
    print(head + " what |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 13}|{'-' * 13}|{'-' * 9}|------|")
    for name, nll, val, secs, npar, note in rows:
        print(f"| {name:<40} | {nll:12.3f} | {val:11.3f} | {secs:11.1f} | {npar:7d} | {note} |")



# -- the benchmark --------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="15 epochs (a smoke run)")
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64, help="VFG coupling width")
    p.add_argument("--blocks", type=int, default=4, help="coupling blocks per VFG edge (and RealNVP: 2×)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[1.0], help="VFG leaf sd (standardised)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 1.0], help="VFG KL weights in training")
    p.add_argument("--iwae-k", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["vfg", "realnvp", "vae", "gaussian"],
                   choices=["vfg", "realnvp", "vae", "gaussian"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (15 if args.quick else 150)
    bs = 128

    y_train, y_test = digits_split(args.seed)
    d = y_train.shape[1]
    # the VFG's own split: the first draw of its stream, a generator seeded with the fit's seed
    tr_idx, va_idx = (i.numpy() for i in validation_split(torch.Generator().manual_seed(args.seed), len(y_train), 0.1))
    loc, scale = y_train.mean(0), y_train.std(0)  # as the VFG does: over all its input rows
    log_jac = float(np.log(scale).sum())  # density of y = density of the standardised y − Σ log s_c

    def std(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((a - loc) / scale, dtype=torch.float32)

    s_tr, s_va, s_te = std(y_train[tr_idx]), std(y_train[va_idx]), std(y_test)
    rows: list[Row] = []

    # VFG (standardises internally from its own training rows: the same loc/scale as above)
    vfg_graph = VFG(DIGITS_TREE, hidden=args.hidden, blocks=args.blocks).graph
    vfg_params = n_params(_make_torch_flows(vfg_graph, args.hidden, args.blocks, 2.0, "cpu", torch.float32,
                                         torch.Generator()))
    settings = [(b, s) for b in args.betas for s in args.sigmas] if "vfg" in args.models else []
    for beta, sigma in settings:
        t0 = time.process_time()
        fit = VFG(DIGITS_TREE, hidden=args.hidden, blocks=args.blocks, beta=beta, sigma=sigma).fit(
            y_train, num_epochs=epochs, batch_size=bs, learning_rate=args.lr, seed=args.seed, progress=False,
            validation=0.1)
        secs = time.process_time() - t0
        nll = float(-fit.log_prob(y_test).mean()) / d
        val = float(-fit.log_prob(y_train[va_idx]).mean()) / d
        best = int(np.argmin(fit.val_history))
        rows.append((f"VFG tree, β = {beta:g}, σ = {sigma:g}", nll, val, secs, vfg_params,
                     f"paper's ELBO (β = 1, q entropy dropped), best epoch {best + 1}"))
        fit_rows = y_train[tr_idx]
        nll = float(-vfg_log_prob_column_sigma(fit, fit_rows, y_test).mean()) / d
        val = float(-vfg_log_prob_column_sigma(fit, fit_rows, y_train[va_idx]).mean()) / d
        rows.append((f"VFG tree, β = {beta:g}, σ = {sigma:g}, then σ_c", nll, val, secs, vfg_params + d,
                     "the same fit, σ_c² = mean training residual² (flows fixed)"))
        print(rows[-2:], flush=True)

    # RealNVP of the same size: 2 × blocks couplings, width solved for the VFG's parameter count
    if "realnvp" in args.models:
        realnvp_row(args, d, vfg_params, s_tr, s_va, s_te, log_jac, epochs, bs, rows)
    if "vae" in args.models:
        vae_rows(args, d, vfg_params, s_tr, s_va, s_te, log_jac, epochs, bs, rows)
    if "gaussian" in args.models:
        gaussian_rows(d, s_tr, s_va, s_te, log_jac, rows)
    print_table(rows, y_train, y_test, va_idx, epochs, bs, args.lr)


if __name__ == "__main__":
    main()
