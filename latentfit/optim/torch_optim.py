"""PyTorch optimisers: :class:`AMSGrad`, :class:`OptAMSGrad` and the :class:`HWA` averaging wrapper.

Usable on their own or through Pyro (``pyro.optim.PyroOptim(OptAMSGrad, {"lr": 1e-2})``). Importing this module
does not import jax or optax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from latentfit.optim._checks import (
    check_adam_args,
    check_every,
    check_nonneg,
    check_predictor,
    check_second_moment,
)

__all__ = ["AMSGrad", "HWA", "OptAMSGrad", "pyro_hwa", "pyro_hwa_averages"]


class AMSGrad(torch.optim.Adam):
    """AMSGrad (Reddi, Kale & Kumar 2018) as PyTorch implements it: ``torch.optim.Adam(..., amsgrad=True)``.

    Torch's rule (bias-corrected, ε outside the root, the maximum taken over the *uncorrected* second moment)::

        m_t = β1 m_{t-1} + (1-β1) g_t,   v_t = β2 v_{t-1} + (1-β2) g_t²,   v^max_t = max(v^max_{t-1}, v_t)
        w_t = w_{t-1} - lr/(1-β1^t) · m_t / (sqrt(v^max_t / (1-β2^t)) + ε)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_adam_args(lr, betas, eps, weight_decay)
        kwargs.pop("amsgrad", None)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=True, **kwargs)


def _predict_next(history: list[torch.Tensor], predictor: str, span: int, reg: float) -> torch.Tensor:
    """The guess m_{t+1} of the next gradient from the stored ones (oldest first, newest last)."""
    if predictor == "last" or len(history) < span:
        return history[-1]
    if predictor == "mean":
        return torch.stack(history).mean(0)
    # regularised minimal polynomial extrapolation (Scieur, d'Aspremont & Bach 2016) of x_0..x_{r-1}
    x = torch.stack([h.reshape(-1) for h in history])  # (r, d)
    u = x[1:] - x[:-1]  # (r-1, d): rows x_{i+1} - x_i
    gram = u @ u.T
    scale = torch.linalg.matrix_norm(gram, ord=2)
    if scale > 0:
        gram = gram / scale
    ones = torch.ones(gram.shape[0], dtype=x.dtype, device=x.device)
    z = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=x.dtype, device=x.device), ones)
    c = z / z.sum()
    return (c @ x[:-1]).reshape(history[-1].shape)


