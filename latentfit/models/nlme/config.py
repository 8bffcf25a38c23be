"""NLME model files (TOML) -> :class:`NLME` models, fit options and data, for ``latentfit nlme ...``.

A model file names everything a saemix ``saemixModel`` / ``saemixControl`` call (or a Monolix project) holds::

    [model]
    structural = "oral1cpt"          # library name (aliases below), or file = "model.py" + function = "f"

    [parameters]                     # saemix's psi0 / transform.par / fixed.estim / omega.init
    ka = { init = 1.0 }              # log-normal with a random effect (the default); a bare number works too
    V  = { init = 20.0, omega2 = 1.0 }
    CL = { init = 0.5, transform = "log", random = true, fixed = false }

    [covariates.V]                   # saemix's covariate.model and the covariate rows of psi0
    WT = { transform = "linear", init = 0.0 }     # or WT = "linear"; [covariates] V = "WT" / ["WT", "AGE"]
    # centred: WT = { transform = "log-center", reference = 70 }  (log(WT/70); default: the fitted data's mean)
    # categorical: SEX = { transform = "categorical", levels = ["F", "M"] }  (the reference level first)

    [omega]                          # covariance.model
    structure = "diagonal"           # "diagonal" | "full"; or blocks = [["V", "CL"]]
    # covariances = [["V", "CL", 0.05]]   initial covariances inside the blocks (omega.init's off-diagonal)

    [error]                          # error.model, error.init
    model = "constant"               # constant | proportional | combined | exponential
    a = 1.0
    # several responses (DVID / YTYPE, e.g. PK/PD; nlme.responses): one sub-table per response instead, in the
    # order of the structural model's outputs; dvid = its value in the response column (default: the i-th
    # smallest value); [error] column = "YTYPE" names the response column (default DVID, else YTYPE)
    # [error.conc]
    # model = "proportional"
    # b = 0.1
    # dvid = 1
    # [error.effect]
    # model = "constant"
    # a = 1.0
    # dvid = 2

    [iov]                            # inter-occasion variability (Monolix's occasion level; nlme.occasions)
    parameters = ["CL"]              # κ per (subject, occasion) on these; or { CL = 0.1 } (initial γ²)
    column = "OCC"                   # the occasion column (default "OCC")

    [data]                           # NONMEM names -> columns of the file (defaults: the NONMEM names)
    columns = { ID = "ID", TIME = "TIME", DV = "DV" }
    # dose = "Dose"  (saemix form: one dose per subject at time 0), x = "dose", regressors = ["CONC"],
    # covariate_interpolation = "locf" | "linear" (time-varying covariates)

    [outcome]                        # non-Gaussian data (saemix modeltype="likelihood"; nlme.outcomes), instead
    type = "binary"                  # of [error]: binary | ordinal | poisson | negative_binomial | tte | loglik
    # thresholds = ["alp1", "alp2"]  (ordinal), dispersion = "delta" (negative_binomial),
    # hazard = "weibull" | "constant", scale = "lambda", shape = "beta" (tte: no structural model needed),
    # simulate = "sim" (loglik: a function sim(psi, data, rng) -> DV [N, T] of the [model] file, for simulations and
    # the VPC)
    # joint model (Gaussian and non-Gaussian responses, e.g. PK + a binary event): [error.conc] as above for the
    # Gaussian responses and one sub-table per non-Gaussian response, its outputs after the Gaussian ones'
    # [outcome.ae]
    # type = "binary"
    # dvid = 2

    [engine]                         # saemixControl
    algorithm = "saem"               # or "fsaem"
    iterations = [300, 100]          # K1, K2
    chains = 5                       # default: saemix's rule (about 50 / N per subject)
    seed = 0
    backend = "torch"                # or "jax"
    replicates = 1                   # R > 1: R fits (seeds seed, seed + 1, ...), the best returned, a warning
    dispersed_starts = false         #   when they disagree; true (or a φ-scale sd): replicates start dispersed

    [report]
    title = "..."                    # log_y, vpc_simulations, max_individual_plots, se_method
    # is_proposal = "full"           (the likelihood table's importance sampling: "full", each subject's Laplace
    # is_samples = 5000               law refined by a pilot pass, or "diagonal", saemix's: fit.log_likelihood(...))

A user structural model ``file = "model.py"`` (relative to the model file) defines ``function`` as a function
``f(psi, data) -> predictions [..., N, T]`` (see :class:`NLME`) or a :class:`Structural` (e.g. made by
:func:`~latentfit.models.nlme.ode`); its parameters are those of ``[parameters]``, in that order.

Errors are :class:`ConfigError` (a :class:`~latentfit.ModelSpecificationError`) naming the file, the line
and column where they are known (TOML syntax errors: the parser's position; unknown keys: the key's line)
and, for an unknown key, the allowed ones.  This module imports no backend.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from latentfit.inference.model import DataError, ModelSpecificationError

from .data import DEFAULT_COLUMNS
from .model import NLME
from .responses import ERRORS as RESPONSE_ERRORS
from .spec import ERRORS, TRANSFORMS, Parameter, level_key
from .structural import LIBRARY, Structural

#: short names of the structural library (saemix / Monolix style) -> library names
ALIASES = {
    "oral1cpt": "one_compartment_oral", "oral1cpt_lag": "one_compartment_oral_lag",
    "bolus1cpt": "one_compartment_bolus", "infusion1cpt": "one_compartment_infusion",
    "oral2cpt": "two_compartment_oral", "bolus2cpt": "two_compartment_bolus",
}
SECTIONS = {
    "model": ("structural", "file", "function", "description"),
    "parameters": None,  # parameter names
    "covariates": None,  # parameter names
    "omega": ("structure", "blocks", "covariances"),
    "error": ("model", "a", "b"),
    "iov": ("parameters", "column"),
    "data": ("columns", "dose", "x", "regressors", "covariate_interpolation"),
    "engine": ("algorithm", "iterations", "chains", "seed", "backend", "replicates", "dispersed_starts"),
    "outcome": ("type", "thresholds", "dispersion", "hazard", "scale", "shape", "simulate"),
    "report": ("title", "log_y", "vpc_simulations", "max_individual_plots", "se_method", "is_proposal", "is_samples"),
}
PARAMETER_KEYS = ("init", "transform", "random", "fixed", "omega2")
RESPONSE_KEYS = ("model", "a", "b", "dvid")
COVARIATE_KEYS = ("transform", "init", "reference", "levels")
ENGINES = ("saem", "fsaem")
REPORT_DEFAULTS: dict[str, Any] = {"title": None, "log_y": False, "vpc_simulations": 500,
                                   "max_individual_plots": 36, "se_method": "lin", "is_proposal": "full",
                                   "is_samples": 5000}


class ConfigError(ModelSpecificationError):
    """An error in a model file, with its position (``path``, ``line``, ``column``: None where unknown)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        self.path, self.line, self.column, self.detail = path, line, column, message
        where = str(path) if path is not None else "model file"
        if line is not None:
            where += f", line {line}" + (f", column {column}" if column is not None else "")
        super().__init__(f"{where}: {message}")


