"""Structural model library: closed-form PK/PD predictions, backend-neutral.

A structural model maps individual parameters to predictions at the observation times:
``f(psi, data) -> pred [..., N, T]`` where ``psi`` is a dict of ``[..., N, 1]`` arrays (leading
chain dims allowed) and ``data`` a :class:`Design`:

* ``data.xp``: the array namespace (torch or jax.numpy);
* ``data.time [N, T]``: observation times (padding repeats the last one; without a time column, the x-variable);
* ``data.x [N, T]``: the x-variable (the ``x=`` column, else the time);
* ``data.regressors[name] [N, T]``: per-observation columns (``regressors=`` and ``x=``);
* ``data.covariates[name] [N]``: numeric individual covariates of the model;
* ``data.dose_time / dose_amt / dose_rate / dose_cmt [N, D]``: doses (padding: amount 0), additional doses
  (``ADDL``) already expanded;
* ``data.dose_ss / dose_ii [N, D]``: steady-state code (0, 1, 2) and interval of each dose (None: no ``SS``);
* ``data.dose_seg [N, D]``, ``data.obs_seg [N, T]``: period of each dose and observation (a reset, ``EVID`` 3/4 or
  ``SS = 1``, starts a new period; a dose acts only in its own period); None: one period.
* ``data.obs_rank [N, T]``, ``data.dose_rank [N, D]``: the order of the records at equal times (NONMEM's record
  order): a dose at an observation's time acts on it iff its rank is lower (an observation listed before a
  same-time dose is pre-dose); None: every dose at an observation's time acts on it.
* ``data.dv [N, T]``: the observations (for a user log-likelihood of a non-Gaussian outcome,
  :mod:`latentfit.models.nlme.outcomes`).

Library models use only ``xp`` operations, so the same code runs on torch and JAX; user functions may
do the same or use torch directly.

PK models are linear in the dose, so multiple doses are superposed:
``C(t) = Σ_d AMT_d · c(t − t_d)`` over the doses given before ``t`` (``k = CL/V`` throughout):

* one compartment, IV bolus:        ``c(τ) = exp(−kτ) / V``;
* one compartment, infusion (rate R = AMT/Tinf): ``C = R/(kV) (1 − e^{−k min(τ,Tinf)}) e^{−k(τ − min(τ,Tinf))}``;
* one compartment, first-order absorption (optional lag ``Tlag``):
  ``c(τ) = ka / (V (ka − k)) (e^{−kτ'} − e^{−kaτ'})``, ``τ' = τ − Tlag``;
* two compartments (CL, V1, Q, V2), IV bolus, infusion and first-order absorption (macro-constants α, β); an
  infusion at rate R of duration D adds ``R c_j/λ_j (1 − e^{−λ_j min(τ,D)}) e^{−λ_j(τ − min(τ,D))}`` per exponential
  ``c_j e^{−λ_j τ}`` of the unit bolus;
* oral models route a dose with ``CMT = 2`` to the central compartment (an IV bolus, or an infusion with
  ``RATE > 0``), as NONMEM's ADVAN2/ADVAN4 (``CMT = 1`` is the depot); a depot dose with ``RATE > 0`` is a
  zero-order input into the depot (the infusion sums above applied to the absorption model's exponentials);
* steady state (``SS`` 1 or 2, interval ``τ = II``): the dose is the last of an infinite train, so each
  exponential ``e^{−λs}`` of the response becomes ``Σ_{j≥0} e^{−λ(s + jτ)} = e^{−λs₀}/(1 − e^{−λτ})``
  (``s₀ = s + mτ``, m the number of train doses still in their lag time; ``s₀ = s`` without lag); an
  infusion of duration ``D`` at steady state adds the ``n = ⌈(D − s)/τ⌉⁺`` infusions still running,
  ``R/(kV) [n − e^{−ks}(1 − e^{−knτ})/(1 − e^{−kτ})]``, to the ended ones,
  ``R/(kV) (e^{−k(s+nτ−D)} − e^{−k(s+nτ)})/(1 − e^{−kτ})``.  ``SS = 1`` also resets (a new period).
* PD: ``Emax``: ``E0 + Emax x/(EC50 + x)``, sigmoid: ``E0 + Emax x^γ/(EC50^γ + x^γ)`` with ``x`` the
  data's x-variable (``NLME(..., x="dose")``) or a named regressor column (``emax(x="CONC")``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from latentfit.inference.ops import ops_for


@dataclass
class Design:
    """Backend arrays of the data that a structural model sees (see the module docstring)."""

    xp: Any
    time: Any  # [N, T]
    dose_time: Any  # [N, D]
    dose_amt: Any  # [N, D]
    dose_rate: Any  # [N, D]
    regressors: dict[str, Any] = field(default_factory=dict)  # [N, T]
    covariates: dict[str, Any] = field(default_factory=dict)  # [N]
    #: static: every dose is given before every observation (no masking of τ < 0 needed)
    doses_precede_obs: bool = False
    dose_cmt: Any = None  # [N, D] 1-based dose compartments (CMT), for ODE models
    #: the backend shim of the arrays (NLME passes its own; by default the one of ``xp``, looked up when needed)
    ops: Any = None
    #: [N, T] the x-variable (``x=`` column of the data); None: the time
    x: Any = None
    #: [N, D] steady-state codes (0, 1, 2) and intervals ``II`` of the doses; None: no steady-state dose (static)
    dose_ss: Any = None
    dose_ii: Any = None
    #: [N, D] / [N, T] periods of the doses and observations; None: one period (static)
    dose_seg: Any = None
    obs_seg: Any = None
    #: static: oral models route doses with ``CMT = 2`` to the central compartment
    central_cmt: bool = False
    #: static: some dose is an infusion (oral models then give ``RATE > 0`` depot doses as zero-order input)
    has_infusion: bool = False
    #: [N, T] the observations (DV; padding 0): what a user log-likelihood ``loglik(psi, data)`` scores
    dv: Any = None
    #: [N, K-1] start time and period of occasions 2..K (first record; padding: the last time, period -1) and
    #: [N, K-1] 1.0 where the occasion exists: set only when the drug of an occasion carries into the next, for
    #: the piecewise predictions of :mod:`~latentfit.models.nlme.piecewise` (parameters ``[..., K, N, 1]``)
    occ_start: Any = None
    occ_seg: Any = None
    occ_valid: Any = None
    #: time-varying covariates as step functions of time, for ODE kinetics (:attr:`Structural.covariates`): name ->
    #: ``(time, period, value)`` ``[N, R]`` each, the individual's records with a value by period and time
    covariate_steps: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)
    #: ``(τ, amounts)`` already computed for these units (views of a larger design's): not computed again
    time_after_dose_of: tuple[Any, Any] | None = field(default=None, repr=False)
    #: [N, T] / [N, D] ranks of the observations and doses among an individual's records: a dose at an
    #: observation's time acts on it iff ``dose_rank < obs_rank`` (NONMEM's record order); None: it always acts
    obs_rank: Any = None
    dose_rank: Any = None

    def __post_init__(self) -> None:
        if self.x is None:
            self.x = self.time
        if (self.dose_seg is None) != (self.obs_seg is None):
            raise ValueError("Design: dose_seg and obs_seg go together (both None for one period)")
        if (self.obs_rank is None) != (self.dose_rank is None):
            raise ValueError("Design: obs_rank and dose_rank go together (both None: every dose at an observation's "
                             "time acts on it)")
        if (self.dose_ss is None) != (self.dose_ii is None):
            raise ValueError("Design: dose_ss and dose_ii go together (both None without steady state)")
        # τ = t − t_d [N, T, D] and the amounts [N, 1, D], computed once
        if self.time_after_dose_of is not None:
            self._tau, self._amt = self.time_after_dose_of
        else:
            self._tau = self.time[..., :, None] - self.dose_time[..., None, :]
            self._amt = self.dose_amt[..., None, :]

    def take(self, ops: Any, units: Any) -> Design:
        if units is None:
            return self
        t = lambda a: ops.take(a, units, 0)  # noqa: E731
        time = t(self.time)
        opt = lambda a: None if a is None else t(a)  # noqa: E731
        return Design(self.xp, time, t(self.dose_time), t(self.dose_amt), t(self.dose_rate),
                      {k: t(v) for k, v in self.regressors.items()}, {k: t(v) for k, v in self.covariates.items()},
                      self.doses_precede_obs, opt(self.dose_cmt), self.ops,
                      time if self.x is self.time else t(self.x), opt(self.dose_ss), opt(self.dose_ii),
                      opt(self.dose_seg), opt(self.obs_seg), self.central_cmt, self.has_infusion, opt(self.dv),
                      opt(self.occ_start), opt(self.occ_seg), opt(self.occ_valid),
                      {k: tuple(t(a) for a in v) for k, v in self.covariate_steps.items()},
                      # a block of units (a slice): views of this design's τ, no new [n, T, D] array
                      (t(self._tau), t(self._amt)) if isinstance(units, slice) else None,
                      obs_rank=opt(self.obs_rank), dose_rank=opt(self.dose_rank))

    def backend_ops(self) -> Any:
        """The backend shim of the arrays: ``ops`` if given, else the one of ``xp``."""
        return self.ops if self.ops is not None else ops_for(self.xp)

    def time_after_dose(self) -> tuple[Any, Any]:
        """``τ = t − t_d`` ``[N, T, D]`` and the doses' amounts ``[N, 1, D]``."""
        return self._tau, self._amt

    @property
    def single_dose(self) -> bool:
        """One dose record per individual (static): the library drops the dose axis (see :func:`_dose_terms`)."""
        return self.dose_time.shape[-1] == 1

    def units_minor(self, transpose: Callable[[Any], Any]) -> Design | None:
        """This design laid out with the units on the minor axis, ``[T, N]`` (``transpose`` swaps an array's first two
        axes: ``[N, T] -> [T, N]``, ``[N, T, 1] -> [T, N, 1]``), for the models element-wise in it
        (:attr:`Structural.elementwise`): their predictions are then ``[..., T, N]`` from parameters ``[..., 1, N]``.
        None where that layout does not apply (several doses per individual, periods, occasions)."""
        if (not self.single_dose or self.obs_seg is not None or self.occ_start is not None
                or self.obs_rank is not None):
            return None
        t = lambda a: None if a is None else transpose(a)  # noqa: E731
        time = t(self.time)
        tau, amt = self.time_after_dose()  # [N, T, 1], [N, 1, 1]
        return _UnitsMinorDesign(self.xp, time, t(self.dose_time), t(self.dose_amt), t(self.dose_rate),
                                 {k: t(v) for k, v in self.regressors.items()}, dict(self.covariates),
                                 self.doses_precede_obs, t(self.dose_cmt), self.ops,
                                 time if self.x is self.time else t(self.x), t(self.dose_ss), t(self.dose_ii),
                                 None, None, self.central_cmt, self.has_infusion, t(self.dv),
                                 time_after_dose_of=(transpose(tau), transpose(amt)))


