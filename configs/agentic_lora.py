"""LoRA SFT of Qwen2.5-7B-Instruct on tool-calling (agentic) conversations, with the golden
set's `tool_call` metric (right function, JSON-equal arguments) before and after training.

    python tools/make_synthetic_data.py --tools --out data/agentic/train.jsonl --n 2000 \
        --eval-out data/agentic/eval.jsonl --golden-out data/agentic/golden.jsonl
    python -m jaxsft.data check --config configs/agentic_lora.py --show 2
    python -m jaxsft.main --config configs/agentic_lora.py \
        --config.model.path=/models/Qwen2.5-7B-Instruct

Rows carry `tools` (passed to the chat template) and assistant `tool_calls`; docs/data.md
shows what each template family renders and supervises. Any model whose template renders
tools works (Qwen2.5/Qwen3, Llama 3.1, Mistral v0.3, Hermes, SmolLM3).
"""

from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.run_dir = "runs/agentic_lora"
    c.model.path = "/models/Qwen2.5-7B-Instruct"  # a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "dots"
    c.data.train = "data/agentic/train.jsonl"
    c.data.eval = "data/agentic/eval.jsonl"
    c.data.max_length = 4096  # tool definitions in the system turn make prompts long
    c.data.packing = True
    # A template that silently drops the row's tools or calls would teach calling unseen tools:
    # "auto" refuses those rows, and warns for dropped reasoning.
    c.data.on_drop = "auto"
    # "all": the call turn and the answer after the tool result are both supervised.
    c.data.turns = "all"
    c.train.num_epochs = 2.0
    c.train.batch_size = 32
    c.train.learning_rate = 2e-4
    c.train.warmup_ratio = 0.03
    c.train.eval_every = 200
    c.train.save_every = 200
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.mesh.fsdp = -1
    # tool_call rows: golden_score, golden_tool_call_accuracy, golden_tool_call_name_accuracy.
    c.eval.golden = "data/agentic/golden.jsonl"
    c.eval.max_new_tokens = 96  # a call with its arguments
    c.export.format = "both"
    return c