def _toml_module() -> Any:
    """``tomllib`` (Python >= 3.11) or the ``tomli`` package (Python 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ModuleNotFoundError as err:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError("reading a TOML model file on Python 3.10 needs the 'tomli' package: pip install tomli "
                          "(Python >= 3.11 has tomllib built in)") from err
    return tomli


def _find_line(text: str, table: tuple[str, ...], key: str | None = None) -> int | None:
    """Best-effort line (1-based) of ``key`` in ``[table]`` (or of the table header when ``key`` is None).

    Handles ``[a.b]`` headers, ``b = { key = ... }`` inline tables under ``[a]`` and dotted keys ``b.key = ...``.
    """
    norm = lambda s: ".".join(p.strip().strip('"').strip("'") for p in s.split("."))  # noqa: E731
    want = ".".join(table)
    lines = text.splitlines()
    current = ""
    key_re = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""") if key is not None else None
    parent, last = ".".join(table[:-1]), table[-1] if table else ""
    inline_re = re.compile(rf"""^\s*["']?{re.escape(last)}["']?\s*[.=]""") if table else None
    fallback = None
    for k, line in enumerate(lines, 1):
        stripped = line.split("#", 1)[0].strip()
        m = re.match(r"^\[+([^\]]+)\]+", stripped)
        if m:
            current = norm(m.group(1))
            if current == want if key is None else current == f"{want}.{key}" if want else current == key:
                return k  # the table's header, or the header of the key's own sub-table ([covariates.Cl])
            continue
        if key_re is None:
            if inline_re is not None and current == parent and inline_re.match(stripped):
                return k
            continue
        if current == want and key_re.match(stripped):
            return k
        if (inline_re is not None and current == parent and inline_re.match(stripped)
                and re.search(rf"""[{{,.\s]["']?{re.escape(key)}["']?\s*=""", stripped)):
            return k
        if fallback is None and key_re.match(stripped):
            fallback = k
    return fallback


@dataclass
class NLMEConfig:
    """A parsed model file: the arguments of :class:`NLME`, the data options and the engine options."""

    structural: Any
    parameters: dict[str, Parameter]
    covariates: dict[str, dict[str, str | None]] = field(default_factory=dict)
    covariate_init: dict[str, dict[str, float]] = field(default_factory=dict)
    #: covariate column -> the value it is centred at, or its levels (the reference first): NLME's covariate_reference
    covariate_reference: dict[str, Any] = field(default_factory=dict)
    omega: Any = "diagonal"
    omega_covariances: list[tuple[str, str, float]] = field(default_factory=list)
    error: Any = "constant"  # an error model, or {response: error model} (several responses)
    error_init: dict[str, Any] = field(default_factory=dict)
    response: str | None = None  # the response column (several responses)
    dvid: dict[str, float] | None = None  # response -> its value in the response column
    iov: dict[str, float] | None = None  # parameter -> initial γ² (inter-occasion variability)
    occasion: str | None = None  # the occasion column
    outcome: Any = None
    data_options: dict[str, Any] = field(default_factory=dict)
    engine: str = "saem"
    num_iters: tuple[int, int] = (300, 100)
    num_chains: int | None = None
    seed: int = 0
    backend: str = "torch"
    replicates: int = 1
    dispersed_starts: bool | float = False
    report: dict[str, Any] = field(default_factory=lambda: dict(REPORT_DEFAULTS))
    description: str = ""
    text: str = field(default="", repr=False)
    path: Path | None = None

    @property
    def structural_name(self) -> str:
        s = self.structural
        return s if isinstance(s, str) else getattr(s, "name", getattr(s, "__name__", "user"))

    def model(self, data: pd.DataFrame | None = None) -> NLME:
        """The :class:`NLME` of this file (bound to ``data`` when given); library errors name the file."""
        try:
            model = NLME(self.structural, dict(self.parameters), covariates=self.covariates or None,
                         omega=self.omega, error=self.error, error_init=self.error_init or None,
                         covariate_init=self.covariate_init or None,
                         covariate_reference=self.covariate_reference or None, backend=self.backend, data=data,
                         iov=self.iov, occasion=self.occasion, response=self.response, dvid=self.dvid,
                         outcome=self.outcome,
                         **self.data_options)
            if self.omega_covariances and data is not None:
                model = model.with_init({"Omega": self.omega_init(model)})
            return model
        except DataError:
            raise
        except ModelSpecificationError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(str(err), self.path) from None

    def omega_init(self, model: NLME) -> Any:
        """Initial Ω ``[d, d]`` (order of ``model.random_names``): the ``omega2`` of the parameters on the diagonal,
        ``[omega] covariances`` off it."""
        import numpy as np

        names = model.random_names
        om = np.diag([self.parameters[n].omega2 for n in names])
        for a, b, v in self.omega_covariances:
            i, j = names.index(a), names.index(b)
            om[i, j] = om[j, i] = v
        if not np.all(np.linalg.eigvalsh(om) > 0):
            raise ConfigError(f"[omega] covariances: the initial Ω {om.round(6).tolist()} (order {names}) is not "
                              f"positive definite: lower the covariances or raise the parameters' omega2", self.path,
                              _find_line(self.text, ("omega",), "covariances"))
        return om

    def fit_options(self, progress: bool = True) -> dict[str, Any]:
        """Keyword arguments of :meth:`NLME.fit` (engine, iterations, chains, seed, progress bar)."""
        opts: dict[str, Any] = {"engine": self.engine, "num_iters": tuple(self.num_iters), "seed": int(self.seed),
                                "progress": progress}
        if self.num_chains is not None:
            opts["num_chains"] = int(self.num_chains)
        if self.replicates != 1 or self.dispersed_starts:
            opts["replicates"] = int(self.replicates)
            opts["dispersed_starts"] = self.dispersed_starts
        return opts


