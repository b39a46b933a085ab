"""An sbatch script for a multi-node GPU run: `srun python -m jaxsft.main` on every node, one
process per GPU (default) or per node, `jax.distributed.initialize()` from the SLURM
environment (jaxsft/distributed.py calls it under srun), requeued after a time-limit or
preemption SIGTERM: jaxsft saves, exits 75, and the requeued job resumes from run_dir.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

from jaxsft.errors import EXIT_SIGNAL, UserError
from jaxsft.launch import check_env

PER = ("gpu", "node")


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    config: str
    nodes: int = 1
    gpus_per_node: int = 8
    per: str = "gpu"  # one process per GPU, or one per node that drives all its GPUs
    overrides: tuple[str, ...] = ()
    job_name: str = "jaxsft"
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # HH:MM:SS or D-HH:MM:SS
    cpus_per_task: int | None = None
    venv: str | None = None  # activated before srun
    signal_s: int = 300  # SIGTERM this long before the time limit: time to save
    env: tuple[str, ...] = ()


def check_job(job: SlurmJob) -> None:
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be >= 1")
    if job.per not in PER:
        raise UserError(f"--per must be one of {PER}, got {job.per!r}", where="--per")
    if job.time and not re.fullmatch(r"([0-9]+-)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}", job.time):
        raise UserError(f"bad --time {job.time!r}", where="--time", hint="HH:MM:SS or D-HH:MM:SS")
    check_env(job.env)


def sbatch_script(job: SlurmJob) -> str:
    """The whole script, ready for `sbatch`."""
    tasks = job.gpus_per_node if job.per == "gpu" else 1
    cpus = job.cpus_per_task or (8 if job.per == "gpu" else 8 * job.gpus_per_node)
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--gpus-per-node={job.gpus_per_node}",
        f"--cpus-per-task={cpus}",
        "--exclusive",
        "--requeue",
        f"--signal=TERM@{job.signal_s}",
        "--output=%x-%j.out",
    ]
    directives += [f"--partition={job.partition}"] * bool(job.partition)
    directives += [f"--account={job.account}"] * bool(job.account)
    directives += [f"--time={job.time}"] * bool(job.time)
    main = ["python", "-m", "jaxsft.main", "--config", os.path.abspath(job.config)]
    main += list(job.overrides)
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), ""]
    lines += [
        "# jaxsft: "
        + (
            f"{job.nodes} node(s) x {job.gpus_per_node} GPU(s), one process per "
            f"{'GPU' if job.per == 'gpu' else 'node'}"
        ),
        "set -uo pipefail",
    ]
    if job.venv:
        lines.append(f"source {shlex.quote(os.path.join(job.venv, 'bin', 'activate'))}")
    lines += [
        "# JAX's own runtime: jax.distributed.initialize() reads SLURM_* (coordinator = first",
        "# node of the step, process id = SLURM_PROCID); jaxsft calls it under srun.",
        "export JAXSFT_DISTRIBUTED=1",
    ]
    if job.per == "node":
        ids = ",".join(str(i) for i in range(job.gpus_per_node))
        lines += [
            "# One process drives every GPU of its node (JAX would otherwise give it only",
            "# GPU SLURM_LOCALID).",
            f"export JAX_LOCAL_DEVICE_IDS={ids}",
        ]
    lines += [f"export {shlex.quote(e)}" for e in job.env]
    lines += [
        "",
        f"srun --kill-on-bad-exit=1 {shlex.join(main)}",
        "rc=$?",
        f"# {EXIT_SIGNAL}: stopped by SIGTERM (time limit, preemption) after saving a checkpoint;",
        "# the requeued job reruns this script and resumes from run_dir.",
        f'if [ "$rc" -eq {EXIT_SIGNAL} ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)
