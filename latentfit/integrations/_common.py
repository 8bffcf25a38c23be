"""What the Pyro and NumPyro adapters share: site layouts, closed-form patterns, the unit plate, the M-step.

Everything here is backend-neutral: arrays are touched through methods both torch tensors and JAX
arrays have (``.ndim``, ``.mean(axis=..., keepdims=...)``, ``.reshape``, ``.T``) or through the
model's ``ops`` (``ops.xp`` is ``torch`` or ``jax.numpy``).  Tracing a model (poutine vs. handlers,
autograd vs. ``jax.grad``, chain plate vs. ``vmap``) stays in each adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from latentfit.inference.model import LatentSite, ModelSpecificationError


@dataclass
class _SiteLayout:
    """How a latent site's value maps to the flat per-unit vector."""

    name: str
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    unit_axis: int  # axis of the unit dim in the value
    transform: Any  # biject_to(support): unconstrained -> constrained
    x_rest: tuple[int, ...]  # constrained per-unit shape (unit axis moved out)
    u_rest: tuple[int, ...]  # unconstrained per-unit shape
    offset: int
    size: int


@dataclass
class _GaussianLatentPattern:
    site: str
    loc: str | None  # param name, or None for a zero mean (``Normal(0., omega)``, a centred random effect)
    scale: str  # param name
    kind: str  # "normal" (scale = std, elementwise) or "mvn_cov" / "mvn_tril"


@dataclass
class _ResidualPattern:
    site: str
    scale: str  # param name of the residual sd


def unit_frame(latent: list[str], frames: dict[str, list[Any]], unit_plate: str | None, ppl: str) -> Any:
    """The plate frame of the units: the one named ``unit_plate``, else the outermost plate common to all latents.

    ``frames`` maps each latent site to its (vectorised) plate frames; ``ppl`` ("pyro" / "numpyro")
    names the library in the error messages.
    """
    if unit_plate is not None:
        found = [f for n in latent for f in frames[n] if f.name == unit_plate]
        if not found:
            names = sorted({f.name for n in latent for f in frames[n]})
            raise ModelSpecificationError(
                f"unit_plate={unit_plate!r} does not enclose any latent site; plates around latent "
                f"sites: {names}")
        outside = [n for n in latent if all(f.name != unit_plate for f in frames[n])]
        if outside:
            raise ModelSpecificationError(
                f"latent site(s) {outside} are outside the unit plate {unit_plate!r}: global latents "
                f"are not supported by EM-type engines; make them {ppl}.param sites")
        return found[0]
    common = [f for f in frames[latent[0]] if all(f in frames[n] for n in latent)]
    if not common:
        where = {n: [f.name for f in frames[n]] or ["(no plate)"] for n in latent}
        raise ModelSpecificationError(
            f"latent sites are not all inside one plate ({where}); name the plate of the units "
            f"with unit_plate=... (global latents must be {ppl}.param sites)")
    return min(common, key=lambda f: f.dim)  # outermost common plate (the most negative dim)


def _reduce_to(x: Any, shape: tuple[int, ...]) -> Any:
    """Average ``x`` over the dims that broadcasting a param of ``shape`` added or expanded."""
    extra = x.ndim - len(shape)
    if extra > 0:
        x = x.mean(axis=tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if dims:
        x = x.mean(axis=dims, keepdims=True)
    return x.reshape(shape)


class ClosedFormFace:
    """The exponential-family face of a traced model, once its patterns are recognised.

    Mixed into the adapters, which fill ``self._gauss`` (Gaussian latents: μ/ω or μ/Ω) and
    ``self._resid`` (constant residual sd) and compute the residual statistics themselves.
    Statistics ``Σ w_i``, ``Σ w_i w_iᵀ`` (Gaussian latents) and ``Σ (y − f)²``, ``#obs`` (residual);
    the M-step is their closed-form maximiser.
    """

    ops: Any
    params: dict[str, Any]
    latent_sites: list[LatentSite]
    _layout: list[_SiteLayout]
    _gauss: list[_GaussianLatentPattern]
    _resid: list[_ResidualPattern]

    def _mark_closed_form(self) -> None:
        """Flag the recognised params closed-form, set their annealing and the latent sites' kinds."""
        for g in self._gauss:
            if g.loc is not None:
                self.params[g.loc].closed_form = True
            self.params[g.scale].closed_form = True
            # mvn_tril: annealed through its covariance
            self.params[g.scale].anneal = {"normal": "std", "mvn_cov": "cov", "mvn_tril": None}[g.kind]
            self.latent_sites = [LatentSite(x.name, x.shape, x.offset, x.size, g.kind if x.name == g.site else x.kind)
                                 for x in self.latent_sites]
        for r in self._resid:
            self.params[r.scale].closed_form = True

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        """Scales of recognised Normal latents that fell onto the M-step's variance floor (1e-12)."""
        out = []
        for g in self._gauss:
            if g.kind == "normal" and float(np.min(self.ops.to_numpy(theta[g.scale]))) ** 2 < 1e-11:
                out.append(f"the scale {g.scale!r} of latent site {g.site!r} collapsed to ~0: the data barely identify "
                           f"that variance and SAEM's Monte-Carlo noise with few chains can drive it to zero; rerun "
                           f"with more chains (num_chains=...) or drop that random effect")
        return out

    def _site_u(self, z: Any, site: str) -> Any:
        s = next(x for x in self._layout if x.name == site)
        return z[..., s.offset:s.offset + s.size]

    def _gaussian_stats(self, z: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g in self._gauss:
            w = self._site_u(z, g.site)  # z holds the units ``units`` already (LatentModel contract)
            out[f"{g.site}.s1"] = w
            out[f"{g.site}.s2"] = w * w if g.kind == "normal" else w[..., :, None] * w[..., None, :]
        return out

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        xp = self.ops.xp
        out: dict[str, Any] = {}
        n = float(num_units)
        for g in self._gauss:
            s1, s2 = s[f"{g.site}.s1"] / n, s[f"{g.site}.s2"] / n
            if g.kind == "normal":
                p_shape = tuple(self.params[g.loc if g.loc is not None else g.scale].value.shape)
                mu = _reduce_to(s1, p_shape) if g.loc is not None else 0.0 * s1
                var = _reduce_to(s2 - 2 * mu * s1 + mu * mu, p_shape)
                if g.loc is not None:
                    out[g.loc] = mu
                out[g.scale] = xp.sqrt(xp.clip(var, 1e-12))
            else:
                mu = s1 if g.loc is not None else 0.0 * s1
                cov = s2 - mu[:, None] * mu[None, :]
                cov = 0.5 * (cov + cov.T) + 1e-10 * self.ops.asarray(np.eye(cov.shape[-1]), dtype=cov.dtype)
                if g.loc is not None:
                    out[g.loc] = mu.reshape(tuple(self.params[g.loc].value.shape))
                out[g.scale] = cov if g.kind == "mvn_cov" else xp.linalg.cholesky(cov)
        for r in self._resid:
            rss, cnt = s[f"{r.site}.rss"], s[f"{r.site}.nobs"]
            sd = xp.sqrt(xp.clip(rss / xp.clip(cnt, 1.0), 1e-24))
            out[r.scale] = sd.reshape(self.params[r.scale].value.shape)
        return out
