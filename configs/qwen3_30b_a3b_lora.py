"""LoRA SFT of Qwen3-30B-A3B (qwen3_moe: 128 experts, 8 per token, 48 layers) on chat data.

    python -m jaxsft.main --config configs/qwen3_30b_a3b_lora.py \
        --config.model.path=/models/Qwen3-30B-A3B --config.data.train=data/train.jsonl

Memory, from `jaxsft.model_shapes` (30,532,122,624 parameters): the frozen base in bfloat16 is
61.1 GB, so FSDP over 8 devices holds 7.6 GB of it per device (the experts are FSDP-sharded on
their hidden axis like every other matrix); the attention adapters at rank 16 are 13.4 M
parameters (~160 MB with float32 Adam moments), plus activations at the micro-batch below. The
routed experts and the router stay frozen here; adding gate_proj/up_proj/down_proj to
lora.targets gives each of the 48 x 128 experts its own rank-16 adapters, 830.5 M parameters
(10.0 GB with float32 Adam moments, 1.25 GB per device over fsdp 8), and lora.train_router
trains the routers (12.6 M). The load-balancing loss uses the checkpoint's
router_aux_loss_coef (0.001) unless train.router_aux_loss_coef says otherwise.

On more devices, `--config.mesh.expert=8` splits the 128 experts 16 per device over 8 of them
(tokens travel to their experts by all_to_all; see docs/models.md "Parallelism"), with fsdp
taking the rest.
"""

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/qwen3_30b_a3b_lora"
    c.model.path = "/models/Qwen3-30B-A3B"  # a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # frozen base in bf16
    c.model.remat = "dots"
    c.data.train = "data/train.jsonl"
    c.data.eval = "data/eval.jsonl"
    c.data.max_length = 4096
    c.train.num_epochs = 1.0
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.train.learning_rate = 1e-4
    c.train.warmup_ratio = 0.03
    c.train.weight_decay = 0.0
    c.train.eval_every = 200
    c.train.save_every = 200
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.mesh.fsdp = -1
    c.export.format = "both"
    return c
