"""Stepwise covariate model building for NLME models (saemix's ``step.saemix``; issue 14, item 6).

Each candidate is a (parameter, covariate) pair, a term ``β_{p,c}·c_i`` added to ``φ_{p,i} = u(ψ_{p,i})``.  From the
model's own covariates (``direction="forward"`` or ``"both"``) or from all of them plus every candidate
(``"backward"``), every step fits each model one term away (one term added and / or removed), and moves to the one
with the lowest criterion if that is lower than the current model's; it stops when no move improves.

**Criterion.** Every model is fitted by SAEM with the same seed, warm-started at the current model's estimates (the
new coefficient at 0); so is the current model itself at each step (row ``"current"``: the step's reference, the
better of its fits), so that a move and the model it is compared with had the same iterations from the same point.
Its log-likelihood is the deterministic adaptive Gauss–Hermite value (importance sampling
with a fixed seed when the latent dimension exceeds 4), so that comparisons are not driven by Monte-Carlo noise of the
likelihood estimator.  ``criterion="bic"`` is saemix's ``BIC.covariate`` (Delattre, Lavielle & Poursat 2014, EJS 8:
"A note on BIC in mixed-effects models"), the one ``step.saemix`` selects covariates with:

    BIC_cov = −2ℓ + log(N) · n_β,random + log(n_obs) · n_β,fixed,

with N the number of subjects, n_obs the number of observations, n_β,random the estimated fixed effects (population
values and covariate coefficients) of parameters *with* a random effect, n_β,fixed those of parameters *without* one
(identified at the observation level).  Variances and residual parameters, common to all the models compared, are
not counted.  So a covariate on a parameter with a random effect costs log N, one on a parameter without random
effect log n_obs.  The table also gives saemix's ordinary ``BIC = −2ℓ + log(N)·p`` (p: all estimated parameters, as
``fit.bic``) and ``AIC = −2ℓ + 2p``; ``criterion="aic"`` selects by AIC.

**Likelihood-ratio report.** Each candidate is nested in (or nests) the model of its step, so every row also has
``LRT = 2(ℓ_larger − ℓ_smaller)`` with ``df`` the difference in numbers of parameters (k − 1 for a categorical
covariate of k levels) and its χ² p-value.  A larger model with a *higher* −2LL (``LRT < 0``: SAEM stopped its fit
short of the maximum, Monte-Carlo noise of the fits) keeps its negative statistic, with p-value NaN and a ``note``
saying so (not a silent p = 1).  ``dBIC`` is the difference of the ordinary BIC, ``dBIC_cov`` that of the criterion
the selection uses (``criterion="bic"``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from latentfit.inference.model import ModelSpecificationError

from .model import NLME
from .replicates import replicate_log_likelihood
from .spec import COV_TRANSFORMS, parse_covariates

DIRECTIONS = ("forward", "backward", "both")
CRITERIA = ("bic", "aic")

Term = tuple[str, str]  # (parameter, covariate column)


def chi2_sf(x: float, df: int) -> float:
    """Upper tail ``P(χ²_df > x)`` for an integer ``df`` >= 1 (closed forms of the regularised gamma function)."""
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if not x > 0:
        return 1.0
    y = 0.5 * x
    m, odd = divmod(int(df), 2)
    if odd:  # Q(m + ½, y) = erfc(√y) + e^{−y} Σ_{j=1}^{m} y^{j−½} / Γ(j + ½)
        total = math.erfc(math.sqrt(y))
        term = math.exp(-y) * math.sqrt(y) / math.gamma(1.5)  # j = 1
        for j in range(1, m + 1):
            total += term
            term *= y / (j + 0.5)
        return min(total, 1.0)
    total, term = 0.0, math.exp(-y)  # Q(m, y) = e^{−y} Σ_{j<m} y^j / j!
    for j in range(m):
        total += term
        term *= y / (j + 1)
    return min(total, 1.0)


@dataclass
class CovariateSearch:
    """Result of :func:`covariate_search`.

    ``table``: one row per model fitted (step, action (``start``; at each step ``current``, the step's model
    refitted from its estimates, then each ``add`` / ``remove``), term, the model's covariates, −2LL, number of
    parameters, AIC, BIC, BIC_cov, ΔAIC / ΔBIC / ΔBIC_cov (``dBIC_cov``: the ``criterion="bic"`` selection's)
    against the step's current model, and the LRT against it: df, statistic, p-value (NaN for a negative statistic,
    with a ``note``: the fits differ by SAEM noise); ``selected`` marks the move taken at each step).  ``steps``: the
    moves taken (rows of ``table``).  ``covariates``: the chosen covariate model (``NLME(covariates=...)`` form).
    ``model``: the chosen model (bound); ``fit``: its refit.
    """

    table: pd.DataFrame
    covariates: dict[str, dict[str, str | None]]
    model: NLME
    fit: Any
    criterion: str
    direction: str

    @property
    def steps(self) -> pd.DataFrame:
        return self.table[self.table["selected"]]

    def __repr__(self) -> str:
        chosen = _describe({(p, c): t for p, cols in self.covariates.items() for c, t in cols.items()})
        return (f"CovariateSearch({self.direction}, {self.criterion.upper()}: {len(self.table)} models visited, "
                f"chosen {chosen})")


def _describe(terms: dict[Term, str | None]) -> str:
    if not terms:
        return "(no covariate)"
    return " + ".join(f"{p}~{c}" + (f"[{t}]" if t not in (None, "linear") else "") for (p, c), t in terms.items())


def _model_terms(model: NLME) -> dict[Term, str | None]:
    return {(p, c): t for p, items in model.covariate_spec.items() for c, t in items}


def _parse_candidates(model: NLME, candidates: Any, covariates: Any, table: pd.DataFrame) -> dict[Term, str | None]:
    """Candidate terms ``{(parameter, column): transform}``; default: every estimated parameter × covariate."""
    if candidates is None:
        cols = list(covariates) if covariates is not None else _detect_covariates(model, table)
        params = [p for p in model.param_names if not model.spec[p].fixed]
        candidates = [(p, c) for p in params for c in cols]
    out: dict[Term, str | None] = {}
    items: list[tuple] = []
    if isinstance(candidates, dict):
        for p, spec in candidates.items():
            if isinstance(spec, str):
                items.append((p, spec))
            elif isinstance(spec, dict):
                items += [(p, c, t) for c, t in spec.items()]
            else:
                items += [(p, c) for c in spec]
    else:
        items = [tuple(c) for c in candidates]
    for item in items:
        if len(item) not in (2, 3):
            raise ModelSpecificationError(f"candidate {item!r}: give (parameter, covariate) or (parameter, covariate, "
                                          f"transform)")
        p, c, t = (*item, None) if len(item) == 2 else item
        if p not in model.param_names:
            raise ModelSpecificationError(f"candidate ({p!r}, {c!r}): {p!r} is not a parameter of the model "
                                          f"({model.param_names})")
        if c not in table.columns:
            raise ModelSpecificationError(f"candidate ({p!r}, {c!r}): the data have no column {c!r}; columns are "
                                          f"{list(table.columns)}")
        if t is not None and t not in COV_TRANSFORMS:
            raise ModelSpecificationError(f"candidate ({p!r}, {c!r}): unknown transform {t!r}; use one of "
                                          f"{COV_TRANSFORMS}")
        out[(p, c)] = t
    if not out:
        raise ModelSpecificationError("no candidate (parameter, covariate) pair to search")
    return out


def _detect_covariates(model: NLME, table: pd.DataFrame) -> list[str]:
    """Columns constant within every individual, with at least two values, that play no data role."""
    data = model.data
    opts = model.read_options
    used = set(data.columns.values()) | {opts["dose"], opts["x"]} | set(opts["regressors"]) | set(data.regressors)
    id_col = data.columns["id"]
    out = []
    for col in table.columns:
        if col in used or col == id_col:
            continue
        values = table[col]
        if values.nunique(dropna=True) < 2:
            continue
        if (table.groupby(id_col)[col].nunique(dropna=True) <= 1).all():
            out.append(col)
    if not out:
        raise ModelSpecificationError("no covariate column found (a column constant within each ID, with at least two "
                                      "values, that is not the ID, time, DV, dose... column): pass covariates=[...] "
                                      "or candidates=[(parameter, column), ...]")
    return out


def _with_terms(model: NLME, terms: dict[Term, str | None], table: pd.DataFrame) -> NLME:
    """A copy of the (bound) model whose covariate model is ``terms`` (re-bound to its data ``table``)."""
    spec: dict[str, dict[str, str | None]] = {}
    for (p, c), t in terms.items():
        spec.setdefault(p, {})[c] = t
    new = copy.copy(model)
    new.covariate_spec = parse_covariates(new.param_names, spec)
    prefixes = tuple(f"beta_{p}_{c}" for p, c in terms)
    new.covariate_init = {k: v for k, v in model.covariate_init.items() if k.startswith(prefixes)}
    new._bind(table)
    return new


def _counts(model: NLME) -> tuple[int, int]:
    """``(n_β,random, n_β,fixed)``: estimated fixed effects of parameters with / without a random effect."""
    n_r = n_f = 0
    for name, info in model.params.items():
        role = info.meta.get("role")
        if info.fixed or role not in ("population", "covariate"):
            continue
        pname = name if role == "population" else info.meta["parameter"]
        if model.spec[pname].random:
            n_r += 1
        else:
            n_f += 1
    return n_r, n_f


def _table_row(step: int, action: str, term: Term | None, rec: dict, ref: dict | None) -> dict[str, Any]:
    """A row of the search's table: the model ``rec`` (its −2LL, AIC, BIC, BIC_cov), its differences from the step's
    model ``ref`` (None: the reference itself) and the LRT between the two nested models (module docstring)."""
    out = {"step": step, "action": action, "parameter": term[0] if term else None,
           "covariate": term[1] if term else None, "covariates": _describe(rec["terms"]),
           "-2LL": rec["-2LL"], "npar": rec["npar"], "AIC": rec["AIC"], "BIC": rec["BIC"],
           "BIC_cov": rec["BIC_cov"], "logLik_method": rec["method"], "logLik_mc_se": rec["mc_se"]}
    if ref is None:
        out.update({"dAIC": 0.0, "dBIC": 0.0, "dBIC_cov": 0.0, "df": 0, "LRT": np.nan, "p_value": np.nan,
                    "note": ""})
    else:
        big, small = (rec, ref) if rec["npar"] >= ref["npar"] else (ref, rec)
        df = big["npar"] - small["npar"]
        stat = 2.0 * (big["ll"] - small["ll"])
        # a larger nested model with a lower likelihood: its fit stopped short of its maximum (SAEM's Monte-Carlo
        # noise), which the χ² law does not describe: the statistic as computed, no p-value, and a note
        note = (f"LRT < 0: the larger model's -2LL is {-stat:.3g} higher; the fits differ by SAEM Monte-Carlo "
                f"noise (no p-value)") if df > 0 and stat < 0 else ""
        out.update({"dAIC": rec["AIC"] - ref["AIC"], "dBIC": rec["BIC"] - ref["BIC"],
                    "dBIC_cov": rec["BIC_cov"] - ref["BIC_cov"], "df": df, "LRT": stat,
                    "p_value": chi2_sf(stat, df) if df > 0 and stat >= 0 else np.nan, "note": note})
    return out


def covariate_search(model: NLME, data: pd.DataFrame | None = None, candidates: Any = None, *,
                     covariates: list[str] | None = None, direction: str = "both", criterion: str = "bic",
                     refit: bool | dict[str, Any] = True, ll_method: str = "auto",
                     **fit_options: Any) -> CovariateSearch:
    """Stepwise covariate selection (see the module docstring); saemix's ``step.saemix``.

    model : an :class:`NLME` (its own covariates are the starting model of ``"forward"`` / ``"both"``).
    data : the data (with the model's data options), unless the model is bound.
    candidates : (parameter, covariate) or (parameter, covariate, transform) pairs, or a dict ``{parameter: column(s)}``
        as ``NLME(covariates=...)``; default: every estimated parameter × every covariate (``covariates=[...]``, or
        the columns constant within each ID that play no data role).
    direction : ``"forward"``, ``"backward"`` or ``"both"`` (saemix's ``direction``).
    criterion : ``"bic"`` (saemix's BIC.covariate, the default) or ``"aic"``.
    refit : True: refit the chosen model with saemix's default iterations (300, 100) from its search estimates; a
        dict: the options of that refit; False: keep the search's fit.
    fit_options : options of every fit of the search (``num_iters``, ``num_chains``, ``seed`` (default 0), ...).
    """
    if direction not in DIRECTIONS:
        raise ModelSpecificationError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    criterion = str(criterion).lower()
    if criterion not in CRITERIA:
        raise ModelSpecificationError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if "init" in fit_options or "replicates" in fit_options:
        raise ModelSpecificationError("covariate_search warm-starts every fit itself: init= and replicates= are not "
                                      "options of the search")
    fit_options.setdefault("seed", 0)
    fit_options.setdefault("progress", False)
    base = model.bind(data) if data is not None else model
    base._require_data()
    cands = _parse_candidates(base, candidates, covariates, base.table)  # the table rebuilt, read, then dropped
    own = _model_terms(base)
    space = {**cands, **own}
    current = dict(own) if direction != "backward" else {**own, **cands}
    n_units, n_obs = base.num_units, base.num_obs
    log_n, log_obs = math.log(n_units), math.log(n_obs)
    fitted: dict[frozenset, dict[str, Any]] = {}

    def evaluate(terms: dict[Term, str | None], warm: Any, refresh: bool = False) -> dict[str, Any]:
        key = frozenset(terms.items())
        if key in fitted and not refresh:
            return fitted[key]
        m = _with_terms(base, terms, base.table)  # each re-binding rebuilds the table (and drops it)
        init = None
        if warm is not None:
            init = {k: v for k, v in warm.params.items() if k in m.params}
        fit = m.fit(init=init, **fit_options)
        ll, se, method = replicate_log_likelihood(fit, ll_method, seed=int(fit_options["seed"]))
        n_r, n_f = _counts(m)
        p = fit.num_params
        rec = {"model": m, "fit": fit, "terms": dict(terms), "ll": ll, "mc_se": se, "method": method,
               "-2LL": -2.0 * ll, "npar": p, "AIC": -2.0 * ll + 2.0 * p, "BIC": -2.0 * ll + log_n * p,
               "BIC_cov": -2.0 * ll + log_n * n_r + log_obs * n_f}
        if key in fitted and fitted[key]["ll"] >= ll:  # a refit no better than the fit kept (Monte-Carlo noise)
            return fitted[key]
        fitted[key] = rec
        return rec

    crit_col = "BIC_cov" if criterion == "bic" else "AIC"
    rows: list[dict[str, Any]] = []
    cur = evaluate(current, None)
    rows.append({**_table_row(0, "start", None, cur, None), "selected": True})
    step = 0
    while True:
        step += 1
        moves: list[tuple[str, Term, dict[Term, str | None]]] = []
        if direction in ("forward", "both"):
            moves += [("add", t, {**current, t: space[t]}) for t in space if t not in current]
        if direction in ("backward", "both"):
            moves += [("remove", t, {k: v for k, v in current.items() if k != t}) for t in current]
        if not moves:
            break
        # the step's model refitted from its own estimates, as each move is fitted from them: moves and model then
        # had the same iterations from the same point (else a move's gain would include the iterations the step's
        # model had not had: from a start far from its maximum every move "improved" -2LL by ~100, a noise
        # covariate was selected); the better of its fits is the step's reference
        cur = evaluate(current, cur["fit"], refresh=True)
        rows.append({**_table_row(step, "current", None, cur, None), "selected": False})
        recs = [(action, term, evaluate(terms, cur["fit"])) for action, term, terms in moves]
        step_rows = [_table_row(step, action, term, rec, cur) for action, term, rec in recs]
        best = int(np.argmin([rec[crit_col] for _, _, rec in recs]))
        improves = recs[best][2][crit_col] < cur[crit_col]
        for k, r in enumerate(step_rows):
            rows.append({**r, "selected": bool(improves and k == best)})
        if not improves:
            break
        cur = recs[best][2]
        current = dict(cur["terms"])
    out_table = pd.DataFrame(rows)
    chosen = cur["model"]
    final = cur["fit"]
    if refit is not False:
        options = {k: v for k, v in fit_options.items() if k != "num_iters"}
        if isinstance(refit, dict):
            options.update(refit)
        final = chosen.fit(init=dict(final.params), **options)
    spec: dict[str, dict[str, str | None]] = {}
    for (p, c), t in current.items():
        spec.setdefault(p, {})[c] = t
    return CovariateSearch(out_table, spec, chosen, final, criterion, direction)


__all__ = ["CRITERIA", "DIRECTIONS", "CovariateSearch", "chi2_sf", "covariate_search"]
