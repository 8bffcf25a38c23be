"""Non-Gaussian outcomes of NLME models (saemix 3 ``modeltype="likelihood"``, Monolix's discrete and event data).

The individual parameters keep the NLME form ``φ_i = u(ψ_i) = C_i β + η_i`` (transforms, covariates, Ω, parameters
without random effect); only the observation model changes.  With ``f_ij = f(t_ij, ψ_i)`` the structural model
(library or ``f(psi, data)``), the log-probability of observation ``y_ij`` is

* ``"binary"`` (:class:`Binary`): ``logit P(y = 1) = f``; ``log p = y f − log(1 + e^f)``;
* :class:`Ordinal` (cumulative logits, categories ``0..K``): ``logit P(y ≤ k − 1) = c_k + f``, ``k = 1..K``, with
  ordered thresholds ``c_1 = ψ_{α1}``, ``c_k = c_{k−1} + ψ_{αk}`` (the increments ``ψ_{αk} > 0``: log-normal
  parameters); ``P(y = k) = σ(c_{k+1} + f) − σ(c_k + f) = σ(c_{k+1} + f) σ(−c_k − f)(1 − e^{−ψ_{α(k+1)}})``,
  evaluated on the log scale (``c_0 = −∞``, ``c_{K+1} = +∞``);
* ``"poisson"`` (:class:`Poisson`): ``log λ = f``; ``log p = y f − e^f − log y!``;
* :class:`NegativeBinomial`: mean ``μ = e^f``, variance ``μ + δ μ²`` (``δ`` = ψ of the ``dispersion`` parameter,
  Monolix's overdispersion); ``log p = log Γ(y + 1/δ) − log Γ(1/δ) − log y! − (1/δ) log(1 + δμ) + y log(δμ/(1 + δμ))``;
* :class:`TimeToEvent` (repeated events, right censoring): each record closes the interval ``(t_{j−1}, t_j]`` since
  the individual's previous record (the first since time 0) and has ``DV = 1`` (an event at ``t_j``) or ``0``
  (no event in the interval: censoring at ``t_j``, or the time-0 start record of saemix / Monolix data), so that
  ``log p_j = −(H(t_j) − H(t_{j−1})) + DV_j log h(t_j)`` with the cumulative hazard in closed form:
  ``"constant"``: ``h = 1/λ``, ``H(t) = t/λ`` (Monolix's exponential model, λ the mean time between events);
  ``"weibull"``: ``h(t) = (β/λ)(t/λ)^{β−1}``, ``H(t) = (t/λ)^β`` (saemix's and Monolix's Weibull); the parameters
  ``λ``, ``β`` are ψ's of the model (no structural model: ``NLME(None, ..., outcome=TimeToEvent(...))``); with
  occasions (``iov=`` on λ or β) occasion k's hazard is in force from the occasion's first record to the next one's,
  both in the log-likelihood (an interval spanning occasions is split at their starts: ``H`` summed piecewise) and in
  the simulations (the piecewise inverse of ``H``, :func:`invert_cumulative_hazard`, writing records that close and
  open each occasion);
* a user log-likelihood (:class:`LogLik`, ``outcome="loglik"``; saemix's ``modeltype="likelihood"``): the
  "structural" function ``loglik(psi, data) -> [..., N, T]`` returns ``log p(y_ij | ψ_i)`` itself, with the
  observations in ``data.dv`` (and ``data.time``, ``data.x``, ``data.regressors``, ...: see
  :mod:`~latentfit.models.nlme.structural`).

SAEM then runs unchanged: β and Ω of the parameters with a random effect in closed form from the statistics of
φ, the parameters without random effect (thresholds' increments, dispersions, shapes, slopes, ...) by the numerical
step, the log-likelihood by importance sampling or quadrature, standard errors by Louis' formula (``method="sa"``).

Example
-------
>>> import numpy as np, pandas as pd
>>> from latentfit.models import nlme
>>> model = nlme.NLME(lambda psi, d: psi["theta1"] + psi["theta2"] * d.time,
...                   {"theta1": nlme.Parameter(-1.0, "normal"), "theta2": nlme.Parameter(0.5, "normal", random=False)},
...                   outcome="binary")
>>> model
NLME(<lambda>, parameters=['theta1', 'theta2'], random=['theta1'], outcome='binary', no data)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from latentfit.inference.model import DataError, ModelSpecificationError
from latentfit.inference.units import max_over_processes, prior_draws_on_streams

from .data import _id
from .structural import Structural

if TYPE_CHECKING:  # pragma: no cover
    from .model import NLME, Parameter

#: outcome names accepted by ``NLME(..., outcome=...)`` (aliases included) -> constructor
HAZARDS = ("constant", "weibull")


def _log_sigmoid(xp: Any, x: Any) -> Any:
    """``log σ(x) = −log(1 + e^{−x})`` (stable)."""
    return -xp.logaddexp(0.0 * x, -x)


class Outcome:
    """An observation model ``log p(y_ij | f_ij, ψ_i)`` (see the module docstring)."""

    name: str = "outcome"
    #: the model's structural prediction ``f`` enters the log-probability (False: the outcome reads ψ only)
    uses_prediction: bool = True

    @property
    def parameters(self) -> tuple[str, ...]:
        """ψ names the outcome reads besides the structural model's."""
        return ()

    def check_spec(self, spec: dict[str, Parameter]) -> None:
        """Check the parameter specification (e.g. positive increments); raise ModelSpecificationError."""
        missing = [p for p in self.parameters if p not in spec]
        if missing:
            raise ModelSpecificationError(f"outcome {self.name!r} reads the parameter(s) {missing}: add them to "
                                          f"parameters (e.g. {{{missing[0]!r}: nlme.Parameter(1.0, random=False)}})")

    def check_data(self, y: np.ndarray, mask: np.ndarray) -> tuple[int, str] | None:
        """``(flat index into y, description)`` of the first invalid observed value (``mask``), or None."""
        return None

    def constants(self, data: Any) -> dict[str, np.ndarray]:
        """Per-observation constants ``[N, T]`` (numpy), e.g. ``log y!``; taken by units like the data."""
        return {}

    def log_prob(self, ops: Any, y: Any, f: Any, psi: dict[str, Any], design: Any,
                 consts: dict[str, Any]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, f: np.ndarray, psi: dict[str, np.ndarray],
               consts: dict[str, np.ndarray]) -> np.ndarray:
        """Observations ``[N, T]`` drawn at the predictions ``f [N, T]`` and ψ ``[N, 1]`` (numpy)."""
        raise ModelSpecificationError(f"outcome {self.name!r} has no simulator")

    def sample_at(self, u: np.ndarray, f: np.ndarray, psi: dict[str, np.ndarray],
                  consts: dict[str, np.ndarray]) -> np.ndarray:
        """Observations ``[K, N, T]`` by inversion of their CDF at the uniforms ``u`` on (0, 1) (numpy; per-unit
        streams: :func:`simulate_observations` with ``unit_ids``)."""
        raise ModelSpecificationError(f"outcome {self.name!r} has no simulator by inversion")

    def __repr__(self) -> str:
        return repr(self.name)


def _integers(y: np.ndarray, mask: np.ndarray, low: int, high: float, message: str) -> tuple[int, str] | None:
    """The first observed value that is not an integer in ``[low, high]``: ``(flat index, message + value)``."""
    bad = mask & ~((y == np.round(y)) & (y >= low) & (y <= high))
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    return i, f"{message}, got {y.flat[i]}"


class Binary(Outcome):
    """``logit P(y = 1) = f`` (saemix's and Monolix's logistic model for 0/1 data)."""

    name = "binary"

    def check_data(self, y: np.ndarray, mask: np.ndarray) -> tuple[int, str] | None:
        return _integers(y, mask, 0, 1, "binary data need DV 0 or 1")

    def log_prob(self, ops: Any, y: Any, f: Any, psi: dict[str, Any], design: Any, consts: dict[str, Any]) -> Any:
        return y * f - ops.xp.logaddexp(0.0 * f, f)

    def sample(self, rng: np.random.Generator, f: np.ndarray, psi: dict[str, np.ndarray],
               consts: dict[str, np.ndarray]) -> np.ndarray:
        return (rng.random(f.shape) < 1.0 / (1.0 + np.exp(-f))).astype(float)

    def sample_at(self, u: np.ndarray, f: np.ndarray, psi: dict[str, np.ndarray],
                  consts: dict[str, np.ndarray]) -> np.ndarray:
        return (u < 1.0 / (1.0 + np.exp(-f))).astype(float)


