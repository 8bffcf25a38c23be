"""SAEM with the subjects sharded over several JAX devices (one process).

Run on CPU with two simulated devices (the flag must be set before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/sharded_saem.py

On GPUs/TPUs ``devices=jax.device_count()`` uses them all (the number of subjects must be a multiple of it).
``run(..., devices=n)`` splits the chains over a one-axis mesh ``"units"``; XLA partitions the compiled SAEM
iterations and turns the sums over subjects into all-reduces, so the estimates equal the one-device fit's up to
the order of those sums, which the script prints.
"""

from __future__ import annotations

import jax
import numpy as np

from latentfit.examples.theophylline_numpyro import theophylline_arrays, theophylline_model
from latentfit.numpyro import SAEM

jax.config.update("jax_enable_x64", True)

#: a short run for the example (saemix's defaults are (300, 100))
OPTIONS = dict(num_iters=(30, 20), progress=False, rng="per_unit")


def main() -> None:
    n = jax.device_count()
    data = theophylline_arrays()
    fit = SAEM(theophylline_model, **OPTIONS).run(jax.random.PRNGKey(1), **data, devices=n)
    single = SAEM(theophylline_model, **OPTIONS).run(jax.random.PRNGKey(1), **data)
    z = fit.state.z
    print(f"{n} devices; chains {list(z.shape)} stored {list(z.sharding.shard_shape(z.shape))} per device")
    for name, value in fit.params.items():
        print(f"{name:>6} {np.round(np.asarray(value), 4)}")
    diff = max(float(np.max(np.abs(np.asarray(fit.params[k]) - np.asarray(single.params[k])))) for k in fit.params)
    print(f"largest difference from the one-device fit: {diff:.1e}")


if __name__ == "__main__":
    main()
