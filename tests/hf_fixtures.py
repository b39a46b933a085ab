"""Tiny random HF checkpoints, built locally with transformers model classes (no hub access).

One checkpoint per family and per quirk the loader must handle:

- `llama`: GQA (4 q heads, 2 kv heads), llama3 rope scaling that changes the frequencies at
  these sizes (original_max_position_embeddings=64), untied lm_head;
- `llama_tied`: Llama-3.2 style tied embeddings (no lm_head.weight in the file);
- `qwen2`: q/k/v bias (non-zero), tied, 3 layers, `sliding_window` set but `use_sliding_window`
  false (as in the published Qwen2.5 configs: the window must be ignored);
- `qwen3`: q/k RMSNorm, explicit head_dim (32) != hidden / heads (16), untied;
- `mistral`: sliding_window=8, which matters at the T=24 used by the parity tests;
- `llama_sharded_bf16`: bfloat16 weights in 4 safetensors shards + model.safetensors.index.json;
- `llama_4x_config`: config.json in the transformers 4.x style: top-level rope_theta and
  rope_scaling (no rope_parameters), no head_dim, torch_dtype.
- `gemma2`: offset norms, post-norms, embedding scale, query_pre_attn_scalar 24 != head_dim 16,
  gelu-tanh MLP, sliding window 8 on layers 0 and 2, and softcaps small enough (attention 3,
  final 4) that they change these logits (the shipped 50 / 30 are not reached at this size);
- `gemma3`: Gemma3ForCausalLM (gemma3_text): q/k norms with offset, windowed layers 0 and 1
  with RoPE theta 10k, the global layer 2 with theta 1M and linear scaling x8 (5.x per-layer-
  type rope_parameters), no softcaps;
- `phi3`: Phi-3.5-mini layout (fused qkv_proj and gate_up_proj, split on import and fused on
  export) with LongRoPE whose switch (original_max_position_embeddings 12) lies between the
  padded rows (24, 15 tokens: long factors) and the packed segments (11, 4, 7: short);
- `phi4mini`: Phi-4-mini layout: the same plus partial rotary 0.75 and tied embeddings;
- `gemma3_4x_config`: the same model with its config.json in the 4.x style (rope_theta,
  rope_scaling, rope_local_base_freq, sliding_window_pattern instead of layer_types).
- `mixtral`, `qwen2_moe` (shared expert behind a sigmoid gate, no renormalisation),
  `qwen3_moe` (8 experts, q/k norms, norm_topk_prob): sparse MoE MLPs on every layer, per-expert
  tensors in the file (block_sparse_moe.experts.{j}.w1/w2/w3, mlp.experts.{j}.*_proj).

Every RMSNorm weight is random (not ones) so that a missing or misplaced norm is caught, and
the init scale is large enough that attention is far from uniform (so RoPE and mask errors
show up in the logits). `hf_logits` runs the saved checkpoint with transformers (float32,
eager attention) as the reference.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np

FAMILIES = (
    "llama",
    "llama_tied",
    "qwen2",
    "qwen3",
    "mistral",
    "llama_sharded_bf16",
    "llama_4x_config",
    "gemma2",
    "gemma3",
    "gemma3_4x_config",
    "phi3",
    "phi4mini",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
# Built on demand by the tests that need them, not part of the per-family parity set.
EXTRA = ("qwen2_layer_window", "gemma3_mm")

VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 128
INIT_STD = 0.1  # large enough for peaked attention at hidden 64
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ROPE_THETA = 500000.0
MISTRAL_WINDOW = 8
PHI_ORIGINAL_MAX = 12

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _hf_config(name: str):
    import transformers as tf

    if name in ("llama", "llama_sharded_bf16", "llama_4x_config"):
        return tf.LlamaConfig(
            **_COMMON,
            num_hidden_layers=2,
            rope_parameters={"rope_theta": ROPE_THETA, **LLAMA3_ROPE},
            tie_word_embeddings=False,
        )
    if name == "llama_tied":
        return tf.LlamaConfig(
            **_COMMON,
            num_hidden_layers=2,
            head_dim=16,
            rope_parameters={"rope_theta": ROPE_THETA, **LLAMA3_ROPE},
            tie_word_embeddings=True,
        )
    if name == "qwen2":
        return tf.Qwen2Config(
            **_COMMON,
            num_hidden_layers=3,
            rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
            tie_word_embeddings=True,
        )
    if name == "qwen2_layer_window":
        # The window on layers >= max_window_layers only (HF's layer_types: full, sliding, sliding).
        return tf.Qwen2Config(
            **_COMMON,
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=MISTRAL_WINDOW,
            max_window_layers=1,
            rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
            tie_word_embeddings=True,
        )
    if name == "qwen3":
        return tf.Qwen3Config(
            **_COMMON,
            num_hidden_layers=2,
            head_dim=32,
            rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
            tie_word_embeddings=False,
        )
    if name == "mistral":
        return tf.MistralConfig(
            **_COMMON,
            num_hidden_layers=2,
            sliding_window=MISTRAL_WINDOW,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
            tie_word_embeddings=False,
        )
    if name == "gemma2":
        return tf.Gemma2Config(
            **_COMMON,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=MISTRAL_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        )
    if name in ("gemma3", "gemma3_4x_config"):
        return tf.Gemma3TextConfig(
            **_COMMON,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=MISTRAL_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        )
    if name == "mixtral":  # 8 experts, 2 per token, renormalised
        return tf.MixtralConfig(
            **_COMMON,
            num_hidden_layers=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
            tie_word_embeddings=False,
        )
    if name == "qwen2_moe":  # q/k/v bias, shared expert with its sigmoid gate, no renorm
        return tf.Qwen2MoeConfig(
            **_COMMON,
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
            tie_word_embeddings=False,
        )
    if name == "qwen3_moe":  # q/k norms, 8 experts, 2 per token, renormalised (as shipped)
        return tf.Qwen3MoeConfig(
            **_COMMON,
            num_hidden_layers=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
            tie_word_embeddings=False,
        )
    if name == "gemma3_mm":  # Gemma3ForConditionalGeneration: the gemma3 text model + SigLIP
        text = _hf_config("gemma3").to_dict()
        return tf.Gemma3Config(
            text_config=text,
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
            image_token_index=VOCAB - 1,
        )
    if name in ("phi3", "phi4mini"):
        partial = 0.75 if name == "phi4mini" else 1.0
        half = int(16 * partial) // 2
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.5 + 0.7 * i for i in range(half)],
            "original_max_position_embeddings": PHI_ORIGINAL_MAX,
            "partial_rotary_factor": partial,
        }
        return tf.Phi3Config(
            **{**_COMMON, "eos_token_id": 2},
            num_hidden_layers=2,
            original_max_position_embeddings=PHI_ORIGINAL_MAX,
            partial_rotary_factor=partial,
            rope_parameters=rope,
            tie_word_embeddings=name == "phi4mini",
        )
    raise KeyError(name)


_MODEL_CLASS = {
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def _randomize(model, seed: int) -> None:
    """Random RMSNorm weights (around 1, never all ones) and non-zero biases."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        # Gemma stores norm weights as w - 1 (its norms multiply by 1 + w).
        centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # input/post_attention/final/q_norm/k_norm
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_checkpoint(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny checkpoint `name` (one of FAMILIES or EXTRA) into `out_dir`; return it."""
    import torch
    import transformers as tf

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    cfg = _hf_config(name)
    offset = (FAMILIES + EXTRA).index(name)
    torch.manual_seed(seed + offset)
    model = getattr(tf, _MODEL_CLASS[cfg.model_type])(cfg).eval()
    _randomize(model, seed + offset)
    if name == "llama_sharded_bf16":
        model = model.to(torch.bfloat16)
        # ~32 KB per embedding/lm_head, ~74 KB per layer in bf16: several shards.
        model.save_pretrained(out, safe_serialization=True, max_shard_size="60KB")
    else:
        model.save_pretrained(out, safe_serialization=True)

    config_path = out / "config.json"
    if name == "qwen2":
        # Mirror the published Qwen2.5 configs: a window is given but switched off.
        c = json.loads(config_path.read_text())
        c.pop("layer_types", None)
        c.update(use_sliding_window=False, sliding_window=MISTRAL_WINDOW, max_window_layers=1)
        config_path.write_text(json.dumps(c, indent=2))
    if name == "llama_4x_config":
        c = json.loads(config_path.read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope
        c.pop("head_dim", None)  # Llama-3.1-8B's config has none: hidden / heads
        c["torch_dtype"] = c.pop("dtype", "float32")
        c["transformers_version"] = "4.46.0"
        config_path.write_text(json.dumps(c, indent=2))
    if name == "gemma3_4x_config":  # as Gemma-3-1b-it ships it (transformers 4.50)
        c = json.loads(config_path.read_text())
        rope = c.pop("rope_parameters")
        full = dict(rope["full_attention"])
        c["rope_theta"] = full.pop("rope_theta")
        c["rope_scaling"] = full
        c["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        c.pop("layer_types")
        c["sliding_window_pattern"] = 3  # layers 0, 1 windowed, layer 2 global
        c["torch_dtype"] = c.pop("dtype", "float32")
        c["transformers_version"] = "4.50.0"
        config_path.write_text(json.dumps(c, indent=2))
    return out


def build_all(root: str | Path, seed: int = 0) -> dict[str, Path]:
    root = Path(root)
    return {name: build_checkpoint(name, root / name, seed) for name in FAMILIES}


@functools.cache
def _hf_model(path: str, dtype: str):
    import torch
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager", local_files_only=True
    ).eval()


def hf_model(path: str | Path, dtype: str = "float32"):
    """The transformers model of a saved checkpoint, eager attention (cached)."""
    return _hf_model(str(path), dtype)


def hf_logits(
    path, input_ids, attention_mask=None, position_ids=None, dtype: str = "float32"
) -> np.ndarray:
    """Reference logits [B, T, V] as float32 numpy from transformers (eager attention),
    computed in `dtype` ("float32" unless you want transformers' own bf16 error)."""
    import torch

    model = hf_model(path, dtype)
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, **kw)
    return out.logits.float().numpy()