class OptAMSGrad(torch.optim.Optimizer):
    """OPT-AMSGrad (Wang, Li, Karimi & Li 2019, "An Optimistic Acceleration of AMSGrad for Nonconvex
    Optimization", arXiv:1903.01435, Algorithm 2), one step per gradient g_t evaluated at the parameters w_t::

        θ_t = β1 θ_{t-1} + (1-β1) g_t,   v_t = β2 v_{t-1} + (1-β2) g_t²,   v̂_t = max(v̂_{t-1}, v_t)
        w_{t+1/2} = w_{t-1/2} - η θ_t / sqrt(v̂_t)                    (auxiliary sequence, w_{-1/2} = w_1)
        h_{t+1}  = β1 θ_{t-1} + (1-β1) m_{t+1}                         (m_{t+1}: prediction of g_{t+1})
        w_{t+1}  = w_{t+1/2} - η h_{t+1} / sqrt(v̂_t)

    with θ_0 = v_0 = 0 and v̂_0 = ε (the paper's ε: the initial v̂, no ε added to the denominator, no bias
    correction). The prediction m_{t+1} is ``predictor="last"``: g_t (so h_{t+1} = θ_t); ``"mean"``: the mean of the
    last ``span`` gradients; ``"extrapolation"``: the paper's choice, regularised minimal polynomial extrapolation
    (Scieur et al. 2016) of the last ``span`` gradients x_0..x_{r-1}: U = [x_1-x_0, ..., x_{r-1}-x_{r-2}],
    (UᵀU/‖UᵀU‖₂ + λI) z = 1, c = z/Σz, m = Σ_{i<r-1} c_i x_i (per parameter tensor; g_t until ``span`` gradients
    are stored). ``weight_decay`` adds ``weight_decay · w_t`` to g_t (L2, as torch's Adam). The learning rate of a
    group is used for both half-steps (η_t = η_{t+1}).

    ``second_moment="residual"`` makes v average the prediction error instead, v_t = β2 v_{t-1} + (1-β2)(g_t - m_t)²
    (m_t: the prediction of g_t made at the previous step, m_1 = 0), so that the steps scale with how well the
    gradients are predicted, as in optimistic online learning.

    Provenance: the algorithm box of arXiv:1903.01435 could not be retrieved from the stored copies searchable here
    (the copies found, of the 2021 version and of the 2019 one, "Optimistic Adaptive Acceleration for
    Optimization", stop at the introduction). The rule above is Algorithm 2 as recalled (h_{t+1} built from
    β1 θ_{t-1}, both half-steps divided by sqrt(v̂_t)). The authors' released PyTorch code for the 2019 version
    (repository "optimistic_amsgrad", ``Optadam_torch``) agrees on h_{t+1} and the two half-steps, and differs in
    three points: its v averages (g_t - m_t)² (``second_moment="residual"`` here), its m_{t+1} is the gradient
    evaluated at a regularised-MPE extrapolation of the last 5 *iterates* (a second gradient evaluation per step,
    on an auxiliary copy of the network; not offered here), and it uses Adam's bias corrections with ε added to
    sqrt(v̂) (v̂_0 = 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        predictor: str = "last",
        span: int = 5,
        reg: float = 1e-8,
        second_moment: str = "grad",
    ) -> None:
        check_adam_args(lr, betas, eps, weight_decay)
        check_second_moment(second_moment)
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0 (it is the initial v̂ of OPT-AMSGrad), got {eps!r}")
        check_predictor(predictor, span)
        check_nonneg(reg, "reg")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, predictor=predictor, span=span, reg=reg,
                        second_moment=second_moment)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One OPT-AMSGrad step on every parameter with a gradient; returns ``closure()`` when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OptAMSGrad does not support sparse gradients")
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["max_exp_avg_sq"] = torch.full_like(p, float(group["eps"]))
                    state["half"] = p.detach().clone()
                    state["history"] = []
                    state["prediction"] = torch.zeros_like(p)  # m_1 = 0
                state["step"] += 1
                theta_prev = state["exp_avg"].clone()
                state["exp_avg"].mul_(b1).add_(g, alpha=1.0 - b1)
                if "prediction" not in state:  # a state saved before the option existed
                    state["prediction"] = torch.zeros_like(p)
                r = g - state["prediction"] if group.get("second_moment", "grad") == "residual" else g
                state["exp_avg_sq"].mul_(b2).addcmul_(r, r, value=1.0 - b2)
                torch.maximum(state["max_exp_avg_sq"], state["exp_avg_sq"], out=state["max_exp_avg_sq"])
                denom = state["max_exp_avg_sq"].sqrt()
                state["half"].addcdiv_(state["exp_avg"], denom, value=-lr)
                history = state["history"]
                history.append(g.detach().clone())
                del history[: max(0, len(history) - int(group["span"]))]
                guess = _predict_next(history, group["predictor"], int(group["span"]), float(group["reg"]))
                state["prediction"] = guess.detach().clone()
                h = theta_prev.mul_(b1).add_(guess, alpha=1.0 - b1)
                p.copy_(state["half"]).addcdiv_(h, denom, value=-lr)
        return loss


class HWA:
    """Hyper-parameter weight averaging of a torch optimiser's parameters (mean-field VI: average the variational
    parameters along the run).

    ``step()`` steps ``optimizer``; after the k-th step (k = 0, 1, ...) with k % every == 0, n = k // every::

        μ_HWA ← (n μ_HWA + w) / (n + 1),   s_HWA ← (n s_HWA + w²) / (n + 1),   σ²_HWA = s_HWA - μ_HWA²

    so the averages are the running means of the snapshots taken after steps 1, every+1, 2·every+1, ...
    ``averaged()`` / ``variances()`` map each parameter tensor to its average; ``swap()`` exchanges parameters and
    averages (call again to undo); ``with hwa.averaged_parameters(): ...`` loads the averages for the block.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int = 1) -> None:
        self.every = check_every(every)
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "param_groups"):
            raise ValueError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.k = 0
        self.n_averaged = 0
        self._mean: dict[torch.Tensor, torch.Tensor] = {}
        self._sq: dict[torch.Tensor, torch.Tensor] = {}
        self._swapped = False

    # the torch-optimizer surface, delegated
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step the wrapped optimiser, then fold the parameters into the averages every ``every`` steps."""
        if self._swapped:
            raise RuntimeError("HWA.step() with the averages loaded: call swap() again first")
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if self.k % self.every == 0:
            n = self.n_averaged
            for p in self._params():
                w = p.detach()
                if n == 0:
                    self._mean[p] = w.clone()
                    self._sq[p] = w * w
                else:
                    self._mean[p].mul_(n).add_(w).div_(n + 1)
                    self._sq[p].mul_(n).addcmul_(w, w).div_(n + 1)
            self.n_averaged = n + 1
        self.k += 1
        return loss

    def averaged(self) -> dict[torch.Tensor, torch.Tensor]:
        """{parameter: HWA mean μ_HWA} (copies)."""
        return {p: m.clone() for p, m in self._mean.items()}

    def second_moments(self) -> dict[torch.Tensor, torch.Tensor]:
        """{parameter: running mean of w²}."""
        return {p: s.clone() for p, s in self._sq.items()}

    def variances(self) -> dict[torch.Tensor, torch.Tensor]:
        """{parameter: σ²_HWA = mean of w² - μ_HWA²} (clamped at 0 against rounding)."""
        return {p: (self._sq[p] - m * m).clamp_min(0.0) for p, m in self._mean.items()}

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parameters' values and their averages (a second call restores them)."""
        if not self._mean:
            raise RuntimeError("HWA.swap(): no average yet, take a step first")
        for p, m in self._mean.items():
            tmp = p.detach().clone()
            p.copy_(m)
            m.copy_(tmp)
        self._swapped = not self._swapped

    @contextlib.contextmanager
    def averaged_parameters(self) -> Iterator[None]:
        """Context manager: the parameters hold the averages inside the block, their own values after it."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self) -> dict[str, Any]:
        params = self._params()
        return {
            "inner": self.optimizer.state_dict(),
            "k": self.k,
            "n_averaged": self.n_averaged,
            "mean": [self._mean[p].clone() if p in self._mean else None for p in params],
            "sq": [self._sq[p].clone() if p in self._sq else None for p in params],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["inner"])
        self.k = int(state_dict["k"])
        self.n_averaged = int(state_dict["n_averaged"])
        for p, m, s in zip(self._params(), state_dict["mean"], state_dict["sq"]):
            if m is not None:
                self._mean[p] = m.clone().to(p)
                self._sq[p] = s.clone().to(p)

    def __repr__(self) -> str:
        return f"HWA(every={self.every}, {self.optimizer!r})"


def pyro_hwa(
    optim_constructor: Callable[..., torch.optim.Optimizer], optim_args: dict[str, Any], every: int = 1
) -> Any:
    """A ``pyro.optim.PyroOptim`` whose per-parameter optimisers are ``HWA(optim_constructor(...), every)``."""
    import pyro.optim

    every = check_every(every)

    def constructor(params: Any, **kwargs: Any) -> HWA:
        return HWA(optim_constructor(params, **kwargs), every=every)

    return pyro.optim.PyroOptim(constructor, optim_args)


def pyro_hwa_averages(optim: Any, constrained: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{Pyro param name: (HWA mean, HWA variance)} of a :func:`pyro_hwa` optimiser after SVI.

    The averages are taken over Pyro's unconstrained values; with ``constrained=True`` the mean is mapped through
    the parameter's constraint (e.g. an ``AutoNormal`` scale: exp of the averaged log-scale) and the variance stays
    on the unconstrained scale.
    """
    import pyro
    from torch.distributions import transform_to

    store = pyro.get_param_store()
    constraints = store.get_state()["constraints"]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for p, opt in optim.optim_objs.items():
        if not isinstance(opt, HWA):
            raise ValueError("pyro_hwa_averages needs an optimiser built by pyro_hwa")
        name = store.param_name(p)
        mean, var = opt.averaged()[p], opt.variances()[p]
        if constrained:
            mean = transform_to(constraints[name])(mean)
        out[name] = (mean, var)
    return out