class _Reader:
    """Validation helpers that know the file's text (for line numbers)."""

    def __init__(self, text: str, path: Path | None) -> None:
        self.text, self.path = text, path

    def error(self, message: str, table: tuple[str, ...] = (), key: str | None = None) -> ConfigError:
        line = _find_line(self.text, table, key) if (table or key) else None
        return ConfigError(message, self.path, line)

    def keys(self, table: dict[str, Any], where: tuple[str, ...], allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                label = "[" + ".".join(where) + "]"
                raise self.error(f"{label}: unknown key {key!r}; allowed keys are {', '.join(allowed)}", where, key)

    def table(self, value: Any, where: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"[{'.'.join(where)}] must be a table (key = value lines), got {value!r}",
                             where[:-1], where[-1])
        return value

    def number(self, value: Any, where: tuple[str, ...], key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"[{'.'.join(where)}] {key} must be a number, got {value!r}", where, key)
        return float(value)

    def integer(self, value: Any, where: tuple[str, ...], key: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(f"[{'.'.join(where)}] {key} must be an integer >= {minimum}, got {value!r}", where, key)
        return int(value)

    def string(self, value: Any, where: tuple[str, ...], key: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str):
            raise self.error(f"[{'.'.join(where)}] {key} must be a string, got {value!r}", where, key)
        if choices is not None and value.lower() not in choices:
            raise self.error(f"[{'.'.join(where)}] {key} = {value!r}: use one of {', '.join(choices)}", where, key)
        return value

    def boolean(self, value: Any, where: tuple[str, ...], key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(f"[{'.'.join(where)}] {key} must be true or false, got {value!r}", where, key)
        return value


def _load_function(path: Path, name: str, reader: _Reader) -> Any:
    """``name`` from the Python file ``path`` (a function f(psi, data) or a Structural)."""
    if not path.is_file():
        raise reader.error(f"[model] file {str(path)!r} does not exist", ("model",), "file")
    spec = importlib.util.spec_from_file_location(f"latentfit_user_model_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's code: say where it failed
        raise reader.error(f"[model] file {str(path)!r} failed to import: {type(err).__name__}: {err}",
                           ("model",), "file") from None
    if not hasattr(module, name):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise reader.error(f"[model] function {name!r} is not defined in {str(path)!r} (callables there: {found})",
                           ("model",), "function")
    fn = getattr(module, name)
    if not (callable(fn) or isinstance(fn, Structural)):
        raise reader.error(f"[model] {name!r} in {str(path)!r} is not a function f(psi, data)", ("model",), "function")
    return fn


def _structural(raw: dict[str, Any], reader: _Reader, base: Path) -> tuple[Any, str]:
    reader.keys(raw, ("model",), SECTIONS["model"])
    desc = raw.get("description", "")
    if "structural" in raw and ("file" in raw or "function" in raw):
        raise reader.error("[model]: give either structural = \"<library name>\" or file = ... and function = ..., "
                           "not both", ("model",), "structural")
    if "structural" in raw:
        name = reader.string(raw["structural"], ("model",), "structural")
        lib = ALIASES.get(name, name)
        if lib not in LIBRARY:
            names = sorted(set(LIBRARY) | set(ALIASES))
            raise reader.error(f"[model] structural = {name!r} is not in the library; use one of {', '.join(names)}, "
                               f"or file = \"model.py\" with function = \"f\" for your own f(psi, data)",
                               ("model",), "structural")
        return lib, desc
    if "file" in raw or "function" in raw:
        if "file" not in raw or "function" not in raw:
            missing = "file" if "file" not in raw else "function"
            raise reader.error(f"[model]: a user model needs both file = \"model.py\" and function = \"f\" "
                               f"({missing} is missing)", ("model",))
        file = reader.string(raw["file"], ("model",), "file")
        fname = reader.string(raw["function"], ("model",), "function")
        path = Path(file) if Path(file).is_absolute() else base / file
        return _load_function(path, fname, reader), desc
    raise reader.error("[model] needs structural = \"<library name>\" (e.g. \"oral1cpt\") or file = \"model.py\" "
                       "with function = \"f\"", ("model",))


def _parameters(raw: Any, reader: _Reader) -> dict[str, Parameter]:
    table = reader.table(raw, ("parameters",))
    if not table:
        raise reader.error("[parameters] is empty: give each parameter of the structural model an initial value",
                           ("parameters",))
    out = {}
    for name, spec in table.items():
        where = ("parameters", name)
        if not isinstance(spec, dict):
            out[name] = Parameter(reader.number(spec, ("parameters",), name))
            continue
        reader.keys(spec, where, PARAMETER_KEYS)
        if "init" not in spec:
            raise reader.error(f"[parameters.{name}] needs init = <initial value>", ("parameters",), name)
        kw: dict[str, Any] = {"init": reader.number(spec["init"], where, "init")}
        if "transform" in spec:
            kw["transform"] = reader.string(spec["transform"], where, "transform",
                                            TRANSFORMS + ("lognormal", "log-normal", "identity", "none"))
        for key in ("random", "fixed"):
            if key in spec:
                kw[key] = reader.boolean(spec[key], where, key)
        if "omega2" in spec:
            kw["omega2"] = reader.number(spec["omega2"], where, "omega2")
        out[name] = Parameter(**kw)
    return out


def _covariates(raw: Any, reader: _Reader, params: list[str]) -> tuple[dict[str, dict[str, str | None]],
                                                                        dict[str, dict[str, float]], dict[str, Any]]:
    table = reader.table(raw, ("covariates",))
    covs: dict[str, dict[str, str | None]] = {}
    inits: dict[str, dict[str, float]] = {}
    references: dict[str, Any] = {}
    for pname, spec in table.items():
        if pname not in params:
            raise reader.error(f"[covariates] {pname!r} is not a parameter; parameters are {', '.join(params)}",
                               ("covariates",), pname)
        where = ("covariates", pname)
        if isinstance(spec, str):
            covs[pname] = {spec: None}
            continue
        if isinstance(spec, list):
            if not all(isinstance(c, str) for c in spec):
                raise reader.error(f"[covariates] {pname} must list column names, got {spec!r}", ("covariates",),
                                   pname)
            covs[pname] = {c: None for c in spec}
            continue
        if not isinstance(spec, dict):
            raise reader.error(f"[covariates] {pname} must be a column name, a list of names or a table "
                               f"column = transform, got {spec!r}", ("covariates",), pname)
        covs[pname] = {}
        for col, cspec in spec.items():
            transform: str | None = None
            if isinstance(cspec, str):
                transform = cspec
            elif isinstance(cspec, dict):
                reader.keys(cspec, (*where, col), COVARIATE_KEYS)
                if "transform" in cspec:
                    transform = reader.string(cspec["transform"], (*where, col), "transform")
                if "init" in cspec:
                    init = cspec["init"]
                    if isinstance(init, dict):  # categorical: one coefficient per non-reference level
                        for level, v in init.items():
                            inits.setdefault(pname, {})[f"{col}_{level}"] = reader.number(v, (*where, col), level)
                    else:
                        inits.setdefault(pname, {})[col] = reader.number(init, (*where, col), "init")
                if "reference" in cspec:
                    references[col] = reader.number(cspec["reference"], (*where, col), "reference")
                if "levels" in cspec:
                    levels = cspec["levels"]
                    if not isinstance(levels, list) or len(levels) < 2 \
                            or not all(isinstance(v, str | int | float) for v in levels):
                        raise reader.error(f"[covariates.{pname}] {col}: levels must list the covariate's levels "
                                           f"(the reference level first), got {levels!r}", (*where, col), "levels")
                    references[col] = tuple(levels)
            else:
                raise reader.error(f"[covariates.{pname}] {col} must be a transform name or a table with transform "
                                   f"and init, got {cspec!r}", where, col)
            covs[pname][col] = transform
    return covs, inits, references


def _covariances(raw: Any, reader: _Reader, blocks: list[tuple[str, ...]]) -> list[tuple[str, str, float]]:
    """``[[name, name, value], ...]`` checked against the blocks (``blocks``: the Ω structure's blocks)."""
    bad = reader.error(f"[omega] covariances must be a list of [\"name\", \"name\", value], e.g. "
                       f"[[\"V\", \"CL\", 0.05]], got {raw!r}", ("omega",), "covariances")
    if not isinstance(raw, list):
        raise bad
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], str)):
            raise bad
        a, b = item[0], item[1]
        value = reader.number(item[2], ("omega",), "covariances")
        if a == b or not any(a in blk and b in blk for blk in blocks):
            raise reader.error(f"[omega] covariances: {a!r} and {b!r} are not two parameters of one Ω block "
                               f"(blocks: {[list(b) for b in blocks if len(b) > 1]}); variances are the parameters' "
                               f"omega2", ("omega",), "covariances")
        out.append((a, b, value))
    return out


def _omega(raw: Any, reader: _Reader) -> Any:
    table = reader.table(raw, ("omega",))
    reader.keys(table, ("omega",), SECTIONS["omega"])
    if "blocks" in table:
        blocks = table["blocks"]
        if not isinstance(blocks, list) or not all(
                isinstance(b, str) or (isinstance(b, list) and all(isinstance(n, str) for n in b)) for b in blocks):
            raise reader.error(f"[omega] blocks must be a list of lists of parameter names, e.g. [[\"V\", \"CL\"]], "
                               f"got {blocks!r}", ("omega",), "blocks")
        if table.get("structure", "blocks") not in ("blocks", "block"):
            raise reader.error("[omega]: blocks = ... goes with structure = \"blocks\" (or no structure)", ("omega",),
                               "structure")
        return [tuple(b) if isinstance(b, list) else (b,) for b in blocks]
    return reader.string(table.get("structure", "diagonal"), ("omega",), "structure", ("diagonal", "full")).lower()


def _error(raw: Any, reader: _Reader) -> tuple[Any, dict[str, Any], str | None, dict[str, float] | None]:
    """``[error]`` -> (error model(s), initial values, response column, DVID values): one error model, or one
    sub-table ``[error.<response>]`` per response (several responses)."""
    table = reader.table(raw, ("error",))
    responses = {k: v for k, v in table.items() if isinstance(v, dict)}
    if not responses:
        reader.keys(table, ("error",), SECTIONS["error"])
        model = reader.string(table.get("model", "constant"), ("error",), "model", ERRORS).lower()
        init = {k: reader.number(table[k], ("error",), k) for k in ("a", "b") if k in table}
        return model, init, None, None
    reader.keys({k: v for k, v in table.items() if k not in responses}, ("error",), ("column",))
    models: dict[str, str] = {}
    inits: dict[str, Any] = {}
    dvid: dict[str, float] = {}
    for name, sub in responses.items():
        where = ("error", name)
        reader.keys(sub, where, RESPONSE_KEYS)
        models[name] = reader.string(sub.get("model", "constant"), where, "model", RESPONSE_ERRORS).lower()
        init = {k: reader.number(sub[k], where, k) for k in ("a", "b") if k in sub}
        if init:
            inits[name] = init
        if "dvid" in sub:
            dvid[name] = reader.number(sub["dvid"], where, "dvid")
    if dvid and len(dvid) != len(responses):
        missing = [n for n in responses if n not in dvid]
        raise reader.error(f"[error.<response>] dvid: give it for every response or for none (missing for "
                           f"{', '.join(missing)})", ("error", missing[0]))
    column = reader.string(table["column"], ("error",), "column") if "column" in table else None
    return models, inits, column, dvid or None


def _iov(raw: Any, reader: _Reader, params: list[str]) -> tuple[dict[str, float], str | None]:
    """``[iov]`` -> ({parameter: initial γ²}, occasion column)."""
    from .occasions import GAMMA2_INIT

    w = ("iov",)
    table = reader.table(raw, w)
    reader.keys(table, w, SECTIONS["iov"])
    if "parameters" not in table:
        raise reader.error("[iov] needs parameters = [\"CL\", ...] (or { CL = 0.1 }: initial inter-occasion "
                           "variances)", w)
    spec = table["parameters"]
    spec = [spec] if isinstance(spec, str) else spec
    if isinstance(spec, list) and all(isinstance(p, str) for p in spec):
        out = dict.fromkeys(spec, GAMMA2_INIT)
    elif isinstance(spec, dict):
        out = {p: reader.number(v, w, p) for p, v in spec.items()}
    else:
        raise reader.error(f"[iov] parameters must be a list of parameter names or a table name = initial γ², got "
                           f"{spec!r}", w, "parameters")
    unknown = [p for p in out if p not in params]
    if unknown:
        raise reader.error(f"[iov] {unknown[0]!r} is not a parameter; parameters are {', '.join(params)}", w,
                           "parameters")
    column = reader.string(table["column"], w, "column") if "column" in table else None
    return out, column


def _outcome(raw: Any, reader: _Reader) -> tuple[Any, dict[str, float]]:
    """``[outcome]`` -> (an :class:`~latentfit.models.nlme.outcomes.Outcome`, None for ``type = "gaussian"``; {}), or
    one sub-table ``[outcome.<response>]`` per non-Gaussian response of a joint model -> (its outcomes, their DVID
    values)."""
    from .outcomes import make_outcome

    table = reader.table(raw, ("outcome",))
    responses = {k: v for k, v in table.items() if isinstance(v, dict)}
    if not responses:
        return _one_outcome(table, reader, ("outcome",), SECTIONS["outcome"]), {}
    reader.keys({k: v for k, v in table.items() if k not in responses}, ("outcome",), ())
    parts, dvid = {}, {}
    for name, sub in responses.items():
        where = ("outcome", name)
        if "dvid" in sub:
            dvid[name] = reader.number(sub["dvid"], where, "dvid")
        parts[name] = _one_outcome({k: v for k, v in sub.items() if k != "dvid"}, reader, where,
                                   SECTIONS["outcome"] + ("dvid",))
        if parts[name] is None:
            raise reader.error(f"[outcome.{name}]: a Gaussian response goes in [error.{name}]", where, "type")
    return make_outcome(parts), dvid


def _one_outcome(table: dict[str, Any], reader: _Reader, w: tuple[str, ...], allowed: tuple[str, ...]) -> Any:
    """One outcome's table (``type`` and its options) -> an Outcome (None for ``type = "gaussian"``)."""
    from .outcomes import OUTCOMES, LogLik, make_outcome

    reader.keys(table, w, allowed)
    if "type" not in table:
        raise reader.error(f"[{'.'.join(w)}] needs type = one of {', '.join(sorted(OUTCOMES))}", w)
    kind = reader.string(table["type"], w, "type", tuple(OUTCOMES) + ("gaussian",)).lower()
    options, simulate = {}, None
    for key, value in table.items():
        if key == "simulate":
            if OUTCOMES.get(kind) is not LogLik:
                raise reader.error(f"[{'.'.join(w)}] simulate = ... names the simulator of a user log-likelihood "
                                   f"(type = \"loglik\"); the built-in outcomes simulate themselves", w, key)
            simulate = reader.string(value, w, key)
        elif key == "thresholds":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise reader.error(f"[{'.'.join(w)}] thresholds must list parameter names, e.g. [\"alp1\", "
                                   f"\"alp2\"], got {value!r}", w, key)
            options[key] = tuple(value)
        elif key != "type":
            options[key] = reader.string(value, w, key)
    try:
        out = make_outcome(kind, **options)
    except ModelSpecificationError as err:
        raise reader.error(f"[{'.'.join(w)}]: {err}", w, next(iter(options), "type")) from None
    if simulate is not None:
        out.simulate_name = simulate  # loaded from the [model] file by _attach_simulators
    return out


def _attach_simulators(outcome: Any, model_raw: dict[str, Any], reader: _Reader, base: Path) -> None:
    """``simulate = "sim"`` of a user log-likelihood (``[outcome]`` or ``[outcome.<response>]``): the function ``sim``
    of the ``[model]`` file becomes its ``simulate_fn``."""
    from .outcomes import Joint

    parts = outcome.outcomes.items() if isinstance(outcome, Joint) else [(None, outcome)]
    for name, out in parts:
        fname = getattr(out, "simulate_name", None)
        if fname is None:
            continue
        where = ("outcome",) if name is None else ("outcome", name)
        if "file" not in model_raw:
            raise reader.error(f"[{'.'.join(where)}] simulate = {fname!r} names a function of the [model] file; "
                               f"give [model] file = \"model.py\" (with function = ...) defining it", where,
                               "simulate")
        file = reader.string(model_raw["file"], ("model",), "file")
        out.simulate_fn = _load_function(Path(file) if Path(file).is_absolute() else base / file, fname, reader)


def _data(raw: Any, reader: _Reader) -> dict[str, Any]:
    table = reader.table(raw, ("data",))
    reader.keys(table, ("data",), SECTIONS["data"])
    out: dict[str, Any] = {}
    if "columns" in table:
        cols = reader.table(table["columns"], ("data", "columns"))
        roles = {}
        allowed = tuple(r.upper() for r in DEFAULT_COLUMNS)
        for name, column in cols.items():
            if name.upper() not in allowed:
                raise reader.error(f"[data.columns]: unknown NONMEM name {name!r}; allowed names are "
                                   f"{', '.join(allowed)}", ("data", "columns"), name)
            roles[name.lower()] = reader.string(column, ("data", "columns"), name)
        out["columns"] = roles
    for key in ("dose", "x"):
        if key in table:
            out[key] = reader.string(table[key], ("data",), key)
    if "covariate_interpolation" in table:
        out["covariate_interpolation"] = reader.string(table["covariate_interpolation"], ("data",),
                                                       "covariate_interpolation", ("locf", "linear")).lower()
    if "regressors" in table:
        regs = table["regressors"]
        regs = [regs] if isinstance(regs, str) else regs
        if not isinstance(regs, list) or not all(isinstance(r, str) for r in regs):
            raise reader.error(f"[data] regressors must be a list of column names, got {regs!r}", ("data",),
                               "regressors")
        out["regressors"] = tuple(regs)
    return out


def _engine(raw: Any, reader: _Reader, cfg: NLMEConfig) -> None:
    table = reader.table(raw, ("engine",))
    w = ("engine",)
    reader.keys(table, w, SECTIONS["engine"])
    if "algorithm" in table:
        cfg.engine = reader.string(table["algorithm"], w, "algorithm", ENGINES + ("f-saem",)).lower()
    if "iterations" in table:
        it = table["iterations"]
        if not (isinstance(it, list) and len(it) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in it)) or it[0] < 1 or it[1] < 0:
            raise reader.error(f"[engine] iterations must be [K1, K2] (two integers, K1 >= 1, K2 >= 0), got {it!r}",
                               w, "iterations")
        cfg.num_iters = (int(it[0]), int(it[1]))
    if "chains" in table:
        cfg.num_chains = reader.integer(table["chains"], w, "chains", 1)
    if "seed" in table:
        cfg.seed = reader.integer(table["seed"], w, "seed", 0)
    if "backend" in table:
        cfg.backend = reader.string(table["backend"], w, "backend", ("torch", "jax")).lower()
    if "replicates" in table:
        cfg.replicates = reader.integer(table["replicates"], w, "replicates", 1)
    if "dispersed_starts" in table:
        d = table["dispersed_starts"]
        if not isinstance(d, bool) and (not isinstance(d, int | float) or d < 0):
            raise reader.error(f"[engine] dispersed_starts must be true, false or a scale >= 0 (the φ-scale sd of "
                               f"the starts), got {d!r}", w, "dispersed_starts")
        cfg.dispersed_starts = d if isinstance(d, bool) else float(d)


