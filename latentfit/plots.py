"""Diagnostic plots of a fit (matplotlib), as saemix's ``plot(fit, plot.type=...)``.

Every function takes a :class:`~latentfit.inference.results.FitResult` and returns the figure; the
same plots are available as ``fit.plot_*`` methods.  ``x`` (the independent variable, e.g. time) is an
``[N, T]`` array shaped like the observations, or the name of a keyword argument of the model call.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _plt():
    import matplotlib.pyplot as plt

    return plt


def resolve_x(fit: Any, x: Any) -> np.ndarray | None:
    """``x`` as an ``[N, T]`` numpy array (a model keyword name is looked up in the traced call)."""
    if x is None:
        return None
    if isinstance(x, str):
        kwargs = getattr(fit.model, "kwargs", {}) or {}
        if x not in kwargs:
            raise ValueError(f"x={x!r} is not a keyword argument of the model call (available: {sorted(kwargs)})")
        x = kwargs[x]
    return np.asarray(fit.model.ops.to_numpy(x), dtype=float)


def plot_observations_vs_predictions(fit: Any, figsize=None, log: bool = False):
    """Observations against PRED and IPRED, with the identity line."""
    plt = _plt()
    res = fit.residuals()
    fig, axes = plt.subplots(1, 2, figsize=figsize or (9, 4.2))
    for ax, name, label in ((axes[0], "pred", "population predictions (PRED)"),
                            (axes[1], "ipred", "individual predictions (IPRED)")):
        p = getattr(res, name)[res.mask]
        yo = res.y[res.mask]
        ax.scatter(p, yo, s=12, alpha=0.7)
        lo, hi = np.nanmin([p.min(), yo.min()]), np.nanmax([p.max(), yo.max()])
        ax.plot([lo, hi], [lo, hi], color="k", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("observations")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
    fig.tight_layout()
    return fig


def plot_residuals(fit: Any, x: Any = None, figsize=None):
    """IWRES, PWRES and NPDE against x (or IPRED/PRED), and a normal QQ plot of the NPDE."""
    plt = _plt()
    from statistics import NormalDist

    res = fit.residuals()
    xv = resolve_x(fit, x)
    m = res.mask
    fig, axes = plt.subplots(2, 2, figsize=figsize or (9, 7))
    panels = [(axes[0, 0], res.iwres, xv if xv is not None else res.ipred, "IWRES"),
              (axes[0, 1], res.pwres, xv if xv is not None else res.pred, "PWRES"),
              (axes[1, 0], res.npde, xv if xv is not None else res.pred, "NPDE")]
    xlabel = "x" if xv is not None else None
    for ax, r, xx, name in panels:
        ax.scatter(xx[m], r[m], s=12, alpha=0.7)
        ax.axhline(0, color="k", lw=1)
        for lvl in (-1.96, 1.96):
            ax.axhline(lvl, color="k", lw=0.8, ls="--")
        ax.set_ylabel(name)
        ax.set_xlabel(xlabel or ("IPRED" if name == "IWRES" else "PRED"))
    ax = axes[1, 1]
    npde = np.sort(res.npde[m])
    theo = np.array([NormalDist().inv_cdf((i + 0.5) / npde.size) for i in range(npde.size)])
    ax.scatter(theo, npde, s=12, alpha=0.7)
    ax.plot(theo, theo, color="k", lw=1)
    ax.set_xlabel("N(0,1) quantiles")
    ax.set_ylabel("NPDE quantiles")
    fig.tight_layout()
    return fig


def plot_individual_fits(fit: Any, x: Any = None, units: Any = None, ncols: int = 4, figsize=None):
    """Observations with PRED and IPRED per unit (x: independent variable; default the observation index)."""
    plt = _plt()
    res = fit.residuals()
    n, t = res.y.shape
    xv = resolve_x(fit, x)
    if xv is None:
        xv = np.broadcast_to(np.arange(t, dtype=float), (n, t))
    units = list(range(n)) if units is None else list(units)
    nrows = int(np.ceil(len(units) / ncols))
    fig, axes = plt.subplots(nrows, min(ncols, len(units)), figsize=figsize or (3 * min(ncols, len(units)),
                                                                                 2.4 * nrows), squeeze=False)
    for ax, i in zip(axes.flat, units):
        sel = res.mask[i]
        order = np.argsort(xv[i][sel])
        xi = xv[i][sel][order]
        ax.scatter(xi, res.y[i][sel][order], s=14, color="k", label="observed")
        ax.plot(xi, res.ipred[i][sel][order], lw=1.2, label="IPRED")
        ax.plot(xi, res.pred[i][sel][order], lw=1, ls="--", label="PRED")
        ax.set_title(f"unit {i}", fontsize=9)
    for ax in list(axes.flat)[len(units):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_vpc(fit: Any, x: Any, num_sims: int = 500, bins: Any = None, level: float = 0.9, seed: int = 0,
             figsize=None, log: bool = False):
    """Visual predictive check: observed 5/50/95% quantiles per bin against simulated prediction intervals."""
    plt = _plt()
    v = fit.vpc(x, num_sims=num_sims, bins=bins, level=level, seed=seed)
    fig, ax = plt.subplots(figsize=figsize or (6.5, 4.5))
    ax.scatter(v.x, v.y, s=8, color="0.5", alpha=0.6, label="observations")
    colors = ["tab:blue", "tab:red", "tab:blue"]
    for j, q in enumerate(v.quantiles):
        c = colors[j % len(colors)]
        ax.fill_between(v.bin_x, v.simulated[:, j, 0], v.simulated[:, j, 2], color=c, alpha=0.2,
                        label=f"{int(100 * level)}% PI of the {int(100 * q)}% quantile")
        ax.plot(v.bin_x, v.observed[:, j], color=c, lw=1.5)
    ax.set_xlabel("x")
    ax.set_ylabel("observations")
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


__all__ = ["plot_individual_fits", "plot_observations_vs_predictions", "plot_residuals", "plot_vpc", "resolve_x"]
