"""Launching beyond one machine with JAX's own distributed runtime: `python -m jaxsft.launch
tpu-vm ...` (Cloud TPU VM slices, the preemption loop) and `python -m jaxsft.launch slurm ...`
(an sbatch script for multi-node GPUs). docs/tpu.md, docs/gpu.md. The run config itself is
checked by loading it as the workers will (`__main__.check_config`)."""

from jaxsft.errors import UserError


def check_env(items) -> None:
    """--env KEY=VALUE items, refused (exit 2) when one has no '='."""
    for item in items:
        if "=" not in item:
            raise UserError(f"--env wants KEY=VALUE, got {item!r}", where="--env")