@dataclass(repr=False)
class Ordinal(Outcome):
    """Cumulative logits ``logit P(y ≤ k − 1) = c_k + f`` over categories ``0..K`` (K = len(thresholds)).

    ``thresholds``: parameter names; the first is ``c_1``, each next one the increment ``c_k − c_{k−1} > 0`` (a
    log-normal parameter, as saemix's ordinal example: ``transform.par = 1``), so the thresholds stay ordered.
    """

    thresholds: tuple[str, ...] = ()
    name = "ordinal"

    def __post_init__(self) -> None:
        self.thresholds = (self.thresholds,) if isinstance(self.thresholds, str) else tuple(self.thresholds)
        if not self.thresholds:
            raise ModelSpecificationError("Ordinal(thresholds=...) needs the names of at least one threshold "
                                          "parameter (K thresholds: categories 0..K)")

    @property
    def parameters(self) -> tuple[str, ...]:
        return self.thresholds

    @property
    def num_categories(self) -> int:
        return len(self.thresholds) + 1

    def check_spec(self, spec: dict[str, Parameter]) -> None:
        super().check_spec(spec)
        bad = [p for p in self.thresholds[1:] if spec[p].transform != "log"]
        if bad:
            raise ModelSpecificationError(f"ordinal thresholds: the increments {bad} must be log-normal parameters "
                                          f"(transform='log', init > 0) so that the thresholds stay ordered")

    def check_data(self, y: np.ndarray, mask: np.ndarray) -> tuple[int, str] | None:
        k = self.num_categories - 1
        return _integers(y, mask, 0, k, f"ordinal data with {k} thresholds need DV in 0..{k}")

    def constants(self, data: Any) -> dict[str, np.ndarray]:
        y = np.where(data.mask, data.dv, 0).astype(np.int64)
        return {"onehot": (y[..., None] == np.arange(self.num_categories)).astype(float)}

    def _log_probs(self, xp: Any, f: Any, psi: dict[str, Any]) -> Any:
        """``log P(y = k)`` for every category, ``[..., N, T, K + 1]``."""
        c, cum = [], None
        for j, name in enumerate(self.thresholds):
            cum = psi[name] if j == 0 else cum + psi[name]
            c.append(cum + f)  # C_k = c_k + f
        cols = [_log_sigmoid(xp, c[0])]
        for k in range(1, len(c)):
            gap = psi[self.thresholds[k]]  # c_{k+1} − c_k
            cols.append(_log_sigmoid(xp, c[k]) + _log_sigmoid(xp, -c[k - 1]) + xp.log(-xp.expm1(-gap)) + 0.0 * f)
        cols.append(_log_sigmoid(xp, -c[-1]))
        return xp.stack(cols, -1)

    def log_prob(self, ops: Any, y: Any, f: Any, psi: dict[str, Any], design: Any, consts: dict[str, Any]) -> Any:
        xp = ops.xp
        return xp.sum(self._log_probs(xp, f, psi) * consts["onehot"], -1)

    def sample(self, rng: np.random.Generator, f: np.ndarray, psi: dict[str, np.ndarray],
               consts: dict[str, np.ndarray]) -> np.ndarray:
        cum = np.cumsum(np.stack([np.broadcast_to(psi[t], f.shape) for t in self.thresholds], -1), -1)
        below = 1.0 / (1.0 + np.exp(-(cum + f[..., None])))  # P(y <= k - 1), k = 1..K
        return (rng.random(f.shape)[..., None] > below).sum(-1).astype(float)

    def sample_at(self, u: np.ndarray, f: np.ndarray, psi: dict[str, np.ndarray],
                  consts: dict[str, np.ndarray]) -> np.ndarray:
        """``y = #{k : u > P(y ≤ k − 1)}``, the inverse of the cumulative-logit CDF."""
        cum = np.cumsum(np.stack([np.broadcast_to(psi[t], f.shape) for t in self.thresholds], -1), -1)
        return (u[..., None] > 1.0 / (1.0 + np.exp(-(cum + f[..., None])))).sum(-1).astype(float)


class Poisson(Outcome):
    """``log λ = f``, ``y ~ Poisson(λ)``."""

    name = "poisson"

    def check_data(self, y: np.ndarray, mask: np.ndarray) -> tuple[int, str] | None:
        return _integers(y, mask, 0, np.inf, "count data need integer DV >= 0")

    def constants(self, data: Any) -> dict[str, np.ndarray]:
        from scipy.special import gammaln

        return {"log_factorial": gammaln(np.where(data.mask, data.dv, 0.0) + 1.0)}

    def log_prob(self, ops: Any, y: Any, f: Any, psi: dict[str, Any], design: Any, consts: dict[str, Any]) -> Any:
        return y * f - ops.xp.exp(f) - consts["log_factorial"]

    def sample(self, rng: np.random.Generator, f: np.ndarray, psi: dict[str, np.ndarray],
               consts: dict[str, np.ndarray]) -> np.ndarray:
        return rng.poisson(np.exp(f)).astype(float)

    def sample_at(self, u: np.ndarray, f: np.ndarray, psi: dict[str, np.ndarray],
                  consts: dict[str, np.ndarray]) -> np.ndarray:
        """``y = F⁻¹(u) = min{k : P(y ≤ k) ≥ u}`` (scipy's Poisson quantile function)."""
        from scipy import stats

        return np.maximum(stats.poisson.ppf(u, np.exp(f)), 0.0)


@dataclass(repr=False)
class NegativeBinomial(Poisson):
    """``log μ = f``, variance ``μ + δμ²`` with ``δ`` the ψ named ``dispersion`` (log-normal)."""

    dispersion: str = "delta"
    name = "negative_binomial"

    @property
    def parameters(self) -> tuple[str, ...]:
        return (self.dispersion,)

    def check_spec(self, spec: dict[str, Parameter]) -> None:
        super().check_spec(spec)
        if spec[self.dispersion].transform != "log":
            raise ModelSpecificationError(f"negative binomial: the dispersion {self.dispersion!r} must be a "
                                          f"log-normal parameter (transform='log')")

    def log_prob(self, ops: Any, y: Any, f: Any, psi: dict[str, Any], design: Any, consts: dict[str, Any]) -> Any:
        xp = ops.xp
        delta = psi[self.dispersion]
        r = 1.0 / delta
        x = xp.log(delta) + f  # log δμ
        soft = xp.logaddexp(0.0 * x, x)  # log(1 + δμ)
        return (ops.gammaln(y + r) - ops.gammaln(r + 0.0 * y) - consts["log_factorial"] - r * soft
                + y * (x - soft))

    def sample(self, rng: np.random.Generator, f: np.ndarray, psi: dict[str, np.ndarray],
               consts: dict[str, np.ndarray]) -> np.ndarray:
        delta = np.broadcast_to(psi[self.dispersion], f.shape)
        lam = rng.gamma(1.0 / delta, delta * np.exp(f))  # gamma–Poisson mixture
        return rng.poisson(lam).astype(float)

    def sample_at(self, u: np.ndarray, f: np.ndarray, psi: dict[str, np.ndarray],
                  consts: dict[str, np.ndarray]) -> np.ndarray:
        """The negative binomial quantile with ``r = 1/δ`` successes of probability ``p = 1/(1 + δμ)`` (mean ``μ``,
        variance ``μ + δμ²``; scipy's ``nbinom``)."""
        from scipy import stats

        delta = np.broadcast_to(psi[self.dispersion], f.shape)
        return np.maximum(stats.nbinom.ppf(u, 1.0 / delta, 1.0 / (1.0 + delta * np.exp(f))), 0.0)


