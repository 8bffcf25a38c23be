"""SAEM over several JAX processes (``jax.distributed``), each holding a block of the subjects.

Start one copy per process; on one machine, two processes on CPU (collectives over gloo)::

    export JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 NUM_PROCESSES=2
    PROCESS_ID=0 python examples/distributed_saem_jax.py &
    PROCESS_ID=1 python examples/distributed_saem_jax.py

On several machines, the same on each with ``JAX_COORDINATOR_ADDRESS`` the address of process 0's machine; under
SLURM or Open MPI leave ``NUM_PROCESSES`` / ``PROCESS_ID`` unset (``jax.distributed.initialize`` finds them).
Every process passes the whole data and the same key; ``run(..., distributed=True)`` shards the subjects over the
devices of every process (process r: the r-th block), XLA sums the statistics across the processes, and every
process ends with the same estimates, those of the one-process fit up to the order of the sums (printed).

With ``--local`` each process passes only its block of the subjects (``run(..., distributed="local")``: what a
process reading only its share of a large study does); the estimates are the same.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from latentfit.examples.theophylline_numpyro import theophylline_arrays, theophylline_model
from latentfit.numpyro import SAEM

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes

#: a short run for the example (saemix's defaults are (300, 100))
OPTIONS = dict(num_iters=(30, 20), progress=False, rng="per_unit")


def main() -> None:
    env = {k: int(os.environ[k]) for k in ("NUM_PROCESSES", "PROCESS_ID") if k in os.environ}
    jax.distributed.initialize(num_processes=env.get("NUM_PROCESSES"), process_id=env.get("PROCESS_ID"))
    data = theophylline_arrays()  # the whole data (the one-process comparison below reads it too)
    rank, n = jax.process_index(), jax.process_count()
    if "--local" in sys.argv:  # only this process's block of the 12 subjects (12 must divide by n)
        size = len(data["time"]) // n
        block = {k: v[rank * size:(rank + 1) * size] for k, v in data.items()}
        fit = SAEM(theophylline_model, **OPTIONS).run(jax.random.PRNGKey(1), **block, distributed="local")
    else:
        fit = SAEM(theophylline_model, **OPTIONS).run(jax.random.PRNGKey(1), **data, distributed=True)
    single = SAEM(theophylline_model, **OPTIONS).run(jax.random.PRNGKey(1), **data)  # this process alone
    if rank == 0:
        for name, value in fit.params.items():
            print(f"{name:>6} {np.round(np.asarray(value), 4)}")
    diff = max(float(np.max(np.abs(np.asarray(fit.params[k]) - np.asarray(single.params[k])))) for k in fit.params)
    print(f"process {rank} of {n}: largest difference from the one-process fit: {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
