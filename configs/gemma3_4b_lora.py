"""LoRA SFT of Gemma-3-4b-it (Gemma3ForConditionalGeneration, model_type gemma3) on text chat
data: the language model is trained, the SigLIP vision tower and the projector are carried into
the merged export byte for byte, so the exported directory loads in the same class and still
reads images. The language model has 3,880,263,168 parameters (`jaxsft.model_shapes`): 7.8 GB
for the frozen base in bfloat16, before activations and the adapters' optimizer state.

    python -m jaxsft.main --config configs/gemma3_4b_lora.py \
        --config.model.path=/models/gemma-3-4b-it --config.data.train=data/train.jsonl

Text only: data rows with image content parts are refused. Gemma's chat template renders a
system message into the first user turn; the loss covers each reply and its <end_of_turn>.
The PEFT adapter names transformers' modules (model.language_model.layers.N...) and excludes
the vision tower's q/k/v_proj, which share the language model's names.
"""

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/gemma3_4b_lora"
    c.model.path = "/models/gemma-3-4b-it"  # a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # frozen base in bf16
    c.data.train = "data/train.jsonl"
    c.data.eval = "data/eval.jsonl"
    c.data.max_length = 4096
    c.train.num_epochs = 2.0
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.train.learning_rate = 2e-4
    c.train.warmup_ratio = 0.03
    c.train.eval_every = 200
    c.train.save_every = 200
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.export.format = "both"
    return c
