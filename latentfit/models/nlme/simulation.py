"""Simulating an NLME's observations at given parameter values (the bound table's design, doses and covariates)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import outcomes as _outcomes

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import NLME


def simulate(model: NLME, theta: dict[str, Any] | None = None, seed: int = 0) -> pd.DataFrame:
    """A copy of the bound table with ``DV`` simulated from the model at ``theta`` (default: initial values)."""
    model._require_data()
    ops = model.ops
    theta = model.init_params() if theta is None else {
        n: ops.asarray(v) if not hasattr(v, "shape") or isinstance(v, np.ndarray | np.generic) else v
        for n, v in {**model.init_params(), **theta}.items()}
    if model.outcome is not None:
        return _outcomes.simulate(model, theta, seed)
    with ops.seed_context(seed):
        k1, k2 = ops.split(ops.key(seed))
        z = model.sample_prior(theta, k1, 1)[0]
        mean, sd = model.predict(theta, z)
        eps = ops.normal(k2, tuple(mean.shape))
    y = ops.to_numpy(mean + sd * eps)
    if model.error == "exponential":
        y = np.exp(y)
    out = model.table  # a new DataFrame (rebuilt from the model's compact copy of the bound table)
    dv_col = model.data.columns["dv"]
    out[dv_col] = out[dv_col].astype(float)
    rows = model.data.obs_rows
    valid = rows >= 0
    out.iloc[rows[valid], out.columns.get_loc(dv_col)] = y[valid]
    return out


__all__ = ["simulate"]