@dataclass
class _UnitsMinorDesign(Design):
    """A single-dose :class:`Design` laid out ``[T, N]`` (:meth:`Design.units_minor`): the dose arrays ``[1, N]``."""

    @property
    def single_dose(self) -> bool:
        return True


class SolverWarning(UserWarning):
    """A structural model's numerical solution looks unreliable: an ODE's fixed RK4 step unstable or too coarse at
    the initial values, or solver tolerances finer than the arrays' floating-point precision."""


@dataclass
class Structural:
    """A structural model: its parameter names and ``fn(psi, data) -> pred``."""

    name: str
    parameters: tuple[str, ...]
    fn: Callable[[dict[str, Any], Design], Any]
    #: default regressor columns needed from the data
    regressors: tuple[str, ...] = ()
    #: optional ``bind(design) -> fn``: data-dependent set-up done once, eagerly, when a model gets its data
    #: (e.g. an ODE model's event table and step counts); the returned ``fn`` serves that data and its subsets
    bind: Callable[[Design], Callable[[dict[str, Any], Design], Any]] | None = None
    #: predictions are driven by doses (PK): the data must have dose records and non-negative times
    uses_doses: bool = False
    #: how occasions with their own parameters (IOV) chain when drug carries from one occasion into the next:
    #: a linear system of :data:`~latentfit.models.nlme.piecewise.SYSTEMS` (closed form), ``"ode"`` (the ODE
    #: integrates each occasion with its parameters), ``"stateless"`` (no state: each occasion evaluated alone is
    #: exact), None (unknown: refused when drug carries over)
    carry: str | None = None
    #: ``fn`` is element-wise in the parameters ``[..., N, 1]`` and the design's arrays of a single dose per individual
    #: (the library's closed forms): it gives ``[..., T, N]`` predictions from a design laid out ``[T, N]``
    #: (:meth:`Design.units_minor`) and parameters ``[..., 1, N]``, which SAEM's compiled sweeps use on JAX
    elementwise: bool = False
    #: optional ``check(psi, design) -> (i, j, message) | None``: a self-check of the numerical solution at the
    #: individual parameters ``psi [N, 1]`` (NLME runs it at the initial values when it gets its data and warns with
    #: :class:`SolverWarning`, naming individual ``i`` and observation ``j``), e.g. an ODE's RK4 step halving
    #: (``i``, ``j`` None: a message about the model as a whole)
    check: Callable[[dict[str, Any], Design], tuple[int | None, int | None, str] | None] | None = None
    #: time-varying covariate columns the model reads between the records (ODE kinetics): the data keep them as step
    #: functions of time (:attr:`Design.covariate_steps`, last value carried forward over every record)
    covariates: tuple[str, ...] = ()

    def __call__(self, psi: dict[str, Any], data: Design) -> Any:
        return self.fn(psi, data)

    def bound(self, design: Design) -> Callable[[dict[str, Any], Design], Any]:
        """``fn`` prepared for ``design`` (and any subset of its units)."""
        return self.fn if self.bind is None else self.bind(design)


