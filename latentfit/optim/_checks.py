"""Argument checks shared by the torch and optax optimisers (no torch or jax import here)."""

from __future__ import annotations

import math
from typing import Any

PREDICTORS = ("last", "mean", "extrapolation")
SECOND_MOMENTS = ("grad", "residual")


def check_lr(lr: Any, name: str = "learning rate") -> None:
    """A fixed learning rate must be a finite float >= 0 (a callable schedule is left to the caller)."""
    if callable(lr):
        return
    try:
        value = float(lr)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number or a schedule, got {lr!r}") from err
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {lr!r}")


def check_beta(beta: Any, name: str) -> None:
    """Decay rates live in [0, 1)."""
    try:
        value = float(beta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number in [0, 1), got {beta!r}") from err
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {beta!r}")


def check_nonneg(value: Any, name: str) -> None:
    """Finite and >= 0 (eps, weight decay, regularisation)."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from err
    if not math.isfinite(v) or v < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_every(every: Any) -> int:
    """The averaging period of HWA: an integer >= 1."""
    if isinstance(every, bool) or not isinstance(every, int) and not (isinstance(every, float) and every.is_integer()):
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if int(every) < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    return int(every)


def check_predictor(predictor: str, span: Any) -> int:
    """The gradient predictor of OPT-AMSGrad and its span r (number of past gradients kept)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    if isinstance(span, bool) or not isinstance(span, int):
        raise ValueError(f"span must be an integer >= 2, got {span!r}")
    if predictor != "last" and span < 2:
        raise ValueError(f"span must be >= 2 for predictor={predictor!r}, got {span!r}")
    if predictor == "last" and span < 1:
        raise ValueError(f"span must be >= 1, got {span!r}")
    return span


def check_second_moment(second_moment: Any) -> str:
    """What OPT-AMSGrad's second moment averages: ``"grad"`` (g_t²) or ``"residual"`` ((g_t − m_t)²)."""
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(f"second_moment must be one of {SECOND_MOMENTS}, got {second_moment!r}")
    return str(second_moment)


def check_adam_args(lr: Any, betas: Any, eps: Any, weight_decay: Any = 0.0) -> None:
    """The common checks of the AMSGrad family (torch spelling: ``betas`` is a pair)."""
    check_lr(lr)
    try:
        b1, b2 = betas
    except (TypeError, ValueError) as err:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from err
    check_beta(b1, "beta1")
    check_beta(b2, "beta2")
    check_nonneg(eps, "eps")
    check_nonneg(weight_decay, "weight_decay")
