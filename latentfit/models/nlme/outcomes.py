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
  ``λ``, ``β`` are ψ's of the model (no structural model: ``NLME(None, ..., outcome=TimeToEvent(...))``);
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
        if self.hazard == "constant":
            rate = xp.exp(-log_lam)
            return -(design.time - consts["prev_time"]) * rate - y * log_lam
        beta = psi[self.shape]
        lt, lp = consts["log_time"] - log_lam, consts["log_prev"] - log_lam
        cum = xp.exp(beta * lt) * consts["time_positive"] - xp.exp(beta * lp) * consts["prev_positive"]
        log_h = xp.log(beta) - log_lam + (beta - 1.0) * lt
        return -cum + y * log_h

    def simulate_events(self, rng: np.random.Generator, psi: dict[str, np.ndarray], end: np.ndarray,
                        max_events: int = 1000) -> list[np.ndarray]:
        """Event times in ``(0, end_i]`` of each individual: ``H(t_next) = H(t) + E``, ``E ~ Exp(1)``, inverted."""
        lam = np.asarray(psi[self.scale]).reshape(-1)
        beta = np.ones_like(lam) if self.hazard == "constant" else np.asarray(psi[self.shape]).reshape(-1)
        cum = np.zeros_like(lam)
        events = np.empty((lam.size, 0))
        for _ in range(max_events):
            cum = cum + rng.exponential(size=lam.size)
            t = lam * cum ** (1.0 / beta)
            events = np.concatenate([events, t[:, None]], 1)
            if (t > end).all():
                break
        return [row[row <= e] for row, e in zip(events, end)]


@dataclass(repr=False)
class LogLik(Outcome):
    """A user log-likelihood: the model's function ``loglik(psi, data)`` returns ``log p(y_ij | ψ_i)`` ``[..., N, T]``
    (saemix's ``modeltype="likelihood"``); in a joint model (``outcome={"r": LogLik()}``) the structural function's
    output ``r`` is that response's log-likelihood.  ``simulate_fn``: optional ``sim(psi, data, rng) -> y [N, T]``
    (numpy; ``psi``: each parameter's values ``[N, 1]``, with occasions ``[N, T]``; ``data``: the design ``loglik``
    receives; ``rng``: a ``numpy.random.Generator``; in a joint model only the response's records are read), which
    ``model.simulate`` and the VPC need (one call per replicate data set, all individuals from one generator: not on
    per-unit streams)."""

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
    individual's last record time)."""
    ops = model.ops
    with ops.seed_context(seed):
        z = model.sample_prior(theta, ops.key(seed), 1)[0]
    mu = model._mu(theta)
    data, out = model.data, model.outcome
    rng = np.random.default_rng(seed)
    if model._iov is not None:  # ψ and f of each observation's occasion ([N, T])
        from . import occasions as _occ

        if isinstance(out, (TimeToEvent, LogLik)):
            raise ModelSpecificationError("simulating time-to-event or user log-likelihood outcomes with occasions "
                                          "(iov=) is not supported")
        _refuse_events_with_iov(model, "simulating the events")
        psi_k = model._psi_by_occasion(mu, z)
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
    table = model.table.copy()
    dv_col = data.columns["dv"]
    table[dv_col] = table[dv_col].astype(float)
    rows = data.obs_rows
    valid = rows >= 0
    table.iloc[rows[valid], table.columns.get_loc(dv_col)] = y[valid]
    if isinstance(out, Joint):  # each time-to-event response: new records (after every other response's draws)
        for name, tte in _event_responses(model):
            table = _replace_event_records(model, table, name, tte, psi, rng)
    return table


def _event_responses(model: NLME) -> list[tuple[str, TimeToEvent]]:
    """The time-to-event responses of a joint model, in response order (none for other models)."""
    out = model.outcome
    if not isinstance(out, Joint):
        return []
    return [(name, o) for name, o in model._resp.spec.outcomes.items() if isinstance(o, TimeToEvent)]