def _dose_terms(d: Design) -> tuple[Any, Any, Any]:
    """``(τ, amounts, rates)``: ``[N, T, D]``, ``[N, 1, D]``, ``[N, 1, D]``, or with a single dose per
    individual ``[N, T]``, ``[N, 1]``, ``[N, 1]``.  Dropping a trailing dose axis of size 1 matters on XLA's
    CPU backend, whose reductions over ``[N, T, 1]`` layouts run ~10x slower than over ``[N, T]``."""
    tau, amt = d.time_after_dose()
    if d.single_dose:
        return tau[..., 0], d.dose_amt, d.dose_rate
    return tau, amt, d.dose_rate[..., None, :]


def _per_dose(d: Design, a: Any) -> Any:
    """A dose array ``[N, D]`` shaped like the amounts of :func:`_dose_terms` (``[N, 1, D]``, or ``[N, 1]``)."""
    return a if d.single_dose else a[..., None, :]


def _ss_terms(d: Design) -> tuple[Any, Any] | None:
    """``(is_ss, II)`` of the doses shaped as :func:`_dose_terms`; None without steady-state doses."""
    if d.dose_ss is None:
        return None
    return _per_dose(d, d.dose_ss > 0), _per_dose(d, d.dose_ii)


def _decay(xp: Any, lam: Any, t: Any, ss: tuple[Any, Any] | None) -> Any:
    """``e^{−λt}``; for a steady-state dose the train's sum ``Σ_{j≥0, t+jτ≥0} e^{−λ(t+jτ)} = e^{−λt₀}/(1 − e^{−λτ})``
    with ``t₀ = t + ⌈−t/τ⌉⁺ τ`` (``t < 0`` only inside a lag time)."""
    e = xp.exp(-lam * t)
    if ss is None:
        return e
    is_ss, ii = ss
    tau = xp.where(is_ss, ii, 1.0)
    t0 = t + xp.where(t < 0, xp.ceil(-t / tau), 0.0) * tau
    return xp.where(is_ss, xp.exp(-lam * t0) / -xp.expm1(-lam * tau), e)


