"""Parameter counts at real sizes, from the published config.json files, with jax.eval_shape:
nothing is allocated. Each count is the number of elements in the HF safetensors files.

The dicts are the published configs (transformers 4.x style: top-level rope_theta and
rope_scaling), trimmed of keys that do not affect the architecture.
"""

from __future__ import annotations

import math
from dataclasses import replace

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxsft.models.config import ModelConfig
from jaxsft.models.transformer import Transformer

LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

CONFIGS = {
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": LLAMA31_ROPE,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {**LLAMA31_ROPE, "factor": 32.0},
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "Llama-3.1-70B": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "intermediate_size": 28672,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": LLAMA31_ROPE,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "Qwen2.5-7B": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    "Qwen3-8B": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 40960,
        "max_window_layers": 36,
        "model_type": "qwen3",
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
}

GEMMA2 = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "vocab_size": 256000,
    "hidden_activation": "gelu_pytorch_tanh",
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
GEMMA3 = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_activation": "gelu_pytorch_tanh",
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
CONFIGS.update(
    {
        "Gemma-2-2b": {**GEMMA2, "hidden_size": 2304, "intermediate_size": 9216,
                       "num_hidden_layers": 26, "num_attention_heads": 8,
                       "num_key_value_heads": 4},
        "Gemma-2-9b": {**GEMMA2, "hidden_size": 3584, "intermediate_size": 14336,
                       "num_hidden_layers": 42, "num_attention_heads": 16,
                       "num_key_value_heads": 8},
        "Gemma-2-27b": {**GEMMA2, "hidden_size": 4608, "intermediate_size": 36864,
                        "num_hidden_layers": 46, "num_attention_heads": 32,
                        "num_key_value_heads": 16, "head_dim": 128,
                        "query_pre_attn_scalar": 144},
        "Gemma-3-1b": {**GEMMA3, "vocab_size": 262144, "hidden_size": 1152,
                       "intermediate_size": 6912, "num_hidden_layers": 26,
                       "num_attention_heads": 4, "num_key_value_heads": 1,
                       "max_position_embeddings": 32768, "rope_scaling": None},
        "Gemma-3-4b-text": {**GEMMA3, "vocab_size": 262208, "hidden_size": 2560,
                            "intermediate_size": 10240, "num_hidden_layers": 34,
                            "num_attention_heads": 8, "num_key_value_heads": 4,
                            "sliding_window": 1024, "max_position_embeddings": 131072,
                            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
        "Gemma-3-27b-text": {**GEMMA3, "vocab_size": 262208, "hidden_size": 5376,
                             "intermediate_size": 21504, "num_hidden_layers": 62,
                             "num_attention_heads": 32, "num_key_value_heads": 16,
                             "head_dim": 128, "query_pre_attn_scalar": 168,
                             "sliding_window": 1024, "max_position_embeddings": 131072,
                             "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
    }
)  # fmt: skip

PHI3 = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_act": "silu",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "sliding_window": 262144,
    "torch_dtype": "bfloat16",
}


def _longrope(half: int) -> dict:
    return {"type": "longrope", "short_factor": [1.0] * half, "long_factor": [1.5] * half}


CONFIGS.update(
    {
        "Phi-3.5-mini": {**PHI3, "vocab_size": 32064, "num_attention_heads": 32,
                         "num_key_value_heads": 32, "tie_word_embeddings": False,
                         "rope_scaling": _longrope(48)},
        "Phi-4-mini": {**PHI3, "vocab_size": 200064, "num_attention_heads": 24,
                       "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
                       "tie_word_embeddings": True, "sliding_window": 262144,
                       "rope_scaling": _longrope(48)},
        "Phi-4": {**PHI3, "vocab_size": 100352, "hidden_size": 5120, "intermediate_size": 17920,
                  "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
                  "tie_word_embeddings": False, "rope_theta": 250000.0,
                  "max_position_embeddings": 16384, "sliding_window": None,
                  "original_max_position_embeddings": 16384},
    }
)  # fmt: skip

CONFIGS.update(
    {
        "Mixtral-8x7B": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                         "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32,
                         "num_key_value_heads": 8, "num_local_experts": 8,
                         "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
                         "max_position_embeddings": 32768, "sliding_window": None,
                         "router_aux_loss_coef": 0.02, "tie_word_embeddings": False,
                         "hidden_act": "silu", "torch_dtype": "bfloat16"},
        "Qwen1.5-MoE-A2.7B": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                              "vocab_size": 151936, "hidden_size": 2048,
                              "intermediate_size": 5632, "moe_intermediate_size": 1408,
                              "shared_expert_intermediate_size": 5632, "num_experts": 60,
                              "num_experts_per_tok": 4, "norm_topk_prob": False,
                              "decoder_sparse_step": 1, "num_hidden_layers": 24,
                              "num_attention_heads": 16, "num_key_value_heads": 16,
                              "rope_theta": 1e6, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                              "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
                              "hidden_act": "silu", "torch_dtype": "bfloat16"},
        "Qwen3-30B-A3B": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                          "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                          "moe_intermediate_size": 768, "num_experts": 128,
                          "num_experts_per_tok": 8, "norm_topk_prob": True,
                          "decoder_sparse_step": 1, "mlp_only_layers": [],
                          "num_hidden_layers": 48, "num_attention_heads": 32,
                          "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 1e6,
                          "rms_norm_eps": 1e-6, "use_sliding_window": False,
                          "max_position_embeddings": 40960, "router_aux_loss_coef": 0.001,
                          "attention_bias": False, "tie_word_embeddings": False,
                          "hidden_act": "silu", "torch_dtype": "bfloat16"},
    }
)  # fmt: skip

