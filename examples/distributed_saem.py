"""SAEM on several processes with torch.distributed: each process holds a shard of the subjects.

Run (one machine, two processes, gloo on CPU)::

    torchrun --standalone --nproc_per_node=2 examples/distributed_saem.py

On several machines, start the same script on each with ``torchrun --nnodes=<machines> --node_rank=<i>
--nproc_per_node=<processes per machine> --rdzv_backend=c10d --rdzv_endpoint=<host>:<port>``; on GPUs use the
``nccl`` backend and put each process's data on its GPU.  Process r fits the r-th contiguous block of subjects;
the statistics are all-reduced in float64 and every process runs the same M-step, so every process ends with the
same estimates, equal (to rounding) to a one-process fit with the same per-unit random streams, which rank 0
runs afterwards for comparison.
"""

from __future__ import annotations

import numpy as np
import pyro
import torch
import torch.distributed as dist

from latentfit.examples.theophylline import theophylline_arrays, theophylline_model
from latentfit.pyro import SAEM

#: a short run for the example (saemix's defaults are (300, 100))
OPTIONS = dict(num_iters=(30, 20), seed=1, progress=False, rng="per_unit")


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    data = theophylline_arrays()
    shard = torch.as_tensor(np.array_split(np.arange(len(data["time"])), world)[rank])
    mine = {k: v[shard] for k, v in data.items()}  # this process's subjects only
    fit = SAEM(theophylline_model, **OPTIONS).run(**mine, distributed=True)
    if rank == 0:
        pyro.clear_param_store()  # the fit left its estimates there: start the comparison from the same values
        single = SAEM(theophylline_model, **OPTIONS).run(**data)
        diff = max(float(np.max(np.abs(np.asarray(fit.params[k]) - np.asarray(single.params[k]))))
                   for k in fit.params)
        print(f"{world} processes, {len(shard)} subjects on rank 0")
        for name, value in fit.params.items():
            print(f"{name:>6} {np.round(np.asarray(value), 4)}")
        print(f"largest difference from the one-process fit: {diff:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
