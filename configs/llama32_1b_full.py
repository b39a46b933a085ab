"""Full SFT of Llama-3.2-1B-Instruct (tied embeddings) on one GPU or a small TPU slice.

    python -m jaxsft.main --config configs/llama32_1b_full.py \
        --config.model.path=/models/Llama-3.2-1B-Instruct
"""

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/llama32_1b_full"
    c.model.path = "/models/Llama-3.2-1B-Instruct"  # a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.data.train = "data/train.jsonl"
    c.data.eval = "data/eval.jsonl"
    c.data.max_length = 2048
    c.train.num_epochs = 3.0
    c.train.batch_size = 32
    c.train.learning_rate = 2e-5
    c.train.warmup_ratio = 0.03
    c.train.weight_decay = 0.01
    c.train.eval_every = 200
    c.train.save_every = 500
    c.mesh.fsdp = -1
    c.export.format = "merged"
    return c
