"""LoRA SFT of Gemma-3-1b-it (text-only Gemma 3, model_type gemma3_text) on chat data; one
24 GB GPU, or a TPU v5e-4. The multimodal Gemma 3 (4B and up): configs/gemma3_4b_lora.py.

    python -m jaxsft.main --config configs/gemma3_1b_lora.py \
        --config.model.path=/models/gemma-3-1b-it --config.data.train=data/train.jsonl

Gemma's chat template renders a system message into the first user turn (Gemma 2's refuses
one: merge it into the first user turn); the loss covers each reply and its <end_of_turn>.
"""

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/gemma3_1b_lora"
    c.model.path = "/models/gemma-3-1b-it"  # a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # frozen base in bf16
    c.data.train = "data/train.jsonl"
    c.data.eval = "data/eval.jsonl"
    c.data.max_length = 4096
    c.train.num_epochs = 2.0
    c.train.batch_size = 32
    c.train.grad_accum = 2
    c.train.learning_rate = 2e-4
    c.train.warmup_ratio = 0.03
    c.train.eval_every = 200
    c.train.save_every = 200
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.export.format = "both"
    return c
