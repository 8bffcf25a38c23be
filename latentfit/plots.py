"""Diagnostic plots of a fit (matplotlib), as saemix's ``plot(fit, plot.type=...)``.

Every function takes a :class:`~latentfit.inference.results.FitResult` and returns the figure; the
same plots are available as ``fit.plot_*`` methods (which reach them through the hooks bound in
``latentfit/__init__.py``, see :mod:`latentfit._hooks`).  ``x`` (the independent variable, e.g. time) is an
``[N, T]`` array shaped like the observations, or the name of a keyword argument of the model call.

Fits of an NLME model (:mod:`latentfit.models.nlme`) are drawn in the model's own terms: against the data's
time (or ``x=`` variable) by default, panels titled by subject ID, smooth IPRED / PRED curves of the structural
model with the doses marked, a prediction-corrected VPC (pcVPC) and saemix / Monolix goodness-of-fit panels
(:func:`plot_gof`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from latentfit._hooks import user_stacklevel
from latentfit.inference.diagnostics import _population_predict, _population_structural, model_program
from latentfit.inference.postfit import resolve_x


def _plt():
    import matplotlib.pyplot as plt

    return plt


def plot_convergence(fit: Any, params: list[str] | None = None, ncols: int = 3, figsize: Any = None) -> Any:
    """One panel per scalar parameter against the iteration (saemix's convergence plot), and the complete-data
    log-likelihood unless ``params`` names the parameters to draw.  By default the weights of the model's neural
    networks (``fit.model.module_params``) are left out, a ``UserWarning`` saying how many (``params=`` names those
    to draw); a model whose parameters are all network weights draws them all."""
    plt = _plt()
    series = []
    names = [name[len("theta."):] for name in fit.history if name.startswith("theta.")]
    network = set(getattr(fit.model, "module_params", ()) or ()) & set(names)
    left_out: list[str] = []
    if params is None and network and len(network) < len(names):
        left_out = [n for n in names if n in network]
        count = sum(int(np.prod(fit.history[f"theta.{n}"].shape[1:])) for n in left_out)
        warnings.warn(f"plot_convergence: {count} network weights ({len(left_out)} params: "
                      f"{', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}) left out; pass "
                      "params=[...] to draw them (fit.model.module_params names them)", UserWarning,
                      stacklevel=user_stacklevel())
    for name, values in fit.history.items():
        if not name.startswith("theta."):
            continue
        pname = name[len("theta."):]
        if (params is not None and pname not in params) or pname in left_out:
            continue
        arr = values.reshape(values.shape[0], -1)
        for j in range(arr.shape[1]):
            label = pname if arr.shape[1] == 1 else f"{pname}[{j}]"
            series.append((label, arr[:, j]))
    if "objective" in fit.history and params is None:
        series.append(("complete-data log-lik", fit.history["objective"]))
    n = len(series)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, min(ncols, n), figsize=figsize or (4 * min(ncols, n), 2.6 * nrows),
                             squeeze=False)
    iters = np.arange(1, fit.num_iterations + 1)
    for ax, (label, y) in zip(axes.flat, series):
        ax.plot(iters[: len(y)], y, lw=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _response_panels(fit: Any, mask: np.ndarray) -> list[tuple[str | None, np.ndarray]]:
    """``[(response name, [N, T] mask)]``: one entry per response of a model with several (the goodness-of-fit panels
    then have a row each: concentrations and effects on one scale would hide each other), else ``[(None, mask)]``."""
    model = _nlme(fit)
    resp = getattr(model, "_resp", None) if model is not None else None
    if resp is None or len(resp.names) < 2:
        return [(None, mask)]
    index = np.asarray(model.ops.to_numpy(resp.index))
    if index.shape != mask.shape:  # (a distributed fit's residuals gather every process's units)
        return [(None, mask)]
    return [(name, mask & (index == r)) for r, name in enumerate(resp.names)]


def _titled(response: str | None, text: str) -> str:
    """A panel's title, prefixed with its response's name (a model with several responses)."""
    return text if response is None else f"{response} · {text}"


def plot_observations_vs_predictions(fit: Any, figsize=None, log: bool = False):
    """Observations against PRED and IPRED, with the identity line; a model with several responses: a row of
    panels per response, titled with its name."""
    plt = _plt()
    res = fit.residuals()
    groups = _response_panels(fit, res.mask)
    fig, axes = plt.subplots(len(groups), 2, figsize=figsize or (9, 4.2 * len(groups)), squeeze=False)
    for row, (response, m) in zip(axes, groups, strict=True):
        for ax, name, label in ((row[0], "pred", "population predictions (PRED)"),
                                (row[1], "ipred", "individual predictions (IPRED)")):
            p = getattr(res, name)[m]
            yo = res.y[m]
            ax.scatter(p, yo, s=12, alpha=0.7)
            lo, hi = np.nanmin([p.min(), yo.min()]), np.nanmax([p.max(), yo.max()])
            ax.plot([lo, hi], [lo, hi], color="k", lw=1)
            ax.set_xlabel(label)
            ax.set_ylabel("observations")
            if response is not None:
                ax.set_title(_titled(response, f"DV vs {name.upper()}"), fontsize=10)
            if log:
                ax.set_xscale("log")
                ax.set_yscale("log")
    fig.tight_layout()
    return fig


def plot_residuals(fit: Any, x: Any = None, figsize=None):
    """IWRES, PWRES and NPDE against x (or IPRED/PRED; NLME fits: the data's time by default), and a normal QQ plot
    of the NPDE; a model with several responses: a row of these four panels per response, titled with its name."""
    plt = _plt()
    from statistics import NormalDist

    res = fit.residuals()
    xv, xlabel = _x_values(fit, x)
    groups = _response_panels(fit, res.mask)
    if len(groups) == 1:
        fig, axes = plt.subplots(2, 2, figsize=figsize or (9, 7))
        rows = [[axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]]]
    else:
        fig, axes = plt.subplots(len(groups), 4, figsize=figsize or (16, 3.6 * len(groups)), squeeze=False)
        rows = [list(r) for r in axes]
    xlabel = xlabel if xv is not None else None
    for row, (response, m) in zip(rows, groups, strict=True):
        panels = [(row[0], res.iwres, xv if xv is not None else res.ipred, "IWRES"),
                  (row[1], res.pwres, xv if xv is not None else res.pred, "PWRES"),
                  (row[2], res.npde, xv if xv is not None else res.pred, "NPDE")]
        for ax, r, xx, name in panels:
            ax.scatter(xx[m], r[m], s=12, alpha=0.7)
            ax.axhline(0, color="k", lw=1)
            for lvl in (-1.96, 1.96):
                ax.axhline(lvl, color="k", lw=0.8, ls="--")
            ax.set_ylabel(name)
            ax.set_xlabel(xlabel or ("IPRED" if name == "IWRES" else "PRED"))
            if response is not None:
                ax.set_title(_titled(response, f"{name} vs {xlabel or ('IPRED' if name == 'IWRES' else 'PRED')}"),
                             fontsize=10)
        ax = row[3]
        npde = np.sort(res.npde[m])
        theo = np.array([NormalDist().inv_cdf((i + 0.5) / npde.size) for i in range(npde.size)])
        ax.scatter(theo, npde, s=12, alpha=0.7)
        ax.plot(theo, theo, color="k", lw=1)
        ax.set_xlabel("N(0,1) quantiles")
        ax.set_ylabel("NPDE quantiles")
        if response is not None:
            ax.set_title(_titled(response, "NPDE QQ plot"), fontsize=10)
    fig.tight_layout()
    return fig


# ----- NLME fits: the model's own terms (time, subject IDs, doses) ----------------------------------------------
def _nlme(fit: Any) -> Any | None:
    """The fit's NLME model (bound to its data), or None for other models."""
    model = fit.model
    return model if hasattr(model, "prediction_grid") and getattr(model, "data", None) is not None else None


def _x_values(fit: Any, x: Any) -> tuple[np.ndarray | None, str]:
    """``(x [N, T], label)``: ``x`` resolved, or for NLME fits without ``x`` the data's x-variable (time)."""
    model = _nlme(fit)
    if model is not None and (x is None or (isinstance(x, str) and x == model.x_name)):
        return model.data.x_values, model.x_name
    if model is not None and isinstance(x, str):
        if x not in model.data.regressors:
            raise ValueError(f"x={x!r} is not a column of the data passed to the model (available: "
                             f"{sorted({model.x_name, *model.data.regressors})})")
        return model.data.regressors[x], x
    if x is None:
        return None, "x"
    return resolve_x(fit, x), x if isinstance(x, str) else "x"


def _natural(model: Any, a: np.ndarray) -> np.ndarray:
    """Model-scale values (log for an exponential error) back on the scale of the data."""
    return np.exp(a) if model is not None and getattr(model, "error", None) == "exponential" else a


def _unit_label(model: Any, i: int) -> str:
    """Panel title of unit ``i``: the ID column's name and the subject's ID."""
    ident = model.data.ids[i]
    ident = ident.item() if isinstance(ident, np.generic) else ident
    return f"{model.data.columns.get('id', 'ID')} {ident}"


def _draw_doses(ax: Any, model: Any, i: int, keep: np.ndarray | None = None) -> None:
    """Doses of unit ``i`` (those of ``keep [D]``) as small triangles on the x-axis; infusions as shaded spans."""
    data = model.data
    real = (data.dose_amt[i] > 0) & (True if keep is None else keep)
    t_d, amt, rate = data.dose_time[i][real], data.dose_amt[i][real], data.dose_rate[i][real]
    if not t_d.size:
        return
    ax.plot(t_d, np.zeros_like(t_d), ls="none", marker="^", ms=5, color="tab:purple", clip_on=False,
            transform=ax.get_xaxis_transform(), label="dose", zorder=4)
    for k, (t0, a, r) in enumerate(zip(t_d[rate > 0], amt[rate > 0], rate[rate > 0])):
        ax.axvspan(t0, t0 + a / r, color="tab:purple", alpha=0.12, lw=0, label="infusion" if k == 0 else None)


def _log_scale(axis: Any) -> None:
    """A logarithmic x- or y-axis (``ax.xaxis`` / ``ax.yaxis``) with plain tick labels (0.6, 2, 10)."""
    from matplotlib.ticker import LogFormatter

    class _Plain(LogFormatter):
        """matplotlib's choice of labelled ticks, written as plain numbers."""

        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(_Plain())
    axis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _set_log_y(ax: Any, values: np.ndarray) -> None:
    """Log y-axis, its lower limit set by the positive ``values`` (observations and the curves over the
    observed range: a curve that starts at 0 before absorption would stretch the axis)."""
    ax.set_yscale("log", nonpositive="mask")
    _log_scale(ax.yaxis)
    pos = values[np.isfinite(values) & (values > 0)]
    if pos.size:
        ax.set_ylim(bottom=0.7 * pos.min())


def _curves_on_grid(model: Any, theta: dict[str, Any], mode: Any, num_points: int) -> Any:
    """IPRED and PRED ``[2, N, G]`` on the fine grid of :meth:`prediction_grid` (each point at its response, period and
    occasion; its doses and covariates: constants of the compiled program,
    :func:`~latentfit.inference.diagnostics.model_program`)."""
    z = model.ops.xp.stack([mode, model.prior_moments(theta)[0]])  # [2, N, d]
    return model.structural_prediction_at(theta, z, model.prediction_grid(num_points))


def _curves_at_observations(model: Any, theta: dict[str, Any], mode: Any) -> Any:
    """IPRED and PRED ``[2, N, T]`` at the observations."""
    return model.structural_prediction(theta, model.ops.xp.stack([mode, model.prior_moments(theta)[0]]))


#: colours of the occasions of an IOV model (purple marks the doses)
OCCASION_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:brown", "tab:cyan", "tab:olive", "tab:pink", "tab:gray")


def _value_text(v: Any) -> str:
    """A label value as the data write it (2.0 -> '2')."""
    v = v.item() if isinstance(v, np.generic) else v
    return f"{v:g}" if isinstance(v, float) else str(v)


def _overlapping(units: list[int], num_responses: int, gx: np.ndarray, gmask: np.ndarray, response: np.ndarray,
                 piece: np.ndarray) -> bool:
    """Whether two pieces (occasions, or periods) of one subject's response overlap in x: a cross-over whose time
    restarts at each occasion (their curves would lie on top of each other in one panel)."""
    for i in units:
        for r in range(num_responses):
            spans = sorted((gx[i][sel].min(), gx[i][sel].max()) for k in np.unique(piece[i][gmask[i]])
                           if (sel := gmask[i] & (response[i] == r) & (piece[i] == k)).any())
            if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
                return True
    return False


def _individual_fits_nlme(fit: Any, model: Any, x: Any, units: list[int], ncols: int, figsize: Any, log: bool,
                          num_points: int) -> Any:
    """One panel per subject (and per response of a multi-response model): the observations, IPRED and PRED on the
    fine grid of :meth:`prediction_grid` (else joined at the observations).  Occasions of an IOV model: one colour
    each (IPRED at that occasion's κ), a panel each when their times overlap (a cross-over restarting the time);
    periods of a model without IOV likewise drawn apart when their times overlap."""
    plt = _plt()
    ops, data = model.ops, model.data
    xv, xlabel = _x_values(fit, x)
    theta, mode = fit._theta(), ops.asarray(fit.individual_estimates().mode)
    grid = model.prediction_grid(num_points) if xlabel == model.x_name else None
    response_obs, occasion_obs = _response_and_occasion(model, data.mask.shape)  # of the observations
    zeros = np.zeros(data.mask.shape, dtype=np.int64)
    period_obs = data.obs_seg.astype(np.int64) if data.obs_seg is not None else zeros
    if grid is not None:
        gx, gmask = grid.x, grid.mask
        curves = ops.to_numpy(model_program(model, _curves_on_grid, num_points)(theta, mode))
        response, occasion = grid.response, grid.occasion
        period = grid.period if grid.period is not None else np.zeros(gx.shape, dtype=np.int64)
    else:  # predictions at the observations only, joined by segments
        gx, gmask = xv, data.mask
        curves = ops.to_numpy(model_program(model, _curves_at_observations)(theta, mode))
        response, occasion, period = response_obs, occasion_obs, period_obs
    occ = getattr(model, "_iov", None)
    # the pieces drawn apart: occasions (IOV), else periods; a panel each where their times overlap
    piece, piece_obs = (occasion, occasion_obs) if occ is not None else (period, period_obs)
    names = model._resp.names if getattr(model, "_resp", None) is not None else [None]
    split = _overlapping(units, len(names), gx, gmask, response, piece)
    panels = []
    for i in units:
        for r in range(len(names)):
            seen = data.mask[i] & (response_obs[i] == r)
            if seen.any():
                panels += [(i, r, int(k)) for k in np.unique(piece_obs[i][seen])] if split else [(i, r, None)]
    colour_of: dict[str, str] = {}
    if occ is not None:
        drawn = np.unique(np.concatenate([occ.labels[i][np.isfinite(occ.labels[i])] for i in units]))
        colour_of = {_value_text(v): OCCASION_COLOURS[j % len(OCCASION_COLOURS)] for j, v in enumerate(drawn)}
    ncols = min(ncols, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (3 * ncols, 2.5 * nrows), squeeze=False)
    dv_name = data.columns.get("dv", "DV")
    groups: dict[tuple[int, int], list[Any]] = {}
    for ax, (i, r, k) in zip(axes.flat, panels):
        groups.setdefault((i, r), []).append(ax)
        mine = gmask[i] & (response[i] == r) & (True if k is None else piece[i] == k)
        mine_obs = data.mask[i] & (response_obs[i] == r) & (True if k is None else piece_obs[i] == k)
        for kk, ss in sorted(set(zip(occasion[i][mine].tolist(), period[i][mine].tolist()))):
            part = mine & (occasion[i] == kk) & (period[i] == ss)
            order = np.argsort(gx[i][part], kind="stable")
            xi = gx[i][part][order]
            if occ is not None:
                text = _value_text(occ.labels[i, kk])
                suffix, ipred_colour = f" · {occ.column} {text}", colour_of[text]
                pred_colour = ipred_colour
            else:
                suffix, ipred_colour, pred_colour = "", "tab:blue", "tab:orange"
            ax.plot(xi, curves[0, i][part][order], lw=1.4, color=ipred_colour, label="IPRED" + suffix)
            ax.plot(xi, curves[1, i][part][order], lw=1.1, ls="--", color=pred_colour, label="PRED" + suffix,
                    alpha=0.8 if occ is not None else 1.0)
        obs = mine_obs & (data.cens[i] == 0)
        cens = mine_obs & (data.cens[i] != 0)
        ax.scatter(xv[i][obs], data.dv[i][obs], s=14, color="k", zorder=3, label="observed")
        if cens.any():
            ax.scatter(xv[i][cens], data.dv[i][cens], s=18, facecolors="none", edgecolors="k", marker="v",
                       zorder=3, label="censored (limit)")
        if data.x is None and xlabel == model.x_name:
            _draw_doses(ax, model, i, None if k is None else _dose_pieces(model, i) == k)
        title = _unit_label(model, i) + (f" · {names[r]}" if names[r] is not None else "")
        if k is not None:
            title += (f" · {occ.column} {_value_text(occ.labels[i, k])}" if occ is not None else f" · period {k + 1}")
        ax.set_title(title, fontsize=9)
        if names[r] is not None:
            ax.set_ylabel(names[r], fontsize=9)
        if log:
            first = data.x_values[i][mine_obs].min()
            inside = mine & (gx[i] >= first)
            _set_log_y(ax, np.concatenate([data.dv[i][mine_obs], curves[:, i][:, inside].ravel()]))
    for group in groups.values():  # a subject's occasions (or periods) drawn apart: one y-scale
        if len(group) > 1:
            lims = np.array([ax.get_ylim() for ax in group])
            for ax in group:
                ax.set_ylim(lims[:, 0].min(), lims[:, 1].max())
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    if names[0] is None:
        for ax in axes[:, 0]:
            ax.set_ylabel(dv_name)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _figure_legend(fig, list(axes.flat)[:len(panels)])
    return fig


def _dose_pieces(model: Any, i: int) -> np.ndarray:
    """The occasion (IOV), else the period, of each dose record of unit ``i`` (as the curves' pieces)."""
    data = model.data
    seg = data.dose_seg[i] if data.dose_seg is not None else np.zeros(data.dose_time.shape[1])
    occ = getattr(model, "_iov", None)
    if occ is None:
        return seg.astype(np.int64)
    if occ.num_occasions < 2:
        return np.zeros(seg.shape, dtype=np.int64)
    from latentfit.models.nlme import occasions as _occ

    start, oseg, valid = (a[i:i + 1] for a in _occ.starts(data, model._table.column(occ.column), occ)[:3])
    return _occ._occasion_at(data.dose_time[i:i + 1], seg[None, :], start, oseg, valid)[0]


def _response_and_occasion(model: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Response and occasion index of each observation ``[N, T]``: zeros for a model without several responses /
    IOV."""
    resp, occ = getattr(model, "_resp", None), getattr(model, "_iov", None)
    zeros = np.zeros(shape, dtype=np.int64)
    response = model.ops.to_numpy(resp.index) if resp is not None else zeros
    occasion = model.ops.to_numpy(occ.occ) if occ is not None else zeros
    return np.asarray(response), np.asarray(occasion)


def _figure_legend(fig: Any, axes: list[Any]) -> None:
    """One legend above the panels (the distinct labels of ``axes``), so that it hides no data: as many rows as
    its entries need at the figure's width."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(lab, h)
    curves = [lab for lab in entries if lab.split(" · ")[0] in ("IPRED", "PRED")]  # the curves (per occasion) first
    labels = curves + [lab for lab in entries if lab not in curves]
    handles = [entries[lab] for lab in labels]
    width, height = fig.get_size_inches()
    entry = 0.5 + 0.07 * max((len(lab) for lab in labels), default=0)  # inches: handle, gap and text at 8 pt
    ncol = max(1, min(len(labels), int(width // entry)))
    rows = int(np.ceil(len(labels) / ncol))
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.1 + 0.22 * rows) / height))


def _default_units(num_units: int, max_panels: int | None, what: str) -> list[int]:
    """The units drawn when the caller names none: all of them, or the first ``max_panels`` with a warning that says
    how to draw others (a panel per subject of a 5000-subject population took ~170 s and drew a figure nobody can
    read)."""
    if max_panels is None or num_units <= max_panels:
        return list(range(num_units))
    warnings.warn(f"plot_individual_fits draws the first {max_panels} of {num_units} {what}; choose others with "
                  f"{'ids= or ' if what == 'subjects' else ''}units=, or pass max_panels=None for all",
                  UserWarning, stacklevel=user_stacklevel())
    return list(range(max_panels))


def plot_individual_fits(fit: Any, x: Any = None, units: Any = None, ncols: int = 4, figsize: Any = None, *,
                         ids: Any = None, log: bool = False, num_points: int = 150,
                         max_panels: int | None = 36) -> Any:
    """Observations with PRED and IPRED per unit.

    NLME fits: against the data's time (or x-variable) by default, one panel per subject titled by its ID
    (``ids=``: those subjects only), IPRED (conditional modes) and PRED (population) as smooth curves of the
    structural model on ``num_points`` points per subject from the first dose, doses as triangles on the x-axis and
    infusions as spans.  Several responses (``DVID``): a panel per subject and response, each with its own curves and
    observations.  Occasions (IOV): a colour per occasion, IPRED with that occasion's κ; where occasions
    overlap in time (a cross-over whose time restarts at each occasion) a panel per occasion, one y-scale per
    subject (one time axis would draw the occasions on top of each other; shifting them would make the axis lie
    about the time since the dose); periods after a reset likewise when their times overlap.  Other models: ``x``
    (default the observation index), predictions joined at the observations.
    ``log``: logarithmic y-axis.  Without ``units`` or ``ids``, every unit up to ``max_panels`` (the first
    ``max_panels`` of a larger population, with a warning; None: all of them).
    """
    model = _nlme(fit)
    if model is not None:
        if ids is not None:
            pos = {v.item() if isinstance(v, np.generic) else v: k for k, v in enumerate(model.data.ids)}
            missing = [v for v in ids if v not in pos]
            if missing:
                raise ValueError(f"ids {missing} are not in the data (IDs: {list(pos)})")
            units = [pos[v] for v in ids]
        units = _default_units(model.num_units, max_panels, "subjects") if units is None else list(units)
        return _individual_fits_nlme(fit, model, x, units, ncols, figsize, log, num_points)
    if ids is not None:
        raise ValueError("ids= needs a fit of an NLME model (with an ID column); use units= (indices)")
    plt = _plt()
    res = fit.residuals()
    n, t = res.y.shape
    xv = resolve_x(fit, x)
    if xv is None:
        xv = np.broadcast_to(np.arange(t, dtype=float), (n, t))
    units = _default_units(n, max_panels, "units") if units is None else list(units)
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
        if log:
            _set_log_y(ax, res.y[i][sel])
    for ax in list(axes.flat)[len(units):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----- visual predictive check ------------------------------------------------------------------------------------
def prediction_correct(y: np.ndarray, pred: np.ndarray, which: np.ndarray, lower_bound: float = 0.0) -> np.ndarray:
    """Prediction correction of a pcVPC (Bergstrand et al. 2011): ``lb + (y − lb)(PRED_bin − lb)/(PRED − lb)``.

    ``y [..., M]`` observations (or simulations, leading replicate axes), ``pred [M]`` their population
    predictions, ``which [M]`` their bin indices; ``PRED_bin`` is the median of ``pred`` in each bin.  An
    observation whose prediction is not above ``lower_bound`` (e.g. before an oral dose is absorbed) is kept.
    """
    return _corrected(np.array(y, dtype=float), _correction_ratio(pred, which, lower_bound), lower_bound)


def _correction_ratio(pred: np.ndarray, which: np.ndarray, lower_bound: float = 0.0) -> np.ndarray:
    """``(PRED_bin − lb)/(PRED − lb)`` of each observation (1 where ``PRED`` is not above ``lb``): see
    :func:`prediction_correct`."""
    pred = np.asarray(pred, dtype=float)
    which = np.asarray(which)
    med = np.zeros(int(which.max()) + 1 if which.size else 0)
    for b in np.unique(which):
        med[b] = np.median(pred[which == b])
    ok = pred > lower_bound
    return np.where(ok, (med[which] - lower_bound) / np.where(ok, pred - lower_bound, 1.0), 1.0)


def _corrected(values: np.ndarray, ratio: np.ndarray, lower_bound: float = 0.0) -> np.ndarray:
    """``lb + (values − lb) · ratio``, in place in ``values`` (a float array the caller owns): a VPC's simulations
    are ~200 MB at N = 5000, and each temporary of that size is memory to fault in."""
    values -= lower_bound
    values *= ratio
    values += lower_bound
    return values


def vpc_summary(fit: Any, x: Any = None, *, pred_corrected: bool | None = None, num_sims: int = 500,
                bins: Any = None, level: float = 0.9, seed: int = 0, max_bins: int = 10,
                quantiles: tuple[float, ...] = (0.05, 0.5, 0.95), response: str | None = None) -> Any:
    """VPC summaries (a :class:`~latentfit.inference.diagnostics.VPC`), optionally prediction-corrected.

    NLME fits: against the data's time (or x-variable) by default, on the scale of the data, censored
    observations left out; ``pred_corrected`` defaults to True there (False for other models, which need ``x``).
    Bins: ``bins`` (edges), else up to ``max_bins`` quantile bins of x.  A model with several responses needs
    ``response`` (one of its response names): the observations of that response only.

    A fit with ``rng="per_unit"`` simulates each unit from its own stream (:func:`_vpc_simulations`), so a unit's
    replicates do not depend on the other units or their order; a distributed fit gathers every process's
    observations, x-values, predictions and simulations (in unit order) before binning, so every process returns
    the one-process VPC (a collective: call it on every process; an ``x`` array holds this process's units).
    """
    model, ops, theta = _nlme(fit), fit.model.ops, fit._theta()
    xv, _ = _x_values(fit, x)
    if xv is None:
        raise ValueError("vpc needs x (an [N, T] array or the name of a keyword argument of the model call) for a "
                         "model that is not an NLME model")
    pred_corrected = model is not None if pred_corrected is None else bool(pred_corrected)
    streams, dist = _fit_streams(fit)
    if dist is None and streams["unit_ids"] is None:  # one stream: chunks of replicates (memory bounded whatever N)
        from latentfit.inference.diagnostics import simulation_chunks

        chunks = simulation_chunks(fit.model, theta, num_sims, seed)
    else:
        chunks = iter([_vpc_simulations(fit, num_sims, seed)])  # [K, N, T]
    if model is not None:
        y, mask = model.data.dv, model.data.mask & (model.data.cens == 0)
        mask = mask & _response_mask(model, response)
    else:
        y, mask = (ops.to_numpy(a) for a in fit.model.observations())
        mask = mask.astype(bool)
    xv = np.asarray(xv, dtype=float)
    if xv.shape != y.shape:
        raise ValueError(f"x must have the shape of the observations {y.shape}, got {xv.shape}")
    xo, yo, po = xv[mask], y[mask], None
    so = (_natural(model, sims)[:, mask] for sims in chunks)  # [K_c, M] each
    if pred_corrected:  # PRED: one compiled program on JAX (op by op, each operation a program to load)
        if model is not None:
            pred = ops.to_numpy(model_program(model, _population_structural)(theta))
        else:
            pred = ops.to_numpy(model_program(fit.model, _population_predict)(theta)[0])
        po = np.asarray(pred)[mask]
    if dist is not None:  # every process's observations (its units' rows, flattened), in rank = unit order
        so = next(so)
        if pred_corrected:
            xo, yo, so, po = _gather_units(dist, (xo, yo, so, po), (0, 0, 1, 0))
        else:
            xo, yo, so = _gather_units(dist, (xo, yo, so), (0, 0, 1))
    return _continuous_bins(xo, yo, so, po if pred_corrected else None, bins, max_bins, quantiles, level)


def _continuous_bins(xo: np.ndarray, yo: np.ndarray, so: Any, po: np.ndarray | None, bins: Any, max_bins: int,
                     quantiles: tuple[float, ...], level: float) -> Any:
    """A continuous VPC's summaries from the observations ``xo, yo [M]``, their simulations ``so [K, M]`` (or chunks
    ``[K_c, M]`` of replicates, an iterable) and, for a prediction-corrected VPC, their population predictions
    ``po [M]``."""
    from latentfit.inference.diagnostics import VPC, default_bins

    edges = np.asarray(bins, dtype=float) if bins is not None else default_bins(xo, max_bins)
    which = np.clip(np.searchsorted(edges, xo, side="right") - 1, 0, len(edges) - 2)
    ratio = None
    if po is not None:  # the simulations corrected bin by bin (a copy of each bin's columns is taken anyway)
        ratio = _correction_ratio(po, which)
        yo = _corrected(np.array(yo, dtype=float), ratio)
    q = np.asarray(quantiles)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    present = [b for b in range(len(edges) - 1) if (which == b).any()]
    per_rep: dict[int, list[np.ndarray]] = {b: [] for b in present}  # each replicate's quantiles [Q, K_c] per chunk
    for chunk in ([so] if isinstance(so, np.ndarray) else so):
        for b in present:
            sel = which == b
            sims = np.asarray(chunk[:, sel], dtype=float)
            if ratio is not None:
                sims = _corrected(sims, ratio[sel])
            per_rep[b].append(np.quantile(sims, q, axis=1))
    obs_q, sim_q, bx = [], [], []
    for b in present:
        sel = which == b
        bx.append(np.median(xo[sel]))
        obs_q.append(np.quantile(yo[sel], q))
        reps = np.concatenate(per_rep[b], axis=1)  # [Q, K]
        sim_q.append(np.stack([np.quantile(reps, lo, axis=1), np.median(reps, axis=1),
                               np.quantile(reps, hi, axis=1)], -1))
    return VPC(bin_edges=edges, bin_x=np.asarray(bx), quantiles=tuple(quantiles), observed=np.asarray(obs_q),
               simulated=np.asarray(sim_q), level=level, x=xo, y=yo)


def _fit_streams(fit: Any) -> tuple[dict[str, Any], Any]:
    """``({"unit_ids", "ops"}, distributed ops or None)``: a fit with ``rng="per_unit"`` simulates unit i from its
    stream ``(seed, unit id)`` (as the residuals), the same whatever the sharding or order of the units; otherwise
    one stream for all units (refused for a distributed fit).  A stand-in fit without an engine: one stream."""
    if not hasattr(fit, "engine"):
        return {"unit_ids": None, "ops": None}, None
    from latentfit.inference.postfit import _distributed_ops, _stream_ids

    ids = _stream_ids(fit)
    return {"unit_ids": ids, "ops": fit.engine.ops if ids is not None else None}, _distributed_ops(fit)


def _gather_units(dist: Any, arrays: tuple[Any, ...], axes: tuple[int, ...]) -> list[np.ndarray]:
    """Every process's ``arrays`` concatenated in rank (= unit) order along their unit ``axes`` (a collective)."""
    parts = dist.gather_objects(tuple(arrays))
    return [np.concatenate([p[i] for p in parts], ax) for i, ax in enumerate(axes)]


def _vpc_simulations(fit: Any, num_sims: int, seed: int) -> np.ndarray:
    """``num_sims`` replicated data sets ``[K, n, T]`` of the units of this process at the estimates, on the fit's
    streams (:func:`_fit_streams`)."""
    from latentfit.inference.diagnostics import simulate_observations

    return simulate_observations(fit.model, fit._theta(), num_sims, seed, **_fit_streams(fit)[0])


def plot_vpc(fit: Any, x: Any = None, num_sims: int = 500, bins: Any = None, level: float = 0.9, seed: int = 0,
             figsize: Any = None, log: bool = False, *, pred_corrected: bool | None = None) -> Any:
    """Visual predictive check: observed 5/50/95% quantiles per bin against simulated prediction intervals.

    NLME fits: against the data's time (or x-variable) by default, prediction-corrected (pcVPC) unless
    ``pred_corrected=False``; other models need ``x`` and are not corrected by default.  Bin edges are marked
    on the x-axis.  See :func:`vpc_summary`.  NLME fits of discrete, count or time-to-event outcomes: proportions
    per category or the Kaplan-Meier curve (:func:`plot_discrete_vpc`).
    """
    from latentfit.models.nlme import outcomes as oc

    outcome_model = _outcome_model(fit)
    if outcome_model is not None and isinstance(outcome_model.outcome, oc.Joint):
        if x is not None:
            raise ValueError("a joint model's VPC is drawn against time, one panel per response: x does not apply")
        return plot_joint_vpc(fit, num_sims=num_sims, bins=bins, level=level, seed=seed, log=log, figsize=figsize,
                              pred_corrected=True if pred_corrected is None else bool(pred_corrected))
    if outcome_model is not None:
        if x is not None or log or pred_corrected:
            raise ValueError("a discrete, count or time-to-event outcome's VPC is drawn against time, as proportions "
                             "or a Kaplan-Meier curve: x, log and pred_corrected do not apply")
        return plot_discrete_vpc(fit, num_sims=num_sims, bins=bins, level=level, seed=seed, figsize=figsize)
    plt = _plt()
    model = _nlme(fit)
    pc = model is not None if pred_corrected is None else bool(pred_corrected)
    _, xlabel = _x_values(fit, x)
    responses = model._resp.names if model is not None and getattr(model, "_resp", None) is not None else [None]
    fig, axes = plt.subplots(1, len(responses), figsize=figsize or (4.5 + 4 * len(responses), 4.5), squeeze=False)
    for ax, response in zip(axes[0], responses, strict=True):
        v = vpc_summary(fit, x, pred_corrected=pc, num_sims=num_sims, bins=bins, level=level, seed=seed,
                        response=response)
        _draw_vpc(ax, v, level, xlabel, model, pc, log)
        if response is not None:
            ax.set_title(response, fontsize=10)
            if ax is not axes[0, -1]:  # one legend, right of the last panel
                ax.get_legend().remove()
    fig.tight_layout()
    return fig


def _outcome_model(fit: Any) -> Any | None:
    """The fit's NLME model when it has a discrete, count or time-to-event outcome."""
    model = _nlme(fit)
    return model if model is not None and getattr(model, "outcome", None) is not None else None


def _category_curves(y: np.ndarray, categories: Any) -> tuple[list[str], list[Any]]:
    """Curves of a discrete VPC: ``(labels, indicator functions)``.  ``categories`` None: each observed value when
    there are at most 6 (only the larger of two: ``P(DV = 1)`` for 0/1 data), else ``P(DV <= k)`` at the observed
    quartiles; a list of values: ``P(DV = v)`` for each."""
    if categories is not None:
        vals = [float(v) for v in np.atleast_1d(categories)]
        return [f"P(DV = {v:g})" for v in vals], [lambda a, v=v: a == v for v in vals]
    vals = np.unique(y)
    if vals.size <= 6:
        vals = vals[1:] if vals.size == 2 else vals
        return [f"P(DV = {v:g})" for v in vals], [lambda a, v=v: a == v for v in vals]
    cuts = np.unique(np.round(np.quantile(y, [0.25, 0.5, 0.75])))
    return [f"P(DV <= {k:g})" for k in cuts], [lambda a, k=k: a <= k for k in cuts]


def discrete_vpc_summary(fit: Any, *, num_sims: int = 500, bins: Any = None, level: float = 0.9, seed: int = 0,
                         max_bins: int = 10, categories: Any = None, num_points: int = 101) -> Any:
    """VPC of an NLME fit with a discrete, count or time-to-event outcome (as Monolix and saemix draw them): a
    :class:`~latentfit.inference.diagnostics.DiscreteVPC`.

    Binary, ordinal, count and user-likelihood outcomes: per bin of time (or the x-variable; ``bins`` edges, else up
    to ``max_bins`` quantile bins), the observed fraction of observations in each category (see
    ``categories``; counts: ``P(DV <= k)`` at the observed quartiles) against the ``level`` prediction interval of
    the same fraction over ``num_sims`` data sets simulated at the estimates (random effects drawn from their
    prior).  Time-to-event: the Kaplan-Meier curve of the time to each individual's first event on ``num_points``
    times, against the interval of the simulated Kaplan-Meier curves.  A user log-likelihood with a simulator and
    non-integer data: the (uncorrected) :class:`~latentfit.inference.diagnostics.VPC` of their 5/50/95% quantiles
    per bin instead.

    A fit with ``rng="per_unit"`` simulates each individual from its own stream (random effects from its normals,
    observations and first-event times by inversion at its uniforms), so its replicates do not depend on the other
    individuals or their order; a distributed fit gathers every process's observations and simulations (in unit
    order) before binning, so every process returns the one-process VPC (a collective: call it on every process).
    A user log-likelihood's simulator (it draws all individuals at once) gets one numpy generator seeded from the
    seed and the individuals' unit ids there (:func:`~latentfit.models.nlme.outcomes._user_rng`), so its draws depend
    on which individuals are simulated together.  With occasion effects on the hazard (``iov=``), occasion k's hazard
    holds from its start and the first events solve the piecewise ``H(t) = E``
    (:func:`~latentfit.models.nlme.outcomes.invert_cumulative_hazard`).
    """
    from latentfit.models.nlme import outcomes as oc

    model = _outcome_model(fit)
    if model is None:
        raise ValueError("discrete_vpc_summary is for NLME fits with a discrete, count or time-to-event outcome; "
                         "use vpc_summary")
    streams, dist = _fit_streams(fit)
    theta = fit._theta()
    if isinstance(model.outcome, oc.TimeToEvent):
        t_obs, e_obs = oc.first_event_times(model)
        t_sim, e_sim = oc.first_event_times(model, theta, num_sims, seed, **streams)
        if dist is not None:  # every process's individuals, in rank = unit order
            t_obs, e_obs, t_sim, e_sim = _gather_units(dist, (t_obs, e_obs, t_sim, e_sim), (1, 1, 1, 1))
        return _km_band(t_obs, e_obs, t_sim, e_sim, num_points, level)
    if isinstance(model.outcome, oc.Joint):
        raise ValueError("a joint model has one VPC per response: use joint_vpc_summary (plot_vpc draws them)")
    data = model.data
    mask = data.mask & (data.cens == 0)
    xo, yo = data.x_values[mask], data.dv[mask]
    so = oc.simulate_observations(model, theta, num_sims, seed, **streams)[:, mask]  # [K, M]
    if dist is not None:  # every process's observations (its individuals' rows, flattened), in unit order
        xo, yo, so = _gather_units(dist, (xo, yo, so), (0, 0, 1))
    if isinstance(model.outcome, oc.LogLik) and not np.all(yo == np.round(yo)):  # continuous data: their quantiles
        return _continuous_bins(xo, yo, so, None, bins, max_bins, (0.05, 0.5, 0.95), level)
    return _discrete_bins(xo, yo, so, bins, max_bins, categories, level)


def _km_band(t_obs: np.ndarray, e_obs: np.ndarray, t_sim: np.ndarray, e_sim: np.ndarray, num_points: int,
             level: float) -> Any:
    """The Kaplan-Meier VPC: the observed product-limit curve of the first events ``t_obs, e_obs [1, N]`` on
    ``num_points`` times from 0 to the last observed time, against the ``level`` interval and median of the curves of
    the simulated first events ``t_sim, e_sim [K, N]``."""
    from latentfit.inference.diagnostics import DiscreteVPC
    from latentfit.models.nlme import outcomes as oc

    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    grid = np.linspace(0.0, float(t_obs.max()), num_points)
    km = oc.kaplan_meier(t_sim, e_sim, grid)  # [K, G]
    band = np.stack([np.quantile(km, lo, 0), np.median(km, 0), np.quantile(km, hi, 0)], -1)
    return DiscreteVPC(kind="survival", labels=["no event yet (first event)"], x=grid,
                       observed=oc.kaplan_meier(t_obs, e_obs, grid), simulated=band[None], level=level)


def _discrete_bins(xo: np.ndarray, yo: np.ndarray, so: np.ndarray, bins: Any, max_bins: int, categories: Any,
                   level: float) -> Any:
    """A discrete VPC's proportions per bin and category from the observations ``xo, yo [M]`` and their
    simulations ``so [K, M]`` (see :func:`discrete_vpc_summary`)."""
    from latentfit.inference.diagnostics import DiscreteVPC, default_bins

    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    edges = np.asarray(bins, dtype=float) if bins is not None else default_bins(xo, max_bins)
    which = np.clip(np.searchsorted(edges, xo, side="right") - 1, 0, len(edges) - 2)
    labels, curves = _category_curves(yo, categories)
    present = [b for b in range(len(edges) - 1) if (which == b).any()]
    obs = np.zeros((len(curves), len(present)))
    sim = np.zeros((len(curves), len(present), 3))
    for c, ind in enumerate(curves):
        io, is_ = ind(yo).astype(float), ind(so).astype(float)
        for j, b in enumerate(present):
            sel = which == b
            obs[c, j] = io[sel].mean()
            frac = is_[:, sel].mean(1)  # [K]
            sim[c, j] = np.quantile(frac, lo), np.median(frac), np.quantile(frac, hi)
    bx = np.array([np.median(xo[which == b]) for b in present])
    return DiscreteVPC(kind="proportion", labels=labels, x=bx, observed=obs, simulated=sim, level=level,
                       bin_edges=edges)


def joint_vpc_summary(fit: Any, *, num_sims: int = 500, bins: Any = None, level: float = 0.9, seed: int = 0,
                      max_bins: int = 10, categories: Any = None, pred_corrected: bool = True,
                      quantiles: tuple[float, ...] = (0.05, 0.5, 0.95), num_points: int = 101) -> dict[str, Any]:
    """The VPC of each response of a joint model (several responses, some non-Gaussian: ``error={...}`` beside
    ``outcome={...}``), from one set of ``num_sims`` simulated data sets at the estimates (random effects drawn from
    their prior, every response of a replicate from the same draws: :func:`~latentfit.models.nlme.outcomes.
    simulate_joint`): ``{response: summary}`` in the model's response order,

    * a :class:`~latentfit.inference.diagnostics.VPC` for each Gaussian response (quantiles per bin of time,
      prediction-corrected unless ``pred_corrected=False``, as :func:`vpc_summary`);
    * a :class:`~latentfit.inference.diagnostics.DiscreteVPC` for each binary, ordinal or count response
      (proportions per category and bin, counts ``P(DV <= k)`` at the observed quartiles, as
      :func:`discrete_vpc_summary`);
    * for each time-to-event response, the Kaplan-Meier VPC (a ``DiscreteVPC`` of kind ``"survival"``): the observed
      product-limit curve of each individual's first event of the response (censored at its last record of it) on
      ``num_points`` times, against the ``level`` interval of the curves of the simulated first events (inversion of
      the cumulative hazard, censored at the same end of follow-up); individuals without records of it are left out;
    * for each user log-likelihood response with a simulator (``outcomes.LogLik(simulate_fn=sim)``): the discrete VPC
      when its observations are integers, else the (uncorrected: its "prediction" is a log-likelihood) VPC of its
      quantiles; without a simulator it is refused, the error saying how to give one.

    ``bins`` and ``categories``: one value for all responses or ``{response: value}``.  A time-to-event response whose
    hazard parameters have occasion effects (``iov=``) has occasion k's hazard from the occasion's start (the first
    events by piecewise inversion of the cumulative hazard)."""
    from latentfit.models.nlme import outcomes as oc

    model = _outcome_model(fit)
    if model is None or not isinstance(model.outcome, oc.Joint):
        raise ValueError("joint_vpc_summary is for NLME fits of joint models (error={...} beside outcome={...})")
    streams, dist = _fit_streams(fit)
    theta, ops, data, resp = fit._theta(), model.ops, model.data, model._resp
    sims, first = oc.simulate_joint(model, theta, num_sims, seed, **streams)  # [K, N, T] all responses; first events
    index = np.asarray(ops.to_numpy(resp.index))
    base = data.mask & (data.cens == 0)
    pred = ops.to_numpy(model_program(model, _population_structural)(theta)) if pred_corrected else None

    def pick(option: Any, name: str) -> Any:
        return option.get(name) if isinstance(option, dict) else option

    out = {}
    for k, name in enumerate(resp.all_names):
        mine = base & (index == k)
        kind = resp.spec.outcomes.get(name)
        if isinstance(kind, oc.TimeToEvent):
            has = (data.mask & (index == k)).any(1)
            t_obs, e_obs = oc.first_event_times(model, response=name)
            t_sim, e_sim = first[name]
            arrays = (t_obs[:, has], e_obs[:, has], t_sim[:, has], e_sim[:, has])
            if dist is not None:  # every process's individuals, in rank = unit order
                arrays = _gather_units(dist, arrays, (1, 1, 1, 1))
            out[name] = _km_band(*arrays, num_points, level)
            continue
        xo, yo, so = data.x_values[mine], data.dv[mine], sims[:, mine]
        gaussian = name in resp.names
        po = np.asarray(np.broadcast_to(pred, data.dv.shape))[mine] if gaussian and pred_corrected else None
        if dist is not None:  # every process's observations of this response, in unit order
            if po is not None:
                xo, yo, so, po = _gather_units(dist, (xo, yo, so, po), (0, 0, 1, 0))
            else:
                xo, yo, so = _gather_units(dist, (xo, yo, so), (0, 0, 1))
        if gaussian or (isinstance(kind, oc.LogLik) and not np.all(yo == np.round(yo))):
            out[name] = _continuous_bins(xo, yo, so, po, pick(bins, name), max_bins, quantiles, level)
        else:
            out[name] = _discrete_bins(xo, yo, so, pick(bins, name), max_bins, pick(categories, name), level)
    return out


def plot_joint_vpc(fit: Any, *, num_sims: int = 500, bins: Any = None, level: float = 0.9, seed: int = 0,
                   categories: Any = None, pred_corrected: bool = True, log: bool = False,
                   figsize: Any = None) -> Any:
    """One panel per response of a joint model (:func:`joint_vpc_summary`): a Gaussian response's VPC (observations,
    observed 5/50/95% quantiles against their simulated intervals, prediction-corrected by default; ``log``: its y
    axis), a non-Gaussian response's observed proportion of each category per time bin (line with markers) against
    the simulated median (dashed) and interval (shaded), one colour per category, a time-to-event response's observed
    Kaplan-Meier curve of the first event (black steps) against the simulated curves' median and interval."""
    from latentfit.inference.diagnostics import VPC

    plt = _plt()
    model = _outcome_model(fit)
    summaries = joint_vpc_summary(fit, num_sims=num_sims, bins=bins, level=level, seed=seed, categories=categories,
                                  pred_corrected=pred_corrected)
    pct = f"{100 * level:g}%"
    n = len(summaries)
    fig, axes = plt.subplots(1, n, figsize=figsize or (1.0 + 5.0 * n, 4.3), squeeze=False)
    for ax, (name, v) in zip(axes[0], summaries.items(), strict=True):
        if isinstance(v, VPC):
            pc = pred_corrected and name in model._resp.names
            _draw_vpc(ax, v, level, model.x_name, model, pc, log)
            ax.set_ylabel(f"{name} (prediction-corrected)" if pc else name)
        elif v.kind == "survival":
            ax.fill_between(v.x, v.simulated[0, :, 0], v.simulated[0, :, 2], step="post", color="tab:blue",
                            alpha=0.25, label=f"simulated {pct} PI")
            ax.step(v.x, v.simulated[0, :, 1], where="post", color="tab:blue", ls="--", label="simulated median")
            ax.step(v.x, v.observed[0], where="post", color="k", lw=1.5, label="observed (Kaplan-Meier)")
            ax.set_xlabel(model.data.columns.get("time", "TIME"))
            ax.set_ylabel(f"{name}: probability of no event yet")
            ax.set_ylim(-0.02, 1.02)
        else:
            for c, label in enumerate(v.labels):
                color = f"C{c}"
                ax.fill_between(v.x, v.simulated[c, :, 0], v.simulated[c, :, 2], color=color, alpha=0.2,
                                label=f"simulated {pct} PI" if c == 0 else None)
                ax.plot(v.x, v.simulated[c, :, 1], color=color, ls="--",
                        label="simulated median" if c == 0 else None)
                ax.plot(v.x, v.observed[c], color=color, marker="o", ms=4, lw=1.5, label=f"observed {label}")
            inner = v.bin_edges[(v.bin_edges > v.x.min()) & (v.bin_edges < v.x.max())]
            ax.plot(inner, np.zeros_like(inner), ls="none", marker="|", ms=8, color="0.3", clip_on=False,
                    transform=ax.get_xaxis_transform())
            ax.set_xlabel(model.x_name)
            ax.set_ylabel(f"{name}: proportion")
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=6, loc="best", frameon=False)
    fig.tight_layout()
    return fig


def plot_discrete_vpc(fit: Any, *, num_sims: int = 500, bins: Any = None, level: float = 0.9, seed: int = 0,
                      categories: Any = None, figsize: Any = None) -> Any:
    """The VPC of :func:`discrete_vpc_summary`: one panel per category (proportions by time bin, observed as a line
    with markers, the simulated median dashed in a shaded prediction interval) or the Kaplan-Meier panel."""
    from latentfit.models.nlme import outcomes as oc

    plt = _plt()
    model = _outcome_model(fit)
    if model is not None and isinstance(model.outcome, oc.Joint):  # one panel per response
        return plot_joint_vpc(fit, num_sims=num_sims, bins=bins, level=level, seed=seed, categories=categories,
                              figsize=figsize)
    v = discrete_vpc_summary(fit, num_sims=num_sims, bins=bins, level=level, seed=seed, categories=categories)
    from latentfit.inference.diagnostics import VPC

    if isinstance(v, VPC):  # a user log-likelihood's continuous data: the VPC of their quantiles
        fig, ax = plt.subplots(figsize=figsize or (8.5, 4.5))
        _draw_vpc(ax, v, level, model.x_name, model, False, False)
        fig.tight_layout()
        return fig
    pct = f"{100 * level:g}%"
    fig, axes = plt.subplots(1, len(v.labels), figsize=figsize or (1.5 + 4 * len(v.labels), 4), squeeze=False)
    for c, ax in enumerate(axes[0]):
        if v.kind == "survival":
            ax.fill_between(v.x, v.simulated[c, :, 0], v.simulated[c, :, 2], step="post", color="tab:blue",
                            alpha=0.25, label=f"simulated: {pct} PI")
            ax.step(v.x, v.simulated[c, :, 1], where="post", color="tab:blue", ls="--", label="simulated median")
            ax.step(v.x, v.observed[0], where="post", color="k", lw=1.5, label="observed (Kaplan-Meier)")
            ax.set_ylabel("probability of no event yet")
            ax.set_xlabel(model.data.columns.get("time", "TIME"))
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.fill_between(v.x, v.simulated[c, :, 0], v.simulated[c, :, 2], color="tab:blue", alpha=0.25,
                            label=f"simulated: {pct} PI")
            ax.plot(v.x, v.simulated[c, :, 1], color="tab:blue", ls="--", label="simulated median")
            ax.plot(v.x, v.observed[c], color="k", marker="o", ms=4, lw=1.5, label="observed")
            inner = v.bin_edges[(v.bin_edges > v.x.min()) & (v.bin_edges < v.x.max())]
            ax.plot(inner, np.zeros_like(inner), ls="none", marker="|", ms=8, color="0.3", clip_on=False,
                    transform=ax.get_xaxis_transform())
            ax.set_xlabel(model.x_name)
            ax.set_ylabel("proportion")
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(v.labels[c], fontsize=10)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _response_mask(model: Any, response: str | None) -> np.ndarray:
    """``[N, T]``: the observations of ``response`` (all of them for a model with one response)."""
    resp = getattr(model, "_resp", None)
    if resp is None:
        if response is not None:
            raise ValueError(f"response={response!r}: the model has a single response")
        return np.ones(model.data.mask.shape, dtype=bool)
    if response not in resp.names:
        raise ValueError(f"the model has several responses {resp.names}: give response= one of them "
                         f"(got {response!r})")
    return model.ops.to_numpy(resp.index) == resp.names.index(response)


def _draw_vpc(ax: Any, v: Any, level: float, xlabel: str, model: Any, pc: bool, log: bool) -> None:
    """One VPC panel (see :func:`plot_vpc`)."""
    ax.scatter(v.x, v.y, s=8, color="0.5", alpha=0.6, label="observations")
    names = [f"{100 * q:g}%" for q in v.quantiles]
    mid = int(np.argmin(np.abs(np.asarray(v.quantiles) - 0.5)))
    outer = " / ".join(n for j, n in enumerate(names) if j != mid)
    pct = f"{100 * level:g}%"
    for j in range(len(v.quantiles)):
        c, first = ("tab:red", True) if j == mid else ("tab:blue", j == (1 if mid == 0 else 0))
        what = "median" if j == mid else f"{outer} quantiles"
        ax.fill_between(v.bin_x, v.simulated[:, j, 0], v.simulated[:, j, 2], color=c, alpha=0.2,
                        label=f"simulated {what}: {pct} PI" if first else None)
        ax.plot(v.bin_x, v.observed[:, j], color=c, lw=1.5, label=f"observed {what}" if first else None)
    inner = v.bin_edges[(v.bin_edges > v.x.min()) & (v.bin_edges < v.x.max())]
    ax.plot(inner, np.zeros_like(inner), ls="none", marker="|", ms=8, color="0.3", clip_on=False,
            transform=ax.get_xaxis_transform())
    ax.set_xlabel(xlabel)
    ylabel = model.data.columns.get("dv", "DV") if model is not None else "observations"
    ax.set_ylabel(f"{ylabel} (prediction-corrected)" if pc else ylabel)
    if log:
        _set_log_y(ax, v.y)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


# ----- goodness of fit --------------------------------------------------------------------------------------------
def plot_gof(fit: Any, x: Any = None, figsize: Any = None, log: bool = False) -> Any:
    """Goodness-of-fit panels as saemix / Monolix lay them out (2 × 3).

    DV vs PRED and DV vs IPRED (identity lines), IWRES vs x and vs IPRED, NPDE vs x and vs PRED (zero and
    ±1.96 lines).  ``x``: the data's time (or x-variable) by default for NLME fits, else the observation index.
    ``log``: logarithmic axes on the DV-vs-prediction panels.  A model with several responses (Monolix: one panel
    per observation type): the 2 × 3 block once per response, its panels' titles starting with the response's name.
    """
    plt = _plt()
    model = _nlme(fit)
    res = fit.residuals()
    xv, xlabel = _x_values(fit, x)
    if xv is None:
        xv, xlabel = np.broadcast_to(np.arange(res.mask.shape[1], dtype=float), res.mask.shape), "observation index"
    y, pred, ipred = (_natural(model, a) for a in (res.y, res.pred, res.ipred))
    groups = _response_panels(fit, res.mask)
    fig, axes = plt.subplots(2 * len(groups), 3, figsize=figsize or (12, 7.5 * len(groups)), squeeze=False)
    for g, (response, m) in enumerate(groups):
        top, bottom = axes[2 * g], axes[2 * g + 1]
        for ax, p, label in ((top[0], pred, "PRED"), (top[1], ipred, "IPRED")):
            ax.scatter(p[m], y[m], s=12, alpha=0.7)
            both = np.concatenate([p[m], y[m]])
            both = both[both > 0] if log else both
            lo, hi = both.min(), both.max()
            ax.plot([lo, hi], [lo, hi], color="k", lw=1)
            ax.set_xlabel(label)
            ax.set_ylabel("DV")
            ax.set_title(_titled(response, f"DV vs {label}"), fontsize=10)
            if log:
                ax.set_xscale("log", nonpositive="mask")
                ax.set_yscale("log", nonpositive="mask")
                _log_scale(ax.xaxis)
                _log_scale(ax.yaxis)
        panels = ((top[2], xv, res.iwres, xlabel, "IWRES"), (bottom[0], ipred, res.iwres, "IPRED", "IWRES"),
                  (bottom[1], xv, res.npde, xlabel, "NPDE"), (bottom[2], pred, res.npde, "PRED", "NPDE"))
        for ax, xx, r, xl, yl in panels:
            ax.scatter(np.asarray(xx)[m], r[m], s=12, alpha=0.7)
            ax.axhline(0, color="k", lw=1)
            for lvl in (-1.96, 1.96):
                ax.axhline(lvl, color="k", lw=0.8, ls="--")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(_titled(response, f"{yl} vs {xl}"), fontsize=10)
    fig.tight_layout()
    return fig


__all__ = ["discrete_vpc_summary", "joint_vpc_summary", "plot_convergence", "plot_discrete_vpc", "plot_gof",
           "plot_individual_fits", "plot_joint_vpc", "plot_observations_vs_predictions", "plot_residuals", "plot_vpc",
           "prediction_correct", "resolve_x", "vpc_summary"]
