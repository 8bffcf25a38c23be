"""Pyro / NumPyro model functions of the logistic families in :mod:`latentfit.models.glmm`.

Each function is written once against the per-PPL interface :class:`~latentfit.integrations.families.PPL`
(``param``, ``sample``, ``plate``, distributions, constraints, array namespace) and returned as an ordinary
model function of that PPL, in tutorial style: θ as ``param`` sites, latents in a plate, observations in a plate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from latentfit.integrations.families import PPL, _named


def logistic_mixed_model_fn(ppl: PPL, init: dict[str, Any], covariance: str) -> Callable[..., None]:
    """``model(y, X, Z, group, num_groups, trials=None)``: the logistic mixed model.

    ``β`` (``param "beta"``, p), ``ω`` (``param "omega"``, q, positive; or ``Ω``, ``param "Omega"``, q×q,
    positive definite, when ``covariance="full"``); ``η_g ~ N(0, diag ω²)`` (or ``N(0, Ω)``) in plate ``group``;
    ``y_r ~ Bernoulli(logits = X_r β + Z_r η_{group_r})`` (``Binomial(trials_r, ·)`` with trials) in plate ``rows``.
    """
    pp, dist, constraints, xp = ppl.primitives, ppl.dist, ppl.constraints, ppl.xp

    def logistic_mixed_model(y: Any, X: Any, Z: Any, group: Any, num_groups: int, trials: Any = None) -> None:
        beta = pp.param("beta", ppl.fresh(init["beta"]))
        if covariance == "full":
            Omega = pp.param("Omega", ppl.fresh(init["Omega"]), constraint=constraints.positive_definite)
            prior = dist.MultivariateNormal(xp.zeros(Omega.shape[-1], dtype=Omega.dtype), covariance_matrix=Omega)
        else:
            omega = pp.param("omega", ppl.fresh(init["omega"]), constraint=constraints.positive)
            prior = dist.Normal(xp.zeros(omega.shape[-1], dtype=omega.dtype), omega).to_event(1)
        with pp.plate("group", num_groups):
            eta = pp.sample("eta", prior)  # [G, q]
        with pp.plate("rows", X.shape[0]):
            logits = X @ beta + (Z * eta[group]).sum(-1)
            if trials is None:
                pp.sample("y", dist.Bernoulli(logits=logits), obs=y)
            else:
                pp.sample("y", dist.Binomial(total_count=trials, logits=logits), obs=y)

    return _named(logistic_mixed_model, f"{ppl.name}_logistic_mixed_model")


def missing_logistic_model_fn(ppl: PPL, init: dict[str, Any]) -> Callable[..., None]:
    """``model(X, y)``: logistic regression with Gaussian covariates, NaN entries of ``X`` missing.

    ``x_i ~ N(β, Ω)`` written coordinate by coordinate through ``L = chol(Ω)``:
    ``x_ij | x_i,<j ~ N(β_j + Σ_{k<j} L_jk e_ik, L_jj²)``, ``e_ik = (x_ik − m_ik)/L_kk`` (the same joint density),
    each coordinate a site ``x{j}`` with ``obs_mask`` = its observed entries, so that the missing ones become the
    latent site ``x{j}_unobserved``; ``y_i ~ Bernoulli(logits = δ₀ + δᵀ x_i)``, all in plate ``rows``.
    """
    pp, dist, constraints, xp = ppl.primitives, ppl.dist, ppl.constraints, ppl.xp

    def missing_logistic_model(X: Any, y: Any) -> None:
        delta0 = pp.param("delta0", ppl.fresh(init["delta0"]))
        delta = pp.param("delta", ppl.fresh(init["delta"]))
        beta = pp.param("beta", ppl.fresh(init["beta"]))
        Omega = pp.param("Omega", ppl.fresh(init["Omega"]), constraint=constraints.positive_definite)
        L = xp.linalg.cholesky(Omega)
        observed = ~xp.isnan(X)
        X0 = xp.nan_to_num(X)
        with pp.plate("rows", X.shape[0]):
            cols: list[Any] = []
            whitened: list[Any] = []
            for j in range(X.shape[1]):
                mean = beta[j]
                for k in range(j):
                    mean = mean + L[j, k] * whitened[k]
                xj = pp.sample(f"x{j}", dist.Normal(mean, L[j, j]), obs=X0[:, j], obs_mask=observed[:, j])
                cols.append(xj)
                whitened.append((xj - mean) / L[j, j])
            x = xp.stack(cols, -1)
            pp.sample("y", dist.Bernoulli(logits=delta0 + x @ delta), obs=y)

    return _named(missing_logistic_model, f"{ppl.name}_missing_logistic_model")


__all__ = ["logistic_mixed_model_fn", "missing_logistic_model_fn"]