def _p(psi: dict[str, Any], name: str, d: Design) -> Any:
    """``[..., N, 1]`` -> ``[..., N, 1, 1]`` (broadcasts against ``[N, T, D]``); unchanged for one dose."""
    return psi[name] if d.single_dose else psi[name][..., None]


def _superpose(xp: Any, contrib: Any, valid: Any, d: Design) -> Any:
    if d.single_dose:
        return contrib if valid is None else xp.where(valid, contrib, 0.0)
    if valid is None:
        return xp.sum(contrib, -1)
    return xp.sum(xp.where(valid, contrib, 0.0), -1)


def given_before(d: Design, tau: Any) -> Any:
    """The doses given by the observations' times, ``τ > 0``, or ``τ = 0`` for a dose listed before the observation
    (NONMEM's record order, ``dose_rank < obs_rank``; without ranks every dose at the observation's time): shaped as
    ``τ`` (``[..., N, T, D]``, or ``[..., N, T]`` for a single dose)."""
    if d.obs_rank is None:
        return tau >= 0
    before = d.dose_rank[..., None, :] < d.obs_rank[..., :, None]
    if d.single_dose:
        before = before[..., 0]
    return (tau > 0) | ((tau == 0) & before)


def _time_since(d: Design, tau: Any, amt: Any, lag: Any = None) -> tuple[Any, Any]:
    """Times since the doses (less the lag), 0 where a dose does not act, and the validity mask (None: all
    valid).  A dose acts after its time (its lag time for an ordinary dose; a steady-state dose's train acts
    during the lag too) on the observations of its own period; at its time, on those listed after it
    (:func:`given_before`)."""
    xp = d.xp
    if lag is None and d.doses_precede_obs and d.obs_seg is None and d.obs_rank is None:
        return tau, None
    valid = given_before(d, tau) & (amt > 0)
    if d.obs_seg is not None:
        same = d.obs_seg[..., :, None] == d.dose_seg[..., None, :]
        valid = valid & (same[..., 0] if d.single_dose else same)
    if lag is not None:
        tau = tau - lag
        ss = _ss_terms(d)
        valid = valid & ((tau >= 0) if ss is None else ((tau >= 0) | ss[0]))
    return xp.where(valid, tau, 0.0), valid


