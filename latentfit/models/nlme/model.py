"""Nonlinear mixed-effects models (saemix / Monolix style) as a :class:`LatentModel`.

    y_ij = f(t_ij, ψ_i) + g(f, θ) ε_ij,   ε_ij ~ N(0, 1),
    φ_i = u(ψ_i) = C_i β + η_i,           η_i ~ N(0, Ω),

with ``u`` = log (log-normal), identity (normal), logit or probit per parameter, covariates in
``C_i`` (continuous, optionally centred / log-transformed, and categorical as indicator columns),
fixed (not estimated) parameters, parameters without random effect, diagonal or block Ω, and
residual errors ``g = a`` (constant), ``b|f|`` (proportional), ``sqrt(a² + b² f²)`` (combined) or
``log y = log f + a ε`` (exponential).  Observations below / above a limit (``CENS`` = ±1) contribute
``log Φ(±(LOQ − f)/g)``.

The latent of individual i is ``z_i = φ_i`` restricted to the parameters with a random effect
(Gaussian prior ``N(μ_i, Ω)``, ``μ_i = C_i β``).  The class implements the engines' contract
directly with ``ops.xp`` math (no Pyro tracing in the SAEM loop), plus

* the exponential-family face (saemix's M-step): statistics ``φ_i φ_iᵀ``, ``X_iᵀ ⊗ φ_i`` and the
  residual sum of squares; ``m_step`` solves β by generalised least squares with the current Ω,
  ``Ω = (1/N) Σ (φ_i − X_iβ)(φ_i − X_iβ)ᵀ`` (masked to its block structure) and the constant /
  proportional / exponential residual parameter in closed form; the remaining parameters (fixed
  effects without random effect, combined error) take the SAEM numerical step;
* the Gaussian faces ``predict`` / ``observations`` / ``prior_moments`` (f-SAEM's Gauss–Newton
  proposal, linearisation, residual diagnostics);
* :attr:`pyro_model` / :attr:`numpyro_model`: the same model as an ordinary Pyro / NumPyro model function.

The class is the model's face; its parts live beside it: the specification in :mod:`.spec` (parameters,
transforms, covariates, Ω blocks, error, data options), binding a table in :mod:`.binding`, the statistics and
M-step in :mod:`.mstep`, simulation in :mod:`.simulation`; the densities and the Gaussian faces are here.  The
PPL model functions and the engines are the integrations layer's (:mod:`latentfit.integrations.families`):
:meth:`NLME.fit` prepares the model and hands it to the front door ``fit_nlme`` through a hook
(:mod:`latentfit._hooks`), so ``models/`` imports no engine.

Example (a fit runs in :meth:`NLME.fit`'s example)
-------------------------------------------------
>>> from latentfit.models import nlme
>>> model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": nlme.Parameter(20.0, omega2=0.5), "CL": 0.5},
...                   covariates={"V": "Weight"}, omega=[("V", "CL")], error="combined", error_init={"a": 0.5})
>>> model
NLME(one_compartment_oral, parameters=['ka', 'V', 'CL'], random=['ka', 'V', 'CL'], error='combined', no data)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from latentfit.inference.model import LatentModel, ModelSpecificationError, UnitBlockEvaluator
from latentfit.inference.ops import BACKENDS, LOG_2PI, make_ops

from .._integrations import families, fit_nlme
from . import binding as _binding
from . import mstep as _mstep
from . import occasions as _occ
from . import outcomes as _outcomes
from . import responses as _resp
from . import simulation as _simulation
from . import spec as _spec
from .data import NLMEData, _id
from .mstep import COLLAPSED_OMEGA2, OMEGA2_FLOOR  # noqa: F401 - re-exported
from .spec import (  # noqa: F401 - the specification's names, re-exported
    COV_TRANSFORMS,
    DATA_OPTIONS,
    ERRORS,
    MODEL_OPTIONS,
    TRANSFORMS,
    Parameter,
    transform_pair,
)
from .stored import StoredTable
from .structural import Structural, resolve


def _sum_last(xp: Any, x: Any) -> Any:
    """``Σ_j x[..., j]``: for up to 4 entries as ``((x₀ + x₁) + x₂) + x₃``, which is what torch's reduction gives for
    so few (bit for bit) at a sixth of its cost over ``[1, 5000, 3]`` (an inner reduction of 3 is torch's slow case)."""
    d = x.shape[-1]
    if d > 4:
        return xp.sum(x, -1)
    out = x[..., 0]
    for j in range(1, d):
        out = out + x[..., j]
    return out


class NLME(LatentModel):
    """Nonlinear mixed-effects model (see the module docstring).

    Parameters
    ----------
    structural : a library name (``"one_compartment_oral"``, ...), a :class:`Structural`, or a
        function ``f(psi, data) -> pred [..., N, T]``.
    parameters : dict name -> initial value or :class:`Parameter` (log-normal with random effect by default).
    covariates : dict parameter -> covariate column(s): a name, a list, or a dict ``{column: transform}``
        with transform ``"linear"`` (raw, saemix default), ``"center"``, ``"log"``, ``"log-center"``
        or ``"categorical"`` (non-numeric columns are categorical; the first sorted level is the reference).
        ``"center"`` is ``c − c_ref``, ``"log-center"`` ``log(c / c_ref)``, with ``c_ref`` the mean over the
        individuals of the data the model is first bound to (or :attr:`covariate_reference`).
    covariate_reference : the reference of a centred covariate (``{"Weight": 70.0}``: ``log(Weight / 70)``) or a
        categorical covariate's levels, the reference level first (``{"SEX": ["F", "M"]}``).  Not given: computed
        when the model is first bound to data, then kept: a model bound to other data (a design to simulate, a VPC
        on other data, a refit) keeps the fit's covariate model (``fit.model.covariate_reference``).
    omega : ``"diagonal"`` (default), ``"full"``, or a list of blocks (tuples of parameter names).
    error : ``"constant"``, ``"proportional"``, ``"combined"`` or ``"exponential"``.
    error_init : initial residual parameters, e.g. ``{"a": 1.0, "b": 0.1}`` (saemix's ``error.init``; default
        ``a = 1``, ``b = 0.3``).
    covariate_init : initial covariate coefficients (φ scale; default 0), by name as in ``fit.params``
        (``{"beta_V_Weight": 0.01}``) or per parameter (``{"V": {"Weight": 0.01}}``; categorical:
        ``{"CL": {"SEX_M": 0.2}}``).
    data : optional data table to bind now (else pass it to :meth:`fit` / :meth:`bind`).
    columns, dose, regressors, x : data options of :func:`~latentfit.models.nlme.data.read_nonmem`: column names by
        role (``{"id": "Id", "time": "Time", "dv": "Concentration"}``), a per-row dose column (saemix form), per-
        observation regressor columns, the x-variable when it is not the time (dose–response data). They may
        be given here or to :meth:`fit` / :meth:`bind`.
    covariate_interpolation : how ``regressors`` (time-varying covariates) are read at the observations from all
        the records: ``"locf"`` (last value carried forward, default) or ``"linear"`` (in time); given here or to
        :meth:`bind`.
    outcome : ``None`` (continuous data with the residual ``error`` model) or a non-Gaussian outcome: ``"binary"``,
        ``"poisson"``, ``nlme.outcomes.Ordinal(thresholds=...)``, ``NegativeBinomial(dispersion=...)``,
        ``TimeToEvent(hazard=...)`` (structural None) or ``"loglik"`` (``structural`` is then the user's
        ``loglik(psi, data)``): :mod:`latentfit.models.nlme.outcomes`.
    dtype, device : of the arrays (torch: float64, CPU by default).
    backend : ``"torch"`` (default) or ``"jax"`` (JaxOps: engines compile their iterations with ``lax.scan``).
    iov : inter-occasion variability (Monolix's occasion level): the parameters with a κ random effect per
        (individual, occasion), ``φ_ik = C_i β + η_i + κ_ik``, ``κ_ik ~ N(0, γ²)``; a list of names (initial γ² 0.25)
        or a dict name -> initial γ²; estimated as ``gamma2_<name>`` (:mod:`latentfit.models.nlme.occasions`).
    occasion : the occasion column of the data (default ``"OCC"``); used with ``iov``.
    Several responses (PK/PD): ``error={"conc": "proportional", "effect": "constant"}`` (one error model per
        response, parameters ``a_<response>`` / ``b_<response>``; ``error_init={"conc": {"b": 0.1}}``); the structural
        model returns ``{response: prediction}`` (or a tuple in that order); ``response`` names the response column
        (default ``DVID``, else ``YTYPE``), whose i-th smallest value is the i-th response unless ``dvid={"conc": 1,
        "effect": 2}`` (:mod:`latentfit.models.nlme.responses`).
    """

    has_stats = True
    has_gaussian_prior = True
    evaluates_unit_subsets = True
    linearisation_holds_jacobian = True  # saemix's fim.saemix: J at θ̂
    #: ``(T, D, S)``: pad the bound data to at least these numbers of observations, doses and periods per individual
    #: (a block of a ``fit(..., distributed="local")`` JAX fit: every process's arrays of one shape); None: the data's
    pad_widths: tuple[int, int, int] | None = None
    #: a padded block of a ``distributed="local"`` JAX fit (:meth:`pad_units`): the number of individuals, the last ones
    #: dummies; None: the data's
    pad_units_to: int | None = None

    def __init__(self, structural: Any, parameters: dict[str, Any], covariates: dict[str, Any] | None = None,
                 omega: Any = "diagonal", error: str = "constant", error_init: dict[str, float] | None = None,
                 data: pd.DataFrame | None = None, columns: dict[str, str] | None = None, dose: str | None = None,
                 regressors: tuple[str, ...] | list[str] = (), dtype: Any = None, device: Any = None,
                 backend: str = "torch", x: str | None = None, outcome: Any = None,
                 covariate_init: dict[str, Any] | None = None, covariate_interpolation: str | None = None,
                 iov: Any = None, occasion: str | None = None, response: str | None = None,
                 dvid: dict[str, Any] | None = None, covariate_reference: dict[str, Any] | None = None) -> None:

        if not isinstance(parameters, dict) or not parameters:
            raise ModelSpecificationError("parameters must be a non-empty dict name -> initial value or Parameter")
        self.outcome = _outcomes.make_outcome(outcome)
        if self.outcome is None:
            self.structural: Structural = resolve(structural, list(parameters))
        else:
            self.structural = _outcomes.setup(self, structural, parameters, error, error_init)
        self.param_names = _outcomes.parameter_names(self.structural, self.outcome)
        self.spec: dict[str, Parameter] = _spec.parse_parameters(self.structural.name, self.param_names,
                                                                 parameters)
        self.random_names = [n for n in self.param_names if self.spec[n].random]
        if self.outcome is not None:
            self.outcome.check_spec(self.spec)
        if not self.random_names:
            raise ModelSpecificationError("at least one parameter needs a random effect (Parameter(random=True))")
        self.covariate_spec = _spec.parse_covariates(self.param_names, covariates or {})
        #: the value each centred covariate is centred at and each categorical covariate's levels: given here, else
        #: computed when the model is first bound to data and kept by every later binding
        #: (:func:`.spec.covariate_columns`)
        self.covariate_reference: dict[str, Any] = _spec.parse_covariate_reference(self.covariate_spec,
                                                                                  covariate_reference)
        #: the covariates whose reference the user gave (the same in every process of a distributed="local" fit)
        self.reference_given = frozenset(self.covariate_reference)
        self.iov_init = _occ.parse_iov(iov, self.param_names)
        self.occasion_column = str(occasion) if occasion is not None else _occ.OCCASION_COLUMN
        self._iov: _occ.Occasions | None = None
        self.omega_blocks = _spec.parse_omega(self.random_names, omega)
        joint = self.outcome.outcomes if isinstance(self.outcome, _outcomes.Joint) else None
        self.response_spec = (_resp.parse(error if isinstance(error, dict) else {}, error_init, dvid, joint)
                              if isinstance(error, dict) or joint else None)
        self.response_column = response
        self._resp: _resp.Responses | None = None
        if self.response_spec is not None:
            error, error_init = "responses", None
        elif dvid is not None or response is not None:
            raise ModelSpecificationError("response= / dvid= are for several responses: give error={response: "
                                          "error model, ...}")
        self.error = str(error).lower()
        if self.error not in ERRORS and self.response_spec is None:
            raise ModelSpecificationError(f"unknown error model {error!r}; use one of {ERRORS}")
        self.error_init = _spec.parse_error_init(error_init)
        if error_init and self.outcome is None and self.response_spec is None:
            used = {"constant": {"a"}, "exponential": {"a"}, "proportional": {"b"}, "combined": {"a", "b"}}[self.error]
            unused = sorted(set(error_init) - used)
            if unused:  # a proportional or combined model meant? (a warning: a shared error_init serves all models)
                warnings.warn(f"error_init gives {unused}, which the {self.error!r} error model has not (its "
                              f"parameters: {sorted(used)}; 'a' is additive, 'b' proportional, error='combined' has "
                              f"both): ignored", UserWarning, stacklevel=2)
        self.covariate_init = _spec.parse_covariate_init(self.param_names, covariate_init or {})
        no_options = {**dict.fromkeys(DATA_OPTIONS), "regressors": ()}
        self.read_options = _spec.merge_read_options(
            no_options, {"columns": columns, "dose": dose, "regressors": regressors, "x": x,
                         "covariate_interpolation": covariate_interpolation}, "NLME(...)")
        if backend not in BACKENDS:
            raise ModelSpecificationError(f"backend must be 'torch' or 'jax', got {backend!r}")
        self.ops = make_ops(backend, device=device, dtype=dtype)
        self.data: NLMEData | None = None
        self._table: StoredTable | None = None  # the bound table, compact (stored.py): not the caller's DataFrame
        if data is not None:
            self._bind(data)

    # ----- specification (parsed in spec.py) ------------------------------------------------------------
    @property
    def mcmc_draw_dtype(self) -> str | None:
        """dtype of SAEM's MCMC normal draws (the engine's ``draw_dtype`` default): ``"float32"`` on JAX, where
        float64 normals (the inverse error function in float64) cost about a third of an iteration at N = 5000;
        None (the arrays' dtype) on torch, whose draws stay those of the seed's stream."""
        return self.ops.fast_draw_dtype

    @property
    def diagonal_omega(self) -> bool:
        return all(len(b) == 1 for b in self.omega_blocks)

    # ----- binding data ---------------------------------------------------------------------------
    def bind(self, data: pd.DataFrame | None = None, **read_options: Any) -> NLME:
        """A copy of the model bound to ``data`` (default: the bound table) with the data options ``columns``,
        ``dose``, ``regressors``, ``x`` (as in :func:`read_nonmem`; an option already given with another value is an
        error)."""
        return _binding.bind(self, data, **read_options)

    def _bind(self, df: pd.DataFrame) -> None:
        _binding.bind_data(self, df)

    @property
    def table(self) -> pd.DataFrame | None:
        """The bound table (None before binding), rebuilt from the model's compact copy
        (:class:`~latentfit.models.nlme.stored.StoredTable`: exactly the table bound, a new DataFrame at each read).
        The model keeps no reference to the caller's DataFrame, which is freed when the caller drops it."""
        return None if self._table is None else self._table.frame()

    def unit_labels(self) -> pd.Index:
        """The individuals' IDs, in unit order, named as the data's ID column: the index of the post-fit tables
        (``fit.individual_parameters()``, ``fit.individual_estimates().to_frame()``) and a column of
        ``fit.residuals().to_frame()``."""
        self._require_data()
        ids = [v.item() if isinstance(v, np.generic) else v for v in np.asarray(self.data.ids)]
        return pd.Index(ids, name=self.data.columns.get("id", "ID"))

    def _require_data(self) -> None:
        if self.data is None:
            raise ModelSpecificationError("the model has no data: pass data= to NLME(...), .bind(data) or .fit(data)")

    # ----- building blocks --------------------------------------------------------------------------
    def _beta(self, theta: dict[str, Any]) -> Any:
        """All fixed effects in φ-space, ``[p]``."""
        xp = self.ops.xp
        raw = xp.stack([theta[e.name] for e in self.effects])
        if self._pop_kinds == {"log"} and len(self.effects) == len(self.param_names):
            return xp.log(raw)  # common case: every parameter log-normal, no covariate
        out = raw
        for kind, mask in self._kind_masks.items():
            u, _ = transform_pair(self.ops, kind)
            out = xp.where(mask, u(xp.where(mask, raw, self._safe_raw[kind])), out)
        return out

    def _take(self, a: Any, units: Any) -> Any:
        return a if units is None else self.ops.take(a, units, 0)

    def _mu(self, theta: dict[str, Any], units: Any = None) -> Any:
        """``μ_i = X_i β`` for every parameter, ``[n, m]``."""
        if self._no_covariates and (units is None or isinstance(units, slice)):
            return self._beta(theta)  # [m], broadcasts against [n, m]
        return self._take(self._x, units) @ self._beta(theta)

    def _unitwise(self, make: Callable[[Any], Callable[[Any], Any]], units: Any) -> Callable[[Any], Any]:
        """``z -> make(units)(z)``: a per-unit reduction ``[..., n]`` of per-observation ``[..., n, T]`` arrays (the
        structural model, residuals), taken over contiguous blocks of the units when the backend asks for it
        (:meth:`~latentfit.inference.ops.Ops.unit_blocks`: eager torch over many units and chains), so that those
        temporaries stay a few MiB instead of growing with N.  Each block runs the same operations on its units'
        rows (``make(block)``, built once per block); the results are concatenated."""
        whole = make(units)
        if not self._blockable:
            return whole
        xp = self.ops.xp
        blocks_of = self._unit_blocks_fn(units)
        built: dict[int, list[Callable[[Any], Any]]] = {}

        def evaluate(z: Any) -> Any:
            blocks = blocks_of(z)
            if blocks is None:
                return whole(z)
            fns = built.get(len(blocks))
            if fns is None:
                fns = built[len(blocks)] = [make(_sub_units(units, b)) for b in blocks]
            return xp.concatenate([fn(z[..., b, :]) for fn, b in zip(fns, blocks)], -1)

        return evaluate

    @property
    def _blockable(self) -> bool:
        """Per-observation work may go over blocks of units (no occasions, several responses or outcome models)."""
        return self._iov is None and self._resp is None and self.outcome is None

    def _unit_blocks_fn(self, units: Any) -> Callable[[Any], list[slice] | None]:
        """``z -> blocks`` of the units ``units`` for draws ``z [..., n, d]``: ``Ops.unit_blocks`` with one ``[..., n,
        T]`` temporary's values per unit (what :meth:`_unitwise` and the MCMC kernels step over)."""
        n = self.num_units if units is None else len(range(self.num_units)[units]) if isinstance(units, slice) \
            else int(units.shape[0])
        t_max = int(self.data.time.shape[-1])
        return lambda z: self.ops.unit_blocks(n, int(np.prod(tuple(z.shape[:-2]), dtype=np.int64)) * t_max)

    def _block_evaluator(self, whole: Callable[[Any], tuple], for_units: Callable[[slice], Callable[[Any], tuple]],
                         units: Any) -> Callable[[Any], tuple]:
        """``whole`` as a :class:`~latentfit.inference.model.UnitBlockEvaluator` (its MCMC kernels step over blocks of
        the units, ``for_units(block)`` evaluating one) where the backend blocks eager work (torch); else ``whole``."""
        if self.ops.unit_block_values is None or not self._blockable:
            return whole
        return UnitBlockEvaluator(whole, for_units, self._unit_blocks_fn(units))

    def _mu_r(self, mu: Any, n: int) -> Any:
        xp = self.ops.xp
        mu_r = mu if self._all_random else mu[..., self._r_sel]
        return xp.broadcast_to(mu_r, (n, len(self.r_idx))) if mu_r.ndim == 1 else mu_r

    def omega_matrix(self, theta: dict[str, Any]) -> Any:
        """Ω ``[d, d]`` (random-effect covariance)."""
        if self.diagonal_omega:
            return self._omega_diag(theta)[:, None] * self._eye
        return theta["Omega"]

    def _omega_diag(self, theta: dict[str, Any]) -> Any:
        xp = self.ops.xp
        return xp.stack([theta[f"omega2_{nm}"] for nm in self.random_names])

    def _psi(self, mu: Any, z: Any) -> dict[str, Any]:
        xp = self.ops.xp
        if self._all_random:
            phi = z
        else:
            phi = mu + (z - mu[..., self._r_sel]) @ self._embed
        if self._pop_kinds == {"log"}:
            psi = xp.exp(phi)
            return {nm: psi[..., j:j + 1] for j, nm in enumerate(self.param_names)}
        return {nm: self.params[nm].to_constrained(phi[..., j:j + 1]) for j, nm in enumerate(self.param_names)}

    def individual_parameters(self, theta: dict[str, Any], z: Any, units: Any = None) -> dict[str, Any]:
        """ψ_i per parameter name, ``[..., n, 1]`` (natural scale; with IOV the individual's value, κ = 0)."""
        if self._iov is not None:
            z = _occ.split(z, self._iov)[0]
        return self._psi(self._mu(theta, units), z)

    def structural_prediction(self, theta: dict[str, Any], z: Any, units: Any = None, mu: Any = None) -> Any:
        """``f(t_ij, ψ_i)`` ``[..., n, T]``."""
        self._require_data()
        return self._prediction_fn(self._mu(theta, units) if mu is None else mu, units)(z)

    def _prediction_fn(self, mu: Any, units: Any) -> Callable[[Any], Any]:
        """``z -> f(t_ij, ψ_i)`` at the population means ``mu`` of ``units`` (their design taken once)."""
        if self._iov is not None:
            return lambda z: self._structural_prediction_iov(mu, z, units)
        design, fn = self.design.take(self.ops, units), self._structural_fn
        return lambda z: fn(self._psi(mu, z), design)

    def _structural_prediction_iov(self, mu: Any, z: Any, units: Any) -> Any:
        """IOV: the structural model at each occasion's φ_i + κ_ik (a leading axis of size K), each observation
        taking its own occasion's prediction (:mod:`~latentfit.models.nlme.occasions`)."""
        pred = self._structural_fn(self._psi_by_occasion(mu, z), self.design.take(self.ops, units))
        return _occ.select(pred, self._iov, units, self.ops)

    def _psi_by_occasion(self, mu: Any, z: Any) -> dict[str, Any]:
        """IOV: ψ_ik at each occasion's φ_i + κ_ik, ``[..., K, n, 1]`` per parameter name."""
        xp, occ = self.ops.xp, self._iov
        z_phi, kappa = _occ.split(z, occ)
        phi = mu + (z_phi - mu[..., self._r_sel]) @ self._embed if not self._all_random else z_phi
        phi_k = _occ.phi_by_occasion(xp.broadcast_to(phi, tuple(z_phi.shape[:-1]) + (len(self.param_names),)),
                                     kappa, occ, xp)
        return {nm: self.params[nm].to_constrained(phi_k[..., j:j + 1]) for j, nm in enumerate(self.param_names)}

    @property
    def observed(self) -> dict[str, np.ndarray]:
        """``{"DV": [N, T]}``, the observations with NaN on the padding (numpy; built when asked rather than kept beside
        the data: N = 10⁶ individuals with 10 observations each would hold 80 MB more)."""
        return {} if self.data is None else {"DV": np.where(self.data.mask, self.data.dv, np.nan)}

    @property
    def density_values_per_unit(self) -> int:  # type: ignore[override]
        """Values per individual of the largest temporary of one density evaluation: observations × doses (the
        closed forms superpose every dose at every observation, ``[..., N, T, D]``)."""
        if getattr(self, "data", None) is None:
            return 1
        return int(self.data.time.shape[-1]) * max(1, int(self.data.dose_time.shape[-1]))

    def data_arrays(self) -> dict[str, Any]:
        """The bound data (observations, times, doses, covariates, regressors: :class:`~.data.NLMEData`), what a
        checkpoint's data digest covers."""
        return {"data": self.data}

    @property
    def observation_labels(self) -> dict[str, np.ndarray]:
        """Per-observation label columns of the post-fit tables (``[N, T]`` numpy arrays by column name): a model with
        several responses, the response column of its data (``DVID``, or the name the data use, e.g. ``YTYPE``), whose
        values tell a residual table's rows apart; empty otherwise."""
        if self.data is None or self._resp is None:
            return {}
        column = self._resp.column
        values = np.asarray(self.data.regressors[column], dtype=float)
        if np.all(values[self.data.mask] == np.round(values[self.data.mask])):
            values = values.astype(np.int64)
        return {column: values}

    @property
    def x_name(self) -> str:
        """Name of the x-variable of the plots: the ``x=`` column, else the time column."""
        self._require_data()
        return self.data.x if self.data.x is not None else self.data.columns.get("time", "time")

    def prediction_grid(self, num_points: int = 150) -> _binding.PredictionGrid | None:
        """A fine grid of the x-variable per individual, unpacking as ``(grid [N, G], mask [N, G])`` (numpy), for smooth
        curves, with each point's response, period and occasion
        (:func:`~latentfit.models.nlme.binding.prediction_grid`)."""
        return _binding.prediction_grid(self, num_points)

    def structural_prediction_at(self, theta: dict[str, Any], z: Any, grid: Any) -> Any:
        """``f(x, ψ_i)`` at the points of ``grid`` (a :meth:`prediction_grid`, or an array ``[N, G]`` of the
        x-variable), ``z [..., N, d]`` -> ``[..., N, G]``
        (:func:`~latentfit.models.nlme.binding.structural_prediction_at`)."""
        return _binding.structural_prediction_at(self, theta, z, grid)

    def _error_sd(self, theta: dict[str, Any], f: Any, units: Any = None) -> Any:
        xp = self.ops.xp
        if self._resp is not None:
            return _resp.error_sd(theta, f, self._resp, units, self.ops)
        if self.error in ("constant", "exponential"):
            return theta["a"] + 0.0 * f
        if self.error == "proportional":
            return theta["b"] * xp.abs(f)
        return xp.sqrt(theta["a"] ** 2 + (theta["b"] * f) ** 2)

    def _obs_terms(self, theta: dict[str, Any], f: Any, units: Any) -> Any:
        """Per-observation log-density ``[..., n, T]`` (padding = 0)."""
        return self._obs_terms_fn(theta, units)(f)

    def _obs_terms_fn(self, theta: dict[str, Any], units: Any) -> Callable[[Any], Any]:
        """``f -> `` per-observation log-density ``[..., n, T]`` (padding = 0), what depends on θ and ``units`` alone
        (the observations, the mask, ``log a + ½ log 2π``) taken once."""
        xp = self.ops.xp
        mask = None if self._no_padding else self._take(self._mask, units)
        log_f = self.error == "exponential"
        y = self._take(self._ylog if log_f else self._y, units)
        cens = self._take(self._cens, units) if self.has_censoring else None
        if self.error in ("constant", "exponential"):
            a = theta["a"]
            const = xp.log(a) + 0.5 * LOG_2PI

            def residual(f: Any) -> tuple[Any, Any]:
                r = (y - f) / a
                return r, -0.5 * r * r - const
        else:
            def residual(f: Any) -> tuple[Any, Any]:
                sd = self._error_sd(theta, f, units)
                r = (y - f) / sd
                return r, -0.5 * r * r - xp.log(sd) - 0.5 * LOG_2PI

        def terms(f: Any) -> Any:
            r, lp = residual(xp.log(f) if log_f else f)
            if cens is not None:
                lcdf = self.ops.log_ndtr(cens * r)  # below: Φ((LOQ−f)/g), above: Φ(−(LOQ−f)/g)
                lp = xp.where(cens != 0, lcdf, lp)
            return lp if mask is None else xp.where(mask, lp, 0.0)

        return terms

    # ----- LatentModel contract ----------------------------------------------------------------------
    def log_densities(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        return self._log_densities_fn(theta, units, summed=False)(z)

    def density_evaluator(self, theta: dict[str, Any], units: Any = None) -> Callable[[Any], tuple[Any, Any]]:
        """``z -> (log p(y_i | z_i; θ), log p(z_i; θ))`` for an MCMC sweep's many draws at one θ: what depends on θ and
        ``units`` alone (μ, the design, the prior's and the residual error's constants) is computed once, and a
        constant (or exponential) error without censoring is scored through the residual sum of squares (three passes
        over the observations instead of six).  Equal to :meth:`log_densities` up to rounding (about 1e-15
        relative), which is kept for the Laplace steps and the likelihoods, whose optimisers would carry rounding
        differences into the estimates."""
        mu = self._mu(theta, units)
        whole = self._log_densities_fn(theta, units, summed=True, mu=mu)
        if self.outcome is not None:
            return whole

        def for_units(block: slice) -> Callable[[Any], tuple[Any, Any]]:  # the same operations on the block's rows
            return self._log_densities_fn(theta, _sub_units(units, block), summed=True, mu=_unit_rows(mu, block))

        return self._block_evaluator(whole, for_units, units)

    def _log_densities_fn(self, theta: dict[str, Any], units: Any, summed: bool,
                          mu: Any = None) -> Callable[[Any], tuple[Any, Any]]:
        xp = self.ops.xp
        mu = self._mu(theta, units) if mu is None else mu
        prior = self._log_prior_fn(theta, mu)
        if self.outcome is not None:
            return lambda z: (xp.sum(_outcomes.log_prob(self, theta, z, units, mu), -1), prior(z))
        self._require_data()

        def log_lik(block: Any) -> Callable[[Any], Any]:  # z -> log p(y_i | z_i) of a block of the units
            predict = self._prediction_fn(mu if block is units else self._mu(theta, block), block)
            if summed and self._rss_scored:
                rss, score = self._rss_fns(theta, block)
                return lambda z: score(rss(predict(z)))
            obs = self._obs_terms_fn(theta, block)
            return lambda z: xp.sum(obs(predict(z)), -1)

        log_lik_all = self._unitwise(log_lik, units)
        return lambda z: (log_lik_all(z), prior(z))

    @property
    def _rss_scored(self) -> bool:
        """A constant (or exponential) error without censoring, one response: the log-likelihood is a function of the
        per-unit residual sum of squares."""
        return (self.outcome is None and self._resp is None and not self.has_censoring
                and self.error in ("constant", "exponential"))

    def _rss_fns(self, theta: dict[str, Any], units: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        """``(f -> RSS_i, RSS_i -> log p(y_i | f_i))`` ``[..., n]`` for a constant (or exponential: on the log scale)
        error without censoring: ``RSS_i = Σ_j (y_ij − f_ij)²`` over the unit's observations and
        ``log p = −RSS_i / (2a²) − n_i (log a + ½ log 2π)`` (the sum of :meth:`_obs_terms` up to rounding)."""
        xp = self.ops.xp
        a = theta["a"]
        half_precision = 0.5 / (a * a)
        const = self._take(self._num_obs_unit, units) * (xp.log(a) + 0.5 * LOG_2PI)  # [n]

        def score(rss_value: Any) -> Any:
            return -half_precision * rss_value - const

        return self._rss_fn(units), score

    def _rss_fn(self, units: Any) -> Callable[[Any], Any]:
        """``f -> RSS_i`` ``[..., n]`` (the first function of :meth:`_rss_fns`)."""
        xp = self.ops.xp
        log_f = self.error == "exponential"
        y = self._take(self._ylog if log_f else self._y, units)
        mask = None if self._no_padding else self._take(self._mask, units)

        def rss(f: Any) -> Any:
            res = y - (xp.log(f) if log_f else f)
            if mask is not None:
                res = xp.where(mask, res, 0.0)
            return xp.sum(res * res, -1)

        return rss

    def cached_density(self, theta: dict[str, Any]) -> tuple[Callable[[Any], tuple[Any, Any, Any]],
                                                             Callable[[Any, Any], tuple[Any, Any]]] | None:
        """SAEM's sweeps carry each chain's residual sum of squares ``RSS_i`` (``[L, N]``): when the log-likelihood
        is a function of it (:attr:`_rss_scored`) and the predictions do not depend on θ (every parameter has a
        random effect: ψ_i is a function of z_i alone), a sweep re-scores its starting state at the new θ from the
        carried RSS instead of evaluating the structural model, and the statistics take the RSS of the final state
        (:meth:`stats` ``cache=``): 2 of the 12 evaluations of a default iteration.  The values are those of
        :meth:`density_evaluator` and :meth:`stats` bit for bit.  None for the other models."""
        if not (self._rss_scored and self._all_random and self.data is not None):
            return None
        mu = self._mu(theta)
        prior = self._log_prior_fn(theta, mu)
        rss = self._rss_of(theta, mu)
        score = self._rss_fns(theta, None)[1]

        def evaluate(z: Any) -> tuple[Any, Any, Any]:
            r = rss(z)
            return score(r), prior(z), r

        def rescore(z: Any, r: Any) -> tuple[Any, Any]:
            return score(r), prior(z)

        def for_units(block: slice) -> Callable[[Any], tuple[Any, Any, Any]]:  # evaluate's operations on the block
            mu_b = _unit_rows(mu, block)
            prior_b = self._log_prior_fn(theta, mu_b)
            predict, of = self._prediction_fn(mu_b, block), self._rss_fn(block)
            score_b = self._rss_fns(theta, block)[1]

            def evaluate_block(z: Any) -> tuple[Any, Any, Any]:
                r = of(predict(z))
                return score_b(r), prior_b(z), r

            return evaluate_block

        return self._block_evaluator(evaluate, for_units, None), rescore

    def initial_cache(self, theta: dict[str, Any], z: Any) -> Any:
        """The residual sums of squares ``RSS_i`` of ``z`` (what :meth:`cached_density`'s ``evaluate`` carries, by
        the same operations) without the densities: at SAEM's start, run eagerly, these are a dozen fewer small
        programs to compile or load."""
        if not (self._rss_scored and self._all_random and self.data is not None):
            return None
        return self._rss_of(theta, self._mu(theta))(z)

    def units_minor_density(self, theta: dict[str, Any]) -> tuple[Callable[[Any], tuple[Any, Any, Any]],
                                                                  Callable[[Any, Any], tuple[Any, Any]],
                                                                  Callable[[Any], Any]] | None:
        """:meth:`cached_density`'s ``(evaluate, rescore)`` and :meth:`prior_transform` on chains laid out ``[L, d, N]``
        (SAEM's compiled sweeps, :func:`~latentfit.inference.mcmc.saemix_sweep`): the same element-wise operations
        on each unit and the prior's sums in the same order; a library model element-wise in its design
        (:attr:`~.structural.Structural.elementwise`) predicts ``[L, T, N]`` from the design laid out ``[T, N]``
        (XLA:CPU vectorises along the units; over ``[N, T]`` a row of T = 10 leaves a scalar remainder), the
        residual sums of squares then summed in another order (rounding, ~1e-16 relative).  None on an eager
        backend, where :meth:`cached_density` is None, and with occasions or padded units."""
        if not (getattr(self.ops, "jittable", False) and self._rss_scored and self._all_random and self.data is not None
                and self._iov is None and self.pad_units_to is None):
            return None
        xp = self.ops.xp
        mu = self._mu(theta)  # [d] or [N, d] (every parameter random: μ_r = μ)
        mu_t = mu[:, None] if mu.ndim == 1 else xp.swapaxes(mu, -1, -2)  # [d, 1] or [d, N]
        prior = self._log_prior_units_minor(theta, mu_t)
        score = self._rss_fns(theta, None)[1]
        minor = getattr(self, "_design_minor", None)
        fn, names = self._structural_fn, self.param_names

        def psi_of(z: Any) -> dict[str, Any]:  # ψ_i per parameter, [L, 1, N]
            if self._pop_kinds == {"log"}:
                psi = xp.exp(z)
                return {nm: psi[..., j:j + 1, :] for j, nm in enumerate(names)}
            return {nm: self.params[nm].to_constrained(z[..., j:j + 1, :]) for j, nm in enumerate(names)}

        if minor is not None:
            design, y, mask = minor["design"], minor["y"], minor["mask"]
            log_f = self.error == "exponential"

            def rss(z: Any) -> Any:
                f = fn(psi_of(z), design)  # [L, T, N]
                res = y - (xp.log(f) if log_f else f)
                if mask is not None:
                    res = xp.where(mask, res, 0.0)
                return xp.sum(res * res, -2)
        else:  # a user's structural function: predictions [L, N, T] from ψ [L, N, 1]
            of, design = self._rss_fn(None), self.design

            def rss(z: Any) -> Any:
                return of(fn({nm: xp.swapaxes(v, -1, -2) for nm, v in psi_of(z).items()}, design))

        def evaluate(z: Any) -> tuple[Any, Any, Any]:
            r = rss(z)
            return score(r), prior(z), r

        def rescore(z: Any, r: Any) -> tuple[Any, Any]:
            return score(r), prior(z)

        chol = self.ops.small_cholesky(self.omega_matrix(theta))  # [d, d]

        def transform(eps: Any) -> Any:
            # μ_i + L ε_i as a product [d, d] @ [L, d, N] (a diagonal Ω: L's zeros make it exact, the values of
            # LatentModel.prior_transform): XLA keeps the draws it reads in one fusion (an element-wise form has the
            # threefry hash recomputed in each of the acceptance's fusions, 8 times per prior-IMH step)
            return mu_t + xp.matmul(chol, eps)

        return evaluate, rescore, transform

    def _log_prior_units_minor(self, theta: dict[str, Any], mu_t: Any) -> Callable[[Any], Any]:
        """:meth:`_log_prior_eta_fn` on ``z [..., d, N]`` (``mu_t`` ``[d, 1]`` or ``[d, N]``): the diagonal Ω's terms
        summed as :func:`_sum_last` sums them (the same values), a block Ω's quadratic form up to rounding."""
        xp = self.ops.xp
        d = len(self.r_idx)
        if self.diagonal_omega:
            var, const = self._omega_constants(theta)
            var = var[:, None]

            def diagonal(z: Any) -> Any:
                diff = z - mu_t
                terms = diff * diff / var
                if d > 4:
                    return -0.5 * xp.sum(terms, -2) - const
                out = terms[..., 0, :]
                for j in range(1, d):  # ((t₀ + t₁) + t₂) + t₃, as _sum_last
                    out = out + terms[..., j, :]
                return -0.5 * out - const

            return diagonal
        prec, half_logdet, const = self._omega_constants(theta)

        def block(z: Any) -> Any:
            diff = z - mu_t
            if d > 8:
                return -0.5 * xp.sum((xp.swapaxes(prec, -1, -2) @ diff) * diff, -2) - half_logdet - const
            rows = [diff[..., j, :] for j in range(d)]  # (diff Ω⁻¹)_k diff_k summed element-wise over [L, N]
            quad = 0.0
            for k in range(d):
                col = rows[0] * prec[0, k]
                for j in range(1, d):
                    col = col + rows[j] * prec[j, k]
                quad = quad + col * rows[k]
            return -0.5 * quad - half_logdet - const

        return block

    def _rss_of(self, theta: dict[str, Any], mu: Any) -> Callable[[Any], Any]:
        """``z -> RSS_i`` ``[..., N]`` of every unit (``mu``: μ of every unit), over blocks of units where the backend
        asks for it (:meth:`_unitwise`)."""

        def rss(block: Any) -> Callable[[Any], Any]:
            predict = self._prediction_fn(mu if block is None else self._mu(theta, block), block)
            of = self._rss_fn(block)
            return lambda z: of(predict(z))

        return self._unitwise(rss, None)

    def _log_prior(self, theta: dict[str, Any], z: Any, mu: Any) -> Any:
        return self._log_prior_fn(theta, mu)(z)

    def _log_prior_fn(self, theta: dict[str, Any], mu: Any) -> Callable[[Any], Any]:
        """``z -> log p(z_i; θ)`` (η and, with IOV, κ)."""
        eta = self._log_prior_eta_fn(theta, mu)
        if self._iov is None:
            return eta
        xp, iov = self.ops.xp, self._iov

        def log_prior(z: Any) -> Any:
            z, kappa = _occ.split(z, iov)
            return eta(z) + _occ.log_prior(theta, kappa, iov, xp)

        return log_prior

    def _omega_constants(self, theta: dict[str, Any]) -> tuple:
        """What the log-prior of η needs from Ω once per θ: ``(ω², Σ log ω² / 2 + d log(2π) / 2)`` for a diagonal Ω,
        else ``(Ω⁻¹, log|Ω| / 2, d log(2π) / 2)``."""
        xp, d = self.ops.xp, len(self.r_idx)
        if self.diagonal_omega:
            var = self._omega_diag(theta)
            return var, 0.5 * xp.sum(xp.log(var)) + 0.5 * d * LOG_2PI
        om = theta["Omega"]
        return xp.linalg.inv(om), 0.5 * xp.linalg.slogdet(om)[1], 0.5 * d * LOG_2PI

    def _log_prior_eta_fn(self, theta: dict[str, Any], mu: Any) -> Callable[[Any], Any]:
        """``η -> log N(η; μ_i, Ω)`` with Ω's inverse / variances and the normalising constant computed once."""
        xp = self.ops.xp
        mu_r = mu if self._all_random else mu[..., self._r_sel]
        if self.diagonal_omega:
            var, const = self._omega_constants(theta)

            def diagonal(z: Any) -> Any:
                diff = z - mu_r
                return -0.5 * _sum_last(xp, diff * diff / var) - const

            return diagonal
        prec, half_logdet, const = self._omega_constants(theta)

        def block(z: Any) -> Any:
            diff = z - mu_r
            return -0.5 * xp.sum((diff @ prec) * diff, -1) - half_logdet - const

        return block

    def sample_prior(self, theta: dict[str, Any], key: Any, num_chains: int, units: Any = None) -> Any:
        ops, xp = self.ops, self.ops.xp
        self._require_data()
        n = self.num_units if units is None else len(units)
        mu_r = self._mu_r(self._mu(theta, units), n)
        if self._iov is not None:
            key, k_kappa = ops.split(key)
        eps = ops.normal(key, (num_chains,) + tuple(mu_r.shape))
        if self.diagonal_omega:  # ε_j ω_j: what ε Lᵀ gives for a diagonal L, bit for bit, without a matmul
            z = mu_r + eps * xp.sqrt(self._omega_diag(theta))
        else:
            z = mu_r + eps @ xp.swapaxes(ops.small_cholesky(self.omega_matrix(theta)), -1, -2)
        if self._iov is not None:
            z = xp.concatenate([z, _occ.sample(theta, k_kappa, (num_chains, n), self._iov, ops)], -1)
        return z

    def unpack_latents(self, z: Any) -> dict[str, Any]:
        out = {nm: self.params[nm].to_constrained(z[..., k]) for k, nm in enumerate(self.random_names)}
        if self._iov is not None:
            out.update(_occ.unpack(_occ.split(z, self._iov)[1], self._iov))
        return out

    def site_dims(self, name: str) -> list[str | None]:
        """arviz's dims (:meth:`LatentModel.site_dims`): ``DV [N, T]`` and each latent have the unit dim first; an
        inter-occasion effect ``kappa_<name> [N, K]`` then has ``occasion``."""
        if name == "DV":  # the one observed site (:attr:`observed`)
            return ["unit", None]
        if self._iov is not None and name in {f"kappa_{nm}" for nm in self._iov.names}:
            return ["unit", "occasion"]
        return ["unit"]

    def initial_values_finite(self, theta: dict[str, Any]) -> Any:
        """Whether every individual's log-density is finite at the starting values ``θ`` with the random effects at
        their prior means (a flag array); SAEM computes it in its start program (:meth:`check_initial_values`)."""
        xp = self.ops.xp
        ll, lp = self.log_densities(theta, self.prior_moments(theta)[0])
        return xp.all(xp.isfinite(ll + lp))

    def check_initial_values(self) -> None:
        """Raise a clear error when any individual's log-density is not finite at the initial values
        (at the prior means), e.g. a zero prediction under a proportional error."""
        theta = self.init_params()
        # one compiled program on JAX (keyed on shapes: the persistent cache serves it) instead of ~30 eager ones
        if not bool(self.ops.jit(self.initial_values_finite)(theta)):
            self.raise_for_nonfinite(theta, self.prior_moments(theta)[0][None])

    def raise_for_nonfinite(self, theta: dict[str, Any], z: Any) -> None:
        """Name the first individual / observation whose log-density is not finite, with a hint."""
        if self.outcome is not None:
            _outcomes.raise_for_nonfinite(self, theta, z)
            return super().raise_for_nonfinite(theta, z)
        ops = self.ops
        mu = self._mu(theta)
        f = ops.to_numpy(self.structural_prediction(theta, z, mu=mu))
        terms = ops.to_numpy(self._obs_terms(theta, self.structural_prediction(theta, z, mu=mu), None))
        bad = ~np.isfinite(terms)
        if bad.any():
            idx = np.argwhere(bad)[0]
            c, i, t = (0, *idx) if idx.size == 2 else tuple(idx[-3:])
            hint = ""
            if not np.isfinite(f[c, i, t]):
                hint = "the structural model returns NaN/inf there (check the initial parameter values)"
            elif self.error == "proportional" and f[c, i, t] == 0:
                hint = "the prediction is 0 there, so a proportional error has sd 0: use error='combined'"
            elif self.error == "exponential" and f[c, i, t] <= 0:
                hint = "the prediction is <= 0 there, where an exponential error needs a positive prediction"
            raise ModelSpecificationError(
                f"the log-likelihood is not finite at the initial parameter values for ID {_id(self.data.ids[i])} "
                f"(row {self.data.obs_rows[i, t]}, {self.data.columns.get('time') or self.data.x} "
                f"{self.data.time[i, t]}, prediction {f[c, i, t]:.4g})"
                + (f": {hint}" if hint else ""))
        super().raise_for_nonfinite(theta, z)

    # ----- exponential-family face (saemix M-step) ------------------------------------------------
    def stats(self, theta: dict[str, Any], z: Any, units: Any = None, cache: Any = None) -> dict[str, Any]:
        """Per-unit sufficient statistics (:func:`~latentfit.models.nlme.mstep.stats`); ``cache``: the residual sums
        of squares of ``z`` kept by a sweep (:meth:`cached_density`), used instead of re-evaluating the model."""
        return _mstep.stats(self, theta, z, units, cache)

    def m_step(self, s: dict[str, Any], theta: dict[str, Any], num_units: int) -> dict[str, Any]:
        """β by GLS with the current Ω, then Ω and the residual parameter in closed form (saemix); with IOV
        also the occasion variances γ² (:func:`~latentfit.models.nlme.mstep.m_step`)."""
        return _mstep.m_step(self, s, theta, num_units)

    def fit_warnings(self, theta: dict[str, Any]) -> list[str]:
        """A random-effect variance that fell to ~0 (:func:`~latentfit.models.nlme.mstep.fit_warnings`)."""
        return _mstep.fit_warnings(self, theta)

    def numeric_objective(self, theta: dict[str, Any], z: Any, names: list[str]) -> Callable[[dict], Any] | None:
        """Cheap objective for SAEM's numerical step (hook read by the engine;
        :func:`~latentfit.models.nlme.mstep.numeric_objective`)."""
        return _mstep.numeric_objective(self, theta, z, names)

    # ----- Gaussian faces ----------------------------------------------------------------------------
    def predict(self, theta: dict[str, Any], z: Any, units: Any = None) -> tuple[Any, Any]:
        """Mean and sd of the (transformed, for exponential error: log) observations, ``[..., n, T]``."""
        _outcomes.require_gaussian(self, "predict()")
        f = self.structural_prediction(theta, z, units)
        if self.error == "exponential":
            f = self.ops.xp.log(f)
        return f, self._error_sd(theta, f, units)

    def sample_observations(self, theta: dict[str, Any], z: Any, key: Any) -> dict[str, Any]:
        """``{"DV": [..., N, T]}``: ``y = f(ψ(z)) + g ε`` at each draw ``z [..., N, d]`` (exponential error:
        ``exp(log f + a ε)``), on :attr:`observed`'s layout, NaN on the padding (:meth:`simulate`'s draws, given the
        random effects); censored observations are drawn uncensored.  Outcome models (binary, counts, time to event)
        have no such face: their checks are ``fit.plot_vpc()``."""
        if self.outcome is not None:
            raise NotImplementedError(f"this NLME model's outcome is {self.outcome.name!r}: it has no residual error "
                                      f"model to draw from given the random effects; use fit.plot_vpc()")
        self._require_data()
        ops = self.ops
        mean, sd = self.predict(theta, ops.asarray(z))
        y = ops.to_numpy(mean + sd * ops.normal(key, tuple(mean.shape)))
        if self.error == "exponential":
            y = np.exp(y)
        return {"DV": np.where(self.data.mask, y, np.nan)}

    def observations(self, units: Any = None) -> tuple[Any, Any]:
        """``(y, mask)`` ``[n, T]``: DV (log DV for exponential error); censored values are masked out."""
        _outcomes.require_gaussian(self, "observations()")
        self._require_data()
        y = self._ylog if self.error == "exponential" else self._y
        return self._take(y, units), self._take(self._uncens_mask, units)

    def latent_lines(self) -> Any | None:
        """IOV: the ridge of each parameter with both a random effect and a κ, ``φ_i + t`` and ``κ_ik − t`` on the
        individual's real occasions k (numpy ``[r, N, d + qK]``; SAEM's line move,
        :func:`~latentfit.inference.mcmc.line_gibbs`).  Every occasion's parameter ``φ_i + κ_ik`` stays the same along
        it, so the data do not see it and only the priors N(0, ω²) and N(0, γ²) bound it: the posterior stretches along
        it (sd ``1 / sqrt(1/ω² + K_i/γ²)``) while across it the data pin ``φ_i + κ_ik`` down tightly, and the random
        walks, whose steps match the narrow direction, crossed it so slowly that SAEM's default 300 exploration
        iterations left γ² several SE too high and ω² too low (a 3-occasion oral model, N = 80-400).  None without
        IOV, or when no parameter with IOV has a random effect."""
        if self._iov is None or self.data is None:
            return None
        occ = self._iov
        valid = np.isfinite(occ.labels).astype(float)  # [N, K] (numpy: the lines are constants of a compiled step)
        n, k_occ = valid.shape
        rows = []
        for j, nm in enumerate(occ.names):
            if nm not in self.random_names:
                continue
            v = np.zeros((n, self.latent_dim))
            v[:, self.random_names.index(nm)] = 1.0
            v[:, occ.offset + j * k_occ: occ.offset + (j + 1) * k_occ] = -valid
            rows.append(v)
        return np.stack(rows) if rows else None

    def prior_moments(self, theta: dict[str, Any], units: Any = None) -> tuple[Any, Any]:
        n = self.num_units if units is None else len(units)
        mean, cov = self._mu_r(self._mu(theta, units), n), self.omega_matrix(theta)
        if self._iov is None:
            return mean, cov
        xp, size = self.ops.xp, self._iov.size  # κ: mean 0, variance γ² per slot, independent of η
        var = _occ.moments_sd(theta, self._iov, xp) ** 2
        mean = xp.concatenate([mean, xp.zeros_like(mean[:, :1]) * xp.ones_like(var)], -1)
        top = xp.concatenate([cov, xp.zeros_like(cov[:, :1]) * xp.ones_like(var)], -1)
        bottom = xp.concatenate([xp.zeros_like(var)[:, None] * xp.ones_like(cov[:1, :]),
                                 var[:, None] * self.ops.asarray(np.eye(size))], -1)
        return mean, xp.concatenate([top, bottom], -2)

    # ----- simulation -----------------------------------------------------------------------------
    def simulate(self, theta: dict[str, Any] | None = None, seed: int = 0) -> pd.DataFrame:
        """A copy of the bound table with ``DV`` simulated from the model at ``theta`` (default: initial values)."""
        return _simulation.simulate(self, theta, seed)

    # ----- front doors ------------------------------------------------------------------------------
    def fit(self, data: pd.DataFrame | None = None, engine: str = "saem", *, columns: dict[str, str] | None = None,
            dose: str | None = None, regressors: tuple[str, ...] | list[str] = (), x: str | None = None,
            init: dict[str, Any] | None = None, replicates: int = 1, dispersed_starts: bool | float = False,
            starts: list[dict[str, Any] | None] | None = None, **options: Any):
        """Fit by SAEM (``engine="saem"``) or f-SAEM (``"fsaem"``); returns a FitResult.

        ``data`` with the data options ``columns``, ``dose``, ``regressors``, ``x``, ``covariate_interpolation`` (the
        same as the constructor's; an option given to both with different values is an error).  ``init``: starting
        values by name as in ``fit.params`` (natural scale; e.g. a previous fit's ``params``), overriding those of the
        specification.
        ``options`` go to the engine (``num_iters``, ``num_chains``, ``seed``, ``progress``, ...), except
        ``checkpoint``, ``checkpoint_every``, ``keep`` and ``resume``, which go to its run
        (:meth:`~latentfit.inference.driver.Engine.run`): checkpoints written every ``checkpoint_every`` iterations in
        the folder ``checkpoint``, and a fit interrupted (``KeyboardInterrupt``) or stopped rerun with ``resume=True``
        continues bit for bit (with ``replicates``, one sub-folder per replicate).
        ``distributed=True`` (torch, every process of a ``torchrun`` script passing the same whole table): each process
        fits its contiguous block of individuals with ``rng="per_unit"``, statistics all-reduced in float64
        (:func:`latentfit.integrations.families.nlme_shard`); the estimates equal a one-process ``rng="per_unit"`` fit.
        On JAX (``backend="jax"``, every process after ``jax.distributed.initialize`` passing the same whole table)
        the individuals are sharded over the devices of every process and each ends with the one-process result.
        ``distributed="local"`` (both backends): each process passes only the rows of its own block of individuals,
        so no process reads the whole table (on JAX the blocks hold equally many individuals, padded to the same
        numbers of observations and doses); an individual in the rows of two processes is refused, and the
        estimates equal a one-process ``rng="per_unit"`` fit of the whole table, the processes' blocks in rank order.

        ``replicates=R`` (> 1) runs R independent fits (seeds ``seed``, ``seed + 1``, ...; replicate 0 is the single
        fit), from ``starts`` (one dict of initial values or None per replicate) or, with ``dispersed_starts`` (True,
        or the φ-scale sd), from starts drawn around ``init`` with inflated ω²; it returns the fit with the largest
        log-likelihood (quadrature, else importance sampling) with the table ``fit.replicates`` (seed, logLik, MC SE,
        estimates), and warns (:class:`~latentfit.ConvergenceWarning`) when a replicate ends more than
        max(3 MC SE, 0.5) below the best (:mod:`latentfit.models.nlme.replicates`).
        The numerical step (combined error, parameters without random effect) is warm-started at the
        previous estimate, so 3 Newton steps per iteration are the default here (``newton_steps``; outcome models:
        1).
        The engine runs behind the front door :func:`latentfit.integrations.families.fit_nlme`, reached through a hook
        (``models/`` never imports an engine; see :mod:`latentfit._hooks`).

        Example (saemix's ``theo.saemix`` table: columns ``Id, Dose, Time, Concentration, Weight``):

        >>> import latentfit as lf
        >>> from latentfit.models import nlme
        >>> df = lf.datasets.theophylline(saemix_form=True)
        >>> model = nlme.NLME("one_compartment_oral", {"ka": 1.0, "V": 20.0, "CL": 0.5})
        >>> fit = model.fit(df, columns={"id": "Id", "time": "Time", "dv": "Concentration"}, dose="Dose",
        ...                 seed=0, progress=False)
        >>> sorted(fit.params)
        ['CL', 'V', 'a', 'ka', 'omega2_CL', 'omega2_V', 'omega2_ka']
        >>> print(f"ka = {float(fit.params['ka']):.1f}")
        ka = 1.6
        """
        misplaced = sorted(set(options) & set(MODEL_OPTIONS))
        if misplaced:
            raise ModelSpecificationError(f"{', '.join(misplaced)}: model option(s), given to NLME(...), not to fit() "
                                          f"(fit takes the data, the data options {list(DATA_OPTIONS)}, init= and "
                                          f"the engine's options)")
        # outcome models: one warm-started Newton step per iteration (half the time; estimates within 0.15 SE)
        options.setdefault("newton_steps", 3 if self.outcome is None else 1)
        read = {"columns": columns, "dose": dose, "regressors": regressors, "x": x,
                "covariate_interpolation": options.pop("covariate_interpolation", None)}
        given = any(v not in (None, ()) for v in read.values())
        model = self.bind(data, **read) if data is not None or given else self
        model._require_data()
        if init:
            model = model.with_init(init)
        if options.get("distributed"):  # every process checks the whole table before the fit splits it
            model.check_initial_values()
        # otherwise SAEM's start checks the starting values (on JAX inside its start program: one program fewer)
        if replicates != 1 or starts is not None or dispersed_starts:
            from .replicates import fit_replicates

            return fit_replicates(model, engine, options, replicates, dispersed_starts=dispersed_starts,
                                  starts=starts)
        return fit_nlme(model, engine, options)

    def shard_view(self, ops: Any, offset: int, total: int) -> NLME:
        """This bound model as one process's block of individuals in a data-parallel fit: what the M-steps read from
        the data is every process's (``num_obs``, the residual variance's count, and ``Σ_i X_iᵀ X_i``, the covariate
        GLS's matrix, all-reduced).  Inter-occasion variability and several responses (their M-steps count per
        process) are refused."""
        if self.iov_init or getattr(self, "_resp", None) is not None:
            raise ModelSpecificationError("distributed=True: inter-occasion variability and several responses are not "
                                          "supported yet (their M-steps count occasions/observations per process)")
        view = copy.copy(self)
        view.num_obs = int(round(float(ops.all_sum(ops.asarray(np.array(float(self.num_obs)))))))
        view._xtx = ops.all_sum(self._xtx)
        return view

    def pad_units(self, size: int) -> NLME:
        """This bound model with dummy individuals appended up to ``size`` (copies of the last one:
        :func:`~latentfit.models.nlme.data.pad_individuals`), for a ``distributed="local"`` JAX fit whose blocks differ
        in size; what the M-steps read from the data (the number of observations, ``Σ_i X_iᵀ X_i``) stays the real
        individuals' (the fit gives the dummy ones weight 0)."""
        if size <= self.num_units:
            return self
        if self.iov_init or getattr(self, "_resp", None) is not None:
            raise ModelSpecificationError("distributed='local' with blocks of unequal size: inter-occasion variability "
                                          "and several responses are not supported")
        padded = copy.copy(self)
        padded.pad_units_to = int(size)
        padded = padded.bind()
        padded.params = dict(self.params)  # the starting values (init=) of the model as given
        padded.num_obs, padded._xtx = self.num_obs, self._xtx
        return padded

    def with_init(self, init: dict[str, Any]) -> NLME:
        """A copy of the (bound) model whose starting values are ``init`` (names as in ``fit.params``, natural
        scale: population values, ``beta_*``, ``omega2_*`` or ``Omega``, ``a``, ``b``)."""
        return _binding.with_init(self, init)

    @property
    def pyro_model(self) -> Callable[[], None]:
        """The model as an ordinary Pyro model function (no arguments; data bound).

        Sites: one ``pyro.param`` per estimated parameter (fixed ones are constants), ``phi`` (the
        latent ``[N, 1, d]`` inside plate ``id``), ``DV`` (observed, masked padding).  Built by
        :func:`latentfit.integrations.families.nlme_model`.
        """
        _outcomes.require_gaussian(self, "pyro_model")
        fam = families()
        return fam.nlme_model(self, fam.pyro_ppl())

    def with_ops(self, ops: Any) -> NLME:
        """A copy of the model whose arrays live on the backend ``ops`` (e.g. ``JaxOps()``), data re-bound."""
        new = copy.copy(self)
        new.ops = ops
        if self._table is not None:
            new._bind(self._table.frame())
        return new

    @property
    def numpyro_model(self) -> Callable[[], None]:
        """The model as an ordinary NumPyro model function (no arguments; data bound as JAX arrays).

        The twin of :attr:`pyro_model` (same sites: one ``numpyro.param`` per estimated parameter,
        ``phi`` ``[N, 1, d]`` in plate ``id``, ``DV`` observed with the padding masked), evaluated by a
        JAX copy of this model (:meth:`with_ops`), so a user structural function written with
        ``jax.numpy`` (or with the ``xp`` of the design) works.  Fit it with ``latentfit.numpyro``.
        """
        _outcomes.require_gaussian(self, "numpyro_model")
        fam = families()
        return fam.nlme_model(self, fam.numpyro_ppl())

    def __repr__(self) -> str:
        bound = f"{self.num_units} individuals, {self.num_obs} observations" if self.data is not None else "no data"
        return (f"NLME({self.structural.name}, parameters={self.param_names}, random={self.random_names}, "
                f"{_outcomes.describe(self)}, {bound})")


__all__ = ["NLME", "Parameter"]


def _sub_units(units: Any, block: slice) -> Any:
    """The units ``block`` (a slice of positions) of ``units``: None (all units) gives ``block``; a slice, the
    composed slice; an index array, its entries there."""
    if units is None:
        return block
    if isinstance(units, slice):
        start = units.start or 0
        return slice(start + block.start, start + block.stop)
    return units[block]


def _unit_rows(mu: Any, block: slice) -> Any:
    """μ ``[n, m]`` of the units ``block`` (a ``[m]`` μ, the same for every unit, as is)."""
    return mu if mu.ndim < 2 else mu[block]
