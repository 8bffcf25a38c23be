"""`FitResult`: what every engine returns (numpy values, backend-neutral)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class FitResult:
    """Estimates, history and latent draws of one fit.

    Attributes
    ----------
    params : dict of numpy arrays
        Final estimates θ̂ (constrained space).
    history : dict of numpy arrays
        Per-iteration records: ``theta.<name>`` ``[iters, *shape]``, ``objective`` (complete-data
        log-likelihood, averaged over chains), ``gamma``, acceptance rates ``acc.<kernel>``.
    latents : dict of numpy arrays
        Draws of the latent sites over the last iterations, ``[chain, draw, unit, *site_shape]``
        (constrained space).
    """

    engine: Any
    model: Any
    state: dict[str, Any]
    history: dict[str, np.ndarray]
    latent_draws: np.ndarray | None  # [L, draws, N, d] unconstrained
    elapsed: float
    init_time: float
    num_iterations: int
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # ----- estimates -------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        theta = self.engine.theta_of(self.state)
        return {n: self.model.ops.to_numpy(v) for n, v in theta.items()}

    @property
    def latents(self) -> dict[str, np.ndarray]:
        if self.latent_draws is None:
            return {}
        if "latents" not in self._cache:
            ops = self.model.ops
            z = ops.asarray(self.latent_draws)
            self._cache["latents"] = {n: ops.to_numpy(v) for n, v in self.model.unpack_latents(z).items()}
        return self._cache["latents"]

    @property
    def acceptance(self) -> dict[str, np.ndarray]:
        """Acceptance rate per kernel and iteration (``[iters]`` or ``[iters, d]``)."""
        return {n[len("acc."):]: v for n, v in self.history.items() if n.startswith("acc.")}

    @property
    def time_per_iteration(self) -> float:
        return (self.elapsed - self.init_time) / max(self.num_iterations, 1)

    def param_table(self) -> list[tuple[str, float]]:
        """Flat list of ``(label, value)``, one per scalar element of every parameter."""
        rows = []
        for name, value in self.params.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                rows.append((name, float(arr)))
            else:
                for idx in np.ndindex(arr.shape):
                    rows.append((f"{name}[{','.join(map(str, idx))}]", float(arr[idx])))
        return rows

    def summary(self):
        """pandas table of the estimates (with SE and RSE% once standard errors are computed)."""
        import pandas as pd

        rows = self.param_table()
        df = pd.DataFrame({"estimate": [v for _, v in rows]}, index=[n for n, _ in rows])
        se = self._cache.get("se")
        if se is not None:
            df["se"] = [se.get(n, np.nan) for n, _ in rows]
            df["rse%"] = 100.0 * df["se"] / df["estimate"].abs()
        df.index.name = "parameter"
        return df

    # ----- plots and interop -----------------------------------------------------------------------
    def plot_convergence(self, params: list[str] | None = None, ncols: int = 3, figsize=None):
        """One panel per scalar parameter against the iteration (saemix's convergence plot)."""
        import matplotlib.pyplot as plt

        series = []
        for name, values in self.history.items():
            if not name.startswith("theta."):
                continue
            pname = name[len("theta."):]
            if params is not None and pname not in params:
                continue
            arr = values.reshape(values.shape[0], -1)
            for j in range(arr.shape[1]):
                label = pname if arr.shape[1] == 1 else f"{pname}[{j}]"
                series.append((label, arr[:, j]))
        if "objective" in self.history and params is None:
            series.append(("complete-data log-lik", self.history["objective"]))
        n = len(series)
        nrows = int(np.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, min(ncols, n), figsize=figsize or (4 * min(ncols, n), 2.6 * nrows),
                                 squeeze=False)
        iters = np.arange(1, self.num_iterations + 1)
        for ax, (label, y) in zip(axes.flat, series):
            ax.plot(iters[: len(y)], y, lw=1)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("iteration")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        return fig

    def to_arviz(self):
        """The installed arviz's native object (InferenceData on 0.x, DataTree on 1.x)."""
        from latentfit.integrations.arviz import to_arviz

        return to_arviz(self)

    def __repr__(self) -> str:
        est = ", ".join(f"{n}={v:.4g}" for n, v in self.param_table()[:8])
        return f"FitResult({self.engine.name}, {self.num_iterations} iterations, {est})"