def _central_iv(d: Design, amt: Any, rate: Any, terms: list[tuple[Any, Any]], t: Any) -> Any:
    """Input into the central compartment of a linear model whose unit-bolus concentration is
    ``Σ_j c_j e^{−λ_j s}`` (``terms = [(c_j, λ_j)]``): a bolus, or an infusion at ``rate`` for ``AMT/rate``, each
    exponential giving ``R c_j/λ_j (1 − e^{−λ_j min(s, D)}) e^{−λ_j (s − min(s, D))}`` (steady state by the train
    sums of the module docstring)."""
    xp = d.xp
    ss = _ss_terms(d)
    is_inf = rate > 0
    safe_rate = xp.where(is_inf, rate, 1.0)
    t_inf = xp.where(is_inf, amt / safe_rate, 0.0)
    t_on = xp.minimum(t, t_inf)
    if ss is not None:
        is_ss, ii = ss
        tau = xp.where(is_ss, ii, 1.0)
        t_ss = t + xp.where(t < 0, xp.ceil(-t / tau), 0.0) * tau  # inside a lag time: the train's started doses
        n_on = xp.where(t_ss < t_inf, xp.ceil((t_inf - t_ss) / tau), 0.0)
    bolus, infusion = 0.0, 0.0
    for c, lam in terms:
        bolus = bolus + c * _decay(xp, lam, t, ss)
        inf = (-xp.expm1(-lam * t_on)) * xp.exp(-lam * (t - t_on))
        if ss is not None:
            geo = -xp.expm1(-lam * tau)
            on = n_on - xp.exp(-lam * t_ss) * (-xp.expm1(-lam * tau * n_on)) / geo
            off = (xp.exp(-lam * (t_ss + n_on * tau - t_inf)) - xp.exp(-lam * (t_ss + n_on * tau))) / geo
            inf = xp.where(is_ss, on + off, inf)
        infusion = infusion + c / lam * inf
    return xp.where(is_inf, safe_rate * infusion, amt * bolus)


