"""MCMCSGD: maximum likelihood by stochastic gradient ascent with MCMC E-steps (Fisher identity).

For a model with latents ``z_i`` per unit and no usable sufficient statistics (logistic or Poisson mixed
models, a neural network inside, censored outcomes), the score of the observed data is, by Fisher's identity,

    ∇_θ log p(y; θ) = Σ_i E_{z_i | y_i; θ}[∇_θ log p(y_i, z_i; θ)].

Iteration k (1-based):

1. a few MCMC kernel steps on persistent, warm-started chains targeting ``p(z_i | y_i; θ_{k−1})``, batched
   over units and chains: saemix's kernels (prior-IMH, component-wise and block random walks) or MALA with
   a per-unit step adapted toward 57% acceptance (``kernel="mala"``, for high-dimensional latents);
2. the gradient estimate ``ĝ_k = (N/|B_k|) Σ_{i∈B_k} mean_chains ∇_θ log p(y_i, z_i^{(k)}; θ_{k−1})`` over a
   mini-batch ``B_k`` of units (all units by default), in unconstrained space.  *Pruned* (``prune=True``, default)
   where θ enters only the latents' prior (a random-effects model whose β and ω are the prior's mean and scale):
   ``∇_θ log p(y, z; θ) = ∇_θ log p(z; θ)``, taken from the adapter's closed-form Gaussian prior without running the
   model (:func:`prior_only_log_density`: independence read structurally from the model's computation, the closed
   form checked against the model's gradient at the start);
3. (default ``optimizer="auto"``: models with at most ``preconditioned.MAX_PARAMS`` = 64 free parameters; or
   ``optimizer="fisher"``) a Fisher-scoring step ``θ_k = θ_{k−1} + γ_k Γ_k⁻¹ ĝ_k``, ``Γ_k`` the SA average of the
   complete-data information (Gu & Kong 1998), with heavy-ball momentum over its first steps
   (:mod:`.preconditioned`); or (``"auto"`` above 64 free parameters or with a neural-network module inside, or a
   named optimiser) one optimiser step (SGD, Adam, AMSGrad, OPT-AMSGrad, or any ``torch.optim`` / ``optax`` optimiser)
   with learning rate ``η_t`` (t counts gradient steps);
4. Polyak–Ruppert averaging ``θ̄_k = θ̄_{k−1} + (θ_k − θ̄_{k−1})/(k − k₀)`` after ``k₀ = average_from``, or (Fisher
   scoring's default, ``averaging="linear"``) the average weighted by index, ``θ̄_k = θ̄_{k−1} + 2 (θ_k − θ̄_{k−1}) /
   (k − k₀ + 1)``.

Data-parallel (``run(distributed=True)``, torch; ``run(devices=n)``, JAX): with ``rng="per_unit"`` each unit's draws
come from its own counter-based stream, every process draws the same *global* mini-batch ``B_k`` from the shared
key, advances the chains of the units of ``B_k`` it holds, and the gradient (a sum over units) is all-reduced in
float64 before the optimiser step, which every process runs alike: the fit equals the one-process fit up to the
order of the sums over units.

The default rate is constant until ``average_from`` and decays as ``η/√(t − t₀)`` after it, the Robbins–Monro
regime of biased stochastic approximation with Markov noise (Karimi, Miasojedow, Moulines & Wai, "Non-asymptotic
analysis of biased stochastic approximation scheme", COLT 2019): a few warm-started kernel steps per
iteration suffice.  That paper's guarantee holds at a *random* iteration ``N`` drawn with
``P(N = ℓ) ∝ η_{ℓ+1}``; the fit reports it (:attr:`MCMCSGD.random_stop` of the result's engine).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .._hooks import user_stacklevel
from . import mcmc, preconditioned
from .driver import TREND_SIGMAS, TREND_UNITS, Engine, default_num_chains, final_trend
from .model import LatentModel, ModelSpecificationError
from .mstep import flatten, unflatten
from .ops import OPTIMIZERS
from .results import FitResult
from .saem import RNG_MODES, per_unit_ids

KERNELS = ("saemix", "mala")
#: MCMCSGD's own steps besides the shim's optimisers: Fisher scoring (:mod:`.preconditioned`), and "auto" = Fisher
#: scoring when the model has at most ``preconditioned.MAX_PARAMS`` free parameters, else Adam
OWN_STEPS = ("fisher", "auto")
#: folded into a unit's stream key of iteration k for Fisher scoring's prior draw (the kernels fold in step numbers)
PRIOR_DRAW_TAG = 2**31 - 1
#: where Fisher scoring's prior information comes from: one prior draw per unit, or the sigma points (exact)
INFORMATION = ("draw", "exact")
#: Fisher scoring's default heavy-ball steps: this share of the first fifth of the iterations (``schedule="decay"``
#: with ``average_from`` given: of the gradient steps before it)
MOMENTUM_SHARE = 0.6
#: Fisher scoring's γ schedules after the heavy-ball steps: γ = 1 to the end (stochastic EM in θ, its iterates
#: averaged) or γ decaying after ``average_from`` (:func:`preconditioned.gamma_of`)
SCHEDULES = ("sem", "decay")
#: the average of the iterates after ``average_from``: the uniform mean (Polyak–Ruppert) or weights ∝ their index
AVERAGING = ("uniform", "linear")


@dataclass(frozen=True)
class RandomStop:
    """The biased-SA report: θ and the squared gradient norm at an iteration ``N ~ P(N = ℓ) ∝ η_{ℓ+1}``."""

    iteration: int
    theta: dict[str, np.ndarray]
    grad_norm2: float


class MCMCSGDState(NamedTuple):
    """What MCMCSGD's next iteration needs."""

    #: θ in unconstrained space (the free parameters' entries are those of ``x``)
    theta_u: dict[str, Any]
    #: the free parameters as one flat vector: the optimiser's iterate θ_k
    x: Any
    #: its Polyak–Ruppert average θ̄_k
    x_avg: Any
    #: the persistent chains ``[L, N, d]``
    z: Any
    #: the random stream (a JAX key or a ``torch.Generator``)
    key: Any
    #: the optimiser's state
    opt: Any
    #: saemix kernels: the random-walk scales ``[d]`` (None with MALA)
    scale_rw: Any = None
    scale_block: Any = None
    #: MALA: per-unit log step sizes ``[N]`` (None with saemix's kernels)
    log_step: Any = None
    #: root of the per-unit counter-based streams (``rng="per_unit"``; else None)
    stream: Any = None


class MCMCSGDInfo(NamedTuple):
    """What a user may look at after each MCMCSGD iteration (the history)."""

    #: acceptance rates by kernel
    acc: dict[str, Any]
    #: proposals rejected for a NaN/inf log-density
    num_nonfinite: Any
    #: ``(N/|B|) mean_chains Σ_{i∈B} log p(y_i, z_i; θ_{k−1})``
    objective: Any
    #: ``‖ĝ_k‖²`` (0 during the MCMC-only burn-in)
    grad_norm2: Any
    #: ``η`` of this gradient step (0 during the burn-in)
    learning_rate: Any
    #: the iterate θ_k (flat)
    iterate: Any
    #: non-finite gradient entries per parameter (the driver stops the fit on any)
    grad_nonfinite: dict[str, Any]


