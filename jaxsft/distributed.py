"""Multi-host start: JAX's own runtime (jax.distributed), nothing else.

On TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` finds its peers itself; set
JAXSFT_DISTRIBUTED=1 to call it. Under `srun` with more than one task it is called without
being asked (N single-process runs on one run_dir would only fight over its lock);
JAXSFT_DISTRIBUTED=0 turns that off. For an explicit setup (and the two-process CPU tests)
set JAXSFT_COORDINATOR=host:port, JAXSFT_NUM_PROCESSES and JAXSFT_PROCESS_ID.
"""

from __future__ import annotations

import os

import jax

# What JAX's SlurmCluster reads; all of them are set inside an srun step.
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")


def under_srun(env=os.environ) -> bool:
    """True inside a SLURM job step of more than one task."""
    if not all(k in env for k in (*SLURM_STEP_VARS, "SLURM_LOCALID")):
        return False
    return env["SLURM_NTASKS"].isdigit() and int(env["SLURM_NTASKS"]) > 1


def initialize_args(env=os.environ) -> dict | None:
    """The keyword arguments of jax.distributed.initialize for this environment, or None when
    this is a single-process run. {} lets JAX detect the cluster (TPU pod, SLURM)."""
    coordinator = env.get("JAXSFT_COORDINATOR")
    if coordinator:
        return {
            "coordinator_address": coordinator,
            "num_processes": int(env["JAXSFT_NUM_PROCESSES"]),
            "process_id": int(env["JAXSFT_PROCESS_ID"]),
        }
    flag = env.get("JAXSFT_DISTRIBUTED", "")
    if flag == "1" or (flag != "0" and under_srun(env)):
        return {}
    return None


def maybe_initialize():
    kwargs = initialize_args()
    if kwargs is None:
        return
    if "coordinator_address" in kwargs and (
        os.environ.get("JAX_PLATFORMS", "") == "cpu" or jax.default_backend() == "cpu"
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