def _report(raw: Any, reader: _Reader) -> dict[str, Any]:
    table = reader.table(raw, ("report",))
    w = ("report",)
    reader.keys(table, w, SECTIONS["report"])
    out = dict(REPORT_DEFAULTS)
    if "title" in table:
        out["title"] = reader.string(table["title"], w, "title")
    if "log_y" in table:
        out["log_y"] = reader.boolean(table["log_y"], w, "log_y")
    for key in ("vpc_simulations", "max_individual_plots", "is_samples"):
        if key in table:
            out[key] = reader.integer(table[key], w, key, 1)
    if "se_method" in table:
        out["se_method"] = reader.string(table["se_method"], w, "se_method", ("lin", "sa")).lower()
    if "is_proposal" in table:
        out["is_proposal"] = reader.string(table["is_proposal"], w, "is_proposal", ("diagonal", "full")).lower()
    return out


def parse_config(text: str, path: str | Path | None = None, base_dir: str | Path | None = None, *,
                 backend: str | None = None) -> NLMEConfig:
    """A model file's text -> :class:`NLMEConfig` (``base_dir``: where ``file = ...`` is looked up).

    ``backend`` (the command line's ``--backend``) replaces the file's ``[engine] backend`` before the model is built
    to check the file: a JAX run then never imports torch (~1 s), nor a torch run JAX."""
    path = Path(path) if path is not None else None
    base = Path(base_dir) if base_dir is not None else (path.parent if path is not None else Path.cwd())
    toml = _toml_module()
    try:
        raw = toml.loads(text)
    except toml.TOMLDecodeError as err:
        msg = str(err)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line = getattr(err, "lineno", None) or (int(m.group(1)) if m else None)
        col = getattr(err, "colno", None) or (int(m.group(2)) if m else None)
        detail = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", msg)
        raise ConfigError(f"invalid TOML: {detail}", path, line, col) from None
    reader = _Reader(text, path)
    for key in raw:
        if key not in SECTIONS:
            line = _find_line(text, (key,)) or _find_line(text, (), key)
            raise ConfigError(f"unknown section [{key}]; allowed sections are "
                              f"{', '.join('[' + s + ']' for s in SECTIONS)}", path, line)
    outcome, outcome_dvid = _outcome(raw["outcome"], reader) if "outcome" in raw else (None, {})
    no_structural = outcome is not None and not outcome.uses_prediction  # time-to-event: the hazard's parameters
    for required in ("parameters",) if no_structural else ("model", "parameters"):
        if required not in raw:
            raise ConfigError(f"the [{required}] section is missing (see examples/theophylline.toml)", path)
    if no_structural and not {"structural", "file", "function"} & set(reader.table(raw.get("model", {}), ("model",))):
        structural, desc = None, str(raw.get("model", {}).get("description", ""))
    else:
        structural, desc = _structural(reader.table(raw["model"], ("model",)), reader, base)
    if outcome is not None:
        _attach_simulators(outcome, reader.table(raw.get("model", {}), ("model",)), reader, base)
    parameters = _parameters(raw["parameters"], reader)
    if isinstance(structural, str):
        expected = list(LIBRARY[structural]().parameters)
    elif isinstance(structural, Structural):
        expected = list(structural.parameters)
    else:
        expected = list(parameters)
    if outcome is not None:  # the outcome's own parameters (thresholds, dispersion, hazard scale and shape)
        expected += [p for p in outcome.parameters if p not in expected]
    missing = [p for p in expected if p not in parameters]
    extra = [p for p in parameters if p not in expected]
    if missing:
        raise reader.error(f"[parameters]: missing parameter(s) {', '.join(missing)} of the structural model "
                           f"{structural if isinstance(structural, str) else getattr(structural, 'name', outcome)!r} "
                           f"(its parameters: "
                           f"{', '.join(expected)})", ("parameters",))
    if extra:
        raise reader.error(f"[parameters]: unknown parameter {extra[0]!r}; the structural model's parameters are "
                           f"{', '.join(expected)}", ("parameters",), extra[0])
    # the library's order (the order of the model's parameters and of its Ω)
    parameters = {p: parameters[p] for p in expected}
    cfg = NLMEConfig(structural=structural, parameters=parameters, description=desc, text=text, path=path,
                     outcome=outcome)
    if "covariates" in raw:
        cfg.covariates, cfg.covariate_init, cfg.covariate_reference = _covariates(raw["covariates"], reader,
                                                                                  expected)
    if "omega" in raw:
        cfg.omega = _omega(raw["omega"], reader)
        if "covariances" in raw["omega"]:
            random = [p for p in expected if parameters[p].random]
            blocks = ([tuple(random)] if cfg.omega == "full" else [] if cfg.omega == "diagonal" else cfg.omega)
            cfg.omega_covariances = _covariances(raw["omega"]["covariances"], reader, blocks)
    if "error" in raw:
        cfg.error, cfg.error_init, cfg.response, cfg.dvid = _error(raw["error"], reader)
    if outcome_dvid:  # a joint model: the DVID values of its non-Gaussian responses beside the Gaussian ones'
        cfg.dvid = {**(cfg.dvid or {}), **outcome_dvid}
    if "iov" in raw:
        cfg.iov, cfg.occasion = _iov(raw["iov"], reader, expected)
    if "data" in raw:
        cfg.data_options = _data(raw["data"], reader)
    if "engine" in raw:
        _engine(raw["engine"], reader, cfg)
    if backend is not None:
        cfg.backend = backend
    if "report" in raw:
        cfg.report = _report(raw["report"], reader)
    if outcome is not None and "se_method" not in raw.get("report", {}):
        cfg.report["se_method"] = "sa"  # no linearisation without a Gaussian residual: Louis' formula
    cfg.model()  # the library's own checks (transforms, initial values, Ω blocks), reported against the file
    return cfg