def _bateman(xp: Any, ka: Any, k: Any, t: Any, ss: tuple[Any, Any] | None = None) -> Any:
    """``ka/(ka − k) (e^{−kt} − e^{−ka t})`` (each exponential summed over the steady-state train, see
    :func:`_decay`); ka − k is kept away from 0 (relative 1e-7), where the difference of exponentials still
    gives the limit ``ka·t·e^{−kt}`` to about 1e-9."""
    diff = ka - k
    tol = 1e-7 * k
    safe = xp.where(xp.abs(diff) < tol, tol, diff)
    return ka / safe * (_decay(xp, k, t, ss) - _decay(xp, k + safe, t, ss))


def _route(d: Design, oral: Any, central: Any) -> Any:
    """Oral response, or the central one for doses with ``CMT = 2`` (when the data have such doses)."""
    if not d.central_cmt or d.dose_cmt is None:
        return oral
    return d.xp.where(_per_dose(d, d.dose_cmt) == 2, central, oral)


# ----- one compartment ----------------------------------------------------------------------------
def _bolus1(psi: dict[str, Any], d: Design) -> Any:
    xp = d.xp
    tau, amt, _ = _dose_terms(d)
    v, cl = _p(psi, "V", d), _p(psi, "CL", d)
    t, valid = _time_since(d, tau, amt)
    return _superpose(xp, amt / v * _decay(xp, cl / v, t, _ss_terms(d)), valid, d)


def _infusion1(psi: dict[str, Any], d: Design) -> Any:
    xp = d.xp
    tau, amt, rate = _dose_terms(d)
    v, cl = _p(psi, "V", d), _p(psi, "CL", d)
    t, valid = _time_since(d, tau, amt)
    return _superpose(xp, _central_iv(d, amt, rate, [(1.0 / v, cl / v)], t), valid, d)


def _oral1(psi: dict[str, Any], d: Design, lag: bool = False) -> Any:
    xp = d.xp
    tau, amt, rate = _dose_terms(d)
    ka, v, cl = _p(psi, "ka", d), _p(psi, "V", d), _p(psi, "CL", d)
    t, valid = _time_since(d, tau, amt, _p(psi, "Tlag", d) if lag else None)
    k = cl / v
    if d.has_infusion:  # zero-order input into the depot: the infusion sums of the Bateman exponentials
        diff = ka - k
        tol = 1e-7 * k
        safe = xp.where(xp.abs(diff) < tol, tol, diff)
        oral = _central_iv(d, amt, rate, [(ka / (v * safe), k), (-ka / (v * safe), k + safe)], t)
    else:
        oral = amt / v * _bateman(xp, ka, k, t, _ss_terms(d))
    if d.central_cmt:
        t_iv, valid_iv = _time_since(d, tau, amt) if lag else (t, valid)
        central = _central_iv(d, amt, rate, [(1.0 / v, k)], t_iv)
        if lag:
            oral, valid = _route(d, oral, central), _route(d, valid, valid_iv)
        else:
            oral = _route(d, oral, central)
    return _superpose(xp, oral, valid, d)


# ----- two compartments ---------------------------------------------------------------------------
def _macro(xp: Any, cl: Any, v1: Any, q: Any, v2: Any) -> tuple[Any, Any, Any]:
    k10, k12, k21 = cl / v1, q / v1, q / v2
    s = k10 + k12 + k21
    disc = s * s - 4 * k10 * k21
    root = xp.sqrt(xp.where(disc > 0, disc, 0.0))
    return 0.5 * (s + root), 0.5 * (s - root), k21


def _bolus2(psi: dict[str, Any], d: Design) -> Any:
    xp = d.xp
    tau, amt, _ = _dose_terms(d)
    v1 = _p(psi, "V1", d)
    alpha, beta, k21 = _macro(xp, _p(psi, "CL", d), v1, _p(psi, "Q", d), _p(psi, "V2", d))
    t, valid = _time_since(d, tau, amt)
    return _superpose(xp, amt / v1 * _two_cmt_unit(xp, alpha, beta, k21, t, _ss_terms(d)), valid, d)


