"""Multi-host start: JAX's own runtime (jax.distributed), nothing else.

On TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` finds its peers itself; set
JAXSFT_DISTRIBUTED=1 to call it. For an explicit setup (and the two-process CPU tests) set
JAXSFT_COORDINATOR=host:port, JAXSFT_NUM_PROCESSES and JAXSFT_PROCESS_ID.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize():
    coordinator = os.environ.get("JAXSFT_COORDINATOR")
    if coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.default_backend() == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAXSFT_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXSFT_PROCESS_ID"]),
        )
    elif os.environ.get("JAXSFT_DISTRIBUTED") == "1":
        jax.distributed.initialize()
