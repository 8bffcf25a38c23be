"""Outputs of an NLME fit: CSV tables, diagnostic plots (PNG) and one self-contained HTML report.

``write_fit_outputs(fit, out_dir, ...)`` writes, for ``latentfit nlme fit``:

* ``estimates.csv``: estimate, SE and RSE% of every parameter (saemix's fixed effects / variances table; SEs by
  linearisation unless ``se_method="sa"``);
* ``likelihood.csv``: −2LL, AIC and BIC by linearisation, importance sampling and Gauss–Hermite quadrature
  (saemix's ``llis`` / ``lllin`` / ``llgq``);
* ``individual_estimates.csv``: per subject (ID) the conditional mode (EBE, saemix's ``map.psi``), conditional mean
  and sd of every parameter on its natural scale, the EBEs of the random effects η (``eta_<name>``) and the
  covariates; ``shrinkage.csv``: η-shrinkage 1 − var(η̂)/ω² of the modes and the means, in %;
* ``replicates.csv`` (fits with ``replicates = R``): seed, start, log-likelihood, MC SE and estimates of each run;
* ``residuals.csv``: per observation ID, time (or x), the response column of a model with several responses (DVID,
  or the name the data use), DV, PRED, IPRED, IWRES, EPRED, PWRES, NPDE;
* ``individual_fits.png``, ``gof.png``, ``vpc.png`` (prediction-corrected), ``convergence.png``;
* ``report.html``: all of the above in one file (tables as HTML, figures embedded as base64 PNG, the model file and
  the run information); it references no other file.

Numbers are written as Python's shortest round-trip representation, so an estimates file read back
(:func:`~latentfit.models.nlme.config.read_estimates`) is the fit's θ̂ bit for bit.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import platform
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: figures of the report: file stem -> (section title, caption)
FIGURES = {
    "individual_fits": ("Individual fits", "Observations (points), individual predictions IPRED (conditional modes, "
                                           "solid) and population predictions PRED (dashed) per subject (and response; "
                                           "a colour per occasion)."),
    "gof": ("Goodness of fit", "DV vs PRED and IPRED (identity line); IWRES and NPDE against time (or x) and the "
                               "predictions (±1.96 dashed)."),
    "vpc": ("Visual predictive check", "Prediction-corrected VPC: observed 5/50/95% quantiles per bin (lines) against "
                                       "the 90% prediction intervals of the same quantiles over simulated data sets "
                                       "(bands)."),
    "discrete_vpc": ("Visual predictive check", "Discrete or count data: the observed proportion of each category "
                                                "(counts: at or below a value) per time bin (black) against the 90% "
                                                "prediction interval of the same proportion over simulated data sets "
                                                "(band, dashed median); time-to-event data: the Kaplan-Meier curve of "
                                                "the first event against the simulated curves' interval; a user "
                                                "log-likelihood's continuous data: the VPC of their quantiles."),
    "joint_vpc": ("Visual predictive check", "One panel per response, from one set of simulated data sets: a Gaussian "
                                             "response's prediction-corrected VPC (observed 5/50/95% quantiles per "
                                             "bin against their simulated 90% intervals), a discrete or count "
                                             "response's observed proportion of each category per time bin against "
                                             "the simulated 90% interval (band, dashed median), a time-to-event "
                                             "response's Kaplan-Meier curve of the first event against the simulated "
                                             "curves' 90% interval."),
    "convergence": ("Convergence", "Parameter estimates along the SAEM iterations (saemix's convergence plot)."),
}
#: the files :func:`write_fit_outputs` may write (``latentfit nlme fit --force`` removes them from ``--out`` first)
OUTPUT_FILES = frozenset({"estimates.csv", "likelihood.csv", "shrinkage.csv", "individual_estimates.csv",
                          "residuals.csv", "replicates.csv", "covariates.csv", "report.html",
                          *(f"{stem}.png" for stem in FIGURES)})
#: sections of the report, in order: id -> heading
SECTIONS = {
    "run": "Run information",
    "warnings": "Warnings",
    "estimates": "Parameter estimates",
    "likelihood": "Likelihood",
    "shrinkage": "Shrinkage",
    "individual": "Individual estimates",
    "replicates": "Replicate fits",
    "residuals": "Residuals",
    "figures": "Diagnostic plots",
    "model-file": "Model file",
}
#: residual rows shown in the report (all are in residuals.csv)
MAX_RESIDUAL_ROWS = 2000


@dataclass
class SavedFit:
    """Estimates read back from a fit's ``estimates.csv`` with the model bound to data: what the simulation and VPC
    functions of :mod:`latentfit.plots` need of a fit (``model``, ``params``, ``_theta()``)."""

    model: Any
    params: dict[str, Any]

    def _theta(self) -> dict[str, Any]:
        ops = self.model.ops
        return {n: ops.asarray(np.asarray(v, dtype=float)) for n, v in self.params.items()}


# ----- tables -----------------------------------------------------------------------------------------------------
def estimates_table(fit: Any, se_method: str = "lin") -> pd.DataFrame:
    """``parameter, estimate, se, rse%`` (SEs: ``fit.summary(method=se_method)``; NaN where unavailable)."""
    try:
        table = fit.summary(method=se_method)
    except (ValueError, NotImplementedError, np.linalg.LinAlgError, RuntimeError) as err:
        table = fit.summary(se=False)
        table["se"], table["rse%"] = np.nan, np.nan
        table.attrs["note"] = f"standard errors ({se_method}) could not be computed: {err}"
    return table.reset_index()


def covariate_reference_table(model: Any) -> pd.DataFrame:
    """``covariate, kind, value``: the value each centred covariate is centred at (kind ``center``) and each
    categorical covariate's levels (kind ``level``, the reference level first), as the model was fitted
    (``model.covariate_reference``); what ``latentfit nlme simulate`` / ``vpc`` apply to another design."""
    rows = []
    for col, ref in getattr(model, "covariate_reference", {}).items():
        if isinstance(ref, tuple):
            rows += [(col, "level", str(v)) for v in ref]
        else:
            rows.append((col, "center", repr(float(ref))))
    return pd.DataFrame(rows, columns=["covariate", "kind", "value"])


def covariate_reference_text(model: Any) -> str:
    """One sentence naming the covariates' references (empty without centred or categorical covariates)."""
    parts = []
    transforms = {c: t for items in getattr(model, "covariate_spec", {}).values() for c, t in items}
    for col, ref in getattr(model, "covariate_reference", {}).items():
        if isinstance(ref, tuple):
            parts.append(f"{col}: levels {', '.join(map(str, ref))} (reference {ref[0]})")
        else:
            form = f"log({col} / {ref:.6g})" if transforms.get(col) == "log-center" else f"{col} − {ref:.6g}"
            parts.append(f"{col} centred at {ref:.6g} ({form})")
    return ("Covariate references (covariates.csv): " + "; ".join(parts) + ".") if parts else ""


