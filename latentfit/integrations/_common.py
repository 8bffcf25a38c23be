"""What the Pyro and NumPyro adapters share: site layouts, closed-form patterns, the unit plate, the M-step.

Everything here is backend-neutral: arrays are touched through methods both torch tensors and JAX
arrays have (``.ndim``, ``.mean(axis=..., keepdims=...)``, ``.reshape``, ``.T``) or through the
model's ``ops`` (``ops.xp`` is ``torch`` or ``jax.numpy``).  Tracing a model (poutine vs. handlers,
autograd vs. ``jax.grad``, chain plate vs. ``vmap``) stays in each adapter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentfit.inference.model import LatentSite, ModelSpecificationError
from latentfit.models.mixture import array_stamps, same_arrays


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


class EnumMixtureFace:
    """The Gaussian-mixture face of an enumeration adapter (one discrete per-unit label).

    The adapters recognise the mixture and set ``self._gm`` (a
    :class:`~latentfit.models.mixture.GaussianMixture`), ``self._roles`` (mixture role -> (param name
    or None for a fixed role, value)) and ``self._to_user`` (identity, ``xp.linalg.cholesky`` or
    ``xp.sqrt``: mixture covariances -> the user's param); they supply ``responsibilities`` and
    ``log_joint_table``.  Statistics and M-step are the mixture's, mapped to the user's params.
    """

    ops: Any
    _gm: Any
    _roles: dict[str, tuple[str | None, Any]]
    _to_user: Any

    #: responsibilities by the recognised mixture's own E-step (set by :meth:`_check_family_estep`)
    _family_estep: bool = False
    #: the enumerated model runs on a mini-batch alone (None: not checked yet, see :meth:`_batch_table_ok`)
    _batch_table: bool | None = None

    def _batch_table_ok(self) -> bool:
        """Whether a mini-batch's enumerated table may come from the model run on the batch alone, checked once, on
        first use (the adapter's ``_check_batch_table``), so fits that never evaluate a batch pay nothing."""
        if self._batch_table is None:
            self._batch_table = False  # the check's full-table call must not re-enter it
            self._batch_table = self._check_batch_table()
        return self._batch_table

    def _check_family_estep(self) -> None:
        """Use the mixture's own E-step when it reproduces the enumerated table.

        Enumeration runs the whole model (all n units, every component) on every call; the recognised
        mixture computes ``log ω_k + log N(x_i; μ_k, Σ_k)`` as one ``[K, D] @ [D, b]`` product over the
        requested units only, so a mini-batch costs a mini-batch.  It is used only if, at the initial θ
        and at a second θ (every free role moved: locations shifted, weights reversed, covariances
        scaled), its log-joint table equals the enumerated one to ``√eps`` relative: a mask, a scale, an
        extra factor or a different parameterisation in the user's model keeps the enumeration path.
        """
        if self._gm is None:
            return
        xp = self.ops.xp
        theta0 = {n: p.value for n, p in self.params.items()}
        base = self._internal(theta0)
        moved = dict(base)
        for role, (name, _value) in self._roles.items():
            if name is None:
                continue
            v = base[role]
            if role == "locs":
                moved[role] = v + 0.37 * xp.std(self._gm.x, 0) + 0.1
            elif role == "weights":
                moved[role] = xp.flip(v, (0,)) if v.shape[0] > 1 else v
            else:
                moved[role] = 1.3 * v
        def gap(theta: dict[str, Any]) -> tuple[Any, Any, Any]:
            enum = self.log_joint_table(theta)  # [K, n]
            own = self._gm.log_component(self._internal(theta)).T
            return xp.max(xp.abs(enum - own)), xp.max(xp.abs(enum)), xp.all(xp.isfinite(own))

        gap = self.ops.jit(gap)  # one compiled program on JAX (op by op, each op compiles apart)
        eps = float(xp.finfo(self._gm.x.dtype).eps)
        for internal in (base, moved):
            theta = dict(theta0)
            theta.update(self._external(internal, theta0))
            diff, size, finite = gap(theta)
            if not bool(finite) or float(diff) > eps ** 0.5 * (1.0 + float(size)):
                return
        self._family_estep = True

    def _family_responsibilities(self, theta: dict[str, Any], units: Any) -> tuple[Any, Any]:
        return self._gm.responsibilities(self._internal(theta), units)

    def _external(self, internal: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
        """Mixture roles -> the user's params (shapes of ``template``); fixed roles are skipped."""
        out = {}
        for role, v in internal.items():
            name = self._roles[role][0]
            if name is None:
                continue
            if role == "covariances":
                v = self._to_user(v)
            out[name] = self.ops.xp.reshape(v, tuple(template[name].shape))
        return out

    def _internal(self, theta: dict[str, Any]) -> dict[str, Any]:
        """The user's params -> the mixture's roles; eager backends reuse the last result for the same θ arrays (so
        the mixture's own per-θ cache applies: FIEM evaluates two mini-batches at one θ)."""
        if self.ops.jittable:
            return self._internal_of(theta)
        key = tuple(theta[name] for name, _ in self._roles.values() if name is not None)
        cached = getattr(self, "_internal_cache", None)
        if cached is not None and same_arrays(cached[0], key):
            return cached[1]
        out = self._internal_of(theta)
        self._internal_cache = (array_stamps(key), out)
        return out

    def _internal_of(self, theta: dict[str, Any]) -> dict[str, Any]:
        xp = self.ops.xp
        out = {}
        for role, (name, _value) in self._roles.items():
            gm_shape = tuple(self._gm.params[role].value.shape)
            if name is None:
                out[role] = self._gm.params[role].value
            elif role == "covariances":
                v = xp.asarray(theta[name], dtype=self._gm.x.dtype)  # square in the mixture's dtype
                if self._to_user is xp.linalg.cholesky:
                    v = v @ xp.swapaxes(v, -1, -2)
                elif self._to_user is xp.sqrt:
                    v = v * v
                out[role] = xp.reshape(v, gm_shape)
            else:
                out[role] = xp.reshape(xp.asarray(theta[name], dtype=self._gm.x.dtype), gm_shape)
        return out

    # ----- exponential-family face ------------------------------------------------------------------
    def expected_stats(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        r, _ = self.responsibilities(theta, units)
        return {"s": r[:, :, None] * self._gm._features(units)[:, None, :]}

    def sum_expected_stats(self, theta: dict[str, Any], units: Any = None) -> tuple[dict[str, Any], Any]:
        if self._family_estep:  # the mixture's own pass (streamed in cache-sized chunks on eager backends)
            return self._gm.sum_expected_stats(self._internal(theta), units)
        r, ll = self.responsibilities(theta, units)
        return self._gm._sum_stats(r, units), ll.sum()

    # compact rows for the incremental engines' tables: S_i = r_i ⊗ F(x_i) is linear in r_i [K]
    def expected_rows(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return {"r": self.responsibilities(theta, units)[0]}

    def stats_rows(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        return {"r": z}

    def reduce_rows(self, rows: dict[str, Any], units: Any = None) -> dict[str, Any]:
        return self._gm.reduce_rows(rows, units)

    @property
    def permuted_units(self) -> Any:
        """With the family E-step: the model with its units reordered (the engines then cut contiguous mini-batch
        blocks, :mod:`latentfit.inference.units`); None (no reordering) while the model is enumerated."""
        return self._permuted_view if self._family_estep else None

    def _permuted_view(self, perm: Any) -> Any:
        view = copy.copy(self)
        view._gm = self._gm.permuted_units(perm)
        view._internal_cache = None
        return view

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        return self._gm.stats(theta, z, units)

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        return self._external(self._gm.m_step(s, self._internal(theta), num_units), theta)

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        return self._gm.fit_warnings(self._internal(theta)) if self._gm is not None else []

    def shard_view(self, ops: Any, offset: int, total: int) -> Any:
        """One process's shard of a data-parallel fit: the recognised mixture centres its statistics at the mean of
        every process's data (``GaussianMixture.shard_view``); the user's parameters start where the model says."""
        if self._gm is None:
            return self
        view = copy.copy(self)
        view._gm = self._gm.shard_view(ops, offset, total)
        view._internal_cache = None
        return view

    # ----- LatentModel face for samplers / post-fit tools -------------------------------------------
    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        xp = self.ops.xp
        if self._family_estep:  # equal to the enumerated table (checked at set-up), in this view's unit order
            lj = self._gm.log_component(self._internal(theta), units)
        else:
            lj = self.log_joint_table(theta, units).T  # [n, K]
        lz = xp.log(self._internal(theta)["weights"]) if self._gm is not None else xp.zeros_like(lj[0])
        return (z * (lj - lz)).sum(-1), (z * lz).sum(-1)