def load_config(path: str | Path, *, backend: str | None = None) -> NLMEConfig:
    """Read and parse a model file (see the module docstring; ``backend``: :func:`parse_config`'s)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such model file", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the model file: {err}", path) from None
    return parse_config(text, path, backend=backend)


def read_table(path: str | Path) -> pd.DataFrame:
    """A NONMEM / saemix data file (CSV; ``.`` is a missing value, as in NONMEM) as a DataFrame.

    Raises :class:`~latentfit.DataError` for a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        df = pd.read_csv(path, na_values=["."], skipinitialspace=True)
        names = [str(c).strip() for c in pd.read_csv(path, nrows=1, header=None, skipinitialspace=True,
                                                      dtype=str).iloc[0]]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV table ({str(err).strip()})") from None
    seen: dict[str, int] = {}
    for k, name in enumerate(names):  # pandas would read a second 'DV' as 'DV.1': the user's file has no such column
        if name in seen:
            raise DataError(f"{path}, line 1: column {name!r} appears twice (columns {seen[name] + 1} and {k + 1}); "
                            f"rename or remove one")
        seen[name] = k
    df.columns = [str(c).strip() for c in df.columns]
    return df


def prepare_design(df: pd.DataFrame, data_options: dict[str, Any]) -> pd.DataFrame:
    """A design table for simulation: the observation rows (not doses, ``MDV`` ≠ 1) get ``DV = 0`` where it is
    empty or absent, so that they count as sampling times (their values are then simulated)."""
    import numpy as np

    cols = {**DEFAULT_COLUMNS, **(data_options.get("columns") or {})}
    out = df.copy()
    dv = cols["dv"]
    if dv not in out.columns:
        out[dv] = np.nan
    values = pd.to_numeric(out[dv], errors="coerce")
    n = len(out)
    amt = (pd.to_numeric(out[cols["amt"]], errors="coerce").fillna(0.0) if cols["amt"] in out
           else pd.Series(0.0, index=out.index))
    if cols["evid"] in out:
        is_dose = pd.to_numeric(out[cols["evid"]], errors="coerce").fillna(0).to_numpy() != 0
    else:
        is_dose = amt.to_numpy() > 0
    mdv = (pd.to_numeric(out[cols["mdv"]], errors="coerce").fillna(0).to_numpy() == 1 if cols["mdv"] in out
           else np.zeros(n, dtype=bool))
    sample = ~is_dose & ~mdv & values.isna().to_numpy() & out[dv].isna().to_numpy()
    out[dv] = values.where(~sample, 0.0) if sample.any() else out[dv]
    return out