def likelihood_table(fit: Any, is_proposal: str = "full", is_samples: int = 5000) -> pd.DataFrame:
    """``method, -2LL, AIC, BIC, MC SE`` (``fit.likelihood_table``; its importance sampling with ``is_proposal`` and
    ``is_samples`` draws per subject)."""
    return fit.likelihood_table(proposal=is_proposal, num_samples=is_samples).reset_index()


def _ids(model: Any) -> np.ndarray:
    return np.asarray([v.item() if isinstance(v, np.generic) else v for v in model.data.ids], dtype=object)


def individual_table(fit: Any) -> pd.DataFrame:
    """Per subject: natural-scale conditional modes / means / sds, η EBEs (``eta_<name>``) and the covariates."""
    model = fit.model
    ops = model.ops
    psi = fit.individual_parameters().reset_index(drop=True)
    mode = np.asarray(fit.individual_estimates().mode)  # [N, d] φ (transformed scale)
    mu = ops.to_numpy(model.prior_moments(fit._theta())[0])
    d = len(model.random_names)  # η columns (an IOV model's κ columns follow them)
    eta = pd.DataFrame((mode - mu)[:, :d], columns=[f"eta_{n}" for n in model.random_names])
    id_name = model.data.columns.get("id", "ID")
    out = pd.concat([pd.DataFrame({id_name: _ids(model)}), psi, eta], axis=1)
    covs = model.data.covariates.reset_index(drop=True)
    if len(covs.columns):
        out = pd.concat([out, covs], axis=1)
    return out