def _previous_time(t: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The time of each record's previous observed record (``mask``) of the same individual, 0 for the first: the
    start of the interval it closes (in a joint model the records of the other responses are skipped)."""
    before = np.concatenate([np.full((t.shape[0], 1), np.nan), np.where(mask, t, np.nan)[:, :-1]], 1)
    return np.array(pd.DataFrame(before).ffill(axis=1).fillna(0.0).to_numpy(), dtype=float)


@dataclass(repr=False)
class TimeToEvent(Outcome):
    """Repeated time-to-event data with right censoring (see the module docstring).

    ``hazard``: ``"constant"`` (``h = 1/λ``) or ``"weibull"`` (``h(t) = (β/λ)(t/λ)^{β−1}``); ``scale``, ``shape``:
    the names of ``λ`` and ``β`` among the parameters.
    """

    hazard: str = "weibull"
    scale: str = "lambda"
    shape: str = "beta"
    name = "tte"
    uses_prediction = False

    def __post_init__(self) -> None:
        self.hazard = str(self.hazard).lower()
        if self.hazard not in HAZARDS:
            raise ModelSpecificationError(f"TimeToEvent: unknown hazard {self.hazard!r}; use one of {HAZARDS} (other "
                                          f"hazards: a user log-likelihood, outcome='loglik')")

    @property
    def parameters(self) -> tuple[str, ...]:
        return (self.scale,) if self.hazard == "constant" else (self.scale, self.shape)

    def __repr__(self) -> str:
        return repr(f"tte ({self.hazard})")

    def check_spec(self, spec: dict[str, Parameter]) -> None:
        super().check_spec(spec)
        bad = [p for p in self.parameters if spec[p].transform != "log"]
        if bad:
            raise ModelSpecificationError(f"time-to-event: {bad} must be log-normal parameters (transform='log')")

    def check_data(self, y: np.ndarray, mask: np.ndarray) -> tuple[int, str] | None:
        return _integers(y, mask, 0, 1, "time-to-event data need DV 1 (event) or 0 (censoring / start record)")

    def constants(self, data: Any) -> dict[str, np.ndarray]:
        t = data.time
        prev = _previous_time(t, data.mask)
        event = data.mask & (data.dv == 1)
        bad = data.mask & ((t < prev) | (event & (t <= 0)))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            what = "an event at time <= 0" if t[i, j] >= prev[i, j] else "a time before the previous record's"
            raise DataError(f"time-to-event data: ID {_id(data.ids[i])}, row {data.obs_rows[i, j]} has {what} "
                            f"(TIME {t[i, j]}): records are (start at 0,) events and a censoring time, in time order")
        return {"prev_time": prev, "log_time": np.log(np.where(t > 0, t, 1.0)),
                "log_prev": np.log(np.where(prev > 0, prev, 1.0)), "prev_positive": (prev > 0).astype(float),
                "time_positive": (t > 0).astype(float)}

    def log_prob(self, ops: Any, y: Any, f: Any, psi: dict[str, Any], design: Any, consts: dict[str, Any]) -> Any:
        xp = ops.xp
        log_lam = xp.log(psi[self.scale])
        if "occ_start" in consts:  # a hazard with occasion effects: ψ [..., K, n, 1], intervals split at the starts
            return self._log_prob_by_occasion(xp, y, psi, design, consts, log_lam)
        if self.hazard == "constant":
            rate = xp.exp(-log_lam)
            return -(design.time - consts["prev_time"]) * rate - y * log_lam
        beta = psi[self.shape]
        lt, lp = consts["log_time"] - log_lam, consts["log_prev"] - log_lam
        cum = xp.exp(beta * lt) * consts["time_positive"] - xp.exp(beta * lp) * consts["prev_positive"]
        log_h = xp.log(beta) - log_lam + (beta - 1.0) * lt
        return -cum + y * log_h

    def _log_prob_by_occasion(self, xp: Any, y: Any, psi: dict[str, Any], design: Any, consts: dict[str, Any],
                              log_lam: Any) -> Any:
        """The terms ``[..., K, n, T]`` of a hazard whose parameters change at the occasions' starts ``s_k``
        (``consts["occ_start"]``, ``consts["occ_end"]`` ``[n, K]``): occasion k's hazard ``h_k`` on ``[s_k, s_{k+1})``,
        so a record's interval ``(t_{j−1}, t_j]`` contributes ``−Σ_k (H_k(b_jk) − H_k(a_jk))`` with ``a, b`` its
        ends clipped to ``[s_k, s_{k+1}]``, plus ``DV_j log h_k(t_j)`` at the record's own occasion k (the row that
        :func:`~latentfit.models.nlme.occasions.select` keeps; the same cumulative term on every row).  An interval
        inside one occasion gets one piece and exact zeros elsewhere: the per-record formula of :meth:`log_prob`."""
        lo = xp.moveaxis(consts["occ_start"], -1, 0)[..., None]  # [K, n, 1]
        hi = xp.moveaxis(consts["occ_end"], -1, 0)[..., None]
        a = xp.minimum(xp.maximum(consts["prev_time"], lo), hi)  # [K, n, T]
        b = xp.minimum(xp.maximum(design.time, lo), hi)
        if self.hazard == "constant":
            cum = xp.sum((b - a) * xp.exp(-log_lam), -3)
            return -cum[..., None, :, :] - y * log_lam
        beta = psi[self.shape]

        def big_h(x: Any) -> Any:  # (x/λ_k)^β_k, 0 at x = 0 (no log 0 in the value or the gradient)
            return xp.exp(beta * (xp.log(xp.where(x > 0, x, 1.0)) - log_lam)) * (x > 0)

        cum = xp.sum(big_h(b) - big_h(a), -3)
        log_h = xp.log(beta) - log_lam + (beta - 1.0) * (consts["log_time"] - log_lam)
        return -cum[..., None, :, :] + y * log_h

    def hazard_parameters(self, psi: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(λ, β)`` from ψ (numpy, in ψ's dtype; β = 1 for a constant hazard), same shapes."""
        lam = np.asarray(psi[self.scale])
        return lam, (np.ones_like(lam) if self.hazard == "constant" else np.asarray(psi[self.shape]))

    def event_times(self, rng: np.random.Generator, psi: dict[str, np.ndarray], end: np.ndarray,
                    max_events: int = 1000, start: np.ndarray | None = None) -> np.ndarray:
        """Event times ``[N, M]`` of each individual in ``(0, end_i]`` (``inf`` after its last one): ``H(t_{m+1}) =
        H(t_m) + E_m``, ``E_m ~ Exp(1)`` drawn ``[N]`` at a time from ``rng``, inverted.  ψ ``[N, 1]``: one hazard
        ``H(t) = (t/λ)^β``; with ``start`` ``[N, K]`` (occasion starts, :func:`invert_cumulative_hazard`) ψ is
        ``[N, K]``, occasion k's hazard on ``[s_k, s_{k+1})``."""
        lam, beta = self.hazard_parameters(psi)
        if start is None:
            lam, beta = lam.reshape(-1), beta.reshape(-1)
        cum = np.zeros(lam.shape[0])
        columns = []
        for _ in range(max_events):  # events, not individuals: vectorised over individuals
            cum = cum + rng.exponential(size=lam.shape[0])
            t = lam * cum ** (1.0 / beta) if start is None else invert_cumulative_hazard(cum, lam, beta, start)
            columns.append(t)
            if (t > end).all():
                break
        events = np.stack(columns, 1) if columns else np.empty((lam.shape[0], 0))
        return np.where(events <= np.asarray(end)[:, None], events, np.inf)


