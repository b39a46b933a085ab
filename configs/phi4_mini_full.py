"""Full SFT of Phi-4-mini-instruct (3.8B; fused qkv/gate_up tensors, partial rotary 0.75,
LongRoPE, tied embeddings) with FSDP over all devices, e.g. 4 x 80 GB GPUs or a TPU v5p-8.

    python -m jaxsft.main --config configs/phi4_mini_full.py \
        --config.model.path=/models/Phi-4-mini-instruct --config.data.train=data/train.jsonl

Rows up to 4096 tokens use LongRoPE's short factors, longer ones its long factors, as
transformers does for each sequence. For LoRA, lora.targets takes Phi's module names
(qkv_proj, gate_up_proj) and the PEFT export writes them as PEFT expects.
"""

from jaxsft.configs import qwen3_8b_full


def get_config():
    # The same full-SFT recipe as Qwen3-8B (FSDP, remat, bf16 compute, fp32 master weights).
    c = qwen3_8b_full.get_config()
    c.run_dir = "runs/phi4_mini_full"
    c.model.path = "/models/Phi-4-mini-instruct"  # a local HF checkpoint directory
    c.train.batch_size = 32
    c.train.learning_rate = 5e-6
    return c
