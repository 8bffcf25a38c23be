"""Where the ready-made model families meet the PPLs and the engines.

``latentfit.models`` imports neither a PPL, an array library nor an engine: its ``pyro_model`` /
``numpyro_model`` and :meth:`NLME.fit <latentfit.models.nlme.NLME.fit>` reach this module through the hooks
``"families"`` and ``"fit_nlme"`` that ``latentfit/__init__.py`` binds (:mod:`latentfit._hooks`).  Each
family's model function is written once against a small per-PPL interface, :class:`PPL` (``param``,
``sample``, ``plate``, ``factor``, the distributions and constraints modules, the array backend), that
:func:`pyro_ppl` and :func:`numpyro_ppl` fill in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from latentfit.inference.ops import make_ops


@dataclass(frozen=True)
class PPL:
    """What a model function needs from a probabilistic programming language."""

    name: str  # "pyro" / "numpyro"
    primitives: Any  # the module with param / sample / plate / factor
    dist: Any  # its distributions module
    constraints: Any  # its constraints module
    backend: str  # the array backend its distributions take ("torch" / "jax", see make_ops)
    xp: Any  # that backend's array namespace
    fresh: Callable[[Any], Any]  # an initial value as the param store takes it (a copy on torch)


def pyro_ppl() -> PPL:
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    return PPL("pyro", pyro, dist, constraints, "torch", torch, lambda v: v.clone())


def numpyro_ppl() -> PPL:
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    return PPL("numpyro", numpyro, dist, constraints, "jax", jnp, lambda v: v)


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


# ----- NLME ---------------------------------------------------------------------------------------------
def nlme_param_constraints(model: Any, constraints: Any) -> dict[str, Any]:
    """Constraint of every NLME parameter for a PPL's ``param`` site (``constraints``: the PPL's module)."""
    support = {"log": constraints.positive, "normal": constraints.real, "logit": constraints.unit_interval,
               "probit": constraints.unit_interval}
    out = {}
    for name, info in model.params.items():
        role = info.meta.get("role")
        if role == "population":
            out[name] = support[info.meta["transform"]]
        elif role == "omega" and name == "Omega":
            out[name] = constraints.positive_definite
        elif role in ("omega", "error", "gamma"):
            out[name] = constraints.positive
        else:
            out[name] = constraints.real
    return out


def nlme_model(model: Any, ppl: PPL) -> Callable[[], None]:
    """An :class:`~latentfit.models.nlme.NLME` as an ordinary model function of ``ppl`` (no arguments; data bound).

    Sites: one ``param`` per estimated parameter (fixed ones are constants), ``phi`` (the latent ``[N, 1, d]``
    inside plate ``id``), ``DV`` (observed, padding masked; a ``factor`` when some observations are censored).
    The function evaluates a copy of the model on the PPL's backend when the model lives on the other one.
    """
    model._require_data()
    if model.ops.name != ppl.backend:
        model = model.with_ops(make_ops(ppl.backend))
    pp, dist, xp = ppl.primitives, ppl.dist, model.ops.xp
    init = model.init_params()
    param_constraints = nlme_param_constraints(model, ppl.constraints)

    def nlme() -> None:
        theta = {}
        for name, info in model.params.items():
            if info.fixed:
                theta[name] = init[name]
                continue
            theta[name] = pp.param(name, ppl.fresh(init[name]), constraint=param_constraints[name])
        mu_r, om = model.prior_moments(theta)
        n, t = model._y.shape
        with pp.plate("id", n, dim=-2):
            phi = pp.sample("phi", dist.MultivariateNormal(mu_r[:, None, :], om))  # [..., N, 1, d]
            terms_z = phi[..., 0, :]
            f = model.structural_prediction(theta, terms_z)
            if model.error == "exponential":
                y, f = model._ylog, xp.log(f)
            else:
                y = model._y
            sd = model._error_sd(theta, f)
            with pp.plate("obs", t, dim=-1):
                if model.has_censoring:
                    pp.factor("DV", model._obs_terms(theta, model.structural_prediction(theta, terms_z), None))
                else:
                    pp.sample("DV", dist.Normal(f, sd).mask(model._mask), obs=y)

    return _named(nlme, f"{ppl.name}_nlme")


#: options of ``NLME.fit`` that go to the engine's run (:meth:`~latentfit.inference.driver.Engine.run`), not to its
#: constructor: checkpoints (``distributed=`` is read here)
NLME_RUN_OPTIONS = ("checkpoint", "checkpoint_every", "keep", "resume")


def fit_nlme(model: Any, engine: str, options: dict[str, Any]) -> Any:
    """Fit an NLME by SAEM (``engine="saem"``) or f-SAEM (``"fsaem"``); ``options`` go to the engine, but
    ``checkpoint``, ``checkpoint_every``, ``keep`` and ``resume`` (:data:`NLME_RUN_OPTIONS`) to its run.

    ``distributed=True`` (in a torch.distributed process group, e.g. a ``torchrun`` script; every process passes the
    same whole table): this process fits its contiguous block of the individuals (:func:`nlme_shard`) with per-unit
    random streams (``rng="per_unit"`` unless given), statistics all-reduced in float64, so the estimates equal a
    one-process fit with ``rng="per_unit"`` to rounding.
    On JAX (``backend="jax"``, after ``jax.distributed.initialize``) the whole model runs with the individuals sharded
    over the devices of every process (``Engine.run(distributed=True)``), with the same result.
    ``distributed="local"`` (either backend): each process passed only the rows of its own individuals; the blocks
    must be disjoint (:func:`check_local_block`) and the fit equals the one-process fit of their concatenation in
    rank order.
    """
    from latentfit.inference.driver import distributed_mode, engine_option_names, unknown_option_error

    options = dict(options)
    run_options = {k: options.pop(k) for k in NLME_RUN_OPTIONS if k in options}  # checkpoint=, resume=: the run's
    mode = distributed_mode(options.pop("distributed", False))
    engine = engine.lower()
    if engine == "saem":
        from latentfit.inference.saem import SAEM as cls
    elif engine in ("fsaem", "f-saem"):
        from latentfit.inference.fsaem import FSAEM as cls
    else:
        raise ValueError(f"engine must be 'saem' or 'fsaem', got {engine!r}")
    known = engine_option_names(cls)
    unknown = sorted(k for k in options if k not in known)
    if unknown:  # a misspelt option: named with the closest valid one, not by the engine's __init__
        own = [p for p in inspect.signature(model.fit).parameters if p not in ("data", "options")]
        raise unknown_option_error("fit()", cls.__name__, unknown, known, [*own, "distributed", *NLME_RUN_OPTIONS])
    if mode is None:
        return cls(model, **options).run(**run_options)
    options.setdefault("rng", "per_unit")
    jax_mesh = model.ops.process_mesh() is not None
    if mode == "local":  # each process passed its own rows: its block of the individuals
        check_local_block(model)
        if jax_mesh:
            model = same_layout(model)
        return cls(model, **options).run(distributed="local" if jax_mesh else True, **run_options)
    if jax_mesh:  # JAX: the whole table, each process's block on its devices
        return cls(model, **options).run(distributed=True, **run_options)
    return cls(nlme_shard(model), **options).run(distributed=True, **run_options)


def check_local_block(model: Any) -> None:
    """Refuse a ``fit(df, distributed="local")`` whose processes' tables are not disjoint blocks of one study: an
    individual (ID) in the rows of several processes, or a covariate transform computed from the data (each block
    would compute its own).  Collectives over the fit's processes (torch.distributed or ``jax.distributed``)."""
    import numpy as np

    from latentfit.inference.model import ModelSpecificationError

    _refuse_data_transforms(model)
    group = model.ops.distributed()
    ids = [str(i) for i in np.asarray(model.data.ids).tolist()]
    every = group.gather_objects(ids)
    seen: dict[str, int] = {}
    shared: dict[str, list[int]] = {}
    for rank, block in enumerate(every):
        for i in block:
            if i in seen:
                shared.setdefault(i, [seen[i]]).append(rank)
            else:
                seen[i] = rank
    if shared:
        shown = ", ".join(f"{i} (processes {ranks})" for i, ranks in list(shared.items())[:5])
        raise ModelSpecificationError(
            f"distributed='local': {len(shared)} individual(s) are in the rows of several processes: {shown}"
            f"{' ...' if len(shared) > 5 else ''}; each process passes the rows of its own individuals (a block "
            "of the IDs), or every process passes the whole table with distributed=True")


