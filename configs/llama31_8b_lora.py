"""LoRA SFT of Llama-3.1-8B-Instruct on chat data (one 80 GB GPU, or a TPU v5e-8 / v4-8).

    python -m jaxsft.main --config configs/llama31_8b_lora.py \
        --config.model.path=/models/Llama-3.1-8B-Instruct --config.data.train=data/train.jsonl
"""

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/llama31_8b_lora"
    c.model.path = "/models/Llama-3.1-8B-Instruct"  # a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # frozen base in bf16; adapters train in bf16 too
    c.model.remat = "dots"
    c.data.train = "data/train.jsonl"
    c.data.eval = "data/eval.jsonl"
    c.data.max_length = 4096
    c.data.packing = True
    c.train.num_epochs = 2.0
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.train.learning_rate = 2e-4
    c.train.warmup_ratio = 0.03
    c.train.weight_decay = 0.0
    c.train.eval_every = 200
    c.train.save_every = 200
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.mesh.fsdp = -1
    c.export.format = "both"
    return c