class MCMCSGD(Engine):
    """Stochastic-gradient maximum likelihood with MCMC E-steps on a :class:`LatentModel`.

    Parameters
    ----------
    num_iters : int
        Iterations (each: ``mcmc_steps`` kernel steps and one gradient step).
    num_chains : int, optional
        Chains per unit; default saemix's ``ceil(50 / N)``.
    kernel : "saemix" | "mala"
        MCMC kernel: saemix's three kernels, or MALA with per-unit step adaptation.
    mcmc_steps : int or (n1, n2, n3)
        Kernel steps per iteration: MALA steps, or saemix's prior-IMH / component-wise / block counts (an int
        ``m`` means ``(m, m, m)``).  Defaults: ``(2, 2, 2)``, saemix's and :class:`SAEM`'s (the same MCMC work per
        iteration as SAEM), and 5 MALA steps.
    burn_in : int
        MCMC-only iterations before the first gradient step.
    batch_size : int, optional
        Units per gradient step (uniform without replacement, gradient rescaled by ``N / b``); all by default.
    optimizer : str or optimiser
        ``"auto"`` (default): Fisher scoring on the complete data with heavy-ball momentum in its first steps
        (:mod:`latentfit.inference.preconditioned`) when the model has at most ``preconditioned.MAX_PARAMS`` (64)
        free parameters and no neural-network module (``pyro.module``, ``numpyro.contrib.module``: its weights'
        complete-data information is indefinite), Adam otherwise, silently; :attr:`fisher` tells which.
        ``"fisher"``: Fisher scoring with or without modules, Adam with a warning above 64 free parameters;
        ``"sgd"``, ``"adam"``, ``"amsgrad"``, ``"opt-amsgrad"``; or a ``torch.optim`` factory
        ``params -> Optimizer`` (Pyro) / an ``optax.GradientTransformation`` (NumPyro), used with its own rate.
        On benchmarks/mcmcsgd_logistic.py Fisher scoring ends closer to the exact maximum than SAEM and reaches
        SAEM's final log-likelihood in less CPU in most fits; Adam there was about as fast as SAEM, not reliably
        faster (that file's docstring).
    learning_rate : float or callable
        ``η`` of the named optimisers, or a schedule ``t -> η_t`` of the gradient-step count (1-based); with
        Fisher scoring, the rate of its Adam fall-back (steps where ``Γ_k`` fails).
    average_from : int, optional
        Iteration after which iterates are averaged (and, for the named optimisers' default rate and Fisher scoring's
        ``schedule="decay"``, the step decays); default ``num_iters // 2``; Fisher scoring: ``burn_in +
        momentum_steps`` (``schedule="decay"``: ``burn_in + num_iters // 5``).
    momentum_steps : int, optional
        Fisher scoring: the heavy-ball steps at the start (:mod:`.preconditioned`); default 60 % of the first
        fifth of the iterations (60 of 500).  Ignored by the other optimisers.
    schedule : ``"sem"`` | ``"decay"``
        Fisher scoring: after the heavy-ball steps, ``"sem"`` (default without ``batch_size``; with it
        ``"decay"``, whose decaying γ also removes the mini-batches' sampling noise) keeps γ = 1 to the end — stochastic
        EM in θ, whose iterates wander around the maximum at the Monte-Carlo noise's level without freezing — and
        reports their average from ``average_from`` on (``averaging="linear"``); ``"decay"`` (the schedule before)
        decays γ as ``(k − average_from)^{−0.6}`` after ``average_from`` with the uniform average.  With the complete
        information as preconditioner a decaying γ freezes the directions where most information is missing (their
        contraction is γ times the observed / complete ratio, 1 % for this benchmark's random intercept), so the
        decayed estimate stays where the γ = 1 iterate was when the decay began.  On benchmarks/mcmcsgd_logistic.py
        (``information="exact"``, 18 fits per PPL; that file's docstring) "sem" ends 0.5 LL units closer to the
        maximum than SAEM on average and reaches SAEM's final log-likelihood in less CPU than SAEM in 17 of 18 Pyro
        fits and 13 of 18 NumPyro fits (the long-γ "decay" variant: 7 of 9 Pyro fits).
    averaging : ``"uniform"`` | ``"linear"``
        The average of the iterates after ``average_from``: their mean (Polyak–Ruppert, :func:`polyak_ruppert`;
        default but with Fisher scoring's ``schedule="sem"``) or their mean weighted by index (:func:`linear_average`,
        which forgets a transient still under way when averaging began; default with ``schedule="sem"``).
    rng : ``"global"`` | ``"per_unit"``
        Where the MCMC draws come from (as :class:`~latentfit.inference.saem.SAEM`'s option): one stream for all
        units, or unit i's own counter-based stream ``(key, unit_ids[i], k, kernel step)``, which makes the fit
        independent of the order of the units and of their sharding over processes (``distributed=True``) or
        devices (``devices=n``).  Mini-batches are drawn from the shared key in both modes.
    unit_ids : sequence of int, optional
        The identity of each unit for ``rng="per_unit"`` (default ``0 .. N−1``; a distributed fit: the global
        indices of this process's units).
    prune : bool
        The pruned gradient (default): where the likelihood does not depend on the free parameters (found from the
        model's computation, :func:`prior_only_log_density`) and the model has its latents' log-prior in closed form
        (every latent a recognised Gaussian pattern of the Pyro / NumPyro adapter), differentiate that log-prior
        alone, ``∇_θ log p(y, z; θ) = ∇_θ log p(z; θ)``, without running the model (the same gradient up to rounding;
        the objective's value is the sweep's own log-density of the draws); likewise Fisher scoring's information.
        ``False``: always the model's complete log-density.
    information : ``"draw"`` | ``"exact"``, optional
        Fisher scoring: the latents' prior part of ``Ĥ_k``, from one prior draw of every unit at θ_{k−1}
        (``"draw"``: unbiased, noisy; the default where a latent is not Gaussian), or its exact expectation
        (``"exact"``: Gaussian latents only, the default for them, ``model.has_gaussian_prior``; the prior's Hessian
        averaged over the ``2 d`` sigma points ``μ_i ± √d L e_j`` of every unit, which is the
        expectation exactly because ``log p(z; θ)`` is quadratic in ``z``; noise-free).  Where every unit's prior is
        the same (the adapters' Gaussian patterns with params as mean and scale) it is one unit's information times
        the units: in closed form, ``Jᵀ I₁ J`` (``Normal`` sites; :meth:`_closed_form_information`), else at one unit's
        sigma points — cheaper than the draw (benchmarks/mcmcsgd_logistic.py, Pyro, N = 400: the Fisher step's own
        CPU 2.9 → 2.0 ms against the draw's; the sigma points of every unit cost 4.2 ms).
    information_every : int
        Fisher scoring: Γ_k refreshed (a new ``Ĥ_k``, its SA average) at gradient steps 1, 1 + m, 1 + 2m, ...
        only, ``m = information_every``, and kept in between (default 1: every step).
    """

    name = "MCMCSGD"
    jax_local_blocks = True  # run(distributed="local") on JAX (tests/test_jax_distributed.py)

    def __init__(self, model: LatentModel, num_iters: int = 500, num_chains: int | None = None, *,
                 kernel: str = "saemix", mcmc_steps: Any = None, burn_in: int = 10, batch_size: int | None = None,
                 optimizer: Any = "auto", learning_rate: Any = 0.05, average_from: int | None = None,
                 seed: int = 0, progress: bool = True, num_draws: int = 100, callback=None,
                 chunk_size: int = 25, rng: str = "global", unit_ids: Any = None, prune: bool = True,
                 information_every: int = 1, momentum_steps: int | None = None, information: str | None = None,
                 schedule: str | None = None, averaging: str | None = None) -> None:
        super().__init__(model, seed=seed, progress=progress, callback=callback, num_draws=num_draws,
                         chunk_size=chunk_size)
        self.validate_options(num_iters, num_chains, kernel=kernel, mcmc_steps=mcmc_steps, burn_in=burn_in,
                              batch_size=batch_size, optimizer=optimizer, learning_rate=learning_rate,
                              average_from=average_from, rng=rng, schedule=schedule, averaging=averaging)
        if model.latent_dim == 0 or not model.latent_sites:
            raise ModelSpecificationError(
                "MCMCSGD needs continuous latent variables (a sample site per unit without obs=); this model has "
                "none. Fit a model without latents by maximum likelihood directly, or discrete latents with EM.")
        if getattr(model, "is_enumerated", False):
            raise ModelSpecificationError(
                "MCMCSGD samples continuous latents by MCMC; this model's latents are discrete (enumerated): "
                "fit it with EM, IEM or FIEM")
        self.rng = rng
        self.prune, self._prior_only = bool(prune), None
        self._closed_form_sizes: bool | None = None  # whether Fisher's closed-form information applies (first step)
        if int(information_every) < 1:
            raise ValueError(f"information_every must be >= 1, got {information_every!r}")
        self.information_every = int(information_every)
        if information is not None and information not in INFORMATION:
            raise ValueError(f"information must be one of {INFORMATION}, got {information!r}")
        if momentum_steps is not None and int(momentum_steps) < 0:
            raise ValueError(f"momentum_steps must be >= 0, got {momentum_steps!r}")
        self._unit_ids = per_unit_ids(self.name, model, rng, unit_ids)
        self._unit_ids_option = unit_ids
        #: units of the whole fit and this process's first unit (a distributed fit: :meth:`distribute`)
        self._total_units, self._unit_offset, self._distributed = int(model.num_units), 0, False
        self._num_chains_option, self._batch_option = num_chains, batch_size
        self.num_iters = int(num_iters)
        self.num_chains = int(num_chains) if num_chains is not None else default_num_chains(model.num_units)
        self.kernel = kernel
        if mcmc_steps is None:
            mcmc_steps = 5 if kernel == "mala" else (2, 2, 2)
        if kernel == "saemix" and isinstance(mcmc_steps, (int, np.integer)):
            mcmc_steps = (int(mcmc_steps),) * 3
        self.mcmc_steps = tuple(int(m) for m in mcmc_steps) if kernel == "saemix" else int(mcmc_steps)
        self.burn_in = int(burn_in)
        self.batch_size = None if batch_size is None or int(batch_size) >= model.num_units else int(batch_size)
        self.names = [n for n, p in model.params.items() if not p.fixed]
        num_free = sum(int(np.size(model.ops.to_numpy(model.params[n].value))) for n in self.names)
        #: Fisher scoring (:mod:`.preconditioned`): asked for ("fisher") with at most MAX_PARAMS free parameters, or
        #: the default "auto" with at most MAX_PARAMS free parameters none of which is a neural-network module's weight
        #: (whose complete-data information is indefinite: Fisher scoring diverged on tests/test_mcmcsgd.py's MLP)
        modules = set(model.module_params) & set(self.names)
        self.fisher = (optimizer in OWN_STEPS and num_free <= preconditioned.MAX_PARAMS
                       and not (optimizer == "auto" and modules))
        if optimizer == "fisher" and not self.fisher:
            warnings.warn(f"MCMCSGD: optimizer='fisher' needs at most {preconditioned.MAX_PARAMS} free parameters "
                          f"(its Γ is p × p); this model has {num_free}: using Adam", stacklevel=user_stacklevel())
        #: Fisher scoring's prior information: "exact" by default where the latents are Gaussian, else "draw"
        self.information = information or ("exact" if self.fisher and model.has_gaussian_prior else "draw")
        if self.fisher and information == "exact" and not model.has_gaussian_prior:
            raise ModelSpecificationError(
                "MCMCSGD(information='exact') needs Gaussian latents (Normal, LogNormal or MultivariateNormal sites "
                "whose parameters do not depend on other latents): the prior's expected information is taken at its "
                "sigma points. Use information='draw'")
        #: Fisher scoring's γ schedule: "sem" (γ = 1 after the heavy-ball steps), "decay" (γ decays after average_from)
        #: (mini-batches: "decay", whose decaying γ also averages the batches' sampling noise out of the iterate)
        self.schedule = (schedule or ("sem" if batch_size is None else "decay")) if self.fisher else None
        sem = self.schedule == "sem"
        #: Fisher scoring's heavy-ball steps (default: 60 % of the first fifth of the iterations, 60 of 500; "decay":
        #: 60 % of the gradient steps before ``average_from``)
        if not self.fisher:
            self.momentum_steps = 0
        elif momentum_steps is not None:
            self.momentum_steps = min(int(momentum_steps), self.num_iters - self.burn_in)
        elif sem or average_from is None:
            self.momentum_steps = int(MOMENTUM_SHARE * (self.num_iters // 5))
        else:
            self.momentum_steps = int(MOMENTUM_SHARE * (max(int(average_from), self.burn_in) - self.burn_in))
        if average_from is None:
            average_from = (self.burn_in + min(self.momentum_steps, self.num_iters - self.burn_in - 1) if sem else
                            self.burn_in + self.num_iters // 5 if self.fisher else self.num_iters // 2)
        self.average_from = max(int(average_from), self.burn_in)
        #: how the iterates after ``average_from`` are averaged: "uniform" (Polyak–Ruppert) or "linear" (weights ∝ t)
        self.averaging = averaging or ("linear" if sem else "uniform")
        self.optimizer_spec = optimizer
        if optimizer in OWN_STEPS:
            optimizer = "adam"  # the fall-back of Fisher scoring, or the optimiser of a model with many parameters
        if callable(learning_rate):
            self.learning_rate = learning_rate
        else:
            self.learning_rate = _default_rate(float(learning_rate), self.average_from - self.burn_in)
        if not self.names:
            raise ModelSpecificationError("MCMCSGD: the model has no free parameter to estimate")
        self._shapes = {n: tuple(np.shape(model.ops.to_numpy(model.params[n].to_unconstrained(
            model.params[n].value)))) for n in self.names}
        self._optimizer = model.ops.optimizer(optimizer, self.learning_rate)
        #: filled by :meth:`run`: the biased-SA random-stopping report
        self.random_stop: RandomStop | None = None

    @staticmethod
    def validate_options(num_iters: Any = 500, num_chains: int | None = None, *, kernel: str = "saemix",
                         mcmc_steps: Any = None, burn_in: int = 10, batch_size: int | None = None,
                         optimizer: Any = "auto", learning_rate: Any = 0.05, average_from: int | None = None,
                         rng: str = "global", schedule: str | None = None, averaging: str | None = None,
                         **_: Any) -> None:
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if averaging is not None and averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
        if rng not in RNG_MODES:
            raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
        if not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
            raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
        if num_chains is not None and int(num_chains) < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if mcmc_steps is not None:
            steps = mcmc_steps if isinstance(mcmc_steps, (tuple, list)) else (mcmc_steps,)
            if kernel == "mala" and len(steps) != 1 or kernel == "saemix" and len(steps) not in (1, 3):
                raise ValueError(f"mcmc_steps must be an int (or, for kernel='saemix', three counts), "
                                 f"got {mcmc_steps!r}")
            if any(int(m) < 0 for m in steps) or sum(int(m) for m in steps) == 0:
                raise ValueError(f"mcmc_steps must be non-negative counts, not all zero; got {mcmc_steps!r}")
        if not 0 <= int(burn_in) < int(num_iters):
            raise ValueError(f"burn_in must be in [0, num_iters): got {burn_in} with num_iters={num_iters}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if average_from is not None and not 0 <= int(average_from) < int(num_iters):
            raise ValueError(f"average_from must be in [0, num_iters): got {average_from}")
        if isinstance(optimizer, str) and optimizer not in OPTIMIZERS + OWN_STEPS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS + OWN_STEPS} or an optimiser object, "
                             f"got {optimizer!r}")
        if not callable(learning_rate):
            try:
                lr = float(learning_rate)
            except (TypeError, ValueError):
                raise ValueError(f"learning_rate must be a positive number or a schedule t -> rate, "
                                 f"got {learning_rate!r}") from None
            if not np.isfinite(lr) or lr <= 0:
                raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}")

    # ----- engine protocol ---------------------------------------------------------------------------
    def phases(self) -> list[tuple[int, int, Any]]:
        """One phase: the MCMC-only burn-in, Fisher scoring's heavy-ball steps and the rest are told apart by ``k``
        inside :meth:`step` (``ops.cond``), so that a JAX fit compiles one chunk program for the whole run, as
        :class:`~latentfit.inference.saem.SAEM` does, instead of one per phase and per remainder chunk (five on
        benchmarks/mcmcsgd_logistic.py: 17 s of XLA compilation against 3.5 s)."""
        return [(1, self.num_iters, "fisher" if self.fisher else "sgd")]

    def init(self, key: Any) -> MCMCSGDState:
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta = model.init_params()
        root = ops.stream_key(key, self.seed) if self.rng == "per_unit" else None
        k_prior, key = ops.split(key)
        if root is None:
            z = model.sample_prior(theta, k_prior, self.num_chains)
        else:  # iteration 0 of the per-unit streams
            eps = self.sim_ops(None).normal(ops.fold_in(root, 0), (self.num_chains, model.num_units, model.latent_dim))
            z = model.prior_transform(theta, eps)
        ll, lp = model.log_densities(theta, z)
        if bool(xp.all(~xp.isfinite(ll + lp))):
            model.raise_for_nonfinite(theta, z)
        theta_u = model.unconstrain(theta)
        x = flatten(ops, theta_u, self.names)
        scale = log_step = None
        if self.kernel == "saemix":  # the sd of every process's draws (a distributed fit gathers them once)
            sd = xp.std(xp.reshape(ops.gather_units(z, 1), (-1, z.shape[-1])), 0)
            scale = 0.5 * xp.where(sd > 0, sd, 1.0)
        else:
            d = z.shape[-1]
            log_step = ops.zeros((model.num_units,)) + float(np.log(1.0 / max(d, 1) ** 0.25 * 0.5))
        #: the pruned gradient (:func:`prior_only_log_density`): the closed-form log-prior where θ enters only it
        self._prior_only = prior_only_log_density(model, self.names, self._shapes, theta, z) if self.prune else None
        opt = self._optimizer.init(x)
        if self.fisher:  # Γ, the previous iterate (momentum), and the Adam fall-back's state
            opt = {"gamma": ops.zeros((int(x.shape[0]),) * 2), "prev": x, "adam": opt}
        return MCMCSGDState(theta_u=theta_u, x=x, x_avg=x, z=z, key=key, opt=opt,
                            scale_rw=scale, scale_block=scale, log_step=log_step, stream=root)

    def distribute(self) -> None:
        """Data-parallel MCMCSGD over the torch.distributed group: this process's model holds a contiguous shard of
        the units (rank order), the default ids are their global indices, the default number of chains and the
        batch size follow the global number of units, every process draws the same global mini-batch (the shared
        generator) and advances the chains of its units in it, and the gradient, objective and acceptance counts
        are all-reduced in float64 (``ops.distributed()``): every process takes the same optimiser step."""
        if self.rng != "per_unit":
            raise ValueError(f"{self.name}: distributed=True needs rng='per_unit' (each unit's draws from its own "
                             "stream, so that the fit does not depend on the number of processes)")
        ops = self.model.ops.distributed()
        n = int(getattr(self.model, "num_real_units", self.model.num_units))  # a padded block: its real units
        counts = [int(c) for c in ops.gather_units(ops.asarray(np.array([n]), dtype=None), 0).tolist()]
        total, offset = sum(counts), sum(counts[:ops.rank])
        self.model = self.model.shard_view(ops, offset, total)
        self._total_units, self._unit_offset, self._distributed = total, offset, True
        if self._num_chains_option is None:
            self.num_chains = default_num_chains(total)
        b = self._batch_option
        self.batch_size = None if b is None or int(b) >= total else int(b)
        if self._unit_ids_option is None:
            self._unit_ids = np.arange(offset, offset + n, dtype=np.int64)
        self.ops = ops

    def jax_local_masks(self) -> bool | str:
        """Mini-batches on JAX local: one static size on every process (:meth:`_batch`), so the units are weighed, and
        a spare dummy unit stands for the other processes' units (their chains' draws never share a unit's)."""
        return "spare" if self._batch_option is not None else False

    def unit_axes(self) -> dict[str, int]:
        """The chains ``z [L, N, d]`` hold the units on axis 1, MALA's step sizes ``[N]`` on axis 0."""
        return {"z": 1, "log_step": 0} if self.kernel == "mala" else {"z": 1}

    def sim_ops(self, units: Any) -> Any:
        """The shim the MCMC kernels draw through for the (local) ``units`` (None: all): ``ops``, or its view with
        the per-unit streams of those units (``rng="per_unit"``); a JAX local fit's masked mini-batch
        (:meth:`_batch`): a view whose acceptance rates count this process's units of the batch only."""
        sim = self.ops
        if self.rng == "per_unit":
            ids = self.ops.asarray(self._unit_ids, dtype=None)
            sim = self.ops.per_unit_streams(ids if units is None else self.ops.take(ids, self._in_block(units)))
        if units is not None and self._masked_batches:
            from .padding import BatchMeanOps

            sim = BatchMeanOps(sim, units < self.model.num_units - 1)
        return sim

    @property
    def _masked_batches(self) -> bool:
        """Mini-batches of one static size on every process (a JAX local fit, :meth:`_batch`)."""
        return self._distributed and self.ops.jittable and self.batch_size is not None

    def _in_block(self, units: Any) -> Any:
        """Local indices of a mini-batch to read (a masked batch's other processes' units: the spare dummy unit)."""
        return units

    def _batch(self, key: Any) -> Any:
        """The mini-batch of iteration k: the first ``batch_size`` of a permutation of every process's units,
        drawn alike on every process; as this process's local indices (None: all units)."""
        if self.batch_size is None:
            return None
        units = self.ops.permutation(key, self._total_units)[:self.batch_size]
        if not self._distributed:
            return units
        lo = self._unit_offset
        n = int(getattr(self.model, "num_real_units", self.model.num_units))
        mine = (units >= lo) & (units < lo + n)
        if self._masked_batches:  # one shape on every process: the other processes' units as the spare dummy unit
            return self.ops.xp.where(mine, units - lo, self.model.num_units - 1)
        return units[mine] - lo

    def convergence_warnings(self, history: dict[str, list]) -> list[str]:
        """A complete-data log-likelihood still rising over the last quarter of a run of 100 or more iterations
        (:func:`~latentfit.inference.driver.final_trend`: by more than 3 standard errors and more than 1 unit): the
        optimiser had not reached a stationary point; typical of a network's weights under the default 500 Adam
        iterations (a 2 × 32 tanh MLP: still +12 ± 1 over iterations 375-500 on one seed, its exact log-likelihood 40
        units short, and flat with ``num_iters=1500``)."""
        values = history.get("objective")
        if not values or len(values) < 100:
            return []
        rise, se = final_trend(values)
        if rise > TREND_SIGMAS * se and rise > TREND_UNITS:
            return [f"the complete-data log-likelihood was still rising over the last quarter of the iterations "
                    f"({rise:+.3g} ± {se:.2g}, fit.history['objective']): the estimates may not have converged; "
                    f"rerun with more iterations (num_iters=) or look at fit.plot_convergence()"]
        return []

    def theta_of(self, state: MCMCSGDState) -> dict[str, Any]:
        """The Polyak–Ruppert average (the iterate itself before ``average_from``)."""
        theta_u = dict(state.theta_u)
        theta_u.update(unflatten(state.x_avg, self.names, self._shapes))
        return self.model.constrain(theta_u)

    def step(self, state: MCMCSGDState, k: Any, phase: Any) -> tuple[MCMCSGDState, MCMCSGDInfo]:
        """Iteration k: MCMC kernels, then (after the burn-in) one optimiser step; pure in ``(state, k, phase)``.  The
        burn-in (``k ≤ burn_in``) and Fisher scoring's heavy-ball steps are told apart by ``k`` (``ops.cond``: on torch
        the branch taken, on JAX one compiled program for every iteration); ``phase`` is the one of :meth:`phases`."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        key, k_batch, k_sim = ops.split(ops.own_key(state.key), 3)
        theta_u = dict(state.theta_u)
        theta_u.update(unflatten(state.x, self.names, self._shapes))
        theta = model.constrain(theta_u)
        units = self._batch(k_batch)
        if state.stream is not None:  # per-unit streams: iteration k's key, folded in per kernel step and unit
            k_sim = ops.fold_in(state.stream, k)
        z_all = state.z
        z = z_all if units is None else ops.take(z_all, self._in_block(units), axis=1)
        z, state, acc, num_nonfinite, joint = self._simulate(state, theta, z, units, k, k_sim)
        z_all = z if units is None else _scatter_units(ops, z_all, units, z)
        state = state._replace(z=z_all, key=key)
        num_nonfinite = ops.all_sum(num_nonfinite)

        def burn_in() -> tuple[MCMCSGDState, MCMCSGDInfo]:  # the MCMC-only iterations: no gradient step
            objective = xp.mean(ops.all_sum(xp.sum(self._log_joint(theta, z, units), -1)))
            return state, MCMCSGDInfo(
                acc=acc, num_nonfinite=num_nonfinite, objective=objective,
                grad_norm2=ops.zeros(()), learning_rate=ops.zeros(()), iterate=state.x,
                grad_nonfinite={n: ops.zeros(()) for n in self.names})

        def gradient_step() -> tuple[MCMCSGDState, MCMCSGDInfo]:
            return self._gradient_step(state, k, theta, z, units, k_batch, joint, acc, num_nonfinite)

        if not self.burn_in:
            return gradient_step()
        return ops.cond(k <= self.burn_in, burn_in, gradient_step)

    def _gradient_step(self, state: MCMCSGDState, k: Any, theta: dict[str, Any], z: Any, units: Any, k_batch: Any,
                       joint: Any, acc: dict[str, Any], num_nonfinite: Any) -> tuple[MCMCSGDState, MCMCSGDInfo]:
        """Iteration k after the burn-in, the chains ``z`` drawn: the gradient estimate and one optimiser step."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        total = self._total_units
        scale = total / (total if units is None else self.batch_size)
        fixed = {n: v for n, v in theta.items() if n not in self.names}

        prior = self._prior_only

        def objective(x: Any) -> Any:
            th = dict(fixed)
            th.update(model.constrain(unflatten(x, self.names, self._shapes)))
            if prior is not None:  # the pruned gradient: θ enters the latents' prior only
                return scale * xp.mean(xp.sum(prior(th, z, units), -1))
            return scale * xp.mean(xp.sum(self._log_joint(th, z, units, x), -1))

        if prior is None:
            value, grad = ops.value_and_grad(objective)(state.x)
        else:  # the value: the sweep's own log-densities of the draws at θ_{k−1}
            value, grad = scale * xp.mean(xp.sum(joint, -1)), ops.grad(objective)(state.x)
        # a sum over units: all-reduced in float64 over the processes of a distributed fit (else the identity)
        value, grad = ops.all_sum(value), ops.all_sum(grad)
        # non-finite gradient entries, per parameter: the driver stops the fit on any (NonFiniteError)
        # counted in the gradient's dtype, as the burn-in's zeros are (``bool * 1.0`` is float64 on JAX with x64)
        bad = unflatten(xp.where(xp.isfinite(grad), xp.zeros_like(grad), xp.ones_like(grad)), self.names,
                        self._shapes)
        grad_nonfinite = {n: xp.sum(v) for n, v in bad.items()}
        grad = xp.where(xp.isfinite(grad), grad, 0.0)
        if self.fisher:
            x_new, opt_state, rate = self._fisher_step(state, grad, k, theta, z, units, k_batch)
        else:
            x_new, opt_state = self._optimizer.update(grad, state.opt, state.x)
            rate = self.learning_rate(k - self.burn_in)
        t_avg = k - self.average_from
        count = t_avg * (t_avg > 0) + 1 * (t_avg <= 0)
        x_avg = xp.where(t_avg > 0, (polyak_ruppert if self.averaging == "uniform" else linear_average)(
            state.x_avg, x_new, count), x_new)
        state = state._replace(x=x_new, x_avg=x_avg, opt=opt_state)
        return state, MCMCSGDInfo(acc=acc, num_nonfinite=num_nonfinite, objective=value, grad_norm2=xp.sum(grad * grad),
                                  learning_rate=rate + 0.0 * value, iterate=x_new,
                                  grad_nonfinite=grad_nonfinite)

    def _fisher_step(self, state: MCMCSGDState, grad: Any, k: Any, theta: dict[str, Any], z: Any,
                     units: Any, key: Any) -> tuple[Any, dict[str, Any], Any]:
        """Fisher scoring (:mod:`.preconditioned`): ``Ĥ_k`` = the prior's information at one prior draw of every
        unit plus the likelihood's observed information at the chains ``z`` (the mini-batch's, rescaled as the
        gradient), ``Γ_k = Γ_{k−1} + γ_k (Ĥ_k − Γ_{k−1})``, then the heavy-ball or the γ-step; the Adam step where
        Γ or the step is not finite.  Returns ``(θ_k, optimiser state, rate)``."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        opt = state.opt
        fixed = {n: v for n, v in theta.items() if n not in self.names}
        total = self._total_units
        scale = total / (total if units is None else self.batch_size)
        t = k - self.burn_in
        #: the heavy-ball steps: gradient steps 1 .. momentum_steps (a traced condition on JAX)
        momentum = t <= self.momentum_steps
        if self.schedule == "sem":
            gamma = 1.0
        else:
            def decayed() -> Any:
                return preconditioned.gamma_of(t, self.average_from - self.burn_in)

            gamma = decayed() if not self.momentum_steps else ops.cond(momentum, lambda: 1.0, decayed)
        prior = self._prior_only

        def refreshed() -> Any:
            closed = self._closed_form_information(theta, z, prior, state.x, scale)
            if closed is not None:
                return opt["gamma"] + gamma * (ops.all_sum(closed) - opt["gamma"])
            one = self._one_unit_sigma_points(theta, z, prior)
            if one is not None:  # every unit's prior the same: one unit's expected information, times the units
                z_one, count = one

                def one_unit(x: Any) -> Any:
                    th = dict(fixed)
                    th.update(model.constrain(unflatten(x, self.names, self._shapes)))
                    return (scale * count) * xp.mean(xp.sum(prior(th, z_one, None), -1))

                info = ops.all_sum(preconditioned.information(ops, one_unit, state.x))
                return opt["gamma"] + gamma * (info - opt["gamma"])
            if self.information == "exact":  # the expectation over the prior, exactly: its sigma points
                z_prior = self._sigma_points(theta, z, units)
            else:
                z_prior = self._prior_draw(state, theta, z, units, ops.split(key)[1], k)

            def log_terms(x: Any) -> Any:
                th = dict(fixed)
                th.update(model.constrain(unflatten(x, self.names, self._shapes)))
                if prior is not None:  # the likelihood's information is 0: θ does not enter it (pruned gradient)
                    return scale * xp.mean(xp.sum(prior(th, z_prior, units), -1))
                # the prior's term at the prior's points, the likelihood's at the chains, each from its own evaluation:
                # the likelihood need not be defined at a prior point (``log α`` at an ``α ~ Normal`` below 0, outside
                # the posterior's support: NaN), and a NaN evaluated there, even if sliced away, makes the Hessian NaN
                # (0 · NaN in its backward pass)
                lp = self._log_densities(th, z_prior, units)[1]
                ll = self._log_densities(th, z, units)[0]
                return scale * (xp.mean(xp.sum(lp, -1)) + xp.mean(xp.sum(ll, -1)))

            info = ops.all_sum(preconditioned.information(ops, log_terms, state.x))
            return opt["gamma"] + gamma * (info - opt["gamma"])

        every = self.information_every  # Γ refreshed at gradient steps 1, 1 + m, 1 + 2m, ... (kept in between)
        big_gamma = refreshed() if every == 1 else ops.cond((t - 1) % every == 0, refreshed, lambda: opt["gamma"])
        direction, ok = preconditioned.solve(ops, big_gamma, grad)
        zero = 0.0 * direction[0]  # the rate reported in the step's dtype, alike from both branches

        def heavy_ball() -> tuple[Any, Any]:
            rate, mu = preconditioned.momentum_of(t, self.momentum_steps)
            return preconditioned.trust_region(ops, rate * direction) + mu * (state.x - opt["prev"]), rate + zero

        def scoring() -> tuple[Any, Any]:
            return preconditioned.trust_region(ops, gamma * direction), gamma + 0.0 * t + zero

        step, rate = scoring() if not self.momentum_steps else ops.cond(momentum, heavy_ball, scoring)
        x_new, adam = ops.cond(ok, lambda: (state.x + step, opt["adam"]),  # the Adam step only where Γ fails
                               lambda: self._optimizer.update(grad, opt["adam"], state.x))
        return x_new, {"gamma": xp.where(ok, big_gamma, opt["gamma"]), "prev": state.x, "adam": adam}, rate

    def _prior_draw(self, state: MCMCSGDState, theta: dict[str, Any], z: Any, units: Any, key: Any, k: Any) -> Any:
        """One draw ``z' ~ p(z; θ)`` of the (mini-batch's) units, shaped as the chains ``z``: from ``key``, or with
        ``rng="per_unit"`` from each unit's own stream at ``(iteration k, PRIOR_DRAW_TAG)`` (apart from the kernels'
        draws, which fold in step numbers), so that Γ too does not depend on the order or sharding of the units."""
        if self._no_units(units):
            return z
        if state.stream is None:
            return self.model.sample_prior(theta, key, int(z.shape[0]), units)
        ops = self.ops
        kk = ops.fold_in(ops.fold_in(state.stream, k), PRIOR_DRAW_TAG)
        return self.model.prior_transform(theta, self.sim_ops(units).normal(kk, tuple(z.shape)), units)

    def _sigma_points(self, theta: dict[str, Any], z: Any, units: Any) -> Any:
        """The ``2 d`` sigma points ``z = μ_i + L (±√d e_j)`` ``[2d, b, d]`` of every (mini-batch's) unit's Gaussian
        prior: their mean of a quadratic function of ``z`` (the log-prior's Hessian in θ) is its expectation under the
        prior exactly (their first three moments are the prior's).  Deterministic: no stream is drawn from."""
        if self._no_units(units):
            return z
        d, n = int(z.shape[-1]), int(z.shape[1])
        e = np.sqrt(d) * np.concatenate([np.eye(d), -np.eye(d)])  # [2d, d]
        eps = self.ops.asarray(np.ascontiguousarray(np.broadcast_to(e[:, None, :], (2 * d, n, d))), dtype=None)
        return self.model.prior_transform(theta, eps + 0.0 * z[:1], units)

    def _closed_form_information(self, theta: dict[str, Any], z: Any, prior: Any, x: Any, scale: Any) -> Any:
        """``information="exact"``, the pruned gradient, every unit's prior the same and its information in closed
        form (the adapters' ``Normal(μ, σ)`` patterns, ``prior.information``): ``Γ = scale · b · Jᵀ I₁ J``, ``I₁`` one
        unit's diagonal information in the constrained parameters, ``J = ∂θ/∂x`` the Jacobian of the constraining
        transforms at the iterate, ``b`` this process's units of the mini-batch — the expected information of the
        sigma points, Hessian-free (it is ``Jᵀ I J`` because the prior's expected score is 0).  None where it does not
        apply (then :meth:`_one_unit_sigma_points` or the sigma points of every unit)."""
        if self._one_unit_sigma_points(theta, z, prior, points=False) is None:
            return None
        info_of = getattr(prior, "information", None)
        if info_of is None:
            return None
        ops, xp, model = self.ops, self.ops.xp, self.model
        fixed = {n: v for n, v in theta.items() if n not in self.names}
        info = info_of({n: ops.stop_gradient(v) for n, v in theta.items()})
        sizes = {n: int(np.prod(self._shapes[n])) if self._shapes[n] else 1 for n in self.names}
        if self._closed_form_sizes is None:  # a parameter of the prior fixed, or a free one resized when constrained
            self._closed_form_sizes = not (set(info) - set(self.names)) and all(
                int(np.size(ops.to_numpy(model.params[n].value))) == sizes[n] for n in self.names)
        if not self._closed_form_sizes:
            return None
        diag = xp.concatenate([xp.reshape(info[n], (-1,)) if n in info else ops.zeros((sizes[n],), dtype=x.dtype)
                               for n in self.names])

        count = scale * int(z.shape[1])
        slopes = self._elementwise_slopes(x)
        if slopes is not None:  # J diagonal: Γ = diag(J² I₁) (the transforms' own log|dθ/dx|, no autodiff)
            return count * xp.diag(slopes * (diag * slopes))  # the products of Jᵀ (I₁ J)'s diagonal, in its order

        def constrained(v: Any) -> Any:
            th = dict(fixed)
            th.update(model.constrain(unflatten(v, self.names, self._shapes)))
            return xp.concatenate([xp.reshape(th[n], (-1,)) for n in self.names])

        jac = ops.jacobian(constrained)(x)  # [p, p]
        return count * (xp.swapaxes(jac, -1, -2) @ (diag[:, None] * jac))

    def _elementwise_slopes(self, x: Any) -> Any:
        """``|dθ_j/dx_j|`` ``[p]`` where every free parameter's constraining transform is elementwise (``event_dim``
        0: identity, exp, softplus, affine, sigmoid, ...), from its ``log_abs_det_jacobian``; else None."""
        ops, xp = self.ops, self.ops.xp
        out = []
        for n, x_n in unflatten(ops.stop_gradient(x), self.names, self._shapes).items():
            t = self.model.params[n].to_constrained
            event_dim = getattr(t, "event_dim", getattr(getattr(t, "domain", None), "event_dim", None))
            log_det = getattr(t, "log_abs_det_jacobian", None)
            if event_dim != 0 or log_det is None:
                return None
            out.append(xp.reshape(xp.exp(log_det(x_n, t(x_n)) + 0.0 * x_n), (-1,)))
        return xp.concatenate(out)

    def _one_unit_sigma_points(self, theta: dict[str, Any], z: Any, prior: Any,
                               points: bool = True) -> tuple[Any, int] | None:
        """``information="exact"`` with the pruned gradient's closed-form prior, the same for every unit
        (``same_for_every_unit``, the Pyro / NumPyro adapters' Gaussian patterns, whose parameters are params): the
        sigma points ``[2d, 1, d]`` of one unit and the number of units they stand for (this process's units of the
        mini-batch).  The information Σ_i E[−∇² log p(z_i; θ)] is then that count times one unit's: the same value
        as the sigma points of every unit (up to rounding), from 2d points instead of 2d × N (on
        benchmarks/mcmcsgd_logistic.py, N = 400: 3.1 → 0.8 ms per Fisher step).  None where it does not apply
        (the draw, no closed form, a padded or masked model, a mini-batch holding no unit here)."""
        if (self.information != "exact" or prior is None or not getattr(prior, "same_for_every_unit", False)
                or self._masked_batches or int(z.shape[1]) == 0):
            return None
        if not points:
            return z, int(z.shape[1])
        mean, chol = prior.moments({n: self.ops.stop_gradient(v) for n, v in theta.items()})
        d = int(z.shape[-1])
        e = np.sqrt(d) * np.concatenate([np.eye(d), -np.eye(d)])  # [2d, d]
        points = mean + self.ops.asarray(e, dtype=None) @ self.ops.xp.swapaxes(chol, -1, -2)
        return self.ops.asarray(points, dtype=z.dtype)[:, None, :], int(z.shape[1])

    @staticmethod
    def _no_units(units: Any) -> bool:
        """A distributed fit's process may hold none of a mini-batch's units: it then evaluates nothing (its
        sums are 0) but joins every all-reduce of the step."""
        return units is not None and int(units.shape[0]) == 0

    def _log_densities(self, theta: dict[str, Any], z: Any, units: Any) -> tuple[Any, Any]:
        if self._no_units(units):
            return z[..., 0] * 0.0, z[..., 0] * 0.0
        return self.model.log_densities(theta, z, units)

    def _log_joint(self, theta: dict[str, Any], z: Any, units: Any, x: Any = None) -> Any:
        """``log p(y_i, z_i; θ)`` ``[L, b]`` (no units: an empty array, kept on the graph of ``x``)."""
        if self._no_units(units):
            return z[..., 0] * 0.0 + (0.0 if x is None else 0.0 * self.ops.xp.sum(x))
        return self.model.log_joint(theta, z, units)

    def _simulate(self, state: MCMCSGDState, theta: dict[str, Any], z: Any, units: Any, k: Any,
                  key: Any) -> tuple[Any, MCMCSGDState, dict[str, Any], Any, Any]:
        """The kernels' sweep: ``(z, state, acceptance rates, non-finite count, log p(y, z; θ) [L, b] of the new
        z)``."""
        model, ops = self.model, self.ops
        sim = self.sim_ops(units)
        if self.kernel == "saemix":
            if self.rng == "per_unit":
                shape = tuple(z.shape)

                def sample_prior(kk: Any) -> Any:
                    return model.prior_transform(theta, sim.normal(kk, shape), units)
            else:
                def sample_prior(kk: Any) -> Any:
                    return model.sample_prior(theta, kk, self.num_chains, units)
            chain, scales, acc = mcmc.saemix_sweep(
                sim, key, z, (state.scale_rw, state.scale_block), k, self.mcmc_steps,
                evaluate=lambda zz: self._log_densities(theta, zz, units), sample_prior=sample_prior)
            return (chain.z, state._replace(scale_rw=scales[0], scale_block=scales[1]), acc, chain.num_nonfinite,
                    chain.log_lik + chain.log_prior)

        def value_and_grad(zz: Any) -> tuple[Any, Any]:
            if self._no_units(units):
                return zz[..., 0] * 0.0, zz * 0.0
            v, g, _ = ops.value_grad_hessian(lambda x: model.log_joint(theta, x, units), zz, hessian=False)
            return v, g

        log_step_all = state.log_step
        log_step = log_step_all if units is None else ops.take(log_step_all, self._in_block(units))
        lt, g = value_and_grad(z)
        chain = mcmc.GradChainState(z, lt, g, (lt == lt).sum() * 0.0)
        keys = sim.split(key, self.mcmc_steps)

        def body(i: Any, carry: Any) -> Any:
            ch, ls, rate = carry
            ch, a = mcmc.mala(sim, keys[i], ch, ls, value_and_grad)
            return ch, mcmc.adapt_log_step(ls, a), rate + sim.unit_mean(a) / self.mcmc_steps

        chain, log_step, rate = ops.fori_loop(0, self.mcmc_steps, body, (chain, log_step, ops.zeros(())))
        log_step_all = log_step if units is None else ops.scatter(log_step_all, units, log_step)
        return chain.z, state._replace(log_step=log_step_all), {"mala": rate}, chain.num_nonfinite, chain.log_target

    # ----- the random-stopping report ------------------------------------------------------------------
    def run(self, key: Any = None, **run_options: Any) -> FitResult:
        """:meth:`Engine.run` (checkpoint options included), then the random-stopping report."""
        fit = super().run(key, **run_options)
        self.random_stop = self._random_stop(fit)
        return fit

    def _random_stop(self, fit: FitResult) -> RandomStop | None:
        """Draw ``N`` with ``P(N = ℓ) ∝ η_{ℓ+1}`` over the gradient steps; report the iterate and ‖ĝ‖² there."""
        done = fit.num_iterations  # fewer than num_iters when the run was interrupted
        steps = np.arange(1, done - self.burn_in + 1)
        if not len(steps):
            return None
        rates = np.asarray(fit.history.get("learning_rate", np.ones(done)))[self.burn_in:]
        rates = np.where(np.isfinite(rates) & (rates > 0), rates, 0.0)
        if rates.sum() <= 0:
            rates = np.ones_like(rates)
        n = int(np.random.default_rng(self.seed).choice(len(steps), p=rates / rates.sum()))
        k = self.burn_in + n  # 0-based row of the history (iteration k + 1)
        ops = self.ops
        theta_u = dict(fit.state.theta_u)
        theta_u.update(unflatten(ops.asarray(fit.history["iterate"][k]), self.names, self._shapes))
        theta = {n: ops.to_numpy(v) for n, v in self.model.constrain(theta_u).items()}
        return RandomStop(iteration=k + 1, theta=theta, grad_norm2=float(fit.history["grad_norm2"][k]))


def prior_only_log_density(model: LatentModel, names: list[str], shapes: dict[str, tuple[int, ...]],
                           theta: dict[str, Any], z: Any = None) -> Any:
    """The pruned complete-data density: where the likelihood ``log p(y | z; θ)`` does not depend on the free
    parameters ``names`` (``∇_θ log p(y, z; θ) = ∇_θ log p(z; θ)``), the model's closed-form log-prior
    (:meth:`~latentfit.inference.model.LatentModel.closed_form_log_prior`), ``(theta, z, units) -> [..., n]``; else
    None.

    The independence is structural, read from the model's own computation at ``(theta, z)`` (``ops.depends_on``: no
    operation from θ to the observed sites' log-densities, whatever the values), and the closed form is checked
    against the model's: the gradients of ``Σ log p(y, z; θ)`` and of ``Σ`` the closed form at ``(theta, z)`` must agree
    to 1e-10 (relative), else None.  On the logistic mixed model of benchmarks/mcmcsgd_logistic.py the gradient then
    skips the model's program (its forward pass over the 6 000 rows): 0.55 → about 0.1 ms per evaluation (Pyro)."""
    prior = model.closed_form_log_prior()
    if prior is None or not names:
        return None
    ops, xp = model.ops, model.ops.xp
    if z is None:  # draws to check at (a key of their own: the fit's streams are not touched)
        z = model.sample_prior(theta, ops.key(0), 1)
    fixed = {n: v for n, v in theta.items() if n not in names}
    x0 = ops.stop_gradient(flatten(ops, model.unconstrain({n: theta[n] for n in names}), names))
    z = ops.stop_gradient(z)

    def at(x: Any) -> dict[str, Any]:
        th = dict(fixed)
        th.update(model.constrain(unflatten(x, names, shapes)))
        return th

    if ops.depends_on(lambda x: xp.sum(model.log_lik(at(x), z)), x0):
        return None
    def gradients(x: Any, zz: Any) -> tuple[Any, Any]:
        return (ops.grad(lambda v: xp.sum(model.log_joint(at(v), zz)))(x),
                ops.grad(lambda v: xp.sum(prior(at(v), zz, None)))(x))

    # one compiled program on JAX (not some 150 eager operations, each compiled: 3 s of a fit's set-up on the benchmark)
    g_full, g_prior = (ops.to_numpy(g) for g in ops.jit(gradients)(x0, z))
    if not (np.all(np.isfinite(g_full)) and np.allclose(g_prior, g_full, rtol=1e-10,
                                                         atol=1e-10 * (1.0 + np.max(np.abs(g_full))))):
        return None
    return prior


def polyak_ruppert(x_avg: Any, x_new: Any, count: Any) -> Any:
    """``θ̄_m = θ̄_{m−1} + (θ_m − θ̄_{m−1}) / m``: the running mean of the ``m = count`` iterates since averaging began
    (Polyak & Juditsky 1992; Ruppert 1988).  With steps ``η_t ∝ t^{−α}``, ``½ ≤ α < 1`` (or a constant step on a
    quadratic), its error falls like ``1/√m`` — the optimal ``H⁻¹ΣH⁻¹/m`` covariance — while the last iterate keeps
    an ``O(η_t)`` noise."""
    return x_avg + (x_new - x_avg) / count


def linear_average(x_avg: Any, x_new: Any, count: Any) -> Any:
    """``θ̄_m = θ̄_{m−1} + 2 (θ_m − θ̄_{m−1}) / (m + 1)``: the mean of the ``m = count`` iterates since averaging began
    weighted by their index (``θ̄_m = Σ_j j θ_j / Σ_j j``), the polynomial-decay average with η = 1 (Shamir & Zhang,
    ICML 2013).  It forgets the first iterates (a transient not yet over when averaging began) faster than the
    uniform mean, at a variance 4/3 of the uniform mean's over the same iterates."""
    return x_avg + 2.0 * (x_new - x_avg) / (count + 1.0)


def _default_rate(rate: float, decay_from: int) -> Any:
    """``η_t = rate`` for ``t ≤ decay_from``, then ``rate / √(t − decay_from)``."""

    def schedule(t: Any) -> Any:
        over = t - decay_from
        return rate * (over <= 0) + rate * (over > 0) / (over * (over > 0) + 1.0 * (over <= 0)) ** 0.5

    return schedule


def _scatter_units(ops: Any, z_all: Any, units: Any, z: Any) -> Any:
    """``z_all[:, units] = z`` without mutation (units on axis 1)."""
    return ops.scatter_axis1(z_all, units, z)


__all__ = ["KERNELS", "MCMCSGD", "RandomStop", "linear_average", "polyak_ruppert", "prior_only_log_density"]