def invert_cumulative_hazard(exp1: np.ndarray, lam: np.ndarray, beta: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The time t with ``H(t) = E`` for a hazard that changes at the occasions' starts (numpy, vectorised).

    Occasion k (``k = 0..K−1``) is in force on ``[s_k, s_{k+1})`` (``s_0 = 0``, ``s_K = ∞``; padding occasions start
    at ``∞``) with its own Weibull hazard ``h_k(t) = (β_k/λ_k)(t/λ_k)^{β_k−1}``, ``H_k(t) = (t/λ_k)^{β_k}`` (β = 1:
    constant hazard 1/λ), in the time since 0 as the log-likelihood's intervals take it.  So ``H(t) = C_k + H_k(t) −
    H_k(s_k)`` on occasion k, with ``C_k = Σ_{j<k} (H_j(s_{j+1}) − H_j(s_j))``; the occasion where the running ``C``
    passes ``E`` is ``k* = #{k ≥ 1: C_k ≤ E}`` and ``t = λ_{k*} (H_{k*}(s_{k*}) + E − C_{k*})^{1/β_{k*}}`` (the
    inversion of the cumulative hazard of Bender, Augustin & Blettner 2005, Stat. Med. 24:1713, piecewise).
    ``exp1 [...]``; ``lam``, ``beta``, ``start`` ``[..., K]``."""
    exp1 = np.asarray(exp1, dtype=float)
    stop = np.concatenate([start[..., 1:], np.full(start.shape[:-1] + (1,), np.inf)], -1)
    with np.errstate(invalid="ignore"):  # ∞ − ∞ of padding occasions, replaced by ∞
        h_start = (start / lam) ** beta
        piece = np.where(np.isfinite(stop), (stop / lam) ** beta - h_start, np.inf)
    total = np.cumsum(piece, -1)  # C_{k+1}: the cumulative hazard at the end of occasion k
    k = np.minimum((total <= exp1[..., None]).sum(-1), start.shape[-1] - 1)[..., None]
    before = np.take_along_axis(np.concatenate([np.zeros_like(total[..., :1]), total[..., :-1]], -1), k, -1)[..., 0]
    at = [np.take_along_axis(a, k, -1)[..., 0] for a in (lam, beta, h_start)]
    return at[0] * np.maximum(at[2] + (exp1 - before), 0.0) ** (1.0 / at[1])


@dataclass(repr=False)
class LogLik(Outcome):
    """A user log-likelihood: the model's function ``loglik(psi, data)`` returns ``log p(y_ij | ψ_i)`` ``[..., N, T]``
    (saemix's ``modeltype="likelihood"``); in a joint model (``outcome={"r": LogLik()}``) the structural function's
    output ``r`` is that response's log-likelihood.  ``simulate_fn``: optional ``sim(psi, data, rng) -> y [N, T]``
    (numpy; ``psi``: each parameter's values ``[N, 1]``, with occasions ``[N, T]``; ``data``: the design ``loglik``
    receives; ``rng``: a ``numpy.random.Generator``; in a joint model only the response's records are read), which
    ``model.simulate`` and the VPC need (one call per replicate data set, all individuals from one generator).  With
    occasions each record's ψ is its occasion's, as the fit takes each record's term of ``loglik`` at its occasion's
    ψ.  On per-unit streams (``rng="per_unit"``, distributed fits) the generator is seeded from the seed and the
    simulated individuals' unit ids (:func:`_user_rng`): these draws, unlike the other responses', depend on which
    individuals are simulated together."""

    simulate_fn: Any = None
    name = "loglik"

    def log_prob(self, ops: Any, y: Any, f: Any, psi: dict[str, Any], design: Any, consts: dict[str, Any]) -> Any:
        return f


class Joint(Outcome):
    """Several responses, some non-Gaussian (a joint model: ``error={"conc": "constant"}, outcome={"ae": "binary"}``).

    Observation j of individual i belongs to the response ``r(i, j)`` of its ``DVID`` (:mod:`.responses`); its term is
    the Gaussian residual density of its response's error model or the log-probability of its response's outcome at
    the prediction of that response, and the log-likelihood of an individual is the sum over its observations of
    every response: ``log p(y_i | ψ_i) = Σ_r Σ_{j: r(i,j) = r} log p_r(y_ij | f_r(t_ij, ψ_i), ψ_i)``."""

    name = "joint"

    def __init__(self, outcomes: dict[str, Outcome]) -> None:
        self.outcomes = dict(outcomes)
        self.uses_prediction = True

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for o in self.outcomes.values() for p in o.parameters))

    def check_spec(self, spec: dict[str, Parameter]) -> None:
        for out in self.outcomes.values():
            out.check_spec(spec)

    def sample(self, rng: np.random.Generator, f: np.ndarray, psi: dict[str, np.ndarray],
               consts: dict[str, np.ndarray]) -> np.ndarray:
        raise ModelSpecificationError("the discrete VPC is for a model with one non-Gaussian response; this joint "
                                      "model has several responses (simulate it with model.simulate(theta))")

    def sample_at(self, u: np.ndarray, f: np.ndarray, psi: dict[str, np.ndarray],
                  consts: dict[str, np.ndarray]) -> np.ndarray:
        return self.sample(None, f, psi, consts)

    def __repr__(self) -> str:
        return repr(self.outcomes)


OUTCOMES = {"binary": Binary, "bernoulli": Binary, "logistic": Binary, "poisson": Poisson,
            "negative_binomial": NegativeBinomial, "negbin": NegativeBinomial, "ordinal": Ordinal,
            "categorical": Ordinal, "tte": TimeToEvent, "time_to_event": TimeToEvent, "loglik": LogLik,
            "likelihood": LogLik}


def make_outcome(outcome: Any, **options: Any) -> Outcome | None:
    """An :class:`Outcome` from an instance, a name (``"binary"``, ``"ordinal"``, ``"poisson"``,
    ``"negative_binomial"``, ``"tte"``, ``"loglik"``; aliases in :data:`OUTCOMES`) with its options, or None /
    ``"gaussian"`` (continuous data with a residual error model: None)."""
    if outcome is None or (isinstance(outcome, str) and outcome.lower() in ("gaussian", "continuous", "normal")):
        if options:
            raise ModelSpecificationError(f"outcome options {sorted(options)} need a non-Gaussian outcome")
        return None
    if isinstance(outcome, Outcome):
        if options:
            raise ModelSpecificationError("give outcome options to the Outcome's constructor, not beside it")
        return outcome
    if isinstance(outcome, dict):  # a joint model: {response: outcome}, beside error={response: error model}
        if options or not outcome:
            raise ModelSpecificationError("outcome={response: outcome, ...} needs at least one response and no "
                                          "options beside it")
        parts = {str(k): make_outcome(v) for k, v in outcome.items()}
        bad = [k for k, v in parts.items() if v is None or isinstance(v, Joint)]
        if bad:
            raise ModelSpecificationError(f"outcome={{...}}: {bad} must be non-Gaussian outcomes (Gaussian responses "
                                          f"go in error={{response: error model}})")
        return Joint(parts)
    if isinstance(outcome, str) and outcome.lower() in OUTCOMES:
        try:
            return OUTCOMES[outcome.lower()](**options)
        except TypeError as err:
            raise ModelSpecificationError(f"outcome {outcome!r}: {err}") from None
    raise ModelSpecificationError(f"unknown outcome {outcome!r}; use one of {sorted(set(OUTCOMES))}, an Outcome "
                                  f"(nlme.outcomes.Ordinal(thresholds=...), TimeToEvent(hazard=...)) or 'gaussian'")


# ----- hooks called by NLME --------------------------------------------------------------------------------------
def setup(model: NLME, structural: Any, parameters: dict[str, Any], error: str,
          error_init: dict[str, float] | None) -> Structural:
    """The structural model of an outcome model (TTE: none, a placeholder without parameters) and its checks."""
    from .structural import resolve

    outcome = model.outcome
    if isinstance(outcome, Joint):
        gaussian = isinstance(error, dict) and bool(error)
        if not isinstance(error, dict) and (error != "constant" or error_init):
            raise ModelSpecificationError("a joint model gives its Gaussian responses' error models as error="
                                          "{response: error model} beside outcome={response: outcome}")
        predicted = gaussian or any(o.uses_prediction for o in outcome.outcomes.values())
        if structural is None:
            if predicted:
                raise ModelSpecificationError("a joint model needs a structural model f(psi, data) returning "
                                              "{response: prediction} for its responses")
            return Structural(outcome.name, (), lambda psi, d: 0.0 * d.time)
        names = [p for p in parameters if p not in outcome.parameters] if not callable(structural) \
            else list(parameters)
        return resolve(structural, names)
    if error != "constant" or error_init:
        raise ModelSpecificationError(f"outcome {outcome.name!r} has no residual error model: drop error= and "
                                      f"error_init= (the outcome's own parameters are ordinary parameters)")
    if structural is None:
        if outcome.uses_prediction:
            raise ModelSpecificationError(f"outcome {outcome.name!r} needs a structural model f(psi, data) (the "
                                          f"linear predictor, or the log-likelihood for 'loglik')")
        return Structural(outcome.name, (), lambda psi, d: 0.0 * d.time)
    if not outcome.uses_prediction:
        raise ModelSpecificationError(f"outcome {outcome.name!r} takes no structural model: pass None")
    names = [p for p in parameters if p not in outcome.parameters] if not callable(structural) else list(parameters)
    return resolve(structural, names)


def bind(model: NLME, data: Any) -> dict[str, Any]:
    """Check the observations against the outcome; the per-observation constants as backend arrays."""
    if isinstance(model.outcome, Joint):
        return _bind_joint(model, data)
    if (data.cens[data.mask] != 0).any():
        raise DataError(f"outcome {model.outcome.name!r}: CENS is for continuous data (LOQ); time-to-event "
                        f"censoring is DV = 0 at the censoring time")
    problem = model.outcome.check_data(np.where(data.mask, data.dv, np.nan), data.mask)
    if problem is not None:
        i, j = np.unravel_index(problem[0], data.dv.shape)
        raise DataError(f"{problem[1]} (ID {_id(data.ids[i])}, row {data.obs_rows[i, j]})")
    consts = {"dv": np.where(data.mask, data.dv, 0.0), **model.outcome.constants(data)}
    model.importance_proposal = functools.partial(importance_proposal, model)  # read by fit.log_likelihood("is")
    return {k: model.ops.asarray(v) for k, v in consts.items()}


def _bind_joint(model: NLME, data: Any) -> dict[str, Any]:
    """A joint model's constants: ``dv``, the mask of the Gaussian responses' observations (``gaussian``) and per
    non-Gaussian response ``r`` its mask (``r/mask``), its observations (``r/dv``, 0 elsewhere) and its outcome's
    constants computed on its own records (``r/...``)."""
    resp = model._resp
    if (data.cens[data.mask] != 0).any():
        raise DataError("CENS (LOQ) is not supported in a joint model with non-Gaussian responses yet")
    index = np.asarray(model.ops.to_numpy(resp.index))
    gaussian = data.mask & (index < len(resp.names))
    consts = {"dv": np.where(data.mask, data.dv, 0.0), "gaussian": gaussian.astype(float)}
    for name, out in resp.spec.outcomes.items():
        mine = data.mask & (index == resp.all_names.index(name))
        problem = out.check_data(np.where(mine, data.dv, np.nan), mine)
        if problem is not None:
            i, j = np.unravel_index(problem[0], data.dv.shape)
            raise DataError(f"response {name!r}: {problem[1]} (ID {_id(data.ids[i])}, row {data.obs_rows[i, j]})")
        own = dataclasses.replace(data, dv=np.where(mine, data.dv, 0.0), mask=mine)
        consts.update({f"{name}/mask": mine.astype(float), f"{name}/dv": own.dv,
                       **{f"{name}/{k}": v for k, v in out.constants(own).items()}})
    model.importance_proposal = functools.partial(importance_proposal, model)
    return {k: model.ops.asarray(v) for k, v in consts.items()}


def _joint_log_prob(model: NLME, theta: dict[str, Any], f: Any, psi: dict[str, Any], design: Any,
                    consts: dict[str, Any], units: Any) -> Any:
    """Per-observation terms of a joint model (:class:`Joint`): each observation's response's Gaussian residual
    density or outcome log-probability (0 on the other responses' records; each outcome sees the prediction 0
    there, so that no masked term is infinite and no gradient NaN)."""
    from latentfit.inference.ops import LOG_2PI

    from . import responses as _resp

    ops, xp, resp = model.ops, model.ops.xp, model._resp
    lp = 0.0 * f
    if resp.names:
        sd = _resp.error_sd(theta, f, resp, units, ops)
        r = (consts["dv"] - f) / sd
        lp = xp.where(consts["gaussian"] > 0, -0.5 * r * r - xp.log(sd) - 0.5 * LOG_2PI, lp)
    for name, out in resp.spec.outcomes.items():
        mine = consts[f"{name}/mask"] > 0
        own = {k[len(name) + 1:]: v for k, v in consts.items() if k.startswith(name + "/")}
        f_r = xp.where(mine, f, 0.0) if out.uses_prediction else None
        lp = xp.where(mine, out.log_prob(ops, own["dv"], f_r, psi, design, own), lp)
    return lp


#: importance sampling of outcome models: pilot draws per unit, and the proposal's least degrees of freedom
PILOT_SAMPLES = 2000
MIN_IS_DF = 10


def importance_proposal(model: NLME, theta: dict[str, Any], mean: Any, sd: Any, df: int, *, unit_ids: Any = None,
                        ops: Any = None) -> tuple[Any, Any, int]:
    """The importance-sampling proposal of ``fit.log_likelihood("is")`` fitted to each individual's conditional
    distribution: its mean and sd re-estimated by a weighted pilot pass around the chains' moments
    (:func:`~latentfit.inference.likelihood.importance_moments`), and at least :data:`MIN_IS_DF` degrees of freedom.
    Heavier tails are not needed: with these outcomes the likelihood of an individual is bounded in ψ, so the
    conditional density has the Gaussian tails of the prior, and the closer fit divides the Monte-Carlo variance
    (measured: binary, 200 individuals, 5000 draws: MC SE 0.047 with df 4, 0.025 with df 10).  ``unit_ids``
    (``ops``: a distributed fit's shim): the pilot draws of each individual from its own stream, as the IS pass's."""
    from latentfit.inference.likelihood import importance_moments

    mean, sd = importance_moments(model, theta, mean, sd, num_samples=PILOT_SAMPLES, unit_ids=unit_ids, ops=ops)
    return mean, sd, max(int(df), MIN_IS_DF)


def parameter_names(structural: Structural, outcome: Outcome | None) -> list[str]:
    """The model's parameters: the structural model's, then the outcome's own (thresholds, dispersion, hazard)."""
    names = list(structural.parameters)
    return names + [p for p in (outcome.parameters if outcome is not None else ()) if p not in names]


def require_gaussian(model: NLME, what: str) -> None:
    """Refuse the Gaussian faces (predictions with a residual sd, Pyro's Normal DV) of an outcome model."""
    if model.outcome is not None:
        raise ModelSpecificationError(f"{what} needs continuous data with a residual error model; this model's "
                                      f"outcome is {model.outcome.name!r} (simulate with model.simulate(theta))")


def describe(model: NLME) -> str:
    """``outcome='binary'`` or ``error='constant'`` (for the model's repr)."""
    if isinstance(model.outcome, Joint):
        spec = model.response_spec
        return f"error={dict(zip(spec.names, spec.errors, strict=True))!r}, outcome={model.outcome!r}"
    return f"outcome={model.outcome!r}" if model.outcome is not None else f"error={model.error!r}"


def log_prob(model: NLME, theta: dict[str, Any], z: Any, units: Any = None, mu: Any = None) -> Any:
    """Per-observation log-probabilities ``[..., n, T]`` (padding 0)."""
    ops, xp = model.ops, model.ops.xp
    mu = model._mu(theta, units) if mu is None else mu
    design = model.design.take(ops, units)
    out = model.outcome
    consts = {k: model._take(v, units) for k, v in model._outcome_consts.items()}
    if model._iov is None:
        psi = model._psi(mu, z)
    else:  # ψ of each occasion (a leading axis K), each observation's term taken at its own occasion
        psi = model._psi_by_occasion(mu, z)
    f = model._structural_fn(psi, design) if out.uses_prediction else None
    if isinstance(out, Joint):
        lp = _joint_log_prob(model, theta, f, psi, design, consts, units)
    else:
        lp = out.log_prob(ops, consts["dv"], f, psi, design, consts)
    if model._iov is not None:
        from . import occasions as _occ

        lp = _occ.select(lp + 0.0 * consts["dv"], model._iov, units, ops)
    if not model._no_padding:
        lp = xp.where(model._take(model._mask, units), lp, 0.0)
    return lp


def simulate(model: NLME, theta: dict[str, Any], seed: int) -> pd.DataFrame:
    """A data table simulated from the outcome model at ``theta`` (random effects drawn from their prior): the bound
    table with ``DV`` replaced, or for time-to-event data new records (start at 0, events, censoring at each
    individual's last record time).  With occasions (``iov=``) each record is drawn at its occasion's ψ (a user
    simulator receives them ``[N, T]``, each record's, as its log-likelihood's terms are taken), and a hazard with
    occasion effects is occasion k's from the occasion's start (:func:`invert_cumulative_hazard`; records closing and
    opening each occasion are written, :func:`_event_rows`)."""
    ops = model.ops
    with ops.seed_context(seed):
        z = model.sample_prior(theta, ops.key(seed), 1)[0]
    mu = model._mu(theta)
    data, out = model.data, model.outcome
    rng = np.random.default_rng(seed)
    psi_k = None
    if model._iov is not None:  # ψ and f of each observation's occasion ([N, T])
        from . import occasions as _occ

        psi_k = model._psi_by_occasion(mu, z)
        if isinstance(out, TimeToEvent):
            if _hazard_has_iov(model, out):
                return _simulate_tte(model, out, _hazard_by_occasion(model, out, psi_k), rng, _occasion_starts(model))
            psi = {k: np.broadcast_to(ops.to_numpy(v), (model.num_units, 1))
                   for k, v in model._psi(mu, _occ.split(z, model._iov)[0]).items()}
            return _simulate_tte(model, out, psi, rng)
        f_b = _occ.select(model._structural_fn(psi_k, model.design), model._iov, None, ops)
        psi = {k: ops.to_numpy(_occ.select(v + 0.0 * model._y, model._iov, None, ops)) for k, v in psi_k.items()}
    else:
        psi_b = model._psi(mu, z)
        psi = {k: np.broadcast_to(ops.to_numpy(v), (model.num_units, 1)) for k, v in psi_b.items()}
        if isinstance(out, TimeToEvent):
            return _simulate_tte(model, out, psi, rng)
        f_b = model._structural_fn(psi_b, model.design) if out.uses_prediction else None
    if isinstance(out, Joint):
        y = _simulate_joint(model, theta, f_b, psi, rng)
    elif isinstance(out, LogLik):
        if out.simulate_fn is None:
            raise ModelSpecificationError("a user log-likelihood has no simulator: give outcome=nlme.outcomes."
                                          "LogLik(simulate_fn=sim) with sim(psi, data, rng) -> y [N, T]")
        y = np.asarray(out.simulate_fn(psi, model.design, rng), dtype=float)
    else:
        f = ops.to_numpy(f_b)
        y = out.sample(rng, np.broadcast_to(f, data.dv.shape), psi, out.constants(data))
    table = model.table  # a new DataFrame (rebuilt from the model's compact copy of the bound table)
    dv_col = data.columns["dv"]
    table[dv_col] = table[dv_col].astype(float)
    rows = data.obs_rows
    valid = rows >= 0
    table.iloc[rows[valid], table.columns.get_loc(dv_col)] = y[valid]
    if isinstance(out, Joint):  # each time-to-event response: new records (after every other response's draws)
        for name, tte in _event_responses(model):
            hazard = _hazard_by_occasion(model, tte, psi_k) if _hazard_has_iov(model, tte) else psi
            table = _replace_event_records(model, table, name, tte, hazard, rng)
    return table


def _event_responses(model: NLME) -> list[tuple[str, TimeToEvent]]:
    """The time-to-event responses of a joint model, in response order (none for other models)."""
    out = model.outcome
    if not isinstance(out, Joint):
        return []
    return [(name, o) for name, o in model._resp.spec.outcomes.items() if isinstance(o, TimeToEvent)]


def _hazard_has_iov(model: NLME, out: Outcome) -> bool:
    """Whether the hazard of the time-to-event outcome ``out`` reads a parameter with occasion effects (κ)."""
    return model._iov is not None and bool(set(out.parameters) & set(model._iov.names))


def _occasion_starts(model: NLME) -> np.ndarray:
    """Where each occasion's hazard starts, ``[N, K]`` (numpy): 0 for the first occasion, the first record (of any
    kind) of each later one (:func:`~latentfit.models.nlme.occasions.starts`: occasion k lasts until the first record
    of occasion k + 1), ``inf`` for the padding occasions."""
    from . import occasions as _occ

    start, _, valid, _ = _occ.starts(model.data, model._table.column(model._iov.column), model._iov)
    return np.concatenate([np.zeros((start.shape[0], 1)), np.where(valid, np.maximum(start, 0.0), np.inf)], 1)


def bind_occasions(model: NLME) -> None:
    """Give each time-to-event outcome whose hazard has occasion effects the occasions' spans, ``occ_start`` and
    ``occ_end`` ``[N, K]`` (occasion k in force on ``[s_k, s_{k+1})``, :func:`_occasion_starts`; the padding
    occasions and the last one's end at the individual's last record), so that its log-likelihood splits each
    interval at the occasions' starts (:meth:`TimeToEvent._log_prob_by_occasion`), as the simulations do."""
    outcomes = (model._resp.spec.outcomes.items() if isinstance(model.outcome, Joint)
                else [(None, model.outcome)])
    tte = [(name, out) for name, out in outcomes if isinstance(out, TimeToEvent) and _hazard_has_iov(model, out)]
    if not tte:
        return
    start = _occasion_starts(model)
    last = np.where(model.data.mask, model.data.time, -np.inf).max(1, keepdims=True)
    last = np.maximum(np.where(np.isfinite(last), last, 0.0), 0.0)
    start = np.where(np.isfinite(start), start, last)
    end = np.concatenate([start[:, 1:], last], 1)
    for name, _ in tte:
        pre = "" if name is None else f"{name}/"
        model._outcome_consts.update({pre + "occ_start": model.ops.asarray(start),
                                      pre + "occ_end": model.ops.asarray(end)})


def _hazard_by_occasion(model: NLME, out: TimeToEvent, psi_k: dict[str, Any]) -> dict[str, np.ndarray]:
    """The hazard's parameters of each occasion ``[..., N, K]`` (numpy) from ψ by occasion ``[..., K, N, 1]``."""
    ops = model.ops
    return {k: np.moveaxis(np.asarray(ops.to_numpy(psi_k[k]))[..., 0], -2, -1) for k in out.parameters}


def _tte_records(model: NLME, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A joint model's time-to-event response ``name``: its records ``[N, T]`` and each individual's end of follow-up
    ``[N]`` (its last record's time; -inf without records)."""
    data, resp = model.data, model._resp
    index = np.asarray(model.ops.to_numpy(resp.index))
    mine = data.mask & (index == resp.all_names.index(name))
    return mine, np.where(mine, data.time, -np.inf).max(1)


def _first_events(out: TimeToEvent, psi: dict[str, np.ndarray], end: np.ndarray, exp1: np.ndarray,
                  start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first event ``t = λ E^{1/β}`` (the inverse of ``H(t) = (t/λ)^β`` at ``E ~ Exp(1)``; β = 1 for a constant
    hazard) censored at ``end``: ``(min(t, end), t <= end)``, from ψ ``[..., N]`` and ``exp1`` ``[..., N]``; with
    occasion starts ``start [N, K]`` ψ is ``[..., N, K]`` and ``t`` the piecewise inverse
    (:func:`invert_cumulative_hazard`)."""
    lam, beta = out.hazard_parameters(psi)
    t = lam * exp1 ** (1.0 / beta) if start is None else invert_cumulative_hazard(exp1, lam, beta, start)
    event = t <= end
    return np.where(event, t, end), event


def _replace_event_records(model: NLME, table: pd.DataFrame, name: str, out: TimeToEvent,
                           psi: dict[str, np.ndarray], rng: np.random.Generator) -> pd.DataFrame:
    """``table`` with the records of the time-to-event response ``name`` replaced by simulated ones per individual
    (:func:`_event_rows`: start at 0, the events by inversion of the cumulative hazard, censoring at the individual's
    last record of the response), the other columns copied from its first record of the response.  ``psi``: the
    hazard's parameters ``[N, 1]``, or ``[N, K]`` when they have occasion effects (occasion k's hazard from its start,
    :func:`_occasion_starts`, with records closing and opening each occasion); the occasion column (``iov=``) of the
    other new records: the occasion of the interval each closes, or, when the hazard has no κ, the one in force at its
    time (the latest other record's at or before it)."""
    data, resp = model.data, model._resp
    mine, end = _tte_records(model, name)
    has = mine.any(1)
    cols = data.columns
    id_col, time_col, dv_col = cols["id"], cols.get("time", "TIME"), cols["dv"]
    start = _occasion_starts(model) if _hazard_has_iov(model, out) else None
    end0 = np.where(has, end, 0.0)
    events = out.event_times(rng, {k: np.asarray(psi[k])[:, :1] if start is None else psi[k] for k in out.parameters},
                             end0, start=start)
    unit, times, dv, occ = _event_rows(events, end0, has, start)
    ours = table.index[table[resp.column].astype(float) == resp.values[resp.all_names.index(name)]]
    kept = table.drop(index=ours)
    first = table.loc[ours].drop_duplicates(id_col).set_index(id_col)
    ids = data.ids[unit]
    pos = first.index.get_indexer(ids)
    new = pd.DataFrame({c: first[c].to_numpy()[pos] for c in first.columns})
    new.insert(0, id_col, ids)
    new[time_col], new[dv_col] = times, dv
    occ_col = model._iov.column if model._iov is not None else None
    if occ is not None:
        new[occ_col] = _occasion_labels(model, first[occ_col], unit, occ)
    elif occ_col is not None:  # the occasion in force at each record: the latest other record's at or before it
        new[occ_col] = _in_force(data.ids, kept[id_col], kept[time_col], kept[occ_col], unit, times, new[occ_col])
    both = pd.concat([kept, new[table.columns]], ignore_index=True)
    order = pd.factorize(table[id_col])[1]  # the individuals in the table's order, then time (stable)
    key = pd.Series(pd.Categorical(both[id_col], categories=order, ordered=True).codes, index=both.index)
    both = both.assign(_order=key).sort_values(["_order", time_col], kind="stable").drop(columns="_order")
    return both.reset_index(drop=True)


def _event_rows(events: np.ndarray, end: np.ndarray, has: np.ndarray,
                start: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The new records of a time-to-event response, individual after individual in time order (vectorised):
    ``(individual index, time, DV, occasion index or None)`` ``[R]``: for each individual with ``has``, a start at
    0, its events (``events [N, M]``, ``inf``: none) and a censoring at ``end`` unless its last event is there.  With
    occasion starts ``start [N, K]`` (:func:`_occasion_starts`), at each start in ``(0, end)`` a record (DV 0)
    closing the occasion before and one opening the occasion, and each record's occasion the one of the interval
    ``(previous record, record]`` it closes (the log-likelihood's), so that a fit of the table has the hazard
    :func:`invert_cumulative_hazard` simulated."""
    n, m = events.shape
    last = np.where(np.isfinite(events), events, -np.inf).max(1) if m else np.full(n, -np.inf)
    times = np.concatenate([np.zeros((n, 1)), events, end[:, None]], 1)
    dv = np.concatenate([np.zeros((n, 1)), np.ones((n, m)), np.zeros((n, 1))], 1)
    keep = np.concatenate([np.ones((n, 1), bool), np.isfinite(events), (last != end)[:, None]], 1) & has[:, None]
    occ = None
    if start is not None:
        bound = start[:, 1:]
        inside = np.isfinite(bound) & (bound > 0) & (bound < end[:, None])
        k = np.arange(1, start.shape[1])
        closes = (start[:, None, 1:] < times[:, :, None]).sum(-1)  # occasion of the interval each record closes
        times = np.concatenate([times, bound, bound], 1)
        dv = np.concatenate([dv, np.zeros_like(bound), np.zeros_like(bound)], 1)
        occ = np.concatenate([closes, np.broadcast_to(k - 1, bound.shape), np.broadcast_to(k, bound.shape)], 1)
        keep = np.concatenate([keep, inside & has[:, None], inside & has[:, None]], 1)
    unit = np.broadcast_to(np.arange(n)[:, None], times.shape)[keep]
    times, dv = times[keep], dv[keep]
    if occ is None:
        return unit, times, dv, None
    occ = occ[keep]
    order = np.lexsort((occ, times, unit))  # at an occasion's start: the closing record before the opening one
    return unit[order], times[order], dv[order], occ[order]


def _occasion_labels(model: NLME, like: pd.Series, unit: np.ndarray, occ: np.ndarray) -> np.ndarray:
    """The occasion column's values (as in the data, ``like``'s dtype) of occasion indices ``occ`` of ``unit``."""
    labels = model._iov.labels[unit, occ]
    return labels.astype(like.dtype) if pd.api.types.is_numeric_dtype(like.dtype) else labels


def _in_force(ids: np.ndarray, src_id: pd.Series, src_time: pd.Series, src_occ: pd.Series, unit: np.ndarray,
              times: np.ndarray, default: pd.Series) -> np.ndarray:
    """The occasion in force at ``(unit, times)``: that of the individual's latest record of ``src`` at or before it
    (its first one before them all; ``default`` for an individual without records there), vectorised."""
    su = pd.Index(ids).get_indexer(src_id.to_numpy())
    ok = su >= 0
    su, st, so = su[ok], src_time.to_numpy(dtype=float)[ok], src_occ.to_numpy()[ok]
    order = np.lexsort((st, su))  # the individual's records by time (table order at equal times)
    su, st, so = su[order], st[order], so[order]
    _, rank = np.unique(np.concatenate([st, times]), return_inverse=True)
    width = int(rank.max()) + 2 if rank.size else 1
    src_key, new_key = su * width + rank[:st.size], unit * width + rank[st.size:]
    at = np.searchsorted(src_key, new_key, side="right") - 1
    lo, hi = np.searchsorted(su, unit, "left"), np.searchsorted(su, unit, "right")
    out = default.to_numpy().copy()
    has = hi > lo
    out[has] = so[np.maximum(at, lo)[has]]
    return out


def _simulate_joint(model: NLME, theta: dict[str, Any], f_b: Any, psi: dict[str, np.ndarray],
                    rng: np.random.Generator) -> np.ndarray:
    """Observations ``[N, T]`` of a joint model: each Gaussian response's prediction plus its residual error, each
    non-Gaussian response drawn from its outcome at its prediction (one numpy stream, responses in order)."""
    from . import responses as _resp

    ops, data, resp = model.ops, model.data, model._resp
    index = np.asarray(ops.to_numpy(resp.index))
    f = np.array(np.broadcast_to(ops.to_numpy(f_b), data.dv.shape))
    sd = ops.to_numpy(_resp.error_sd(theta, ops.asarray(f), resp, None, ops))
    y = f + sd * rng.standard_normal(f.shape)
    for name, out in resp.spec.outcomes.items():
        mine = data.mask & (index == resp.all_names.index(name))
        if isinstance(out, TimeToEvent):  # new records, drawn after the other responses (_replace_event_records)
            continue
        if isinstance(out, LogLik):
            drawn = _user_simulation(model, name, out, psi, rng)
        else:
            own = dataclasses.replace(data, dv=np.where(mine, data.dv, 0.0), mask=mine)
            drawn = out.sample(rng, np.where(mine, f, 0.0), psi, out.constants(own))
        y = np.where(mine, drawn, y)
    return y


def _user_simulation(model: NLME, name: str, out: LogLik, psi: dict[str, np.ndarray],
                     rng: np.random.Generator) -> np.ndarray:
    """One replicate ``[N, T]`` of a joint model's user log-likelihood response ``name`` from its simulator
    ``sim(psi, data, rng)`` (only the response's records are read), or the error saying how to give one."""
    if out.simulate_fn is None:
        raise ModelSpecificationError(
            f"response {name!r}: a user log-likelihood response has no simulator, so it cannot be simulated (VPC, "
            f"model.simulate): give outcome={{{name!r}: nlme.outcomes.LogLik(simulate_fn=sim)}} with "
            f"sim(psi, data, rng) -> DV [N, T] (psi: each parameter's values [N, 1] as numpy arrays, data: the design "
            f"loglik receives, rng: a numpy Generator; only the records of {name!r} are read)")
    y = np.asarray(out.simulate_fn(psi, model.design, rng), dtype=float)
    return np.broadcast_to(y, model.data.dv.shape)


def _unit_stream_draws(model: NLME, theta: dict[str, Any], num_sims: int, seed: int, unit_ids: Any, ops: Any,
                       tail: tuple[int, ...]) -> tuple[Any, np.ndarray]:
    """Per-unit streams ``(seed, unit id)``: ``num_sims`` random-effect draws ``z_i = μ_i + L ε_i`` ``[K, n, d]`` (the
    model's prior transform of unit i's standard normals) and unit i's uniforms ``[K, n, *tail]`` on (0, 1) (numpy)."""
    ops = model.ops if ops is None else ops
    sim, root, z = prior_draws_on_streams(model, theta, num_sims, seed, unit_ids, ops)
    u = sim.uniform(ops.fold_in(root, 2), (int(num_sims), model.num_units) + tuple(tail))
    return z, np.asarray(model.ops.to_numpy(u), dtype=float)


def _simulated_psi(model: NLME, theta: dict[str, Any], z: Any, shape: tuple[int, ...]) -> tuple[Any, dict]:
    """ψ of the prior draws ``z [K, N, d]``: the backend's (for the structural model) and numpy's, ``[K, N, 1]``, or
    with occasions (``iov=``) each observation's at its occasion, ``[K, N, T]`` (the backend's ``[K, occasions, N,
    1]``: κ taken from the draws' trailing coordinates, as in :func:`simulate`)."""
    ops, mu = model.ops, model._mu(theta)
    if model._iov is None:
        psi_b = model._psi(mu, z)
        return psi_b, {k: np.broadcast_to(ops.to_numpy(v), shape[:2] + (1,)) for k, v in psi_b.items()}
    from . import occasions as _occ

    psi_b = model._psi_by_occasion(mu, z)
    return psi_b, {k: np.broadcast_to(ops.to_numpy(_occ.select(v + 0.0 * model._y, model._iov, None, ops)), shape)
                   for k, v in psi_b.items()}


def _simulated_prediction(model: NLME, psi_b: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """The structural prediction ``[K, N, T]`` (numpy) at :func:`_simulated_psi`'s ψ (with occasions: each
    observation's at its own occasion)."""
    ops = model.ops
    f = model._structural_fn(psi_b, model.design)
    if model._iov is not None:
        from . import occasions as _occ

        f = _occ.select(f, model._iov, None, ops)
    return np.broadcast_to(ops.to_numpy(f), shape)


def _user_rng(seed: int, unit_ids: Any) -> np.random.Generator:
    """The numpy generator of a user simulator ``sim(psi, data, rng)`` on per-unit streams (it draws all the
    individuals it is given at once, so it cannot read each one's stream): seeded from ``seed`` and a BLAKE2 digest
    of the simulated individuals' unit ids in order.  Each process of a distributed fit thus draws its own numbers for
    its block, and a one-process fit the same numbers for the same seed and individuals; unlike the other responses'
    draws, these depend on which individuals are simulated together and in what order."""
    import hashlib

    ids = np.ascontiguousarray(np.asarray(unit_ids, dtype=np.int64))
    words = np.frombuffer(hashlib.blake2b(ids.tobytes(), digest_size=16).digest(), dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, *(int(w) for w in words)]))


def _has_user_simulator(out: Outcome) -> bool:
    parts = out.outcomes.values() if isinstance(out, Joint) else (out,)
    return any(isinstance(o, LogLik) for o in parts)


def simulate_observations(model: NLME, theta: dict[str, Any], num_sims: int, seed: int = 0, *, unit_ids: Any = None,
                          ops: Any = None) -> np.ndarray:
    """``num_sims`` replicates of the observations ``[K, N, T]`` at ``theta`` (random effects drawn from their prior,
    all replicates in one vectorised pass), for the visual predictive checks of discrete and count outcomes.  The
    padding and censored records hold NaN, and so do a joint model's time-to-event records (their first events:
    :func:`simulate_joint`).

    ``unit_ids`` (``[N]`` distinct ints): individual i's replicates from its stream ``(seed, unit_ids[i])`` only
    (:func:`_unit_stream_draws`; the observations by inversion of their CDF, :meth:`Outcome.sample_at`), whatever the
    other individuals or the process holding it (``ops``: a distributed fit's shim, whose processes agree on the
    width of the uniforms); a user simulator's draws come from one generator seeded from ``seed`` and the unit ids
    (:func:`_user_rng`)."""
    if isinstance(model.outcome, TimeToEvent):
        raise ModelSpecificationError("time-to-event data: use first_event_times() (a Kaplan-Meier VPC)")
    return _replicates(model, theta, num_sims, seed, unit_ids, ops)[0]


def simulate_joint(model: NLME, theta: dict[str, Any], num_sims: int, seed: int = 0, *, unit_ids: Any = None,
                   ops: Any = None) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``num_sims`` replicates of a joint model at ``theta``, every response of a replicate from the same random-effect
    draws: ``(y [K, N, T], {tte response: (time [K, N], event [K, N])})``.  ``y``: the observations of the Gaussian,
    discrete, count and user log-likelihood responses (as :func:`simulate_observations`; NaN elsewhere); for each
    time-to-event response, each individual's first event ``t = λ E^{1/β}`` (``E ~ Exp(1)``: the inverse of the
    cumulative hazard, ``β = 1`` for a constant hazard) censored at the individual's last record of that response
    (its end of follow-up in the design; ``-inf``, no event, for an individual without records of it).  The
    exponentials come after the other draws on the global stream, or by ``E = −log U`` from the uniforms that follow
    the records' on per-unit streams (``unit_ids``), so the other responses' replicates are those of a model
    without the time-to-event response.  With occasion effects on the hazard's parameters (``iov=``) occasion k's
    hazard holds from its start, and ``t`` solves the piecewise ``H(t) = E`` (:func:`invert_cumulative_hazard`)."""
    if not isinstance(model.outcome, Joint):
        raise ModelSpecificationError("simulate_joint is for joint models (error={...} beside outcome={...})")
    return _replicates(model, theta, num_sims, seed, unit_ids, ops)


def _replicates(model: NLME, theta: dict[str, Any], num_sims: int, seed: int, unit_ids: Any,
                ops: Any) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """:func:`simulate_joint` for any outcome model (no first events but a joint model's)."""
    dist = model.ops if ops is None else ops
    ops, out, data = model.ops, model.outcome, model.data
    events = _event_responses(model)
    shape = (int(num_sims),) + data.dv.shape
    if unit_ids is not None:
        width = max_over_processes(dist, shape[-1])
        z, u = _unit_stream_draws(model, theta, num_sims, seed, unit_ids, dist, (width + len(events),))
        rng = _user_rng(seed, unit_ids) if _has_user_simulator(out) else None  # a user simulator's only
    else:
        z = model.sample_prior(theta, ops.key(seed), int(num_sims))  # [K, N, d]
        rng = np.random.default_rng(seed)
    psi_b, psi = _simulated_psi(model, theta, z, shape)
    first: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if isinstance(out, LogLik):  # one numpy stream (per-unit streams: _user_rng)
        if out.simulate_fn is None:
            raise ModelSpecificationError("a user log-likelihood has no simulator: give outcome=nlme.outcomes."
                                          "LogLik(simulate_fn=sim) with sim(psi, data, rng) -> y [N, T]")
        y = np.stack([np.asarray(out.simulate_fn({k: v[s] for k, v in psi.items()}, model.design, rng), dtype=float)
                      for s in range(int(num_sims))])
    elif isinstance(out, Joint):
        f = _simulated_prediction(model, psi_b, shape)
        y = _joint_replicates(model, theta, f, psi, rng, u[..., :shape[-1]] if unit_ids is not None else None)
        for j, (name, tte) in enumerate(events):
            end = _tte_records(model, name)[1]
            exp1 = -np.log(u[..., width + j]) if unit_ids is not None else rng.exponential(size=shape[:2])
            if _hazard_has_iov(model, tte):  # occasion k's hazard from its start
                first[name] = _first_events(tte, _hazard_by_occasion(model, tte, psi_b), end, exp1,
                                            _occasion_starts(model))
            else:
                first[name] = _first_events(tte, {k: psi[k][..., 0] for k in tte.parameters}, end, exp1)
    else:
        f = _simulated_prediction(model, psi_b, shape)
        consts = out.constants(data)
        if unit_ids is not None:
            y = out.sample_at(u[..., :shape[-1]], f, psi, consts)
        else:
            y = out.sample(rng, f, psi, consts)
    return np.where(data.mask & (data.cens == 0), y, np.nan), first


def _joint_replicates(model: NLME, theta: dict[str, Any], f: np.ndarray, psi: dict[str, np.ndarray],
                      rng: np.random.Generator | None, u: np.ndarray | None) -> np.ndarray:
    """Replicates ``[K, N, T]`` of every response of a joint model from one set of random-effect draws (``f``, ``psi``
    at them): each Gaussian response's prediction plus its residual error ``sd · ε``, each non-Gaussian response
    drawn from its outcome at its prediction, each user log-likelihood response from its simulator (one call per
    replicate, with ``rng``), NaN at time-to-event records (:func:`simulate_joint`).  ``u`` None: everything from
    the one numpy stream ``rng``; else ``u`` (uniforms ``[K, N, T]`` of the individuals' streams): ``ε = Φ⁻¹(u)`` and
    the outcomes by inversion (:meth:`Outcome.sample_at`), each record being one response's, and ``rng``
    (:func:`_user_rng`) for the user simulators only."""
    from scipy.special import ndtri

    from . import responses as _resp

    ops, data, resp = model.ops, model.data, model._resp
    index = np.asarray(ops.to_numpy(resp.index))
    sd = np.broadcast_to(ops.to_numpy(_resp.error_sd(theta, ops.asarray(np.array(f)), resp, None, ops)), f.shape)
    eps = ndtri(np.clip(u, 1e-300, 1.0 - 1e-16)) if u is not None else rng.standard_normal(f.shape)
    y = f + sd * eps
    for name, out in resp.spec.outcomes.items():
        mine = data.mask & (index == resp.all_names.index(name))
        if isinstance(out, TimeToEvent):
            y = np.where(mine, np.nan, y)
            continue
        if isinstance(out, LogLik):  # the one numpy stream, or on per-unit streams _user_rng's
            drawn = np.stack([_user_simulation(model, name, out, {k: v[s] for k, v in psi.items()}, rng)
                              for s in range(f.shape[0])])
        else:
            own = dataclasses.replace(data, dv=np.where(mine, data.dv, 0.0), mask=mine)
            at = np.where(mine, f, 0.0)
            drawn = out.sample_at(u, at, psi, out.constants(own)) if u is not None else \
                out.sample(rng, at, psi, out.constants(own))
        y = np.where(mine, drawn, y)
    return y


def first_event_times(model: NLME, theta: dict[str, Any] | None = None, num_sims: int = 0,
                      seed: int = 0, *, unit_ids: Any = None, ops: Any = None,
                      response: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Time to each individual's first event and whether it was observed (else censored at the last record):
    ``(time [K, N], event [K, N])``.  ``theta`` None: the data (K = 1); else ``num_sims`` replicates at ``theta``,
    the first event drawn by inversion of the cumulative hazard, ``t = λ E^{1/β}`` with ``E ~ Exp(1)`` (with
    occasion effects on the hazard, the piecewise inverse :func:`invert_cumulative_hazard`).  ``unit_ids``
    (``ops``): individual i's random effects and ``E = −log U`` from its stream ``(seed, unit_ids[i])`` (as
    :func:`simulate_observations`).  A joint model: ``response`` names its time-to-event response, whose
    records alone count (an individual without any: time ``-inf``, no event); the replicates are
    :func:`simulate_joint`'s."""
    out, data = model.outcome, model.data
    if isinstance(out, Joint):
        if not isinstance(out.outcomes.get(response), TimeToEvent):
            tte = [n for n, o in out.outcomes.items() if isinstance(o, TimeToEvent)]
            raise ModelSpecificationError(f"first_event_times(response=...) of a joint model names one of its "
                                          f"time-to-event responses {tte}; got {response!r}")
        mine, end = _tte_records(model, response)
        if theta is not None:
            return simulate_joint(model, theta, num_sims, seed, unit_ids=unit_ids, ops=ops)[1][response]
        hit = mine & (data.dv == 1) & (data.time > 0)
        first = np.where(hit, data.time, np.inf).min(1)
        event = np.isfinite(first)
        return np.where(event, first, end)[None], event[None]
    if not isinstance(out, TimeToEvent):
        raise ModelSpecificationError(f"first_event_times() is for time-to-event data; the outcome is {out.name!r}")
    end = np.where(data.mask, data.time, -np.inf).max(1)  # [N] end of follow-up
    if theta is None:
        hit = data.mask & (data.dv == 1) & (data.time > 0)
        first = np.where(hit, data.time, np.inf).min(1)
        event = np.isfinite(first)
        return np.where(event, first, end)[None], event[None]
    if unit_ids is not None:
        z, u = _unit_stream_draws(model, theta, num_sims, seed, unit_ids, ops, ())
        exp1 = -np.log(u)  # Exp(1) by inversion
    else:
        z = model.sample_prior(theta, model.ops.key(seed), int(num_sims))
        exp1 = None
    shape = (int(num_sims), model.num_units)
    start = None
    if _hazard_has_iov(model, out):  # ψ of each occasion [K, N, occasions]; occasion k's hazard from its start
        psi = _hazard_by_occasion(model, out, model._psi_by_occasion(model._mu(theta), z))
        start = _occasion_starts(model)
    else:
        z_phi = z if model._iov is None else _occ_split(model, z)
        psi = {k: np.broadcast_to(model.ops.to_numpy(v), shape + (1,))[..., 0]
               for k, v in model._psi(model._mu(theta), z_phi).items()}
    if exp1 is None:
        exp1 = np.random.default_rng(seed).exponential(size=shape)
    return _first_events(out, psi, end, exp1, start)


def _occ_split(model: NLME, z: Any) -> Any:
    """The η part of latents with occasion effects."""
    from . import occasions as _occ

    return _occ.split(z, model._iov)[0]


def kaplan_meier(time: np.ndarray, event: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Product-limit survival estimates ``[K, G]`` on ``grid`` of K samples ``time, event [K, N]`` (right censoring;
    tied events counted together, censoring after events at the same time)."""
    time, event = np.atleast_2d(time), np.atleast_2d(event).astype(bool)
    order = np.lexsort((~event, time), axis=-1)  # by time, events before censorings at the same time
    t_sorted = np.take_along_axis(time, order, -1)
    d_sorted = np.take_along_axis(event, order, -1)
    at_risk = time.shape[-1] - np.arange(time.shape[-1])  # N, N-1, ... at each sorted record
    surv = np.cumprod(1.0 - d_sorted / at_risk, -1)  # [K, N]: S just after each sorted record
    count = (t_sorted[:, :, None] <= grid[None, None, :]).sum(1)  # [K, G] records at or before each grid time
    padded = np.concatenate([np.ones((time.shape[0], 1)), surv], -1)
    return np.take_along_axis(padded, count, -1)


def _simulate_tte(model: NLME, out: TimeToEvent, psi: dict[str, np.ndarray], rng: np.random.Generator,
                  start: np.ndarray | None = None) -> pd.DataFrame:
    """New records of a time-to-event outcome (:func:`_event_rows`), the other columns copied from each individual's
    first record; ``psi`` ``[N, 1]``, or ``[N, K]`` with occasion starts ``start`` (the hazard has κ)."""
    data = model.data
    end = np.where(data.mask, data.time, -np.inf).max(1)
    events = out.event_times(rng, psi, end, start=start)
    unit, times, dv, occ = _event_rows(events, end, np.ones(end.shape, bool), start)
    cols = data.columns
    id_col, time_col, dv_col = cols["id"], cols.get("time", "TIME"), cols["dv"]
    first = model.table.drop_duplicates(id_col).set_index(id_col)
    keep = [c for c in first.columns if c not in (time_col, dv_col)]
    ids = data.ids[unit]
    pos = first.index.get_indexer(ids)
    frame = pd.DataFrame({id_col: ids, time_col: times, dv_col: dv})
    for c in keep:
        frame[c] = first[c].to_numpy()[pos]
    if occ is not None:
        frame[model._iov.column] = _occasion_labels(model, first[model._iov.column], unit, occ)
    return frame


def raise_for_nonfinite(model: NLME, theta: dict[str, Any], z: Any) -> None:
    """Name the first individual and record whose log-probability is not finite."""
    terms = model.ops.to_numpy(log_prob(model, theta, z))
    bad = ~np.isfinite(terms)
    if bad.any():
        idx = np.argwhere(bad)[0]
        i, t = idx[-2], idx[-1]
        data = model.data
        raise ModelSpecificationError(
            f"the log-likelihood of outcome {model.outcome.name!r} is not finite at the initial parameter values for "
            f"ID {_id(data.ids[i])} (row {data.obs_rows[i, t]}, DV {data.dv[i, t]}): check the initial values "
            f"(e.g. a probability of 0 for an observed category)")


__all__ = ["OUTCOMES", "Binary", "LogLik", "NegativeBinomial", "Ordinal", "Outcome", "Poisson", "TimeToEvent",
           "first_event_times", "invert_cumulative_hazard", "kaplan_meier", "make_outcome", "simulate_joint",
           "simulate_observations"]
