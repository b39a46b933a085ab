"""Full SFT of Qwen3-8B (FSDP over all devices, e.g. 8 x 80 GB GPUs or a TPU v5p-16).

python -m jaxsft.main --config configs/qwen3_8b_full.py --config.model.path=/models/Qwen3-8B
"""

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/qwen3_8b_full"
    c.model.path = "/models/Qwen3-8B"  # a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.data.train = "data/train.jsonl"
    c.data.eval = "data/eval.jsonl"
    c.data.max_length = 4096
    c.train.num_epochs = 2.0
    c.train.batch_size = 64
    c.train.grad_accum = 2
    c.train.learning_rate = 1e-5
    c.train.warmup_ratio = 0.03
    c.train.weight_decay = 0.01
    c.train.eval_every = 200
    c.train.save_every = 200
    c.mesh.fsdp = -1
    c.export.format = "merged"
    c.export.dtype = "bfloat16"
    return c