def same_layout(model: Any) -> Any:
    """A JAX process's block of a ``distributed="local"`` NLME fit laid out as every other process's (one compiled
    program over the processes): its data padded to the largest numbers of observations, doses and periods of any
    block (:func:`~latentfit.models.nlme.data.pad_data`: what binding the whole table pads to), and the masked
    density whenever some block has padded observations.  Collectives: every process calls it."""
    import copy

    from latentfit.models.nlme.data import data_widths

    group = model.ops.distributed()
    every = [tuple(w) for w in group.gather_objects(list(data_widths(model.data)))]
    widest = tuple(max(w[j] for w in every) for j in range(3))
    if widest != data_widths(model.data):
        padded = copy.copy(model)
        padded.pad_widths = widest
        padded = padded.bind()
        padded.params = dict(model.params)  # the starting values (init=) of the model as given
        model = padded
    unpadded = group.gather_objects(bool(model._no_padding))
    if not all(unpadded) and model._no_padding:
        model = copy.copy(model)
        model._no_padding = False  # the mask is all True here: the same values, the other blocks' program
    return model


def _refuse_data_transforms(model: Any) -> None:
    """``distributed="local"``: a covariate centred at its data's mean, or categorical with the data's levels, would
    be centred (levelled) by each process's block alike only when the user gave the references."""
    import numpy as np

    from latentfit.inference.model import ModelSpecificationError

    given = getattr(model, "reference_given", frozenset())
    by_data = sorted({f"{col} ({tr or 'categorical'})" for items in model.covariate_spec.values() for col, tr in items
                      if col not in given and (tr in ("center", "log-center", "categorical")
                                               or not np.issubdtype(np.asarray(model.data.covariates[col]).dtype,
                                                                    np.number))})
    if by_data:
        raise ModelSpecificationError(f"distributed='local': covariate(s) {by_data} are transformed with values "
                                      "computed from the data (mean, levels), which would differ between the "
                                      "processes' blocks of individuals; give them with covariate_reference= (e.g. "
                                      "{'Weight': 70.0}, {'SEX': ['F', 'M']}), or pass every process the whole table "
                                      "with distributed=True")


