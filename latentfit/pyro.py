"""Engines for plain Pyro models: ``from latentfit.pyro import SAEM``.

Each engine wraps a Pyro model function: ``Engine(model, **options).run(*args, **kwargs)`` traces
``model(*args, **kwargs)``, fits it, writes the estimates back into Pyro's param store and returns
a :class:`~latentfit.inference.results.FitResult`.

Example
-------
A random-intercept model ``y_ij = b_i + ε_ij``, ``b_i ~ N(μ, ω²)``, ``ε_ij ~ N(0, σ²)``, fitted by SAEM; its
maximum-likelihood estimate is known in closed form, and SAEM finds it up to Monte-Carlo error:

>>> import pyro, pyro.distributions as dist, torch
>>> from torch.distributions import constraints
>>> def model(y):
...     mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
...     omega = pyro.param("omega", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
...     sigma = pyro.param("sigma", torch.tensor(1.0, dtype=y.dtype), constraint=constraints.positive)
...     with pyro.plate("unit", y.shape[0], dim=-2):
...         b = pyro.sample("b", dist.Normal(mu, omega))
...         with pyro.plate("obs", y.shape[1], dim=-1):
...             pyro.sample("y", dist.Normal(b, sigma), obs=y)
>>> g = torch.Generator().manual_seed(0)
>>> y = (1.0 + 0.8 * torch.randn(50, 1, generator=g, dtype=torch.float64)      # μ + (b_i − μ): ω = 0.8
...      + 0.5 * torch.randn(50, 6, generator=g, dtype=torch.float64))     # + ε_ij: σ = 0.5
>>> pyro.clear_param_store()
>>> fit = SAEM(model, num_iters=(100, 100), seed=0, progress=False).run(y)
>>> ybar = y.mean(1)
>>> s2 = float(((y - ybar[:, None]) ** 2).sum()) / (50 * 5)         # the closed-form MLE
>>> mle = {"mu": float(y.mean()), "omega": (float(ybar.var(unbiased=False)) - s2 / 6) ** 0.5, "sigma": s2 ** 0.5}
>>> {k: round(v, 2) for k, v in mle.items()}
{'mu': 0.99, 'omega': 0.81, 'sigma': 0.5}
>>> all(abs(float(fit.params[k]) - mle[k]) < 0.02 for k in mle)
True
>>> bool(pyro.param("mu").detach() == float(fit.params["mu"]))   # written back to Pyro's param store
True
>>> list(fit.summary().columns)                                   # estimate, standard error, relative SE
['estimate', 'se', 'rse%']
"""

from __future__ import annotations

from typing import Any

import torch

from latentfit.inference import em as _em
from latentfit.inference import fiem as _fiem
from latentfit.inference import fsaem as _fsaem
from latentfit.inference import iem as _iem
from latentfit.inference import mcem as _mcem
from latentfit.inference import mcmcsgd as _mcmcsgd
from latentfit.inference import misso as _misso
from latentfit.inference import saem as _saem
from latentfit.inference import sem as _sem
from latentfit.inference import semvr as _semvr
from latentfit.inference import ttsem as _ttsem
from latentfit.inference.model import LatentModel
from latentfit.inference.results import FitResult
from latentfit.integrations._front_door import EMFamilyFrontDoor, EngineFrontDoor, front_door, split_run_options
from latentfit.integrations.misso_vi_pyro import MISSOVI
from latentfit.integrations.pyro import PyroEnumModel, PyroLatentModel, write_params_to_store


class _PyroEngine(EngineFrontDoor):
    """Front door shared by every engine: validate options now, trace and fit on ``run``."""

    ppl_name = "Pyro"
    latent_model_cls = PyroLatentModel

    def run(self, *args: Any, **kwargs: Any) -> FitResult:
        """Fit ``model(*args, **kwargs)``; ``checkpoint=``, ``checkpoint_every=``, ``keep=`` and ``resume=`` go to the
        engine (:meth:`latentfit.inference.driver.Engine.run`), not to the model."""
        run_options = split_run_options(kwargs)
        self.check_model_keywords(kwargs)
        # tracing the model draws random numbers: do it on a forked, seeded RNG stream
        seed = int(self.engine_kwargs.get("seed", 0))
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            latent_model = self.latent_model(*args, **kwargs)
        engine = self.engine_cls(latent_model, *self.engine_args, **self.engine_kwargs)
        fit = engine.run(**run_options)
        write_params_to_store(engine.theta_of(fit.state), latent_model.fn)
        return fit


class _EMFamilyEngine(EMFamilyFrontDoor, _PyroEngine):
    """Front door of the EM family: a Pyro model function (discrete latents: exact E-step by
    enumeration) or a ready-made :class:`LatentModel` such as ``GaussianMixture``."""

    enum_model_cls = PyroEnumModel

    def run(self, *args: Any, **kwargs: Any) -> FitResult:
        if isinstance(self.model, LatentModel):
            run_options = split_run_options(kwargs)
            self.check_model_keywords(kwargs)
            return self.engine_cls(self.model, *self.engine_args, **self.engine_kwargs).run(**run_options)
        return super().run(*args, **kwargs)


def _em_engine(cls: type) -> type:
    return front_door(cls, _EMFamilyEngine, __name__)


SAEM = front_door(_saem.SAEM, _PyroEngine, __name__)
FSAEM = front_door(_fsaem.FSAEM, _PyroEngine, __name__)
MCMCSGD = front_door(_mcmcsgd.MCMCSGD, _PyroEngine, __name__)
EM = _em_engine(_em.EM)
MiniBatchEM = _em_engine(_iem.MiniBatchEM)
IEM = _em_engine(_iem.IEM)
SEM = _em_engine(_sem.SEM)
SEMVR = _em_engine(_semvr.SEMVR)
FIEM = _em_engine(_fiem.FIEM)
MCEM = _em_engine(_mcem.MCEM)
MiniBatchMCEM = _em_engine(_mcem.MiniBatchMCEM)
MISSO = _em_engine(_misso.MISSO)
TTSEM = _em_engine(_ttsem.TTSEM)

__all__ = ["EM", "FIEM", "FSAEM", "IEM", "MCEM", "MCMCSGD", "MISSO", "SAEM", "SEM", "SEMVR", "TTSEM", "MiniBatchEM",
           "MiniBatchMCEM", "MISSOVI"]