def shrinkage_table(fit: Any) -> pd.DataFrame:
    table = fit.individual_estimates().shrinkage_frame()
    table.index.name = "parameter"
    return table.reset_index()


def residuals_table(fit: Any) -> pd.DataFrame:
    """One row per observation: ID, x (time), a joint model's response column (DVID), DV, PRED, IPRED, IWRES, EPRED,
    PWRES, NPDE (data scale for DV)."""
    model = fit.model
    frame = fit.residuals().to_frame()  # the ID and the time (x) columns of the model's data
    id_name = model.data.columns.get("id", "ID")
    if id_name not in frame:
        frame.insert(0, id_name, _ids(model)[frame["unit"].to_numpy()])
    if model.x_name not in frame:
        frame.insert(1, model.x_name, np.asarray(model.data.x_values)[frame["unit"], frame["obs"]])
    return frame.drop(columns=["unit", "obs"])


# ----- figures ----------------------------------------------------------------------------------------------------
def figures(fit: Any, *, log_y: bool = False, vpc_simulations: int = 500, max_individual_plots: int = 36,
            seed: int = 0) -> dict[str, Any]:
    """The report's matplotlib figures by file stem (see :data:`FIGURES`)."""
    model = fit.model
    if getattr(model, "outcome", None) is not None:  # discrete / event data: no predictions with residuals to draw
        joint = getattr(model.outcome, "name", None) == "joint"  # several responses, some not Gaussian: a VPC each
        outs = model.outcome.outcomes.values() if joint else [model.outcome]
        user = [o for o in outs if o.name == "loglik"]  # a user simulator
        if any(getattr(o, "simulate_fn", None) is None for o in user):
            return {"convergence": fit.plot_convergence()}  # no simulated VPC (the VPC's error says why)
        if joint:
            return {"joint_vpc": fit.plot_vpc(num_sims=vpc_simulations, seed=seed, log=log_y),
                    "convergence": fit.plot_convergence()}
        return {"discrete_vpc": fit.plot_vpc(num_sims=vpc_simulations, seed=seed),
                "convergence": fit.plot_convergence()}
    n = model.num_units
    units = list(range(min(n, max_individual_plots)))
    return {
        "individual_fits": fit.plot_individual_fits(units=units, log=log_y),
        "gof": fit.plot_gof(log=log_y),
        "vpc": fit.plot_vpc(num_sims=vpc_simulations, seed=seed, log=log_y),
        "convergence": fit.plot_convergence(),
    }


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----- HTML -------------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
th, td { padding: .2em .6em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: .85em; color: #555; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: .4em .8em; }
nav a { margin-right: 1em; }
"""


def _table_html(df: pd.DataFrame, digits: int = 5) -> str:
    return df.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.{digits}g}", escape=True)


def _kv_html(info: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
    return f"<table>{rows}</table>"


def html_report(title: str, run_info: dict[str, Any], tables: dict[str, pd.DataFrame], pngs: dict[str, bytes],
                model_text: str, warnings_list: list[str] | None = None, notes: dict[str, str] | None = None) -> str:
    """One self-contained HTML page: ``tables`` (keys estimates, likelihood, shrinkage, individual, residuals),
    ``pngs`` (file stem -> PNG bytes, embedded as base64 data URIs), the model file and the run information."""
    notes = notes or {}
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{esc(title)}</title>\n"
             f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n<nav>"
             + "".join(f'<a href="#{sid}">{esc(head)}</a>' for sid, head in SECTIONS.items()) + "</nav>\n"]

    def section(sid: str, body: str) -> None:
        parts.append(f'<section id="{sid}">\n<h2>{esc(SECTIONS[sid])}</h2>\n{body}\n</section>\n')

    section("run", _kv_html(run_info))
    warns = warnings_list or []
    section("warnings", "".join(f'<p class="warn">{esc(w)}</p>' for w in warns) if warns else "<p>None.</p>")
    for sid, intro in (("estimates", "Population parameters on their natural scale (variances ω² of the random "
                                     "effects on the transformed scale), standard errors and relative standard errors "
                                     "(%)."),
                       ("likelihood", "−2 log-likelihood, AIC and BIC by linearisation (lin), importance sampling "
                                      "(is) and Gauss–Hermite quadrature (gq); MC SE: the Monte-Carlo standard error "
                                      "of −2LL (importance sampling's; the run information gives its draws and "
                                      "proposal)."),
                       ("shrinkage", "η-shrinkage 1 − var(η̂)/ω² of the conditional modes and means (%)."),
                       ("individual", "Per subject: conditional modes (EBEs), means and sds of the parameters, the "
                                      "random effects η at the modes, and the covariates.")):
        body = f"<p>{esc(intro)}</p>" + (f'<p class="warn">{esc(notes[sid])}</p>' if sid in notes else "")
        section(sid, body + _table_html(tables[sid]))
    reps = tables.get("replicates")
    if reps is None:
        body = ("<p>One SAEM run. With <code>[engine] replicates = R</code> (or <code>--replicates R</code>) R fits "
                "run with seeds seed, seed + 1, ...; the best is reported and a warning says when they disagree by "
                "more than their Monte-Carlo error.</p>")
    else:
        spread = reps.attrs.get("spread")
        body = (f"<p>{len(reps)} SAEM runs; the one with the largest log-likelihood is reported"
                + (f"; their log-likelihoods span {spread:.3g}" if spread is not None else "") + ".</p>"
                + _table_html(reps))
    section("replicates", body)
    res = tables.get("residuals")
    if res is None:
        section("residuals", "<p>None: residuals (IWRES, PWRES, NPDE) are for continuous data with a residual error "
                             "model; this model's outcome (or one of its responses) is discrete or time-to-event.</p>")
    else:
        stats = res[[c for c in ("IWRES", "PWRES", "NPDE") if c in res]].agg(["mean", "std"]).T.reset_index()
        stats.columns = ["residual", "mean", "sd"]
        body = (f"<p>{len(res)} observations. Summary (mean ≈ 0 and sd ≈ 1 under the model):</p>"
                + _table_html(stats, 3))
        shown = res if len(res) <= MAX_RESIDUAL_ROWS else res.iloc[:MAX_RESIDUAL_ROWS]
        more = "" if len(res) <= MAX_RESIDUAL_ROWS else f" (first {MAX_RESIDUAL_ROWS} of {len(res)} rows)"
        body += f"<details><summary>All residuals{esc(more)}</summary>{_table_html(shown, 4)}</details>"
        section("residuals", body)
    figs = []
    for stem, png in pngs.items():
        head, caption = FIGURES.get(stem, (stem, ""))
        data = base64.b64encode(png).decode("ascii")
        figs.append(f'<figure id="fig-{stem}"><h3>{esc(head)}</h3><img alt="{esc(head)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{esc(caption)}</figcaption></figure>')
    note = f'<p class="warn">{esc(notes["figures"])}</p>' if "figures" in notes else ""
    section("figures", note + "\n".join(figs))
    section("model-file", f"<pre>{esc(model_text)}</pre>")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


# ----- everything -------------------------------------------------------------------------------------------------
def run_information(fit: Any, **extra: Any) -> dict[str, Any]:
    """Versions, engine settings, data size and timings of a fit (the report's first section)."""
    import latentfit

    model, engine = fit.model, fit.engine
    info: dict[str, Any] = {"date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")}
    info.update(extra)
    info.update({
        "structural model": model.structural.name,
        "subjects / observations": f"{model.num_units} / {model.num_obs}",
        "engine": getattr(engine, "name", type(engine).__name__),
    })
    sched = getattr(engine, "schedule", None)
    if sched is not None and hasattr(sched, "K1"):
        info["iterations (K1, K2)"] = f"{sched.K1}, {sched.K2}"
    if hasattr(engine, "num_chains"):
        info["chains per subject"] = engine.num_chains
    info.setdefault("backend", type(model.ops).__name__)
    info["fit time (s)"] = f"{fit.elapsed:.2f}"
    info["latentfit"] = latentfit.__version__
    info["python"] = f"{platform.python_version()} ({platform.platform()})"
    for mod in ("torch", "jax"):
        if mod in sys.modules:
            info[mod] = getattr(sys.modules[mod], "__version__", "?")
    return info


def write_fit_outputs(fit: Any, out_dir: str | Path, *, model_text: str = "", title: str | None = None,
                      run_info: dict[str, Any] | None = None, warnings_list: list[str] | None = None,
                      se_method: str = "lin", log_y: bool = False, vpc_simulations: int = 500,
                      max_individual_plots: int = 36, seed: int = 0, is_proposal: str = "full",
                      is_samples: int = 5000, status: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the CSV tables, the PNG figures and ``report.html`` of an NLME fit into ``out_dir``; returns the paths
    by name.  ``status(message)`` is called before each slow step (e.g. to print it)."""
    import matplotlib.pyplot as plt

    say = status or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the warnings of this work (SEs that could not be computed, ...) go in the report beside the caller's, and on
    # to the caller's own handling
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        say(f"standard errors ({se_method})")
        est = estimates_table(fit, se_method)
        notes = {"estimates": est.attrs["note"]} if "note" in est.attrs else {}
        refs = covariate_reference_text(fit.model)
        if refs:
            notes["estimates"] = f"{notes['estimates']} {refs}" if "estimates" in notes else refs
        say("log-likelihood by linearisation, importance sampling and quadrature")
        tables = {"estimates": est, "likelihood": likelihood_table(fit, is_proposal, is_samples)}
        say("individual estimates, shrinkage and residuals (PRED, IPRED, IWRES, PWRES, NPDE)")
        tables.update({"shrinkage": shrinkage_table(fit), "individual": individual_table(fit)})
        files = {"estimates": "estimates.csv", "likelihood": "likelihood.csv", "shrinkage": "shrinkage.csv",
                 "individual": "individual_estimates.csv"}
        if getattr(fit.model, "outcome", None) is None:  # residuals of continuous data
            tables["residuals"] = residuals_table(fit)
            files["residuals"] = "residuals.csv"
        if getattr(fit.model, "covariate_reference", None):
            tables["covariates"] = covariate_reference_table(fit.model)
            files["covariates"] = "covariates.csv"
        reps = getattr(fit, "replicates", None)
        if isinstance(reps, pd.DataFrame):
            tables["replicates"] = reps.reset_index()
            tables["replicates"].attrs.update(reps.attrs)
            files["replicates"] = "replicates.csv"
        paths: dict[str, Path] = {}
        for key, name in files.items():
            paths[key] = out / name
            tables[key].to_csv(paths[key], index=False)
        pngs: dict[str, bytes] = {}
        say(f"plots (VPC: {vpc_simulations} simulated data sets)")
        for stem, fig in figures(fit, log_y=log_y, vpc_simulations=vpc_simulations,
                                 max_individual_plots=max_individual_plots, seed=seed).items():
            pngs[stem] = png_bytes(fig)
            plt.close(fig)
            paths[stem] = out / f"{stem}.png"
            paths[stem].write_bytes(pngs[stem])
        if fit.model.num_units > max_individual_plots:
            notes["figures"] = f"individual fits: the first {max_individual_plots} of {fit.model.num_units} subjects"
            warnings.warn(f"individual_fits.png draws the first {max_individual_plots} of {fit.model.num_units} "
                          f"subjects (max_individual_plots of [report])", UserWarning, stacklevel=2)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    raised = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning | FutureWarning)]
    warnings_list = list(dict.fromkeys([*(warnings_list or []), *raised]))
    info = run_info if run_info is not None else run_information(fit)
    title = title or f"NLME fit: {fit.model.structural.name}"
    page = html_report(title, info, tables, pngs, model_text, warnings_list, notes)
    paths["report"] = out / "report.html"
    paths["report"].write_text(page, encoding="utf-8")
    return paths


__all__ = ["FIGURES", "OUTPUT_FILES", "SECTIONS", "SavedFit", "covariate_reference_table", "covariate_reference_text",
           "estimates_table", "figures", "html_report", "individual_table", "likelihood_table", "residuals_table",
           "run_information", "shrinkage_table", "write_fit_outputs"]
