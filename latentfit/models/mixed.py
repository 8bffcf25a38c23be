"""Linear mixed model with an exact E-step and closed-form M-step (maximum likelihood EM).

``y_i = X_i β + Z_i b_i + ε_i``, ``b_i ~ N(0, Ω)`` (q random effects per unit), ``ε_i ~ N(0, σ² I)``;
units (groups) have ragged numbers of observations (padded ``[n, T]`` with a mask).

E-step: ``b_i | y_i ~ N(m_i, V_i)``, ``V_i = (Ω^{-1} + Z_iᵀZ_i/σ²)^{-1}``, ``m_i = V_i Z_iᵀ(y_i − X_iβ)/σ²``.
Per-unit statistics (exact expectations of the complete-data statistics):
``u_i = X_iᵀZ_i m_i`` (p), ``c_i = y_iᵀZ_i m_i``, ``B_i = m_i m_iᵀ + V_i`` (q×q), ``t_i = tr(Z_iᵀZ_i B_i)``.
M-step with the data constants ``H = Σ X_iᵀX_i``, ``g = Σ X_iᵀy_i``, ``Σ y_iᵀy_i`` and N observations:
``β = H^{-1}(g − Σu)``, ``Ω = ΣB/n``,
``σ² = (Σyᵀy − 2βᵀg + βᵀHβ − 2(Σc − βᵀΣu) + Σt)/N``.
Numerically, y stands for the OLS residuals ``y − Xβ_ols`` and β for ``β − β_ols`` in these formulas (the
same model), so that σ²'s expansion does not cancel ``Σyᵀy`` when y has a large offset.
This is the LMM example of the mini-batch EM paper (Karimi, Lavielle & Moulines, HAL hal-02334485, 2019) with
the variance components estimated too.  The exact marginal likelihood uses the Woodbury identity and the
determinant lemma.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latentfit.inference.model import DataError, LatentModel, LatentSite, ParamInfo
from latentfit.inference.ops import LOG_2PI, Ops, make_ops

from ._integrations import families


def _identity(x: Any) -> Any:
    return x


class LinearMixedModel(LatentModel):
    """Gaussian linear mixed model on padded per-unit data.

    Parameters
    ----------
    y : ``[n, T]`` responses (NaN or ``mask == False`` for padding)
    X : ``[n, T, p]`` fixed-effect design
    Z : ``[n, T, q]`` random-effect design
    mask : ``[n, T]`` bool, optional (default: finite entries of y)
    beta, Omega, sigma : initial values (default: OLS β, Ω = I, σ = OLS residual sd)
    """

    has_stats = True
    has_expected_stats = True
    has_exact_marginal = True

    def __init__(self, y: Any, X: Any, Z: Any, mask: Any = None, *, beta: Any = None, Omega: Any = None,
                 sigma: float | None = None, ops: Ops | None = None) -> None:
        y_np = np.asarray(y, dtype=float)
        if y_np.ndim != 2:
            raise DataError(f"y must be [n, T] (pad ragged groups), got shape {y_np.shape}")
        n, T = y_np.shape
        if n == 0:
            raise DataError("y is empty: the mixed model needs at least one unit")
        X_np, Z_np = np.asarray(X, dtype=float), np.asarray(Z, dtype=float)
        if X_np.shape[:2] != (n, T) or Z_np.shape[:2] != (n, T) or X_np.ndim != 3 or Z_np.ndim != 3:
            raise DataError(f"X and Z must be [n, T, p] and [n, T, q] with (n, T) = {(n, T)}; got {X_np.shape}, "
                            f"{Z_np.shape}")
        m_np = np.isfinite(y_np) if mask is None else np.asarray(mask, dtype=bool)
        if not np.all(np.isfinite(y_np[m_np])) or not np.all(np.isfinite(X_np[m_np])) \
                or not np.all(np.isfinite(Z_np[m_np])):
            raise DataError("y, X or Z hold NaN/inf at observed (unmasked) positions")
        w = m_np.astype(float)
        y0 = np.where(m_np, y_np, 0.0)
        X0, Z0 = X_np * w[..., None], Z_np * w[..., None]
        self.ops = ops if ops is not None else make_ops()  # torch, float64
        ops = self.ops
        p, q = X_np.shape[2], Z_np.shape[2]
        self.num_units, self.p, self.q, self.nobs = n, p, q, float(w.sum())
        H = np.einsum("ntp,ntr->pr", X0, X0)
        if np.linalg.matrix_rank(H) < p:
            raise DataError("the fixed-effect design X is rank deficient (Σ XᵢᵀXᵢ is singular)")
        beta_ols = np.linalg.solve(H, X0.reshape(-1, p).T @ y0.reshape(-1))
        # The y-statistics are those of the OLS residuals r = y − Xβ_ols (β enters every formula as
        # δ = β − β_ols): σ²'s expansion Σrᵀr − 2δᵀg + δᵀHδ − … would otherwise cancel Σyᵀy, and a
        # large offset in y (|y| ~ 1e8 with σ ~ 1) lost every digit of σ² (σ fell to its 1e-150 floor).
        r0 = (y0 - X0 @ beta_ols) * w
        self.beta_ols = ops.asarray(beta_ols)
        # per-unit data constants
        self.XtX = ops.asarray(np.einsum("ntp,ntr->npr", X0, X0))
        self.XtZ = ops.asarray(np.einsum("ntp,ntr->npr", X0, Z0))
        self.ZtZ = ops.asarray(np.einsum("ntp,ntr->npr", Z0, Z0))
        self.Xty = ops.asarray(np.einsum("ntp,nt->np", X0, r0))
        self.Zty = ops.asarray(np.einsum("ntp,nt->np", Z0, r0))
        self.yty = ops.asarray((r0 * r0).sum(1))
        self.T_i = ops.asarray(w.sum(1))
        self.H, self.g, self.yty_sum = ops.asarray(H), ops.asarray(X0.reshape(-1, p).T @ r0.reshape(-1)), float(
            (r0 * r0).sum())
        if beta is None:
            beta = beta_ols
        if sigma is None:
            resid = (y0 - X0 @ np.asarray(beta)) * w
            sigma = float(np.sqrt((resid ** 2).sum() / max(self.nobs - p, 1.0)))
        Omega = np.eye(q) if Omega is None else np.asarray(Omega, dtype=float)
        if Omega.shape != (q, q) or np.any(np.linalg.eigvalsh(0.5 * (Omega + Omega.T)) <= 0):
            raise ValueError(f"Omega must be a positive definite ({q}, {q}) matrix")
        init = {"beta": ops.asarray(np.asarray(beta, dtype=float)), "Omega": ops.asarray(Omega),
                "sigma": ops.asarray(np.asarray(float(sigma)))}
        self.params = {k: ParamInfo(k, v, _identity, _identity, closed_form=True) for k, v in init.items()}
        self.latent_dim = q
        self.latent_sites = [LatentSite("b", (q,), 0, q, kind="mvn_cov")]
        self.observed = {"y": y_np}
        self._y, self._X, self._Z, self._mask = y0, X_np, Z_np, m_np

    def data_arrays(self) -> dict[str, Any]:
        """Responses, designs and mask (what a checkpoint's data digest covers)."""
        return {"y": self._y, "X": self._X, "Z": self._Z, "mask": self._mask}

    def _take(self, a: Any, units: Any) -> Any:
        return a if units is None else self.ops.take(a, units, 0)

    def posterior(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        """``(m_i [b, q], V_i [b, q, q])`` of ``b_i | y_i``."""
        xp = self.ops.xp
        s2 = theta["sigma"] ** 2
        Oinv = xp.linalg.inv(theta["Omega"])
        V = xp.linalg.inv(Oinv + self._take(self.ZtZ, units) / s2)
        V = 0.5 * (V + xp.swapaxes(V, -1, -2))
        delta = theta["beta"] - self.beta_ols
        rhs = self._take(self.Zty, units) - xp.einsum("bpq,p->bq", self._take(self.XtZ, units), delta)
        m = xp.einsum("bqr,br->bq", V, rhs) / s2
        return m, V

    def _stats_from_moments(self, m: Any, Bm: Any, units: Any) -> dict[str, Any]:
        xp = self.ops.xp
        return {"u": xp.einsum("bpq,bq->bp", self._take(self.XtZ, units), m),
                "c": xp.sum(self._take(self.Zty, units) * m, -1),
                "B": Bm,
                "t": xp.sum(self._take(self.ZtZ, units) * Bm, (-2, -1))}

    def expected_stats(self, theta: dict[str, Any], units: Any = None) -> dict[str, Any]:
        m, V = self.posterior(theta, units)
        return self._stats_from_moments(m, m[:, :, None] * m[:, None, :] + V, units)

    def stats(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        """Complete-data statistics of draws ``z = b`` ``[..., n, q]``."""
        xp = self.ops.xp
        XtZ, Zty, ZtZ = self._take(self.XtZ, units), self._take(self.Zty, units), self._take(self.ZtZ, units)
        Bm = z[..., :, None] * z[..., None, :]
        return {"u": xp.einsum("bpq,...bq->...bp", XtZ, z), "c": xp.sum(Zty * z, -1), "B": Bm,
                "t": xp.sum(ZtZ * Bm, (-2, -1))}

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        xp = self.ops.xp
        delta = xp.linalg.solve(self.H, self.g - s["u"])  # β − β_ols
        Omega = s["B"] / num_units
        Omega = 0.5 * (Omega + xp.swapaxes(Omega, -1, -2))
        quad = self.yty_sum - 2 * xp.sum(delta * self.g) + xp.sum(delta * (self.H @ delta))
        s2 = (quad - 2 * (s["c"] - xp.sum(delta * s["u"])) + s["t"]) / self.nobs
        return {"beta": delta + self.beta_ols, "Omega": Omega, "sigma": xp.sqrt(xp.maximum(s2, 1e-300 + 0 * s2))}

    def marginal_log_lik(self, theta: dict[str, Any], units: Any = None) -> Any:
        """Exact ``log p(y_i; θ)`` (Woodbury identity and determinant lemma)."""
        xp = self.ops.xp
        beta, s2 = theta["beta"] - self.beta_ols, theta["sigma"] ** 2
        m, V = self.posterior(theta, units)
        XtX, Xty = self._take(self.XtX, units), self._take(self.Xty, units)
        rr = self._take(self.yty, units) - 2 * Xty @ beta + xp.einsum("p,bpr,r->b", beta, XtX, beta)
        Ztr = self._take(self.Zty, units) - xp.einsum("bpq,p->bq", self._take(self.XtZ, units), beta)
        quad = (rr - xp.sum(Ztr * m, -1)) / s2
        Ti = self._take(self.T_i, units)
        logdet = Ti * xp.log(s2) + xp.linalg.slogdet(theta["Omega"])[1] - xp.linalg.slogdet(V)[1]
        return -0.5 * (quad + logdet + Ti * LOG_2PI)

    # ----- LatentModel face for samplers ----------------------------------------------------------
    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        xp = self.ops.xp
        beta, s2 = theta["beta"] - self.beta_ols, theta["sigma"] ** 2  # y-constants are of y − Xβ_ols
        XtX, Xty = self._take(self.XtX, units), self._take(self.Xty, units)
        rr = self._take(self.yty, units) - 2 * Xty @ beta + xp.einsum("p,bpr,r->b", beta, XtX, beta)
        Ztr = self._take(self.Zty, units) - xp.einsum("bpq,p->bq", self._take(self.XtZ, units), beta)
        ZtZ = self._take(self.ZtZ, units)
        sq = rr - 2 * xp.sum(Ztr * z, -1) + xp.einsum("...bq,bqr,...br->...b", z, ZtZ, z)
        Ti = self._take(self.T_i, units)
        ll = -0.5 * (sq / s2 + Ti * xp.log(s2) + Ti * LOG_2PI)
        Oinv = xp.linalg.inv(theta["Omega"])
        lp = -0.5 * (xp.einsum("...bq,qr,...br->...b", z, Oinv, z) + xp.linalg.slogdet(theta["Omega"])[1]
                     + self.q * LOG_2PI)
        return ll, lp

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        n = self.num_units if units is None else len(units)
        L = self.ops.cholesky(theta["Omega"])
        return self.ops.normal(key, (num_chains, n, self.q)) @ L.T

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        return {"b": z}

    def sample_observations(self, theta: dict[str, Any], z: Any, key: Any) -> dict[str, Any]:
        """``{"y": [..., n, T]}``: ``y = X β + Z b + σ ε`` at each draw ``b = z [..., n, q]``, NaN on the padding."""
        ops = self.ops
        b = np.asarray(ops.to_numpy(ops.asarray(z)))
        beta, sigma = (np.asarray(ops.to_numpy(theta[k])) for k in ("beta", "sigma"))
        X, Z = (np.where(self._mask[..., None], a, 0.0) for a in (self._X, self._Z))
        mean = X @ beta + np.einsum("ntq,...nq->...nt", Z, b)
        y = mean + sigma * np.asarray(ops.to_numpy(ops.normal(key, tuple(mean.shape))))
        return {"y": np.where(self._mask, y, np.nan)}

    def pyro_model(self):
        """An ordinary Pyro model function ``model(y, X, Z, mask)`` of this LMM (same parameter names).

        Built by :func:`latentfit.integrations.families.mixed_model`."""
        fam = families()
        return fam.mixed_model(self, fam.pyro_ppl())


__all__ = ["LinearMixedModel"]