def _two_cmt_unit(xp: Any, alpha: Any, beta: Any, k21: Any, t: Any, ss: Any) -> Any:
    """Central concentration × V1 after a unit IV bolus, two compartments (steady-state train sums)."""
    return ((alpha - k21) * _decay(xp, alpha, t, ss) + (k21 - beta) * _decay(xp, beta, t, ss)) / (alpha - beta)


def _two_cmt_terms(alpha: Any, beta: Any, k21: Any, v1: Any) -> list[tuple[Any, Any]]:
    """``[(c_j, λ_j)]`` of the two-compartment unit-bolus concentration."""
    return [((alpha - k21) / ((alpha - beta) * v1), alpha), ((k21 - beta) / ((alpha - beta) * v1), beta)]


def _infusion2(psi: dict[str, Any], d: Design) -> Any:
    xp = d.xp
    tau, amt, rate = _dose_terms(d)
    v1 = _p(psi, "V1", d)
    alpha, beta, k21 = _macro(xp, _p(psi, "CL", d), v1, _p(psi, "Q", d), _p(psi, "V2", d))
    t, valid = _time_since(d, tau, amt)
    return _superpose(xp, _central_iv(d, amt, rate, _two_cmt_terms(alpha, beta, k21, v1), t), valid, d)


def _oral2(psi: dict[str, Any], d: Design) -> Any:
    xp = d.xp
    tau, amt, rate = _dose_terms(d)
    ka, v1 = _p(psi, "ka", d), _p(psi, "V1", d)
    alpha, beta, k21 = _macro(xp, _p(psi, "CL", d), v1, _p(psi, "Q", d), _p(psi, "V2", d))
    t, valid = _time_since(d, tau, amt)
    ss = _ss_terms(d)
    coef = [((k21 - alpha) / ((ka - alpha) * (beta - alpha)), alpha),
            ((k21 - beta) / ((ka - beta) * (alpha - beta)), beta), ((k21 - ka) / ((alpha - ka) * (beta - ka)), ka)]
    if d.has_infusion:  # zero-order input into the depot
        oral = _central_iv(d, amt, rate, [(ka / v1 * c, lam) for c, lam in coef], t)
    else:
        oral = amt * ka / v1 * sum(c * _decay(xp, lam, t, ss) for c, lam in coef)
    if not d.central_cmt:
        return _superpose(xp, oral, valid, d)
    central = _central_iv(d, amt, rate, _two_cmt_terms(alpha, beta, k21, v1), t)
    return _superpose(xp, _route(d, oral, central), valid, d)


# ----- public constructors ------------------------------------------------------------------------
def one_compartment_bolus() -> Structural:
    """One compartment, IV bolus; parameters ``V, CL``."""
    return Structural("one_compartment_bolus", ("V", "CL"), _bolus1, uses_doses=True, carry="one_compartment_bolus",
                      elementwise=True)


def one_compartment_infusion() -> Structural:
    """One compartment, zero-order infusion (``RATE`` column; rate 0 = bolus); parameters ``V, CL``."""
    return Structural("one_compartment_infusion", ("V", "CL"), _infusion1, uses_doses=True,
                      carry="one_compartment_infusion", elementwise=True)


def one_compartment_oral(lag: bool = False) -> Structural:
    """One compartment, first-order absorption; parameters ``ka, V, CL`` (+ ``Tlag`` with ``lag=True``)."""
    if lag:
        return Structural("one_compartment_oral_lag", ("Tlag", "ka", "V", "CL"), lambda p, d: _oral1(p, d, True),
                          uses_doses=True, elementwise=True)
    return Structural("one_compartment_oral", ("ka", "V", "CL"), _oral1, uses_doses=True, carry="one_compartment_oral",
                      elementwise=True)


def two_compartment_bolus() -> Structural:
    """Two compartments, IV bolus; parameters ``CL, V1, Q, V2``."""
    return Structural("two_compartment_bolus", ("CL", "V1", "Q", "V2"), _bolus2, uses_doses=True,
                      carry="two_compartment_bolus", elementwise=True)


