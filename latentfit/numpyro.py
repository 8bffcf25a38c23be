"""Engines for plain NumPyro models: ``from latentfit.numpyro import SAEM``.

The twin of :mod:`latentfit.pyro`: the same engines and options, with NumPyro's convention of an
explicit PRNG key: ``Engine(model, **options).run(rng_key, *args, **kwargs)`` traces
``model(*args, **kwargs)``, fits it and returns a :class:`~latentfit.inference.results.FitResult`.
Each iteration (MCMC kernels, stochastic approximation, M-step) is one traced JAX function; chunks
of iterations run as one compiled ``lax.scan`` (``chunk_size`` iterations per progress-bar tick).
NumPyro has no global param store: the estimates are ``fit.params`` (constrained values), ready for
``numpyro.handlers.substitute(model, data=substitute_data(fit.params))`` (:func:`substitute_data` also
rebuilds a flax / haiku module's weight tree from its leaves).

Example
-------
The random-intercept model of :mod:`latentfit.pyro`'s example, in NumPyro; SAEM finds its closed-form
maximum-likelihood estimate up to Monte-Carlo error:

>>> import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
>>> from numpyro.distributions import constraints
>>> def model(y):
...     mu = numpyro.param("mu", 0.0)
...     omega = numpyro.param("omega", 1.0, constraint=constraints.positive)
...     sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
...     with numpyro.plate("unit", y.shape[0], dim=-2):
...         b = numpyro.sample("b", dist.Normal(mu, omega))
...         with numpyro.plate("obs", y.shape[1], dim=-1):
...             numpyro.sample("y", dist.Normal(b, sigma), obs=y)
>>> rng = np.random.default_rng(0)
>>> y = jnp.asarray(1.0 + 0.8 * rng.normal(size=(50, 1)) + 0.5 * rng.normal(size=(50, 6)))
>>> fit = SAEM(model, num_iters=(50, 50), progress=False).run(jax.random.PRNGKey(0), y)
>>> ybar = y.mean(1)
>>> s2 = float(((y - ybar[:, None]) ** 2).sum()) / (50 * 5)         # the closed-form MLE
>>> mle = {"mu": float(y.mean()), "omega": (float(ybar.var()) - s2 / 6) ** 0.5, "sigma": s2 ** 0.5}
>>> {k: round(v, 1) for k, v in mle.items()}
{'mu': 1.1, 'omega': 0.7, 'sigma': 0.5}
>>> all(abs(float(fit.params[k]) - mle[k]) < 0.02 for k in mle)
True
"""

from __future__ import annotations

from typing import Any

from latentfit._compilation_cache import enable_from_environment
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
from latentfit.integrations.misso_vi_numpyro import MISSOVI
from latentfit.integrations.numpyro import NumPyroEnumModel, NumPyroLatentModel, as_rng_key, substitute_data

enable_from_environment()


class _NumPyroEngine(EngineFrontDoor):
    """Front door shared by every engine: validate options now, trace and fit on ``run``."""

    ppl_name = "NumPyro"
    latent_model_cls = NumPyroLatentModel

    def run(self, rng_key: Any, *args: Any, **kwargs: Any) -> FitResult:
        """Fit ``model(*args, **kwargs)``; ``rng_key`` is a ``jax.random.PRNGKey`` (or an int seed)."""
        key = as_rng_key(rng_key)
        run_options = split_run_options(kwargs)  # checkpoint=, resume=, ...: the engine's, not the model's
        self.check_model_keywords(kwargs)
        engine = self.engine_cls(self.latent_model(*args, **kwargs), *self.engine_args, **self.engine_kwargs)
        return engine.run(key, **run_options)


class _EMFamilyEngine(EMFamilyFrontDoor, _NumPyroEngine):
    """Front door of the EM family: a NumPyro model function (one discrete latent: exact E-step by
    enumeration) or a ready-made :class:`LatentModel` on JAX arrays (e.g. ``GaussianMixture(jnp_array, K)``)."""

    enum_model_cls = NumPyroEnumModel

    def _check_latent_model(self, model: LatentModel) -> None:
        if not getattr(model.ops, "jittable", False):
            raise TypeError(f"{type(self).__name__} from latentfit.numpyro needs a model on JAX arrays; this "
                            f"{type(model).__name__} holds {model.ops.name} arrays (use latentfit.pyro)")


def _front_door(engine_cls: type, base: type = _NumPyroEngine) -> type:
    """The NumPyro front door of a backend-neutral engine class."""
    return front_door(engine_cls, base, __name__)


SAEM = _front_door(_saem.SAEM)
FSAEM = _front_door(_fsaem.FSAEM)
MCMCSGD = _front_door(_mcmcsgd.MCMCSGD)
EM = _front_door(_em.EM, _EMFamilyEngine)
MiniBatchEM = _front_door(_iem.MiniBatchEM, _EMFamilyEngine)
IEM = _front_door(_iem.IEM, _EMFamilyEngine)
SEM = _front_door(_sem.SEM, _EMFamilyEngine)
SEMVR = _front_door(_semvr.SEMVR, _EMFamilyEngine)
FIEM = _front_door(_fiem.FIEM, _EMFamilyEngine)
MCEM = _front_door(_mcem.MCEM, _EMFamilyEngine)
MiniBatchMCEM = _front_door(_mcem.MiniBatchMCEM, _EMFamilyEngine)
MISSO = _front_door(_misso.MISSO, _EMFamilyEngine)
TTSEM = _front_door(_ttsem.TTSEM, _EMFamilyEngine)

__all__ = ["EM", "FIEM", "FSAEM", "IEM", "MCEM", "MCMCSGD", "MISSO", "SAEM", "SEM", "SEMVR", "TTSEM", "MiniBatchEM",
           "MiniBatchMCEM", "MISSOVI", "substitute_data"]