PARAM_COUNTS = {
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.1-70B": 70_553_706_496,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen3-8B": 8_190_735_360,
    "Qwen3-0.6B": 596_049_920,
    "Gemma-2-2b": 2_614_341_888,
    "Gemma-2-9b": 9_241_705_984,
    "Gemma-2-27b": 27_227_128_320,
    "Gemma-3-1b": 999_885_952,
    "Gemma-3-4b-text": 3_880_263_168,
    "Gemma-3-27b-text": 27_009_346_304,
    "Phi-3.5-mini": 3_821_079_552,
    "Phi-4-mini": 3_836_021_760,
    "Phi-4": 14_659_507_200,
    "Mixtral-8x7B": 46_702_792_704,
    "Qwen1.5-MoE-A2.7B": 14_315_784_192,
    "Qwen3-30B-A3B": 30_532_122_624,
}


def _abstract(cfg):
    return nnx.eval_shape(
        lambda: Transformer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    )


def _variables(model) -> dict[str, nnx.Variable]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): var for path, var in flat}


def _params(model) -> dict[str, jax.ShapeDtypeStruct]:
    return {path: var.get_value() for path, var in _variables(model).items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count(name):
    hf = CONFIGS[name]
    cfg = ModelConfig.from_hf(hf)
    params = _params(_abstract(cfg))
    for path, x in params.items():
        assert isinstance(x, jax.ShapeDtypeStruct), f"{path} was allocated: {type(x)}"
        assert x.dtype == jnp.float32, f"{path}: master weights are {x.dtype}"
    count = sum(math.prod(x.shape) for x in params.values())
    assert count == PARAM_COUNTS[name], f"{name}: {count:,} != {PARAM_COUNTS[name]:,}"

    # Layout of docs/architecture.md: stacked layers, [in, out] kernels, no lm_head when tied.
    L, D, V = hf["num_hidden_layers"], hf["hidden_size"], hf["vocab_size"]
    N, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    H = hf.get("head_dim") or D // N
    assert params["embed_tokens.embedding"].shape == (V, D)
    assert params["layers.self_attn.q_proj.kernel"].shape == (L, D, N * H)
    assert params["layers.self_attn.k_proj.kernel"].shape == (L, D, K * H)
    assert params["layers.self_attn.o_proj.kernel"].shape == (L, N * H, D)
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if experts:  # stacked [L, E, ...] experts and a router
        F = hf.get("moe_intermediate_size") or hf["intermediate_size"]
        assert params["layers.mlp.experts.down_proj"].shape == (L, experts, F, D)
        assert params["layers.mlp.experts.gate_proj"].shape == (L, experts, D, F)
        assert params["layers.mlp.gate.kernel"].shape == (L, D, experts)
    else:
        assert params["layers.mlp.down_proj.kernel"].shape == (L, hf["intermediate_size"], D)
    assert params["layers.input_layernorm.scale"].shape == (L, D)
    assert params["norm.scale"].shape == (D,)
    if hf["tie_word_embeddings"]:
        assert not any(p.startswith("lm_head") for p in params)
    else:
        assert params["lm_head.kernel"].shape == (D, V)
    if hf["model_type"] in ("qwen2", "qwen2_moe"):
        assert params["layers.self_attn.q_proj.bias"].shape == (L, N * H)
    if hf["model_type"] in ("qwen3", "qwen3_moe", "gemma3_text"):
        assert params["layers.self_attn.q_norm.scale"].shape == (L, H)
    if hf["model_type"].startswith("gemma"):
        for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            assert params[f"layers.{norm}.scale"].shape == (L, D)
    # the public API gives the same shapes, with nothing allocated
    import jaxsft

    assert jaxsft.model_shapes(hf) == params


MOE_CONFIGS = ("Mixtral-8x7B", "Qwen1.5-MoE-A2.7B", "Qwen3-30B-A3B")


@pytest.mark.parametrize(
    "name", [n for n in CONFIGS if n.startswith(("Llama", "Qwen")) and n not in MOE_CONFIGS]
)
def test_config_reading(name):
    """The architecture fields ModelConfig reads from the published 4.x-style configs."""
    hf = CONFIGS[name]
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == float(hf["rope_theta"])
    assert cfg.head_dim == (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    assert cfg.tie_word_embeddings == hf["tie_word_embeddings"]
    assert cfg.rope_scaling == (hf.get("rope_scaling") or None)
    assert cfg.sliding_window is None  # Qwen2.5's window is switched off by use_sliding_window
    assert cfg.qkv_bias == (hf["model_type"] == "qwen2")
    assert cfg.qk_norm == (hf["model_type"] == "qwen3")
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_moe_config_reading():
    """The MoE fields of the published configs, each family's own key names, written back."""
    mixtral, qwen2, qwen3 = (ModelConfig.from_hf(CONFIGS[n]) for n in MOE_CONFIGS)
    assert (mixtral.num_experts, mixtral.num_experts_per_tok) == (8, 2)
    assert mixtral.moe_intermediate_size == 14336 and mixtral.norm_topk_prob  # always renorm
    assert mixtral.router_aux_loss_coef == 0.02 and not mixtral.qkv_bias
    assert (qwen2.num_experts, qwen2.num_experts_per_tok, qwen2.shared_expert_size) == (60, 4, 5632)
    assert not qwen2.norm_topk_prob and qwen2.qkv_bias and not qwen2.qk_norm
    assert (qwen3.num_experts, qwen3.num_experts_per_tok, qwen3.moe_intermediate_size) == (
        128,
        8,
        768,
    )
    assert qwen3.norm_topk_prob and qwen3.qk_norm and not qwen3.qkv_bias
    assert qwen3.shared_expert_size == 0
    for cfg in (mixtral, qwen2, qwen3):
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_gemma_config_reading():
    """The Gemma quirks as the published 4.x-style configs give them."""
    g2 = ModelConfig.from_hf(CONFIGS["Gemma-2-9b"])
    assert g2.sliding_window == 4096 and g2.sliding_layers == tuple(i % 2 == 0 for i in range(42))
    assert (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0)
    assert g2.query_scale == 256**-0.5 and g2.norm_offset == 1.0 and g2.post_norms
    assert g2.embed_scale and g2.hidden_act == "gelu_pytorch_tanh" and not g2.qk_norm
    g3 = ModelConfig.from_hf(CONFIGS["Gemma-3-4b-text"])
    assert g3.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(34))
    assert (g3.rope_theta, g3.local_rope_theta) == (1e6, 1e4)
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert g3.local_rope_scaling is None and g3.qk_norm and g3.final_softcap is None
    for cfg in (g2, g3):
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


# google/gemma-3-4b-it's config.json as shipped (transformers 4.50): the text_config lists only
# what differs from Gemma3TextConfig's defaults.
GEMMA3_4B_MULTIMODAL = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def test_gemma3_multimodal_config():
    """The language model of the shipped Gemma-3-4b-it config: the same architecture as the
    text-only config of it, the tokens and dtype of the outer config, and config.json written
    back as the multimodal one (vision_config untouched, text_config complete)."""
    import copy

    import jaxsft

    cfg = ModelConfig.from_hf(copy.deepcopy(GEMMA3_4B_MULTIMODAL))
    text = ModelConfig.from_hf(CONFIGS["Gemma-3-4b-text"])
    plain = dict(
        hf_config=None, outer_config=None, eos_token_ids=(), bos_token_id=2, pad_token_id=0
    )
    assert replace(cfg, **plain) == replace(text, **plain, source_dtype=cfg.source_dtype)
    assert cfg.eos_token_ids == (1, 106) and cfg.source_dtype == "bfloat16"
    count = sum(math.prod(x.shape) for x in jaxsft.model_shapes(GEMMA3_4B_MULTIMODAL).values())
    assert count == PARAM_COUNTS["Gemma-3-4b-text"]
    back = cfg.to_hf(dtype="float32")
    assert back["model_type"] == "gemma3" and back["torch_dtype"] == "float32"
    assert back["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert back["vision_config"] == GEMMA3_4B_MULTIMODAL["vision_config"]
    assert back["text_config"]["model_type"] == "gemma3_text"
    assert "architectures" not in back["text_config"] and "dtype" not in back["text_config"]
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_phi_config_reading():
    """LongRoPE with the 4.x top-level original_max_position_embeddings, partial rotary."""
    mini = ModelConfig.from_hf(CONFIGS["Phi-4-mini"])
    assert mini.partial_rotary_factor == 0.75 and mini.tie_word_embeddings
    assert mini.rope_scaling["rope_type"] == "longrope"
    assert mini.rope_scaling["original_max_position_embeddings"] == 4096
    assert ModelConfig.from_hf(CONFIGS["Phi-4"]).rope_scaling is None
    for name in ("Phi-3.5-mini", "Phi-4-mini", "Phi-4"):
        cfg = ModelConfig.from_hf(CONFIGS[name])
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name


def test_logical_axis_names():
    """Every parameter carries logical axis names, one per dimension (docs/architecture.md)."""
    cfg = ModelConfig.from_hf(CONFIGS["Qwen2.5-7B"])
    model = _abstract(cfg)
    known = {"vocab", "embed", "q_heads", "kv_heads", "mlp", "layers", "norm", "head_dim"}
    for where, var in _variables(model).items():
        meta = var.get_metadata()  # flax 0.12 stores sharding_names as out_sharding
        names = meta.get("out_sharding") or meta.get("sharding_names")
        assert names is not None and len(names) == var.get_value().ndim, (where, names)
        assert set(names) <= known, (where, names)
        if where.startswith("layers."):
            assert names[0] == "layers", (where, names)


def test_hf_io_abstract_model():
    """jaxsft.hf_io.abstract_model (what load_hf fills) has the same parameters."""
    from jaxsft.hf_io import abstract_model

    cfg = ModelConfig.from_hf(CONFIGS["Llama-3.2-1B"])
    params = _params(abstract_model(cfg, dtype="bfloat16", param_dtype="float32"))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in params.values())
    assert sum(math.prod(x.shape) for x in params.values()) == PARAM_COUNTS["Llama-3.2-1B"]