def nlme_shard(model: Any) -> Any:
    """The bound NLME ``model`` restricted to this process's contiguous block of its individuals (``np.array_split`` of
    the individuals in the model's order over the torch.distributed processes, in rank order).

    Covariate transforms computed from the data (``"center"``, ``"log-center"``, categorical levels) keep the whole
    table's references (the block is bound from the model bound to it: :attr:`NLME.covariate_reference`).
    """
    import numpy as np
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group: start the script "
                           "with torchrun and call torch.distributed.init_process_group('gloo') (or 'nccl') first")
    if model.ops.name != "torch":
        raise ValueError(f"distributed=True fits over torch.distributed processes (backend='torch'); the "
                         f"{model.ops.name} backend shards units over devices with devices=")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = model.data.ids[np.array_split(np.arange(model.num_units), world)[rank]]
    table = model.table
    return model.bind(table[table[model.data.columns["id"]].isin(mine)])


# ----- Gaussian mixture and linear mixed model ------------------------------------------------------------
def mixture_model(gm: Any, ppl: PPL) -> Callable[[Any], Any]:
    """A :class:`~latentfit.models.GaussianMixture` as a model function ``model(x)`` (enumerated label ``z``).

    Parameters ``weights``, ``locs``, ``covariances`` start at the mixture's initial values.
    """
    pp, dist, constraints, xp = ppl.primitives, ppl.dist, ppl.constraints, ppl.xp
    init = {k: p.value for k, p in gm.params.items()}
    cov_type = gm.covariance_type
    cov_constraint = constraints.positive_definite if cov_type in ("full", "tied") else constraints.positive

    def model(x):
        weights = pp.param("weights", ppl.fresh(init["weights"]), constraint=constraints.simplex)
        locs = pp.param("locs", ppl.fresh(init["locs"]))
        covs = pp.param("covariances", ppl.fresh(init["covariances"]), constraint=cov_constraint)
        with pp.plate("data", x.shape[0]):
            z = pp.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            if cov_type == "full":
                pp.sample("obs", dist.MultivariateNormal(locs[z], covariance_matrix=covs[z]), obs=x)
            elif cov_type == "tied":  # one covariance shared by the components
                pp.sample("obs", dist.MultivariateNormal(locs[z], covariance_matrix=covs), obs=x)
            elif cov_type in ("tied_diag", "tied_spherical"):  # one scale ([d] or a scalar) for every component
                pp.sample("obs", dist.Normal(locs[z], xp.sqrt(covs)).to_event(1), obs=x)
            else:
                var = covs[z] if cov_type == "diag" else xp.broadcast_to(covs[z][..., None],
                                                                         tuple(z.shape) + (x.shape[-1],))
                pp.sample("obs", dist.Normal(locs[z], xp.sqrt(var)).to_event(1), obs=x)
        return z

    return model


def mixed_model(lmm: Any, ppl: PPL) -> Callable[..., None]:
    """A :class:`~latentfit.models.LinearMixedModel` as a model function ``model(y, X, Z, mask)``."""
    pp, dist, constraints, xp = ppl.primitives, ppl.dist, ppl.constraints, ppl.xp
    init = {k: p.value for k, p in lmm.params.items()}
    q = lmm.q

    def model(y, X, Z, mask):
        beta = pp.param("beta", ppl.fresh(init["beta"]))
        Omega = pp.param("Omega", ppl.fresh(init["Omega"]), constraint=constraints.positive_definite)
        sigma = pp.param("sigma", ppl.fresh(init["sigma"]), constraint=constraints.positive)
        with pp.plate("units", y.shape[0], dim=-1):
            b = pp.sample("b", dist.MultivariateNormal(xp.zeros(q, dtype=y.dtype), Omega))
            mean = (X @ beta) + (Z @ b[..., None])[..., 0]
            pp.sample("y", dist.Normal(mean, sigma).mask(mask).to_event(1), obs=xp.nan_to_num(y))

    return model


__all__ = ["PPL", "fit_nlme", "mixed_model", "mixture_model", "nlme_model", "nlme_param_constraints", "numpyro_ppl",
           "pyro_ppl"]
