"""Launching beyond one machine with JAX's own distributed runtime: `python -m jaxsft.launch
tpu-vm ...` (Cloud TPU VM slices, the preemption loop) and `python -m jaxsft.launch slurm ...`
(an sbatch script for multi-node GPUs). docs/tpu.md, docs/gpu.md."""