def two_compartment_infusion() -> Structural:
    """Two compartments, zero-order infusion (``RATE``; rate 0 = bolus); parameters ``CL, V1, Q, V2``."""
    return Structural("two_compartment_infusion", ("CL", "V1", "Q", "V2"), _infusion2, uses_doses=True,
                      carry="two_compartment_infusion", elementwise=True)


def two_compartment_oral() -> Structural:
    """Two compartments, first-order absorption; parameters ``ka, CL, V1, Q, V2``."""
    return Structural("two_compartment_oral", ("ka", "CL", "V1", "Q", "V2"), _oral2, uses_doses=True,
                      carry="two_compartment_oral", elementwise=True)


def _regressor(d: Design, x: str | None) -> Any:
    """The regressor column ``x``, or the data's x-variable when ``x`` is None."""
    return d.x if x is None else d.regressors[x]


def emax(x: str | None = None) -> Structural:
    """``E0 + Emax·x/(EC50 + x)``; ``x``: a regressor column name, or None for the data's x-variable
    (``NLME("emax", ..., x="dose")``)."""

    def fn(psi: dict[str, Any], d: Design) -> Any:
        c = _regressor(d, x)
        return psi["E0"] + psi["Emax"] * c / (psi["EC50"] + c)

    return Structural("emax", ("E0", "Emax", "EC50"), fn, regressors=() if x is None else (x,), carry="stateless",
                      elementwise=True)


def sigmoid_emax(x: str | None = None) -> Structural:
    """``E0 + Emax·x^γ/(EC50^γ + x^γ)`` (Hill coefficient ``gamma``); ``x`` as in :func:`emax`."""

    def fn(psi: dict[str, Any], d: Design) -> Any:
        xp = d.xp
        c = _regressor(d, x)
        g = psi["gamma"]
        cg = xp.exp(g * xp.log(xp.where(c > 0, c, 1.0))) * (c > 0)
        return psi["E0"] + psi["Emax"] * cg / (xp.exp(g * xp.log(psi["EC50"])) + cg)

    return Structural("sigmoid_emax", ("E0", "Emax", "EC50", "gamma"), fn, regressors=() if x is None else (x,),
                      carry="stateless", elementwise=True)


def _oral_effect_imax() -> Structural:
    """The joint PK/PD model of :mod:`~latentfit.models.nlme.responses` (two responses: ``conc``, ``effect``)."""
    from .responses import oral_effect_imax

    return oral_effect_imax()


LIBRARY: dict[str, Callable[[], Structural]] = {
    "one_compartment_bolus": one_compartment_bolus,
    "one_compartment_infusion": one_compartment_infusion,
    "one_compartment_oral": one_compartment_oral,
    "one_compartment_oral_lag": lambda: one_compartment_oral(lag=True),
    "two_compartment_bolus": two_compartment_bolus,
    "two_compartment_infusion": two_compartment_infusion,
    "two_compartment_oral": two_compartment_oral,
    "emax": emax,
    "sigmoid_emax": sigmoid_emax,
    "oral_effect_imax": _oral_effect_imax,
}


def resolve(structural: Any, parameter_names: list[str]) -> Structural:
    """A :class:`Structural` from a library name, a Structural, or a user function ``f(psi, data)``."""
    from latentfit.inference.model import ModelSpecificationError

    if isinstance(structural, Structural):
        return structural
    if isinstance(structural, str):
        if structural not in LIBRARY:
            raise ModelSpecificationError(f"unknown structural model {structural!r}; the library has "
                                          f"{sorted(LIBRARY)} (or pass a function f(psi, data) -> pred)")
        return LIBRARY[structural]()
    if callable(structural):
        name = getattr(structural, "__name__", "user")
        return Structural(name, tuple(parameter_names), structural)
    raise ModelSpecificationError(f"structural must be a library name, a Structural or a function f(psi, data), "
                                  f"got {type(structural).__name__}")


__all__ = ["LIBRARY", "Design", "SolverWarning", "Structural", "emax", "one_compartment_bolus",
           "one_compartment_infusion", "one_compartment_oral", "resolve", "sigmoid_emax", "two_compartment_bolus",
           "two_compartment_infusion", "two_compartment_oral"]