def _events_with_iov(model: NLME) -> list[str]:
    """The time-to-event responses of a joint model whose hazard reads a parameter with inter-occasion variability
    (κ): their first event cannot be drawn by inverting one cumulative hazard per individual (refused)."""
    if model._iov is None:
        return []
    return [name for name, out in _event_responses(model) if set(out.parameters) & set(model._iov.names)]


def _refuse_events_with_iov(model: NLME, what: str) -> None:
    bad = _events_with_iov(model)
    if bad:
        params = [p for p in model.outcome.outcomes[bad[0]].parameters if p in model._iov.names]
        raise ModelSpecificationError(f"response {bad[0]!r}: {what} of a time-to-event response whose hazard has "
                                      f"occasion effects (iov= on {params}) is not supported: the first event's time "
                                      f"is drawn by inverting one cumulative hazard per individual, and with IOV the "
                                      f"hazard changes at each occasion's start (IOV on the other parameters is fine)")


def _tte_records(model: NLME, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A joint model's time-to-event response ``name``: its records ``[N, T]`` and each individual's end of follow-up
    ``[N]`` (its last record's time; -inf without records)."""
    data, resp = model.data, model._resp
    index = np.asarray(model.ops.to_numpy(resp.index))
    mine = data.mask & (index == resp.all_names.index(name))
    return mine, np.where(mine, data.time, -np.inf).max(1)


def _first_events(out: TimeToEvent, psi: dict[str, np.ndarray], end: np.ndarray,
                  exp1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first event ``t = λ E^{1/β}`` (the inverse of ``H(t) = (t/λ)^β`` at ``E ~ Exp(1)``; β = 1 for a constant
    hazard) censored at ``end``: ``(min(t, end), t <= end)``, from ψ ``[..., N]`` and ``exp1`` ``[..., N]``."""
    lam = psi[out.scale]
    beta = np.ones_like(lam) if out.hazard == "constant" else psi[out.shape]
    t = lam * exp1 ** (1.0 / beta)
    event = t <= end
    return np.where(event, t, end), event


def _replace_event_records(model: NLME, table: pd.DataFrame, name: str, out: TimeToEvent,
                           psi: dict[str, np.ndarray], rng: np.random.Generator) -> pd.DataFrame:
    """``table`` with the records of the time-to-event response ``name`` replaced by simulated ones per individual
    (start at 0, the events by inversion of the cumulative hazard, censoring at the individual's last record of the
    response), the other columns copied from its first record of the response (the occasion column, with ``iov=``:
    the one in force at each record's time, from the individual's other records)."""
    data, resp = model.data, model._resp
    mine, end = _tte_records(model, name)
    has = mine.any(1)
    cols = data.columns
    id_col, time_col, dv_col = cols["id"], cols.get("time", "TIME"), cols["dv"]
    events = out.simulate_events(rng, {k: np.asarray(psi[k])[:, :1] for k in out.parameters},  # (no κ: any record's)
                                 np.where(has, end, 0.0))
    ours = table.index[table[resp.column].astype(float) == resp.values[resp.all_names.index(name)]]
    kept = table.drop(index=ours)
    first = table.loc[ours].drop_duplicates(id_col).set_index(id_col)
    occ_col = model._iov.column if model._iov is not None else None
    parts = [kept]
    for i, ident in enumerate(data.ids):
        if not has[i]:
            continue
        times = np.concatenate([[0.0], events[i], [end[i]]])
        dv = np.concatenate([[0.0], np.ones(len(events[i])), [0.0]])
        if len(events[i]) and events[i][-1] == end[i]:
            times, dv = times[:-1], dv[:-1]
        part = pd.DataFrame({c: [first.loc[ident, c]] * len(times) for c in first.columns})
        part.insert(0, id_col, ident)
        part[time_col], part[dv_col] = times, dv
        if occ_col is not None:  # the occasion in force at each record: the latest other record's at or before it
            src = kept[kept[id_col] == ident].sort_values(time_col, kind="stable")
            if len(src):
                at = np.searchsorted(src[time_col].to_numpy(dtype=float), times, side="right") - 1
                part[occ_col] = src[occ_col].to_numpy()[np.maximum(at, 0)]
        parts.append(part[table.columns])
    both = pd.concat(parts, ignore_index=True)
    order = pd.factorize(table[id_col])[1]  # the individuals in the table's order, then time (stable)
    key = pd.Series(pd.Categorical(both[id_col], categories=order, ordered=True).codes, index=both.index)
    both = both.assign(_order=key).sort_values(["_order", time_col], kind="stable").drop(columns="_order")
    return both.reset_index(drop=True)


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


def _refuse_user_simulator_on_streams(out: Outcome, unit_ids: Any) -> None:
    """Refuse a user simulator (a user log-likelihood outcome, or such a response of a joint model) on per-unit
    streams."""
    parts = out.outcomes.values() if isinstance(out, Joint) else (out,)
    if unit_ids is not None and any(isinstance(o, LogLik) for o in parts):
        raise NotImplementedError("a user log-likelihood's simulator sim(psi, data, rng) draws every individual from "
                                  "one numpy generator, not from each individual's stream: the simulations of a fit "
                                  "with rng='per_unit' (e.g. a distributed fit) cannot use it; refit with "
                                  "rng='global' in one process for this VPC, or simulate with model.simulate(theta)")


def simulate_observations(model: NLME, theta: dict[str, Any], num_sims: int, seed: int = 0, *, unit_ids: Any = None,
                          ops: Any = None) -> np.ndarray:
    """``num_sims`` replicates of the observations ``[K, N, T]`` at ``theta`` (random effects drawn from their prior,
    all replicates in one vectorised pass), for the visual predictive checks of discrete and count outcomes.  The
    padding and censored records hold NaN, and so do a joint model's time-to-event records (their first events:
    :func:`simulate_joint`).

    ``unit_ids`` (``[N]`` distinct ints): individual i's replicates from its stream ``(seed, unit_ids[i])`` only
    (:func:`_unit_stream_draws`; the observations by inversion of their CDF, :meth:`Outcome.sample_at`), whatever the
    other individuals or the process holding it (``ops``: a distributed fit's shim, whose processes agree on the
    width of the uniforms).  Not for a user simulator (refused)."""
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
    without the time-to-event response.  With occasions (``iov=``) the hazard's parameters must have no κ (refused
    otherwise: the hazard would change at each occasion's start)."""
    if not isinstance(model.outcome, Joint):
        raise ModelSpecificationError("simulate_joint is for joint models (error={...} beside outcome={...})")
    return _replicates(model, theta, num_sims, seed, unit_ids, ops)


def _replicates(model: NLME, theta: dict[str, Any], num_sims: int, seed: int, unit_ids: Any,
                ops: Any) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """:func:`simulate_joint` for any outcome model (no first events but a joint model's)."""
    dist = model.ops if ops is None else ops
    ops, out, data = model.ops, model.outcome, model.data
    _refuse_user_simulator_on_streams(out, unit_ids)
    events = _event_responses(model)
    _refuse_events_with_iov(model, "the Kaplan-Meier VPC (simulated first events)")
    shape = (int(num_sims),) + data.dv.shape
    if unit_ids is not None:
        width = max_over_processes(dist, shape[-1])
        z, u = _unit_stream_draws(model, theta, num_sims, seed, unit_ids, dist, (width + len(events),))
    else:
        z = model.sample_prior(theta, ops.key(seed), int(num_sims))  # [K, N, d]
        rng = np.random.default_rng(seed)
    psi_b, psi = _simulated_psi(model, theta, z, shape)
    first: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if isinstance(out, LogLik):  # one numpy stream (refused above on per-unit streams)
        if out.simulate_fn is None:
            raise ModelSpecificationError("a user log-likelihood has no simulator: give outcome=nlme.outcomes."
                                          "LogLik(simulate_fn=sim) with sim(psi, data, rng) -> y [N, T]")
        y = np.stack([np.asarray(out.simulate_fn({k: v[s] for k, v in psi.items()}, model.design, rng), dtype=float)
                      for s in range(int(num_sims))])
    elif isinstance(out, Joint):
        f = _simulated_prediction(model, psi_b, shape)
        y = _joint_replicates(model, theta, f, psi, rng if unit_ids is None else None,
                              u[..., :shape[-1]] if unit_ids is not None else None)
        for j, (name, tte) in enumerate(events):
            end = _tte_records(model, name)[1]
            exp1 = -np.log(u[..., width + j]) if unit_ids is not None else rng.exponential(size=shape[:2])
            first[name] = _first_events(tte, {k: psi[k][..., 0] for k in tte.parameters}, end, exp1)  # no κ
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
    replicate; global stream only), NaN at time-to-event records (:func:`simulate_joint`).  ``rng``: one numpy
    stream; else ``u`` (uniforms ``[K, N, T]`` of the individuals' streams): ``ε = Φ⁻¹(u)`` and the outcomes by
    inversion (:meth:`Outcome.sample_at`), each record being one response's."""
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
        if isinstance(out, LogLik):  # global stream only (_refuse_user_simulator_on_streams)
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
    the first event drawn by inversion of the cumulative hazard, ``t = λ E^{1/β}`` with ``E ~ Exp(1)``.
    ``unit_ids`` (``ops``): individual i's random effects and ``E = −log U`` from its stream ``(seed, unit_ids[i])``
    (as :func:`simulate_observations`).  A joint model: ``response`` names its time-to-event response, whose
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
    if model._iov is not None:
        raise ModelSpecificationError("the Kaplan-Meier VPC of time-to-event data with occasions (iov=) is not "
                                      "supported: the first event's time is drawn by inverting one cumulative hazard "
                                      "per individual, and with IOV the hazard changes at each occasion's start")
    if unit_ids is not None:
        z, u = _unit_stream_draws(model, theta, num_sims, seed, unit_ids, ops, ())
        exp1 = -np.log(u)  # Exp(1) by inversion
    else:
        z = model.sample_prior(theta, model.ops.key(seed), int(num_sims))
        exp1 = None
    psi_b = model._psi(model._mu(theta), z)
    psi = {k: np.broadcast_to(model.ops.to_numpy(v), (int(num_sims), model.num_units, 1))[..., 0]
           for k, v in psi_b.items()}
    lam = psi[out.scale]
    beta = np.ones_like(lam) if out.hazard == "constant" else psi[out.shape]
    if exp1 is None:
        exp1 = np.random.default_rng(seed).exponential(size=lam.shape)
    t = lam * exp1 ** (1.0 / beta)
    event = t <= end
    return np.where(event, t, end), event


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


def _simulate_tte(model: NLME, out: TimeToEvent, psi: dict[str, np.ndarray], rng: np.random.Generator) -> pd.DataFrame:
    data = model.data
    end = np.where(data.mask, data.time, -np.inf).max(1)
    events = out.simulate_events(rng, psi, end)
    cols = data.columns
    id_col, time_col, dv_col = cols["id"], cols.get("time", "TIME"), cols["dv"]
    first = model.table.drop_duplicates(id_col).set_index(id_col)
    keep = [c for c in first.columns if c not in (time_col, dv_col)]
    rows = []
    for i, ident in enumerate(data.ids):
        times = np.concatenate([[0.0], events[i], [end[i]]])
        dv = np.concatenate([[0.0], np.ones(len(events[i])), [0.0]])
        if len(events[i]) and events[i][-1] == end[i]:
            times, dv = times[:-1], dv[:-1]
        part = pd.DataFrame({id_col: ident, time_col: times, dv_col: dv})
        for c in keep:
            part[c] = first.loc[ident, c]
        rows.append(part)
    return pd.concat(rows, ignore_index=True)


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
           "first_event_times", "kaplan_meier", "make_outcome", "simulate_joint", "simulate_observations"]