def read_estimates(path: str | Path, model: NLME) -> dict[str, Any]:
    """Estimates written by ``latentfit nlme fit`` (``estimates.csv``: columns ``parameter, estimate``) as the
    values of ``model.params`` (``Omega[i,j]`` entries reassembled); a missing or unknown name is a
    :class:`ConfigError` naming it."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        path = path / "estimates.csv"
    if not path.is_file():
        raise ConfigError("no such estimates file (the estimates.csv written by 'latentfit nlme fit')", path)
    df = pd.read_csv(path)
    if not {"parameter", "estimate"} <= set(df.columns):
        raise ConfigError(f"an estimates file needs the columns 'parameter' and 'estimate'; it has {list(df.columns)}",
                          path)
    values = dict(zip(df["parameter"].astype(str), df["estimate"].astype(float)))
    out: dict[str, Any] = {}
    used = set()
    for name, info in model.params.items():
        shape = np.shape(model.ops.to_numpy(info.value))
        if shape == ():
            if name not in values:
                raise ConfigError(f"parameter {name!r} of the model is not in the estimates (they have "
                                  f"{', '.join(values)}): were they written for this model file?", path)
            out[name] = values[name]
            used.add(name)
            continue
        arr = np.empty(shape)
        for idx in np.ndindex(shape):
            label = f"{name}[{','.join(map(str, idx))}]"
            if label not in values:
                raise ConfigError(f"entry {label!r} of the model is not in the estimates: were they written for this "
                                  f"model file?", path)
            arr[idx] = values[label]
            used.add(label)
        out[name] = arr
    unknown = [k for k in values if k not in used]
    if unknown:
        raise ConfigError(f"the estimates have parameter(s) {', '.join(unknown)} that the model has not (its "
                          f"parameters: {', '.join(model.params)}): were they written for this model file?", path)
    return out


def read_covariate_reference(estimates: str | Path, cfg: NLMEConfig) -> dict[str, Any]:
    """The covariate references a fit was made with (``covariates.csv`` beside its ``estimates.csv``, written by
    ``latentfit nlme fit``) merged with the model file's own (``reference`` / ``levels``): what a simulation or a
    VPC on another design must apply.  A reference that the model file gives otherwise than the fit used is a
    :class:`ConfigError`; so is a centred covariate whose reference is in neither (estimates written without
    ``covariates.csv``): the design's mean would shift every prediction."""
    path = Path(estimates)
    folder = path if path.is_dir() else path.parent
    refs = dict(cfg.covariate_reference)
    table = folder / "covariates.csv"
    if table.is_file():
        df = pd.read_csv(table, dtype=str, keep_default_na=False)
        if list(df.columns) != ["covariate", "kind", "value"]:
            raise ConfigError(f"a covariates file has the columns covariate, kind, value; it has {list(df.columns)}",
                              table)
        saved: dict[str, Any] = {}
        for col, rows in df.groupby("covariate", sort=False):
            kinds = set(rows["kind"])
            try:
                saved[col] = (tuple(rows["value"]) if kinds == {"level"}
                              else float(rows["value"].iloc[0]) if kinds == {"center"} and len(rows) == 1 else None)
            except ValueError:
                saved[col] = None
            if saved[col] is None:
                raise ConfigError(f"covariate {col!r}: one 'center' row (a number) or its 'level' rows, got "
                                  f"{rows[['kind', 'value']].values.tolist()}", table)
        for col, value in saved.items():
            given = refs.get(col)
            if given is not None and (given != value if not isinstance(value, tuple)
                                      else [level_key(v) for v in given] != [level_key(v) for v in value]):
                raise ConfigError(f"the model file gives covariate {col!r} the reference {given!r}, but the estimates "
                                  f"were fitted with {value!r} ({table})", cfg.path)
            refs[col] = given if given is not None else value
    centred = sorted({c for items in cfg.covariates.values() for c, t in items.items()
                      if t in ("center", "log-center") and c not in refs})
    if centred:
        raise ConfigError(f"the estimates have no covariates.csv beside them (written by 'latentfit nlme fit') giving "
                          f"the value(s) that {', '.join(centred)} were centred at: give them in the model file "
                          f"({centred[0]} = {{ transform = \"...\", reference = <value> }}) so that the design is "
                          f"centred as the fitted data were", path)
    return refs


__all__ = ["ALIASES", "ConfigError", "NLMEConfig", "load_config", "parse_config", "prepare_design",
           "read_covariate_reference", "read_estimates", "read_table"]
